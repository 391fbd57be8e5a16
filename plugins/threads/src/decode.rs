//! The plugin's records read and checked in the order a restart reads them, with the
//! checks a restart makes on them; the fuzz target `plugin_threads`'s entry point.

use super::*;

pub fn decode(source: &mut SourceRef<'_>) -> Result<(), String> {
    let header: Header = util::expect_json(source, "threads")?;
    check_header(&header)?;
    for &want in &header.tids {
        let rec = util::next_record(source)?.ok_or_else(|| format!("the image ends before the record of thread {want}"))?;
        let img: ThreadImage = util::parse_json(&rec, "thread")?;
        let mut thread = check_thread(img, want)?;
        restart_fixup(&mut thread.regs).map_err(|e| format!("thread {want}: {e}"))?;
    }
    if let Some(extra) = util::next_record(source)? {
        return Err(format!("unexpected `{}` record after the last thread", extra.kind));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fuzz_seeds_of_real_checkpoints_decode() {
        ferry_plugin_api::testing::assert_seeds_decode(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/plugin_threads"), super::decode);
    }
}
