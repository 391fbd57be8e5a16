//! `ferry migrate` of a process with children: the coordinator's side of moving a whole
//! tree in one event. The tree is frozen together (`kernel::tree`), checked for what
//! its processes share, announced to the destination (every process with its parent,
//! streams, group and shared fds) and written with a stream per plugin per process
//! (`engine::tree`); the destination rebuilds it as a local restore does and holds
//! every process stopped. One `Rebuilt` for the whole tree is the commit point: before
//! it, every source process is let go as it was and the destination kills what it made.

use std::time::Instant;

use abi_stable::std_types::RStr;
use ferry_plugin_api::{MediumBox, MemRange};

use super::{failed, unexpected, MigrateRequest, MigrateStats};
use crate::{
    commands::janitor::Janitor,
    config::Quiesce,
    engine::dump::{Live, Sent},
    engine::event::{self, EventError, Tick},
    engine::manager::Manager,
    engine::pipeline::Pipeline,
    engine::watchdog::Watchdog,
    kernel::{dirty::DirtyTracker, freezer::Freezer, tracer::Tracer, tree},
    strategies::pager::{serve_tree_until_message, LazyStats, LAZY_STREAM},
    strategies::rounds::{self, Member, Outcome},
    wire::messages::{send_json, send_verdict},
    wire::protocol::Verdict,
};

/// Lets every process of the tree go as it was: no scratch area, untraced, running.
fn let_go_all(mut frozen: Vec<(Tracer, i32)>) {
    for (t, _) in frozen.iter_mut() {
        let _ = t.unmap_scratch();
    }
    tree::let_go(frozen);
}

/// A lazy migration of a tree that failed past its commit point: the copies may have
/// run, so no source process runs again (as one process's `lose`).
fn lose_all(frozen: Vec<(Tracer, i32)>, freezer: Option<Freezer>, req: &MigrateRequest, why: String) -> EventError {
    for (t, _) in frozen {
        t.kill();
    }
    drop(freezer);
    crate::trace::mark("lost: source tree killed");
    failed(format!("the tree of process {} was lost: {why}; post-copy cannot roll back once the copies may have run", req.pid))
}

/// Ends the dirty tracking of every process (pre-copy).
fn stop_tracking(lives: Vec<Live>) {
    for l in lives {
        l.tracker.stop();
    }
}

/// Tells the destination to drop what it built, and answers `e`.
fn abort(medium: Option<&mut MediumBox>, e: EventError) -> EventError {
    if let Some(m) = medium {
        let _ = send_verdict(m, &Verdict::Abort { reason: e.to_string() });
    }
    e
}

/// A frozen tree (each process with its parent's pid), and the freezer holding it, if any.
type Frozen = (Vec<(Tracer, i32)>, Option<Freezer>);

/// A tree's links (each process with its parent's pid) and the descriptions its
/// processes share.
type Survey = (Vec<(i32, i32)>, Vec<tree::Shared>);

/// Freezes the tree of `req.pid` with `quiesce`.
fn freeze(req: &MigrateRequest, quiesce: Quiesce) -> Result<Frozen, EventError> {
    match quiesce {
        Quiesce::Ptrace => tree::freeze_tree(req.pid).map(|f| (f, None)),
        Quiesce::Freezer => tree::freeze_tree_in_cgroup(req.pid).map(|(f, z)| (f, Some(z))),
    }
    .map_err(EventError::from)
}

/// What the tree looks like: each process with its parent, and the descriptions its
/// processes share; refused when a restore could not make it again.
fn survey(frozen: &[(Tracer, i32)], lazy: bool) -> Result<Survey, EventError> {
    if let Some((t, _)) = frozen.iter().find(|(t, _)| lazy && t.group_stopped()) {
        // Its copy would have to run on the destination to page its memory in.
        return Err(EventError::Refused(format!(
            "process {} of the tree is stopped (job control): post-copy would run it on the destination; use stop-copy or pre-copy",
            t.pid()
        )));
    }
    let pids: Vec<i32> = frozen.iter().map(|(t, _)| t.pid()).collect();
    let links: Vec<(i32, i32)> = frozen.iter().map(|(t, parent)| (t.pid(), *parent)).collect();
    let shared = tree::check_shared(&pids).and_then(|s| tree::check_groups(&links).map(|_| s))?;
    Ok((links, shared))
}

