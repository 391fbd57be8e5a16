//! ferry's core system control layer and user-space interface (docs/ARCHITECTURE.md, "Layers and folders").
//! The `ferry` binary is a thin shell over this library.
//!
//! The folders are the layers; a module imports only from the layers below its own
//! (`tests/layers.rs` keeps it so):
//!
//! | layer | what it holds |
//! |---|---|
//! | [`commands`] | the top floor: checkpoint, restore, migrate (source), serve (destination), daemon, control socket — the only place that composes the others |
//! | [`strategies`] | the migration algorithms (stop-copy, pre-copy, post-copy, hybrid) behind one small interface, and their mechanisms: pre-copy rounds, the post-copy pager, the throttle |
//! | [`engine`] | what every event shares: the plugin manager, loaded subsystems and their order, the worker loop, the process context, the pipeline, the watchdog, dumping a frozen process and rebuilding one |
//! | [`kernel`], [`wire`], [`image`] | what talks to the kernel about the target (tracer, freezer, userfaultfd, dirty tracking, `clone3`, the feature probes); what crosses the network (handshake, authentication, framing, messages); the image format |
//! | [`config`], [`trace`], [`fault`], [`random`], [`trust`] | leaves every layer may use: the configuration, the phase timeline, the test kill points, random bytes and event tokens, what ferry trusts on disk |

pub mod config;
pub mod fault;
pub mod random;
pub mod trace;
pub mod trust;

pub mod image;
pub mod kernel;
pub mod wire;

pub mod engine;

pub mod strategies;

pub mod commands;
