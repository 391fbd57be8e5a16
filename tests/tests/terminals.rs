//! Terminals. A shell job (a process on a terminal whose other end is not part of the
//! request) is refused without `--shell-job`, in one line naming the pid, the fds and
//! the terminal, the process left running; with it, it is restored onto the terminal
//! `ferry restore` runs from, or the one `--inherit-fd fd[N]:PATH` names, with that
//! terminal as its controlling terminal and its group in the foreground where it led
//! its session. The terminals are pseudo-terminals the test makes (`openpty`); the
//! workload checks them from inside (`--shell-tty`, see `workloads/tty.c`).

use std::{
    io::{Read, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    os::unix::{fs::OpenOptionsExt, process::CommandExt},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use ferry_tests::{
    fails_with, ferry, ferry_bin, needs_root, stderr,
    inject::Injected,
    workload::{pid_alive, Workload, WorkloadOpts},
};

const ROOT: &str = "checkpoint/restore (ptrace of any process), and devpts mounted";

/// The tests take turns: a pair is made again under its index, which another test's
/// `openpty` could take meanwhile (pseudo-terminal indexes are the machine's).
static TURNS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    TURNS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Mounts devpts on /dev/pts where it is not (the test VMs boot without it).
fn devpts() {
    let mounted = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default().lines().any(|l| l.split(' ').nth(1) == Some("/dev/pts"));
    if !mounted {
        std::fs::create_dir_all("/dev/pts").unwrap();
        let ok = Command::new("mount").args(["-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts", "/dev/pts"]).status().unwrap();
        assert!(ok.success(), "mounting devpts on /dev/pts");
    }
}

/// A pseudo-terminal made by the test: its master (non-blocking) and slave, and the
/// slave's path.
struct Pty {
    master: std::fs::File,
    slave: OwnedFd,
    path: String,
}

fn openpty() -> Pty {
    devpts();
    let (mut m, mut s) = (-1, -1);
    // SAFETY: openpty fills two ints; the name, termios and winsize pointers are null.
    let r = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just made and are owned here alone.
    let (master, slave) = unsafe { (std::fs::File::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
    // SAFETY: fcntl on our own fds.
    unsafe {
        libc::fcntl(m, libc::F_SETFL, libc::O_NONBLOCK | libc::O_RDWR);
        libc::fcntl(m, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::fcntl(s, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    let path = std::fs::read_link(format!("/proc/self/fd/{s}")).unwrap().to_string_lossy().into_owned();
    Pty { master, slave, path }
}

impl Pty {
    /// Reads the master until its output holds `want` (10 s at most); answers all of it.
    fn read_until(&mut self, want: &str) -> String {
        let (deadline, mut seen) = (Instant::now() + Duration::from_secs(10), Vec::new());
        while !String::from_utf8_lossy(&seen).contains(want) {
            let mut buf = [0u8; 4096];
            match self.master.read(&mut buf) {
                Ok(n) if n > 0 => seen.extend_from_slice(&buf[..n]),
                _ => {
                    assert!(Instant::now() < deadline, "no {want:?} on {}; it showed {:?}", self.path, String::from_utf8_lossy(&seen));
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    }
}

/// The workload as a shell job on `tty`: its session leader, the terminal its
/// controlling one and on fds 0-2, its group in the foreground.
fn shell_job(tty: &Pty) -> Workload {
    let w = Workload::spawn(&WorkloadOpts { extra: vec!["--shell-tty", Box::leak(tty.path.clone().into_boxed_str())], ..WorkloadOpts::default() });
    w.wait_ready();
    w.wait_ticks(3);
    w
}

fn checkpoint(w: &mut Workload, dir: &std::path::Path) {
    let o = ferry(&["checkpoint", &w.pid.to_string(), "--dir", dir.to_str().unwrap(), "--shell-job"]);
    assert!(o.status.success(), "checkpoint --shell-job: {}", stderr(&o));
    w.reap();
}

/// `ferry restore --dir DIR ARGS` with `stdin` as its standard input and, when given,
/// `(fd, at)`: the test's fd `fd` as ferry's fd `at`.
fn restore(dir: &std::path::Path, args: &[&str], stdin: Stdio, extra: Option<(i32, i32)>) -> Output {
    let mut cmd = Command::new(ferry_bin());
    cmd.args(["restore", "--dir", dir.to_str().unwrap(), "--json"]).args(args).stdin(stdin);
    if let Some((fd, at)) = extra {
        // SAFETY: dup2 is async-signal-safe; it runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || if libc::dup2(fd, at) == at { Ok(()) } else { Err(std::io::Error::last_os_error()) });
        }
    }
    cmd.output().expect("ferry runs")
}

fn restored_pid(o: &Output, old: i32) -> i32 {
    assert!(o.status.success(), "restore: {}", stderr(o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    stats["pids"][old.to_string()].as_i64().unwrap_or_else(|| panic!("{stats}")) as i32
}

fn fd_link(pid: i32, fd: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Types "ping" on `tty`, asks the copy `pid` for its verdict (a PASS), and reads its
/// "terminal ok" line there.
fn passes_on(w: &mut Workload, pid: i32, tty: &mut Pty) {
    for fd in 0..3 {
        assert_eq!(fd_link(pid, fd), tty.path, "fd {fd} of the copy");
    }
    tty.master.write_all(b"ping\n").unwrap();
    w.terminate_and_check(pid).unwrap_or_else(|e| panic!("{e}; output: {}", w.output()));
    tty.read_until(&format!("terminal ok {pid}"));
}

#[test]
fn a_shell_job_is_refused_without_the_option_and_restored_onto_ferrys_terminal() {
    if !needs_root(ROOT) {
        return;
    }
    let _turn = turn();
    let (old, mut new) = (openpty(), openpty());
    let mut w = shell_job(&old);
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");

    let o = ferry(&["checkpoint", &w.pid.to_string(), "--dir", dir.to_str().unwrap()]);
    fails_with(&o, &[&format!("process {}: fds 0, 1, 2 ({})", w.pid, old.path), "not part of the request", "--shell-job"]);
    assert!(!dir.exists(), "a refused checkpoint writes nothing");
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 3);
    assert_eq!(fd_link(w.pid, 0), old.path, "the refused process keeps its terminal");

    checkpoint(&mut w, &dir);
    // ferry's standard input is the new terminal: the copy's fds 0-2 are on it.
    let o = restore(&dir, &[], Stdio::from(new.slave.try_clone().unwrap()), None);
    let pid = restored_pid(&o, w.pid);
    w.adopt(pid);
    passes_on(&mut w, pid, &mut new);
}

#[test]
fn inherit_fd_names_the_terminal_and_without_any_the_restore_refuses() {
    if !needs_root(ROOT) {
        return;
    }
    let _turn = turn();
    let (old, mut new) = (openpty(), openpty());
    let old_path = old.path.clone();
    let mut w = shell_job(&old);
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    checkpoint(&mut w, &dir);
    // The process's terminal is gone (its master closed) and ferry runs from none.
    drop(old);
    let o = restore(&dir, &[], Stdio::null(), None);
    fails_with(&o, &[&format!("fds 0, 1, 2 ({old_path})"), "--inherit-fd fd[N]:"]);

    let named = format!("fd[7]:{old_path}");
    let o = restore(&dir, &["--inherit-fd", &named], Stdio::null(), Some((new.slave.as_raw_fd(), 7)));
    let pid = restored_pid(&o, w.pid);
    w.adopt(pid);
    passes_on(&mut w, pid, &mut new);
}

/// The workload's terminal checks fail where the terminal is not what it was: the
/// copy's controlling terminal given up (`TIOCNOTTY`), and the line typed on it read
/// by someone else.
#[test]
fn a_copy_without_its_controlling_terminal_or_its_input_fails_the_check() {
    if !needs_root(ROOT) {
        return;
    }
    let _turn = turn();
    for (want, input) in [("terminal: not its controlling terminal", false), ("want the \"ping\" typed on it", true)] {
        let (old, mut new) = (openpty(), openpty());
        let mut w = shell_job(&old);
        let image = tempfile::tempdir().unwrap();
        let dir = image.path().join("img");
        checkpoint(&mut w, &dir);
        let o = restore(&dir, &[], Stdio::from(new.slave.try_clone().unwrap()), None);
        let pid = restored_pid(&o, w.pid);
        w.adopt(pid);
        new.master.write_all(b"ping\n").unwrap();
        // Its echo: the line is in the terminal's input, a read will not block.
        new.read_until("ping");
        let mut inj = Injected::seize(pid);
        if input {
            let buf = inj.put(&[0; 64]);
            assert_eq!(inj.call(pid, libc::SYS_read, [0, buf, 64, 0, 0, 0]), 5, "the injected read takes the line");
        } else {
            assert_eq!(inj.call(pid, libc::SYS_ioctl, [0, libc::TIOCNOTTY, 0, 0, 0, 0]), 0);
        }
        inj.release();
        match w.terminate_and_check(pid) {
            Err(e) if e.starts_with("FAIL") && e.contains(want) => {}
            other => panic!("the broken copy's verdict: {other:?}, want a FAIL naming {want:?}"),
        }
        assert!(!pid_alive(pid));
    }
}

/// A pair both of whose ends the workload holds (`--pty-pair`): a checkpoint that
/// leaves it running takes its unread bytes without losing them (the source's own
/// check passes after it), and a copy has the same /dev/pts/N, settings, window,
/// packet mode and unread bytes both ways.
#[test]
fn a_pty_pair_is_made_again_with_its_settings_and_unread_bytes_both_ways() {
    if !needs_root(ROOT) {
        return;
    }
    let _turn = turn();
    devpts();
    for leave_running in [true, false] {
        let mut w = Workload::spawn(&WorkloadOpts { extra: vec!["--pty-pair"], ..WorkloadOpts::default() });
        w.wait_ready();
        w.wait_ticks(3);
        let image = tempfile::tempdir().unwrap();
        let dir = image.path().join("img");
        let mut args = vec!["checkpoint".to_string(), w.pid.to_string(), "--dir".into(), dir.to_str().unwrap().into()];
        if leave_running {
            args.push("--leave-running".into());
        }
        let o = ferry(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(o.status.success(), "checkpoint: {}", stderr(&o));
        let pid = w.pid;
        if leave_running {
            w.terminate_and_check(pid).unwrap_or_else(|e| panic!("the source after the checkpoint: {e}"));
            continue;
        }
        w.reap();
        let o = restore(&dir, &[], Stdio::null(), None);
        let new = restored_pid(&o, pid);
        w.adopt(new);
        w.terminate_and_check(new).unwrap_or_else(|e| panic!("the copy: {e}"));
    }
}

/// The workload's pair checks fail on a copy whose master lost its unread line (read
/// away by an injected call) or whose window changed.
#[test]
fn a_pty_pair_copy_without_its_bytes_or_window_fails_the_check() {
    if !needs_root(ROOT) {
        return;
    }
    let _turn = turn();
    devpts();
    let master_fd = |pid: i32| {
        let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
        dir.flatten().find(|e| fd_link(pid, e.file_name().to_str().unwrap().parse().unwrap()) == "/dev/ptmx").unwrap().file_name().to_str().unwrap().parse::<u64>().unwrap()
    };
    for (want, window) in [("pty: the master read \"\"", false), ("pty: window 10x20, want 33x101", true)] {
        let mut w = Workload::spawn(&WorkloadOpts { extra: vec!["--pty-pair"], ..WorkloadOpts::default() });
        w.wait_ready();
        w.wait_ticks(3);
        let image = tempfile::tempdir().unwrap();
        let dir = image.path().join("img");
        let o = ferry(&["checkpoint", &w.pid.to_string(), "--dir", dir.to_str().unwrap()]);
        assert!(o.status.success(), "checkpoint: {}", stderr(&o));
        w.reap();
        let pid = restored_pid(&restore(&dir, &[], Stdio::null(), None), w.pid);
        w.adopt(pid);
        let fd = master_fd(pid);
        let mut inj = Injected::seize(pid);
        if window {
            let ws = inj.put(&[10, 0, 20, 0, 0, 0, 0, 0]);
            assert_eq!(inj.call(pid, libc::SYS_ioctl, [fd, libc::TIOCSWINSZ, ws, 0, 0, 0]), 0);
        } else {
            let buf = inj.put(&[0; 64]);
            assert_eq!(inj.call(pid, libc::SYS_read, [fd, buf, 64, 0, 0, 0]), 15, "the status byte and the line");
        }
        inj.release();
        match w.terminate_and_check(pid) {
            Err(e) if e.starts_with("FAIL") && e.contains(want) => {}
            other => panic!("the broken copy's verdict: {other:?}, want a FAIL naming {want:?}"),
        }
    }
}

/// `tmux -S SOCK ARGS`, with no fd of the test's beyond the standard three (the
/// server it may start keeps what it inherits).
fn tmux(sock: &std::path::Path, args: &[&str]) -> Output {
    let mut cmd = Command::new("tmux");
    cmd.arg("-S").arg(sock).args(["-f", "/dev/null"]).args(args).stdin(Stdio::null());
    // SAFETY: close_range is async-signal-safe; it runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    cmd.output().expect("tmux runs (scripts/setup installs it)")
}

/// What the pane shows, its history included.
fn pane(sock: &std::path::Path) -> String {
    String::from_utf8_lossy(&tmux(sock, &["capture-pane", "-p", "-S", "-100"]).stdout).into_owned()
}

fn wait_pane(sock: &std::path::Path, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pane(sock).contains(want) {
        assert!(Instant::now() < deadline, "the pane never showed {want:?}; it shows:\n{}", pane(sock));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills the listed pids when dropped.
struct KillAll(Vec<i32>);
impl Drop for KillAll {
    fn drop(&mut self) {
        for &p in &self.0 {
            if pid_alive(p) {
                ferry_tests::workload::kill_pid(p);
            }
        }
    }
}

/// tmux's server and the bash in its pane, a tree with a pair between them:
/// checkpointed and restored, the pane still shows what ran before, bash still has it
/// in its history, and runs a command sent after the restore.
#[test]
fn tmux_and_the_bash_in_its_pane_come_back_with_their_terminal_and_history() {
    if !needs_root(ROOT) {
        return;
    }
    let _turn = turn();
    devpts();
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("tmux.sock");
    let o = tmux(&sock, &["new-session", "-d", "-x", "100", "-y", "30", "env -i PS1='ready$ ' TERM=screen bash --norc --noprofile"]);
    assert!(o.status.success(), "tmux new-session: {}", stderr(&o));
    let ids = String::from_utf8_lossy(&tmux(&sock, &["display", "-p", "#{pid} #{pane_pid}"]).stdout).into_owned();
    let ids: Vec<i32> = ids.split_whitespace().map(|p| p.parse().unwrap()).collect();
    let (server, shell) = (ids[0], ids[1]);
    let mut guard = KillAll(vec![server, shell]);
    wait_pane(&sock, "ready$");
    assert!(tmux(&sock, &["send-keys", "echo before-$((6*7))", "Enter"]).status.success());
    wait_pane(&sock, "before-42");

    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let o = ferry(&["checkpoint", &server.to_string(), "--dir", dir.to_str().unwrap()]);
    assert!(o.status.success(), "checkpoint of the tmux server: {}", stderr(&o));
    assert!(!pid_alive(server) && !pid_alive(shell), "the checkpoint kills the tree");
    let o = ferry(&["restore", "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let pids: Vec<i32> = stats["pids"].as_object().unwrap().values().map(|v| v.as_i64().unwrap() as i32).collect();
    guard.0.extend(&pids);

    assert!(pane(&sock).contains("before-42"), "the pane's history after the restore:\n{}", pane(&sock));
    // bash leads its session again with the pane's terminal as its controlling one,
    // its group in the foreground.
    let shell = stats["pids"][shell.to_string()].as_i64().unwrap() as i32;
    let stat = std::fs::read_to_string(format!("/proc/{shell}/stat")).unwrap();
    let f: Vec<i64> = stat[stat.rfind(')').unwrap() + 4..].split(' ').take(5).map(|v| v.parse().unwrap()).collect();
    let rdev = std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(format!("/proc/{shell}/fd/0")).unwrap());
    let tty_nr = ((libc::major(rdev) << 8) | (libc::minor(rdev) & 0xff) | ((libc::minor(rdev) >> 8) << 20)) as i64;
    assert_eq!((f[1], f[2], f[3], f[4]), (shell as i64, shell as i64, tty_nr, shell as i64), "bash's pgrp, session, tty_nr, tpgid: {stat}");
    // `fc -ln 1 1`: the first command of bash's history.
    assert!(tmux(&sock, &["send-keys", "echo after-$((6*7)); fc -ln 1 1", "Enter"]).status.success());
    wait_pane(&sock, "after-42\n         echo before-$((6*7))\nready$");
    let o = tmux(&sock, &["kill-server"]);
    assert!(o.status.success(), "kill-server: {}", stderr(&o));
}

/// A shell job migrated: refused without --shell-job; with it, a session leader's
/// controlling terminal cannot move within one machine (the frozen source still
/// leads a session on it until the commit), which the destination refuses in one
/// line, the source running on and passing its check.
#[test]
fn a_shell_job_migration_within_the_machine_is_refused_and_the_source_runs_on() {
    if !needs_root(ROOT) {
        return;
    }
    let _turn = turn();
    let mut old = openpty();
    let daemon = ferry_tests::daemon::Daemon::start();
    let mut w = shell_job(&old);
    let migrate = |extra: &[&str]| {
        Command::new(ferry_bin()).args(["migrate", &w.pid.to_string(), "--to", &daemon.addr, "--json"]).args(extra).output().unwrap()
    };
    let o = migrate(&[]);
    fails_with(&o, &[&format!("process {}: fds 0, 1, 2 ({})", w.pid, old.path), "--shell-job"]);
    for strategy in ["stop-copy", "pre-copy", "post-copy", "hybrid"] {
        let o = migrate(&["--strategy", strategy, "--shell-job"]);
        fails_with(&o, &[&format!("{} is still another session's controlling terminal", old.path), "within one machine"]);
        let at = *w.ticks().last().unwrap();
        w.wait_ticks(at + 2);
    }
    let pid = w.pid;
    passes_on(&mut w, pid, &mut old);
}

/// A job started from an interactive shell (bash in a tmux pane: in bash's session, on
/// its terminal) is a shell job: refused without --shell-job; with it, restored onto
/// the terminal ferry restore runs from, in a session of its own; the shell and its
/// pane carry on.
#[test]
fn a_job_of_an_interactive_shell_is_restored_onto_the_callers_terminal() {
    if !needs_root(ROOT) {
        return;
    }
    let _turn = turn();
    devpts();
    let tmp = tempfile::tempdir().unwrap();
    let (sock, log) = (tmp.path().join("tmux.sock"), tmp.path().join("job.log"));
    let o = tmux(&sock, &["new-session", "-d", "-x", "100", "-y", "30", "env -i PS1='ready$ ' TERM=screen bash --norc --noprofile"]);
    assert!(o.status.success(), "tmux new-session: {}", stderr(&o));
    let ids = String::from_utf8_lossy(&tmux(&sock, &["display", "-p", "#{pid} #{pane_pid} #{pane_tty}"]).stdout).into_owned();
    let ids: Vec<&str> = ids.split_whitespace().collect();
    let mut guard = KillAll(vec![ids[0].parse().unwrap(), ids[1].parse().unwrap()]);
    let pane_tty = ids[2].to_string();
    wait_pane(&sock, "ready$");
    let job = format!("{} --log {} --no-files --tty-job &", ferry_tests::workload::workload_bin().display(), log.display());
    assert!(tmux(&sock, &["send-keys", &job, "Enter"]).status.success());
    let lines = || std::fs::read_to_string(&log).unwrap_or_default();
    ferry_tests::wait_until("the job to be ready", Duration::from_secs(10), || lines().contains("tick 3\n"));
    let pid = ferry_tests::workload::processes_mentioning(&log.to_string_lossy())[0];
    guard.0.push(pid);

    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let o = ferry(&["checkpoint", &pid.to_string(), "--dir", dir.to_str().unwrap()]);
    fails_with(&o, &[&format!("process {pid}: fds 0, 1, 2 ({pane_tty})"), "--shell-job"]);
    let o = ferry(&["checkpoint", &pid.to_string(), "--dir", dir.to_str().unwrap(), "--shell-job"]);
    assert!(o.status.success(), "checkpoint --shell-job: {}", stderr(&o));
    ferry_tests::wait_until("the job to be gone", Duration::from_secs(10), || !pid_alive(pid));
    let mut new = openpty();
    let o = restore(&dir, &[], Stdio::from(new.slave.try_clone().unwrap()), None);
    let copy = restored_pid(&o, pid);
    guard.0.push(copy);
    assert_eq!(fd_link(copy, 1), new.path);
    let stat = std::fs::read_to_string(format!("/proc/{copy}/stat")).unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    assert_eq!((f[3], f[4]), (copy.to_string().as_str(), "0"), "a session of its own, no controlling terminal: {stat}");
    assert!(ferry_tests::workload::send_signal(copy, libc::SIGTERM));
    ferry_tests::wait_until("the copy's verdict", Duration::from_secs(10), || lines().contains("PASS") || lines().contains("FAIL"));
    assert!(lines().ends_with("PASS\n"), "the copy's verdict: {}", lines());
    new.read_until(&format!("terminal ok {copy}"));
    // The shell carries on in its pane.
    assert!(tmux(&sock, &["send-keys", "echo still-$((6*7))", "Enter"]).status.success());
    wait_pane(&sock, "still-42");
    assert!(tmux(&sock, &["kill-server"]).status.success());
}

/// A checkpoint of a pair's holder killed once the files plugin read the pair (its
/// unread bytes taken out and put back) leaves the source with every byte: its own
/// check passes.
#[test]
fn a_checkpoint_killed_after_reading_a_pair_leaves_its_bytes_in_the_source() {
    if !needs_root(ROOT) {
        return;
    }
    let _turn = turn();
    devpts();
    let mut w = Workload::spawn(&WorkloadOpts { extra: vec!["--pty-pair"], ..WorkloadOpts::default() });
    w.wait_ready();
    w.wait_ticks(3);
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    // The files plugin writes the second stream, after memory's.
    let o = Command::new(ferry_bin())
        .args(["checkpoint", &w.pid.to_string(), "--dir", dir.to_str().unwrap()])
        .env("FERRY_FAULT", "checkpoint-mid@2")
        .output()
        .unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&o.status), Some(libc::SIGKILL), "{}", stderr(&o));
    let pid = w.pid;
    ferry_tests::assert_no_residue(&[pid], Some(&dir));
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 3);
    w.terminate_and_check(pid).unwrap_or_else(|e| panic!("the source after ferry died: {e}"));
}

/// A job of an interactive shell migrated with --shell-job, by each strategy in turn
/// (a daemon on loopback: the job comes back on the pane's terminal by its path), still
/// writes to the pane and passes its check.
#[test]
fn a_job_of_an_interactive_shell_migrates_with_each_strategy_onto_its_terminal() {
    if !needs_root(ROOT) {
        return;
    }
    let _turn = turn();
    devpts();
    let tmp = tempfile::tempdir().unwrap();
    let (sock, log) = (tmp.path().join("tmux.sock"), tmp.path().join("job.log"));
    let o = tmux(&sock, &["new-session", "-d", "-x", "100", "-y", "30", "env -i PS1='ready$ ' TERM=screen bash --norc --noprofile"]);
    assert!(o.status.success(), "tmux new-session: {}", stderr(&o));
    let ids = String::from_utf8_lossy(&tmux(&sock, &["display", "-p", "#{pid} #{pane_pid} #{pane_tty}"]).stdout).into_owned();
    let ids: Vec<&str> = ids.split_whitespace().collect();
    let mut guard = KillAll(vec![ids[0].parse().unwrap(), ids[1].parse().unwrap()]);
    let pane_tty = ids[2].to_string();
    wait_pane(&sock, "ready$");
    let job = format!("{} --log {} --no-files --tty-job &", ferry_tests::workload::workload_bin().display(), log.display());
    assert!(tmux(&sock, &["send-keys", &job, "Enter"]).status.success());
    let lines = || std::fs::read_to_string(&log).unwrap_or_default();
    ferry_tests::wait_until("the job to be ready", Duration::from_secs(10), || lines().contains("tick 3\n"));
    let mut pid = ferry_tests::workload::processes_mentioning(&log.to_string_lossy())[0];
    guard.0.push(pid);
    let daemon = ferry_tests::daemon::Daemon::start();
    for strategy in ["stop-copy", "pre-copy", "post-copy", "hybrid"] {
        let o = Command::new(ferry_bin()).args(["migrate", &pid.to_string(), "--to", &daemon.addr, "--json", "--strategy", strategy, "--shell-job"]).output().unwrap();
        let new = restored_pid(&o, pid);
        guard.0.push(new);
        let old = pid;
        ferry_tests::wait_until("the source to go", Duration::from_secs(30), || !pid_alive(old));
        pid = new;
        assert_eq!(fd_link(pid, 1), pane_tty, "{strategy}: the job's terminal");
        let ticks = lines().matches("tick ").count();
        ferry_tests::wait_until("the job to tick on", Duration::from_secs(10), || lines().matches("tick ").count() > ticks + 2);
    }
    assert!(ferry_tests::workload::send_signal(pid, libc::SIGTERM));
    ferry_tests::wait_until("the job's verdict", Duration::from_secs(10), || lines().contains("PASS") || lines().contains("FAIL"));
    assert!(lines().ends_with("PASS\n"), "the job's verdict: {}", lines());
    wait_pane(&sock, &format!("terminal ok {pid}"));
    assert!(tmux(&sock, &["kill-server"]).status.success());
}

/// A pair one of whose slave holders is outside the request is refused in one line
/// naming that process and the slave; the source carries on with its bytes.
#[test]
fn a_pair_whose_slave_a_process_outside_holds_is_refused() {
    if !needs_root(ROOT) {
        return;
    }
    let _turn = turn();
    devpts();
    let mut w = Workload::spawn(&WorkloadOpts { extra: vec!["--pty-pair"], ..WorkloadOpts::default() });
    w.wait_ready();
    w.wait_ticks(3);
    let slave = (0..1024).map(|fd| fd_link(w.pid, fd)).find(|l| l.starts_with("/dev/pts/")).unwrap();
    let outside = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open(&slave).unwrap();
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let o = ferry(&["checkpoint", &w.pid.to_string(), "--dir", dir.to_str().unwrap()]);
    fails_with(&o, &[&format!("process {}: fd ", w.pid), &format!("process {}, which is not part of the request, holds {slave}", std::process::id())]);
    assert!(!dir.exists(), "a refused checkpoint writes nothing");
    drop(outside);
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 3);
    let pid = w.pid;
    w.terminate_and_check(pid).unwrap_or_else(|e| panic!("the source after the refusal: {e}"));
}

/// A command running in the foreground of a tmux pane has the pane's terminal as its
/// controlling terminal without leading its session: not carried yet, refused in one
/// line naming it and its session's leader; tmux and the shell carry on.
#[test]
fn tmux_with_a_command_running_in_its_pane_is_refused_naming_the_command() {
    if !needs_root(ROOT) {
        return;
    }
    let _turn = turn();
    devpts();
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("tmux.sock");
    let o = tmux(&sock, &["new-session", "-d", "-x", "100", "-y", "30", "env -i PS1='ready$ ' TERM=screen bash --norc --noprofile"]);
    assert!(o.status.success(), "tmux new-session: {}", stderr(&o));
    let ids = String::from_utf8_lossy(&tmux(&sock, &["display", "-p", "#{pid} #{pane_pid}"]).stdout).into_owned();
    let ids: Vec<i32> = ids.split_whitespace().map(|p| p.parse().unwrap()).collect();
    let (server, shell) = (ids[0], ids[1]);
    let mut guard = KillAll(vec![server, shell]);
    wait_pane(&sock, "ready$");
    assert!(tmux(&sock, &["send-keys", "sleep 1000", "Enter"]).status.success());
    let children = || std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).unwrap_or_default();
    ferry_tests::wait_until("sleep to run", Duration::from_secs(10), || !children().trim().is_empty());
    let sleep: i32 = children().split_whitespace().next().unwrap().parse().unwrap();
    guard.0.push(sleep);
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let o = ferry(&["checkpoint", &server.to_string(), "--dir", dir.to_str().unwrap()]);
    fails_with(&o, &[&format!("process {sleep}: "), &format!("is its controlling terminal, that of the session process {shell} leads")]);
    assert!(pid_alive(server) && pid_alive(shell) && pid_alive(sleep), "the tree runs on");
    assert!(tmux(&sock, &["send-keys", "C-c", ""]).status.success());
    wait_pane(&sock, "^C\nready$");
    assert!(tmux(&sock, &["kill-server"]).status.success());
}

/// A pair's master inherited by a child (one description in two processes: python's
/// `pty.openpty` then `fork`) is refused in one line naming both; both run on.
#[test]
fn a_master_shared_with_a_child_is_refused_naming_both() {
    if !needs_root(ROOT) {
        return;
    }
    let _turn = turn();
    devpts();
    let script = "import os, pty, time, sys\nm, s = pty.openpty()\nif os.fork() == 0:\n    time.sleep(1000)\nprint('ready', flush=True)\ntime.sleep(1000)\n";
    let mut child = Command::new("python3").args(["-c", script]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let parent = child.id() as i32;
    let mut line = [0u8; 6];
    child.stdout.as_mut().unwrap().read_exact(&mut line).unwrap();
    let kid: i32 = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).unwrap().trim().parse().unwrap();
    let _guard = KillAll(vec![kid, parent]);
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let o = ferry(&["checkpoint", &parent.to_string(), "--dir", dir.to_str().unwrap()]);
    fails_with(&o, &[&format!("process {kid}"), &format!("a pseudo-terminal master, with process {parent}")]);
    assert!(!dir.exists(), "a refused checkpoint writes nothing");
    assert!(pid_alive(parent) && pid_alive(kid), "both run on");
    ferry_tests::workload::kill_pid(kid);
    ferry_tests::workload::kill_pid(parent);
    let _ = child.wait();
}

/// A pair whose slave a parent holds and whose master its child holds (the child is
/// made again after its parent, the slave reopened before its master exists) is refused
/// in one line naming both; both run on.
#[test]
fn a_slave_held_before_its_master_in_the_tree_is_refused_naming_both() {
    if !needs_root(ROOT) {
        return;
    }
    let _turn = turn();
    devpts();
    let script = "import os, pty, time\nm, s = pty.openpty()\nif os.fork() == 0:\n    os.close(s)\n    time.sleep(1000)\nos.close(m)\nprint('ready', flush=True)\ntime.sleep(1000)\n";
    let mut child = Command::new("python3").args(["-c", script]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let parent = child.id() as i32;
    let mut line = [0u8; 6];
    child.stdout.as_mut().unwrap().read_exact(&mut line).unwrap();
    let kid: i32 = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).unwrap().trim().parse().unwrap();
    let _guard = KillAll(vec![kid, parent]);
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let o = ferry(&["checkpoint", &parent.to_string(), "--dir", dir.to_str().unwrap()]);
    fails_with(&o, &[&format!("process {parent}"), &format!("whose master process {kid} holds, which comes after it in the tree")]);
    assert!(!dir.exists(), "a refused checkpoint writes nothing");
    assert!(pid_alive(parent) && pid_alive(kid), "both run on");
    ferry_tests::workload::kill_pid(kid);
    ferry_tests::workload::kill_pid(parent);
    let _ = child.wait();
}
