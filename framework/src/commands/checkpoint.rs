//! `ferry checkpoint`: quiesce a live process, let each subsystem plugin write its
//! records to its stream of the medium, write the inventory last, and then kill the
//! process or let it go on. Any failure before the inventory is flushed puts the
//! process back as it was and removes the partial image.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use ferry_plugin_api::{EventKind, PluginKind};

use crate::{
    config::Quiesce,
    engine::context::{ExternalContext, SharedTable, StreamSink},
    engine::event::{self, EventError, Loaded, Stats},
    engine::manager::Manager,
    engine::pipeline::Pipeline,
    engine::watchdog::Watchdog,
    image::{Inventory, PluginEntry, ProcessEntry, INVENTORY_STREAM},
    kernel::freezer::Freezer,
    kernel::tracer::{self, TraceError, Tracer},
    strategies::precopy::Live,
};

pub struct CheckpointRequest {
    pub pid: i32,
    pub dir: PathBuf,
    pub subsystems: Vec<String>,
    pub medium: String,
    pub quiesce: Quiesce,
    pub leave_running: bool,
    /// How long the event may go without progress (`watchdog_ms`).
    pub watchdog: std::time::Duration,
}

/// An image directory must be absent or empty: a checkpoint never mixes with an old one.
fn prepare_dir(dir: &Path) -> Result<bool, EventError> {
    let err = |message: String| EventError::ImageDir { path: dir.display().to_string(), message };
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(err("exists and is not empty".into()));
            }
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(err(e.to_string())),
    }
}

/// Removes what a failed checkpoint wrote (the stream files), and the directory if
/// this checkpoint created it.
fn discard(dir: &Path, created: bool) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    if created {
        let _ = std::fs::remove_dir(dir);
    }
}

fn medium_err(medium: &str, e: impl std::fmt::Display) -> EventError {
    EventError::Medium { medium: medium.to_string(), message: e.to_string() }
}

pub fn checkpoint(manager: &Manager, req: &CheckpointRequest, progress: &mut dyn FnMut(&str)) -> Result<Stats, EventError> {
    let started = Instant::now();
    // Everything that can be refused without touching the process comes first.
    tracer::check_target(req.pid)?;
    let created = prepare_dir(&req.dir)?;
    let mut subs = event::load_subsystems(manager, &req.subsystems)?;
    let medium_lease = manager.acquire(PluginKind::Medium, &req.medium)?;
    let opened = medium_lease.open_medium(&serde_json::json!({"role": "write", "dir": req.dir}))?;
    // Reading the process and writing the image cost about one copy each; a writer
    // thread lets the two cores overlap them (measured at 1 GiB: ~405 ms against ~570
    // one after the other).
    let mut medium = Pipeline::new(opened);

    let frozen_at = Instant::now();
    let (mut tracer, freezer) = match quiesce(req.pid, req.quiesce) {
        Ok(q) => q,
        Err(e) => {
            discard(&req.dir, created);
            return Err(e);
        }
    };

    crate::trace::mark("frozen");
    crate::fault::pause("checkpoint-frozen");
    // The last resort if a plugin stops answering: the tracer thread is stuck in it, so
    // remove the partial image and exit; the kernel then detaches the process, which
    // carries on.
    let (dir, pid) = (req.dir.clone(), req.pid);
    let rescue = freezer.as_ref().map(|f| f.rescue());
    let watchdog = Watchdog::start(req.watchdog, move |why, _| {
        eprintln!("ferry: {why}; process {pid} is let go");
        discard(&dir, created);
        if let Some(r) = rescue {
            r();
        }
        std::process::exit(1);
    });
    let outcome = write_image(&mut tracer, &mut subs, &mut medium, &req.medium, &watchdog, None, false, progress);
    drop(watchdog);
    let mut stats = Stats::default();
    match outcome {
        Ok((bytes, pages)) => {
            crate::trace::mark("image complete");
            if req.leave_running {
                tracer.unmap_scratch()?;
                tracer.detach()?;
            } else if freezer.is_some() {
                // Its cgroup of ferry's can go only once it is empty.
                tracer.kill();
            } else {
                tracer.kill_and_go();
            }
            stats.frozen_ms = event::ms(frozen_at);
            crate::trace::mark(if req.leave_running { "let go" } else { "killed" });
            drop(freezer);
            stats.pids.insert(req.pid.to_string(), if req.leave_running { req.pid } else { 0 });
            stats.bytes = bytes;
            stats.pages = pages;
            stats.total_ms = event::ms(started);
            Ok(stats)
        }
        Err(e) => {
            // Nothing is lost: the process goes back to running as it was.
            let _ = tracer.unmap_scratch();
            let _ = tracer.detach();
            drop(freezer);
            drop(medium);
            discard(&req.dir, created);
            Err(e)
        }
    }
}

/// The image's account of the traced process, whose scratch area sits at `scratch`.
pub(crate) fn process_entry(tracer: &Tracer, scratch: u64) -> ProcessEntry {
    let pid = tracer.pid();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string();
    let start = tracer::start_stamp(pid).unwrap_or_default();
    ProcessEntry { pid, tids: tracer.tids(), comm, scratch, start }
}

/// Stops every thread of `pid` under the tracer, with the cgroup freezer first when asked.
pub(crate) fn quiesce(pid: i32, method: Quiesce) -> Result<(Tracer, Option<Freezer>), EventError> {
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
pub(crate) fn write_image(
    tracer: &mut Tracer,
    subs: &mut [Loaded],
    medium: &mut Pipeline,
    medium_name: &str,
    watchdog: &Watchdog,
    mut live: Option<&mut Live>,
    lazy: bool,
    progress: &mut dyn FnMut(&str),
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
        inventory.processes.push(process_entry(tracer, scratch));
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
