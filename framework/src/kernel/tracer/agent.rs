//! The internal execution context (`mechanism.context: "internal"`, `--context
//! internal`): a small agent that runs on the process's main thread, in its own
//! context, and makes the system calls plugins ask for there, many per round trip,
//! instead of one ptrace injection each (two syscall stops, five register transfers).
//!
//! The agent is 142 bytes of position-independent code ([`AGENT_CODE`]) written into
//! the scratch area's code page, with a 2 KiB buffer beside it; it uses no stack, no
//! libc and no memory of the process. It talks to ferry over a `SOCK_SEQPACKET` pair
//! made in the process by an injected `socketpair`: one end stays in the process for
//! the agent (listed by [`Tracer::agent_fd`] so that plugins skip it), ferry takes the
//! other with `pidfd_getfd` and closes it there. One message is a batch of calls (a
//! count, then number and six arguments each); the agent runs them in order and sends
//! the message back with each call's result in place of its number.
//!
//! **It is paused, not stopped, between uses**: any ptrace request on its thread (the
//! tracer's `thread()`) first interrupts it (`PTRACE_INTERRUPT` while it waits for the
//! next batch) and puts the thread's own registers back; the next call starts it again.
//! So ferry's view of the thread never includes the agent.
//!
//! **Ferry may die at any instant**: its end of the socket closes, the agent's
//! `recvfrom` answers end-of-file, and the agent closes its own end and jumps to its
//! own copy of the scratch area's recovery code, whose block (the scratch area's
//! second-to-last page) ferry wrote before starting it: the `rt_sigreturn` recovery of
//! [`super::sigframe`] where it serves (registers, FPU state and mask in one call: a
//! signal pending meanwhile sees the thread's own context), else the `iretq` one of
//! [`super::inject`]. The agent touches no FPU or vector register, so those are the
//! thread's throughout. Every signal is blocked while the agent runs (as for an
//! injected call); the agent replies with `MSG_NOSIGNAL`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use super::inject::{site_code, Recovery};
use super::*;

/// The agent, in Intel syntax (entry: rdi = its socket, rsi = its buffer, rdx = the
/// buffer's length, r15 = the recovery code):
///
/// ```text
///  0: mov r12, rdi; mov r13, rsi; mov r14, rdx
///  9: next:  recvfrom(r12, r13, r14, 0, NULL, NULL)       a batch
///     cmp rax, 8; jl done                                  end of file, error, short
///     mov rsp, rax                                         the length (no stack is used)
///     mov rbx, [r13]; lea rbp, [r13 + 8]                   count, first call
/// 33: call:  test rbx, rbx; jz reply
///     mov rax, [rbp]; mov rdi, [rbp+8] … mov r9, [rbp+48]; syscall
///     mov [rbp], rax; add rbp, 56; dec rbx; jmp call
/// 63: reply: sendto(r12, r13, rsp, MSG_NOSIGNAL, NULL, 0); jmp next
/// 81: done:  close(r12); jmp r15
/// ```
pub(super) const AGENT_CODE: [u8; 142] = [
    0x49, 0x89, 0xfc, 0x49, 0x89, 0xf5, 0x49, 0x89, 0xd6, 0xb8, 0x2d, 0x00, 0x00, 0x00, 0x4c, 0x89, 0xe7, 0x4c, 0x89,
    0xee, 0x4c, 0x89, 0xf2, 0x45, 0x31, 0xd2, 0x45, 0x31, 0xc0, 0x45, 0x31, 0xc9, 0x0f, 0x05, 0x48, 0x83, 0xf8, 0x08,
    0x7c, 0x59, 0x48, 0x89, 0xc4, 0x49, 0x8b, 0x5d, 0x00, 0x49, 0x8d, 0x6d, 0x08, 0x48, 0x85, 0xdb, 0x74, 0x2b, 0x48,
    0x8b, 0x45, 0x00, 0x48, 0x8b, 0x7d, 0x08, 0x48, 0x8b, 0x75, 0x10, 0x48, 0x8b, 0x55, 0x18, 0x4c, 0x8b, 0x55, 0x20,
    0x4c, 0x8b, 0x45, 0x28, 0x4c, 0x8b, 0x4d, 0x30, 0x0f, 0x05, 0x48, 0x89, 0x45, 0x00, 0x48, 0x83, 0xc5, 0x38, 0x48,
    0xff, 0xcb, 0xeb, 0xd0, 0xb8, 0x2c, 0x00, 0x00, 0x00, 0x4c, 0x89, 0xe7, 0x4c, 0x89, 0xee, 0x48, 0x89, 0xe2, 0x41,
    0xba, 0x00, 0x40, 0x00, 0x00, 0x45, 0x31, 0xc0, 0x45, 0x31, 0xc9, 0x0f, 0x05, 0xeb, 0x88, 0xb8, 0x03, 0x00, 0x00,
    0x00, 0x4c, 0x89, 0xe7, 0x0f, 0x05, 0x41, 0xff, 0xe7,
];

