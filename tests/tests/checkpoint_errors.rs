//! Bad input to checkpoint and restore: one clear line, exit code 1, the target
//! untouched and running, and nothing half-built left behind.

use std::{os::unix::fs::OpenOptionsExt, path::Path, process::Command};

use ferry_tests::{
    ferry, ferry_bin, needs_root, stderr,
    workload::{processes_mentioning, pid_alive, Workload, WorkloadOpts},
};


fn fails_with(o: &std::process::Output, needle: &str) {
    assert_eq!(o.status.code(), Some(1), "expected failure, stderr: {}", stderr(o));
    let err = stderr(o);
    assert_eq!(err.lines().count(), 1, "one line expected: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

fn checkpoint_args(pid: &str, dir: &Path) -> Vec<String> {
    vec!["checkpoint".into(), pid.into(), "--dir".into(), dir.to_str().unwrap().into()]
}

/// Gives `path` to user `uid`.
fn chown(path: &Path, uid: u32) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; -1 leaves the group as it is.
    assert_eq!(unsafe { libc::chown(c.as_ptr(), uid, u32::MAX) }, 0, "chown {}", path.display());
}

fn run(args: &[String]) -> std::process::Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ferry(&refs)
}

#[test]
fn targets_that_cannot_be_checkpointed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    fails_with(&run(&checkpoint_args("999999999", &dir)), "does not exist");
    fails_with(&run(&checkpoint_args("2", &dir)), "kernel thread");
    // ferry's own pid: the shell execs ferry under its own pid.
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("exec {} checkpoint $$ --dir {}", ferry_bin().display(), dir.display()))
        .output()
        .unwrap();
    fails_with(&o, "ferry itself");
    // A zombie: a child that exited and that we have not reaped yet.
    let mut child = Command::new("true").spawn().unwrap();
    let zpid = child.id() as i32;
    ferry_tests::wait_until("the child to become a zombie", std::time::Duration::from_secs(10), || {
        std::fs::read_to_string(format!("/proc/{zpid}/stat")).map(|s| s.contains(") Z")).unwrap_or(false)
    });
    fails_with(&run(&checkpoint_args(&zpid.to_string(), &dir)), "zombie");
    child.wait().unwrap();
    assert!(!dir.exists(), "a refused checkpoint writes nothing");
}

#[test]
fn a_request_without_the_creds_subsystem_is_refused_before_the_process_is_touched() {
    // Its process could only come back as root, with every capability.
    let mut w = Workload::spawn(&WorkloadOpts { files: false, ..Default::default() });
    w.wait_ticks(1);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    let mut args = checkpoint_args(&w.pid.to_string(), &dir);
    args.extend(["--subsystems".into(), "memory,threads,files,signals,process".into()]);
    fails_with(&run(&args), "its credentials (it would run as root), which no subsystem of the request (memory, threads, files, signals, process) carries");
    assert!(!dir.exists(), "a refused checkpoint writes nothing");
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 2);
    let pid = w.pid;
    w.terminate_and_check(pid).unwrap();
}

#[test]
fn a_request_that_would_leave_state_behind_is_refused_before_the_process_is_touched() {
    // `--subsystems memory` once killed the process and restored a copy that crashed.
    let mut w = Workload::spawn(&WorkloadOpts::default());
    w.wait_ticks(1);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    let mut args = checkpoint_args(&w.pid.to_string(), &dir);
    args.extend(["--subsystems".into(), "memory".into()]);
    let o = run(&args);
    fails_with(&o, &format!("process {} has its threads, its credentials (it would run as root), its working directory", w.pid));
    for lost in ["open file descriptors", "its signal handlers", "which no subsystem of the request (memory) carries"] {
        assert!(stderr(&o).contains(lost), "{lost}: {}", stderr(&o));
    }
    assert!(!dir.exists(), "a refused checkpoint writes nothing");
    // Through a migration too, before any daemon is asked (none listens there).
    let o = ferry(&["migrate", &w.pid.to_string(), "--to", "127.0.0.1:9", "--subsystems", "memory,threads"]);
    fails_with(&o, "which no subsystem of the request (memory, threads) carries");
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 2);
    let pid = w.pid;
    w.terminate_and_check(pid).unwrap();
}

