use super::*;
use std::io::Write;

const ORIGIN: &str = "/etc/ferry/test.json";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new(ORIGIN))
}

/// Parses `text`, expects a failure, checks the message names the file and every `needle`.
fn parse_err(text: &str, key: Option<&str>, needles: &[&str]) -> ConfigError {
    let err = match parse(text) {
        Ok(c) => panic!("expected an error for {text:?}, got {c:?}"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(
        msg.starts_with(ORIGIN),
        "message does not name the file: {msg}"
    );
    assert_eq!(err.path(), Some(Path::new(ORIGIN)));
    assert_eq!(err.key(), key, "key of: {msg}");
    if let Some(key) = key {
        assert!(
            msg.contains(&format!("key `{key}`")),
            "message does not name {key}: {msg}"
        );
    }
    for needle in needles {
        assert!(msg.contains(needle), "message lacks {needle:?}: {msg}");
    }
    err
}

#[test]
fn defaults() {
    let c = Config::default();
    assert_eq!(c.plugin_dir, None);
    assert_eq!(
        c.mechanism.subsystems,
        ["memory", "threads", "files", "signals", "process", "seccomp", "creds"]
    );
    assert_eq!(c.mechanism.medium, "file");
    assert_eq!(c.mechanism.strategy, Strategy::StopCopy);
    assert_eq!(c.mechanism.quiesce, Quiesce::Ptrace);
    assert_eq!(c.mechanism.context, ExecContext::External);
    assert_eq!(
        c.tuning.pre_copy,
        PreCopyTuning {
            downtime_budget_ms: 30,
            max_rounds: 10,
            throttle: true,
            dirty_tracking: DirtyTracking::Auto
        }
    );
    assert_eq!(
        c.tuning.post_copy,
        PostCopyTuning {
            fault_window_kib: 256,
            push_batch_kib: 2048
        }
    );
    assert_eq!(c.tuning.hybrid, HybridTuning { precopy_rounds: 1 });
    assert_eq!(c.watchdog_ms, 10_000);
    assert_eq!(c.daemon.listen, None, "a daemon listens only when told to");
    assert_eq!(c.daemon.control, PathBuf::from("/run/ferry/control.sock"));
    assert_eq!(c.daemon.auth_key, None);
    c.validate().expect("defaults are valid");
    assert_eq!(parse("{}").expect("empty object"), c);
    assert_eq!(parse(" \n{ }\n").expect("empty object with spaces"), c);
}

#[test]
fn enum_names_round_trip() {
    for s in Strategy::ALL {
        assert_eq!(s.to_string().parse::<Strategy>(), Ok(*s));
        assert_eq!(serde_json::to_string(s).expect("ser"), format!("\"{s}\""));
    }
    for q in Quiesce::ALL {
        assert_eq!(q.to_string().parse::<Quiesce>(), Ok(*q));
        assert_eq!(serde_json::to_string(q).expect("ser"), format!("\"{q}\""));
    }
    for x in ExecContext::ALL {
        assert_eq!(x.to_string().parse::<ExecContext>(), Ok(*x));
        assert_eq!(serde_json::to_string(x).expect("ser"), format!("\"{x}\""));
    }
    assert_eq!(
        Strategy::NAMES,
        ["stop-copy", "pre-copy", "post-copy", "hybrid"]
    );
    assert_eq!(Quiesce::NAMES, ["ptrace", "freezer"]);
    assert_eq!(ExecContext::NAMES, ["external", "internal"]);
    let e = "fast".parse::<Strategy>().expect_err("fast");
    assert_eq!(
        e.to_string(),
        "unknown strategy `fast`, expected one of `stop-copy`, `pre-copy`, `post-copy`, `hybrid`"
    );
    assert!("Ptrace".parse::<Quiesce>().is_err());
    assert!("".parse::<ExecContext>().is_err());
}

#[test]
fn full_file() {
    let text = r#"{
        "plugin_dir": "/opt/ferry/plugins",
        "mechanism": {
            "subsystems": ["memory", "threads", "files", "signals", "shm"],
            "medium": "tcp",
            "strategy": "hybrid",
            "quiesce": "freezer",
            "context": "external"
        },
        "tuning": {
            "pre_copy": { "downtime_budget_ms": 50, "max_rounds": 4, "throttle": false },
            "post_copy": { "fault_window_kib": 64, "push_batch_kib": 1024 },
            "hybrid": { "precopy_rounds": 2 }
        },
        "watchdog_ms": 2500,
        "daemon": {
            "listen": "0.0.0.0:9000",
            "control": "/run/ferry/other.sock",
            "auth_key": "/etc/ferry/key"
        }
    }"#;
    let c = parse(text).expect("full file");
    let want = Config {
        plugin_dir: Some("/opt/ferry/plugins".into()),
        mechanism: Mechanism {
            subsystems: ["memory", "threads", "files", "signals", "shm"]
                .map(String::from)
                .to_vec(),
            medium: "tcp".into(),
            medium_params: Default::default(),
            strategy: Strategy::Hybrid,
            quiesce: Quiesce::Freezer,
            context: ExecContext::External,
            plugin_params: Default::default(),
        },
        tuning: Tuning {
            pre_copy: PreCopyTuning {
                downtime_budget_ms: 50,
                max_rounds: 4,
                throttle: false,
                dirty_tracking: DirtyTracking::Auto,
            },
            post_copy: PostCopyTuning {
                fault_window_kib: 64,
                push_batch_kib: 1024,
            },
            hybrid: HybridTuning { precopy_rounds: 2 },
        },
        watchdog_ms: 2500,
        daemon: DaemonConfig {
            listen: Some("0.0.0.0:9000".into()),
            control: "/run/ferry/other.sock".into(),
            auth_key: Some("/etc/ferry/key".into()),
        },
    };
    assert_eq!(c, want);
    // What to_json_pretty writes reads back the same.
    assert_eq!(parse(&c.to_json_pretty()).expect("round trip"), c);
    assert_eq!(
        parse(&Config::default().to_json_pretty()).expect("round trip"),
        Config::default()
    );
}

#[test]
fn partial_file_keeps_defaults() {
    let c = parse(
        r#"{"mechanism": {"strategy": "pre-copy"}, "tuning": {"pre_copy": {"max_rounds": 3}}}"#,
    )
    .expect("partial");
    let mut want = Config::default();
    want.mechanism.strategy = Strategy::PreCopy;
    want.tuning.pre_copy.max_rounds = 3;
    assert_eq!(c, want);
    // null for an optional path is the default.
    let c = parse(r#"{"plugin_dir": null, "daemon": {"auth_key": null}}"#).expect("nulls");
    assert_eq!(c, Config::default());
    // A byte-order mark is tolerated.
    assert_eq!(parse("\u{feff}{}").expect("bom"), Config::default());
}

#[test]
fn overrides_beat_the_file() {
    let mut c = parse(
        r#"{"plugin_dir": "/a", "mechanism": {"medium": "tcp", "strategy": "pre-copy",
            "subsystems": ["memory"]}, "watchdog_ms": 5, "daemon": {"listen": "127.0.0.1:1"}}"#,
    )
    .expect("file");
    let o = Overrides {
        plugin_dir: Some("/b".into()),
        subsystems: Some(vec!["memory".into(), "threads".into()]),
        medium: None,
        strategy: Some(Strategy::PostCopy),
        quiesce: Some(Quiesce::Freezer),
        context: Some(ExecContext::Internal),
        watchdog_ms: Some(7),
        listen: Some("[::1]:2".into()),
        control: Some("/tmp/c.sock".into()),
    };
    c.apply(&o);
    assert_eq!(c.plugin_dir, Some(PathBuf::from("/b")));
    assert_eq!(c.mechanism.subsystems, ["memory", "threads"]);
    assert_eq!(
        c.mechanism.medium, "tcp",
        "no override keeps the file's value"
    );
    assert_eq!(c.mechanism.strategy, Strategy::PostCopy);
    assert_eq!(c.mechanism.quiesce, Quiesce::Freezer);
    assert_eq!(c.mechanism.context, ExecContext::Internal);
    assert_eq!(c.watchdog_ms, 7);
    assert_eq!(c.daemon.listen.as_deref(), Some("[::1]:2"));
    assert_eq!(c.daemon.control, PathBuf::from("/tmp/c.sock"));
    c.validate().expect("valid");
    c.watchdog_ms = u64::MAX;
    assert!(c.validate().unwrap_err().to_string().contains("must be 1 to 86400000"));
    c.watchdog_ms = 7;

    // Empty overrides change nothing.
    let before = c.clone();
    c.apply(&Overrides::default());
    assert_eq!(c, before);

    // An override that breaks the configuration is reported without a file.
    c.apply(&Overrides {
        watchdog_ms: Some(0),
        ..Overrides::default()
    });
    let e = c.validate().expect_err("watchdog 0");
    assert_eq!(e.key(), Some("watchdog_ms"));
    assert_eq!(e.path(), None);
    assert!(
        e.to_string()
            .starts_with("invalid configuration: key `watchdog_ms`: "),
        "{e}"
    );
}

