//! What the kernel says of a Unix socket, by inode, through `NETLINK_SOCK_DIAG`
//! (`unix_diag`, as `ss -x` asks): its type and state, its peer's inode, its bound
//! name, its shutdown state. The files plugin moves socket pairs whose two ends are
//! both the process's own (a `socketpair`, as Python's asyncio and many event loops
//! keep) or, in a tree, another process's of the tree (`unix_across`), listeners and
//! datagram sockets by their names (an absolute path or an abstract name) and stream
//! sockets never bound nor connected, and refuses every other Unix socket.

use std::{io, os::fd::{AsRawFd, FromRawFd, OwnedFd}};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const UDIAG_SHOW_NAME: u32 = 0x01;
const UDIAG_SHOW_VFS: u32 = 0x02;
const UDIAG_SHOW_PEER: u32 = 0x04;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_VFS: u16 = 1;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_SHUTDOWN: u16 = 6;
/// `TCP_ESTABLISHED`, which a connected Unix socket reports.
pub const ESTABLISHED: u8 = 1;
/// `TCP_LISTEN`, which a listening Unix socket reports.
pub const LISTEN: u8 = 10;
/// `TCP_CLOSE`, which a Unix socket never connected (or disconnected) reports.
pub const CLOSE: u8 = 7;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnixInfo {
    /// `SOCK_STREAM`, `SOCK_DGRAM` or `SOCK_SEQPACKET`.
    pub sock_type: u8,
    pub state: u8,
    /// The connected peer's inode (0: none).
    pub peer: u64,
    /// The bound address, if any (abstract names start with a NUL byte).
    pub name: Option<Vec<u8>>,
    /// Bytes (stream) or the first message's bytes queued for reading; for a
    /// listener, the connections waiting to be accepted.
    pub rqueue: u32,
    /// For a listener, its backlog.
    pub wqueue: u32,
    /// `RCV_SHUTDOWN` (1) | `SEND_SHUTDOWN` (2).
    pub shutdown: u8,
    /// Bound to a path: the inode of the socket file the bind made (its low 32 bits),
    /// which the kernel keeps even once the file was removed.
    pub vfs_ino: Option<u32>,
}

/// Asks the kernel about the Unix socket of inode `ino`; `Ok(None)` when no Unix
/// socket has it (another family).
pub fn query(ino: u64) -> Result<Option<UnixInfo>, String> {
    let err = |what: &str| format!("sock_diag of socket:[{ino}]: {what}: {}", io::Error::last_os_error());
    // SAFETY: plain socket call; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(err("socket"));
    }
    // SAFETY: a fresh fd of ours.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // struct nlmsghdr (16) + struct unix_diag_req (24).
    let mut req = [0u8; 40];
    req[0..4].copy_from_slice(&40u32.to_le_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_le_bytes());
    req[6..8].copy_from_slice(&NLM_F_REQUEST.to_le_bytes());
    req[16] = libc::AF_UNIX as u8;
    req[20..24].copy_from_slice(&u32::MAX.to_le_bytes()); // every state
    req[24..28].copy_from_slice(&(ino as u32).to_le_bytes());
    req[28..32].copy_from_slice(&(UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN).to_le_bytes());
    req[32..40].copy_from_slice(&[0xff; 8]); // no cookie
    // SAFETY: sending our buffer on our socket (to the kernel: no address needed).
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(err("send"));
    }
    let mut buf = vec![0u8; 8192];
    // SAFETY: receiving into our buffer.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(err("recv"));
    }
    parse(&buf[..n as usize], ino)
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

