//! inotify, fanotify and pidfds (issue 12): the workload's instances come back with the
//! same watch numbers and masks, its marks and its pidfds (to itself, its main thread,
//! an exited child) after a restore and a migration with every strategy, and check
//! themselves from inside; queued events and a pidfd to another process are refused
//! with one line and the source carries on; `tail -f` follows its file across a restore.

use std::{
    fs::File,
    io::Write,
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use ferry_tests::{
    daemon::migrate,
    fails_with,
    daemon::Daemon,
    ferry, needs_root, stderr, wait_until,
    workload::{kill_pid, pid_alive, Workload, WorkloadOpts, DEADLINE},
};

const ROOT: &str = "checkpoint, restore and migration (ptrace, PR_SET_MM_MAP, clone3 set_tid), fanotify (CAP_SYS_ADMIN)";

fn all() -> WorkloadOpts {
    WorkloadOpts { threads: 1, inotify: true, fanotify: true, pidfd: true, ..Default::default() }
}

fn checkpoint(pid: i32, dir: &Path) -> Output {
    ferry(&["checkpoint", &pid.to_string(), "--dir", dir.to_str().unwrap()])
}

/// `ferry restore --dir DIR --json`: the new pid of `old`.
fn restore(dir: &Path, old: i32) -> i32 {
    let o = ferry(&["restore", "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    stats["pids"][old.to_string()].as_i64().unwrap_or_else(|| panic!("no pid for {old} in {stats}")) as i32
}


/// Pids (not ours) whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| p != me && pid_alive(p))
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline")).map(|c| String::from_utf8_lossy(&c).contains(needle)).unwrap_or(false)
        })
        .collect()
}

/// Kills, when dropped, every process that mentions a path (a copy under any pid).
struct KillMentioning(String);

impl Drop for KillMentioning {
    fn drop(&mut self) {
        for p in processes_mentioning(&self.0) {
            kill_pid(p);
        }
    }
}

fn spawn(opts: &WorkloadOpts) -> (Workload, KillMentioning) {
    let w = Workload::spawn(opts);
    let guard = KillMentioning(w.log.to_str().unwrap().to_string());
    w.wait_ready();
    w.wait_ticks(3);
    (w, guard)
}

/// The link texts of process `pid`'s fds that `keep` accepts.
fn links(pid: i32, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| keep(l))
        .collect();
    out.sort();
    out
}

fn notify_links(pid: i32) -> Vec<String> {
    links(pid, |l| l.contains("inotify") || l.contains("fanotify") || l.contains("pidfd"))
}

#[test]
fn inotify_fanotify_and_pidfds_come_back_after_a_restore() {
    if !needs_root(ROOT) {
        return;
    }
    let (mut w, _guard) = spawn(&all());
    let before = notify_links(w.pid);
    assert_eq!(before.len(), 6, "{before:?}");
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let o = checkpoint(w.pid, &dir);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    w.reap();
    let at = *w.ticks().last().unwrap();
    let new = restore(&dir, w.pid);
    w.adopt(new);
    assert_eq!(notify_links(new), before);
    w.wait_ticks(at + 3);
    w.terminate_and_check(new).unwrap();
}


#[test]
fn inotify_fanotify_and_pidfds_move_with_every_strategy() {
    if !needs_root(ROOT) {
        return;
    }
    let daemon = Daemon::start();
    for strategy in ["stop-copy", "pre-copy", "post-copy", "hybrid"] {
        let (mut w, _guard) = spawn(&WorkloadOpts { dirty_pages: 4, ..all() });
        let before = notify_links(w.pid);
        let old = w.pid;
        let o = migrate(old, &daemon.addr, strategy);
        assert!(o.status.success(), "{strategy}: {}", stderr(&o));
        let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(stats["strategy"], strategy, "{stats}");
        let new = stats["pids"][old.to_string()].as_i64().unwrap() as i32;
        wait_until("the source to be gone", Duration::from_secs(30), || !pid_alive(old));
        w.adopt(new);
        assert_eq!(notify_links(new), before, "{strategy}");
        let at = *w.ticks().last().unwrap();
        w.wait_ticks(at + 3);
        w.terminate_and_check(new).unwrap_or_else(|e| panic!("{strategy}: {e}"));
    }
}

