//! The `memory` subsystem plugin: every mapping of the process with its protection,
//! flags and file identity, and the pages that exist only in memory (private
//! anonymous memory, written pages of private file mappings), moved in large
//! vectored blocks. Restore maps each area again in a blank child, fills its pages,
//! moves the vDSO to where the process expects it, gives each area its advice and
//! locks and the address space its memory policy back (`vmflags`), and sets brk,
//! stack, arg/env, auxv and the exe file with `PR_SET_MM_MAP`.

mod decode;
mod gone;
mod layout;
mod shmem;
mod sysv;
mod present;
mod vmflags;
use ferry_plugin_api::ranges;

use std::collections::VecDeque;

use ferry_plugin_api::{
    abi_stable::std_types::RVec,
    pagemap,
    plugin::SubsystemPlugin,
    util::{self, names, parse_maps, Scratch},
    ContextRef, MemRange, Progress, Record, RecordFormat, SinkRef, SourceRef, Status, SubsystemInfo,
};

use layout::{Area, AreaKind, MmState, PAGE};
pub use decode::decode;
use present::{dirty_runs, guard_pages, open_pagemap, runs_after_rounds};
use ranges::Ranges;

/// Pages carried by one `pages` record: small enough that a block read from the
/// process is still in the CPU cache when the medium writes it (256 KiB blocks read at
/// twice the rate of 8 MiB ones here), and neither side holds much at once.
const CHUNK_BYTES: u64 = 256 << 10;

#[derive(Default)]
struct Memory {
    /// Checkpoint: runs of pages still to send, (address, pages).
    todo: VecDeque<(u64, u64)>,
    /// Restore: the layout read from the image.
    state: Option<MmState>,
    phase: Phase,
    status: Status,
    /// Areas whose protection was widened to read or fill them: (area, original prot).
    widened: Vec<(Area, u64)>,
    /// The buffer pages pass through, kept across chunks: faulting in a fresh one per
    /// chunk costs more than the copy itself on these machines.
    buffer: Vec<u8>,
    /// Checkpoint: the areas a restore maps fresh (private anonymous), where a page of
    /// zeros is left out (it reads as zeros there); none after pre-copy rounds, whose
    /// destination may hold an older copy of the page.
    fresh: Ranges,
    /// Pre-copy, source: the round whose pages `todo` holds.
    round: Option<u32>,
    /// Pre-copy, source: ranges under dirty tracking whose pages the destination holds.
    tracked: Ranges,
    /// Pre-copy, source: pages sent during the rounds (to empty those since dropped).
    sent: Ranges,
    /// Pre-copy, destination: ranges mapped in the child ahead of the layout.
    premapped: Ranges,
    /// Restore: the private areas, where pages may go.
    page_areas: Ranges,
    /// Restore: the deleted files and memfds made again, until filled and sealed.
    made: Vec<gone::Made>,
    /// Restore: files made again and not unlinked yet (removed on failure).
    created: Vec<String>,
}

/// A `live` record: what changes in the destination's early mappings this round.
#[derive(serde::Serialize, serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Live {
    /// The kernel's special areas, moved into place before anything is mapped.
    #[serde(default)]
    specials: Vec<Area>,
    /// Ranges to unmap (the process unmapped or replaced them).
    #[serde(default)]
    drop: Ranges,
    /// Ranges to map, private anonymous, before their pages come.
    #[serde(default)]
    map: Ranges,
}

fn to_mem(r: &[(u64, u64)]) -> Vec<MemRange> {
    r.iter().map(|&(s, e)| MemRange { addr: s, len: e - s }).collect()
}

fn from_mem(r: &[MemRange]) -> Ranges {
    ranges::normalize(r.iter().map(|m| (m.addr, m.addr + m.len)).collect())
}

#[derive(Default, PartialEq, Eq, Clone, Copy)]
enum Phase {
    #[default]
    Start,
    Pages,
    Finish,
}

/// The process's areas as the image describes them, without ferry's scratch area.
fn areas_of(ctx: &mut ContextRef<'_>) -> Result<Vec<Area>, String> {
    let scratch = ctx.scratch();
    let maps = parse_maps(&util::proc_text(ctx, "maps")?)?;
    let mut areas = Vec::new();
    for vma in &maps {
        // ferry's own scratch area is not the process's.
        if vma.start <= scratch.addr && scratch.addr < vma.end {
            continue;
        }
        if let Some(area) = Area::from_vma(vma)? {
            areas.push(area);
        }
    }
    Ok(areas)
}

