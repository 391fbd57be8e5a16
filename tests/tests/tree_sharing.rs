//! What the processes of a tree share, carried once: pipes between them with the bytes
//! in flight (a C ring of pipes between the workload's children, a real shell
//! pipeline). Each tree is checkpointed, killed and restored, and checks itself from
//! inside; each check is shown to fail when the restored copy is broken on purpose.

use std::{
    os::unix::fs::OpenOptionsExt,
    path::Path,
    process::{Command, Stdio},
};

use ferry_tests::{
    ferry, needs_root, stderr, stdout, wait_until,
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

/// The bytes queued in the pipe that `/proc/PID/fd/FD` is an end of (FIONREAD on a
/// reader of ours: nothing is consumed).
fn queued(pid: i32, fd: i32) -> i32 {
    let Ok(f) = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(format!("/proc/{pid}/fd/{fd}")) else {
        return -1;
    };
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int of ours.
    let r = unsafe { libc::ioctl(std::os::unix::io::AsRawFd::as_raw_fd(&f), libc::FIONREAD, &mut n) };
    if r == 0 {
        n
    } else {
        -1
    }
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

/// The workload with three children in a ring of pipes, once every pipe has bytes in
/// flight: answers it and its children.
fn ring() -> (Workload, Vec<i32>) {
    let w = Workload::spawn(&WorkloadOpts { mem_mib: 1, tick_ms: 5, tree: 3, extra: vec!["--tree-pipes"], ..Default::default() });
    w.wait_ready();
    let kids = children_of(w.pid);
    assert_eq!(kids.len(), 3, "{kids:?}");
    // Each child's writes outrun its reader's: the pipes fill.
    wait_until("bytes in flight in every pipe of the ring", DEADLINE, || kids.iter().all(|&k| queued(k, 101) >= 4096));
    (w, kids)
}

/// The ring through an image: answers the restored root and children, with the tick
/// the copy starts from.
fn ring_restored(w: &mut Workload, kids: &[i32]) -> (i32, Vec<i32>, u64) {
    let (pids, shown) = through_image(w.pid, || w.reap());
    // Each child's reading end is another end of the pipe its neighbour writes.
    assert_eq!(shown.matches("another end of the pipe").count(), 3, "{shown}");
    let at = *w.ticks().last().unwrap();
    let new = pids[&w.pid];
    w.adopt(new);
    let new_kids: Vec<i32> = kids.iter().map(|k| pids[k]).collect();
    (new, new_kids, at)
}

#[test]
fn a_ring_of_pipes_between_children_comes_back_with_its_bytes_in_flight_and_sizes() {
    if !needs_root(ROOT) {
        return;
    }
    let (mut w, kids) = ring();
    let _originals = KilledAll(kids.clone());
    let (new, new_kids, at) = ring_restored(&mut w, &kids);
    let _restored = KilledAll(new_kids.clone());
    // Three pipes, not six: each child's ends are of the pipes its neighbours hold.
    for (i, &k) in new_kids.iter().enumerate() {
        let next = new_kids[(i + 1) % 3];
        let ino = |pid: i32, fd: i32| std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_eq!(ino(k, 101), ino(next, 100), "child {k} writes the pipe child {next} reads");
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
    let (mut w, kids) = ring();
    let _originals = KilledAll(kids.clone());
    let (new, new_kids, _) = ring_restored(&mut w, &kids);
    let _restored = KilledAll(new_kids.clone());
    // Eight bytes the second child was to read next, taken from outside: its sequence
    // breaks and it exits 7, which its parent reports.
    let victim = new_kids[1];
    let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(format!("/proc/{victim}/fd/100")).unwrap();
    let mut word = [0u8; 8];
    std::io::Read::read_exact(&mut f, &mut word).unwrap();
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 20);
    let verdict = w.terminate_and_check(new);
    match verdict {
        Err(e) if e.starts_with("FAIL") && e.contains(&format!("child {victim} exited early (status 0x700")) && e.contains("pipe ring") => {}
        other => panic!("the broken copy's verdict: {other:?}; output: {}", w.output()),
    }
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
