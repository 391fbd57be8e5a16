//! Processes with children. ferry does not carry process trees yet: a checkpoint or a
//! migration of a process that has a child (running, stopped or a zombie) is refused
//! with one line naming both, before the process is touched — or, for a child forked
//! between that look and the freeze, once it is frozen, the process then let go as it
//! was. Never a success that leaves the child behind.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
};

use ferry_tests::{
    ferry, ferry_bin, needs_root, stderr, wait_until,
    workload::{kill_pid, pid_alive, send_signal, Workload, WorkloadOpts, DEADLINE},
};

const ROOT: &str = "a checkpoint seizes the process (ptrace of any process)";

/// The children of `pid` (its main thread's).
fn children_of(pid: i32) -> Vec<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    text.split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// The state letter of `pid` (field 3 of its stat).
fn state(pid: i32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    text.rsplit_once(") ").map(|(_, rest)| rest[..1].to_string()).unwrap_or_default()
}

/// `/proc/PID/status`'s TracerPid: 0 once ferry let the process go.
fn tracer_of(pid: i32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix("TracerPid:")).unwrap_or("?").trim().to_string()
}

/// Kills a process by pid when dropped (and reaps it, when it is ours).
struct Killed(i32, Option<std::process::Child>);
impl Drop for Killed {
    fn drop(&mut self) {
        if self.0 > 0 {
            kill_pid(self.0);
        }
        if let Some(c) = self.1.as_mut() {
            let _ = c.wait();
        }
    }
}

