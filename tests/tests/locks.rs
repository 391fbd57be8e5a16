//! File locks and pseudo-terminals (issue 13): the POSIX, lockf, OFD and flock locks a
//! process holds come back with it after a restore and a migration, or the event fails
//! with one line and the process carries on; sqlite3 inside BEGIN EXCLUSIVE keeps its
//! database; a pseudo-terminal pair is refused, a shell's terminal still reopened.

use std::{
    fs::File,
    io::Read,
    net::TcpListener,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{fs::OpenOptionsExt, process::CommandExt},
    },
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use ferry_tests::{
    daemon::migrate,
    fails_with,
    ferry, ferry_bin, needs_root, stderr, wait_until,
    workload::{processes_mentioning, kill_pid, pid_alive, workloads_dir, Workload, WorkloadOpts, DEADLINE},
};

/// Why every test here needs root (see `ferry_tests::needs_root`).
const ROOT: &str = "checkpoint, restore and migration (ptrace, PR_SET_MM_MAP, clone3 set_tid)";

fn checkpoint(pid: i32, dir: &Path) -> Output {
    ferry(&["checkpoint", &pid.to_string(), "--dir", dir.to_str().unwrap()])
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


/// Kills, when dropped, every process that mentions a path (a copy restored under any pid).
struct KillMentioning(String);

impl Drop for KillMentioning {
    fn drop(&mut self) {
        for p in processes_mentioning(&self.0) {
            kill_pid(p);
        }
    }
}

/// Opens `path` of the workload's files from this process: another process, another
/// description.
fn open(path: &Path) -> File {
    File::options().read(true).write(true).open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `flock(fd, op | LOCK_NB)` from here; Ok, or the errno.
fn try_flock(f: &File, op: i32) -> Result<(), i32> {
    // SAFETY: flock on an fd we own.
    match unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)),
    }
}

/// The POSIX lock (type, start, len, pid) a write lock on byte `at` of `f` would meet.
fn posix_lock_at(f: &File, at: i64) -> (i32, i64, i64, i32) {
    // SAFETY: struct flock is plain data.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = at;
    fl.l_len = 1;
    // SAFETY: F_GETLK fills the struct flock we pass.
    assert_eq!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut fl) }, 0, "F_GETLK");
    (fl.l_type as i32, fl.l_start, fl.l_len, fl.l_pid)
}

/// What a user checks from outside: process `pid` holds the workload's locks.
fn holds_the_locks(files: &Path, pid: i32) {
    let posix = open(&files.join("lock-posix"));
    assert_eq!(posix_lock_at(&posix, 3), (libc::F_WRLCK, 0, 10, pid), "POSIX write lock on bytes 0-9");
    assert_eq!(posix_lock_at(&posix, 5000), (libc::F_RDLCK, 100, 0, pid), "POSIX read lock from byte 100");
    let flock = open(&files.join("lock-flock"));
    assert_eq!(try_flock(&flock, libc::LOCK_SH), Err(libc::EWOULDBLOCK), "the workload's LOCK_EX keeps others out");
    let shared = open(&files.join("lock-shared"));
    assert_eq!(try_flock(&shared, libc::LOCK_EX), Err(libc::EWOULDBLOCK), "the workload's LOCK_SH keeps writers out");
}

/// A locking workload, ready and ticking, and a guard that kills whatever copy of it a
/// failed assertion would leave (a copy made under a pid the workload never adopted).
fn locking_workload() -> (Workload, KillMentioning) {
    let w = Workload::spawn(&WorkloadOpts { threads: 1, locks: true, ..Default::default() });
    let guard = KillMentioning(w.log.to_str().unwrap().to_string());
    w.wait_ready();
    w.wait_ticks(3);
    (w, guard)
}

