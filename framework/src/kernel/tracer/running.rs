//! A process let run while still traced (post-copy and hybrid's lazy phase): its stops
//! answered, new threads taken in, forked children held until every page is in, and
//! all of it let go at the end.

use std::time::{Duration, Instant};

use libc::pid_t;

use super::{event_of, ptrace, resumed, setregs, thread_group, wait, Thread, Tracer};
use crate::kernel::error::TraceError;

impl Tracer {
    /// Lets every thread run with the registers it should run with, still traced: a
    /// process ferry seized with `seize_owned` then dies with ferry (post-copy: rather
    /// than run on without the memory ferry was to bring it). Call [`Tracer::tend`]
    /// often meanwhile, and [`Tracer::detach_running`] to let it go.
    pub fn run_traced(&mut self) -> Result<(), TraceError> {
        // The process runs its own code from here: the agent (and its fd) goes first.
        self.remove_agent()?;
        let opts = (libc::PTRACE_O_EXITKILL | libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_TRACEEXEC | libc::PTRACE_O_TRACEFORK) as usize;
        // Running from the first PTRACE_CONT on: should a later thread fail, the drop
        // kills the process rather than let it go half-resumed without its memory.
        self.running = true;
        for tid in self.tids() {
            let t = self.thread(tid)?;
            let regs = if std::mem::take(&mut t.in_syscall_stop) { resumed(&t.regs) } else { t.regs };
            let sig = std::mem::take(&mut t.pending_signal);
            setregs(tid, &regs)?;
            ptrace(libc::PTRACE_SETOPTIONS, tid, 0, opts, "PTRACE_SETOPTIONS")?;
            ptrace(libc::PTRACE_CONT, tid, 0, sig as usize, "PTRACE_CONT")?;
        }
        Ok(())
    }

    /// Answers the stops of a process running traced, without waiting: signals go on
    /// to it, new threads are taken in, exited ones forgotten, forked children held.
    /// Answers whether the process still lives. Only for a thread that traces no other
    /// running process (see [`tend_all`]).
    pub fn tend(&mut self) -> Result<bool, TraceError> {
        while let Some((tid, status)) = next_stop() {
            self.answer(tid, status)?;
        }
        Ok(self.has_threads())
    }

    /// Whether any thread of the process is left.
    pub fn has_threads(&self) -> bool {
        !self.threads.is_empty()
    }

