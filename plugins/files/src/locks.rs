//! File locks: the POSIX (`fcntl` F_SETLK, `lockf`), OFD (`F_OFD_SETLK`) and `flock`
//! locks a process holds. The checkpoint reads them from the `lock:` lines of
//! `/proc/PID/fdinfo/N` (checked against `/proc/locks`) and records them with the
//! description that holds them; the restore takes each again, non-blocking, once every
//! fd is in place. A lock that cannot be carried exactly is refused at checkpoint; one
//! that cannot be taken again fails the restore.
//!
//! Who owns what: an flock or OFD lock belongs to an open file description (every fd
//! of it shows the lock; it is taken once, through the first). A POSIX lock belongs to
//! the process (its fd table), per inode and byte range; fdinfo shows it on the
//! description it was taken through, and it is taken again through that one. Closing
//! any fd of the inode drops the process's POSIX locks on it, so they are taken last.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The most locks one description may carry in an image.
pub const MAX_LOCKS: usize = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LockKind {
    /// `fcntl(F_SETLK)` / `lockf`: owned by the process.
    Posix,
    /// `fcntl(F_OFD_SETLK)`: owned by the open file description.
    Ofd,
    /// `flock`: owned by the open file description, the whole file.
    Flock,
}

/// One lock as the image records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    pub kind: LockKind,
    /// A write (exclusive, `LOCK_EX`) lock, else a read (shared, `LOCK_SH`) one.
    pub write: bool,
    /// First byte (POSIX and OFD; 0 for flock).
    pub start: i64,
    /// Bytes covered; 0 is "to the end of the file, however far it grows".
    pub len: i64,
}

impl fmt::Display for Lock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let range = |f: &mut fmt::Formatter<'_>| {
            if self.len == 0 {
                write!(f, " on bytes {} to the end", self.start)
            } else {
                write!(f, " on bytes {}-{}", self.start, self.start + self.len - 1)
            }
        };
        match self.kind {
            LockKind::Flock => write!(f, "flock {} lock", if self.write { "LOCK_EX" } else { "LOCK_SH" }),
            LockKind::Posix | LockKind::Ofd => {
                let kind = if self.kind == LockKind::Posix { "POSIX" } else { "OFD" };
                write!(f, "{kind} {} lock", if self.write { "write" } else { "read" })?;
                range(f)
            }
        }
    }
}

impl Lock {
    /// Checks a lock read back from an image.
    pub fn validate(&self, what: &str) -> Result<(), String> {
        let bad = match self.kind {
            LockKind::Flock => self.start != 0 || self.len != 0,
            LockKind::Posix | LockKind::Ofd => self.start < 0 || self.len < 0 || self.start.checked_add(self.len).is_none(),
        };
        if bad {
            return Err(format!("{what}: a lock the image describes wrongly ({:?} from {} for {})", self.kind, self.start, self.len));
        }
        Ok(())
    }