#[test]
fn a_non_empty_image_directory_is_refused_and_the_target_runs_on() {
    let w = Workload::spawn(&WorkloadOpts { files: false, ..Default::default() });
    w.wait_ticks(1);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("precious"), "keep me").unwrap();
    fails_with(&run(&checkpoint_args(&w.pid.to_string(), tmp.path())), "not empty");
    assert_eq!(std::fs::read_to_string(tmp.path().join("precious")).unwrap(), "keep me");
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 2);
}

#[test]
fn an_unsupported_fd_fails_the_checkpoint_and_the_process_keeps_running() {
    if !needs_root("ferry seizes the process (ptrace of another user's process)") {
        return;
    }
    // python3 holding a TCP socket that is neither listening nor UDP.
    python_refused("s=socket.socket()", |_| {}, "socket");
}

#[test]
fn a_unix_listener_with_a_connection_waiting_is_refused_and_keeps_running() {
    if !needs_root("ferry seizes the process (ptrace of another user's process)") {
        return;
    }
    let mut waiting = None;
    let connect = |path: &Path| waiting = Some(std::os::unix::net::UnixStream::connect(path).expect("connecting to python's listener"));
    python_refused("s=socket.socket(socket.AF_UNIX)\ns.bind(PATH)\ns.listen()", connect, "listening with 1 connections waiting");
}

#[test]
fn a_unix_datagram_socket_with_a_datagram_queued_is_refused_and_keeps_running() {
    if !needs_root("ferry seizes the process (ptrace of another user's process)") {
        return;
    }
    let setup = "s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\ns.bind(PATH)\nc=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\nc.sendto(b'x', PATH)";
    python_refused(setup, |_| {}, "of datagrams with some queued");
}

/// python3 holding a socket that `setup` makes (`PATH`: a path in a fresh directory),
/// ticking into a log; once it ticks, `before` runs with that path. Its checkpoint must
/// fail naming `needle`, leave no image, and leave python running.
fn python_refused(setup: &str, before: impl FnOnce(&Path), needle: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    let path = tmp.path().join("sock");
    let script = format!(
        "import socket,time\nPATH='{}'\n{setup}\nn=0\nwhile True:\n n+=1\n open('{}','a').write('tick %d\\n'%n)\n time.sleep(0.02)\n",
        path.display(),
        log.display()
    );
    let mut child = Command::new("/usr/bin/python3").arg("-c").arg(&script).spawn().unwrap();
    let pid = child.id() as i32;
    let ticks = || std::fs::read_to_string(&log).map(|s| s.lines().count()).unwrap_or(0);
    ferry_tests::wait_until("python ticks", std::time::Duration::from_secs(30), || ticks() >= 2);
    before(&path);
    let dir = tmp.path().join("img");
    let o = run(&checkpoint_args(&pid.to_string(), &dir));
    fails_with(&o, needle);
    assert!(!dir.exists(), "the partial image is removed");
    let n = ticks();
    ferry_tests::wait_until("python to carry on", std::time::Duration::from_secs(30), || ticks() >= n + 2);
    assert!(pid_alive(pid));
    let _ = child.kill();
    let _ = child.wait();
}

/// A checkpointed image of a small workload, the workload killed.
fn image_of_workload() -> (tempfile::TempDir, std::path::PathBuf, Workload) {
    let w = Workload::spawn(&WorkloadOpts { files: false, ..Default::default() });
    w.wait_ticks(1);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    let o = run(&checkpoint_args(&w.pid.to_string(), &dir));
    assert!(o.status.success(), "{}", stderr(&o));
    // Killed by the checkpoint, it may still be freeing its memory (ferry does not wait
    // for that): gone before the test counts processes.
    let pid = w.pid;
    ferry_tests::wait_until("the checkpointed process gone", std::time::Duration::from_secs(30), || !pid_alive(pid));
    (tmp, dir, w)
}

