//! Checkpoint: the first call scans the fd table (and fails on any fd it cannot
//! handle, before writing anything), writes the `files` header, and queues one job per
//! description and pipe; later calls emit the queued records within a byte budget.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fs::File,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::{FileExt, MetadataExt, OpenOptionsExt},
    },
};

use ferry_plugin_api::{
    abi_stable::std_types::RStr,
    util::{proc_text, put_json, put_raw, to_hex},
    ContextRef, Progress, SharedClaim, SinkRef, Status,
};

use crate::{
    locks,
    model::{
        fds_label, Desc, GoneDir, Header, Object, PipeEnd, PipeRec, Slot, Watch, CHUNK, FORMAT, KIND_DESC, KIND_DESC_DATA, KIND_HEADER,
        KIND_PIPE, KIND_PIPE_DATA, O_CLOEXEC,
    },
    scan::{
        group, kind_of, parse_epoll, parse_eventfd, parse_fdinfo, parse_signalfd, parse_timerfd, parse_umask,
        FdInfo, Kind, StatInfo,
    },
};

/// Content bytes emitted per call at most (one chunk may overshoot it).
const BUDGET: u64 = 16 << 20;

/// One fd of the target as the scan found it.
struct FdEntry {
    fd: i32,
    link: String,
    /// The fdinfo text (event fds keep their state there).
    fdinfo: String,
    info: FdInfo,
    st: StatInfo,
    kind: Kind,
}

enum Job {
    /// A description; `source` is an fd of the target to read its contents from.
    Desc { desc: Desc, source: Option<i32> },
    /// A pipe; `source` is an fd of the target whose description reads the pipe
    /// (else one is opened through /proc). `elsewhere`: an earlier process of the
    /// tree claimed it and writes its bytes; here it is a placeholder without them,
    /// whose ends the framework replaces with that process's pipe at restore.
    Pipe { rec: PipeRec, read_end: Option<i32>, any_fd: i32, elsewhere: bool },
    /// Contents still to emit from `file` (owned here, closed on drop).
    Data { file: OwnedFd, off: u64, remaining: u64, kind: &'static str, what: String },
}

#[derive(Default)]
pub struct Checkpoint {
    scanned: bool,
    jobs: VecDeque<Job>,
    pub status: Status,
    /// Established TCP connections and their network lock.
    pub tcp: crate::tcp::Source,
}

fn os_err(what: impl std::fmt::Display) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

fn stat_info(m: &std::fs::Metadata) -> StatInfo {
    StatInfo {
        dev: m.dev(),
        ino: m.ino(),
        mode: m.mode(),
        rdev: m.rdev(),
        size: m.size(),
        nlink: m.nlink(),
        uid: m.uid(),
        gid: m.gid(),
        ctime: [m.ctime(), m.ctime_nsec()],
    }
}

/// Reads a link of /proc as UTF-8 text.
fn read_link(path: &str) -> Result<String, String> {
    let target = std::fs::read_link(path).map_err(|e| format!("readlink {path}: {e}"))?;
    target.into_os_string().into_string().map_err(|t| format!("{path} points at {t:?}, which is not UTF-8"))
}

/// `kcmp(pid, pid, KCMP_FILE, a, b) == 0`: fds `a` and `b` share a description.
fn same_description(pid: i32, a: i32, b: i32) -> Result<bool, String> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: kcmp takes integers only.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, a as libc::c_long, b as libc::c_long) };
    if r < 0 {
        return Err(os_err(format_args!("kcmp of fds {a} and {b} of process {pid} (do they share a description?)")));
    }
    Ok(r == 0)
}

/// `kcmp(pid, pid, KCMP_EPOLL_TFD, fd, {epfd, tfd, toff}) == 0`: the file of fd `fd`
/// is the one epoll instance `epfd` watches as the `toff`-th watch added by fd number
/// `tfd` (counting from 0 in fdinfo's order).
fn epoll_watches_file_of(pid: i32, epfd: i32, tfd: i32, toff: u32, fd: i32) -> Result<bool, String> {
    const KCMP_EPOLL_TFD: libc::c_long = 7;
    #[repr(C)]
    struct Slot {
        efd: u32,
        tfd: u32,
        toff: u32,
    }
    let slot = Slot { efd: epfd as u32, tfd: tfd as u32, toff };
    // SAFETY: kcmp reads the 12 bytes of `slot`, which outlives the call.
    let r = unsafe {
        libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_EPOLL_TFD, fd as libc::c_long, &slot as *const Slot as libc::c_long)
    };
    if r < 0 {
        return Err(os_err(format_args!("kcmp of fd {fd} with the file epoll fd {epfd} watches as fd {tfd} (process {pid})")));
    }
    Ok(r == 0)
}

