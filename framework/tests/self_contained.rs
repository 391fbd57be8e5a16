//! The project documents itself: nothing in it may refer to a file outside the
//! repository (a clone has nothing beside it), and every reference to a section of
//! docs/ARCHITECTURE.md names a section that exists.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The files git tracks (and those added but not committed yet); without git (a
/// source tarball), every file but the build output.
fn project_files() -> Vec<PathBuf> {
    let root = root();
    let listed = Command::new("git")
        .args(["ls-files", "--cached", "--others", "--exclude-standard", "-z"])
        .current_dir(&root)
        .output()
        .ok()
        .filter(|o| o.status.success());
    if let Some(out) = listed {
        return out.stdout.split(|&b| b == 0).filter(|p| !p.is_empty()).map(|p| root.join(String::from_utf8_lossy(p).as_ref())).collect();
    }
    let mut files = Vec::new();
    let mut pending = vec![root.clone()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if path.is_dir() {
                if name != "target" && name != ".git" {
                    pending.push(path);
                }
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// What must not appear anywhere: spelt in pieces so this file does not hold them.
fn outside_references() -> [String; 2] {
    [["..", "/shared"].concat(), ["DESIGN", ".md"].concat()]
}

#[test]
fn nothing_refers_outside_the_repository() {
    let files = project_files();
    assert!(files.len() > 50, "found only {} project files under {}", files.len(), root().display());
    let mut found = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else { continue }; // binary, or deleted
        for (n, line) in text.lines().enumerate() {
            for bad in outside_references() {
                if line.contains(&bad) {
                    found.push(format!("{}:{}: {}", file.strip_prefix(root()).unwrap_or(&file).display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(found.is_empty(), "references to files outside the repository:\n{}", found.join("\n"));
}

/// The `## ` headings of docs/ARCHITECTURE.md.
fn sections() -> Vec<String> {
    let doc = std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).expect("docs/ARCHITECTURE.md");
    doc.lines().filter_map(|l| l.strip_prefix("## ")).map(|s| s.trim().to_string()).collect()
}

#[test]
fn references_to_the_architecture_name_its_sections() {
    let sections = sections();
    assert!(sections.len() >= 10, "{sections:?}");
    let mut checked = 0;
    let mut wrong = Vec::new();
    for file in project_files() {
        if file.ends_with("framework/tests/self_contained.rs") {
            continue; // this file's own patterns
        }
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        for line in text.lines() {
            // `(docs/ARCHITECTURE.md, "Section")` or `… "A" and "B")`.
            let Some(at) = line.find("docs/ARCHITECTURE.md, \"") else { continue };
            let rest = &line[at..];
            let rest = &rest[..rest.find(')').unwrap_or(rest.len())];
            for name in rest.split('"').skip(1).step_by(2) {
                checked += 1;
                if !sections.iter().any(|s| s == name) {
                    wrong.push(format!("{}: \"{name}\"", file.display()));
                }
            }
        }
    }
    assert!(checked >= 8, "only {checked} section references found");
    assert!(wrong.is_empty(), "no such section in docs/ARCHITECTURE.md ({sections:?}):\n{}", wrong.join("\n"));
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(readme.contains("(docs/ARCHITECTURE.md)"), "the README links to docs/ARCHITECTURE.md");
}
