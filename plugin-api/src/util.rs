//! Helpers every plugin needs, linked statically into each: system calls through the
//! process context with errno reporting, a bump allocator over the scratch area for
//! syscall arguments, JSON records, and the `/proc/PID/maps` parser.

use abi_stable::std_types::{ROption, RSlice, RSliceMut, RStr};
use serde::{de::DeserializeOwned, Serialize};

use crate::{ContextRef, MemRange, Record, RecordFormat, SinkRef, SourceRef, SyscallArgs};

/// Runs system call `nr` in thread `tid`; a negative answer becomes an error naming
/// `what` and the errno.
pub fn syscall(ctx: &mut ContextRef<'_>, tid: i32, what: &str, nr: i64, args: [u64; 6]) -> Result<u64, String> {
    let r = syscall_raw(ctx, tid, nr, args)?;
    if (-4095..0).contains(&r) {
        return Err(format!("{what} in thread {tid}: {}", std::io::Error::from_raw_os_error(-r as i32)));
    }
    Ok(r as u64)
}

/// Runs system call `nr` in thread `tid`; answers the raw return value.
pub fn syscall_raw(ctx: &mut ContextRef<'_>, tid: i32, nr: i64, args: [u64; 6]) -> Result<i64, String> {
    ctx.inject_syscall(tid, nr, SyscallArgs(args)).into_result().map_err(|e| e.message.into())
}

/// The value of a `Key: value` line of a `/proc` text (`status`, `fdinfo`), trimmed.
pub fn proc_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')).map(str::trim)
}

/// `prctl` option that lets `timer_create` take the id it is given (Linux 6.16).
pub const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
/// `TFD_IOC_SET_TICKS`: sets a timerfd's expirations not read yet.
pub const TFD_IOC_SET_TICKS: u64 = 0x4008_5400;

/// Reads `/proc/<pid>/<name>` of the target as text.
pub fn proc_text(ctx: &mut ContextRef<'_>, name: &str) -> Result<String, String> {
    let bytes = ctx.proc_read(RStr::from_str(name)).into_result().map_err(|e| String::from(e.message))?;
    String::from_utf8(bytes.into_vec()).map_err(|_| format!("/proc/{}/{name} is not text", ctx.pid()))
}

pub fn read_memory(ctx: &mut ContextRef<'_>, addr: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len];
    ctx.read_memory(addr, RSliceMut::from_mut_slice(&mut buf)).into_result().map_err(|e| String::from(e.message))?;
    Ok(buf)
}

pub fn write_memory(ctx: &mut ContextRef<'_>, addr: u64, data: &[u8]) -> Result<(), String> {
    ctx.write_memory(addr, RSlice::from_slice(data)).into_result().map(|_| ()).map_err(|e| e.message.into())
}

pub fn read_ranges(ctx: &mut ContextRef<'_>, ranges: &[MemRange], buf: &mut [u8]) -> Result<(), String> {
    ctx.read_memory_ranges(RSlice::from_slice(ranges), RSliceMut::from_mut_slice(buf))
        .into_result()
        .map(|_| ())
        .map_err(|e| e.message.into())
}

pub fn write_ranges(ctx: &mut ContextRef<'_>, ranges: &[MemRange], data: &[u8]) -> Result<(), String> {
    ctx.write_memory_ranges(RSlice::from_slice(ranges), RSlice::from_slice(data))
        .into_result()
        .map(|_| ())
        .map_err(|e| e.message.into())
}

/// A bump allocator over the scratch area of the target, for system-call arguments.
/// Make a new one per step: what it handed out is only valid during the call.
pub struct Scratch {
    next: u64,
    end: u64,
}

impl Scratch {
    pub fn new(ctx: &ContextRef<'_>) -> Scratch {
        let area = ctx.scratch();
        Scratch { next: area.addr, end: area.addr + area.len }
    }

