//! Rebuilding a process, for `ferry restore` and for a migration's destination: a child
//! of ferry, stopped under ptrace, becomes the process of an image. ferry makes the child (keeping the image's pid where it is free), empties
//! its address space down to the scratch area and the kernel's special mappings, lets
//! each subsystem plugin rebuild its part by injected system calls, and releases all
//! threads at once. On any failure the half-built child is killed; nothing else is
//! touched.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use ferry_plugin_api::{util::parse_maps, MediumBox};

use crate::{
    engine::context::LazyPlan,
    engine::context::{CountingPull, ExternalContext, MediumPull, SharedTable, StreamSource},
    engine::event::{self, EventError, Stats, Tick},
    engine::manager::Manager,
    engine::watchdog::Watchdog,
    image::{Inventory, PluginEntry, ProcessEntry, RecordReader, INVENTORY_STREAM},
    kernel::clone::{clone3_with_pid, CloneArgs},
    kernel::tracer::{Tracer, SCRATCH_SIZE},
};

/// What the restore child reports, less errno, when its `setsid` fails.
const SETSID_FAILED: i32 = -1000;

/// The restore child: starts a session of its own, tells ferry its pid on `report`
/// (`SETSID_FAILED - errno` where it could not: a session leader it must be, for a
/// controlling terminal), and blocks until ferry seizes it. Runs in a forked copy of
/// ferry, so only raw system calls. ferry waits for the report before seizing it:
/// seized earlier, it would never run its `setsid`.
fn child_main(report: i32, alive: i32) -> ! {
    // SAFETY: async-signal-safe system calls only; the fds closed are the child's copies.
    unsafe {
        let mut v = libc::syscall(libc::SYS_getpid) as i32;
        if libc::setsid() < 0 {
            v = SETSID_FAILED - *libc::__errno_location();
        }
        libc::write(report, &v as *const i32 as *const libc::c_void, 4);
        // Everything but `alive`, the read end of a pipe whose write end only ferry
        // holds until it seizes this child: should ferry die first (killed between
        // making the child and seizing it), the read answers end-of-file and the child
        // goes, instead of waiting forever.
        if alive > 0 {
            libc::syscall(libc::SYS_close_range, 0u32, (alive - 1) as u32, 0u32);
        }
        libc::syscall(libc::SYS_close_range, (alive + 1) as u32, u32::MAX, 0u32);
        let mut b = 0u8;
        loop {
            let n = libc::read(alive, &mut b as *mut u8 as *mut libc::c_void, 1);
            if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
                libc::_exit(0);
            }
        }
    }
}

/// Makes the restore child with pid `want` where free, as a grandchild of ferry so that
/// it is reparented to init (or a subreaper) and never waits on ferry. Answers its pid
/// once it leads a session of its own.
fn spawn_child(want: i32) -> Result<(i32, OwnedFd), EventError> {
    let fail = |what: &str| EventError::Failed(format!("creating the restore child: {what}: {}", std::io::Error::last_os_error()));
    let mut alive = [0i32; 2];
    // SAFETY: pipe2 fills the two-int array; both ends are ours (the write end is
    // answered, the read end closed here once the child has its copy).
    if unsafe { libc::pipe2(alive.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(fail("pipe2"));
    }
    // SAFETY: as above.
    let (alive_rd, alive_wr) = unsafe { (OwnedFd::from_raw_fd(alive[0]), OwnedFd::from_raw_fd(alive[1])) };
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the two-int array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(fail("pipe2"));
    }
    // SAFETY: the forked intermediate only makes raw system calls and exits.
    let inter = unsafe { libc::fork() };
    if inter < 0 {
        // SAFETY: closing our own pipe.
        unsafe { libc::close(fds[0]); libc::close(fds[1]) };
        return Err(fail("fork"));
    }
    if inter == 0 {
        // SAFETY: the child of a fork makes only raw system calls; write/_exit are
        // async-signal-safe. The new child reports itself (child_main); the
        // intermediate only a failure to make it.
        unsafe {
            let mut r = clone3_with_pid(want);
            if r < 0 {
                r = clone3_with_pid(0);
            }
            if r == 0 {
                child_main(fds[1], alive_rd.as_raw_fd());
            }
            if r < 0 {
                let v = r as i32;
                libc::write(fds[1], &v as *const i32 as *const libc::c_void, 4);
            }
            libc::_exit(0);
        }
    }
    let mut v: i32 = -1;
    // SAFETY: reaping our own child, reading 4 bytes into an i32, closing our fds.
    let n = unsafe {
        libc::close(fds[1]);
        let mut status = 0;
        libc::waitpid(inter, &mut status, 0);
        let n = libc::read(fds[0], &mut v as *mut i32 as *mut libc::c_void, 4);
        libc::close(fds[0]);
        n
    };
    if n == 4 && v <= SETSID_FAILED {
        return Err(EventError::Failed(format!("the restore child: setsid: {}", std::io::Error::from_raw_os_error(SETSID_FAILED - v))));
    }
    if n != 4 || v <= 0 {
        return Err(EventError::Failed("creating the restore child: clone3 failed".into()));
    }
    drop(alive_rd);
    Ok((v, alive_wr))
}

