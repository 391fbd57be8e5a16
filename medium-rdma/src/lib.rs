//! The `rdma` transfer medium. It must build and load where rdma-core is absent, so
//! nothing links against libibverbs: opening the medium looks for a device first and
//! says plainly when there is none.

use std::path::Path;

use ferry_plugin_api::plugin::MediumPlugin;

struct Rdma;

impl MediumPlugin for Rdma {
    fn pushdata(&mut self, _stream: u32, _data: &[u8]) -> Result<(), String> {
        Err("no RDMA connection".into())
    }
    fn popdata(&mut self, _stream: u32, _buf: &mut [u8]) -> Result<usize, String> {
        Err("no RDMA connection".into())
    }
    fn flush(&mut self) -> Result<(), String> {
        Err("no RDMA connection".into())
    }
}

/// The RDMA devices the kernel knows of.
fn devices() -> Vec<String> {
    std::fs::read_dir(Path::new("/sys/class/infiniband"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

fn open(_params: &str) -> Result<Rdma, String> {
    let found = devices();
    if found.is_empty() {
        return Err("no RDMA device on this machine (/sys/class/infiniband is empty or absent)".into());
    }
    Err(format!("RDMA devices {} found, but the RDMA transport is not in this build yet", found.join(", ")))
}

ferry_plugin_api::export_medium!("rdma", "RDMA transport (loads libibverbs at run time)", open);
