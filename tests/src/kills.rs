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

/// Whether process `pid` runs traced by no one, seen in one read of its status: a
/// copy the destination kills and reaps meanwhile is a zombie no longer traced.
fn untraced(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        let state = s.lines().find_map(|l| l.strip_prefix("State:")).unwrap_or("").trim_start();
        s.contains("TracerPid:\t0\n") && !state.starts_with('Z') && !state.starts_with('X')
    })
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
/// Answers the outcome ("done", "rolled back", "committed", or "lost": post-copy and
/// hybrid killed past their commit point, the copy may have run, so the source never
/// runs again and nothing is left — its log continuous, nothing of ferry's around it)
/// and the command's wall time (ms), or why it failed.
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
    // Post-copy and hybrid may lose the process past their commit point.
    let may_lose = mode == "migrate post-copy" || mode == "migrate hybrid";
    // What ferry left settles (a destination rolling back, a janitor at work): one
    // process without ferry's traces, or none after a checkpoint that killed its source.
    let settle = Instant::now() + Duration::from_secs(30);
    let survivors = loop {
        let now = processes_mentioning(&log);
        let settled = match now.as_slice() {
            // Let go: a copy still traced by the destination may yet be killed there
            // (post-copy's, whose source died with its ferry).
            [one] => residue(*one).is_none() && untraced(*one),
            [] => mode.starts_with("checkpoint") || may_lose,
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
        [] if may_lose => {
            // Lost: nothing of ferry's left around the source, and what the copy
            // logged was never logged again.
            if let Some(r) = residue(old) {
                return Err(format!("lost, but {r}"));
            }
            w.check_continuous().map_err(|e| format!("lost, and {e}"))?;
            return Ok(("lost", ms));
        }
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
    // It carries on: three more ticks (a survivor that dies meanwhile is a failure).
    let at = *w.ticks().last().unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while w.ticks().len() < at as usize + 3 {
        if !crate::workload::pid_alive(survivor) || Instant::now() > until {
            let which = if survivor == old { "the source" } else { "the copy" };
            return Err(format!("{which} ({survivor}) stopped after tick {at}; log ends {:?}", w.lines().iter().rev().take(3).collect::<Vec<_>>()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    w.terminate_and_check(survivor)?;
    Ok((if finished { "done" } else if survivor == old { "rolled back" } else { "committed" }, ms))
}
