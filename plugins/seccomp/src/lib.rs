//! The `seccomp` subsystem plugin: every thread's seccomp filters (classic BPF
//! programs, the first installed first, with the `LOG` flag the kernel reports), and
//! which of them the threads share.
//!
//! Checkpoint reads them with `PTRACE_SECCOMP_GET_FILTER` through the process context;
//! it injects nothing. While ferry holds a process its filters are suspended
//! (`PTRACE_O_SUSPEND_SECCOMP`, see the framework's tracer), so no injected call of
//! ferry's meets them, on the source or in the restore child. Restart installs them by
//! injected `seccomp(SECCOMP_SET_MODE_FILTER)` calls after the other plugins and
//! before `creds` (which runs after every plugin and drops the privileges: the
//! restore child, still root, may install a filter without `no_new_privs`); they take
//! effect when ferry lets the process go, before any of its code runs.
//!
//! Sharing: the kernel tells no filter's identity (no `kcmp` type), so filters are
//! compared by program and flags. The filters every thread has in common (inherited
//! from before the threads were made, or installed with `TSYNC`) are installed once
//! with `SECCOMP_FILTER_FLAG_TSYNC`, shared again; the rest one thread at a time. A
//! filter that some threads share and others lack cannot be made shared again (TSYNC
//! reaches every thread) and is refused, as are filters that hand calls to a user-space
//! supervisor (`SECCOMP_RET_USER_NOTIF`: its listener fd is another process's).
//! `SECCOMP_FILTER_FLAG_SPEC_ALLOW` is inferred: a thread the kernel did not force into
//! speculative store bypass mitigation gets its filters with it.
//!
//! One record, `seccomp` (JSON, see [`Image`]).

use ferry_plugin_api::{
    plugin::SubsystemPlugin,
    util::{self, fs_base, map_threads, names, proc_field, Scratch},
    ContextRef, PluginError, Progress, SinkRef, SourceRef, Status, SubsystemInfo,
};
use serde::{Deserialize, Serialize};

const FORMAT_VERSION: u32 = 1;

// linux/seccomp.h.
const SECCOMP_SET_MODE_FILTER: u64 = 1;
const FLAG_TSYNC: u64 = 1;
const FLAG_LOG: u64 = 2;
const FLAG_SPEC_ALLOW: u64 = 4;
const RET_ACTION_FULL: u32 = 0xffff_0000;
const RET_USER_NOTIF: u32 = 0x7fc0_0000;
// linux/bpf_common.h: BPF_RET | BPF_K, BPF_RET | BPF_A.
const RET_K: u16 = 0x06;
const RET_A: u16 = 0x16;
/// BPF_MAXINSNS.
const MAX_INSNS: usize = 4096;
/// What `/proc/PID/status` says of a thread the kernel forced into speculative store
/// bypass mitigation when it installed a filter without `SPEC_ALLOW`.
const FORCED: &str = "force mitigated";

// ---------------------------------------------------------------------------------
// The record
// ---------------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// The program: 8-byte `struct sock_filter`s, hex.
    pub program: String,
    /// `SECCOMP_FILTER_FLAG_LOG` or 0.
    pub flags: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Thread {
    /// The thread's id in the image, the main thread first.
    pub tid: i32,
    /// Its TLS base: finds it again when restored under another tid.
    pub fs_base: u64,
    /// The first installed first.
    pub filters: Vec<Filter>,
    /// Its `Speculation_Store_Bypass:` line, where the kernel has one.
    #[serde(default)]
    pub speculation: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub version: u32,
    /// Every thread, with or without filters.
    pub threads: Vec<Thread>,
}

// ---------------------------------------------------------------------------------
// Pure parts
// ---------------------------------------------------------------------------------

