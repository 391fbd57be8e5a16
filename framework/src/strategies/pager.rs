//! Post-copy (the paper's "early event request"): the process resumes on the
//! destination before its private anonymous memory has arrived. The destination
//! registers those areas in a userfaultfd of the restored process (made there by an
//! injected call, held only by ferry) and fills them with `UFFDIO_COPY`: first the
//! window around each page fault, and between faults the rest in address order,
//! carrying on from the neighbourhood of the last fault. Which pages of the lazy areas
//! the source has is asked first thing after the resume (the freeze does not wait for
//! that scan); pages the source never had are zero-filled here without asking. The destination drives it all — it asks, with
//! `want` messages through the medium's `command`, and the source, which keeps its copy
//! of the process frozen, answers with the pages on [`LAZY_STREAM`] — so one thread on
//! each side does the work, and a page fault waits for at most one batch ahead of it.
//!
//! Once every page has arrived the destination says `lazy-done` (with its counts) and
//! the source removes its copy. The copy runs only once the source has given itself
//! up (`Verdict::Ready`, the commit point): if the connection or either side fails
//! after that, the copy is killed there (never left hanging on a fault) and the source
//! is killed here — the process is lost, and said to be; it never runs twice, so
//! nothing the copy did (ticks logged, bytes sent) is done again by the source.

use std::{
    collections::VecDeque,
    os::fd::{AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use abi_stable::std_types::{RSlice, RSliceMut};
use ferry_plugin_api::MediumBox;
use serde::{Deserialize, Serialize};

use crate::{
    engine::context::LazyPlan,
    engine::rebuild::Tended,
    kernel::tracer::vm_ranges,
    kernel::uffd::*,
    wire::messages::{recv_json, send_json},
};

/// The stream the pages travel on (above every plugin's).
pub const LAZY_STREAM: u32 = 1024;
const PAGE: u64 = 4096;
/// The most one `want` may ask for.
const MAX_WANT: u64 = 64 << 20;

/// What post-copy did, for the statistics.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct LazyStats {
    pub faults: u64,
    pub pages_faulted: u64,
    pub pages_pushed: u64,
    pub pages_zeroed: u64,
    /// From the release until the last page arrived.
    pub lazy_ms: f64,
}

/// Source: answers a `want` from the frozen process `pid`.
fn answer(medium: &mut MediumBox, pid: i32, msg: &serde_json::Value, buf: &mut Vec<u8>) -> Result<(), String> {
    let ranges = parse_ranges(&msg["ranges"])?;
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    buf.resize(total as usize, 0);
    let got = vm_ranges(pid, &ranges, buf.as_mut_ptr(), buf.len(), false).map_err(|e| e.to_string())?;
    if got != buf.len() {
        return Err(format!("read {got} of {total} bytes of process {pid}"));
    }
    // A small push waits in the medium until its next command, which is the wait for
    // the next message: no flush (whose acknowledgement the destination, done, may no
    // longer send).
    medium.pushdata(LAZY_STREAM, RSlice::from_slice(buf)).into_result().map_err(|e| e.to_string())
}

/// Source: answers a `present` question — which pages of the ranges the frozen process
/// `pid` has (present or swapped out, not the shared zero page) — on [`LAZY_STREAM`]:
/// a count, then that many (start, end) pairs, little-endian u64s.
fn answer_present(medium: &mut MediumBox, pid: i32, msg: &serde_json::Value) -> Result<(), String> {
    use ferry_plugin_api::pagemap::{self, Categories, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED};
    let list = msg["ranges"].as_array().ok_or("a present question without ranges")?;
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).map_err(|e| format!("pagemap of process {pid}: {e}"))?;
    let which = Categories { all: 0, none: PAGE_IS_PFNZERO, any: PAGE_IS_PRESENT | PAGE_IS_SWAPPED };
    let mut out = vec![0u8; 8];
    let mut count = 0u64;
    for r in list {
        let (Some(s), Some(e)) = (r[0].as_u64(), r[1].as_u64()) else { return Err(format!("a bad range in a present question: {r}")) };
        if s % PAGE != 0 || e % PAGE != 0 || s >= e {
            return Err(format!("a bad range in a present question: {s:#x}-{e:#x}"));
        }
        for (a, b) in pagemap::scan(&pagemap, s, e, 0, which).map_err(|e| format!("PAGEMAP_SCAN of process {pid}: {e}"))? {
            out.extend_from_slice(&a.to_le_bytes());
            out.extend_from_slice(&b.to_le_bytes());
            count += 1;
        }
    }
    out[..8].copy_from_slice(&count.to_le_bytes());
    medium.pushdata(LAZY_STREAM, RSlice::from_slice(&out)).into_result().map_err(|e| e.to_string())
}

