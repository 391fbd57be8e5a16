//! The framework's layout keeps its architecture visible: the folders of `src/` are
//! layers, a module imports only from layers below its own, the module graph has no
//! cycle, and no file grows past what a reader takes in at one sitting. Read from the
//! sources: every `crate::…` and `super::…` path outside comments counts.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// The layers, bottom first. A module may use modules of a lower rank only; modules of
/// one rank are siblings and do not use each other.
const LAYERS: &[(&str, u32)] = &[
    ("config", 0),
    ("trace", 0),
    ("fault", 0),
    ("random", 0),
    ("trust", 0),
    ("kernel", 1),
    ("wire", 1),
    ("image", 1),
    ("engine", 2),
    ("strategies", 3),
    ("commands", 4),
];

/// Longest file, in lines, tests included.
const MAX_LINES: usize = 800;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a source file: `src/engine/event.rs` → `[engine, event]`,
/// `src/image/mod.rs` → `[image]`.
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" && stem != "main" {
        parts.push(stem.to_string());
    }
    parts
}

/// The code of a file without its comments (doc links name modules too).
fn code(text: &str) -> String {
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

fn ident(s: &str) -> (&str, &str) {
    let end = s.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(s.len());
    s.split_at(end)
}

/// Expands the path that starts at `s` (after `crate::` or `super::`) into every
/// module path it names, following `{…}` groups.
fn paths(prefix: Vec<String>, s: &str, out: &mut Vec<Vec<String>>) {
    let s = s.trim_start();
    if let Some(group) = s.strip_prefix('{') {
        let mut depth = 0;
        let mut start = 0;
        let bytes: Vec<char> = group.chars().collect();
        for (i, c) in bytes.iter().enumerate() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    let item: String = bytes[start..i].iter().collect();
                    paths(prefix.clone(), &item, out);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    let item: String = bytes[start..i].iter().collect();
                    paths(prefix.clone(), &item, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let (name, rest) = ident(s);
    if name.is_empty() || name == "self" {
        out.push(prefix);
        return;
    }
    let mut next = prefix;
    next.push(name.to_string());
    match rest.strip_prefix("::") {
        Some(more) => paths(next, more, out),
        None => out.push(next),
    }
}

/// Every module path a file names, absolute (from the crate root).
fn references(file: &Path) -> Vec<Vec<String>> {
    let text = code(&fs::read_to_string(file).unwrap());
    let here = module_of(file);
    let mut out = Vec::new();
    for (anchor, base) in [("crate::", Vec::new()), ("super::", here[..here.len().saturating_sub(1)].to_vec())] {
        let mut rest = text.as_str();
        while let Some(at) = rest.find(anchor) {
            let before = rest[..at].chars().last();
            rest = &rest[at + anchor.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            // `super::` inside a file's own `mod tests` names the file itself.
            if anchor == "super::" && file.file_name().is_some_and(|n| n != "mod.rs") && rest.starts_with('*') {
                continue;
            }
            paths(base.clone(), rest, &mut out);
        }
    }
    out
}

struct Crate {
    /// Module path of each source file.
    modules: BTreeMap<Vec<String>, PathBuf>,
}

impl Crate {
    fn read() -> Crate {
        let mut files = Vec::new();
        sources(&src(), &mut files);
        let modules = files.into_iter().filter(|f| !f.ends_with("main.rs")).map(|f| (module_of(&f), f)).collect();
        Crate { modules }
    }

    /// The source file a path lands in: its longest prefix that is a module.
    fn resolve(&self, path: &[String]) -> Option<Vec<String>> {
        (1..=path.len()).rev().map(|n| path[..n].to_vec()).find(|p| self.modules.contains_key(p))
    }

    /// Module → modules it uses (other than itself and its own ancestors).
    fn graph(&self) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
        let mut graph = BTreeMap::new();
        for (module, file) in &self.modules {
            let uses: BTreeSet<Vec<String>> = references(file)
                .iter()
                .filter_map(|p| self.resolve(p))
                .filter(|target| !module.starts_with(target))
                .collect();
            graph.insert(module.clone(), uses);
        }
        graph
    }
}

fn rank(module: &[String]) -> Option<u32> {
    let top = module.first()?;
    LAYERS.iter().find(|(name, _)| name == top).map(|&(_, r)| r)
}

#[test]
fn every_module_sits_in_a_layer() {
    let krate = Crate::read();
    let strays: Vec<String> = krate.modules.keys().filter(|m| !m.is_empty() && rank(m).is_none()).map(|m| m.join("::")).collect();
    assert!(strays.is_empty(), "modules outside every layer (add them to a folder or to LAYERS): {strays:?}");
}

#[test]
fn imports_go_only_downward() {
    let krate = Crate::read();
    let mut wrong = Vec::new();
    for (module, uses) in krate.graph() {
        let (Some(from), Some(top)) = (rank(&module), module.first()) else { continue };
        for target in uses {
            let to = rank(&target).unwrap_or(u32::MAX);
            if target.first() != Some(top) && to >= from {
                wrong.push(format!("{} uses {}", module.join("::"), target.join("::")));
            }
        }
    }
    assert!(wrong.is_empty(), "imports that do not go down a layer:\n{}", wrong.join("\n"));
}

#[test]
fn the_module_graph_has_no_cycle() {
    let graph = Crate::read().graph();
    // Depth-first search, colouring modules on the current path.
    fn visit<'a>(
        m: &'a Vec<String>,
        graph: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        on_path: &mut Vec<&'a Vec<String>>,
        done: &mut BTreeSet<&'a Vec<String>>,
    ) -> Option<String> {
        if done.contains(m) {
            return None;
        }
        if let Some(i) = on_path.iter().position(|p| *p == m) {
            let cycle: Vec<String> = on_path[i..].iter().chain([&m]).map(|p| p.join("::")).collect();
            return Some(cycle.join(" → "));
        }
        on_path.push(m);
        for next in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, graph, on_path, done) {
                return Some(c);
            }
        }
        on_path.pop();
        done.insert(m);
        None
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        if let Some(cycle) = visit(m, &graph, &mut Vec::new(), &mut done) {
            panic!("the module graph has a cycle: {cycle}");
        }
    }
}

#[test]
fn no_file_is_too_long_to_read_in_one_sitting() {
    let mut files = Vec::new();
    sources(&src(), &mut files);
    let long: Vec<String> = files
        .iter()
        .map(|f| (f, fs::read_to_string(f).unwrap().lines().count()))
        .filter(|&(_, n)| n > MAX_LINES)
        .map(|(f, n)| format!("{} ({n} lines)", f.strip_prefix(src()).unwrap().display()))
        .collect();
    assert!(long.is_empty(), "files over {MAX_LINES} lines: {long:?}");
}

#[test]
fn the_checker_sees_what_it_must() {
    // The reader itself: a grouped import, a nested group, and paths in code, not comments.
    let mut out = Vec::new();
    paths(Vec::new(), "{engine::{event::Loaded, manager}, kernel::tracer::Tracer};", &mut out);
    let got: Vec<String> = out.iter().map(|p| p.join("::")).collect();
    assert_eq!(got, ["engine::event::Loaded", "engine::manager", "kernel::tracer::Tracer"]);
    assert_eq!(code("let x = 1; // crate::commands"), "let x = 1; ");
    // A real edge is found: the checkpoint command uses the engine.
    let graph = Crate::read().graph();
    let checkpoint = graph.get(&vec!["commands".to_string(), "checkpoint".to_string()]).expect("commands::checkpoint");
    assert!(checkpoint.iter().any(|m| m.first().is_some_and(|t| t == "engine")), "{checkpoint:?}");
}
