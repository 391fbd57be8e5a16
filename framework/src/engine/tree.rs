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
    engine::dump::{process_entry, Live},
    engine::event::{self, EventError, Stats, Tick},
    engine::manager::Manager,
    engine::pipeline::Pipeline,
    engine::rebuild::{rebuild_with, Blank, Held, Plan},
    engine::watchdog::Watchdog,
    image::{Inventory, PluginEntry, SharedFd, Zombie, INVENTORY_STREAM},
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
    mut lives: Option<&mut [Live]>,
    lazy: bool,
    progress: &mut dyn FnMut(&Tick),
) -> Result<(u64, u64), EventError> {
    let medium_err = |e: String| EventError::Medium { medium: medium_name.to_string(), message: e };
    let mut inventory = Inventory::new(medium_name);
    let (mut bytes, mut page_bytes) = (0u64, 0u64);
    let mut next_stream = 1u32;
    let claims = TreeClaims::find(&tree.iter().map(|(t, _)| t.pid()).collect::<Vec<_>>(), shared_fds);
    for (k, (tracer, parent)) in tree.iter_mut().enumerate() {
        // After pre-copy rounds: what they sent counts, and only what was written since
        // is sent now.
        let mut live = lives.as_deref_mut().and_then(|l| l.get_mut(k));
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
                let (dirty, sent) = match live.as_deref_mut() {
                    Some(l) => (Some(&mut l.tracker), l.sent.get(i).copied()),
                    None => (None, None),
                };
                let mut ctx = ExternalContext::new(&mut *tracer, &mut shared, &name, watchdog);
                ctx.dirty = dirty;
                ctx.lazy = lazy;
                watchdog.doing(format!("plugin {name} writes the records of process {pid}"));
                let mut sink = StreamSink::new(medium, stream, &name, watchdog);
                if let Some(sent) = sent {
                    (sink.records, sink.bytes, sink.page_bytes) = (sent.records, sent.bytes, sent.page_bytes);
                }
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
        tree_fields(&mut entry, *parent, streams, shared_fds)?;
        entry.subreaper = crate::kernel::tree::is_subreaper(tracer).map_err(|e| in_process(e.into()))?;
        inventory.processes.push(entry);
    }
    let encoded = inventory.encode()?;
    medium.push(INVENTORY_STREAM, &encoded).map_err(|e| medium_err(e.to_string()))?;
    medium.flush().map_err(|e| medium_err(e.to_string()))?;
    Ok((bytes + encoded.len() as u64, page_bytes / 4096))
}

/// The inventory's account of the descriptions process `pid` shares with an earlier one.
pub fn shared_fds_of(pid: i32, shared: &[Shared]) -> Vec<SharedFd> {
    shared
        .iter()
        .filter(|s| s.pid == pid)
        .map(|s| SharedFd { fd: s.fd, from: s.from, from_fd: s.from_fd, reopen: s.reopen })
        .collect()
}

/// What an entry of a tree's process holds beyond a lone process's: its parent, its
/// streams, group and session, shared fds, exit signal and zombie children.
fn tree_fields(entry: &mut crate::image::ProcessEntry, parent: i32, streams: Vec<u32>, shared_fds: &[Shared]) -> Result<(), EventError> {
    let pid = entry.pid;
    (entry.parent, entry.streams) = (parent, streams);
    (entry.pgid, entry.sid) = crate::kernel::tree::group_and_session(pid).unwrap_or((0, 0));
    entry.shared_fds = shared_fds_of(pid, shared_fds);
    entry.exit_signal = if parent != 0 { crate::kernel::tree::exit_signal(pid) } else { None };
    entry.zombies = crate::kernel::tree::zombies(pid)?
        .into_iter()
        .map(|d| Zombie { pid: d.pid, status: d.status, exit_signal: d.exit_signal })
        .collect();
    Ok(())
}

