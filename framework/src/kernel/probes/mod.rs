//! Kernel feature probes behind `ferry check` (like `criu check`): each probe exercises the
//! mechanism for real on a child, on a mapping of our own or on a scratch cgroup, and cleans up
//! after itself; a feature that is missing names the fallback ferry will use instead.

use std::fs::{File, OpenOptions};

use crate::kernel::mounts::mounts;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::kernel::uffd::*;
use std::time::{Duration, Instant};

/// One probed kernel feature.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Feature {
    pub name: &'static str,
    pub present: bool,
    pub detail: String,
    pub fallback: Option<&'static str>,
}

/// Every feature name, in the order `probe_all` reports them.
pub const FEATURE_NAMES: [&str; 20] = [
    "ptrace-seize",
    "process-vm-readv",
    "userfaultfd",
    "userfaultfd-wp",
    "userfaultfd-wp-async",
    "pagemap-scan",
    "soft-dirty",
    "cgroup-v2-freeze",
    "cgroup-v1-freezer",
    "pidfd",
    "clone3-set-tid",
    "memfd",
    "tcp-repair",
    "timer-restore-ids",
    "timerfd-set-ticks",
    "loginuid",
    "seccomp-suspend",
    "seccomp-get-filter",
    "ptrace-debugregs",
    "vdso-mremap",
];

const FALLBACK_PVM: &str = "/proc/PID/mem";
const FALLBACK_POSTCOPY: &str = "stop-copy and pre-copy only";
const FALLBACK_PAGE_HASH: &str = "page-hash dirty tracking";
const FALLBACK_SOFT_DIRTY: &str = "userfaultfd WP-async + PAGEMAP_SCAN, else page hashes";
const FALLBACK_V2: &str = "v1 freezer, else ptrace interrupt";
const FALLBACK_V1: &str = "cgroup v2 freeze, else ptrace interrupt";
const FALLBACK_PIDFD: &str = "inject sendmsg over a unix socket";
const FALLBACK_CLONE3: &str = "restored process gets a new pid";
const FALLBACK_MEMFD: &str = "shared memory from a file in /dev/shm";
const FALLBACK_TCP: &str = "TCP connections are not migrated";
const FALLBACK_TIMER_IDS: &str = "POSIX timers keep their ids only when these are 0, 1, 2… in order";
const FALLBACK_TICKS: &str = "a timerfd with expirations not read yet cannot be restored";
const FALLBACK_LOGINUID: &str = "a process whose audit login uid differs from ferry's is refused";
const FALLBACK_SECCOMP: &str = "a process under seccomp is refused (ferry's injected calls would meet its filters, or they could not be carried)";
const FALLBACK_DEBUGREGS: &str = "no process can be checkpointed (each thread's debug registers are read) nor a hardware breakpoint restored";
const FALLBACK_VDSO: &str = "a restore fails unless the kernel puts the new vDSO where the image had it";
const NO_FALLBACK: &str = "ferry cannot work without it";

type ProbeResult = Result<String, String>;

/// Serialises probes run from several threads of one process (they share a cgroup name,
/// and clear_refs on self).
static PROBE_LOCK: Mutex<()> = Mutex::new(());

/// Runs every probe. Never panics: a probe that fails or panics is reported missing with its reason.
pub fn probe_all() -> Vec<Feature> {
    let _guard = PROBE_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut out = Vec::with_capacity(FEATURE_NAMES.len());

    out.push(feature("ptrace-seize", None, run(probe_ptrace_seize)));
    out.push(feature(
        "process-vm-readv",
        Some(FALLBACK_PVM),
        run(probe_process_vm),
    ));
    out.push(feature(
        "userfaultfd",
        Some(FALLBACK_POSTCOPY),
        run(probe_userfaultfd),
    ));
    out.push(feature(
        "userfaultfd-wp",
        Some(FALLBACK_PAGE_HASH),
        run(probe_userfaultfd_wp),
    ));
    out.push(feature(
        "userfaultfd-wp-async",
        Some(FALLBACK_PAGE_HASH),
        run(probe_userfaultfd_wp_async),
    ));
    out.push(feature(
        "pagemap-scan",
        Some(FALLBACK_PAGE_HASH),
        run(probe_pagemap_scan),
    ));
    out.push(feature(
        "soft-dirty",
        Some(FALLBACK_SOFT_DIRTY),
        run(probe_soft_dirty),
    ));
    out.push(feature(
        "cgroup-v2-freeze",
        Some(FALLBACK_V2),
        run(probe_cgroup_v2_freeze),
    ));
    out.push(feature(
        "cgroup-v1-freezer",
        Some(FALLBACK_V1),
        run(probe_cgroup_v1_freezer),
    ));
    out.push(feature("pidfd", Some(FALLBACK_PIDFD), run(probe_pidfd)));
    out.push(feature(
        "clone3-set-tid",
        Some(FALLBACK_CLONE3),
        run(probe_clone3_set_tid),
    ));
    out.push(feature("memfd", Some(FALLBACK_MEMFD), run(probe_memfd)));
    out.push(feature(
        "tcp-repair",
        Some(FALLBACK_TCP),
        run(probe_tcp_repair),
    ));
    out.push(feature("timer-restore-ids", Some(FALLBACK_TIMER_IDS), run(probe_timer_restore_ids)));
    out.push(feature("timerfd-set-ticks", Some(FALLBACK_TICKS), run(probe_timerfd_set_ticks)));
    out.push(feature("loginuid", Some(FALLBACK_LOGINUID), run(probe_loginuid)));
    out.push(feature("seccomp-suspend", Some(FALLBACK_SECCOMP), run(probe_seccomp_suspend)));
    out.push(feature("seccomp-get-filter", Some(FALLBACK_SECCOMP), run(probe_seccomp_get_filter)));
    out.push(feature("ptrace-debugregs", Some(FALLBACK_DEBUGREGS), run(probe_ptrace_debugregs)));
    out.push(feature("vdso-mremap", Some(FALLBACK_VDSO), run(probe_vdso_mremap)));
    out
}