/// Refuses what was deleted at `path` (`what`: "fd 3, a directory") when its parent
/// directory is gone too: the restore makes a node again beside its name, and does
/// not make a chain of directories that no longer exist.
fn parent_exists(pid: i32, what: &str, path: &str) -> Result<(), String> {
    let parent = match path.rsplit_once('/') {
        Some(("", _)) => "/",
        Some((p, _)) => p,
        None => return Err(format!("process {pid}: {what} was deleted at {path}, which is not absolute")),
    };
    match std::fs::metadata(parent) {
        Ok(m) if m.is_dir() => Ok(()),
        _ => Err(format!(
            "process {pid}: {what} was deleted at {path}, and its parent directory {parent} is gone too: not supported by the files plugin"
        )),
    }
}

/// Whether an fd with fdinfo `flags` can be read from (not write-only, not O_PATH).
fn readable(flags: u32) -> bool {
    let acc = flags & libc::O_ACCMODE as u32;
    (acc == libc::O_RDONLY as u32 || acc == libc::O_RDWR as u32) && flags & libc::O_PATH as u32 == 0
}

/// Ferry's own duplicate of the target's fd `fd` (`pidfd_getfd`); `what` names it in errors.
fn fetched(ctx: &mut ContextRef<'_>, fd: i32, what: &str) -> Result<OwnedFd, String> {
    let got = ctx.fetch_fd(fd).into_result().map_err(|e| format!("{what}: {}", e.message))?;
    // SAFETY: fetch_fd hands us a fresh fd that we own from now on.
    Ok(unsafe { OwnedFd::from_raw_fd(got) })
}

/// An fd of ferry's own reading target fd `fd`: the target's description itself when
/// it is readable (`pidfd_getfd`), else a new one opened through /proc.
fn reader(ctx: &mut ContextRef<'_>, fd: i32, flags: u32) -> Result<OwnedFd, String> {
    if readable(flags) {
        return fetched(ctx, fd, &format!("fd {fd}"));
    }
    let path = format!("/proc/{}/fd/{fd}", ctx.pid());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)
        .map_err(|e| format!("fd {fd}: opening {path} to read it: {e}"))?;
    Ok(OwnedFd::from(file))
}

/// A periodic timerfd that expired and was not read: fdinfo counts its expirations only
/// up to the first (the kernel adds the rest, and re-arms the timer, at the next read)
/// and shows no time left. Reads them all through ferry's duplicate of the description,
/// puts the count back (`TFD_IOC_SET_TICKS`: the process reads what it would have), and
/// answers it with the time left of the timer the read re-armed.
fn timerfd_expirations(tfd: &OwnedFd, what: &str) -> Result<(u64, [i64; 2]), String> {
    let fd = tfd.as_raw_fd();
    let mut count = 0u64;
    // SAFETY: reads 8 bytes into a u64 of ours; fdinfo showed expirations, so it does
    // not block.
    if unsafe { libc::read(fd, (&mut count as *mut u64).cast(), 8) } != 8 {
        return Err(os_err(format_args!("{what}: reading its expirations")));
    }
    // SAFETY: the ioctl reads one u64 of ours.
    if unsafe { libc::ioctl(fd, ferry_plugin_api::util::TFD_IOC_SET_TICKS as _, &count) } != 0 {
        return Err(os_err(format_args!("{what}: putting back its {count} expirations")));
    }
    // SAFETY: timerfd_gettime fills an itimerspec of ours.
    let mut its: libc::itimerspec = unsafe { std::mem::zeroed() };
    if unsafe { libc::timerfd_gettime(fd, &mut its) } != 0 {
        return Err(os_err(format_args!("{what}: timerfd_gettime")));
    }
    Ok((count, [its.it_value.tv_sec, its.it_value.tv_nsec]))
}

