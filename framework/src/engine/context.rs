//! The process context of the external execution context: what a plugin may do to the
//! target, served by the tracer. Also the record sink and source that frame a
//! subsystem's records onto its medium stream.

use std::collections::HashMap;

use abi_stable::std_types::{ROption, RResult, RSlice, RSliceMut, RStr, RString, RVec};
use ferry_plugin_api::{
    MediumBox, MemRange, PResult, PluginError, ProcessContext, Record, RecordFormat, RecordSink,
    RecordSource, RseqConfig, SeccompFilter, SharedClaim, SyscallArgs,
};

use crate::{
    engine::pipeline::Pipeline,
    engine::watchdog::Watchdog,
    image::{self, Pull, RecordReader},
    kernel::dirty::DirtyTracker,
    kernel::tracer::Tracer,
};

/// What the memory plugin leaves to post-copy on the destination.
#[derive(Debug, Default, Clone)]
pub struct LazyPlan {
    /// The areas registered (mapped, empty).
    pub areas: Vec<(u64, u64)>,
    /// The pages of them the source has.
    pub present: Vec<(u64, u64)>,
}

/// Shared resources of an event: the first process to claim one checkpoints it.
#[derive(Default)]
pub struct SharedTable {
    owners: HashMap<(String, String), i32>,
}

impl SharedTable {
    /// Marks resource `kind`/`id` as checkpointed by process `owner` (an earlier
    /// process of a tree), so that a plugin's claim here answers `Taken(owner)`.
    pub fn claimed_by(&mut self, kind: &str, id: &str, owner: i32) {
        self.owners.insert((kind.to_string(), id.to_string()), owner);
    }

    /// Whether some process claimed `kind`/`id`.
    pub fn is_claimed(&self, kind: &str, id: &str) -> bool {
        self.owners.contains_key(&(kind.to_string(), id.to_string()))
    }
}

/// The context handed to one plugin for one process.
pub struct ExternalContext<'a> {
    pub tracer: &'a mut Tracer,
    pub shared: &'a mut SharedTable,
    /// The plugin being served, for error messages.
    pub plugin: &'a str,
    /// Every call is a sign of life.
    pub watchdog: &'a Watchdog,
    /// Pre-copy's dirty-page tracking, when the event has it.
    pub dirty: Option<&'a mut DirtyTracker>,
    /// Post-copy, source: private anonymous memory moves after the resume.
    pub lazy: bool,
    /// Post-copy, destination: what the memory plugin leaves to post-copy.
    pub lazy_plan: Option<&'a mut LazyPlan>,
}

impl<'a> ExternalContext<'a> {
    pub fn new(tracer: &'a mut Tracer, shared: &'a mut SharedTable, plugin: &'a str, watchdog: &'a Watchdog) -> Self {
        ExternalContext { tracer, shared, plugin, watchdog, dirty: None, lazy: false, lazy_plan: None }
    }

    fn alive(&self) {
        self.watchdog.beat();
    }

    fn fail<T>(&self, message: impl std::fmt::Display) -> PResult<T> {
        RResult::RErr(PluginError::new(self.plugin, message))
    }

    fn lift<T, E: std::fmt::Display>(&self, r: Result<T, E>) -> PResult<T> {
        match r {
            Ok(v) => RResult::ROk(v),
            Err(e) => self.fail(e),
        }
    }
}

fn ranges(r: &[MemRange]) -> Vec<(u64, u64)> {
    r.iter().map(|m| (m.addr, m.len)).collect()
}

