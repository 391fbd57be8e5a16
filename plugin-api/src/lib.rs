//! The stable plugin ABI of ferry (docs/ARCHITECTURE.md, "The plugin ABI").
//!
//! Every plugin `.so` exports one root module ([`PluginMod`], a prefix type so fields
//! can be appended without breaking older plugins) and the plain C symbol
//! [`ABI_SYMBOL`], which the manager reads before trusting anything else in the file.
//! Plugins implement the plain Rust traits of [`plugin`] and export them with
//! [`export_subsystem!`] or [`export_medium!`]; the adapters there catch panics so
//! that none crosses the boundary.

#![allow(non_local_definitions)] // abi_stable's derive macros emit impls in a const block

pub mod pagemap;
pub mod plugin;
pub mod ranges;
pub mod testing;
pub mod types;
pub mod util;

pub use abi_stable;
pub use types::*;

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RBox, RResult, RSlice, RSliceMut, RStr, RString, RVec},
    StableAbi,
};

/// The version of the contract between ferry and its plugins. Bump it whenever a type
/// of this crate changes in a way an older plugin would misread; the manager refuses a
/// plugin built against another value, naming both.
pub const ABI_VERSION: u32 = 2;

/// Name of the `extern "C" fn() -> u32` every plugin exports, returning the
/// [`ABI_VERSION`] it was built against. Read with a plain `dlsym` before abi_stable
/// looks at the file, so that a mismatch is reported as such rather than as a layout
/// error deep inside a type.
pub const ABI_SYMBOL: &[u8] = b"ferry_plugin_abi_version";

/// The errors that cross the plugin boundary: which plugin, and what went wrong.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    pub plugin: RString,
    pub message: RString,
}

impl PluginError {
    pub fn new(plugin: &str, message: impl std::fmt::Display) -> Self {
        PluginError { plugin: plugin.into(), message: message.to_string().into() }
    }
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "plugin {}: {}", self.plugin, self.message)
    }
}

impl std::error::Error for PluginError {}

pub type PResult<T> = RResult<T, PluginError>;

