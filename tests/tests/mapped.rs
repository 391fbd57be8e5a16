//! Deleted files and memfds mapped into memory (issue 12): a file mapped private then
//! unlinked (with a page of it written), a file mapped shared twice then unlinked, a
//! memfd mapped shared twice and private once (its fd closed, sealed) come back after
//! a restore and a migration with every strategy: same contents, the two shared
//! mappings one object again, the same names in /proc/PID/maps. A real program too:
//! python3 with a copy of a library loaded by ctypes and then deleted (what a package
//! upgrade leaves), and python3 with a deleted file mapped and still open (the fd and
//! the mapping one file again, as with a memfd mapped and open). A shared mapping of a
//! deleted file still linked elsewhere is refused with one line, the process left
//! running.
//!
//! The workload checks itself from inside (`--mapped-deleted`, `--memfd-map`,
//! `--memfd-fd` in workloads/mapped.c); `self_checks.rs` shows those checks fail on a
//! copy broken on purpose.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use ferry_tests::{
    daemon::migrate,
    fails_with,
    daemon::Daemon,
    ferry, needs_root, stderr, wait_until,
    workload::{kill_pid, pid_alive, Workload, WorkloadOpts},
};

const ROOT: &str = "checkpoint, restore and migration (ptrace, PR_SET_MM_MAP, /proc/PID/map_files)";

const MAPPED: &[&str] = &["--mapped-deleted", "--memfd-map"];

fn opts(extra: &[&'static str]) -> WorkloadOpts {
    WorkloadOpts { files: false, extra: extra.to_vec(), ..Default::default() }
}


/// `ferry restore --dir DIR --json`: the new pid of `old`.
fn restore(dir: &Path, old: i32) -> i32 {
    let o = ferry(&["restore", "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    stats["pids"][old.to_string()].as_i64().unwrap_or_else(|| panic!("no pid for {old} in {stats}")) as i32
}

/// The names /proc/PID/maps gives the mappings of deleted things.
fn deleted_maps(pid: i32) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut names: Vec<String> = maps
        .lines()
        .filter(|l| l.ends_with(" (deleted)"))
        .filter_map(|l| Some(format!("{} {}", l.split_whitespace().nth(1)?, l.split_whitespace().nth(5)?)))
        .collect();
    names.sort();
    names
}

/// What is checked from outside: the deleted mappings are the ones the source had,
/// and nothing made again for the restore is left in the workload's directory.
fn looks_right(w: &Workload, pid: i32, before: &[String]) {
    assert_eq!(deleted_maps(pid), before, "the deleted mappings of the copy");
    let left: Vec<String> =
        std::fs::read_dir(w.files_dir()).unwrap().filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    assert!(left.is_empty(), "left in the workload's directory: {left:?}");
}

fn passes(w: &mut Workload, pid: i32) {
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 3);
    w.terminate_and_check(pid).unwrap_or_else(|e| panic!("{e}\n{}", w.output()));
}

#[test]
fn deleted_files_and_memfds_mapped_come_back_after_a_restore() {
    if !needs_root(ROOT) {
        return;
    }
    let mut w = Workload::spawn(&opts(MAPPED));
    w.wait_ready();
    w.wait_ticks(3);
    let before = deleted_maps(w.pid);
    assert_eq!(before.len(), 8, "{before:?}");
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("img");
    let old = w.pid;
    let o = ferry(&["checkpoint", &old.to_string(), "--dir", img.to_str().unwrap()]);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    w.reap();
    let new = restore(&img, old);
    w.adopt(new);
    looks_right(&w, new, &before);
    passes(&mut w, new);
}

#[test]
fn a_memfd_both_mapped_and_open_is_one_object_again() {
    if !needs_root(ROOT) {
        return;
    }
    let mut w = Workload::spawn(&opts(&["--memfd-map", "--memfd-fd"]));
    w.wait_ready();
    w.wait_ticks(3);
    let before = deleted_maps(w.pid);
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("img");
    let old = w.pid;
    let o = ferry(&["checkpoint", &old.to_string(), "--dir", img.to_str().unwrap()]);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    w.reap();
    let new = restore(&img, old);
    w.adopt(new);
    looks_right(&w, new, &before);
    passes(&mut w, new);
}

/// A shared mapping of a deleted file that another name still holds (a hard link):
/// the mapping would have to share with that file, which ferry does not carry.
#[test]
fn a_shared_mapping_of_a_file_linked_elsewhere_is_refused_with_one_line() {
    if !needs_root(ROOT) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, ready) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("ready"));
    let code = "import mmap, os, sys, time\n\
        f = open(sys.argv[1], 'w+b'); f.write(b'x' * 8192); f.flush()\n\
        os.link(sys.argv[1], sys.argv[2])\n\
        m = mmap.mmap(f.fileno(), 8192)\n\
        f.close(); os.unlink(sys.argv[1])\n\
        open(sys.argv[3], 'w').close()\n\
        while True:\n    time.sleep(0.01)\n";
    let py = Command::new("python3").args(["-c", code]).args([&a, &b, &ready]).stdin(Stdio::null()).spawn().unwrap();
    let pid = py.id() as i32;
    let _py = KilledPid(pid);
    wait_until("python with a shared mapping of a linked file", Duration::from_secs(30), || ready.exists());
    let img = tmp.path().join("img");
    let o = ferry(&["checkpoint", &pid.to_string(), "--dir", img.to_str().unwrap()]);
    fails_with(&o, &[&format!("process {pid}"), &format!("{} (deleted)", a.display()), "still has another name"]);
    assert!(!img.exists(), "a refused checkpoint writes nothing");
    let daemon = Daemon::start();
    fails_with(&migrate(pid, &daemon.addr, "stop-copy"), &[&format!("process {pid}"), "still has another name"]);
    assert!(pid_alive(pid), "the source died");
}


