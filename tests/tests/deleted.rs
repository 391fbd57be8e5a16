//! Things a process still uses though they were removed from the file system, a
//! chroot, and an epoll watch whose fd was closed (issue 12): a removed working
//! directory and open directory, an unlinked device node, Unix sockets whose files were
//! removed and an epoll watch added by an fd number since closed (and reused) come back
//! exactly after a restore and a migration with every strategy; so does a process
//! chrooted into a directory of its own. Where they cannot be carried (a watched file
//! no fd of the process holds, a removed directory whose parent is gone too, a socket's
//! name taken meanwhile) the event fails with one line and the process carries on.
//!
//! The workload checks itself from inside (see `--del-cwd`, `--del-dev`, `--del-sock`,
//! `--epoll-closed`, `--epoll-orphan`, `--chroot` in workloads/workload.c);
//! `self_checks.rs` shows those checks fail on a copy broken on purpose.

use std::{
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use ferry_tests::{
    daemon::migrate,
    fails_with,
    daemon::Daemon,
    ferry, needs_root, stderr, wait_until,
    workload::{pid_alive, Workload, WorkloadOpts},
};

const ROOT: &str = "checkpoint, restore and migration (ptrace, PR_SET_MM_MAP, clone3 set_tid, mknod, chroot)";

/// Everything removed, and the epoll watch of a closed fd.
const REMOVED: &[&str] = &["--del-cwd", "--del-dev", "--del-sock", "--epoll-closed"];

fn opts(extra: &[&'static str]) -> WorkloadOpts {
    WorkloadOpts { files: false, extra: extra.to_vec(), ..Default::default() }
}


/// `ferry restore --dir DIR --json`: the new pid of `old`, or the failed output.
fn restore(dir: &Path, old: i32) -> Result<i32, Output> {
    let o = ferry(&["restore", "--dir", dir.to_str().unwrap(), "--json"]);
    if !o.status.success() {
        return Err(o);
    }
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    Ok(stats["pids"][old.to_string()].as_i64().unwrap_or_else(|| panic!("no pid for {old} in {stats}")) as i32)
}

/// The names the workload made in its directory are all gone (nothing made again for
/// the restore is left behind).
fn nothing_left(w: &Workload) {
    let left: Vec<String> = std::fs::read_dir(w.files_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n != "root")
        .collect();
    assert!(left.is_empty(), "left in the workload's directory: {left:?}");
}

fn link(pid: i32, what: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/{what}")).unwrap().to_string_lossy().into_owned()
}

/// What is checked from outside: the removed cwd, and the root of a chrooted copy.
fn looks_right(w: &Workload, pid: i32, extra: &[&str]) {
    let dir = w.files_dir();
    if extra.contains(&"--del-cwd") {
        assert_eq!(link(pid, "cwd"), format!("{}/gone-cwd (deleted)", dir.display()));
    }
    if extra.contains(&"--chroot") {
        assert_eq!(link(pid, "root"), format!("{}/root", dir.display()));
        assert_eq!(link(pid, "cwd"), format!("{}/root/sub", dir.display()));
    }
    nothing_left(w);
}

/// Checkpoints the workload for good and restores it; answers the copy's pid.
fn through_an_image(w: &mut Workload, img: &Path) -> i32 {
    let old = w.pid;
    let o = ferry(&["checkpoint", &old.to_string(), "--dir", img.to_str().unwrap()]);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    w.reap();
    let new = restore(img, old).unwrap_or_else(|o| panic!("restore: {}", stderr(&o)));
    w.adopt(new);
    new
}

/// Lets the copy `pid` tick a little more, then asks it to check itself.
fn passes(w: &mut Workload, pid: i32) {
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 3);
    w.terminate_and_check(pid).unwrap_or_else(|e| panic!("{e}\n{}", w.output()));
}

#[test]
fn removed_directories_devices_and_socket_files_and_a_chroot_come_back_after_a_restore() {
    if !needs_root(ROOT) {
        return;
    }
    for extra in [REMOVED, &["--chroot"]] {
        let mut w = Workload::spawn(&opts(extra));
        w.wait_ready();
        w.wait_ticks(3);
        let tmp = tempfile::tempdir().unwrap();
        let new = through_an_image(&mut w, &tmp.path().join("img"));
        looks_right(&w, new, extra);
        passes(&mut w, new);
    }
}

#[test]
fn a_socket_name_taken_is_refused_with_one_line_and_a_free_one_restores() {
    if !needs_root(ROOT) {
        return;
    }
    let mut w = Workload::spawn(&opts(&["--del-sock"]));
    w.wait_ready();
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("img");
    let old = w.pid;
    // Taken before the checkpoint: refused there, the process left running.
    let taken = w.files_dir().join("gone-listen");
    std::fs::write(&taken, "someone else's").unwrap();
    let o = ferry(&["checkpoint", &old.to_string(), "--dir", img.to_str().unwrap()]);
    fails_with(&o, &[&format!("process {old}"), &taken.display().to_string(), "the name given to another file"]);
    assert!(!img.exists(), "a refused checkpoint writes nothing");
    assert!(pid_alive(old), "the source died");
    std::fs::remove_file(&taken).unwrap();
    let o = ferry(&["checkpoint", &old.to_string(), "--dir", img.to_str().unwrap()]);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    w.reap();
    // Another file takes the name the socket kept without a file.
    std::fs::write(&taken, "someone else's").unwrap();
    let o = restore(&img, old).expect_err("a restore onto a taken name");
    fails_with(&o, &["listening Unix socket", &format!("its name {}", taken.display()), "is taken"]);
    assert_eq!(std::fs::read_to_string(&taken).unwrap(), "someone else's", "the other file is left alone");
    assert!(!w.files_dir().join("gone-dgram").exists(), "the failed restore left a socket file behind");
    std::fs::remove_file(&taken).unwrap();
    let new = restore(&img, old).unwrap_or_else(|o| panic!("restore: {}", stderr(&o)));
    w.adopt(new);
    looks_right(&w, new, &[]);
    passes(&mut w, new);
}


#[test]
fn removed_things_and_a_chroot_move_with_every_strategy() {
    if !needs_root(ROOT) {
        return;
    }
    let daemon = Daemon::start();
    for strategy in ["stop-copy", "pre-copy", "post-copy", "hybrid"] {
        for extra in [REMOVED, &["--chroot"]] {
            let mut w = Workload::spawn(&WorkloadOpts { dirty_pages: 2, ..opts(extra) });
            w.wait_ready();
            w.wait_ticks(3);
            let old = w.pid;
            let o = migrate(old, &daemon.addr, strategy);
            assert!(o.status.success(), "{strategy} {extra:?}: {}", stderr(&o));
            let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(stats["strategy"], strategy, "{stats}");
            let new = stats["pids"][old.to_string()].as_i64().unwrap() as i32;
            wait_until("the source to be gone", Duration::from_secs(30), || !pid_alive(old));
            w.adopt(new);
            looks_right(&w, new, extra);
            passes(&mut w, new);
        }
    }
}

#[test]
fn a_watched_file_no_fd_holds_is_refused_with_one_line_and_the_process_carries_on() {
    if !needs_root(ROOT) {
        return;
    }
    // The watched pipe lives on in a forked child only: the restore could not find it.
    let mut w = Workload::spawn(&opts(&["--epoll-orphan"]));
    w.wait_ready();
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("img");
    let pid = w.pid;
    let o = ferry(&["checkpoint", &pid.to_string(), "--dir", img.to_str().unwrap()]);
    fails_with(&o, &[&format!("process {pid}"), "epoll", "no fd of the process holds any more"]);
    assert!(!img.exists(), "a refused checkpoint writes nothing");
    let daemon = Daemon::start();
    fails_with(&migrate(pid, &daemon.addr, "stop-copy"), &[&format!("process {pid}"), "epoll"]);
    assert!(pid_alive(pid), "the source died");
    passes(&mut w, pid);
}

#[test]
fn a_removed_working_directory_whose_parent_is_gone_too_is_refused_with_one_line() {
    if !needs_root(ROOT) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ready = tmp.path().join("ready");
    let code = "import os, sys, time\nd = sys.argv[1]\nos.makedirs(d + '/a/b')\nos.chdir(d + '/a/b')\nos.rmdir(d + '/a/b')\nos.rmdir(d + '/a')\nopen(sys.argv[2], 'w').close()\nwhile True:\n    time.sleep(0.01)\n";
    let py = Command::new("python3")
        .args(["-c", code])
        .arg(tmp.path())
        .arg(&ready)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let py = Killed(py);
    let pid = py.0.id() as i32;
    wait_until("python in a removed directory", Duration::from_secs(30), || ready.exists());
    let img = tmp.path().join("img");
    let o = ferry(&["checkpoint", &pid.to_string(), "--dir", img.to_str().unwrap()]);
    let parent = format!("{}/a", tmp.path().display());
    fails_with(&o, &[&format!("process {pid}"), "working directory", &format!("parent directory {parent} is gone too")]);
    assert!(pid_alive(pid), "python died");
    assert!(!img.exists(), "a refused checkpoint writes nothing");
}

/// A child killed (and reaped) when dropped, a failed assertion or not.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
