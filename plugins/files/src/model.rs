//! The records of the files plugin and their validation. Everything read back from an
//! image is checked here before restore acts on it: fd numbers, lengths, paths.
//!
//! Records, in order:
//! - `files` (JSON, [`Header`]): cwd, root, umask, and how many `fd` and `pipe`
//!   records follow.
//! - `fd` (JSON, [`Desc`]) per open file description that is not a pipe, in the order
//!   of its lowest fd number; a description that carries contents (a deleted file, a
//!   memfd) is followed by `fd-data` raw records, at most [`CHUNK`] bytes each, that add
//!   up to its `data_len`.
//! - `pipe` (JSON, [`PipeRec`]) per pipe or FIFO, with all its descriptions (ends),
//!   followed by `pipe-data` raw records that add up to its `data_len`.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::locks::{Lock, MAX_LOCKS};

pub const KIND_HEADER: &str = "files";
pub const KIND_DESC: &str = "fd";
pub const KIND_DESC_DATA: &str = "fd-data";
pub const KIND_PIPE: &str = "pipe";
pub const KIND_PIPE_DATA: &str = "pipe-data";

/// Version of the record layout below.
pub const FORMAT: u32 = 1;
/// The highest fd number an image may name (the kernel's `nr_open` ceiling).
pub const MAX_FD: i32 = 1 << 20;
/// Largest raw data record.
pub const CHUNK: usize = 1 << 20;
/// `O_CLOEXEC` as fdinfo shows it (the fd's close-on-exec bit, not the description's).
pub const O_CLOEXEC: u32 = 0o2000000;
/// Largest pipe an image may ask for (the kernel refuses more than 2 GiB anyway).
pub const MAX_PIPE_SIZE: u64 = 1 << 31;
/// `sizeof(struct sockaddr_un)`.
pub const UNIX_ADDR_MAX: usize = 110;
/// Longest memfd name the kernel takes (`MFD_NAME_MAX_LEN`).
pub const MEMFD_NAME_MAX: usize = 249;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub format: u32,
    /// Working directory (as ferry sees the path).
    pub cwd: String,
    /// Root directory; restored with chroot only when not "/".
    pub root: String,
    pub umask: u32,
    /// Number of `fd` records that follow.
    pub descriptions: u64,
    /// Number of `pipe` records that follow them.
    pub pipes: u64,
    /// The working directory was removed (`rmdir`) while the process was in it: `cwd`
    /// is where it was. Made again empty there (or beside it when the name is taken),
    /// entered, and removed again; the same directory as a [`Object::DeletedDir`] of
    /// the image (`dev`, `ino`) is entered through that description instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd_deleted: Option<GoneDir>,
}

/// A directory removed while still in use, as `stat` showed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoneDir {
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// One fd number of a description and its close-on-exec bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slot {
    pub fd: i32,
    pub cloexec: bool,
}