/// The kernel's special mappings of the child (vDSO, vvar, vsyscall), and all else
/// but its scratch area, from its maps.
fn child_maps(tracer: &Tracer) -> Result<(Vec<(u64, u64)>, Vec<(u64, u64)>), EventError> {
    let pid = tracer.pid();
    let scratch = tracer.scratch().map(|s| s.0);
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| EventError::Failed(format!("reading the restore child's maps: {e}")))?;
    let (mut specials, mut rest) = (Vec::new(), Vec::new());
    for vma in parse_maps(&text).map_err(EventError::Failed)? {
        if Some(vma.start) == scratch {
            continue;
        }
        if vma.special().is_some_and(|s| s.starts_with("vdso") || s.starts_with("vvar") || s == "vsyscall") {
            specials.push((vma.start, vma.end));
        } else {
            rest.push((vma.start, vma.end));
        }
    }
    Ok((specials, rest))
}

/// Empties the child's address space down to the scratch area and the kernel's
/// special mappings: one `munmap` per stretch between those (holes included), not
/// one per mapping inherited from ferry.
fn blank(tracer: &mut Tracer) -> Result<(), EventError> {
    let pid = tracer.pid();
    let (specials, rest) = child_maps(tracer)?;
    let mut keep: Vec<(u64, u64)> = specials;
    keep.extend(tracer.scratch().map(|s| (s.0, s.0 + SCRATCH_SIZE)));
    keep.sort();
    let mut stretches: Vec<(u64, u64)> = Vec::new();
    for (s, e) in rest {
        // Whether a kept area lies between the last stretch and this mapping.
        match stretches.last_mut() {
            Some(last) if !keep.iter().any(|k| k.0 >= last.1 && k.1 <= s) => last.1 = e,
            _ => stretches.push((s, e)),
        }
    }
    for (s, e) in stretches {
        let r = tracer.inject(pid, libc::SYS_munmap, [s, e - s, 0, 0, 0, 0])?;
        if r < 0 {
            return Err(EventError::Failed(format!("unmapping {s:#x}-{e:#x} in the restore child: errno {}", -r)));
        }
    }
    Ok(())
}

/// Moves the blank child's scratch area to where it sat in the checkpointed process
/// (a hole of its address space, so no restored mapping can meet it).
fn place_scratch(tracer: &mut Tracer, scratch_at: u64) -> Result<(), EventError> {
    let pid = tracer.pid();
    let (scratch, _) = tracer.scratch().ok_or_else(|| EventError::Failed("no scratch area".into()))?;
    if scratch_at == 0 || scratch_at == scratch {
        return Ok(());
    }
    let end = scratch_at + SCRATCH_SIZE;
    let (specials, _) = child_maps(tracer)?;
    if specials.iter().any(|s| s.0 < end && scratch_at < s.1) {
        // The kernel's areas sit where the scratch area must go: move them aside,
        // together; the memory plugin puts them where the image has them.
        let movable: Vec<(u64, u64)> = specials.iter().copied().filter(|s| s.0 < USER_SPACE_END).collect();
        move_aside(tracer, &movable, scratch_at)?;
    }
    let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
    let r = tracer.inject(pid, libc::SYS_mremap, [scratch, SCRATCH_SIZE, SCRATCH_SIZE, flags, scratch_at, 0])?;
    if r as u64 != scratch_at {
        return Err(EventError::Failed(format!("moving the scratch area to {scratch_at:#x}: errno {}", -r)));
    }
    tracer.set_scratch(Some(scratch_at));
    Ok(())
}

