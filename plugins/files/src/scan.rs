//! The pure parts of the checkpoint: parsing `/proc/PID/fdinfo/N` and `status`,
//! telling what an fd is from its `/proc/PID/fd/N` link and `stat`, and grouping fds
//! into open file descriptions.

use std::collections::HashMap;

use ferry_plugin_api::util::proc_field;

/// What `/proc/PID/fdinfo/N` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdInfo {
    pub pos: i64,
    /// Octal in the file; includes `O_CLOEXEC` for the fd's close-on-exec bit.
    pub flags: u32,
}

pub fn parse_fdinfo(text: &str) -> Result<FdInfo, String> {
    let mut pos = None;
    let mut flags = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match key {
            "pos" => pos = Some(value.parse::<i64>().map_err(|_| format!("fdinfo: bad pos {value:?}"))?),
            "flags" => flags = Some(u32::from_str_radix(value, 8).map_err(|_| format!("fdinfo: bad flags {value:?}"))?),
            _ => {}
        }
    }
    match (pos, flags) {
        (Some(pos), Some(flags)) => Ok(FdInfo { pos, flags }),
        _ => Err(format!("fdinfo without pos: and flags: lines: {text:?}")),
    }
}

/// The `Umask:` of `/proc/PID/status`.
/// An address where process `pid` maps the file `(dev, ino)` (`/proc/PID/map_files`,
/// read once into `cache` as (start, dev, ino)), if any.
pub fn mapped_at(pid: i32, key: (u64, u64), cache: &mut Option<Vec<(u64, u64, u64)>>) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let maps = cache.get_or_insert_with(|| {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/map_files")) else { return Vec::new() };
        dir.filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            let start = u64::from_str_radix(name.split_once('-')?.0, 16).ok()?;
            let st = std::fs::metadata(e.path()).ok()?;
            Some((start, st.dev(), st.ino()))
        })
        .collect()
    });
    maps.iter().find(|m| (m.1, m.2) == key).map(|m| m.0)
}

pub fn parse_umask(status: &str) -> Result<u32, String> {
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("Umask:") {
            let v = v.trim();
            let mask = u32::from_str_radix(v, 8).map_err(|_| format!("status: bad Umask {v:?}"))?;
            if mask > 0o777 {
                return Err(format!("status: Umask {v} out of range"));
            }
            return Ok(mask);
        }
    }
    Err("status has no Umask: line".into())
}

/// What the text of a `/proc/PID/fd/N` link says the fd is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link<'a> {
    /// A path; `deleted` when it ends in " (deleted)" (stripped from `path`).
    Path {
        path: &'a str,
        deleted: bool,
    },
    Pipe(u64),
    Socket(u64),
    /// `anon_inode:[eventfd]`, `anon_inode:inotify`, …: the name without brackets.
    Anon(&'a str),
    /// Anything else, like `net:[4026531840]` (a namespace) or text never seen before.
    Other(&'a str),
}

const DELETED: &str = " (deleted)";

pub fn classify_link(link: &str) -> Link<'_> {
    let bracketed = |prefix: &str| -> Option<u64> { link.strip_prefix(prefix)?.strip_suffix(']')?.parse().ok() };
    if let Some(ino) = bracketed("pipe:[") {
        return Link::Pipe(ino);
    }
    if let Some(ino) = bracketed("socket:[") {
        return Link::Socket(ino);
    }
    if let Some(name) = link.strip_prefix("anon_inode:") {
        let name = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
        return Link::Anon(name);
    }
    if link.starts_with('/') {
        return match link.strip_suffix(DELETED) {
            Some(path) => Link::Path { path, deleted: true },
            None => Link::Path { path: link, deleted: false },
        };
    }
    Link::Other(link)
}