#[test]
fn unknown_keys_are_named_with_their_path() {
    parse_err(
        r#"{"watchdog": 5}"#,
        Some("watchdog"),
        &["unknown key `watchdog`", "watchdog_ms", "line 1 column"],
    );
    parse_err(
        "{\n  \"mechanism\": {\n    \"stratgy\": \"pre-copy\"\n  }\n}",
        Some("mechanism.stratgy"),
        &[
            "unknown key `stratgy`",
            "expected one of",
            "`strategy`",
            "line 3 column",
        ],
    );
    parse_err(
        r#"{"tuning": {"pre_copy": {"max_round": 3}}}"#,
        Some("tuning.pre_copy.max_round"),
        &["unknown key `max_round`"],
    );
    parse_err(
        r#"{"daemon": {"listen": "127.0.0.1:1", "port": 1}}"#,
        Some("daemon.port"),
        &["unknown key `port`"],
    );
}

#[test]
fn wrong_types_are_named_with_their_path() {
    parse_err(
        r#"{"watchdog_ms": "5"}"#,
        Some("watchdog_ms"),
        &["invalid type: string \"5\", expected u64", "line 1 column"],
    );
    parse_err(
        r#"{"watchdog_ms": -1}"#,
        Some("watchdog_ms"),
        &["expected u64"],
    );
    parse_err(
        r#"{"tuning": {"post_copy": {"fault_window_kib": 1.5}}}"#,
        Some("tuning.post_copy.fault_window_kib"),
        &["invalid type: floating point", "expected u32"],
    );
    parse_err(
        r#"{"tuning": {"pre_copy": {"throttle": "yes"}}}"#,
        Some("tuning.pre_copy.throttle"),
        &["expected a boolean"],
    );
    parse_err(
        r#"{"mechanism": {"subsystems": ["memory", 3]}}"#,
        Some("mechanism.subsystems[1]"),
        &["invalid type: integer `3`"],
    );
    parse_err(
        r#"{"mechanism": {"subsystems": "memory"}}"#,
        Some("mechanism.subsystems"),
        &["expected a sequence"],
    );
    parse_err(
        r#"{"mechanism": "stop-copy"}"#,
        Some("mechanism"),
        &["expected a JSON object"],
    );
    // A struct given as an array (serde would take fields by position) is refused.
    parse_err(
        r#"{"daemon": ["127.0.0.1:1"]}"#,
        Some("daemon"),
        &["invalid type: sequence, expected a JSON object"],
    );
    parse_err(
        r#"{"tuning": {"hybrid": [1]}}"#,
        Some("tuning.hybrid"),
        &["expected a JSON object"],
    );
    parse_err("[]", None, &["expected a JSON object"]);
    parse_err("\"hello\"", None, &["expected a JSON object"]);
    parse_err(
        r#"{"watchdog_ms": null}"#,
        Some("watchdog_ms"),
        &["invalid type: null"],
    );
    parse_err(
        r#"{"watchdog_ms": 1, "watchdog_ms": 2}"#,
        Some("watchdog_ms"),
        &["duplicate key `watchdog_ms`"],
    );
    parse_err(
        r#"{"tuning": {"hybrid": {"precopy_rounds": 1, "precopy_rounds": 2}}}"#,
        Some("tuning.hybrid.precopy_rounds"),
        &["duplicate key"],
    );
}

