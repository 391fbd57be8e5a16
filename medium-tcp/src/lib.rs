//! The `tcp` transfer medium: an event's streams, flush markers and control messages
//! over one already-connected TCP socket to the peer's medium.
//!
//! # Opening
//!
//! `open_medium(r#"{"fd": 7, "timeout_ms": 30000}"#)`: the coordinator (or the daemon)
//! connects (or accepts) the socket, authenticates and handshakes on it itself, and then
//! hands it over. On success the medium **owns** fd 7: it closes it when dropped, and
//! every later byte on the socket, both ways, is the medium's. On any error the fd is
//! left open and untouched, still the caller's. The fd must be a connected stream
//! socket (TCP; a Unix stream socket works too, for tests); the medium puts it back in
//! blocking mode, sets `TCP_NODELAY`, a send timeout of `timeout_ms` and no receive
//! timeout (whatever the handshake set). The handshake before must not have read ahead
//! (no buffered reader over the socket): frames the peer's medium sent early wait in
//! the kernel's buffer and are the medium's.
//!
//! `timeout_ms` (default 30000, from 1 to 86400000) bounds every wait: a `popdata`,
//! `flush` or `recv` that hears nothing at all from the peer for that long fails with
//! "no data from the peer for 30 s …" (data arriving for any stream counts as the peer
//! being alive, so stream 0 may wait for a whole image to go by), and a send that the
//! peer takes no byte of for that long fails too. Nothing hangs.
//!
//! # Wire format
//!
//! Every frame is a 9-byte header and a payload:
//!
//! ```text
//!  0      1                5                9
//!  +------+----------------+----------------+-------------------------+
//!  | type | stream: u32 LE | length: u32 LE | payload (length bytes)  |
//!  +------+----------------+----------------+-------------------------+
//! ```
//!
//! | type | name  | stream      | payload                                       |
//! |------|-------|-------------|-----------------------------------------------|
//! | 1    | DATA  | 0 ..= 1024  | stream bytes, at most 64 MiB a frame          |
//! | 2    | FLUSH | 0           | u64 LE sequence number                        |
//! | 3    | ACK   | 0           | u64 LE: every FLUSH up to this number reached |
//! | 4    | END   | 0           | u32 LE ids of streams that stay open (often   |
//! |      |       |             | none): no more DATA will follow on the others |
//! | 5    | CTRL  | 0           | one JSON value, at most 1 MiB                 |
//!
//! A receiver refuses anything else (an unknown type, a length over 64 MiB, a stream id
//! over 1024, a wrong length for its type, DATA after END, a CTRL that is not JSON): the
//! connection is then shut down and every call fails with the reason, e.g. "peer sent a
//! frame of 4294967295 bytes: refusing". A push larger than 64 MiB goes out as several
//! DATA frames.
//!
//! # Sending
//!
//! Sends happen on the caller's thread. A push of 64 KiB or more goes out with one
//! `sendmsg` (a gather write of the frame header and the caller's buffer, never a
//! system call per page); smaller pushes (record headers) are gathered in a buffer of
//! the medium and go out with the next large push, or when 256 KiB have gathered, or
//! before any `flush`, `command` or `popdata`. A push that is never followed by one of
//! those may therefore never leave: as with any buffered writer, `flush` is the promise.
//! `flush` sends a FLUSH frame and returns only when the peer's reader thread has
//! reached it and answered with an ACK, that is when the peer's medium holds everything
//! pushed before it.
//!
//! # Receiving
//!
//! A background reader thread reads frames off the socket continuously and sorts them
//! into per-stream queues (DATA), a queue of control messages (CTRL) and flags (END,
//! ACK), and answers a FLUSH with an ACK at once. The queues are **unbounded**: a
//! receiver that pops stream 0 first, while the sender sends it last, holds the whole
//! image in memory meanwhile (`{"op":"info"}` reports `buffered_bytes`). `popdata`
//! returns what is queued for the stream (like `read(2)`, possibly less than the buffer),
//! blocks while nothing is, and answers 0 once the peer's END has arrived and the
//! stream is drained. If the connection is lost, data that had already arrived is
//! still handed out; after that, and after any protocol error at once, calls fail.
//!
//! The socket writes of the two threads never interleave inside a frame: both write
//! under one mutex. The reader only ever *tries* that mutex: when the caller's thread
//! holds it, the ACK is left owed and the caller's thread sends it before it lets go.
//!
//! # Commands
//!
//! - `{"op":"send","msg":<JSON>}` sends a control message → `{"ok":true}`
//! - `{"op":"recv"}` or `{"op":"recv","timeout_ms":N}` waits for the next control message
//!   from the peer → `{"msg":<JSON>}`; without `timeout_ms` the wait ends only when the
//!   peer is silent for the medium's timeout, with it after N ms in all cases
//!   (0 = do not wait)
//! - `{"op":"end"}` sends END (no more stream data from this side) → `{"ok":true}`;
//!   `{"op":"end","open":[N,…]}` keeps streams N… open after it (post-copy's pages
//!   follow the image on a stream of their own)
//! - `{"op":"info"}` → `{"medium":"tcp","peer":"ip:port","bytes_sent":…,
//!   "bytes_received":…,"buffered_bytes":…,"timeout_ms":…}` (bytes on the wire,
//!   headers included)
//! - `{"op":"buffer","bytes":N}` sets `SO_SNDBUF` and `SO_RCVBUF` (4 KiB to 256 MiB; the
//!   kernel caps and doubles it) → `{"ok":true,"sndbuf":…,"rcvbuf":…}`. Setting a size
//!   turns off the kernel's automatic buffer tuning, so only do it with a reason.
//!
//! Dropping the medium shuts the socket down (`shutdown(SHUT_RDWR)`), which wakes the
//! reader thread wherever it waits, joins it and closes the fd.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_plugin_api::util::{parse_object, reject_unknown_keys, required};
use ferry_plugin_api::plugin::MediumPlugin;
use serde_json::{json, Map, Value};

