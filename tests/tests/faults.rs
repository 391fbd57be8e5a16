//! ferry killed in the middle of a checkpoint (`FERRY_FAULT`, SIGKILL: no destructor of
//! its runs) leaves nothing of its own behind: no scratch area in the process, no
//! cgroup of ferry's holding it, no partial image; and the process runs on, passing its
//! own check.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use ferry_tests::{
    ferry_bin, needs_root, stderr,
    workload::{pid_alive, Workload, WorkloadOpts},
};

/// What of ferry's is left around process `pid` and image directory `dir`, scoped to
/// them (other tests run beside this one).
fn residue(pid: i32, dir: &Path) -> Vec<String> {
    let mut left = Vec::new();
    // ferry's scratch area: 1 MiB, anonymous, writable and executable
    // (kernel/tracer/inject.rs).
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    for line in maps.lines().filter(|l| l.contains(" rwxp 00000000 00:00 0")) {
        let range = line.split(' ').next().unwrap();
        let (s, e) = range.split_once('-').unwrap();
        if u64::from_str_radix(e, 16).unwrap() - u64::from_str_radix(s, 16).unwrap() == ferry::kernel::tracer::SCRATCH_SIZE {
            left.push(format!("a scratch area at {range}"));
        }
    }
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    if cgroup.contains("ferry-") {
        left.push(format!("in ferry's cgroup: {}", cgroup.trim()));
    }
    // ferry-<pid>-<ferry's pid>, ferry-throttle-<pid>-…, in any hierarchy.
    for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/freezer", "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/unified"] {
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("ferry-") && name.contains(&format!("-{pid}-")) {
                left.push(format!("cgroup {root}/{name}"));
            }
        }
    }
    if dir.exists() {
        let files: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name()).collect();
        left.push(format!("the image directory {} with {files:?}", dir.display()));
    }
    left
}

#[test]
fn a_checkpoint_killed_midway_leaves_no_scratch_area_no_cgroup_and_no_image() {
    if !needs_root("checkpoint (ptrace, cgroups)") {
        return;
    }
    for quiesce in ["ptrace", "freezer"] {
        let mut w = Workload::spawn(&WorkloadOpts { threads: 1, mem_mib: 4, ..Default::default() });
        w.wait_ready();
        w.wait_ticks(2);
        let image = tempfile::tempdir().unwrap();
        let dir = image.path().join("img");
        // Killed once the first subsystem plugin wrote its records.
        let o = Command::new(ferry_bin())
            .args(["checkpoint", &w.pid.to_string(), "--dir", dir.to_str().unwrap(), "--quiesce", quiesce])
            .env("FERRY_FAULT", "checkpoint-mid")
            .output()
            .unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&o.status), Some(libc::SIGKILL), "{quiesce}: {}", stderr(&o));
        assert!(stderr(&o).contains("injected fault at checkpoint-mid"), "{quiesce}: {}", stderr(&o));
        let pid = w.pid;
        // The janitor is at work as ferry's output ends; a deadline all the same.
        let deadline = Instant::now() + Duration::from_secs(30);
        let left = loop {
            let left = residue(pid, &dir);
            if left.is_empty() || Instant::now() > deadline {
                break left;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(left.is_empty(), "{quiesce}: left behind: {left:?}; ferry said: {}", stderr(&o));
        // The process carries on, untouched.
        assert!(pid_alive(pid), "{quiesce}");
        let at = *w.ticks().last().unwrap();
        w.wait_ticks(at + 3);
        w.terminate_and_check(pid).unwrap_or_else(|e| panic!("{quiesce}: {e}"));
    }
}
