//! The Debian package: `scripts/package` builds it (here from the debug build the suite
//! made already, `--profile dev --fast`, so that no release build runs in the tests), and
//! what it holds, extracted into a fresh directory with `dpkg -x`, works there as
//! installed: its `ferry` lists its plugins, probes the kernel and carries a process
//! through an image with them. And the daemon's unit keeps off everything a restored
//! process would inherit.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use ferry_tests::{
    needs, needs_root, root, stderr, stdout,
    workload::{Workload, WorkloadOpts},
};

const PLUGINS: &[&str] = &[
    "libferry_subsystem_memory.so",
    "libferry_subsystem_threads.so",
    "libferry_subsystem_files.so",
    "libferry_subsystem_signals.so",
    "libferry_subsystem_process.so",
    "libferry_subsystem_seccomp.so",
    "libferry_subsystem_creds.so",
    "libferry_medium_file.so",
    "libferry_medium_tcp.so",
    "libferry_medium_rdma.so",
];

fn run(cmd: &mut Command) -> Output {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(o.status.success(), "{cmd:?}: {}{}", stdout(&o), stderr(&o));
    o
}

fn mode(path: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.mode() & 0o7777, m.uid(), m.gid())
}

/// Builds the package into `into`; answers the .deb.
fn package(into: &Path) -> PathBuf {
    let o = run(Command::new(root().join("scripts/package")).args(["--profile", "dev", "--fast", "--output"]).arg(into));
    let deb = PathBuf::from(stdout(&o).lines().last().unwrap_or_default().trim());
    assert!(deb.is_file() && deb.extension().is_some_and(|e| e == "deb"), "no .deb: {}", stdout(&o));
    deb
}

#[test]
fn the_package_extracted_into_a_fresh_directory_works_from_there() {
    if !needs_root("checkpoint and restore with the packaged ferry, and root-owned extracted files")
        || !needs(Path::new("/usr/bin/dpkg").exists(), "dpkg (Debian)")
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let deb = package(&tmp.path().join("deb"));
    eprintln!("scripts/package --profile dev --fast took {:.1} s", started.elapsed().as_secs_f64());
    let fs = tmp.path().join("root");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&fs));
    let control = tmp.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));

    // What goes where, root-owned, with its mode.
    let bin = fs.join("usr/bin/ferry");
    assert_eq!(mode(&bin), (0o755, 0, 0));
    let plugins = fs.join("usr/lib/ferry/plugins");
    for so in PLUGINS {
        assert_eq!(mode(&plugins.join(so)), (0o644, 0, 0), "{so}");
    }
    assert_eq!(std::fs::read_dir(&plugins).unwrap().count(), PLUGINS.len(), "nothing else among the plugins");
    let conf = fs.join("etc/ferry/ferry.json");
    assert_eq!(mode(&conf), (0o644, 0, 0));
    assert_eq!(std::fs::read(&conf).unwrap(), std::fs::read(root().join("examples/ferry.json")).unwrap(), "the documented defaults");
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(conffiles.lines().collect::<Vec<_>>(), ["/etc/ferry/ferry.json"], "dpkg keeps an edited configuration");
    let unit = std::fs::read_to_string(fs.join("lib/systemd/system/ferry-daemon.service")).unwrap();
    assert_eq!(unit, std::fs::read_to_string(root().join("dist/ferry-daemon.service")).unwrap());
    for file in ["bash-completion/completions/ferry", "zsh/vendor-completions/_ferry", "fish/vendor_completions.d/ferry.fish", "doc/ferry/ARCHITECTURE.md"] {
        let len = std::fs::metadata(fs.join("usr/share").join(file)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 100, "usr/share/{file}: {len} bytes");
    }
    // A man page for every command the packaged binary has.
    let pages = tmp.path().join("pages");
    run(Command::new(&bin).arg("manpages").arg(&pages));
    let man = fs.join("usr/share/man/man1");
    let mut count = 0;
    for page in std::fs::read_dir(&pages).unwrap() {
        let name = page.unwrap().file_name().to_string_lossy().into_owned();
        let gz = man.join(format!("{name}.gz"));
        let o = run(Command::new("gzip").arg("-dc").arg(&gz));
        assert!(String::from_utf8_lossy(&o.stdout).contains(".SH EXAMPLES"), "{}", gz.display());
        count += 1;
    }
    assert!(count >= 10 && std::fs::read_dir(&man).unwrap().count() == count, "{count} pages");

    // Run from there, with a configuration pointing into it (the packaged one, its
    // plugin directory and control socket moved).
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&conf).unwrap()).unwrap();
    config["plugin_dir"] = plugins.to_str().unwrap().into();
    config["daemon"]["control"] = tmp.path().join("control.sock").to_str().unwrap().into();
    let config_file = tmp.path().join("ferry.json");
    std::fs::write(&config_file, config.to_string()).unwrap();
    let ferry = |args: &[&str]| {
        let mut c = Command::new(&bin);
        c.arg("--config").arg(&config_file).args(args);
        c
    };
    let o = run(&mut ferry(&["plugins", "list", "--json"]));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rows.len(), PLUGINS.len(), "{rows:?}");
    for row in &rows {
        assert_eq!(row["status"], "registered", "{row}");
        assert!(row["path"].as_str().unwrap().starts_with(plugins.to_str().unwrap()), "{row}");
    }
    let o = run(&mut ferry(&["check", "--json"]));
    let features: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(features.len() > 5, "{features:?}");
    let o = run(Command::new(&bin).arg("--plugin-dir").arg(&plugins).args(["plugins", "list"]));
    assert_eq!(stdout(&o).lines().filter(|l| l.ends_with("registered")).count(), PLUGINS.len(), "{}", stdout(&o));

    // The stripped plugins carry a process through an image: it checks itself after.
    let mut w = Workload::spawn(&WorkloadOpts { mem_mib: 4, ..Default::default() });
    w.wait_ready();
    w.wait_ticks(2);
    let image = tmp.path().join("img");
    let pid = w.pid.to_string();
    run(&mut ferry(&["checkpoint", &pid, "--dir", image.to_str().unwrap()]));
    w.reap();
    let at = *w.ticks().last().unwrap();
    let o = run(&mut ferry(&["restore", "--dir", image.to_str().unwrap(), "--json"]));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let new = stats["pids"][&pid].as_i64().unwrap_or_else(|| panic!("no pid for {pid} in {stats}")) as i32;
    w.adopt(new);
    w.wait_ticks(at + 2);
    w.terminate_and_check(new).unwrap();
    eprintln!("the whole test took {:.1} s", started.elapsed().as_secs_f64());
}