/// Frame types.
const T_DATA: u8 = 1;
const T_FLUSH: u8 = 2;
const T_ACK: u8 = 3;
const T_END: u8 = 4;
const T_CTRL: u8 = 5;

const HEADER_LEN: usize = 9;
/// The largest payload of one frame.
pub const MAX_FRAME: usize = 64 << 20;
/// The largest control message.
pub const MAX_CTRL: usize = 1 << 20;
/// The largest stream id.
pub const MAX_STREAM: u32 = 1024;

const DEFAULT_TIMEOUT_MS: u64 = 30_000;
const MAX_TIMEOUT_MS: u64 = 86_400_000;
const MIN_SOCKBUF: u64 = 4 << 10;
const MAX_SOCKBUF: u64 = 256 << 20;

/// Pushes below this size are gathered rather than sent at once.
const SMALL_PUSH: usize = 64 << 10;
/// Gathered small frames are sent once they reach this size.
const PENDING_LIMIT: usize = 256 << 10;
/// The reader's buffer, for headers and small payloads.
const READ_BUF: usize = 256 << 10;
/// Payloads from this size on are read straight into their own buffer.
const DIRECT_READ: usize = 64 << 10;
/// At most this much is read when only a frame header is wanted: a large payload then
/// goes mostly straight into its own buffer, not through the reader's (a copy of every
/// byte otherwise: the page records are about as large as that buffer).
const HEADER_READ: usize = 16 << 10;
/// Drained payload buffers kept for the reader to reuse: a fresh buffer costs a page
/// fault per page.
const SPARE_BUFFERS: usize = 8;

const PARAMS_FORMAT: &str = r#"{"fd":7,"timeout_ms":30000}"#;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A duration as people read it: "30 s", "0.2 s".
fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} s", d.as_millis() as f64 / 1000.0)
    }
}

fn header(kind: u8, stream: u32, len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind;
    h[1..5].copy_from_slice(&stream.to_le_bytes());
    // Every caller bounds len by MAX_FRAME, far below u32::MAX.
    h[5..9].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

/// Why the connection can no longer be read.
#[derive(Clone, Debug)]
enum Broken {
    /// End of file or a read error: the detail, e.g. "the peer closed the connection".
    Lost(String),
    /// The peer sent something that is not this protocol: the whole message.
    Protocol(String),
    /// The medium is being dropped.
    Closed,
}

impl Broken {
    fn error(&self, what: &str) -> String {
        match self {
            Broken::Lost(detail) => format!("connection to the peer lost while {what} ({detail})"),
            Broken::Protocol(msg) => msg.clone(),
            Broken::Closed => "the medium is closed".into(),
        }
    }
}

#[derive(Default)]
struct StreamQueue {
    chunks: VecDeque<Vec<u8>>,
    /// Bytes of the front chunk already handed out.
    offset: usize,
}

/// What the reader thread has received and not yet been taken.
#[derive(Default)]
struct Inbox {
    streams: HashMap<u32, StreamQueue>,
    ctrl: VecDeque<Value>,
    /// The highest flush sequence number the peer acknowledged.
    acked: u64,
    /// The peer sent END.
    ended: bool,
    /// Streams the peer's END left open.
    open_after_end: Vec<u32>,
    broken: Option<Broken>,
    /// Stream bytes queued, over all streams.
    buffered: u64,
    spare: Vec<Vec<u8>>,
}

impl Inbox {
    /// Copies queued bytes of `stream` into `buf`; answers how many.
    fn pop_into(&mut self, stream: u32, buf: &mut [u8]) -> usize {
        let Some(q) = self.streams.get_mut(&stream) else { return 0 };
        let mut n = 0;
        while n < buf.len() {
            let (k, drained) = match q.chunks.front() {
                Some(front) => {
                    let avail = front.get(q.offset..).unwrap_or(&[]);
                    let k = avail.len().min(buf.len() - n);
                    buf[n..n + k].copy_from_slice(&avail[..k]);
                    (k, q.offset + k >= front.len())
                }
                None => break,
            };
            n += k;
            q.offset += k;
            if drained {
                q.offset = 0;
                if let Some(mut chunk) = q.chunks.pop_front() {
                    if chunk.capacity() >= DIRECT_READ && self.spare.len() < SPARE_BUFFERS {
                        chunk.clear();
                        self.spare.push(chunk);
                    }
                }
            }
        }
        self.buffered -= n as u64;
        n
    }

    fn has_data(&self, stream: u32) -> bool {
        self.streams.get(&stream).is_some_and(|q| !q.chunks.is_empty())
    }
}

/// What both threads write under one lock.
struct WriteState {
    /// Small frames gathered, sent before anything else.
    pending: Vec<u8>,
    /// Set after a failed send: a frame may have gone out in part, so the connection
    /// cannot carry another.
    failed: Option<String>,
}

struct Shared {
    fd: OwnedFd,
    timeout: Duration,
    inbox: Mutex<Inbox>,
    /// Signalled on every frame received and when the connection breaks.
    arrived: Condvar,
    writer: Mutex<WriteState>,
    /// The highest FLUSH received, to acknowledge.
    ack_owed: AtomicU64,
    /// The highest ACK sent.
    ack_sent: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    /// When the peer was last heard from, in ms since `base`.
    last_rx_ms: AtomicU64,
    base: Instant,
    closing: AtomicBool,
}

fn send_error(e: &io::Error, timeout: Duration) -> String {
    match e.raw_os_error() {
        Some(libc::EAGAIN) => format!("the peer took no data for {}", secs(timeout)),
        Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN | libc::ESHUTDOWN | libc::ETIMEDOUT) => {
            format!("connection to the peer lost ({e})")
        }
        _ => format!("send failed: {e}"),
    }
}

