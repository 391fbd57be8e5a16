//! `ferry show DIR ps|mems|fds|sigs` checked against what `/proc` says of the same
//! process: an image taken with `--leave-running` of the workload (threads, files,
//! pipes, signal handlers), compared with the process it was taken of.

use std::collections::BTreeSet;

use ferry_tests::{
    ferry, needs_root, stderr, stdout,
    workload::{Workload, WorkloadOpts},
};

/// `ferry show DIR VIEW`, which must succeed.
fn view(dir: &std::path::Path, view: &str) -> String {
    let o = ferry(&["show", dir.to_str().unwrap(), view]);
    assert!(o.status.success(), "show {view} failed: {}", stderr(&o));
    stdout(&o)
}

/// A line of `/proc/PID/status` (`SigCgt:` …), its value.
fn status(pid: i32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("no {key} in {text}")).trim().to_string()
}

#[test]
fn each_view_says_what_proc_says_of_the_process_the_image_is_of() {
    if !needs_root("a checkpoint seizes the process (ptrace of other users)") {
        return;
    }
    let w = Workload::spawn(&WorkloadOpts { threads: 2, mem_mib: 2, ..Default::default() });
    w.wait_ready();
    w.wait_ticks(2);
    let pid = w.pid;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    let o = ferry(&["checkpoint", &pid.to_string(), "--dir", dir.to_str().unwrap(), "--leave-running"]);
    assert!(o.status.success(), "checkpoint failed: {}", stderr(&o));

    // ps: its pid, its threads, its user.
    let ps = view(&dir, "ps");
    let row: Vec<&str> = ps.lines().nth(1).unwrap_or_else(|| panic!("no process in {ps}")).split_whitespace().collect();
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().count();
    assert_eq!(row[0], pid.to_string(), "{ps}");
    assert_eq!(row[5], threads.to_string(), "{ps}");
    assert_eq!(row[4], status(pid, "Uid:").split_whitespace().next().unwrap(), "{ps}");

    // mems: every area of /proc/PID/maps (but the vsyscall page, which no process owns),
    // with the same bounds, permissions and offset.
    let mems = view(&dir, "mems");
    let area = |l: &str| -> Option<(u64, u64, String, u64)> {
        let mut f = l.split_whitespace();
        let (lo, hi) = f.next()?.split_once('-')?;
        let perms = f.next()?.to_string();
        let offset = u64::from_str_radix(f.next()?, 16).ok()?;
        Some((u64::from_str_radix(lo, 16).ok()?, u64::from_str_radix(hi, 16).ok()?, perms, offset))
    };
    let shown: BTreeSet<_> = mems.lines().skip(1).filter_map(area).collect();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let proc: BTreeSet<_> = maps.lines().filter(|l| !l.ends_with("[vsyscall]")).filter_map(area).collect();
    assert!(proc.len() > 10, "{maps}");
    assert_eq!(shown, proc, "mems:\n{mems}\n/proc/{pid}/maps:\n{maps}");

    // fds: every fd, with the flags fdinfo gives (octal, O_CLOEXEC included).
    let fds = view(&dir, "fds");
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let fd = entry.unwrap().file_name().into_string().unwrap();
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap().trim();
        let flags = format!("{:07o}", u64::from_str_radix(flags, 8).unwrap());
        assert!(
            fds.lines().any(|l| l.split_whitespace().take(2).eq([fd.as_str(), flags.as_str()])),
            "fd {fd} with flags {flags} not in:\n{fds}"
        );
    }

    // sigs: a line for each signal /proc says is caught or ignored, the handler a
    // function for the caught ones.
    let sigs = view(&dir, "sigs");
    let caught = u64::from_str_radix(&status(pid, "SigCgt:"), 16).unwrap();
    let ignored = u64::from_str_radix(&status(pid, "SigIgn:"), 16).unwrap();
    assert!(caught != 0, "the workload catches signals");
    let names = ["SIGHUP", "SIGINT", "SIGQUIT", "SIGILL", "SIGTRAP", "SIGABRT", "SIGBUS", "SIGFPE", "SIGKILL", "SIGUSR1", "SIGSEGV", "SIGUSR2", "SIGPIPE", "SIGALRM", "SIGTERM"];
    for (i, name) in names.iter().enumerate() {
        let line = sigs.lines().find(|l| l.split_whitespace().next() == Some(name));
        if caught & (1 << i) != 0 {
            let handler = line.unwrap_or_else(|| panic!("no {name} in:\n{sigs}")).split_whitespace().nth(1).unwrap();
            assert!(handler.starts_with("0x"), "{name} is caught: {sigs}");
        } else if ignored & (1 << i) != 0 {
            assert!(line.is_some_and(|l| l.contains("SIG_IGN")), "{name} is ignored: {sigs}");
        }
    }
    assert!(sigs.contains("SA_RESTORER"), "{sigs}");
    drop(w);
}
