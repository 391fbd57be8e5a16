//! A process and its descendants: found from `/proc/PID/task/*/children`, frozen
//! together, and checked for what they share: open file descriptions (carried: found
//! here), pipes and FIFOs between them (carried: the ends found here), shared
//! anonymous memory, SysV segments and socket pairs (carried by the plugins), and what
//! ferry does not carry between processes yet (a memfd mapped by two, a deleted file or memfd mapped and written through,
//! an address space, fd table or signal handlers, a
//! process group or session other than the parent's, a pseudo-terminal master shared
//! between two of them, or a slave held by a process that comes before the one holding
//! its master).

use std::os::unix::fs::MetadataExt;

use libc::pid_t;

use super::{
    error::TraceError,
    freezer::Freezer,
    target::{children, stat_fields},
    tracer::Tracer,
};

/// Every process of the tree of `root` under the tracer, parents before their
/// children, each with its parent's pid (0 for the root). Each process is seized and
/// stopped before its children are looked for, so none of the tree forks or leaves
/// unseen: a child forked before its parent stopped is found once the parent is; one
/// that exited is a zombie its stopped parent cannot reap, and refused. On failure
/// every process seized so far is let go as it was.
pub fn freeze_tree(root: pid_t) -> Result<Vec<(Tracer, pid_t)>, TraceError> {
    take_tree(root, Tracer::seize)
}

/// [`freeze_tree`] with the cgroup freezer first: the whole tree moved into one cgroup
/// of ferry's and frozen at once (`Freezer::freeze_tree`), then every process seized
/// in its frozen state, then the cgroup thawed (the processes stay in their ptrace
/// stops). The freezer holds them in its cgroup until dropped.
pub fn freeze_tree_in_cgroup(root: pid_t) -> Result<(Vec<(Tracer, pid_t)>, Freezer), TraceError> {
    let freezer_err = |e: super::freezer::FreezeError| TraceError::Thread { tid: root, message: e.to_string() };
    let mut freezer = Freezer::freeze_tree(root, children).map_err(freezer_err)?;
    if !freezer.stops_while_frozen() {
        return Err(TraceError::Unsuitable { pid: root, why: "a tree with the v1 cgroup freezer, which ferry does not carry yet (use --quiesce ptrace)".into() });
    }
    let frozen = take_tree(root, |p| Tracer::seize_with(p, || Ok(())))?;
    if let Err(e) = freezer.thaw() {
        let_go(frozen);
        return Err(freezer_err(e));
    }
    Ok((frozen, freezer))
}

fn take_tree(root: pid_t, seize: impl Fn(pid_t) -> Result<Tracer, TraceError>) -> Result<Vec<(Tracer, pid_t)>, TraceError> {
    let mut frozen: Vec<(Tracer, pid_t)> = vec![(seize(root)?, 0)];
    crate::fault::pause("tree-root-frozen");
    let mut next = 0;
    while next < frozen.len() {
        let parent = frozen[next].0.pid();
        next += 1;
        for child in children(parent) {
            let state = stat_fields(child).and_then(|f| f.first().cloned()).unwrap_or_default();
            // A zombie stays one: its stopped parent cannot reap it (see `zombies`).
            if state == "Z" || state == "X" {
                continue;
            }
            let taken = seize(child);
            match taken {
                Ok(t) => frozen.push((t, parent)),
                Err(e) => {
                    let_go(frozen);
                    return Err(e);
                }
            }
        }
    }
    Ok(frozen)
}

/// The signal the parent of `pid` gets at its death (field 38 of its stat), when not
/// SIGCHLD.
pub fn exit_signal(pid: pid_t) -> Option<i32> {
    let sig = stat_fields(pid).and_then(|f| f.get(35)?.parse::<i32>().ok()).unwrap_or(libc::SIGCHLD);
    (sig != libc::SIGCHLD).then_some(sig)
}

/// Signals whose default action ends a process without a core dump: a zombie killed by
/// one is made again by sending it.
const TERMINATING: [i32; 13] = [
    libc::SIGHUP, libc::SIGINT, libc::SIGKILL, libc::SIGUSR1, libc::SIGUSR2, libc::SIGPIPE, libc::SIGALRM,
    libc::SIGTERM, libc::SIGSTKFLT, libc::SIGVTALRM, libc::SIGPROF, libc::SIGIO, libc::SIGPWR,
];

