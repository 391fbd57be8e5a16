//! Restart: rebuilds the fd table, cwd, root and umask of the restore child by system
//! calls injected into its main thread. The first call reads the header and closes
//! every fd the child inherited; each later call rebuilds descriptions and pipes
//! within a byte budget; the last sets cwd, root and umask.
//!
//! New fds land on the lowest free number, which may be one the image wants for a
//! later description. So every fd the plugin opens is a *temporary* tracked by
//! [`Placer`]; it is `dup3`'d onto its recorded numbers (or kept where it landed when
//! that is one of them), and a temporary that sits on a number about to be placed is
//! moved out of the way first.

use std::collections::{HashMap, HashSet};

use ferry_plugin_api::{
    util::{expect_json, next_record, parse_json, read_memory, syscall, syscall_raw, Scratch},
    ContextRef, Progress, RecordFormat, SourceRef, Status,
};

#[path = "restore_gone.rs"]
mod gone;
#[path = "restore_made.rs"]
mod made;
#[path = "restore_tty.rs"]
mod tty;

use crate::{
    checkpoint::object_name,
    locks::Lock,
    model::{
        check_chunk, Desc, Header, Object, PipeRec, Slot, Watch, KIND_DESC, KIND_DESC_DATA, KIND_HEADER, KIND_PIPE,
        KIND_PIPE_DATA,
    },
    scan::type_name,
};

/// Content bytes written into the child per call at most (one chunk may overshoot).
const BUDGET: u64 = 16 << 20;
/// Descriptions rebuilt per call at most.
const OBJECTS_PER_CALL: usize = 64;
const AT_FDCWD: u64 = libc::AT_FDCWD as i64 as u64;
/// `__O_TMPFILE`: never reopen with it (it would make a new file).
const O_TMPFILE_BIT: u32 = 0o20000000;
/// The status flags F_SETFL can set on a pipe end.
const PIPE_SETFL: u32 = (libc::O_APPEND | libc::O_NONBLOCK) as u32;
const MFD_CLOEXEC: u64 = 1;
const MFD_ALLOW_SEALING: u64 = 2;

fn sys(ctx: &mut ContextRef<'_>, what: &str, nr: i64, args: [u64; 6]) -> Result<u64, String> {
    let tid = ctx.pid();
    syscall(ctx, tid, what, nr, args)
}

fn fd_arg(fd: i32) -> u64 {
    fd as i64 as u64
}

/// `fcntl(fd, F_SETFL, flags)` in the child: a description's status flags.
fn set_status_flags(ctx: &mut ContextRef<'_>, what: &str, fd: i32, flags: u32) -> Result<(), String> {
    sys(ctx, &format!("{what}: F_SETFL"), libc::SYS_fcntl, [fd_arg(fd), libc::F_SETFL as u64, flags as u64, 0, 0, 0]).map(|_| ())
}

/// The flags to reopen a description with: as recorded, less what only makes sense
/// at creation, plus O_NOCTTY (never acquire a terminal) and O_CLOEXEC (a temporary).
pub fn open_flags(flags: u32) -> u32 {
    let strip = (libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC) as u32 | O_TMPFILE_BIT;
    (flags & !strip) | (libc::O_NOCTTY | libc::O_CLOEXEC) as u32
}

/// `openat(AT_FDCWD, path, flags, mode)` in the child; answers the raw result.
fn open_raw(ctx: &mut ContextRef<'_>, path: &str, flags: u32, mode: u32) -> Result<i64, String> {
    let mut scratch = Scratch::new(ctx);
    let addr = scratch.cstr(ctx, path)?;
    let tid = ctx.pid();
    syscall_raw(ctx, tid, libc::SYS_openat, [AT_FDCWD, addr, flags as u64, mode as u64, 0, 0])
}

fn open(ctx: &mut ContextRef<'_>, what: &str, path: &str, flags: u32) -> Result<i32, String> {
    let r = open_raw(ctx, path, flags, 0)?;
    if r < 0 {
        return Err(format!(
            "{what}: opening {path} (flags {flags:#o}): {}",
            std::io::Error::from_raw_os_error(-r as i32)
        ));
    }
    Ok(r as i32)
}

const STAT_SIZE: usize = std::mem::size_of::<libc::stat>();

/// The `struct stat` the kernel wrote at `addr` of the child.
fn read_stat(ctx: &mut ContextRef<'_>, addr: u64) -> Result<libc::stat, String> {
    let raw = read_memory(ctx, addr, STAT_SIZE)?;
    // SAFETY: `raw` holds STAT_SIZE bytes written by the kernel as a struct stat;
    // read_unaligned copes with the Vec's alignment.
    Ok(unsafe { std::ptr::read_unaligned(raw.as_ptr() as *const libc::stat) })
}

