//! Mapped objects that have no name left to map again: files deleted while mapped
//! (a library replaced by an upgrade, a data file mapped then unlinked) and memfds.
//!
//! Checkpoint: each object (one per inode, however many areas map it) is read through
//! `/proc/PID/map_files` (it is the very inode), whole or the ranges mapped (see
//! [`capture`]), skipping its holes, and follows the `mm` record as `gone-data`
//! records. Restore: the object is made
//! again — a memfd with `memfd_create` (same name, sealable when it had seals), a file
//! at its old path (or beside it, `.ferry-deleted-NAME-N-K` in the same directory, when
//! the name is taken meanwhile, or in /dev/shm when the directory is gone or not
//! writable: /proc/PID/maps then names that place) — opened once in the restore child, mapped at each
//! area (so two shared mappings of it are one object again), and the file unlinked.
//! Its contents go in through ferry's own fd as the records come; seals last.
//!
//! An fd of the process on the same object is the files plugin's: it carries no
//! contents of its own and opens the object again through one of its mappings
//! (`/proc/self/map_files`), after this plugin made it.
//!
//! Refused, with one line: a shared mapping of a file that still has a name
//! elsewhere, and a shared object mapped by another process of the request.

use std::{
    fs::File,
    os::{
        fd::AsRawFd,
        unix::fs::{FileExt, MetadataExt},
    },
};

use ferry_plugin_api::{
    abi_stable::std_types::RStr,
    util::{self, Scratch},
    ContextRef, SharedClaim, SinkRef,
};
use serde::{Deserialize, Serialize};

use crate::layout::{Area, AreaKind};

/// The bytes of one `gone-data` record at most.
const CHUNK: u64 = 256 << 10;
/// `F_SEAL_SEAL`: what a memfd made without `MFD_ALLOW_SEALING` answers.
const SEAL_SEAL: u32 = 1;

/// One deleted file or memfd the process maps, as the image records it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Gone {
    /// The file's path when it was deleted, or the memfd's name (without `memfd:`).
    pub path: String,
    pub memfd: bool,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// `F_GET_SEALS` of a memfd.
    #[serde(default)]
    pub seals: u32,
}

/// What the kernel shows for a mapping of a deleted file or memfd, without the
/// ` (deleted)` mark; `None` for anything else.
pub fn deleted_path(maps_path: &str) -> Option<&str> {
    maps_path.strip_suffix(" (deleted)").filter(|p| p.starts_with('/'))
}

/// What checkpoint reads each object's contents from: its file, and the byte ranges
/// the image needs of it.
pub struct Source {
    file: File,
    ranges: Vec<(u64, u64)>,
}