/// Refuses a program the kernel would not take back or ferry cannot carry.
fn check_program(program: &[u8]) -> Result<(), String> {
    if program.is_empty() || !program.len().is_multiple_of(8) || program.len() / 8 > MAX_INSNS {
        return Err(format!("a program of {} bytes is not 1 to {MAX_INSNS} instructions", program.len()));
    }
    for (i, insn) in program.chunks_exact(8).enumerate() {
        let code = u16::from_le_bytes([insn[0], insn[1]]);
        let k = u32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
        if code == RET_K && k & RET_ACTION_FULL == RET_USER_NOTIF {
            return Err(format!(
                "instruction {i} hands calls to a user-space supervisor (SECCOMP_RET_USER_NOTIF), whose listener ferry cannot carry"
            ));
        }
        if code == RET_A {
            return Err(format!(
                "instruction {i} returns a computed action, which could hand calls to a user-space supervisor (SECCOMP_RET_USER_NOTIF) ferry cannot carry"
            ));
        }
    }
    Ok(())
}

/// How many filters every thread has in common (installed once, shared by TSYNC).
/// Refuses a filter past them that two threads share: only a TSYNC, which reaches
/// every thread, could share it again.
fn shared_prefix(threads: &[Thread]) -> Result<usize, String> {
    let Some(first) = threads.first() else { return Ok(0) };
    let common = threads
        .iter()
        .map(|t| t.filters.iter().zip(&first.filters).take_while(|(a, b)| a == b).count())
        .min()
        .unwrap_or(0);
    for (i, a) in threads.iter().enumerate() {
        for b in &threads[i + 1..] {
            if let (Some(fa), Some(fb)) = (a.filters.get(common), b.filters.get(common)) {
                if fa == fb {
                    return Err(format!(
                        "threads {} and {} share seccomp filter {common}, which other threads lack: ferry rebuilds a filter \
                         every thread shares (TSYNC) or one thread holds, not one some threads share",
                        a.tid, b.tid
                    ));
                }
            }
        }
    }
    Ok(common)
}

/// The plugin's one record read and checked, as a restart does before it touches the
/// process; also the fuzz target `plugin_seccomp`'s entry point.
pub fn decode(source: &mut SourceRef<'_>) -> Result<Image, String> {
    let image: Image = util::only_json(source, "seccomp")?;
    check(&image)?;
    Ok(image)
}

fn check(image: &Image) -> Result<(), String> {
    if image.version != FORMAT_VERSION {
        return Err(format!("seccomp record version {}, this plugin reads {FORMAT_VERSION}", image.version));
    }
    if image.threads.is_empty() {
        return Err("the seccomp record lists no thread".into());
    }
    for t in &image.threads {
        for (n, f) in t.filters.iter().enumerate() {
            if f.flags & !FLAG_LOG != 0 {
                return Err(format!("thread {} seccomp filter {n}: flags {:#x}, of which only LOG is carried", t.tid, f.flags));
            }
            let program = util::from_hex(&f.program, "a seccomp program", MAX_INSNS * 8, false)?;
            check_program(&program).map_err(|e| format!("thread {} seccomp filter {n}: {e}", t.tid))?;
        }
    }
    shared_prefix(&image.threads).map(|_| ())
}

fn spec_allow(t: &Thread) -> u64 {
    match &t.speculation {
        Some(line) if line.contains(FORCED) => 0,
        _ => FLAG_SPEC_ALLOW,
    }
}

// ---------------------------------------------------------------------------------
// The plugin
// ---------------------------------------------------------------------------------

#[derive(Default)]
struct Plugin {
    status: Status,
    doing: String,
}

/// Thread `tid`'s filters as the process context reads them.
fn filters_of(ctx: &mut ContextRef<'_>, tid: i32) -> Result<Vec<Filter>, String> {
    let pid = ctx.pid();
    let got = ctx
        .seccomp_filters(tid)
        .into_result()
        .map_err(|e| format!("process {pid} thread {tid}: reading its seccomp filters: {}", util::err_text(e)))?;
    Ok(got.into_iter().map(|f| Filter { program: util::to_hex(&f.program), flags: f.flags }).collect())
}

