//! Processes with children. A checkpoint takes the process and all its descendants,
//! frozen together, and a restore makes each child again as its parent's own (`wait`
//! works); what the processes of a tree share that ferry carries only within one
//! process (a memfd mapped by two, a shared socket) is refused, and so is a zombie whose
//! death ferry does not make again (tree_state.rs has the zombies, exit signals and
//! subreapers it carries; tree_sharing.rs the pipes, socket pairs and shared anonymous
//! memory between them). A migration carries trees with every strategy
//! (tree_migrate.rs), but refuses post-copy for a tree with a stopped process. Never a
//! success that leaves a child behind.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
};

use ferry_tests::{
    ferry, ferry_bin, needs_root, stderr, wait_until,
    workload::{state, kill_pid, pid_alive, send_signal, Workload, WorkloadOpts, DEADLINE},
};

const ROOT: &str = "a checkpoint seizes the process (ptrace of any process)";

/// The children of `pid` (its main thread's).
fn children_of(pid: i32) -> Vec<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    text.split_whitespace().filter_map(|p| p.parse().ok()).collect()
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

/// The request was refused with one line naming `pid` and its child `child` (in either
/// order), and wrote no image.
fn refused_for_child(o: &Output, pid: i32, child: i32, dir: &Path) -> String {
    let err = stderr(o);
    assert!(!o.status.success(), "a process with a child must be refused: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    let named = format!("process {pid} has a child {child} (");
    // "process {pid}" and not a longer number.
    let names = |p: i32| err.match_indices(&format!("process {p}")).any(|(i, m)| !err[i + m.len()..].starts_with(|c: char| c.is_ascii_digit()));
    let shared = err.contains(&format!("process {child} is ")) && names(pid);
    assert!(err.contains(&named) || shared, "want `{named}…` or both named: {err}");
    assert!(!dir.exists(), "a refused checkpoint writes nothing");
    err
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
fn a_postcopy_migration_of_a_tree_with_a_stopped_child_is_refused_naming_it_and_both_run_on() {
    if !needs_root(ROOT) {
        return;
    }
    // Post-copy would run the stopped child on the destination to page its memory in.
    let daemon = ferry_tests::daemon::Daemon::start();
    let w = Workload::spawn(&WorkloadOpts { mem_mib: 4, tick_ms: 1, fork_check: true, files: false, ..Default::default() });
    w.wait_ready();
    let child = hold_a_fork_check_child(&w);
    let o = ferry_tests::daemon::migrate(w.pid, &daemon.addr, "post-copy");
    ferry_tests::fails_with(&o, &[&format!("process {} of the tree is stopped (job control)", child.0), "use stop-copy or pre-copy"]);
    assert_eq!(state(child.0), "T", "the child is left as it was");
    runs_on_with_its_child(w, child);
}

#[test]
fn a_child_forked_between_the_look_for_children_and_the_freeze_is_taken_with_its_parent() {
    if !needs_root(ROOT) {
        return;
    }
    // ferry finds no child, then pauses (FERRY_PAUSE) before the freeze; meanwhile the
    // workload forks one (held stopped). Seen once the process is frozen: the process is
    // let go and the tree taken instead. The restored parent reaps its restored child
    // once that is let go on, with the check it made.
    // SAFETY: prctl with integer arguments. Orphans come to this test, which reaps them.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0);
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 4, tick_ms: 1, fork_check: true, files: false, ..Default::default() });
    w.wait_ready();
    w.quiet_forks(w.pid);
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let pause = image.path().join("paused");
    let run = Command::new(ferry_bin())
        .args(["checkpoint", &w.pid.to_string(), "--dir", dir.to_str().unwrap(), "--json"])
        .env("FERRY_PAUSE", format!("checkpoint-checked:{}", pause.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ferry_run = Killed(run.id() as i32, None);
    wait_until("ferry to pause after its look for children", DEADLINE, || pause.exists());
    // A second SIGHUP: the fork check resumes, forking at its next tick.
    assert!(send_signal(w.pid, libc::SIGHUP));
    let mut child = hold_a_fork_check_child(&w);
    std::fs::remove_file(&pause).unwrap();
    ferry_run.0 = 0;
    let o = run.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((&stats["pids"][w.pid.to_string()], &stats["pids"][child.0.to_string()]), (&0.into(), &0.into()), "{stats}");
    w.reap();
    // SAFETY: reaping the orphaned child, which came to this process.
    unsafe { libc::waitpid(child.0, std::ptr::null_mut(), 0) };
    let pids = restore_json(&dir);
    let (new, new_child) = (pids[&w.pid], pids[&child.0]);
    w.adopt(new);
    child.0 = new_child;
    assert_eq!((new, new_child), (w.pid, children_of(new)[0]), "pids given back, the child the parent's");
    assert_eq!(state(new_child), "T", "the child comes back stopped");
    let checks = w.fork_checks(new);
    assert!(send_signal(new_child, libc::SIGCONT));
    w.wait_for("the restored child's check, reaped by the restored parent", |w| w.fork_checks(new) > checks);
    child.0 = 0;
    w.terminate_and_check(new).unwrap();
}

#[test]
fn a_zombie_child_killed_by_a_signal_that_dumps_core_is_refused_naming_it() {
    if !needs_root(ROOT) {
        return;
    }
    // Killed by SIGSEGV (without a core: none may be written), never reaped: a zombie
    // whose death ferry does not make again (SIGSEGV's default action dumps core).
    let script = "import os, time, signal, resource\nif os.fork() == 0:\n    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n    os.kill(os.getpid(), signal.SIGSEGV)\ntime.sleep(1000)\n";
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
    assert!(err.contains("(a zombie): killed by signal 11, a death ferry does not make again yet"), "{err}");
    assert_eq!(children_of(py.0), vec![zombie], "the zombie is left for its parent");
    assert_eq!(tracer_of(py.0), "0");
}

/// Kills every pid of a list when dropped (the processes a test restored).
struct KilledAll(Vec<i32>);
impl Drop for KilledAll {
    fn drop(&mut self) {
        for &p in &self.0 {
            kill_pid(p);
        }
    }
}

/// `ferry checkpoint PID --dir DIR --json`, which must succeed; answers its statistics.
fn checkpoint_json(pid: i32, dir: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["checkpoint".to_string(), pid.to_string(), "--dir".into(), dir.display().to_string(), "--json".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = ferry(&args);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `ferry restore --dir DIR --json`, which must succeed; answers image pid → pid now.
fn restore_json(dir: &Path) -> std::collections::BTreeMap<i32, i32> {
    let o = ferry(&["restore", "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let pids = stats["pids"].as_object().unwrap_or_else(|| panic!("no pids in {stats}"));
    pids.iter().map(|(k, v)| (k.parse().unwrap(), v.as_i64().unwrap() as i32)).collect()
}

#[test]
fn a_tree_of_three_children_comes_back_with_each_child_its_parents_own() {
    if !needs_root(ROOT) {
        return;
    }
    // Three children each checking its own memory; the parent checks every tick that
    // they are its own (waitpid(-1, WNOHANG) answers 0, not ECHILD) and, at the end,
    // that each exits 0 when told to.
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 4, tick_ms: 5, tree: 3, ..Default::default() });
    w.wait_ready();
    let root = w.pid;
    let kids = children_of(root);
    let _originals = KilledAll(kids.clone());
    assert_eq!(kids.len(), 3, "{kids:?}");
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let stats = checkpoint_json(root, &dir, &[]);
    let taken: Vec<i32> = stats["pids"].as_object().unwrap().keys().map(|k| k.parse().unwrap()).collect();
    let mut want = kids.clone();
    want.push(root);
    want.sort_unstable();
    assert_eq!(taken, want, "the whole tree: {stats}");
    let shown = ferry_tests::stdout(&ferry(&["show", dir.to_str().unwrap()]));
    for k in &kids {
        assert!(shown.contains(&format!("process {k} `")) && shown.contains(&format!("child of {root}")), "{shown}");
    }
    w.reap();
    let at = *w.ticks().last().unwrap();
    let pids = restore_json(&dir);
    let new = pids[&root];
    w.adopt(new);
    let new_kids: Vec<i32> = kids.iter().map(|k| pids[k]).collect();
    let _restored = KilledAll(new_kids.clone());
    let mut listed = children_of(new);
    listed.sort_unstable();
    let mut expected = new_kids.clone();
    expected.sort_unstable();
    assert_eq!(listed, expected, "the restored children are the restored parent's own");
    w.wait_ticks(at + 10);
    w.terminate_and_check(new).unwrap();
    assert!(w.lines().iter().any(|l| l == "tree 3 children passed"), "{}", w.log_text());
}

#[test]
fn bash_with_a_background_job_comes_back_and_its_wait_still_waits_for_it() {
    bash_job(false);
}

#[test]
fn bash_under_job_control_gets_its_job_back_in_the_job_s_own_process_group() {
    bash_job(true);
}

/// bash with a background job (under job control: `set -m`, the job in a process group
/// of its own), through an image.
fn bash_job(job_control: bool) {
    if !needs_root(ROOT) {
        return;
    }
    // The job shares bash's stdout (one open file description in both, given to the
    // restored sleep from the restored bash); its stderr is its own, and its stdin
    // (bash gives a job /dev/null without job control).
    // Orphans come to this test (a subreaper), which reaps them, so that the image's
    // pids are free.
    // SAFETY: prctl with integer arguments.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("waited");
    let set_m = if job_control { "set -m; " } else { "" };
    let script = format!(r#"{set_m}sleep 1000 2>/dev/null & wait $!; echo "waited $?" >{}"#, out.display());
    let mut cmd = Command::new("/bin/bash");
    cmd.args(["-c", &script]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // Nothing but its stdio: fds this test inherited (from whatever runs it) would be
    // shared with the job.
    // SAFETY: close_range is async-signal-safe; it only marks fds close-on-exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
            Ok(())
        });
    }
    let bash = cmd.spawn().unwrap();
    let mut bash = Killed(bash.id() as i32, Some(bash));
    let pid = bash.0;
    let mut sleep = Killed(0, None);
    wait_until("bash's sleep", DEADLINE, || {
        sleep.0 = children_of(pid).first().copied().unwrap_or(0);
        sleep.0 > 0 && std::fs::read_to_string(format!("/proc/{}/comm", sleep.0)).is_ok_and(|c| c.trim() == "sleep")
    });
    let dir = tmp.path().join("img");
    checkpoint_json(pid, &dir, &[]);
    let _ = bash.1.take().unwrap().wait();
    // SAFETY: reaping the orphaned sleep, which came to this process.
    unsafe { libc::waitpid(sleep.0, std::ptr::null_mut(), 0) };
    let shown = ferry_tests::stdout(&ferry(&["show", dir.to_str().unwrap()]));
    assert!(shown.contains(&format!("fd 1 is {pid}'s fd 1")), "{shown}");
    let pids = restore_json(&dir);
    let (new_bash, new_sleep) = (pids[&pid], pids[&sleep.0]);
    let _restored = (Killed(new_bash, None), Killed(new_sleep, None));
    assert_eq!((new_bash, new_sleep), (pid, sleep.0), "the pids given back (both were freed)");
    assert_eq!(children_of(new_bash), vec![new_sleep]);
    let group = |p: i32| ferry::kernel::tree::group_and_session(p).unwrap();
    let want_group = if job_control { new_sleep } else { group(new_bash).0 };
    assert_eq!(group(new_sleep), (want_group, group(new_bash).1), "the job's group and session");
    assert!(!out.exists(), "bash still waits");
    assert_eq!(kcmp_file(new_bash, 1, new_sleep, 1), 0, "one description of stdout in both");
    // Its job ends: bash's `wait $!` returns with its status (143: SIGTERM), which it
    // could not if the sleep were not its child (127 at once).
    assert!(send_signal(new_sleep, libc::SIGTERM));
    wait_until("bash to write what its wait returned", DEADLINE, || std::fs::read_to_string(&out).is_ok_and(|t| t.ends_with('\n')));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "waited 143\n");
    // SAFETY: reaping the restored bash, an orphan that came to this process.
    wait_until("the restored bash to exit", DEADLINE, || unsafe { libc::waitpid(new_bash, std::ptr::null_mut(), libc::WNOHANG) } == new_bash);
}

/// What a dead ferry could leave in process `pid`: its scratch area (1 MiB, anonymous,
/// writable and executable), or its tracing.
fn residue(pid: i32) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut left: Vec<String> = maps
        .lines()
        .filter(|l| l.contains(" rwxp 00000000 00:00 0"))
        .filter_map(|l| {
            let (s, e) = l.split(' ').next()?.split_once('-')?;
            let len = u64::from_str_radix(e, 16).ok()? - u64::from_str_radix(s, 16).ok()?;
            (len == ferry::kernel::tracer::SCRATCH_SIZE).then(|| format!("process {pid}: a scratch area: {l}"))
        })
        .collect();
    if tracer_of(pid) != "0" {
        left.push(format!("process {pid}: traced by {}", tracer_of(pid)));
    }
    left
}

#[test]
fn a_tree_checkpoint_killed_midway_leaves_every_process_running_clean_and_no_image() {
    if !needs_root(ROOT) {
        return;
    }
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 4, tick_ms: 5, tree: 2, ..Default::default() });
    w.wait_ready();
    let mut all = children_of(w.pid);
    let _kids = KilledAll(all.clone());
    all.push(w.pid);
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    // Killed in the middle of the second process (each has a stream per plugin).
    let o = Command::new(ferry_bin())
        .args(["checkpoint", &w.pid.to_string(), "--dir", dir.to_str().unwrap()])
        .env("FERRY_FAULT", "checkpoint-mid@9")
        .output()
        .unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&o.status), Some(libc::SIGKILL), "{}", stderr(&o));
    // The janitor is at work as ferry's output ends.
    wait_until("the janitor to clean every process and the image", DEADLINE, || {
        !dir.exists() && all.iter().all(|&p| residue(p).is_empty())
    });
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 5);
    let pid = w.pid;
    w.terminate_and_check(pid).unwrap();
    assert!(w.lines().iter().any(|l| l == "tree 2 children passed"), "{}", w.log_text());
}

