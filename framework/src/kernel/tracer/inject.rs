//! System calls injected into a stopped thread: the scratch area ferry maps in the
//! target for their arguments and code, and the borrowed site the first and last calls
//! (mapping and unmapping it) run at.
//!
//! **Ferry may die at any instant** (killed, out of memory) and the kernel then lets the
//! thread go with whatever registers it has. An injected call is therefore set up so
//! that a thread let go in the middle of one carries on as if nothing happened: it runs
//! from the scratch area's `syscall`, and the code right after it gives the thread back
//! its registers, FPU state and signal mask in one `rt_sigreturn` ([`sigframe`]; a
//! signal pending meanwhile is taken with the thread's own context). Where that frame
//! does not fit (and at a borrowed site) the code puts back the thread's
//! signal mask and every general register, and returns with `iretq` to where the thread
//! was (a call it was interrupted in made again, as the kernel would) with its flags —
//! all from a block ferry writes before each call ([`Recovery`]). The flags come back
//! last, in the same instruction as the jump: a thread single-stepping itself (TF) takes
//! its next trap after its own next instruction, none in ferry's code. Ferry itself never lets the thread run that
//! code: it takes the thread back at the call's syscall-exit stop.

use super::*;

/// An injection site's code: the `syscall`, then the recovery, which reads its block
/// `data` bytes after the site (RIP-relative, so the same code serves the scratch area
/// and a borrowed site). In Intel syntax:
///
/// ```text
///  0: syscall                         the injected call
///  2: mov eax, 14                     rt_sigprocmask(SIG_SETMASK, &data.mask, NULL, 8)
///     mov edi, 2
///     lea rsi, [rip + data]
///     xor edx, edx
///     mov r10d, 8
///     syscall
///     mov rax, [rip + data + 8]       rax, rbx, rcx, rdx, rsi, rdi, rbp, r8 … r15
///     …
///     mov r15, [rip + data + 120]
///     lea rsp, [rip + data + 128]     the frame: rip, cs, rflags, rsp, ss
///     iretq                           (allowed at CPL 3 to CPL 3)
/// ```
pub(super) fn site_code(data: u64) -> Vec<u8> {
    // Each instruction: its bytes before a 32-bit displacement to `data + field`, the
    // field (none: no displacement), and its bytes after.
    const PROGRAM: &[(&[u8], Option<u64>, &[u8])] = &[
        (&[0x0f, 0x05], None, &[]),
        (&[0xb8, 0x0e, 0x00, 0x00, 0x00], None, &[]),
        (&[0xbf, 0x02, 0x00, 0x00, 0x00], None, &[]),
        (&[0x48, 0x8d, 0x35], Some(0), &[]),
        (&[0x31, 0xd2], None, &[]),
        (&[0x41, 0xba, 0x08, 0x00, 0x00, 0x00], None, &[]),
        (&[0x0f, 0x05], None, &[]),
        (&[0x48, 0x8b, 0x05], Some(8), &[]),
        (&[0x48, 0x8b, 0x1d], Some(16), &[]),
        (&[0x48, 0x8b, 0x0d], Some(24), &[]),
        (&[0x48, 0x8b, 0x15], Some(32), &[]),
        (&[0x48, 0x8b, 0x35], Some(40), &[]),
        (&[0x48, 0x8b, 0x3d], Some(48), &[]),
        (&[0x48, 0x8b, 0x2d], Some(56), &[]),
        (&[0x4c, 0x8b, 0x05], Some(64), &[]),
        (&[0x4c, 0x8b, 0x0d], Some(72), &[]),
        (&[0x4c, 0x8b, 0x15], Some(80), &[]),
        (&[0x4c, 0x8b, 0x1d], Some(88), &[]),
        (&[0x4c, 0x8b, 0x25], Some(96), &[]),
        (&[0x4c, 0x8b, 0x2d], Some(104), &[]),
        (&[0x4c, 0x8b, 0x35], Some(112), &[]),
        (&[0x4c, 0x8b, 0x3d], Some(120), &[]),
        (&[0x48, 0x8d, 0x25], Some(128), &[]),
        (&[0x48, 0xcf], None, &[]),
    ];
    let mut code = Vec::with_capacity(160);
    for &(head, field, tail) in PROGRAM {
        code.extend_from_slice(head);
        if let Some(field) = field {
            let next = code.len() as u64 + 4 + tail.len() as u64;
            code.extend_from_slice(&((data + field).wrapping_sub(next) as u32).to_le_bytes());
        }
        code.extend_from_slice(tail);
    }
    code
}