/// Thread `tid`'s `Seccomp:`, `Seccomp_filters:` and `Speculation_Store_Bypass:` lines.
fn status_of(ctx: &mut ContextRef<'_>, tid: i32) -> Result<(u32, Option<usize>, Option<String>), String> {
    let pid = ctx.pid();
    let text = util::proc_text(ctx, &format!("task/{tid}/status"))?;
    let mode = proc_field(&text, "Seccomp")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("process {pid} thread {tid}: no Seccomp line in its status"))?;
    let count = proc_field(&text, "Seccomp_filters").and_then(|v| v.parse().ok());
    Ok((mode, count, proc_field(&text, "Speculation_Store_Bypass").map(str::to_string)))
}

impl Plugin {
    fn capture(&mut self, ctx: &mut ContextRef<'_>) -> Result<Image, String> {
        let pid = ctx.pid();
        let mut threads = Vec::new();
        for tid in ctx.tids().into_vec() {
            self.doing = format!("seccomp filters of thread {tid}");
            let (mode, count, speculation) = status_of(ctx, tid)?;
            let filters = match mode {
                0 => Vec::new(),
                2 => filters_of(ctx, tid)?,
                _ => return Err(format!("process {pid} thread {tid} is under seccomp strict mode, which ferry does not carry")),
            };
            if let Some(count) = count.filter(|&c| c != filters.len()) {
                return Err(format!("process {pid} thread {tid}: its status counts {count} seccomp filters, ferry read {}", filters.len()));
            }
            for (n, f) in filters.iter().enumerate() {
                let program = util::from_hex(&f.program, "a seccomp program", MAX_INSNS * 8, false)?;
                check_program(&program).map_err(|e| format!("process {pid} thread {tid} seccomp filter {n}: {e}"))?;
            }
            self.status.entities_total += filters.len() as u64;
            threads.push(Thread { tid, fs_base: fs_base(ctx, tid)?, filters, speculation });
        }
        let image = Image { version: FORMAT_VERSION, threads };
        check(&image).map_err(|e| format!("process {pid}: {e}"))?;
        self.status.entities_done = self.status.entities_total;
        Ok(image)
    }

    fn apply(&mut self, ctx: &mut ContextRef<'_>, image: &Image) -> Result<(), String> {
        check(image)?;
        let pid = ctx.pid();
        if image.threads.iter().all(|t| t.filters.is_empty()) {
            return Ok(());
        }
        let imaged: Vec<(i32, u64)> = image.threads.iter().map(|t| (t.tid, t.fs_base)).collect();
        let mut live = Vec::new();
        for tid in ctx.tids().into_vec() {
            live.push((tid, fs_base(ctx, tid)?));
        }
        let (tids, _) = map_threads(&imaged, &live)?;
        // Also answers whether ferry holds them suspended: if not, the filters would
        // block the calls of the plugins after this one.
        for &tid in &tids {
            let now = filters_of(ctx, tid)?;
            if !now.is_empty() {
                return Err(format!(
                    "process {pid} thread {tid}: the restore child already has {} seccomp filters (is ferry itself under seccomp?)",
                    now.len()
                ));
            }
        }
        let shared = shared_prefix(&image.threads)?;
        self.status.entities_total = (shared + image.threads.iter().map(|t| t.filters.len() - shared).sum::<usize>()) as u64;
        let main = &image.threads[0];
        let sync = if tids.len() > 1 { FLAG_TSYNC } else { 0 };
        for (n, f) in main.filters[..shared].iter().enumerate() {
            self.doing = format!("seccomp filter {n}, shared by every thread");
            self.install(ctx, tids[0], n, f, f.flags | spec_allow(main) | sync)?;
        }
        for (t, &tid) in image.threads.iter().zip(&tids) {
            for (n, f) in t.filters.iter().enumerate().skip(shared) {
                self.doing = format!("seccomp filter {n} of thread {tid}");
                self.install(ctx, tid, n, f, f.flags | spec_allow(t))?;
            }
        }
        // Read it all back: what the kernel did not take exactly fails the restore.
        self.doing = "checking the seccomp filters".into();
        for (t, &tid) in image.threads.iter().zip(&tids) {
            let got = filters_of(ctx, tid)?;
            if let Some(n) = (0..t.filters.len().max(got.len())).find(|&n| t.filters.get(n) != got.get(n)) {
                return Err(format!(
                    "process {pid} thread {tid}: seccomp filter {n} is not the image's after the restore ({} filters, want {})",
                    got.len(),
                    t.filters.len()
                ));
            }
            let (_, _, speculation) = status_of(ctx, tid)?;
            let forced = |s: &Option<String>| s.as_deref().is_some_and(|l| l.contains(FORCED));
            if t.speculation.is_some() && forced(&t.speculation) != forced(&speculation) {
                return Err(format!(
                    "process {pid} thread {tid}: speculative store bypass is {:?} after installing its seccomp filters, want {:?}",
                    speculation.unwrap_or_default(),
                    t.speculation.clone().unwrap_or_default()
                ));
            }
        }
        Ok(())
    }

