//! What the processes of a tree share, carried once: pipes between them with the bytes
//! in flight (a C ring of pipes between the workload's children, a real shell
//! pipeline), stream socket pairs between them with their queues both ways, shared
//! anonymous memory mapped before a fork (one object again, written by all). Each tree is checkpointed, killed and restored, and checks itself from
//! inside; each check is shown to fail when the restored copy is broken on purpose.

use std::{
    os::unix::fs::OpenOptionsExt,
    path::Path,
    process::{Command, Stdio},
};

use ferry_tests::{
    ferry,
    inject::Injected,
    needs_root, stderr, stdout, wait_until,
    workload::{kill_pid, Workload, WorkloadOpts, DEADLINE},
};

const ROOT: &str = "a checkpoint seizes the processes (ptrace of any process)";

/// The children of `pid` (its main thread's).
fn children_of(pid: i32) -> Vec<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    text.split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// Kills every pid when dropped.
struct KilledAll(Vec<i32>);
impl Drop for KilledAll {
    fn drop(&mut self) {
        for &p in &self.0 {
            kill_pid(p);
        }
    }
}

/// The bytes queued for reading at fd `fd` of `pid` (a pipe or a socket): FIONREAD on
/// ferry's duplicate of it (`pidfd_getfd`; nothing is consumed); -1 when it cannot.
fn queued(pid: i32, fd: i32) -> i32 {
    let mut n: libc::c_int = -1;
    // SAFETY: plain syscalls on integers; FIONREAD writes one int of ours.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        if pidfd < 0 {
            return -1;
        }
        let dup = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
        if dup >= 0 && libc::ioctl(dup, libc::FIONREAD, &mut n) != 0 {
            n = -1;
        }
        if dup >= 0 {
            libc::close(dup);
        }
        libc::close(pidfd);
    }
    n
}

