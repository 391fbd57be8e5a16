//! What crosses the network between a migration's source and its destination daemon:
//! authentication, the handshake, message framing, and the JSON messages exchanged on
//! the medium once the handshake is done.

pub mod messages;
pub mod protocol;