#[test]
fn queued_inotify_and_fanotify_events_are_refused_with_one_line_and_the_process_carries_on() {
    if !needs_root(ROOT) {
        return;
    }
    let daemon = Daemon::start();
    let inotify = WorkloadOpts { inotify: true, ..Default::default() };
    let fanotify = WorkloadOpts { fanotify: true, ..Default::default() };
    for (opts, file, needle) in [
        // An event the workload does not read until its check (which skips it).
        (inotify, "notify/in-dir/poke", "anon_inode:inotify): 32 bytes of inotify events queued"),
        // Events the check reads along with its own (merged or not: their size may vary).
        (fanotify, "notify/fan-file", "bytes of fanotify events queued"),
    ] {
        let (mut w, _guard) = spawn(&opts);
        let log = w.log.to_str().unwrap().to_string();
        // Queued by the time the call returns.
        std::fs::write(w.files_dir().join(file), "poke").unwrap();
        let image = tempfile::tempdir().unwrap();
        let o = checkpoint(w.pid, &image.path().join("img"));
        let pid = w.pid.to_string();
        fails_with(&o, &[&format!("process {pid}"), needle, "retry"]);
        let o = migrate(w.pid, &daemon.addr, "stop-copy");
        fails_with(&o, &[&format!("process {pid}"), "events queued"]);
        assert_eq!(processes_mentioning(&log), vec![w.pid], "no copy is left");
        let at = *w.ticks().last().unwrap();
        w.wait_ticks(at + 3);
        let pid = w.pid;
        w.terminate_and_check(pid).unwrap();
    }
}

/// The children of process `pid`.
fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect()
}

#[test]
fn a_pidfd_to_another_process_is_refused_with_one_line_naming_it_and_the_process_carries_on() {
    if !needs_root(ROOT) {
        return;
    }
    let daemon = Daemon::start();
    let (mut w, _guard) = spawn(&WorkloadOpts { pidfd_other: true, ..Default::default() });
    let child = children(w.pid);
    assert_eq!(child.len(), 1, "the workload's child: {child:?}");
    let image = tempfile::tempdir().unwrap();
    let o = checkpoint(w.pid, &image.path().join("img"));
    let needles = [format!("process {}", w.pid), "anon_inode:[pidfd]".into(), format!("a pidfd to process {}", child[0])];
    fails_with(&o, &needles.iter().map(String::as_str).collect::<Vec<_>>());
    // A migration (which takes the tree) refuses it the same way.
    let o = migrate(w.pid, &daemon.addr, "post-copy");
    fails_with(&o, &needles.iter().map(String::as_str).collect::<Vec<_>>());
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 3);
    let pid = w.pid;
    // Its check kills the child through the pidfd and waits for it.
    w.terminate_and_check(pid).unwrap();
    assert!(!pid_alive(child[0]));
}

/// Spawns `argv` detached from the harness, in `dir`, its output into `out`.
fn spawn_program(argv: &[&std::ffi::OsStr], dir: &Path, out: &Path) -> Child {
    let sink = File::create(out).unwrap();
    Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(sink.try_clone().unwrap())
        .stderr(sink)
        .current_dir(dir)
        .spawn()
        .unwrap()
}

