//! Restore against a simulated kernel: a fake process context whose injected system
//! calls act on an fd table in memory (lowest free number first, like the kernel).
//! Checks that fds land at their numbers whatever the temporaries collide with, and
//! that a bad image is refused with a clear error and no panic.

use std::collections::{BTreeMap, HashMap, VecDeque};

use ferry_plugin_api::{
    abi_stable::{
        sabi_trait::TD_Opaque,
        std_types::{RResult, RSlice, RSliceMut, RVec},
    },
    MemRange, PResult, ProcessContext, ProcessContext_TO, Progress, Record, RecordFormat, RecordSource,
    RecordSource_TO, SyscallArgs,
};

use crate::model::*;
use crate::restore::Restore;

const BASE: u64 = 0x10000;
const SCRATCH: u64 = 64 * 1024;

#[derive(Debug, Clone)]
struct MDesc {
    what: String,
    flags: u32,
    pos: i64,
}

#[derive(Default)]
struct Kernel {
    fds: BTreeMap<i32, (usize, bool)>,
    descs: Vec<MDesc>,
    mem: Vec<u8>,
    /// Existing paths and their st_mode.
    files: HashMap<String, u32>,
    unlinked: Vec<String>,
    /// The modes of files unlinked (still open, fstat sees them).
    gone: HashMap<String, u32>,
    /// Bytes written to each object (path, pipe, memfd).
    contents: HashMap<String, Vec<u8>>,
    cwd: String,
    umask: u32,
    pipes: u32,
    calls: usize,
    /// Locks taken: (object, syscall, operation or fcntl command, struct flock bytes).
    locks: Vec<(String, i64, u64, Vec<u8>)>,
    /// Objects another process holds a conflicting lock on.
    conflicts: Vec<String>,
    /// Epoll watches added: (epoll object, fd number, object at that number, data).
    watches: Vec<(String, i32, String, u64)>,
    /// The call that last closed or replaced an fd, and the first lock call.
    last_fd_change: usize,
    first_lock: Option<usize>,
}

impl Kernel {
    fn new() -> Kernel {
        let mut k = Kernel { mem: vec![0; SCRATCH as usize], cwd: "/".into(), ..Kernel::default() };
        k.files.insert("/dev/null".into(), libc::S_IFCHR | 0o666);
        k.files.insert("/data".into(), libc::S_IFREG | 0o644);
        k.files.insert("/fifo".into(), libc::S_IFIFO | 0o600);
        // What ferry leaves in the child: to be closed.
        for fd in [0, 1, 2, 7] {
            let d = k.new_desc("inherited", 2);
            k.fds.insert(fd, (d, false));
        }
        k
    }

    fn new_desc(&mut self, what: &str, flags: u32) -> usize {
        self.descs.push(MDesc { what: what.into(), flags, pos: 0 });
        self.descs.len() - 1
    }

    fn lowest_free(&self, from: i32) -> i32 {
        (from..).find(|n| !self.fds.contains_key(n)).unwrap_or(-1)
    }

    fn install(&mut self, d: usize, cloexec: bool) -> i64 {
        let fd = self.lowest_free(0);
        self.fds.insert(fd, (d, cloexec));
        fd as i64
    }

    fn cstr(&self, addr: u64) -> String {
        let at = (addr - BASE) as usize;
        let end = self.mem[at..].iter().position(|&b| b == 0).unwrap() + at;
        String::from_utf8(self.mem[at..end].to_vec()).unwrap()
    }

    fn desc_of(&self, fd: u64) -> Option<usize> {
        self.fds.get(&(fd as i32)).map(|e| e.0)
    }

