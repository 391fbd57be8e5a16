//! The `rdma` transfer medium: an event's streams, flush markers and control messages
//! as one-sided RMA writes through libfabric, into a ring of registered receive slots
//! on the peer (see [`ring`] for the data path and its wire format).
//!
//! libfabric is loaded at run time ([`fabric`]), so the plugin builds and loads where
//! it is absent; opening then fails in one line saying why.
//!
//! # Opening
//!
//! `open_medium(r#"{"fd":7,"timeout_ms":30000,"initiator":true,"params":{"provider":"tcp","ring":16,"slot_kib":1024}}"#)`:
//! as with the tcp medium, the coordinator (or daemon) hands over the connected,
//! authenticated control socket `fd`; the medium owns it on success (closed on drop),
//! and leaves it untouched on error. On that socket the two media then exchange, as
//! length-prefixed JSON, what each has: the initiator (the source) its providers with
//! RMA, best first (only `provider` when one is named; `auto` or none: every one
//! libfabric finds here), and the ring geometry; the other side picks the first of
//! those it has too, opens it and answers its endpoint address and its ring's address
//! and key; the initiator opens the same provider and answers likewise. Either side
//! that cannot (no libfabric, no such provider, no RMA, no common provider) says why,
//! and both fail with that one line, before anything of the event has started.
//! `provider` names a libfabric provider as `fi_info` lists it (`tcp`, `verbs`, `efa`,
//! `tcp;ofi_rxm`); `FI_PROVIDER` in the environment narrows what libfabric offers.
//!
//! After that the socket carries nothing; it is watched only to notice the peer's end
//! (a peer that dies closes it). `timeout_ms` bounds every wait as on tcp: a call that
//! hears nothing at all from the peer for that long fails.
//!
//! # Commands
//!
//! As the tcp medium's: `send`, `recv` (with `timeout_ms`), `end` (with `open`),
//! `info` (`{"medium":"rdma","provider":…,"fabric":…,"domain":…,"bytes_sent":…,
//! "bytes_received":…,"buffered_bytes":…,"writes":…,"slots":…,"slot_size":…}`) and
//! `buffer` (accepted, nothing to tune: the ring is sized when opened).

mod fabric;
mod ring;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_plugin_api::plugin::MediumPlugin;
use ferry_plugin_api::util::{from_hex, parse_object, reject_unknown_keys, required, to_hex};
use serde_json::{json, Value};

use fabric::{CqEntry, Fabric, Mr, FI_MR_LOCAL, FI_MR_VIRT_ADDR, FI_REMOTE_CQ_DATA, FI_REMOTE_WRITE, FI_RX_CQ_DATA, FI_WRITE};
use ring::*;

const DEFAULT_TIMEOUT_MS: u64 = 30_000;
const DEFAULT_SLOTS: u64 = 16;
const DEFAULT_SLOT_KIB: u64 = 1024;
const PARAMS_FORMAT: &str = r#"{"fd":7,"timeout_ms":30000,"initiator":true,"params":{"provider":"tcp","ring":16,"slot_kib":1024}}"#;
/// Room after each ring and send area: the signal landing word (ring) and the signal
/// source word (send area).
const TAIL: usize = 64;
/// Pushes from this size on send their slot at once.
const LARGE_PUSH: usize = 64 << 10;
/// Receives posted for providers that need one per remote CQ data (FI_RX_CQ_DATA).
const RX_POSTED: u64 = 256;
/// How long a completion wait blocks before the socket and the stop flag are looked at.
const POLL_MS: i32 = 20;

/// Work-request contexts: what a completion of ours was for.
const CTX_SLOT: u64 = 1 << 40;
const CTX_SIGNAL: u64 = 2 << 40;
const CTX_RECV: u64 = 3 << 40;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn secs(d: Duration) -> String {
    format!("{} s", d.as_millis() as f64 / 1000.0)
}

/// The medium's requested geometry and provider.
#[derive(Clone, Debug, PartialEq)]
struct Params {
    provider: Option<String>,
    slots: u64,
    slot_size: u64,
}

