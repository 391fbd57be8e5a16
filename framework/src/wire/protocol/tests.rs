use super::*;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::thread;

const KEY: &[u8] = b"0123456789abcdef-shared-key";
const OTHER_KEY: &[u8] = b"fedcba9876543210-another-key";

fn local() -> Local {
    Local {
        arch: "x86_64".into(),
        page_size: 4096,
        protocol_max: PROTOCOL_VERSION,
        plugins: vec![
            PluginRef::new("tcp", "0.1"),
            PluginRef::new("memory", "0.2"),
            PluginRef::new("signals", "0.3"),
        ],
        features: vec!["ptrace".into(), "userfaultfd".into()],
        seen_tokens: Vec::new(),
        claim_token: None,
    }
}

fn hello() -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        arch: "x86_64".into(),
        page_size: 4096,
        token: crate::random::new_token(),
        request_id: 7,
        pid: 4242,
        strategy: "pre-copy".into(),
        medium: PluginRef::new("tcp", "0.1"),
        subsystems: vec![
            PluginRef::new("memory", "0.2"),
            PluginRef::new("signals", "0.3"),
        ],
        features: vec!["userfaultfd".into()],
        plugin_params: Default::default(),
    }
}

/// Runs the daemon's auth + handshake on one end of a socket pair in a thread, the
/// client's on the other end, and returns both results.
fn run(
    client_key: Option<&'static [u8]>,
    server_key: Option<&'static [u8]>,
    hello: Hello,
    local: Local,
) -> (Result<Welcome, ProtocolError>, Result<Hello, ProtocolError>) {
    let (mut c, mut s) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        authenticate_server(&mut s, server_key)?;
        server_handshake(&mut s, &local, 99)
    });
    let client =
        authenticate_client(&mut c, client_key).and_then(|()| client_handshake(&mut c, &hello));
    drop(c);
    (client, server.join().unwrap())
}

fn text<T: fmt::Debug>(r: &Result<T, ProtocolError>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn right_key_authenticates_and_welcomes() {
    let h = hello();
    let (client, server) = run(Some(KEY), Some(KEY), h.clone(), local());
    let welcome = client.unwrap();
    assert_eq!(welcome.token, h.token);
    assert_eq!(welcome.request_id, 99);
    assert_eq!(welcome.protocol, PROTOCOL_VERSION);
    assert_eq!(server.unwrap(), h);
}

#[test]
fn no_keys_exchange_nothing_for_auth() {
    let h = hello();
    let (client, server) = run(None, None, h.clone(), local());
    assert_eq!(client.unwrap().token, h.token);
    assert_eq!(server.unwrap().request_id, 7);
}

#[test]
fn wrong_key_fails_on_both_sides() {
    let (client, server) = run(Some(OTHER_KEY), Some(KEY), hello(), local());
    assert_eq!(
        text(&client),
        "the daemon does not know our key (authentication failed)"
    );
    assert_eq!(
        text(&server),
        "the client does not know the key (authentication failed)"
    );
}

#[test]
fn wrong_client_proof_is_refused() {
    // A client that gets past the daemon's proof (it cannot, without the key) but
    // sends a bad proof of its own.
    let (mut c, mut s) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || authenticate_server(&mut s, Some(KEY)));
    send(
        &mut c,
        &Message::AuthHello {
            client_nonce: [1; 32],
        },
    )
    .unwrap();
    assert!(matches!(
        recv(&mut c).unwrap(),
        Message::AuthChallenge { .. }
    ));
    send(
        &mut c,
        &Message::AuthProof {
            client_proof: [2; 32],
        },
    )
    .unwrap();
    assert_eq!(
        recv(&mut c).unwrap(),
        Message::Refused {
            reason: "authentication failed".into()
        }
    );
    assert_eq!(
        text(&server.join().unwrap()),
        "the client does not know the key (authentication failed)"
    );
}

#[test]
fn proofs_bind_both_nonces_and_the_direction() {
    let a = proof_bytes(proof(KEY, SERVER_LABEL, &[1; 32], &[2; 32]).unwrap());
    assert_ne!(
        a,
        proof_bytes(proof(KEY, CLIENT_LABEL, &[1; 32], &[2; 32]).unwrap())
    );
    assert_ne!(
        a,
        proof_bytes(proof(KEY, SERVER_LABEL, &[2; 32], &[1; 32]).unwrap())
    );
    assert_ne!(
        a,
        proof_bytes(proof(OTHER_KEY, SERVER_LABEL, &[1; 32], &[2; 32]).unwrap())
    );
    assert_ne!(random_nonce().unwrap(), random_nonce().unwrap());
}

