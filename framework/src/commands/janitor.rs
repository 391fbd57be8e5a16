//! The janitor of a checkpoint, and of the source of a migration: `ferry janitor`, a
//! process of its own that outlives a ferry killed in the middle of one (SIGKILL, the
//! OOM killer, `FERRY_FAULT`) and puts
//! back what the guardian (kernel/guardian.rs, which takes the process home from
//! ferry's cgroup) cannot with raw system calls alone: it removes ferry's scratch area
//! from the process (a ptrace injection) and a checkpoint's partial image. ferry tells it what
//! there is to undo, a line at a time, on its standard input; `done` dismisses it, and
//! the end of the pipe without `done` means ferry died (or gave up without cleaning up).

use std::{
    io::{BufRead, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use crate::kernel::tracer::{Tracer, SCRATCH_SIZE};

/// ferry's side: the running janitor and the pipe to it.
pub struct Janitor {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl Janitor {
    /// Starts the janitor; `None` (and the checkpoint goes on without one) if it cannot.
    pub fn start() -> Option<Janitor> {
        let exe = std::env::current_exe().ok()?;
        let mut cmd = Command::new(exe);
        cmd.arg("janitor").stdin(Stdio::piped()).stdout(Stdio::null());
        // SAFETY: setsid is async-signal-safe. Its own session: a ^C meant for ferry
        // must not take the janitor along before it has cleaned up.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn().ok()?;
        let pipe = child.stdin.take();
        Some(Janitor { child, pipe })
    }

    fn tell(&mut self, line: String) {
        if let Some(p) = self.pipe.as_mut() {
            let _ = writeln!(p, "{line}");
        }
    }

    /// The image directory being written; `created`: by this checkpoint.
    pub fn image(&mut self, dir: &Path, created: bool) {
        self.tell(format!("image {} {}", u8::from(created), dir.display()));
    }

    /// ferry's scratch area at `addr` in process `pid` (one line per process).
    pub fn scratch(&mut self, pid: i32, addr: u64) {
        self.tell(format!("scratch {pid} {addr}"));
    }

    /// The event ended and ferry cleaned up after itself: nothing for the janitor to do.
    pub fn dismiss(mut self) {
        self.tell("done".into());
        drop(self.pipe.take());
        let _ = self.child.wait();
    }

    /// The event failed and ferry undid what it could: the janitor makes sure (what it
    /// was told of is gone) on its own, without ferry waiting for it.
    pub fn check(mut self) {
        self.tell("check".into());
        drop(self.pipe.take());
    }
}

/// What the janitor was told to undo.
#[derive(Default, Debug)]
struct Undo {
    image: Option<(PathBuf, bool)>,
    /// One per process (a checkpoint of a tree maps one in each).
    scratch: Vec<(i32, u64)>,
    /// ferry is alive and undid what it could, every call it injected finished.
    checked: bool,
}

impl Undo {
    /// Takes one line of ferry's; `true` once dismissed.
    fn take(&mut self, line: &str) -> bool {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "done" => return true,
            "check" => self.checked = true,
            "image" => {
                if let Some((created, dir)) = rest.split_once(' ') {
                    self.image = Some((PathBuf::from(dir), created == "1"));
                }
            }
            "scratch" => {
                let mut f = rest.split(' ').map(str::parse::<u64>);
                if let (Some(Ok(pid)), Some(Ok(addr))) = (f.next(), f.next()) {
                    // Told again (a migration tells it before each mapping): once.
                    if !self.scratch.contains(&(pid as i32, addr)) {
                        self.scratch.push((pid as i32, addr));
                    }
                }
            }
            _ => {}
        }
        false
    }
}

/// `ferry janitor`: reads what to undo until `done` (nothing to do) or the end of its
/// input (ferry is gone: undo it all).
pub fn run() -> Result<(), String> {
    let mut undo = Undo::default();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if undo.take(&line) {
            return Ok(());
        }
    }
    // Never for ever: it holds ferry's stderr, which whoever ran ferry may read to its
    // end. SIGALRM ends it after a minute, whatever it waits for.
    // SAFETY: alarm has no preconditions.
    unsafe { libc::alarm(60) };
    // Silent when all goes well: ferry said what happened, if it could.
    let mut failed = Vec::new();
    for (pid, addr) in undo.scratch {
        match remove_scratch(pid, addr, undo.checked) {
            Ok(_) => {}
            Err(e) => failed.push(format!("ferry's scratch area at {addr:#x} is left in process {pid}: {e}")),
        }
    }
    if let Some((dir, created)) = &undo.image {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        if *created {
            let _ = std::fs::remove_dir(dir);
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("janitor of an event whose ferry is gone: {}", failed.join("; ")))
    }
}

/// Whether process `pid` (whose /proc status is `status`) is on its way out: exiting,
/// a zombie, or with a SIGKILL pending.
fn dying(pid: i32, status: &str) -> bool {
    const PF_EXITING: u64 = 0x4;
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    let Some(fields) = crate::kernel::target::stat_fields(pid) else { return true };
    let state = fields.first().map(String::as_str).unwrap_or("X");
    let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
    let pending = |key| ferry_plugin_api::util::proc_field(status, key).and_then(|v| u64::from_str_radix(v, 16).ok()).unwrap_or(0);
    matches!(state, "Z" | "X") || flags & PF_EXITING != 0 || (pending("ShdPnd") | pending("SigPnd")) & SIGKILL_BIT != 0
}

/// Unmaps ferry's scratch area at `addr` from `pid`, once the dead ferry's tracing has
/// ended; `false` when there is nothing (left) to remove.
fn remove_scratch(pid: i32, addr: u64, checked: bool) -> Result<bool, String> {
    let status = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/status")).ok();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let Some(s) = status(pid) else { return Ok(false) };
        if dying(pid, &s) {
            // Killed with its ferry (a migrated source that had committed): nothing to
            // put back, and a dying process would never report the seize's stop.
            return Ok(false);
        }
        let tracer = s.lines().find_map(|l| l.strip_prefix("TracerPid:")).map(str::trim);
        if tracer == Some("0") {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("it is still traced ({s:?})"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // Only the very area ferry made: its address, size and rwxp anonymous mapping.
    let head = format!("{addr:x}-{:x} rwxp 00000000 00:00 0", addr + SCRATCH_SIZE);
    let ours = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|m| m.lines().any(|l| l.starts_with(&head)))
    };
    // A ferry that died in the middle of an injected call let the thread go into it:
    // the call (the very mmap that makes the area, say) completes only as the thread
    // runs on, perhaps after this look. The seize below stops each thread past any call
    // in flight; only a ferry alive that undid what it could spares it.
    if checked && !ours(pid) {
        return Ok(false);
    }
    // A thread the dead ferry let go in the middle of an injected call runs the
    // recovery code in the scratch area (a few dozen instructions back to its own
    // code): the area goes only once no thread is inside it.
    let mut tries = 0;
    let mut tracer = loop {
        let mut tracer = Tracer::seize(pid).map_err(|e| e.to_string())?;
        let inside = tracer
            .tids()
            .into_iter()
            .any(|tid| tracer.saved_regs(tid).is_ok_and(|r| r.rip.wrapping_sub(addr) < SCRATCH_SIZE));
        if !inside {
            break tracer;
        }
        tracer.detach().map_err(|e| e.to_string())?;
        tries += 1;
        if tries > 100 {
            return Err("a thread stays inside it".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    if !ours(pid) {
        tracer.detach().map_err(|e| e.to_string())?;
        return Ok(false);
    }
    tracer.set_scratch(Some(addr));
    let removed = tracer.unmap_scratch().map_err(|e| e.to_string());
    tracer.detach().map_err(|e| e.to_string())?;
    removed.map(|_| true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_what_ferry_tells_it() {
        let mut u = Undo::default();
        assert!(!u.take("image 1 /tmp/an image"));
        assert!(!u.take("scratch 42 140737488289792"));
        assert!(!u.take("nonsense"));
        assert_eq!(u.image, Some((PathBuf::from("/tmp/an image"), true)));
        assert!(!u.take("scratch 43 140737488289793"));
        assert!(!u.take("scratch 43 140737488289793"));
        assert_eq!(u.scratch, vec![(42, 140737488289792), (43, 140737488289793)]);
        assert!(!u.checked);
        assert!(!u.take("check"));
        assert!(u.checked);
        assert!(u.take("done"));
    }
}
