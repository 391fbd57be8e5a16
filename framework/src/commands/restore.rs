//! `ferry restore`: the process of an image directory rebuilt (by the engine's
//! [`rebuild`](crate::engine::rebuild)) and let go. When the image's own process still
//! holds its pid (it frees its memory after the checkpoint answered), the restore
//! waits for it, so the pid comes back.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use ferry_plugin_api::{MediumBox, PluginKind};

use crate::{
    engine::context::{CountingPull, MediumPull},
    engine::event::{EventError, Stats, Tick},
    engine::manager::Manager,
    engine::rebuild::{rebuild, Held, Plan},
    engine::watchdog::Watchdog,
    image::{Inventory, ProcessEntry, INVENTORY_STREAM},
    kernel::target,
    trust,
};

pub struct RestoreRequest {
    pub dir: PathBuf,
    pub medium: String,
    /// How long the event may go without progress (`watchdog_ms`).
    pub watchdog: std::time::Duration,
}

/// How long the image's own process may take to exit, which it does at memory speed.
const ORIGINAL_EXIT: Duration = Duration::from_secs(10);
/// How long its parent may take to hear of the exit and reap it.
const ORIGINAL_REAP: Duration = Duration::from_millis(100);

/// Whether process `pid` is on its way out: exiting, a zombie, or with a SIGKILL
/// pending (sent, not yet acted on).
fn dying(pid: i32) -> bool {
    const PF_EXITING: u64 = 0x4;
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    let Some(fields) = target::stat_fields(pid) else { return true };
    let state = fields.first().map(String::as_str).unwrap_or("X");
    let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let pending = |key| ferry_plugin_api::util::proc_field(&status, key).and_then(|v| u64::from_str_radix(v, 16).ok()).unwrap_or(0);
    matches!(state, "Z" | "X") || flags & PF_EXITING != 0 || (pending("ShdPnd") | pending("SigPnd")) & SIGKILL_BIT != 0
}

/// A checkpoint kills its process without waiting while the process frees its memory:
/// when the image's own process still holds its pid, wait for it to finish exiting
/// and be reaped, so that the restored process gets the pid back. Another process
/// with the pid, or a parent that does not reap, only costs the pid.
fn await_original(process: &ProcessEntry) {
    let pid = process.pid;
    let same = || !process.start.is_empty() && target::start_stamp(pid).as_deref() == Some(process.start.as_str());
    // One that was left running (`--leave-running`) keeps its pid: take another at once.
    if !same() || !dying(pid) {
        return;
    }
    crate::trace::mark("waiting for the image's own process to exit");
    // SAFETY: pidfd_open takes a pid and flags; the fd is ours and closed below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd >= 0 {
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd; a pidfd turns readable when its process has exited.
        unsafe {
            libc::poll(&mut p, 1, ORIGINAL_EXIT.as_millis() as i32);
            libc::close(fd);
        }
    }
    let deadline = Instant::now() + ORIGINAL_REAP;
    while same() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Restores the image in directory `req.dir` and lets it run.
pub fn restore(manager: &Manager, req: &RestoreRequest, progress: &mut dyn FnMut(&Tick)) -> Result<Stats, EventError> {
    let started = Instant::now();
    crate::kernel::target::check_privileges().map_err(EventError::Failed)?;
    let medium_lease = manager.acquire(PluginKind::Medium, &req.medium)?;
    if !req.dir.is_dir() {
        return Err(EventError::ImageDir { path: req.dir.display().to_string(), message: "no such directory".into() });
    }
    check_trusted(&req.dir)?;
    let mut medium = medium_lease.open_medium(&serde_json::json!({"role": "read", "dir": req.dir}))?;
    let dir = req.dir.display().to_string();
    // The last resort if a plugin stops answering: kill the half-built child and go.
    let watchdog = Watchdog::start(req.watchdog, |why, victim| {
        eprintln!("ferry: {why}; the half-built process is removed");
        if victim > 0 {
            // SAFETY: killing the restore child this event created.
            unsafe { libc::kill(victim, libc::SIGKILL) };
        }
        std::process::exit(1);
    });
    let image_err = |e: EventError| match e {
        EventError::Image(e) => EventError::ImageDir { path: req.dir.display().to_string(), message: e.to_string() },
        other => other,
    };
    let mut inventory_bytes = 0;
    let pull = MediumPull { medium: &mut medium, stream: INVENTORY_STREAM };
    let inventory = Inventory::read_from(&mut CountingPull { inner: pull, bytes: &mut inventory_bytes }).map_err(|e| image_err(e.into()))?;
    // A process with zombie children is a tree too: they are made from it.
    if inventory.processes.len() > 1 || inventory.processes.iter().any(|p| !p.zombies.is_empty()) {
        // A process tree: every process rebuilt and held, then all let go.
        for p in &inventory.processes {
            await_original(p);
        }
        let mut held = crate::engine::tree::restore_tree(manager, &mut medium, &inventory, None, true, &watchdog, started, progress).map_err(image_err)?;
        held[0].count_inventory(inventory_bytes);
        if held.iter().any(|h| h.lazy.is_some()) {
            for h in held {
                h.abort();
            }
            return Err(EventError::ImageDir { path: req.dir.display().to_string(), message: "it leaves memory to post-copy, which only a migration carries".into() });
        }
        return crate::engine::tree::release_tree(held, started);
    }
    let held = restore_one(manager, &mut medium, inventory, inventory_bytes, &watchdog, started, progress).map_err(|e| match e {
        EventError::Image(e) => EventError::ImageDir { path: dir, message: e.to_string() },
        other => other,
    })?;
    if held.lazy.is_some() {
        held.abort();
        return Err(EventError::ImageDir { path: req.dir.display().to_string(), message: "it leaves memory to post-copy, which only a migration carries".into() });
    }
    crate::fault::point("restore-restart");
    held.release()
}

