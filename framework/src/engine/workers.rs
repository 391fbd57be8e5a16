//! A tree's checkpoint with one event per process, each on a worker thread of its own
//! (the paper's section 3.3), a coordinator running the phases in step: every process
//! frozen → what they share found → each process written to its own streams, all at
//! once → the inventory → every process's fate (killed, let run, or let go after a
//! failure). A process is traced by the thread that seized it, so each worker seizes
//! its own process and stays until its fate: the coordinator starts the root's worker,
//! and a child's once its parent's worker has stopped the parent and listed its
//! children (so none of the tree forks or leaves unseen, as `kernel::tree::freeze_tree`).
//! The workers share the medium's writer (one lock per record) and read their
//! processes' memory in parallel.

use std::sync::Mutex;

use crossbeam::channel::{unbounded, Receiver, Sender};
use ferry_plugin_api::EventKind;

use crate::{
    engine::context::{ExternalContext, SharedTable, StreamSink},
    engine::dump::process_entry,
    engine::event::{self, EventError, Tick},
    engine::manager::Manager,
    engine::pipeline::Pipeline,
    engine::watchdog::Watchdog,
    image::{Inventory, PluginEntry, ProcessEntry, SharedFd, Zombie, INVENTORY_STREAM},
    kernel::{
        freezer::Freezer,
        target::{children, stat_fields},
        tracer::{TraceError, Tracer},
        tree::{self as ktree, Shared},
    },
};

/// What becomes of the processes once the image is complete, or not.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The checkpoint's default: killed.
    Kill,
    /// `--leave-running`: the scratch area removed, let go.
    Run,
    /// After a failure: as `Run`, the process as it was.
    LetGo,
}

enum Up {
    Seized { pid: i32, children: Vec<i32> },
    Failed { error: EventError },
    Mapped { pid: i32, addr: u64 },
    Written { pid: i32, entry: Box<ProcessEntry>, plugins: Vec<PluginEntry>, bytes: u64, page_bytes: u64 },
    /// Writing process `pid` failed.
    Unwritten { pid: i32, error: EventError },
    Done { error: Option<EventError> },
}

enum Down {
    /// Write the process: its streams from `first_stream`, the fds it shares, and what
    /// the others of the tree carry for it (`TreeClaims`).
    Write { first_stream: u32, shared_fds: Vec<SharedFd>, claimed: SharedTable },
    Fate(Fate),
}

/// One process's event, on its own thread: seize, then write when told, then its fate.
#[allow(clippy::too_many_arguments)]
fn worker(
    pid: i32,
    parent: i32,
    frozen_cgroup: bool,
    manager: &Manager,
    names: &[String],
    medium: &Mutex<&mut Pipeline>,
    watchdog: &Watchdog,
    up: Sender<Up>,
    down: Receiver<Down>,
) {
    let seized = if frozen_cgroup { Tracer::seize_with(pid, || Ok(())) } else { Tracer::seize(pid) };
    let mut tracer = match seized {
        Ok(t) => t,
        Err(e) => {
            let _ = up.send(Up::Failed { error: e.into() });
            return;
        }
    };
    if parent == 0 {
        crate::fault::pause("tree-root-frozen");
    }
    // Stopped now: its children stand still (a zombie stays one, see kernel::tree).
    let kids = children(pid).into_iter().filter(|&c| !matches!(stat_fields(c).and_then(|f| f.first().cloned()).as_deref(), Some("Z" | "X"))).collect();
    let _ = up.send(Up::Seized { pid, children: kids });
    let mut fate = Fate::LetGo;
    while let Ok(msg) = down.recv() {
        match msg {
            Down::Write { first_stream, shared_fds, claimed } => {
                let written = write_one(&mut tracer, parent, first_stream, shared_fds, claimed, manager, names, medium, watchdog, &up);
                let _ = up.send(match written {
                    Ok((entry, plugins, bytes, page_bytes)) => Up::Written { pid, entry: Box::new(entry), plugins, bytes, page_bytes },
                    Err(error) => Up::Unwritten { pid, error },
                });
            }
            Down::Fate(f) => {
                fate = f;
                break;
            }
        }
    }
    let error = match fate {
        Fate::Kill => {
            tracer.kill_and_go();
            None
        }
        Fate::Run | Fate::LetGo => {
            let unmapped = tracer.unmap_scratch();
            let detached = tracer.detach();
            unmapped.and(detached).err().map(EventError::from)
        }
    };
    let _ = up.send(Up::Done { error });
}

