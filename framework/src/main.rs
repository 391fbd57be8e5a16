//! The `ferry` command: parses arguments and calls the library. Exit codes: 0 success,
//! 1 failure (one line on stderr saying what and why), 2 usage.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{CommandFactory, FromArgMatches};
use ferry::{
    commands::checkpoint::{self, CheckpointRequest},
    commands::cli::{Cli, Command, ConfigCommand, PluginsCommand, ShowView},
    commands::control::{self, Request},
    commands::daemon,
    commands::manual,
    commands::migrate::{self, MigrateRequest},
    config::{Config, ExecContext, Overrides},
    engine::event::{EventError, Tick},
    engine::manager::{self, Manager},
    commands::restore::{self, RestoreRequest},
    image,
    kernel::probes,
    wire::protocol,
};
use ferry_plugin_api::PluginKind;

/// How a request ended badly, for `--json`: ferry declined, or something broke while
/// it worked (a usage error never gets this far). Both exit with 1.
#[derive(Clone, Copy)]
enum Kind {
    Refused,
    Failed,
}

/// A failure to report: one line, exit code 1.
struct Failure {
    message: String,
    kind: Kind,
}

impl Failure {
    fn failed(message: impl Into<String>) -> Self {
        Failure { message: message.into(), kind: Kind::Failed }
    }
    fn refused(message: impl Into<String>) -> Self {
        Failure { message: message.into(), kind: Kind::Refused }
    }
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::failed(e.to_string())
    }
}

/// An event's error, refused or failed as the library tells them apart.
fn event_failure(e: EventError) -> Failure {
    Failure { kind: if e.is_refusal() { Kind::Refused } else { Kind::Failed }, message: e.to_string() }
}


/// Why a restored process could not have its pid `old` back: who holds it now.
fn why_not_same_pid(old: &str) -> String {
    match std::fs::read_to_string(format!("/proc/{old}/comm")) {
        Ok(comm) => format!("pid {old} is held by another process ({})", comm.trim()),
        Err(_) => format!("pid {old} was taken when the restore began (it is free now)"),
    }
}

/// A failure as `--json` prints it on standard output.
fn failure_json(error: &str, kind: &str, pid: Option<i32>) -> String {
    serde_json::json!({"error": error, "kind": kind, "pid": pid}).to_string()
}

/// A usage error: with `--json` among the arguments, a JSON object on standard output
/// too; then clap's own message and exit code 2 (`--help` and `--version` exit 0).
fn usage(e: clap::Error) -> ! {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if e.use_stderr() && args.iter().any(|a| a == "--json") {
        // clap's message up to its first blank line (a list of missing arguments
        // follows the first), in one line.
        let text = e.to_string();
        let message: Vec<&str> = text.lines().take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
        let line = message.join(" ");
        // The pid of `checkpoint PID` or `migrate PID`, when it parses.
        let pid = args
            .iter()
            .skip_while(|a| *a != "checkpoint" && *a != "migrate")
            .find_map(|a| a.parse::<i32>().ok());
        emit(format_args!("{}", failure_json(line.strip_prefix("error: ").unwrap_or(&line), "usage", pid)), true);
    }
    e.exit()
}

type Outcome = Result<(), Failure>;

/// Standard output that a reader may close early (`ferry show DIR | head`): then ferry
/// stops quietly instead of panicking on the broken pipe.
macro_rules! out {
    ($($arg:tt)*) => { emit(format_args!($($arg)*), false) };
}
macro_rules! outln {
    ($($arg:tt)*) => { emit(format_args!($($arg)*), true) };
}

fn emit(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|_| if newline { out.write_all(b"\n") } else { Ok(()) }).and_then(|_| out.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("ferry: writing to standard output: {e}");
            std::process::exit(1);
        }
    }
}


/// An option of the files plugin for this request (`mechanism.plugin_params.files`):
/// `--tcp-close`, `--shell-job`, `--inherit-fd`.
fn files_option(config: &mut Config, key: &str, value: String) {
    config.mechanism.plugin_params.entry("files".into()).or_default().insert(key.into(), value);
}

fn main() -> ExitCode {
    // Page buffers of several MiB come and go all through an event; served from the
    // heap and kept, they are faulted in once instead of once per buffer.
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
    // The definitions below, with each command's examples and the note on root.
    let matches = manual::annotate(Cli::command()).try_get_matches().unwrap_or_else(|e| usage(e));
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| usage(e));
    let (pid, json) = (cli.command.pid(), cli.command.json());
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { message, kind }) => {
            let line = message.lines().next().unwrap_or("failed");
            eprintln!("ferry: {line}");
            if json {
                let kind = match kind {
                    Kind::Refused => "refused",
                    Kind::Failed => "failed",
                };
                outln!("{}", failure_json(line, kind, pid));
            }
            ExitCode::from(1)
        }
    }
}