    /// `struct flock` for `fcntl(F_SETLK / F_OFD_SETLK)` on x86_64: l_type, l_whence
    /// (shorts), 4 bytes of padding, l_start, l_len, l_pid (0, as OFD locks require).
    pub fn flock_struct(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        let ty = if self.write { libc::F_WRLCK } else { libc::F_RDLCK } as i16;
        b[0..2].copy_from_slice(&ty.to_le_bytes());
        b[2..4].copy_from_slice(&(libc::SEEK_SET as i16).to_le_bytes());
        b[8..16].copy_from_slice(&self.start.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// The injected call that takes this lock, without waiting: (syscall, args but fd,
    /// whether the third argument is the address of [`Lock::flock_struct`]).
    pub fn call(&self) -> (i64, u64, bool) {
        match self.kind {
            LockKind::Flock => {
                let op = if self.write { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB;
                (libc::SYS_flock, op as u64, false)
            }
            LockKind::Posix => (libc::SYS_fcntl, libc::F_SETLK as u64, true),
            LockKind::Ofd => (libc::SYS_fcntl, libc::F_OFD_SETLK as u64, true),
        }
    }
}

/// One `lock:` line of fdinfo, or one line of `/proc/locks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockLine {
    /// A request waiting for a lock (`->` in /proc/locks), not a lock held.
    pub blocked: bool,
    /// `POSIX`, `OFDLCK`, `FLOCK`, `LEASE`, `DELEG`, `ACCESS`, …
    pub class: String,
    /// `ADVISORY` for locks; a lease's state; `MANDATORY` on old kernels.
    pub mode: String,
    /// `READ`, `WRITE` (or `UNLCK` for a lease being broken).
    pub access: String,
    pub pid: i64,
    /// `MAJ:MIN:INODE` as printed.
    pub inode: String,
    pub start: i64,
    /// Last byte, inclusive; None for EOF.
    pub end: Option<i64>,
}

/// Parses one line in the format of `/proc/locks` (`1: POSIX  ADVISORY  WRITE 1234
/// 08:01:5678 0 EOF`, a blocked request `1: -> FLOCK ...`), without a `lock:` prefix.
pub fn parse_line(line: &str) -> Result<LockLine, String> {
    let bad = || format!("a lock line the files plugin does not understand: {line:?}");
    let mut words: Vec<&str> = line.split_whitespace().collect();
    if words.first().is_none_or(|w| !w.ends_with(':')) {
        return Err(bad());
    }
    words.remove(0);
    let blocked = words.first() == Some(&"->");
    if blocked {
        words.remove(0);
    }
    let [class, mode, access, pid, inode, start, end] = words[..] else { return Err(bad()) };
    Ok(LockLine {
        blocked,
        class: class.to_string(),
        mode: mode.to_string(),
        access: access.to_string(),
        pid: pid.parse().map_err(|_| bad())?,
        inode: inode.to_string(),
        start: start.parse().map_err(|_| bad())?,
        end: if end == "EOF" { None } else { Some(end.parse().map_err(|_| bad())?) },
    })
}

/// The `lock:` lines of an fdinfo text.
pub fn fdinfo_locks(fdinfo: &str) -> Result<Vec<LockLine>, String> {
    fdinfo.lines().filter_map(|l| l.strip_prefix("lock:")).map(parse_line).collect()
}

/// What the process `pid` holds through one description, as the image records it;
/// `what` names the fd and its file. A lock that cannot be carried exactly is an error.
pub fn carried(pid: i32, what: &str, lines: &[LockLine]) -> Result<Vec<Lock>, String> {
    let mut out = Vec::new();
    for l in lines {
        let refuse = |why: &str| format!("process {pid}: {what} {why}: not supported by the files plugin");
        let kind = match l.class.as_str() {
            "POSIX" => LockKind::Posix,
            "OFDLCK" => LockKind::Ofd,
            "FLOCK" => LockKind::Flock,
            "LEASE" | "DELEG" => return Err(refuse(&format!("holds a {} lease ({})", l.access.to_lowercase(), l.mode.to_lowercase()))),
            other => return Err(refuse(&format!("holds a lock of kind {other}"))),
        };
        if l.blocked {
            return Err(refuse("waits for a lock"));
        }
        if l.mode != "ADVISORY" {
            return Err(refuse(&format!("holds a {} {} lock", l.mode.to_lowercase(), l.class)));
        }
        let write = match l.access.as_str() {
            "WRITE" => true,
            "READ" => false,
            other => return Err(refuse(&format!("holds a {} lock of access {other}", l.class))),
        };
        if kind == LockKind::Posix && l.pid != pid as i64 {
            // The lock's owner is an fd table this process shares with process l.pid.
            return Err(refuse(&format!("holds a POSIX lock taken by process {} (they share an fd table)", l.pid)));
        }
        let (start, len) = match kind {
            LockKind::Flock => (0, 0),
            _ => {
                let len = match l.end {
                    None => 0,
                    Some(end) if end >= l.start && l.start >= 0 => end - l.start + 1,
                    Some(_) => return Err(refuse(&format!("holds a lock on bytes {}-{:?}", l.start, l.end))),
                };
                (l.start, len)
            }
        };
        let lock = Lock { kind, write, start, len };
        if !out.contains(&lock) {
            out.push(lock);
        }
    }
    Ok(out)
}

/// Checks `/proc/locks` for what fdinfo cannot show: a POSIX lock of process `pid` that
/// no fd of it showed (`seen`: the `lock:` lines of its fds; one owned by an fd table it
/// left, say), or a request of it waiting for a lock. Either is refused. (A frozen
/// process has no waiting request: the freeze interrupts a blocked F_SETLKW or flock,
/// which leaves the kernel's lists, and the restored thread makes the call again.)
pub fn check_proc_locks(pid: i32, proc_locks: &str, seen: &[LockLine]) -> Result<(), String> {
    for line in proc_locks.lines() {
        let l = match parse_line(line) {
            Ok(l) => l,
            // Another process's line of a kind never seen is not ours to judge.
            Err(_) if !line.split_whitespace().any(|w| w == pid.to_string()) => continue,
            Err(e) => return Err(format!("process {pid}: /proc/locks: {e}")),
        };
        if l.pid != pid as i64 {
            continue;
        }
        let refuse = |why: String| format!("process {pid} {why}: not supported by the files plugin");
        if l.blocked {
            return Err(refuse(format!("waits for a {} lock on inode {}", l.class, l.inode)));
        }
        // flock and OFD locks belong to descriptions, and fdinfo shows them on theirs.
        if l.class == "POSIX" && !seen.contains(&l) {
            return Err(refuse(format!(
                "holds a POSIX {} lock on inode {} (bytes {} to {}) that none of its fds shows",
                l.access.to_lowercase(),
                l.inode,
                l.start,
                l.end.map_or("the end".to_string(), |e| e.to_string())
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lock_lines() {
        let l = parse_line("1: POSIX  ADVISORY  WRITE 1234 08:01:5678 0 9").unwrap();
        assert_eq!((l.class.as_str(), l.access.as_str(), l.pid, l.inode.as_str(), l.start, l.end), ("POSIX", "WRITE", 1234, "08:01:5678", 0, Some(9)));
        assert!(!l.blocked);
        let l = parse_line("2: -> FLOCK  ADVISORY  WRITE 99 00:2a:17 0 EOF").unwrap();
        assert!(l.blocked);
        assert_eq!(l.end, None);
        assert_eq!(parse_line("3: OFDLCK ADVISORY  READ -1 00:2a:17 100 EOF").unwrap().pid, -1);
        assert!(parse_line("1: POSIX ADVISORY WRITE").is_err());
        assert!(parse_line("POSIX ADVISORY WRITE 1 0:0:1 0 EOF").is_err());
        assert!(parse_line("1: POSIX ADVISORY WRITE x 0:0:1 0 EOF").is_err());
        let fdinfo = "pos:\t0\nflags:\t02\nmnt_id:\t30\nino:\t17\nlock:\t1: FLOCK  ADVISORY  WRITE 12 00:2a:17 0 EOF\nlock:\t2: POSIX  ADVISORY  READ 12 00:2a:17 100 EOF\n";
        assert_eq!(fdinfo_locks(fdinfo).unwrap().len(), 2);
        assert_eq!(fdinfo_locks("pos:\t0\n").unwrap(), vec![]);
    }

    #[test]
    fn carries_every_kind_and_refuses_the_rest() {
        let lines = fdinfo_locks(
            "lock:\t1: FLOCK  ADVISORY  READ 77 00:2a:17 0 EOF\n\
             lock:\t2: POSIX  ADVISORY  WRITE 12 00:2a:17 0 9\n\
             lock:\t3: POSIX  ADVISORY  READ 12 00:2a:17 100 EOF\n\
             lock:\t4: OFDLCK ADVISORY  WRITE -1 00:2a:17 4096 8191\n",
        )
        .unwrap();
        // flock's pid is whoever took it (a parent, before a fork): not checked.
        let got = carried(12, "fd 3 (/tmp/f)", &lines).unwrap();
        assert_eq!(
            got,
            vec![
                Lock { kind: LockKind::Flock, write: false, start: 0, len: 0 },
                Lock { kind: LockKind::Posix, write: true, start: 0, len: 10 },
                Lock { kind: LockKind::Posix, write: false, start: 100, len: 0 },
                Lock { kind: LockKind::Ofd, write: true, start: 4096, len: 4096 },
            ]
        );
        assert_eq!(got[0].to_string(), "flock LOCK_SH lock");
        assert_eq!(got[1].to_string(), "POSIX write lock on bytes 0-9");
        assert_eq!(got[2].to_string(), "POSIX read lock on bytes 100 to the end");
        let refused = |line: &str| carried(12, "fd 3 (/tmp/f)", &fdinfo_locks(line).unwrap()).unwrap_err();
        let e = refused("lock:\t1: LEASE  ACTIVE    READ 12 00:2a:17 0 EOF\n");
        assert!(e.starts_with("process 12: fd 3 (/tmp/f) holds a read lease"), "{e}");
        assert!(refused("lock:\t1: DELEG  ACTIVE    READ 12 00:2a:17 0 EOF\n").contains("lease"));
        assert!(refused("lock:\t1: POSIX  MANDATORY WRITE 12 00:2a:17 0 EOF\n").contains("mandatory"));
        assert!(refused("lock:\t1: ACCESS ADVISORY  WRITE 12 00:2a:17 0 EOF\n").contains("kind ACCESS"));
        assert!(refused("lock:\t1: POSIX  ADVISORY  WRITE 13 00:2a:17 0 EOF\n").contains("taken by process 13"));
        assert!(refused("lock:\t1: -> POSIX  ADVISORY  WRITE 12 00:2a:17 0 EOF\n").contains("waits"));
    }

    #[test]
    fn proc_locks_shows_what_fdinfo_cannot() {
        let seen = fdinfo_locks("lock:\t1: POSIX  ADVISORY  WRITE 12 00:2a:17 0 9\n").unwrap();
        let ok = "1: POSIX  ADVISORY  WRITE 12 00:2a:17 0 9\n2: FLOCK  ADVISORY  WRITE 12 00:2a:18 0 EOF\n3: POSIX  ADVISORY  WRITE 40 00:2a:19 0 EOF\n3: -> POSIX  ADVISORY  WRITE 41 00:2a:19 0 EOF\n";
        assert!(check_proc_locks(12, ok, &seen).is_ok());
        let e = check_proc_locks(12, "1: POSIX  ADVISORY  WRITE 12 00:2a:17 0 EOF\n", &seen).unwrap_err();
        assert!(e.contains("process 12 holds a POSIX write lock on inode 00:2a:17 (bytes 0 to the end) that none of its fds shows"), "{e}");
        let e = check_proc_locks(12, "1: POSIX  ADVISORY  WRITE 40 00:2a:19 0 EOF\n1: -> FLOCK  ADVISORY  WRITE 12 00:2a:19 0 EOF\n", &seen).unwrap_err();
        assert!(e.contains("process 12 waits for a FLOCK lock on inode 00:2a:19"), "{e}");
        // A line never seen before: another process's is skipped, one naming ours refused.
        assert!(check_proc_locks(12, "1: NEWKIND WHAT 40 00:2a:19\n", &seen).is_ok());
        assert!(check_proc_locks(12, "1: NEWKIND WHAT 12 00:2a:19\n", &seen).unwrap_err().contains("does not understand"));
    }

    #[test]
    fn image_locks_are_checked_and_encoded() {
        assert!(Lock { kind: LockKind::Flock, write: true, start: 0, len: 0 }.validate("w").is_ok());
        assert!(Lock { kind: LockKind::Flock, write: true, start: 1, len: 0 }.validate("w").is_err());
        assert!(Lock { kind: LockKind::Posix, write: true, start: -1, len: 0 }.validate("w").is_err());
        assert!(Lock { kind: LockKind::Ofd, write: true, start: i64::MAX, len: 1 }.validate("w").is_err());
        let l = Lock { kind: LockKind::Ofd, write: true, start: 4096, len: 10 };
        let b = l.flock_struct();
        assert_eq!(i16::from_le_bytes([b[0], b[1]]), libc::F_WRLCK as i16);
        assert_eq!(i64::from_le_bytes(b[8..16].try_into().unwrap()), 4096);
        assert_eq!(i64::from_le_bytes(b[16..24].try_into().unwrap()), 10);
        assert_eq!(&b[24..], &[0; 8]);
        assert_eq!(l.call(), (libc::SYS_fcntl, libc::F_OFD_SETLK as u64, true));
        let f = Lock { kind: LockKind::Flock, write: false, start: 0, len: 0 };
        assert_eq!(f.call(), (libc::SYS_flock, (libc::LOCK_SH | libc::LOCK_NB) as u64, false));
        let json = serde_json::to_string(&l).unwrap();
        assert_eq!(json, r#"{"kind":"ofd","write":true,"start":4096,"len":10}"#);
        // struct flock's layout as libc has it.
        assert_eq!(std::mem::size_of::<libc::flock>(), 32);
        assert_eq!(std::mem::offset_of!(libc::flock, l_start), 8);
        assert_eq!(std::mem::offset_of!(libc::flock, l_len), 16);
    }
}
