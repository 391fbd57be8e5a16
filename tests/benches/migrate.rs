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

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::Command,
    time::Instant,
};

use ferry_tests::{
    bench::{daemon, in_ns, kill_and_wait, median},
    ferry_bin,
    workload::{Workload, WorkloadOpts},
};

/// Enters network namespace `ns` for the calling thread.
fn enter(ns: Option<&str>) {
    if let Some(ns) = ns {
        let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        // SAFETY: setns on an fd we own; affects only this thread.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
    }
}

/// Sends `bytes` over a fresh TCP connection from namespace `from` to `to_ip` in
/// namespace `to`, 2 MiB per write; answers the milliseconds until the receiver has all.
/// `fresh`: the receiver reads into a new anonymous mapping of `bytes`, every page
/// faulted in by the read, instead of reusing one 2 MiB buffer.
fn raw_stream(from: Option<&'static str>, to: Option<&'static str>, to_ip: &'static str, bytes: usize, fresh: bool) -> f64 {
    let (tx, rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || {
        enter(to);
        let l = TcpListener::bind((to_ip, 0)).unwrap();
        tx.send(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 2 << 20];
        let area = fresh.then(|| {
            // SAFETY: a fresh private anonymous mapping, unmapped below.
            let p = unsafe {
                libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
            };
            assert_ne!(p, libc::MAP_FAILED);
            p as *mut u8
        });
        let mut got = 0;
        while got < bytes {
            let n = match area {
                // SAFETY: inside the mapping of `bytes` bytes.
                Some(p) => s.read(unsafe { std::slice::from_raw_parts_mut(p.add(got), (bytes - got).min(2 << 20)) }).unwrap(),
                None => s.read(&mut buf).unwrap(),
            };
            assert!(n > 0);
            got += n;
        }
        s.write_all(b"k").unwrap();
        if let Some(p) = area {
            // SAFETY: the mapping made above.
            unsafe { libc::munmap(p.cast(), bytes) };
        }
    });
    let addr = rx.recv().unwrap();
    let sender = std::thread::spawn(move || {
        enter(from);
        let buf = vec![0x5au8; 2 << 20];
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len());
            s.write_all(&buf[..n]).unwrap();
            left -= n;
        }
        let mut k = [0u8; 1];
        s.read_exact(&mut k).unwrap();
        t.elapsed().as_secs_f64() * 1e3
    });
    receiver.join().unwrap();
    sender.join().unwrap()
}

struct Netns(Vec<String>);
impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

fn main() {
    let Some(sizes) = ferry_tests::bench::start("migration", &[1, 9, 64, 256, 1024], true) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("key");
    std::fs::write(&key, "benchmark key, long enough\n").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    // Two hosts joined by a veth pair.
    let id = std::process::id() % 10000;
    let (a, b) = (format!("fbench-a-{id}"), format!("fbench-b-{id}"));
    let ip = |args: &[&str]| Command::new("ip").args(args).status().map(|s| s.success()).unwrap_or(false);
    let _netns = Netns(vec![a.clone(), b.clone()]);
    let (va, vb) = (format!("fba{id}"), format!("fbb{id}"));
    let veth = ip(&["netns", "add", &a])
        && ip(&["netns", "add", &b])
        && ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])
        && ip(&["link", "set", &va, "netns", &a])
        && ip(&["link", "set", &vb, "netns", &b])
        && ip(&["-n", &a, "addr", "add", "10.232.0.1/24", "dev", &va])
        && ip(&["-n", &b, "addr", "add", "10.232.0.2/24", "dev", &vb])
        && ip(&["-n", &a, "link", "set", &va, "up"])
        && ip(&["-n", &b, "link", "set", &vb, "up"])
        && ip(&["-n", &a, "link", "set", "lo", "up"])
        && ip(&["-n", &b, "link", "set", "lo", "up"]);
    let a: &'static str = Box::leak(a.into_boxed_str());
    let b: &'static str = Box::leak(b.into_boxed_str());

    let mut paths: Vec<(&str, Option<&'static str>, Option<&'static str>, &'static str)> =
        vec![("loopback", None, None, "127.0.0.1")];
    if veth {
        paths.push(("veth", Some(a), Some(b), "10.232.0.2"));
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
        let port = 7800 + (id % 100) as u16;
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
