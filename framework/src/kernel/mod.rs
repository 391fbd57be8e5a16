//! What talks to the kernel about the target process: the tracer (seize, inject,
//! read and write memory), the cgroup freezer, userfaultfd and `PAGEMAP_SCAN`
//! definitions, dirty-page tracking, `clone3`, and the feature probes behind
//! `ferry check`, and the tree of a process (found, frozen, checked for what its
//! processes share). Nothing here knows about plugins, images or the network.

pub(crate) mod clone;
pub mod dirty;
pub mod error;
pub mod freezer;
pub mod guardian;
pub(crate) mod mounts;
pub mod target;
pub mod probes;
pub mod tracer;
pub mod tree;
pub(crate) mod uffd;