/// In the scratch area's code page: the agent's copy of the injection site (its
/// recovery reads the agent's own block), the agent, its buffer.
const SITE: u64 = 512;
const CODE: u64 = 1024;
const BUFFER: u64 = 2048;
const BUFFER_LEN: u64 = 2048;
/// The agent's recovery block: a page of its own, before the injections'.
const DATA: u64 = SCRATCH_SIZE - 2 * PAGE;
/// One call in a batch: number and six arguments.
const CALL_LEN: usize = 56;
/// Calls in one batch.
pub const MAX_BATCH: usize = (BUFFER_LEN as usize - 8) / CALL_LEN;

static INTERNAL: AtomicBool = AtomicBool::new(false);

/// Chooses the execution context for the processes this ferry seizes from now on (the
/// command's configuration; a restore child is always served from outside).
pub fn set_internal(on: bool) {
    INTERNAL.store(on, Ordering::Relaxed);
}

pub(super) fn internal() -> bool {
    INTERNAL.load(Ordering::Relaxed)
}

/// The agent of a traced process.
pub(super) struct Agent {
    pub(super) tid: pid_t,
    /// Ferry's end of the pair.
    sock: OwnedFd,
    /// The agent's end, as numbered in the process.
    fd: i32,
    /// Running (waiting for a batch or serving one), or paused with the thread's own
    /// registers back.
    running: bool,
    /// The thread's own signal mask while the agent runs on it.
    mask: u64,
    /// Calls made, batches sent, times started: `FERRY_TRACE` prints them at removal.
    calls: u64,
    batches: u64,
    starts: u64,
}

fn io_err(tid: pid_t, what: &str, e: io::Error) -> TraceError {
    TraceError::Thread { tid, message: format!("the internal context's agent: {what}: {e}") }
}

impl Tracer {
    /// The agent's file descriptor in the process, while there is one: not the
    /// process's own state.
    pub fn agent_fd(&self) -> Option<i32> {
        self.agent.as_ref().map(|a| a.fd)
    }

    /// Makes system call `nr` through the agent when this tracer uses one and `tid` is
    /// the thread it runs on; `None`: inject it from outside.
    pub(super) fn through_agent(&mut self, tid: pid_t, nr: i64, args: [u64; 6]) -> Option<Result<i64, TraceError>> {
        // Calls that change the thread, its mask, its memory map around us or its
        // tracing are made from outside, where ferry watches them.
        const OUTSIDE: &[i64] = &[
            libc::SYS_rt_sigprocmask,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_rt_sigreturn,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_mmap,
            libc::SYS_mprotect,
        ];
        if !self.internal || tid != self.pid || self.scratch.is_none() || OUTSIDE.contains(&nr) {
            return None;
        }
        Some(self.agent_batch(&[(nr, args)]).map(|r| r[0]))
    }