    fn syscall(&mut self, nr: i64, a: [u64; 6]) -> i64 {
        self.calls += 1;
        let ebadf = -(libc::EBADF as i64);
        if matches!(nr, libc::SYS_close | libc::SYS_dup3 | libc::SYS_close_range) {
            self.last_fd_change = self.calls;
        }
        match nr {
            libc::SYS_close_range => {
                self.fds.clear();
                0
            }
            libc::SYS_flock => {
                let Some(d) = self.desc_of(a[0]) else { return ebadf };
                self.lock(d, nr, a[1], Vec::new())
            }
            libc::SYS_fcntl if [libc::F_SETLK, libc::F_OFD_SETLK].contains(&(a[1] as i32)) => {
                let Some(d) = self.desc_of(a[0]) else { return ebadf };
                let at = (a[2] - BASE) as usize;
                let fl = self.mem[at..at + 32].to_vec();
                self.lock(d, nr, a[1], fl)
            }
            libc::SYS_close => match self.fds.remove(&(a[0] as i32)) {
                Some(_) => 0,
                None => ebadf,
            },
            libc::SYS_openat => {
                let path = self.cstr(a[1]);
                let flags = a[2] as u32;
                let acc = flags & (libc::O_ACCMODE | libc::O_APPEND | libc::O_NONBLOCK | libc::O_PATH) as u32;
                if let Some(n) = path.strip_prefix("/proc/self/fd/") {
                    let Some(d) = n.parse::<u64>().ok().and_then(|n| self.desc_of(n)) else { return -2 };
                    let what = self.descs[d].what.clone();
                    let nd = self.new_desc(&what, acc);
                    return self.install(nd, true);
                }
                let exists = self.files.contains_key(&path);
                if flags & libc::O_CREAT as u32 != 0 {
                    if exists && flags & libc::O_EXCL as u32 != 0 {
                        return -(libc::EEXIST as i64);
                    }
                    self.files.insert(path.clone(), libc::S_IFREG | 0o600);
                } else if !exists {
                    return -(libc::ENOENT as i64);
                }
                let nd = self.new_desc(&path, acc);
                self.install(nd, true)
            }
            libc::SYS_dup3 => {
                let Some(d) = self.desc_of(a[0]) else { return ebadf };
                if a[0] == a[1] {
                    return -(libc::EINVAL as i64);
                }
                self.fds.insert(a[1] as i32, (d, a[2] != 0));
                a[1] as i64
            }
            libc::SYS_fcntl => {
                let Some(d) = self.desc_of(a[0]) else { return ebadf };
                match a[1] as i32 {
                    libc::F_DUPFD_CLOEXEC => {
                        let fd = self.lowest_free(a[2] as i32);
                        self.fds.insert(fd, (d, true));
                        fd as i64
                    }
                    libc::F_SETFD => {
                        self.fds.insert(a[0] as i32, (d, a[2] != 0));
                        0
                    }
                    libc::F_SETFL => {
                        let f = &mut self.descs[d].flags;
                        *f = (*f & !(libc::O_APPEND | libc::O_NONBLOCK) as u32) | a[2] as u32;
                        0
                    }
                    libc::F_SETPIPE_SZ => a[2] as i64,
                    libc::F_GETFD => self.fds[&(a[0] as i32)].1 as i64,
                    libc::F_ADD_SEALS => 0,
                    _ => -(libc::EINVAL as i64),
                }
            }
            libc::SYS_pipe2 => {
                self.pipes += 1;
                let what = format!("pipe{}", self.pipes);
                let r = self.new_desc(&what, libc::O_RDONLY as u32 | a[1] as u32 & libc::O_NONBLOCK as u32);
                let w = self.new_desc(&what, libc::O_WRONLY as u32 | a[1] as u32 & libc::O_NONBLOCK as u32);
                let rf = self.install(r, true) as i32;
                let wf = self.install(w, true) as i32;
                let at = (a[0] - BASE) as usize;
                self.mem[at..at + 4].copy_from_slice(&rf.to_ne_bytes());
                self.mem[at + 4..at + 8].copy_from_slice(&wf.to_ne_bytes());
                0
            }
            libc::SYS_memfd_create => {
                let name = format!("memfd:{}", self.cstr(a[0]));
                let d = self.new_desc(&name, libc::O_RDWR as u32);
                self.install(d, true)
            }
            libc::SYS_write => {
                let Some(d) = self.desc_of(a[0]) else { return ebadf };
                let at = (a[1] - BASE) as usize;
                let bytes = self.mem[at..at + a[2] as usize].to_vec();
                let what = self.descs[d].what.clone();
                self.contents.entry(what).or_default().extend_from_slice(&bytes);
                a[2] as i64
            }
            libc::SYS_lseek => {
                let Some(d) = self.desc_of(a[0]) else { return ebadf };
                self.descs[d].pos = a[1] as i64;
                a[1] as i64
            }
            libc::SYS_fstat => {
                let Some(d) = self.desc_of(a[0]) else { return ebadf };
                let what = &self.descs[d].what;
                let mode =
                    if what.starts_with("pipe") { libc::S_IFIFO } else { self.files.get(what).or(self.gone.get(what)).copied().unwrap_or(0) };
                // SAFETY: a zeroed struct stat is a valid value.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                st.st_mode = mode;
                st.st_rdev = if mode & libc::S_IFMT == libc::S_IFCHR { libc::makedev(1, 3) } else { 0 };
                // SAFETY: reading the bytes of a plain C struct.
                let bytes = unsafe {
                    std::slice::from_raw_parts(&st as *const libc::stat as *const u8, std::mem::size_of::<libc::stat>())
                };
                let at = (a[1] - BASE) as usize;
                self.mem[at..at + bytes.len()].copy_from_slice(bytes);
                0
            }
            libc::SYS_unlinkat => {
                let p = self.cstr(a[1]);
                let dir = self.files.get(&p).is_some_and(|m| m & libc::S_IFMT == libc::S_IFDIR);
                if dir != (a[2] == 0x200) {
                    return -(if dir { libc::EISDIR } else { libc::ENOTDIR } as i64);
                }
                if let Some(m) = self.files.remove(&p) {
                    self.gone.insert(p.clone(), m);
                }
                self.unlinked.push(p);
                0
            }
            libc::SYS_mkdirat | libc::SYS_mknodat => {
                let p = self.cstr(a[1]);
                if self.files.contains_key(&p) {
                    return -(libc::EEXIST as i64);
                }
                let mode = if nr == libc::SYS_mkdirat { libc::S_IFDIR | a[2] as u32 } else { a[2] as u32 };
                self.files.insert(p, mode);
                0
            }
            libc::SYS_fchmodat => {
                let p = self.cstr(a[1]);
                let Some(m) = self.files.get_mut(&p) else { return -(libc::ENOENT as i64) };
                *m = (*m & libc::S_IFMT) | a[2] as u32;
                0
            }
            libc::SYS_fchdir => {
                let Some(d) = self.desc_of(a[0]) else { return ebadf };
                self.cwd = format!("fd:{}", self.descs[d].what);
                0
            }
            libc::SYS_epoll_create1 => {
                let d = self.new_desc("epoll", libc::O_RDWR as u32);
                self.install(d, true)
            }
            libc::SYS_epoll_ctl => {
                let (Some(ep), Some(d)) = (self.desc_of(a[0]), self.desc_of(a[2])) else { return ebadf };
                let at = (a[3] - BASE) as usize;
                let data = u64::from_le_bytes(self.mem[at + 4..at + 12].try_into().unwrap());
                let (ep, what) = (self.descs[ep].what.clone(), self.descs[d].what.clone());
                self.watches.push((ep, a[2] as i32, what, data));
                0
            }
            libc::SYS_chdir => {
                self.cwd = self.cstr(a[0]);
                0
            }
            libc::SYS_umask => {
                self.umask = a[0] as u32;
                0o22
            }
            libc::SYS_fchown | libc::SYS_fchownat | libc::SYS_fchmod | libc::SYS_ftruncate | libc::SYS_chroot => 0,
            _ => -(libc::ENOSYS as i64),
        }
    }
}

