//! Live migration, stop-copy: the coordinator on the source (`ferry migrate`) and the
//! event a destination daemon serves. The protocol (`protocol.rs`) authenticates and
//! agrees on the mechanism before anything is frozen; the image then travels through
//! the TCP medium; the destination rebuilds the process and holds it stopped; the
//! source's receipt of `Rebuilt` is the commit point. Before it, every failure thaws
//! the source and the destination kills what it built.

use std::{
    collections::BTreeMap,
    io::Write,
    net::{TcpStream, ToSocketAddrs},
    os::fd::IntoRawFd,
    time::{Duration, Instant},
};

use abi_stable::std_types::RStr;
use ferry_plugin_api::{MediumBox, PluginKind};
use serde::Serialize;

use crate::{
    checkpoint::{quiesce, write_image},
    config::Quiesce,
    event::{self, EventError},
    manager::Manager,
    pipeline::Pipeline,
    protocol::{self, Hello, Local, PluginRef, Verdict},
    image::{PluginEntry, ProcessEntry},
    restore::{self, Plan},
    tracer,
    watchdog::Watchdog,
};

/// The kernel features a stop-copy event needs on the destination.
pub const FEATURES: &[&str] = &["ptrace-seize", "process-vm-readv", "pidfd", "clone3-set-tid"];

