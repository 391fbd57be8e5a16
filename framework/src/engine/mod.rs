//! What every event shares: the plugin manager, the subsystems of a request loaded
//! and ordered, the worker loop that drives a plugin, the process context plugins work
//! through, the pipeline to the medium, the watchdog, dumping a frozen process and
//! rebuilding one, and the same for a process tree.

pub mod context;
pub mod coverage;
pub mod dump;
pub mod event;
pub mod manager;
pub mod params;
pub mod pipeline;
pub mod rebuild;
pub mod tree;
pub mod watchdog;
pub mod workers;
