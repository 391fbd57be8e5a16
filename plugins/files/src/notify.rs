//! inotify and fanotify instances and pidfds (issue 12).
//!
//! - **inotify**: the instance's watches (wd, mask, watched inode) come from fdinfo;
//!   each inode is given a path through its file handle (`open_by_handle_at` on a mount
//!   of its file system, then the link of ferry's own fd), checked to be that very
//!   inode. The restore adds the watches again in wd order: the kernel hands out wds
//!   one after the other (cyclically, never reusing a lower one), so a gap of the
//!   original is burnt by adding and removing the next watch as many times as numbers
//!   are missing, and the `IN_IGNORED` events that leaves are read away. Queued events
//!   are not carried (the kernel offers no way to queue them again, nor to make an
//!   instance report `IN_Q_OVERFLOW` short of lowering a system-wide limit): an
//!   instance with some is refused ("retry").
//! - **fanotify**: the `fanotify_init` flags and event flags, inode marks (as inotify's
//!   watches) and mount marks (by the mount point of the mount id) come back with
//!   `fanotify_mark`. Refused: filesystem marks, marks for permission events (the
//!   answers a listener owes are not visible), queued events.
//! - **pidfds**: one to the process itself comes back with `pidfd_open` of the restored
//!   process, with its flags (`O_NONBLOCK`, `PIDFD_THREAD`); one to a process that has
//!   exited becomes a pidfd to a helper ferry forks and reaps (dead as well). A pidfd to
//!   another process, or to a thread other than the main one, is refused.
//!
//! All three are made last in the restore (before the epoll watches, which may name
//! them): a file the restore opened after an instance was back would show in it as an
//! event the process never caused. Paths are ferry's view of the files (its mount
//! namespace), as for every path the files plugin records.

use std::{
    collections::HashSet,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use ferry_plugin_api::{
    util::{proc_field, read_memory, syscall, syscall_raw, Scratch},
    ContextRef,
};
use serde::{Deserialize, Serialize};

use crate::model::{Desc, Object};

/// `IN_IGNORED`: a watch went (removed, or its inode deleted).
const IN_IGNORED: u32 = 0x8000;
const IN_DONT_FOLLOW: u32 = 0x0200_0000;
/// What inotify's fdinfo may show of a mask: the events, `IN_EXCL_UNLINK`, `IN_ONESHOT`.
const IN_MASK_SHOWN: u32 = 0x0000_0fff | 0x0400_0000 | 0x8000_0000;
/// Numbers burnt to recreate wd gaps, at most per instance (each is two system calls
/// and an event to read away; the queue holds 16384 by default).
pub const MAX_WD_BURNT: i64 = 4096;
const FAN_CLOEXEC: u32 = 0x1;
const FAN_NONBLOCK: u32 = 0x2;
const FAN_MARK_ADD: u32 = 0x1;
const FAN_MARK_DONT_FOLLOW: u32 = 0x4;
const FAN_MARK_MOUNT: u32 = 0x10;
const FAN_MARK_IGNORED_MASK: u32 = 0x20;
const FAN_MARK_IGNORED_SURV_MODIFY: u32 = 0x40;
const FAN_MARK_EVICTABLE: u32 = 0x200;
const FAN_MARK_IGNORE: u32 = 0x400;
/// Mark flags fdinfo shows that this plugin can set again.
const FAN_MFLAGS: u32 = FAN_MARK_IGNORED_SURV_MODIFY | FAN_MARK_EVICTABLE | FAN_MARK_IGNORE;
/// `FAN_OPEN_PERM | FAN_ACCESS_PERM | FAN_OPEN_EXEC_PERM | FAN_PRE_ACCESS`.
const FAN_PERM_EVENTS: u64 = 0x0001_0000 | 0x0002_0000 | 0x0004_0000 | 0x0010_0000;
/// `PIDFD_THREAD` (`O_EXCL`).
const PIDFD_THREAD: u32 = libc::O_EXCL as u32;

/// One inotify watch: its number, its mask, and a path of the watched inode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InotifyWatch {
    pub wd: i32,
    pub mask: u32,
    pub path: String,
}

