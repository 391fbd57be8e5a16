//! Tests of the tcp medium over real loopback connections, through the plain
//! `MediumPlugin` trait.

use super::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::thread;

fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("local addr")).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    (client, server)
}

fn open_on(fd: impl IntoRawFd, timeout_ms: u64) -> TcpMedium {
    let fd = fd.into_raw_fd();
    TcpMedium::open(&json!({ "fd": fd, "timeout_ms": timeout_ms }).to_string()).expect("open")
}

/// (source, destination) media on the two ends of one loopback connection.
fn media(timeout_ms: u64) -> (TcpMedium, TcpMedium) {
    let (a, b) = tcp_pair();
    (open_on(a, timeout_ms), open_on(b, timeout_ms))
}

/// A medium facing a raw socket, to play a broken or silent peer.
fn medium_and_raw(timeout_ms: u64) -> (TcpMedium, TcpStream) {
    let (a, b) = tcp_pair();
    (open_on(a, timeout_ms), b)
}

fn command(m: &mut TcpMedium, cmd: Value) -> Value {
    let reply = m.command(&cmd.to_string()).unwrap_or_else(|e| panic!("command {cmd} failed: {e}"));
    serde_json::from_str(&reply).expect("reply is JSON")
}

fn command_err(m: &mut TcpMedium, cmd: &str) -> String {
    match m.command(cmd) {
        Ok(r) => panic!("command {cmd} succeeded: {r}"),
        Err(e) => e,
    }
}

fn err_of<T: std::fmt::Debug>(r: Result<T, String>, what: &str) -> String {
    match r {
        Ok(v) => panic!("{what} succeeded: {v:?}"),
        Err(e) => e,
    }
}

fn open_err(params: &str) -> String {
    match TcpMedium::open(params) {
        Ok(_) => panic!("params {params} were accepted"),
        Err(e) => e,
    }
}

/// Deterministic bytes that differ per seed and per offset (xorshift).
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

/// Pops all of `stream` (until 0) in chunks of `chunk` bytes.
fn pop_all(m: &mut TcpMedium, stream: u32, chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        let n = m.popdata(stream, &mut buf).unwrap_or_else(|e| panic!("popdata of stream {stream}: {e}"));
        assert!(n <= chunk);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// Pops exactly `len` bytes of `stream`.
fn pop_exact(m: &mut TcpMedium, stream: u32, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = m.popdata(stream, &mut out[done..]).unwrap_or_else(|e| panic!("popdata of stream {stream}: {e}"));
        assert!(n > 0, "stream {stream} ended after {done} of {len} bytes");
        done += n;
    }
    out
}

fn buffered(m: &TcpMedium) -> u64 {
    lock(&m.shared.inbox).buffered
}

/// Frame bytes, for raw peers.
fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = header(kind, stream, payload.len()).to_vec();
    v.extend_from_slice(payload);
    v
}

#[test]
fn interleaved_streams_with_a_64_mib_stream_round_trip() {
    let (mut src, mut dst) = media(30_000);
    let mut expected: Vec<Vec<u8>> = vec![Vec::new(); 6];
    let mut push = |src: &mut TcpMedium, s: u32, data: Vec<u8>| {
        src.pushdata(s, &data).expect("pushdata");
        expected[s as usize].extend_from_slice(&data);
    };
    let big = pattern(5, MAX_FRAME + 12_345);
    for round in 0..40u64 {
        for s in 1..=4u32 {
            // From empty to a few MiB: gathered small frames and straight sends interleave.
            let len = [0usize, 1, 17, 4096, 100, 2 << 20, 65_537, 3, 65_535][(round as usize + s as usize) % 9];
            push(&mut src, s, pattern(round * 10 + u64::from(s), len));
        }
        match round {
            // One push larger than a frame: it goes out as two frames.
            10 => push(&mut src, 5, big.clone()),
            20 => push(&mut src, 5, pattern(6, 3 << 20)),
            _ => push(&mut src, 5, pattern(round, 40)),
        }
    }
    push(&mut src, 0, pattern(99, 10_000));
    src.flush().expect("flush");
    command(&mut src, json!({"op":"end"}));

    // Everything was received (and buffered) before the destination popped a byte.
    let total: usize = expected.iter().map(Vec::len).sum();
    assert_eq!(buffered(&dst), total as u64);
    assert_eq!(pop_all(&mut dst, 0, 333), expected[0], "stream 0");
    for (s, chunk) in [(1u32, 7_919usize), (2, 1), (3, (3 << 20) + 1), (4, 65_536), (5, 4_093)] {
        if s == 2 {
            // One byte at a time for a while, then the rest.
            let head = pop_exact(&mut dst, 2, 5_000);
            let mut back = head;
            back.extend(pop_all(&mut dst, 2, 1 << 20));
            assert!(back == expected[2], "bytes of stream 2 differ");
            continue;
        }
        let back = pop_all(&mut dst, s, chunk);
        assert_eq!(back.len(), expected[s as usize].len(), "length of stream {s}");
        assert!(back == expected[s as usize], "bytes of stream {s} differ");
    }
    assert_eq!(buffered(&dst), 0);
    let info = command(&mut dst, json!({"op":"info"}));
    assert_eq!(info["bytes_received"], command(&mut src, json!({"op":"info"}))["bytes_sent"]);
}

