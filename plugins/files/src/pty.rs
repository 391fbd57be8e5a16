//! Pseudo-terminals, until they are carried: a ptmx master (its fdinfo has a
//! `tty-index:` line) is refused, and so is the pair it makes with a slave the same
//! process holds. Reopened by path, a slave whose master dies with the original (its
//! own, killed by the checkpoint or at the end of a migration) fails every write with EIO.
//!
//! A slave whose master belongs to a process outside the request (the terminal of
//! the shell that started the process) is a shell job's terminal: see
//! [`crate::shell_job`].

use ferry_plugin_api::util::proc_field;

/// `UNIX98_PTY_SLAVE_MAJOR`: every `/dev/pts/N` is device 136:N.
const PTS_MAJOR: u32 = 136;

/// One fd as far as terminals matter: its number, link text, fdinfo and `st_mode`/`st_rdev`.
pub struct FdView<'a> {
    pub fd: i32,
    pub link: &'a str,
    pub fdinfo: &'a str,
    pub mode: u32,
    pub rdev: u64,
}

/// The pts index of a slave device, if `mode`/`rdev` are one.
fn slave_index(mode: u32, rdev: u64) -> Option<u32> {
    (mode & libc::S_IFMT == libc::S_IFCHR && libc::major(rdev) == PTS_MAJOR).then(|| libc::minor(rdev))
}

/// Whether `mode`/`rdev` are a pseudo-terminal slave's (`/dev/pts/N`).
pub fn is_slave(mode: u32, rdev: u64) -> bool {
    slave_index(mode, rdev).is_some()
}

/// The refusal for the first pseudo-terminal master of process `pid` among `fds`,
/// naming the slave fds the process holds of it.
pub fn refusal(pid: i32, fds: &[FdView<'_>]) -> Option<String> {
    for m in fds {
        let Some(index) = proc_field(m.fdinfo, "tty-index") else { continue };
        let index: Option<u32> = index.trim().parse().ok();
        let slaves: Vec<String> = fds
            .iter()
            .filter(|s| index.is_some() && slave_index(s.mode, s.rdev) == index)
            .map(|s| format!("fd {} ({})", s.fd, s.link))
            .collect();
        let name = index.map_or("a pseudo-terminal".to_string(), |i| format!("pseudo-terminal /dev/pts/{i}"));
        let pair = if slaves.is_empty() { String::new() } else { format!(", whose slave it holds too at {}", slaves.join(", ")) };
        return Some(format!(
            "process {pid}: fd {} ({}) is the master of {name}{pair}: terminals are not carried by the files plugin yet",
            m.fd, m.link
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(fd: i32, link: &'a str, fdinfo: &'a str, mode: u32, rdev: u64) -> FdView<'a> {
        FdView { fd, link, fdinfo, mode, rdev }
    }

    #[test]
    fn refuses_a_master_and_names_its_slave() {
        let master = "pos:\t0\nflags:\t0100002\nmnt_id:\t24\nino:\t5\ntty-index:\t2\n";
        let slave_dev = libc::makedev(PTS_MAJOR, 2);
        let other_dev = libc::makedev(PTS_MAJOR, 7);
        let fds = [
            view(0, "/dev/null", "pos:\t0\n", libc::S_IFCHR | 0o666, libc::makedev(1, 3)),
            view(1, "/dev/pts/7", "pos:\t0\n", libc::S_IFCHR | 0o620, other_dev),
            view(3, "/dev/ptmx", master, libc::S_IFCHR | 0o666, libc::makedev(5, 2)),
            view(4, "/dev/pts/2", "pos:\t0\n", libc::S_IFCHR | 0o620, slave_dev),
        ];
        let e = refusal(12, &fds).unwrap();
        assert_eq!(
            e,
            "process 12: fd 3 (/dev/ptmx) is the master of pseudo-terminal /dev/pts/2, whose slave it holds too at fd 4 (/dev/pts/2): terminals are not carried by the files plugin yet"
        );
        // A master alone.
        assert!(refusal(12, &fds[2..3]).unwrap().contains("master of pseudo-terminal /dev/pts/2: terminals"));
        // A slave of someone else's terminal (a shell's) is left to be reopened by path.
        assert_eq!(refusal(12, &fds[..2]), None);
        assert_eq!(refusal(12, &[view(4, "/dev/pts/2", "pos:\t0\n", libc::S_IFCHR, slave_dev)]), None);
    }
}
