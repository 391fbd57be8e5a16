//! The plugin manager (docs/ARCHITECTURE.md, "Loading and the manager"): finds plugin files,
//! checks them before running any of their code that matters, registers and
//! unregisters them on the fly, and counts the events using each one.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use abi_stable::library::lib_header_from_path;
use ferry_plugin_api::{
    MediumBox, PluginKind, PluginModRef, SubsystemBox, SubsystemInfo, ABI_SYMBOL, ABI_VERSION,
};
use serde::{Deserialize, Serialize};

/// Where plugins are looked for when neither the command line nor the config names a
/// directory and none sits beside the `ferry` binary.
pub const SYSTEM_PLUGIN_DIR: &str = "/usr/lib/ferry/plugins";

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{path}: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error("plugin {name} is already registered from {existing}")]
    Duplicate { name: String, existing: PathBuf },
    #[error("no {kind} plugin named {name} is registered{why}")]
    Unknown { kind: &'static str, name: String, why: String },
    #[error("plugin {name} is busy: {users} event(s) still use it")]
    Busy { name: String, users: usize },
    #[error("plugin {name}: {message}")]
    Plugin { name: String, message: String },
    #[error("cannot read plugin directory {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
}

impl ManagerError {
    fn refused(path: &Path, reason: impl Into<String>) -> Self {
        ManagerError::Refused { path: path.to_path_buf(), reason: reason.into() }
    }
}

/// What the manager knows of a plugin file, registered or not.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PluginMeta {
    pub name: String,
    /// "subsystem" or "medium".
    pub kind: String,
    pub version: String,
    pub description: String,
    pub path: PathBuf,
}

/// A plugin file that was checked and can be registered.
#[derive(Clone, Copy)]
struct Loaded {
    module: PluginModRef,
}

struct Entry {
    meta: PluginMeta,
    loaded: Loaded,
    users: usize,
    /// Set while an unregister waits for the users to leave: no new leases meanwhile.
    leaving: bool,
}

#[derive(Default)]
struct Registry {
    plugins: BTreeMap<String, Entry>,
    /// Files `discover` refused, with why: the likely reason a name is missing.
    refused: Vec<(PathBuf, String)>,
}

/// The registry of subsystem and medium plugins. Plugin names are unique across both
/// kinds, so a request can name a plugin without saying its kind.
#[derive(Default, Clone)]
pub struct Manager {
    shared: Arc<(Mutex<Registry>, Condvar)>,
}

/// Picks the plugin directory: the command line, then the config file, then the
/// directory beside the `ferry` binary when it holds plugins, then the system one.
pub fn plugin_dir(cli: Option<&Path>, config: Option<&Path>) -> PathBuf {
    if let Some(dir) = cli.or(config) {
        return dir.to_path_buf();
    }
    if let Some(beside) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        if candidates(&beside).map(|c| !c.is_empty()).unwrap_or(false) {
            return beside;
        }
    }
    PathBuf::from(SYSTEM_PLUGIN_DIR)
}

/// The `.so` files of a directory, sorted so discovery is deterministic.
fn candidates(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "so") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// Loading a `.so` runs its code as root: only files that nobody but root could have
/// put there are accepted.
fn check_ownership(path: &Path) -> Result<(), ManagerError> {
    let meta = std::fs::metadata(path).map_err(|e| ManagerError::refused(path, e.to_string()))?;
    if !meta.is_file() {
        return Err(ManagerError::refused(path, "not a regular file"));
    }
    match crate::trust::changeable_by_others(path) {
        Some(why) => Err(ManagerError::refused(path, format!("{why}: refusing to run its code"))),
        None => Ok(()),
    }
}