/// One fanotify mark: on an inode (`mount` false, `path` of the inode) or on a mount
/// (`path` its mount point), with its flags (`FAN_MARK_IGNORED_SURV_MODIFY`,
/// `FAN_MARK_EVICTABLE`, `FAN_MARK_IGNORE`), mask and ignored mask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FanMark {
    pub mount: bool,
    pub path: String,
    pub flags: u32,
    pub mask: u64,
    pub ignored_mask: u64,
}

/// The words of a fdinfo line after its tag, as `key:value` pairs.
fn pairs(rest: &str) -> Vec<(&str, &str)> {
    rest.split_whitespace().filter_map(|w| w.split_once(':')).collect()
}

fn hex_of(pairs: &[(&str, &str)], key: &str, line: &str) -> Result<u64, String> {
    let v = pairs.iter().find(|p| p.0 == key).map(|p| p.1).ok_or_else(|| format!("fdinfo line {line:?} has no {key}:"))?;
    u64::from_str_radix(v, 16).map_err(|_| format!("fdinfo line {line:?}: {key}:{v} is not hexadecimal"))
}

/// A watched inode as fdinfo names it: its file system (`sdev`, the kernel's encoding),
/// inode number, and file handle (type, bytes) when the file system gives one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub sdev: u64,
    pub ino: u64,
    pub handle: Option<(i32, Vec<u8>)>,
}

fn inode_of(p: &[(&str, &str)], line: &str) -> Result<Inode, String> {
    let sdev = hex_of(p, "sdev", line)?;
    let ino = hex_of(p, "ino", line)?;
    let handle = match (p.iter().find(|x| x.0 == "fhandle-type"), p.iter().find(|x| x.0 == "f_handle")) {
        (Some(t), Some(h)) => {
            let t = i32::from_str_radix(t.1, 16).map_err(|_| format!("fdinfo line {line:?}: bad fhandle-type"))?;
            let bytes = ferry_plugin_api::util::from_hex(h.1, "fdinfo f_handle", 128, false)?;
            Some((t, bytes))
        }
        _ => None,
    };
    Ok(Inode { sdev, ino, handle })
}

/// inotify's fdinfo: (wd, mask, inode) per watch, in wd order.
pub fn parse_inotify(text: &str) -> Result<Vec<(i32, u32, Inode)>, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("inotify ") else { continue };
        let p = pairs(rest);
        let wd = hex_of(&p, "wd", line)?;
        let mask = hex_of(&p, "mask", line)?;
        if wd == 0 || wd > i32::MAX as u64 || mask > u32::MAX as u64 {
            return Err(format!("fdinfo line {line:?} is out of range"));
        }
        out.push((wd as i32, mask as u32, inode_of(&p, line)?));
    }
    out.sort_by_key(|w| w.0);
    Ok(out)
}

/// A fanotify mark as fdinfo shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FanTarget {
    Inode(Inode),
    Mount(u64),
    /// A filesystem (superblock) mark, by its `sdev`.
    Filesystem(u64),
}

/// fanotify's fdinfo: (init flags, event flags) and (target, mark flags, mask, ignored mask) per mark.
#[allow(clippy::type_complexity)]
pub fn parse_fanotify(text: &str) -> Result<((u32, u32), Vec<(FanTarget, u32, u64, u64)>), String> {
    let mut init = None;
    let mut marks = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("fanotify ") else { continue };
        let p = pairs(rest);
        if p.iter().any(|x| x.0 == "flags") {
            let flags = hex_of(&p, "flags", line)? as u32;
            init = Some((flags, hex_of(&p, "event-flags", line)? as u32));
            continue;
        }
        let target = if p.iter().any(|x| x.0 == "ino") {
            FanTarget::Inode(inode_of(&p, line)?)
        } else if p.iter().any(|x| x.0 == "mnt_id") {
            FanTarget::Mount(hex_of(&p, "mnt_id", line)?)
        } else {
            FanTarget::Filesystem(hex_of(&p, "sdev", line)?)
        };
        marks.push((target, hex_of(&p, "mflags", line)? as u32, hex_of(&p, "mask", line)?, hex_of(&p, "ignored_mask", line)?));
    }
    let init = init.ok_or("fanotify fdinfo has no `fanotify flags:` line")?;
    Ok((init, marks))
}

