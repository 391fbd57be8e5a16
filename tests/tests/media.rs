//! One conformance suite for the network media, run against each through the plugin
//! ABI as ferry loads them (`tcp`, and `rdma` on libfabric's `tcp` provider): many
//! streams at once, payloads from 1 byte to 64 MiB, interleaved control messages,
//! `flush`, `end` with a stream left open, and a peer that goes away mid-stream. A new
//! network medium is accepted when it passes these. (The file medium, which writes an
//! image that is read later rather than a stream to a peer, has its own tests.)

use std::{
    net::{TcpListener, TcpStream},
    os::fd::IntoRawFd,
    time::{Duration, Instant},
};

use ferry::engine::manager::{Lease, Manager};
use ferry_plugin_api::{
    abi_stable::std_types::{RSlice, RSliceMut, RStr},
    MediumBox, PluginKind,
};
use ferry_tests::{needs, plugin_dir};

/// An opened medium and the lease that keeps its plugin registered.
struct Opened {
    medium: MediumBox,
    _lease: Lease,
}

fn libfabric_here() -> bool {
    ["/usr/lib/x86_64-linux-gnu/libfabric.so.1", "/usr/lib/aarch64-linux-gnu/libfabric.so.1", "/usr/lib64/libfabric.so.1"]
        .iter()
        .any(|p| std::path::Path::new(p).exists())
}

/// The media under test: tcp always, rdma where libfabric is (else said loudly).
fn media() -> Vec<&'static str> {
    let mut m = vec!["tcp"];
    if needs(libfabric_here(), "libfabric1 (scripts/setup installs it): the rdma medium's run is skipped") {
        m.push("rdma");
    }
    m
}

/// Both ends of `medium` over a loopback connection, opened at once (a medium may
/// shake hands with its peer as it opens): (source, destination).
fn pair(medium: &str, timeout_ms: u64) -> (Opened, Opened) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    let manager = Manager::new();
    manager.discover(&plugin_dir()).unwrap();
    let open = |fd: i32, initiator: bool| {
        let lease = manager.acquire(PluginKind::Medium, medium).unwrap();
        let mut params = serde_json::json!({"fd": fd, "timeout_ms": timeout_ms});
        if medium == "rdma" {
            params["initiator"] = initiator.into();
            if initiator {
                params["params"] = serde_json::json!({"provider": "tcp", "ring": 8, "slot_kib": 256});
            }
        }
        let medium = lease.open_medium(&params).unwrap_or_else(|e| panic!("opening {params}: {e}"));
        Opened { medium, _lease: lease }
    };
    let (fa, fb) = (a.into_raw_fd(), b.into_raw_fd());
    std::thread::scope(|s| {
        let dst = s.spawn(|| open(fb, false));
        let src = open(fa, true);
        (src, dst.join().unwrap())
    })
}

fn push(m: &mut MediumBox, stream: u32, data: &[u8]) {
    m.pushdata(stream, RSlice::from_slice(data)).into_result().unwrap();
}

fn command(m: &mut MediumBox, cmd: serde_json::Value) -> Result<serde_json::Value, String> {
    let reply = m.command(RStr::from_str(&cmd.to_string())).into_result().map_err(|e| e.message.into_string())?;
    Ok(serde_json::from_str(reply.as_str()).unwrap())
}

fn pop(m: &mut MediumBox, stream: u32, buf: &mut [u8]) -> Result<usize, String> {
    m.popdata(stream, RSliceMut::from_mut_slice(buf)).into_result().map_err(|e| e.message.into_string())
}

fn pop_exact(m: &mut MediumBox, stream: u32, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = pop(m, stream, &mut out[got..]).unwrap();
        assert!(n > 0, "stream {stream} ended after {got} of {len} bytes");
        got += n;
    }
    out
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)).to_le_bytes()[2]).collect()
}

const SIZES: [usize; 7] = [1, 7, 4096, 65_535, 65_536, 3 << 20, 64 << 20];

#[test]
fn every_network_medium_carries_many_streams_exactly_beside_commands_and_flushes() {
    for medium in media() {
        let (mut src, mut dst) = pair(medium, 20_000);
        let sender = std::thread::spawn(move || {
            for (i, &len) in SIZES.iter().enumerate() {
                // The largest only on one stream: 64 MiB three times is slow in debug builds.
                for stream in (1..=3u32).filter(|&s| len < 64 << 20 || s == 2) {
                    push(&mut src.medium, stream, &pattern(len, i as u32 * 7 + stream));
                }
                command(&mut src.medium, serde_json::json!({"op": "send", "msg": {"size": len}})).unwrap();
                if i % 2 == 0 {
                    src.medium.flush().into_result().unwrap();
                }
            }
            command(&mut src.medium, serde_json::json!({"op": "end", "open": [9]})).unwrap();
            push(&mut src.medium, 9, b"after the end");
            src.medium.flush().into_result().unwrap();
            let reply = command(&mut src.medium, serde_json::json!({"op": "recv", "timeout_ms": 20_000})).unwrap();
            assert_eq!(reply["msg"]["done"], true, "{medium}: {reply}");
            src
        });
        for (i, &len) in SIZES.iter().enumerate() {
            let msg = command(&mut dst.medium, serde_json::json!({"op": "recv"})).unwrap();
            assert_eq!(msg["msg"]["size"], len, "{medium}: the control messages keep their order");
            // Popped in another order than pushed: each stream is queued meanwhile.
            for stream in [3u32, 1, 2].into_iter().filter(|&s| len < 64 << 20 || s == 2) {
                let got = pop_exact(&mut dst.medium, stream, len);
                assert!(got == pattern(len, i as u32 * 7 + stream), "{medium}: stream {stream}, {len} bytes differ");
            }
        }
        assert_eq!(pop_exact(&mut dst.medium, 9, 13), b"after the end", "{medium}");
        assert_eq!(pop(&mut dst.medium, 1, &mut [0u8; 4]).unwrap(), 0, "{medium}: stream 1 is over after END");
        let info = command(&mut dst.medium, serde_json::json!({"op": "info"})).unwrap();
        assert_eq!(info["medium"], medium, "{info}");
        assert_eq!(info["buffered_bytes"], 0, "{medium}: {info}");
        command(&mut dst.medium, serde_json::json!({"op": "send", "msg": {"done": true}})).unwrap();
        drop(sender.join().unwrap());
    }
}

#[test]
fn every_network_medium_fails_a_reader_whose_peer_goes_away_mid_stream_without_hanging() {
    for medium in media() {
        let (mut src, mut dst) = pair(medium, 20_000);
        push(&mut src.medium, 1, &pattern(1 << 20, 1));
        src.medium.flush().into_result().unwrap();
        drop(src);
        // What arrived is handed out; then the loss is an error, long before the timeout.
        assert!(pop_exact(&mut dst.medium, 1, 1 << 20) == pattern(1 << 20, 1), "{medium}");
        let started = Instant::now();
        let err = pop(&mut dst.medium, 1, &mut [0u8; 16]).expect_err("more data from a peer that is gone");
        assert!(err.contains("connection to the peer lost"), "{medium}: {err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{medium}: noticed after {:?}", started.elapsed());
        let err = command(&mut dst.medium, serde_json::json!({"op": "send", "msg": 1})).and_then(|_| dst.medium.flush().into_result().map_err(|e| e.message.into_string()));
        assert!(err.is_err(), "{medium}: a flush to a peer that is gone succeeded");
    }
}