#[test]
fn corrupted_images_are_refused_without_leaving_a_process() {
    if !needs_root("ferry seizes the process (ptrace of another user's process)") {
        return;
    }
    let (_tmp, dir, w) = image_of_workload();
    let log = w.log.to_string_lossy().into_owned();
    let before = processes_mentioning(&log);
    let restore = || run(&["restore".into(), "--dir".into(), dir.to_str().unwrap().into()]);
    let pages = dir.join("stream-1.img");
    let original = std::fs::read(&pages).unwrap();

    // A flipped byte in the middle of the memory stream.
    let mut flipped = original.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    std::fs::write(&pages, &flipped).unwrap();
    fails_with(&restore(), "checksum");

    // The stream cut short.
    std::fs::write(&pages, &original[..original.len() - 100]).unwrap();
    fails_with(&restore(), "truncated");
    std::fs::write(&pages, &original).unwrap();

    // An image of another format version.
    let inv_path = dir.join("stream-0.img");
    let inv = std::fs::read(&inv_path).unwrap();
    let mut other = inv.clone();
    other[8..12].copy_from_slice(&7u32.to_le_bytes());
    std::fs::write(&inv_path, &other).unwrap();
    fails_with(&restore(), "version 7");
    // No inventory at all: an interrupted checkpoint.
    std::fs::remove_file(&inv_path).unwrap();
    fails_with(&restore(), "missing");
    std::fs::write(&inv_path, &inv).unwrap();

    assert_eq!(processes_mentioning(&log), before, "a failed restore leaves no process behind");
    // The repaired image restores.
    let o = restore();
    assert!(o.status.success(), "{}", stderr(&o));
    let pid: i32 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    ferry_tests::workload::kill_pid(pid);
}

#[test]
fn a_mapped_file_that_changed_is_refused() {
    if !needs_root("ferry seizes the process (ptrace of another user's process)") {
        return;
    }
    // Run a private copy of the workload binary, then change the copy.
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("workload");
    std::fs::copy(ferry_tests::workload::workload_bin(), &bin).unwrap();
    let log = tmp.path().join("log");
    // Other tests fork while the copy is open for writing: exec may see ETXTBSY for a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut child = loop {
        match Command::new(&bin).args(["--log", log.to_str().unwrap(), "--no-files"]).spawn() {
            Ok(c) => break c,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => panic!("spawning {}: {e}", bin.display()),
        }
    };
    let pid = child.id() as i32;
    ferry_tests::wait_until("ticks", std::time::Duration::from_secs(30), || {
        std::fs::read_to_string(&log).map(|s| s.contains("tick 1")).unwrap_or(false)
    });
    let dir = tmp.path().join("img");
    let o = run(&checkpoint_args(&pid.to_string(), &dir));
    assert!(o.status.success(), "{}", stderr(&o));
    let _ = child.wait();
    let mut f = std::fs::OpenOptions::new().append(true).mode(0o755).open(&bin).unwrap();
    std::io::Write::write_all(&mut f, b"changed").unwrap();
    drop(f);
    fails_with(&run(&["restore".into(), "--dir".into(), dir.to_str().unwrap().into()]), "changed since the checkpoint");
}

#[test]
fn an_image_others_could_have_changed_is_refused() {
    // A root restore trusts the image's records: only root (or the caller) may have
    // been able to change the directory or any file in it.
    if !needs_root("giving a file to another user (chown)") {
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (_tmp, dir, w) = image_of_workload();
    let log = w.log.to_string_lossy().into_owned();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&dir), 0o700, "the image directory is private");
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(mode(&p), 0o600, "{} is private", p.display());
        assert_eq!(std::fs::metadata(&p).unwrap().uid(), 0);
    }
    let before = processes_mentioning(&log);
    let restore = || run(&["restore".into(), "--dir".into(), dir.to_str().unwrap().into()]);
    let chmod = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    let pages = dir.join("stream-1.img");
    chmod(&pages, 0o666);
    fails_with(&restore(), "stream-1.img: writable by group or others (mode 666): refusing to restore from it");
    chmod(&pages, 0o600);
    chmod(&dir, 0o770);
    fails_with(&restore(), "writable by group or others (mode 770)");
    chmod(&dir, 0o700);
    chown(&pages, 65534);
    fails_with(&restore(), "owned by uid 65534");
    chown(&pages, 0);
    assert_eq!(processes_mentioning(&log), before, "a refused restore starts nothing");
    let o = restore();
    assert!(o.status.success(), "{}", stderr(&o));
    let pid: i32 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    ferry_tests::workload::kill_pid(pid);
}

