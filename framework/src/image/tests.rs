use super::*;
use std::collections::HashMap;

/// A source that answers in odd-sized pieces, as a socket does.
struct Choppy<'a> {
    data: &'a [u8],
    state: u64,
}

impl Pull for Choppy<'_> {
    fn pull(&mut self, buf: &mut [u8]) -> Result<usize, String> {
        // xorshift: deterministic, sizes 1..=7919
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let size = (self.state % 7919 + 1) as usize;
        let n = size.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fn inventory() -> Inventory {
    Inventory {
        format_version: FORMAT_VERSION,
        token: "0123456789abcdef0123456789abcdef".to_string(),
        created_unix_ms: 1_714_564_800_123,
        ferry_version: "0.1.0".to_string(),
        medium: "file".to_string(),
        plugins: vec![
            PluginEntry {
                name: "memory".into(),
                version: "0.1.0".into(),
                stream: 1,
                records: 0,
                bytes: 0,
            },
            PluginEntry {
                name: "threads".into(),
                version: "0.2.0".into(),
                stream: 2,
                records: 0,
                bytes: 0,
            },
        ],
        processes: vec![ProcessEntry {
            pid: 4242,
            tids: vec![4242, 4243],
            comm: "sleep".into(),
            scratch: 0x7f00_0000_0000,
            start: "b0a7/1234".into(),
            stopped: false,
            parent: 0,
            streams: Vec::new(),
            shared_fds: Vec::new(),
            pgid: 0,
            sid: 0,
            exit_signal: None,
            zombies: Vec::new(),
            subreaper: false,
        }],
    }
}

/// An inventory stream with any version and body, checksummed correctly.
fn raw_inventory(version: u32, body: &[u8]) -> Vec<u8> {
    let mut out = INVENTORY_MAGIC.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&xxh3_64(body).to_le_bytes());
    out
}

fn read_all(data: &[u8], stream: u32) -> Result<Vec<RecordOwned>, ImageError> {
    let mut r = RecordReader::new(data, stream);
    let mut out = Vec::new();
    while let Some(rec) = r.next()? {
        out.push(rec);
    }
    Ok(out)
}

#[test]
fn inventory_round_trip() {
    let inv = inventory();
    let bytes = inv.encode().unwrap();
    assert_eq!(&bytes[..8], b"FERRYIMG");
    assert_eq!(Inventory::decode(&bytes).unwrap(), inv);
    let mut src = Choppy {
        data: &bytes,
        state: 7,
    };
    assert_eq!(Inventory::read_from(&mut src).unwrap(), inv);
    let mut src = ReadPull(std::io::Cursor::new(bytes.clone()));
    assert_eq!(Inventory::read_from(&mut src).unwrap(), inv);
    assert_eq!(
        inv.plugin_for_stream(2).map(|p| p.name.as_str()),
        Some("threads")
    );
    assert!(inv.plugin_for_stream(3).is_none());
}

/// A tree of two: the sample's process and a child of it, each with its two streams.
fn tree() -> Inventory {
    let mut inv = inventory();
    inv.processes[0].streams = vec![1, 2];
    let mut child = inv.processes[0].clone();
    (child.pid, child.tids, child.parent, child.streams) = (4250, vec![4250], 4242, vec![3, 4]);
    inv.processes.push(child);
    for (name, stream) in [("memory", 3), ("threads", 4)] {
        let mut e = inv.plugins[(stream - 3) as usize].clone();
        (e.name, e.stream) = (name.into(), stream);
        inv.plugins.push(e);
    }
    inv
}

#[test]
fn a_tree_lists_each_process_with_its_parent_and_streams() {
    let inv = tree();
    let back = Inventory::decode(&inv.encode().unwrap()).unwrap();
    assert_eq!(back, inv);
    let streams: Vec<u32> = back.processes[1].plugins(&back).iter().map(|e| e.stream).collect();
    assert_eq!((back.processes[1].parent, streams), (4242, vec![3, 4]));
    // Not a tree: a stream twice, a parent outside the image, a root with a parent,
    // a process without its streams.
    let refused = |inv: Inventory, what: &str| {
        let e = inv.encode().expect_err(what).to_string();
        assert!(e.contains(what), "{e}");
    };
    let mut bad = tree();
    bad.processes[1].streams = vec![1, 2];
    refused(bad, "stream 1 is claimed by two processes");
    let mut bad = tree();
    bad.processes[1].parent = 77;
    refused(bad, "process 4250 has parent 77");
    let mut bad = tree();
    bad.processes[0].parent = 4250;
    refused(bad, "process 4242 has parent 4250");
    let mut bad = tree();
    bad.processes[1].streams = vec![3];
    refused(bad, "process 4250's streams [3]");
    // A one-process image names no parent and no streams.
    let one = String::from_utf8_lossy(&inventory().encode().unwrap()).to_string();
    assert!(!one.contains("\"parent\"") && !one.contains("\"streams\""), "{one}");
}

