//! Probes of the memory mechanisms: userfaultfd (missing, write-protect, async write-protect), `PAGEMAP_SCAN`, soft-dirty bits.

use super::*;

pub(super) struct Uffd {
    fd: OwnedFd,
    /// Features the kernel reports (all it supports when none were requested; else those enabled).
    features: u64,
    ioctls: u64,
    user_mode_only: bool,
}

/// Creates a userfaultfd and does the UFFDIO_API handshake asking for `features`.
pub(super) fn uffd_open(features: u64) -> Result<Uffd, String> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd takes only a flags argument.
    let mut raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    let mut user_mode_only = false;
    if raw < 0 {
        let first = errno();
        // SAFETY: as above.
        raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY) };
        if raw < 0 {
            return Err(format!(
                "userfaultfd: {first}; with UFFD_USER_MODE_ONLY: {}",
                errno()
            ));
        }
        user_mode_only = true;
    }
    let fd = own_fd(raw, "userfaultfd")?;
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl_ptr(fd.as_raw_fd(), UFFDIO_API, &mut api)
        .map_err(|e| format!("UFFDIO_API asking for features {features:#x}: {e}"))?;
    Ok(Uffd {
        fd,
        features: api.features,
        ioctls: api.ioctls,
        user_mode_only,
    })
}

pub(super) fn uffd_register(uffd: &Uffd, m: &Mapping, mode: u64, what: &str) -> Result<(), String> {
    let mut reg = UffdioRegister {
        range: UffdioRange {
            start: m.addr as u64,
            len: m.len as u64,
        },
        mode,
        ioctls: 0,
    };
    ioctl_ptr(uffd.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg)
        .map(|_| ())
        .map_err(|e| format!("UFFDIO_REGISTER ({what}): {e}"))
}

pub(super) fn probe_userfaultfd() -> ProbeResult {
    let uffd = uffd_open(0)?;
    // Post-copy's mechanism: a page registered for missing faults, filled with UFFDIO_COPY.
    let m = Mapping::new(1)?;
    uffd_register(&uffd, &m, UFFDIO_REGISTER_MODE_MISSING, "missing")?;
    let src: Vec<u8> = (0..page_size()).map(|i| (i * 31 + 5) as u8).collect();
    let mut copy = UffdioCopy {
        dst: m.addr as u64,
        src: src.as_ptr() as u64,
        len: page_size() as u64,
        mode: 0,
        copy: 0,
    };
    ioctl_ptr(uffd.fd.as_raw_fd(), UFFDIO_COPY, &mut copy)
        .map_err(|e| format!("UFFDIO_COPY: {e}"))?;
    if copy.copy != page_size() as i64 {
        return Err(format!(
            "UFFDIO_COPY copied {} bytes, not {}",
            copy.copy,
            page_size()
        ));
    }
    // The page is now populated, so reading it cannot fault into the userfaultfd.
    if (0..page_size()).any(|i| m.read_byte(i) != src[i]) {
        return Err("UFFDIO_COPY: the registered page does not hold the copied bytes".into());
    }
    drop(m);
    let mode = if uffd.user_mode_only {
        " (UFFD_USER_MODE_ONLY: faults from kernel accesses are not caught)"
    } else {
        ""
    };
    Ok(format!(
        "features {:#x}, ioctls {:#x}; UFFDIO_COPY filled a registered page{mode}",
        uffd.features, uffd.ioctls
    ))
}

pub(super) fn probe_userfaultfd_wp() -> ProbeResult {
    let all = uffd_open(0)
        .map_err(|e| format!("userfaultfd unavailable ({e})"))?
        .features;
    if all & UFFD_FEATURE_PAGEFAULT_FLAG_WP == 0 {
        return Err(format!(
            "UFFD_FEATURE_PAGEFAULT_FLAG_WP not in features {all:#x}"
        ));
    }
    let uffd = uffd_open(UFFD_FEATURE_PAGEFAULT_FLAG_WP)?;
    let m = Mapping::new(1)?;
    m.write_byte(0, 1);
    uffd_register(&uffd, &m, UFFDIO_REGISTER_MODE_WP, "write-protect")?;
    // Protect and unprotect the page again (no write happens while it is protected).
    uffd_writeprotect(&uffd, &m, true)?;
    uffd_writeprotect(&uffd, &m, false)?;
    Ok("UFFD_FEATURE_PAGEFAULT_FLAG_WP: registered and write-protected a page".into())
}

pub(super) fn uffd_writeprotect(uffd: &Uffd, m: &Mapping, protect: bool) -> Result<(), String> {
    let mut wp = UffdioWriteprotect {
        range: UffdioRange {
            start: m.addr as u64,
            len: m.len as u64,
        },
        mode: if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        },
    };
    ioctl_ptr(uffd.fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp)
        .map(|_| ())
        .map_err(|e| format!("UFFDIO_WRITEPROTECT: {e}"))
}

/// pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
pub(super) const PM_SOFT_DIRTY: u64 = 1 << 55;
pub(super) const PM_UFFD_WP: u64 = 1 << 57;

pub(super) fn pagemap_entry(pagemap: &File, addr: u64) -> Result<u64, String> {
    let mut buf = [0u8; 8];
    pagemap
        .read_exact_at(&mut buf, addr / page_size() as u64 * 8)
        .map_err(|e| format!("read /proc/self/pagemap: {e}"))?;
    Ok(u64::from_ne_bytes(buf))
}

