//! Kernel feature probes behind `ferry check` (like `criu check`): each probe exercises the
//! mechanism for real on a child, on a mapping of our own or on a scratch cgroup, and cleans up
//! after itself; a feature that is missing names the fallback ferry will use instead.

use std::fs::{File, OpenOptions};
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
pub const FEATURE_NAMES: [&str; 15] = [
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
    out
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


// ---------------------------------------------------------------------------------------------
// ptrace-seize
// ---------------------------------------------------------------------------------------------

fn ptrace_req(req: libc::c_uint, pid: libc::pid_t, data: usize, what: &str) -> Result<(), String> {
    // SAFETY: these ptrace requests (SEIZE, INTERRUPT, DETACH) take no pointer arguments.
    let r = unsafe { libc::ptrace(req, pid, std::ptr::null_mut::<libc::c_void>(), data) };
    if r < 0 {
        Err(os_err(what))
    } else {
        Ok(())
    }
}

fn probe_ptrace_seize() -> ProbeResult {
    let child = Child::spawn()?;
    let start = Instant::now();
    ptrace_req(
        libc::PTRACE_SEIZE,
        child.pid,
        libc::PTRACE_O_EXITKILL as usize,
        "PTRACE_SEIZE",
    )?;
    ptrace_req(libc::PTRACE_INTERRUPT, child.pid, 0, "PTRACE_INTERRUPT")?;
    let status = wait_status(child.pid, Duration::from_secs(2))?;
    let elapsed = start.elapsed();
    if !libc::WIFSTOPPED(status) {
        return Err(format!(
            "child did not stop after PTRACE_INTERRUPT (wait status {status:#x})"
        ));
    }
    let event = (status >> 16) & 0xff;
    if event != libc::PTRACE_EVENT_STOP {
        return Err(format!(
            "stop was not PTRACE_EVENT_STOP (wait status {status:#x})"
        ));
    }
    ptrace_req(libc::PTRACE_DETACH, child.pid, 0, "PTRACE_DETACH")?;
    drop(child);
    Ok(format!(
        "PTRACE_SEIZE + PTRACE_INTERRUPT of a child: PTRACE_EVENT_STOP in {} us, detached",
        elapsed.as_micros()
    ))
}

// ---------------------------------------------------------------------------------------------
// process-vm-readv / writev
// ---------------------------------------------------------------------------------------------

fn probe_process_vm() -> ProbeResult {
    let len = 3 * page_size() + 123;
    let pattern: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    // The child is forked after `pattern` exists, so it has the same bytes at the same address.
    let child = Child::spawn()?;
    let remote = pattern.as_ptr() as *mut libc::c_void;

    let mut got = vec![0u8; len];
    pvm_read(child.pid, remote, &mut got)?;
    if got != pattern {
        return Err("process_vm_readv returned bytes that differ from the child's memory".into());
    }

    let new: Vec<u8> = (0..len).map(|i| (i * 13 + 1) as u8).collect();
    let local = libc::iovec {
        iov_base: new.as_ptr() as *mut libc::c_void,
        iov_len: len,
    };
    let rem = libc::iovec {
        iov_base: remote,
        iov_len: len,
    };
    // SAFETY: the local iovec covers `new`, alive for the call; the remote one is in the child.
    let n = unsafe { libc::process_vm_writev(child.pid, &local, 1, &rem, 1, 0) };
    if n < 0 {
        return Err(os_err("process_vm_writev"));
    }
    if n as usize != len {
        return Err(format!("process_vm_writev wrote {n} of {len} bytes"));
    }
    pvm_read(child.pid, remote, &mut got)?;
    if got != new {
        return Err("process_vm_writev: reading back the child's memory gave other bytes".into());
    }
    drop(child);
    Ok(format!(
        "read and wrote back {len} bytes of a child's memory"
    ))
}

fn pvm_read(pid: libc::pid_t, remote: *mut libc::c_void, buf: &mut [u8]) -> Result<(), String> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let rem = libc::iovec {
        iov_base: remote,
        iov_len: buf.len(),
    };
    // SAFETY: the local iovec covers `buf`, exclusively borrowed for the call.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &rem, 1, 0) };
    if n < 0 {
        return Err(os_err("process_vm_readv"));
    }
    if n as usize != buf.len() {
        return Err(format!("process_vm_readv read {n} of {} bytes", buf.len()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// userfaultfd (linux/userfaultfd.h)
// ---------------------------------------------------------------------------------------------

struct Uffd {
    fd: OwnedFd,
    /// Features the kernel reports (all it supports when none were requested; else those enabled).
    features: u64,
    ioctls: u64,
    user_mode_only: bool,
}

/// Creates a userfaultfd and does the UFFDIO_API handshake asking for `features`.
fn uffd_open(features: u64) -> Result<Uffd, String> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd takes only a flags argument.
    let mut raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    let mut user_mode_only = false;
    if raw < 0 {
        let first = errno();
        // SAFETY: as above.
        raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY) };
        if raw < 0 {
            return Err(format!(
                "userfaultfd: {first}; with UFFD_USER_MODE_ONLY: {}",
                errno()
            ));
        }
        user_mode_only = true;
    }
    let fd = own_fd(raw, "userfaultfd")?;
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl_ptr(fd.as_raw_fd(), UFFDIO_API, &mut api)
        .map_err(|e| format!("UFFDIO_API asking for features {features:#x}: {e}"))?;
    Ok(Uffd {
        fd,
        features: api.features,
        ioctls: api.ioctls,
        user_mode_only,
    })
}

fn uffd_register(uffd: &Uffd, m: &Mapping, mode: u64, what: &str) -> Result<(), String> {
    let mut reg = UffdioRegister {
        range: UffdioRange {
            start: m.addr as u64,
            len: m.len as u64,
        },
        mode,
        ioctls: 0,
    };
    ioctl_ptr(uffd.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg)
        .map(|_| ())
        .map_err(|e| format!("UFFDIO_REGISTER ({what}): {e}"))
}

fn probe_userfaultfd() -> ProbeResult {
    let uffd = uffd_open(0)?;
    // Post-copy's mechanism: a page registered for missing faults, filled with UFFDIO_COPY.
    let m = Mapping::new(1)?;
    uffd_register(&uffd, &m, UFFDIO_REGISTER_MODE_MISSING, "missing")?;
    let src: Vec<u8> = (0..page_size()).map(|i| (i * 31 + 5) as u8).collect();
    let mut copy = UffdioCopy {
        dst: m.addr as u64,
        src: src.as_ptr() as u64,
        len: page_size() as u64,
        mode: 0,
        copy: 0,
    };
    ioctl_ptr(uffd.fd.as_raw_fd(), UFFDIO_COPY, &mut copy)
        .map_err(|e| format!("UFFDIO_COPY: {e}"))?;
    if copy.copy != page_size() as i64 {
        return Err(format!(
            "UFFDIO_COPY copied {} bytes, not {}",
            copy.copy,
            page_size()
        ));
    }
    // The page is now populated, so reading it cannot fault into the userfaultfd.
    if (0..page_size()).any(|i| m.read_byte(i) != src[i]) {
        return Err("UFFDIO_COPY: the registered page does not hold the copied bytes".into());
    }
    drop(m);
    let mode = if uffd.user_mode_only {
        " (UFFD_USER_MODE_ONLY: faults from kernel accesses are not caught)"
    } else {
        ""
    };
    Ok(format!(
        "features {:#x}, ioctls {:#x}; UFFDIO_COPY filled a registered page{mode}",
        uffd.features, uffd.ioctls
    ))
}

fn probe_userfaultfd_wp() -> ProbeResult {
    let all = uffd_open(0)
        .map_err(|e| format!("userfaultfd unavailable ({e})"))?
        .features;
    if all & UFFD_FEATURE_PAGEFAULT_FLAG_WP == 0 {
        return Err(format!(
            "UFFD_FEATURE_PAGEFAULT_FLAG_WP not in features {all:#x}"
        ));
    }
    let uffd = uffd_open(UFFD_FEATURE_PAGEFAULT_FLAG_WP)?;
    let m = Mapping::new(1)?;
    m.write_byte(0, 1);
    uffd_register(&uffd, &m, UFFDIO_REGISTER_MODE_WP, "write-protect")?;
    // Protect and unprotect the page again (no write happens while it is protected).
    uffd_writeprotect(&uffd, &m, true)?;
    uffd_writeprotect(&uffd, &m, false)?;
    Ok("UFFD_FEATURE_PAGEFAULT_FLAG_WP: registered and write-protected a page".into())
}

fn uffd_writeprotect(uffd: &Uffd, m: &Mapping, protect: bool) -> Result<(), String> {
    let mut wp = UffdioWriteprotect {
        range: UffdioRange {
            start: m.addr as u64,
            len: m.len as u64,
        },
        mode: if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        },
    };
    ioctl_ptr(uffd.fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp)
        .map(|_| ())
        .map_err(|e| format!("UFFDIO_WRITEPROTECT: {e}"))
}

/// pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_SOFT_DIRTY: u64 = 1 << 55;
const PM_UFFD_WP: u64 = 1 << 57;

fn pagemap_entry(pagemap: &File, addr: u64) -> Result<u64, String> {
    let mut buf = [0u8; 8];
    pagemap
        .read_exact_at(&mut buf, addr / page_size() as u64 * 8)
        .map_err(|e| format!("read /proc/self/pagemap: {e}"))?;
    Ok(u64::from_ne_bytes(buf))
}

fn probe_userfaultfd_wp_async() -> ProbeResult {
    let all = uffd_open(0)
        .map_err(|e| format!("userfaultfd unavailable ({e})"))?
        .features;
    let want = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
    if all & want != want {
        return Err(format!(
            "features {all:#x} lack{}{}",
            if all & UFFD_FEATURE_WP_ASYNC == 0 {
                " WP_ASYNC"
            } else {
                ""
            },
            if all & UFFD_FEATURE_WP_UNPOPULATED == 0 {
                " WP_UNPOPULATED"
            } else {
                ""
            },
        ));
    }
    let uffd = uffd_open(UFFD_FEATURE_PAGEFAULT_FLAG_WP | want)?;
    if uffd.features & want != want {
        return Err(format!(
            "UFFDIO_API enabled only features {:#x}",
            uffd.features
        ));
    }
    let pagemap =
        File::open("/proc/self/pagemap").map_err(|e| format!("open /proc/self/pagemap: {e}"))?;
    let m = Mapping::new(4)?;
    let ps = page_size();
    for i in 0..4 {
        m.write_byte(i * ps, 1);
    }
    uffd_register(&uffd, &m, UFFDIO_REGISTER_MODE_WP, "write-protect")?;
    uffd_writeprotect(&uffd, &m, true)?;
    // WP_ASYNC is in effect (the handshake enabled it), so this write is resolved by the
    // kernel and clears the page's protection instead of waiting for a handler.
    m.write_byte(2 * ps + 5, 2);
    for i in 0..4 {
        let wp = pagemap_entry(&pagemap, m.page(i))? & PM_UFFD_WP != 0;
        if wp == (i == 2) {
            return Err(format!(
                "after writing page 2 of 4, page {i} is {}write-protected in pagemap",
                if wp { "still " } else { "not " }
            ));
        }
    }
    // The mechanism pre-copy uses: PAGEMAP_SCAN reporting written pages and re-protecting them.
    let scan = match pagemap_scan_written(&pagemap, &m) {
        Ok(regions) if regions == [(m.page(2), m.page(3))] => {
            m.write_byte(ps + 1, 3);
            match pagemap_scan_written(&pagemap, &m) {
                Ok(r) if r == [(m.page(1), m.page(2))] => {
                    "; a PAGEMAP_SCAN round found and re-protected exactly the written pages"
                        .to_string()
                }
                Ok(r) => return Err(format!("second PAGEMAP_SCAN round reported {r:x?}")),
                Err(e) => return Err(format!("second PAGEMAP_SCAN round: {e}")),
            }
        }
        Ok(r) => {
            return Err(format!(
                "PAGEMAP_SCAN reported written {r:x?}, expected page 2 of 4"
            ))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => "; PAGEMAP_SCAN absent".to_string(),
        Err(e) => format!("; PAGEMAP_SCAN with WP_MATCHING failed: {e}"),
    };
    drop(m);
    Ok(format!(
        "WP_ASYNC + WP_UNPOPULATED: a write cleared only its page's protection{scan}"
    ))
}

// ---------------------------------------------------------------------------------------------
// PAGEMAP_SCAN (linux/fs.h)
// ---------------------------------------------------------------------------------------------

/// One PAGEMAP_SCAN over `m`: returns the (start, end) of the regions reported.
fn pagemap_scan(
    pagemap: &File,
    m: &Mapping,
    flags: u64,
    category: u64,
) -> io::Result<Vec<(u64, u64)>> {
    pagemap_scan_range(pagemap, m.addr as u64, m.addr as u64 + m.len as u64, flags, category)
}

fn pagemap_scan_written(pagemap: &File, m: &Mapping) -> io::Result<Vec<(u64, u64)>> {
    pagemap_scan(
        pagemap,
        m,
        PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
        PAGE_IS_WRITTEN,
    )
}

fn probe_pagemap_scan() -> ProbeResult {
    let pagemap =
        File::open("/proc/self/pagemap").map_err(|e| format!("open /proc/self/pagemap: {e}"))?;
    let m = Mapping::new(4)?;
    let ps = page_size();
    m.write_byte(0, 1);
    m.write_byte(2 * ps, 1);
    let regions =
        pagemap_scan(&pagemap, &m, 0, PAGE_IS_PRESENT).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTTY) | Some(libc::EINVAL) => format!("PAGEMAP_SCAN not supported ({e})"),
            _ => format!("PAGEMAP_SCAN: {e}"),
        })?;
    let expected = [(m.page(0), m.page(1)), (m.page(2), m.page(3))];
    if regions != expected {
        return Err(format!(
            "PAGEMAP_SCAN reported present {regions:x?}, expected pages 0 and 2 of 4"
        ));
    }
    Ok("PAGEMAP_SCAN on /proc/self/pagemap found exactly the touched pages".into())
}