/// What a migration announces of a frozen tree ahead of its streams (the inventory
/// comes last): every process with its parent, streams, group, session and shared
/// fds, as [`write_tree`] will write them, and the plugins with no counts yet. Maps
/// the scratch area of each process (`mapped` hears of each), which the entries name.
pub fn announce(
    manager: &Manager,
    names: &[String],
    tree: &mut [(Tracer, i32)],
    shared_fds: &[Shared],
    medium_name: &str,
    mapped: &mut dyn FnMut(i32, u64),
) -> Result<Inventory, EventError> {
    let mut inventory = Inventory::new(medium_name);
    let mut next_stream = 1u32;
    for (tracer, parent) in tree.iter_mut() {
        let pid = tracer.pid();
        // The same plugins, in the same order, as write_tree loads for the process.
        let subs = event::load_subsystems(manager, names, Some(pid)).map_err(|e| match e {
            EventError::Target(t) => EventError::Target(t),
            other => EventError::Refused(format!("process {pid}: {other}")),
        })?;
        let at = tracer.scratch_address();
        if at != 0 {
            mapped(pid, at);
        }
        let scratch = tracer.map_scratch(at)?;
        mapped(pid, scratch);
        let mut streams = Vec::new();
        for (i, loaded) in subs.iter().enumerate() {
            let stream = next_stream + i as u32;
            inventory.plugins.push(PluginEntry { name: loaded.name.clone(), version: loaded.version.clone(), stream, records: 0, bytes: 0 });
            streams.push(stream);
        }
        next_stream += subs.len() as u32;
        let mut entry = process_entry(tracer, scratch);
        tree_fields(&mut entry, *parent, streams, shared_fds)?;
        entry.subreaper = crate::kernel::tree::is_subreaper(tracer)?;
        inventory.processes.push(entry);
    }
    Ok(inventory)
}