/// A child that exited and was not reaped yet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dead {
    pub pid: pid_t,
    /// As `waitpid` reports it.
    pub status: i32,
    /// The signal its parent got at its death, when not SIGCHLD.
    pub exit_signal: Option<i32>,
}

/// The zombie children of `pid` (frozen: none can appear or be reaped meanwhile), each
/// with its status as `waitpid` reports it (field 52 of its stat) and its exit signal.
/// Refused, naming both: one whose status a restore cannot make again (a core dump, or
/// a signal that would dump one).
pub fn zombies(pid: pid_t) -> Result<Vec<Dead>, TraceError> {
    let mut found = Vec::new();
    for child in children(pid) {
        let Some(f) = stat_fields(child) else { continue };
        if f.first().map(String::as_str) != Some("Z") {
            continue;
        }
        let status: i32 = f.get(49).and_then(|s| s.parse().ok()).unwrap_or(0);
        let sig = status & 0x7f;
        if status & 0x80 != 0 || (sig != 0 && !TERMINATING.contains(&sig) && !(libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&sig)) {
            return Err(TraceError::HasChild {
                pid,
                child,
                what: "a zombie".into(),
                why: format!("killed by signal {sig}{}, a death ferry does not make again yet", if status & 0x80 != 0 { " with a core dump" } else { "" }),
            });
        }
        found.push(Dead { pid: child, status, exit_signal: exit_signal(child) });
    }
    Ok(found)
}

const PR_SET_CHILD_SUBREAPER: u64 = 36;
const PR_GET_CHILD_SUBREAPER: u64 = 37;

/// Whether the process under `tracer` adopts its descendants' orphans, asked in it
/// (`PR_GET_CHILD_SUBREAPER`; its scratch area mapped).
pub fn is_subreaper(tracer: &mut Tracer) -> Result<bool, TraceError> {
    let pid = tracer.pid();
    let (at, _) = tracer.scratch_args().ok_or(TraceError::Thread { tid: pid, message: "no scratch area".into() })?;
    tracer.poke(at, &0i32.to_le_bytes())?;
    let r = tracer.inject(pid, libc::SYS_prctl, [PR_GET_CHILD_SUBREAPER, at, 0, 0, 0, 0])?;
    if r < 0 {
        return Err(TraceError::Thread { tid: pid, message: format!("prctl(PR_GET_CHILD_SUBREAPER): errno {}", -r) });
    }
    let mut v = [0u8; 4];
    tracer.peek(at, &mut v)?;
    Ok(i32::from_le_bytes(v) != 0)
}

/// Makes the process under `tracer` a child subreaper again.
pub fn set_subreaper(tracer: &mut Tracer) -> Result<(), TraceError> {
    let pid = tracer.pid();
    let r = tracer.inject(pid, libc::SYS_prctl, [PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0, 0])?;
    if r < 0 {
        return Err(TraceError::Thread { tid: pid, message: format!("prctl(PR_SET_CHILD_SUBREAPER): errno {}", -r) });
    }
    Ok(())
}

/// Lets every process of a frozen tree go, as it was.
pub fn let_go(frozen: Vec<(Tracer, pid_t)>) {
    for (t, _) in frozen.into_iter().rev() {
        let _ = t.detach();
    }
}

/// `kcmp(a, b, kind, x, y)`: 0 when the two share the object.
fn kcmp(a: pid_t, b: pid_t, kind: i64, x: i64, y: i64) -> i64 {
    // SAFETY: kcmp takes integers only.
    unsafe { libc::syscall(libc::SYS_kcmp, a, b, kind, x, y) }
}

const KCMP_FILE: i64 = 0;
const KCMP_VM: i64 = 1;
const KCMP_FILES: i64 = 2;
const KCMP_SIGHAND: i64 = 4;

