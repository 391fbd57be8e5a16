//! Network helpers of the connection tests (tests/tests/tcp.rs, servers.rs): programs
//! run in a network namespace, the three test hosts a service address floats between,
//! the daemons a migration goes through, and ferry's network-lock tables.

use std::{
    path::PathBuf,
    process::{Child, Command},
    time::Duration,
};

use crate::{needs, stdout, wait_until};

const DEADLINE: Duration = Duration::from_secs(60);

/// `program`, run in network namespace `netns` when given (`ip netns exec` execs it:
/// the child's pid is the program's).
pub fn in_netns(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    }
}

/// A child killed (by its pid) and reaped however the test ends.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// ferry's lock tables for process `pid` in this network namespace.
pub fn lock_tables(pid: i32) -> Vec<String> {
    lock_tables_in(None, pid)
}

/// ferry's lock tables for process `pid` (any process: 0) in namespace `netns`.
pub fn lock_tables_in(netns: Option<&str>, pid: i32) -> Vec<String> {
    let o = in_netns(netns, "nft")
        .args(["list", "tables"])
        .output()
        .expect("nft runs");
    let prefix = if pid == 0 {
        "ferry-".to_string()
    } else {
        format!("ferry-{pid}-")
    };
    stdout(&o)
        .lines()
        .filter(|l| l.contains(&prefix))
        .map(str::to_string)
        .collect()
}

pub fn has_nft() -> bool {
    needs(
        Command::new("nft")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "nftables (scripts/setup installs it)",
    )
}

pub fn restored_pid(o: &std::process::Output, old: i32) -> i32 {
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)));
    v["pids"][old.to_string()]
        .as_i64()
        .unwrap_or_else(|| panic!("no pid for {old} in {v}")) as i32
}

/// Three hosts (network namespaces): the source `a` and the destination `b` of a
/// migration, each joined to `c` (the client's) by a veth pair. The service address
/// [`SERVICE`] is a floating address: on `a`'s loopback, `c` routing to it through
/// `a`; the destination gets it too before the migration (so the copy can bind it),
/// and once the copy runs the test moves it as a user with a floating IP would: the
/// address deleted on `a`, `c`'s route pointed at `b`.
pub struct Hosts {
    pub names: [String; 3],
}

pub const SERVICE: &str = "10.232.9.1";

impl Hosts {
    pub fn new() -> Hosts {
        // Unique across the tests of this binary running at once, and across runs.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = (std::process::id() % 1000) * 10
            + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10;
        let names = ["a", "b", "c"].map(|n| format!("ferry-tcp-{n}-{id}"));
        let h = Hosts { names };
        let [a, b, c] = [&h.names[0], &h.names[1], &h.names[2]];
        let ip = |args: &[&str]| {
            assert!(
                Command::new("ip").args(args).status().unwrap().success(),
                "ip {}",
                args.join(" ")
            )
        };
        for ns in [a, b, c] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        for (ns, n, side) in [(a, 1, "a"), (b, 2, "b")] {
            let (outer, inner) = (format!("ftc{side}{id}"), format!("ft{side}c{id}"));
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ]);
            ip(&["link", "set", &outer, "netns", c]);
            ip(&["link", "set", &inner, "netns", ns]);
            ip(&[
                "-n",
                c,
                "addr",
                "add",
                &format!("10.232.{n}.1/24"),
                "dev",
                &outer,
            ]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.232.{n}.2/24"),
                "dev",
                &inner,
            ]);
            ip(&["-n", c, "link", "set", &outer, "up"]);
            ip(&["-n", ns, "link", "set", &inner, "up"]);
            ip(&[
                "-n",
                ns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.232.{n}.1"),
            ]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{SERVICE}/32"),
                "dev",
                "lo",
            ]);
        }
        ip(&[
            "-n",
            c,
            "route",
            "add",
            &format!("{SERVICE}/32"),
            "via",
            "10.232.1.2",
        ]);
        // c forwards between a and b: the migration's own connection crosses it.
        assert!(Command::new("ip")
            .args(["netns", "exec", c, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .status()
            .unwrap()
            .success());
        h
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// The key two test daemons share, and their logs.
pub struct Keys {
    pub dir: tempfile::TempDir,
    pub key: PathBuf,
}

impl Keys {
    pub fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "the test hosts share this key\n").unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        Keys { dir, key }
    }

    /// `ferry daemon` in namespace `ns` on `addr`:7712, dying at `fault` when given.
    pub fn daemon(&self, ns: &str, addr: &str, fault: Option<&str>) -> Killed {
        let control = self.dir.path().join(format!("{ns}.sock"));
        let mut cmd = in_netns(Some(ns), crate::ferry_bin().to_str().unwrap());
        cmd.args([
            "daemon",
            "--listen",
            &format!("{addr}:7712"),
            "--auth-key",
            self.key.to_str().unwrap(),
            "--control",
            control.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(self.dir.path().join(format!("{ns}.log"))).unwrap());
        if let Some(f) = fault {
            cmd.env("FERRY_FAULT", f);
        }
        let child = cmd.spawn().unwrap();
        wait_until("the daemon's control socket", DEADLINE, || {
            ferry::commands::control::daemon_running(&control)
        });
        Killed(child)
    }

    pub fn log(&self, ns: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{ns}.log"))).unwrap_or_default()
    }
}

/// A process killed by pid when the test ends (a restored copy is nobody's child here).
pub struct KillPid(pub i32);

impl Drop for KillPid {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions; the pid is the test's own copy.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}
