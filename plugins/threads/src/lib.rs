//! The `threads` subsystem plugin: the threads of a process and what the kernel keeps
//! per thread — general registers (with the TLS base), the FPU/vector state
//! (`NT_X86_XSTATE`), the `clear_child_tid` address, the robust futex list, the
//! alternate signal stack, the blocked signal mask, the rseq registration and the
//! thread's name, and its x86 debug registers where any is set (a hardware breakpoint
//! or watchpoint a debugger left armed).
//!
//! Records (all JSON, in this order):
//! - `threads`: `{version, pid, tids}` — the image's thread ids, the main thread first
//!   (its tid is the pid).
//! - `thread`, once per thread in the order of `tids`: see [`ThreadImage`]. Register
//!   sets are lowercase hex of the kernel's bytes, so they round-trip bit-exact.
//!
//! Restart runs after `memory` and `files` in a restore child that has only its main
//! thread: every record is read and checked first, then the extra threads are created
//! with `clone3` (asking for their recorded tids with `set_tid`), then each thread gets
//! its state back through system calls injected into it, the xstate, and last its
//! general registers, fixed up for system-call restart.

use ferry_plugin_api::{
    abi_stable::std_types::{RSlice, RStr, RVec},
    plugin::SubsystemPlugin,
    util::{self, err_text, from_hex, names, to_hex, u64_le, Scratch},
    ContextRef, PluginError, Progress, SinkRef, SourceRef, Status, SubsystemInfo,
};
use serde::{Deserialize, Serialize};

mod decode;
pub use decode::decode;

use ferry_plugin_api::util::{NT_FERRY_DEBUGREGS, NT_PRSTATUS};
const NT_X86_XSTATE: u32 = 0x202;

/// `struct user_regs_struct` of x86_64: 27 words.
const REGS_SIZE: usize = std::mem::size_of::<libc::user_regs_struct>();
const REG_WORDS: usize = REGS_SIZE / 8;
/// Word indices in `user_regs_struct`.
const RAX: usize = 10;
const RDX: usize = 12;
const ORIG_RAX: usize = 15;
const RIP: usize = 16;

/// The format of the records this plugin writes.
const FORMAT_VERSION: u32 = 1;
/// No image with more threads than this is believed.
const MAX_THREADS: usize = 65536;
/// No xstate larger than this is believed (AVX-512 with AMX tiles is about 11 KiB).
const MAX_XSTATE: usize = 1 << 20;
/// The kernel's `TASK_COMM_LEN` less the NUL.
const MAX_COMM: usize = 15;

const PR_SET_NAME: u64 = 15;
const PR_GET_TID_ADDRESS: u64 = 40;
const SIG_BLOCK: u64 = 0;
const SIG_SETMASK: u64 = 2;
const SS_ONSTACK: i32 = 1;
const SS_DISABLE: i32 = 2;
const SS_AUTODISARM: i32 = 1 << 31;

const EINTR: i64 = 4;
const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

/// Size of `struct clone_args` up to and including `cgroup` (CLONE_ARGS_SIZE_VER2).
const CLONE_ARGS_SIZE: usize = 88;
const CLONE_THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM) as u64;

// ---------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------

/// The `threads` record.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    /// The image's pid (the main thread's tid).
    pub pid: i32,
    /// Every thread, the main thread first.
    pub tids: Vec<i32>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct RobustList {
    pub head: u64,
    pub len: u64,
}

/// `stack_t` as `sigaltstack(NULL, &old)` answered it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct AltStack {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rseq {
    pub addr: u64,
    pub len: u32,
    pub flags: u32,
    pub signature: u32,
}

/// A `thread` record.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ThreadImage {
    /// The thread's id in the image.
    pub tid: i32,
    /// Its name (`/proc/PID/task/TID/comm`), for reading; see `comm_hex`.
    pub comm: String,
    /// The name's bytes in hex, only where they are not UTF-8 (`comm` is then lossy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm_hex: Option<String>,
    /// `user_regs_struct` as seized, hex.
    pub regs: String,
    /// The `NT_X86_XSTATE` register set, hex (its size depends on the CPU).
    pub xstate: String,
    /// `set_tid_address` / `CLONE_CHILD_CLEARTID` address.
    pub clear_child_tid: u64,
    pub robust_list: RobustList,
    pub sigaltstack: AltStack,
    /// Blocked signals, bit `n - 1` for signal `n`.
    pub sigmask: u64,
    /// The rseq registration, if any.
    pub rseq: Option<Rseq>,
    /// The thread was seized inside an rseq critical section: it resumes at this abort
    /// handler (what the kernel does to a preempted critical section).
    pub rseq_abort_ip: Option<u64>,
    /// DR0–DR7 (DR4, DR5 zero), only where one of them is not zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debugregs: Option<[u64; 8]>,
}

/// A checked `thread` record.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Thread {
    tid: i32,
    comm: Vec<u8>,
    regs: [u64; REG_WORDS],
    xstate: Vec<u8>,
    clear_child_tid: u64,
    robust_list: RobustList,
    sigaltstack: AltStack,
    sigmask: u64,
    rseq: Option<Rseq>,
    rseq_abort_ip: Option<u64>,
    debugregs: Option<[u64; 8]>,
}

// ---------------------------------------------------------------------------------
// Pure parts: encodings, checks and the restart fix-up
// ---------------------------------------------------------------------------------

/// `user_regs_struct` bytes as words; exactly [`REGS_SIZE`] bytes.
fn regs_from_bytes(bytes: &[u8]) -> Result<[u64; REG_WORDS], String> {
    if bytes.len() != REGS_SIZE {
        return Err(format!("general registers of {} bytes, want {REGS_SIZE}", bytes.len()));
    }
    let mut words = [0u64; REG_WORDS];
    for (w, c) in words.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        *w = u64::from_le_bytes(b);
    }
    Ok(words)
}

fn regs_to_bytes(words: &[u64; REG_WORDS]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// What [`restart_fixup`] did to a thread's registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartFix {
    /// Not inside an interrupted system call.
    None,
    /// The system call is executed again (`rip -= 2`, `rax = orig_rax`).
    Reexecute,
    /// `-ERESTART_RESTARTBLOCK`: its restart block is gone, the call fails with EINTR.
    Eintr,
}

