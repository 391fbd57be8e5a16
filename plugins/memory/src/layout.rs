//! The address-space layout as the image records it, its checks, and the two
//! restore steps that act on the whole layout: moving the kernel's special mappings
//! and `PR_SET_MM_MAP`.

use std::os::unix::fs::MetadataExt;

use ferry_plugin_api::{
    util::{self, Scratch, Vma},
    ContextRef,
};
use serde::{Deserialize, Serialize};

use ferry_plugin_api::ranges;

pub const PAGE: u64 = 4096;
/// The top of user space on x86_64 with 4-level page tables.
pub const USER_TOP: u64 = 0x7fff_ffff_f000;
/// More auxv words than any kernel keeps (`saved_auxv` is about 50).
const MAX_AUXV: usize = 128;

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AreaKind {
    /// Private anonymous memory: heap, stack, anonymous mmap.
    Anon,
    /// A file mapping, private or shared.
    File,
    /// `[vdso]`, `[vvar]`, `[vvar_vclock]`: the kernel's, moved rather than mapped.
    Special,
    /// Shared anonymous memory (`MAP_SHARED | MAP_ANONYMOUS`): its pages are in the
    /// image; one object (`object`) may span several adjacent areas (split by
    /// `mprotect`, say), and is made again as one.
    Shmem,
    /// A mapping of a file deleted since, or of a memfd, private or shared: the object
    /// is made again from the image (`gone`), `object` its index there.
    Deleted,
    /// A System V shared memory segment attached (`shmat`), `object` its id: made
    /// again (`sysv`), its pages in the image as shared anonymous memory's are.
    Sysv,
}

/// What identifies a mapped file, to refuse a restore if it changed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileId {
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Area {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: u64,
    pub shared: bool,
    pub kind: AreaKind,
    /// The file, or the special area's name (`vdso`).
    pub path: Option<String>,
    pub offset: u64,
    pub growsdown: bool,
    pub file: Option<FileId>,
    /// Shared anonymous memory: the object's inode, the same for each of its areas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<u64>,
    /// The `VmFlags` codes of its advice and lock (`dc`, `wf`, `hg`, `lo`, …: see
    /// `vmflags`), made again once its pages are in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
    /// Guard regions in it (`MADV_GUARD_INSTALL`): pages that fault, with nothing
    /// behind them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guards: Vec<(u64, u64)>,
}

impl Area {
    /// Whether the area's contents live in memory only (and so are in the image).
    pub fn has_pages(&self) -> bool {
        (!self.shared || matches!(self.kind, AreaKind::Shmem | AreaKind::Sysv)) && self.kind != AreaKind::Special
    }

    /// Whether pre-copy may send the area's pages while the process runs: private
    /// anonymous, readable, not a stack that grows (its flag cannot be added later).
    pub fn premappable(&self) -> bool {
        self.kind == AreaKind::Anon && !self.shared && !self.growsdown && self.prot & libc::PROT_READ as u64 != 0
    }

    /// Whether post-copy may leave the area's pages to follow after the resume: not
    /// where the process locked them, which it expects present (locking them in the
    /// restored process would fault each one through the userfaultfd before it runs),
    /// nor where it asked them wiped on fork (a child forked before they arrived gets
    /// the pages it lacks from the source, but must see zeros there).
    pub fn lazyable(&self) -> bool {
        self.premappable() && !self.locked() && !self.flags.iter().any(|f| f == crate::vmflags::WIPE_ON_FORK) && self.guards.is_empty()
    }

    pub fn locked(&self) -> bool {
        self.flags.iter().any(|f| f == crate::vmflags::LOCKED)
    }

