//! The `creds` subsystem plugin: who a process is and what it may do. Per thread (the
//! kernel keeps credentials per thread, and raw `setresuid`/`capset` calls change one
//! thread only): real, effective, saved and filesystem uids and gids, supplementary
//! groups, the five capability sets (effective, permitted, inheritable, bounding,
//! ambient), securebits, `no_new_privs`, the parent-death signal and the audit login
//! uid; per process: dumpable and `oom_score_adj`.
//!
//! The restore child is ferry's, so it starts as root with every capability: without
//! this plugin a restored process would run as root. Restart therefore runs after
//! every other plugin of the request (`after: ["*"]`): once it has dropped the
//! privileges, no injected call may need them. Every field is set exactly, then read
//! back; anything that cannot be set exactly fails the restore, which removes the
//! half-built process — it never runs with more privilege than it had. The LSM label
//! is recorded but not set: a restore child whose label differs is refused.
//!
//! One record, `creds` (JSON, see [`Image`]).

use ferry_plugin_api::{
    plugin::SubsystemPlugin,
    util::{self, fs_base, map_threads, names, proc_field, Scratch},
    ContextRef, PluginError, Progress, SinkRef, SourceRef, Status, SubsystemInfo,
};
use serde::{Deserialize, Serialize};

const FORMAT_VERSION: u32 = 1;

// prctl options (linux/prctl.h).
const PR_SET_PDEATHSIG: u64 = 1;
const PR_GET_PDEATHSIG: u64 = 2;
const PR_GET_DUMPABLE: u64 = 3;
const PR_SET_DUMPABLE: u64 = 4;
const PR_CAPBSET_DROP: u64 = 24;
const PR_GET_SECUREBITS: u64 = 27;
const PR_SET_SECUREBITS: u64 = 28;
const PR_SET_NO_NEW_PRIVS: u64 = 38;
const PR_CAP_AMBIENT: u64 = 47;
const PR_CAP_AMBIENT_RAISE: u64 = 2;
const PR_CAP_AMBIENT_CLEAR_ALL: u64 = 4;
/// linux/securebits.h: uid changes leave the capabilities alone while ferry works.
const SECBIT_NO_SETUID_FIXUP: u64 = 1 << 2;
const SECBIT_KEEP_CAPS: u64 = 1 << 4;
/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// NGROUPS_MAX.
const MAX_GROUPS: usize = 65536;
/// `/proc/PID/loginuid` of a task whose login uid was never set.
pub const LOGINUID_UNSET: u32 = u32::MAX;

// ---------------------------------------------------------------------------------
// The record
// ---------------------------------------------------------------------------------

/// One thread's credentials.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Creds {
    /// Real, effective, saved, filesystem.
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    /// Supplementary groups, as the kernel keeps them (sorted).
    pub groups: Vec<u32>,
    pub cap_effective: u64,
    pub cap_permitted: u64,
    pub cap_inheritable: u64,
    pub cap_bounding: u64,
    pub cap_ambient: u64,
    pub securebits: u32,
    pub no_new_privs: bool,
    /// `PR_GET_PDEATHSIG`: 0 for none.
    pub pdeathsig: i32,
    /// `/proc/PID/task/TID/loginuid`; [`LOGINUID_UNSET`] also where the kernel has no
    /// audit (no login uid is what such a process has).
    pub loginuid: u32,
    /// The LSM label (`/proc/PID/task/TID/attr/current`) where an LSM gives one. Not
    /// set by ferry: a restore child with another label is refused.
    #[serde(default)]
    pub lsm_label: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Thread {
    /// The thread's id in the image, the main thread first.
    pub tid: i32,
    /// Its TLS base: finds it again when restored under another tid.
    pub fs_base: u64,
    pub creds: Creds,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub version: u32,
    /// `PR_GET_DUMPABLE` (per address space): 0 or 1.
    pub dumpable: u32,
    pub oom_score_adj: i32,
    pub threads: Vec<Thread>,
}

// ---------------------------------------------------------------------------------
// Pure parts
// ---------------------------------------------------------------------------------