/// The services the framework offers a subsystem plugin for one process of one event.
/// Plugins never call ptrace themselves: everything that touches the target goes
/// through here, which is what lets execution contexts be swapped. A context need not
/// offer every service (a pre-copy round's does not stop the process; a unit test's
/// mock offers what its plugin uses): the others answer an error saying so.
#[sabi_trait]
pub trait ProcessContext {
    /// The process the event is about (its pid in the image on restart).
    fn pid(&self) -> i32;
    /// Every thread of the process, the main thread first.
    fn tids(&self) -> RVec<i32>;
    /// Reads target memory at `addr` into `buf`; answers how many bytes were read.
    fn read_memory(&mut self, addr: u64, buf: RSliceMut<'_, u8>) -> PResult<usize>;
    /// Reads many ranges in one go (vectored); `buf` is filled range after range.
    fn read_memory_ranges(&mut self, ranges: RSlice<'_, MemRange>, buf: RSliceMut<'_, u8>)
        -> PResult<usize> {
        let _ = (ranges, buf);
        RResult::RErr(PluginError::new("ferry", "vectored reading is not offered by this context"))
    }
    /// Writes `data` into target memory at `addr`.
    fn write_memory(&mut self, addr: u64, data: RSlice<'_, u8>) -> PResult<usize>;
    /// Writes `data` into many ranges in one go (vectored), range after range.
    fn write_memory_ranges(&mut self, ranges: RSlice<'_, MemRange>, data: RSlice<'_, u8>) -> PResult<usize> {
        let _ = (ranges, data);
        RResult::RErr(PluginError::new("ferry", "vectored writing is not offered by this context"))
    }
    /// A read/write area of the target that the framework maps for the event, where a
    /// plugin may place system-call arguments (paths, structs) during its call.
    fn scratch(&self) -> MemRange;
    /// A duplicate, in ferry, of the target's file descriptor `fd` (`pidfd_getfd`);
    /// the caller owns and closes it.
    fn fetch_fd(&mut self, fd: i32) -> PResult<i32> {
        let _ = fd;
        RResult::RErr(PluginError::new("ferry", "fetching a file descriptor is not offered by this context"))
    }
    /// Runs system call `nr` with `args` in stopped thread `tid`; answers its return value
    /// (a negative errno on failure, as the kernel gives it).
    fn inject_syscall(&mut self, tid: i32, nr: i64, args: SyscallArgs) -> PResult<i64>;
    /// Reads register set `regset` (an `NT_*` note type) of thread `tid`.
    fn get_regset(&mut self, tid: i32, regset: u32) -> PResult<RVec<u8>> {
        let _ = (tid, regset);
        RResult::RErr(PluginError::new("ferry", "reading registers is not offered by this context"))
    }
    /// Writes register set `regset` of thread `tid`.
    fn set_regset(&mut self, tid: i32, regset: u32, data: RSlice<'_, u8>) -> PResult<()> {
        let _ = (tid, regset, data);
        RResult::RErr(PluginError::new("ferry", "writing registers is not offered by this context"))
    }
    /// Reads `/proc/<pid>/<name>` of the target (for example `maps` or `task/12/stat`).
    fn proc_read(&mut self, name: RStr<'_>) -> PResult<RVec<u8>> {
        let _ = name;
        RResult::RErr(PluginError::new("ferry", "reading /proc is not offered by this context"))
    }
    /// Claims a shared resource (a pipe inode, a shared mapping): the first process of
    /// the event to claim it checkpoints it, the others refer to it.
    fn claim_shared(&mut self, kind: RStr<'_>, id: RStr<'_>) -> SharedClaim {
        let _ = (kind, id);
        SharedClaim::First
    }
    /// Sends a command to this plugin's peer on the other machine through the medium.
    fn peer_command(&mut self, cmd: RSlice<'_, u8>) -> PResult<RVec<u8>> {
        let _ = cmd;
        RResult::RErr(PluginError::new("ferry", "a command to the peer is not offered by this context"))
    }
    /// The rseq registration of thread `tid` (`PTRACE_GET_RSEQ_CONFIGURATION`).
    fn rseq_config(&mut self, tid: i32) -> PResult<RseqConfig> {
        let _ = tid;
        RResult::RErr(PluginError::new("ferry", "reading rseq is not offered by this context"))
    }
    /// The pending signals of thread `tid` (`shared`: the process-wide queue) as
    /// 128-byte `siginfo_t` records, read without dequeuing them.
    fn peek_siginfo(&mut self, tid: i32, shared: bool) -> PResult<RVec<u8>> {
        let _ = (tid, shared);
        RResult::RErr(PluginError::new("ferry", "reading pending signals is not offered by this context"))
    }
    /// Pre-copy: starts tracking writes to `ranges` (whole private anonymous
    /// mappings); every page counts as clean from here. Answers the ranges now
    /// tracked: a mapping the process registered with a userfaultfd of its own cannot
    /// be, and is left out.
    fn dirty_track(&mut self, ranges: RSlice<'_, MemRange>) -> PResult<RVec<MemRange>> {
        let _ = ranges;
        RResult::RErr(PluginError::new("ferry", "this event tracks no dirty pages"))
    }
    /// Pre-copy: the pages of tracked `range` written since it was tracked or last
    /// scanned, as runs; they count as clean again. An error means the range is no
    /// longer tracked as a whole (the process replaced its mapping): treat every page
    /// of it as changed, and track it again.
    fn dirty_scan(&mut self, range: MemRange) -> PResult<RVec<MemRange>> {
        let _ = range;
        RResult::RErr(PluginError::new("ferry", "this event tracks no dirty pages"))
    }
    /// Post-copy, source: whether private anonymous memory moves after the process
    /// resumes on the destination. The memory plugin then lists it (with its layout)
    /// instead of sending it, and the framework serves it from the frozen process.
    fn lazy(&self) -> bool {
        false
    }
    /// Post-copy, destination: `areas` (mapped, empty) are filled on demand after the
    /// process resumes: `present` of them from the source (as far as the source has
    /// those pages: a range may be a whole area, whose pages the framework then looks
    /// up in the frozen process after the resume), the rest with zeros.
    #[sabi(last_prefix_field)]
    fn lazy_pages(&mut self, areas: RSlice<'_, MemRange>, present: RSlice<'_, MemRange>) -> PResult<()> {
        let _ = (areas, present);
        RResult::RErr(PluginError::new("ferry", "this event moves no memory after resume"))
    }
    /// Thread `tid`'s seccomp filters, the first installed first, read while ferry holds
    /// them suspended for the stopped process (`PTRACE_O_SUSPEND_SECCOMP`): none of
    /// ferry's injected calls meets them, and the ones a plugin installs by an injected
    /// `seccomp` take effect when ferry lets the process go. An error when ferry could
    /// not suspend them: its later injected calls would meet them. (After the prefix:
    /// a host without it answers the default.)
    fn seccomp_filters(&mut self, tid: i32) -> PResult<RVec<SeccompFilter>> {
        let _ = tid;
        RResult::RErr(PluginError::new("ferry", "reading seccomp filters is not offered by this context"))
    }
    /// File descriptors the framework holds in the process for the event (the internal
    /// context's agent's socket): not the process's state, never checkpointed. (After
    /// the prefix: a host without it answers none.)
    fn own_fds(&self) -> RVec<i32> {
        RVec::new()
    }
    /// The request's option `key` for plugin `plugin` (the request's
    /// `mechanism.plugin_params.<plugin>.<key>`, which a migration carries to the
    /// destination; `ferry restore --tcp-close` is `files.tcp_close = "1"`), if it has
    /// one. (After the prefix: a host without it answers none.)
    fn plugin_param(&self, plugin: RStr<'_>, key: RStr<'_>) -> abi_stable::std_types::ROption<RString> {
        let _ = (plugin, key);
        abi_stable::std_types::ROption::RNone
    }
}

/// Where a subsystem's checkpoint writes its records; the framework frames each one
/// (kind, length, checksum) and hands it to the medium.
#[sabi_trait]
pub trait RecordSink {
    #[sabi(last_prefix_field)]
    fn put(&mut self, kind: RStr<'_>, format: RecordFormat, payload: RSlice<'_, u8>) -> PResult<()>;
}

/// Where a subsystem's restart reads its records, checked and in the order written.
#[sabi_trait]
pub trait RecordSource {
    /// The next record of this subsystem, or `None` when there are no more.
    #[sabi(last_prefix_field)]
    fn next(&mut self) -> PResult<abi_stable::std_types::ROption<Record>>;
}

pub type ContextRef<'a> = ProcessContext_TO<'a, abi_stable::sabi_types::RMut<'a, ()>>;
pub type SinkRef<'a> = RecordSink_TO<'a, abi_stable::sabi_types::RMut<'a, ()>>;
pub type SourceRef<'a> = RecordSource_TO<'a, abi_stable::sabi_types::RMut<'a, ()>>;

/// A kind of process state (paper table 1, plus table 3's per-process hooks).
#[sabi_trait]
pub trait Subsystem: Send {
    /// Entity kinds, ordering constraints and shared resources.
    fn info(&self) -> SubsystemInfo;
    /// Process hook `setup`: prepare the process before the event's work starts.
    fn setup(&mut self, ctx: &mut ContextRef<'_>, event: EventKind) -> PResult<()>;
    /// Pre-copy round `round` while the process runs (0: what can be sent early;
    /// later: what changed since the last round); called until it answers `Done`.
    /// The process is not stopped: only its memory, its `/proc` files and dirty
    /// tracking are at hand. `checkpoint` follows at the freeze, on the same
    /// instance, and sends the rest.
    fn precopy(&mut self, ctx: &mut ContextRef<'_>, sink: &mut SinkRef<'_>, round: u32) -> PResult<Progress>;
    /// Takes a bounded step of the checkpoint; called until it answers `Done`.
    fn checkpoint(&mut self, ctx: &mut ContextRef<'_>, sink: &mut SinkRef<'_>) -> PResult<Progress>;
    /// Takes a bounded step of the restart; called until it answers `Done`.
    fn restart(&mut self, ctx: &mut ContextRef<'_>, source: &mut SourceRef<'_>) -> PResult<Progress>;
    /// Process hook `restart`: the process is rebuilt and about to run again.
    fn resume(&mut self, ctx: &mut ContextRef<'_>) -> PResult<()>;
    /// Process hook `cleanup`: always runs at the end of the event, `ok` or not.
    fn cleanup(&mut self, ctx: &mut ContextRef<'_>, ok: bool);
    /// Tries to bring an entity back from `error`.
    fn fault(&mut self, ctx: &mut ContextRef<'_>, error: &PluginError) -> Recovery;
    /// Progress of the current event, for progress bars and the watchdog.
    fn status(&self) -> Status;
    /// The plugin's own account of a fatal error.
    #[sabi(last_prefix_field)]
    fn dump(&self, error: &PluginError) -> RString;
}

/// A way of carrying state (paper table 2). Streams are numbered; stream 0 is the
/// control stream of an event.
#[sabi_trait]
pub trait Medium: Send {
    /// Stores `data` at the end of `stream`.
    fn pushdata(&mut self, stream: u32, data: RSlice<'_, u8>) -> PResult<()>;
    /// Fills `buf` from `stream`; answers the bytes read, 0 at the end of the stream.
    fn popdata(&mut self, stream: u32, buf: RSliceMut<'_, u8>) -> PResult<usize>;
    /// A medium-dependent command (JSON in, JSON out): buffer size, acknowledgements,
    /// messages to a peer plugin.
    fn command(&mut self, cmd: RStr<'_>) -> PResult<RString>;
    /// Makes everything pushed so far durable (file) or delivered (network).
    #[sabi(last_prefix_field)]
    fn flush(&mut self) -> PResult<()>;
}

pub type SubsystemBox = Subsystem_TO<'static, RBox<()>>;
pub type MediumBox = Medium_TO<'static, RBox<()>>;

/// The root module of a plugin library.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// The [`ABI_VERSION`] the plugin was built against (also in [`ABI_SYMBOL`]).
    pub abi_version: u32,
    pub kind: PluginKind,
    pub name: RStr<'static>,
    pub version: RStr<'static>,
    pub description: RStr<'static>,
    /// Makes a subsystem instance (subsystem plugins); a fresh one per process per event.
    pub new_subsystem: extern "C" fn() -> PResult<SubsystemBox>,
    /// Opens a medium with JSON parameters (medium plugins), for example
    /// `{"role":"write","dir":"/var/lib/ferry/img"}`. Asked `{"probe":true}`, a medium
    /// that depends on something of the machine answers an error `unavailable: <why>`
    /// or `available: <what it found>` (`plugins list`, `ferry check`); any other
    /// answer means it has nothing to say.
    #[sabi(last_prefix_field)]
    pub open_medium: extern "C" fn(params: RStr<'_>) -> PResult<MediumBox>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "ferry_plugin";
    const NAME: &'static str = "ferry_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
