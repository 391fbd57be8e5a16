//! The handshake's messages as a daemon reads them from any peer: a message or an error.
#![no_main]
use ferry::wire::protocol;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut src = std::io::Cursor::new(data);
    for _ in 0..64 {
        if protocol::recv(&mut src).is_err() {
            break;
        }
    }
    let _ = protocol::Verdict::from_json(&String::from_utf8_lossy(data));
});
