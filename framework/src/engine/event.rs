//! What every event shares: the subsystem plugins of a request loaded and put in
//! dependency order, the iterative worker loop that calls a plugin until it is done
//! (with `fault`/`dump` on errors), the process hooks, and the statistics.

use std::{collections::BTreeMap, time::Instant};

use abi_stable::sabi_trait::TD_Opaque;
use ferry_plugin_api::{
    ContextRef, EventKind, PluginError, PluginKind, ProcessContext_TO, Progress, RecordSink_TO,
    RecordSource_TO, Recovery, SinkRef, SourceRef, SubsystemBox,
};
use serde::Serialize;

use crate::{
    engine::context::ExternalContext,
    engine::coverage,
    engine::manager::{Lease, Manager, ManagerError},
    engine::watchdog::{StatusTrack, Watchdog},
    image::ImageError,
    kernel::freezer::FreezeError,
    kernel::tracer::TraceError,
};

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error(transparent)]
    Target(#[from] TraceError),
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    #[error(transparent)]
    Manager(#[from] ManagerError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{phase} failed in plugin {plugin}: {message}")]
    Plugin { plugin: String, phase: &'static str, message: String },
    #[error("medium {medium}: {message}")]
    Medium { medium: String, message: String },
    #[error("image directory {path}: {message}")]
    ImageDir { path: String, message: String },
    /// ferry declines: what the process has, the request, the image or the peer is not
    /// one it will act on.
    #[error("{0}")]
    Refused(String),
    /// Something broke while ferry worked (the connection, the peer, a kernel call):
    /// a retry may go through.
    #[error("{0}")]
    Failed(String),
}

impl EventError {
    /// Whether ferry declined — what the process has, the request, the image or the peer
    /// is not one it acts on — rather than something breaking while it worked (`--json`
    /// reports it as the failure's kind). A plugin's error while it reads the process is
    /// what it will not carry; one the watchdog raised, or any while rebuilding, is a
    /// failure.
    pub fn is_refusal(&self) -> bool {
        match self {
            EventError::Refused(_) | EventError::Image(_) | EventError::ImageDir { .. } => true,
            EventError::Manager(m) => !matches!(m, ManagerError::Plugin { .. }),
            EventError::Target(t) => matches!(t, TraceError::NoProcess(_) | TraceError::Unsuitable { .. }),
            EventError::Plugin { phase, message, .. } => {
                matches!(*phase, "setup" | "checkpoint" | "pre-copy") && !message.contains("watchdog: ")
            }
            EventError::Failed(_) | EventError::Freeze(_) | EventError::Medium { .. } => false,
        }
    }
}

/// What an event did, as `--json` prints it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Pid in the image → pid now.
    pub pids: BTreeMap<String, i32>,
    pub frozen_ms: f64,
    pub total_ms: f64,
    pub bytes: u64,
    pub pages: u64,
    /// When each phase ended, from the command's start (`crate::trace::mark`s).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<crate::trace::Phase>,
}

pub fn ms(since: Instant) -> f64 {
    (since.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

/// A subsystem plugin in use by this event.
pub struct Loaded {
    pub name: String,
    pub version: String,
    pub sub: SubsystemBox,
    _lease: Lease,
}

/// How an event goes, for a progress display: the plugin at work and its status
/// (entities and bytes done, of how many).
pub struct Tick<'a> {
    pub plugin: &'a str,
    pub status: ferry_plugin_api::Status,
}

/// Loads the requested subsystems and orders them so that each runs after the ones
/// its `info().after` names (those in the request; `*` names all the others); a cycle
/// is refused. So is a request that would leave state of process `pid` behind (of
/// any process, for a restore: `None`), before anything is touched.
pub fn load_subsystems(manager: &Manager, names: &[String], pid: Option<i32>) -> Result<Vec<Loaded>, EventError> {
    let mut pending: Vec<(Loaded, Vec<String>)> = Vec::new();
    let mut carried: Vec<String> = Vec::new();
    for name in names {
        if pending.iter().any(|(l, _)| &l.name == name) {
            return Err(EventError::Refused(format!("subsystem {name} is named twice")));
        }
        let lease = manager.acquire(PluginKind::Subsystem, name)?;
        let sub = lease.new_subsystem()?;
        // `*`: after every other plugin of the request (the credentials, set last).
        let info = sub.info();
        carried.extend(info.entity_kinds.into_iter().map(|k| k.into_string()));
        let after: Vec<String> = info.after.into_iter().map(|s| s.into_string()).collect();
        let after = if after.iter().any(|a| a == "*") {
            names.iter().filter(|n| *n != name).cloned().collect()
        } else {
            after.into_iter().filter(|a| names.contains(a)).collect()
        };
        let meta = lease.meta().clone();
        pending.push((Loaded { name: meta.name, version: meta.version, sub, _lease: lease }, after));
    }
    let who = pid.map_or_else(|| "the image's process".to_string(), |p| format!("process {p}"));
    coverage::check(&who, &coverage::kinds_of(pid), &carried, names).map_err(EventError::Refused)?;
    let mut ordered: Vec<Loaded> = Vec::new();
    while !pending.is_empty() {
        let ready = pending
            .iter()
            .position(|(_, after)| after.iter().all(|a| ordered.iter().any(|l| &l.name == a)))
            .ok_or_else(|| {
                let names: Vec<&str> = pending.iter().map(|(l, _)| l.name.as_str()).collect();
                EventError::Refused(format!("subsystems {} depend on each other in a cycle", names.join(", ")))
            })?;
        ordered.push(pending.remove(ready).0);
    }
    Ok(ordered)
}

fn plugin_err(plugin: &str, phase: &'static str, e: PluginError) -> EventError {
    EventError::Plugin { plugin: plugin.to_string(), phase, message: e.message.into() }
}

/// Calls `step` until it answers Done. On an error, the plugin's `fault` decides:
/// retry (a few times), skip the rest of this plugin's work, or give up with `dump`.
pub fn drive<C: ferry_plugin_api::ProcessContext>(
    loaded: &mut Loaded,
    ctx: &mut C,
    watchdog: &Watchdog,
    phase: &'static str,
    mut step: impl FnMut(&mut SubsystemBox, &mut ContextRef<'_>) -> ferry_plugin_api::PResult<Progress>,
    progress: &mut dyn FnMut(&Tick),
) -> Result<(), EventError> {
    let mut retries = 0;
    let mut track = StatusTrack::new();
    let mut cref = ProcessContext_TO::from_ptr(ctx, TD_Opaque);
    loop {
        let answer = step(&mut loaded.sub, &mut cref).into_result();
        watchdog.beat();
        // "More" while the plugin's status stands still is no progress either.
        let answer = match answer {
            Ok(Progress::More) if track.stalled(loaded.sub.status(), watchdog.limit()) => Err(PluginError::new(
                &loaded.name,
                format!("watchdog: no progress for {} ms (its status stands still)", watchdog.limit().as_millis()),
            )),
            other => other,
        };
        match answer {
            Ok(Progress::Done) => {
                crate::trace::mark(format_args!("{phase} {} done", loaded.name));
                return Ok(());
            }
            Ok(Progress::More) => progress(&Tick { plugin: &loaded.name, status: loaded.sub.status() }),
            Err(e) => match loaded.sub.fault(&mut cref, &e) {
                Recovery::Retry if retries < 3 => retries += 1,
                Recovery::Skip => return Ok(()),
                _ => {
                    let detail = loaded.sub.dump(&e).into_string();
                    let message = if detail.is_empty() { e.message.into_string() } else { detail };
                    return Err(EventError::Plugin { plugin: loaded.name.clone(), phase, message });
                }
            },
        }
    }
}

/// Runs one plugin's checkpoint into `sink`.
pub fn checkpoint_one(
    loaded: &mut Loaded,
    ctx: &mut ExternalContext<'_>,
    sink: &mut crate::engine::context::StreamSink<'_>,
    progress: &mut dyn FnMut(&Tick),
) -> Result<(), EventError> {
    checkpoint_into(loaded, ctx, sink, progress)
}

/// [`checkpoint_one`] into any sink of records.
pub fn checkpoint_into<S: ferry_plugin_api::RecordSink>(
    loaded: &mut Loaded,
    ctx: &mut ExternalContext<'_>,
    sink: &mut S,
    progress: &mut dyn FnMut(&Tick),
) -> Result<(), EventError> {
    let mut sref: SinkRef<'_> = RecordSink_TO::from_ptr(sink, TD_Opaque);
    let watchdog = ctx.watchdog;
    drive(loaded, ctx, watchdog, "checkpoint", |sub, c| sub.checkpoint(c, &mut sref), progress)
}

/// Runs one plugin's pre-copy round `round` into `sink`, beside the running process.
/// `stopped` holds the process stopped for the plugin's first step of the round (where
/// it looks at the mappings and starts tracking them, which must not race with the
/// process changing them) and is let go after it.
pub fn precopy_one(
    loaded: &mut Loaded,
    ctx: &mut crate::engine::context::LiveContext<'_>,
    sink: &mut crate::engine::context::StreamSink<'_>,
    round: u32,
    mut stopped: Option<crate::kernel::tracer::Tracer>,
    progress: &mut dyn FnMut(&Tick),
) -> Result<(), EventError> {
    let mut sref: SinkRef<'_> = RecordSink_TO::from_ptr(sink, TD_Opaque);
    let watchdog = ctx.watchdog;
    let result = drive(loaded, ctx, watchdog, "pre-copy", |sub, c| {
        let answer = sub.precopy(c, &mut sref, round);
        if let Some(t) = stopped.take() {
            if let Err(e) = t.detach() {
                return abi_stable::std_types::RResult::RErr(PluginError::new("ferry", format!("letting the process run again: {e}")));
            }
        }
        answer
    }, progress);
    drop(stopped);
    result
}

/// Runs one plugin's restart from `source`.
pub fn restart_one(
    loaded: &mut Loaded,
    ctx: &mut ExternalContext<'_>,
    source: &mut crate::engine::context::StreamSource<'_>,
    progress: &mut dyn FnMut(&Tick),
) -> Result<(), EventError> {
    let mut sref: SourceRef<'_> = RecordSource_TO::from_ptr(source, TD_Opaque);
    let watchdog = ctx.watchdog;
    drive(loaded, ctx, watchdog, "restart", |sub, c| sub.restart(c, &mut sref), progress)
}

/// Process hook `setup` of every plugin, in order.
pub fn setup_all(subs: &mut [Loaded], ctx: &mut ExternalContext<'_>, kind: EventKind) -> Result<(), EventError> {
    let mut cref = ProcessContext_TO::from_ptr(ctx, TD_Opaque);
    for l in subs.iter_mut() {
        l.sub.setup(&mut cref, kind).into_result().map_err(|e| plugin_err(&l.name, "setup", e))?;
    }
    Ok(())
}

/// Process hook `restart` (resume) of every plugin, in reverse order.
pub fn resume_all(subs: &mut [Loaded], ctx: &mut ExternalContext<'_>) -> Result<(), EventError> {
    let mut cref = ProcessContext_TO::from_ptr(ctx, TD_Opaque);
    for l in subs.iter_mut().rev() {
        l.sub.resume(&mut cref).into_result().map_err(|e| plugin_err(&l.name, "resume", e))?;
    }
    Ok(())
}

/// Process hook `cleanup` of every plugin, in reverse order; always runs.
pub fn cleanup_all(subs: &mut [Loaded], ctx: &mut ExternalContext<'_>, ok: bool) {
    let mut cref = ProcessContext_TO::from_ptr(ctx, TD_Opaque);
    for l in subs.iter_mut().rev() {
        l.sub.cleanup(&mut cref, ok);
    }
}