/// A restore child made ready ahead of its image: seized, stripped of what it
/// inherited from ferry, holding only a scratch area. A migration's destination makes
/// it while the source still runs, so the freeze does not wait for it. Dropped
/// unused, it is killed.
pub struct Blank {
    tracer: Option<Tracer>,
    pub(crate) want: i32,
}

impl Blank {
    /// A blank child with pid `want` where that is free.
    pub fn make(want: i32) -> Result<Blank, EventError> {
        let (pid, alive) = spawn_child(want)?;
        let seized = Tracer::seize_owned(pid);
        // Seized, it dies with ferry (PTRACE_O_EXITKILL): the pipe's work is done.
        drop(alive);
        let mut tracer = match seized {
            Ok(t) => t,
            Err(e) => {
                // SAFETY: the child is ours and stopped in pause(); nothing else uses it.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return Err(e.into());
            }
        };
        match Self::strip(&mut tracer) {
            Ok(()) => Ok(Blank { tracer: Some(tracer), want }),
            Err(e) => {
                tracer.kill();
                Err(e)
            }
        }
    }

    fn strip(tracer: &mut Tracer) -> Result<(), EventError> {
        let pid = tracer.pid();
        // glibc registered rseq in the thread ferry forked from; left registered, the
        // kernel would write to an area about to be unmapped and kill every later call.
        // The child closes what it inherited from ferry itself, but may be seized before
        // it gets there: close it all again, or the restored process would keep ferry's
        // image files and the pipes of whoever runs ferry.
        let r = tracer.inject(pid, libc::SYS_close_range, [0, u32::MAX as u64, 0, 0, 0, 0])?;
        if r < 0 {
            return Err(EventError::Failed(format!("closing the restore child's inherited fds: errno {}", -r)));
        }
        let rseq = tracer.rseq_config(pid)?;
        if rseq.addr != 0 {
            let r = tracer.inject(pid, libc::SYS_rseq, [rseq.addr, rseq.len as u64, 1, rseq.signature as u64, 0, 0])?;
            if r < 0 {
                return Err(EventError::Failed(format!("unregistering the restore child's rseq: errno {}", -r)));
            }
        }
        tracer.map_scratch(0)?;
        blank(tracer)
    }