impl ProcessContext for ExternalContext<'_> {
    fn pid(&self) -> i32 {
        self.tracer.pid()
    }

    fn tids(&self) -> RVec<i32> {
        self.tracer.tids().into()
    }

    fn read_memory(&mut self, addr: u64, mut buf: RSliceMut<'_, u8>) -> PResult<usize> {
        self.alive();
        let len = buf.len() as u64;
        let r = self.tracer.read_ranges(&[(addr, len)], buf.as_mut_slice());
        self.lift(r)
    }

    fn read_memory_ranges(&mut self, r: RSlice<'_, MemRange>, mut buf: RSliceMut<'_, u8>) -> PResult<usize> {
        self.alive();
        let r = self.tracer.read_ranges(&ranges(r.as_slice()), buf.as_mut_slice());
        self.lift(r)
    }

    fn write_memory(&mut self, addr: u64, data: RSlice<'_, u8>) -> PResult<usize> {
        self.alive();
        // /proc/PID/mem also writes pages the target may only read (code, relro).
        let r = self.tracer.poke(addr, data.as_slice()).map(|_| data.len());
        self.lift(r)
    }

    fn write_memory_ranges(&mut self, r: RSlice<'_, MemRange>, data: RSlice<'_, u8>) -> PResult<usize> {
        self.alive();
        let r = self.tracer.write_ranges(&ranges(r.as_slice()), data.as_slice());
        self.lift(r)
    }

    fn scratch(&self) -> MemRange {
        let (addr, len) = self.tracer.scratch_args().unwrap_or((0, 0));
        MemRange { addr, len }
    }

    fn fetch_fd(&mut self, fd: i32) -> PResult<i32> {
        self.alive();
        let pid = self.tracer.pid();
        // SAFETY: plain system calls with integer arguments; the pidfd is closed below.
        let r = unsafe {
            let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
            if pidfd < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                let got = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
                let e = std::io::Error::last_os_error();
                libc::close(pidfd);
                if got < 0 { Err(e) } else { Ok(got) }
            }
        };
        let r = r.map_err(|e| format!("pidfd_getfd of fd {fd} of process {pid}: {e}"));
        self.lift(r)
    }

    fn inject_syscall(&mut self, tid: i32, nr: i64, args: SyscallArgs) -> PResult<i64> {
        self.alive();
        let r = self.tracer.inject(tid, nr, args.0);
        self.lift(r)
    }

    fn get_regset(&mut self, tid: i32, regset: u32) -> PResult<RVec<u8>> {
        self.alive();
        let r = self.tracer.get_regset(tid, regset).map(RVec::from);
        self.lift(r)
    }

    fn set_regset(&mut self, tid: i32, regset: u32, data: RSlice<'_, u8>) -> PResult<()> {
        self.alive();
        let r = self.tracer.set_regset(tid, regset, data.as_slice());
        self.lift(r)
    }

    fn proc_read(&mut self, name: RStr<'_>) -> PResult<RVec<u8>> {
        self.alive();
        let r = proc_file(self.tracer.pid(), name.as_str());
        self.lift(r)
    }

    fn claim_shared(&mut self, kind: RStr<'_>, id: RStr<'_>) -> SharedClaim {
        let pid = self.tracer.pid();
        match self.shared.owners.entry((kind.to_string(), id.to_string())) {
            std::collections::hash_map::Entry::Occupied(o) if *o.get() != pid => SharedClaim::Taken(*o.get()),
            std::collections::hash_map::Entry::Occupied(_) => SharedClaim::First,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(pid);
                SharedClaim::First
            }
        }
    }

    fn peer_command(&mut self, _cmd: RSlice<'_, u8>) -> PResult<RVec<u8>> {
        self.fail("this event has no peer (checkpoint to an image)")
    }

    fn rseq_config(&mut self, tid: i32) -> PResult<RseqConfig> {
        let r = self.tracer.rseq_config(tid);
        self.lift(r)
    }

    fn peek_siginfo(&mut self, tid: i32, shared: bool) -> PResult<RVec<u8>> {
        let r = self.tracer.peek_siginfo(tid, shared).map(RVec::from);
        self.lift(r)
    }

    fn dirty_track(&mut self, ranges: RSlice<'_, MemRange>) -> PResult<RVec<MemRange>> {
        self.alive();
        let r = dirty_track(self.dirty.as_deref_mut(), ranges.as_slice());
        self.lift(r)
    }

    fn dirty_scan(&mut self, range: MemRange) -> PResult<RVec<MemRange>> {
        self.alive();
        let r = dirty_scan(self.dirty.as_deref_mut(), range);
        self.lift(r)
    }

    fn lazy(&self) -> bool {
        self.lazy
    }

    fn lazy_pages(&mut self, areas: RSlice<'_, MemRange>, present: RSlice<'_, MemRange>) -> PResult<()> {
        let Some(plan) = self.lazy_plan.as_deref_mut() else {
            return self.fail("this event moves no memory after resume");
        };
        let spans = |r: &[MemRange]| r.iter().map(|m| (m.addr, m.addr + m.len)).collect::<Vec<_>>();
        plan.areas.extend(spans(areas.as_slice()));
        plan.present.extend(spans(present.as_slice()));
        RResult::ROk(())
    }

    fn seccomp_filters(&mut self, tid: i32) -> PResult<RVec<SeccompFilter>> {
        self.alive();
        let r = self.tracer.seccomp_filters(tid).map(RVec::from);
        self.lift(r)
    }

    fn own_fds(&self) -> RVec<i32> {
        self.tracer.agent_fd().into_iter().collect()
    }

    fn plugin_param(&self, plugin: RStr<'_>, key: RStr<'_>) -> ROption<RString> {
        crate::engine::params::get(plugin.as_str(), key.as_str()).map(RString::from).into()
    }
}