#[test]
fn every_lock_kind_comes_back_after_a_restore() {
    if !needs_root(ROOT) {
        return;
    }
    let (mut w, _guard) = locking_workload();
    holds_the_locks(&w.files_dir(), w.pid);
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let o = checkpoint(w.pid, &dir);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    w.reap();
    let at = *w.ticks().last().unwrap();
    let new = restore(&dir, w.pid).unwrap_or_else(|o| panic!("restore: {}", stderr(&o)));
    w.adopt(new);
    holds_the_locks(&w.files_dir(), new);
    w.wait_ticks(at + 3);
    w.terminate_and_check(new).unwrap();
}

#[test]
fn a_lock_taken_meanwhile_fails_the_restore_with_one_line_and_leaves_nothing() {
    if !needs_root(ROOT) {
        return;
    }
    let (mut w, _guard) = locking_workload();
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let o = checkpoint(w.pid, &dir);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    w.reap();
    let log = w.log.to_str().unwrap().to_string();
    let at = *w.ticks().last().unwrap();
    // Another process takes the flock while the image waits.
    let other = open(&w.files_dir().join("lock-flock"));
    assert_eq!(try_flock(&other, libc::LOCK_SH), Ok(()), "the original's lock went with it");
    let o = restore(&dir, w.pid).expect_err("a restore that cannot take its lock fails");
    fails_with(&o, &["lock-flock", "flock LOCK_EX lock cannot be taken again", "another process holds a conflicting lock"]);
    assert_eq!(processes_mentioning(&log), Vec::<i32>::new(), "the half-built process is gone");
    assert_eq!(w.ticks().last(), Some(&at), "no copy ran");
    // Once the other process lets go, the same image restores.
    drop(other);
    let new = restore(&dir, w.pid).unwrap_or_else(|o| panic!("restore: {}", stderr(&o)));
    w.adopt(new);
    w.wait_ticks(at + 3);
    w.terminate_and_check(new).unwrap();
}

/// Spawns `cmd` detached from the harness (its own session, output to `out`).
fn spawn_detached(mut cmd: Command, out: &Path) -> Child {
    let out = File::create(out).unwrap();
    cmd.stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out);
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"))
}

fn python(code: &str, db: &Path) -> Output {
    Command::new("/usr/bin/python3").arg("-c").arg(code).arg(db).output().unwrap()
}

#[test]
fn sqlite_inside_begin_exclusive_keeps_its_database_across_a_restore() {
    if !needs_root(ROOT) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _guard = KillMentioning(tmp.path().to_str().unwrap().to_string());
    let (db, log, go) = (tmp.path().join("db"), tmp.path().join("log"), tmp.path().join("go"));
    let o = python("import sqlite3,sys; sqlite3.connect(sys.argv[1]).execute('CREATE TABLE t (v TEXT)')", &db);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(workloads_dir().join("sqlite_exclusive.py")).args([&db, &log, &go]);
    let mut child = spawn_detached(cmd, &tmp.path().join("output"));
    let pid = child.id() as i32;
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("sqlite inside its transaction", DEADLINE, || text().contains("ready"));

    let dir = tmp.path().join("img");
    let o = checkpoint(pid, &dir);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    child.wait().unwrap();
    let new = restore(&dir, pid).unwrap_or_else(|o| panic!("restore: {}", stderr(&o)));
    assert!(pid_alive(new));

    // Another process cannot write while the restored transaction is open...
    let insert = "import sqlite3,sys; sqlite3.connect(sys.argv[1], timeout=0).execute(\"INSERT INTO t VALUES ('outside')\")";
    let o = python(insert, &db);
    assert!(!o.status.success() && stderr(&o).contains("database is locked"), "another INSERT: {}", stderr(&o));
    // ...and the restored one commits.
    File::create(&go).unwrap();
    wait_until("the restored COMMIT", DEADLINE, || text().contains("PASS") || text().contains("FAIL"));
    assert!(text().contains("PASS"), "{}", text());
    let o = python("import sqlite3,sys; print([r[0] for r in sqlite3.connect(sys.argv[1]).execute('SELECT v FROM t')])", &db);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "['inside']", "{}", stderr(&o));
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A daemon on loopback, killed when dropped. With `files` (`(dir, copy)`), it runs in
/// a mount namespace of its own where `dir`, the workload's directory, shows `copy`, a
/// copy of it: another machine's file system, as far as the process's files go.
struct Daemon {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(files: Option<(&Path, &Path)>) -> Daemon {
        match files {
            None => Daemon::start_in(None),
            Some((dir, copy)) => Daemon::start_in(Some(("mount --bind \"$1\" \"$2\" && shift 2 && exec \"$@\"", &[copy.as_os_str(), dir.as_os_str()]))),
        }
    }