/// The size (`F_GETPIPE_SZ`) of the pipe `src` is an end of.
fn pipe_size(src: &OwnedFd, what: &str) -> Result<u64, String> {
    // SAFETY: fcntl on an fd we own.
    let size = unsafe { libc::fcntl(src.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if size <= 0 {
        return Err(os_err(format_args!("{what}: F_GETPIPE_SZ")));
    }
    Ok(size as u64)
}

/// The bytes queued in the pipe read by `src`, without consuming them: `tee` into a
/// pipe of our own as large as the source, then read that. Answers (pipe size, bytes).
fn peek_pipe(src: &OwnedFd, what: &str) -> Result<(u64, Vec<u8>), String> {
    let s = src.as_raw_fd();
    // SAFETY: fcntl on an fd we own.
    let size = unsafe { libc::fcntl(s, libc::F_GETPIPE_SZ) };
    if size <= 0 {
        return Err(os_err(format_args!("{what}: F_GETPIPE_SZ")));
    }
    let mut ends = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two ints of `ends`.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(os_err(format_args!("{what}: pipe2 for a copy of its data")));
    }
    // SAFETY: both fds were just created and are ours.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
    // SAFETY: as above.
    if unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size) } < size {
        return Err(os_err(format_args!("{what}: F_SETPIPE_SZ {size} on the copy")));
    }
    // One tee of everything queued: a snapshot even if a process outside the event
    // reads or writes the pipe meanwhile. The copy has as many slots as the source,
    // so it takes all of it.
    // SAFETY: tee between two pipe fds we own; no memory is passed.
    let n = unsafe { libc::tee(s, w.as_raw_fd(), size as usize, libc::SPLICE_F_NONBLOCK) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok((size as u64, Vec::new())); // nothing queued
        }
        return Err(format!("{what}: tee of its queued bytes: {e}"));
    }
    let queued = n as usize;
    let mut data = vec![0u8; queued];
    let mut got = 0;
    let mut copy = File::from(r);
    while got < data.len() {
        match io::Read::read(&mut copy, &mut data[got..]) {
            Ok(0) => return Err(format!("{what}: the copy of its data ended after {got} bytes")),
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{what}: reading the copy of its data: {e}")),
        }
    }
    drop(w);
    Ok((size as u64, data))
}

/// The bytes queued on the process's stream socket `fd` (about `expect` of them),
/// read without consuming them (`MSG_PEEK`); refused when they carry fds or
/// credentials.
fn peek_socket(ctx: &mut ContextRef<'_>, fd: i32, expect: u64, what: &str) -> Result<Vec<u8>, String> {
    let sock = fetched(ctx, fd, what)?;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return Err(os_err(format_args!("{what}: FIONREAD")));
    }
    let mut data = vec![0u8; (n as usize).max(expect as usize)];
    let mut control = [0u8; 256];
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    // SAFETY: msghdr is plain data; the pointers set below stay valid for the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len();
    // SAFETY: recvmsg into our buffers.
    let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    if r < 0 {
        return Err(os_err(format_args!("{what}: peeking at its queue")));
    }
    if msg.msg_controllen > 0 {
        return Err(format!("{what}: its queue carries fds or credentials: not supported by the files plugin"));
    }
    if (r as i64) != n as i64 {
        return Err(format!("{what}: peeked {r} of the {n} bytes queued"));
    }
    data.truncate(r as usize);
    Ok(data)
}

impl Checkpoint {
    pub fn step(&mut self, ctx: &mut ContextRef<'_>, sink: &mut SinkRef<'_>) -> Result<Progress, String> {
        if !self.scanned {
            self.scan(ctx, sink)?;
            self.scanned = true;
            return Ok(if self.jobs.is_empty() { Progress::Done } else { Progress::More });
        }
        let mut spent = 0u64;
        while spent < BUDGET {
            let Some(job) = self.jobs.pop_front() else { break };
            spent += self.run(ctx, sink, job)?;
        }
        Ok(if self.jobs.is_empty() { Progress::Done } else { Progress::More })
    }