fn parse_params(v: Option<&Value>) -> Result<Params, String> {
    let mut p = Params { provider: None, slots: DEFAULT_SLOTS, slot_size: DEFAULT_SLOT_KIB << 10 };
    let Some(v) = v else { return Ok(p) };
    let m = v.as_object().ok_or("rdma medium params: expected an object like {\"provider\":\"tcp\",\"ring\":16,\"slot_kib\":1024}")?;
    reject_unknown_keys(m, &["provider", "ring", "slot_kib"], "rdma medium params")?;
    if let Some(prov) = m.get("provider") {
        let s = prov.as_str().ok_or("rdma medium params: provider must be a string")?;
        if s.is_empty() || s.len() > 60 || !s.chars().all(|c| c.is_ascii_alphanumeric() || "_;-".contains(c)) {
            return Err(format!("rdma medium params: provider {s:?} is not a libfabric provider name"));
        }
        p.provider = (s != "auto").then(|| s.to_string());
    }
    let num = |key: &str, lo: u64, hi: u64, dflt: u64| -> Result<u64, String> {
        match m.get(key) {
            None => Ok(dflt),
            Some(v) => v.as_u64().filter(|n| (lo..=hi).contains(n)).ok_or(format!("rdma medium params: {key} must be a number from {lo} to {hi}")),
        }
    };
    p.slots = num("ring", 2, 1024, DEFAULT_SLOTS)?;
    p.slot_size = num("slot_kib", 4, 65536, DEFAULT_SLOT_KIB)? << 10;
    if p.slots * p.slot_size > 1 << 30 {
        return Err(format!("rdma medium params: a ring of {} slots of {} KiB is over 1 GiB", p.slots, p.slot_size >> 10));
    }
    Ok(p)
}

/// One length-prefixed JSON message on the control socket.
fn send_msg(s: &mut TcpStream, v: &Value) -> Result<(), String> {
    let text = v.to_string();
    let mut out = (text.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    s.write_all(&out).map_err(|e| format!("rdma handshake: sending to the peer: {e}"))
}

fn recv_msg(s: &mut TcpStream) -> Result<Value, String> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).map_err(|e| format!("rdma handshake: the peer's medium did not answer ({e})"))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > 64 << 10 {
        return Err(format!("rdma handshake: the peer sent a message of {len} bytes: refusing"));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).map_err(|e| format!("rdma handshake: the peer's medium did not answer ({e})"))?;
    serde_json::from_slice(&buf).map_err(|e| format!("rdma handshake: the peer sent no JSON: {e}"))
}

fn peer_failed(v: &Value, side: &str) -> Option<String> {
    (v["ok"] != true).then(|| format!("{side}'s rdma medium cannot work: {}", v["reason"].as_str().unwrap_or("no reason given")))
}

/// A registered, never-moving buffer.
struct Area {
    buf: Vec<u8>,
    mr: Option<Mr>,
}

impl Area {
    fn new(fabric: &Fabric, len: usize, access: u64, key: u64) -> Result<Area, String> {
        let mut buf = vec![0u8; len];
        // SAFETY: buf is never resized or moved (its heap block stays put) and outlives
        // the registration, which the Area drops first.
        let mr = unsafe { fabric.register(buf.as_mut_ptr(), len, access, key) }?;
        Ok(Area { buf, mr: Some(mr) })
    }
    fn mr(&self) -> &Mr {
        self.mr.as_ref().expect("registered")
    }
    fn ptr(&self) -> *mut u8 {
        self.buf.as_ptr() as *mut u8
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        self.mr.take();
    }
}

/// What the peer told of its ring.
struct Remote {
    /// Where the ring starts in the peer's addressing (its virtual address with
    /// FI_MR_VIRT_ADDR, else 0: offsets).
    addr: u64,
    key: u64,
}

