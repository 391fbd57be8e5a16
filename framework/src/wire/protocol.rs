//! The handshake between `ferry migrate` (the client, on the source machine) and
//! `ferry daemon` (the server, on the destination), run on a freshly connected TCP
//! socket before anything is frozen; and the verdict messages both sides exchange after
//! the transfer (docs/ARCHITECTURE.md, "The wire protocol" and "Security").
//!
//! # Framing
//!
//! Every message is a `u32` little-endian length, at most [`MAX_MESSAGE`] (1 MiB),
//! followed by that many bytes of JSON: an object whose `"type"` field names the
//! message. [`recv`] reads the length, then exactly that many bytes and nothing more:
//! when the handshake is over, the same socket is handed to the TCP medium plugin, and
//! every byte after the last handshake message belongs to it.
//!
//! # Sequence
//!
//! ```text
//!   client (source, `ferry migrate`)              server (destination, `ferry daemon`)
//!
//!   -- authentication, only when a key is configured ------------------------------
//!   auth_hello     { client_nonce }          ->
//!                                            <-  auth_challenge { server_nonce,
//!                                                  server_proof = HMAC(key, "ferry-server"
//!                                                     || client_nonce || server_nonce) }
//!   (checks server_proof)
//!   auth_proof     { client_proof = HMAC(key, "ferry-client"
//!                      || server_nonce || client_nonce) } ->
//!                                                (checks client_proof)
//!                                            <-  auth_ok
//!   -- handshake -------------------------------------------------------------------
//!   hello          { protocol, arch, page_size, token, request_id, pid, strategy,
//!                    medium, subsystems, features }  ->
//!                                                (check_hello: versions, plugins,
//!                                                 page size, kernel features)
//!                                            <-  welcome { protocol, token, request_id }
//!                                            or  refused { reason }  (and close)
//!   -- then, through the TCP medium plugin (not this module) ------------------------
//!                                                (makes a blank restore child)
//!                                            <-  ready, or failed { reason }
//!   (only now touches the process)
//!   plan { process, plugins }                ->
//!   or tree-plan { inventory } (a process with children: every process with its
//!      parent, streams, group and shared fds; the plugins' counts still 0; post-copy's
//!      want/present requests then name their process: { pid }) ->
//!   the subsystems' streams (pushdata)       ->
//!   flush                                    ->
//!                                                (rebuilds the process, held stopped)
//!                                            <-  Verdict::Rebuilt { pids, restore_ms }
//!                                            or  Verdict::Failed { reason }
//!   ** stop-copy, pre-copy: commit point: the source receives Rebuilt; before it the
//!   ** source process is resumed on any failure, after it the destination's copy is
//!   ** the live one
//!   Verdict::Commit                          ->  (releases the rebuilt process)
//!   or Verdict::Abort { reason }             ->  (kills the rebuilt process)
//!                                            <-  Verdict::Released
//!   ** post-copy, hybrid: the copy is held stopped until the source has given up its
//!   ** own, so that the source always knows of a run before it can happen
//!   Verdict::Commit                          ->
//!                                            <-  Verdict::Ready (still held stopped)
//!   ** commit point: the source receives Ready; before it the source process is
//!   ** resumed on any failure, from it on the source never runs again (the copy may
//!   ** have run: a failure loses the process, it is never repeated)
//!   Verdict::Run                             ->  (runs the copy, traced)
//!   or Verdict::Abort { reason }             ->  (kills the copy, which never ran)
//!                                            <-  Verdict::Released, pages, lazy-done
//! ```
//!
//! Nonces and proofs are 32 bytes, written as 64 lowercase hex characters. Every
//! refusal is a `refused { reason }` message whose reason is one line a user can act on;
//! the side that refuses returns an error too, so both ends report something clear in
//! every combination of keys: right key, wrong key, key on one side only, no keys.
//!
//! # Versions
//!
//! The protocol version travels in `hello`. The server accepts
//! [`PROTOCOL_MIN`]`..=`[`PROTOCOL_VERSION`] and answers with the version it will use
//! (the client's); a newer client is refused with a line naming both versions, even when
//! its `hello` no longer parses as ours. The authentication messages are version-free
//! and must never change.
//!
//! # Limits
//!
//! The challenge–response proves that both ends hold the key; it does not encrypt or
//! sign the rest of the connection, so an attacker able to rewrite traffic on the path
//! could still take over a connection after it (use a trusted network, or TLS). Callers
//! should set read timeouts on the socket: a silent peer otherwise blocks the handshake.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use ferry_plugin_api::util::to_hex;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The protocol version this build speaks. 3: post-copy and hybrid commit with
/// `ready` and `run` before the copy runs.
pub const PROTOCOL_VERSION: u32 = 3;
/// The oldest protocol version this build still accepts. A version-2 peer would let a
/// post-copy copy run before the source gave itself up (and roll the source back after
/// it ran): refused before anything is frozen.
pub const PROTOCOL_MIN: u32 = 3;
/// The largest message body accepted, in bytes.
pub const MAX_MESSAGE: usize = 1 << 20;
/// The shortest key [`load_key`] accepts, in bytes.
pub const MIN_KEY_LEN: usize = 16;
/// The longest key file [`load_key`] reads; a larger file is surely not a key.
const MAX_KEY_FILE: u64 = 64 * 1024;

