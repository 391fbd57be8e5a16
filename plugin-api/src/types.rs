//! Plain data that crosses the plugin boundary.

use abi_stable::{
    std_types::{RString, RVec},
    StableAbi,
};

#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    Subsystem,
    Medium,
}

impl PluginKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Subsystem => "subsystem",
            PluginKind::Medium => "medium",
        }
    }
}

/// What a call to `checkpoint` or `restart` achieved.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Nothing left to do for this event.
    Done,
    /// Some work was done; call again.
    More,
}

/// What `fault` decided about an entity in error.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// The entity was repaired: repeat the step.
    Retry,
    /// The entity can be left out without harm.
    Skip,
    /// Nothing to be done: the event fails.
    GiveUp,
}

#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Checkpoint,
    Restart,
}

/// Progress of an event as a subsystem sees it.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Status {
    pub entities_done: u64,
    pub entities_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// What a subsystem handles and needs (paper section 3.1.1).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Default, PartialEq, Eq)]
pub struct SubsystemInfo {
    /// The entity kinds it checkpoints: "page", "thread", "fd", …
    pub entity_kinds: RVec<RString>,
    /// Subsystem plugins that must run before it on checkpoint (after it on resume).
    pub after: RVec<RString>,
    /// Kinds of shared resources it may claim.
    pub shared_resources: RVec<RString>,
}

/// A range of target memory.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRange {
    pub addr: u64,
    pub len: u64,
}

/// The answer to a claim of a shared resource.
#[repr(C, u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedClaim {
    /// The caller is the first: it checkpoints the resource.
    First,
    /// The process with this pid claimed it already: refer to its copy.
    Taken(i32),
}

/// How a record's payload is encoded.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordFormat {
    /// A JSON document (metadata), shown by `ferry show`.
    Json,
    /// Raw bytes (pages, file contents).
    Raw,
}

/// One record of a subsystem, as written by its checkpoint.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: RString,
    pub format: RecordFormat,
    pub payload: RVec<u8>,
}

/// A thread's rseq registration.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RseqConfig {
    pub addr: u64,
    pub len: u32,
    pub flags: u32,
    pub signature: u32,
}

/// One seccomp filter of a thread (`PTRACE_SECCOMP_GET_FILTER`).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Default, PartialEq, Eq)]
pub struct SeccompFilter {
    /// Its classic BPF program: 8-byte `struct sock_filter`s, as the kernel keeps them.
    pub program: RVec<u8>,
    /// The `SECCOMP_FILTER_FLAG_*` the kernel reports of it
    /// (`PTRACE_SECCOMP_GET_METADATA`: only `LOG`).
    pub flags: u64,
}

/// The six arguments of an injected system call.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyscallArgs(pub [u64; 6]);

impl std::fmt::Display for RecordFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecordFormat::Json => "json",
            RecordFormat::Raw => "raw",
        })
    }
}
