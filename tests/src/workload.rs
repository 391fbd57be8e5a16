//! Driving the self-checking workloads of `tests/workloads/`: spawning one detached
//! from the harness (own session, no pipes to us), reading its log, waiting for its
//! ticks, and asking it — possibly under another pid after a restore — to check itself.

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::wait_until;

/// How long any wait on a workload may take: generous, as tests share two cores.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The built C workload program.
pub fn workload_bin() -> PathBuf {
    PathBuf::from(env!("FERRY_WORKLOAD"))
}

/// The directory of the workload sources and scripts.
pub fn workloads_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads")
}

/// Options of the C workload (see `workloads/workload.c`).
#[derive(Clone, Debug)]
pub struct WorkloadOpts {
    /// Size of the patterned anonymous mapping (`--mem-mib`).
    pub mem_mib: u32,
    /// Extra threads (`--threads`).
    pub threads: u32,
    /// Set up the file, pipe, deleted-file, fd 50 and cwd state (else `--no-files`).
    pub files: bool,
    /// Period of the ticks (`--tick-ms`).
    pub tick_ms: u32,
    /// Pages of the mapping rewritten each tick (`--dirty-pages`), for pre-copy.
    pub dirty_pages: u32,
    /// Map, grow, move, empty and replace small areas every tick, and turn a region
    /// from three mappings into one and back (`--churn`).
    pub churn: bool,
    /// Move the patterned mapping and empty one of its pages every tick (`--move-mem`).
    pub move_mem: bool,
    /// Fork a child checking the patterned mapping every 20 ticks (`--fork-check`; logs
    /// `fork-check ok N pid P` per check passed; see [`Workload::fork_checks`]; quiet
    /// it before a checkpoint with [`Workload::quiet_forks`]).
    pub fork_check: bool,
    /// Wait for each tick spinning inside an rseq critical section (`--rseq`).
    pub rseq: bool,
    /// Scheduling, affinity, limits, personality and POSIX timers set (`--process-state`).
    pub process_state: bool,
    /// Run under a seccomp filter (`--seccomp`).
    pub seccomp: bool,
    /// Keep shared anonymous memory with holes, split in two areas (`--shared-anon`).
    pub shared_anon: bool,
    /// Keep an eventfd, a timerfd, a signalfd and an epoll instance (`--event-fds`).
    pub event_fds: bool,
    /// Listen on 127.0.0.1, answering a connection a tick (`--listen`; logs `listen PORT`).
    pub listen: bool,
    /// Run as another user with its own groups, capabilities, securebits, login uid,
    /// dumpable, parent-death signal and oom_score_adj; threads 0 and 1 differ from the
    /// others (`--creds`; use without files, which it could no longer reach).
    pub creds: bool,
    /// Areas with madvise flags, mlocked areas, THP disabled and mlockall(MCL_FUTURE)
    /// (`--mm-flags`; logs a `region mmf-*` per area).
    pub mm_flags: bool,
    /// A sealed (mseal) area, which ferry refuses (`--mm-sealed`; `region mmf-sealed`).
    pub mm_sealed: bool,
    /// Shared anonymous memory mapped twice (`--shared-twice`; `region twice-a`,
    /// `region twice-b`).
    pub shared_twice: bool,
    /// Hold POSIX, lockf, OFD and flock locks on files in its directory (`--locks`).
    pub locks: bool,
    /// Two inotify instances watching files of `files/notify` (`--inotify`).
    pub inotify: bool,
    /// A fanotify instance marking a file of `files/notify` (`--fanotify`).
    pub fanotify: bool,
    /// Pidfds to itself, its main thread and an exited child (`--pidfd`).
    pub pidfd: bool,
    /// A pidfd to a child it keeps, another process (`--pidfd-other`).
    pub pidfd_other: bool,
    /// Children forked before `ready`, each checking its own memory (`--tree N`; not
    /// with `fork_check`). The workload checks they stay its children, and at the end
    /// that each passed.
    pub tree: u32,
    /// More flags, as they are (`workloads/traps.c`'s `--self-trap`, `--single-step`,
    /// `--watchpoint`, …; `--del-cwd`, `--chroot`, …: see the workload).
    pub extra: Vec<&'static str>,
}

