//! The image codec (docs/ARCHITECTURE.md, "The image"): how a checkpoint is laid out in a medium's
//! numbered streams, how records are framed, and how they are read back without trusting
//! a single length or count. Also the generic `ferry show` rendering of an image.
//!
//! Layout:
//! - stream 0, the **inventory**, written last so that an interrupted checkpoint has none:
//!   `"FERRYIMG"`, u32 LE format version, u32 LE body length (at most [`MAX_INVENTORY`]),
//!   the JSON body ([`Inventory`]), u64 LE xxh3-64 of the body.
//! - streams 1.., the records of one subsystem plugin each. A record is a 24-byte header,
//!   the kind, the payload:
//!
//! ```text
//!   0  4  magic "FREC"
//!   4  1  format (0 = JSON, 1 = raw bytes)
//!   5  1  kind length (1..=64; the kind is ASCII [a-z0-9_.-])
//!   6  2  reserved, 0
//!   8  8  payload length, u64 LE (at most MAX_RECORD)
//!  16  8  xxh3-64, u64 LE, over header bytes 0..16 ++ kind ++ payload
//! ```

use std::collections::{BTreeMap, HashSet};
use std::io::Read;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{json, Value};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// The image format this ferry writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// First bytes of the inventory stream.
pub const INVENTORY_MAGIC: [u8; 8] = *b"FERRYIMG";
/// The stream that holds the inventory.
pub const INVENTORY_STREAM: u32 = 0;
/// Cap on the inventory's JSON body: it lists plugins and processes, never pages.
pub const MAX_INVENTORY: u32 = 16 << 20;
/// First bytes of every record; on disk they read "FREC" (0x43455246 as a u32 LE).
pub const RECORD_MAGIC: [u8; 4] = *b"FREC";
/// Size of a record header, before the kind.
pub const RECORD_HEADER_LEN: usize = 24;
/// Longest record kind.
pub const MAX_KIND_LEN: usize = 64;
/// Cap on one record's payload; writers chunk larger data (pages) into several records.
pub const MAX_RECORD: u64 = 256 << 20;

/// How far a payload buffer may run ahead of the bytes that actually arrived: a corrupt
/// length costs at most this much memory before the truncation is noticed.
const READ_CHUNK: usize = 1 << 20;
/// Bytes of the inventory before its body: magic, version, length.
const INVENTORY_HEAD_LEN: usize = 16;
/// Bytes of the inventory after its body: the checksum.
const INVENTORY_TAIL_LEN: usize = 8;

