//! `ferry daemon`: the long-running process on a destination machine. It holds the
//! plugin registry, serves the control socket, and accepts migrations on its listen
//! address — each one an isolated event on a thread of its own — logging one line
//! per event.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    sync::Arc,
    time::{Duration, Instant},
};

use nix::sys::signal::{SigSet, Signal};

use crate::{
    commands::control,
    commands::doorway::Doorway,
    commands::serve,
    engine::manager::Manager,
    kernel::probes,
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Manager(#[from] crate::engine::manager::ManagerError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("cannot wait for signals: {0}")]
    Signals(nix::Error),
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: String, message: String },
    #[error("--stats {0}: no such directory")]
    Stats(PathBuf),
    #[error("listening on {0}, beyond loopback, needs --auth-key: whoever reaches the daemon can run code as root")]
    NeedsKey(SocketAddr),
}

pub struct DaemonOptions {
    pub plugin_dir: PathBuf,
    pub control: PathBuf,
    /// Where migrations arrive; none: the control socket only.
    pub listen: Option<String>,
    pub auth_key: Option<Vec<u8>>,
    /// How long an event waits on a silent peer.
    pub timeout: Duration,
    /// Where to write one JSON file of statistics per event (`<token>.json`).
    pub stats: Option<PathBuf>,
}

/// Runs the daemon until SIGTERM or SIGINT, then removes its control socket.
pub fn run(opts: &DaemonOptions) -> Result<(), DaemonError> {
    // Signals are taken synchronously by this thread; every thread spawned below
    // inherits the blocked mask, so none of them is interrupted by them.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    stop.thread_block().map_err(DaemonError::Signals)?;

    // A statistics directory that is not there would fail every event, later.
    if let Some(dir) = &opts.stats {
        if !dir.is_dir() {
            return Err(DaemonError::Stats(dir.clone()));
        }
    }
    // Refuse a listener others could reach before doing anything else.
    let listener = match &opts.listen {
        Some(addr) => {
            let parsed: SocketAddr =
                addr.parse().map_err(|e| DaemonError::Listen { addr: addr.clone(), message: format!("{e}") })?;
            if !parsed.ip().is_loopback() && opts.auth_key.is_none() {
                return Err(DaemonError::NeedsKey(parsed));
            }
            let listener =
                TcpListener::bind(parsed).map_err(|e| DaemonError::Listen { addr: addr.clone(), message: e.to_string() })?;
            // Said before the control socket's line: once that is logged, this one is too
            // (connections meanwhile wait in the backlog).
            log(&format!("listening for migrations on {addr}"));
            Some(listener)
        }
        None => None,
    };

    // What a ferry killed before it could clean up left: empty cgroups of ferry's
    // whose ferry is gone (never one another program made, nor a live ferry's).
    let (removed, left) = crate::kernel::freezer::remove_stale();
    for c in removed {
        log(&format!("removed the stale cgroup {} (its ferry is gone)", c.display()));
    }
    for l in left {
        log(&format!("a stale cgroup of ferry's still holds a process: {l}"));
    }
    let manager = Manager::new();
    let found = manager.discover(&opts.plugin_dir)?;
    let registered = found.iter().filter(|f| f.meta.is_some()).count();
    log(&format!("registered {registered} plugin(s) from {}", opts.plugin_dir.display()));
    for f in found.iter().filter(|f| f.meta.is_none()) {
        log(&format!("{}: {}", f.path.display(), f.status));
    }
    let control_listener = control::bind(&opts.control)?;
    log(&format!("control socket {}", opts.control.display()));
    let server = manager.clone();
    spawn("ferry-control", &opts.control, move || control::serve(control_listener, server))?;

    if let Some(listener) = listener {
        let features: Vec<String> =
            probes::probe_all().into_iter().filter(|f| f.present).map(|f| f.name.to_string()).collect();
        let key = opts.auth_key.clone().map(Arc::new);
        let timeout = opts.timeout;
        let features = Arc::new(features);
        let next_id = Arc::new(AtomicU64::new(1));
        let manager = manager.clone();
        let stats = opts.stats.clone();
        let doorway = Arc::new(Doorway::default());
        let keeper = doorway.clone();
        spawn("ferry-door", &opts.control, move || {
            keeper.keep(Duration::from_secs(10), |closed| {
                log(&format!("closed {closed} connection(s) that did not shake hands in time or crowded the door"))
            })
        })?;
        spawn("ferry-listen", &opts.control, move || {
            let mut last_report = Instant::now();
            for conn in listener.incoming() {
                let stream = match conn {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of descriptors (EMFILE), say: a retry at once would spin.
                        if last_report.elapsed() >= Duration::from_secs(1) {
                            log(&format!("accepting a connection: {e}; backing off"));
                            last_report = Instant::now();
                        }
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let (manager, key, features, stats) = (manager.clone(), key.clone(), features.clone(), stats.clone());
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                doorway.admit(id, &stream);
                let door = doorway.clone();
                let _ = std::thread::Builder::new().name(format!("ferry-event-{id}")).spawn(move || {
                    let key = key.as_deref().map(|k| k.as_slice());
                    let record = serve::serve(&manager, stream, key, &features, id, timeout, &mut || door.passed(id));
                    door.passed(id);
                    // A connection closed before it said who it is is not an event.
                    if record.token.is_none() && record.detail.contains("closed the connection") {
                        return;
                    }
                    log(&record.line());
                    if let (Some(dir), Some(token)) = (&stats, &record.token) {
                        // Written aside and renamed: a reader never sees half a file.
                        let path = dir.join(format!("{token}.json"));
                        let part = dir.join(format!(".{token}.json.part"));
                        let json = serde_json::to_vec_pretty(&record).unwrap_or_default();
                        if let Err(e) = std::fs::write(&part, json).and_then(|_| std::fs::rename(&part, &path)) {
                            log(&format!("cannot write {}: {e}", path.display()));
                        }
                    }
                });
            }
        })?;
    }

    let signal = stop.wait().map_err(DaemonError::Signals)?;
    remove_socket(&opts.control);
    log(&format!("stopping on {signal:?}"));
    Ok(())
}

fn spawn(name: &str, control: &Path, f: impl FnOnce() + Send + 'static) -> Result<(), DaemonError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(|_| ())
        .map_err(|e| DaemonError::Control(control::ControlError::Io { path: control.to_path_buf(), message: e.to_string() }))
}

fn remove_socket(path: &Path) {
    let _ = std::fs::remove_file(path);
}

fn log(line: &str) {
    crate::trace::daemon_log(line);
}