    /// Answers one stop (or exit) of thread `tid`, one of this process's or a child
    /// it forked.
    fn answer(&mut self, tid: pid_t, status: i32) -> Result<(), TraceError> {
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            self.threads.remove(&tid);
            self.held.retain(|&c| c != tid);
            return Ok(());
        }
        if !libc::WIFSTOPPED(status) {
            return Ok(());
        }
        if !self.threads.contains_key(&tid) {
            // Its first stop may come before the event of the call that made it: a
            // new thread goes on, a forked child is held.
            if thread_group(tid) == Some(self.pid) {
                if let Some(regs) = self.threads.get(&self.pid).map(|t| t.regs) {
                    self.threads.insert(tid, Thread::new(regs));
                }
                let _ = ptrace(libc::PTRACE_CONT, tid, 0, 0, "PTRACE_CONT");
            } else if !self.held.contains(&tid) {
                self.held.push(tid);
            }
            return Ok(());
        }
        let sig = match event_of(status) {
            libc::PTRACE_EVENT_FORK => {
                let mut msg: libc::c_ulong = 0;
                ptrace(libc::PTRACE_GETEVENTMSG, tid, 0, &mut msg as *mut _ as usize, "PTRACE_GETEVENTMSG")?;
                let child = msg as pid_t;
                if !self.held.contains(&child) {
                    self.held.push(child);
                }
                self.forked.push(child);
                0
            }
            0 => libc::WSTOPSIG(status),
            libc::PTRACE_EVENT_CLONE => {
                let mut msg: libc::c_ulong = 0;
                ptrace(libc::PTRACE_GETEVENTMSG, tid, 0, &mut msg as *mut _ as usize, "PTRACE_GETEVENTMSG")?;
                // Its registers are never put back (only the list of threads matters
                // now): the parent's stand in.
                if let Some(regs) = self.threads.get(&tid).map(|t| t.regs) {
                    self.threads.insert(msg as pid_t, Thread::new(regs));
                }
                0
            }
            // A new thread's first stop, a group stop, an exec: carry on.
            _ => 0,
        };
        // A thread may have exited between its stop and this call.
        let _ = ptrace(libc::PTRACE_CONT, tid, 0, sig as usize, "PTRACE_CONT");
        Ok(())
    }

    /// The children forked since the last call (see [`Tracer::tend`]).
    pub fn take_forked(&mut self) -> Vec<pid_t> {
        std::mem::take(&mut self.forked)
    }

    /// Stops the threads of a process running traced and lets them go for good, with
    /// the children it forked meanwhile.
    pub fn detach_running(mut self) -> Result<(), TraceError> {
        self.running = false;
        self.detached = true;
        for child in std::mem::take(&mut self.held) {
            // A child whose first stop was not waited for yet is in no ptrace stop: the
            // detach fails, and it would die with its tracer (EXITKILL) — a copy's child
            // killed after a successful migration. Take that stop first.
            let until = Instant::now() + Duration::from_secs(2);
            while ptrace(libc::PTRACE_DETACH, child, 0, 0, "PTRACE_DETACH").is_err() && Instant::now() < until {
                let mut st = 0;
                // SAFETY: waitpid with a valid out-pointer, not waiting.
                let r = unsafe { libc::waitpid(child, &mut st, libc::__WALL | libc::WNOHANG) };
                if r == child && (libc::WIFEXITED(st) || libc::WIFSIGNALED(st)) || r < 0 {
                    break;
                }
                if r == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        let mut todo: Vec<pid_t> = self.tids();
        for &tid in &todo {
            let _ = ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0, "PTRACE_INTERRUPT");
        }
        while let Some(tid) = todo.pop() {
            loop {
                let Ok(status) = wait(tid) else { break };
                if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) || !libc::WIFSTOPPED(status) {
                    break;
                }
                match event_of(status) {
                    0 => {
                        // A signal on its way: it goes with the thread.
                        let _ = ptrace(libc::PTRACE_DETACH, tid, 0, libc::WSTOPSIG(status) as usize, "PTRACE_DETACH");
                        break;
                    }
                    libc::PTRACE_EVENT_CLONE => {
                        let mut msg: libc::c_ulong = 0;
                        ptrace(libc::PTRACE_GETEVENTMSG, tid, 0, &mut msg as *mut _ as usize, "PTRACE_GETEVENTMSG")?;
                        todo.push(msg as pid_t);
                        let _ = ptrace(libc::PTRACE_CONT, tid, 0, 0, "PTRACE_CONT");
                    }
                    libc::PTRACE_EVENT_FORK | libc::PTRACE_EVENT_VFORK => {
                        // A child forked as the process is let go (every page is in by
                        // now): traced from birth, it would die with its tracer
                        // (EXITKILL). Let it go from its first stop.
                        let mut msg: libc::c_ulong = 0;
                        ptrace(libc::PTRACE_GETEVENTMSG, tid, 0, &mut msg as *mut _ as usize, "PTRACE_GETEVENTMSG")?;
                        let child = msg as pid_t;
                        if let Ok(st) = wait(child) {
                            if libc::WIFSTOPPED(st) {
                                let _ = ptrace(libc::PTRACE_DETACH, child, 0, 0, "PTRACE_DETACH");
                            }
                        }
                        let _ = ptrace(libc::PTRACE_DETACH, tid, 0, 0, "PTRACE_DETACH");
                        break;
                    }
                    _ => {
                        let _ = ptrace(libc::PTRACE_DETACH, tid, 0, 0, "PTRACE_DETACH");
                        break;
                    }
                }
            }
        }
        self.threads.clear();
        Ok(())
    }
}

/// The next stop or exit of a tracee of this thread, without waiting.
fn next_stop() -> Option<(pid_t, i32)> {
    let mut status = 0;
    // SAFETY: waitpid with a valid out-pointer; __WNOTHREAD: only this thread's tracees.
    let tid = unsafe { libc::waitpid(-1, &mut status, libc::__WALL | libc::__WNOTHREAD | libc::WNOHANG) };
    (tid > 0).then_some((tid, status))
}

/// The parent of `pid` (field 4 of its stat).
fn parent_of(pid: pid_t) -> Option<pid_t> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

/// [`Tracer::tend`] for several processes running traced by this thread (a tree's,
/// in post-copy): each stop goes to the process whose thread or forked child stopped.
pub fn tend_all(tracers: &mut [&mut Tracer]) -> Result<(), TraceError> {
    while let Some((tid, status)) = next_stop() {
        let group = thread_group(tid);
        let owner = tracers
            .iter()
            .position(|t| Some(t.pid) == group || t.threads.contains_key(&tid) || t.held.contains(&tid))
            .or_else(|| {
                let parent = thread_group(parent_of(tid)?)?;
                tracers.iter().position(|t| t.pid == parent)
            });
        match owner {
            Some(k) => tracers[k].answer(tid, status)?,
            // Nobody's (gone as it was looked at): let it go on.
            None if libc::WIFSTOPPED(status) => {
                let _ = ptrace(libc::PTRACE_CONT, tid, 0, 0, "PTRACE_CONT");
            }
            None => {}
        }
    }
    Ok(())
}
