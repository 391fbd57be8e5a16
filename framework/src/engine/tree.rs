//! A process tree written out and made again. Checkpoint: every process of the frozen
//! tree has its own instance of each plugin and its own streams (process k's plugin i
//! on stream k·n + i + 1), and the inventory, last, lists them all with their parents.
//! Restore: the root is made as a lone process is; each other process is forked, blank,
//! from its parent's blank (`Blank::fork_child`), so that it is that process's own
//! child once rebuilt; then every process is rebuilt from its streams, and all are
//! held stopped until every one is rebuilt.

use std::time::Instant;

use ferry_plugin_api::{EventKind, MediumBox};

use crate::{
    engine::context::{ExternalContext, SharedTable, StreamSink},
    engine::dump::process_entry,
    engine::event::{self, EventError, Stats, Tick},
    engine::manager::Manager,
    engine::pipeline::Pipeline,
    engine::rebuild::{rebuild_with, Blank, Held, Plan},
    engine::watchdog::Watchdog,
    image::{Inventory, PluginEntry, SharedFd, INVENTORY_STREAM},
    kernel::{tracer::Tracer, tree::Shared},
};

/// Writes every process of a frozen tree (parents first, each with its parent's pid)
/// and the inventory; `mapped` hears of each scratch area as it is mapped (for the
/// janitor). Answers the bytes written and the pages among them.
#[allow(clippy::too_many_arguments)]
pub fn write_tree(
    manager: &Manager,
    names: &[String],
    tree: &mut [(Tracer, i32)],
    shared_fds: &[Shared],
    medium: &mut Pipeline,
    medium_name: &str,
    watchdog: &Watchdog,
    mapped: &mut dyn FnMut(i32, u64),
    progress: &mut dyn FnMut(&Tick),
) -> Result<(u64, u64), EventError> {
    let medium_err = |e: String| EventError::Medium { medium: medium_name.to_string(), message: e };
    let mut inventory = Inventory::new(medium_name);
    let (mut bytes, mut page_bytes) = (0u64, 0u64);
    let mut next_stream = 1u32;
    let claims = TreeClaims::find(&tree.iter().map(|(t, _)| t.pid()).collect::<Vec<_>>(), shared_fds);
    for (tracer, parent) in tree.iter_mut() {
        let pid = tracer.pid();
        // Which process of the tree a plugin refused is part of the answer.
        let in_process = |e: EventError| match e {
            EventError::Target(t) => EventError::Target(t),
            other => EventError::Refused(format!("process {pid}: {other}")),
        };
        let mut subs = event::load_subsystems(manager, names, Some(pid)).map_err(in_process)?;
        let scratch = tracer.map_scratch(0).map_err(|e| in_process(e.into()))?;
        mapped(pid, scratch);
        let mut shared = SharedTable::default();
        claims.seed(pid, &mut shared);
        {
            let mut ctx = ExternalContext::new(&mut *tracer, &mut shared, "ferry", watchdog);
            event::setup_all(&mut subs, &mut ctx, EventKind::Checkpoint).map_err(in_process)?;
        }
        let mut streams = Vec::new();
        let result = (|| {
            for (i, loaded) in subs.iter_mut().enumerate() {
                let stream = next_stream + i as u32;
                let name = loaded.name.clone();
                let mut ctx = ExternalContext::new(&mut *tracer, &mut shared, &name, watchdog);
                watchdog.doing(format!("plugin {name} writes the records of process {pid}"));
                let mut sink = StreamSink::new(medium, stream, &name, watchdog);
                event::checkpoint_one(loaded, &mut ctx, &mut sink, progress)?;
                crate::fault::point("checkpoint-mid");
                bytes += sink.bytes;
                page_bytes += sink.page_bytes;
                inventory.plugins.push(PluginEntry {
                    name: name.clone(),
                    version: loaded.version.clone(),
                    stream,
                    records: sink.records,
                    bytes: sink.bytes,
                });
                streams.push(stream);
            }
            Ok::<_, EventError>(())
        })();
        let mut ctx = ExternalContext::new(&mut *tracer, &mut shared, "ferry", watchdog);
        event::cleanup_all(&mut subs, &mut ctx, result.is_ok());
        result.map_err(in_process)?;
        next_stream += subs.len() as u32;
        let mut entry = process_entry(tracer, scratch);
        (entry.parent, entry.streams) = (*parent, streams);
        (entry.pgid, entry.sid) = crate::kernel::tree::group_and_session(pid).unwrap_or((0, 0));
        entry.shared_fds = shared_fds
            .iter()
            .filter(|s| s.pid == pid)
            .map(|s| SharedFd { fd: s.fd, from: s.from, from_fd: s.from_fd, reopen: s.reopen })
            .collect();
        inventory.processes.push(entry);
    }
    let encoded = inventory.encode()?;
    medium.push(INVENTORY_STREAM, &encoded).map_err(|e| medium_err(e.to_string()))?;
    medium.flush().map_err(|e| medium_err(e.to_string()))?;
    Ok((bytes + encoded.len() as u64, page_bytes / 4096))
}