/// `/proc/<pid>/<name>`, refusing a name that leaves the process's directory.
fn proc_file(pid: i32, name: &str) -> Result<RVec<u8>, String> {
    if name.starts_with('/') || name.split('/').any(|c| c == "..") {
        return Err(format!("/proc path {name:?} leaves the process's directory"));
    }
    let path = format!("/proc/{pid}/{name}");
    std::fs::read(&path).map(RVec::from).map_err(|e| format!("{path}: {e}"))
}

const NO_TRACKING: &str = "this event tracks no dirty pages (strategy stop-copy)";

fn dirty_track(tracker: Option<&mut DirtyTracker>, ranges: &[MemRange]) -> Result<RVec<MemRange>, String> {
    let tracker = tracker.ok_or(NO_TRACKING)?;
    // A range the process tracks itself is left out, not an error: it goes at the freeze.
    Ok(ranges.iter().filter(|r| tracker.track(r.addr, r.addr + r.len).is_ok()).copied().collect())
}

fn dirty_scan(tracker: Option<&mut DirtyTracker>, range: MemRange) -> Result<RVec<MemRange>, String> {
    let tracker = tracker.ok_or(NO_TRACKING)?;
    let runs = tracker.scan_range(range.addr, range.addr + range.len)?;
    Ok(runs.into_iter().map(|(s, e)| MemRange { addr: s, len: e - s }).collect())
}

/// The context of a pre-copy round: the process runs, untraced. Plugins may read its
/// memory and `/proc` files and use dirty tracking; anything that needs the process
/// stopped is refused.
pub struct LiveContext<'a> {
    pub pid: i32,
    /// ferry's scratch area, mapped in the process for the whole event.
    pub scratch: MemRange,
    pub plugin: &'a str,
    pub watchdog: &'a Watchdog,
    pub dirty: &'a mut DirtyTracker,
}

impl LiveContext<'_> {
    fn lift<T, E: std::fmt::Display>(&self, r: Result<T, E>) -> PResult<T> {
        self.watchdog.beat();
        match r {
            Ok(v) => RResult::ROk(v),
            Err(e) => RResult::RErr(PluginError::new(self.plugin, e)),
        }
    }

    fn running<T>(&self, what: &str) -> PResult<T> {
        self.lift(Err(format!("{what} needs the process stopped; a pre-copy round runs beside it")))
    }
}