// ---------------------------------------------------------------------------------------------
// soft-dirty
// ---------------------------------------------------------------------------------------------

fn probe_soft_dirty() -> ProbeResult {
    let pagemap =
        File::open("/proc/self/pagemap").map_err(|e| format!("open /proc/self/pagemap: {e}"))?;
    let m = Mapping::new(1)?;
    m.write_byte(0, 1);
    write_file(Path::new("/proc/self/clear_refs"), "4")?;
    let cleared = pagemap_entry(&pagemap, m.page(0))? & PM_SOFT_DIRTY != 0;
    m.write_byte(1, 2);
    let after = pagemap_entry(&pagemap, m.page(0))? & PM_SOFT_DIRTY != 0;
    if !after {
        return Err(
            "clear_refs 4 accepted, but pagemap bit 55 stays 0 after a write \
                    (soft-dirty not compiled in)"
                .into(),
        );
    }
    if cleared {
        return Err("pagemap bit 55 was not cleared by clear_refs 4".into());
    }
    Ok("clear_refs 4 cleared pagemap bit 55 and a write set it again".into())
}

// ---------------------------------------------------------------------------------------------
// cgroup freezers
// ---------------------------------------------------------------------------------------------

pub(crate) struct Mount {
    pub(crate) point: PathBuf,
    pub(crate) fstype: String,
    pub(crate) super_opts: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn mounts() -> Result<Vec<Mount>, String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("read /proc/self/mountinfo: {e}"))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let Some(point) = pre.split(' ').nth(4) else {
            continue;
        };
        let mut post = post.split(' ');
        let (Some(fstype), Some(_source), Some(opts)) = (post.next(), post.next(), post.next())
        else {
            continue;
        };
        out.push(Mount {
            point: PathBuf::from(unescape_mountinfo(point)),
            fstype: fstype.to_string(),
            super_opts: opts.to_string(),
        });
    }
    Ok(out)
}

