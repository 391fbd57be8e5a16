//! ferry's core system control layer and user-space interface (DESIGN.md, "Layers").
//! The `ferry` binary is a thin shell over this library.

pub mod check;
pub mod config;
pub mod control;
pub mod daemon;
pub mod image;
pub mod manager;
pub mod tracer;