/// State shared by the caller's thread and the progress thread.
#[derive(Default)]
struct State {
    inbox: Inbox,
    /// Messages (slots) this side has sent, and how many the peer has taken.
    sent: u64,
    peer_taken: u64,
    /// Send slots whose write has not completed yet.
    busy: HashSet<u64>,
    /// Flush sequences: sent, and the highest the peer reached.
    flush_seq: u64,
    flushed: u64,
    /// Slots that arrived, not yet taken (ring index), and the next to take.
    arrived: HashSet<u64>,
    taken: u64,
    credited: u64,
    /// Signals owed to the peer (credits, acks) that found no room to go yet.
    owed: Vec<u64>,
    broken: Option<String>,
    last_heard: Option<Instant>,
    bytes_sent: u64,
    writes: u64,
}

struct Shared {
    // The registrations close before the fabric they belong to (fields drop in order).
    ring: Area,
    send: Area,
    fabric: Fabric,
    remote: Remote,
    peer: u64,
    slots: u64,
    slot_size: usize,
    state: Mutex<State>,
    cond: Condvar,
    stop: AtomicBool,
    fd: RawFd,
}

impl Shared {
    fn raddr(&self, offset: u64) -> u64 {
        self.remote.addr + offset
    }

    /// Posts an 8-byte signal write; Ok(false) when the provider has no room now.
    fn signal(&self, data: u64) -> Result<bool, String> {
        let at = self.slots as usize * self.slot_size;
        // SAFETY: the source word lies in the send area's registration and is never written.
        unsafe {
            self.fabric.write(
                self.send.ptr().add(at),
                8,
                self.send.mr().desc,
                data,
                self.peer,
                self.raddr(at as u64),
                self.remote.key,
                CTX_SIGNAL,
            )
        }
    }

    /// One round of the progress thread: completions, slots taken in order, signals owed.
    fn progress(&self, entries: &mut [CqEntry]) -> Result<usize, String> {
        let n = self.fabric.completions(entries, POLL_MS)?;
        let mut st = lock(&self.state);
        for e in &entries[..n] {
            if e.flags & FI_REMOTE_CQ_DATA != 0 {
                st.last_heard = Some(Instant::now());
                if self.fabric.info.mode & FI_RX_CQ_DATA != 0 {
                    // SAFETY: a zero-length receive: no memory is touched.
                    unsafe { self.fabric.recv(std::ptr::null_mut(), 0, std::ptr::null_mut(), CTX_RECV) }?;
                }
                let (kind, value) = signal_kind(e.data);
                match kind {
                    SIG_ARRIVED if value < self.slots => {
                        st.arrived.insert(value);
                    }
                    SIG_CREDIT => {
                        let sent = st.sent;
                        st.peer_taken = st.peer_taken.max(widen(value, sent));
                    }
                    SIG_ACK => {
                        let seq = st.flush_seq;
                        st.flushed = st.flushed.max(widen(value, seq));
                    }
                    _ => return Err(format!("peer sent a completion with data {:#x}: refusing", e.data)),
                }
            } else if e.context & !0xff_ffff_ffff == CTX_SLOT {
                st.busy.remove(&(e.context & 0xff_ffff_ffff));
            }
        }
        // Take the arrived slots in order.
        loop {
            let idx = st.taken % self.slots;
            if !st.arrived.remove(&idx) {
                break;
            }
            let at = idx as usize * self.slot_size;
            // SAFETY: the peer wrote this slot and, having no credit for it, writes it no
            // more until we return one; reading it here races with nothing.
            let slot = unsafe { std::slice::from_raw_parts(self.ring.ptr().add(at), self.slot_size) };
            let flushes = st.inbox.take_slot(slot)?;
            st.taken += 1;
            for f in flushes {
                st.owed.push(signal(SIG_ACK, f));
            }
        }
        if st.taken - st.credited >= (self.slots / 4).max(1) {
            st.credited = st.taken;
            let c = st.taken;
            st.owed.push(signal(SIG_CREDIT, c));
        }
        let owed = std::mem::take(&mut st.owed);
        let mut left = Vec::new();
        for s in owed {
            if !left.is_empty() || !self.signal(s)? {
                left.push(s);
            }
        }
        st.owed = left;
        if n > 0 {
            self.cond.notify_all();
        }
        Ok(n)
    }

