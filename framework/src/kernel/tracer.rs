//! The external execution context's tracer: seizes every thread of a process with
//! `PTRACE_SEIZE`, keeps them in ptrace stops, and serves register sets, memory and
//! injected system calls. All ptrace requests of one event come from the one OS
//! thread that seized the target (the kernel ties a tracee to its tracer thread).
//! Dropping a tracer always puts the target back: scratch area removed, bytes and
//! registers restored, every thread detached.

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    os::unix::fs::FileExt,
    time::{Duration, Instant},
};

use libc::{c_long, c_void, pid_t, user_regs_struct};

use super::target::{check_target, group_stopped, task_ids};

/// `syscall; int3` — the code every injection runs.
/// Size of the scratch area mapped in the target: one code page, the rest for
/// system-call arguments.
pub const SCRATCH_SIZE: u64 = 1 << 20;
const PAGE: u64 = 4096;

pub use ferry_plugin_api::util::NT_PRSTATUS;
pub const NT_X86_XSTATE: u32 = 0x202;

pub use super::error::TraceError;
pub use agent::{set_internal, MAX_BATCH};

fn errno() -> io::Error {
    io::Error::last_os_error()
}

/// One ptrace request; answers the kernel's return value.
fn ptrace(req: libc::c_uint, tid: pid_t, addr: usize, data: usize, what: &'static str) -> Result<c_long, TraceError> {
    // SAFETY: ptrace requests with integer or caller-owned pointer arguments; every
    // pointer passed as addr/data by this module points to live memory of the right size.
    let r = unsafe { libc::ptrace(req, tid, addr as *mut c_void, data as *mut c_void) };
    if r == -1 {
        let e = errno();
        if e.raw_os_error() != Some(0) {
            return Err(TraceError::Ptrace { what, tid, source: e });
        }
    }
    Ok(r)
}

/// Waits for a state change of tracee `tid`.
fn wait(tid: pid_t) -> Result<i32, TraceError> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid with a valid out-pointer.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
        if r == tid {
            return Ok(status);
        }
        let e = errno();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(TraceError::Ptrace { what: "waitpid", tid, source: e });
        }
    }
}

/// The process thread `tid` belongs to (`Tgid` of /proc/TID/status).
fn thread_group(tid: pid_t) -> Option<pid_t> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("Tgid:")).and_then(|v| v.trim().parse().ok())
}

/// The blocked-signal mask of stopped tracee `tid` (`PTRACE_GETSIGMASK`).
fn get_sigmask(tid: pid_t) -> Result<u64, TraceError> {
    let mut mask: u64 = 0;
    ptrace(libc::PTRACE_GETSIGMASK, tid, 8, &mut mask as *mut u64 as usize, "PTRACE_GETSIGMASK")?;
    Ok(mask)
}

/// Sets it (`PTRACE_SETSIGMASK`): no return to user space, so nothing is delivered.
fn set_sigmask(tid: pid_t, mask: u64) -> Result<(), TraceError> {
    let mut m = mask;
    ptrace(libc::PTRACE_SETSIGMASK, tid, 8, &mut m as *mut u64 as usize, "PTRACE_SETSIGMASK")?;
    Ok(())
}

fn event_of(status: i32) -> i32 {
    (status >> 16) & 0xff
}

struct Thread {
    /// The registers the thread had when seized, put back at detach.
    regs: user_regs_struct,
    /// A signal that arrived while we seized it, delivered again at detach.
    pending_signal: i32,
    /// It sits in the syscall-exit stop of a call ferry injected (not in the stop it was
    /// seized in): on its way out no restart of its own interrupted call happens, so
    /// it leaves with [`resumed`] registers.
    in_syscall_stop: bool,
}

impl Thread {
    fn new(regs: user_regs_struct) -> Thread {
        Thread { regs, pending_signal: 0, in_syscall_stop: false }
    }
}

