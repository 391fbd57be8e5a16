//! The plugin manager against the real plugin files: loading, registering,
//! unregistering, users, and every refusal.

use std::{os::unix::fs::PermissionsExt, path::Path, time::Duration};

use ferry::engine::manager::{Manager, ManagerError};
use ferry_plugin_api::{abi_stable::std_types::RSliceMut, PluginKind};
use ferry_tests::{abi_fixture, plugin_dir, plugin_file};

/// A private plugin directory holding copies of the named plugins.
fn private_dir(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in names {
        let src = plugin_file(name);
        std::fs::copy(&src, dir.path().join(src.file_name().unwrap())).unwrap();
    }
    dir
}

fn refusal(e: ManagerError) -> String {
    match e {
        ManagerError::Refused { reason, .. } => reason,
        other => panic!("expected a refusal, got {other}"),
    }
}

#[test]
fn discovers_and_registers_every_built_plugin() {
    let manager = Manager::new();
    let found = manager.discover(&plugin_dir()).unwrap();
    for f in &found {
        assert_eq!(f.status, "registered", "{}", f.path.display());
    }
    let names: Vec<(String, String)> = manager.list().into_iter().map(|m| (m.kind, m.name)).collect();
    for (kind, name) in ferry_tests::BUILT_PLUGINS {
        assert!(names.contains(&(kind.to_string(), name.to_string())), "{kind} {name} missing from {names:?}");
    }
    // Subsystems answer info across the ABI; the ordering constraints are what the
    // worker loop sorts by.
    let threads = manager.acquire(PluginKind::Subsystem, "threads").unwrap();
    let info = threads.subsystem_info().unwrap();
    assert!(info.entity_kinds.iter().any(|k| k.as_str() == "thread"));
    assert!(info.after.iter().any(|k| k.as_str() == "memory"));
    // A name asked for as the wrong kind is not found.
    assert!(matches!(manager.acquire(PluginKind::Medium, "memory"), Err(ManagerError::Unknown { .. })));
}

#[test]
fn medium_objects_work_across_the_abi() {
    let manager = Manager::new();
    let plugins = private_dir(&["file"]);
    manager.discover(plugins.path()).unwrap();
    let image = tempfile::tempdir().unwrap();
    let lease = manager.acquire(PluginKind::Medium, "file").unwrap();
    let mut out = lease.open_medium(&serde_json::json!({"role": "write", "dir": image.path()})).unwrap();
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    out.pushdata(1, payload.as_slice().into()).unwrap();
    out.pushdata(2, b"control".as_slice().into()).unwrap();
    out.flush().unwrap();
    drop(out);
    let mut input = lease.open_medium(&serde_json::json!({"role": "read", "dir": image.path()})).unwrap();
    let mut back = vec![0u8; payload.len() + 10];
    let n = input.popdata(1, RSliceMut::from_mut_slice(&mut back)).unwrap();
    assert_eq!(&back[..n], &payload[..]);
    // Errors come back as values naming the plugin, not as panics.
    let err = input.pushdata(1, b"x".as_slice().into()).unwrap_err();
    assert_eq!(err.plugin.as_str(), "file");
    let err = lease.open_medium(&serde_json::json!({"role": "sideways", "dir": "/"})).err().unwrap();
    assert!(err.to_string().contains("role"), "{err}");
}

#[test]
fn duplicate_names_are_refused() {
    let manager = Manager::new();
    let dir = private_dir(&["memory"]);
    let copy = dir.path().join("libanother_memory.so");
    std::fs::copy(plugin_file("memory"), &copy).unwrap();
    let found = manager.discover(dir.path()).unwrap();
    assert_eq!(found.iter().filter(|f| f.status == "registered").count(), 1);
    let refused: Vec<_> = found.iter().filter(|f| f.status != "registered").collect();
    assert_eq!(refused.len(), 1);
    assert!(refused[0].status.contains("plugin memory is already registered"), "{}", refused[0].status);
}

#[test]
fn unregister_and_register_again() {
    let manager = Manager::new();
    let dir = private_dir(&["signals"]);
    manager.discover(dir.path()).unwrap();
    let meta = manager.unregister("signals", Duration::ZERO).unwrap();
    assert_eq!(meta.name, "signals");
    assert!(manager.get("signals").is_none());
    assert!(matches!(manager.acquire(PluginKind::Subsystem, "signals"), Err(ManagerError::Unknown { .. })));
    assert!(matches!(manager.unregister("signals", Duration::ZERO), Err(ManagerError::Unknown { .. })));
    // The library stays mapped; registering the same file again works.
    manager.register(&meta.path).unwrap();
    let sub = manager.acquire(PluginKind::Subsystem, "signals").unwrap().new_subsystem().unwrap();
    assert!(sub.info().entity_kinds.iter().any(|k| k.as_str() == "sigaction"));
}