#[test]
fn stream_0_is_read_first_while_pushed_last() {
    let (mut src, mut dst) = media(30_000);
    let sizes = [0usize, 5 << 20, 3 << 20, (7 << 20) + 3];
    let sender = thread::spawn(move || {
        for (s, &len) in sizes.iter().enumerate().skip(1) {
            for part in pattern(s as u64, len).chunks(2 << 20) {
                src.pushdata(s as u32, &header(0, s as u32, part.len())).expect("push header");
                src.pushdata(s as u32, part).expect("push");
                thread::sleep(Duration::from_millis(5));
            }
        }
        src.pushdata(0, b"inventory").expect("push inventory");
        src.flush().expect("flush");
        command(&mut src, json!({"op":"end"}));
        src
    });
    // Blocks until stream 0 arrives, which is after all the others.
    let inv = pop_all(&mut dst, 0, 4);
    assert_eq!(inv, b"inventory");
    let others: usize = sizes.iter().map(|l| l + l.div_ceil(2 << 20) * HEADER_LEN).sum();
    assert_eq!(buffered(&dst), others as u64);
    for (s, &len) in sizes.iter().enumerate().skip(1) {
        let back = pop_all(&mut dst, s as u32, 1 << 20);
        let mut want = Vec::new();
        for part in pattern(s as u64, len).chunks(2 << 20) {
            want.extend_from_slice(&header(0, s as u32, part.len()));
            want.extend_from_slice(part);
        }
        assert!(back == want, "bytes of stream {s} differ");
    }
    let _src = sender.join().expect("sender thread");
}

#[test]
fn a_wait_lasts_while_data_of_other_streams_keeps_arriving() {
    // The timeout counts silence, not the whole wait: stream 0 may wait for an image
    // that takes far longer than the timeout to arrive.
    let (mut src, mut dst) = media(600);
    let sender = thread::spawn(move || {
        for i in 0..12u8 {
            src.pushdata(1, &[i; 1000]).expect("push");
            src.flush().expect("flush");
            thread::sleep(Duration::from_millis(100));
        }
        src.pushdata(0, b"last").expect("push");
        src.flush().expect("flush");
        src
    });
    let started = Instant::now();
    assert_eq!(pop_exact(&mut dst, 0, 4), b"last");
    assert!(started.elapsed() > Duration::from_millis(1000));
    assert_eq!(pop_exact(&mut dst, 1, 12_000).len(), 12_000);
    let _src = sender.join().expect("sender thread");
}

#[test]
fn flush_returns_only_after_the_peer_reader_has_the_data() {
    let (mut src, dst) = media(30_000);
    let mut total = 0u64;
    for round in 0..5usize {
        let big = pattern(round as u64, (8 << 20) + round);
        src.pushdata(2, &big).expect("push");
        // Small pushes are gathered: flush must send them too.
        src.pushdata(3, b"small").expect("push");
        total += big.len() as u64 + 5;
        src.flush().expect("flush");
        assert_eq!(buffered(&dst), total, "after flush {}", round + 1);
    }
}

