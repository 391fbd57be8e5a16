//! Live migration (stop-copy) to a running daemon: over loopback and between two
//! network namespaces joined by a veth pair; and every way it can fail before the
//! commit point, each leaving the source process running and checking itself.

use std::{
    net::TcpListener,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use ferry_tests::{
    hosts::Hosts,
    ferry_bin, needs, needs_root, plugin_dir, stderr, wait_until,
    workload::{state, processes_mentioning, creds_of, pid_alive, Script, Workload, WorkloadOpts},
};


fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A daemon for one test, killed by pid when the test ends. It writes each event's
/// statistics (`--stats`) in its directory unless the test names another.
struct Daemon {
    child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
    stats: PathBuf,
}

impl Daemon {
    /// Starts `ferry daemon` listening on `ip:port`, optionally inside network namespace
    /// `netns`, with `extra` arguments.
    fn start(netns: Option<&str>, ip: &str, extra: &[&str]) -> Daemon {
        Daemon::start_env(netns, ip, extra, None)
    }

    /// Starts a daemon that dies by SIGKILL at fault point `fault` (FERRY_FAULT).
    fn start_env(netns: Option<&str>, ip: &str, extra: &[&str], fault: Option<&str>) -> Daemon {
        let envs: Vec<(&str, &str)> = fault.map(|f| ("FERRY_FAULT", f)).into_iter().collect();
        Daemon::start_envs(netns, ip, extra, &envs)
    }

    /// Starts a daemon with `envs` in its environment.
    fn start_envs(netns: Option<&str>, ip: &str, extra: &[&str], envs: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("{ip}:{port}");
        let control = dir.path().join("control.sock");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(ferry_bin());
                c
            }
            None => Command::new(ferry_bin()),
        };
        cmd.args(["daemon", "--listen", &addr, "--control"]).arg(&control).args(extra);
        let stats = match extra.iter().position(|a| *a == "--stats") {
            Some(i) => PathBuf::from(extra[i + 1]),
            None => {
                let stats = dir.path().join("stats");
                std::fs::create_dir(&stats).unwrap();
                cmd.arg("--stats").arg(&stats);
                stats
            }
        };
        cmd.envs(envs.iter().copied());
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        let d = Daemon { child, addr, _dir: dir, stats };
        wait_until("the daemon's control socket", Duration::from_secs(30), || {
            ferry::commands::control::daemon_running(&control)
        });
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// What this daemon recorded of the migration whose `--json` output is `o`.
    fn event(&self, o: &std::process::Output) -> serde_json::Value {
        let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let token = stats["token"].as_str().unwrap_or_else(|| panic!("no token in {stats}"));
        let file = self.stats.join(format!("{token}.json"));
        wait_until("the daemon's statistics", Duration::from_secs(30), || file.exists());
        // Written whole by the daemon, but perhaps not yet when first seen.
        let mut event = serde_json::Value::Null;
        wait_until("the daemon's statistics, whole", Duration::from_secs(30), || {
            event = std::fs::read(&file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
            !event.is_null()
        });
        event
    }

    /// Checks the source's figures of the migration `o` against what this daemon
    /// counted as it read the stream (and served post-copy's faults): the same bytes and
    /// pages, and at least `pages` of them. Answers the daemon's record.
    fn counted(&self, o: &std::process::Output, pages: u64) -> serde_json::Value {
        let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let event = self.event(o);
        assert_eq!(event["outcome"], "committed", "{event}");
        assert_eq!(event["bytes"], stats["bytes"], "bytes the destination read / the source sent: {event} / {stats}");
        assert_eq!(event["pages"], stats["pages"], "pages the destination read / the source sent: {event} / {stats}");
        assert!(event["pages"].as_u64().unwrap() >= pages, "the destination counted fewer than the {pages} pages written: {event}");
        phases_in_order(&event, &["handshake done", "plan received", "rebuilt sent", "commit received"]);
        event
    }
}

impl Daemon {
    /// How the daemon ended, which it must within a minute: a daemon whose fault point
    /// the migration never reached was waited for forever; now the test fails naming
    /// `why` (and the daemon is killed when dropped).
    fn ended(&mut self, why: &str) -> std::process::ExitStatus {
        let mut status = None;
        wait_until(&format!("the daemon to end ({why})"), Duration::from_secs(60), || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status.expect("ended")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ferry migrate PID --to ADDR --json [extra]`, run in `netns` when given.
fn migrate(netns: Option<&str>, pid: i32, to: &str, extra: &[&str]) -> std::process::Output {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(ferry_bin());
            c
        }
        None => Command::new(ferry_bin()),
    };
    cmd.args(["migrate", &pid.to_string(), "--to", to, "--json"]).args(extra).args(ferry_tests::context_args());
    cmd.output().unwrap()
}

fn new_pid(o: &std::process::Output, old: i32) -> i32 {
    assert!(o.status.success(), "migrate failed: {}", stderr(o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(stats["strategy"], "stop-copy");
    assert_eq!(stats["token"].as_str().unwrap().len(), 32);
    for key in ["frozen_ms", "total_ms", "bytes", "pages"] {
        assert!(stats[key].is_number(), "{key} missing from {stats}");
    }
    phases_in_order(&stats, &["handshake done", "source frozen", "image sent", "released"]);
    stats["pids"][old.to_string()].as_i64().unwrap() as i32
}

/// `stats` (a command's `--json` or a daemon's `--stats` record) times each of `names`
/// among its phases, in that order.
fn phases_in_order(stats: &serde_json::Value, names: &[&str]) {
    let phases = stats["phases"].as_array().unwrap_or_else(|| panic!("no phases in {stats}"));
    let at = |name: &str| {
        phases
            .iter()
            .find(|p| p["phase"] == name)
            .and_then(|p| p["at_ms"].as_f64())
            .unwrap_or_else(|| panic!("no phase {name:?} in {stats}"))
    };
    let times: Vec<f64> = names.iter().map(|n| at(n)).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "phases {names:?} out of order ({times:?}) in {stats}");
}

fn fails(o: &std::process::Output, needle: &str) {
    assert_eq!(o.status.code(), Some(1), "expected failure: {}", stderr(o));
    let err = stderr(o);
    assert_eq!(err.lines().count(), 1, "one line expected: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

/// After a migration of `old` to `new`: the source goes, and the process carries on
/// there for `ticks` more ticks.
fn moved(w: &mut Workload, old: i32, new: i32, ticks: u64) {
    wait_until("the source to be gone", Duration::from_secs(30), || !pid_alive(old));
    w.adopt(new);
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + ticks);
}

/// [`moved`], and then the process passes its own check.
fn carries_on(w: &mut Workload, old: i32, new: i32, ticks: u64) {
    moved(w, old, new, ticks);
    w.terminate_and_check(new).unwrap();
}

/// The source keeps running and passes its own check after a failed migration.
fn still_fine(w: &mut Workload) {
    assert!(pid_alive(w.pid));
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 2);
    let pid = w.pid;
    w.terminate_and_check(pid).unwrap();
}

#[test]
fn migrates_the_workload_over_loopback() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    let stats = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(None, "127.0.0.1", &["--stats", stats.path().to_str().unwrap()]);
    let mut w = Workload::spawn(&WorkloadOpts { threads: 2, mem_mib: 8, ..Default::default() });
    w.wait_ticks(3);
    let old = w.pid;
    let o = migrate(None, old, &daemon.addr, &[]);
    let new = new_pid(&o, old);
    // The daemon's statistics of the event, under its token: it read as many bytes and
    // pages as the source sent, at least the 8 MiB mapping the workload filled.
    let (start, end) = w.region("mem");
    let event = daemon.counted(&o, (end - start) / 4096);
    assert!(stats.path().join(format!("{}.json", event["token"].as_str().unwrap())).exists(), "{event}");
    assert_eq!(event["new_pid"], new);
    assert_eq!((event["strategy"].as_str(), event["medium"].as_str()), (Some("stop-copy"), Some("tcp")), "{event}");
    assert_eq!(event["pid"], old);
    assert!(event["bytes"].as_u64().unwrap() > 8 << 20, "{event}");
    carries_on(&mut w, old, new, 3);
    assert!(daemon.log().contains("committed"), "{}", daemon.log());
}

#[test]
fn a_stopped_process_migrates_stopped_or_is_refused_where_it_would_have_to_run() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    let mut w = Workload::spawn(&WorkloadOpts { files: false, ..Default::default() });
    w.wait_ticks(3);
    let mut pid = w.pid;
    assert!(ferry_tests::workload::send_signal(pid, libc::SIGSTOP));
    wait_until("the workload to stop", Duration::from_secs(30), || state(pid) == "T");
    // Post-copy and hybrid would run the copy to page its memory in: refused, the
    // source left as it was (stopped).
    for strategy in ["post-copy", "hybrid"] {
        let o = migrate(None, pid, &daemon.addr, &["--strategy", strategy]);
        fails(&o, "is stopped (job control)");
        assert_eq!(state(pid), "T", "{strategy}: the source stays stopped");
    }
    for strategy in ["stop-copy", "pre-copy"] {
        let o = migrate(None, pid, &daemon.addr, &["--strategy", strategy]);
        assert!(o.status.success(), "{strategy}: {}", stderr(&o));
        let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let new = stats["pids"][pid.to_string()].as_i64().unwrap() as i32;
        let old = pid;
        wait_until("the source to be gone", Duration::from_secs(30), || !pid_alive(old));
        w.adopt(new);
        pid = new;
        // It stops on its own first step after the release: wait for that, with a deadline.
        wait_until(&format!("{strategy}: the copy to arrive stopped"), Duration::from_secs(30), || state(new) == "T");
    }
    let at = *w.ticks().last().unwrap();
    assert!(ferry_tests::workload::send_signal(pid, libc::SIGCONT));
    w.wait_ticks(at + 3);
    w.terminate_and_check(pid).unwrap();
}

fn migrate_script(kind: Script) {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    let mut w = Workload::spawn_script(kind);
    w.wait_ticks(3);
    let old = w.pid;
    let new = new_pid(&migrate(None, old, &daemon.addr, &[]), old);
    w.adopt(new);
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 3);
    w.terminate_and_check(new).unwrap();
}

#[test]
fn migrates_python_over_loopback() {
    migrate_script(Script::Python);
}

#[test]
fn migrates_perl_over_loopback() {
    migrate_script(Script::Perl);
}

#[test]
fn migrates_bash_over_loopback() {
    migrate_script(Script::Bash);
}

#[test]
fn no_daemon_wrong_key_missing_plugin_and_missing_pid_leave_the_source_running() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    let mut w = Workload::spawn(&WorkloadOpts::default());
    w.wait_ticks(2);
    // Nobody listens.
    let nobody = format!("127.0.0.1:{}", free_port());
    fails(&migrate(None, w.pid, &nobody, &[]), "cannot reach");

    // A listener that never answers: the peer and the time waited are named (it read
    // "Resource temporarily unavailable (os error 11)").
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = silent.local_addr().unwrap().to_string();
    let cfg = tempfile::tempdir().unwrap();
    let file = cfg.path().join("ferry.json");
    std::fs::write(&file, r#"{"watchdog_ms": 1500}"#).unwrap();
    let o = migrate(None, w.pid, &at, &["--config", file.to_str().unwrap()]);
    fails(&o, &format!("no answer from {at} in 1500 ms during the handshake"));
    drop(silent);

    // A daemon with a key; the source with another key, or none.
    let keys = tempfile::tempdir().unwrap();
    let key = |name: &str, text: &str| -> PathBuf {
        let p = keys.path().join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    };
    let good = key("good", "a shared secret of enough length\n");
    let bad = key("bad", "another secret, also long enough\n");
    let daemon = Daemon::start(None, "127.0.0.1", &["--auth-key", good.to_str().unwrap()]);
    fails(&migrate(None, w.pid, &daemon.addr, &["--auth-key", bad.to_str().unwrap()]), "authentication");
    fails(&migrate(None, w.pid, &daemon.addr, &[]), "authentication");
    // A missing pid, refused before connecting.
    fails(&migrate(None, 999_999_999, &daemon.addr, &["--auth-key", good.to_str().unwrap()]), "does not exist");

    // A daemon without the signals plugin.
    let partial = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(plugin_dir()).unwrap().flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        if name.ends_with(".so") && !name.contains("signals") {
            std::fs::copy(f.path(), partial.path().join(&name)).unwrap();
        }
    }
    let lacking = Daemon::start(None, "127.0.0.1", &["--plugin-dir", partial.path().to_str().unwrap()]);
    fails(&migrate(None, w.pid, &lacking.addr, &[]), "destination lacks subsystem plugin signals");

    // The daemon still serves the next migration after all of that.
    let old = w.pid;
    let new = new_pid(&migrate(None, old, &daemon.addr, &["--auth-key", good.to_str().unwrap()]), old);
    w.adopt(new);
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 2);
    w.terminate_and_check(new).unwrap();
}

#[test]
fn a_daemon_that_vanishes_mid_transfer_leaves_the_source_running() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    // A fake daemon: accepts, reads a little, and closes.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let fake = std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 16];
            let _ = std::io::Read::read(&mut s, &mut buf);
            let _ = std::io::Write::write_all(&mut s, &[0xff, 0xff, 0xff, 0x7f, b'x']);
        }
    });
    let mut w = Workload::spawn(&WorkloadOpts::default());
    w.wait_ticks(2);
    let o = migrate(None, w.pid, &addr, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    fake.join().unwrap();
    still_fine(&mut w);
}

#[test]
fn a_daemon_killed_at_each_phase_leaves_the_source_running_and_nothing_behind() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    for fault in ["after-handshake", "mid-pages", "before-commit"] {
        let mut daemon = Daemon::start_env(None, "127.0.0.1", &[], Some(fault));
        let mut w = Workload::spawn(&WorkloadOpts { threads: 1, mem_mib: 8, ..Default::default() });
        w.wait_ticks(2);
        let o = migrate(None, w.pid, &daemon.addr, &[]);
        assert_eq!(o.status.code(), Some(1), "{fault}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{fault}: {}", stderr(&o));
        let status = daemon.ended(&format!("{fault}: {}", stderr(&o)));
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL), "{fault}");
        // Nothing of the half-built copy survives its daemon (PTRACE_O_EXITKILL).
        let log = w.log.to_str().unwrap().to_string();
        wait_until("only the source to mention its log", Duration::from_secs(30), || {
            processes_mentioning(&log) == vec![w.pid]
        });
        ferry_tests::assert_no_residue(&[w.pid], None);
        still_fine(&mut w);
    }
}

fn spawn_in(netns: &str, opts: &WorkloadOpts) -> Workload {
    Workload::spawn_in_netns(netns, opts)
}

#[test]
fn migrates_between_two_hosts_and_back() {
    if !needs_root("network namespaces and a veth pair")
        || !needs(Path::new("/usr/bin/ip").exists() || Path::new("/bin/ip").exists(), "iproute2 (`ip`) for the network namespaces")
    {
        return;
    }
    let hosts = Hosts::new().expect("creating the network namespaces and the veth pair");
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("key");
    std::fs::write(&key, "the two test hosts share this key\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let k = key.to_str().unwrap();
    // Listening beyond loopback without a key is refused.
    let o = Command::new("ip")
        .args(["netns", "exec", &hosts.b])
        .arg(ferry_bin())
        .args(["daemon", "--listen", "10.231.0.2:7711", "--control", "/nonexistent/ferry.sock"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--auth-key"), "{}", stderr(&o));

    let da = Daemon::start(Some(&hosts.a), "10.231.0.1", &["--auth-key", k]);
    let db = Daemon::start(Some(&hosts.b), "10.231.0.2", &["--auth-key", k]);
    let mut w = spawn_in(&hosts.a, &WorkloadOpts { threads: 1, mem_mib: 4, process_state: true, shared_anon: true, event_fds: true, listen: true, ..Default::default() });
    w.wait_ticks(3);
    let first = w.pid;
    let second = new_pid(&migrate(Some(&hosts.a), first, &db.addr, &["--auth-key", k]), first);
    moved(&mut w, first, second, 3);
    let third = new_pid(&migrate(Some(&hosts.b), second, &da.addr, &["--auth-key", k]), second);
    moved(&mut w, second, third, 3);
    w.terminate_and_check(third).unwrap();

    // Every strategy across the link, there and back, with a process that keeps writing.
    let mut w = spawn_in(&hosts.a, &WorkloadOpts { threads: 1, mem_mib: 16, dirty_pages: 16, tick_ms: 5, ..Default::default() });
    w.wait_ticks(3);
    let (mut pid, mut on_a) = (w.pid, true);
    for strategy in ["pre-copy", "post-copy", "hybrid", "stop-copy"] {
        let (from, to) = if on_a { (&hosts.a, &db.addr) } else { (&hosts.b, &da.addr) };
        let o = migrate(Some(from), pid, to, &["--auth-key", k, "--strategy", strategy]);
        assert!(o.status.success(), "{strategy}: {}", stderr(&o));
        let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(stats["strategy"], strategy, "{stats}");
        let new = stats["pids"][pid.to_string()].as_i64().unwrap() as i32;
        moved(&mut w, pid, new, 3);
        (pid, on_a) = (new, !on_a);
    }
    w.terminate_and_check(pid).unwrap();
}

/// `ferry migrate --strategy pre-copy` of `w`'s process `old` to `daemon`: the stats of
/// the event, checked against what the daemon counted (every page of the workload's
/// mapping among them), and the new pid.
fn precopy_stats(o: &std::process::Output, old: i32, daemon: &Daemon, w: &Workload) -> (serde_json::Value, i32) {
    assert!(o.status.success(), "migrate failed: {}", stderr(o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(stats["strategy"], "pre-copy", "{stats}");
    let rounds = stats["round_bytes"].as_array().unwrap();
    assert!(rounds.len() >= 3, "round 0, at least one round of dirty pages, the frozen one: {stats}");
    let times = stats["round_ms"].as_array().unwrap();
    assert_eq!(times.len(), rounds.len(), "a duration per round: {stats}");
    assert_eq!(times.last(), Some(&stats["frozen_ms"]), "the frozen round's is the frozen time: {stats}");
    let (start, end) = w.region("mem");
    daemon.counted(o, (end - start) / 4096);
    (stats.clone(), stats["pids"][old.to_string()].as_i64().unwrap() as i32)
}

#[test]
fn precopy_moves_a_process_that_keeps_writing_and_freezes_it_only_for_the_last_pages() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    // 64 MiB, 32 pages rewritten every 10 ms tick (~12 MiB/s), two extra threads.
    let mut w = Workload::spawn(&WorkloadOpts { threads: 2, mem_mib: 64, dirty_pages: 32, tick_ms: 10, ..Default::default() });
    w.wait_ticks(3);
    let old = w.pid;
    let o = migrate(None, old, &daemon.addr, &["--strategy", "pre-copy"]);
    let (stats, new) = precopy_stats(&o, old, &daemon, &w);
    eprintln!("pre-copy: {stats}");
    let rounds = stats["round_bytes"].as_array().unwrap();
    let first = rounds[0].as_u64().unwrap();
    let last = rounds.last().unwrap().as_u64().unwrap();
    assert!(first >= 64 << 20, "round 0 sends all the memory: {stats}");
    assert!(last < first / 4, "the frozen round sends only what was written since: {stats}");
    assert_eq!(stats["precopy_stop"], "converged", "{stats}");
    carries_on(&mut w, old, new, 3);
}

#[test]
fn precopy_follows_areas_mapped_moved_emptied_and_replaced_between_rounds() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    // Every 2 ms one of four areas is replaced, grown (moved when it must) or has a page
    // emptied; the workload checks their contents every tick and at the end.
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 16, dirty_pages: 16, tick_ms: 2, churn: true, ..Default::default() });
    w.wait_ticks(10);
    let old = w.pid;
    let (stats, new) = precopy_stats(&migrate(None, old, &daemon.addr, &["--strategy", "pre-copy"]), old, &daemon, &w);
    eprintln!("pre-copy with churn: {stats}");
    carries_on(&mut w, old, new, 20);
}

/// A config file of pre-copy tuning.
fn precopy_config(dir: &Path, name: &str, tuning: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!(r#"{{"tuning": {{"pre_copy": {tuning}}}}}"#)).unwrap();
    p
}

fn migrate_with_config(config: &Path, pid: i32, to: &str) -> std::process::Output {
    let mut cmd = Command::new(ferry_bin());
    cmd.arg("--config").arg(config).args(["migrate", &pid.to_string(), "--to", to, "--json", "--strategy", "pre-copy"]);
    cmd.output().unwrap()
}

#[test]
fn precopy_of_a_process_outrunning_the_link_shrinks_only_when_throttled() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    // All 32 MiB rewritten every millisecond tick: far faster than any link. A 5 ms
    // budget is out of reach for 32 MiB on any link this machine has.
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 32, dirty_pages: 8192, tick_ms: 1, ..Default::default() });
    w.wait_ticks(3);
    let old = w.pid;
    let dir = tempfile::tempdir().unwrap();
    let off = precopy_config(dir.path(), "off.json", r#"{"throttle": false, "max_rounds": 20, "downtime_budget_ms": 5}"#);
    let (stats, mid) = precopy_stats(&migrate_with_config(&off, old, &daemon.addr), old, &daemon, &w);
    // Known before anything is asserted, so that a failure does not leave it running.
    w.adopt(mid);
    eprintln!("pre-copy without throttle: {stats}");
    assert_eq!(stats["precopy_stop"], "not shrinking", "{stats}");
    assert_eq!(stats["throttle"], 0, "{stats}");
    moved(&mut w, old, mid, 3);

    // Again, from where it landed, with auto-converge. Whether the rounds then get under
    // the budget depends on when the quota's bursts fall (at 1% the process runs 1 ms in
    // every 100: a burst inside a round rewrites megabytes) and on how busy the machine
    // is; what the throttle must do, always, is shrink what a round has to send.
    let on = precopy_config(dir.path(), "on.json", r#"{"throttle": true, "max_rounds": 30, "downtime_budget_ms": 5}"#);
    let (stats, new) = precopy_stats(&migrate_with_config(&on, mid, &daemon.addr), mid, &daemon, &w);
    w.adopt(new);
    eprintln!("pre-copy with throttle: {stats}");
    assert!(stats["throttle"].as_u64().unwrap() >= 1, "{stats}");
    let stop = stats["precopy_stop"].as_str().unwrap();
    assert!(stop == "converged" || stop == "max rounds", "the throttle keeps the rounds going: {stats}");
    let rounds: Vec<u64> = stats["round_bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap()).collect();
    let least = rounds[1..].iter().min().copied().unwrap_or(u64::MAX);
    assert!(least < 8 << 20, "a throttled round sends under a quarter of the 32 MiB rewritten: {stats}");
    // ferry's throttle cgroup went with the event: of this test's processes only
    // (other tests throttle theirs meanwhile).
    let left = ferry_tests::residue::ferry_cgroups_of(&[old, mid, new]);
    assert!(left.is_empty(), "{left:?}");
    carries_on(&mut w, mid, new, 3);
}

/// `ferry migrate --strategy post-copy|hybrid` to `daemon`: the stats, checked against
/// what the daemon counted (every page of the workload's `mib` MiB among them), and the
/// new pid.
fn lazy_stats(o: &std::process::Output, old: i32, strategy: &str, mib: u64, daemon: &Daemon) -> (serde_json::Value, i32) {
    assert!(o.status.success(), "migrate failed: {}", stderr(o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(stats["strategy"], strategy, "{stats}");
    for key in ["resumed_ms", "faults", "pages_faulted", "pages_pushed", "pages_zeroed", "lazy_ms"] {
        assert!(stats[key].is_number(), "{key} missing from {stats}");
    }
    let lazy = stats["pages_faulted"].as_u64().unwrap() + stats["pages_pushed"].as_u64().unwrap();
    assert!(lazy > 0, "some memory moved after the resume: {stats}");
    daemon.counted(o, mib * 256);
    (stats.clone(), stats["pids"][old.to_string()].as_i64().unwrap() as i32)
}

#[test]
fn postcopy_resumes_at_once_and_the_process_faults_its_memory_in() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    // It rewrites memory every millisecond, from the moment it runs again; its threads'
    // stacks are among the areas that follow after the resume.
    let mut w = Workload::spawn(&WorkloadOpts { threads: 2, mem_mib: 64, dirty_pages: 256, tick_ms: 1, ..Default::default() });
    w.wait_ticks(3);
    let old = w.pid;
    let (stats, new) = lazy_stats(&migrate(None, old, &daemon.addr, &["--strategy", "post-copy"]), old, "post-copy", 64, &daemon);
    eprintln!("post-copy: {stats}");
    assert_eq!(stats["rounds"], 1, "{stats}");
    assert!(stats["faults"].as_u64().unwrap() >= 1, "the running process faulted pages in: {stats}");
    assert!(stats["round_bytes"][0].as_u64().unwrap() < 8 << 20, "the frozen round leaves the memory out: {stats}");
    // Only the pages the process has move: its threads' stacks (8 MiB each, listed whole
    // in the freeze) are mostly untouched.
    let moved = stats["pages_faulted"].as_u64().unwrap() + stats["pages_pushed"].as_u64().unwrap();
    assert!(moved < 64 * 256 + 2048, "untouched memory stays behind: {stats}");
    carries_on(&mut w, old, new, 20);
}

#[test]
fn hybrid_sends_one_round_early_and_the_rest_after_the_resume() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 32, dirty_pages: 64, tick_ms: 2, churn: true, ..Default::default() });
    w.wait_ticks(5);
    let old = w.pid;
    let o = migrate(None, old, &daemon.addr, &["--strategy", "hybrid"]);
    if !o.status.success() {
        // Whatever the workload said of itself (a mapping ferry split under it, …).
        eprintln!("the workload's output: {}", std::fs::read_to_string(w.dir.path().join("output")).unwrap_or_default());
    }
    let (stats, new) = lazy_stats(&o, old, "hybrid", 32, &daemon);
    eprintln!("hybrid: {stats}");
    assert_eq!(stats["rounds"], 2, "one pre-copy round, then the frozen one: {stats}");
    assert!(stats["round_bytes"][0].as_u64().unwrap() >= 32 << 20, "{stats}");
    carries_on(&mut w, old, new, 20);
}

/// The destination's pid of the copy it killed, from its log line.
fn killed_copy(daemon: &Daemon) -> i32 {
    wait_until("the destination to give up", Duration::from_secs(60), || daemon.log().contains("failed after resume"));
    let log = daemon.log();
    assert!(log.contains("cannot be completed and is killed: the process is lost"), "{log}");
    log.split("(pid ")
        .nth(1)
        .and_then(|t| t.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {log}"))
}

// Post-copy's commit point is the destination's `ready` (the copy runs only after the
// source gave itself up): past it, a failure loses the process — source and copy both
// killed — and never rolls the source back to repeat what the copy did. Before, the
// source carried on from the freeze and logged again the ticks its copy had logged.

#[test]
fn a_client_killed_during_postcopy_loses_the_process_and_never_runs_it_twice() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 64, dirty_pages: 16, tick_ms: 5, ..Default::default() });
    w.wait_ticks(3);
    let old = w.pid;
    // The coordinator dies (SIGKILL) while the resumed process still fetches pages.
    let o = Command::new(ferry_bin())
        .args(["migrate", &old.to_string(), "--to", &daemon.addr, "--strategy", "post-copy"])
        .env("FERRY_FAULT", "post-copy-mid")
        .output()
        .unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&o.status), Some(libc::SIGKILL), "{}", stderr(&o));
    // The source died with its ferry (its tracer's fate), the copy with its pages'
    // source; nothing of ferry's is left and no tick was logged twice.
    let new = killed_copy(&daemon);
    w.assert_lost(&[new]);
}

#[test]
fn a_source_killed_from_outside_during_postcopy_is_said_to_be_lost_not_to_carry_on() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    // The failure said the source "carries on here from the freeze" even when it had
    // been killed meanwhile.
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 64, dirty_pages: 16, tick_ms: 5, ..Default::default() });
    w.wait_ticks(3);
    let old = w.pid;
    let tmp = tempfile::tempdir().unwrap();
    let pause = tmp.path().join("paused");
    let client = Command::new(ferry_bin())
        .args(["migrate", &old.to_string(), "--to", &daemon.addr, "--strategy", "post-copy"])
        .env("FERRY_PAUSE", format!("post-copy-mid:{}", pause.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the source to pause mid post-copy", Duration::from_secs(60), || pause.exists());
    // SAFETY: kill of the workload this test started.
    assert_eq!(unsafe { libc::kill(old, libc::SIGKILL) }, 0);
    std::fs::remove_file(&pause).unwrap();
    let o = client.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(!o.status.success() && err.lines().count() == 1, "{err}");
    assert!(err.contains(&format!("process {old} was lost: it is gone here too (killed from outside?)")), "{err}");
    assert!(!err.contains("carries on"), "{err}");
    w.reap();
    wait_until("the destination to give up", Duration::from_secs(60), || daemon.log().contains("failed after resume"));
}

#[test]
fn a_destination_dying_during_postcopy_loses_the_process_and_says_so_in_one_line() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    for strategy in ["post-copy", "hybrid"] {
        let daemon = Daemon::start_env(None, "127.0.0.1", &[], Some("post-copy-dest-mid"));
        let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 64, dirty_pages: 16, tick_ms: 5, ..Default::default() });
        w.wait_ticks(3);
        let old = w.pid;
        let o = migrate(None, old, &daemon.addr, &["--strategy", strategy]);
        fails(&o, &format!("process {old} was lost: its copy on {} ran and then died before all its pages arrived", daemon.addr));
        assert!(stderr(&o).contains("post-copy cannot roll back once the copy has run"), "{}", stderr(&o));
        let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", ferry_tests::stdout(&o)));
        assert_eq!(json["kind"], "failed", "{json}");
        // The resumed copy was traced by the daemon: it died with it. The source was
        // killed and reaped by its ferry, which said so and exited.
        w.assert_lost(&[]);
    }
}

#[test]
fn a_postcopy_failing_before_its_copy_runs_rolls_back_with_continuous_ticks() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    // The destination dies after the commit arrived but before it answered `ready`:
    // the copy never ran, the source carries on, every tick logged once.
    let daemon = Daemon::start_env(None, "127.0.0.1", &[], Some("commit-received"));
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 16, dirty_pages: 16, tick_ms: 5, ..Default::default() });
    w.wait_ticks(3);
    let o = migrate(None, w.pid, &daemon.addr, &["--strategy", "post-copy"]);
    fails(&o, "it runs on here");
    wait_until("no copy of the process left", Duration::from_secs(30), || w.copies_other_than(w.pid).is_empty());
    ferry_tests::assert_no_residue(&[w.pid], None);
    still_fine(&mut w);
}

#[test]
fn precopy_with_page_hashes_moves_a_process_that_keeps_writing() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 16, dirty_pages: 16, tick_ms: 5, churn: true, ..Default::default() });
    w.wait_ticks(3);
    let old = w.pid;
    let dir = tempfile::tempdir().unwrap();
    let config = precopy_config(dir.path(), "hash.json", r#"{"dirty_tracking": "page-hash"}"#);
    let (stats, new) = precopy_stats(&migrate_with_config(&config, old, &daemon.addr), old, &daemon, &w);
    eprintln!("pre-copy with page hashes: {stats}");
    carries_on(&mut w, old, new, 10);

    // Soft-dirty where the kernel has it; where it does not, it is refused before
    // anything is touched.
    let check = Command::new(ferry_bin()).args(["check", "--json"]).output().unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&check.stdout).unwrap();
    let soft_dirty = rows.iter().any(|r| r["name"] == "soft-dirty" && r["present"] == true);
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 16, dirty_pages: 16, tick_ms: 5, churn: true, ..Default::default() });
    w.wait_ticks(3);
    let old = w.pid;
    let config = precopy_config(dir.path(), "soft.json", r#"{"dirty_tracking": "soft-dirty"}"#);
    let o = migrate_with_config(&config, old, &daemon.addr);
    if soft_dirty {
        let (stats, new) = precopy_stats(&o, old, &daemon, &w);
        eprintln!("pre-copy with soft-dirty: {stats}");
        carries_on(&mut w, old, new, 10);
    } else {
        eprintln!("this kernel lacks soft-dirty (ferry check): that backend's migration is not run, only its refusal");
        fails(&o, "this kernel lacks soft-dirty");
        still_fine(&mut w);
    }
}

#[test]
fn a_precopy_that_fails_mid_round_leaves_the_source_untracked_unthrottled_and_running() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    // The daemon dies once a MiB of pages has arrived: in pre-copy's first round.
    let daemon = Daemon::start_env(None, "127.0.0.1", &[], Some("mid-pages"));
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 32, dirty_pages: 16, tick_ms: 5, ..Default::default() });
    w.wait_ticks(3);
    let o = migrate(None, w.pid, &daemon.addr, &["--strategy", "pre-copy"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    // Back in its own cgroups, no throttle cgroup for it, no scratch area of ferry's.
    ferry_tests::assert_no_residue(&[w.pid], None);
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", w.pid))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok().map(|l| l.to_string_lossy().into_owned()))
        .collect();
    assert!(!fds.iter().any(|l| l.contains("userfaultfd")), "{fds:?}");
    still_fine(&mut w);
    assert_eq!(w.copies_other_than(w.pid), Vec::<i32>::new());
}

#[test]
fn postcopy_follows_a_process_that_moves_and_empties_memory_still_on_its_way() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    // Every millisecond the 64 MiB mapping moves elsewhere (mremap) and one of its pages
    // is emptied and must read zero: most of it has not arrived yet when it first moves.
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 64, tick_ms: 1, move_mem: true, ..Default::default() });
    w.wait_ticks(3);
    let mut pid = w.pid;
    for strategy in ["post-copy", "hybrid"] {
        let o = migrate(None, pid, &daemon.addr, &["--strategy", strategy]);
        let (stats, new) = lazy_stats(&o, pid, strategy, 64, &daemon);
        eprintln!("{strategy} of a process moving its memory: {stats}");
        moved(&mut w, pid, new, 20);
        assert!(!w.lines().iter().any(|l| l.starts_with("FAIL")), "{}", w.log_text());
        pid = new;
    }
    w.terminate_and_check(pid).unwrap();
}

/// With `--fork-check`, after a migration to `new`: the copy, finding itself restored,
/// forked a child at once (in a post-copy, before its pages arrived) whose check passed,
/// and nothing failed.
fn forks_checked_by(w: &Workload, new: i32, strategy: &str) {
    w.wait_line(&format!("fork-check resumed pid {new} restored"));
    w.wait_for(&format!("a fork check passed in the copy {new} after {strategy}"), |w| w.fork_checks(new) >= 1);
    assert!(!w.lines().iter().any(|l| l.starts_with("FAIL")), "{strategy}: {}", w.log_text());
    eprintln!("{strategy}: the copy {new} passed {} fork checks", w.fork_checks(new));
}

#[test]
fn postcopy_gives_a_child_forked_before_the_pages_arrived_the_memory_it_should_see() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    // Every 20 ms the process forks a child that checks all 64 MiB of its copy; quieted
    // before each migration (ferry refuses a process with a child), the copy forks one
    // as soon as it finds itself restored, while its pages are still arriving.
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 64, tick_ms: 1, fork_check: true, ..Default::default() });
    w.wait_ticks(25);
    let mut pid = w.pid;
    for strategy in ["post-copy", "hybrid"] {
        // ferry refuses a process with a child: the check holds off until restored.
        w.quiet_forks(pid);
        let o = migrate(None, pid, &daemon.addr, &["--strategy", strategy]);
        if !o.status.success() {
            eprintln!("the daemon said: {}", daemon.log());
        }
        let (stats, new) = lazy_stats(&o, pid, strategy, 64, &daemon);
        eprintln!("{strategy} of a process forking: {stats}");
        moved(&mut w, pid, new, 60);
        forks_checked_by(&w, new, strategy);
        pid = new;
    }
    w.terminate_and_check(pid).unwrap();
}

#[test]
fn a_process_of_another_user_keeps_its_credentials_through_every_strategy() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    // The destination rebuilds it as root: the credentials (and, for post-copy, the
    // userfaultfd made before they are dropped) must come out exactly as they were.
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    let mut w = Workload::spawn(&WorkloadOpts { threads: 3, files: false, creds: true, mem_mib: 4, dirty_pages: 4, ..Default::default() });
    w.wait_ticks(3);
    let before = creds_of(w.pid);
    assert!(before.0.iter().all(|t| t.contains("Gid: 65534 4002 4003 4004,")), "not another user: {before:?}");
    let mut pid = w.pid;
    for strategy in ["stop-copy", "pre-copy", "post-copy", "hybrid"] {
        let o = migrate(None, pid, &daemon.addr, &["--strategy", strategy]);
        assert!(o.status.success(), "{strategy}: {} (daemon: {})", stderr(&o), daemon.log());
        let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let new = stats["pids"][pid.to_string()].as_i64().unwrap() as i32;
        moved(&mut w, pid, new, 3);
        assert_eq!(creds_of(new), before, "{strategy}: the credentials of pid {new}");
        pid = new;
    }
    w.terminate_and_check(pid).unwrap();
}

#[test]
fn madvise_flags_locks_and_memory_policy_survive_every_strategy() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    // The --mm-flags areas (advice, mlock, lock on fault; THP disabled, MCL_FUTURE) go
    // through each strategy in turn; locked areas never wait for post-copy (they are
    // sent in the freeze, as the process expects their pages present), and shared
    // anonymous memory mapped twice comes back one object in two views. The process
    // keeps writing so that the rounds have dirty pages.
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    let mut w = Workload::spawn(&WorkloadOpts { threads: 1, mem_mib: 4, dirty_pages: 8, tick_ms: 5, mm_flags: true, shared_twice: true, ..Default::default() });
    w.wait_ticks(3);
    let mut pid = w.pid;
    for strategy in ["pre-copy", "post-copy", "hybrid", "stop-copy"] {
        let o = migrate(None, pid, &daemon.addr, &["--strategy", strategy]);
        assert!(o.status.success(), "{strategy}: {}", stderr(&o));
        let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(stats["strategy"], strategy, "{stats}");
        let new = stats["pids"][pid.to_string()].as_i64().unwrap() as i32;
        moved(&mut w, pid, new, 3);
        w.check_mm_flags(new).unwrap_or_else(|e| panic!("after {strategy}: {e}"));
        pid = new;
    }
    // Pre-copy again, its rounds tracked with page hashes (which read every page,
    // guard pages included, each round).
    let dir = tempfile::tempdir().unwrap();
    let config = precopy_config(dir.path(), "hash.json", r#"{"dirty_tracking": "page-hash"}"#);
    let (_, new) = precopy_stats(&migrate_with_config(&config, pid, &daemon.addr), pid, &daemon, &w);
    moved(&mut w, pid, new, 3);
    w.check_mm_flags(new).unwrap_or_else(|e| panic!("after pre-copy with page hashes: {e}"));
    pid = new;
    w.terminate_and_check(pid).unwrap();
}

#[test]
fn a_child_forked_during_postcopy_has_no_dontfork_area_and_a_wiped_wipeonfork_one() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    // Every 20 ms the process forks a child that checks its memory: the DONTFORK area
    // must be absent and the WIPEONFORK area zeros in it, even while the parent's pages
    // are still arriving (a child's missing pages are filled from the source: never
    // those of an area the child gets empty).
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 64, tick_ms: 1, fork_check: true, mm_flags: true, ..Default::default() });
    w.wait_ticks(25);
    let mut pid = w.pid;
    for strategy in ["post-copy", "hybrid"] {
        w.quiet_forks(pid);
        let o = migrate(None, pid, &daemon.addr, &["--strategy", strategy]);
        let (_, new) = lazy_stats(&o, pid, strategy, 64, &daemon);
        moved(&mut w, pid, new, 60);
        forks_checked_by(&w, new, strategy);
        pid = new;
    }
    w.terminate_and_check(pid).unwrap();
}

/// Threads of process `pid`.
fn threads_of(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn a_daemon_under_idle_and_slow_connections_still_serves_a_migration() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    // 1000 connections that say nothing and 200 that dribble a byte at a time once
    // held a thread each, forever. The door closes the oldest when 64 wait and any after
    // 5 s; a real migration meanwhile goes through.
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit fill and read one struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max.min(8192);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    let idle: Vec<std::net::TcpStream> = (0..1000).filter_map(|_| std::net::TcpStream::connect(&daemon.addr).ok()).collect();
    assert!(idle.len() >= 900, "only {} connections made", idle.len());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dribbler = {
        let (addr, stop) = (daemon.addr.clone(), stop.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut slow: Vec<std::net::TcpStream> = (0..200).filter_map(|_| std::net::TcpStream::connect(&addr).ok()).collect();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // A byte of a frame header each, never a whole message.
                slow.retain_mut(|s| s.write_all(&[0]).is_ok());
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 4, ..Default::default() });
    w.wait_ticks(3);
    let old = w.pid;
    let o = migrate(None, old, &daemon.addr, &[]);
    let new = new_pid(&o, old);
    // The daemon's threads stay bounded by the door, not by the crowd.
    let threads = threads_of(daemon.child.id() as i32);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    dribbler.join().unwrap();
    drop(idle);
    carries_on(&mut w, old, new, 3);
    assert!(threads < 64 + 32, "the daemon runs {threads} threads under the crowd");
    wait_until("the daemon to report the connections it closed", Duration::from_secs(30), || daemon.log().contains("did not shake hands in time or crowded the door"));
}

#[test]
fn a_daemon_answers_a_frame_it_will_not_read_and_hellos_that_name_no_event() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    use std::io::{Read, Write};
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    // The daemon's answer: a length, then a JSON refusal.
    let answer = |send: &[u8]| -> String {
        let mut s = std::net::TcpStream::connect(&daemon.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(send).unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        s.read_exact(&mut body).unwrap();
        String::from_utf8_lossy(&body).into_owned()
    };
    // Oversized: refused with the reason before the close (it was closed silently).
    let reply = answer(&(2u32 << 20).to_le_bytes());
    assert!(reply.contains("\"refused\"") && reply.contains("limit 1 MiB"), "{reply}");
    let reply = answer(b"GET / HTTP/1.1\r\n\r\n");
    assert!(reply.contains("not a ferry daemon"), "{reply}");
    // A hello with a strategy nobody knows and a pid that is no process: refused at once
    // (they were welcomed, then timed out).
    let hello = serde_json::json!({
        "type": "hello", "protocol": ferry::wire::protocol::PROTOCOL_VERSION, "arch": std::env::consts::ARCH, "page_size": 4096,
        "token": "0123456789abcdef0123456789abcdef", "request_id": 1, "pid": -1, "strategy": "teleport",
        "medium": {"name": "tcp", "version": "0.1.0"}, "subsystems": [], "features": []
    })
    .to_string();
    let mut frame = (hello.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(hello.as_bytes());
    let reply = answer(&frame);
    assert!(reply.contains("\"refused\"") && reply.contains("names no process (pid -1)"), "{reply}");
    // Each on its own: a strategy nobody knows, with a real pid; a token used before.
    let hello_with = |pid: i64, strategy: &str, token: &str| {
        let hello = serde_json::json!({
            "type": "hello", "protocol": 3, "arch": std::env::consts::ARCH, "page_size": 4096,
            "token": token, "request_id": 1, "pid": pid, "strategy": strategy,
            "medium": {"name": "tcp", "version": "0.1.0"}, "subsystems": [], "features": []
        })
        .to_string();
        let mut frame = (hello.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(hello.as_bytes());
        frame
    };
    let me = std::process::id() as i64;
    let reply = answer(&hello_with(me, "teleport", "11111111111111111111111111111111"));
    assert!(reply.contains("\"refused\"") && reply.contains("unknown strategy \\\"teleport\\\""), "{reply}");
    let token = "22222222222222222222222222222222";
    let reply = answer(&hello_with(me, "stop-copy", token));
    assert!(reply.contains("\"welcome\""), "{reply}");
    let reply = answer(&hello_with(me, "stop-copy", token));
    assert!(reply.contains("\"refused\"") && reply.contains("has already seen"), "{reply}");
}

#[test]
fn a_daemon_out_of_descriptors_backs_off_says_so_and_serves_again() {
    if !needs_root("raising and lowering another process's descriptor limit (prlimit)") {
        return;
    }
    use std::io::{Read, Write};
    // Out of fds, the accept loop once spun at 100% CPU with nothing in the log.
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    let pid = daemon.child.id().to_string();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft = limits.lines().find(|l| l.starts_with("Max open files")).and_then(|l| l.split_whitespace().nth(3)).unwrap().to_string();
    // The soft limit only: lowering the hard one could not be undone without CAP_SYS_RESOURCE.
    let st = Command::new("prlimit").args(["--pid", &pid, "--nofile=24:"]).status().unwrap();
    assert!(st.success(), "prlimit");
    let crowd: Vec<std::net::TcpStream> = (0..60).filter_map(|_| std::net::TcpStream::connect(&daemon.addr).ok()).collect();
    wait_until("the daemon to log that it backs off", Duration::from_secs(30), || daemon.log().contains("backing off"));
    // CPU time (user + system, in ticks) over one second while it cannot accept.
    let cpu = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let rest = stat.rsplit_once(')').unwrap().1.split_whitespace().collect::<Vec<_>>();
        rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap()
    };
    let before = cpu();
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu() - before;
    assert!(spent < 30, "the daemon spent {spent} ticks of CPU in one second out of descriptors");
    drop(crowd);
    let st = Command::new("prlimit").args(["--pid", &pid, &format!("--nofile={soft}:")]).status().unwrap();
    assert!(st.success(), "prlimit");
    // It answers again (a peer that is no ferry gets its refusal).
    let mut s = std::net::TcpStream::connect(&daemon.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert!(String::from_utf8_lossy(&reply).contains("not a ferry daemon"), "{}", String::from_utf8_lossy(&reply));
}

/// python3 with 1 GiB mapped private and anonymous of which it wrote only 4 MiB, and
/// which writes a fresh page of the rest every millisecond until SIGUSR1 (so, during
/// pre-copy's rounds and after hybrid's): then it checks every page it wrote, and
/// untouched ones between, and writes PASS or FAIL with the count of fresh pages.
const SPARSE_PY: &str = r#"
import mmap, os, signal, struct, sys, time
d, PAGE = sys.argv[1], 4096
m = mmap.mmap(-1, 1 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
import ctypes
open(d + '/addr', 'w').write(str(ctypes.addressof(ctypes.c_char.from_buffer(m))))
def page(i): return struct.pack('<Q', i + 1) * 512
for i in range(1024): m[i*PAGE:(i+1)*PAGE] = page(i)
touched, check = list(range(1024)), []
signal.signal(signal.SIGUSR1, lambda s, f: check.append(1))
open(d + '/ready', 'w').close()
nxt = 4096
while not check and nxt + 1 < (1 << 30) // PAGE:
    m[nxt*PAGE:(nxt+1)*PAGE] = page(nxt)
    touched.append(nxt)
    nxt += 37
    time.sleep(0.001)
while not check: time.sleep(0.01)
bad = [i for i in touched if m[i*PAGE:(i+1)*PAGE] != page(i)]
bad += [i for i in list(range(1024, 4096)) + [t + 1 for t in touched[1024:]] if m[i*PAGE:(i+1)*PAGE] != bytes(PAGE)]
with open(d + '/result.tmp', 'w') as f:
    f.write('FAIL page %d of %d\n' % (bad[0], len(bad)) if bad else 'PASS %d fresh\n' % (len(touched) - 1024))
os.rename(d + '/result.tmp', d + '/result')
time.sleep(3600)
"#;

/// Migrates a fresh [`SPARSE_PY`] to `daemon` with `strategy` (and config `config`),
/// has it check itself there (after breaking its first fresh page, with `break_page`);
/// answers the stats and what it said.
fn sparse_python_says(daemon: &Daemon, strategy: &str, config: Option<&Path>, break_page: bool) -> (serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new("/usr/bin/python3").args(["-c", SPARSE_PY]).arg(dir.path()).stdin(Stdio::null()).spawn().unwrap();
    let old = child.id() as i32;
    wait_until("python3 to be ready", Duration::from_secs(30), || dir.path().join("ready").exists());
    let mut cmd = Command::new(ferry_bin());
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let o = cmd.args(["migrate", &old.to_string(), "--to", &daemon.addr, "--json", "--strategy", strategy]).output().unwrap();
    if !o.status.success() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{strategy}: migrate failed: {}", stderr(&o));
    }
    let _ = child.wait();
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let new = stats["pids"][old.to_string()].as_i64().unwrap() as i32;
    if break_page {
        use std::os::unix::fs::FileExt;
        let addr: u64 = std::fs::read_to_string(dir.path().join("addr")).unwrap().trim().parse().unwrap();
        let mem = std::fs::OpenOptions::new().write(true).open(format!("/proc/{new}/mem")).unwrap();
        mem.write_all_at(&[0xff; 4096], addr + 4096 * 4096).unwrap();
    }
    ferry_tests::workload::send_signal(new, libc::SIGUSR1);
    let result = dir.path().join("result");
    let mut said = String::new();
    wait_until("python3's own check", Duration::from_secs(60), || {
        said = std::fs::read_to_string(&result).unwrap_or_default();
        !said.is_empty() || !pid_alive(new)
    });
    ferry_tests::workload::kill_pid(new);
    (stats, said)
}

/// [`sparse_python_says`], which must say PASS; answers the stats and how many fresh
/// pages it wrote.
fn migrate_sparse_python(daemon: &Daemon, strategy: &str, config: Option<&Path>) -> (serde_json::Value, u64) {
    let (stats, said) = sparse_python_says(daemon, strategy, config, false);
    assert!(said.starts_with("PASS"), "{strategy}: python3 after the migration says {said:?}: {stats}");
    let fresh = said.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap();
    (stats, fresh)
}

#[test]
fn a_sparse_python3_whose_fresh_page_is_broken_in_the_copy_says_so() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    // The check the test below relies on sees a fresh page that did not arrive.
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    let (stats, said) = sparse_python_says(&daemon, "stop-copy", None, true);
    assert!(said.starts_with("FAIL page 4096 "), "python3 with its first fresh page broken says {said:?}: {stats}");
}

#[test]
fn precopy_and_hybrid_of_a_large_untouched_mapping_send_only_its_pages_and_those_written_meanwhile() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    let (stop, _) = migrate_sparse_python(&daemon, "stop-copy", None);
    let reference = stop["bytes"].as_u64().unwrap();
    eprintln!("stop-copy: {reference} bytes");
    assert!(reference < 64 << 20, "stop-copy sends what python3 has, not its 1 GiB: {stop}");
    let check = Command::new(ferry_bin()).args(["check", "--json"]).output().unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&check.stdout).unwrap();
    let has = |name: &str| rows.iter().any(|r| r["name"] == name && r["present"] == true);
    let dir = tempfile::tempdir().unwrap();
    for tracking in ["userfaultfd", "page-hash", "soft-dirty"] {
        let present = match tracking {
            "userfaultfd" => has("userfaultfd-wp-async"),
            "soft-dirty" => has("soft-dirty"),
            _ => true,
        };
        if !present {
            eprintln!("this kernel lacks {tracking} tracking (ferry check): not run");
            continue;
        }
        let config = precopy_config(dir.path(), &format!("{tracking}.json"), &format!(r#"{{"dirty_tracking": "{tracking}"}}"#));
        for strategy in ["pre-copy", "hybrid"] {
            let (stats, fresh) = migrate_sparse_python(&daemon, strategy, Some(&config));
            eprintln!("{strategy} with {tracking}: {fresh} fresh pages, {stats}");
            let bytes = stats["bytes"].as_u64().unwrap();
            // What the rounds resend and the fresh pages written meanwhile, on top.
            let margin = (8 << 20) + fresh * 4096;
            assert!(bytes <= reference + margin, "{strategy} with {tracking} sends {bytes} bytes, stop-copy {reference}: {stats}");
            assert!(stats["rounds"].as_u64().unwrap_or(stats["round_bytes"].as_array().map_or(0, |r| r.len() as u64)) >= 2, "{stats}");
        }
    }
}

#[test]
fn a_hybrid_migration_with_no_page_left_to_follow_commits_once_and_the_source_goes() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") {
        return;
    }
    // python3 idle with 1 GiB mapped: with page hashes nothing is written between
    // hybrid's round and the freeze, and no page follows the resume. The source must
    // still hear that the destination's copy has it all, not take the connection's
    // end for a failure and carry on beside that copy.
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    let dir = tempfile::tempdir().unwrap();
    let config = precopy_config(dir.path(), "hash.json", r#"{"dirty_tracking": "page-hash"}"#);
    let script = "import mmap, os, signal, sys, time\nm = mmap.mmap(-1, 1 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n\
        go = []\nsignal.signal(signal.SIGUSR1, lambda s, f: go.append(1))\nopen(sys.argv[1] + '/ready', 'w').close()\n\
        while not go: time.sleep(0.01)\nopen(sys.argv[1] + '/result', 'w').write('PASS')\ntime.sleep(3600)\n";
    for _ in 0..3 {
        let _ = std::fs::remove_file(dir.path().join("ready"));
        let _ = std::fs::remove_file(dir.path().join("result"));
        let mut child = Command::new("/usr/bin/python3").args(["-c", script]).arg(dir.path()).stdin(Stdio::null()).spawn().unwrap();
        let old = child.id() as i32;
        wait_until("python3 to be ready", Duration::from_secs(30), || dir.path().join("ready").exists());
        let mut cmd = Command::new(ferry_bin());
        cmd.arg("--config").arg(&config).args(["migrate", &old.to_string(), "--to", &daemon.addr, "--json", "--strategy", "hybrid"]);
        let before = daemon.log().matches("committed as pid ").count();
        let o = cmd.output().unwrap();
        // This migration's copies only: an older one's pid may be another process's now.
        let copies: Vec<i32> = daemon.log().split("committed as pid ").skip(1 + before).filter_map(|t| t.split(',').next()?.parse().ok()).collect();
        if !o.status.success() {
            let _ = child.kill();
            let _ = child.wait();
            copies.iter().for_each(|&p| ferry_tests::workload::kill_pid(p));
            panic!("hybrid failed (the destination's copies {copies:?} were left running): {}", stderr(&o));
        }
        let _ = child.wait();
        let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let new = stats["pids"][old.to_string()].as_i64().unwrap() as i32;
        ferry_tests::workload::send_signal(new, libc::SIGUSR1);
        let result = dir.path().join("result");
        // Its answer whole: the file exists (opened) before PASS is in it, and a copy
        // killed in between left it empty (a race of this test's, ~1 run in 4 loaded).
        wait_until("the copy's answer", Duration::from_secs(30), || {
            std::fs::read_to_string(&result).is_ok_and(|r| !r.is_empty()) || !pid_alive(new)
        });
        ferry_tests::workload::kill_pid(new);
        assert_eq!(std::fs::read_to_string(&result).unwrap_or_default(), "PASS", "{stats}");
    }
}

/// Whether libfabric (with a provider that has RMA: its `tcp` one here) is installed.
fn have_libfabric() -> bool {
    needs(
        ["/usr/lib/x86_64-linux-gnu/libfabric.so.1", "/usr/lib/aarch64-linux-gnu/libfabric.so.1", "/usr/lib64/libfabric.so.1"]
            .iter()
            .any(|p| Path::new(p).exists()),
        "libfabric1 (scripts/setup installs it) for the rdma medium",
    )
}

/// A configuration file choosing libfabric's `tcp` provider and a small ring (so that
/// the credits go round many times), as a request would choose its medium's settings.
fn rdma_config(dir: &Path) -> PathBuf {
    let path = dir.join("rdma.json");
    std::fs::write(&path, r#"{"mechanism": {"medium_params": {"provider": "tcp", "ring": 4, "slot_kib": 256}}}"#).unwrap();
    path
}

/// The code path of an RDMA transfer — registration, keys, one-sided writes into the
/// peer's ring, credits, completions — between two hosts, on libfabric's tcp provider
/// (the speed of RDMA hardware is not what this shows). Every strategy, there and back,
/// post-copy's page requests among them, with a process that keeps writing.
#[test]
fn migrates_over_rdma_between_two_hosts_with_every_strategy() {
    if !needs_root("network namespaces and a veth pair")
        || !needs(Path::new("/usr/bin/ip").exists() || Path::new("/bin/ip").exists(), "iproute2 (`ip`) for the network namespaces")
        || !have_libfabric()
    {
        return;
    }
    let hosts = Hosts::new().expect("creating the network namespaces and the veth pair");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "the two test hosts share this key\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (k, config) = (key.to_str().unwrap(), rdma_config(dir.path()));
    let c = config.to_str().unwrap();
    let da = Daemon::start(Some(&hosts.a), "10.231.0.1", &["--auth-key", k]);
    let db = Daemon::start(Some(&hosts.b), "10.231.0.2", &["--auth-key", k]);
    let mut w = spawn_in(&hosts.a, &WorkloadOpts { threads: 2, mem_mib: 16, dirty_pages: 16, tick_ms: 5, ..Default::default() });
    w.wait_ticks(3);
    let (mut pid, mut on_a) = (w.pid, true);
    for strategy in ["stop-copy", "pre-copy", "post-copy", "hybrid"] {
        let (from, daemon) = if on_a { (&hosts.a, &db) } else { (&hosts.b, &da) };
        let o = migrate(Some(from), pid, &daemon.addr, &["--auth-key", k, "--strategy", strategy, "--medium", "rdma", "--config", c]);
        assert!(o.status.success(), "{strategy}: {}", stderr(&o));
        let event = daemon.counted(&o, 16 * 256 / 4);
        assert_eq!(event["medium"], "rdma", "{strategy}: {event}");
        let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(stats["strategy"], strategy, "{stats}");
        if strategy == "post-copy" {
            assert!(stats["pages_faulted"].as_u64().unwrap() + stats["pages_pushed"].as_u64().unwrap() > 0, "pages followed the resume: {stats}");
        }
        let new = stats["pids"][pid.to_string()].as_i64().unwrap() as i32;
        moved(&mut w, pid, new, 3);
        (pid, on_a) = (new, !on_a);
    }
    w.terminate_and_check(pid).unwrap();
}

/// A medium that cannot work on either side is refused in one line naming the process
/// and the medium, before anything is frozen: the source runs on and checks itself.
#[test]
fn rdma_without_a_provider_on_either_side_is_refused_before_the_freeze() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") || !have_libfabric() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = rdma_config(dir.path());
    let c = config.to_str().unwrap();
    let mut w = Workload::spawn(&WorkloadOpts { threads: 1, mem_mib: 4, ..Default::default() });
    w.wait_ticks(2);
    let pid = w.pid.to_string();

    // The source's libfabric offers nothing (FI_PROVIDER names a provider that is not there).
    let daemon = Daemon::start(None, "127.0.0.1", &[]);
    let o = Command::new(ferry_bin())
        .env("FI_PROVIDER", "no-such-provider")
        .args(["migrate", &pid, "--to", &daemon.addr, "--medium", "rdma", "--config", c])
        .output()
        .unwrap();
    eprintln!("source without a provider: {}", stderr(&o));
    fails(&o, &format!("process {pid}: the rdma medium cannot carry it"));
    assert!(stderr(&o).contains("no provider \"tcp\" with RMA"), "{}", stderr(&o));

    // The destination's does not, the source's does.
    let lacking = Daemon::start_envs(None, "127.0.0.1", &[], &[("FI_PROVIDER", "no-such-provider")]);
    let o = migrate(None, w.pid, &lacking.addr, &["--medium", "rdma", "--config", c]);
    eprintln!("destination without a provider: {}", stderr(&o));
    fails(&o, "the destination's rdma medium cannot work");
    // Settings for the rdma medium given to tcp, and a medium that carries no migration.
    fails(&migrate(None, w.pid, &daemon.addr, &["--config", c]), "the tcp medium takes none");
    fails(&migrate(None, w.pid, &daemon.addr, &["--medium", "file"]), "medium file cannot");
    still_fine(&mut w);

    // `plugins list` says so too, rather than a plain "registered".
    let rdma_row = |env: Option<&str>| {
        let mut cmd = Command::new(ferry_bin());
        if let Some(p) = env {
            cmd.env("FI_PROVIDER", p);
        }
        let o = cmd.args(["plugins", "list"]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).lines().find(|l| l.contains(" rdma ")).expect("an rdma row").to_string()
    };
    assert!(rdma_row(None).ends_with(" registered"), "{}", rdma_row(None));
    let row = rdma_row(Some("no-such-provider"));
    assert!(row.contains("registered (unavailable: libfabric finds no provider with RMA here (FI_PROVIDER=no-such-provider"), "{row}");
}

/// A destination killed at each phase of a migration over rdma: before the medium's
/// handshake, amid the pages (its ring half-written, credits owed) and before the
/// commit. The source fails in one line, without hanging, and runs on.
#[test]
fn a_daemon_killed_at_each_phase_over_rdma_leaves_the_source_running() {
    if !needs_root("a migration seizes the process and rebuilds it (ptrace, clone3 with set_tid, PR_SET_MM_MAP)") || !have_libfabric() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = rdma_config(dir.path());
    for fault in ["after-handshake", "mid-pages", "before-commit"] {
        let mut daemon = Daemon::start_env(None, "127.0.0.1", &[], Some(fault));
        let mut w = Workload::spawn(&WorkloadOpts { threads: 1, mem_mib: 8, ..Default::default() });
        w.wait_ticks(2);
        let started = std::time::Instant::now();
        let o = migrate(None, w.pid, &daemon.addr, &["--medium", "rdma", "--config", config.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1), "{fault}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{fault}: {}", stderr(&o));
        assert!(started.elapsed() < Duration::from_secs(8), "{fault}: the source noticed late ({:?}): {}", started.elapsed(), stderr(&o));
        let status = daemon.ended(&format!("{fault}: {}", stderr(&o)));
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL), "{fault}");
        let log = w.log.to_str().unwrap().to_string();
        wait_until("only the source to mention its log", Duration::from_secs(30), || processes_mentioning(&log) == vec![w.pid]);
        still_fine(&mut w);
    }
}
