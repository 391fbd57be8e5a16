//! Kernel interfaces ferry defines itself because the libc crate lacks them:
//! userfaultfd (linux/userfaultfd.h) and PAGEMAP_SCAN (linux/fs.h). Used by
//! `ferry check` and by dirty-page tracking.

use std::{fs::File, io, os::fd::RawFd};

pub(crate) const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
pub(crate) const IOC_WRITE: u64 = 1;
pub(crate) const IOC_READ: u64 = 2;

pub(crate) const UFFD_API: u64 = 0xAA;
pub(crate) const UFFDIO: u64 = 0xAA;
pub(crate) const UFFD_USER_MODE_ONLY: libc::c_int = 1;

pub(crate) const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub(crate) const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub(crate) const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

pub(crate) const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub(crate) const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub(crate) const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioApi {
    pub(crate) api: u64,
    pub(crate) features: u64,
    pub(crate) ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioRange {
    pub(crate) start: u64,
    pub(crate) len: u64,
}

#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioRegister {
    pub(crate) range: UffdioRange,
    pub(crate) mode: u64,
    pub(crate) ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioCopy {
    pub(crate) dst: u64,
    pub(crate) src: u64,
    pub(crate) len: u64,
    pub(crate) mode: u64,
    pub(crate) copy: i64,
}

#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioWriteprotect {
    pub(crate) range: UffdioRange,
    pub(crate) mode: u64,
}

pub(crate) const UFFDIO_REGISTER: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x00,
    std::mem::size_of::<UffdioRegister>(),
);
pub(crate) const UFFDIO_COPY: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x03,
    std::mem::size_of::<UffdioCopy>(),
);
pub(crate) const UFFDIO_WRITEPROTECT: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x06,
    std::mem::size_of::<UffdioWriteprotect>(),
);
pub(crate) const UFFDIO_API: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x3F,
    std::mem::size_of::<UffdioApi>(),
);

pub(crate) use ferry_plugin_api::pagemap::{PAGE_IS_PRESENT, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING};

/// `ioctl(fd, request, arg)` with a pointer argument.
pub(crate) fn ioctl_ptr<T>(fd: RawFd, request: u64, arg: &mut T) -> io::Result<libc::c_int> {
    // SAFETY: `arg` is a valid, exclusively borrowed #[repr(C)] struct of the size encoded in
    // `request`; the kernel reads and writes only within it (and within buffers it points to,
    // which the callers keep alive for the call).
    let r = unsafe { libc::ioctl(fd, request as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// PAGEMAP_SCAN over `[start, end)` of the process whose pagemap is open: the
/// (start, end) of every region in `category` (see [`ferry_plugin_api::pagemap::scan`]).
pub(crate) fn pagemap_scan_range(pagemap: &File, start: u64, end: u64, flags: u64, category: u64) -> io::Result<Vec<(u64, u64)>> {
    ferry_plugin_api::pagemap::scan(pagemap, start, end, flags, ferry_plugin_api::pagemap::Categories::all_of(category))
}

pub(crate) const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, UFFDIO, 0x01, std::mem::size_of::<UffdioRange>());

/// A userfaultfd of process `tracer.pid()` (stopped), with API `features`: made in the
/// process by an injected call, fetched into ferry with `pidfd_getfd` and closed in the
/// process at once, so that only ferry holds it.
pub(crate) fn userfaultfd_in(tracer: &mut crate::kernel::tracer::Tracer, features: u64) -> Result<std::os::fd::OwnedFd, String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let pid = tracer.pid();
    // Write-protect tracking in async mode never reports a fault, so it needs no
    // kernel-mode faults either: user-mode only, which an unprivileged process (one
    // running as another user, vm.unprivileged_userfaultfd=0) may make too.
    let mut flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    if features & UFFD_FEATURE_WP_ASYNC != 0 {
        flags |= UFFD_USER_MODE_ONLY as u64;
    }
    let r = tracer
        .inject(pid, libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0])
        .map_err(|e| e.to_string())?;
    if r < 0 {
        return Err(format!("userfaultfd in process {pid}: {}", io::Error::from_raw_os_error(-r as i32)));
    }
    let target_fd = r as i32;
    // SAFETY: plain system calls with integer arguments; the pidfd is closed here and
    // the fetched fd is owned by the OwnedFd made from it.
    let fetched = unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        if pidfd < 0 {
            Err(format!("pidfd_open({pid}): {}", io::Error::last_os_error()))
        } else {
            let fd = libc::syscall(libc::SYS_pidfd_getfd, pidfd, target_fd, 0) as i32;
            let e = io::Error::last_os_error();
            libc::close(pidfd);
            if fd < 0 {
                Err(format!("pidfd_getfd of the userfaultfd: {e}"))
            } else {
                Ok(OwnedFd::from_raw_fd(fd))
            }
        }
    };
    let _ = tracer.inject(pid, libc::SYS_close, [target_fd as u64, 0, 0, 0, 0, 0]);
    let fd = fetched?;
    let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
    ioctl_ptr(fd.as_raw_fd(), UFFDIO_API, &mut api).map_err(|e| format!("UFFDIO_API (features {features:#x}): {e}"))?;
    Ok(fd)
}

#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioZeropage {
    pub(crate) range: UffdioRange,
    pub(crate) mode: u64,
    pub(crate) zeropage: i64,
}

pub(crate) const UFFDIO_ZEROPAGE: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x04, std::mem::size_of::<UffdioZeropage>());
pub(crate) const UFFDIO_WAKE: u64 = ioc(IOC_READ, UFFDIO, 0x02, std::mem::size_of::<UffdioRange>());
/// `uffd_msg.event` of a page fault.
pub(crate) const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

/// UFFD_FEATURE_EVENT_REMAP | EVENT_REMOVE | EVENT_UNMAP: the process's mremap, madvise
/// and munmap of areas still on their way are reported (and wait until read).
pub const LAZY_FEATURES: u64 = (1 << 2) | (1 << 3) | (1 << 6);
