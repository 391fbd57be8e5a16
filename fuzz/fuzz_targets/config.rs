//! A configuration file: parsed and validated, or refused with a line naming the key.
#![no_main]
use ferry::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = Config::parse(text, std::path::Path::new("fuzz.json")) {
            let _ = c.validate();
            let _ = c.to_json_pretty();
        }
    }
});
