//! System calls injected into a stopped thread: the scratch area ferry maps in the
//! target for their arguments, and the borrowed `syscall; int3` site they run at.

use super::*;

impl Tracer {
    /// The scratch area, once mapped.
    pub fn scratch(&self) -> Option<(u64, u64)> {
        self.scratch.map(|a| (a, SCRATCH_SIZE))
    }

    /// The argument part of the scratch area (after its code page).
    pub fn scratch_args(&self) -> Option<(u64, u64)> {
        self.scratch.map(|a| (a + PAGE, SCRATCH_SIZE - PAGE))
    }

    /// Maps our scratch area in the target, borrowing three bytes of an executable
    /// mapping for the one injection that creates it (put back at once).
    pub fn map_scratch(&mut self, hint: u64) -> Result<u64, TraceError> {
        if let Some(a) = self.scratch {
            return Ok(a);
        }
        let site = self.borrow_site()?;
        let prot = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64
            | if hint != 0 { libc::MAP_FIXED_NOREPLACE as u64 } else { 0 };
        let r = self.with_site(site, |t| t.inject_at(site, t.pid, libc::SYS_mmap, [hint, SCRATCH_SIZE, prot, flags, u64::MAX, 0]))?;
        if r < 0 {
            // The scratch area is writable and executable: a process that forbade such
            // memory (PR_SET_MDWE) gets EACCES, which ferry cannot work around yet.
            if -r == libc::EACCES as i64 {
                return Err(TraceError::Unsuitable { pid: self.pid, why: "forbidding writable-executable memory (PR_SET_MDWE), which ferry's injected code needs".into() });
            }
            let e = std::io::Error::from_raw_os_error(-r as i32);
            return Err(TraceError::Thread { tid: self.pid, message: format!("mapping ferry's scratch area: {e}") });
        }
        let addr = r as u64;
        self.poke(addr, &SYSCALL_INT3)?;
        self.scratch = Some(addr);
        Ok(addr)
    }

    /// Removes the scratch area, again from a borrowed site.
    pub fn unmap_scratch(&mut self) -> Result<(), TraceError> {
        let Some(addr) = self.scratch.take() else { return Ok(()) };
        let site = self.borrow_site()?;
        let r = self.with_site(site, |t| t.inject_at(site, t.pid, libc::SYS_munmap, [addr, SCRATCH_SIZE, 0, 0, 0, 0]))?;
        if r < 0 {
            return Err(TraceError::Thread { tid: self.pid, message: format!("munmap of the scratch area: errno {}", -r) });
        }
        Ok(())
    }

    /// Forgets the scratch area without unmapping it (the restore child's, replaced
    /// wholesale by the image's mappings).
    pub fn set_scratch(&mut self, addr: Option<u64>) {
        self.scratch = addr;
    }