/// The part of `engine::tree::write_tree` one process does.
#[allow(clippy::too_many_arguments)]
fn write_one(
    tracer: &mut Tracer,
    parent: i32,
    first_stream: u32,
    shared_fds: Vec<SharedFd>,
    mut shared: SharedTable,
    manager: &Manager,
    names: &[String],
    medium: &Mutex<&mut Pipeline>,
    watchdog: &Watchdog,
    up: &Sender<Up>,
) -> Result<(ProcessEntry, Vec<PluginEntry>, u64, u64), EventError> {
    let pid = tracer.pid();
    let in_process = |e: EventError| match e {
        EventError::Target(t) => EventError::Target(t),
        other => EventError::Refused(format!("process {pid}: {other}")),
    };
    let mut subs = event::load_subsystems(manager, names, Some(pid)).map_err(in_process)?;
    let at = tracer.scratch_address();
    if at != 0 {
        let _ = up.send(Up::Mapped { pid, addr: at });
    }
    let scratch = tracer.map_scratch(at).map_err(|e| in_process(e.into()))?;
    let _ = up.send(Up::Mapped { pid, addr: scratch });
    {
        let mut ctx = ExternalContext::new(&mut *tracer, &mut shared, "ferry", watchdog);
        event::setup_all(&mut subs, &mut ctx, EventKind::Checkpoint).map_err(in_process)?;
    }
    let (mut bytes, mut page_bytes) = (0, 0);
    let mut plugins = Vec::new();
    let result = (|| {
        for (i, loaded) in subs.iter_mut().enumerate() {
            let stream = first_stream + i as u32;
            let name = loaded.name.clone();
            let mut ctx = ExternalContext::new(&mut *tracer, &mut shared, &name, watchdog);
            watchdog.doing(format!("plugin {name} writes the records of process {pid}"));
            // Each record goes to the writer under the lock; the reading, the bulk of
            // the work, goes on in parallel.
            let mut sink = LockedSink { medium, stream, name: &name, watchdog, records: 0, bytes: 0, page_bytes: 0 };
            event::checkpoint_into(loaded, &mut ctx, &mut sink, &mut |_: &Tick| {})?;
            crate::fault::point("checkpoint-mid");
            bytes += sink.bytes;
            page_bytes += sink.page_bytes;
            plugins.push(PluginEntry { name: name.clone(), version: loaded.version.clone(), stream, records: sink.records, bytes: sink.bytes });
        }
        Ok::<_, EventError>(())
    })();
    let mut ctx = ExternalContext::new(&mut *tracer, &mut shared, "ferry", watchdog);
    event::cleanup_all(&mut subs, &mut ctx, result.is_ok());
    result.map_err(in_process)?;
    let mut entry = process_entry(tracer, scratch);
    (entry.parent, entry.streams) = (parent, plugins.iter().map(|p| p.stream).collect());
    (entry.pgid, entry.sid) = ktree::group_and_session(pid).unwrap_or((0, 0));
    entry.shared_fds = shared_fds;
    entry.exit_signal = if parent != 0 { ktree::exit_signal(pid) } else { None };
    entry.zombies = ktree::zombies(pid)?.into_iter().map(|d| Zombie { pid: d.pid, status: d.status, exit_signal: d.exit_signal }).collect();
    entry.subreaper = ktree::is_subreaper(tracer).map_err(|e| in_process(e.into()))?;
    Ok((entry, plugins, bytes, page_bytes))
}

