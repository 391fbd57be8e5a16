//! The data path of the rdma medium: each side has a **ring** of `slots` registered
//! receive slots of `slot_size` bytes that only the peer writes into (one-sided RMA
//! writes with remote CQ data), and a registered send area of the same geometry that
//! it fills and writes from. Message `n` of a side goes from its send slot `n % slots`
//! into the peer's ring slot `n % slots`; the peer takes the slots strictly in that
//! order whatever order their completions arrive in (no reliance on the provider's
//! ordering), copies their records into per-stream queues, and returns **credits**
//! (how many it has taken), so a sender never overruns a slot not yet taken.
//!
//! A slot holds `u32 used`, `u32 0`, then records:
//!
//! ```text
//!  kind: u8 | flags: u8 | 0: u16 | stream: u32 | length: u32 | 0: u32 | payload
//! ```
//!
//! kinds DATA (stream bytes), FLUSH (u64 sequence), END (u32 ids of streams that stay
//! open), CTRL (JSON; flag MORE: continued by the next CTRL record).
//!
//! Credits and flush acknowledgements travel back as **signals**: an 8-byte write into
//! a landing word after the peer's ring, whose remote CQ data says what it is (the top
//! two bits: 0 a slot arrived, its index below; 1 credits, the count taken modulo 2^30;
//! 2 a flush reached, its sequence modulo 2^30), so they need no credit themselves and
//! fit the 4 bytes of CQ data that verbs gives.

use std::collections::{HashMap, VecDeque};

pub const SLOT_HEADER: usize = 8;
pub const RECORD_HEADER: usize = 16;

pub const K_DATA: u8 = 1;
pub const K_FLUSH: u8 = 2;
pub const K_END: u8 = 4;
pub const K_CTRL: u8 = 5;
pub const F_MORE: u8 = 1;

pub const SIG_ARRIVED: u64 = 0;
pub const SIG_CREDIT: u64 = 1;
pub const SIG_ACK: u64 = 2;
const SIG_SHIFT: u32 = 30;
pub const SIG_MASK: u64 = (1 << SIG_SHIFT) - 1;

pub fn signal(kind: u64, value: u64) -> u64 {
    (kind << SIG_SHIFT) | (value & SIG_MASK)
}

pub fn signal_kind(data: u64) -> (u64, u64) {
    ((data >> SIG_SHIFT) & 3, data & SIG_MASK)
}

/// The full counter whose low 30 bits are `low`, given a `near` counter known to be
/// at or after it and less than 2^29 past it.
pub fn widen(low: u64, near: u64) -> u64 {
    near - ((near.wrapping_sub(low)) & SIG_MASK)
}

