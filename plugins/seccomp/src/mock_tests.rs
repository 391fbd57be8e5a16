//! Checkpoint and restore against a simulated kernel that keeps seccomp's rules: each
//! thread holds a chain of filter objects, a new thread's chain is its creator's, and
//! TSYNC gives every thread the caller's chain only where each thread's chain is an
//! ancestor of it (else it answers that thread's id). Checks that what threads share
//! comes back shared, what one thread holds comes back its own, in order and with its
//! flags, and that what cannot be carried fails in one line.

use std::collections::BTreeMap;

use ferry_plugin_api::{
    abi_stable::std_types::{RResult, RSlice, RSliceMut, RStr, RVec},
    testing::{run_checkpoint, run_restart, MockMemory},
    util::{FS_BASE, REGS_SIZE},
    MemRange, PResult, PluginError, ProcessContext, SeccompFilter, SyscallArgs,
};

use super::*;

const BASE: u64 = 0x10000;
const SCRATCH: usize = 64 * 1024;

struct Kernel {
    pid: i32,
    /// Per thread: its chain of filter ids (oldest first) and TLS base.
    tasks: BTreeMap<i32, (Vec<usize>, u64)>,
    /// Every filter object: program and flags as installed.
    filters: Vec<(Vec<u8>, u64)>,
    mem: MockMemory,
    /// Whether ferry holds the filters suspended.
    suspended: bool,
    /// Installs seen: (thread, flags).
    installs: Vec<(i32, u64)>,
}

impl Kernel {
    fn new(tids: &[i32]) -> Kernel {
        let tasks = tids.iter().map(|&t| (t, (Vec::new(), 0x7000 + t as u64))).collect();
        Kernel { pid: tids[0], tasks, filters: Vec::new(), mem: MockMemory::new(BASE, SCRATCH), suspended: true, installs: Vec::new() }
    }

    /// Thread `tid` installs `program` as the process itself would.
    fn install(&mut self, tid: i32, program: Vec<u8>, flags: u64) -> i64 {
        let chain = self.tasks[&tid].0.clone();
        if flags & FLAG_TSYNC != 0 {
            if let Some((&other, _)) = self.tasks.iter().find(|(_, (c, _))| !chain.starts_with(c)) {
                return other as i64;
            }
        }
        self.filters.push((program, flags & FLAG_LOG));
        let mut chain = chain;
        chain.push(self.filters.len() - 1);
        if flags & FLAG_TSYNC != 0 {
            self.tasks.values_mut().for_each(|t| t.0 = chain.clone());
        } else {
            self.tasks.get_mut(&tid).unwrap().0 = chain;
        }
        0
    }

    fn program(k: u32) -> Vec<u8> {
        [0x20u8, 0, 0, 0, 0, 0, 0, 0].into_iter().chain(0x06u16.to_le_bytes()).chain([0, 0]).chain(k.to_le_bytes()).collect()
    }
}

impl ProcessContext for Kernel {
    fn pid(&self) -> i32 {
        self.pid
    }
    fn tids(&self) -> RVec<i32> {
        let mut v: Vec<i32> = self.tasks.keys().copied().filter(|&t| t != self.pid).collect();
        v.insert(0, self.pid);
        v.into()
    }
    fn read_memory(&mut self, addr: u64, mut buf: RSliceMut<'_, u8>) -> PResult<usize> {
        self.mem.read(addr, &mut buf)
    }
    fn write_memory(&mut self, addr: u64, data: RSlice<'_, u8>) -> PResult<usize> {
        self.mem.write(addr, &data)
    }
    fn scratch(&self) -> MemRange {
        MemRange { addr: BASE, len: SCRATCH as u64 }
    }
    fn inject_syscall(&mut self, tid: i32, nr: i64, args: SyscallArgs) -> PResult<i64> {
        let a = args.0;
        if nr != libc::SYS_seccomp || a[0] != SECCOMP_SET_MODE_FILTER {
            return RResult::ROk(-(libc::ENOSYS as i64));
        }
        let fprog = self.mem.get(a[2], 16);
        let len = u16::from_le_bytes([fprog[0], fprog[1]]) as usize;
        let at = u64::from_le_bytes(fprog[8..16].try_into().unwrap());
        let program = self.mem.get(at, len * 8);
        self.installs.push((tid, a[1]));
        RResult::ROk(self.install(tid, program, a[1]))
    }
    fn get_regset(&mut self, tid: i32, _regset: u32) -> PResult<RVec<u8>> {
        let mut regs = vec![0u8; REGS_SIZE];
        regs[FS_BASE * 8..FS_BASE * 8 + 8].copy_from_slice(&self.tasks[&tid].1.to_le_bytes());
        RResult::ROk(regs.into())
    }
    fn proc_read(&mut self, name: RStr<'_>) -> PResult<RVec<u8>> {
        let tid: i32 = name.as_str().trim_start_matches("task/").trim_end_matches("/status").parse().unwrap();
        let n = self.tasks[&tid].0.len();
        let text = format!("Name:\tmock\nSeccomp:\t{}\nSeccomp_filters:\t{n}\nSpeculation_Store_Bypass:\tvulnerable\n", if n > 0 { 2 } else { 0 });
        RResult::ROk(text.into_bytes().into())
    }
    fn seccomp_filters(&mut self, tid: i32) -> PResult<RVec<SeccompFilter>> {
        if !self.suspended {
            return RResult::RErr(PluginError::new("mock", "ferry could not suspend seccomp in this process"));
        }
        let chain = &self.tasks[&tid].0;
        RResult::ROk(chain.iter().map(|&i| SeccompFilter { program: self.filters[i].0.clone().into(), flags: self.filters[i].1 }).collect())
    }
}

