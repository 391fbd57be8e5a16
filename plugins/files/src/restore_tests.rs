//! Unit tests of the restore's pure helpers.

use super::*;

#[test]
fn reopen_flags() {
    // O_RDWR|O_LARGEFILE as fdinfo shows it keeps its mode and gains O_NOCTTY|O_CLOEXEC.
    let f = open_flags(0o100002);
    assert_eq!(f & libc::O_ACCMODE as u32, libc::O_RDWR as u32);
    assert_ne!(f & libc::O_NOCTTY as u32, 0);
    assert_ne!(f & libc::O_CLOEXEC as u32, 0);
    assert_ne!(f & 0o100000, 0); // the kernel's O_LARGEFILE (libc says 0 on x86_64)
                                 // Never create, truncate or make a tmpfile again.
    let f = open_flags((libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_TMPFILE | libc::O_APPEND) as u32);
    assert_eq!(f & (libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL) as u32, 0);
    assert_eq!(f & O_TMPFILE_BIT, 0);
    assert_ne!(f & libc::O_APPEND as u32, 0);
}
