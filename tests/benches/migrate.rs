//! Stop-copy migration time against the physical limit measured in the same run: a
//! raw TCP stream of the same number of bytes over the same path (loopback, and the
//! veth pair between two network namespaces), received into one reused buffer; and the
//! same stream received into freshly mapped memory, as a destination must (on these
//! VMs every first touch of a page is a costly fault, which the plain stream never
//! pays). Each size runs over the `tcp` medium and over the `rdma` medium on
//! libfabric's `tcp` provider (the RDMA code path over a TCP emulation of RDMA, not
//! RDMA hardware's speed; skipped where libfabric is absent). Prints medians.
//!
//!     cargo bench -p ferry-tests --bench migrate [-- SIZES_MIB...]

use ferry_tests::{
    bench::{daemon, in_ns, kill_and_wait, median, raw_stream},
    ferry_bin,
    workload::{Workload, WorkloadOpts},
};

fn main() {
    let Some(sizes) = ferry_tests::bench::start("migration", &[1, 9, 64, 256, 1024], true) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("key");
    std::fs::write(&key, "benchmark key, long enough\n").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    // Two hosts joined by a veth pair.
    let (_netns, veth) = ferry_tests::bench::veth_pair("fbench");
    let (a, b) = match &veth {
        Some((a, b)) => (Some(*a), Some(*b)),
        None => (None, None),
    };

    let mut paths: Vec<(&str, Option<&'static str>, Option<&'static str>, &'static str)> =
        vec![("loopback", None, None, "127.0.0.1")];
    if veth.is_some() {
        paths.push(("veth", a, b, ferry_tests::bench::VETH_B));
    }
    let rdma_config = tmp.path().join("rdma.json");
    std::fs::write(&rdma_config, r#"{"mechanism": {"medium": "rdma", "medium_params": {"provider": "tcp"}}}"#).unwrap();
    let mut media: Vec<(&str, Vec<std::ffi::OsString>)> = vec![("tcp", vec![])];
    let probe = Command::new(ferry_bin()).args(["plugins", "list"]).output().unwrap();
    match String::from_utf8_lossy(&probe.stdout).lines().find(|l| l.contains(" rdma ")) {
        Some(line) if !line.contains("unavailable") => media.push(("rdma(tcp)", vec!["--config".into(), rdma_config.clone().into()])),
        other => eprintln!("no rdma row: {}", other.unwrap_or("no rdma medium plugin")),
    }
    println!(
        "{:>9} {:>9} {:>6} {:>9} {:>9} {:>9} {:>7} {:>11} {:>7} {:>9}",
        "path", "medium", "MiB", "total ms", "frozen", "raw ms", "ratio", "raw+map ms", "ratio", "GB/s"
    );
    for (name, from, to, to_ip) in paths {
        let port = 7800 + (std::process::id() % 100) as u16;
        let addr = format!("{to_ip}:{port}");
        let _d = daemon(to, &addr, &tmp.path().join(format!("{name}.sock")), &key);
        for (&size, (medium, args)) in sizes.iter().flat_map(|s| media.iter().map(move |m| (s, m))) {
            let runs = 5;
            let (mut tot, mut fr, mut raw, mut mapped) = (vec![], vec![], vec![], vec![]);
            let mut bytes = 0u64;
            for i in 0..runs {
                // Freed guest pages go cold on these VMs: alternate who goes first.
                let raw_first = i % 2 == 1 && bytes > 0;
                if raw_first {
                    raw.push(raw_stream(from, to, to_ip, bytes as usize, false));
                    mapped.push(raw_stream(from, to, to_ip, bytes as usize, true));
                }
                let opts = WorkloadOpts { mem_mib: size as u32, files: false, tick_ms: 50, ..Default::default() };
                let w = match from {
                    Some(ns) => Workload::spawn_in_netns(ns, &opts),
                    None => Workload::spawn(&opts),
                };
                w.wait_ticks(1);
                let o = in_ns(from, &ferry_bin())
                    .args(["migrate", &w.pid.to_string(), "--to", &addr, "--json", "--auth-key"])
                    .arg(&key)
                    .args(args)
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                bytes = s["bytes"].as_u64().unwrap();
                tot.push(s["total_ms"].as_f64().unwrap());
                fr.push(s["frozen_ms"].as_f64().unwrap());
                for pid in s["pids"].as_object().unwrap().values() {
                    kill_and_wait(pid.as_i64().unwrap() as i32);
                }
                drop(w);
                if !raw_first {
                    raw.push(raw_stream(from, to, to_ip, bytes as usize, false));
                    mapped.push(raw_stream(from, to, to_ip, bytes as usize, true));
                }
            }
            let (t, f, r, m) = (median(&mut tot), median(&mut fr), median(&mut raw), median(&mut mapped));
            println!(
                "{name:>9} {medium:>9} {size:>6} {t:>9.1} {f:>9.1} {r:>9.1} {:>6.2}x {m:>11.1} {:>6.2}x {:>9.2}",
                t / r,
                t / m,
                bytes as f64 / (t / 1e3) / 1e9
            );
        }
    }
}
