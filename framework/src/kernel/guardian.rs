//! A guardian outlives ferry to put back what ferry changed outside the target's
//! memory when ferry dies before it could (killed, out of memory): a process moved
//! into a cgroup of ferry's (to freeze or to throttle it) goes back to its own, thawed,
//! and ferry's cgroup goes. The guardian is a forked child in a session of its own,
//! holding nothing of ferry's but one end of a pipe and a pidfd of ferry: when ferry
//! exits (the pidfd, which a child ferry forks without exec — a probe's, holding the
//! pipe's other end open — cannot hide) or the pipe closes without a word, it acts;
//! told "done", it leaves quietly.

use std::{ffi::CString, os::unix::ffi::OsStrExt, path::Path};

/// Writes the guardian makes, in order, and the directory it removes after.
pub struct Undo {
    pub writes: Vec<(std::path::PathBuf, String)>,
    pub remove: std::path::PathBuf,
}

pub struct Guardian {
    pid: libc::pid_t,
    /// Ferry's end of the pipe.
    fd: libc::c_int,
}

fn cstring(p: &Path) -> Option<CString> {
    CString::new(p.as_os_str().as_bytes()).ok()
}

impl Guardian {
    /// Starts a guardian that carries out `undo` if ferry dies before dropping it.
    pub fn start(undo: &Undo) -> std::io::Result<Guardian> {
        // Everything the child needs is made before the fork: after it, in a copy of a
        // multithreaded process, only raw system calls.
        let writes: Vec<(CString, Vec<u8>)> =
            undo.writes.iter().filter_map(|(p, v)| Some((cstring(p)?, v.as_bytes().to_vec()))).collect();
        let remove = cstring(&undo.remove).ok_or_else(|| std::io::Error::other("a path with a NUL byte"))?;
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-int array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (read_end, write_end) = (fds[0], fds[1]);
        // SAFETY: pidfd_open of our own pid; -1 (then the pipe alone tells) on failure.
        let ferry = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) } as libc::c_int;
        // SAFETY: the child makes only raw system calls and leaves by _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: closing our own pipe.
            unsafe {
                libc::close(read_end);
                libc::close(write_end);
                if ferry >= 0 {
                    libc::close(ferry);
                }
            }
            return Err(e);
        }
        if pid == 0 {
            // SAFETY: raw system calls on memory made before the fork.
            unsafe { guard(read_end, ferry, &writes, &remove) }
        }
        // SAFETY: the child's end and pidfd, ours to close.
        unsafe {
            libc::close(read_end);
            if ferry >= 0 {
                libc::close(ferry);
            }
        }
        Ok(Guardian { pid, fd: write_end })
    }

}

/// Dropping the guardian tells it ferry put everything back itself: it leaves quietly.
impl Drop for Guardian {
    fn drop(&mut self) {
        // SAFETY: one byte to our pipe, then our fd closed and our child reaped.
        unsafe {
            libc::write(self.fd, b"d".as_ptr().cast(), 1);
            libc::close(self.fd);
            let mut status = 0;
            libc::waitpid(self.pid, &mut status, 0);
        }
    }
}

/// The guardian's life: waits for a word or for the pipe to close, and acts on the
/// latter. Never returns.
///
/// # Safety
/// Runs in a forked child of a multithreaded process: raw system calls only.
unsafe fn guard(read_end: libc::c_int, ferry: libc::c_int, writes: &[(CString, Vec<u8>)], remove: &CString) -> ! {
    // Its own session: a signal to ferry's process group does not reach it. Nothing of
    // ferry's held open (a connection kept alive would hide ferry's death from its peer).
    libc::setsid();
    let (low, high) = (read_end.min(ferry.max(read_end)), read_end.max(ferry));
    libc::syscall(libc::SYS_close_range, 0, low as u32 - 1, 0);
    if high > low {
        libc::syscall(libc::SYS_close_range, low as u32 + 1, high as u32 - 1, 0);
    }
    libc::syscall(libc::SYS_close_range, high as u32 + 1, u32::MAX, 0);
    let mut fds = [
        libc::pollfd { fd: read_end, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: ferry, events: libc::POLLIN, revents: 0 },
    ];
    let mut byte = 0u8;
    let n = loop {
        // A pidfd turns readable when ferry has exited; a negative fd is ignored.
        let r = libc::poll(fds.as_mut_ptr(), 2, -1);
        if r < 0 {
            if *libc::__errno_location() == libc::EINTR {
                continue;
            }
            break 0;
        }
        if fds[0].revents != 0 {
            let n = libc::read(read_end, (&mut byte as *mut u8).cast(), 1);
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            break n;
        }
        if fds[1].revents != 0 {
            break 0;
        }
    };
    if n == 0 {
        // Ferry is gone without a word: put things back.
        for (path, value) in writes {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
            if fd >= 0 {
                libc::write(fd, value.as_ptr().cast(), value.len());
                libc::close(fd);
            }
        }
        // The cgroup empties as the process's move completes.
        for _ in 0..2500 {
            if libc::rmdir(remove.as_ptr()) == 0 {
                break;
            }
            let pause = libc::timespec { tv_sec: 0, tv_nsec: 2_000_000 };
            libc::nanosleep(&pause, std::ptr::null_mut());
        }
    }
    libc::_exit(0)
}
