//! Probes behind the state of files and timers: POSIX timer ids, timerfd expirations, memfds, `TCP_REPAIR`.

use super::*;

pub(super) fn probe_timer_restore_ids() -> ProbeResult {
    // PR_TIMER_CREATE_RESTORE_IDS_GET: 0 or 1 where the kernel has it (6.16+), EINVAL else.
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(ferry_plugin_api::util::PR_TIMER_CREATE_RESTORE_IDS as libc::c_int, 2, 0, 0, 0) };
    if r < 0 {
        return Err(os_err("prctl(PR_TIMER_CREATE_RESTORE_IDS)"));
    }
    Ok("prctl(PR_TIMER_CREATE_RESTORE_IDS) answers: timer_create can be given an id".into())
}

pub(super) fn probe_timerfd_set_ticks() -> ProbeResult {
    use ferry_plugin_api::util::TFD_IOC_SET_TICKS;
    // SAFETY: timerfd_create with flags only; the fd is owned right away.
    let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC | libc::TFD_NONBLOCK) };
    let fd = own_fd(raw as libc::c_long, "timerfd_create")?;
    let ticks: u64 = 3;
    // SAFETY: the ioctl reads one u64 from `ticks`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS, &ticks) } < 0 {
        return Err(os_err("TFD_IOC_SET_TICKS"));
    }
    let mut got = [0u8; 8];
    std::io::Read::read_exact(&mut File::from(fd), &mut got).map_err(|e| format!("reading the timerfd: {e}"))?;
    match u64::from_ne_bytes(got) {
        3 => Ok("TFD_IOC_SET_TICKS set 3 expirations and a read returned them".into()),
        n => Err(format!("TFD_IOC_SET_TICKS set 3 expirations, a read returned {n}")),
    }
}

// ---------------------------------------------------------------------------------------------
// memfd
// ---------------------------------------------------------------------------------------------

pub(super) fn probe_memfd() -> ProbeResult {
    // SAFETY: the name is a NUL-terminated string.
    let raw = unsafe { libc::memfd_create(c"ferry-check".as_ptr(), libc::MFD_CLOEXEC) };
    let fd = own_fd(raw as libc::c_long, "memfd_create")?;
    let file = File::from(fd);
    let ps = page_size();
    file.set_len(ps as u64)
        .map_err(|e| format!("ftruncate memfd: {e}"))?;
    file.write_all_at(b"ferry", 100)
        .map_err(|e| format!("write memfd: {e}"))?;
    // SAFETY: a shared mapping of the memfd we own, length as set above.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            ps,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(os_err("mmap memfd"));
    }
    let mut seen = [0u8; 5];
    // SAFETY: bytes 100..105 are inside the one-page read-only mapping.
    unsafe { std::ptr::copy_nonoverlapping((p as *const u8).add(100), seen.as_mut_ptr(), 5) };
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(p, ps) };
    if &seen != b"ferry" {
        return Err("a shared mapping of the memfd does not show what was written".into());
    }
    Ok("memfd_create, write, and a shared mapping that shows the data".into())
}

// ---------------------------------------------------------------------------------------------
// TCP_REPAIR
// ---------------------------------------------------------------------------------------------

pub(super) const TCP_REPAIR: libc::c_int = 19;
pub(super) const TCP_REPAIR_QUEUE: libc::c_int = 20;
pub(super) const TCP_QUEUE_SEQ: libc::c_int = 21;
pub(super) const TCP_SEND_QUEUE: libc::c_int = 2;

pub(super) fn setsockopt_int(fd: RawFd, opt: libc::c_int, v: libc::c_int, what: &str) -> Result<(), String> {
    // SAFETY: passes a pointer to a c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            opt,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(os_err(what))
    } else {
        Ok(())
    }
}

pub(super) fn getsockopt_u32(fd: RawFd, opt: libc::c_int, what: &str) -> Result<u32, String> {
    let mut v: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for the kernel to write.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            opt,
            &mut v as *mut u32 as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        Err(os_err(what))
    } else {
        Ok(v)
    }
}

pub(super) fn probe_tcp_repair() -> ProbeResult {
    // SAFETY: socket takes only integer arguments.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    let sock = own_fd(raw as libc::c_long, "socket")?;
    let fd = sock.as_raw_fd();
    setsockopt_int(fd, TCP_REPAIR, 1, "TCP_REPAIR on (needs CAP_NET_ADMIN)")?;
    let r = (|| {
        setsockopt_int(fd, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE")?;
        let seq = 0x1234_5678;
        setsockopt_int(fd, TCP_QUEUE_SEQ, seq, "TCP_QUEUE_SEQ")?;
        let got = getsockopt_u32(fd, TCP_QUEUE_SEQ, "get TCP_QUEUE_SEQ")?;
        if got != seq as u32 {
            return Err(format!("TCP_QUEUE_SEQ set {seq:#x} but reads {got:#x}"));
        }
        Ok(())
    })();
    let off = setsockopt_int(fd, TCP_REPAIR, 0, "TCP_REPAIR off");
    drop(sock);
    r?;
    off?;
    Ok("TCP_REPAIR on a socket: set and read back the send queue sequence".into())
}
