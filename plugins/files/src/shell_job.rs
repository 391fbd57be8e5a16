//! Shell jobs: a process on a terminal whose other end the request does not hold (the
//! terminal of the shell that started it, a console). Refused unless the checkpoint
//! says `--shell-job`; then each fd on it is restored onto a terminal ferry is given:
//! the one `ferry restore --inherit-fd fd[N]:PATH` names for that terminal's PATH, else
//! the terminal ferry runs from (its first of stdin, stdout, stderr that is one), else
//! the very terminal by its path where it still is (a migration's daemon runs from
//! none): there its node's change time must match, so that a later terminal given the
//! same number, or another machine's, does not take the process's output.
//!
//! The terminal's settings (termios, window size) belong to the terminal, not to the
//! process: they are the new terminal's, not carried. A process that led its session
//! with that terminal as its controlling terminal gets the new one as its controlling
//! terminal (`TIOCSCTTY`), and its group the foreground (`TIOCSPGRP`) where it was.
//! A process that did not lead its session (a job of an interactive shell) comes back
//! in a session of its own with no controlling terminal: its reads and writes on the
//! terminal work, job control (^C, ^Z) no longer reaches it.

use ferry_plugin_api::{
    util::{syscall, syscall_raw, Scratch},
    ContextRef,
};

use crate::model::Object;

/// This plugin's request options (`mechanism.plugin_params.files`): `shell_job` ("1"),
/// set by `ferry checkpoint --shell-job` and `ferry migrate --shell-job`; `inherit_fd`,
/// by `ferry restore --inherit-fd fd[N]:PATH`, one per line.
pub const SHELL_JOB: &str = "shell_job";
pub const INHERIT_FD: &str = "inherit_fd";

fn option(ctx: &ContextRef<'_>, key: &str) -> Option<String> {
    ctx.plugin_param("files".into(), key.into()).into_option().map(|v| v.into_string())
}

/// Whether a character device `mode`/`rdev` is a terminal: a pseudo-terminal slave
/// (136-143), a virtual console or serial line (4), `/dev/tty` or `/dev/console`
/// (5:0, 5:1), a USB or low-density serial line (166, 188, 204).
pub fn is_terminal(mode: u32, rdev: u64) -> bool {
    if mode & libc::S_IFMT != libc::S_IFCHR {
        return false;
    }
    match libc::major(rdev) {
        4 | 136..=143 | 166 | 188 | 204 => true,
        5 => libc::minor(rdev) <= 1,
        _ => false,
    }
}

/// Process group, session, controlling terminal (`tty_nr`, as the kernel encodes a
/// device number there) and its foreground group, from `/proc/PID/stat`.
fn stat_ids(stat: &str) -> Option<(i32, i32, u32, i32)> {
    let f: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?, f.get(4)?.parse::<i64>().ok()? as u32, f.get(5)?.parse().ok()?))
}

/// The device number `tty_nr` stands for (`new_encode_dev`).
fn tty_nr_dev(nr: u32) -> u64 {
    libc::makedev((nr >> 8) & 0xfff, (nr & 0xff) | ((nr >> 12) & 0xfff00))
}

/// The record of a description of process `pid` (`/proc/PID/stat` is `stat`) open on
/// terminal `path`, or the one-line refusal when the request is not a shell job.
#[allow(clippy::too_many_arguments)]
pub fn describe(pid: i32, stat: &str, label: &str, path: &str, mode: u32, rdev: u64, ctime: [i64; 2], shell_job: bool) -> Result<Object, String> {
    if !shell_job {
        return Err(format!(
            "process {pid}: {label} ({path}): a terminal that is not part of the request: checkpoint with --shell-job (restored onto the terminal ferry restore runs from, or the one --inherit-fd fd[N]:{path} names)"
        ));
    }
    let (pgrp, sid, tty_nr, tpgid) = stat_ids(stat).ok_or_else(|| format!("process {pid}: unreadable /proc/{pid}/stat"))?;
    let ctty = tty_nr != 0 && tty_nr_dev(tty_nr) == rdev;
    // Its session's leader in the request gets the terminal back after this process
    // was forked; one outside leaves it a session of its own (as a job of a shell).
    if ctty && sid != pid && sid > 0 && crate::pty::traced_by_me(sid as u32) {
        return Err(not_leader(pid, label, path, sid));
    }
    let controlling = sid == pid && ctty;
    Ok(Object::Terminal { path: path.to_string(), mode, rdev, ctime, controlling, foreground: controlling && tpgid == pgrp })
}

