//! The `file` transfer medium: lays an image out as a directory with one file per
//! stream (`stream-<id>.img`), written through large buffers so that page-sized pushes
//! and pops never cost a system call each; `flush` makes the image durable (fsync).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ferry_plugin_api::util::{parse_object, reject_unknown_keys, required};
use ferry_plugin_api::plugin::MediumPlugin;
use serde_json::{json, Map, Value};

/// Buffer of a stream opened before any `buffer` command: big enough that a stream of
/// 4 KiB pages costs one system call per 256 pages.
const DEFAULT_BUFFER: usize = 1 << 20;
const MIN_BUFFER: u64 = 4 << 10;
const MAX_BUFFER: u64 = 256 << 20;

const PARAMS_FORMAT: &str = r#"{"role":"write"|"read","dir":"/path"}"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Write,
    Read,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Write => "write",
            Role::Read => "read",
        }
    }
}

/// A stream file being written: small pushes (record headers, metadata) gather in
/// `pending`; a large one goes out together with them in one `writev`, never copied.
struct Writer {
    path: PathBuf,
    file: File,
    pending: Vec<u8>,
    /// When `pending` is written out on its own.
    capacity: usize,
    /// Bytes pushed, buffered ones included: what `stream_len` answers in write role.
    len: u64,
    /// Pushed since the last fsync, so `flush` only syncs files that changed.
    dirty: bool,
    /// Set after a failed write or fsync: the file then holds an unknown prefix (and a
    /// retried fsync can falsely succeed), so the stream must not be used any more.
    failed: Option<String>,
}

/// Pushes at least this big are written straight from the caller's buffer.
const LARGE_PUSH: usize = 64 << 10;

impl Writer {
    /// Appends `data` (an empty push writes out what gathered).
    fn push(&mut self, data: &[u8]) -> io::Result<()> {
        if !data.is_empty() && data.len() < LARGE_PUSH && self.pending.len() + data.len() <= self.capacity {
            self.pending.extend_from_slice(data);
            return Ok(());
        }
        let mut parts = [io::IoSlice::new(&self.pending), io::IoSlice::new(data)];
        let mut slices: &mut [io::IoSlice<'_>] = &mut parts;
        io::IoSlice::advance_slices(&mut slices, 0);
        while !slices.is_empty() {
            match self.file.write_vectored(slices) {
                Ok(0) => return Err(io::Error::new(ErrorKind::WriteZero, "the file took no more bytes")),
                Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.pending.clear();
        Ok(())
    }
}

struct Reader {
    path: PathBuf,
    input: BufReader<File>,
}

/// An image directory opened for writing or for reading.
pub struct FileMedium {
    dir: PathBuf,
    role: Role,
    /// Buffer size for streams opened from now on (the `buffer` command).
    buffer: usize,
    writers: BTreeMap<u32, Writer>,
    readers: BTreeMap<u32, Reader>,
    /// Directories whose entries changed (a stream file or a subdirectory was
    /// created in them) since the last flush: fsyncing a file does not make its name
    /// durable, fsyncing the directory holding it does.
    dirs_to_sync: BTreeSet<PathBuf>,
}

fn stream_file_name(stream: u32) -> String {
    format!("stream-{stream}.img")
}

/// The stream id of a file name of the image, if it is one. Only the canonical
/// spelling counts, so `stream-03.img` cannot alias stream 3.
fn parse_stream_file_name(name: &str) -> Option<u32> {
    let id: u32 = name.strip_prefix("stream-")?.strip_suffix(".img")?.parse().ok()?;
    (stream_file_name(id) == name).then_some(id)
}

fn as_u64(value: &Value, key: &str, what: &str) -> Result<u64, String> {
    value
        .as_u64()
        .ok_or_else(|| format!("key \"{key}\" in {what} must be a non-negative integer, got {value}"))
}

/// Creates `dir` (and missing ancestors, owner-only since an image holds process
/// memory) and answers the directories whose entries changed, for the next flush.
fn create_image_dir(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut created = Vec::new();
    let mut p = Some(dir);
    while let Some(d) = p.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        created.push(d.to_path_buf());
        p = d.parent();
    }
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create image directory {}: {e}", dir.display()))?;
    if !dir.is_dir() {
        return Err(format!("image path {} is not a directory", dir.display()));
    }
    // A relative path with one component has the empty path as parent: that is ".".
    Ok(created
        .iter()
        .map(|d| match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .collect())
}

fn missing(stream: u32, path: &Path) -> String {
    format!("stream {stream} is missing: {}", path.display())
}

fn fsync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("cannot fsync directory {}: {e}", dir.display()))
}

/// What a file that is not a regular file is, for an error line.
fn file_kind(t: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

/// Reads until `buf` is full or the file ends, so callers get whole records rather
/// than whatever one read happened to return.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match input.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl FileMedium {
    /// Opens an image directory with JSON parameters `{"role":"write"|"read","dir":"/path"}`.
    pub fn open(params: &str) -> Result<FileMedium, String> {
        let what = "params";
        let map = parse_object(params, what, PARAMS_FORMAT)?;
        reject_unknown_keys(&map, &["role", "dir"], what)?;
        let role = match required(&map, "role", what)? {
            Value::String(s) if s == "write" => Role::Write,
            Value::String(s) if s == "read" => Role::Read,
            other => {
                return Err(format!("key \"role\" in params must be \"write\" or \"read\", got {other}"))
            }
        };
        let dir = match required(&map, "dir", what)? {
            Value::String(s) if !s.is_empty() => PathBuf::from(s),
            other => {
                return Err(format!("key \"dir\" in params must be a non-empty path string, got {other}"))
            }
        };
        let mut dirs_to_sync = BTreeSet::new();
        match role {
            Role::Write => dirs_to_sync.extend(create_image_dir(&dir)?),
            // Checked now rather than at the first pop, so a mistyped path is reported
            // as such instead of as a missing stream.
            Role::Read => match fs::metadata(&dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(format!("image path {} is not a directory", dir.display())),
                Err(e) => {
                    return Err(format!("cannot open image directory {} for reading: {e}", dir.display()))
                }
            },
        }
        Ok(FileMedium {
            dir,
            role,
            buffer: DEFAULT_BUFFER,
            writers: BTreeMap::new(),
            readers: BTreeMap::new(),
            dirs_to_sync,
        })
    }

    fn stream_path(&self, stream: u32) -> PathBuf {
        self.dir.join(stream_file_name(stream))
    }

    fn wrong_role(&self, action: &str, stream: u32) -> String {
        format!(
            "cannot {action} stream {stream}: {} was opened with role \"{}\"",
            self.dir.display(),
            self.role.as_str()
        )
    }

    fn writer(&mut self, stream: u32) -> Result<&mut Writer, String> {
        if !self.writers.contains_key(&stream) {
            let path = self.stream_path(stream);
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| format!("cannot create stream {stream} file {}: {e}", path.display()))?;
            self.dirs_to_sync.insert(self.dir.clone());
            let pending = Vec::with_capacity(self.buffer.min(LARGE_PUSH));
            // A new (empty) file is dirty too: flush must make its name and length durable.
            self.writers.insert(stream, Writer { path, file, pending, capacity: self.buffer, len: 0, dirty: true, failed: None });
        }
        self.writers
            .get_mut(&stream)
            .ok_or_else(|| format!("internal error: stream {stream} writer vanished"))
    }