/// `ferry checkpoint` then `ferry restore` of the tree of `root`; `killed` runs between
/// them (reaping the original). Answers image pid → pid now, and `ferry show`'s text.
fn through_image(root: i32, killed: impl FnOnce()) -> (std::collections::BTreeMap<i32, i32>, String) {
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let o = ferry(&["checkpoint", &root.to_string(), "--dir", dir.to_str().unwrap()]);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    let shown = stdout(&ferry(&["show", dir.to_str().unwrap()]));
    killed();
    let o = ferry(&["restore", "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let pids = stats["pids"].as_object().unwrap_or_else(|| panic!("no pids in {stats}"));
    (pids.iter().map(|(k, v)| (k.parse().unwrap(), v.as_i64().unwrap() as i32)).collect(), shown)
}

/// The workload with three children in a ring (`--tree-pipes` or `--tree-sockets`),
/// once every pipe or socket has bytes in flight (at fd `fd` of each child): answers
/// it and its children.
fn ring(flag: &'static str, fd: i32) -> (Workload, Vec<i32>) {
    // A datagram socket tells the length of its first message only (8 bytes); a pipe
    // takes thousands.
    let least = if flag == "--tree-sockets" { 8 } else { 4096 };
    let w = Workload::spawn(&WorkloadOpts { mem_mib: 1, tick_ms: 5, tree: 3, extra: vec![flag], ..Default::default() });
    w.wait_ready();
    let kids = children_of(w.pid);
    assert_eq!(kids.len(), 3, "{kids:?}");
    // Each child's writes outrun its reader's: the queues fill.
    wait_until("bytes in flight in every pipe or socket of the ring", DEADLINE, || kids.iter().all(|&k| queued(k, fd) >= least));
    (w, kids)
}

/// The ring through an image: answers the restored root and children, with the tick
/// the copy starts from; `shown` checks `ferry show`'s text.
fn ring_restored(w: &mut Workload, kids: &[i32], shown_ok: impl Fn(&str) -> bool) -> (i32, Vec<i32>, u64) {
    let (pids, shown) = through_image(w.pid, || w.reap());
    assert!(shown_ok(&shown), "{shown}");
    let at = *w.ticks().last().unwrap();
    let new = pids[&w.pid];
    w.adopt(new);
    let new_kids: Vec<i32> = kids.iter().map(|k| pids[k]).collect();
    (new, new_kids, at)
}

/// Each child's reading end is another end of the pipe its neighbour writes.
fn three_pipe_ends(shown: &str) -> bool {
    shown.matches("another end of the pipe").count() == 3
}

/// The link of `/proc/PID/fd/FD`: `pipe:[ino]`, `socket:[ino]`.
fn link(pid: i32, fd: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap().display().to_string()
}

/// Eight bytes taken from outside from what `victim` reads next at its fd `fd` (a
/// pipe's reading end, or a socket: its receive queue).
fn take_a_word(victim: i32, fd: i32) {
    let word = if link(victim, fd).starts_with("pipe:") {
        let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(format!("/proc/{victim}/fd/{fd}")).unwrap();
        let mut word = [0u8; 8];
        std::io::Read::read_exact(&mut f, &mut word).map(|_| 8).unwrap()
    } else {
        // SAFETY: plain syscalls on integers and a buffer of ours.
        unsafe {
            let pidfd = libc::syscall(libc::SYS_pidfd_open, victim, 0) as i32;
            assert!(pidfd >= 0, "pidfd_open {victim}");
            let sock = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
            assert!(sock >= 0, "pidfd_getfd {victim} {fd}");
            let mut word = [0u8; 8];
            let n = libc::recv(sock, word.as_mut_ptr().cast(), 8, libc::MSG_DONTWAIT);
            libc::close(sock);
            libc::close(pidfd);
            n
        }
    };
    assert_eq!(word, 8, "a word taken from process {victim}'s fd {fd}");
}

/// The restored copy of a ring with a word taken from its second child's fd `fd`:
/// that child exits `code`, which its parent reports in its FAIL.
fn ring_broken(flag: &'static str, fd: i32, code: i32, what: &str) {
    let (mut w, kids) = ring(flag, fd);
    let _originals = KilledAll(kids.clone());
    let (new, new_kids, _) = ring_restored(&mut w, &kids, |_| true);
    let _restored = KilledAll(new_kids.clone());
    let victim = new_kids[1];
    take_a_word(victim, fd);
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 20);
    let verdict = w.terminate_and_check(new);
    let want = format!("child {victim} exited early (status {:#x}", code << 8);
    match verdict {
        Err(e) if e.starts_with("FAIL") && e.contains(&want) && e.contains(what) => {}
        other => panic!("the broken copy's verdict: {other:?}, want {want}; output: {}", w.output()),
    }
}

#[test]
fn a_ring_of_pipes_between_children_comes_back_with_its_bytes_in_flight_and_sizes() {
    if !needs_root(ROOT) {
        return;
    }
    let (mut w, kids) = ring("--tree-pipes", 101);
    let _originals = KilledAll(kids.clone());
    let (new, new_kids, at) = ring_restored(&mut w, &kids, three_pipe_ends);
    let _restored = KilledAll(new_kids.clone());
    // Three pipes, not six: each child's ends are of the pipes its neighbours hold.
    for (i, &k) in new_kids.iter().enumerate() {
        let next = new_kids[(i + 1) % 3];
        assert_eq!(link(k, 101), link(next, 100), "child {k} writes the pipe child {next} reads");
    }
    // Every word in flight at the checkpoint is read once, in order, by each child,
    // which would exit otherwise (the parent checks every tick).
    w.wait_ticks(at + 40);
    w.terminate_and_check(new).unwrap();
    assert!(w.lines().iter().any(|l| l == "tree 3 children passed"), "{}", w.log_text());
}

#[test]
fn a_word_taken_from_a_restored_ring_pipe_fails_the_check() {
    if !needs_root(ROOT) {
        return;
    }
    ring_broken("--tree-pipes", 100, 7, "pipe ring");
}

#[test]
fn a_ring_of_stream_and_datagram_pairs_between_children_comes_back_with_both_queues_of_each() {
    if !needs_root(ROOT) {
        return;
    }
    let (mut w, kids) = ring("--tree-sockets", 102);
    wait_until("bytes queued both ways", DEADLINE, || kids.iter().all(|&k| queued(k, 103) >= 8));
    let _originals = KilledAll(kids.clone());
    let (new, new_kids, at) = ring_restored(&mut w, &kids, |_| true);
    let _restored = KilledAll(new_kids.clone());
    // Each pair is one pair again: a child's end's peer is its neighbour's end.
    for (i, &k) in new_kids.iter().enumerate() {
        let next = new_kids[(i + 1) % 3];
        let ino = |pid: i32, fd: i32| link(pid, fd).trim_start_matches("socket:[").trim_end_matches(']').parse::<u64>().unwrap();
        let (mine, theirs) = (ino(k, 102), ino(next, 103));
        let peer = String::from_utf8(Command::new("ss").args(["-xH"]).output().unwrap().stdout).unwrap();
        let paired = peer.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 7 && f[5] == mine.to_string() && f[7] == theirs.to_string()
        });
        assert!(paired, "child {k}'s socket {mine} is paired with child {next}'s {theirs}: {peer}");
    }
    w.wait_ticks(at + 40);
    w.terminate_and_check(new).unwrap();
    assert!(w.lines().iter().any(|l| l == "tree 3 children passed"), "{}", w.log_text());
}

