//! Dirty-page tracking for pre-copy, on kernels without soft-dirty: a userfaultfd made
//! in the target by an injected call, fetched into ferry with `pidfd_getfd`, with the
//! tracked areas registered in write-protect *async* mode — a write just clears the
//! page's protection, nothing waits on ferry — and `PAGEMAP_SCAN` on the target's
//! pagemap to list the pages written since the last scan and protect them again.
//! `stop` undoes it all: the target is left with no userfaultfd and no protection.

use std::{
    fs::File,
    os::fd::{AsRawFd, OwnedFd},
};

use crate::{tracer::Tracer, uffd::*};

pub struct DirtyTracker {
    pid: i32,
    uffd: OwnedFd,
    pagemap: File,
    ranges: Vec<(u64, u64)>,
}

fn os(what: &str) -> impl FnOnce(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl DirtyTracker {
    /// Starts tracking writes to `ranges` (whole private anonymous areas) of the
    /// process stopped under `tracer`. Every page counts as clean from here.
    pub fn start(tracer: &mut Tracer, ranges: &[(u64, u64)]) -> Result<DirtyTracker, String> {
        let pid = tracer.pid();
        let uffd = userfaultfd_in(tracer, UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)?;
        let pagemap = File::open(format!("/proc/{pid}/pagemap")).map_err(os("opening the pagemap"))?;
        let mut t = DirtyTracker { pid, uffd, pagemap, ranges: Vec::new() };
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
        let range = UffdioRange { start, len: end - start };
        let mut reg = UffdioRegister { range, mode: UFFDIO_REGISTER_MODE_WP, ioctls: 0 };
        ioctl_ptr(self.uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg)
            .map_err(os(&format!("registering {start:#x}-{end:#x} for write-protection")))?;
        if !self.ranges.contains(&(start, end)) {
            self.ranges.push((start, end));
        }
        let mut wp = UffdioWriteprotect { range: UffdioRange { start, len: end - start }, mode: UFFDIO_WRITEPROTECT_MODE_WP };
        ioctl_ptr(self.uffd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp)
            .map_err(os(&format!("write-protecting {start:#x}-{end:#x}")))?;
        Ok(())
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

    /// [`DirtyTracker::scan`] of one range. Fails (EPERM) where a mapping of the range
    /// is not tracked: the process unmapped or replaced it since.
    pub fn scan_range(&mut self, start: u64, end: u64) -> Result<Vec<(u64, u64)>, String> {
        pagemap_scan_range(&self.pagemap, start, end, PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, PAGE_IS_WRITTEN)
            .map_err(os(&format!("PAGEMAP_SCAN of {start:#x}-{end:#x} in process {}", self.pid)))
    }

    /// Removes the write-protection; dropping ferry's descriptor, the last one, ends
    /// the userfaultfd (and clears whatever a range unmapped meanwhile kept).
    pub fn stop(self) {
        for &(start, end) in &self.ranges {
            let mut range = UffdioRange { start, len: end - start };
            let _ = ioctl_ptr(self.uffd.as_raw_fd(), UFFDIO_UNREGISTER, &mut range);
        }
    }
}
