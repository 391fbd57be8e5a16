//! A redis-server holding SIZE MiB of keys (1 KiB values, `DEBUG POPULATE`) with 100
//! connected clients, each running `INCR` on its own key in a loop over one
//! connection, migrated with each strategy between two network namespaces (its
//! address moving with it, as tests/tests/servers.rs does). Prints, per strategy, the
//! time the process was frozen (ferry's `frozen_ms`), the migration's total, and the
//! longest wait any client saw for a reply across the migration (until the address
//! has moved and every client has had replies again). Every client checks its replies
//! (no error, no gap, no repeat); the bench fails if one does not hold.
//!
//!     cargo bench -p ferry-tests --bench redis [-- SIZE_MIB]      (default 1024)

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use ferry_tests::{
    bench,
    net::{in_netns, lock_tables_in, restored_pid, Hosts, KillPid, Keys, Killed, SERVICE},
    stderr, stdout, wait_until,
};

const DEADLINE: Duration = Duration::from_secs(600);

/// 100 connections driven from one thread: each sends `INCR c<i>` when its last reply
/// came, checks the reply is one more than its last, and the longest time a request
/// waited is kept. `mark` (a file): write the longest wait since the last mark into
/// `stall` and `replies`, and start again. Any failure goes to `client.log` as FAIL.
const CLIENTS: &str = r#"
import socket, selectors, sys, os, time
D, HOST, PORT, N = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def log(m):
    with open(D + '/client.log', 'a') as f: f.write(m + '\n')
sel = selectors.DefaultSelector()
conns = []
for i in range(N):
    s = socket.create_connection((HOST, PORT))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = b'c%d' % i
    st = {'s': s, 'req': b'*2\r\n$4\r\nINCR\r\n$%d\r\n%s\r\n' % (len(key), key), 'buf': b'', 'last': None, 'sent': 0.0}
    conns.append(st)
    sel.register(s, selectors.EVENT_READ, st)
def send(st):
    st['sent'] = time.monotonic()
    st['s'].sendall(st['req'])
for st in conns:
    send(st)
stall, replies, next_check = 0.0, 0, 0
try:
    while True:
        for k, _ in sel.select(0.05):
            st = k.data
            d = st['s'].recv(4096)
            if not d:
                log('FAIL: redis closed a connection'); sys.exit()
            st['buf'] += d
            while b'\r\n' in st['buf']:
                line, st['buf'] = st['buf'].split(b'\r\n', 1)
                if not line.startswith(b':'):
                    log('FAIL: INCR answered %r' % line); sys.exit()
                n = int(line[1:])
                if st['last'] is not None and n != st['last'] + 1:
                    log('FAIL: INCR answered %d after %d' % (n, st['last'])); sys.exit()
                st['last'] = n
                stall = max(stall, time.monotonic() - st['sent'])
                replies += 1
                send(st)
        now = time.monotonic()
        # A request still waiting counts too.
        stall = max([stall] + [now - st['sent'] for st in conns])
        if now >= next_check:
            next_check = now + 0.05
            if os.path.exists(D + '/mark'):
                open(D + '/stall.tmp', 'w').write('%f %d' % (stall * 1000, replies))
                os.rename(D + '/stall.tmp', D + '/stall')
                os.remove(D + '/mark')
                stall, replies = 0.0, 0
except Exception as e:
    log('FAIL: %r' % e)
"#;

/// The clients' longest wait (ms) and replies since the last mark.
fn mark(dir: &Path) -> (f64, u64) {
    let stall = dir.join("stall");
    let _ = std::fs::remove_file(&stall);
    std::fs::write(dir.join("mark"), "").unwrap();
    wait_until("the clients' mark", DEADLINE, || stall.exists() || failed(dir).is_some());
    if let Some(f) = failed(dir) {
        panic!("{f}");
    }
    let text = std::fs::read_to_string(&stall).unwrap();
    let (ms, n) = text.split_once(' ').unwrap();
    (ms.parse().unwrap(), n.parse().unwrap())
}

fn failed(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("client.log")).ok().filter(|l| l.contains("FAIL"))
}

fn redis_cli(ns: &str, args: &[&str]) -> String {
    stdout(&in_netns(Some(ns), "/usr/bin/redis-cli").args(["-h", SERVICE, "-p", "6379"]).args(args).output().unwrap())
}

