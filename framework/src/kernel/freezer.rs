//! Quiescing a process for an event. Synchronous quiescing is the tracer's
//! `PTRACE_INTERRUPT`; asynchronous quiescing moves the process into a cgroup of
//! ferry's and freezes it (v2 `cgroup.freeze`, else the v1 freezer), so its thread
//! list stands still while it is seized. The process goes back to its own cgroup
//! when the event ends, whatever happened.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::kernel::{
    guardian::{Guardian, Undo},
    mounts::mounts,
};

#[derive(Debug, thiserror::Error)]
#[error("freezer: {0}")]
pub struct FreezeError(String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    V2,
    V1,
}

/// A process moved into a cgroup of ferry's for an event; dropping it moves the
/// process back home (a process that died meanwhile has nothing to move) and removes
/// the cgroup.
pub(crate) struct Placement {
    pub pid: i32,
    pub ours: PathBuf,
    home: PathBuf,
    /// It made the cgroup, and removes it.
    owner: bool,
    /// Puts the process back if ferry dies first (none if it could not be started:
    /// the placement still works, only without that net).
    _guardian: Option<Guardian>,
}

impl Placement {
    /// Moves `pid` from its cgroup under `root` (`rel`, as /proc/PID/cgroup says) into
    /// a fresh `<root>/ferry-<what>-<pid>-<ferry's pid>`.
    pub fn enter(pid: i32, root: &Path, rel: &str, what: &str) -> Result<Placement, FreezeError> {
        let home = root.join(rel.trim_start_matches('/'));
        let ours = root.join(format!("ferry-{what}{pid}-{}", std::process::id()));
        let p = Placement::held(pid, home, ours, true)?;
        write(&p.ours.join("cgroup.procs"), &pid.to_string())?;
        Ok(p)
    }

    /// Another process of a tree in the cgroup `ours` of the tree's first placement:
    /// moved there from `home` (or found there already, forked in it: `home` is then its
    /// parent's). It goes home when dropped; the cgroup stays for the first placement
    /// to remove.
    pub fn join(pid: i32, home: PathBuf, ours: &Path, moved: bool) -> Result<Placement, FreezeError> {
        let p = Placement::held(pid, home, ours.to_path_buf(), false)?;
        if moved {
            write(&p.ours.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(p)
    }

    fn held(pid: i32, home: PathBuf, ours: PathBuf, create: bool) -> Result<Placement, FreezeError> {
        // Thawed (whichever freezer), moved home, the cgroup removed (once empty). The
        // guardian starts before the directory exists: no instant leaves it behind.
        let undo = Undo {
            writes: vec![
                (ours.join("cgroup.freeze"), "0".into()),
                (ours.join("freezer.state"), "THAWED".into()),
                (home.join("cgroup.procs"), pid.to_string()),
            ],
            remove: ours.clone(),
        };
        let guardian = Guardian::start(&undo).ok();
        if create {
            std::fs::create_dir(&ours).map_err(|e| FreezeError(format!("creating {}: {e}", ours.display())))?;
        }
        Ok(Placement { pid, ours, home, owner: create, _guardian: guardian })
    }

    /// What puts the process back home from another thread, when the event's own
    /// thread is stuck (the watchdog's last resort).
    pub fn rescue(&self) -> impl FnOnce() + Send + 'static {
        let (pid, home, ours) = (self.pid, self.home.clone(), self.ours.clone());
        move || {
            let _ = std::fs::write(home.join("cgroup.procs"), pid.to_string());
            let _ = std::fs::remove_dir(ours);
        }
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        let _ = std::fs::write(self.home.join("cgroup.procs"), self.pid.to_string());
        if !self.owner {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.ours).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A process held in a cgroup of ferry's (with its descendants, for a tree).
pub struct Freezer {
    pid: i32,
    flavor: Flavor,
    /// The other processes of a tree: sent home before `place` removes the cgroup
    /// (fields drop in order).
    members: Vec<Placement>,
    place: Placement,
    frozen: bool,
}

pub(crate) fn write(path: &Path, value: &str) -> Result<(), FreezeError> {
    std::fs::write(path, value).map_err(|e| FreezeError(format!("writing {value:?} to {}: {e}", path.display())))
}

fn read(path: &Path) -> Result<String, FreezeError> {
    std::fs::read_to_string(path).map_err(|e| FreezeError(format!("reading {}: {e}", path.display())))
}

/// Where the process sits now in the hierarchy mounted at `root`.
pub(crate) fn cgroup_of(pid: i32, v1_controller: Option<&str>) -> Result<String, FreezeError> {
    let text = read(Path::new(&format!("/proc/{pid}/cgroup")))?;
    text.lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            let wanted = match v1_controller {
                None => controllers.is_empty(),
                Some(c) => controllers.split(',').any(|x| x == c),
            };
            wanted.then(|| path.to_string())
        })
        .ok_or_else(|| FreezeError(format!("process {pid} is in no {} cgroup", v1_controller.unwrap_or("v2"))))
}

impl Freezer {
    /// Moves `pid` into a fresh cgroup of ferry's and freezes it.
    pub fn freeze(pid: i32) -> Result<Freezer, FreezeError> {
        let (flavor, root, rel) = Self::locate(pid)?;
        let place = Placement::enter(pid, &root, &rel, "")?;
        let mut f = Freezer { pid, flavor, members: Vec::new(), place, frozen: false };
        f.set_frozen(true)?;
        Ok(f)
    }

