//! What ferry may leave behind when it dies or fails, scoped to a test's own processes
//! (other tests, and other people's, run beside it): ferry's scratch area mapped in a
//! process, a cgroup of ferry's named for one of the processes or holding one, an image
//! directory with files in it.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// The mount points of every cgroup hierarchy (v1 and v2) on this machine.
pub fn cgroup_roots() -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect()
}

/// Whether `name` is ferry's cgroup for process `pid`: `ferry-<pid>-<ferry's pid>`
/// (the freezer's) or `ferry-throttle-<pid>-<ferry's pid>` (auto-converge's).
pub fn names_ferry_cgroup_of(name: &str, pid: i32) -> bool {
    let rest = name.strip_prefix("ferry-throttle-").or_else(|| name.strip_prefix("ferry-"));
    let Some((of, by)) = rest.and_then(|r| r.split_once('-')) else { return false };
    of == pid.to_string() && !by.is_empty() && by.bytes().all(|b| b.is_ascii_digit())
}

/// Every cgroup of ferry's named for one of `pids`, in any hierarchy, at any depth.
pub fn ferry_cgroups_of(pids: &[i32]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = cgroup_roots();
    while let Some(dir) = pending.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if pids.iter().any(|&p| names_ferry_cgroup_of(&name, p)) {
                found.push(e.path());
            }
            pending.push(e.path());
        }
    }
    found
}

/// What of ferry's is left around the processes `pids` (those alive are looked into)
/// and the image directory `image` (which must be absent or empty).
pub fn residue(pids: &[i32], image: Option<&Path>) -> Vec<String> {
    let mut left = Vec::new();
    let mut pids = pids.to_vec();
    pids.sort_unstable();
    pids.dedup();
    for &pid in &pids {
        // A zombie still names the (removed) cgroup it died in: only the living count.
        if !crate::workload::pid_alive(pid) {
            continue;
        }
        // ferry's scratch area: anonymous, writable and executable, of its size
        // (framework/src/kernel/tracer/inject.rs).
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        for line in maps.lines().filter(|l| l.contains(" rwxp 00000000 00:00 0")) {
            let range = line.split(' ').next().unwrap_or("");
            let Some((s, e)) = range.split_once('-') else { continue };
            let len = u64::from_str_radix(e, 16).unwrap_or(0).wrapping_sub(u64::from_str_radix(s, 16).unwrap_or(0));
            if len == ferry::kernel::tracer::SCRATCH_SIZE {
                left.push(format!("ferry's scratch area at {range} in process {pid}"));
            }
        }
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        for l in cgroups.lines().filter(|l| l.contains("/ferry-")) {
            left.push(format!("process {pid} in ferry's cgroup {l}"));
        }
    }
    for c in ferry_cgroups_of(&pids) {
        left.push(format!("ferry's cgroup {}", c.display()));
    }
    if let Some(dir) = image {
        let files: Vec<_> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.file_name()).collect();
        if !files.is_empty() {
            left.push(format!("a partial image in {}: {files:?}", dir.display()));
        }
    }
    left
}

/// Asserts that nothing of ferry's is left around `pids` and `image` (see
/// [`residue`]), giving what cleans up after a dead ferry (its guardian and janitor,
/// processes of their own) a deadline to finish.
#[track_caller]
pub fn assert_no_residue(pids: &[i32], image: Option<&Path>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pause = Duration::from_millis(1);
    loop {
        let left = residue(pids, image);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left behind after 30 s: {left:#?}");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_ferrys_cgroup_names_of_a_pid_and_no_other() {
        assert!(names_ferry_cgroup_of("ferry-123-456", 123));
        assert!(names_ferry_cgroup_of("ferry-throttle-123-456", 123));
        assert!(!names_ferry_cgroup_of("ferry-1234-456", 123));
        assert!(!names_ferry_cgroup_of("ferry-throttle-1234-456", 123));
        assert!(!names_ferry_cgroup_of("ferry-123-", 123));
        assert!(!names_ferry_cgroup_of("ferry-a-123", 123));
        assert!(!names_ferry_cgroup_of("other-123-456", 123));
    }
}