/// The configuration with the global options and `extra` applied.

fn effective(cli: &Cli, extra: Overrides) -> Result<Config, Failure> {
    // A configuration ferry will not use is a refusal.
    let (mut config, _) = Config::load(cli.config.as_deref()).map_err(|e| Failure::refused(e.to_string()))?;
    let overrides = Overrides { plugin_dir: cli.plugin_dir.clone(), ..extra };
    config.apply(&overrides);
    config.validate().map_err(|e| Failure::refused(e.to_string()))?;
    // Who makes the calls in the processes this command seizes.
    ferry::kernel::tracer::set_internal(config.mechanism.context == ExecContext::Internal);
    Ok(config)
}

fn run(cli: Cli) -> Outcome {
    match &cli.command {
        Command::Checkpoint { pid, dir, leave_running, shell_job, quiesce, subsystems, context, json } => {
            let mut config = effective(
                &cli,
                Overrides { quiesce: *quiesce, subsystems: subsystems.clone(), context: *context, ..Overrides::default() },
            )?;
            if *shell_job {
                files_option(&mut config, "shell_job", "1".into());
            }
            let manager = registry(&config)?;
            let req = CheckpointRequest {
                pid: *pid,
                dir: dir.clone(),
                subsystems: config.mechanism.subsystems.clone(),
                medium: "file".into(),
                quiesce: config.mechanism.quiesce,
                leave_running: *leave_running,
                watchdog: Duration::from_millis(config.watchdog_ms),
            };
            let _params = ferry::engine::params::scope(config.mechanism.plugin_params.clone());
            let mut stats = with_progress("checkpoint", |p| checkpoint::checkpoint(&manager, &req, p)).map_err(event_failure)?;
            stats.phases = ferry::trace::phases_take();
            if *json {
                outln!("{}", serde_json::to_string(&stats)?);
            } else {
                let tree = match stats.pids.len() {
                    0 | 1 => String::new(),
                    2 => " and its child".to_string(),
                    n => format!(" and its {} descendants", n - 1),
                };
                outln!(
                    "checkpointed process {pid}{tree} into {}: {} bytes, {} pages, frozen {:.1} ms",
                    dir.display(), stats.bytes, stats.pages, stats.frozen_ms
                );
            }
            Ok(())
        }
        Command::Restore { dir, json, tcp_close, inherit_fd } => {
            let mut config = effective(&cli, Overrides::default())?;
            if !inherit_fd.is_empty() {
                files_option(&mut config, "inherit_fd", inherit_fd.join("\n"));
            }
            if *tcp_close {
                files_option(&mut config, "tcp_close", "1".into());
            }
            let _params = ferry::engine::params::scope(config.mechanism.plugin_params.clone());
            let manager = registry(&config)?;
            let req = RestoreRequest {
                dir: dir.clone(),
                medium: "file".into(),
                watchdog: Duration::from_millis(config.watchdog_ms),
            };
            let mut stats = with_progress("restore", |p| restore::restore(&manager, &req, p)).map_err(event_failure)?;
            stats.phases = ferry::trace::phases_take();
            if *json {
                outln!("{}", serde_json::to_string(&stats)?);
            } else {
                for (old, new) in &stats.pids {
                    outln!("{new}");
                    if old != &new.to_string() {
                        eprintln!("ferry: process {old} is back as {new}: {}", why_not_same_pid(old));
                    }
                }
            }
            Ok(())
        }
        Command::Show { dir, view, json } => show(&cli, dir, *view, *json),
        Command::Plugins { command } => plugins(&cli, command),
        Command::Check { json } => {
            // Empty cgroups left by a ferry killed before it could remove them: said on
            // stderr, the report on stdout stays as it is.
            let (removed, left) = ferry::kernel::freezer::remove_stale();
            for c in removed {
                eprintln!("ferry: removed the stale cgroup {} (its ferry is gone)", c.display());
            }
            for l in left {
                eprintln!("ferry: a stale cgroup of ferry's still holds a process: {l}");
            }
            let features = probes::probe_all();
            if *json {
                outln!("{}", serde_json::to_string_pretty(&features)?);
            } else {
                out!("{}", probes::render_text(&features));
                // What each medium finds here (rdma: libfabric's providers with RMA).
                let manager = registry(&effective(&cli, Overrides::default())?)?;
                for meta in manager.list().iter().filter(|m| m.kind == "medium") {
                    match manager.medium_probe(meta) {
                        Some(Ok(found)) => outln!("medium {:<14}available: {found}", meta.name),
                        Some(Err(why)) => outln!("medium {:<14}unavailable: {why}", meta.name),
                        None => {}
                    }
                }
                // Locks of TCP connections (the files plugin's): kept by a checkpoint until
                // its restore, by a migration's source until its user moves the address.
                let tables = std::process::Command::new("nft").args(["list", "tables", "inet"]).output();
                let tables = tables.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
                for name in tables.lines().filter_map(|l| l.strip_prefix("table inet ")).filter(|n| n.starts_with("ferry-")) {
                    let pid = name.split('-').nth(1).unwrap_or("?");
                    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                    let live = stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']));
                    let fate = if live { "lives" } else { "is gone" };
                    outln!("network lock {name}: process {pid} {fate}; `nft delete table inet {name}` lifts it");
                }
            }
            Ok(())
        }
        Command::Config { command: ConfigCommand::Show(args) } => {
            let overrides = Overrides {
                subsystems: args.subsystems.clone(),
                medium: args.medium.clone(),
                strategy: args.strategy,
                quiesce: args.quiesce,
                context: args.context,
                watchdog_ms: args.watchdog_ms,
                listen: args.listen.clone(),
                control: args.control.clone(),
                ..Overrides::default()
            };
            outln!("{}", effective(&cli, overrides)?.to_json_pretty());
            Ok(())
        }
        Command::Janitor => Ok(ferry::commands::janitor::run().map_err(Failure::failed)?),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            manual::completions(manual::annotate(Cli::command()), *shell, &mut script);
            out!("{}", String::from_utf8_lossy(&script));
            Ok(())
        }
        Command::Manpages { dir } => {
            let written = manual::write_man_pages(manual::annotate(Cli::command()), dir)
                .map_err(|e| Failure::failed(format!("writing man pages into {}: {e}", dir.display())))?;
            outln!("wrote {} man pages into {}", written.len(), dir.display());
            Ok(())
        }
        Command::Config { command: ConfigCommand::Example { explain } } => {
            if *explain {
                out!("{}", ferry::config::explain::explained());
            } else {
                out!("{}", ferry::config::explain::EXAMPLE);
            }
            Ok(())
        }
        Command::Daemon { control, listen, auth_key, stats } => {
            let config = effective(&cli, Overrides { control: control.clone(), ..Overrides::default() })?;
            let key_file = auth_key.clone().or(config.daemon.auth_key.clone());
            let opts = daemon::DaemonOptions {
                plugin_dir: manager::plugin_dir(None, config.plugin_dir.as_deref()),
                control: config.daemon.control.clone(),
                // `--listen`, else the configuration's `daemon.listen`, else none.
                listen: listen.clone().or(config.daemon.listen.clone()),
                auth_key: key_file.as_deref().map(protocol::load_key).transpose()?,
                timeout: Duration::from_millis(config.watchdog_ms),
                stats: stats.clone(),
            };
            daemon::run(&opts)?;
            Ok(())
        }
        Command::Migrate { pid, to, strategy, medium, auth_key, shell_job, quiesce, subsystems, context, json, tcp_close } => {
            let mut config = effective(
                &cli,
                Overrides {
                    quiesce: *quiesce,
                    strategy: *strategy,
                    medium: medium.clone(),
                    subsystems: subsystems.clone(),
                    context: *context,
                    ..Overrides::default()
                },
            )?;
            if *tcp_close {
                files_option(&mut config, "tcp_close", "1".into());
            }
            if *shell_job {
                files_option(&mut config, "shell_job", "1".into());
            }
            let key_file = auth_key.clone().or(config.daemon.auth_key.clone());
            let manager = registry(&config)?;
            let req = MigrateRequest {
                pid: *pid,
                to: to.clone(),
                subsystems: config.mechanism.subsystems.clone(),
                quiesce: config.mechanism.quiesce,
                auth_key: key_file.as_deref().map(protocol::load_key).transpose()?,
                timeout: Duration::from_millis(config.watchdog_ms),
                strategy: config.mechanism.strategy,
                pre_copy: ferry::strategies::rounds::Tuning {
                    budget: Duration::from_millis(config.tuning.pre_copy.downtime_budget_ms),
                    max_rounds: config.tuning.pre_copy.max_rounds,
                    throttle: config.tuning.pre_copy.throttle,
                    tracking: config.tuning.pre_copy.dirty_tracking,
                },
                hybrid_rounds: config.tuning.hybrid.precopy_rounds,
                fault_window: config.tuning.post_copy.fault_window_kib as u64 * 1024,
                push_batch: config.tuning.post_copy.push_batch_kib as u64 * 1024,
                // `--medium`, else the configuration's if it is a network medium, else tcp.
                medium: match medium {
                    Some(m) => m.clone(),
                    None if migrate::MEDIA.contains(&config.mechanism.medium.as_str()) => config.mechanism.medium.clone(),
                    None => "tcp".into(),
                },
                medium_params: config.mechanism.medium_params.0.clone(),
                plugin_params: config.mechanism.plugin_params.clone(),
            };
            let mut stats = with_progress("migrate", |p| migrate::migrate(&manager, &req, p)).map_err(event_failure)?;
            stats.phases = ferry::trace::phases_take();
            if *json {
                outln!("{}", serde_json::to_string(&stats)?);
            } else {
                let new = stats.pids.values().next().copied().unwrap_or(0);
                outln!("migrated process {pid} to {to} as pid {new}: {} bytes, frozen {:.1} ms", stats.bytes, stats.frozen_ms);
            }
            Ok(())
        }
    }
}

