//! Real servers nobody here wrote, with live clients: `redis-server` holding 100k keys
//! while a client runs `INCR` over one connection, checkpointed and restored and
//! migrated with each strategy between two network namespaces (its address moving
//! with it). The client (python3, the peer, never touched by ferry) checks every
//! reply: no error, no gap, no repeat; at the end the counter redis holds is the last
//! reply it saw, and redis answers `DBSIZE` with every key.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use ferry_tests::{
    ferry,
    net::{has_nft, in_netns, lock_tables_in, restored_pid, Hosts, KillPid, Keys, Killed, SERVICE},
    needs, needs_root, stderr, stdout, wait_until,
    workload::pid_alive,
};

const DEADLINE: Duration = Duration::from_secs(60);
const KEYS: u64 = 100_000;

/// The client: one connection, `INCR counter` every 2 ms, each reply checked against
/// the one before; `at N` logged every 50. Once `enough` exists it asks `GET counter`
/// on the same connection, which must be its last reply, and logs PASS with the
/// longest wait it saw for a reply.
const INCR_CLIENT: &str = r#"
import socket, sys, os, time
D, HOST, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
def log(m):
    with open(D + '/client.log', 'a') as f: f.write(m + '\n')
s = socket.create_connection((HOST, PORT))
f = s.makefile('rb')
def call(*args):
    s.sendall(b'*%d\r\n' % len(args) + b''.join(b'$%d\r\n%s\r\n' % (len(a), a) for a in args))
    return f.readline()
last, stall = None, 0.0
try:
    while not os.path.exists(D + '/enough'):
        t = time.monotonic()
        r = call(b'INCR', b'counter')
        stall = max(stall, time.monotonic() - t)
        if not r.startswith(b':'):
            log('FAIL: INCR answered %r after %r' % (r, last)); sys.exit()
        n = int(r[1:])
        if last is not None and n != last + 1:
            log('FAIL: INCR answered %d after %d' % (n, last)); sys.exit()
        last = n
        if n % 50 == 0:
            log('at %d' % n)
        time.sleep(0.002)
    r = call(b'GET', b'counter')
    v = int(f.readline()) if r.startswith(b'$') else None
    log(('PASS %d, longest stall %d ms' % (last, stall * 1000)) if v == last else 'FAIL: the counter is %r, the last reply %d' % (v, last))
except Exception as e:
    log('FAIL: %r after %r' % (e, last))
"#;

/// Sets `key:0` .. `key:<n-1>` in one pipeline on a connection of its own.
const LOAD: &str = r#"
import socket, sys
HOST, PORT, N = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((HOST, PORT))
s.sendall(b''.join(b'*3\r\n$3\r\nSET\r\n$%d\r\nkey:%d\r\n$5\r\nvalue\r\n' % (len(b'key:%d' % i), i) for i in range(N)))
got = b''
while got.count(b'\r\n') < N:
    d = s.recv(1 << 20)
    if not d:
        sys.exit('redis closed the connection')
    got += d
assert got == b'+OK\r\n' * N, got[:100]
"#;

fn has_redis() -> bool {
    needs(Path::new("/usr/bin/redis-server").is_file() && Path::new("/usr/bin/redis-cli").is_file(), "redis-server and redis-cli (scripts/setup installs them)")
}

/// A redis-server (in `server_ns` when given) bound to `host` with 100k keys, and
/// the INCR client (in `client_ns`) running on one connection to it.
struct Redis {
    dir: tempfile::TempDir,
    server: Killed,
    client: Killed,
    host: String,
    port: u16,
    client_ns: Option<String>,
}

