//! A thread's x86 debug registers: DR0–DR3 (breakpoint addresses), DR6 (status) and
//! DR7 (control), read with `PTRACE_PEEKUSER` and written with `PTRACE_POKEUSER` at
//! `offsetof(struct user, u_debugreg)` — the kernel has no register set for them. A
//! hardware breakpoint or watchpoint left armed by a debugger that detached, or set
//! through a helper, is state of the thread like its general registers. Served to the
//! plugins as the pseudo register set [`NT_FERRY_DEBUGREGS`].

use super::*;
pub use ferry_plugin_api::util::NT_FERRY_DEBUGREGS;

/// Where `u_debugreg[0]` sits in `struct user`.
const DEBUGREG_OFFSET: usize = std::mem::offset_of!(libc::user, u_debugreg);
/// DR0–DR3, DR6, DR7: DR4 and DR5 are aliases the kernel refuses.
const READABLE: [usize; 6] = [0, 1, 2, 3, 6, 7];
const WORDS: usize = 8;

/// `PTRACE_PEEKUSER` of debug register `n`: its value is the call's return value, so
/// an error is told by errno alone.
fn peek_debugreg(tid: pid_t, n: usize) -> Result<u64, TraceError> {
    // SAFETY: errno is thread-local; PEEKUSER takes integer arguments only.
    let r = unsafe {
        *libc::__errno_location() = 0;
        libc::ptrace(libc::PTRACE_PEEKUSER, tid, (DEBUGREG_OFFSET + 8 * n) as *mut c_void, std::ptr::null_mut::<c_void>())
    };
    let e = errno();
    if r == -1 && e.raw_os_error() != Some(0) {
        return Err(TraceError::Ptrace { what: "PTRACE_PEEKUSER of a debug register", tid, source: e });
    }
    Ok(r as u64)
}

fn poke_debugreg(tid: pid_t, n: usize, value: u64) -> Result<(), TraceError> {
    ptrace(libc::PTRACE_POKEUSER, tid, DEBUGREG_OFFSET + 8 * n, value as usize, "PTRACE_POKEUSER of a debug register")
        .map(|_| ())
}

impl Tracer {
    /// The debug registers of stopped thread `tid`, eight words DR0–DR7.
    pub(super) fn debugregs(&mut self, tid: pid_t) -> Result<Vec<u8>, TraceError> {
        self.thread(tid)?;
        let mut words = [0u64; WORDS];
        for n in READABLE {
            words[n] = peek_debugreg(tid, n)?;
        }
        Ok(words.iter().flat_map(|w| w.to_le_bytes()).collect())
    }

    /// Gives stopped thread `tid` debug registers `data` (as [`Tracer::debugregs`]
    /// reads them): DR7 is cleared first (an armed breakpoint's address cannot change
    /// under it) and set last.
    pub(super) fn set_debugregs(&mut self, tid: pid_t, data: &[u8]) -> Result<(), TraceError> {
        self.thread(tid)?;
        if data.len() != 8 * WORDS {
            return Err(TraceError::Thread { tid, message: format!("debug registers of {} bytes, want {}", data.len(), 8 * WORDS) });
        }
        let w = |n: usize| u64::from_le_bytes(data[8 * n..8 * n + 8].try_into().expect("8 bytes"));
        if peek_debugreg(tid, 7)? != 0 {
            poke_debugreg(tid, 7, 0)?;
        }
        for n in [0, 1, 2, 3, 6] {
            if w(n) != peek_debugreg(tid, n)? {
                poke_debugreg(tid, n, w(n))?;
            }
        }
        if w(7) != 0 {
            poke_debugreg(tid, 7, w(7))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_debug_registers_sit_where_the_kernel_has_them() {
        // struct user of x86_64: regs (216), u_fpvalid and padding (8), i387 (512),
        // u_tsize/dsize/ssize (24), start_code, start_stack, signal (24), reserved
        // and padding (8), u_ar0, u_fpstate, magic (24), u_comm (32).
        assert_eq!(super::DEBUGREG_OFFSET, 848);
    }
}
