//! ferry, or the daemon it migrates to, killed (SIGKILL, by pid) at an instant of a
//! checkpoint or a migration, and what is left sorted: shared by the kill-loop
//! benchmark (benches/kill_loop.rs, many random instants) and its short version in
//! tests/tests/faults.rs.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    ferry_bin,
    workload::{processes_mentioning, Workload, WorkloadOpts},
};

/// xorshift64*: enough to spread kill instants, and replayable from the seed.
pub struct Rng(pub u64);
impl Rng {
    /// A number in [0, n).
    pub fn below(&mut self, n: f64) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64 * n
    }
}

/// What of ferry's is left in process `pid`, if anything (see `ferry_tests::residue`).
fn residue(pid: i32) -> Option<String> {
    let left = crate::residue::residue(&[pid], None);
    (!left.is_empty()).then(|| left.join("; "))
}

/// The command for one attempt on `w`.
fn command(mode: &str, w: &Workload, image: &Path, addr: &str, key: &Path) -> Command {
    let mut c = Command::new(ferry_bin());
    let pid = w.pid.to_string();
    match mode.split_once(' ') {
        Some(("checkpoint", quiesce)) => {
            c.args(["checkpoint", &pid, "--dir", image.to_str().unwrap(), "--quiesce", quiesce]);
        }
        Some(("migrate", strategy)) => {
            c.args(["migrate", &pid, "--to", addr, "--strategy", strategy, "--auth-key", key.to_str().unwrap()]);
        }
        _ => unreachable!("{mode}"),
    }
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    c
}

/// Who is killed: the ferry command, or the daemon (by its pid) it migrates to.
#[derive(Clone, Copy, Debug)]
pub enum Victim {
    Ferry,
    Daemon(i32),
}

/// One attempt: `victim` killed `after` into `mode` ("checkpoint ptrace|freezer",
/// "migrate <strategy>" to the daemon at `addr` with `key`; none: left to finish).
/// Answers the outcome ("done", "rolled back", "committed") and the command's wall
/// time (ms), or why it failed.
pub fn attempt(mode: &str, kill: Option<(Victim, Duration)>, addr: &str, key: &Path) -> Result<(&'static str, f64), String> {
    let mut w = Workload::spawn(&WorkloadOpts { threads: 2, files: true, mem_mib: 16, dirty_pages: 64, tick_ms: 2, ..Default::default() });
    w.wait_ticks(3);
    let old = w.pid;
    let log = w.log.to_string_lossy().into_owned();
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("img");
    let started = Instant::now();
    let mut ferry = command(mode, &w, &image, addr, key).spawn().unwrap();
    if let Some((victim, after)) = kill {
        let until = started + after;
        while Instant::now() < until && ferry.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_micros(200));
        }
        let pid = match victim {
            Victim::Ferry => ferry.id() as i32,
            Victim::Daemon(pid) => pid,
        };
        // SAFETY: kill on the pid of our own child (not reaped yet: wait below), or of
        // the daemon the caller started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let status = ferry.wait().unwrap();
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let finished = status.success();
    // What ferry left settles (a destination rolling back, a janitor at work): one
    // process without ferry's traces, or none after a checkpoint that killed its source.
    let settle = Instant::now() + Duration::from_secs(30);
    let survivors = loop {
        let now = processes_mentioning(&log);
        let settled = match now.as_slice() {
            [one] => residue(*one).is_none(),
            [] => mode.starts_with("checkpoint"),
            _ => false,
        };
        if settled || Instant::now() > settle {
            break now;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for &p in &survivors {
        w.adopt(p);
    }
    let survivor = match survivors.as_slice() {
        [one] => *one,
        [] if mode.starts_with("checkpoint") => {
            // The source was killed at the end of the checkpoint: its image must bring it back.
            let o = Command::new(ferry_bin()).args(["restore", "--dir", image.to_str().unwrap(), "--json"]).output().unwrap();
            if !o.status.success() {
                return Err(format!("the source is gone and its image does not restore: {}", String::from_utf8_lossy(&o.stderr)));
            }
            let copy = *processes_mentioning(&log).first().ok_or("the restored process is gone")?;
            w.adopt(copy);
            copy
        }
        other => return Err(format!("{} processes left: {other:?}; log: {}", other.len(), w.log_text())),
    };
    if let Some(r) = residue(survivor) {
        return Err(r);
    }
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 3);
    w.terminate_and_check(survivor)?;
    Ok((if finished { "done" } else if survivor == old { "rolled back" } else { "committed" }, ms))
}