    fn reader(&mut self, stream: u32) -> Result<&mut Reader, String> {
        if !self.readers.contains_key(&stream) {
            let path = self.stream_path(stream);
            // Only a regular file is a stream: a FIFO would block the reader forever, a
            // link could lead anywhere. O_NONBLOCK keeps the open itself from waiting.
            let file = match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == ErrorKind::NotFound => return Err(missing(stream, &path)),
                Err(e) => {
                    return Err(format!("cannot open stream {stream} file {} for reading: {e}", path.display()))
                }
            };
            match file.metadata() {
                Ok(m) if m.is_file() => {}
                Ok(m) => {
                    return Err(format!(
                        "stream {stream} file {} is not a regular file ({}): refusing to read it",
                        path.display(),
                        file_kind(&m.file_type())
                    ))
                }
                Err(e) => return Err(format!("cannot stat stream {stream} file {}: {e}", path.display())),
            }
            // Reads block as usual from here (a regular file never waits anyway).
            // SAFETY: F_SETFL on an fd we own.
            unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_SETFL, 0) };
            let input = BufReader::with_capacity(self.buffer, file);
            self.readers.insert(stream, Reader { path, input });
        }
        self.readers
            .get_mut(&stream)
            .ok_or_else(|| format!("internal error: stream {stream} reader vanished"))
    }

    fn streams(&self) -> Result<Vec<u32>, String> {
        if self.role == Role::Write {
            return Ok(self.writers.keys().copied().collect());
        }
        let listing_error = |e: io::Error| format!("cannot list image directory {}: {e}", self.dir.display());
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(listing_error)? {
            let entry = entry.map_err(listing_error)?;
            if let Some(id) = entry.file_name().to_str().and_then(parse_stream_file_name) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    fn stream_len(&self, stream: u32) -> Result<u64, String> {
        match self.role {
            Role::Write => self.writers.get(&stream).map(|w| w.len).ok_or_else(|| {
                format!("stream {stream} has not been written to {}", self.dir.display())
            }),
            Role::Read => {
                let path = self.stream_path(stream);
                match fs::metadata(&path) {
                    Ok(m) => Ok(m.len()),
                    Err(e) if e.kind() == ErrorKind::NotFound => Err(missing(stream, &path)),
                    Err(e) => Err(format!("cannot read the size of stream {stream} file {}: {e}", path.display())),
                }
            }
        }
    }

    fn stream_arg(map: &Map<String, Value>, what: &str) -> Result<u32, String> {
        let n = as_u64(required(map, "stream", what)?, "stream", what)?;
        u32::try_from(n).map_err(|_| format!("key \"stream\" in {what} is out of range: {n} (max {})", u32::MAX))
    }
}

impl MediumPlugin for FileMedium {
    fn pushdata(&mut self, stream: u32, data: &[u8]) -> Result<(), String> {
        if self.role != Role::Write {
            return Err(self.wrong_role("push to", stream));
        }
        let w = self.writer(stream)?;
        if let Some(e) = &w.failed {
            return Err(format!("stream {stream} file {} failed earlier and is unusable: {e}", w.path.display()));
        }
        // Small pushes gather; a large one leaves with them in one writev(2): one system
        // call per record of pages, and its bytes are never copied in user space.
        if let Err(e) = w.push(data) {
            let msg = format!("cannot write {} bytes to stream {stream} file {}: {e}", data.len(), w.path.display());
            w.failed = Some(msg.clone());
            return Err(msg);
        }
        w.len += data.len() as u64;
        w.dirty = true;
        Ok(())
    }

    fn popdata(&mut self, stream: u32, buf: &mut [u8]) -> Result<usize, String> {
        if self.role != Role::Read {
            return Err(self.wrong_role("pop from", stream));
        }
        let r = self.reader(stream)?;
        // At the end of the file this answers 0 each time, and whatever a writer
        // appends and flushes later is read by the next call.
        read_full(&mut r.input, buf)
            .map_err(|e| format!("cannot read stream {stream} file {}: {e}", r.path.display()))
    }

    fn command(&mut self, cmd: &str) -> Result<String, String> {
        let what = "command";
        let map = parse_object(cmd, what, r#"{"op":"streams"|"stream_len"|"buffer"|"info",...}"#)?;
        let op = match required(&map, "op", what)? {
            Value::String(s) => s.as_str(),
            other => return Err(format!("key \"op\" in command must be a string, got {other}")),
        };
        let reply = match op {
            "streams" => {
                reject_unknown_keys(&map, &["op"], "command \"streams\"")?;
                json!({ "streams": self.streams()? })
            }
            "stream_len" => {
                let what = "command \"stream_len\"";
                reject_unknown_keys(&map, &["op", "stream"], what)?;
                let stream = Self::stream_arg(&map, what)?;
                json!({ "bytes": self.stream_len(stream)? })
            }
            "buffer" => {
                let what = "command \"buffer\"";
                reject_unknown_keys(&map, &["op", "bytes"], what)?;
                let bytes = as_u64(required(&map, "bytes", what)?, "bytes", what)?;
                if !(MIN_BUFFER..=MAX_BUFFER).contains(&bytes) {
                    return Err(format!(
                        "buffer size {bytes} is out of range: it must be from {MIN_BUFFER} (4 KiB) to {MAX_BUFFER} (256 MiB) bytes"
                    ));
                }
                // In range, so it fits usize even on 32-bit targets.
                self.buffer = bytes as usize;
                json!({ "ok": true })
            }
            "info" => {
                reject_unknown_keys(&map, &["op"], "command \"info\"")?;
                json!({
                    "medium": "file",
                    "dir": self.dir.to_string_lossy(),
                    "role": self.role.as_str(),
                })
            }
            other => {
                return Err(format!(
                    "unknown op \"{other}\" (known ops: \"streams\", \"stream_len\", \"buffer\", \"info\")"
                ))
            }
        };
        Ok(reply.to_string())
    }

    fn flush(&mut self) -> Result<(), String> {
        // Every stream is tried even after one fails, so one bad file does not leave
        // the others unsynced; all failures are reported together.
        let mut errors = Vec::new();
        for (stream, w) in self.writers.iter_mut() {
            if let Some(e) = &w.failed {
                errors.push(format!("stream {stream} file {} failed earlier: {e}", w.path.display()));
                continue;
            }
            if !w.dirty {
                continue;
            }
            let result = w
                .push(&[])
                .map_err(|e| format!("cannot write stream {stream} file {}: {e}", w.path.display()))
                .and_then(|()| {
                    w.file
                        .sync_all()
                        .map_err(|e| format!("cannot fsync stream {stream} file {}: {e}", w.path.display()))
                });
            match result {
                Ok(()) => w.dirty = false,
                Err(e) => {
                    w.failed = Some(e.clone());
                    errors.push(e);
                }
            }
        }
        // Directories last: their entries must name files whose data is already durable.
        let dirs = std::mem::take(&mut self.dirs_to_sync);
        for dir in dirs {
            if let Err(e) = fsync_dir(&dir) {
                errors.push(e);
                self.dirs_to_sync.insert(dir);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!("flush of {} failed: {}", self.dir.display(), errors.join("; ")))
        }
    }
}

ferry_plugin_api::export_medium!(
    "file",
    "Image directory: one file per stream, fsynced on flush",
    |params: &str| FileMedium::open(params)
);

#[cfg(test)]
mod tests;