/// A registry holding every plugin of the configured plugin directory.
fn registry(config: &Config) -> Result<Manager, Failure> {
    let manager = Manager::new();
    manager.discover(&manager::plugin_dir(None, config.plugin_dir.as_deref()))?;
    Ok(manager)
}

/// Runs an event with a progress line on stderr (drawn only on a terminal, at most 10
/// times a second): the plugin at work, its bytes done of its total, the rate and the
/// time left. The line is cleared before the event's result is printed.
fn with_progress<T>(what: &'static str, event: impl FnOnce(&mut dyn FnMut(&Tick)) -> T) -> T {
    let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr_with_hz(10));
    let style = indicatif::ProgressStyle::with_template("ferry {prefix}: {msg:10} {bytes}/{total_bytes} {binary_bytes_per_sec} {eta} left")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
    bar.set_style(style);
    bar.set_prefix(what);
    let mut tick = |t: &Tick| {
        bar.set_message(t.plugin.to_string());
        bar.set_length(t.status.bytes_total.max(t.status.bytes_done));
        bar.set_position(t.status.bytes_done);
    };
    ferry::trace::phases_begin();
    let result = event(&mut tick);
    bar.finish_and_clear();
    result
}

/// A stream of an image, pulled through a medium instance of its own.
struct StreamPull {
    medium: ferry_plugin_api::MediumBox,
    stream: u32,
}

