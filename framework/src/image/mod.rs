//! The image codec (DESIGN.md, "The image"): how a checkpoint is laid out in a medium's
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

// ---------------------------------------------------------------------------------------
// Inventory

/// What an image holds, written last to stream 0.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    pub format_version: u32,
    /// Names the event on both machines; 32 lowercase hex chars ([`crate::random::new_token`]).
    pub token: String,
    pub created_unix_ms: u64,
    pub ferry_version: String,
    pub medium: String,
    pub plugins: Vec<PluginEntry>,
    pub processes: Vec<ProcessEntry>,
}

/// One subsystem plugin's stream, with what restore must find in it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginEntry {
    pub name: String,
    pub version: String,
    pub stream: u32,
    /// Number of records in the stream.
    pub records: u64,
    /// Total framed bytes of the stream (headers, kinds and payloads).
    pub bytes: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProcessEntry {
    pub pid: i32,
    pub tids: Vec<i32>,
    pub comm: String,
    /// Where ferry's scratch area sat in the process: a hole in its address space that
    /// restore reuses, so the scratch never collides with a restored mapping.
    pub scratch: u64,
    /// The boot and start time of the process (`boot_id/ticks`), which tell it from a
    /// later one with its pid: restore waits for this one to finish exiting.
    #[serde(default)]
    pub start: String,
}

impl Inventory {
    /// A fresh inventory for a checkpoint made now through `medium`, with a new token.
    pub fn new(medium: &str) -> Self {
        let created_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Inventory {
            format_version: FORMAT_VERSION,
            token: crate::random::new_token(),
            created_unix_ms,
            ferry_version: env!("CARGO_PKG_VERSION").to_string(),
            medium: medium.to_string(),
            plugins: Vec::new(),
            processes: Vec::new(),
        }
    }

    /// The plugin whose records are in `stream`.
    pub fn plugin_for_stream(&self, stream: u32) -> Option<&PluginEntry> {
        self.plugins.iter().find(|p| p.stream == stream)
    }

    /// The bytes of stream 0. Refuses an inventory that [`Inventory::decode`] would refuse,
    /// so a bad one fails the checkpoint rather than the restore.
    pub fn encode(&self) -> Result<Vec<u8>, ImageError> {
        self.validate()?;
        let body = serde_json::to_vec(self).map_err(|e| ImageError::Serialize {
            what: "the inventory".to_string(),
            reason: e.to_string(),
        })?;
        let len = u32::try_from(body.len())
            .ok()
            .filter(|&l| l <= MAX_INVENTORY)
            .ok_or(ImageError::InventoryTooLarge {
                len: body.len() as u64,
                cap: MAX_INVENTORY as u64,
            })?;
        let mut out = Vec::with_capacity(INVENTORY_HEAD_LEN + body.len() + INVENTORY_TAIL_LEN);
        out.extend_from_slice(&INVENTORY_MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&xxh3_64(&body).to_le_bytes());
        Ok(out)
    }

    /// Parses the whole of stream 0: magic, version, length cap, checksum, JSON, sense.
    pub fn decode(bytes: &[u8]) -> Result<Self, ImageError> {
        let body_len = check_inventory_head(bytes)?;
        let total = INVENTORY_HEAD_LEN + body_len + INVENTORY_TAIL_LEN;
        if bytes.len() < total {
            return Err(ImageError::InventoryTruncated {
                at: bytes.len() as u64,
                missing: (total - bytes.len()) as u64,
            });
        }
        if bytes.len() > total {
            return Err(ImageError::InventoryTrailing {
                extra: (bytes.len() - total) as u64,
            });
        }
        let body = &bytes[INVENTORY_HEAD_LEN..INVENTORY_HEAD_LEN + body_len];
        let mut sum = [0u8; 8];
        sum.copy_from_slice(&bytes[INVENTORY_HEAD_LEN + body_len..total]);
        if xxh3_64(body) != u64::from_le_bytes(sum) {
            return Err(ImageError::InventoryChecksum);
        }
        // The path in the message ("plugins[1].stream: ...") tells a user which entry is bad.
        let de = &mut serde_json::Deserializer::from_slice(body);
        let inv: Inventory =
            serde_path_to_error::deserialize(de).map_err(|e| ImageError::InventoryInvalid {
                reason: e.to_string(),
            })?;
        inv.validate()?;
        Ok(inv)
    }

    /// Reads and decodes stream 0 from any medium, allocating no more than the bytes that
    /// arrive (and never more than the cap) whatever the length field claims.
    pub fn read_from<P: Pull + ?Sized>(src: &mut P) -> Result<Self, ImageError> {
        let mut buf = vec![0u8; INVENTORY_HEAD_LEN];
        let n =
            fill(src, &mut buf).map_err(|reason| ImageError::InventorySource { at: 0, reason })?;
        buf.truncate(n);
        if n < INVENTORY_HEAD_LEN {
            // decode names what is wrong with a short head (not an image, or truncated).
            return Self::decode(&buf);
        }
        let body_len = check_inventory_head(&buf)?;
        let want = (body_len + INVENTORY_TAIL_LEN) as u64;
        let got = pull_bounded(src, want, &mut buf, None).map_err(|reason| {
            ImageError::InventorySource {
                at: INVENTORY_HEAD_LEN as u64,
                reason,
            }
        })?;
        if got == want {
            // Anything after the checksum means the stream is not what we wrote.
            let mut probe = [0u8; 1];
            let extra = fill(src, &mut probe).map_err(|reason| ImageError::InventorySource {
                at: buf.len() as u64,
                reason,
            })?;
            if extra > 0 {
                return Err(ImageError::InventoryTrailing {
                    extra: extra as u64,
                });
            }
        }
        Self::decode(&buf)
    }

    fn validate(&self) -> Result<(), ImageError> {
        let bad = |reason: String| Err(ImageError::InventoryInvalid { reason });
        if self.format_version != FORMAT_VERSION {
            return bad(format!(
                "its body says format version {}, its header {FORMAT_VERSION}",
                self.format_version
            ));
        }
        if !crate::random::is_token(&self.token) {
            return bad(format!(
                "token {:?} is not 32 lowercase hex digits",
                self.token
            ));
        }
        let mut streams = HashSet::new();
        for p in &self.plugins {
            if p.name.is_empty() {
                return bad(format!("the plugin of stream {} has no name", p.stream));
            }
            if p.stream == INVENTORY_STREAM {
                return bad(format!(
                    "plugin {} claims stream 0, which holds the inventory",
                    p.name
                ));
            }
            if !streams.insert(p.stream) {
                return bad(format!(
                    "stream {} is listed twice (plugin {})",
                    p.stream, p.name
                ));
            }
        }
        for p in &self.processes {
            if p.pid <= 0 {
                return bad(format!("process `{}` has pid {}", p.comm, p.pid));
            }
        }
        Ok(())
    }
}

