//! With `--json`, a failure is a JSON object on standard output too —
//! `{"error": "...", "kind": "refused|failed|usage", "pid": …}` — with the exit code and
//! the one line on standard error unchanged: a script tells ferry declining (what the
//! process has, the request) from something breaking (a retry may go through) from a
//! wrong command line, without parsing messages.

use std::process::{Command, Output};

use ferry_tests::{
    ferry, ferry_bin, needs_root, stderr, stdout,
    workload::{pid_alive, Workload, WorkloadOpts},
};

/// The failure object of `o`: the only line on stdout; checks the exit code, and that
/// standard error says the same in one line (a usage error: clap's message and usage).
fn failure(o: &Output, code: i32, kind: &str) -> serde_json::Value {
    assert_eq!(o.status.code(), Some(code), "stdout: {} stderr: {}", stdout(o), stderr(o));
    let out = stdout(o);
    assert_eq!(out.lines().count(), 1, "one JSON line on stdout: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["error", "kind", "pid"], "{v}");
    assert_eq!(v["kind"], kind, "{v}");
    let error = v["error"].as_str().unwrap();
    assert!(!error.is_empty() && !error.contains('\n'), "{v}");
    if kind != "usage" {
        assert_eq!(stderr(o), format!("ferry: {error}\n"), "the same one line on stderr");
    } else {
        assert!(stderr(o).starts_with("error: "), "clap's message: {}", stderr(o));
    }
    v
}

#[test]
fn a_refusal_is_a_json_object_naming_the_process_which_runs_on() {
    if !needs_root("checkpointing a workload") {
        return;
    }
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 2, ..Default::default() });
    w.wait_ready();
    w.wait_ticks(1);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    let pid = w.pid.to_string();
    // Without the creds plugin the process could only come back as root: refused
    // before it is touched.
    let args = ["checkpoint", &pid, "--dir", dir.to_str().unwrap(), "--subsystems", "memory,threads,files,signals,process,seccomp", "--json"];
    let v = failure(&ferry(&args), 1, "refused");
    assert_eq!(v["pid"], w.pid, "{v}");
    let error = v["error"].as_str().unwrap();
    assert!(error.contains(&format!("process {pid}")) && error.contains("credentials"), "{v}");
    assert!(!dir.exists(), "a refused checkpoint writes nothing");
    // The same without --json: nothing on stdout.
    let o = ferry(&args[..args.len() - 1]);
    assert_eq!((o.status.code(), o.stdout.len()), (Some(1), 0), "{}", stdout(&o));
    assert!(pid_alive(w.pid));
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 2);
    w.terminate_and_check(w.pid).unwrap();
}

#[test]
fn a_failure_is_a_json_object_and_the_process_runs_on() {
    if !needs_root("migrating a workload") {
        return;
    }
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 2, ..Default::default() });
    w.wait_ready();
    w.wait_ticks(1);
    // A port nobody listens on any more: the connection is refused — a failure, which a
    // retry (once a daemon listens) may get through.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let to = format!("127.0.0.1:{port}");
    let pid = w.pid.to_string();
    let v = failure(&ferry(&["migrate", &pid, "--to", &to, "--json"]), 1, "failed");
    assert_eq!(v["pid"], w.pid, "{v}");
    assert!(v["error"].as_str().unwrap().contains(&format!("cannot reach a ferry daemon at {to}")), "{v}");
    assert!(pid_alive(w.pid));
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 2);
    w.terminate_and_check(w.pid).unwrap();
}

#[test]
fn a_usage_error_is_a_json_object_and_exits_2() {
    let v = failure(&ferry(&["checkpoint", "4321", "--dir", "/nonexistent/img", "--json", "--bogus"]), 2, "usage");
    assert_eq!(v["pid"], 4321, "{v}");
    assert!(v["error"].as_str().unwrap().contains("--bogus"), "{v}");
    let v = failure(&ferry(&["restore", "--json"]), 2, "usage");
    assert!(v["pid"].is_null(), "{v}");
    assert!(v["error"].as_str().unwrap().contains("--dir"), "{v}");
    let v = failure(&ferry(&["migrate", "12", "--to", "127.0.0.1:7711", "--strategy", "teleport", "--json"]), 2, "usage");
    assert!(v["error"].as_str().unwrap().contains("teleport"), "{v}");
    // Help is no error, and without --json a usage error prints nothing on stdout.
    let o = Command::new(ferry_bin()).args(["checkpoint", "--help", "--json"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).starts_with("Checkpoint"), "{}", stdout(&o));
    let o = ferry(&["checkpoint", "12", "--bogus"]);
    assert_eq!((o.status.code(), o.stdout.len()), (Some(2), 0));
    // A refusal that needs no process: an image directory that is not there.
    let v = failure(&ferry(&["restore", "--dir", "/nonexistent/img", "--json"]), 1, "refused");
    assert!(v["pid"].is_null() && v["error"].as_str().unwrap().contains("/nonexistent/img"), "{v}");
}
