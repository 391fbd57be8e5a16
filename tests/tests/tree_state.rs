//! What the processes of a tree are to each other beyond parent and child, carried
//! through a checkpoint and a restore: a zombie child (exited, not reaped: the parent's
//! `waitpid` still gets its status), a child that tells its parent of its death by
//! another signal than SIGCHLD, a parent-death signal, and a child subreaper (orphans
//! among its descendants come to it). A python3 tree checks it all from inside once
//! told to, and writes PASS or FAIL naming what was wrong.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use ferry_tests::{
    ferry, inject::Injected, needs_root, stderr, wait_until,
    workload::{kill_pid, state, DEADLINE},
};

const ROOT: &str = "a checkpoint seizes the processes and a restore rebuilds them (ptrace, clone3 with set_tid)";

/// P: a subreaper, with A (made by clone with SIGUSR1 as its exit signal), B (exited
/// with 7, a zombie), C (whose child G has SIGUSR2 as its parent-death signal, and
/// exits with 42 on it). Told to check (the `go` file): B's status, A's death signal,
/// then C killed — G gets SIGUSR2 and exits 42, an orphan that must come to P.
const SCRIPT: &str = r#"
import os, sys, time, signal, ctypes
libc = ctypes.CDLL(None, use_errno=True)
out, go, ready = sys.argv[1], sys.argv[2], sys.argv[3]
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
libc.prctl(36, 1, 0, 0, 0)
a = libc.syscall(56, signal.SIGUSR1, 0, 0, 0, 0)
if a == 0:
    os.closerange(0, 3)
    while True:
        time.sleep(1000)
b = os.fork()
if b == 0:
    os._exit(7)
c = os.fork()
if c == 0:
    os.closerange(0, 3)
    if os.fork() == 0:
        signal.signal(signal.SIGUSR2, lambda s, f: os._exit(42))
        libc.prctl(1, signal.SIGUSR2, 0, 0, 0)
        open(ready + ".g", "w").close()
        while True:
            time.sleep(1000)
    while True:
        time.sleep(1000)
open(ready, "w").write(f"{a} {b} {c}\n")
while not os.path.exists(go):
    time.sleep(0.01)
fails = []
try:
    p, st = os.waitpid(b, os.WNOHANG)
except ChildProcessError:
    p, st = -1, 0
if p != b or not os.WIFEXITED(st) or os.WEXITSTATUS(st) != 7:
    fails.append(f"zombie {b}: waitpid answered {p}, status {st:#x}, not its exit 7")
os.kill(a, signal.SIGKILL)
p, st = os.waitpid(a, 0x40000000)
deadline = time.time() + 10
while not got and time.time() < deadline:
    time.sleep(0.01)
if p != a or got != [signal.SIGUSR1]:
    fails.append(f"child {a}: waitpid answered {p}; signals at its death {got}, not SIGUSR1")
os.kill(c, signal.SIGKILL)
os.waitpid(c, 0)
deadline = time.time() + 10
orphan = (0, 0)
while orphan[0] == 0 and time.time() < deadline:
    try:
        orphan = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break
    time.sleep(0.01)
if orphan[0] == 0 or not os.WIFEXITED(orphan[1]) or os.WEXITSTATUS(orphan[1]) != 42:
    fails.append(f"C's child (parent-death signal SIGUSR2, then an orphan for this subreaper): {orphan}")
open(out, "w").write("PASS\n" if not fails else "FAIL: " + "; ".join(fails) + "\n")
"#;

/// Reaps every child of this (subreaper) test that has ended.
fn reap_all() {
    // SAFETY: waitpid with a null status pointer.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG | libc::__WALL) } > 0 {}
}

/// The tree's processes, killed by pid at the end.
struct KilledAll(Vec<i32>);
impl Drop for KilledAll {
    fn drop(&mut self) {
        for &p in &self.0 {
            kill_pid(p);
        }
        reap_all();
    }
}

