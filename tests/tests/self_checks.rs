//! The workloads' own checks, shown to fail: for each kind of state they check, a
//! restored copy has that state broken on purpose from outside (a call injected into
//! it with ferry's tracer, or bytes replaced in its memory), and its verdict must be a
//! FAIL naming what was broken. A PASS means something only where a FAIL can happen.

use ferry_tests::{
    ferry,
    inject::{replace_in_memory, Injected},
    needs_root, stderr,
    workload::{Script, Workload, WorkloadOpts},
};

const ROOT: &str = "checkpoint/restore, and calls injected into the workload (ptrace)";

/// Takes the workload through an image once it logged `ticks` ticks: answers the
/// restored copy's pid, once the copy has ticked `after` more.
fn restored(w: &mut Workload, ticks: u64, after: u64) -> i32 {
    w.wait_ready();
    w.wait_ticks(ticks);
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let o = ferry(&["checkpoint", &w.pid.to_string(), "--dir", dir.to_str().unwrap()]);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    w.reap();
    let at = *w.ticks().last().unwrap();
    let o = ferry(&["restore", "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let new = stats["pids"][w.pid.to_string()].as_i64().unwrap_or_else(|| panic!("{stats}")) as i32;
    w.adopt(new);
    w.wait_ticks(at + after);
    new
}

/// Asks the copy `pid` to check itself: its verdict must be a FAIL containing `want`.
fn fails_naming(w: &mut Workload, pid: i32, want: &str) {
    let verdict = w.terminate_and_check(pid);
    match verdict {
        Err(e) if e.starts_with("FAIL") && e.contains(want) => {}
        other => panic!("the broken copy's verdict: {other:?}, want a FAIL naming {want:?}; output: {}", w.output()),
    }
}

/// Spawns the C workload with `opts`, restores it, breaks the copy with `breaks` and
/// expects a FAIL naming `want`.
fn broken(opts: WorkloadOpts, want: &str, breaks: impl FnOnce(&Workload, i32, &mut Injected)) {
    let mut w = Workload::spawn(&opts);
    // Enough ticks before and after that a timer re-armed from scratch shows (the
    // workload allows 10 ticks of slack).
    let new = restored(&mut w, 25, 20);
    let mut inj = Injected::seize(new);
    breaks(&w, new, &mut inj);
    inj.release();
    fails_naming(&mut w, new, want);
}

/// The fds of `pid` whose link satisfies `what` and whose fdinfo has `pos` (if given)
/// and access mode `mode` (0 read, 1 write, 2 both; if given).
fn fds(pid: i32, what: impl Fn(&str) -> bool, pos: Option<u64>, mode: Option<u32>) -> Vec<u64> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let Ok(link) = std::fs::read_link(e.path()) else { continue };
        if !what(&link.to_string_lossy()) {
            continue;
        }
        let fd: u64 = e.file_name().to_str().unwrap().parse().unwrap();
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        let field = |name: &str| info.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string());
        let p: Option<u64> = field("pos:").and_then(|v| v.parse().ok());
        let flags = field("flags:").and_then(|v| u32::from_str_radix(&v, 8).ok()).unwrap_or(0);
        if pos.is_some_and(|want| p != Some(want)) || mode.is_some_and(|m| flags & 3 != m) {
            continue;
        }
        found.push(fd);
    }
    found.sort_unstable();
    found
}

/// The one fd of `pid` whose link is exactly `link`.
fn fd_of(pid: i32, link: &str) -> u64 {
    let found = fds(pid, |l| l == link, None, None);
    assert_eq!(found.len(), 1, "fds of {pid} linking to {link}: {found:?}");
    found[0]
}

/// A `sigset_t` (kernel: 8 bytes) of the given signals.
fn sigset(signals: &[i32]) -> Vec<u8> {
    signals.iter().fold(0u64, |set, s| set | 1 << (s - 1)).to_le_bytes().to_vec()
}

