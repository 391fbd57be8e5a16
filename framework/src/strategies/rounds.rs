//! Pre-copy rounds on the source: while the process runs, each subsystem's `precopy`
//! sends what it can early (round 0: the pages the process has, present or swapped,
//! never the holes of its mappings; later rounds: the pages written
//! since, found by [`DirtyTracker`](crate::kernel::dirty::DirtyTracker)). After each round the source waits until the
//! destination has *applied* it — a `sync` record closes the round on every stream
//! that carried data, and the destination answers `synced` once its plugin has read
//! past it — so the measured rate is the end-to-end one and no backlog is left to
//! drain during the freeze. The loop stops when the next dirty set is estimated to
//! go within the downtime budget, at the round limit, or when the dirty set stops
//! shrinking; with auto-converge the process is throttled a step instead
//! ([`Throttle`]) and the rounds go on.

use std::time::{Duration, Instant};

use ferry_plugin_api::{MediumBox, MemRange, RecordFormat, RecordSink};
use serde::Serialize;

use crate::{
    engine::context::{LiveContext, StreamSink},
    engine::dump::Live,
    engine::event::{Tick, self, EventError, Loaded},
    engine::pipeline::Pipeline,
    engine::watchdog::Watchdog,
    kernel::tracer::Tracer,
    strategies::throttle::Throttle,
    wire::messages::{recv_json, synced, SYNC_KIND},
    wire::protocol::Verdict,
};

/// How pre-copy rounds go: the downtime budget they aim for, their limit, whether a
/// process that outruns them is slowed down, and how dirty pages are found.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub budget: Duration,
    pub max_rounds: u32,
    pub throttle: bool,
    pub tracking: crate::config::DirtyTracking,
}

#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub bytes: u64,
    pub ms: f64,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub rounds: Vec<Round>,
    /// Why the rounds ended: "converged", "max rounds", "not shrinking".
    pub stop: &'static str,
}

/// Waits for the destination to confirm round `round` on each of `streams`.
fn await_synced(medium: &mut MediumBox, streams: &[u32], round: u32, timeout: Duration) -> Result<(), EventError> {
    for &stream in streams {
        let msg = recv_json(medium, timeout).map_err(|e| EventError::Failed(format!("waiting for the destination: {e}")))?;
        if msg == synced(stream, round as u64) {
            continue;
        }
        return Err(EventError::Failed(match Verdict::from_json(&msg.to_string()) {
            Ok(Verdict::Failed { reason }) => format!("the destination could not rebuild the process: {reason}"),
            _ => format!("unexpected message from the destination during pre-copy: {msg}"),
        }));
    }
    Ok(())
}

/// Whether the freeze after `rounds` (at least two) fits `budget`, at `speed` bytes
/// per ms measured end to end. The last round sent what was written during the one
/// before; at that rate, what is written during the last goes in the freeze. The
/// freeze also pays what every round paid whatever its bytes (seizing, reading the
/// mappings, scanning, the destination's answer), measured as the least any round
/// took beyond its bytes: the two together aim at the budget, or the bytes alone
/// where that cost is over the budget already (more rounds cannot take it away).
fn converged(rounds: &[Round], speed: f64, budget: Duration) -> bool {
    let [.., previous, last] = rounds else { return false };
    let rate = last.bytes as f64 / previous.ms.max(0.1);
    let estimate = rate * last.ms / speed;
    let fixed = rounds[1..].iter().map(|r| (r.ms - r.bytes as f64 / speed).max(0.0)).fold(f64::INFINITY, f64::min);
    let budget = budget.as_secs_f64() * 1000.0;
    estimate <= if fixed < budget { budget - fixed } else { budget }
}