impl Default for WorkloadOpts {
    fn default() -> Self {
        WorkloadOpts { mem_mib: 1, threads: 0, files: true, tick_ms: 20, dirty_pages: 0, churn: false, move_mem: false, fork_check: false, rseq: false, process_state: false, seccomp: false, shared_anon: false, event_fds: false, listen: false, creds: false, mm_flags: false, mm_sealed: false, shared_twice: false, locks: false, inotify: false, fanotify: false, pidfd: false, pidfd_other: false, tree: 0, extra: Vec::new() }
    }
}

/// The script workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Script {
    Python,
    /// Python's asyncio: an epoll instance and a socket pair in its event loop.
    PythonAsyncio,
    Perl,
    Bash,
}

impl Script {
    /// The interpreter (the system's own, not a shim that may wrap it) and script file.
    fn command(self) -> (PathBuf, &'static str) {
        let (system, fallback, file) = match self {
            Script::Python => ("/usr/bin/python3", "python3", "counter.py"),
            Script::PythonAsyncio => ("/usr/bin/python3", "python3", "asyncio_counter.py"),
            Script::Perl => ("/usr/bin/perl", "perl", "counter.pl"),
            Script::Bash => ("/bin/bash", "bash", "counter.sh"),
        };
        let interp = if Path::new(system).exists() { PathBuf::from(system) } else { PathBuf::from(fallback) };
        (interp, file)
    }
}

/// A running workload. Its log is `dir/log`, its stdout and stderr `dir/output`, and
/// the C workload's scratch files live in `dir/files`.
pub struct Workload {
    /// The pid it was spawned with.
    pub pid: i32,
    child: Child,
    /// The spawned process was reaped: its pid may now be a restored copy's.
    reaped: bool,
    pub log: PathBuf,
    pub dir: tempfile::TempDir,
    /// Every pid it ran as (spawned, adopted after restores), with the start time
    /// seen when adopted, so that Drop never kills a recycled pid.
    known: Vec<(i32, Option<u64>)>,
}

impl Workload {
    /// Processes other than `except` running with this workload's log file: its copies.
    pub fn copies_other_than(&self, except: i32) -> Vec<i32> {
        processes_mentioning(&self.log.to_string_lossy()).into_iter().filter(|&p| p != except).collect()
    }

    /// Spawns the C workload with `opts`.
    pub fn spawn(opts: &WorkloadOpts) -> Workload {
        Self::spawn_with(Command::new(workload_bin()), opts)
    }