/// The fds of `pid` with the device and inode of what each is open on.
fn fds(pid: pid_t) -> Vec<(i64, u64, u64, u32)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| {
            let fd: i64 = e.file_name().to_str()?.parse().ok()?;
            let m = std::fs::metadata(e.path()).ok()?;
            Some((fd, m.dev(), m.ino(), m.mode() & libc::S_IFMT))
        })
        .collect()
}

/// The pseudo-terminal indexes whose master `pid` holds (fdinfo `tty-index:`), and
/// its fds on slaves (`/dev/pts/N`, devices 136-143) with their index.
fn pty_ends(pid: pid_t) -> (Vec<u32>, Vec<(i64, u32)>) {
    let (mut masters, mut slaves) = (Vec::new(), Vec::new());
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return (masters, slaves) };
    for e in dir.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|f| f.parse::<i64>().ok()) else { continue };
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        if let Some(i) = info.lines().find_map(|l| l.strip_prefix("tty-index:")).and_then(|i| i.trim().parse().ok()) {
            masters.push(i);
        } else if let Ok(m) = std::fs::metadata(e.path()) {
            let major = libc::major(m.rdev());
            if m.mode() & libc::S_IFMT == libc::S_IFCHR && (136..144).contains(&major) {
                slaves.push((fd, (major - 136) * 256 + libc::minor(m.rdev())));
            }
        }
    }
    (masters, slaves)
}

/// The shared anonymous objects (`MAP_SHARED | MAP_ANONYMOUS`, by inode) `pid` maps:
/// the first process of a tree that maps one carries it for all.
pub fn shared_anon_objects(pid: pid_t) -> Vec<u64> {
    let mut objects: Vec<u64> = mapped_shared(pid, "/dev/zero");
    objects.sort_unstable();
    objects.dedup();
    objects
}

/// The System V shared memory segments (ids) `pid` has attached: the first process
/// of a tree that attaches one carries it for all.
pub fn sysv_segments(pid: pid_t) -> Vec<u64> {
    let mut objects: Vec<u64> = mapped_shared(pid, "/SYSV");
    objects.sort_unstable();
    objects.dedup();
    objects
}

/// The inodes of the shared mappings of `pid` whose path starts with `prefix`, one
/// per mapping.
fn mapped_shared(pid: pid_t, prefix: &str) -> Vec<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1)?.ends_with('s') && f.get(5)?.starts_with(prefix)).then(|| f.get(4)?.parse().ok())?
        })
        .collect()
}

/// The inodes of the sockets `pid` holds: a plugin of another process of the tree
/// that finds the peer of its socket among them carries the pair between the two.
pub fn socket_inodes(pid: pid_t) -> Vec<u64> {
    fds(pid).into_iter().filter(|f| f.3 == libc::S_IFSOCK).map(|f| f.2).collect()
}

/// The shared anonymous mappings of `pid` (`/dev/zero (deleted)`, memfds, SysV
/// segments): (inode, start, carried between processes: not a memfd).
fn shared_anon(pid: pid_t) -> Vec<(u64, u64, bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (range, perms, inode, path) = (f.first()?, f.get(1)?, f.get(4)?, f.get(5).copied().unwrap_or(""));
            let anon = path == "/dev/zero" || path.starts_with("/memfd:") || path.starts_with("/SYSV");
            let carried = path == "/dev/zero" || path.starts_with("/SYSV");
            (perms.ends_with('s') && anon).then(|| Some((inode.parse().ok()?, u64::from_str_radix(range.split('-').next()?, 16).ok()?, carried)))?
        })
        .collect()
}

/// A deleted file or memfd a process maps or holds open.
struct Gone {
    dev: u64,
    ino: u64,
    /// Mapped at all.
    mapped: bool,
    /// Written through: mapped shared, or open.
    written: bool,
    /// What /proc names it.
    name: String,
}