/// Decodes the kernel's answer about socket `ino` (one message).
fn parse(msg: &[u8], ino: u64) -> Result<Option<UnixInfo>, String> {
    let bad = || format!("sock_diag of socket:[{ino}]: a malformed answer");
    if msg.len() < 16 {
        return Err(bad());
    }
    let len = (u32_at(msg, 0) as usize).min(msg.len());
    match u16_at(msg, 4) {
        NLMSG_ERROR => {
            let errno = if len >= 20 { -(u32_at(msg, 16) as i32) } else { 0 };
            // ENOENT: no Unix socket has that inode.
            return if errno == libc::ENOENT {
                Ok(None)
            } else {
                Err(format!("sock_diag of socket:[{ino}]: {}", io::Error::from_raw_os_error(errno)))
            };
        }
        SOCK_DIAG_BY_FAMILY => {}
        _ => return Err(bad()),
    }
    // struct unix_diag_msg (16 bytes) after the header, then attributes.
    if len < 32 || u32_at(msg, 16 + 4) as u64 != ino & 0xffff_ffff {
        return Err(bad());
    }
    let mut info = UnixInfo { sock_type: msg[17], state: msg[18], ..UnixInfo::default() };
    let mut at = 32;
    while at + 4 <= len {
        let alen = u16_at(msg, at) as usize;
        let kind = u16_at(msg, at + 2);
        if alen < 4 || at + alen > len {
            return Err(bad());
        }
        let data = &msg[at + 4..at + alen];
        match kind {
            UNIX_DIAG_NAME => info.name = Some(data.to_vec()),
            UNIX_DIAG_VFS if data.len() >= 4 => info.vfs_ino = Some(u32_at(data, 0)),
            UNIX_DIAG_PEER if data.len() >= 4 => info.peer = u32_at(data, 0) as u64,
            UNIX_DIAG_RQLEN if data.len() >= 8 => (info.rqueue, info.wqueue) = (u32_at(data, 0), u32_at(data, 4)),
            UNIX_DIAG_SHUTDOWN if !data.is_empty() => info.shutdown = data[0],
            _ => {}
        }
        at += (alen + 3) & !3;
    }
    Ok(Some(info))
}

/// A Unix socket the files plugin makes again from its names: a listener (stream or
/// seqpacket, `backlog` set) or a datagram socket, bound to `addr` and/or (datagram)
/// connected to `peer` (`sockaddr_un` bytes: an abstract name, or an absolute path, whose
/// socket file had permission bits `mode`, or was removed since: `unlinked`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub sock_type: i32,
    pub addr: Option<Vec<u8>>,
    pub mode: Option<u32>,
    pub peer: Option<Vec<u8>>,
    pub backlog: Option<u32>,
    pub unlinked: bool,
}

/// The `sockaddr_un` of `name` (as unix_diag gives it), and for a path the permission
/// bits of its socket file as process `pid` sees it, or None when that file was
/// removed (the answer's `true`). `vfs_ino`: the inode of the file the bind made.
fn address(pid: i32, name: &[u8], vfs_ino: Option<u32>) -> Result<(Vec<u8>, Option<u32>, bool), String> {
    let (mode, unlinked) = match name.first() {
        Some(0) => (None, false),
        Some(b'/') => {
            let path = std::str::from_utf8(name.strip_suffix(&[0]).unwrap_or(name))
                .map_err(|_| format!("bound to a path that is not UTF-8 ({name:?})"))?;
            // Bound again before the restore enters the process's root.
            if std::fs::read_link(format!("/proc/{pid}/root")).map_err(|e| e.to_string())? != std::path::Path::new("/") {
                return Err(format!("bound to {path} inside a changed root"));
            }
            match std::fs::symlink_metadata(format!("/proc/{pid}/root{path}")) {
                // The file was removed: the name is bound again and the file removed.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, true),
                Err(e) => return Err(format!("bound to {path}, which cannot be looked at ({e})")),
                Ok(st) => {
                    let ours = vfs_ino.is_none_or(|i| std::os::unix::fs::MetadataExt::ino(&st) as u32 == i);
                    if !std::os::unix::fs::FileTypeExt::is_socket(&st.file_type()) || !ours {
                        return Err(format!("bound to {path}, whose socket file was removed and the name given to another file"));
                    }
                    (Some(std::os::unix::fs::PermissionsExt::mode(&st.permissions()) & 0o7777), false)
                }
            }
        }
        _ => return Err(format!("bound to the relative path {:?}", String::from_utf8_lossy(name))),
    };
    Ok((sockaddr(name), mode, unlinked))
}

/// A `sockaddr_un` holding `name`.
fn sockaddr(name: &[u8]) -> Vec<u8> {
    let mut addr = (libc::AF_UNIX as u16).to_le_bytes().to_vec();
    addr.extend_from_slice(name);
    addr
}

