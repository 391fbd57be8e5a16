//! Checkpoint and restore of real processes: the self-checking workload with its
//! memory, files, pipes, signals and threads, and programs nobody here wrote (python3,
//! perl, bash). Each must carry on from where it stopped and pass its own check.

use std::path::Path;

use ferry_tests::{
    ferry, needs, needs_root, stderr, stdout,
    workload::{state, processes_mentioning, creds_of, pid_alive, send_signal, Script, Workload, WorkloadOpts, DEADLINE},
};

/// Why every test here needs root (see `ferry_tests::needs_root`).
const ROOT: &str = "checkpoint/restore (ptrace of other users, PR_SET_MM_MAP, clone3 set_tid)";

/// `ferry checkpoint PID --dir DIR --json [extra]`; answers the parsed statistics.
fn checkpoint(pid: i32, dir: &Path, extra: &[&str]) -> serde_json::Value {
    let pid_s = pid.to_string();
    let mut args = vec!["checkpoint", pid_s.as_str(), "--dir", dir.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let o = ferry(&args);
    assert!(o.status.success(), "checkpoint failed: {}", stderr(&o));
    let stats: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("bad --json output {:?}: {e}", stdout(&o)));
    // Its phases, each timed: the freeze, each plugin's part, the image complete.
    let phases: Vec<&str> = stats["phases"].as_array().into_iter().flatten().filter_map(|p| p["phase"].as_str()).collect();
    for phase in ["checkpoint memory done", "checkpoint files done", "image complete"] {
        assert!(phases.contains(&phase), "no phase {phase:?} in {stats}");
    }
    stats
}

/// `ferry restore --dir DIR --json`; answers the new pid of `old`.
fn restore(dir: &Path, old: i32) -> i32 {
    let stats = restore_stats(dir);
    stats["pids"][old.to_string()].as_i64().unwrap_or_else(|| panic!("no pid for {old} in {stats}")) as i32
}