/// `[[addr, len], …]`, page-aligned, bounded.
fn parse_ranges(v: &serde_json::Value) -> Result<Vec<(u64, u64)>, String> {
    let list = v.as_array().ok_or("a want without ranges")?;
    let mut out = Vec::with_capacity(list.len());
    let mut total = 0u64;
    for r in list {
        let (Some(a), Some(l)) = (r[0].as_u64(), r[1].as_u64()) else { return Err(format!("a bad range in a want: {r}")) };
        if a % PAGE != 0 || l == 0 || l % PAGE != 0 || a.checked_add(l).is_none() {
            return Err(format!("a bad range in a want: {a:#x} +{l}"));
        }
        total += l;
        if total > MAX_WANT {
            return Err("a want of more than 64 MiB".into());
        }
        out.push((a, l));
    }
    Ok(out)
}

/// Source: waits for the next message from the destination that is not a page
/// request, answering page requests from the frozen process `pid` meanwhile
/// (`resumed`: the destination's copy already runs).
pub fn serve_until_message(medium: &mut MediumBox, pid: i32, timeout: Duration, resumed: bool) -> Result<serde_json::Value, String> {
    serve_tree_until_message(medium, &[pid], timeout, resumed)
}

/// [`serve_until_message`] for a tree: a request names its process (`pid`), which must
/// be one of `pids` (the first when it names none).
pub fn serve_tree_until_message(medium: &mut MediumBox, pids: &[i32], timeout: Duration, resumed: bool) -> Result<serde_json::Value, String> {
    let mut buf = Vec::new();
    let mut answered = 0;
    loop {
        let msg = recv_json(medium, timeout)?;
        let pid = match msg["pid"].as_i64() {
            None => pids.first().copied().unwrap_or(0),
            Some(p) if pids.contains(&(p as i32)) => p as i32,
            Some(p) => return Err(format!("the destination asked for pages of process {p}, which this migration does not hold")),
        };
        match msg["type"].as_str() {
            Some("want") => answer(medium, pid, &msg, &mut buf)?,
            Some("present") => {
                answer_present(medium, pid, &msg)?;
                continue;
            }
            _ => return Ok(msg),
        }
        answered += 1;
        if resumed && answered == 3 {
            crate::fault::point("post-copy-mid");
            crate::fault::pause("post-copy-mid");
        }
    }
}

/// A run of pages still to come: where it is in the process now, and where it was on
/// the source (the process may move it with mremap before it arrives).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Run {
    at: u64,
    end: u64,
    src: u64,
}

/// Part of an answer on its way: `len` bytes for `at` in the process (from `src` on the
/// source), at offset `off` of the answer.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Piece {
    at: u64,
    len: u64,
    off: u64,
    src: u64,
}

/// What the userfaultfd reports.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Event {
    Fault(u64),
    /// mremap moved `len` bytes from `from` to `to`.
    Moved { from: u64, to: u64, len: u64 },
    /// Unmapped, or emptied (MADV_DONTNEED): what was there must not come back.
    Gone { start: u64, end: u64 },
}

/// `[at, at + len)` against `[lo, hi)`: the parts before, inside and after, as
/// (start, len).
fn split(at: u64, len: u64, lo: u64, hi: u64) -> [Option<(u64, u64)>; 3] {
    let end = at + len;
    let part = |s: u64, e: u64| (s < e).then(|| (s, e - s));
    [part(at, end.min(lo)), part(at.max(lo), end.min(hi)), part(at.max(hi), end)]
}

