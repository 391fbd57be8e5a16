//! Processes under seccomp filters: carried through checkpoint/restore and every
//! migration strategy with their filters (stacked, one shared by every thread with
//! TSYNC, one of the main thread alone), never killed by a filter that forbids a call
//! ferry injects, and refused in one line, left running, where they cannot be carried.
//!
//! The `--seccomp` workload's filters kill the process for an executable `mmap` (ferry's
//! scratch area) and for `prctl(PR_GET_SECUREBITS)` (the creds plugin's checkpoint),
//! turn `getppid` into EPERM and `getsid` into EACCES, and it checks all that from
//! inside, with TSYNC working again, before its PASS.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use ferry_tests::{
    daemon::Daemon,
    ferry, ferry_bin, needs_root, stderr, wait_until,
    workload::{pid_alive, Workload, WorkloadOpts},
};


fn opts() -> WorkloadOpts {
    WorkloadOpts { threads: 2, files: false, seccomp: true, mem_mib: 2, dirty_pages: 2, ..Default::default() }
}

/// Each thread's `Seccomp` and `Seccomp_filters`, sorted (tids may change).
fn filters_of(pid: i32) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/task: {e}"))
        .map(|t| {
            let status = std::fs::read_to_string(t.expect("a task").path().join("status")).unwrap_or_default();
            let field = |k: &str| ferry_plugin_api::util::proc_field(&status, k).unwrap_or("?").to_string();
            (field("Seccomp"), field("Seccomp_filters"))
        })
        .collect();
    v.sort();
    v
}

/// What the `--seccomp` workload with two threads has: the main thread both filters,
/// the others the shared one.
fn stacked() -> Vec<(String, String)> {
    let t = |n: &str| ("2".to_string(), n.to_string());
    vec![t("1"), t("1"), t("2")]
}