const NONCE_LEN: usize = 32;
const SERVER_LABEL: &[u8] = b"ferry-server";
const CLIENT_LABEL: &[u8] = b"ferry-client";

// Reasons sent in `refused`, read by the client's user.
const REASON_AUTH_FAILED: &str = "authentication failed";
const REASON_AUTH_REQUIRED: &str =
    "authentication required: the daemon has a key configured, the client sent none";
const REASON_NO_KEY_HERE: &str = "this daemon has no key configured, but the client uses one";

/// What went wrong, by phase: the transport, the framing, authentication, the handshake,
/// the key file.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("handshake connection failed: {0}")]
    Io(#[source] io::Error),
    #[error("the peer closed the connection during the handshake")]
    Closed,
    /// The socket's read timeout (the event's timeout) passed with nothing read.
    #[error("no answer from the peer in time during the handshake (is a ferry daemon listening there, and is it busy?)")]
    Silent,
    #[error(
        "the peer closed the connection in the middle of a message ({got} of {expected} bytes)"
    )]
    Truncated { got: usize, expected: usize },
    #[error("peer sent a message of {0} bytes (limit 1 MiB)")]
    TooLarge(u64),
    #[error("the peer is not a ferry daemon: it speaks text ({0:?}…)")]
    NotFerry(String),
    #[error("peer sent garbage: {0}")]
    Garbage(String),
    #[error("peer sent a message of unknown type {0:?} (is it a different version of ferry?)")]
    UnknownType(String),
    /// A well-formed message that does not belong at this point of the sequence.
    #[error("the peer broke the handshake protocol: {0}")]
    Violation(String),
    /// Authentication failed or could not happen; the text says which side lacks what.
    #[error("{0}")]
    Auth(String),
    /// The peer refused us; the text is its reason, as sent.
    #[error("{0}")]
    Refused(String),
    /// We refused the client's `hello` (and told it why).
    #[error("refused the migration: {0}")]
    Incompatible(String),
    #[error("cannot get random bytes for the handshake: {0}")]
    Random(#[source] io::Error),
    #[error("key file {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
}

impl From<io::Error> for ProtocolError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ProtocolError::Silent,
            _ => ProtocolError::Io(e),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Messages

/// A plugin and its version, as both sides name it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PluginRef {
    pub name: String,
    pub version: String,
}

impl PluginRef {
    pub fn new(name: &str, version: &str) -> Self {
        PluginRef {
            name: name.to_string(),
            version: version.to_string(),
        }
    }
}

impl fmt::Display for PluginRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.name, self.version)
    }
}