/// The request was refused with one line naming `pid` and its child `child`, and
/// wrote no image.
fn refused_for_child(o: &Output, pid: i32, child: i32, dir: &Path) -> String {
    let err = stderr(o);
    assert!(!o.status.success(), "a process with a child must be refused: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    let named = format!("process {pid} has a child {child} (");
    assert!(err.contains(&named) && err.contains("process trees are not carried yet"), "want `{named}…`: {err}");
    assert!(!dir.exists(), "a refused checkpoint writes nothing");
    err
}

/// `ferry migrate PID` to a port where nothing listens: refused for the child before
/// anything else is tried (it would otherwise say the daemon cannot be reached).
fn migrate_nowhere(pid: i32) -> Output {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    ferry(&["migrate", &pid.to_string(), "--to", &format!("127.0.0.1:{port}")])
}

/// Holds a child of the workload's fork check stopped, so that one surely exists.
fn hold_a_fork_check_child(w: &Workload) -> Killed {
    let mut child = Killed(0, None);
    wait_until("a fork-check child held stopped", DEADLINE, || {
        child.0 = children_of(w.pid).first().copied().unwrap_or(0);
        // Seen stopped: not a zombie its parent is about to reap (then the next child).
        if child.0 == 0 || state(child.0) == "T" {
            return child.0 > 0;
        }
        send_signal(child.0, libc::SIGSTOP);
        false
    });
    child
}

/// The workload runs on as it was: untraced, not stopped, ticking; its held child,
/// let go, finishes its check and is reaped (`fork-check ok`); and it passes its own
/// check at the end.
fn runs_on_with_its_child(mut w: Workload, mut child: Killed) {
    let pid = w.pid;
    assert_eq!(tracer_of(pid), "0", "let go by ferry");
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 5);
    let checks = w.fork_checks(pid);
    assert!(send_signal(child.0, libc::SIGCONT));
    w.wait_for("the held child's check, reaped by its parent", |w| w.fork_checks(pid) > checks);
    child.0 = 0;
    w.terminate_and_check(pid).unwrap();
}

#[test]
fn a_process_with_a_stopped_child_is_refused_naming_it_and_both_run_on() {
    if !needs_root(ROOT) {
        return;
    }
    let w = Workload::spawn(&WorkloadOpts { mem_mib: 4, tick_ms: 1, fork_check: true, files: false, ..Default::default() });
    w.wait_ready();
    let child = hold_a_fork_check_child(&w);
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let o = ferry(&["checkpoint", &w.pid.to_string(), "--dir", dir.to_str().unwrap()]);
    let err = refused_for_child(&o, w.pid, child.0, &dir);
    assert!(err.contains(", stopped)"), "the child's state: {err}");
    let o = migrate_nowhere(w.pid);
    refused_for_child(&o, w.pid, child.0, &dir);
    assert_eq!(state(child.0), "T", "the child is left as it was");
    runs_on_with_its_child(w, child);
}

#[test]
fn a_child_forked_between_the_check_and_the_freeze_is_seen_frozen_and_the_process_let_go() {
    if !needs_root(ROOT) {
        return;
    }
    // ferry looks for children, then pauses (FERRY_PAUSE) before the freeze; meanwhile
    // the workload forks a child (held stopped). The look again once frozen sees it.
    let w = Workload::spawn(&WorkloadOpts { mem_mib: 4, tick_ms: 1, fork_check: true, files: false, ..Default::default() });
    w.wait_ready();
    w.quiet_forks(w.pid);
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let pause = image.path().join("paused");
    let run = Command::new(ferry_bin())
        .args(["checkpoint", &w.pid.to_string(), "--dir", dir.to_str().unwrap()])
        .env("FERRY_PAUSE", format!("checkpoint-checked:{}", pause.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ferry_run = Killed(run.id() as i32, None);
    wait_until("ferry to pause after its look for children", DEADLINE, || pause.exists());
    // A second SIGHUP: the fork check resumes, forking at its next tick.
    assert!(send_signal(w.pid, libc::SIGHUP));
    let child = hold_a_fork_check_child(&w);
    std::fs::remove_file(&pause).unwrap();
    ferry_run.0 = 0;
    let o = run.wait_with_output().unwrap();
    refused_for_child(&o, w.pid, child.0, &dir);
    assert!(pid_alive(child.0) && state(child.0) == "T", "the child is left as it was");
    runs_on_with_its_child(w, child);
}

#[test]
fn bash_with_a_background_sleep_is_refused_and_both_keep_running() {
    if !needs_root(ROOT) {
        return;
    }
    let bash = Command::new("/bin/bash").args(["-c", "sleep 1000 & wait"]).stdin(Stdio::null()).spawn().unwrap();
    let mut bash = Killed(bash.id() as i32, Some(bash));
    let pid = bash.0;
    let mut sleep = Killed(0, None);
    wait_until("bash's sleep", DEADLINE, || {
        sleep.0 = children_of(pid).first().copied().unwrap_or(0);
        sleep.0 > 0 && std::fs::read_to_string(format!("/proc/{}/comm", sleep.0)).is_ok_and(|c| c.trim() == "sleep")
    });
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let o = ferry(&["checkpoint", &pid.to_string(), "--dir", dir.to_str().unwrap()]);
    let err = refused_for_child(&o, pid, sleep.0, &dir);
    assert!(err.contains(&format!("has a child {} (sleep)", sleep.0)), "{err}");
    let o = migrate_nowhere(pid);
    refused_for_child(&o, pid, sleep.0, &dir);
    // Both intact: bash still the parent of its sleep, waiting for it, untraced.
    assert!(pid_alive(pid) && pid_alive(sleep.0), "bash {pid} and its sleep {}", sleep.0);
    assert_eq!(children_of(pid), vec![sleep.0]);
    assert_eq!(tracer_of(pid), "0");
    // And its `wait` works: the sleep killed, bash returns from it and exits.
    kill_pid(sleep.0);
    sleep.0 = 0;
    let status = bash.1.as_mut().unwrap().wait().unwrap();
    bash.0 = 0;
    assert!(status.success(), "bash after its wait: {status:?}");
}

#[test]
fn a_process_with_a_zombie_child_is_refused_naming_it() {
    if !needs_root(ROOT) {
        return;
    }
    // The child exits at once and is never reaped: a zombie is a child too (its exit
    // status is the parent's to collect).
    let script = "import os, time\nif os.fork() == 0:\n    os._exit(3)\ntime.sleep(1000)\n";
    let py = Command::new("/usr/bin/python3").args(["-c", script]).stdin(Stdio::null()).spawn().unwrap();
    let py = Killed(py.id() as i32, Some(py));
    let mut zombie = 0;
    wait_until("python's child to be a zombie", DEADLINE, || {
        zombie = children_of(py.0).first().copied().unwrap_or(0);
        zombie > 0 && state(zombie) == "Z"
    });
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let o = ferry(&["checkpoint", &py.0.to_string(), "--dir", dir.to_str().unwrap()]);
    let err = refused_for_child(&o, py.0, zombie, &dir);
    assert!(err.contains(", a zombie)"), "{err}");
    assert_eq!(children_of(py.0), vec![zombie], "the zombie is left for its parent");
    assert_eq!(tracer_of(py.0), "0");
}