    /// Reserves `len` bytes (8-byte aligned) of target memory.
    pub fn alloc(&mut self, len: u64) -> Result<u64, String> {
        let at = (self.next + 7) & !7;
        if at + len > self.end {
            return Err(format!("scratch area exhausted ({len} bytes asked)"));
        }
        self.next = at + len;
        Ok(at)
    }

    /// Copies `data` into the target; answers its address there.
    pub fn put(&mut self, ctx: &mut ContextRef<'_>, data: &[u8]) -> Result<u64, String> {
        let at = self.alloc(data.len().max(1) as u64)?;
        write_memory(ctx, at, data)?;
        Ok(at)
    }

    /// Copies a NUL-terminated string into the target.
    pub fn cstr(&mut self, ctx: &mut ContextRef<'_>, s: &str) -> Result<u64, String> {
        let mut bytes = s.as_bytes().to_vec();
        if bytes.contains(&0) {
            return Err(format!("path {s:?} holds a NUL byte"));
        }
        bytes.push(0);
        self.put(ctx, &bytes)
    }

    /// Bytes still free.
    pub fn room(&self) -> u64 {
        self.end.saturating_sub((self.next + 7) & !7)
    }
}

/// Writes a JSON record.
pub fn put_json<T: Serialize>(sink: &mut SinkRef<'_>, kind: &str, value: &T) -> Result<(), String> {
    let bytes = serde_json::to_vec(value).map_err(|e| format!("encoding {kind}: {e}"))?;
    put_raw_as(sink, kind, RecordFormat::Json, &bytes)
}

/// Writes a raw record.
pub fn put_raw(sink: &mut SinkRef<'_>, kind: &str, bytes: &[u8]) -> Result<(), String> {
    put_raw_as(sink, kind, RecordFormat::Raw, bytes)
}

fn put_raw_as(sink: &mut SinkRef<'_>, kind: &str, format: RecordFormat, bytes: &[u8]) -> Result<(), String> {
    sink.put(RStr::from_str(kind), format, RSlice::from_slice(bytes)).into_result().map_err(|e| e.message.into())
}

/// The next record of this subsystem, if any.
pub fn next_record(source: &mut SourceRef<'_>) -> Result<Option<Record>, String> {
    match source.next().into_result().map_err(|e| String::from(e.message))? {
        ROption::RSome(r) => Ok(Some(r)),
        ROption::RNone => Ok(None),
    }
}

/// The next record, which must be a JSON record of `kind`.
pub fn expect_json<T: DeserializeOwned>(source: &mut SourceRef<'_>, kind: &str) -> Result<T, String> {
    let rec = next_record(source)?.ok_or_else(|| format!("the image has no `{kind}` record"))?;
    parse_json(&rec, kind)
}

/// A plugin's `dump` of `error`: its message, and what the plugin was doing when it
/// failed (nothing added when `doing` is empty).
pub fn while_doing(error: &crate::PluginError, doing: &str) -> String {
    if doing.is_empty() {
        error.message.to_string()
    } else {
        format!("{} (while handling the {doing})", error.message)
    }
}

/// The stream's one record, a JSON record of `kind`, with nothing after it: how a
/// plugin that writes a single record reads it back.
pub fn only_json<T: DeserializeOwned>(source: &mut SourceRef<'_>, kind: &str) -> Result<T, String> {
    let value = expect_json(source, kind)?;
    if let Some(extra) = next_record(source)? {
        return Err(format!("unexpected `{}` record after the {kind} record", extra.kind));
    }
    Ok(value)
}

/// Decodes JSON record `rec`, which must be of `kind`.
pub fn parse_json<T: DeserializeOwned>(rec: &Record, kind: &str) -> Result<T, String> {
    if rec.kind.as_str() != kind || rec.format != RecordFormat::Json {
        return Err(format!("expected a `{kind}` record, found `{}`", rec.kind));
    }
    serde_json::from_slice(&rec.payload).map_err(|e| format!("record `{kind}`: {e}"))
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// "rwxp" as the kernel prints it.
    pub perms: String,
    pub offset: u64,
    pub dev: String,
    pub inode: u64,
    /// The path, a `[name]` of a special area, or empty for anonymous memory.
    pub path: String,
}