impl Redis {
    fn start(host: &str, port: u16, server_ns: Option<&str>, client_ns: Option<&str>) -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("redis.log");
        let server = in_netns(server_ns, "/usr/bin/redis-server")
            .args(["--bind", host, "--port", &port.to_string(), "--save", "", "--appendonly", "no", "--daemonize", "no"])
            // The client is on another host (namespace), with no password: a test server.
            .args(["--protected-mode", "no"])
            .args(["--logfile", log.to_str().unwrap()])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Killed(server);
        wait_until("redis to answer", DEADLINE, || redis_cli(client_ns, host, port, &["ping"]).trim() == "PONG");
        let o = in_netns(client_ns, "/usr/bin/python3").args(["-c", LOAD, host, &port.to_string(), &KEYS.to_string()]).output().unwrap();
        assert!(o.status.success(), "loading the keys: {}", stderr(&o));
        let d = dir.path().to_str().unwrap().to_string();
        let client = Killed(in_netns(client_ns, "/usr/bin/python3").args(["-c", INCR_CLIENT, &d, host, &port.to_string()]).spawn().unwrap());
        let r = Redis { dir, server, client, host: host.to_string(), port, client_ns: client_ns.map(str::to_string) };
        r.goes_on();
        r
    }

    fn pid(&self) -> i32 {
        self.server.0.id() as i32
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("client.log")).unwrap_or_default()
    }

    /// The last `at N` the client logged.
    fn at(&self) -> u64 {
        self.log().lines().filter_map(|l| l.strip_prefix("at ")).filter_map(|n| n.parse().ok()).max().unwrap_or(0)
    }

    /// Waits for 200 more replies, checked.
    fn goes_on(&self) {
        let from = self.at();
        wait_until("INCR replies", DEADLINE, || self.at() >= from + 200 || self.log().contains("FAIL"));
        assert!(!self.log().contains("FAIL"), "client:\n{}", self.log());
    }

    fn dbsize(&self) -> String {
        redis_cli(self.client_ns.as_deref(), &self.host, self.port, &["dbsize"]).trim().to_string()
    }

    /// Ends the client, checks its verdict and that redis has every key.
    fn finish(mut self) -> String {
        self.goes_on();
        std::fs::write(self.dir.path().join("enough"), "").unwrap();
        wait_until("the client's verdict", DEADLINE, || self.log().contains("PASS") || self.log().contains("FAIL"));
        let _ = self.client.0.wait();
        let log = self.log();
        assert!(log.contains("PASS") && !log.contains("FAIL"), "client:\n{log}");
        assert_eq!(self.dbsize(), (KEYS + 1).to_string(), "every key and the counter");
        log.lines().find(|l| l.starts_with("PASS")).unwrap().to_string()
    }

    fn checkpoint(&self) -> PathBuf {
        let dir = self.dir.path().join("img");
        let o = ferry(&["checkpoint", &self.pid().to_string(), "--dir", dir.to_str().unwrap()]);
        assert!(o.status.success(), "checkpoint: {}", stderr(&o));
        dir
    }
}

fn redis_cli(netns: Option<&str>, host: &str, port: u16, args: &[&str]) -> String {
    stdout(&in_netns(netns, "/usr/bin/redis-cli").args(["-h", host, "-p", &port.to_string()]).args(args).output().unwrap())
}

/// The segment size (`ss -i`'s `mss:`) of the established connection on local `port`.
fn server_mss(port: u16) -> String {
    let o = Command::new("ss").args(["-Htin", "state", "established", &format!("sport = :{port}")]).output().unwrap();
    let text = stdout(&o);
    text.split_whitespace().find_map(|w| w.strip_prefix("mss:")).unwrap_or_else(|| panic!("no mss in {text}")).to_string()
}

