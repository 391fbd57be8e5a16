//! libfabric, loaded at run time: `libfabric.so.1` is opened with dlopen, its five
//! exported functions are looked up by name, and the calls its headers define inline
//! (through the ops tables of its objects) go through the C shim in `shim/fab.c`,
//! which receives those five as pointers. So the plugin loads where libfabric is
//! absent, and says why it cannot work there when opened.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

/// Access flags of a memory registration (fabric.h).
pub const FI_WRITE: u64 = 1 << 9;
pub const FI_REMOTE_WRITE: u64 = 1 << 13;
/// Mode and mr_mode bits the medium acts on.
pub const FI_RX_CQ_DATA: u64 = 1 << 56;
pub const FI_MR_LOCAL: u64 = 1 << 2;
pub const FI_MR_VIRT_ADDR: u64 = 1 << 4;
/// Completion flags.
pub const FI_REMOTE_CQ_DATA: u64 = 1 << 17;
pub const FI_EAGAIN: isize = 11;
pub const FI_EAVAIL: isize = 259;
const FI_ENODATA: c_int = 61;

#[repr(C)]
#[derive(Clone, Copy)]
struct Fns {
    getinfo: *const c_void,
    freeinfo: *const c_void,
    dupinfo: *const c_void,
    fabric: *const c_void,
    strerror: *const c_void,
}

// SAFETY: plain function pointers into a library that stays loaded for the process.
unsafe impl Send for Fns {}
unsafe impl Sync for Fns {}

#[repr(C)]
struct Attr {
    provider: [c_char; 64],
    fabric: [c_char; 128],
    domain: [c_char; 128],
    mr_mode: u64,
    mode: u64,
    cq_data_size: u64,
    max_msg_size: u64,
    waitable: c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct CqEntry {
    pub context: u64,
    pub flags: u64,
    pub len: u64,
    pub data: u64,
}

#[cfg(ferry_fabric_shim)]
extern "C" {
    fn ferry_fab_list(f: *const Fns, prov: *const c_char, out: *mut c_char, len: usize, err: *mut c_char, errlen: usize) -> c_int;
    fn ferry_fab_open(f: *const Fns, prov: *const c_char, node: *const c_char, attr: *mut Attr, err: *mut c_char, errlen: usize) -> *mut c_void;
    fn ferry_fab_close(fab: *mut c_void);
    fn ferry_fab_getname(fab: *mut c_void, buf: *mut c_void, len: *mut usize) -> c_int;
    fn ferry_fab_av_insert(fab: *mut c_void, addr: *const c_void, out: *mut u64) -> c_int;
    fn ferry_fab_mr_reg(fab: *mut c_void, buf: *mut c_void, len: usize, access: u64, key: u64, mr: *mut *mut c_void, outkey: *mut u64, desc: *mut *mut c_void) -> c_int;
    fn ferry_fab_mr_close(mr: *mut c_void);
    fn ferry_fab_writedata(fab: *mut c_void, buf: *const c_void, len: usize, desc: *mut c_void, data: u64, dest: u64, addr: u64, key: u64, ctx: *mut c_void) -> isize;
    fn ferry_fab_recv(fab: *mut c_void, buf: *mut c_void, len: usize, desc: *mut c_void, ctx: *mut c_void) -> isize;
    fn ferry_fab_cq_read(fab: *mut c_void, out: *mut CqEntry, count: usize, timeout_ms: c_int) -> isize;
    fn ferry_fab_cq_err(fab: *mut c_void, ctx: *mut u64, msg: *mut c_char, len: usize) -> c_int;
}

/// The loaded library: its functions, or why it could not be had.
fn library() -> Result<&'static Fns, String> {
    static LIB: OnceLock<Result<Fns, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        if !cfg!(ferry_fabric_shim) {
            return Err("this build of the rdma medium has no libfabric support (built without libfabric-dev)".into());
        }
        // SAFETY: loading libfabric runs its constructors, which only set up its provider list.
        let lib = unsafe { libloading::Library::new("libfabric.so.1") }
            .map_err(|e| format!("libfabric is not installed (libfabric.so.1: {e}); install libfabric1"))?;
        let sym = |name: &[u8]| -> Result<*const c_void, String> {
            // SAFETY: only the address is taken; the shim calls it with libfabric's own prototype.
            unsafe { lib.get::<*const c_void>(name) }
                .map(|s| *s)
                .map_err(|e| format!("libfabric.so.1 lacks {}: {e}", String::from_utf8_lossy(&name[..name.len() - 1])))
        };
        let fns = Fns {
            getinfo: sym(b"fi_getinfo\0")?,
            freeinfo: sym(b"fi_freeinfo\0")?,
            dupinfo: sym(b"fi_dupinfo\0")?,
            fabric: sym(b"fi_fabric\0")?,
            strerror: sym(b"fi_strerror\0")?,
        };
        // Kept loaded for the life of the process: the fabric objects point into it.
        std::mem::forget(lib);
        Ok(fns)
    })
    .as_ref()
    .map_err(|e| e.clone())
}