/// EFLAGS.TF: single-step trap after each instruction.
pub(super) const TRAP_FLAG: u64 = 0x100;

/// Where the recovery block sits in the scratch area: its last page.
pub(super) const RECOVERY_DATA: u64 = SCRATCH_SIZE - PAGE;
/// Where it sits after a borrowed site's code.
const BORROWED_DATA: u64 = 160;
/// Room a borrowed site needs: code and block.
const BORROWED_LEN: u64 = BORROWED_DATA + 8 * 21;

/// What a thread let go in the middle of an injected call needs to carry on: its
/// signal mask, its general registers in [`site_code`]'s order, then the `iretq` frame
/// (rip, cs, flags, rsp, ss), with its own interrupted call made again ([`resumed`]).
pub(super) struct Recovery([u64; 21]);

impl Recovery {
    pub(super) fn of(saved: &user_regs_struct, mask: u64) -> Recovery {
        let r = resumed(saved);
        Recovery([
            mask, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15,
            r.rip, r.cs, r.eflags, r.rsp, r.ss,
        ])
    }

    pub(super) fn bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}

/// Where the calls made before the scratch area exists, and the one that removes it,
/// run: the zero padding at the end of the process's vDSO, which it never executes,
/// with the recovery; or, without a vDSO, three bytes at the start of its first
/// executable mapping (its `_init`, as a rule) and a trap (a thread let go there dies).
#[derive(Clone, Copy)]
enum Borrowed {
    Padding(u64),
    Code(u64),
}

/// The call and a trap, for a borrowed code site.
const BORROWED_CODE: [u8; 3] = [0x0f, 0x05, 0xcc];

impl Tracer {
    /// The scratch area, once mapped.
    pub fn scratch(&self) -> Option<(u64, u64)> {
        self.scratch.map(|a| (a, SCRATCH_SIZE))
    }

    /// The argument part of the scratch area (between its code page and the last two:
    /// the internal context's agent's recovery block, and the injections').
    pub fn scratch_args(&self) -> Option<(u64, u64)> {
        self.scratch.map(|a| (a + PAGE, SCRATCH_SIZE - 3 * PAGE))
    }