/// Appends one record to the slot `slot` (its `used` header says how far it is filled).
pub fn put_record(slot: &mut [u8], kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let used = used(slot);
    let at = SLOT_HEADER + used;
    let h = &mut slot[at..at + RECORD_HEADER];
    h.fill(0);
    h[0] = kind;
    h[1] = flags;
    h[4..8].copy_from_slice(&stream.to_le_bytes());
    h[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    slot[at + RECORD_HEADER..at + RECORD_HEADER + payload.len()].copy_from_slice(payload);
    set_used(slot, used + RECORD_HEADER + payload.len());
}

pub fn used(slot: &[u8]) -> usize {
    u32::from_le_bytes(slot[0..4].try_into().expect("4 bytes")) as usize
}

pub fn set_used(slot: &mut [u8], n: usize) {
    slot[0..4].copy_from_slice(&(n as u32).to_le_bytes());
    slot[4..8].fill(0);
}

/// What the receiving side holds, sorted out of its ring.
#[derive(Default)]
pub struct Inbox {
    pub streams: HashMap<u32, VecDeque<Vec<u8>>>,
    /// Bytes of the front chunk of each stream already handed out.
    pub offsets: HashMap<u32, usize>,
    pub ctrl: VecDeque<Vec<u8>>,
    ctrl_part: Vec<u8>,
    /// The peer's END came; these streams stay open after it.
    pub ended: Option<Vec<u32>>,
    pub buffered: u64,
    pub received: u64,
}

/// Largest control message.
pub const MAX_CTRL: usize = 1 << 20;
/// Largest stream id (as the tcp medium).
pub const MAX_STREAM: u32 = 1024;

impl Inbox {
    /// Sorts the records of one slot in; answers the flush sequences it held.
    pub fn take_slot(&mut self, slot: &[u8]) -> Result<Vec<u64>, String> {
        let used = used(slot);
        if used > slot.len() - SLOT_HEADER {
            return Err(format!("peer wrote a slot claiming {used} bytes in a slot of {}: refusing", slot.len()));
        }
        let body = &slot[SLOT_HEADER..SLOT_HEADER + used];
        let mut at = 0;
        let mut flushes = Vec::new();
        while at < body.len() {
            if body.len() - at < RECORD_HEADER {
                return Err("peer wrote a truncated record header: refusing".into());
            }
            let h = &body[at..at + RECORD_HEADER];
            let (kind, flags) = (h[0], h[1]);
            let stream = u32::from_le_bytes(h[4..8].try_into().expect("4"));
            let len = u32::from_le_bytes(h[8..12].try_into().expect("4")) as usize;
            at += RECORD_HEADER;
            if len > body.len() - at {
                return Err(format!("peer wrote a record of {len} bytes past its slot: refusing"));
            }
            let payload = &body[at..at + len];
            at += len;
            match kind {
                K_DATA => {
                    if stream > MAX_STREAM {
                        return Err(format!("peer sent data for stream {stream} (the largest is {MAX_STREAM}): refusing"));
                    }
                    if let Some(open) = &self.ended {
                        if !open.contains(&stream) {
                            return Err(format!("peer sent data for stream {stream} after its end: refusing"));
                        }
                    }
                    self.buffered += len as u64;
                    self.received += len as u64;
                    self.streams.entry(stream).or_default().push_back(payload.to_vec());
                }
                K_FLUSH if len == 8 => flushes.push(u64::from_le_bytes(payload.try_into().expect("8"))),
                K_END if len.is_multiple_of(4) => {
                    self.ended = Some(payload.chunks(4).map(|c| u32::from_le_bytes(c.try_into().expect("4"))).collect())
                }
                K_CTRL => {
                    if self.ctrl_part.len() + len > MAX_CTRL {
                        return Err("peer sent a control message over 1 MiB: refusing".into());
                    }
                    self.ctrl_part.extend_from_slice(payload);
                    if flags & F_MORE == 0 {
                        let msg = std::mem::take(&mut self.ctrl_part);
                        if serde_json::from_slice::<serde_json::Value>(&msg).is_err() {
                            return Err("peer sent a control message that is not JSON: refusing".into());
                        }
                        self.ctrl.push_back(msg);
                    }
                }
                k => return Err(format!("peer wrote a record of kind {k} and {len} bytes: refusing")),
            }
        }
        Ok(flushes)
    }

    /// Copies queued bytes of `stream` into `buf`; answers how many.
    pub fn pop(&mut self, stream: u32, buf: &mut [u8]) -> usize {
        let Some(q) = self.streams.get_mut(&stream) else { return 0 };
        let off = self.offsets.entry(stream).or_insert(0);
        let mut n = 0;
        while n < buf.len() {
            let Some(front) = q.front() else { break };
            let take = (front.len() - *off).min(buf.len() - n);
            buf[n..n + take].copy_from_slice(&front[*off..*off + take]);
            n += take;
            *off += take;
            if *off == front.len() {
                q.pop_front();
                *off = 0;
            }
        }
        self.buffered -= n as u64;
        n
    }

    /// Whether `stream` will get no more bytes (the peer's END left it closed).
    pub fn closed(&self, stream: u32) -> bool {
        self.ended.as_ref().is_some_and(|open| !open.contains(&stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot() -> Vec<u8> {
        vec![0u8; 4096]
    }

    #[test]
    fn records_come_out_as_they_went_in() {
        let mut s = slot();
        put_record(&mut s, K_DATA, 0, 3, b"hello ");
        put_record(&mut s, K_CTRL, F_MORE, 0, b"{\"a\":");
        put_record(&mut s, K_DATA, 0, 3, b"world");
        put_record(&mut s, K_FLUSH, 0, 0, &7u64.to_le_bytes());
        let mut more = slot();
        put_record(&mut more, K_CTRL, 0, 0, b"1}");
        put_record(&mut more, K_END, 0, 0, &9u32.to_le_bytes());
        let mut inbox = Inbox::default();
        assert_eq!(inbox.take_slot(&s).unwrap(), vec![7]);
        assert!(inbox.ctrl.is_empty());
        assert_eq!(inbox.take_slot(&more).unwrap(), Vec::<u64>::new());
        assert_eq!(inbox.ctrl.pop_front().unwrap(), b"{\"a\":1}");
        let mut buf = [0u8; 4];
        let mut got = Vec::new();
        loop {
            let n = inbox.pop(3, &mut buf);
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"hello world");
        assert!(inbox.closed(3) && !inbox.closed(9));
        assert_eq!(inbox.buffered, 0);
    }

    #[test]
    fn garbage_is_refused_with_its_reason() {
        let mut s = slot();
        set_used(&mut s, 5000);
        assert!(Inbox::default().take_slot(&s).unwrap_err().contains("claiming 5000 bytes"));
        let mut s = slot();
        put_record(&mut s, 9, 0, 0, b"x");
        assert!(Inbox::default().take_slot(&s).unwrap_err().contains("kind 9"));
        let mut s = slot();
        put_record(&mut s, K_DATA, 0, 5000, b"x");
        assert!(Inbox::default().take_slot(&s).unwrap_err().contains("stream 5000"));
        let mut s = slot();
        put_record(&mut s, K_CTRL, 0, 0, b"not json");
        assert!(Inbox::default().take_slot(&s).unwrap_err().contains("not JSON"));
        let mut s = slot();
        put_record(&mut s, K_DATA, 0, 1, b"abc");
        set_used(&mut s, RECORD_HEADER + 1);
        assert!(Inbox::default().take_slot(&s).unwrap_err().contains("past its slot"));
    }

    #[test]
    fn counters_widen_across_the_wrap() {
        let big = (5u64 << 30) + 17;
        assert_eq!(widen(big & SIG_MASK, big), big);
        assert_eq!(widen((big - 3) & SIG_MASK, big), big - 3);
        assert_eq!(signal_kind(signal(SIG_ACK, big)), (SIG_ACK, big & SIG_MASK));
    }
}