/// The registers a thread seized with `saved` resumes with from a system-call stop: its
/// own, with the restart the kernel makes of a call it was interrupted in on the way out
/// of a signal stop with no handler to run (`-ERESTART*`: the call made again; the
/// restart block's: `restart_syscall`).
pub(crate) fn resumed(saved: &user_regs_struct) -> user_regs_struct {
    const ERESTARTSYS: i64 = 512;
    const ERESTARTNOINTR: i64 = 513;
    const ERESTARTNOHAND: i64 = 514;
    const ERESTART_RESTARTBLOCK: i64 = 516;
    let mut r = *saved;
    if (saved.orig_rax as i64) >= 0 {
        match -(saved.rax as i64) {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                r.rax = saved.orig_rax;
                r.rip -= 2;
            }
            ERESTART_RESTARTBLOCK => {
                r.rax = libc::SYS_restart_syscall as u64;
                r.rip -= 2;
            }
            _ => {}
        }
    }
    r.orig_rax = u64::MAX;
    r
}

/// A traced process. Every method must be called from the thread that created it.
pub struct Tracer {
    pid: pid_t,
    threads: BTreeMap<pid_t, Thread>,
    mem: File,
    /// Where injections run: our scratch area once mapped, else a borrowed site.
    scratch: Option<u64>,
    /// The scratch area being unmapped: never a site to borrow.
    leaving: Option<u64>,
    /// Set once the threads are let go (or the process killed).
    detached: bool,
    /// Set while the threads run traced (`run_traced`).
    running: bool,
    /// Children the process forked while running traced: held stopped (their copy of
    /// its memory may lack pages still on their way), let go by `detach_running`.
    held: Vec<pid_t>,
    /// Of those, the ones `tend` has not reported yet.
    forked: Vec<pid_t>,
    /// The process was stopped by job control when it was seized.
    group_stopped: bool,
    /// Its seccomp filters are suspended while ferry holds it (see `seccomp`).
    seccomp_suspended: bool,
    /// Injected calls go through an agent in the process (`agent`): the internal
    /// execution context, for a process seized (not one ferry builds).
    internal: bool,
    agent: Option<agent::Agent>,
    /// How a thread let go in the middle of a call at the scratch area recovers: through
    /// `rt_sigreturn` with this FPU layout, or (none) `iretq`; decided once.
    sigframe: Option<Option<sigframe::Layout>>,
    /// This tracer wrote the scratch area's code (another may have mapped it).
    scratch_ready: bool,
}

impl Tracer {
    /// Seizes every thread of `pid` and stops it with `PTRACE_INTERRUPT`. Threads
    /// created meanwhile are caught by `PTRACE_O_TRACECLONE` or by listing again.
    pub fn seize(pid: pid_t) -> Result<Tracer, TraceError> {
        Tracer::seize_with(pid, || Ok(()))
    }

    /// Seizes a process ferry is building (a restore child) so that the kernel kills it
    /// if ferry dies before releasing it: a half-built or uncommitted process must
    /// never run on its own (`PTRACE_O_EXITKILL`).
    pub fn seize_owned(pid: pid_t) -> Result<Tracer, TraceError> {
        Tracer::seize_opts(pid, libc::PTRACE_O_EXITKILL as usize, || Ok(()))
    }

    /// Like [`Tracer::seize`], running `between` after every thread is interrupted and
    /// before waiting for the stops (a cgroup freezer thaws there: with the v1
    /// freezer the stops only arrive after the thaw).
    pub fn seize_with(pid: pid_t, between: impl FnOnce() -> Result<(), TraceError>) -> Result<Tracer, TraceError> {
        Tracer::seize_opts(pid, 0, between)
    }