/// What the plugins of each process of a tree must find claimed by another process
/// when they write it, so that what the processes share is written once and carried
/// between them: a pipe an earlier process holds an end of (written, with its bytes,
/// by that one; here its ends are placeholders, given that one's pipe at restore), a
/// socket whose peer another process holds (one end of a pair between the two, which
/// the files plugins carry), a shared anonymous object or System V segment an earlier
/// process maps (its pages written by that one; the others' memory plugins map it at
/// restore). Every
/// writer of a tree seeds each process's table with these.
pub struct TreeClaims {
    /// The ends of a pipe an earlier process holds too: (process, pipe, that process).
    pipes: Vec<(i32, String, i32)>,
    sockets: Vec<(i32, Vec<u64>)>,
    shmem: Vec<(i32, Vec<u64>)>,
    sysv: Vec<(i32, Vec<u64>)>,
}

impl TreeClaims {
    /// Looks at the frozen processes `pids` (parents first) and the sharing
    /// `kernel::tree::check_shared` found among them.
    pub fn find(pids: &[i32], shared_fds: &[Shared]) -> TreeClaims {
        use crate::kernel::tree::{shared_anon_objects, socket_inodes, sysv_segments};
        TreeClaims {
            pipes: shared_fds.iter().filter_map(|s| Some((s.pid, s.pipe.clone()?, s.from))).collect(),
            sockets: pids.iter().map(|&p| (p, socket_inodes(p))).collect(),
            shmem: pids.iter().map(|&p| (p, shared_anon_objects(p))).collect(),
            sysv: pids.iter().map(|&p| (p, sysv_segments(p))).collect(),
        }
    }

    /// Claims for process `pid` what another process of the tree carries.
    pub fn seed(&self, pid: i32, table: &mut SharedTable) {
        for (_, id, from) in self.pipes.iter().filter(|p| p.0 == pid) {
            table.claimed_by("pipe", id, *from);
        }
        for (holder, inos) in self.sockets.iter().filter(|s| s.0 != pid) {
            for ino in inos {
                table.claimed_by("unix-socket", &ino.to_string(), *holder);
            }
        }
        for (kind, all) in [("shared-anon", &self.shmem), ("sysv-shm", &self.sysv)] {
            let Some(here) = all.iter().position(|s| s.0 == pid) else { continue };
            for (holder, objects) in &all[..here] {
                for o in objects.iter().filter(|o| all[here].1.contains(o)) {
                    if !table.is_claimed(kind, &o.to_string()) {
                        table.claimed_by(kind, &o.to_string(), *holder);
                    }
                }
            }
        }
    }
}