    /// Runs `calls` in order through the agent, starting it if need be; answers each
    /// call's result (negative errno on failure).
    pub(super) fn agent_batch(&mut self, calls: &[(i64, [u64; 6])]) -> Result<Vec<i64>, TraceError> {
        let tid = self.pid;
        if calls.len() > MAX_BATCH {
            return Err(TraceError::Thread { tid, message: format!("a batch of {} calls (at most {MAX_BATCH})", calls.len()) });
        }
        if !self.agent.as_ref().is_some_and(|a| a.running) {
            self.start_agent()?;
        }
        let agent = self.agent.as_mut().expect("started");
        agent.calls += calls.len() as u64;
        agent.batches += 1;
        let mut msg = Vec::with_capacity(8 + calls.len() * CALL_LEN);
        msg.extend_from_slice(&(calls.len() as u64).to_le_bytes());
        for (nr, args) in calls {
            msg.extend_from_slice(&(*nr as u64).to_le_bytes());
            for a in args {
                msg.extend_from_slice(&a.to_le_bytes());
            }
        }
        let fd = agent.sock.as_raw_fd();
        // SAFETY: sending our buffer on our socket.
        let sent = unsafe { libc::send(fd, msg.as_ptr() as *const c_void, msg.len(), libc::MSG_NOSIGNAL) };
        if sent != msg.len() as isize {
            return Err(io_err(tid, "sending a batch", errno()));
        }
        // Ferry killed here: the agent makes the calls, finds no one to answer, and
        // gives the thread back (the fault tests' `inject@N` counts these too).
        crate::fault::point("inject");
        let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut poll, 1, 10_000) } != 1 {
            return Err(io_err(tid, "no answer in 10 s", io::Error::from(io::ErrorKind::TimedOut)));
        }
        let mut reply = vec![0u8; msg.len()];
        // SAFETY: receiving into our buffer.
        let got = unsafe { libc::recv(fd, reply.as_mut_ptr() as *mut c_void, reply.len(), 0) };
        if got != msg.len() as isize {
            return Err(io_err(tid, &format!("an answer of {got} bytes for {}", msg.len()), errno()));
        }
        Ok((0..calls.len())
            .map(|i| {
                let at = 8 + i * CALL_LEN;
                i64::from_le_bytes(reply[at..at + 8].try_into().expect("8 bytes"))
            })
            .collect())
    }

    /// Starts the agent on the main thread: its socket pair (once), its code and its
    /// recovery block, then the thread let run in it with every signal blocked.
    fn start_agent(&mut self) -> Result<(), TraceError> {
        let tid = self.pid;
        let scratch = self.scratch.ok_or(TraceError::Thread { tid, message: "the agent needs the scratch area".into() })?;
        if self.agent.is_none() {
            let pair = scratch + PAGE;
            let flags = (libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC) as u64;
            let r = self.inject_outside(tid, libc::SYS_socketpair, [libc::AF_UNIX as u64, flags, 0, pair, 0, 0])?;
            if r < 0 {
                return Err(io_err(tid, "socketpair in the process", io::Error::from_raw_os_error(-r as i32)));
            }
            let mut fds = [0u8; 8];
            self.peek(pair, &mut fds)?;
            let theirs = i32::from_le_bytes(fds[..4].try_into().expect("4 bytes"));
            let ours = i32::from_le_bytes(fds[4..].try_into().expect("4 bytes"));
            let taken = take_fd(self.pid, ours);
            self.inject_outside(tid, libc::SYS_close, [ours as u64, 0, 0, 0, 0, 0])?;
            let sock = taken.map_err(|e| io_err(tid, "pidfd_getfd of its socket", e))?;
            match self.sigframe.flatten() {
                Some(layout) => {
                    self.poke(scratch + SITE, &super::sigframe::code(DATA - SITE))?;
                    for (at, bytes) in super::sigframe::fixed(&layout) {
                        self.poke(scratch + DATA + at, &bytes)?;
                    }
                }
                None => self.poke(scratch + SITE, &site_code(DATA - SITE))?,
            }
            self.poke(scratch + CODE, &AGENT_CODE)?;
            self.agent = Some(Agent { tid, sock, fd: theirs, running: false, mask: 0, calls: 0, batches: 0, starts: 0 });
        }
        let fd = self.agent.as_ref().expect("made").fd;
        let saved = self.threads.get(&tid).ok_or(TraceError::Thread { tid, message: "not traced".into() })?.regs;
        let mask = get_sigmask(tid)?;
        match self.sigframe.flatten() {
            Some(_) => self.poke(scratch + DATA + super::sigframe::FRAME_AT, &super::sigframe::frame(&resumed(&saved), mask, scratch + DATA))?,
            None => self.poke(scratch + DATA, &Recovery::of(&saved, mask).bytes())?,
        }
        let mut regs = resumed(&saved);
        regs.rip = scratch + CODE;
        regs.eflags &= !super::inject::TRAP_FLAG;
        regs.rdi = fd as u64;
        regs.rsi = scratch + BUFFER;
        regs.rdx = BUFFER_LEN;
        regs.r15 = scratch + SITE + 2; // after the site's syscall: the recovery
        setregs(tid, &regs)?;
        set_sigmask(tid, u64::MAX)?;
        ptrace(libc::PTRACE_CONT, tid, 0, 0, "PTRACE_CONT")?;
        let agent = self.agent.as_mut().expect("made");
        (agent.running, agent.mask) = (true, mask);
        agent.starts += 1;
        Ok(())
    }

    /// Pauses the agent if it runs: interrupts it where it waits and puts the thread's
    /// own registers and mask back (ptrace requests on the thread then see only it).
    pub(super) fn pause_agent(&mut self) -> Result<(), TraceError> {
        let Some(agent) = self.agent.as_mut().filter(|a| a.running) else { return Ok(()) };
        let tid = agent.tid;
        agent.running = false;
        ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0, "PTRACE_INTERRUPT")?;
        loop {
            let status = self.next_stop(tid)?;
            if event_of(status) == libc::PTRACE_EVENT_STOP {
                break;
            }
            // A signal stop (SIGSTOP, a signal the agent could not block): kept for
            // the detach, as an injection keeps one, and on to the interrupt's stop.
            let sig = libc::WSTOPSIG(status);
            if let Some(t) = self.threads.get_mut(&tid) {
                t.pending_signal = sig;
            }
            ptrace(libc::PTRACE_CONT, tid, 0, 0, "PTRACE_CONT")?;
        }
        let mask = self.agent.as_ref().map_or(0, |a| a.mask);
        let saved = self.threads.get(&tid).map(|t| t.regs);
        let saved = saved.ok_or(TraceError::Thread { tid, message: "not traced".into() })?;
        set_sigmask(tid, mask)?;
        setregs(tid, &resumed(&saved))?;
        if let Some(t) = self.threads.get_mut(&tid) {
            // As after an injected call: its own call is restarted at the detach.
            t.in_syscall_stop = true;
        }
        Ok(())
    }

    /// Removes the agent: paused, its end of the socket closed in the process.
    pub(super) fn remove_agent(&mut self) -> Result<(), TraceError> {
        self.pause_agent()?;
        let Some(agent) = self.agent.take() else { return Ok(()) };
        crate::trace::mark(format_args!(
            "agent on thread {}: {} calls in {} batches, started {} times",
            agent.tid, agent.calls, agent.batches, agent.starts
        ));
        let r = self.inject_outside(agent.tid, libc::SYS_close, [agent.fd as u64, 0, 0, 0, 0, 0])?;
        if r < 0 {
            return Err(io_err(agent.tid, "closing its socket", io::Error::from_raw_os_error(-r as i32)));
        }
        Ok(())
    }
}

