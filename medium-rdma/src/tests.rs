//! The medium between two instances in this process, over loopback on libfabric's
//! `tcp` provider. Skipped, loudly, where libfabric or that provider is absent.

use std::net::{TcpListener, TcpStream};
use std::os::fd::IntoRawFd;
use std::time::{Duration, Instant};

use super::*;

fn have_tcp_provider() -> bool {
    match fabric::offers(Some("tcp")) {
        Ok(o) if !o.is_empty() => true,
        other => {
            eprintln!("SKIP: libfabric's tcp provider is not here ({other:?}); install libfabric1");
            false
        }
    }
}

fn sockets() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

/// Opens both ends at once (each waits for the other's part of the handshake).
fn pair_with(params: Value, timeout_ms: u64) -> (Result<RdmaMedium, String>, Result<RdmaMedium, String>) {
    let (a, b) = sockets();
    let (fa, fb) = (a.into_raw_fd(), b.into_raw_fd());
    let pa = json!({"fd": fa, "timeout_ms": timeout_ms, "initiator": true, "params": params}).to_string();
    let pb = json!({"fd": fb, "timeout_ms": timeout_ms}).to_string();
    let t = std::thread::spawn(move || RdmaMedium::open(&pb));
    let ma = RdmaMedium::open(&pa);
    let mb = t.join().unwrap();
    (ma, mb)
}

fn pair() -> (RdmaMedium, RdmaMedium) {
    let (a, b) = pair_with(json!({"provider": "tcp", "ring": 4, "slot_kib": 64}), 10_000);
    (a.unwrap(), b.unwrap())
}

fn read_exact(m: &mut RdmaMedium, stream: u32, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = m.popdata(stream, &mut out[got..]).unwrap();
        assert!(n > 0, "stream {stream} ended after {got} of {len} bytes");
        got += n;
    }
    out
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[3] ^ seed).collect()
}

#[test]
fn streams_of_every_size_arrive_exactly_beside_commands_and_flushes() {
    if !have_tcp_provider() {
        return;
    }
    let (mut a, mut b) = pair();
    let sizes = [1usize, 15, 4096, 65_535, 65_536, 1 << 20, 3 << 20];
    let sender = std::thread::spawn(move || {
        for (i, &len) in sizes.iter().enumerate() {
            for stream in 1..=3u32 {
                a.pushdata(stream, &pattern(len, (i as u8) ^ stream as u8)).unwrap();
            }
            a.command(&json!({"op": "send", "msg": {"round": i}}).to_string()).unwrap();
        }
        a.flush().unwrap();
        a.command(r#"{"op":"end","open":[3]}"#).unwrap();
        a.pushdata(3, b"after the end").unwrap();
        a.flush().unwrap();
        let reply = a.command(r#"{"op":"recv","timeout_ms":10000}"#).unwrap();
        assert_eq!(reply, r#"{"msg":{"done":true}}"#);
        a
    });
    // Read the streams in another order than they were sent: all is queued meanwhile.
    for (i, &len) in sizes.iter().enumerate() {
        let msg = b.command(r#"{"op":"recv"}"#).unwrap();
        assert_eq!(msg, format!(r#"{{"msg":{{"round":{i}}}}}"#));
        for stream in [3u32, 1, 2] {
            assert!(read_exact(&mut b, stream, len) == pattern(len, (i as u8) ^ stream as u8), "stream {stream}, {len} bytes");
        }
    }
    assert_eq!(read_exact(&mut b, 3, 13), b"after the end");
    let mut byte = [0u8; 1];
    assert_eq!(b.popdata(1, &mut byte).unwrap(), 0, "stream 1 is over after END");
    b.command(r#"{"op":"send","msg":{"done":true}}"#).unwrap();
    let a = sender.join().unwrap();
    let info: Value = serde_json::from_str(&b.command(r#"{"op":"info"}"#).unwrap()).unwrap();
    assert_eq!(info["medium"], "rdma");
    assert!(info["provider"].as_str().unwrap().starts_with("tcp"), "{info}");
    assert_eq!(info["buffered_bytes"], 0);
    drop(a);
}

#[test]
fn a_peer_that_goes_away_fails_the_wait_at_once_after_what_it_sent() {
    if !have_tcp_provider() {
        return;
    }
    let (mut a, mut b) = pair();
    a.pushdata(1, b"last words").unwrap();
    a.flush().unwrap();
    drop(a);
    assert_eq!(read_exact(&mut b, 1, 10), b"last words");
    let started = Instant::now();
    let err = b.popdata(1, &mut [0u8; 8]).unwrap_err();
    assert!(err.contains("connection to the peer lost"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

#[test]
fn bytes_on_the_control_socket_after_the_handshake_are_refused() {
    if !have_tcp_provider() {
        return;
    }
    let (a, b) = sockets();
    let fb = b.into_raw_fd();
    // A fake initiator that offers tcp, then writes garbage instead of its part.
    let t = std::thread::spawn(move || RdmaMedium::open(&json!({"fd": fb, "timeout_ms": 5000}).to_string()));
    let mut a = a;
    send_msg(&mut a, &json!({"ok": true, "providers": ["tcp;ofi_rxm", "tcp"], "slots": 4, "slot_size": 65536})).unwrap();
    let answer = recv_msg(&mut a).unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    a.write_all(b"\x05\x00\x00\x00garbage").unwrap();
    let err = t.join().unwrap().err().expect("garbage accepted");
    assert!(err.contains("no JSON"), "{err}");
}

#[test]
fn a_provider_that_is_not_here_is_refused_on_both_sides_in_one_line() {
    if !have_tcp_provider() {
        return;
    }
    let (a, b) = pair_with(json!({"provider": "nosuchprovider"}), 5000);
    let ea = a.err().expect("opened without the provider");
    let eb = b.err().expect("the destination opened without the provider");
    assert!(ea.contains("nosuchprovider") && !ea.contains('\n'), "{ea}");
    assert!(eb.contains("the source's rdma medium cannot work") && eb.contains("nosuchprovider"), "{eb}");
}

#[test]
fn params_are_checked() {
    assert!(parse_params(Some(&json!({"ring": 1}))).unwrap_err().contains("ring must be"));
    assert!(parse_params(Some(&json!({"slot_kib": 65536, "ring": 1024}))).unwrap_err().contains("over 1 GiB"));
    assert!(parse_params(Some(&json!({"provider": "a b"}))).unwrap_err().contains("not a libfabric provider"));
    assert!(parse_params(Some(&json!({"speed": 1}))).unwrap_err().contains("speed"));
    assert_eq!(parse_params(Some(&json!({"provider": "auto"}))).unwrap().provider, None);
}