/// What an `fd` description is open on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Object {
    /// Anything reopened by its path: a regular file, a directory, a device, an
    /// `O_PATH` fd. `mode` (`st_mode`) and `rdev` are checked after reopening.
    /// `tty_ctime`: images of ferry before `--shell-job` recorded another process's
    /// terminal here with its node's change time (`[sec, nsec]`), checked too; now
    /// written as [`Object::Terminal`], still read.
    Path {
        path: String,
        mode: u32,
        rdev: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tty_ctime: Option<[i64; 2]>,
    },
    /// A terminal outside the request, for a shell job (see [`crate::shell_job`]):
    /// `ctime` is its node's change time, checked where it is reopened by its path;
    /// `controlling`: the process led its session with it as controlling terminal;
    /// `foreground`: and its group was the terminal's foreground.
    Terminal { path: String, mode: u32, rdev: u64, ctime: [i64; 2], controlling: bool, foreground: bool },
    /// The master of a pseudo-terminal pair both of whose ends belong to the request
    /// (see [`crate::pty`]): made again as `/dev/pts/{index}` with `state`.
    PtyMaster { index: u32, state: Box<crate::pty::PtyState> },
    /// A slave (`path`, `/dev/pts/{index}`) of such a pair: reopened once its master
    /// is made; `controlling`, `foreground` as for [`Object::Terminal`].
    PtySlave { index: u32, path: String, controlling: bool, foreground: bool },
    /// A regular file deleted while open: recreated from its contents, reopened, and
    /// unlinked. Several descriptions of one inode (`dev`, `ino`) share one copy: the
    /// first carries `data_len` (the contents follow), the others have none. `mapped`:
    /// an address where the process maps the same file; the memory plugin (restored
    /// first) makes the file again, and the description is opened through that
    /// mapping (`/proc/self/map_files`), with no contents of its own.
    Deleted {
        path: String,
        dev: u64,
        ino: u64,
        mode: u32,
        uid: u32,
        gid: u32,
        size: u64,
        data_len: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mapped: Option<u64>,
    },
    /// A directory removed while open (`O_RDONLY|O_DIRECTORY`, `O_PATH`): made again
    /// empty at `path` (or beside it when the name is taken) with its mode and owner,
    /// reopened with the description's flags, and removed. Descriptions of one
    /// directory (`dev`, `ino`) share one.
    DeletedDir { path: String, dev: u64, ino: u64, mode: u32, uid: u32, gid: u32 },
    /// A character or block device node unlinked while open: made again with `mknod`
    /// (`mode` with its type, `rdev`) at `path` or beside it, owned as it was, opened
    /// with the description's flags and offset, and unlinked. Shared like `DeletedDir`.
    DeletedDevice { path: String, dev: u64, ino: u64, mode: u32, rdev: u64, uid: u32, gid: u32 },
    /// A memfd: recreated with `memfd_create`, filled, sealed. Shared like `Deleted`,
    /// and opened through a mapping of it like `Deleted` when `mapped`.
    Memfd {
        name: String,
        dev: u64,
        ino: u64,
        mode: u32,
        seals: u32,
        size: u64,
        data_len: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mapped: Option<u64>,
    },
    /// An eventfd with its counter.
    Eventfd { count: u64, semaphore: bool },
    /// A timerfd: its clock, the time left and the interval (`[sec, nsec]`, relative),
    /// and the expirations not read yet (`TFD_IOC_SET_TICKS`). An absolute or
    /// cancel-on-set timer comes back relative, due at the same moment.
    Timerfd { clock: i32, value: [i64; 2], interval: [i64; 2], ticks: u64 },
    /// A signalfd and the signals it reads.
    Signalfd { mask: u64 },
    /// An epoll instance and what it watches, by the fd number each watched file has
    /// (checked to be the file it was added as). Rebuilt after every other fd.
    Epoll { watches: Vec<Watch> },
    /// One end of a Unix socket pair whose other end (`peer`) is the process's too, or
    /// (`across`) another process's of the tree (see `unix_across`); the bytes queued
    /// for it to read follow (a stream's in chunks, each message of a datagram or
    /// seqpacket socket in a record of its own). Made again with `socketpair`, the
    /// queue refilled through the other end, shut down as it was.
    UnixPair {
        ino: u64,
        peer: u64,
        sock_type: u8,
        shutdown: u8,
        data_len: u64,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        across: bool,
    },
    /// A listening TCP socket (`sock_type` `SOCK_STREAM`) or a UDP socket
    /// (`SOCK_DGRAM`): bound again to `addr` (the `sockaddr`, hex) with its options
    /// (level, option, value), then listening with `backlog`, or connected to `peer`.
    /// Connections and queued datagrams do not follow.
    Inet { family: i32, sock_type: i32, addr: String, peer: Option<String>, backlog: u32, options: Vec<[i32; 3]> },
    /// A Unix socket made again from its names (`sockaddr_un`, hex: an abstract name, or
    /// an absolute path): a listener (stream or seqpacket, with `backlog`) or a datagram
    /// socket, bound to `addr` (for a path, its socket file had permission bits `mode`;
    /// the one the process the image is of left is replaced) and/or, a datagram socket,
    /// connected to `peer` again. Waiting connections and queued datagrams do not
    /// follow (the checkpoint refuses them). `unlinked`: its socket file was removed
    /// since (the name stays the socket's, no file has it): bound again to the path,
    /// which must be free, and the file made by the bind removed (no `mode` then).
    UnixSocket {
        sock_type: i32,
        addr: Option<String>,
        mode: Option<u32>,
        peer: Option<String>,
        backlog: Option<u32>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        unlinked: bool,
    },
    /// An inotify instance and its watches, in wd order (see [`crate::notify`]).
    Inotify { watches: Vec<crate::notify::InotifyWatch> },
    /// A fanotify instance: its `fanotify_init` flags and event flags, and its marks.
    Fanotify { init_flags: u32, event_flags: u32, marks: Vec<crate::notify::FanMark> },
    /// A pidfd to the process itself, or (`dead`) to a process that has exited.
    Pidfd { dead: bool },
    /// An established TCP connection, made again in repair mode (see [`crate::tcp`]).
    Tcp { conn: Box<crate::tcp::Conn> },
}