/// The deleted files and memfds `pid` maps or holds open.
fn deleted_objects(pid: pid_t) -> Vec<Gone> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut found: Vec<Gone> = Vec::new();
    for l in text.lines().filter(|l| l.ends_with(" (deleted)") && !l.contains(" /dev/zero (deleted)") && !l.contains(" /SYSV")) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (Some(range), Some(perms)) = (f.first(), f.get(1)) else { continue };
        let Ok(m) = std::fs::metadata(format!("/proc/{pid}/map_files/{range}")) else { continue };
        let name = f.get(5..).map(|p| p.join(" ")).unwrap_or_default();
        found.push(Gone { dev: m.dev(), ino: m.ino(), mapped: true, written: perms.ends_with('s'), name });
    }
    for (fd, dev, ino, _) in fds(pid) {
        let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).map(|l| l.to_string_lossy().into_owned()).unwrap_or_default();
        match found.iter_mut().find(|o| (o.dev, o.ino) == (dev, ino)) {
            Some(o) => o.written = true,
            None if link.ends_with(" (deleted)") || link.starts_with("/memfd:") => {
                found.push(Gone { dev, ino, mapped: false, written: true, name: link })
            }
            None => {}
        }
    }
    found
}

/// An fd of a process of the tree that an earlier process holds too: the same open
/// file description (inherited over fork), or (`pipe`) another end of the same pipe or
/// FIFO (`a | b`: one writes, the other reads), which that process restores with its
/// unread bytes and this one opens again.
#[derive(Debug, Clone, PartialEq)]
pub struct Shared {
    pub pid: pid_t,
    pub fd: i32,
    /// The earlier process and its fd.
    pub from: pid_t,
    pub from_fd: i32,
    /// A pipe or FIFO's identity (`dev:ino`, as the files plugin claims it): `from`
    /// restores it with its bytes, so this process's files plugin must not write them.
    pub pipe: Option<String>,
    /// Not the same description: another end of the pipe `from_fd` is an end of.
    pub reopen: bool,
}