    /// The image's view of a mapping; `None` for what is not the process's to keep.
    pub fn from_vma(vma: &Vma) -> Result<Option<Area>, String> {
        let mut area = Area {
            start: vma.start,
            end: vma.end,
            prot: vma.prot(),
            shared: vma.shared(),
            kind: AreaKind::Anon,
            path: None,
            offset: vma.offset,
            growsdown: false,
            file: None,
            object: None,
            flags: Vec::new(),
            guards: Vec::new(),
        };
        let at = format!("{:#x}-{:#x}", vma.start, vma.end);
        match vma.special() {
            Some("vsyscall") => return Ok(None),
            Some(name) if name.starts_with("vdso") || name.starts_with("vvar") => {
                area.kind = AreaKind::Special;
                area.path = Some(name.to_string());
                return Ok(Some(area));
            }
            Some(name) => {
                area.growsdown = name == "stack";
                area.offset = 0;
            }
            // Before the anonymous ones: segment 0 shows inode 0.
            None if vma.shared() && vma.path.starts_with("/SYSV") => {
                area.kind = AreaKind::Sysv;
                area.object = Some(vma.inode);
            }
            None if !vma.file_backed() => area.offset = 0,
            // What the kernel names a MAP_SHARED | MAP_ANONYMOUS mapping's object.
            None if vma.shared() && vma.path == "/dev/zero (deleted)" => {
                area.kind = AreaKind::Shmem;
                area.object = Some(vma.inode);
            }
            // System V shared memory shows as a deleted file of its own.
            None if vma.path.ends_with(" (deleted)") && !vma.path.starts_with("/SYSV") && crate::gone::deleted_path(&vma.path).is_some() => {
                area.kind = AreaKind::Deleted;
                area.path = crate::gone::deleted_path(&vma.path).map(str::to_string);
            }
            None => {
                if vma.path.ends_with(" (deleted)") {
                    return Err(format!(
                        "mapping {at} is of {}, which was deleted or is shared memory: not supported by the memory plugin",
                        vma.path
                    ));
                }
                let meta = std::fs::metadata(&vma.path).map_err(|e| format!("mapping {at}: {}: {e}", vma.path))?;
                area.kind = AreaKind::File;
                area.path = Some(vma.path.clone());
                area.file = Some(FileId { size: meta.size(), mtime_sec: meta.mtime(), mtime_nsec: meta.mtime_nsec() });
            }
        }
        if area.kind == AreaKind::Anon && area.shared {
            return Err(format!("mapping {at} is shared anonymous memory: not supported by the memory plugin"));
        }
        Ok(Some(area))
    }
}

/// Each shared anonymous object of `areas`, in the order of its first area, with the
/// size it must have again: up to the furthest offset any of its areas maps. An object
/// may be mapped in several areas: split by `mprotect`, or the same pages mapped more
/// than once (`mremap` with `old_size` 0), at any offsets; each area is made again from
/// the one object at its own offset.
pub fn shmem_objects(areas: &[Area]) -> Result<Vec<(u64, u64)>, String> {
    let mut objects: Vec<(u64, u64)> = Vec::new(); // (object, size)
    for a in areas.iter().filter(|a| a.kind == AreaKind::Shmem) {
        let object = a.object.ok_or_else(|| format!("the image's shared mapping {:#x}-{:#x} names no object", a.start, a.end))?;
        let end = a.offset.checked_add(a.end - a.start).filter(|&e| e <= USER_TOP).ok_or_else(|| {
            format!("the image's shared mapping {:#x}-{:#x} lies at offset {:#x} of its object", a.start, a.end, a.offset)
        })?;
        match objects.iter_mut().find(|o| o.0 == object) {
            Some(o) => o.1 = o.1.max(end),
            None => objects.push((object, end)),
        }
    }
    Ok(objects)
}

/// A stretch of `len` bytes that none of `busy` meets, above 4 GiB, for a temporary
/// mapping of the restore child's.
pub fn free_stretch(busy: &[(u64, u64)], len: u64) -> Option<u64> {
    let busy = ranges::normalize(busy.to_vec());
    let mut at: u64 = 1 << 32;
    for &(s, e) in &busy {
        if e <= at {
            continue;
        }
        if s >= at && s - at >= len {
            return Some(at);
        }
        at = at.max(e);
    }
    (at.checked_add(len)? <= USER_TOP).then_some(at)
}

