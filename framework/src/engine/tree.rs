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
    engine::rebuild::{rebuild, Blank, Held, Plan},
    engine::watchdog::Watchdog,
    image::{Inventory, PluginEntry, INVENTORY_STREAM},
    kernel::tracer::Tracer,
};

/// Writes every process of a frozen tree (parents first, each with its parent's pid)
/// and the inventory; `mapped` hears of each scratch area as it is mapped (for the
/// janitor). Answers the bytes written and the pages among them.
#[allow(clippy::too_many_arguments)]
pub fn write_tree(
    manager: &Manager,
    names: &[String],
    tree: &mut [(Tracer, i32)],
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
        inventory.processes.push(entry);
    }
    let encoded = inventory.encode()?;
    medium.push(INVENTORY_STREAM, &encoded).map_err(|e| medium_err(e.to_string()))?;
    medium.flush().map_err(|e| medium_err(e.to_string()))?;
    Ok((bytes + encoded.len() as u64, page_bytes / 4096))
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
        let child = parent.fork_child(p.pid)?;
        blanks.push(Some(child));
    }
    let mut held: Vec<Held> = Vec::new();
    for (k, p) in procs.iter().enumerate() {
        let plan = Plan { process: p.clone(), plugins: p.plugins(inventory).into_iter().cloned().collect() };
        match rebuild(manager, medium, &plan, true, blanks[k].take(), watchdog, started, progress) {
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