impl Vma {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
    pub fn readable(&self) -> bool {
        self.perms.as_bytes().first() == Some(&b'r')
    }
    pub fn writable(&self) -> bool {
        self.perms.as_bytes().get(1) == Some(&b'w')
    }
    pub fn executable(&self) -> bool {
        self.perms.as_bytes().get(2) == Some(&b'x')
    }
    pub fn shared(&self) -> bool {
        self.perms.as_bytes().get(3) == Some(&b's')
    }
    /// The PROT_* bits of the area.
    pub fn prot(&self) -> u64 {
        let mut p = 0;
        if self.readable() {
            p |= libc::PROT_READ as u64;
        }
        if self.writable() {
            p |= libc::PROT_WRITE as u64;
        }
        if self.executable() {
            p |= libc::PROT_EXEC as u64;
        }
        p
    }
    /// `[vdso]`, `[vvar]`, `[stack]`, `[heap]`, …
    pub fn special(&self) -> Option<&str> {
        self.path.strip_prefix('[').and_then(|p| p.strip_suffix(']'))
    }
    /// Backed by a file (`inode != 0`), possibly deleted.
    pub fn file_backed(&self) -> bool {
        self.inode != 0
    }
}

/// Parses `/proc/PID/maps`. Paths may hold spaces; a deleted file ends in " (deleted)".
pub fn parse_maps(text: &str) -> Result<Vec<Vma>, String> {
    text.lines().filter(|l| !l.is_empty()).map(parse_maps_line).collect()
}

fn parse_maps_line(line: &str) -> Result<Vma, String> {
    let bad = || format!("unexpected line in maps: {line:?}");
    let mut rest = line;
    let mut field = || -> Option<&str> {
        let t = rest.trim_start();
        let end = t.find(' ').unwrap_or(t.len());
        let (f, r) = t.split_at(end);
        rest = r;
        Some(f).filter(|f| !f.is_empty())
    };
    let range = field().ok_or_else(bad)?;
    let perms = field().ok_or_else(bad)?.to_string();
    let offset = field().ok_or_else(bad)?;
    let dev = field().ok_or_else(bad)?.to_string();
    let inode = field().ok_or_else(bad)?;
    let path = rest.trim_start().to_string();
    let (s, e) = range.split_once('-').ok_or_else(bad)?;
    let hex = |v: &str| u64::from_str_radix(v, 16).map_err(|_| bad());
    let vma = Vma {
        start: hex(s)?,
        end: hex(e)?,
        perms,
        offset: hex(offset)?,
        dev,
        inode: inode.parse().map_err(|_| bad())?,
        path,
    };
    if vma.end < vma.start || vma.perms.len() != 4 {
        return Err(bad());
    }
    Ok(vma)
}

/// `NT_PRSTATUS`: the general registers, as `PTRACE_GETREGSET` names them.
pub const NT_PRSTATUS: u32 = 1;
/// Not a kernel register set: ferry's name, for `get_regset`/`set_regset`, of a
/// thread's x86 debug registers, which the kernel offers only word by word
/// (`PTRACE_PEEKUSER`/`POKEUSER` of `u_debugreg`). Eight little-endian words DR0–DR7
/// (DR4 and DR5 always 0); written DR7 last, so that a breakpoint is armed only once
/// its address is in place.
pub const NT_FERRY_DEBUGREGS: u32 = 0x4652_5901;
/// Word index of `fs_base` in `user_regs_struct`.
pub const FS_BASE: usize = 21;
pub const REGS_SIZE: usize = std::mem::size_of::<libc::user_regs_struct>();

/// How the image's threads were matched to the restore child's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matched {
    /// By TLS base (unique per thread).
    TlsBase,
    /// Every thread got its tid back.
    Tid,
    /// In order: the main thread first, the others as `threads` created them.
    Order,
}