#[test]
fn a_word_taken_from_a_restored_ring_socket_fails_the_check() {
    if !needs_root(ROOT) {
        return;
    }
    ring_broken("--tree-sockets", 103, 10, "socket ring");
}

/// A shell pipeline `yes | head -c 8000000 | python3 …`: python3 reads slowly and
/// checks every byte continues the `y\n` pattern, and writes `PASS <count>` or a FAIL.
fn pipeline(out: &Path) -> std::process::Child {
    let reader = "import sys, time\n\
                  n, ok = 0, True\n\
                  pat = b'y\\n' * 4097\n\
                  while True:\n\
                  \x20   b = sys.stdin.buffer.read1(8192)\n\
                  \x20   if not b: break\n\
                  \x20   ok = ok and b == pat[n % 2:n % 2 + len(b)]\n\
                  \x20   n += len(b)\n\
                  \x20   time.sleep(0.004)\n\
                  print(('PASS' if ok else 'FAIL pattern broken at or before byte') + f' {n}')\n";
    let script = format!("yes | head -c 8000000 | /usr/bin/python3 -c \"$R\" > {}", out.display());
    Command::new("/bin/bash")
        .args(["-c", &script])
        .env("R", reader)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn a_shell_pipeline_with_bytes_in_both_pipes_comes_back_and_counts_every_byte_once() {
    if !needs_root(ROOT) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut bash = pipeline(&out);
    let root = bash.id() as i32;
    let _original = KilledAll(vec![root]);
    let mut kids = Vec::new();
    wait_until("the pipeline's three processes, both pipes full", DEADLINE, || {
        kids = children_of(root);
        let comm = |k: i32| std::fs::read_to_string(format!("/proc/{k}/comm")).unwrap_or_default();
        kids.len() == 3 && kids.iter().any(|&k| comm(k) == "python3\n") && kids.iter().filter(|&&k| queued(k, 0) > 0).count() == 2
    });
    let _kids = KilledAll(kids.clone());
    let (pids, shown) = through_image(root, || {
        let _ = bash.wait();
    });
    assert_eq!(shown.matches("another end of the pipe").count(), 2, "{shown}");
    let _restored = KilledAll(pids.values().copied().collect());
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    wait_until("the pipeline's verdict", DEADLINE * 2, || !read().is_empty());
    assert_eq!(read().trim(), "PASS 8000000", "every byte once, in order");
}

/// A python3 parent and child on a datagram socket pair: the child sends `one` at
/// once and `two` at SIGUSR2; the parent, at SIGUSR1, reads every message queued and
/// writes PASS to `out` once it has read exactly those two, in order (WAIT before).
const DGRAM_PAIR: &str = "import os, sys, signal, socket, time\n\
out = sys.argv[1]\n\
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
if os.fork() == 0:\n\
\x20   a.close(); b.send(b'one')\n\
\x20   signal.signal(signal.SIGUSR2, lambda *_: b.send(b'two'))\n\
\x20   while True: signal.pause()\n\
b.close(); a.setblocking(False)\n\
got = []\n\
def check(*_):\n\
\x20   while True:\n\
\x20       try: got.append(a.recv(100))\n\
\x20       except BlockingIOError: break\n\
\x20   v = 'PASS' if got == [b'one', b'two'] else 'WAIT' if got in ([], [b'one']) else 'FAIL %r' % got\n\
\x20   with open(out, 'w') as f: f.write(v)\n\
signal.signal(signal.SIGUSR1, check)\n\
while True: time.sleep(1000)\n";

#[test]
fn a_datagram_pair_between_parent_and_child_comes_back_with_its_messages_one_by_one() {
    if !needs_root(ROOT) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut py = Command::new("/usr/bin/python3").args(["-c", DGRAM_PAIR, out.to_str().unwrap()]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let root = py.id() as i32;
    let _original = KilledAll(vec![root]);
    let sockets = |pid: i32| -> Vec<i32> {
        let fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect()).unwrap_or_default();
        fds.into_iter().filter(|&fd| link(pid, fd).starts_with("socket:")).collect()
    };
    let mut kid = 0;
    wait_until("the child's message queued at its parent", DEADLINE, || {
        kid = children_of(root).first().copied().unwrap_or(0);
        kid > 0 && sockets(kid).len() == 1 && sockets(root).iter().any(|&fd| queued(root, fd) == 3)
    });
    let _kid = KilledAll(vec![kid]);
    let (pids, _) = through_image(root, || {
        let _ = py.wait();
    });
    let (parent, child) = (pids[&root], pids[&kid]);
    let _restored = KilledAll(vec![child, parent]);
    assert!(ferry_tests::workload::send_signal(child, libc::SIGUSR2));
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    // The second message is in once the child's handler ran, which nothing outside
    // tells (FIONREAD tells the first message's length only): the parent reads what is
    // queued at each SIGUSR1, keeps it, and says WAIT until it has both.
    wait_until("the parent's verdict on both messages", DEADLINE, || {
        let v = read();
        if v.is_empty() || v == "WAIT" {
            assert!(ferry_tests::workload::send_signal(parent, libc::SIGUSR1));
            return false;
        }
        true
    });
    assert_eq!(read(), "PASS");
}

/// The inode of the object mapped at `start` in `pid` (`/proc/PID/maps`).
fn object_at(pid: i32, start: u64) -> Option<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    maps.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let s = u64::from_str_radix(f.first()?.split('-').next()?, 16).ok()?;
        (s == start).then(|| f.get(4)?.parse().ok())?
    })
}