#[test]
fn an_existing_image_directory_becomes_private_or_is_refused() {
    if !needs_root("giving a file to another user (chown)") {
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let w = Workload::spawn(&WorkloadOpts { files: false, ..Default::default() });
    w.wait_ticks(1);
    let tmp = tempfile::tempdir().unwrap();
    // Owned by another user: an image there could be swapped before the restore.
    let theirs = tmp.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    chown(&theirs, 65534);
    fails_with(&run(&checkpoint_args(&w.pid.to_string(), &theirs)), "owned by uid 65534");
    assert!(pid_alive(w.pid), "a refused checkpoint leaves the process running");
    // Ours but open to all: it becomes 0700.
    let open = tmp.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let o = run(&checkpoint_args(&w.pid.to_string(), &open));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::metadata(&open).unwrap().mode() & 0o7777, 0o700);
}

#[test]
fn a_caller_who_is_not_root_cannot_take_another_user_s_process() {
    if !needs_root("running ferry as another user (setuid)") {
        return;
    }
    // A root-owned process; ferry run as nobody (setpriv, from util-linux).
    let w = Workload::spawn(&WorkloadOpts { files: false, ..Default::default() });
    w.wait_ticks(1);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let dir = tmp.path().join("img");
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(ferry_bin())
        .args(["--plugin-dir", ferry_tests::plugin_dir().to_str().unwrap()])
        .args(checkpoint_args(&w.pid.to_string(), &dir))
        .output()
        .unwrap();
    fails_with(&o, &format!("process {} is owned by uid 0, and only root may take another user's process", w.pid));
    assert!(!dir.exists(), "a refused checkpoint writes nothing");
    let ticks = w.ticks().len() as u64;
    w.wait_ticks(ticks + 1);
}

