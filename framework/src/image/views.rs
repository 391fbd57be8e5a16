//! `ferry show DIR ps|mems|fds|sigs`: one kind of state of every process of an image,
//! laid out the way `/proc` shows it (hex addresses, `rwxp` permissions, octal modes,
//! flag names), like `crit x`. And [`procify`], which gives the records of the full
//! text view the same notation.
//!
//! These views know the records of the standard plugins (memory's `mm`, files' `fd` and
//! `pipe`, signals' `sigactions` and `pending`, threads' `thread`, creds' `creds`); a
//! record that is absent or shaped otherwise is shown as missing, never as an error, so
//! an image of other plugins still renders.

use super::*;

/// A summary view of `ferry show`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Processes: pid, parent, group, session, user, threads, command.
    Ps,
    /// Memory areas, as `/proc/PID/maps`.
    Mems,
    /// Open files, as `/proc/PID/fd` and `fdinfo`.
    Fds,
    /// Signal dispositions, masks and pending signals.
    Sigs,
}

/// The content of each JSON record of `plugin` that process `p` (an inventory entry)
/// owns, with its kind, in image order.
fn records<'a>(v: &'a Value, p: &Value, plugin: &str) -> Vec<(&'a str, &'a Value)> {
    let own: Vec<u64> = p.get("streams").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_u64).collect();
    v.get("streams")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|st| st.get("plugin").and_then(Value::as_str) == Some(plugin))
        // An image of one process lists no streams for it: they are all its own.
        .filter(|st| own.is_empty() || st.get("stream").and_then(Value::as_u64).is_some_and(|s| own.contains(&s)))
        .flat_map(|st| st.get("records").and_then(Value::as_array).into_iter().flatten())
        .filter_map(|r| Some((r.get("kind")?.as_str()?, r.get("content")?)))
        .collect()
}

fn first<'a>(v: &'a Value, p: &Value, plugin: &str, kind: &str) -> Option<&'a Value> {
    records(v, p, plugin).into_iter().find(|(k, _)| *k == kind).map(|(_, c)| c)
}

fn processes(v: &Value) -> Vec<&Value> {
    v.pointer("/inventory/processes").and_then(Value::as_array).into_iter().flatten().collect()
}

fn num(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_string(),
        Some(x) => x.to_string(),
    }
}

fn header(out: &mut String, p: &Value) {
    out.push_str(&format!("process {} ({})\n", text(p, "pid"), text(p, "comm")));
}