/// Everything of the address space `PR_SET_MM_MAP` restores, and the areas.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MmState {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: Vec<u64>,
    pub exe: String,
    pub areas: Vec<Area>,
    /// After pre-copy: the ranges whose pages the destination already holds from the
    /// rounds (only the pages written since follow), and among them those the process
    /// has dropped since (to be emptied there).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<(u64, u64)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zap: Vec<(u64, u64)>,
    /// Post-copy: pages that follow after the process resumes, as far as the source
    /// has them (whole areas are listed unscanned; the rest of the private anonymous
    /// areas reads as zeros).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lazy: Vec<(u64, u64)>,
    /// Post-copy or hybrid: the source waits for the destination to say every page is
    /// in, also when none follows (`lazy` empty), so a pager runs there all the same.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lazy_event: bool,
    /// `PR_GET_THP_DISABLE`'s answer (0: huge pages as the system says).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub thp_disable: u64,
    /// `mlockall` flags kept for mappings to come (`MCL_FUTURE`, `MCL_ONFAULT`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lock_future: u64,
    /// `PR_GET_MEMORY_MERGE`'s answer (1: KSM may merge every mapping, future ones too).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub merge_any: u64,
    /// System V shared memory segments this process carries (the others its areas
    /// attach, another process of the tree carries).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sysv: Vec<crate::sysv::Segment>,
    /// Shared anonymous objects (inodes) another process of the tree carries and
    /// makes: their areas are mapped from that one's (see `shmem`), no pages follow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub elsewhere: Vec<u64>,
    /// Deleted files and memfds the areas map (`AreaKind::Deleted`, by index).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gone: Vec<crate::gone::Gone>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl MmState {
    /// Builds the state from `/proc/PID/stat`, the current brk, `/proc/PID/auxv`.
    pub fn capture(stat: &str, brk: u64, auxv: &[u8], exe: String, areas: Vec<Area>) -> Result<MmState, String> {
        let close = stat.rfind(')').ok_or("malformed /proc/PID/stat")?;
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // `field(n)` is stat field n as proc(5) numbers them (pid is 1, comm 2).
        let field = |n: usize| -> Result<u64, String> {
            fields.get(n - 3).and_then(|f| f.parse().ok()).ok_or_else(|| format!("/proc/PID/stat has no field {n}"))
        };
        let words: Vec<u64> = auxv
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        // Up to and including the AT_NULL pair.
        let used = words.chunks_exact(2).position(|p| p[0] == 0).map_or(words.len(), |i| 2 * i + 2);
        Ok(MmState {
            start_code: field(26)?,
            end_code: field(27)?,
            start_stack: field(28)?,
            start_data: field(45)?,
            end_data: field(46)?,
            start_brk: field(47)?,
            arg_start: field(48)?,
            arg_end: field(49)?,
            env_start: field(50)?,
            env_end: field(51)?,
            brk,
            auxv: words[..used.min(words.len())].to_vec(),
            exe,
            areas,
            kept: Vec::new(),
            zap: Vec::new(),
            lazy: Vec::new(),
            lazy_event: false,
            thp_disable: 0,
            lock_future: 0,
            merge_any: 0,
            sysv: Vec::new(),
            elsewhere: Vec::new(),
            gone: Vec::new(),
        })
    }

    /// Checks what the image claims before acting on any of it.
    pub fn validate(&self) -> Result<(), String> {
        if self.auxv.len() > MAX_AUXV || !self.auxv.len().is_multiple_of(2) {
            return Err(format!("the image's auxv has {} words", self.auxv.len()));
        }
        if self.exe.is_empty() {
            return Err("the image names no executable".into());
        }
        let mut last_end = 0;
        for a in &self.areas {
            let at = format!("{:#x}-{:#x}", a.start, a.end);
            if a.start % PAGE != 0 || a.end % PAGE != 0 || a.end <= a.start || a.start < last_end {
                return Err(format!("the image's mapping {at} is misaligned, empty or overlaps the one before"));
            }
            if a.kind != AreaKind::Special && a.end > USER_TOP {
                return Err(format!("the image's mapping {at} lies outside user space"));
            }
            if a.prot & !0x7 != 0 || a.offset % PAGE != 0 {
                return Err(format!("the image's mapping {at} has protection {:#x}, offset {:#x}", a.prot, a.offset));
            }
            if a.kind == AreaKind::File && (a.path.is_none() || a.file.is_none()) {
                return Err(format!("the image's file mapping {at} names no file"));
            }
            if (a.kind == AreaKind::Shmem) != (a.object.is_some() && a.shared) && !matches!(a.kind, AreaKind::Deleted | AreaKind::Sysv) {
                return Err(format!("the image's mapping {at} is half a shared anonymous one"));
            }
            if a.kind == AreaKind::Special && !a.flags.is_empty() {
                return Err(format!("the image gives the kernel's mapping {at} flags"));
            }
            crate::vmflags::validate(&at, &a.flags, a.kind == AreaKind::Anon && !a.shared)?;
            let mut guard_end = a.start;
            for &(s, e) in &a.guards {
                if s % PAGE != 0 || e % PAGE != 0 || s < guard_end || e <= s || e > a.end || a.kind == AreaKind::Special {
                    return Err(format!("the image's mapping {at} has a bad guard region {s:#x}-{e:#x}"));
                }
                guard_end = e;
            }
            last_end = a.end;
        }
        shmem_objects(&self.areas)?;
        crate::gone::validate(&self.gone, &self.areas)?;
        let premapped: Vec<(u64, u64)> = self.areas.iter().filter(|a| a.premappable()).map(|a| (a.start, a.end)).collect();
        let premapped = ranges::normalize(premapped);
        for &(s, e) in &self.kept {
            if s % PAGE != 0 || e % PAGE != 0 || s >= e || !ranges::covers(&premapped, (s, e)) {
                return Err(format!("the image keeps pre-copied pages at {s:#x}-{e:#x}, outside its private anonymous areas"));
            }
        }
        let lazyable = ranges::normalize(self.areas.iter().filter(|a| a.lazyable()).map(|a| (a.start, a.end)).collect());
        for &(s, e) in &self.lazy {
            if s % PAGE != 0 || e % PAGE != 0 || s >= e || !ranges::covers(&lazyable, (s, e)) {
                return Err(format!("the image has lazy pages at {s:#x}-{e:#x}, outside its private anonymous areas or in locked ones"));
            }
        }
        crate::vmflags::validate_policy(&self.policy())?;
        let kept = ranges::normalize(self.kept.clone());
        for &(s, e) in &self.zap {
            if s % PAGE != 0 || e % PAGE != 0 || s >= e || !ranges::covers(&kept, (s, e)) {
                return Err(format!("the image empties pages at {s:#x}-{e:#x}, outside what it keeps"));
            }
        }
        Ok(())
    }

    pub fn policy(&self) -> crate::vmflags::Policy {
        crate::vmflags::Policy { thp_disable: self.thp_disable, lock_future: self.lock_future, merge_any: self.merge_any }
    }

    /// Refuses clearly when a mapped file is not the one the process had mapped.
    pub fn check_files(&self) -> Result<(), String> {
        for a in self.areas.iter().filter(|a| a.kind == AreaKind::File) {
            let (Some(path), Some(id)) = (&a.path, &a.file) else { continue };
            let meta = std::fs::metadata(path).map_err(|e| format!("mapped file {path}: {e}"))?;
            if meta.size() != id.size {
                return Err(format!("mapped file {path} changed since the checkpoint: size {} is now {}", id.size, meta.size()));
            }
            if (meta.mtime(), meta.mtime_nsec()) != (id.mtime_sec, id.mtime_nsec) {
                return Err(format!("mapped file {path} changed since the checkpoint (modification time differs)"));
            }
        }
        Ok(())
    }
}

