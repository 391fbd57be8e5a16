//! `PAGEMAP_SCAN` on `/proc/PID/pagemap` (linux/fs.h, Linux 6.7+), which the libc crate
//! lacks: the kernel reports whole regions of pages in chosen categories (present,
//! written since write-protected, file-backed…) instead of 8 bytes per page, and with
//! `PM_SCAN_WP_MATCHING` write-protects them again. Shared by the framework (dirty
//! tracking, post-copy) and the memory plugin.

use std::{fs::File, io, os::fd::AsRawFd};

#[repr(C)]
#[derive(Default)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
pub const PAGEMAP_SCAN: u64 = (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | ((b'f' as u64) << 8) | 16;
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// The shared zero page.
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// A guard region's page (`MADV_GUARD_INSTALL`, Linux 6.14): such a page also reads
/// as swapped (and written), though nothing is behind it.
pub const PAGE_IS_GUARD: u64 = 1 << 8;

/// Which pages a scan reports: those with every category of `all` set, none of `none`
/// set, and (when `any` is not 0) at least one of `any`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Categories {
    pub all: u64,
    pub none: u64,
    pub any: u64,
}

impl Categories {
    pub fn all_of(c: u64) -> Self {
        Categories { all: c, none: 0, any: 0 }
    }
}

/// PAGEMAP_SCAN over `[start, end)` of the process whose pagemap is open, in as many
/// calls as the answer needs: the (start, end) of every region of pages in `which`,
/// adjacent regions merged. Fails with ENOTTY on kernels without it.
pub fn scan(pagemap: &File, start: u64, end: u64, flags: u64, which: Categories) -> io::Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut vec = [PageRegion::default(); 64];
    let mut at = start;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags,
            start: at,
            end,
            vec: vec.as_mut_ptr() as u64,
            vec_len: vec.len() as u64,
            category_inverted: which.none,
            category_mask: which.all | which.none,
            category_anyof_mask: which.any,
            return_mask: which.all | which.none | which.any,
            ..Default::default()
        };
        // SAFETY: `arg` is a valid #[repr(C)] pm_scan_arg whose `vec` points to `vec`,
        // alive and writable for `vec_len` regions during the call.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg as *mut PmScanArg) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for r in &vec[..(n as usize).min(vec.len())] {
            match out.last_mut() {
                Some(last) if last.1 == r.start => last.1 = r.end,
                _ => out.push((r.start, r.end)),
            }
        }
        // The kernel stops early when the vector is full; walk_end says where.
        if arg.walk_end <= at {
            break;
        }
        at = arg.walk_end;
    }
    Ok(out)
}