/// Only the probes that choose a dirty-page tracker (`auto`): no scratch cgroup, no
/// child, none of the other probes' cost in every pre-copy.
pub fn probe_dirty_tracking() -> Vec<Feature> {
    let _guard = PROBE_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    vec![
        feature("userfaultfd-wp-async", Some(FALLBACK_PAGE_HASH), run(probe_userfaultfd_wp_async)),
        feature("soft-dirty", Some(FALLBACK_SOFT_DIRTY), run(probe_soft_dirty)),
    ]
}

/// One aligned line per feature: name, `present`/`missing`, detail, and the fallback if missing.
pub fn render_text(features: &[Feature]) -> String {
    let width = features
        .iter()
        .map(|f| f.name.len())
        .max()
        .unwrap_or(0)
        .max(20)
        + 2;
    let mut text = String::new();
    for f in features {
        let state = if f.present { "present" } else { "missing" };
        let mut line = format!("{:<width$}{:<10}{}", f.name, state, f.detail);
        if !f.present {
            match f.fallback {
                Some(fb) => line.push_str(&format!("; fallback: {fb}")),
                None => line.push_str(&format!("; no fallback: {NO_FALLBACK}")),
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// The feature called `name`, if it was probed.
pub fn find<'a>(features: &'a [Feature], name: &str) -> Option<&'a Feature> {
    features.iter().find(|f| f.name == name)
}

fn feature(name: &'static str, fallback: Option<&'static str>, result: ProbeResult) -> Feature {
    let (present, detail) = match result {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    Feature {
        name,
        present,
        detail,
        fallback,
    }
}

fn run(probe: fn() -> ProbeResult) -> ProbeResult {
    match std::panic::catch_unwind(probe) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(format!("probe panicked: {msg}"))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers: errno, children, mappings.
// ---------------------------------------------------------------------------------------------

fn errno() -> io::Error {
    io::Error::last_os_error()
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", errno())
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

/// Takes ownership of a raw fd returned by the kernel (negative means error, reported as errno).
fn own_fd(fd: libc::c_long, what: &str) -> Result<OwnedFd, String> {
    if fd < 0 {
        return Err(os_err(what));
    }
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A forked child blocked in `pause()`; dropping it kills and reaps it by pid.
struct Child {
    pid: libc::pid_t,
}

impl Child {
    /// Forks. The child only makes async-signal-safe calls (we may be multi-threaded).
    fn spawn() -> Result<Child, String> {
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: after fork the child runs only `child_main`, which makes async-signal-safe
        // system calls and never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(os_err("fork"));
        }
        if pid == 0 {
            child_main(parent);
        }
        Ok(Child { pid })
    }
}

fn child_main(parent: libc::pid_t) -> ! {
    // SAFETY: prctl, getppid, pause and _exit are async-signal-safe system calls.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        if libc::getppid() != parent {
            libc::_exit(0);
        }
        loop {
            libc::pause();
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // SAFETY: kill on a pid we forked and have not reaped yet.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        reap(self.pid, Duration::from_secs(5));
    }
}

/// Waits (polling, bounded) until `pid` is reaped; gives up after `timeout` rather than hang.
fn reap(pid: libc::pid_t, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
        if r == pid && (libc::WIFEXITED(status) || libc::WIFSIGNALED(status)) {
            return;
        }
        if r < 0 && errno().raw_os_error() != Some(libc::EINTR) {
            return;
        }
        if Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits (polling, bounded) for a state change of `pid`; returns the wait status.
fn wait_status(pid: libc::pid_t, timeout: Duration) -> Result<i32, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
        if r == pid {
            return Ok(status);
        }
        if r < 0 && errno().raw_os_error() != Some(libc::EINTR) {
            return Err(os_err("waitpid"));
        }
        if Instant::now() > deadline {
            return Err(format!("no stop from pid {pid} within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// An anonymous private read-write mapping (transparent huge pages disabled); unmapped on drop.
struct Mapping {
    addr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(pages: usize) -> Result<Mapping, String> {
        let len = pages * page_size();
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choice.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os_err("mmap"));
        }
        let m = Mapping {
            addr: p as *mut u8,
            len,
        };
        // Best effort: keep the kernel from backing the probe with a huge page.
        // SAFETY: madvise on the range we just mapped.
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        Ok(m)
    }

    fn page(&self, i: usize) -> u64 {
        self.addr as u64 + (i * page_size()) as u64
    }

    fn write_byte(&self, offset: usize, value: u8) {
        assert!(offset < self.len);
        // SAFETY: offset is inside the mapping, which is readable and writable.
        unsafe { std::ptr::write_volatile(self.addr.add(offset), value) };
    }

    fn read_byte(&self, offset: usize) -> u8 {
        assert!(offset < self.len);
        // SAFETY: offset is inside the mapping, which is readable.
        unsafe { std::ptr::read_volatile(self.addr.add(offset)) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own this mapping and nothing refers to it after drop.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

mod ptrace;
mod memory;
mod cgroup;
mod process;
mod files;
mod seccomp;
mod traps;
use ptrace::*;
use memory::*;
use cgroup::*;
use process::*;
use files::*;
use seccomp::*;
use traps::*;

#[cfg(test)]
mod tests;
