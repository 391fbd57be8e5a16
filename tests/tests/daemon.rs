//! The daemon's control socket: plugins registered and unregistered in a running
//! daemon by `ferry plugins load/unload`.

use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use ferry_tests::{ferry, ferry_bin, stderr, stdout, wait_until};

/// A daemon started for one test, killed by pid when the test ends however it ends.
struct Daemon {
    child: Child,
    control: PathBuf,
}

impl Daemon {
    fn start(dir: &Path) -> Daemon {
        Daemon::start_with(dir, &[])
    }

    /// A daemon run with `global` options before the command (e.g. `--config FILE`).
    fn start_with(dir: &Path, global: &[&str]) -> Daemon {
        let control = dir.join("run/control.sock");
        let child = Command::new(ferry_bin())
            .args(global)
            .args(["daemon", "--control"])
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("daemon.log")).expect("daemon log"))
            .spawn()
            .expect("daemon starts");
        let daemon = Daemon { child, control };
        // Ready once it logs its control socket: that line follows bind + listen, so
        // connections made after it queue until the control thread takes them. (Session
        // 2 retried requests here around a "reset" it never explained; a connect
        // between the daemon's bind and listen is refused, which is what a retry hid.)
        // From then on the first request must be answered.
        let log = dir.join("daemon.log");
        wait_until("the daemon to log its control socket", Duration::from_secs(20), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("control socket"))
        });
        if let Err(e) = ferry::commands::control::request(&daemon.control, &ferry::commands::control::Request::List, Duration::from_secs(10)) {
            panic!("the first request to the daemon failed: {e}; its log: {:?}", std::fs::read_to_string(&log));
        }
        daemon
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--control", self.control.to_str().unwrap()]);
        ferry(&all)
    }

    fn registered(&mut self) -> Vec<String> {
        let reply = ferry::commands::control::request(&self.control, &ferry::commands::control::Request::List, Duration::from_secs(10))
            .unwrap_or_else(|e| {
                let log = std::fs::read_to_string(self.control.parent().unwrap().parent().unwrap().join("daemon.log"));
                panic!("{e}; the daemon: {:?}, said: {log:?}", self.child.try_wait());
            });
        assert!(reply.ok);
        reply.plugins.into_iter().map(|p| p.name).collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn plugins_are_loaded_and_unloaded_in_a_running_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(dir.path());
    let meta = std::fs::metadata(&daemon.control).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "the control socket is root only");
    assert!(daemon.registered().contains(&"signals".to_string()));

    let o = daemon.ctl(&["plugins", "unload", "signals"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!daemon.registered().contains(&"signals".to_string()));
    // `plugins list` shows the daemon's registry, which says so, and the log says why.
    let o = ferry(&["plugins", "list", "--json", "--control", daemon.control.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(rows.iter().any(|r| r["name"] == "memory"), "{rows:?}");
    assert!(!rows.iter().any(|r| r["name"] == "signals"), "unloaded, yet listed: {rows:?}");
    assert!(rows.iter().all(|r| r["status"].as_str().unwrap().starts_with("registered in the daemon at")), "{rows:?}");
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(log.contains("unregistered plugin signals"), "{log}");
    // Every line stamped with the wall clock: `ferry daemon: 2026-12-05T01:02:03.456Z …`.
    for line in log.lines().filter(|l| l.starts_with("ferry daemon: ")) {
        let stamp = line["ferry daemon: ".len()..].split(' ').next().unwrap();
        assert!(
            stamp.len() == 24 && stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T' && humantime_like(stamp),
            "no timestamp in {line:?}"
        );
    }
    let o = daemon.ctl(&["plugins", "unload", "signals"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no ferry plugin named signals"), "{}", stderr(&o));

    let o = daemon.ctl(&["plugins", "load", "signals"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("registered subsystem plugin signals"), "{}", stdout(&o));
    assert!(daemon.registered().contains(&"signals".to_string()));
    // Registered twice: the daemon refuses the duplicate.
    let o = daemon.ctl(&["plugins", "load", "signals"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already registered"), "{}", stderr(&o));
}

#[test]
fn a_second_daemon_on_the_same_socket_is_refused_and_sigterm_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(dir.path());
    let o = ferry(&["daemon", "--control", daemon.control.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already listening"), "{}", stderr(&o));
    // SAFETY: kill on the pid of a child we own and have not reaped.
    assert_eq!(unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) }, 0);
    let status = daemon.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!daemon.control.exists(), "the socket file is removed on exit");
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("run/control.sock");
    std::fs::create_dir_all(control.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&control).unwrap());
    assert!(control.exists());
    let mut daemon = Daemon::start(dir.path());
    assert!(daemon.registered().contains(&"memory".to_string()));
}

#[test]
fn a_ferry_daemon_is_not_taken_and_a_missing_stats_directory_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let pid = daemon.child.id().to_string();
    let image = dir.path().join("img");
    // Taking the daemon would take the events it serves along, half done.
    let o = ferry(&["checkpoint", &pid, "--dir", image.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("process {pid} is a ferry process (a daemon or another event)")), "{}", stderr(&o));
    assert!(!image.exists());
    let o = ferry(&["migrate", &pid, "--to", "127.0.0.1:9"]);
    assert!(stderr(&o).contains("is a ferry process"), "{}", stderr(&o));
    // --stats that is not a directory: refused at start, not at every event.
    let missing = dir.path().join("no-such-dir");
    let o = ferry(&["daemon", "--control", dir.path().join("c2.sock").to_str().unwrap(), "--stats", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim(), format!("ferry: --stats {}: no such directory", missing.display()));
}

#[test]
fn the_configuration_file_says_where_the_daemon_listens_and_without_it_only_the_control_socket_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.path().join("ferry.json");
    std::fs::write(&config, format!(r#"{{"daemon": {{"listen": "127.0.0.1:{port}"}}}}"#)).unwrap();
    let daemon = Daemon::start_with(dir.path(), &["--config", config.to_str().unwrap()]);
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(log.contains(&format!("listening for migrations on 127.0.0.1:{port}")), "{log}");
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("the daemon accepts connections on the configured address");
    drop(daemon);

    let plain = tempfile::tempdir().unwrap();
    let _daemon = Daemon::start(plain.path());
    let log = std::fs::read_to_string(plain.path().join("daemon.log")).unwrap();
    assert!(!log.contains("listening for migrations"), "no address given, yet: {log}");
}

/// Whether `s` reads as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn humantime_like(s: &str) -> bool {
    s.bytes().enumerate().all(|(i, b)| match i {
        4 | 7 => b == b'-',
        10 => b == b'T',
        13 | 16 => b == b':',
        19 => b == b'.',
        23 => b == b'Z',
        _ => b.is_ascii_digit(),
    })
}
