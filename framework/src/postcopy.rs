//! Post-copy (the paper's "early event request"): the process resumes on the
//! destination before its private anonymous memory has arrived. The destination
//! registers those areas in a userfaultfd of the restored process (made there by an
//! injected call, held only by ferry) and fills them with `UFFDIO_COPY`: first the
//! window around each page fault, and between faults the rest in address order,
//! carrying on from the neighbourhood of the last fault. Pages the source never had
//! are zero-filled here without asking. The destination drives it all — it asks, with
//! `want` messages through the medium's `command`, and the source, which keeps its copy
//! of the process frozen, answers with the pages on [`LAZY_STREAM`] — so one thread on
//! each side does the work, and a page fault waits for at most one batch ahead of it.
//!
//! Once every page has arrived the destination says `lazy-done` (with its counts) and
//! the source removes its copy. If the connection fails after the resume, the process
//! cannot be rolled back from the destination: it is killed there, never left hanging
//! on a fault, and the source thaws its frozen copy, which carries on from the freeze
//! (what the destination's copy did meanwhile — files written, messages sent — is not
//! undone).

use std::{
    collections::VecDeque,
    os::fd::{AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use abi_stable::std_types::{RSlice, RSliceMut};
use ferry_plugin_api::MediumBox;
use serde::{Deserialize, Serialize};

use crate::{
    precopy::{recv_json, send_json},
    tracer::vm_ranges,
    uffd::*,
};

/// The stream the pages travel on (above every plugin's).
pub const LAZY_STREAM: u32 = 1024;
const PAGE: u64 = 4096;
/// The most one `want` may ask for.
const MAX_WANT: u64 = 64 << 20;
/// Pushes below this size wait in the medium until a flush (see medium-tcp).
const SMALL_PUSH: usize = 64 << 10;

/// What the memory plugin leaves to post-copy on the destination.
#[derive(Debug, Default, Clone)]
pub struct LazyPlan {
    /// The areas registered (mapped, empty).
    pub areas: Vec<(u64, u64)>,
    /// The pages of them the source has.
    pub present: Vec<(u64, u64)>,
}

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
    medium.pushdata(LAZY_STREAM, RSlice::from_slice(buf)).into_result().map_err(|e| e.to_string())?;
    if buf.len() < SMALL_PUSH {
        medium.flush().into_result().map_err(|e| e.to_string())?;
    }
    Ok(())
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
    let mut buf = Vec::new();
    let mut answered = 0;
    loop {
        let msg = recv_json(medium, timeout)?;
        if msg["type"] != "want" {
            return Ok(msg);
        }
        answer(medium, pid, &msg, &mut buf)?;
        answered += 1;
        if resumed && answered == 3 {
            crate::fault::point("post-copy-mid");
        }
    }
}

/// Destination: fills the lazy areas of a restored process.
pub struct Pager {
    pid: i32,
    uffd: OwnedFd,
    areas: Vec<(u64, u64)>,
    /// Present pages not placed yet, in address order.
    todo: VecDeque<(u64, u64)>,
    present: Vec<(u64, u64)>,
    window: u64,
    batch: u64,
    buf: Vec<u8>,
    pub stats: LazyStats,
}

fn subtract_one(todo: &mut VecDeque<(u64, u64)>, (s, e): (u64, u64)) {
    let mut out = VecDeque::with_capacity(todo.len() + 1);
    for &(a, b) in todo.iter() {
        if b <= s || e <= a {
            out.push_back((a, b));
            continue;
        }
        if a < s {
            out.push_back((a, s));
        }
        if e < b {
            out.push_back((e, b));
        }
    }
    *todo = out;
}

impl Pager {
    /// `uffd`: a userfaultfd of process `pid` (see `Held::userfaultfd`).
    pub fn new(pid: i32, uffd: OwnedFd, plan: LazyPlan, window: u64, batch: u64) -> Pager {
        Pager {
            pid,
            uffd,
            areas: plan.areas,
            todo: plan.present.iter().copied().collect(),
            present: plan.present,
            window: window.max(PAGE) / PAGE * PAGE,
            batch: batch.max(PAGE) / PAGE * PAGE,
            buf: Vec::new(),
            stats: LazyStats::default(),
        }
    }

    /// Asks the source for `ranges` and answers their bytes, in order.
    fn fetch(&mut self, medium: &mut MediumBox, ranges: &[(u64, u64)], timeout: Duration) -> Result<(), String> {
        Self::ask(medium, ranges)?;
        self.receive(medium, ranges, timeout)
    }

    /// Sends a `want` for `ranges`.
    fn ask(medium: &mut MediumBox, ranges: &[(u64, u64)]) -> Result<(), String> {
        let list: Vec<[u64; 2]> = ranges.iter().map(|&(s, e)| [s, e - s]).collect();
        send_json(medium, serde_json::json!({"type": "want", "ranges": list}))
    }

    /// Reads the answer to a `want` for `ranges` into the buffer.
    fn receive(&mut self, medium: &mut MediumBox, ranges: &[(u64, u64)], timeout: Duration) -> Result<(), String> {
        let total: u64 = ranges.iter().map(|r| r.1 - r.0).sum();
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
        for &(s, e) in &self.present {
            for (a, b) in pagemap_scan_range(&pagemap, s, e, 0, PAGE_IS_PRESENT).map_err(|e| format!("PAGEMAP_SCAN: {e}"))? {
                touched.push((a, b));
            }
        }
        for chunk in touched.chunks(256) {
            self.fetch(medium, chunk, timeout)?;
            let ranges: Vec<(u64, u64)> = chunk.iter().map(|&(s, e)| (s, e - s)).collect();
            vm_ranges(self.pid, &ranges, self.buf.as_mut_ptr(), self.buf.len(), true).map_err(|e| e.to_string())?;
            for &r in chunk {
                subtract_one(&mut self.todo, r);
            }
        }
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

    /// The faulting addresses waiting in the userfaultfd.
    fn faults(&mut self) -> Result<Vec<u64>, String> {
        let mut msgs = [0u8; 32 * 64];
        let mut out = Vec::new();
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
                if m[0] == UFFD_EVENT_PAGEFAULT {
                    out.push(u64::from_le_bytes(m[16..24].try_into().expect("8 bytes")));
                }
            }
            if (n as usize) < msgs.len() {
                return Ok(out);
            }
        }
    }

    fn ioctl_range<T>(&self, request: u64, arg: &mut T) -> Result<(), i32> {
        for _ in 0..100 {
            match ioctl_ptr(self.uffd.as_raw_fd(), request, arg) {
                Ok(_) => return Ok(()),
                // The process is changing its mappings: try again.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                Err(e) => return Err(e.raw_os_error().unwrap_or(0)),
            }
        }
        Err(libc::EAGAIN)
    }

    /// Places `data` at `start` (UFFDIO_COPY, waking whoever waits there). Pages
    /// already there are skipped; a range the process unmapped meanwhile is dropped.
    fn place(&self, start: u64, data: &[u8]) -> Result<(), String> {
        let mut copy = UffdioCopy { dst: start, src: data.as_ptr() as u64, len: data.len() as u64, mode: 0, copy: 0 };
        match self.ioctl_range(UFFDIO_COPY, &mut copy) {
            Ok(()) => Ok(()),
            Err(libc::EEXIST) if data.len() as u64 > PAGE => {
                for (i, page) in data.chunks(PAGE as usize).enumerate() {
                    self.place(start + i as u64 * PAGE, page)?;
                }
                Ok(())
            }
            Err(libc::EEXIST | libc::ENOENT | libc::EINVAL | libc::ESRCH) => {
                let mut wake = UffdioRange { start, len: data.len() as u64 };
                let _ = ioctl_ptr(self.uffd.as_raw_fd(), UFFDIO_WAKE, &mut wake);
                Ok(())
            }
            Err(e) => Err(format!("UFFDIO_COPY at {start:#x}: {}", std::io::Error::from_raw_os_error(e))),
        }
    }

    /// Answers a fault on a page the source never had (zeros) or one already placed.
    fn settle_fault(&mut self, page: u64) -> Result<(), String> {
        // Placed already (the fault raced with its copy): wake the thread; else the
        // source never had it: zeros.
        if self.present.iter().any(|&(s, e)| s <= page && page < e) {
            let mut wake = UffdioRange { start: page, len: PAGE };
            let _ = ioctl_ptr(self.uffd.as_raw_fd(), UFFDIO_WAKE, &mut wake);
            return Ok(());
        }
        let mut zero = UffdioZeropage { range: UffdioRange { start: page, len: PAGE }, mode: 0, zeropage: 0 };
        match self.ioctl_range(UFFDIO_ZEROPAGE, &mut zero) {
            Ok(()) => {
                self.stats.pages_zeroed += 1;
                Ok(())
            }
            Err(libc::EEXIST | libc::ENOENT | libc::EINVAL | libc::ESRCH) => {
                let mut wake = UffdioRange { start: page, len: PAGE };
                let _ = ioctl_ptr(self.uffd.as_raw_fd(), UFFDIO_WAKE, &mut wake);
                Ok(())
            }
            Err(e) => Err(format!("UFFDIO_ZEROPAGE at {page:#x}: {}", std::io::Error::from_raw_os_error(e))),
        }
    }

    /// The next `limit` bytes still to come, from `from` on in address order (then
    /// from the start).
    fn next_batch(&self, from: u64, limit: u64) -> Vec<(u64, u64)> {
        // Past the last run: from the start again.
        let (first, from) = match self.todo.iter().position(|r| r.1 > from) {
            Some(i) => (i, from),
            None => (0, 0),
        };
        let mut out = Vec::new();
        let mut room = limit;
        for i in 0..self.todo.len() {
            let (s, e) = self.todo[(first + i) % self.todo.len()];
            let s = if i == 0 { s.max(from / PAGE * PAGE) } else { s };
            let take = (e - s).min(room);
            out.push((s, s + take));
            room -= take;
            if room == 0 {
                break;
            }
        }
        out
    }

    /// Runs until every page has arrived; the process runs meanwhile, and `tend`
    /// (answering its ptrace stops) is called between requests. Ends early, fine,
    /// when the process exits.
    pub fn run(&mut self, medium: &mut MediumBox, timeout: Duration, tend: &mut dyn FnMut() -> Result<bool, String>) -> Result<(), String> {
        let started = Instant::now();
        let mut cursor = 0;
        // Requests sent and not answered yet, in order: the next batch is asked for
        // before the last one is placed, so the source reads while this side copies.
        let mut inflight: VecDeque<Vec<(u64, u64)>> = VecDeque::new();
        while !self.todo.is_empty() || !inflight.is_empty() {
            if !tend()? {
                break;
            }
            let mut want: Vec<(u64, u64)> = Vec::new();
            for addr in self.faults()? {
                let page = addr / PAGE * PAGE;
                let on_the_way = |r: &[(u64, u64)]| r.iter().any(|&(a, b)| a <= page && page < b);
                if on_the_way(&want) || inflight.iter().any(|w| on_the_way(w)) {
                    continue; // its UFFDIO_COPY wakes it
                }
                let Some(&(s, e)) = self.todo.iter().find(|&&(s, e)| s <= page && page < e) else {
                    self.settle_fault(page)?;
                    continue;
                };
                // A window around the fault, within the run that holds it.
                let lo = page.saturating_sub(self.window / 2).max(s);
                let hi = (lo + self.window).min(e);
                self.stats.faults += 1;
                self.stats.pages_faulted += (hi - lo) / PAGE;
                want.push((lo, hi));
                cursor = hi;
            }
            for &r in &want {
                subtract_one(&mut self.todo, r);
            }
            if !want.is_empty() {
                Self::ask(medium, &want)?;
                inflight.push_back(want);
            }
            while inflight.len() < 2 && !self.todo.is_empty() {
                let batch = self.next_batch(cursor, self.batch);
                self.stats.pages_pushed += batch.iter().map(|r| (r.1 - r.0) / PAGE).sum::<u64>();
                cursor = batch.last().map_or(0, |r| r.1);
                for &r in &batch {
                    subtract_one(&mut self.todo, r);
                }
                Self::ask(medium, &batch)?;
                inflight.push_back(batch);
            }
            let Some(ranges) = inflight.pop_front() else { continue };
            self.receive(medium, &ranges, timeout)?;
            if self.stats.pages_pushed > 0 {
                crate::fault::point("post-copy-dest-mid");
            }
            let mut at = 0;
            for &(s, e) in &ranges {
                let len = (e - s) as usize;
                self.place(s, &self.buf[at..at + len])?;
                at += len;
            }
        }
        self.stats.lazy_ms = crate::event::ms(started);
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
    fn placed_ranges_leave_the_rest_to_come() {
        let mut todo: VecDeque<(u64, u64)> = [(0x1000, 0x5000), (0x8000, 0x9000)].into_iter().collect();
        subtract_one(&mut todo, (0x2000, 0x3000));
        assert_eq!(todo, [(0x1000, 0x2000), (0x3000, 0x5000), (0x8000, 0x9000)]);
        subtract_one(&mut todo, (0x0, 0x8800));
        assert_eq!(todo, [(0x8800, 0x9000)]);
    }
}
