use super::*;
use std::sync::OnceLock;

fn features() -> &'static [Feature] {
    static F: OnceLock<Vec<Feature>> = OnceLock::new();
    F.get_or_init(probe_all)
}

#[test]
fn ioctl_numbers_match_uapi() {
    assert_eq!(UFFDIO_API, 0xC018_AA3F);
    assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
    assert_eq!(UFFDIO_COPY, 0xC028_AA03);
    assert_eq!(UFFDIO_WRITEPROTECT, 0xC018_AA06);
    assert_eq!(ferry_plugin_api::pagemap::PAGEMAP_SCAN, 0xC060_6610);
    assert_eq!(std::mem::size_of::<ferry_plugin_api::pagemap::PmScanArg>(), 96);
}

#[test]
fn every_feature_probed_once() {
    let f = features();
    eprintln!("{}", render_text(f));
    assert_eq!(f.len(), FEATURE_NAMES.len());
    for name in FEATURE_NAMES {
        assert_eq!(f.iter().filter(|x| x.name == name).count(), 1, "{name}");
        assert!(find(f, name).is_some(), "{name}");
    }
    assert!(find(f, "no-such-feature").is_none());
}

#[test]
fn core_features_present() {
    let f = features();
    for name in ["ptrace-seize", "process-vm-readv", "memfd", "pidfd"] {
        let x = find(f, name).expect(name);
        assert!(x.present, "{name} missing: {}", x.detail);
    }
}

#[test]
fn missing_features_have_fallback() {
    for x in features().iter().filter(|x| !x.present) {
        assert!(!x.detail.is_empty(), "{} has no reason", x.name);
        if x.name != "ptrace-seize" {
            assert!(
                x.fallback.is_some(),
                "{} missing without a fallback",
                x.name
            );
        }
    }
    assert!(features()
        .iter()
        .all(|x| x.name == "ptrace-seize" || x.fallback.is_some()));
}

#[test]
fn render_text_one_aligned_line_per_feature() {
    let f = features();
    let text = render_text(f);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), f.len());
    let col = lines[0]
        .find(if f[0].present { "present" } else { "missing" })
        .unwrap_or(0);
    for (line, x) in lines.iter().zip(f) {
        assert!(line.starts_with(x.name));
        let state = if x.present { "present" } else { "missing" };
        assert_eq!(&line[col..col + 7], state, "{line}");
        if !x.present {
            assert!(line.contains("fallback"), "{line}");
        }
    }
}

#[test]
fn render_text_format() {
    let f = vec![
        Feature {
            name: "ptrace-seize",
            present: true,
            detail: "ok".into(),
            fallback: None,
        },
        Feature {
            name: "soft-dirty",
            present: false,
            detail: "no".into(),
            fallback: Some("hashes"),
        },
    ];
    assert_eq!(
        render_text(&f),
        "ptrace-seize          present   ok\nsoft-dirty            missing   no; fallback: hashes\n"
    );
}


#[test]
fn trap_and_vdso_features_present() {
    // Every x86_64 kernel ferry runs on has them; a missing one names its fallback.
    let f = features();
    for name in ["ptrace-debugregs", "vdso-mremap"] {
        let x = find(f, name).expect(name);
        assert!(x.present, "{name} missing: {}", x.detail);
        assert!(x.fallback.is_some(), "{name} names no fallback");
    }
}
