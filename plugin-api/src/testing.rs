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
