//! Established TCP connections: a python3 server (the process ferry moves) echoes a
//! counter that a python3 client of its own process (the peer, never touched by ferry)
//! sends over one connection and checks. The server checks the counter it receives,
//! the client the echoes: no gap, no repeat, no error, and each prints PASS or FAIL
//! into its log. Before the freeze the client stops reading, so the server blocks in
//! `sendall` with bytes in its send queue, and the client's lines pile up unread in
//! the server's receive queue: both queues are carried.

use std::{
    path::PathBuf,
    process::{Child, Command},
    time::Duration,
};

use ferry_tests::{
    ferry,
    net::{has_nft, in_netns, lock_tables, lock_tables_in, restored_pid, Hosts, KillPid, Keys, Killed, SERVICE},
    needs_root, stderr, stdout, wait_until,
    workload::pid_alive,
};

const DEADLINE: Duration = Duration::from_secs(60);

/// The server: listens (SO_REUSEADDR, as servers do), takes one connection and sets
/// its options, answers each `c N <pad>` line with `e N <pad>`, checking N counts up by
/// one; `bye` ends it, once it has checked the options and addresses are still its own.
const SERVER: &str = r#"
import socket, sys, os
D, HOST = sys.argv[1], sys.argv[2]
def log(m):
    with open(D + '/server.log', 'a') as f: f.write(m + '\n')
fam = socket.AF_INET6 if ':' in HOST else socket.AF_INET
l = socket.socket(fam)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((HOST, 0))
l.listen(4)
with open(D + '/port.tmp', 'w') as f: f.write(str(l.getsockname()[1]))
os.rename(D + '/port.tmp', D + '/port')
c, _ = l.accept()
OPTS = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1, 'TCP_NODELAY'), (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1, 'SO_KEEPALIVE'),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 77, 'TCP_KEEPIDLE'), (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 11, 'TCP_KEEPINTVL'),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 5, 'TCP_KEEPCNT'), (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 12345, 'TCP_USER_TIMEOUT')]
for level, opt, v, _ in OPTS:
    c.setsockopt(level, opt, v)
names = (c.getsockname(), c.getpeername())
mss = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
f = c.makefile('rb')
expect = 1
try:
    while True:
        line = f.readline()
        if not line:
            log('FAIL: the connection closed before line %d' % expect); break
        if line == b'bye\n':
            bad = [n for level, opt, v, n in OPTS if c.getsockopt(level, opt) != v]
            if (c.getsockname(), c.getpeername()) != names:
                bad.append('addresses')
            # The kernel may grow it over the connection's life (2048 to 3072 here after
            # a source's freeze): a copy must not start it again small (536).
            if c.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) < mss:
                bad.append('TCP_MAXSEG %d (was %d)' % (c.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG), mss))
            log(('FAIL: %s changed' % ', '.join(bad)) if bad else 'PASS %d' % (expect - 1)); break
        n = int(line.split()[1])
        if n != expect:
            log('FAIL: line %d where %d was due' % (n, expect)); break
        expect += 1
        c.sendall(b'e %d %s\n' % (n, b'x' * 300))
except Exception as e:
    log('FAIL: %r at line %d' % (e, expect))
"#;

/// The peer: sends `c N` every 2 ms from one thread, reads and checks the echoes in
/// another (not while `hold` exists); once `enough` exists it sends `bye`, reads the
/// echoes of all it sent and logs PASS.
const CLIENT: &str = r#"
import socket, sys, os, threading, time
D, HOST, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
def log(m):
    with open(D + '/client.log', 'a') as f: f.write(m + '\n')
fam = socket.AF_INET6 if ':' in HOST else socket.AF_INET
s = socket.socket(fam)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.connect((HOST, PORT))
state = {'sent': 0, 'last': None}
def writer():
    try:
        while True:
            if os.path.exists(D + '/enough'):
                state['last'] = state['sent']
                s.sendall(b'bye\n')
                return
            state['sent'] += 1
            s.sendall(b'c %d %s\n' % (state['sent'], b'y' * 100))
            time.sleep(0.002)
    except Exception as e:
        log('FAIL: writer: %r' % e)