/// Renders `view` of an image as [`describe`] answers it.
pub fn render_view(v: &Value, view: View) -> String {
    let mut out = String::new();
    match view {
        View::Ps => {
            out.push_str(&format!("{:>7} {:>7} {:>7} {:>7} {:>6} {:>7}  {}\n", "PID", "PPID", "PGID", "SID", "UID", "THREADS", "COMMAND"));
            for p in processes(v) {
                let uid = first(v, p, "creds", "creds")
                    .and_then(|c| c.pointer("/threads/0/creds/uids/0"))
                    .map_or("-".to_string(), Value::to_string);
                let threads = p.get("tids").and_then(Value::as_array).map_or(0, Vec::len);
                out.push_str(&format!(
                    "{:>7} {:>7} {:>7} {:>7} {:>6} {:>7}  {}\n",
                    text(p, "pid"),
                    num(p, "parent").map_or("-".to_string(), |x| x.to_string()),
                    text(p, "pgid"),
                    text(p, "sid"),
                    uid,
                    threads,
                    text(p, "comm")
                ));
            }
        }
        View::Mems => {
            for p in processes(v) {
                header(&mut out, p);
                let Some(mm) = first(v, p, "memory", "mm") else {
                    out.push_str("  no memory record\n");
                    continue;
                };
                for a in mm.get("areas").and_then(Value::as_array).into_iter().flatten() {
                    let name = match a.get("path").and_then(Value::as_str) {
                        Some(path) => path.to_string(),
                        None => format!("[{}]", text(a, "kind")),
                    };
                    out.push_str(&format!(
                        "  {:012x}-{:012x} {} {:08x} {name}\n",
                        num(a, "start").unwrap_or(0),
                        num(a, "end").unwrap_or(0),
                        perms(num(a, "prot").unwrap_or(0), a.get("shared").and_then(Value::as_bool).unwrap_or(false)),
                        num(a, "offset").unwrap_or(0),
                    ));
                }
                if let (Some(lo), Some(hi)) = (num(mm, "start_brk"), num(mm, "brk")) {
                    out.push_str(&format!("  heap (brk) {lo:x}-{hi:x}, stack from {:x}\n", num(mm, "start_stack").unwrap_or(0)));
                }
            }
        }
        View::Fds => {
            for p in processes(v) {
                header(&mut out, p);
                let mut rows: Vec<(u64, String)> = Vec::new();
                for (kind, c) in records(v, p, "files") {
                    match kind {
                        "files" => out.push_str(&format!("  cwd {}, root {}, umask {:04o}\n", text(c, "cwd"), text(c, "root"), num(c, "umask").unwrap_or(0))),
                        "pipe" => {
                            for end in c.get("ends").and_then(Value::as_array).into_iter().flatten() {
                                let flags = num(end, "flags").unwrap_or(0);
                                for fd in end.get("fds").and_then(Value::as_array).into_iter().flatten() {
                                    let what = format!("pipe:[{}], {} bytes in it", text(c, "ino"), num(c, "data_len").unwrap_or(0));
                                    rows.push(fd_row(fd, flags, None, &what));
                                }
                            }
                        }
                        _ => {
                            let (Some(fds), Some(object)) = (c.get("fds").and_then(Value::as_array), c.get("object")) else {
                                continue;
                            };
                            let what = describe_object(object);
                            for fd in fds {
                                rows.push(fd_row(fd, num(c, "flags").unwrap_or(0), num(c, "pos"), &what));
                            }
                        }
                    }
                }
                rows.sort();
                for (_, row) in rows {
                    out.push_str(&row);
                }
            }
        }
        View::Sigs => {
            for p in processes(v) {
                header(&mut out, p);
                for a in first(v, p, "signals", "sigactions").and_then(|c| c.get("actions")).and_then(Value::as_array).into_iter().flatten() {
                    out.push_str(&format!(
                        "  {:<12} {:<16} mask {:016x} {}\n",
                        signal_name(num(a, "sig").unwrap_or(0)),
                        handler(num(a, "handler").unwrap_or(0)),
                        num(a, "mask").unwrap_or(0),
                        names(num(a, "flags").unwrap_or(0), SA_FLAGS, "-"),
                    ));
                }
                for (kind, t) in records(v, p, "threads") {
                    if kind == "thread" {
                        out.push_str(&format!("  thread {} blocked {:016x}\n", text(t, "tid"), num(t, "sigmask").unwrap_or(0)));
                    }
                }
                if let Some(pending) = first(v, p, "signals", "pending") {
                    let sigs = |list: Option<&Value>| -> Vec<String> {
                        list.and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                            .map(|s| s.get("sig").and_then(Value::as_u64).map_or_else(|| s.to_string(), signal_name))
                            .collect()
                    };
                    let shared = sigs(pending.get("shared"));
                    if !shared.is_empty() {
                        out.push_str(&format!("  pending (process) {}\n", shared.join(" ")));
                    }
                    for t in pending.get("threads").and_then(Value::as_array).into_iter().flatten() {
                        let mine = sigs(t.get("pending"));
                        if !mine.is_empty() {
                            out.push_str(&format!("  pending (thread {}) {}\n", text(t, "tid"), mine.join(" ")));
                        }
                    }
                }
            }
        }
    }
    out
}