/// One file an epoll instance watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Watch {
    /// The fd number the file was added by (the watch's key with the file).
    pub fd: i32,
    pub events: u32,
    pub data: u64,
    /// Where the watched file is now, when `fd` no longer holds it (closed after a
    /// `dup`, or reused for another file): the watch is added again under `fd`
    /// through a duplicate of `file` put there for the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<i32>,
}

/// An open file description and every fd number that refers to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Desc {
    pub fds: Vec<Slot>,
    /// File status flags and access mode (fdinfo `flags:` without `O_CLOEXEC`).
    pub flags: u32,
    /// File offset (fdinfo `pos:`).
    pub pos: i64,
    pub object: Object,
    /// The locks held through it (see [`crate::locks`]): its flock and OFD locks, and
    /// the process's POSIX locks taken through it. Absent when none, so that an
    /// image with locks is refused, not restored without them, by a ferry that knows none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locks: Vec<Lock>,
}

/// One end (description) of a pipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipeEnd {
    pub fds: Vec<Slot>,
    pub flags: u32,
}

/// A pipe (`pipe:[ino]`) or a FIFO (`fifo` is its path) with its unread bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipeRec {
    pub ino: u64,
    pub fifo: Option<String>,
    /// `F_GETPIPE_SZ`.
    pub size: u64,
    pub data_len: u64,
    pub ends: Vec<PipeEnd>,
}

impl Desc {
    /// How many content bytes follow this record.
    pub fn data_len(&self) -> u64 {
        match &self.object {
            Object::Path { .. } | Object::Terminal { .. } | Object::PtyMaster { .. } | Object::PtySlave { .. } | Object::Eventfd { .. } | Object::Timerfd { .. } | Object::Signalfd { .. } | Object::Epoll { .. } => 0,
            Object::UnixPair { data_len, .. } => *data_len,
            Object::Inet { .. } | Object::UnixSocket { .. } | Object::DeletedDir { .. } | Object::DeletedDevice { .. } => 0,
            Object::Inotify { .. } | Object::Fanotify { .. } | Object::Pidfd { .. } | Object::Tcp { .. } => 0,
            Object::Deleted { data_len, .. } | Object::Memfd { data_len, .. } => data_len.unwrap_or(0),
        }
    }

    /// The fd numbers, for messages: "fd 3" or "fds 3, 4".
    pub fn label(&self) -> String {
        fds_label(&self.fds)
    }
}

pub fn fds_label(slots: &[Slot]) -> String {
    let nums: Vec<String> = slots.iter().map(|s| s.fd.to_string()).collect();
    if nums.len() == 1 {
        format!("fd {}", nums[0])
    } else {
        format!("fds {}", nums.join(", "))
    }
}

/// Checks a path from the image: absolute, no NUL byte, not absurdly long.
fn check_path(what: &str, path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{what}: path {path:?} in the image is not absolute"));
    }
    if path.contains('\0') {
        return Err(format!("{what}: path {path:?} in the image holds a NUL byte"));
    }
    if path.len() >= libc::PATH_MAX as usize {
        return Err(format!("{what}: path in the image is {} bytes long", path.len()));
    }
    Ok(())
}

/// Checks the fd numbers of one description: at least one, each in 0..=MAX_FD, none
/// named twice in the whole image (`seen` collects them across records).
pub fn check_slots(what: &str, slots: &[Slot], seen: &mut HashSet<i32>) -> Result<(), String> {
    if slots.is_empty() {
        return Err(format!("{what} in the image has no fd number"));
    }
    for s in slots {
        if !(0..=MAX_FD).contains(&s.fd) {
            return Err(format!("{what}: fd number {} in the image is out of range 0..={MAX_FD}", s.fd));
        }
        if !seen.insert(s.fd) {
            return Err(format!("{what}: fd {} is named twice in the image", s.fd));
        }
    }
    Ok(())
}