/// The restore child's tid for each thread of the image. Both lists hold
/// `(tid, fs_base)`, the main thread first; `image` in the image's order.
pub fn map_threads(image: &[(i32, u64)], live: &[(i32, u64)]) -> Result<(Vec<i32>, Matched), String> {
    if image.len() != live.len() || image.is_empty() {
        return Err(format!("the image has {} threads, the restore child {}", image.len(), live.len()));
    }
    let main = live[0].0;
    let (img_rest, live_rest) = (&image[1..], &live[1..]);
    let unique = |v: &[(i32, u64)]| {
        let mut b: Vec<u64> = v.iter().map(|t| t.1).collect();
        b.sort_unstable();
        b.windows(2).all(|w| w[0] != w[1])
    };
    if unique(img_rest) && unique(live_rest) {
        let by_tls: Option<Vec<i32>> = img_rest
            .iter()
            .map(|(_, base)| live_rest.iter().find(|(_, b)| b == base).map(|(t, _)| *t))
            .collect();
        if let Some(rest) = by_tls {
            return Ok((std::iter::once(main).chain(rest).collect(), Matched::TlsBase));
        }
    }
    let mut a: Vec<i32> = img_rest.iter().map(|t| t.0).collect();
    let mut b: Vec<i32> = live_rest.iter().map(|t| t.0).collect();
    a.sort_unstable();
    b.sort_unstable();
    if a == b {
        return Ok((std::iter::once(main).chain(img_rest.iter().map(|t| t.0)).collect(), Matched::Tid));
    }
    Ok((live.iter().map(|t| t.0).collect(), Matched::Order))
}

/// Thread `tid`'s TLS base (`fs_base`), which tells threads apart across a restore
/// where tids may change.
pub fn fs_base(ctx: &mut ContextRef<'_>, tid: i32) -> Result<u64, String> {
    let regs = ctx
        .get_regset(tid, NT_PRSTATUS)
        .into_result()
        .map_err(|e| format!("thread {tid}: reading its registers: {}", err_text(e)))?;
    if regs.len() != REGS_SIZE {
        return Err(format!("thread {tid}: general registers of {} bytes, want {REGS_SIZE}", regs.len()));
    }
    Ok(u64_le(&regs, FS_BASE * 8).unwrap_or(0))
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines_with_spaces_and_specials() {
        let text = "55d613c52000-55d613c54000 r--p 00000000 fe:00 247774                     /usr/bin/sleep\n\
7f85a093a000-7f85a093c000 r-xp 00000000 00:00 0                          [vdso]\n\
7f0000000000-7f0000001000 rw-s 00001000 00:05 99 /tmp/a file (deleted)\n\
7f0000002000-7f0000003000 ---p 00000000 00:00 0 \n";
        let v = parse_maps(text).unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[0].path, "/usr/bin/sleep");
        assert_eq!(v[0].prot(), libc::PROT_READ as u64);
        assert_eq!(v[1].special(), Some("vdso"));
        assert!(v[2].shared() && v[2].writable() && v[2].file_backed());
        assert_eq!(v[2].path, "/tmp/a file (deleted)");
        assert_eq!(v[2].offset, 0x1000);
        assert_eq!(v[3].path, "");
        assert_eq!(v[3].prot(), 0);
        assert!(parse_maps("zzz").is_err());
        assert!(parse_maps("1000-0 rw-p 0 00:00 0").is_err());
    }
}

/// Names as the ABI carries them (`SubsystemInfo` lists).
pub fn names(items: &[&str]) -> abi_stable::std_types::RVec<abi_stable::std_types::RString> {
    items.iter().map(|s| abi_stable::std_types::RString::from(*s)).collect()
}