/// The process's areas with the flags each carries (`/proc/PID/smaps`), and the
/// address space's memory policy, read from the stopped process.
fn areas_with_flags(ctx: &mut ContextRef<'_>) -> Result<(Vec<Area>, vmflags::Policy), String> {
    let pid = ctx.pid();
    let scratch = ctx.scratch();
    let probe = vmflags::map_probe(ctx)?;
    let mut pagemap = None;
    let read = (|| {
        let smaps = vmflags::parse_smaps(&util::proc_text(ctx, "smaps")?)?;
        let policy = vmflags::read_policy(ctx, &smaps, probe)?;
        let mut areas = Vec::new();
        for (vma, flags) in &smaps {
            // ferry's own scratch area and probe page are not the process's.
            if (vma.start <= scratch.addr && scratch.addr < vma.end) || vma.start == probe {
                continue;
            }
            if let Some(mut area) = Area::from_vma(vma)? {
                if area.kind != AreaKind::Special {
                    area.flags = vmflags::carried(pid, (vma.start, vma.end), flags)?;
                    if flags.iter().any(|f| f == vmflags::MAYBE_GUARD) {
                        let pagemap = match &pagemap {
                            Some(p) => p,
                            None => pagemap.insert(open_pagemap(pid)?),
                        };
                        let which = pagemap::Categories::all_of(pagemap::PAGE_IS_GUARD);
                        area.guards = pagemap::scan(pagemap, area.start, area.end, 0, which)
                            .map_err(|e| format!("process {pid}: guard regions of {:#x}-{:#x} (PAGEMAP_SCAN): {e}", area.start, area.end))?;
                    }
                }
                areas.push(area);
            }
        }
        Ok((areas, policy))
    })();
    vmflags::unmap_probe(ctx, probe)?;
    read
}

/// Maps `start..end` private anonymous and writable in the restore child.
fn map_anon(ctx: &mut ContextRef<'_>, start: u64, end: u64, growsdown: bool) -> Result<(), String> {
    let pid = ctx.pid();
    let grows = if growsdown { libc::MAP_GROWSDOWN } else { 0 };
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | grows) as u64;
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let got = util::syscall(ctx, pid, &format!("mmap {start:#x}-{end:#x}"), libc::SYS_mmap, [start, end - start, prot, flags, u64::MAX, 0])?;
    if got != start {
        return Err(format!("mmap of {start:#x} landed at {got:#x}"));
    }
    Ok(())
}

/// Makes `area` one mapping again where the pre-copy rounds left it split in the
/// restore child: the rounds mapped its pieces as they found them, and a process that
/// has since made the area anew over what were several mappings would see a call on
/// the whole of it (`mremap`) fail. Its pages are copied into a fresh mapping, which
/// then replaces it in place (`mremap` with `MREMAP_FIXED`).
fn mend_split(ctx: &mut ContextRef<'_>, pagemap: &std::fs::File, area: &Area) -> Result<(), String> {
    let pid = ctx.pid();
    let len = area.end - area.start;
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    let fresh = util::syscall(ctx, pid, "mmap (mending a split area)", libc::SYS_mmap, [0, len, rw, anon, u64::MAX, 0])?;
    let mut todo: VecDeque<(u64, u64)> = dirty_runs(pagemap, area)?.into();
    let mut buf = Vec::new();
    while !todo.is_empty() {
        let runs = take_chunk(&mut todo, CHUNK_BYTES);
        let at = |base: u64| -> Vec<MemRange> { runs.iter().map(|&(a, n)| MemRange { addr: a - area.start + base, len: n * PAGE }).collect() };
        buf.resize(runs.iter().map(|r| (r.1 * PAGE) as usize).sum(), 0);
        util::read_ranges(ctx, &at(area.start), &mut buf)?;
        util::write_ranges(ctx, &at(fresh), &buf)?;
    }
    let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
    let what = format!("mremap over {:#x}-{:#x}", area.start, area.end);
    let got = util::syscall(ctx, pid, &what, libc::SYS_mremap, [fresh, len, len, flags, area.start, 0])?;
    if got != area.start {
        return Err(format!("{what} landed at {got:#x}"));
    }
    Ok(())
}

