//! Dirty-page tracking for pre-copy. Three backends:
//!
//! - **userfaultfd** (kernels with `UFFD_FEATURE_WP_ASYNC` and `PAGEMAP_SCAN`, 6.7+): a
//!   userfaultfd made in the target by an injected call, fetched into ferry with
//!   `pidfd_getfd` and closed in the target at once (only ferry holds it), with the
//!   tracked areas registered in write-protect *async* mode — a write just clears the
//!   page's protection, nothing waits on ferry — and `PAGEMAP_SCAN` on the target's
//!   pagemap to list the pages written since the last scan and protect them again
//!   (about a millisecond per GiB per round). The holes are protected too
//!   (`WP_UNPOPULATED`: a page first written during the rounds counts as written),
//!   with markers the pagemap reports as *swapped*: which pages a process has must
//!   be read before its ranges are tracked.
//! - **page hashes** (everywhere): an XXH3 hash of every tracked page, compared with a
//!   fresh one at each scan — reading all tracked memory every round (100–150 ms per
//!   GiB, and so much longer freezes), but needing nothing of the kernel. Pages the
//!   process does not have (neither present nor swapped) are hashed as zeros unread.
//!
//! - **soft-dirty** (kernels built with `CONFIG_MEM_SOFT_DIRTY`, most distributions'
//!   before 6.7 — the one CRIU uses): writing `4` to `/proc/PID/clear_refs` clears the
//!   soft-dirty bit of every page of the process, a write sets it again, and pagemap
//!   bit 55 reads it. The clearing is process-wide, so each harvest reads every
//!   tracked range before it clears, and keeps what a range's own scan has not taken
//!   yet ([`Ledger`]). A harvest must not race with the process writing: ferry only
//!   scans and starts tracking while the process is stopped (the first step of a
//!   pre-copy round, and the freeze). Only pages the process has count (present or
//!   swapped): a mapping made since reads as wholly soft-dirty, holes included.
//!   `ferry check` finds whether the kernel has it; the machine this was written on
//!   does not, so this backend is exercised only where one does.
//!
//! `stop` undoes it all: the target is left with no userfaultfd and no protection.

use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::{AsRawFd, OwnedFd},
};

use ferry_plugin_api::{pagemap, ranges};

use crate::{
    config::DirtyTracking,
    kernel::tracer::{vm_ranges, Tracer},
    kernel::uffd::*,
};

const PAGE: u64 = 4096;
/// Pages hashed per read.
const HASH_BATCH: u64 = 256;

enum Backend {
    Userfaultfd { uffd: OwnedFd, pagemap: File },
    SoftDirty { pagemap: File, clear_refs: File, ledger: Ledger },
    /// Page address → hash of its contents when last scanned, for the pages that did
    /// not read as zeros then. `pagemap`: to skip the pages the process does not have
    /// (zeros, without reading them).
    Hashes { hashes: BTreeMap<u64, u64>, buf: Vec<u8>, pagemap: Option<File> },
}

pub struct DirtyTracker {
    pid: i32,
    backend: Backend,
    ranges: Vec<(u64, u64)>,
}