#[test]
fn bad_enum_values_are_named() {
    parse_err(
        r#"{"mechanism": {"strategy": "fast"}}"#,
        Some("mechanism.strategy"),
        &[
            "unknown variant `fast`",
            "`stop-copy`",
            "`hybrid`",
            "line 1 column",
        ],
    );
    parse_err(
        r#"{"mechanism": {"quiesce": "sigstop"}}"#,
        Some("mechanism.quiesce"),
        &["unknown variant `sigstop`", "`freezer`"],
    );
    parse_err(
        r#"{"mechanism": {"context": 1}}"#,
        Some("mechanism.context"),
        &["invalid type: integer `1`, expected one of `external`, `internal`"],
    );
    parse_err(
        r#"{"mechanism": {"strategy": {"a": 1}}}"#,
        Some("mechanism.strategy"),
        &["expected one of `stop-copy`"],
    );
    parse_err(
        r#"{"mechanism": {"quiesce": null}}"#,
        Some("mechanism.quiesce"),
        &["invalid type: null"],
    );
    parse_err(
        r#"{"mechanism": {"strategy": "StopCopy"}}"#,
        Some("mechanism.strategy"),
        &["unknown variant"],
    );
}

#[test]
fn syntax_errors_name_the_file_and_position() {
    parse_err(
        "{\n  \"watchdog_ms\": 5,\n}",
        None,
        &["invalid JSON", "trailing comma", "line 3 column 1"],
    );
    parse_err(
        "{\"mechanism\": {\"medium\": \"tcp\"}",
        None,
        &["invalid JSON", "EOF", "line 1 column"],
    );
    parse_err(
        "{} {}",
        None,
        &["invalid JSON", "trailing characters", "line 1 column"],
    );
    // `//` comments are read (see comments_are_blanked_outside_strings_only…), `/* */` not.
    parse_err("{ /* comment */\n}", None, &["invalid JSON", "line 1 column"]);
    parse_err(
        "{\"watchdog_ms\": }",
        Some("watchdog_ms"),
        &["invalid JSON", "expected value", "line 1 column"],
    );
    parse_err("", None, &["empty"]);
    parse_err(" \n\t\n", None, &["empty"]);
}