/// Runs after the process moved (`to`) or dropped (`None`) `[lo, hi)`.
fn follow_runs(runs: Vec<Run>, lo: u64, hi: u64, to: Option<u64>) -> Vec<Run> {
    let mut out = Vec::with_capacity(runs.len() + 2);
    for r in runs {
        let [before, inside, after] = split(r.at, r.end - r.at, lo, hi);
        for (s, l) in [before, after].into_iter().flatten() {
            out.push(Run { at: s, end: s + l, src: r.src + (s - r.at) });
        }
        if let (Some((s, l)), Some(t)) = (inside, to) {
            let at = t + (s - lo);
            out.push(Run { at, end: at + l, src: r.src + (s - r.at) });
        }
    }
    out.sort_by_key(|r| r.at);
    out
}

/// Destination: fills the lazy areas of a restored process.
pub struct Pager {
    pid: i32,
    uffd: OwnedFd,
    areas: Vec<(u64, u64)>,
    /// Present pages not asked for yet, in address order.
    todo: VecDeque<Run>,
    /// Requests sent and not answered yet, in order, each with its size and the pieces
    /// of its answer (the next batch is asked for before the last one is placed, so the
    /// source reads while this side copies).
    inflight: VecDeque<(u64, Vec<Piece>)>,
    /// Pages placed: a fault there raced with its copy and only needs a wake.
    placed: Vec<Run>,
    /// Children the process forked before every page was in, held stopped, with the
    /// pages that may be missing from their copy of its memory.
    children: Vec<(i32, Vec<Run>)>,
    /// The process on the source, named in every request (a tree's); none for a lone
    /// process.
    source: Option<i32>,
    window: u64,
    batch: u64,
    buf: Vec<u8>,
    pub stats: LazyStats,
}

const UFFD_EVENT_REMAP: u8 = 0x14;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const UFFD_EVENT_UNMAP: u8 = 0x16;

impl Pager {
    /// `uffd`: a userfaultfd of process `pid` with `LAZY_FEATURES` (see
    /// `Held::userfaultfd`).
    pub fn new(pid: i32, uffd: OwnedFd, plan: LazyPlan, window: u64, batch: u64) -> Pager {
        Pager {
            pid,
            uffd,
            areas: plan.areas,
            todo: plan.present.iter().map(|&(s, e)| Run { at: s, end: e, src: s }).collect(),
            inflight: VecDeque::new(),
            placed: Vec::new(),
            children: Vec::new(),
            source: None,
            window: window.max(PAGE) / PAGE * PAGE,
            batch: batch.max(PAGE) / PAGE * PAGE,
            buf: Vec::new(),
            stats: LazyStats::default(),
        }
    }

    /// A process of a tree: its requests name `pid`, its pid on the source.
    pub fn for_source(mut self, pid: i32) -> Pager {
        self.source = Some(pid);
        self
    }

    /// Children forked before this pager ran (a tree's pagers run in turn), to be given
    /// the pages they may miss, as those it sees fork.
    pub fn forked_earlier(&mut self, forked: Vec<i32>) {
        for child in forked {
            let runs = self.source_backed();
            self.children.push((child, runs));
        }
    }

    /// A request to the source, naming the process when it is a tree's.
    fn request(&self, mut msg: serde_json::Value) -> serde_json::Value {
        if let Some(pid) = self.source {
            msg["pid"] = pid.into();
        }
        msg
    }

    /// Takes `[lo, hi)` (process addresses) out of `todo`: the source ranges to ask
    /// for and where their bytes go.
    fn take(&mut self, lo: u64, hi: u64) -> (Vec<(u64, u64)>, Vec<Piece>) {
        let (mut want, mut pieces, mut off) = (Vec::new(), Vec::new(), 0);
        let mut kept = VecDeque::with_capacity(self.todo.len() + 1);
        for r in self.todo.drain(..) {
            let [before, inside, after] = split(r.at, r.end - r.at, lo, hi);
            for (s, l) in [before, after].into_iter().flatten() {
                kept.push_back(Run { at: s, end: s + l, src: r.src + (s - r.at) });
            }
            if let Some((s, l)) = inside {
                want.push((r.src + (s - r.at), l));
                pieces.push(Piece { at: s, len: l, off, src: r.src + (s - r.at) });
                off += l;
            }
        }
        kept.make_contiguous().sort_by_key(|r| r.at);
        self.todo = kept;
        (want, pieces)
    }

