//! Per-mapping behaviour the kernel keeps beside the pages (`madvise` advice, guard
//! regions, `mlock`) and the address space's own memory policy (`PR_SET_THP_DISABLE`,
//! `PR_SET_MEMORY_MERGE`, `mlockall(MCL_FUTURE)`). Read at the freeze from
//! `/proc/PID/smaps` (`VmFlags:`; reading it walks every page: ~10 ms per GiB in the
//! freeze here), the pagemap and calls made in the process; applied in the restore
//! child once every page is in place. Flags a mapping has that cannot be made again
//! are refused with a line naming the process and the range.

use ferry_plugin_api::{
    util::{self, parse_maps, Vma},
    ContextRef,
};

use crate::layout::{Area, AreaKind};

/// `VmFlags` codes carried, with the `madvise` advice that sets each.
const ADVICE: [(&str, i32); 8] = [
    ("dc", libc::MADV_DONTFORK),
    ("wf", libc::MADV_WIPEONFORK),
    ("hg", libc::MADV_HUGEPAGE),
    ("nh", libc::MADV_NOHUGEPAGE),
    ("dd", libc::MADV_DONTDUMP),
    ("sr", libc::MADV_SEQUENTIAL),
    ("rr", libc::MADV_RANDOM),
    ("mg", libc::MADV_MERGEABLE),
];
/// `VM_LOCKED` (`mlock`, `mlockall`) and `VM_LOCKONFAULT` (`MLOCK_ONFAULT`, `MCL_ONFAULT`).
pub const LOCKED: &str = "lo";
pub const LOCK_ON_FAULT: &str = "lf";
/// `VM_WIPEONFORK`: a child gets the area empty.
pub const WIPE_ON_FORK: &str = "wf";
/// `VM_MAYBE_GUARD` (shown by recent kernels; 6.18 here): guard regions may lie in
/// the area; its pagemap says where.
pub const MAYBE_GUARD: &str = "gu";
const MADV_GUARD_INSTALL: u64 = 102;
/// Flags the memory plugin cannot make again, and what they are.
const REFUSED: [(&str, &str); 2] = [("sl", "sealed (mseal)"), ("ss", "a shadow stack")];

const PR_SET_THP_DISABLE: u64 = 41;
const PR_GET_THP_DISABLE: u64 = 42;
/// `PR_SET_THP_DISABLE`'s flag (Linux 6.18): huge pages only where `MADV_HUGEPAGE` asks.
const PR_THP_DISABLE_EXCEPT_ADVISED: u64 = 1 << 1;
const MLOCK_ONFAULT: u64 = 1;
const PR_SET_MEMORY_MERGE: u64 = 67;
const PR_GET_MEMORY_MERGE: u64 = 68;

/// One line of `/proc/PID/smaps` that starts a mapping: `start-end perms ...`.
fn is_header(line: &str) -> bool {
    let first = line.split(' ').next().unwrap_or("");
    first.contains('-') && first.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// Parses `/proc/PID/smaps` into each mapping with its `VmFlags` codes.
pub fn parse_smaps(text: &str) -> Result<Vec<(Vma, Vec<String>)>, String> {
    let mut headers = String::new();
    let mut flags: Vec<Vec<String>> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("VmFlags:") {
            let last = flags.last_mut().ok_or("smaps has VmFlags before any mapping")?;
            *last = rest.split_whitespace().map(str::to_owned).collect();
        } else if is_header(line) {
            headers.push_str(line);
            headers.push('\n');
            flags.push(Vec::new());
        }
    }
    Ok(parse_maps(&headers)?.into_iter().zip(flags).collect())
}

/// The codes of `vmflags` the image carries for mapping `at` of process `pid`; a flag
/// that cannot be made again is an error naming both.
pub fn carried(pid: i32, at: (u64, u64), vmflags: &[String]) -> Result<Vec<String>, String> {
    if let Some((_, what)) = REFUSED.iter().find(|(code, _)| vmflags.iter().any(|f| f == code)) {
        return Err(format!("process {pid}: mapping {:#x}-{:#x} is {what}: not supported by the memory plugin", at.0, at.1));
    }
    let known = |f: &&String| ADVICE.iter().any(|(c, _)| c == f) || *f == LOCKED || *f == LOCK_ON_FAULT;
    Ok(vmflags.iter().filter(known).cloned().collect())
}

