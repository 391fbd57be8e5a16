//! Checkpoint and restore throughput against the machine's own limits, measured in the
//! same run: writing the same bytes to a file in the image directory (the limit for a
//! checkpoint) and reading them back into freshly mapped memory (the limit for a
//! restore, which must fault every page in). Beside the write reference, the least any
//! checkpoint taken from outside the process must do: copy the bytes out of memory the
//! writer does not own (cold, like a frozen process's) and write them ("copy+write").
//! Images go to tmpfs. Prints medians of 7 (the VM is noisy: a run in five or so is slow).
//!
//!     cargo bench -p ferry-tests --bench checkpoint [-- SIZES_MIB...]

use std::{
    io::{Read, Write},
    path::Path,
    time::Instant,
};

use ferry_tests::{
    bench::{kill_and_wait, median},
    ferry,
    workload::{Workload, WorkloadOpts},
};


/// Writes `bytes` to a new file in `dir` and makes it durable, like the file medium.
fn write_reference(dir: &Path, bytes: usize, buf: &[u8]) -> f64 {
    let path = dir.join("reference");
    let t = Instant::now();
    let mut f = std::fs::File::create(&path).unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len());
        f.write_all(&buf[..n]).unwrap();
        left -= n;
    }
    f.sync_all().unwrap();
    t.elapsed().as_secs_f64() * 1e3
}

/// [`write_reference`] of `src`, each 2 MiB block first copied out of it into a buffer
/// the writer reuses, as a checkpoint reads a process.
fn copy_write_reference(dir: &Path, src: &[u8]) -> f64 {
    let path = dir.join("reference");
    let mut buf = vec![0u8; 2 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::create(&path).unwrap();
    for block in src.chunks(buf.len()) {
        buf[..block.len()].copy_from_slice(block);
        f.write_all(&buf[..block.len()]).unwrap();
    }
    f.sync_all().unwrap();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    std::fs::remove_file(&path).unwrap();
    ms
}

/// Reads the reference file into freshly mapped anonymous memory.
fn read_reference(dir: &Path, bytes: usize) -> f64 {
    let path = dir.join("reference");
    let t = Instant::now();
    // SAFETY: a fresh private anonymous mapping, unmapped below.
    let mem = unsafe {
        libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    assert_ne!(mem, libc::MAP_FAILED);
    // SAFETY: the mapping is `bytes` long and ours alone.
    let dst = unsafe { std::slice::from_raw_parts_mut(mem as *mut u8, bytes) };
    let mut f = std::fs::File::open(&path).unwrap();
    let mut off = 0;
    while off < bytes {
        let n = f.read(&mut dst[off..(off + (32 << 20)).min(bytes)]).unwrap();
        assert!(n > 0);
        off += n;
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    // SAFETY: unmapping what we mapped.
    unsafe { libc::munmap(mem, bytes) };
    std::fs::remove_file(&path).unwrap();
    ms
}

fn main() {
    let Some(sizes) = ferry_tests::bench::start("checkpoint", &[1, 9, 64, 256, 1024], false) else { return };
    let base = Path::new("/dev/shm").join(format!("ferry-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base).unwrap();
    let buf = vec![0x5au8; 8 << 20];
    ferry_tests::warm_guest_memory();
    println!(
        "{:>6} {:>9} {:>9} {:>9} {:>9} {:>7} {:>10} {:>7} {:>9} {:>9} {:>9} {:>7} {:>8} {:>8}",
        "MiB", "ckpt ms", "wall", "frozen", "write ms", "ratio", "c+w ms", "ratio", "rest ms", "wall", "read ms", "ratio", "ckpt GB/s", "rest GB/s"
    );
    for size in sizes {
        let runs = 7;
        let (mut ck, mut fr, mut wr, mut rs, mut rd, mut cw) = (vec![], vec![], vec![], vec![], vec![], vec![]);
        // The commands' wall time from outside: ferry's own figures start after it
        // loaded its configuration and plugins.
        let (mut ckw, mut rsw) = (vec![], vec![]);
        // What copy+write copies out of: touched, like the workload's memory.
        let src = vec![0xa5u8; (size as usize) << 20];
        let mut bytes = 0u64;
        for i in 0..runs {
            // Freed guest pages are handed back to the hypervisor after a while, and the
            // next touch of one costs a fault: whoever runs right after a large free
            // gets warm pages. Alternate who goes first so neither side always wins.
            let refs_first = i % 2 == 1 && bytes > 0;
            if refs_first {
                cw.push(copy_write_reference(&base, &src));
                wr.push(write_reference(&base, bytes as usize, &buf));
                rd.push(read_reference(&base, bytes as usize));
            }
            let mut w = Workload::spawn(&WorkloadOpts { mem_mib: size as u32, files: false, tick_ms: 50, ..Default::default() });
            w.wait_ticks(1);
            let dir = base.join(format!("img-{size}-{i}"));
            let t = Instant::now();
            let o = ferry(&["checkpoint", &w.pid.to_string(), "--dir", dir.to_str().unwrap(), "--json"]);
            ckw.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            bytes = s["bytes"].as_u64().unwrap();
            ck.push(s["total_ms"].as_f64().unwrap());
            fr.push(s["frozen_ms"].as_f64().unwrap());
            // Its parent reaps it, as a shell or init would; restore waits for that.
            w.reap();
            let t = Instant::now();
            let o = ferry(&["restore", "--dir", dir.to_str().unwrap(), "--json"]);
            rsw.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            rs.push(r["total_ms"].as_f64().unwrap());
            for pid in r["pids"].as_object().unwrap().values() {
                kill_and_wait(pid.as_i64().unwrap() as i32);
            }
            std::fs::remove_dir_all(&dir).unwrap();
            if !refs_first {
                cw.push(copy_write_reference(&base, &src));
                wr.push(write_reference(&base, bytes as usize, &buf));
                rd.push(read_reference(&base, bytes as usize));
            }
            drop(w);
        }
        let (c, f, w, r, d) = (median(&mut ck), median(&mut fr), median(&mut wr), median(&mut rs), median(&mut rd));
        let m = median(&mut cw);
        let (cwall, rwall) = (median(&mut ckw), median(&mut rsw));
        let gbs = |ms: f64| bytes as f64 / (ms / 1e3) / 1e9;
        println!(
            "{size:>6} {c:>9.1} {cwall:>9.1} {f:>9.1} {w:>9.1} {:>6.0}% {m:>10.1} {:>6.0}% {r:>9.1} {rwall:>9.1} {d:>9.1} {:>6.0}% {:>8.2} {:>8.2}",
            100.0 * w / c,
            100.0 * m / c,
            100.0 * d / r,
            gbs(c),
            gbs(r)
        );
    }
    let _ = std::fs::remove_dir_all(&base);
}
