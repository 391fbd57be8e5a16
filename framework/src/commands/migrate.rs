//! `ferry migrate`: the coordinator on the source of a live migration (the destination
//! daemon's side is [`super::serve`]). The algorithm ([`crate::strategies`]) says
//! whether pre-copy rounds run first and whether memory follows after the resume. The
//! protocol ([`crate::wire`]) authenticates and agrees on the mechanism before anything
//! is frozen; the image then travels through the TCP medium; the destination rebuilds
//! the process and holds it stopped; the source's receipt of `Rebuilt` is the commit
//! point (post-copy and hybrid: of `Ready`, one exchange later, see [`lose`]). Before
//! it, every failure thaws the source and the destination kills what it built.

use std::{
    collections::BTreeMap,
    io::Write,
    net::{TcpStream, ToSocketAddrs},
    os::fd::IntoRawFd,
    time::{Duration, Instant},
};

use abi_stable::std_types::RStr;
use ferry_plugin_api::{MediumBox, MemRange, PluginKind};
use serde::Serialize;

use crate::{
    commands::janitor::Janitor,
    kernel::target,
    config::{Quiesce, Strategy},
    engine::context::{ExternalContext, SharedTable},
    engine::dump::{process_entry, quiesce, write_image, Live, Sent},
    engine::event::Loaded,
    engine::event::{Tick, self, EventError},
    engine::manager::Manager,
    engine::pipeline::Pipeline,
    engine::rebuild::Plan,
    engine::watchdog::Watchdog,
    image::PluginEntry,
    kernel::dirty::DirtyTracker,
    kernel::tracer::Tracer,
    strategies::pager::{serve_until_message, LazyStats, LAZY_STREAM},
    strategies::{self, rounds::{self, Outcome}},
    strategies::throttle::Throttle,
    wire::messages::{recv_json, send_json, send_verdict},
    wire::protocol::{self, Hello, PluginRef, Verdict},
};

mod tree;

/// The kernel features a stop-copy event needs on the destination.
pub const FEATURES: &[&str] = &["ptrace-seize", "process-vm-readv", "pidfd", "clone3-set-tid"];

/// The media a migration can use: both carry streams to a peer over the network.
pub const MEDIA: [&str; 2] = ["tcp", "rdma"];

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub struct MigrateRequest {
    pub pid: i32,
    pub to: String,
    pub subsystems: Vec<String>,
    pub quiesce: Quiesce,
    pub auth_key: Option<Vec<u8>>,
    /// How long to wait for the destination at each step before giving up.
    pub timeout: Duration,
    pub strategy: Strategy,
    pub pre_copy: rounds::Tuning,
    /// Hybrid: pre-copy rounds before the post-copy.
    pub hybrid_rounds: u32,
    /// Post-copy: bytes fetched around a fault, bytes per background request.
    pub fault_window: u64,
    pub push_batch: u64,
    /// The medium the image travels through (`tcp` or `rdma`), and its own settings.
    pub medium: String,
    pub medium_params: serde_json::Map<String, serde_json::Value>,
    /// Options for plugins (`mechanism.plugin_params`), here and at the destination.
    pub plugin_params: crate::engine::params::PluginParams,
}

#[derive(Debug, Clone, Serialize)]
pub struct MigrateStats {
    pub token: String,
    pub strategy: String,
    pub pids: BTreeMap<String, i32>,
    pub frozen_ms: f64,
    pub total_ms: f64,
    pub bytes: u64,
    pub pages: u64,
    /// Pre-copy rounds plus the frozen one (1 for stop-copy).
    pub rounds: u32,
    /// Bytes sent in each round, the frozen one last.
    pub round_bytes: Vec<u64>,
    /// Duration of each round, as many as `round_bytes`: the live rounds', then the
    /// frozen one's, which is `frozen_ms` (freeze to resume).
    pub round_ms: Vec<f64>,
    /// Why pre-copy stopped iterating: converged, max rounds, not shrinking.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precopy_stop: Option<&'static str>,
    /// Auto-converge steps taken (each halves the process's CPU share).
    pub throttle: u32,
    /// Post-copy and hybrid: freeze → running on the destination (as `frozen_ms`),
    /// and what moved after it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed_ms: Option<f64>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub lazy: Option<LazyStats>,
    /// When each phase ended, from the command's start (`crate::trace::mark`s).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<crate::trace::Phase>,
}

