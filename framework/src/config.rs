//! The configuration file `ferry.json` (docs/ARCHITECTURE.md, "Loading and the manager"): plugin directory,
//! the mechanism of a request, per-algorithm tuning, the watchdog and the daemon's addresses.
//! Layering is defaults < file < command line; an unknown key or a wrong type is an error that
//! names the file and the key's dotted path (`mechanism.strategy`). Every key: examples/README.md.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::de::value::MapAccessDeserializer;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// Where the configuration is looked for when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/ferry/ferry.json";

/// A configuration file larger than this is refused (it cannot be one of ours; this also keeps
/// `--config /dev/zero` from eating the machine).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Longest path a Unix socket address can hold (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Upper bound for the post-copy window and batch sizes (1 GiB, in KiB).
const MAX_WINDOW_KIB: u32 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Named enums (strategy, quiescing method, execution context)

/// A name that is not one of an enum's names (from the command line or [`FromStr`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownName {
    /// What was being named: "strategy", "quiescing method", "execution context".
    pub what: &'static str,
    /// The name given.
    pub given: String,
    /// The names that exist.
    pub expected: &'static [&'static str],
}

impl fmt::Display for UnknownName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown {} `{}`, expected one of ",
            self.what, self.given
        )?;
        for (i, name) in self.expected.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "`{name}`")?;
        }
        Ok(())
    }
}

impl std::error::Error for UnknownName {}

macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident ($what:literal, default $default:ident) {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $text)] $variant, )+
        }

        impl $name {
            /// Every value, in documentation order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// Every name, as written in `ferry.json` and on the command line.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The name, as written in `ferry.json` and on the command line.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                $name::$default
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        // By hand rather than derived: a wrong type then says which names are expected
        // (serde_json's derived enums answer a number with a bare "expected value").
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct NameVisitor;

                impl<'de> Visitor<'de> for NameVisitor {
                    type Value = $name;

                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("one of")?;
                        for (i, name) in $name::NAMES.iter().enumerate() {
                            f.write_str(if i > 0 { ", `" } else { " `" })?;
                            f.write_str(name)?;
                            f.write_str("`")?;
                        }
                        Ok(())
                    }

                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        v.parse().map_err(|_| E::unknown_variant(v, $name::NAMES))
                    }
                }

                d.deserialize_str(NameVisitor)
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;

            fn from_str(s: &str) -> Result<Self, UnknownName> {
                match s {
                    $( $text => Ok($name::$variant), )+
                    _ => Err(UnknownName { what: $what, given: s.to_owned(), expected: Self::NAMES }),
                }
            }
        }
    };
}

named_enum! {
    /// The migration algorithm (docs/ARCHITECTURE.md, "Strategies").
    pub enum Strategy ("strategy", default StopCopy) {
        /// Freeze, send everything, restore, resume, remove the source.
        StopCopy => "stop-copy",
        /// Send memory while the process runs, rounds of dirty pages, then freeze and send the rest.
        PreCopy => "pre-copy",
        /// Freeze, send everything but memory, resume at once; memory follows on demand.
        PostCopy => "post-copy",
        /// Pre-copy rounds (`tuning.hybrid.precopy_rounds`), then post-copy.
        Hybrid => "hybrid",
    }
}

named_enum! {
    /// How the process is stopped (docs/ARCHITECTURE.md, "Requests, events and the core").
    pub enum Quiesce ("quiescing method", default Ptrace) {
        /// Synchronous: `PTRACE_INTERRUPT` every thread.
        Ptrace => "ptrace",
        /// Asynchronous: the cgroup freezer (v2 `cgroup.freeze`, v1 `freezer.state`).
        Freezer => "freezer",
    }
}

named_enum! {
    /// Who does the work inside the target (docs/ARCHITECTURE.md, "Requests, events and the core").
    pub enum ExecContext ("execution context", default External) {
        /// A tracer thread of ferry attached with `PTRACE_SEIZE`.
        External => "external",
        /// The target itself, through a small library loaded into it.
        Internal => "internal",
    }
}