    /// A blank child of this blank process, with pid `want` where that is free: a
    /// fork-like `clone3` (its `clone_args` and `set_tid` in the scratch area) injected
    /// here. The new process runs the scratch area's recovery code on its way out of
    /// the call, which sends it to a `pause` loop ferry wrote in the code page (the
    /// saved registers point there for the call); ferry seizes it there. It inherits
    /// this blank's state: no fd, no rseq, the kernel's areas and the scratch area, at
    /// the same address. A restored process's children are made this way, so that they
    /// are its own (`wait` works).
    pub(crate) fn fork_child(&mut self, want: i32, exit_signal: i32) -> Result<Blank, EventError> {
        let tracer = self.tracer.as_mut().expect("a blank child has its tracer until taken");
        let pid = tracer.pid();
        let (scratch, _) = tracer.scratch().ok_or_else(|| EventError::Refused("no scratch area".into()))?;
        let (args_at, _) = tracer.scratch_args().ok_or_else(|| EventError::Refused("no scratch area".into()))?;
        let fail = |what: String| EventError::Refused(format!("making a child of restored process {pid}: {what}"));
        // prctl(PR_SET_PDEATHSIG, SIGKILL); getppid() == pid or exit_group(0); then
        // pause() in a loop. Should ferry die before it seizes the child, the parent
        // blank dies with ferry (PTRACE_O_EXITKILL) and takes the child along, instead of
        // leaving it paused forever (the creds plugin gives it its own signal later).
        let mut pause_loop = vec![
            0xbf, 0x01, 0x00, 0x00, 0x00, // mov edi, PR_SET_PDEATHSIG
            0xbe, 0x09, 0x00, 0x00, 0x00, // mov esi, SIGKILL
            0xb8, 0x9d, 0x00, 0x00, 0x00, // mov eax, SYS_prctl
            0x0f, 0x05, // syscall
            0xb8, 0x6e, 0x00, 0x00, 0x00, // mov eax, SYS_getppid
            0x0f, 0x05, // syscall
            0x3d, // cmp eax, pid
        ];
        pause_loop.extend_from_slice(&pid.to_le_bytes());
        pause_loop.extend_from_slice(&[
            0x75, 0x09, // jne die
            0xb8, 0x22, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xeb, 0xf7, // loop: pause(); jmp loop
            0xb8, 0xe7, 0x00, 0x00, 0x00, 0x31, 0xff, 0x0f, 0x05, // die: exit_group(0)
        ]);
        let stub = scratch + PAUSE_STUB;
        tracer.poke(stub, &pause_loop)?;
        let saved = tracer.saved_regs(pid)?;
        let mut regs = saved;
        (regs.rip, regs.rsp, regs.orig_rax, regs.rax) = (stub, args_at + 2048, u64::MAX, 0);
        tracer.set_saved_regs(pid, regs)?;
        let attempt = |tracer: &mut Tracer, tid: i32| -> Result<i64, EventError> {
            let size = std::mem::size_of::<CloneArgs>() as u64;
            // Not traced from birth by ferry (a clone with another exit signal than
            // SIGCHLD counts as a thread's for PTRACE_O_TRACECLONE): ferry seizes it.
            let mut args = CloneArgs { flags: libc::CLONE_UNTRACED as u64, exit_signal: exit_signal as u64, ..Default::default() };
            if tid > 0 {
                (args.set_tid, args.set_tid_size) = (args_at + size, 1);
            }
            // SAFETY: CloneArgs is plain old data of `size` bytes.
            let mut bytes = unsafe { std::slice::from_raw_parts(&args as *const CloneArgs as *const u8, size as usize) }.to_vec();
            bytes.extend_from_slice(&tid.to_le_bytes());
            tracer.poke(args_at, &bytes)?;
            Ok(tracer.inject(pid, libc::SYS_clone3, [args_at, size, 0, 0, 0, 0])?)
        };
        let mut r = attempt(tracer, want);
        if matches!(r, Ok(e) if e < 0) {
            r = attempt(tracer, 0);
        }
        tracer.set_saved_regs(pid, saved)?;
        let child = match r? {
            c if c > 0 => c as i32,
            e => return Err(fail(format!("clone3: errno {}", -e))),
        };
        let mut seized = match Tracer::seize_owned(child) {
            Ok(t) => t,
            Err(e) => {
                // SAFETY: the process was just made by this restore, in its pause loop.
                unsafe { libc::kill(child, libc::SIGKILL) };
                return Err(fail(format!("seizing it: {e}")));
            }
        };
        seized.set_scratch(Some(scratch));
        Ok(Blank { tracer: Some(seized), want })
    }

    /// A system call injected in the blank child (`setsid`, `setpgid`).
    pub(crate) fn inject(&mut self, nr: i64, args: [u64; 6]) -> Result<i64, EventError> {
        let tracer = self.tracer.as_mut().expect("a blank child has its tracer until taken");
        let pid = tracer.pid();
        Ok(tracer.inject(pid, nr, args)?)
    }

    /// The child's pid.
    pub fn pid(&self) -> i32 {
        self.tracer.as_ref().map_or(0, |t| t.pid())
    }

    /// Its tracer, for ferry's own calls in it.
    pub(crate) fn tracer_mut(&mut self) -> &mut Tracer {
        self.tracer.as_mut().expect("a blank child has its tracer until taken")
    }