fn refused(message: impl Into<String>) -> EventError {
    EventError::Refused(message.into())
}

fn failed(message: impl Into<String>) -> EventError {
    EventError::Failed(message.into())
}

/// A refusal when the peer (or its key, or its version) says no; a failure when the
/// connection broke.
fn protocol_err(e: protocol::ProtocolError) -> EventError {
    use protocol::ProtocolError as P;
    match e {
        P::Io(_) | P::Closed | P::Silent | P::Truncated { .. } | P::Random(_) => failed(e.to_string()),
        _ => refused(e.to_string()),
    }
}

/// The next verdict, answering the destination's page requests meanwhile (post-copy).
fn verdict_serving(medium: &mut MediumBox, pid: i32, timeout: Duration) -> Result<Verdict, String> {
    Verdict::from_json(&serve_until_message(medium, pid, timeout, false)?.to_string()).map_err(|e| e.to_string())
}

/// What the destination answered instead of what was expected, or why it did not.
fn unexpected<T: std::fmt::Debug>(answer: Result<T, String>) -> String {
    match answer {
        Ok(v) => format!("it answered {v:?}"),
        Err(e) => e,
    }
}

/// Announces the process and the plugins' streams ahead of the streams, so the
/// destination starts rebuilding while they arrive.
fn send_plan(medium: &mut MediumBox, tracer: &mut Tracer, subs: &[Loaded], req: &MigrateRequest, janitor: &mut Option<Janitor>) -> Result<u64, EventError> {
    // The janitor learns where before the call that maps it (ferry may die in it).
    let at = tracer.scratch_address();
    if let (Some(j), true) = (janitor.as_mut(), at != 0) {
        j.scratch(req.pid, at);
    }
    let scratch = tracer.map_scratch(at)?;
    if let (Some(j), true) = (janitor.as_mut(), scratch != at) {
        j.scratch(req.pid, scratch);
    }
    let plan = Plan {
        process: process_entry(tracer, scratch),
        plugins: subs
            .iter()
            .enumerate()
            .map(|(i, l)| PluginEntry { name: l.name.clone(), version: l.version.clone(), stream: i as u32 + 1, records: 0, bytes: 0 })
            .collect(),
    };
    let lazy = serde_json::json!({"window": req.fault_window, "batch": req.push_batch});
    send_json(medium, serde_json::json!({"type": "plan", "plan": plan, "post_copy": lazy}))
        .map_err(|e| failed(format!("sending the plan: {e}")))?;
    Ok(scratch)
}

/// Puts the source back as it was after a failure: no dirty tracking, no scratch area,
/// no throttle, running.
fn let_go(mut tracer: Tracer, live: Option<Live>) {
    if let Some(l) = live {
        l.tracker.stop();
    }
    let _ = tracer.unmap_scratch();
    let _ = tracer.detach();
}

/// A lazy migration that failed past its commit point (`Verdict::Ready`): the copy on
/// the destination may have run, so the source, whose effects it would repeat, never
/// runs again. Its plugins hear the event failed (the network lock is lifted: its
/// connections are gone with it), it is killed and reaped, ferry's cgroup goes; the
/// error says the process was lost, and `why`.
fn lose(mut tracer: Tracer, freezer: Option<crate::kernel::freezer::Freezer>, subs: &mut [Loaded], req: &MigrateRequest, why: String) -> EventError {
    let pid = req.pid;
    // The tracer dies with ferry, and the source with the tracer (die_with_ferry).
    let watchdog = Watchdog::last_resort(req.timeout, format!("process {pid} is killed (it was lost)"), || {});
    let mut shared = SharedTable::default();
    event::cleanup_all(subs, &mut ExternalContext::new(&mut tracer, &mut shared, "ferry", &watchdog), false);
    drop(watchdog);
    tracer.kill();
    drop(freezer);
    crate::trace::mark("lost: source killed");
    failed(format!("process {pid} was lost: {why}"))
}

