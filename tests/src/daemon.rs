//! A `ferry daemon` for one test: on loopback at a free port, its control socket and
//! log in a directory of its own, killed by pid when dropped.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{ferry_bin, wait_until};

/// `ferry migrate PID --to TO --json --strategy STRATEGY`.
pub fn migrate(pid: i32, to: &str, strategy: &str) -> std::process::Output {
    Command::new(ferry_bin())
        .args(["migrate", &pid.to_string(), "--to", to, "--json", "--strategy", strategy])
        .args(crate::context_args())
        .output()
        .unwrap()
}

/// A TCP port free on loopback now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A daemon listening on `addr` (127.0.0.1 and a free port).
pub struct Daemon {
    child: Child,
    pub addr: String,
    pub control: PathBuf,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// A plain daemon.
    pub fn start() -> Daemon {
        Daemon::start_with(&[], None)
    }

    /// A daemon given `extra` arguments; with `fault`, it dies by SIGKILL at that
    /// fault point (`FERRY_FAULT`).
    pub fn start_with(extra: &[&str], fault: Option<&str>) -> Daemon {
        Daemon::start_in(None, "127.0.0.1", extra, fault)
    }

    /// A daemon listening on `ip` and a free port, inside network namespace `netns`
    /// when given (`ip netns exec` execs it: the pid is the daemon's).
    pub fn start_in(netns: Option<&str>, ip: &str, extra: &[&str], fault: Option<&str>) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("{ip}:{}", free_port());
        let control = dir.path().join("control.sock");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(ferry_bin());
                c
            }
            None => Command::new(ferry_bin()),
        };
        cmd.args(["daemon", "--listen", &addr, "--control"]).arg(&control).args(extra);
        if let Some(f) = fault {
            cmd.env("FERRY_FAULT", f);
        }
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        let d = Daemon { child, addr, control, dir };
        wait_until("the daemon's control socket", Duration::from_secs(30), || {
            ferry::commands::control::daemon_running(&d.control)
        });
        d
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Its own directory (control socket, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