impl Kernel {
    fn lock(&mut self, d: usize, nr: i64, op: u64, fl: Vec<u8>) -> i64 {
        let what = self.descs[d].what.clone();
        if self.conflicts.contains(&what) {
            return -(libc::EAGAIN as i64);
        }
        self.first_lock.get_or_insert(self.calls);
        self.locks.push((what, nr, op, fl));
        0
    }
}

impl ProcessContext for Kernel {
    fn pid(&self) -> i32 {
        4242
    }
    fn tids(&self) -> RVec<i32> {
        vec![4242].into()
    }
    fn read_memory(&mut self, addr: u64, mut buf: RSliceMut<'_, u8>) -> PResult<usize> {
        let at = (addr - BASE) as usize;
        let n = buf.len();
        buf.as_mut_slice().copy_from_slice(&self.mem[at..at + n]);
        RResult::ROk(n)
    }
    fn write_memory(&mut self, addr: u64, data: RSlice<'_, u8>) -> PResult<usize> {
        let at = (addr - BASE) as usize;
        self.mem[at..at + data.len()].copy_from_slice(data.as_slice());
        RResult::ROk(data.len())
    }
    fn scratch(&self) -> MemRange {
        MemRange { addr: BASE, len: SCRATCH }
    }
    fn inject_syscall(&mut self, _tid: i32, nr: i64, args: SyscallArgs) -> PResult<i64> {
        RResult::ROk(self.syscall(nr, args.0))
    }
}