/// Takes up to `limit` bytes of runs from the front of `todo`, splitting a run if needed.
fn take_chunk(todo: &mut VecDeque<(u64, u64)>, limit: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut room = limit / PAGE;
    while room > 0 {
        let Some((addr, n)) = todo.pop_front() else { break };
        if n > room {
            out.push((addr, room));
            todo.push_front((addr + room * PAGE, n - room));
            break;
        }
        out.push((addr, n));
        room -= n;
    }
    out
}

impl Memory {
    fn checkpoint_start(&mut self, ctx: &mut ContextRef<'_>, sink: &mut SinkRef<'_>) -> Result<(), String> {
        let pid = ctx.pid();
        let (mut areas, policy) = areas_with_flags(ctx)?;
        let (gone, gone_files) = gone::capture(ctx, &mut areas)?;
        let brk = util::syscall(ctx, pid, "brk(0)", libc::SYS_brk, [0; 6])?;
        let stat = util::proc_text(ctx, "stat")?;
        let auxv = ctx.proc_read("auxv".into()).into_result().map_err(|e| String::from(e.message))?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map_err(|e| format!("reading the exe link: {e}"))?
            .to_string_lossy()
            .into_owned();
        let mut state = MmState::capture(&stat, brk, &auxv, exe, areas)?;
        (state.thp_disable, state.lock_future, state.merge_any) = (policy.thp_disable, policy.lock_future, policy.merge_any);
        state.gone = gone;
        state.sysv = sysv::capture(ctx, &state.areas)?;
        let pagemap = open_pagemap(pid)?;
        // After pre-copy rounds: what the destination holds stays there, only the pages
        // written since go; a range whose mapping was replaced goes whole.
        let mut kept = Vec::new();
        let mut dirty = Vec::new();
        if self.round.is_some() {
            let premappable = ranges::normalize(state.areas.iter().filter(|a| a.premappable()).map(|a| (a.start, a.end)).collect());
            for range in ranges::intersect(&self.tracked, &premappable) {
                if let Ok(runs) = ctx.dirty_scan(MemRange { addr: range.0, len: range.1 - range.0 }).into_result() {
                    kept.push(range);
                    dirty.extend(from_mem(&runs));
                }
            }
        }
        let dirty = ranges::normalize(dirty);
        let mut present = Vec::new();
        // Post-copy: an area the destination holds nothing of goes whole to the lazy
        // list; which of its pages the source has is found after the resume (3 ms per
        // GiB less in the freeze).
        let mut unscanned = Vec::new();
        layout::shmem_objects(&state.areas)?;
        // Shared anonymous objects: the offsets of each whose pages go already (an
        // object mapped twice sends its pages once).
        let mut object_sent: Vec<(u64, Ranges)> = Vec::new();
        for area in state.areas.iter().filter(|a| a.has_pages()) {
            if ctx.lazy() && area.lazyable() && ranges::intersect(&kept, &[(area.start, area.end)]).is_empty() {
                unscanned.push((area.start, area.end));
                continue;
            }
            let runs = if area.kind == AreaKind::Sysv {
                // A segment another process of the tree carries: attached only.
                if !state.sysv.iter().any(|g| Some(g.id as u64) == area.object) {
                    continue;
                }
                shmem::once_per_object(&mut object_sent, area, shmem::runs(pid, area)?)
            } else if area.kind == AreaKind::Shmem {
                // An object another process of the tree maps is that one's to carry.
                let object = area.object.unwrap_or(0);
                if state.elsewhere.contains(&object) || shmem::elsewhere(ctx, object) {
                    if !state.elsewhere.contains(&object) {
                        state.elsewhere.push(object);
                    }
                    continue;
                }
                shmem::once_per_object(&mut object_sent, area, shmem::runs(pid, area)?)
            } else if self.round.is_some() {
                runs_after_rounds(&pagemap, area, &kept, &self.sent)?
            } else {
                dirty_runs(&pagemap, area)?
            };
            if !runs.is_empty() && area.prot & libc::PROT_READ as u64 == 0 {
                // Pages behind PROT_NONE: readable for the dump, put back at cleanup.
                util::syscall(ctx, pid, "mprotect", libc::SYS_mprotect, [area.start, area.end - area.start, libc::PROT_READ as u64, 0, 0, 0])?;
                self.widened.push((area.clone(), area.prot));
            }
            present.extend(ranges::from_runs(&runs, PAGE));
        }
        let present = ranges::normalize(present);
        let mut send = ranges::union(&ranges::subtract(&present, &kept), &ranges::intersect(&dirty, &kept));
        // Guard pages read as written and swapped, and hold nothing.
        let guards = ranges::normalize(state.areas.iter().flat_map(|a| a.guards.iter().copied()).collect());
        send = ranges::subtract(&send, &guards);
        state.zap = ranges::subtract(&ranges::intersect(&self.sent, &kept), &present);
        if ctx.lazy() {
            // Post-copy: the private anonymous pages follow after the resume. Kept pages
            // written since are emptied there, so that touching them fetches them too.
            // Locked and wipe-on-fork areas go now (see `Area::lazyable`).
            let lazyable = ranges::normalize(state.areas.iter().filter(|a| a.lazyable()).map(|a| (a.start, a.end)).collect());
            state.lazy = ranges::union(&ranges::intersect(&send, &lazyable), &ranges::normalize(unscanned));
            state.lazy_event = true;
            state.zap = ranges::union(&state.zap, &ranges::intersect(&state.lazy, &kept));
            send = ranges::subtract(&send, &state.lazy);
        }
        if self.round.is_none() {
            let fresh = state.areas.iter().filter(|a| a.kind == AreaKind::Anon && !a.shared && (!ctx.lazy() || !a.lazyable()));
            self.fresh = ranges::normalize(fresh.map(|a| (a.start, a.end)).collect());
        }
        state.kept = kept;
        self.todo.extend(ranges::to_runs(&send, PAGE));
        self.status.entities_total = self.todo.iter().map(|r| r.1).sum();
        self.status.bytes_total = self.status.entities_total * PAGE;
        util::put_json(sink, "mm", &state)?;
        // Before the pages: a private page written over a deleted file's is whole.
        gone::put_data(sink, &gone_files, &state.gone)?;
        Ok(())
    }

