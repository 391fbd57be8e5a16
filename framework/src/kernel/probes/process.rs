//! Probes of making and reaching processes: pidfds, `clone3` with `set_tid`, setting
//! the audit login uid.

use super::*;

pub(super) fn fstat_id(fd: RawFd) -> Result<(u64, u64), String> {
    // SAFETY: an all-zero `stat` is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into `st`.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(os_err("fstat"));
    }
    Ok((st.st_dev as u64, st.st_ino as u64))
}

pub(super) fn probe_pidfd() -> ProbeResult {
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

pub(super) fn probe_clone3_set_tid() -> ProbeResult {
    // Ask for our own pid, which is certainly taken: EEXIST proves set_tid is supported and
    // permitted without creating a process.
    // SAFETY: getpid has no preconditions.
    let tid: libc::pid_t = unsafe { libc::getpid() };
    // SAFETY: should a process be created after all, the child only calls _exit.
    let r = unsafe { crate::kernel::clone::clone3_with_pid(tid) };
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

/// Whether a restore child of ferry's could be given a login uid: a thread of ours writes
/// its own (inherited from ferry) back. Unset, any task may set it once; set, only with
/// CAP_AUDIT_CONTROL and never once the kernel made it immutable.
pub(super) fn probe_loginuid() -> ProbeResult {
    if !Path::new("/proc/self/loginuid").exists() {
        return Err("no /proc/self/loginuid: the kernel has no audit (only processes without a login uid are restored)".into());
    }
    // A thread of its own: the login uid is per task, and only the task may write it.
    std::thread::spawn(|| {
        let path = "/proc/thread-self/loginuid";
        let now = std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
        let now = now.trim().to_string();
        std::fs::write(path, &now).map_err(|e| format!("writing {path} (login uid {now}) back: {e} (immutable, or no CAP_AUDIT_CONTROL)"))?;
        Ok(if now == u32::MAX.to_string() {
            "ferry's login uid is unset: a restored process can be given any".to_string()
        } else {
            format!("ferry's login uid {now} could be written: a restored process can be given another")
        })
    })
    .join()
    .map_err(|_| "the probing thread panicked".to_string())?
}
