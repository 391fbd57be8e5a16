//! Pseudo-terminal pairs both of whose ends belong to the request (tmux, screen,
//! `script` and their shells; a program that holds both ends).
//!
//! The master is made again through `/dev/ptmx` with its index (`/dev/pts/N`): masters
//! are opened until the kernel hands out index N, the others closed (it hands out the
//! lowest free one, so a higher one means N is taken: refused). It gets the pair's
//! termios (`TCGETS2`, the slave's: the master's ioctls act on it), window size,
//! packet mode (a locked pair is refused: its slave could not be reopened while
//! locked; the lock is recorded and set again for the day it is carried), and the
//! bytes unread in both directions: those the
//! slave side wrote and the master has not read, and those the master side wrote
//! (typed) and the slave has not read, canonical lines and a line being typed kept as
//! they were. A slave (`/dev/pts/N`) is reopened by its path once its master is made —
//! by the same process, or by one restored before it (the framework refuses a tree
//! whose slave holder comes first) — and is its session leader's controlling terminal
//! again, with the foreground group it had.
//!
//! Queued bytes cannot be peeked at: they are read at the checkpoint, from ferry's
//! duplicate of the master (`pidfd_getfd`) and of a slave opened through it
//! (`TIOCGPTPEER`), and put back at once into the still frozen source, each byte by
//! `TIOCSTI` (taken in by the line discipline as it is received, synchronously) under
//! settings that neither echo nor translate it; the copy gets them the same way. So
//! the source keeps them whether the request succeeds or not.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use ferry_plugin_api::{
    util::{from_hex, proc_field, read_memory, syscall_raw, to_hex, Scratch},
    ContextRef,
};
use serde::{Deserialize, Serialize};

/// `UNIX98_PTY_SLAVE_MAJOR`: every `/dev/pts/N` is device 136+:N.
const PTS_MAJOR: u32 = 136;

const TCGETS2: u64 = 0x802C_542A;
const TCSETS2: u64 = 0x402C_542B;
const TIOCGPTN: u64 = 0x8004_5430;
const TIOCSPTLCK: u64 = 0x4004_5431;
const TIOCGPTLCK: u64 = 0x8004_5439;
const TIOCGPKT: u64 = 0x8004_5438;
const TIOCPKT: u64 = 0x5420;
const TIOCGPTPEER: u64 = 0x5441;
const TIOCSTI: u64 = 0x5412;
const TIOCGWINSZ: u64 = 0x5413;
const TIOCSWINSZ: u64 = 0x5414;
const FIONREAD: u64 = 0x541B;

/// `struct termios2`: four flag words, the line discipline, 19 control characters,
/// two speeds.
const TERMIOS2_LEN: usize = 44;
const IFLAG: usize = 0;
const LFLAG: usize = 12;
const CC: usize = 17;
/// The most a line discipline holds (`N_TTY_BUF_SIZE`).
const QUEUE_MAX: usize = 4096;
/// Masters opened at most to reach an index.
const OPENS_MAX: u32 = 4096;

/// The state of a pair, recorded with its master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtyState {
    /// `struct termios2`, hex.
    pub termios: String,
    /// rows, columns, x pixels, y pixels.
    pub winsize: [u16; 4],
    pub packet: bool,
    pub locked: bool,
    /// Typed on the master, unread by the slave side, hex.
    pub input: String,
    /// Written by the slave side, unread on the master, hex.
    pub output: String,
}

/// The pts index of a slave device, if `mode`/`rdev` are one.
pub fn slave_index(mode: u32, rdev: u64) -> Option<u32> {
    let major = libc::major(rdev);
    (mode & libc::S_IFMT == libc::S_IFCHR && (PTS_MAJOR..PTS_MAJOR + 8).contains(&major))
        .then(|| (major - PTS_MAJOR) * 256 + libc::minor(rdev))
}

/// The pts index of a master, from its fdinfo (`tty-index:`).
pub fn master_index(fdinfo: &str) -> Option<u32> {
    proc_field(fdinfo, "tty-index").and_then(|i| i.trim().parse().ok())
}

/// Whether a process ferry holds (one of the request: ferry seizes each) holds the
/// master of `/dev/pts/index`.
pub fn master_in_request(index: u32) -> bool {
    processes().any(|pid| traced_by_me(pid) && holds(pid, |info, _| master_index(info) == Some(index)))
}