/// Checks that fd `fd` of the child is the kind of file the image recorded; answers its stat.
fn check_type(ctx: &mut ContextRef<'_>, what: &str, fd: i32, mode: u32, rdev: u64) -> Result<libc::stat, String> {
    let mut scratch = Scratch::new(ctx);
    let addr = scratch.alloc(STAT_SIZE as u64)?;
    sys(ctx, &format!("{what}: fstat"), libc::SYS_fstat, [fd_arg(fd), addr, 0, 0, 0, 0])?;
    let st = read_stat(ctx, addr)?;
    let (want, got) = (mode & libc::S_IFMT, st.st_mode & libc::S_IFMT);
    if want != got {
        return Err(format!("{what}: it is now a {}, it was a {}", type_name(got), type_name(want)));
    }
    if (want == libc::S_IFCHR || want == libc::S_IFBLK) && st.st_rdev != rdev {
        return Err(format!(
            "{what}: it is now device {}:{}, it was {}:{}",
            libc::major(st.st_rdev),
            libc::minor(st.st_rdev),
            libc::major(rdev),
            libc::minor(rdev)
        ));
    }
    Ok(st)
}

fn seek(ctx: &mut ContextRef<'_>, what: &str, fd: i32, pos: i64, flags: u32) -> Result<(), String> {
    if pos == 0 || flags & libc::O_PATH as u32 != 0 {
        return Ok(());
    }
    let tid = ctx.pid();
    let r = syscall_raw(ctx, tid, libc::SYS_lseek, [fd_arg(fd), pos as u64, libc::SEEK_SET as u64, 0, 0, 0])?;
    if r == -(libc::ESPIPE as i64) {
        return Ok(()); // a device without offsets
    }
    if r != pos {
        let why =
            if r < 0 { std::io::Error::from_raw_os_error(-r as i32).to_string() } else { format!("landed at {r}") };
        return Err(format!("{what}: lseek to {pos}: {why}"));
    }
    Ok(())
}

/// Writes `data` into fd `fd` of the child, through the scratch area.
fn write_all(ctx: &mut ContextRef<'_>, what: &str, fd: i32, data: &[u8]) -> Result<(), String> {
    let mut done = 0;
    while done < data.len() {
        let mut scratch = Scratch::new(ctx);
        let room = scratch.room().min(usize::MAX as u64) as usize;
        if room == 0 {
            return Err(format!("{what}: the framework gave no scratch area to write data through"));
        }
        let piece = &data[done..data.len().min(done + room)];
        let addr = scratch.put(ctx, piece)?;
        let mut off = 0;
        while off < piece.len() {
            let n = sys(
                ctx,
                &format!("{what}: write"),
                libc::SYS_write,
                [fd_arg(fd), addr + off as u64, (piece.len() - off) as u64, 0, 0, 0],
            )?;
            if n == 0 {
                return Err(format!("{what}: write took no bytes"));
            }
            off += n as usize;
        }
        done += piece.len();
    }
    Ok(())
}

/// Takes `lock` again through fd `fd` of the child, without waiting: a conflicting
/// lock held elsewhere fails the restore, naming the process, the fd and the lock.
fn take_lock(ctx: &mut ContextRef<'_>, fd: i32, what: &str, lock: &Lock) -> Result<(), String> {
    let (nr, arg, by_struct) = lock.call();
    let third = if by_struct { Scratch::new(ctx).put(ctx, &lock.flock_struct())? } else { 0 };
    let tid = ctx.pid();
    let r = syscall_raw(ctx, tid, nr, [fd_arg(fd), arg, third, 0, 0, 0])?;
    if r < 0 {
        let errno = -r as i32;
        let why = if [libc::EAGAIN, libc::EACCES].contains(&errno) {
            "another process holds a conflicting lock (within one machine, a migration's source still holds its own)".to_string()
        } else {
            std::io::Error::from_raw_os_error(errno).to_string()
        };
        return Err(format!("restored process {tid}: {what}: its {lock} cannot be taken again: {why}"));
    }
    Ok(())
}

/// The fds the plugin opened in the child that are not (yet) where they belong.
#[derive(Default)]
struct Placer {
    /// Handle -> current fd number of a temporary; None once released.
    temps: Vec<Option<i32>>,
    /// Fd numbers already rebuilt.
    placed: HashSet<i32>,
}

impl Placer {
    fn adopt(&mut self, fd: i32) -> usize {
        self.temps.push(Some(fd));
        self.temps.len() - 1
    }