/// Everything that can be wrong with an image, or with what a writer asked to frame.
/// Each message is one line and names where the fault is (stream, byte offset, kind).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("not a ferry image: the inventory starts with \"{found}\", expected \"FERRYIMG\"")]
    NotAnImage { found: String },
    #[error("image format version {found}, this ferry reads version {supported}")]
    Version { found: u32, supported: u32 },
    #[error(
        "the inventory claims a body of {len} bytes, over the {cap}-byte cap: the image is corrupt"
    )]
    InventoryTooLarge { len: u64, cap: u64 },
    #[error("the inventory is truncated at byte {at} (expected {missing} more bytes): the checkpoint did not finish or the image is corrupt")]
    InventoryTruncated { at: u64, missing: u64 },
    #[error("inventory checksum mismatch: the image is corrupt")]
    InventoryChecksum,
    #[error("the inventory has {extra} bytes after its checksum: the image is corrupt")]
    InventoryTrailing { extra: u64 },
    #[error("the inventory is not valid: {reason}")]
    InventoryInvalid { reason: String },
    #[error("reading the inventory failed at byte {at}: {reason}")]
    InventorySource { at: u64, reason: String },

    #[error("stream {stream}: truncated {} at byte {at} (expected {missing} more bytes)", record_name(.kind))]
    Truncated {
        stream: u32,
        kind: Option<String>,
        at: u64,
        missing: u64,
    },
    #[error("stream {stream}: no record at byte {at} (found bytes {}, expected \"FREC\"): the image is corrupt", hex(.found))]
    BadMagic {
        stream: u32,
        at: u64,
        found: [u8; 4],
    },
    #[error("stream {stream}: the record at byte {at} has {value:#06x} in its reserved field: the image is corrupt or from a newer ferry")]
    Reserved { stream: u32, at: u64, value: u16 },
    #[error("stream {stream}: the record at byte {at} has an invalid kind: {reason}")]
    BadKind {
        stream: u32,
        at: u64,
        reason: String,
    },
    #[error("stream {stream}: the record at byte {at} has unknown format {format} (this ferry knows 0 = json, 1 = raw)")]
    UnknownFormat { stream: u32, at: u64, format: u8 },
    #[error("stream {stream}: the record at byte {at} claims {len} bytes, over the {cap}-byte cap: the image is corrupt")]
    RecordTooLarge {
        stream: u32,
        at: u64,
        len: u64,
        cap: u64,
    },
    #[error(
        "stream {stream}: record `{kind}` at byte {at} fails its checksum: the image is corrupt"
    )]
    Checksum { stream: u32, at: u64, kind: String },
    #[error("stream {stream}: reading the record at byte {at} failed: {reason}")]
    Source {
        stream: u32,
        at: u64,
        reason: String,
    },
    #[error("stream {stream}: cannot read on at byte {at} after an earlier error")]
    AfterError { stream: u32, at: u64 },
    #[error("stream {stream} has {found} records, the inventory says {expected}: {}", verdict(.found, .expected))]
    RecordCount {
        stream: u32,
        found: u64,
        expected: u64,
    },
    #[error("stream {stream} has {found} bytes, the inventory says {expected}: {}", verdict(.found, .expected))]
    ByteCount {
        stream: u32,
        found: u64,
        expected: u64,
    },
    #[error("stream {stream} of plugin {plugin} cannot be opened: {reason}")]
    StreamOpen {
        stream: u32,
        plugin: String,
        reason: String,
    },
    #[error("stream {stream}: record `{kind}` at byte {at} is not valid JSON: {reason}")]
    RecordJson {
        stream: u32,
        at: u64,
        kind: String,
        reason: String,
    },

    #[error("record kind {kind:?} is invalid: {reason}")]
    InvalidKind { kind: String, reason: String },
    #[error("record `{kind}` of {len} bytes is over the {cap}-byte cap: write it in chunks")]
    PayloadTooLarge { kind: String, len: u64, cap: u64 },
    #[error("{what} cannot be serialized: {reason}")]
    Serialize { what: String, reason: String },
    #[error("record `{kind}` is {found}, expected {expected}")]
    FormatMismatch {
        kind: String,
        expected: RecordFormat,
        found: RecordFormat,
    },
    #[error("record `{kind}` does not parse: {reason}")]
    Json { kind: String, reason: String },
}

fn record_name(kind: &Option<String>) -> String {
    match kind {
        Some(k) => format!("record `{k}`"),
        None => "record header".to_string(),
    }
}

fn verdict(found: &u64, expected: &u64) -> &'static str {
    if found < expected {
        "the image is truncated"
    } else {
        "the image is corrupt"
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// How a record's payload is encoded: the plugin ABI's type, so plugins and the image
/// agree by construction. On disk: 0 = JSON, 1 = raw.
pub use ferry_plugin_api::RecordFormat;

fn format_from_byte(b: u8) -> Option<RecordFormat> {
    match b {
        0 => Some(RecordFormat::Json),
        1 => Some(RecordFormat::Raw),
        _ => None,
    }
}

fn format_byte(f: RecordFormat) -> u8 {
    match f {
        RecordFormat::Json => 0,
        RecordFormat::Raw => 1,
    }
}

mod inventory;
mod record;
mod show;
mod views;
pub use inventory::*;
pub use record::*;
pub use show::*;
pub use views::*;

#[cfg(test)]
mod tests;