/// The error for an fd this plugin cannot checkpoint.
pub fn unsupported(fd: i32, link: &str) -> String {
    let what = match classify_link(link) {
        Link::Socket(_) => "a socket".to_string(),
        Link::Anon(name) => match name {
            "eventfd" => "an eventfd".into(),
            "eventpoll" => "an epoll instance".into(),
            "signalfd" => "a signalfd".into(),
            "timerfd" => "a timerfd".into(),
            "inotify" => "an inotify instance".into(),
            "fanotify" => "a fanotify instance".into(),
            "pidfd" => "a pidfd".into(),
            "userfaultfd" => "a userfaultfd".into(),
            "io_uring" => "an io_uring instance".into(),
            // Not carried: fdinfo shows none of its attributes, and its counts, ring
            // buffer and the task or CPU it watches cannot be read back either.
            "perf_event" => "a perf event (a counter or hardware breakpoint, whose settings cannot be read back)".into(),
            "bpf-map" | "bpf-prog" | "bpf_link" => "a BPF object".into(),
            _ => format!("an anonymous inode ({name})"),
        },
        Link::Other(text) => match text.split_once(":[") {
            Some((kind, _)) if ["net", "mnt", "pid", "user", "uts", "ipc", "cgroup", "time"].contains(&kind) => {
                format!("a {kind} namespace")
            }
            Some(("pidfd", _)) => "a pidfd".into(),
            _ => "an unknown kind of file".into(),
        },
        Link::Path { .. } => "a kind of file this plugin does not handle".into(),
        Link::Pipe(_) => "a pipe this plugin does not handle".into(),
    };
    format!("fd {fd} is {what} ({link}): not supported by the files plugin")
}

/// What `stat` of an fd's object says, as far as the plugin needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatInfo {
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub rdev: u64,
    pub size: u64,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    /// `[st_ctime, st_ctime_nsec]`.
    pub ctime: [i64; 2],
}

impl StatInfo {
    pub fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
}

/// How the plugin handles one fd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Reopened by path.
    Path(String),
    /// A regular file deleted while open (path without " (deleted)").
    Deleted(String),
    /// A memfd, by its name.
    Memfd(String),
    /// A directory removed while open (path without " (deleted)").
    DeletedDir(String),
    /// A character or block device node unlinked while open.
    DeletedDevice(String),
    /// A pipe (`fifo` None) or a FIFO by its path. Pipes are keyed by inode; an
    /// unlinked FIFO is rebuilt as an anonymous pipe.
    Pipe { fifo: Option<String> },
    Eventfd,
    Timerfd,
    Signalfd,
    Epoll,
    /// A socket, by inode: the checkpoint asks the kernel what it is.
    Socket(u64),
    /// An inotify or fanotify instance, or a pidfd (see [`crate::notify`]).
    Notify,
}

/// Decides the kind of fd `fd` from its link text and stat. `named(path)` tells
/// whether `path` still names this very inode (a file literally called "x (deleted)").
pub fn kind_of(fd: i32, link: &str, st: &StatInfo, named: impl Fn(&str) -> bool) -> Result<Kind, String> {
    match classify_link(link) {
        Link::Pipe(_) => Ok(Kind::Pipe { fifo: None }),
        Link::Path { path, deleted } => {
            let ft = st.file_type();
            if ft == libc::S_IFIFO {
                return Ok(Kind::Pipe { fifo: (!deleted).then(|| path.to_string()) });
            }
            if !deleted || named(link) {
                return match ft {
                    libc::S_IFREG | libc::S_IFDIR | libc::S_IFCHR | libc::S_IFBLK | libc::S_IFLNK | libc::S_IFSOCK => {
                        Ok(Kind::Path(link.to_string()))
                    }
                    _ => Err(unsupported(fd, link)),
                };
            }
            if ft == libc::S_IFDIR {
                return Ok(Kind::DeletedDir(path.to_string()));
            }
            if (ft == libc::S_IFCHR || ft == libc::S_IFBLK) && crate::pty::slave_index(st.mode, st.rdev).is_none() {
                return Ok(Kind::DeletedDevice(path.to_string()));
            }
            if ft != libc::S_IFREG {
                return Err(format!(
                    "fd {fd} is a {} that was deleted ({link}): not supported by the files plugin",
                    type_name(ft)
                ));
            }
            match path.strip_prefix("/memfd:") {
                Some(name) if !name.contains('/') => Ok(Kind::Memfd(name.to_string())),
                _ => Ok(Kind::Deleted(path.to_string())),
            }
        }
        Link::Anon("eventfd") => Ok(Kind::Eventfd),
        Link::Anon("timerfd") => Ok(Kind::Timerfd),
        Link::Anon("signalfd") => Ok(Kind::Signalfd),
        Link::Anon("eventpoll") => Ok(Kind::Epoll),
        Link::Socket(ino) => Ok(Kind::Socket(ino)),
        Link::Anon("inotify" | "fanotify" | "pidfd") => Ok(Kind::Notify),
        _ => Err(unsupported(fd, link)),
    }
}