    /// Installs filter `n` in thread `tid` with `flags` (an injected `seccomp`).
    fn install(&mut self, ctx: &mut ContextRef<'_>, tid: i32, n: usize, f: &Filter, flags: u64) -> Result<(), String> {
        let pid = ctx.pid();
        let program = util::from_hex(&f.program, "a seccomp program", MAX_INSNS * 8, false)?;
        let mut scratch = Scratch::new(ctx);
        let at = scratch.put(ctx, &program)?;
        // struct sock_fprog: u16 len, padding, a pointer to the instructions.
        let mut fprog = [0u8; 16];
        fprog[0..2].copy_from_slice(&((program.len() / 8) as u16).to_le_bytes());
        fprog[8..16].copy_from_slice(&at.to_le_bytes());
        let fprog_at = scratch.put(ctx, &fprog)?;
        let r = util::syscall(ctx, tid, "seccomp(SECCOMP_SET_MODE_FILTER)", libc::SYS_seccomp, [SECCOMP_SET_MODE_FILTER, flags, fprog_at, 0, 0, 0])
            .map_err(|e| format!("process {pid}: installing seccomp filter {n} (flags {flags:#x}): {e}"))?;
        // With TSYNC, a positive answer is a thread that could not be synchronised.
        if r != 0 {
            return Err(format!("process {pid}: installing seccomp filter {n} with TSYNC: thread {r} could not take it"));
        }
        self.status.entities_done += 1;
        Ok(())
    }
}

impl SubsystemPlugin for Plugin {
    fn info(&self) -> SubsystemInfo {
        SubsystemInfo {
            entity_kinds: names(&["seccomp"]),
            // After the plugins that rebuild the process and before `creds` (after
            // every plugin): the restore child may still install filters as root.
            // Their order does not matter to the filters, which are suspended until
            // ferry lets the process go.
            after: names(&["memory", "threads", "files", "signals", "process"]),
            shared_resources: names(&[]),
        }
    }

    fn checkpoint(&mut self, ctx: &mut ContextRef<'_>, sink: &mut SinkRef<'_>) -> Result<Progress, String> {
        let image = self.capture(ctx)?;
        util::put_json(sink, "seccomp", &image)?;
        Ok(Progress::Done)
    }

    fn restart(&mut self, ctx: &mut ContextRef<'_>, source: &mut SourceRef<'_>) -> Result<Progress, String> {
        let image = decode(source)?;
        self.apply(ctx, &image)?;
        Ok(Progress::Done)
    }

    fn status(&self) -> Status {
        self.status
    }

    fn dump(&self, error: &PluginError) -> String {
        util::while_doing(error, &self.doing)
    }
}