fn restore(img: &Path, old: i32) -> KillPid {
    let o = ferry(&["restore", "--dir", img.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    KillPid(restored_pid(&o, old))
}

#[test]
fn redis_with_a_live_client_survives_checkpoint_and_restore() {
    if !needs_root("TCP_REPAIR needs CAP_NET_ADMIN; ferry seizes the process") || !has_nft() || !has_redis() {
        return;
    }
    let redis = Redis::start("127.0.0.1", ferry_tests::daemon::free_port(), None, None);
    let mss = server_mss(redis.port);
    let img = redis.checkpoint();
    assert!(!pid_alive(redis.pid()));
    let _copy = restore(&img, redis.pid());
    assert_eq!(server_mss(redis.port), mss, "the copy's segment size is the source's (loopback's, over what TCP_MAXSEG takes)");
    redis.finish();
}

/// The negative case: the restored copy's counter moved by another client, and the
/// live client's check names the gap.
#[test]
fn a_redis_copy_whose_counter_moved_fails_the_clients_check() {
    if !needs_root("TCP_REPAIR needs CAP_NET_ADMIN; ferry seizes the process") || !has_nft() || !has_redis() {
        return;
    }
    let redis = Redis::start("127.0.0.1", ferry_tests::daemon::free_port(), None, None);
    let img = redis.checkpoint();
    let _copy = restore(&img, redis.pid());
    redis_cli(None, &redis.host, redis.port, &["incr", "counter"]);
    wait_until("the client's verdict", DEADLINE, || redis.log().contains("FAIL"));
    assert!(redis.log().contains("FAIL: INCR answered"), "{}", redis.log());
}

#[test]
fn redis_with_a_live_client_migrates_with_each_strategy_between_two_hosts() {
    if !needs_root("network namespaces; TCP_REPAIR needs CAP_NET_ADMIN") || !has_nft() || !has_redis() {
        return;
    }
    let hosts = Hosts::new();
    let [a, b, c] = [&hosts.names[0], &hosts.names[1], &hosts.names[2]];
    let keys = Keys::new();
    let _daemons = [keys.daemon(a, "10.232.1.2", None), keys.daemon(b, "10.232.2.2", None)];
    let ip = |args: &[&str]| assert!(Command::new("ip").args(args).status().unwrap().success(), "ip {}", args.join(" "));
    let redis = Redis::start(SERVICE, 6379, Some(a), Some(c));
    let mut pid = redis.pid();
    let mut copies = Vec::new();
    let (mut from, mut to) = ((a, "10.232.1.2"), (b, "10.232.2.2"));
    for strategy in ["stop-copy", "pre-copy", "post-copy", "hybrid"] {
        // The destination takes the address too (if it lacks it), so the copy can bind it.
        let _ = Command::new("ip").args(["-n", to.0, "addr", "add", &format!("{SERVICE}/32"), "dev", "lo"]).stderr(Stdio::null()).status();
        let o = in_netns(Some(from.0), ferry_tests::ferry_bin().to_str().unwrap())
            .args(["migrate", &pid.to_string(), "--to", &format!("{}:7712", to.1), "--json", "--strategy", strategy])
            .args(["--auth-key", keys.key.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{strategy}: {}\ndaemon: {}", stderr(&o), keys.log(to.0));
        let new = restored_pid(&o, pid);
        copies.push(KillPid(new));
        ip(&["-n", from.0, "addr", "del", &format!("{SERVICE}/32"), "dev", "lo"]);
        ip(&["-n", c, "route", "replace", &format!("{SERVICE}/32"), "via", to.1]);
        wait_until("the source's lock to go with the address", DEADLINE, || lock_tables_in(Some(from.0), pid).is_empty());
        redis.goes_on();
        pid = new;
        (from, to) = (to, from);
    }
    let verdict = redis.finish();
    eprintln!("redis across four migrations: {verdict}");
}

/// The HTTP client: one keep-alive connection to `python3 -m http.server`; a small
/// file, then the large one, read slowly past its first MiB while `hold` exists; then
/// the small one again on the same connection. PASS when the large file's sha256 is
/// the one on disk and the connection was never made again.
const HTTP_CLIENT: &str = r#"
import http.client, hashlib, os, sys, time
D, HOST, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
def log(m):
    with open(D + '/client.log', 'a') as f: f.write(m + '\n')
try:
    c = http.client.HTTPConnection(HOST, PORT)
    c.request('GET', '/small')
    small = c.getresponse().read()
    sock = c.sock
    c.request('GET', '/big')
    r = c.getresponse()
    h, n = hashlib.sha256(), 0
    while True:
        if n >= 1 << 20:
            while os.path.exists(D + '/hold'):
                time.sleep(0.005)
        b = r.read(1 << 16)
        if not b:
            break
        h.update(b)
        n += len(b)
        if n % (1 << 20) == 0:
            log('got %d MiB' % (n >> 20))
    c.request('GET', '/small')
    again = c.getresponse().read()
    want = hashlib.sha256(open(D + '/www/big', 'rb').read()).hexdigest()
    if h.hexdigest() != want:
        log('FAIL: %d bytes whose sha256 differs from the file' % n)
    elif c.sock is not sock or again != small:
        log('FAIL: the keep-alive connection was not kept')
    else:
        log('PASS %d bytes' % n)
except Exception as e:
    log('FAIL: %r' % e)
"#;

/// `python3 -m http.server` (HTTP/1.1: keep-alive) serving a 32 MiB file, and the
/// client stopped after its first MiB with the server blocked writing the rest.
struct Http {
    dir: tempfile::TempDir,
    server: Killed,
    _client: Killed,
    port: u16,
}

impl Http {
    fn start() -> Http {
        let dir = tempfile::tempdir().unwrap();
        let www = dir.path().join("www");
        std::fs::create_dir(&www).unwrap();
        std::fs::write(www.join("small"), "a small file\n").unwrap();
        let mut x = 0x2545f4914f6cdd1du64;
        let big: Vec<u8> = (0..32 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(www.join("big"), big).unwrap();
        let port = ferry_tests::daemon::free_port();
        let server = Command::new("/usr/bin/python3")
            .args(["-m", "http.server", "-p", "HTTP/1.1", "-b", "127.0.0.1", "-d", www.to_str().unwrap(), &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Killed(server);
        wait_until("the HTTP server to listen", DEADLINE, || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        std::fs::write(dir.path().join("hold"), "").unwrap();
        let d = dir.path().to_str().unwrap().to_string();
        let client = Killed(Command::new("/usr/bin/python3").args(["-c", HTTP_CLIENT, &d, "127.0.0.1", &port.to_string()]).spawn().unwrap());
        let h = Http { dir, server, _client: client, port };
        wait_until("the first MiB and a full send queue", DEADLINE, || {
            h.log().contains("FAIL") || (h.log().contains("got 1 MiB") && send_queue(h.port) > 0)
        });
        assert!(!h.log().contains("FAIL"), "{}", h.log());
        h
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("client.log")).unwrap_or_default()
    }

    /// Lets the client read on and waits for its verdict.
    fn verdict(&self) -> String {
        std::fs::remove_file(self.dir.path().join("hold")).unwrap();
        wait_until("the client's verdict", DEADLINE, || self.log().contains("PASS") || self.log().contains("FAIL"));
        self.log()
    }
}

/// The send queue of the established connection whose local port is `port`.
fn send_queue(port: u16) -> u64 {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    text.lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(1).is_some_and(|a| a.ends_with(&format!(":{port:04X}"))) && f.get(3) == Some(&"01"))
        .and_then(|f| u64::from_str_radix(f[4].split(':').next()?, 16).ok())
        .unwrap_or(0)
}

#[test]
fn an_http_keep_alive_transfer_survives_checkpoint_and_restore_in_its_middle() {
    if !needs_root("TCP_REPAIR needs CAP_NET_ADMIN; ferry seizes the process") || !has_nft() {
        return;
    }
    let http = Http::start();
    let pid = http.server.0.id() as i32;
    let img = http.dir.path().join("img");
    let o = ferry(&["checkpoint", &pid.to_string(), "--dir", img.to_str().unwrap()]);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    let _copy = restore(&img, pid);
    let log = http.verdict();
    assert!(log.contains("PASS") && !log.contains("FAIL"), "{log}");
}

/// The negative case: the same transfer restored with `--tcp-close`, and the client's
/// check fails.
#[test]
fn an_http_transfer_restored_closed_fails_the_clients_check() {
    if !needs_root("TCP_REPAIR needs CAP_NET_ADMIN; ferry seizes the process") || !has_nft() {
        return;
    }
    let http = Http::start();
    let pid = http.server.0.id() as i32;
    let img = http.dir.path().join("img");
    let o = ferry(&["checkpoint", &pid.to_string(), "--dir", img.to_str().unwrap()]);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    let o = ferry(&["restore", "--dir", img.to_str().unwrap(), "--json", "--tcp-close"]);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    let _copy = KillPid(restored_pid(&o, pid));
    let log = http.verdict();
    assert!(log.contains("FAIL"), "{log}");
}