    /// Emits one job (or part of a data job); answers the content bytes emitted.
    fn run(&mut self, ctx: &mut ContextRef<'_>, sink: &mut SinkRef<'_>, job: Job) -> Result<u64, String> {
        match job {
            Job::Desc { mut desc, source } => {
                let what = format!("{} ({})", desc.label(), object_name(&desc.object));
                let mut data = None;
                if let (Object::UnixPair { data_len, sock_type, .. }, Some(fd)) = (&mut desc.object, source) {
                    // A stream's bytes in chunks; each message of the others its own record.
                    let chunks = if *sock_type == libc::SOCK_STREAM as u8 {
                        let bytes = peek_socket(ctx, fd, *data_len, &what)?;
                        bytes.chunks(CHUNK).map(<[u8]>::to_vec).collect()
                    } else {
                        crate::unix_across::peek_messages(&fetched(ctx, fd, &what)?, &what)?
                    };
                    let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
                    *data_len = total;
                    put_json(sink, KIND_DESC, &desc)?;
                    for chunk in &chunks {
                        put_raw(sink, KIND_DESC_DATA, chunk)?;
                    }
                    self.status.entities_done += desc.fds.len() as u64;
                    self.status.bytes_done += total;
                    return Ok(total);
                }
                if let Some(fd) = source {
                    let file = reader(ctx, fd, desc.flags)?;
                    if let Object::Memfd { seals, .. } = &mut desc.object {
                        // SAFETY: fcntl on an fd we own.
                        let s = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
                        if s < 0 {
                            return Err(os_err(format_args!("{what}: F_GET_SEALS")));
                        }
                        *seals = s as u32;
                    }
                    let len = desc.data_len();
                    if len > 0 {
                        data = Some(Job::Data { file, off: 0, remaining: len, kind: KIND_DESC_DATA, what });
                    }
                }
                put_json(sink, KIND_DESC, &desc)?;
                self.status.entities_done += desc.fds.len() as u64;
                if let Some(d) = data {
                    self.jobs.push_front(d);
                }
                Ok(0)
            }
            Job::Pipe { mut rec, read_end, any_fd, elsewhere } => {
                let what = format!(
                    "{} of {}",
                    rec.label(),
                    fds_label(&rec.ends.iter().flat_map(|e| e.fds.clone()).collect::<Vec<_>>())
                );
                let src = match read_end {
                    Some(fd) => reader(ctx, fd, libc::O_RDONLY as u32)?,
                    None => reader(ctx, any_fd, libc::O_WRONLY as u32)?,
                };
                let (size, data) = if elsewhere { (pipe_size(&src, &what)?, Vec::new()) } else { peek_pipe(&src, &what)? };
                drop(src);
                rec.size = size;
                rec.data_len = data.len() as u64;
                put_json(sink, KIND_PIPE, &rec)?;
                for chunk in data.chunks(CHUNK) {
                    put_raw(sink, KIND_PIPE_DATA, chunk)?;
                }
                self.status.entities_done += rec.ends.iter().map(|e| e.fds.len() as u64).sum::<u64>();
                self.status.bytes_total += data.len() as u64;
                self.status.bytes_done += data.len() as u64;
                Ok(data.len() as u64)
            }
            Job::Data { file, off, remaining, kind, what } => {
                let n = remaining.min(CHUNK as u64) as usize;
                let mut buf = vec![0u8; n];
                let f = File::from(file);
                let mut got = 0;
                while got < n {
                    match f.read_at(&mut buf[got..], off + got as u64) {
                        Ok(0) => {
                            return Err(format!(
                                "{what}: the file ended at {} bytes, before the {} its size said",
                                off + got as u64,
                                off + remaining
                            ))
                        }
                        Ok(k) => got += k,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(format!("{what}: reading its contents at {}: {e}", off + got as u64)),
                    }
                }
                put_raw(sink, kind, &buf)?;
                self.status.bytes_done += n as u64;
                if remaining > n as u64 {
                    let file = OwnedFd::from(f);
                    self.jobs.push_front(Job::Data {
                        file,
                        off: off + n as u64,
                        remaining: remaining - n as u64,
                        kind,
                        what,
                    });
                }
                Ok(n as u64)
            }
        }
    }

    fn scan(&mut self, ctx: &mut ContextRef<'_>, sink: &mut SinkRef<'_>) -> Result<(), String> {
        let pid = ctx.pid();
        let dir = format!("/proc/{pid}/fd");
        let mut fds = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| format!("listing {dir}: {e}"))? {
            let entry = entry.map_err(|e| format!("listing {dir}: {e}"))?;
            let name = entry.file_name();
            let fd = name
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
                .ok_or_else(|| format!("{dir} holds {name:?}, which is not an fd number"))?;
            fds.push(fd);
        }
        // The framework's own (the internal context's agent's socket) are not the process's.
        let own = ctx.own_fds();
        fds.retain(|fd| !own.contains(fd));
        fds.sort_unstable();

        let mut entries = Vec::with_capacity(fds.len());
        for fd in fds {
            let link = read_link(&format!("{dir}/{fd}"))?;
            let fdinfo = proc_text(ctx, &format!("fdinfo/{fd}")).map_err(|e| format!("fd {fd} ({link}): {e}"))?;
            let info = parse_fdinfo(&fdinfo).map_err(|e| format!("fd {fd} ({link}): {e}"))?;
            let st = std::fs::metadata(format!("{dir}/{fd}"))
                .map(|m| stat_info(&m))
                .map_err(|e| format!("fd {fd} ({link}): stat: {e}"))?;
            let named = |p: &str| std::fs::metadata(p).map(|m| m.dev() == st.dev && m.ino() == st.ino).unwrap_or(false);
            let kind = kind_of(fd, &link, &st, named).map_err(|e| format!("process {pid}: {e}"))?;
            entries.push(FdEntry { fd, link, fdinfo, info, st, kind });
        }

