//! The `tcp` transfer medium: an event's streams over one TCP connection to the peer
//! daemon. The wire protocol and the medium itself arrive with live migration; until
//! then the plugin loads, registers, and refuses to open with a clear reason.

use ferry_plugin_api::plugin::MediumPlugin;

struct Tcp;

impl MediumPlugin for Tcp {
    fn pushdata(&mut self, _stream: u32, _data: &[u8]) -> Result<(), String> {
        Err("not connected".into())
    }
    fn popdata(&mut self, _stream: u32, _buf: &mut [u8]) -> Result<usize, String> {
        Err("not connected".into())
    }
    fn flush(&mut self) -> Result<(), String> {
        Err("not connected".into())
    }
}

ferry_plugin_api::export_medium!(
    "tcp",
    "Streams over a TCP connection to a ferry daemon",
    |_params: &str| -> Result<Tcp, String> { Err("live migration over TCP is not in this build yet".into()) }
);