    /// Spawns the C workload inside network namespace `netns` (`ip netns exec` execs
    /// it, so the pid is the workload's).
    pub fn spawn_in_netns(netns: &str, opts: &WorkloadOpts) -> Workload {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns]).arg(workload_bin());
        Self::spawn_with(cmd, opts)
    }

    fn spawn_with(mut cmd: Command, opts: &WorkloadOpts) -> Workload {
        let dir = tempfile::Builder::new().prefix("ferry-workload-").tempdir().expect("temp dir");
        let files = dir.path().join("files");
        std::fs::create_dir(&files).expect("scratch dir");
        cmd.arg("--log").arg(dir.path().join("log")).arg("--dir").arg(&files);
        cmd.args(["--mem-mib", &opts.mem_mib.to_string(), "--threads", &opts.threads.to_string()]);
        cmd.args(["--tick-ms", &opts.tick_ms.to_string(), "--dirty-pages", &opts.dirty_pages.to_string()]);
        let flags = [
            (!opts.files, "--no-files"),
            (opts.churn, "--churn"),
            (opts.move_mem, "--move-mem"),
            (opts.fork_check, "--fork-check"),
            (opts.rseq, "--rseq"),
            (opts.process_state, "--process-state"),
            (opts.seccomp, "--seccomp"),
            (opts.shared_anon, "--shared-anon"),
            (opts.event_fds, "--event-fds"),
            (opts.listen, "--listen"),
            (opts.creds, "--creds"),
            (opts.mm_flags, "--mm-flags"),
            (opts.mm_sealed, "--mm-sealed"),
            (opts.shared_twice, "--shared-twice"),
            (opts.locks, "--locks"),
            (opts.inotify, "--inotify"),
            (opts.fanotify, "--fanotify"),
            (opts.pidfd, "--pidfd"),
            (opts.pidfd_other, "--pidfd-other"),
        ];
        cmd.args(flags.iter().filter(|f| f.0).map(|f| f.1));
        cmd.args(&opts.extra);
        if opts.tree > 0 {
            cmd.args(["--tree", &opts.tree.to_string()]);
        }
        Self::start(cmd, dir)
    }

    /// Spawns a script workload.
    pub fn spawn_script(kind: Script) -> Workload {
        let dir = tempfile::Builder::new().prefix("ferry-script-").tempdir().expect("temp dir");
        let (interp, file) = kind.command();
        let mut cmd = Command::new(interp);
        cmd.arg(workloads_dir().join(file)).arg(dir.path().join("log"));
        Self::start(cmd, dir)
    }

    fn start(mut cmd: Command, dir: tempfile::TempDir) -> Workload {
        // A file, not pipes: the process may be restored elsewhere, and must hold
        // nothing that leads back to the harness.
        let out = File::create(dir.path().join("output")).expect("output file");
        cmd.stdin(Stdio::null()).stdout(out.try_clone().expect("dup output")).stderr(out).current_dir(dir.path());
        // SAFETY: setsid is async-signal-safe; between fork and exec nothing else runs.
        // Its own session and process group, so that signals to ours never reach it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let pid = child.id() as i32;
        let log = dir.path().join("log");
        Workload { pid, child, log, dir, reaped: false, known: vec![(pid, start_time(pid))] }
    }

    /// The C workload's scratch directory (its cwd once set up).
    pub fn files_dir(&self) -> PathBuf {
        self.dir.path().join("files")
    }

    /// Reaps the spawned process once it died (as a parent would), which frees its pid
    /// for a restore.
    pub fn reap(&mut self) {
        let _ = self.child.wait();
        self.reaped = true;
        let pid = self.pid;
        self.known.retain(|&(p, _)| p != pid);
    }

    /// Records `pid` as this workload's (e.g. where it was restored), for the waits'
    /// liveness checks and so that Drop kills it. Adopt before waiting on a restore.
    pub fn adopt(&mut self, pid: i32) {
        if !self.known.iter().any(|&(p, _)| p == pid) {
            self.known.push((pid, start_time(pid)));
        }
    }

    /// The log's text so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log's complete lines so far.
    pub fn lines(&self) -> Vec<String> {
        let text = self.log_text();
        // Lines are written whole, but a read can race a write: drop an unfinished tail.
        let complete = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        complete.lines().map(str::to_owned).collect()
    }

    /// What the workload wrote to stdout and stderr.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("output")).unwrap_or_default()
    }

    /// The tick numbers logged so far, in order.
    pub fn ticks(&self) -> Vec<u64> {
        self.lines()
            .iter()
            .filter_map(|l| l.strip_prefix("tick "))
            .map(|n| n.parse().unwrap_or_else(|_| panic!("bad tick line `tick {n}` in {}", self.log.display())))
            .collect()
    }

    /// The `stall MS tick N` lines: ticks that began long after the one before (ms, N).
    pub fn stalls(&self) -> Vec<(f64, u64)> {
        self.lines()
            .iter()
            .filter_map(|l| {
                let (ms, tick) = l.strip_prefix("stall ")?.split_once(" tick ")?;
                Some((ms.parse().ok()?, tick.parse().ok()?))
            })
            .collect()
    }

    /// The `region NAME START END` lines of the C workload: (name, start, end).
    pub fn regions(&self) -> Vec<(String, u64, u64)> {
        let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex address");
        self.lines()
            .iter()
            .filter_map(|l| {
                let mut w = l.strip_prefix("region ")?.split(' ');
                Some((w.next()?.to_owned(), hex(w.next()?), hex(w.next()?)))
            })
            .collect()
    }

    /// The address range of region `name` (`mem`, `heap`, `global`, `stack`).
    pub fn region(&self, name: &str) -> (u64, u64) {
        let regions = self.regions();
        regions
            .iter()
            .find(|r| r.0 == name)
            .map(|r| (r.1, r.2))
            .unwrap_or_else(|| panic!("no region {name} in {regions:?}"))
    }

    /// With `--fork-check`: how many `fork-check ok` lines (a forked child's check of
    /// the memory passed, and was reaped) process `pid` logged.
    pub fn fork_checks(&self, pid: i32) -> usize {
        let by = format!(" pid {pid}");
        self.lines().iter().filter(|l| l.starts_with("fork-check ok ") && l.ends_with(&by)).count()
    }

    /// With `--fork-check`: asks process `pid` (SIGHUP) to reap its child and fork no
    /// other until it is restored, and waits until it logged that it did (`fork-check
    /// quiet`): ferry refuses a process with a child, and this one then has none.
    pub fn quiet_forks(&self, pid: i32) {
        let quiet = |w: &Self| w.lines().iter().filter(|l| l.starts_with("fork-check quiet ")).count();
        let before = quiet(self);
        assert!(send_signal(pid, libc::SIGHUP), "SIGHUP to {pid}");
        self.wait_for(&format!("process {pid} to quiet its fork check"), |w| quiet(w) > before);
    }

    /// The verdict, once the last line is `PASS` (Ok) or `FAIL: ...` (Err: that line).
    pub fn verdict(&self) -> Option<Result<(), String>> {
        let last = self.lines().pop()?;
        if last == "PASS" {
            Some(Ok(()))
        } else if last.starts_with("FAIL") {
            Some(Err(last))
        } else {
            None
        }
    }

    fn any_alive(&self) -> bool {
        self.known.iter().any(|&(pid, _)| pid_alive(pid))
    }

    /// What to show when a wait fails.
    fn describe(&self) -> String {
        let lines = self.lines();
        let tail = lines[lines.len().saturating_sub(8)..].join(" | ");
        format!("pids {:?}; log ({} lines) ends: {tail}; output: {}", self.known, lines.len(), self.output())
    }

    /// Waits (with the deadline) until `cond`, failing at once if the workload has
    /// given its verdict or none of its pids is alive.
    pub fn wait_for(&self, what: &str, mut cond: impl FnMut(&Self) -> bool) {
        wait_until(what, DEADLINE, || {
            if cond(self) {
                return true;
            }
            if self.verdict().is_some() || !self.any_alive() {
                assert!(cond(self), "workload finished while waiting for {what}: {}", self.describe());
                return true;
            }
            false
        });
    }

    /// Waits until the workload logged `ready`.
    pub fn wait_ready(&self) {
        self.wait_for("ready", |w| w.lines().iter().any(|l| l == "ready"));
    }

    /// Waits until at least `n` ticks are logged.
    pub fn wait_ticks(&self, n: u64) {
        self.wait_for(&format!("{n} ticks"), |w| w.ticks().len() as u64 >= n);
    }

    /// Waits until the log holds the line `line`.
    pub fn wait_line(&self, line: &str) {
        self.wait_for(&format!("log line `{line}`"), |w| w.lines().iter().any(|l| l == line));
    }

    /// Whether `ready` came once, before any tick, and the ticks are exactly 1..=max.
    pub fn check_continuous(&self) -> Result<(), String> {
        let lines = self.lines();
        let ready: Vec<usize> = lines.iter().enumerate().filter(|(_, l)| *l == "ready").map(|(i, _)| i).collect();
        if ready.len() != 1 {
            return Err(format!("`ready` logged {} times", ready.len()));
        }
        if let Some(first) = lines.iter().position(|l| l.starts_with("tick ")) {
            if first < ready[0] {
                return Err("a tick before `ready`".into());
            }
        }
        let ticks = self.ticks();
        for (i, &t) in ticks.iter().enumerate() {
            let want = i as u64 + 1;
            if t != want {
                let prev = if i > 0 { ticks[i - 1].to_string() } else { "none".into() };
                return Err(format!(
                    "ticks not continuous: tick {t} after {prev} (position {i}, want {want}; {} ticks)",
                    ticks.len()
                ));
            }
        }
        Ok(())
    }

    /// After a post-copy or hybrid migration that failed once its copy may have run:
    /// the process is lost, and nothing else. No copy of it runs anywhere (the source
    /// and `copies`, e.g. the destination's pid from the daemon's log, are gone), ferry
    /// left nothing around them (`crate::residue`), and its log is continuous: what the
    /// copy logged was never logged again by a source that rolled back ("tick 39 after
    /// 41"). Reaps the spawned process.
    pub fn assert_lost(&mut self, copies: &[i32]) {
        let log = self.log.to_string_lossy().into_owned();
        wait_until("no copy of the process left", DEADLINE, || processes_mentioning(&log).is_empty());
        // Killed, a process stops naming its log (its memory goes) a moment before it is
        // a zombie: each must get there (a process that runs on never does).
        let source = self.pid;
        for (what, p) in std::iter::once(("source", source)).chain(copies.iter().map(|&c| ("copy", c))) {
            wait_until(&format!("the {what} {p} gone (not running on)"), DEADLINE, || !pid_alive(p));
        }
        if !self.reaped {
            let status = self.child.wait().expect("reaping the source");
            assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL), "the source was killed");
            self.reaped = true;
        }
        let mut pids = vec![source];
        pids.extend_from_slice(copies);
        crate::assert_no_residue(&pids, None);
        self.assert_continuous();
    }

    /// Panics unless the log is continuous (see `check_continuous`).
    pub fn assert_continuous(&self) {
        if let Err(e) = self.check_continuous() {
            panic!("{e}: {}", self.describe());
        }
    }

    /// Sends SIGTERM to `pid` (the spawned pid, or the one it was restored as), waits
    /// for its verdict and its exit, and checks the verdict, the exit status where it
    /// is our child, and the log's continuity.
    pub fn terminate_and_check(&mut self, pid: i32) -> Result<(), String> {
        self.adopt(pid);
        let deadline = Instant::now() + DEADLINE;
        // The SIGTERM handler is installed before `ready`: earlier, SIGTERM would kill.
        poll(deadline, || self.lines().iter().any(|l| l == "ready") || !pid_alive(pid))
            .map_err(|_| format!("no `ready` from pid {pid}: {}", self.describe()))?;
        if !pid_alive(pid) {
            return Err(format!("pid {pid} is not running: {}", self.describe()));
        }
        if !send_signal(pid, libc::SIGTERM) {
            return Err(format!("SIGTERM to pid {pid}: {}", std::io::Error::last_os_error()));
        }
        poll(deadline, || self.verdict().is_some() || !pid_alive(pid))
            .map_err(|_| format!("no verdict from pid {pid}: {}", self.describe()))?;
        poll(deadline, || !pid_alive(pid))
            .map_err(|_| format!("pid {pid} still runs after its verdict: {}", self.describe()))?;
        let verdict =
            self.verdict().ok_or_else(|| format!("pid {pid} exited without a verdict: {}", self.describe()))?;
        if pid == self.pid && !self.reaped {
            let status = self.child.wait().map_err(|e| format!("reaping {pid}: {e}"))?;
            let want = if verdict.is_ok() { 0 } else { 1 };
            if status.code() != Some(want) {
                return Err(format!("pid {pid} exited {status} after {verdict:?}"));
            }
        }
        verdict?;
        self.check_continuous()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        for &(pid, started) in &self.known {
            if pid == self.pid && !self.reaped {
                // Unreaped, our child's pid and group stay ours (try_wait reaps it only
                // once it is gone): the group takes along what it forked (bash's sleep).
                if let Ok(None) = self.child.try_wait() {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                }
            } else if pid_alive(pid) && (started.is_none() || start_time(pid) == started) {
                kill_pid(pid);
            }
        }
    }
}

