//! Which pages of a mapping hold something of the process's own, read from its
//! pagemap (PAGEMAP_SCAN, or the pagemap itself on kernels without it) or, for shared
//! anonymous memory, from its object's data and holes.

use std::os::unix::fs::FileExt;

use ferry_plugin_api::{pagemap, ranges, ranges::Ranges};

use crate::layout::{Area, AreaKind, Runs, PAGE};

/// Pagemap bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;
/// What one page-table page maps.
const HUGE: u64 = 2 << 20;

/// Which pages of `area` live only in memory, as runs of (address, pages): pages of
/// the process's own (anonymous, or copies it wrote of a file's pages), present or
/// swapped out; never the shared zero page. PAGEMAP_SCAN answers in regions (3 ms per
/// GiB of present pages here, 7 times faster than reading the pagemap); kernels
/// without it are read 8 bytes a page.
pub fn dirty_runs(pagemap: &std::fs::File, area: &Area) -> Result<Vec<(u64, u64)>, String> {
    // Whether a page is a file's costs the kernel a look at the page itself: asked only
    // of file mappings (an anonymous area holds no file pages).
    let file = if matches!(area.kind, AreaKind::File | AreaKind::Deleted) { pagemap::PAGE_IS_FILE } else { 0 };
    // A guard page reads as swapped; asked only where guards are (older kernels refuse
    // the category).
    let guard = if area.guards.is_empty() { 0 } else { pagemap::PAGE_IS_GUARD };
    let which = pagemap::Categories {
        all: 0,
        none: file | guard | pagemap::PAGE_IS_PFNZERO,
        any: pagemap::PAGE_IS_PRESENT | pagemap::PAGE_IS_SWAPPED,
    };
    match pagemap::scan(pagemap, area.start, area.end, 0, which) {
        Ok(regions) => Ok(regions.into_iter().map(|(s, e)| (s, (e - s) / PAGE)).collect()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EINVAL)) => read_pagemap(pagemap, area),
        Err(e) => Err(format!("PAGEMAP_SCAN of {:#x}-{:#x}: {e}", area.start, area.end)),
    }
}

/// [`dirty_runs`] at the freeze after pre-copy rounds. Where the rounds keep the
/// destination's copy (`kept`), a page present now is one sent or written since (a
/// first write is dirty to every tracker), so only the pages sent there are looked at,
/// to find those the process dropped since; the rest of a kept range, holes the
/// tracking filled with markers a whole GiB wide, is not walked in the freeze.
pub fn runs_after_rounds(pagemap: &std::fs::File, area: &Area, kept: &[(u64, u64)], sent: &[(u64, u64)]) -> Result<Vec<(u64, u64)>, String> {
    let whole = [(area.start, area.end)];
    let inside = ranges::intersect(&whole, kept);
    if inside.is_empty() {
        return dirty_runs(pagemap, area);
    }
    // One walk of a page table covers 2 MiB: nearer sent ranges are walked as one.
    let mut look: Ranges = Vec::new();
    for (s, e) in ranges::intersect(&inside, sent) {
        match look.last_mut() {
            Some(last) if s - last.1 < HUGE => last.1 = e,
            _ => look.push((s, e)),
        }
    }
    let mut runs = Vec::new();
    for (s, e) in ranges::union(&ranges::subtract(&whole, &inside), &look) {
        runs.extend(dirty_runs(pagemap, &Area { start: s, end: e, ..area.clone() })?);
    }
    Ok(runs)
}

/// [`dirty_runs`] the old way: the pagemap entry of every page.
fn read_pagemap(pagemap: &std::fs::File, area: &Area) -> Result<Vec<(u64, u64)>, String> {
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
            let wanted = if matches!(area.kind, AreaKind::File | AreaKind::Deleted) {
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

/// The guard pages among `ranges` (they read as written and swapped, and hold
/// nothing: reading one fails). Kernels that cannot tell (before 6.14) report none.
pub fn guard_pages(pagemap: &std::fs::File, ranges: &[(u64, u64)]) -> Ranges {
    let which = pagemap::Categories::all_of(pagemap::PAGE_IS_GUARD);
    ranges.iter().flat_map(|&(s, e)| pagemap::scan(pagemap, s, e, 0, which).unwrap_or_default()).collect()
}

pub fn open_pagemap(pid: i32) -> Result<std::fs::File, String> {
    std::fs::File::open(format!("/proc/{pid}/pagemap")).map_err(|e| format!("opening /proc/{pid}/pagemap: {e}"))
}

/// `runs` and their `data` without the pages that hold only zeros, where `eligible`
/// (areas a restore maps fresh, whose pages read as zeros until written) covers them:
/// a page of zeros the process wrote need not travel. `None` when every page holds
/// something (nothing to repack).
pub fn without_zero_pages(runs: &[(u64, u64)], data: &[u8], eligible: &[(u64, u64)]) -> Option<(Runs, Vec<u8>)> {
    let zero = |page: &[u8]| page.chunks_exact(16).all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0);
    let mut pages = data.chunks_exact(PAGE as usize);
    let mut kept: Runs = Vec::new();
    let mut out = Vec::new();
    let mut dropped = false;
    for &(addr, n) in runs {
        let free = ranges::covers(eligible, (addr, addr + n * PAGE));
        for i in 0..n {
            let page = pages.next()?;
            let at = addr + i * PAGE;
            if free && zero(page) {
                if !dropped {
                    // The first hole: what went before is copied over now.
                    dropped = true;
                    out.reserve(data.len());
                    let before = (data.len() - pages.len() * PAGE as usize) - PAGE as usize;
                    out.extend_from_slice(&data[..before]);
                }
                continue;
            }
            if dropped {
                out.extend_from_slice(page);
            }
            match kept.last_mut() {
                Some((a, k)) if *a + *k * PAGE == at => *k += 1,
                _ => kept.push((at, 1)),
            }
        }
    }
    dropped.then_some((kept, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_of_fresh_areas_are_left_out_and_the_rest_keep_their_place() {
        let p = PAGE as usize;
        let page = |b: u8| vec![b; p];
        // Runs: 3 pages at 0x10000 (zero in the middle), 2 at 0x20000 (first zero), 1 at
        // 0x30000 (zero, but not in a fresh area).
        let data = [page(1), page(0), page(2), page(0), page(3), page(0)].concat();
        let runs = [(0x10000, 3), (0x20000, 2), (0x30000, 1)];
        let eligible = [(0x10000, 0x30000)];
        let (kept, out) = without_zero_pages(&runs, &data, &eligible).unwrap();
        assert_eq!(kept, [(0x10000, 1), (0x12000, 1), (0x21000, 1), (0x30000, 1)]);
        assert_eq!(out, [page(1), page(2), page(3), page(0)].concat());
        // A page with one byte set is not zero; nothing dropped answers None.
        let mut one = page(0);
        one[p - 1] = 1;
        assert_eq!(without_zero_pages(&[(0x10000, 1)], &one, &eligible), None);
        assert_eq!(without_zero_pages(&runs, &data, &[]), None);
    }
}