/// Writes all of `bufs` with as few `sendmsg` calls as the kernel allows (one, unless
/// the socket buffer fills); counts what went out into `sent`.
fn send_all(fd: RawFd, bufs: &[&[u8]], sent: &AtomicU64) -> io::Result<()> {
    let mut iov: Vec<libc::iovec> = bufs
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| libc::iovec { iov_base: b.as_ptr() as *mut libc::c_void, iov_len: b.len() })
        .collect();
    let mut idx = 0;
    while idx < iov.len() {
        // SAFETY: a zeroed msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov[idx..].as_mut_ptr();
        msg.msg_iovlen = (iov.len() - idx) as _;
        // SAFETY: the iovecs point into the live slices of `bufs`, with their lengths.
        // MSG_NOSIGNAL: a closed peer is an EPIPE error, never a SIGPIPE.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut n = n as usize;
        sent.fetch_add(n as u64, Ordering::Relaxed);
        while n > 0 && idx < iov.len() {
            if n >= iov[idx].iov_len {
                n -= iov[idx].iov_len;
                idx += 1;
            } else {
                // SAFETY: n < iov_len, so the new base stays inside the same slice.
                iov[idx].iov_base = unsafe { (iov[idx].iov_base as *mut u8).add(n) } as *mut libc::c_void;
                iov[idx].iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

impl Shared {
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn mark_heard(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_rx_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last_heard(&self) -> Instant {
        self.base + Duration::from_millis(self.last_rx_ms.load(Ordering::Relaxed))
    }

    /// Sends the gathered frames, an owed ACK and `bufs`, under the write lock.
    fn send_locked(&self, w: &mut WriteState, bufs: &[&[u8]], what: &str) -> Result<(), String> {
        if let Some(e) = &w.failed {
            return Err(format!("cannot send {what}: an earlier send to the peer failed: {e}"));
        }
        let owed = self.ack_owed.load(Ordering::SeqCst);
        let acking = owed > self.ack_sent.load(Ordering::SeqCst);
        if acking {
            w.pending.extend_from_slice(&header(T_ACK, 0, 8));
            w.pending.extend_from_slice(&owed.to_le_bytes());
        }
        let mut all: Vec<&[u8]> = Vec::with_capacity(bufs.len() + 1);
        all.push(&w.pending);
        all.extend_from_slice(bufs);
        match send_all(self.fd(), &all, &self.bytes_sent) {
            Ok(()) => {
                w.pending.clear();
                if acking {
                    self.ack_sent.fetch_max(owed, Ordering::SeqCst);
                }
                Ok(())
            }
            Err(e) => {
                let msg = send_error(&e, self.timeout);
                w.failed = Some(msg.clone());
                Err(format!("cannot send {what}: {msg}"))
            }
        }
    }

    /// Sends an owed ACK unless another thread holds the write lock; that thread then
    /// sends it itself after letting go (it calls this too).
    fn settle_acks(&self) {
        fence(Ordering::SeqCst);
        while self.ack_owed.load(Ordering::SeqCst) > self.ack_sent.load(Ordering::SeqCst) {
            let mut w = match self.writer.try_lock() {
                Ok(w) => w,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            };
            if w.failed.is_some() || self.send_locked(&mut w, &[], "a flush acknowledgement").is_err() {
                return;
            }
            drop(w);
            fence(Ordering::SeqCst);
        }
    }

    /// Runs `f` under the write lock, then settles owed ACKs.
    fn with_writer<R>(&self, f: impl FnOnce(&mut WriteState) -> R) -> R {
        let r = f(&mut lock(&self.writer));
        self.settle_acks();
        r
    }

    /// Sends whatever small frames are gathered.
    fn send_pending(&self) -> Result<(), String> {
        self.with_writer(|w| {
            if w.pending.is_empty() {
                Ok(())
            } else {
                self.send_locked(w, &[], "buffered stream data")
            }
        })
    }

    /// Fails if the reader found the connection unusable.
    fn check_usable(&self, what: &str) -> Result<(), String> {
        match &lock(&self.inbox).broken {
            Some(b) => Err(b.error(what)),
            None => Ok(()),
        }
    }

    /// Waits until `ready` answers. `fixed` is a hard limit; without it the wait ends
    /// when the peer has been silent for the medium's timeout.
    fn wait<T>(
        &self,
        what: &str,
        fixed: Option<Duration>,
        mut ready: impl FnMut(&mut Inbox) -> Option<Result<T, String>>,
    ) -> Result<T, String> {
        let start = Instant::now();
        let mut inbox = lock(&self.inbox);
        loop {
            if let Some(r) = ready(&mut inbox) {
                return r;
            }
            let now = Instant::now();
            let remaining = match fixed {
                Some(limit) => {
                    let waited = now.saturating_duration_since(start);
                    if waited >= limit {
                        return Err(format!("nothing from the peer within {} while {what}", secs(limit)));
                    }
                    limit - waited
                }
                None => {
                    let idle = now.saturating_duration_since(start.max(self.last_heard()));
                    if idle >= self.timeout {
                        return Err(format!("no data from the peer for {} while {what}", secs(self.timeout)));
                    }
                    self.timeout - idle
                }
            };
            inbox = match self.arrived.wait_timeout(inbox, remaining) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

/// Why a read stopped.
enum ReadStop {
    Eof { mid_frame: bool },
    Io(io::Error),
    Protocol(String),
}

impl From<ReadStop> for Broken {
    fn from(r: ReadStop) -> Broken {
        match r {
            ReadStop::Eof { mid_frame: false } => Broken::Lost("the peer closed the connection".into()),
            ReadStop::Eof { mid_frame: true } => {
                Broken::Lost("the peer closed the connection in the middle of a frame".into())
            }
            ReadStop::Io(e) => Broken::Lost(format!("read failed: {e}")),
            ReadStop::Protocol(m) => Broken::Protocol(m),
        }
    }
}

/// The reader thread's buffered view of the socket.
struct FrameReader<'a> {
    shared: &'a Shared,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<'a> FrameReader<'a> {
    fn new(shared: &'a Shared) -> Self {
        FrameReader { shared, buf: vec![0u8; READ_BUF], start: 0, end: 0 }
    }

    /// One `read(2)` into `dst`/`len`; 0 at end of file.
    fn raw_read(&self, dst: *mut u8, len: usize) -> io::Result<usize> {
        loop {
            // SAFETY: callers pass `len` writable bytes at `dst`.
            let n = unsafe { libc::read(self.shared.fd(), dst as *mut libc::c_void, len) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n > 0 {
                self.shared.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
                self.shared.mark_heard();
            }
            return Ok(n as usize);
        }
    }

    /// Reads more into the buffer (at most `most` bytes); `mid_frame` says what an end
    /// of file means.
    fn fill(&mut self, mid_frame: bool, most: usize) -> Result<(), ReadStop> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let room = (self.buf.len() - self.end).min(most);
        // SAFETY: the pointer and length stay inside `buf`.
        let dst = unsafe { self.buf.as_mut_ptr().add(self.end) };
        let n = self.raw_read(dst, room).map_err(ReadStop::Io)?;
        if n == 0 {
            return Err(ReadStop::Eof { mid_frame: mid_frame || self.start != self.end });
        }
        self.end += n;
        Ok(())
    }

    fn header(&mut self) -> Result<[u8; HEADER_LEN], ReadStop> {
        while self.end - self.start < HEADER_LEN {
            self.fill(false, HEADER_READ)?;
        }
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&self.buf[self.start..self.start + HEADER_LEN]);
        self.start += HEADER_LEN;
        Ok(h)
    }

    /// Reads a payload of `len` bytes into `out` (empty, with capacity for it).
    fn payload_into(&mut self, len: usize, out: &mut Vec<u8>) -> Result<(), ReadStop> {
        out.reserve(len);
        while out.len() < len {
            let want = len - out.len();
            if self.start < self.end {
                let k = want.min(self.end - self.start);
                out.extend_from_slice(&self.buf[self.start..self.start + k]);
                self.start += k;
            } else if want >= DIRECT_READ {
                let spare = out.spare_capacity_mut();
                let n = self.raw_read(spare.as_mut_ptr() as *mut u8, want.min(spare.len())).map_err(ReadStop::Io)?;
                if n == 0 {
                    return Err(ReadStop::Eof { mid_frame: true });
                }
                // SAFETY: read(2) initialised n bytes of the spare capacity.
                unsafe { out.set_len(out.len() + n) };
            } else {
                self.fill(true, usize::MAX)?;
            }
        }
        Ok(())
    }

    fn payload_u64(&mut self) -> Result<u64, ReadStop> {
        let mut v = Vec::with_capacity(8);
        self.payload_into(8, &mut v)?;
        let mut b = [0u8; 8];
        b.copy_from_slice(&v);
        Ok(u64::from_le_bytes(b))
    }

    /// Reads and handles one frame.
    fn frame(&mut self) -> Result<(), ReadStop> {
        let h = self.header()?;
        let kind = h[0];
        let stream = u32::from_le_bytes([h[1], h[2], h[3], h[4]]);
        let len32 = u32::from_le_bytes([h[5], h[6], h[7], h[8]]);
        let len = len32 as usize;
        let refuse = |m: String| Err(ReadStop::Protocol(m));
        if !(T_DATA..=T_CTRL).contains(&kind) {
            return refuse(format!(
                "peer sent a frame of unknown type {kind:#04x}: refusing (is the peer a ferry tcp medium?)"
            ));
        }
        if len > MAX_FRAME {
            return refuse(format!("peer sent a frame of {len32} bytes: refusing (the limit is 64 MiB)"));
        }
        if kind == T_DATA {
            if stream > MAX_STREAM {
                return refuse(format!(
                    "peer sent a frame for stream {stream}: refusing (stream ids go up to {MAX_STREAM})"
                ));
            }
        } else if stream != 0 {
            return refuse(format!("peer sent a control frame of type {kind} for stream {stream}: refusing"));
        }
        let name = ["", "DATA", "FLUSH", "ACK", "END", "CTRL"][kind as usize];
        let len_ok = match kind {
            T_FLUSH | T_ACK => len == 8,
            T_END => len % 4 == 0 && len <= 4 * (MAX_STREAM as usize + 1),
            T_CTRL => len <= MAX_CTRL,
            _ => true,
        };
        if !len_ok {
            return refuse(format!("peer sent a {name} frame of {len} bytes: refusing"));
        }
        let shared = self.shared;
        match kind {
            T_DATA => {
                let closed = {
                    let inbox = lock(&shared.inbox);
                    inbox.ended && !inbox.open_after_end.contains(&stream)
                };
                if closed {
                    return refuse(format!("peer sent data for stream {stream} after its end of data: refusing"));
                }
                if len == 0 {
                    return Ok(());
                }
                let mut chunk = if len >= DIRECT_READ {
                    let mut inbox = lock(&shared.inbox);
                    match inbox.spare.iter().position(|b| b.capacity() >= len) {
                        Some(i) => inbox.spare.swap_remove(i),
                        None => Vec::new(),
                    }
                } else {
                    Vec::new()
                };
                self.payload_into(len, &mut chunk)?;
                let mut inbox = lock(&shared.inbox);
                inbox.streams.entry(stream).or_default().chunks.push_back(chunk);
                inbox.buffered += len as u64;
                drop(inbox);
                shared.arrived.notify_all();
            }
            T_FLUSH => {
                let seq = self.payload_u64()?;
                shared.ack_owed.fetch_max(seq, Ordering::SeqCst);
                shared.settle_acks();
            }
            T_ACK => {
                let seq = self.payload_u64()?;
                let mut inbox = lock(&shared.inbox);
                inbox.acked = inbox.acked.max(seq);
                drop(inbox);
                shared.arrived.notify_all();
            }
            T_END => {
                let mut open = Vec::with_capacity(len);
                self.payload_into(len, &mut open)?;
                let mut inbox = lock(&shared.inbox);
                inbox.open_after_end = open.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                inbox.ended = true;
                drop(inbox);
                shared.arrived.notify_all();
            }
            _ => {
                let mut text = Vec::with_capacity(len);
                self.payload_into(len, &mut text)?;
                let msg: Value = match serde_json::from_slice(&text) {
                    Ok(v) => v,
                    Err(e) => return refuse(format!("peer sent a control message that is not JSON ({e}): refusing")),
                };
                lock(&shared.inbox).ctrl.push_back(msg);
                shared.arrived.notify_all();
            }
        }
        Ok(())
    }
}

fn reader_main(shared: Arc<Shared>) {
    let stop = {
        let mut r = FrameReader::new(&shared);
        loop {
            if let Err(stop) = r.frame() {
                break stop;
            }
        }
    };
    let broken = if shared.closing.load(Ordering::SeqCst) { Broken::Closed } else { Broken::from(stop) };
    if matches!(broken, Broken::Protocol(_)) {
        // The stream is out of step: nothing more can be read or sent on it, and the
        // peer must not wait for us.
        // SAFETY: shutting down our own socket.
        unsafe { libc::shutdown(shared.fd(), libc::SHUT_RDWR) };
    }
    let mut inbox = lock(&shared.inbox);
    inbox.broken = Some(broken);
    drop(inbox);
    shared.arrived.notify_all();
}

fn sockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid for writing an int option.
    let r = unsafe { libc::getsockopt(fd, level, name, &mut v as *mut libc::c_int as *mut libc::c_void, &mut len) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(v)
    }
}

fn set_sockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: v points at a live T of the given size.
    let r = unsafe {
        libc::setsockopt(fd, level, name, v as *const T as *const libc::c_void, std::mem::size_of::<T>() as libc::socklen_t)
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The peer's address as text, for `info`; Err(ENOTCONN) when not connected.
fn peer_name(fd: RawFd) -> io::Result<String> {
    // SAFETY: sockaddr_storage is plain data; zeroed is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: ss and len are valid for writing any socket address.
    let r = unsafe { libc::getpeername(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a: libc::sockaddr_in = unsafe { *(&ss as *const _ as *const libc::sockaddr_in) };
            SocketAddrV4::new(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)), u16::from_be(a.sin_port)).to_string()
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a: libc::sockaddr_in6 = unsafe { *(&ss as *const _ as *const libc::sockaddr_in6) };
            SocketAddrV6::new(Ipv6Addr::from(a.sin6_addr.s6_addr), u16::from_be(a.sin6_port), 0, a.sin6_scope_id)
                .to_string()
        }
        libc::AF_UNIX => "unix socket".into(),
        other => format!("address family {other}"),
    })
}

/// An optional integer key within `range`.
fn ranged(
    map: &Map<String, Value>,
    key: &str,
    what: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, String> {
    let Some(v) = map.get(key) else { return Ok(None) };
    match v.as_u64() {
        Some(n) if range.contains(&n) => Ok(Some(n)),
        _ => Err(format!(
            "key \"{key}\" in {what} must be an integer from {} to {}, got {v}",
            range.start(),
            range.end()
        )),
    }
}

/// Checks that `fd` is a connected stream socket and readies it; answers the peer's
/// address. Nothing here closes the fd.
fn prepare_socket(fd: RawFd, timeout: Duration) -> Result<String, String> {
    // SAFETY: fstat only writes the stat buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EBADF) {
            format!("fd {fd} is not open")
        } else {
            format!("cannot inspect fd {fd}: {e}")
        });
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(format!("fd {fd} is not a socket"));
    }
    let ty = sockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE).map_err(|e| format!("cannot inspect socket fd {fd}: {e}"))?;
    if ty != libc::SOCK_STREAM {
        return Err(format!("fd {fd} is not a stream socket (type {ty})"));
    }
    let peer = peer_name(fd).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            format!("fd {fd} is not a connected socket")
        } else {
            format!("cannot find the peer of socket fd {fd}: {e}")
        }
    })?;
    let domain = sockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).map_err(|e| format!("cannot inspect socket fd {fd}: {e}"))?;
    // SAFETY: fcntl on an open fd.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || (flags & libc::O_NONBLOCK != 0 && unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0) {
        return Err(format!("cannot make socket fd {fd} blocking: {}", io::Error::last_os_error()));
    }
    if domain == libc::AF_INET || domain == libc::AF_INET6 {
        set_sockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, &(1 as libc::c_int))
            .map_err(|e| format!("cannot set TCP_NODELAY on socket fd {fd}: {e}"))?;
    }
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    set_sockopt(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &tv)
        .map_err(|e| format!("cannot set a send timeout on socket fd {fd}: {e}"))?;
    // A receive timeout left from the handshake would read as a lost connection: the
    // reader blocks until data comes or the socket is shut down; waits time out above it.
    let no_timeout = libc::timeval { tv_sec: 0, tv_usec: 0 };
    set_sockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &no_timeout)
        .map_err(|e| format!("cannot clear the receive timeout of socket fd {fd}: {e}"))?;
    Ok(peer)
}