/// The pre-copy part of a migration, while the process runs: a brief stop to start
/// dirty tracking (and map the scratch area, which stays for the event) and announce
/// the plan, then the rounds. Answers the state the freeze carries on with.
fn precopy_phase(
    req: &MigrateRequest,
    tuning: &rounds::Tuning,
    subs: &mut [Loaded],
    medium: MediumBox,
    throttle: &mut Option<Throttle>,
    progress: &mut dyn FnMut(&Tick),
    janitor: &mut Option<Janitor>,
) -> Result<(MediumBox, Live, u64, Outcome), (EventError, Option<MediumBox>)> {
    let (mut tracer, _) = quiesce(req.pid, Quiesce::Ptrace).map_err(|e| (e, None))?;
    let mut medium = medium;
    let started = send_plan(&mut medium, &mut tracer, subs, req, janitor).and_then(|scratch| {
        let tracker = DirtyTracker::start(&mut tracer, &[], tuning.tracking).map_err(|e| failed(format!("dirty-page tracking: {e}")))?;
        Ok((scratch, tracker))
    });
    let (scratch, tracker) = match started {
        Ok(v) => v,
        Err(e) => {
            let_go(tracer, None);
            return Err((e, Some(medium)));
        }
    };
    let mut live = Live { tracker, sent: vec![Sent::default(); subs.len()] };
    // The process runs during the rounds: the scratch area stays, the tracer goes.
    if let Err(e) = tracer.detach() {
        if let Ok((mut again, _)) = quiesce(req.pid, Quiesce::Ptrace) {
            again.set_scratch(Some(scratch));
            let_go(again, Some(live));
        }
        return Err((e.into(), Some(medium)));
    }
    let mut pipe = Pipeline::direct(medium);
    let pid = req.pid;
    let rescue = throttle.as_ref().map(|t| t.rescue());
    let watchdog = Watchdog::last_resort(req.timeout, format!("process {pid} is let go"), move || rescue.into_iter().for_each(|r| r()));
    let area = MemRange { addr: scratch, len: crate::kernel::tracer::SCRATCH_SIZE };
    let ran = rounds::run(req.pid, area, subs, &mut pipe, &mut live, tuning, throttle, &watchdog, req.timeout, progress);
    drop(watchdog);
    let medium = pipe.finish();
    match (ran, medium) {
        (Ok(outcome), Some(medium)) => Ok((medium, live, scratch, outcome)),
        (ran, medium) => {
            let e = ran.err().unwrap_or_else(|| failed("the medium failed during pre-copy"));
            match quiesce(req.pid, Quiesce::Ptrace) {
                Ok((mut t, _)) => {
                    t.set_scratch(Some(scratch));
                    let_go(t, Some(live));
                }
                Err(_) => drop(live),
            }
            Err((e, medium))
        }
    }
}
/// Moves process `req.pid` to the daemon at `req.to`.
///
/// Should this ferry die from the first touch of the process on (SIGKILL: no
/// destructor runs), a janitor removes its scratch area from the source once the
/// kernel let it go (kernel/guardian.rs takes it home from ferry's cgroups). It is
/// dismissed when the migration succeeded; after a failure it checks the area is gone.
pub fn migrate(manager: &Manager, req: &MigrateRequest, progress: &mut dyn FnMut(&Tick)) -> Result<MigrateStats, EventError> {
    let mut janitor = None;
    let _params = crate::engine::params::scope(req.plugin_params.clone());
    let result = migrate_with(manager, req, progress, &mut janitor);
    if let Some(j) = janitor {
        if result.is_ok() {
            j.dismiss();
        } else {
            j.check();
        }
    }
    result
}

