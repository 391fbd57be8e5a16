//! The top floor: each request a user or a peer can make, composed from the layers
//! below.

pub mod checkpoint;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod doorway;
pub mod janitor;
pub mod manual;
pub mod migrate;
pub mod restore;
pub mod serve;
