//! `ferry show`: an image described as JSON and rendered as text.

use super::*;

/// Everything in an image as JSON, for `ferry show` (like `crit show`): the inventory, then
/// each plugin's stream with its records (JSON content parsed, raw ones by size). Every
/// record is checked, and each stream's counts against the inventory.
pub fn describe(
    inventory: &Inventory,
    streams: &mut dyn FnMut(u32) -> Result<Box<dyn Pull>, String>,
) -> Result<Value, ImageError> {
    let inv = serde_json::to_value(inventory).map_err(|e| ImageError::Serialize {
        what: "the inventory".to_string(),
        reason: e.to_string(),
    })?;
    let mut plugins: Vec<&PluginEntry> = inventory.plugins.iter().collect();
    plugins.sort_by_key(|p| p.stream);
    let mut out = Vec::with_capacity(plugins.len());
    for p in plugins {
        let src = streams(p.stream).map_err(|reason| ImageError::StreamOpen {
            stream: p.stream,
            plugin: p.name.clone(),
            reason,
        })?;
        let mut reader = RecordReader::new(src, p.stream);
        let mut records = Vec::new();
        let mut raw_bytes = 0u64;
        while let Some(r) = reader.read(false)? {
            let kind = r.rec.kind;
            match r.rec.format {
                RecordFormat::Json => {
                    let content: Value = serde_json::from_slice(&r.rec.payload).map_err(|e| {
                        ImageError::RecordJson {
                            stream: p.stream,
                            at: r.at,
                            kind: kind.clone(),
                            reason: e.to_string(),
                        }
                    })?;
                    records.push(json!({"kind": kind, "format": "json", "bytes": r.payload_len, "content": content}));
                }
                RecordFormat::Raw => {
                    raw_bytes += r.payload_len;
                    records.push(json!({"kind": kind, "format": "raw", "bytes": r.payload_len}));
                }
            }
        }
        reader.check_against(p)?;
        out.push(json!({
            "stream": p.stream,
            "plugin": p.name,
            "version": p.version,
            "bytes": reader.bytes_read(),
            "raw_bytes": raw_bytes,
            "records": records,
        }));
    }
    Ok(json!({"inventory": inv, "streams": out}))
}

/// Longest rendering of one JSON record's content, in lines.
pub(super) const SHOW_LINES: usize = 40;
/// Longest line of a compact entry, in chars.
pub(super) const SHOW_WIDTH: usize = 160;

/// A human summary of what [`describe`] answers. Generic: it knows the image's framing,
/// not any plugin's schema, and shows whatever shape it is given without failing.
pub fn render_text(v: &Value) -> String {
    let mut out = String::new();
    let s = |v: &Value, k: &str| {
        v.get(k)
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| x.to_string())
            })
            .unwrap_or_else(|| "?".to_string())
    };
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let inv = v.get("inventory").unwrap_or(&Value::Null);

    out.push_str(&format!(
        "ferry image, format {}, token {}\nwritten by ferry {} at {}, medium {}\n",
        s(inv, "format_version"),
        s(inv, "token"),
        s(inv, "ferry_version"),
        inv.get("created_unix_ms")
            .and_then(Value::as_u64)
            .map(utc_time)
            .unwrap_or_else(|| "?".to_string()),
        s(inv, "medium"),
    ));
    for p in inv
        .get("processes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let tids: Vec<String> = p
            .get("tids")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|t| t.to_string())
            .collect();
        let parent = match p.get("parent").and_then(Value::as_i64) {
            Some(pp) if pp != 0 => format!(", child of {pp}"),
            _ => String::new(),
        };
        let streams: Vec<String> = p
            .get("streams")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|t| t.to_string())
            .collect();
        let streams = if streams.is_empty() { String::new() } else { format!(", streams {}", streams.join(" ")) };
        out.push_str(&format!(
            "process {} `{}`{parent}, threads {}{streams}\n",
            s(p, "pid"),
            s(p, "comm"),
            tids.join(" ")
        ));
        for f in p.get("shared_fds").and_then(Value::as_array).into_iter().flatten() {
            let how = if f.get("reopen").and_then(Value::as_bool) == Some(true) {
                "another end of the pipe"
            } else {
                "one open file description"
            };
            out.push_str(&format!("  fd {} is {}'s fd {} ({how})\n", s(f, "fd"), s(f, "from"), s(f, "from_fd")));
        }
    }

    for st in v
        .get("streams")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let recs: Vec<&Value> = st
            .get("records")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .collect();
        out.push_str(&format!(
            "\nstream {}: plugin {} {}, {} records, {} bytes ({} raw)\n",
            s(st, "stream"),
            s(st, "plugin"),
            s(st, "version"),
            recs.len(),
            n(st, "bytes"),
            n(st, "raw_bytes"),
        ));
        // Per kind, in order of first appearance: count, payload bytes, format.
        let mut kinds: Vec<(String, String, u64, u64)> = Vec::new();
        for r in &recs {
            let (k, f) = (s(r, "kind"), s(r, "format"));
            match kinds.iter_mut().find(|e| e.0 == k && e.1 == f) {
                Some(e) => {
                    e.2 += 1;
                    e.3 += n(r, "bytes");
                }
                None => kinds.push((k, f, 1, n(r, "bytes"))),
            }
        }
        let width = kinds.iter().map(|k| k.0.len()).max().unwrap_or(0);
        for (k, f, count, bytes) in &kinds {
            let plural = if *count == 1 { "record" } else { "records" };
            out.push_str(&format!(
                "  {k:width$}  {count:>6} {plural:7}  {bytes:>12} bytes  {f}\n"
            ));
        }
        // The content of JSON records, numbered per kind.
        let mut seen: BTreeMap<String, u64> = BTreeMap::new();
        for r in &recs {
            let Some(content) = r.get("content") else {
                continue;
            };
            let k = s(r, "kind");
            let i = seen.entry(k.clone()).or_insert(0);
            *i += 1;
            out.push_str(&format!("  {k} #{i}:\n"));
            for line in content_lines(&procify(&s(st, "plugin"), &k, content)) {
                out.push_str("    ");
                out.push_str(&line);
                out.push('\n');
            }
        }
    }
    out
}

/// An array of objects one compact line per entry, anything else pretty; both capped.
pub(super) fn content_lines(content: &Value) -> Vec<String> {
    let lines: Vec<String> = match content.as_array() {
        Some(a) if !a.is_empty() && a.iter().all(Value::is_object) => {
            a.iter().map(|e| e.to_string()).collect()
        }
        _ => serde_json::to_string_pretty(content)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect(),
    };
    let total = lines.len();
    let mut shown: Vec<String> = lines
        .into_iter()
        .take(SHOW_LINES)
        .map(|l| {
            if l.chars().count() > SHOW_WIDTH {
                let cut: String = l.chars().take(SHOW_WIDTH).collect();
                format!("{cut}…")
            } else {
                l
            }
        })
        .collect();
    if total > SHOW_LINES {
        shown.push(format!("… {} more lines", total - SHOW_LINES));
    }
    shown
}

/// `2024-05-01 12:00:00.123 UTC` from milliseconds since the epoch (civil-from-days, so no
/// date crate is needed for one line of output).
pub(super) fn utc_time(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}