#[test]
fn validate_errors_name_the_key_and_file() {
    let cases: &[(&str, &str, &str)] = &[
        (
            r#"{"mechanism": {"subsystems": []}}"#,
            "mechanism.subsystems",
            "at least one",
        ),
        (
            r#"{"mechanism": {"subsystems": ["memory", "threads", "memory"]}}"#,
            "mechanism.subsystems[2]",
            "listed twice (also at [0])",
        ),
        (
            r#"{"mechanism": {"subsystems": ["memory", ""]}}"#,
            "mechanism.subsystems[1]",
            "empty plugin name",
        ),
        (
            r#"{"mechanism": {"subsystems": ["../evil"]}}"#,
            "mechanism.subsystems[0]",
            "not a plugin name",
        ),
        (
            r#"{"mechanism": {"medium": ""}}"#,
            "mechanism.medium",
            "empty plugin name",
        ),
        (
            r#"{"mechanism": {"medium": "bogus"}}"#,
            "mechanism.medium",
            "`bogus` is not a medium of this build",
        ),
        (r#"{"watchdog_ms": 0}"#, "watchdog_ms", "must be 1 to 86400000"),
        (r#"{"plugin_dir": ""}"#, "plugin_dir", "empty path"),
        (
            r#"{"tuning": {"pre_copy": {"max_rounds": 0}}}"#,
            "tuning.pre_copy.max_rounds",
            "at least 1",
        ),
        (
            r#"{"tuning": {"post_copy": {"fault_window_kib": 0}}}"#,
            "tuning.post_copy.fault_window_kib",
            "multiple of 4",
        ),
        (
            r#"{"tuning": {"post_copy": {"push_batch_kib": 6}}}"#,
            "tuning.post_copy.push_batch_kib",
            "multiple of 4",
        ),
        (
            r#"{"tuning": {"post_copy": {"push_batch_kib": 4194304}}}"#,
            "tuning.post_copy.push_batch_kib",
            "multiple of 4",
        ),
        (
            r#"{"tuning": {"hybrid": {"precopy_rounds": 0}}}"#,
            "tuning.hybrid.precopy_rounds",
            "at least 1",
        ),
        (
            r#"{"daemon": {"listen": "localhost"}}"#,
            "daemon.listen",
            "`localhost` is not an address:port",
        ),
        (
            r#"{"daemon": {"listen": "127.0.0.1"}}"#,
            "daemon.listen",
            "not an address:port",
        ),
        (
            r#"{"daemon": {"listen": "0.0.0.0:7711"}}"#,
            "daemon.auth_key",
            "not a loopback address",
        ),
        (
            r#"{"daemon": {"auth_key": ""}}"#,
            "daemon.auth_key",
            "empty path",
        ),
        (
            r#"{"daemon": {"control": ""}}"#,
            "daemon.control",
            "empty path",
        ),
        (
            r#"{"daemon": {"control": "run/ferry.sock"}}"#,
            "daemon.control",
            "absolute",
        ),
    ];
    for (text, key, needle) in cases {
        let e = parse_err(text, Some(key), &[needle]);
        assert!(
            matches!(e, ConfigError::Invalid { path: Some(_), .. }),
            "{e:?}"
        );
    }
    let long = format!(r#"{{"daemon": {{"control": "/{}"}}}}"#, "s".repeat(120));
    parse_err(&long, Some("daemon.control"), &["Unix socket"]);
    // Loopback in IPv6 needs no key.
    parse(r#"{"daemon": {"listen": "[::1]:7711"}}"#).expect("ipv6 loopback");
}

#[test]
fn load_from_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let default = dir.path().join("default.json");

    // No explicit file, no default file: the defaults.
    let (c, used) = Config::load_with_default(None, &default).expect("no file");
    assert_eq!(c, Config::default());
    assert_eq!(used, None);

    // The default file when it exists.
    fs::write(&default, r#"{"watchdog_ms": 1234}"#).expect("write");
    let (c, used) = Config::load_with_default(None, &default).expect("default file");
    assert_eq!(c.watchdog_ms, 1234);
    assert_eq!(used.as_deref(), Some(default.as_path()));

    // An explicit file wins over the default one.
    let explicit = dir.path().join("explicit.json");
    let mut f = fs::File::create(&explicit).expect("create");
    f.write_all(br#"{"mechanism": {"medium": "tcp"}}"#)
        .expect("write");
    drop(f);
    let (c, used) = Config::load_with_default(Some(&explicit), &default).expect("explicit");
    assert_eq!(c.mechanism.medium, "tcp");
    assert_eq!(c.watchdog_ms, Config::default().watchdog_ms);
    assert_eq!(used.as_deref(), Some(explicit.as_path()));
    assert_eq!(Config::from_file(&explicit).expect("from_file"), c);

    // A bad default file is an error naming it, not a silent fallback.
    fs::write(&default, r#"{"mechanism": {"strategy": "fast"}}"#).expect("write");
    let e = Config::load_with_default(None, &default).expect_err("bad default");
    assert_eq!(e.key(), Some("mechanism.strategy"));
    assert!(
        e.to_string().starts_with(&default.display().to_string()),
        "{e}"
    );
}

#[test]
fn unreadable_files_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");

    // A missing explicit file is an error even though defaults exist.
    let missing = dir.path().join("missing.json");
    let e = Config::load(Some(&missing)).expect_err("missing");
    assert!(
        matches!(&e, ConfigError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
    assert!(msg.starts_with("cannot read config file"), "{msg}");

    // A directory.
    let e = Config::from_file(dir.path()).expect_err("directory");
    assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
    assert!(
        e.to_string().contains(&dir.path().display().to_string()),
        "{e}"
    );
    assert_eq!(e.path(), Some(dir.path()));

    // Not UTF-8.
    let binary = dir.path().join("binary.json");
    fs::write(&binary, b"{\"medium\": \"\xff\"}").expect("write");
    let e = Config::from_file(&binary).expect_err("binary");
    assert!(e.to_string().contains("not UTF-8"), "{e}");

    // Too large.
    let big = dir.path().join("big.json");
    fs::write(&big, vec![b' '; (MAX_FILE_BYTES + 10) as usize]).expect("write");
    let e = Config::from_file(&big).expect_err("big");
    assert!(e.to_string().contains("larger than"), "{e}");

    // Errors from a file read through from_file name that file.
    let bad = dir.path().join("bad.json");
    fs::write(&bad, r#"{"mechanism": {"stratgy": "hybrid"}}"#).expect("write");
    let e = Config::from_file(&bad).expect_err("bad");
    assert_eq!(e.path(), Some(bad.as_path()));
    assert!(
        e.to_string()
            .starts_with(&format!("{}: key `mechanism.stratgy`: ", bad.display())),
        "{e}"
    );
}

#[test]
fn example_file_lists_every_key_with_its_default() {
    let text = include_str!("../../../examples/ferry.json");
    let c = Config::parse(text, Path::new("examples/ferry.json")).expect("example parses");
    c.validate().expect("example validates");
    assert_eq!(c, Config::default());
    // Same keys and values as what to_json_pretty writes: no key is missing from the example.
    let example: serde_json::Value = serde_json::from_str(text).expect("json");
    let written: serde_json::Value =
        serde_json::from_str(&Config::default().to_json_pretty()).expect("json");
    assert_eq!(example, written);
}

#[test]
fn readme_documents_every_key_and_the_explained_example_is_a_configuration() {
    // The example's keys (what `--explain` documents) are every key there is,
    fn leaves(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            // An object of settings with none set (`medium_params`) is a key too.
            serde_json::Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    leaves(&key, v, out);
                }
            }
            _ => out.push(prefix.to_owned()),
        }
    }
    let value: serde_json::Value = serde_json::from_str(&Config::default().to_json_pretty()).expect("json");
    let mut all = Vec::new();
    leaves("", &value, &mut all);
    all.sort();
    let mut listed = explain::keys();
    listed.sort();
    assert_eq!(all, listed);
    // each has its paragraph in the README, written above it,
    let explained = explain::explained();
    for key in explain::keys() {
        let doc = explain::doc(&key).unwrap_or_else(|| panic!("README lacks a paragraph on `{key}`"));
        assert!(doc.len() > 30, "`{key}`: {doc}");
        assert!(explained.contains(&format!("// {key}: ")), "{explained}");
    }
    // and the whole is read back as the defaults.
    assert_eq!(Config::parse(&explained, Path::new("explained.json")).expect("explained example parses"), Config::default());
}

#[test]
fn comments_are_blanked_outside_strings_only_and_errors_keep_their_place() {
    let text = "{ // all defaults but one\n  \"daemon\": {\"control\": \"/run//ferry.sock\"} // a path with //\n}";
    let c = Config::parse(text, Path::new("c.json")).expect("parses");
    assert_eq!(c.daemon.control, Path::new("/run//ferry.sock"));
    let e = Config::parse("// note\n{\"watchdog_ms\": \"5\"}", Path::new("c.json")).unwrap_err().to_string();
    assert!(e.contains("line 2"), "{e}");
    assert!(Config::parse("// only a comment\n", Path::new("c.json")).unwrap_err().to_string().contains("empty"));
}
