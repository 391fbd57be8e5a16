//! Restart of terminals: a shell job's terminal (see [`crate::shell_job`]), and the
//! two ends of a pseudo-terminal pair of the request (see [`crate::pty`]).

use super::*;

impl Restore {
    /// Opens (or makes) the terminal of `desc` and puts it at its numbers.
    pub(super) fn start_terminal(&mut self, ctx: &mut ContextRef<'_>, what: &str, desc: &Desc) -> Result<(), String> {
        let flags = open_flags(desc.flags);
        let fd = match &desc.object {
            Object::Terminal { path, mode, rdev, ctime, controlling, foreground } => {
                let (m, r) = (*mode, *rdev);
                crate::shell_job::reopen(
                    ctx,
                    what,
                    path,
                    *ctime,
                    (*controlling, *foreground),
                    |ctx, at| open(ctx, what, at, flags),
                    |ctx, fd| check_type(ctx, what, fd, m, r),
                )?
            }
            Object::PtyMaster { index, state } => crate::pty::make_master(ctx, what, *index, state, |ctx| open_raw(ctx, "/dev/ptmx", flags, 0))?,
            Object::PtySlave { path, controlling, foreground, .. } => {
                let fd = open(ctx, what, path, flags)?;
                crate::shell_job::take(ctx, what, fd, *controlling, *foreground)?;
                fd
            }
            _ => return Err(format!("{what}: not a terminal")),
        };
        let h = self.placer.adopt(fd);
        self.placer.place(ctx, what, h, &desc.fds)?;
        self.placer.release(ctx, h)?;
        self.status.entities_done += 1;
        Ok(())
    }
}
