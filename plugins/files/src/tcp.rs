//! Established TCP connections (v4 and v6), carried with `TCP_REPAIR`, and the network
//! lock that keeps their peers from seeing a reset or losing a byte meanwhile.
//!
//! **Checkpoint** (source). At `setup` (the process is frozen, nothing read yet) every
//! connection of the process is found through ferry's duplicates of its socket fds
//! (`pidfd_getfd`) and *locked*: an nftables table `ferry-<pid>-<token>` in the
//! socket's network namespace drops, in both directions, every packet of each 4-tuple,
//! so the peer retransmits into silence. A watcher (`sh` inside that namespace, in a
//! session of its own) holds the table's fate on a pipe: told `keep` it leaves it,
//! told anything else or finding the pipe closed (ferry died) it deletes it. Then each
//! connection is read in repair mode on ferry's duplicate: sequence numbers, both
//! queues (`MSG_PEEK`), MSS, window scale / SACK / timestamps, the window, the options;
//! repair mode goes off again at once (without a window probe; `SO_REUSEADDR`, which
//! the kernel clears with it, is put back), the lock keeps the socket silent.
//! When the event ends (the plugin is dropped) ferry looks at the process: **killed**
//! (a checkpoint, a migration's commit): each duplicate goes back into repair mode and
//! is closed, which the kernel does silently (no FIN, no RST), and the lock is kept for
//! the restore to lift, or until the namespace no longer owns the connections' address
//! (a migration's source, once the address has moved: [`watcher_script`]); **running** (a failure rolled back, `--leave-running`): the
//! lock is lifted, the connection carries on with the peer's retransmissions.
//!
//! **Restore**: the restore child makes the socket (an injected `socket`); ferry, root
//! with `CAP_NET_ADMIN`, does the rest on a duplicate whatever credentials the child
//! gets later: repair on, options, bind, sequences, `connect` (no SYN in repair mode),
//! repair options, timestamp offset, the received-unread bytes, the sent-unacknowledged
//! bytes, the window. Once the copy's fate is known (the framework drops the plugins
//! that rebuilt it before it lets it run, past a migration's commit point, and after
//! it kills it) repair goes off (with a window probe), the not-yet-sent bytes are
//! written, and the lock tables named in the image are deleted in the socket's
//! namespace; or, the copy dead, its connections closed in repair mode said nothing.
//!
//! The copy's segment size is the source's (see [`connect_in_repair`]).
//!
//! Known gaps. A migration within one network namespace cannot
//! carry a connection (the copy's `connect` meets the source's live 4-tuple; a listener
//! of the process's meets its port first) and fails with one line, the source running
//! on. `ferry restore --tcp-close` restores connections closed instead. The lock of a process killed for a checkpoint
//! never restored stays until its user deletes it (README); `ferry check` lists them.
//!
//! Refused with one line: half-closed connections (FIN sent or received: states
//! FIN_WAIT1/2, CLOSE_WAIT, CLOSING, LAST_ACK), connections being opened, a socket with
//! an upper-layer protocol (kTLS), urgent data, queues over [`MAX_QUEUE`].

use std::{
    io::Write,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Child, Command, Stdio},
};

use ferry_plugin_api::{util::to_hex, ContextRef};

mod restore;
pub use restore::Restored;
use serde::{Deserialize, Serialize};

const TCP_REPAIR: i32 = 19;
const TCP_REPAIR_QUEUE: i32 = 20;
const TCP_QUEUE_SEQ: i32 = 21;
const TCP_REPAIR_OPTIONS: i32 = 22;
const TCP_TIMESTAMP: i32 = 24;
const TCP_REPAIR_WINDOW: i32 = 29;
const TCP_ULP: i32 = 31;
const REPAIR_ON: i32 = 1;
const REPAIR_OFF: i32 = 0;
const REPAIR_OFF_NO_WP: i32 = -1;
const NO_QUEUE: i32 = 0;
const RECV_QUEUE: i32 = 1;
const SEND_QUEUE: i32 = 2;
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
const SIOCOUTQ: libc::c_ulong = 0x5411;
const SIOCINQ: libc::c_ulong = 0x541B;
const SIOCOUTQNSD: libc::c_ulong = 0x894B;
const SIOCATMARK: libc::c_ulong = 0x8905;
const SIOCGSKNS: libc::c_ulong = 0x894C;
/// Bytes one connection's queues may hold together (they travel inside its record).
pub const MAX_QUEUE: usize = 16 << 20;

