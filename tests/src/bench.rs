//! What the benchmarks share: their start, medians, and a daemon to migrate to.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{ferry_bin, wait_until};

/// The start of every benchmark: it needs root (else it says so and answers `None`),
/// measures the optimised build unless `FERRY_BIN` names another, and answers the
/// sizes in MiB given on its command line, or `default`. With `warm`, the guest's
/// memory is touched first (a first touch costs a hypervisor fault on these VMs).
pub fn start(name: &str, default: &[u64], warm: bool) -> Option<Vec<u64>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the {name} benchmark needs root");
        return None;
    }
    if std::env::var_os("FERRY_BIN").is_none() {
        std::env::set_var("FERRY_BIN", crate::root().join("target/release/ferry"));
    }
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    if warm {
        crate::warm_guest_memory();
    }
    Some(if args.is_empty() { default.to_vec() } else { args })
}

/// Kills `pid` and waits until it is gone: a dying process of a GiB frees its memory
/// for a while, and must not do it during the next measurement.
pub fn kill_and_wait(pid: i32) {
    crate::workload::kill_pid(pid);
    wait_until("a killed process to be gone", Duration::from_secs(60), || !crate::workload::pid_alive(pid));
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// `bin`, run inside network namespace `ns` when given.
pub fn in_ns(ns: Option<&str>, bin: &Path) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

/// A `ferry daemon`, killed when dropped.
pub struct Daemon(Child);
impl Daemon {
    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a daemon listening on `addr` with key file `key`, in namespace `ns`.
pub fn daemon(ns: Option<&str>, addr: &str, control: &Path, key: &Path) -> Daemon {
    let mut c = in_ns(ns, &ferry_bin());
    c.args(["daemon", "--listen", addr, "--control"]).arg(control).arg("--auth-key").arg(key);
    let d = Daemon(c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    wait_until("the daemon", Duration::from_secs(30), || ferry::commands::control::daemon_running(control));
    d
}

/// Enters network namespace `ns` for the calling thread.
pub fn enter(ns: Option<&str>) {
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
pub fn raw_stream(from: Option<&'static str>, to: Option<&'static str>, to_ip: &'static str, bytes: usize, fresh: bool) -> f64 {
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

pub struct Netns(Vec<String>);
impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// The address of the second host of [`veth_pair`] (the first is 10.232.0.1).
pub const VETH_B: &str = "10.232.0.2";

/// Two hosts joined by a veth pair: network namespaces named after `prefix` and this
/// process, with loopback up in both; `None` where they cannot be made. The namespaces
/// go when the answer's first half is dropped.
pub fn veth_pair(prefix: &str) -> (Netns, Option<(&'static str, &'static str)>) {
    let id = std::process::id() % 10000;
    let (a, b) = (format!("{prefix}-a-{id}"), format!("{prefix}-b-{id}"));
    let ip = |args: &[&str]| Command::new("ip").args(args).status().map(|s| s.success()).unwrap_or(false);
    let netns = Netns(vec![a.clone(), b.clone()]);
    let (va, vb) = (format!("fba{id}"), format!("fbb{id}"));
    let made = ip(&["netns", "add", &a])
        && ip(&["netns", "add", &b])
        && ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])
        && ip(&["link", "set", &va, "netns", &a])
        && ip(&["link", "set", &vb, "netns", &b])
        && ip(&["-n", &a, "addr", "add", "10.232.0.1/24", "dev", &va])
        && ip(&["-n", &b, "addr", "add", &format!("{VETH_B}/24"), "dev", &vb])
        && ip(&["-n", &a, "link", "set", &va, "up"])
        && ip(&["-n", &b, "link", "set", &vb, "up"])
        && ip(&["-n", &a, "link", "set", "lo", "up"])
        && ip(&["-n", &b, "link", "set", "lo", "up"]);
    let names = made.then(|| -> (&'static str, &'static str) { (Box::leak(a.into_boxed_str()), Box::leak(b.into_boxed_str())) });
    (netns, names)
}

/// Milliseconds to fault in `bytes` of fresh anonymous memory with
/// `MADV_POPULATE_WRITE`, the first touches a destination pays before any byte lands.
pub fn populate(bytes: usize) -> f64 {
    // SAFETY: a fresh private anonymous mapping, unmapped below.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    assert_ne!(p, libc::MAP_FAILED);
    let t = Instant::now();
    // SAFETY: the mapping just made.
    let r = unsafe { libc::madvise(p, bytes, libc::MADV_POPULATE_WRITE) };
    let ms = t.elapsed().as_secs_f64() * 1e3;
    // SAFETY: as above.
    unsafe { libc::munmap(p, bytes) };
    assert_eq!(r, 0, "MADV_POPULATE_WRITE: {}", std::io::Error::last_os_error());
    ms
}
