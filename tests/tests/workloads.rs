//! The workload programs on their own, without ferry: each must pass its own checks,
//! log continuously, and — so that a PASS under ferry means something — fail when its
//! memory is corrupted from outside.

use ferry_tests::workload::{pid_alive, send_signal, Script, Workload, WorkloadOpts};

#[test]
fn c_workload_with_threads_passes_and_counts_sigusr1() {
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 8, threads: 3, ..Default::default() });
    w.wait_ready();
    w.wait_ticks(3);
    assert!(send_signal(w.pid, libc::SIGUSR1));
    w.wait_line("usr1 1");
    w.wait_ticks(w.ticks().len() as u64 + 2);
    let pid = w.pid;
    w.terminate_and_check(pid).unwrap_or_else(|e| panic!("{e}\noutput: {}", w.output()));
    assert!(!pid_alive(pid));
    // The workload's files: the dup'ed write and the append landed.
    assert_eq!(std::fs::read(w.files_dir().join("data")).unwrap(), b"0123456789AB");
    assert_eq!(std::fs::read(w.files_dir().join("append")).unwrap(), b"line1\nline2\n");
    assert!(!w.files_dir().join("deleted").exists());
}

#[test]
fn c_workload_without_threads_or_files_passes() {
    let mut w = Workload::spawn(&WorkloadOpts { threads: 0, files: false, ..Default::default() });
    w.wait_ticks(3);
    let pid = w.pid;
    w.terminate_and_check(pid).unwrap();
    assert!(std::fs::read_dir(w.files_dir()).unwrap().next().is_none(), "--no-files wrote files");
}

#[test]
fn c_workload_rewriting_pages_passes() {
    // More rewrites than pages: every page is past its first generation.
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 1, dirty_pages: 64, tick_ms: 5, ..Default::default() });
    w.wait_ticks(10);
    let pid = w.pid;
    w.terminate_and_check(pid).unwrap();
}

#[test]
fn c_workload_logs_its_regions() {
    let w = Workload::spawn(&WorkloadOpts { mem_mib: 2, files: false, ..Default::default() });
    w.wait_ready();
    let (start, end) = w.region("mem");
    assert_eq!(end - start, 2 << 20);
    for name in ["heap", "global", "stack"] {
        let (s, e) = w.region(name);
        assert!(s < e, "{name}: {s:#x}..{e:#x}");
    }
}

#[test]
fn terminating_early_still_gives_a_continuous_log() {
    // SIGTERM right after `ready`: zero or a few ticks, still PASS.
    let mut w = Workload::spawn(&WorkloadOpts::default());
    w.wait_ready();
    let pid = w.pid;
    w.terminate_and_check(pid).unwrap();
}

/// Reads `len` bytes at `addr` in `pid`'s memory.
fn peek(pid: i32, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let local = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: len };
    let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len };
    // SAFETY: the local iovec points at `buf`, live and `len` long for the call; the
    // remote one is checked by the kernel.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    assert_eq!(n, len as isize, "process_vm_readv: {}", std::io::Error::last_os_error());
    buf
}

/// Writes `bytes` at `addr` in `pid`'s memory, as a faulty restore might.
fn poke(pid: i32, addr: u64, bytes: &[u8]) {
    let local = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: the local iovec points at `bytes`, live for the call; the remote one is
    // checked by the kernel.
    let n = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
    assert_eq!(n, bytes.len() as isize, "process_vm_writev: {}", std::io::Error::last_os_error());
}

#[test]
fn corrupting_each_region_makes_the_check_fail_naming_it() {
    for region in ["mem", "heap", "global", "stack"] {
        let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 4, threads: 1, ..Default::default() });
        w.wait_ticks(2);
        let (start, end) = w.region(region);
        // The middle, word-aligned, every bit flipped: its first byte surely differs.
        let at = (start + (end - start) / 2) & !7;
        let flipped: Vec<u8> = peek(w.pid, at, 8).iter().map(|b| !b).collect();
        poke(w.pid, at, &flipped);
        let pid = w.pid;
        let err = w.terminate_and_check(pid).expect_err("a corrupted workload must fail");
        assert!(err.starts_with(&format!("FAIL: {region} pattern mismatch at {at:#x}")), "{region}: {err}");
    }
}

#[test]
fn continuity_check_catches_a_repeated_tick() {
    // As when a restored process repeats ticks its original logged after the dump.
    let mut w = Workload::spawn(&WorkloadOpts { files: false, ..Default::default() });
    w.wait_ticks(3);
    let mut log = std::fs::OpenOptions::new().append(true).open(&w.log).unwrap();
    std::io::Write::write_all(&mut log, b"tick 2\n").unwrap();
    let err = w.check_continuous().unwrap_err();
    assert!(err.contains("tick 2 after"), "{err}");
    let pid = w.pid;
    assert!(w.terminate_and_check(pid).unwrap_err().contains("not continuous"));
}

fn script_passes(kind: Script) {
    let mut w = Workload::spawn_script(kind);
    w.wait_ready();
    w.wait_ticks(5);
    let pid = w.pid;
    w.terminate_and_check(pid).unwrap_or_else(|e| panic!("{kind:?}: {e}\noutput: {}", w.output()));
}

#[test]
fn python_script_passes() {
    script_passes(Script::Python);
}

