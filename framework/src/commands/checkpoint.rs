//! `ferry checkpoint`: quiesce a live process, let each subsystem plugin write its
//! records to its stream of the medium, write the inventory last, and then kill the
//! process or let it go on. Any failure before the inventory is flushed puts the
//! process back as it was and removes the partial image.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Instant,
};

use ferry_plugin_api::PluginKind;

use crate::{
    config::Quiesce,
    engine::dump::{quiesce, write_image},
    engine::event::{Tick, self, EventError, Stats},
    engine::manager::Manager,
    engine::pipeline::Pipeline,
    engine::watchdog::Watchdog,
    engine::workers,
    commands::janitor::Janitor,
    kernel::{target, tracer::TraceError, tree},
    trust,
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
/// One that exists becomes private to its owner (0700).
fn prepare_dir(dir: &Path) -> Result<bool, EventError> {
    let err = |message: String| EventError::ImageDir { path: dir.display().to_string(), message };
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(err("exists and is not empty".into()));
            }
            // A restore will trust what is written here: only root (or the caller) may
            // change it, as for a directory the checkpoint makes itself.
            if let Some(why) = trust::changeable_by_others(dir).filter(|w| !w.starts_with("writable")) {
                return Err(err(format!("{why}: an image there could be changed by others")));
            }
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| err(e.to_string()))?;
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

pub fn checkpoint(manager: &Manager, req: &CheckpointRequest, progress: &mut dyn FnMut(&Tick)) -> Result<Stats, EventError> {
    // Everything that can be refused without touching the process comes first.
    target::check_target(req.pid)?;
    target::check_not_ferry(req.pid)?;
    if !target::children(req.pid).is_empty() {
        return checkpoint_tree(manager, req, progress);
    }
    match checkpoint_one(manager, req, progress) {
        // A child forked as the process was being frozen (it was let go, the image
        // removed): the tree is taken instead.
        Err(EventError::Target(TraceError::HasChild { .. })) => checkpoint_tree(manager, req, progress),
        other => other,
    }
}