    fn fd(&self, h: usize) -> Result<i32, String> {
        self.temps.get(h).copied().flatten().ok_or_else(|| format!("internal error: temporary fd #{h} is gone"))
    }

    /// Makes every slot refer to temporary `h`'s description, with its cloexec bit.
    fn place(&mut self, ctx: &mut ContextRef<'_>, what: &str, h: usize, slots: &[Slot]) -> Result<(), String> {
        for s in slots {
            let src = self.fd(h)?;
            if self.placed.contains(&s.fd) {
                return Err(format!("{what}: fd {} was rebuilt already", s.fd));
            }
            if s.fd == src {
                let flag = if s.cloexec { libc::FD_CLOEXEC } else { 0 } as u64;
                sys(
                    ctx,
                    &format!("{what}: F_SETFD on fd {}", s.fd),
                    libc::SYS_fcntl,
                    [fd_arg(src), libc::F_SETFD as u64, flag, 0, 0, 0],
                )?;
            } else {
                if let Some(other) = self.temps.iter().position(|t| *t == Some(s.fd)) {
                    // A temporary sits on the number: move it away first.
                    let moved = sys(
                        ctx,
                        &format!("{what}: moving a temporary fd off fd {}", s.fd),
                        libc::SYS_fcntl,
                        [fd_arg(s.fd), libc::F_DUPFD_CLOEXEC as u64, 0, 0, 0, 0],
                    )?;
                    self.temps[other] = Some(moved as i32);
                }
                let flag = if s.cloexec { libc::O_CLOEXEC } else { 0 } as u64;
                sys(
                    ctx,
                    &format!("{what}: dup3 to fd {}", s.fd),
                    libc::SYS_dup3,
                    [fd_arg(src), fd_arg(s.fd), flag, 0, 0, 0],
                )?;
            }
            self.placed.insert(s.fd);
        }
        Ok(())
    }

    /// Forgets temporary `h`, closing it unless it landed on a rebuilt number.
    fn release(&mut self, ctx: &mut ContextRef<'_>, h: usize) -> Result<(), String> {
        if let Some(Some(fd)) = self.temps.get(h).copied() {
            self.temps[h] = None;
            if !self.placed.contains(&fd) {
                sys(ctx, &format!("closing temporary fd {fd}"), libc::SYS_close, [fd_arg(fd), 0, 0, 0, 0, 0])?;
            }
        }
        Ok(())
    }
}

/// What to do once contents have been written.
enum Then {
    Deleted { desc: Desc, path: String },
    Memfd { desc: Desc },
    Pipe { rec: PipeRec, r: Option<usize>, w: Option<usize> },
    /// A socket pair's end `h`, once its bytes are in through its peer.
    Unix { desc: Desc, h: usize },
}

/// Contents still to come from the image into temporary `h`.
struct Pending {
    h: usize,
    remaining: u64,
    kind: &'static str,
    what: String,
    then: Then,
}

#[derive(Default)]
pub struct Restore {
    header: Option<Header>,
    descs_left: u64,
    pipes_left: u64,
    seen: HashSet<i32>,
    placer: Placer,
    /// Inode (dev, ino) of a recreated deleted file or memfd -> an fd holding it.
    shared: HashMap<(u64, u64), i32>,
    pending: Option<Pending>,
    /// Epoll instances made (their first fd number) and the watches they get last.
    epolls: Vec<(i32, String, Vec<Watch>)>,
    /// Socket ends made with their peer, waiting for their own record: inode -> temporary.
    socks: HashMap<u64, usize>,
    /// Socket ends in place: inode -> fd number.
    sock_fds: HashMap<u64, i32>,
    /// Shutdowns to do last: fd, `RCV_SHUTDOWN | SEND_SHUTDOWN` mask, label.
    shutdowns: Vec<(i32, u8, String)>,
    /// Datagram sockets to connect once all are bound: fd, peer `sockaddr_un`, name.
    connects: Vec<(i32, Vec<u8>, String)>,
    /// Locks to take last, once no fd of their files will be closed again: the fd to
    /// take them through, its label, the locks.
    locks: Vec<(i32, String, Vec<Lock>)>,
    /// inotify and fanotify instances and pidfds, made last (see [`crate::notify`]).
    notify: Vec<(String, Desc)>,
    /// Files, directories and nodes created in the child and not removed yet (removed
    /// by cleanup on failure).
    pub created: Vec<String>,
    finished: bool,
    pub status: Status,
    /// Established TCP connections, in repair mode until `resume`.
    pub tcp: crate::tcp::Restored,
}