/// One end of a connection to the peer's medium.
pub struct TcpMedium {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    peer: String,
    /// The last FLUSH sequence number sent.
    flush_seq: u64,
    /// This side sent END.
    end_sent: bool,
    /// Streams this side's END left open.
    open_after_end: Vec<u32>,
}

impl TcpMedium {
    /// Opens the medium on a connected socket, with JSON parameters
    /// `{"fd":7,"timeout_ms":30000}`; takes ownership of the fd on success only.
    pub fn open(params: &str) -> Result<TcpMedium, String> {
        let what = "params";
        let map = parse_object(params, what, PARAMS_FORMAT)?;
        reject_unknown_keys(&map, &["fd", "timeout_ms"], what)?;
        let fd_value = required(&map, "fd", what)?;
        let fd: RawFd = match fd_value.as_i64() {
            Some(n) if (0..=i64::from(i32::MAX)).contains(&n) => n as RawFd,
            _ => {
                return Err(format!(
                    "key \"fd\" in params must be a file descriptor number (an integer from 0), got {fd_value}"
                ))
            }
        };
        let timeout_ms = ranged(&map, "timeout_ms", what, 1..=MAX_TIMEOUT_MS)?.unwrap_or(DEFAULT_TIMEOUT_MS);
        let timeout = Duration::from_millis(timeout_ms);
        let peer = prepare_socket(fd, timeout)?;

        // SAFETY: fd is an open socket, handed to us by the caller; from here it is ours
        // (and released again below if the medium cannot start).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let shared = Arc::new(Shared {
            fd: owned,
            timeout,
            inbox: Mutex::new(Inbox::default()),
            arrived: Condvar::new(),
            writer: Mutex::new(WriteState { pending: Vec::new(), failed: None }),
            ack_owed: AtomicU64::new(0),
            ack_sent: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            last_rx_ms: AtomicU64::new(0),
            base: Instant::now(),
            closing: AtomicBool::new(false),
        });
        let for_reader = Arc::clone(&shared);
        match std::thread::Builder::new().name("ferry-tcp-reader".into()).spawn(move || reader_main(for_reader)) {
            Ok(handle) => Ok(TcpMedium { shared, reader: Some(handle), peer, flush_seq: 0, end_sent: false, open_after_end: Vec::new() }),
            Err(e) => {
                // Hand the fd back unclosed: on error it stays the caller's.
                if let Ok(s) = Arc::try_unwrap(shared) {
                    let _ = s.fd.into_raw_fd();
                }
                Err(format!("cannot start the reader thread: {e}"))
            }
        }
    }

    fn check_stream(stream: u32) -> Result<(), String> {
        if stream > MAX_STREAM {
            Err(format!("stream id {stream} is over the limit of {MAX_STREAM}"))
        } else {
            Ok(())
        }
    }

    fn recv(&mut self, fixed: Option<Duration>) -> Result<Value, String> {
        self.shared.send_pending()?;
        self.shared.wait("waiting for a control message", fixed, |inbox| {
            if let Some(Broken::Protocol(m)) = &inbox.broken {
                return Some(Err(m.clone()));
            }
            if let Some(msg) = inbox.ctrl.pop_front() {
                return Some(Ok(msg));
            }
            if let Some(b) = &inbox.broken {
                return Some(Err(b.error("waiting for a control message")));
            }
            (fixed == Some(Duration::ZERO)).then(|| Err("no control message from the peer is waiting".into()))
        })
    }

    fn send_frame(&mut self, kind: u8, payload: &[u8], what: &str) -> Result<(), String> {
        self.shared.check_usable(&format!("sending {what}"))?;
        let h = header(kind, 0, payload.len());
        self.shared.with_writer(|w| self.shared.send_locked(w, &[&h, payload], what))
    }
}