/// The workload with three children sharing 16 MiB of shared anonymous memory, through
/// an image: answers it, the restored root and children, the memory's range and the
/// image's bytes.
fn shared_restored(flag: &'static str) -> (Workload, i32, Vec<i32>, (u64, u64), u64, KilledAll) {
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 1, tick_ms: 5, tree: 3, extra: vec![flag], ..Default::default() });
    w.wait_ready();
    w.wait_ticks(10);
    let kids = children_of(w.pid);
    assert_eq!(kids.len(), 3, "{kids:?}");
    let originals = KilledAll(kids.clone());
    let (start, end) = w.region("tree-shared");
    let before = object_at(w.pid, start).expect("the parent maps the shared memory");
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let o = ferry(&["checkpoint", &w.pid.to_string(), "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let bytes = stats["bytes"].as_u64().unwrap_or_else(|| panic!("{stats}"));
    w.reap();
    let o = ferry(&["restore", "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let pid = |p: i32| stats["pids"][p.to_string()].as_i64().unwrap_or_else(|| panic!("{stats}")) as i32;
    let new = pid(w.pid);
    w.adopt(new);
    let new_kids: Vec<i32> = kids.iter().map(|&k| pid(k)).collect();
    drop(originals);
    if flag == "--tree-sysv" {
        // A segment's id is what the processes name it by: the same again.
        assert_eq!(object_at(new, start), Some(before), "the segment's id");
    }
    (w, new, new_kids.clone(), (start, end), bytes, KilledAll(new_kids))
}

#[test]
fn shared_anonymous_memory_inherited_over_fork_comes_back_one_object_seen_by_all() {
    if !needs_root(ROOT) {
        return;
    }
    shared_by_all("--tree-shared");
}

#[test]
fn a_system_v_segment_attached_before_fork_comes_back_one_segment_seen_by_all() {
    if !needs_root(ROOT) {
        return;
    }
    shared_by_all("--tree-sysv");
}

/// The memory the workload's tree shares (`flag`) is one object again after a restore,
/// in the image once, and each child sees the parent's writes through it.
fn shared_by_all(flag: &'static str) {
    let (mut w, new, new_kids, (start, end), bytes, _restored) = shared_restored(flag);
    // One object in the four of them, as before the checkpoint.
    let object = object_at(new, start).expect("the parent maps the shared memory");
    for &k in &new_kids {
        assert_eq!(object_at(k, start), Some(object), "child {k} maps the parent's object");
    }
    // Its 16 MiB are in the image once: the rest of the tree is some 20 MB, so four
    // copies would be over 80 MB.
    let mine = end - start;
    assert_eq!(mine, 16 << 20);
    assert!(bytes > mine && bytes < 3 * mine, "the image has {bytes} bytes");
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 20);
    // The children check its contents every tick; the parent's last token must be
    // echoed by each child through the one object.
    w.terminate_and_check(new).unwrap();
    assert!(w.lines().iter().any(|l| l == "tree 3 children passed"), "{}", w.log_text());
}

#[test]
fn a_child_given_a_copy_of_the_shared_memory_fails_the_check() {
    if !needs_root(ROOT) {
        return;
    }
    let (mut w, new, new_kids, (start, end), _, _restored) = shared_restored("--tree-shared");
    // The second child's mapping replaced by a copy with the same contents, a separate
    // object (what carrying the memory per process would give): its echoes go there.
    let victim = new_kids[1];
    let len = end - start;
    let mut inj = Injected::seize(victim);
    let contents = inj.get(start, len as usize);
    let flags = (libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_FIXED) as u64;
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    inj.call(victim, libc::SYS_mmap, [start, len, rw, flags, u64::MAX, 0]);
    let mem = std::fs::OpenOptions::new().write(true).open(format!("/proc/{victim}/mem")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&mem, &contents, start).unwrap();
    inj.release();
    assert_ne!(object_at(victim, start), object_at(new, start));
    let verdict = w.terminate_and_check(new);
    match verdict {
        Err(e) if e.starts_with("FAIL") && e.contains("child 1 does not see the parent's writes to the shared memory") => {}
        other => panic!("the broken copy's verdict: {other:?}; output: {}", w.output()),
    }
}

/// A python3 parent reading a FIFO its child writes: the child writes 5003 bytes at
/// once, and `after` at SIGUSR2; the parent reads what is queued at SIGUSR1 and
/// writes PASS to `out` if it is exactly both, in order.
const FIFO_PAIR: &str = "import os, sys, signal, time\n\
path, out = sys.argv[1], sys.argv[2]\n\
os.mkfifo(path)\n\
if os.fork() == 0:\n\
\x20   w = os.open(path, os.O_WRONLY)\n\
\x20   os.write(w, b'x' * 5000 + b'end')\n\
\x20   signal.signal(signal.SIGUSR2, lambda *_: os.write(w, b'after'))\n\
\x20   while True: signal.pause()\n\
r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)\n\
def check(*_):\n\
\x20   data = os.read(r, 65536)\n\
\x20   with open(out, 'w') as f: f.write('PASS' if data == b'x' * 5000 + b'endafter' else 'FAIL %d bytes' % len(data))\n\
signal.signal(signal.SIGUSR1, check)\n\
while True: time.sleep(1000)\n";

#[test]
fn a_fifo_between_parent_and_child_comes_back_with_its_bytes_and_both_ends_on_it() {
    if !needs_root(ROOT) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (path, out) = (tmp.path().join("fifo"), tmp.path().join("out"));
    let mut py = Command::new("/usr/bin/python3")
        .args(["-c", FIFO_PAIR, path.to_str().unwrap(), out.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let root = py.id() as i32;
    let _original = KilledAll(vec![root]);
    let fifo_fd = |pid: i32| -> Option<i32> {
        let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
        dir.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).find(|&fd| link(pid, fd) == path.display().to_string())
    };
    let mut kid = 0;
    wait_until("5003 bytes in the FIFO", DEADLINE, || {
        kid = children_of(root).first().copied().unwrap_or(0);
        kid > 0 && fifo_fd(kid).is_some() && fifo_fd(root).is_some_and(|fd| queued(root, fd) == 5003)
    });
    let _kid = KilledAll(vec![kid]);
    let (pids, shown) = through_image(root, || {
        let _ = py.wait();
    });
    assert_eq!(shown.matches("another end of the pipe").count(), 1, "{shown}");
    let (parent, child) = (pids[&root], pids[&kid]);
    let _restored = KilledAll(vec![child, parent]);
    let fd = fifo_fd(parent).expect("the restored parent's FIFO");
    assert_eq!(queued(parent, fd), 5003, "the bytes in flight, once");
    assert!(ferry_tests::workload::send_signal(child, libc::SIGUSR2));
    wait_until("the child's write after the restore", DEADLINE, || queued(parent, fd) == 5008);
    assert!(ferry_tests::workload::send_signal(parent, libc::SIGUSR1));
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    wait_until("the parent's verdict", DEADLINE, || !read().is_empty());
    assert_eq!(read(), "PASS");
}

/// A python3 parent that made a System V object with `setup` (ctypes; `ipc` its id)
/// and a child forked after it.
fn sysv_pair(setup: &str) -> (std::process::Child, i32) {
    let script = format!(
        "import ctypes, os, time\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.shmat.restype = ctypes.c_void_p\n{setup}\nassert ipc >= 0\nif os.fork() == 0:\n    time.sleep(1000)\n    os._exit(0)\ntime.sleep(1000)\n"
    );
    let py = Command::new("/usr/bin/python3").args(["-c", &script]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let root = py.id() as i32;
    let mut kid = 0;
    wait_until("python's child", DEADLINE, || {
        kid = children_of(root).first().copied().unwrap_or(0);
        kid > 0
    });
    (py, kid)
}

/// The ids in `/proc/sysvipc/FILE` whose column `col` is `pid`.
fn sysv_ids(file: &str, col: usize, pid: i32) -> Vec<i32> {
    let text = std::fs::read_to_string(format!("/proc/sysvipc/{file}")).unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(col)?.parse::<i32>().ok()? == pid).then(|| f.get(1)?.parse().ok())?
        })
        .collect()
}

/// The checkpoint of `root`'s tree is refused in one line naming `root` and `what`;
/// both processes run on, let go.
fn sysv_refused(root: i32, kid: i32, what: &str) {
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let o = ferry(&["checkpoint", &root.to_string(), "--dir", dir.to_str().unwrap()]);
    let err = stderr(&o);
    assert!(!o.status.success() && err.lines().count() == 1, "{err}");
    assert!(err.contains(&format!("process {root} ")) && err.contains(what), "want {what}: {err}");
    assert!(!dir.exists());
    for p in [root, kid] {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        assert!(status.lines().any(|l| l == "TracerPid:\t0"), "process {p} let go: {status}");
        assert!(status.lines().any(|l| l == "State:\tS (sleeping)"), "process {p} runs on: {status}");
    }
}

#[test]
fn a_system_v_segment_the_tree_made_but_has_not_attached_is_refused_naming_the_process() {
    if !needs_root(ROOT) {
        return;
    }
    // Attached, detached, and marked for removal only when the test is done.
    let (mut py, kid) = sysv_pair("ipc = libc.shmget(0, 4096, 0o1600)\nat = libc.shmat(ipc, None, 0)\nassert at != ctypes.c_void_p(-1).value\nassert libc.shmdt(ctypes.c_void_p(at)) == 0");
    let root = py.id() as i32;
    let _all = KilledAll(vec![kid, root]);
    struct Removed(Vec<i32>);
    impl Drop for Removed {
        fn drop(&mut self) {
            for &id in &self.0 {
                // SAFETY: shmctl with IPC_RMID takes no buffer.
                unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
            }
        }
    }
    let segments = Removed(sysv_ids("shm", 4, root));
    assert_eq!(segments.0.len(), 1, "the segment python made");
    sysv_refused(root, kid, "a user of the System V shared memory segment");
    kill_pid(kid);
    kill_pid(root);
    let _ = py.wait();
}

#[test]
fn a_system_v_message_queue_the_tree_sent_to_is_refused_naming_the_process() {
    if !needs_root(ROOT) {
        return;
    }
    let (mut py, kid) = sysv_pair("ipc = libc.msgget(0, 0o1600)\nmsg = ctypes.create_string_buffer(b'\\x01\\0\\0\\0\\0\\0\\0\\0queued')\nassert libc.msgsnd(ipc, msg, 6, 0) == 0");
    let root = py.id() as i32;
    let _all = KilledAll(vec![kid, root]);
    // The queue outlives its users: removed by the test, even when it fails.
    struct Removed(Vec<i32>);
    impl Drop for Removed {
        fn drop(&mut self) {
            for &id in &self.0 {
                // SAFETY: msgctl with IPC_RMID takes no buffer.
                unsafe { libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
            }
        }
    }
    let queues = Removed(sysv_ids("msg", 5, root));
    assert_eq!(queues.0.len(), 1, "the queue python sent to");
    sysv_refused(root, kid, "a user of the System V message queue");
    kill_pid(kid);
    kill_pid(root);
    let _ = py.wait();
}

#[test]
fn a_tree_checkpoint_killed_after_reading_the_queues_leaves_every_byte_to_the_source() {
    if !needs_root(ROOT) {
        return;
    }
    // Pipes and socket pairs (stream and datagram) between the children, their queues
    // read by the first processes; ferry dies in the last one. The janitor lets the
    // tree go, which must still hold every byte and message: each child reads on,
    // checking every word's sequence, and the socket's peek offsets are put back.
    let w = Workload::spawn(&WorkloadOpts { mem_mib: 1, tick_ms: 5, tree: 3, extra: vec!["--tree-pipes", "--tree-sockets"], ..Default::default() });
    w.wait_ready();
    let kids = children_of(w.pid);
    assert_eq!(kids.len(), 3, "{kids:?}");
    let _kids = KilledAll(kids.clone());
    wait_until("bytes in flight everywhere", DEADLINE, || kids.iter().all(|&k| queued(k, 101) >= 4096 && queued(k, 102) >= 8 && queued(k, 103) >= 8));
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    // Four processes of seven plugins each: the 25th plugin done is in the last child.
    let o = Command::new(ferry_tests::ferry_bin())
        .args(["checkpoint", &w.pid.to_string(), "--dir", dir.to_str().unwrap()])
        .env("FERRY_FAULT", "checkpoint-mid@25")
        .output()
        .unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&o.status), Some(libc::SIGKILL), "{}", stderr(&o));
    let mut all = kids.clone();
    all.push(w.pid);
    wait_until("the janitor to let every process go and remove the image", DEADLINE, || {
        !dir.exists() && ferry_tests::residue::residue(&all, None).is_empty()
    });
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 40);
    let mut w = w;
    let pid = w.pid;
    w.terminate_and_check(pid).unwrap();
    assert!(w.lines().iter().any(|l| l == "tree 3 children passed"), "{}", w.log_text());
}