/// Encodes runs of pages: a count, then (address, pages) pairs, all u64 LE.
pub fn encode_runs(runs: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 16 * runs.len());
    out.extend_from_slice(&(runs.len() as u64).to_le_bytes());
    for &(addr, n) in runs {
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
    }
    out
}

/// Runs of pages, (address, pages).
pub type Runs = Vec<(u64, u64)>;

/// Decodes a `pages` payload into its runs and data, trusting no count.
pub fn decode_runs(payload: &[u8]) -> Result<(Runs, &[u8]), String> {
    let count = util::u64_le(payload, 0).ok_or("a pages record without its header")?;
    if count > (payload.len() as u64).saturating_sub(8) / 16 {
        return Err(format!("a pages record claims {count} runs in {} bytes", payload.len()));
    }
    let mut runs = Vec::with_capacity(count as usize);
    let mut total: u64 = 0;
    for i in 0..count as usize {
        let addr = util::u64_le(payload, 8 + 16 * i).ok_or("truncated run")?;
        let n = util::u64_le(payload, 16 + 16 * i).ok_or("truncated run")?;
        if addr % PAGE != 0 || n == 0 || addr.checked_add(n.saturating_mul(PAGE)).is_none_or(|e| e > USER_TOP) {
            return Err(format!("a pages record has a bad run {addr:#x} (+{n} pages)"));
        }
        total = total.saturating_add(n.saturating_mul(PAGE));
        runs.push((addr, n));
    }
    let data = &payload[8 + 16 * count as usize..];
    if data.len() as u64 != total {
        return Err(format!("a pages record holds {} bytes for {total} bytes of pages", data.len()));
    }
    Ok((runs, data))
}