#[test]
fn key_on_the_daemon_only() {
    let (client, server) = run(None, Some(KEY), hello(), local());
    assert_eq!(
        text(&client),
        "authentication required: the daemon has a key configured, the client sent none"
    );
    assert!(matches!(client, Err(ProtocolError::Refused(_))));
    assert_eq!(
        text(&server),
        "the client sent no key, but this daemon requires one (authentication required)"
    );
}

#[test]
fn key_on_the_client_only() {
    let (client, server) = run(Some(KEY), None, hello(), local());
    assert_eq!(
        text(&client),
        "this daemon has no key configured, but the client uses one"
    );
    assert_eq!(
        text(&server),
        "the client uses a key, but this daemon has none configured"
    );
}

#[test]
fn check_hello_accepts_a_matching_source() {
    assert_eq!(check_hello(&hello(), &local()), Ok(()));
}

#[test]
fn check_hello_names_what_differs() {
    type Change = fn(&mut Hello);
    let cases: Vec<(Change, &str)> = vec![
        (
            |h| h.subsystems.push(PluginRef::new("files", "0.3")),
            "destination lacks subsystem plugin files 0.3",
        ),
        (
            |h| h.subsystems[1].version = "0.4".into(),
            "destination has subsystem plugin signals 0.3, the source uses 0.4",
        ),
        (
            |h| h.medium = PluginRef::new("rdma", "0.1"),
            "destination lacks medium plugin rdma 0.1",
        ),
        (
            |h| h.page_size = 16384,
            "page size 16384 on the source, 4096 here",
        ),
        (
            |h| h.arch = "aarch64".into(),
            "architecture aarch64 on the source, x86_64 here",
        ),
        (
            |h| h.protocol = 9,
            "protocol version 9 is newer than this daemon's 3",
        ),
        (
            |h| h.protocol = 0,
            "protocol version 0 is older than this daemon accepts (3 to 3)",
        ),
        (
            |h| {
                h.plugin_params.insert("files".into(), [("tcp_close".to_string(), "1".to_string())].into());
            },
            "options are given for plugin files, which the request does not use",
        ),
        (
            |h| h.features.push("soft-dirty".into()),
            "destination lacks kernel feature soft-dirty",
        ),
        (
            |h| h.token = "xyz".into(),
            "the source sent a malformed token \"xyz\" (expected 32 lowercase hex characters)",
        ),
    ];
    for (change, line) in cases {
        let mut h = hello();
        change(&mut h);
        assert_eq!(check_hello(&h, &local()), Err(line.to_string()));
    }
    let mut l = local();
    l.plugins.retain(|p| p.name != "tcp");
    assert_eq!(
        check_hello(&hello(), &l),
        Err("destination lacks medium plugin tcp 0.1".into())
    );
    l = local();
    l.features.clear();
    assert_eq!(
        check_hello(&hello(), &l),
        Err("destination lacks kernel feature userfaultfd".into())
    );
}

#[test]
fn a_mismatch_reaches_the_client_as_its_line() {
    let mut h = hello();
    h.subsystems[1].version = "0.1".into();
    let (client, server) = run(Some(KEY), Some(KEY), h, local());
    assert_eq!(
        text(&client),
        "destination has subsystem plugin signals 0.3, the source uses 0.1"
    );
    assert!(matches!(server, Err(ProtocolError::Incompatible(_))));
}

#[test]
fn a_newer_hello_that_does_not_parse_is_refused_by_version() {
    let (mut c, mut s) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || server_handshake(&mut s, &local(), 1));
    let body = br#"{"type":"hello","protocol":4,"something":"new"}"#;
    c.write_all(&(body.len() as u32).to_le_bytes()).unwrap();
    c.write_all(body).unwrap();
    assert_eq!(
        recv(&mut c).unwrap(),
        Message::Refused {
            reason: "protocol version 4 is newer than this daemon's 3".into()
        }
    );
    assert!(matches!(
        server.join().unwrap(),
        Err(ProtocolError::Incompatible(_))
    ));
}

#[test]
fn the_handshake_consumes_exactly_its_own_bytes() {
    let (mut c, mut s) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        authenticate_server(&mut s, Some(KEY)).unwrap();
        // The client writes medium bytes right after its hello, before our answer.
        server_handshake(&mut s, &local(), 5).unwrap();
        let mut rest = [0u8; 11];
        s.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"MEDIUM-DATA");
        s.write_all(b"FROM-DAEMON").unwrap();
    });
    authenticate_client(&mut c, Some(KEY)).unwrap();
    let h = hello();
    // Hello and medium data in one write: the daemon must not read past the hello.
    let body = serde_json::to_vec(&Message::Hello(h.clone())).unwrap();
    let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
    bytes.extend_from_slice(&body);
    bytes.extend_from_slice(b"MEDIUM-DATA");
    c.write_all(&bytes).unwrap();
    match recv(&mut c).unwrap() {
        Message::Welcome(w) => assert_eq!(w.request_id, 5),
        other => panic!("{other:?}"),
    }
    server.join().unwrap();
    let mut rest = [0u8; 11];
    c.read_exact(&mut rest).unwrap();
    assert_eq!(&rest, b"FROM-DAEMON");
}