    fn seize_opts(pid: pid_t, extra: usize, between: impl FnOnce() -> Result<(), TraceError>) -> Result<Tracer, TraceError> {
        check_target(pid)?;
        let mem = File::options()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => TraceError::NoProcess(pid),
                _ => TraceError::Unsuitable { pid, why: format!("out of ferry's reach (opening its memory: {e})") },
            })?;
        // Read before the seize, which turns every thread's state into a tracing stop.
        let group_stopped = group_stopped(pid);
        let mut tracer = Tracer {
            pid,
            threads: BTreeMap::new(),
            mem,
            scratch: None,
            leaving: None,
            detached: false,
            running: false,
            held: Vec::new(),
            forked: Vec::new(),
            group_stopped,
            seccomp_suspended: false,
            internal: extra == 0 && agent::internal(),
            agent: None,
            sigframe: None,
            scratch_ready: false,
        };
        let mut seized: Vec<pid_t> = Vec::new();
        // TRACESYSGOOD: an injected call is followed by its system-call stops.
        let mut opts = (libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_TRACESYSGOOD) as usize | extra;
        // List until a pass finds no thread we have not seized.
        loop {
            let fresh: Vec<pid_t> =
                task_ids(pid)?.into_iter().filter(|t| !seized.contains(t)).collect();
            if fresh.is_empty() {
                break;
            }
            for tid in fresh {
                let seize = if seized.is_empty() {
                    tracer.seize_first(tid, opts).map(|with| opts = with)
                } else {
                    ptrace(libc::PTRACE_SEIZE, tid, 0, opts, "PTRACE_SEIZE").map(|_| ())
                };
                match seize {
                    Ok(_) => {}
                    // A thread that exited between listing and seizing.
                    Err(_) if !std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists() => continue,
                    Err(e) => {
                        tracer.abandon(&seized);
                        return Err(e);
                    }
                }
                seized.push(tid);
                if let Err(e) = ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0, "PTRACE_INTERRUPT") {
                    tracer.abandon(&seized);
                    return Err(e);
                }
            }
        }
        if let Err(e) = between().and_then(|_| tracer.collect_stops(&seized)) {
            tracer.abandon(&seized);
            return Err(e);
        }
        if let Err(e) = tracer.abort_rseq() {
            tracer.abandon(&seized);
            return Err(e);
        }
        Ok(tracer)
    }

    /// A thread stopped inside an rseq critical section is sent to its abort handler
    /// now, as the kernel would do when it next runs: the first call ferry makes in it
    /// returns to user space outside the section, and the kernel would then just forget
    /// the section (clear `rseq_cs`), letting the thread finish it later as if nothing
    /// had come between — on another CPU after a restore, say.
    fn abort_rseq(&mut self) -> Result<(), TraceError> {
        for tid in self.tids() {
            let Ok(cfg) = self.rseq_config(tid) else { continue };
            if cfg.addr == 0 {
                continue;
            }
            // struct rseq: u32 cpu_id_start, u32 cpu_id, u64 rseq_cs, …
            let mut cs_ptr = [0u8; 8];
            if self.peek(cfg.addr + 8, &mut cs_ptr).is_err() {
                continue;
            }
            let cs = u64::from_le_bytes(cs_ptr);
            if cs == 0 {
                continue;
            }
            // struct rseq_cs: u32 version, u32 flags, u64 start_ip, u64 post_commit_offset, u64 abort_ip.
            let mut d = [0u8; 32];
            if self.peek(cs, &mut d).is_err() {
                continue;
            }
            let word = |o: usize| u64::from_le_bytes(d[o..o + 8].try_into().expect("8 bytes"));
            let (start, len, abort) = (word(8), word(16), word(24));
            let t = self.thread(tid)?;
            if t.regs.rip.wrapping_sub(start) >= len {
                continue;
            }
            // The kernel checks the signature before the handler; so do we.
            let mut sig = [0u8; 4];
            if self.peek(abort.wrapping_sub(4), &mut sig).is_err() || u32::from_le_bytes(sig) != cfg.signature {
                continue;
            }
            let mut regs = self.thread(tid)?.regs;
            regs.rip = abort;
            self.set_saved_regs(tid, regs)?;
            self.poke(cfg.addr + 8, &0u64.to_le_bytes())?;
        }
        Ok(())
    }

    /// Waits for every seized thread to report its interrupt stop.
    fn collect_stops(&mut self, seized: &[pid_t]) -> Result<(), TraceError> {
        for &tid in seized {
            loop {
                let status = wait(tid)?;
                if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                    if tid == self.pid {
                        return Err(TraceError::ended(self.pid, status));
                    }
                    break; // a thread that exited meanwhile
                }
                if !libc::WIFSTOPPED(status) {
                    continue;
                }
                let sig = libc::WSTOPSIG(status);
                match event_of(status) {
                    libc::PTRACE_EVENT_STOP => {
                        let regs = getregs(tid)?;
                        self.threads.insert(tid, Thread::new(regs));
                        break;
                    }
                    libc::PTRACE_EVENT_CLONE => {
                        // A thread born while seizing: it is auto-attached and stops on its own.
                        let mut msg: libc::c_ulong = 0;
                        ptrace(libc::PTRACE_GETEVENTMSG, tid, 0, &mut msg as *mut _ as usize, "PTRACE_GETEVENTMSG")?;
                        self.adopt(msg as pid_t)?;
                        ptrace(libc::PTRACE_CONT, tid, 0, 0, "PTRACE_CONT")?;
                    }
                    _ => {
                        // A signal arrived before our interrupt: deliver it now, as it
                        // would have been without us, rather than hold it outside the
                        // process where a checkpoint could not see it.
                        ptrace(libc::PTRACE_CONT, tid, 0, sig as usize, "PTRACE_CONT")?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Takes a thread that was auto-attached by `PTRACE_O_TRACECLONE` once it stops.
    fn adopt(&mut self, tid: pid_t) -> Result<(), TraceError> {
        loop {
            let status = wait(tid)?;
            if libc::WIFSTOPPED(status) {
                let regs = getregs(tid)?;
                self.threads.insert(tid, Thread::new(regs));
                return Ok(());
            }
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                return Err(TraceError::Thread { tid, message: "exited as it was created".into() });
            }
        }
    }

    /// Detaches threads seized so far after a failure half-way through seizing.
    fn abandon(&mut self, seized: &[pid_t]) {
        for &tid in seized {
            let _ = ptrace(libc::PTRACE_DETACH, tid, 0, 0, "PTRACE_DETACH");
        }
        self.threads.clear();
        self.detached = true;
    }

    /// Whether the process was stopped by job control when it was seized.
    pub fn group_stopped(&self) -> bool {
        self.group_stopped
    }

    pub fn pid(&self) -> pid_t {
        self.pid
    }

    /// Every traced thread, the main thread first.
    pub fn tids(&self) -> Vec<pid_t> {
        let mut tids: Vec<pid_t> = self.threads.keys().copied().filter(|&t| t != self.pid).collect();
        if self.threads.contains_key(&self.pid) {
            tids.insert(0, self.pid);
        }
        tids
    }

    fn thread(&mut self, tid: pid_t) -> Result<&mut Thread, TraceError> {
        // Whatever is asked of the thread, it is asked of the thread, not of the agent.
        if self.agent.as_ref().is_some_and(|a| a.tid == tid) {
            self.pause_agent()?;
        }
        self.threads
            .get_mut(&tid)
            .ok_or(TraceError::Thread { tid, message: "not a traced thread of this event".into() })
    }

    /// The next stop of traced thread `tid` (its wait status); the thread's end, which
    /// forgets it, is an error saying how the process ended.
    fn next_stop(&mut self, tid: pid_t) -> Result<i32, TraceError> {
        loop {
            let status = wait(tid)?;
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                self.threads.remove(&tid);
                return Err(TraceError::ended(self.pid, status));
            }
            if libc::WIFSTOPPED(status) {
                return Ok(status);
            }
        }
    }

    /// The registers the thread had when it was seized (or was last given).
    pub fn saved_regs(&mut self, tid: pid_t) -> Result<user_regs_struct, TraceError> {
        Ok(self.thread(tid)?.regs)
    }

    /// Sets the registers the thread will run with once released.
    pub fn set_saved_regs(&mut self, tid: pid_t, regs: user_regs_struct) -> Result<(), TraceError> {
        self.thread(tid)?.regs = regs;
        setregs(tid, &regs)
    }

    pub fn get_regset(&mut self, tid: pid_t, nt: u32) -> Result<Vec<u8>, TraceError> {
        self.thread(tid)?;
        if nt == NT_FERRY_DEBUGREGS {
            return self.debugregs(tid);
        }
        if nt == NT_PRSTATUS {
            // The seized registers, not whatever an injection left behind.
            let regs = self.saved_regs(tid)?;
            return Ok(regs_bytes(&regs).to_vec());
        }
        let mut buf = vec![0u8; 16 * 1024];
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut c_void, iov_len: buf.len() };
        ptrace(libc::PTRACE_GETREGSET, tid, nt as usize, &mut iov as *mut _ as usize, "PTRACE_GETREGSET")?;
        buf.truncate(iov.iov_len);
        Ok(buf)
    }

    pub fn set_regset(&mut self, tid: pid_t, nt: u32, data: &[u8]) -> Result<(), TraceError> {
        self.thread(tid)?;
        if nt == NT_FERRY_DEBUGREGS {
            return self.set_debugregs(tid, data);
        }
        if nt == NT_PRSTATUS {
            let regs = regs_from_bytes(data)
                .ok_or(TraceError::Thread { tid, message: format!("register set of {} bytes", data.len()) })?;
            return self.set_saved_regs(tid, regs);
        }
        let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut c_void, iov_len: data.len() };
        ptrace(libc::PTRACE_SETREGSET, tid, nt as usize, &mut iov as *mut _ as usize, "PTRACE_SETREGSET")?;
        Ok(())
    }

    /// The rseq registration of a thread.
    pub fn rseq_config(&mut self, tid: pid_t) -> Result<ferry_plugin_api::RseqConfig, TraceError> {
        self.thread(tid)?;
        // struct ptrace_rseq_configuration: u64 addr, u32 len, u32 sig, u32 flags, u32 pad.
        let mut raw = [0u8; 24];
        const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
        ptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid, raw.len(), raw.as_mut_ptr() as usize, "PTRACE_GET_RSEQ_CONFIGURATION")?;
        let u32_at = |o: usize| u32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]);
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&raw[..8]);
        Ok(ferry_plugin_api::RseqConfig {
            addr: u64::from_le_bytes(addr),
            len: u32_at(8),
            signature: u32_at(12),
            flags: u32_at(16),
        })
    }

    /// Pending signals of a thread (or the process-wide queue) as 128-byte siginfos,
    /// read without dequeuing them.
    pub fn peek_siginfo(&mut self, tid: pid_t, shared: bool) -> Result<Vec<u8>, TraceError> {
        self.thread(tid)?;
        const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
        const SHARED: u32 = 1;
        const BATCH: usize = 32;
        let mut out = Vec::new();
        loop {
            // struct ptrace_peeksiginfo_args: u64 off, u32 flags, s32 nr.
            let mut args = [0u8; 16];
            args[..8].copy_from_slice(&((out.len() / 128) as u64).to_le_bytes());
            args[8..12].copy_from_slice(&(if shared { SHARED } else { 0 }).to_le_bytes());
            args[12..16].copy_from_slice(&(BATCH as i32).to_le_bytes());
            let mut buf = vec![0u8; 128 * BATCH];
            let n = ptrace(PTRACE_PEEKSIGINFO, tid, args.as_ptr() as usize, buf.as_mut_ptr() as usize, "PTRACE_PEEKSIGINFO")?;
            let n = n.max(0) as usize;
            out.extend_from_slice(&buf[..128 * n.min(BATCH)]);
            if n < BATCH {
                return Ok(out);
            }
        }
    }

    /// Reads target memory; large ranges go through `process_vm_readv` in blocks.
    pub fn read_ranges(&mut self, ranges: &[(u64, u64)], buf: &mut [u8]) -> Result<usize, TraceError> {
        vm_ranges(self.pid, ranges, buf.as_mut_ptr(), buf.len(), false)
    }

    pub fn write_ranges(&mut self, ranges: &[(u64, u64)], data: &[u8]) -> Result<usize, TraceError> {
        vm_ranges(self.pid, ranges, data.as_ptr() as *mut u8, data.len(), true)
    }

    /// Writes through `/proc/PID/mem`, which also writes read-only pages (code).
    pub fn poke(&mut self, addr: u64, data: &[u8]) -> Result<(), TraceError> {
        self.mem
            .write_all_at(data, addr)
            .map_err(|e| TraceError::Memory { pid: self.pid, addr, message: e.to_string() }.or_gone(self.pid))
    }

    pub fn peek(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), TraceError> {
        self.mem
            .read_exact_at(buf, addr)
            .map_err(|e| TraceError::Memory { pid: self.pid, addr, message: e.to_string() }.or_gone(self.pid))
    }

    /// Releases every thread with the registers it should run with. `kill` instead
    /// kills the process (a failed restore).
    pub fn detach(mut self) -> Result<(), TraceError> {
        self.release()
    }

    fn release(&mut self) -> Result<(), TraceError> {
        if self.detached {
            return Ok(());
        }
        let removed = self.remove_agent();
        self.detached = true;
        let mut first_err = None;
        let tids = self.tids();
        for tid in tids {
            let Some(t) = self.threads.get(&tid) else { continue };
            // From a system-call stop the kernel makes no restart of the thread's own
            // call (and sends a signal given to the detach as from the kernel).
            let regs = if t.in_syscall_stop { resumed(&t.regs) } else { t.regs };
            let sig = t.pending_signal;
            if let Err(e) = setregs(tid, &regs).and_then(|_| {
                ptrace(libc::PTRACE_DETACH, tid, 0, sig as usize, "PTRACE_DETACH").map(|_| ())
            }) {
                first_err.get_or_insert(e);
            }
        }
        self.threads.clear();
        first_err.map_or(removed, Err)
    }

    /// Sends SIGKILL to the process and to the children it holds; answers the threads
    /// to reap. SIGKILL takes a thread out of any ptrace stop straight into its exit:
    /// from here on the process never runs again.
    fn send_kill(&mut self) -> Vec<pid_t> {
        self.running = false;
        for child in std::mem::take(&mut self.held) {
            // SAFETY: a child of the process, held stopped by us.
            unsafe { libc::kill(child, libc::SIGKILL) };
        }
        // SAFETY: kill on the pid we trace; SIGKILL needs no cooperation.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        // The other threads first: the kernel reports the leader's exit only once every
        // other thread is reaped, and those wait for us, their tracer, to reap them.
        let tids = self.tids().into_iter().rev().collect();
        self.threads.clear();
        self.detached = true;
        tids
    }

    /// Kills the traced process and waits until it is gone (a half-built restore child
    /// must be gone before ferry answers).
    pub fn kill(mut self) {
        for tid in self.send_kill() {
            let _ = wait_exit(tid, Duration::from_secs(5));
        }
    }

    /// Kills the traced process without waiting while it frees its memory (tens of ms
    /// per GiB, all of it after the point where it can no longer run). A thread of
    /// ferry reaps its threads as they exit, which is when its parent hears of it; if
    /// ferry exits first, the kernel lets them go to the parent itself.
    pub fn kill_and_go(mut self) {
        let tids = self.send_kill();
        let reaper = std::thread::Builder::new().name("ferry-reaper".into()).spawn(move || {
            for tid in tids {
                let _ = wait_exit(tid, Duration::from_secs(60));
            }
        });
        if let Err(e) = reaper {
            crate::trace::mark(&format!("no reaper thread ({e}); the kernel reaps at ferry's exit"));
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if self.running {
            // Only a failed post-copy drops a tracer whose process runs traced.
            // SAFETY: kill on the pid we trace.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            return;
        }
        if !self.detached {
            let _ = self.unmap_scratch();
            let _ = self.release();
        }
    }
}

