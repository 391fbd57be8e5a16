//! What becomes of a seized process if ferry dies while holding it.

use super::{ptrace, seccomp::PTRACE_O_SUSPEND_SECCOMP, TraceError, Tracer};

impl Tracer {
    /// From now on the kernel kills the process if ferry dies before letting it go
    /// (`PTRACE_O_EXITKILL`): the source of a migration once it committed, whose copy
    /// runs on the destination — ferry's death must not leave two copies running.
    /// Letting it go as usual (`detach`) drops the option with the tracing.
    pub fn die_with_ferry(&mut self) -> Result<(), TraceError> {
        // The image is complete: the internal context's agent has done its part, and
        // every thread must be in a ptrace stop for its options.
        self.remove_agent()?;
        let mut opts = (libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_EXITKILL) as usize;
        if self.seccomp_suspended {
            opts |= PTRACE_O_SUSPEND_SECCOMP;
        }
        for tid in self.tids() {
            ptrace(libc::PTRACE_SETOPTIONS, tid, 0, opts, "PTRACE_SETOPTIONS")?;
        }
        Ok(())
    }
}
