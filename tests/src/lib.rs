//! Helpers for ferry's end-to-end tests: where the built `ferry` binary and plugins
//! are, running the binary, building the ABI fixture, and waiting on conditions with
//! a deadline (never sleeping as synchronisation).

pub mod bench;
pub mod daemon;
pub mod hosts;
pub mod inject;
pub mod kills;
pub mod net;
pub mod residue;
pub mod workload;
pub use residue::assert_no_residue;
use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

/// Every plugin the workspace builds, as (kind, name).
pub const BUILT_PLUGINS: [(&str, &str); 7] = [
    ("subsystem", "memory"),
    ("subsystem", "threads"),
    ("subsystem", "files"),
    ("subsystem", "signals"),
    ("medium", "file"),
    ("medium", "tcp"),
    ("medium", "rdma"),
];

/// Whether this test may run: `true` as root. Otherwise it must not pass in silence (a
/// test that returns early counts as passed, and what it printed is captured and never
/// seen): it panics naming `why`, unless `FERRY_ALLOW_SKIP=1`, when it prints
/// `SKIPPED: <test>: <why>` straight to stderr (past the harness's capture, so a run
/// shows and `grep -c SKIPPED` counts them) and answers `false`. Use it as
/// `if !needs_root("ptrace of another user's process") { return; }`.
#[track_caller]
pub fn needs_root(why: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    needs(unsafe { libc::geteuid() } == 0, &format!("needs root: {why}"))
}

/// [`needs_root`] for any other condition the machine must meet (a kernel feature, a
/// file): `true` when `met`, else a panic, or a loud skip under `FERRY_ALLOW_SKIP=1`.
#[track_caller]
pub fn needs(met: bool, why: &str) -> bool {
    if met {
        return true;
    }
    let at = std::panic::Location::caller();
    let thread = std::thread::current();
    let test = thread.name().filter(|n| *n != "main").unwrap_or("a test");
    if std::env::var_os("FERRY_ALLOW_SKIP").is_some_and(|v| v == "1") {
        use std::io::Write;
        // Not eprintln!: the test harness captures that.
        let _ = writeln!(std::io::stderr(), "SKIPPED: {test} ({}:{}): {why}", at.file(), at.line());
        return false;
    }
    panic!("{test} cannot run here: {why} (set FERRY_ALLOW_SKIP=1 to skip it, loudly)");
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace").to_path_buf()
}

/// The `ferry` binary under test: `$FERRY_BIN`, else the debug build.
pub fn ferry_bin() -> PathBuf {
    let bin = std::env::var_os("FERRY_BIN").map(PathBuf::from).unwrap_or_else(|| root().join("target/debug/ferry"));
    assert!(bin.is_file(), "{} is missing: run `cargo build --workspace` before the tests", bin.display());
    bin
}

/// The directory of the built plugins (beside the binary).
pub fn plugin_dir() -> PathBuf {
    let dir = ferry_bin().parent().expect("binary has a directory").to_path_buf();
    for name in ["memory", "threads", "files", "signals", "process", "seccomp", "creds"] {
        let so = dir.join(format!("libferry_subsystem_{name}.so"));
        assert!(so.is_file(), "{} is missing: run `cargo build --workspace` first", so.display());
    }
    dir
}

/// The built plugin file of subsystem or medium `name`.
pub fn plugin_file(name: &str) -> PathBuf {
    let dir = plugin_dir();
    let sub = dir.join(format!("libferry_subsystem_{name}.so"));
    if sub.exists() {
        sub
    } else {
        dir.join(format!("libferry_medium_{name}.so"))
    }
}

/// Runs `ferry` with `args` and no configuration file of the machine's; a checkpoint or
/// a migration in the execution context the run asks for ([`context_args`]).
pub fn ferry(args: &[&str]) -> Output {
    let mut cmd = Command::new(ferry_bin());
    cmd.args(args);
    if matches!(args.first(), Some(&"checkpoint") | Some(&"migrate")) {
        cmd.args(context_args());
    }
    cmd.output().expect("ferry runs")
}

/// `--context internal` when the run sets `FERRY_TEST_CONTEXT=internal` (`scripts/test`
/// runs the checkpoint and migration tests once more so: the same tests, the other
/// execution context), else nothing (ferry's default, external).
pub fn context_args() -> Vec<String> {
    match std::env::var("FERRY_TEST_CONTEXT") {
        Ok(c) if !c.is_empty() => vec!["--context".into(), c],
        _ => Vec::new(),
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Waits until `cond` holds, panicking with `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Builds fixture crate `tests/fixtures/<name>` (with `features`) into target/fixtures
/// and answers a private copy of its `.so` named `copy` in `into`.
pub fn build_fixture(name: &str, features: &[&str], into: &Path, copy: &str) -> PathBuf {
    let manifest = root().join(format!("tests/fixtures/{name}/Cargo.toml"));
    let target = root().join("target/fixtures");
    std::fs::create_dir_all(&target).expect("target/fixtures");
    // Builds with and without a feature write the same file: one at a time.
    let lock = std::fs::File::create(target.join(".lock")).expect("lock file");
    // SAFETY: flock on a file descriptor we own; released when `lock` is dropped.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--quiet", "--manifest-path"]).arg(&manifest).arg("--target-dir").arg(&target);
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    let status = cmd.status().expect("cargo runs");
    assert!(status.success(), "building the {name} fixture failed");
    let lib = format!("libferry_fixture_{}.so", name.replace('-', "_"));
    let out = into.join(copy);
    std::fs::copy(target.join("debug").join(lib), &out).expect("copy fixture");
    out
}

/// Builds the plugin of another ABI (`same_number`: claiming our ABI number with a
/// root module of another layout) and answers a private copy of its `.so`.
pub fn abi_fixture(same_number: bool, into: &Path) -> PathBuf {
    if same_number {
        build_fixture("abi-other", &["same-abi-number"], into, "libother_layout.so")
    } else {
        build_fixture("abi-other", &[], into, "libother_abi.so")
    }
}

/// Touches nearly all free memory once. On these VMs the first touch of a guest page
/// costs a hypervisor fault; without this, whichever of ferry or a reference happens to
/// get never-touched pages from the allocator looks several times slower.
pub fn warm_guest_memory() {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let avail_kib: usize = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:")?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0);
    let chunk = 1usize << 30;
    let count = (avail_kib << 10).saturating_sub(2 << 30) / chunk;
    let mut maps = Vec::new();
    for _ in 0..count {
        // SAFETY: fresh anonymous mappings, populated and unmapped below.
        let m = unsafe {
            libc::mmap(std::ptr::null_mut(), chunk, libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE, -1, 0)
        };
        if m == libc::MAP_FAILED {
            break;
        }
        maps.push(m);
    }
    for m in maps {
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(m, chunk) };
    }
}

/// A refusal or failure as ferry must give it: exit code 1 and one line on stderr
/// holding every one of `needles`.
pub fn fails_with(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected failure, stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected: {err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
}