/// The message of a plugin error, for `Result<_, String>` code.
pub fn err_text(e: crate::PluginError) -> String {
    e.message.into()
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Decodes hex of at most `max` bytes (`exact`: of exactly `max`); the length is
/// checked before anything is allocated. Errors name `what`.
pub fn from_hex(s: &str, what: &str, max: usize, exact: bool) -> Result<Vec<u8>, String> {
    if exact && s.len() != max * 2 {
        return Err(format!("{what}: {} hex digits, want {}", s.len(), max * 2));
    }
    if s.len() & 1 != 0 {
        return Err(format!("{what}: odd number of hex digits ({})", s.len()));
    }
    if s.len() / 2 > max {
        return Err(format!("{what}: {} bytes, more than the {max} allowed", s.len() / 2));
    }
    let digit = |c: u8| -> Result<u8, String> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(format!("{what}: {:?} is not a hex digit", c as char)),
        }
    };
    s.as_bytes().chunks_exact(2).map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

/// The little-endian u64 at `at` of `b`, if `b` holds it.
pub fn u64_le(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]))
}

/// Plugin parameters arrive as a JSON object: parses `text`, naming `what` and the
/// expected `format` in errors.
pub fn parse_object(text: &str, what: &str, format: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!("{what} must be a JSON object like {format}, got {other}")),
        Err(e) => Err(format!("{what} are not valid JSON ({e}); expected {format}")),
    }
}

/// Refuses a key not in `known`, listing the known ones.
pub fn reject_unknown_keys(map: &serde_json::Map<String, serde_json::Value>, known: &[&str], what: &str) -> Result<(), String> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(key) => Err(format!(
            "unknown key \"{key}\" in {what} (known keys: {})",
            known.iter().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(", ")
        )),
        None => Ok(()),
    }
}

/// The value of `key`, which must be present.
pub fn required<'a>(map: &'a serde_json::Map<String, serde_json::Value>, key: &str, what: &str) -> Result<&'a serde_json::Value, String> {
    map.get(key).ok_or_else(|| format!("missing key \"{key}\" in {what}"))
}

#[cfg(test)]
mod helper_tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_bad_input() {
        let b = [0u8, 0xab, 0xff, 0x10];
        assert_eq!(to_hex(&b), "00abff10");
        assert_eq!(from_hex("00abff10", "x", 4, true).unwrap(), b);
        assert_eq!(from_hex("00AB", "x", 4, false).unwrap(), vec![0, 0xab]);
        assert!(from_hex("00ab", "x", 4, true).is_err());
        assert!(from_hex("abc", "x", 4, false).is_err());
        assert!(from_hex("zz", "x", 4, false).is_err());
        assert!(from_hex("0011223344", "x", 4, false).is_err());
        assert_eq!(u64_le(&7u64.to_le_bytes(), 0), Some(7));
        assert_eq!(u64_le(&[1, 2, 3], 0), None);
        assert_eq!(u64_le(&[0; 8], usize::MAX), None);
    }

    #[test]
    fn threads_are_matched_by_tls_then_tid_then_order() {
        let image = [(100, 0xa), (101, 0xb), (102, 0xc)];
        // Same tids, TLS bases found: identity.
        assert_eq!(map_threads(&image, &[(7, 0xa), (101, 0xb), (102, 0xc)]).unwrap(), (vec![7, 101, 102], Matched::TlsBase));
        // New tids, listed in another order: the TLS base says which is which.
        assert_eq!(map_threads(&image, &[(7, 0xa), (8, 0xc), (9, 0xb)]).unwrap(), (vec![7, 9, 8], Matched::TlsBase));
        // Shared TLS bases (raw clone threads): by tid when every tid came back.
        let shared = [(100, 0xa), (101, 0xa), (102, 0xa)];
        assert_eq!(map_threads(&shared, &[(7, 0), (102, 0), (101, 0)]).unwrap(), (vec![7, 101, 102], Matched::Tid));
        // Else in order.
        assert_eq!(map_threads(&shared, &[(7, 0), (8, 0), (9, 0)]).unwrap(), (vec![7, 8, 9], Matched::Order));
        // A count mismatch is an error.
        assert!(map_threads(&image, &[(7, 0xa)]).is_err());
        assert!(map_threads(&[], &[]).is_err());
    }}