fn field<'a>(text: &'a str, key: &str, what: &str) -> Result<&'a str, String> {
    proc_field(text, key).ok_or_else(|| format!("{what}: fdinfo has no {key}: line"))
}

fn hex(v: &str, what: &str) -> Result<u64, String> {
    u64::from_str_radix(v.trim(), 16).map_err(|_| format!("{what}: fdinfo value {v:?} is not hexadecimal"))
}

/// An eventfd's counter and whether it counts as a semaphore (fdinfo of 6.x kernels).
pub fn parse_eventfd(text: &str) -> Result<(u64, bool), String> {
    let count = hex(field(text, "eventfd-count", "eventfd")?, "eventfd")?;
    let semaphore = proc_field(text, "eventfd-semaphore") == Some("1");
    Ok((count, semaphore))
}

/// `(sec, nsec)` as timerfd's fdinfo prints a time.
fn timespec(v: &str, what: &str) -> Result<[i64; 2], String> {
    let bad = || format!("{what}: fdinfo time {v:?}");
    let inner = v.strip_prefix('(').and_then(|v| v.strip_suffix(')')).ok_or_else(bad)?;
    let (s, n) = inner.split_once(',').ok_or_else(bad)?;
    Ok([s.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?])
}

/// A timerfd's clock, time left, interval and unread expirations.
pub fn parse_timerfd(text: &str) -> Result<(i32, [i64; 2], [i64; 2], u64), String> {
    let what = "timerfd";
    let clock = field(text, "clockid", what)?.parse().map_err(|_| format!("{what}: bad clockid"))?;
    let ticks = field(text, "ticks", what)?.parse().map_err(|_| format!("{what}: bad ticks"))?;
    Ok((clock, timespec(field(text, "it_value", what)?, what)?, timespec(field(text, "it_interval", what)?, what)?, ticks))
}

pub fn parse_signalfd(text: &str) -> Result<u64, String> {
    hex(field(text, "sigmask", "signalfd")?, "signalfd")
}

/// What an epoll instance watches: (fd, events, data, inode of the file) per line
/// `tfd: 5 events: 19 data: 5  pos:0 ino:2e sdev:e`.
pub fn parse_epoll(text: &str) -> Result<Vec<(i32, u32, u64, u64)>, String> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("tfd:")) {
        let bad = || format!("epoll: fdinfo line {line:?}");
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1)).copied();
        let prefixed = |key: &str| words.iter().find_map(|w| w.strip_prefix(key));
        let fd = after("tfd:").and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        let events = after("events:").and_then(|v| u32::from_str_radix(v, 16).ok()).ok_or_else(bad)?;
        let data = after("data:").and_then(|v| u64::from_str_radix(v, 16).ok()).ok_or_else(bad)?;
        let ino = prefixed("ino:").and_then(|v| u64::from_str_radix(v, 16).ok()).ok_or_else(bad)?;
        out.push((fd, events, data, ino));
    }
    Ok(out)
}