#[test]
fn fresh_inventory_encodes() {
    let inv = Inventory::new("tcp");
    assert!(crate::random::is_token(&inv.token));
    assert!(inv.created_unix_ms > 1_600_000_000_000);
    assert_eq!(Inventory::decode(&inv.encode().unwrap()).unwrap(), inv);
}

#[test]
fn inventory_bad_magic() {
    let mut bytes = inventory().encode().unwrap();
    bytes[0] = b'X';
    let e = Inventory::decode(&bytes).unwrap_err();
    assert!(e.to_string().starts_with("not a ferry image"), "{e}");
    let e = Inventory::read_from(&mut &b"\x7fELF\x02\x01\x01\0"[..]).unwrap_err();
    assert!(matches!(e, ImageError::NotAnImage { .. }), "{e}");
    assert!(e.to_string().contains("\\x7fELF"), "{e}");
}

#[test]
fn inventory_other_version() {
    let body = serde_json::to_vec(&inventory()).unwrap();
    let e = Inventory::decode(&raw_inventory(7, &body)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "image format version 7, this ferry reads version 1"
    );
    let e = Inventory::read_from(&mut &raw_inventory(7, &body)[..]).unwrap_err();
    assert!(matches!(
        e,
        ImageError::Version {
            found: 7,
            supported: 1
        }
    ));
    // A header saying 1 over a body saying 2 is refused too.
    let mut inv = inventory();
    inv.format_version = 2;
    let body = serde_json::to_vec(&inv).unwrap();
    let e = Inventory::decode(&raw_inventory(1, &body)).unwrap_err();
    assert!(e.to_string().contains("format version 2"), "{e}");
}

#[test]
fn inventory_checksum() {
    let good = inventory().encode().unwrap();
    for i in INVENTORY_HEAD_LEN..good.len() {
        let mut bytes = good.clone();
        bytes[i] ^= 0x20;
        let e = Inventory::decode(&bytes).unwrap_err();
        assert_eq!(
            e.to_string(),
            "inventory checksum mismatch: the image is corrupt"
        );
    }
}

#[test]
fn inventory_every_flip_and_cut_is_refused() {
    let good = inventory().encode().unwrap();
    for i in 0..good.len() {
        for bit in 0..8 {
            let mut bytes = good.clone();
            bytes[i] ^= 1 << bit;
            assert!(
                Inventory::decode(&bytes).is_err(),
                "flip of bit {bit} of byte {i}"
            );
            assert!(
                Inventory::read_from(&mut &bytes[..]).is_err(),
                "flip of bit {bit} of byte {i}"
            );
        }
    }
    for cut in 0..good.len() {
        let e = Inventory::read_from(&mut &good[..cut]).unwrap_err();
        assert!(
            matches!(e, ImageError::InventoryTruncated { .. }),
            "cut at {cut}: {e}"
        );
    }
    let mut long = good.clone();
    long.push(0);
    assert!(matches!(
        Inventory::decode(&long),
        Err(ImageError::InventoryTrailing { extra: 1 })
    ));
    assert!(matches!(
        Inventory::read_from(&mut &long[..]),
        Err(ImageError::InventoryTrailing { extra: 1 })
    ));
}

#[test]
fn inventory_length_is_capped_before_reading() {
    let mut bytes = INVENTORY_MAGIC.to_vec();
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.extend_from_slice(&(MAX_INVENTORY + 1).to_le_bytes());
    let e = Inventory::read_from(&mut &bytes[..]).unwrap_err();
    assert!(matches!(e, ImageError::InventoryTooLarge { .. }), "{e}");
    // Under the cap but far more than the stream holds: truncated, not allocated.
    let mut bytes = INVENTORY_MAGIC.to_vec();
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.extend_from_slice(&MAX_INVENTORY.to_le_bytes());
    bytes.extend_from_slice(b"{}");
    let e = Inventory::read_from(&mut &bytes[..]).unwrap_err();
    assert!(
        matches!(e, ImageError::InventoryTruncated { at: 18, .. }),
        "{e}"
    );
}