#[test]
fn flush_to_a_peer_that_never_acknowledges_fails() {
    let (mut src, mut raw) = medium_and_raw(300);
    src.pushdata(1, b"hello").expect("push");
    let started = Instant::now();
    let e = err_of(src.flush(), "flush");
    assert_eq!(e, "no data from the peer for 0.3 s while waiting for the peer to acknowledge flush 1");
    assert!(started.elapsed() >= Duration::from_millis(300));
    let mut got = vec![0u8; 2 * HEADER_LEN + 5 + 8];
    raw.read_exact(&mut got).expect("raw read");
    assert_eq!(&got[..HEADER_LEN + 5], frame(T_DATA, 1, b"hello").as_slice());
    assert_eq!(&got[HEADER_LEN + 5..], frame(T_FLUSH, 0, &1u64.to_le_bytes()).as_slice());
}

#[test]
fn a_push_to_a_peer_that_reads_nothing_times_out() {
    let (mut src, _raw) = medium_and_raw(300);
    let data = vec![7u8; 32 << 20];
    let started = Instant::now();
    let e = loop {
        // Socket buffers take a few MiB; then the kernel waits for the peer.
        if let Err(e) = src.pushdata(1, &data) {
            break e;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "pushes never failed");
    };
    assert_eq!(e, format!("cannot send {} bytes of stream 1: the peer took no data for 0.3 s", 32 << 20));
    // The connection may hold half a frame now: nothing more goes out.
    let e = err_of(src.pushdata(1, &data), "push after a failed push");
    assert!(e.contains("an earlier send to the peer failed"), "{e}");
    let e = err_of(src.flush(), "flush after a failed push");
    assert!(e.contains("an earlier send to the peer failed"), "{e}");
}

