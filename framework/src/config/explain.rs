//! `ferry config example --explain`: the example file with each key's documentation
//! written above it as `//` comments, so that what a key does is where the key is. The
//! text comes from `examples/README.md` (the one place keys are documented): the
//! paragraph under `### `key`` or the bullet that starts with **`key`**.

/// The example configuration, every key at its default.
pub const EXAMPLE: &str = include_str!("../../../examples/ferry.json");
const README: &str = include_str!("../../../examples/README.md");
/// Width the comments are wrapped to, indentation included.
const WIDTH: usize = 92;

/// The documentation of `key` (a dotted path) in the README, as one paragraph.
pub fn doc(key: &str) -> Option<String> {
    let heading = format!("### `{key}`");
    let bullet = format!("- **`{key}`**");
    let lines: Vec<&str> = README.lines().collect();
    let text: Vec<&str> = if let Some(i) = lines.iter().position(|l| l.trim() == heading) {
        // The paragraph after the heading.
        let body = lines[i + 1..].iter().skip_while(|l| l.trim().is_empty()).take_while(|l| !l.trim().is_empty() && !l.starts_with('#'));
        body.copied().collect()
    } else {
        let i = lines.iter().position(|l| l.trim_start().starts_with(&bullet))?;
        let indent = lines[i].len() - lines[i].trim_start().len();
        let first = lines[i].trim_start()[bullet.len()..].trim_start_matches(':').trim();
        // Its continuation lines and sub-bullets: deeper than the bullet itself.
        let rest = lines[i + 1..].iter().take_while(|l| {
            let t = l.trim_start();
            !t.is_empty() && l.len() - t.len() > indent
        });
        std::iter::once(first).chain(rest.copied()).collect()
    };
    // One paragraph per sub-bullet, each on its own line.
    let mut joined = String::new();
    for l in text.iter().map(|l| l.trim()) {
        if l.starts_with("- ") {
            joined.push('\n');
        } else if !joined.is_empty() {
            joined.push(' ');
        }
        joined.push_str(l);
    }
    let joined = joined.replace("**", "");
    (!joined.trim().is_empty()).then(|| joined.trim().to_string())
}

/// `text` wrapped into `// ` lines at `indent`, a paragraph per line of it.
fn comment(text: &str, indent: &str) -> String {
    text.lines().map(|p| paragraph(p, indent)).collect()
}

fn paragraph(words: &str, indent: &str) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for w in words.split_whitespace() {
        if !line.is_empty() && indent.len() + 3 + line.len() + 1 + w.len() > WIDTH {
            out.push_str(&format!("{indent}// {line}\n"));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(w);
    }
    if !line.is_empty() {
        out.push_str(&format!("{indent}// {line}\n"));
    }
    out
}

/// The dotted key of every leaf of the example, in order, with its line's index.
fn leaves() -> Vec<(usize, String)> {
    let mut path: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for (i, line) in EXAMPLE.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('}') {
            path.pop();
            continue;
        }
        let Some(rest) = t.strip_prefix('"') else { continue };
        let Some((key, value)) = rest.split_once("\":") else { continue };
        if value.trim() == "{" {
            path.push(key.to_string());
        } else {
            let mut full = path.clone();
            full.push(key.to_string());
            out.push((i, full.join(".")));
        }
    }
    out
}

/// The dotted keys of the example file.
pub fn keys() -> Vec<String> {
    leaves().into_iter().map(|(_, k)| k).collect()
}

/// The example with each key's documentation above it. ferry reads it as it is (a
/// configuration file may hold `//` comments).
pub fn explained() -> String {
    let leaves = leaves();
    let mut out = String::from("// ferry's configuration, every key at its default (examples/README.md has more).\n");
    for (i, line) in EXAMPLE.lines().enumerate() {
        if let Some((_, key)) = leaves.iter().find(|(at, _)| *at == i) {
            let indent = &line[..line.len() - line.trim_start().len()];
            out.push_str(&comment(&format!("{key}: {}", doc(key).unwrap_or_default()), indent));
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// `text` with its `//` comments (outside strings, to the end of the line) blanked out
/// with spaces, so that the JSON parser's line and column numbers stay right.
pub fn strip_comments(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("//") {
        return text.into();
    }
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped, mut in_comment) = (false, false, false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_comment {
            if c == '\n' {
                in_comment = false;
                out.push(c);
            } else {
                out.extend(std::iter::repeat(' ').take(c.len_utf8()));
            }
            continue;
        }
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if c == '/' && chars.peek() == Some(&'/') {
            in_comment = true;
            out.push(' ');
            continue;
        }
        out.push(c);
    }
    out.into()
}