/// An image is trusted input to a restore run as root (its records say what to map,
/// where, and which files to open): refused when anyone but root or the caller could
/// have changed the directory or anything in it.
fn check_trusted(dir: &Path) -> Result<(), EventError> {
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        if let Some(why) = trust::changeable_by_others(&path) {
            let what = if path == dir { String::new() } else { format!("{}: ", path.display()) };
            return Err(EventError::ImageDir {
                path: dir.display().to_string(),
                message: format!("{what}{why}: refusing to restore from it"),
            });
        }
        if path.is_dir() {
            let entries = std::fs::read_dir(&path).map_err(|e| EventError::ImageDir { path: path.display().to_string(), message: e.to_string() })?;
            pending.extend(entries.flatten().map(|e| e.path()));
        }
    }
    Ok(())
}

/// Rebuilds the process of the image carried by `medium` and holds it stopped.
fn restore_one(
    manager: &Manager,
    medium: &mut MediumBox,
    inventory: Inventory,
    inventory_bytes: u64,
    watchdog: &Watchdog,
    started: Instant,
    progress: &mut dyn FnMut(&Tick),
) -> Result<Held, EventError> {
    let plan = Plan::from_inventory(&inventory)?;
    // Not for a migration: its source lives on until the destination's copy runs.
    await_original(&plan.process);
    let mut held = rebuild(manager, medium, &plan, true, None, watchdog, started, progress)?;
    held.count_inventory(inventory_bytes);
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pid: i32, start: String) -> ProcessEntry {
        ProcessEntry { pid, tids: vec![pid], comm: "sleep".into(), scratch: 0, start, stopped: false, parent: 0, streams: Vec::new(), shared_fds: Vec::new(), pgid: 0, sid: 0, exit_signal: None, zombies: Vec::new(), subreaper: false }
    }

    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep").arg("30").spawn().expect("sleep(1) runs")
    }

    #[test]
    fn a_restore_waits_for_the_image_s_own_process_to_exit_and_be_reaped() {
        let mut child = sleeper();
        let pid = child.id() as i32;
        let original = entry(pid, target::start_stamp(pid).expect("the child's stamp"));
        // Killed (as the checkpoint does before it answers), and reaped by its parent a
        // moment later.
        child.kill().unwrap();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let _ = child.wait();
        });
        await_original(&original);
        let gone = target::start_stamp(pid).as_deref() != Some(original.start.as_str());
        killer.join().unwrap();
        assert!(gone, "await_original returned while the image's own process held its pid");
    }

    #[test]
    fn a_process_left_running_is_not_waited_for() {
        // `checkpoint --leave-running`: the image's own process runs on with its pid.
        let mut child = sleeper();
        let pid = child.id() as i32;
        assert!(!dying(pid));
        let t = Instant::now();
        await_original(&entry(pid, target::start_stamp(pid).expect("the child's stamp")));
        let waited = t.elapsed();
        let _ = child.kill();
        assert!(dying(pid), "killed and not reaped yet");
        let _ = child.wait();
        assert!(waited < ORIGINAL_EXIT / 2, "waited {waited:?} for a process that was left running");
    }

    #[test]
    fn another_process_with_the_pid_is_not_waited_for() {
        let mut child = sleeper();
        let pid = child.id() as i32;
        let t = Instant::now();
        await_original(&entry(pid, "another-boot/1".into()));
        await_original(&entry(pid, String::new()));
        let waited = t.elapsed();
        let _ = child.kill();
        let _ = child.wait();
        assert!(waited < ORIGINAL_EXIT / 2, "waited {waited:?} for a process the image is not of");
    }
}