#[test]
fn deleted_files_and_memfds_mapped_move_with_every_strategy() {
    if !needs_root(ROOT) {
        return;
    }
    let daemon = Daemon::start();
    for strategy in ["stop-copy", "pre-copy", "post-copy", "hybrid"] {
        let mut w = Workload::spawn(&WorkloadOpts { dirty_pages: 2, ..opts(&["--mapped-deleted", "--memfd-map", "--memfd-fd"]) });
        w.wait_ready();
        w.wait_ticks(3);
        let before = deleted_maps(w.pid);
        let old = w.pid;
        let o = migrate(old, &daemon.addr, strategy);
        assert!(o.status.success(), "{strategy}: {}", stderr(&o));
        let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(stats["strategy"], strategy, "{stats}");
        let new = stats["pids"][old.to_string()].as_i64().unwrap() as i32;
        wait_until("the source to be gone", Duration::from_secs(30), || !pid_alive(old));
        w.adopt(new);
        looks_right(&w, new, &before);
        passes(&mut w, new);
    }
}

/// A process killed by pid when dropped, a failed assertion or not.
struct KilledPid(i32);

impl Drop for KilledPid {
    fn drop(&mut self) {
        if pid_alive(self.0) {
            kill_pid(self.0);
        }
    }
}

/// python3 loads a copy of libz with ctypes and deletes it (as a package upgrade
/// replaces a library under a running program); restored, it still calls into the
/// deleted copy, and its maps name it as before.
#[test]
fn python_with_a_deleted_library_loaded_comes_back() {
    python_with_a_deleted_library(false);
}

/// The same with a new file put at the library's name before the restore (the
/// upgrade's): the copy is made beside it (`.ferry-deleted-…` in the same directory,
/// the name /proc/PID/maps then shows), and the new file is left alone.
#[test]
fn python_with_a_deleted_library_whose_name_was_taken_comes_back_beside_it() {
    python_with_a_deleted_library(true);
}