/// Fixes up the registers of a thread seized inside a system call, as the kernel's
/// signal-return path would have done had the thread gone on: `-ERESTARTSYS`,
/// `-ERESTARTNOINTR`, `-ERESTARTNOHAND` re-execute the call, `-ERESTART_RESTARTBLOCK`
/// becomes `-EINTR` — except for `poll` without a timeout (`tail -f` waits so), whose
/// restart block polls the same fds with no timeout again: executing it again is the
/// same. `orig_rax` is always set to -1 so that the restored thread's kernel never
/// applies restart logic of its own.
fn restart_fixup(regs: &mut [u64; REG_WORDS]) -> Result<RestartFix, String> {
    let orig = regs[ORIG_RAX] as i64;
    let rax = regs[RAX] as i64;
    let endless_poll = orig == libc::SYS_poll && (regs[RDX] as i32) < 0;
    let fix = if orig < 0 {
        RestartFix::None
    } else if rax == -ERESTARTSYS || rax == -ERESTARTNOINTR || rax == -ERESTARTNOHAND || (rax == -ERESTART_RESTARTBLOCK && endless_poll) {
        regs[RIP] = regs[RIP]
            .checked_sub(2)
            .ok_or_else(|| format!("interrupted system call {orig} at rip {:#x}", regs[RIP]))?;
        regs[RAX] = regs[ORIG_RAX];
        RestartFix::Reexecute
    } else if rax == -ERESTART_RESTARTBLOCK {
        regs[RAX] = (-EINTR) as u64;
        RestartFix::Eintr
    } else {
        RestartFix::None
    };
    regs[ORIG_RAX] = u64::MAX;
    Ok(fix)
}

