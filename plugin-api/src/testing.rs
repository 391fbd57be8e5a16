//! For plugin unit tests: memory standing in for a target process's, so a mock
//! `ProcessContext` only has to supply the kernel's side (system calls, registers);
//! and records kept in memory, a sink for a checkpoint and a source for its restart.

use std::ops::Range;

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{ROption, RResult, RSlice, RStr},
};

use crate::{
    plugin::SubsystemPlugin, ContextRef, PResult, PluginError, ProcessContext, ProcessContext_TO, Progress, Record,
    RecordFormat, RecordSink, RecordSink_TO, RecordSource, RecordSource_TO, SinkRef, SourceRef,
};

/// Calls `plugin.checkpoint` against `ctx` until it is done (at most `steps` calls):
/// the records it put.
pub fn run_checkpoint<P: SubsystemPlugin, C: ProcessContext>(plugin: &mut P, ctx: &mut C, steps: usize) -> Result<Records, String> {
    let mut records = Records::default();
    let mut done = false;
    {
        let mut ctx: ContextRef<'_> = ProcessContext_TO::from_ptr(ctx, TD_Opaque);
        let mut sink: SinkRef<'_> = RecordSink_TO::from_ptr(&mut records, TD_Opaque);
        for _ in 0..steps {
            if plugin.checkpoint(&mut ctx, &mut sink)? == Progress::Done {
                done = true;
                break;
            }
        }
    }
    if done {
        Ok(records)
    } else {
        Err("checkpoint never finished".into())
    }
}

/// Calls `plugin.restart` against `ctx` on `records` (from the first) until it is done.
pub fn run_restart<P: SubsystemPlugin, C: ProcessContext>(plugin: &mut P, ctx: &mut C, mut records: Records, steps: usize) -> Result<(), String> {
    records.1 = 0;
    let mut ctx: ContextRef<'_> = ProcessContext_TO::from_ptr(ctx, TD_Opaque);
    let mut source: SourceRef<'_> = RecordSource_TO::from_ptr(&mut records, TD_Opaque);
    for _ in 0..steps {
        if plugin.restart(&mut ctx, &mut source)? == Progress::Done {
            return Ok(());
        }
    }
    Err("restart never finished".into())
}

/// The records a checkpoint put (`.0`), read back from `.1` on (set it to 0 to read
/// them again).
#[derive(Default)]
pub struct Records(pub Vec<Record>, pub usize);

impl RecordSink for Records {
    fn put(&mut self, kind: RStr<'_>, format: RecordFormat, payload: RSlice<'_, u8>) -> PResult<()> {
        self.0.push(Record { kind: kind.into(), format, payload: payload.to_vec().into() });
        RResult::ROk(())
    }
}

impl RecordSource for Records {
    fn next(&mut self) -> PResult<ROption<Record>> {
        let r = self.0.get(self.1).cloned();
        self.1 += 1;
        RResult::ROk(r.into())
    }
}

#[derive(Default)]
pub struct MockMemory {
    base: u64,
    bytes: Vec<u8>,
}

impl MockMemory {
    /// `len` zeroed bytes at address `base`.
    pub fn new(base: u64, len: usize) -> MockMemory {
        MockMemory { base, bytes: vec![0; len] }
    }

    fn range(&self, addr: u64, len: usize) -> Option<Range<usize>> {
        let off = usize::try_from(addr.checked_sub(self.base)?).ok()?;
        (off.checked_add(len)? <= self.bytes.len()).then_some(off..off + len)
    }