fn text(buf: &[c_char]) -> String {
    // SAFETY: the shim always NUL-terminates what it writes (snprintf); the buffers start zeroed.
    unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
}

fn cstring(s: &str, what: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} {s:?} contains a NUL byte"))
}

/// One provider fi_getinfo offers with RMA between hosts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    pub provider: String,
    pub fabric: String,
    pub domain: String,
}

/// The providers with RDM endpoints and RMA that libfabric finds here, best first
/// (`provider`: only that one).
pub fn offers(provider: Option<&str>) -> Result<Vec<Offer>, String> {
    let fns = library()?;
    let prov = provider.map(|p| cstring(p, "provider")).transpose()?;
    let mut out = vec![0 as c_char; 16 << 10];
    let mut err = [0 as c_char; 512];
    #[cfg(ferry_fabric_shim)]
    // SAFETY: every buffer is ours and sized as passed; fns holds libfabric's functions.
    let rc = unsafe {
        ferry_fab_list(fns, prov.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()), out.as_mut_ptr(), out.len(), err.as_mut_ptr(), err.len())
    };
    #[cfg(not(ferry_fabric_shim))]
    let rc = {
        let _ = (fns, prov);
        -1
    };
    if rc == -FI_ENODATA {
        return Ok(Vec::new());
    }
    if rc != 0 {
        return Err(text(&err));
    }
    let mut seen = Vec::new();
    for line in text(&out).lines() {
        let mut f = line.splitn(3, ' ');
        let offer = Offer {
            provider: f.next().unwrap_or("").to_string(),
            fabric: f.next().unwrap_or("").to_string(),
            domain: f.next().unwrap_or("").to_string(),
        };
        if !seen.iter().any(|o: &Offer| o.provider == offer.provider) {
            seen.push(offer);
        }
    }
    Ok(seen)
}

/// What the medium needs to know of an opened provider.
#[derive(Clone, Debug)]
pub struct Info {
    pub provider: String,
    pub fabric: String,
    pub domain: String,
    pub mr_mode: u64,
    pub mode: u64,
    pub cq_data_size: u64,
    pub waitable: bool,
}

/// An opened fabric: domain, completion queue, address vector and one RDM endpoint.
/// libfabric's objects are opened thread-safe (FI_THREAD_SAFE), so one thread may
/// post writes while another reads completions.
pub struct Fabric {
    fab: *mut c_void,
    pub info: Info,
}

// SAFETY: the domain was opened with FI_THREAD_SAFE.
unsafe impl Send for Fabric {}
unsafe impl Sync for Fabric {}

/// A memory registration, closed when dropped (before its fabric: the medium keeps
/// its registrations in fields dropped first).
pub struct Mr {
    mr: *mut c_void,
    pub key: u64,
    pub desc: *mut c_void,
}