/// Polls `cond` until `deadline` (Err when it passed).
fn poll(deadline: Instant, mut cond: impl FnMut() -> bool) -> Result<(), ()> {
    let mut pause = Duration::from_millis(1);
    while !cond() {
        if Instant::now() >= deadline {
            return Err(());
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    Ok(())
}

/// The fields of /proc/PID/stat after the command name: [0] is the state.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The start time of `pid` (field 22 of /proc/PID/stat), telling a process from a later
/// one that reuses its pid.
fn start_time(pid: i32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// Live processes (not zombies, not this test process) whose command line mentions
/// `needle`: pass something only the test's own processes have (a workload's log path,
/// which its copies keep), never a bare program name other tests' processes share.
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|&pid| pid != me && pid_alive(pid))
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle)))
        .collect()
}

/// The state letter of `pid` in /proc (`T`: stopped by job control, `Z`: a zombie);
/// "?" when there is no such process.
pub fn state(pid: i32) -> String {
    stat_fields(pid).and_then(|f| f.into_iter().next()).unwrap_or_else(|| "?".into())
}

/// Whether `pid` runs: zombies (and dying tasks) count as gone.
pub fn pid_alive(pid: i32) -> bool {
    match stat_fields(pid) {
        Some(f) => !matches!(f.first().map(String::as_str), Some("Z") | Some("X") | Some("x") | None),
        None => false,
    }
}

