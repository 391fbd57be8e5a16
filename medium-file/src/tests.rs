//! Tests of the file medium through the plain `MediumPlugin` trait.

use super::*;
use serde_json::Value;
use tempfile::TempDir;

fn params(role: &str, dir: &Path) -> String {
    json!({ "role": role, "dir": dir.to_str().expect("temp dir is UTF-8") }).to_string()
}

fn writer(dir: &Path) -> FileMedium {
    FileMedium::open(&params("write", dir)).expect("open for writing")
}

fn reader(dir: &Path) -> FileMedium {
    FileMedium::open(&params("read", dir)).expect("open for reading")
}

fn open_err(params: &str) -> String {
    match FileMedium::open(params) {
        Ok(_) => panic!("params {params} were accepted"),
        Err(e) => e,
    }
}

fn command(m: &mut FileMedium, cmd: Value) -> Value {
    let reply = m.command(&cmd.to_string()).unwrap_or_else(|e| panic!("command {cmd} failed: {e}"));
    serde_json::from_str(&reply).expect("reply is JSON")
}

fn command_err(m: &mut FileMedium, cmd: &str) -> String {
    match m.command(cmd) {
        Ok(r) => panic!("command {cmd} succeeded: {r}"),
        Err(e) => e,
    }
}

/// Deterministic bytes that differ per stream and per offset (xorshift).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Pops all of `stream` in chunks of `chunk` bytes.
fn pop_all(m: &mut FileMedium, stream: u32, chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        let n = m.popdata(stream, &mut buf).expect("popdata");
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

fn file_len(dir: &Path, stream: u32) -> u64 {
    fs::metadata(dir.join(stream_file_name(stream))).expect("stream file").len()
}

#[test]
fn interleaved_streams_round_trip() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("img");
    let streams = [0u32, 1, 2, 7, 4_000_000_000];
    let mut expected: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    let mut w = writer(&dir);
    for round in 0..50u64 {
        for (i, &s) in streams.iter().enumerate() {
            // Sizes from empty to beyond the buffer, so both the buffered path and the
            // straight-through path interleave within one stream.
            let len = [0usize, 1, 4096, 100, 3 << 20, 65_537][(round as usize + i) % 6];
            let data = pattern(round * 100 + s as u64, len);
            w.pushdata(s, &data).unwrap();
            expected.entry(s).or_default().extend_from_slice(&data);
        }
    }
    w.flush().unwrap();
    assert_eq!(command(&mut w, json!({"op":"streams"}))["streams"], json!(streams));

    let mut r = reader(&dir);
    assert_eq!(command(&mut r, json!({"op":"streams"}))["streams"], json!(streams));
    // Read back interleaved too, each stream in its own odd chunk size.
    let mut got: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    let mut open: Vec<u32> = streams.to_vec();
    let mut turn = 0usize;
    while !open.is_empty() {
        let idx = turn % open.len();
        let s = open[idx];
        let mut buf = vec![0u8; 1 + 977 * (idx + 1) * (turn % 7 + 1)];
        let n = r.popdata(s, &mut buf).unwrap();
        if n == 0 {
            open.remove(idx);
        } else {
            got.entry(s).or_default().extend_from_slice(&buf[..n]);
        }
        turn += 1;
    }
    for s in streams {
        let want = &expected[&s];
        let have = got.get(&s).map(Vec::as_slice).unwrap_or(&[]);
        assert_eq!(have.len(), want.len(), "length of stream {s}");
        assert!(have == want.as_slice(), "bytes of stream {s} differ");
        assert_eq!(command(&mut r, json!({"op":"stream_len","stream":s}))["bytes"], json!(want.len()));
    }
}

#[test]
fn large_payload_in_odd_chunks() {
    let tmp = TempDir::new().unwrap();
    let total = 64 << 20;
    let data = pattern(42, total);
    let mut w = writer(tmp.path());
    // A few large pushes, one of them not a multiple of a page.
    let cuts = [0, 1, 20 << 20, (40 << 20) + 12_345, total];
    for pair in cuts.windows(2) {
        w.pushdata(3, &data[pair[0]..pair[1]]).unwrap();
    }
    assert_eq!(command(&mut w, json!({"op":"stream_len","stream":3}))["bytes"], json!(total));
    w.flush().unwrap();
    assert_eq!(file_len(tmp.path(), 3), total as u64);

    for chunk in [7_919usize, (3 << 20) + 1] {
        let mut r = reader(tmp.path());
        let back = pop_all(&mut r, 3, chunk);
        assert_eq!(back.len(), total, "chunk {chunk}");
        assert!(back == data, "bytes differ when read in chunks of {chunk}");
    }
}

