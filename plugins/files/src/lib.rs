//! The `files` subsystem plugin: the fd table (regular files and their offsets and
//! flags, files deleted while open, memfds, devices, pipes and FIFOs with their unread
//! bytes, shared file descriptions, eventfds with their counts, timerfds with their time
//! left and unread expirations, signalfds, epoll instances with what they watch, Unix
//! socket pairs within the process, listening TCP sockets, UDP sockets, established TCP
//! connections: see [`tcp`]), the file locks held (POSIX, OFD, flock: see [`locks`]),
//! the working and root directories (a chroot included) and the umask.
//!
//! What was removed from the file system while in use comes back removed: a deleted
//! regular file (made again from its contents, then unlinked), a removed working
//! directory or open directory (made again empty with its mode and owner, entered or
//! reopened, removed), an unlinked character or block device node (made again with
//! `mknod`, reopened, unlinked), each at its path or at a free name beside it; and a
//! listening or datagram Unix socket whose file was removed (bound again to its name,
//! which must be free, and the new file removed). A removed directory whose parent is
//! gone too is refused, and so is a removed root directory. An epoll watch added by an
//! fd number since closed (the file living on in another fd) is found with
//! `kcmp(KCMP_EPOLL_TFD)` and added again under that number; a watched file no fd of
//! the process holds is refused.
//!
//! See [`model`] for the records. Checkpoint reads `/proc/PID/{fd,fdinfo}` and uses
//! `kcmp` to find fds sharing one description; restart rebuilds everything by system
//! calls injected into the restore child. inotify and fanotify instances and pidfds are
//! carried as [`notify`] says. Other sockets and other anonymous
//! inodes are refused with an error naming the fd, so the checkpoint fails before anything is
//! written; so are removed terminal nodes. A pseudo-terminal pair both of whose ends
//! belong to the request is made again (see [`pty`]); a terminal outside the request
//! is a shell job's, carried with `--shell-job` (see [`shell_job`]).

mod checkpoint;
mod decode;
pub use decode::decode;
mod model;
mod restore;
mod scan;
mod inet;
mod tcp;
mod locks;
mod notify;
mod pty;
mod shell_job;
mod unix;
mod unix_across;

use ferry_plugin_api::{
    plugin::SubsystemPlugin,
    util::names,
    ContextRef, EventKind, Progress, SinkRef, SourceRef, Status, SubsystemInfo,
};

#[derive(Default)]
struct Plugin {
    checkpoint: checkpoint::Checkpoint,
    restore: restore::Restore,
}

impl SubsystemPlugin for Plugin {
    fn info(&self) -> SubsystemInfo {
        SubsystemInfo {
            entity_kinds: names(&["fd", "file-lock", "cwd", "root", "umask"]),
            after: names(&["memory"]),
            shared_resources: names(&["pipe", "file-description", "unix-socket"]),
        }
    }

    fn setup(&mut self, ctx: &mut ContextRef<'_>, event: EventKind) -> Result<(), String> {
        if event == EventKind::Checkpoint {
            self.checkpoint.tcp.setup(ctx)?;
        }
        Ok(())
    }

    fn resume(&mut self, _ctx: &mut ContextRef<'_>) -> Result<(), String> {
        self.restore.tcp.resume();
        Ok(())
    }

    fn checkpoint(&mut self, ctx: &mut ContextRef<'_>, sink: &mut SinkRef<'_>) -> Result<Progress, String> {
        self.checkpoint.step(ctx, sink)
    }

    fn restart(&mut self, ctx: &mut ContextRef<'_>, source: &mut SourceRef<'_>) -> Result<Progress, String> {
        self.restore.step(ctx, source)
    }

    fn cleanup(&mut self, _ctx: &mut ContextRef<'_>, ok: bool) {
        self.checkpoint.tcp.cleanup(ok);
        if !ok {
            self.restore.cleanup();
            unix_across::forget();
        }
    }

    fn status(&self) -> Status {
        let (c, r) = (self.checkpoint.status, self.restore.status);
        if r.entities_total > 0 {
            r
        } else {
            c
        }
    }
}

ferry_plugin_api::export_subsystem!("files", "File descriptors, offsets, pipes, cwd, root, umask", Plugin::default);

#[cfg(test)]
mod mock_tests;