    /// An executable address of the target to borrow for an injection.
    fn borrow_site(&mut self) -> Result<u64, TraceError> {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid))
            .map_err(|_| TraceError::Gone { pid: self.pid })?;
        maps.lines()
            .filter(|l| {
                let mut f = l.split_whitespace();
                let perms = f.nth(1).unwrap_or("");
                let name = f.nth(3).unwrap_or("");
                perms.starts_with("r-x") || (perms.contains('x') && !name.starts_with('['))
            })
            .filter(|l| !l.contains("[vsyscall]") && !l.contains("[vdso]"))
            .find_map(|l| u64::from_str_radix(l.split('-').next()?, 16).ok())
            .ok_or(TraceError::Thread { tid: self.pid, message: "no executable mapping to inject from".into() })
    }

    /// Runs `f` with `syscall; int3` written at `site`, putting the bytes back after.
    fn with_site<T>(&mut self, site: u64, f: impl FnOnce(&mut Self) -> Result<T, TraceError>) -> Result<T, TraceError> {
        let mut old = [0u8; 3];
        self.peek(site, &mut old)?;
        self.poke(site, &SYSCALL_INT3)?;
        let r = f(self);
        let restored = self.poke(site, &old);
        let v = r?;
        restored?;
        Ok(v)
    }

    /// Runs system call `nr` in stopped thread `tid` from the scratch area. Answers the
    /// kernel's return value (negative errno on failure). New threads the call makes
    /// (clone) become traced threads of this tracer.
    pub fn inject(&mut self, tid: pid_t, nr: i64, args: [u64; 6]) -> Result<i64, TraceError> {
        let site = match self.scratch {
            Some(a) => a,
            None => {
                let site = self.borrow_site()?;
                return self.with_site(site, |t| t.inject_at(site, tid, nr, args));
            }
        };
        self.inject_at(site, tid, nr, args)
    }

    fn inject_at(&mut self, site: u64, tid: pid_t, nr: i64, args: [u64; 6]) -> Result<i64, TraceError> {
        // Every signal stays blocked while our call runs: one pending (or arriving) is
        // then neither delivered on the way back from it nor taken out of the queue by
        // us, and keeps its siginfo for the process (or the image). A call about the
        // mask itself is done with ptrace instead, which never returns to user space.
        if nr == libc::SYS_rt_sigprocmask {
            return self.sigprocmask(tid, args);
        }
        let mask = get_sigmask(tid)?;
        set_sigmask(tid, u64::MAX)?;
        let r = self.inject_unmasked(site, tid, nr, args);
        // A thread the call ended has no mask left to put back.
        let restored = if self.threads.contains_key(&tid) { set_sigmask(tid, mask) } else { Ok(()) };
        let v = r?;
        restored?;
        Ok(v)
    }

    /// `rt_sigprocmask(how, set, oldset, size)` for thread `tid`, done with
    /// `PTRACE_GETSIGMASK`/`SETSIGMASK` and the process's memory: as the kernel would,
    /// but without letting the thread run.
    fn sigprocmask(&mut self, tid: pid_t, args: [u64; 6]) -> Result<i64, TraceError> {
        let [how, set, old, size, ..] = args;
        if size != 8 {
            return Ok(-(libc::EINVAL as i64));
        }
        let now = get_sigmask(tid)?;
        let mut new = None;
        if set != 0 {
            let mut b = [0u8; 8];
            if self.peek(set, &mut b).is_err() {
                return Ok(-(libc::EFAULT as i64));
            }
            let given = u64::from_le_bytes(b);
            new = Some(match how as i32 {
                libc::SIG_BLOCK => now | given,
                libc::SIG_UNBLOCK => now & !given,
                libc::SIG_SETMASK => given,
                _ => return Ok(-(libc::EINVAL as i64)),
            });
        }
        if old != 0 && self.poke(old, &now.to_le_bytes()).is_err() {
            return Ok(-(libc::EFAULT as i64));
        }
        if let Some(m) = new {
            // SIGKILL and SIGSTOP cannot be blocked (the kernel drops them too).
            let unblockable = 1u64 << (libc::SIGKILL - 1) | 1u64 << (libc::SIGSTOP - 1);
            set_sigmask(tid, m & !unblockable)?;
        }
        Ok(0)
    }

    fn inject_unmasked(&mut self, site: u64, tid: pid_t, nr: i64, args: [u64; 6]) -> Result<i64, TraceError> {
        let saved = self.thread(tid)?.regs;
        let mut regs = saved;
        regs.rip = site;
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX; // no syscall restart logic for our call
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        regs.r10 = args[3];
        regs.r8 = args[4];
        regs.r9 = args[5];
        setregs(tid, &regs)?;
        ptrace(libc::PTRACE_CONT, tid, 0, 0, "PTRACE_CONT")?;
        loop {
            let status = wait(tid)?;
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                self.threads.remove(&tid);
                return Err(TraceError::Gone { pid: self.pid });
            }
            if !libc::WIFSTOPPED(status) {
                continue;
            }
            let sig = libc::WSTOPSIG(status);
            match (event_of(status), sig) {
                (0, libc::SIGTRAP) => break,
                (libc::PTRACE_EVENT_CLONE, _) => {
                    let mut msg: libc::c_ulong = 0;
                    ptrace(libc::PTRACE_GETEVENTMSG, tid, 0, &mut msg as *mut _ as usize, "PTRACE_GETEVENTMSG")?;
                    self.adopt(msg as pid_t)?;
                    ptrace(libc::PTRACE_CONT, tid, 0, 0, "PTRACE_CONT")?;
                }
                (0, libc::SIGSEGV | libc::SIGBUS | libc::SIGILL) => {
                    // Either the call removed the code it ran from (the scratch area
                    // unmapping itself), or something is badly wrong; rip tells which.
                    let now = getregs(tid)?;
                    if now.rip == site + 2 || now.rip == site + 3 {
                        break;
                    }
                    setregs(tid, &saved)?;
                    return Err(TraceError::Thread {
                        tid,
                        message: format!("injected system call {nr} faulted with signal {sig} at {:#x}", now.rip),
                    });
                }
                (0, other) => {
                    // A signal for the process arrived meanwhile: keep it for detach.
                    self.thread(tid)?.pending_signal = other;
                    ptrace(libc::PTRACE_CONT, tid, 0, 0, "PTRACE_CONT")?;
                }
                _ => {
                    ptrace(libc::PTRACE_CONT, tid, 0, 0, "PTRACE_CONT")?;
                }
            }
        }
        let after = getregs(tid)?;
        setregs(tid, &saved)?;
        Ok(after.rax as i64)
    }
}
