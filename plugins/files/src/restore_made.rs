//! Restart of the descriptions made rather than opened: eventfds, timerfds,
//! signalfds and epoll instances, and sockets made again from their names (listening
//! TCP sockets, UDP sockets, Unix listeners and datagram sockets).

use super::*;

impl Restore {
    /// Makes an eventfd, timerfd, signalfd or epoll instance and puts it at its numbers;
    /// an epoll instance's watches wait for [`Restore::finish`], when every file they
    /// name is back.
    pub(super) fn start_event_fd(&mut self, ctx: &mut ContextRef<'_>, what: &str, desc: &Desc) -> Result<(), String> {
        // The creation flags take O_NONBLOCK and O_CLOEXEC's values.
        let nonblock = (desc.flags & libc::O_NONBLOCK as u32) as u64 | libc::O_CLOEXEC as u64;
        let mut scratch = Scratch::new(ctx);
        let fd = match &desc.object {
            Object::Eventfd { count, semaphore } => {
                let fd = sys(ctx, &format!("{what}: eventfd2"), libc::SYS_eventfd2, [0, nonblock | u64::from(*semaphore), 0, 0, 0, 0])? as i32;
                if *count > 0 {
                    let at = scratch.put(ctx, &count.to_le_bytes())?;
                    sys(ctx, &format!("{what}: writing its count {count}"), libc::SYS_write, [fd_arg(fd), at, 8, 0, 0, 0])?;
                }
                fd
            }
            Object::Timerfd { clock, value, interval, ticks } => {
                let fd = sys(ctx, &format!("{what}: timerfd_create"), libc::SYS_timerfd_create, [*clock as u64, nonblock, 0, 0, 0, 0])? as i32;
                // A periodic timer that expired and was not read yet shows no time left:
                // the kernel re-arms it on the read. It goes on one interval from now.
                let value = if *value == [0, 0] { *interval } else { *value };
                if value != [0, 0] {
                    let its: Vec<u8> = [interval[0], interval[1], value[0], value[1]].iter().flat_map(|v| v.to_le_bytes()).collect();
                    let at = scratch.put(ctx, &its)?;
                    sys(ctx, &format!("{what}: timerfd_settime"), libc::SYS_timerfd_settime, [fd_arg(fd), 0, at, 0, 0, 0])?;
                }
                if *ticks > 0 {
                    // After settime, which clears them: the expirations not read yet.
                    let at = scratch.put(ctx, &ticks.to_le_bytes())?;
                    sys(ctx, &format!("{what}: setting {ticks} unread expirations"), libc::SYS_ioctl, [fd_arg(fd), ferry_plugin_api::util::TFD_IOC_SET_TICKS, at, 0, 0, 0])?;
                }
                fd
            }
            Object::Signalfd { mask } => {
                let at = scratch.put(ctx, &mask.to_le_bytes())?;
                sys(ctx, &format!("{what}: signalfd4"), libc::SYS_signalfd4, [u64::MAX, at, 8, nonblock, 0, 0])? as i32
            }
            Object::Epoll { watches } => {
                let fd = sys(ctx, &format!("{what}: epoll_create1"), libc::SYS_epoll_create1, [libc::O_CLOEXEC as u64, 0, 0, 0, 0, 0])? as i32;
                self.epolls.push((desc.fds[0].fd, what.to_string(), watches.clone()));
                fd
            }
            _ => return Err(format!("internal error: {what} is not an event fd")),
        };
        let h = self.placer.adopt(fd);
        self.placer.place(ctx, what, h, &desc.fds)?;
        self.placer.release(ctx, h)?;
        self.status.entities_done += 1;
        Ok(())
    }

    /// Gives socket `fd` (placer handle `h`) its status flags and its fd numbers.
    pub(crate) fn finish_socket(&mut self, ctx: &mut ContextRef<'_>, what: &str, desc: &Desc, fd: i32, h: usize) -> Result<(), String> {
        let setfl = desc.flags & PIPE_SETFL;
        if setfl != 0 {
            set_status_flags(ctx, what, fd, setfl)?;
        }
        self.placer.place(ctx, what, h, &desc.fds)?;
        self.placer.release(ctx, h)?;
        self.status.entities_done += 1;
        Ok(())
    }

