//! Process trees over `ferry migrate`: a process and its children move in one event
//! between two hosts (network namespaces joined by a veth pair), each child rebuilt
//! as its restored parent's own, and each process passes its own check there. Before
//! the commit every failure leaves the whole source tree running as it was, with
//! nothing of the half-built copy left on the destination.

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use ferry_tests::{
    daemon::Daemon,
    fails_with, ferry_bin, hosts, hosts::Hosts, needs, needs_root, stderr, wait_until,
    workload::{kill_pid, pid_alive, processes_mentioning, send_signal, Workload, WorkloadOpts, DEADLINE},
};

const ROOT: &str = "a migration seizes the processes and rebuilds them (ptrace, clone3 with set_tid)";

/// The children of `pid` (its main thread's).
fn children_of(pid: i32) -> Vec<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mut kids: Vec<i32> = text.split_whitespace().filter_map(|p| p.parse().ok()).collect();
    kids.sort_unstable();
    kids
}

/// Kills every pid it holds when dropped.
struct KilledAll(Vec<i32>);
impl Drop for KilledAll {
    fn drop(&mut self) {
        for &p in &self.0 {
            kill_pid(p);
        }
    }
}

/// Two hosts with a daemon on each, sharing a key; None (skipped) without root or `ip`.
struct Link {
    hosts: Hosts,
    daemons: [Daemon; 2],
    key: tempfile::TempDir,
}

impl Link {
    fn new() -> Option<Link> {
        if !needs_root(ROOT) || !needs(Path::new("/usr/bin/ip").exists() || Path::new("/bin/ip").exists(), "iproute2 (`ip`) for the network namespaces") {
            return None;
        }
        let hosts = Hosts::new().expect("creating the network namespaces and the veth pair");
        let key = tempfile::tempdir().unwrap();
        let file = key.path().join("key");
        std::fs::write(&file, "the two test hosts share this key\n").unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let k = file.to_str().unwrap().to_string();
        let da = Daemon::start_in(Some(&hosts.a), hosts::A, &["--auth-key", &k], None);
        let db = Daemon::start_in(Some(&hosts.b), hosts::B, &["--auth-key", &k], None);
        Some(Link { hosts, daemons: [da, db], key })
    }

    /// `ferry migrate PID --strategy S --json [extra]` from host `a` (or `b`) to the other.
    fn migrate(&self, from_a: bool, pid: i32, strategy: &str, extra: &[&str]) -> Output {
        let (ns, to) = if from_a { (&self.hosts.a, &self.daemons[1].addr) } else { (&self.hosts.b, &self.daemons[0].addr) };
        let key = self.key.path().join("key");
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(ferry_bin())
            .args(["migrate", &pid.to_string(), "--to", to, "--json", "--strategy", strategy, "--auth-key"])
            .arg(&key)
            .args(extra)
            .output()
            .unwrap()
    }
}