/// A python3 parent with one child made by `setup` (code run before the fork, with
/// `child` and `parent` code after it in each); the child closes its stdio first, so
/// that only what the test means is shared. Answers the parent, its child.
fn python_pair(setup: &str, child: &str, parent: &str) -> (Killed, Killed) {
    python_script_pair(&format!(
        "import os, time, mmap\n{setup}\nif os.fork() == 0:\n    os.closerange(0, 3)\n    {child}\n    time.sleep(1000)\n    os._exit(0)\n{parent}\ntime.sleep(1000)\n"
    ))
}

fn python_script_pair(script: &str) -> (Killed, Killed) {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", script]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: close_range is async-signal-safe; it only marks fds close-on-exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
            Ok(())
        });
    }
    let py = cmd.spawn().unwrap();
    let py = Killed(py.id() as i32, Some(py));
    let mut kid = Killed(0, None);
    wait_until("python's child, its stdio closed", DEADLINE, || {
        kid.0 = children_of(py.0).first().copied().unwrap_or(0);
        kid.0 > 0 && std::fs::read_dir(format!("/proc/{}/fd", kid.0)).is_ok_and(|d| d.flatten().all(|e| e.file_name() != "0"))
    });
    (py, kid)
}

/// A checkpoint of `py`'s tree is refused with one line naming both processes and
/// `what`; both run on, untraced, without a scratch area.
fn tree_refused(py: &Killed, kid: &Killed, what: &str) {
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let o = ferry(&["checkpoint", &py.0.to_string(), "--dir", dir.to_str().unwrap()]);
    let err = refused_for_child(&o, py.0, kid.0, &dir);
    assert!(err.contains(what), "want {what}: {err}");
    for p in [py.0, kid.0] {
        assert!(pid_alive(p) && matches!(state(p).as_str(), "S" | "R"), "process {p} runs on: {}", state(p));
        assert_eq!(residue(p), Vec::<String>::new());
    }
}