unsafe impl Send for Mr {}
unsafe impl Sync for Mr {}

impl Drop for Mr {
    fn drop(&mut self) {
        #[cfg(ferry_fabric_shim)]
        // SAFETY: mr came from ferry_fab_mr_reg and is closed once.
        unsafe {
            ferry_fab_mr_close(self.mr)
        };
    }
}

impl Fabric {
    /// Opens `provider` (None: the best with RMA) on the local address `node`.
    pub fn open(provider: Option<&str>, node: Option<&str>) -> Result<Fabric, String> {
        let fns = library()?;
        let prov = provider.map(|p| cstring(p, "provider")).transpose()?;
        let node = node.map(|n| cstring(n, "address")).transpose()?;
        // SAFETY: Attr is plain data, valid all zero.
        let mut attr: Attr = unsafe { std::mem::zeroed() };
        let mut err = [0 as c_char; 512];
        #[cfg(ferry_fabric_shim)]
        // SAFETY: as in offers; attr and err are ours.
        let fab = unsafe {
            ferry_fab_open(
                fns,
                prov.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
                node.as_ref().map_or(std::ptr::null(), |n| n.as_ptr()),
                &mut attr,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        #[cfg(not(ferry_fabric_shim))]
        let fab: *mut c_void = {
            let _ = (fns, prov, node);
            std::ptr::null_mut()
        };
        if fab.is_null() {
            return Err(text(&err));
        }
        let info = Info {
            provider: text(&attr.provider),
            fabric: text(&attr.fabric),
            domain: text(&attr.domain),
            mr_mode: attr.mr_mode,
            mode: attr.mode,
            cq_data_size: attr.cq_data_size,
            waitable: attr.waitable != 0,
        };
        Ok(Fabric { fab, info })
    }

    fn error(&self, what: &str, rc: isize) -> String {
        let fns = library().expect("loaded: a Fabric exists");
        // SAFETY: fi_strerror takes a positive fi_errno and answers a static string.
        let f: extern "C" fn(c_int) -> *const c_char = unsafe { std::mem::transmute(fns.strerror) };
        let s = f(rc.unsigned_abs() as c_int);
        // SAFETY: a static NUL-terminated string of libfabric's.
        format!("{what}: {}", unsafe { CStr::from_ptr(s) }.to_string_lossy())
    }

    /// The endpoint's address, to hand to the peer.
    pub fn name(&self) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; 256];
        let mut len = buf.len();
        #[cfg(ferry_fabric_shim)]
        // SAFETY: buf holds len bytes.
        let rc = unsafe { ferry_fab_getname(self.fab, buf.as_mut_ptr().cast(), &mut len) } as isize;
        #[cfg(not(ferry_fabric_shim))]
        let rc = -1;
        if rc != 0 {
            return Err(self.error("fi_getname", rc));
        }
        buf.truncate(len);
        Ok(buf)
    }

    /// Adds the peer's address; answers its fi_addr.
    pub fn insert(&self, name: &[u8]) -> Result<u64, String> {
        let mut a = 0u64;
        #[cfg(ferry_fabric_shim)]
        // SAFETY: name is an address of this provider's format, as the peer's fi_getname gave it.
        let rc = unsafe { ferry_fab_av_insert(self.fab, name.as_ptr().cast(), &mut a) } as isize;
        #[cfg(not(ferry_fabric_shim))]
        let rc = {
            let _ = name;
            -1
        };
        if rc != 0 {
            return Err(self.error("fi_av_insert of the peer's address", rc));
        }
        Ok(a)
    }