/// Options read before repair mode and set again on the copy: (level, option).
const OPTIONS: [(i32, i32); 8] = [
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
    (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
    (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
];

/// One established connection as the image holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conn {
    pub family: i32,
    /// Local and peer `sockaddr_in`/`sockaddr_in6`, hex.
    pub local: String,
    pub peer: String,
    /// The sequence number of the first byte of the send queue (the oldest not
    /// acknowledged) and of the receive queue (the oldest not read).
    pub snd_seq: u32,
    pub rcv_seq: u32,
    /// The send queue, hex: its first `sent` bytes went out unacknowledged, the rest not yet.
    pub send: String,
    pub sent: u32,
    /// The receive queue (received, not read), hex.
    pub recv: String,
    /// The peer's MSS (the clamp, `TCP_MAXSEG` in repair mode).
    pub mss: u32,
    /// The segment size the connection was sending with (`tcpi_snd_mss`); 0 in older
    /// images (the copy then starts from the kernel's default).
    #[serde(default)]
    pub snd_mss: u32,
    /// (send, receive) window scale when negotiated.
    pub wscale: Option<(u8, u8)>,
    pub sack: bool,
    /// `TCP_TIMESTAMP` (the socket's clock) when timestamps were negotiated.
    pub timestamp: Option<u32>,
    /// `struct tcp_repair_window`: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
    pub window: [u32; 5],
    /// (level, option, value) in the order to set them (`IPV6_V6ONLY` first).
    pub options: Vec<[i32; 3]>,
    /// `SO_SNDBUF` and `SO_RCVBUF` as the kernel had grown them: a copy with bytes to
    /// hold in a queue gets that buffer back (`SO_*BUFFORCE`) once they are written.
    pub bufs: [i32; 2],
    /// The network lock's nftables table, lifted once the copy runs.
    pub lock: String,
}

impl Conn {
    /// Checks what a damaged or hostile image could get wrong before anything is made.
    pub fn validate(&self, what: &str) -> Result<(), String> {
        let want = match self.family {
            libc::AF_INET => 16,
            libc::AF_INET6 => 28,
            f => return Err(format!("{what}: a connection of address family {f}")),
        };
        for a in [&self.local, &self.peer] {
            let b = ferry_plugin_api::util::from_hex(a, what, want, true)?;
            if u16::from_ne_bytes([b[0], b[1]]) as i32 != self.family {
                return Err(format!("{what}: an address of another family"));
            }
        }
        let levels = [libc::SOL_SOCKET, libc::IPPROTO_TCP, libc::IPPROTO_IPV6];
        let queues = self.send.len() / 2 + self.recv.len() / 2;
        if queues > MAX_QUEUE || self.sent as usize > self.send.len() / 2 || self.options.iter().any(|o| !levels.contains(&o[0])) {
            return Err(format!("{what}: a connection the image describes wrongly"));
        }
        let named = self.lock.starts_with("ferry-") && self.lock.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !self.lock.is_empty() && !named {
            return Err(format!("{what}: a network lock named {:?}", self.lock));
        }
        Ok(())
    }
}

fn last_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn get_raw(fd: &OwnedFd, level: i32, name: i32, buf: &mut [u8], what: &str) -> Result<usize, String> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `buf`.
    if unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, buf.as_mut_ptr().cast(), &mut len) } < 0 {
        return Err(last_err(what));
    }
    Ok(len as usize)
}

fn get_int(fd: &OwnedFd, level: i32, name: i32, what: &str) -> Result<i32, String> {
    let mut b = [0u8; 4];
    get_raw(fd, level, name, &mut b, what)?;
    Ok(i32::from_ne_bytes(b))
}

fn set_raw(fd: &OwnedFd, level: i32, name: i32, val: &[u8], what: &str) -> Result<(), String> {
    // SAFETY: setsockopt reads `val.len()` bytes from `val`.
    if unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, val.as_ptr().cast(), val.len() as libc::socklen_t) } < 0 {
        return Err(last_err(what));
    }
    Ok(())
}

fn set_int(fd: &OwnedFd, level: i32, name: i32, v: i32, what: &str) -> Result<(), String> {
    set_raw(fd, level, name, &v.to_ne_bytes(), what)
}