#[test]
fn control_messages_both_ways() {
    let (mut a, mut b) = media(5_000);
    command(&mut a, json!({"op":"send","msg":{"hello":1}}));
    a.pushdata(4, b"data between messages").expect("push");
    command(&mut a, json!({"op":"send","msg":[1,2,3]}));
    command(&mut a, json!({"op":"send","msg":"text"}));
    assert_eq!(command(&mut b, json!({"op":"recv"})), json!({"msg":{"hello":1}}));
    assert_eq!(command(&mut b, json!({"op":"recv","timeout_ms":1000})), json!({"msg":[1,2,3]}));
    assert_eq!(command(&mut b, json!({"op":"recv"})), json!({"msg":"text"}));
    assert_eq!(pop_exact(&mut b, 4, 21), b"data between messages");

    command(&mut b, json!({"op":"send","msg":{"restored":true,"pid":42}}));
    assert_eq!(command(&mut a, json!({"op":"recv"}))["msg"], json!({"restored":true,"pid":42}));

    // Nothing waiting.
    assert_eq!(
        command_err(&mut a, r#"{"op":"recv","timeout_ms":0}"#),
        "no control message from the peer is waiting"
    );
    let started = Instant::now();
    assert_eq!(
        command_err(&mut a, r#"{"op":"recv","timeout_ms":100}"#),
        "nothing from the peer within 0.1 s while waiting for a control message"
    );
    assert!(started.elapsed() >= Duration::from_millis(100));
    // Too large.
    let huge = "x".repeat(MAX_CTRL);
    let e = command_err(&mut a, &json!({"op":"send","msg":huge}).to_string());
    assert!(e.starts_with("control message of 1048578 bytes is over the limit"), "{e}");
    // The connection is still fine.
    command(&mut a, json!({"op":"send","msg":null}));
    assert_eq!(command(&mut b, json!({"op":"recv"})), json!({"msg":null}));
}

#[test]
fn end_then_popdata_returns_zero() {
    let (mut src, mut dst) = media(5_000);
    src.pushdata(1, b"abc").expect("push");
    assert_eq!(command(&mut src, json!({"op":"end"})), json!({"ok":true}));
    // Twice is harmless.
    assert_eq!(command(&mut src, json!({"op":"end"})), json!({"ok":true}));
    let e = err_of(src.pushdata(1, b"more"), "push after end");
    assert_eq!(e, "cannot push to stream 1: the end of the stream data was already sent");
    assert_eq!(pop_all(&mut dst, 1, 2), b"abc");
    let mut buf = [0u8; 8];
    for s in [1u32, 0, 7, MAX_STREAM] {
        for _ in 0..3 {
            assert_eq!(dst.popdata(s, &mut buf).expect("popdata"), 0, "stream {s}");
        }
    }
    // Flushes and control messages still work after END.
    src.flush().expect("flush after end");
    command(&mut src, json!({"op":"send","msg":"after end"}));
    assert_eq!(command(&mut dst, json!({"op":"recv"}))["msg"], "after end");
    // Stream ids are bounded on this side too.
    let e = err_of(dst.popdata(MAX_STREAM + 1, &mut buf), "popdata of a bad stream");
    assert_eq!(e, "stream id 1025 is over the limit of 1024");
    let e = err_of(dst.pushdata(5000, b"x"), "push to a bad stream");
    assert_eq!(e, "stream id 5000 is over the limit of 1024");
}

#[test]
fn peer_disconnect_mid_stream_is_an_error_on_popdata() {
    let (mut src, mut dst) = media(30_000);
    let data = pattern(1, 1 << 20);
    src.pushdata(1, &data).expect("push");
    src.flush().expect("flush");
    drop(src);
    let started = Instant::now();
    // What had arrived is still handed out, then the loss is reported.
    assert!(pop_exact(&mut dst, 1, data.len()) == data);
    let mut buf = vec![0u8; 4096];
    let e = err_of(dst.popdata(1, &mut buf), "popdata after the peer left");
    assert_eq!(e, "connection to the peer lost while waiting for stream 1 (the peer closed the connection)");
    let e = err_of(dst.popdata(2, &mut buf), "popdata after the peer left");
    assert!(e.starts_with("connection to the peer lost while waiting for stream 2"), "{e}");
    let e = command_err(&mut dst, r#"{"op":"recv"}"#);
    assert!(e.starts_with("connection to the peer lost while waiting for a control message"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn peer_disconnect_is_an_error_on_pushdata_and_flush() {
    let (mut src, dst) = media(30_000);
    src.pushdata(1, &pattern(2, 100_000)).expect("push");
    drop(dst);
    let started = Instant::now();
    let e = err_of(src.flush(), "flush after the peer left");
    assert!(e.contains("connection to the peer lost"), "{e}");
    let e = err_of(src.pushdata(1, &pattern(3, 3 << 20)), "push after the peer left");
    assert!(e.contains("connection to the peer lost"), "{e}");
    let e = command_err(&mut src, r#"{"op":"send","msg":1}"#);
    assert!(e.contains("connection to the peer lost"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn peer_disconnect_in_the_middle_of_a_frame() {
    let (mut dst, mut raw) = medium_and_raw(30_000);
    let mut bytes = frame(T_DATA, 3, b"whole frame");
    bytes.extend_from_slice(&header(T_DATA, 3, 1000));
    bytes.extend_from_slice(&[1u8; 10]);
    raw.write_all(&bytes).expect("raw write");
    drop(raw);
    assert_eq!(pop_exact(&mut dst, 3, 11), b"whole frame");
    let e = err_of(dst.popdata(3, &mut [0u8; 64]), "popdata of a cut frame");
    assert_eq!(
        e,
        "connection to the peer lost while waiting for stream 3 (the peer closed the connection in the middle of a frame)"
    );
}

/// Sends `bytes` from a raw peer and answers the error a popdata then gets; checks that
/// the medium shut the connection down and refuses pushes too.
fn garbage_error(bytes: &[u8]) -> String {
    let (mut m, mut raw) = medium_and_raw(5_000);
    raw.write_all(bytes).expect("raw write");
    let started = Instant::now();
    // recv waits until the reader gives up (a popdata could see a legitimate END first).
    let e = command_err(&mut m, r#"{"op":"recv"}"#);
    assert!(started.elapsed() < Duration::from_secs(3));
    // Later calls of every kind fail the same way.
    assert_eq!(err_of(m.popdata(1, &mut [0u8; 64]), "popdata after garbage"), e);
    assert_eq!(err_of(m.popdata(2, &mut [0u8; 64]), "second popdata"), e);
    assert_eq!(err_of(m.pushdata(1, b"x"), "push after garbage"), e);
    assert_eq!(err_of(m.flush(), "flush after garbage"), e);
    assert_eq!(command_err(&mut m, r#"{"op":"recv","timeout_ms":0}"#), e);
    // The peer sees the connection closed rather than waiting on us.
    raw.set_read_timeout(Some(Duration::from_secs(5))).expect("read timeout");
    let mut sink = Vec::new();
    match raw.read_to_end(&mut sink) {
        Ok(_) => {}
        Err(err) => assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}"),
    }
    e
}

#[test]
fn garbage_frames_are_refused() {
    assert_eq!(
        garbage_error(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        "peer sent a frame of unknown type 0x47: refusing (is the peer a ferry tcp medium?)"
    );
    assert_eq!(
        garbage_error(&[T_DATA, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
        "peer sent a frame of 4294967295 bytes: refusing (the limit is 64 MiB)"
    );
    assert_eq!(
        garbage_error(&header(T_DATA, 4097, 4)),
        "peer sent a frame for stream 4097: refusing (stream ids go up to 1024)"
    );
    assert_eq!(
        garbage_error(&frame(T_FLUSH, 0, b"abc")),
        "peer sent a FLUSH frame of 3 bytes: refusing"
    );
    assert_eq!(
        garbage_error(&frame(T_END, 3, b"")),
        "peer sent a control frame of type 4 for stream 3: refusing"
    );
    let e = garbage_error(&frame(T_CTRL, 0, b"{not json"));
    assert!(e.starts_with("peer sent a control message that is not JSON ("), "{e}");
    let mut after_end = frame(T_END, 0, b"");
    after_end.extend(frame(T_DATA, 1, b"late"));
    assert_eq!(garbage_error(&after_end), "peer sent data for stream 1 after its end of data: refusing");
}

#[test]
fn garbage_after_good_frames_still_fails_popdata() {
    // Once the peer has shown it is out of step, even data queued before is not trusted.
    let (mut m, mut raw) = medium_and_raw(5_000);
    let mut bytes = frame(T_DATA, 1, b"good");
    bytes.push(0xee);
    bytes.extend_from_slice(&[0u8; 8]);
    raw.write_all(&bytes).expect("raw write");
    let e = loop {
        match m.popdata(1, &mut [0u8; 2]) {
            Ok(n) => assert!(n > 0),
            Err(e) => break e,
        }
    };
    assert!(e.starts_with("peer sent a frame of unknown type 0xee"), "{e}");
}

#[test]
fn a_silent_peer_times_out() {
    let (_src, mut dst) = media(200);
    let started = Instant::now();
    let e = err_of(dst.popdata(1, &mut [0u8; 16]), "popdata from a silent peer");
    assert_eq!(e, "no data from the peer for 0.2 s while waiting for stream 1");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(5), "{waited:?}");
    let e = command_err(&mut dst, r#"{"op":"recv"}"#);
    assert_eq!(e, "no data from the peer for 0.2 s while waiting for a control message");
    // A timeout breaks nothing: data that comes later is read.
    let (mut src, mut dst) = media(200);
    assert!(dst.popdata(1, &mut [0u8; 16]).is_err());
    src.pushdata(1, b"late").expect("push");
    src.flush().expect("flush");
    assert_eq!(pop_exact(&mut dst, 1, 4), b"late");
}

#[test]
fn bad_params_are_refused_and_leave_the_fd_open() {
    assert_eq!(open_err("{}"), "missing key \"fd\" in params");
    assert_eq!(
        open_err(r#"{"fd":-1}"#),
        "key \"fd\" in params must be a file descriptor number (an integer from 0), got -1"
    );
    assert!(open_err(r#"{"fd":"7"}"#).starts_with("key \"fd\" in params must be a file descriptor number"));
    assert!(open_err(r#"{"fd":1e3}"#).starts_with("key \"fd\" in params must be a file descriptor number"));
    assert_eq!(
        open_err(r#"{"fd":7,"host":"x"}"#),
        "unknown key \"host\" in params (known keys: \"fd\", \"timeout_ms\")"
    );
    assert!(open_err("fd=7").starts_with("params are not valid JSON"));
    assert!(open_err("[7]").starts_with("params must be a JSON object like"));
    assert_eq!(
        open_err(r#"{"fd":7,"timeout_ms":0}"#),
        "key \"timeout_ms\" in params must be an integer from 1 to 86400000, got 0"
    );
    assert_eq!(open_err(r#"{"fd":1000000}"#), "fd 1000000 is not open");

    let fd_is_open = |fd: RawFd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
    let file = tempfile::tempfile().expect("temp file");
    let fd = file.as_raw_fd();
    assert_eq!(open_err(&json!({"fd": fd}).to_string()), format!("fd {fd} is not a socket"));
    assert!(fd_is_open(fd));
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let fd = listener.as_raw_fd();
    assert_eq!(open_err(&json!({"fd": fd}).to_string()), format!("fd {fd} is not a connected socket"));
    assert!(fd_is_open(fd));
    let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
    let fd = udp.as_raw_fd();
    assert!(open_err(&json!({"fd": fd}).to_string()).starts_with(&format!("fd {fd} is not a stream socket")));
    assert!(fd_is_open(fd));
}

#[test]
fn commands_and_their_errors() {
    let (mut a, mut b) = media(5_000);
    let info = command(&mut a, json!({"op":"info"}));
    assert_eq!(info["medium"], "tcp");
    assert_eq!(info["timeout_ms"], 5000);
    let peer = info["peer"].as_str().expect("peer text");
    assert!(peer.starts_with("127.0.0.1:"), "{peer}");
    a.pushdata(1, &[1u8; 100]).expect("push");
    a.flush().expect("flush");
    let info = command(&mut a, json!({"op":"info"}));
    assert_eq!(info["bytes_sent"], 2 * HEADER_LEN + 100 + 8);
    assert_eq!(info["bytes_received"], HEADER_LEN + 8);
    assert_eq!(command(&mut b, json!({"op":"info"}))["buffered_bytes"], 100);

    let reply = command(&mut a, json!({"op":"buffer","bytes":1 << 20}));
    assert_eq!(reply["ok"], true);
    assert!(reply["sndbuf"].as_u64().expect("sndbuf") >= 4096);
    assert!(command_err(&mut a, r#"{"op":"buffer","bytes":10}"#).starts_with("key \"bytes\" in command \"buffer\" must be"));
    assert_eq!(command_err(&mut a, r#"{"op":"buffer"}"#), "missing key \"bytes\" in command \"buffer\"");
    assert_eq!(
        command_err(&mut a, r#"{"op":"fly"}"#),
        "unknown op \"fly\" (known ops: \"send\", \"recv\", \"end\", \"info\", \"buffer\")"
    );
    assert_eq!(command_err(&mut a, r#"{"op":"send"}"#), "missing key \"msg\" in command \"send\"");
    assert!(command_err(&mut a, r#"{"op":"recv","timeout_ms":-5}"#).starts_with("key \"timeout_ms\" in command \"recv\""));
    assert!(command_err(&mut a, r#"{"op":"info","x":1}"#).starts_with("unknown key \"x\""));
    assert!(command_err(&mut a, "{").starts_with("command are not valid JSON"));
    assert_eq!(command_err(&mut a, r#"{"op":3}"#), "key \"op\" in command must be a string, got 3");
    // After all those refusals the connection still works.
    command(&mut a, json!({"op":"send","msg":"still here"}));
    assert_eq!(command(&mut b, json!({"op":"recv"}))["msg"], "still here");
}

#[test]
fn works_over_a_unix_socket_pair() {
    let (x, y) = UnixStream::pair().expect("socketpair");
    let (mut a, mut b) = (open_on(x, 5_000), open_on(y, 5_000));
    a.pushdata(3, b"over unix").expect("push");
    a.flush().expect("flush");
    command(&mut a, json!({"op":"end"}));
    assert_eq!(pop_all(&mut b, 3, 64), b"over unix");
    assert_eq!(command(&mut b, json!({"op":"info"}))["peer"], "unix socket");
}

#[test]
fn socket_settings_left_by_the_handshake_do_not_matter() {
    let (a, b) = tcp_pair();
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_millis(50))).expect("read timeout");
        s.set_nonblocking(true).expect("nonblocking");
    }
    let (mut src, mut dst) = (open_on(a, 5_000), open_on(b, 5_000));
    // Longer than the old receive timeout, with the reader idle.
    thread::sleep(Duration::from_millis(200));
    src.pushdata(1, &pattern(4, 5 << 20)).expect("push");
    src.flush().expect("flush");
    assert!(pop_exact(&mut dst, 1, 5 << 20) == pattern(4, 5 << 20));
}

#[test]
fn drop_does_not_hang() {
    // A medium blocked in nothing, one with data queued, one whose peer is gone.
    let (a, b) = media(30_000);
    let started = Instant::now();
    drop(a);
    drop(b);
    let (mut a, b) = media(30_000);
    a.pushdata(1, &pattern(1, 10 << 20)).expect("push");
    a.pushdata(1, b"gathered, never sent").expect("push");
    drop(b);
    drop(a);
    // Closing the medium closes the socket: the raw peer sees the end.
    let (m, mut raw) = medium_and_raw(30_000);
    drop(m);
    raw.set_read_timeout(Some(Duration::from_secs(5))).expect("read timeout");
    assert_eq!(raw.read(&mut [0u8; 16]).expect("read"), 0);
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn both_sides_flush_while_pushing_at_once() {
    // Bulk data both ways, flushes both ways: ACKs are sent by whichever thread holds
    // the write side, so neither side waits for the other forever.
    let (mut a, mut b) = media(10_000);
    let data = pattern(8, 4 << 20);
    let d2 = data.clone();
    let t = thread::spawn(move || {
        for _ in 0..8 {
            b.pushdata(1, &d2).expect("push b");
            b.flush().expect("flush b");
        }
        b
    });
    for _ in 0..8 {
        a.pushdata(1, &data).expect("push a");
        a.flush().expect("flush a");
    }
    let mut b = t.join().expect("thread b");
    assert_eq!(pop_exact(&mut a, 1, 32 << 20).len(), 32 << 20);
    assert_eq!(pop_exact(&mut b, 1, 32 << 20).len(), 32 << 20);
}

/// Not a check: prints the throughput of the medium next to a raw write loop, both over
/// loopback, 1 GiB in 2 MiB pushes. `cargo test --release -p ferry-medium-tcp
/// throughput -- --nocapture` to see it.
#[test]
fn throughput_against_a_raw_socket() {
    const TOTAL: usize = 1 << 30;
    const BLOCK: usize = 2 << 20;
    let block = pattern(3, BLOCK);

    let (mut raw_tx, mut raw_rx) = tcp_pair();
    raw_tx.set_nodelay(true).expect("nodelay");
    let started = Instant::now();
    let rx = thread::spawn(move || {
        let mut buf = vec![0u8; BLOCK];
        let mut got = 0usize;
        while got < TOTAL {
            match raw_rx.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => panic!("raw read: {e}"),
            }
        }
        got
    });
    for _ in 0..TOTAL / BLOCK {
        raw_tx.write_all(&block).expect("raw write");
    }
    assert_eq!(rx.join().expect("raw reader"), TOTAL);
    let raw = started.elapsed();

    let (mut src, mut dst) = media(30_000);
    let started = Instant::now();
    let rx = thread::spawn(move || {
        let mut buf = vec![0u8; BLOCK];
        let mut got = 0usize;
        while got < TOTAL {
            let n = dst.popdata(1, &mut buf).expect("popdata");
            assert!(n > 0);
            got += n;
        }
        (got, dst)
    });
    for _ in 0..TOTAL / BLOCK {
        src.pushdata(1, &block).expect("push");
    }
    src.flush().expect("flush");
    let (got, _dst) = rx.join().expect("medium reader");
    assert_eq!(got, TOTAL);
    let medium = started.elapsed();

    let gbps = |d: Duration| TOTAL as f64 / d.as_secs_f64() / 1e9;
    println!(
        "1 GiB over loopback in 2 MiB pushes: raw write loop {:.2} GB/s ({:?}), tcp medium {:.2} GB/s ({:?})",
        gbps(raw),
        raw,
        gbps(medium),
        medium
    );
}