fn mremap(ctx: &mut ContextRef<'_>, from: u64, len: u64, to: u64) -> Result<(), String> {
    let pid = ctx.pid();
    let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
    let got = util::syscall(ctx, pid, &format!("mremap {from:#x} to {to:#x}"), libc::SYS_mremap, [from, len, len, flags, to, 0])?;
    if got != to {
        return Err(format!("mremap of {from:#x} landed at {got:#x}"));
    }
    Ok(())
}

/// Moves the child's vDSO and vvar areas to where the image had them, each on its
/// own (a process may have moved its vDSO away from its vvar), through a free stretch
/// first so that old and new places may overlap. Those the image lacks (the process
/// unmapped them) are unmapped: the copy must not find a vDSO it did not have.
pub fn move_specials(ctx: &mut ContextRef<'_>, child: &[Vma], areas: &[Area]) -> Result<(), String> {
    let wanted: Vec<&Area> = areas.iter().filter(|a| a.kind == AreaKind::Special).collect();
    let pid = ctx.pid();
    for v in child.iter().filter(|v| v.special().is_some_and(|n| n.starts_with("vdso") || n.starts_with("vvar"))) {
        if !wanted.iter().any(|a| a.path.as_deref() == v.special()) {
            let what = format!("munmap of the restore child's [{}], which the image has not", v.special().unwrap_or(""));
            util::syscall(ctx, pid, &what, libc::SYS_munmap, [v.start, v.len(), 0, 0, 0, 0])?;
        }
    }
    let mut moves = Vec::new();
    for a in &wanted {
        let name = a.path.as_deref().unwrap_or("");
        let here = child
            .iter()
            .find(|v| v.special() == Some(name))
            .ok_or_else(|| format!("this kernel has no [{name}] area; restore on the kernel that made the image"))?;
        if here.len() != a.end - a.start {
            return Err(format!(
                "this kernel's [{name}] is {} bytes, the image's {}: restore on the kernel that made the image",
                here.len(),
                a.end - a.start
            ));
        }
        moves.push((here.start, here.len(), a.start));
    }
    if moves.iter().all(|&(from, _, to)| from == to) {
        return Ok(());
    }
    let lo = moves.iter().map(|m| m.0).min().unwrap_or(0);
    let span = moves.iter().map(|m| m.0 + m.1).max().unwrap_or(0) - lo;
    let busy = |s: u64, e: u64| {
        child.iter().any(|v| v.start < e && s < v.end) || wanted.iter().any(|a| a.start < e && s < a.end)
    };
    let temp = (1..64u64)
        .map(|k| k << 36)
        .find(|&t| !busy(t, t + span))
        .ok_or("no free stretch to move the vDSO through")?;
    for &(from, len, _) in &moves {
        mremap(ctx, from, len, temp + (from - lo))?;
    }
    for &(from, len, to) in &moves {
        mremap(ctx, temp + (from - lo), len, to)?;
    }
    Ok(())
}