impl Header {
    pub fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("files record format {} is not the supported {FORMAT}", self.format));
        }
        check_path("cwd", &self.cwd)?;
        check_path("root", &self.root)?;
        if self.cwd_deleted.is_some_and(|d| d.mode & libc::S_IFMT != libc::S_IFDIR) {
            return Err(format!("the deleted working directory {} in the image is not a directory", self.cwd));
        }
        if self.umask > 0o777 {
            return Err(format!("umask {:#o} in the image is out of range", self.umask));
        }
        let most = MAX_FD as u64 + 1;
        if self.descriptions > most || self.pipes > most || self.descriptions + self.pipes > most {
            return Err(format!(
                "the image claims {} descriptions and {} pipes: more than there can be fds",
                self.descriptions, self.pipes
            ));
        }
        Ok(())
    }
}

impl Desc {
    pub fn validate(&self, seen: &mut HashSet<i32>) -> Result<(), String> {
        let what = format!("description of {}", self.label());
        check_slots(&what, &self.fds, seen)?;
        if self.flags & O_CLOEXEC != 0 {
            return Err(format!("{what}: flags {:#o} hold O_CLOEXEC, which belongs to each fd", self.flags));
        }
        if !self.locks.is_empty() {
            if !matches!(self.object, Object::Path { .. } | Object::Deleted { .. } | Object::Memfd { .. } | Object::DeletedDevice { .. })
                || self.locks.len() > MAX_LOCKS
            {
                return Err(format!("{what}: {} locks on a file this plugin does not lock", self.locks.len()));
            }
            for l in &self.locks {
                l.validate(&what)?;
            }
        }
        match &self.object {
            Object::Path { path, .. } | Object::Terminal { path, .. } => check_path(&what, path)?,
            Object::DeletedDir { path, mode, .. } => {
                check_path(&what, path)?;
                if mode & libc::S_IFMT != libc::S_IFDIR {
                    return Err(format!("{what}: a deleted directory of mode {mode:#o}"));
                }
            }
            Object::DeletedDevice { path, mode, .. } => {
                check_path(&what, path)?;
                if !matches!(mode & libc::S_IFMT, libc::S_IFCHR | libc::S_IFBLK) {
                    return Err(format!("{what}: a deleted device node of mode {mode:#o}"));
                }
            }
            Object::Deleted { path, size, data_len, .. } => {
                check_path(&what, path)?;
                if let Some(n) = data_len {
                    if n != size {
                        return Err(format!("{what}: {n} content bytes for a file of {size} bytes"));
                    }
                }
                if *size > i64::MAX as u64 {
                    return Err(format!("{what}: size {size} is out of range"));
                }
            }
            Object::Eventfd { count, .. } => {
                if *count == u64::MAX {
                    return Err(format!("{what}: eventfd count {count} is out of range"));
                }
            }
            Object::Timerfd { clock, value, interval, .. } => {
                let clocks = [libc::CLOCK_REALTIME, libc::CLOCK_MONOTONIC, libc::CLOCK_BOOTTIME, libc::CLOCK_REALTIME_ALARM, libc::CLOCK_BOOTTIME_ALARM];
                if !clocks.contains(clock) || [value, interval].iter().any(|t| t[0] < 0 || !(0..1_000_000_000).contains(&t[1])) {
                    return Err(format!("{what}: timerfd clock {clock}, time {value:?} every {interval:?} are not valid"));
                }
            }
            Object::Signalfd { .. } | Object::PtySlave { .. } => {}
            Object::PtyMaster { state, .. } => crate::pty::validate(state, &what)?,
            Object::Inotify { .. } | Object::Fanotify { .. } | Object::Pidfd { .. } => crate::notify::validate(&self.object, &what)?,
            Object::Inet { family, sock_type, addr, peer, backlog, options } => {
                let want = match *family {
                    libc::AF_INET => 16,
                    libc::AF_INET6 => 28,
                    _ => return Err(format!("{what}: a socket of address family {family}")),
                };
                let levels = [libc::SOL_SOCKET, libc::IPPROTO_TCP, libc::IPPROTO_IPV6];
                let mut bad = !matches!(*sock_type, libc::SOCK_STREAM | libc::SOCK_DGRAM) || *backlog > 1 << 20;
                bad |= options.iter().any(|o| !levels.contains(&o[0])) || (peer.is_some() && *sock_type == libc::SOCK_STREAM);
                for a in std::iter::once(addr).chain(peer.iter()) {
                    let bytes = ferry_plugin_api::util::from_hex(a, &what, want, true)?;
                    bad |= u16::from_le_bytes([bytes[0], bytes[1]]) as i32 != *family;
                }
                if bad {
                    return Err(format!("{what}: a socket the image describes wrongly"));
                }
            }
            Object::Tcp { conn } => conn.validate(&what)?,
            Object::UnixSocket { sock_type, addr, mode, peer, backlog, unlinked } => {
                let bad_name = |hex: &str| -> Result<(bool, bool), String> {
                    let bytes = ferry_plugin_api::util::from_hex(hex, &what, UNIX_ADDR_MAX, false)?;
                    let path = bytes.get(2).is_some_and(|&b| b != 0);
                    let bad = bytes.len() < 3
                        || u16::from_le_bytes([bytes[0], bytes[1]]) as i32 != libc::AF_UNIX
                        || (path && (bytes[2] != b'/' || bytes.last() != Some(&0) || bytes[2..bytes.len() - 1].contains(&0)));
                    Ok((bad, path))
                };
                let (mut bad, path) = match addr {
                    Some(a) => bad_name(a)?,
                    None => (false, false),
                };
                if let Some(p) = peer {
                    bad |= bad_name(p)?.0 || *sock_type != libc::SOCK_DGRAM;
                }
                // A path has its file's mode, unless the file is gone.
                bad |= (path && !unlinked) != mode.is_some() || (*unlinked && !path) || mode.is_some_and(|m| m > 0o7777);
                bad |= match backlog {
                    Some(b) => !matches!(*sock_type, libc::SOCK_STREAM | libc::SOCK_SEQPACKET) || *b > 1 << 20 || addr.is_none(),
                    // Not listening: a datagram socket, or a stream one never bound
                    // nor connected.
                    None => *sock_type != libc::SOCK_DGRAM && addr.is_some(),
                };
                if bad {
                    return Err(format!("{what}: a Unix socket the image describes wrongly"));
                }
            }
            Object::UnixPair { ino, peer, sock_type, shutdown, data_len, .. } => {
                let types = [libc::SOCK_STREAM as u8, libc::SOCK_DGRAM as u8, libc::SOCK_SEQPACKET as u8];
                if ino == peer || !types.contains(sock_type) || *shutdown > 3 || *data_len > MAX_PIPE_SIZE {
                    return Err(format!("{what}: socket {ino} (peer {peer}, type {sock_type}) is not a pair this plugin makes"));
                }
            }
            Object::Epoll { watches } => {
                for w in watches {
                    if !(0..=MAX_FD).contains(&w.fd) || w.file.is_some_and(|f| !(0..=MAX_FD).contains(&f) || f == w.fd) {
                        return Err(format!("{what}: epoll watch of fd {} is out of range", w.fd));
                    }
                }
            }
            Object::Memfd { name, size, data_len, .. } => {
                if name.len() > MEMFD_NAME_MAX || name.contains('\0') {
                    return Err(format!("{what}: memfd name {name:?} is not one the kernel takes"));
                }
                if let Some(n) = data_len {
                    if n != size {
                        return Err(format!("{what}: {n} content bytes for a memfd of {size} bytes"));
                    }
                }
                if *size > i64::MAX as u64 {
                    return Err(format!("{what}: size {size} is out of range"));
                }
            }
        }
        Ok(())
    }
}

