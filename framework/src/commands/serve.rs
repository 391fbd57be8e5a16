//! The destination of a live migration: one event a daemon serves on an accepted
//! connection. It authenticates the source, agrees on the mechanism, makes the restore
//! child while the source still runs, rebuilds the process from the streams as they
//! arrive and holds it stopped until the source commits; post-copy then pages its
//! memory in while it runs. Before the commit every failure kills what was built.

use std::{
    net::TcpStream,
    os::fd::IntoRawFd,
    time::{Duration, Instant},
};

use ferry_plugin_api::{MediumBox, PluginKind};
use serde::Serialize;

use crate::{
    engine::event,
    engine::manager::Manager,
    engine::rebuild::{self, Plan},
    engine::watchdog::Watchdog,
    strategies::pager::Pager,
    wire::messages::{recv_json, recv_verdict, send_json, send_verdict},
    wire::protocol::{self, Local, PluginRef, Verdict},
};

mod tree;

/// Post-copy after the commit: the process runs, still traced (it dies with this
/// daemon rather than run on without its memory), while its pages arrive; then it is
/// let go.
fn lazy_commit(
    held: rebuild::Held,
    mut pager: Pager,
    medium: &mut MediumBox,
    timeout: Duration,
    mut record: EventRecord,
    end: impl Fn(EventRecord, &'static str, String) -> EventRecord,
) -> EventRecord {
    let pid = held.pid();
    let mut running = match held.run_traced() {
        Ok(r) => r,
        Err(e) => return end(record, "failed", format!("releasing the process: {e}")),
    };
    let _ = send_verdict(medium, &Verdict::Released);
    crate::trace::mark("running (post-copy)");
    record.new_pid = Some(pid);
    record.bytes = running.stats.bytes;
    record.pages = running.stats.pages;
    if let Err(e) = pager.run(medium, timeout, &mut || running.tend().map_err(|e| e.to_string())) {
        // Without its pages the process cannot go on: it goes, rather than hang on a
        // fault. The source gave itself up at the commit and is killed too: the process
        // is lost (it is never run twice).
        running.kill();
        record.new_pid = None;
        return end(
            record,
            "failed after resume",
            format!("post-copy: {e}; the source is gone, the process here (pid {pid}) cannot be completed and is killed: the process is lost"),
        );
    }
    // Every page is in: the userfaultfd goes first (a thread waiting for us to read a
    // mapping change of its own is let go by that, and could not be stopped before),
    // then the tracer.
    let stats = pager.finish();
    if let Err(e) = running.finish() {
        return end(record, "failed after resume", format!("letting the process go: {e}"));
    }
    let _ = send_json(medium, serde_json::json!({"type": "lazy-done", "stats": stats}));
    record.pages += stats.pages_faulted + stats.pages_pushed;
    record.bytes += (stats.pages_faulted + stats.pages_pushed) * 4096;
    end(record, "committed", String::new())
}

/// Closes a connection whose peer was just sent a refusal so that the refusal reaches it:
/// closed with bytes of the peer's unread, the connection would be reset and the
/// refusal lost. What the peer still sends is read and dropped, for a second at most.
fn close_after_refusal(stream: &TcpStream) {
    use std::io::Read;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut sink = [0u8; 16 << 10];
    let mut reader = stream;
    while Instant::now() < deadline {
        match reader.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// Tokens of the events this daemon saw lately (a replayed hello is refused).
static SEEN_TOKENS: std::sync::Mutex<std::collections::VecDeque<String>> = std::sync::Mutex::new(std::collections::VecDeque::new());
const SEEN_TOKENS_KEPT: usize = 4096;

/// What the daemon knows of itself for the handshake.
pub fn local(manager: &Manager, features: &[String]) -> Local {
    let plugins = manager.list().into_iter().map(|m| PluginRef { name: m.name, version: m.version }).collect();
    let mut local = Local::this_machine(plugins, features.to_vec());
    local.claim_token = Some(claim_token);
    local
}

/// Takes `token` for the event being welcomed, unless one took it already.
fn claim_token(token: &str) -> bool {
    let mut seen = SEEN_TOKENS.lock().unwrap_or_else(|p| p.into_inner());
    if seen.iter().any(|t| t == token) {
        return false;
    }
    if seen.len() >= SEEN_TOKENS_KEPT {
        seen.pop_front();
    }
    seen.push_back(token.to_string());
    true
}

/// What the daemon records of one event: a line for its log, a JSON object for its
/// per-event statistics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EventRecord {
    pub token: Option<String>,
    pub source: String,
    /// The pid on the source.
    pub pid: Option<i32>,
    /// What the source asked for, once it has said (the hello).
    pub strategy: Option<String>,
    pub medium: Option<String>,
    /// refused, failed, rolled back, committed.
    pub outcome: &'static str,
    pub detail: String,
    /// The pid here, once committed.
    pub new_pid: Option<i32>,
    pub bytes: u64,
    pub pages: u64,
    /// Connection to release.
    pub total_ms: f64,
    /// When each phase ended, from the connection's acceptance.
    pub phases: Vec<crate::trace::Phase>,
}

impl EventRecord {
    pub fn line(&self) -> String {
        let who = match (&self.token, self.pid) {
            (Some(t), Some(p)) => format!(
                "event {t} from {} pid {p} ({} over {})",
                self.source,
                self.strategy.as_deref().unwrap_or("?"),
                self.medium.as_deref().unwrap_or("?")
            ),
            _ => format!("from {}", self.source),
        };
        match self.new_pid {
            Some(new) => format!(
                "{who}: committed as pid {new}, {} bytes, total {:.1} ms",
                self.bytes, self.total_ms
            ),
            None => format!("{who}: {}: {}", self.outcome, self.detail),
        }
    }
}

/// One migration arriving at the daemon, on an accepted connection.
/// `handshaken` is called once the peer has authenticated and shaken hands.
pub fn serve(
    manager: &Manager,
    mut stream: TcpStream,
    key: Option<&[u8]>,
    features: &[String],
    id: u64,
    timeout: Duration,
    handshaken: &mut dyn FnMut(),
) -> EventRecord {
    let source = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let started = Instant::now();
    crate::trace::phases_begin();
    let mut record = EventRecord { source, ..EventRecord::default() };
    let end = |mut r: EventRecord, outcome: &'static str, detail: String| {
        r.outcome = outcome;
        r.detail = detail;
        r.total_ms = event::ms(started);
        r.phases = crate::trace::phases_take();
        r
    };
    let _ = stream.set_read_timeout(Some(timeout));
    if let Err(e) = protocol::authenticate_server(&mut stream, key) {
        close_after_refusal(&stream);
        return end(record, "refused", e.to_string());
    }
    let hello = match protocol::server_handshake(&mut stream, &local(manager, features), id) {
        Ok(h) => h,
        Err(e) => {
            close_after_refusal(&stream);
            return end(record, "refused", e.to_string());
        }
    };
    handshaken();
    crate::trace::mark("handshake done");
    record.token = Some(hello.token.clone());
    record.pid = Some(hello.pid);
    record.strategy = Some(hello.strategy.clone());
    record.medium = Some(hello.medium.name.clone());
    crate::fault::point("after-handshake");
    if !super::migrate::MEDIA.contains(&hello.medium.name.as_str()) {
        close_after_refusal(&stream);
        return end(record, "refused", format!("medium {} carries no migration", hello.medium.name));
    }
    let lease = match manager.acquire(PluginKind::Medium, &hello.medium.name) {
        Ok(l) => l,
        Err(e) => return end(record, "failed", e.to_string()),
    };
    let fd = stream.into_raw_fd();
    let mut medium = match lease.open_medium(&serde_json::json!({"fd": fd, "timeout_ms": timeout.as_millis() as u64})) {
        Ok(m) => m,
        Err(e) => {
            // On error the medium leaves the socket to its caller.
            // SAFETY: fd came from into_raw_fd above and is closed once, here.
            drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            return end(record, "failed", e.to_string());
        }
    };
    // The source's options for plugins, for this event (this thread).
    let _params = crate::engine::params::scope(hello.plugin_params.clone());
    // The restore child is made now, while the source still runs.
    let child = match rebuild::Blank::make(hello.pid) {
        Ok(c) => c,
        Err(e) => {
            let _ = send_json(&mut medium, serde_json::json!({"type": "failed", "reason": e.to_string()}));
            return end(record, "failed", e.to_string());
        }
    };
    if let Err(e) = send_json(&mut medium, serde_json::json!({"type": "ready"})) {
        return end(record, "failed", e);
    }
    let mut tuning = (256 << 10, 2 << 20);
    let mut tree = None;
    let plan = recv_json(&mut medium, timeout).and_then(|mut m| {
        if let (Some(w), Some(b)) = (m["post_copy"]["window"].as_u64(), m["post_copy"]["batch"].as_u64()) {
            tuning = (w.clamp(4096, 1 << 30), b.clamp(4096, 64 << 20));
        }
        if m["type"] == "tree-plan" {
            // A process with children: the whole tree follows.
            let inventory = serde_json::from_value(m["inventory"].take()).map_err(|e| format!("a bad tree plan: {e}"))?;
            tree = Some(inventory);
            return Err(String::new());
        }
        if m["type"] != "plan" {
            return Err(format!("expected the plan, got {m}"));
        }
        serde_json::from_value::<Plan>(m["plan"].take()).map_err(|e| format!("a bad plan: {e}"))
    });
    crate::trace::mark("plan received");
    if let Some(inventory) = tree {
        return tree::serve_tree(manager, &mut medium, inventory, child, timeout, tuning, started, record, end);
    }
    let plan = match plan {
        Ok(p) => p,
        Err(e) => return end(record, "failed", e),
    };
    // The last resort if a plugin stops answering: this event's thread stays stuck,
    // but the half-built process is killed; the source times out and rolls back.
    let stuck = record.clone();
    let watchdog = Watchdog::start(timeout, move |why, victim| {
        if victim > 0 {
            // SAFETY: killing the restore child this event created.
            unsafe { libc::kill(victim, libc::SIGKILL) };
        }
        crate::trace::daemon_log(EventRecord { outcome: "rolled back", detail: why, ..stuck }.line());
    });
    let rebuilt = rebuild::restore_streaming(manager, &mut medium, &plan, Some(child), &watchdog, started, &mut |_| {});
    drop(watchdog);
    let mut held = match rebuilt {
        Ok(h) => h,
        Err(e) => {
            let _ = send_verdict(&mut medium, &Verdict::Failed { reason: e.to_string() });
            return end(record, "failed", e.to_string());
        }
    };
    // Post-copy: the lazy areas are registered before the process may run.
    let pager = match held.lazy.take() {
        None => Ok(None),
        Some(plan) => held.userfaultfd().map_err(|e| e.to_string()).and_then(|uffd| {
            let mut pager = Pager::new(held.pid(), uffd, plan, tuning.0, tuning.1);
            pager.settle(&mut medium, timeout)?;
            crate::trace::mark("lazy pages settled");
            pager.register()?;
            crate::trace::mark("lazy areas registered");
            Ok(Some(pager))
        }),
    };
    let mut pager = match pager {
        Ok(p) => p,
        Err(e) => {
            held.abort();
            let _ = send_verdict(&mut medium, &Verdict::Failed { reason: e.clone() });
            return end(record, "failed", e);
        }
    };
    let pids = held.pids().clone();
    crate::fault::point("before-commit");
    if let Err(e) = send_verdict(&mut medium, &Verdict::Rebuilt { pids: pids.clone(), restore_ms: event::ms(started) }) {
        held.abort();
        return end(record, "rolled back", e);
    }
    crate::trace::mark("rebuilt sent");
    let verdict = recv_verdict(&mut medium, timeout);
    if matches!(verdict, Ok(Verdict::Commit)) {
        crate::trace::mark("commit received");
        crate::fault::point("commit-received");
    }
    match verdict {
        Ok(Verdict::Commit) if pager.is_some() => {
            // The copy runs only once the source gave itself up: `Ready` is its commit
            // point, `Run` says it was reached (protocol.rs).
            let pid = held.pid();
            if let Err(e) = send_verdict(&mut medium, &Verdict::Ready) {
                held.abort();
                return end(record, "rolled back", e);
            }
            match recv_verdict(&mut medium, timeout) {
                Ok(Verdict::Run) => {
                    crate::fault::point("run-received");
                    lazy_commit(held, pager.take().expect("checked"), &mut medium, timeout, record, end)
                }
                Ok(other) => {
                    held.abort();
                    end(record, "rolled back", format!("the source said {other:?}"))
                }
                Err(e) => {
                    held.abort();
                    end(
                        record,
                        "failed",
                        format!("no word from the source after `ready` ({e}): the process here (pid {pid}), which never ran, is killed; the source, if it took `ready`, is gone too"),
                    )
                }
            }
        }
        Ok(Verdict::Commit) => match held.release() {
            Ok(stats) => {
                let _ = send_verdict(&mut medium, &Verdict::Released);
                record.new_pid = pids.values().next().copied();
                record.bytes = stats.bytes;
                record.pages = stats.pages;
                end(record, "committed", String::new())
            }
            Err(e) => end(record, "failed", format!("releasing the process: {e}")),
        },
        Ok(other) => {
            held.abort();
            end(record, "rolled back", format!("the source said {other:?}"))
        }
        Err(e) => {
            held.abort();
            end(record, "rolled back", e)
        }
    }
}