    /// Prepares pre-copy round `round`: follows the process's mapping changes, scans
    /// what it wrote, and lists the pages to send in `todo`.
    fn precopy_start(&mut self, ctx: &mut ContextRef<'_>, sink: &mut SinkRef<'_>, round: u32) -> Result<(), String> {
        let areas = areas_of(ctx)?;
        let candidates = ranges::normalize(areas.iter().filter(|a| a.premappable()).map(|a| (a.start, a.end)).collect());
        let mut live = Live::default();
        if round == 0 {
            live.specials = areas.iter().filter(|a| a.kind == AreaKind::Special).cloned().collect();
        }
        // Unmapped since: the destination drops its copy.
        let gone = ranges::subtract(&self.tracked, &candidates);
        self.tracked = ranges::intersect(&self.tracked, &candidates);
        let mut dirty = Vec::new();
        let mut replaced = Vec::new();
        for &range in &self.tracked {
            match ctx.dirty_scan(MemRange { addr: range.0, len: range.1 - range.0 }).into_result() {
                Ok(runs) => dirty.extend(from_mem(&runs)),
                // Its mapping was replaced: unmapped there and sent again whole.
                Err(_) => replaced.push(range),
            }
        }
        live.drop = ranges::union(&gone, &replaced);
        self.tracked = ranges::subtract(&self.tracked, &replaced);
        self.sent = ranges::subtract(&self.sent, &live.drop);
        let fresh = ranges::subtract(&candidates, &self.tracked);
        // The pages the process has in the new ranges, read before tracking starts: the
        // userfaultfd backend write-protects the holes too (WP_UNPOPULATED), with markers
        // the pagemap reports as swapped, and every untouched page of a large mapping
        // would then go. A page first written later is dirty to every backend.
        let pid = ctx.pid();
        let pagemap = open_pagemap(pid)?;
        let mut present = Vec::new();
        for &(s, e) in &fresh {
            let area = Area { start: s, end: e, prot: 0, shared: false, kind: AreaKind::Anon, path: None, offset: 0, growsdown: false, file: None, object: None, flags: Vec::new(), guards: Vec::new() };
            present.extend(ranges::from_runs(&dirty_runs(&pagemap, &area)?, PAGE));
        }
        let tracked_now = ctx.dirty_track(to_mem(&fresh).as_slice().into()).into_result().map_err(|e| String::from(e.message))?;
        live.map = from_mem(&tracked_now);
        self.tracked = ranges::union(&self.tracked, &live.map);
        let present = ranges::intersect(&ranges::normalize(present), &live.map);
        let send = ranges::union(&ranges::normalize(dirty), &present);
        // A guard page would fail the read of its whole chunk, round after round.
        let send = ranges::subtract(&send, &guard_pages(&pagemap, &send));
        self.sent = ranges::union(&self.sent, &send);
        if round == 0 || !live.drop.is_empty() || !live.map.is_empty() {
            util::put_json(sink, "live", &live)?;
        }
        self.todo = ranges::to_runs(&send, PAGE).into();
        self.status.entities_total += self.todo.iter().map(|r| r.1).sum::<u64>();
        self.status.bytes_total = self.status.entities_total * PAGE;
        Ok(())
    }

