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
    #[error("process {pid} exited during the event")]
    Gone { pid: pid_t },
}
