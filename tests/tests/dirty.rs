//! Dirty-page tracking on a live process (for pre-copy): userfaultfd write-protect in
//! async mode, created in the target, and PAGEMAP_SCAN from outside.

use ferry::{
    config::DirtyTracking,
    kernel::dirty::DirtyTracker,
    kernel::tracer::Tracer,
};
use ferry_tests::{
    needs, needs_root,
    workload::{Workload, WorkloadOpts},
};


fn has_userfaultfd(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.flatten().any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("userfaultfd"))))
        .unwrap_or(false)
}

#[test]
fn userfaultfd_finds_exactly_the_pages_a_running_process_writes_and_leaves_no_trace() {
    let features = ferry::kernel::probes::probe_all();
    let present = ferry::kernel::probes::find(&features, "userfaultfd-wp-async").is_some_and(|f| f.present);
    if !needs(present, "userfaultfd WP-async in this kernel (without it pre-copy falls back to page hashes)") {
        return;
    }
    finds_exactly_the_written_pages(DirtyTracking::Userfaultfd);
}

#[test]
fn page_hashes_find_exactly_the_pages_a_running_process_writes() {
    finds_exactly_the_written_pages(DirtyTracking::PageHash);
}

fn finds_exactly_the_written_pages(how: DirtyTracking) {
    if !needs_root("ptrace and pidfd_getfd of the workload") {
        return;
    }
    // 8 MiB of patterned memory, 4 pages of it rewritten every tick, cycling.
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 8, files: false, dirty_pages: 4, ..Default::default() });
    w.wait_ticks(2);
    let (start, end) = w.region("mem");
    let pid = w.pid;

    let mut tracer = Tracer::seize(pid).unwrap();
    let mut tracker = DirtyTracker::start(&mut tracer, &[(start, end)], how).unwrap();
    assert!(tracker.scan().unwrap().is_empty(), "nothing is dirty right after the start");
    tracer.detach().unwrap();

    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 3);

    let tracer = Tracer::seize(pid).unwrap();
    let dirty = tracker.scan().unwrap();
    let pages: u64 = dirty.iter().map(|(s, e)| (e - s) / 4096).sum();
    assert!(!dirty.is_empty(), "the process wrote pages while it ran");
    assert!(dirty.iter().all(|&(s, e)| start <= s && e <= end), "{dirty:x?} outside {start:#x}-{end:#x}");
    assert!(pages >= 4 && pages < (end - start) / 4096 / 2, "{pages} pages dirty");
    // Scanning re-protects: while the process is stopped, a second scan finds nothing.
    assert!(tracker.scan().unwrap().is_empty());
    tracker.stop();
    tracer.detach().unwrap();
    assert!(!has_userfaultfd(pid), "the target keeps no userfaultfd of ours");

    // The process ran through all of it untouched: its own check passes.
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 2);
    w.terminate_and_check(pid).unwrap();
}