#[test]
fn popdata_fills_the_buffer_until_the_end() {
    let tmp = TempDir::new().unwrap();
    let mut w = writer(tmp.path());
    for i in 0..10u8 {
        w.pushdata(0, &[i; 10]).unwrap();
    }
    w.flush().unwrap();
    let mut r = reader(tmp.path());
    let mut buf = [0u8; 64];
    assert_eq!(r.popdata(0, &mut buf).unwrap(), 64);
    assert_eq!(r.popdata(0, &mut buf).unwrap(), 36);
    assert_eq!(buf[35], 9);
}

#[test]
fn empty_payloads_and_empty_streams() {
    let tmp = TempDir::new().unwrap();
    let mut w = writer(tmp.path());
    w.pushdata(5, &[]).unwrap();
    w.pushdata(6, b"abc").unwrap();
    w.pushdata(6, &[]).unwrap();
    w.pushdata(6, b"def").unwrap();
    w.flush().unwrap();
    assert_eq!(command(&mut w, json!({"op":"stream_len","stream":5}))["bytes"], json!(0));
    assert_eq!(file_len(tmp.path(), 5), 0);

    let mut r = reader(tmp.path());
    assert_eq!(command(&mut r, json!({"op":"streams"}))["streams"], json!([5, 6]));
    let mut buf = [0u8; 16];
    assert_eq!(r.popdata(5, &mut buf).unwrap(), 0);
    assert_eq!(pop_all(&mut r, 6, 4), b"abcdef");
    // An empty destination reads nothing, even in the middle of a stream.
    let mut r = reader(tmp.path());
    assert_eq!(r.popdata(6, &mut []).unwrap(), 0);
    assert_eq!(pop_all(&mut r, 6, 100), b"abcdef");
}

#[test]
fn popdata_at_end_returns_zero_repeatedly() {
    let tmp = TempDir::new().unwrap();
    let mut w = writer(tmp.path());
    w.pushdata(1, b"hello").unwrap();
    w.flush().unwrap();
    let mut r = reader(tmp.path());
    assert_eq!(pop_all(&mut r, 1, 3), b"hello");
    let mut buf = [0u8; 8];
    for _ in 0..5 {
        assert_eq!(r.popdata(1, &mut buf).unwrap(), 0);
    }
}

#[test]
fn flush_makes_data_visible_to_a_reader() {
    let tmp = TempDir::new().unwrap();
    let mut w = writer(tmp.path());
    w.pushdata(0, b"first").unwrap();
    let mut r = reader(tmp.path());
    let mut buf = [0u8; 32];
    // Still in the writer's buffer: the stream file exists but is empty.
    assert_eq!(r.popdata(0, &mut buf).unwrap(), 0);
    w.flush().unwrap();
    assert_eq!(r.popdata(0, &mut buf).unwrap(), 5);
    assert_eq!(&buf[..5], b"first");
    // A reader at the end sees what is appended and flushed later.
    w.pushdata(0, b" second").unwrap();
    w.flush().unwrap();
    assert_eq!(r.popdata(0, &mut buf).unwrap(), 7);
    assert_eq!(&buf[..7], b" second");
    assert_eq!(r.popdata(0, &mut buf).unwrap(), 0);
    // Flushing again with nothing new is fine.
    w.flush().unwrap();
    w.flush().unwrap();
}

#[test]
fn small_pushes_are_buffered_and_large_ones_pass_through() {
    let tmp = TempDir::new().unwrap();
    let mut w = writer(tmp.path());
    assert_eq!(command(&mut w, json!({"op":"buffer","bytes":4096})), json!({"ok":true}));
    w.pushdata(0, &[1u8; 100]).unwrap();
    assert_eq!(file_len(tmp.path(), 0), 0, "a small push waits in the buffer");
    w.pushdata(0, &[2u8; 10_000]).unwrap();
    assert_eq!(file_len(tmp.path(), 0), 10_100, "a push bigger than the buffer goes straight to the file");
    // The buffer size applies to streams opened later only; stream 1 gets 8 KiB.
    assert_eq!(command(&mut w, json!({"op":"buffer","bytes":8192})), json!({"ok":true}));
    w.pushdata(1, &[3u8; 6000]).unwrap();
    assert_eq!(file_len(tmp.path(), 1), 0);
    w.pushdata(0, &[4u8; 6000]).unwrap();
    assert_eq!(file_len(tmp.path(), 0), 16_100, "stream 0 keeps its 4 KiB buffer");
    w.flush().unwrap();
    assert_eq!(file_len(tmp.path(), 1), 6000);
}