fn write_file(path: &Path, value: &str) -> Result<(), String> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| format!("write {value:?} to {}: {e}", path.display()))
}

fn read_file(path: &Path) -> Result<String, String> {
    let mut s = String::new();
    File::open(path)
        .and_then(|mut f| f.read_to_string(&mut s))
        .map_err(|e| format!("read {}: {e}", path.display()))?;
    Ok(s)
}

/// Polls `path` until `pred` holds for its content, for at most two seconds.
fn wait_file(path: &Path, pred: impl Fn(&str) -> bool) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let s = read_file(path)?;
        if pred(&s) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            return Err(format!("{} still reads {:?}", path.display(), s.trim()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A scratch cgroup holding one child. Drop thaws it, kills and reaps the child, then removes
/// the directory — in that order, because a task frozen by the v1 freezer cannot die.
struct ScratchCgroup {
    dir: PathBuf,
    /// (file, value) written on drop to thaw.
    thaw: (&'static str, &'static str),
    child: Option<Child>,
}

impl ScratchCgroup {
    fn create(root: &Path, thaw: (&'static str, &'static str)) -> Result<ScratchCgroup, String> {
        // SAFETY: getpid has no preconditions.
        let dir = root.join(format!("ferry-check-{}", unsafe { libc::getpid() }));
        if dir.exists() {
            // Left over from an earlier process with our pid; remove it if it is empty.
            let _ = std::fs::remove_dir(&dir);
        }
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        Ok(ScratchCgroup {
            dir,
            thaw,
            child: None,
        })
    }

    /// Forks a child and moves it into the cgroup.
    fn add_child(&mut self) -> Result<libc::pid_t, String> {
        let child = Child::spawn()?;
        let pid = child.pid;
        self.child = Some(child);
        write_file(&self.dir.join("cgroup.procs"), &pid.to_string())?;
        Ok(pid)
    }
}

impl Drop for ScratchCgroup {
    fn drop(&mut self) {
        let _ = write_file(&self.dir.join(self.thaw.0), self.thaw.1);
        drop(self.child.take());
        // The cgroup can stay busy for a moment after its last task is reaped.
        let deadline = Instant::now() + Duration::from_secs(2);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// State letter of `pid` from /proc/PID/stat.
fn proc_state(pid: libc::pid_t) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

fn probe_cgroup_v2_freeze() -> ProbeResult {
    let mounts = mounts()?;
    let mnt = mounts
        .iter()
        .find(|m| m.fstype == "cgroup2")
        .ok_or("no cgroup2 hierarchy mounted")?;
    let mut cg = ScratchCgroup::create(&mnt.point, ("cgroup.freeze", "0"))?;
    let freeze = cg.dir.join("cgroup.freeze");
    let events = cg.dir.join("cgroup.events");
    if !freeze.exists() {
        return Err(format!(
            "{} does not exist (kernel older than 5.2?)",
            freeze.display()
        ));
    }
    cg.add_child()?;
    let is_frozen = |v: &'static str| move |s: &str| s.lines().any(|l| l == format!("frozen {v}"));
    write_file(&freeze, "1")?;
    wait_file(&events, is_frozen("1"))?;
    write_file(&freeze, "0")?;
    wait_file(&events, is_frozen("0"))?;
    let point = mnt.point.display().to_string();
    drop(cg);
    Ok(format!(
        "froze and thawed a child in a scratch cgroup under {point}"
    ))
}

fn probe_cgroup_v1_freezer() -> ProbeResult {
    let mounts = mounts()?;
    let mnt = mounts
        .iter()
        .find(|m| m.fstype == "cgroup" && m.super_opts.split(',').any(|o| o == "freezer"))
        .ok_or("no v1 freezer hierarchy mounted")?;
    let mut cg = ScratchCgroup::create(&mnt.point, ("freezer.state", "THAWED"))?;
    let state = cg.dir.join("freezer.state");
    let pid = cg.add_child()?;
    write_file(&state, "FROZEN")?;
    wait_file(&state, |s| s.trim() == "FROZEN")?;
    let frozen_state = proc_state(pid);
    write_file(&state, "THAWED")?;
    wait_file(&state, |s| s.trim() == "THAWED")?;
    let point = mnt.point.display().to_string();
    drop(cg);
    Ok(format!(
        "froze and thawed a child in a scratch cgroup under {point} (state while frozen: {})",
        frozen_state.unwrap_or('?')
    ))
}

// ---------------------------------------------------------------------------------------------
// pidfd
// ---------------------------------------------------------------------------------------------

fn fstat_id(fd: RawFd) -> Result<(u64, u64), String> {
    // SAFETY: an all-zero `stat` is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into `st`.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(os_err("fstat"));
    }
    Ok((st.st_dev as u64, st.st_ino as u64))
}

fn probe_pidfd() -> ProbeResult {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(os_err("pipe2"));
    }
    let read_end = own_fd(fds[0] as libc::c_long, "pipe2")?;
    let write_end = own_fd(fds[1] as libc::c_long, "pipe2")?;
    // The child inherits the pipe under the same fd numbers.
    let child = Child::spawn()?;
    // SAFETY: pidfd_open takes a pid and flags.
    let pidfd = own_fd(
        unsafe { libc::syscall(libc::SYS_pidfd_open, child.pid, 0) },
        "pidfd_open",
    )?;
    // SAFETY: pidfd_getfd takes a pidfd, a target fd number and flags.
    let got = own_fd(
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_getfd,
                pidfd.as_raw_fd(),
                write_end.as_raw_fd(),
                0,
            )
        },
        "pidfd_getfd",
    )?;
    if fstat_id(got.as_raw_fd())? != fstat_id(write_end.as_raw_fd())? {
        return Err("pidfd_getfd returned a file other than the child's pipe".into());
    }
    drop(got);
    drop(pidfd);
    drop(child);
    drop(read_end);
    Ok("pidfd_open + pidfd_getfd fetched a child's pipe".into())
}

