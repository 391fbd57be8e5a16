//! The restore side of established TCP connections (see the parent module): each made
//! in repair mode on ferry's duplicate of the copy's socket, left silent until the
//! copy's fate is known.

use std::os::fd::{AsRawFd, OwnedFd};

use super::*;

/// Sets the sequences of connection `c` on `sock` (repair mode, bound) and connects it
/// to `peer` (no SYN in repair mode). The segment size is worked out at `connect` (the
/// repair options come too late for it), from the route and the clamp `TCP_MAXSEG`
/// gives, less the room for the timestamp option when the namespace enables them
/// (whatever the connection has): clamped to the source's plus that room, it comes out
/// as the source's. The clamp is dropped after. (Where timestamps are off, the copy's
/// segment size may come out up to 12 bytes over the source's when its route allows.)
fn connect_in_repair(sock: &OwnedFd, c: &Conn, peer: &[u8]) -> Result<(), String> {
    let tcp = libc::IPPROTO_TCP;
    for (q, seq) in [(SEND_QUEUE, c.snd_seq), (RECV_QUEUE, c.rcv_seq)] {
        set_int(sock, tcp, TCP_REPAIR_QUEUE, q, "TCP_REPAIR_QUEUE")?;
        set_int(sock, tcp, TCP_QUEUE_SEQ, seq as i32, "TCP_QUEUE_SEQ")?;
    }
    set_int(sock, tcp, TCP_REPAIR_QUEUE, NO_QUEUE, "TCP_REPAIR_QUEUE")?;
    if c.snd_mss > 0 {
        // At most what the option takes (MAX_TCP_WINDOW): on loopback's large MTU the
        // size is worked out again below (v4).
        set_int(sock, tcp, libc::TCP_MAXSEG, (c.snd_mss + 12).min(32767) as i32, "TCP_MAXSEG")?;
    }
    // SAFETY: connect reads `len` bytes of the address.
    if unsafe { libc::connect(sock.as_raw_fd(), peer.as_ptr().cast(), peer.len() as libc::socklen_t) } < 0 {
        return Err(last_err("connect in repair mode"));
    }
    if c.snd_mss > 0 {
        set_int(sock, tcp, libc::TCP_MAXSEG, 0, "TCP_MAXSEG")?;
    }
    Ok(())
}