impl Restore {
    pub fn step(&mut self, ctx: &mut ContextRef<'_>, source: &mut SourceRef<'_>) -> Result<Progress, String> {
        if self.finished {
            return Ok(Progress::Done);
        }
        if self.header.is_none() {
            let h: Header = expect_json(source, KIND_HEADER)?;
            h.validate()?;
            // Everything the child inherited from ferry goes; the image's fds come back.
            sys(
                ctx,
                "closing the fds the restore child inherited (close_range)",
                libc::SYS_close_range,
                [0, u32::MAX as u64, 0, 0, 0, 0],
            )?;
            self.descs_left = h.descriptions;
            self.pipes_left = h.pipes;
            self.status.entities_total = h.descriptions + h.pipes + 3;
            self.header = Some(h);
            return Ok(Progress::More);
        }
        let mut spent = 0u64;
        let mut objects = 0;
        loop {
            if let Some(p) = self.pending.take() {
                spent += self.feed(ctx, source, p, BUDGET.saturating_sub(spent))?;
                if self.pending.is_some() {
                    return Ok(Progress::More);
                }
                continue;
            }
            if self.descs_left == 0 && self.pipes_left == 0 {
                self.finish(ctx, source)?;
                self.finished = true;
                return Ok(Progress::Done);
            }
            if spent >= BUDGET || objects >= OBJECTS_PER_CALL {
                return Ok(Progress::More);
            }
            objects += 1;
            let rec = next_record(source)?.ok_or_else(|| {
                format!(
                    "the image ends with {} descriptions and {} pipes of the files plugin still missing",
                    self.descs_left, self.pipes_left
                )
            })?;
            match rec.kind.as_str() {
                KIND_DESC if self.descs_left > 0 => {
                    self.descs_left -= 1;
                    let desc: Desc = parse_json(&rec, KIND_DESC)?;
                    desc.validate(&mut self.seen)?;
                    self.status.bytes_total += desc.data_len();
                    self.start_desc(ctx, desc)?;
                }
                KIND_PIPE if self.pipes_left > 0 => {
                    self.pipes_left -= 1;
                    let pipe: PipeRec = parse_json(&rec, KIND_PIPE)?;
                    pipe.validate(&mut self.seen)?;
                    self.status.bytes_total += pipe.data_len;
                    self.start_pipe(ctx, pipe)?;
                }
                other => {
                    return Err(format!(
                        "unexpected `{other}` record in the files image ({} descriptions and {} pipes still expected)",
                        self.descs_left, self.pipes_left
                    ))
                }
            }
        }
    }

    /// Writes contents from the image into the pending temporary, up to `budget`;
    /// completes the object when they are all there, else keeps it pending.
    fn feed(
        &mut self,
        ctx: &mut ContextRef<'_>,
        source: &mut SourceRef<'_>,
        mut p: Pending,
        budget: u64,
    ) -> Result<u64, String> {
        let mut written = 0u64;
        while p.remaining > 0 {
            if written >= budget {
                self.pending = Some(p);
                return Ok(written);
            }
            let rec = next_record(source)?
                .ok_or_else(|| format!("{}: the image ends with {} content bytes missing", p.what, p.remaining))?;
            check_chunk(
                &p.what,
                p.kind,
                rec.kind.as_str(),
                rec.format == RecordFormat::Raw,
                rec.payload.len(),
                p.remaining,
            )?;
            let fd = self.placer.fd(p.h)?;
            write_all(ctx, &p.what, fd, &rec.payload)?;
            p.remaining -= rec.payload.len() as u64;
            written += rec.payload.len() as u64;
            self.status.bytes_done += rec.payload.len() as u64;
        }
        self.complete(ctx, p)?;
        Ok(written)
    }