#[test]
fn inventory_unknown_key() {
    let mut v = serde_json::to_value(inventory()).unwrap();
    v["surprise"] = json!(1);
    let e = Inventory::decode(&raw_inventory(1, &serde_json::to_vec(&v).unwrap())).unwrap_err();
    assert!(e.to_string().contains("unknown field `surprise`"), "{e}");
    let mut v = serde_json::to_value(inventory()).unwrap();
    v["plugins"][1]["extra"] = json!(true);
    let e = Inventory::decode(&raw_inventory(1, &serde_json::to_vec(&v).unwrap())).unwrap_err();
    assert!(e.to_string().contains("plugins[1]"), "{e}");
}

#[test]
fn inventory_nonsense_is_refused_both_ways() {
    type Breakage = (fn(&mut Inventory), &'static str);
    let cases: Vec<Breakage> = vec![
        (|i| i.token = "XYZ".into(), "token"),
        (|i| i.plugins[1].stream = 1, "listed twice"),
        (|i| i.plugins[0].stream = 0, "stream 0"),
        (|i| i.plugins[0].name.clear(), "no name"),
        (|i| i.processes[0].pid = 0, "pid 0"),
    ];
    for (break_it, words) in cases {
        let mut inv = inventory();
        break_it(&mut inv);
        let e = inv.encode().unwrap_err();
        assert!(e.to_string().contains(words), "{e}");
        let e = Inventory::decode(&raw_inventory(1, &serde_json::to_vec(&inv).unwrap()))
            .unwrap_err();
        assert!(e.to_string().contains(words), "{e}");
    }
}

#[test]
fn records_round_trip() {
    let big: Vec<u8> = (0..5u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut stream = Vec::new();
    stream.extend(json_record("header", &json!({"pid": 7, "name": "x"})).unwrap());
    stream.extend(frame("empty", RecordFormat::Raw, &[]).unwrap());
    // Large payloads: header pushed, then the payload as it is.
    stream.extend(frame_header("pages", RecordFormat::Raw, &big).unwrap());
    stream.extend_from_slice(&big);
    stream.extend(frame("regs.x86_64-v2", RecordFormat::Raw, &[1, 2, 3]).unwrap());
    stream
        .extend(json_record("vmas", &vec![json!({"start": 1}), json!({"start": 2})]).unwrap());

    for seed in [1u64, 99, 12345] {
        let mut r = RecordReader::new(
            Choppy {
                data: &stream,
                state: seed,
            },
            3,
        );
        let mut got = Vec::new();
        while let Some(rec) = r.next().unwrap() {
            got.push(rec);
        }
        assert_eq!(got.len(), 5);
        assert_eq!(r.records_read(), 5);
        assert_eq!(r.bytes_read(), stream.len() as u64);
        assert_eq!(got[0].kind, "header");
        assert_eq!(got[0].format, RecordFormat::Json);
        let v: Value = parse_json(&got[0]).unwrap();
        assert_eq!(v["pid"], 7);
        assert_eq!(
            got[1],
            RecordOwned {
                kind: "empty".into(),
                format: RecordFormat::Raw,
                payload: vec![]
            }
        );
        assert_eq!(got[2].kind, "pages");
        assert!(got[2].payload == big);
        assert_eq!(got[3].payload, vec![1, 2, 3]);
        let vmas: Vec<Value> = parse_json(&got[4]).unwrap();
        assert_eq!(vmas.len(), 2);
        // End of stream stays the end.
        assert!(r.next().unwrap().is_none());
        let entry = PluginEntry {
            name: "m".into(),
            version: "1".into(),
            stream: 3,
            records: 5,
            bytes: stream.len() as u64,
        };
        r.check_against(&entry).unwrap();
    }
    assert!(read_all(&[], 1).unwrap().is_empty());
}

#[test]
fn every_flipped_bit_is_detected() {
    let rec = frame("files", RecordFormat::Json, br#"{"fd":3,"path":"/tmp/x"}"#).unwrap();
    for i in 0..rec.len() {
        for bit in 0..8 {
            let mut bad = rec.clone();
            bad[i] ^= 1 << bit;
            let r = read_all(&bad, 2);
            assert!(
                r.is_err(),
                "flip of bit {bit} of byte {i} went unnoticed: {r:?}"
            );
        }
        let mut bad = rec.clone();
        bad[i] ^= 0xff;
        assert!(read_all(&bad, 2).is_err(), "flip of byte {i}");
    }
}

#[test]
fn truncation_is_only_clean_at_a_boundary() {
    let records = [
        frame("a", RecordFormat::Raw, b"0123456789").unwrap(),
        frame("bb", RecordFormat::Json, b"[1,2]").unwrap(),
        frame("c", RecordFormat::Raw, b"").unwrap(),
    ];
    let stream: Vec<u8> = records.concat();
    let mut boundaries = vec![0usize];
    for r in &records {
        boundaries.push(boundaries.last().unwrap() + r.len());
    }
    for cut in 0..=stream.len() {
        let result = read_all(&stream[..cut], 2);
        match boundaries.iter().position(|&b| b == cut) {
            Some(n) => assert_eq!(result.unwrap().len(), n, "cut at {cut}"),
            None => {
                let e = result.unwrap_err();
                assert!(
                    matches!(e, ImageError::Truncated { stream: 2, at, .. } if at == cut as u64),
                    "cut at {cut}: {e}"
                );
            }
        }
    }
}

#[test]
fn truncated_message_names_kind_offset_and_shortfall() {
    let mut stream = frame("first", RecordFormat::Raw, &[0; 75]).unwrap(); // 24 + 5 + 75 = 104
    let page = vec![7u8; 4096];
    stream.extend(frame("pages", RecordFormat::Raw, &page).unwrap()); // payload from 104 + 29 = 133
    stream.truncate(133);
    let e = read_all(&stream, 2).unwrap_err();
    assert_eq!(
        e.to_string(),
        "stream 2: truncated record `pages` at byte 133 (expected 4096 more bytes)"
    );
    let e = read_all(&stream[..110], 2).unwrap_err();
    assert_eq!(
        e.to_string(),
        "stream 2: truncated record header at byte 110 (expected 18 more bytes)"
    );
}

#[test]
fn an_oversized_claim_does_not_allocate() {
    // A header claiming 200 MiB (under the cap) over a stream holding 10 bytes.
    let claim = 200u64 << 20;
    let mut rec = frame("pages", RecordFormat::Raw, b"").unwrap();
    rec[8..16].copy_from_slice(&claim.to_le_bytes());
    rec.extend_from_slice(b"0123456789");
    let e = read_all(&rec, 2).unwrap_err();
    assert!(
        matches!(e, ImageError::Truncated { missing, .. } if missing == claim - 10),
        "{e}"
    );

    // The buffer that would hold it grows only with what arrives.
    let mut buf = Vec::new();
    let got = pull_bounded(&mut &b"0123456789"[..], claim, &mut buf, None).unwrap();
    assert_eq!(got, 10);
    assert_eq!(buf, b"0123456789");
    assert!(buf.capacity() <= READ_CHUNK, "capacity {}", buf.capacity());
    // And with a stream that does hold more, it stays within twice what arrived.
    let data = vec![1u8; 3 * READ_CHUNK + 5];
    let mut buf = Vec::new();
    let got = pull_bounded(&mut &data[..], claim, &mut buf, None).unwrap();
    assert_eq!(got, data.len() as u64);
    assert!(
        buf.capacity() <= 2 * (data.len() + READ_CHUNK),
        "capacity {}",
        buf.capacity()
    );
}

#[test]
fn header_faults_name_stream_and_offset() {
    let first = frame("ok", RecordFormat::Raw, b"x").unwrap();
    let at = first.len() as u64;
    let good = frame("pages", RecordFormat::Raw, b"abc").unwrap();
    let check = |patch: &dyn Fn(&mut Vec<u8>), want: &dyn Fn(&ImageError) -> bool| {
        let mut rec = good.clone();
        patch(&mut rec);
        let stream = [first.clone(), rec].concat();
        let e = read_all(&stream, 5).unwrap_err();
        assert!(want(&e), "{e}");
        assert!(e.to_string().starts_with("stream 5"), "{e}");
        assert!(e.to_string().contains(&format!("byte {at}")), "{e}");
    };
    check(&|r| r[0] = b'G', &|e| {
        matches!(e, ImageError::BadMagic { .. })
    });
    check(&|r| r[6] = 1, &|e| {
        matches!(e, ImageError::Reserved { value: 1, .. })
    });
    check(&|r| r[4] = 2, &|e| {
        matches!(e, ImageError::UnknownFormat { format: 2, .. })
    });
    check(&|r| r[5] = 0, &|e| matches!(e, ImageError::BadKind { .. }));
    check(&|r| r[5] = 65, &|e| matches!(e, ImageError::BadKind { .. }));
    check(&|r| r[24] = b'P', &|e| {
        matches!(e, ImageError::BadKind { .. })
    });
    check(&|r| r[24] = 0xff, &|e| {
        matches!(e, ImageError::BadKind { .. })
    });
    check(
        &|r| r[8..16].copy_from_slice(&(MAX_RECORD + 1).to_le_bytes()),
        &|e| matches!(e, ImageError::RecordTooLarge { .. }),
    );
    check(
        &|r| r[16] ^= 1,
        &|e| matches!(e, ImageError::Checksum { kind, .. } if kind == "pages"),
    );
    // A changed payload byte: only the checksum can tell.
    check(&|r| *r.last_mut().unwrap() = b'z', &|e| {
        matches!(e, ImageError::Checksum { .. })
    });
}

#[test]
fn reader_stops_after_an_error() {
    let mut stream = frame("a", RecordFormat::Raw, b"1").unwrap();
    stream[0] = 0;
    stream.extend(frame("b", RecordFormat::Raw, b"2").unwrap());
    let mut r = RecordReader::new(&stream[..], 1);
    assert!(matches!(r.next(), Err(ImageError::BadMagic { .. })));
    assert!(matches!(
        r.next(),
        Err(ImageError::AfterError { stream: 1, at: 0 })
    ));
}

#[test]
fn a_lying_or_failing_source_is_an_error() {
    struct Liar;
    impl Pull for Liar {
        fn pull(&mut self, buf: &mut [u8]) -> Result<usize, String> {
            Ok(buf.len() + 1)
        }
    }
    let e = RecordReader::new(Liar, 1).next().unwrap_err();
    assert!(matches!(e, ImageError::Source { .. }), "{e}");
    struct Broken;
    impl Pull for Broken {
        fn pull(&mut self, _: &mut [u8]) -> Result<usize, String> {
            Err("connection reset".into())
        }
    }
    let e = RecordReader::new(Broken, 4).next().unwrap_err();
    assert_eq!(
        e.to_string(),
        "stream 4: reading the record at byte 0 failed: connection reset"
    );
    let e = Inventory::read_from(&mut Liar).unwrap_err();
    assert!(matches!(e, ImageError::InventorySource { .. }), "{e}");
}

#[test]
fn read_pull_retries_interrupted_reads() {
    struct Flaky(bool, std::io::Cursor<Vec<u8>>);
    impl Read for Flaky {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0 = !self.0;
            if self.0 {
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            let n = buf.len().min(3);
            self.1.read(&mut buf[..n])
        }
    }
    let data = frame("x", RecordFormat::Raw, b"hello world").unwrap();
    let mut r = RecordReader::new(ReadPull(Flaky(false, std::io::Cursor::new(data))), 1);
    assert_eq!(r.next().unwrap().unwrap().payload, b"hello world");
    assert!(r.next().unwrap().is_none());
}

#[test]
fn writers_refuse_bad_kinds_and_sizes() {
    for kind in ["", "Pages", "a b", "é", &"k".repeat(65)] {
        let e = frame(kind, RecordFormat::Raw, b"").unwrap_err();
        assert!(matches!(e, ImageError::InvalidKind { .. }), "{kind:?}: {e}");
    }
    frame(&"k".repeat(64), RecordFormat::Raw, b"").unwrap();
    frame("a-b_c.0", RecordFormat::Raw, b"").unwrap();
    let e = check_frame("pages", MAX_RECORD + 1).unwrap_err();
    assert!(e.to_string().contains("write it in chunks"), "{e}");
    check_frame("pages", MAX_RECORD).unwrap();
    // A map with non-string keys cannot be JSON: an error, not a panic.
    let m: HashMap<(u8, u8), u8> = [((1, 2), 3)].into_iter().collect();
    let e = json_record("map", &m).unwrap_err();
    assert!(matches!(e, ImageError::Serialize { .. }), "{e}");
}

#[test]
fn parse_json_names_the_kind() {
    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct Fd {
        fd: i32,
    }
    let rec = RecordOwned {
        kind: "fds".into(),
        format: RecordFormat::Json,
        payload: br#"{"fd":"three"}"#.to_vec(),
    };
    let e = parse_json::<Fd>(&rec).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("record `fds` does not parse: fd:"),
        "{e}"
    );
    let rec = RecordOwned {
        kind: "pages".into(),
        format: RecordFormat::Raw,
        payload: b"{}".to_vec(),
    };
    let e = parse_json::<Value>(&rec).unwrap_err();
    assert_eq!(e.to_string(), "record `pages` is raw, expected json");
}

#[test]
fn count_mismatch_is_reported() {
    let stream = [
        frame("a", RecordFormat::Raw, b"1").unwrap(),
        frame("a", RecordFormat::Raw, b"2").unwrap(),
    ]
    .concat();
    let mut r = RecordReader::new(&stream[..], 2);
    while r.next().unwrap().is_some() {}
    let entry = |records, bytes| PluginEntry {
        name: "m".into(),
        version: "1".into(),
        stream: 2,
        records,
        bytes,
    };
    let e = r.check_against(&entry(5, 100)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "stream 2 has 2 records, the inventory says 5: the image is truncated"
    );
    let e = r.check_against(&entry(1, 100)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "stream 2 has 2 records, the inventory says 1: the image is corrupt"
    );
    let e = r.check_against(&entry(2, 100)).unwrap_err();
    assert!(
        matches!(
            e,
            ImageError::ByteCount {
                found: 52,
                expected: 100,
                ..
            }
        ),
        "{e}"
    );
    r.check_against(&entry(2, stream.len() as u64)).unwrap();
}

/// A two-plugin image: the inventory, and the streams by number.
fn synthetic_image() -> (Inventory, HashMap<u32, Vec<u8>>) {
    let mut memory = json_record(
        "vmas",
        &json!([{"start": "0x400000", "end": "0x401000", "prot": "r-x"}, {"start": "0x7ffd0000", "end": "0x7ffe0000", "prot": "rw-"}]),
    )
    .unwrap();
    memory.extend(frame("pages", RecordFormat::Raw, &[0u8; 4096]).unwrap());
    memory.extend(frame("pages", RecordFormat::Raw, &[1u8; 8192]).unwrap());
    let threads =
        json_record("regs", &json!({"rip": 4198400, "rsp": 140737488355328u64})).unwrap();
    let mut inv = inventory();
    inv.plugins[0].records = 3;
    inv.plugins[0].bytes = memory.len() as u64;
    inv.plugins[1].records = 1;
    inv.plugins[1].bytes = threads.len() as u64;
    (inv, [(1, memory), (2, threads)].into_iter().collect())
}

fn opener(streams: HashMap<u32, Vec<u8>>) -> impl FnMut(u32) -> Result<Box<dyn Pull>, String> {
    move |n| match streams.get(&n) {
        Some(s) => Ok(Box::new(ReadPull(std::io::Cursor::new(s.clone())))),
        None => Err(format!("stream-{n}.img: no such file")),
    }
}

#[test]
fn describe_and_render() {
    let (inv, streams) = synthetic_image();
    let v = describe(&inv, &mut opener(streams)).unwrap();
    assert_eq!(v["inventory"]["token"], inv.token);
    let s1 = &v["streams"][0];
    assert_eq!(s1["stream"], 1);
    assert_eq!(s1["plugin"], "memory");
    assert_eq!(s1["raw_bytes"], 4096 + 8192);
    assert_eq!(s1["records"][0]["kind"], "vmas");
    assert_eq!(s1["records"][0]["format"], "json");
    assert_eq!(s1["records"][0]["content"][1]["prot"], "rw-");
    assert_eq!(
        s1["records"][1],
        json!({"kind": "pages", "format": "raw", "bytes": 4096})
    );
    assert_eq!(v["streams"][1]["records"][0]["content"]["rip"], 4198400);

    let text = render_text(&v);
    assert!(
        text.contains("token 0123456789abcdef0123456789abcdef"),
        "{text}"
    );
    assert!(text.contains("2024-05-01 12:00:00.123 UTC"), "{text}");
    assert!(
        text.contains("process 4242 `sleep`, threads 4242 4243"),
        "{text}"
    );
    assert!(
        text.contains("stream 1: plugin memory 0.1.0, 3 records"),
        "{text}"
    );
    assert!(
        text.contains("pages       2 records         12288 bytes  raw"),
        "{text}"
    );
    assert!(
        text.contains(r#"    {"end":"0x401000","prot":"r-x","start":"0x400000"}"#),
        "{text}"
    );
    assert!(
        text.contains("  regs #1:\n    {\n      \"rip\": 4198400,"),
        "{text}"
    );
    // Generic: any shape renders, nothing panics.
    for odd in [
        json!(null),
        json!([]),
        json!({"streams": [{"records": [{"content": 5}]}]}),
        json!({"inventory": 3}),
    ] {
        render_text(&odd);
    }
}

#[test]
fn records_read_as_proc_shows_them_and_views_take_any_shape() {
    let area = json!({"areas": [{"start": 0x7f00_0000_0000u64, "end": 0x7f00_0000_1000u64, "prot": 5, "shared": true, "offset": 4096}]});
    let mm = procify("memory", "mm", &area);
    assert_eq!(mm["areas"][0]["start"], "0x7f0000000000");
    assert_eq!(mm["areas"][0]["prot"], "r-xs");
    assert_eq!(mm["areas"][0]["offset"], "0x1000");
    let fd = procify("files", "fd", &json!({"flags": 0o102001, "object": {"mode": 0o100644}, "pos": 7}));
    assert_eq!(fd["flags"], "0102001 O_WRONLY|O_APPEND|O_LARGEFILE");
    assert_eq!(fd["object"]["mode"], "100644");
    assert_eq!(fd["pos"], 7, "a count stays a number");
    let act = procify("signals", "sigactions", &json!({"actions": [{"sig": 10, "handler": 1, "flags": 0x1400_0004u64, "mask": 4}]}));
    assert_eq!(act["actions"][0]["handler"], "SIG_IGN");
    assert_eq!(act["actions"][0]["flags"], "SA_SIGINFO|SA_RESTORER|SA_RESTART");
    assert_eq!(act["actions"][0]["mask"], "0000000000000004");
    // Another plugin's numbers of the same names are left alone.
    assert_eq!(procify("mine", "x", &json!({"start": 5, "flags": 1})), json!({"start": 5, "flags": 1}));
    for odd in [json!(null), json!({"inventory": {"processes": [{"pid": 1}, 3]}}), json!({"streams": 2})] {
        for view in [View::Ps, View::Mems, View::Fds, View::Sigs] {
            render_view(&odd, view);
        }
    }
}

#[test]
fn render_caps_long_content() {
    let entries: Vec<Value> = (0..100)
        .map(|i| json!({"i": i, "pad": "x".repeat(300)}))
        .collect();
    let lines = content_lines(&json!(entries));
    assert_eq!(lines.len(), SHOW_LINES + 1);
    assert_eq!(lines[SHOW_LINES], "… 60 more lines");
    assert!(lines[0].ends_with('…') && lines[0].chars().count() == SHOW_WIDTH + 1);
    let pretty = content_lines(&json!({"list": (0..100).collect::<Vec<_>>()}));
    assert_eq!(pretty.len(), SHOW_LINES + 1);
}

#[test]
fn describe_checks_the_image() {
    let (inv, mut streams) = synthetic_image();
    let mut short = inv.clone();
    short.plugins[0].records = 4;
    let e = describe(&short, &mut opener(streams.clone())).unwrap_err();
    assert_eq!(
        e.to_string(),
        "stream 1 has 3 records, the inventory says 4: the image is truncated"
    );

    let mut missing = streams.clone();
    missing.remove(&2);
    let e = describe(&inv, &mut opener(missing)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "stream 2 of plugin threads cannot be opened: stream-2.img: no such file"
    );

    if let Some(s) = streams.get_mut(&1) {
        let last = s.len() - 1;
        s[last] ^= 1; // inside a raw payload that describe does not keep
    }
    let e = describe(&inv, &mut opener(streams)).unwrap_err();
    assert!(
        matches!(e, ImageError::Checksum { stream: 1, ref kind, .. } if kind == "pages"),
        "{e}"
    );
}

#[test]
fn utc_time_is_civil() {
    assert_eq!(utc_time(0), "1970-01-01 00:00:00.000 UTC");
    assert_eq!(utc_time(951_782_400_000), "2000-02-29 00:00:00.000 UTC");
    assert_eq!(utc_time(1_714_564_800_123), "2024-05-01 12:00:00.123 UTC");
}
