//! The migration algorithms and their mechanisms.

pub mod postcopy;
pub mod precopy;
pub mod throttle;