impl ProcessContext for LiveContext<'_> {
    fn pid(&self) -> i32 {
        self.pid
    }

    fn tids(&self) -> RVec<i32> {
        crate::kernel::target::task_ids(self.pid).unwrap_or_default().into()
    }

    fn read_memory(&mut self, addr: u64, mut buf: RSliceMut<'_, u8>) -> PResult<usize> {
        let len = buf.len();
        let r = crate::kernel::tracer::vm_ranges(self.pid, &[(addr, len as u64)], buf.as_mut_ptr(), len, false);
        self.lift(r)
    }

    fn read_memory_ranges(&mut self, r: RSlice<'_, MemRange>, mut buf: RSliceMut<'_, u8>) -> PResult<usize> {
        let len = buf.len();
        let r = crate::kernel::tracer::vm_ranges(self.pid, &ranges(r.as_slice()), buf.as_mut_ptr(), len, false);
        self.lift(r)
    }

    fn write_memory(&mut self, _addr: u64, _data: RSlice<'_, u8>) -> PResult<usize> {
        self.running("writing memory")
    }

    fn write_memory_ranges(&mut self, _r: RSlice<'_, MemRange>, _data: RSlice<'_, u8>) -> PResult<usize> {
        self.running("writing memory")
    }

    fn scratch(&self) -> MemRange {
        self.scratch
    }

    fn fetch_fd(&mut self, _fd: i32) -> PResult<i32> {
        self.running("fetching a file descriptor")
    }

    fn inject_syscall(&mut self, _tid: i32, _nr: i64, _args: SyscallArgs) -> PResult<i64> {
        self.running("a system call in the process")
    }

    fn get_regset(&mut self, _tid: i32, _regset: u32) -> PResult<RVec<u8>> {
        self.running("reading registers")
    }

    fn set_regset(&mut self, _tid: i32, _regset: u32, _data: RSlice<'_, u8>) -> PResult<()> {
        self.running("writing registers")
    }

    fn proc_read(&mut self, name: RStr<'_>) -> PResult<RVec<u8>> {
        let r = proc_file(self.pid, name.as_str());
        self.lift(r)
    }

    fn claim_shared(&mut self, _kind: RStr<'_>, _id: RStr<'_>) -> SharedClaim {
        SharedClaim::First
    }

    fn peer_command(&mut self, _cmd: RSlice<'_, u8>) -> PResult<RVec<u8>> {
        self.running("a command to the peer")
    }

    fn rseq_config(&mut self, _tid: i32) -> PResult<RseqConfig> {
        self.running("reading rseq")
    }

    fn peek_siginfo(&mut self, _tid: i32, _shared: bool) -> PResult<RVec<u8>> {
        self.running("reading pending signals")
    }

    fn dirty_track(&mut self, ranges: RSlice<'_, MemRange>) -> PResult<RVec<MemRange>> {
        let r = dirty_track(Some(&mut *self.dirty), ranges.as_slice());
        self.lift(r)
    }

    fn dirty_scan(&mut self, range: MemRange) -> PResult<RVec<MemRange>> {
        let r = dirty_scan(Some(&mut *self.dirty), range);
        self.lift(r)
    }

    fn plugin_param(&self, plugin: RStr<'_>, key: RStr<'_>) -> ROption<RString> {
        crate::engine::params::get(plugin.as_str(), key.as_str()).map(RString::from).into()
    }
}

/// Frames a subsystem's records onto one stream of the medium.
pub struct StreamSink<'a> {
    pub medium: &'a mut Pipeline,
    pub watchdog: &'a Watchdog,
    pub stream: u32,
    pub plugin: &'a str,
    pub records: u64,
    pub bytes: u64,
    /// Payload bytes of raw `pages` records, for the statistics.
    pub page_bytes: u64,
}

impl<'a> StreamSink<'a> {
    pub fn new(medium: &'a mut Pipeline, stream: u32, plugin: &'a str, watchdog: &'a Watchdog) -> Self {
        StreamSink { medium, watchdog, stream, plugin, records: 0, bytes: 0, page_bytes: 0 }
    }
}