    /// Moves `pid` and every descendant (`children` lists a process's) into one cgroup
    /// of ferry's and freezes it: a child forked meanwhile is born in it, or was forked
    /// before its parent moved and is seen by the next pass; the passes go on until one
    /// finds the whole tree in the frozen cgroup. Each process goes back to its own
    /// cgroup when dropped (one forked in ours, to its parent's).
    pub fn freeze_tree(pid: i32, children: impl Fn(i32) -> Vec<i32>) -> Result<Freezer, FreezeError> {
        let (flavor, root, rel) = Self::locate(pid)?;
        let place = Placement::enter(pid, &root, &rel, "")?;
        let ours_name = place.ours.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut f = Freezer { pid, flavor, members: Vec::new(), place, frozen: false };
        let inside = |p: i32| cgroup_of(p, (flavor == Flavor::V1).then_some("freezer")).is_ok_and(|c| c.ends_with(&format!("/{ours_name}")));
        for _ in 0..100 {
            let mut missing = false;
            // Parents before children: a child's home is its parent's when it was born here.
            let mut pending = vec![(pid, f.place.home.clone())];
            while let Some((parent, home)) = pending.pop() {
                for child in children(parent) {
                    let known = f.members.iter().find(|m| m.pid == child).map(|m| m.home.clone());
                    let child_home = match known {
                        Some(h) => h,
                        None => {
                            let moved = !inside(child);
                            let h = if moved {
                                let rel = cgroup_of(child, (flavor == Flavor::V1).then_some("freezer"))?;
                                root.join(rel.trim_start_matches('/'))
                            } else {
                                home.clone()
                            };
                            missing |= moved;
                            match Placement::join(child, h.clone(), &f.place.ours, moved) {
                                Ok(m) => f.members.push(m),
                                // Gone as it was seen.
                                Err(_) if !Path::new(&format!("/proc/{child}")).exists() => continue,
                                Err(e) => return Err(e),
                            }
                            h
                        }
                    };
                    pending.push((child, child_home));
                }
            }
            if !missing && f.frozen {
                return Ok(f);
            }
            f.set_frozen(true)?;
        }
        Err(FreezeError(format!("the tree of process {pid} kept growing outside the freezer's cgroup")))
    }

    fn locate(pid: i32) -> Result<(Flavor, PathBuf, String), FreezeError> {
        let all = mounts().map_err(FreezeError)?;
        let v2 = all.iter().find(|m| m.fstype == "cgroup2").map(|m| m.point.clone());
        let v1 = all
            .iter()
            .find(|m| m.fstype == "cgroup" && m.super_opts.split(',').any(|o| o == "freezer"))
            .map(|m| m.point.clone());
        let (flavor, root, rel) = match (v2, v1) {
            (Some(root), _) if root.join("cgroup.freeze").exists() || has_freeze(&root) => {
                (Flavor::V2, root, cgroup_of(pid, None)?)
            }
            (_, Some(root)) => (Flavor::V1, root, cgroup_of(pid, Some("freezer"))?),
            _ => return Err(FreezeError("no cgroup v2 freeze and no v1 freezer on this machine".into())),
        };
        Ok((flavor, root, rel))
    }

