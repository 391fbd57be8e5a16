//! What ferry reads of a process from /proc before it touches it: its stat fields,
//! the stamp that tells it from a later process with its pid, its threads, whether it
//! is stopped by job control, and whether it may be taken at all.

use libc::pid_t;

use super::error::TraceError;

/// Reads `/proc/PID/stat` fields after the command name.
pub fn stat_fields(pid: pid_t) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let close = text.rfind(')')?;
    Some(text[close + 1..].split_whitespace().map(str::to_string).collect())
}

/// What tells process `pid` from a later one given its pid: the boot it runs in and
/// its start time (`boot_id/ticks`, field 22 of `/proc/PID/stat`).
pub fn start_stamp(pid: pid_t) -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let ticks = stat_fields(pid)?.get(19)?.clone();
    Some(format!("{}/{ticks}", boot.trim()))
}

/// The threads of `pid`, from `/proc/PID/task`.
pub fn task_ids(pid: pid_t) -> Result<Vec<pid_t>, TraceError> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|_| TraceError::NoProcess(pid))?;
    let mut tids: Vec<pid_t> =
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    tids.sort_unstable();
    // The main thread first: plugins rely on it.
    if let Some(i) = tids.iter().position(|&t| t == pid) {
        tids.remove(i);
        tids.insert(0, pid);
    }
    Ok(tids)
}

/// The children of process `pid`, in pid order: those of each of its threads
/// (`/proc/PID/task/TID/children` lists a thread's children running, stopped or zombie).
/// Without those files (a kernel built without `CONFIG_PROC_CHILDREN`), every process
/// whose parent is `pid` is found in `/proc`.
pub fn children(pid: pid_t) -> Vec<pid_t> {
    let mut kids: Vec<pid_t> = Vec::new();
    let mut listed = false;
    for tid in task_ids(pid).unwrap_or_default() {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")) {
            listed = true;
            kids.extend(text.split_whitespace().filter_map(|p| p.parse::<pid_t>().ok()));
        }
    }
    if !listed && std::path::Path::new(&format!("/proc/{pid}")).exists() {
        let entries = std::fs::read_dir("/proc").into_iter().flatten().flatten();
        kids.extend(entries.filter_map(|e| {
            let p: pid_t = e.file_name().to_str()?.parse().ok()?;
            // Field 4 of stat, the second after the name: the parent's pid.
            (stat_fields(p)?.get(1)?.parse::<pid_t>().ok()? == pid).then_some(p)
        }));
    }
    kids.sort_unstable();
    kids.dedup();
    kids
}

/// Why a migration that began with a lone process refuses it once it has a child.
pub const TREES_NOT_MIGRATED: &str =
    "it forked while being frozen for a migration that began with no child: run the migration again, which then takes the whole tree";

/// Refuses a process that has a child, saying `why`: a child left behind would lose its
/// parent (the copy's `wait` would find no child). Checked before the process is
/// touched, and again once it is frozen (a child forked in between).
pub fn check_childless(pid: pid_t, why: &str) -> Result<(), TraceError> {
    let Some(&child) = children(pid).first() else { return Ok(()) };
    let comm = std::fs::read_to_string(format!("/proc/{child}/comm")).map(|c| c.trim().to_string());
    let state = stat_fields(child).and_then(|f| f.first().cloned()).unwrap_or_default();
    let what = match (comm, state.as_str()) {
        (Ok(c), "Z" | "X") => format!("{c}, a zombie"),
        (Ok(c), "T" | "t") => format!("{c}, stopped"),
        (Ok(c), _) => c,
        (Err(_), _) => "gone as it was seen".into(),
    };
    Err(TraceError::HasChild { pid, child, what, why: why.to_string() })
}