fn fd_row(fd: &Value, flags: u64, pos: Option<u64>, what: &str) -> (u64, String) {
    let n = num(fd, "fd").unwrap_or(0);
    let cloexec = if fd.get("cloexec").and_then(Value::as_bool).unwrap_or(false) { libc::O_CLOEXEC as u64 } else { 0 };
    let pos = pos.map_or(String::new(), |p| format!(" pos {p}"));
    (n, format!("  {n:>4} {:<40}{pos} {what}\n", open_flags(flags | cloexec)))
}

/// An fd's object in a few words: its path, else its type and first fields.
fn describe_object(o: &Value) -> String {
    let kind = text(o, "type");
    let mode = num(o, "mode").map_or(String::new(), |m| format!(" mode {m:06o}"));
    match o.get("path").and_then(Value::as_str) {
        Some(path) => format!("{path} ({kind}{mode})"),
        None => {
            let mut rest = o.clone();
            if let Some(m) = rest.as_object_mut() {
                m.remove("type");
            }
            let rest = rest.to_string();
            let rest: String = rest.chars().take(SHOW_WIDTH / 2).collect();
            format!("[{kind}] {rest}")
        }
    }
}

/// `r-xp` from `PROT_*` bits and whether the mapping is shared.
fn perms(prot: u64, shared: bool) -> String {
    let bit = |b: i32, c: char| if prot & b as u64 != 0 { c } else { '-' };
    format!("{}{}{}{}", bit(libc::PROT_READ, 'r'), bit(libc::PROT_WRITE, 'w'), bit(libc::PROT_EXEC, 'x'), if shared { 's' } else { 'p' })
}

fn handler(h: u64) -> String {
    match h {
        0 => "SIG_DFL".to_string(),
        1 => "SIG_IGN".to_string(),
        h => format!("{h:#x}"),
    }
}

const SIGNALS: [&str; 31] = [
    "SIGHUP", "SIGINT", "SIGQUIT", "SIGILL", "SIGTRAP", "SIGABRT", "SIGBUS", "SIGFPE", "SIGKILL", "SIGUSR1", "SIGSEGV",
    "SIGUSR2", "SIGPIPE", "SIGALRM", "SIGTERM", "SIGSTKFLT", "SIGCHLD", "SIGCONT", "SIGSTOP", "SIGTSTP", "SIGTTIN",
    "SIGTTOU", "SIGURG", "SIGXCPU", "SIGXFSZ", "SIGVTALRM", "SIGPROF", "SIGWINCH", "SIGIO", "SIGPWR", "SIGSYS",
];

/// `SIGTERM`; a real-time signal as the kernel numbers it (`SIG34`).
fn signal_name(sig: u64) -> String {
    match sig {
        1..=31 => SIGNALS[sig as usize - 1].to_string(),
        n => format!("SIG{n}"),
    }
}

const SA_FLAGS: &[(u64, &str)] = &[
    (libc::SA_NOCLDSTOP as u64, "SA_NOCLDSTOP"),
    (libc::SA_NOCLDWAIT as u64, "SA_NOCLDWAIT"),
    (libc::SA_SIGINFO as u64, "SA_SIGINFO"),
    (0x0400_0000, "SA_RESTORER"),
    (libc::SA_ONSTACK as u64, "SA_ONSTACK"),
    (libc::SA_RESTART as u64, "SA_RESTART"),
    (libc::SA_NODEFER as u64, "SA_NODEFER"),
    (libc::SA_RESETHAND as u64, "SA_RESETHAND"),
];

