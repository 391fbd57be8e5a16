//! Restart of what the process still uses though it was removed from the file system:
//! a directory (open, or the working directory) or a device node is made again at its
//! path (or at a free name beside it), used, and removed again; and an epoll watch
//! whose file no longer sits at the fd number it was added by.

use super::*;
use crate::model::GoneDir;

/// `AT_REMOVEDIR` for `unlinkat`.
const AT_REMOVEDIR: u64 = 0x200;

impl Restore {
    /// Opens a deleted file or memfd the process maps too through its mapping at `at`,
    /// which the memory plugin (restored first) made from the image: the fd and the
    /// mapping are one object again, as they were.
    pub(super) fn open_mapped(&mut self, ctx: &mut ContextRef<'_>, what: &str, desc: &Desc, at: u64) -> Result<(), String> {
        let maps = ferry_plugin_api::util::parse_maps(&ferry_plugin_api::util::proc_text(ctx, "maps")?)?;
        let v = maps
            .iter()
            .find(|v| v.start <= at && at < v.end && v.path.ends_with(" (deleted)"))
            .ok_or_else(|| format!("{what}: the restored process has no mapping of it at {at:#x}"))?;
        let (dev, ino, flags) = match desc.object {
            Object::Deleted { dev, ino, .. } => (dev, ino, desc.flags & !(libc::O_DIRECTORY as u32)),
            Object::Memfd { dev, ino, .. } => (dev, ino, desc.flags),
            _ => return Err(format!("internal error: {what} is not a deleted file or memfd")),
        };
        let fd = open(ctx, what, &format!("/proc/self/map_files/{:x}-{:x}", v.start, v.end), open_flags(flags))?;
        let h = self.placer.adopt(fd);
        seek(ctx, what, fd, desc.pos, desc.flags)?;
        self.placer.place(ctx, what, h, &desc.fds)?;
        self.placer.release(ctx, h)?;
        self.status.entities_done += 1;
        if let Some(first) = desc.fds.first() {
            self.shared.insert((dev, ino), first.fd);
        }
        Ok(())
    }

