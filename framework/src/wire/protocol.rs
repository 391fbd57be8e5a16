//! The handshake between `ferry migrate` (the client, on the source machine) and
//! `ferry daemon` (the server, on the destination), run on a freshly connected TCP
//! socket before anything is frozen; and the verdict messages both sides exchange after
//! the transfer (DESIGN.md, "Requests, events and the core" and "Security").
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
//!   the subsystems' streams (pushdata)       ->
//!   flush                                    ->
//!                                                (rebuilds the process, held stopped)
//!                                            <-  Verdict::Rebuilt { pids, restore_ms }
//!                                            or  Verdict::Failed { reason }
//!   ** commit point: the source receives Rebuilt; before it the source process is
//!   ** resumed on any failure, after it the destination's copy is the live one
//!   Verdict::Commit                          ->  (releases the rebuilt process)
//!   or Verdict::Abort { reason }             ->  (kills the rebuilt process)
//!                                            <-  Verdict::Released
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

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 2;
/// The oldest protocol version this build still accepts.
pub const PROTOCOL_MIN: u32 = 2;
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
    #[error(
        "the peer closed the connection in the middle of a message ({got} of {expected} bytes)"
    )]
    Truncated { got: usize, expected: usize },
    #[error("peer sent a message of {0} bytes (limit 1 MiB)")]
    TooLarge(u64),
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
        ProtocolError::Io(e)
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
        }
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
}

const VERDICT_TYPES: &[&str] = &["rebuilt", "failed", "commit", "abort", "released"];

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
            Err(e) => return Err(ProtocolError::Io(e)),
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

// ---------------------------------------------------------------------------------------
// Authentication

fn proof(
    key: &[u8],
    label: &[u8],
    first: &[u8],
    second: &[u8],
) -> Result<Hmac<Sha256>, ProtocolError> {
    // HMAC takes keys of any length; the error is unreachable, but not worth a panic.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .map_err(|e| ProtocolError::Auth(format!("the key cannot be used: {e}")))?;
    mac.update(label);
    mac.update(first);
    mac.update(second);
    Ok(mac)
}

fn proof_bytes(mac: Hmac<Sha256>) -> [u8; NONCE_LEN] {
    mac.finalize().into_bytes().into()
}

/// 32 bytes from the kernel's random pool (getrandom(2), else /dev/urandom). Unlike
/// tokens, nonces must be unpredictable, so there is no weaker fallback.
fn random_nonce() -> Result<[u8; NONCE_LEN], ProtocolError> {
    let mut buf = [0u8; NONCE_LEN];
    crate::random::fill(&mut buf).map_err(ProtocolError::Random)?;
    Ok(buf)
}

/// The client's side of authentication. With a key, proves we hold it and checks that
/// the daemon does too; without one, sends nothing (a daemon that wants a key then
/// refuses our `hello`).
pub fn authenticate_client<S: Read + Write + ?Sized>(
    stream: &mut S,
    key: Option<&[u8]>,
) -> Result<(), ProtocolError> {
    let Some(key) = key else {
        return Ok(());
    };
    let client_nonce = random_nonce()?;
    send(stream, &Message::AuthHello { client_nonce })?;
    let (server_nonce, server_proof) = match recv(stream)? {
        Message::AuthChallenge {
            server_nonce,
            server_proof,
        } => (server_nonce, server_proof),
        Message::Refused { reason } => return Err(ProtocolError::Refused(reason)),
        other => return Err(unexpected(&other, "auth_challenge")),
    };
    if proof(key, SERVER_LABEL, &client_nonce, &server_nonce)?
        .verify_slice(&server_proof)
        .is_err()
    {
        refuse(stream, REASON_AUTH_FAILED);
        return Err(ProtocolError::Auth(
            "the daemon does not know our key (authentication failed)".into(),
        ));
    }
    let client_proof = proof_bytes(proof(key, CLIENT_LABEL, &server_nonce, &client_nonce)?);
    send(stream, &Message::AuthProof { client_proof })?;
    match recv(stream)? {
        Message::AuthOk => Ok(()),
        Message::Refused { reason } => Err(ProtocolError::Refused(reason)),
        other => Err(unexpected(&other, "auth_ok")),
    }
}

