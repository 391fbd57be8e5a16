//! Probes of carrying seccomp filters: suspending a tracee's filters while ferry works
//! in it (`PTRACE_O_SUSPEND_SECCOMP`) and reading a filter back
//! (`PTRACE_SECCOMP_GET_FILTER`, `PTRACE_SECCOMP_GET_METADATA`), on a child under a
//! filter of its own.

use super::*;
use crate::kernel::tracer::PTRACE_O_SUSPEND_SECCOMP;

const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const PTRACE_SECCOMP_GET_METADATA: libc::c_uint = 0x420d;
const SECCOMP_FILTER_FLAG_LOG: u64 = 2;

/// `getppid` gets EPERM, the rest is allowed: `struct sock_filter`s as u64s
/// (code, jt, jf, k little-endian).
fn program() -> [u64; 4] {
    let insn = |code: u64, jt: u64, jf: u64, k: u64| code | jt << 16 | jf << 24 | k << 32;
    [
        insn(0x20, 0, 0, 0),                                            // ld [nr]
        insn(0x15, 0, 1, libc::SYS_getppid as u64),                     // jeq getppid
        insn(0x06, 0, 0, 0x0005_0000 | libc::EPERM as u64),             // ret ERRNO(EPERM)
        insn(0x06, 0, 0, 0x7fff_0000),                                  // ret ALLOW
    ]
}

/// A forked child under [`program`] (installed with `LOG`), blocked in `pause()`.
fn filtered_child() -> Result<Child, String> {
    let prog = program();
    // struct sock_fprog: u16 len, padding, a pointer.
    #[repr(C)]
    struct Fprog {
        len: u16,
        filter: *const u64,
    }
    let fprog = Fprog { len: prog.len() as u16, filter: prog.as_ptr() };
    // SAFETY: after fork the child makes only raw system calls and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os_err("fork"));
    }
    if pid == 0 {
        // SAFETY: prctl, seccomp, pause and _exit are async-signal-safe system calls;
        // `fprog` and `prog` are in the child's copy of this stack frame.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
            if libc::syscall(libc::SYS_seccomp, 1, SECCOMP_FILTER_FLAG_LOG, &fprog as *const Fprog) != 0 {
                libc::_exit(1);
            }
            loop {
                libc::pause();
            }
        }
    }
    let child = Child { pid };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if status.contains("Seccomp:\t2") {
            return Ok(child);
        }
        if Instant::now() > deadline || !Path::new(&format!("/proc/{pid}")).exists() {
            return Err("a child could not install a seccomp filter".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub(super) fn probe_seccomp_suspend() -> ProbeResult {
    let child = filtered_child()?;
    let opts = libc::PTRACE_O_EXITKILL as usize | PTRACE_O_SUSPEND_SECCOMP;
    ptrace_req(libc::PTRACE_SEIZE, child.pid, opts, "PTRACE_SEIZE with PTRACE_O_SUSPEND_SECCOMP (needs CAP_SYS_ADMIN, CONFIG_CHECKPOINT_RESTORE, ferry outside seccomp)")?;
    ptrace_req(libc::PTRACE_INTERRUPT, child.pid, 0, "PTRACE_INTERRUPT")?;
    let status = wait_status(child.pid, Duration::from_secs(2))?;
    if !libc::WIFSTOPPED(status) {
        return Err(format!("the child did not stop (wait status {status:#x})"));
    }
    ptrace_req(libc::PTRACE_DETACH, child.pid, 0, "PTRACE_DETACH")?;
    drop(child);
    Ok("a child under a seccomp filter seized with its filters suspended: ferry's injected calls do not meet a process's filters".into())
}

pub(super) fn probe_seccomp_get_filter() -> ProbeResult {
    let child = filtered_child()?;
    ptrace_req(libc::PTRACE_SEIZE, child.pid, libc::PTRACE_O_EXITKILL as usize, "PTRACE_SEIZE")?;
    ptrace_req(libc::PTRACE_INTERRUPT, child.pid, 0, "PTRACE_INTERRUPT")?;
    let status = wait_status(child.pid, Duration::from_secs(2))?;
    if !libc::WIFSTOPPED(status) {
        return Err(format!("the child did not stop (wait status {status:#x})"));
    }
    let want = program();
    let mut got = [0u64; 4];
    // SAFETY: `got` holds the 4 instructions the kernel writes (it answers the length first).
    let n = unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, child.pid, 0usize, got.as_mut_ptr()) };
    if n < 0 {
        return Err(os_err("PTRACE_SECCOMP_GET_FILTER"));
    }
    if n != 4 || got != want {
        return Err(format!("PTRACE_SECCOMP_GET_FILTER gave {n} instructions, not the child's program"));
    }
    let mut meta = [0u64, 0u64];
    // SAFETY: struct seccomp_metadata, 16 bytes, lives across the call.
    if unsafe { libc::ptrace(PTRACE_SECCOMP_GET_METADATA, child.pid, 16usize, meta.as_mut_ptr()) } < 0 {
        return Err(os_err("PTRACE_SECCOMP_GET_METADATA"));
    }
    if meta[1] != SECCOMP_FILTER_FLAG_LOG {
        return Err(format!("PTRACE_SECCOMP_GET_METADATA gave flags {:#x}, want LOG", meta[1]));
    }
    ptrace_req(libc::PTRACE_DETACH, child.pid, 0, "PTRACE_DETACH")?;
    drop(child);
    Ok("read back a child's seccomp filter (4 instructions) and its LOG flag".into())
}