/// What a negative case breaks in the restored copy before it checks.
#[derive(Clone, Copy, PartialEq)]
enum Break {
    Nothing,
    /// The restored parent no longer a subreaper.
    Subreaper,
    /// The zombie reaped behind the parent's back.
    Zombie,
}

#[test]
fn zombies_exit_signals_a_parent_death_signal_and_a_subreaper_come_back_through_an_image() {
    if !needs_root(ROOT) {
        return;
    }
    assert_eq!(verdict(Break::Nothing), "PASS\n");
}

#[test]
fn the_tree_s_own_check_fails_when_its_copy_lost_the_subreaper_flag_or_its_zombie() {
    if !needs_root(ROOT) {
        return;
    }
    let v = verdict(Break::Subreaper);
    assert!(v.starts_with("FAIL: ") && v.contains("an orphan for this subreaper"), "{v}");
    let v = verdict(Break::Zombie);
    assert!(v.starts_with("FAIL: zombie ") && v.contains("not its exit 7"), "{v}");
}

/// The python tree checkpointed, restored, `broken` as told, and its verdict.
fn verdict(broken: Break) -> String {
    // SAFETY: prctl with integer arguments. Orphans come to this test, which reaps them
    // (the image's pids freed for the restore).
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0);
    let tmp = tempfile::tempdir().unwrap();
    let (out, go, ready) = (tmp.path().join("out"), tmp.path().join("go"), tmp.path().join("ready"));
    let mut py = Command::new("/usr/bin/python3")
        .args(["-c", SCRIPT])
        .args([&out, &go, &ready])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = py.id() as i32;
    let mut all = KilledAll(vec![pid]);
    let g_ready = ready.with_extension("g");
    wait_until("the tree ready", DEADLINE, || std::fs::read_to_string(&ready).is_ok_and(|t| t.ends_with('\n')) && g_ready.exists());
    let kids: Vec<i32> = std::fs::read_to_string(&ready).unwrap().split_whitespace().map(|p| p.parse().unwrap()).collect();
    let (a, b) = (kids[0], kids[1]);
    wait_until("B to be a zombie", DEADLINE, || state(b) == "Z");
    all.0.extend(&kids);
    let dir = tmp.path().join("img");
    let o = ferry(&["checkpoint", &pid.to_string(), "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    let shown = ferry_tests::stdout(&ferry(&["show", dir.to_str().unwrap(), "--json"]));
    assert!(shown.contains("\"zombies\"") && shown.contains("\"subreaper\"") && shown.contains("\"exit_signal\""), "{shown}");
    let _ = py.wait();
    wait_until("the image's processes reaped", DEADLINE, || {
        reap_all();
        [pid, a, b].iter().all(|&p| !Path::new(&format!("/proc/{p}")).exists())
    });
    let o = ferry(&["restore", "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let new: Vec<i32> = stats["pids"].as_object().unwrap().values().map(|v| v.as_i64().unwrap() as i32).collect();
    all.0.extend(&new);
    assert_eq!(stats["pids"][pid.to_string()], pid, "the pids given back: {stats}");
    assert_eq!(state(b), "Z", "B is a zombie again");
    if broken != Break::Nothing {
        let mut p = Injected::seize(pid);
        let r = match broken {
            Break::Subreaper => p.call(pid, libc::SYS_prctl, [libc::PR_SET_CHILD_SUBREAPER as u64, 0, 0, 0, 0, 0]),
            _ => p.call(pid, libc::SYS_wait4, [b as u64, 0, libc::WNOHANG as u64, 0, 0, 0]),
        };
        assert!(r >= 0, "breaking the copy: {r}");
        p.release();
    }
    std::fs::write(&go, "").unwrap();
    wait_until("the tree's verdict", DEADLINE, || std::fs::read_to_string(&out).is_ok_and(|t| t.ends_with('\n')));
    std::fs::read_to_string(&out).unwrap()
}