impl RecordSink for StreamSink<'_> {
    fn put(&mut self, kind: RStr<'_>, format: RecordFormat, payload: RSlice<'_, u8>) -> PResult<()> {
        self.watchdog.beat();
        let header = match image::frame_header(kind.as_str(), format, payload.as_slice()) {
            Ok(h) => h,
            Err(e) => return RResult::RErr(PluginError::new(self.plugin, e)),
        };
        // Queued for the writer thread: the plugin goes on reading while it writes.
        let pushed = self.medium.push(self.stream, &header).and_then(|_| self.medium.push(self.stream, &payload));
        if let Err(e) = pushed {
            return RResult::RErr(PluginError::new(self.plugin, format!("writing the image: {e}")));
        }
        self.records += 1;
        self.bytes += (header.len() + payload.len()) as u64;
        if format == RecordFormat::Raw && kind.as_str() == "pages" {
            self.page_bytes += payload.len() as u64;
        }
        RResult::ROk(())
    }
}

/// Pulls one stream of a medium.
pub struct MediumPull<'a> {
    pub medium: &'a mut MediumBox,
    pub stream: u32,
}

impl Pull for MediumPull<'_> {
    fn pull(&mut self, buf: &mut [u8]) -> Result<usize, String> {
        self.medium
            .popdata(self.stream, RSliceMut::from_mut_slice(buf))
            .into_result()
            .map_err(|e| e.to_string())
    }
}

/// A pull that counts the bytes it hands over: the inventory's, which a rebuild counts
/// in its statistics as the checkpoint counted them when it wrote them.
pub struct CountingPull<'a, P> {
    pub inner: P,
    pub bytes: &'a mut u64,
}

impl<P: Pull> Pull for CountingPull<'_, P> {
    fn pull(&mut self, buf: &mut [u8]) -> Result<usize, String> {
        let n = self.inner.pull(buf)?;
        *self.bytes += n as u64;
        Ok(n)
    }
}

/// Hands a subsystem its records back, checked.
pub struct StreamSource<'a> {
    pub reader: RecordReader<MediumPull<'a>>,
    pub watchdog: &'a Watchdog,
    pub plugin: &'a str,
    pub page_bytes: u64,
}

impl RecordSource for StreamSource<'_> {
    fn next(&mut self) -> PResult<abi_stable::std_types::ROption<Record>> {
        self.watchdog.beat();
        let mut read = self.reader.next();
        // The end of a pre-copy round: tell the source this side has caught up.
        while let Ok(Some(r)) = &read {
            if r.kind != crate::wire::messages::SYNC_KIND {
                break;
            }
            let stream = self.reader.stream();
            let round = serde_json::from_slice::<serde_json::Value>(&r.payload).ok().and_then(|v| v["round"].as_u64());
            let answered = match round {
                Some(round) => crate::wire::messages::send_json(self.reader.source_mut().medium, crate::wire::messages::synced(stream, round)),
                None => Err("a malformed pre-copy sync record".to_string()),
            };
            if let Err(e) = answered {
                return RResult::RErr(PluginError::new(self.plugin, e));
            }
            read = self.reader.next();
        }
        match read {
            Ok(Some(r)) => {
                if r.format == RecordFormat::Raw && r.kind == "pages" {
                    self.page_bytes += r.payload.len() as u64;
                    if self.page_bytes > 1 << 20 {
                        crate::fault::point("mid-pages");
                    }
                }
                RResult::ROk(abi_stable::std_types::ROption::RSome(Record {
                    kind: r.kind.into(),
                    format: r.format,
                    payload: r.payload.into(),
                }))
            }
            Ok(None) => RResult::ROk(abi_stable::std_types::ROption::RNone),
            Err(e) => RResult::RErr(PluginError::new(self.plugin, e)),
        }
    }
}