/// Checks magic, version and length cap of an inventory head; answers the body length.
fn check_inventory_head(bytes: &[u8]) -> Result<usize, ImageError> {
    let magic_part = &bytes[..bytes.len().min(INVENTORY_MAGIC.len())];
    if magic_part != &INVENTORY_MAGIC[..magic_part.len()] {
        return Err(ImageError::NotAnImage {
            found: magic_part.escape_ascii().to_string(),
        });
    }
    if bytes.len() < INVENTORY_HEAD_LEN {
        return Err(ImageError::InventoryTruncated {
            at: bytes.len() as u64,
            missing: (INVENTORY_HEAD_LEN - bytes.len()) as u64,
        });
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != FORMAT_VERSION {
        return Err(ImageError::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let len = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    if len > MAX_INVENTORY {
        return Err(ImageError::InventoryTooLarge {
            len: len as u64,
            cap: MAX_INVENTORY as u64,
        });
    }
    Ok(len as usize)
}

// ---------------------------------------------------------------------------------------
// Writing records

fn check_kind(kind: &str) -> Result<(), String> {
    if kind.is_empty() || kind.len() > MAX_KIND_LEN {
        return Err(format!(
            "its length is {}, it must be 1 to {MAX_KIND_LEN}",
            kind.len()
        ));
    }
    if let Some(c) = kind
        .bytes()
        .find(|&b| !(b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b)))
    {
        return Err(format!("byte {c:#04x} is not one of [a-z0-9_.-]"));
    }
    Ok(())
}

fn check_frame(kind: &str, len: u64) -> Result<(), ImageError> {
    check_kind(kind).map_err(|reason| ImageError::InvalidKind {
        kind: kind.to_string(),
        reason,
    })?;
    if len > MAX_RECORD {
        return Err(ImageError::PayloadTooLarge {
            kind: kind.to_string(),
            len,
            cap: MAX_RECORD,
        });
    }
    Ok(())
}

/// Header and kind of a record holding `payload`. The caller pushes these bytes and then
/// the payload itself, so pages go to the medium without being copied.
pub fn frame_header(
    kind: &str,
    format: RecordFormat,
    payload: &[u8],
) -> Result<Vec<u8>, ImageError> {
    let len = payload.len() as u64;
    check_frame(kind, len)?;
    let mut out = Vec::with_capacity(RECORD_HEADER_LEN + kind.len());
    out.extend_from_slice(&RECORD_MAGIC);
    out.push(format_byte(format));
    out.push(kind.len() as u8); // check_frame bounds it to MAX_KIND_LEN
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    let mut h = Xxh3::new();
    h.update(&out);
    h.update(kind.as_bytes());
    h.update(payload);
    out.extend_from_slice(&h.digest().to_le_bytes());
    out.extend_from_slice(kind.as_bytes());
    Ok(out)
}

/// A whole framed record in one buffer, for small records.
pub fn frame(kind: &str, format: RecordFormat, payload: &[u8]) -> Result<Vec<u8>, ImageError> {
    let mut out = frame_header(kind, format, payload)?;
    out.extend_from_slice(payload);
    Ok(out)
}

/// A framed JSON record holding `value`.
pub fn json_record<T: Serialize + ?Sized>(kind: &str, value: &T) -> Result<Vec<u8>, ImageError> {
    let payload = serde_json::to_vec(value).map_err(|e| ImageError::Serialize {
        what: format!("record `{kind}`"),
        reason: e.to_string(),
    })?;
    frame(kind, RecordFormat::Json, &payload)
}

// ---------------------------------------------------------------------------------------
// Reading records

/// A source of a stream's bytes, whatever the medium.
pub trait Pull {
    /// Fills the start of `buf`; answers how many bytes, 0 at the end of the stream.
    fn pull(&mut self, buf: &mut [u8]) -> Result<usize, String>;
}

impl Pull for &[u8] {
    fn pull(&mut self, buf: &mut [u8]) -> Result<usize, String> {
        let n = buf.len().min(self.len());
        let (head, tail) = self.split_at(n);
        buf[..n].copy_from_slice(head);
        *self = tail;
        Ok(n)
    }
}

impl<P: Pull + ?Sized> Pull for &mut P {
    fn pull(&mut self, buf: &mut [u8]) -> Result<usize, String> {
        (**self).pull(buf)
    }
}

impl<P: Pull + ?Sized> Pull for Box<P> {
    fn pull(&mut self, buf: &mut [u8]) -> Result<usize, String> {
        (**self).pull(buf)
    }
}

/// Any `std::io::Read` (a file, a socket) as a [`Pull`].
pub struct ReadPull<R: Read>(pub R);

impl<R: Read> Pull for ReadPull<R> {
    fn pull(&mut self, buf: &mut [u8]) -> Result<usize, String> {
        loop {
            match self.0.read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// Fills `buf` until it is full or the stream ends; answers how many bytes arrived.
fn fill<P: Pull + ?Sized>(src: &mut P, buf: &mut [u8]) -> Result<usize, String> {
    let mut n = 0;
    while n < buf.len() {
        let room = buf.len() - n;
        let k = src.pull(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        // A medium plugin is code we do not control: a wrong count must not become a panic.
        if k > room {
            return Err(format!(
                "the medium answered {k} bytes for a {room}-byte buffer"
            ));
        }
        n += k;
    }
    Ok(n)
}

/// Appends up to `len` bytes from `src` to `out`, hashing them into `hasher`. `out` grows
/// only as bytes arrive, at most READ_CHUNK ahead of them, so a length field is never an
/// allocation request. Answers how many bytes arrived: fewer than `len` means end of stream.
fn pull_bounded<P: Pull + ?Sized>(
    src: &mut P,
    len: u64,
    out: &mut Vec<u8>,
    mut hasher: Option<&mut Xxh3>,
) -> Result<u64, String> {
    let mut got = 0u64;
    while got < len {
        let want = (len - got).min(READ_CHUNK as u64) as usize;
        let start = out.len();
        out.resize(start + want, 0);
        let n = fill(src, &mut out[start..]);
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                out.truncate(start);
                return Err(e);
            }
        };
        out.truncate(start + n);
        if let Some(h) = hasher.as_deref_mut() {
            h.update(&out[start..]);
        }
        got += n as u64;
        if n < want {
            break;
        }
    }
    Ok(got)
}

/// A record as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordOwned {
    pub kind: String,
    pub format: RecordFormat,
    pub payload: Vec<u8>,
}

/// What `read` found: the record, its start offset and its payload length (the payload
/// itself is left out for raw records that the caller only wants to count).
struct ReadRecord {
    rec: RecordOwned,
    at: u64,
    payload_len: u64,
}

/// Reads the records of one stream, checking each before handing it out.
pub struct RecordReader<P: Pull> {
    src: P,
    stream: u32,
    /// Bytes consumed so far: the offset of the next record.
    offset: u64,
    records: u64,
    /// Set after an error: the position is then inside a record and nothing after it
    /// can be read with any meaning.
    failed: bool,
    /// Reused to stream raw payloads that are checked but not kept.
    scratch: Vec<u8>,
}

impl<P: Pull> RecordReader<P> {
    pub fn new(src: P, stream: u32) -> Self {
        RecordReader {
            src,
            stream,
            offset: 0,
            records: 0,
            failed: false,
            scratch: Vec::new(),
        }
    }

    /// The next record; `Ok(None)` when the stream ends exactly at a record boundary.
    #[allow(clippy::should_implement_trait)] // fallible, so not an Iterator
    pub fn next(&mut self) -> Result<Option<RecordOwned>, ImageError> {
        Ok(self.read(true)?.map(|r| r.rec))
    }

    /// Complete records read so far.
    pub fn stream(&self) -> u32 {
        self.stream
    }

    /// What the records are pulled from.
    pub fn source_mut(&mut self) -> &mut P {
        &mut self.src
    }

    pub fn records_read(&self) -> u64 {
        self.records
    }

    /// Bytes of complete records read so far.
    pub fn bytes_read(&self) -> u64 {
        self.offset
    }

    /// Compares what was read with what the inventory promised; call at end of stream.
    pub fn check_against(&self, entry: &PluginEntry) -> Result<(), ImageError> {
        if self.records != entry.records {
            return Err(ImageError::RecordCount {
                stream: self.stream,
                found: self.records,
                expected: entry.records,
            });
        }
        if self.offset != entry.bytes {
            return Err(ImageError::ByteCount {
                stream: self.stream,
                found: self.offset,
                expected: entry.bytes,
            });
        }
        Ok(())
    }

    fn read(&mut self, keep_raw: bool) -> Result<Option<ReadRecord>, ImageError> {
        if self.failed {
            return Err(ImageError::AfterError {
                stream: self.stream,
                at: self.offset,
            });
        }
        let r = self.read_inner(keep_raw);
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn read_inner(&mut self, keep_raw: bool) -> Result<Option<ReadRecord>, ImageError> {
        let (stream, at) = (self.stream, self.offset);
        let source = |reason: String| ImageError::Source { stream, at, reason };

        let mut head = [0u8; RECORD_HEADER_LEN];
        let n = fill(&mut self.src, &mut head).map_err(source)?;
        if n == 0 {
            return Ok(None);
        }
        if n < RECORD_HEADER_LEN {
            return Err(ImageError::Truncated {
                stream,
                kind: None,
                at: at + n as u64,
                missing: (RECORD_HEADER_LEN - n) as u64,
            });
        }
        let field = |range: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b[..range.len()].copy_from_slice(&head[range]);
            u64::from_le_bytes(b)
        };
        let magic = [head[0], head[1], head[2], head[3]];
        if magic != RECORD_MAGIC {
            return Err(ImageError::BadMagic {
                stream,
                at,
                found: magic,
            });
        }
        let reserved = field(6..8) as u16;
        if reserved != 0 {
            return Err(ImageError::Reserved {
                stream,
                at,
                value: reserved,
            });
        }
        let format = format_from_byte(head[4]).ok_or(ImageError::UnknownFormat {
            stream,
            at,
            format: head[4],
        })?;
        let kind_len = head[5] as usize;
        if kind_len == 0 || kind_len > MAX_KIND_LEN {
            return Err(ImageError::BadKind {
                stream,
                at,
                reason: format!("its length is {kind_len}, it must be 1 to {MAX_KIND_LEN}"),
            });
        }
        let payload_len = field(8..16);
        if payload_len > MAX_RECORD {
            return Err(ImageError::RecordTooLarge {
                stream,
                at,
                len: payload_len,
                cap: MAX_RECORD,
            });
        }
        let checksum = field(16..24);

        let mut kind_buf = [0u8; MAX_KIND_LEN];
        let kind_bytes = &mut kind_buf[..kind_len];
        let n = fill(&mut self.src, kind_bytes).map_err(source)?;
        if n < kind_len {
            let end = at + (RECORD_HEADER_LEN + n) as u64;
            return Err(ImageError::Truncated {
                stream,
                kind: None,
                at: end,
                missing: (kind_len - n) as u64 + payload_len,
            });
        }
        let kind = match std::str::from_utf8(kind_bytes) {
            Ok(k) if check_kind(k).is_ok() => k.to_string(),
            _ => {
                let reason = format!(
                    "\"{}\" is not 1 to {MAX_KIND_LEN} of [a-z0-9_.-]",
                    kind_bytes.escape_ascii()
                );
                return Err(ImageError::BadKind { stream, at, reason });
            }
        };

        let mut hasher = Xxh3::new();
        hasher.update(&head[..16]);
        hasher.update(kind.as_bytes());
        let keep = keep_raw || format == RecordFormat::Json;
        let mut payload = Vec::new();
        let got = if keep {
            pull_bounded(&mut self.src, payload_len, &mut payload, Some(&mut hasher))
                .map_err(source)?
        } else {
            // Checked like any other, but held one chunk at a time.
            let mut got = 0u64;
            while got < payload_len {
                self.scratch.clear();
                let want = (payload_len - got).min(READ_CHUNK as u64);
                let n = pull_bounded(&mut self.src, want, &mut self.scratch, Some(&mut hasher))
                    .map_err(source)?;
                got += n;
                if n < want {
                    break;
                }
            }
            got
        };
        let body_at = at + (RECORD_HEADER_LEN + kind_len) as u64;
        if got < payload_len {
            return Err(ImageError::Truncated {
                stream,
                kind: Some(kind),
                at: body_at + got,
                missing: payload_len - got,
            });
        }
        if hasher.digest() != checksum {
            return Err(ImageError::Checksum { stream, at, kind });
        }
        self.offset = body_at + payload_len;
        self.records += 1;
        Ok(Some(ReadRecord {
            rec: RecordOwned {
                kind,
                format,
                payload,
            },
            at,
            payload_len,
        }))
    }
}

/// The value in a JSON record. Refuses a raw record, and names the kind when it does not parse.
pub fn parse_json<T: DeserializeOwned>(rec: &RecordOwned) -> Result<T, ImageError> {
    if rec.format != RecordFormat::Json {
        return Err(ImageError::FormatMismatch {
            kind: rec.kind.clone(),
            expected: RecordFormat::Json,
            found: rec.format,
        });
    }
    let de = &mut serde_json::Deserializer::from_slice(&rec.payload);
    serde_path_to_error::deserialize(de).map_err(|e| ImageError::Json {
        kind: rec.kind.clone(),
        reason: e.to_string(),
    })
}

// ---------------------------------------------------------------------------------------
// ferry show

/// Everything in an image as JSON, for `ferry show` (like `crit show`): the inventory, then
/// each plugin's stream with its records (JSON content parsed, raw ones by size). Every
/// record is checked, and each stream's counts against the inventory.
pub fn describe(
    inventory: &Inventory,
    streams: &mut dyn FnMut(u32) -> Result<Box<dyn Pull>, String>,
) -> Result<Value, ImageError> {
    let inv = serde_json::to_value(inventory).map_err(|e| ImageError::Serialize {
        what: "the inventory".to_string(),
        reason: e.to_string(),
    })?;
    let mut plugins: Vec<&PluginEntry> = inventory.plugins.iter().collect();
    plugins.sort_by_key(|p| p.stream);
    let mut out = Vec::with_capacity(plugins.len());
    for p in plugins {
        let src = streams(p.stream).map_err(|reason| ImageError::StreamOpen {
            stream: p.stream,
            plugin: p.name.clone(),
            reason,
        })?;
        let mut reader = RecordReader::new(src, p.stream);
        let mut records = Vec::new();
        let mut raw_bytes = 0u64;
        while let Some(r) = reader.read(false)? {
            let kind = r.rec.kind;
            match r.rec.format {
                RecordFormat::Json => {
                    let content: Value = serde_json::from_slice(&r.rec.payload).map_err(|e| {
                        ImageError::RecordJson {
                            stream: p.stream,
                            at: r.at,
                            kind: kind.clone(),
                            reason: e.to_string(),
                        }
                    })?;
                    records.push(json!({"kind": kind, "format": "json", "bytes": r.payload_len, "content": content}));
                }
                RecordFormat::Raw => {
                    raw_bytes += r.payload_len;
                    records.push(json!({"kind": kind, "format": "raw", "bytes": r.payload_len}));
                }
            }
        }
        reader.check_against(p)?;
        out.push(json!({
            "stream": p.stream,
            "plugin": p.name,
            "version": p.version,
            "bytes": reader.bytes_read(),
            "raw_bytes": raw_bytes,
            "records": records,
        }));
    }
    Ok(json!({"inventory": inv, "streams": out}))
}

/// Longest rendering of one JSON record's content, in lines.
const SHOW_LINES: usize = 40;
/// Longest line of a compact entry, in chars.
const SHOW_WIDTH: usize = 160;

/// A human summary of what [`describe`] answers. Generic: it knows the image's framing,
/// not any plugin's schema, and shows whatever shape it is given without failing.
pub fn render_text(v: &Value) -> String {
    let mut out = String::new();
    let s = |v: &Value, k: &str| {
        v.get(k)
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| x.to_string())
            })
            .unwrap_or_else(|| "?".to_string())
    };
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let inv = v.get("inventory").unwrap_or(&Value::Null);

    out.push_str(&format!(
        "ferry image, format {}, token {}\nwritten by ferry {} at {}, medium {}\n",
        s(inv, "format_version"),
        s(inv, "token"),
        s(inv, "ferry_version"),
        inv.get("created_unix_ms")
            .and_then(Value::as_u64)
            .map(utc_time)
            .unwrap_or_else(|| "?".to_string()),
        s(inv, "medium"),
    ));
    for p in inv
        .get("processes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let tids: Vec<String> = p
            .get("tids")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|t| t.to_string())
            .collect();
        out.push_str(&format!(
            "process {} `{}`, threads {}\n",
            s(p, "pid"),
            s(p, "comm"),
            tids.join(" ")
        ));
    }

    for st in v
        .get("streams")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let recs: Vec<&Value> = st
            .get("records")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .collect();
        out.push_str(&format!(
            "\nstream {}: plugin {} {}, {} records, {} bytes ({} raw)\n",
            s(st, "stream"),
            s(st, "plugin"),
            s(st, "version"),
            recs.len(),
            n(st, "bytes"),
            n(st, "raw_bytes"),
        ));
        // Per kind, in order of first appearance: count, payload bytes, format.
        let mut kinds: Vec<(String, String, u64, u64)> = Vec::new();
        for r in &recs {
            let (k, f) = (s(r, "kind"), s(r, "format"));
            match kinds.iter_mut().find(|e| e.0 == k && e.1 == f) {
                Some(e) => {
                    e.2 += 1;
                    e.3 += n(r, "bytes");
                }
                None => kinds.push((k, f, 1, n(r, "bytes"))),
            }
        }
        let width = kinds.iter().map(|k| k.0.len()).max().unwrap_or(0);
        for (k, f, count, bytes) in &kinds {
            let plural = if *count == 1 { "record" } else { "records" };
            out.push_str(&format!(
                "  {k:width$}  {count:>6} {plural:7}  {bytes:>12} bytes  {f}\n"
            ));
        }
        // The content of JSON records, numbered per kind.
        let mut seen: BTreeMap<String, u64> = BTreeMap::new();
        for r in &recs {
            let Some(content) = r.get("content") else {
                continue;
            };
            let k = s(r, "kind");
            let i = seen.entry(k.clone()).or_insert(0);
            *i += 1;
            out.push_str(&format!("  {k} #{i}:\n"));
            for line in content_lines(content) {
                out.push_str("    ");
                out.push_str(&line);
                out.push('\n');
            }
        }
    }
    out
}

