//! The signals plugin's records, decoded and checked as its restart does: any records end
//! in the plugin's answer or an error, never a panic (see `testing::unframe` for the
//! input's framing; fuzz/corpus/plugin_signals holds records of real checkpoints).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_plugin_api::testing::fuzz_decode(data, |source| ferry_subsystem_signals::decode(source).map(drop));
});
