//! Shared anonymous memory (`MAP_SHARED | MAP_ANONYMOUS`): the pages of an object
//! read once however many areas map it, and objects shared between processes of a
//! tree (mapped before a `fork`). Of those, the first process of the tree that maps
//! one carries its pages (the framework claimed it for that one); the others write
//! only their areas. At restore the first makes the object and says here where it
//! mapped it; each other opens it there (`/proc/PID/map_files`, the process held
//! stopped meanwhile), takes it with `pidfd_getfd` on ferry, and maps it: one object
//! again, a write by one seen by the others.

use std::{collections::HashMap, os::fd::AsRawFd, sync::Mutex};

use ferry_plugin_api::{abi_stable::std_types::RStr, ranges, util, ContextRef, SharedClaim};

use crate::layout::{Area, PAGE};
use ranges::Ranges;

/// The pages of shared anonymous area `area` that hold data, as runs of (address,
/// pages). The object's pages need not be mapped in the process (the pagemap would
/// miss them): its file, opened through `/proc/PID/map_files`, says where its data
/// lies (`SEEK_DATA`/`SEEK_HOLE`), without touching the process.
pub fn runs(pid: i32, area: &Area) -> Result<Vec<(u64, u64)>, String> {
    use std::os::fd::AsRawFd;
    let path = format!("/proc/{pid}/map_files/{:x}-{:x}", area.start, area.end);
    let file = std::fs::File::open(&path).map_err(|e| format!("shared anonymous memory at {:#x}: {path}: {e}", area.start))?;
    let (lo, hi) = (area.offset as i64, (area.offset + area.end - area.start) as i64);
    let mut runs = Vec::new();
    let mut at = lo;
    while at < hi {
        // SAFETY: lseek on a file we own.
        let data = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 || data >= hi {
            break; // ENXIO: no data past `at`
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) }.min(hi);
        if hole <= data {
            return Err(format!("shared anonymous memory at {:#x}: SEEK_HOLE: {}", area.start, std::io::Error::last_os_error()));
        }
        let (s, e) = (data as u64 / PAGE * PAGE, (hole as u64).div_ceil(PAGE) * PAGE);
        runs.push((area.start + (s - area.offset), (e - s) / PAGE));
        at = hole;
    }
    Ok(runs)
}

/// The runs of shared anonymous `area` whose object pages no area before it sends.
pub fn once_per_object(sent: &mut Vec<(u64, Ranges)>, area: &Area, runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let object = area.object.unwrap_or(0);
    let index = match sent.iter().position(|s| s.0 == object) {
        Some(i) => i,
        None => {
            sent.push((object, Vec::new()));
            sent.len() - 1
        }
    };
    // Addresses to offsets in the object and back.
    let (base, offset) = (area.start, area.offset);
    let wanted: Ranges = ranges::from_runs(&runs, PAGE).into_iter().map(|(s, e)| (s - base + offset, e - base + offset)).collect();
    let new = ranges::subtract(&ranges::normalize(wanted), &sent[index].1);
    sent[index].1 = ranges::union(&sent[index].1, &new);
    let back: Ranges = new.into_iter().map(|(s, e)| (s - offset + base, e - offset + base)).collect();
    ranges::to_runs(&back, PAGE)
}

/// Checkpoint: whether another process of the tree carries `object` (the claim the
/// framework made for the first process of the tree that maps it).
pub fn elsewhere(ctx: &mut ContextRef<'_>, object: u64) -> bool {
    matches!(ctx.claim_shared(RStr::from_str("shared-anon"), RStr::from_str(&object.to_string())), SharedClaim::Taken(_))
}

/// Where each object made by a process of this restore lies: object (its inode in the
/// image) → (pid, one of its areas, its size). Addresses only, no fds: nothing is kept
/// alive by this table.
static MADE: Mutex<Option<HashMap<u64, Made>>> = Mutex::new(None);

/// (pid, one of its areas, its size).
type Made = (i32, (u64, u64), u64);

/// Says where the objects `objects` (object, temporary address, size) made in process
/// `pid` stay: in their first area of `areas`.
pub fn made(pid: i32, areas: &[Area], objects: &[(u64, u64, u64)]) {
    let Ok(mut table) = MADE.lock() else { return };
    let table = table.get_or_insert_with(HashMap::new);
    for &(object, _, size) in objects {
        if let Some(a) = areas.iter().find(|a| a.object == Some(object)) {
            table.entry(object).or_insert((pid, (a.start, a.end), size));
        }
    }
}

/// Forgets the objects of a restore that failed.
pub fn forget() {
    if let Ok(mut t) = MADE.lock() {
        *t = None;
    }
}

/// Maps `object`, made by an earlier process of the restore, at `at` (`size` bytes)
/// in the process being rebuilt, read-write and shared, as the memory plugin maps an
/// object it makes itself.
pub fn map_made(ctx: &mut ContextRef<'_>, object: u64, at: u64, size: u64) -> Result<(), String> {
    let pid = ctx.pid();
    let what = format!("process {pid}: the shared anonymous memory (object {object}) it shares with another process of the tree");
    let found = MADE.lock().ok().and_then(|t| t.as_ref()?.get(&object).copied());
    let (holder, (start, end), made_size) = found.ok_or_else(|| format!("{what}: no process restored before it made it"))?;
    if size > made_size {
        return Err(format!("{what}: {size} bytes of it mapped here, but it was made with {made_size}"));
    }
    let path = format!("/proc/{holder}/map_files/{start:x}-{end:x}");
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).map_err(|e| format!("{what}: opening {path}: {e}"))?;
    let ferry = std::process::id() as u64;
    let pfd = util::syscall(ctx, pid, &format!("{what}: pidfd_open of ferry"), libc::SYS_pidfd_open, [ferry, 0, 0, 0, 0, 0])?;
    let fd = util::syscall(ctx, pid, &format!("{what}: pidfd_getfd"), libc::SYS_pidfd_getfd, [pfd, file.as_raw_fd() as u64, 0, 0, 0, 0]);
    util::syscall(ctx, pid, &format!("{what}: closing the pidfd of ferry"), libc::SYS_close, [pfd, 0, 0, 0, 0, 0])?;
    let fd = fd?;
    let flags = (libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE) as u64;
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let got = util::syscall(ctx, pid, &format!("{what}: mmap at {at:#x}"), libc::SYS_mmap, [at, size, rw, flags, fd, 0]);
    util::syscall(ctx, pid, &format!("{what}: close"), libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
    if got? != at {
        return Err(format!("{what}: mmap did not land at {at:#x}"));
    }
    Ok(())
}