/// Starts `argv` following `followed` (its output into `out`), waits until it printed
/// `first`, checkpoints and restores it, appends a line to the file and waits for the
/// restored copy to print `then`.
fn follows_across_a_restore(argv: &[&std::ffi::OsStr], tmp: &Path, followed: &Path, first: &str, then: &str) {
    let out = tmp.join("out");
    let mut child = spawn_program(argv, tmp, &out);
    let pid = child.id() as i32;
    let text = || std::fs::read_to_string(&out).unwrap_or_default();
    wait_until("the program to start following", DEADLINE, || text() == first);
    wait_until("an inotify instance", DEADLINE, || !links(pid, |l| l.contains("inotify")).is_empty());
    let dir = tmp.join("img");
    let o = checkpoint(pid, &dir);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    child.wait().unwrap();
    let new = restore(&dir, pid);
    let mut f = File::options().append(true).open(followed).unwrap();
    f.write_all(b"second\n").unwrap();
    drop(f);
    wait_until("the restored copy to print the new line", DEADLINE, || text() == then || !pid_alive(new));
    assert_eq!(text(), then);
    assert!(pid_alive(new));
    kill_pid(new);
}

/// python3 reading inotify events (ctypes), blocked in read(2) when checkpointed, sees
/// the file it watches modified after the restore, under the same wd.
#[test]
fn python_reading_inotify_events_sees_a_change_after_a_restore() {
    if !needs_root(ROOT) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _guard = KillMentioning(tmp.path().to_str().unwrap().to_string());
    let followed = tmp.path().join("followed");
    std::fs::write(&followed, "first\n").unwrap();
    let script = "import ctypes,os,struct,sys\n\
        libc = ctypes.CDLL(None, use_errno=True)\n\
        fd = libc.inotify_init1(0)\n\
        libc.inotify_add_watch(fd, os.path.dirname(sys.argv[1]).encode(), 0x400)\n\
        wd = libc.inotify_add_watch(fd, sys.argv[1].encode(), 0x2)\n\
        print('watching', wd, flush=True)\n\
        while True:\n\
        \x20   data = os.read(fd, 4096)\n\
        \x20   w, mask, cookie, n = struct.unpack_from('iIII', data)\n\
        \x20   print('event', w, hex(mask), flush=True)\n";
    let argv = ["/usr/bin/python3".as_ref(), "-c".as_ref(), script.as_ref(), followed.as_os_str()];
    follows_across_a_restore(&argv, tmp.path(), &followed, "watching 2\n", "watching 2\nevent 2 0x2\n");
}

/// python3 waiting in epoll on its inotify instance (the epoll instance is rebuilt
/// after the inotify one it watches) sees a change after a restore.
#[test]
fn python_waiting_in_epoll_on_inotify_sees_a_change_after_a_restore() {
    if !needs_root(ROOT) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _guard = KillMentioning(tmp.path().to_str().unwrap().to_string());
    let followed = tmp.path().join("followed");
    std::fs::write(&followed, "first\n").unwrap();
    let script = "import ctypes,os,select,struct,sys\n\
        libc = ctypes.CDLL(None, use_errno=True)\n\
        ep = select.epoll()\n\
        fd = libc.inotify_init1(os.O_NONBLOCK)\n\
        ep.register(fd, select.EPOLLIN)\n\
        print('watching', libc.inotify_add_watch(fd, sys.argv[1].encode(), 0x2), flush=True)\n\
        while True:\n\
        \x20   for f, _ in ep.poll():\n\
        \x20       w, mask, cookie, n = struct.unpack_from('iIII', os.read(f, 4096))\n\
        \x20       print('event', w, hex(mask), flush=True)\n";
    let argv = ["/usr/bin/python3".as_ref(), "-c".as_ref(), script.as_ref(), followed.as_os_str()];
    follows_across_a_restore(&argv, tmp.path(), &followed, "watching 1\n", "watching 1\nevent 1 0x2\n");
}

