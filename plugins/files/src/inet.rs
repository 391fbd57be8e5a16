//! TCP sockets that listen, read from ferry's copy of the descriptor (`pidfd_getfd`)
//! with `getsockopt`/`getsockname`: family, bound address, backlog, the options a
//! listener passes on (`SO_REUSEADDR`, `SO_REUSEPORT`, `SO_KEEPALIVE`, `TCP_NODELAY`,
//! `IPV6_V6ONLY`). A listener made again elsewhere takes new connections there; the
//! connections already established, or waiting to be accepted, cannot follow (that
//! needs `TCP_REPAIR`), so a listener with any waiting is refused.

use std::os::fd::{AsRawFd, OwnedFd};

/// (level, option) pairs copied from a listener to its copy.
pub const OPTIONS: [(i32, i32); 4] = [
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub family: i32,
    /// The bound `sockaddr_in` or `sockaddr_in6`, as the kernel gives it.
    pub addr: Vec<u8>,
    pub backlog: u32,
    /// (level, option, value), in the order to set them.
    pub options: Vec<[i32; 3]>,
}

fn int_opt(fd: &OwnedFd, level: i32, name: i32) -> std::io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int into `v`.
    if unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&mut v as *mut libc::c_int).cast(), &mut len) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

/// What listener `fd` is; `Err` with the reason when it is a socket this plugin
/// cannot move (the caller names the fd).
pub fn describe(fd: &OwnedFd) -> Result<Listener, String> {
    let os = |what: &str, e: std::io::Error| format!("{what}: {e}");
    let family = int_opt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).map_err(|e| os("SO_DOMAIN", e))?;
    let sock_type = int_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE).map_err(|e| os("SO_TYPE", e))?;
    let protocol = int_opt(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL).map_err(|e| os("SO_PROTOCOL", e))?;
    if !matches!(family, libc::AF_INET | libc::AF_INET6) || sock_type != libc::SOCK_STREAM || protocol != libc::IPPROTO_TCP {
        return Err(format!("a socket of family {family}, type {sock_type}, protocol {protocol}"));
    }
    if int_opt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN).map_err(|e| os("SO_ACCEPTCONN", e))? != 1 {
        return Err("a TCP socket that does not listen (connections need TCP_REPAIR)".into());
    }
    // For a listener the kernel's tcp_info carries the accept queue: tcpi_unacked is
    // how many connections wait, tcpi_sacked the backlog.
    let mut info = [0u8; 104];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`.
    if unsafe { libc::getsockopt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len) } < 0 || len < 32 {
        return Err(format!("TCP_INFO: {}", std::io::Error::last_os_error()));
    }
    let u32_at = |o: usize| u32::from_le_bytes(info[o..o + 4].try_into().expect("4 bytes"));
    let (waiting, backlog) = (u32_at(24), u32_at(28));
    if waiting > 0 {
        return Err(format!("a TCP listener with {waiting} connections waiting to be accepted, which cannot follow it"));
    }
    let mut addr = [0u8; 128];
    let mut alen = addr.len() as libc::socklen_t;
    // SAFETY: getsockname writes at most `alen` bytes into `addr`.
    if unsafe { libc::getsockname(fd.as_raw_fd(), addr.as_mut_ptr().cast(), &mut alen) } < 0 {
        return Err(format!("getsockname: {}", std::io::Error::last_os_error()));
    }
    let mut options = Vec::new();
    // IPV6_V6ONLY first: it must be set before bind.
    if family == libc::AF_INET6 {
        let v = int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY).map_err(|e| os("IPV6_V6ONLY", e))?;
        options.push([libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, v]);
    }
    for (level, name) in OPTIONS {
        let v = int_opt(fd, level, name).map_err(|e| os("getsockopt", e))?;
        if v != 0 {
            options.push([level, name, v]);
        }
    }
    Ok(Listener { family, addr: addr[..alen as usize].to_vec(), backlog, options })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    #[test]
    fn a_listener_is_described_and_a_connected_socket_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        // SAFETY: a duplicate of the listener's fd, owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(libc::dup(l.as_raw_fd())) };
        let d = describe(&fd).unwrap();
        assert_eq!(d.family, libc::AF_INET);
        assert_eq!(u16::from_be_bytes([d.addr[2], d.addr[3]]), port);
        assert!(d.backlog > 0);
        assert!(d.options.contains(&[libc::SOL_SOCKET, libc::SO_REUSEADDR, 1]), "{:?}", d.options);
        // One connection waiting: refused.
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert!(describe(&fd).unwrap_err().contains("1 connections waiting"));
        let (s, _) = l.accept().unwrap();
        // SAFETY: as above.
        let conn = unsafe { OwnedFd::from_raw_fd(libc::dup(s.as_raw_fd())) };
        assert!(describe(&conn).unwrap_err().contains("does not listen"));
    }
}
