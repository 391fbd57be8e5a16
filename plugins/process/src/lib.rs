//! The `process` subsystem plugin: what the kernel keeps for a process beside its
//! memory, threads, files and signals, and what a restore child would otherwise
//! inherit from ferry instead:
//!
//! - each thread's scheduling (`sched_getattr`: policy, flags, nice value, real-time
//!   priority, deadline parameters) and CPU affinity;
//! - the resource limits (all sixteen, soft and hard);
//! - the execution domain (`personality`) and `no_new_privs`;
//! - the POSIX timers (`timer_create`): id, clock, how they notify (signal to the
//!   process, to one thread, or none), signal and value, interval and time left. Ids
//!   are given back with `PR_TIMER_CREATE_RESTORE_IDS` (Linux 6.16); without it, only
//!   ids that a fresh process would get anyway (0, 1, 2… in order). Overrun counts are
//!   not kept.
//!
//! One record, `process` (JSON, see [`Image`]). Restart runs after `threads` (every
//! thread exists, matched to the image's by TLS base) and `signals` (the timers'
//! handlers are in place), and changes only what differs from the restore child.

use ferry_plugin_api::{
    plugin::SubsystemPlugin,
    util::{self, fs_base, map_threads, names, proc_field, Scratch, PR_TIMER_CREATE_RESTORE_IDS},
    ContextRef, PluginError, Progress, SinkRef, SourceRef, Status, SubsystemInfo,
};
use serde::{Deserialize, Serialize};

const FORMAT_VERSION: u32 = 1;
const RLIMITS: usize = 16;
const UNLIMITED: u64 = u64::MAX;
/// `struct sched_attr` up to the deadline parameters (SCHED_ATTR_SIZE_VER0).
const SCHED_ATTR_SIZE: usize = 48;
const PR_SET_NO_NEW_PRIVS: u64 = 38;
const SIGEV_SIGNAL: i32 = 0;
const SIGEV_NONE: i32 = 1;
const SIGEV_THREAD_ID: i32 = 4;
/// `struct sigevent` as the kernel reads it.
const SIGEVENT_SIZE: usize = 64;
const MAX_TIMERS: usize = 1 << 16;
const MAX_CPUS: u32 = 1 << 16;
/// Scheduling flags `sched_setattr` may be given back (reset-on-fork, reclaim,
/// deadline overrun).
const SCHED_FLAGS_KEPT: u64 = 0x1 | 0x2 | 0x4;

// ---------------------------------------------------------------------------------
// The record
// ---------------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sched {
    pub policy: u32,
    pub flags: u64,
    pub nice: i32,
    pub priority: u32,
    pub runtime: u64,
    pub deadline: u64,
    pub period: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Thread {
    /// The thread's id in the image, the main thread first.
    pub tid: i32,
    /// Its TLS base: finds it again when restored under another tid.
    pub fs_base: u64,
    pub sched: Sched,
    /// Its CPU affinity, as `/proc` lists it: `0-3,6`.
    pub cpus: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timer {
    pub id: i32,
    pub clock: i32,
    /// `SIGEV_SIGNAL`, `SIGEV_NONE`, or `SIGEV_THREAD_ID` with `tid`.
    pub notify: i32,
    /// The thread it signals (image tid), for `SIGEV_THREAD_ID`.
    pub tid: i32,
    pub signo: i32,
    /// `sigev_value`, as the process gave it.
    pub value: u64,
    pub interval_sec: i64,
    pub interval_nsec: i64,
    /// Time left until it fires (0: disarmed).
    pub left_sec: i64,
    pub left_nsec: i64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub version: u32,
    pub personality: u64,
    pub no_new_privs: bool,
    /// `[soft, hard]` of each resource, by number (`RLIMIT_CPU` = 0 …); u64::MAX is
    /// unlimited.
    pub rlimits: Vec<[u64; 2]>,
    pub threads: Vec<Thread>,
    pub timers: Vec<Timer>,
}

// ---------------------------------------------------------------------------------
// Pure parts
// ---------------------------------------------------------------------------------

/// `/proc/PID/limits`: soft and hard limit of each resource, in resource order.
fn parse_limits(text: &str) -> Result<Vec<[u64; 2]>, String> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let values: Vec<u64> = line
            .split_whitespace()
            .filter_map(|w| if w == "unlimited" { Some(UNLIMITED) } else { w.parse().ok() })
            .collect();
        match values.as_slice() {
            [soft, hard] => out.push([*soft, *hard]),
            _ => return Err(format!("a line of /proc/PID/limits reads {line:?}")),
        }
    }
    if out.len() != RLIMITS {
        return Err(format!("/proc/PID/limits lists {} limits, want {RLIMITS}", out.len()));
    }
    Ok(out)
}

