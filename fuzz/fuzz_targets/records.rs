//! A plugin's stream of records, as a restore reads it: every record is checked before
//! it is handed out; any bytes end in records, the end, or an error.
#![no_main]
use ferry::image::RecordReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = RecordReader::new(data, 1);
    for _ in 0..4096 {
        match reader.next() {
            Ok(Some(rec)) => {
                let _ = ferry::image::parse_json::<serde_json::Value>(&rec);
            }
            Ok(None) | Err(_) => break,
        }
    }
});
