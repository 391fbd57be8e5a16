//! System V shared memory segments the process has attached (`shmat`): `/SYSV…`
//! areas. The first process of a request that attaches a segment carries it (the
//! framework claims it for that one in a tree): its key, size, mode, owner and whether
//! it was marked for removal, and its pages, read through the process's mapping as a
//! shared anonymous object's are. At restore that process makes the segment again
//! with its id (`kernel.shm_next_id`), or takes the one still there with that id, key
//! and size; every process attaches it where it was (`shmat`), and a segment that was
//! marked for removal is marked again once attached. Refused: a segment attached in
//! pieces or at an offset, and an id taken by another segment.

use ferry_plugin_api::{abi_stable::std_types::RStr, util, ContextRef, SharedClaim};
use serde::{Deserialize, Serialize};

use crate::layout::Area;

/// `SHM_DEST` in a segment's mode: marked for removal (`IPC_RMID`), gone at the last
/// detach.
const SHM_DEST: u32 = 0o1000;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    pub id: i32,
    pub key: i32,
    pub size: u64,
    /// Permission bits, and `SHM_DEST` when marked for removal.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The segment `id` as `/proc/sysvipc/shm` describes it.
fn describe(id: i32) -> Result<Segment, String> {
    let text = std::fs::read_to_string("/proc/sysvipc/shm").map_err(|e| format!("/proc/sysvipc/shm: {e}"))?;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<i64>().ok());
        if num(1) != Some(id as i64) {
            continue;
        }
        let bad = || format!("/proc/sysvipc/shm: a line for segment {id} that does not read: {line}");
        let mode = u32::from_str_radix(f.get(2).ok_or_else(bad)?, 8).map_err(|_| bad())?;
        return Ok(Segment {
            id,
            key: num(0).ok_or_else(bad)? as i32,
            size: num(3).ok_or_else(bad)? as u64,
            mode,
            uid: num(7).ok_or_else(bad)? as u32,
            gid: num(8).ok_or_else(bad)? as u32,
        });
    }
    Err(format!("System V shared memory segment {id}: not in /proc/sysvipc/shm"))
}

/// Checkpoint: the segments of `areas` (`AreaKind::Sysv`, `object` the id) this
/// process carries (another process of the tree carries the others), each checked to
/// be attached whole, from its start.
pub fn capture(ctx: &mut ContextRef<'_>, areas: &[Area]) -> Result<Vec<Segment>, String> {
    let pid = ctx.pid();
    let mut carried: Vec<Segment> = Vec::new();
    let mut seen: Vec<i32> = Vec::new();
    for a in areas.iter().filter(|a| a.kind == crate::layout::AreaKind::Sysv) {
        let id = a.object.unwrap_or(0) as i32;
        let seg = describe(id)?;
        let whole = seg.size.div_ceil(crate::layout::PAGE) * crate::layout::PAGE;
        if a.offset != 0 || a.end - a.start != whole {
            return Err(format!(
                "process {pid}: System V shared memory segment {id} is attached at {:#x}-{:#x} from offset {:#x}, not whole ({} bytes): not supported by the memory plugin",
                a.start, a.end, a.offset, seg.size
            ));
        }
        if seen.contains(&id) {
            continue;
        }
        seen.push(id);
        if !matches!(ctx.claim_shared(RStr::from_str("sysv-shm"), RStr::from_str(&id.to_string())), SharedClaim::Taken(_)) {
            carried.push(seg);
        }
    }
    Ok(carried)
}

/// Restore: makes each segment of `segments` again in ferry's IPC namespace (the
/// process's): with its id, key, size, mode and owner, or takes the one still there
/// with that id, key and size.
pub fn make(segments: &[Segment], pid: i32) -> Result<(), String> {
    for s in segments {
        let what = format!("process {pid}: System V shared memory segment {} (key {:#x}, {} bytes)", s.id, s.key, s.size);
        if let Ok(there) = describe(s.id) {
            // A named segment still there is the one the process knew (as a file
            // would be); a private one is another's, or the original's still running.
            if s.key != 0 && (there.key, there.size) == (s.key, s.size) {
                continue;
            }
            return Err(format!("{what}: its id is in use here (key {:#x}, {} bytes)", there.key, there.size));
        }
        std::fs::write("/proc/sys/kernel/shm_next_id", s.id.to_string()).map_err(|e| format!("{what}: kernel.shm_next_id: {e}"))?;
        let flags = libc::IPC_CREAT | libc::IPC_EXCL | (s.mode & 0o777) as i32;
        // SAFETY: shmget takes integers only.
        let got = unsafe { libc::shmget(s.key, s.size as usize, flags) };
        let _ = std::fs::write("/proc/sys/kernel/shm_next_id", "-1");
        if got < 0 {
            return Err(format!("{what}: shmget: {}", std::io::Error::last_os_error()));
        }
        if got != s.id {
            // SAFETY: as above; removes the segment just made.
            unsafe { libc::shmctl(got, libc::IPC_RMID, std::ptr::null_mut()) };
            return Err(format!("{what}: made with id {got}, its id being taken meanwhile"));
        }
        // SAFETY: shmid_ds is plain data, filled by IPC_STAT and read by IPC_SET.
        let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::shmctl(got, libc::IPC_STAT, &mut ds) } != 0 {
            return Err(format!("{what}: IPC_STAT: {}", std::io::Error::last_os_error()));
        }
        (ds.shm_perm.uid, ds.shm_perm.gid, ds.shm_perm.mode) = (s.uid, s.gid, (s.mode & 0o777) as _);
        // SAFETY: as above.
        if unsafe { libc::shmctl(got, libc::IPC_SET, &mut ds) } != 0 {
            return Err(format!("{what}: IPC_SET: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Attaches segment `area.object` at `area` in the process being rebuilt, writable
/// (its pages may follow; its protection comes back with the others).
pub fn attach(ctx: &mut ContextRef<'_>, area: &Area) -> Result<(), String> {
    let pid = ctx.pid();
    let id = area.object.unwrap_or(0);
    let what = format!("process {pid}: shmat of System V shared memory segment {id} at {:#x}", area.start);
    // SHM_REMAP: over whatever the blank child has there.
    let got = util::syscall(ctx, pid, &what, libc::SYS_shmat, [id, area.start, libc::SHM_REMAP as u64, 0, 0, 0])?;
    if got != area.start {
        return Err(format!("{what}: attached at {got:#x}"));
    }
    Ok(())
}

/// Marks again for removal the segments of `segments` that were (once every process
/// of the request that needs them attached them, or at once: Linux lets a process
/// attach a segment marked for removal while it lives).
pub fn remove_again(segments: &[Segment], pid: i32) -> Result<(), String> {
    for s in segments.iter().filter(|s| s.mode & SHM_DEST != 0) {
        // SAFETY: IPC_RMID takes no buffer.
        if unsafe { libc::shmctl(s.id, libc::IPC_RMID, std::ptr::null_mut()) } != 0 {
            return Err(format!("process {pid}: marking System V shared memory segment {} for removal: {}", s.id, std::io::Error::last_os_error()));
        }
    }
    Ok(())
}