fn words(w: &[u64]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn broken_files_and_offsets_fail_the_check() {
    if !needs_root(ROOT) {
        return;
    }
    let data = |w: &Workload| w.files_dir().join("data").to_string_lossy().into_owned();
    // The offset of `data` (10, shared with its dup) moved back to 0.
    broken(WorkloadOpts::default(), "data: offset 0, want 10", |w, pid, inj| {
        let fd = fds(pid, |l| l == data(w), Some(10), None)[0];
        inj.call(pid, libc::SYS_lseek, [fd, 0, libc::SEEK_SET as u64, 0, 0, 0]);
    });
    // Ten of the pipe's 1000 unread bytes gone.
    broken(WorkloadOpts::default(), "pipe: 990 bytes queued, want 1000", |_, pid, inj| {
        let fd = fds(pid, |l| l.starts_with("pipe:"), None, Some(0))[0];
        let buf = inj.put(&[0; 16]);
        inj.call(pid, libc::SYS_read, [fd, buf, 10, 0, 0, 0]);
    });
    // The deleted file's first byte changed.
    broken(WorkloadOpts::default(), "deleted: byte 0 differs", |_, pid, inj| {
        let fd = fds(pid, |l| l.ends_with("/deleted (deleted)"), None, None)[0];
        let x = inj.put(b"X");
        inj.call(pid, libc::SYS_pwrite64, [fd, x, 1, 0, 0, 0]);
    });
    // fd 50 (/dev/null) lost FD_CLOEXEC.
    broken(WorkloadOpts::default(), "fd 50: FD_CLOEXEC lost", |_, pid, inj| {
        inj.call(pid, libc::SYS_fcntl, [50, libc::F_SETFD as u64, 0, 0, 0, 0]);
    });
}

#[test]
fn broken_signal_state_fails_the_check() {
    if !needs_root(ROOT) {
        return;
    }
    // struct kernel_sigaction: handler, flags, restorer, mask.
    broken(WorkloadOpts::default(), "SIGUSR1 handler lost", |_, pid, inj| {
        let act = inj.put(&words(&[libc::SIG_IGN as u64, 0, 0, 0]));
        inj.call(pid, libc::SYS_rt_sigaction, [libc::SIGUSR1 as u64, act, 0, 8, 0, 0]);
    });
    // The SIGUSR2 pending in the main thread taken (sigtimedwait, no wait).
    broken(WorkloadOpts::default(), "SIGUSR2 not pending", |_, pid, inj| {
        let set = inj.put(&sigset(&[libc::SIGUSR2]));
        let now = inj.put(&words(&[0, 0]));
        assert_eq!(inj.call(pid, libc::SYS_rt_sigtimedwait, [set, 0, now, 8, 0, 0]), libc::SIGUSR2 as i64);
    });
    broken(WorkloadOpts::default(), "main thread blocks a signal it should not", |_, pid, inj| {
        let set = inj.put(&sigset(&[libc::SIGWINCH]));
        inj.call(pid, libc::SYS_rt_sigprocmask, [libc::SIG_BLOCK as u64, set, 0, 8, 0, 0]);
    });
}

#[test]
fn timers_re_armed_from_scratch_fail_the_check() {
    if !needs_root(ROOT) {
        return;
    }
    // The itimer set again to an hour, as a restore that did not carry its time left
    // would (the check once accepted any time left up to the hour).
    broken(WorkloadOpts::default(), "itimer has", |_, pid, inj| {
        let hour = inj.put(&words(&[3600, 0, 3600, 0]));
        inj.call(pid, libc::SYS_setitimer, [libc::ITIMER_REAL as u64, hour, 0, 0, 0, 0]);
    });
    // The one-shot POSIX timer (id 3, CLOCK_BOOTTIME) likewise.
    broken(WorkloadOpts { process_state: true, ..Default::default() }, "the one-shot POSIX timer has", |_, pid, inj| {
        let hour = inj.put(&words(&[0, 0, 3600, 0]));
        inj.call(pid, libc::SYS_timer_settime, [3, 0, hour, 0, 0, 0]);
    });
    // The periodic process-directed one (id 0) stopped.
    broken(WorkloadOpts { process_state: true, ..Default::default() }, "a periodic POSIX timer lost its id or its interval", |_, pid, inj| {
        let off = inj.put(&words(&[0, 0, 0, 0]));
        inj.call(pid, libc::SYS_timer_settime, [0, 0, off, 0, 0, 0]);
    });
}

#[test]
fn broken_event_fds_fail_the_check() {
    if !needs_root(ROOT) {
        return;
    }
    let opts = || WorkloadOpts { event_fds: true, ..Default::default() };
    // One of the semaphore's five taken.
    broken(opts(), "eventfd read 4 gave", |_, pid, inj| {
        let efd = fd_of(pid, "anon_inode:[eventfd]");
        let buf = inj.put(&[0; 8]);
        inj.call(pid, libc::SYS_read, [efd, buf, 8, 0, 0, 0]);
    });
    // The timerfd set again, its expirations so far lost (the check once took any).
    broken(opts(), "timerfd counts", |_, pid, inj| {
        let tfd = fd_of(pid, "anon_inode:[timerfd]");
        let its = inj.put(&words(&[0, 7_000_000, 0, 7_000_000]));
        inj.call(pid, libc::SYS_timerfd_settime, [tfd, 0, its, 0, 0, 0]);
    });
    // The signalfd no longer watched by the epoll instance (never checked before).
    broken(opts(), "epoll reported 7 of eventfd|pipe|timerfd|signalfd", |_, pid, inj| {
        let (ep, sfd) = (fd_of(pid, "anon_inode:[eventpoll]"), fd_of(pid, "anon_inode:[signalfd]"));
        inj.call(pid, libc::SYS_epoll_ctl, [ep, libc::EPOLL_CTL_DEL as u64, sfd, 0, 0, 0]);
    });
    // The eventfd no longer watched.
    broken(opts(), "epoll reported 14 of eventfd|pipe|timerfd|signalfd", |_, pid, inj| {
        let (ep, efd) = (fd_of(pid, "anon_inode:[eventpoll]"), fd_of(pid, "anon_inode:[eventfd]"));
        inj.call(pid, libc::SYS_epoll_ctl, [ep, libc::EPOLL_CTL_DEL as u64, efd, 0, 0, 0]);
    });
}

/// The fd of `pid` that is socket `inode`.
fn socket_fd(pid: i32, inode: u64) -> u64 {
    fd_of(pid, &format!("socket:[{inode}]"))
}

/// The inode of the socket in `/proc/PID/net/<table>` whose local port (hex after the
/// colon) is `port`.
fn inet_inode(pid: i32, table: &str, port: u16) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap();
    let want = format!(":{port:04X}");
    text.lines()
        .skip(1)
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f[1].ends_with(&want).then(|| f[9].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no socket at port {port} in /proc/{pid}/net/{table}: {text}"))
}

#[test]
fn broken_sockets_fail_the_check() {
    if !needs_root(ROOT) {
        return;
    }
    let opts = || WorkloadOpts { listen: true, ..Default::default() };
    let port = |w: &Workload| -> u16 { w.lines().iter().find_map(|l| l.strip_prefix("listen ")?.parse().ok()).unwrap() };
    // The TCP listener's TCP_NODELAY turned off.
    broken(opts(), "the listener lost SO_REUSEADDR or TCP_NODELAY", |w, pid, inj| {
        let fd = socket_fd(pid, inet_inode(pid, "tcp", port(w)));
        let zero = inj.put(&0i32.to_le_bytes());
        inj.call(pid, libc::SYS_setsockopt, [fd, libc::IPPROTO_TCP as u64, libc::TCP_NODELAY as u64, zero, 4, 0]);
    });
    // The UDP socket no longer connected to itself (AF_UNSPEC dissolves it).
    broken(opts(), "the UDP socket did not get its own datagram back", |_, pid, inj| {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/udp")).unwrap();
        let inode: u64 = text.lines().nth(1).expect("the UDP socket").split_whitespace().nth(9).unwrap().parse().unwrap();
        let fd = socket_fd(pid, inode);
        let unspec = inj.put(&[0u8; 16]);
        inj.call(pid, libc::SYS_connect, [fd, unspec, 16, 0, 0, 0]);
    });
    // The Unix listener bound to a path shut down: connections to it are refused.
    broken(opts(), "connecting to the path listener", |w, pid, inj| {
        let path = w.lines().iter().find_map(|l| Some(l.strip_prefix("unix-listen ")?.to_string())).unwrap();
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap();
        let inode: u64 = text
            .lines()
            .find(|l| l.ends_with(&path))
            .and_then(|l| l.split_whitespace().nth(6)?.parse().ok())
            .unwrap_or_else(|| panic!("no {path} in {text}"));
        inj.call(pid, libc::SYS_shutdown, [socket_fd(pid, inode), libc::SHUT_RDWR as u64, 0, 0, 0, 0]);
    });
}

#[test]
fn broken_process_state_fails_the_check() {
    if !needs_root(ROOT) {
        return;
    }
    broken(WorkloadOpts::default(), "umask is 022, want 027", |_, pid, inj| {
        inj.call(pid, libc::SYS_umask, [0o022, 0, 0, 0, 0, 0]);
    });
    let opts = || WorkloadOpts { threads: 2, process_state: true, ..Default::default() };
    broken(opts(), "main thread's nice value is 0, want 7", |_, pid, inj| {
        inj.call(pid, libc::SYS_setpriority, [libc::PRIO_PROCESS as u64, pid as u64, 0, 0, 0, 0]);
    });
    broken(opts(), "RLIMIT_NOFILE is 777/2048, want 777/4096", |_, pid, inj| {
        let limit = inj.put(&words(&[777, 2048]));
        inj.call(pid, libc::SYS_prlimit64, [0, libc::RLIMIT_NOFILE as u64, limit, 0, 0, 0]);
    });
    broken(opts(), "main thread's CPU affinity is not CPU 0 alone", |_, pid, inj| {
        let both = inj.put(&3u64.to_le_bytes());
        inj.call(pid, libc::SYS_sched_setaffinity, [0, 8, both, 0, 0, 0]);
    });
    broken(opts(), "personality is 0x0", |_, pid, inj| {
        inj.call(pid, libc::SYS_personality, [0, 0, 0, 0, 0, 0]);
    });
}

#[test]
fn broken_thread_state_fails_the_check() {
    if !needs_root(ROOT) {
        return;
    }
    let opts = || WorkloadOpts { threads: 3, ..Default::default() };
    // A thread's alternate signal stack switched off.
    broken(opts(), "sigaltstack is", |_, _, inj| {
        let thread = inj.tids()[1];
        let off = inj.put(&words(&[0, libc::SS_DISABLE as u64, 0]));
        inj.call(thread, libc::SYS_sigaltstack, [off, 0, 0, 0, 0, 0]);
    });
    // A thread's SIGUSR2 unblocked.
    broken(opts(), "SIGUSR2 not blocked", |_, _, inj| {
        let thread = inj.tids()[2];
        let set = inj.put(&sigset(&[libc::SIGUSR2]));
        inj.call(thread, libc::SYS_rt_sigprocmask, [libc::SIG_UNBLOCK as u64, set, 0, 8, 0, 0]);
    });
    // The main thread's rseq area unregistered (the check asks the kernel).
    broken(WorkloadOpts { files: false, rseq: true, ..Default::default() }, "rseq: the main thread's area was not registered", |_, pid, inj| {
        let (area, len, sig) = inj.rseq(pid);
        assert_ne!(area, 0, "the copy's main thread has rseq registered");
        inj.call(pid, libc::SYS_rseq, [area, len as u64, 1, sig as u64, 0, 0]);
    });
}

/// A script restored, the pattern `from` (in its memory) replaced by `to`; its verdict
/// must be a FAIL naming `want`.
fn broken_script(kind: Script, from: &[u8], to: &[u8], want: &str) {
    let mut w = Workload::spawn_script(kind);
    let new = restored(&mut w, 3, 3);
    assert!(replace_in_memory(new, from, to) > 0, "{kind:?}: the pattern is not in the copy's memory");
    fails_naming(&mut w, new, want);
}

#[test]
fn broken_scripts_fail_their_checks() {
    if !needs_root(ROOT) {
        return;
    }
    const SEED: u64 = 0x5EED_F00D;
    // Python's bytearray: page p is (p, SEED) as two little-endian u64s, 256 times.
    let unit = |p: u64, seed: u64| [p.to_le_bytes(), seed.to_le_bytes()].concat();
    broken_script(Script::Python, &unit(5000, SEED), &unit(5000, SEED + 1), "bytearray page 5000 differs");
    // Perl's string: page p is (p, SEED) as two big-endian u32s, 512 times.
    let unit = |p: u32, seed: u32| [p.to_be_bytes(), seed.to_be_bytes()].concat();
    broken_script(Script::Perl, &unit(5000, SEED as u32), &unit(5000, SEED as u32 + 1), "string page 5000 differs");
    // Bash's array: element 999 is "998008".
    broken_script(Script::Bash, b"998008\0", b"998009\0", "array element 999 is '998009'");
    // asyncio's bytearray: page p is (p, 0xA5EEDF00) as two little-endian u64s.
    const ASYNC_SEED: u64 = 0xA5EE_DF00;
    let unit = |p: u64, seed: u64| [p.to_le_bytes(), seed.to_le_bytes()].concat();
    broken_script(Script::PythonAsyncio, &unit(1000, ASYNC_SEED), &unit(1000, ASYNC_SEED + 1), "page 1000 differs");
}

#[test]
fn broken_credentials_fail_the_check() {
    if !needs_root(ROOT) {
        return;
    }
    // The ambient set emptied in a restored copy (allowed without privilege).
    const PR_CAP_AMBIENT: u64 = 47;
    const PR_CAP_AMBIENT_CLEAR_ALL: u64 = 4;
    broken(WorkloadOpts { creds: true, ..Default::default() }, "ambient capability 10 is 0", |_, pid, inj| {
        inj.call(pid, libc::SYS_prctl, [PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0, 0]);
    });
}

/// The fd of `pid` linking to `link` whose fdinfo satisfies `info`.
fn fd_where(pid: i32, link: &str, info: impl Fn(&str) -> bool) -> u64 {
    let found: Vec<u64> = fds(pid, |l| l == link, None, None)
        .into_iter()
        .filter(|fd| info(&std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default()))
        .collect();
    assert_eq!(found.len(), 1, "fds of {pid} linking to {link}: {found:?}");
    found[0]
}

#[test]
fn removed_watches_and_marks_and_a_wrong_pidfd_fail_the_check() {
    if !needs_root(ROOT) {
        return;
    }
    let nonblocking = |info: &str| {
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).and_then(|v| u32::from_str_radix(v.trim(), 8).ok());
        flags.is_some_and(|f| f & libc::O_NONBLOCK as u32 != 0)
    };
    // Watch 1 (in-file) of the non-blocking inotify instance removed.
    broken(WorkloadOpts { inotify: true, ..Default::default() }, "inotify: event wd 1 mask 0x8000 queued before the check", |_, pid, inj| {
        let fd = fd_where(pid, "anon_inode:inotify", nonblocking);
        inj.call(pid, libc::SYS_inotify_rm_watch, [fd, 1, 0, 0, 0, 0]);
    });
    // The fanotify mark on fan-file removed.
    broken(WorkloadOpts { fanotify: true, ..Default::default() }, "fanotify: no event on fan-file", |w, pid, inj| {
        let fd = fd_where(pid, "anon_inode:[fanotify]", |_| true);
        let path = w.files_dir().join("notify/fan-file");
        let at = inj.put(format!("{}\0", path.display()).as_bytes());
        const FAN_MARK_REMOVE: u64 = 2;
        const FAN_MODIFY_CLOSE_WRITE: u64 = 0x2 | 0x8;
        inj.call(pid, libc::SYS_fanotify_mark, [fd, FAN_MARK_REMOVE, FAN_MODIFY_CLOSE_WRITE, libc::AT_FDCWD as u64, at, 0]);
    });
    // The pidfd to itself replaced by the one to the exited child.
    broken(WorkloadOpts { pidfd: true, ..Default::default() }, "pidfd: signal 0 to itself", |_, pid, inj| {
        let own = fd_where(pid, "anon_inode:[pidfd]", |i| nonblocking(i) && i.contains(&format!("Pid:\t{pid}\n")));
        let dead = fd_where(pid, "anon_inode:[pidfd]", |i| i.contains("Pid:\t-1\n"));
        inj.call(pid, libc::SYS_dup2, [dead, own, 0, 0, 0, 0]);
    });
}