/// Rebuilds every process of a tree's image, each held stopped; the first is the root.
/// On failure every process made is removed.
pub fn restore_tree(
    manager: &Manager,
    medium: &mut MediumBox,
    inventory: &Inventory,
    watchdog: &Watchdog,
    started: Instant,
    progress: &mut dyn FnMut(&Tick),
) -> Result<Vec<Held>, EventError> {
    let procs = &inventory.processes;
    // Parents come before their children (the inventory says so): each blank is
    // forked from its parent's before any is rebuilt.
    let mut blanks: Vec<Option<Blank>> = vec![Some(Blank::make(procs[0].pid)?)];
    for p in &procs[1..] {
        let parent = procs.iter().position(|q| q.pid == p.parent).filter(|&i| i < blanks.len());
        let parent = parent.and_then(|i| blanks[i].as_mut()).ok_or_else(|| {
            EventError::Refused(format!("process {} of the image has parent {}, not made before it", p.pid, p.parent))
        })?;
        let mut child = parent.fork_child(p.pid)?;
        regroup(&mut child, p, procs, &blanks)?;
        blanks.push(Some(child));
    }
    let mut held: Vec<Held> = Vec::new();
    for (k, p) in procs.iter().enumerate() {
        let plan = Plan { process: p.clone(), plugins: p.plugins(inventory).into_iter().cloned().collect() };
        // Where each description it shares is now: the earlier process's pid here.
        let sources: Vec<(SharedFd, i32)> = p
            .shared_fds
            .iter()
            .filter_map(|f| Some((*f, held.get(procs.iter().position(|q| q.pid == f.from)?)?.pid())))
            .collect();
        if sources.len() != p.shared_fds.len() {
            return Err(abort_all(held, format!("process {}: a description it shares comes from no process made before it", p.pid)));
        }
        let mut take_shared = |plugin: &str, tracer: &mut Tracer| {
            if plugin != FILES_PLUGIN {
                return Ok(());
            }
            sources.iter().try_for_each(|&(f, from)| if f.reopen { reopen_end(tracer, f, from) } else { take_description(tracer, f, from) })
        };
        match rebuild_with(manager, medium, &plan, true, blanks[k].take(), watchdog, started, progress, &mut take_shared) {
            Ok(h) => held.push(h),
            Err(e) => {
                for h in held {
                    h.abort();
                }
                return Err(e);
            }
        }
    }
    Ok(held)
}

/// Puts the blank `child` made for `p` in the process group and session `p` had, where
/// these differ from its parent's (which it is in, forked from it): a session of its
/// own, a group of its own, or the group of a process made before it
/// (`kernel::tree::check_groups` refused any other).
fn regroup(child: &mut Blank, p: &crate::image::ProcessEntry, procs: &[crate::image::ProcessEntry], blanks: &[Option<Blank>]) -> Result<(), EventError> {
    let Some(parent) = procs.iter().find(|q| q.pid == p.parent) else { return Ok(()) };
    if p.pgid == 0 || (p.pgid, p.sid) == (parent.pgid, parent.sid) {
        return Ok(());
    }
    let (nr, args, what) = if p.sid == p.pid && p.sid != parent.sid {
        (libc::SYS_setsid, [0u64; 6], "setsid".to_string())
    } else if p.pgid == p.pid {
        (libc::SYS_setpgid, [0u64; 6], "setpgid(0, 0)".to_string())
    } else {
        let leader = procs.iter().position(|q| q.pid == p.pgid).and_then(|i| blanks.get(i)?.as_ref()).map(Blank::pid);
        let leader = leader.ok_or_else(|| EventError::Refused(format!("process {}'s group {} has no leader made before it", p.pid, p.pgid)))?;
        (libc::SYS_setpgid, [0, leader as u64, 0, 0, 0, 0], format!("setpgid(0, {leader})"))
    };
    let r = child.inject(nr, args)?;
    if r < 0 {
        return Err(EventError::Refused(format!(
            "putting process {} in its group and session: {what}: {}",
            p.pid,
            std::io::Error::from_raw_os_error(-r as i32)
        )));
    }
    Ok(())
}

/// The plugin that rebuilds the fd table: shared descriptions are taken once it did.
const FILES_PLUGIN: &str = "files";

fn abort_all(held: Vec<Held>, why: String) -> EventError {
    for h in held {
        h.abort();
    }
    EventError::Refused(why)
}