struct Source(VecDeque<Record>);

impl RecordSource for Source {
    fn next(&mut self) -> PResult<ferry_plugin_api::abi_stable::std_types::ROption<Record>> {
        RResult::ROk(self.0.pop_front().into())
    }
}

fn json(kind: &str, v: &impl serde::Serialize) -> Record {
    Record { kind: kind.into(), format: RecordFormat::Json, payload: serde_json::to_vec(v).unwrap().into() }
}

fn raw(kind: &str, b: &[u8]) -> Record {
    Record { kind: kind.into(), format: RecordFormat::Raw, payload: b.to_vec().into() }
}

fn header(descriptions: u64, pipes: u64) -> Record {
    json(
        KIND_HEADER,
        &Header { format: FORMAT, cwd: "/work".into(), root: "/".into(), umask: 0o27, descriptions, pipes, cwd_deleted: None },
    )
}

fn slot(fd: i32, cloexec: bool) -> Slot {
    Slot { fd, cloexec }
}

fn path_desc(path: &str, mode: u32, fds: Vec<Slot>, flags: u32, pos: i64) -> Record {
    let rdev = if mode & libc::S_IFMT == libc::S_IFCHR { libc::makedev(1, 3) } else { 0 };
    json(KIND_DESC, &Desc { fds, flags, pos, object: Object::Path { path: path.into(), mode, rdev, tty_ctime: None }, locks: Vec::new() })
}

/// Runs a restore of `records` to the end; answers the kernel and the outcome.
fn run(records: Vec<Record>) -> (Kernel, Result<(), String>) {
    run_on(Kernel::new(), records)
}

/// [`run`] on kernel `k`.
fn run_on(mut k: Kernel, records: Vec<Record>) -> (Kernel, Result<(), String>) {
    let mut src = Source(records.into());
    let mut r = Restore::default();
    let outcome = {
        let mut ctx = ProcessContext_TO::from_ptr(&mut k, TD_Opaque);
        let mut source = RecordSource_TO::from_ptr(&mut src, TD_Opaque);
        let mut out = Ok(());
        for _ in 0..10_000 {
            match r.step(&mut ctx, &mut source) {
                Ok(Progress::Done) => break,
                Ok(Progress::More) => {}
                Err(e) => {
                    out = Err(e);
                    break;
                }
            }
        }
        out
    };
    if outcome.is_err() {
        r.cleanup();
    }
    (k, outcome)
}

/// fd -> (object, access mode and status flags, cloexec, pos)
fn table(k: &Kernel) -> BTreeMap<i32, (String, u32, bool, i64)> {
    k.fds
        .iter()
        .map(|(&fd, &(d, cloexec))| {
            let x = &k.descs[d];
            (fd, (x.what.clone(), x.flags, cloexec, x.pos))
        })
        .collect()
}

