//! ferry killed at a random instant: the fault-point tests (tests/tests/faults.rs) kill
//! it at chosen places; this loop kills it (SIGKILL, by pid) at a random moment of a
//! checkpoint or a migration, many times, and sorts what it finds:
//!
//! - `done`: ferry finished before the kill (its copy or image is checked, then gone);
//! - `rolled back`: the source runs on, no copy anywhere;
//! - `committed`: the source is gone and exactly one copy runs (a migration), or the
//!   image is complete (a checkpoint: it restores and the restored process passes);
//! - `lost`: post-copy and hybrid killed past their commit point (the destination's
//!   `ready`): the copy may have run, so the source never runs again, and the copy
//!   cannot be completed without it — no process is left, its log is continuous (no
//!   tick repeated) and nothing of ferry's is left around it;
//! - `FAILED`: anything else — no process left (other than `lost`), two, a tick logged
//!   twice, a process that fails its own check, ferry's scratch area or cgroup left in
//!   the survivor. The first few are printed in full.
//!
//! The kill instant is uniform over 1.2 × the command's undisturbed wall time (measured
//! first, median of 3), so most kills land inside it. The seed is printed; `SEED=n`
//! replays a run.
//!
//!     cargo bench -p ferry-tests --bench kill_loop [-- RUNS]

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ferry_tests::{
    bench::{daemon, median},
    ferry_bin,
    workload::{processes_mentioning, Workload, WorkloadOpts},
};

#[derive(Default)]
struct Tally {
    done: u32,
    rolled_back: u32,
    committed: u32,
    lost: u32,
    failed: Vec<String>,
}

/// xorshift64*: enough to spread kill instants, and replayable from the seed.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: f64) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64 * n
    }
}

/// What of ferry's is left in process `pid`, if anything (see `ferry_tests::residue`).
fn residue(pid: i32) -> Option<String> {
    let left = ferry_tests::residue::residue(&[pid], None);
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

/// One attempt: ferry killed `after` into `mode` (none: left to finish). Answers the
/// outcome and the command's wall time (ms), or why it failed.
fn attempt(mode: &str, after: Option<Duration>, addr: &str, key: &Path) -> Result<(&'static str, f64), String> {
    let mut w = Workload::spawn(&WorkloadOpts { threads: 2, files: true, mem_mib: 16, dirty_pages: 64, tick_ms: 2, ..Default::default() });
    w.wait_ticks(3);
    let old = w.pid;
    let log = w.log.to_string_lossy().into_owned();
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("img");
    let started = Instant::now();
    let mut ferry = command(mode, &w, &image, addr, key).spawn().unwrap();
    if let Some(after) = after {
        let until = started + after;
        while Instant::now() < until && ferry.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_micros(200));
        }
        // SAFETY: kill on the pid of our own child, not reaped yet (wait below).
        unsafe { libc::kill(ferry.id() as i32, libc::SIGKILL) };
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
        if !ferry_tests::workload::pid_alive(survivor) || Instant::now() > until {
            let which = if survivor == old { "the source" } else { "the copy" };
            return Err(format!("{which} ({survivor}) stopped after tick {at}; log ends {:?}", w.lines().iter().rev().take(3).collect::<Vec<_>>()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    w.terminate_and_check(survivor)?;
    Ok((if finished { "done" } else if survivor == old { "rolled back" } else { "committed" }, ms))
}

fn main() {
    let Some(args) = ferry_tests::bench::start("kill_loop", &[30], false) else { return };
    let runs = args[0] as u32;
    let seed = std::env::var("SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    println!("seed {seed}; {runs} kills per mode");
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("key");
    std::fs::write(&key, "benchmark key, long enough\n").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let addr = format!("127.0.0.1:{}", 7800 + std::process::id() % 100);
    let _d = daemon(None, &addr, &tmp.path().join("d.sock"), &key);

    println!("{:>22} {:>8} {:>6} {:>6} {:>12} {:>10} {:>6} {:>7}", "mode", "wall ms", "kills", "done", "rolled back", "committed", "lost", "FAILED");
    let modes = [
        "checkpoint ptrace",
        "checkpoint freezer",
        "migrate stop-copy",
        "migrate pre-copy",
        "migrate post-copy",
        "migrate hybrid",
    ];
    for mode in modes {
        let mut walls: Vec<f64> =
            (0..3).map(|_| attempt(mode, None, &addr, &key).unwrap_or_else(|e| panic!("{mode} without a kill: {e}")).1).collect();
        let wall = median(&mut walls);
        let mut t = Tally::default();
        for _ in 0..runs {
            let after = Duration::from_secs_f64(rng.below(wall * 1.2) / 1e3);
            match attempt(mode, Some(after), &addr, &key) {
                Ok(("done", _)) => t.done += 1,
                Ok(("rolled back", _)) => t.rolled_back += 1,
                Ok(("lost", _)) => t.lost += 1,
                Ok(_) => t.committed += 1,
                Err(e) => t.failed.push(format!("killed after {after:?}: {e}")),
            }
        }
        println!(
            "{mode:>22} {wall:>8.1} {runs:>6} {:>6} {:>12} {:>10} {:>6} {:>7}",
            t.done,
            t.rolled_back,
            t.committed,
            t.lost,
            t.failed.len()
        );
        for f in t.failed.iter().take(3) {
            println!("    FAILED: {}", f.lines().next().unwrap_or_default().chars().take(400).collect::<String>());
        }
    }
}