#[test]
fn a_memfd_mapped_by_parent_and_child_is_refused_naming_both() {
    if !needs_root(ROOT) {
        return;
    }
    // Shared anonymous memory is carried (`tree_sharing.rs`); a memfd is not yet.
    let (py, kid) = python_pair("fd = os.memfd_create('x')\nos.ftruncate(fd, 4096)\nm = mmap.mmap(fd, 4096)\nm[0] = 1", "m[1] = 2", "");
    tree_refused(&py, &kid, "(a memfd) with process");
}

#[test]
fn a_grandchild_forked_while_the_tree_is_being_frozen_is_taken_and_comes_back_under_its_parent() {
    if !needs_root(ROOT) {
        return;
    }
    // ferry pauses once the root is frozen (FERRY_PAUSE); its child, not frozen yet,
    // then forks a grandchild (at SIGUSR1). The tree of three is taken, and restored
    // with each process its parent's child.
    let (py, kid) = python_pair(
        "import signal",
        "signal.signal(signal.SIGUSR1, lambda *_: os.fork() == 0 and [time.sleep(1000), os._exit(0)])",
        "",
    );
    let mut py = py;
    let tmp = tempfile::tempdir().unwrap();
    let (dir, pause) = (tmp.path().join("img"), tmp.path().join("paused"));
    let run = Command::new(ferry_bin())
        .args(["checkpoint", &py.0.to_string(), "--dir", dir.to_str().unwrap(), "--json"])
        .env("FERRY_PAUSE", format!("tree-root-frozen:{}", pause.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _ferry = Killed(run.id() as i32, None);
    wait_until("ferry to pause with the root frozen", DEADLINE, || pause.exists());
    assert!(send_signal(kid.0, libc::SIGUSR1));
    let mut grandchild = Killed(0, None);
    wait_until("the grandchild", DEADLINE, || {
        grandchild.0 = children_of(kid.0).first().copied().unwrap_or(0);
        grandchild.0 > 0
    });
    std::fs::remove_file(&pause).unwrap();
    let o = run.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let shown = ferry_tests::stdout(&ferry(&["show", dir.to_str().unwrap()]));
    assert!(shown.contains(&format!("process {} `python3`, child of {}", grandchild.0, kid.0)), "{shown}");
    let _ = py.1.take().unwrap().wait();
    let pids = restore_json(&dir);
    let (root, child, grand) = (pids[&py.0], pids[&kid.0], pids[&grandchild.0]);
    let _restored = KilledAll(vec![grand, child, root]);
    assert_eq!((children_of(root), children_of(child)), (vec![child], vec![grand]), "{pids:?}");
    // The kernel's own account: the grandchild, killed, is its parent's zombie to reap.
    kill_pid(grand);
    wait_until("the restored grandchild to be its parent's zombie", DEADLINE, || state(grand) == "Z");
    assert_eq!(children_of(child), vec![grand]);
}

#[test]
fn a_child_in_a_process_group_led_from_outside_the_tree_is_refused_naming_it() {
    if !needs_root(ROOT) {
        return;
    }
    // The parent leaves the group it was started in (this test's) for one of its own;
    // the child goes back to the first one, led by a process outside the tree.
    let (py, kid) = python_pair("g = os.getpgrp()\nos.setpgid(0, 0)", "os.setpgid(0, g)", "");
    let theirs = ferry::kernel::tree::group_and_session(std::process::id() as i32).unwrap().0;
    wait_until("the child in the outside group", DEADLINE, || ferry::kernel::tree::group_and_session(kid.0).is_some_and(|g| g.0 == theirs));
    tree_refused(&py, &kid, "a group or session led from outside the tree is not carried yet");
}

/// `kcmp(a, b, KCMP_FILE, fa, fb)`: 0 when the two fds are one open file description.
fn kcmp_file(a: i32, fa: i32, b: i32, fb: i32) -> i64 {
    // SAFETY: kcmp takes integers only.
    unsafe { libc::syscall(libc::SYS_kcmp, a, b, 0, fa, fb) }
}

#[test]
fn a_file_description_inherited_over_fork_comes_back_one_with_one_offset() {
    if !needs_root(ROOT) {
        return;
    }
    // Parent and child write to one description of a file, at SIGUSR1: each write moves
    // the offset of both. Two descriptions would each have their own offset, and the
    // second write would overwrite the first.
    // SAFETY: prctl with integer arguments.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0);
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("shared");
    let setup = format!(
        "import signal\nfd = os.open({:?}, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)\nos.write(fd, b'before\\n')",
        file.display().to_string()
    );
    let (mut py, kid) = python_pair(
        &setup,
        "signal.signal(signal.SIGUSR1, lambda *_: os.write(fd, b'child\\n'))",
        "signal.signal(signal.SIGUSR1, lambda *_: os.write(fd, b'parent\\n'))",
    );
    let dir = tmp.path().join("img");
    checkpoint_json(py.0, &dir, &[]);
    let _ = py.1.take().unwrap().wait();
    // SAFETY: reaping the orphaned child, which came to this process.
    unsafe { libc::waitpid(kid.0, std::ptr::null_mut(), 0) };
    let pids = restore_json(&dir);
    let (parent, child) = (pids[&py.0], pids[&kid.0]);
    let _restored = KilledAll(vec![child, parent]);
    assert_eq!(children_of(parent), vec![child]);
    let read = || std::fs::read_to_string(&file).unwrap_or_default();
    assert!(send_signal(child, libc::SIGUSR1));
    wait_until("the child's write", DEADLINE, || read() == "before\nchild\n");
    assert!(send_signal(parent, libc::SIGUSR1));
    wait_until("the parent's write", DEADLINE, || read().len() >= "before\nchild\nparent\n".len() || read().contains("parent"));
    assert_eq!(read(), "before\nchild\nparent\n", "one offset for both");
}

#[test]
fn a_lock_on_a_description_shared_with_a_child_is_refused_naming_both() {
    if !needs_root(ROOT) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let setup = format!(
        "import fcntl\nfd = os.open({:?}, os.O_RDWR | os.O_CREAT, 0o644)\nfcntl.flock(fd, fcntl.LOCK_EX)",
        tmp.path().join("locked").display().to_string()
    );
    let (py, kid) = python_pair(&setup, "", "");
    tree_refused(&py, &kid, "locks on a description shared between processes are not carried yet");
}

#[test]
fn a_stopped_child_of_a_tree_comes_back_stopped_and_carries_on_when_continued() {
    if !needs_root(ROOT) {
        return;
    }
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 1, tick_ms: 5, tree: 2, files: false, ..Default::default() });
    w.wait_ready();
    let kids = children_of(w.pid);
    let _originals = KilledAll(kids.clone());
    assert!(send_signal(kids[0], libc::SIGSTOP));
    wait_until("the child stopped", DEADLINE, || state(kids[0]) == "T");
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    checkpoint_json(w.pid, &dir, &[]);
    w.reap();
    let at = *w.ticks().last().unwrap();
    let pids = restore_json(&dir);
    let new = pids[&w.pid];
    w.adopt(new);
    let (stopped, running) = (pids[&kids[0]], pids[&kids[1]]);
    let _restored = KilledAll(vec![stopped, running]);
    wait_until("the restored child stopped as it was", DEADLINE, || state(stopped) == "T");
    assert!(matches!(state(running).as_str(), "S" | "R"), "the other child runs: {}", state(running));
    w.wait_ticks(at + 5);
    assert_eq!(state(stopped), "T", "still stopped");
    assert!(send_signal(stopped, libc::SIGCONT));
    w.terminate_and_check(new).unwrap();
    assert!(w.lines().iter().any(|l| l == "tree 2 children passed"), "{}", w.log_text());
}