/// The workload's `--del-*` and `--epoll-closed` checks (see `deleted.rs`).
#[test]
fn broken_removed_things_fail_the_check() {
    if !needs_root(ROOT) {
        return;
    }
    let opts = |extra: &[&'static str]| WorkloadOpts { files: false, extra: extra.to_vec(), ..Default::default() };
    let path = |w: &Workload, name: &str| format!("{}/{name}", w.files_dir().display());
    // The copy back in a directory that exists.
    broken(opts(&["--del-cwd"]), "del-cwd: the working directory is not the removed one", |_, pid, inj| {
        let root = inj.put(b"/\0");
        inj.call(pid, libc::SYS_chdir, [root, 0, 0, 0, 0, 0]);
    });
    // The removed node's fd replaced by /dev/zero itself (a named node).
    broken(opts(&["--del-dev"]), "del-dev: the fd of gone-zero is not the removed node", |w, pid, inj| {
        let fd = fd_of(pid, &format!("{} (deleted)", path(w, "gone-zero")));
        let zero = inj.put(b"/dev/zero\0");
        let z = inj.call(pid, libc::SYS_openat, [libc::AT_FDCWD as u64, zero, libc::O_RDWR as u64, 0, 0, 0]) as u64;
        inj.call(pid, libc::SYS_dup3, [z, fd, 0, 0, 0, 0]);
        inj.call(pid, libc::SYS_close, [z, 0, 0, 0, 0, 0]);
    });
    // A socket file at the listener's name again, as a restore that kept it would leave.
    broken(opts(&["--del-sock"]), "del-sock: gone-listen has a socket file again", |w, pid, inj| {
        let name = inj.put(format!("{}\0", path(w, "gone-listen")).as_bytes());
        inj.call(pid, libc::SYS_mknodat, [libc::AT_FDCWD as u64, name, (libc::S_IFSOCK | 0o600) as u64, 0, 0, 0]);
    });
    // The watch keyed by the fd where the pipe is now, not by the closed number it was
    // added by (what adding it again through the dup would make).
    broken(opts(&["--epoll-closed"]), "epoll-closed: the watch is no longer keyed by fd", |_, pid, inj| {
        let ep = fd_of(pid, "anon_inode:[eventpoll]");
        // The number the watch was added by, as the epoll's fdinfo names it, and the
        // dup that holds the watched description.
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{ep}")).unwrap();
        let num: u64 = info.lines().find_map(|l| l.strip_prefix("tfd:")?.split_whitespace().next()?.parse().ok()).unwrap();
        let read_end = *fds(pid, |l| l.starts_with("pipe:"), None, Some(0)).iter().find(|&&f| f != num).unwrap();
        let held = inj.call(pid, libc::SYS_fcntl, [num, libc::F_DUPFD_CLOEXEC as u64, 0, 0, 0, 0]) as u64;
        inj.call(pid, libc::SYS_dup3, [read_end, num, 0, 0, 0, 0]);
        inj.call(pid, libc::SYS_epoll_ctl, [ep, libc::EPOLL_CTL_DEL as u64, num, 0, 0, 0]);
        let mut ev = (libc::EPOLLIN as u32).to_le_bytes().to_vec();
        ev.extend_from_slice(&0xfeed_f00d_1234_5678u64.to_le_bytes());
        let ev = inj.put(&ev);
        inj.call(pid, libc::SYS_epoll_ctl, [ep, libc::EPOLL_CTL_ADD as u64, read_end, ev, 0, 0]);
        inj.call(pid, libc::SYS_dup3, [held, num, 0, 0, 0, 0]);
        inj.call(pid, libc::SYS_close, [held, 0, 0, 0, 0, 0]);
    });
}

/// The workload's `--chroot` checks (see `deleted.rs`).
#[test]
fn a_broken_chroot_fails_the_check() {
    if !needs_root(ROOT) {
        return;
    }
    let opts = || WorkloadOpts { files: false, extra: vec!["--chroot"], ..Default::default() };
    // The working directory at the root's top.
    broken(opts(), "chroot: getcwd is /, want /sub", |_, pid, inj| {
        let root = inj.put(b"/\0");
        inj.call(pid, libc::SYS_chdir, [root, 0, 0, 0, 0, 0]);
    });
    // A /etc/passwd inside the root: what the machine's root would show.
    broken(opts(), "chroot: /etc/passwd is reachable", |_, pid, inj| {
        let etc = inj.put(b"/etc\0");
        inj.call(pid, libc::SYS_mkdirat, [libc::AT_FDCWD as u64, etc, 0o755, 0, 0, 0]);
        let passwd = inj.put(b"/etc/passwd\0");
        let flags = (libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC) as u64;
        let f = inj.call(pid, libc::SYS_openat, [libc::AT_FDCWD as u64, passwd, flags, 0o644, 0, 0]) as u64;
        inj.call(pid, libc::SYS_close, [f, 0, 0, 0, 0, 0]);
    });
}

/// The first mapping of `pid` with permissions `perms` whose name ends with `name`.
fn mapping(pid: i32, perms: &str, name: &str) -> (u64, u64) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let line = maps
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(perms) && l.ends_with(name))
        .unwrap_or_else(|| panic!("no {perms} {name} in {maps}"));
    let (s, e) = line.split_whitespace().next().unwrap().split_once('-').unwrap();
    (u64::from_str_radix(s, 16).unwrap(), u64::from_str_radix(e, 16).unwrap())
}