/// The migration succeeded and moved exactly `old` (every process of the tree):
/// answers old pid → new pid. Every source process is gone.
fn moved(o: &Output, strategy: &str, old: &[i32]) -> BTreeMap<i32, i32> {
    assert!(o.status.success(), "{strategy}: {}", stderr(o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(stats["strategy"], strategy, "{stats}");
    let pids: BTreeMap<i32, i32> = stats["pids"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.parse().unwrap(), v.as_i64().unwrap() as i32))
        .collect();
    let mut want = old.to_vec();
    want.sort_unstable();
    assert_eq!(pids.keys().copied().collect::<Vec<_>>(), want, "the whole tree: {stats}");
    for &p in old {
        wait_until("the source process to be gone", DEADLINE, || !pid_alive(p));
    }
    pids
}

/// The workload with `--tree 2` moves there and back with `strategy`; each child is
/// its restored parent's own (the parent checks it every tick with `waitpid`, and
/// reaps each at the end), each child checks its own memory.
fn tree_there_and_back(link: &Link, strategy: &str, extra: &[&str]) {
    let mut w = Workload::spawn_in_netns(&link.hosts.a, &WorkloadOpts { mem_mib: 4, tick_ms: 5, tree: 2, ..Default::default() });
    w.wait_ready();
    let mut root = w.pid;
    let mut kids = children_of(root);
    assert_eq!(kids.len(), 2, "{kids:?}");
    let mut _copies = KilledAll(kids.clone());
    for from_a in [true, false] {
        let mut all = kids.clone();
        all.push(root);
        let o = link.migrate(from_a, root, strategy, extra);
        let pids = moved(&o, strategy, &all);
        if strategy == "post-copy" || strategy == "hybrid" {
            // The pages followed the resume (post-copy: every process's own 4 MiB among
            // them; hybrid: what its round left).
            let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let lazy = stats["pages_faulted"].as_u64().unwrap_or(0) + stats["pages_pushed"].as_u64().unwrap_or(0);
            let least = if strategy == "post-copy" { 3 * (4 << 20) / 4096 } else { 0 };
            assert!(stats["resumed_ms"].is_number() && lazy >= least, "{stats}");
        }
        if strategy == "pre-copy" {
            // Round 0 went while the tree ran: every process's own 4 MiB in it.
            let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let first = stats["round_bytes"][0].as_u64().unwrap_or(0);
            assert!(stats["rounds"].as_u64() >= Some(2) && first >= 3 * (4 << 20), "{stats}");
        }
        let new_root = pids[&root];
        w.adopt(new_root);
        let new_kids: Vec<i32> = kids.iter().map(|k| pids[k]).collect();
        _copies = KilledAll(new_kids.clone());
        let mut sorted = new_kids.clone();
        sorted.sort_unstable();
        assert_eq!(children_of(new_root), sorted, "{strategy}: the children are the new root's own");
        let at = *w.ticks().last().unwrap();
        w.wait_ticks(at + 5);
        (root, kids) = (new_root, sorted);
    }
    w.terminate_and_check(root).unwrap();
    assert!(w.lines().iter().any(|l| l == "tree 2 children passed"), "{strategy}: {}", w.log_text());
}

#[test]
fn a_tree_migrates_with_stop_copy_between_two_hosts_and_back() {
    let Some(link) = Link::new() else { return };
    tree_there_and_back(&link, "stop-copy", &[]);
}

#[test]
fn a_tree_migrates_with_pre_copy_between_two_hosts_and_back() {
    let Some(link) = Link::new() else { return };
    tree_there_and_back(&link, "pre-copy", &[]);
}

#[test]
fn a_tree_migrates_with_post_copy_between_two_hosts_and_back() {
    let Some(link) = Link::new() else { return };
    tree_there_and_back(&link, "post-copy", &[]);
}

#[test]
fn a_tree_migrates_with_hybrid_between_two_hosts_and_back() {
    let Some(link) = Link::new() else { return };
    tree_there_and_back(&link, "hybrid", &[]);
}

#[test]
fn a_tree_quiesced_by_the_cgroup_freezer_migrates_and_each_process_passes_its_check() {
    // Over loopback: `ip netns exec` mounts a sysfs of the namespace's own, without the
    // cgroup hierarchies, so no freezer is found in the test hosts.
    if !needs_root(ROOT) {
        return;
    }
    let daemon = Daemon::start();
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 4, tick_ms: 5, tree: 2, ..Default::default() });
    w.wait_ready();
    let kids = children_of(w.pid);
    let _originals = KilledAll(kids.clone());
    let mut all = kids.clone();
    all.push(w.pid);
    let o = Command::new(ferry_bin())
        .args(["migrate", &w.pid.to_string(), "--to", &daemon.addr, "--json", "--quiesce", "freezer"])
        .output()
        .unwrap();
    let pids = moved(&o, "stop-copy", &all);
    let new_root = pids[&w.pid];
    w.adopt(new_root);
    let mut new_kids: Vec<i32> = kids.iter().map(|k| pids[k]).collect();
    let _copies = KilledAll(new_kids.clone());
    new_kids.sort_unstable();
    assert_eq!(children_of(new_root), new_kids, "the children are the new root's own");
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 5);
    w.terminate_and_check(new_root).unwrap();
    assert!(w.lines().iter().any(|l| l == "tree 2 children passed"), "{}", w.log_text());
}

#[test]
fn bash_with_a_background_job_migrates_and_its_wait_still_waits_for_it() {
    let Some(link) = Link::new() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("waited");
    let script = format!(r#"sleep 1000 2>/dev/null & wait $!; echo "waited $?" >{}"#, out.display());
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &link.hosts.a, "/bin/bash", "-c", &script]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // Nothing but its stdio: fds this test inherited would be shared with the job.
    // SAFETY: close_range is async-signal-safe; it only marks fds close-on-exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
            Ok(())
        });
    }
    let mut bash = cmd.spawn().unwrap();
    let pid = bash.id() as i32;
    let _source = KilledAll(vec![pid]);
    let mut sleep = 0;
    wait_until("bash's sleep", DEADLINE, || {
        sleep = children_of(pid).first().copied().unwrap_or(0);
        sleep > 0 && std::fs::read_to_string(format!("/proc/{sleep}/comm")).is_ok_and(|c| c.trim() == "sleep")
    });
    let _sleep = KilledAll(vec![sleep]);
    let pids = moved(&link.migrate(true, pid, "stop-copy", &[]), "stop-copy", &[pid, sleep]);
    let _ = bash.wait();
    let (new_bash, new_sleep) = (pids[&pid], pids[&sleep]);
    let _copies = KilledAll(vec![new_bash, new_sleep]);
    assert_eq!(children_of(new_bash), vec![new_sleep], "the sleep is the new bash's own");
    assert!(!out.exists(), "bash still waits");
    // Its job ends, and only then does bash's `wait $!` return: it waited in the kernel
    // for a child of its own (without one, it would have answered at once). Across one
    // machine the copies cannot have the source's pids back (the source holds them until
    // the commit): bash knows its job by the old pid, and its wait answers -1, not the
    // job's 143, which a restore that gives the pids back does answer (trees.rs).
    assert!(send_signal(new_sleep, libc::SIGTERM));
    wait_until("bash to write what its wait returned", DEADLINE, || std::fs::read_to_string(&out).is_ok_and(|t| t.ends_with('\n')));
    let said = std::fs::read_to_string(&out).unwrap();
    let want = if new_sleep == sleep { "waited 143\n" } else { "waited -1\n" };
    assert_eq!(said, want, "the sleep {sleep} came back as {new_sleep}");
    wait_until("the migrated bash to exit", DEADLINE, || !pid_alive(new_bash));
}