/// Everything a unit's sandbox sets that the processes the daemon restores (its
/// children, in its cgroup) would inherit, and run changed by without a word.
const INHERITED: &[&str] = &[
    "NoNewPrivileges", "CapabilityBoundingSet", "AmbientCapabilities", "SecureBits", "User", "Group", "DynamicUser",
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateNetwork", "PrivateUsers", "PrivateMounts",
    "ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem", "ProtectKernelTunables", "ProtectKernelModules",
    "ProtectControlGroups", "ProtectClock", "ProtectHostname", "ProtectProc", "SystemCallFilter",
    "SystemCallArchitectures", "RestrictNamespaces", "RestrictAddressFamilies", "RestrictRealtime",
    "RestrictSUIDSGID", "LockPersonality", "MemoryDenyWriteExecute", "DevicePolicy", "DeviceAllow", "IPAddressDeny",
    "RootDirectory", "RootImage",
];

#[test]
fn the_daemon_unit_waits_for_the_network_and_changes_nothing_a_restored_process_inherits() {
    let unit = std::fs::read_to_string(root().join("dist/ferry-daemon.service")).unwrap();
    let settings: Vec<(&str, &str)> = unit
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let has = |k: &str, v: &str| settings.iter().any(|&(key, val)| key == k && val.split_whitespace().any(|x| x == v));
    assert!(has("Wants", "network-online.target") && has("After", "network-online.target"), "{unit}");
    assert!(has("ExecStart", "/usr/bin/ferry"), "{unit}");
    // Stopping the daemon must not take the processes it restored along.
    assert!(has("KillMode", "process"), "{unit}");
    let set: Vec<&str> = settings.iter().map(|&(k, _)| k).filter(|k| INHERITED.contains(k)).collect();
    assert!(set.is_empty(), "settings a restored process would inherit: {set:?}");
}