/// The record of a slave (`/dev/pts/N`, device `rdev`) of a pair whose master the
/// request holds too; refuses a process that has it as its controlling terminal
/// without leading its session (a restored process gets its controlling terminal
/// from its session leader only while being made, which the blank processes of a
/// tree are forked before).
pub fn describe_pair_slave(pid: i32, stat: &str, label: &str, path: &str, index: u32, rdev: u64) -> Result<Object, String> {
    let (pgrp, sid, tty_nr, tpgid) = stat_ids(stat).ok_or_else(|| format!("process {pid}: unreadable /proc/{pid}/stat"))?;
    let controlling = tty_nr != 0 && tty_nr_dev(tty_nr) == rdev;
    if controlling && sid != pid {
        return Err(not_leader(pid, label, path, sid));
    }
    Ok(Object::PtySlave { index, path: path.to_string(), controlling, foreground: controlling && tpgid == pgrp })
}

fn not_leader(pid: i32, label: &str, path: &str, sid: i32) -> String {
    format!(
        "process {pid}: {label} ({path}) is its controlling terminal, that of the session process {sid} leads: the controlling terminal of a process other than its session's leader is not carried yet"
    )
}

/// Whether this checkpoint is a shell job's (`--shell-job`).
pub fn shell_job(ctx: &ContextRef<'_>) -> bool {
    option(ctx, SHELL_JOB).is_some_and(|v| v == "1" || v == "true")
}

/// Where to open the terminal the image names `path`: `(path to open, whether it is
/// the very terminal of the image, whose change time is checked)`.
fn source(path: &str, inherit: Option<&str>, ferry_tty: Option<i32>) -> Result<(String, bool), String> {
    let me = std::process::id();
    for line in inherit.unwrap_or("").lines().filter(|l| !l.is_empty()) {
        let parsed = line.strip_prefix("fd[").and_then(|r| r.split_once("]:")).and_then(|(n, p)| Some((n.parse::<u32>().ok()?, p)));
        let Some((n, named)) = parsed else {
            return Err(format!("--inherit-fd {line}: not fd[N]:PATH"));
        };
        if named == path {
            return Ok((format!("/proc/{me}/fd/{n}"), false));
        }
    }
    Ok(match ferry_tty {
        Some(fd) => (format!("/proc/{me}/fd/{fd}"), false),
        None => (path.to_string(), true),
    })
}

/// The first of ferry's stdin, stdout and stderr that is a terminal.
fn ferry_tty() -> Option<i32> {
    // SAFETY: isatty only inspects the fd.
    (0..3).find(|&fd| unsafe { libc::isatty(fd) } == 1)
}