ferry_plugin_api::export_subsystem!("seccomp", "Seccomp filters of every thread, installed last but the credentials", Plugin::default);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fuzz_seeds_of_real_checkpoints_decode() {
        ferry_plugin_api::testing::assert_seeds_decode(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/plugin_seccomp"), |s| decode(s).map(drop));
    }

    fn insn(code: u16, k: u32) -> Vec<u8> {
        let mut v = code.to_le_bytes().to_vec();
        v.extend([0, 0]);
        v.extend(k.to_le_bytes());
        v
    }

    fn filter(k: u32) -> Filter {
        Filter { program: util::to_hex(&insn(RET_K, k)), flags: 0 }
    }

    fn thread(tid: i32, filters: Vec<Filter>) -> Thread {
        Thread { tid, fs_base: tid as u64, filters, speculation: None }
    }

    #[test]
    fn programs_that_need_a_supervisor_are_refused() {
        assert!(check_program(&insn(RET_K, 0x7fff_0000)).is_ok());
        assert!(check_program(&[insn(0x20, 0), insn(RET_K, 0x0005_0001)].concat()).is_ok());
        let e = check_program(&[insn(0x20, 0), insn(RET_K, RET_USER_NOTIF)].concat()).unwrap_err();
        assert!(e.contains("instruction 1") && e.contains("USER_NOTIF"), "{e}");
        assert!(check_program(&insn(RET_A, 0)).unwrap_err().contains("computed"));
        assert!(check_program(&[]).is_err());
        assert!(check_program(&[0u8; 7]).is_err());
        assert!(check_program(&vec![0u8; (MAX_INSNS + 1) * 8]).is_err());
    }

    #[test]
    fn filters_every_thread_has_are_shared_the_rest_are_one_thread_s() {
        let (a, b, c) = (filter(0x7fff_0000), filter(0x0005_0001), filter(0x0005_0002));
        // Inherited by every thread, then one more in thread 2 only.
        let t = [thread(1, vec![a.clone()]), thread(2, vec![a.clone(), b.clone()]), thread(3, vec![a.clone()])];
        assert_eq!(shared_prefix(&t).unwrap(), 1);
        // Each thread its own.
        let t = [thread(1, vec![b.clone()]), thread(2, vec![c.clone()]), thread(3, vec![])];
        assert_eq!(shared_prefix(&t).unwrap(), 0);
        // Identical everywhere: all shared.
        let t = [thread(1, vec![a.clone(), b.clone()]), thread(2, vec![a.clone(), b.clone()])];
        assert_eq!(shared_prefix(&t).unwrap(), 2);
        // Two threads of three share one: refused, naming them.
        let t = [thread(1, vec![a.clone(), b.clone()]), thread(2, vec![a.clone(), b.clone()]), thread(3, vec![a.clone()])];
        let e = shared_prefix(&t).unwrap_err();
        assert!(e.contains("threads 1 and 2 share seccomp filter 1"), "{e}");
        assert_eq!(shared_prefix(&[]).unwrap(), 0);
    }

    #[test]
    fn records_are_checked() {
        let good = Image { version: FORMAT_VERSION, threads: vec![thread(1, vec![filter(0x7fff_0000)])] };
        assert!(check(&good).is_ok());
        let bad = |f: &dyn Fn(&mut Image)| {
            let mut i = good.clone();
            f(&mut i);
            check(&i).is_err()
        };
        assert!(bad(&|i| i.version = 9));
        assert!(bad(&|i| i.threads.clear()));
        assert!(bad(&|i| i.threads[0].filters[0].flags = FLAG_TSYNC));
        assert!(bad(&|i| i.threads[0].filters[0].program = "zz".into()));
        assert!(bad(&|i| i.threads[0].filters[0].program = util::to_hex(&insn(RET_K, RET_USER_NOTIF))));
        let mut t = thread(1, vec![]);
        assert_eq!(spec_allow(&t), FLAG_SPEC_ALLOW);
        t.speculation = Some("thread force mitigated".into());
        assert_eq!(spec_allow(&t), 0);
    }
}

#[cfg(test)]
mod mock_tests;
