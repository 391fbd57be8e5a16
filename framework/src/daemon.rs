//! `ferry daemon`: the long-running process on a destination machine. It holds the
//! plugin registry and serves the control socket; migrations arrive in a later layer.

use std::path::{Path, PathBuf};

use nix::sys::signal::{SigSet, Signal};

use crate::{control, manager::Manager};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Manager(#[from] crate::manager::ManagerError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("cannot wait for signals: {0}")]
    Signals(nix::Error),
}

pub struct DaemonOptions {
    pub plugin_dir: PathBuf,
    pub control: PathBuf,
}

/// Runs the daemon until SIGTERM or SIGINT, then removes its control socket.
pub fn run(opts: &DaemonOptions) -> Result<(), DaemonError> {
    // Signals are taken synchronously by this thread; every thread spawned below
    // inherits the blocked mask, so none of them is interrupted by them.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    stop.thread_block().map_err(DaemonError::Signals)?;

    let manager = Manager::new();
    let found = manager.discover(&opts.plugin_dir)?;
    let registered = found.iter().filter(|f| f.meta.is_some()).count();
    log(&format!("registered {registered} plugin(s) from {}", opts.plugin_dir.display()));
    for f in found.iter().filter(|f| f.meta.is_none()) {
        log(&format!("{}: {}", f.path.display(), f.status));
    }
    let listener = control::bind(&opts.control)?;
    log(&format!("control socket {}", opts.control.display()));
    let server = manager.clone();
    std::thread::Builder::new()
        .name("ferry-control".into())
        .spawn(move || control::serve(listener, server))
        .map_err(|e| control::ControlError::Io { path: opts.control.clone(), message: e.to_string() })?;

    let signal = stop.wait().map_err(DaemonError::Signals)?;
    remove_socket(&opts.control);
    log(&format!("stopping on {signal:?}"));
    Ok(())
}

fn remove_socket(path: &Path) {
    let _ = std::fs::remove_file(path);
}

fn log(line: &str) {
    eprintln!("ferry daemon: {line}");
}
