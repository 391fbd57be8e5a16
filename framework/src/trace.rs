//! An opt-in timeline of an event's phases: with `FERRY_TRACE=1` in its environment,
//! ferry (and the daemon) print one line per phase on stderr, stamped with the
//! monotonic clock, so the source's and the destination's lines of one migration on
//! one machine interleave by time. Off, a mark costs one relaxed load.
//!
//! The same marks are an event's phase times: a command (or a daemon's event thread)
//! that called [`phases_begin`] gets every mark its thread made since, with the time
//! from that call, from [`phases_take`], for `--json` and `--stats`.

use std::{
    cell::RefCell,
    sync::{
        atomic::{AtomicU8, Ordering},
        OnceLock,
    },
    time::Instant,
};

/// One phase of an event ended `at_ms` after it started.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Phase {
    pub phase: String,
    pub at_ms: f64,
}

thread_local! {
    static PHASES: RefCell<Option<(Instant, Vec<Phase>)>> = const { RefCell::new(None) };
}

/// Starts collecting this thread's marks as phases, timed from now.
pub fn phases_begin() {
    PHASES.with(|p| *p.borrow_mut() = Some((Instant::now(), Vec::new())));
}

/// The phases marked on this thread since [`phases_begin`] (none if it was not called);
/// collecting stops.
pub fn phases_take() -> Vec<Phase> {
    PHASES.with(|p| p.borrow_mut().take().map(|(_, v)| v).unwrap_or_default())
}

static STATE: AtomicU8 = AtomicU8::new(0);
static WHO: OnceLock<String> = OnceLock::new();

fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var_os("FERRY_TRACE").is_some_and(|v| !v.is_empty() && v != "0");
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        s => s == 2,
    }
}

/// Prints `phase` with the time, when tracing is on.
pub fn mark(phase: impl std::fmt::Display) {
    PHASES.with(|p| {
        if let Some((since, v)) = p.borrow_mut().as_mut() {
            let at_ms = (since.elapsed().as_secs_f64() * 1e6).round() / 1e3;
            v.push(Phase { phase: phase.to_string(), at_ms });
        }
    });
    if !enabled() {
        return;
    }
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let who = WHO.get_or_init(|| format!("ferry[{}]", std::process::id()));
    eprintln!("{who} {:>12.3} ms {phase}", ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6);
}

/// One line of the daemon's log on stderr: `ferry daemon: <UTC time, RFC 3339> <line>`.
/// Every part of the daemon (its door, its events, its control socket) logs through it.
pub fn daemon_log(line: impl std::fmt::Display) {
    eprintln!("ferry daemon: {} {line}", humantime::format_rfc3339_millis(std::time::SystemTime::now()));
}