#[test]
fn a_system_v_semaphore_the_tree_operated_on_is_refused_naming_the_process() {
    if !needs_root(ROOT) {
        return;
    }
    // semop(+1) on semaphore 0 of a new set: GETPID names python.
    let (mut py, kid) = sysv_pair("ipc = libc.semget(0, 2, 0o1600)\nop = (ctypes.c_short * 3)(0, 1, 0)\nassert libc.semop(ipc, op, 1) == 0");
    let root = py.id() as i32;
    let _all = KilledAll(vec![kid, root]);
    struct Removed(Vec<i32>);
    impl Drop for Removed {
        fn drop(&mut self) {
            for &id in &self.0 {
                // SAFETY: semctl with IPC_RMID takes no further argument.
                unsafe { libc::semctl(id, 0, libc::IPC_RMID) };
            }
        }
    }
    let sets: Vec<i32> = {
        let text = std::fs::read_to_string("/proc/sysvipc/sem").unwrap_or_default();
        text.lines().skip(1).filter_map(|l| l.split_whitespace().nth(1)?.parse().ok()).filter(|&id| {
            // SAFETY: semctl GETPID takes integers only.
            unsafe { libc::semctl(id, 0, libc::GETPID) == root }
        }).collect()
    };
    let sets = Removed(sets);
    assert_eq!(sets.0.len(), 1, "the set python made");
    sysv_refused(root, kid, "a user of the System V semaphore set");
    kill_pid(kid);
    kill_pid(root);
    let _ = py.wait();
}

#[test]
fn a_restored_ring_pipe_given_another_size_fails_the_check() {
    if !needs_root(ROOT) {
        return;
    }
    let (mut w, kids) = ring("--tree-pipes", 101);
    let _originals = KilledAll(kids.clone());
    let (new, new_kids, _) = ring_restored(&mut w, &kids, three_pipe_ends);
    let _restored = KilledAll(new_kids.clone());
    // The first child's pipe has 32 KiB: grown to 64 KiB (the default), as a restore
    // that forgot its size would leave it. Its writer checks it every tick.
    let victim = new_kids[0];
    let mut inj = Injected::seize(victim);
    let got = inj.call(victim, libc::SYS_fcntl, [101, libc::F_SETPIPE_SZ as u64, 65536, 0, 0, 0]);
    inj.release();
    assert_eq!(got, 65536);
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 20);
    let verdict = w.terminate_and_check(new);
    let want = format!("child {victim} exited early (status 0x400");
    match verdict {
        Err(e) if e.starts_with("FAIL") && e.contains(&want) && e.contains("pipe ring") => {}
        other => panic!("the broken copy's verdict: {other:?}, want {want}; output: {}", w.output()),
    }
}