/// The daemon's side of authentication. With a key, requires the client to prove it
/// holds it; without one, reads nothing ([`server_handshake`] refuses a client that
/// starts authenticating).
pub fn authenticate_server<S: Read + Write + ?Sized>(
    stream: &mut S,
    key: Option<&[u8]>,
) -> Result<(), ProtocolError> {
    let Some(key) = key else {
        return Ok(());
    };
    let client_nonce = match recv(stream)? {
        Message::AuthHello { client_nonce } => client_nonce,
        Message::Hello(_) => {
            refuse(stream, REASON_AUTH_REQUIRED);
            return Err(ProtocolError::Auth(
                "the client sent no key, but this daemon requires one (authentication required)"
                    .into(),
            ));
        }
        other => return Err(unexpected(&other, "auth_hello")),
    };
    let server_nonce = random_nonce()?;
    let server_proof = proof_bytes(proof(key, SERVER_LABEL, &client_nonce, &server_nonce)?);
    send(
        stream,
        &Message::AuthChallenge {
            server_nonce,
            server_proof,
        },
    )?;
    let failed =
        || ProtocolError::Auth("the client does not know the key (authentication failed)".into());
    match recv(stream)? {
        Message::AuthProof { client_proof } => {
            if proof(key, CLIENT_LABEL, &server_nonce, &client_nonce)?
                .verify_slice(&client_proof)
                .is_err()
            {
                refuse(stream, REASON_AUTH_FAILED);
                return Err(failed());
            }
        }
        // The client found our proof wrong: its key differs from ours.
        Message::Refused { .. } => return Err(failed()),
        other => return Err(unexpected(&other, "auth_proof")),
    }
    send(stream, &Message::AuthOk)
}

/// Reads the shared key from `path`: a file owned by root (or by us), not accessible to
/// group or others, holding at least [`MIN_KEY_LEN`] bytes (a trailing newline is not
/// part of the key).
pub fn load_key(path: &Path) -> Result<Vec<u8>, ProtocolError> {
    let fail = |reason: String| ProtocolError::Key {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| fail(format!("cannot open it: {e}")))?;
    // Checked on the open file, so the file cannot be swapped between check and read.
    let meta = file
        .metadata()
        .map_err(|e| fail(format!("cannot stat it: {e}")))?;
    if !meta.is_file() {
        return Err(fail("it is not a regular file".into()));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(fail(format!(
            "it is owned by uid {}; it must be owned by root{}",
            meta.uid(),
            if euid == 0 {
                String::new()
            } else {
                format!(" or uid {euid}")
            }
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(fail(format!(
            "its mode is {mode:04o}; group and others must have no access (chmod 600 it)"
        )));
    }
    if meta.len() > MAX_KEY_FILE {
        return Err(fail(format!(
            "it is {} bytes, larger than a key file can be ({MAX_KEY_FILE})",
            meta.len()
        )));
    }
    let mut key = Vec::new();
    file.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut key)
        .map_err(|e| fail(format!("cannot read it: {e}")))?;
    if key.last() == Some(&b'\n') {
        key.pop();
        if key.last() == Some(&b'\r') {
            key.pop();
        }
    }
    if key.len() < MIN_KEY_LEN {
        return Err(fail(format!(
            "the key is {} bytes; it must be at least {MIN_KEY_LEN}",
            key.len()
        )));
    }
    Ok(key)
}

// ---------------------------------------------------------------------------------------
// Handshake

/// What the destination has, against which a [`Hello`] is checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Local {
    pub arch: String,
    pub page_size: u64,
    pub protocol_max: u32,
    /// Plugins registered here, media and subsystems alike.
    pub plugins: Vec<PluginRef>,
    /// Kernel features present here.
    pub features: Vec<String>,
}

impl Local {
    /// This machine and build, with the plugins and kernel features found here.
    pub fn this_machine(plugins: Vec<PluginRef>, features: Vec<String>) -> Self {
        Local {
            arch: std::env::consts::ARCH.to_string(),
            page_size: page_size(),
            protocol_max: PROTOCOL_VERSION,
            plugins,
            features,
        }
    }
}

fn page_size() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(size)) if size > 0 => size as u64,
        _ => 4096,
    }
}