const O_FLAGS: &[(u64, &str)] = &[
    (libc::O_CREAT as u64, "O_CREAT"),
    (libc::O_EXCL as u64, "O_EXCL"),
    (libc::O_NOCTTY as u64, "O_NOCTTY"),
    (libc::O_TRUNC as u64, "O_TRUNC"),
    (libc::O_APPEND as u64, "O_APPEND"),
    (libc::O_NONBLOCK as u64, "O_NONBLOCK"),
    (libc::O_DSYNC as u64, "O_DSYNC"),
    (libc::O_ASYNC as u64, "O_ASYNC"),
    (libc::O_DIRECT as u64, "O_DIRECT"),
    (0o100000, "O_LARGEFILE"), // libc says 0 on 64-bit; the kernel sets it
    (libc::O_DIRECTORY as u64, "O_DIRECTORY"),
    (libc::O_NOFOLLOW as u64, "O_NOFOLLOW"),
    (libc::O_NOATIME as u64, "O_NOATIME"),
    (libc::O_CLOEXEC as u64, "O_CLOEXEC"),
    (0o4000000, "O_SYNC"),
    (libc::O_PATH as u64, "O_PATH"),
    (0o20000000, "O_TMPFILE"),
];

/// The names of the bits of `value` in `table`, `|`-joined; unknown bits in hex.
fn names(value: u64, table: &[(u64, &str)], none: &str) -> String {
    let mut left = value;
    let mut parts: Vec<String> = Vec::new();
    for (bit, name) in table {
        if value & bit == *bit && *bit != 0 {
            parts.push(name.to_string());
            left &= !bit;
        }
    }
    if left != 0 {
        parts.push(format!("{left:#x}"));
    }
    if parts.is_empty() {
        none.to_string()
    } else {
        parts.join("|")
    }
}

/// Open flags as fdinfo shows them (octal) and by name: `0100001 O_WRONLY|O_LARGEFILE`.
fn open_flags(flags: u64) -> String {
    let access = match flags & 3 {
        0 => "O_RDONLY",
        1 => "O_WRONLY",
        2 => "O_RDWR",
        _ => "O_ACCMODE",
    };
    let rest = names(flags & !3, O_FLAGS, "");
    if rest.is_empty() {
        format!("{flags:07o} {access}")
    } else {
        format!("{flags:07o} {access}|{rest}")
    }
}

/// Memory, thread and signal fields that hold addresses (shown in hex).
const ADDRESSES: &[&str] = &[
    "start", "end", "brk", "start_brk", "start_code", "end_code", "start_data", "end_data", "start_stack", "arg_start",
    "arg_end", "env_start", "env_end", "restorer", "clear_child_tid", "head", "addr", "sp", "fs_base", "gs_base",
    "rseq_abort_ip", "scratch",
];

/// One record's content, given `/proc`'s notation for the full text view: addresses in
/// hex, memory protections as `rwxp`, modes in octal, open and `sigaction` flags by name,
/// signal masks in hex. Only numbers of the standard plugins' records are rewritten.
pub fn procify(plugin: &str, kind: &str, content: &Value) -> Value {
    fn walk(plugin: &str, kind: &str, key: &str, v: &Value, parent: &Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(m.iter().map(|(k, x)| (k.clone(), walk(plugin, kind, k, x, v))).collect()),
            Value::Array(a) => Value::Array(a.iter().map(|x| walk(plugin, kind, key, x, parent)).collect()),
            Value::Number(n) => {
                let Some(x) = n.as_u64() else {
                    return v.clone();
                };
                let s = match (plugin, key) {
                    ("memory" | "threads" | "signals" | "process" | "seccomp" | "creds", k) if ADDRESSES.contains(&k) => format!("{x:#x}"),
                    ("memory", "prot") => perms(x, parent.get("shared").and_then(Value::as_bool).unwrap_or(false)),
                    ("memory", "offset") => format!("{x:#x}"),
                    ("signals", "handler") => handler(x),
                    ("signals", "flags") if kind == "sigactions" => names(x, SA_FLAGS, "0"),
                    ("signals" | "threads", "mask" | "sigmask" | "blocked") => format!("{x:016x}"),
                    ("files", "mode") => format!("{x:06o}"),
                    ("files", "umask") => format!("{x:04o}"),
                    ("files", "flags") if kind == "fd" || kind == "pipe" => open_flags(x),
                    _ => return v.clone(),
                };
                Value::String(s)
            }
            _ => v.clone(),
        }
    }
    walk(plugin, kind, "", content, &Value::Null)
}