fn fails_with(o: &std::process::Output, needle: &str) {
    assert_eq!(o.status.code(), Some(1), "expected failure, stderr: {}", stderr(o));
    let err = stderr(o);
    assert_eq!(err.lines().count(), 1, "one line expected: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

/// The source ran on and passes its own check (its filters too).
fn still_fine(w: &mut Workload) {
    assert!(pid_alive(w.pid), "the source died: {}", w.log_text());
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 2);
    let pid = w.pid;
    w.terminate_and_check(pid).unwrap();
}

#[test]
fn a_checkpoint_meets_none_of_the_filters_and_the_restored_process_has_them_all() {
    if !needs_root("checkpoint, restore and migration of a process under seccomp (ptrace, PR_SET_MM_MAP, clone3 set_tid)") {
        return;
    }
    let mut w = Workload::spawn(&opts());
    w.wait_ticks(2);
    assert_eq!(filters_of(w.pid), stacked());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    // Left running: every injected call of the checkpoint (the scratch area's
    // executable mmap, the creds plugin's prctls) would have killed it.
    let o = ferry(&["checkpoint", &w.pid.to_string(), "--dir", dir.to_str().unwrap(), "--leave-running"]);
    assert!(o.status.success(), "checkpoint failed: {}", stderr(&o));
    let shown = ferry(&["show", dir.to_str().unwrap(), "--json"]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("seccomp"), "the image has no seccomp record");
    still_fine(&mut w);

    // Checkpointed for good and restored: both filters, the first shared by every thread.
    let mut w = Workload::spawn(&opts());
    w.wait_ticks(2);
    let old = w.pid;
    let dir = tmp.path().join("img2");
    let o = ferry(&["checkpoint", &old.to_string(), "--dir", dir.to_str().unwrap()]);
    assert!(o.status.success(), "checkpoint failed: {}", stderr(&o));
    w.reap();
    let o = ferry(&["restore", "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "restore failed: {}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let new = stats["pids"][old.to_string()].as_i64().unwrap() as i32;
    w.adopt(new);
    assert_eq!(filters_of(new), stacked(), "the restored process's filters");
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 3);
    w.terminate_and_check(new).unwrap();
}

#[test]
fn a_request_without_the_seccomp_plugin_or_a_process_in_strict_mode_is_refused_and_left_running() {
    if !needs_root("checkpoint, restore and migration of a process under seccomp (ptrace, PR_SET_MM_MAP, clone3 set_tid)") {
        return;
    }
    // Its copy would run without its sandbox.
    let mut w = Workload::spawn(&WorkloadOpts { threads: 0, ..opts() });
    w.wait_ticks(1);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    let o = ferry(&[
        "checkpoint",
        &w.pid.to_string(),
        "--dir",
        dir.to_str().unwrap(),
        "--subsystems",
        "memory,threads,files,signals,process,creds",
    ]);
    fails_with(&o, "its seccomp filters (it would run without its sandbox), which no subsystem of the request");
    assert!(!dir.exists(), "a refused checkpoint writes nothing");
    still_fine(&mut w);

    // Strict mode: python blocks in read(2), one of the four calls it still may make.
    let mut py = Command::new("python3")
        .args(["-c", "import ctypes, os\nlibc = ctypes.CDLL(None)\nos.write(1, b'in\\n')\nlibc.prctl(22, 1, 0, 0, 0)\nos.write(1, b'strict\\n')\nos.read(0, 1)\n"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = py.id() as i32;
    wait_until("python in strict mode", Duration::from_secs(30), || {
        std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| s.contains("Seccomp:\t1"))
    });
    let o = ferry(&["checkpoint", &pid.to_string(), "--dir", tmp.path().join("strict").to_str().unwrap()]);
    fails_with(&o, "under seccomp strict mode");
    assert!(pid_alive(pid), "the strict-mode process died");
    let _ = py.kill();
    let _ = py.wait();
}

/// Runs `ferry` with `args` under a seccomp filter of its own (allow everything): the
/// kernel then refuses it PTRACE_O_SUSPEND_SECCOMP, as one without
/// CONFIG_CHECKPOINT_RESTORE or CAP_SYS_ADMIN would.
fn ferry_under_seccomp(args: &[&str]) -> std::process::Output {
    const WRAP: &str = r#"
import ctypes, os, struct, sys
insn = struct.pack('<HBBI', 0x06, 0, 0, 0x7fff0000)
buf = ctypes.create_string_buffer(insn)
class Prog(ctypes.Structure):
    _fields_ = [('len', ctypes.c_ushort), ('filter', ctypes.c_void_p)]
prog = Prog(1, ctypes.addressof(buf))
if ctypes.CDLL(None, use_errno=True).prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:
    sys.exit('seccomp: errno %d' % ctypes.get_errno())
os.execv(sys.argv[1], sys.argv[1:])
"#;
    Command::new("python3").args(["-c", WRAP]).arg(ferry_bin()).args(args).output().unwrap()
}

#[test]
fn without_suspending_the_filters_ferry_refuses_before_touching_the_process() {
    if !needs_root("checkpoint, restore and migration of a process under seccomp (ptrace, PR_SET_MM_MAP, clone3 set_tid)") {
        return;
    }
    let mut w = Workload::spawn(&opts());
    w.wait_ticks(1);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    let o = ferry_under_seccomp(&["checkpoint", &w.pid.to_string(), "--dir", dir.to_str().unwrap()]);
    fails_with(&o, "does not let ferry suspend its filters");
    assert!(!dir.exists(), "a refused checkpoint writes nothing");
    // A restore: its restore child, a fork of ferry, would keep ferry's own filters.
    let o = ferry(&["checkpoint", &w.pid.to_string(), "--dir", dir.to_str().unwrap(), "--leave-running"]);
    assert!(o.status.success(), "checkpoint failed: {}", stderr(&o));
    let o = ferry_under_seccomp(&["restore", "--dir", dir.to_str().unwrap()]);
    fails_with(&o, "the restore child inherited the seccomp filters ferry itself runs under");
    still_fine(&mut w);
}

#[test]
fn seccomp_filters_survive_every_strategy() {
    if !needs_root("checkpoint, restore and migration of a process under seccomp (ptrace, PR_SET_MM_MAP, clone3 set_tid)") {
        return;
    }
    // Post-copy and hybrid resume the copy under its filters while its memory still
    // arrives: ferry serves the faults from its own side, nothing is injected then.
    let daemon = Daemon::start();
    let mut w = Workload::spawn(&opts());
    w.wait_ticks(2);
    let mut pid = w.pid;
    for strategy in ["stop-copy", "pre-copy", "post-copy", "hybrid"] {
        let o = Command::new(ferry_bin())
            .args(["migrate", &pid.to_string(), "--to", &daemon.addr, "--json", "--strategy", strategy])
            .output()
            .unwrap();
        assert!(o.status.success(), "{strategy}: {} (daemon: {})", stderr(&o), daemon.log());
        let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(stats["strategy"], strategy, "{stats}");
        let new = stats["pids"][pid.to_string()].as_i64().unwrap() as i32;
        wait_until("the source to be gone", Duration::from_secs(30), || !pid_alive(pid));
        w.adopt(new);
        assert_eq!(filters_of(new), stacked(), "{strategy}: the filters of pid {new}");
        let at = *w.ticks().last().unwrap();
        w.wait_ticks(at + 3);
        pid = new;
    }
    w.terminate_and_check(pid).unwrap();
}

/// A python3 program that sandboxes itself as unprivileged programs do (no_new_privs,
/// then a filter by prctl): `getppid` answers -1 (EPERM) from then on, logged each tick.
const SANDBOXED_PY: &str = r#"
import ctypes, os, struct, sys, time
log = open(sys.argv[1], 'a', buffering=1)
def insn(code, jt, jf, k): return struct.pack('<HBBI', code, jt, jf, k)
prog = insn(0x20, 0, 0, 0) + insn(0x15, 0, 1, 110) + insn(0x06, 0, 0, 0x00050001) + insn(0x06, 0, 0, 0x7fff0000)
buf = ctypes.create_string_buffer(prog)
class Prog(ctypes.Structure):
    _fields_ = [('len', ctypes.c_ushort), ('filter', ctypes.c_void_p)]
fprog = Prog(4, ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:
    sys.exit('seccomp: errno %d' % ctypes.get_errno())
n = 0
while True:
    n += 1
    log.write('tick %d ppid %d\n' % (n, os.getppid()))
    time.sleep(0.02)
"#;

/// Kills the pids it holds when dropped (a failed assertion included).
struct Pids(Vec<i32>);

impl Drop for Pids {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if pid_alive(pid) {
                ferry_tests::workload::kill_pid(pid);
            }
        }
    }
}

/// The `(tick, ppid)` lines of the python program's log.
fn py_ticks(log: &std::path::Path) -> Vec<(u64, i64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.nth(1)?.parse().ok()?, w.nth(1)?.parse().ok()?))
        })
        .collect()
}