/// The client's first handshake message: what the source needs from the destination.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Hello {
    pub protocol: u32,
    pub arch: String,
    pub page_size: u64,
    /// Names the event on both machines; 32 lowercase hex chars.
    pub token: String,
    /// The source's request id.
    pub request_id: u64,
    pub pid: i32,
    pub strategy: String,
    pub medium: PluginRef,
    pub subsystems: Vec<PluginRef>,
    /// Kernel features the strategy needs on the destination (e.g. `userfaultfd`).
    pub features: Vec<String>,
    /// The request's options for plugins (`mechanism.plugin_params`), which the
    /// destination's plugins read too. Protocol 3: a hello carrying some says 3, which
    /// an older daemon refuses in one line rather than leave them unheard; one without
    /// says 2, as before.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub plugin_params: BTreeMap<String, BTreeMap<String, String>>,
}

impl Hello {
    /// A hello for this machine, with this build's protocol version and a fresh token.
    pub fn new(
        request_id: u64,
        pid: i32,
        strategy: &str,
        medium: PluginRef,
        subsystems: Vec<PluginRef>,
        features: Vec<String>,
    ) -> Self {
        Hello {
            protocol: PROTOCOL_VERSION,
            arch: std::env::consts::ARCH.to_string(),
            page_size: page_size(),
            token: crate::random::new_token(),
            request_id,
            pid,
            strategy: strategy.to_string(),
            medium,
            subsystems,
            features,
            plugin_params: BTreeMap::new(),
        }
    }

    /// With the request's plugin options (a daemon older than protocol 3, which would
    /// ignore them, is refused by the version anyway).
    pub fn with_params(mut self, params: BTreeMap<String, BTreeMap<String, String>>) -> Self {
        self.plugin_params = params;
        self
    }
}

/// The server's acceptance of a [`Hello`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Welcome {
    /// The version both sides use from now on.
    pub protocol: u32,
    /// The client's token, echoed.
    pub token: String,
    /// The destination's own request id for this event.
    pub request_id: u64,
}

/// Every message of the handshake, tagged by `"type"` on the wire.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    AuthHello {
        #[serde(with = "hex32")]
        client_nonce: [u8; NONCE_LEN],
    },
    AuthChallenge {
        #[serde(with = "hex32")]
        server_nonce: [u8; NONCE_LEN],
        #[serde(with = "hex32")]
        server_proof: [u8; NONCE_LEN],
    },
    AuthProof {
        #[serde(with = "hex32")]
        client_proof: [u8; NONCE_LEN],
    },
    AuthOk,
    Hello(Hello),
    Welcome(Welcome),
    Refused {
        reason: String,
    },
}

const MESSAGE_TYPES: &[&str] = &[
    "auth_hello",
    "auth_challenge",
    "auth_proof",
    "auth_ok",
    "hello",
    "welcome",
    "refused",
];

impl Message {
    /// The `"type"` tag, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::AuthHello { .. } => "auth_hello",
            Message::AuthChallenge { .. } => "auth_challenge",
            Message::AuthProof { .. } => "auth_proof",
            Message::AuthOk => "auth_ok",
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Refused { .. } => "refused",
        }
    }
}

/// The messages after the transfer, carried as JSON through the TCP medium's `command`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Verdict {
    /// Destination → source: the process is rebuilt and held stopped. `pids` maps each
    /// source pid (as a string, JSON keys are strings) to its pid on the destination.
    /// Receiving it is the commit point.
    Rebuilt {
        pids: BTreeMap<String, i32>,
        restore_ms: f64,
    },
    /// Destination → source: rebuilding failed; the source resumes its process.
    Failed { reason: String },
    /// Source → destination: release the rebuilt process.
    Commit,
    /// Source → destination: kill the rebuilt process, the source keeps running.
    Abort { reason: String },
    /// Destination → source: the rebuilt process runs.
    Released,
    /// Destination → source, post-copy: the commit arrived, the copy is still held
    /// stopped and runs on [`Verdict::Run`]. Receiving it is the commit point of a lazy
    /// migration: from it on the source never runs again.
    Ready,
    /// Source → destination, post-copy: the source gave up its own copy: run this one.
    Run,
}