#[test]
fn a_caller_without_root_is_told_up_front_that_ferry_needs_root() {
    if !needs_root("running ferry as another user (setuid)") {
        return;
    }
    // Its own process: the checkpoint went on until a plugin's EACCES deep inside
    // ("checkpoint failed in plugin files: fd 251: opening /proc/N/fd/251 … Permission
    // denied"); a restore as far as the image.
    let nobody = ["--reuid=65534", "--regid=65534", "--clear-groups"];
    let mut own = Command::new("setpriv").args(nobody).args(["sleep", "60"]).spawn().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let dir = tmp.path().join("img");
    let as_nobody = |args: Vec<String>| {
        Command::new("setpriv")
            .args(nobody)
            .arg(ferry_bin())
            .args(["--plugin-dir", ferry_tests::plugin_dir().to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    };
    let o = as_nobody(checkpoint_args(&own.id().to_string(), &dir));
    let needs = "ferry needs root (CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_CHECKPOINT_RESTORE), and it runs as uid 65534";
    fails_with(&o, &format!("process {} is out of reach: {needs}", own.id()));
    assert!(!dir.exists(), "a refused checkpoint writes nothing");
    assert!(own.try_wait().unwrap().is_none(), "the process died of a refused checkpoint");
    let o = as_nobody(vec!["restore".into(), "--dir".into(), dir.to_str().unwrap().into()]);
    fails_with(&o, needs);
    let _ = own.kill();
    let _ = own.wait();
}

#[test]
fn a_stream_that_is_not_a_regular_file_is_refused_not_waited_on() {
    if !needs_root("ferry seizes the process (ptrace of another user's process)") {
        return;
    }
    // A FIFO in place of a stream once made `ferry show` wait forever (and restore until
    // the watchdog). `timeout` turns a hang into a failure rather than a stuck test.
    let (_tmp, dir, w) = image_of_workload();
    let log = w.log.to_string_lossy().into_owned();
    let pages = dir.join("stream-1.img");
    std::fs::remove_file(&pages).unwrap();
    let c = std::ffi::CString::new(pages.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let before = processes_mentioning(&log);
    for cmd in ["show", "restore"] {
        let mut args = vec!["20".to_string(), ferry_bin().display().to_string(), cmd.into()];
        if cmd == "restore" {
            args.push("--dir".into());
        }
        args.push(dir.display().to_string());
        let o = Command::new("timeout").args(&args).output().unwrap();
        fails_with(&o, "stream-1.img is not a regular file (a FIFO)");
    }
    assert_eq!(processes_mentioning(&log), before, "a failed restore leaves no process behind");
}

#[test]
fn a_process_another_tracer_holds_is_refused_by_name() {
    if !needs_root("ferry seizes the process (ptrace of another user's process)") {
        return;
    }
    // As a debugger would: this test seizes a child (without stopping it).
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = child.id() as i32;
    // SAFETY: PTRACE_SEIZE of our own child, no address or data. The tracer is this
    // thread (TracerPid names it; gettid has no preconditions).
    assert_eq!(unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) }, 0);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    fails_with(&run(&checkpoint_args(&pid.to_string(), &dir)), &format!("process {pid} is already traced by process {}", unsafe { libc::gettid() }));
    assert!(!dir.exists());
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_sealed_mapping_is_refused_naming_the_process_and_range_and_the_process_runs_on() {
    if !needs_root("ferry seizes the process (ptrace of another user's process)") {
        return;
    }
    // mseal(2) forbids remaking the area; dropping the seal would free the copy of a
    // restriction the process chose.
    let mut w = Workload::spawn(&WorkloadOpts { files: false, mm_sealed: true, ..Default::default() });
    w.wait_ticks(1);
    let (start, end) = w.region("mmf-sealed");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    let o = run(&checkpoint_args(&w.pid.to_string(), &dir));
    fails_with(&o, "sealed (mseal)");
    let err = stderr(&o);
    assert!(err.contains(&format!("process {}", w.pid)) && err.contains(&format!("{start:#x}-{end:#x}")), "{err}");
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 2);
    let pid = w.pid;
    w.terminate_and_check(pid).unwrap();
}

#[test]
fn a_process_that_forbids_writable_executable_memory_is_refused_and_runs_on() {
    if !needs_root("ferry seizes the process (ptrace of another user's process)") {
        return;
    }
    // PR_SET_MDWE (65) with PR_MDWE_REFUSE_EXEC_GAIN (1): ferry's scratch area, which its
    // injected code runs from, cannot be mapped there. It once failed as "errno 13".
    python_refused(
        "import ctypes\nassert ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) == 0",
        |_| {},
        "forbidding writable-executable memory (PR_SET_MDWE)",
    );
}

#[test]
fn a_process_in_a_pid_or_user_namespace_of_its_own_is_refused_and_runs_on() {
    if !needs_root("unshare of pid and user namespaces, and a checkpoint") {
        return;
    }
    // `unshare --pid --fork`: the process (pid 1 in its namespace) would come back under
    // a host pid, seeing every process; `unshare --user`: its ids would mean others.
    for (flags, ns) in [(&["--pid", "--fork", "--mount-proc"][..], "pid"), (&["--user", "--map-root-user"][..], "user")] {
        let mut outer = Command::new("unshare").args(flags).args(["sleep", "600"]).spawn().unwrap();
        let outer_pid = outer.id() as i32;
        // With --fork the process in the namespace is unshare's child.
        let target = if ns == "pid" {
            let mut child = 0;
            ferry_tests::wait_until("unshare's child", std::time::Duration::from_secs(10), || {
                child = std::fs::read_to_string(format!("/proc/{outer_pid}/task/{outer_pid}/children"))
                    .ok()
                    .and_then(|c| c.split_whitespace().next()?.parse().ok())
                    .unwrap_or(0);
                child > 0
            });
            child
        } else {
            ferry_tests::wait_until("unshare to enter its namespace", std::time::Duration::from_secs(10), || {
                std::fs::read_link(format!("/proc/{outer_pid}/ns/user")).ok() != std::fs::read_link("/proc/self/ns/user").ok()
            });
            outer_pid
        };
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("img");
        // The tree from unshare down (the pid case) and the process alone are refused alike.
        for pid in [outer_pid, target] {
            let o = run(&checkpoint_args(&pid.to_string(), &dir));
            fails_with(&o, &format!("process {target} is in a {ns} namespace of its own"));
            assert!(pid_alive(target) && pid_alive(outer_pid), "{ns}: left running");
        }
        assert!(!dir.exists(), "a refused checkpoint writes nothing");
        // SAFETY: killing the processes this test started.
        unsafe { libc::kill(target, libc::SIGKILL) };
        let _ = outer.kill();
        let _ = outer.wait();
    }
}