/// The `Pid:` of a pidfd's fdinfo (-1: the process has exited).
pub fn parse_pidfd(text: &str) -> Result<i32, String> {
    let v = proc_field(text, "Pid").ok_or("pidfd fdinfo has no Pid: line")?;
    v.trim().parse().map_err(|_| format!("pidfd fdinfo: bad Pid {v:?}"))
}

/// The kernel's `dev_t` (fdinfo `sdev`) as `major:minor` of mountinfo.
fn dev_name(sdev: u64) -> String {
    format!("{}:{}", sdev >> 20, sdev & 0xfffff)
}

/// A mount point (in ferry's view) of the file system `sdev`, preferring one that shows
/// its whole tree (root `/`).
fn mount_of(sdev: u64) -> Result<String, String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    let dev = dev_name(sdev);
    let mut best: Option<String> = None;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() > 4 && f[2] == dev {
            let point = unescape(f[4]);
            if f[3] == "/" {
                return Ok(point);
            }
            best.get_or_insert(point);
        }
    }
    best.ok_or_else(|| format!("no mount of file system {dev} in ferry's mount namespace"))
}

/// mountinfo's octal escapes (`\040` for a space) undone.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A path (in ferry's view) of the watched inode, checked to name it; `what` names the
/// instance and the watch in errors.
fn path_of(inode: &Inode, what: &str) -> Result<String, String> {
    let Some((htype, bytes)) = &inode.handle else {
        return Err(format!("{what}: the watched inode {} on {} has no file handle: not supported by the files plugin", inode.ino, dev_name(inode.sdev)));
    };
    let point = mount_of(inode.sdev).map_err(|e| format!("{what}: {e}"))?;
    let mount = std::fs::File::open(&point).map_err(|e| format!("{what}: opening the mount {point}: {e}"))?;
    let mut fh = Vec::with_capacity(8 + bytes.len());
    fh.extend_from_slice(&(bytes.len() as u32).to_ne_bytes());
    fh.extend_from_slice(&htype.to_ne_bytes());
    fh.extend_from_slice(bytes);
    // SAFETY: fh is a struct file_handle (bytes, type, the handle) the kernel reads.
    let fd = unsafe {
        libc::syscall(libc::SYS_open_by_handle_at, mount.as_raw_fd(), fh.as_ptr(), libc::O_PATH | libc::O_CLOEXEC | libc::O_NOFOLLOW)
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        let why = if e.raw_os_error() == Some(libc::ESTALE) { "it was deleted".to_string() } else { format!("open_by_handle_at: {e}") };
        return Err(format!("{what}: the watched inode {} ({why}): not supported by the files plugin", inode.ino));
    }
    // SAFETY: a fresh fd of ours.
    let file = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(|e| format!("{what}: readlink: {e}"))?;
    let path = link.into_os_string().into_string().map_err(|p| format!("{what}: the watched path {p:?} is not UTF-8"))?;
    if !path.starts_with('/') || path.ends_with(" (deleted)") {
        return Err(format!("{what}: the watched inode {} was deleted ({path}): not supported by the files plugin", inode.ino));
    }
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(&path).map_err(|e| format!("{what}: the watched {path}: {e}"))?;
    let dev = ((libc::major(m.dev()) as u64) << 20) | libc::minor(m.dev()) as u64;
    if m.ino() != inode.ino || dev != inode.sdev {
        return Err(format!("{what}: {path} no longer names the watched inode {}: not supported by the files plugin", inode.ino));
    }
    Ok(path)
}

