//! Real programs migrated with every strategy (issue 16): python3 with a large
//! untouched mapping, Java, Go and node programs of ferry's own that allocate and tick
//! (`tests/programs`, each checks from inside that it carried on), and memcached (its
//! keys read back from the copy). Each goes from one network namespace to another over
//! a veth pair (memcached's listening port must be free where it lands), by stop-copy,
//! pre-copy, post-copy and hybrid, each run in another order. Prints medians of bytes
//! sent, frozen and total time (for post-copy and hybrid: until the last page
//! arrived), and both times against stop-copy's; then, for each program's stop-copy
//! bytes, the raw stream of as many bytes over the same path (into a reused buffer and
//! into fresh memory) and the time to populate that much fresh memory, measured in the
//! same run. A program whose interpreter is missing is skipped, saying so.
//!
//!     cargo bench -p ferry-tests --bench programs [-- RUNS] [-- NAMES...]

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use ferry_tests::{
    bench::{daemon, enter, in_ns, kill_and_wait, median, populate, raw_stream, veth_pair, VETH_B},
    ferry_bin, root, wait_until,
    workload::pid_alive,
};

const STRATEGIES: [&str; 4] = ["stop-copy", "pre-copy", "post-copy", "hybrid"];
const MEMCACHED_PORT: u16 = 11311;
const KEYS: usize = 5000;

/// How to start one program in a namespace, and how it says it carried on.
struct Program {
    name: &'static str,
    argv: Vec<String>,
    /// Writes `ready`, ticks, checks itself when `check` appears (tests/programs).
    own_check: bool,
}

fn programs(tmp: &Path) -> Vec<Program> {
    let dir = root().join("tests/programs");
    let s = |p: PathBuf| p.to_string_lossy().into_owned();
    let mut out = Vec::new();
    let have = |bin: &str| Command::new("sh").args(["-c", &format!("command -v {bin}")]).stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    let mut want = |name: &'static str, bin: &str, argv: Vec<String>, own_check: bool| {
        if have(bin) {
            out.push(Program { name, argv, own_check });
        } else {
            println!("{name}: skipped, {bin} is missing (scripts/setup installs it)");
        }
    };
    want("python3", "python3", vec!["python3".into(), s(dir.join("sparse.py"))], true);
    want("java", "java", vec!["java".into(), "-XX:+UseSerialGC".into(), s(dir.join("Ticker.java"))], true);
    // The Go program is built once into the run's directory.
    let go = tmp.join("ticker");
    let built = have("go")
        && Command::new("go")
            .args(["build", "-o"])
            .arg(&go)
            .arg(dir.join("ticker.go"))
            .env("GOCACHE", tmp.join("gocache"))
            .status()
            .is_ok_and(|s| s.success());
    want("go", if built { "true" } else { "go" }, vec![s(go)], true);
    want("node", "node", vec!["node".into(), s(dir.join("ticker.js"))], true);
    let port = MEMCACHED_PORT.to_string();
    want("memcached", "memcached", ["memcached", "-u", "root", "-l", "127.0.0.1", "-p", &port, "-m", "64", "-t", "4"].map(String::from).to_vec(), false);
    out
}

/// `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &'static str, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        enter(Some(ns));
        f()
    })
    .join()
    .unwrap()
}

/// A memcached request line and its reply up to `end`.
fn ask(s: &mut BufReader<TcpStream>, request: &[u8], end: &str) -> String {
    s.get_mut().write_all(request).unwrap();
    let mut reply = String::new();
    while !reply.ends_with(end) {
        let mut line = String::new();
        assert!(s.read_line(&mut line).unwrap() > 0, "memcached closed the connection");
        reply.push_str(&line);
    }
    reply
}

fn value(i: usize) -> String {
    format!("value {i} ").repeat(100)
}

/// Stores the keys in the memcached of namespace `ns`.
fn memcached_fill(ns: &'static str) {
    in_netns(ns, || {
        let mut s = BufReader::new(TcpStream::connect(("127.0.0.1", MEMCACHED_PORT)).unwrap());
        for i in 0..KEYS {
            let v = value(i);
            let r = ask(&mut s, format!("set k{i} 0 0 {}\r\n{v}\r\n", v.len()).as_bytes(), "\r\n");
            assert_eq!(r, "STORED\r\n");
        }
    })
}

/// Whether the memcached of namespace `ns` answers every key with its value.
fn memcached_says(ns: &'static str) -> String {
    in_netns(ns, || {
        let Ok(c) = TcpStream::connect(("127.0.0.1", MEMCACHED_PORT)) else { return "FAIL no connection".into() };
        let mut s = BufReader::new(c);
        for i in 0..KEYS {
            let v = value(i);
            let r = ask(&mut s, format!("get k{i}\r\n").as_bytes(), "END\r\n");
            if r != format!("VALUE k{i} 0 {}\r\n{v}\r\nEND\r\n", v.len()) {
                return format!("FAIL key k{i}: {r:.60}");
            }
        }
        "PASS".into()
    })
}

/// Starts `p` in namespace `ns`; answers the child once it is ready.
fn start(p: &Program, ns: &'static str, dir: &Path) -> Child {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(&p.argv);
    if p.own_check {
        c.arg(dir);
    }
    let mut child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    if p.own_check {
        wait_until(&format!("{} to be ready", p.name), Duration::from_secs(60), || dir.join("ready").exists());
    } else {
        wait_until("memcached to listen", Duration::from_secs(30), || {
            in_netns(ns, || TcpStream::connect(("127.0.0.1", MEMCACHED_PORT)).is_ok())
        });
        memcached_fill(ns);
    }
    // Let it run (a JVM compiles, the Go heap grows) before it moves.
    std::thread::sleep(Duration::from_secs(1));
    if child.try_wait().unwrap().is_some() {
        panic!("{} exited before it was migrated", p.name);
    }
    child
}