/// An array of objects one compact line per entry, anything else pretty; both capped.
fn content_lines(content: &Value) -> Vec<String> {
    let lines: Vec<String> = match content.as_array() {
        Some(a) if !a.is_empty() && a.iter().all(Value::is_object) => {
            a.iter().map(|e| e.to_string()).collect()
        }
        _ => serde_json::to_string_pretty(content)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect(),
    };
    let total = lines.len();
    let mut shown: Vec<String> = lines
        .into_iter()
        .take(SHOW_LINES)
        .map(|l| {
            if l.chars().count() > SHOW_WIDTH {
                let cut: String = l.chars().take(SHOW_WIDTH).collect();
                format!("{cut}…")
            } else {
                l
            }
        })
        .collect();
    if total > SHOW_LINES {
        shown.push(format!("… {} more lines", total - SHOW_LINES));
    }
    shown
}

/// `2024-05-01 12:00:00.123 UTC` from milliseconds since the epoch (civil-from-days, so no
/// date crate is needed for one line of output).
fn utc_time(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A source that answers in odd-sized pieces, as a socket does.
    struct Choppy<'a> {
        data: &'a [u8],
        state: u64,
    }

    impl Pull for Choppy<'_> {
        fn pull(&mut self, buf: &mut [u8]) -> Result<usize, String> {
            // xorshift: deterministic, sizes 1..=7919
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let size = (self.state % 7919 + 1) as usize;
            let n = size.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn inventory() -> Inventory {
        Inventory {
            format_version: FORMAT_VERSION,
            token: "0123456789abcdef0123456789abcdef".to_string(),
            created_unix_ms: 1_714_564_800_123,
            ferry_version: "0.1.0".to_string(),
            medium: "file".to_string(),
            plugins: vec![
                PluginEntry {
                    name: "memory".into(),
                    version: "0.1.0".into(),
                    stream: 1,
                    records: 0,
                    bytes: 0,
                },
                PluginEntry {
                    name: "threads".into(),
                    version: "0.2.0".into(),
                    stream: 2,
                    records: 0,
                    bytes: 0,
                },
            ],
            processes: vec![ProcessEntry {
                pid: 4242,
                tids: vec![4242, 4243],
                comm: "sleep".into(),
                scratch: 0x7f00_0000_0000,
                start: "b0a7/1234".into(),
            }],
        }
    }

    /// An inventory stream with any version and body, checksummed correctly.
    fn raw_inventory(version: u32, body: &[u8]) -> Vec<u8> {
        let mut out = INVENTORY_MAGIC.to_vec();
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(body);
        out.extend_from_slice(&xxh3_64(body).to_le_bytes());
        out
    }

    fn read_all(data: &[u8], stream: u32) -> Result<Vec<RecordOwned>, ImageError> {
        let mut r = RecordReader::new(data, stream);
        let mut out = Vec::new();
        while let Some(rec) = r.next()? {
            out.push(rec);
        }
        Ok(out)
    }

    #[test]
    fn inventory_round_trip() {
        let inv = inventory();
        let bytes = inv.encode().unwrap();
        assert_eq!(&bytes[..8], b"FERRYIMG");
        assert_eq!(Inventory::decode(&bytes).unwrap(), inv);
        let mut src = Choppy {
            data: &bytes,
            state: 7,
        };
        assert_eq!(Inventory::read_from(&mut src).unwrap(), inv);
        let mut src = ReadPull(std::io::Cursor::new(bytes.clone()));
        assert_eq!(Inventory::read_from(&mut src).unwrap(), inv);
        assert_eq!(
            inv.plugin_for_stream(2).map(|p| p.name.as_str()),
            Some("threads")
        );
        assert!(inv.plugin_for_stream(3).is_none());
    }

    #[test]
    fn fresh_inventory_encodes() {
        let inv = Inventory::new("tcp");
        assert!(crate::random::is_token(&inv.token));
        assert!(inv.created_unix_ms > 1_600_000_000_000);
        assert_eq!(Inventory::decode(&inv.encode().unwrap()).unwrap(), inv);
    }

    #[test]
    fn inventory_bad_magic() {
        let mut bytes = inventory().encode().unwrap();
        bytes[0] = b'X';
        let e = Inventory::decode(&bytes).unwrap_err();
        assert!(e.to_string().starts_with("not a ferry image"), "{e}");
        let e = Inventory::read_from(&mut &b"\x7fELF\x02\x01\x01\0"[..]).unwrap_err();
        assert!(matches!(e, ImageError::NotAnImage { .. }), "{e}");
        assert!(e.to_string().contains("\\x7fELF"), "{e}");
    }

    #[test]
    fn inventory_other_version() {
        let body = serde_json::to_vec(&inventory()).unwrap();
        let e = Inventory::decode(&raw_inventory(7, &body)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "image format version 7, this ferry reads version 1"
        );
        let e = Inventory::read_from(&mut &raw_inventory(7, &body)[..]).unwrap_err();
        assert!(matches!(
            e,
            ImageError::Version {
                found: 7,
                supported: 1
            }
        ));
        // A header saying 1 over a body saying 2 is refused too.
        let mut inv = inventory();
        inv.format_version = 2;
        let body = serde_json::to_vec(&inv).unwrap();
        let e = Inventory::decode(&raw_inventory(1, &body)).unwrap_err();
        assert!(e.to_string().contains("format version 2"), "{e}");
    }

    #[test]
    fn inventory_checksum() {
        let good = inventory().encode().unwrap();
        for i in INVENTORY_HEAD_LEN..good.len() {
            let mut bytes = good.clone();
            bytes[i] ^= 0x20;
            let e = Inventory::decode(&bytes).unwrap_err();
            assert_eq!(
                e.to_string(),
                "inventory checksum mismatch: the image is corrupt"
            );
        }
    }

    #[test]
    fn inventory_every_flip_and_cut_is_refused() {
        let good = inventory().encode().unwrap();
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut bytes = good.clone();
                bytes[i] ^= 1 << bit;
                assert!(
                    Inventory::decode(&bytes).is_err(),
                    "flip of bit {bit} of byte {i}"
                );
                assert!(
                    Inventory::read_from(&mut &bytes[..]).is_err(),
                    "flip of bit {bit} of byte {i}"
                );
            }
        }
        for cut in 0..good.len() {
            let e = Inventory::read_from(&mut &good[..cut]).unwrap_err();
            assert!(
                matches!(e, ImageError::InventoryTruncated { .. }),
                "cut at {cut}: {e}"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(
            Inventory::decode(&long),
            Err(ImageError::InventoryTrailing { extra: 1 })
        ));
        assert!(matches!(
            Inventory::read_from(&mut &long[..]),
            Err(ImageError::InventoryTrailing { extra: 1 })
        ));
    }

    #[test]
    fn inventory_length_is_capped_before_reading() {
        let mut bytes = INVENTORY_MAGIC.to_vec();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&(MAX_INVENTORY + 1).to_le_bytes());
        let e = Inventory::read_from(&mut &bytes[..]).unwrap_err();
        assert!(matches!(e, ImageError::InventoryTooLarge { .. }), "{e}");
        // Under the cap but far more than the stream holds: truncated, not allocated.
        let mut bytes = INVENTORY_MAGIC.to_vec();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&MAX_INVENTORY.to_le_bytes());
        bytes.extend_from_slice(b"{}");
        let e = Inventory::read_from(&mut &bytes[..]).unwrap_err();
        assert!(
            matches!(e, ImageError::InventoryTruncated { at: 18, .. }),
            "{e}"
        );
    }

    #[test]
    fn inventory_unknown_key() {
        let mut v = serde_json::to_value(inventory()).unwrap();
        v["surprise"] = json!(1);
        let e = Inventory::decode(&raw_inventory(1, &serde_json::to_vec(&v).unwrap())).unwrap_err();
        assert!(e.to_string().contains("unknown field `surprise`"), "{e}");
        let mut v = serde_json::to_value(inventory()).unwrap();
        v["plugins"][1]["extra"] = json!(true);
        let e = Inventory::decode(&raw_inventory(1, &serde_json::to_vec(&v).unwrap())).unwrap_err();
        assert!(e.to_string().contains("plugins[1]"), "{e}");
    }

    #[test]
    fn inventory_nonsense_is_refused_both_ways() {
        type Breakage = (fn(&mut Inventory), &'static str);
        let cases: Vec<Breakage> = vec![
            (|i| i.token = "XYZ".into(), "token"),
            (|i| i.plugins[1].stream = 1, "listed twice"),
            (|i| i.plugins[0].stream = 0, "stream 0"),
            (|i| i.plugins[0].name.clear(), "no name"),
            (|i| i.processes[0].pid = 0, "pid 0"),
        ];
        for (break_it, words) in cases {
            let mut inv = inventory();
            break_it(&mut inv);
            let e = inv.encode().unwrap_err();
            assert!(e.to_string().contains(words), "{e}");
            let e = Inventory::decode(&raw_inventory(1, &serde_json::to_vec(&inv).unwrap()))
                .unwrap_err();
            assert!(e.to_string().contains(words), "{e}");
        }
    }

    #[test]
    fn records_round_trip() {
        let big: Vec<u8> = (0..5u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut stream = Vec::new();
        stream.extend(json_record("header", &json!({"pid": 7, "name": "x"})).unwrap());
        stream.extend(frame("empty", RecordFormat::Raw, &[]).unwrap());
        // Large payloads: header pushed, then the payload as it is.
        stream.extend(frame_header("pages", RecordFormat::Raw, &big).unwrap());
        stream.extend_from_slice(&big);
        stream.extend(frame("regs.x86_64-v2", RecordFormat::Raw, &[1, 2, 3]).unwrap());
        stream
            .extend(json_record("vmas", &vec![json!({"start": 1}), json!({"start": 2})]).unwrap());

        for seed in [1u64, 99, 12345] {
            let mut r = RecordReader::new(
                Choppy {
                    data: &stream,
                    state: seed,
                },
                3,
            );
            let mut got = Vec::new();
            while let Some(rec) = r.next().unwrap() {
                got.push(rec);
            }
            assert_eq!(got.len(), 5);
            assert_eq!(r.records_read(), 5);
            assert_eq!(r.bytes_read(), stream.len() as u64);
            assert_eq!(got[0].kind, "header");
            assert_eq!(got[0].format, RecordFormat::Json);
            let v: Value = parse_json(&got[0]).unwrap();
            assert_eq!(v["pid"], 7);
            assert_eq!(
                got[1],
                RecordOwned {
                    kind: "empty".into(),
                    format: RecordFormat::Raw,
                    payload: vec![]
                }
            );
            assert_eq!(got[2].kind, "pages");
            assert!(got[2].payload == big);
            assert_eq!(got[3].payload, vec![1, 2, 3]);
            let vmas: Vec<Value> = parse_json(&got[4]).unwrap();
            assert_eq!(vmas.len(), 2);
            // End of stream stays the end.
            assert!(r.next().unwrap().is_none());
            let entry = PluginEntry {
                name: "m".into(),
                version: "1".into(),
                stream: 3,
                records: 5,
                bytes: stream.len() as u64,
            };
            r.check_against(&entry).unwrap();
        }
        assert!(read_all(&[], 1).unwrap().is_empty());
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let rec = frame("files", RecordFormat::Json, br#"{"fd":3,"path":"/tmp/x"}"#).unwrap();
        for i in 0..rec.len() {
            for bit in 0..8 {
                let mut bad = rec.clone();
                bad[i] ^= 1 << bit;
                let r = read_all(&bad, 2);
                assert!(
                    r.is_err(),
                    "flip of bit {bit} of byte {i} went unnoticed: {r:?}"
                );
            }
            let mut bad = rec.clone();
            bad[i] ^= 0xff;
            assert!(read_all(&bad, 2).is_err(), "flip of byte {i}");
        }
    }

    #[test]
    fn truncation_is_only_clean_at_a_boundary() {
        let records = [
            frame("a", RecordFormat::Raw, b"0123456789").unwrap(),
            frame("bb", RecordFormat::Json, b"[1,2]").unwrap(),
            frame("c", RecordFormat::Raw, b"").unwrap(),
        ];
        let stream: Vec<u8> = records.concat();
        let mut boundaries = vec![0usize];
        for r in &records {
            boundaries.push(boundaries.last().unwrap() + r.len());
        }
        for cut in 0..=stream.len() {
            let result = read_all(&stream[..cut], 2);
            match boundaries.iter().position(|&b| b == cut) {
                Some(n) => assert_eq!(result.unwrap().len(), n, "cut at {cut}"),
                None => {
                    let e = result.unwrap_err();
                    assert!(
                        matches!(e, ImageError::Truncated { stream: 2, at, .. } if at == cut as u64),
                        "cut at {cut}: {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn truncated_message_names_kind_offset_and_shortfall() {
        let mut stream = frame("first", RecordFormat::Raw, &[0; 75]).unwrap(); // 24 + 5 + 75 = 104
        let page = vec![7u8; 4096];
        stream.extend(frame("pages", RecordFormat::Raw, &page).unwrap()); // payload from 104 + 29 = 133
        stream.truncate(133);
        let e = read_all(&stream, 2).unwrap_err();
        assert_eq!(
            e.to_string(),
            "stream 2: truncated record `pages` at byte 133 (expected 4096 more bytes)"
        );
        let e = read_all(&stream[..110], 2).unwrap_err();
        assert_eq!(
            e.to_string(),
            "stream 2: truncated record header at byte 110 (expected 18 more bytes)"
        );
    }

    #[test]
    fn an_oversized_claim_does_not_allocate() {
        // A header claiming 200 MiB (under the cap) over a stream holding 10 bytes.
        let claim = 200u64 << 20;
        let mut rec = frame("pages", RecordFormat::Raw, b"").unwrap();
        rec[8..16].copy_from_slice(&claim.to_le_bytes());
        rec.extend_from_slice(b"0123456789");
        let e = read_all(&rec, 2).unwrap_err();
        assert!(
            matches!(e, ImageError::Truncated { missing, .. } if missing == claim - 10),
            "{e}"
        );

        // The buffer that would hold it grows only with what arrives.
        let mut buf = Vec::new();
        let got = pull_bounded(&mut &b"0123456789"[..], claim, &mut buf, None).unwrap();
        assert_eq!(got, 10);
        assert_eq!(buf, b"0123456789");
        assert!(buf.capacity() <= READ_CHUNK, "capacity {}", buf.capacity());
        // And with a stream that does hold more, it stays within twice what arrived.
        let data = vec![1u8; 3 * READ_CHUNK + 5];
        let mut buf = Vec::new();
        let got = pull_bounded(&mut &data[..], claim, &mut buf, None).unwrap();
        assert_eq!(got, data.len() as u64);
        assert!(
            buf.capacity() <= 2 * (data.len() + READ_CHUNK),
            "capacity {}",
            buf.capacity()
        );
    }

    #[test]
    fn header_faults_name_stream_and_offset() {
        let first = frame("ok", RecordFormat::Raw, b"x").unwrap();
        let at = first.len() as u64;
        let good = frame("pages", RecordFormat::Raw, b"abc").unwrap();
        let check = |patch: &dyn Fn(&mut Vec<u8>), want: &dyn Fn(&ImageError) -> bool| {
            let mut rec = good.clone();
            patch(&mut rec);
            let stream = [first.clone(), rec].concat();
            let e = read_all(&stream, 5).unwrap_err();
            assert!(want(&e), "{e}");
            assert!(e.to_string().starts_with("stream 5"), "{e}");
            assert!(e.to_string().contains(&format!("byte {at}")), "{e}");
        };
        check(&|r| r[0] = b'G', &|e| {
            matches!(e, ImageError::BadMagic { .. })
        });
        check(&|r| r[6] = 1, &|e| {
            matches!(e, ImageError::Reserved { value: 1, .. })
        });
        check(&|r| r[4] = 2, &|e| {
            matches!(e, ImageError::UnknownFormat { format: 2, .. })
        });
        check(&|r| r[5] = 0, &|e| matches!(e, ImageError::BadKind { .. }));
        check(&|r| r[5] = 65, &|e| matches!(e, ImageError::BadKind { .. }));
        check(&|r| r[24] = b'P', &|e| {
            matches!(e, ImageError::BadKind { .. })
        });
        check(&|r| r[24] = 0xff, &|e| {
            matches!(e, ImageError::BadKind { .. })
        });
        check(
            &|r| r[8..16].copy_from_slice(&(MAX_RECORD + 1).to_le_bytes()),
            &|e| matches!(e, ImageError::RecordTooLarge { .. }),
        );
        check(
            &|r| r[16] ^= 1,
            &|e| matches!(e, ImageError::Checksum { kind, .. } if kind == "pages"),
        );
        // A changed payload byte: only the checksum can tell.
        check(&|r| *r.last_mut().unwrap() = b'z', &|e| {
            matches!(e, ImageError::Checksum { .. })
        });
    }

    #[test]
    fn reader_stops_after_an_error() {
        let mut stream = frame("a", RecordFormat::Raw, b"1").unwrap();
        stream[0] = 0;
        stream.extend(frame("b", RecordFormat::Raw, b"2").unwrap());
        let mut r = RecordReader::new(&stream[..], 1);
        assert!(matches!(r.next(), Err(ImageError::BadMagic { .. })));
        assert!(matches!(
            r.next(),
            Err(ImageError::AfterError { stream: 1, at: 0 })
        ));
    }

    #[test]
    fn a_lying_or_failing_source_is_an_error() {
        struct Liar;
        impl Pull for Liar {
            fn pull(&mut self, buf: &mut [u8]) -> Result<usize, String> {
                Ok(buf.len() + 1)
            }
        }
        let e = RecordReader::new(Liar, 1).next().unwrap_err();
        assert!(matches!(e, ImageError::Source { .. }), "{e}");
        struct Broken;
        impl Pull for Broken {
            fn pull(&mut self, _: &mut [u8]) -> Result<usize, String> {
                Err("connection reset".into())
            }
        }
        let e = RecordReader::new(Broken, 4).next().unwrap_err();
        assert_eq!(
            e.to_string(),
            "stream 4: reading the record at byte 0 failed: connection reset"
        );
        let e = Inventory::read_from(&mut Liar).unwrap_err();
        assert!(matches!(e, ImageError::InventorySource { .. }), "{e}");
    }

    #[test]
    fn read_pull_retries_interrupted_reads() {
        struct Flaky(bool, std::io::Cursor<Vec<u8>>);
        impl Read for Flaky {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                self.0 = !self.0;
                if self.0 {
                    return Err(std::io::ErrorKind::Interrupted.into());
                }
                let n = buf.len().min(3);
                self.1.read(&mut buf[..n])
            }
        }
        let data = frame("x", RecordFormat::Raw, b"hello world").unwrap();
        let mut r = RecordReader::new(ReadPull(Flaky(false, std::io::Cursor::new(data))), 1);
        assert_eq!(r.next().unwrap().unwrap().payload, b"hello world");
        assert!(r.next().unwrap().is_none());
    }

    #[test]
    fn writers_refuse_bad_kinds_and_sizes() {
        for kind in ["", "Pages", "a b", "é", &"k".repeat(65)] {
            let e = frame(kind, RecordFormat::Raw, b"").unwrap_err();
            assert!(matches!(e, ImageError::InvalidKind { .. }), "{kind:?}: {e}");
        }
        frame(&"k".repeat(64), RecordFormat::Raw, b"").unwrap();
        frame("a-b_c.0", RecordFormat::Raw, b"").unwrap();
        let e = check_frame("pages", MAX_RECORD + 1).unwrap_err();
        assert!(e.to_string().contains("write it in chunks"), "{e}");
        check_frame("pages", MAX_RECORD).unwrap();
        // A map with non-string keys cannot be JSON: an error, not a panic.
        let m: HashMap<(u8, u8), u8> = [((1, 2), 3)].into_iter().collect();
        let e = json_record("map", &m).unwrap_err();
        assert!(matches!(e, ImageError::Serialize { .. }), "{e}");
    }

    #[test]
    fn parse_json_names_the_kind() {
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct Fd {
            fd: i32,
        }
        let rec = RecordOwned {
            kind: "fds".into(),
            format: RecordFormat::Json,
            payload: br#"{"fd":"three"}"#.to_vec(),
        };
        let e = parse_json::<Fd>(&rec).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("record `fds` does not parse: fd:"),
            "{e}"
        );
        let rec = RecordOwned {
            kind: "pages".into(),
            format: RecordFormat::Raw,
            payload: b"{}".to_vec(),
        };
        let e = parse_json::<Value>(&rec).unwrap_err();
        assert_eq!(e.to_string(), "record `pages` is raw, expected json");
    }

    #[test]
    fn count_mismatch_is_reported() {
        let stream = [
            frame("a", RecordFormat::Raw, b"1").unwrap(),
            frame("a", RecordFormat::Raw, b"2").unwrap(),
        ]
        .concat();
        let mut r = RecordReader::new(&stream[..], 2);
        while r.next().unwrap().is_some() {}
        let entry = |records, bytes| PluginEntry {
            name: "m".into(),
            version: "1".into(),
            stream: 2,
            records,
            bytes,
        };
        let e = r.check_against(&entry(5, 100)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "stream 2 has 2 records, the inventory says 5: the image is truncated"
        );
        let e = r.check_against(&entry(1, 100)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "stream 2 has 2 records, the inventory says 1: the image is corrupt"
        );
        let e = r.check_against(&entry(2, 100)).unwrap_err();
        assert!(
            matches!(
                e,
                ImageError::ByteCount {
                    found: 52,
                    expected: 100,
                    ..
                }
            ),
            "{e}"
        );
        r.check_against(&entry(2, stream.len() as u64)).unwrap();
    }

    /// A two-plugin image: the inventory, and the streams by number.
    fn synthetic_image() -> (Inventory, HashMap<u32, Vec<u8>>) {
        let mut memory = json_record(
            "vmas",
            &json!([{"start": "0x400000", "end": "0x401000", "prot": "r-x"}, {"start": "0x7ffd0000", "end": "0x7ffe0000", "prot": "rw-"}]),
        )
        .unwrap();
        memory.extend(frame("pages", RecordFormat::Raw, &[0u8; 4096]).unwrap());
        memory.extend(frame("pages", RecordFormat::Raw, &[1u8; 8192]).unwrap());
        let threads =
            json_record("regs", &json!({"rip": 4198400, "rsp": 140737488355328u64})).unwrap();
        let mut inv = inventory();
        inv.plugins[0].records = 3;
        inv.plugins[0].bytes = memory.len() as u64;
        inv.plugins[1].records = 1;
        inv.plugins[1].bytes = threads.len() as u64;
        (inv, [(1, memory), (2, threads)].into_iter().collect())
    }

    fn opener(streams: HashMap<u32, Vec<u8>>) -> impl FnMut(u32) -> Result<Box<dyn Pull>, String> {
        move |n| match streams.get(&n) {
            Some(s) => Ok(Box::new(ReadPull(std::io::Cursor::new(s.clone())))),
            None => Err(format!("stream-{n}.img: no such file")),
        }
    }

    #[test]
    fn describe_and_render() {
        let (inv, streams) = synthetic_image();
        let v = describe(&inv, &mut opener(streams)).unwrap();
        assert_eq!(v["inventory"]["token"], inv.token);
        let s1 = &v["streams"][0];
        assert_eq!(s1["stream"], 1);
        assert_eq!(s1["plugin"], "memory");
        assert_eq!(s1["raw_bytes"], 4096 + 8192);
        assert_eq!(s1["records"][0]["kind"], "vmas");
        assert_eq!(s1["records"][0]["format"], "json");
        assert_eq!(s1["records"][0]["content"][1]["prot"], "rw-");
        assert_eq!(
            s1["records"][1],
            json!({"kind": "pages", "format": "raw", "bytes": 4096})
        );
        assert_eq!(v["streams"][1]["records"][0]["content"]["rip"], 4198400);

        let text = render_text(&v);
        assert!(
            text.contains("token 0123456789abcdef0123456789abcdef"),
            "{text}"
        );
        assert!(text.contains("2024-05-01 12:00:00.123 UTC"), "{text}");
        assert!(
            text.contains("process 4242 `sleep`, threads 4242 4243"),
            "{text}"
        );
        assert!(
            text.contains("stream 1: plugin memory 0.1.0, 3 records"),
            "{text}"
        );
        assert!(
            text.contains("pages       2 records         12288 bytes  raw"),
            "{text}"
        );
        assert!(
            text.contains(r#"    {"end":"0x401000","prot":"r-x","start":"0x400000"}"#),
            "{text}"
        );
        assert!(
            text.contains("  regs #1:\n    {\n      \"rip\": 4198400,"),
            "{text}"
        );
        // Generic: any shape renders, nothing panics.
        for odd in [
            json!(null),
            json!([]),
            json!({"streams": [{"records": [{"content": 5}]}]}),
            json!({"inventory": 3}),
        ] {
            render_text(&odd);
        }
    }

    #[test]
    fn render_caps_long_content() {
        let entries: Vec<Value> = (0..100)
            .map(|i| json!({"i": i, "pad": "x".repeat(300)}))
            .collect();
        let lines = content_lines(&json!(entries));
        assert_eq!(lines.len(), SHOW_LINES + 1);
        assert_eq!(lines[SHOW_LINES], "… 60 more lines");
        assert!(lines[0].ends_with('…') && lines[0].chars().count() == SHOW_WIDTH + 1);
        let pretty = content_lines(&json!({"list": (0..100).collect::<Vec<_>>()}));
        assert_eq!(pretty.len(), SHOW_LINES + 1);
    }

    #[test]
    fn describe_checks_the_image() {
        let (inv, mut streams) = synthetic_image();
        let mut short = inv.clone();
        short.plugins[0].records = 4;
        let e = describe(&short, &mut opener(streams.clone())).unwrap_err();
        assert_eq!(
            e.to_string(),
            "stream 1 has 3 records, the inventory says 4: the image is truncated"
        );

        let mut missing = streams.clone();
        missing.remove(&2);
        let e = describe(&inv, &mut opener(missing)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "stream 2 of plugin threads cannot be opened: stream-2.img: no such file"
        );

        if let Some(s) = streams.get_mut(&1) {
            let last = s.len() - 1;
            s[last] ^= 1; // inside a raw payload that describe does not keep
        }
        let e = describe(&inv, &mut opener(streams)).unwrap_err();
        assert!(
            matches!(e, ImageError::Checksum { stream: 1, ref kind, .. } if kind == "pages"),
            "{e}"
        );
    }

    #[test]
    fn utc_time_is_civil() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29 00:00:00.000 UTC");
        assert_eq!(utc_time(1_714_564_800_123), "2024-05-01 12:00:00.123 UTC");
    }
}