#[test]
fn recv_reads_one_message_at_a_time() {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    send(&mut a, &Message::AuthOk).unwrap();
    send(&mut a, &Message::Refused { reason: "x".into() }).unwrap();
    a.write_all(b"tail").unwrap();
    drop(a);
    assert_eq!(recv(&mut b).unwrap(), Message::AuthOk);
    assert_eq!(
        recv(&mut b).unwrap(),
        Message::Refused { reason: "x".into() }
    );
    let mut tail = Vec::new();
    b.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, b"tail");
}

fn recv_bytes(bytes: &[u8]) -> Result<Message, ProtocolError> {
    recv(&mut io::Cursor::new(bytes.to_vec()))
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

#[test]
fn oversized_messages_are_refused_before_reading_them() {
    let r = recv_bytes(&((2u32 << 20).to_le_bytes()));
    assert_eq!(
        text(&r),
        "peer sent a message of 2097152 bytes (limit 1 MiB)"
    );
    assert!(recv_bytes(&framed(&vec![b' '; MAX_MESSAGE + 1])).is_err());
}

#[test]
fn a_peer_that_speaks_text_is_not_a_ferry_daemon() {
    // An HTTP server on the port: "HTTP" read as a length is 1347703880.
    let r = recv_bytes(b"HTTP/1.1 400 Bad Request\r\n");
    assert_eq!(text(&r), "the peer is not a ferry daemon: it speaks text (\"HTTP\"…)");
    let r = recv_bytes(b"SSH-2.0-OpenSSH_9.2\r\n");
    assert!(text(&r).contains("not a ferry daemon"), "{}", text(&r));
}

#[test]
fn garbage_and_unknown_types_are_clear_errors() {
    let r = recv_bytes(&framed(b"not json"));
    assert!(text(&r).starts_with("peer sent garbage: "), "{}", text(&r));
    let r = recv_bytes(&framed(br#"{"reason":"x"}"#));
    assert_eq!(
        text(&r),
        "peer sent garbage: a message without a \"type\" field"
    );
    let r = recv_bytes(&framed(br#"{"type":"teleport"}"#));
    assert_eq!(
        text(&r),
        "peer sent a message of unknown type \"teleport\" (is it a different version of ferry?)"
    );
    let r = recv_bytes(&framed(br#"{"type":"auth_hello","client_nonce":"abcd"}"#));
    assert!(
        text(&r).starts_with("peer sent garbage: auth_hello message: "),
        "{}",
        text(&r)
    );
    let r = recv_bytes(&framed(b""));
    assert!(matches!(r, Err(ProtocolError::Garbage(_))));
}

#[test]
fn eof_before_and_inside_a_message() {
    assert_eq!(
        text(&recv_bytes(b"")),
        "the peer closed the connection during the handshake"
    );
    assert_eq!(
        text(&recv_bytes(&[5, 0])),
        "the peer closed the connection in the middle of a message (2 of 4 bytes)"
    );
    let mut partial = 100u32.to_le_bytes().to_vec();
    partial.extend_from_slice(b"{\"type\":");
    assert_eq!(
        text(&recv_bytes(&partial)),
        "the peer closed the connection in the middle of a message (12 of 104 bytes)"
    );
    // The daemon's side: a client that connects and hangs up.
    let (c, mut s) = UnixStream::pair().unwrap();
    drop(c);
    assert!(matches!(
        authenticate_server(&mut s, Some(KEY)),
        Err(ProtocolError::Closed)
    ));
}

#[test]
fn messages_round_trip_with_hex_nonces() {
    let m = Message::AuthChallenge {
        server_nonce: [0xab; 32],
        server_proof: [0x01; 32],
    };
    let json = serde_json::to_string(&m).unwrap();
    assert!(json.contains(r#""type":"auth_challenge""#), "{json}");
    assert!(json.contains(&"ab".repeat(32)), "{json}");
    assert_eq!(recv_bytes(&framed(json.as_bytes())).unwrap(), m);
    let h = Message::Hello(hello());
    assert_eq!(
        recv_bytes(&framed(&serde_json::to_vec(&h).unwrap())).unwrap(),
        h
    );
}

#[test]
fn verdicts_round_trip() {
    let mut pids = BTreeMap::new();
    pids.insert("4242".to_string(), 17);
    for v in [
        Verdict::Rebuilt {
            pids,
            restore_ms: 12.5,
        },
        Verdict::Failed {
            reason: "no memory".into(),
        },
        Verdict::Commit,
        Verdict::Abort {
            reason: "user".into(),
        },
        Verdict::Released,
        Verdict::Ready,
        Verdict::Run,
    ] {
        assert_eq!(Verdict::from_json(&v.to_json()).unwrap(), v);
    }
    assert_eq!(Verdict::Commit.to_json(), r#"{"type":"commit"}"#);
    assert!(matches!(
        Verdict::from_json(r#"{"type":"hello"}"#),
        Err(ProtocolError::UnknownType(_))
    ));
    assert!(matches!(
        Verdict::from_json("{"),
        Err(ProtocolError::Garbage(_))
    ));
}

fn key_file(dir: &Path, contents: &[u8], mode: u32) -> PathBuf {
    let path = dir.join("key");
    std::fs::write(&path, contents).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

#[test]
fn load_key_trims_the_newline() {
    let dir = tempfile::tempdir().unwrap();
    let path = key_file(dir.path(), b"0123456789abcdef\n", 0o600);
    assert_eq!(load_key(&path).unwrap(), b"0123456789abcdef");
    let path = key_file(dir.path(), b"0123456789abcdefXYZ", 0o400);
    assert_eq!(load_key(&path).unwrap(), b"0123456789abcdefXYZ");
}

#[test]
fn load_key_refuses_open_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let path = key_file(dir.path(), b"0123456789abcdef\n", 0o640);
    assert_eq!(
        text(&load_key(&path)),
        format!(
            "key file {}: its mode is 0640; group and others must have no access (chmod 600 it)",
            path.display()
        )
    );
    let path = key_file(dir.path(), b"0123456789abcdef\n", 0o604);
    assert!(text(&load_key(&path)).contains("its mode is 0604"));
}

#[test]
fn load_key_refuses_short_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = key_file(dir.path(), b"0123456789abcde\n", 0o600);
    assert_eq!(
        text(&load_key(&path)),
        format!(
            "key file {}: the key is 15 bytes; it must be at least 16",
            path.display()
        )
    );
    let missing = dir.path().join("absent");
    assert!(text(&load_key(&missing))
        .starts_with(&format!("key file {}: cannot open it", missing.display())));
}

// A key file another user owns is refused: tests/tests/cli.rs (only root can give a
// file away, and a skip there is loud).

#[test]
fn a_silent_peer_is_named_so_not_by_errno() {
    // A socket's read timeout reads as EAGAIN: "Resource temporarily unavailable".
    struct Silent;
    impl std::io::Read for Silent {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
        }
    }
    let r = recv(&mut Silent);
    assert!(text(&r).starts_with("no answer from the peer in time"), "{}", text(&r));
}

#[test]
fn hellos_that_cannot_name_an_event_are_refused() {
    let mut h = hello();
    h.strategy = "teleport".into();
    assert!(check_hello(&h, &local()).unwrap_err().contains("unknown strategy \"teleport\""));
    let mut h = hello();
    h.pid = -1;
    assert!(check_hello(&h, &local()).unwrap_err().contains("names no process (pid -1)"));
    let h = hello();
    let mut here = local();
    here.seen_tokens.push(h.token.clone());
    assert!(check_hello(&h, &here).unwrap_err().contains("already seen"));
}

#[test]
fn a_hello_carries_plugin_options_and_says_protocol_3_with_or_without() {
    // Protocol 3 (post-copy's ready/run) is the oldest either side accepts: a daemon that
    // would drop the options is refused for its version, options or not.
    let plain = Hello::new(1, 2, "stop-copy", PluginRef::new("tcp", "0.1"), vec![PluginRef::new("files", "0.1")], vec![]);
    assert_eq!(plain.protocol, PROTOCOL_VERSION);
    assert!(!serde_json::to_string(&plain).unwrap().contains("plugin_params"));
    let params = std::collections::BTreeMap::from([("files".to_string(), std::collections::BTreeMap::from([("tcp_close".to_string(), "1".to_string())]))]);
    let with = plain.with_params(params.clone());
    assert_eq!(with.protocol, PROTOCOL_VERSION);
    let back: Hello = serde_json::from_str(&serde_json::to_string(&with).unwrap()).unwrap();
    assert_eq!(back.plugin_params, params);
}
