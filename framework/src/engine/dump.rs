//! A frozen process written out: quiescing it, the image's account of it, and the
//! part of an event done while it is stopped — every subsystem's records on its own
//! stream, then the inventory. The checkpoint command and the migration source both
//! call it; after pre-copy rounds ([`Live`]) it sends only what the rounds left.

use ferry_plugin_api::EventKind;

use crate::{
    config::Quiesce,
    engine::context::{ExternalContext, SharedTable, StreamSink},
    engine::event::{Tick, self, EventError, Loaded},
    engine::pipeline::Pipeline,
    engine::watchdog::Watchdog,
    image::{Inventory, PluginEntry, ProcessEntry, INVENTORY_STREAM},
    kernel::dirty::DirtyTracker,
    kernel::freezer::Freezer,
    kernel::target,
    kernel::tracer::{TraceError, Tracer},
};

fn medium_err(medium: &str, e: impl std::fmt::Display) -> EventError {
    EventError::Medium { medium: medium.to_string(), message: e.to_string() }
}

/// What was sent on one stream so far (its inventory entry counts them all).
#[derive(Debug, Clone, Copy, Default)]
pub struct Sent {
    pub records: u64,
    pub bytes: u64,
    pub page_bytes: u64,
}

/// The pre-copy state an event carries into its freeze.
pub struct Live {
    pub tracker: DirtyTracker,
    /// Per subsystem, in stream order.
    pub sent: Vec<Sent>,
}

/// The image's account of the traced process, whose scratch area sits at `scratch`.
pub fn process_entry(tracer: &Tracer, scratch: u64) -> ProcessEntry {
    let pid = tracer.pid();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string();
    let start = target::start_stamp(pid).unwrap_or_default();
    ProcessEntry { pid, tids: tracer.tids(), comm, scratch, start, stopped: tracer.group_stopped(), parent: 0, streams: Vec::new(), shared_fds: Vec::new(), pgid: 0, sid: 0, exit_signal: None, zombies: Vec::new(), subreaper: false }
}

/// Stops every thread of `pid` under the tracer, with the cgroup freezer first when asked.
pub fn quiesce(pid: i32, method: Quiesce) -> Result<(Tracer, Option<Freezer>), EventError> {
    match method {
        Quiesce::Ptrace => Ok((Tracer::seize(pid)?, None)),
        Quiesce::Freezer => {
            let mut f = Freezer::freeze(pid)?;
            let t = Tracer::seize_with(pid, || {
                f.thaw().map_err(|e| TraceError::Thread { tid: pid, message: e.to_string() })
            })?;
            Ok((t, Some(f)))
        }
    }
}

/// The part of a checkpoint done while the process is stopped; after pre-copy rounds
/// (`live`), what they sent counts too. Answers the bytes written and the pages among
/// them.
#[allow(clippy::too_many_arguments)]
pub fn write_image(
    tracer: &mut Tracer,
    subs: &mut [Loaded],
    medium: &mut Pipeline,
    medium_name: &str,
    watchdog: &Watchdog,
    mut live: Option<&mut Live>,
    lazy: bool,
    progress: &mut dyn FnMut(&Tick),
) -> Result<(u64, u64), EventError> {
    tracer.map_scratch(0)?;
    let scratch = tracer.scratch().map(|s| s.0).unwrap_or(0);
    let mut shared = SharedTable::default();
    let mut inventory = Inventory::new(medium_name);
    let (mut bytes, mut page_bytes) = (0u64, 0u64);
    {
        let mut ctx = ExternalContext::new(&mut *tracer, &mut shared, "ferry", watchdog);
        event::setup_all(subs, &mut ctx, EventKind::Checkpoint)?;
    }
    let result = (|| {
        for (i, loaded) in subs.iter_mut().enumerate() {
            let stream = i as u32 + 1;
            let name = loaded.name.clone();
            let (dirty, sent) = match live.as_deref_mut() {
                Some(l) => (Some(&mut l.tracker), l.sent.get(i).copied()),
                None => (None, None),
            };
            let mut ctx = ExternalContext::new(&mut *tracer, &mut shared, &name, watchdog);
            ctx.dirty = dirty;
            ctx.lazy = lazy;
            watchdog.doing(format!("plugin {name} writes its records"));
            let mut sink = StreamSink::new(medium, stream, &name, watchdog);
            if let Some(sent) = sent {
                sink.records = sent.records;
                sink.bytes = sent.bytes;
                sink.page_bytes = sent.page_bytes;
            }
            event::checkpoint_one(loaded, &mut ctx, &mut sink, progress)?;
            crate::fault::point("checkpoint-mid");
            bytes += sink.bytes;
            page_bytes += sink.page_bytes;
            inventory.plugins.push(PluginEntry {
                name: loaded.name.clone(),
                version: loaded.version.clone(),
                stream,
                records: sink.records,
                bytes: sink.bytes,
            });
        }
        let mut entry = process_entry(tracer, scratch);
        entry.subreaper = crate::kernel::tree::is_subreaper(tracer)?;
        inventory.processes.push(entry);
        let encoded = inventory.encode()?;
        medium.push(INVENTORY_STREAM, &encoded).map_err(|e| medium_err(medium_name, e))?;
        // The image is complete only once it is durable.
        medium.flush().map_err(|e| medium_err(medium_name, e))?;
        bytes += encoded.len() as u64;
        Ok::<_, EventError>(())
    })();
    let mut ctx = ExternalContext::new(&mut *tracer, &mut shared, "ferry", watchdog);
    event::cleanup_all(subs, &mut ctx, result.is_ok());
    result.map(|_| (bytes, page_bytes / 4096))
}