fn python_with_a_deleted_library(taken: bool) {
    if !needs_root(ROOT) {
        return;
    }
    let lib = Path::new("/usr/lib/x86_64-linux-gnu/libz.so.1");
    if !lib.exists() {
        eprintln!("skipped: no {}", lib.display());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("libz-copy.so");
    std::fs::copy(lib, &copy).unwrap();
    let (ready, go, out) = (tmp.path().join("ready"), tmp.path().join("go"), tmp.path().join("out"));
    // argv[5]: the name its maps must show after the restore, or a prefix of it.
    let code = "import ctypes, os, sys, time\n\
        lib = ctypes.CDLL(sys.argv[1])\n\
        os.unlink(sys.argv[1])\n\
        open(sys.argv[2], 'w').close()\n\
        while not os.path.exists(sys.argv[3]):\n    time.sleep(0.01)\n\
        crc = lib.crc32(0, b'hello', 5) & 0xffffffff\n\
        maps = [l.split()[-2] + ' ' + l.split()[-1] for l in open('/proc/self/maps') if l.endswith('(deleted)\\n')]\n\
        ok = crc == 0x3610a686 and maps and all(m.startswith(sys.argv[5]) and m.endswith(' (deleted)') for m in maps)\n\
        ok = ok and len(set(maps)) == 1\n\
        open(sys.argv[4], 'w').write(('PASS' if ok else 'FAIL %x %r' % (crc, maps)))\n";
    let want = if taken { format!("{}/.ferry-deleted-libz-copy.so-", tmp.path().display()) } else { format!("{} (deleted)", copy.display()) };
    let py = Command::new("python3")
        .args(["-c", code])
        .args([&copy, &ready, &go, &out])
        .arg(&want)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let old = py.id() as i32;
    let _source = KilledPid(old);
    let mut py = py;
    wait_until("python with a deleted library", Duration::from_secs(30), || ready.exists());
    let before = deleted_maps(old);
    assert!(!before.is_empty() && before.iter().all(|m| m.ends_with(&format!(" {}", copy.display()))), "{before:?}");
    let img = tmp.path().join("img");
    let o = ferry(&["checkpoint", &old.to_string(), "--dir", img.to_str().unwrap()]);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    let _ = py.wait();
    if taken {
        std::fs::write(&copy, "the upgrade's").unwrap();
    }
    let new = restore(&img, old);
    let _copy = KilledPid(new);
    if taken {
        assert_eq!(std::fs::read_to_string(&copy).unwrap(), "the upgrade's", "the new file at the name is left alone");
        let beside: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(".ferry"))
            .collect();
        assert!(beside.is_empty(), "left beside: {beside:?}");
    } else {
        assert_eq!(deleted_maps(new), before, "the deleted mappings of the copy");
        assert!(!copy.exists(), "the library copy made again was left behind");
    }
    std::fs::write(&go, "").unwrap();
    wait_until("the restored python's verdict", Duration::from_secs(30), || {
        std::fs::read_to_string(&out).is_ok_and(|s| !s.is_empty())
    });
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "PASS");
    wait_until("the restored python to exit", Duration::from_secs(30), || !pid_alive(new));
}

/// python3 maps a temp file shared (`mmap` keeps an fd of its own, and so does the
/// file object) and unlinks it; restored, the mapping and the fd are one file again.
#[test]
fn python_with_a_deleted_file_mapped_and_open_comes_back() {
    if !needs_root(ROOT) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (data, ready, go, out) = (tmp.path().join("data"), tmp.path().join("ready"), tmp.path().join("go"), tmp.path().join("out"));
    let code = "import mmap, os, sys, time\n\
        f = open(sys.argv[1], 'w+b'); f.write(bytes(range(256)) * 40); f.flush()\n\
        m = mmap.mmap(f.fileno(), 10240)\n\
        os.unlink(sys.argv[1])\n\
        m[0:5] = b'hello'\n\
        open(sys.argv[2], 'w').close()\n\
        while not os.path.exists(sys.argv[3]):\n    time.sleep(0.01)\n\
        os.pwrite(f.fileno(), b'Z', 100)\n\
        m[200] = 0x77\n\
        ok = m[0:5] == b'hello' and m[100] == ord('Z') and os.pread(f.fileno(), 1, 200) == b'\\x77' and m[5000] == 5000 % 256\n\
        ok = ok and os.readlink('/proc/self/fd/%d' % f.fileno()) == sys.argv[1] + ' (deleted)' and os.fstat(f.fileno()).st_size == 10240\n\
        open(sys.argv[4], 'w').write('PASS' if ok else 'FAIL')\n";
    let py = Command::new("python3")
        .args(["-c", code])
        .args([&data, &ready, &go, &out])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let old = py.id() as i32;
    let _source = KilledPid(old);
    let mut py = py;
    wait_until("python with a deleted file mapped", Duration::from_secs(30), || ready.exists());
    let before = deleted_maps(old);
    assert_eq!(before, vec![format!("rw-s {}", data.display())]);
    let img = tmp.path().join("img");
    let o = ferry(&["checkpoint", &old.to_string(), "--dir", img.to_str().unwrap()]);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    let _ = py.wait();
    let new = restore(&img, old);
    let _copy = KilledPid(new);
    assert_eq!(deleted_maps(new), before, "the deleted mappings of the copy");
    assert!(!data.exists(), "the file made again was left behind");
    std::fs::write(&go, "").unwrap();
    wait_until("the restored python's verdict", Duration::from_secs(30), || {
        std::fs::read_to_string(&out).is_ok_and(|s| !s.is_empty())
    });
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "PASS");
}