pub fn type_name(ft: u32) -> &'static str {
    match ft {
        libc::S_IFREG => "regular file",
        libc::S_IFDIR => "directory",
        libc::S_IFCHR => "character device",
        libc::S_IFBLK => "block device",
        libc::S_IFIFO => "FIFO",
        libc::S_IFLNK => "symbolic link",
        libc::S_IFSOCK => "socket",
        _ => "file of unknown type",
    }
}

/// Groups fds into open file descriptions. `entries` are (fd, key), where fds of one
/// description always have equal keys (same link text, same inode); `same(a, b)`
/// answers whether fds `a` and `b` share a description (kcmp). Groups come out in
/// the order of their lowest fd, each sorted.
pub fn group<K: std::hash::Hash + Eq>(
    entries: &[(i32, K)],
    mut same: impl FnMut(i32, i32) -> Result<bool, String>,
) -> Result<Vec<Vec<i32>>, String> {
    let mut sorted: Vec<&(i32, K)> = entries.iter().collect();
    sorted.sort_by_key(|e| e.0);
    let mut groups: Vec<Vec<i32>> = Vec::new();
    // Per key, the indices of the groups holding it.
    let mut by_key: HashMap<&K, Vec<usize>> = HashMap::new();
    for (fd, key) in sorted.iter().map(|e| (e.0, &e.1)) {
        let candidates = by_key.entry(key).or_default();
        let mut found = None;
        for &g in candidates.iter() {
            if same(groups[g][0], fd)? {
                found = Some(g);
                break;
            }
        }
        match found {
            Some(g) => groups[g].push(fd),
            None => {
                candidates.push(groups.len());
                groups.push(vec![fd]);
            }
        }
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fdinfo() {
        let t = "pos:\t10\nflags:\t02100002\nmnt_id:\t23\nino:\t1234\n";
        assert_eq!(parse_fdinfo(t).unwrap(), FdInfo { pos: 10, flags: 0o2100002 });
        let t = "pos:\t0\nflags:\t0100000\nmnt_id:\t15\nino:\t77\nsize:\t0\n";
        assert_eq!(parse_fdinfo(t).unwrap().flags, 0o100000);
        // eventfd-style extra lines with colons are ignored
        let t = "pos:\t-5\nflags:\t04002\nmnt_id:\t16\nino:\t1\neventfd-count: 0\n";
        assert_eq!(parse_fdinfo(t).unwrap(), FdInfo { pos: -5, flags: 0o4002 });
        assert!(parse_fdinfo("pos:\t1\n").is_err());
        assert!(parse_fdinfo("pos:\tx\nflags:\t0\n").is_err());
        assert!(parse_fdinfo("pos:\t1\nflags:\t9\n").is_err());
        assert!(parse_fdinfo("").is_err());
    }

    #[test]
    fn parses_umask() {
        assert_eq!(parse_umask("Name:\tx\nUmask:\t0027\nState:\tS\n").unwrap(), 0o27);
        assert!(parse_umask("Name:\tx\n").is_err());
        assert!(parse_umask("Umask:\t0999\n").is_err());
        assert!(parse_umask("Umask:\t07777\n").is_err());
    }

    #[test]
    fn classifies_links() {
        assert_eq!(classify_link("/tmp/a"), Link::Path { path: "/tmp/a", deleted: false });
        assert_eq!(classify_link("/tmp/a b (deleted)"), Link::Path { path: "/tmp/a b", deleted: true });
        assert_eq!(classify_link("pipe:[4242]"), Link::Pipe(4242));
        assert_eq!(classify_link("socket:[12345]"), Link::Socket(12345));
        assert_eq!(classify_link("anon_inode:[eventfd]"), Link::Anon("eventfd"));
        assert_eq!(classify_link("anon_inode:inotify"), Link::Anon("inotify"));
        assert_eq!(classify_link("net:[4026531840]"), Link::Other("net:[4026531840]"));
        assert_eq!(classify_link("pipe:[x]"), Link::Other("pipe:[x]"));
        assert_eq!(classify_link(""), Link::Other(""));
    }

    #[test]
    fn names_unsupported_kinds() {
        assert_eq!(
            unsupported(7, "socket:[12345]"),
            "fd 7 is a socket (socket:[12345]): not supported by the files plugin"
        );
        assert!(unsupported(8, "anon_inode:[eventfd]").starts_with("fd 8 is an eventfd (anon_inode:[eventfd])"));
        assert!(unsupported(8, "anon_inode:[pidfd]").contains("a pidfd"));
        assert!(unsupported(8, "anon_inode:[perf_event]").contains("a perf event"));
        assert!(unsupported(9, "anon_inode:[eventpoll]").contains("epoll"));
        assert!(unsupported(9, "anon_inode:inotify").contains("inotify"));
        assert!(unsupported(9, "anon_inode:[timerfd]").contains("timerfd"));
        assert!(unsupported(9, "anon_inode:[signalfd]").contains("signalfd"));
        assert!(unsupported(9, "anon_inode:[weird]").contains("anonymous inode (weird)"));
        assert!(unsupported(9, "net:[4026531840]").contains("a net namespace"));
        assert!(unsupported(9, "what").contains("unknown kind"));
    }

    fn st(ft: u32) -> StatInfo {
        StatInfo { mode: ft | 0o644, nlink: 1, ..StatInfo::default() }
    }

    #[test]
    fn decides_kinds() {
        let never = |_: &str| false;
        assert_eq!(kind_of(3, "/tmp/f", &st(libc::S_IFREG), never), Ok(Kind::Path("/tmp/f".into())));
        assert_eq!(kind_of(3, "/tmp", &st(libc::S_IFDIR), never), Ok(Kind::Path("/tmp".into())));
        assert_eq!(kind_of(50, "/dev/null", &st(libc::S_IFCHR), never), Ok(Kind::Path("/dev/null".into())));
        assert_eq!(kind_of(3, "/tmp/d (deleted)", &st(libc::S_IFREG), never), Ok(Kind::Deleted("/tmp/d".into())));
        // A file really named "x (deleted)".
        assert_eq!(
            kind_of(3, "/tmp/d (deleted)", &st(libc::S_IFREG), |p| p == "/tmp/d (deleted)"),
            Ok(Kind::Path("/tmp/d (deleted)".into()))
        );
        assert_eq!(kind_of(3, "/memfd:shm a (deleted)", &st(libc::S_IFREG), never), Ok(Kind::Memfd("shm a".into())));
        assert_eq!(kind_of(3, "pipe:[77]", &st(libc::S_IFIFO), never), Ok(Kind::Pipe { fifo: None }));
        assert_eq!(
            kind_of(3, "/tmp/fifo", &st(libc::S_IFIFO), never),
            Ok(Kind::Pipe { fifo: Some("/tmp/fifo".into()) })
        );
        assert_eq!(kind_of(3, "/tmp/fifo (deleted)", &st(libc::S_IFIFO), never), Ok(Kind::Pipe { fifo: None }));
        assert_eq!(kind_of(4, "/tmp/dir (deleted)", &st(libc::S_IFDIR), never), Ok(Kind::DeletedDir("/tmp/dir".into())));
        assert_eq!(kind_of(4, "/tmp/zero (deleted)", &st(libc::S_IFCHR), never), Ok(Kind::DeletedDevice("/tmp/zero".into())));
        assert_eq!(kind_of(4, "/tmp/sda (deleted)", &st(libc::S_IFBLK), never), Ok(Kind::DeletedDevice("/tmp/sda".into())));
        // A terminal's node is never made again.
        let pts = StatInfo { rdev: libc::makedev(136, 3), ..st(libc::S_IFCHR) };
        let e = kind_of(4, "/tmp/pts3 (deleted)", &pts, never).unwrap_err();
        assert!(e.contains("fd 4 is a character device that was deleted"), "{e}");
        let e = kind_of(4, "/tmp/sock (deleted)", &st(libc::S_IFSOCK), never).unwrap_err();
        assert!(e.contains("fd 4 is a socket that was deleted"), "{e}");
        assert_eq!(kind_of(7, "socket:[12345]", &st(libc::S_IFSOCK), never), Ok(Kind::Socket(12345)));
        assert_eq!(kind_of(5, "anon_inode:[eventfd]", &StatInfo::default(), never), Ok(Kind::Eventfd));
        assert_eq!(kind_of(5, "anon_inode:[eventpoll]", &StatInfo::default(), never), Ok(Kind::Epoll));
        assert_eq!(kind_of(5, "anon_inode:inotify", &StatInfo::default(), never), Ok(Kind::Notify));
        assert_eq!(kind_of(5, "anon_inode:[pidfd]", &StatInfo::default(), never), Ok(Kind::Notify));
        let e = kind_of(5, "anon_inode:[userfaultfd]", &StatInfo::default(), never).unwrap_err();
        assert!(e.contains("fd 5 is a userfaultfd"), "{e}");
        assert!(kind_of(5, "/weird", &StatInfo::default(), never).is_err());
    }

    #[test]
    fn parses_event_fd_state() {
        let ev = "pos:\t0\nflags:\t02004002\nmnt_id:\t15\nino:\t1057\neventfd-count:                5\neventfd-id: 3\neventfd-semaphore: 1\n";
        assert_eq!(parse_eventfd(ev), Ok((5, true)));
        assert_eq!(parse_eventfd("eventfd-count: ff\n"), Ok((255, false)));
        assert!(parse_eventfd("pos: 0\n").is_err());
        let tfd = "pos:\t0\nflags:\t02\nclockid: 1\nticks: 3\nsettime flags: 00\nit_value: (0, 6250000)\nit_interval: (0, 7000000)\n";
        assert_eq!(parse_timerfd(tfd), Ok((1, [0, 6250000], [0, 7000000], 3)));
        assert!(parse_timerfd("clockid: 1\nticks: 0\nit_value: 0\nit_interval: (0, 0)\n").is_err());
        assert_eq!(parse_signalfd("sigmask:\t0000000000000200\n"), Ok(0x200));
        let ep = "pos:\t0\nflags:\t02\ntfd:        5 events:       19 data:                5  pos:0 ino:2e sdev:e\ntfd:        7 events: 80000001 data: abcdef0123456789  pos:0 ino:41a sdev:f\n";
        assert_eq!(parse_epoll(ep), Ok(vec![(5, 0x19, 5, 0x2e), (7, 0x8000_0001, 0xabcd_ef01_2345_6789, 0x41a)]));
        assert!(parse_epoll("tfd: x events: 1 data: 1 ino:1\n").is_err());
        assert_eq!(parse_epoll("pos: 0\n"), Ok(vec![]));
    }

    #[test]
    fn groups_descriptions() {
        // fds 3 and 5 share a description (dup), 4 is the same file opened again,
        // 6 another file; the comparator must only see fds of equal keys.
        let entries = vec![(5, "data"), (3, "data"), (4, "data"), (6, "other"), (0, "null")];
        let desc_of = |fd: i32| match fd {
            3 | 5 => 1,
            4 => 2,
            6 => 3,
            _ => 4,
        };
        let mut calls = Vec::new();
        let groups = group(&entries, |a, b| {
            calls.push((a, b));
            Ok(desc_of(a) == desc_of(b))
        })
        .unwrap();
        assert_eq!(groups, vec![vec![0], vec![3, 5], vec![4], vec![6]]);
        assert!(calls.iter().all(|&(a, b)| a != 6 && b != 6 && a != 0 && b != 0), "{calls:?}");
        // An error of the comparator stops the grouping.
        assert!(group(&[(1, 1), (2, 1)], |_, _| Err("kcmp: boom".into())).is_err());
        assert_eq!(group::<u8>(&[], |_, _| Ok(true)).unwrap(), Vec::<Vec<i32>>::new());
    }
}