fn wait_exit(tid: pid_t, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid out-pointer.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
        if r == tid && (libc::WIFEXITED(status) || libc::WIFSIGNALED(status)) {
            return true;
        }
        if r < 0 || Instant::now() > deadline {
            return r < 0;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn getregs(tid: pid_t) -> Result<user_regs_struct, TraceError> {
    // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
    let mut regs: user_regs_struct = unsafe { std::mem::zeroed() };
    ptrace(libc::PTRACE_GETREGS, tid, 0, &mut regs as *mut _ as usize, "PTRACE_GETREGS")?;
    Ok(regs)
}

pub fn setregs(tid: pid_t, regs: &user_regs_struct) -> Result<(), TraceError> {
    ptrace(libc::PTRACE_SETREGS, tid, 0, regs as *const _ as usize, "PTRACE_SETREGS")?;
    Ok(())
}

/// The registers as the bytes of `NT_PRSTATUS`.
pub fn regs_bytes(regs: &user_regs_struct) -> &[u8] {
    // SAFETY: user_regs_struct is repr(C) plain integers without padding.
    unsafe { std::slice::from_raw_parts(regs as *const _ as *const u8, std::mem::size_of::<user_regs_struct>()) }
}

pub fn regs_from_bytes(data: &[u8]) -> Option<user_regs_struct> {
    if data.len() != std::mem::size_of::<user_regs_struct>() {
        return None;
    }
    // SAFETY: the length matches and every bit pattern is a valid user_regs_struct.
    Some(unsafe { std::ptr::read_unaligned(data.as_ptr() as *const user_regs_struct) })
}

/// `process_vm_readv`/`writev` over many ranges, in calls of at most IOV_MAX iovecs.
pub(crate) fn vm_ranges(pid: pid_t, ranges: &[(u64, u64)], local: *mut u8, local_len: usize, write: bool) -> Result<usize, TraceError> {
    const IOV_MAX: usize = 1024;
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    if total > local_len as u64 {
        return Err(TraceError::Memory { pid, addr: 0, message: format!("buffer of {local_len} bytes for {total}") });
    }
    let mut done = 0usize;
    for chunk in ranges.chunks(IOV_MAX) {
        let remote: Vec<libc::iovec> =
            chunk.iter().map(|&(a, l)| libc::iovec { iov_base: a as *mut c_void, iov_len: l as usize }).collect();
        let want: usize = chunk.iter().map(|r| r.1 as usize).sum();
        let mut got = 0usize;
        while got < want {
            // Skip the iovecs (and part of one) already moved.
            let (mut idx, mut off) = (0usize, got);
            while idx < remote.len() && off >= remote[idx].iov_len {
                off -= remote[idx].iov_len;
                idx += 1;
            }
            let mut rest: Vec<libc::iovec> = remote[idx..].to_vec();
            rest[0].iov_base = (rest[0].iov_base as u64 + off as u64) as *mut c_void;
            rest[0].iov_len -= off;
            let lvec = libc::iovec { iov_base: local.wrapping_add(done + got) as *mut c_void, iov_len: want - got };
            // SAFETY: the local iovec lies within the caller's buffer (checked against
            // local_len above); remote addresses are only dereferenced by the kernel.
            let n = unsafe {
                if write {
                    libc::process_vm_writev(pid, &lvec, 1, rest.as_ptr(), rest.len() as u64, 0)
                } else {
                    libc::process_vm_readv(pid, &lvec, 1, rest.as_ptr(), rest.len() as u64, 0)
                }
            };
            if n <= 0 {
                let addr = rest[0].iov_base as u64;
                let message = if n == 0 { "nothing transferred".into() } else { errno().to_string() };
                return Err(TraceError::Memory { pid, addr, message }.or_gone(pid));
            }
            got += n as usize;
        }
        done += want;
    }
    Ok(done)
}

mod agent;
mod debugregs;
mod fate;
mod running;
pub use running::tend_all;
mod inject;
mod seccomp;
mod sigframe;
pub use debugregs::NT_FERRY_DEBUGREGS;
pub use seccomp::PTRACE_O_SUSPEND_SECCOMP;

#[cfg(test)]
mod tests;
