//! The `signals` subsystem plugin: signal actions, pending signals (the process-wide
//! queue and each thread's own) and the interval timers. Blocked masks and alternate
//! stacks are per thread and belong to the `threads` plugin.
//!
//! Records (all JSON, in this order):
//! - `sigactions`: `{version, actions: [{sig, handler, flags, restorer, mask}]}` — the
//!   actions that are not the default one (`SIG_DFL`, no flags, empty mask).
//! - `pending`: `{version, shared: [siginfo], threads: [{tid, fs_base, pending: [siginfo]}]}`
//!   where a siginfo is `{sig, info}`, `info` the kernel's 128 bytes in hex, in queue
//!   order; threads in the order of the checkpoint's `tids()`, the main thread first.
//! - `itimers`: `{version, timers: [{which, interval_sec, interval_usec, value_sec, value_usec}]}`
//!   for `ITIMER_REAL`, `ITIMER_VIRTUAL`, `ITIMER_PROF`.
//!
//! Restart runs after `threads`: every signal's action is set (the recorded one, or
//! `SIG_DFL` so that nothing of the restore child's own survives), then the pending
//! signals are queued again with their siginfo, then the timers are armed.

use ferry_plugin_api::{
    plugin::SubsystemPlugin,
    util::{self, err_text, from_hex, fs_base, map_threads, names, to_hex, u64_le, Matched, Scratch},
    ContextRef, PluginError, Progress, SinkRef, SourceRef, Status, SubsystemInfo,
};
use serde::{Deserialize, Serialize};

mod decode;
pub use decode::decode;


const FORMAT_VERSION: u32 = 1;
const NSIG: i32 = 64;
const SIGINFO_SIZE: usize = 128;
/// The kernel's `struct sigaction` for `rt_sigaction`: handler, flags, restorer, mask.
const SIGACTION_SIZE: usize = 32;
const ITIMERVAL_SIZE: usize = 32;
/// No image with more queued signals than this (in one queue) is believed.
const MAX_PENDING: usize = 1 << 20;
const MAX_THREADS: usize = 65536;
const ITIMERS: [(i32, &str); 3] = [(0, "ITIMER_REAL"), (1, "ITIMER_VIRTUAL"), (2, "ITIMER_PROF")];