/// What `/proc/PID/task/TID/status` tells of a thread's credentials.
fn parse_status(text: &str) -> Result<Creds, String> {
    let field = |key: &str| proc_field(text, key).ok_or_else(|| format!("no {key} line in the status"));
    let ids = |key: &str| -> Result<[u32; 4], String> {
        let v: Vec<u32> = field(key)?.split_whitespace().map(|w| w.parse().map_err(|_| format!("a bad {key} line"))).collect::<Result<_, _>>()?;
        v.try_into().map_err(|_| format!("the {key} line does not hold four ids"))
    };
    let cap = |key: &str| -> Result<u64, String> { u64::from_str_radix(field(key)?, 16).map_err(|_| format!("a bad {key} line")) };
    let mut groups: Vec<u32> = field("Groups")?.split_whitespace().map(|w| w.parse().map_err(|_| "a bad Groups line".to_string())).collect::<Result<_, _>>()?;
    groups.sort_unstable();
    Ok(Creds {
        uids: ids("Uid")?,
        gids: ids("Gid")?,
        groups,
        cap_effective: cap("CapEff")?,
        cap_permitted: cap("CapPrm")?,
        cap_inheritable: cap("CapInh")?,
        cap_bounding: cap("CapBnd")?,
        cap_ambient: cap("CapAmb")?,
        no_new_privs: field("NoNewPrivs")? == "1",
        ..Creds::default()
    })
}

/// Capabilities 0..=last.
fn all_caps(last: u32) -> u64 {
    if last >= 63 {
        u64::MAX
    } else {
        (1u64 << (last + 1)) - 1
    }
}

fn caps_of(mask: u64) -> impl Iterator<Item = u64> {
    (0..64u64).filter(move |c| mask & (1 << c) != 0)
}

/// `capset`'s header and data (version 3: low words, then high words).
fn capset_args(effective: u64, permitted: u64, inheritable: u64) -> ([u8; 8], [u8; 24]) {
    let mut header = [0u8; 8];
    header[0..4].copy_from_slice(&CAPABILITY_VERSION_3.to_le_bytes());
    // pid 0: the calling thread.
    let mut data = [0u8; 24];
    for (word, shift) in [(0usize, 0u32), (1, 32)] {
        for (i, set) in [effective, permitted, inheritable].iter().enumerate() {
            let at = word * 12 + i * 4;
            data[at..at + 4].copy_from_slice(&((set >> shift) as u32).to_le_bytes());
        }
    }
    (header, data)
}

/// The first field in which `got` differs from `want`, named for an error line.
fn first_difference(want: &Creds, got: &Creds) -> Option<String> {
    let d = |name: &str, w: &dyn std::fmt::Debug, g: &dyn std::fmt::Debug| Some(format!("{name} are {g:?}, want {w:?}"));
    if want.uids != got.uids {
        return d("the uids (real, effective, saved, fs)", &want.uids, &got.uids);
    }
    if want.gids != got.gids {
        return d("the gids (real, effective, saved, fs)", &want.gids, &got.gids);
    }
    if want.groups != got.groups {
        return d("the supplementary groups", &want.groups, &got.groups);
    }
    let caps = [
        ("effective", want.cap_effective, got.cap_effective),
        ("permitted", want.cap_permitted, got.cap_permitted),
        ("inheritable", want.cap_inheritable, got.cap_inheritable),
        ("bounding", want.cap_bounding, got.cap_bounding),
        ("ambient", want.cap_ambient, got.cap_ambient),
    ];
    for (name, w, g) in caps {
        if w != g {
            return Some(format!("the {name} capabilities are {g:#x}, want {w:#x}"));
        }
    }
    if want.securebits != got.securebits {
        return Some(format!("the securebits are {:#x}, want {:#x}", got.securebits, want.securebits));
    }
    if want.no_new_privs != got.no_new_privs {
        return d("no_new_privs is", &want.no_new_privs, &got.no_new_privs);
    }
    if want.pdeathsig != got.pdeathsig {
        return d("the parent-death signal is", &want.pdeathsig, &got.pdeathsig);
    }
    if want.loginuid != got.loginuid {
        return d("the audit login uid is", &want.loginuid, &got.loginuid);
    }
    if want.lsm_label != got.lsm_label {
        return d("the LSM label is", &want.lsm_label, &got.lsm_label);
    }
    None
}