        let (cwd, cwd_deleted) = working_directory(pid)?;
        let root = read_link(&format!("/proc/{pid}/root"))?;
        if root.ends_with(" (deleted)") || !root.starts_with('/') {
            return Err(format!("process {pid}: the root directory {root} was deleted: not supported by the files plugin"));
        }
        let umask = parse_umask(&proc_text(ctx, "status")?)?;

        // Group into descriptions: only fds on one inode with one link text can share one.
        let keys: Vec<(i32, (String, u64, u64))> =
            entries.iter().map(|e| (e.fd, (e.link.clone(), e.st.dev, e.st.ino))).collect();
        let groups = group(&keys, |a, b| same_description(pid, a, b))?;
        let by_fd: HashMap<i32, &FdEntry> = entries.iter().map(|e| (e.fd, e)).collect();

        let mut descs = Vec::new();
        let mut pipes: Vec<(PipeRec, Option<i32>, i32, bool)> = Vec::new();
        let mut pipe_index: HashMap<(u64, u64), usize> = HashMap::new();
        let mut with_contents: HashSet<(u64, u64)> = HashSet::new();
        // A deleted file or memfd the process maps too is made again by the memory
        // plugin, and opened here through one of its mappings.
        let mut mappings = None;
        // Every `lock:` line of every description, to check /proc/locks against.
        let mut lock_lines = Vec::new();
        for g in &groups {
            let first = by_fd.get(&g[0]).ok_or("internal error: grouped an fd never scanned")?;
            // Every fd of a description shows its locks: the first one's lines are all of them.
            let lines = locks::fdinfo_locks(&first.fdinfo).map_err(|e| format!("process {pid}: fd {} ({}): {e}", first.fd, first.link))?;
            let locks = locks::carried(pid, &format!("fd {} ({})", first.fd, first.link), &lines)?;
            lock_lines.extend(lines);
            if let (Some(lock), false) = (locks.first(), matches!(first.kind, Kind::Path(_) | Kind::Deleted(_) | Kind::Memfd(_) | Kind::DeletedDevice(_))) {
                return Err(format!(
                    "process {pid}: fd {} ({}) holds a {lock}, on a kind of file whose locks the files plugin does not carry",
                    first.fd, first.link
                ));
            }
            let slots: Vec<Slot> = g
                .iter()
                .filter_map(|fd| by_fd.get(fd))
                .map(|e| Slot { fd: e.fd, cloexec: e.info.flags & O_CLOEXEC != 0 })
                .collect();
            let flags = first.info.flags & !O_CLOEXEC;
            let st = &first.st;
            let key = (st.dev, st.ino);
            match &first.kind {
                Kind::Pipe { fifo } => {
                    let i = match pipe_index.get(&key) {
                        Some(&i) => i,
                        None => {
                            // Taken: a pipe between processes of a tree, whose bytes the
                            // earlier process writes (the framework claimed it for it).
                            let id = format!("{}:{}", st.dev, st.ino);
                            let elsewhere = matches!(
                                ctx.claim_shared(RStr::from_str("pipe"), RStr::from_str(&id)),
                                SharedClaim::Taken(_)
                            );
                            pipe_index.insert(key, pipes.len());
                            let rec =
                                PipeRec { ino: st.ino, fifo: fifo.clone(), size: 0, data_len: 0, ends: Vec::new() };
                            pipes.push((rec, None, first.fd, elsewhere));
                            pipes.len() - 1
                        }
                    };
                    let (rec, read_end, _, _) = &mut pipes[i];
                    if read_end.is_none() && readable(flags) {
                        *read_end = Some(first.fd);
                    }
                    rec.ends.push(PipeEnd { fds: slots, flags });
                }
                Kind::Path(_) if crate::pty::master_index(&first.fdinfo).is_some() => {
                    let index = crate::pty::master_index(&first.fdinfo).unwrap_or_default();
                    let what = format!("process {pid}: {} ({})", crate::model::fds_label(&slots), first.link);
                    let dup = fetched(ctx, first.fd, &what)?;
                    let state = Box::new(crate::pty::capture(dup.as_raw_fd(), index, &what)?);
                    descs.push((Desc { fds: slots, flags, pos: 0, object: Object::PtyMaster { index, state }, locks }, None));
                }
                Kind::Path(path) if crate::pty::slave_index(st.mode, st.rdev).is_some_and(crate::pty::master_in_request) => {
                    let stat = proc_text(ctx, "stat")?;
                    let label = crate::model::fds_label(&slots);
                    let object = crate::shell_job::describe_pair_slave(pid, &stat, &label, path, crate::pty::slave_index(st.mode, st.rdev).unwrap_or_default(), st.rdev)?;
                    descs.push((Desc { fds: slots, flags, pos: 0, object, locks }, None));
                }
                Kind::Path(path) if crate::shell_job::is_terminal(st.mode, st.rdev) => {
                    let stat = proc_text(ctx, "stat")?;
                    let label = crate::model::fds_label(&slots);
                    let object = crate::shell_job::describe(pid, &stat, &label, path, st.mode, st.rdev, st.ctime, crate::shell_job::shell_job(ctx))?;
                    descs.push((Desc { fds: slots, flags, pos: first.info.pos, object, locks }, None));
                }
                Kind::Path(path) => descs.push((
                    Desc {
                        fds: slots,
                        flags,
                        pos: first.info.pos,
                        object: Object::Path {
                            path: path.clone(),
                            mode: st.mode,
                            rdev: st.rdev,
                            tty_ctime: None,
                        },
                        locks,
                    },
                    None,
                )),
                Kind::Deleted(path) => {
                    let mapped = crate::scan::mapped_at(pid, key, &mut mappings);
                    let carries = mapped.is_none() && with_contents.insert(key);
                    let object = Object::Deleted {
                        path: path.clone(),
                        dev: st.dev,
                        ino: st.ino,
                        mode: st.mode,
                        uid: st.uid,
                        gid: st.gid,
                        size: st.size,
                        data_len: carries.then_some(st.size),
                        mapped,
                    };
                    descs.push((Desc { fds: slots, flags, pos: first.info.pos, object, locks }, carries.then_some(first.fd)));
                }
                Kind::DeletedDir(path) | Kind::DeletedDevice(path) => {
                    let dir = matches!(first.kind, Kind::DeletedDir(_));
                    let what = format!("fd {} ({} (deleted)), a {}", first.fd, path, crate::scan::type_name(st.file_type()));
                    parent_exists(pid, &what, path)?;
                    let (path, dev, ino, mode, uid, gid) = (path.clone(), st.dev, st.ino, st.mode, st.uid, st.gid);
                    let object = if dir {
                        Object::DeletedDir { path, dev, ino, mode, uid, gid }
                    } else {
                        Object::DeletedDevice { path, dev, ino, mode, rdev: st.rdev, uid, gid }
                    };
                    descs.push((Desc { fds: slots, flags, pos: first.info.pos, object, locks }, None));
                }
                Kind::Eventfd | Kind::Timerfd | Kind::Signalfd | Kind::Epoll => {
                    let what = format!("fd {} ({})", first.fd, first.link);
                    let text = &first.fdinfo;
                    let object = match first.kind {
                        Kind::Eventfd => {
                            let (count, semaphore) = parse_eventfd(text).map_err(|e| format!("{what}: {e}"))?;
                            Object::Eventfd { count, semaphore }
                        }
                        Kind::Timerfd => {
                            let (clock, mut value, interval, mut ticks) = parse_timerfd(text).map_err(|e| format!("{what}: {e}"))?;
                            if ticks > 0 && value == [0, 0] && interval != [0, 0] {
                                (ticks, value) = timerfd_expirations(&fetched(ctx, first.fd, &what)?, &what)?;
                            }
                            Object::Timerfd { clock, value, interval, ticks }
                        }
                        Kind::Signalfd => Object::Signalfd { mask: parse_signalfd(text).map_err(|e| format!("{what}: {e}"))? },
                        _ => {
                            let listed = parse_epoll(text).map_err(|e| format!("{what}: {e}"))?;
                            Object::Epoll { watches: epoll_watches(pid, first.fd, &what, &listed, &entries)? }
                        }
                    };
                    descs.push((Desc { fds: slots, flags, pos: first.info.pos, object, locks: Vec::new() }, None));
                }
                Kind::Socket(ino) => {
                    let what = format!("fd {} ({})", first.fd, first.link);
                    let Some(info) = crate::unix::query(*ino)? else {
                        // Not a Unix socket: a TCP listener, or refused.
                        let sock = fetched(ctx, first.fd, &what)?;
                        if let Some(conn) = self.tcp.read(&sock, &what)? {
                            let object = Object::Tcp { conn: Box::new(conn) };
                            descs.push((Desc { fds: slots, flags, pos: 0, object, locks: Vec::new() }, None));
                            continue;
                        }
                        let l = crate::inet::describe(&sock).map_err(|why| format!("process {pid}: {what} is {why}: not supported by the files plugin"))?;
                        let object = Object::Inet {
                            family: l.family,
                            sock_type: l.sock_type,
                            addr: to_hex(&l.addr),
                            peer: l.peer.as_deref().map(to_hex),
                            backlog: l.backlog,
                            options: l.options,
                        };
                        descs.push((Desc { fds: slots, flags, pos: 0, object, locks: Vec::new() }, None));
                        continue;
                    };
                    let ours = |i: u64| entries.iter().any(|e| e.kind == Kind::Socket(i));
                    let refuse = |why: &str| format!("process {pid}: {what} is a Unix socket {why}: not supported by the files plugin");
                    // Two unnamed ends connected to each other, both the process's.
                    let paired = |peer: u64| -> Result<bool, String> {
                        Ok(ours(peer) && crate::unix::query(peer)?.is_some_and(|p| p.name.is_none() && p.peer == *ino))
                    };
                    let pair = info.name.is_none() && info.state == crate::unix::ESTABLISHED && info.peer != 0 && paired(info.peer)?;
                    // The other end another process of the tree holds (the framework
                    // claimed every socket of the tree for its holder).
                    let across = !pair
                        && info.name.is_none()
                        && info.state == crate::unix::ESTABLISHED
                        && info.peer != 0
                        && !ours(info.peer)
                        && matches!(ctx.claim_shared(RStr::from_str("unix-socket"), RStr::from_str(&info.peer.to_string())), SharedClaim::Taken(_))
                        && crate::unix::query(info.peer)?.is_some_and(|p| p.name.is_none() && p.peer == *ino);
                    if !pair && !across {
                        // Made again from its names: a listener, a datagram socket.
                        let n = crate::unix::named(ctx.pid(), &info, crate::unix::query).map_err(|why| refuse(&why))?;
                        let object = Object::UnixSocket {
                            sock_type: n.sock_type,
                            addr: n.addr.as_deref().map(to_hex),
                            mode: n.mode,
                            peer: n.peer.as_deref().map(to_hex),
                            backlog: n.backlog,
                            unlinked: n.unlinked,
                        };
                        descs.push((Desc { fds: slots, flags, pos: 0, object, locks: Vec::new() }, None));
                        continue;
                    }
                    // For a socket of messages: the first one's length, enough to
                    // say that its queue is to be read (every message, then).
                    let data_len = info.rqueue as u64;
                    let object = Object::UnixPair { ino: *ino, peer: info.peer, sock_type: info.sock_type, shutdown: info.shutdown, data_len, across };
                    descs.push((Desc { fds: slots, flags, pos: 0, object, locks: Vec::new() }, (data_len > 0).then_some(first.fd)));
                }
                Kind::Notify => {
                    let object = crate::notify::describe(ctx, first.fd, &first.link, &first.fdinfo)?;
                    descs.push((Desc { fds: slots, flags, pos: 0, object, locks: Vec::new() }, None));
                }
                Kind::Memfd(name) => {
                    let mapped = crate::scan::mapped_at(pid, key, &mut mappings);
                    let carries = mapped.is_none() && with_contents.insert(key);
                    let object = Object::Memfd {
                        name: name.clone(),
                        dev: st.dev,
                        ino: st.ino,
                        mode: st.mode,
                        seals: 0,
                        size: st.size,
                        data_len: carries.then_some(st.size),
                        mapped,
                    };
                    // Seals are read through the fd, so every memfd description gets a source.
                    descs.push((Desc { fds: slots, flags, pos: first.info.pos, object, locks }, Some(first.fd)));
                }
            }
        }