    /// The bytes at `addr` (a test bug if out of range).
    pub fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let r = self.range(addr, len).expect("read inside the mock's memory");
        self.bytes[r].to_vec()
    }

    /// Stores `data` at `addr` (a test bug if out of range).
    pub fn put(&mut self, addr: u64, data: &[u8]) {
        let r = self.range(addr, data.len()).expect("write inside the mock's memory");
        self.bytes[r].copy_from_slice(data);
    }

    /// `ProcessContext::read_memory`: EFAULT outside.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> PResult<usize> {
        match self.range(addr, buf.len()) {
            Some(r) => {
                buf.copy_from_slice(&self.bytes[r]);
                RResult::ROk(buf.len())
            }
            None => RResult::RErr(PluginError::new("mock", "EFAULT")),
        }
    }

    /// `ProcessContext::write_memory`: EFAULT outside.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> PResult<usize> {
        match self.range(addr, data.len()) {
            Some(r) => {
                self.bytes[r].copy_from_slice(data);
                RResult::ROk(data.len())
            }
            None => RResult::RErr(PluginError::new("mock", "EFAULT")),
        }
    }
}

/// Records from `data` in the plain framing of the fuzz targets: for each, a format
/// byte (0 JSON, else raw), a kind length byte, a 4-byte little-endian payload length,
/// the kind (lossily UTF-8), the payload; up to the first incomplete one. No checksum,
/// unlike an image's framing (fuzzed on its own): a fuzzer would never get past it to
/// the payloads, which are what a plugin decodes.
pub fn unframe(mut data: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    while data.len() >= 6 {
        let format = if data[0] == 0 { RecordFormat::Json } else { RecordFormat::Raw };
        let kind_len = data[1] as usize;
        let len = u32::from_le_bytes([data[2], data[3], data[4], data[5]]) as usize;
        let Some(rest) = data.get(6..).filter(|r| r.len() >= kind_len.saturating_add(len)) else { break };
        let kind = String::from_utf8_lossy(&rest[..kind_len]).into_owned();
        out.push(Record { kind: kind.into(), format, payload: rest[kind_len..kind_len + len].to_vec().into() });
        data = &rest[kind_len + len..];
    }
    out
}

/// Runs `f` on `records` as a restart's source reads them.
pub fn with_source<T>(records: Vec<Record>, f: impl FnOnce(&mut SourceRef<'_>) -> T) -> T {
    let mut records = Records(records, 0);
    let mut source: SourceRef<'_> = RecordSource_TO::from_ptr(&mut records, TD_Opaque);
    f(&mut source)
}

/// A plugin's decoder run on fuzz input `data` (see [`unframe`]).
pub fn fuzz_decode(data: &[u8], decode: impl FnOnce(&mut SourceRef<'_>) -> Result<(), String>) {
    let _ = with_source(unframe(data), decode);
}

#[cfg(test)]
mod fuzz_framing_tests {
    use super::*;

    #[test]
    fn unframe_reads_records_and_stops_at_an_incomplete_one() {
        let mut data = vec![0, 2, 2, 0, 0, 0];
        data.extend(b"mm{}");
        data.extend([1, 5, 3, 0, 0, 0]);
        data.extend(b"pagesabc");
        data.extend([1, 5, 9, 0, 0, 0]);
        data.extend(b"pagesabc");
        let r = unframe(&data);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].kind.as_str(), r[0].format, r[0].payload.as_slice()), ("mm", RecordFormat::Json, &b"{}"[..]));
        assert_eq!((r[1].kind.as_str(), r[1].format, r[1].payload.as_slice()), ("pages", RecordFormat::Raw, &b"abc"[..]));
        assert!(unframe(&[0, 255, 255, 255, 255, 255]).is_empty());
    }
}

/// Asserts that every seed in fuzz corpus directory `dir` (records of real checkpoints,
/// see scripts/fuzz-seeds) decodes with `decode`: the decoder a fuzz target runs reads
/// what a checkpoint writes.
pub fn assert_seeds_decode(dir: &str, decode: impl Fn(&mut SourceRef<'_>) -> Result<(), String>) {
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let path = entry.expect("a directory entry").path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Err(e) = with_source(unframe(&data), &decode) {
            panic!("{}: {e}", path.display());
        }
        seen += 1;
    }
    assert!(seen > 0, "{dir} holds no seed");
}
