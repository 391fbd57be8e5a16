//! TCP sockets that listen and UDP sockets, read from ferry's copy of the descriptor
//! (`pidfd_getfd`) with `getsockopt`/`getsockname`/`getpeername`: family, bound
//! address, the peer a UDP socket is connected to, a listener's backlog, and the
//! options that matter to them (`SO_REUSEADDR`, `SO_REUSEPORT`, `SO_KEEPALIVE`,
//! `SO_BROADCAST`, `TCP_NODELAY`, `IPV6_V6ONLY`). A listener made again elsewhere takes
//! new connections there; established connections follow on their own (see
//! [`crate::tcp`]), but connections waiting to be accepted cannot, so a listener with
//! any waiting is refused, as is a UDP socket with datagrams queued. (The kernel has no
//! way to put a connection into a listener's accept queue: a copy could have it only as
//! an established socket the process never accepted; and taking one out to read it
//! would lose it for the process should the checkpoint fail. CRIU refuses them too, or
//! drops them with `--skip-in-flight`.)

use std::os::fd::{AsRawFd, OwnedFd};

/// (level, option) pairs copied from a listener to its copy.
pub const OPTIONS: [(i32, i32); 3] = [
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
];
const TCP_OPTIONS: [(i32, i32); 1] = [(libc::IPPROTO_TCP, libc::TCP_NODELAY)];
const UDP_OPTIONS: [(i32, i32); 1] = [(libc::SOL_SOCKET, libc::SO_BROADCAST)];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub family: i32,
    /// `SOCK_STREAM` (a TCP listener) or `SOCK_DGRAM` (UDP).
    pub sock_type: i32,
    /// The bound `sockaddr_in` or `sockaddr_in6`, as the kernel gives it.
    pub addr: Vec<u8>,
    /// The address a UDP socket is connected to.
    pub peer: Option<Vec<u8>>,
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
    let tcp = sock_type == libc::SOCK_STREAM && protocol == libc::IPPROTO_TCP;
    let udp = sock_type == libc::SOCK_DGRAM && protocol == libc::IPPROTO_UDP;
    if !matches!(family, libc::AF_INET | libc::AF_INET6) || !(tcp || udp) {
        return Err(format!("a socket of family {family}, type {sock_type}, protocol {protocol}"));
    }
    let mut backlog = 0;
    if tcp {
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
        let waiting;
        (waiting, backlog) = (u32_at(24), u32_at(28));
        if waiting > 0 {
            return Err(format!("a TCP listener with {waiting} connections waiting to be accepted, which cannot follow it"));
        }
    } else {
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut queued) } < 0 {
            return Err(format!("FIONREAD: {}", std::io::Error::last_os_error()));
        }
        if queued > 0 {
            return Err("a UDP socket with datagrams queued, which cannot follow it".into());
        }
    }
    let name = |f: unsafe extern "C" fn(libc::c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int| {
        let mut addr = [0u8; 128];
        let mut alen = addr.len() as libc::socklen_t;
        // SAFETY: getsockname/getpeername write at most `alen` bytes into `addr`.
        if unsafe { f(fd.as_raw_fd(), addr.as_mut_ptr().cast(), &mut alen) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(addr[..alen as usize].to_vec())
    };
    let addr = name(libc::getsockname).map_err(|e| os("getsockname", e))?;
    let peer = match name(libc::getpeername) {
        Ok(p) => Some(p),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => None,
        Err(e) => return Err(os("getpeername", e)),
    };
    let mut options = Vec::new();
    // IPV6_V6ONLY first: it must be set before bind.
    if family == libc::AF_INET6 {
        let v = int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY).map_err(|e| os("IPV6_V6ONLY", e))?;
        options.push([libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, v]);
    }
    for (level, opt) in OPTIONS.iter().chain(if tcp { &TCP_OPTIONS } else { &UDP_OPTIONS }) {
        let v = int_opt(fd, *level, *opt).map_err(|e| os("getsockopt", e))?;
        if v != 0 {
            options.push([*level, *opt, v]);
        }
    }
    Ok(Listener { family, sock_type, addr, peer, backlog, options })
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

    #[test]
    fn a_udp_socket_keeps_its_address_and_peer_and_refuses_a_queue() {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        u.connect(other.local_addr().unwrap()).unwrap();
        // SAFETY: a duplicate of the socket's fd, owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(libc::dup(u.as_raw_fd())) };
        let d = describe(&fd).unwrap();
        assert_eq!((d.family, d.sock_type), (libc::AF_INET, libc::SOCK_DGRAM));
        assert_eq!(u16::from_be_bytes([d.addr[2], d.addr[3]]), u.local_addr().unwrap().port());
        let peer = d.peer.expect("connected");
        assert_eq!(u16::from_be_bytes([peer[2], peer[3]]), other.local_addr().unwrap().port());
        other.send_to(b"x", u.local_addr().unwrap()).unwrap();
        let mut waited = 0;
        while describe(&fd).is_ok() && waited < 1000 {
            std::thread::sleep(std::time::Duration::from_millis(1));
            waited += 1;
        }
        assert!(describe(&fd).unwrap_err().contains("datagrams queued"));
    }
}