#[test]
fn a_tree_left_running_carries_on_and_its_copy_has_children_of_its_own() {
    if !needs_root(ROOT) {
        return;
    }
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 1, tick_ms: 5, tree: 2, files: false, ..Default::default() });
    w.wait_ready();
    let kids = children_of(w.pid);
    let _originals = KilledAll(kids.clone());
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let stats = checkpoint_json(w.pid, &dir, &["--leave-running"]);
    for p in kids.iter().chain([&w.pid]) {
        assert_eq!(stats["pids"][p.to_string()], *p, "{stats}");
        assert!(residue(*p).is_empty(), "{:?}", residue(*p));
    }
    let original = w.pid;
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 3);
    w.terminate_and_check(original).unwrap();
    // A copy of the tree, with the original's pids (free again) where it can.
    let before = w.lines().len();
    let pids = restore_json(&dir);
    let new = pids[&original];
    w.adopt(new);
    let copies: Vec<i32> = kids.iter().map(|k| pids[k]).collect();
    let _restored = KilledAll(copies.clone());
    let mut listed = children_of(new);
    listed.sort_unstable();
    assert_eq!(listed, copies, "the copy's children are its own");
    wait_until("ticks from the copy", DEADLINE, || w.lines()[before..].iter().filter(|l| l.starts_with("tick ")).count() >= 3);
    assert!(send_signal(new, libc::SIGTERM));
    wait_until("the copy's verdict", DEADLINE, || w.lines()[before..].iter().any(|l| l == "PASS" || l.starts_with("FAIL")));
    let tail = w.lines()[before..].to_vec();
    assert!(tail.iter().any(|l| l == "PASS") && tail.iter().any(|l| l == "tree 2 children passed"), "{}", w.log_text());
}