/// Whether ferry traces `pid` (seized it for this request). `TracerPid` names the
/// tracing thread, one of ferry's (each process of a tree has its own worker).
pub fn traced_by_me(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    proc_field(&status, "TracerPid")
        .and_then(|t| t.trim().parse::<u32>().ok())
        .is_some_and(|t| t != 0 && std::path::Path::new(&format!("/proc/self/task/{t}")).exists())
}

fn processes() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc").into_iter().flatten().flatten().filter_map(|e| e.file_name().to_str()?.parse().ok())
}

/// Whether `pid` has an fd whose fdinfo and link satisfy `what`.
fn holds(pid: u32, what: impl Fn(&str, &str) -> bool) -> bool {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    dir.flatten().any(|e| {
        let link = std::fs::read_link(e.path()).map(|l| l.to_string_lossy().into_owned()).unwrap_or_default();
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy())).unwrap_or_default();
        what(&info, &link)
    })
}

/// The calls a pair is read and made with: ferry's own on its duplicates, or
/// injected into the restore child.
trait Calls {
    /// `ioctl(fd, req, buf)`, the buffer in and out; the raw result.
    fn ioctl_buf(&mut self, fd: i32, req: u64, buf: &mut [u8]) -> Result<i64, String>;
    /// `ioctl(fd, req, arg)`; the raw result.
    fn ioctl_arg(&mut self, fd: i32, req: u64, arg: u64) -> Result<i64, String>;
    fn read(&mut self, fd: i32, len: usize) -> Result<Vec<u8>, String>;
}

fn errno(r: i64) -> std::io::Error {
    std::io::Error::from_raw_os_error(-r as i32)
}

fn check(what: &str, call: &str, r: i64) -> Result<i64, String> {
    if r < 0 {
        return Err(format!("{what}: {call}: {}", errno(r)));
    }
    Ok(r)
}

/// ferry's own calls.
struct Local;

impl Calls for Local {
    fn ioctl_buf(&mut self, fd: i32, req: u64, buf: &mut [u8]) -> Result<i64, String> {
        // SAFETY: every request used with it reads or writes at most `buf.len()` bytes.
        let r = unsafe { libc::ioctl(fd, req as _, buf.as_mut_ptr()) };
        Ok(if r < 0 { -(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO) as i64) } else { r as i64 })
    }
    fn ioctl_arg(&mut self, fd: i32, req: u64, arg: u64) -> Result<i64, String> {
        // SAFETY: the requests used with it take an integer argument.
        let r = unsafe { libc::ioctl(fd, req as _, arg) };
        Ok(if r < 0 { -(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO) as i64) } else { r as i64 })
    }
    fn read(&mut self, fd: i32, len: usize) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; len];
        // SAFETY: reading at most len bytes into a buffer of len.
        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), len) };
        if r < 0 {
            return Err(format!("read: {}", std::io::Error::last_os_error()));
        }
        buf.truncate(r as usize);
        Ok(buf)
    }
}

/// Calls injected into the restore child's main thread.
struct Child<'c, 'a>(&'c mut ContextRef<'a>);

impl Calls for Child<'_, '_> {
    fn ioctl_buf(&mut self, fd: i32, req: u64, buf: &mut [u8]) -> Result<i64, String> {
        let mut scratch = Scratch::new(self.0);
        let at = scratch.put(self.0, buf)?;
        let tid = self.0.pid();
        let r = syscall_raw(self.0, tid, libc::SYS_ioctl, [fd as u64, req, at, 0, 0, 0])?;
        buf.copy_from_slice(&read_memory(self.0, at, buf.len())?);
        Ok(r)
    }
    fn ioctl_arg(&mut self, fd: i32, req: u64, arg: u64) -> Result<i64, String> {
        let tid = self.0.pid();
        syscall_raw(self.0, tid, libc::SYS_ioctl, [fd as u64, req, arg, 0, 0, 0])
    }
    fn read(&mut self, _fd: i32, _len: usize) -> Result<Vec<u8>, String> {
        Err("reading a terminal in the restore child".into())
    }
}

fn int_of(c: &mut dyn Calls, what: &str, fd: i32, req: u64, name: &str) -> Result<u32, String> {
    let mut v = [0u8; 4];
    check(what, name, c.ioctl_buf(fd, req, &mut v)?)?;
    Ok(u32::from_ne_bytes(v))
}

fn set_termios(c: &mut dyn Calls, what: &str, fd: i32, t: &[u8]) -> Result<(), String> {
    let mut t = t.to_vec();
    check(what, "TCSETS2", c.ioctl_buf(fd, TCSETS2, &mut t)?).map(|_| ())
}

fn word(t: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(t[at..at + 4].try_into().expect("4 bytes"))
}