    pub(crate) fn take(mut self) -> Tracer {
        self.tracer.take().expect("a blank child has its tracer until taken")
    }
}

impl Drop for Blank {
    fn drop(&mut self) {
        if let Some(t) = self.tracer.take() {
            t.kill();
        }
    }
}

/// Where [`Blank::fork_child`] writes its pause loop: in the scratch area's code page,
/// after the injection site's code.
const PAUSE_STUB: u64 = 0x800;

/// Above it only `[vsyscall]`, which never moves.
const USER_SPACE_END: u64 = 0x0000_8000_0000_0000;

/// Moves the child's special mappings (vDSO, vvar), keeping their relative places, to
/// a free stretch of its address space that does not meet `avoid`'s scratch area.
fn move_aside(tracer: &mut Tracer, specials: &[(u64, u64)], avoid: u64) -> Result<(), EventError> {
    let pid = tracer.pid();
    let lo = specials.iter().map(|s| s.0).min().unwrap_or(0);
    let span = specials.iter().map(|s| s.1).max().unwrap_or(0) - lo;
    let fail = |what: &str, r: i64| EventError::Failed(format!("moving the restore child's vDSO aside: {what}: errno {}", -r));
    // The kernel finds a free stretch (with room to step past the scratch area's
    // place); it is released again and the areas moved into it.
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE) as u64;
    let room = span + 2 * SCRATCH_SIZE;
    let r = tracer.inject(pid, libc::SYS_mmap, [0, room, libc::PROT_NONE as u64, flags, u64::MAX, 0])?;
    if r < 0 {
        return Err(fail("mmap", r));
    }
    let free = r as u64;
    // Only its place was wanted: nothing of it may stay in the process.
    let r = tracer.inject(pid, libc::SYS_munmap, [free, room, 0, 0, 0, 0])?;
    if r < 0 {
        return Err(fail("munmap", r));
    }
    let mut base = free;
    if base < avoid + SCRATCH_SIZE && avoid < base + span {
        base = (avoid + SCRATCH_SIZE).max(base);
    }
    for &(start, end) in specials {
        let len = end - start;
        let to = base + (start - lo);
        let moved = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
        let r = tracer.inject(pid, libc::SYS_mremap, [start, len, len, moved, to, 0])?;
        if r as u64 != to {
            return Err(fail("mremap", r));
        }
    }
    Ok(())
}

/// A rebuilt process whose threads are still stopped under ferry: the caller decides
/// whether it runs (`release`) or is removed (`abort`) — the migration commit point.
pub struct Held {
    tracer: Tracer,
    stats: Stats,
    frozen_at: Instant,
    started: Instant,
    /// Records and bytes read from each plugin's stream.
    counts: Vec<(u64, u64)>,
    /// What the memory plugin left to post-copy.
    pub lazy: Option<LazyPlan>,
    /// It was stopped by job control when taken: it is let go stopped.
    stopped: bool,
    /// Its userfaultfd, made before the credentials were dropped.
    uffd: Option<std::os::fd::OwnedFd>,
    /// The plugins that rebuilt it, dropped once its fate is known: before it runs
    /// (`release`, `run_traced`), after it is killed (`abort`). A plugin whose work
    /// must not show before the commit (a TCP connection leaving repair mode) does it
    /// on drop, the process alive and held, or undoes it, the process dead.
    subs: Vec<event::Loaded>,
}

impl Held {
    /// The inventory's bytes, read apart from the streams, count with them: the
    /// statistics then show the bytes the checkpoint wrote.
    pub fn count_inventory(&mut self, bytes: u64) {
        self.stats.bytes += bytes;
    }

    /// Lets every thread run. Answers the statistics of the restore.
    pub fn release(mut self) -> Result<Stats, EventError> {
        if self.stopped {
            // Queued while every thread is in a tracing stop: the first to run after the
            // detach takes it, and the process enters a group stop before any of its code
            // runs.
            // SAFETY: a signal to the process this restore created.
            if unsafe { libc::kill(self.tracer.pid(), libc::SIGSTOP) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(EventError::Failed(format!("stopping process {} as it was: {e}", self.tracer.pid())));
            }
        }
        drop(std::mem::take(&mut self.subs));
        self.tracer.detach()?;
        self.stats.frozen_ms = event::ms(self.frozen_at);
        self.stats.total_ms = event::ms(self.started);
        Ok(self.stats)
    }