#[test]
fn fds_land_at_their_numbers_through_collisions() {
    let rdonly = libc::O_RDONLY as u32;
    let wronly = libc::O_WRONLY as u32;
    let rdwr = libc::O_RDWR as u32;
    let nb = libc::O_NONBLOCK as u32;
    let records = vec![
        header(2, 1),
        // The pipe's write end at 0 and read end at 1: the pipe2 temporaries land on
        // 0 and 1 the other way round.
        path_desc("/dev/null", libc::S_IFCHR | 0o666, vec![slot(2, false), slot(50, true)], rdwr, 0),
        path_desc("/data", libc::S_IFREG | 0o644, vec![slot(3, false), slot(4, false)], rdwr | 0o100000, 10),
        json(
            KIND_PIPE,
            &PipeRec {
                ino: 77,
                fifo: None,
                size: 65536,
                data_len: 5,
                ends: vec![
                    PipeEnd { fds: vec![slot(1, false)], flags: rdonly },
                    PipeEnd { fds: vec![slot(0, false)], flags: wronly | nb },
                    PipeEnd { fds: vec![slot(5, true)], flags: rdonly | nb },
                ],
            },
        ),
        raw(KIND_PIPE_DATA, b"hello"),
    ];
    let (k, r) = run(records);
    r.unwrap();
    let t = table(&k);
    assert_eq!(t.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2, 3, 4, 5, 50], "{t:?}");
    assert_eq!(t[&0], ("pipe1".into(), wronly | nb, false, 0));
    assert_eq!(t[&1], ("pipe1".into(), rdonly, false, 0));
    assert_eq!(t[&5].0, "pipe1");
    assert_eq!((t[&5].1, t[&5].2), (rdonly | nb, true));
    // 0 and 1 are the pipe's own two descriptions, 5 a third one.
    assert_ne!(k.fds[&0].0, k.fds[&1].0);
    assert_ne!(k.fds[&5].0, k.fds[&1].0);
    assert_eq!(k.contents["pipe1"], b"hello");
    assert_eq!(t[&2], ("/dev/null".into(), rdwr, false, 0));
    assert_eq!(t[&50], ("/dev/null".into(), rdwr, true, 0));
    // 3 and 4 share one description with its offset.
    assert_eq!(k.fds[&3].0, k.fds[&4].0);
    assert_eq!(t[&3].3, 10);
    assert_eq!((k.cwd.as_str(), k.umask), ("/work", 0o27));
}

#[test]
fn deleted_files_and_memfds_are_recreated_once() {
    let rdwr = libc::O_RDWR as u32;
    let content = vec![7u8; CHUNK + 10];
    let deleted = |data_len| Object::Deleted {
        path: "/data".into(), // the name is taken again: a name beside it is used
        dev: 1,
        ino: 99,
        mode: libc::S_IFREG | 0o640,
        uid: 0,
        gid: 0,
        size: content.len() as u64,
        data_len,
        mapped: None,
    };
    let memfd = |data_len| Object::Memfd {
        name: "m".into(),
        dev: 2,
        ino: 5,
        mode: libc::S_IFREG | 0o600,
        seals: 3,
        size: 4,
        data_len,
        mapped: None,
    };
    let records = vec![
        header(4, 0),
        json(
            KIND_DESC,
            &Desc { fds: vec![slot(0, false)], flags: rdwr, pos: 5, object: deleted(Some(content.len() as u64)), locks: Vec::new() },
        ),
        raw(KIND_DESC_DATA, &content[..CHUNK]),
        raw(KIND_DESC_DATA, &content[CHUNK..]),
        json(
            KIND_DESC,
            &Desc { fds: vec![slot(1, false)], flags: libc::O_WRONLY as u32, pos: 0, object: deleted(None), locks: Vec::new() },
        ),
        json(KIND_DESC, &Desc { fds: vec![slot(9, false)], flags: rdwr, pos: 2, object: memfd(Some(4)), locks: Vec::new() }),
        raw(KIND_DESC_DATA, b"abcd"),
        json(KIND_DESC, &Desc { fds: vec![slot(8, false)], flags: libc::O_RDONLY as u32, pos: 1, object: memfd(None), locks: Vec::new() }),
    ];
    let (k, r) = run(records);
    r.unwrap();
    let t = table(&k);
    assert_eq!(t.keys().copied().collect::<Vec<_>>(), vec![0, 1, 8, 9], "{t:?}");
    assert_eq!(t[&0].0, "/.ferry-deleted-99-1");
    assert_eq!(t[&0].0, t[&1].0);
    assert_eq!(k.contents["/.ferry-deleted-99-1"], content);
    assert_eq!(t[&0].3, 5);
    assert_eq!(k.unlinked, vec!["/.ferry-deleted-99-1".to_string()]);
    assert!(k.files.contains_key("/data"), "the other file of that name stays");
    assert_eq!(t[&9].0, "memfd:m");
    assert_eq!(t[&8].0, "memfd:m");
    assert_eq!((t[&9].3, t[&8].3), (2, 1));
    assert_eq!(k.contents["memfd:m"], b"abcd");
}

fn expect_error(records: Vec<Record>, want: &str) {
    let (_, r) = run(records);
    let e = r.expect_err("the image must be refused");
    assert!(e.contains(want), "error {e:?} does not say {want:?}");
}