/// Whether this destination can take the migration `hello` describes; if not, one line
/// naming the first thing that differs.
pub fn check_hello(hello: &Hello, local: &Local) -> Result<(), String> {
    if hello.protocol > local.protocol_max {
        return Err(format!(
            "protocol version {} is newer than this daemon's {}",
            hello.protocol, local.protocol_max
        ));
    }
    if hello.protocol < PROTOCOL_MIN {
        return Err(format!(
            "protocol version {} is older than this daemon accepts ({PROTOCOL_MIN} to {})",
            hello.protocol, local.protocol_max
        ));
    }
    if hello.arch != local.arch {
        return Err(format!(
            "architecture {} on the source, {} here",
            hello.arch, local.arch
        ));
    }
    if hello.page_size != local.page_size {
        return Err(format!(
            "page size {} on the source, {} here",
            hello.page_size, local.page_size
        ));
    }
    if hello.token.len() != 32
        || !hello
            .token
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!(
            "the source sent a malformed token {:?} (expected 32 lowercase hex characters)",
            hello.token
        ));
    }
    check_plugin("medium", &hello.medium, &local.plugins)?;
    for plugin in &hello.subsystems {
        check_plugin("subsystem", plugin, &local.plugins)?;
    }
    if let Some(missing) = hello.features.iter().find(|f| !local.features.contains(f)) {
        return Err(format!("destination lacks kernel feature {missing}"));
    }
    Ok(())
}

fn check_plugin(kind: &str, wanted: &PluginRef, here: &[PluginRef]) -> Result<(), String> {
    if here.contains(wanted) {
        return Ok(());
    }
    match here.iter().find(|p| p.name == wanted.name) {
        Some(other) => Err(format!(
            "destination has {kind} plugin {other}, the source uses {}",
            wanted.version
        )),
        None => Err(format!("destination lacks {kind} plugin {wanted}")),
    }
}

/// The client's handshake, after [`authenticate_client`]: sends `hello`, returns the
/// daemon's `welcome`. A refusal becomes [`ProtocolError::Refused`] with its reason.
pub fn client_handshake<S: Read + Write + ?Sized>(
    stream: &mut S,
    hello: &Hello,
) -> Result<Welcome, ProtocolError> {
    send(stream, &Message::Hello(hello.clone()))?;
    let welcome = match recv(stream)? {
        Message::Welcome(welcome) => welcome,
        Message::Refused { reason } => return Err(ProtocolError::Refused(reason)),
        other => return Err(unexpected(&other, "welcome")),
    };
    if welcome.token != hello.token {
        return Err(ProtocolError::Violation(format!(
            "it answered for token {}, ours is {}",
            welcome.token, hello.token
        )));
    }
    if welcome.protocol < PROTOCOL_MIN || welcome.protocol > hello.protocol {
        return Err(ProtocolError::Violation(format!(
            "it chose protocol version {}, we speak {PROTOCOL_MIN} to {}",
            welcome.protocol, hello.protocol
        )));
    }
    Ok(welcome)
}

/// The daemon's handshake, after [`authenticate_server`]: reads `hello`, checks it
/// against `local`, answers `welcome` (with `next_request_id` as our id for the event)
/// or `refused`. Returns the client's hello.
pub fn server_handshake<S: Read + Write + ?Sized>(
    stream: &mut S,
    local: &Local,
    next_request_id: u64,
) -> Result<Hello, ProtocolError> {
    let body = read_frame(stream)?;
    let hello = match parse(&body) {
        Ok(Message::Hello(hello)) => hello,
        Ok(Message::AuthHello { .. }) => {
            refuse(stream, REASON_NO_KEY_HERE);
            return Err(ProtocolError::Auth(
                "the client uses a key, but this daemon has none configured".into(),
            ));
        }
        Ok(other) => {
            let error = unexpected(&other, "hello");
            refuse(stream, &error.to_string());
            return Err(error);
        }
        // A newer client's hello may not parse as ours; its version still gets a clear
        // refusal.
        Err(ProtocolError::Garbage(e)) => {
            let reason = match newer_version(&body, local) {
                Some(reason) => reason,
                None => format!("the daemon could not read the hello: {e}"),
            };
            refuse(stream, &reason);
            return Err(ProtocolError::Incompatible(reason));
        }
        Err(e) => return Err(e),
    };
    if let Err(reason) = check_hello(&hello, local) {
        refuse(stream, &reason);
        return Err(ProtocolError::Incompatible(reason));
    }
    send(
        stream,
        &Message::Welcome(Welcome {
            protocol: hello.protocol,
            token: hello.token.clone(),
            request_id: next_request_id,
        }),
    )?;
    Ok(hello)
}