fn send_all(sock: &OwnedFd, data: &[u8], what: &str) -> Result<(), String> {
    let mut done = 0;
    while done < data.len() {
        // SAFETY: send reads at most the rest of `data`.
        let n = unsafe {
            libc::send(sock.as_raw_fd(), data[done..].as_ptr().cast(), data.len() - done, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n <= 0 {
            return Err(last_err(&format!("{what}: writing {} bytes of a queue", data.len() - done)));
        }
        done += n as usize;
    }
    Ok(())
}

/// A connection made in repair mode: ferry's duplicate, the bytes not yet sent,
/// whether `SO_REUSEADDR` was set, the send buffer to give back once they are
/// written, its name.
struct Made {
    sock: OwnedFd,
    /// Its lock rules (see [`drop_rules`]).
    rules: [String; 2],
    /// Restored closed (`--tcp-close`): nothing to do but lift its lock.
    closed: bool,
    unsent: Vec<u8>,
    reuse: bool,
    sndbuf: Option<i32>,
    what: String,
}

/// The restore side: connections made in repair mode, waiting for `resume`.
#[derive(Default)]
pub struct Restored {
    conns: Vec<Made>,
    /// Lock tables to delete, in the namespace of the socket held (by index into `conns`).
    locks: Vec<(String, usize)>,
    /// The copy.
    pid: i32,
    /// Every plugin has rebuilt its part: what is left waits for the copy's fate.
    ready: bool,
}

impl Restored {
    /// Makes socket `sock` (ferry's duplicate of the child's new socket) connection `c`.
    /// `close`: restored closed instead (`--tcp-close`).
    pub fn restore(&mut self, pid: i32, sock: OwnedFd, c: &Conn, what: &str, close: bool) -> Result<(), String> {
        self.pid = pid;
        let e = |m: String| format!("{what}: {m}");
        let tcp = libc::IPPROTO_TCP;
        let hex = |h: &str, max| ferry_plugin_api::util::from_hex(h, what, max, false);
        let (local, peer) = (hex(&c.local, 128)?, hex(&c.peer, 128)?);
        let (send, recv) = (hex(&c.send, MAX_QUEUE)?, hex(&c.recv, MAX_QUEUE)?);
        set_int(&sock, tcp, TCP_REPAIR, REPAIR_ON, "TCP_REPAIR on (needs CAP_NET_ADMIN)").map_err(e)?;
        let mut reuse = false;
        for [level, name, value] in &c.options {
            if (*level, *name) == (libc::SOL_SOCKET, libc::SO_REUSEADDR) {
                reuse = *value != 0; // repair mode forces reuse; set after it
                continue;
            }
            set_int(&sock, *level, *name, *value, &format!("setsockopt({level}, {name}, {value})")).map_err(e)?;
        }
        // The kernel grows a connection's buffers as it goes, and a queue written again
        // may take more room than it did (its segments cut otherwise): a buffer with a
        // queue to hold is forced large enough for the writing, then back to the size
        // the source had (which the copy then keeps: forcing locks it, no autotuning).
        let room = |len: usize, had: i32| (had as usize).max(4 * len + (64 << 10)).min(i32::MAX as usize) as i32 / 2;
        if !send.is_empty() {
            set_int(&sock, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, room(send.len(), c.bufs[0]), "SO_SNDBUFFORCE").map_err(e)?;
        }
        if !recv.is_empty() {
            set_int(&sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, room(recv.len(), c.bufs[1]), "SO_RCVBUFFORCE").map_err(e)?;
        }
        // SAFETY: bind/connect read `len` bytes of the address.
        if unsafe { libc::bind(sock.as_raw_fd(), local.as_ptr().cast(), local.len() as libc::socklen_t) } < 0 {
            let (_, a, p) = nft_addr(&local).unwrap_or_default();
            return Err(e(last_err(&format!("bind to its local address {a} port {p} (does this host own it?)"))));
        }
        connect_in_repair(&sock, c, &peer).map_err(e)?;
        if close {
            // `ferry restore --tcp-close`: disconnected in repair mode, the socket goes to
            // CLOSE silently with ECONNABORTED pending for the process; the lock lifted,
            // the peer's next packet meets no socket and gets a reset.
            let unspec = [0u8; 16];
            // SAFETY: connect reads 16 bytes of an AF_UNSPEC address.
            if unsafe { libc::connect(sock.as_raw_fd(), unspec.as_ptr().cast(), 16) } < 0 {
                return Err(e(last_err("disconnecting (--tcp-close)")));
            }
            set_int(&sock, tcp, TCP_REPAIR, REPAIR_OFF_NO_WP, "TCP_REPAIR off").map_err(e)?;
            if reuse {
                set_int(&sock, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1, "SO_REUSEADDR").map_err(e)?;
            }
            self.closed(sock, c, what);
            return Ok(());
        }
        // The peer's MSS as the clamp, but no more than the source's segment size (and
        // the room for timestamps): were the kernel to work the size out again later
        // (a route's MTU changed, as on v6), it stays the source's, not larger.
        let clamp = if c.snd_mss > 0 { c.mss.min(c.snd_mss + 12) } else { c.mss };
        let mut opts: Vec<[u32; 2]> = vec![[TCPOPT_MAXSEG, clamp]];
        if let Some((snd, rcv)) = c.wscale {
            opts.push([TCPOPT_WINDOW, snd as u32 | (rcv as u32) << 16]);
        }
        if c.sack {
            opts.push([TCPOPT_SACK_PERM, 0]);
        }
        if c.timestamp.is_some() {
            opts.push([TCPOPT_TIMESTAMP, 0]);
        }
        let bytes: Vec<u8> = opts.iter().flatten().flat_map(|v| v.to_ne_bytes()).collect();
        set_raw(&sock, tcp, TCP_REPAIR_OPTIONS, &bytes, "TCP_REPAIR_OPTIONS").map_err(e)?;
        if let Some(ts) = c.timestamp {
            set_int(&sock, tcp, TCP_TIMESTAMP, ts as i32, "TCP_TIMESTAMP").map_err(e)?;
        }
        let sent = (c.sent as usize).min(send.len());
        for (q, data) in [(RECV_QUEUE, &recv[..]), (SEND_QUEUE, &send[..sent])] {
            set_int(&sock, tcp, TCP_REPAIR_QUEUE, q, "TCP_REPAIR_QUEUE").map_err(e)?;
            send_all(&sock, data, "repair mode").map_err(e)?;
        }
        set_int(&sock, tcp, TCP_REPAIR_QUEUE, NO_QUEUE, "TCP_REPAIR_QUEUE").map_err(e)?;
        if !recv.is_empty() {
            set_int(&sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, c.bufs[1] / 2, "SO_RCVBUFFORCE").map_err(e)?;
        }
        let w: Vec<u8> = c.window.iter().flat_map(|v| v.to_ne_bytes()).collect();
        set_raw(&sock, tcp, TCP_REPAIR_WINDOW, &w, "TCP_REPAIR_WINDOW").map_err(e)?;
        // IPv4 (v4-mapped too): setting the (empty) IP options makes the kernel work the
        // segment size out again, now from the clamp above and the source's window.
        if c.snd_mss > 0 && nft_addr(&local).is_some_and(|(v6, _, _)| !v6) {
            // SAFETY: an empty option buffer: setsockopt reads nothing.
            if unsafe { libc::setsockopt(sock.as_raw_fd(), libc::IPPROTO_IP, libc::IP_OPTIONS, std::ptr::null(), 0) } < 0 {
                return Err(e(last_err("IP_OPTIONS")));
            }
        }
        if !c.lock.is_empty() && !self.locks.iter().any(|(n, _)| *n == c.lock) {
            self.locks.push((c.lock.clone(), self.conns.len()));
        }
        let sndbuf = (!send.is_empty()).then_some(c.bufs[0]);
        let rules = drop_rules(&local, &peer).ok_or_else(|| e("an address of no known family".into()))?;
        self.conns.push(Made { sock, rules, closed: false, unsent: send[sent..].to_vec(), reuse, sndbuf, what: what.to_string() });
        Ok(())
    }

    /// Connection `c` restored closed: only its lock is left to lift.
    fn closed(&mut self, sock: OwnedFd, c: &Conn, what: &str) {
        if !c.lock.is_empty() && !self.locks.iter().any(|(n, _)| *n == c.lock) {
            self.locks.push((c.lock.clone(), self.conns.len()));
        }
        let rules = [String::new(), String::new()];
        self.conns.push(Made { sock, rules, closed: true, unsent: Vec::new(), reuse: false, sndbuf: None, what: what.to_string() });
    }

    /// Every plugin has rebuilt its part: the connections wait, in repair mode and
    /// silent, for the copy's fate (see the `Drop`).
    pub fn resume(&mut self) {
        self.ready = !self.conns.is_empty();
    }

    /// Just before the copy runs (a restore; a migration past its commit point): repair
    /// off, the unsent bytes written, the locks lifted.
    fn go(&mut self) -> Result<(), String> {
        for m in self.conns.iter().filter(|m| !m.closed) {
            let e = |x: String| format!("{}: {x}", m.what);
            set_int(&m.sock, libc::IPPROTO_TCP, TCP_REPAIR, REPAIR_OFF, "TCP_REPAIR off").map_err(e)?;
            if m.reuse {
                set_int(&m.sock, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1, "SO_REUSEADDR").map_err(e)?;
            }
            send_all(&m.sock, &m.unsent, "its bytes not yet sent").map_err(e)?;
            if let Some(had) = m.sndbuf {
                set_int(&m.sock, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, had / 2, "SO_SNDBUFFORCE").map_err(e)?;
            }
        }
        let names: Vec<String> = self.locks.iter().map(|(n, _)| n.clone()).collect();
        let rules: Vec<String> = self.conns.iter().filter(|m| !m.closed).flat_map(|m| m.rules.clone()).collect();
        for (name, i) in std::mem::take(&mut self.locks) {
            let (_ns, netns) = netns_of(&self.conns[i].sock)?;
            unlock_in(&netns, &name).map_err(|m| format!("lifting the network lock: {m}"))?;
        }
        if let Some(first) = self.conns.first() {
            let (_ns, netns) = netns_of(&first.sock)?;
            for name in stale_locks(&netns, &rules, &names) {
                unlock_in(&netns, &name).map_err(|m| format!("lifting an earlier network lock of these connections: {m}"))?;
            }
        }
        self.conns.clear();
        Ok(())
    }
}

impl Drop for Restored {
    /// The framework drops the plugins that rebuilt a process once its fate is known:
    /// alive and held, it is about to run; dead (killed by a failed restore, a
    /// migration rolled back, a destination ferry that died), its connections, still
    /// in repair mode, closed without a word to the peer, and any lock stays.
    fn drop(&mut self) {
        if !self.ready || killed(self.pid) {
            return;
        }
        if let Err(e) = self.go() {
            eprintln!("ferry: process {}: {e}", self.pid);
        }
    }
}