fn ioctl_int(fd: &OwnedFd, req: libc::c_ulong, what: &str) -> Result<i32, String> {
    let mut v: libc::c_int = 0;
    // SAFETY: these ioctls write one int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v) } < 0 {
        return Err(last_err(what));
    }
    Ok(v)
}

fn sock_name(fd: &OwnedFd, peer: bool) -> Result<Vec<u8>, String> {
    let mut addr = [0u8; 128];
    let mut alen = addr.len() as libc::socklen_t;
    // SAFETY: getsockname/getpeername write at most `alen` bytes into `addr`.
    let r = unsafe {
        if peer {
            libc::getpeername(fd.as_raw_fd(), addr.as_mut_ptr().cast(), &mut alen)
        } else {
            libc::getsockname(fd.as_raw_fd(), addr.as_mut_ptr().cast(), &mut alen)
        }
    };
    if r < 0 {
        return Err(last_err(if peer { "getpeername" } else { "getsockname" }));
    }
    Ok(addr[..alen as usize].to_vec())
}

/// The kernel's TCP state names, by number.
fn state_name(s: u8) -> &'static str {
    match s {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1 (half-closed: it sent its FIN)",
        5 => "FIN_WAIT2 (half-closed: it sent its FIN)",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT (half-closed: the peer sent its FIN)",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "unknown",
    }
}

/// Whether `fd` is a TCP socket that is not a listener (a connection, in any state).
pub fn is_connection(fd: &OwnedFd) -> bool {
    let int = |l, n| get_int(fd, l, n, "");
    matches!(int(libc::SOL_SOCKET, libc::SO_DOMAIN), Ok(libc::AF_INET | libc::AF_INET6))
        && int(libc::SOL_SOCKET, libc::SO_TYPE) == Ok(libc::SOCK_STREAM)
        && int(libc::SOL_SOCKET, libc::SO_PROTOCOL) == Ok(libc::IPPROTO_TCP)
        && int(libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == Ok(0)
}

/// `(address, port)` of a `sockaddr_in`/`sockaddr_in6`, as nftables writes them;
/// a v4-mapped v6 address is the v4 address it carries (its packets are IPv4).
fn nft_addr(sa: &[u8]) -> Option<(bool, String, u16)> {
    let port = u16::from_be_bytes([*sa.get(2)?, *sa.get(3)?]);
    match u16::from_ne_bytes([sa[0], sa[1]]) as i32 {
        libc::AF_INET => Some((false, std::net::Ipv4Addr::new(sa[4], sa[5], sa[6], sa[7]).to_string(), port)),
        libc::AF_INET6 => {
            let b: [u8; 16] = sa.get(8..24)?.try_into().ok()?;
            let a = std::net::Ipv6Addr::from(b);
            Some(match a.to_ipv4_mapped() {
                Some(v4) => (false, v4.to_string(), port),
                None => (true, a.to_string(), port),
            })
        }
        _ => None,
    }
}

/// The rules dropping the packets of connection (local, peer): coming in, going out.
fn drop_rules(local: &[u8], peer: &[u8]) -> Option<[String; 2]> {
    let (v6, la, lp) = nft_addr(local)?;
    let (_, pa, pp) = nft_addr(peer)?;
    let ip = if v6 { "ip6" } else { "ip" };
    Some([
        format!("{ip} saddr {pa} {ip} daddr {la} tcp sport {pp} tcp dport {lp} drop"),
        format!("{ip} saddr {la} {ip} daddr {pa} tcp sport {lp} tcp dport {pp} drop"),
    ])
}

/// The nftables script of a lock table named `name` on `tuples` (local, peer).
pub fn lock_script(name: &str, tuples: &[(Vec<u8>, Vec<u8>)]) -> Option<String> {
    let (mut input, mut output) = (String::new(), String::new());
    for (local, peer) in tuples {
        let [i, o] = drop_rules(local, peer)?;
        input += &format!("    {i}\n");
        output += &format!("    {o}\n");
    }
    Some(format!(
        "table inet {name} {{\n  chain input {{\n    type filter hook input priority -310; policy accept;\n{input}  }}\n  chain output {{\n    type filter hook output priority -310; policy accept;\n{output}  }}\n}}\n"
    ))
}

/// Path naming the network namespace of socket `fd` for `nsenter --net=`; the fd that
/// holds it is returned too (keep it open while the path is used).
fn netns_of(fd: &OwnedFd) -> Result<(OwnedFd, String), String> {
    // SAFETY: SIOCGSKNS answers a new fd (or -1).
    let ns = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCGSKNS) };
    if ns < 0 {
        return Err(last_err("SIOCGSKNS (the socket's network namespace)"));
    }
    // SAFETY: a fresh fd of ours.
    let ns = unsafe { OwnedFd::from_raw_fd(ns) };
    let path = format!("/proc/{}/fd/{}", std::process::id(), ns.as_raw_fd());
    Ok((ns, path))
}

