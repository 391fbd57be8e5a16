//! Random bytes from the kernel, and the token that names an event on both machines.

use std::io::{self, Read};

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Fills `buf` from the kernel's random pool: getrandom(2), else /dev/urandom.
pub fn fill(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe `rest`, memory we hold mutably.
        let r = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf));
        }
        done += r as usize;
    }
    Ok(())
}

/// Whether `t` has the form of a token: 32 lowercase hex chars.
pub fn is_token(t: &str) -> bool {
    t.len() == 32 && t.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// 128 random bits as 32 lowercase hex chars: the token that names an event on both
/// machines. The token is a name, not a secret (the daemon authenticates peers apart
/// from it), so if the kernel gives no random bytes it falls back to a hash of time,
/// pid and a counter rather than failing the checkpoint.
pub fn new_token() -> String {
    let mut bytes = [0u8; 16];
    if fill(&mut bytes).is_err() {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let seed = format!("{now}-{}-{}", std::process::id(), COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        bytes[..8].copy_from_slice(&xxh3_64(seed.as_bytes()).to_le_bytes());
        bytes[8..].copy_from_slice(&xxh3_64_with_seed(seed.as_bytes(), 1).to_le_bytes());
    }
    format!("{:032x}", u128::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_hex() {
        let (a, b) = (new_token(), new_token());
        assert!(is_token(&a), "{a}");
        assert_ne!(a, b);
    }
}