/// The plugin's one record read and checked, as a restart does before it touches the
/// process; also the fuzz target `plugin_creds`'s entry point.
pub fn decode(source: &mut SourceRef<'_>) -> Result<Image, String> {
    let image: Image = util::only_json(source, "creds")?;
    check(&image)?;
    Ok(image)
}

fn check(image: &Image) -> Result<(), String> {
    if image.version != FORMAT_VERSION {
        return Err(format!("creds record version {}, this plugin reads {FORMAT_VERSION}", image.version));
    }
    if image.threads.is_empty() {
        return Err("the creds record lists no thread".into());
    }
    if image.dumpable > 1 {
        return Err(format!(
            "the process was dumpable only by root (PR_GET_DUMPABLE {}), which prctl cannot set",
            image.dumpable
        ));
    }
    if !(-1000..=1000).contains(&image.oom_score_adj) {
        return Err(format!("oom_score_adj {} is out of range", image.oom_score_adj));
    }
    for t in &image.threads {
        let c = &t.creds;
        let bad = |what: &str| Err(format!("thread {} of the creds record: {what}", t.tid));
        if c.groups.len() > MAX_GROUPS || c.groups.windows(2).any(|w| w[0] > w[1]) {
            return bad("the groups are too many or not sorted");
        }
        if c.cap_effective & !c.cap_permitted != 0 || c.cap_ambient & !(c.cap_permitted & c.cap_inheritable) != 0 {
            return bad("capability sets the kernel would not hold together");
        }
        if !(0..=64).contains(&c.pdeathsig) || c.uids.contains(&u32::MAX) || c.gids.contains(&u32::MAX) {
            return bad("a bad parent-death signal, uid or gid");
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
    doing: String,
}

/// The highest capability this kernel knows.
fn cap_last_cap() -> Result<u32, String> {
    let text = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").map_err(|e| format!("/proc/sys/kernel/cap_last_cap: {e}"))?;
    text.trim().parse().map_err(|_| format!("/proc/sys/kernel/cap_last_cap reads {text:?}"))
}

fn prctl(ctx: &mut ContextRef<'_>, tid: i32, what: &str, args: [u64; 5]) -> Result<u64, String> {
    util::syscall(ctx, tid, what, libc::SYS_prctl, [args[0], args[1], args[2], args[3], args[4], 0])
}

/// Thread `tid`'s credentials as they are now: /proc for what it shows, injected
/// `prctl`s for the rest (the parent-death signal can only be read from inside).
fn read_thread(ctx: &mut ContextRef<'_>, tid: i32) -> Result<Creds, String> {
    let pid = ctx.pid();
    let status = util::proc_text(ctx, &format!("task/{tid}/status"))?;
    let mut c = parse_status(&status).map_err(|e| format!("process {pid} thread {tid}: {e}"))?;
    c.securebits = prctl(ctx, tid, "prctl(PR_GET_SECUREBITS)", [PR_GET_SECUREBITS, 0, 0, 0, 0])? as u32;
    let mut scratch = Scratch::new(ctx);
    let at = scratch.put(ctx, &[0u8; 4])?;
    prctl(ctx, tid, "prctl(PR_GET_PDEATHSIG)", [PR_GET_PDEATHSIG, at, 0, 0, 0])?;
    c.pdeathsig = i32::from_le_bytes(util::read_memory(ctx, at, 4)?.try_into().expect("4 bytes"));
    c.loginuid = match util::proc_text(ctx, &format!("task/{tid}/loginuid")) {
        Ok(text) => text.trim().parse().map_err(|_| format!("process {pid} thread {tid}: loginuid reads {text:?}"))?,
        // A kernel without audit has no such file.
        Err(_) if !std::path::Path::new("/proc/self/loginuid").exists() => LOGINUID_UNSET,
        Err(e) => return Err(e),
    };
    // No LSM, or one without labels: the file cannot be read (EINVAL).
    c.lsm_label = util::proc_text(ctx, &format!("task/{tid}/attr/current"))
        .ok()
        .map(|l| l.trim_end_matches(['\n', '\0']).to_string())
        .filter(|l| !l.is_empty());
    Ok(c)
}

fn oom_score_adj(ctx: &mut ContextRef<'_>) -> Result<i32, String> {
    let text = util::proc_text(ctx, "oom_score_adj")?;
    text.trim().parse().map_err(|_| format!("process {}: oom_score_adj reads {text:?}", ctx.pid()))
}

impl Plugin {
    fn capture(&mut self, ctx: &mut ContextRef<'_>) -> Result<Image, String> {
        let pid = ctx.pid();
        self.doing = "dumpable and oom_score_adj".into();
        let dumpable = prctl(ctx, pid, "prctl(PR_GET_DUMPABLE)", [PR_GET_DUMPABLE, 0, 0, 0, 0])? as u32;
        if dumpable > 1 {
            return Err(format!(
                "process {pid} is dumpable only by root (PR_GET_DUMPABLE {dumpable}), which a restore cannot set"
            ));
        }
        let oom_score_adj = oom_score_adj(ctx)?;
        self.doing = "threads' credentials".into();
        let mut threads = Vec::new();
        for tid in ctx.tids().into_vec() {
            let creds = read_thread(ctx, tid)?;
            threads.push(Thread { tid, fs_base: fs_base(ctx, tid)?, creds });
        }
        self.status.entities_total = threads.len() as u64 + 1;
        self.status.entities_done = self.status.entities_total;
        Ok(Image { version: FORMAT_VERSION, dumpable, oom_score_adj, threads })
    }

    fn apply(&mut self, ctx: &mut ContextRef<'_>, image: &Image) -> Result<(), String> {
        check(image)?;
        let pid = ctx.pid();
        self.status.entities_total = image.threads.len() as u64 + 1;
        let last = cap_last_cap()?;
        let known = all_caps(last);
        for t in &image.threads {
            let c = &t.creds;
            let unknown = (c.cap_effective | c.cap_permitted | c.cap_inheritable | c.cap_ambient) & !known;
            if unknown != 0 {
                return Err(format!(
                    "thread {} holds capabilities {unknown:#x}, which this kernel does not know (its last is {last})",
                    t.tid
                ));
            }
        }
        let imaged: Vec<(i32, u64)> = image.threads.iter().map(|t| (t.tid, t.fs_base)).collect();
        let mut live = Vec::new();
        for tid in ctx.tids().into_vec() {
            live.push((tid, fs_base(ctx, tid)?));
        }
        let (tids, _) = map_threads(&imaged, &live)?;

        // Written by ferry itself: no privilege of the process's is needed for it.
        self.doing = "oom_score_adj".into();
        if oom_score_adj(ctx)? != image.oom_score_adj {
            std::fs::write(format!("/proc/{pid}/oom_score_adj"), image.oom_score_adj.to_string())
                .map_err(|e| format!("process {pid}: setting oom_score_adj to {}: {e}", image.oom_score_adj))?;
        }
        for (t, &tid) in image.threads.iter().zip(&tids) {
            self.doing = format!("credentials of thread {tid}");
            self.set_thread(ctx, tid, &t.creds, known)?;
            self.status.entities_done += 1;
        }
        // Last: every change of credentials above reset them.
        self.doing = "dumpable and parent-death signals".into();
        let dumpable = prctl(ctx, pid, "prctl(PR_GET_DUMPABLE)", [PR_GET_DUMPABLE, 0, 0, 0, 0])? as u32;
        if dumpable != image.dumpable {
            prctl(ctx, pid, &format!("prctl(PR_SET_DUMPABLE, {})", image.dumpable), [PR_SET_DUMPABLE, image.dumpable as u64, 0, 0, 0])?;
        }
        for (t, &tid) in image.threads.iter().zip(&tids) {
            // Set even when none: a tree's blank child holds SIGKILL until here (it
            // dies with its parent should ferry die first), and no change of
            // credentials may have reset it.
            prctl(ctx, tid, &format!("prctl(PR_SET_PDEATHSIG, {})", t.creds.pdeathsig), [PR_SET_PDEATHSIG, t.creds.pdeathsig as u64, 0, 0, 0])?;
        }
        // Read it all back: what the kernel did not take exactly fails the restore.
        self.doing = "checking the credentials".into();
        for (t, &tid) in image.threads.iter().zip(&tids) {
            let got = read_thread(ctx, tid)?;
            if let Some(diff) = first_difference(&t.creds, &got) {
                return Err(format!("process {pid} thread {tid}: after restoring its credentials, {diff}"));
            }
        }
        let dumpable = prctl(ctx, pid, "prctl(PR_GET_DUMPABLE)", [PR_GET_DUMPABLE, 0, 0, 0, 0])? as u32;
        if dumpable != image.dumpable {
            return Err(format!("process {pid}: dumpable is {dumpable} after the restore, want {}", image.dumpable));
        }
        let adj = oom_score_adj(ctx)?;
        if adj != image.oom_score_adj {
            return Err(format!("process {pid}: oom_score_adj is {adj} after the restore, want {}", image.oom_score_adj));
        }
        self.status.entities_done += 1;
        Ok(())
    }

    /// Thread `tid` (still root with every capability, as ferry made it) becomes `c`.
    /// The order matters: each step needs a privilege the next ones give up.
    fn set_thread(&mut self, ctx: &mut ContextRef<'_>, tid: i32, c: &Creds, known: u64) -> Result<(), String> {
        let pid = ctx.pid();
        let fail = |what: String| move |e: String| format!("process {pid} thread {tid}: {what}: {e}");
        let now = read_thread(ctx, tid)?;
        // A root process restored by root: nothing to change (the parent-death signal
        // is set after every thread).
        if first_difference(c, &Creds { pdeathsig: c.pdeathsig, ..now.clone() }).is_none() {
            return Ok(());
        }
        if c.lsm_label != now.lsm_label {
            return Err(format!(
                "process {pid} thread {tid}: its LSM label is {:?}, the restore child's {:?}, and ferry does not change labels",
                c.lsm_label, now.lsm_label
            ));
        }

        // The login uid: only the thread itself may write it, and once set only with
        // CAP_AUDIT_CONTROL (never when the kernel made it immutable).
        if c.loginuid != now.loginuid {
            self.set_loginuid(ctx, tid, c.loginuid).map_err(|e| {
                format!(
                    "process {pid} thread {tid}: the audit login uid cannot be set to {} (the restore child has {}): {e}",
                    c.loginuid, now.loginuid
                )
            })?;
        }
        // Uid changes must leave the capabilities alone until the end.
        prctl(ctx, tid, "prctl(PR_SET_SECUREBITS, KEEP_CAPS|NO_SETUID_FIXUP)", [PR_SET_SECUREBITS, SECBIT_KEEP_CAPS | SECBIT_NO_SETUID_FIXUP, 0, 0, 0])
            .map_err(fail("keeping capabilities across the uid change".into()))?;

        let mut scratch = Scratch::new(ctx);
        let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_le_bytes()).collect();
        let at = scratch.put(ctx, &groups)?;
        util::syscall(ctx, tid, "setgroups", libc::SYS_setgroups, [c.groups.len() as u64, at, 0, 0, 0, 0])
            .map_err(fail(format!("setting the supplementary groups to {:?}", c.groups)))?;
        let [r, e, s, fs] = c.gids.map(u64::from);
        util::syscall(ctx, tid, "setresgid", libc::SYS_setresgid, [r, e, s, 0, 0, 0]).map_err(fail(format!("setting the gids to {:?}", c.gids)))?;
        // setfsgid answers the previous fsgid, never an error: the read-back checks it.
        util::syscall_raw(ctx, tid, libc::SYS_setfsgid, [fs, 0, 0, 0, 0, 0])?;
        let [r, e, s, fs] = c.uids.map(u64::from);
        util::syscall(ctx, tid, "setresuid", libc::SYS_setresuid, [r, e, s, 0, 0, 0]).map_err(fail(format!("setting the uids to {:?}", c.uids)))?;
        util::syscall_raw(ctx, tid, libc::SYS_setfsuid, [fs, 0, 0, 0, 0, 0])?;

        // The inheritable set before the bounding set shrinks (capset refuses
        // inheritable capabilities outside it), and the ambient set needs it.
        self.capset(ctx, tid, now.cap_permitted, now.cap_permitted, c.cap_inheritable).map_err(fail("setting the inheritable capabilities".into()))?;
        prctl(ctx, tid, "prctl(PR_CAP_AMBIENT_CLEAR_ALL)", [PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0])?;
        for cap in caps_of(c.cap_ambient) {
            prctl(ctx, tid, &format!("prctl(PR_CAP_AMBIENT_RAISE, {cap})"), [PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0])
                .map_err(fail(format!("raising ambient capability {cap}")))?;
        }
        for cap in caps_of(now.cap_bounding & known & !c.cap_bounding) {
            prctl(ctx, tid, &format!("prctl(PR_CAPBSET_DROP, {cap})"), [PR_CAPBSET_DROP, cap, 0, 0, 0])
                .map_err(fail(format!("dropping capability {cap} from the bounding set")))?;
        }
        if c.no_new_privs && !now.no_new_privs {
            prctl(ctx, tid, "prctl(PR_SET_NO_NEW_PRIVS)", [PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0])?;
        } else if !c.no_new_privs && now.no_new_privs {
            return Err(format!("process {pid} thread {tid}: the restore child has no_new_privs, which cannot be cleared"));
        }
        // Needs CAP_SETPCAP, which the last capset may take away.
        prctl(ctx, tid, &format!("prctl(PR_SET_SECUREBITS, {:#x})", c.securebits), [PR_SET_SECUREBITS, c.securebits as u64, 0, 0, 0])
            .map_err(fail(format!("setting the securebits to {:#x}", c.securebits)))?;
        self.capset(ctx, tid, c.cap_effective, c.cap_permitted, c.cap_inheritable).map_err(fail(format!(
            "setting the capabilities to effective {:#x}, permitted {:#x}, inheritable {:#x}",
            c.cap_effective, c.cap_permitted, c.cap_inheritable
        )))?;
        Ok(())
    }

    fn capset(&mut self, ctx: &mut ContextRef<'_>, tid: i32, effective: u64, permitted: u64, inheritable: u64) -> Result<(), String> {
        let (header, data) = capset_args(effective, permitted, inheritable);
        let mut scratch = Scratch::new(ctx);
        let h = scratch.put(ctx, &header)?;
        let d = scratch.put(ctx, &data)?;
        util::syscall(ctx, tid, "capset", libc::SYS_capset, [h, d, 0, 0, 0, 0]).map(|_| ())
    }

    /// Writes `/proc/thread-self/loginuid` from inside thread `tid`.
    fn set_loginuid(&mut self, ctx: &mut ContextRef<'_>, tid: i32, uid: u32) -> Result<(), String> {
        let mut scratch = Scratch::new(ctx);
        let path = scratch.cstr(ctx, "/proc/thread-self/loginuid")?;
        let text = uid.to_string();
        let buf = scratch.put(ctx, text.as_bytes())?;
        let flags = (libc::O_WRONLY | libc::O_CLOEXEC) as u64;
        let fd = util::syscall(ctx, tid, "opening /proc/thread-self/loginuid", libc::SYS_openat, [libc::AT_FDCWD as u64, path, flags, 0, 0, 0])?;
        let written = util::syscall(ctx, tid, "writing /proc/thread-self/loginuid", libc::SYS_write, [fd, buf, text.len() as u64, 0, 0, 0]);
        util::syscall(ctx, tid, "close", libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
        written.map(|_| ())
    }
}

impl SubsystemPlugin for Plugin {
    fn info(&self) -> SubsystemInfo {
        SubsystemInfo {
            entity_kinds: names(&["credentials"]),
            // After every other plugin of the request: their injected calls may need
            // the privileges this one gives up.
            after: names(&["*"]),
            shared_resources: names(&[]),
        }
    }

    fn checkpoint(&mut self, ctx: &mut ContextRef<'_>, sink: &mut SinkRef<'_>) -> Result<Progress, String> {
        let image = self.capture(ctx)?;
        util::put_json(sink, "creds", &image)?;
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

ferry_plugin_api::export_subsystem!(
    "creds",
    "Credentials (uids, gids, groups, capabilities, securebits, login uid), dumpable, parent-death signal, oom_score_adj",
    Plugin::default
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fuzz_seeds_of_real_checkpoints_decode() {
        ferry_plugin_api::testing::assert_seeds_decode(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/plugin_creds"), |s| decode(s).map(drop));
    }

    const STATUS: &str = "Name:\tworkload\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t7\nUid:\t65534\t4012\t4013\t4014\nGid:\t65534\t4002\t4003\t4004\nFDSize:\t64\nGroups:\t65534 4242 4343 \nNoNewPrivs:\t1\nSeccomp:\t0\nCapInh:\t0000000000010400\nCapPrm:\t0000000000000401\nCapEff:\t0000000000000400\nCapBnd:\t000001ffffbeffff\nCapAmb:\t0000000000000400\n";

    #[test]
    fn status_gives_ids_groups_and_capabilities() {
        let c = parse_status(STATUS).unwrap();
        assert_eq!(c.uids, [65534, 4012, 4013, 4014]);
        assert_eq!(c.gids, [65534, 4002, 4003, 4004]);
        assert_eq!(c.groups, vec![4242, 4343, 65534]);
        assert_eq!((c.cap_inheritable, c.cap_permitted, c.cap_effective), (0x10400, 0x401, 0x400));
        assert_eq!((c.cap_bounding, c.cap_ambient), (0x1ff_ffbe_ffff, 0x400));
        assert!(c.no_new_privs);
        assert!(parse_status(&STATUS.replace("Groups:\t65534 4242 4343 ", "Groups:\t")).unwrap().groups.is_empty());
        assert!(parse_status(&STATUS.replace("\t4014", "")).is_err());
        assert!(parse_status(&STATUS.replace("CapAmb:\t0000000000000400\n", "")).is_err());
        assert!(parse_status(&STATUS.replace("0000000000000401", "zz")).is_err());
    }

    #[test]
    fn capset_words_and_cap_masks() {
        let (h, d) = capset_args(1 << 33 | 1, 1 << 40 | 3, 1 << 2);
        assert_eq!(u32::from_le_bytes(h[0..4].try_into().unwrap()), CAPABILITY_VERSION_3);
        let w = |i: usize| u32::from_le_bytes(d[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!([w(0), w(1), w(2), w(3), w(4), w(5)], [1, 3, 4, 2, 1 << 8, 0]);
        assert_eq!(all_caps(40), 0x1ff_ffff_ffff);
        assert_eq!(all_caps(63), u64::MAX);
        assert_eq!(caps_of(0b1010).collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn records_are_checked_and_differences_named() {
        let creds = parse_status(STATUS).unwrap();
        let good = Image { version: FORMAT_VERSION, dumpable: 1, oom_score_adj: 0, threads: vec![Thread { tid: 7, fs_base: 0, creds: creds.clone() }] };
        assert!(check(&good).is_ok());
        let bad = |f: &dyn Fn(&mut Image)| {
            let mut i = good.clone();
            f(&mut i);
            check(&i).is_err()
        };
        assert!(bad(&|i| i.version = 9));
        assert!(bad(&|i| i.dumpable = 2));
        assert!(bad(&|i| i.oom_score_adj = 1001));
        assert!(bad(&|i| i.threads.clear()));
        assert!(bad(&|i| i.threads[0].creds.cap_effective = 0x800));
        assert!(bad(&|i| i.threads[0].creds.cap_ambient = 0x1));
        assert!(bad(&|i| i.threads[0].creds.groups = vec![5, 4]));
        assert!(bad(&|i| i.threads[0].creds.pdeathsig = 65));
        assert!(bad(&|i| i.threads[0].creds.uids[1] = u32::MAX));
        assert_eq!(first_difference(&creds, &creds), None);
        let root = Creds { uids: [0; 4], ..creds.clone() };
        assert!(first_difference(&creds, &root).unwrap().contains("uids"));
        let more = Creds { cap_bounding: u64::MAX, ..creds.clone() };
        assert!(first_difference(&creds, &more).unwrap().contains("bounding"));
    }
}

#[cfg(test)]
mod mock_tests;