/// Runs pre-copy rounds beside the running process `pid` until it is time to freeze.
#[allow(clippy::too_many_arguments)]
pub fn run(
    pid: i32,
    scratch: MemRange,
    subs: &mut [Loaded],
    pipe: &mut Pipeline,
    live: &mut Live,
    tuning: &Tuning,
    throttle: &mut Option<Throttle>,
    watchdog: &Watchdog,
    timeout: Duration,
    progress: &mut dyn FnMut(&Tick),
) -> Result<Outcome, EventError> {
    let mut out = Outcome::default();
    let (mut sent_total, mut time_total) = (0u64, 0f64);
    for round in 0.. {
        if round >= tuning.max_rounds {
            out.stop = "max rounds";
            break;
        }
        let began = Instant::now();
        let mut bytes = 0;
        let mut carried = Vec::new();
        for (i, loaded) in subs.iter_mut().enumerate() {
            let stream = i as u32 + 1;
            let name = loaded.name.clone();
            watchdog.doing(format!("plugin {name}: pre-copy round {round}"));
            // Stopped while the plugin reads the mappings and tracks them: a mapping the
            // process grew meanwhile would be split by registering its old extent.
            let stopped = Tracer::seize(pid)?;
            let mut ctx = LiveContext { pid, scratch, plugin: &name, watchdog, dirty: &mut live.tracker };
            let mut sink = StreamSink::new(pipe, stream, &name, watchdog);
            event::precopy_one(loaded, &mut ctx, &mut sink, round, Some(stopped), progress)?;
            if sink.records > 0 {
                let mark = serde_json::json!({"round": round}).to_string();
                sink.put(SYNC_KIND.into(), RecordFormat::Json, mark.as_bytes().into())
                    .into_result()
                    .map_err(|e| EventError::Failed(e.to_string()))?;
                carried.push(stream);
            }
            let s = &mut live.sent[i];
            s.records += sink.records;
            s.bytes += sink.bytes;
            s.page_bytes += sink.page_bytes;
            bytes += sink.bytes;
        }
        pipe.flush().map_err(|e| EventError::Failed(format!("sending pre-copy round {round}: {e}")))?;
        let medium = pipe.medium_mut().ok_or_else(|| EventError::Failed("pre-copy needs a direct medium".into()))?;
        await_synced(medium, &carried, round, timeout)?;
        match after_round(&mut out, Round { bytes, ms: event::ms(began) }, (&mut sent_total, &mut time_total), tuning) {
            Next::Round => {}
            Next::Freeze(why) => {
                out.stop = why;
                break;
            }
            Next::NotShrinking => {
                // Without auto-converge (off, or no cpu controller here) more rounds
                // would only send the same pages again.
                let Some(t) = throttle.as_mut().filter(|_| tuning.throttle) else {
                    out.stop = "not shrinking";
                    break;
                };
                t.step().map_err(|e| EventError::Failed(format!("auto-converge: {e}")))?;
            }
        }
    }
    Ok(out)
}