named_enum! {
    /// How pre-copy finds the pages written between rounds (`ferry check` says what
    /// this kernel has).
    pub enum DirtyTracking ("dirty-page tracking", default Auto) {
        /// The best this kernel has: userfaultfd, else page hashes.
        Auto => "auto",
        /// userfaultfd write-protection (async) and PAGEMAP_SCAN (Linux 6.7+).
        Userfaultfd => "userfaultfd",
        /// `/proc/PID/clear_refs` and pagemap bit 55 (not in this build).
        SoftDirty => "soft-dirty",
        /// A hash of every page, compared each round: slow, works everywhere.
        PageHash => "page-hash",
    }
}

// ---------------------------------------------------------------------------------------------
// The configuration

/// Everything `ferry.json` can say. Every key is optional; a missing one keeps its default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where plugins are loaded from; `None`: beside the binary, then `/usr/lib/ferry/plugins`.
    pub plugin_dir: Option<PathBuf>,
    /// What a request does when the command line does not say.
    #[serde(deserialize_with = "object")]
    pub mechanism: Mechanism,
    /// Knobs of each algorithm.
    #[serde(deserialize_with = "object")]
    pub tuning: Tuning,
    /// An event with no progress reported for this long is declared frozen and failed.
    pub watchdog_ms: u64,
    /// Where `ferry daemon` listens.
    #[serde(deserialize_with = "object")]
    pub daemon: DaemonConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            plugin_dir: None,
            mechanism: Mechanism::default(),
            tuning: Tuning::default(),
            watchdog_ms: 10_000,
            daemon: DaemonConfig::default(),
        }
    }
}

/// The mechanism of a request: which plugins, which algorithm, how to stop, who does the work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mechanism {
    /// Subsystem plugins, by name.
    pub subsystems: Vec<String>,
    /// Transfer medium plugin, by name.
    pub medium: String,
    /// The medium's own settings, handed to it as they are (rdma: `provider`, `ring`, `slot_kib`).
    pub medium_params: MediumParams,
    pub strategy: Strategy,
    pub quiesce: Quiesce,
    pub context: ExecContext,
    /// Options for plugins, by plugin name then option (`{"files": {"tcp_close": "1"}}`),
    /// which they read through their context; a migration carries them to the
    /// destination.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub plugin_params: BTreeMap<String, BTreeMap<String, String>>,
}

impl Default for Mechanism {
    fn default() -> Self {
        Mechanism {
            subsystems: ["memory", "threads", "files", "signals", "process", "seccomp", "creds"]
                .map(String::from)
                .to_vec(),
            medium: "file".to_owned(),
            medium_params: MediumParams::default(),
            strategy: Strategy::default(),
            quiesce: Quiesce::default(),
            context: ExecContext::default(),
            plugin_params: BTreeMap::new(),
        }
    }
}

/// `mechanism.medium_params`: a JSON object the medium checks itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MediumParams(pub serde_json::Map<String, serde_json::Value>);

impl Eq for MediumParams {} // parsed JSON holds no NaN

/// Tuning per strategy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tuning {
    #[serde(deserialize_with = "object")]
    pub pre_copy: PreCopyTuning,
    #[serde(deserialize_with = "object")]
    pub post_copy: PostCopyTuning,
    #[serde(deserialize_with = "object")]
    pub hybrid: HybridTuning,
}

/// Pre-copy: when to stop iterating and freeze.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreCopyTuning {
    /// Freeze once the dirty set can be sent in this long.
    pub downtime_budget_ms: u64,
    /// Freeze after this many rounds whatever the dirty set.
    pub max_rounds: u32,
    /// Auto-converge: throttle a process that dirties faster than the link sends (cpu.max).
    pub throttle: bool,
    /// How the pages written between rounds are found.
    pub dirty_tracking: DirtyTracking,
}

impl Default for PreCopyTuning {
    fn default() -> Self {
        PreCopyTuning {
            downtime_budget_ms: 30,
            max_rounds: 10,
            throttle: true,
            dirty_tracking: DirtyTracking::Auto,
        }
    }
}

/// Post-copy: how memory follows the resumed process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostCopyTuning {
    /// Fetched around each page fault, KiB.
    pub fault_window_kib: u32,
    /// Size of each background push, KiB.
    pub push_batch_kib: u32,
}

impl Default for PostCopyTuning {
    fn default() -> Self {
        PostCopyTuning {
            fault_window_kib: 256,
            push_batch_kib: 2048,
        }
    }
}