/// Opens the terminal of a shell job's description in the child (`open` a path with
/// the description's flags, `check` an fd is the device the image recorded); makes it the child's controlling terminal and its group the
/// foreground where the image says so. Answers the fd.
pub fn reopen(
    ctx: &mut ContextRef<'_>,
    what: &str,
    path: &str,
    ctime: [i64; 2],
    (controlling, foreground): (bool, bool),
    open: impl FnOnce(&mut ContextRef<'_>, &str) -> Result<i32, String>,
    check: impl FnOnce(&mut ContextRef<'_>, i32) -> Result<libc::stat, String>,
) -> Result<i32, String> {
    let inherit = option(ctx, INHERIT_FD);
    let (at, same) = source(path, inherit.as_deref(), ferry_tty())?;
    let fd = open(ctx, &at).map_err(|e| {
        if same {
            format!("{e}: the process's terminal is gone and ferry runs from no terminal: run ferry restore from one, or name one with --inherit-fd fd[N]:{path}")
        } else {
            e
        }
    })?;
    if same {
        let st = check(ctx, fd)?;
        let got = [st.st_ctime, st.st_ctime_nsec];
        if got != ctime {
            return Err(format!(
                "{what}: the terminal there is not the process's (made at {}.{:09}, the process's at {}.{:09}): run ferry restore from a terminal, or name one with --inherit-fd fd[N]:{path}",
                got[0], got[1], ctime[0], ctime[1]
            ));
        }
    }
    if same && controlling {
        // On this machine the source may still lead a session on it (a migration
        // here, the source frozen until the commit): taking it from that session
        // could not be undone if the migration rolled back.
        let tid = ctx.pid();
        let r = syscall_raw(ctx, tid, libc::SYS_ioctl, [fd as u64, libc::TIOCSCTTY, 0, 0, 0, 0])?;
        if r == -(libc::EPERM as i64) {
            return Err(format!(
                "{what}: {path} is still another session's controlling terminal (the source's, in a migration within one machine): a session leader's controlling terminal moves only onto another terminal (ferry restore from one, --inherit-fd) or machine yet"
            ));
        }
        if r < 0 {
            return Err(format!("{what} ({at}): making it the controlling terminal: TIOCSCTTY: {}", std::io::Error::from_raw_os_error(-r as i32)));
        }
    }
    take(ctx, &format!("{what} ({at})"), fd, controlling && !same, foreground)?;
    Ok(fd)
}

/// Makes terminal fd `fd` of the child its controlling terminal (`controlling`: it
/// leads its session) and its group the terminal's foreground (`foreground`).
pub fn take(ctx: &mut ContextRef<'_>, what: &str, fd: i32, controlling: bool, foreground: bool) -> Result<(), String> {
    let tid = ctx.pid();
    if controlling {
        syscall(ctx, tid, &format!("{what}: making it the controlling terminal: TIOCSCTTY"), libc::SYS_ioctl, [fd as u64, libc::TIOCSCTTY, 0, 0, 0, 0])?;
    }
    if foreground {
        let pgrp = syscall(ctx, tid, &format!("{what}: getpgid"), libc::SYS_getpgid, [0; 6])? as i32;
        let mut scratch = Scratch::new(ctx);
        let addr = scratch.put(ctx, &pgrp.to_ne_bytes())?;
        syscall(ctx, tid, &format!("{what}: its group to the foreground: TIOCSPGRP"), libc::SYS_ioctl, [fd as u64, libc::TIOCSPGRP, addr, 0, 0, 0])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminals_are_told_from_other_devices() {
        let chr = libc::S_IFCHR | 0o620;
        assert!(is_terminal(chr, libc::makedev(136, 3)));
        assert!(is_terminal(chr, libc::makedev(4, 64)));
        assert!(is_terminal(chr, libc::makedev(5, 0)));
        assert!(!is_terminal(chr, libc::makedev(5, 2)), "ptmx is a master, not a shell job's terminal");
        assert!(!is_terminal(chr, libc::makedev(1, 3)));
        assert!(!is_terminal(libc::S_IFREG | 0o644, libc::makedev(136, 3)));
    }

    #[test]
    fn refused_without_the_option_in_one_line_naming_the_way_out() {
        let e = describe(41, "", "fds 0, 1, 2", "/dev/pts/3", libc::S_IFCHR, libc::makedev(136, 3), [0, 0], false).unwrap_err();
        assert_eq!(
            e,
            "process 41: fds 0, 1, 2 (/dev/pts/3): a terminal that is not part of the request: checkpoint with --shell-job (restored onto the terminal ferry restore runs from, or the one --inherit-fd fd[N]:/dev/pts/3 names)"
        );
    }

    #[test]
    fn controlling_terminal_and_foreground_come_from_stat() {
        // pid 41 leads session 41, group 41; tty_nr 34819 is 136:3; foreground group 41.
        let stat = "41 (a (b) c) S 1 41 41 34819 41 4194560 0 0";
        let dev = libc::makedev(136, 3);
        let o = describe(41, stat, "fd 0", "/dev/pts/3", libc::S_IFCHR, dev, [1, 2], true).unwrap();
        assert_eq!(o, Object::Terminal { path: "/dev/pts/3".into(), mode: libc::S_IFCHR, rdev: dev, ctime: [1, 2], controlling: true, foreground: true });
        // In the background.
        let o = describe(41, "41 (x) S 1 41 41 34819 50 0", "fd 0", "/dev/pts/3", libc::S_IFCHR, dev, [1, 2], true).unwrap();
        assert!(matches!(o, Object::Terminal { controlling: true, foreground: false, .. }));
        // A shell's job: its session is the shell's.
        let o = describe(41, "41 (x) S 30 41 30 34819 41 0", "fd 0", "/dev/pts/3", libc::S_IFCHR, dev, [1, 2], true).unwrap();
        assert!(matches!(o, Object::Terminal { controlling: false, foreground: false, .. }));
        // Its controlling terminal is another one.
        let o = describe(41, "41 (x) S 1 41 41 34820 41 0", "fd 0", "/dev/pts/3", libc::S_IFCHR, dev, [1, 2], true).unwrap();
        assert!(matches!(o, Object::Terminal { controlling: false, .. }));
        assert_eq!(tty_nr_dev(34819), dev);
        assert_eq!(tty_nr_dev(1025), libc::makedev(4, 1));
    }

    #[test]
    fn the_source_is_the_named_fd_then_ferrys_terminal_then_the_same_one() {
        let me = std::process::id();
        let inherit = "fd[7]:/dev/pts/9\nfd[5]:/dev/pts/3";
        assert_eq!(source("/dev/pts/3", Some(inherit), Some(0)), Ok((format!("/proc/{me}/fd/5"), false)));
        assert_eq!(source("/dev/pts/4", Some(inherit), Some(2)), Ok((format!("/proc/{me}/fd/2"), false)));
        assert_eq!(source("/dev/pts/4", None, None), Ok(("/dev/pts/4".into(), true)));
        assert_eq!(source("/dev/pts/4", Some("5:/dev/pts/4"), None), Err("--inherit-fd 5:/dev/pts/4: not fd[N]:PATH".into()));
    }
}