impl image::Pull for StreamPull {
    fn pull(&mut self, buf: &mut [u8]) -> Result<usize, String> {
        use ferry_plugin_api::abi_stable::std_types::RSliceMut;
        self.medium.popdata(self.stream, RSliceMut::from_mut_slice(buf)).into_result().map_err(|e| e.to_string())
    }
}


fn show(cli: &Cli, dir: &Path, view: Option<ShowView>, json: bool) -> Outcome {
    let config = effective(cli, Overrides::default())?;
    let manager = registry(&config)?;
    let lease = manager.acquire(PluginKind::Medium, "file")?;
    if !dir.is_dir() {
        return Err(Failure::refused(format!("{}: no such image directory", dir.display())));
    }
    let params = serde_json::json!({"role": "read", "dir": dir});
    let mut open = |stream: u32| -> Result<Box<dyn image::Pull>, String> {
        let medium = lease.open_medium(&params).map_err(|e| e.to_string())?;
        Ok(Box::new(StreamPull { medium, stream }))
    };
    let mut inv_pull = open(image::INVENTORY_STREAM).map_err(Failure::failed)?;
    let inventory = image::Inventory::read_from(&mut inv_pull).map_err(|e| Failure::refused(format!("{}: {e}", dir.display())))?;
    let described = image::describe(&inventory, &mut open)?;
    let view = view.map(|v| match v {
        ShowView::Ps => image::View::Ps,
        ShowView::Mems => image::View::Mems,
        ShowView::Fds => image::View::Fds,
        ShowView::Sigs => image::View::Sigs,
    });
    match (view, json) {
        (Some(view), _) => out!("{}", image::render_view(&described, view)),
        (None, true) => outln!("{}", serde_json::to_string_pretty(&described)?),
        (None, false) => out!("{}", image::render_text(&described)),
    }
    Ok(())
}