/// `statfs` type of hugetlbfs: its pages are not a memfd's or a file's of another
/// file system, and ferry does not make them again.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Numbers the deleted objects of `areas` (their `object` becomes the index into the
/// answer) and reads what the image needs of each. Refuses what cannot be carried.
///
/// An object only mapped private, with no fd of the process on it, is carried for the
/// ranges its areas map (a library's text and data are the whole of it; a big data
/// file mapped a page at a time is not); any other is carried whole (a shared
/// mapping writes all of it, an fd reads all of it), its holes left out either way.
pub fn capture(ctx: &mut ContextRef<'_>, areas: &mut [Area]) -> Result<(Vec<Gone>, Vec<Source>), String> {
    let pid = ctx.pid();
    let mut gone: Vec<Gone> = Vec::new();
    let mut sources: Vec<Source> = Vec::new();
    let mut keys: Vec<(u64, u64)> = Vec::new();
    let mut whole: Vec<bool> = Vec::new();
    let mut nlinks: Vec<u64> = Vec::new();
    for area in areas.iter_mut().filter(|a| a.kind == AreaKind::Deleted) {
        let path = area.path.clone().unwrap_or_default();
        let shown = format!("{path} (deleted)");
        let at = area.start;
        let i = match keys.iter().position(|k| *k == deleted_key(pid, area).unwrap_or_default()) {
            Some(i) => i,
            None => {
                let map = format!("/proc/{pid}/map_files/{:x}-{:x}", area.start, area.end);
                let file = File::open(&map).map_err(|e| format!("process {pid}: mapping {at:#x} of {shown}: {map}: {e}"))?;
                let st = file.metadata().map_err(|e| format!("process {pid}: mapping {at:#x} of {shown}: fstat: {e}"))?;
                // SAFETY: fstatfs into a zeroed struct, on a file we own.
                let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
                if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } == 0 && fs.f_type as i64 == HUGETLBFS_MAGIC {
                    return Err(format!("process {pid}: mapping {at:#x} of {shown} is of huge pages (hugetlbfs): not supported by the memory plugin"));
                }
                if !st.file_type().is_file() {
                    return Err(format!("process {pid}: mapping {at:#x} of {shown} is not a regular file: not supported by the memory plugin"));
                }
                let memfd = path.starts_with("/memfd:");
                let seals = if memfd {
                    // SAFETY: fcntl on a file we own.
                    let s = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
                    if s < 0 {
                        return Err(format!("process {pid}: {shown}: F_GET_SEALS: {}", std::io::Error::last_os_error()));
                    }
                    s as u32
                } else {
                    0
                };
                let name = if memfd { path.trim_start_matches("/memfd:").to_string() } else { path.clone() };
                gone.push(Gone { path: name, memfd, mode: st.mode(), uid: st.uid(), gid: st.gid(), size: st.size(), seals });
                keys.push((st.dev(), st.ino()));
                whole.push(false);
                nlinks.push(if memfd { 0 } else { st.nlink() });
                sources.push(Source { file, ranges: Vec::new() });
                gone.len() - 1
            }
        };
        area.object = Some(i as u64);
        if area.shared {
            if nlinks[i] > 0 {
                return Err(format!("process {pid}: shared mapping {at:#x} of {shown}, which still has another name: not supported by the memory plugin"));
            }
            claim(ctx, &shown, keys[i])?;
            whole[i] = true;
        }
        let end = (area.offset + (area.end - area.start)).min(gone[i].size);
        if area.offset < end {
            sources[i].ranges.push((area.offset, end));
        }
    }
    if !gone.is_empty() {
        for (d, i) in open_fds(pid) {
            if let Some(k) = keys.iter().position(|k| *k == (d, i)) {
                whole[k] = true;
            }
        }
    }
    for (k, source) in sources.iter_mut().enumerate() {
        source.ranges = if whole[k] { vec![(0, gone[k].size)] } else { ferry_plugin_api::ranges::normalize(std::mem::take(&mut source.ranges)) };
    }
    Ok((gone, sources))
}

/// The (dev, ino) of the object `area` of `pid` maps.
fn deleted_key(pid: i32, area: &Area) -> Option<(u64, u64)> {
    let st = std::fs::metadata(format!("/proc/{pid}/map_files/{:x}-{:x}", area.start, area.end)).ok()?;
    Some((st.dev(), st.ino()))
}

/// (dev, ino) of each open fd of `pid`.
fn open_fds(pid: i32) -> Vec<(u64, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    dir.filter_map(|e| std::fs::metadata(e.ok()?.path()).ok().map(|st| (st.dev(), st.ino()))).collect()
}

fn claim(ctx: &mut ContextRef<'_>, shown: &str, key: (u64, u64)) -> Result<(), String> {
    let pid = ctx.pid();
    let id = format!("{}:{}", key.0, key.1);
    match ctx.claim_shared(RStr::from_str("shared-mapping"), RStr::from_str(&id)) {
        SharedClaim::Taken(other) => Err(format!("process {pid}: {shown} is mapped shared by process {other} too: not supported yet")),
        _ => Ok(()),
    }
}

/// Writes the ranges of each object the image needs as `gone-data` records: (index,
/// offset) then bytes, its holes left out.
pub fn put_data(sink: &mut SinkRef<'_>, sources: &[Source], gone: &[Gone]) -> Result<(), String> {
    let mut buf = Vec::new();
    for (i, (src, g)) in sources.iter().zip(gone).enumerate() {
        let fd = src.file.as_raw_fd();
        for &(lo, hi) in &src.ranges {
            let mut at = lo;
            while at < hi {
                // SAFETY: lseek on a file we own.
                let data = unsafe { libc::lseek(fd, at as i64, libc::SEEK_DATA) };
                if data < 0 || data as u64 >= hi {
                    break; // ENXIO: no data past `at`
                }
                // SAFETY: as above.
                let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
                if hole <= data {
                    return Err(format!("{} (deleted): SEEK_HOLE: {}", g.path, std::io::Error::last_os_error()));
                }
                let (mut off, end) = (data as u64, (hole as u64).min(hi));
                while off < end {
                    let n = (end - off).min(CHUNK) as usize;
                    buf.clear();
                    buf.extend_from_slice(&(i as u64).to_le_bytes());
                    buf.extend_from_slice(&off.to_le_bytes());
                    buf.resize(16 + n, 0);
                    src.file.read_exact_at(&mut buf[16..], off).map_err(|e| format!("reading {} (deleted) at {off}: {e}", g.path))?;
                    util::put_raw(sink, "gone-data", &buf)?;
                    off += n as u64;
                }
                at = end;
            }
        }
    }
    Ok(())
}