threading.Thread(target=writer, daemon=True).start()
f = s.makefile('rb')
got = 0
try:
    while state['last'] is None or got < state['last']:
        while os.path.exists(D + '/hold'):
            time.sleep(0.005)
        line = f.readline()
        if not line and state['last'] == got:
            log('PASS %d' % got); break  # the server ended: it had echoed all and read `bye`
        if not line:
            log('FAIL: the connection closed after echo %d' % got); break
        n = int(line.split()[1])
        if n != got + 1:
            log('FAIL: echo %d after %d' % (n, got)); break
        got = n
        if got % 20 == 0:
            log('echo %d' % got)
    else:
        log('PASS %d' % got)
except Exception as e:
    log('FAIL: %r after echo %d' % (e, got))
"#;

struct Pair {
    dir: tempfile::TempDir,
    server: Child,
    client: Child,
    port: u16,
    /// The server's network namespace.
    netns: Option<String>,
}

impl Pair {
    fn start(host: &str) -> Pair {
        Pair::start_in(host, None, None)
    }

    /// The server in network namespace `server_ns`, the client in `client_ns` (when given).
    fn start_in(host: &str, server_ns: Option<&str>, client_ns: Option<&str>) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap().to_string();
        let server = python_in(server_ns).args(["-c", SERVER, &d, host]).spawn().unwrap();
        let port_file = dir.path().join("port");
        wait_until("the server's port", DEADLINE, || port_file.exists());
        let port: u16 = std::fs::read_to_string(&port_file).unwrap().parse().unwrap();
        let client = python_in(client_ns).args(["-c", CLIENT, &d, host, &port.to_string()]).spawn().unwrap();
        let p = Pair { dir, server, client, port, netns: server_ns.map(str::to_string) };
        wait_until("the first echoes", DEADLINE, || p.echoes() >= 40 || p.log("client").contains("FAIL"));
        assert!(!p.log("client").contains("FAIL"), "{}", p.log("client"));
        p
    }

    /// `ferry checkpoint` of the server into `img` with `extra` options, which must
    /// succeed: the server's pid and the image directory.
    fn checkpoint(&self, extra: &[&str]) -> (i32, PathBuf) {
        let pid = self.server.id() as i32;
        let dir = self.path("img");
        let pid_text = pid.to_string();
        let mut args = vec!["checkpoint", &pid_text, "--dir", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = ferry(&args);
        assert!(o.status.success(), "checkpoint: {}", stderr(&o));
        (pid, dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn log(&self, who: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{who}.log"))).unwrap_or_default()
    }

    /// The last echo the client logged.
    fn echoes(&self) -> u64 {
        self.log("client").lines().filter_map(|l| l.strip_prefix("echo ")).filter_map(|n| n.parse().ok()).max().unwrap_or(0)
    }

    /// Stops the client's reading and waits until the server's socket holds bytes in
    /// both queues.
    fn fill_queues(&self) {
        std::fs::write(self.path("hold"), "").unwrap();
        wait_until("bytes in both of the server's queues", DEADLINE, || {
            queues(self.netns.as_deref(), self.port).is_some_and(|(tx, rx)| tx > 0 && rx > 0)
        });
    }

    /// Lets the client read again and waits for echoes to go on.
    fn carry_on(&self) {
        let at = self.echoes();
        let _ = std::fs::remove_file(self.path("hold"));
        wait_until("echoes after the restore", DEADLINE, || self.echoes() >= at + 60 || self.log("client").contains("FAIL"));
        assert!(!self.log("client").contains("FAIL"), "client:\n{}\nserver:\n{}", self.log("client"), self.log("server"));
    }

    /// Lets the client read again, checks the echoes go on, then ends both sides and
    /// checks their verdicts.
    fn finish(mut self, server_pid: i32) {
        self.carry_on();
        std::fs::write(self.path("enough"), "").unwrap();
        wait_until("the client's verdict", DEADLINE, || self.log("client").contains("PASS") || self.log("client").contains("FAIL"));
        wait_until("the server's verdict", DEADLINE, || self.log("server").contains("PASS") || self.log("server").contains("FAIL"));
        let (c, s) = (self.log("client"), self.log("server"));
        assert!(!c.contains("FAIL") && !s.contains("FAIL"), "client:\n{c}\nserver:\n{s}");
        let _ = self.client.wait();
        wait_until("the server to end", DEADLINE, || !pid_alive(server_pid));
        let _ = self.server.wait();
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = self.client.kill();
        let _ = self.client.wait();
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

fn python_in(netns: Option<&str>) -> Command {
    in_netns(netns, "/usr/bin/python3")
}

/// (send queue, receive queue) of the connection whose local port is `port`, from
/// /proc/net/tcp and tcp6 (`tx_queue:rx_queue`).
fn queues(netns: Option<&str>, port: u16) -> Option<(u64, u64)> {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = stdout(&in_netns(netns, "cat").arg(table).output().unwrap());
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f.get(1).and_then(|a| a.rsplit(':').next()).and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && f.get(3) == Some(&"01") {
                let (tx, rx) = f.get(4)?.split_once(':')?;
                return Some((u64::from_str_radix(tx, 16).ok()?, u64::from_str_radix(rx, 16).ok()?));
            }
        }
    }
    None
}

fn round_trip(host: &str) {
    if !needs_root("TCP_REPAIR needs CAP_NET_ADMIN; ferry seizes the process") || !has_nft() {
        return;
    }
    let pair = Pair::start(host);
    pair.fill_queues();
    let (pid, dir) = pair.checkpoint(&[]);
    assert_eq!(lock_tables(pid).len(), 1, "the lock stays until the restore");
    let check = stdout(&ferry(&["check"]));
    assert!(check.contains(&format!("network lock ferry-{pid}-")) && check.contains("is gone"), "ferry check lists the lock: {check}");
    let o = ferry(&["restore", "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    let new = restored_pid(&o, pid);
    assert!(lock_tables(pid).is_empty(), "the restore lifts the lock: {:?}", lock_tables(pid));
    pair.finish(new);
}

#[test]
fn an_established_v4_connection_with_both_queues_full_survives_checkpoint_and_restore() {
    round_trip("127.0.0.1");
}

#[test]
fn an_established_v6_connection_with_both_queues_full_survives_checkpoint_and_restore() {
    round_trip("::1");
}

#[test]
fn ferry_killed_while_the_server_is_frozen_leaves_the_connection_running_and_no_rule() {
    if !needs_root("TCP_REPAIR needs CAP_NET_ADMIN; ferry seizes the process") || !has_nft() {
        return;
    }
    let pair = Pair::start("127.0.0.1");
    let pid = pair.server.id() as i32;
    pair.fill_queues();
    let dir = pair.path("img");
    // After the files plugin (the second) wrote its records: the connection was read
    // in repair mode and the lock is in force.
    let o = Command::new(ferry_tests::ferry_bin())
        .args(["checkpoint", &pid.to_string(), "--dir", dir.to_str().unwrap()])
        .env("FERRY_FAULT", "checkpoint-mid@2")
        .output()
        .unwrap();
    assert!(!o.status.success(), "ferry was to die: {}", stderr(&o));
    wait_until("the lock to be lifted", DEADLINE, || lock_tables(pid).is_empty());
    pair.finish(pid);
}

#[test]
fn a_half_closed_connection_is_refused_and_the_server_runs_on() {
    if !needs_root("TCP_REPAIR needs CAP_NET_ADMIN; ferry seizes the process") || !has_nft() {
        return;
    }
    // A connection of a server's whose peer (this test) has sent its FIN.
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let port_file = d.join("port2");
    let script = format!(
        "import socket,os,time\nl=socket.socket()\nl.bind(('127.0.0.1',0))\nl.listen()\nopen('{0}.tmp','w').write(str(l.getsockname()[1]))\nos.rename('{0}.tmp','{0}')\nc,_=l.accept()\nwhile True: time.sleep(1)\n",
        port_file.display()
    );
    let half = Command::new("/usr/bin/python3").args(["-c", &script]).spawn().unwrap();
    let half = Killed(half);
    wait_until("the second server's port", DEADLINE, || port_file.exists());
    let port: u16 = std::fs::read_to_string(&port_file).unwrap().parse().unwrap();
    let peer = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    peer.shutdown(std::net::Shutdown::Write).unwrap();
    let hpid = half.0.id() as i32;
    wait_until("CLOSE_WAIT", DEADLINE, || {
        std::fs::read_to_string("/proc/net/tcp").unwrap().lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1).is_some_and(|a| a.ends_with(&format!(":{port:04X}"))) && f.get(3) == Some(&"08")
        })
    });
    let dir = d.join("img");
    let o = ferry(&["checkpoint", &hpid.to_string(), "--dir", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains(&hpid.to_string()) && err.contains("CLOSE_WAIT"), "{err}");
    assert!(pid_alive(hpid) && lock_tables(hpid).is_empty(), "runs on, no rule left");
    drop(peer);
}

#[test]
fn a_checkpoint_that_leaves_the_server_running_lifts_the_lock_and_the_connection_carries_on() {
    if !needs_root("TCP_REPAIR needs CAP_NET_ADMIN; ferry seizes the process") || !has_nft() {
        return;
    }
    let pair = Pair::start("127.0.0.1");
    pair.fill_queues();
    let (pid, _) = pair.checkpoint(&["--leave-running"]);
    assert!(lock_tables(pid).is_empty(), "the lock is lifted once the server runs on: {:?}", lock_tables(pid));
    pair.finish(pid);
}

/// The negative case of the round trip: the same checkpoint, but the lock removed from
/// outside before any restore. The peer's next packet meets a port nobody holds and is
/// answered with a reset, which the client sees and reports: its check can fail.
#[test]
fn without_the_lock_the_peer_sees_a_reset() {
    if !needs_root("TCP_REPAIR needs CAP_NET_ADMIN; ferry seizes the process") || !has_nft() {
        return;
    }
    let pair = Pair::start("127.0.0.1");
    pair.fill_queues();
    let (pid, _) = pair.checkpoint(&[]);
    for t in lock_tables(pid) {
        let name = t.trim().rsplit(' ').next().unwrap().to_string();
        assert!(Command::new("nft").args(["delete", "table", "inet", &name]).status().unwrap().success());
    }
    let _ = std::fs::remove_file(pair.path("hold"));
    wait_until("the client to fail", DEADLINE, || pair.log("client").contains("FAIL"));
    assert!(pair.log("client").contains("Reset"), "{}", pair.log("client"));
}

#[test]
fn an_established_connection_migrates_with_each_strategy_between_two_hosts_with_its_address() {
    if !needs_root("network namespaces; TCP_REPAIR needs CAP_NET_ADMIN") || !has_nft() {
        return;
    }
    let hosts = Hosts::new();
    let [a, b, c] = [&hosts.names[0], &hosts.names[1], &hosts.names[2]];
    let keys = Keys::new();
    let key = &keys.key;
    let daemon = |ns: &str, addr: &str| keys.daemon(ns, addr, None);
    let _daemons = [daemon(a, "10.232.1.2"), daemon(b, "10.232.2.2")];
    let ip = |args: &[&str]| assert!(Command::new("ip").args(args).status().unwrap().success(), "ip {}", args.join(" "));
    // Timestamps off in a: the connection goes without them, and copies made in b work
    // out their segment size with room for them; each copy must come out with the
    // source's segment size (the server checks it at the end).
    assert!(Command::new("ip").args(["netns", "exec", a, "sysctl", "-qw", "net.ipv4.tcp_timestamps=0"]).status().unwrap().success());
    let mut pair = Pair::start_in(SERVICE, Some(a), Some(c));
    let mut pid = pair.server.id() as i32;
    let mut copies = Vec::new();
    let (mut from, mut to) = ((a, "10.232.1.2"), (b, "10.232.2.2"));
    for strategy in ["stop-copy", "pre-copy", "post-copy", "hybrid"] {
        pair.netns = Some(from.0.to_string());
        pair.fill_queues();
        // The destination takes the address too, so the copy can bind it.
        let _ = Command::new("ip").args(["-n", to.0, "addr", "add", &format!("{SERVICE}/32"), "dev", "lo"]).status();
        let o = in_netns(Some(from.0), ferry_tests::ferry_bin().to_str().unwrap())
            .args(["migrate", &pid.to_string(), "--to", &format!("{}:7712", to.1), "--json", "--strategy", strategy, "--auth-key", key.to_str().unwrap()])
            .output()
            .unwrap();
        let log = keys.log(to.0);
        assert!(o.status.success(), "{strategy}: {}\ndaemon: {log}", stderr(&o));
        let new = restored_pid(&o, pid);
        copies.push(KillPid(new));
        // The source keeps its lock, holding the peer's packets, while it owns the
        // address.
        assert_eq!(lock_tables_in(Some(from.0), pid).len(), 1, "{strategy}: the source keeps its lock");
        let here = lock_tables_in(Some(to.0), 0);
        assert!(here.is_empty(), "{strategy}: the destination lifted its earlier lock of this connection: {here:?}");
        // The floating address moves: off the source, the peer's route to the destination.
        ip(&["-n", from.0, "addr", "del", &format!("{SERVICE}/32"), "dev", "lo"]);
        ip(&["-n", c, "route", "replace", &format!("{SERVICE}/32"), "via", to.1]);
        // The source no longer owns the address: its lock goes by itself.
        wait_until("the source's lock to go with the address", DEADLINE, || lock_tables_in(Some(from.0), pid).is_empty());
        pair.carry_on();
        pid = new;
        (from, to) = (to, from);
    }
    for ns in [a, b] {
        assert!(lock_tables_in(Some(ns), 0).is_empty(), "no lock left in {ns}");
    }
    pair.finish(pid);
}

#[test]
fn a_destination_killed_before_the_commit_leaves_the_connection_running_at_the_source_and_no_rule() {
    if !needs_root("network namespaces; TCP_REPAIR needs CAP_NET_ADMIN") || !has_nft() {
        return;
    }
    let hosts = Hosts::new();
    let [a, b, c] = [&hosts.names[0], &hosts.names[1], &hosts.names[2]];
    let keys = Keys::new();
    // The destination dies holding the rebuilt copy, just before the commit: the copy
    // is killed with it, its connection still in repair mode.
    let _daemon = keys.daemon(b, "10.232.2.2", Some("before-commit"));
    let pair = Pair::start_in(SERVICE, Some(a), Some(c));
    let pid = pair.server.id() as i32;
    pair.fill_queues();
    let o = in_netns(Some(a), ferry_tests::ferry_bin().to_str().unwrap())
        .args(["migrate", &pid.to_string(), "--to", "10.232.2.2:7712", "--json", "--auth-key", keys.key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success(), "the destination was to die: {}", keys.log(b));
    assert!(pid_alive(pid));
    for ns in [a, b] {
        let left = lock_tables_in(Some(ns), 0);
        assert!(left.is_empty(), "no lock left in {ns}: {left:?}");
    }
    pair.finish(pid);
}

#[test]
fn a_postcopy_lost_past_its_commit_point_lifts_the_lock_and_the_peer_learns_the_connection_is_gone() {
    if !needs_root("network namespaces; TCP_REPAIR needs CAP_NET_ADMIN") || !has_nft() {
        return;
    }
    let hosts = Hosts::new();
    let [a, b, c] = [&hosts.names[0], &hosts.names[1], &hosts.names[2]];
    let keys = Keys::new();
    // The destination dies once the source gave itself up (`run` read, the copy not run
    // yet): the process is lost. Its connection goes with it: the lock is lifted, not
    // kept for a restore that will never come (before, the peer retransmitted into
    // silence for good).
    let _daemon = keys.daemon(b, "10.232.2.2", Some("run-received"));
    let pair = Pair::start_in(SERVICE, Some(a), Some(c));
    let pid = pair.server.id() as i32;
    pair.fill_queues();
    let o = in_netns(Some(a), ferry_tests::ferry_bin().to_str().unwrap())
        .args(["migrate", &pid.to_string(), "--to", "10.232.2.2:7712", "--strategy", "post-copy", "--auth-key", keys.key.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}
daemon: {}", stderr(&o), keys.log(b));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("process {pid} was lost: ")), "{}", stderr(&o));
    assert!(!pid_alive(pid), "the source runs on");
    for ns in [a, b] {
        let left = lock_tables_in(Some(ns), 0);
        assert!(left.is_empty(), "no lock left in {ns}: {left:?}");
    }
    // The client reads again and finds its connection gone (reset), at once.
    let _ = std::fs::remove_file(pair.path("hold"));
    wait_until("the client to see the connection gone", DEADLINE, || pair.log("client").contains("FAIL"));
}

#[test]
fn tcp_close_restores_the_connection_closed_the_server_sees_it_aborted_and_the_peer_a_reset() {
    if !needs_root("TCP_REPAIR needs CAP_NET_ADMIN; ferry seizes the process") || !has_nft() {
        return;
    }
    let pair = Pair::start("127.0.0.1");
    pair.fill_queues();
    let (pid, dir) = pair.checkpoint(&[]);
    let o = ferry(&["restore", "--dir", dir.to_str().unwrap(), "--json", "--tcp-close"]);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    let new = restored_pid(&o, pid);
    let _copy = KillPid(new);
    assert!(lock_tables(pid).is_empty(), "the restore lifts the lock: {:?}", lock_tables(pid));
    let _ = std::fs::remove_file(pair.path("hold"));
    wait_until("the server to see its connection aborted", DEADLINE, || pair.log("server").contains("FAIL"));
    assert!(pair.log("server").contains("ConnectionAborted"), "{}", pair.log("server"));
    wait_until("the client to see a reset", DEADLINE, || pair.log("client").contains("FAIL"));
    assert!(pair.log("client").contains("Reset"), "{}", pair.log("client"));
}

/// The fd of process `pid` that is its established connection on local `port`.
fn connection_fd(pid: i32, port: u16) -> u64 {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let inode = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(1).is_some_and(|a| a.ends_with(&format!(":{port:04X}"))) && f.get(3) == Some(&"01"))
        .map(|f| f[9].to_string())
        .expect("the connection in /proc/net/tcp");
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == want))
        .and_then(|e| e.file_name().to_string_lossy().parse().ok())
        .expect("the connection's fd")
}

/// The negative case of the byte stream: the restored copy's connection gets a line
/// from outside (a call injected into it) that the server never echoed in order, and
/// the client's check fails naming it: a byte lost or repeated by a restore would show
/// likewise.
#[test]
fn a_copy_whose_stream_is_broken_fails_the_clients_check() {
    if !needs_root("TCP_REPAIR needs CAP_NET_ADMIN; ferry seizes the process") || !has_nft() {
        return;
    }
    let pair = Pair::start("127.0.0.1");
    pair.fill_queues();
    let (pid, dir) = pair.checkpoint(&[]);
    let o = ferry(&["restore", "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    let new = restored_pid(&o, pid);
    let _copy = KillPid(new);
    let fd = connection_fd(new, pair.port);
    let mut inj = ferry_tests::inject::Injected::seize(new);
    let line = b"\ne 0 out of order\n";
    let buf = inj.put(line);
    assert!(inj.call(new, libc::SYS_sendto, [fd, buf, line.len() as u64, libc::MSG_DONTWAIT as u64, 0, 0]) > 0);
    inj.release();
    let _ = std::fs::remove_file(pair.path("hold"));
    wait_until("the client's verdict", DEADLINE, || pair.log("client").contains("FAIL"));
    assert!(pair.log("client").contains("FAIL: "), "{}", pair.log("client"));
}

/// The negative case of the options: the restored copy's keepalive idle time changed
/// from outside, and the server's check names it.
#[test]
fn a_copy_with_an_option_changed_fails_the_servers_check() {
    if !needs_root("TCP_REPAIR needs CAP_NET_ADMIN; ferry seizes the process") || !has_nft() {
        return;
    }
    let pair = Pair::start("127.0.0.1");
    let (pid, dir) = pair.checkpoint(&[]);
    let o = ferry(&["restore", "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    let new = restored_pid(&o, pid);
    let _copy = KillPid(new);
    let fd = connection_fd(new, pair.port);
    let mut inj = ferry_tests::inject::Injected::seize(new);
    let v = inj.put(&78i32.to_ne_bytes());
    inj.call(new, libc::SYS_setsockopt, [fd, libc::IPPROTO_TCP as u64, libc::TCP_KEEPIDLE as u64, v, 4, 0]);
    inj.release();
    std::fs::write(pair.path("enough"), "").unwrap();
    wait_until("the server's verdict", DEADLINE, || pair.log("server").contains("PASS") || pair.log("server").contains("FAIL"));
    assert!(pair.log("server").contains("FAIL: TCP_KEEPIDLE changed"), "{}", pair.log("server"));
}

/// A migration to a daemon in the source's own network namespace: the copy's sockets
/// would need the ports and 4-tuple the frozen source still holds. Refused with one
/// line; the source carries on with its connection and no lock is left.
#[test]
fn a_migration_within_one_namespace_is_refused_and_the_connection_carries_on() {
    if !needs_root("network namespaces; TCP_REPAIR needs CAP_NET_ADMIN") || !has_nft() {
        return;
    }
    let hosts = Hosts::new();
    let [a, c] = [&hosts.names[0], &hosts.names[2]];
    let keys = Keys::new();
    let _daemon = keys.daemon(a, "10.232.1.2", None);
    let pair = Pair::start_in(SERVICE, Some(a), Some(c));
    let pid = pair.server.id() as i32;
    pair.fill_queues();
    let o = in_netns(Some(a), ferry_tests::ferry_bin().to_str().unwrap())
        .args(["migrate", &pid.to_string(), "--to", "10.232.1.2:7712", "--auth-key", keys.key.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    // The listener, first, finds its port taken (the connection's `connect` would find
    // its 4-tuple taken).
    assert!(err.contains("could not rebuild") && err.contains("TCP"), "{err}");
    assert!(pid_alive(pid) && lock_tables_in(Some(a), 0).is_empty(), "runs on, no lock left");
    pair.finish(pid);
}

/// `ferry migrate --tcp-close`: the option travels to the destination, whose copy has
/// its connection closed (the server sees it aborted, the peer a reset once the
/// address has moved), and no lock is left on either host.
#[test]
fn migrate_tcp_close_restores_the_connection_closed_at_the_destination() {
    if !needs_root("network namespaces; TCP_REPAIR needs CAP_NET_ADMIN") || !has_nft() {
        return;
    }
    let hosts = Hosts::new();
    let [a, b, c] = [&hosts.names[0], &hosts.names[1], &hosts.names[2]];
    let keys = Keys::new();
    let _daemon = keys.daemon(b, "10.232.2.2", None);
    let pair = Pair::start_in(SERVICE, Some(a), Some(c));
    let pid = pair.server.id() as i32;
    pair.fill_queues();
    let o = in_netns(Some(a), ferry_tests::ferry_bin().to_str().unwrap())
        .args(["migrate", &pid.to_string(), "--to", "10.232.2.2:7712", "--json", "--tcp-close", "--auth-key", keys.key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}\ndaemon: {}", stderr(&o), keys.log(b));
    let _copy = KillPid(restored_pid(&o, pid));
    let ip = |args: &[&str]| assert!(Command::new("ip").args(args).status().unwrap().success(), "ip {}", args.join(" "));
    ip(&["-n", a, "addr", "del", &format!("{SERVICE}/32"), "dev", "lo"]);
    ip(&["-n", c, "route", "replace", &format!("{SERVICE}/32"), "via", "10.232.2.2"]);
    let _ = std::fs::remove_file(pair.path("hold"));
    wait_until("the server to see its connection aborted", DEADLINE, || pair.log("server").contains("FAIL"));
    assert!(pair.log("server").contains("ConnectionAborted"), "{}", pair.log("server"));
    wait_until("the client to see a reset", DEADLINE, || pair.log("client").contains("FAIL"));
    assert!(pair.log("client").contains("Reset"), "{}", pair.log("client"));
    for ns in [a, b] {
        wait_until("no lock left", DEADLINE, || lock_tables_in(Some(ns), 0).is_empty());
    }
}

/// A listener with connections waiting in its accept queue: the kernel offers no way
/// to put a connection back into a listener's queue (a restore can make it only as an
/// established socket of its own, which the process never accepted), nor to take it
/// out without the process losing it should the checkpoint fail; CRIU refuses these
/// too (or drops them with `--skip-in-flight`). Refused with one line; the server
/// still accepts them all afterwards and they work.
#[test]
fn a_listener_with_connections_waiting_to_be_accepted_is_refused_and_the_server_runs_on() {
    if !needs_root("ferry seizes the process") || !has_nft() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap().to_string();
    // Accepts nothing until `go` exists; then accepts three connections, echoes a line
    // on each and logs PASS.
    let script = r#"
import socket, os, sys, time
D = sys.argv[1]
l = socket.socket()
l.bind(('127.0.0.1', 0))
l.listen(8)
open(D + '/port.tmp', 'w').write(str(l.getsockname()[1])); os.rename(D + '/port.tmp', D + '/port')
while not os.path.exists(D + '/go'):
    time.sleep(0.01)
try:
    for _ in range(3):
        c, _ = l.accept()
        c.sendall(c.makefile('rb').readline())
    open(D + '/server.log', 'w').write('PASS\n')
except Exception as e:
    open(D + '/server.log', 'w').write('FAIL: %r\n' % e)
"#;
    let server = Killed(Command::new("/usr/bin/python3").args(["-c", script, &d]).spawn().unwrap());
    let pid = server.0.id() as i32;
    let port_file = tmp.path().join("port");
    wait_until("the server's port", DEADLINE, || port_file.exists());
    let port: u16 = std::fs::read_to_string(&port_file).unwrap().parse().unwrap();
    let mut peers: Vec<std::net::TcpStream> = (0..3).map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    // `ss -l`'s Recv-Q of a listener is its accept queue.
    wait_until("three connections waiting", DEADLINE, || {
        let o = Command::new("ss").args(["-Hltn", &format!("sport = :{port}")]).output().unwrap();
        stdout(&o).split_whitespace().nth(1) == Some("3")
    });
    let dir = tmp.path().join("img");
    let o = ferry(&["checkpoint", &pid.to_string(), "--dir", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains(&pid.to_string()) && err.contains("3 connections waiting to be accepted"), "{err}");
    assert!(pid_alive(pid) && lock_tables(pid).is_empty(), "runs on, no rule left");
    std::fs::write(tmp.path().join("go"), "").unwrap();
    for (i, p) in peers.iter_mut().enumerate() {
        use std::io::{BufRead, Write};
        let line = format!("hello {i}\n");
        p.write_all(line.as_bytes()).unwrap();
        let mut back = String::new();
        std::io::BufReader::new(&*p).read_line(&mut back).unwrap();
        assert_eq!(back, line);
    }
    let log = tmp.path().join("server.log");
    // Written whole: the file exists (opened) before its line is in it.
    wait_until("the server's verdict", DEADLINE, || std::fs::read_to_string(&log).is_ok_and(|l| l.ends_with('\n')));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "PASS\n");
}