/// Sends `sig` to `pid`; whether it was sent.
pub fn send_signal(pid: i32, sig: i32) -> bool {
    // SAFETY: kill has no memory-safety preconditions; pid > 0 names one process.
    pid > 0 && unsafe { libc::kill(pid, sig) } == 0
}

/// SIGKILLs `pid` (a no-op for pids <= 0, which would name groups).
pub fn kill_pid(pid: i32) {
    send_signal(pid, libc::SIGKILL);
}

/// What `/proc/PID/task/*/status` shows of each thread's credentials (ids, groups, the
/// five capability sets, no_new_privs) with its login uid, sorted (tids may change in a
/// restore), and the process's oom_score_adj.
pub fn creds_of(pid: i32) -> (Vec<String>, String) {
    const FIELDS: [&str; 9] = ["Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs"];
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap_or_else(|e| panic!("/proc/{pid}/task: {e}")) {
        let dir = task.expect("a task entry").path();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let mut line: Vec<String> = FIELDS
            .iter()
            .map(|f| {
                let v = status.lines().find_map(|l| l.strip_prefix(f)?.strip_prefix(':')).unwrap_or("?");
                format!("{f}: {}", v.split_whitespace().collect::<Vec<_>>().join(" "))
            })
            .collect();
        let loginuid = std::fs::read_to_string(dir.join("loginuid")).unwrap_or_default();
        line.push(format!("loginuid: {}", loginuid.trim()));
        threads.push(line.join(", "));
    }
    threads.sort();
    let adj = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap_or_default();
    (threads, adj.trim().to_string())
}

