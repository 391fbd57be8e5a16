//! Socket pairs whose two ends are in two processes of a tree (`socketpair`, then a
//! fork after which each keeps one end). Each process's files plugin writes its own
//! end with the bytes queued for it to read. At restore the first of the two rebuilt
//! makes the pair in ferry, takes its end and a duplicate of the other (to put its
//! bytes in through), and leaves the other end here, under that end's inode, with a
//! duplicate of its own; the second takes both from here. Taking is `pidfd_getfd` on
//! ferry, injected in the process being rebuilt (it still runs as root then).
//!
//! Also here: the queue of a socket that keeps messages (datagram, seqpacket), read
//! message by message without consuming it.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::Mutex,
};

use ferry_plugin_api::{util::syscall, ContextRef};

/// The end of a pair left for a process rebuilt later, by its inode in the image:
/// (that end, a duplicate of its peer). One table for every process of a restore
/// (the plugin library is loaded once per ferry).
static LEFT: Mutex<Option<HashMap<u64, (OwnedFd, OwnedFd)>>> = Mutex::new(None);

/// Fds in the process being rebuilt of the end `ino` of a pair whose other end
/// (`peer`) another process of the tree holds, and of a duplicate of that other end;
/// the pair is made here if the other process was not rebuilt before.
pub fn ends(ctx: &mut ContextRef<'_>, what: &str, ino: u64, peer: u64, sock_type: u8) -> Result<(i32, i32), String> {
    let left = LEFT.lock().map_err(|_| "internal error: the table of socket ends is poisoned".to_string())?.get_or_insert_with(HashMap::new).remove(&ino);
    let (mine, other) = match left {
        Some(pair) => pair,
        None => {
            let mut fds = [0 as libc::c_int; 2];
            // SAFETY: socketpair fills the two ints of `fds`.
            if unsafe { libc::socketpair(libc::AF_UNIX, sock_type as i32 | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) } != 0 {
                return Err(format!("{what}: socketpair in ferry: {}", io::Error::last_os_error()));
            }
            // SAFETY: both fds were just made and are ours.
            let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            let dup = |f: &OwnedFd| f.try_clone().map_err(|e| format!("{what}: duplicating a socket in ferry: {e}"));
            let (a2, b2) = (dup(&a)?, dup(&b)?);
            LEFT.lock().map_err(|_| "internal error: the table of socket ends is poisoned".to_string())?.get_or_insert_with(HashMap::new).insert(peer, (b, a2));
            (a, b2)
        }
    };
    Ok((give(ctx, what, &mine)?, give(ctx, what, &other)?))
}

/// Forgets the ends left by a restore that failed.
pub fn forget() {
    if let Ok(mut t) = LEFT.lock() {
        *t = None;
    }
}

/// A duplicate of ferry's `fd` in the process being rebuilt (close-on-exec).
fn give(ctx: &mut ContextRef<'_>, what: &str, fd: &OwnedFd) -> Result<i32, String> {
    let tid = ctx.pid();
    let ferry = std::process::id() as u64;
    let pfd = syscall(ctx, tid, &format!("{what}: pidfd_open of ferry"), libc::SYS_pidfd_open, [ferry, 0, 0, 0, 0, 0])?;
    let got = syscall(ctx, tid, &format!("{what}: pidfd_getfd of its end from ferry"), libc::SYS_pidfd_getfd, [pfd, fd.as_raw_fd() as u64, 0, 0, 0, 0]);
    syscall(ctx, tid, &format!("{what}: closing the pidfd of ferry"), libc::SYS_close, [pfd, 0, 0, 0, 0, 0])?;
    Ok(got? as i32)
}

/// SO_PEEK_OFF (42): where the next MSG_PEEK reads from, moved past each message read.
const SO_PEEK_OFF: i32 = 42;

/// Every message queued for reading at `sock` (ferry's duplicate of a socket of
/// messages), in order, not consumed: peeked one after another with SO_PEEK_OFF, which
/// is put back as it was. Refused: a message of no bytes (no record can carry it) and
/// one with fds or credentials.
pub fn peek_messages(sock: &OwnedFd, what: &str) -> Result<Vec<Vec<u8>>, String> {
    let fd = sock.as_raw_fd();
    let opt = |name: &str| format!("{what}: {name}: {}", io::Error::last_os_error());
    let (mut was, mut len) = (0 as libc::c_int, std::mem::size_of::<libc::c_int>() as libc::socklen_t);
    // SAFETY: getsockopt writes one int of ours.
    if unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, SO_PEEK_OFF, (&mut was as *mut libc::c_int).cast(), &mut len) } != 0 {
        return Err(opt("SO_PEEK_OFF"));
    }
    let set = |v: libc::c_int| {
        // SAFETY: setsockopt reads one int of ours.
        unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, SO_PEEK_OFF, (&v as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t) }
    };
    if set(0) != 0 {
        return Err(opt("setting SO_PEEK_OFF"));
    }
    let got = peek_all(fd, what);
    if set(was) != 0 {
        return Err(opt("putting SO_PEEK_OFF back"));
    }
    got
}

fn peek_all(fd: i32, what: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut messages = Vec::new();
    let mut total = 0usize;
    // Larger than a socket's send buffer lets a message be, and small enough that the
    // restore writes it through its scratch area in one call.
    let mut buf = vec![0u8; 512 << 10];
    loop {
        let mut control = [0u8; 256];
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: msghdr is plain data; its pointers stay valid for the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
        // SAFETY: recvmsg into our buffers.
        let r = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_TRUNC) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                return Ok(messages);
            }
            return Err(format!("{what}: peeking at message {} of its queue: {e}", messages.len() + 1));
        }
        let n = r as usize;
        if msg.msg_controllen > 0 {
            return Err(format!("{what}: a message of its queue carries fds or credentials: not supported by the files plugin"));
        }
        if n == 0 || n > buf.len() {
            return Err(format!("{what}: a message of {n} bytes in its queue: not supported by the files plugin"));
        }
        total += n;
        if total as u64 > crate::model::MAX_PIPE_SIZE {
            return Err(format!("{what}: more than {} bytes queued", crate::model::MAX_PIPE_SIZE));
        }
        messages.push(buf[..n].to_vec());
    }
}