fn migrate_with(
    manager: &Manager,
    req: &MigrateRequest,
    progress: &mut dyn FnMut(&Tick),
    janitor: &mut Option<Janitor>,
) -> Result<MigrateStats, EventError> {
    let started = Instant::now();
    // "127.0.0.1" or "host": no port (an IPv6 address needs brackets to take one).
    if !req.to.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok()) {
        return Err(refused(format!("--to {} names no port: give HOST:PORT (the daemon listens on 127.0.0.1:7711 by default)", req.to)));
    }
    target::check_target(req.pid)?;
    target::check_not_ferry(req.pid)?;
    // A process with children moves with them all (one event, one commit).
    let tree = !target::children(req.pid).is_empty();
    crate::trace::mark("migrate");
    let mut subs = event::load_subsystems(manager, &req.subsystems, Some(req.pid))?;
    if !MEDIA.contains(&req.medium.as_str()) {
        return Err(refused(format!("a migration carries its image over {}; medium {} cannot", MEDIA.join(" or "), req.medium)));
    }
    if req.medium == "tcp" && !req.medium_params.is_empty() {
        return Err(refused("mechanism.medium_params are settings of the rdma medium; the tcp medium takes none"));
    }
    let lease = manager.acquire(PluginKind::Medium, &req.medium)?;
    crate::trace::mark("plugins loaded");
    let algorithm = strategies::algorithm(req.strategy, &strategies::Tuning { pre_copy: req.pre_copy, hybrid_rounds: req.hybrid_rounds });
    let (precopy, lazy) = (algorithm.live_rounds(), algorithm.lazy());
    if lazy && target::group_stopped(req.pid) {
        // Its copy would have to run on the destination to page its memory in.
        return Err(refused(format!(
            "process {} is stopped (job control): {} would run it on the destination; use stop-copy or pre-copy",
            req.pid, req.strategy
        )));
    }
    let tracking = match precopy {
        Some(t) => Some(crate::kernel::dirty::resolve(t.tracking).map_err(refused)?),
        None => None,
    };

    let addr = req
        .to
        .to_socket_addrs()
        .map_err(|e| failed(format!("cannot resolve {}: {e}", req.to)))?
        .next()
        .ok_or_else(|| refused(format!("{} resolves to no address", req.to)))?;
    let mut stream = TcpStream::connect_timeout(&addr, req.timeout)
        .map_err(|e| failed(format!("cannot reach a ferry daemon at {}: {e}", req.to)))?;
    stream.set_read_timeout(Some(req.timeout)).map_err(|e| failed(e.to_string()))?;
    // Silence gets the peer and the time waited (it read as "os error 11", then as "in time").
    let waited = match req.timeout.subsec_millis() {
        0 => format!("{} s", req.timeout.as_secs()),
        _ => format!("{} ms", req.timeout.as_millis()),
    };
    let handshake_err = |e: protocol::ProtocolError| match e {
        protocol::ProtocolError::Silent => failed(format!(
            "no answer from {} in {waited} during the handshake (is a ferry daemon listening there, and is it busy?)",
            req.to
        )),
        e => protocol_err(e),
    };
    protocol::authenticate_client(&mut stream, req.auth_key.as_deref()).map_err(handshake_err)?;
    let features: Vec<String> = FEATURES.iter().chain(algorithm.features()).map(|s| s.to_string()).collect();
    let hello = Hello::new(
        std::process::id() as u64,
        req.pid,
        &req.strategy.to_string(),
        PluginRef::new(&req.medium, &lease.meta().version),
        subs.iter().map(|l| PluginRef::new(&l.name, &l.version)).collect(),
        features,
    )
    .with_params(req.plugin_params.clone());
    let welcome = protocol::client_handshake(&mut stream, &hello).map_err(handshake_err)?;
    crate::trace::mark("handshake done");
    let _ = stream.flush();
    let fd = stream.into_raw_fd();
    let mut params = serde_json::json!({"fd": fd, "timeout_ms": req.timeout.as_millis() as u64});
    if req.medium != "tcp" {
        // This side leads the medium's own handshake (both ends check they can carry it).
        params["initiator"] = true.into();
        params["params"] = req.medium_params.clone().into();
    }
    // Nothing is frozen yet: a medium that cannot work here or there is a refusal.
    let mut medium = lease
        .open_medium(&params)
        .map_err(|e| refused(format!("process {}: the {} medium cannot carry it: {}", req.pid, req.medium, one_line(&e.to_string()))))?;
    // The destination readies its restore child first: the freeze does not wait for it.
    match recv_json(&mut medium, req.timeout) {
        Ok(m) if m["type"] == "ready" => {}
        Ok(m) if m["type"] == "failed" => {
            return Err(failed(format!("the destination cannot restore a process: {}", m["reason"].as_str().unwrap_or("?"))))
        }
        Ok(m) => return Err(failed(format!("unexpected message from the destination: {m}"))),
        Err(e) => return Err(failed(format!("waiting for the destination: {e}"))),
    }

    crate::trace::mark("destination ready");
    // Nothing was touched until here.
    *janitor = Janitor::start();
    if tree {
        drop(subs);
        let tuning = precopy.map(|t| rounds::Tuning { tracking: tracking.unwrap_or(t.tracking), ..t });
        return tree::migrate_tree(manager, req, medium, welcome.token, janitor, started, tuning, lazy, progress);
    }
    let mut throttle = None;
    let (medium, mut live, ran) = match precopy.as_ref() {
        None => (medium, None, Outcome::default()),
        Some(tuning) => {
            if tuning.throttle {
                // Unlimited until a round fails to shrink the dirty set.
                throttle = Throttle::new(req.pid).ok();
            }
            let tuning = &rounds::Tuning { tracking: tracking.unwrap_or(tuning.tracking), ..*tuning };
            match precopy_phase(req, tuning, &mut subs, medium, &mut throttle, progress, janitor) {
                Ok((medium, live, scratch, outcome)) => (medium, Some((live, scratch)), outcome),
                Err((e, medium)) => {
                    if let Some(mut m) = medium {
                        let _ = send_verdict(&mut m, &Verdict::Abort { reason: e.to_string() });
                    }
                    return Err(e);
                }
            }
        }
    };
    if let Some(t) = throttle.as_mut() {
        let _ = t.lift();
    }
    let frozen_at = Instant::now();
    let (mut tracer, freezer) = match quiesce(req.pid, req.quiesce) {
        Ok(q) => q,
        Err(e) => {
            // Only a process that vanished cannot be seized again: nothing to put back.
            return Err(e);
        }
    };
    crate::trace::mark("source frozen");
    crate::fault::point("frozen");
    let mut medium = medium;
    // A child forked since the first look (during the rounds, say): seen now that
    // nothing can fork; the source goes back to running as it was.
    if let Err(e) = target::check_childless(req.pid, target::TREES_NOT_MIGRATED) {
        let e = EventError::from(e);
        if let Some(&(_, scratch)) = live.as_ref() {
            tracer.set_scratch(Some(scratch));
        }
        let_go(tracer, live.take().map(|(l, _)| l));
        drop(freezer);
        let _ = send_verdict(&mut medium, &Verdict::Abort { reason: e.to_string() });
        return Err(e);
    }
    let announced = match live.as_ref() {
        // The plan went ahead of the rounds, and the scratch area stayed.
        Some(&(_, scratch)) => {
            tracer.set_scratch(Some(scratch));
            Ok(scratch)
        }
        None => send_plan(&mut medium, &mut tracer, &subs, req, janitor),
    };
    let mut live = live.take().map(|(l, _)| l);
    if let Err(e) = announced {
        let_go(tracer, live);
        return Err(e);
    }
    crate::trace::mark("plan sent");
    let mut pipe = Pipeline::new(medium);
    // The last resort if a plugin stops answering: exit; the kernel detaches the
    // source, which carries on, and the destination loses the connection and rolls back.
    let pid = req.pid;
    let rescues: Vec<Box<dyn FnOnce() + Send>> = [
        freezer.as_ref().map(|f| Box::new(f.rescue()) as Box<dyn FnOnce() + Send>),
        throttle.as_ref().map(|t| Box::new(t.rescue()) as Box<dyn FnOnce() + Send>),
    ]
    .into_iter()
    .flatten()
    .collect();
    let watchdog = Watchdog::last_resort(req.timeout, format!("process {pid} is let go"), move || rescues.into_iter().for_each(|r| r()));
    let written = write_image(&mut tracer, &mut subs, &mut pipe, "tcp", &watchdog, live.as_mut(), lazy, progress);
    drop(watchdog);
    let mut medium = pipe.finish();
    crate::trace::mark("image sent");
    let outcome = (|| {
        let (bytes, pages) = written?;
        let medium = medium.as_mut().ok_or_else(|| failed("the medium's writer thread failed"))?;
        // The image ends here; post-copy's pages follow on a stream of their own.
        let end = if lazy { serde_json::json!({"op": "end", "open": [LAZY_STREAM]}) } else { serde_json::json!({"op": "end"}) };
        medium.command(RStr::from_str(&end.to_string())).into_result().map_err(|e| failed(e.message.into_string()))?;
        match verdict_serving(medium, req.pid, req.timeout).map_err(|e| failed(format!("waiting for the destination: {e}")))? {
            Verdict::Rebuilt { pids, .. } => Ok((bytes, pages, pids)),
            Verdict::Failed { reason } => Err(failed(format!("the destination could not rebuild the process: {reason}"))),
            other => Err(failed(format!("unexpected message from the destination: {other:?}"))),
        }
    })();
    match outcome {
        Ok((bytes, pages, pids)) => {
            // The destination holds the rebuilt process stopped. The source goes only
            // once the destination confirms it let its copy run: a lost message may
            // leave two copies to sort out, but never none.
            let medium = medium.as_mut().ok_or_else(|| failed("no medium"))?;
            crate::trace::mark("rebuilt: commit");
            // Should this ferry die from the commit on, the copy over there runs: the
            // source must not run on here too (the kernel kills it).
            if !lazy {
                if let Err(e) = tracer.die_with_ferry() {
                    let _ = send_verdict(medium, &Verdict::Abort { reason: e.to_string() });
                    let_go(tracer, live);
                    drop(freezer);
                    return Err(e.into());
                }
            }
            let mut released = send_verdict(medium, &Verdict::Commit);
            if lazy {
                // Post-copy's copy, once it ran, has done what the source would repeat:
                // it runs only after the source gave itself up, which is when `Ready`
                // arrives here (the commit point). Before it the source carries on.
                match released.and_then(|_| verdict_serving(medium, req.pid, req.timeout)) {
                    Ok(Verdict::Ready) => {}
                    other => {
                        let why = unexpected(other);
                        // A `ready` still on its way must not be answered by a `run`.
                        let _ = send_verdict(medium, &Verdict::Abort { reason: why.clone() });
                        let_go(tracer, live);
                        drop(freezer);
                        return Err(failed(format!("the destination did not take the process ({why}); it runs on here")));
                    }
                }
                crate::trace::mark("ready: committed");
                // From here the source never runs again: should this ferry die, the
                // kernel kills it.
                if let Err(e) = tracer.die_with_ferry() {
                    let _ = send_verdict(medium, &Verdict::Abort { reason: e.to_string() });
                    let_go(tracer, live);
                    drop(freezer);
                    return Err(e.into());
                }
                released = send_verdict(medium, &Verdict::Run);
            }
            let released = released.map(|_| crate::fault::point("commit-sent")).and_then(|_| verdict_serving(medium, req.pid, req.timeout));
            // Downtime ends here: the process runs on the destination.
            let frozen_ms = event::ms(frozen_at);
            crate::trace::mark("released");
            if let Some(l) = live {
                l.tracker.stop();
            }
            match released {
                Ok(Verdict::Released) => {}
                other if lazy => {
                    let why = unexpected(other);
                    return Err(lose(tracer, freezer, &mut subs, req, format!(
                        "its copy on {} was let run and the destination did not confirm it ({why}); post-copy cannot roll back once the copy may have run",
                        req.to
                    )));
                }
                other => {
                    let_go(tracer, None);
                    drop(freezer);
                    let why = unexpected(other);
                    return Err(failed(format!("the destination did not confirm running the process ({why}); it runs on here")));
                }
            }
            let lazy_stats = if lazy {
                // Its memory follows from the frozen copy here, kept until the last page.
                match serve_until_message(medium, req.pid, req.timeout, true) {
                    Ok(msg) if msg["type"] == "lazy-done" => serde_json::from_value::<LazyStats>(msg["stats"].clone()).ok(),
                    other => {
                        let why = unexpected(other);
                        // Say what is true of the source: killed from outside meanwhile,
                        // it was lost here first.
                        // (Still traced by this ferry: gone, a zombie, or without its
                        // memory — exiting — only if killed.)
                        let state = target::stat_fields(req.pid).and_then(|f| f.first().cloned());
                        let has_memory = std::fs::read_to_string(format!("/proc/{}/maps", req.pid)).is_ok_and(|m| !m.is_empty());
                        let why = if has_memory && !matches!(state.as_deref(), None | Some("Z" | "X")) {
                            format!("its copy on {} ran and then died before all its pages arrived ({why}); post-copy cannot roll back once the copy has run", req.to)
                        } else {
                            format!("it is gone here too (killed from outside?) while its copy on {} still needed its pages ({why})", req.to)
                        };
                        return Err(lose(tracer, freezer, &mut subs, req, why));
                    }
                }
            } else {
                None
            };
            match freezer {
                // Its cgroup of ferry's can go only once it is empty.
                Some(f) => {
                    tracer.kill();
                    drop(f);
                }
                None => tracer.kill_and_go(),
            }
            let new = pids.get(&req.pid.to_string()).copied().unwrap_or(0);
            let live_bytes: u64 = ran.rounds.iter().map(|r| r.bytes).sum();
            let mut round_bytes: Vec<u64> = ran.rounds.iter().map(|r| r.bytes).collect();
            round_bytes.push(bytes - live_bytes);
            // Post-copy's pages (after the frozen round) count with the rest.
            let lazy_pages = lazy_stats.as_ref().map_or(0, |l| l.pages_faulted + l.pages_pushed);
            let (bytes, pages) = (bytes + lazy_pages * 4096, pages + lazy_pages);
            Ok(MigrateStats {
                token: welcome.token,
                strategy: req.strategy.to_string(),
                pids: BTreeMap::from([(req.pid.to_string(), new)]),
                frozen_ms,
                total_ms: event::ms(started),
                bytes,
                pages,
                rounds: round_bytes.len() as u32,
                round_bytes,
                round_ms: ran.rounds.iter().map(|r| r.ms).chain([frozen_ms]).collect(),
                precopy_stop: (!ran.stop.is_empty()).then_some(ran.stop),
                throttle: throttle.as_ref().map_or(0, |t| t.steps()),
                resumed_ms: lazy.then_some(frozen_ms),
                lazy: lazy_stats,
                phases: Vec::new(),
            })
        }
        Err(e) => {
            // Before the commit point: the source carries on as if nothing happened.
            if let Some(m) = medium.as_mut() {
                let _ = send_verdict(m, &Verdict::Abort { reason: e.to_string() });
            }
            let_go(tracer, live);
            drop(freezer);
            Err(e)
        }
    }
}
