//! `clone3(2)` with a chosen pid (`set_tid`): how a restore child gets the image's pid
//! back, and what `ferry check` probes.

/// struct clone_args of clone3(2).
#[repr(C)]
#[derive(Default)]
pub(crate) struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

/// A fork by clone3 whose child gets pid `tid` (0: any pid); the child exits with
/// SIGCHLD to its parent. Answers what the system call does: 0 in the child, the
/// child's pid in the parent, -1 with errno on failure.
///
/// # Safety
/// As for fork(2): in a multithreaded caller the child may only make
/// async-signal-safe calls before it execs or exits.
pub(crate) unsafe fn clone3_with_pid(tid: libc::pid_t) -> libc::c_long {
    let mut args = CloneArgs { exit_signal: libc::SIGCHLD as u64, ..Default::default() };
    if tid > 0 {
        args.set_tid = &tid as *const libc::pid_t as u64;
        args.set_tid_size = 1;
    }
    // SAFETY: `args` and the set_tid array it points to live through the call; the
    // caller answers for what the child does.
    unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn clone_args_match_uapi() {
        assert_eq!(std::mem::size_of::<super::CloneArgs>(), 88);
    }
}