impl MediumPlugin for TcpMedium {
    fn pushdata(&mut self, stream: u32, data: &[u8]) -> Result<(), String> {
        Self::check_stream(stream)?;
        if self.end_sent && !self.open_after_end.contains(&stream) {
            return Err(format!("cannot push to stream {stream}: the end of the stream data was already sent"));
        }
        if data.is_empty() {
            return Ok(());
        }
        self.shared.check_usable(&format!("sending stream {stream}"))?;
        for chunk in data.chunks(MAX_FRAME) {
            let h = header(T_DATA, stream, chunk.len());
            self.shared.with_writer(|w| {
                let what = || format!("{} bytes of stream {stream}", chunk.len());
                if chunk.len() < SMALL_PUSH {
                    if let Some(e) = &w.failed {
                        return Err(format!("cannot send {}: an earlier send to the peer failed: {e}", what()));
                    }
                    w.pending.extend_from_slice(&h);
                    w.pending.extend_from_slice(chunk);
                    if w.pending.len() >= PENDING_LIMIT {
                        self.shared.send_locked(w, &[], &what())?;
                    }
                    Ok(())
                } else {
                    self.shared.send_locked(w, &[&h, chunk], &what())
                }
            })?;
        }
        Ok(())
    }

    fn popdata(&mut self, stream: u32, buf: &mut [u8]) -> Result<usize, String> {
        Self::check_stream(stream)?;
        if buf.is_empty() {
            return Ok(0);
        }
        // Whatever this side gathered must reach the peer before we wait on it.
        self.shared.send_pending()?;
        let what = format!("waiting for stream {stream}");
        self.shared.wait(&what, None, |inbox| {
            if let Some(Broken::Protocol(m)) = &inbox.broken {
                return Some(Err(m.clone()));
            }
            if inbox.has_data(stream) {
                return Some(Ok(inbox.pop_into(stream, buf)));
            }
            if inbox.ended && !inbox.open_after_end.contains(&stream) {
                return Some(Ok(0));
            }
            inbox.broken.as_ref().map(|b| Err(b.error(&what)))
        })
    }