/// Finds the open file descriptions shared between processes of the tree (`pids`,
/// parents first), each answered once per holder after the first, with the first, and
/// the ends of a pipe or FIFO an earlier process holds another end of, answered with
/// the first such end; and refuses what ferry carries only within one process, with
/// one line naming both processes and the resource: a shared socket or locked
/// description, a memfd or SysV segment mapped by both, an address space, fd table or
/// signal handlers; and System V IPC the tree used (`check_sysv`).
pub fn check_shared(pids: &[pid_t]) -> Result<Vec<Shared>, TraceError> {
    let refuse = |pid: pid_t, why: String| Err(TraceError::Unsuitable { pid, why });
    check_sysv(pids)?;
    let fds: Vec<Vec<(i64, u64, u64, u32)>> = pids.iter().map(|&p| fds(p)).collect();
    let anon: Vec<Vec<(u64, u64, bool)>> = pids.iter().map(|&p| shared_anon(p)).collect();
    let gone: Vec<Vec<Gone>> = if pids.len() > 1 { pids.iter().map(|&p| deleted_objects(p)).collect() } else { Vec::new() };
    let mut shared = Vec::new();
    // A pseudo-terminal's slave is reopened by its path once its master is made, by
    // the same process or one made before it.
    let ptys: Vec<(Vec<u32>, Vec<(i64, u32)>)> = if pids.len() > 1 { pids.iter().map(|&p| pty_ends(p)).collect() } else { Vec::new() };
    for (j, (_, slaves)) in ptys.iter().enumerate() {
        for &(fd, n) in slaves {
            let later = (j + 1..pids.len()).find(|&k| ptys[k].0.contains(&n));
            if let (Some(k), false) = (later, ptys[..=j].iter().any(|p| p.0.contains(&n))) {
                return refuse(pids[j], format!("holding fd {fd} on /dev/pts/{n}, a pseudo-terminal whose master process {} holds, which comes after it in the tree: a slave held before its master is not carried yet", pids[k]));
            }
        }
    }
    for (j, &b) in pids.iter().enumerate() {
        for (i, &a) in pids[..j].iter().enumerate() {
            for (kind, what) in [(KCMP_VM, "its address space (vfork or CLONE_VM)"), (KCMP_FILES, "its fd table (CLONE_FILES)"), (KCMP_SIGHAND, "its signal handlers (CLONE_SIGHAND)")] {
                if kcmp(a, b, kind, 0, 0) == 0 {
                    return refuse(b, format!("sharing {what} with process {a}, which ferry does not carry between processes yet"));
                }
            }
            // Shared anonymous memory (inherited over fork) is carried by the first
            // process that maps it; a memfd or SysV segment mapped by both is not.
            if let Some(&(_, at, _)) = anon[j].iter().find(|m| !m.2 && anon[i].iter().any(|n| n.0 == m.0)) {
                return refuse(b, format!("sharing the shared memory at {at:#x} (a memfd) with process {a}; such memory shared between processes is not carried yet"));
            }
            // Each process's memory plugin makes its deleted files and memfds again: a
            // private mapping in both may have its own copy, anything written through
            // (a shared mapping, an fd) may not.
            let clash = |m: &Gone, n: &Gone| (n.dev, n.ino) == (m.dev, m.ino) && (n.mapped || m.mapped) && (n.written || m.written);
            if let Some(o) = gone[j].iter().find(|m| gone[i].iter().any(|n| clash(m, n))) {
                return refuse(b, format!("sharing {} (mapped by one of them) with process {a}; deleted files and memfds mapped and written through between processes are not carried yet", o.name));
            }
        }
        for &(fd, dev, ino, kind) in &fds[j] {
            // The first process (parents first) that holds the same description; else
            // a pipe's other end elsewhere in the tree.
            let mut other_end = None;
            let mut first = None;
            'earlier: for (i, &a) in pids[..j].iter().enumerate() {
                for f in fds[i].iter().filter(|f| (f.1, f.2) == (dev, ino)) {
                    if kcmp(a, b, KCMP_FILE, f.0, fd) == 0 {
                        first = Some((a, f.0));
                        break 'earlier;
                    }
                    other_end.get_or_insert((a, f.0));
                }
            }
            match (first, other_end) {
                (Some((a, afd)), _) => {
                    // A lock belongs to the description (flock, OFD): each process's
                    // files plugin would take it again, the second against the first.
                    // A socket: each process's files plugin would bind it again (the
                    // second against the first, or replacing its socket file).
                    if kind == libc::S_IFSOCK {
                        return refuse(b, format!("sharing fd {fd}'s socket with process {a} (its fd {afd}); sockets shared between processes are not carried yet"));
                    }
                    let info = std::fs::read_to_string(format!("/proc/{b}/fdinfo/{fd}")).unwrap_or_default();
                    // Each process's files plugin would make the pair again.
                    if info.lines().any(|l| l.starts_with("tty-index:")) {
                        return refuse(b, format!("sharing fd {fd}, a pseudo-terminal master, with process {a} (its fd {afd}); a master shared between processes is not carried yet"));
                    }
                    if info.lines().any(|l| l.starts_with("lock:")) {
                        return refuse(b, format!("sharing fd {fd}'s open file description, which holds a lock, with process {a} (its fd {afd}); locks on a description shared between processes are not carried yet"));
                    }
                    let pipe = (kind == libc::S_IFIFO).then(|| format!("{dev}:{ino}"));
                    shared.push(Shared { pid: b, fd: fd as i32, from: a, from_fd: afd as i32, pipe, reopen: false });
                }
                (None, Some((a, afd))) if kind == libc::S_IFIFO => {
                    let pipe = Some(format!("{dev}:{ino}"));
                    shared.push(Shared { pid: b, fd: fd as i32, from: a, from_fd: afd as i32, pipe, reopen: true });
                }
                _ => {}
            }
        }
    }
    Ok(shared)
}

