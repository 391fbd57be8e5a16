//! The `memory` subsystem plugin: every mapping of the process with its protection,
//! flags and file identity, and the pages that exist only in memory (private
//! anonymous memory, written pages of private file mappings), moved in large
//! vectored blocks. Restore maps each area again in a blank child, fills its pages,
//! moves the vDSO to where the process expects it, and sets brk, stack, arg/env,
//! auxv and the exe file with `PR_SET_MM_MAP`.

mod layout;

use std::{collections::VecDeque, os::unix::fs::FileExt};

use ferry_plugin_api::{
    abi_stable::std_types::RVec,
    plugin::SubsystemPlugin,
    util::{self, names, parse_maps, Scratch},
    ContextRef, MemRange, Progress, Record, RecordFormat, SinkRef, SourceRef, Status, SubsystemInfo,
};

use layout::{Area, AreaKind, MmState, PAGE};

/// Pages carried by one `pages` record: small enough that a block read from the
/// process is still in the CPU cache when the medium writes it (256 KiB blocks read at
/// twice the rate of 8 MiB ones here), and neither side holds much at once.
const CHUNK_BYTES: u64 = 256 << 10;

/// Pagemap bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

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
}

#[derive(Default, PartialEq, Eq, Clone, Copy)]
enum Phase {
    #[default]
    Start,
    Pages,
    Finish,
}

/// Which pages of `area` live only in memory, as runs of (address, pages).
fn dirty_runs(pagemap: &std::fs::File, area: &Area) -> Result<Vec<(u64, u64)>, String> {
    // Pagemap entries are read a bounded batch at a time: a sparse area may be huge.
    const BATCH: u64 = 64 * 1024;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut entries = Vec::new();
    let mut addr = area.start;
    while addr < area.end {
        let n = ((area.end - addr) / PAGE).min(BATCH);
        entries.resize((n * 8) as usize, 0);
        pagemap
            .read_exact_at(&mut entries, addr / PAGE * 8)
            .map_err(|e| format!("reading pagemap for {:#x}-{:#x}: {e}", area.start, area.end))?;
        for (i, e) in entries.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(e);
            let v = u64::from_le_bytes(b);
            let wanted = if area.kind == AreaKind::File {
                // Only the copies the process wrote; the rest comes from the file.
                (v & PM_PRESENT != 0 && v & PM_FILE == 0) || v & PM_SWAPPED != 0
            } else {
                v & (PM_PRESENT | PM_SWAPPED) != 0
            };
            if wanted {
                let page = addr + i as u64 * PAGE;
                match runs.last_mut() {
                    Some((a, k)) if *a + *k * PAGE == page => *k += 1,
                    _ => runs.push((page, 1)),
                }
            }
        }
        addr += n * PAGE;
    }
    Ok(runs)
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
        let brk = util::syscall(ctx, pid, "brk(0)", libc::SYS_brk, [0; 6])?;
        let stat = util::proc_text(ctx, "stat")?;
        let auxv = ctx.proc_read("auxv".into()).into_result().map_err(|e| String::from(e.message))?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map_err(|e| format!("reading the exe link: {e}"))?
            .to_string_lossy()
            .into_owned();
        let state = MmState::capture(&stat, brk, &auxv, exe, areas)?;

        let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))
            .map_err(|e| format!("opening /proc/{pid}/pagemap: {e}"))?;
        for area in state.areas.iter().filter(|a| a.has_pages()) {
            let runs = dirty_runs(&pagemap, area)?;
            if !runs.is_empty() && area.prot & libc::PROT_READ as u64 == 0 {
                // Pages behind PROT_NONE: readable for the dump, put back at cleanup.
                util::syscall(ctx, pid, "mprotect", libc::SYS_mprotect, [area.start, area.end - area.start, libc::PROT_READ as u64, 0, 0, 0])?;
                self.widened.push((area.clone(), area.prot));
            }
            self.todo.extend(runs);
        }
        self.status.entities_total = self.todo.iter().map(|r| r.1).sum();
        self.status.bytes_total = self.status.entities_total * PAGE;
        util::put_json(sink, "mm", &state)?;
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
        util::read_ranges(ctx, &ranges, &mut payload[header.len()..])?;
        util::put_raw(sink, "pages", payload)?;
        self.status.entities_done += pages;
        self.status.bytes_done += pages * PAGE;
        Ok(())
    }

    fn restart_start(&mut self, ctx: &mut ContextRef<'_>, source: &mut SourceRef<'_>) -> Result<(), String> {
        let state: MmState = util::expect_json(source, "mm")?;
        state.validate()?;
        state.check_files()?;
        let pid = ctx.pid();
        let child = parse_maps(&util::proc_text(ctx, "maps")?)?;
        layout::move_specials(ctx, &child, &state)?;
        let mut fds: Vec<(String, u64)> = Vec::new();
        for area in state.areas.iter().filter(|a| a.kind != AreaKind::Special) {
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
        }
        for (path, fd) in fds {
            util::syscall(ctx, pid, &format!("close {path}"), libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
        }
        self.status.entities_total = state.areas.len() as u64;
        self.state = Some(state);
        Ok(())
    }

    /// Fills the pages of one record.
    fn restart_pages(&mut self, ctx: &mut ContextRef<'_>, rec: Record) -> Result<(), String> {
        let state = self.state.as_ref().ok_or("pages before the mm record")?;
        if rec.kind.as_str() != "pages" || rec.format != RecordFormat::Raw {
            return Err(format!("unexpected record `{}` among the pages", rec.kind));
        }
        let (runs, data) = layout::decode_runs(&rec.payload)?;
        for &(addr, n) in &runs {
            if !state.areas.iter().any(|a| a.has_pages() && a.start <= addr && addr + n * PAGE <= a.end) {
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
            shared_resources: names(&["shared-mapping"]),
        }
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
                self.restart_start(ctx, source)?;
                self.phase = Phase::Pages;
                Ok(Progress::More)
            }
            Phase::Pages => {
                match util::next_record(source)? {
                    Some(rec) if rec.kind.as_str() == "pages" => self.restart_pages(ctx, rec)?,
                    Some(rec) => return Err(format!("unexpected record `{}` after the pages", rec.kind)),
                    None => self.phase = Phase::Finish,
                }
                Ok(Progress::More)
            }
            Phase::Finish => {
                self.narrow(ctx)?;
                let state = self.state.as_ref().ok_or("no mm record")?;
                layout::set_mm(ctx, state)?;
                self.status.entities_done = self.status.entities_total;
                Ok(Progress::Done)
            }
        }
    }

    fn cleanup(&mut self, ctx: &mut ContextRef<'_>, _ok: bool) {
        // A failed checkpoint must not leave PROT_NONE areas readable.
        let _ = self.narrow(ctx);
    }

    fn status(&self) -> Status {
        self.status
    }
}

ferry_plugin_api::export_subsystem!("memory", "Private memory: mappings and their pages", Memory::default);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_split_runs_at_the_limit() {
        let mut todo: VecDeque<(u64, u64)> = [(0x1000, 3), (0x10000, 10)].into_iter().collect();
        assert_eq!(take_chunk(&mut todo, 5 * PAGE), vec![(0x1000, 3), (0x10000, 2)]);
        assert_eq!(take_chunk(&mut todo, 5 * PAGE), vec![(0x12000, 5)]);
        assert_eq!(take_chunk(&mut todo, 5 * PAGE), vec![(0x17000, 3)]);
        assert!(take_chunk(&mut todo, 5 * PAGE).is_empty());
    }
}