        // Reading /proc/locks takes the kernel's file-lock lists for writing, which waits
        // for an RCU grace period (~15 ms here, all of it inside the freeze). A process
        // none of whose descriptions shows a lock has nothing there but what another
        // process's fd table would make its own (CLONE_FILES shared with a process
        // outside the event, which fdinfo shows too) and no waiting request (the freeze
        // interrupts one): only a process with locks pays for the check.
        if !lock_lines.is_empty() {
            let proc_locks = std::fs::read_to_string("/proc/locks").map_err(|e| format!("reading /proc/locks: {e}"))?;
            locks::check_proc_locks(pid, &proc_locks, &lock_lines)?;
        }

        // A pseudo-terminal's master is made before the slaves reopened by its path.
        descs.sort_by_key(|(d, _)| !matches!(d.object, Object::PtyMaster { .. }));
        let header = Header {
            format: FORMAT,
            cwd,
            root,
            umask,
            descriptions: descs.len() as u64,
            pipes: pipes.len() as u64,
            cwd_deleted,
        };
        put_json(sink, KIND_HEADER, &header)?;
        self.status.entities_total = entries.len() as u64 + 3;
        self.status.entities_done = 3;
        self.status.bytes_total = descs.iter().map(|(d, _)| d.data_len()).sum();
        for (desc, source) in descs {
            self.jobs.push_back(Job::Desc { desc, source });
        }
        for (rec, read_end, any_fd, elsewhere) in pipes {
            self.jobs.push_back(Job::Pipe { rec, read_end, any_fd, elsewhere });
        }
        Ok(())
    }
}