/// Refuses a tree that used System V IPC ferry does not carry, as far as the kernel
/// tells (`/proc/sysvipc`): a shared memory segment one of them created or last
/// attached or detached but none has attached now (an attached one is carried by the
/// memory plugins, unless processes outside the tree attached it too), a message
/// queue one of them last sent to or received from, a semaphore one of them last
/// operated on (`semctl GETPID`; one only waited on, or operated on by another since,
/// is not seen).
fn check_sysv(pids: &[pid_t]) -> Result<(), TraceError> {
    // Segments attached by the tree are carried, unless attached outside it too.
    let attached: Vec<u64> = pids.iter().flat_map(|&p| mapped_shared(p, "/SYSV")).collect();
    // (file, kind, the columns of the pids, what each pid column says)
    type Columns = [(usize, &'static str); 2];
    let tables: [(&str, &str, Columns); 2] = [
        ("shm", "shared memory segment", [(4, "created"), (5, "last attached or detached")]),
        ("msg", "message queue", [(5, "last sent to"), (6, "last received from")]),
    ];
    for (file, kind, columns) in tables {
        let text = std::fs::read_to_string(format!("/proc/sysvipc/{file}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if file == "shm" {
                let id = f.get(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(u64::MAX);
                let here = attached.iter().filter(|&&a| a == id).count();
                let all = f.get(6).and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
                if here > 0 && all > here {
                    let pid = pids.iter().copied().find(|&p| mapped_shared(p, "/SYSV").contains(&id)).unwrap_or(pids[0]);
                    return Err(TraceError::Unsuitable {
                        pid,
                        why: format!("attached to the System V shared memory segment {id}, which {} processes outside the tree have attached too; a segment shared with other processes is not carried", all - here),
                    });
                }
                if here > 0 {
                    continue;
                }
            }
            for (col, did) in columns {
                let Some(pid) = f.get(col).and_then(|p| p.parse::<pid_t>().ok()).filter(|p| pids.contains(p)) else { continue };
                let (key, id) = (f.first().copied().unwrap_or("?"), f.get(1).copied().unwrap_or("?"));
                return Err(TraceError::Unsuitable {
                    pid,
                    why: format!("a user of the System V {kind} {id} (key {key}), which it {did}; System V IPC is not carried yet"),
                });
            }
        }
    }
    // A semaphore names the last process that operated on it (`GETPID`).
    let text = std::fs::read_to_string("/proc/sysvipc/sem").unwrap_or_default();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<i32>().ok());
        let (Some(key), Some(id), Some(nsems)) = (num(0), num(1), num(3)) else { continue };
        for n in 0..nsems {
            // SAFETY: semctl GETPID takes integers only.
            let pid = unsafe { libc::semctl(id, n, libc::GETPID) };
            if pids.contains(&pid) {
                return Err(TraceError::Unsuitable {
                    pid,
                    why: format!("a user of the System V semaphore set {id} (key {key}), whose semaphore {n} it last operated on; System V IPC is not carried yet"),
                });
            }
        }
    }
    Ok(())
}

/// The process group and session of `pid` (fields 5 and 6 of its stat).
pub fn group_and_session(pid: pid_t) -> Option<(pid_t, pid_t)> {
    let f = stat_fields(pid)?;
    Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

/// Refuses a tree (parents first, each with its parent) whose process groups and
/// sessions a restore cannot make again from its own processes. A restored child is
/// forked from its parent, in its group and session; it may then start a session of
/// its own (`setsid`), a group of its own, or join the group of a process of the tree
/// made before it (`setpgid`), in that session — a shell's jobs under job control, a
/// pipeline's members. A group or session led by a process outside the tree, or one
/// whose leader comes later, is refused.
pub fn check_groups(tree: &[(pid_t, pid_t)]) -> Result<(), TraceError> {
    let ids: Vec<Option<(pid_t, pid_t)>> = tree.iter().map(|&(p, _)| group_and_session(p)).collect();
    for (k, &(pid, parent)) in tree.iter().enumerate().filter(|(_, t)| t.1 != 0) {
        let theirs = tree.iter().position(|t| t.0 == parent).and_then(|i| ids[i]);
        let (Some((pgid, sid)), Some((parent_pgid, parent_sid))) = (ids[k], theirs) else { continue };
        let earlier_leader = tree[..k].iter().zip(&ids).any(|(t, i)| t.0 == pgid && *i == Some((pgid, sid)));
        let session_ok = sid == parent_sid || sid == pid;
        let group_ok = pgid == parent_pgid || pgid == pid || earlier_leader;
        if !(session_ok && group_ok) {
            return Err(TraceError::Unsuitable {
                pid,
                why: format!(
                    "in process group {pgid} of session {sid}, and its parent, process {parent}, in group {parent_pgid} of session {parent_sid}: a group or session led from outside the tree is not carried yet"
                ),
            });
        }
    }
    Ok(())
}