    /// Applies a `live` record in the restore child, ahead of the layout.
    fn restart_live(&mut self, ctx: &mut ContextRef<'_>, rec: &Record) -> Result<(), String> {
        let live: Live = util::parse_json(rec, "live")?;
        let pid = ctx.pid();
        let scratch = ctx.scratch();
        decode::check_live(&live, (scratch.addr, scratch.len))?;
        if !live.specials.is_empty() {
            let child = parse_maps(&util::proc_text(ctx, "maps")?)?;
            layout::move_specials(ctx, &child, &live.specials)?;
        }
        for &(s, e) in &live.drop {
            util::syscall(ctx, pid, "munmap", libc::SYS_munmap, [s, e - s, 0, 0, 0, 0])?;
        }
        self.premapped = ranges::subtract(&self.premapped, &live.drop);
        for &(s, e) in &live.map {
            map_anon(ctx, s, e, false)?;
        }
        self.premapped = ranges::union(&self.premapped, &live.map);
        Ok(())
    }

    fn checkpoint_pages(&mut self, ctx: &mut ContextRef<'_>, sink: &mut SinkRef<'_>) -> Result<(), String> {
        let runs = take_chunk(&mut self.todo, CHUNK_BYTES);
        let pages: u64 = runs.iter().map(|r| r.1).sum();
        let header = layout::encode_runs(&runs);
        // One buffer, header then data, filled straight from the process.
        let len = header.len() + (pages * PAGE) as usize;
        if self.buffer.len() < len {
            self.buffer.resize(len, 0);
        }
        let payload = &mut self.buffer[..len];
        payload[..header.len()].copy_from_slice(&header);
        let ranges: Vec<MemRange> = runs.iter().map(|&(addr, n)| MemRange { addr, len: n * PAGE }).collect();
        match util::read_ranges(ctx, &ranges, &mut payload[header.len()..]) {
            Ok(()) => match present::without_zero_pages(&runs, &payload[header.len()..], &self.fresh) {
                // Only the pages that hold something; the rest are holes.
                Some((runs, data)) if !runs.is_empty() => util::put_raw(sink, "pages", &[layout::encode_runs(&runs), data].concat())?,
                Some(_) => {}
                None => util::put_raw(sink, "pages", payload)?,
            },
            // The running process unmapped some of it meanwhile: those pages are no
            // longer the destination's to keep; the next round or the freeze settles them.
            Err(_) if self.phase == Phase::Start => {
                let lost = ranges::from_runs(&runs, PAGE);
                self.tracked = ranges::subtract(&self.tracked, &lost);
                self.sent = ranges::subtract(&self.sent, &lost);
            }
            Err(e) => return Err(e),
        }
        self.status.entities_done += pages;
        self.status.bytes_done += pages * PAGE;
        Ok(())
    }