/// `ferry restore --dir DIR --json`; answers its statistics.
fn restore_stats(dir: &Path) -> serde_json::Value {
    let o = ferry(&["restore", "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "restore failed: {}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in ["frozen_ms", "total_ms", "bytes", "pages"] {
        assert!(stats[key].is_number(), "{key} missing from {stats}");
    }
    stats
}

/// The fd numbers a process holds.
fn fd_numbers(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

fn wait_gone(pid: i32) {
    ferry_tests::wait_until(&format!("pid {pid} to be gone"), std::time::Duration::from_secs(30), || !pid_alive(pid));
}

/// Checkpoints the spawned workload (killing it), reaps it as its parent would (which
/// frees its pid, unless something of its still uses it as a process group or session)
/// and restores it; answers the restored pid and the last tick before.
fn through_an_image(w: &mut Workload, extra: &[&str]) -> (i32, u64) {
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let stats = checkpoint(w.pid, &dir, extra);
    assert_eq!(stats["pids"][w.pid.to_string()], 0, "the original is gone: {stats}");
    // What the checkpoint counted as it wrote, on disk.
    let on_disk: u64 = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert_eq!(stats["bytes"].as_u64(), Some(on_disk), "bytes the checkpoint wrote / the image holds: {stats}");
    w.reap();
    let at = *w.ticks().last().unwrap();
    let restored = restore_stats(&dir);
    // And the restore counted them as it read.
    assert_eq!(restored["bytes"], stats["bytes"], "bytes the restore read / the checkpoint wrote: {restored} / {stats}");
    assert_eq!(restored["pages"], stats["pages"], "pages the restore read / the checkpoint wrote: {restored} / {stats}");
    let new = restored["pids"][w.pid.to_string()].as_i64().unwrap_or_else(|| panic!("no pid for {} in {restored}", w.pid)) as i32;
    w.adopt(new);
    (new, at)
}

/// Checkpoint (killing the original), restore, and check from inside.
fn round_trip(w: &mut Workload, extra: &[&str]) {
    w.wait_ready();
    w.wait_ticks(3);
    let (new, at) = through_an_image(w, extra);
    w.wait_ticks(at + 3);
    w.terminate_and_check(new).unwrap();
}

#[test]
fn one_thread_with_memory_files_and_signals() {
    if !needs_root(ROOT) {
        return;
    }
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 8, ..Default::default() });
    w.wait_ready();
    w.wait_ticks(2);
    let fds_before = fd_numbers(w.pid);
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    checkpoint(w.pid, &dir, &[]);
    wait_gone(w.pid);
    let at = *w.ticks().last().unwrap();
    let new = restore(&dir, w.pid);
    w.adopt(new);
    // Exactly the process's own fds: nothing inherited from ferry (image files, pipes).
    assert_eq!(fd_numbers(new), fds_before);
    w.wait_ticks(at + 2);
    // The SIGUSR1 handler survived and still counts.
    assert!(send_signal(new, libc::SIGUSR1));
    w.wait_line("usr1 1");
    w.terminate_and_check(new).unwrap();
}

#[test]
fn a_signal_sent_while_frozen_is_in_the_image_and_reaches_both_copies() {
    if !needs_root(ROOT) {
        return;
    }
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 2, ..Default::default() });
    w.wait_ready();
    w.wait_ticks(2);
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let marker = image.path().join("frozen");
    // ferry waits once every thread is stopped; the signal then stays pending, and the
    // calls ferry makes in the process must neither deliver nor swallow it.
    let child = std::process::Command::new(ferry_tests::ferry_bin())
        .args(["checkpoint", &w.pid.to_string(), "--dir", dir.to_str().unwrap(), "--leave-running", "--json"])
        .env("FERRY_PAUSE", format!("checkpoint-frozen:{}", marker.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    ferry_tests::wait_until("ferry to hold the process stopped", DEADLINE, || marker.exists());
    assert!(send_signal(w.pid, libc::SIGUSR1));
    std::fs::remove_file(&marker).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "checkpoint failed: {}", stderr(&o));
    // The original gets it once let go,
    w.wait_line("usr1 1");
    let show = ferry(&["show", dir.to_str().unwrap(), "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert!(shown.to_string().contains(r#""shared":[{"info":"0a00"#), "the image holds the pending SIGUSR1: {shown}");
    let sigs = stdout(&ferry(&["show", dir.to_str().unwrap(), "sigs"]));
    assert!(sigs.contains("pending (process) SIGUSR1"), "{sigs}");
    let original = w.pid;
    ferry_tests::workload::kill_pid(original);
    wait_gone(original);
    // and so does its copy, from the image, with the handler it had.
    let before = w.lines().len();
    let new = restore(&dir, original);
    w.adopt(new);
    ferry_tests::wait_until("the copy's SIGUSR1", DEADLINE, || w.lines()[before..].iter().any(|l| l == "usr1 1"));
    assert!(send_signal(new, libc::SIGTERM));
    ferry_tests::wait_until("the copy's verdict", DEADLINE, || {
        w.lines()[before..].iter().any(|l| l == "PASS" || l.starts_with("FAIL"))
    });
    assert!(w.lines()[before..].iter().any(|l| l == "PASS"), "{}", w.log_text());
    wait_gone(new);
}

#[test]
fn scheduling_limits_personality_and_posix_timers_come_back() {
    if !needs_root(ROOT) {
        return;
    }
    // The workload checks its nice values (per thread), the main thread's CPU affinity,
    // two resource limits, its personality and no_new_privs, and three POSIX timers
    // (ids with a gap, one aimed at the main thread, one not signalling) that must
    // still fire: all of which the restore child would otherwise inherit from ferry.
    let mut w = Workload::spawn(&WorkloadOpts { threads: 3, process_state: true, ..Default::default() });
    round_trip(&mut w, &[]);
}

#[test]
fn a_process_of_another_user_comes_back_with_its_own_credentials_not_root() {
    if !needs_root(ROOT) {
        return;
    }
    // The workload runs as uid 65534 (saved and fs uids of their own), with groups, a
    // reduced bounding set, an inheritable capability outside it, an ambient one,
    // securebits, a login uid, a parent-death signal and oom_score_adj; thread 0 has
    // other uids and thread 1 no effective capabilities. The restore child is root.
    let mut w = Workload::spawn(&WorkloadOpts { threads: 3, files: false, creds: true, ..Default::default() });
    w.wait_ready();
    w.wait_ticks(3);
    let before = creds_of(w.pid);
    assert!(before.0.iter().all(|t| t.contains("Gid: 65534 4002 4003 4004,")), "not another user: {before:?}");
    assert_eq!(before.0.iter().filter(|t| t.starts_with("Uid: 4013 4013 4013 4013,")).count(), 1, "{before:?}");
    assert_eq!(before.0.iter().filter(|t| t.contains("CapEff: 0000000000000000")).count(), 1, "{before:?}");
    assert_eq!(before.1, "345");
    // Named first, creds still runs last (`after: ["*"]`): before the files plugin
    // reopens the log, which uid 65534 could not.
    let (new, at) = through_an_image(&mut w, &["--subsystems", "creds,memory,threads,files,signals,process"]);
    assert_eq!(creds_of(new), before, "the restored process's credentials (/proc/{new}/task/*/status)");
    w.wait_ticks(at + 3);
    w.terminate_and_check(new).unwrap();
}

#[test]
fn a_login_uid_the_kernel_will_not_set_fails_the_restore_and_leaves_no_process_behind() {
    if !needs_root(ROOT) {
        return;
    }
    // The workload sets its login uid (4242) only where ours is unset.
    let unset = std::fs::read_to_string("/proc/self/loginuid").is_ok_and(|t| t.trim() == "4294967295");
    if !needs(unset, "our login uid unset (it is set, or the kernel has no audit): else the workload cannot set its own") {
        return;
    }
    let mut w = Workload::spawn(&WorkloadOpts { threads: 1, files: false, creds: true, ..Default::default() });
    w.wait_ready();
    w.wait_ticks(2);
    assert!(creds_of(w.pid).0.iter().all(|t| t.ends_with("loginuid: 4242")), "{:?}", creds_of(w.pid));
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    checkpoint(w.pid, &dir, &[]);
    w.reap();
    // A ferry (so its restore child) with a login uid of its own and without
    // CAP_AUDIT_CONTROL: the kernel refuses to change the login uid.
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"echo 1000 > /proc/self/loginuid && exec setpriv --bounding-set=-audit_control "$0" restore --dir "$1" --json"#)
        .arg(ferry_tests::ferry_bin())
        .arg(&dir)
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "the restore must fail: {err}{}", stdout(&o));
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("login uid") && err.contains("4242") && err.contains("thread"), "{err}");
    let log = w.log.to_str().unwrap().to_string();
    ferry_tests::wait_until("the half-built process to be gone", DEADLINE, || processes_mentioning(&log).is_empty());
    // The image is untouched: an ordinary restore brings it back, checking itself.
    let at = *w.ticks().last().unwrap();
    let new = restore(&dir, w.pid);
    w.adopt(new);
    w.wait_ticks(at + 2);
    w.terminate_and_check(new).unwrap();
}

#[test]
fn shared_anonymous_memory_comes_back_whole_with_its_holes() {
    if !needs_root(ROOT) {
        return;
    }
    let mut w = Workload::spawn(&WorkloadOpts { shared_anon: true, ..Default::default() });
    w.wait_ready();
    w.wait_ticks(2);
    let (new, at) = through_an_image(&mut w, &[]);
    // Only the pages that held data were made again: 3 in 4 of each area (smaps counts
    // the object's pages this process maps; a hole written with zeros would count).
    let (start, _) = w.region("shared");
    let smaps = std::fs::read_to_string(format!("/proc/{new}/smaps")).unwrap();
    let rss_of = |addr: u64| -> u64 {
        let head = format!("{addr:x}-");
        let block = smaps.split_inclusive('\n').skip_while(|l| !l.starts_with(&head)).take(8).collect::<String>();
        let line = block.lines().find(|l| l.starts_with("Rss:")).unwrap_or_else(|| panic!("no area at {head} in {smaps}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert_eq!(rss_of(start), 768 * 3 / 4 * 4, "kB of the rw-s area");
    assert_eq!(rss_of(start + 768 * 4096), 256 * 3 / 4 * 4, "kB of the r--s area");
    w.wait_ticks(at + 2);
    w.terminate_and_check(new).unwrap();
}

#[test]
fn eventfd_timerfd_signalfd_and_epoll_come_back() {
    if !needs_root(ROOT) {
        return;
    }
    // The workload checks from inside: epoll still watches the eventfd, the timerfd and
    // a pipe (with their data words), the semaphore still holds 5, the timer still
    // ticks at its interval, the signalfd still reads its signal.
    let mut w = Workload::spawn(&WorkloadOpts { threads: 2, event_fds: true, ..Default::default() });
    round_trip(&mut w, &[]);
}

#[test]
fn tcp_and_unix_listeners_take_connections_again_after_a_restore() {
    if !needs_root(ROOT) {
        return;
    }
    let mut w = Workload::spawn(&WorkloadOpts { listen: true, ..Default::default() });
    w.wait_ready();
    w.wait_ticks(2);
    let port: u16 = w.lines().iter().find_map(|l| l.strip_prefix("listen ")?.parse().ok()).expect("a `listen PORT` line");
    let path = w.lines().iter().find_map(|l| Some(l.strip_prefix("unix-listen ")?.to_string())).expect("a `unix-listen PATH` line");
    let (new, at) = through_an_image(&mut w, &[]);
    // The restored process answers on the same port and at the same path (its old
    // socket file replaced); inside, it checks both and its abstract listener too.
    let answer = |mut c: Box<dyn std::io::Read>| {
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("hello "), "{answer:?}");
    };
    let c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connecting to the restored listener");
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    answer(Box::new(c));
    let c = std::os::unix::net::UnixStream::connect(&path).expect("connecting to the restored Unix listener");
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    answer(Box::new(c));
    w.wait_ticks(at + 2);
    w.terminate_and_check(new).unwrap();
}

#[test]
fn eight_threads() {
    if !needs_root(ROOT) {
        return;
    }
    let mut w = Workload::spawn(&WorkloadOpts { threads: 8, mem_mib: 4, ..Default::default() });
    round_trip(&mut w, &[]);
}

#[test]
fn quiesced_with_the_cgroup_freezer() {
    if !needs_root(ROOT) {
        return;
    }
    let mut w = Workload::spawn(&WorkloadOpts { threads: 2, ..Default::default() });
    round_trip(&mut w, &["--quiesce", "freezer"]);
}

#[test]
fn leave_running_then_restore_a_copy_twice() {
    if !needs_root(ROOT) {
        return;
    }
    // Without the file state: the original's own check writes to its files, which a
    // copy restored afterwards would then find changed (files are not part of an image).
    let mut w = Workload::spawn(&WorkloadOpts { threads: 1, files: false, ..Default::default() });
    w.wait_ready();
    w.wait_ticks(3);
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    let stats = checkpoint(w.pid, &dir, &["--leave-running"]);
    assert_eq!(stats["pids"][w.pid.to_string()], w.pid);
    // The original carries on untouched; then it is killed.
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 3);
    assert!(pid_alive(w.pid));
    let original = w.pid;
    ferry_tests::workload::kill_pid(original);
    wait_gone(original);
    // Two copies from one image, one after the other; each resumes at the checkpoint.
    for _ in 0..2 {
        let before = w.lines().len();
        let new = restore(&dir, original);
        w.adopt(new);
        // Not `wait_for`: the earlier copy's verdict is already in the log.
        let copy_ticks = || w.lines()[before..].iter().filter(|l| l.starts_with("tick ")).count();
        ferry_tests::wait_until("ticks from the copy", DEADLINE, || copy_ticks() >= 3);
        let copy: Vec<u64> =
            w.lines()[before..].iter().filter_map(|l| l.strip_prefix("tick ")?.parse().ok()).collect();
        assert!(copy[0] <= at + 2, "the copy resumed at tick {} though the image was taken near {at}", copy[0]);
        assert!(copy.windows(2).all(|p| p[1] == p[0] + 1), "the copy's ticks have a gap: {copy:?}");
        assert!(send_signal(new, libc::SIGTERM));
        ferry_tests::wait_until("the copy's verdict", DEADLINE, || {
            w.lines()[before..].iter().any(|l| l == "PASS" || l.starts_with("FAIL"))
        });
        assert!(w.lines()[before..].iter().any(|l| l == "PASS"), "{}", w.log_text());
        wait_gone(new);
    }
}

#[test]
fn a_copy_restores_at_once_beside_the_original_left_running() {
    if !needs_root(ROOT) {
        return;
    }
    // The original keeps its pid: the restore gives the copy another without waiting
    // for the original to exit (it once waited until the watchdog failed it).
    let w = Workload::spawn(&WorkloadOpts { files: false, ..Default::default() });
    w.wait_ticks(2);
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    checkpoint(w.pid, &dir, &["--leave-running"]);
    let copy = restore(&dir, w.pid);
    assert_ne!(copy, w.pid);
    assert!(pid_alive(w.pid) && pid_alive(copy), "both run");
    ferry_tests::workload::kill_pid(copy);
    wait_gone(copy);
    // Without --json: the new pid on stdout, and on stderr why it is not the old one.
    let o = ferry(&["restore", "--dir", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let copy: i32 = stdout(&o).trim().parse().unwrap();
    ferry_tests::workload::kill_pid(copy);
    wait_gone(copy);
    assert_eq!(
        stderr(&o).trim(),
        format!("ferry: process {} is back as {copy}: pid {} is held by another process (ferry-workload)", w.pid, w.pid)
    );
}

#[test]
fn a_stopped_process_comes_back_stopped_and_carries_on_when_continued() {
    if !needs_root(ROOT) {
        return;
    }
    // `kill -STOP`, checkpoint, restore: the copy must be stopped (it came back running).
    let mut w = Workload::spawn(&WorkloadOpts { threads: 1, files: false, ..Default::default() });
    w.wait_ticks(3);
    assert!(send_signal(w.pid, libc::SIGSTOP));
    ferry_tests::wait_until("the workload to stop", DEADLINE, || state(w.pid) == "T");
    let at = *w.ticks().last().unwrap();
    let (new, _) = through_an_image(&mut w, &[]);
    // It stops on its own first step after the release: wait for that, with a deadline.
    ferry_tests::wait_until("the copy to be stopped", DEADLINE, || state(new) == "T");
    // Stopped means no tick meanwhile; continued, it goes on where it stopped.
    assert!(w.ticks().iter().all(|&t| t <= at + 1), "ticks while stopped: {:?}", w.ticks());
    assert!(send_signal(new, libc::SIGCONT));
    w.wait_ticks(at + 3);
    w.terminate_and_check(new).unwrap();
}

fn script(kind: Script) {
    if !needs_root(ROOT) {
        return;
    }
    let mut w = Workload::spawn_script(kind);
    round_trip(&mut w, &[]);
}

#[test]
fn python3_script() {
    script(Script::Python);
}

#[test]
fn python3_asyncio_program_gets_its_pid_back() {
    if !needs_root(ROOT) {
        return;
    }
    // asyncio keeps an epoll instance and a socket pair, and remembers the pid its loop
    // runs in (a loop seen from another pid is taken for a forked child's, and gone):
    // once its parent has reaped it, the restore gives it its pid back.
    let mut w = Workload::spawn_script(Script::PythonAsyncio);
    w.wait_ready();
    w.wait_ticks(3);
    let (new, at) = through_an_image(&mut w, &[]);
    assert_eq!(new, w.pid, "the pid was free again");
    w.wait_ticks(at + 3);
    w.terminate_and_check(new).unwrap();
}

#[test]
fn perl_script() {
    script(Script::Perl);
}

#[test]
fn bash_loop() {
    script(Script::Bash);
}

/// The image's saved instruction pointer of thread `tid` (user_regs_struct: rip is word 16).
fn saved_rip(image: &Path, tid: i32) -> u64 {
    let o = ferry(&["show", image.to_str().unwrap(), "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut found = None;
    fn walk(v: &serde_json::Value, tid: i32, found: &mut Option<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if m.get("tid").and_then(|t| t.as_i64()) == Some(tid as i64) {
                    if let Some(r) = m.get("regs").and_then(|r| r.as_str()) {
                        *found = Some(r.to_string());
                    }
                }
                m.values().for_each(|x| walk(x, tid, found));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, tid, found)),
            _ => {}
        }
    }
    walk(&shown, tid, &mut found);
    let regs = found.unwrap_or_else(|| panic!("no registers of thread {tid} in the image"));
    let hex = &regs[16 * 16..17 * 16];
    let bytes: Vec<u8> = (0..8).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
    u64::from_le_bytes(bytes.try_into().unwrap())
}

#[test]
fn a_main_thread_stopped_inside_an_rseq_critical_section_is_sent_to_its_abort_handler() {
    if !needs_root(ROOT) {
        return;
    }
    // The main thread waits for each tick spinning inside an rseq critical section.
    let mut w = Workload::spawn(&WorkloadOpts { files: false, tick_ms: 20, rseq: true, ..Default::default() });
    w.wait_ready();
    w.wait_ticks(3);
    let line = w.lines().into_iter().find(|l| l.starts_with("rseq-cs ")).expect("the workload names its section");
    let addr = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    let f: Vec<u64> = line.split_whitespace().skip(1).map(addr).collect();
    let (start, end, abort) = (f[0], f[1], f[2]);
    let image = tempfile::tempdir().unwrap();
    let dir = image.path().join("img");
    checkpoint(w.pid, &dir, &[]);
    wait_gone(w.pid);
    // Stopped in the section, it resumes at the abort handler, as the kernel would
    // have sent it there had it been preempted; never in the middle of the section.
    let rip = saved_rip(&dir, w.pid);
    assert!(!(start..end).contains(&rip), "rip {rip:#x} inside the section {start:#x}-{end:#x} (abort at {abort:#x})");
    // It spins in the section but for a few instructions a tick: that is where the
    // freeze caught it, and ferry sent it to the abort handler.
    assert_eq!(rip, abort, "the freeze caught the thread outside its section (rip {rip:#x}); {}", w.log_text());
    let aborts = |lines: &[String]| -> Vec<u64> {
        lines.iter().filter_map(|l| l.strip_prefix("rseq-aborts ")?.parse().ok()).collect()
    };
    let before = *aborts(&w.lines()).last().expect("an rseq-aborts line before the freeze");
    let at = *w.ticks().last().unwrap();
    let from = w.lines().len();
    let new = restore(&dir, w.pid);
    w.adopt(new);
    w.wait_ticks(at + 3);
    // The copy counted the abort it resumed in: the handler ran, the section was not
    // taken up again in its middle. (Its own check then asks the kernel that its rseq
    // area is registered again, as it was.)
    let after = aborts(&w.lines()[from..]);
    assert!(after.first().is_some_and(|&a| a > before), "rseq-aborts {before} at the freeze, then {after:?} in the copy");
    w.terminate_and_check(new).unwrap();
}

/// Each mapping of `pid` but the kernel's own: (start, end, VmFlags codes of its
/// advice and lock).
fn carried_flags(pid: i32) -> Vec<(u64, u64, Vec<String>)> {
    const CODES: [&str; 11] = ["dc", "wf", "hg", "nh", "dd", "sr", "rr", "mg", "lo", "lf", "gu"];
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut out = Vec::new();
    let mut range = None;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            let codes: Vec<String> = flags.split_whitespace().filter(|c| CODES.contains(c)).map(str::to_owned).collect();
            if let Some((s, e)) = range.take() {
                out.push((s, e, codes));
            }
        } else if let Some((s, rest)) = line.split_once('-').filter(|(s, _)| s.bytes().all(|b| b.is_ascii_hexdigit())) {
            let special = line.ends_with(']') && !line.ends_with("[heap]") && !line.ends_with("[stack]");
            let end = rest.split(' ').next().and_then(|e| u64::from_str_radix(e, 16).ok());
            range = u64::from_str_radix(s, 16).ok().zip(end).filter(|_| !special);
        }
    }
    out
}

#[test]
fn madvise_flags_locked_areas_thp_disable_and_mcl_future_come_back() {
    if !needs_root(ROOT) {
        return;
    }
    // Areas with DONTFORK, WIPEONFORK, HUGEPAGE, NOHUGEPAGE, DONTDUMP, RANDOM, an
    // mlocked one and one locked on fault; THP disabled; mlockall(MCL_FUTURE), so a
    // thread's stack is locked too. Inside, the workload also forks to see DONTFORK
    // and WIPEONFORK at work, and maps a page that must come locked.
    let mut w = Workload::spawn(&WorkloadOpts { threads: 1, mm_flags: true, ..Default::default() });
    w.wait_ready();
    w.wait_ticks(2);
    w.check_mm_flags(w.pid).unwrap();
    let before = carried_flags(w.pid);
    let (new, at) = through_an_image(&mut w, &[]);
    w.check_mm_flags(new).unwrap();
    // Every mapping has its advice and locks back, the thread's guard page (PROT_NONE,
    // locked by MCL_FUTURE) among them.
    // (Mappings may merge where the original's stayed apart: compared by address. The
    // patterned mapping's first pages are locked and unlocked at every other tick.)
    let after = carried_flags(new);
    let (mem_start, mem_end) = w.region("mem");
    for (start, _, flags) in before.iter().filter(|(s, e, _)| *e <= mem_start || mem_end <= *s) {
        let back = after.iter().find(|(s, e, _)| s <= start && start < e).map(|(_, _, f)| f);
        assert_eq!(back, Some(flags), "the mapping at {start:#x}: before {before:x?}, after {after:x?}");
    }
    assert!(before.iter().any(|(_, _, f)| f.contains(&"lo".to_string())), "{before:?}");
    let status = std::fs::read_to_string(format!("/proc/{new}/status")).unwrap();
    assert!(status.contains("THP_enabled:\t0"), "{status}");
    w.wait_ticks(at + 2);
    w.terminate_and_check(new).unwrap();
}

#[test]
fn shared_anonymous_memory_mapped_twice_comes_back_as_one_object_in_two_views() {
    if !needs_root(ROOT) {
        return;
    }
    // Eight pages, and four of them mapped again elsewhere (mremap with old_size 0):
    // both views of one object, each at its offset, the untouched page still a hole.
    let mut w = Workload::spawn(&WorkloadOpts { files: false, shared_twice: true, ..Default::default() });
    w.wait_ready();
    w.wait_ticks(2);
    let (new, at) = through_an_image(&mut w, &[]);
    let maps = std::fs::read_to_string(format!("/proc/{new}/maps")).unwrap();
    let line = |name: &str| {
        let (start, end) = w.region(name);
        let head = format!("{start:x}-{end:x} ");
        maps.lines().find(|l| l.starts_with(&head)).unwrap_or_else(|| panic!("{name} is not one mapping: {maps}")).to_owned()
    };
    let (a, b) = (line("twice-a"), line("twice-b"));
    let field = |l: &str, i: usize| l.split_whitespace().nth(i).unwrap().to_owned();
    assert_eq!(field(&b, 2), "00002000", "the second view's offset in the object: {b}");
    assert_eq!(field(&a, 4), field(&b, 4), "one object (inode) in both views: {a} / {b}");
    w.wait_ticks(at + 2);
    w.terminate_and_check(new).unwrap();
}

#[test]
fn on_a_terminal_the_progress_line_shows_bytes_rate_and_time_left_and_is_cleared_before_the_result() {
    if !needs_root(ROOT) || !needs(std::path::Path::new("/usr/bin/script").exists(), "script (util-linux) gives ferry a terminal") {
        return;
    }
    // The line was redrawn ~1,000 times a second and the result glued onto it.
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 256, threads: 1, files: false, ..Default::default() });
    w.wait_ticks(2);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    let cmd = format!("{} checkpoint {} --dir {}", ferry_tests::ferry_bin().display(), w.pid, dir.display());
    let started = std::time::Instant::now();
    let o = std::process::Command::new("script").args(["-qec", &cmd, "/dev/null"]).output().unwrap();
    let secs = started.elapsed().as_secs_f64();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}");
    w.reap();
    let draws = out.matches("ferry checkpoint: ").count();
    assert!(draws >= 1, "no progress line on a terminal: {out:?}");
    // indicatif's limit: a burst, then 10 a second.
    assert!((draws as f64) <= 25.0 + 12.0 * secs, "{draws} redraws in {secs:.1} s");
    // Bytes done of the total (the 256 MiB region and the rest), rate, time left.
    let last = out.rsplit("ferry checkpoint: ").next().unwrap();
    assert!(last.matches("MiB").count() >= 2 && last.contains("iB/s") && last.contains("left"), "the last line drawn: {last:?}");
    // Erased (carriage return, erase line) before the result, which starts its own line.
    assert!(out.contains(&format!("\r\x1b[2Kcheckpointed process {}", w.pid)), "{out:?}");
}

