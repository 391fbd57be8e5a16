//! What the benchmarks share: their start, medians, and a daemon to migrate to.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
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