    fn restart_start(&mut self, ctx: &mut ContextRef<'_>, state: MmState) -> Result<(), String> {
        state.validate()?;
        state.check_files()?;
        let pid = ctx.pid();
        // Early mappings the image does not keep go; the kept ones stay with their pages.
        let kept = ranges::normalize(state.kept.clone());
        if !ranges::subtract(&kept, &self.premapped).is_empty() {
            return Err("the image keeps pre-copied pages that never arrived".into());
        }
        for (s, e) in ranges::subtract(&self.premapped, &kept) {
            util::syscall(ctx, pid, "munmap", libc::SYS_munmap, [s, e - s, 0, 0, 0, 0])?;
        }
        self.premapped = kept.clone();
        let child = parse_maps(&util::proc_text(ctx, "maps")?)?;
        layout::move_specials(ctx, &child, &state.areas)?;
        let mut fds: Vec<(String, u64)> = Vec::new();
        let objects = self.make_shmem_objects(ctx, &state)?;
        shmem::made(pid, &state.areas, &objects);
        self.made = gone::make(ctx, &state.gone, &mut self.created)?;
        sysv::make(&state.sysv, pid)?;
        for area in state.areas.iter().filter(|a| a.kind != AreaKind::Special) {
            if area.kind == AreaKind::Sysv {
                sysv::attach(ctx, area)?;
                self.widened.push((area.clone(), area.prot));
                continue;
            }
            if area.kind == AreaKind::Shmem {
                // Each area a new mapping of its object's pages at its own offset
                // (mremap with old_size 0), writable until its pages are in; every area
                // gets its own protection back at the end.
                let temp = objects.iter().find(|o| Some(o.0) == area.object).map(|o| o.1).ok_or("a shared mapping without its object")?;
                let (len, flags) = (area.end - area.start, (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64);
                let what = format!("process {pid}: mremap of shared anonymous memory to {:#x}-{:#x}", area.start, area.end);
                let got = util::syscall(ctx, pid, &what, libc::SYS_mremap, [temp + area.offset, 0, len, flags, area.start, 0])?;
                if got != area.start {
                    return Err(format!("{what} landed at {got:#x}"));
                }
                self.widened.push((area.clone(), area.prot));
                continue;
            }
            if area.premappable() {
                let gaps = ranges::subtract(&[(area.start, area.end)], &kept);
                if gaps != [(area.start, area.end)] {
                    // Partly there from the rounds: map the rest around it.
                    for (s, e) in gaps {
                        map_anon(ctx, s, e, false)?;
                    }
                    self.widened.push((area.clone(), area.prot));
                    continue;
                }
            }
            let mut scratch = Scratch::new(ctx);
            let (fd, flags) = match (&area.kind, &area.path) {
                (AreaKind::File, Some(path)) => {
                    let fd = match fds.iter().find(|(p, _)| p == path) {
                        Some((_, fd)) => *fd,
                        None => {
                            let at = scratch.cstr(ctx, path)?;
                            let mode = if area.shared && area.prot & libc::PROT_WRITE as u64 != 0 { libc::O_RDWR } else { libc::O_RDONLY };
                            let fd = util::syscall(ctx, pid, &format!("open {path}"), libc::SYS_openat, [libc::AT_FDCWD as u64, at, (mode | libc::O_CLOEXEC) as u64, 0, 0, 0])?;
                            fds.push((path.clone(), fd));
                            fd
                        }
                    };
                    let share = if area.shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE };
                    (fd, share as u64)
                }
                (AreaKind::Deleted, _) => {
                    let made = area.object.and_then(|o| self.made.get(o as usize)).ok_or("a deleted mapping without its object")?;
                    (made.child_fd, if area.shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE } as u64)
                }
                _ => {
                    let grows = if area.growsdown { libc::MAP_GROWSDOWN } else { 0 };
                    (u64::MAX, (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | grows) as u64)
                }
            };
            // Private areas are mapped writable until their pages are in.
            let prot = if area.shared { area.prot } else { area.prot | libc::PROT_WRITE as u64 };
            let len = area.end - area.start;
            let got = util::syscall(ctx, pid, &format!("mmap {:#x}-{:#x}", area.start, area.end), libc::SYS_mmap, [area.start, len, prot, flags | libc::MAP_FIXED as u64, fd, area.offset])?;
            if got != area.start {
                return Err(format!("mmap of {:#x} landed at {got:#x}", area.start));
            }
            if prot != area.prot {
                self.widened.push((area.clone(), area.prot));
            }
            if area.kind == AreaKind::Anon && !area.shared && state.thp_disable == 0 && area.flags.iter().any(|f| f == "hg") {
                // Huge pages asked for: before the pages are filled, so that they fault
                // in 2 MiB at a time as the process's did (the rest of the advice comes
                // once they are in).
                let what = format!("process {pid}: madvise {:#x}-{:#x} (hg)", area.start, area.end);
                util::syscall(ctx, pid, &what, libc::SYS_madvise, [area.start, len, libc::MADV_HUGEPAGE as u64, 0, 0, 0])?;
            }
        }
        for (path, fd) in fds {
            util::syscall(ctx, pid, &format!("close {path}"), libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
        }
        // Deleted files and memfds live on in their areas (and ferry's fds, to fill them).
        for made in &mut self.made {
            util::syscall(ctx, pid, "close of a deleted object made again", libc::SYS_close, [made.child_fd, 0, 0, 0, 0, 0])?;
            if let Some(name) = made.name.take() {
                std::fs::remove_file(&name).map_err(|e| format!("unlinking {name} again: {e}"))?;
                self.created.retain(|c| *c != name);
            }
        }
        sysv::remove_again(&state.sysv, pid)?;
        // The objects live on in their areas.
        for (_, temp, size) in objects {
            util::syscall(ctx, pid, "munmap of a shared object's first mapping", libc::SYS_munmap, [temp, size, 0, 0, 0, 0])?;
        }
        if !kept.is_empty() {
            let child = parse_maps(&util::proc_text(ctx, "maps")?)?;
            let inside = |a: &Area, at: u64| a.start < at && at < a.end;
            let split = |a: &&Area| a.premappable() && child.iter().any(|v| inside(a, v.start) || inside(a, v.end));
            let mut pagemap = None;
            for area in state.areas.iter().filter(split) {
                let pagemap = match &pagemap {
                    Some(p) => p,
                    None => pagemap.insert(open_pagemap(pid)?),
                };
                mend_split(ctx, pagemap, area)?;
            }
        }
        // Pages the process dropped after they were sent read as zeros again (and, in
        // post-copy, pages written since they were sent wait for their new contents).
        for &(s, e) in &state.zap {
            util::syscall(ctx, pid, "madvise", libc::SYS_madvise, [s, e - s, libc::MADV_DONTNEED as u64, 0, 0, 0])?;
        }
        if !state.lazy.is_empty() || state.lazy_event {
            let areas: Vec<(u64, u64)> = state.areas.iter().filter(|a| a.lazyable()).map(|a| (a.start, a.end)).collect();
            let (areas, present) = (to_mem(&ranges::normalize(areas)), to_mem(&state.lazy));
            ctx.lazy_pages(areas.as_slice().into(), present.as_slice().into()).into_result().map_err(|e| String::from(e.message))?;
        }
        self.status.entities_total = state.areas.len() as u64;
        self.page_areas = ranges::normalize(state.areas.iter().filter(|a| a.has_pages()).map(|a| (a.start, a.end)).collect());
        self.state = Some(state);
        Ok(())
    }

