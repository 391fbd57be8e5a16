//! Probes of what a process that traps itself or moved its vDSO needs: setting another
//! thread's debug registers (a hardware breakpoint or watchpoint carried by the threads
//! plugin) and moving the vDSO with `mremap` (the memory plugin puts each of the vDSO and
//! vvar areas where the image had it).

use super::*;

/// `offsetof(struct user, u_debugreg)`.
const DEBUGREG: usize = std::mem::offset_of!(libc::user, u_debugreg);
/// DR7: L0, RW0 = 01 (write), LEN0 = 10 (8 bytes).
const WATCH_DR7: u64 = 0x90001;

static WATCHED: u64 = 0;

fn peek_debugreg(pid: libc::pid_t, n: usize) -> Result<u64, String> {
    // SAFETY: errno is thread-local; PEEKUSER takes integer arguments only.
    let r = unsafe {
        *libc::__errno_location() = 0;
        libc::ptrace(libc::PTRACE_PEEKUSER, pid, (DEBUGREG + 8 * n) as *mut libc::c_void, std::ptr::null_mut::<libc::c_void>())
    };
    if r == -1 && errno().raw_os_error() != Some(0) {
        return Err(os_err(&format!("PTRACE_PEEKUSER of DR{n}")));
    }
    Ok(r as u64)
}

fn poke_debugreg(pid: libc::pid_t, n: usize, value: u64) -> Result<(), String> {
    // SAFETY: POKEUSER takes integer arguments only.
    let r = unsafe { libc::ptrace(libc::PTRACE_POKEUSER, pid, (DEBUGREG + 8 * n) as *mut libc::c_void, value as *mut libc::c_void) };
    if r < 0 {
        return Err(os_err(&format!("PTRACE_POKEUSER of DR{n}")));
    }
    Ok(())
}

pub(super) fn probe_ptrace_debugregs() -> ProbeResult {
    let child = Child::spawn()?;
    ptrace_req(libc::PTRACE_SEIZE, child.pid, libc::PTRACE_O_EXITKILL as usize, "PTRACE_SEIZE")?;
    ptrace_req(libc::PTRACE_INTERRUPT, child.pid, 0, "PTRACE_INTERRUPT")?;
    wait_status(child.pid, Duration::from_secs(2))?;
    // The child is a fork: the variable is at the same address there.
    let addr = &WATCHED as *const u64 as u64;
    let set = poke_debugreg(child.pid, 0, addr).and_then(|_| poke_debugreg(child.pid, 7, WATCH_DR7));
    let got = set.and_then(|_| Ok((peek_debugreg(child.pid, 0)?, peek_debugreg(child.pid, 7)?)));
    let _ = poke_debugreg(child.pid, 7, 0);
    let _ = ptrace_req(libc::PTRACE_DETACH, child.pid, 0, "PTRACE_DETACH");
    drop(child);
    let (dr0, dr7) = got?;
    if dr0 != addr || dr7 & 0xffff_ffff != WATCH_DR7 {
        return Err(format!("a child's debug registers read back DR0 {dr0:#x} DR7 {dr7:#x}, set {addr:#x} and {WATCH_DR7:#x}"));
    }
    Ok("set and read back a write watchpoint in a child's DR0 and DR7 (PTRACE_POKEUSER)".into())
}

/// Where this process's `[vdso]` is: (start, length).
fn own_vdso() -> Result<(u64, u64), String> {
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| format!("/proc/self/maps: {e}"))?;
    let line = maps.lines().find(|l| l.ends_with("[vdso]")).ok_or("this process has no [vdso]")?;
    let (s, e) = line.split_whitespace().next().and_then(|r| r.split_once('-')).ok_or("a [vdso] line without its range")?;
    let s = u64::from_str_radix(s, 16).map_err(|e| e.to_string())?;
    let e = u64::from_str_radix(e, 16).map_err(|e| e.to_string())?;
    Ok((s, e - s))
}

pub(super) fn probe_vdso_mremap() -> ProbeResult {
    let (start, len) = own_vdso()?;
    // SAFETY: the child only makes system calls (async-signal-safe) and exits; it moves
    // its own copy of the vDSO, never ours.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os_err("fork"));
    }
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            let room = len as usize + (1 << 20);
            let hole = libc::mmap(std::ptr::null_mut(), room, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
            if hole == libc::MAP_FAILED {
                libc::_exit(2);
            }
            let to = (hole as usize + (1 << 19)) as *mut libc::c_void;
            libc::munmap(hole, room);
            let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
            if libc::mremap(start as *mut libc::c_void, len as usize, len as usize, flags, to) != to {
                libc::_exit(3);
            }
            if libc::mremap(to, len as usize, len as usize, flags, start as *mut libc::c_void) != start as *mut libc::c_void {
                libc::_exit(4);
            }
            libc::_exit(0);
        }
    }
    let status = wait_status(pid, Duration::from_secs(2)).inspect_err(|_| {
        // SAFETY: kill on the child we forked and have not reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        reap(pid, Duration::from_secs(5));
    })?;
    match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
        (true, 0) => Ok(format!("a child moved its [vdso] ({len} bytes) away and back with mremap")),
        (true, 3 | 4) => Err("mremap of a child's [vdso] failed".into()),
        _ => Err(format!("the child moving its [vdso] ended with wait status {status:#x}")),
    }
}