/// The `VmFlags` codes of `pid`'s mapping `start..end` (`/proc/PID/smaps`); `None` when
/// no mapping is exactly that range.
pub fn vm_flags(pid: i32, start: u64, end: u64) -> Option<Vec<String>> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let head = format!("{start:x}-{end:x} ");
    let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&head)).skip(1);
    let flags = lines.find_map(|l| l.strip_prefix("VmFlags:"))?;
    Some(flags.split_whitespace().map(str::to_owned).collect())
}

/// The `VmFlags` codes of the one mapping of `pid` that holds `start..end`.
fn vm_flags_around(pid: i32, start: u64, end: u64) -> Option<Vec<String>> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut holding = false;
    for l in smaps.lines() {
        if let Some((range, _)) = l.split_once(' ').filter(|(r, _)| r.contains('-') && !r.ends_with(':')) {
            let (a, b) = range.split_once('-')?;
            let (a, b) = (u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?);
            holding = a <= start && end <= b;
        } else if let Some(flags) = l.strip_prefix("VmFlags:").filter(|_| holding) {
            return Some(flags.split_whitespace().map(str::to_owned).collect());
        }
    }
    None
}

impl Workload {
    /// With `--mm-flags`: checks from outside that each `mmf-*` area of `pid` is one
    /// mapping with its advice or lock (the workload checks the rest from inside).
    pub fn check_mm_flags(&self, pid: i32) -> Result<(), String> {
        let want = [
            ("mmf-dontfork", "dc"),
            ("mmf-wipeonfork", "wf"),
            ("mmf-hugepage", "hg"),
            ("mmf-nohugepage", "nh"),
            ("mmf-dontdump", "dd"),
            ("mmf-random", "rr"),
            ("mmf-locked", "lo"),
            ("mmf-onfault", "lf"),
            ("mmf-guarded", "gu"),
        ];
        for (name, code) in want {
            let (start, end) = self.region(name);
            // The guarded area may come back merged with a neighbour of the same flags
            // (mapped before its guard is installed, which flags the whole mapping): a
            // known difference of layout, not of content (see the session 7 note); its
            // guard flag and page are checked all the same.
            let flags = vm_flags(pid, start, end)
                .or_else(|| (name == "mmf-guarded").then(|| vm_flags_around(pid, start, end)).flatten())
                .ok_or_else(|| format!("pid {pid}: {name} {start:#x}-{end:#x} is not one mapping"))?;
            if !flags.iter().any(|f| f == code) {
                return Err(format!("pid {pid}: {name} lost `{code}`: VmFlags {}", flags.join(" ")));
            }
        }
        Ok(())
    }
}