/// Checks an image's flags for mapping `at` (`private_anon`: whether wipe-on-fork can be).
pub fn validate(at: &str, flags: &[String], private_anon: bool) -> Result<(), String> {
    for (i, f) in flags.iter().enumerate() {
        if !(ADVICE.iter().any(|(c, _)| c == f) || f == LOCKED || f == LOCK_ON_FAULT) || flags[..i].contains(f) {
            return Err(format!("the image's mapping {at} has an unknown or repeated flag {f:?}"));
        }
    }
    let has = |c: &str| flags.iter().any(|f| f == c);
    if (has("hg") && has("nh")) || (has("sr") && has("rr")) || (has(LOCK_ON_FAULT) && !has(LOCKED)) || (has("wf") && !private_anon) {
        return Err(format!("the image's mapping {at} has flags no mapping can have together: {}", flags.join(" ")));
    }
    Ok(())
}

/// The address space's memory policy, read from the stopped process.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// `PR_GET_THP_DISABLE`'s answer: 0, 1 (no huge pages), or 3 (only where advised).
    pub thp_disable: u64,
    /// `MCL_FUTURE`, with `MCL_ONFAULT` where set: mappings made from now on are locked.
    pub lock_future: u64,
    /// `PR_GET_MEMORY_MERGE`'s answer: 1 when KSM may merge every mapping, those to
    /// come too (`mg` on each area says it only of those there now).
    pub merge_any: u64,
}