/// Checks that `path` is a ferry plugin of our ABI and reads its root module.
fn load(path: &Path) -> Result<(PluginMeta, Loaded), ManagerError> {
    check_ownership(path)?;
    // SAFETY: loading a library runs its initialisers; the file passed the ownership
    // check above, the trust boundary for plugins
    // (docs/ARCHITECTURE.md, "Security").
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| ManagerError::refused(path, format!("not a loadable shared library: {e}")))?;
    // SAFETY: the symbol is only called if present, with the signature every ferry
    // plugin exports through `export_subsystem!`/`export_medium!`.
    let abi = unsafe { lib.get::<extern "C" fn() -> u32>(ABI_SYMBOL) }
        .map(|f| f())
        .map_err(|_| ManagerError::refused(path, "not a ferry plugin (no ferry_plugin_abi_version symbol)"))?;
    // Libraries are never unloaded: Rust cdylibs with thread-locals are unsafe to dlclose.
    std::mem::forget(lib);
    if abi != ABI_VERSION {
        return Err(ManagerError::refused(
            path,
            format!("built against ferry plugin ABI {abi}, this ferry uses ABI {ABI_VERSION}"),
        ));
    }
    let module = lib_header_from_path(path)
        .and_then(|h| h.init_root_module::<PluginModRef>())
        .map_err(|e| {
            // abi_stable's report is a multi-page type diff; its first words say which check failed.
            let kind = match e {
                abi_stable::library::LibraryError::AbiInstability(_) => "its types differ from this ferry's",
                abi_stable::library::LibraryError::IncompatibleVersionNumber { .. } => "its plugin-api version is incompatible",
                _ => "its root module cannot be read",
            };
            ManagerError::refused(
                path,
                format!("incompatible plugin ABI layout: {kind} (ABI {ABI_VERSION}); rebuild it against this ferry"),
            )
        })?;
    let kind = module.kind();
    let meta = PluginMeta {
        name: module.name().as_str().to_string(),
        kind: kind.as_str().to_string(),
        version: module.version().as_str().to_string(),
        description: module.description().as_str().to_string(),
        path: path.to_path_buf(),
    };
    if meta.name.is_empty() || !meta.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(ManagerError::refused(path, format!("invalid plugin name {:?}", meta.name)));
    }
    Ok((meta, Loaded { module }))
}

/// Checks a plugin file without registering it anywhere.
pub fn validate(path: &Path) -> Result<PluginMeta, ManagerError> {
    load(path).map(|(meta, _)| meta)
}

/// The outcome of discovering one file.
#[derive(Debug, Clone)]
pub struct Found {
    /// What the plugin says of itself, when it got that far.
    pub meta: Option<PluginMeta>,
    pub path: PathBuf,
    pub status: String,
}