    /// Registers `len` bytes at `buf` for `access`.
    ///
    /// # Safety
    /// The memory must stay allocated, and not move, until the Mr is dropped.
    pub unsafe fn register(&self, buf: *mut u8, len: usize, access: u64, key: u64) -> Result<Mr, String> {
        let (mut mr, mut outkey, mut desc) = (std::ptr::null_mut(), 0u64, std::ptr::null_mut());
        #[cfg(ferry_fabric_shim)]
        let rc = ferry_fab_mr_reg(self.fab, buf.cast(), len, access, key, &mut mr, &mut outkey, &mut desc) as isize;
        #[cfg(not(ferry_fabric_shim))]
        let rc = {
            let _ = (buf, len, access, key);
            -1
        };
        if rc != 0 {
            return Err(self.error("fi_mr_reg", rc));
        }
        Ok(Mr { mr, key: outkey, desc })
    }

    /// Posts one RMA write with remote CQ data; Ok(false) when the provider has no room
    /// now (FI_EAGAIN: read completions, then try again).
    ///
    /// # Safety
    /// `buf..buf+len` must lie in the registration `desc` belongs to and stay untouched
    /// until the write's completion (context `ctx`) is read.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn write(&self, buf: *const u8, len: usize, desc: *mut c_void, data: u64, dest: u64, addr: u64, key: u64, ctx: u64) -> Result<bool, String> {
        #[cfg(ferry_fabric_shim)]
        let rc = ferry_fab_writedata(self.fab, buf.cast(), len, desc, data, dest, addr, key, ctx as *mut c_void);
        #[cfg(not(ferry_fabric_shim))]
        let rc: isize = {
            let _ = (buf, len, desc, data, dest, addr, key, ctx);
            -1
        };
        match rc {
            0 => Ok(true),
            r if r == -FI_EAGAIN => Ok(false),
            r => Err(self.error("fi_writedata", r)),
        }
    }

    /// Posts a receive (consumed by a remote write's CQ data when the provider's mode
    /// has FI_RX_CQ_DATA).
    ///
    /// # Safety
    /// As for [`Fabric::write`].
    pub unsafe fn recv(&self, buf: *mut u8, len: usize, desc: *mut c_void, ctx: u64) -> Result<bool, String> {
        #[cfg(ferry_fabric_shim)]
        let rc = ferry_fab_recv(self.fab, buf.cast(), len, desc, ctx as *mut c_void);
        #[cfg(not(ferry_fabric_shim))]
        let rc: isize = {
            let _ = (buf, len, desc, ctx);
            -1
        };
        match rc {
            0 => Ok(true),
            r if r == -FI_EAGAIN => Ok(false),
            r => Err(self.error("fi_recv", r)),
        }
    }

    /// Reads completions into `out`, waiting up to `timeout_ms` for the first.
    pub fn completions(&self, out: &mut [CqEntry], timeout_ms: i32) -> Result<usize, String> {
        #[cfg(ferry_fabric_shim)]
        // SAFETY: out holds out.len() entries.
        let n = unsafe { ferry_fab_cq_read(self.fab, out.as_mut_ptr(), out.len(), timeout_ms) };
        #[cfg(not(ferry_fabric_shim))]
        let n: isize = {
            let _ = (out, timeout_ms);
            -1
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        if n == -FI_EAVAIL {
            let mut ctx = 0u64;
            let mut msg = [0 as c_char; 512];
            #[cfg(ferry_fabric_shim)]
            // SAFETY: msg holds its length.
            unsafe {
                ferry_fab_cq_err(self.fab, &mut ctx, msg.as_mut_ptr(), msg.len())
            };
            return Err(format!("a transfer failed: {}", text(&msg)));
        }
        if n == -FI_EAGAIN || n == -110 {
            return Ok(0); // FI_ETIMEDOUT from a wait that saw nothing
        }
        Err(self.error("fi_cq_read", n))
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        #[cfg(ferry_fabric_shim)]
        // SAFETY: fab came from ferry_fab_open and is closed once.
        unsafe {
            ferry_fab_close(self.fab)
        };
    }
}