/// Maps a probe page in the stopped process: the kernel gives a new mapping the
/// flags `mlockall(MCL_FUTURE)` left in the address space (`/proc` shows them nowhere
/// else). A shared anonymous page never merges with a neighbour, so its flags are its
/// own. Answers its address; [`read_policy`] reads it and [`unmap_probe`] removes it.
pub fn map_probe(ctx: &mut ContextRef<'_>) -> Result<u64, String> {
    let pid = ctx.pid();
    let flags = (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u64;
    let r = util::syscall_raw(ctx, pid, libc::SYS_mmap, [0, crate::PAGE, libc::PROT_NONE as u64, flags, u64::MAX, 0])?;
    if r == -(libc::EAGAIN as i64) {
        // Only a locked mapping past RLIMIT_MEMLOCK is refused so.
        return Err(format!(
            "process {pid}: mlockall(MCL_FUTURE) with its locked memory at RLIMIT_MEMLOCK: ferry cannot map a page to read it"
        ));
    }
    if r < 0 {
        return Err(format!("process {pid}: mmap of a probe page: {}", std::io::Error::from_raw_os_error(-r as i32)));
    }
    Ok(r as u64)
}

pub fn unmap_probe(ctx: &mut ContextRef<'_>, probe: u64) -> Result<(), String> {
    let pid = ctx.pid();
    util::syscall(ctx, pid, "munmap of the probe page", libc::SYS_munmap, [probe, crate::PAGE, 0, 0, 0, 0]).map(|_| ())
}

/// The policy of the stopped process: THP disabling asked of the kernel, and the
/// locking flags of `probe` (see [`map_probe`]) as `smaps` shows them.
pub fn read_policy(ctx: &mut ContextRef<'_>, smaps: &[(Vma, Vec<String>)], probe: u64) -> Result<Policy, String> {
    let pid = ctx.pid();
    let thp_disable = util::syscall(ctx, pid, "prctl(PR_GET_THP_DISABLE)", libc::SYS_prctl, [PR_GET_THP_DISABLE, 0, 0, 0, 0, 0])?;
    // EINVAL: a kernel without KSM, where nothing merges.
    let merge_any = match util::syscall_raw(ctx, pid, libc::SYS_prctl, [PR_GET_MEMORY_MERGE, 0, 0, 0, 0, 0])? {
        r if r == -(libc::EINVAL as i64) => 0,
        r if r < 0 => return Err(format!("prctl(PR_GET_MEMORY_MERGE) in thread {pid}: {}", std::io::Error::from_raw_os_error(-r as i32))),
        r => r as u64,
    };
    let flags = &smaps
        .iter()
        .find(|(v, _)| v.start == probe)
        .ok_or_else(|| format!("process {pid}: the probe page at {probe:#x} is not in its smaps"))?
        .1;
    let has = |c: &str| flags.iter().any(|f| f == c);
    let lock_future = match (has(LOCKED), has(LOCK_ON_FAULT)) {
        (false, _) => 0,
        (true, false) => libc::MCL_FUTURE as u64,
        (true, true) => (libc::MCL_FUTURE | libc::MCL_ONFAULT) as u64,
    };
    Ok(Policy { thp_disable, lock_future, merge_any })
}

/// Checks an image's policy.
pub fn validate_policy(p: &Policy) -> Result<(), String> {
    if ![0, 1, 1 | PR_THP_DISABLE_EXCEPT_ADVISED].contains(&p.thp_disable) {
        return Err(format!("the image's THP disable setting {} is not one prctl gives", p.thp_disable));
    }
    let future = libc::MCL_FUTURE as u64;
    if ![0, future, future | libc::MCL_ONFAULT as u64].contains(&p.lock_future) {
        return Err(format!("the image's mlockall flags {:#x} are not MCL_FUTURE", p.lock_future));
    }
    if p.merge_any > 1 {
        return Err(format!("the image's KSM merge setting {} is not one prctl gives", p.merge_any));
    }
    Ok(())
}

/// Gives the areas of the restore child their advice, guard regions and locks back,
/// once their pages are in. Advice and the locks of areas without guards first, so
/// that each area is a mapping of its own again before a guard marks the whole of its
/// mapping (`gu`); the locks of areas with guards last, as a guard cannot be installed
/// where a page is locked.
pub fn apply_all(ctx: &mut ContextRef<'_>, areas: &[Area], policy: &Policy) -> Result<(), String> {
    let flagged = |a: &&Area| a.kind != AreaKind::Special && (!a.flags.is_empty() || !a.guards.is_empty() || policy.merge_any != 0);
    for area in areas.iter().filter(flagged) {
        advise(ctx, area, policy)?;
    }
    for area in areas.iter().filter(flagged).filter(|a| a.guards.is_empty()) {
        lock(ctx, area)?;
    }
    for area in areas.iter().filter(|a| !a.guards.is_empty()) {
        guard(ctx, area)?;
        lock(ctx, area)?;
    }
    Ok(())
}

fn guard(ctx: &mut ContextRef<'_>, area: &Area) -> Result<(), String> {
    let pid = ctx.pid();
    for &(s, e) in &area.guards {
        let what = format!("process {pid}: guard region {s:#x}-{e:#x} (MADV_GUARD_INSTALL)");
        util::syscall(ctx, pid, &what, libc::SYS_madvise, [s, e - s, MADV_GUARD_INSTALL, 0, 0, 0])?;
    }
    Ok(())
}

fn advise(ctx: &mut ContextRef<'_>, area: &Area, policy: &Policy) -> Result<(), String> {
    let pid = ctx.pid();
    let (start, end, flags) = (area.start, area.end, &area.flags);
    let len = end - start;
    if policy.merge_any != 0 && !flags.iter().any(|f| f == "mg") {
        let what = format!("process {pid}: madvise {start:#x}-{end:#x} (unmergeable)");
        util::syscall(ctx, pid, &what, libc::SYS_madvise, [start, len, libc::MADV_UNMERGEABLE as u64, 0, 0, 0])?;
    }
    for f in flags {
        if let Some(&(code, advice)) = ADVICE.iter().find(|(c, _)| c == f) {
            let what = format!("process {pid}: madvise {start:#x}-{end:#x} ({code})");
            util::syscall(ctx, pid, &what, libc::SYS_madvise, [start, len, advice as u64, 0, 0, 0])?;
        }
    }
    Ok(())
}

/// Locks `area` as the process had it. Its pages are in place: locking faults in
/// what the process had locked and not sent (pages it never touched), as its `mlock`
/// did. An area that cannot be accessed (PROT_NONE: a guard page under `MCL_FUTURE`)
/// is locked while readable for a moment: `mlock` would set the flag and then fail
/// filling it (ENOMEM); readable, its missing pages are the shared zero page, which
/// costs no memory.
fn lock(ctx: &mut ContextRef<'_>, area: &Area) -> Result<(), String> {
    let pid = ctx.pid();
    let (start, end, flags) = (area.start, area.end, &area.flags);
    let len = end - start;
    if flags.iter().any(|f| f == LOCKED) {
        let onfault = if flags.iter().any(|f| f == LOCK_ON_FAULT) { MLOCK_ONFAULT } else { 0 };
        let mprotect = |ctx: &mut ContextRef<'_>, prot: u64| {
            let what = format!("process {pid}: mprotect {start:#x}-{end:#x} to lock it");
            util::syscall(ctx, pid, &what, libc::SYS_mprotect, [start, len, prot, 0, 0, 0]).map(|_| ())
        };
        let hidden = area.prot == 0;
        if hidden {
            mprotect(ctx, libc::PROT_READ as u64)?;
        }
        let what = format!("process {pid}: mlock {start:#x}-{end:#x}");
        let r = util::syscall_raw(ctx, pid, libc::SYS_mlock2, [start, len, onfault, 0, 0, 0])?;
        // With guard regions, locking sets the lock and stops filling at the first
        // guard (ENOMEM), as it did in the process.
        let stopped_at_guard = r == -(libc::ENOMEM as i64) && !area.guards.is_empty();
        if r < 0 && !stopped_at_guard {
            return Err(format!("{what}: {}", std::io::Error::from_raw_os_error(-r as i32)));
        }
        if hidden {
            mprotect(ctx, 0)?;
        }
    }
    Ok(())
}

