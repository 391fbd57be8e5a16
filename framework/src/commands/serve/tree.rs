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
    engine::rebuild::{Blank, Held},
    engine::tree::{check_announced, release_tree, restore_tree},
    engine::watchdog::Watchdog,
    image::{Inventory, INVENTORY_STREAM},
    wire::messages::{recv_verdict, send_verdict},
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
    let pids = held.iter().flat_map(|h| h.pids().clone()).collect();
    crate::fault::point("before-commit");
    if let Err(e) = send_verdict(medium, &Verdict::Rebuilt { pids, restore_ms: event::ms(started) }) {
        abort_all(held);
        return end(record, "rolled back", e);
    }
    crate::trace::mark("rebuilt sent");
    match recv_verdict(medium, timeout) {
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