#[test]
fn bad_images_are_refused() {
    let rdwr = libc::O_RDWR as u32;
    let null = |fds| path_desc("/dev/null", libc::S_IFCHR | 0o666, fds, rdwr, 0);
    expect_error(vec![], "no `files` record");
    expect_error(vec![header(1, 0), null(vec![slot(MAX_FD + 1, false)])], "out of range");
    expect_error(vec![header(1, 0), null(vec![slot(-3, false)])], "out of range");
    expect_error(vec![header(2, 0), null(vec![slot(3, false)]), null(vec![slot(3, true)])], "named twice");
    expect_error(vec![header(2, 0), null(vec![slot(3, false)])], "still missing");
    expect_error(vec![header(1, 0), null(vec![slot(3, false)]), null(vec![slot(4, false)])], "unexpected `fd` record");
    expect_error(vec![header(0, 1), null(vec![slot(3, false)])], "unexpected `fd` record");
    // A path that is no longer the kind of file it was.
    expect_error(
        vec![header(1, 0), path_desc("/data", libc::S_IFCHR | 0o666, vec![slot(3, false)], rdwr, 0)],
        "now a regular file",
    );
    expect_error(vec![header(1, 0), path_desc("/gone", libc::S_IFREG, vec![slot(3, false)], rdwr, 0)], "/gone");
    // Contents that do not match the lengths the JSON gave.
    let pipe = |data_len| {
        json(
            KIND_PIPE,
            &PipeRec {
                ino: 1,
                fifo: None,
                size: 4096,
                data_len,
                ends: vec![PipeEnd { fds: vec![slot(3, false)], flags: 0 }],
            },
        )
    };
    expect_error(vec![header(0, 1), pipe(3), raw(KIND_PIPE_DATA, b"toolong")], "more than the 3 bytes");
    expect_error(vec![header(0, 1), pipe(3)], "3 content bytes missing");
    expect_error(vec![header(0, 1), pipe(3), raw(KIND_DESC_DATA, b"abc")], "expected a raw `pipe-data` record");
    expect_error(vec![header(0, 1), pipe(5000)], "5000 bytes queued");
    expect_error(vec![header(0, 1), pipe(0), raw(KIND_PIPE_DATA, b"x")], "after the last");
    // Bad JSON and unknown fields.
    expect_error(
        vec![
            header(1, 0),
            Record { kind: KIND_DESC.into(), format: RecordFormat::Json, payload: b"{\"fds\":".to_vec().into() },
        ],
        "record `fd`",
    );
    let mut h = serde_json::to_value(Header {
        format: FORMAT,
        cwd: "/".into(),
        root: "/".into(),
        umask: 0,
        descriptions: 0,
        pipes: 0,
        cwd_deleted: None,
    })
    .unwrap();
    h["extra"] = 1.into();
    expect_error(vec![json(KIND_HEADER, &h)], "unknown field");
    // A shared deleted file named before its contents.
    let later = Object::Deleted { path: "/x".into(), dev: 1, ino: 2, mode: 0, uid: 0, gid: 0, size: 1, data_len: None, mapped: None };
    expect_error(
        vec![header(1, 0), json(KIND_DESC, &Desc { fds: vec![slot(3, false)], flags: rdwr, pos: 0, object: later, locks: Vec::new() })],
        "before the description that carries its contents",
    );
}