#[test]
fn a_tree_restore_failing_in_a_child_or_killed_midway_leaves_no_process_behind() {
    if !needs_root(ROOT) {
        return;
    }
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 4, tick_ms: 5, tree: 2, files: false, ..Default::default() });
    w.wait_ready();
    let kids = children_of(w.pid);
    let _originals = KilledAll(kids.clone());
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    checkpoint_json(w.pid, &dir, &[]);
    w.reap();
    let log = w.log.to_str().unwrap().to_string();
    let left = || {
        let mentioning = |needle: &str| -> Vec<i32> {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|&pid| String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()).contains(needle) && state(pid) != "Z")
                .collect()
        };
        let mut all = mentioning(&log);
        all.extend(mentioning(dir.to_str().unwrap()));
        // A blank restore child: a fork of ferry with nothing mapped where its
        // command line was.
        let ferry_exe = ferry_bin().canonicalize().unwrap();
        all.extend(std::fs::read_dir("/proc").unwrap().flatten().filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok()).filter(|&pid| {
            std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|x| x == ferry_exe)
                && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.is_empty())
                && state(pid) != "Z"
        }));
        all.retain(|p| !kids.contains(p) && *p != w.pid);
        all
    };
    // Killed while rebuilding the second process (the kernel kills what ferry holds).
    let o = Command::new(ferry_bin()).args(["restore", "--dir", dir.to_str().unwrap()]).env("FERRY_FAULT", "mid-pages@2").output().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&o.status), Some(libc::SIGKILL), "{}", stderr(&o));
    wait_until("no process of the killed restore", DEADLINE, || left().is_empty());
    // A record of the second process broken: the restore fails with one line and
    // removes every process it made, the root and the other child included.
    let stream = dir.join("stream-9.img");
    let mut bytes = std::fs::read(&stream).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&stream, &bytes).unwrap();
    let o = ferry(&["restore", "--dir", dir.to_str().unwrap()]);
    let err = stderr(&o);
    assert!(!o.status.success() && err.lines().count() == 1, "{err}");
    wait_until("no process of the failed restore", DEADLINE, || left().is_empty());
}