// ---------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Action {
    pub sig: i32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Actions {
    pub version: u32,
    pub actions: Vec<Action>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SigInfo {
    pub sig: i32,
    /// The kernel's `siginfo_t`, 128 bytes, hex.
    pub info: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ThreadPending {
    /// The thread's id in the image.
    pub tid: i32,
    /// Its TLS base: finds the thread again when it was restored under another tid.
    pub fs_base: u64,
    pub pending: Vec<SigInfo>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub version: u32,
    pub shared: Vec<SigInfo>,
    pub threads: Vec<ThreadPending>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Itimer {
    pub which: i32,
    pub interval_sec: i64,
    pub interval_usec: i64,
    pub value_sec: i64,
    pub value_usec: i64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Itimers {
    pub version: u32,
    pub timers: Vec<Itimer>,
}

// ---------------------------------------------------------------------------------
// Pure parts
// ---------------------------------------------------------------------------------

fn i32_at(b: &[u8], o: usize) -> i32 {
    i32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Signals whose action can be read and set (all but SIGKILL and SIGSTOP).
fn settable(sig: i32) -> bool {
    (1..=NSIG).contains(&sig) && sig != libc::SIGKILL && sig != libc::SIGSTOP
}

fn decode_action(sig: i32, b: &[u8]) -> Result<Action, String> {
    if b.len() != SIGACTION_SIZE {
        return Err(format!("signal {sig}: sigaction of {} bytes", b.len()));
    }
    Ok(Action { sig, handler: u64_le(b, 0).unwrap_or(0), flags: u64_le(b, 8).unwrap_or(0), restorer: u64_le(b, 16).unwrap_or(0), mask: u64_le(b, 24).unwrap_or(0) })
}

fn encode_action(a: &Action) -> [u8; SIGACTION_SIZE] {
    let mut out = [0u8; SIGACTION_SIZE];
    for (c, w) in out.chunks_exact_mut(8).zip([a.handler, a.flags, a.restorer, a.mask]) {
        c.copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// The default action: `SIG_DFL`, no flags, nothing masked.
/// The signals whose action may differ from the default in process `ctx.pid()`: those
/// `/proc/PID/status` lists as caught or ignored, and SIGCHLD (whose flags matter even
/// with the default handler). Every signal when the status cannot be read. Each signal
/// asked for or set costs an injected call: a process usually has a handful.
fn maybe_set(ctx: &mut ContextRef<'_>) -> u64 {
    let all = u64::MAX;
    let Ok(text) = util::proc_text(ctx, "status") else { return all };
    let mask = |key: &str| {
        text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    match (mask("SigCgt:"), mask("SigIgn:")) {
        (Some(caught), Some(ignored)) => caught | ignored | 1 << (libc::SIGCHLD - 1),
        _ => all,
    }
}

/// Whether bit `sig - 1` of `mask` is set.
fn in_mask(mask: u64, sig: i32) -> bool {
    mask & (1u64 << (sig - 1)) != 0
}

fn is_default(a: &Action) -> bool {
    a.handler == 0 && a.flags == 0 && a.mask == 0
}

fn check_actions(a: &Actions) -> Result<(), String> {
    if a.version != FORMAT_VERSION {
        return Err(format!("`sigactions` record of format {}, this plugin reads {FORMAT_VERSION}", a.version));
    }
    let mut seen = 0u64;
    for act in &a.actions {
        if !settable(act.sig) {
            return Err(format!("the image has an action for signal {}", act.sig));
        }
        let bit = 1u64 << (act.sig - 1);
        if seen & bit != 0 {
            return Err(format!("the image has two actions for signal {}", act.sig));
        }
        seen |= bit;
    }
    Ok(())
}

/// A checked siginfo: its signal and the 128 bytes.
fn check_siginfo(s: &SigInfo, whose: &str) -> Result<(i32, Vec<u8>), String> {
    if !(1..=NSIG).contains(&s.sig) {
        return Err(format!("{whose}: pending signal {}", s.sig));
    }
    let info = from_hex(&s.info, &format!("{whose}: siginfo of signal {}", s.sig), SIGINFO_SIZE, true)?;
    let signo = i32_at(&info, 0);
    if signo != s.sig {
        return Err(format!("{whose}: siginfo of signal {signo} filed under signal {}", s.sig));
    }
    Ok((s.sig, info))
}

/// Splits what `peek_siginfo` answered into siginfos.
fn split_siginfo(bytes: &[u8], whose: &str) -> Result<Vec<SigInfo>, String> {
    if !bytes.chunks_exact(SIGINFO_SIZE).remainder().is_empty() {
        return Err(format!("{whose}: {} bytes of pending siginfo, not a multiple of {SIGINFO_SIZE}", bytes.len()));
    }
    bytes
        .chunks_exact(SIGINFO_SIZE)
        .map(|c| {
            let sig = i32_at(c, 0);
            if !(1..=NSIG).contains(&sig) {
                return Err(format!("{whose}: pending siginfo of signal {sig}"));
            }
            Ok(SigInfo { sig, info: to_hex(c) })
        })
        .collect()
}

fn check_pending(p: &Pending) -> Result<(), String> {
    if p.version != FORMAT_VERSION {
        return Err(format!("`pending` record of format {}, this plugin reads {FORMAT_VERSION}", p.version));
    }
    if p.threads.is_empty() || p.threads.len() > MAX_THREADS {
        return Err(format!("`pending` record of {} threads", p.threads.len()));
    }
    if p.shared.len() > MAX_PENDING {
        return Err(format!("{} signals pending for the process", p.shared.len()));
    }
    for t in &p.threads {
        if t.pending.len() > MAX_PENDING {
            return Err(format!("{} signals pending for thread {}", t.pending.len(), t.tid));
        }
    }
    Ok(())
}

fn decode_itimer(which: i32, b: &[u8]) -> Itimer {
    let i = |o: usize| u64_le(b, o).unwrap_or(0) as i64;
    Itimer { which, interval_sec: i(0), interval_usec: i(8), value_sec: i(16), value_usec: i(24) }
}

fn encode_itimer(t: &Itimer) -> [u8; ITIMERVAL_SIZE] {
    let mut out = [0u8; ITIMERVAL_SIZE];
    for (c, w) in out.chunks_exact_mut(8).zip([t.interval_sec, t.interval_usec, t.value_sec, t.value_usec]) {
        c.copy_from_slice(&w.to_le_bytes());
    }
    out
}

fn check_itimers(t: &Itimers) -> Result<(), String> {
    if t.version != FORMAT_VERSION {
        return Err(format!("`itimers` record of format {}, this plugin reads {FORMAT_VERSION}", t.version));
    }
    if t.timers.len() > ITIMERS.len() {
        return Err(format!("`itimers` record of {} timers", t.timers.len()));
    }
    let mut seen = [false; 3];
    for x in &t.timers {
        let slot = usize::try_from(x.which)
            .ok()
            .and_then(|w| seen.get_mut(w))
            .ok_or_else(|| format!("interval timer {}", x.which))?;
        if std::mem::replace(slot, true) {
            return Err(format!("interval timer {} given twice", x.which));
        }
        let usec_ok = |u: i64| (0..1_000_000).contains(&u);
        if x.interval_sec < 0 || x.value_sec < 0 || !usec_ok(x.interval_usec) || !usec_ok(x.value_usec) {
            return Err(format!("interval timer {}: bad time {x:?}", x.which));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// The plugin
// ---------------------------------------------------------------------------------

fn peek(ctx: &mut ContextRef<'_>, tid: i32, shared: bool) -> Result<Vec<SigInfo>, String> {
    let whose = if shared { format!("process {}", ctx.pid()) } else { format!("thread {tid}") };
    let bytes = ctx
        .peek_siginfo(tid, shared)
        .into_result()
        .map_err(|e| format!("{whose}: reading pending signals: {}", err_text(e)))?;
    split_siginfo(&bytes, &whose)
}

#[derive(Default)]
struct Plugin {
    /// Steps done of the checkpoint or the restart (actions, pending, itimers).
    step: u32,
    status: Status,
    notes: Vec<String>,
}

impl Plugin {
    fn note(&mut self, text: String) {
        eprintln!("ferry: signals: {text}");
        self.notes.push(text);
    }

    fn checkpoint_actions(&mut self, ctx: &mut ContextRef<'_>) -> Result<Actions, String> {
        let pid = ctx.pid();
        let mut scratch = Scratch::new(ctx);
        let at = scratch.alloc(SIGACTION_SIZE as u64)?;
        let mut actions = Vec::new();
        let asked = maybe_set(ctx);
        for sig in (1..=NSIG).filter(|&s| settable(s) && in_mask(asked, s)) {
            util::syscall(ctx, pid, &format!("rt_sigaction({sig})"), libc::SYS_rt_sigaction, [sig as u64, 0, at, 8, 0, 0])?;
            let b = util::read_memory(ctx, at, SIGACTION_SIZE).map_err(|e| format!("signal {sig}: reading its action: {e}"))?;
            let a = decode_action(sig, &b)?;
            if !is_default(&a) {
                actions.push(a);
            }
        }
        Ok(Actions { version: FORMAT_VERSION, actions })
    }

    fn checkpoint_pending(&mut self, ctx: &mut ContextRef<'_>) -> Result<Pending, String> {
        let pid = ctx.pid();
        let shared = peek(ctx, pid, true)?;
        let mut threads = Vec::new();
        for tid in ctx.tids().into_vec() {
            let pending = peek(ctx, tid, false)?;
            threads.push(ThreadPending { tid, fs_base: fs_base(ctx, tid)?, pending });
        }
        Ok(Pending { version: FORMAT_VERSION, shared, threads })
    }

    fn checkpoint_itimers(&mut self, ctx: &mut ContextRef<'_>) -> Result<Itimers, String> {
        let pid = ctx.pid();
        let mut scratch = Scratch::new(ctx);
        let at = scratch.alloc(ITIMERVAL_SIZE as u64)?;
        let mut timers = Vec::new();
        for (which, name) in ITIMERS {
            util::syscall(ctx, pid, &format!("getitimer({name})"), libc::SYS_getitimer, [which as u64, at, 0, 0, 0, 0])?;
            let b = util::read_memory(ctx, at, ITIMERVAL_SIZE).map_err(|e| format!("{name}: reading it back: {e}"))?;
            timers.push(decode_itimer(which, &b));
        }
        Ok(Itimers { version: FORMAT_VERSION, timers })
    }

    fn restart_actions(&mut self, ctx: &mut ContextRef<'_>, a: &Actions) -> Result<(), String> {
        check_actions(a)?;
        let pid = ctx.pid();
        let mut scratch = Scratch::new(ctx);
        let at = scratch.alloc(SIGACTION_SIZE as u64)?;
        // What the child has set (it inherits ferry's own dispositions), and what the
        // image sets: everything else is at its default already.
        let set_here = maybe_set(ctx);
        let wanted = |sig: i32| in_mask(set_here, sig) || a.actions.iter().any(|x| x.sig == sig);
        for sig in (1..=NSIG).filter(|&s| settable(s) && wanted(s)) {
            let act = a.actions.iter().find(|x| x.sig == sig).copied().unwrap_or(Action {
                sig,
                handler: 0,
                flags: 0,
                restorer: 0,
                mask: 0,
            });
            util::write_memory(ctx, at, &encode_action(&act)).map_err(|e| format!("signal {sig}: {e}"))?;
            util::syscall(ctx, pid, &format!("rt_sigaction({sig})"), libc::SYS_rt_sigaction, [sig as u64, at, 0, 8, 0, 0])?;
        }
        self.status.entities_done += a.actions.len() as u64;
        Ok(())
    }

    fn restart_pending(&mut self, ctx: &mut ContextRef<'_>, p: &Pending) -> Result<(), String> {
        check_pending(p)?;
        let pid = ctx.pid();
        let image: Vec<(i32, u64)> = p.threads.iter().map(|t| (t.tid, t.fs_base)).collect();
        let mut live = Vec::new();
        for tid in ctx.tids().into_vec() {
            live.push((tid, fs_base(ctx, tid)?));
        }
        let (new_tids, how) = map_threads(&image, &live)?;
        let moved = image.iter().zip(&new_tids).skip(1).any(|(i, n)| i.0 != *n);
        if how != Matched::TlsBase && moved && p.threads.iter().skip(1).any(|t| !t.pending.is_empty()) {
            self.note(format!("threads matched by {how:?} for their pending signals"));
        }

        let mut scratch = Scratch::new(ctx);
        let at = scratch.alloc(SIGINFO_SIZE as u64)?;
        let whose = format!("process {pid}");
        for s in &p.shared {
            let (sig, info) = check_siginfo(s, &whose)?;
            util::write_memory(ctx, at, &info).map_err(|e| format!("{whose}: signal {sig}: {e}"))?;
            util::syscall(ctx, pid, &format!("rt_sigqueueinfo of signal {sig} to process {pid}"), libc::SYS_rt_sigqueueinfo, [
                pid as u64, sig as u64, at, 0, 0, 0,
            ])?;
            self.status.entities_done += 1;
        }
        for (t, &tid) in p.threads.iter().zip(&new_tids) {
            let whose = if t.tid == tid { format!("thread {tid}") } else { format!("thread {tid} (thread {} of the image)", t.tid) };
            for s in &t.pending {
                let (sig, info) = check_siginfo(s, &whose)?;
                util::write_memory(ctx, at, &info).map_err(|e| format!("{whose}: signal {sig}: {e}"))?;
                // From the thread itself: the kernel lets a thread queue a signal with a
                // kernel's si_code (a SIGTRAP's TRAP_TRACE, say) or SI_TKILL to itself
                // only, and refuses it from a sibling (EPERM).
                util::syscall(ctx, tid, &format!("rt_tgsigqueueinfo of signal {sig} to {whose}"), libc::SYS_rt_tgsigqueueinfo, [
                    pid as u64, tid as u64, sig as u64, at, 0, 0,
                ])?;
                self.status.entities_done += 1;
            }
        }
        Ok(())
    }

    fn restart_itimers(&mut self, ctx: &mut ContextRef<'_>, t: &Itimers) -> Result<(), String> {
        check_itimers(t)?;
        let pid = ctx.pid();
        let mut scratch = Scratch::new(ctx);
        let at = scratch.alloc(ITIMERVAL_SIZE as u64)?;
        for (which, name) in ITIMERS {
            let timer = t.timers.iter().find(|x| x.which == which).copied().unwrap_or(Itimer {
                which,
                interval_sec: 0,
                interval_usec: 0,
                value_sec: 0,
                value_usec: 0,
            });
            util::write_memory(ctx, at, &encode_itimer(&timer)).map_err(|e| format!("{name}: {e}"))?;
            util::syscall(ctx, pid, &format!("setitimer({name})"), libc::SYS_setitimer, [which as u64, at, 0, 0, 0, 0])?;
            self.status.entities_done += 1;
        }
        Ok(())
    }
}

fn read<T: serde::de::DeserializeOwned>(source: &mut SourceRef<'_>, kind: &str, status: &mut Status) -> Result<T, String> {
    let rec = util::next_record(source)?.ok_or_else(|| format!("the image has no `{kind}` record"))?;
    status.bytes_done += rec.payload.len() as u64;
    util::parse_json(&rec, kind)
}

impl SubsystemPlugin for Plugin {
    fn info(&self) -> SubsystemInfo {
        SubsystemInfo {
            entity_kinds: names(&["sigaction", "pending-signal", "itimer"]),
            after: names(&["memory", "files", "threads"]),
            shared_resources: names(&[]),
        }
    }

    fn checkpoint(&mut self, ctx: &mut ContextRef<'_>, sink: &mut SinkRef<'_>) -> Result<Progress, String> {
        let bytes = match self.step {
            0 => {
                let a = self.checkpoint_actions(ctx)?;
                self.status.entities_total += a.actions.len() as u64;
                util::put_json(sink, "sigactions", &a)?;
                serde_json::to_vec(&a).map(|v| v.len()).unwrap_or(0)
            }
            1 => {
                let p = self.checkpoint_pending(ctx)?;
                self.status.entities_total += (p.shared.len() + p.threads.iter().map(|t| t.pending.len()).sum::<usize>()) as u64;
                util::put_json(sink, "pending", &p)?;
                serde_json::to_vec(&p).map(|v| v.len()).unwrap_or(0)
            }
            2 => {
                let t = self.checkpoint_itimers(ctx)?;
                self.status.entities_total += t.timers.len() as u64;
                util::put_json(sink, "itimers", &t)?;
                serde_json::to_vec(&t).map(|v| v.len()).unwrap_or(0)
            }
            _ => return Ok(Progress::Done),
        };
        self.status.bytes_done += bytes as u64;
        self.status.entities_done = self.status.entities_total;
        self.step += 1;
        Ok(if self.step == 3 { Progress::Done } else { Progress::More })
    }

    fn restart(&mut self, ctx: &mut ContextRef<'_>, source: &mut SourceRef<'_>) -> Result<Progress, String> {
        match self.step {
            0 => {
                let a: Actions = read(source, "sigactions", &mut self.status)?;
                self.status.entities_total += a.actions.len() as u64;
                self.restart_actions(ctx, &a)?;
            }
            1 => {
                let p: Pending = read(source, "pending", &mut self.status)?;
                self.status.entities_total +=
                    (p.shared.len() + p.threads.iter().map(|t| t.pending.len()).sum::<usize>()) as u64;
                self.restart_pending(ctx, &p)?;
            }
            2 => {
                let t: Itimers = read(source, "itimers", &mut self.status)?;
                self.status.entities_total += ITIMERS.len() as u64;
                self.restart_itimers(ctx, &t)?;
                if let Some(extra) = util::next_record(source)? {
                    return Err(format!("unexpected `{}` record after the interval timers", extra.kind));
                }
            }
            _ => return Ok(Progress::Done),
        }
        self.step += 1;
        Ok(if self.step == 3 { Progress::Done } else { Progress::More })
    }

    fn status(&self) -> Status {
        self.status
    }

    fn dump(&self, error: &PluginError) -> String {
        let step = ["sigactions", "pending signals", "interval timers", "(done)"];
        let mut s = format!("{}\nsignals: failed at: {}", error.message, step.get(self.step as usize).unwrap_or(&"?"));
        for n in &self.notes {
            s += &format!("\nsignals: {n}");
        }
        s
    }
}

ferry_plugin_api::export_subsystem!("signals", "Signal actions, masks, pending signals, itimers", Plugin::default);

#[cfg(test)]
mod tests {
    use ferry_plugin_api::testing::MockMemory;
    use ferry_plugin_api::abi_stable::std_types::RVec;
    use super::*;
    use ferry_plugin_api::util::{FS_BASE, NT_PRSTATUS, REGS_SIZE};
    use ferry_plugin_api::{
        abi_stable::std_types::{RResult, RSlice, RSliceMut},
        MemRange, ProcessContext, SyscallArgs,
    };
    use std::collections::HashMap;

    const BASE: u64 = 0x10000;
    const SCRATCH: u64 = 0x10000;

    /// A process that answers as the kernel would, and records what it was asked.
    #[derive(Default)]
    struct Mock {
        pid: i32,
        tids: Vec<i32>,
        fs_base: HashMap<i32, u64>,
        mem: MockMemory,
        actions: HashMap<i32, [u8; 32]>,
        pending: HashMap<(i32, bool), Vec<u8>>,
        itimers: [[u8; 32]; 3],
        /// (tid the call ran in, target tid or 0 for the process, sig, siginfo)
        queued: Vec<(i32, i32, i32, Vec<u8>)>,
        sigaction_calls: usize,
    }

    impl Mock {
        fn new(pid: i32, threads: &[(i32, u64)]) -> Mock {
            Mock {
                pid,
                tids: threads.iter().map(|t| t.0).collect(),
                fs_base: threads.iter().copied().collect(),
                mem: MockMemory::new(BASE, SCRATCH as usize),
                ..Mock::default()
            }
        }
        fn get(&self, addr: u64, len: usize) -> Vec<u8> {
            self.mem.get(addr, len)
        }
        fn put(&mut self, addr: u64, data: &[u8]) {
            self.mem.put(addr, data)
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
            let a = args.0;
            let sig = a[0] as i32;
            let r = match nr {
                libc::SYS_rt_sigaction => {
                    if !settable(sig) || a[3] != 8 {
                        return RResult::ROk(-(libc::EINVAL as i64));
                    }
                    self.sigaction_calls += 1;
                    if a[2] != 0 {
                        let cur = self.actions.get(&sig).copied().unwrap_or([0; 32]);
                        self.put(a[2], &cur);
                    }
                    if a[1] != 0 {
                        let new: [u8; 32] = self.get(a[1], 32).try_into().unwrap();
                        self.actions.insert(sig, new);
                    }
                    0
                }
                libc::SYS_getitimer => {
                    let t = self.itimers[a[0] as usize];
                    self.put(a[1], &t);
                    0
                }
                libc::SYS_setitimer => {
                    self.itimers[a[0] as usize] = self.get(a[1], 32).try_into().unwrap();
                    0
                }
                libc::SYS_rt_sigqueueinfo => {
                    assert_eq!(a[0], self.pid as u64);
                    let info = self.get(a[2], 128);
                    self.queued.push((tid, 0, a[1] as i32, info));
                    0
                }
                libc::SYS_rt_tgsigqueueinfo => {
                    assert_eq!(a[0], self.pid as u64);
                    if !self.tids.contains(&(a[1] as i32)) {
                        return RResult::ROk(-(libc::ESRCH as i64));
                    }
                    let info = self.get(a[3], 128);
                    // The kernel's rule: a kernel's si_code or SI_TKILL only to oneself.
                    let code = i32::from_le_bytes([info[8], info[9], info[10], info[11]]);
                    if (code >= 0 || code == -6) && tid != a[1] as i32 {
                        return RResult::ROk(-(libc::EPERM as i64));
                    }
                    self.queued.push((tid, a[1] as i32, a[2] as i32, info));
                    0
                }
                _ => -(libc::ENOSYS as i64),
            };
            RResult::ROk(r)
        }
        fn get_regset(&mut self, tid: i32, regset: u32) -> RResult<RVec<u8>, PluginError> {
            assert_eq!(regset, NT_PRSTATUS);
            let Some(&base) = self.fs_base.get(&tid) else { return fail("no such thread") };
            let mut regs = vec![0u8; REGS_SIZE];
            regs[FS_BASE * 8..FS_BASE * 8 + 8].copy_from_slice(&base.to_le_bytes());
            RResult::ROk(regs.into())
        }
        fn peek_siginfo(&mut self, tid: i32, shared: bool) -> RResult<RVec<u8>, PluginError> {
            let key = (if shared { self.pid } else { tid }, shared);
            RResult::ROk(self.pending.get(&key).cloned().unwrap_or_default().into())
        }
    }

    use ferry_plugin_api::testing::{self, Records};

    fn run_checkpoint(mock: &mut Mock) -> Result<Records, String> {
        testing::run_checkpoint(&mut Plugin::default(), mock, 10)
    }

    fn run_restart(mock: &mut Mock, records: Records) -> Result<Plugin, String> {
        let mut plugin = Plugin::default();
        testing::run_restart(&mut plugin, mock, records, 10)?;
        Ok(plugin)
    }

    fn checkpointed() -> Records {
        let mut m = Mock::new(10, &[(10, 0xa0), (11, 0xb0), (12, 0xc0)]);
        let usr1 = Action { sig: 10, handler: 0x401000, flags: 0x1c000004, restorer: 0x7f0000001000, mask: 1 << 11 };
        m.actions.insert(10, encode_action(&usr1));
        m.actions.insert(1, encode_action(&Action { sig: 1, handler: 1, flags: 0, restorer: 0, mask: 0 }));
        m.pending.insert((10, true), [siginfo(34, -1), siginfo(34, -1)].concat());
        m.pending.insert((11, false), siginfo(35, -6));
        m.pending.insert((12, false), [siginfo(12, 0), siginfo(36, -1)].concat());
        m.itimers[0] = encode_itimer(&Itimer { which: 0, interval_sec: 3600, interval_usec: 0, value_sec: 3599, value_usec: 5 });
        run_checkpoint(&mut m).unwrap()
    }

    #[test]
    fn checkpoint_then_restart_through_the_plugin() {
        let records = checkpointed();
        let kinds: Vec<&str> = records.0.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(kinds, ["sigactions", "pending", "itimers"]);
        let a: Actions = serde_json::from_slice(&records.0[0].payload).unwrap();
        assert_eq!(a.actions.iter().map(|x| x.sig).collect::<Vec<_>>(), [1, 10], "only non-default actions");

        // Restored with new tids for the threads, listed in another order; the child
        // starts with a SIGPIPE action of its own, which must not survive.
        let mut m = Mock::new(50, &[(50, 0xa0), (61, 0xc0), (60, 0xb0)]);
        m.actions.insert(13, encode_action(&Action { sig: 13, handler: 1, flags: 0, restorer: 0, mask: 0 }));
        run_restart(&mut m, records).unwrap();
        assert_eq!(m.sigaction_calls, 62, "every signal but SIGKILL and SIGSTOP is set");
        assert_eq!(decode_action(10, &m.actions[&10]).unwrap().handler, 0x401000);
        assert_eq!(decode_action(1, &m.actions[&1]).unwrap().handler, 1);
        assert!(is_default(&decode_action(13, &m.actions[&13]).unwrap()));
        let q: Vec<(i32, i32, i32)> = m.queued.iter().map(|x| (x.0, x.1, x.2)).collect();
        assert_eq!(q, [(50, 0, 34), (50, 0, 34), (60, 60, 35), (61, 61, 12), (61, 61, 36)], "each thread's from itself");
        assert_eq!(m.queued[2].3, siginfo(35, -6), "the siginfo is queued as it was");
        assert_eq!(decode_itimer(0, &m.itimers[0]).value_usec, 5);
    }

    #[test]
    fn a_restart_refuses_bad_records() {
        let restart = |f: &dyn Fn(&mut Records)| {
            let mut r = checkpointed();
            f(&mut r);
            run_restart(&mut Mock::new(50, &[(50, 0xa0), (60, 0xb0), (61, 0xc0)]), r).err().unwrap_or_default()
        };
        let e = restart(&|r| {
            let mut a: Actions = serde_json::from_slice(&r.0[0].payload).unwrap();
            a.actions[0].sig = 9;
            r.0[0].payload = serde_json::to_vec(&a).unwrap().into();
        });
        assert!(e.contains("action for signal 9"), "{e}");
        let e = restart(&|r| {
            let mut p: Pending = serde_json::from_slice(&r.0[1].payload).unwrap();
            p.threads[1].pending[0].info.truncate(20);
            r.0[1].payload = serde_json::to_vec(&p).unwrap().into();
        });
        assert!(e.contains("thread 60 (thread 11 of the image)") && e.contains("hex digits"), "{e}");
        let e = restart(&|r| {
            let mut p: Pending = serde_json::from_slice(&r.0[1].payload).unwrap();
            p.threads.pop();
            r.0[1].payload = serde_json::to_vec(&p).unwrap().into();
        });
        assert!(e.contains("the image has 2 threads, the restore child 3"), "{e}");
        let e = restart(&|r| {
            r.0.swap(1, 2);
        });
        assert!(e.contains("expected a `pending` record"), "{e}");
        let e = restart(&|r| {
            r.0.truncate(2);
        });
        assert!(e.contains("no `itimers` record"), "{e}");
        let e = restart(&|r| {
            r.0[2].payload = b"{\"version\":1,\"timers\":[{\"which\":7}]}".to_vec().into();
        });
        assert!(e.contains("itimers"), "{e}");
    }

    #[test]
    fn fs_base_index_matches_the_kernel_struct() {
        assert_eq!(std::mem::offset_of!(libc::user_regs_struct, fs_base), FS_BASE * 8);
    }

    #[test]
    fn actions_round_trip_and_defaults_are_recognised() {
        let a = Action { sig: 10, handler: 0x401000, flags: 0x1c000004, restorer: 0x7f00_0000_1000, mask: 1 << 11 };
        assert_eq!(decode_action(10, &encode_action(&a)).unwrap(), a);
        assert!(decode_action(10, &[0u8; 31]).is_err());
        assert!(is_default(&Action { sig: 1, handler: 0, flags: 0, restorer: 0, mask: 0 }));
        // SIG_IGN is not the default.
        assert!(!is_default(&Action { sig: 13, handler: 1, flags: 0, restorer: 0, mask: 0 }));
        assert!(!is_default(&Action { sig: 13, handler: 0, flags: 0x4000000, restorer: 0, mask: 0 }));
    }

    #[test]
    fn action_records_are_checked() {
        let act = |sig| Action { sig, handler: 1, flags: 0, restorer: 0, mask: 0 };
        assert!(check_actions(&Actions { version: 1, actions: vec![act(1), act(64)] }).is_ok());
        assert!(check_actions(&Actions { version: 2, actions: vec![] }).is_err());
        for bad in [0, 9, 19, 65, -3] {
            assert!(check_actions(&Actions { version: 1, actions: vec![act(bad)] }).is_err(), "signal {bad}");
        }
        assert!(check_actions(&Actions { version: 1, actions: vec![act(10), act(10)] }).unwrap_err().contains("two"));
    }

    fn siginfo(sig: i32, code: i32) -> Vec<u8> {
        let mut b = vec![0u8; SIGINFO_SIZE];
        b[0..4].copy_from_slice(&sig.to_le_bytes());
        b[8..12].copy_from_slice(&code.to_le_bytes());
        b[16..20].copy_from_slice(&4242i32.to_le_bytes());
        b
    }

    #[test]
    fn siginfo_is_split_and_checked() {
        let mut bytes = siginfo(12, -6);
        bytes.extend(siginfo(34, -1));
        let v = split_siginfo(&bytes, "thread 5").unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].sig, v[1].sig), (12, 34));
        let (sig, info) = check_siginfo(&v[1], "thread 5").unwrap();
        assert_eq!((sig, info), (34, siginfo(34, -1)));
        assert!(split_siginfo(&bytes[..200], "thread 5").unwrap_err().contains("multiple"));
        assert!(split_siginfo(&siginfo(0, 0), "thread 5").is_err());
        assert!(split_siginfo(&[], "t").unwrap().is_empty());
        // A siginfo filed under another signal, a short one, a bad digit.
        let mut wrong = v[0].clone();
        wrong.sig = 13;
        assert!(check_siginfo(&wrong, "t").unwrap_err().contains("filed under"));
        let short = SigInfo { sig: 12, info: v[0].info[..254].into() };
        assert!(check_siginfo(&short, "t").unwrap_err().contains("hex digits"));
        let mut bad = v[0].clone();
        bad.info.replace_range(10..11, "g");
        assert!(check_siginfo(&bad, "t").unwrap_err().contains("not a hex digit"));
        assert!(check_siginfo(&SigInfo { sig: 65, info: v[0].info.clone() }, "t").is_err());
    }

    #[test]
    fn itimers_round_trip_and_are_checked() {
        let t = Itimer { which: 0, interval_sec: 3600, interval_usec: 0, value_sec: 3599, value_usec: 999_999 };
        assert_eq!(decode_itimer(0, &encode_itimer(&t)), t);
        assert!(check_itimers(&Itimers { version: 1, timers: vec![t] }).is_ok());
        assert!(check_itimers(&Itimers { version: 1, timers: vec![t, t] }).unwrap_err().contains("twice"));
        assert!(check_itimers(&Itimers { version: 1, timers: vec![Itimer { which: 3, ..t }] }).is_err());
        assert!(check_itimers(&Itimers { version: 1, timers: vec![Itimer { which: -1, ..t }] }).is_err());
        assert!(check_itimers(&Itimers { version: 1, timers: vec![Itimer { value_usec: 1_000_000, ..t }] }).is_err());
        assert!(check_itimers(&Itimers { version: 1, timers: vec![Itimer { interval_sec: -1, ..t }] }).is_err());
        assert!(check_itimers(&Itimers { version: 9, timers: vec![] }).is_err());
    }

    #[test]
    fn pending_records_are_checked() {
        let t = ThreadPending { tid: 5, fs_base: 0, pending: vec![] };
        assert!(check_pending(&Pending { version: 1, shared: vec![], threads: vec![t.clone()] }).is_ok());
        assert!(check_pending(&Pending { version: 1, shared: vec![], threads: vec![] }).is_err());
        assert!(check_pending(&Pending { version: 0, shared: vec![], threads: vec![t] }).is_err());
    }


}