/// Main thread 10 and threads 11, 12: the first filter shared by all (TSYNC, LOG), a
/// second in thread 11 alone.
fn sandboxed() -> Kernel {
    let mut k = Kernel::new(&[10, 11, 12]);
    assert_eq!(k.install(10, Kernel::program(0x7fff_0000), FLAG_TSYNC | FLAG_LOG), 0);
    assert_eq!(k.install(11, Kernel::program(0x0005_0001), 0), 0);
    k
}

#[test]
fn shared_filters_come_back_shared_and_one_thread_s_its_own() {
    let mut source = sandboxed();
    let records = run_checkpoint(&mut Plugin::default(), &mut source, 1).unwrap();
    let mut child = Kernel::new(&[10, 11, 12]);
    run_restart(&mut Plugin::default(), &mut child, records, 1).unwrap();
    // One TSYNC from the main thread, with LOG and SPEC_ALLOW (not force-mitigated);
    // then thread 11's own.
    assert_eq!(child.installs, vec![(10, FLAG_TSYNC | FLAG_LOG | FLAG_SPEC_ALLOW), (11, FLAG_SPEC_ALLOW)]);
    assert_eq!(child.tasks[&10].0, vec![0]);
    assert_eq!(child.tasks[&11].0, vec![0, 1]);
    assert_eq!(child.tasks[&12].0, vec![0], "the first filter is one object of every thread");
    // As in the original, a later TSYNC from thread 11 reaches everyone.
    assert_eq!(child.install(11, Kernel::program(0x7fff_0000), FLAG_TSYNC), 0);
}

#[test]
fn what_cannot_be_carried_fails_in_one_line() {
    // A filter for a user-space supervisor.
    let mut source = Kernel::new(&[10]);
    source.install(10, Kernel::program(RET_USER_NOTIF), 0);
    let e = run_checkpoint(&mut Plugin::default(), &mut source, 1).err().expect("refused");
    assert!(e.contains("process 10 thread 10 seccomp filter 0: instruction 1") && e.contains("USER_NOTIF"), "{e}");

    // Two threads of three share a filter the third lacks.
    let mut source = Kernel::new(&[10, 11, 12]);
    source.install(10, Kernel::program(0x7fff_0000), 0);
    source.install(11, Kernel::program(0x7fff_0000), 0);
    let e = run_checkpoint(&mut Plugin::default(), &mut source, 1).err().expect("refused");
    assert!(e.contains("threads 10 and 11 share seccomp filter 0"), "{e}");

    // A restore child whose filters ferry could not suspend: nothing installed.
    let records = run_checkpoint(&mut Plugin::default(), &mut sandboxed(), 1).unwrap();
    let mut child = Kernel::new(&[10, 11, 12]);
    child.suspended = false;
    let e = run_restart(&mut Plugin::default(), &mut child, records, 1).unwrap_err();
    assert!(e.contains("could not suspend seccomp"), "{e}");
    assert!(child.installs.is_empty());

    // A restore child that already has a filter (ferry itself under seccomp).
    let records = run_checkpoint(&mut Plugin::default(), &mut sandboxed(), 1).unwrap();
    let mut child = Kernel::new(&[10, 11, 12]);
    child.install(12, Kernel::program(0x7fff_0000), 0);
    let e = run_restart(&mut Plugin::default(), &mut child, records, 1).unwrap_err();
    assert!(e.contains("thread 12: the restore child already has 1 seccomp filters"), "{e}");
}

#[test]
fn a_process_without_filters_needs_nothing_of_the_kernel() {
    let mut source = Kernel::new(&[10, 11]);
    source.suspended = false;
    let records = run_checkpoint(&mut Plugin::default(), &mut source, 1).unwrap();
    let mut child = Kernel::new(&[10, 11]);
    child.suspended = false;
    run_restart(&mut Plugin::default(), &mut child, records, 1).unwrap();
    assert!(child.installs.is_empty());
}