/// Whether socket `info` of process `pid` can be made again from its names (a listener
/// with none waiting; a datagram socket with nothing queued, bound or connected to a
/// bound socket, the peer looked up through `peer_info`); why not if not.
pub fn named(pid: i32, info: &UnixInfo, peer_info: impl FnOnce(u64) -> Result<Option<UnixInfo>, String>) -> Result<Named, String> {
    let (addr, mode, unlinked) = match info.name.as_deref() {
        Some(name) => {
            let (addr, mode, unlinked) = address(pid, name, info.vfs_ino)?;
            (Some(addr), mode, unlinked)
        }
        None => (None, None, false),
    };
    let sock_type = info.sock_type as i32;
    if info.state == LISTEN {
        if info.rqueue > 0 {
            return Err(format!("listening with {} connections waiting", info.rqueue));
        }
        return Ok(Named { sock_type, addr, mode, peer: None, backlog: Some(info.wqueue), unlinked });
    }
    if sock_type != libc::SOCK_DGRAM && info.state == CLOSE && info.peer == 0 && info.name.is_none() && info.shutdown == 0 && info.rqueue == 0 {
        // A stream socket made and never bound nor connected (a JVM keeps one): a fresh
        // one is the same. One whose peer went is ESTABLISHED still, and refused below.
        return Ok(Named { sock_type, addr: None, mode: None, peer: None, backlog: None, unlinked: false });
    }
    if sock_type != libc::SOCK_DGRAM {
        return Err(match info.peer {
            // Connected, its peer gone or out of the kernel's sight here.
            0 if info.state == ESTABLISHED => "connected to a peer that is gone or not shown (no socket inode)".into(),
            0 => "that is not connected".into(),
            peer => format!("connected to socket:[{peer}] (a stream connection, which does not follow)"),
        });
    }
    if info.rqueue > 0 {
        return Err("of datagrams with some queued".into());
    }
    let peer = match info.peer {
        0 => None,
        ino => {
            let name = peer_info(ino)?.and_then(|p| p.name).ok_or_else(|| format!("connected to socket:[{ino}], which has no name"))?;
            if name.first() != Some(&0) && name.first() != Some(&b'/') {
                return Err(format!("connected to the relative path {:?}", String::from_utf8_lossy(&name)));
            }
            Some(sockaddr(&name))
        }
    };
    Ok(Named { sock_type, addr, mode, peer, backlog: None, unlinked })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socketpair_names_its_peer_and_its_queue() {
        let mut fds = [0i32; 2];
        // SAFETY: socketpair fills two ints; both fds are owned right after.
        assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) }, 0);
        // SAFETY: as above.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: writing 5 bytes of a literal on our socket.
        assert_eq!(unsafe { libc::write(b.as_raw_fd(), b"hello".as_ptr().cast(), 5) }, 5);
        // SAFETY: shutting down our own socket.
        unsafe { libc::shutdown(b.as_raw_fd(), libc::SHUT_WR) };
        let ino = |f: &OwnedFd| std::fs::metadata(format!("/proc/self/fd/{}", f.as_raw_fd())).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap();
        let (ia, ib) = (ino(&a), ino(&b));
        let qa = query(ia).unwrap().unwrap();
        assert_eq!((qa.sock_type, qa.state, qa.peer, qa.name.clone(), qa.rqueue), (libc::SOCK_STREAM as u8, ESTABLISHED, ib, None, 5));
        assert_eq!(qa.shutdown, 1, "a's peer stopped sending: a reads no more after the queue");
        assert_eq!(query(ib).unwrap().unwrap().peer, ia);
        // A stream socket never connected: made again as a fresh one.
        // SAFETY: plain socket call; owned right away.
        let lone = unsafe { OwnedFd::from_raw_fd(libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0)) };
        let info = query(ino(&lone)).unwrap().unwrap();
        assert_eq!((info.state, info.peer, info.name.clone()), (CLOSE, 0, None));
        let n = named(1, &info, |_| unreachable!()).unwrap();
        assert_eq!((n.sock_type, n.addr, n.peer, n.backlog), (libc::SOCK_STREAM, None, None, None));
        // One end of a pair whose other end is closed stays refused.
        drop(b);
        let orphan = query(ia).unwrap().unwrap();
        let why = named(1, &orphan, |_| Ok(None)).unwrap_err();
        assert!(why.contains("peer that is gone"), "{orphan:?}: {why}");
        // A pipe's inode is no Unix socket.
        assert_eq!(query(1).unwrap(), None);
    }
}