/// What follows a round.
enum Next {
    Round,
    /// Freeze now, for this reason.
    Freeze(&'static str),
    /// The round sent as much as the one before (auto-converge's turn, if any).
    NotShrinking,
}

/// Records `done` and decides what follows it, by the same rule for one process and a
/// tree: converged (the freeze fits the budget), max rounds, not shrinking.
fn after_round(out: &mut Outcome, done: Round, (sent_total, time_total): (&mut u64, &mut f64), tuning: &Tuning) -> Next {
    let bytes = done.bytes;
    *sent_total += done.bytes;
    *time_total += done.ms;
    out.rounds.push(done);
    crate::fault::point("precopy-round");
    let round = out.rounds.len() - 1;
    if round == 0 {
        return Next::Round;
    }
    if converged(&out.rounds, *sent_total as f64 / time_total.max(0.1), tuning.budget) {
        return Next::Freeze("converged");
    }
    if round as u32 + 1 >= tuning.max_rounds {
        return Next::Freeze("max rounds");
    }
    if bytes as f64 >= 0.9 * out.rounds[round - 1].bytes as f64 {
        return Next::NotShrinking;
    }
    Next::Round
}

/// One process of a tree during pre-copy rounds: its plugins, on streams from
/// `first_stream` on, and what they sent so far.
pub struct Member {
    pub pid: i32,
    pub scratch: MemRange,
    pub subs: Vec<Loaded>,
    pub live: Live,
    pub first_stream: u32,
}

/// Pre-copy rounds beside a running tree: each round goes through every process's
/// plugins in turn. The destination rebuilds the processes one after the other, so it
/// reads a process's rounds only once the processes before it are rebuilt: the rounds
/// carry no sync marks, and their rate is the sending rate (the medium keeps what the
/// destination has not read yet). The same convergence rule as [`run`] otherwise, but
/// no auto-converge (the throttle takes one process).
pub fn run_tree(members: &mut [Member], pipe: &mut Pipeline, tuning: &Tuning, watchdog: &Watchdog, progress: &mut dyn FnMut(&Tick)) -> Result<Outcome, EventError> {
    let mut out = Outcome::default();
    let (mut sent_total, mut time_total) = (0u64, 0f64);
    for round in 0.. {
        if round >= tuning.max_rounds {
            out.stop = "max rounds";
            break;
        }
        let began = Instant::now();
        let mut bytes = 0;
        for m in members.iter_mut() {
            for (i, loaded) in m.subs.iter_mut().enumerate() {
                let stream = m.first_stream + i as u32;
                let name = loaded.name.clone();
                watchdog.doing(format!("plugin {name}: pre-copy round {round} of process {}", m.pid));
                let stopped = Tracer::seize(m.pid)?;
                let mut ctx = LiveContext { pid: m.pid, scratch: m.scratch, plugin: &name, watchdog, dirty: &mut m.live.tracker };
                let mut sink = StreamSink::new(pipe, stream, &name, watchdog);
                event::precopy_one(loaded, &mut ctx, &mut sink, round, Some(stopped), progress)?;
                let s = &mut m.live.sent[i];
                s.records += sink.records;
                s.bytes += sink.bytes;
                s.page_bytes += sink.page_bytes;
                bytes += sink.bytes;
            }
        }
        pipe.flush().map_err(|e| EventError::Failed(format!("sending pre-copy round {round}: {e}")))?;
        // The same rule as one process's, with no auto-converge.
        match after_round(&mut out, Round { bytes, ms: event::ms(began) }, (&mut sent_total, &mut time_total), tuning) {
            Next::Round => {}
            Next::Freeze(why) => {
                out.stop = why;
                break;
            }
            Next::NotShrinking => {
                out.stop = "not shrinking";
                break;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(bytes: u64, ms: f64) -> Round {
        Round { bytes, ms }
    }

    #[test]
    fn the_freeze_is_estimated_with_what_every_round_costs_beside_its_bytes() {
        let budget = Duration::from_millis(30);
        // 1 MB per ms; the last round's bytes go in 20 ms at the rate the process writes.
        let rounds = [round(100_000_000, 100.0), round(20_000_000, 20.0), round(20_000_000, 20.0)];
        assert!(converged(&rounds, 1_000_000.0, budget), "no fixed cost: 20 ms fits 30");
        // The same bytes, each round 15 ms longer than its bytes: 20 + 15 is over 30.
        let slow = [round(100_000_000, 115.0), round(20_000_000, 35.0), round(20_000_000, 35.0)];
        assert!(!converged(&slow, 1_000_000.0, budget));
        // A fixed cost over the budget on its own: the bytes alone aim at it.
        let stuck = [round(100_000_000, 140.0), round(5_000_000, 45.0), round(5_000_000, 45.0)];
        assert!(converged(&stuck, 1_000_000.0, budget));
        assert!(!converged(&rounds[..1], 1_000_000.0, budget), "one round says nothing of the rate");
    }
}