/// One object made again: the child's fd on it, ferry's own, and the name to unlink.
pub struct Made {
    pub child_fd: u64,
    pub file: File,
    pub name: Option<String>,
}

/// Makes each object again in the restore child, empty and as big as it was.
pub fn make(ctx: &mut ContextRef<'_>, gone: &[Gone], created: &mut Vec<String>) -> Result<Vec<Made>, String> {
    let pid = ctx.pid();
    let mut made = Vec::new();
    for g in gone {
        let (child_fd, name) = if g.memfd {
            let mut scratch = Scratch::new(ctx);
            let at = scratch.cstr(ctx, &g.path)?;
            let sealing = if g.seals & !SEAL_SEAL != 0 || g.seals == 0 { libc::MFD_ALLOW_SEALING } else { 0 };
            let what = format!("process {pid}: memfd_create {}", g.path);
            (util::syscall(ctx, pid, &what, libc::SYS_memfd_create, [at, (libc::MFD_CLOEXEC | sealing) as u64, 0, 0, 0, 0])?, None)
        } else {
            let at = free_name(&g.path, created)?;
            let mut scratch = Scratch::new(ctx);
            let addr = scratch.cstr(ctx, &at)?;
            let what = format!("process {pid}: opening {at}, made again for {} (deleted)", g.path);
            let flags = (libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
            (util::syscall(ctx, pid, &what, libc::SYS_openat, [libc::AT_FDCWD as u64, addr, flags, 0, 0, 0])?, Some(at))
        };
        let mine = format!("/proc/{pid}/fd/{child_fd}");
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&mine).map_err(|e| format!("{mine}: {e}"))?;
        file.set_len(g.size).map_err(|e| format!("sizing {} again: {e}", g.path))?;
        // SAFETY: fchown/fchmod on a file we own.
        if unsafe { libc::fchown(file.as_raw_fd(), g.uid, g.gid) } != 0 || unsafe { libc::fchmod(file.as_raw_fd(), g.mode & 0o7777) } != 0 {
            return Err(format!("giving {} back its owner and mode: {}", g.path, std::io::Error::last_os_error()));
        }
        made.push(Made { child_fd, file, name });
    }
    Ok(made)
}

/// Makes an empty file at `path`, or beside it (`.ferry-deleted-N-K` in the same
/// directory) when the name is taken, or in /dev/shm when its directory is gone or
/// cannot be written (read-only, say); answers where.
fn free_name(path: &str, created: &mut Vec<String>) -> Result<String, String> {
    let (dir, base) = path.rsplit_once('/').ok_or_else(|| format!("{path} (deleted) has no directory"))?;
    let n = created.len();
    let mut dir = if dir.is_empty() { "/" } else { dir }.to_string();
    let mut attempt = 0u32;
    while attempt < 16 {
        let at = if attempt == 0 { path.to_string() } else { format!("{}/.ferry-deleted-{base}-{n}-{attempt}", dir.trim_end_matches('/')) };
        match std::fs::OpenOptions::new().write(true).create_new(true).mode_0600().open(&at) {
            Ok(_) => {
                created.push(at.clone());
                return Ok(at);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => attempt += 1,
            Err(e) if dir != "/dev/shm" && matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EACCES | libc::EROFS | libc::ENOTDIR)) => {
                dir = "/dev/shm".into();
                attempt = 1;
            }
            Err(e) => return Err(format!("making {path} (deleted) again at {at}: {e}")),
        }
    }
    Err(format!("no free name to make {path} (deleted) again beside it"))
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

/// Fills an object from one `gone-data` record.
pub fn fill(made: &[Made], gone: &[Gone], payload: &[u8]) -> Result<(), String> {
    let (i, off, data) = check_data(gone, payload)?;
    let (Some(m), g) = (made.get(i), &gone[i]) else {
        return Err(format!("a gone-data record names object {i}, which the image has not"));
    };
    m.file.write_all_at(data, off).map_err(|e| format!("filling {} again: {e}", g.path))
}

