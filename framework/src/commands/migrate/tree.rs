//! `ferry migrate` of a process with children: the coordinator's side of moving a whole
//! tree in one event. The tree is frozen together (`kernel::tree`), checked for what
//! its processes share, announced to the destination (every process with its parent,
//! streams, group and shared fds) and written with a stream per plugin per process
//! (`engine::tree`); the destination rebuilds it as a local restore does and holds
//! every process stopped. One `Rebuilt` for the whole tree is the commit point: before
//! it, every source process is let go as it was and the destination kills what it made.

use std::time::Instant;

use abi_stable::std_types::RStr;
use ferry_plugin_api::MediumBox;

use super::{failed, unexpected, verdict_serving, MigrateRequest, MigrateStats};
use crate::{
    commands::janitor::Janitor,
    config::Quiesce,
    engine::event::{self, EventError, Tick},
    engine::manager::Manager,
    engine::pipeline::Pipeline,
    engine::watchdog::Watchdog,
    kernel::{tracer::Tracer, tree},
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

/// Tells the destination to drop what it built, and answers `e`.
fn abort(medium: Option<&mut MediumBox>, e: EventError) -> EventError {
    if let Some(m) = medium {
        let _ = send_verdict(m, &Verdict::Abort { reason: e.to_string() });
    }
    e
}

/// Stop-copy of the tree of `req.pid` over `medium`, whose destination is ready.
pub(super) fn stop_copy(
    manager: &Manager,
    req: &MigrateRequest,
    mut medium: MediumBox,
    token: String,
    janitor: &mut Option<Janitor>,
    started: Instant,
    progress: &mut dyn FnMut(&Tick),
) -> Result<MigrateStats, EventError> {
    let frozen_at = Instant::now();
    let taken = match req.quiesce {
        Quiesce::Ptrace => tree::freeze_tree(req.pid).map(|f| (f, None)),
        Quiesce::Freezer => tree::freeze_tree_in_cgroup(req.pid).map(|(f, z)| (f, Some(z))),
    };
    // The freezer, if any, holds the tree in its cgroup until the event ends.
    let (mut frozen, freezer) = taken.map_err(|e| abort(Some(&mut medium), e.into()))?;
    crate::trace::mark("tree frozen");
    crate::fault::point("frozen");
    let pids: Vec<i32> = frozen.iter().map(|(t, _)| t.pid()).collect();
    let links: Vec<(i32, i32)> = frozen.iter().map(|(t, parent)| (t.pid(), *parent)).collect();
    let shared = match tree::check_shared(&pids).and_then(|s| tree::check_groups(&links).map(|_| s)) {
        Ok(s) => s,
        Err(e) => {
            tree::let_go(frozen);
            return Err(abort(Some(&mut medium), e.into()));
        }
    };
    let mut mapped = |pid: i32, addr: u64| {
        if let Some(j) = janitor.as_mut() {
            j.scratch(pid, addr);
        }
    };
    let announced = crate::engine::tree::announce(manager, &req.subsystems, &mut frozen, &shared, "tcp", &mut mapped).and_then(|inventory| {
        send_json(&mut medium, serde_json::json!({"type": "tree-plan", "inventory": inventory}))
            .map_err(|e| failed(format!("sending the tree's plan: {e}")))
    });
    if let Err(e) = announced {
        let_go_all(frozen);
        return Err(abort(Some(&mut medium), e));
    }
    let mut pipe = Pipeline::new(medium);
    // The last resort if a plugin stops answering: exit; the kernel detaches every
    // source process, which carries on, and the destination loses the connection and
    // kills what it built.
    let root = req.pid;
    let rescue = freezer.as_ref().map(|f| f.rescue());
    let watchdog = Watchdog::start(req.timeout, move |why, _| {
        eprintln!("ferry: {why}; the processes of the tree of {root} are let go");
        if let Some(r) = rescue {
            r();
        }
        std::process::exit(1);
    });
    let written = crate::engine::tree::write_tree(manager, &req.subsystems, &mut frozen, &shared, &mut pipe, "tcp", &watchdog, &mut |_, _| {}, progress);
    drop(watchdog);
    let mut medium = pipe.finish();
    crate::trace::mark("tree sent");
    let outcome = (|| {
        let (bytes, pages) = written?;
        let medium = medium.as_mut().ok_or_else(|| failed("the medium's writer thread failed"))?;
        let end = serde_json::json!({"op": "end"});
        medium.command(RStr::from_str(&end.to_string())).into_result().map_err(|e| failed(e.message.into_string()))?;
        match verdict_serving(medium, req.pid, req.timeout).map_err(|e| failed(format!("waiting for the destination: {e}")))? {
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
            let_go_all(frozen);
            return Err(e);
        }
    };
    let medium = medium.as_mut().expect("checked above");
    crate::trace::mark("rebuilt: commit");
    // From the commit on, should this ferry die, the copies over there run: the source
    // processes must not run on here too.
    for (t, _) in frozen.iter_mut() {
        if let Err(e) = t.die_with_ferry() {
            let e = abort(Some(medium), e.into());
            let_go_all(frozen);
            return Err(e);
        }
    }
    let released = send_verdict(medium, &Verdict::Commit).map(|_| crate::fault::point("commit-sent")).and_then(|_| verdict_serving(medium, req.pid, req.timeout));
    let frozen_ms = event::ms(frozen_at);
    match released {
        Ok(Verdict::Released) => {}
        other => {
            let_go_all(frozen);
            let why = unexpected(other);
            return Err(failed(format!("the destination did not confirm running the tree ({why}); it runs on here")));
        }
    }
    for (t, _) in frozen {
        if freezer.is_some() {
            // Its cgroup of ferry's can go only once it is empty.
            t.kill();
        } else {
            t.kill_and_go();
        }
    }
    drop(freezer);
    Ok(MigrateStats {
        token,
        strategy: req.strategy.to_string(),
        pids: new_pids,
        frozen_ms,
        total_ms: event::ms(started),
        bytes,
        pages,
        rounds: 1,
        round_bytes: vec![bytes],
        round_ms: vec![frozen_ms],
        precopy_stop: None,
        throttle: 0,
        resumed_ms: None,
        lazy: None,
    })
}