/// The checkpoint of a process without children.
fn checkpoint_one(manager: &Manager, req: &CheckpointRequest, progress: &mut dyn FnMut(&Tick)) -> Result<Stats, EventError> {
    let started = Instant::now();
    let created = prepare_dir(&req.dir)?;
    let mut subs = event::load_subsystems(manager, &req.subsystems, Some(req.pid))?;
    let medium_lease = manager.acquire(PluginKind::Medium, &req.medium)?;
    let opened = medium_lease.open_medium(&serde_json::json!({"role": "write", "dir": req.dir}))?;
    // Reading the process and writing the image cost about one copy each; a writer
    // thread lets the two cores overlap them (measured at 1 GiB: ~405 ms against ~570
    // one after the other).
    let mut medium = Pipeline::new(opened);

    // Should this ferry die from here on (SIGKILL: no destructor runs), the janitor
    // removes the scratch area and the partial image (the guardian of the freezer's
    // placement takes the process home); dismissed once this ferry has cleaned up, or
    // kept the image.
    let mut janitor = Janitor::start();
    if let Some(j) = janitor.as_mut() {
        j.image(&req.dir, created);
    }
    crate::fault::pause("checkpoint-checked");
    let frozen_at = Instant::now();
    let (mut tracer, freezer) = match quiesce(req.pid, req.quiesce).and_then(|(tracer, freezer)| {
        // A child forked since the first look: seen now that nothing can fork, and the
        // process goes back to running as it was.
        match target::check_childless(req.pid, "forked as the process was being frozen") {
            Ok(()) => Ok((tracer, freezer)),
            Err(e) => {
                let _ = tracer.detach();
                drop(freezer);
                Err(e.into())
            }
        }
    }) {
        Ok(q) => q,
        Err(e) => {
            discard(&req.dir, created);
            if let Some(j) = janitor {
                j.dismiss();
            }
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
    let watchdog = Watchdog::last_resort(req.watchdog, format!("process {pid} is let go"), move || {
        discard(&dir, created);
        rescue.into_iter().for_each(|r| r());
    });
    // Mapped here (write_image finds it mapped) so that the janitor knows where, told
    // before the call that maps it (ferry may die in that very call).
    let at = tracer.scratch_address();
    if let (Some(j), true) = (janitor.as_mut(), at != 0) {
        j.scratch(req.pid, at);
    }
    let outcome = tracer.map_scratch(at).map_err(EventError::from).and_then(|addr| {
        if let (Some(j), true) = (janitor.as_mut(), addr != at) {
            j.scratch(req.pid, addr);
        }
        write_image(&mut tracer, &mut subs, &mut medium, &req.medium, &watchdog, None, false, progress)
    });
    drop(watchdog);
    // The image is complete, or this ferry undoes what it did itself.
    if let Some(j) = janitor {
        j.dismiss();
    }
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


/// `ferry checkpoint` of a process with children: the process and every descendant,
/// frozen together (`kernel::tree`), refused if they share what is carried only within
/// one process, each written with its own plugins and streams (`engine::tree`).
fn checkpoint_tree(manager: &Manager, req: &CheckpointRequest, progress: &mut dyn FnMut(&Tick)) -> Result<Stats, EventError> {
    // One event per process on a thread of its own; one after another (the way it was
    // done first) when FERRY_SERIAL_EVENTS is set, to compare the two.
    if std::env::var_os("FERRY_SERIAL_EVENTS").is_none() {
        return checkpoint_tree_parallel(manager, req);
    }
    let started = Instant::now();
    let created = prepare_dir(&req.dir)?;
    // The plugins must load for the root before anything is frozen.
    drop(event::load_subsystems(manager, &req.subsystems, Some(req.pid))?);
    let medium_lease = manager.acquire(PluginKind::Medium, &req.medium)?;
    let opened = medium_lease.open_medium(&serde_json::json!({"role": "write", "dir": req.dir}))?;
    let mut medium = Pipeline::new(opened);
    let mut janitor = Janitor::start();
    if let Some(j) = janitor.as_mut() {
        j.image(&req.dir, created);
    }
    let give_up = |janitor: Option<Janitor>, e: EventError| {
        discard(&req.dir, created);
        if let Some(j) = janitor {
            j.dismiss();
        }
        Err(e)
    };
    let frozen_at = Instant::now();
    let taken = match req.quiesce {
        Quiesce::Ptrace => tree::freeze_tree(req.pid).map(|f| (f, None)),
        Quiesce::Freezer => tree::freeze_tree_in_cgroup(req.pid).map(|(f, z)| (f, Some(z))),
    };
    let (mut frozen, freezer) = match taken {
        Ok(f) => f,
        Err(e) => return give_up(janitor, e.into()),
    };
    let pids: Vec<i32> = frozen.iter().map(|(t, _)| t.pid()).collect();
    let links: Vec<(i32, i32)> = frozen.iter().map(|(t, parent)| (t.pid(), *parent)).collect();
    let shared = match tree::check_shared(&pids).and_then(|shared| tree::check_groups(&links).map(|_| shared)) {
        Ok(s) => s,
        Err(e) => {
            tree::let_go(frozen);
            return give_up(janitor, e.into());
        }
    };
    crate::trace::mark("tree frozen");
    // The last resort if a plugin stops answering: remove the partial image and exit;
    // the kernel detaches every process, which carries on.
    let dir = req.dir.clone();
    let rescue = freezer.as_ref().map(|f| f.rescue());
    let watchdog = Watchdog::last_resort(req.watchdog, "the processes of the tree are let go".into(), move || {
        discard(&dir, created);
        rescue.into_iter().for_each(|r| r());
    });
    let mut mapped = |pid: i32, addr: u64| {
        if let Some(j) = janitor.as_mut() {
            j.scratch(pid, addr);
        }
    };
    let outcome = crate::engine::tree::write_tree(manager, &req.subsystems, &mut frozen, &shared, &mut medium, &req.medium, &watchdog, &mut mapped, None, false, progress);
    drop(watchdog);
    let mut stats = Stats::default();
    match outcome {
        Ok((bytes, pages)) => {
            if let Some(j) = janitor {
                j.dismiss();
            }
            for (mut t, _) in frozen {
                let pid = t.pid();
                if req.leave_running {
                    t.unmap_scratch()?;
                    t.detach()?;
                } else if freezer.is_some() {
                    // Its cgroup of ferry's can go only once it is empty.
                    t.kill();
                } else {
                    t.kill_and_go();
                }
                stats.pids.insert(pid.to_string(), if req.leave_running { pid } else { 0 });
            }
            drop(freezer);
            stats.frozen_ms = event::ms(frozen_at);
            (stats.bytes, stats.pages) = (bytes, pages);
            stats.total_ms = event::ms(started);
            Ok(stats)
        }
        Err(e) => {
            for (t, _) in frozen.iter_mut() {
                let _ = t.unmap_scratch();
            }
            tree::let_go(frozen);
            drop(freezer);
            drop(medium);
            give_up(janitor, e)
        }
    }
}

/// [`checkpoint_tree`] with a worker thread per process (`engine::workers`).
fn checkpoint_tree_parallel(manager: &Manager, req: &CheckpointRequest) -> Result<Stats, EventError> {
    let started = Instant::now();
    let created = prepare_dir(&req.dir)?;
    // The plugins must load for the root before anything is frozen.
    drop(event::load_subsystems(manager, &req.subsystems, Some(req.pid))?);
    let medium_lease = manager.acquire(PluginKind::Medium, &req.medium)?;
    let opened = medium_lease.open_medium(&serde_json::json!({"role": "write", "dir": req.dir}))?;
    let mut medium = Pipeline::new(opened);
    let mut janitor = Janitor::start();
    if let Some(j) = janitor.as_mut() {
        j.image(&req.dir, created);
    }
    // The last resort if a plugin stops answering: remove the partial image and exit;
    // the kernel detaches every process, which carries on.
    let dir = req.dir.clone();
    let watchdog = Watchdog::last_resort(req.watchdog, "the processes of the tree are let go".into(), move || discard(&dir, created));
    let mut mapped = |pid: i32, addr: u64| {
        if let Some(j) = janitor.as_mut() {
            j.scratch(pid, addr);
        }
    };
    let fate = if req.leave_running { workers::Fate::Run } else { workers::Fate::Kill };
    let frozen_at = Instant::now();
    let freezer = req.quiesce == Quiesce::Freezer;
    let outcome = workers::checkpoint_tree(manager, &req.subsystems, req.pid, freezer, &mut medium, &req.medium, &watchdog, &mut mapped, fate);
    drop(watchdog);
    if let Some(j) = janitor {
        j.dismiss();
    }
    match outcome {
        Ok((bytes, pages, pids)) => {
            let mut stats = Stats::default();
            for pid in pids {
                stats.pids.insert(pid.to_string(), if req.leave_running { pid } else { 0 });
            }
            stats.frozen_ms = event::ms(frozen_at);
            (stats.bytes, stats.pages) = (bytes, pages);
            stats.total_ms = event::ms(started);
            Ok(stats)
        }
        Err(e) => {
            drop(medium);
            discard(&req.dir, created);
            Err(e)
        }
    }
}
