//! For plugin unit tests: memory standing in for a target process's, so a mock
//! `ProcessContext` only has to supply the kernel's side (system calls, registers).

use std::ops::Range;

use abi_stable::std_types::RResult;

use crate::{PResult, PluginError};

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