#[test]
fn a_plugin_in_use_is_busy_until_its_event_ends() {
    let manager = Manager::new();
    let dir = private_dir(&["files"]);
    manager.discover(dir.path()).unwrap();
    let lease = manager.acquire(PluginKind::Subsystem, "files").unwrap();
    match manager.unregister("files", Duration::from_millis(20)) {
        Err(ManagerError::Busy { name, users }) => assert_eq!((name.as_str(), users), ("files", 1)),
        other => panic!("expected busy, got {other:?}"),
    }
    // Still registered and usable after the refusal.
    assert!(manager.get("files").is_some());
    // An unregister that waits returns as soon as the event ends.
    let waiter = {
        let manager = manager.clone();
        std::thread::spawn(move || manager.unregister("files", Duration::from_secs(30)))
    };
    // New events may not start while it waits.
    ferry_tests::wait_until("the unregister to start waiting", Duration::from_secs(10), || {
        manager.acquire(PluginKind::Subsystem, "files").is_err()
    });
    drop(lease);
    assert_eq!(waiter.join().unwrap().unwrap().name, "files");
    assert!(manager.get("files").is_none());
}

#[test]
fn files_others_could_have_written_are_refused() {
    let manager = Manager::new();
    let dir = private_dir(&["threads"]);
    let so = dir.path().join("libferry_subsystem_threads.so");
    std::fs::set_permissions(&so, std::fs::Permissions::from_mode(0o666)).unwrap();
    let reason = refusal(manager.register(&so).unwrap_err());
    assert!(reason.contains("writable by group or others"), "{reason}");

    std::fs::set_permissions(&so, std::fs::Permissions::from_mode(0o755)).unwrap();
    if ferry_tests::needs_root("giving the plugin file to another user (chown), for the ownership refusal") {
        std::os::unix::fs::chown(&so, Some(65534), None).unwrap();
        let reason = refusal(manager.register(&so).unwrap_err());
        assert!(reason.contains("owned by uid 65534"), "{reason}");
        std::os::unix::fs::chown(&so, Some(0), None).unwrap();
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let reason = refusal(manager.register(&so).unwrap_err());
    assert!(reason.contains("can be changed by others"), "{reason}");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    manager.register(&so).unwrap();
}

#[test]
fn another_abi_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let manager = Manager::new();
    let other = abi_fixture(false, dir.path());
    let reason = refusal(manager.register(&other).unwrap_err());
    let ours = ferry_plugin_api::ABI_VERSION;
    assert!(
        reason.contains(&format!("built against ferry plugin ABI {}, this ferry uses ABI {ours}", ours + 1)),
        "{reason}"
    );
    // A plugin that claims our number but was built with other types is caught by
    // abi_stable's layout check.
    let liar = abi_fixture(true, dir.path());
    let reason = refusal(manager.register(&liar).unwrap_err());
    assert!(reason.contains("incompatible plugin ABI layout"), "{reason}");
    assert!(manager.list().is_empty());
}

#[test]
fn files_that_are_not_plugins_are_refused() {
    let manager = Manager::new();
    let libm = Path::new("/lib/x86_64-linux-gnu/libm.so.6");
    if libm.exists() {
        let reason = refusal(manager.register(libm).unwrap_err());
        assert!(reason.contains("not a ferry plugin"), "{reason}");
    }
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("libnotes.so");
    std::fs::write(&text, "these are not instructions\n").unwrap();
    let reason = refusal(manager.register(&text).unwrap_err());
    assert!(reason.contains("not a loadable shared library"), "{reason}");
    let missing = dir.path().join("libmissing.so");
    assert!(refusal(manager.register(&missing).unwrap_err()).contains("No such file"));
    let found = manager.discover(dir.path()).unwrap();
    assert_eq!(found.len(), 1);
    assert!(found[0].status.starts_with("refused: "));
}

#[test]
fn a_missing_plugin_is_explained_by_the_file_that_was_refused() {
    // Built as a user, run as root: every plugin refused for its owner, and the command
    // once said only "no subsystem plugin named memory is registered".
    let dir = private_dir(&["memory", "threads"]);
    let so = dir.path().join("libferry_subsystem_memory.so");
    std::fs::set_permissions(&so, std::fs::Permissions::from_mode(0o664)).unwrap();
    let manager = Manager::new();
    manager.discover(dir.path()).unwrap();
    let e = manager.acquire(PluginKind::Subsystem, "memory").err().expect("memory was refused").to_string();
    assert!(e.starts_with("no subsystem plugin named memory is registered ("), "{e}");
    assert!(e.contains("libferry_subsystem_memory.so was refused: writable by group or others (mode 664)"), "{e}");
    // A name nothing looks like: how many were refused, and where to see why.
    let e = manager.acquire(PluginKind::Subsystem, "nosuch").err().unwrap().to_string();
    assert!(e.ends_with("(1 plugin file(s) were refused: see `ferry plugins list`)"), "{e}");
}