    /// With `prelude`, the daemon runs in a mount namespace of its own after a shell
    /// `script` with positional arguments `args` then the daemon's command (`exec "$@"`
    /// once it shifted its own).
    fn start_in(prelude: Option<(&str, &[&std::ffi::OsStr])>) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let control = dir.path().join("control.sock");
        let mut cmd = match prelude {
            None => Command::new(ferry_bin()),
            Some((script, args)) => {
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "sh", "-c", script, "sh"]).args(args).arg(ferry_bin());
                c
            }
        };
        cmd.args(["daemon", "--listen", &addr, "--control"]).arg(&control);
        let log = File::create(dir.path().join("daemon.log")).unwrap();
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        let d = Daemon { child, addr, _dir: dir };
        wait_until("the daemon's control socket", Duration::from_secs(30), || {
            ferry::commands::control::daemon_running(&control)
        });
        d
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}


#[test]
fn a_migration_within_one_machine_fails_on_the_locks_its_source_holds_and_the_source_carries_on() {
    if !needs_root(ROOT) {
        return;
    }
    // One file system on both sides: the frozen source still holds its locks while the
    // destination tries to take them. The migration fails; the source runs on, locks held.
    let daemon = Daemon::start(None);
    let (mut w, _guard) = locking_workload();
    let log = w.log.to_str().unwrap().to_string();
    for strategy in ["stop-copy", "post-copy"] {
        let o = migrate(w.pid, &daemon.addr, strategy);
        fails_with(&o, &["cannot be taken again", "a migration's source still holds its own"]);
        assert_eq!(processes_mentioning(&log), vec![w.pid], "{strategy}: no copy is left");
        holds_the_locks(&w.files_dir(), w.pid);
        let at = *w.ticks().last().unwrap();
        w.wait_ticks(at + 2);
    }
    let pid = w.pid;
    w.terminate_and_check(pid).unwrap();
}

/// Copies the workload's files (its lock files among them) for the destination.
fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn every_lock_kind_moves_with_the_process_to_another_file_system() {
    if !needs_root(ROOT) {
        return;
    }
    for strategy in ["stop-copy", "pre-copy", "post-copy", "hybrid"] {
        let (mut w, _guard) = locking_workload();
        let copies = tempfile::tempdir().unwrap();
        let copy = copies.path().join("files");
        copy_files(&w.files_dir(), &copy);
        let daemon = Daemon::start(Some((&w.files_dir(), &copy)));
        let old = w.pid;
        let o = migrate(old, &daemon.addr, strategy);
        assert!(o.status.success(), "{strategy}: {}", stderr(&o));
        let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(stats["strategy"], strategy, "{stats}");
        let new = stats["pids"][old.to_string()].as_i64().unwrap() as i32;
        wait_until("the source to be gone", Duration::from_secs(30), || !pid_alive(old));
        w.adopt(new);
        // The copy holds its locks on its own files (it checks them from inside); the
        // source's, here, go with the source (once its last thread exited: a killed
        // group leader shows as a zombie while its other threads still hold its fds).
        let flock = open(&w.files_dir().join("lock-flock"));
        wait_until("the source's locks to go with it", DEADLINE, || try_flock(&flock, libc::LOCK_EX).is_ok());
        drop(flock);
        let at = *w.ticks().last().unwrap();
        w.wait_ticks(at + 3);
        w.terminate_and_check(new).unwrap_or_else(|e| panic!("{strategy}: {e}"));
    }
}

