//! What can go wrong reaching into a process: the error of the tracer and of the
//! checks made before it seizes.

use std::io;

use libc::pid_t;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("process {0} does not exist")]
    NoProcess(pid_t),
    #[error("process {pid} is {why}: it cannot be checkpointed")]
    Unsuitable { pid: pid_t, why: String },
    #[error("{what} on thread {tid}: {source}")]
    Ptrace { what: &'static str, tid: pid_t, source: io::Error },
    #[error("thread {tid}: {message}")]
    Thread { tid: pid_t, message: String },
    #[error("memory of process {pid} at {addr:#x}: {message}")]
    Memory { pid: pid_t, addr: u64, message: String },
    #[error("process {pid} has a child {child} ({what}): {why}")]
    HasChild { pid: pid_t, child: pid_t, what: String, why: String },
    #[error("process {pid} exited during the event{how}")]
    Gone { pid: pid_t, how: String },
}

impl TraceError {
    /// The process left: `how` from its exit code when it is still a zombie.
    pub fn gone(pid: pid_t) -> TraceError {
        TraceError::Gone { pid, how: exit_of(pid).map(|h| format!(" ({h})")).unwrap_or_default() }
    }

    /// The process left, as a wait `status` of its thread told.
    pub fn ended(pid: pid_t, status: i32) -> TraceError {
        TraceError::Gone { pid, how: format!(" ({})", describe_exit(status)) }
    }

    /// This error, or [`TraceError::Gone`] when the reason is that the process has
    /// died (its memory then reads as an I/O error, which would name the wrong cause).
    pub fn or_gone(self, pid: pid_t) -> TraceError {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) if !matches!(state_of(&stat), Some('Z' | 'X' | 'x')) => self,
            _ => TraceError::gone(pid),
        }
    }
}

/// The state letter of a /proc/PID/stat text (after the command name, which may hold
/// spaces and parentheses).
fn state_of(stat: &str) -> Option<char> {
    stat[stat.rfind(')')? + 1..].split_whitespace().next()?.chars().next()
}

/// How a zombie `pid` ended ("killed by SIGKILL", "exit status 3"), from the exit code
/// /proc/PID/stat keeps until it is reaped.
fn exit_of(pid: pid_t) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let code: i32 = stat[stat.rfind(')')? + 1..].split_whitespace().last()?.parse().ok()?;
    Some(describe_exit(code))
}

/// "killed by SIGKILL" or "exit status 3", from a wait status.
fn describe_exit(code: i32) -> String {
    if libc::WIFSIGNALED(code) {
        let sig = libc::WTERMSIG(code);
        match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => format!("killed by {}", s.as_str()),
            Err(_) => format!("killed by signal {sig}"),
        }
    } else {
        format!("exit status {}", libc::WEXITSTATUS(code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_process_is_named_as_such_with_how_it_ended() {
        let mut child = std::process::Command::new("sleep").arg("100").spawn().unwrap();
        let pid = child.id() as pid_t;
        let io = || TraceError::Memory { pid, addr: 9, message: "Input/output error (os error 5)".into() };
        assert!(matches!(io().or_gone(pid), TraceError::Memory { .. }), "a live process keeps its error");
        child.kill().unwrap();
        // A zombie until reaped: the exit code is still there.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| state_of(&s) != Some('Z')).unwrap_or(false) {
            assert!(std::time::Instant::now() < deadline, "no zombie");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(io().or_gone(pid).to_string(), format!("process {pid} exited during the event (killed by SIGKILL)"));
        child.wait().unwrap();
        assert_eq!(io().or_gone(pid).to_string(), format!("process {pid} exited during the event"));
    }
}