    fn command(&mut self, cmd: &str) -> Result<String, String> {
        let what = "command";
        let map = parse_object(cmd, what, r#"{"op":"send"|"recv"|"end"|"info"|"buffer",...}"#)?;
        let op = match required(&map, "op", what)? {
            Value::String(s) => s.as_str(),
            other => return Err(format!("key \"op\" in command must be a string, got {other}")),
        };
        let reply = match op {
            "send" => {
                let what = "command \"send\"";
                reject_unknown_keys(&map, &["op", "msg"], what)?;
                let text = required(&map, "msg", what)?.to_string();
                if text.len() > MAX_CTRL {
                    return Err(format!(
                        "control message of {} bytes is over the limit of {MAX_CTRL} bytes (1 MiB)",
                        text.len()
                    ));
                }
                self.send_frame(T_CTRL, text.as_bytes(), "a control message")?;
                json!({ "ok": true })
            }
            "recv" => {
                let what = "command \"recv\"";
                reject_unknown_keys(&map, &["op", "timeout_ms"], what)?;
                let fixed = ranged(&map, "timeout_ms", what, 0..=MAX_TIMEOUT_MS)?.map(Duration::from_millis);
                json!({ "msg": self.recv(fixed)? })
            }
            "end" => {
                let what = "command \"end\"";
                reject_unknown_keys(&map, &["op", "open"], what)?;
                let open: Vec<u32> = match map.get("open") {
                    None => Vec::new(),
                    Some(Value::Array(ids)) => ids
                        .iter()
                        .map(|v| v.as_u64().filter(|&n| n <= MAX_STREAM as u64).map(|n| n as u32))
                        .collect::<Option<_>>()
                        .ok_or_else(|| format!("key \"open\" in {what} must list stream ids up to {MAX_STREAM}"))?,
                    Some(other) => return Err(format!("key \"open\" in {what} must be an array, got {other}")),
                };
                if !self.end_sent {
                    let payload: Vec<u8> = open.iter().flat_map(|n| n.to_le_bytes()).collect();
                    self.send_frame(T_END, &payload, "the end of the stream data")?;
                    self.end_sent = true;
                    self.open_after_end = open;
                }
                json!({ "ok": true })
            }
            "info" => {
                reject_unknown_keys(&map, &["op"], "command \"info\"")?;
                let buffered = lock(&self.shared.inbox).buffered;
                json!({
                    "medium": "tcp",
                    "peer": self.peer,
                    "bytes_sent": self.shared.bytes_sent.load(Ordering::Relaxed),
                    "bytes_received": self.shared.bytes_received.load(Ordering::Relaxed),
                    "buffered_bytes": buffered,
                    "timeout_ms": self.shared.timeout.as_millis() as u64,
                })
            }
            "buffer" => {
                let what = "command \"buffer\"";
                reject_unknown_keys(&map, &["op", "bytes"], what)?;
                required(&map, "bytes", what)?;
                let bytes = ranged(&map, "bytes", what, MIN_SOCKBUF..=MAX_SOCKBUF)?.unwrap_or(MIN_SOCKBUF);
                let fd = self.shared.fd();
                let v = bytes as libc::c_int;
                for (name, label) in [(libc::SO_SNDBUF, "SO_SNDBUF"), (libc::SO_RCVBUF, "SO_RCVBUF")] {
                    set_sockopt(fd, libc::SOL_SOCKET, name, &v).map_err(|e| format!("cannot set {label} to {bytes}: {e}"))?;
                }
                let get = |name, label| {
                    sockopt_int(fd, libc::SOL_SOCKET, name).map_err(|e| format!("cannot read {label}: {e}"))
                };
                json!({
                    "ok": true,
                    "sndbuf": get(libc::SO_SNDBUF, "SO_SNDBUF")?,
                    "rcvbuf": get(libc::SO_RCVBUF, "SO_RCVBUF")?,
                })
            }
            other => {
                return Err(format!(
                    "unknown op \"{other}\" (known ops: \"send\", \"recv\", \"end\", \"info\", \"buffer\")"
                ))
            }
        };
        Ok(reply.to_string())
    }

    fn flush(&mut self) -> Result<(), String> {
        let seq = self.flush_seq + 1;
        self.send_frame(T_FLUSH, &seq.to_le_bytes(), &format!("flush marker {seq}"))?;
        self.flush_seq = seq;
        let what = format!("waiting for the peer to acknowledge flush {seq}");
        self.shared.wait(&what, None, |inbox| {
            if inbox.acked >= seq {
                return Some(Ok(()));
            }
            inbox.broken.as_ref().map(|b| Err(b.error(&what)))
        })
    }
}

impl Drop for TcpMedium {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        // Wakes the reader from a blocked read (end of file) or send (EPIPE).
        // SAFETY: shutting down our own socket; the fd stays open until the last Arc goes.
        unsafe { libc::shutdown(self.shared.fd(), libc::SHUT_RDWR) };
        if let Some(handle) = self.reader.take() {
            let _ = handle.join();
        }
    }
}

ferry_plugin_api::export_medium!(
    "tcp",
    "Streams over a TCP connection to a ferry daemon",
    |params: &str| TcpMedium::open(params)
);

#[cfg(test)]
mod tests;
