use super::*;
use crate::kernel::target::stat_fields;
use std::process::{Command, Stdio};

/// A `sleep` to trace, killed by pid however the test ends.
struct Target(std::process::Child);
impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn target() -> Target {
    Target(Command::new("sleep").arg("1000").stdout(Stdio::null()).spawn().unwrap())
}

#[test]
fn injects_syscalls_and_puts_the_process_back() {
    let t = target();
    let pid = t.0.id() as pid_t;
    // Wait for exec to have happened so the maps are sleep's.
    wait_for(|| {
        std::fs::read_to_string(format!("/proc/{pid}/maps")).map(|m| m.contains("libc")).unwrap_or(false)
            && stat_fields(pid).is_some_and(|f| f[0] == "S")
    });
    let maps_before = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut tr = Tracer::seize(pid).unwrap();
    assert_eq!(tr.tids(), vec![pid]);
    let regs = tr.saved_regs(pid).unwrap();
    assert_eq!(tr.inject(pid, libc::SYS_getpid, [0; 6]).unwrap(), pid as i64);
    let scratch = tr.map_scratch(0).unwrap();
    assert_eq!(tr.inject(pid, libc::SYS_getppid, [0; 6]).unwrap(), std::process::id() as i64);
    // Memory through the scratch area: write a string, have the target read it back.
    tr.write_ranges(&[(scratch + PAGE, 5)], b"ferry").unwrap();
    let mut back = [0u8; 5];
    tr.read_ranges(&[(scratch + PAGE, 5)], &mut back).unwrap();
    assert_eq!(&back, b"ferry");
    assert!(tr.inject(pid, libc::SYS_close, [9999, 0, 0, 0, 0, 0]).unwrap() == -(libc::EBADF as i64));
    assert_eq!(tr.saved_regs(pid).unwrap().rip, regs.rip, "registers are the seized ones");
    tr.unmap_scratch().unwrap();
    tr.detach().unwrap();
    assert_eq!(std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap(), maps_before);
    let state = stat_fields(pid).unwrap()[0].clone();
    assert!(state == "S" || state == "R", "state {state}");
}

#[test]
fn refuses_what_cannot_be_traced() {
    assert!(matches!(Tracer::seize(i32::MAX - 1), Err(TraceError::NoProcess(_))));
    assert!(matches!(Tracer::seize(std::process::id() as pid_t), Err(TraceError::Unsuitable { .. })));
    // kthreadd is pid 2 on a normal system.
    if stat_fields(2).is_some() {
        assert!(matches!(Tracer::seize(2), Err(TraceError::Unsuitable { .. })));
    }
}

pub(crate) fn wait_for(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "condition not met in time");
        std::thread::sleep(Duration::from_millis(2));
    }
}


/// Seizing a process while its dynamic loader is still at work, injecting, and
/// letting it go must leave it able to finish normally.
#[test]
fn seizing_during_startup_is_harmless() {
    // A seize or an injection may fail when the process has already exited (it is
    // short-lived on purpose); what must hold is that some did get in, and that every
    // process ends well.
    let (mut injected, mut mapped) = (0, 0);
    for _ in 0..30 {
        let mut child = Command::new("sleep").arg("0.05").spawn().unwrap();
        let pid = child.id() as pid_t;
        if let Ok(mut tr) = Tracer::seize(pid) {
            if tr.inject(pid, libc::SYS_getpid, [0; 6]).is_ok_and(|r| r == pid as i64) {
                injected += 1;
            }
            if tr.map_scratch(0).is_ok() {
                mapped += 1;
                assert_eq!(tr.inject(pid, libc::SYS_getpid, [0; 6]).unwrap(), pid as i64, "getpid from the scratch area");
                tr.unmap_scratch().unwrap();
            }
            tr.detach().unwrap();
        }
        let status = child.wait().unwrap();
        assert!(status.success(), "sleep ended with {status:?}");
    }
    assert!(injected >= 10 && mapped >= 10, "only {injected} injections and {mapped} scratch areas in 30 startups");
}