// ---------------------------------------------------------------------------------------------
// clone3 with set_tid
// ---------------------------------------------------------------------------------------------

fn probe_clone3_set_tid() -> ProbeResult {
    // Ask for our own pid, which is certainly taken: EEXIST proves set_tid is supported and
    // permitted without creating a process.
    // SAFETY: getpid has no preconditions.
    let tid: libc::pid_t = unsafe { libc::getpid() };
    // SAFETY: should a process be created after all, the child only calls _exit.
    let r = unsafe { super::clone::clone3_with_pid(tid) };
    if r == 0 {
        // SAFETY: _exit is async-signal-safe; the child must not run any more of our code.
        unsafe { libc::_exit(0) };
    }
    if r > 0 {
        reap(r as libc::pid_t, Duration::from_secs(5));
        return Err(format!(
            "clone3 with a taken set_tid created pid {r} instead of failing"
        ));
    }
    let e = errno();
    match e.raw_os_error() {
        Some(libc::EEXIST) => {
            Ok("clone3 with set_tid of a taken pid gives EEXIST (supported and permitted)".into())
        }
        Some(libc::EPERM) => Err(format!(
            "clone3 set_tid: {e} (needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN)"
        )),
        Some(libc::ENOSYS) => Err(format!("clone3 not supported: {e}")),
        Some(libc::EINVAL) | Some(libc::E2BIG) => Err(format!("clone3 set_tid not supported: {e}")),
        _ => Err(format!("clone3 set_tid: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// timers: POSIX timer ids, timerfd expirations (the process plugin, the files plugin)
// ---------------------------------------------------------------------------------------------

fn probe_timer_restore_ids() -> ProbeResult {
    // PR_TIMER_CREATE_RESTORE_IDS_GET: 0 or 1 where the kernel has it (6.16+), EINVAL else.
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(ferry_plugin_api::util::PR_TIMER_CREATE_RESTORE_IDS as libc::c_int, 2, 0, 0, 0) };
    if r < 0 {
        return Err(os_err("prctl(PR_TIMER_CREATE_RESTORE_IDS)"));
    }
    Ok("prctl(PR_TIMER_CREATE_RESTORE_IDS) answers: timer_create can be given an id".into())
}

fn probe_timerfd_set_ticks() -> ProbeResult {
    use ferry_plugin_api::util::TFD_IOC_SET_TICKS;
    // SAFETY: timerfd_create with flags only; the fd is owned right away.
    let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC | libc::TFD_NONBLOCK) };
    let fd = own_fd(raw as libc::c_long, "timerfd_create")?;
    let ticks: u64 = 3;
    // SAFETY: the ioctl reads one u64 from `ticks`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS, &ticks) } < 0 {
        return Err(os_err("TFD_IOC_SET_TICKS"));
    }
    let mut got = [0u8; 8];
    std::io::Read::read_exact(&mut File::from(fd), &mut got).map_err(|e| format!("reading the timerfd: {e}"))?;
    match u64::from_ne_bytes(got) {
        3 => Ok("TFD_IOC_SET_TICKS set 3 expirations and a read returned them".into()),
        n => Err(format!("TFD_IOC_SET_TICKS set 3 expirations, a read returned {n}")),
    }
}