/// Hybrid: pre-copy rounds before switching to post-copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HybridTuning {
    pub precopy_rounds: u32,
}

impl Default for HybridTuning {
    fn default() -> Self {
        HybridTuning { precopy_rounds: 1 }
    }
}

/// The longest `watchdog_ms`: a day.
pub const MAX_WATCHDOG_MS: u64 = 86_400_000;

/// The daemon's addresses and key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// `address:port` the daemon accepts migrations on (`--listen` replaces it); none:
    /// the daemon serves its control socket only.
    pub listen: Option<String>,
    /// Unix socket for `ferry plugins …` and other local control.
    pub control: PathBuf,
    /// Shared key file; required when `listen` is not a loopback address.
    pub auth_key: Option<PathBuf>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            listen: None,
            control: PathBuf::from("/run/ferry/control.sock"),
            auth_key: None,
        }
    }
}

/// What the command line says; each `Some` replaces the value from the file or the defaults.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub plugin_dir: Option<PathBuf>,
    pub subsystems: Option<Vec<String>>,
    pub medium: Option<String>,
    pub strategy: Option<Strategy>,
    pub quiesce: Option<Quiesce>,
    pub context: Option<ExecContext>,
    pub watchdog_ms: Option<u64>,
    pub listen: Option<String>,
    pub control: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Why a configuration could not be had. The `Display` form names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, a directory, no permission, too large, not UTF-8).
    #[error("cannot read config file {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// The file is not valid JSON, or a key is unknown or has the wrong type. `key` is the
    /// dotted path (`mechanism.strategy`, `mechanism.subsystems[2]`), empty for syntax errors;
    /// `message` ends with the line and column where serde_json knows them.
    #[error("{}: {}{message}", path.display(), key_prefix(key))]
    Parse {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// Well-formed but unusable values. `path` is the file they came from, `None` when they
    /// came from the defaults or the command line.
    #[error("{}: {}{message}", origin_label(path), key_prefix(key))]
    Invalid {
        path: Option<PathBuf>,
        key: String,
        message: String,
    },
}

fn key_prefix(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("key `{key}`: ")
    }
}

fn origin_label(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => p.display().to_string(),
        None => "invalid configuration".to_owned(),
    }
}