/// python3 that wrote 63 MiB of zeros and 1 MiB of a pattern into a private anonymous
/// mapping (every page present); it checks both when `check` appears in its directory.
const ZEROS_PY: &str = r#"
import mmap, os, struct, sys, time
d, MIB = sys.argv[1], 1 << 20
m = mmap.mmap(-1, 64 * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
zero = bytes(MIB)
for i in range(63): m[i*MIB:(i+1)*MIB] = zero
pattern = b''.join(struct.pack('<Q', i * 2654435761) for i in range(MIB // 8))
m[63*MIB:] = pattern
open(d + '/ready', 'w').close()
while not os.path.exists(d + '/check'): time.sleep(0.01)
bad = [i for i in range(63) if m[i*MIB:(i+1)*MIB] != zero]
said = 'FAIL MiB %d is not zeros' % bad[0] if bad else ('PASS' if m[63*MIB:] == pattern else 'FAIL the pattern')
open(d + '/result.tmp', 'w').write(said + '\n')
os.rename(d + '/result.tmp', d + '/result')
time.sleep(3600)
"#;

#[test]
fn pages_of_zeros_the_process_wrote_travel_as_holes_and_read_as_zeros_again() {
    if !needs_root(ROOT) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new("/usr/bin/python3").args(["-c", ZEROS_PY]).arg(dir.path()).stdin(std::process::Stdio::null()).spawn().unwrap();
    let old = child.id() as i32;
    ferry_tests::wait_until("python3 to be ready", DEADLINE, || dir.path().join("ready").exists());
    let image = dir.path().join("img");
    let stats = checkpoint(old, &image, &[]);
    let _ = child.wait();
    // python3 itself is ~10 MB; the 63 MiB of zeros stay out of the image.
    let bytes = stats["bytes"].as_u64().unwrap();
    assert!(bytes < 32 << 20, "the zeros went into the image: {stats}");
    let new = restore(&image, old);
    std::fs::write(dir.path().join("check"), b"").unwrap();
    let mut said = String::new();
    ferry_tests::wait_until("python3's own check", DEADLINE, || {
        said = std::fs::read_to_string(dir.path().join("result")).unwrap_or_default();
        !said.is_empty() || !pid_alive(new)
    });
    ferry_tests::workload::kill_pid(new);
    wait_gone(new);
    assert!(said.starts_with("PASS"), "python3 after the restore says {said:?} ({stats})");
}

/// python3 with 16 MiB it asked huge pages for (`MADV_HUGEPAGE`) and wrote; its
/// address in `addr`.
const HUGE_PY: &str = r#"
import mmap, os, sys, time
d, MIB = sys.argv[1], 1 << 20
m = mmap.mmap(-1, 16 * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_HUGEPAGE)
for i in range(16): m[i*MIB:(i+1)*MIB] = bytes([i + 1]) * MIB
import ctypes
open(d + '/addr', 'w').write(str(ctypes.addressof(ctypes.c_char.from_buffer(m))))
open(d + '/ready', 'w').close()
time.sleep(3600)
"#;

/// The `AnonHugePages` of process `pid`'s mappings that hold `addr`, KiB.
fn huge_kib(pid: i32, addr: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut inside = false;
    let mut kib = 0;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ').filter(|(r, _)| r.contains('-') && !r.ends_with(':')) {
            let (s, e) = range.split_once('-').unwrap();
            let (s, e) = (u64::from_str_radix(s, 16).unwrap(), u64::from_str_radix(e, 16).unwrap());
            inside = s <= addr && addr < e;
        } else if let Some(v) = line.strip_prefix("AnonHugePages:").filter(|_| inside) {
            kib += v.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap();
        }
    }
    kib
}

#[test]
fn an_area_given_huge_pages_comes_back_on_huge_pages() {
    if !needs_root(ROOT) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new("/usr/bin/python3").args(["-c", HUGE_PY]).arg(dir.path()).stdin(std::process::Stdio::null()).spawn().unwrap();
    let old = child.id() as i32;
    ferry_tests::wait_until("python3 to be ready", DEADLINE, || dir.path().join("ready").exists());
    let addr: u64 = std::fs::read_to_string(dir.path().join("addr")).unwrap().trim().parse().unwrap();
    let before = huge_kib(old, addr);
    if !needs(before > 0, "transparent huge pages for an madvised area here (the kernel gave none)") {
        let _ = child.kill();
        let _ = child.wait();
        return;
    }
    let image = dir.path().join("img");
    checkpoint(old, &image, &[]);
    let _ = child.wait();
    let new = restore(&image, old);
    let after = huge_kib(new, addr);
    ferry_tests::workload::kill_pid(new);
    wait_gone(new);
    assert!(after > 0, "the source had {before} KiB on huge pages, the copy none");
}