    /// Makes `what` (`kind`, for messages: "the deleted file") again at `path` with
    /// `make` (the raw result of the call, `-EEXIST` when the name is taken), or at a
    /// free name beside it; answers the result and the path used, recorded in
    /// `created` until removed.
    pub(super) fn make_beside(
        &mut self,
        ctx: &mut ContextRef<'_>,
        what: &str,
        kind: &str,
        path: &str,
        ino: u64,
        mut make: impl FnMut(&mut ContextRef<'_>, &str) -> Result<i64, String>,
    ) -> Result<(i64, String), String> {
        let (dir, _) = path.rsplit_once('/').ok_or_else(|| format!("{what}: path {path} has no directory"))?;
        for attempt in 0..16u32 {
            let at = if attempt == 0 { path.to_string() } else { format!("{dir}/.ferry-deleted-{ino}-{attempt}") };
            let r = make(ctx, &at)?;
            if r == -(libc::EEXIST as i64) {
                continue;
            }
            if r < 0 {
                return Err(format!("{what}: recreating {kind} at {at}: {}", std::io::Error::from_raw_os_error(-r as i32)));
            }
            self.created.push(at.clone());
            return Ok((r, at));
        }
        Err(format!("{what}: no free name to recreate {kind} beside {path}"))
    }

    /// Makes a removed directory (`dir`) or device node again beside `path`, empty,
    /// with `mode` (its type and permission bits), `rdev` and owner; answers where.
    #[allow(clippy::too_many_arguments)]
    fn remake(
        &mut self,
        ctx: &mut ContextRef<'_>,
        what: &str,
        path: &str,
        ino: u64,
        mode: u32,
        rdev: u64,
        owner: (u32, u32),
    ) -> Result<String, String> {
        let dir = mode & libc::S_IFMT == libc::S_IFDIR;
        let kind = if dir { "the deleted directory" } else { "the deleted device node" };
        let dev = u32::try_from(rdev).map_err(|_| format!("{what}: device number {rdev:#x} is out of range"))?;
        let (_, at) = self.make_beside(ctx, what, kind, path, ino, |ctx, at| {
            let addr = Scratch::new(ctx).cstr(ctx, at)?;
            let tid = ctx.pid();
            if dir {
                syscall_raw(ctx, tid, libc::SYS_mkdirat, [AT_FDCWD, addr, 0o700, 0, 0, 0])
            } else {
                syscall_raw(ctx, tid, libc::SYS_mknodat, [AT_FDCWD, addr, ((mode & libc::S_IFMT) | 0o600) as u64, dev as u64, 0, 0])
            }
        })?;
        let addr = Scratch::new(ctx).cstr(ctx, &at)?;
        let nofollow = libc::AT_SYMLINK_NOFOLLOW as u64;
        sys(ctx, &format!("{what}: chown {at}"), libc::SYS_fchownat, [AT_FDCWD, addr, owner.0 as u64, owner.1 as u64, nofollow, 0])?;
        // After the chown, which clears set-id bits.
        sys(ctx, &format!("{what}: chmod {at}"), libc::SYS_fchmodat, [AT_FDCWD, addr, (mode & 0o7777) as u64, 0, 0, 0])?;
        Ok(at)
    }

    /// Removes what [`Restore::remake`] made at `at`.
    fn remove_again(&mut self, ctx: &mut ContextRef<'_>, what: &str, at: &str, dir: bool) -> Result<(), String> {
        let addr = Scratch::new(ctx).cstr(ctx, at)?;
        let flags = if dir { AT_REMOVEDIR } else { 0 };
        sys(ctx, &format!("{what}: removing {at} again"), libc::SYS_unlinkat, [AT_FDCWD, addr, flags, 0, 0, 0])?;
        self.created.retain(|c| c != at);
        Ok(())
    }

    /// A description of a removed directory or device node: made again (or reopened
    /// through the description of the same one rebuilt before), opened with its flags
    /// and offset, put at its numbers, and removed again.
    pub(super) fn start_gone(&mut self, ctx: &mut ContextRef<'_>, what: &str, desc: &Desc) -> Result<(), String> {
        let (path, dev, ino, mode, rdev, owner) = match &desc.object {
            Object::DeletedDir { path, dev, ino, mode, uid, gid } => (path, *dev, *ino, *mode, 0, (*uid, *gid)),
            Object::DeletedDevice { path, dev, ino, mode, rdev, uid, gid } => (path, *dev, *ino, *mode, *rdev, (*uid, *gid)),
            _ => return Err(format!("internal error: {what} is not a removed directory or device")),
        };
        let dir = mode & libc::S_IFMT == libc::S_IFDIR;
        let (at, made) = match self.shared.get(&(dev, ino)) {
            Some(&fd) => (format!("/proc/self/fd/{fd}"), false),
            None => (self.remake(ctx, what, path, ino, mode, rdev, owner)?, true),
        };
        let fd = open(ctx, what, &at, open_flags(desc.flags))?;
        let h = self.placer.adopt(fd);
        check_type(ctx, what, fd, mode, rdev)?;
        seek(ctx, what, fd, desc.pos, desc.flags)?;
        self.placer.place(ctx, what, h, &desc.fds)?;
        self.placer.release(ctx, h)?;
        if made {
            self.remove_again(ctx, what, &at, dir)?;
            self.shared.insert((dev, ino), desc.fds[0].fd);
        }
        self.status.entities_done += 1;
        Ok(())
    }

    /// Enters the working directory that was removed while the process was in it: the
    /// same directory as a rebuilt description, or one made again at `path` (or beside
    /// it) and removed once entered.
    pub(super) fn enter_gone_cwd(&mut self, ctx: &mut ContextRef<'_>, path: &str, gone: &GoneDir) -> Result<(), String> {
        let what = format!("the deleted working directory {path}");
        if let Some(&fd) = self.shared.get(&(gone.dev, gone.ino)) {
            sys(ctx, &format!("{what}: fchdir to fd {fd}"), libc::SYS_fchdir, [fd_arg(fd), 0, 0, 0, 0, 0])?;
            return Ok(());
        }
        let at = self.remake(ctx, &what, path, gone.ino, gone.mode, 0, (gone.uid, gone.gid))?;
        let addr = Scratch::new(ctx).cstr(ctx, &at)?;
        sys(ctx, &format!("{what}: chdir to {at}"), libc::SYS_chdir, [addr, 0, 0, 0, 0, 0])?;
        self.remove_again(ctx, &what, &at, true)
    }

    /// Adds watch `w` to epoll instance `epfd` again under its fd number. When the
    /// file sits elsewhere now (`w.file`), a duplicate of it takes the number for the
    /// call (what is placed there moved aside and put back after, close-on-exec bit
    /// and all).
    pub(super) fn add_watch(&mut self, ctx: &mut ContextRef<'_>, epfd: i32, what: &str, w: &Watch) -> Result<(), String> {
        // struct epoll_event is packed on x86_64: events, then data.
        let mut ev = w.events.to_le_bytes().to_vec();
        ev.extend_from_slice(&w.data.to_le_bytes());
        let at = Scratch::new(ctx).put(ctx, &ev)?;
        const EPOLL_CTL_ADD: u64 = 1;
        let label = format!("{what}: watching fd {}", w.fd);
        let Some(file) = w.file else {
            sys(ctx, &label, libc::SYS_epoll_ctl, [fd_arg(epfd), EPOLL_CTL_ADD, fd_arg(w.fd), at, 0, 0])?;
            return Ok(());
        };
        let label = format!("{label} (the file now at fd {file})");
        let aside = if self.placed_fd(w.fd) {
            let cloexec = sys(ctx, &format!("{label}: F_GETFD"), libc::SYS_fcntl, [fd_arg(w.fd), libc::F_GETFD as u64, 0, 0, 0, 0])?;
            let moved = sys(ctx, &format!("{label}: moving fd {} aside", w.fd), libc::SYS_fcntl, [fd_arg(w.fd), libc::F_DUPFD_CLOEXEC as u64, 0, 0, 0, 0])?;
            Some((moved as i32, cloexec & libc::FD_CLOEXEC as u64 != 0))
        } else {
            None
        };
        let cloexec = libc::O_CLOEXEC as u64;
        sys(ctx, &format!("{label}: dup3"), libc::SYS_dup3, [fd_arg(file), fd_arg(w.fd), cloexec, 0, 0, 0])?;
        sys(ctx, &label, libc::SYS_epoll_ctl, [fd_arg(epfd), EPOLL_CTL_ADD, fd_arg(w.fd), at, 0, 0])?;
        match aside {
            Some((moved, keep_cloexec)) => {
                let flag = if keep_cloexec { cloexec } else { 0 };
                sys(ctx, &format!("{label}: putting fd {} back", w.fd), libc::SYS_dup3, [fd_arg(moved), fd_arg(w.fd), flag, 0, 0, 0])?;
                sys(ctx, &format!("{label}: closing fd {moved}"), libc::SYS_close, [fd_arg(moved), 0, 0, 0, 0, 0])?;
            }
            None => {
                sys(ctx, &format!("{label}: closing fd {}", w.fd), libc::SYS_close, [fd_arg(w.fd), 0, 0, 0, 0, 0])?;
            }
        }
        Ok(())
    }
}