    /// Asks for `[lo, hi)` (as far as it is still to come).
    fn ask(&mut self, medium: &mut MediumBox, lo: u64, hi: u64) -> Result<u64, String> {
        let (want, pieces) = self.take(lo, hi);
        if want.is_empty() {
            return Ok(0);
        }
        let total: u64 = want.iter().map(|w| w.1).sum();
        let list: Vec<[u64; 2]> = want.iter().map(|&(s, l)| [s, l]).collect();
        send_json(medium, self.request(serde_json::json!({"type": "want", "ranges": list})))?;
        self.inflight.push_back((total, pieces));
        Ok(total / PAGE)
    }

    /// Reads `total` bytes of answer into the buffer.
    fn receive(&mut self, medium: &mut MediumBox, total: u64, timeout: Duration) -> Result<(), String> {
        self.buf.resize(total as usize, 0);
        let mut got = 0;
        let deadline = Instant::now() + timeout;
        while got < self.buf.len() {
            let n = medium
                .popdata(LAZY_STREAM, RSliceMut::from_mut_slice(&mut self.buf[got..]))
                .into_result()
                .map_err(|e| e.to_string())?;
            if n == 0 || Instant::now() > deadline {
                return Err("the source stopped sending pages".into());
            }
            got += n;
        }
        Ok(())
    }

    /// Before the pages are registered: those of the lazy areas that the restore itself
    /// populated (the kernel writing a thread's rseq area, say) would never fault; they
    /// get the source's contents now.
    pub fn settle(&mut self, medium: &mut MediumBox, timeout: Duration) -> Result<(), String> {
        let pagemap = std::fs::File::open(format!("/proc/{}/pagemap", self.pid)).map_err(|e| format!("pagemap: {e}"))?;
        let mut touched = Vec::new();
        for r in &self.todo {
            touched.extend(pagemap_scan_range(&pagemap, r.at, r.end, 0, PAGE_IS_PRESENT).map_err(|e| format!("PAGEMAP_SCAN: {e}"))?);
        }
        for (s, e) in touched {
            if self.ask(medium, s, e)? == 0 {
                continue;
            }
            let (total, pieces) = self.inflight.pop_back().expect("just asked");
            self.receive(medium, total, timeout)?;
            for p in pieces {
                let data = &self.buf[p.off as usize..(p.off + p.len) as usize];
                vm_ranges(self.pid, &[(p.at, p.len)], data.as_ptr() as *mut u8, data.len(), true).map_err(|e| e.to_string())?;
                self.placed.push(Run { at: p.at, end: p.at + p.len, src: p.src });
            }
        }
        Ok(())
    }