/// python3 running `setup`, then ticking into a log; answers it and the tick count.
fn python_ticking(setup: &str, tmp: &Path) -> (Child, impl Fn() -> usize) {
    let log = tmp.join("log");
    let script = format!(
        "import os,time,fcntl\n{setup}\nn=0\nwhile True:\n n+=1\n open('{}','a').write('tick %d\\n'%n)\n time.sleep(0.02)\n",
        log.display()
    );
    let child = Command::new("/usr/bin/python3").arg("-c").arg(&script).stdin(Stdio::null()).spawn().unwrap();
    let ticks = move || std::fs::read_to_string(&log).map(|s| s.lines().count()).unwrap_or(0);
    wait_until("python ticks", DEADLINE, || ticks() >= 2);
    (child, ticks)
}

/// A checkpoint and a migration of python3 running `setup` are refused naming `needles`;
/// python carries on.
fn python_refused(setup: &str, needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let _guard = KillMentioning(tmp.path().to_str().unwrap().to_string());
    let (mut child, ticks) = python_ticking(setup, tmp.path());
    let pid = child.id() as i32;
    let dir = tmp.path().join("img");
    fails_with(&checkpoint(pid, &dir), needles);
    assert!(!dir.exists(), "the partial image is removed");
    let daemon = Daemon::start(None);
    fails_with(&migrate(pid, &daemon.addr, "stop-copy"), needles);
    let n = ticks();
    wait_until("python to carry on", DEADLINE, || ticks() >= n + 2);
    assert!(pid_alive(pid));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_locked_pseudo_terminal_pair_is_refused_and_the_process_keeps_running() {
    if !needs_root(ROOT) {
        return;
    }
    // (A pair is carried: terminals.rs. Its lock, TIOCSPTLCK with the slave open, not.)
    python_refused("import struct\nm,s=os.openpty()\nfcntl.ioctl(m,0x40045431,struct.pack('i',1))", &["is locked (TIOCSPTLCK) with its slave open"]);
}

#[test]
fn a_lease_is_refused_and_the_process_keeps_running() {
    if !needs_root(ROOT) {
        return;
    }
    let setup = "p='/tmp/ferry-lease-%d'%os.getpid()\nopen(p,'w').close()\nf=os.open(p,os.O_RDONLY)\nos.unlink(p)\nfcntl.fcntl(f,fcntl.F_SETLEASE,fcntl.F_RDLCK)";
    python_refused(setup, &["holds a read lease", "not supported by the files plugin"]);
}

#[test]
fn a_lock_on_a_pipe_is_refused_and_the_process_keeps_running() {
    if !needs_root(ROOT) {
        return;
    }
    python_refused("r,w=os.pipe()\nfcntl.flock(r,fcntl.LOCK_EX)", &["holds a flock LOCK_EX lock, on a kind of file whose locks the files plugin does not carry"]);
}

/// A pseudo-terminal whose master is this test's (as a shell's terminal is the terminal
/// emulator's), and what was read from it so far.
struct Terminal {
    master: File,
    name: String,
    seen: String,
}

impl Terminal {
    fn open() -> Terminal {
        // Close-on-exec from the start: no other test's child may inherit it.
        // SAFETY: posix_openpt opens /dev/ptmx with these flags; the fd is ours.
        let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert!(master >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        // SAFETY: the fd was just made and is ours alone.
        let master = unsafe { OwnedFd::from_raw_fd(master) };
        let mut name = [0 as libc::c_char; 64];
        // SAFETY: unlockpt and ptsname_r on our master; ptsname_r writes at most name.len() bytes.
        unsafe {
            assert_eq!(libc::unlockpt(master.as_raw_fd()), 0, "unlockpt");
            assert_eq!(libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()), 0, "ptsname_r");
        }
        // SAFETY: ptsname_r wrote a NUL-terminated name.
        let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_str().unwrap().to_string();
        Terminal { master: File::from(master), name, seen: String::new() }
    }

    /// Its slave, opened anew (close-on-exec, as std opens files).
    fn slave(&self) -> File {
        File::options().read(true).write(true).custom_flags(libc::O_NOCTTY).open(&self.name).unwrap()
    }

    /// Reads until the text read holds `want`.
    fn read_until(&mut self, want: &str) {
        let deadline = Instant::now() + DEADLINE;
        let mut pause = Duration::from_millis(1);
        while !self.seen.contains(want) {
            let mut buf = [0u8; 4096];
            match self.master.read(&mut buf) {
                Ok(n) if n > 0 => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                _ => {
                    assert!(Instant::now() < deadline, "no {want:?} on the terminal: {:?}", self.seen);
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
            }
        }
    }
}

/// python3 ticking into `dir/log`, its stdout the terminal's slave, where it prints
/// `tty N` every tenth tick; answers it once the terminal showed `tty 10`.
fn python_on(term: &mut Terminal, dir: &Path) -> Child {
    let script = format!(
        "import time\nn=0\nwhile True:\n n+=1\n open('{}','a').write('tick %d\\n'%n)\n if n%10==0: print('tty %d'%n, flush=True)\n time.sleep(0.02)\n",
        dir.join("log").display()
    );
    let child = Command::new("/usr/bin/python3").arg("-c").arg(&script).stdin(Stdio::null()).stdout(term.slave()).spawn().unwrap();
    term.read_until("tty 10");
    child
}

/// The next `tty N` python prints after its log counted `ticks`, plus ten.
fn tty_after(dir: &Path) -> String {
    let ticks = std::fs::read_to_string(dir.join("log")).unwrap().lines().count();
    format!("tty {}", (ticks / 10 + 2) * 10)
}

#[test]
fn a_process_on_a_terminal_it_does_not_own_comes_back_writing_to_it() {
    if !needs_root(ROOT) {
        return;
    }
    // Its stdout, a slave of our terminal: refused without --shell-job (naming the
    // option), and with it reopened by path (ferry restore runs from no terminal here):
    // the same terminal, its change time checked.
    let mut term = Terminal::open();
    let tmp = tempfile::tempdir().unwrap();
    let _guard = KillMentioning(tmp.path().to_str().unwrap().to_string());
    let mut child = python_on(&mut term, tmp.path());
    let pid = child.id() as i32;
    let dir = tmp.path().join("img");
    fails_with(&checkpoint(pid, &dir), &["a terminal that is not part of the request", "--shell-job"]);
    assert!(pid_alive(pid));
    let o = ferry(&["checkpoint", &pid.to_string(), "--dir", dir.to_str().unwrap(), "--shell-job"]);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    child.wait().unwrap();
    let after = tty_after(tmp.path());
    let new = restore(&dir, pid).unwrap_or_else(|o| panic!("restore: {}", stderr(&o)));
    term.read_until(&after);
    kill_pid(new);
}

#[test]
fn a_process_on_a_terminal_is_not_moved_onto_another_machine_s_terminal_of_that_number() {
    if !needs_root(ROOT) {
        return;
    }
    let mut term = Terminal::open();
    let index = term.name.strip_prefix("/dev/pts/").unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let _guard = KillMentioning(tmp.path().to_str().unwrap().to_string());
    let mut child = python_on(&mut term, tmp.path());
    let pid = child.id() as i32;
    // The destination has terminals of its own (a devpts instance of its own), one of
    // them with the number of ours, held by a process there.
    let script = "mount -t devpts -o newinstance devpts /dev/pts || exit 1\n\
        python3 -c 'import os,sys,time\nptys=[os.openpty() for _ in range(int(sys.argv[2])+1)]\nopen(sys.argv[1]+\"/ptys\",\"w\").close()\ntime.sleep(3600)' \"$1\" \"$2\" &\n\
        while [ ! -e \"$1/ptys\" ]; do sleep 0.01; done\n\
        shift 2 && exec \"$@\"";
    let daemon = Daemon::start_in(Some((script, &[tmp.path().as_os_str(), std::ffi::OsStr::new(&index)])));
    let o = ferry(&["migrate", &pid.to_string(), "--to", &daemon.addr, "--shell-job"]);
    fails_with(&o, &[&format!("/dev/pts/{index}"), "terminal"]);
    // The source carries on, writing to our terminal.
    let after = tty_after(tmp.path());
    term.read_until(&after);
    assert!(pid_alive(pid));
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether /proc/locks shows a request of `pid` waiting for a `class` lock.
fn waits_for_lock(pid: i32, class: &str) -> bool {
    std::fs::read_to_string("/proc/locks").unwrap().lines().any(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        w.get(1) == Some(&"->") && w.get(2) == Some(&class) && w.get(5) == Some(&pid.to_string().as_str())
    })
}

#[test]
fn a_process_waiting_for_a_lock_waits_again_after_a_restore_and_then_gets_it() {
    if !needs_root(ROOT) {
        return;
    }
    // The freeze interrupts the blocked fcntl(F_SETLKW) (or flock): the request leaves
    // the kernel's lists, and the restored thread makes the call again.
    let tmp = tempfile::tempdir().unwrap();
    let _guard = KillMentioning(tmp.path().to_str().unwrap().to_string());
    let (posix_file, flock_file, log) = (tmp.path().join("posix"), tmp.path().join("flock"), tmp.path().join("log"));
    let posix = open_or_create(&posix_file);
    // SAFETY: struct flock is plain data; F_SETLK reads it.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    // SAFETY: as above.
    assert_eq!(unsafe { libc::fcntl(posix.as_raw_fd(), libc::F_SETLK, &fl) }, 0, "our POSIX lock");
    let flock = open_or_create(&flock_file);
    assert_eq!(try_flock(&flock, libc::LOCK_EX), Ok(()), "our flock");
    let script = format!(
        "import fcntl,os,time\nf=os.open('{p}',os.O_RDWR)\ng=os.open('{f}',os.O_RDWR)\nfcntl.lockf(f,fcntl.LOCK_EX)\nopen('{l}','a').write('got posix\\n')\nfcntl.flock(g,fcntl.LOCK_EX)\nopen('{l}','a').write('got flock\\n')\ntime.sleep(3600)\n",
        p = posix_file.display(),
        f = flock_file.display(),
        l = log.display()
    );
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg("-c").arg(&script);
    let mut child = spawn_detached(cmd, &tmp.path().join("output"));
    let pid = child.id() as i32;
    wait_until("python to wait for our POSIX lock", DEADLINE, || waits_for_lock(pid, "POSIX"));
    let dir = tmp.path().join("img");
    let o = checkpoint(pid, &dir);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    child.wait().unwrap();
    let new = restore(&dir, pid).unwrap_or_else(|o| panic!("restore: {}", stderr(&o)));
    wait_until("the restored python to wait for our POSIX lock", DEADLINE, || waits_for_lock(new, "POSIX"));
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    drop(posix);
    wait_until("the restored python to get the POSIX lock", DEADLINE, || text().contains("got posix"));
    wait_until("the restored python to wait for our flock", DEADLINE, || waits_for_lock(new, "FLOCK"));
    drop(flock);
    wait_until("the restored python to get the flock", DEADLINE, || text().contains("got flock"));
    assert!(pid_alive(new));
}

fn open_or_create(path: &Path) -> File {
    File::options().read(true).write(true).create(true).truncate(false).open(path).unwrap()
}
