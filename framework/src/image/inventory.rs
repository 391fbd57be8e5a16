//! The inventory (stream 0): what an image holds, and its encoding.

use super::*;

/// What an image holds, written last to stream 0.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    pub format_version: u32,
    /// Names the event on both machines; 32 lowercase hex chars ([`crate::random::new_token`]).
    pub token: String,
    pub created_unix_ms: u64,
    pub ferry_version: String,
    pub medium: String,
    pub plugins: Vec<PluginEntry>,
    pub processes: Vec<ProcessEntry>,
}

/// One subsystem plugin's stream, with what restore must find in it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginEntry {
    pub name: String,
    pub version: String,
    pub stream: u32,
    /// Number of records in the stream.
    pub records: u64,
    /// Total framed bytes of the stream (headers, kinds and payloads).
    pub bytes: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProcessEntry {
    pub pid: i32,
    pub tids: Vec<i32>,
    pub comm: String,
    /// Where ferry's scratch area sat in the process: a hole in its address space that
    /// restore reuses, so the scratch never collides with a restored mapping.
    pub scratch: u64,
    /// The boot and start time of the process (`boot_id/ticks`), which tell it from a
    /// later one with its pid: restore waits for this one to finish exiting.
    #[serde(default)]
    pub start: String,
    /// Stopped by job control (`SIGSTOP`, `SIGTSTP`…) when it was taken: it comes back
    /// stopped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
    /// The pid (in the image) of its parent when that is in the image too; 0 for the
    /// process the request named (the root of the tree).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub parent: i32,
    /// The streams of its records, one per plugin in the inventory's plugin order;
    /// empty in a one-process image: every stream of the inventory is its.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub streams: Vec<u32>,
    /// Its fds whose open file description an earlier process of the image holds too
    /// (inherited over fork): restored there, and given to this one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_fds: Vec<SharedFd>,
    /// In a tree: its process group and session (pids of the image); 0 in a
    /// one-process image.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pgid: i32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sid: i32,
    /// In a tree: the signal its parent gets at its death, when not SIGCHLD (a child
    /// made by `clone` with another).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_signal: Option<i32>,
    /// Its children that had exited and were not reaped yet (zombies), made again so
    /// that its `wait` gets their status.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zombies: Vec<Zombie>,
    /// It adopts the orphans among its descendants (`PR_SET_CHILD_SUBREAPER`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub subreaper: bool,
}

/// A child that exited and was not reaped: its pid, its status as `waitpid` reports
/// it, and the signal its parent got at its death when not SIGCHLD.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Zombie {
    pub pid: i32,
    pub status: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_signal: Option<i32>,
}

/// Fd `fd` of a process is the open file description of fd `from_fd` of process
/// `from` (pids and fds as in the image); with `reopen`, another description of the
/// pipe or FIFO that one is an end of (opened again, with this fd's own flags).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SharedFd {
    pub fd: i32,
    pub from: i32,
    pub from_fd: i32,
    #[serde(default, skip_serializing_if = "is_false")]
    pub reopen: bool,
}

fn is_false(v: &bool) -> bool {
    !*v
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

impl ProcessEntry {
    /// The plugin entries of this process's streams, in plugin order.
    pub fn plugins<'a>(&self, inventory: &'a Inventory) -> Vec<&'a PluginEntry> {
        if self.streams.is_empty() {
            return inventory.plugins.iter().collect();
        }
        self.streams.iter().filter_map(|&s| inventory.plugin_for_stream(s)).collect()
    }
}

impl Inventory {
    /// A fresh inventory for a checkpoint made now through `medium`, with a new token.
    pub fn new(medium: &str) -> Self {
        let created_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Inventory {
            format_version: FORMAT_VERSION,
            token: crate::random::new_token(),
            created_unix_ms,
            ferry_version: env!("CARGO_PKG_VERSION").to_string(),
            medium: medium.to_string(),
            plugins: Vec::new(),
            processes: Vec::new(),
        }
    }