/// The refusal line for a `hello` of a protocol newer than ours, if it is one.
fn newer_version(body: &[u8], local: &Local) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    if value.get("type")?.as_str()? != "hello" {
        return None;
    }
    let protocol = value.get("protocol")?.as_u64()?;
    (protocol > u64::from(local.protocol_max)).then(|| {
        format!(
            "protocol version {protocol} is newer than this daemon's {}",
            local.protocol_max
        )
    })
}

// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    use std::thread;

    const KEY: &[u8] = b"0123456789abcdef-shared-key";
    const OTHER_KEY: &[u8] = b"fedcba9876543210-another-key";

    fn local() -> Local {
        Local {
            arch: "x86_64".into(),
            page_size: 4096,
            protocol_max: PROTOCOL_VERSION,
            plugins: vec![
                PluginRef::new("tcp", "0.1"),
                PluginRef::new("memory", "0.2"),
                PluginRef::new("signals", "0.3"),
            ],
            features: vec!["ptrace".into(), "userfaultfd".into()],
        }
    }

    fn hello() -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            arch: "x86_64".into(),
            page_size: 4096,
            token: crate::random::new_token(),
            request_id: 7,
            pid: 4242,
            strategy: "precopy".into(),
            medium: PluginRef::new("tcp", "0.1"),
            subsystems: vec![
                PluginRef::new("memory", "0.2"),
                PluginRef::new("signals", "0.3"),
            ],
            features: vec!["userfaultfd".into()],
        }
    }

    /// Runs the daemon's auth + handshake on one end of a socket pair in a thread, the
    /// client's on the other end, and returns both results.
    fn run(
        client_key: Option<&'static [u8]>,
        server_key: Option<&'static [u8]>,
        hello: Hello,
        local: Local,
    ) -> (Result<Welcome, ProtocolError>, Result<Hello, ProtocolError>) {
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || {
            authenticate_server(&mut s, server_key)?;
            server_handshake(&mut s, &local, 99)
        });
        let client =
            authenticate_client(&mut c, client_key).and_then(|()| client_handshake(&mut c, &hello));
        drop(c);
        (client, server.join().unwrap())
    }

    fn text<T: fmt::Debug>(r: &Result<T, ProtocolError>) -> String {
        match r {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn right_key_authenticates_and_welcomes() {
        let h = hello();
        let (client, server) = run(Some(KEY), Some(KEY), h.clone(), local());
        let welcome = client.unwrap();
        assert_eq!(welcome.token, h.token);
        assert_eq!(welcome.request_id, 99);
        assert_eq!(welcome.protocol, PROTOCOL_VERSION);
        assert_eq!(server.unwrap(), h);
    }

    #[test]
    fn no_keys_exchange_nothing_for_auth() {
        let h = hello();
        let (client, server) = run(None, None, h.clone(), local());
        assert_eq!(client.unwrap().token, h.token);
        assert_eq!(server.unwrap().request_id, 7);
    }

    #[test]
    fn wrong_key_fails_on_both_sides() {
        let (client, server) = run(Some(OTHER_KEY), Some(KEY), hello(), local());
        assert_eq!(
            text(&client),
            "the daemon does not know our key (authentication failed)"
        );
        assert_eq!(
            text(&server),
            "the client does not know the key (authentication failed)"
        );
    }

    #[test]
    fn wrong_client_proof_is_refused() {
        // A client that gets past the daemon's proof (it cannot, without the key) but
        // sends a bad proof of its own.
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || authenticate_server(&mut s, Some(KEY)));
        send(
            &mut c,
            &Message::AuthHello {
                client_nonce: [1; 32],
            },
        )
        .unwrap();
        assert!(matches!(
            recv(&mut c).unwrap(),
            Message::AuthChallenge { .. }
        ));
        send(
            &mut c,
            &Message::AuthProof {
                client_proof: [2; 32],
            },
        )
        .unwrap();
        assert_eq!(
            recv(&mut c).unwrap(),
            Message::Refused {
                reason: "authentication failed".into()
            }
        );
        assert_eq!(
            text(&server.join().unwrap()),
            "the client does not know the key (authentication failed)"
        );
    }

    #[test]
    fn proofs_bind_both_nonces_and_the_direction() {
        let a = proof_bytes(proof(KEY, SERVER_LABEL, &[1; 32], &[2; 32]).unwrap());
        assert_ne!(
            a,
            proof_bytes(proof(KEY, CLIENT_LABEL, &[1; 32], &[2; 32]).unwrap())
        );
        assert_ne!(
            a,
            proof_bytes(proof(KEY, SERVER_LABEL, &[2; 32], &[1; 32]).unwrap())
        );
        assert_ne!(
            a,
            proof_bytes(proof(OTHER_KEY, SERVER_LABEL, &[1; 32], &[2; 32]).unwrap())
        );
        assert_ne!(random_nonce().unwrap(), random_nonce().unwrap());
    }

    #[test]
    fn key_on_the_daemon_only() {
        let (client, server) = run(None, Some(KEY), hello(), local());
        assert_eq!(
            text(&client),
            "authentication required: the daemon has a key configured, the client sent none"
        );
        assert!(matches!(client, Err(ProtocolError::Refused(_))));
        assert_eq!(
            text(&server),
            "the client sent no key, but this daemon requires one (authentication required)"
        );
    }

    #[test]
    fn key_on_the_client_only() {
        let (client, server) = run(Some(KEY), None, hello(), local());
        assert_eq!(
            text(&client),
            "this daemon has no key configured, but the client uses one"
        );
        assert_eq!(
            text(&server),
            "the client uses a key, but this daemon has none configured"
        );
    }

    #[test]
    fn check_hello_accepts_a_matching_source() {
        assert_eq!(check_hello(&hello(), &local()), Ok(()));
    }

    #[test]
    fn check_hello_names_what_differs() {
        type Change = fn(&mut Hello);
        let cases: Vec<(Change, &str)> = vec![
            (
                |h| h.subsystems.push(PluginRef::new("files", "0.3")),
                "destination lacks subsystem plugin files 0.3",
            ),
            (
                |h| h.subsystems[1].version = "0.4".into(),
                "destination has subsystem plugin signals 0.3, the source uses 0.4",
            ),
            (
                |h| h.medium = PluginRef::new("rdma", "0.1"),
                "destination lacks medium plugin rdma 0.1",
            ),
            (
                |h| h.page_size = 16384,
                "page size 16384 on the source, 4096 here",
            ),
            (
                |h| h.arch = "aarch64".into(),
                "architecture aarch64 on the source, x86_64 here",
            ),
            (
                |h| h.protocol = 9,
                "protocol version 9 is newer than this daemon's 2",
            ),
            (
                |h| h.protocol = 0,
                "protocol version 0 is older than this daemon accepts (2 to 2)",
            ),
            (
                |h| h.features.push("soft-dirty".into()),
                "destination lacks kernel feature soft-dirty",
            ),
            (
                |h| h.token = "xyz".into(),
                "the source sent a malformed token \"xyz\" (expected 32 lowercase hex characters)",
            ),
        ];
        for (change, line) in cases {
            let mut h = hello();
            change(&mut h);
            assert_eq!(check_hello(&h, &local()), Err(line.to_string()));
        }
        let mut l = local();
        l.plugins.retain(|p| p.name != "tcp");
        assert_eq!(
            check_hello(&hello(), &l),
            Err("destination lacks medium plugin tcp 0.1".into())
        );
        l = local();
        l.features.clear();
        assert_eq!(
            check_hello(&hello(), &l),
            Err("destination lacks kernel feature userfaultfd".into())
        );
    }

    #[test]
    fn a_mismatch_reaches_the_client_as_its_line() {
        let mut h = hello();
        h.subsystems[1].version = "0.1".into();
        let (client, server) = run(Some(KEY), Some(KEY), h, local());
        assert_eq!(
            text(&client),
            "destination has subsystem plugin signals 0.3, the source uses 0.1"
        );
        assert!(matches!(server, Err(ProtocolError::Incompatible(_))));
    }

    #[test]
    fn a_newer_hello_that_does_not_parse_is_refused_by_version() {
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || server_handshake(&mut s, &local(), 1));
        let body = br#"{"type":"hello","protocol":3,"something":"new"}"#;
        c.write_all(&(body.len() as u32).to_le_bytes()).unwrap();
        c.write_all(body).unwrap();
        assert_eq!(
            recv(&mut c).unwrap(),
            Message::Refused {
                reason: "protocol version 3 is newer than this daemon's 2".into()
            }
        );
        assert!(matches!(
            server.join().unwrap(),
            Err(ProtocolError::Incompatible(_))
        ));
    }

    #[test]
    fn the_handshake_consumes_exactly_its_own_bytes() {
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || {
            authenticate_server(&mut s, Some(KEY)).unwrap();
            // The client writes medium bytes right after its hello, before our answer.
            server_handshake(&mut s, &local(), 5).unwrap();
            let mut rest = [0u8; 11];
            s.read_exact(&mut rest).unwrap();
            assert_eq!(&rest, b"MEDIUM-DATA");
            s.write_all(b"FROM-DAEMON").unwrap();
        });
        authenticate_client(&mut c, Some(KEY)).unwrap();
        let h = hello();
        // Hello and medium data in one write: the daemon must not read past the hello.
        let body = serde_json::to_vec(&Message::Hello(h.clone())).unwrap();
        let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&body);
        bytes.extend_from_slice(b"MEDIUM-DATA");
        c.write_all(&bytes).unwrap();
        match recv(&mut c).unwrap() {
            Message::Welcome(w) => assert_eq!(w.request_id, 5),
            other => panic!("{other:?}"),
        }
        server.join().unwrap();
        let mut rest = [0u8; 11];
        c.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"FROM-DAEMON");
    }

    #[test]
    fn recv_reads_one_message_at_a_time() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        send(&mut a, &Message::AuthOk).unwrap();
        send(&mut a, &Message::Refused { reason: "x".into() }).unwrap();
        a.write_all(b"tail").unwrap();
        drop(a);
        assert_eq!(recv(&mut b).unwrap(), Message::AuthOk);
        assert_eq!(
            recv(&mut b).unwrap(),
            Message::Refused { reason: "x".into() }
        );
        let mut tail = Vec::new();
        b.read_to_end(&mut tail).unwrap();
        assert_eq!(tail, b"tail");
    }

    fn recv_bytes(bytes: &[u8]) -> Result<Message, ProtocolError> {
        recv(&mut io::Cursor::new(bytes.to_vec()))
    }

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u32).to_le_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn oversized_messages_are_refused_before_reading_them() {
        let r = recv_bytes(&((2u32 << 20).to_le_bytes()));
        assert_eq!(
            text(&r),
            "peer sent a message of 2097152 bytes (limit 1 MiB)"
        );
        assert!(recv_bytes(&framed(&vec![b' '; MAX_MESSAGE + 1])).is_err());
    }

    #[test]
    fn garbage_and_unknown_types_are_clear_errors() {
        let r = recv_bytes(&framed(b"not json"));
        assert!(text(&r).starts_with("peer sent garbage: "), "{}", text(&r));
        let r = recv_bytes(&framed(br#"{"reason":"x"}"#));
        assert_eq!(
            text(&r),
            "peer sent garbage: a message without a \"type\" field"
        );
        let r = recv_bytes(&framed(br#"{"type":"teleport"}"#));
        assert_eq!(
            text(&r),
            "peer sent a message of unknown type \"teleport\" (is it a different version of ferry?)"
        );
        let r = recv_bytes(&framed(br#"{"type":"auth_hello","client_nonce":"abcd"}"#));
        assert!(
            text(&r).starts_with("peer sent garbage: auth_hello message: "),
            "{}",
            text(&r)
        );
        let r = recv_bytes(&framed(b""));
        assert!(matches!(r, Err(ProtocolError::Garbage(_))));
    }

    #[test]
    fn eof_before_and_inside_a_message() {
        assert_eq!(
            text(&recv_bytes(b"")),
            "the peer closed the connection during the handshake"
        );
        assert_eq!(
            text(&recv_bytes(&[5, 0])),
            "the peer closed the connection in the middle of a message (2 of 4 bytes)"
        );
        let mut partial = 100u32.to_le_bytes().to_vec();
        partial.extend_from_slice(b"{\"type\":");
        assert_eq!(
            text(&recv_bytes(&partial)),
            "the peer closed the connection in the middle of a message (12 of 104 bytes)"
        );
        // The daemon's side: a client that connects and hangs up.
        let (c, mut s) = UnixStream::pair().unwrap();
        drop(c);
        assert!(matches!(
            authenticate_server(&mut s, Some(KEY)),
            Err(ProtocolError::Closed)
        ));
    }

    #[test]
    fn messages_round_trip_with_hex_nonces() {
        let m = Message::AuthChallenge {
            server_nonce: [0xab; 32],
            server_proof: [0x01; 32],
        };
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains(r#""type":"auth_challenge""#), "{json}");
        assert!(json.contains(&"ab".repeat(32)), "{json}");
        assert_eq!(recv_bytes(&framed(json.as_bytes())).unwrap(), m);
        let h = Message::Hello(hello());
        assert_eq!(
            recv_bytes(&framed(&serde_json::to_vec(&h).unwrap())).unwrap(),
            h
        );
    }

    #[test]
    fn verdicts_round_trip() {
        let mut pids = BTreeMap::new();
        pids.insert("4242".to_string(), 17);
        for v in [
            Verdict::Rebuilt {
                pids,
                restore_ms: 12.5,
            },
            Verdict::Failed {
                reason: "no memory".into(),
            },
            Verdict::Commit,
            Verdict::Abort {
                reason: "user".into(),
            },
            Verdict::Released,
        ] {
            assert_eq!(Verdict::from_json(&v.to_json()).unwrap(), v);
        }
        assert_eq!(Verdict::Commit.to_json(), r#"{"type":"commit"}"#);
        assert!(matches!(
            Verdict::from_json(r#"{"type":"hello"}"#),
            Err(ProtocolError::UnknownType(_))
        ));
        assert!(matches!(
            Verdict::from_json("{"),
            Err(ProtocolError::Garbage(_))
        ));
    }

    fn key_file(dir: &Path, contents: &[u8], mode: u32) -> PathBuf {
        let path = dir.join("key");
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn load_key_trims_the_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_file(dir.path(), b"0123456789abcdef\n", 0o600);
        assert_eq!(load_key(&path).unwrap(), b"0123456789abcdef");
        let path = key_file(dir.path(), b"0123456789abcdefXYZ", 0o400);
        assert_eq!(load_key(&path).unwrap(), b"0123456789abcdefXYZ");
    }

    #[test]
    fn load_key_refuses_open_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_file(dir.path(), b"0123456789abcdef\n", 0o640);
        assert_eq!(
            text(&load_key(&path)),
            format!(
                "key file {}: its mode is 0640; group and others must have no access (chmod 600 it)",
                path.display()
            )
        );
        let path = key_file(dir.path(), b"0123456789abcdef\n", 0o604);
        assert!(text(&load_key(&path)).contains("its mode is 0604"));
    }

    #[test]
    fn load_key_refuses_short_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_file(dir.path(), b"0123456789abcde\n", 0o600);
        assert_eq!(
            text(&load_key(&path)),
            format!(
                "key file {}: the key is 15 bytes; it must be at least 16",
                path.display()
            )
        );
        let missing = dir.path().join("absent");
        assert!(text(&load_key(&missing))
            .starts_with(&format!("key file {}: cannot open it", missing.display())));
    }

    #[test]
    fn load_key_refuses_another_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_file(dir.path(), b"0123456789abcdef\n", 0o600);
        // Only root can give a file away; elsewhere the check cannot be staged.
        if nix::unistd::geteuid().is_root()
            && std::os::unix::fs::chown(&path, Some(12345), None).is_ok()
        {
            assert!(
                text(&load_key(&path))
                    .contains("it is owned by uid 12345; it must be owned by root"),
                "{}",
                text(&load_key(&path))
            );
        }
    }
}