#[test]
fn write_creates_the_directory_and_truncates_old_streams() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("a").join("b").join("img");
    let mut w = writer(&dir);
    assert!(dir.is_dir());
    w.pushdata(2, &[9u8; 1000]).unwrap();
    w.flush().unwrap();
    drop(w);
    let mut w = writer(&dir);
    w.pushdata(2, b"xy").unwrap();
    w.flush().unwrap();
    assert_eq!(file_len(&dir, 2), 2);
}

#[test]
fn commands() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    let mut w = writer(dir);
    assert_eq!(command(&mut w, json!({"op":"streams"})), json!({"streams":[]}));
    w.pushdata(9, b"123").unwrap();
    w.pushdata(2, b"4").unwrap();
    assert_eq!(command(&mut w, json!({"op":"streams"})), json!({"streams":[2, 9]}));
    assert_eq!(command(&mut w, json!({"op":"stream_len","stream":9})), json!({"bytes":3}));
    assert_eq!(
        command(&mut w, json!({"op":"info"})),
        json!({"medium":"file","dir":dir.to_str().unwrap(),"role":"write"})
    );
    let e = command_err(&mut w, r#"{"op":"stream_len","stream":4}"#);
    assert!(e.contains("stream 4 has not been written"), "{e}");
    w.flush().unwrap();

    // Files that are not canonical stream files are ignored by a reader.
    for name in ["stream-03.img", "stream-x.img", "stream-5.img.tmp", "notes.txt"] {
        fs::write(dir.join(name), b"junk").unwrap();
    }
    fs::create_dir(dir.join("stream-77.img.d")).unwrap();
    let mut r = reader(dir);
    assert_eq!(command(&mut r, json!({"op":"streams"})), json!({"streams":[2, 9]}));
    assert_eq!(command(&mut r, json!({"op":"stream_len","stream":2})), json!({"bytes":1}));
    assert_eq!(command(&mut r, json!({"op":"info"}))["role"], json!("read"));
    let e = command_err(&mut r, r#"{"op":"stream_len","stream":3}"#);
    assert!(e.contains("stream 3 is missing") && e.contains("stream-3.img"), "{e}");

    // The buffer size is bounds-checked.
    assert_eq!(command(&mut r, json!({"op":"buffer","bytes":MIN_BUFFER})), json!({"ok":true}));
    assert_eq!(command(&mut r, json!({"op":"buffer","bytes":MAX_BUFFER})), json!({"ok":true}));
    for bad in [0, MIN_BUFFER - 1, MAX_BUFFER + 1, u64::MAX] {
        let e = command_err(&mut r, &json!({"op":"buffer","bytes":bad}).to_string());
        assert!(e.contains("out of range"), "{e}");
    }

    // Malformed commands name what is wrong.
    let cases = [
        ("not json", "not valid JSON"),
        ("[1,2]", "must be a JSON object"),
        ("{}", "missing key \"op\""),
        (r#"{"op":5}"#, "\"op\""),
        (r#"{"op":"frobnicate"}"#, "unknown op \"frobnicate\""),
        (r#"{"op":"streams","extra":1}"#, "unknown key \"extra\""),
        (r#"{"op":"stream_len"}"#, "missing key \"stream\""),
        (r#"{"op":"stream_len","stream":-1}"#, "\"stream\""),
        (r#"{"op":"stream_len","stream":"1"}"#, "\"stream\""),
        (r#"{"op":"stream_len","stream":4294967296}"#, "\"stream\""),
        (r#"{"op":"buffer","bytes":1.5}"#, "\"bytes\""),
        (r#"{"op":"buffer"}"#, "missing key \"bytes\""),
    ];
    for (cmd, want) in cases {
        let e = command_err(&mut r, cmd);
        assert!(e.contains(want), "command {cmd}: {e:?} does not mention {want:?}");
    }
}

#[test]
fn bad_params() {
    let tmp = TempDir::new().unwrap();
    let d = tmp.path().to_str().unwrap();
    let file = tmp.path().join("plain");
    fs::write(&file, b"").unwrap();
    let f = file.to_str().unwrap();
    let missing = tmp.path().join("nope");
    let cases = [
        ("".to_string(), "not valid JSON".to_string()),
        ("[]".into(), "must be a JSON object".into()),
        (json!({"dir": d}).to_string(), "missing key \"role\"".into()),
        (json!({"role": "write"}).to_string(), "missing key \"dir\"".into()),
        (json!({"role": 1, "dir": d}).to_string(), "key \"role\"".into()),
        (json!({"role": "rw", "dir": d}).to_string(), "key \"role\"".into()),
        (json!({"role": "write", "dir": 7}).to_string(), "key \"dir\"".into()),
        (json!({"role": "write", "dir": ""}).to_string(), "key \"dir\"".into()),
        (json!({"role": "write", "dir": d, "buffer": 1}).to_string(), "unknown key \"buffer\"".into()),
        (json!({"role": "read", "dir": missing.to_str().unwrap()}).to_string(), missing.display().to_string()),
        (json!({"role": "read", "dir": f}).to_string(), "not a directory".into()),
        (json!({"role": "write", "dir": f}).to_string(), f.to_string()),
        (json!({"role": "write", "dir": file.join("sub").to_str().unwrap()}).to_string(), f.to_string()),
    ];
    for (p, want) in cases {
        let e = open_err(&p);
        assert!(e.contains(&want), "params {p}: {e:?} does not mention {want:?}");
    }
}

#[test]
fn wrong_role_and_missing_stream() {
    let tmp = TempDir::new().unwrap();
    let mut w = writer(tmp.path());
    let mut buf = [0u8; 4];
    let e = w.popdata(0, &mut buf).unwrap_err();
    assert!(e.contains("pop from stream 0") && e.contains("\"write\""), "{e}");
    w.pushdata(0, b"x").unwrap();
    w.flush().unwrap();

    let mut r = reader(tmp.path());
    let e = r.pushdata(0, b"x").unwrap_err();
    assert!(e.contains("push to stream 0") && e.contains("\"read\""), "{e}");
    let e = r.popdata(3, &mut buf).unwrap_err();
    let path = tmp.path().join("stream-3.img");
    assert_eq!(e, format!("stream 3 is missing: {}", path.display()));
    // A stream that appears later can still be read: failures are not cached.
    fs::write(&path, b"late").unwrap();
    assert_eq!(r.popdata(3, &mut buf).unwrap(), 4);
    r.flush().unwrap();
}

#[test]
fn write_errors_name_the_path() {
    let tmp = TempDir::new().unwrap();
    let mut w = writer(tmp.path());
    // A directory where the stream file should be makes the open fail.
    fs::create_dir(tmp.path().join("stream-4.img")).unwrap();
    let e = w.pushdata(4, b"x").unwrap_err();
    assert!(e.contains("stream 4") && e.contains("stream-4.img"), "{e}");
    // The image directory vanishing makes opening a stream fail, not panic.
    drop(tmp);
    let e = w.pushdata(5, b"x").unwrap_err();
    assert!(e.contains("stream-5.img"), "{e}");
}

#[test]
fn stream_file_names() {
    assert_eq!(stream_file_name(12), "stream-12.img");
    assert_eq!(parse_stream_file_name("stream-12.img"), Some(12));
    assert_eq!(parse_stream_file_name("stream-4294967295.img"), Some(u32::MAX));
    for bad in ["stream-012.img", "stream-+1.img", "stream-.img", "stream-4294967296.img", "stream-1.imgx", "x-1.img"] {
        assert_eq!(parse_stream_file_name(bad), None, "{bad}");
    }
}

#[test]
fn only_regular_files_are_read_as_streams() {
    // A FIFO would block the reader forever; a link could lead anywhere.
    let tmp = TempDir::new().unwrap();
    let fifo = tmp.path().join("stream-4.img");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut r = reader(tmp.path());
    let mut buf = [0u8; 16];
    let e = r.popdata(4, &mut buf).unwrap_err();
    assert!(e.contains("stream-4.img is not a regular file (a FIFO)"), "{e}");
    fs::write(tmp.path().join("elsewhere"), b"x").unwrap();
    std::os::unix::fs::symlink(tmp.path().join("elsewhere"), tmp.path().join("stream-5.img")).unwrap();
    let e = r.popdata(5, &mut buf).unwrap_err();
    assert!(e.contains("stream-5.img"), "{e}");
    fs::create_dir(tmp.path().join("stream-6.img")).unwrap();
    let e = r.popdata(6, &mut buf).unwrap_err();
    assert!(e.contains("stream-6.img is not a regular file (a directory)"), "{e}");
}