/// What the copy `pid` says after the migration; kills it.
fn verdict(p: &Program, dest: &'static str, pid: i32, dir: &Path) -> String {
    let said = if p.own_check {
        std::fs::write(dir.join("check"), b"").unwrap();
        let mut said = String::new();
        wait_until(&format!("{}'s own check", p.name), Duration::from_secs(60), || {
            said = std::fs::read_to_string(dir.join("result")).unwrap_or_default();
            !said.is_empty() || !pid_alive(pid)
        });
        if said.is_empty() {
            said = "FAIL the copy died".into();
        }
        said
    } else {
        memcached_says(dest)
    };
    kill_and_wait(pid);
    said.trim().to_string()
}

fn main() {
    let Some(_) = ferry_tests::bench::start("programs", &[], true) else { return };
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let runs: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(3);
    let names: Vec<&String> = args.iter().filter(|a| a.parse::<usize>().is_err()).collect();
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("key");
    std::fs::write(&key, "benchmark key, long enough\n").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (_netns, veth) = veth_pair("fprog");
    let Some((a, b)) = veth else {
        println!("the programs benchmark needs two network namespaces joined by a veth pair (iproute2)");
        return;
    };
    let addr = format!("{VETH_B}:{}", 7700 + std::process::id() % 100);
    let _d = daemon(Some(b), &addr, &tmp.path().join("d.sock"), &key);
    let programs: Vec<Program> = programs(tmp.path()).into_iter().filter(|p| names.is_empty() || names.iter().any(|n| *n == p.name)).collect();
    println!("medians of {runs} runs; the machine is shared: read the ratios, not the milliseconds");
    println!(
        "{:>10} {:>10} {:>9} {:>10} {:>10} {:>9} {:>9} {:>6}",
        "program", "strategy", "MB sent", "frozen ms", "total ms", "frozen/sc", "total/sc", "checks"
    );
    let mut references = Vec::new();
    for p in &programs {
        // Per strategy: MB sent, frozen, total; and how many copies passed their check.
        let mut m: Vec<[Vec<f64>; 3]> = (0..STRATEGIES.len()).map(|_| Default::default()).collect();
        let mut passed = vec![0usize; STRATEGIES.len()];
        let mut refused = None;
        for run in 0..runs {
            if refused.is_some() {
                break;
            }
            for k in 0..STRATEGIES.len() {
                let i = (k + run) % STRATEGIES.len();
                let dir = tempfile::tempdir().unwrap();
                let mut child = start(p, a, dir.path());
                let old = child.id() as i32;
                let o = in_ns(Some(a), &ferry_bin())
                    .args(["migrate", &old.to_string(), "--to", &addr, "--json", "--strategy", STRATEGIES[i], "--auth-key"])
                    .arg(&key)
                    .output()
                    .unwrap();
                if !o.status.success() {
                    // A refusal leaves the source running: it is killed here, and the
                    // program is reported as refused rather than measured.
                    let _ = child.kill();
                    let _ = child.wait();
                    refused = Some(format!("{} by {}: {}", p.name, STRATEGIES[i], String::from_utf8_lossy(&o.stderr).trim()));
                    break;
                }
                let _ = child.wait();
                let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                let new = s["pids"][old.to_string()].as_i64().unwrap() as i32;
                let said = verdict(p, b, new, dir.path());
                if said.starts_with("PASS") {
                    passed[i] += 1;
                } else {
                    eprintln!("{} by {}: the copy says {said}", p.name, STRATEGIES[i]);
                }
                m[i][0].push(s["bytes"].as_f64().unwrap() / 1e6);
                m[i][1].push(s["frozen_ms"].as_f64().unwrap());
                m[i][2].push(s["total_ms"].as_f64().unwrap());
            }
        }
        if let Some(why) = refused {
            println!("{:>10} refused: {why}", p.name);
            continue;
        }
        let med: Vec<[f64; 3]> = m.iter_mut().map(|r| [median(&mut r[0]), median(&mut r[1]), median(&mut r[2])]).collect();
        for (i, strategy) in STRATEGIES.iter().enumerate() {
            let [mb, frozen, total] = med[i];
            println!(
                "{:>10} {strategy:>10} {mb:>9.1} {frozen:>10.1} {total:>10.1} {:>9.2} {:>9.2} {:>4}/{runs}",
                p.name,
                frozen / med[0][1],
                total / med[0][2],
                passed[i]
            );
        }
        references.push((p.name, (med[0][0] * 1e6) as usize));
    }
    println!("\nreferences over the same path, for each program's stop-copy bytes (medians of {runs}):");
    println!("{:>10} {:>9} {:>12} {:>16} {:>12}", "program", "MB", "raw ms", "raw+fresh ms", "populate ms");
    for (name, bytes) in references {
        let (mut raw, mut fresh, mut pop) = (vec![], vec![], vec![]);
        for _ in 0..runs {
            raw.push(raw_stream(Some(a), Some(b), VETH_B, bytes, false));
            fresh.push(raw_stream(Some(a), Some(b), VETH_B, bytes, true));
            pop.push(populate(bytes));
        }
        println!("{name:>10} {:>9.1} {:>12.1} {:>16.1} {:>12.1}", bytes as f64 / 1e6, median(&mut raw), median(&mut fresh), median(&mut pop));
    }
}