    /// The plugin whose records are in `stream`.
    pub fn plugin_for_stream(&self, stream: u32) -> Option<&PluginEntry> {
        self.plugins.iter().find(|p| p.stream == stream)
    }

    /// The bytes of stream 0. Refuses an inventory that [`Inventory::decode`] would refuse,
    /// so a bad one fails the checkpoint rather than the restore.
    pub fn encode(&self) -> Result<Vec<u8>, ImageError> {
        self.validate()?;
        let body = serde_json::to_vec(self).map_err(|e| ImageError::Serialize {
            what: "the inventory".to_string(),
            reason: e.to_string(),
        })?;
        let len = u32::try_from(body.len())
            .ok()
            .filter(|&l| l <= MAX_INVENTORY)
            .ok_or(ImageError::InventoryTooLarge {
                len: body.len() as u64,
                cap: MAX_INVENTORY as u64,
            })?;
        let mut out = Vec::with_capacity(INVENTORY_HEAD_LEN + body.len() + INVENTORY_TAIL_LEN);
        out.extend_from_slice(&INVENTORY_MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&xxh3_64(&body).to_le_bytes());
        Ok(out)
    }

    /// Parses the whole of stream 0: magic, version, length cap, checksum, JSON, sense.
    pub fn decode(bytes: &[u8]) -> Result<Self, ImageError> {
        let body_len = check_inventory_head(bytes)?;
        let total = INVENTORY_HEAD_LEN + body_len + INVENTORY_TAIL_LEN;
        if bytes.len() < total {
            return Err(ImageError::InventoryTruncated {
                at: bytes.len() as u64,
                missing: (total - bytes.len()) as u64,
            });
        }
        if bytes.len() > total {
            return Err(ImageError::InventoryTrailing {
                extra: (bytes.len() - total) as u64,
            });
        }
        let body = &bytes[INVENTORY_HEAD_LEN..INVENTORY_HEAD_LEN + body_len];
        let mut sum = [0u8; 8];
        sum.copy_from_slice(&bytes[INVENTORY_HEAD_LEN + body_len..total]);
        if xxh3_64(body) != u64::from_le_bytes(sum) {
            return Err(ImageError::InventoryChecksum);
        }
        // The path in the message ("plugins[1].stream: ...") tells a user which entry is bad.
        let de = &mut serde_json::Deserializer::from_slice(body);
        let inv: Inventory =
            serde_path_to_error::deserialize(de).map_err(|e| ImageError::InventoryInvalid {
                reason: e.to_string(),
            })?;
        inv.validate()?;
        Ok(inv)
    }

    /// Reads and decodes stream 0 from any medium, allocating no more than the bytes that
    /// arrive (and never more than the cap) whatever the length field claims.
    pub fn read_from<P: Pull + ?Sized>(src: &mut P) -> Result<Self, ImageError> {
        let mut buf = vec![0u8; INVENTORY_HEAD_LEN];
        let n =
            fill(src, &mut buf).map_err(|reason| ImageError::InventorySource { at: 0, reason })?;
        buf.truncate(n);
        if n < INVENTORY_HEAD_LEN {
            // decode names what is wrong with a short head (not an image, or truncated).
            return Self::decode(&buf);
        }
        let body_len = check_inventory_head(&buf)?;
        let want = (body_len + INVENTORY_TAIL_LEN) as u64;
        let got = pull_bounded(src, want, &mut buf, None).map_err(|reason| {
            ImageError::InventorySource {
                at: INVENTORY_HEAD_LEN as u64,
                reason,
            }
        })?;
        if got == want {
            // Anything after the checksum means the stream is not what we wrote.
            let mut probe = [0u8; 1];
            let extra = fill(src, &mut probe).map_err(|reason| ImageError::InventorySource {
                at: buf.len() as u64,
                reason,
            })?;
            if extra > 0 {
                return Err(ImageError::InventoryTrailing {
                    extra: extra as u64,
                });
            }
        }
        Self::decode(&buf)
    }