    /// Makes each shared anonymous object of the image once, as big as its furthest
    /// area needs, in the restore child: mapped first where no area of the image nor
    /// anything of the child lies, so that mapping the areas never meets it. Answers
    /// (object, where, size).
    fn make_shmem_objects(&mut self, ctx: &mut ContextRef<'_>, state: &MmState) -> Result<Vec<(u64, u64, u64)>, String> {
        let pid = ctx.pid();
        let objects = layout::shmem_objects(&state.areas)?;
        if objects.is_empty() {
            return Ok(Vec::new());
        }
        let child = parse_maps(&util::proc_text(ctx, "maps")?)?;
        let mut busy: Vec<(u64, u64)> = child.iter().map(|v| (v.start, v.end)).chain(state.areas.iter().map(|a| (a.start, a.end))).collect();
        let mut made = Vec::new();
        for (object, size) in objects {
            let at = layout::free_stretch(&busy, size).ok_or_else(|| format!("no room in the restore child for a shared object of {size} bytes"))?;
            if state.elsewhere.contains(&object) {
                shmem::map_made(ctx, object, at, size)?;
                busy.push((at, at + size));
                made.push((object, at, size));
                continue;
            }
            let flags = (libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
            let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
            let what = format!("process {pid}: mmap of a shared anonymous object of {size} bytes at {at:#x}");
            let got = util::syscall(ctx, pid, &what, libc::SYS_mmap, [at, size, rw, flags, u64::MAX, 0])?;
            if got != at {
                return Err(format!("{what} landed at {got:#x}"));
            }
            busy.push((at, at + size));
            made.push((object, at, size));
        }
        Ok(made)
    }

    /// Fills the pages of one record.
    fn restart_pages(&mut self, ctx: &mut ContextRef<'_>, rec: Record) -> Result<(), String> {
        let (runs, data) = decode::pages(&rec)?;
        for &(addr, n) in &runs {
            // Before the layout (a pre-copy round's pages): only where the rounds mapped.
            let inside = ranges::covers(if self.state.is_some() { &self.page_areas } else { &self.premapped }, (addr, addr + n * PAGE));
            if !inside {
                return Err(format!("the image has pages at {addr:#x} (+{n}) outside every private area"));
            }
        }
        let ranges: Vec<MemRange> = runs.iter().map(|&(addr, n)| MemRange { addr, len: n * PAGE }).collect();
        util::write_ranges(ctx, &ranges, data)?;
        let pages = data.len() as u64 / PAGE;
        self.status.bytes_done += pages * PAGE;
        Ok(())
    }

    /// Puts back the protection of areas widened during the event.
    fn narrow(&mut self, ctx: &mut ContextRef<'_>) -> Result<(), String> {
        let pid = ctx.pid();
        for (area, prot) in std::mem::take(&mut self.widened) {
            util::syscall(ctx, pid, "mprotect", libc::SYS_mprotect, [area.start, area.end - area.start, prot, 0, 0, 0])?;
        }
        Ok(())
    }
}

impl SubsystemPlugin for Memory {
    fn info(&self) -> SubsystemInfo {
        SubsystemInfo {
            entity_kinds: names(&["mapping", "page"]),
            after: RVec::new(),
            shared_resources: names(&["shared-mapping", "shared-anon", "sysv-shm"]),
        }
    }