// ---------------------------------------------------------------------------------------------
// memfd
// ---------------------------------------------------------------------------------------------

fn probe_memfd() -> ProbeResult {
    // SAFETY: the name is a NUL-terminated string.
    let raw = unsafe { libc::memfd_create(c"ferry-check".as_ptr(), libc::MFD_CLOEXEC) };
    let fd = own_fd(raw as libc::c_long, "memfd_create")?;
    let file = File::from(fd);
    let ps = page_size();
    file.set_len(ps as u64)
        .map_err(|e| format!("ftruncate memfd: {e}"))?;
    file.write_all_at(b"ferry", 100)
        .map_err(|e| format!("write memfd: {e}"))?;
    // SAFETY: a shared mapping of the memfd we own, length as set above.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            ps,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(os_err("mmap memfd"));
    }
    let mut seen = [0u8; 5];
    // SAFETY: bytes 100..105 are inside the one-page read-only mapping.
    unsafe { std::ptr::copy_nonoverlapping((p as *const u8).add(100), seen.as_mut_ptr(), 5) };
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(p, ps) };
    if &seen != b"ferry" {
        return Err("a shared mapping of the memfd does not show what was written".into());
    }
    Ok("memfd_create, write, and a shared mapping that shows the data".into())
}

// ---------------------------------------------------------------------------------------------
// TCP_REPAIR
// ---------------------------------------------------------------------------------------------

