//! Seccomp under the tracer: every seize asks the kernel to suspend the process's
//! filters while ferry holds it (`PTRACE_O_SUSPEND_SECCOMP`), so that no injected call
//! of ferry's meets them (a filter may kill the process for a `prctl` or an `mmap` of
//! ferry's), and the filters of a stopped thread are read here for the `seccomp`
//! plugin. The suspension ends when the threads are let go (detach, or a post-copy
//! `run_traced`, which sets the options anew): filters a restore installed take
//! effect then, before any code of the process runs.

use super::*;
use crate::kernel::target::seccomp_modes;

/// linux/ptrace.h.
pub const PTRACE_O_SUSPEND_SECCOMP: usize = 1 << 21;
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const PTRACE_SECCOMP_GET_METADATA: libc::c_uint = 0x420d;
/// No thread can hold more: the kernel counts at least four instructions per filter
/// against a limit of 32768 per path.
const MAX_FILTERS: u64 = 8192;
/// BPF_MAXINSNS.
const MAX_INSNS: i64 = 4096;

impl Tracer {
    /// Seizes the first thread of the process with `opts`, adding the suspension of
    /// seccomp where the kernel allows it to this tracer (CAP_SYS_ADMIN,
    /// CONFIG_CHECKPOINT_RESTORE, ferry not under seccomp itself). A process under
    /// seccomp that cannot be suspended is refused before it is touched; any other is
    /// seized without (nothing to suspend). Answers the options for its other threads.
    pub(super) fn seize_first(&mut self, tid: pid_t, opts: usize) -> Result<usize, TraceError> {
        // A restore child (seized to die with ferry) is a fork of ferry: filters it has
        // are ferry's own, which the restored process would keep.
        if opts & libc::PTRACE_O_EXITKILL as usize != 0 {
            if let Some(&(under, _)) = seccomp_modes(self.pid).first() {
                return Err(TraceError::Thread {
                    tid: under,
                    message: "the restore child inherited the seccomp filters ferry itself runs under, which the restored process would keep: run ferry outside seccomp".into(),
                });
            }
        }
        let with = opts | PTRACE_O_SUSPEND_SECCOMP;
        let refused = match ptrace(libc::PTRACE_SEIZE, tid, 0, with, "PTRACE_SEIZE") {
            Ok(_) => {
                self.seccomp_suspended = true;
                return Ok(with);
            }
            Err(TraceError::Ptrace { source, .. }) if matches!(source.raw_os_error(), Some(libc::EPERM | libc::EINVAL)) => source,
            Err(e) => return Err(e),
        };
        ptrace(libc::PTRACE_SEIZE, tid, 0, opts, "PTRACE_SEIZE")?;
        self.seccomp_suspended = false;
        if let Some(&(under, _)) = seccomp_modes(self.pid).first() {
            let _ = ptrace(libc::PTRACE_DETACH, tid, 0, 0, "PTRACE_DETACH");
            return Err(TraceError::Unsuitable {
                pid: self.pid,
                why: format!(
                    "under seccomp (thread {under}), and this kernel does not let ferry suspend its filters while it works \
                     (PTRACE_O_SUSPEND_SECCOMP: {refused}; it needs CAP_SYS_ADMIN, CONFIG_CHECKPOINT_RESTORE and ferry itself \
                     outside seccomp): ferry's injected calls would meet them"
                ),
            });
        }
        Ok(opts)
    }

    /// Whether the process's seccomp filters are suspended while ferry holds it.
    pub fn seccomp_suspended(&self) -> bool {
        self.seccomp_suspended
    }

    /// Thread `tid`'s seccomp filters, the first installed first (the kernel's index 0
    /// is the oldest), each with the flags the kernel reports. Refused when the
    /// filters are not suspended: a plugin would go on to install filters its later
    /// calls would meet.
    pub fn seccomp_filters(&mut self, tid: pid_t) -> Result<Vec<ferry_plugin_api::SeccompFilter>, TraceError> {
        self.thread(tid)?;
        if !self.seccomp_suspended {
            return Err(TraceError::Thread {
                tid,
                message: "ferry could not suspend seccomp in this process (PTRACE_O_SUSPEND_SECCOMP), so it cannot carry its filters".into(),
            });
        }
        let mut out = Vec::new();
        for index in 0..MAX_FILTERS {
            // SAFETY: a NULL buffer asks only for the filter's length.
            let len = unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index as usize as *mut c_void, std::ptr::null_mut::<c_void>()) };
            if len < 0 {
                let e = errno();
                return match e.raw_os_error() {
                    Some(libc::ENOENT) => Ok(out),
                    // Not in filter mode: no filter.
                    Some(libc::EINVAL) if index == 0 => Ok(out),
                    _ => Err(TraceError::Thread { tid, message: format!("reading its seccomp filter {index}: {e}") }),
                };
            }
            if len == 0 || len > MAX_INSNS {
                return Err(TraceError::Thread { tid, message: format!("its seccomp filter {index} has {len} instructions") });
            }
            let mut program = vec![0u8; len as usize * 8];
            let got = ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index as usize, program.as_mut_ptr() as usize, "PTRACE_SECCOMP_GET_FILTER")?;
            if got != len {
                return Err(TraceError::Thread { tid, message: format!("its seccomp filter {index} changed length while read ({len}, then {got})") });
            }
            // struct seccomp_metadata: u64 filter_off (in), u64 flags (out).
            let mut meta = [index, 0u64];
            ptrace(PTRACE_SECCOMP_GET_METADATA, tid, 16, meta.as_mut_ptr() as usize, "PTRACE_SECCOMP_GET_METADATA")?;
            out.push(ferry_plugin_api::SeccompFilter { program: program.into(), flags: meta[1] });
        }
        Err(TraceError::Thread { tid, message: format!("more than {MAX_FILTERS} seccomp filters") })
    }
}