/// A watch on a file deleted while open elsewhere is refused with one line; the process
/// carries on.
#[test]
fn a_watch_on_a_deleted_file_is_refused_with_one_line() {
    if !needs_root(ROOT) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _guard = KillMentioning(tmp.path().to_str().unwrap().to_string());
    let watched = tmp.path().join("watched");
    std::fs::write(&watched, "x").unwrap();
    let script = "import ctypes,os,sys,time\n\
        libc = ctypes.CDLL(None, use_errno=True)\n\
        keep = open(sys.argv[1])\n\
        fd = libc.inotify_init1(0)\n\
        print('watching', libc.inotify_add_watch(fd, sys.argv[1].encode(), 0x2), flush=True)\n\
        while True:\n\
        \x20   time.sleep(0.02)\n";
    let out = tmp.path().join("out");
    let argv = ["/usr/bin/python3".as_ref(), "-c".as_ref(), script.as_ref(), watched.as_os_str()];
    let mut child = spawn_program(&argv, tmp.path(), &out);
    let pid = child.id() as i32;
    wait_until("python to watch", DEADLINE, || std::fs::read_to_string(&out).unwrap_or_default() == "watching 1\n");
    std::fs::remove_file(&watched).unwrap();
    let o = checkpoint(pid, &tmp.path().join("img"));
    fails_with(&o, &[&format!("process {pid}"), "anon_inode:inotify", "watch 1", "deleted"]);
    assert!(pid_alive(pid), "the process carries on");
    let _ = child.kill();
    let _ = child.wait();
}

/// Unmounts, when dropped, a mount the test made.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The `fanotify` lines of fdinfo of `pid`'s fd `fd`, sorted.
fn fanotify_lines(pid: i32, fd: i32) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
    let mut lines: Vec<String> = text.lines().filter(|l| l.starts_with("fanotify")).map(str::to_owned).collect();
    lines.sort();
    lines
}

/// A fanotify mount mark (on a tmpfs of the test's, where nothing else happens) and an
/// inode mark with only an ignored mask surviving modification come back as they were.
#[test]
fn fanotify_mount_marks_and_ignored_masks_come_back_exactly() {
    if !needs_root(ROOT) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _guard = KillMentioning(tmp.path().to_str().unwrap().to_string());
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    assert!(Command::new("mount").args(["-t", "tmpfs", "ferry-notify"]).arg(&mnt).status().unwrap().success());
    let _unmount = Unmount(mnt.clone());
    let quiet = tmp.path().join("quiet");
    std::fs::write(&quiet, "x").unwrap();
    let script = "import ctypes,os,sys,time\n\
        libc = ctypes.CDLL(None, use_errno=True)\n\
        libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]\n\
        fd = libc.fanotify_init(0x3, os.O_RDONLY)\n\
        a = libc.fanotify_mark(fd, 0x11, 0x8, -100, sys.argv[1].encode())\n\
        b = libc.fanotify_mark(fd, 0x61, 0x2, -100, sys.argv[2].encode())\n\
        print('marked', fd, a, b, flush=True)\n\
        while True:\n\
        \x20   time.sleep(0.02)\n";
    let out = tmp.path().join("out");
    let argv = ["/usr/bin/python3".as_ref(), "-c".as_ref(), script.as_ref(), mnt.as_os_str(), quiet.as_os_str()];
    let mut child = spawn_program(&argv, tmp.path(), &out);
    let pid = child.id() as i32;
    wait_until("python to mark", DEADLINE, || std::fs::read_to_string(&out).unwrap_or_default() == "marked 3 0 0\n");
    let before = fanotify_lines(pid, 3);
    assert!(before.iter().any(|l| l.contains("mnt_id:") && l.contains("mask:8")), "{before:?}");
    assert!(before.iter().any(|l| l.contains("mflags:40 mask:0 ignored_mask:2")), "{before:?}");
    let dir = tmp.path().join("img");
    let o = checkpoint(pid, &dir);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    child.wait().unwrap();
    let new = restore(&dir, pid);
    assert_eq!(fanotify_lines(new, 3), before);
    kill_pid(new);
}