/// Bytes queued to read on the process's fd `fd` (FIONREAD through ferry's duplicate).
fn queued(ctx: &mut ContextRef<'_>, fd: i32, what: &str) -> Result<i32, String> {
    let got = ctx.fetch_fd(fd).into_result().map_err(|e| format!("{what}: {}", e.message))?;
    // SAFETY: fetch_fd hands us a fresh fd that we own.
    let dup = unsafe { OwnedFd::from_raw_fd(got) };
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(dup.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return Err(format!("{what}: FIONREAD: {}", io::Error::last_os_error()));
    }
    Ok(n)
}

/// The mount point (in the process's view) of mount `id`.
fn mount_point(pid: i32, id: u64, what: &str) -> Result<String, String> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).map_err(|e| format!("{what}: reading mountinfo: {e}"))?;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() > 4 && f[0].parse::<u64>() == Ok(id) {
            return Ok(unescape(f[4]));
        }
    }
    Err(format!("{what}: its marked mount {id} is not in the process's mount table: not supported by the files plugin"))
}

/// The object of an inotify, fanotify or pidfd fd of process `pid` (link text `link`,
/// fdinfo `text`), or the one-line refusal.
pub fn describe(ctx: &mut ContextRef<'_>, fd: i32, link: &str, text: &str) -> Result<Object, String> {
    let pid = ctx.pid();
    let what = format!("process {pid}: fd {fd} ({link})");
    if link == "anon_inode:inotify" {
        let mut watches = Vec::new();
        let mut next = 1i64;
        for (wd, mask, inode) in parse_inotify(text).map_err(|e| format!("{what}: {e}"))? {
            let path = path_of(&inode, &format!("{what}: watch {wd}"))?;
            next = wd as i64 + 1;
            watches.push(InotifyWatch { wd, mask, path });
        }
        let burnt = next - 1 - watches.len() as i64;
        if burnt > MAX_WD_BURNT {
            return Err(format!("{what}: its watch numbers leave {burnt} unused below the highest (at most {MAX_WD_BURNT} can be made again): not supported by the files plugin"));
        }
        let n = queued(ctx, fd, &what)?;
        if n > 0 {
            return Err(format!("{what}: {n} bytes of inotify events queued, which the files plugin cannot queue again; retry"));
        }
        return Ok(Object::Inotify { watches });
    }
    if link == "anon_inode:[fanotify]" {
        let ((init_flags, event_flags), raw) = parse_fanotify(text).map_err(|e| format!("{what}: {e}"))?;
        let mut marks = Vec::new();
        for (target, flags, mask, ignored_mask) in raw {
            if flags & !FAN_MFLAGS != 0 {
                return Err(format!("{what}: a fanotify mark with flags {flags:#x}: not supported by the files plugin"));
            }
            if (mask | ignored_mask) & FAN_PERM_EVENTS != 0 {
                return Err(format!("{what}: a fanotify mark for permission events (mask {mask:#x}), whose unanswered events ferry cannot see: not supported by the files plugin"));
            }
            let (mount, path) = match target {
                FanTarget::Inode(inode) => (false, path_of(&inode, &format!("{what}: fanotify mark"))?),
                FanTarget::Mount(id) => (true, mount_point(pid, id, &what)?),
                FanTarget::Filesystem(sdev) => {
                    return Err(format!("{what}: a fanotify mark on the whole file system {}: not supported by the files plugin", dev_name(sdev)))
                }
            };
            marks.push(FanMark { mount, path, flags, mask, ignored_mask });
        }
        let n = queued(ctx, fd, &what)?;
        if n > 0 {
            return Err(format!("{what}: {n} bytes of fanotify events queued, which the files plugin cannot queue again; retry"));
        }
        return Ok(Object::Fanotify { init_flags, event_flags, marks });
    }
    // A pidfd.
    let target = parse_pidfd(text).map_err(|e| format!("{what}: {e}"))?;
    if target == -1 {
        return Ok(Object::Pidfd { dead: true });
    }
    if target == pid {
        return Ok(Object::Pidfd { dead: false });
    }
    if ctx.tids().contains(&target) {
        return Err(format!("{what}: a pidfd to thread {target} of the process, other than its main thread: not supported by the files plugin"));
    }
    Err(format!("{what}: a pidfd to process {target}, another process (of the request or not): not supported by the files plugin"))
}

