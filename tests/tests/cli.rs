//! The `ferry` command line: plugin listing and refusals, `check`, `config`, help
//! and exit codes.

use ferry_tests::{abi_fixture, ferry, plugin_dir, stderr, stdout};

/// The one line a failing command prints.
fn one_line_failure(o: &std::process::Output) -> String {
    assert_eq!(o.status.code(), Some(1), "stdout: {} stderr: {}", stdout(o), stderr(o));
    let err = stderr(o);
    assert_eq!(err.lines().count(), 1, "expected one line, got: {err}");
    assert!(err.starts_with("ferry: "), "{err}");
    err
}

#[test]
fn plugins_list_json_finds_every_plugin_beside_the_binary() {
    let o = ferry(&["plugins", "list", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    for (kind, name) in ferry_tests::BUILT_PLUGINS {
        let row = rows
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing from {rows:?}"));
        assert_eq!(row["kind"], kind);
        assert_eq!(row["status"], "registered");
        assert_eq!(row["version"], "0.1.0");
        let path = row["path"].as_str().unwrap();
        assert!(path.starts_with(plugin_dir().canonicalize().unwrap().to_str().unwrap()), "{path}");
    }
    let text = ferry(&["plugins", "list"]);
    assert!(stdout(&text).lines().any(|l| l.contains("memory") && l.ends_with("registered")));
}

#[test]
fn loading_a_library_that_is_not_a_plugin_fails_in_one_line() {
    let libm = "/lib/x86_64-linux-gnu/libm.so.6";
    if !ferry_tests::needs(std::path::Path::new(libm).exists(), &format!("{libm} on this machine")) {
        return;
    }
    let err = one_line_failure(&ferry(&["plugins", "load", libm]));
    assert!(err.contains(libm) && err.contains("not a ferry plugin"), "{err}");
}

#[test]
fn loading_a_plugin_of_another_abi_names_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let other = abi_fixture(false, dir.path());
    let err = one_line_failure(&ferry(&["plugins", "load", other.to_str().unwrap()]));
    let ours = ferry_plugin_api::ABI_VERSION;
    assert!(err.contains(other.to_str().unwrap()), "{err}");
    assert!(err.contains(&format!("ABI {}", ours + 1)) && err.contains(&format!("uses ABI {ours}")), "{err}");
    // The directory listing shows it as refused, with the same reason.
    let o = ferry(&["plugins", "list", "--json", "--plugin-dir", dir.path().to_str().unwrap()]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0]["status"].as_str().unwrap().starts_with("refused: built against ferry plugin ABI"));
    assert!(rows[0]["name"].is_null());
}

#[test]
fn loading_an_unknown_name_or_missing_file_fails() {
    let err = one_line_failure(&ferry(&["plugins", "load", "no-such-plugin"]));
    assert!(err.contains("no plugin named no-such-plugin"), "{err}");
    let err = one_line_failure(&ferry(&["plugins", "load", "/nonexistent/libx.so"]));
    assert!(err.contains("/nonexistent/libx.so"), "{err}");
}

#[test]
fn loading_a_valid_plugin_without_a_daemon_validates_it_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    // Valid, but nothing registered: a failure, not a success that did nothing.
    let err = one_line_failure(&ferry(&["plugins", "load", "memory", "--control", sock.to_str().unwrap()]));
    assert!(err.contains("subsystem plugin memory 0.1.0 is valid"), "{err}");
    assert!(err.contains("but no daemon runs at") && err.contains("nothing was registered"), "{err}");
    let err = one_line_failure(&ferry(&["plugins", "unload", "memory", "--control", sock.to_str().unwrap()]));
    assert!(err.contains("no daemon is listening"), "{err}");
}