    /// An address where the scratch area fits in the stopped target, known before the
    /// area is mapped: a janitor told it first can remove the area even if ferry dies in
    /// the very call that maps it. Just below the target's lowest mapping at or above
    /// 16 TiB — a PIE program's text (its heap grows up from above the text, never into
    /// the gap below it), else the bottom of the top-down mmap area. 0 when there is no
    /// such place (the kernel chooses).
    pub fn scratch_address(&self) -> u64 {
        const MMAP_AREA: u64 = 0x1000_0000_0000;
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid)).unwrap_or_default();
        let ranges: Vec<(u64, u64)> = maps
            .lines()
            .filter_map(|l| {
                let (s, e) = l.split(' ').next()?.split_once('-')?;
                Some((u64::from_str_radix(s, 16).ok()?, u64::from_str_radix(e, 16).ok()?))
            })
            .collect();
        let Some(lowest) = ranges.iter().map(|r| r.0).filter(|&s| s >= MMAP_AREA).min() else { return 0 };
        let addr = lowest.saturating_sub(SCRATCH_SIZE) & !(PAGE - 1);
        let free = addr >= MMAP_AREA && ranges.iter().all(|&(s, e)| e <= addr || s >= addr + SCRATCH_SIZE);
        if free {
            addr
        } else {
            0
        }
    }

    /// Maps our scratch area in the target, borrowing three bytes of an executable
    /// mapping for the one injection that creates it (put back at once).
    pub fn map_scratch(&mut self, hint: u64) -> Result<u64, TraceError> {
        if let Some(a) = self.scratch {
            return Ok(a);
        }
        let prot = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64
            | if hint != 0 { libc::MAP_FIXED_NOREPLACE as u64 } else { 0 };
        let pid = self.pid;
        let r = self.borrowed(|t, site, recovery| t.inject_at(site, pid, libc::SYS_mmap, [hint, SCRATCH_SIZE, prot, flags, u64::MAX, 0], recovery))?;
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
        self.scratch = Some(addr);
        self.prepare_scratch(addr)?;
        Ok(addr)
    }

    /// Writes the scratch area's code and what its recovery block holds for every
    /// call: the `rt_sigreturn` recovery ([`sigframe`]) where the FPU state fits its
    /// page, else the `iretq` one.
    fn prepare_scratch(&mut self, addr: u64) -> Result<(), TraceError> {
        if self.sigframe.is_none() {
            let tid = self.threads.keys().next().copied().unwrap_or(self.pid);
            self.sigframe = Some(self.get_regset(tid, NT_X86_XSTATE).ok().and_then(|x| sigframe::layout(&x)));
        }
        match self.sigframe.flatten() {
            Some(layout) => {
                self.poke(addr, &sigframe::code(RECOVERY_DATA))?;
                for (at, bytes) in sigframe::fixed(&layout) {
                    self.poke(addr + RECOVERY_DATA + at, &bytes)?;
                }
            }
            None => self.poke(addr, &site_code(RECOVERY_DATA))?,
        }
        self.scratch_ready = true;
        Ok(())
    }

    /// Removes the scratch area, again from a borrowed site.
    pub fn unmap_scratch(&mut self) -> Result<(), TraceError> {
        // The agent lives in it.
        self.remove_agent()?;
        let Some(addr) = self.scratch.take() else { return Ok(()) };
        let pid = self.pid;
        self.leaving = Some(addr);
        let r = self.borrowed(|t, site, recovery| t.inject_at(site, pid, libc::SYS_munmap, [addr, SCRATCH_SIZE, 0, 0, 0, 0], recovery));
        self.leaving = None;
        let r = r?;
        if r < 0 {
            return Err(TraceError::Thread { tid: self.pid, message: format!("munmap of the scratch area: errno {}", -r) });
        }
        Ok(())
    }

    /// Forgets the scratch area without unmapping it (the restore child's, replaced
    /// wholesale by the image's mappings).
    pub fn set_scratch(&mut self, addr: Option<u64>) {
        self.scratch = addr;
        self.scratch_ready = false;
    }

    /// Where to borrow a site: the vDSO's zero padding when it has room, else the
    /// start of the first executable mapping.
    fn borrow_site(&mut self) -> Result<Borrowed, TraceError> {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid))
            .map_err(|_| TraceError::gone(self.pid))?;
        let range = |l: &str| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?))
        };
        if let Some((start, end)) = maps.lines().find(|l| l.ends_with("[vdso]")).and_then(range) {
            let mut image = vec![0u8; (end - start) as usize];
            if self.peek(start, &mut image).is_ok() {
                let zeros = image.iter().rev().take_while(|&&b| b == 0).count() as u64;
                // Clear of the last instruction's bytes, 16-aligned.
                let site = (end - zeros + 64 + 15) & !15;
                if site + BORROWED_LEN <= end {
                    return Ok(Borrowed::Padding(site));
                }
            }
        }
        maps.lines()
            .filter(|l| {
                let mut f = l.split_whitespace();
                let perms = f.nth(1).unwrap_or("");
                let name = f.nth(3).unwrap_or("");
                perms.starts_with("r-x") || (perms.contains('x') && !name.starts_with('['))
            })
            .filter(|l| !l.contains("[vsyscall]") && !l.contains("[vdso]"))
            // Never the scratch area itself (writable and executable, and it may lie
            // below the program): the call that unmaps it would take the site along.
            .filter_map(|l| range(l))
            .find(|&(start, _)| Some(start) != self.scratch && Some(start) != self.leaving)
            .map(|(start, _)| Borrowed::Code(start))
            .ok_or(TraceError::Thread { tid: self.pid, message: "no executable mapping to inject from".into() })
    }

    /// Runs `f` with a borrowed site's code in place (given the site and, for padding,
    /// where its recovery block goes), putting the bytes back after.
    fn borrowed<T>(&mut self, f: impl FnOnce(&mut Self, u64, Option<u64>) -> Result<T, TraceError>) -> Result<T, TraceError> {
        let (site, code, recovery) = match self.borrow_site()? {
            Borrowed::Padding(site) => (site, site_code(BORROWED_DATA), Some(site + BORROWED_DATA)),
            Borrowed::Code(site) => (site, BORROWED_CODE.to_vec(), None),
        };
        let len = if recovery.is_some() { BORROWED_LEN as usize } else { code.len() };
        let mut old = vec![0u8; len];
        self.peek(site, &mut old)?;
        self.poke(site, &code)?;
        let r = f(self, site, recovery);
        let restored = self.poke(site, &old);
        let v = r?;
        restored?;
        Ok(v)
    }

    /// Runs system call `nr` in stopped thread `tid` from the scratch area. Answers the
    /// kernel's return value (negative errno on failure). New threads the call makes
    /// (clone) become traced threads of this tracer.
    pub fn inject(&mut self, tid: pid_t, nr: i64, args: [u64; 6]) -> Result<i64, TraceError> {
        if let Some(r) = self.through_agent(tid, nr, args) {
            return r;
        }
        self.inject_outside(tid, nr, args)
    }

    /// [`Tracer::inject`] with ptrace, never through the internal context's agent.
    pub(super) fn inject_outside(&mut self, tid: pid_t, nr: i64, args: [u64; 6]) -> Result<i64, TraceError> {
        match self.scratch {
            Some(site) => {
                if !self.scratch_ready {
                    self.prepare_scratch(site)?;
                }
                self.inject_at(site, tid, nr, args, Some(site + RECOVERY_DATA))
            }
            None => self.borrowed(|t, site, recovery| t.inject_at(site, tid, nr, args, recovery)),
        }
    }

    /// `recovery`: where the site's code reads its recovery block (none: a trap site).
    fn inject_at(&mut self, site: u64, tid: pid_t, nr: i64, args: [u64; 6], recovery: Option<u64>) -> Result<i64, TraceError> {
        // The thread itself (an agent running on it is paused first).
        self.thread(tid)?;
        // Every signal stays blocked while our call runs: one pending (or arriving) is
        // then neither delivered on the way back from it nor taken out of the queue by
        // us, and keeps its siginfo for the process (or the image). A call about the
        // mask itself is done with ptrace instead, which never returns to user space.
        if nr == libc::SYS_rt_sigprocmask {
            return self.sigprocmask(tid, args);
        }
        let mask = get_sigmask(tid)?;
        if let Some(at) = recovery {
            let saved = self.thread(tid)?.regs;
            match self.sigframe.flatten() {
                Some(_) if self.scratch.is_some_and(|s| s + RECOVERY_DATA == at) => {
                    self.poke(at + sigframe::FRAME_AT, &sigframe::frame(&resumed(&saved), mask, at))?
                }
                _ => self.poke(at, &Recovery::of(&saved, mask).bytes())?,
            }
        }
        self.inject_unmasked(site, tid, nr, args, mask, recovery.is_some())
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

    /// The call itself, with every signal blocked; the thread's own `mask` is back
    /// before its registers are (so that at no instant does it hold one and not the other).
    fn inject_unmasked(&mut self, site: u64, tid: pid_t, nr: i64, args: [u64; 6], mask: u64, recoverable: bool) -> Result<i64, TraceError> {
        let saved = self.thread(tid)?.regs;
        let mut regs = saved;
        regs.rip = site;
        // A thread single-stepping itself (TF set with pushf/popf) would trap in our
        // code: its TF comes back with its registers after the call.
        regs.eflags &= !TRAP_FLAG;
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX; // no syscall restart logic for our call
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        regs.r10 = args[3];
        regs.r8 = args[4];
        regs.r9 = args[5];
        setregs(tid, &regs)?;
        set_sigmask(tid, u64::MAX)?;
        self.thread(tid)?.in_syscall_stop = true;
        // Syscall stops, not a trap after the call: the code after it is the recovery.
        ptrace(libc::PTRACE_SYSCALL, tid, 0, 0, "PTRACE_SYSCALL")?;
        if recoverable {
            crate::fault::point("inject");
        }
        let mut entered = false;
        loop {
            let status = self.next_stop(tid)?;
            let sig = libc::WSTOPSIG(status);
            match (event_of(status), sig) {
                (0, s) if s == libc::SIGTRAP | 0x80 => {
                    if entered {
                        break;
                    }
                    entered = true;
                    ptrace(libc::PTRACE_SYSCALL, tid, 0, 0, "PTRACE_SYSCALL")?;
                }
                (libc::PTRACE_EVENT_CLONE, _) => {
                    let mut msg: libc::c_ulong = 0;
                    ptrace(libc::PTRACE_GETEVENTMSG, tid, 0, &mut msg as *mut _ as usize, "PTRACE_GETEVENTMSG")?;
                    self.adopt(msg as pid_t)?;
                    ptrace(libc::PTRACE_SYSCALL, tid, 0, 0, "PTRACE_SYSCALL")?;
                }
                (0, libc::SIGSEGV | libc::SIGBUS | libc::SIGILL) => {
                    let now = getregs(tid)?;
                    set_sigmask(tid, mask)?;
                    setregs(tid, &resumed(&saved))?;
                    return Err(TraceError::Thread {
                        tid,
                        message: format!("injected system call {nr} faulted with signal {sig} at {:#x}", now.rip),
                    });
                }
                (0, other) => {
                    // A signal for the process arrived meanwhile: keep it for detach.
                    self.thread(tid)?.pending_signal = other;
                    ptrace(libc::PTRACE_SYSCALL, tid, 0, 0, "PTRACE_SYSCALL")?;
                }
                _ => {
                    ptrace(libc::PTRACE_SYSCALL, tid, 0, 0, "PTRACE_SYSCALL")?;
                }
            }
        }
        let after = getregs(tid)?;
        // A thread the call ended has no mask left to put back.
        if self.threads.contains_key(&tid) {
            set_sigmask(tid, mask)?;
        }
        // From this syscall-exit stop no restart of its own call would happen.
        setregs(tid, &resumed(&saved))?;
        Ok(after.rax as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_site_code_is_what_the_assembler_makes_of_it() {
        // `as` (GNU binutils) of the listing in site_code's doc, its block 0xff000 on.
        const ASSEMBLED: [u8; 143] = [
            0x0f, 0x05, 0xb8, 0x0e, 0x00, 0x00, 0x00, 0xbf, 0x02, 0x00, 0x00, 0x00, 0x48, 0x8d, 0x35, 0xed, 0xef, 0x0f,
            0x00, 0x31, 0xd2, 0x41, 0xba, 0x08, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x8b, 0x05, 0xe4, 0xef, 0x0f, 0x00,
            0x48, 0x8b, 0x1d, 0xe5, 0xef, 0x0f, 0x00, 0x48, 0x8b, 0x0d, 0xe6, 0xef, 0x0f, 0x00, 0x48, 0x8b, 0x15, 0xe7,
            0xef, 0x0f, 0x00, 0x48, 0x8b, 0x35, 0xe8, 0xef, 0x0f, 0x00, 0x48, 0x8b, 0x3d, 0xe9, 0xef, 0x0f, 0x00, 0x48,
            0x8b, 0x2d, 0xea, 0xef, 0x0f, 0x00, 0x4c, 0x8b, 0x05, 0xeb, 0xef, 0x0f, 0x00, 0x4c, 0x8b, 0x0d, 0xec, 0xef,
            0x0f, 0x00, 0x4c, 0x8b, 0x15, 0xed, 0xef, 0x0f, 0x00, 0x4c, 0x8b, 0x1d, 0xee, 0xef, 0x0f, 0x00, 0x4c, 0x8b,
            0x25, 0xef, 0xef, 0x0f, 0x00, 0x4c, 0x8b, 0x2d, 0xf0, 0xef, 0x0f, 0x00, 0x4c, 0x8b, 0x35, 0xf1, 0xef, 0x0f,
            0x00, 0x4c, 0x8b, 0x3d, 0xf2, 0xef, 0x0f, 0x00, 0x48, 0x8d, 0x25, 0xf3, 0xef, 0x0f, 0x00, 0x48, 0xcf,
        ];
        assert_eq!(site_code(0xff000), ASSEMBLED);
        assert_eq!(RECOVERY_DATA, 0xff000);
        // A borrowed site's code ends before its block, which ends within its room.
        assert!((site_code(BORROWED_DATA).len() as u64) <= BORROWED_DATA);
        assert_eq!(BORROWED_DATA + Recovery::of(&unsafe { std::mem::zeroed() }, 0).bytes().len() as u64, BORROWED_LEN);
    }

    #[test]
    fn a_thread_interrupted_in_a_call_makes_it_again() {
        // SAFETY: user_regs_struct is plain integers.
        let mut r: user_regs_struct = unsafe { std::mem::zeroed() };
        r.rip = 0x1002;
        r.orig_rax = libc::SYS_read as u64;
        r.rax = (-512i64) as u64; // -ERESTARTSYS
        let back = resumed(&r);
        assert_eq!((back.rip, back.rax, back.orig_rax), (0x1000, libc::SYS_read as u64, u64::MAX));
        r.rax = (-516i64) as u64; // -ERESTART_RESTARTBLOCK
        assert_eq!(resumed(&r).rax, libc::SYS_restart_syscall as u64);
        r.rax = (-4i64) as u64; // -EINTR: the call is over
        assert_eq!(resumed(&r).rip, 0x1002);
        r.orig_rax = u64::MAX; // not in a call at all
        r.rax = (-512i64) as u64;
        assert_eq!(resumed(&r).rip, 0x1002);
    }
}
