//! Process trees, one event per process in parallel against one after another (the
//! paper's figures 5 and 6): N = 1, 3, 9 processes (the workload and N − 1 children of
//! `--tree`), each with 16 MiB of its own (the parent's 16 MiB mapping, private in each
//! child since the fork, plus a child's own 1 MiB), checkpointed to tmpfs with the
//! events run in parallel and, with `FERRY_SERIAL_EVENTS=1`, one after another. Prints
//! medians of frozen time (first freeze → every process killed), total time and bytes
//! written, and the frozen time against N = 1's. No shared-area column: memory shared
//! between the processes is not carried yet (a tree with it is refused).
//!
//!     cargo bench -p ferry-tests --bench trees [-- N...]

use std::process::Command;

use ferry_tests::{
    bench::median,
    ferry_bin,
    workload::{pid_alive, Workload, WorkloadOpts},
};

/// Reaps every child of this (subreaper) process that has ended.
fn reap_all() {
    // SAFETY: waitpid with a null status pointer.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG | libc::__WALL) } > 0 {}
}

/// One checkpoint of an N-process tree; answers frozen ms, total ms, bytes.
fn once(n: u32, serial: bool) -> (f64, f64, f64) {
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 16, files: false, tick_ms: 20, tree: n - 1, ..Default::default() });
    w.wait_ready();
    let mut all = ferry::kernel::target::children(w.pid);
    all.push(w.pid);
    let dir = std::path::Path::new("/dev/shm").join(format!("ferry-bench-trees-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cmd = Command::new(ferry_bin());
    cmd.args(["checkpoint", &w.pid.to_string(), "--dir", dir.to_str().unwrap(), "--json"]);
    if serial {
        cmd.env("FERRY_SERIAL_EVENTS", "1");
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "checkpoint of {n}: {}", String::from_utf8_lossy(&o.stderr));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(stats["pids"].as_object().map(|p| p.len()), Some(n as usize), "{stats}");
    w.reap();
    ferry_tests::wait_until("the tree gone", std::time::Duration::from_secs(60), || {
        reap_all();
        all.iter().all(|&p| !pid_alive(p))
    });
    let _ = std::fs::remove_dir_all(&dir);
    (stats["frozen_ms"].as_f64().unwrap(), stats["total_ms"].as_f64().unwrap(), stats["bytes"].as_f64().unwrap())
}

fn main() {
    let Some(ns) = ferry_tests::bench::start("trees", &[1, 3, 9], true) else { return };
    // SAFETY: prctl with integer arguments. The killed trees' orphans come here.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let runs = 7;
    println!("{:>3} {:>9} {:>10} {:>10} {:>9} {:>10}", "N", "events", "frozen ms", "total ms", "MB", "frozen/N=1");
    let mut base = [0.0f64; 2];
    for &n in &ns {
        let n = n.clamp(1, 17) as u32;
        let mut m: [[Vec<f64>; 3]; 2] = Default::default();
        for run in 0..runs {
            // Each run in the other order: whoever goes first pays for cold memory.
            for k in 0..2 {
                let serial = (k + run) % 2 == 1;
                let (f, t, b) = once(n, serial);
                let i = usize::from(serial);
                m[i][0].push(f);
                m[i][1].push(t);
                m[i][2].push(b / 1e6);
            }
        }
        for (i, mode) in ["parallel", "serial"].iter().enumerate() {
            let frozen = median(&mut m[i][0]);
            if n == 1 {
                base[i] = frozen;
            }
            let against = if base[i] > 0.0 { format!("{:.2}", frozen / base[i]) } else { "-".into() };
            println!("{n:>3} {mode:>9} {frozen:>10.1} {:>10.1} {:>9.1} {against:>10}", median(&mut m[i][1]), median(&mut m[i][2]));
        }
    }
}