#[test]
fn check_reports_every_feature() {
    let o = ferry(&["check", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    for name in [
        "ptrace-seize",
        "process-vm-readv",
        "userfaultfd",
        "userfaultfd-wp",
        "userfaultfd-wp-async",
        "pagemap-scan",
        "soft-dirty",
        "cgroup-v2-freeze",
        "cgroup-v1-freezer",
        "pidfd",
        "clone3-set-tid",
        "memfd",
        "tcp-repair",
        "timer-restore-ids",
        "timerfd-set-ticks",
        "loginuid",
        "ptrace-debugregs",
        "vdso-mremap",
    ] {
        let row = rows.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("{name} missing"));
        if row["present"] == false {
            assert!(row["fallback"].is_string(), "{name} is missing and names no fallback");
        }
    }
    // Seizing is what everything else stands on.
    assert_eq!(rows.iter().find(|r| r["name"] == "ptrace-seize").unwrap()["present"], true);
    let text = stdout(&ferry(&["check"]));
    // One line per feature; then what each medium finds (rdma: libfabric's providers,
    // or why it cannot work), and any network lock left behind.
    let features = text.lines().filter(|l| !l.starts_with("medium ") && !l.starts_with("network lock ")).count();
    assert_eq!(features, rows.len(), "{text}");
    let rdma = text.lines().find(|l| l.starts_with("medium rdma")).unwrap_or_else(|| panic!("no rdma line in {text}"));
    assert!(rdma.contains(" available: ") || rdma.contains(" unavailable: "), "{rdma}");
}

#[test]
fn config_show_layers_defaults_file_and_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ferry.json");
    std::fs::write(&file, r#"{"watchdog_ms": 1234, "mechanism": {"strategy": "pre-copy", "medium": "tcp"}}"#).unwrap();
    let o = ferry(&["config", "show", "--config", file.to_str().unwrap(), "--medium", "file", "--quiesce", "freezer"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(shown["watchdog_ms"], 1234); // file
    assert_eq!(shown["mechanism"]["strategy"], "pre-copy"); // file
    assert_eq!(shown["mechanism"]["medium"], "file"); // command line beats file
    assert_eq!(shown["mechanism"]["quiesce"], "freezer"); // command line
    assert_eq!(shown["mechanism"]["context"], "external"); // default
    assert_eq!(shown["mechanism"]["subsystems"], serde_json::json!(["memory", "threads", "files", "signals", "process", "seccomp", "creds"]));

    // The shipped example is a valid configuration, and `config example` prints it.
    let example = ferry(&["config", "example"]);
    assert!(example.status.success());
    let ex = dir.path().join("example.json");
    std::fs::write(&ex, &example.stdout).unwrap();
    let plain = ferry(&["config", "show", "--config", ex.to_str().unwrap()]);
    assert!(plain.status.success());
    // So is the explained one, each key's documentation above it as comments.
    let explained = ferry(&["config", "example", "--explain"]);
    assert!(explained.status.success());
    let text = stdout(&explained);
    assert!(text.contains("// watchdog_ms: Every event") && text.contains("// daemon.auth_key: "), "{text}");
    std::fs::write(&ex, &explained.stdout).unwrap();
    let shown = ferry(&["config", "show", "--config", ex.to_str().unwrap()]);
    assert!(shown.status.success(), "{}", stderr(&shown));
    assert_eq!(stdout(&shown), stdout(&plain));
}

#[test]
fn a_bad_config_file_names_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ferry.json");
    let path = file.to_str().unwrap();
    std::fs::write(&file, r#"{"mechanism": {"stratgy": "pre-copy"}}"#).unwrap();
    let err = one_line_failure(&ferry(&["config", "show", "--config", path]));
    assert!(err.contains(path) && err.contains("mechanism.stratgy"), "{err}");
    std::fs::write(&file, r#"{"watchdog_ms": "soon"}"#).unwrap();
    let err = one_line_failure(&ferry(&["config", "show", "--config", path]));
    assert!(err.contains(path) && err.contains("watchdog_ms"), "{err}");
    let err = one_line_failure(&ferry(&["plugins", "list", "--config", "/nonexistent/ferry.json"]));
    assert!(err.contains("/nonexistent/ferry.json"), "{err}");
    // A bad value on the command line is a usage error.
    assert_eq!(ferry(&["config", "show", "--strategy", "teleport"]).status.code(), Some(2));
}

#[test]
fn every_command_has_help_and_usage_errors_exit_2() {
    for args in [
        vec!["--help"],
        vec!["plugins", "--help"],
        vec!["plugins", "list", "--help"],
        vec!["plugins", "load", "--help"],
        vec!["plugins", "unload", "--help"],
        vec!["check", "--help"],
        vec!["config", "--help"],
        vec!["config", "show", "--help"],
        vec!["config", "example", "--help"],
        vec!["daemon", "--help"],
    ] {
        let o = ferry(&args);
        assert!(o.status.success(), "{args:?}");
        assert!(stdout(&o).contains("Usage:"), "{args:?}");
    }
    assert_eq!(ferry(&[]).status.code(), Some(2));
    assert_eq!(ferry(&["teleport"]).status.code(), Some(2));
    assert_eq!(ferry(&["plugins", "list", "--jsn"]).status.code(), Some(2));
}

#[test]
fn a_reader_that_closes_early_ends_ferry_quietly() {
    // `ferry config example | head -1`: once a panic (exit 101) on the broken pipe. The
    // read end is closed before ferry starts, so every write meets it.
    let mut fds = [0i32; 2];
    // SAFETY: pipe fills the two-int array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both fds are ours; the read end is closed, the write end handed over once.
    let write_end = unsafe {
        libc::close(fds[0]);
        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1])
    };
    for args in [&["config", "example"][..], &["plugins", "list"][..]] {
        let o = std::process::Command::new(ferry_tests::ferry_bin())
            .args(args)
            .stdout(write_end.try_clone().unwrap())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        assert!(o.stderr.is_empty(), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn a_migration_target_without_a_port_is_named_so() {
    let o = ferry(&["migrate", "1", "--to", "127.0.0.1"]);
    let err = one_line_failure(&o);
    assert!(err.contains("--to 127.0.0.1 names no port: give HOST:PORT"), "{err}");
}

#[test]
fn a_key_file_another_user_owns_is_refused_naming_the_owner() {
    if !ferry_tests::needs_root("giving the key file to another user (chown)") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&key, Some(12345), None).unwrap();
    // The key is read before the daemon listens: it must stop at once. Should it start
    // instead, it is killed at the deadline and the test fails.
    let control = dir.path().join("control.sock");
    let mut daemon = std::process::Command::new(ferry_tests::ferry_bin())
        .args(["daemon", "--listen", "127.0.0.1:0", "--auth-key", key.to_str().unwrap(), "--control", control.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut exited = false;
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ferry_tests::wait_until("the daemon to refuse its key", std::time::Duration::from_secs(20), || {
            exited = daemon.try_wait().unwrap().is_some();
            exited
        })
    }));
    if waited.is_err() {
        let _ = daemon.kill();
    }
    let o = daemon.wait_with_output().unwrap();
    assert!(exited, "the daemon ran with a key file uid 12345 owns");
    let err = one_line_failure(&o);
    assert!(err.contains(&format!("key file {}", key.display())), "{err}");
    assert!(err.contains("it is owned by uid 12345; it must be owned by root"), "{err}");
}