/// Checks what the image says of one of these objects.
pub fn validate(o: &Object, what: &str) -> Result<(), String> {
    let path_ok = |p: &str| p.starts_with('/') && !p.contains('\0') && p.len() < libc::PATH_MAX as usize;
    match o {
        Object::Inotify { watches } => {
            let mut last = 0i64;
            for w in watches {
                if (w.wd as i64) <= last || w.mask & !IN_MASK_SHOWN != 0 || w.mask & 0xfff == 0 || !path_ok(&w.path) {
                    return Err(format!("{what}: inotify watch {} (mask {:#x}, {:?}) in the image is not valid", w.wd, w.mask, w.path));
                }
                last = w.wd as i64;
            }
            if last - watches.len() as i64 > MAX_WD_BURNT {
                return Err(format!("{what}: inotify watch numbers in the image leave too many gaps"));
            }
        }
        Object::Fanotify { marks, .. } => {
            for m in marks {
                if m.flags & !FAN_MFLAGS != 0 || (m.mask | m.ignored_mask) & FAN_PERM_EVENTS != 0 || !path_ok(&m.path) {
                    return Err(format!("{what}: a fanotify mark in the image is not valid ({m:?})"));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// `(nr)(args)` in the restore child, an error naming `what` on failure.
fn sys(ctx: &mut ContextRef<'_>, what: &str, nr: i64, args: [u64; 6]) -> Result<u64, String> {
    let tid = ctx.pid();
    syscall(ctx, tid, what, nr, args)
}

fn fd_arg(fd: i32) -> u64 {
    fd as i64 as u64
}

/// Makes the object of `desc` in the restore child (close-on-exec); answers its fd.
pub fn make(ctx: &mut ContextRef<'_>, what: &str, desc: &Desc) -> Result<i32, String> {
    let nonblock = desc.flags & libc::O_NONBLOCK as u32;
    match &desc.object {
        Object::Inotify { watches } => {
            let flags = (libc::O_NONBLOCK | libc::O_CLOEXEC) as u64;
            let fd = sys(ctx, &format!("{what}: inotify_init1"), libc::SYS_inotify_init1, [flags, 0, 0, 0, 0, 0])? as i32;
            add_watches(ctx, what, fd, watches)?;
            if nonblock == 0 {
                sys(ctx, &format!("{what}: F_SETFL"), libc::SYS_fcntl, [fd_arg(fd), libc::F_SETFL as u64, 0, 0, 0, 0])?;
            }
            Ok(fd)
        }
        Object::Fanotify { init_flags, event_flags, marks } => {
            let flags = (*init_flags | FAN_CLOEXEC) as u64;
            let fd = sys(ctx, &format!("{what}: fanotify_init"), libc::SYS_fanotify_init, [flags, *event_flags as u64, 0, 0, 0, 0])? as i32;
            for m in marks {
                let kind = if m.mount { FAN_MARK_MOUNT } else { FAN_MARK_DONT_FOLLOW };
                let mut scratch = Scratch::new(ctx);
                let at = scratch.cstr(ctx, &m.path)?;
                let label = format!("{what}: fanotify_mark of {}", m.path);
                if m.mask != 0 {
                    let f = FAN_MARK_ADD | kind | (m.flags & FAN_MARK_EVICTABLE);
                    sys(ctx, &label, libc::SYS_fanotify_mark, [fd_arg(fd), f as u64, m.mask, libc::AT_FDCWD as i64 as u64, at, 0])?;
                }
                if m.ignored_mask != 0 {
                    let ignore = if m.flags & FAN_MARK_IGNORE != 0 { 0 } else { FAN_MARK_IGNORED_MASK };
                    let f = FAN_MARK_ADD | kind | m.flags | ignore;
                    sys(ctx, &label, libc::SYS_fanotify_mark, [fd_arg(fd), f as u64, m.ignored_mask, libc::AT_FDCWD as i64 as u64, at, 0])?;
                }
            }
            if (nonblock != 0) != (init_flags & FAN_NONBLOCK != 0) {
                sys(ctx, &format!("{what}: F_SETFL"), libc::SYS_fcntl, [fd_arg(fd), libc::F_SETFL as u64, nonblock as u64, 0, 0, 0])?;
            }
            Ok(fd)
        }
        Object::Pidfd { dead } => {
            let flags = (desc.flags & (libc::O_NONBLOCK as u32 | PIDFD_THREAD)) as u64;
            if !*dead {
                let me = sys(ctx, &format!("{what}: getpid"), libc::SYS_getpid, [0; 6])?;
                return Ok(sys(ctx, &format!("{what}: pidfd_open of the restored process"), libc::SYS_pidfd_open, [me, flags, 0, 0, 0, 0])? as i32);
            }
            let corpse = dead_pidfd(flags as u32).map_err(|e| format!("{what}: {e}"))?;
            // The child takes ferry's pidfd of the reaped helper (it runs as root still).
            let ferry = std::process::id() as u64;
            let pfd = sys(ctx, &format!("{what}: pidfd_open of ferry"), libc::SYS_pidfd_open, [ferry, 0, 0, 0, 0, 0])? as i32;
            let tid = ctx.pid();
            let got = syscall_raw(ctx, tid, libc::SYS_pidfd_getfd, [fd_arg(pfd), fd_arg(corpse.as_raw_fd()), 0, 0, 0, 0])?;
            sys(ctx, &format!("{what}: closing the pidfd of ferry"), libc::SYS_close, [fd_arg(pfd), 0, 0, 0, 0, 0])?;
            if got < 0 {
                return Err(format!("{what}: pidfd_getfd of a pidfd to an exited process: {}", io::Error::from_raw_os_error(-got as i32)));
            }
            Ok(got as i32)
        }
        _ => Err(format!("internal error: {what} is not a notification instance or pidfd")),
    }
}

/// A pidfd (flags `flags`) to a process that has exited: a helper forked, its pidfd
/// taken while it is a zombie, then reaped.
fn dead_pidfd(flags: u32) -> Result<OwnedFd, String> {
    // SAFETY: the child only calls _exit, which is async-signal-safe.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(format!("fork of a helper to make a dead pidfd: {}", io::Error::last_os_error()));
    }
    if child == 0 {
        // SAFETY: leaves the forked copy at once.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: pidfd_open takes a pid and flags.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child, flags) };
    let err = io::Error::last_os_error();
    let mut status = 0;
    // SAFETY: reaps our own child.
    unsafe { libc::waitpid(child, &mut status, 0) };
    if fd < 0 {
        return Err(format!("pidfd_open of a helper: {err}"));
    }
    // SAFETY: a fresh fd of ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Adds `watches` to the fresh non-blocking instance `fd` in wd order, burning the
/// numbers of the gaps, then reads away the `IN_IGNORED` events the burning left.
fn add_watches(ctx: &mut ContextRef<'_>, what: &str, fd: i32, watches: &[InotifyWatch]) -> Result<(), String> {
    let mut next = 1i64;
    let mut burnt = HashSet::new();
    for w in watches {
        let mut scratch = Scratch::new(ctx);
        let at = scratch.cstr(ctx, &w.path)?;
        let label = format!("{what}: inotify_add_watch of {} (wd {})", w.path, w.wd);
        let add = |ctx: &mut ContextRef<'_>| -> Result<i64, String> {
            let tid = ctx.pid();
            let r = syscall_raw(ctx, tid, libc::SYS_inotify_add_watch, [fd_arg(fd), at, (w.mask | IN_DONT_FOLLOW) as u64, 0, 0, 0])?;
            if r < 0 {
                return Err(format!("{label}: {}", io::Error::from_raw_os_error(-r as i32)));
            }
            Ok(r)
        };
        while next < w.wd as i64 {
            // A number the original had no watch on: taken and given back.
            let got = add(ctx)?;
            sys(ctx, &format!("{label}: inotify_rm_watch"), libc::SYS_inotify_rm_watch, [fd_arg(fd), got as u64, 0, 0, 0, 0])?;
            burnt.insert(got as i32);
            next = got + 1;
        }
        let got = add(ctx)?;
        if got != w.wd as i64 {
            return Err(format!("{label}: the kernel gave wd {got}: the watch numbers cannot be made the same"));
        }
        next = got + 1;
    }
    // Read away the IN_IGNORED of every number burnt; anything else arrived during the
    // restore and would be lost by the reading: refused.
    let mut left = burnt.len();
    while left > 0 {
        let mut scratch = Scratch::new(ctx);
        let len = (16 * left as u64).min(scratch.room() & !15).min(1 << 16);
        let buf = scratch.alloc(len)?;
        let tid = ctx.pid();
        let n = syscall_raw(ctx, tid, libc::SYS_read, [fd_arg(fd), buf, len, 0, 0, 0])?;
        if n <= 0 {
            return Err(format!("{what}: {left} of the events of the wd numbers burnt did not come ({n})"));
        }
        let raw = read_memory(ctx, buf, n as usize)?;
        let mut off = 0;
        while off + 16 <= raw.len() {
            let word = |i: usize| u32::from_ne_bytes(raw[off + i..off + i + 4].try_into().expect("4 bytes"));
            let (wd, mask, name_len) = (word(0) as i32, word(4), word(12) as usize);
            if mask != IN_IGNORED || !burnt.remove(&wd) {
                return Err(format!("{what}: an event (wd {wd}, mask {mask:#x}) arrived while ferry rebuilt the instance; retry"));
            }
            left -= 1;
            off += 16 + name_len;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_inotify_fdinfo() {
        let t = "pos:\t0\nflags:\t04000\nmnt_id:\t17\nino:\t1038\n\
                 inotify wd:4 ino:13 sdev:fe00000 mask:2 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:1300000000000000\n\
                 inotify wd:1 ino:3c4a7 sdev:fe00000 mask:4000100 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:a7c4030000000000\n";
        let w = parse_inotify(t).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!((w[0].0, w[0].1), (1, 0x4000100));
        assert_eq!(w[0].2, Inode { sdev: 0xfe00000, ino: 0x3c4a7, handle: Some((1, vec![0xa7, 0xc4, 3, 0, 0, 0, 0, 0])) });
        assert_eq!(w[1].0, 4);
        assert!(parse_inotify("inotify wd:x ino:1 sdev:1 mask:1\n").is_err());
        assert_eq!(parse_inotify("pos: 0\n").unwrap(), vec![]);
        assert_eq!(dev_name(0xfe00000), "254:0");
        assert_eq!(dev_name(0x800001), "8:1");
    }

    #[test]
    fn parses_fanotify_and_pidfd_fdinfo() {
        let t = "flags:\t04002\nfanotify flags:2 event-flags:8000\n\
                 fanotify mnt_id:1b mflags:0 mask:20 ignored_mask:0\n\
                 fanotify ino:2e1 sdev:fe00000 mflags:40 mask:0 ignored_mask:2 fhandle-bytes:8 fhandle-type:1 f_handle:e102000000000000\n\
                 fanotify sdev:fe00000 mflags:0 mask:2 ignored_mask:0\n";
        let ((flags, ev), marks) = parse_fanotify(t).unwrap();
        assert_eq!((flags, ev), (2, 0x8000));
        assert_eq!(marks[0], (FanTarget::Mount(0x1b), 0, 0x20, 0));
        assert!(matches!(&marks[1], (FanTarget::Inode(i), 0x40, 0, 2) if i.ino == 0x2e1));
        assert_eq!(marks[2].0, FanTarget::Filesystem(0xfe00000));
        assert!(parse_fanotify("fanotify mnt_id:1 mflags:0 mask:1 ignored_mask:0\n").is_err());
        assert_eq!(parse_pidfd("pos:\t0\nflags:\t02004002\nPid:\t23785\nNSpid:\t23785\n"), Ok(23785));
        assert_eq!(parse_pidfd("Pid:\t-1\nNSpid:\t-1\n"), Ok(-1));
        assert!(parse_pidfd("pos: 0\n").is_err());
        assert_eq!(unescape("/a\\040b"), "/a b");
    }

    #[test]
    fn json_round_trip() {
        let d = Desc {
            fds: vec![crate::model::Slot { fd: 4, cloexec: true }],
            flags: 0o4000,
            pos: 0,
            object: Object::Inotify { watches: vec![InotifyWatch { wd: 3, mask: 0x8000_0002, path: "/tmp/a b".into() }] },
            locks: Vec::new(),
        };
        let text = serde_json::to_string(&d).unwrap();
        assert!(text.contains(r#""type":"inotify""#), "{text}");
        assert_eq!(serde_json::from_str::<Desc>(&text).unwrap(), d);
        let f = Object::Fanotify { init_flags: 2, event_flags: 0x8000, marks: vec![FanMark { mount: true, path: "/".into(), flags: 0, mask: 8, ignored_mask: 0 }] };
        assert_eq!(serde_json::from_str::<Object>(&serde_json::to_string(&f).unwrap()).unwrap(), f);
        let p = Object::Pidfd { dead: true };
        assert_eq!(serde_json::to_string(&p).unwrap(), r#"{"type":"pidfd","dead":true}"#);
        assert!(serde_json::from_str::<Object>(r#"{"type":"pidfd","dead":true,"pid":7}"#).is_err(), "unknown fields are refused");
    }

    #[test]
    fn images_are_checked() {
        let w = |wd, mask, path: &str| InotifyWatch { wd, mask, path: path.into() };
        let ok = Object::Inotify { watches: vec![w(1, 2, "/tmp"), w(3, 0x8000_0100, "/x")] };
        assert!(validate(&ok, "x").is_ok());
        for bad in [
            vec![w(2, 2, "/a"), w(2, 2, "/b")],    // a wd twice
            vec![w(0, 2, "/a")],                   // wd 0
            vec![w(1, 0, "/a")],                   // no event
            vec![w(1, 0x4000_0002, "/a")],         // a bit fdinfo never shows
            vec![w(1, 2, "a")],                    // a relative path
            vec![w(MAX_WD_BURNT as i32 + 2, 2, "/a")], // too many gaps
        ] {
            assert!(validate(&Object::Inotify { watches: bad.clone() }, "x").is_err(), "{bad:?}");
        }
        let m = FanMark { mount: false, path: "/a".into(), flags: 0x40, mask: 2, ignored_mask: 0 };
        assert!(validate(&Object::Fanotify { init_flags: 0, event_flags: 0, marks: vec![m.clone()] }, "x").is_ok());
        let perm = FanMark { mask: 0x10000, ..m.clone() };
        assert!(validate(&Object::Fanotify { init_flags: 0, event_flags: 0, marks: vec![perm] }, "x").is_err());
        let flags = FanMark { flags: 0x1, ..m };
        assert!(validate(&Object::Fanotify { init_flags: 0, event_flags: 0, marks: vec![flags] }, "x").is_err());
    }
}