/// `0-3,6` → [0, 1, 2, 3, 6].
fn parse_cpus(list: &str) -> Result<Vec<u32>, String> {
    let bad = || format!("a bad CPU list {list:?}");
    let mut out = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().map_err(|_| bad())?, b.parse::<u32>().map_err(|_| bad())?),
            None => {
                let c = part.parse::<u32>().map_err(|_| bad())?;
                (c, c)
            }
        };
        if lo > hi || hi >= MAX_CPUS {
            return Err(bad());
        }
        out.extend(lo..=hi);
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

/// The CPU mask `sched_setaffinity` takes, in whole 64-bit words.
fn cpu_mask(cpus: &[u32]) -> Vec<u8> {
    let words = cpus.iter().max().map_or(1, |&m| m as usize / 64 + 1);
    let mut mask = vec![0u8; words * 8];
    for &c in cpus {
        mask[c as usize / 8] |= 1 << (c % 8);
    }
    mask
}

fn decode_sched(b: &[u8]) -> Sched {
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    Sched {
        policy: u32_at(4),
        flags: u64_at(8),
        nice: u32_at(16) as i32,
        priority: u32_at(20),
        runtime: u64_at(24),
        deadline: u64_at(32),
        period: u64_at(40),
    }
}

fn encode_sched(s: &Sched) -> [u8; SCHED_ATTR_SIZE] {
    let mut b = [0u8; SCHED_ATTR_SIZE];
    b[0..4].copy_from_slice(&(SCHED_ATTR_SIZE as u32).to_le_bytes());
    b[4..8].copy_from_slice(&s.policy.to_le_bytes());
    b[8..16].copy_from_slice(&(s.flags & SCHED_FLAGS_KEPT).to_le_bytes());
    b[16..20].copy_from_slice(&s.nice.to_le_bytes());
    b[20..24].copy_from_slice(&s.priority.to_le_bytes());
    b[24..32].copy_from_slice(&s.runtime.to_le_bytes());
    b[32..40].copy_from_slice(&s.deadline.to_le_bytes());
    b[40..48].copy_from_slice(&s.period.to_le_bytes());
    b
}