#[test]
fn a_tree_whose_destination_dies_before_the_commit_runs_on_whole_with_nothing_left() {
    // (After the commit point of a post-copy, see
    // a_tree_whose_destination_dies_after_its_copies_ran_is_lost_whole_and_said_so.)
    if !needs_root(ROOT) {
        return;
    }
    let cgroups = |pids: &[i32]| -> Vec<String> { pids.iter().map(|p| std::fs::read_to_string(format!("/proc/{p}/cgroup")).unwrap_or_default()).collect() };
    let runs = [
        ("mid-pages", "ptrace", "stop-copy"),
        ("before-commit", "ptrace", "stop-copy"),
        ("mid-pages", "freezer", "stop-copy"),
        ("before-commit", "freezer", "stop-copy"),
        // During the rounds, the tree running.
        ("mid-pages", "ptrace", "pre-copy"),
        ("before-commit", "freezer", "pre-copy"),
        ("before-commit", "ptrace", "post-copy"),
        ("before-commit", "ptrace", "hybrid"),
    ];
    for (fault, quiesce, strategy) in runs {
        let fault_quiesce = format!("{fault}, {quiesce}, {strategy}");
        let fault = fault_quiesce.as_str();
        let daemon = Daemon::start_with(&[], Some(fault_quiesce.split(',').next().unwrap()));
        let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 4, tick_ms: 5, tree: 2, ..Default::default() });
        w.wait_ready();
        let kids = children_of(w.pid);
        let _kids = KilledAll(kids.clone());
        let mut all = kids.clone();
        all.push(w.pid);
        let homes = cgroups(&all);
        let o = Command::new(ferry_bin())
            .args(["migrate", &w.pid.to_string(), "--to", &daemon.addr, "--json", "--quiesce", quiesce, "--strategy", strategy])
            .output()
            .unwrap();
        fails_with(&o, &[]);
        wait_until("the daemon to die at its fault point", Duration::from_secs(30), || !pid_alive(daemon.pid()));
        // Nothing of the half-built copy survives its daemon: only the source tree
        // mentions the workload's log.
        let log = w.log.to_str().unwrap().to_string();
        let mut sorted = all.clone();
        sorted.sort_unstable();
        wait_until("only the source tree to mention its log", Duration::from_secs(30), || processes_mentioning(&log) == sorted);
        ferry_tests::assert_no_residue(&all, None);
        assert_eq!(children_of(w.pid), kids, "{fault}: the same children, the root's own");
        assert_eq!(cgroups(&all), homes, "{fault}: every process back in its own cgroup");
        let at = *w.ticks().last().unwrap();
        w.wait_ticks(at + 5);
        let pid = w.pid;
        w.terminate_and_check(pid).unwrap();
        assert!(w.lines().iter().any(|l| l == "tree 2 children passed"), "{fault}: {}", w.log_text());
    }
}

#[test]
fn a_tree_whose_destination_dies_after_its_copies_ran_is_lost_whole_and_said_so() {
    if !needs_root(ROOT) {
        return;
    }
    // The copies ran (their pages on their way) and died with their daemon: the source
    // tree, whose effects they had, must not run on (it would repeat them). Every
    // process is gone, and the one line says the tree was lost.
    let daemon = Daemon::start_with(&[], Some("post-copy-dest-mid"));
    let w = Workload::spawn(&WorkloadOpts { mem_mib: 4, tick_ms: 5, tree: 2, ..Default::default() });
    w.wait_ready();
    let kids = children_of(w.pid);
    let _kids = KilledAll(kids.clone());
    let mut all = kids.clone();
    all.push(w.pid);
    let o = Command::new(ferry_bin())
        .args(["migrate", &w.pid.to_string(), "--to", &daemon.addr, "--json", "--strategy", "post-copy"])
        .output()
        .unwrap();
    fails_with(&o, &[&format!("the tree of process {} was lost", w.pid), "post-copy cannot roll back"]);
    wait_until("the daemon to die at its fault point", Duration::from_secs(30), || !pid_alive(daemon.pid()));
    let log = w.log.to_str().unwrap().to_string();
    wait_until("no process of the tree anywhere", Duration::from_secs(30), || processes_mentioning(&log).is_empty());
    ferry_tests::assert_no_residue(&all, None);
}