/// THP disabling, in the restore child; before [`apply_lock_future`].
pub fn apply_thp(ctx: &mut ContextRef<'_>, p: &Policy) -> Result<(), String> {
    if p.thp_disable == 0 {
        return Ok(());
    }
    let pid = ctx.pid();
    let flags = p.thp_disable & PR_THP_DISABLE_EXCEPT_ADVISED;
    util::syscall(ctx, pid, "prctl(PR_SET_THP_DISABLE)", libc::SYS_prctl, [PR_SET_THP_DISABLE, 1, flags, 0, 0, 0]).map_err(|e| {
        if flags != 0 {
            format!("{e} (this kernel may lack PR_THP_DISABLE_EXCEPT_ADVISED, Linux 6.18)")
        } else {
            e
        }
    })?;
    Ok(())
}

/// KSM merging of every mapping (`PR_SET_MEMORY_MERGE`), in the restore child, once
/// its areas are there: it marks them all, as the original's were.
pub fn apply_merge_any(ctx: &mut ContextRef<'_>, p: &Policy) -> Result<(), String> {
    if p.merge_any == 0 {
        return Ok(());
    }
    let pid = ctx.pid();
    util::syscall(ctx, pid, "prctl(PR_SET_MEMORY_MERGE)", libc::SYS_prctl, [PR_SET_MEMORY_MERGE, 1, 0, 0, 0, 0]).map(|_| ())
}

/// `mlockall(MCL_FUTURE)`, in the restore child: the last of the memory plugin's
/// calls, since every mapping made after it is locked (and filled).
pub fn apply_lock_future(ctx: &mut ContextRef<'_>, p: &Policy) -> Result<(), String> {
    if p.lock_future == 0 {
        return Ok(());
    }
    let pid = ctx.pid();
    util::syscall(ctx, pid, "mlockall(MCL_FUTURE)", libc::SYS_mlockall, [p.lock_future, 0, 0, 0, 0, 0]).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_gives_each_mapping_its_flags() {
        let text = "7f0000000000-7f0000002000 rw-p 00000000 00:00 0 \n\
Size:                  8 kB\n\
Private-Dirty:         0 kB\n\
VmFlags: rd wr mr mw me dc lo ac \n\
7f0000002000-7f0000003000 r--p 00001000 fe:00 42                         /usr/lib/a b.so\n\
Size:                  4 kB\n\
VmFlags: rd mr mw me \n";
        let v = parse_smaps(text).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].0.start, 0x7f00_0000_0000);
        assert_eq!(v[0].1, ["rd", "wr", "mr", "mw", "me", "dc", "lo", "ac"]);
        assert_eq!(v[1].0.path, "/usr/lib/a b.so");
        assert_eq!(carried(7, (0, 0x1000), &v[0].1).unwrap(), ["dc", "lo"]);
        assert!(carried(7, (0, 0x1000), &v[1].1).unwrap().is_empty());
        assert!(parse_smaps("VmFlags: rd\n").is_err());
    }

    #[test]
    fn what_cannot_be_made_again_is_refused_naming_the_process_and_mapping() {
        let e = carried(42, (0x1000, 0x3000), &["rd".into(), "sl".into()]).unwrap_err();
        assert!(e.contains("process 42") && e.contains("0x1000-0x3000") && e.contains("mseal"), "{e}");
    }

    #[test]
    fn images_with_impossible_flags_are_refused() {
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        validate("a", &f(&["dc", "wf", "lo", "lf"]), true).unwrap();
        assert!(validate("a", &f(&["wf"]), false).is_err());
        assert!(validate("a", &f(&["lf"]), true).is_err());
        assert!(validate("a", &f(&["hg", "nh"]), true).is_err());
        assert!(validate("a", &f(&["dc", "dc"]), true).is_err());
        assert!(validate("a", &f(&["rd"]), true).is_err());
        validate_policy(&Policy { thp_disable: 3, lock_future: 6, merge_any: 1 }).unwrap();
        assert!(validate_policy(&Policy { thp_disable: 2, ..Policy::default() }).is_err());
        assert!(validate_policy(&Policy { lock_future: 4, ..Policy::default() }).is_err());
        assert!(validate_policy(&Policy { merge_any: 2, ..Policy::default() }).is_err());
    }
}