#[test]
fn perl_script_passes() {
    script_passes(Script::Perl);
}

#[test]
fn bash_script_passes() {
    script_passes(Script::Bash);
}

#[test]
fn the_fork_check_logs_each_check_and_fails_when_a_child_sees_wrong_memory() {
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 4, tick_ms: 1, fork_check: true, files: false, ..Default::default() });
    w.wait_for("two fork checks", |w| w.fork_checks(w.pid) >= 2);
    let pid = w.pid;
    w.terminate_and_check(pid).unwrap();

    // Memory corrupted under a running workload: the next child's check fails, first.
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 4, tick_ms: 1, fork_check: true, files: false, ..Default::default() });
    w.wait_for("a fork check", |w| w.fork_checks(w.pid) >= 1);
    let (start, end) = w.region("mem");
    let at = (start + (end - start) / 2) & !7;
    let flipped: Vec<u8> = peek(w.pid, at, 8).iter().map(|b| !b).collect();
    poke(w.pid, at, &flipped);
    w.wait_line(&format!("fork-check failed pid {}", w.pid));
    let pid = w.pid;
    let err = w.terminate_and_check(pid).expect_err("a corrupted workload must fail");
    assert!(err.starts_with("FAIL: fork-check: a child forked at a tick saw wrong memory"), "{err}");
}

/// The children of `pid` (its main thread's, which is where the workload forks).
fn children_of(pid: i32) -> Vec<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    text.split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

#[test]
fn a_quieted_fork_check_has_no_child_until_asked_again_and_then_forks_at_once() {
    // What the tests rely on before a checkpoint (ferry refuses a process with a
    // child): after `fork-check quiet`, no child for as many ticks as three checks
    // would take; a second SIGHUP resumes the checks, the first one at once.
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 4, tick_ms: 1, fork_check: true, files: false, ..Default::default() });
    w.wait_for("a fork check", |w| w.fork_checks(w.pid) >= 1);
    let pid = w.pid;
    w.quiet_forks(pid);
    let quiet_at = *w.ticks().last().unwrap();
    let checks = w.fork_checks(pid);
    while w.ticks().last().copied().unwrap_or(0) < quiet_at + 60 {
        assert_eq!(children_of(pid), Vec::<i32>::new(), "a child while quiet: {}", w.log_text());
        w.wait_ticks(w.ticks().last().copied().unwrap_or(0) + 1);
    }
    assert_eq!(w.fork_checks(pid), checks, "a check while quiet: {}", w.log_text());
    assert!(send_signal(pid, libc::SIGHUP));
    w.wait_line(&format!("fork-check resumed pid {pid} asked"));
    w.wait_for("a fork check after resuming", |w| w.fork_checks(pid) > checks);
    w.terminate_and_check(pid).unwrap();
}

#[test]
fn the_tree_check_passes_and_fails_when_a_child_is_lost_or_sees_wrong_memory() {
    let mut w = Workload::spawn(&WorkloadOpts { tick_ms: 1, tree: 2, files: false, ..Default::default() });
    w.wait_ready();
    w.wait_ticks(20);
    let pid = w.pid;
    w.terminate_and_check(pid).unwrap();
    assert!(w.lines().iter().any(|l| l == "tree 2 children passed"), "{}", w.log_text());

    // A child gone (as if a restore had dropped it): the parent sees it at its next tick.
    let mut w = Workload::spawn(&WorkloadOpts { tick_ms: 1, tree: 2, files: false, ..Default::default() });
    w.wait_ready();
    let kids = children_of(w.pid);
    assert_eq!(kids.len(), 2, "{kids:?}");
    ferry_tests::workload::kill_pid(kids[0]);
    let pid = w.pid;
    // Reaped by its parent (gone from /proc, not a zombie) before the other goes.
    let gone = format!("/proc/{}", kids[0]);
    w.wait_for("the parent to reap its killed child", |_| !std::path::Path::new(&gone).exists());
    kill_the_rest(&kids);
    let err = w.terminate_and_check(pid).expect_err("a lost child must fail the check");
    assert!(err.starts_with(&format!("FAIL: tree: child {} exited early", kids[0])), "{err}");

    // The memory a child inherited, corrupted in the child only: it exits 1 at once.
    let mut w = Workload::spawn(&WorkloadOpts { tick_ms: 1, tree: 2, files: false, ..Default::default() });
    w.wait_ready();
    let kids = children_of(w.pid);
    let (start, end) = w.region("mem");
    let _ = end;
    let flipped: Vec<u8> = peek(kids[1], start, 8).iter().map(|b| !b).collect();
    poke(kids[1], start, &flipped);
    let pid = w.pid;
    let gone = format!("/proc/{}", kids[1]);
    w.wait_for("the parent to reap its failed child", |_| !std::path::Path::new(&gone).exists());
    kill_the_rest(&kids);
    let err = w.terminate_and_check(pid).expect_err("a child seeing wrong memory must fail the check");
    assert!(err.starts_with(&format!("FAIL: tree: child {} exited early (status 0x100", kids[1])), "{err}");
}

/// Kills the tree children still there (a failed workload does not reap them all).
fn kill_the_rest(kids: &[i32]) {
    for &k in kids {
        ferry_tests::workload::kill_pid(k);
    }
}
