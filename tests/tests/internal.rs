//! The internal execution context (`--context internal`): the calls plugins make in the
//! process go through an agent running on its main thread. These tests prove the agent
//! did the work, that it leaves nothing behind in a process that carries on (no fd, no
//! mapping, the same signal mask), and that the process survives ferry's death while
//! the agent waits in it. (`scripts/test` also runs the checkpoint, migration and fault
//! tests with `FERRY_TEST_CONTEXT=internal`.)

use std::process::Command;

use ferry_tests::{
    ferry, ferry_bin, needs_root, residue::assert_no_residue, stderr,
    workload::{Workload, WorkloadOpts},
};

const ROOT: &str = "a checkpoint seizes the process (ptrace of other users, pidfd_getfd)";

/// What `/proc/PID/status` says of `key` (`SigBlk:` …).
fn status(pid: i32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("no {key}")).trim().to_string()
}

fn fds(pid: i32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

fn maps(pid: i32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap().lines().map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" ")).collect()
}

/// The agent's account of itself in a `FERRY_TRACE` run: (calls, batches).
fn agent_calls(trace: &str) -> (u64, u64) {
    let line = trace.lines().find(|l| l.contains("agent on thread")).unwrap_or_else(|| panic!("no agent at work in:\n{trace}"));
    let words: Vec<&str> = line.split_whitespace().map(|w| w.trim_end_matches(',')).collect();
    let at = |w: &str| words[words.iter().position(|x| *x == w).unwrap() - 1].parse::<u64>().unwrap();
    (at("calls"), at("batches"))
}

#[test]
fn the_agent_makes_the_calls_and_a_process_left_running_has_nothing_of_it() {
    if !needs_root(ROOT) {
        return;
    }
    let mut w = Workload::spawn(&WorkloadOpts { threads: 2, mem_mib: 4, event_fds: true, ..Default::default() });
    w.wait_ready();
    w.wait_ticks(2);
    let pid = w.pid;
    let (fds_before, maps_before, mask_before) = (fds(pid), maps(pid), status(pid, "SigBlk:"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    let o = Command::new(ferry_bin())
        .args(["checkpoint", &pid.to_string(), "--dir", dir.to_str().unwrap(), "--leave-running", "--context", "internal"])
        .env("FERRY_TRACE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let (calls, batches) = agent_calls(&stderr(&o));
    assert!(calls >= 10 && batches >= 1, "the agent made {calls} calls");
    // The process runs on as it was: the agent's fd, its code and its mask are gone.
    assert_eq!(fds(pid), fds_before);
    assert_eq!(maps(pid), maps_before);
    assert_eq!(status(pid, "SigBlk:"), mask_before);
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 2);
    // And the image (taken with the agent's socket open) has no fd of ferry's: its copy
    // has the original's fds exactly, and passes its checks.
    ferry_tests::workload::kill_pid(pid);
    ferry_tests::wait_until("the original gone", std::time::Duration::from_secs(30), || !ferry_tests::workload::pid_alive(pid));
    let o = ferry(&["restore", "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let new = stats["pids"][pid.to_string()].as_i64().unwrap() as i32;
    w.adopt(new);
    assert_eq!(fds(new), fds_before);
    // (Its ticks go on from the image's, which the original logged too after it was
    // let go: its own verdict is the check.)
    let before = w.lines().len();
    ferry_tests::workload::send_signal(new, libc::SIGTERM);
    ferry_tests::wait_until("the copy's verdict", std::time::Duration::from_secs(60), || {
        w.lines()[before..].iter().any(|l| l == "PASS" || l.starts_with("FAIL"))
    });
    assert!(w.lines()[before..].iter().any(|l| l == "PASS"), "{}", w.log_text());
}

#[test]
fn ferry_killed_while_its_agent_waits_in_the_process_leaves_it_running_as_it_was() {
    if !needs_root(ROOT) {
        return;
    }
    let mut w = Workload::spawn(&WorkloadOpts { threads: 2, mem_mib: 4, ..Default::default() });
    w.wait_ready();
    w.wait_ticks(2);
    let pid = w.pid;
    let (fds_before, mask_before) = (fds(pid), status(pid, "SigBlk:"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    // Held after the memory plugin, whose calls started the agent: it waits for the
    // next batch in the process's main thread.
    let mut child = Command::new(ferry_bin())
        .args(["checkpoint", &pid.to_string(), "--dir", dir.to_str().unwrap(), "--context", "internal"])
        .env("FERRY_FAULT", "hang:checkpoint-mid")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    ferry_tests::wait_until("the agent waiting in the process", std::time::Duration::from_secs(30), || {
        fds(pid).len() == fds_before.len() + 1
            && std::fs::read_to_string(format!("/proc/{pid}/wchan")).is_ok_and(|w| w.contains("skb") || w.contains("wait"))
    });
    child.kill().unwrap();
    child.wait().unwrap();
    // The agent saw ferry's end close: it closed its own and gave the thread back.
    ferry_tests::wait_until("the agent gone", std::time::Duration::from_secs(30), || fds(pid) == fds_before);
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 3);
    assert_eq!(status(pid, "SigBlk:"), mask_before);
    assert_no_residue(&[pid], None);
    w.terminate_and_check(pid).unwrap();
}
