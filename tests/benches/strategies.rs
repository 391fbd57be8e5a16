//! Migration algorithms side by side (the paper's figures 3 and 4, measured properly):
//! processes of several sizes, each dirtying a set share of its memory per second
//! while it is moved over loopback, by stop-copy, pre-copy, post-copy and hybrid.
//! Prints medians of frozen time (downtime: freeze → running on the destination),
//! total time (for post-copy and hybrid: until the last page arrived) as ferry counts
//! it and as the command's wall time from outside (plugins loaded, connection made),
//! bytes sent, rounds, and both times against stop-copy's in the same run; and what the
//! application saw: the longest stall of its own tick loop (wall clock, logged by the
//! workload when over two periods + 5 ms, so 0 means under 25 ms) across the migration.
//! The dirty rate is printed as given (whole pages per tick, a share of the memory per
//! second) and as measured: the pages the workload wrote per second over 20 ticks just
//! before the migration (a tick late on a loaded machine writes less). Each run takes
//! the strategies in another order (a VM's freed pages go cold: whoever goes first pays
//! for it).
//!
//!     cargo bench -p ferry-tests --bench strategies [-- SIZES_MIB...]

use ferry_tests::{
    bench::{daemon, in_ns, kill_and_wait, median},
    ferry_bin,
    workload::{Workload, WorkloadOpts},
};

const TICK_MS: u32 = 10;

fn main() {
    let Some(sizes) = ferry_tests::bench::start("strategies", &[64, 256, 1024], true) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("key");
    std::fs::write(&key, "benchmark key, long enough\n").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let addr = format!("127.0.0.1:{}", 7900 + std::process::id() % 100);
    let _d = daemon(None, &addr, &tmp.path().join("d.sock"), &key);

    println!(
        "{:>6} {:>8} {:>8} {:>10} {:>10} {:>10} {:>9} {:>9} {:>7} {:>9} {:>9} {:>9}",
        "MiB", "dirty/s", "measured", "strategy", "frozen ms", "total ms", "wall ms", "MB sent", "rounds", "stall ms", "frozen/sc", "total/sc"
    );
    for &size in &sizes {
        for percent in [0u32, 1, 10] {
            // Rounded, not truncated (64 MiB at "1 %" was 0.61 %/s).
            let ticks_per_s = 1000 / TICK_MS;
            let pages_per_tick = (f64::from(size as u32 * 256 * percent) / 100.0 / f64::from(ticks_per_s)).round() as u32;
            let rate = 100.0 * f64::from(pages_per_tick * ticks_per_s) / f64::from(size as u32 * 256);
            const STRATEGIES: [&str; 4] = ["stop-copy", "pre-copy", "post-copy", "hybrid"];
            let runs = 5;
            // Per strategy: frozen, total, wall, MB sent, rounds, longest stall, and the
            // dirty rate measured before the migration.
            let mut m: Vec<[Vec<f64>; 7]> = (0..STRATEGIES.len()).map(|_| Default::default()).collect();
            for run in 0..runs {
                for k in 0..STRATEGIES.len() {
                    let i = (k + run) % STRATEGIES.len();
                    let strategy = STRATEGIES[i];
                    let opts = WorkloadOpts {
                        mem_mib: size as u32,
                        files: false,
                        tick_ms: TICK_MS,
                        dirty_pages: pages_per_tick,
                        ..Default::default()
                    };
                    let mut w = Workload::spawn(&opts);
                    w.wait_ticks(2);
                    // The rate the workload dirties its memory at, here and now.
                    let (t0, at0) = (*w.ticks().last().unwrap(), std::time::Instant::now());
                    w.wait_ticks(t0 + 20);
                    let (t1, at1) = (*w.ticks().last().unwrap(), std::time::Instant::now());
                    let measured = 100.0 * f64::from(pages_per_tick) * (t1 - t0) as f64
                        / (at1 - at0).as_secs_f64()
                        / f64::from(size as u32 * 256);
                    let from = t1;
                    let started = std::time::Instant::now();
                    let o = in_ns(None, &ferry_bin())
                        .args(["migrate", &w.pid.to_string(), "--to", &addr, "--json", "--strategy", strategy, "--auth-key"])
                        .arg(&key)
                        .output()
                        .unwrap();
                    let wall = started.elapsed().as_secs_f64() * 1e3;
                    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                    // Two ticks of the copy after the command: the stall (if any) is logged.
                    for pid in s["pids"].as_object().unwrap().values() {
                        w.adopt(pid.as_i64().unwrap() as i32);
                    }
                    w.wait_ticks(*w.ticks().last().unwrap() + 2);
                    let stall = w.stalls().iter().filter(|&&(_, t)| t > from).map(|&(ms, _)| ms).fold(0.0, f64::max);
                    let row = &mut m[i];
                    row[0].push(s["frozen_ms"].as_f64().unwrap());
                    row[1].push(s["total_ms"].as_f64().unwrap());
                    row[2].push(wall);
                    row[3].push(s["bytes"].as_f64().unwrap() / 1e6);
                    row[4].push(s["rounds"].as_f64().unwrap());
                    row[5].push(stall);
                    row[6].push(measured);
                    for pid in s["pids"].as_object().unwrap().values() {
                        kill_and_wait(pid.as_i64().unwrap() as i32);
                    }
                    drop(w);
                }
            }
            let (sc_frozen, sc_total) = (median(&mut m[0][0].clone()), median(&mut m[0][1].clone()));
            for (strategy, row) in STRATEGIES.iter().zip(m.iter_mut()) {
                let [frozen, total, wall, sent, rounds, stall, measured] = row;
                let (f, t) = (median(frozen), median(total));
                println!(
                    "{size:>6} {:>7.2}% {:>7.2}% {strategy:>10} {f:>10.1} {t:>10.1} {:>9.1} {:>9.1} {:>7.0} {:>9.1} {:>8.2}x {:>8.2}x",
                    rate,
                    median(measured),
                    median(wall),
                    median(sent),
                    median(rounds),
                    median(stall),
                    f / sc_frozen,
                    t / sc_total
                );
            }
        }
    }
}
