//! Probes of reaching into another process: seizing it with ptrace, reading and writing its memory.

use super::*;

pub(super) fn ptrace_req(req: libc::c_uint, pid: libc::pid_t, data: usize, what: &str) -> Result<(), String> {
    // SAFETY: these ptrace requests (SEIZE, INTERRUPT, DETACH) take no pointer arguments.
    let r = unsafe { libc::ptrace(req, pid, std::ptr::null_mut::<libc::c_void>(), data) };
    if r < 0 {
        Err(os_err(what))
    } else {
        Ok(())
    }
}

pub(super) fn probe_ptrace_seize() -> ProbeResult {
    let child = Child::spawn()?;
    let start = Instant::now();
    ptrace_req(
        libc::PTRACE_SEIZE,
        child.pid,
        libc::PTRACE_O_EXITKILL as usize,
        "PTRACE_SEIZE",
    )?;
    ptrace_req(libc::PTRACE_INTERRUPT, child.pid, 0, "PTRACE_INTERRUPT")?;
    let status = wait_status(child.pid, Duration::from_secs(2))?;
    let elapsed = start.elapsed();
    if !libc::WIFSTOPPED(status) {
        return Err(format!(
            "child did not stop after PTRACE_INTERRUPT (wait status {status:#x})"
        ));
    }
    let event = (status >> 16) & 0xff;
    if event != libc::PTRACE_EVENT_STOP {
        return Err(format!(
            "stop was not PTRACE_EVENT_STOP (wait status {status:#x})"
        ));
    }
    ptrace_req(libc::PTRACE_DETACH, child.pid, 0, "PTRACE_DETACH")?;
    drop(child);
    Ok(format!(
        "PTRACE_SEIZE + PTRACE_INTERRUPT of a child: PTRACE_EVENT_STOP in {} us, detached",
        elapsed.as_micros()
    ))
}

// ---------------------------------------------------------------------------------------------
// process-vm-readv / writev
// ---------------------------------------------------------------------------------------------

pub(super) fn probe_process_vm() -> ProbeResult {
    let len = 3 * page_size() + 123;
    let pattern: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    // The child is forked after `pattern` exists, so it has the same bytes at the same address.
    let child = Child::spawn()?;
    let remote = pattern.as_ptr() as *mut libc::c_void;

    let mut got = vec![0u8; len];
    pvm_read(child.pid, remote, &mut got)?;
    if got != pattern {
        return Err("process_vm_readv returned bytes that differ from the child's memory".into());
    }

    let new: Vec<u8> = (0..len).map(|i| (i * 13 + 1) as u8).collect();
    let local = libc::iovec {
        iov_base: new.as_ptr() as *mut libc::c_void,
        iov_len: len,
    };
    let rem = libc::iovec {
        iov_base: remote,
        iov_len: len,
    };
    // SAFETY: the local iovec covers `new`, alive for the call; the remote one is in the child.
    let n = unsafe { libc::process_vm_writev(child.pid, &local, 1, &rem, 1, 0) };
    if n < 0 {
        return Err(os_err("process_vm_writev"));
    }
    if n as usize != len {
        return Err(format!("process_vm_writev wrote {n} of {len} bytes"));
    }
    pvm_read(child.pid, remote, &mut got)?;
    if got != new {
        return Err("process_vm_writev: reading back the child's memory gave other bytes".into());
    }
    drop(child);
    Ok(format!(
        "read and wrote back {len} bytes of a child's memory"
    ))
}

pub(super) fn pvm_read(pid: libc::pid_t, remote: *mut libc::c_void, buf: &mut [u8]) -> Result<(), String> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let rem = libc::iovec {
        iov_base: remote,
        iov_len: buf.len(),
    };
    // SAFETY: the local iovec covers `buf`, exclusively borrowed for the call.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &rem, 1, 0) };
    if n < 0 {
        return Err(os_err("process_vm_readv"));
    }
    if n as usize != buf.len() {
        return Err(format!("process_vm_readv read {n} of {} bytes", buf.len()));
    }
    Ok(())
}