/// Opens the object mapped at `range` of `pid` through its map_files link, in `pid`.
fn open_mapped(pid: i32, inj: &mut Injected, range: (u64, u64), flags: i32) -> u64 {
    let path = inj.put(format!("/proc/self/map_files/{:x}-{:x}\0", range.0, range.1).as_bytes());
    let fd = inj.call(pid, libc::SYS_openat, [libc::AT_FDCWD as u64, path, (flags | libc::O_CLOEXEC) as u64, 0, 0, 0]);
    assert!(fd >= 0, "open of map_files in the copy: {fd}");
    fd as u64
}

/// A shared mapping of `pid` made a private one of the same object: what restoring
/// each mapping from its own copy would give.
fn unshare(pid: i32, inj: &mut Injected, name: &str) {
    let (s, e) = mapping(pid, "rw-s", name);
    let fd = open_mapped(pid, inj, (s, e), libc::O_RDONLY);
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_FIXED) as u64;
    assert_eq!(inj.call(pid, libc::SYS_mmap, [s, e - s, prot, flags, fd, 0]), s as i64);
    inj.call(pid, libc::SYS_close, [fd, 0, 0, 0, 0, 0]);
}

/// The workload's `--mapped-deleted` and `--memfd-map` checks (see `mapped.rs`).
#[test]
fn broken_deleted_and_memfd_mappings_fail_the_check() {
    if !needs_root(ROOT) {
        return;
    }
    let opts = |extra: &'static str| WorkloadOpts { files: false, extra: vec![extra], ..Default::default() };
    let unshared = "a write through one shared mapping is not seen in the other";
    broken(opts("--memfd-map"), &format!("memfd-map: {unshared}"), |_, pid, inj| {
        unshare(pid, inj, "/memfd:ferry-mapped (deleted)")
    });
    broken(opts("--mapped-deleted"), &format!("mapped-deleted: {unshared}"), |_, pid, inj| {
        unshare(pid, inj, "/mapped-shr (deleted)")
    });
    // A file at the deleted one's name: what a restore that left it behind would show.
    broken(opts("--mapped-deleted"), "mapped-deleted: the private mappings are not named", |w, _, _| {
        std::fs::write(w.files_dir().join("mapped-del"), "left behind").unwrap();
    });
    // A seal the source never had (F_SEAL_FUTURE_WRITE).
    broken(opts("--memfd-map"), "memfd-map: size 8202 seals 0x16, want 8202 and 0x6", |_, pid, inj| {
        let range = mapping(pid, "rw-s", "/memfd:ferry-mapped (deleted)");
        let fd = open_mapped(pid, inj, range, libc::O_RDWR);
        assert_eq!(inj.call(pid, libc::SYS_fcntl, [fd, libc::F_ADD_SEALS as u64, 0x10, 0, 0, 0]), 0);
        inj.call(pid, libc::SYS_close, [fd, 0, 0, 0, 0, 0]);
    });
}