/// After a failure during pre-copy rounds, while the tree runs: the tracking stops and
/// every process is seized once more to remove its scratch area, then let go.
fn let_go_running(members: Vec<Member>) {
    for m in members {
        m.live.tracker.stop();
        if let Ok(mut t) = Tracer::seize(m.pid) {
            t.set_scratch(Some(m.scratch.addr));
            let _ = t.unmap_scratch();
            let _ = t.detach();
        }
    }
}

/// The next verdict of the destination, answering its page requests for any process
/// of the tree meanwhile (post-copy).
fn verdict(medium: &mut MediumBox, pids: &[i32], timeout: std::time::Duration) -> Result<Verdict, String> {
    Verdict::from_json(&serve_tree_until_message(medium, pids, timeout, false)?.to_string()).map_err(|e| e.to_string())
}

/// The tree of `req.pid` over `medium`, whose destination is ready: stop-copy, or
/// pre-copy rounds first (`precopy`), and memory left to post-copy (`lazy`).
#[allow(clippy::too_many_arguments)]
pub(super) fn migrate_tree(
    manager: &Manager,
    req: &MigrateRequest,
    mut medium: MediumBox,
    token: String,
    janitor: &mut Option<Janitor>,
    started: Instant,
    precopy: Option<rounds::Tuning>,
    lazy: bool,
    progress: &mut dyn FnMut(&Tick),
) -> Result<MigrateStats, EventError> {
    let mut frozen_at = Instant::now();
    // Pre-copy stops the tree only briefly first (ptrace), to announce it.
    let first = if precopy.is_some() { Quiesce::Ptrace } else { req.quiesce };
    // The freezer, if any, holds the tree in its cgroup until the event ends.
    let (mut frozen, mut freezer) = freeze(req, first).map_err(|e| abort(Some(&mut medium), e))?;
    crate::trace::mark("tree frozen");
    if precopy.is_none() {
        crate::fault::point("frozen");
    }
    let (links, shared) = match survey(&frozen, lazy) {
        Ok(s) => s,
        Err(e) => {
            tree::let_go(frozen);
            return Err(abort(Some(&mut medium), e));
        }
    };
    let mut mapped = |pid: i32, addr: u64| {
        if let Some(j) = janitor.as_mut() {
            j.scratch(pid, addr);
        }
    };
    let announced = crate::engine::tree::announce(manager, &req.subsystems, &mut frozen, &shared, "tcp", &mut mapped).and_then(|inventory| {
        let post_copy = serde_json::json!({"window": req.fault_window, "batch": req.push_batch});
        send_json(&mut medium, serde_json::json!({"type": "tree-plan", "inventory": inventory, "post_copy": post_copy}))
            .map_err(|e| failed(format!("sending the tree's plan: {e}")))
    });
    if let Err(e) = announced {
        let_go_all(frozen);
        return Err(abort(Some(&mut medium), e));
    }
    let mut ran = Outcome::default();
    let mut members: Vec<Member> = Vec::new();
    if let Some(tuning) = precopy {
        // Every process tracked and its plugins loaded while it is stopped; then the
        // tree runs during the rounds (the scratch areas stay).
        let mut first_stream = 1;
        let tracked = frozen.iter_mut().try_for_each(|(t, _)| {
            let pid = t.pid();
            let subs = event::load_subsystems(manager, &req.subsystems, Some(pid))?;
            let tracker = DirtyTracker::start(t, &[], tuning.tracking).map_err(|e| failed(format!("process {pid}: dirty-page tracking: {e}")))?;
            let scratch = MemRange { addr: t.scratch().map_or(0, |s| s.0), len: crate::kernel::tracer::SCRATCH_SIZE };
            let live = Live { tracker, sent: vec![Sent::default(); subs.len()] };
            let n = subs.len() as u32;
            members.push(Member { pid, scratch, subs, live, first_stream });
            first_stream += n;
            Ok::<_, EventError>(())
        });
        if let Err(e) = tracked {
            for m in members {
                m.live.tracker.stop();
            }
            let_go_all(frozen);
            return Err(abort(Some(&mut medium), e));
        }
        for (t, _) in frozen.drain(..) {
            let _ = t.detach();
        }
        let mut pipe = Pipeline::direct(medium);
        let root = req.pid;
        let watchdog = Watchdog::last_resort(req.timeout, format!("the processes of the tree of {root} are let go"), || {});
        let rounds = rounds::run_tree(&mut members, &mut pipe, &tuning, &watchdog, progress);
        drop(watchdog);
        let back = pipe.finish();
        medium = match (rounds, back) {
            (Ok(outcome), Some(m)) => {
                ran = outcome;
                m
            }
            (rounds, mut back) => {
                let e = rounds.err().unwrap_or_else(|| failed("the medium failed during pre-copy"));
                let_go_running(members);
                return Err(abort(back.as_mut(), e));
            }
        };
        // The freeze: the tree must be the one announced, sharing what it shared.
        frozen_at = Instant::now();
        let again = freeze(req, req.quiesce).and_then(|(f, z)| {
            let same = survey(&f, lazy).map(|(l, s)| l == links && s == shared);
            match same {
                Ok(true) => Ok((f, z)),
                other => {
                    tree::let_go(f);
                    Err(other.err().unwrap_or_else(|| {
                        EventError::Refused(format!("the tree of process {} changed during pre-copy (a process forked, exited or shared another fd); run the migration again", req.pid))
                    }))
                }
            }
        });
        match again {
            Ok((f, z)) => (frozen, freezer) = (f, z),
            Err(e) => {
                let_go_running(members);
                return Err(abort(Some(&mut medium), e));
            }
        }
        crate::fault::point("frozen");
        for ((t, _), m) in frozen.iter_mut().zip(&members) {
            t.set_scratch(Some(m.scratch.addr));
        }
    }
    let mut pipe = Pipeline::new(medium);
    // The last resort if a plugin stops answering: exit; the kernel detaches every
    // source process, which carries on, and the destination loses the connection and
    // kills what it built.
    let root = req.pid;
    let rescue = freezer.as_ref().map(|f| f.rescue());
    let watchdog = Watchdog::last_resort(req.timeout, format!("the processes of the tree of {root} are let go"), move || rescue.into_iter().for_each(|r| r()));
    let pids: Vec<i32> = links.iter().map(|l| l.0).collect();
    let mut lives: Vec<Live> = Vec::new();
    for m in members {
        lives.push(m.live);
    }
    let with_lives = (!lives.is_empty()).then_some(lives.as_mut_slice());
    let written = crate::engine::tree::write_tree(manager, &req.subsystems, &mut frozen, &shared, &mut pipe, "tcp", &watchdog, &mut |_, _| {}, with_lives, lazy, progress);
    drop(watchdog);
    let mut medium = pipe.finish();
    crate::trace::mark("tree sent");
    let outcome = (|| {
        let (bytes, pages) = written?;
        let medium = medium.as_mut().ok_or_else(|| failed("the medium's writer thread failed"))?;
        // The image ends here; post-copy's pages follow on a stream of their own.
        let end = if lazy { serde_json::json!({"op": "end", "open": [LAZY_STREAM]}) } else { serde_json::json!({"op": "end"}) };
        medium.command(RStr::from_str(&end.to_string())).into_result().map_err(|e| failed(e.message.into_string()))?;
        match verdict(medium, &pids, req.timeout).map_err(|e| failed(format!("waiting for the destination: {e}")))? {
            Verdict::Rebuilt { pids, .. } => Ok((bytes, pages, pids)),
            Verdict::Failed { reason } => Err(failed(format!("the destination could not rebuild the tree: {reason}"))),
            other => Err(failed(format!("unexpected message from the destination: {other:?}"))),
        }
    })();
    let (bytes, pages, new_pids) = match (outcome, medium.as_mut()) {
        (Ok(v), Some(_)) => v,
        (Ok(_), None) => unreachable!("a verdict came over the medium"),
        (Err(e), m) => {
            // Before the commit point: the whole tree carries on as if nothing happened.
            let e = abort(m, e);
            stop_tracking(lives);
            let_go_all(frozen);
            return Err(e);
        }
    };
    let medium = medium.as_mut().expect("checked above");
    crate::trace::mark("rebuilt: commit");
    // The commit point, as for one process (protocol.rs): stop-copy's is the commit
    // sent; post-copy's, the destination's `Ready` (its copies held stopped), after
    // which the source tree never runs again and the copies are let run (`Run`). From
    // it, should this ferry die, the kernel kills every source process.
    if lazy {
        match send_verdict(medium, &Verdict::Commit).and_then(|_| verdict(medium, &pids, req.timeout)) {
            Ok(Verdict::Ready) => {}
            other => {
                let why = unexpected(other);
                let e = abort(Some(medium), failed(format!("the destination did not take the tree ({why}); it runs on here")));
                stop_tracking(lives);
                let_go_all(frozen);
                return Err(e);
            }
        }
    }
    for (t, _) in frozen.iter_mut() {
        if let Err(e) = t.die_with_ferry() {
            let e = abort(Some(medium), e.into());
            stop_tracking(lives);
            let_go_all(frozen);
            return Err(e);
        }
    }
    let released = if lazy {
        crate::trace::mark("ready: committed");
        send_verdict(medium, &Verdict::Run)
    } else {
        send_verdict(medium, &Verdict::Commit)
    };
    let released = released.map(|_| crate::fault::point("commit-sent")).and_then(|_| verdict(medium, &pids, req.timeout));
    let frozen_ms = event::ms(frozen_at);
    stop_tracking(lives);
    match released {
        Ok(Verdict::Released) => {}
        other if lazy => {
            let why = unexpected(other);
            return Err(lose_all(frozen, freezer, req, format!("its copies on {} were let run and the destination did not confirm it ({why})", req.to)));
        }
        other => {
            let_go_all(frozen);
            let why = unexpected(other);
            return Err(failed(format!("the destination did not confirm running the tree ({why}); it runs on here")));
        }
    }
    let lazy_stats = if lazy {
        // Their memory follows from the frozen copies here, kept until the last page.
        match serve_tree_until_message(medium, &pids, req.timeout, true) {
            Ok(msg) if msg["type"] == "lazy-done" => serde_json::from_value::<LazyStats>(msg["stats"].clone()).ok(),
            other => {
                let why = unexpected(other);
                return Err(lose_all(frozen, freezer, req, format!("its copies on {} ran and then died before all their pages arrived ({why})", req.to)));
            }
        }
    } else {
        None
    };
    for (t, _) in frozen {
        if freezer.is_some() {
            // Its cgroup of ferry's can go only once it is empty.
            t.kill();
        } else {
            t.kill_and_go();
        }
    }
    drop(freezer);
    let live_bytes: u64 = ran.rounds.iter().map(|r| r.bytes).sum();
    let mut round_bytes: Vec<u64> = ran.rounds.iter().map(|r| r.bytes).collect();
    round_bytes.push(bytes - live_bytes);
    // Post-copy's pages (after the frozen round) count with the rest.
    let lazy_pages = lazy_stats.as_ref().map_or(0, |l| l.pages_faulted + l.pages_pushed);
    let (bytes, pages) = (bytes + lazy_pages * 4096, pages + lazy_pages);
    Ok(MigrateStats {
        token,
        strategy: req.strategy.to_string(),
        pids: new_pids,
        frozen_ms,
        total_ms: event::ms(started),
        bytes,
        pages,
        rounds: round_bytes.len() as u32,
        round_bytes,
        round_ms: ran.rounds.iter().map(|r| r.ms).chain([frozen_ms]).collect(),
        precopy_stop: (!ran.stop.is_empty()).then_some(ran.stop),
        throttle: 0,
        resumed_ms: lazy.then_some(frozen_ms),
        lazy: lazy_stats,
        phases: Vec::new(),
    })
}