/// A timer as `/proc/PID/timers` lists it (without its times).
fn parse_timers(text: &str) -> Result<Vec<Timer>, String> {
    let mut out: Vec<Timer> = Vec::new();
    let bad = |l: &str| format!("a line of /proc/PID/timers reads {l:?}");
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (key, value) = line.split_once(':').ok_or_else(|| bad(line))?;
        let value = value.trim();
        if key == "ID" {
            let id = value.parse().map_err(|_| bad(line))?;
            out.push(Timer { id, clock: 0, notify: SIGEV_SIGNAL, tid: 0, signo: 0, value: 0, interval_sec: 0, interval_nsec: 0, left_sec: 0, left_nsec: 0 });
            continue;
        }
        let t = out.last_mut().ok_or_else(|| bad(line))?;
        match key {
            // signal: SIGNO/SIGEV_VALUE (hex)
            "signal" => {
                let (signo, v) = value.split_once('/').ok_or_else(|| bad(line))?;
                t.signo = signo.parse().map_err(|_| bad(line))?;
                t.value = u64::from_str_radix(v, 16).map_err(|_| bad(line))?;
            }
            // notify: signal|none|thread / pid.N|tid.N
            "notify" => {
                let (how, whom) = value.split_once('/').ok_or_else(|| bad(line))?;
                let (kind, n) = whom.split_once('.').ok_or_else(|| bad(line))?;
                t.notify = match (how, kind) {
                    ("none", _) => SIGEV_NONE,
                    ("signal", "pid") => SIGEV_SIGNAL,
                    ("signal", "tid") => SIGEV_THREAD_ID,
                    _ => return Err(format!("timer {}: notification {value:?} is not one ferry restores", t.id)),
                };
                if t.notify == SIGEV_THREAD_ID {
                    t.tid = n.parse().map_err(|_| bad(line))?;
                }
            }
            "ClockID" => t.clock = value.parse().map_err(|_| bad(line))?,
            _ => {}
        }
    }
    if out.len() > MAX_TIMERS {
        return Err(format!("{} POSIX timers: more than ferry believes", out.len()));
    }
    out.sort_by_key(|t| t.id);
    Ok(out)
}

/// A CPU-time clock id names a process (or thread) by pid: `clock` of the image as it
/// must read in the restored process, whose pid and tids `pid_of` maps.
fn map_clock(clock: i32, pid_of: impl Fn(i32) -> Option<i32>) -> Result<i32, String> {
    if clock >= 0 {
        return Ok(clock);
    }
    // The kernel's MAKE_PROCESS_CPUCLOCK: (~pid << 3) | per-thread bit | which.
    let pid = !(clock >> 3);
    let low = clock & 7;
    match pid_of(pid) {
        Some(now) => Ok((!now << 3) | low),
        None => Err(format!("a timer counts the CPU time of pid {pid}, which is not this process's")),
    }
}

/// The plugin's one record read and checked, as a restart does before it touches the
/// process; also the fuzz target `plugin_process`'s entry point.
pub fn decode(source: &mut SourceRef<'_>) -> Result<Image, String> {
    let image: Image = util::only_json(source, "process")?;
    check(&image)?;
    Ok(image)
}