    fn set_frozen(&mut self, frozen: bool) -> Result<(), FreezeError> {
        type Done = dyn Fn(&str) -> bool;
        let (file, value, done_file, done): (&str, &str, &str, &Done) = match (self.flavor, frozen) {
            (Flavor::V2, true) => ("cgroup.freeze", "1", "cgroup.events", &|s| s.lines().any(|l| l == "frozen 1")),
            (Flavor::V2, false) => ("cgroup.freeze", "0", "cgroup.events", &|s| s.lines().any(|l| l == "frozen 0")),
            (Flavor::V1, true) => ("freezer.state", "FROZEN", "freezer.state", &|s| s.trim() == "FROZEN"),
            (Flavor::V1, false) => ("freezer.state", "THAWED", "freezer.state", &|s| s.trim() == "THAWED"),
        };
        write(&self.place.ours.join(file), value)?;
        self.frozen = frozen;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut pause = Duration::from_micros(50);
        loop {
            let now = read(&self.place.ours.join(done_file))?;
            if done(&now) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(FreezeError(format!("process {} did not reach {file}={value} in 10 s", self.pid)));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    /// What puts the process back home from another thread, when the event's own
    /// thread is stuck (the watchdog's last resort).
    pub fn rescue(&self) -> impl FnOnce() + Send + 'static {
        self.place.rescue()
    }

    /// Whether a frozen process enters a ptrace stop without a thaw (the v2 freeze; with
    /// the v1 freezer the stops come only after it).
    pub fn stops_while_frozen(&self) -> bool {
        self.flavor == Flavor::V2
    }

    /// Thaws the cgroup (the process stays in it until dropped).
    pub fn thaw(&mut self) -> Result<(), FreezeError> {
        if self.frozen {
            self.set_frozen(false)?;
        }
        Ok(())
    }
}

fn has_freeze(root: &Path) -> bool {
    // The root cgroup has no cgroup.freeze; a child of it does when v2 freezing exists.
    std::fs::read_to_string(root.join("cgroup.controllers")).is_ok()
        && std::fs::metadata(root.join("cgroup.procs")).is_ok()
}

impl Drop for Freezer {
    fn drop(&mut self) {
        // Thawed first; the placement then takes the process home.
        let _ = self.thaw();
    }
}

/// The ferry process a cgroup's name says made it — `ferry-<pid>-<ferry>` (the freezer),
/// `ferry-throttle-<pid>-<ferry>` (auto-converge), `ferry-check-<ferry>` (a probe) —
/// or `None` for any other name: never one of ferry's.
fn maker_of(name: &str) -> Option<i32> {
    let number = |s: &str| (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse::<i32>().ok()).flatten();
    if let Some(rest) = name.strip_prefix("ferry-check-") {
        return number(rest);
    }
    let rest = name.strip_prefix("ferry-throttle-").or_else(|| name.strip_prefix("ferry-"))?;
    let (pid, by) = rest.split_once('-')?;
    number(pid)?;
    number(by)
}

/// Whether `pid` is a running ferry process (its program is called `ferry`).
fn is_ferry(pid: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|n| n == "ferry" || n.starts_with("ferry "))
}

/// Removes the empty cgroups ferry left in any hierarchy when it died before it could
/// (killed while it made one, say): only those whose name says a ferry process made
/// them and that process is no longer a ferry one. A cgroup still holding a process is
/// left (rmdir refuses it) and reported. Answers (removed, left with the reason).
pub fn remove_stale() -> (Vec<PathBuf>, Vec<String>) {
    let (mut removed, mut left) = (Vec::new(), Vec::new());
    let roots: Vec<PathBuf> = mounts()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.fstype == "cgroup" || m.fstype == "cgroup2")
        .map(|m| m.point)
        .collect();
    for root in roots {
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(maker) = maker_of(&name) else { continue };
            if !e.file_type().is_ok_and(|t| t.is_dir()) || maker as u32 == std::process::id() || is_ferry(maker) {
                continue;
            }
            match std::fs::remove_dir(e.path()) {
                Ok(()) => removed.push(e.path()),
                Err(err) => left.push(format!("{} (its ferry, pid {maker}, is gone): {err}", e.path().display())),
            }
        }
    }
    (removed, left)
}

#[cfg(test)]
mod tests {
    #[test]
    fn knows_ferrys_cgroup_names_and_who_made_them() {
        use super::maker_of;
        assert_eq!(maker_of("ferry-12-34"), Some(34));
        assert_eq!(maker_of("ferry-throttle-12-34"), Some(34));
        assert_eq!(maker_of("ferry-check-34"), Some(34));
        for other in ["ferry-a-34", "ferry-12-", "ferry-12-3x", "ferry-check-", "ferry-34", "ferrya-12-34", "user.slice", "ferry-throttle-x-1"] {
            assert_eq!(maker_of(other), None, "{other}");
        }
    }
}
