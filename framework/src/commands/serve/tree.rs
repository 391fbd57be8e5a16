//! The destination of a tree's migration: the source announced every process of the
//! tree (`tree-plan`) ahead of their streams; each is made and rebuilt as a local
//! restore of a tree's image does (`engine::tree`), the inventory read last must be
//! the tree announced, and all are held stopped until the source commits; then all
//! run, children first. Any failure before the commit kills every process made.

use std::time::{Duration, Instant};

use ferry_plugin_api::MediumBox;

use super::EventRecord;
use crate::{
    engine::context::{CountingPull, MediumPull},
    engine::event,
    engine::manager::Manager,
    engine::rebuild::{Blank, Held, Running, Tended},
    engine::tree::{check_announced, release_tree, restore_tree},
    engine::watchdog::Watchdog,
    image::{Inventory, INVENTORY_STREAM},
    strategies::pager::{LazyStats, Pager},
    wire::messages::{recv_verdict, send_json, send_verdict},
    wire::protocol::Verdict,
};

fn abort_all(held: Vec<Held>) {
    for h in held {
        h.abort();
    }
}

/// Rebuilds the tree `announced` from `medium` (the root's restore child made ahead),
/// holds it until the source's verdict, and answers the event's record.
#[allow(clippy::too_many_arguments)]
pub(super) fn serve_tree(
    manager: &Manager,
    medium: &mut MediumBox,
    announced: Inventory,
    root: Blank,
    timeout: Duration,
    tuning: (u64, u64),
    started: Instant,
    mut record: EventRecord,
    end: impl Fn(EventRecord, &'static str, String) -> EventRecord,
) -> EventRecord {
    if announced.processes.is_empty() {
        let why = "the tree's plan names no process".to_string();
        let _ = send_verdict(medium, &Verdict::Failed { reason: why.clone() });
        return end(record, "failed", why);
    }
    // The last resort if a plugin stops answering: the process being rebuilt is
    // killed; the others die with this event's tracer once the source gives up.
    let stuck = record.clone();
    let watchdog = Watchdog::start(timeout, move |why, victim| {
        if victim > 0 {
            // SAFETY: killing a process this event created.
            unsafe { libc::kill(victim, libc::SIGKILL) };
        }
        crate::trace::daemon_log(EventRecord { outcome: "rolled back", detail: why, ..stuck }.line());
    });
    let rebuilt = restore_tree(manager, medium, &announced, Some(root), false, &watchdog, started, &mut |_| {});
    drop(watchdog);
    let held = match rebuilt {
        Ok(h) => h,
        Err(e) => {
            let _ = send_verdict(medium, &Verdict::Failed { reason: e.to_string() });
            return end(record, "failed", e.to_string());
        }
    };
    let mut inventory_bytes = 0;
    let pull = MediumPull { medium: &mut *medium, stream: INVENTORY_STREAM };
    let last = Inventory::read_from(&mut CountingPull { inner: pull, bytes: &mut inventory_bytes }).map_err(|e| e.to_string());
    let counts: Vec<Vec<(u64, u64)>> = held.iter().map(|h| h.counts().to_vec()).collect();
    if let Err(why) = last.and_then(|last| check_announced(&announced, &last, &counts)) {
        abort_all(held);
        let _ = send_verdict(medium, &Verdict::Failed { reason: why.clone() });
        return end(record, "failed", why);
    }
    let mut held = held;
    held[0].count_inventory(inventory_bytes);
    // Post-copy: each process's lazy areas registered in a userfaultfd of its own
    // before any of them may run.
    let mut pagers: Vec<Option<Pager>> = Vec::new();
    for (h, p) in held.iter_mut().zip(&announced.processes) {
        let Some(plan) = h.lazy.take() else {
            pagers.push(None);
            continue;
        };
        let made = h.userfaultfd().map_err(|e| e.to_string()).and_then(|uffd| {
            let mut pager = Pager::new(h.pid(), uffd, plan, tuning.0, tuning.1).for_source(p.pid);
            pager.settle(medium, timeout)?;
            pager.register()?;
            Ok(pager)
        });
        match made {
            Ok(pager) => pagers.push(Some(pager)),
            Err(e) => {
                abort_all(held);
                let why = format!("process {}: {e}", p.pid);
                let _ = send_verdict(medium, &Verdict::Failed { reason: why.clone() });
                return end(record, "failed", why);
            }
        }
    }
    let pids = held.iter().flat_map(|h| h.pids().clone()).collect();
    crate::fault::point("before-commit");
    if let Err(e) = send_verdict(medium, &Verdict::Rebuilt { pids, restore_ms: event::ms(started) }) {
        abort_all(held);
        return end(record, "rolled back", e);
    }
    crate::trace::mark("rebuilt sent");
    match recv_verdict(medium, timeout) {
        Ok(Verdict::Commit) if pagers.iter().any(Option::is_some) => {
            crate::fault::point("commit-received");
            // The copies run only once the source gave itself up (protocol.rs): `Ready`
            // is its commit point, `Run` says it was reached.
            if let Err(e) = send_verdict(medium, &Verdict::Ready) {
                abort_all(held);
                return end(record, "rolled back", e);
            }
            match recv_verdict(medium, timeout) {
                Ok(Verdict::Run) => {
                    crate::fault::point("run-received");
                    lazy_commit(held, pagers, medium, timeout, record, end)
                }
                Ok(other) => {
                    abort_all(held);
                    end(record, "rolled back", format!("the source said {other:?}"))
                }
                Err(e) => {
                    abort_all(held);
                    end(record, "failed", format!("no word from the source after `ready` ({e}): the tree here, which never ran, is killed; the source, if it took `ready`, is gone too"))
                }
            }
        }
        Ok(Verdict::Commit) => {
            crate::fault::point("commit-received");
            let root_pid = held[0].pid();
            match release_tree(held, started) {
                Ok(stats) => {
                    let _ = send_verdict(medium, &Verdict::Released);
                    record.new_pid = Some(root_pid);
                    record.bytes = stats.bytes;
                    record.pages = stats.pages;
                    end(record, "committed", String::new())
                }
                Err(e) => end(record, "failed", format!("releasing the tree: {e}")),
            }
        }
        Ok(other) => {
            abort_all(held);
            end(record, "rolled back", format!("the source said {other:?}"))
        }
        Err(e) => {
            abort_all(held);
            end(record, "rolled back", e)
        }
    }
}

/// Post-copy after the commit: every process of the tree runs, still traced (they die
/// with this daemon rather than run on without their memory), while their pages arrive,
/// one process's pager after another (each fills all its process's pages, faults
/// first); every process is tended throughout. Then all are let go.
fn lazy_commit(
    held: Vec<Held>,
    pagers: Vec<Option<Pager>>,
    medium: &mut MediumBox,
    timeout: Duration,
    mut record: EventRecord,
    end: impl Fn(EventRecord, &'static str, String) -> EventRecord,
) -> EventRecord {
    let root_pid = held[0].pid();
    // Children first, as a local restore lets them go.
    let mut running: Vec<Running> = Vec::new();
    let mut order: Vec<(Held, Option<Pager>)> = held.into_iter().zip(pagers).collect();
    let mut kept: Vec<Option<Pager>> = Vec::new();
    while let Some((h, p)) = order.pop() {
        match h.run_traced() {
            Ok(r) => {
                running.push(r);
                kept.push(p);
            }
            Err(e) => {
                for r in running {
                    r.kill();
                }
                for (h, _) in order {
                    h.abort();
                }
                return end(record, "failed", format!("releasing the tree: {e}"));
            }
        }
    }
    let _ = send_verdict(medium, &Verdict::Released);
    crate::trace::mark("tree running (post-copy)");
    record.new_pid = Some(root_pid);
    record.bytes = running.iter().map(|r| r.stats.bytes).sum();
    record.pages = running.iter().map(|r| r.stats.pages).sum();
    let mut stats = LazyStats::default();
    // Children a process forked before its own pager ran.
    let mut forked: Vec<Vec<i32>> = vec![Vec::new(); running.len()];
    for k in 0..running.len() {
        let Some(mut pager) = kept[k].take() else { continue };
        pager.forked_earlier(std::mem::take(&mut forked[k]));
        let ran = pager.run(medium, timeout, &mut || {
            let mut tended = Running::tend_all(&mut running).map_err(|e| e.to_string())?;
            for (j, t) in tended.iter_mut().enumerate().filter(|(j, _)| *j != k) {
                forked[j].append(&mut t.forked);
            }
            Ok(std::mem::replace(&mut tended[k], Tended { alive: false, forked: Vec::new() }))
        });
        if let Err(e) = ran {
            // Without their pages the processes cannot go on: they go, rather than hang
            // on a fault; the source still holds its frozen copies.
            for r in running {
                r.kill();
            }
            record.new_pid = None;
            return end(record, "failed after resume", format!("post-copy: {e}; the processes of the tree here are killed"));
        }
        let s = pager.finish();
        stats.faults += s.faults;
        stats.pages_faulted += s.pages_faulted;
        stats.pages_pushed += s.pages_pushed;
        stats.pages_zeroed += s.pages_zeroed;
        stats.lazy_ms = stats.lazy_ms.max(s.lazy_ms);
    }
    // Every page is in (every userfaultfd closed): the tracer goes.
    for r in running {
        if let Err(e) = r.finish() {
            return end(record, "failed after resume", format!("letting the tree go: {e}"));
        }
    }
    let _ = send_json(medium, serde_json::json!({"type": "lazy-done", "stats": stats}));
    record.pages += stats.pages_faulted + stats.pages_pushed;
    record.bytes += (stats.pages_faulted + stats.pages_pushed) * 4096;
    end(record, "committed", String::new())
}