impl PipeRec {
    pub fn label(&self) -> String {
        match &self.fifo {
            Some(p) => format!("FIFO {p}"),
            None => format!("pipe:[{}]", self.ino),
        }
    }

    pub fn validate(&self, seen: &mut HashSet<i32>) -> Result<(), String> {
        let what = self.label();
        if self.ends.is_empty() {
            return Err(format!("{what} in the image has no fd"));
        }
        for end in &self.ends {
            check_slots(&what, &end.fds, seen)?;
            if end.flags & O_CLOEXEC != 0 {
                return Err(format!("{what}: flags {:#o} hold O_CLOEXEC, which belongs to each fd", end.flags));
            }
            if end.flags & libc::O_PATH as u32 != 0 {
                return Err(format!("{what}: an O_PATH end is not a pipe end"));
            }
        }
        if let Some(p) = &self.fifo {
            check_path(&what, p)?;
        }
        if self.size == 0 || self.size > MAX_PIPE_SIZE {
            return Err(format!("{what}: pipe size {} in the image is out of range", self.size));
        }
        if self.data_len > self.size {
            return Err(format!("{what}: {} bytes queued in a pipe of {} bytes", self.data_len, self.size));
        }
        Ok(())
    }
}

/// Checks one raw data record against what is still expected.
pub fn check_chunk(
    what: &str,
    kind: &str,
    got_kind: &str,
    raw: bool,
    len: usize,
    remaining: u64,
) -> Result<(), String> {
    if got_kind != kind || !raw {
        return Err(format!("{what}: expected a raw `{kind}` record, found `{got_kind}`"));
    }
    if len == 0 || len > CHUNK {
        return Err(format!("{what}: a `{kind}` record of {len} bytes (1..={CHUNK} allowed)"));
    }
    if len as u64 > remaining {
        return Err(format!("{what}: `{kind}` records hold more than the {remaining} bytes still expected"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(fd: i32) -> Slot {
        Slot { fd, cloexec: false }
    }

    fn path_desc(fds: &[i32]) -> Desc {
        Desc {
            fds: fds.iter().map(|&f| slot(f)).collect(),
            flags: 0o100002,
            pos: 10,
            object: Object::Path { path: "/tmp/x".into(), mode: 0o100644, rdev: 0, tty_ctime: None },
            locks: Vec::new(),
        }
    }

    #[test]
    fn json_round_trip() {
        let d = Desc {
            fds: vec![Slot { fd: 5, cloexec: true }],
            flags: 2,
            pos: 4096,
            object: Object::Deleted {
                path: "/tmp/a b (x)".into(),
                dev: 1,
                ino: 2,
                mode: 0o100600,
                uid: 0,
                gid: 0,
                size: 3,
                data_len: Some(3),
                mapped: None,
            },
            locks: Vec::new(),
        };
        let text = serde_json::to_string(&d).unwrap();
        assert!(text.contains("\"type\":\"deleted\""), "{text}");
        assert!(!text.contains("locks"), "no locks, no field: {text}");
        assert_eq!(serde_json::from_str::<Desc>(&text).unwrap(), d);
        let p = PipeRec {
            ino: 9,
            fifo: None,
            size: 65536,
            data_len: 0,
            ends: vec![PipeEnd { fds: vec![slot(3)], flags: 0 }],
        };
        assert_eq!(serde_json::from_str::<PipeRec>(&serde_json::to_string(&p).unwrap()).unwrap(), p);
        // Unknown fields are refused, not ignored.
        assert!(serde_json::from_str::<Slot>(r#"{"fd":1,"cloexec":false,"x":1}"#).is_err());
    }

    #[test]
    fn fd_numbers_are_checked() {
        let mut seen = HashSet::new();
        assert!(path_desc(&[0, 1, 2]).validate(&mut seen).is_ok());
        let e = path_desc(&[3, 1]).validate(&mut seen).unwrap_err();
        assert!(e.contains("fd 1 is named twice"), "{e}");
        let e = path_desc(&[-1]).validate(&mut HashSet::new()).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        let e = path_desc(&[MAX_FD + 1]).validate(&mut HashSet::new()).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        assert!(path_desc(&[MAX_FD]).validate(&mut HashSet::new()).is_ok());
        let e = path_desc(&[]).validate(&mut HashSet::new()).unwrap_err();
        assert!(e.contains("no fd number"), "{e}");
        let mut d = path_desc(&[4]);
        d.flags |= O_CLOEXEC;
        assert!(d.validate(&mut HashSet::new()).is_err());
        d = path_desc(&[4]);
        d.object = Object::Path { path: "relative".into(), mode: 0, rdev: 0, tty_ctime: None };
        assert!(d.validate(&mut HashSet::new()).unwrap_err().contains("not absolute"));
    }

    #[test]
    fn lengths_are_checked() {
        let mut d = path_desc(&[3]);
        d.object = Object::Deleted {
            path: "/tmp/d".into(),
            dev: 0,
            ino: 0,
            mode: 0,
            uid: 0,
            gid: 0,
            size: 10,
            data_len: Some(11),
            mapped: None,
        };
        assert!(d.validate(&mut HashSet::new()).unwrap_err().contains("11 content bytes"));
        d.object = Object::Memfd { name: "x".repeat(300), dev: 0, ino: 0, mode: 0, seals: 0, size: 0, data_len: None, mapped: None };
        assert!(d.validate(&mut HashSet::new()).is_err());
        let mut p = PipeRec {
            ino: 1,
            fifo: None,
            size: 4096,
            data_len: 5000,
            ends: vec![PipeEnd { fds: vec![slot(3)], flags: 0 }],
        };
        assert!(p.validate(&mut HashSet::new()).unwrap_err().contains("5000 bytes queued"));
        p.data_len = 10;
        p.size = 0;
        assert!(p.validate(&mut HashSet::new()).is_err());
        p.size = 4096;
        p.ends.clear();
        assert!(p.validate(&mut HashSet::new()).is_err());

        assert!(check_chunk("w", "fd-data", "fd-data", true, 10, 10).is_ok());
        assert!(check_chunk("w", "fd-data", "fd-data", true, 11, 10).unwrap_err().contains("more than"));
        assert!(check_chunk("w", "fd-data", "fd-data", true, 0, 10).is_err());
        assert!(check_chunk("w", "fd-data", "fd-data", true, CHUNK + 1, u64::MAX).is_err());
        assert!(check_chunk("w", "fd-data", "fd", true, 1, 10).unwrap_err().contains("found `fd`"));
        assert!(check_chunk("w", "fd-data", "fd-data", false, 1, 10).is_err());
    }

    #[test]
    fn unix_sockets_are_checked() {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let name = |n: &[u8]| {
            let mut a = (libc::AF_UNIX as u16).to_le_bytes().to_vec();
            a.extend_from_slice(n);
            hex(&a)
        };
        let sock = |sock_type, addr: Option<String>, mode, peer: Option<String>, backlog| {
            let mut d = path_desc(&[3]);
            d.object = Object::UnixSocket { sock_type, addr, mode, peer, backlog, unlinked: false };
            d.validate(&mut HashSet::new())
        };
        let (path, abstract_) = (name(b"/run/a.sock\0"), name(b"\0ferry"));
        assert!(sock(libc::SOCK_STREAM, Some(path.clone()), Some(0o666), None, Some(8)).is_ok());
        assert!(sock(libc::SOCK_SEQPACKET, Some(abstract_.clone()), None, None, Some(8)).is_ok());
        assert!(sock(libc::SOCK_DGRAM, None, None, Some(path.clone()), None).is_ok());
        assert!(sock(libc::SOCK_DGRAM, None, None, None, None).is_ok(), "an unnamed datagram socket");
        assert!(sock(libc::SOCK_SEQPACKET, None, None, None, None).is_ok(), "a stream socket never bound nor connected");
        assert!(sock(libc::SOCK_STREAM, Some(abstract_.clone()), None, None, None).is_err(), "bound, not listening");
        let unlinked = |addr: &String, mode| {
            let mut d = path_desc(&[3]);
            let (addr, backlog) = (Some(addr.clone()), Some(8));
            d.object = Object::UnixSocket { sock_type: libc::SOCK_STREAM, addr, mode, peer: None, backlog, unlinked: true };
            d.validate(&mut HashSet::new())
        };
        assert!(unlinked(&path, None).is_ok(), "a path whose file was removed");
        assert!(unlinked(&path, Some(0o600)).is_err(), "a mode for a file that is gone");
        assert!(unlinked(&abstract_, None).is_err(), "an abstract name has no file to remove");
        for (t, addr, mode, peer, backlog) in [
            (libc::SOCK_STREAM, Some(path.clone()), None, None, Some(8)),      // a path without its mode
            (libc::SOCK_STREAM, Some(abstract_.clone()), Some(0o600), None, Some(8)), // a mode for no file
            (libc::SOCK_STREAM, None, None, Some(path.clone()), None),        // a stream connected by name
            (libc::SOCK_DGRAM, Some(abstract_.clone()), None, None, Some(8)), // a listening datagram socket
            (libc::SOCK_STREAM, None, None, None, Some(8)),                  // listening unnamed
            (libc::SOCK_STREAM, Some(name(b"run/a.sock\0")), Some(0o600), None, Some(8)), // a relative path
            (libc::SOCK_STREAM, Some(name(b"/run/a\0b\0")), Some(0o600), None, Some(8)), // a NUL inside
            (libc::SOCK_STREAM, Some(hex(&[2, 0, b'/', 0])), Some(0o600), None, Some(8)), // not AF_UNIX
            (libc::SOCK_STREAM, Some(path.clone()), Some(0o170000), None, Some(8)), // not permission bits
        ] {
            assert!(sock(t, addr.clone(), mode, peer.clone(), backlog).is_err(), "{t} {addr:?} {mode:?} {peer:?} {backlog:?}");
        }
    }

    #[test]
    fn removed_things_are_checked() {
        let mut d = path_desc(&[3]);
        let dir = |mode| Object::DeletedDir { path: "/tmp/gone".into(), dev: 1, ino: 2, mode, uid: 0, gid: 0 };
        let node = |mode| Object::DeletedDevice { path: "/tmp/zero".into(), dev: 1, ino: 2, mode, rdev: 0x105, uid: 0, gid: 0 };
        for (object, ok) in [
            (dir(libc::S_IFDIR | 0o755), true),
            (dir(libc::S_IFREG | 0o644), false),
            (node(libc::S_IFCHR | 0o640), true),
            (node(libc::S_IFBLK | 0o600), true),
            (node(libc::S_IFDIR | 0o600), false),
        ] {
            d.object = object;
            assert_eq!(d.validate(&mut HashSet::new()).is_ok(), ok, "{:?}", d.object);
            assert_eq!(d.data_len(), 0);
        }
        d.object = Object::DeletedDir { path: "gone".into(), dev: 1, ino: 2, mode: libc::S_IFDIR, uid: 0, gid: 0 };
        assert!(d.validate(&mut HashSet::new()).unwrap_err().contains("not absolute"));
        // A watch moved to another fd names one, not its own number.
        let watch = |file| Object::Epoll { watches: vec![Watch { fd: 7, events: 1, data: 9, file }] };
        for (file, ok) in [(None, true), (Some(8), true), (Some(7), false), (Some(-1), false)] {
            d.object = watch(file);
            assert_eq!(d.validate(&mut HashSet::new()).is_ok(), ok, "{file:?}");
        }
        // Images of before: no `file`, no `unlinked`, no `cwd_deleted`.
        let w: Watch = serde_json::from_str(r#"{"fd":7,"events":1,"data":9}"#).unwrap();
        assert_eq!(w.file, None);
        assert!(!serde_json::to_string(&w).unwrap().contains("file"));
        let h: Header = serde_json::from_str(r#"{"format":1,"cwd":"/","root":"/","umask":18,"descriptions":0,"pipes":0}"#).unwrap();
        assert_eq!(h.cwd_deleted, None);
        let gone = |mode| Header { cwd_deleted: Some(GoneDir { dev: 1, ino: 2, mode, uid: 0, gid: 0 }), ..h.clone() };
        assert!(gone(libc::S_IFDIR | 0o700).validate().is_ok());
        assert!(gone(libc::S_IFREG | 0o700).validate().unwrap_err().contains("not a directory"));
    }

    #[test]
    fn header_is_checked() {
        let mut h =
            Header { format: FORMAT, cwd: "/".into(), root: "/".into(), umask: 0o22, descriptions: 3, pipes: 1, cwd_deleted: None };
        assert!(h.validate().is_ok());
        h.umask = 0o1000;
        assert!(h.validate().is_err());
        h.umask = 0o22;
        h.descriptions = u64::MAX;
        assert!(h.validate().is_err());
        h.descriptions = 1;
        h.format = 99;
        assert!(h.validate().unwrap_err().contains("format 99"));
        h.format = FORMAT;
        h.cwd = "x".into();
        assert!(h.validate().is_err());
    }
}