    fn precopy(&mut self, ctx: &mut ContextRef<'_>, sink: &mut SinkRef<'_>, round: u32) -> Result<Progress, String> {
        if self.round != Some(round) {
            self.precopy_start(ctx, sink, round)?;
            self.round = Some(round);
        }
        if self.todo.is_empty() {
            return Ok(Progress::Done);
        }
        self.checkpoint_pages(ctx, sink)?;
        Ok(Progress::More)
    }

    fn checkpoint(&mut self, ctx: &mut ContextRef<'_>, sink: &mut SinkRef<'_>) -> Result<Progress, String> {
        if self.phase == Phase::Start {
            self.checkpoint_start(ctx, sink)?;
            self.phase = Phase::Pages;
        }
        if self.todo.is_empty() {
            self.narrow(ctx)?;
            return Ok(Progress::Done);
        }
        self.checkpoint_pages(ctx, sink)?;
        Ok(Progress::More)
    }

    fn restart(&mut self, ctx: &mut ContextRef<'_>, source: &mut SourceRef<'_>) -> Result<Progress, String> {
        match self.phase {
            Phase::Start => {
                // Pre-copy rounds come first (`live`, `pages`), then the layout.
                let rec = util::next_record(source)?.ok_or("the image has no `mm` record")?;
                match rec.kind.as_str() {
                    "live" => self.restart_live(ctx, &rec)?,
                    "pages" => self.restart_pages(ctx, rec)?,
                    _ => {
                        self.restart_start(ctx, util::parse_json(&rec, "mm")?)?;
                        self.phase = Phase::Pages;
                    }
                }
                Ok(Progress::More)
            }
            Phase::Pages => {
                match util::next_record(source)? {
                    Some(rec) if rec.kind.as_str() == "pages" => self.restart_pages(ctx, rec)?,
                    Some(rec) if rec.kind.as_str() == "gone-data" => gone::fill(&self.made, state_gone(&self.state), &rec.payload)?,
                    Some(rec) => return Err(format!("unexpected record `{}` after the pages", rec.kind)),
                    None => self.phase = Phase::Finish,
                }
                Ok(Progress::More)
            }
            Phase::Finish => {
                self.narrow(ctx)?;
                let state = self.state.as_ref().ok_or("no mm record")?;
                gone::seal(&self.made, &state.gone)?;
                self.made.clear();
                // Advice and locks once the pages are in and each area has its own
                // protection (a locked area is filled as the process's was).
                let policy = state.policy();
                // KSM for every mapping first: it marks them all, and the areas the
                // process had since taken out are taken out again.
                vmflags::apply_merge_any(ctx, &policy)?;
                vmflags::apply_all(ctx, &state.areas, &policy)?;
                vmflags::apply_thp(ctx, &policy)?;
                layout::set_mm(ctx, state)?;
                vmflags::apply_lock_future(ctx, &state.policy())?;
                self.status.entities_done = self.status.entities_total;
                Ok(Progress::Done)
            }
        }
    }

    fn cleanup(&mut self, ctx: &mut ContextRef<'_>, ok: bool) {
        if !ok {
            shmem::forget();
        }
        // A failed checkpoint must not leave PROT_NONE areas readable.
        let _ = self.narrow(ctx);
        for name in self.created.drain(..) {
            let _ = std::fs::remove_file(name);
        }
    }

    fn status(&self) -> Status {
        self.status
    }
}

fn state_gone(state: &Option<MmState>) -> &[gone::Gone] {
    state.as_ref().map_or(&[], |s| &s.gone)
}

ferry_plugin_api::export_subsystem!("memory", "Private memory: mappings and their pages", Memory::default);

#[cfg(test)]
mod tests;