fn nft_in(netns: &str, args: &[&str], script: Option<&str>) -> Result<(), String> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={netns}")).arg("nft").args(args);
    cmd.stdin(if script.is_some() { Stdio::piped() } else { Stdio::null() }).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("running nsenter nft (nftables installed?): {e}"))?;
    if let (Some(s), Some(mut stdin)) = (script, child.stdin.take()) {
        stdin.write_all(s.as_bytes()).map_err(|e| format!("writing to nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if !out.status.success() {
        return Err(format!("nft {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// ferry's lock tables in namespace `netns` other than `but` holding a rule of
/// `rules`: locks an earlier move of these very connections left on this host (the
/// source of a migration keeps its lock until the address has moved away; the
/// connection coming back finds it).
fn stale_locks(netns: &str, rules: &[String], but: &[String]) -> Vec<String> {
    let list = |args: &[&str]| {
        Command::new("nsenter").arg(format!("--net={netns}")).arg("nft").args(args).output().ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
    };
    let tables = list(&["list", "tables", "inet"]);
    let names = tables.lines().filter_map(|l| l.trim().strip_prefix("table inet ")).filter(|n| n.starts_with("ferry-") && !but.iter().any(|b| b == n));
    names.filter(|n| list(&["list", "table", "inet", n]).lines().any(|l| rules.iter().any(|r| l.trim() == r))).map(str::to_string).collect()
}

/// Deletes lock table `name` in namespace `netns`; an absent table is no error.
pub fn unlock_in(netns: &str, name: &str) -> Result<(), String> {
    match nft_in(netns, &["delete", "table", "inet", name], None) {
        Err(e) if e.contains("No such file") => Ok(()),
        r => r,
    }
}

/// The watcher of lock table `name` on connections of local addresses `addrs`: told
/// `keep` (the process was killed: a checkpoint, a migration's commit) it leaves the
/// table, and a background loop of its keeps it as long as this namespace owns one of
/// the addresses (`ip route get` says `local`) and it exists, deleting it once none is
/// owned: the address moved to the destination, no packet of the peer's reaches here
/// to be answered with a reset. (A restore deleting the table ends the loop; after an
/// hour the loop gives up and the table stays, as `ferry check` shows.) Told anything
/// else, or finding the pipe closed (ferry died), it deletes the table.
fn watcher_script(name: &str, addrs: &[String]) -> String {
    let owned: String = addrs.iter().map(|a| format!("ip -o route get {a} 2>/dev/null | grep -q '^local ' && o=1; ")).collect();
    format!(
        "read x; if [ \"$x\" = keep ]; then (i=0; while [ $i -lt 7200 ] && nft list table inet {name} >/dev/null 2>&1; do \
         o=0; {owned}if [ $o = 0 ] && command -v ip >/dev/null; then nft delete table inet {name}; exit; fi; \
         sleep 0.5; i=$((i+1)); done) & else nft delete table inet {name}; fi"
    )
}

/// A network lock in force: its table and the watcher that removes it should ferry die.
struct Lock {
    name: String,
    watcher: Child,
    /// The namespace the watcher's `nsenter` opens by a path of ours: kept open
    /// until the watcher is done with it.
    _netns: OwnedFd,
}

impl Lock {
    fn install(pid: i32, sample: &OwnedFd, tuples: &[(Vec<u8>, Vec<u8>)]) -> Result<Lock, String> {
        let mut token = [0u8; 4];
        // SAFETY: getrandom writes at most 4 bytes into `token`.
        unsafe { libc::getrandom(token.as_mut_ptr().cast(), 4, 0) };
        let name = format!("ferry-{pid}-{}", to_hex(&token));
        let script = lock_script(&name, tuples).ok_or("a connection whose addresses are of no known family")?;
        let (ns, netns) = netns_of(sample)?;
        nft_in(&netns, &["-f", "-"], Some(&script)).map_err(|e| format!("installing the network lock: {e}"))?;
        let mut addrs: Vec<String> = tuples.iter().filter_map(|(l, _)| nft_addr(l)).map(|(_, a, _)| a).collect();
        addrs.dedup();
        let mut cmd = Command::new("nsenter");
        let body = watcher_script(&name, &addrs);
        cmd.arg(format!("--net={netns}")).args(["sh", "-c", &body]);
        cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null());
        // SAFETY: setsid is async-signal-safe. A session of its own: a ^C meant for
        // ferry must not take the watcher along.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::setsid();
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(watcher) => Ok(Lock { name, watcher, _netns: ns }),
            Err(e) => {
                let _ = unlock_in(&netns, &name);
                Err(format!("starting the network lock's watcher: {e}"))
            }
        }
    }

    /// `keep`: leave the table for the restore (or until the address moves away, see
    /// [`watcher_script`]); else delete it. Waits for the watcher's answer.
    fn end(mut self, keep: bool) {
        if let Some(mut p) = self.watcher.stdin.take() {
            let _ = writeln!(p, "{}", if keep { "keep" } else { "unlock" });
        }
        let _ = self.watcher.wait();
    }
}

/// The source side: the lock, and ferry's duplicates of the connections read.
#[derive(Default)]
pub struct Source {
    pid: i32,
    lock: Option<Lock>,
    /// 4-tuples under the lock.
    locked: Vec<(Vec<u8>, Vec<u8>)>,
    /// Duplicates of the connections read, to close silently if the process dies.
    read: Vec<OwnedFd>,
    /// The event failed: the process carries on, the lock goes at once.
    failed: bool,
}

impl Source {
    /// Finds the process's connections and locks them (the process is frozen).
    pub fn setup(&mut self, ctx: &mut ContextRef<'_>) -> Result<(), String> {
        let pid = ctx.pid();
        self.pid = pid;
        let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(|e| format!("reading /proc/{pid}/fd: {e}"))?;
        let (mut sample, mut namespace) = (None, None);
        let own = ctx.own_fds();
        for e in dir.flatten() {
            let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            if own.contains(&fd) {
                continue;
            }
            if !std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:")) {
                continue;
            }
            let Ok(got) = ctx.fetch_fd(fd).into_result() else { continue };
            // SAFETY: fetch_fd hands us a fresh fd that we own.
            let sock = unsafe { OwnedFd::from_raw_fd(got) };
            if !is_connection(&sock) {
                continue;
            }
            let (Ok(l), Ok(p)) = (sock_name(&sock, false), sock_name(&sock, true)) else { continue };
            // One lock table, in one namespace: connections elsewhere would go unlocked.
            let ns = netns_of(&sock).and_then(|(fd, _)| std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|e| e.to_string()));
            let ns = ns.map(|m| std::os::unix::fs::MetadataExt::ino(&m)).map_err(|e| format!("process {pid}: fd {fd}: {e}"))?;
            if *namespace.get_or_insert(ns) != ns {
                return Err(format!(
                    "process {pid}: fd {fd} is a TCP connection in another network namespace than its others: not supported by the files plugin"
                ));
            }
            if !self.locked.contains(&(l.clone(), p.clone())) {
                self.locked.push((l, p));
            }
            sample.get_or_insert(sock);
        }
        if let Some(sample) = sample {
            self.lock = Some(Lock::install(pid, &sample, &self.locked)?);
        }
        Ok(())
    }

    /// Reads connection `sock` (`what` names its fd); `None` when it is no TCP connection.
    pub fn read(&mut self, sock: &OwnedFd, what: &str) -> Result<Option<Conn>, String> {
        if !is_connection(sock) {
            return Ok(None);
        }
        let pid = self.pid;
        let refuse = |why: String| format!("process {pid}: {what} is a TCP socket {why}: not supported by the files plugin");
        let mut info = [0u8; 104];
        get_raw(sock, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info, "TCP_INFO").map_err(refuse)?;
        if info[0] != 1 {
            return Err(refuse(format!("in state {}", state_name(info[0]))));
        }
        let mut ulp = [0u8; 16];
        let n = get_raw(sock, libc::IPPROTO_TCP, TCP_ULP, &mut ulp, "TCP_ULP").unwrap_or(0);
        if ulp[..n].iter().any(|&b| b != 0) {
            let name = String::from_utf8_lossy(&ulp[..n]).trim_end_matches('\0').to_string();
            return Err(refuse(format!("with upper-layer protocol {name}")));
        }
        let local = sock_name(sock, false).map_err(refuse)?;
        let peer = sock_name(sock, true).map_err(refuse)?;
        let Some(lock) = self.lock.as_ref() else {
            return Err(refuse("opened after the network lock was set".into()));
        };
        if !self.locked.contains(&(local.clone(), peer.clone())) {
            return Err(refuse("opened after the network lock was set".into()));
        }
        if ioctl_int(sock, SIOCATMARK, "SIOCATMARK").map_err(refuse)? != 0 {
            return Err(refuse("with urgent data".into()));
        }
        let family = get_int(sock, libc::SOL_SOCKET, libc::SO_DOMAIN, "SO_DOMAIN").map_err(refuse)?;
        let mut options = Vec::new();
        if family == libc::AF_INET6 {
            let v = get_int(sock, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, "IPV6_V6ONLY").map_err(refuse)?;
            options.push([libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, v]);
        }
        for (level, name) in OPTIONS {
            options.push([level, name, get_int(sock, level, name, "getsockopt").map_err(refuse)?]);
        }
        let bufs = [
            get_int(sock, libc::SOL_SOCKET, libc::SO_SNDBUF, "SO_SNDBUF").map_err(refuse)?,
            get_int(sock, libc::SOL_SOCKET, libc::SO_RCVBUF, "SO_RCVBUF").map_err(refuse)?,
        ];
        let reuse = options.iter().any(|o| o[1] == libc::SO_REUSEADDR && o[0] == libc::SOL_SOCKET && o[2] != 0);
        set_int(sock, libc::IPPROTO_TCP, TCP_REPAIR, REPAIR_ON, "TCP_REPAIR on (needs CAP_NET_ADMIN)").map_err(refuse)?;
        let read = in_repair(sock);
        // Off again whatever happened, without a window probe: the lock keeps it silent.
        let off = set_int(sock, libc::IPPROTO_TCP, TCP_REPAIR, REPAIR_OFF_NO_WP, "TCP_REPAIR off");
        if reuse {
            let _ = set_int(sock, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1, "SO_REUSEADDR");
        }
        let (snd_seq, rcv_seq, send, sent, recv, mss, timestamp, window) = read.map_err(refuse)?;
        off.map_err(refuse)?;
        let dup = sock.try_clone().map_err(|e| refuse(format!("dup: {e}")))?;
        self.read.push(dup);
        let opts = info[5];
        Ok(Some(Conn {
            family,
            local: to_hex(&local),
            peer: to_hex(&peer),
            snd_seq,
            rcv_seq,
            send: to_hex(&send),
            sent,
            recv: to_hex(&recv),
            mss,
            snd_mss: u32::from_ne_bytes(info[16..20].try_into().expect("4 bytes")),
            wscale: (opts & 4 != 0).then_some((info[6] & 0xf, info[6] >> 4)),
            sack: opts & 2 != 0,
            timestamp: (opts & 1 != 0).then_some(timestamp),
            window,
            options,
            bufs,
            lock: lock.name.clone(),
        }))
    }

    /// The event ended; `ok`: the image is complete.
    pub fn cleanup(&mut self, ok: bool) {
        if !ok {
            self.failed = true;
            self.finish();
        }
    }

    /// Decides the lock's fate by the process's: dead, the connections are closed
    /// silently and the lock kept for the restore; alive, the lock is lifted.
    fn finish(&mut self) {
        let Some(lock) = self.lock.take() else { return };
        let dead = !self.failed && killed(self.pid);
        if dead {
            for s in self.read.drain(..) {
                let _ = set_int(&s, libc::IPPROTO_TCP, TCP_REPAIR, REPAIR_ON, "TCP_REPAIR on");
            }
        }
        self.read.clear();
        lock.end(dead);
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Whether process `pid` is dead or dying (SIGKILL pending); waits for a dying one.
fn killed(pid: i32) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return true };
        let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).map(str::trim).unwrap_or("");
        if field("State:").starts_with('Z') || field("State:").starts_with('X') {
            return true;
        }
        let pending = |k: &str| u64::from_str_radix(field(k), 16).unwrap_or(0) & (1 << (libc::SIGKILL - 1)) != 0;
        if !(pending("SigPnd:") || pending("ShdPnd:")) {
            return false;
        }
        if std::time::Instant::now() > deadline {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

type Read = (u32, u32, Vec<u8>, u32, Vec<u8>, u32, u32, [u32; 5]);

/// What a connection in repair mode tells: sequences, queues, MSS, clock, window.
fn in_repair(sock: &OwnedFd) -> Result<Read, String> {
    let tcp = libc::IPPROTO_TCP;
    let mss = get_int(sock, tcp, libc::TCP_MAXSEG, "TCP_MAXSEG")? as u32;
    let timestamp = get_int(sock, tcp, TCP_TIMESTAMP, "TCP_TIMESTAMP")? as u32;
    let mut w = [0u8; 20];
    get_raw(sock, tcp, TCP_REPAIR_WINDOW, &mut w, "TCP_REPAIR_WINDOW")?;
    let window: [u32; 5] = std::array::from_fn(|i| u32::from_ne_bytes(w[i * 4..i * 4 + 4].try_into().expect("4 bytes")));
    let queue = |q: i32, len: usize| -> Result<(u32, Vec<u8>), String> {
        set_int(sock, tcp, TCP_REPAIR_QUEUE, q, "TCP_REPAIR_QUEUE")?;
        let end = get_int(sock, tcp, TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ")? as u32;
        let mut buf = vec![0u8; len];
        if len > 0 {
            // SAFETY: recv writes at most `len` bytes into `buf`.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), len, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
            if n < 0 {
                return Err(last_err("reading a queue (MSG_PEEK)"));
            }
            if n as usize != len {
                return Err(format!("a queue of {len} bytes gave {n}"));
            }
        }
        Ok((end.wrapping_sub(len as u32), buf))
    };
    let outq = ioctl_int(sock, SIOCOUTQ, "SIOCOUTQ")? as usize;
    let unsent = ioctl_int(sock, SIOCOUTQNSD, "SIOCOUTQNSD")? as usize;
    let inq = ioctl_int(sock, SIOCINQ, "SIOCINQ")? as usize;
    if outq + inq > MAX_QUEUE || unsent > outq {
        return Err(format!("with {outq} bytes to send and {inq} to read (at most {MAX_QUEUE} together)"));
    }
    let (snd_seq, send) = queue(SEND_QUEUE, outq)?;
    let (rcv_seq, recv) = queue(RECV_QUEUE, inq)?;
    set_int(sock, tcp, TCP_REPAIR_QUEUE, NO_QUEUE, "TCP_REPAIR_QUEUE")?;
    Ok((snd_seq, rcv_seq, send, (outq - unsent) as u32, recv, mss, timestamp, window))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_matches_both_directions_and_v4_mapped_addresses_as_v4() {
        let v4 = |a: [u8; 4], p: u16| {
            let mut s = vec![0u8; 16];
            s[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            s[2..4].copy_from_slice(&p.to_be_bytes());
            s[4..8].copy_from_slice(&a);
            s
        };
        let mut mapped = vec![0u8; 28];
        mapped[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        mapped[2..4].copy_from_slice(&80u16.to_be_bytes());
        mapped[18..24].copy_from_slice(&[0xff, 0xff, 10, 0, 0, 1]);
        let s = lock_script("ferry-1-ab", &[(v4([127, 0, 0, 1], 5000), v4([127, 0, 0, 2], 6000)), (mapped, v4([10, 0, 0, 2], 7))]).unwrap();
        assert!(s.contains("ip saddr 127.0.0.2 ip daddr 127.0.0.1 tcp sport 6000 tcp dport 5000 drop"), "{s}");
        assert!(s.contains("ip saddr 127.0.0.1 ip daddr 127.0.0.2 tcp sport 5000 tcp dport 6000 drop"), "{s}");
        assert!(s.contains("ip saddr 10.0.0.2 ip daddr 10.0.0.1 tcp sport 7 tcp dport 80 drop"), "{s}");
    }
}