pub struct MigrateRequest {
    pub pid: i32,
    pub to: String,
    pub subsystems: Vec<String>,
    pub quiesce: Quiesce,
    pub auth_key: Option<Vec<u8>>,
    /// How long to wait for the destination at each step before giving up.
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct MigrateStats {
    pub token: String,
    pub strategy: &'static str,
    pub pids: BTreeMap<String, i32>,
    pub frozen_ms: f64,
    pub total_ms: f64,
    pub bytes: u64,
    pub pages: u64,
    pub rounds: u32,
}

fn refused(message: impl Into<String>) -> EventError {
    EventError::Refused(message.into())
}

/// A control message through the medium.
fn send_json(medium: &mut MediumBox, msg: serde_json::Value) -> Result<(), String> {
    let cmd = serde_json::json!({"op": "send", "msg": msg}).to_string();
    medium.command(RStr::from_str(&cmd)).into_result().map(|_| ()).map_err(|e| e.message.into_string())
}

fn recv_json(medium: &mut MediumBox, timeout: Duration) -> Result<serde_json::Value, String> {
    let cmd = serde_json::json!({"op": "recv", "timeout_ms": timeout.as_millis() as u64}).to_string();
    let reply = medium.command(RStr::from_str(&cmd)).into_result().map_err(|e| e.message.into_string())?;
    let mut v: serde_json::Value = serde_json::from_str(reply.as_str()).map_err(|e| format!("bad reply from the medium: {e}"))?;
    Ok(v["msg"].take())
}

fn send_verdict(medium: &mut MediumBox, v: &Verdict) -> Result<(), String> {
    send_json(medium, serde_json::from_str(&v.to_json()).map_err(|e| e.to_string())?)
}

fn recv_verdict(medium: &mut MediumBox, timeout: Duration) -> Result<Verdict, String> {
    Verdict::from_json(&recv_json(medium, timeout)?.to_string()).map_err(|e| e.to_string())
}

/// Moves process `req.pid` to the daemon at `req.to`.
pub fn migrate(manager: &Manager, req: &MigrateRequest, progress: &mut dyn FnMut(&str)) -> Result<MigrateStats, EventError> {
    let started = Instant::now();
    tracer::check_target(req.pid)?;
    let mut subs = event::load_subsystems(manager, &req.subsystems)?;
    let lease = manager.acquire(PluginKind::Medium, "tcp")?;

    let addr = req
        .to
        .to_socket_addrs()
        .map_err(|e| refused(format!("cannot resolve {}: {e}", req.to)))?
        .next()
        .ok_or_else(|| refused(format!("{} resolves to no address", req.to)))?;
    let mut stream = TcpStream::connect_timeout(&addr, req.timeout)
        .map_err(|e| refused(format!("cannot reach a ferry daemon at {}: {e}", req.to)))?;
    stream.set_read_timeout(Some(req.timeout)).map_err(|e| refused(e.to_string()))?;
    protocol::authenticate_client(&mut stream, req.auth_key.as_deref()).map_err(|e| refused(e.to_string()))?;
    let hello = Hello::new(
        std::process::id() as u64,
        req.pid,
        "stop-copy",
        PluginRef::new("tcp", &lease.meta().version),
        subs.iter().map(|l| PluginRef::new(&l.name, &l.version)).collect(),
        FEATURES.iter().map(|s| s.to_string()).collect(),
    );
    let welcome = protocol::client_handshake(&mut stream, &hello).map_err(|e| refused(e.to_string()))?;
    let _ = stream.flush();
    let fd = stream.into_raw_fd();
    let medium = lease.open_medium(&serde_json::json!({"fd": fd, "timeout_ms": req.timeout.as_millis() as u64}))?;

    // Nothing was touched until here.
    let frozen_at = Instant::now();
    let (mut tracer, freezer) = quiesce(req.pid, req.quiesce)?;
    // The plan goes ahead of the streams, so the destination rebuilds while they arrive.
    let mut medium = medium;
    let announced = tracer.map_scratch(0).map_err(EventError::from).and_then(|scratch| {
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", req.pid)).unwrap_or_default().trim().to_string();
        let plan = Plan {
            process: ProcessEntry { pid: req.pid, tids: tracer.tids(), comm, scratch },
            plugins: subs
                .iter()
                .enumerate()
                .map(|(i, l)| PluginEntry { name: l.name.clone(), version: l.version.clone(), stream: i as u32 + 1, records: 0, bytes: 0 })
                .collect(),
        };
        let msg = serde_json::json!({"type": "plan", "plan": plan});
        send_json(&mut medium, msg).map_err(|e| refused(format!("sending the plan: {e}")))
    });
    if let Err(e) = announced {
        let _ = tracer.unmap_scratch();
        let _ = tracer.detach();
        return Err(e);
    }
    let mut pipe = Pipeline::new(medium);
    // The last resort if a plugin stops answering: exit; the kernel detaches the
    // source, which carries on, and the destination loses the connection and rolls back.
    let pid = req.pid;
    let rescue = freezer.as_ref().map(|f| f.rescue());
    let watchdog = Watchdog::start(req.timeout, move |why, _| {
        eprintln!("ferry: {why}; process {pid} is let go");
        if let Some(r) = rescue {
            r();
        }
        std::process::exit(1);
    });
    let written = write_image(&mut tracer, &mut subs, &mut pipe, "tcp", req.pid, &watchdog, progress);
    drop(watchdog);
    let mut medium = pipe.finish();
    let outcome = (|| {
        let (bytes, pages) = written?;
        let medium = medium.as_mut().ok_or_else(|| refused("the medium's writer thread failed"))?;
        medium.command(RStr::from_str(r#"{"op":"end"}"#)).into_result().map_err(|e| refused(e.message.into_string()))?;
        match recv_verdict(medium, req.timeout).map_err(|e| refused(format!("waiting for the destination: {e}")))? {
            Verdict::Rebuilt { pids, .. } => Ok((bytes, pages, pids)),
            Verdict::Failed { reason } => Err(refused(format!("the destination could not rebuild the process: {reason}"))),
            other => Err(refused(format!("unexpected message from the destination: {other:?}"))),
        }
    })();
    match outcome {
        Ok((bytes, pages, pids)) => {
            // The destination holds the rebuilt process stopped. The source goes only
            // once the destination confirms it let its copy run: a lost message may
            // leave two copies to sort out, but never none.
            let medium = medium.as_mut().ok_or_else(|| refused("no medium"))?;
            let released = send_verdict(medium, &Verdict::Commit).and_then(|_| recv_verdict(medium, req.timeout));
            match released {
                Ok(Verdict::Released) => {}
                other => {
                    let why = match other {
                        Ok(v) => format!("it answered {v:?}"),
                        Err(e) => e,
                    };
                    let _ = tracer.unmap_scratch();
                    let _ = tracer.detach();
                    drop(freezer);
                    return Err(refused(format!("the destination did not confirm running the process ({why}); it runs on here")));
                }
            }
            tracer.kill();
            drop(freezer);
            let frozen_ms = event::ms(frozen_at);
            let new = pids.get(&req.pid.to_string()).copied().unwrap_or(0);
            Ok(MigrateStats {
                token: welcome.token,
                strategy: "stop-copy",
                pids: BTreeMap::from([(req.pid.to_string(), new)]),
                frozen_ms,
                total_ms: event::ms(started),
                bytes,
                pages,
                rounds: 1,
            })
        }
        Err(e) => {
            // Before the commit point: the source carries on as if nothing happened.
            if let Some(m) = medium.as_mut() {
                let _ = send_verdict(m, &Verdict::Abort { reason: e.to_string() });
            }
            let _ = tracer.unmap_scratch();
            let _ = tracer.detach();
            drop(freezer);
            Err(e)
        }
    }
}

/// What the daemon knows of itself for the handshake.
pub fn local(manager: &Manager, features: &[String]) -> Local {
    let plugins = manager.list().into_iter().map(|m| PluginRef { name: m.name, version: m.version }).collect();
    Local::this_machine(plugins, features.to_vec())
}

/// What the daemon records of one event: a line for its log, a JSON object for its
/// per-event statistics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EventRecord {
    pub token: Option<String>,
    pub source: String,
    /// The pid on the source.
    pub pid: Option<i32>,
    /// refused, failed, rolled back, committed.
    pub outcome: &'static str,
    pub detail: String,
    /// The pid here, once committed.
    pub new_pid: Option<i32>,
    pub bytes: u64,
    pub pages: u64,
    /// Connection to release.
    pub total_ms: f64,
}

impl EventRecord {
    pub fn line(&self) -> String {
        let who = match (&self.token, self.pid) {
            (Some(t), Some(p)) => format!("event {t} from {} pid {p}", self.source),
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
pub fn serve(manager: &Manager, mut stream: TcpStream, key: Option<&[u8]>, features: &[String], id: u64, timeout: Duration) -> EventRecord {
    let source = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let started = Instant::now();
    let mut record = EventRecord { source, ..EventRecord::default() };
    let end = |mut r: EventRecord, outcome: &'static str, detail: String| {
        r.outcome = outcome;
        r.detail = detail;
        r.total_ms = event::ms(started);
        r
    };
    let _ = stream.set_read_timeout(Some(timeout));
    if let Err(e) = protocol::authenticate_server(&mut stream, key) {
        return end(record, "refused", e.to_string());
    }
    let hello = match protocol::server_handshake(&mut stream, &local(manager, features), id) {
        Ok(h) => h,
        Err(e) => return end(record, "refused", e.to_string()),
    };
    record.token = Some(hello.token.clone());
    record.pid = Some(hello.pid);
    crate::fault::point("after-handshake");
    let lease = match manager.acquire(PluginKind::Medium, "tcp") {
        Ok(l) => l,
        Err(e) => return end(record, "failed", e.to_string()),
    };
    let fd = stream.into_raw_fd();
    let mut medium = match lease.open_medium(&serde_json::json!({"fd": fd, "timeout_ms": timeout.as_millis() as u64})) {
        Ok(m) => m,
        Err(e) => return end(record, "failed", e.to_string()),
    };
    let plan = recv_json(&mut medium, timeout).and_then(|mut m| {
        if m["type"] != "plan" {
            return Err(format!("expected the plan, got {m}"));
        }
        serde_json::from_value::<Plan>(m["plan"].take()).map_err(|e| format!("a bad plan: {e}"))
    });
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
        eprintln!("ferry daemon: {}", EventRecord { outcome: "rolled back", detail: why, ..stuck }.line());
    });
    let rebuilt = restore::restore_streaming(manager, &mut medium, &plan, &watchdog, started, &mut |_| {});
    drop(watchdog);
    let held = match rebuilt {
        Ok(h) => h,
        Err(e) => {
            let _ = send_verdict(&mut medium, &Verdict::Failed { reason: e.to_string() });
            return end(record, "failed", e.to_string());
        }
    };
    let pids = held.pids().clone();
    crate::fault::point("before-commit");
    if let Err(e) = send_verdict(&mut medium, &Verdict::Rebuilt { pids: pids.clone(), restore_ms: event::ms(started) }) {
        held.abort();
        return end(record, "rolled back", e);
    }
    match recv_verdict(&mut medium, timeout) {
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