    /// Lets the process run while ferry still traces it (post-copy): if ferry dies
    /// before [`Running::finish`], the kernel kills the process.
    pub fn run_traced(mut self) -> Result<Running, EventError> {
        if self.stopped {
            return Err(EventError::Refused(format!(
                "process {} was stopped (job control): post-copy would run it here",
                self.tracer.pid()
            )));
        }
        drop(std::mem::take(&mut self.subs));
        self.tracer.run_traced()?;
        self.stats.frozen_ms = event::ms(self.frozen_at);
        Ok(Running { tracer: self.tracer, stats: self.stats })
    }

    /// Kills the rebuilt process: only what this restore created.
    pub fn abort(self) {
        let Held { tracer, subs, .. } = self;
        tracer.kill();
        drop(subs);
    }

    /// A userfaultfd of the rebuilt process, held only by ferry (post-copy).
    pub fn userfaultfd(&mut self) -> Result<std::os::fd::OwnedFd, EventError> {
        if let Some(fd) = self.uffd.take() {
            return Ok(fd);
        }
        crate::kernel::uffd::userfaultfd_in(&mut self.tracer, crate::kernel::uffd::LAZY_FEATURES).map_err(EventError::Failed)
    }

    /// The rebuilt process's pid here.
    pub fn pid(&self) -> i32 {
        self.tracer.pid()
    }

    /// Records and bytes read from each of its plugins' streams, in plan order.
    pub fn counts(&self) -> &[(u64, u64)] {
        &self.counts
    }

    /// Image pid → pid here.
    pub fn pids(&self) -> &std::collections::BTreeMap<String, i32> {
        &self.stats.pids
    }
}

/// A restored process that runs, still traced by ferry (post-copy).
pub struct Running {
    tracer: Tracer,
    pub stats: Stats,
}

impl Running {
    /// Keeps the process going (see [`Tracer::tend`]).
    pub fn tend(&mut self) -> Result<Tended, EventError> {
        let alive = self.tracer.tend()?;
        Ok(Tended { alive, forked: self.tracer.take_forked() })
    }

    /// [`Running::tend`] for every process of a tree at once (they are traced by one
    /// thread: each stop goes to its own process).
    pub fn tend_all(running: &mut [Running]) -> Result<Vec<Tended>, EventError> {
        let mut tracers: Vec<&mut Tracer> = running.iter_mut().map(|r| &mut r.tracer).collect();
        crate::kernel::tracer::tend_all(&mut tracers)?;
        Ok(running.iter_mut().map(|r| Tended { alive: r.tracer.has_threads(), forked: r.tracer.take_forked() }).collect())
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.tracer.pid()
    }

    /// Lets the process go on its own.
    pub fn finish(self) -> Result<(), EventError> {
        Ok(self.tracer.detach_running()?)
    }

    /// Kills it: it cannot go on (its memory will not come).
    pub fn kill(self) {
        self.tracer.kill();
    }
}

/// What a rebuild needs to know before the first record: the process and the plugins
/// with their streams. From the inventory of an image, or, for a migration, from the
/// preamble the source sends ahead of the streams (the inventory comes last).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub process: ProcessEntry,
    pub plugins: Vec<PluginEntry>,
}

impl Plan {
    pub fn from_inventory(inventory: &Inventory) -> Result<Plan, EventError> {
        let [process] = inventory.processes.as_slice() else {
            return Err(EventError::Refused(format!(
                "the image holds {} processes; this ferry restores one",
                inventory.processes.len()
            )));
        };
        Ok(Plan { process: process.clone(), plugins: inventory.plugins.clone() })
    }
}