/// A stream of one process, each record framed and pushed to the shared writer under
/// its lock.
struct LockedSink<'a, 'p> {
    medium: &'a Mutex<&'p mut Pipeline>,
    stream: u32,
    name: &'a str,
    watchdog: &'a Watchdog,
    records: u64,
    bytes: u64,
    page_bytes: u64,
}

impl ferry_plugin_api::RecordSink for LockedSink<'_, '_> {
    fn put(&mut self, kind: abi_stable::std_types::RStr<'_>, format: ferry_plugin_api::RecordFormat, payload: abi_stable::std_types::RSlice<'_, u8>) -> ferry_plugin_api::PResult<()> {
        let mut guard = self.medium.lock().unwrap_or_else(|p| p.into_inner());
        let mut sink = StreamSink::new(&mut guard, self.stream, self.name, self.watchdog);
        let r = sink.put(kind, format, payload);
        self.records += sink.records;
        self.bytes += sink.bytes;
        self.page_bytes += sink.page_bytes;
        r
    }
}

/// Freezes the tree of `root` with a worker per process, writes every process (all at
/// once) and the inventory to `medium`, and gives every process `fate` once the image
/// is complete (or lets every one go on a failure). `mapped` hears of each scratch area.
/// Answers the bytes written, the pages among them, and the pids taken.
#[allow(clippy::too_many_arguments)]
pub fn checkpoint_tree(
    manager: &Manager,
    names: &[String],
    root: i32,
    freezer: bool,
    medium: &mut Pipeline,
    medium_name: &str,
    watchdog: &Watchdog,
    mapped: &mut dyn FnMut(i32, u64),
    fate: Fate,
) -> Result<(u64, u64, Vec<i32>), EventError> {
    let medium_err = |e: String| EventError::Medium { medium: medium_name.to_string(), message: e };
    // With the freezer, the whole tree frozen at once first, then seized, then thawed.
    let mut cgroup = if freezer {
        Some(Freezer::freeze_tree(root, children).map_err(|e| EventError::from(TraceError::Thread { tid: root, message: e.to_string() }))?)
    } else {
        None
    };
    if cgroup.as_ref().is_some_and(|f| !f.stops_while_frozen()) {
        return Err(TraceError::Unsuitable { pid: root, why: "a tree with the v1 cgroup freezer, which ferry does not carry yet (use --quiesce ptrace)".into() }.into());
    }
    let names_count = names.len() as u32;
    let shared_medium = Mutex::new(medium);
    // The request's plugin options, this thread's: each worker serves the same request.
    let params = crate::engine::params::current();
    std::thread::scope(|scope| {
        let (up_tx, up_rx) = unbounded::<Up>();
        // Per process, in the order seized (parents first): pid, parent, its worker's line.
        let mut tree: Vec<(i32, i32, Sender<Down>)> = Vec::new();
        let start = |pid: i32, parent: i32, tree: &mut Vec<(i32, i32, Sender<Down>)>| {
            let (tx, rx) = unbounded();
            let up = up_tx.clone();
            let medium = &shared_medium;
            let params = params.clone();
            scope.spawn(move || {
                let _params = crate::engine::params::scope(params);
                worker(pid, parent, freezer, manager, names, medium, watchdog, up, rx)
            });
            tree.push((pid, parent, tx));
        };
        start(root, 0, &mut tree);
        // Every process seized, each one's children started once it is stopped.
        let mut pending = 1;
        // Workers that could not seize their process: gone already.
        let mut gone = 0;
        let mut failure: Option<EventError> = None;
        while pending > 0 {
            match up_rx.recv() {
                Ok(Up::Seized { pid, children, .. }) => {
                    pending -= 1;
                    if failure.is_none() {
                        for c in children {
                            start(c, pid, &mut tree);
                            pending += 1;
                        }
                    }
                }
                Ok(Up::Failed { error, .. }) => {
                    pending -= 1;
                    gone += 1;
                    failure.get_or_insert(error);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if let Some(f) = cgroup.as_mut() {
            if let Err(e) = f.thaw() {
                failure.get_or_insert(TraceError::Thread { tid: root, message: e.to_string() }.into());
            }
        }
        let pids: Vec<i32> = tree.iter().map(|t| t.0).collect();
        let links: Vec<(i32, i32)> = tree.iter().map(|t| (t.0, t.1)).collect();
        let shared: Result<Vec<Shared>, EventError> = match failure.take() {
            Some(e) => Err(e),
            None => ktree::check_shared(&pids).and_then(|s| ktree::check_groups(&links).map(|_| s)).map_err(EventError::from),
        };
        let mut outcome = shared.and_then(|shared| {
            crate::trace::mark("tree frozen");
            // Every process written at once, each to its own streams.
            let claims = crate::engine::tree::TreeClaims::find(&pids, &shared);
            for (k, (pid, _, tx)) in tree.iter().enumerate() {
                let shared_fds = crate::engine::tree::shared_fds_of(*pid, &shared);
                let mut claimed = SharedTable::default();
                claims.seed(*pid, &mut claimed);
                let _ = tx.send(Down::Write { first_stream: 1 + k as u32 * names_count, shared_fds, claimed });
            }
            let mut entries: Vec<Option<(ProcessEntry, Vec<PluginEntry>)>> = vec![None; tree.len()];
            let (mut bytes, mut page_bytes) = (0u64, 0u64);
            let mut first_error = None;
            for _ in 0..tree.len() {
                loop {
                    match up_rx.recv() {
                        Ok(Up::Mapped { pid, addr }) => mapped(pid, addr),
                        Ok(Up::Written { pid, entry, plugins, bytes: b, page_bytes: p }) => {
                            let k = pids.iter().position(|&q| q == pid).expect("a worker of the tree");
                            entries[k] = Some((*entry, plugins));
                            (bytes, page_bytes) = (bytes + b, page_bytes + p);
                            break;
                        }
                        Ok(Up::Unwritten { pid, error }) => {
                            // The one nearest the root is told (parents first), as
                            // one after another would have.
                            let k = pids.iter().position(|&q| q == pid).expect("a worker of the tree");
                            if first_error.as_ref().is_none_or(|(j, _)| k < *j) {
                                first_error = Some((k, error));
                            }
                            break;
                        }
                        Ok(_) => {}
                        Err(_) => return Err(EventError::Failed("a worker of the tree went away".into())),
                    }
                }
            }
            if let Some((_, e)) = first_error {
                return Err(e);
            }
            let mut inventory = Inventory::new(medium_name);
            for (entry, plugins) in entries.into_iter().flatten() {
                inventory.plugins.extend(plugins);
                inventory.processes.push(entry);
            }
            let encoded = inventory.encode()?;
            let mut m = shared_medium.lock().unwrap_or_else(|p| p.into_inner());
            m.push(INVENTORY_STREAM, &encoded).map_err(|e| medium_err(e.to_string()))?;
            m.flush().map_err(|e| medium_err(e.to_string()))?;
            Ok((bytes + encoded.len() as u64, page_bytes / 4096, pids.clone()))
        });
        let fate = if outcome.is_ok() { fate } else { Fate::LetGo };
        for (_, _, tx) in &tree {
            let _ = tx.send(Down::Fate(fate));
        }
        drop(up_tx);
        // Every worker's end (the processes killed or let go) before the scope ends.
        let mut left = tree.len() - gone;
        while left > 0 {
            match up_rx.recv() {
                Ok(Up::Done { error, .. }) => {
                    left -= 1;
                    if let (Some(e), true) = (error, outcome.is_ok() && fate == Fate::Run) {
                        outcome = Err(e);
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        drop(tree);
        // Its cgroup of ferry's can go only once every process left it.
        drop(cgroup);
        outcome
    })
}