pub(super) fn probe_userfaultfd_wp_async() -> ProbeResult {
    let all = uffd_open(0)
        .map_err(|e| format!("userfaultfd unavailable ({e})"))?
        .features;
    let want = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
    if all & want != want {
        return Err(format!(
            "features {all:#x} lack{}{}",
            if all & UFFD_FEATURE_WP_ASYNC == 0 {
                " WP_ASYNC"
            } else {
                ""
            },
            if all & UFFD_FEATURE_WP_UNPOPULATED == 0 {
                " WP_UNPOPULATED"
            } else {
                ""
            },
        ));
    }
    let uffd = uffd_open(UFFD_FEATURE_PAGEFAULT_FLAG_WP | want)?;
    if uffd.features & want != want {
        return Err(format!(
            "UFFDIO_API enabled only features {:#x}",
            uffd.features
        ));
    }
    let pagemap =
        File::open("/proc/self/pagemap").map_err(|e| format!("open /proc/self/pagemap: {e}"))?;
    let m = Mapping::new(4)?;
    let ps = page_size();
    for i in 0..4 {
        m.write_byte(i * ps, 1);
    }
    uffd_register(&uffd, &m, UFFDIO_REGISTER_MODE_WP, "write-protect")?;
    uffd_writeprotect(&uffd, &m, true)?;
    // WP_ASYNC is in effect (the handshake enabled it), so this write is resolved by the
    // kernel and clears the page's protection instead of waiting for a handler.
    m.write_byte(2 * ps + 5, 2);
    for i in 0..4 {
        let wp = pagemap_entry(&pagemap, m.page(i))? & PM_UFFD_WP != 0;
        if wp == (i == 2) {
            return Err(format!(
                "after writing page 2 of 4, page {i} is {}write-protected in pagemap",
                if wp { "still " } else { "not " }
            ));
        }
    }
    // The mechanism pre-copy uses: PAGEMAP_SCAN reporting written pages and re-protecting them.
    let scan = match pagemap_scan_written(&pagemap, &m) {
        Ok(regions) if regions == [(m.page(2), m.page(3))] => {
            m.write_byte(ps + 1, 3);
            match pagemap_scan_written(&pagemap, &m) {
                Ok(r) if r == [(m.page(1), m.page(2))] => {
                    "; a PAGEMAP_SCAN round found and re-protected exactly the written pages"
                        .to_string()
                }
                Ok(r) => return Err(format!("second PAGEMAP_SCAN round reported {r:x?}")),
                Err(e) => return Err(format!("second PAGEMAP_SCAN round: {e}")),
            }
        }
        Ok(r) => {
            return Err(format!(
                "PAGEMAP_SCAN reported written {r:x?}, expected page 2 of 4"
            ))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => "; PAGEMAP_SCAN absent".to_string(),
        Err(e) => format!("; PAGEMAP_SCAN with WP_MATCHING failed: {e}"),
    };
    drop(m);
    Ok(format!(
        "WP_ASYNC + WP_UNPOPULATED: a write cleared only its page's protection{scan}"
    ))
}

// ---------------------------------------------------------------------------------------------
// PAGEMAP_SCAN (linux/fs.h)
// ---------------------------------------------------------------------------------------------

/// One PAGEMAP_SCAN over `m`: returns the (start, end) of the regions reported.
pub(super) fn pagemap_scan(
    pagemap: &File,
    m: &Mapping,
    flags: u64,
    category: u64,
) -> io::Result<Vec<(u64, u64)>> {
    pagemap_scan_range(pagemap, m.addr as u64, m.addr as u64 + m.len as u64, flags, category)
}

pub(super) fn pagemap_scan_written(pagemap: &File, m: &Mapping) -> io::Result<Vec<(u64, u64)>> {
    pagemap_scan(
        pagemap,
        m,
        PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
        PAGE_IS_WRITTEN,
    )
}

pub(super) fn probe_pagemap_scan() -> ProbeResult {
    let pagemap =
        File::open("/proc/self/pagemap").map_err(|e| format!("open /proc/self/pagemap: {e}"))?;
    let m = Mapping::new(4)?;
    let ps = page_size();
    m.write_byte(0, 1);
    m.write_byte(2 * ps, 1);
    let regions =
        pagemap_scan(&pagemap, &m, 0, PAGE_IS_PRESENT).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTTY) | Some(libc::EINVAL) => format!("PAGEMAP_SCAN not supported ({e})"),
            _ => format!("PAGEMAP_SCAN: {e}"),
        })?;
    let expected = [(m.page(0), m.page(1)), (m.page(2), m.page(3))];
    if regions != expected {
        return Err(format!(
            "PAGEMAP_SCAN reported present {regions:x?}, expected pages 0 and 2 of 4"
        ));
    }
    Ok("PAGEMAP_SCAN on /proc/self/pagemap found exactly the touched pages".into())
}

// ---------------------------------------------------------------------------------------------
// soft-dirty
// ---------------------------------------------------------------------------------------------

pub(super) fn probe_soft_dirty() -> ProbeResult {
    let pagemap =
        File::open("/proc/self/pagemap").map_err(|e| format!("open /proc/self/pagemap: {e}"))?;
    let m = Mapping::new(1)?;
    m.write_byte(0, 1);
    write_file(Path::new("/proc/self/clear_refs"), "4")?;
    let cleared = pagemap_entry(&pagemap, m.page(0))? & PM_SOFT_DIRTY != 0;
    m.write_byte(1, 2);
    let after = pagemap_entry(&pagemap, m.page(0))? & PM_SOFT_DIRTY != 0;
    if !after {
        return Err(
            "clear_refs 4 accepted, but pagemap bit 55 stays 0 after a write \
                    (soft-dirty not compiled in)"
                .into(),
        );
    }
    if cleared {
        return Err("pagemap bit 55 was not cleared by clear_refs 4".into());
    }
    Ok("clear_refs 4 cleared pagemap bit 55 and a write set it again".into())
}