const TCP_REPAIR: libc::c_int = 19;
const TCP_REPAIR_QUEUE: libc::c_int = 20;
const TCP_QUEUE_SEQ: libc::c_int = 21;
const TCP_SEND_QUEUE: libc::c_int = 2;

fn setsockopt_int(fd: RawFd, opt: libc::c_int, v: libc::c_int, what: &str) -> Result<(), String> {
    // SAFETY: passes a pointer to a c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            opt,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(os_err(what))
    } else {
        Ok(())
    }
}

fn getsockopt_u32(fd: RawFd, opt: libc::c_int, what: &str) -> Result<u32, String> {
    let mut v: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for the kernel to write.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            opt,
            &mut v as *mut u32 as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        Err(os_err(what))
    } else {
        Ok(v)
    }
}

fn probe_tcp_repair() -> ProbeResult {
    // SAFETY: socket takes only integer arguments.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    let sock = own_fd(raw as libc::c_long, "socket")?;
    let fd = sock.as_raw_fd();
    setsockopt_int(fd, TCP_REPAIR, 1, "TCP_REPAIR on (needs CAP_NET_ADMIN)")?;
    let r = (|| {
        setsockopt_int(fd, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE")?;
        let seq = 0x1234_5678;
        setsockopt_int(fd, TCP_QUEUE_SEQ, seq, "TCP_QUEUE_SEQ")?;
        let got = getsockopt_u32(fd, TCP_QUEUE_SEQ, "get TCP_QUEUE_SEQ")?;
        if got != seq as u32 {
            return Err(format!("TCP_QUEUE_SEQ set {seq:#x} but reads {got:#x}"));
        }
        Ok(())
    })();
    let off = setsockopt_int(fd, TCP_REPAIR, 0, "TCP_REPAIR off");
    drop(sock);
    r?;
    off?;
    Ok("TCP_REPAIR on a socket: set and read back the send queue sequence".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    fn features() -> &'static [Feature] {
        static F: OnceLock<Vec<Feature>> = OnceLock::new();
        F.get_or_init(probe_all)
    }

    #[test]
    fn ioctl_numbers_match_uapi() {
        assert_eq!(UFFDIO_API, 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_COPY, 0xC028_AA03);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xC018_AA06);
        assert_eq!(ferry_plugin_api::pagemap::PAGEMAP_SCAN, 0xC060_6610);
        assert_eq!(std::mem::size_of::<ferry_plugin_api::pagemap::PmScanArg>(), 96);
    }

    #[test]
    fn every_feature_probed_once() {
        let f = features();
        eprintln!("{}", render_text(f));
        assert_eq!(f.len(), FEATURE_NAMES.len());
        for name in FEATURE_NAMES {
            assert_eq!(f.iter().filter(|x| x.name == name).count(), 1, "{name}");
            assert!(find(f, name).is_some(), "{name}");
        }
        assert!(find(f, "no-such-feature").is_none());
    }

    #[test]
    fn core_features_present() {
        let f = features();
        for name in ["ptrace-seize", "process-vm-readv", "memfd", "pidfd"] {
            let x = find(f, name).expect(name);
            assert!(x.present, "{name} missing: {}", x.detail);
        }
    }

    #[test]
    fn missing_features_have_fallback() {
        for x in features().iter().filter(|x| !x.present) {
            assert!(!x.detail.is_empty(), "{} has no reason", x.name);
            if x.name != "ptrace-seize" {
                assert!(
                    x.fallback.is_some(),
                    "{} missing without a fallback",
                    x.name
                );
            }
        }
        assert!(features()
            .iter()
            .all(|x| x.name == "ptrace-seize" || x.fallback.is_some()));
    }

    #[test]
    fn render_text_one_aligned_line_per_feature() {
        let f = features();
        let text = render_text(f);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), f.len());
        let col = lines[0]
            .find(if f[0].present { "present" } else { "missing" })
            .unwrap_or(0);
        for (line, x) in lines.iter().zip(f) {
            assert!(line.starts_with(x.name));
            let state = if x.present { "present" } else { "missing" };
            assert_eq!(&line[col..col + 7], state, "{line}");
            if !x.present {
                assert!(line.contains("fallback"), "{line}");
            }
        }
    }

    #[test]
    fn render_text_format() {
        let f = vec![
            Feature {
                name: "ptrace-seize",
                present: true,
                detail: "ok".into(),
                fallback: None,
            },
            Feature {
                name: "soft-dirty",
                present: false,
                detail: "no".into(),
                fallback: Some("hashes"),
            },
        ];
        assert_eq!(
            render_text(&f),
            "ptrace-seize          present   ok\nsoft-dirty            missing   no; fallback: hashes\n"
        );
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_mountinfo(r"/x\04"), r"/x\04");
    }
}
