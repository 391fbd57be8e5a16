//! The command line's grammar (clap): every command, its options and their help, which
//! the man pages and completions are generated from (`manual`). `main.rs` runs it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{ExecContext, Quiesce, Strategy};

#[derive(Parser)]
#[command(name = "ferry", version, about = "Live-migrate, checkpoint and restore running Linux processes")]
pub struct Cli {
    /// Configuration file (default /etc/ferry/ferry.json when it exists).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Directory to load plugins from (beats the configuration file).
    #[arg(long, global = true, value_name = "DIR")]
    pub plugin_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Checkpoint a running process into an image directory (then kill it, unless --leave-running).
    Checkpoint {
        /// The process to checkpoint, with all its descendants.
        pid: i32,
        /// Image directory: must not exist or be empty.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Let the process carry on after the checkpoint instead of killing it.
        #[arg(long)]
        leave_running: bool,
        /// The process is on a terminal that is not part of the request (a shell's
        /// job): carry it, to be restored onto the terminal `ferry restore` runs from
        /// (or one named with --inherit-fd). Its settings are the new terminal's.
        #[arg(long)]
        shell_job: bool,
        /// Quiescing method: ptrace (PTRACE_INTERRUPT) or freezer (cgroup).
        #[arg(long)]
        quiesce: Option<Quiesce>,
        /// Subsystem plugins, comma separated.
        #[arg(long, value_delimiter = ',', value_name = "LIST")]
        subsystems: Option<Vec<String>>,
        /// Execution context: external (ferry's tracer makes each call in the process)
        /// or internal (an agent in the process makes them).
        #[arg(long)]
        context: Option<ExecContext>,
        /// Print the statistics as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Restore the process of an image directory; prints its pid once it runs.
    Restore {
        /// Image directory written by `ferry checkpoint`.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Print the statistics as one JSON object.
        #[arg(long)]
        json: bool,
        /// A shell job's terminal PATH (as the image names it: `ferry show`) is restored
        /// onto ferry's fd N instead of ferry's own terminal (repeatable).
        #[arg(long, value_name = "fd[N]:PATH", value_parser = inherit_fd)]
        inherit_fd: Vec<String>,
        /// Restore established TCP connections closed (the process's next call on one
        /// fails with ECONNABORTED; its peer gets a reset), as CRIU's option (the files
        /// plugin's option tcp_close).
        #[arg(long)]
        tcp_close: bool,
    },
    /// Decode an image: inventory, records of each plugin, page counts.
    Show {
        /// Image directory.
        dir: PathBuf,
        /// One kind of state of every process, laid out as /proc shows it: processes
        /// (ps), memory areas (mems), open files (fds), signals (sigs).
        #[arg(value_enum)]
        view: Option<ShowView>,
        /// Print JSON instead of text (the whole image; not with a view).
        #[arg(long, conflicts_with = "view")]
        json: bool,
    },
    /// List, load and unload plugins.
    Plugins {
        #[command(subcommand)]
        command: PluginsCommand,
    },
    /// Report the kernel features ferry relies on, and the fallback for each missing one.
    Check {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the effective configuration or an example file.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Run the daemon: the plugin registry, its control socket, and (with --listen or
    /// `daemon.listen` in the configuration) migrations.
    Daemon {
        /// Control socket path (beats the configuration file).
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// Accept migrations on this address (beats `daemon.listen`; beyond loopback only
        /// with --auth-key).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Shared key file: both sides prove they hold it before anything else.
        #[arg(long, value_name = "FILE")]
        auth_key: Option<PathBuf>,
        /// Write one JSON file of statistics per migration event into this directory.
        #[arg(long, value_name = "DIR")]
        stats: Option<PathBuf>,
    },
    /// Move a running process to the daemon at HOST:PORT (stop-copy, pre-copy, post-copy, hybrid).
    Migrate {
        /// The process to move (one without children: a migration does not carry process trees yet).
        pid: i32,
        /// The destination daemon.
        #[arg(long, value_name = "HOST:PORT")]
        to: String,
        /// Migration algorithm: stop-copy (default), pre-copy, post-copy or hybrid.
        #[arg(long)]
        strategy: Option<Strategy>,
        /// Transfer medium plugin.
        #[arg(long)]
        medium: Option<String>,
        /// Shared key file of the destination daemon.
        #[arg(long, value_name = "FILE")]
        auth_key: Option<PathBuf>,
        /// Quiescing method: ptrace or freezer.
        #[arg(long)]
        quiesce: Option<Quiesce>,
        /// The process is on a terminal that is not part of the request (a shell's
        /// job): carry it, restored onto the same terminal by its path
        /// (the daemon runs from none). Its settings are the new terminal's.
        #[arg(long)]
        shell_job: bool,
        /// Subsystem plugins, comma separated.
        #[arg(long, value_delimiter = ',', value_name = "LIST")]
        subsystems: Option<Vec<String>>,
        /// Execution context: external (ferry's tracer makes each call in the process)
        /// or internal (an agent in the process makes them).
        #[arg(long)]
        context: Option<ExecContext>,
        /// Print the statistics as one JSON object.
        #[arg(long)]
        json: bool,
        /// Restore established TCP connections closed at the destination (the process's
        /// next call on one fails with ECONNABORTED; its peer gets a reset), as CRIU's option.
        #[arg(long)]
        tcp_close: bool,
    },
    /// Print a completion script for a shell (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (ferry.1 and one per command) into a directory.
    #[command(hide = true)]
    Manpages {
        /// Directory to write them into (made if missing).
        dir: PathBuf,
    },
    /// The janitor a checkpoint starts: undoes what it did to the process if it dies.
    #[command(hide = true)]
    Janitor,
}

#[derive(Subcommand)]
pub enum PluginsCommand {
    /// List the running daemon's registry, or without a daemon every plugin of the plugin directory with its status.
    List {
        /// Print a JSON array of {name, kind, version, path, status}.
        #[arg(long)]
        json: bool,
        /// Control socket of the daemon to ask (beats the configuration file).
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Check a plugin (a path, or a name in the plugin directory) and register it in the running daemon.
    Load {
        /// A plugin file, or the name of a plugin in the plugin directory.
        plugin: String,
        /// Control socket of the daemon (beats the configuration file).
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Unregister a plugin in the running daemon, once no event uses it.
    Unload {
        /// The plugin's name.
        name: String,
        /// Control socket of the daemon (beats the configuration file).
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// How long to wait for the events using it to end before reporting it busy.
        #[arg(long, value_name = "MS", default_value_t = 5000)]
        wait_ms: u64,
    },
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration: defaults < configuration file < command line.
    Show(MechanismArgs),
    /// Print the example configuration file: every key at its default.
    Example {
        /// Write each key's documentation above it, as `//` comments (ferry reads
        /// comments in a configuration file).
        #[arg(long)]
        explain: bool,
    },
}

/// Command-line overrides of the configuration.
#[derive(Args, Default)]
pub struct MechanismArgs {
    /// Subsystem plugins, comma separated.
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub subsystems: Option<Vec<String>>,
    /// Transfer medium plugin.
    #[arg(long)]
    pub medium: Option<String>,
    /// Migration algorithm: stop-copy, pre-copy, post-copy or hybrid.
    #[arg(long)]
    pub strategy: Option<Strategy>,
    /// Quiescing method: ptrace or freezer.
    #[arg(long)]
    pub quiesce: Option<Quiesce>,
    /// Execution context: external or internal.
    #[arg(long)]
    pub context: Option<ExecContext>,
    /// Watchdog timeout in milliseconds.
    #[arg(long, value_name = "MS")]
    pub watchdog_ms: Option<u64>,
    /// Daemon listen address.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Daemon control socket.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

/// `ferry show DIR VIEW`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ShowView {
    Ps,
    Mems,
    Fds,
    Sigs,
}

impl Command {
    /// The process the request is about.
    pub fn pid(&self) -> Option<i32> {
        match self {
            Command::Checkpoint { pid, .. } | Command::Migrate { pid, .. } => Some(*pid),
            _ => None,
        }
    }

    /// Whether the request asks for JSON output, its failure included.
    pub fn json(&self) -> bool {
        match self {
            Command::Checkpoint { json, .. }
            | Command::Restore { json, .. }
            | Command::Show { json, .. }
            | Command::Check { json }
            | Command::Migrate { json, .. }
            | Command::Plugins { command: PluginsCommand::List { json, .. } } => *json,
            _ => false,
        }
    }
}

/// `--inherit-fd fd[N]:PATH`: N is an fd of ferry's, PATH absolute.
fn inherit_fd(s: &str) -> Result<String, String> {
    let ok = s.strip_prefix("fd[").and_then(|r| r.split_once("]:")).is_some_and(|(n, p)| n.parse::<u32>().is_ok() && p.starts_with('/'));
    ok.then(|| s.to_string()).ok_or_else(|| format!("{s}: not fd[N]:PATH (N an fd of ferry's, PATH the terminal's path in the image)"))
}