const VERDICT_TYPES: &[&str] = &["rebuilt", "failed", "commit", "abort", "released", "ready", "run"];

impl Verdict {
    pub fn to_json(&self) -> String {
        // Serializing plain strings, maps and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<Verdict, ProtocolError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ProtocolError::Garbage(e.to_string()))?;
        check_type(&value, VERDICT_TYPES)?;
        serde_json::from_value(value).map_err(|e| ProtocolError::Garbage(e.to_string()))
    }
}

/// 32 bytes as 64 lowercase hex characters.
mod hex32 {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::to_hex(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0u8; 32];
        if text.len() != 64 {
            return Err(D::Error::custom(format!(
                "expected 64 hex characters, got {}",
                text.len()
            )));
        }
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2).unwrap_or("zz"), 16)
                .map_err(|_| D::Error::custom("expected hex characters"))?;
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// Framing

/// Writes one message: its length, then its JSON, in a single write.
pub fn send<W: Write + ?Sized>(w: &mut W, message: &Message) -> Result<(), ProtocolError> {
    let body = serde_json::to_vec(message)
        .map_err(|e| ProtocolError::Io(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    if body.len() > MAX_MESSAGE {
        return Err(ProtocolError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "our {} message is {} bytes (limit 1 MiB)",
                message.kind(),
                body.len()
            ),
        )));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Reads one message, consuming exactly its bytes from `r`.
pub fn recv<R: Read + ?Sized>(r: &mut R) -> Result<Message, ProtocolError> {
    parse(&read_frame(r)?)
}

/// Reads a length and exactly that many bytes.
fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Vec<u8>, ProtocolError> {
    let mut header = [0u8; 4];
    match read_full(r, &mut header)? {
        0 => return Err(ProtocolError::Closed),
        4 => {}
        got => return Err(ProtocolError::Truncated { got, expected: 4 }),
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_MESSAGE {
        // A ferry frame's length is small: four printable bytes are the start of a text
        // protocol (an HTTP, SSH or SMTP server on that port).
        if header.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
            return Err(ProtocolError::NotFerry(String::from_utf8_lossy(&header).into_owned()));
        }
        return Err(ProtocolError::TooLarge(len as u64));
    }
    let mut body = vec![0u8; len];
    let got = read_full(r, &mut body)?;
    if got < len {
        return Err(ProtocolError::Truncated {
            got: 4 + got,
            expected: 4 + len,
        });
    }
    Ok(body)
}

/// Fills `buf` unless the stream ends first; returns how much it read.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> Result<usize, ProtocolError> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

fn parse(body: &[u8]) -> Result<Message, ProtocolError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ProtocolError::Garbage(e.to_string()))?;
    let kind = check_type(&value, MESSAGE_TYPES)?;
    serde_json::from_value(value)
        .map_err(|e| ProtocolError::Garbage(format!("{kind} message: {e}")))
}

/// The `"type"` of a JSON message, which must be one of `known`.
fn check_type(value: &serde_json::Value, known: &[&str]) -> Result<String, ProtocolError> {
    let Some(kind) = value.get("type") else {
        return Err(ProtocolError::Garbage(
            "a message without a \"type\" field".into(),
        ));
    };
    let Some(kind) = kind.as_str() else {
        return Err(ProtocolError::Garbage(format!(
            "a message whose \"type\" is {kind}"
        )));
    };
    if !known.contains(&kind) {
        return Err(ProtocolError::UnknownType(kind.to_string()));
    }
    Ok(kind.to_string())
}

fn unexpected(got: &Message, expected: &str) -> ProtocolError {
    ProtocolError::Violation(format!(
        "it sent {} where {expected} was expected",
        got.kind()
    ))
}

/// Sends a refusal on a connection we are about to drop; its failure changes nothing.
fn refuse<S: Write + ?Sized>(stream: &mut S, reason: &str) {
    let _ = send(
        stream,
        &Message::Refused {
            reason: reason.to_string(),
        },
    );
}

mod auth;
mod handshake;
pub use auth::*;
pub use handshake::*;

#[cfg(test)]
mod tests;