    fn validate(&self) -> Result<(), ImageError> {
        let bad = |reason: String| Err(ImageError::InventoryInvalid { reason });
        if self.format_version != FORMAT_VERSION {
            return bad(format!(
                "its body says format version {}, its header {FORMAT_VERSION}",
                self.format_version
            ));
        }
        if !crate::random::is_token(&self.token) {
            return bad(format!(
                "token {:?} is not 32 lowercase hex digits",
                self.token
            ));
        }
        let mut streams = HashSet::new();
        for p in &self.plugins {
            if p.name.is_empty() {
                return bad(format!("the plugin of stream {} has no name", p.stream));
            }
            if p.stream == INVENTORY_STREAM {
                return bad(format!(
                    "plugin {} claims stream 0, which holds the inventory",
                    p.name
                ));
            }
            if !streams.insert(p.stream) {
                return bad(format!(
                    "stream {} is listed twice (plugin {})",
                    p.stream, p.name
                ));
            }
        }
        for p in &self.processes {
            if p.pid <= 0 {
                return bad(format!("process `{}` has pid {}", p.comm, p.pid));
            }
        }
        if self.processes.len() > 1 {
            // A tree: each process has its own streams, the same plugins in the same
            // order, and a parent in the image (all but the first, the root).
            let names: Vec<&str> = self.processes[0].plugins(self).iter().map(|e| e.name.as_str()).collect();
            let mut owned = HashSet::new();
            for (i, p) in self.processes.iter().enumerate() {
                let mine: Vec<&str> = p.plugins(self).iter().map(|e| e.name.as_str()).collect();
                if p.streams.len() != mine.len() || mine != names {
                    return bad(format!("process {}'s streams {:?} are not one per plugin {names:?}", p.pid, p.streams));
                }
                if let Some(s) = p.streams.iter().find(|&&s| !owned.insert(s)) {
                    return bad(format!("stream {s} is claimed by two processes (one is {})", p.pid));
                }
                if let Some(f) = p.shared_fds.iter().find(|f| !self.processes[..i].iter().any(|q| q.pid == f.from)) {
                    return bad(format!("process {}'s fd {} comes from process {}, not an earlier process of the image", p.pid, f.fd, f.from));
                }
                let parent_in = self.processes[..i].iter().any(|q| q.pid == p.parent);
                if (i == 0) != (p.parent == 0) || (i > 0 && !parent_in) {
                    return bad(format!("process {} has parent {}, not an earlier process of the image", p.pid, p.parent));
                }
            }
            if owned.len() != self.plugins.len() {
                return bad(format!("{} streams listed, {} claimed by the processes", self.plugins.len(), owned.len()));
            }
        }
        Ok(())
    }
}

/// Checks magic, version and length cap of an inventory head; answers the body length.
pub(super) fn check_inventory_head(bytes: &[u8]) -> Result<usize, ImageError> {
    let magic_part = &bytes[..bytes.len().min(INVENTORY_MAGIC.len())];
    if magic_part != &INVENTORY_MAGIC[..magic_part.len()] {
        return Err(ImageError::NotAnImage {
            found: magic_part.escape_ascii().to_string(),
        });
    }
    if bytes.len() < INVENTORY_HEAD_LEN {
        return Err(ImageError::InventoryTruncated {
            at: bytes.len() as u64,
            missing: (INVENTORY_HEAD_LEN - bytes.len()) as u64,
        });
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != FORMAT_VERSION {
        return Err(ImageError::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let len = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    if len > MAX_INVENTORY {
        return Err(ImageError::InventoryTooLarge {
            len: len as u64,
            cap: MAX_INVENTORY as u64,
        });
    }
    Ok(len as usize)
}