    /// Makes a socket again from its names (bound, listening or connected) and puts it
    /// at its numbers.
    pub(super) fn start_named_socket(&mut self, ctx: &mut ContextRef<'_>, what: &str, desc: &Desc) -> Result<(), String> {
        match &desc.object {
            Object::Inet { family, sock_type, addr, peer, backlog, options } => {
                let proto = if *sock_type == libc::SOCK_STREAM { libc::IPPROTO_TCP } else { libc::IPPROTO_UDP };
                let fd = sys(ctx, &format!("{what}: socket"), libc::SYS_socket, [*family as u64, (*sock_type | libc::SOCK_CLOEXEC) as u64, proto as u64, 0, 0, 0])? as i32;
                let h = self.placer.adopt(fd);
                let mut scratch = Scratch::new(ctx);
                for [level, name, value] in options {
                    let at = scratch.put(ctx, &value.to_le_bytes())?;
                    sys(ctx, &format!("{what}: setsockopt({level}, {name})"), libc::SYS_setsockopt, [fd_arg(fd), *level as u64, *name as u64, at, 4, 0])?;
                }
                let bytes = ferry_plugin_api::util::from_hex(addr, what, 128, false)?;
                // Port 0: a socket never bound (a UDP socket that only sends, say).
                if bytes.get(2..4) != Some(&[0, 0]) {
                    let at = scratch.put(ctx, &bytes)?;
                    sys(ctx, &format!("{what}: bind"), libc::SYS_bind, [fd_arg(fd), at, bytes.len() as u64, 0, 0, 0])?;
                }
                if *sock_type == libc::SOCK_STREAM {
                    sys(ctx, &format!("{what}: listen"), libc::SYS_listen, [fd_arg(fd), *backlog as u64, 0, 0, 0, 0])?;
                } else if let Some(peer) = peer {
                    let bytes = ferry_plugin_api::util::from_hex(peer, what, 128, false)?;
                    let at = scratch.put(ctx, &bytes)?;
                    sys(ctx, &format!("{what}: connect"), libc::SYS_connect, [fd_arg(fd), at, bytes.len() as u64, 0, 0, 0])?;
                }
                self.finish_socket(ctx, what, desc, fd, h)?;
            }
            Object::UnixSocket { sock_type, addr, mode, peer, backlog, unlinked } => {
                let fd = sys(ctx, &format!("{what}: socket"), libc::SYS_socket, [libc::AF_UNIX as u64, (*sock_type | libc::SOCK_CLOEXEC) as u64, 0, 0, 0, 0])? as i32;
                let h = self.placer.adopt(fd);
                let mut scratch = Scratch::new(ctx);
                if let Some(addr) = addr {
                    let bytes = ferry_plugin_api::util::from_hex(addr, what, crate::model::UNIX_ADDR_MAX, false)?;
                    let at = scratch.put(ctx, &bytes)?;
                    // A path: `sun_path` from offset 2, NUL-terminated (checked when read).
                    let path = mode.map(|_| at + 2);
                    if let Some(path) = path {
                        // The socket file the process this image is of left behind keeps
                        // the name taken; anything else there is not ferry's to remove.
                        let st = scratch.alloc(STAT_SIZE as u64)?;
                        let tid = ctx.pid();
                        let found = syscall_raw(ctx, tid, libc::SYS_newfstatat, [libc::AT_FDCWD as u64, path, st, libc::AT_SYMLINK_NOFOLLOW as u64, 0, 0])?;
                        if found == 0 && read_stat(ctx, st)?.st_mode & libc::S_IFMT == libc::S_IFSOCK {
                            sys(ctx, &format!("{what}: removing its old socket file"), libc::SYS_unlinkat, [libc::AT_FDCWD as u64, path, 0, 0, 0, 0])?;
                        }
                    }
                    let tid = ctx.pid();
                    let r = syscall_raw(ctx, tid, libc::SYS_bind, [fd_arg(fd), at, bytes.len() as u64, 0, 0, 0])?;
                    if r == -(libc::EADDRINUSE as i64) && *unlinked {
                        let name = String::from_utf8_lossy(&bytes[2..bytes.len() - 1]);
                        return Err(format!(
                            "restored process {tid}: {what}: its name {name}, whose file the process had removed, is taken: bound again only where it is free"
                        ));
                    }
                    if r < 0 {
                        return Err(format!("{what}: bind: {}", std::io::Error::from_raw_os_error(-r as i32)));
                    }
                    if let (Some(path), Some(mode)) = (path, mode) {
                        sys(ctx, &format!("{what}: chmod {mode:o}"), libc::SYS_fchmodat, [libc::AT_FDCWD as u64, path, *mode as u64, 0, 0, 0])?;
                    }
                    if *unlinked {
                        // Bound to the name with no file, as the process left it.
                        sys(ctx, &format!("{what}: removing the socket file of its bind"), libc::SYS_unlinkat, [AT_FDCWD, at + 2, 0, 0, 0, 0])?;
                    }
                }
                if let Some(backlog) = backlog {
                    sys(ctx, &format!("{what}: listen"), libc::SYS_listen, [fd_arg(fd), *backlog as u64, 0, 0, 0, 0])?;
                }
                if let Some(peer) = peer {
                    // Once every socket is bound: its peer may be one of the process's own.
                    let bytes = ferry_plugin_api::util::from_hex(peer, what, crate::model::UNIX_ADDR_MAX, false)?;
                    self.connects.push((desc.fds[0].fd, bytes, what.to_string()));
                }
                self.finish_socket(ctx, what, desc, fd, h)?;
            }
            _ => return Err(format!("internal error: {what} is not a socket made by name")),
        }
        Ok(())
    }
}
