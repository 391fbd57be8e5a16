//! The watchdog of an event (paper, section 4.2). Every sign of life — a plugin step,
//! a call into the process context, a record written or read — is a beat. A plugin
//! that keeps answering "more" without its status moving is caught in the worker loop
//! (`Watchdog::check_status`), and goes through `fault` and `dump` like any error. A
//! plugin that stops answering at all is caught by the watchdog's own thread, which
//! runs the event's last-resort action: the tracer thread is stuck inside the plugin,
//! so that action must work from another thread (kill a half-built restore child,
//! remove a partial image, exit so the kernel detaches the target).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

struct Shared {
    started: Instant,
    /// Milliseconds since `started` of the last beat.
    last: AtomicU64,
    /// A process this event created, for the last resort to kill (0: none).
    victim: AtomicI32,
    stop: AtomicBool,
    /// What the event is doing, for the message.
    doing: Mutex<String>,
}

pub struct Watchdog {
    shared: Arc<Shared>,
    limit: Duration,
    monitor: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// The last resort of a command if a plugin stops answering: says why and what
    /// becomes of the processes (`then`), runs `undo` (a partial image removed, a cgroup
    /// left), and exits 1; the kernel then detaches whatever ferry held.
    pub fn last_resort(limit: Duration, then: String, undo: impl FnOnce() + Send + 'static) -> Watchdog {
        Watchdog::start(limit, move |why, _| {
            eprintln!("ferry: {why}; {then}");
            undo();
            std::process::exit(1);
        })
    }

    /// Starts watching; `on_stuck` runs once, on the watchdog's thread, with a one-line
    /// description and the victim (see `set_victim`), if no beat comes for `limit`.
    pub fn start(limit: Duration, on_stuck: impl FnOnce(String, i32) + Send + 'static) -> Watchdog {
        let shared = Arc::new(Shared {
            started: Instant::now(),
            last: AtomicU64::new(0),
            victim: AtomicI32::new(0),
            stop: AtomicBool::new(false),
            doing: Mutex::new("starting".into()),
        });
        let s = shared.clone();
        let monitor = std::thread::Builder::new()
            .name("ferry-watchdog".into())
            .spawn(move || {
                let tick = (limit / 10).clamp(Duration::from_millis(5), Duration::from_millis(200));
                while !s.stop.load(Ordering::Relaxed) {
                    std::thread::park_timeout(tick);
                    let now = s.started.elapsed().as_millis() as u64;
                    let quiet = now.saturating_sub(s.last.load(Ordering::Relaxed));
                    if !s.stop.load(Ordering::Relaxed) && quiet >= limit.as_millis() as u64 {
                        let doing = s.doing.lock().map(|d| d.clone()).unwrap_or_default();
                        let victim = s.victim.load(Ordering::Relaxed);
                        on_stuck(format!("watchdog: no progress for {quiet} ms while {doing}; the event is declared stuck"), victim);
                        return;
                    }
                }
            })
            .ok();
        Watchdog { shared, limit, monitor }
    }

    /// Names the process this event created (a restore child): the last resort kills it.
    pub fn set_victim(&self, pid: i32) {
        self.shared.victim.store(pid, Ordering::Relaxed);
    }

    /// A sign of life.
    pub fn beat(&self) {
        self.shared.last.store(self.shared.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Says what the event is doing now (for the watchdog's message), and beats.
    pub fn doing(&self, what: impl Into<String>) {
        if let Ok(mut d) = self.shared.doing.lock() {
            *d = what.into();
        }
        self.beat();
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(m) = self.monitor.take() {
            m.thread().unpark();
            let _ = m.join();
        }
    }
}

/// Tracks a plugin's `status()` across the steps of the worker loop: answering "more"
/// while nothing moves is no progress.
pub struct StatusTrack {
    last: Option<ferry_plugin_api::Status>,
    since: Instant,
}

impl StatusTrack {
    pub fn new() -> Self {
        StatusTrack { last: None, since: Instant::now() }
    }

    /// Whether `status` has stood still for longer than `limit`.
    pub fn stalled(&mut self, status: ferry_plugin_api::Status, limit: Duration) -> bool {
        if self.last != Some(status) {
            self.last = Some(status);
            self.since = Instant::now();
            return false;
        }
        self.since.elapsed() > limit
    }
}

impl Default for StatusTrack {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn fires_once_when_beats_stop_and_never_while_they_come() {
        let (tx, rx) = mpsc::channel();
        // The limit is far above a beat's period, so that a test thread descheduled on a
        // busy machine does not pass for a stall.
        let w = Watchdog::start(Duration::from_secs(2), move |m, _| tx.send(m).unwrap());
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            w.doing("copying pages");
            assert!(rx.try_recv().is_err(), "fired while beating");
            std::thread::sleep(Duration::from_millis(10));
        }
        let msg = rx.recv_timeout(Duration::from_secs(10)).expect("fires once beats stop");
        assert!(msg.contains("copying pages") && msg.contains("no progress"), "{msg}");
        drop(w);
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "fires only once");
    }

    #[test]
    fn a_status_that_stands_still_is_a_stall() {
        let mut t = StatusTrack::new();
        let s = ferry_plugin_api::Status { entities_done: 1, ..Default::default() };
        assert!(!t.stalled(s, Duration::from_millis(20)));
        std::thread::sleep(Duration::from_millis(40));
        assert!(t.stalled(s, Duration::from_millis(20)));
        let moved = ferry_plugin_api::Status { entities_done: 2, ..Default::default() };
        assert!(!t.stalled(moved, Duration::from_millis(20)));
    }
}