impl Manager {
    pub fn new() -> Self {
        Manager::default()
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // A poisoned lock only means another thread panicked mid-update of plain maps.
        self.shared.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks and registers the plugin at `path`.
    pub fn register(&self, path: &Path) -> Result<PluginMeta, ManagerError> {
        let path = std::fs::canonicalize(path).map_err(|e| ManagerError::refused(path, e.to_string()))?;
        let (meta, loaded) = load(&path)?;
        let mut reg = self.registry();
        if let Some(existing) = reg.plugins.get(&meta.name) {
            return Err(ManagerError::Duplicate { name: meta.name, existing: existing.meta.path.clone() });
        }
        reg.plugins.insert(meta.name.clone(), Entry { meta: meta.clone(), loaded, users: 0, leaving: false });
        Ok(meta)
    }

    /// Why registered medium `meta` cannot work on this machine, if it says so: asked
    /// `open_medium({"probe":true})`, a medium that cannot answers an error starting
    /// `unavailable: ` (any other answer: it has nothing to say against itself).
    pub fn unavailable(&self, meta: &PluginMeta) -> Option<String> {
        self.medium_probe(meta)?.err()
    }

    /// A medium's own account of what it finds here, when it gives one: `Ok` after
    /// `available: `, `Err` after `unavailable: ` (`ferry check` prints both).
    pub fn medium_probe(&self, meta: &PluginMeta) -> Option<Result<String, String>> {
        if meta.kind != PluginKind::Medium.as_str() {
            return None;
        }
        let module = self.registry().plugins.get(&meta.name)?.loaded.module;
        let word = match (module.open_medium())(r#"{"probe":true}"#.into()).into_result() {
            Err(e) => e.message.into_string(),
            Ok(_) => return None,
        };
        match (word.strip_prefix("available: "), word.strip_prefix("unavailable: ")) {
            (Some(ok), _) => Some(Ok(ok.to_string())),
            (_, Some(why)) => Some(Err(why.to_string())),
            _ => None,
        }
    }

    /// Registers every plugin of `dir`; answers what happened to each file.
    pub fn discover(&self, dir: &Path) -> Result<Vec<Found>, ManagerError> {
        let files = candidates(dir).map_err(|source| ManagerError::Dir { path: dir.to_path_buf(), source })?;
        Ok(files
            .into_iter()
            .map(|path| match self.register(&path) {
                Ok(meta) => Found { path: meta.path.clone(), meta: Some(meta), status: "registered".into() },
                Err(e) => {
                    let reason = match &e {
                        ManagerError::Refused { reason, .. } => reason.clone(),
                        other => other.to_string(),
                    };
                    self.registry().refused.push((path.clone(), reason.clone()));
                    Found { meta: None, path, status: format!("refused: {reason}") }
                }
            })
            .collect())
    }

    /// Unregisters `name`, waiting up to `wait` for the events using it to end. The
    /// library stays mapped (abi_stable never unloads); its objects are gone.
    pub fn unregister(&self, name: &str, wait: Duration) -> Result<PluginMeta, ManagerError> {
        let deadline = Instant::now() + wait;
        let (_, cond) = &*self.shared;
        let mut reg = self.registry();
        match reg.plugins.get_mut(name) {
            None => return Err(ManagerError::Unknown { kind: "ferry", name: name.into(), why: String::new() }),
            Some(e) => e.leaving = true,
        }
        loop {
            let users = reg.plugins.get(name).map_or(0, |e| e.users);
            if users == 0 {
                let entry = reg.plugins.remove(name);
                return entry.map(|e| e.meta).ok_or(ManagerError::Unknown { kind: "ferry", name: name.into(), why: String::new() });
            }
            let now = Instant::now();
            if now >= deadline {
                if let Some(e) = reg.plugins.get_mut(name) {
                    e.leaving = false;
                }
                return Err(ManagerError::Busy { name: name.into(), users });
            }
            reg = cond.wait_timeout(reg, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Every registered plugin, by name.
    pub fn list(&self) -> Vec<PluginMeta> {
        self.registry().plugins.values().map(|e| e.meta.clone()).collect()
    }

    pub fn get(&self, name: &str) -> Option<PluginMeta> {
        self.registry().plugins.get(name).map(|e| e.meta.clone())
    }

    /// Takes a lease on plugin `name` of `kind` for the length of an event.
    pub fn acquire(&self, kind: PluginKind, name: &str) -> Result<Lease, ManagerError> {
        let mut reg = self.registry();
        let why = missing_because(&reg.refused, name);
        let unknown = || ManagerError::Unknown { kind: kind.as_str(), name: name.into(), why: why.clone() };
        let entry = reg.plugins.get_mut(name).ok_or_else(unknown)?;
        if entry.meta.kind != kind.as_str() || entry.leaving {
            return Err(unknown());
        }
        entry.users += 1;
        Ok(Lease { manager: self.clone(), meta: entry.meta.clone(), loaded: entry.loaded })
    }
}

/// Why plugin `name` may be missing: the refused file that looks like it (named
/// `…<name>.so`), else how many were refused.
fn missing_because(refused: &[(PathBuf, String)], name: &str) -> String {
    let stem = |p: &Path| p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some((path, why)) = refused.iter().find(|(p, _)| stem(p).ends_with(name)) {
        return format!(" ({} was refused: {why})", path.display());
    }
    match refused.len() {
        0 => String::new(),
        n => format!(" ({n} plugin file(s) were refused: see `ferry plugins list`)"),
    }
}

/// A plugin in use by an event. While a lease lives, the plugin cannot be unregistered.
pub struct Lease {
    manager: Manager,
    meta: PluginMeta,
    loaded: Loaded,
}

impl Lease {
    pub fn meta(&self) -> &PluginMeta {
        &self.meta
    }

    /// A fresh subsystem instance (one per process per event).
    pub fn new_subsystem(&self) -> Result<SubsystemBox, ManagerError> {
        (self.loaded.module.new_subsystem())()
            .into_result()
            .map_err(|e| ManagerError::Plugin { name: self.meta.name.clone(), message: e.message.into() })
    }

    /// Opens the medium with JSON parameters.
    pub fn open_medium(&self, params: &serde_json::Value) -> Result<MediumBox, ManagerError> {
        let text = params.to_string();
        (self.loaded.module.open_medium())(text.as_str().into())
            .into_result()
            .map_err(|e| ManagerError::Plugin { name: self.meta.name.clone(), message: e.message.into() })
    }

    /// The subsystem's `info`, asked of a throwaway instance.
    pub fn subsystem_info(&self) -> Result<SubsystemInfo, ManagerError> {
        Ok(self.new_subsystem()?.info())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut reg = self.manager.registry();
        if let Some(e) = reg.plugins.get_mut(&self.meta.name) {
            e.users = e.users.saturating_sub(1);
        }
        drop(reg);
        self.manager.shared.1.notify_all();
    }
}