/// A fanotify mark ferry cannot make again exactly is refused with one line naming it,
/// the process left running: one for permission events, one on a whole file system.
#[test]
fn fanotify_permission_and_filesystem_marks_are_refused_with_one_line() {
    if !needs_root(ROOT) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _guard = KillMentioning(tmp.path().to_str().unwrap().to_string());
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    assert!(Command::new("mount").args(["-t", "tmpfs", "ferry-notify"]).arg(&mnt).status().unwrap().success());
    let _unmount = Unmount(mnt.clone());
    let quiet = mnt.join("quiet");
    std::fs::write(&quiet, "x").unwrap();
    // (init class, mark flags, mask, path): FAN_CLASS_CONTENT with FAN_OPEN_PERM on a
    // file nothing opens; FAN_MARK_FILESYSTEM with FAN_CLOSE_WRITE on the quiet tmpfs.
    for (class, flags, mask, path, needle) in [
        (0x4, 0x1, 0x10000, &quiet, "a fanotify mark for permission events"),
        (0x0, 0x101, 0x8, &mnt, "a fanotify mark on the whole file system"),
    ] {
        let script = format!(
            "import ctypes,os,sys,time\n\
             libc = ctypes.CDLL(None, use_errno=True)\n\
             libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]\n\
             fd = libc.fanotify_init({class} | 0x1, os.O_RDONLY)\n\
             print('marked', fd, libc.fanotify_mark(fd, {flags}, {mask}, -100, sys.argv[1].encode()), flush=True)\n\
             while True:\n\
             \x20   time.sleep(0.02)\n"
        );
        let out = tmp.path().join("out");
        let argv = ["/usr/bin/python3".as_ref(), "-c".as_ref(), script.as_ref(), path.as_os_str()];
        let mut child = spawn_program(&argv, tmp.path(), &out);
        let pid = child.id() as i32;
        wait_until("python to mark", DEADLINE, || std::fs::read_to_string(&out).unwrap_or_default() == "marked 3 0\n");
        let o = checkpoint(pid, &tmp.path().join("img"));
        fails_with(&o, &[&format!("process {pid}: fd 3 (anon_inode:[fanotify])"), needle, "not supported"]);
        assert!(pid_alive(pid), "the process carries on");
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A pidfd to a thread other than the main one (`PIDFD_THREAD`) is refused with one line
/// naming the thread: the files plugin rebuilds fds before the threads exist.
#[test]
fn a_pidfd_to_another_thread_is_refused_with_one_line_naming_it() {
    if !needs_root(ROOT) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _guard = KillMentioning(tmp.path().to_str().unwrap().to_string());
    let script = "import os,threading,time\n\
        t = threading.Thread(target=lambda: time.sleep(3600), daemon=True)\n\
        t.start()\n\
        fd = os.pidfd_open(t.native_id, os.O_EXCL)\n\
        print('thread', t.native_id, 'fd', fd, flush=True)\n\
        while True:\n\
        \x20   time.sleep(0.02)\n";
    let out = tmp.path().join("out");
    let argv = ["/usr/bin/python3".as_ref(), "-c".as_ref(), script.as_ref(), tmp.path().as_os_str()];
    let mut child = spawn_program(&argv, tmp.path(), &out);
    let pid = child.id() as i32;
    let text = || std::fs::read_to_string(&out).unwrap_or_default();
    wait_until("python to open the pidfd", DEADLINE, || text().ends_with('\n'));
    let words: Vec<String> = text().split_whitespace().map(str::to_owned).collect();
    assert_eq!(words.len(), 4, "{}", text());
    let o = checkpoint(pid, &tmp.path().join("img"));
    let fd_line = format!("process {pid}: fd {} (anon_inode:[pidfd])", words[3]);
    fails_with(&o, &[&fd_line, &format!("a pidfd to thread {} of the process", words[1])]);
    assert!(pid_alive(pid), "the process carries on");
    let _ = child.kill();
    let _ = child.wait();
}

/// `tail -f` (which follows with inotify, waiting in poll without a timeout)
/// checkpointed and restored prints what is appended to its file afterwards.
#[test]
fn tail_f_follows_its_file_across_a_restore() {
    if !needs_root(ROOT) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _guard = KillMentioning(tmp.path().to_str().unwrap().to_string());
    let followed = tmp.path().join("followed");
    std::fs::write(&followed, "first\n").unwrap();
    let argv = ["tail".as_ref(), "-f".as_ref(), followed.as_os_str()];
    follows_across_a_restore(&argv, tmp.path(), &followed, "first\n", "first\nsecond\n");
}