/// Rebuilds from streams still arriving, as `plan` announces them; the inventory,
/// read last, must then agree with the plan and with what was read. `child`: one made
/// ahead (else one is made now).
pub fn restore_streaming(
    manager: &Manager,
    medium: &mut MediumBox,
    plan: &Plan,
    child: Option<Blank>,
    watchdog: &Watchdog,
    started: Instant,
    progress: &mut dyn FnMut(&Tick),
) -> Result<Held, EventError> {
    let mut held = rebuild(manager, medium, plan, false, child, watchdog, started, progress)?;
    let mut inventory_bytes = 0;
    let pull = MediumPull { medium, stream: INVENTORY_STREAM };
    let checked = Inventory::read_from(&mut CountingPull { inner: pull, bytes: &mut inventory_bytes }).map(|inv| {
        let names = |p: &[PluginEntry]| -> Vec<(String, String, u32)> {
            p.iter().map(|e| (e.name.clone(), e.version.clone(), e.stream)).collect()
        };
        // Threads may come and go while a pre-copy runs: the plan's process is the
        // same one when its pid and scratch area are.
        let same = matches!(inv.processes.as_slice(), [p] if p.pid == plan.process.pid && p.scratch == plan.process.scratch);
        if names(&inv.plugins) != names(&plan.plugins) || !same {
            return Err("the inventory does not match the preamble".to_string());
        }
        inv.plugins
            .iter()
            .zip(&held.counts)
            .find_map(|(entry, &(records, bytes))| {
                (entry.records != records || entry.bytes != bytes).then(|| {
                    format!(
                        "stream {} carried {records} records, {bytes} bytes; the inventory says {}, {}",
                        entry.stream, entry.records, entry.bytes
                    )
                })
            })
            .map_or(Ok(()), Err)
    });
    match checked {
        Ok(Ok(())) => {
            held.count_inventory(inventory_bytes);
            Ok(held)
        }
        Ok(Err(why)) => {
            held.abort();
            Err(EventError::Refused(why))
        }
        Err(e) => {
            held.abort();
            Err(e.into())
        }
    }
}