fn set_word(t: &mut [u8], at: usize, v: u32) {
    t[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

/// Settings to read every queued byte: not canonical, reads that never wait.
fn reading(t: &[u8]) -> Vec<u8> {
    let mut r = t.to_vec();
    set_word(&mut r, LFLAG, word(t, LFLAG) & !(libc::ICANON as u32));
    r[CC + libc::VMIN] = 0;
    r[CC + libc::VTIME] = 0;
    r
}

/// Settings to put bytes back as they were received: canonical or not as before
/// (lines are lines again), nothing echoed, translated or turned into a signal.
fn putting_back(t: &[u8]) -> Vec<u8> {
    let mut w = t.to_vec();
    let lflag = libc::ECHO | libc::ECHOE | libc::ECHOK | libc::ECHONL | libc::ECHOCTL | libc::ECHOKE | libc::ISIG | libc::IEXTEN;
    set_word(&mut w, LFLAG, word(t, LFLAG) & !(lflag as u32));
    // IXON stays: turning flow control off and on is a status change a packet-mode
    // master would read.
    let iflag = libc::IGNBRK | libc::BRKINT | libc::PARMRK | libc::ISTRIP | libc::INLCR | libc::IGNCR | libc::ICRNL | libc::IUCLC;
    set_word(&mut w, IFLAG, word(t, IFLAG) & !(iflag as u32));
    w
}

/// Why `input`, read from a line discipline with settings `t`, could not be put back
/// as it was: a byte the discipline would act on again (with flow control: start,
/// stop; canonical: erase, kill, end of file), or the NUL an end of file typed in
/// canonical mode is stored as.
fn input_refusal(t: &[u8], input: &[u8]) -> Option<String> {
    let mut special = Vec::new();
    if word(t, IFLAG) & libc::IXON as u32 != 0 {
        special.extend([(t[CC + libc::VSTART], "start"), (t[CC + libc::VSTOP], "stop")]);
    }
    if word(t, LFLAG) & libc::ICANON as u32 != 0 {
        special.extend([(t[CC + libc::VERASE], "erase"), (t[CC + libc::VKILL], "kill"), (t[CC + libc::VEOF], "end-of-file"), (0, "NUL or end-of-file")]);
    }
    special.iter().find(|(c, _)| input.contains(c)).map(|(c, name)| format!("its unread input holds a {name} character ({c:#04x}), which would not be put back as it was typed"))
}

/// Puts `bytes` into the line discipline of terminal fd `fd` (settings `t` around).
fn put_back(c: &mut dyn Calls, what: &str, fd: i32, t: Option<&[u8]>, bytes: &[u8]) -> Result<(), String> {
    if bytes.is_empty() {
        return Ok(());
    }
    if let Some(t) = t {
        set_termios(c, what, fd, &putting_back(t))?;
    }
    for &b in bytes {
        let mut one = [b];
        check(what, "TIOCSTI", c.ioctl_buf(fd, TIOCSTI, &mut one)?)?;
    }
    if let Some(t) = t {
        set_termios(c, what, fd, t)?;
    }
    Ok(())
}

/// Reads every byte queued for reading on fd `fd`.
fn drain(c: &mut dyn Calls, what: &str, fd: i32, packet: bool) -> Result<Vec<u8>, String> {
    let mut all = Vec::new();
    loop {
        let n = int_of(c, what, fd, FIONREAD, "FIONREAD")? as usize;
        if n == 0 || all.len() > QUEUE_MAX * 2 {
            return Ok(all);
        }
        let got = c.read(fd, n + packet as usize).map_err(|e| format!("{what}: {e}"))?;
        // In packet mode each read starts with a status byte (TIOCPKT_DATA: 0).
        all.extend_from_slice(if packet { got.get(1..).unwrap_or(&[]) } else { &got });
        if got.is_empty() {
            return Ok(all);
        }
    }
}

/// Reads the state of the pair whose master is ferry's fd `master` (`/dev/pts/index`),
/// putting its queued bytes back at once. `what` names the fd for errors.
pub fn capture(master: i32, index: u32, what: &str) -> Result<PtyState, String> {
    let c: &mut dyn Calls = &mut Local;
    let mut t = vec![0u8; TERMIOS2_LEN];
    check(what, "TCGETS2", c.ioctl_buf(master, TCGETS2, &mut t)?)?;
    let mut ws = [0u8; 8];
    check(what, "TIOCGWINSZ", c.ioctl_buf(master, TIOCGWINSZ, &mut ws)?)?;
    let winsize = [0, 2, 4, 6].map(|i| u16::from_ne_bytes([ws[i], ws[i + 1]]));
    let packet = int_of(c, what, master, TIOCGPKT, "TIOCGPKT")? != 0;
    let locked = int_of(c, what, master, TIOCGPTLCK, "TIOCGPTLCK")? != 0;
    let mut pf = libc::pollfd { fd: master, events: libc::POLLPRI, revents: 0 };
    // SAFETY: one pollfd, no wait.
    if packet && unsafe { libc::poll(&mut pf, 1, 0) } == 1 && pf.revents & libc::POLLPRI != 0 {
        return Err(format!("{what}: a packet-mode status change waits to be read on the master of /dev/pts/{index}: not carried (retry)"));
    }
    // Every change of settings is a status change for a packet-mode master then.
    if packet && word(&t, LFLAG) & libc::EXTPROC as u32 != 0 {
        return Err(format!("{what}: /dev/pts/{index} is in packet mode with EXTPROC: its settings cannot be changed to read its input unseen; not carried"));
    }
    // Only a slave someone holds is opened here: the last close of a slave hangs
    // the master up, and a slave never opened would be hung up by ours.
    let slave = format!("/dev/pts/{index}");
    let holders: Vec<u32> = processes().filter(|&pid| holds(pid, |_, link| link == slave)).collect();
    if holders.is_empty() {
        return Err(format!("{what}: no process holds {slave}, the slave of this master: its unread input cannot be read without hanging the master up; not carried"));
    }
    // A holder outside the request would be left on a terminal whose master is gone.
    if let Some(outside) = holders.iter().find(|&&pid| !traced_by_me(pid)) {
        return Err(format!("{what}: process {outside}, which is not part of the request, holds {slave}, the slave of this master: not carried"));
    }
    if locked {
        return Err(format!("{what}: /dev/pts/{index} is locked (TIOCSPTLCK) with its slave open: not carried yet"));
    }
    let output = drain(c, what, master, packet)?;
    put_back(c, what, master, None, &output)?;
    let peer = c.ioctl_arg(master, TIOCGPTPEER, (libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) as u64)?;
    let result = (|| {
        let peer = check(what, "TIOCGPTPEER", peer)? as i32;
        // SAFETY: the kernel just made this fd for ferry; it is closed on return.
        let peer = unsafe { OwnedFd::from_raw_fd(peer) };
        let fd = peer.as_raw_fd();
        set_termios(c, what, fd, &reading(&t))?;
        let input = drain(c, what, fd, false);
        let back = put_back(c, what, fd, Some(&t), input.as_deref().unwrap_or(&[]));
        let input = input?;
        back?;
        if let Some(why) = input_refusal(&t, &input) {
            return Err(format!("{what}: /dev/pts/{index}: {why}"));
        }
        Ok(input)
    })();
    let input = result?;
    Ok(PtyState { termios: to_hex(&t), winsize, packet, locked, input: to_hex(&input), output: to_hex(&output) })
}

/// Checks a recorded state's sizes.
pub fn validate(state: &PtyState, what: &str) -> Result<(), String> {
    from_hex(&state.termios, &format!("{what}: termios"), TERMIOS2_LEN, true)?;
    from_hex(&state.input, &format!("{what}: input"), QUEUE_MAX * 2, false)?;
    from_hex(&state.output, &format!("{what}: output"), QUEUE_MAX * 2, false).map(|_| ())
}

/// Makes the master of `/dev/pts/index` again in the restore child, with `state`:
/// opens `/dev/ptmx` (through `open`, answering the raw result) until it gets that
/// index. Answers the master's fd; every other master opened is closed.
pub fn make_master(
    ctx: &mut ContextRef<'_>,
    what: &str,
    index: u32,
    state: &PtyState,
    mut open: impl FnMut(&mut ContextRef<'_>) -> Result<i64, String>,
) -> Result<i32, String> {
    let t = from_hex(&state.termios, &format!("{what}: termios"), TERMIOS2_LEN, true)?;
    let input = from_hex(&state.input, &format!("{what}: input"), QUEUE_MAX * 2, false)?;
    let output = from_hex(&state.output, &format!("{what}: output"), QUEUE_MAX * 2, false)?;
    let mut spare = Vec::new();
    let mut found = Err(format!("{what}: /dev/pts/{index} could not be reached in {OPENS_MAX} opens of /dev/ptmx"));
    for _ in 0..OPENS_MAX {
        let fd = check(what, "opening /dev/ptmx", open(ctx)?)? as i32;
        let n = int_of(&mut Child(ctx), what, fd, TIOCGPTN, "TIOCGPTN")?;
        if n == index {
            found = Ok(fd);
            break;
        }
        spare.push(fd);
        if n > index {
            found = Err(format!("{what}: /dev/pts/{index} is taken here (a new master got /dev/pts/{n}): refused"));
            break;
        }
    }
    let tid = ctx.pid();
    for fd in spare {
        syscall_raw(ctx, tid, libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
    }
    let master = found?;
    let c = &mut Child(ctx);
    check(what, "TIOCSPTLCK", c.ioctl_buf(master, TIOCSPTLCK, &mut 0i32.to_ne_bytes())?)?;
    set_termios(c, what, master, &t)?;
    let mut ws = [0u8; 8];
    for (i, v) in state.winsize.iter().enumerate() {
        ws[i * 2..i * 2 + 2].copy_from_slice(&v.to_ne_bytes());
    }
    check(what, "TIOCSWINSZ", c.ioctl_buf(master, TIOCSWINSZ, &mut ws)?)?;
    put_back(c, what, master, None, &output)?;
    if !input.is_empty() {
        let peer = c.ioctl_arg(master, TIOCGPTPEER, (libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) as u64)?;
        let peer = check(what, "TIOCGPTPEER", peer)? as i32;
        let r = put_back(c, what, peer, Some(&t), &input);
        syscall_raw(ctx, tid, libc::SYS_close, [peer as u64, 0, 0, 0, 0, 0])?;
        r?;
    }
    let c = &mut Child(ctx);
    check(what, "TIOCPKT", c.ioctl_buf(master, TIOCPKT, &mut (state.packet as i32).to_ne_bytes())?)?;
    if state.locked {
        check(what, "TIOCSPTLCK", c.ioctl_buf(master, TIOCSPTLCK, &mut 1i32.to_ne_bytes())?)?;
    }
    Ok(master)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slave_and_master_indexes() {
        assert_eq!(slave_index(libc::S_IFCHR | 0o620, libc::makedev(136, 2)), Some(2));
        assert_eq!(slave_index(libc::S_IFCHR | 0o620, libc::makedev(137, 3)), Some(259));
        assert_eq!(slave_index(libc::S_IFCHR | 0o620, libc::makedev(4, 2)), None);
        assert_eq!(slave_index(libc::S_IFREG, libc::makedev(136, 2)), None);
        assert_eq!(master_index("pos:\t0\nflags:\t0100002\nmnt_id:\t24\nino:\t5\ntty-index:\t2\n"), Some(2));
        assert_eq!(master_index("pos:\t0\n"), None);
    }

    fn termios(lflag: u32) -> Vec<u8> {
        let mut t = vec![0u8; TERMIOS2_LEN];
        set_word(&mut t, LFLAG, lflag);
        set_word(&mut t, IFLAG, libc::ICRNL as u32 | libc::IXON as u32 | libc::IUTF8 as u32);
        t[CC + libc::VERASE] = 0x7f;
        t[CC + libc::VKILL] = 0x15;
        t[CC + libc::VEOF] = 0x04;
        t[CC + libc::VMIN] = 1;
        t[CC + libc::VSTART] = 0x11;
        t[CC + libc::VSTOP] = 0x13;
        t
    }

    #[test]
    fn settings_to_read_and_to_put_back() {
        let canon = (libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN) as u32;
        let t = termios(canon);
        let r = reading(&t);
        assert_eq!(word(&r, LFLAG), canon & !(libc::ICANON as u32));
        assert_eq!((r[CC + libc::VMIN], r[CC + libc::VTIME]), (0, 0));
        let w = putting_back(&t);
        assert_eq!(word(&w, LFLAG), libc::ICANON as u32, "still canonical, no echo, no signals");
        assert_eq!(word(&w, IFLAG), (libc::IUTF8 | libc::IXON) as u32, "no translation; flow control as it was");
    }

    #[test]
    fn input_that_cannot_be_typed_again_is_named() {
        let t = termios(libc::ICANON as u32);
        assert_eq!(input_refusal(&t, b"ls -l\nec"), None);
        assert!(input_refusal(&t, b"ab\x7f").unwrap().contains("erase character (0x7f)"));
        assert!(input_refusal(&t, b"ab\0").unwrap().contains("NUL or end-of-file"));
        assert!(input_refusal(&t, b"a\x13").unwrap().contains("stop character (0x13)"), "with IXON");
        // Neither canonical nor flow control: every byte is data.
        assert_eq!(input_refusal(&termios(0), b"ab\x7f\0\x04"), None);
    }
}