/// `struct rseq_cs` (32 bytes): where a thread seized at `rip` must resume, if `rip`
/// lies in the critical section it describes and the descriptor is one the kernel
/// would accept.
fn rseq_abort_target(rip: u64, cs: &[u8; 32]) -> Option<u64> {
    let u32_at = |o: usize| u32::from_le_bytes([cs[o], cs[o + 1], cs[o + 2], cs[o + 3]]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&cs[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let (version, start, post_commit_offset, abort) = (u32_at(0), u64_at(8), u64_at(16), u64_at(24));
    if version != 0 || start.checked_add(post_commit_offset).is_none() {
        return None;
    }
    let inside = |ip: u64| ip.wrapping_sub(start) < post_commit_offset;
    (inside(rip) && !inside(abort)).then_some(abort)
}

/// `struct clone_args` for a new thread of the process, asking for tid `set_tid`
/// (a pointer to one `pid_t` in the target) if given.
fn clone_args(set_tid: Option<u64>) -> [u8; CLONE_ARGS_SIZE] {
    let words: [u64; 11] = [
        CLONE_THREAD_FLAGS,
        0, // pidfd
        0, // child_tid
        0, // parent_tid
        0, // exit_signal: must be 0 with CLONE_THREAD
        0, // stack: the thread never runs before it gets its own registers
        0, // stack_size
        0, // tls: in the registers (fs_base)
        set_tid.unwrap_or(0),
        u64::from(set_tid.is_some()),
        0, // cgroup
    ];
    let mut out = [0u8; CLONE_ARGS_SIZE];
    for (c, w) in out.chunks_exact_mut(8).zip(words) {
        c.copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// The kernel's `stack_t` (24 bytes) for restoring `alt`: `SS_ONSTACK` is only ever
/// reported, never set.
fn encode_altstack(alt: &AltStack) -> [u8; 24] {
    let mut out = [0u8; 24];
    let flags = alt.flags & !SS_ONSTACK;
    let (sp, size) = if flags & SS_DISABLE != 0 { (0, 0) } else { (alt.sp, alt.size) };
    out[0..8].copy_from_slice(&sp.to_le_bytes());
    out[8..12].copy_from_slice(&flags.to_le_bytes());
    out[16..24].copy_from_slice(&size.to_le_bytes());
    out
}

fn decode_altstack(b: &[u8]) -> Result<AltStack, String> {
    if b.len() != 24 {
        return Err(format!("stack_t of {} bytes", b.len()));
    }
    let u64_at = |o: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(x)
    };
    Ok(AltStack { sp: u64_at(0), flags: i32::from_le_bytes([b[8], b[9], b[10], b[11]]), size: u64_at(16) })
}

/// Checks the `threads` record.
fn check_header(h: &Header) -> Result<(), String> {
    if h.version != FORMAT_VERSION {
        return Err(format!("`threads` record of format {}, this plugin reads {FORMAT_VERSION}", h.version));
    }
    if h.tids.is_empty() || h.tids.len() > MAX_THREADS {
        return Err(format!("the image lists {} threads (1 to {MAX_THREADS} allowed)", h.tids.len()));
    }
    if h.pid <= 0 || h.tids[0] != h.pid {
        return Err(format!("the image's first thread {} is not its pid {}", h.tids[0], h.pid));
    }
    let mut seen = std::collections::HashSet::new();
    for &t in &h.tids {
        if t <= 0 {
            return Err(format!("the image lists thread id {t}"));
        }
        if !seen.insert(t) {
            return Err(format!("the image lists thread {t} twice"));
        }
    }
    Ok(())
}

/// Checks a `thread` record, which must be of thread `want_tid`.
fn check_thread(img: ThreadImage, want_tid: i32) -> Result<Thread, String> {
    let tid = img.tid;
    if tid != want_tid {
        return Err(format!("`thread` record of thread {tid} where thread {want_tid} was expected"));
    }
    let regs = regs_from_bytes(&from_hex(&img.regs, &format!("thread {tid}: registers"), REGS_SIZE, false)?)
        .map_err(|e| format!("thread {tid}: {e}"))?;
    let xstate = from_hex(&img.xstate, &format!("thread {tid}: xstate"), MAX_XSTATE, false)?;
    if xstate.is_empty() {
        return Err(format!("thread {tid}: empty xstate"));
    }
    let comm = match &img.comm_hex {
        Some(h) => from_hex(h, &format!("thread {tid}: name"), MAX_COMM, false)?,
        None => img.comm.clone().into_bytes(),
    };
    if comm.len() > MAX_COMM || comm.contains(&0) {
        return Err(format!("thread {tid}: name {:?} is not a thread name", img.comm));
    }
    let valid_ss = SS_ONSTACK | SS_DISABLE | SS_AUTODISARM;
    if img.sigaltstack.flags & !valid_ss != 0 {
        return Err(format!("thread {tid}: sigaltstack flags {:#x}", img.sigaltstack.flags));
    }
    if let Some(r) = img.rseq.filter(|r| r.addr != 0) {
        if r.len < 32 || r.len > 4096 || r.flags != 0 {
            return Err(format!("thread {tid}: rseq area of {} bytes with flags {:#x}", r.len, r.flags));
        }
    }
    Ok(Thread {
        tid,
        comm,
        regs,
        xstate,
        clear_child_tid: img.clear_child_tid,
        robust_list: img.robust_list,
        sigaltstack: img.sigaltstack,
        sigmask: img.sigmask,
        rseq: img.rseq.filter(|r| r.addr != 0),
        rseq_abort_ip: img.rseq_abort_ip,
        debugregs: img.debugregs,
    })
}

// ---------------------------------------------------------------------------------
// The plugin
// ---------------------------------------------------------------------------------

fn get_regset(ctx: &mut ContextRef<'_>, tid: i32, nt: u32, what: &str) -> Result<Vec<u8>, String> {
    ctx.get_regset(tid, nt)
        .into_result()
        .map(RVec::into_vec)
        .map_err(|e| format!("thread {tid}: reading {what}: {}", err_text(e)))
}

fn set_regset(ctx: &mut ContextRef<'_>, tid: i32, nt: u32, data: &[u8], what: &str) -> Result<(), String> {
    ctx.set_regset(tid, nt, RSlice::from_slice(data))
        .into_result()
        .map_err(|e| format!("thread {tid}: setting {what}: {}", err_text(e)))
}

#[derive(Default)]
struct Checkpoint {
    tids: Vec<i32>,
    next: usize,
}

/// Where a restart stands once the `threads` record is read.
enum Phase {
    /// Reading (and checking) the `thread` records.
    Records,
    /// Creating the extra threads.
    Create,
    /// Giving each thread its state.
    Apply,
}

struct Restart {
    phase: Phase,
    header: Header,
    threads: Vec<Thread>,
    /// The new tid of each thread of the image, in the same order.
    new_tids: Vec<i32>,
    next: usize,
}

#[derive(Default)]
struct Plugin {
    checkpoint: Option<Checkpoint>,
    restart: Option<Restart>,
    status: Status,
    /// What happened that is worth telling (a thread under another tid, ...).
    notes: Vec<String>,
}

impl Plugin {
    fn note(&mut self, text: String) {
        eprintln!("ferry: threads: {text}");
        self.notes.push(text);
    }
}

/// Reads what the kernel keeps for thread `tid` (stopped).
fn checkpoint_thread(ctx: &mut ContextRef<'_>, tid: i32) -> Result<ThreadImage, String> {
    let regs_bytes = get_regset(ctx, tid, NT_PRSTATUS, "the general registers")?;
    let regs = regs_from_bytes(&regs_bytes).map_err(|e| format!("thread {tid}: {e}"))?;
    let xstate = get_regset(ctx, tid, NT_X86_XSTATE, "the xstate")?;
    if xstate.is_empty() || xstate.len() > MAX_XSTATE {
        return Err(format!("thread {tid}: xstate of {} bytes", xstate.len()));
    }
    let cfg = ctx.rseq_config(tid).into_result().map_err(|e| format!("thread {tid}: rseq configuration: {}", err_text(e)))?;
    let rseq = (cfg.addr != 0).then_some(Rseq { addr: cfg.addr, len: cfg.len, flags: cfg.flags, signature: cfg.signature });
    // Before any injection into the thread: the kernel clears `rseq_cs` when a system
    // call returns outside the critical section.
    let rseq_abort_ip = match rseq {
        Some(r) => rseq_abort_of(ctx, tid, r.addr, regs[RIP])?,
        None => None,
    };
    let mut comm = ctx
        .proc_read(RStr::from_str(&format!("task/{tid}/comm")))
        .into_result()
        .map_err(|e| format!("thread {tid}: name: {}", err_text(e)))?
        .into_vec();
    if comm.last() == Some(&b'\n') {
        comm.pop();
    }
    let comm_hex = std::str::from_utf8(&comm).is_err().then(|| to_hex(&comm));
    let debugregs = debugregs_of(&get_regset(ctx, tid, NT_FERRY_DEBUGREGS, "the debug registers")?)
        .map_err(|e| format!("thread {tid}: {e}"))?;
    let comm = String::from_utf8_lossy(&comm).into_owned();

    // One block of scratch: tid address @0, robust head @8, its length @16, stack_t
    // @24..48, blocked mask @48.
    let mut scratch = Scratch::new(ctx);
    let at = scratch.alloc(56)?;
    util::syscall(ctx, tid, "prctl(PR_GET_TID_ADDRESS)", libc::SYS_prctl, [PR_GET_TID_ADDRESS, at, 0, 0, 0, 0])?;
    util::syscall(ctx, tid, "get_robust_list", libc::SYS_get_robust_list, [0, at + 8, at + 16, 0, 0, 0])?;
    util::syscall(ctx, tid, "sigaltstack", libc::SYS_sigaltstack, [0, at + 24, 0, 0, 0, 0])?;
    util::syscall(ctx, tid, "rt_sigprocmask", libc::SYS_rt_sigprocmask, [SIG_BLOCK, 0, at + 48, 8, 0, 0])?;
    let b = util::read_memory(ctx, at, 56).map_err(|e| format!("thread {tid}: reading back its state: {e}"))?;
    Ok(ThreadImage {
        tid,
        comm,
        comm_hex,
        regs: to_hex(&regs_bytes),
        xstate: to_hex(&xstate),
        clear_child_tid: u64_le(&b, 0).unwrap_or(0),
        robust_list: RobustList { head: u64_le(&b, 8).unwrap_or(0), len: u64_le(&b, 16).unwrap_or(0) },
        sigaltstack: decode_altstack(&b[24..48])?,
        sigmask: u64_le(&b, 48).unwrap_or(0),
        rseq,
        rseq_abort_ip,
        debugregs,
    })
}

/// DR6 as the kernel reports it for a thread with nothing to report (its reserved bits).
const DR6_RESET: u64 = 0xffff_0ff0;

/// The debug registers as read (eight words), `None` when none holds anything: no
/// address, no control bit, DR6 as at reset.
fn debugregs_of(bytes: &[u8]) -> Result<Option<[u64; 8]>, String> {
    if bytes.len() != 64 {
        return Err(format!("debug registers of {} bytes, want 64", bytes.len()));
    }
    let mut w = [0u64; 8];
    for (i, v) in w.iter_mut().enumerate() {
        *v = u64_le(bytes, 8 * i).unwrap_or(0);
    }
    let set = w.iter().enumerate().any(|(i, &v)| if i == 6 { v != DR6_RESET && v != 0 } else { v != 0 });
    Ok(set.then_some(w))
}

/// Where thread `tid`, seized at `rip`, must resume if it is inside the rseq
/// critical section its rseq area at `area` points at.
fn rseq_abort_of(ctx: &mut ContextRef<'_>, tid: i32, area: u64, rip: u64) -> Result<Option<u64>, String> {
    let b = util::read_memory(ctx, area + 8, 8).map_err(|e| format!("thread {tid}: rseq area at {area:#x}: {e}"))?;
    let cs_ptr = u64_le(&b, 0).unwrap_or(0);
    if cs_ptr == 0 {
        return Ok(None);
    }
    // A descriptor that cannot be read would make the kernel kill the thread anyway.
    let Ok(cs) = util::read_memory(ctx, cs_ptr, 32) else { return Ok(None) };
    let mut arr = [0u8; 32];
    arr.copy_from_slice(&cs);
    Ok(rseq_abort_target(rip, &arr))
}

impl Plugin {
    fn restart_header(&mut self, ctx: &mut ContextRef<'_>, source: &mut SourceRef<'_>) -> Result<Restart, String> {
        let header: Header = util::expect_json(source, "threads")?;
        check_header(&header)?;
        let live = ctx.tids();
        if live.len() != 1 || live[0] != ctx.pid() {
            return Err(format!(
                "the restore child {} has threads {:?}; only its main thread was expected",
                ctx.pid(),
                live.as_slice()
            ));
        }
        self.status.entities_total = header.tids.len() as u64;
        Ok(Restart { phase: Phase::Records, threads: Vec::with_capacity(header.tids.len().min(1024)), new_tids: vec![ctx.pid()], header, next: 0 })
    }

    /// Creates the thread of the image with tid `want` in the restore child.
    fn create_thread(&mut self, ctx: &mut ContextRef<'_>, want: i32) -> Result<i32, String> {
        let main = ctx.pid();
        let mut scratch = Scratch::new(ctx);
        let tid_at = scratch.put(ctx, &want.to_le_bytes())?;
        let args_at = scratch.put(ctx, &clone_args(Some(tid_at)))?;
        let mut r = util::syscall_raw(ctx, main, libc::SYS_clone3, [args_at, CLONE_ARGS_SIZE as u64, 0, 0, 0, 0])?;
        if r == -(libc::EEXIST as i64) || r == -(libc::EPERM as i64) {
            let why = if r == -(libc::EEXIST as i64) { "is taken" } else { "may not be chosen here" };
            let args_at = scratch.put(ctx, &clone_args(None))?;
            r = util::syscall_raw(ctx, main, libc::SYS_clone3, [args_at, CLONE_ARGS_SIZE as u64, 0, 0, 0, 0])?;
            if r > 0 {
                self.note(format!("thread {want} of the image restored as thread {r}: tid {want} {why}"));
            }
        }
        if r <= 0 {
            let e = std::io::Error::from_raw_os_error(-r as i32);
            return Err(format!("creating thread {want} of the image with clone3 in thread {main}: {e}"));
        }
        let tid = r as i32;
        if !ctx.tids().contains(&tid) {
            return Err(format!("thread {tid} (thread {want} of the image) was created but is not traced"));
        }
        Ok(tid)
    }

    /// Gives thread `tid` of the restore child the state of thread `t` of the image.
    fn apply(&mut self, ctx: &mut ContextRef<'_>, tid: i32, t: &Thread) -> Result<(), String> {
        let name = if tid == t.tid { format!("thread {tid}") } else { format!("thread {tid} (thread {} of the image)", t.tid) };
        let live_xstate = get_regset(ctx, tid, NT_X86_XSTATE, "the xstate")?;
        if live_xstate.len() != t.xstate.len() {
            return Err(format!(
                "{name}: the image's xstate is {} bytes, this machine's {} bytes (different CPU features)",
                t.xstate.len(),
                live_xstate.len()
            ));
        }
        let sys = |ctx: &mut ContextRef<'_>, what: &str, nr: i64, args: [u64; 6]| {
            util::syscall(ctx, tid, what, nr, args).map_err(|e| format!("{name}: {e}"))
        };
        let mut scratch = Scratch::new(ctx);
        sys(ctx, "set_tid_address", libc::SYS_set_tid_address, [t.clear_child_tid, 0, 0, 0, 0, 0])?;
        sys(ctx, "set_robust_list", libc::SYS_set_robust_list, [t.robust_list.head, t.robust_list.len, 0, 0, 0, 0])?;
        let ss_at = scratch.put(ctx, &encode_altstack(&t.sigaltstack))?;
        sys(ctx, "sigaltstack", libc::SYS_sigaltstack, [ss_at, 0, 0, 0, 0, 0])?;
        if !t.comm.is_empty() {
            let comm_at = scratch.put(ctx, &[t.comm.as_slice(), &[0]].concat())?;
            sys(ctx, "prctl(PR_SET_NAME)", libc::SYS_prctl, [PR_SET_NAME, comm_at, 0, 0, 0, 0])?;
        }
        if let Some(r) = t.rseq {
            let args = [r.addr, u64::from(r.len), 0, u64::from(r.signature), 0, 0];
            let rc = util::syscall_raw(ctx, tid, libc::SYS_rseq, args)?;
            // EBUSY: registered already, with these very values.
            if rc < 0 && rc != -(libc::EBUSY as i64) {
                let e = std::io::Error::from_raw_os_error(-rc as i32);
                return Err(format!("{name}: rseq registration of {:#x} ({} bytes): {e}", r.addr, r.len));
            }
        }
        let mask_at = scratch.put(ctx, &t.sigmask.to_le_bytes())?;
        sys(ctx, "rt_sigprocmask", libc::SYS_rt_sigprocmask, [SIG_SETMASK, mask_at, 0, 8, 0, 0])?;
        set_regset(ctx, tid, NT_X86_XSTATE, &t.xstate, "the xstate").map_err(|e| format!("{name}: {e}"))?;
        // Last before the general registers, after this plugin's injected calls. The
        // breakpoints are of user space only: the kernel's own accesses in the calls
        // other plugins inject later never trigger them.
        if let Some(dr) = t.debugregs {
            let bytes: Vec<u8> = dr.iter().flat_map(|w| w.to_le_bytes()).collect();
            set_regset(ctx, tid, NT_FERRY_DEBUGREGS, &bytes, "the debug registers").map_err(|e| format!("{name}: {e}"))?;
        }
        let mut regs = t.regs;
        restart_fixup(&mut regs).map_err(|e| format!("{name}: {e}"))?;
        if let Some(abort) = t.rseq_abort_ip {
            regs[RIP] = abort;
        }
        set_regset(ctx, tid, NT_PRSTATUS, &regs_to_bytes(&regs), "the general registers")
            .map_err(|e| format!("{name}: {e}"))
    }

    fn restart_step(&mut self, ctx: &mut ContextRef<'_>, source: &mut SourceRef<'_>) -> Result<Progress, String> {
        let Some(mut rs) = self.restart.take() else {
            let rs = self.restart_header(ctx, source)?;
            self.restart = Some(rs);
            return Ok(Progress::More);
        };
        let progress = match rs.phase {
            Phase::Records => {
                let i = rs.threads.len();
                let want = rs.header.tids[i];
                let rec = util::next_record(source)?
                    .ok_or_else(|| format!("the image ends before the record of thread {want}"))?;
                self.status.bytes_done += rec.payload.len() as u64;
                let img: ThreadImage = util::parse_json(&rec, "thread")?;
                rs.threads.push(check_thread(img, want)?);
                if rs.threads.len() == rs.header.tids.len() {
                    if let Some(extra) = util::next_record(source)? {
                        return Err(format!("unexpected `{}` record after the last thread", extra.kind));
                    }
                    rs.phase = Phase::Create;
                    rs.next = 1;
                }
                Progress::More
            }
            Phase::Create => {
                if rs.next < rs.threads.len() {
                    let want = rs.threads[rs.next].tid;
                    let tid = self.create_thread(ctx, want)?;
                    rs.new_tids.push(tid);
                    rs.next += 1;
                } else {
                    rs.phase = Phase::Apply;
                    rs.next = 0;
                }
                Progress::More
            }
            Phase::Apply => {
                let i = rs.next;
                let (tid, t) = match (rs.new_tids.get(i), rs.threads.get(i)) {
                    (Some(&tid), Some(t)) => (tid, t.clone()),
                    _ => return Err(format!("internal: no thread {i} to restore")),
                };
                self.apply(ctx, tid, &t)?;
                self.status.entities_done += 1;
                rs.next += 1;
                if rs.next == rs.threads.len() {
                    Progress::Done
                } else {
                    Progress::More
                }
            }
        };
        self.restart = Some(rs);
        Ok(progress)
    }
}

impl SubsystemPlugin for Plugin {
    fn info(&self) -> SubsystemInfo {
        SubsystemInfo {
            entity_kinds: names(&["thread"]),
            after: names(&["memory", "files"]),
            shared_resources: names(&[]),
        }
    }

    fn checkpoint(&mut self, ctx: &mut ContextRef<'_>, sink: &mut SinkRef<'_>) -> Result<Progress, String> {
        let Some(ck) = self.checkpoint.as_mut() else {
            let tids = ctx.tids().into_vec();
            if tids.first() != Some(&ctx.pid()) {
                return Err(format!("the threads of process {} do not start with its main thread: {tids:?}", ctx.pid()));
            }
            let header = Header { version: FORMAT_VERSION, pid: ctx.pid(), tids: tids.clone() };
            util::put_json(sink, "threads", &header)?;
            self.status = Status { entities_total: tids.len() as u64, ..Status::default() };
            self.checkpoint = Some(Checkpoint { tids, next: 0 });
            return Ok(Progress::More);
        };
        let Some(&tid) = ck.tids.get(ck.next) else { return Ok(Progress::Done) };
        let img = checkpoint_thread(ctx, tid)?;
        let bytes = serde_json::to_vec(&img).map_err(|e| format!("thread {tid}: encoding: {e}"))?;
        util::put_json(sink, "thread", &img)?;
        ck.next += 1;
        let done = ck.next == ck.tids.len();
        self.status.entities_done += 1;
        self.status.bytes_done += bytes.len() as u64;
        Ok(if done { Progress::Done } else { Progress::More })
    }

    fn restart(&mut self, ctx: &mut ContextRef<'_>, source: &mut SourceRef<'_>) -> Result<Progress, String> {
        self.restart_step(ctx, source)
    }

    fn status(&self) -> Status {
        self.status
    }

    fn dump(&self, error: &PluginError) -> String {
        let mut s = error.message.to_string();
        if let Some(rs) = &self.restart {
            s += &format!(
                "\nthreads: {} of {} image threads read, {} exist in the restore child {:?}, {} restored",
                rs.threads.len(),
                rs.header.tids.len(),
                rs.new_tids.len(),
                rs.new_tids,
                self.status.entities_done
            );
        }
        for n in &self.notes {
            s += &format!("\nthreads: {n}");
        }
        s
    }
}

ferry_plugin_api::export_subsystem!("threads", "Threads: registers, FPU, TLS, rseq, tid address", Plugin::default);

#[cfg(test)]
mod tests {
    use ferry_plugin_api::testing::MockMemory;
    use super::*;
    use ferry_plugin_api::{
        abi_stable::std_types::{RResult, RSliceMut, RStr},
        MemRange, ProcessContext, RseqConfig, SyscallArgs,
    };
    use std::collections::HashMap;

    const BASE: u64 = 0x10000;
    const SCRATCH: u64 = 0x10000;
    /// Process memory of the mock, after its scratch area: rseq areas live here.
    const RSEQ_AREA: u64 = BASE + SCRATCH;
    const CS_AT: u64 = RSEQ_AREA + 0x100;

    /// A process that answers as the kernel would, and records what it was asked.
    struct Mock {
        pid: i32,
        tids: Vec<i32>,
        mem: MockMemory,
        regs: HashMap<i32, Vec<u8>>,
        xstate: HashMap<i32, Vec<u8>>,
        xstate_len: usize,
        /// Tids clone3 refuses with EEXIST.
        taken: Vec<i32>,
        next_tid: i32,
        calls: Vec<(i32, i64, [u64; 6])>,
        rseq: HashMap<i32, u64>,
        /// Debug registers set, by thread (none: all zero).
        debugregs: HashMap<i32, Vec<u8>>,
    }

    impl Mock {
        fn new(pid: i32, tids: &[i32], xstate_len: usize) -> Mock {
            let mut m = Mock {
                pid,
                tids: tids.to_vec(),
                mem: MockMemory::new(BASE, 2 * SCRATCH as usize),
                regs: HashMap::new(),
                xstate: HashMap::new(),
                xstate_len,
                taken: vec![],
                next_tid: 900,
                calls: vec![],
                rseq: HashMap::new(),
                debugregs: HashMap::new(),
            };
            for &t in tids {
                m.add_thread(t);
            }
            m
        }
        fn add_thread(&mut self, t: i32) {
            let mut r = [0u64; REG_WORDS];
            r[RIP] = 0x401000 + t as u64;
            r[ORIG_RAX] = u64::MAX;
            self.regs.insert(t, regs_to_bytes(&r));
            self.xstate.insert(t, vec![t as u8; self.xstate_len]);
        }
        fn get(&self, addr: u64, len: usize) -> Vec<u8> {
            self.mem.get(addr, len)
        }
        fn put(&mut self, addr: u64, data: &[u8]) {
            self.mem.put(addr, data)
        }
        fn calls_of(&self, nr: i64) -> Vec<(i32, [u64; 6])> {
            self.calls.iter().filter(|c| c.1 == nr).map(|c| (c.0, c.2)).collect()
        }
    }

    fn fail<T>(m: &str) -> RResult<T, PluginError> {
        RResult::RErr(PluginError::new("mock", m))
    }

    impl ProcessContext for Mock {
        fn pid(&self) -> i32 {
            self.pid
        }
        fn tids(&self) -> RVec<i32> {
            self.tids.clone().into()
        }
        fn read_memory(&mut self, addr: u64, mut buf: RSliceMut<'_, u8>) -> RResult<usize, PluginError> {
            self.mem.read(addr, buf.as_mut_slice())
        }
        fn write_memory(&mut self, addr: u64, data: RSlice<'_, u8>) -> RResult<usize, PluginError> {
            self.mem.write(addr, data.as_slice())
        }
        fn scratch(&self) -> MemRange {
            MemRange { addr: BASE, len: SCRATCH }
        }
        fn inject_syscall(&mut self, tid: i32, nr: i64, args: SyscallArgs) -> RResult<i64, PluginError> {
            if !self.tids.contains(&tid) {
                return fail("no such thread");
            }
            let a = args.0;
            self.calls.push((tid, nr, a));
            let t = tid as u64;
            let r = match nr {
                libc::SYS_clone3 => {
                    let b = self.get(a[0], CLONE_ARGS_SIZE);
                    assert_eq!(u64_le(&b, 0).unwrap_or(0), CLONE_THREAD_FLAGS);
                    let new = if u64_le(&b, 72).unwrap_or(0) == 1 {
                        let want = i32::from_le_bytes(self.get(u64_le(&b, 64).unwrap_or(0), 4).try_into().unwrap());
                        if self.taken.contains(&want) || self.tids.contains(&want) {
                            return RResult::ROk(-(libc::EEXIST as i64));
                        }
                        want
                    } else {
                        self.next_tid += 1;
                        self.next_tid
                    };
                    self.tids.push(new);
                    self.add_thread(new);
                    new as i64
                }
                libc::SYS_prctl if a[0] == PR_GET_TID_ADDRESS => {
                    self.put(a[1], &(0x7000 + t).to_le_bytes());
                    0
                }
                libc::SYS_get_robust_list => {
                    self.put(a[1], &(0x7100 + t).to_le_bytes());
                    self.put(a[2], &24u64.to_le_bytes());
                    0
                }
                libc::SYS_sigaltstack if a[0] == 0 => {
                    let alt = AltStack { sp: 0x8000 + t, flags: SS_ONSTACK, size: 65536 };
                    let mut b = encode_altstack(&alt);
                    b[8..12].copy_from_slice(&SS_ONSTACK.to_le_bytes());
                    self.put(a[1], &b);
                    0
                }
                libc::SYS_rt_sigprocmask if a[1] == 0 => {
                    self.put(a[2], &(1u64 << (tid % 64)).to_le_bytes());
                    0
                }
                _ => 0,
            };
            RResult::ROk(r)
        }
        fn get_regset(&mut self, tid: i32, regset: u32) -> RResult<RVec<u8>, PluginError> {
            if regset == NT_FERRY_DEBUGREGS {
                let mut idle = vec![0; 64];
                idle[48..56].copy_from_slice(&DR6_RESET.to_le_bytes());
                return RResult::ROk(self.debugregs.get(&tid).cloned().unwrap_or(idle).into());
            }
            let m = if regset == NT_PRSTATUS { &self.regs } else { &self.xstate };
            match m.get(&tid) {
                Some(v) => RResult::ROk(v.clone().into()),
                None => fail("no such thread"),
            }
        }
        fn set_regset(&mut self, tid: i32, regset: u32, data: RSlice<'_, u8>) -> RResult<(), PluginError> {
            if !self.tids.contains(&tid) {
                return fail("no such thread");
            }
            let m = match regset {
                NT_PRSTATUS => &mut self.regs,
                NT_FERRY_DEBUGREGS => &mut self.debugregs,
                _ => &mut self.xstate,
            };
            m.insert(tid, data.to_vec());
            RResult::ROk(())
        }
        fn proc_read(&mut self, name: RStr<'_>) -> RResult<RVec<u8>, PluginError> {
            let tid: i32 = name.as_str().split('/').nth(1).unwrap().parse().unwrap();
            let name = if tid == 13 { b"\xffx\n".to_vec() } else { format!("w{tid}\n").into_bytes() };
            RResult::ROk(name.into())
        }
        fn rseq_config(&mut self, tid: i32) -> RResult<RseqConfig, PluginError> {
            let addr = self.rseq.get(&tid).copied().unwrap_or(0);
            RResult::ROk(RseqConfig { addr, len: if addr != 0 { 32 } else { 0 }, flags: 0, signature: 0x53053053 })
        }
        fn peek_siginfo(&mut self, _: i32, _: bool) -> RResult<RVec<u8>, PluginError> {
            RResult::ROk(RVec::new())
        }
    }

    use ferry_plugin_api::testing::{self, Records};

    fn run_checkpoint(mock: &mut Mock) -> Result<Records, String> {
        let mut plugin = Plugin::default();
        let records = testing::run_checkpoint(&mut plugin, mock, 100)?;
        assert_eq!(plugin.status().entities_done, plugin.status().entities_total);
        Ok(records)
    }

    fn run_restart(mock: &mut Mock, records: Records) -> Result<Plugin, String> {
        let mut plugin = Plugin::default();
        testing::run_restart(&mut plugin, mock, records, 100)?;
        Ok(plugin)
    }

    /// A write watchpoint (DR0, 8 bytes, enabled locally) with a hit noted in DR6.
    const WATCH: [u64; 8] = [0x7ffe_0000_1000, 0, 0, 0, 0, 0, 0xffff_0ff1, 0xd0001];

    /// A checkpointed process of three threads; thread 12 sits in an interrupted
    /// read and has a watchpoint armed, thread 13 inside an rseq critical section.
    fn checkpointed() -> Records {
        let mut m = Mock::new(10, &[10, 12, 13], 2432);
        let mut r12 = regs_from_bytes(&m.regs[&12]).unwrap();
        r12[ORIG_RAX] = libc::SYS_read as u64;
        r12[RAX] = (-ERESTARTSYS) as u64;
        m.regs.insert(12, regs_to_bytes(&r12));
        m.rseq.insert(13, RSEQ_AREA);
        m.put(RSEQ_AREA + 8, &CS_AT.to_le_bytes());
        m.put(CS_AT, &cs(0, 0x401000, 0x100, 0x402000));
        m.debugregs.insert(12, WATCH.iter().flat_map(|w| w.to_le_bytes()).collect());
        run_checkpoint(&mut m).unwrap()
    }

    #[test]
    fn checkpoint_then_restart_through_the_plugin() {
        let records = checkpointed();
        let kinds: Vec<&str> = records.0.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(kinds, ["threads", "thread", "thread", "thread"]);
        let t13: ThreadImage = serde_json::from_slice(&records.0[3].payload).unwrap();
        assert_eq!(t13.rseq_abort_ip, Some(0x402000));
        assert_eq!(t13.sigaltstack.flags, SS_ONSTACK);
        assert_eq!((t13.comm.as_str(), t13.comm_hex.as_deref()), ("\u{fffd}x", Some("ff78")));
        let t12: ThreadImage = serde_json::from_slice(&records.0[2].payload).unwrap();
        assert_eq!((t12.comm.as_str(), t12.comm_hex.as_deref()), ("w12", None));

        // The restore child: another pid, one thread; tid 12 is free, 13 taken.
        let mut m = Mock::new(50, &[50], 2432);
        m.taken.push(13);
        let plugin = run_restart(&mut m, records).unwrap();
        assert_eq!(m.tids, vec![50, 12, 901]);
        assert_eq!(plugin.status().entities_done, 3);
        assert!(plugin.notes.iter().any(|n| n.contains("thread 13 of the image restored as thread 901")));
        let clones = m.calls_of(libc::SYS_clone3);
        assert_eq!(clones.len(), 3, "12 with set_tid, 13 with set_tid (EEXIST), 13 without");
        assert!(clones.iter().all(|c| c.0 == 50));

        // Every thread got its own state, through calls injected into itself.
        for (new, old) in [(50, 10u64), (12, 12), (901, 13)] {
            let mine: Vec<(i64, [u64; 6])> = m.calls.iter().filter(|c| c.0 == new).map(|c| (c.1, c.2)).collect();
            assert!(mine.contains(&(libc::SYS_set_tid_address, [0x7000 + old, 0, 0, 0, 0, 0])));
            assert!(mine.contains(&(libc::SYS_set_robust_list, [0x7100 + old, 24, 0, 0, 0, 0])));
            assert_eq!(m.xstate[&new], vec![old as u8; 2432]);
        }
        // SS_ONSTACK is not given back to sigaltstack.
        let ss = m.calls_of(libc::SYS_sigaltstack);
        assert_eq!(ss.len(), 3);
        // Only thread 13 (now 901) had rseq.
        assert_eq!(m.calls_of(libc::SYS_rseq), vec![(901, [RSEQ_AREA, 32, 0, 0x53053053, 0, 0])]);
        // Registers: 12 re-executes its read, 13 resumes at its abort handler.
        let r = |t: i32| regs_from_bytes(&m.regs[&t]).unwrap();
        assert_eq!((r(12)[RIP], r(12)[RAX], r(12)[ORIG_RAX]), (0x401000 + 12 - 2, libc::SYS_read as u64, u64::MAX));
        assert_eq!(r(901)[RIP], 0x402000);
        assert_eq!(r(50)[RIP], 0x401000 + 10);
        // Debug registers: only thread 12 had any, and only it gets them back.
        assert_eq!(t12.debugregs, Some(WATCH));
        assert_eq!(t13.debugregs, None);
        let dr: Vec<u8> = WATCH.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(m.debugregs.get(&12), Some(&dr));
        assert_eq!(m.debugregs.len(), 1);
        // Names: the exact bytes, NUL-terminated, for each thread.
        assert_eq!(m.calls_of(libc::SYS_prctl).iter().filter(|c| c.1[0] == PR_SET_NAME).count(), 3);
    }

    #[test]
    fn a_restart_refuses_what_does_not_fit() {
        // Another CPU: the xstate differs in size.
        let mut m = Mock::new(50, &[50], 1024);
        let e = run_restart(&mut m, checkpointed()).err().unwrap();
        assert!(e.contains("xstate is 2432 bytes, this machine's 1024"), "{e}");
        // A thread record missing.
        let mut short = checkpointed();
        short.0.pop();
        let mut m = Mock::new(50, &[50], 2432);
        let e = run_restart(&mut m, short).err().unwrap();
        assert!(e.contains("ends before the record of thread 13"), "{e}");
        assert_eq!(m.tids, vec![50], "nothing was created from an incomplete image");
        // Records out of order.
        let mut swapped = checkpointed();
        swapped.0.swap(1, 2);
        let e = run_restart(&mut Mock::new(50, &[50], 2432), swapped).err().unwrap();
        assert!(e.contains("record of thread 12 where thread 10 was expected"), "{e}");
        // A corrupt register set.
        let mut bad = checkpointed();
        let mut t: ThreadImage = serde_json::from_slice(&bad.0[2].payload).unwrap();
        t.regs.truncate(100);
        bad.0[2].payload = serde_json::to_vec(&t).unwrap().into();
        let e = run_restart(&mut Mock::new(50, &[50], 2432), bad).err().unwrap();
        assert!(e.contains("thread 12") && e.contains("50 bytes, want 216"), "{e}");
        // Not JSON at all.
        let mut junk = checkpointed();
        junk.0[1].payload = b"\x00\xff".to_vec().into();
        assert!(run_restart(&mut Mock::new(50, &[50], 2432), junk).is_err());
        // A restore child that already has threads.
        let e = run_restart(&mut Mock::new(50, &[50, 51], 2432), checkpointed()).err().unwrap();
        assert!(e.contains("only its main thread"), "{e}");
    }

    fn regs_with(orig_rax: i64, rax: i64, rip: u64) -> [u64; REG_WORDS] {
        let mut r = [0u64; REG_WORDS];
        r[ORIG_RAX] = orig_rax as u64;
        r[RAX] = rax as u64;
        r[RIP] = rip;
        r
    }

    #[test]
    fn register_indices_match_the_kernel_struct() {
        assert_eq!(REGS_SIZE, 216);
        assert_eq!(std::mem::offset_of!(libc::user_regs_struct, rax), RAX * 8);
        assert_eq!(std::mem::offset_of!(libc::user_regs_struct, orig_rax), ORIG_RAX * 8);
        assert_eq!(std::mem::offset_of!(libc::user_regs_struct, rip), RIP * 8);
    }

    #[test]
    fn restartable_calls_are_executed_again() {
        for code in [ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND] {
            let mut r = regs_with(libc::SYS_read, -code, 0x401002);
            assert_eq!(restart_fixup(&mut r).unwrap(), RestartFix::Reexecute);
            assert_eq!(r[RIP], 0x401000);
            assert_eq!(r[RAX], libc::SYS_read as u64);
            assert_eq!(r[ORIG_RAX], u64::MAX);
        }
    }

    #[test]
    fn restart_block_becomes_eintr() {
        let mut r = regs_with(libc::SYS_clock_nanosleep, -ERESTART_RESTARTBLOCK, 0x401002);
        assert_eq!(restart_fixup(&mut r).unwrap(), RestartFix::Eintr);
        assert_eq!(r[RIP], 0x401002);
        assert_eq!(r[RAX] as i64, -EINTR);
        assert_eq!(r[ORIG_RAX], u64::MAX);
        // poll with a timeout: its restart block would wait for what is left of it.
        let mut r = regs_with(libc::SYS_poll, -ERESTART_RESTARTBLOCK, 0x401002);
        r[RDX] = 1000;
        assert_eq!(restart_fixup(&mut r).unwrap(), RestartFix::Eintr);
    }

    #[test]
    fn poll_without_a_timeout_is_executed_again() {
        // The timeout is an int: -1 in rdx's low half, whatever the high half holds.
        let mut r = regs_with(libc::SYS_poll, -ERESTART_RESTARTBLOCK, 0x401002);
        r[RDX] = 0xdead_0000_ffff_ffff;
        assert_eq!(restart_fixup(&mut r).unwrap(), RestartFix::Reexecute);
        assert_eq!((r[RIP], r[RAX], r[ORIG_RAX]), (0x401000, libc::SYS_poll as u64, u64::MAX));
        assert_eq!(r[RDX], 0xdead_0000_ffff_ffff, "the arguments stay");
    }

    #[test]
    fn other_states_are_left_alone_but_orig_rax_cleared() {
        // Not in a system call: rax happens to hold a restart code.
        let mut r = regs_with(-1, -ERESTARTSYS, 0x401002);
        assert_eq!(restart_fixup(&mut r).unwrap(), RestartFix::None);
        assert_eq!((r[RIP], r[RAX] as i64, r[ORIG_RAX]), (0x401002, -ERESTARTSYS, u64::MAX));
        // A finished call (any return value).
        let mut r = regs_with(0, 42, 0x401002);
        assert_eq!(restart_fixup(&mut r).unwrap(), RestartFix::None);
        assert_eq!((r[RIP], r[RAX], r[ORIG_RAX]), (0x401002, 42, u64::MAX));
        let mut r = regs_with(0, -(libc::EAGAIN as i64), 0x10);
        assert_eq!(restart_fixup(&mut r).unwrap(), RestartFix::None);
        // A corrupt rip is an error, not an underflow.
        let mut r = regs_with(0, -ERESTARTSYS, 1);
        assert!(restart_fixup(&mut r).is_err());
    }

    #[test]
    fn hex_round_trips_and_refuses_bad_input() {
        let data: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&data), "x", 256, false).unwrap(), data);
        assert_eq!(from_hex("0aFf", "x", 2, false).unwrap(), vec![0x0a, 0xff]);
        assert!(from_hex("abc", "x", 10, false).unwrap_err().contains("odd"));
        assert!(from_hex("zz", "x", 10, false).unwrap_err().contains("not a hex digit"));
        assert!(from_hex("0000", "x", 1, false).unwrap_err().contains("more than"));
    }

    #[test]
    fn registers_round_trip_bit_exact() {
        let bytes: Vec<u8> = (0..REGS_SIZE as u32).map(|i| (i * 7 + 3) as u8).collect();
        let words = regs_from_bytes(&bytes).unwrap();
        assert_eq!(regs_to_bytes(&words), bytes);
        assert!(regs_from_bytes(&bytes[..215]).is_err());
        assert!(regs_from_bytes(&[0u8; 224]).is_err());
    }

    #[test]
    fn clone_args_layout() {
        let a = clone_args(Some(0x7000));
        let w = |i: usize| u64_le(&a, i * 8).unwrap_or(0);
        assert_eq!(a.len(), 88);
        assert_eq!(w(0), 0x50f00);
        assert_eq!(w(4), 0); // exit_signal
        assert_eq!(w(5), 0); // stack
        assert_eq!((w(8), w(9)), (0x7000, 1));
        let b = clone_args(None);
        assert_eq!((u64_le(&b, 64).unwrap_or(0), u64_le(&b, 72).unwrap_or(0)), (0, 0));
    }

    #[test]
    fn altstack_encoding_drops_onstack() {
        let alt = AltStack { sp: 0x7f00_0000_0000, flags: SS_ONSTACK | SS_AUTODISARM, size: 65536 };
        let b = encode_altstack(&alt);
        let back = decode_altstack(&b).unwrap();
        assert_eq!(back, AltStack { flags: SS_AUTODISARM, ..alt });
        let off = AltStack { sp: 0x1234, flags: SS_DISABLE, size: 99 };
        assert_eq!(decode_altstack(&encode_altstack(&off)).unwrap(), AltStack { sp: 0, flags: SS_DISABLE, size: 0 });
        assert!(decode_altstack(&[0u8; 23]).is_err());
    }

    fn cs(version: u32, start: u64, len: u64, abort: u64) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&version.to_le_bytes());
        b[8..16].copy_from_slice(&start.to_le_bytes());
        b[16..24].copy_from_slice(&len.to_le_bytes());
        b[24..32].copy_from_slice(&abort.to_le_bytes());
        b
    }

    #[test]
    fn rseq_critical_sections_abort() {
        let d = cs(0, 0x1000, 0x20, 0x2000);
        assert_eq!(rseq_abort_target(0x1000, &d), Some(0x2000));
        assert_eq!(rseq_abort_target(0x101f, &d), Some(0x2000));
        assert_eq!(rseq_abort_target(0x1020, &d), None);
        assert_eq!(rseq_abort_target(0xfff, &d), None);
        assert_eq!(rseq_abort_target(0x1000, &cs(1, 0x1000, 0x20, 0x2000)), None);
        assert_eq!(rseq_abort_target(0x1000, &cs(0, 0x1000, 0x20, 0x1010)), None);
        assert_eq!(rseq_abort_target(u64::MAX, &cs(0, u64::MAX - 1, 4, 0)), None);
    }

    fn image(tid: i32) -> ThreadImage {
        ThreadImage {
            tid,
            comm: "worker".into(),
            comm_hex: None,
            regs: to_hex(&[1u8; REGS_SIZE]),
            xstate: to_hex(&[2u8; 2432]),
            clear_child_tid: 0x7000,
            robust_list: RobustList { head: 0x7100, len: 24 },
            sigaltstack: AltStack { sp: 0, flags: SS_DISABLE, size: 0 },
            sigmask: 1 << 11,
            rseq: Some(Rseq { addr: 0x7200, len: 32, flags: 0, signature: 0x53053053 }),
            rseq_abort_ip: None,
            debugregs: None,
        }
    }

    #[test]
    fn thread_records_are_checked() {
        let t = check_thread(image(7), 7).unwrap();
        assert_eq!(t.xstate.len(), 2432);
        assert_eq!(t.regs[0], 0x0101_0101_0101_0101);
        // Survives JSON.
        let json = serde_json::to_vec(&image(7)).unwrap();
        let back: ThreadImage = serde_json::from_slice(&json).unwrap();
        assert_eq!(check_thread(back, 7).unwrap(), t);

        assert!(check_thread(image(7), 8).unwrap_err().contains("thread 8 was expected"));
        let mut bad = image(7);
        bad.regs = to_hex(&[1u8; 208]);
        assert!(check_thread(bad, 7).unwrap_err().contains("208 bytes"));
        let mut bad = image(7);
        bad.regs = to_hex(&[1u8; 224]);
        assert!(check_thread(bad, 7).unwrap_err().contains("more than"));
        let mut bad = image(7);
        bad.xstate = String::new();
        assert!(check_thread(bad, 7).is_err());
        let mut bad = image(7);
        bad.comm = "a-name-longer-than-15".into();
        assert!(check_thread(bad, 7).is_err());
        // A name that is not UTF-8 comes from its hex.
        let mut odd = image(7);
        odd.comm_hex = Some("ff41".into());
        assert_eq!(check_thread(odd, 7).unwrap().comm, vec![0xff, 0x41]);
        let mut bad = image(7);
        bad.comm_hex = Some("410041".into());
        assert!(check_thread(bad, 7).is_err());
        let mut bad = image(7);
        bad.comm_hex = Some("41".repeat(16));
        assert!(check_thread(bad, 7).is_err());
        let mut bad = image(7);
        bad.sigaltstack.flags = 0x40;
        assert!(check_thread(bad, 7).is_err());
        let mut bad = image(7);
        bad.rseq = Some(Rseq { addr: 0x7200, len: 8, flags: 0, signature: 0 });
        assert!(check_thread(bad, 7).unwrap_err().contains("rseq"));
        let mut none = image(7);
        none.rseq = Some(Rseq { addr: 0, len: 0, flags: 0, signature: 0 });
        assert_eq!(check_thread(none, 7).unwrap().rseq, None);
    }

    #[test]
    fn headers_are_checked() {
        let ok = Header { version: 1, pid: 10, tids: vec![10, 11, 12] };
        assert!(check_header(&ok).is_ok());
        assert!(check_header(&Header { version: 2, ..ok.clone() }).is_err());
        assert!(check_header(&Header { tids: vec![], ..ok.clone() }).is_err());
        assert!(check_header(&Header { tids: vec![11, 10], ..ok.clone() }).is_err());
        assert!(check_header(&Header { tids: vec![10, 11, 11], ..ok.clone() }).is_err());
        assert!(check_header(&Header { tids: vec![10, -1], ..ok.clone() }).is_err());
        assert!(check_header(&Header { tids: vec![10; MAX_THREADS + 1], ..ok }).is_err());
    }
}