fn check_plugins(manager: &Manager, plugins: &[PluginEntry]) -> Result<(), EventError> {
    // Refuse early, naming the plugin, when this ferry lacks one the image needs.
    for p in plugins {
        match manager.get(&p.name) {
            None => return Err(EventError::Refused(format!("the image needs subsystem plugin {} {}, which is not registered", p.name, p.version))),
            Some(m) if m.version != p.version => {
                return Err(EventError::Refused(format!(
                    "the image was made by subsystem plugin {} {}, this ferry has {} {}",
                    p.name, p.version, m.name, m.version
                )))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// `counts_known`: the plan's plugin entries carry the records and bytes of each
/// stream (an image's inventory) and each stream is checked as soon as it is read.
#[allow(clippy::too_many_arguments)]
pub fn rebuild(
    manager: &Manager,
    medium: &mut MediumBox,
    plan: &Plan,
    counts_known: bool,
    child: Option<Blank>,
    watchdog: &Watchdog,
    started: Instant,
    progress: &mut dyn FnMut(&Tick),
) -> Result<Held, EventError> {
    rebuild_with(manager, medium, plan, counts_known, child, watchdog, started, progress, &mut |_, _| Ok(()))
}

/// What ferry does in the process being rebuilt once plugin `name` has rebuilt its part
/// (a process of a tree takes the descriptions it shares once the files are back).
pub type AfterPlugin<'a> = dyn FnMut(&str, &mut Tracer) -> Result<(), EventError> + 'a;

/// [`rebuild`], running `after` once each plugin has rebuilt its part.
#[allow(clippy::too_many_arguments)]
pub fn rebuild_with(
    manager: &Manager,
    medium: &mut MediumBox,
    plan: &Plan,
    counts_known: bool,
    child: Option<Blank>,
    watchdog: &Watchdog,
    started: Instant,
    progress: &mut dyn FnMut(&Tick),
    after: &mut AfterPlugin<'_>,
) -> Result<Held, EventError> {
    check_plugins(manager, &plan.plugins)?;
    let process = &plan.process;
    let names: Vec<String> = plan.plugins.iter().map(|p| p.name.clone()).collect();
    let mut subs = event::load_subsystems(manager, &names, None)?;

    // A child made ahead for another pid than the image's would not keep its pid.
    let child = match child {
        Some(c) if c.want == process.pid => c,
        _ => Blank::make(process.pid)?,
    };
    let pid = child.pid();
    watchdog.set_victim(pid);
    let mut tracer = child.take();
    let frozen_at = Instant::now();
    let mut stats = Stats::default();
    let result = (|| {
        place_scratch(&mut tracer, process.scratch)?;
        if process.subreaper {
            crate::kernel::tree::set_subreaper(&mut tracer)?;
        }
        crate::trace::mark("restore child ready");
        let mut shared = SharedTable::default();
        let mut page_bytes = 0;
        let mut counts = Vec::new();
        let mut lazy = LazyPlan::default();
        let mut uffd = None;
        for (loaded, entry) in subs.iter_mut().zip(&plan.plugins) {
            let name = loaded.name.clone();
            watchdog.doing(format!("plugin {name} rebuilds its part"));
            let mut ctx = ExternalContext::new(&mut tracer, &mut shared, &name, watchdog);
            ctx.lazy_plan = Some(&mut lazy);
            let reader = RecordReader::new(MediumPull { medium: &mut *medium, stream: entry.stream }, entry.stream);
            let mut source = StreamSource { reader, plugin: &name, page_bytes: 0, watchdog };
            event::restart_one(loaded, &mut ctx, &mut source, progress)?;
            // Every record the checkpoint wrote must have been read.
            while source.reader.next()?.is_some() {}
            if counts_known {
                source.reader.check_against(entry)?;
            }
            counts.push((source.reader.records_read(), source.reader.bytes_read()));
            after(&name, &mut tracer)?;
            stats.bytes += source.reader.bytes_read();
            page_bytes += source.page_bytes;
            // Post-copy's userfaultfd is made while the process still has ferry's
            // privileges: the creds plugin, last, drops them (an unprivileged process
            // may not make one that sees the kernel's faults).
            if uffd.is_none() && !lazy.areas.is_empty() {
                uffd = Some(crate::kernel::uffd::userfaultfd_in(&mut tracer, crate::kernel::uffd::LAZY_FEATURES).map_err(EventError::Failed)?);
            }
        }
        let mut ctx = ExternalContext::new(&mut tracer, &mut shared, "ferry", watchdog);
        event::resume_all(&mut subs, &mut ctx)?;
        event::cleanup_all(&mut subs, &mut ctx, true);
        tracer.unmap_scratch()?;
        Ok::<_, EventError>((page_bytes / 4096, counts, lazy, uffd))
    })();
    match result {
        Ok((pages, counts, lazy, uffd)) => {
            stats.pages = pages;
            stats.pids.insert(process.pid.to_string(), pid);
            let lazy = (!lazy.areas.is_empty()).then_some(lazy);
            Ok(Held { tracer, stats, frozen_at, started, counts, lazy, stopped: process.stopped, uffd, subs })
        }
        Err(e) => {
            // Kill only what this restore created.
            tracer.kill();
            Err(e)
        }
    }
}

/// What tending the running process found.
pub struct Tended {
    /// It still lives.
    pub alive: bool,
    /// Children it forked since (held stopped by the tracer).
    pub forked: Vec<i32>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_restore_child_ferry_never_seized_goes_when_ferry_lets_go_of_it() {
        // As if ferry died between making the child and seizing it: the write end of
        // its pipe closes, and the child must not wait forever.
        let (pid, alive) = super::spawn_child(0).expect("a restore child");
        let stat = || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // It waits on its pipe (sleeping in read).
        while !stat().contains(") S") {
            assert!(std::time::Instant::now() < deadline, "it does not wait: {}", stat());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(alive);
        // Reparented to init (or a subreaper): gone, or a zombie nobody reaped yet.
        while !(stat().is_empty() || stat().contains(") Z")) {
            assert!(std::time::Instant::now() < deadline, "still there: {}", stat());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