fn os(what: &str) -> impl FnOnce(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// The backend `wanted` names, or with `auto` the best this kernel has (as `ferry
/// check` probes it).
pub fn resolve(wanted: DirtyTracking) -> Result<DirtyTracking, String> {
    let features = crate::kernel::probes::probe_dirty_tracking();
    let has = |name: &str| crate::kernel::probes::find(&features, name).is_some_and(|f| f.present);
    match wanted {
        DirtyTracking::Auto if has("userfaultfd-wp-async") => Ok(DirtyTracking::Userfaultfd),
        DirtyTracking::Auto if has("soft-dirty") => Ok(DirtyTracking::SoftDirty),
        DirtyTracking::Auto => Ok(DirtyTracking::PageHash),
        DirtyTracking::SoftDirty if !has("soft-dirty") => {
            Err("soft-dirty tracking: this kernel lacks soft-dirty (see ferry check); use auto, userfaultfd or page-hash".into())
        }
        other => Ok(other),
    }
}

impl DirtyTracker {
    /// Starts tracking writes to `ranges` (whole private anonymous areas) of the
    /// process stopped under `tracer`, with backend `how` (resolved: not `auto`).
    /// Every page counts as clean from here.
    pub fn start(tracer: &mut Tracer, ranges: &[(u64, u64)], how: DirtyTracking) -> Result<DirtyTracker, String> {
        let pid = tracer.pid();
        let backend = match how {
            // Without the pagemap every page is read.
            DirtyTracking::PageHash => Backend::Hashes { hashes: BTreeMap::new(), buf: Vec::new(), pagemap: File::open(format!("/proc/{pid}/pagemap")).ok() },
            DirtyTracking::SoftDirty => {
                let pagemap = File::open(format!("/proc/{pid}/pagemap")).map_err(os("opening the pagemap"))?;
                let clear_refs = std::fs::OpenOptions::new()
                    .write(true)
                    .open(format!("/proc/{pid}/clear_refs"))
                    .map_err(os("opening clear_refs"))?;
                use std::io::Write;
                (&clear_refs).write_all(b"4").map_err(os(&format!("clearing the soft-dirty bits of process {pid}")))?;
                Backend::SoftDirty { pagemap, clear_refs, ledger: Ledger::default() }
            }
            _ => {
                let uffd = userfaultfd_in(tracer, UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)?;
                let pagemap = File::open(format!("/proc/{pid}/pagemap")).map_err(os("opening the pagemap"))?;
                Backend::Userfaultfd { uffd, pagemap }
            }
        };
        let mut t = DirtyTracker { pid, backend, ranges: Vec::new() };
        for &(start, end) in ranges {
            if let Err(e) = t.track(start, end) {
                t.stop();
                return Err(e);
            }
        }
        Ok(t)
    }

    /// Starts tracking `start..end` too (the target may run meanwhile). A range the
    /// process registered with a userfaultfd of its own gives EBUSY.
    pub fn track(&mut self, start: u64, end: u64) -> Result<(), String> {
        match &mut self.backend {
            Backend::Userfaultfd { uffd, .. } => {
                let range = UffdioRange { start, len: end - start };
                let mut reg = UffdioRegister { range, mode: UFFDIO_REGISTER_MODE_WP, ioctls: 0 };
                ioctl_ptr(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg)
                    .map_err(os(&format!("registering {start:#x}-{end:#x} for write-protection")))?;
                let mut wp = UffdioWriteprotect { range: UffdioRange { start, len: end - start }, mode: UFFDIO_WRITEPROTECT_MODE_WP };
                ioctl_ptr(uffd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp)
                    .map_err(os(&format!("write-protecting {start:#x}-{end:#x}")))?;
            }
            Backend::Hashes { .. } => {
                self.hash_range(start, end, true)?;
            }
            // Nothing to do: the process was cleared at the start, and at each stop since
            // by the scans that came before (a round scans what it tracks, then tracks
            // what is new, in one stop). Writes since the last clearing count as dirty:
            // at worst a page goes once more.
            Backend::SoftDirty { .. } => {}
        }
        if !self.ranges.contains(&(start, end)) {
            self.ranges.push((start, end));
        }
        Ok(())
    }

    /// Soft-dirty: reads which pages of every tracked range were written since the
    /// last clearing into the ledger, and clears (the process must be stopped).
    fn harvest(&mut self) -> Result<(), String> {
        use std::io::Write;
        let Backend::SoftDirty { pagemap, clear_refs, ledger } = &mut self.backend else { return Ok(()) };
        let mut found = Vec::new();
        for &(start, end) in &self.ranges {
            found.extend(soft_dirty_pages(pagemap, start, end).map_err(os(&format!("reading the pagemap of {start:#x}-{end:#x}")))?);
        }
        (&*clear_refs).write_all(b"4").map_err(os(&format!("clearing the soft-dirty bits of process {}", self.pid)))?;
        ledger.harvested(found);
        Ok(())
    }

    /// Hashes the pages of `start..end` against the hashes kept: answers the runs of
    /// pages that changed (or, with `fresh`, just records them).
    fn hash_range(&mut self, start: u64, end: u64, fresh: bool) -> Result<Vec<(u64, u64)>, String> {
        let pid = self.pid;
        let Backend::Hashes { hashes, buf, pagemap } = &mut self.backend else { return Ok(Vec::new()) };
        // The pages the process has (present or swapped); the others read as zeros. A
        // sparse area is then hashed at the cost of its pages, not of its size.
        let has = pagemap.as_ref().and_then(|p| {
            let which = pagemap::Categories { all: 0, none: 0, any: pagemap::PAGE_IS_PRESENT | pagemap::PAGE_IS_SWAPPED };
            pagemap::scan(p, start, end, 0, which).ok()
        });
        let zero = xxhash_rust::xxh3::xxh3_64(&[0u8; PAGE as usize]);
        let mut changed: Vec<(u64, u64)> = Vec::new();
        let (mut at, mut next) = (start, 0);
        while at < end {
            let len = (end - at).min(HASH_BATCH * PAGE);
            // The regions come in address order, as the batches do.
            let empty = match &has {
                Some(h) => {
                    while next < h.len() && h[next].1 <= at {
                        next += 1;
                    }
                    !(next < h.len() && h[next].0 < at + len)
                }
                None => false,
            };
            if !empty {
                buf.resize(len as usize, 0);
                let got = vm_ranges(pid, &[(at, len)], buf.as_mut_ptr(), buf.len(), false).map_err(|e| e.to_string())?;
                if got != buf.len() {
                    return Err(format!("reading {at:#x}-{:#x} of process {pid}: the mapping changed", at + len));
                }
            }
            let mut mark = |addr: u64| {
                if !fresh {
                    match changed.last_mut() {
                        Some(last) if last.1 == addr => last.1 = addr + PAGE,
                        _ => changed.push((addr, addr + PAGE)),
                    }
                }
            };
            if empty {
                // All zeros now: what held something before changed.
                let emptied: Vec<u64> = hashes.range(at..at + len).map(|(&a, _)| a).collect();
                for addr in emptied {
                    hashes.remove(&addr);
                    mark(addr);
                }
            } else {
                for (i, page) in buf.chunks(PAGE as usize).enumerate() {
                    let addr = at + i as u64 * PAGE;
                    let h = xxhash_rust::xxh3::xxh3_64(page);
                    let before = if h == zero { hashes.remove(&addr) } else { hashes.insert(addr, h) };
                    if before.unwrap_or(zero) != h {
                        mark(addr);
                    }
                }
            }
            at += len;
        }
        Ok(changed)
    }

    /// The pages written since `start` or the last scan, as (start, end) runs; they
    /// are protected again, so the next scan reports only later writes.
    pub fn scan(&mut self) -> Result<Vec<(u64, u64)>, String> {
        let mut out = Vec::new();
        for (start, end) in self.ranges.clone() {
            out.extend(self.scan_range(start, end)?);
        }
        Ok(out)
    }

    /// [`DirtyTracker::scan`] of one range. Fails where a mapping of the range is not
    /// tracked: the process unmapped or replaced it since.
    pub fn scan_range(&mut self, start: u64, end: u64) -> Result<Vec<(u64, u64)>, String> {
        match &self.backend {
            Backend::Userfaultfd { pagemap, .. } => {
                pagemap_scan_range(pagemap, start, end, PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, PAGE_IS_WRITTEN)
                    .map_err(os(&format!("PAGEMAP_SCAN of {start:#x}-{end:#x} in process {}", self.pid)))
            }
            Backend::SoftDirty { ledger, .. } => {
                if ledger.needs_harvest(start, end) {
                    self.harvest()?;
                }
                let Backend::SoftDirty { ledger, .. } = &mut self.backend else { unreachable!("matched above") };
                Ok(ledger.take(start, end))
            }
            Backend::Hashes { .. } => {
                // A range never hashed belongs to a mapping that came since: not tracked.
                if !ranges::covers(&ranges::normalize(self.ranges.clone()), (start, end)) {
                    return Err(format!("{start:#x}-{end:#x} is not tracked"));
                }
                self.hash_range(start, end, false)
            }
        }
    }

    /// Removes the write-protection; dropping ferry's descriptor, the last one, ends
    /// the userfaultfd (and clears whatever a range unmapped meanwhile kept).
    pub fn stop(self) {
        if let Backend::Userfaultfd { uffd, .. } = &self.backend {
            for &(start, end) in &self.ranges {
                let mut range = UffdioRange { start, len: end - start };
                let _ = ioctl_ptr(uffd.as_raw_fd(), UFFDIO_UNREGISTER, &mut range);
            }
        }
    }
}

/// What soft-dirty harvests found and no scan has taken yet: a harvest reads (and
/// clears) every tracked range at once, each range's scan takes its part.
#[derive(Default)]
struct Ledger {
    /// Written pages not reported yet.
    pending: Vec<(u64, u64)>,
    /// Ranges whose scan took their part since the last harvest.
    taken: Vec<(u64, u64)>,
    /// Whether any harvest happened yet.
    ever: bool,
}

impl Ledger {
    /// Whether a scan of `start..end` must harvest first: its part since the last
    /// harvest was taken already (a new round), or nothing was harvested yet.
    fn needs_harvest(&self, start: u64, end: u64) -> bool {
        !self.ever || !ranges::intersect(&self.taken, &[(start, end)]).is_empty()
    }

    fn harvested(&mut self, found: Vec<(u64, u64)>) {
        self.pending = ranges::union(&self.pending, &ranges::normalize(found));
        self.taken.clear();
        self.ever = true;
    }

    fn take(&mut self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let part = ranges::intersect(&self.pending, &[(start, end)]);
        self.pending = ranges::subtract(&self.pending, &[(start, end)]);
        self.taken = ranges::union(&self.taken, &[(start, end)]);
        part
    }
}

const PM_SOFT_DIRTY: u64 = 1 << 55;
const PM_SWAPPED: u64 = 1 << 62;
const PM_PRESENT: u64 = 1 << 63;

/// The runs of pages of `start..end` with the soft-dirty bit set that the process
/// has (present or swapped), from the pagemap, a bounded batch at a time.
fn soft_dirty_pages(pagemap: &File, start: u64, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::unix::fs::FileExt;
    const BATCH: u64 = 64 * 1024;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut entries = Vec::new();
    let mut at = start;
    while at < end {
        let n = ((end - at) / PAGE).min(BATCH);
        entries.resize((n * 8) as usize, 0);
        pagemap.read_exact_at(&mut entries, at / PAGE * 8)?;
        for (i, e) in entries.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            if v & PM_SOFT_DIRTY != 0 && v & (PM_PRESENT | PM_SWAPPED) != 0 {
                let page = at + i as u64 * PAGE;
                match out.last_mut() {
                    Some(last) if last.1 == page => last.1 = page + PAGE,
                    _ => out.push((page, page + PAGE)),
                }
            }
        }
        at += n * PAGE;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_range_gets_what_was_written_in_it_once_per_harvest() {
        let mut l = Ledger::default();
        assert!(l.needs_harvest(0x1000, 0x9000), "nothing harvested yet");
        l.harvested(vec![(0x2000, 0x3000), (0xa000, 0xc000)]);
        // Two ranges scanned in one stop share the harvest.
        assert!(!l.needs_harvest(0x1000, 0x9000));
        assert_eq!(l.take(0x1000, 0x9000), vec![(0x2000, 0x3000)]);
        assert!(!l.needs_harvest(0x9000, 0x10000));
        assert_eq!(l.take(0x9000, 0x10000), vec![(0xa000, 0xc000)]);
        // The next round's scan of a range already taken harvests again; what the new
        // harvest finds elsewhere waits for that range's own scan.
        assert!(l.needs_harvest(0x1000, 0x9000));
        l.harvested(vec![(0x4000, 0x5000), (0xb000, 0xc000)]);
        assert_eq!(l.take(0x1000, 0x9000), vec![(0x4000, 0x5000)]);
        // A harvest for another range's start keeps what was not taken.
        l.harvested(vec![(0x6000, 0x7000)]);
        assert_eq!(l.take(0x9000, 0x10000), vec![(0xb000, 0xc000)]);
        assert_eq!(l.take(0x1000, 0x9000), vec![(0x6000, 0x7000)]);
    }
}
