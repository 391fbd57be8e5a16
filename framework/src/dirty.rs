//! Dirty-page tracking for pre-copy. Two backends:
//!
//! - **userfaultfd** (kernels with `UFFD_FEATURE_WP_ASYNC` and `PAGEMAP_SCAN`, 6.7+): a
//!   userfaultfd made in the target by an injected call, fetched into ferry with
//!   `pidfd_getfd` and closed in the target at once (only ferry holds it), with the
//!   tracked areas registered in write-protect *async* mode — a write just clears the
//!   page's protection, nothing waits on ferry — and `PAGEMAP_SCAN` on the target's
//!   pagemap to list the pages written since the last scan and protect them again
//!   (about a millisecond per GiB per round).
//! - **page hashes** (everywhere): an XXH3 hash of every tracked page, compared with a
//!   fresh one at each scan — reading all tracked memory every round (100–150 ms per
//!   GiB, and so much longer freezes), but needing nothing of the kernel.
//!
//! Soft-dirty (`clear_refs` + pagemap bit 55) is not a backend: this kernel lacks it
//! (`ferry check`), so it could not be tested here.
//!
//! `stop` undoes it all: the target is left with no userfaultfd and no protection.

use std::{
    collections::HashMap,
    fs::File,
    os::fd::{AsRawFd, OwnedFd},
};

use crate::{
    config::DirtyTracking,
    tracer::{vm_ranges, Tracer},
    uffd::*,
};

const PAGE: u64 = 4096;
/// Pages hashed per read.
const HASH_BATCH: u64 = 256;

enum Backend {
    Userfaultfd { uffd: OwnedFd, pagemap: File },
    /// Page address → hash of its contents when last scanned.
    Hashes { hashes: HashMap<u64, u64>, buf: Vec<u8> },
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
    let probe = || {
        let features = crate::check::probe_all();
        crate::check::find(&features, "userfaultfd-wp-async").is_some_and(|f| f.present)
    };
    match wanted {
        DirtyTracking::Auto if probe() => Ok(DirtyTracking::Userfaultfd),
        DirtyTracking::Auto => Ok(DirtyTracking::PageHash),
        DirtyTracking::SoftDirty => {
            Err("soft-dirty tracking is not in this build (this kernel lacks soft-dirty); use auto, userfaultfd or page-hash".into())
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
            DirtyTracking::PageHash => Backend::Hashes { hashes: HashMap::new(), buf: Vec::new() },
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
        }
        if !self.ranges.contains(&(start, end)) {
            self.ranges.push((start, end));
        }
        Ok(())
    }

    /// Hashes the pages of `start..end` against the hashes kept: answers the runs of
    /// pages that changed (or, with `fresh`, just records them).
    fn hash_range(&mut self, start: u64, end: u64, fresh: bool) -> Result<Vec<(u64, u64)>, String> {
        let pid = self.pid;
        let Backend::Hashes { hashes, buf } = &mut self.backend else { return Ok(Vec::new()) };
        let mut changed: Vec<(u64, u64)> = Vec::new();
        let mut at = start;
        while at < end {
            let len = (end - at).min(HASH_BATCH * PAGE);
            buf.resize(len as usize, 0);
            let got = vm_ranges(pid, &[(at, len)], buf.as_mut_ptr(), buf.len(), false).map_err(|e| e.to_string())?;
            if got != buf.len() {
                return Err(format!("reading {at:#x}-{:#x} of process {pid}: the mapping changed", at + len));
            }
            for (i, page) in buf.chunks(PAGE as usize).enumerate() {
                let addr = at + i as u64 * PAGE;
                let h = xxhash_rust::xxh3::xxh3_64(page);
                let before = hashes.insert(addr, h);
                if !fresh && before != Some(h) {
                    match changed.last_mut() {
                        Some(last) if last.1 == addr => last.1 = addr + PAGE,
                        _ => changed.push((addr, addr + PAGE)),
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
            Backend::Hashes { hashes, .. } => {
                // A page never hashed belongs to a mapping that came since: not tracked.
                if let Some(p) = (start..end).step_by(PAGE as usize).find(|p| !hashes.contains_key(p)) {
                    return Err(format!("page {p:#x} is not tracked"));
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
