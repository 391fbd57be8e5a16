//! The watchdog: a plugin that stops answering, or answers "more" forever without
//! progress, fails the event cleanly — the process carries on as it was.

use std::{path::Path, process::Command};

use ferry_tests::{
    build_fixture, ferry_bin, needs_root, plugin_dir, stderr,
    workload::{pid_alive, Workload, WorkloadOpts},
};


/// A plugin directory with every built plugin and the hanging one, and a config
/// file with a short watchdog.
fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    for f in std::fs::read_dir(plugin_dir()).unwrap().flatten() {
        if f.file_name().to_string_lossy().ends_with(".so") {
            std::fs::copy(f.path(), plugins.join(f.file_name())).unwrap();
        }
    }
    build_fixture("hang", &[], &plugins, "libferry_fixture_hang.so");
    std::fs::write(dir.path().join("ferry.json"), r#"{"watchdog_ms": 400}"#).unwrap();
    dir
}

fn ferry_with(setup: &Path, env: Option<(&str, &str)>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(ferry_bin());
    cmd.arg("--plugin-dir").arg(setup.join("plugins")).arg("--config").arg(setup.join("ferry.json")).args(args);
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn fails_naming_the_watchdog(o: &std::process::Output) {
    assert_eq!(o.status.code(), Some(1), "{}", stderr(o));
    let err = stderr(o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("watchdog") && err.contains("no progress"), "{err}");
}

fn carries_on(w: &mut Workload) {
    assert!(pid_alive(w.pid));
    // No scratch area, no cgroup of ferry's left with it.
    ferry_tests::assert_no_residue(&[w.pid], None);
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 3);
    let pid = w.pid;
    w.terminate_and_check(pid).unwrap();
}

#[test]
fn a_plugin_that_stops_answering_fails_the_checkpoint_and_the_process_carries_on() {
    if !needs_root("a checkpoint or migration seizes the process (ptrace, PR_SET_MM_MAP)") {
        return;
    }
    let s = setup();
    for quiesce in ["ptrace", "freezer"] {
        let mut w = Workload::spawn(&WorkloadOpts { threads: 1, ..Default::default() });
        w.wait_ticks(2);
        let image = s.path().join(format!("img-{quiesce}"));
        let pid = w.pid.to_string();
        let o = ferry_with(
            s.path(),
            None,
            &["checkpoint", &pid, "--dir", image.to_str().unwrap(), "--subsystems", "memory,hang,threads,files,signals,process,creds", "--quiesce", quiesce],
        );
        fails_naming_the_watchdog(&o);
        assert!(!image.exists(), "the partial image is removed");
        carries_on(&mut w);
    }
}

#[test]
fn a_plugin_that_spins_without_progress_goes_through_fault_and_dump() {
    if !needs_root("a checkpoint or migration seizes the process (ptrace, PR_SET_MM_MAP)") {
        return;
    }
    let s = setup();
    let mut w = Workload::spawn(&WorkloadOpts::default());
    w.wait_ticks(2);
    let image = s.path().join("img");
    let pid = w.pid.to_string();
    let o = ferry_with(
        s.path(),
        Some(("FERRY_HANG", "spin")),
        &["checkpoint", &pid, "--dir", image.to_str().unwrap(), "--subsystems", "memory,hang,threads,files,signals,process,creds"],
    );
    fails_naming_the_watchdog(&o);
    assert!(stderr(&o).contains("plugin hang"), "{}", stderr(&o));
    assert!(!image.exists());
    carries_on(&mut w);
}

#[test]
fn a_migration_whose_plugin_hangs_rolls_back_on_both_sides() {
    if !needs_root("a checkpoint or migration seizes the process (ptrace, PR_SET_MM_MAP)") {
        return;
    }
    let s = setup();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let control = s.path().join("control.sock");
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _daemon = Killed(Command::new(ferry_bin())
        .arg("--plugin-dir")
        .arg(s.path().join("plugins"))
        .arg("--config")
        .arg(s.path().join("ferry.json"))
        .args(["daemon", "--listen", &addr, "--control"])
        .arg(&control)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap());
    ferry_tests::wait_until("the daemon", std::time::Duration::from_secs(30), || {
        ferry::commands::control::daemon_running(&control)
    });
    let mut w = Workload::spawn(&WorkloadOpts::default());
    w.wait_ticks(2);
    let pid = w.pid.to_string();
    let o = ferry_with(s.path(), None, &["migrate", &pid, "--to", &addr, "--subsystems", "memory,hang,threads,files,signals,process,creds"]);
    fails_naming_the_watchdog(&o);
    // The daemon is still there and takes the next migration of the same process.
    let o = ferry_with(s.path(), None, &["migrate", &pid, "--to", &addr, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let new = stats["pids"][&pid].as_i64().unwrap() as i32;
    w.adopt(new);
    let at = *w.ticks().last().unwrap();
    w.wait_ticks(at + 2);
    w.terminate_and_check(new).unwrap();
}