fn main() {
    let Some(sizes) = bench::start("redis", &[1024], true) else { return };
    if !Path::new("/usr/bin/redis-server").is_file() {
        eprintln!("the redis benchmark needs redis-server (scripts/setup installs it)");
        return;
    }
    for mib in sizes {
        run(mib);
    }
}

fn run(mib: u64) {
    let hosts = Hosts::new();
    let [a, b, c] = [&hosts.names[0], &hosts.names[1], &hosts.names[2]];
    let keys = Keys::new();
    let _daemons = [keys.daemon(a, "10.232.1.2", None), keys.daemon(b, "10.232.2.2", None)];
    let dir = tempfile::tempdir().unwrap();
    let server = in_netns(Some(a), "/usr/bin/redis-server")
        .args(["--bind", SERVICE, "--port", "6379", "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no"])
        .args(["--enable-debug-command", "yes", "--logfile", dir.path().join("redis.log").to_str().unwrap()])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Killed(server);
    wait_until("redis to answer", DEADLINE, || redis_cli(c, &["ping"]).trim() == "PONG");
    let keys_n = mib * 1024;
    assert_eq!(redis_cli(c, &["debug", "populate", &keys_n.to_string(), "key", "1024"]).trim(), "OK");
    let d = dir.path().to_str().unwrap().to_string();
    let _clients = Killed(in_netns(Some(c), "/usr/bin/python3").args(["-c", CLIENTS, &d, SERVICE, "6379", "100"]).spawn().unwrap());
    wait_until("the clients' first replies", DEADLINE, || mark(dir.path()).1 > 1000);
    let steady = mark(dir.path());
    println!("redis, {mib} MiB of keys ({keys_n} keys), 100 clients; steady longest wait {:.1} ms", steady.0);
    println!("{:<10} {:>10} {:>10} {:>16}", "strategy", "frozen ms", "total ms", "longest wait ms");
    let mut pid = server.0.id() as i32;
    let mut copies = Vec::new();
    let (mut from, mut to) = ((a, "10.232.1.2"), (b, "10.232.2.2"));
    for strategy in ["stop-copy", "pre-copy", "post-copy", "hybrid"] {
        let _ = Command::new("ip").args(["-n", to.0, "addr", "add", &format!("{SERVICE}/32"), "dev", "lo"]).stderr(Stdio::null()).status();
        mark(dir.path());
        let o = in_netns(Some(from.0), ferry_tests::ferry_bin().to_str().unwrap())
            .args(["migrate", &pid.to_string(), "--to", &format!("{}:7712", to.1), "--json", "--strategy", strategy])
            .args(["--auth-key", keys.key.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{strategy}: {}\ndaemon: {}", stderr(&o), keys.log(to.0));
        let new = restored_pid(&o, pid);
        copies.push(KillPid(new));
        let ip = |args: &[&str]| assert!(Command::new("ip").args(args).status().unwrap().success());
        ip(&["-n", from.0, "addr", "del", &format!("{SERVICE}/32"), "dev", "lo"]);
        ip(&["-n", c, "route", "replace", &format!("{SERVICE}/32"), "via", to.1]);
        wait_until("the source's lock to go", DEADLINE, || lock_tables_in(Some(from.0), pid).is_empty());
        // Every client has had a reply again: 100 replies is not enough to know, 2000 is.
        let (mut stall, mut n) = mark(dir.path());
        while n < 2000 {
            let (s, m) = mark(dir.path());
            (stall, n) = (stall.max(s), n + m);
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        println!("{:<10} {:>10.1} {:>10.1} {:>16.1}", strategy, v["frozen_ms"].as_f64().unwrap_or(-1.0), v["total_ms"].as_f64().unwrap_or(-1.0), stall);
        pid = new;
        (from, to) = (to, from);
    }
    assert_eq!(redis_cli(c, &["dbsize"]).trim(), (keys_n + 100).to_string(), "every key and the clients' counters");
    if let Some(f) = failed(dir.path()) {
        panic!("{f}");
    }
    for p in copies {
        bench::kill_and_wait(p.0);
        std::mem::forget(p);
    }
}