/// The object index, offset and data of a `gone-data` record, checked against the
/// image's deleted objects `gone`.
pub fn check_data<'a>(gone: &[Gone], payload: &'a [u8]) -> Result<(usize, u64, &'a [u8]), String> {
    let (Some(i), Some(off)) = (util::u64_le(payload, 0), util::u64_le(payload, 8)) else {
        return Err("a gone-data record without its header".into());
    };
    let data = &payload[16..];
    let Some(g) = gone.get(i as usize) else {
        return Err(format!("a gone-data record names object {i}, which the image has not"));
    };
    if off.checked_add(data.len() as u64).is_none_or(|e| e > g.size) {
        return Err(format!("a gone-data record writes past the {} bytes of {}", g.size, g.path));
    }
    Ok((i as usize, off, data))
}

/// Seals each memfd as it was, once filled and mapped.
pub fn seal(made: &[Made], gone: &[Gone]) -> Result<(), String> {
    for (m, g) in made.iter().zip(gone) {
        let seals = g.seals & !SEAL_SEAL;
        let all = if g.seals & SEAL_SEAL != 0 && seals != 0 { g.seals } else { seals };
        if g.memfd && all != 0 {
            // SAFETY: fcntl on a file we own.
            if unsafe { libc::fcntl(m.file.as_raw_fd(), libc::F_ADD_SEALS, all as libc::c_int) } != 0 {
                return Err(format!("memfd:{}: F_ADD_SEALS {all:#x}: {}", g.path, std::io::Error::last_os_error()));
            }
        }
    }
    Ok(())
}

/// Checks what the image says of its deleted objects and the areas that map them.
pub fn validate(gone: &[Gone], areas: &[Area]) -> Result<(), String> {
    for g in gone {
        if g.path.is_empty() || g.path.contains('\0') || (!g.memfd && !g.path.starts_with('/')) || (g.memfd && g.path.len() > 249) {
            return Err(format!("the image names a deleted object {:?}", g.path));
        }
    }
    for a in areas.iter().filter(|a| a.kind == AreaKind::Deleted) {
        if a.object.is_none_or(|o| o as usize >= gone.len()) {
            return Err(format!("the image's mapping {:#x}-{:#x} names no deleted object", a.start, a.end));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_name_is_made_beside_and_a_gone_directory_in_dev_shm() {
        let dir = tempfile_dir();
        let path = format!("{dir}/lib.so");
        let mut created = Vec::new();
        assert_eq!(free_name(&path, &mut created).unwrap(), path);
        let beside = free_name(&path, &mut created).unwrap();
        assert!(beside.starts_with(&format!("{dir}/.ferry-deleted-lib.so-")), "{beside}");
        let gone = free_name(&format!("{dir}/no-such-dir/x"), &mut created).unwrap();
        assert!(gone.starts_with("/dev/shm/.ferry-deleted-x-"), "{gone}");
        assert_eq!(created.len(), 3);
        for c in &created {
            std::fs::remove_file(c).unwrap();
        }
        std::fs::remove_dir(&dir).unwrap();
    }

    fn tempfile_dir() -> String {
        let dir = std::env::temp_dir().join(format!("ferry-gone-test-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        dir.to_string_lossy().into_owned()
    }

    #[test]
    fn an_area_naming_no_object_is_refused() {
        let g = Gone { path: "/x".into(), memfd: false, mode: 0o100600, uid: 0, gid: 0, size: 1, seals: 0 };
        let area = |object| Area {
            start: 0x1000,
            end: 0x2000,
            prot: 1,
            shared: false,
            kind: AreaKind::Deleted,
            path: Some("/x".into()),
            offset: 0,
            growsdown: false,
            file: None,
            object,
            flags: vec![],
            guards: vec![],
        };
        validate(std::slice::from_ref(&g), &[area(Some(0))]).unwrap();
        assert!(validate(std::slice::from_ref(&g), &[area(Some(1))]).is_err());
        assert!(validate(std::slice::from_ref(&g), &[area(None)]).is_err());
        let relative = Gone { path: "x".into(), ..g };
        assert!(validate(&[relative], &[]).is_err());
    }
}