    /// Narrows the pages to come to those the source has: the lazy list may hold whole
    /// areas. The first thing after the resume; a fault meanwhile waits for it.
    fn narrow(&mut self, medium: &mut MediumBox, timeout: Duration) -> Result<(), String> {
        let mut srcs: Vec<(u64, u64)> = self.todo.iter().map(|r| (r.src, r.src + (r.end - r.at))).collect();
        srcs.sort();
        let list: Vec<[u64; 2]> = srcs.iter().map(|&(s, e)| [s, e]).collect();
        send_json(medium, self.request(serde_json::json!({"type": "present", "ranges": list})))?;
        self.receive(medium, 8, timeout)?;
        let count = u64::from_le_bytes(self.buf[..8].try_into().expect("8 bytes"));
        let most: u64 = srcs.iter().map(|r| (r.1 - r.0) / PAGE).sum();
        if count > most {
            return Err(format!("the source named {count} runs of pages in {most} pages"));
        }
        self.receive(medium, count * 16, timeout)?;
        let word = |i: usize| u64::from_le_bytes(self.buf[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let present: Vec<(u64, u64)> = (0..count as usize).map(|i| (word(2 * i), word(2 * i + 1))).collect();
        if present.iter().any(|&(s, e)| s >= e || s % PAGE != 0 || e % PAGE != 0) || present.windows(2).any(|w| w[0].1 > w[1].0) {
            return Err("the source named a bad run of pages".into());
        }
        let mut todo = VecDeque::new();
        for r in self.todo.drain(..) {
            let (lo, hi) = (r.src, r.src + (r.end - r.at));
            let first = present.partition_point(|p| p.1 <= lo);
            for &(s, e) in present[first..].iter().take_while(|p| p.0 < hi) {
                let (s, e) = (s.max(lo), e.min(hi));
                todo.push_back(Run { at: r.at + (s - lo), end: r.at + (e - lo), src: s });
            }
        }
        todo.make_contiguous().sort_by_key(|r| r.at);
        self.todo = todo;
        Ok(())
    }

    /// Registers the lazy areas: from here a touch of a missing page waits for us.
    pub fn register(&mut self) -> Result<(), String> {
        for &(start, end) in &self.areas {
            let mut reg = UffdioRegister { range: UffdioRange { start, len: end - start }, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
            ioctl_ptr(self.uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg)
                .map_err(|e| format!("registering {start:#x}-{end:#x} for post-copy: {e}"))?;
        }
        Ok(())
    }

    /// What waits in the userfaultfd.
    fn events(&mut self) -> Result<Vec<Event>, String> {
        let mut msgs = [0u8; 32 * 64];
        let mut out = Vec::new();
        let word = |m: &[u8], at: usize| u64::from_le_bytes(m[at..at + 8].try_into().expect("8 bytes"));
        loop {
            // SAFETY: reading into our own buffer from the userfaultfd we own.
            let n = unsafe { libc::read(self.uffd.as_raw_fd(), msgs.as_mut_ptr().cast(), msgs.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EAGAIN) {
                    return Ok(out);
                }
                return Err(format!("reading the userfaultfd: {e}"));
            }
            for m in msgs[..n as usize].chunks_exact(32) {
                out.push(match m[0] {
                    UFFD_EVENT_PAGEFAULT => Event::Fault(word(m, 16)),
                    UFFD_EVENT_REMAP => Event::Moved { from: word(m, 8), to: word(m, 16), len: word(m, 24) },
                    UFFD_EVENT_REMOVE | UFFD_EVENT_UNMAP => Event::Gone { start: word(m, 8), end: word(m, 16) },
                    _ => continue,
                });
            }
            if (n as usize) < msgs.len() {
                return Ok(out);
            }
        }
    }

    /// Follows the process's mremap, munmap and madvise: runs still to come and pieces on
    /// their way move with their pages, or are dropped with them.
    fn follow(&mut self, e: Event) {
        let (lo, hi, to) = match e {
            Event::Moved { from, to, len } => (from, from + len, Some(to)),
            Event::Gone { start, end } => (start, end, None),
            Event::Fault(_) => return,
        };
        let todo: Vec<Run> = self.todo.drain(..).collect();
        self.todo = follow_runs(todo, lo, hi, to).into();
        self.placed = follow_runs(std::mem::take(&mut self.placed), lo, hi, to);
        for (_, pieces) in self.inflight.iter_mut() {
            let mut out = Vec::with_capacity(pieces.len() + 2);
            for p in pieces.drain(..) {
                let [before, inside, after] = split(p.at, p.len, lo, hi);
                let piece = |at: u64, s: u64, l: u64| Piece { at, len: l, off: p.off + (s - p.at), src: p.src + (s - p.at) };
                for (s, l) in [before, after].into_iter().flatten() {
                    out.push(piece(s, s, l));
                }
                if let (Some((s, l)), Some(t)) = (inside, to) {
                    out.push(piece(t + (s - lo), s, l));
                }
            }
            *pieces = out;
        }
    }

    /// Every page the source has that is not known to be where it belongs in this
    /// process yet, or was placed since `since` pages were: what a child forked now may
    /// lack.
    fn source_backed(&self) -> Vec<Run> {
        let mut all: Vec<Run> = self.todo.iter().copied().collect();
        all.extend(self.placed.iter().copied());
        for (_, pieces) in &self.inflight {
            all.extend(pieces.iter().map(|p| Run { at: p.at, end: p.at + p.len, src: p.src }));
        }
        all.sort_by_key(|r| r.at);
        all
    }

    /// Gives each child forked during post-copy the pages missing from its copy of the
    /// process's memory (those the process had not received when it forked), then lets
    /// the caller release it.
    fn fill_children(&mut self, medium: &mut MediumBox, timeout: Duration) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        for (child, runs) in std::mem::take(&mut self.children) {
            let Ok(pagemap) = std::fs::File::open(format!("/proc/{child}/pagemap")) else { continue };
            // Through /proc/PID/mem, which also writes pages the child may only read.
            let mem = std::fs::OpenOptions::new()
                .write(true)
                .open(format!("/proc/{child}/mem"))
                .map_err(|e| format!("child {child}: {e}"))?;
            let missing = ferry_plugin_api::pagemap::Categories {
                all: 0,
                none: ferry_plugin_api::pagemap::PAGE_IS_PRESENT | ferry_plugin_api::pagemap::PAGE_IS_SWAPPED,
                any: 0,
            };
            for r in runs {
                let holes = ferry_plugin_api::pagemap::scan(&pagemap, r.at, r.end, 0, missing).map_err(|e| format!("PAGEMAP_SCAN of child {child}: {e}"))?;
                for (s, e) in holes {
                    let list = [[r.src + (s - r.at), e - s]];
                    send_json(medium, self.request(serde_json::json!({"type": "want", "ranges": list})))?;
                    self.receive(medium, e - s, timeout)?;
                    mem.write_all_at(&self.buf, s).map_err(|e| format!("child {child} at {s:#x}: {e}"))?;
                    self.stats.pages_pushed += (e - s) / PAGE;
                }
            }
        }
        Ok(())
    }

    /// Places `data` at `start` (UFFDIO_COPY, waking whoever waits there). Pages
    /// already there are skipped; a range the process unmapped meanwhile is dropped.
    /// `Err(None)`: the process is changing its mappings — read the events, try again.
    fn place(&self, start: u64, data: &[u8]) -> Result<(), Option<String>> {
        let mut copy = UffdioCopy { dst: start, src: data.as_ptr() as u64, len: data.len() as u64, mode: 0, copy: 0 };
        match ioctl_ptr(self.uffd.as_raw_fd(), UFFDIO_COPY, &mut copy).map_err(|e| e.raw_os_error().unwrap_or(0)) {
            Ok(_) => Ok(()),
            Err(libc::EAGAIN) => Err(None),
            // Some pages there already, or the range spans two mappings (a copy must lie
            // in one): page by page, each placed, skipped or dropped on its own.
            Err(libc::EEXIST | libc::ENOENT | libc::EINVAL) if data.len() as u64 > PAGE => {
                for (i, page) in data.chunks(PAGE as usize).enumerate() {
                    self.place(start + i as u64 * PAGE, page)?;
                }
                Ok(())
            }
            Err(libc::EEXIST | libc::ENOENT | libc::EINVAL | libc::ESRCH) => {
                self.wake(start, data.len() as u64);
                Ok(())
            }
            Err(e) => Err(Some(format!("UFFDIO_COPY at {start:#x}: {}", std::io::Error::from_raw_os_error(e)))),
        }
    }

    fn wake(&self, start: u64, len: u64) {
        let mut wake = UffdioRange { start, len };
        let _ = ioctl_ptr(self.uffd.as_raw_fd(), UFFDIO_WAKE, &mut wake);
    }

    /// Answers a fault on a page that is neither to come nor on its way: placed already
    /// (the fault raced with its copy: wake the thread), else one the source never had
    /// or the process emptied (zeros).
    fn settle_fault(&mut self, page: u64) -> Result<(), String> {
        if self.placed.iter().any(|r| r.at <= page && page < r.end) {
            self.wake(page, PAGE);
            return Ok(());
        }
        let mut zero = UffdioZeropage { range: UffdioRange { start: page, len: PAGE }, mode: 0, zeropage: 0 };
        match ioctl_ptr(self.uffd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut zero).map_err(|e| e.raw_os_error().unwrap_or(0)) {
            Ok(_) => {
                self.stats.pages_zeroed += 1;
                Ok(())
            }
            // Changing mappings: the fault comes again once the event is read.
            Err(libc::EAGAIN | libc::EEXIST | libc::ENOENT | libc::EINVAL | libc::ESRCH) => {
                self.wake(page, PAGE);
                Ok(())
            }
            Err(e) => Err(format!("UFFDIO_ZEROPAGE at {page:#x}: {}", std::io::Error::from_raw_os_error(e))),
        }
    }

    /// Reads what the userfaultfd reports: follows mapping changes, answers faults on
    /// pages not to come, asks for the window around the others.
    fn handle_events(&mut self, medium: &mut MediumBox, cursor: &mut u64) -> Result<(), String> {
        for e in self.events()? {
            let Event::Fault(addr) = e else {
                self.follow(e);
                continue;
            };
            let page = addr / PAGE * PAGE;
            if self.inflight.iter().any(|(_, ps)| ps.iter().any(|p| p.at <= page && page < p.at + p.len)) {
                continue; // its UFFDIO_COPY wakes it
            }
            let Some(r) = self.todo.iter().find(|r| r.at <= page && page < r.end).copied() else {
                self.settle_fault(page)?;
                continue;
            };
            // A window around the fault, within the run that holds it.
            let lo = page.saturating_sub(self.window / 2).max(r.at);
            let hi = (lo + self.window).min(r.end);
            self.stats.faults += 1;
            self.stats.pages_faulted += self.ask(medium, lo, hi)?;
            *cursor = hi;
        }
        Ok(())
    }

    /// The next `limit` bytes still to come, from `from` on in address order (then
    /// from the start).
    fn next_batch(&self, from: u64, limit: u64) -> Vec<(u64, u64)> {
        // Past the last run: from the start again.
        let (first, from) = match self.todo.iter().position(|r| r.end > from) {
            Some(i) => (i, from),
            None => (0, 0),
        };
        let mut out = Vec::new();
        let mut room = limit;
        for i in 0..self.todo.len() {
            let r = self.todo[(first + i) % self.todo.len()];
            let s = if i == 0 { r.at.max(from / PAGE * PAGE) } else { r.at };
            let take = (r.end - s).min(room);
            out.push((s, s + take));
            room -= take;
            if room == 0 {
                break;
            }
        }
        out
    }

    /// Ends post-copy once every page is in: closes the userfaultfd (the last descriptor:
    /// the areas are unregistered and any thread waiting on it is let go).
    pub fn finish(self) -> LazyStats {
        self.stats
    }

    /// Runs until every page has arrived; the process runs meanwhile, and `tend`
    /// (answering its ptrace stops) is called between requests. Ends early, fine,
    /// when the process exits.
    pub fn run(&mut self, medium: &mut MediumBox, timeout: Duration, tend: &mut dyn FnMut() -> Result<Tended, String>) -> Result<(), String> {
        let started = Instant::now();
        self.narrow(medium, timeout)?;
        let mut cursor = 0;
        let mut tend = |pager: &mut Pager| -> Result<bool, String> {
            let t = tend()?;
            for child in t.forked {
                let runs = pager.source_backed();
                pager.children.push((child, runs));
            }
            Ok(t.alive)
        };
        while !self.todo.is_empty() || !self.inflight.is_empty() {
            if !tend(self)? {
                break;
            }
            self.handle_events(medium, &mut cursor)?;
            while self.inflight.len() < 2 && !self.todo.is_empty() {
                for (s, e) in self.next_batch(cursor, self.batch) {
                    self.stats.pages_pushed += self.ask(medium, s, e)?;
                    cursor = e;
                }
            }
            let Some(&(total, _)) = self.inflight.front() else { continue };
            self.receive(medium, total, timeout)?;
            if self.stats.pages_pushed > 0 {
                crate::fault::point("post-copy-dest-mid");
            }
            // The pieces may move (or go) with the process's mappings while they are
            // placed: each is taken from the front of the request as it stands now.
            loop {
                let Some(p) = self.inflight.front_mut().and_then(|(_, ps)| ps.pop()) else { break };
                let data = &self.buf[p.off as usize..(p.off + p.len) as usize];
                match self.place(p.at, data) {
                    Ok(()) => self.placed.push(Run { at: p.at, end: p.at + p.len, src: p.src }),
                    Err(None) => {
                        if let Some((_, ps)) = self.inflight.front_mut() {
                            ps.push(p);
                        }
                        self.handle_events(medium, &mut cursor)?;
                        if !tend(self)? {
                            break;
                        }
                    }
                    Err(Some(e)) => return Err(e),
                }
            }
            self.inflight.pop_front();
        }
        // A fork noticed at the very end.
        tend(self)?;
        self.fill_children(medium, timeout)?;
        self.stats.lazy_ms = crate::engine::event::ms(started);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wants_are_page_aligned_and_bounded() {
        assert_eq!(parse_ranges(&serde_json::json!([[4096, 8192]])).unwrap(), vec![(4096, 8192)]);
        assert!(parse_ranges(&serde_json::json!([[4095, 4096]])).is_err());
        assert!(parse_ranges(&serde_json::json!([[4096, 0]])).is_err());
        assert!(parse_ranges(&serde_json::json!([[0, 65 << 20]])).is_err());
        assert!(parse_ranges(&serde_json::json!("x")).is_err());
    }

    #[test]
    fn batches_go_on_in_address_order_and_wrap_to_the_start() {
        let uffd = std::fs::File::open("/dev/null").unwrap().into();
        let plan = LazyPlan { areas: vec![], present: vec![(0x1000, 0x5000), (0x8000, 0xa000)] };
        let p = Pager::new(0, uffd, plan, 4096, 0x2000);
        assert_eq!(p.next_batch(0, 0x2000), vec![(0x1000, 0x3000)]);
        assert_eq!(p.next_batch(0x2000, 0x2000), vec![(0x2000, 0x4000)]);
        assert_eq!(p.next_batch(0x4000, 0x2000), vec![(0x4000, 0x5000), (0x8000, 0x9000)]);
        // Past the end: from the first page again, never the last page of a run.
        assert_eq!(p.next_batch(0xb000, 0x2000), vec![(0x1000, 0x3000)]);
    }

    #[test]
    fn pages_on_their_way_follow_the_process_s_mremap_and_munmap() {
        let uffd = std::fs::File::open("/dev/null").unwrap().into();
        let plan = LazyPlan { areas: vec![], present: vec![(0x10000, 0x20000)] };
        let mut p = Pager::new(0, uffd, plan, 4096, 0x2000);
        // Asked for 0x12000-0x14000: two pieces of runs split around it.
        let (want, pieces) = p.take(0x12000, 0x14000);
        assert_eq!(want, vec![(0x12000, 0x2000)]);
        assert_eq!(pieces, vec![Piece { at: 0x12000, len: 0x2000, off: 0, src: 0x12000 }]);
        p.inflight.push_back((0x2000, pieces));
        // The process moves 0x13000-0x18000 to 0x50000.
        p.follow(Event::Moved { from: 0x13000, to: 0x50000, len: 0x5000 });
        let runs: Vec<(u64, u64, u64)> = p.todo.iter().map(|r| (r.at, r.end, r.src)).collect();
        assert_eq!(runs, vec![(0x10000, 0x12000, 0x10000), (0x18000, 0x20000, 0x18000), (0x51000, 0x55000, 0x14000)]);
        let mut on_the_way = p.inflight[0].1.clone();
        on_the_way.sort_by_key(|x| x.at);
        assert_eq!(on_the_way, vec![Piece { at: 0x12000, len: 0x1000, off: 0, src: 0x12000 }, Piece { at: 0x50000, len: 0x1000, off: 0x1000, src: 0x13000 }]);
        // Then empties 0x52000-0x53000 and unmaps everything below 0x11000.
        p.follow(Event::Gone { start: 0x52000, end: 0x53000 });
        p.follow(Event::Gone { start: 0x0, end: 0x11000 });
        let runs: Vec<(u64, u64, u64)> = p.todo.iter().map(|r| (r.at, r.end, r.src)).collect();
        assert_eq!(runs, vec![(0x11000, 0x12000, 0x11000), (0x18000, 0x20000, 0x18000), (0x51000, 0x52000, 0x14000), (0x53000, 0x55000, 0x16000)]);
    }
}