/// A duplicate here of file descriptor `fd` of process `pid`.
fn take_fd(pid: pid_t, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain system calls; each fd returned is ours to own.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        if pidfd < 0 {
            return Err(errno());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd);
        let got = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) as i32;
        if got < 0 {
            return Err(errno());
        }
        Ok(OwnedFd::from_raw_fd(got))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_and_its_places_fit_the_scratch_area() {
        // The listing's jumps: `jl done` (+0x59 from 0x28), `jz reply` (+0x2b from
        // 0x38), `jmp call` (−0x30 from 0x63), `jmp next` (−0x78 from 0x81).
        assert_eq!((AGENT_CODE[0x27], AGENT_CODE[0x37], AGENT_CODE[0x62], AGENT_CODE[0x80]), (0x59, 0x2b, 0xd0, 0x88));
        assert!(SITE + site_code(DATA - SITE).len() as u64 <= CODE);
        assert!(CODE + AGENT_CODE.len() as u64 <= BUFFER);
        assert!(BUFFER + BUFFER_LEN <= PAGE);
        // The agent's recovery page lies between the arguments and the injections'.
        assert_eq!(DATA + PAGE, super::inject::RECOVERY_DATA);
        assert!(super::sigframe::code(DATA - SITE).len() as u64 <= CODE - SITE);
        assert_eq!(MAX_BATCH, 36);
    }
}
