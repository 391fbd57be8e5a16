//! ferry's core system control layer and user-space interface (DESIGN.md, "Layers").
//! The `ferry` binary is a thin shell over this library.

pub mod check;
pub mod checkpoint;
pub mod config;
pub mod context;
pub mod control;
pub mod daemon;
pub mod dirty;
pub mod event;
pub mod fault;
pub mod image;
pub mod manager;
pub mod migrate;
pub mod pipeline;
pub mod postcopy;
pub mod precopy;
pub mod protocol;
pub mod quiesce;
pub mod restore;
pub mod throttle;
pub mod trace;
pub mod tracer;
pub(crate) mod uffd;
pub mod watchdog;