/// The working directory of process `pid`, and what it was when it was removed
/// while the process was in it.
fn working_directory(pid: i32) -> Result<(String, Option<GoneDir>), String> {
    let link = format!("/proc/{pid}/cwd");
    let cwd = read_link(&link)?;
    let m = std::fs::metadata(&link).map_err(|e| format!("process {pid}: stat of its working directory {cwd}: {e}"))?;
    let named = |p: &str| std::fs::metadata(p).is_ok_and(|n| n.dev() == m.dev() && n.ino() == m.ino());
    match cwd.strip_suffix(" (deleted)") {
        Some(path) if path.starts_with('/') && !named(&cwd) => {
            parent_exists(pid, "its working directory", path)?;
            let gone = GoneDir { dev: m.dev(), ino: m.ino(), mode: m.mode(), uid: m.uid(), gid: m.gid() };
            Ok((path.to_string(), Some(gone)))
        }
        _ if !cwd.starts_with('/') => {
            Err(format!("process {pid}: its working directory {cwd} is out of ferry's reach: not supported by the files plugin"))
        }
        _ => Ok((cwd, None)),
    }
}

/// What epoll instance `epfd` (`what`) of process `pid` watches, from its fdinfo
/// lines `(fd, events, data, ino)`. A watch is keyed by the file and the fd number it
/// was added by; that number may since have been closed (the file living on in a
/// `dup`) or reused for another file, so the file is looked for with `kcmp` among the
/// process's fds on the same inode, the number it was added by first.
fn epoll_watches(pid: i32, epfd: i32, what: &str, listed: &[(i32, u32, u64, u64)], entries: &[FdEntry]) -> Result<Vec<Watch>, String> {
    let mut watches = Vec::new();
    for (i, &(tfd, events, data, ino)) in listed.iter().enumerate() {
        let toff = listed[..i].iter().filter(|w| w.0 == tfd).count() as u32;
        let mut candidates: Vec<i32> = entries.iter().filter(|e| e.st.ino == ino).map(|e| e.fd).collect();
        candidates.sort_by_key(|&fd| (fd != tfd, fd));
        let mut found = None;
        for fd in candidates {
            if epoll_watches_file_of(pid, epfd, tfd, toff, fd)? {
                found = Some(fd);
                break;
            }
        }
        let Some(fd) = found else {
            return Err(format!(
                "process {pid}: {what}: the epoll instance watches a file (added as fd {tfd}, inode {ino}) that no fd of the process holds any more: not supported by the files plugin"
            ));
        };
        watches.push(Watch { fd: tfd, events, data, file: (fd != tfd).then_some(fd) });
    }
    Ok(watches)
}