/// A parent and its child share a deleted file mapped shared (forked after the mmap):
/// each process's copy would be its own, so the tree is refused with one line naming
/// both, and both run on.
#[test]
fn a_deleted_file_mapped_shared_by_parent_and_child_is_refused_naming_both() {
    if !needs_root(ROOT) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (data, ready) = (tmp.path().join("data"), tmp.path().join("ready"));
    let code = "import mmap, os, sys, time\n\
        f = open(sys.argv[1], 'w+b'); f.write(b'x' * 4096); f.flush()\n\
        m = mmap.mmap(f.fileno(), 4096); f.close(); os.unlink(sys.argv[1])\n\
        if os.fork() == 0:\n    os.closerange(0, 3)\n    open(sys.argv[2], 'w').close()\n    time.sleep(1000)\n    os._exit(0)\n\
        time.sleep(1000)\n";
    let py = Command::new("python3").args(["-c", code]).args([&data, &ready]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let pid = py.id() as i32;
    let _py = KilledPid(pid);
    wait_until("python's child", Duration::from_secs(30), || ready.exists());
    let kid: i32 = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap().trim().parse().unwrap();
    let _kid = KilledPid(kid);
    let img = tmp.path().join("img");
    let o = ferry(&["checkpoint", &pid.to_string(), "--dir", img.to_str().unwrap()]);
    fails_with(&o, &[&format!("process {kid}"), &format!("process {pid}"), &format!("{} (deleted)", data.display()), "not carried"]);
    assert!(!img.exists(), "a refused checkpoint writes nothing");
    assert!(pid_alive(pid) && pid_alive(kid), "the tree died");
}

/// System V shared memory shows as a deleted file too (`/SYSV… (deleted)`): not made
/// again as a file, but as the segment it is, its id back (the process names it by
/// that), its contents in, attached where it was; python checks the contents itself.
#[test]
fn sysv_shared_memory_comes_back_as_its_segment_with_its_id_and_contents() {
    if !needs_root(ROOT) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (ready, out) = (tmp.path().join("ready"), tmp.path().join("out"));
    // The segment is marked for removal once attached: it goes with the process.
    let code = "import ctypes, sys, time, signal\n\
        libc = ctypes.CDLL(None, use_errno=True)\n\
        libc.shmat.restype = ctypes.c_void_p\n\
        shm = libc.shmget(0, 4096, 0o1600)\n\
        at = libc.shmat(shm, None, 0)\n\
        libc.shmctl(shm, 0, None)\n\
        ctypes.memset(at, 7, 4096)\n\
        def check(*_):\n    open(sys.argv[2], 'w').write('PASS' if ctypes.string_at(at, 4096) == b'\\x07' * 4096 else 'FAIL')\n\
        signal.signal(signal.SIGUSR1, check)\n\
        open(sys.argv[1], 'w').close()\n\
        while True:\n    time.sleep(0.01)\n";
    let mut py = Command::new("/usr/bin/python3").args(["-c", code]).arg(&ready).arg(&out).stdin(Stdio::null()).spawn().unwrap();
    let pid = py.id() as i32;
    let _py = KilledPid(pid);
    wait_until("python with a SysV segment", Duration::from_secs(30), || ready.exists());
    let sysv = |pid: i32| {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        maps.lines().filter(|l| l.contains(" /SYSV")).map(|l| l.split_whitespace().take(5).collect::<Vec<_>>().join(" ")).collect::<Vec<_>>()
    };
    let before = sysv(pid);
    assert_eq!(before.len(), 1, "one segment attached");
    let img = tmp.path().join("img");
    let o = ferry(&["checkpoint", &pid.to_string(), "--dir", img.to_str().unwrap()]);
    assert!(o.status.success(), "checkpoint: {}", stderr(&o));
    let _ = py.wait();
    let new = restore(&img, pid);
    let _new = KilledPid(new);
    // Its range, protection, sharing and id as before (the device may differ).
    let fields = |v: &[String]| v.iter().map(|l| l.split(' ').enumerate().filter(|(i, _)| *i != 3).map(|(_, f)| f).collect::<Vec<_>>().join(" ")).collect::<Vec<_>>();
    assert_eq!(fields(&sysv(new)), fields(&before));
    assert!(ferry_tests::workload::send_signal(new, libc::SIGUSR1));
    wait_until("python's check of the segment", Duration::from_secs(30), || out.exists() && !std::fs::read_to_string(&out).unwrap_or_default().is_empty());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "PASS");
}