    /// Whether the control socket says the peer is gone.
    fn peer_gone(&self) -> Option<String> {
        let mut p = libc::pollfd { fd: self.fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd, no wait.
        if unsafe { libc::poll(&mut p, 1, 0) } <= 0 {
            return None;
        }
        let mut b = [0u8; 1];
        // SAFETY: peeks one byte into b.
        let n = unsafe { libc::recv(self.fd, b.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
        match n {
            0 => Some("the peer closed the connection".into()),
            n if n > 0 => Some("the peer sent bytes on the control connection after the rdma handshake".into()),
            _ => {
                let e = std::io::Error::last_os_error();
                (e.kind() != std::io::ErrorKind::WouldBlock).then(|| e.to_string())
            }
        }
    }
}

fn progress_main(shared: Arc<Shared>) {
    let mut entries = [CqEntry::default(); 16];
    while !shared.stop.load(Ordering::Relaxed) {
        match shared.progress(&mut entries) {
            Err(e) => {
                lock(&shared.state).broken.get_or_insert(e);
                shared.cond.notify_all();
                return;
            }
            // A completion queue without a wait object is polled: not flat out.
            Ok(0) if !shared.fabric.info.waitable => std::thread::sleep(Duration::from_micros(200)),
            Ok(_) => {}
        }
        if let Some(why) = shared.peer_gone() {
            // What the peer wrote before it went is still taken in.
            for _ in 0..3 {
                if shared.progress(&mut entries).is_err() {
                    break;
                }
            }
            lock(&shared.state).broken.get_or_insert(format!("connection to the peer lost ({why})"));
            shared.cond.notify_all();
            return;
        }
    }
}

pub struct RdmaMedium {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    timeout: Duration,
    /// The send slot being filled (message number), if any.
    open_slot: Option<u64>,
}

impl RdmaMedium {
    pub fn open(text: &str) -> Result<RdmaMedium, String> {
        let m = parse_object(text, "rdma medium parameters", PARAMS_FORMAT)?;
        reject_unknown_keys(&m, &["fd", "timeout_ms", "initiator", "params"], "rdma medium parameters")?;
        let fd = required(&m, "fd", "rdma medium parameters")?.as_i64().filter(|f| (0..=i32::MAX as i64).contains(f)).ok_or("rdma medium parameters: fd must be a file descriptor")? as RawFd;
        let timeout_ms = m.get("timeout_ms").map_or(Some(DEFAULT_TIMEOUT_MS), |v| v.as_u64().filter(|t| (1..=86_400_000).contains(t))).ok_or("rdma medium parameters: timeout_ms must be from 1 to 86400000")?;
        let initiator = m.get("initiator").map_or(Some(false), |v| v.as_bool()).ok_or("rdma medium parameters: initiator must be true or false")?;
        let params = parse_params(m.get("params"))?;
        let timeout = Duration::from_millis(timeout_ms);
        // SAFETY: the caller hands fd over; it is given back (into_raw_fd) on every error.
        let mut sock = unsafe { TcpStream::from_raw_fd(fd) };
        let opened = Self::handshake(&mut sock, initiator, params, timeout);
        let fd = sock.into_raw_fd();
        let (fabric, ring, send, remote, peer, slots, slot_size) = opened?;
        let shared = Arc::new(Shared {
            ring,
            send,
            fabric,
            remote,
            peer,
            slots,
            slot_size,
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
            stop: AtomicBool::new(false),
            fd,
        });
        if shared.fabric.info.mode & FI_RX_CQ_DATA != 0 {
            for _ in 0..RX_POSTED {
                // SAFETY: zero-length receives touch no memory.
                unsafe { shared.fabric.recv(std::ptr::null_mut(), 0, std::ptr::null_mut(), CTX_RECV) }?;
            }
        }
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("rdma-progress".into())
            .spawn(move || progress_main(s))
            .map_err(|e| format!("starting the rdma progress thread: {e}"))?;
        Ok(RdmaMedium { shared, thread: Some(thread), timeout, open_slot: None })
    }

    #[allow(clippy::type_complexity)]
    fn handshake(sock: &mut TcpStream, initiator: bool, params: Params, timeout: Duration)
        -> Result<(Fabric, Area, Area, Remote, u64, u64, usize), String> {
        sock.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        sock.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        let node = sock.local_addr().map_err(|e| e.to_string())?.ip().to_string();
        let fail = |sock: &mut TcpStream, why: String| -> String {
            let _ = send_msg(sock, &json!({"ok": false, "reason": why}));
            why
        };
        let (chosen, geometry, peer_msg);
        if initiator {
            let offers = fabric::offers(params.provider.as_deref()).and_then(|o| {
                if o.is_empty() {
                    Err(match &params.provider {
                        Some(p) => format!("libfabric has no provider {p:?} with RMA here (fi_info -p {p} lists what it finds)"),
                        None => format!("libfabric finds no provider with RMA here{}", narrowed()),
                    })
                } else {
                    Ok(o)
                }
            });
            let offers = offers.map_err(|e| fail(sock, e))?;
            let names: Vec<&str> = offers.iter().map(|o| o.provider.as_str()).collect();
            send_msg(sock, &json!({"ok": true, "providers": names, "slots": params.slots, "slot_size": params.slot_size}))?;
            let answer = recv_msg(sock)?;
            if let Some(e) = peer_failed(&answer, "the destination") {
                return Err(e);
            }
            chosen = answer["provider"].as_str().unwrap_or("").to_string();
            if !names.contains(&chosen.as_str()) {
                return Err(fail(sock, format!("the destination chose provider {chosen:?}, which was not offered")));
            }
            geometry = (params.slots, params.slot_size);
            peer_msg = answer;
        } else {
            let offer = recv_msg(sock)?;
            if let Some(e) = peer_failed(&offer, "the source") {
                return Err(e);
            }
            let slots = offer["slots"].as_u64().filter(|n| (2..=1024).contains(n));
            let size = offer["slot_size"].as_u64().filter(|n| (4096..=64 << 20).contains(n));
            let (Some(slots), Some(size)) = (slots, size) else {
                return Err(fail(sock, format!("the source asked for a ring it may not: {offer}")));
            };
            let theirs: Vec<String> = offer["providers"].as_array().map(|a| a.iter().filter_map(|p| p.as_str().map(String::from)).collect()).unwrap_or_default();
            let mine = fabric::offers(None).map_err(|e| fail(sock, e))?;
            if mine.is_empty() {
                return Err(fail(sock, format!("libfabric finds no provider with RMA here{}", narrowed())));
            }
            let Some(common) = theirs.iter().find(|p| mine.iter().any(|o| &&o.provider == p)) else {
                let mine: Vec<&str> = mine.iter().map(|o| o.provider.as_str()).collect();
                return Err(fail(sock, format!("no libfabric provider with RMA in common: the source has [{}], the destination [{}]", theirs.join(", "), mine.join(", "))));
            };
            chosen = common.clone();
            geometry = (slots, size);
            peer_msg = Value::Null;
        }
        let (slots, slot_size) = geometry;
        let len = slots as usize * slot_size as usize + TAIL;
        let set_up = || -> Result<(Fabric, Area, Area), String> {
            let fabric = Fabric::open(Some(&chosen), Some(&node)).map_err(|e| format!("libfabric provider {chosen} on {node}: {e}"))?;
            if fabric.info.cq_data_size < 4 {
                return Err(format!("libfabric provider {chosen} carries {} bytes of remote CQ data; the medium needs 4", fabric.info.cq_data_size));
            }
            let ring = Area::new(&fabric, len, FI_REMOTE_WRITE, 1)?;
            let send = Area::new(&fabric, len, FI_WRITE, 2)?;
            Ok((fabric, ring, send))
        };
        let (fabric, ring, send) = set_up().map_err(|e| fail(sock, e))?;
        let base = if fabric.info.mr_mode & FI_MR_VIRT_ADDR != 0 { ring.ptr() as u64 } else { 0 };
        let _ = FI_MR_LOCAL; // descriptors are always passed, which FI_MR_LOCAL needs
        let mine = json!({
            "ok": true, "provider": chosen, "name": to_hex(&fabric.name()?),
            "addr": base, "key": ring.mr().key,
        });
        send_msg(sock, &mine)?;
        let peer_msg = if initiator { peer_msg } else { recv_msg(sock)? };
        if let Some(e) = peer_failed(&peer_msg, if initiator { "the destination" } else { "the source" }) {
            return Err(e);
        }
        let name = from_hex(peer_msg["name"].as_str().unwrap_or(""), "the peer's endpoint name", 256, false)?;
        let remote = Remote {
            addr: peer_msg["addr"].as_u64().ok_or("rdma handshake: the peer gave no ring address")?,
            key: peer_msg["key"].as_u64().ok_or("rdma handshake: the peer gave no ring key")?,
        };
        let peer = fabric.insert(&name)?;
        // The socket is now only watched: no timeouts on it, nothing read from it.
        let _ = sock.set_read_timeout(None);
        Ok((fabric, ring, send, remote, peer, slots, slot_size as usize))
    }

    fn check(&self, st: &State, what: &str) -> Result<(), String> {
        match &st.broken {
            Some(e) => Err(format!("{e} while {what}")),
            None => Ok(()),
        }
    }

    /// Waits on the shared state until `ready` holds; fails when the medium breaks or
    /// nothing is heard from the peer for the timeout.
    fn wait<'a>(&'a self, mut st: MutexGuard<'a, State>, what: &str, mut ready: impl FnMut(&State) -> bool) -> Result<MutexGuard<'a, State>, String> {
        let start = Instant::now();
        loop {
            if ready(&st) {
                return Ok(st);
            }
            self.check(&st, what)?;
            let heard = st.last_heard.map_or(start, |h| h.max(start));
            if heard.elapsed() >= self.timeout {
                return Err(format!("no data from the peer for {} while {what}", secs(self.timeout)));
            }
            st = self.shared.cond.wait_timeout(st, Duration::from_millis(50)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn slot_mut(&mut self, n: u64) -> &mut [u8] {
        let idx = (n % self.shared.slots) as usize;
        let size = self.shared.slot_size;
        // SAFETY: send slot idx is ours alone while no write of it is outstanding
        // (ensured in `claim` before it is filled).
        unsafe { std::slice::from_raw_parts_mut(self.shared.send.ptr().add(idx * size), size) }
    }

    /// The send slot being filled, opening one (waiting for a credit) if none is.
    fn claim(&mut self) -> Result<u64, String> {
        if let Some(n) = self.open_slot {
            return Ok(n);
        }
        let slots = self.shared.slots;
        let st = lock(&self.shared.state);
        let st = self.wait(st, "sending", |s| s.sent - s.peer_taken < slots && !s.busy.contains(&(s.sent % slots)))?;
        let n = st.sent;
        drop(st);
        set_used(self.slot_mut(n), 0);
        self.open_slot = Some(n);
        Ok(n)
    }

    /// Room for a payload in the open slot.
    fn room(&mut self) -> Result<usize, String> {
        let n = self.claim()?;
        let used = used(self.slot_mut(n));
        Ok(self.shared.slot_size.saturating_sub(SLOT_HEADER + used + RECORD_HEADER))
    }

    /// Writes the open slot into the peer's ring.
    fn seal(&mut self) -> Result<(), String> {
        let Some(n) = self.open_slot.take() else { return Ok(()) };
        let idx = n % self.shared.slots;
        let len = SLOT_HEADER + used(self.slot_mut(n));
        let sh = self.shared.clone();
        let mut st = lock(&sh.state);
        st.busy.insert(idx);
        st.sent = n + 1;
        st.bytes_sent += len as u64;
        st.writes += 1;
        loop {
            self.check(&st, "sending")?;
            let at = idx as usize * sh.slot_size;
            // SAFETY: the slot lies in the send registration and stays untouched until its
            // completion clears it from `busy`.
            let posted = unsafe {
                sh.fabric.write(sh.send.ptr().add(at), len, sh.send.mr().desc, signal(SIG_ARRIVED, idx), sh.peer, sh.raddr(at as u64), sh.remote.key, CTX_SLOT | idx)
            }?;
            if posted {
                return Ok(());
            }
            // No room in the provider's queue: let the progress thread reap completions.
            st = sh.cond.wait_timeout(st, Duration::from_millis(1)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Appends a record, sealing slots as they fill; large payloads span several.
    fn put(&mut self, kind: u8, stream: u32, data: &[u8]) -> Result<(), String> {
        let mut rest = data;
        loop {
            let mut room = self.room()?;
            if room < rest.len().min(4096) || (room == 0 && !rest.is_empty()) {
                self.seal()?;
                room = self.room()?;
            }
            let take = rest.len().min(room);
            let last = take == rest.len();
            let flags = if kind == K_CTRL && !last { F_MORE } else { 0 };
            let n = self.claim()?;
            put_record(self.slot_mut(n), kind, flags, stream, &rest[..take]);
            rest = &rest[take..];
            if last {
                return Ok(());
            }
        }
    }

    fn end(&mut self, open: &[u32]) -> Result<(), String> {
        let payload: Vec<u8> = open.iter().flat_map(|s| s.to_le_bytes()).collect();
        self.put(K_END, 0, &payload)?;
        self.seal()
    }
}

impl MediumPlugin for RdmaMedium {
    fn pushdata(&mut self, stream: u32, data: &[u8]) -> Result<(), String> {
        if stream > MAX_STREAM {
            return Err(format!("stream {stream} is over the largest, {MAX_STREAM}"));
        }
        self.put(K_DATA, stream, data)?;
        if data.len() >= LARGE_PUSH {
            self.seal()?;
        }
        Ok(())
    }

    fn popdata(&mut self, stream: u32, buf: &mut [u8]) -> Result<usize, String> {
        self.seal()?;
        if buf.is_empty() {
            return Ok(0);
        }
        let st = lock(&self.shared.state);
        let ready = |s: &State| s.inbox.streams.get(&stream).is_some_and(|q| !q.is_empty()) || s.inbox.closed(stream);
        // Data that arrived before the connection was lost is still handed out.
        let mut st = self.wait(st, &format!("reading stream {stream}"), ready)?;
        Ok(st.inbox.pop(stream, buf))
    }

    fn flush(&mut self) -> Result<(), String> {
        let seq = {
            let mut st = lock(&self.shared.state);
            st.flush_seq += 1;
            st.flush_seq
        };
        self.put(K_FLUSH, 0, &seq.to_le_bytes())?;
        self.seal()?;
        let st = lock(&self.shared.state);
        self.wait(st, "flushing", |s| s.flushed >= seq && s.busy.is_empty()).map(|_| ())
    }

    fn command(&mut self, cmd: &str) -> Result<String, String> {
        let v: Value = serde_json::from_str(cmd).map_err(|e| format!("command is not JSON: {e}"))?;
        self.seal()?;
        match v["op"].as_str() {
            Some("send") => {
                let msg = v.get("msg").ok_or("send: no msg")?.to_string();
                if msg.len() > MAX_CTRL {
                    return Err("send: a control message over 1 MiB".into());
                }
                self.put(K_CTRL, 0, msg.as_bytes())?;
                self.seal()?;
                Ok(json!({"ok": true}).to_string())
            }
            Some("recv") => {
                let limit = v["timeout_ms"].as_u64().map(Duration::from_millis);
                let start = Instant::now();
                let mut st = lock(&self.shared.state);
                loop {
                    if let Some(msg) = st.inbox.ctrl.pop_front() {
                        let msg: Value = serde_json::from_slice(&msg).map_err(|e| e.to_string())?;
                        return Ok(json!({"msg": msg}).to_string());
                    }
                    self.check(&st, "waiting for a control message")?;
                    if let Some(l) = limit {
                        if start.elapsed() >= l {
                            return Err(format!("no control message from the peer in {}", secs(l)));
                        }
                    }
                    let heard = st.last_heard.map_or(start, |h| h.max(start));
                    if heard.elapsed() >= self.timeout {
                        return Err(format!("no data from the peer for {} while waiting for a control message", secs(self.timeout)));
                    }
                    st = self.shared.cond.wait_timeout(st, Duration::from_millis(20)).unwrap_or_else(|p| p.into_inner()).0;
                }
            }
            Some("end") => {
                let open: Vec<u32> = match v.get("open") {
                    None => vec![],
                    Some(a) => a.as_array().ok_or("end: open must be a list of stream ids")?.iter().map(|s| s.as_u64().filter(|&s| s <= MAX_STREAM as u64).map(|s| s as u32).ok_or("end: a bad stream id")).collect::<Result<_, _>>()?,
                };
                self.end(&open)?;
                Ok(json!({"ok": true}).to_string())
            }
            Some("info") => {
                let st = lock(&self.shared.state);
                let i = &self.shared.fabric.info;
                Ok(json!({
                    "medium": "rdma", "provider": i.provider, "fabric": i.fabric, "domain": i.domain,
                    "bytes_sent": st.bytes_sent, "bytes_received": st.inbox.received, "buffered_bytes": st.inbox.buffered,
                    "writes": st.writes, "slots": self.shared.slots, "slot_size": self.shared.slot_size,
                    "timeout_ms": self.timeout.as_millis() as u64,
                })
                .to_string())
            }
            Some("buffer") => Ok(json!({"ok": true}).to_string()),
            _ => Err(format!("unknown command {cmd}")),
        }
    }
}

impl Drop for RdmaMedium {
    fn drop(&mut self) {
        // What was sealed is on its way: wait (bounded) for its completions, so that
        // closing the endpoint does not cut it off.
        let _ = self.seal();
        {
            let st = lock(&self.shared.state);
            let _ = self.shared.cond.wait_timeout_while(st, Duration::from_secs(2), |s| !s.busy.is_empty() && s.broken.is_none());
        }
        self.shared.stop.store(true, Ordering::Relaxed);
        // SAFETY: fd is ours; shutting it down tells the peer at once.
        unsafe { libc::shutdown(self.shared.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // SAFETY: ours, closed once; the fabric and areas go with the last Arc.
        unsafe { libc::close(self.shared.fd) };
    }
}

/// What FI_PROVIDER, when set, does to libfabric's answers.
fn narrowed() -> String {
    std::env::var("FI_PROVIDER").map(|p| format!(" (FI_PROVIDER={p} narrows what it offers)")).unwrap_or_default()
}

/// Why this medium cannot work on this machine, if it cannot (for `plugins list`).
fn unavailable() -> Option<String> {
    match fabric::offers(None) {
        Err(e) => Some(e),
        Ok(o) if o.is_empty() => Some(format!("libfabric finds no provider with RMA here{}", narrowed())),
        Ok(_) => None,
    }
}

fn open(params: &str) -> Result<RdmaMedium, String> {
    let v: Value = serde_json::from_str(params).unwrap_or(Value::Null);
    if v.get("probe") == Some(&Value::Bool(true)) {
        // `{"probe":true}` (`plugins list`): answered as an error naming what this machine has.
        return Err(match unavailable() {
            Some(why) => format!("unavailable: {why}"),
            None => {
                let offers = fabric::offers(None).unwrap_or_default();
                let list: Vec<String> = offers.iter().map(|o| format!("{} ({} {})", o.provider, o.fabric, o.domain)).collect();
                // The core provider (before ';') of these carries RMA over the host's network stack.
                let emulated = |p: &str| ["tcp", "sockets", "udp", "net"].contains(&p.split(';').next().unwrap_or(p));
                let real: Vec<&str> = offers.iter().map(|o| o.provider.as_str()).filter(|p| !emulated(p)).collect();
                let device = if real.is_empty() {
                    "no RMA on a real device (these emulate it over TCP/UDP)".to_string()
                } else {
                    format!("RMA on a real device: {}", real.join(", "))
                };
                format!("available: {}; {device}", list.join(", "))
            }
        });
    }
    RdmaMedium::open(params)
}

ferry_plugin_api::export_medium!("rdma", "RDMA transport: one-sided writes through libfabric (loaded at run time)", open);

#[cfg(test)]
mod tests;
