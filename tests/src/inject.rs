//! Breaking a running process's state from outside, for the tests that show a
//! workload's own check can fail: system calls injected into its threads with ferry's
//! own tracer (what a faulty restore might have left behind), and bytes replaced in its
//! memory through `/proc/PID/mem`.

use std::os::unix::fs::FileExt;

use ferry::kernel::tracer::Tracer;

/// A process held stopped while calls are made in its threads; let go (ferry's scratch
/// area removed, every thread detached) by [`Injected::release`] or on drop.
pub struct Injected {
    tracer: Option<Tracer>,
    /// The next free byte of the scratch area's argument part.
    next: u64,
    end: u64,
}

impl Injected {
    /// Seizes process `pid` and maps the scratch area for the calls' arguments.
    pub fn seize(pid: i32) -> Injected {
        let mut tracer = Tracer::seize(pid).unwrap_or_else(|e| panic!("seizing {pid}: {e}"));
        tracer.map_scratch(0).unwrap_or_else(|e| panic!("the scratch area in {pid}: {e}"));
        let (next, len) = tracer.scratch_args().expect("mapped just now");
        Injected { tracer: Some(tracer), next, end: next + len }
    }

    fn tracer(&mut self) -> &mut Tracer {
        self.tracer.as_mut().expect("not released")
    }

    /// The process's threads, the main one first.
    pub fn tids(&mut self) -> Vec<i32> {
        let t = self.tracer();
        let pid = t.pid();
        let mut tids = t.tids();
        tids.sort_by_key(|&tid| (tid != pid, tid));
        tids
    }

    /// Copies `bytes` into the process (its scratch area); answers where they are.
    pub fn put(&mut self, bytes: &[u8]) -> u64 {
        let at = self.next;
        assert!(at + bytes.len() as u64 <= self.end, "the scratch area is full");
        self.tracer().poke(at, bytes).unwrap_or_else(|e| panic!("writing arguments: {e}"));
        self.next = (at + bytes.len() as u64 + 15) & !15;
        at
    }

    /// `len` bytes of the process's memory at `at`.
    pub fn get(&mut self, at: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.tracer().peek(at, &mut buf).unwrap_or_else(|e| panic!("reading {at:#x}: {e}"));
        buf
    }

    /// Makes system call `nr` in thread `tid`; answers its result, which must not be an
    /// error.
    pub fn call(&mut self, tid: i32, nr: i64, args: [u64; 6]) -> i64 {
        let r = self.tracer().inject(tid, nr, args).unwrap_or_else(|e| panic!("system call {nr} in {tid}: {e}"));
        assert!(r >= 0, "system call {nr} in {tid} failed: {}", std::io::Error::from_raw_os_error(-r as i32));
        r
    }

    /// Thread `tid`'s rseq registration: (area, length, signature); area 0 for none.
    pub fn rseq(&mut self, tid: i32) -> (u64, u32, u32) {
        let c = self.tracer().rseq_config(tid).unwrap_or_else(|e| panic!("rseq of {tid}: {e}"));
        (c.addr, c.len, c.signature)
    }

    /// Removes the scratch area and lets every thread go.
    pub fn release(mut self) {
        let mut t = self.tracer.take().expect("released once");
        t.unmap_scratch().unwrap_or_else(|e| panic!("removing the scratch area: {e}"));
        t.detach().unwrap_or_else(|e| panic!("detaching: {e}"));
    }
}

impl Drop for Injected {
    fn drop(&mut self) {
        if let Some(mut t) = self.tracer.take() {
            let _ = t.unmap_scratch();
            let _ = t.detach();
        }
    }
}

/// Replaces every occurrence of `from` in the writable private memory of `pid` with
/// `to` (of the same length), through `/proc/PID/mem`; answers how many. Stale copies
/// (freed buffers) are hit too, which is harmless: the live one is among them.
pub fn replace_in_memory(pid: i32, from: &[u8], to: &[u8]) -> usize {
    assert_eq!(from.len(), to.len());
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_else(|e| panic!("/proc/{pid}/maps: {e}"));
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/mem: {e}"));
    let mut hits = 0;
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Writable and private, no special area ([vvar], [vsyscall]) but heap and stack.
        if f.len() < 2 || !f[1].starts_with("rw") || !f[1].ends_with('p') {
            continue;
        }
        if f.get(5).is_some_and(|n| n.starts_with('[') && *n != "[heap]" && *n != "[stack]") {
            continue;
        }
        let (s, e) = f[0].split_once('-').expect("a range");
        let (start, end) = (u64::from_str_radix(s, 16).unwrap(), u64::from_str_radix(e, 16).unwrap());
        let mut buf = vec![0u8; (end - start) as usize];
        if mem.read_exact_at(&mut buf, start).is_err() {
            continue;
        }
        let mut i = 0;
        while let Some(off) = buf[i..].windows(from.len()).position(|w| w == from) {
            let at = i + off;
            mem.write_all_at(to, start + at as u64).unwrap_or_else(|e| panic!("writing {:#x}: {e}", start + at as u64));
            hits += 1;
            i = at + from.len();
        }
    }
    hits
}
