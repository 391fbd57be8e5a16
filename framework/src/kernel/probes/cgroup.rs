//! Probes of the cgroup freezers (v2 `cgroup.freeze`, v1 freezer).

use super::*;

pub(super) fn write_file(path: &Path, value: &str) -> Result<(), String> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| format!("write {value:?} to {}: {e}", path.display()))
}

pub(super) fn read_file(path: &Path) -> Result<String, String> {
    let mut s = String::new();
    File::open(path)
        .and_then(|mut f| f.read_to_string(&mut s))
        .map_err(|e| format!("read {}: {e}", path.display()))?;
    Ok(s)
}

/// Polls `path` until `pred` holds for its content, for at most two seconds.
pub(super) fn wait_file(path: &Path, pred: impl Fn(&str) -> bool) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let s = read_file(path)?;
        if pred(&s) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            return Err(format!("{} still reads {:?}", path.display(), s.trim()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A scratch cgroup holding one child. Drop thaws it, kills and reaps the child, then removes
/// the directory — in that order, because a task frozen by the v1 freezer cannot die.
pub(super) struct ScratchCgroup {
    dir: PathBuf,
    /// (file, value) written on drop to thaw.
    thaw: (&'static str, &'static str),
    child: Option<Child>,
    /// Thaws and removes it should ferry die in the middle of the probe (none if it
    /// could not be started).
    _guardian: Option<crate::kernel::guardian::Guardian>,
}

impl ScratchCgroup {
    fn create(root: &Path, thaw: (&'static str, &'static str)) -> Result<ScratchCgroup, String> {
        // SAFETY: getpid has no preconditions.
        let dir = root.join(format!("ferry-check-{}", unsafe { libc::getpid() }));
        if dir.exists() {
            // Left over from an earlier process with our pid; remove it if it is empty.
            let _ = std::fs::remove_dir(&dir);
        }
        // Started before the directory exists: ferry killed at any instant from here
        // leaves nothing (before, a `ferry check`, or a migration probing, killed
        // here left an empty `ferry-check-<pid>` for good).
        let undo = crate::kernel::guardian::Undo { writes: vec![(dir.join(thaw.0), thaw.1.into())], remove: dir.clone() };
        let guardian = crate::kernel::guardian::Guardian::start(&undo).ok();
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        crate::fault::point("probe-cgroup");
        Ok(ScratchCgroup {
            dir,
            thaw,
            child: None,
            _guardian: guardian,
        })
    }

    /// Forks a child and moves it into the cgroup.
    fn add_child(&mut self) -> Result<libc::pid_t, String> {
        let child = Child::spawn()?;
        let pid = child.pid;
        self.child = Some(child);
        write_file(&self.dir.join("cgroup.procs"), &pid.to_string())?;
        Ok(pid)
    }
}

impl Drop for ScratchCgroup {
    fn drop(&mut self) {
        let _ = write_file(&self.dir.join(self.thaw.0), self.thaw.1);
        drop(self.child.take());
        // The cgroup can stay busy for a moment after its last task is reaped.
        let deadline = Instant::now() + Duration::from_secs(2);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// State letter of `pid` from /proc/PID/stat.
pub(super) fn proc_state(pid: libc::pid_t) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

pub(super) fn probe_cgroup_v2_freeze() -> ProbeResult {
    let mounts = mounts()?;
    let mnt = mounts
        .iter()
        .find(|m| m.fstype == "cgroup2")
        .ok_or("no cgroup2 hierarchy mounted")?;
    let mut cg = ScratchCgroup::create(&mnt.point, ("cgroup.freeze", "0"))?;
    let freeze = cg.dir.join("cgroup.freeze");
    let events = cg.dir.join("cgroup.events");
    if !freeze.exists() {
        return Err(format!(
            "{} does not exist (kernel older than 5.2?)",
            freeze.display()
        ));
    }
    cg.add_child()?;
    let is_frozen = |v: &'static str| move |s: &str| s.lines().any(|l| l == format!("frozen {v}"));
    write_file(&freeze, "1")?;
    wait_file(&events, is_frozen("1"))?;
    write_file(&freeze, "0")?;
    wait_file(&events, is_frozen("0"))?;
    let point = mnt.point.display().to_string();
    drop(cg);
    Ok(format!(
        "froze and thawed a child in a scratch cgroup under {point}"
    ))
}

pub(super) fn probe_cgroup_v1_freezer() -> ProbeResult {
    let mounts = mounts()?;
    let mnt = mounts
        .iter()
        .find(|m| m.fstype == "cgroup" && m.super_opts.split(',').any(|o| o == "freezer"))
        .ok_or("no v1 freezer hierarchy mounted")?;
    let mut cg = ScratchCgroup::create(&mnt.point, ("freezer.state", "THAWED"))?;
    let state = cg.dir.join("freezer.state");
    let pid = cg.add_child()?;
    write_file(&state, "FROZEN")?;
    wait_file(&state, |s| s.trim() == "FROZEN")?;
    let frozen_state = proc_state(pid);
    write_file(&state, "THAWED")?;
    wait_file(&state, |s| s.trim() == "THAWED")?;
    let point = mnt.point.display().to_string();
    drop(cg);
    Ok(format!(
        "froze and thawed a child in a scratch cgroup under {point} (state while frozen: {})",
        frozen_state.unwrap_or('?')
    ))
}