impl ConfigError {
    /// The dotted key the error is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Parse { key, .. } | ConfigError::Invalid { key, .. } => {
                (!key.is_empty()).then_some(key.as_str())
            }
        }
    }

    /// The file the error is about, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ConfigError::Read { path, .. } | ConfigError::Parse { path, .. } => Some(path),
            ConfigError::Invalid { path, .. } => path.as_deref(),
        }
    }

    /// Attributes an [`ConfigError::Invalid`] without a file to `file`.
    pub fn in_file(self, file: &Path) -> ConfigError {
        match self {
            ConfigError::Invalid {
                path: None,
                key,
                message,
            } => ConfigError::Invalid {
                path: Some(file.to_path_buf()),
                key,
                message,
            },
            other => other,
        }
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: None,
        key: key.into(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Loading

impl Config {
    /// Reads and parses `path` (see [`Config::parse`]).
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = fs::File::open(path).map_err(read_err)?;
        let mut bytes = Vec::new();
        file.take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(read_err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "larger than {} KiB, not a ferry configuration file",
                    MAX_FILE_BYTES >> 10
                ),
            )));
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            read_err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "not UTF-8 text (bad byte at offset {})",
                    e.utf8_error().valid_up_to()
                ),
            ))
        })?;
        Config::parse(&text, path)
    }

    /// Parses the text of a configuration file; `origin` is the file name used in errors.
    /// Missing keys keep their defaults; unknown keys, wrong types and trailing text are
    /// errors. The values are also checked with [`Config::validate`], so that an unusable
    /// value is reported against the file it came from.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let parse_err = |key: String, message: String| ConfigError::Parse {
            path: origin.to_path_buf(),
            key,
            message,
        };
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let text = &*explain::strip_comments(text);
        if text.trim().is_empty() {
            return Err(parse_err(
                String::new(),
                "the file is empty; a configuration is a JSON object (`{}` for all defaults)"
                    .to_owned(),
            ));
        }
        let mut de = serde_json::Deserializer::from_str(text);
        let TopLevel(config) = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let (key, message) = describe(e);
            parse_err(key, message)
        })?;
        de.end()
            .map_err(|e| parse_err(String::new(), format!("invalid JSON: {e}")))?;
        config.validate().map_err(|e| e.in_file(origin))?;
        Ok(config)
    }

    /// Loads the configuration: `explicit` (which must exist) when given, else [`DEFAULT_PATH`]
    /// when it exists, else the defaults. Returns the file used, if any.
    pub fn load(explicit: Option<&Path>) -> Result<(Config, Option<PathBuf>), ConfigError> {
        Config::load_with_default(explicit, Path::new(DEFAULT_PATH))
    }

    fn load_with_default(
        explicit: Option<&Path>,
        default: &Path,
    ) -> Result<(Config, Option<PathBuf>), ConfigError> {
        let path = match explicit {
            Some(path) => path,
            None => match fs::metadata(default) {
                Ok(_) => default,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Ok((Config::default(), None))
                }
                // Present but not even stat-able (no permission on /etc/ferry): say so rather
                // than silently running with the defaults.
                Err(source) => {
                    return Err(ConfigError::Read {
                        path: default.to_path_buf(),
                        source,
                    })
                }
            },
        };
        Ok((Config::from_file(path)?, Some(path.to_path_buf())))
    }

    /// Lays the command line over this configuration.
    pub fn apply(&mut self, o: &Overrides) {
        fn set<T: Clone>(slot: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *slot = v.clone();
            }
        }
        if let Some(dir) = &o.plugin_dir {
            self.plugin_dir = Some(dir.clone());
        }
        set(&mut self.mechanism.subsystems, &o.subsystems);
        set(&mut self.mechanism.medium, &o.medium);
        set(&mut self.mechanism.strategy, &o.strategy);
        set(&mut self.mechanism.quiesce, &o.quiesce);
        set(&mut self.mechanism.context, &o.context);
        set(&mut self.watchdog_ms, &o.watchdog_ms);
        if let Some(listen) = &o.listen {
            self.daemon.listen = Some(listen.clone());
        }
        set(&mut self.daemon.control, &o.control);
    }

    /// Checks values that parse but cannot work. Errors carry no file ([`ConfigError::in_file`]
    /// attributes them); [`Config::parse`] already checked what came from a file.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(dir) = &self.plugin_dir {
            if dir.as_os_str().is_empty() {
                return Err(invalid(
                    "plugin_dir",
                    "empty path; leave the key out (or null) to use the default places",
                ));
            }
        }

        let m = &self.mechanism;
        if m.subsystems.is_empty() {
            return Err(invalid(
                "mechanism.subsystems",
                "must name at least one subsystem plugin",
            ));
        }
        for (i, name) in m.subsystems.iter().enumerate() {
            let key = format!("mechanism.subsystems[{i}]");
            check_plugin_name(&key, name)?;
            if let Some(first) = m.subsystems[..i].iter().position(|n| n == name) {
                return Err(invalid(
                    key,
                    format!("subsystem `{name}` is listed twice (also at [{first}])"),
                ));
            }
        }
        check_plugin_name("mechanism.medium", &m.medium)?;
        // The only media an event of this build takes (any other name did nothing).
        if !["file", "tcp", "rdma"].contains(&m.medium.as_str()) {
            return Err(invalid("mechanism.medium", format!("`{}` is not a medium of this build: images go through `file`, migrations through `tcp` or `rdma`", m.medium)));
        }

        if self.watchdog_ms == 0 || self.watchdog_ms > MAX_WATCHDOG_MS {
            return Err(invalid(
                "watchdog_ms",
                format!("must be 1 to {MAX_WATCHDOG_MS} (milliseconds without progress before an event is failed)"),
            ));
        }

        let t = &self.tuning;
        if t.pre_copy.max_rounds == 0 {
            return Err(invalid(
                "tuning.pre_copy.max_rounds",
                "must be at least 1 (for no rounds use strategy `stop-copy`)",
            ));
        }
        check_window(
            "tuning.post_copy.fault_window_kib",
            t.post_copy.fault_window_kib,
        )?;
        check_window(
            "tuning.post_copy.push_batch_kib",
            t.post_copy.push_batch_kib,
        )?;
        if t.hybrid.precopy_rounds == 0 {
            return Err(invalid(
                "tuning.hybrid.precopy_rounds",
                "must be at least 1 (for no rounds use strategy `post-copy`)",
            ));
        }

        let d = &self.daemon;
        let listen: Option<SocketAddr> = match &d.listen {
            None => None,
            Some(text) => Some(text.parse().map_err(|e| {
                invalid(
                    "daemon.listen",
                    format!("`{text}` is not an address:port such as 127.0.0.1:7711 or [::1]:7711 ({e})"),
                )
            })?),
        };
        if d.control.as_os_str().is_empty() {
            return Err(invalid("daemon.control", "empty path"));
        }
        if !d.control.is_absolute() {
            return Err(invalid(
                "daemon.control",
                format!("`{}` must be an absolute path", d.control.display()),
            ));
        }
        if d.control.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(invalid(
                "daemon.control",
                format!(
                    "`{}` is longer than the {MAX_SOCKET_PATH} bytes a Unix socket path can have",
                    d.control.display()
                ),
            ));
        }
        match &d.auth_key {
            Some(key) if key.as_os_str().is_empty() => {
                return Err(invalid("daemon.auth_key", "empty path"));
            }
            None if listen.is_some_and(|l| !l.ip().is_loopback()) => {
                // docs/ARCHITECTURE.md, "Security": whoever can talk to the daemon can run code as root.
                return Err(invalid(
                    "daemon.auth_key",
                    format!(
                        "required: daemon.listen `{}` is not a loopback address, and a daemon \
                         reachable from the network must authenticate its peers",
                        d.listen.as_deref().unwrap_or_default()
                    ),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// The configuration as `ferry.json` text, every key included.
    pub fn to_json_pretty(&self) -> String {
        // Plain structs with string keys: serialization cannot fail.
        serde_json::to_string_pretty(self).expect("Config always serializes")
    }
}

fn check_plugin_name(key: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(invalid(key, "empty plugin name"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(invalid(
            key,
            format!("`{name}` is not a plugin name (letters, digits, `-` and `_` only)"),
        ));
    }
    Ok(())
}

// `u32::is_multiple_of` is newer than the workspace's rust-version (1.80).
#[allow(clippy::manual_is_multiple_of)]
fn check_window(key: &str, kib: u32) -> Result<(), ConfigError> {
    if kib == 0 || kib % 4 != 0 || kib > MAX_WINDOW_KIB {
        return Err(invalid(
            key,
            format!("{kib} KiB: must be a multiple of 4 (whole pages) from 4 to {MAX_WINDOW_KIB}"),
        ));
    }
    Ok(())
}

/// Turns a serde error with its path into (dotted key, message).
fn describe(e: serde_path_to_error::Error<serde_json::Error>) -> (String, String) {
    let path = e.path().to_string();
    let inner = e.into_inner();
    // "." is the whole document; "?" marks a place serde_path_to_error could not follow.
    let mut key = if path == "." || path.contains('?') {
        String::new()
    } else {
        path
    };
    if inner.classify() != serde_json::error::Category::Data {
        return (key, format!("invalid JSON: {inner}"));
    }
    let mut message = inner.to_string();
    if let Some(rest) = message.strip_prefix("unknown field ") {
        message = format!("unknown key {rest}");
    } else if let Some(rest) = message.strip_prefix("duplicate field `") {
        // serde reports a duplicate at the enclosing object; name the key itself.
        if let Some(name) = rest.split('`').next() {
            key = if key.is_empty() {
                name.to_owned()
            } else {
                format!("{key}.{name}")
            };
        }
        message = format!("duplicate key `{rest}");
    }
    (key, message)
}

/// The whole file: a JSON object, never an array.
struct TopLevel(Config);

impl<'de> Deserialize<'de> for TopLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        object(d).map(TopLevel)
    }
}

/// Deserializes a struct from a JSON object only. Derived struct impls also take an array
/// (fields by position), which in a configuration file is a mistake, not a feature.
fn object<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct ObjectVisitor<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(MapAccessDeserializer::new(map))
        }
    }

    d.deserialize_map(ObjectVisitor(PhantomData))
}

// ---------------------------------------------------------------------------------------------

pub mod explain;
#[cfg(test)]
mod tests;