fn check(image: &Image) -> Result<(), String> {
    if image.version != FORMAT_VERSION {
        return Err(format!("process record version {}, this plugin reads {FORMAT_VERSION}", image.version));
    }
    if image.rlimits.len() != RLIMITS || image.rlimits.iter().any(|[s, h]| s > h) {
        return Err("the process record's resource limits are malformed".into());
    }
    if image.threads.is_empty() || image.timers.len() > MAX_TIMERS {
        return Err("the process record lists no thread, or too many timers".into());
    }
    for t in &image.threads {
        parse_cpus(&t.cpus).map_err(|e| format!("thread {}: {e}", t.tid))?;
    }
    for t in &image.timers {
        let notify_ok = matches!(t.notify, SIGEV_SIGNAL | SIGEV_NONE) || (t.notify == SIGEV_THREAD_ID && image.threads.iter().any(|x| x.tid == t.tid));
        if t.id < 0 || !notify_ok || !(0..=64).contains(&t.signo) || t.interval_nsec >= 1_000_000_000 || t.left_nsec >= 1_000_000_000 {
            return Err(format!("timer {} of the process record is malformed", t.id));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// The plugin
// ---------------------------------------------------------------------------------

#[derive(Default)]
struct Plugin {
    status: Status,
    doing: &'static str,
}

fn read_sched(ctx: &mut ContextRef<'_>, tid: i32) -> Result<Sched, String> {
    let mut scratch = Scratch::new(ctx);
    let at = scratch.alloc(SCHED_ATTR_SIZE as u64)?;
    util::syscall(ctx, tid, "sched_getattr", libc::SYS_sched_getattr, [0, at, SCHED_ATTR_SIZE as u64, 0, 0, 0])?;
    Ok(decode_sched(&util::read_memory(ctx, at, SCHED_ATTR_SIZE)?))
}

fn cpus_of(ctx: &mut ContextRef<'_>, tid: i32) -> Result<String, String> {
    let status = util::proc_text(ctx, &format!("task/{tid}/status"))?;
    proc_field(&status, "Cpus_allowed_list").map(str::to_string).ok_or_else(|| format!("thread {tid}: no Cpus_allowed_list"))
}

impl Plugin {
    fn capture(&mut self, ctx: &mut ContextRef<'_>) -> Result<Image, String> {
        let pid = ctx.pid();
        self.doing = "personality";
        let personality = util::syscall(ctx, pid, "personality", libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0, 0])?;
        self.doing = "limits";
        let rlimits = parse_limits(&util::proc_text(ctx, "limits")?)?;
        let status = util::proc_text(ctx, "status")?;
        let no_new_privs = proc_field(&status, "NoNewPrivs") == Some("1");
        self.doing = "threads' scheduling and affinity";
        let mut threads = Vec::new();
        for tid in ctx.tids().into_vec() {
            let sched = read_sched(ctx, tid)?;
            let cpus = cpus_of(ctx, tid)?;
            threads.push(Thread { tid, fs_base: fs_base(ctx, tid)?, sched, cpus });
        }
        self.doing = "POSIX timers";
        let mut timers = parse_timers(&util::proc_text(ctx, "timers")?)?;
        let mut scratch = Scratch::new(ctx);
        let its = scratch.alloc(32)?;
        for t in &mut timers {
            util::syscall(ctx, pid, &format!("timer_gettime({})", t.id), libc::SYS_timer_gettime, [t.id as u64, its, 0, 0, 0, 0])?;
            let b = util::read_memory(ctx, its, 32)?;
            let w = |i: usize| i64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            (t.interval_sec, t.interval_nsec, t.left_sec, t.left_nsec) = (w(0), w(1), w(2), w(3));
            if t.notify == SIGEV_THREAD_ID && !threads.iter().any(|x| x.tid == t.tid) {
                return Err(format!("timer {} signals thread {}, which is not one of this process's", t.id, t.tid));
            }
            map_clock(t.clock, |p| (p == pid || threads.iter().any(|x| x.tid == p)).then_some(p))
                .map_err(|e| format!("timer {}: {e}", t.id))?;
        }
        self.status.entities_total = (threads.len() + timers.len() + 1) as u64;
        self.status.entities_done = self.status.entities_total;
        Ok(Image { version: FORMAT_VERSION, personality, no_new_privs, rlimits, threads, timers })
    }

    fn apply(&mut self, ctx: &mut ContextRef<'_>, image: &Image) -> Result<(), String> {
        check(image)?;
        let pid = ctx.pid();
        self.status.entities_total = (image.threads.len() + image.timers.len() + 1) as u64;
        self.doing = "personality";
        let now = util::syscall(ctx, pid, "personality", libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0, 0])?;
        if now != image.personality {
            util::syscall(ctx, pid, "personality", libc::SYS_personality, [image.personality, 0, 0, 0, 0, 0])?;
        }
        self.doing = "limits";
        let child = parse_limits(&util::proc_text(ctx, "limits")?)?;
        let mut scratch = Scratch::new(ctx);
        let at = scratch.alloc(16)?;
        for (res, (want, have)) in image.rlimits.iter().zip(&child).enumerate() {
            if want == have {
                continue;
            }
            let bytes: Vec<u8> = want.iter().flat_map(|v| v.to_le_bytes()).collect();
            util::write_memory(ctx, at, &bytes)?;
            util::syscall(ctx, pid, &format!("prlimit64 of resource {res} to {want:?}"), libc::SYS_prlimit64, [0, res as u64, at, 0, 0, 0])?;
        }
        if image.no_new_privs {
            util::syscall(ctx, pid, "prctl(PR_SET_NO_NEW_PRIVS)", libc::SYS_prctl, [PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, 0])?;
        }
        self.status.entities_done += 1;

        self.doing = "threads' scheduling and affinity";
        let imaged: Vec<(i32, u64)> = image.threads.iter().map(|t| (t.tid, t.fs_base)).collect();
        let mut live = Vec::new();
        for tid in ctx.tids().into_vec() {
            live.push((tid, fs_base(ctx, tid)?));
        }
        let (tids, _) = map_threads(&imaged, &live)?;
        for (t, &tid) in image.threads.iter().zip(&tids) {
            if read_sched(ctx, tid)? != t.sched {
                let mut scratch = Scratch::new(ctx);
                let at = scratch.put(ctx, &encode_sched(&t.sched))?;
                util::syscall(ctx, tid, &format!("sched_setattr to {:?}", t.sched), libc::SYS_sched_setattr, [0, at, 0, 0, 0, 0])?;
            }
            let cpus = parse_cpus(&t.cpus)?;
            if parse_cpus(&cpus_of(ctx, tid)?)? != cpus {
                let mask = cpu_mask(&cpus);
                let mut scratch = Scratch::new(ctx);
                let at = scratch.put(ctx, &mask)?;
                util::syscall(ctx, tid, &format!("sched_setaffinity to CPUs {}", t.cpus), libc::SYS_sched_setaffinity, [0, mask.len() as u64, at, 0, 0, 0])?;
            }
            self.status.entities_done += 1;
        }

        self.doing = "POSIX timers";
        if image.timers.is_empty() {
            return Ok(());
        }
        let tid_of = |t: i32| image.threads.iter().position(|x| x.tid == t).map(|i| tids[i]);
        let restore_ids = util::syscall(ctx, pid, "prctl(PR_TIMER_CREATE_RESTORE_IDS)", libc::SYS_prctl, [PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0, 0]).is_ok();
        let result = self.create_timers(ctx, image, restore_ids, &tid_of);
        if restore_ids {
            util::syscall(ctx, pid, "prctl(PR_TIMER_CREATE_RESTORE_IDS, off)", libc::SYS_prctl, [PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0, 0])?;
        }
        result
    }

    fn create_timers(
        &mut self,
        ctx: &mut ContextRef<'_>,
        image: &Image,
        restore_ids: bool,
        tid_of: &dyn Fn(i32) -> Option<i32>,
    ) -> Result<(), String> {
        let pid = ctx.pid();
        for (n, t) in image.timers.iter().enumerate() {
            if !restore_ids && t.id != n as i32 {
                return Err(format!(
                    "POSIX timer {} cannot get its id back: this kernel lacks PR_TIMER_CREATE_RESTORE_IDS (Linux 6.16)",
                    t.id
                ));
            }
            // The main thread's tid is the process's pid, in the image and here.
            let clock = map_clock(t.clock, tid_of).map_err(|e| format!("timer {}: {e}", t.id))?;
            let mut sev = [0u8; SIGEVENT_SIZE];
            sev[0..8].copy_from_slice(&t.value.to_le_bytes());
            sev[8..12].copy_from_slice(&t.signo.to_le_bytes());
            sev[12..16].copy_from_slice(&t.notify.to_le_bytes());
            if t.notify == SIGEV_THREAD_ID {
                let tid = tid_of(t.tid).ok_or_else(|| format!("timer {}: thread {} is gone", t.id, t.tid))?;
                sev[16..20].copy_from_slice(&tid.to_le_bytes());
            }
            let mut scratch = Scratch::new(ctx);
            let sev_at = scratch.put(ctx, &sev)?;
            let id_at = scratch.put(ctx, &t.id.to_le_bytes())?;
            util::syscall(ctx, pid, &format!("timer_create of timer {}", t.id), libc::SYS_timer_create, [clock as u64, sev_at, id_at, 0, 0, 0])?;
            let got = i32::from_le_bytes(util::read_memory(ctx, id_at, 4)?.try_into().expect("4 bytes"));
            if got != t.id {
                return Err(format!("timer {} was created as timer {got}", t.id));
            }
            if t.left_sec != 0 || t.left_nsec != 0 {
                let its: Vec<u8> = [t.interval_sec, t.interval_nsec, t.left_sec, t.left_nsec].iter().flat_map(|v| v.to_le_bytes()).collect();
                let its_at = scratch.put(ctx, &its)?;
                util::syscall(ctx, pid, &format!("timer_settime of timer {}", t.id), libc::SYS_timer_settime, [t.id as u64, 0, its_at, 0, 0, 0])?;
            }
            self.status.entities_done += 1;
        }
        Ok(())
    }
}

impl SubsystemPlugin for Plugin {
    fn info(&self) -> SubsystemInfo {
        SubsystemInfo {
            entity_kinds: names(&["thread-scheduling", "posix-timer", "rlimit"]),
            after: names(&["threads", "signals"]),
            shared_resources: names(&[]),
        }
    }

    fn checkpoint(&mut self, ctx: &mut ContextRef<'_>, sink: &mut SinkRef<'_>) -> Result<Progress, String> {
        let image = self.capture(ctx)?;
        util::put_json(sink, "process", &image)?;
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
        util::while_doing(error, if self.doing.is_empty() { "record" } else { self.doing })
    }
}

ferry_plugin_api::export_subsystem!("process", "Scheduling, CPU affinity, resource limits, personality, POSIX timers", Plugin::default);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fuzz_seeds_of_real_checkpoints_decode() {
        ferry_plugin_api::testing::assert_seeds_decode(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/plugin_process"), |s| decode(s).map(drop));
    }

    const LIMITS: &str = "Limit                     Soft Limit           Hard Limit           Units     
Max cpu time              unlimited            unlimited            seconds   
Max file size             unlimited            unlimited            bytes     
Max data size             unlimited            unlimited            bytes     
Max stack size            8388608              unlimited            bytes     
Max core file size        0                    unlimited            bytes     
Max resident set          unlimited            unlimited            bytes     
Max processes             95360                95360                processes 
Max open files            777                  4096                 files     
Max locked memory         8388608              8388608              bytes     
Max address space         unlimited            unlimited            bytes     
Max file locks            unlimited            unlimited            locks     
Max pending signals       95360                95360                signals   
Max msgqueue size         819200               819200               bytes     
Max nice priority         0                    0                    
Max realtime priority     0                    0                    
Max realtime timeout      unlimited            unlimited            us        
";

    #[test]
    fn limits_are_read_in_resource_order() {
        let l = parse_limits(LIMITS).unwrap();
        assert_eq!(l.len(), 16);
        assert_eq!(l[libc::RLIMIT_STACK as usize], [8388608, UNLIMITED]);
        assert_eq!(l[libc::RLIMIT_NOFILE as usize], [777, 4096]);
        assert_eq!(l[libc::RLIMIT_RTPRIO as usize], [0, 0]);
        assert!(parse_limits(&LIMITS.replace("777 ", "seven")).is_err());
        assert!(parse_limits(LIMITS.rsplit_once("Max realtime timeout").unwrap().0).is_err());
    }

    #[test]
    fn cpu_lists_and_masks() {
        assert_eq!(parse_cpus("0-3,6").unwrap(), vec![0, 1, 2, 3, 6]);
        assert_eq!(parse_cpus("1").unwrap(), vec![1]);
        assert!(parse_cpus("").is_err() && parse_cpus("3-1").is_err() && parse_cpus("x").is_err() && parse_cpus("0-99999").is_err());
        assert_eq!(cpu_mask(&[0, 1, 2, 3, 6]), vec![0x4f, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(cpu_mask(&[65]).len(), 16);
        assert_eq!(cpu_mask(&[65])[8], 2);
    }

    #[test]
    fn sched_attr_round_trips_and_keeps_only_settable_flags() {
        let s = Sched { policy: 1, flags: 0x1, nice: -5, priority: 10, runtime: 0, deadline: 0, period: 0 };
        assert_eq!(decode_sched(&encode_sched(&s)), s);
        let extra = Sched { flags: 0x1 | 0x20, ..s };
        assert_eq!(decode_sched(&encode_sched(&extra)).flags, 0x1);
    }

    #[test]
    fn timers_are_read_from_proc() {
        let text = "ID: 2\nsignal: 12/0000000000001092\nnotify: none/pid.25265\nClockID: 7\nID: 0\nsignal: 35/0000000000001092\nnotify: signal/pid.25265\nClockID: 1\nID: 3\nsignal: 36/00007ffd00000000\nnotify: signal/tid.25266\nClockID: 1\n";
        let t = parse_timers(text).unwrap();
        assert_eq!(t.iter().map(|t| t.id).collect::<Vec<_>>(), vec![0, 2, 3]);
        assert_eq!((t[0].signo, t[0].value, t[0].notify, t[0].clock), (35, 0x1092, SIGEV_SIGNAL, 1));
        assert_eq!((t[1].notify, t[1].clock), (SIGEV_NONE, 7));
        assert_eq!((t[2].notify, t[2].tid, t[2].value), (SIGEV_THREAD_ID, 25266, 0x7ffd_0000_0000));
        assert!(parse_timers("signal: 1/0\n").is_err());
        assert!(parse_timers("ID: 0\nnotify: thread/pid.3\n").is_err());
    }

    #[test]
    fn cpu_clocks_follow_their_process() {
        // CLOCK_MONOTONIC is no process's.
        assert_eq!(map_clock(1, |_| None).unwrap(), 1);
        // The CPU clock of process 100 (per-process, CPUCLOCK_SCHED) becomes 200's.
        let of = |pid: i32, low: i32| (!pid << 3) | low;
        assert_eq!(map_clock(of(100, 2), |p| (p == 100).then_some(200)).unwrap(), of(200, 2));
        // A thread's (per-thread bit) too.
        assert_eq!(map_clock(of(101, 6), |p| (p == 101).then_some(201)).unwrap(), of(201, 6));
        assert!(map_clock(of(55, 2), |_| None).is_err());
    }

    #[test]
    fn records_are_checked() {
        let good = Image {
            version: FORMAT_VERSION,
            personality: 0,
            no_new_privs: false,
            rlimits: vec![[1, 2]; RLIMITS],
            threads: vec![Thread { tid: 5, fs_base: 0, sched: Sched::default(), cpus: "0-1".into() }],
            timers: vec![Timer { id: 0, clock: 1, notify: SIGEV_THREAD_ID, tid: 5, signo: 10, value: 0, interval_sec: 0, interval_nsec: 0, left_sec: 1, left_nsec: 0 }],
        };
        assert!(check(&good).is_ok());
        let bad = |f: &dyn Fn(&mut Image)| {
            let mut i = good.clone();
            f(&mut i);
            check(&i).is_err()
        };
        assert!(bad(&|i| i.version = 9));
        assert!(bad(&|i| i.rlimits[3] = [5, 1]));
        assert!(bad(&|i| i.rlimits.pop().map(|_| ()).unwrap_or(())));
        assert!(bad(&|i| i.threads[0].cpus = "".into()));
        assert!(bad(&|i| i.timers[0].tid = 6));
        assert!(bad(&|i| i.timers[0].left_nsec = 1_000_000_000));
        assert!(bad(&|i| i.threads.clear()));
    }
}