#[test]
fn a_failed_restore_removes_the_files_it_created() {
    // The restore child shares ferry's view of the file system: the file it recreated
    // for the deleted description (made here by hand, as the mock kernel only records
    // the open) must be gone from the real one when the restore fails.
    let dir = std::env::temp_dir().join(format!("ferry-files-mock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("x");
    std::fs::write(&path, b"ab").unwrap();
    let obj = Object::Deleted {
        path: path.to_str().unwrap().into(),
        dev: 1,
        ino: 2,
        mode: 0,
        uid: 0,
        gid: 0,
        size: 4,
        data_len: Some(4),
        mapped: None,
    };
    let records = vec![
        header(1, 0),
        json(KIND_DESC, &Desc { fds: vec![slot(3, false)], flags: libc::O_RDWR as u32, pos: 0, object: obj, locks: Vec::new() }),
        raw(KIND_DESC_DATA, b"ab"),
    ];
    let (k, r) = run(records);
    let left = path.exists();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(r.unwrap_err().contains("2 content bytes missing"));
    // Not unlinked by an injected call (the restore never got that far), but removed
    // by the cleanup.
    assert!(k.unlinked.is_empty());
    assert!(!left, "the recreated file was left behind");
}

#[test]
fn locks_are_taken_last_through_their_descriptions() {
    use crate::locks::{Lock, LockKind};
    let rdwr = libc::O_RDWR as u32;
    let posix = Lock { kind: LockKind::Posix, write: true, start: 0, len: 10 };
    let ofd = Lock { kind: LockKind::Ofd, write: false, start: 100, len: 0 };
    let flock = Lock { kind: LockKind::Flock, write: true, start: 0, len: 0 };
    let object = || Object::Path { path: "/data".into(), mode: libc::S_IFREG | 0o644, rdev: 0, tty_ctime: None };
    let records = || {
        vec![
            header(3, 0),
            // Two descriptions of one file, the second one's fd landing where the first
            // one's temporary would: a close or dup3 after a POSIX lock would drop it.
            json(KIND_DESC, &Desc { fds: vec![slot(1, false)], flags: rdwr, pos: 0, object: object(), locks: vec![posix, ofd] }),
            json(KIND_DESC, &Desc { fds: vec![slot(0, false), slot(4, false)], flags: rdwr, pos: 0, object: object(), locks: vec![flock] }),
            path_desc("/dev/null", libc::S_IFCHR | 0o666, vec![slot(2, false)], rdwr, 0),
        ]
    };
    let (k, r) = run(records());
    r.unwrap();
    let took: Vec<(String, i64, u64)> = k.locks.iter().map(|l| (l.0.clone(), l.1, l.2)).collect();
    assert_eq!(
        took,
        vec![
            ("/data".into(), libc::SYS_fcntl, libc::F_SETLK as u64),
            ("/data".into(), libc::SYS_fcntl, libc::F_OFD_SETLK as u64),
            ("/data".into(), libc::SYS_flock, (libc::LOCK_EX | libc::LOCK_NB) as u64),
        ]
    );
    assert_eq!(k.locks[0].3, posix.flock_struct().to_vec());
    assert_eq!(k.locks[1].3, ofd.flock_struct().to_vec());
    assert!(k.first_lock.is_some_and(|f| f > k.last_fd_change), "no fd closed or replaced after the first lock");

    // Another process holds a conflicting lock: the restore fails naming it.
    let mut held = Kernel::new();
    held.conflicts.push("/data".into());
    let (_, r) = run_on(held, records());
    assert_eq!(
        r.unwrap_err(),
        "restored process 4242: fd 1 (/data): its POSIX write lock on bytes 0-9 cannot be taken again: another process holds a conflicting lock (within one machine, a migration's source still holds its own)"
    );

    // Locks on what the plugin does not lock, or nonsense ranges, are refused.
    let eventfd = Desc { fds: vec![slot(3, false)], flags: rdwr, pos: 0, object: Object::Eventfd { count: 0, semaphore: false }, locks: vec![flock] };
    expect_error(vec![header(1, 0), json(KIND_DESC, &eventfd)], "locks on a file this plugin does not lock");
    let bad = Lock { kind: LockKind::Posix, write: true, start: -5, len: 1 };
    let d = Desc { fds: vec![slot(3, false)], flags: rdwr, pos: 0, object: object(), locks: vec![bad] };
    expect_error(vec![header(1, 0), json(KIND_DESC, &d)], "a lock the image describes wrongly");
}

#[test]
fn a_terminal_is_reopened_only_where_it_is_the_same_one() {
    let tty = |ctime| {
        let object = Object::Path { path: "/dev/null".into(), mode: libc::S_IFCHR | 0o620, rdev: libc::makedev(1, 3), tty_ctime: Some(ctime) };
        vec![header(1, 0), json(KIND_DESC, &Desc { fds: vec![slot(1, false)], flags: libc::O_RDWR as u32, pos: 0, object, locks: Vec::new() })]
    };
    // The simulated kernel's nodes were all made at time 0.
    let (k, r) = run(tty([0, 0]));
    r.unwrap();
    assert_eq!(table(&k)[&1].0, "/dev/null");
    let (_, r) = run(tty([1700000000, 5]));
    let e = r.unwrap_err();
    assert!(e.starts_with("fd 1 (/dev/null): the terminal there is not the process's (made at 0.000000000, the process's at 1700000000.000000005)"), "{e}");
}

#[test]
fn removed_directories_nodes_and_the_cwd_come_back_and_go_again() {
    let dir = |path: &str| Object::DeletedDir { path: path.into(), dev: 1, ino: 40, mode: libc::S_IFDIR | 0o751, uid: 7, gid: 8 };
    let dflags = (libc::O_RDONLY | libc::O_DIRECTORY) as u32;
    let node = Object::DeletedDevice { path: "/zero".into(), dev: 1, ino: 41, mode: libc::S_IFCHR | 0o640, rdev: libc::makedev(1, 3), uid: 0, gid: 0 };
    let mut k = Kernel::new();
    k.files.insert("/gone".into(), libc::S_IFREG | 0o644); // the name is taken again
    let h = Header {
        format: FORMAT,
        cwd: "/gone".into(),
        root: "/".into(),
        umask: 0o22,
        descriptions: 3,
        pipes: 0,
        cwd_deleted: Some(GoneDir { dev: 1, ino: 40, mode: libc::S_IFDIR | 0o751, uid: 7, gid: 8 }),
    };
    let records = vec![
        json(KIND_HEADER, &h),
        json(KIND_DESC, &Desc { fds: vec![slot(3, true)], flags: dflags, pos: 0, object: dir("/gone"), locks: Vec::new() }),
        json(KIND_DESC, &Desc { fds: vec![slot(4, false)], flags: dflags, pos: 0, object: dir("/gone"), locks: Vec::new() }),
        json(KIND_DESC, &Desc { fds: vec![slot(5, false)], flags: libc::O_RDWR as u32, pos: 0, object: node, locks: Vec::new() }),
    ];
    let (k, r) = run_on(k, records);
    r.unwrap();
    let t = table(&k);
    // One directory, made beside the taken name, reopened for the second description.
    assert_eq!(t[&3].0, "/.ferry-deleted-40-1");
    assert_eq!(t[&4].0, "/.ferry-deleted-40-1");
    assert!(t[&3].2 && !t[&4].2, "{t:?}");
    assert_eq!(t[&5].0, "/zero");
    assert_eq!(k.unlinked, vec!["/.ferry-deleted-40-1".to_string(), "/zero".to_string()]);
    assert_eq!(k.files.get("/gone"), Some(&(libc::S_IFREG | 0o644)), "the other file of that name stays");
    // The working directory is the same directory, entered through its fd.
    assert_eq!(k.cwd, "fd:/.ferry-deleted-40-1");
}

#[test]
fn a_watch_of_a_closed_fd_is_added_again_under_its_number() {
    let rdonly = libc::O_RDONLY as u32;
    let watches = vec![
        Watch { fd: 6, events: 1, data: 0xfeed, file: Some(4) }, // 6 is /dev/null now
        Watch { fd: 9, events: 1, data: 0xbeef, file: Some(4) }, // 9 is free
        Watch { fd: 5, events: 4, data: 5, file: None },
    ];
    let epoll = Desc { fds: vec![slot(3, true)], flags: 2, pos: 0, object: Object::Epoll { watches }, locks: Vec::new() };
    let records = vec![
        header(4, 0),
        json(KIND_DESC, &epoll),
        path_desc("/data", libc::S_IFREG | 0o644, vec![slot(4, false)], rdonly, 0),
        path_desc("/data", libc::S_IFREG | 0o644, vec![slot(5, false)], rdonly, 0),
        path_desc("/dev/null", libc::S_IFCHR | 0o666, vec![slot(6, false)], rdonly, 0),
    ];
    let (k, r) = run(records);
    r.unwrap();
    // Each watch keyed by its own number, on the file that fd 4 holds.
    let at = |fd| k.watches.iter().find(|w| w.1 == fd).cloned().unwrap_or_else(|| panic!("{:?}", k.watches));
    assert_eq!(at(6), ("epoll".into(), 6, "/data".into(), 0xfeed));
    assert_eq!(at(9), ("epoll".into(), 9, "/data".into(), 0xbeef));
    assert_eq!(at(5).2, "/data");
    // Fd 6 holds /dev/null again, without close-on-exec; 9 is closed again.
    let t = table(&k);
    assert_eq!(t.keys().copied().collect::<Vec<_>>(), vec![3, 4, 5, 6], "{t:?}");
    assert_eq!((t[&6].0.as_str(), t[&6].2), ("/dev/null", false));
}