/// Refuses targets that cannot be checkpointed, with the reason.
pub fn check_target(pid: pid_t) -> Result<(), TraceError> {
    if pid <= 0 {
        return Err(TraceError::NoProcess(pid));
    }
    // SAFETY: getpid has no preconditions.
    if pid == unsafe { libc::getpid() } {
        return Err(TraceError::Unsuitable { pid, why: "ferry itself".into() });
    }
    let fields = stat_fields(pid).ok_or(TraceError::NoProcess(pid))?;
    let state = fields.first().map(String::as_str).unwrap_or("?");
    if state == "Z" || state == "X" {
        return Err(TraceError::Unsuitable { pid, why: "a zombie".into() });
    }
    // PF_KTHREAD is bit 21 of the flags (field 9 of stat, 7th after the name).
    let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
    if flags & 0x0020_0000 != 0 {
        return Err(TraceError::Unsuitable { pid, why: "a kernel thread".into() });
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    // Only root may take another user's process (its memory goes into the image).
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if me != 0 {
        let uids = ferry_plugin_api::util::proc_field(&status, "Uid").unwrap_or("");
        if let Some(other) = uids.split_whitespace().find(|u| *u != me.to_string()) {
            return Err(TraceError::Unsuitable { pid, why: format!("owned by uid {other}, and only root may take another user's process") });
        }
    }
    // Its own process, but without the privileges: say so now, not by a plugin's
    // EACCES deep inside the checkpoint.
    if let Err(why) = check_privileges() {
        return Err(TraceError::Unsuitable { pid, why: format!("out of reach: {why}") });
    }
    // Another tracer (a debugger, strace, another ferry) holds it: a seize would fail.
    let tracer_pid = ferry_plugin_api::util::proc_field(&status, "TracerPid").unwrap_or("0");
    if tracer_pid != "0" {
        return Err(TraceError::Unsuitable { pid, why: format!("already traced by process {tracer_pid}") });
    }
    // Seccomp filters are suspended while ferry holds the process and carried by the
    // `seccomp` plugin (see tracer/seccomp.rs). Strict mode is not carried: only an
    // injected call in the thread could set it again, after which any call but read,
    // write, exit and sigreturn kills it.
    if let Some((tid, _)) = seccomp_modes(pid).into_iter().find(|&(_, mode)| mode == 1) {
        return Err(TraceError::Unsuitable { pid, why: format!("under seccomp strict mode (thread {tid}), which ferry does not carry") });
    }
    check_namespaces(pid)
}

/// Namespaces that change what a process sees of itself, which ferry does not carry: a
/// process restored outside its own would run on changed without knowing. (The others —
/// network, mounts, host name, IPC, cgroups — are the machine's: a process takes those
/// of wherever it is restored, as it takes the machine.)
const OWN_NAMESPACES: [(&str, &str); 3] = [
    ("pid", "its pids (getpid, its children's) would change and it would see every process"),
    ("user", "its uids, gids and capabilities would mean other things"),
    ("time", "its clocks would lose their offsets"),
];

/// Refuses a process in a pid, user or time namespace other than ferry's, naming it.
fn check_namespaces(pid: pid_t) -> Result<(), TraceError> {
    for (ns, lost) in OWN_NAMESPACES {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"));
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}"));
        if let (Ok(theirs), Ok(ours)) = (theirs, ours) {
            if theirs != ours {
                return Err(TraceError::Unsuitable {
                    pid,
                    why: format!(
                        "in a {ns} namespace of its own ({}, ferry's is {}), which ferry does not carry yet: {lost}",
                        theirs.display(),
                        ours.display()
                    ),
                });
            }
        }
    }
    Ok(())
}

/// What ferry needs of its own privileges: CAP_SYS_ADMIN (which also grants what
/// CAP_CHECKPOINT_RESTORE does) and CAP_SYS_PTRACE in its effective set; the one line
/// saying so otherwise.
pub fn check_privileges() -> Result<(), String> {
    const CAP_SYS_PTRACE: u32 = 19;
    const CAP_SYS_ADMIN: u32 = 21;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = ferry_plugin_api::util::proc_field(&status, "CapEff").and_then(|h| u64::from_str_radix(h, 16).ok()).unwrap_or(0);
    if eff & (1 << CAP_SYS_PTRACE) != 0 && eff & (1 << CAP_SYS_ADMIN) != 0 {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    Err(format!("ferry needs root (CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_CHECKPOINT_RESTORE), and it runs as uid {me} without them"))
}

/// The `Seccomp:` mode of each thread of `pid` that is under seccomp (1 strict, 2 filter).
pub fn seccomp_modes(pid: pid_t) -> Vec<(pid_t, u32)> {
    let tids = task_ids(pid).unwrap_or_default();
    tids.into_iter()
        .filter_map(|tid| {
            let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
            let mode: u32 = ferry_plugin_api::util::proc_field(&text, "Seccomp")?.parse().ok()?;
            (mode != 0).then_some((tid, mode))
        })
        .collect()
}

/// Whether process `pid` is stopped by job control (`T` in its stat, not a tracing stop).
pub fn group_stopped(pid: pid_t) -> bool {
    stat_fields(pid).and_then(|f| f.first().cloned()).as_deref() == Some("T")
}

/// Refuses another ferry (a daemon, a migration in flight) as the target of a request:
/// taking it would take the events it serves along, half done. (Not part of
/// [`check_target`]: a restore child is a fork of ferry until it is rebuilt.)
pub fn check_not_ferry(pid: pid_t) -> Result<(), TraceError> {
    if same_program(pid, "self") {
        return Err(TraceError::Unsuitable { pid, why: "a ferry process (a daemon or another event)".into() });
    }
    Ok(())
}

/// Whether process `pid` runs the same executable file as process `other` ("self").
fn same_program(pid: pid_t, other: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &str| std::fs::metadata(format!("/proc/{p}/exe")).ok().map(|m| (m.dev(), m.ino()));
    matches!((id(&pid.to_string()), id(other)), (Some(a), Some(b)) if a == b)
}
