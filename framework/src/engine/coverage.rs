//! Nothing dropped by omission: the subsystems of a request must together carry every
//! kind of state the process has. Each plugin declares the entity kinds it carries
//! (`SubsystemInfo::entity_kinds`); this module knows which kinds a process has, from
//! /proc, and refuses a request that would leave one behind, before anything is
//! touched. A restore checks the kinds every process has against the image's plugins.

use ferry_plugin_api::util::proc_field;

/// State every process has: its entity kind, and what it is to a user.
const ALWAYS: &[(&str, &str)] = &[
    ("mapping", "its memory"),
    ("thread", "its threads"),
    ("credentials", "its credentials (it would run as root)"),
    ("cwd", "its working directory"),
    ("rlimit", "its resource limits"),
];

/// The kinds of state process `pid` has (every process's when `pid` is `None`), each
/// with what it is to a user.
pub fn kinds_of(pid: Option<i32>) -> Vec<(&'static str, String)> {
    let mut kinds: Vec<(&'static str, String)> = ALWAYS.iter().map(|&(k, what)| (k, what.to_string())).collect();
    let Some(pid) = pid else { return kinds };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    if fds > 0 {
        kinds.push(("fd", format!("its {fds} open file descriptors")));
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let mask = |key| proc_field(&status, key).and_then(|v| u64::from_str_radix(v, 16).ok()).unwrap_or(0);
    if mask("SigCgt") | mask("SigIgn") != 0 {
        kinds.push(("sigaction", "its signal handlers".into()));
    }
    if mask("SigPnd") | mask("ShdPnd") != 0 {
        kinds.push(("pending-signal", "its pending signals".into()));
    }
    let timers = std::fs::read_to_string(format!("/proc/{pid}/timers")).unwrap_or_default();
    if timers.lines().any(|l| l.starts_with("ID:")) {
        kinds.push(("posix-timer", "its POSIX timers".into()));
    }
    // Per thread: threads of one process may differ.
    if crate::kernel::target::seccomp_modes(pid).iter().any(|&(_, mode)| mode == 2) {
        kinds.push(("seccomp", "its seccomp filters (it would run without its sandbox)".into()));
    }
    kinds
}

/// Refuses (one line) when `kinds` holds state that none of `carried` (the entity
/// kinds the request's subsystems declare) carries.
pub fn check(who: &str, kinds: &[(&'static str, String)], carried: &[String], names: &[String]) -> Result<(), String> {
    let lost: Vec<&str> = kinds.iter().filter(|(k, _)| !carried.iter().any(|c| c == k)).map(|(_, what)| what.as_str()).collect();
    if lost.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{who} has {}, which no subsystem of the request ({}) carries: it would be lost (the default subsystems carry it)",
        lost.join(", "),
        names.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_request_must_carry_every_kind_the_process_has() {
        let me = std::process::id() as i32;
        let kinds = kinds_of(Some(me));
        assert!(kinds.iter().any(|(k, _)| *k == "fd"), "a test process has open files: {kinds:?}");
        let all = strings(&["mapping", "page", "thread", "credentials", "cwd", "root", "umask", "rlimit", "fd", "sigaction", "pending-signal", "posix-timer"]);
        check("process 1", &kinds, &all, &[]).unwrap();
        let e = check("process 1", &kinds, &strings(&["mapping", "page", "credentials"]), &strings(&["memory", "creds"])).unwrap_err();
        assert!(e.starts_with("process 1 has its threads, its working directory, its resource limits, its "), "{e}");
        assert!(e.contains("which no subsystem of the request (memory, creds) carries"), "{e}");
        // An image: what every process has.
        let e = check("the image", &kinds_of(None), &strings(&["mapping", "thread", "cwd", "rlimit"]), &strings(&["memory"])).unwrap_err();
        assert!(e.contains("its credentials (it would run as root)"), "{e}");
    }
}