#[test]
fn a_python_program_that_sandboxes_itself_keeps_its_sandbox_through_restore_and_postcopy() {
    if !needs_root("checkpoint, restore and migration of a process under seccomp (ptrace, PR_SET_MM_MAP, clone3 set_tid)") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("py.log");
    let mut child = Command::new("python3")
        .args(["-c", SANDBOXED_PY])
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut pids = Pids(vec![child.id() as i32]);
    let old = child.id() as i32;
    let ticked_past = |n: u64| py_ticks(&log).last().is_some_and(|t| t.0 > n);
    wait_until("python's first ticks", Duration::from_secs(30), || ticked_past(2));
    let dir = tmp.path().join("img");
    let o = ferry(&["checkpoint", &old.to_string(), "--dir", dir.to_str().unwrap()]);
    assert!(o.status.success(), "checkpoint failed: {}", stderr(&o));
    let _ = child.wait();
    let o = ferry(&["restore", "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "restore failed: {}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut pid = stats["pids"][old.to_string()].as_i64().unwrap() as i32;
    pids.0.push(pid);
    let status = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    assert!(status(pid).contains("Seccomp:\t2") && status(pid).contains("NoNewPrivs:\t1"), "{}", status(pid));
    let at = py_ticks(&log).last().unwrap().0;
    wait_until("python to tick on after the restore", Duration::from_secs(30), || ticked_past(at + 3));

    // Post-copy: it runs under its filter while its memory still comes from the source.
    let daemon = Daemon::start();
    let o = Command::new(ferry_bin())
        .args(["migrate", &pid.to_string(), "--to", &daemon.addr, "--json", "--strategy", "post-copy"])
        .output()
        .unwrap();
    assert!(o.status.success(), "post-copy: {} (daemon: {})", stderr(&o), daemon.log());
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let new = stats["pids"][pid.to_string()].as_i64().unwrap() as i32;
    pids.0.push(new);
    wait_until("the source to be gone", Duration::from_secs(30), || !pid_alive(pid));
    pid = new;
    assert!(status(pid).contains("Seccomp:\t2"), "{}", status(pid));
    let at = py_ticks(&log).last().unwrap().0;
    wait_until("python to tick on after post-copy", Duration::from_secs(30), || ticked_past(at + 3));
    let ticks = py_ticks(&log);
    assert!(ticks.iter().all(|&(_, ppid)| ppid == -1), "getppid escaped the filter: {ticks:?}");
    assert!(ticks.windows(2).all(|w| w[1].0 == w[0].0 + 1), "ticks are not continuous: {ticks:?}");
}