    fn start_desc(&mut self, ctx: &mut ContextRef<'_>, desc: Desc) -> Result<(), String> {
        let what = format!("{} ({})", desc.label(), object_name(&desc.object));
        if let (false, Some(first)) = (desc.locks.is_empty(), desc.fds.first()) {
            self.locks.push((first.fd, format!("fd {} ({})", first.fd, object_name(&desc.object)), desc.locks.clone()));
        }
        match &desc.object {
            Object::Eventfd { .. } | Object::Timerfd { .. } | Object::Signalfd { .. } | Object::Epoll { .. } => {
                self.start_event_fd(ctx, &what, &desc)?;
            }
            // Made in `finish`, once the restore opens no more files: its own opens
            // would show as events.
            Object::Inotify { .. } | Object::Fanotify { .. } | Object::Pidfd { .. } => self.notify.push((what, desc)),
            Object::Inet { .. } | Object::UnixSocket { .. } => self.start_named_socket(ctx, &what, &desc)?,
            Object::Tcp { conn } => {
                let fd = sys(ctx, &format!("{what}: socket"), libc::SYS_socket, [conn.family as u64, (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as u64, libc::IPPROTO_TCP as u64, 0, 0, 0])? as i32;
                let h = self.placer.adopt(fd);
                let got = ctx.fetch_fd(fd).into_result().map_err(|e| format!("{what}: {}", e.message))?;
                // SAFETY: fetch_fd hands us a fresh fd that we own.
                let sock = unsafe { std::os::fd::FromRawFd::from_raw_fd(got) };
                // The request's option `tcp_close` (`--tcp-close`): restored closed.
                let close = ctx.plugin_param("files".into(), "tcp_close".into()).into_option().is_some_and(|v| v == "1" || v == "true");
                self.tcp.restore(ctx.pid(), sock, conn, &what, close)?;
                self.finish_socket(ctx, &what, &desc, fd, h)?;
            }
            Object::UnixPair { ino, peer, sock_type, data_len, across, .. } => {
                // This end was made with its peer already, or both are made now.
                let (mine, other) = match self.socks.remove(ino) {
                    None if *across => {
                        let (a, b) = crate::unix_across::ends(ctx, &what, *ino, *peer, *sock_type)?;
                        (self.placer.adopt(a), self.placer.adopt(b))
                    }
                    Some(h) => {
                        // The peer is in place: its bytes go through a duplicate of it.
                        let at = *self.sock_fds.get(peer).ok_or_else(|| format!("{what}: its peer socket:[{peer}] is missing"))?;
                        let dup = sys(ctx, &format!("{what}: duplicating its peer"), libc::SYS_fcntl, [fd_arg(at), libc::F_DUPFD_CLOEXEC as u64, 0, 0, 0, 0])?;
                        (h, self.placer.adopt(dup as i32))
                    }
                    None => {
                        let mut scratch = Scratch::new(ctx);
                        let at = scratch.alloc(8)?;
                        let kind = *sock_type as u64 | libc::SOCK_CLOEXEC as u64;
                        sys(ctx, &format!("{what}: socketpair"), libc::SYS_socketpair, [libc::AF_UNIX as u64, kind, 0, at, 0, 0])?;
                        let fds = read_memory(ctx, at, 8)?;
                        let fd = |i: usize| i32::from_le_bytes(fds[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
                        let (a, b) = (self.placer.adopt(fd(0)), self.placer.adopt(fd(1)));
                        self.socks.insert(*peer, b);
                        (a, b)
                    }
                };
                let remaining = *data_len;
                let p = Pending { h: other, remaining, kind: KIND_DESC_DATA, what, then: Then::Unix { desc, h: mine } };
                if remaining > 0 {
                    self.pending = Some(p);
                } else {
                    self.complete(ctx, p)?;
                }
            }
            Object::Path { path, mode, rdev, tty_ctime } => {
                let fd = open(ctx, &what, path, open_flags(desc.flags))?;
                let h = self.placer.adopt(fd);
                let st = check_type(ctx, &what, fd, *mode, *rdev)?;
                if let Some(want) = tty_ctime {
                    let got = [st.st_ctime, st.st_ctime_nsec];
                    if got != *want {
                        return Err(format!(
                            "{what}: the terminal there is not the process's (made at {}.{:09}, the process's at {}.{:09}): a terminal is carried only to where it still is",
                            got[0], got[1], want[0], want[1]
                        ));
                    }
                }
                seek(ctx, &what, fd, desc.pos, desc.flags)?;
                self.placer.place(ctx, &what, h, &desc.fds)?;
                self.placer.release(ctx, h)?;
                self.status.entities_done += 1;
            }
            Object::Terminal { .. } | Object::PtyMaster { .. } | Object::PtySlave { .. } => self.start_terminal(ctx, &what, &desc)?,
            Object::Deleted { mapped: Some(at), .. } | Object::Memfd { mapped: Some(at), .. } => self.open_mapped(ctx, &what, &desc, *at)?,
            Object::Deleted { dev, ino, data_len: None, .. } | Object::Memfd { dev, ino, data_len: None, .. } => {
                let at = *self.shared.get(&(*dev, *ino)).ok_or_else(|| {
                    format!("{what}: the image names this file before the description that carries its contents")
                })?;
                let mut flags = desc.flags;
                if matches!(desc.object, Object::Deleted { .. }) {
                    flags &= !(libc::O_DIRECTORY as u32);
                }
                let fd = open(ctx, &what, &format!("/proc/self/fd/{at}"), open_flags(flags))?;
                let h = self.placer.adopt(fd);
                seek(ctx, &what, fd, desc.pos, desc.flags)?;
                self.placer.place(ctx, &what, h, &desc.fds)?;
                self.placer.release(ctx, h)?;
                self.status.entities_done += 1;
            }
            Object::DeletedDir { .. } | Object::DeletedDevice { .. } => self.start_gone(ctx, &what, &desc)?,
            Object::Deleted { path, ino, data_len: Some(n), .. } => {
                let flags = (libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC | libc::O_NOCTTY) as u32;
                let (fd, at) = self.make_beside(ctx, &what, "the deleted file", path, *ino, |ctx, at| open_raw(ctx, at, flags, 0o600))?;
                let fd = fd as i32;
                let h = self.placer.adopt(fd);
                let remaining = *n;
                self.pending =
                    Some(Pending { h, remaining, kind: KIND_DESC_DATA, what, then: Then::Deleted { desc, path: at } });
            }
            Object::Memfd { name, data_len: Some(n), .. } => {
                let mut scratch = Scratch::new(ctx);
                let addr = scratch.cstr(ctx, name)?;
                let fd = sys(
                    ctx,
                    &format!("{what}: memfd_create"),
                    libc::SYS_memfd_create,
                    [addr, MFD_CLOEXEC | MFD_ALLOW_SEALING, 0, 0, 0, 0],
                )? as i32;
                let h = self.placer.adopt(fd);
                let remaining = *n;
                self.pending = Some(Pending { h, remaining, kind: KIND_DESC_DATA, what, then: Then::Memfd { desc } });
            }
        }
        Ok(())
    }

    fn start_pipe(&mut self, ctx: &mut ContextRef<'_>, rec: PipeRec) -> Result<(), String> {
        let what = format!(
            "{} ({})",
            rec.label(),
            crate::model::fds_label(&rec.ends.iter().flat_map(|e| e.fds.clone()).collect::<Vec<_>>())
        );
        let (fill, r, w) = match &rec.fifo {
            None => {
                let mut scratch = Scratch::new(ctx);
                let addr = scratch.alloc(8)?;
                sys(
                    ctx,
                    &format!("{what}: pipe2"),
                    libc::SYS_pipe2,
                    [addr, (libc::O_NONBLOCK | libc::O_CLOEXEC) as u64, 0, 0, 0, 0],
                )?;
                let raw = read_memory(ctx, addr, 8)?;
                let r = i32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
                let w = i32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]);
                let hr = self.placer.adopt(r);
                let hw = self.placer.adopt(w);
                (hw, Some(hr), Some(hw))
            }
            Some(path) => {
                // O_RDWR never blocks on a FIFO, and keeps it open while the ends come.
                let flags = (libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY) as u32;
                let fd = open(ctx, &what, path, flags)?;
                let h = self.placer.adopt(fd);
                check_type(ctx, &what, fd, libc::S_IFIFO, 0)?;
                (h, None, None)
            }
        };
        let fd = self.placer.fd(fill)?;
        let size = sys(
            ctx,
            &format!("{what}: F_SETPIPE_SZ {}", rec.size),
            libc::SYS_fcntl,
            [fd_arg(fd), libc::F_SETPIPE_SZ as u64, rec.size, 0, 0, 0],
        )?;
        if size < rec.size {
            return Err(format!("{what}: F_SETPIPE_SZ {} gave a pipe of {size} bytes", rec.size));
        }
        self.pending = Some(Pending {
            h: fill,
            remaining: rec.data_len,
            kind: KIND_PIPE_DATA,
            what,
            then: Then::Pipe { rec, r, w },
        });
        Ok(())
    }

    /// Finishes an object once its contents are in.
    fn complete(&mut self, ctx: &mut ContextRef<'_>, p: Pending) -> Result<(), String> {
        let what = p.what;
        match p.then {
            Then::Deleted { desc, path } => {
                let Object::Deleted { dev, ino, mode, uid, gid, size, .. } = desc.object else {
                    return Err(format!("internal error: {what} is not a deleted file"));
                };
                let c = self.placer.fd(p.h)?;
                sys(ctx, &format!("{what}: fchown"), libc::SYS_fchown, [fd_arg(c), uid as u64, gid as u64, 0, 0, 0])?;
                sys(
                    ctx,
                    &format!("{what}: fchmod"),
                    libc::SYS_fchmod,
                    [fd_arg(c), (mode & 0o7777) as u64, 0, 0, 0, 0],
                )?;
                sys(ctx, &format!("{what}: ftruncate"), libc::SYS_ftruncate, [fd_arg(c), size, 0, 0, 0, 0])?;
                self.placer.release(ctx, p.h)?;
                let flags = desc.flags & !(libc::O_DIRECTORY as u32);
                let fd = open(ctx, &what, &path, open_flags(flags))?;
                let h = self.placer.adopt(fd);
                seek(ctx, &what, fd, desc.pos, desc.flags)?;
                self.placer.place(ctx, &what, h, &desc.fds)?;
                self.placer.release(ctx, h)?;
                let mut scratch = Scratch::new(ctx);
                let addr = scratch.cstr(ctx, &path)?;
                sys(ctx, &format!("{what}: unlinking {path}"), libc::SYS_unlinkat, [AT_FDCWD, addr, 0, 0, 0, 0])?;
                self.created.retain(|c| *c != path);
                if let Some(first) = desc.fds.first() {
                    self.shared.insert((dev, ino), first.fd);
                }
            }
            Then::Unix { desc, h } => {
                let Object::UnixPair { ino, shutdown, .. } = desc.object else {
                    return Err(format!("internal error: {what} is not a socket"));
                };
                let fd = self.placer.fd(h)?;
                let setfl = desc.flags & PIPE_SETFL;
                if setfl != 0 {
                    set_status_flags(ctx, &what, fd, setfl)?;
                }
                self.placer.place(ctx, &what, h, &desc.fds)?;
                self.placer.release(ctx, h)?;
                // The peer's duplicate goes; a peer still to come keeps its end.
                if !self.socks.values().any(|&s| s == p.h) {
                    self.placer.release(ctx, p.h)?;
                }
                self.sock_fds.insert(ino, desc.fds[0].fd);
                if shutdown != 0 {
                    // Once every queue is refilled: a shut end takes no more bytes.
                    self.shutdowns.push((desc.fds[0].fd, shutdown, what.clone()));
                }
            }
            Then::Memfd { desc } => {
                let Object::Memfd { dev, ino, mode, seals, size, .. } = desc.object else {
                    return Err(format!("internal error: {what} is not a memfd"));
                };
                let m = self.placer.fd(p.h)?;
                sys(ctx, &format!("{what}: ftruncate"), libc::SYS_ftruncate, [fd_arg(m), size, 0, 0, 0, 0])?;
                sys(
                    ctx,
                    &format!("{what}: fchmod"),
                    libc::SYS_fchmod,
                    [fd_arg(m), (mode & 0o7777) as u64, 0, 0, 0, 0],
                )?;
                let acc = desc.flags & libc::O_ACCMODE as u32;
                if acc == libc::O_RDWR as u32 && desc.flags & libc::O_PATH as u32 == 0 {
                    let setfl = desc.flags & (libc::O_APPEND | libc::O_NONBLOCK | libc::O_NOATIME) as u32;
                    if setfl != 0 {
                        set_status_flags(ctx, &what, m, setfl)?;
                    }
                    seek(ctx, &what, m, desc.pos, desc.flags)?;
                    self.placer.place(ctx, &what, p.h, &desc.fds)?;
                } else {
                    let fd = open(ctx, &what, &format!("/proc/self/fd/{m}"), open_flags(desc.flags))?;
                    let h = self.placer.adopt(fd);
                    seek(ctx, &what, fd, desc.pos, desc.flags)?;
                    self.placer.place(ctx, &what, h, &desc.fds)?;
                    self.placer.release(ctx, h)?;
                }
                if seals != 0 {
                    let m = self.placer.fd(p.h)?;
                    sys(
                        ctx,
                        &format!("{what}: F_ADD_SEALS {seals:#x}"),
                        libc::SYS_fcntl,
                        [fd_arg(m), libc::F_ADD_SEALS as u64, seals as u64, 0, 0, 0],
                    )?;
                }
                self.placer.release(ctx, p.h)?;
                if let Some(first) = desc.fds.first() {
                    self.shared.insert((dev, ino), first.fd);
                }
            }
            Then::Pipe { rec, r, w } => {
                let (mut used_r, mut used_w) = (false, false);
                for end in &rec.ends {
                    let acc = end.flags & libc::O_ACCMODE as u32;
                    let (h, temporary) = match (&rec.fifo, r, w) {
                        (None, Some(hr), _) if acc == libc::O_RDONLY as u32 && !used_r => {
                            used_r = true;
                            (hr, false)
                        }
                        (None, _, Some(hw)) if acc == libc::O_WRONLY as u32 && !used_w => {
                            used_w = true;
                            (hw, false)
                        }
                        (None, Some(hr), _) => {
                            // Another description of the same pipe: reopen it.
                            let rfd = self.placer.fd(hr)?;
                            let flags = acc | (libc::O_NONBLOCK | libc::O_CLOEXEC) as u32;
                            let fd = open(ctx, &what, &format!("/proc/self/fd/{rfd}"), flags)?;
                            (self.placer.adopt(fd), true)
                        }
                        (Some(path), _, _) => {
                            let flags = acc | (libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY) as u32;
                            let fd = open(ctx, &what, path, flags)?;
                            (self.placer.adopt(fd), true)
                        }
                        (None, None, _) => return Err(format!("internal error: {what} has no read end")),
                    };
                    let fd = self.placer.fd(h)?;
                    set_status_flags(ctx, &what, fd, end.flags & PIPE_SETFL)?;
                    self.placer.place(ctx, &what, h, &end.fds)?;
                    if temporary {
                        self.placer.release(ctx, h)?;
                    }
                }
                // The FIFO's helper (p.h), or the pipe's ends not used.
                self.placer.release(ctx, p.h)?;
                for h in [r, w].into_iter().flatten() {
                    self.placer.release(ctx, h)?;
                }
            }
        }
        self.status.entities_done += 1;
        Ok(())
    }

    fn finish(&mut self, ctx: &mut ContextRef<'_>, source: &mut SourceRef<'_>) -> Result<(), String> {
        let h = self.header.clone().ok_or("internal error: no header")?;
        if let Some(ino) = self.socks.keys().next() {
            return Err(format!("the image lacks the other end of a Unix socket pair (socket:[{ino}])"));
        }
        for (what, desc) in std::mem::take(&mut self.notify) {
            let h = self.placer.adopt(crate::notify::make(ctx, &what, &desc)?);
            self.placer.place(ctx, &what, h, &desc.fds)?;
            self.placer.release(ctx, h)?;
            self.status.entities_done += 1;
        }
        for (fd, peer, what) in std::mem::take(&mut self.connects) {
            let at = Scratch::new(ctx).put(ctx, &peer)?;
            sys(ctx, &format!("{what}: connect"), libc::SYS_connect, [fd_arg(fd), at, peer.len() as u64, 0, 0, 0])?;
        }
        for (fd, mask, what) in std::mem::take(&mut self.shutdowns) {
            // RCV_SHUTDOWN is 1, SEND_SHUTDOWN 2; SHUT_RD 0, SHUT_WR 1, SHUT_RDWR 2.
            sys(ctx, &format!("{what}: shutdown"), libc::SYS_shutdown, [fd_arg(fd), (mask - 1) as u64, 0, 0, 0, 0])?;
        }
        for (epfd, what, watches) in std::mem::take(&mut self.epolls) {
            for w in watches {
                let holder = w.file.unwrap_or(w.fd);
                if !self.placed_fd(holder) {
                    return Err(format!("{what}: it watches fd {holder}, which the image does not have"));
                }
                self.add_watch(ctx, epfd, &what, &w)?;
            }
        }
        for (fd, what, locks) in std::mem::take(&mut self.locks) {
            if !self.placed_fd(fd) {
                return Err(format!("{what}: its locks name an fd the image does not have"));
            }
            for lock in locks {
                take_lock(ctx, fd, &what, &lock)?;
            }
        }
        match h.cwd_deleted {
            Some(gone) => self.enter_gone_cwd(ctx, &h.cwd, &gone)?,
            None => {
                let addr = Scratch::new(ctx).cstr(ctx, &h.cwd)?;
                sys(ctx, &format!("chdir to the working directory {}", h.cwd), libc::SYS_chdir, [addr, 0, 0, 0, 0, 0])?;
            }
        }
        let mut scratch = Scratch::new(ctx);
        if h.root != "/" {
            let addr = scratch.cstr(ctx, &h.root)?;
            sys(ctx, &format!("chroot to the root directory {}", h.root), libc::SYS_chroot, [addr, 0, 0, 0, 0, 0])?;
        }
        sys(ctx, "umask", libc::SYS_umask, [h.umask as u64, 0, 0, 0, 0, 0])?;
        self.status.entities_done += 3;
        if let Some(extra) = next_record(source)? {
            return Err(format!("unexpected `{}` record after the last of the files plugin", extra.kind));
        }
        Ok(())
    }

    fn placed_fd(&self, fd: i32) -> bool {
        self.placer.placed.contains(&fd)
    }

    /// On failure: removes the files recreated for deleted descriptions and not
    /// unlinked yet (the child shares ferry's view of the file system).
    pub fn cleanup(&mut self) {
        for path in self.created.drain(..) {
            if std::fs::remove_file(&path).is_err() {
                let _ = std::fs::remove_dir(&path);
            }
        }
    }
}

#[cfg(test)]
#[path = "restore_tests.rs"]
mod tests;
