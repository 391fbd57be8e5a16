//! Records: framing them for a stream, and reading them back without trusting a length or a count.

use super::*;

pub(super) fn check_kind(kind: &str) -> Result<(), String> {
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

pub(super) fn check_frame(kind: &str, len: u64) -> Result<(), ImageError> {
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
pub(super) fn fill<P: Pull + ?Sized>(src: &mut P, buf: &mut [u8]) -> Result<usize, String> {
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
pub(super) fn pull_bounded<P: Pull + ?Sized>(
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
pub(super) struct ReadRecord {
    pub(super) rec: RecordOwned,
    pub(super) at: u64,
    pub(super) payload_len: u64,
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

    pub(super) fn read(&mut self, keep_raw: bool) -> Result<Option<ReadRecord>, ImageError> {
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