/// `prctl(PR_SET_MM, PR_SET_MM_MAP)`: brk, stack, arg/env, auxv and the exe file in one call.
pub fn set_mm(ctx: &mut ContextRef<'_>, state: &MmState) -> Result<(), String> {
    let pid = ctx.pid();
    let mut scratch = Scratch::new(ctx);
    let auxv: Vec<u8> = state.auxv.iter().flat_map(|w| w.to_le_bytes()).collect();
    let auxv_at = scratch.put(ctx, &auxv)?;
    let exe_at = scratch.cstr(ctx, &state.exe)?;
    let exe_fd = util::syscall(ctx, pid, &format!("open {}", state.exe), libc::SYS_openat, [libc::AT_FDCWD as u64, exe_at, (libc::O_RDONLY | libc::O_CLOEXEC) as u64, 0, 0, 0])?;
    let mut map = Vec::with_capacity(104);
    for v in [
        state.start_code,
        state.end_code,
        state.start_data,
        state.end_data,
        state.start_brk,
        state.brk,
        state.start_stack,
        state.arg_start,
        state.arg_end,
        state.env_start,
        state.env_end,
        auxv_at,
    ] {
        map.extend_from_slice(&v.to_le_bytes());
    }
    map.extend_from_slice(&(auxv.len() as u32).to_le_bytes());
    map.extend_from_slice(&(exe_fd as u32).to_le_bytes());
    let map_at = scratch.put(ctx, &map)?;
    const PR_SET_MM: u64 = 35;
    const PR_SET_MM_MAP: u64 = 14;
    let r = util::syscall(ctx, pid, "prctl(PR_SET_MM_MAP)", libc::SYS_prctl, [PR_SET_MM, PR_SET_MM_MAP, map_at, map.len() as u64, 0, 0]);
    util::syscall(ctx, pid, "close", libc::SYS_close, [exe_fd, 0, 0, 0, 0, 0])?;
    r.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_round_trip_and_lies_are_refused() {
        let runs = vec![(0x1000, 2), (0x8000, 1)];
        let mut payload = encode_runs(&runs);
        payload.extend(vec![7u8; 3 * PAGE as usize]);
        let (back, data) = decode_runs(&payload).unwrap();
        assert_eq!(back, runs);
        assert_eq!(data.len(), 3 * PAGE as usize);
        // One byte short of the pages it claims.
        assert!(decode_runs(&payload[..payload.len() - 1]).is_err());
        // A count no payload could hold.
        let mut lie = payload.clone();
        lie[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_runs(&lie).is_err());
        // A misaligned run.
        let mut bad = encode_runs(&[(0x1001, 1)]);
        bad.extend(vec![0u8; PAGE as usize]);
        assert!(decode_runs(&bad).is_err());
        assert!(decode_runs(&[1, 2]).is_err());
    }

    #[test]
    fn stat_fields_are_taken_by_their_proc5_numbers() {
        // A comm with spaces and parentheses, as the kernel allows.
        let mut stat = String::from("42 (a (b) c) S");
        for n in 4..=52 {
            stat.push_str(&format!(" {}", n * 1000));
        }
        let auxv: Vec<u8> = [6u64, 4096, 0, 0, 99, 99].iter().flat_map(|w| w.to_le_bytes()).collect();
        let st = MmState::capture(&stat, 0x5000, &auxv, "/bin/x".into(), vec![]).unwrap();
        assert_eq!(st.start_code, 26_000);
        assert_eq!(st.start_stack, 28_000);
        assert_eq!(st.env_end, 51_000);
        assert_eq!(st.auxv, vec![6, 4096, 0, 0]);
        st.validate().unwrap();
    }

    #[test]
    fn overlapping_or_misaligned_areas_are_refused() {
        let area = |start, end| Area {
            start,
            end,
            prot: 3,
            shared: false,
            kind: AreaKind::Anon,
            path: None,
            offset: 0,
            growsdown: false,
            file: None,
            object: None,
            flags: vec![],
            guards: vec![],
        };
        let mut st = MmState::capture("1 (x) S", 0, &[], "/x".into(), vec![]).unwrap_or_else(|_| MmState {
            start_code: 0,
            end_code: 0,
            start_data: 0,
            end_data: 0,
            start_brk: 0,
            brk: 0,
            start_stack: 0,
            arg_start: 0,
            arg_end: 0,
            env_start: 0,
            env_end: 0,
            auxv: vec![],
            exe: "/x".into(),
            areas: vec![],
            kept: vec![],
            zap: vec![],
            lazy: vec![],
            lazy_event: false,
            thp_disable: 0,
            lock_future: 0,
            merge_any: 0,
            sysv: vec![],
            elsewhere: vec![],
            gone: vec![],
        });
        st.areas = vec![area(0x1000, 0x3000), area(0x2000, 0x4000)];
        assert!(st.validate().is_err());
        st.areas = vec![area(0x1000, 0x1800)];
        assert!(st.validate().is_err());
        st.areas = vec![area(0x1000, 0x2000), area(0x2000, 0x3000)];
        st.validate().unwrap();
        // Pre-copied pages are kept only inside private anonymous areas, and only
        // kept pages may be emptied.
        st.kept = vec![(0x1000, 0x3000)];
        st.zap = vec![(0x2000, 0x3000)];
        st.validate().unwrap();
        st.kept = vec![(0x1000, 0x4000)];
        assert!(st.validate().unwrap_err().contains("outside its private anonymous areas"));
        st.kept = vec![(0x1000, 0x2000)];
        assert!(st.validate().unwrap_err().contains("outside what it keeps"));
    }

    #[test]
    fn a_shared_anonymous_object_is_made_as_big_as_its_furthest_area() {
        let shm = |start: u64, end: u64, object: u64, offset: u64| Area {
            start,
            end,
            prot: 3,
            shared: true,
            kind: AreaKind::Shmem,
            path: None,
            offset,
            growsdown: false,
            file: None,
            object: Some(object),
            flags: vec![],
            guards: vec![],
        };
        // Split in two by mprotect, and another object beside it.
        let areas = [shm(0x1000, 0x3000, 7, 0), shm(0x3000, 0x5000, 7, 0x2000), shm(0x5000, 0x6000, 8, 0)];
        assert_eq!(shmem_objects(&areas).unwrap(), vec![(7, 0x4000), (8, 0x1000)]);
        // The same pages mapped twice, elsewhere and at an offset further in.
        let twice = [shm(0x1000, 0x3000, 7, 0), shm(0x8000, 0x9000, 7, 0), shm(0x9000, 0xa000, 7, 0x5000)];
        assert_eq!(shmem_objects(&twice).unwrap(), vec![(7, 0x6000)]);
        // An offset no object can have.
        assert!(shmem_objects(&[shm(0x1000, 0x3000, 7, u64::MAX - 0x1000)]).is_err());
    }

    #[test]
    fn a_free_stretch_meets_nothing_busy() {
        let g = 1u64 << 32;
        assert_eq!(free_stretch(&[], 0x1000), Some(g));
        assert_eq!(free_stretch(&[(g, g + 0x2000), (g + 0x3000, g + 0x4000)], 0x1000), Some(g + 0x2000));
        assert_eq!(free_stretch(&[(g, g + 0x2000), (g + 0x3000, g + 0x4000)], 0x2000), Some(g + 0x4000));
        assert_eq!(free_stretch(&[(0x1000, g + 0x1000)], 0x1000), Some(g + 0x1000));
        assert_eq!(free_stretch(&[(g, USER_TOP)], 0x1000), None);
    }
}