#[test]
fn a_listening_socket_shared_with_a_child_is_refused_naming_both() {
    if !needs_root(ROOT) {
        return;
    }
    // A server's master and worker on one listener (nginx, a prefork server): each
    // process's files plugin would bind it again, the second against the first.
    let (py, kid) = python_pair("import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()", "", "");
    tree_refused(&py, &kid, "sockets shared between processes are not carried yet");
}

#[test]
fn a_tree_forking_a_burst_is_frozen_whole_by_the_cgroup_freezer_and_comes_back() {
    if !needs_root(ROOT) {
        return;
    }
    // bash forks 24 sleeps as fast as it can; the freezer takes it mid-burst: the whole
    // tree moved into one cgroup and frozen at once, children forked meanwhile born in
    // it or found by the next pass. None escapes: after the checkpoint (which kills
    // what it took) no process of the burst runs on; restored, bash carries on with
    // the burst, its restored sleeps its own, and its `wait` waits for them all.
    // SAFETY: prctl with integer arguments. Orphans come to this test, which reaps them.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("waited");
    // A duration only this test's sleeps have on their command line.
    let mark = format!("1000.{}{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos());
    let script = format!("for i in $(seq 24); do sleep {mark} & /bin/true; done; wait; echo waited >{}", out.display());
    let mut cmd = Command::new("/bin/bash");
    cmd.args(["-c", &script]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: close_range is async-signal-safe; it only marks fds close-on-exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
            Ok(())
        });
    }
    let bash = cmd.spawn().unwrap();
    let mut bash = Killed(bash.id() as i32, Some(bash));
    let pid = bash.0;
    let sleeps = || sleeps_mentioning(&mark);
    let _originals = KilledAll(Vec::new());
    wait_until("bash's first sleeps", DEADLINE, || sleeps().len() >= 2);
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let stats = checkpoint_json(pid, &dir, &["--quiesce", "freezer"]);
    let taken: Vec<i32> = stats["pids"].as_object().unwrap().keys().map(|k| k.parse().unwrap()).collect();
    assert!(taken.contains(&pid) && taken.len() >= 3, "{stats}");
    let left = processes_mentioning_all(&mark);
    assert!(left.is_empty(), "a process of the burst escaped the freeze: {left:?} (taken: {taken:?})");
    let _ = bash.1.take().unwrap().wait();
    bash.0 = 0;
    // Reaping the orphaned sleeps, which came to this process, by pid: waitpid(-1) would
    // reap another test's workload too (its own wait then fails with ECHILD).
    wait_until("the taken sleeps reaped", DEADLINE, || {
        taken.iter().filter(|&&p| p != pid).all(|&p| {
            // SAFETY: waitpid on a pid the checkpoint took; a null status pointer.
            let r = unsafe { libc::waitpid(p, std::ptr::null_mut(), libc::WNOHANG) };
            r != 0
        })
    });
    let pids = restore_json(&dir);
    let new_bash = pids[&pid];
    let _restored = KilledAll(pids.values().copied().collect());
    let _later = Later(mark.clone());
    wait_until("the restored bash to finish its burst", DEADLINE, || children_of(new_bash).len() == 24);
    let mut kids = children_of(new_bash);
    kids.sort_unstable();
    let mut all = sleeps();
    all.sort_unstable();
    assert_eq!(kids, all, "every sleep of the burst is the restored bash's own");
    assert!(!out.exists(), "bash still waits");
    for k in kids {
        kill_pid(k);
    }
    wait_until("bash's wait to return once its sleeps are gone", DEADLINE, || out.exists());
}

/// Live processes whose command line mentions `needle` (bash's too, whose script does).
fn processes_mentioning_all(needle: &str) -> Vec<i32> {
    ferry_tests::workload::processes_mentioning(needle)
}

/// The sleeps among them.
fn sleeps_mentioning(needle: &str) -> Vec<i32> {
    let sleep = |p: &i32| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep");
    processes_mentioning_all(needle).into_iter().filter(sleep).collect()
}

/// Kills, when dropped, every process whose command line mentions its needle (what a
/// restored process forked after the restore).
struct Later(String);
impl Drop for Later {
    fn drop(&mut self) {
        for p in processes_mentioning_all(&self.0) {
            kill_pid(p);
        }
    }
}