/// Makes fd `f.fd` of the process being rebuilt the very open file description of fd
/// `f.from_fd` of process `from` (rebuilt before, held stopped): `pidfd_open`,
/// `pidfd_getfd` and `dup3` injected in it, while it still has ferry's privileges (the
/// credentials come last). What the files plugin opened there for that fd is replaced;
/// the fd's close-on-exec flag (the fd's own, not the description's) is kept.
fn take_description(tracer: &mut Tracer, f: SharedFd, from: i32) -> Result<(), EventError> {
    let pid = tracer.pid();
    let fail = |what: &str, r: i64| {
        EventError::Refused(format!(
            "process {pid}: taking fd {} from process {from} (its fd {}), the description they share: {what}: {}",
            f.fd,
            f.from_fd,
            std::io::Error::from_raw_os_error(-r as i32)
        ))
    };
    let fd_flags = tracer.inject(pid, libc::SYS_fcntl, [f.fd as u64, libc::F_GETFD as u64, 0, 0, 0, 0])?;
    if fd_flags < 0 {
        return Err(fail("the files plugin left no such fd", fd_flags));
    }
    let pidfd = tracer.inject(pid, libc::SYS_pidfd_open, [from as u64, 0, 0, 0, 0, 0])?;
    if pidfd < 0 {
        return Err(fail("pidfd_open", pidfd));
    }
    let got = tracer.inject(pid, libc::SYS_pidfd_getfd, [pidfd as u64, f.from_fd as u64, 0, 0, 0, 0])?;
    let close = |tracer: &mut Tracer, fd: i64| tracer.inject(pid, libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0]);
    if got < 0 {
        close(tracer, pidfd)?;
        return Err(fail("pidfd_getfd", got));
    }
    let cloexec = if fd_flags & libc::FD_CLOEXEC as i64 != 0 { libc::O_CLOEXEC as u64 } else { 0 };
    let r = tracer.inject(pid, libc::SYS_dup3, [got as u64, f.fd as u64, cloexec, 0, 0, 0])?;
    close(tracer, got)?;
    close(tracer, pidfd)?;
    if r < 0 {
        return Err(fail("dup3", r));
    }
    Ok(())
}

/// Makes fd `f.fd` of the process being rebuilt a new end of the pipe or FIFO that fd
/// `f.from_fd` of process `from` (rebuilt before, held stopped, its pipe holding the
/// unread bytes) is an end of, with the flags the files plugin gave the placeholder
/// there: ferry opens `/proc/FROM/fd/N` (a pipe's magic link opens the pipe itself)
/// and the process takes it from ferry as [`take_description`] does.
fn reopen_end(tracer: &mut Tracer, f: SharedFd, from: i32) -> Result<(), EventError> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let pid = tracer.pid();
    let fail = |what: String| {
        EventError::Refused(format!(
            "process {pid}: opening fd {} on the pipe of process {from}'s fd {} (a pipe between them): {what}",
            f.fd, f.from_fd
        ))
    };
    let flags = tracer.inject(pid, libc::SYS_fcntl, [f.fd as u64, libc::F_GETFL as u64, 0, 0, 0, 0])?;
    if flags < 0 {
        return Err(fail(format!("the files plugin left no such fd: {}", std::io::Error::from_raw_os_error(-flags as i32))));
    }
    let flags = flags as i32;
    let path = format!("/proc/{from}/fd/{}", f.from_fd);
    let open = |read: bool, write: bool| {
        std::fs::OpenOptions::new()
            .read(read)
            .write(write)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&path)
            .map_err(|e| fail(format!("opening {path}: {e}")))
    };
    // A non-blocking open for writing fails with no reader: hold one meanwhile.
    let _reader = open(true, false)?;
    let mode = flags & libc::O_ACCMODE;
    let end = open(mode != libc::O_WRONLY, mode != libc::O_RDONLY)?;
    // SAFETY: fcntl on a file of ours, integer flags.
    if unsafe { libc::fcntl(end.as_raw_fd(), libc::F_SETFL, flags) } != 0 {
        return Err(fail(format!("F_SETFL {flags:#o}: {}", std::io::Error::last_os_error())));
    }
    let me = std::process::id() as i32;
    take_description(tracer, SharedFd { fd: f.fd, from: me, from_fd: end.as_raw_fd(), reopen: false }, me)
}

/// Lets every rebuilt process of a tree run, children first (a parent that runs finds
/// its children there). Answers the statistics of the whole.
pub fn release_tree(held: Vec<Held>, started: Instant) -> Result<Stats, EventError> {
    let mut all = Stats::default();
    let mut held = held;
    while let Some(h) = held.pop() {
        match h.release() {
            Ok(s) => {
                all.pids.extend(s.pids);
                all.bytes += s.bytes;
                all.pages += s.pages;
                all.frozen_ms = all.frozen_ms.max(s.frozen_ms);
            }
            Err(e) => {
                for h in held {
                    h.abort();
                }
                return Err(e);
            }
        }
    }
    all.total_ms = event::ms(started);
    Ok(all)
}
