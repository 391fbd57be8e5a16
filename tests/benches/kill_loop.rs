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
//! Migrations are run twice: ferry killed, then the daemon (started again after each).
//!
//!     cargo bench -p ferry-tests --bench kill_loop [-- RUNS]

use std::time::Duration;

use ferry_tests::{
    bench::{daemon, median},
    kills::{attempt, Rng, Victim},
};

#[derive(Default)]
struct Tally {
    done: u32,
    rolled_back: u32,
    committed: u32,
    lost: u32,
    failed: Vec<String>,
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
    let mut started = 0;
    let mut start_daemon = || {
        started += 1;
        let addr = format!("127.0.0.1:{}", ferry_tests::daemon::free_port());
        (daemon(None, &addr, &tmp.path().join(format!("d{started}.sock")), &key), addr)
    };
    let (mut d, mut addr) = start_daemon();

    println!("{:>30} {:>8} {:>6} {:>6} {:>12} {:>10} {:>6} {:>7}", "mode (killed)", "wall ms", "kills", "done", "rolled back", "committed", "lost", "FAILED");
    let modes = [
        "checkpoint ptrace",
        "checkpoint freezer",
        "migrate stop-copy",
        "migrate pre-copy",
        "migrate post-copy",
        "migrate hybrid",
    ];
    let runs_of = modes.iter().flat_map(|&m| {
        let killed: &[&str] = if m.starts_with("migrate") { &["ferry", "daemon"] } else { &["ferry"] };
        killed.iter().map(move |&k| (m, k))
    });
    for (mode, killed) in runs_of.collect::<Vec<_>>() {
        let mut walls: Vec<f64> =
            (0..3).map(|_| attempt(mode, None, &addr, &key).unwrap_or_else(|e| panic!("{mode} without a kill: {e}")).1).collect();
        let wall = median(&mut walls);
        let mut t = Tally::default();
        for _ in 0..runs {
            let after = Duration::from_secs_f64(rng.below(wall * 1.2) / 1e3);
            let victim = if killed == "daemon" { Victim::Daemon(d.pid()) } else { Victim::Ferry };
            match attempt(mode, Some((victim, after)), &addr, &key) {
                Ok(("done", _)) => t.done += 1,
                Ok(("rolled back", _)) => t.rolled_back += 1,
                Ok(("lost", _)) => t.lost += 1,
                Ok(_) => t.committed += 1,
                Err(e) => t.failed.push(format!("killed after {after:?}: {e}")),
            }
            if killed == "daemon" {
                (d, addr) = start_daemon();
            }
        }
        let mode = format!("{mode} ({killed})");
        println!(
            "{mode:>30} {wall:>8.1} {runs:>6} {:>6} {:>12} {:>10} {:>6} {:>7}",
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
    drop(d);
}