/// Whether the inventory a migration's tree ends with is the tree it announced, and
/// every stream carried what the inventory says (`counts`: per process, the records
/// and bytes read from each of its streams). The reason when not.
pub fn check_announced(announced: &Inventory, last: &Inventory, counts: &[Vec<(u64, u64)>]) -> Result<(), String> {
    type Proc = (i32, i32, u64, Vec<u32>, Vec<Zombie>, bool);
    let procs = |inv: &Inventory| -> Vec<Proc> { inv.processes.iter().map(|p| (p.pid, p.parent, p.scratch, p.streams.clone(), p.zombies.clone(), p.subreaper)).collect() };
    let plugins = |inv: &Inventory| -> Vec<(String, String, u32)> { inv.plugins.iter().map(|e| (e.name.clone(), e.version.clone(), e.stream)).collect() };
    if procs(announced) != procs(last) || plugins(announced) != plugins(last) {
        return Err("the inventory does not match the tree announced".into());
    }
    for (p, counts) in last.processes.iter().zip(counts) {
        for (entry, &(records, bytes)) in p.plugins(last).into_iter().zip(counts) {
            if (entry.records, entry.bytes) != (records, bytes) {
                return Err(format!(
                    "process {}: stream {} carried {records} records, {bytes} bytes; the inventory says {}, {}",
                    p.pid, entry.stream, entry.records, entry.bytes
                ));
            }
        }
    }
    Ok(())
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
#[allow(clippy::too_many_arguments)]
pub fn restore_tree(
    manager: &Manager,
    medium: &mut MediumBox,
    inventory: &Inventory,
    root: Option<Blank>,
    counts_known: bool,
    watchdog: &Watchdog,
    started: Instant,
    progress: &mut dyn FnMut(&Tick),
) -> Result<Vec<Held>, EventError> {
    let procs = &inventory.processes;
    // Parents come before their children (the inventory says so): each blank is
    // forked from its parent's before any is rebuilt.
    let root = match root {
        Some(b) if b.want == procs[0].pid => b,
        _ => Blank::make(procs[0].pid)?,
    };
    let mut blanks: Vec<Option<Blank>> = vec![Some(root)];
    for p in &procs[1..] {
        let parent = procs.iter().position(|q| q.pid == p.parent).filter(|&i| i < blanks.len());
        let parent = parent.and_then(|i| blanks[i].as_mut()).ok_or_else(|| {
            EventError::Refused(format!("process {} of the image has parent {}, not made before it", p.pid, p.parent))
        })?;
        let mut child = parent.fork_child(p.pid, p.exit_signal.unwrap_or(libc::SIGCHLD))?;
        regroup(&mut child, p, procs, &blanks)?;
        blanks.push(Some(child));
    }
    // Each zombie made again from its parent, which then has it to reap.
    for (p, blank) in procs.iter().zip(blanks.iter_mut()) {
        for z in &p.zombies {
            let parent = blank.as_mut().expect("every blank is made and none taken yet");
            make_zombie(parent, z).map_err(|e| EventError::Refused(format!("process {}: making its zombie child {} again: {e}", p.pid, z.pid)))?;
        }
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
        match rebuild_with(manager, medium, &plan, counts_known, blanks[k].take(), watchdog, started, progress, &mut take_shared) {
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

/// Where in the scratch area's code page [`make_zombie`] writes its child's last code
/// (after the injection site's and the fork's pause loop).
const ZOMBIE_STUB: u64 = 0xa00;

/// Makes a child of the blank `parent` that ends as `z` did and is left unreaped: forked
/// with its pid and exit signal, given code that exits with its code (or sends itself
/// its signal, reset to the default action and unblocked first), and let go. The
/// signal its death sends the blank parent is taken back there: the parent's own
/// pending signals come with its image.
fn make_zombie(parent: &mut Blank, z: &Zombie) -> Result<(), EventError> {
    let exit_signal = z.exit_signal.unwrap_or(libc::SIGCHLD);
    let child = parent.fork_child(z.pid, exit_signal)?;
    let mut t = child.take();
    let pid = t.pid();
    let fail = |what: &str, r: i64| EventError::Failed(format!("{what} in the child: errno {}", -r));
    let (code, _) = t.scratch().ok_or_else(|| EventError::Failed("no scratch area".into()))?;
    let (args, _) = t.scratch_args().ok_or_else(|| EventError::Failed("no scratch area".into()))?;
    let sig = z.status & 0x7f;
    let mut stub: Vec<u8> = Vec::new();
    if sig == 0 {
        // mov edi, code; mov eax, SYS_exit_group; syscall
        stub.push(0xbf);
        stub.extend_from_slice(&((z.status >> 8) & 0xff).to_le_bytes());
        stub.extend_from_slice(&[0xb8, 0xe7, 0x00, 0x00, 0x00, 0x0f, 0x05]);
    } else {
        // The default action, unblocked: a struct sigaction of zeros, an empty mask.
        t.poke(args, &[0u8; 40])?;
        let r = t.inject(pid, libc::SYS_rt_sigaction, [sig as u64, args, 0, 8, 0, 0])?;
        if r < 0 {
            return Err(fail("rt_sigaction", r));
        }
        let r = t.inject(pid, libc::SYS_rt_sigprocmask, [libc::SIG_SETMASK as u64, args + 32, 0, 8, 0, 0])?;
        if r < 0 {
            return Err(fail("rt_sigprocmask", r));
        }
        // mov eax, SYS_getpid; syscall; mov edi, eax; mov esi, sig; mov eax, SYS_kill; syscall
        stub.extend_from_slice(&[0xb8, 0x27, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x89, 0xc7, 0xbe]);
        stub.extend_from_slice(&sig.to_le_bytes());
        stub.extend_from_slice(&[0xb8, 0x3e, 0x00, 0x00, 0x00, 0x0f, 0x05]);
    }
    // Should it come back: mov eax, SYS_pause; syscall; jmp to the mov.
    stub.extend_from_slice(&[0xb8, 0x22, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xeb, 0xf7]);
    t.poke(code + ZOMBIE_STUB, &stub)?;
    let mut regs = t.saved_regs(pid)?;
    (regs.rip, regs.orig_rax) = (code + ZOMBIE_STUB, u64::MAX);
    t.set_saved_regs(pid, regs)?;
    t.detach()?;
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while crate::kernel::target::stat_fields(pid).and_then(|f| f.first().cloned()).as_deref() != Some("Z") {
        if Instant::now() > deadline {
            return Err(EventError::Failed(format!("process {pid} did not end")));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let got = crate::kernel::target::stat_fields(pid).and_then(|f| f.get(49)?.parse::<i32>().ok());
    if got != Some(z.status) {
        return Err(EventError::Failed(format!("it ended with status {got:?}, not {}", z.status)));
    }
    // Taken back from the parent: its signal set (one bit) and a zero timeout.
    let tracer = parent.tracer_mut();
    let ppid = tracer.pid();
    let (at, _) = tracer.scratch_args().ok_or_else(|| EventError::Failed("no scratch area".into()))?;
    let mut set = (1u64 << (exit_signal - 1)).to_le_bytes().to_vec();
    set.extend_from_slice(&[0u8; 16]);
    tracer.poke(at, &set)?;
    let r = tracer.inject(ppid, libc::SYS_rt_sigtimedwait, [at, 0, at + 8, 8, 0, 0])?;
    if r != exit_signal as i64 {
        return Err(EventError::Failed(format!("taking signal {exit_signal} back from the parent: {r}")));
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