fn plugins(cli: &Cli, command: &PluginsCommand) -> Outcome {
    let config = effective(cli, Overrides::default())?;
    let dir = manager::plugin_dir(None, config.plugin_dir.as_deref());
    match command {
        PluginsCommand::List { json, control } => {
            // The daemon's registry is what events use; a --plugin-dir asks for a directory.
            let socket = control.clone().unwrap_or(config.daemon.control.clone());
            if cli.plugin_dir.is_none() && control::daemon_running(&socket) {
                let reply = control::request(&socket, &Request::List, Duration::from_secs(10))?;
                let plugins = daemon_reply(reply)?;
                return list_registry(&socket, &plugins, *json);
            }
            list(&dir, *json)
        }
        PluginsCommand::Load { plugin, control } => {
            let path = resolve_plugin(&dir, plugin)?;
            let meta = manager::validate(&path)?;
            let socket = control.clone().unwrap_or(config.daemon.control.clone());
            if !control::daemon_running(&socket) {
                return Err(Failure::failed(format!(
                    "{} plugin {} {} is valid ({}), but no daemon runs at {}: nothing was registered (start `ferry daemon`)",
                    meta.kind, meta.name, meta.version, meta.path.display(), socket.display()
                )));
            }
            let reply = control::request(&socket, &Request::Load { path: meta.path.clone() }, Duration::from_secs(30))?;
            daemon_reply(reply)?;
            outln!("registered {} plugin {} {} in the daemon at {}", meta.kind, meta.name, meta.version, socket.display());
            Ok(())
        }
        PluginsCommand::Unload { name, control, wait_ms } => {
            let socket = control.clone().unwrap_or(config.daemon.control.clone());
            let timeout = Duration::from_millis(*wait_ms) + Duration::from_secs(10);
            let reply = control::request(&socket, &Request::Unload { name: name.clone(), wait_ms: *wait_ms }, timeout)?;
            daemon_reply(reply)?;
            outln!("unregistered plugin {name} in the daemon at {}", socket.display());
            Ok(())
        }
    }
}

fn daemon_reply(reply: control::Reply) -> Result<Vec<manager::PluginMeta>, Failure> {
    if reply.ok {
        Ok(reply.plugins)
    } else {
        Err(Failure::refused(format!("daemon refused: {}", reply.error.unwrap_or_else(|| "no reason given".into()))))
    }
}

/// A path is taken as is; a bare name is looked up among the plugins of `dir`.
fn resolve_plugin(dir: &Path, plugin: &str) -> Result<PathBuf, Failure> {
    if plugin.contains('/') || plugin.ends_with(".so") {
        return Ok(PathBuf::from(plugin));
    }
    let found = Manager::new().discover(dir)?;
    found
        .into_iter()
        .find_map(|f| f.meta.filter(|m| m.name == plugin).map(|m| m.path))
        .ok_or_else(|| Failure::refused(format!("no plugin named {plugin} in {}", dir.display())))
}

/// The registry of the daemon at `socket`.
fn list_registry(socket: &Path, plugins: &[manager::PluginMeta], json: bool) -> Outcome {
    let status = format!("registered in the daemon at {}", socket.display());
    if json {
        let rows: Vec<serde_json::Value> = plugins
            .iter()
            .map(|m| serde_json::json!({"name": m.name, "kind": m.kind, "version": m.version, "path": m.path, "status": status}))
            .collect();
        outln!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    outln!("the registry of the daemon at {}:", socket.display());
    for m in plugins {
        outln!("{:<10} {:<12} {:<8} {}", m.kind, m.name, m.version, m.path.display());
    }
    Ok(())
}

fn list(dir: &Path, json: bool) -> Outcome {
    let manager = Manager::new();
    let mut found = manager.discover(dir)?;
    // A medium that cannot work on this machine says why (asked here only: it costs).
    for f in &mut found {
        if let Some(why) = f.meta.as_ref().and_then(|m| manager.unavailable(m)) {
            f.status = format!("registered (unavailable: {why})");
        }
    }
    if json {
        let rows: Vec<serde_json::Value> = found
            .iter()
            .map(|f| {
                serde_json::json!({
                    "name": f.meta.as_ref().map(|m| m.name.clone()),
                    "kind": f.meta.as_ref().map(|m| m.kind.clone()),
                    "version": f.meta.as_ref().map(|m| m.version.clone()),
                    "path": f.path,
                    "status": f.status,
                })
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if found.is_empty() {
        outln!("no plugins in {}", dir.display());
    } else {
        outln!("the plugins of directory {} (no daemon asked):", dir.display());
    }
    for f in &found {
        let (kind, name, version) = f
            .meta
            .as_ref()
            .map_or(("-", "-", "-"), |m| (m.kind.as_str(), m.name.as_str(), m.version.as_str()));
        outln!("{kind:<10} {name:<12} {version:<8} {:<60} {}", f.path.display(), f.status);
    }
    Ok(())
}