pub fn object_name(o: &Object) -> String {
    match o {
        Object::Path { path, .. } | Object::Terminal { path, .. } | Object::PtySlave { path, .. } => path.clone(),
        Object::PtyMaster { index, .. } => format!("/dev/ptmx, the master of /dev/pts/{index}"),
        Object::Deleted { path, .. } => format!("{path} (deleted)"),
        Object::Memfd { name, .. } => format!("memfd:{name}"),
        Object::DeletedDir { path, .. } | Object::DeletedDevice { path, .. } => format!("{path} (deleted)"),
        Object::Eventfd { .. } => "anon_inode:[eventfd]".into(),
        Object::Timerfd { .. } => "anon_inode:[timerfd]".into(),
        Object::Signalfd { .. } => "anon_inode:[signalfd]".into(),
        Object::Epoll { .. } => "anon_inode:[eventpoll]".into(),
        Object::UnixPair { ino, .. } => format!("socket:[{ino}]"),
        Object::UnixSocket { backlog: Some(_), .. } => "listening Unix socket".into(),
        Object::UnixSocket { .. } => "Unix datagram socket".into(),
        Object::Inotify { .. } => "anon_inode:inotify".into(),
        Object::Fanotify { .. } => "anon_inode:[fanotify]".into(),
        Object::Pidfd { .. } => "anon_inode:[pidfd]".into(),
        Object::Tcp { conn } => format!("TCP{} connection", if conn.family == libc::AF_INET6 { "v6" } else { "" }),
        Object::Inet { family, sock_type, .. } => format!(
            "{}{} socket",
            if *sock_type == libc::SOCK_STREAM { "listening TCP" } else { "UDP" },
            if *family == libc::AF_INET6 { "v6" } else { "" }
        ),
    }
}
