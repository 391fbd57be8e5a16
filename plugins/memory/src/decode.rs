//! The plugin's records read and checked in the order a restart reads them, with the
//! checks a restart makes on them before it touches the process (not the mapped files'
//! identity, which is the file system's, not the image's); the fuzz target
//! `plugin_memory`'s entry point.

use super::*;

pub fn decode(source: &mut SourceRef<'_>) -> Result<(), String> {
    let mut state: Option<MmState> = None;
    while let Some(rec) = util::next_record(source)? {
        match (rec.kind.as_str(), &state) {
            ("pages", _) => {
                pages(&rec)?;
            }
            ("live", None) => check_live(&util::parse_json(&rec, "live")?, (0, 0))?,
            ("gone-data", Some(s)) => {
                gone::check_data(&s.gone, &rec.payload)?;
            }
            (_, None) => {
                let s: MmState = util::parse_json(&rec, "mm")?;
                s.validate()?;
                state = Some(s);
            }
            (other, Some(_)) => return Err(format!("unexpected record `{other}` after the pages")),
        }
    }
    state.map(drop).ok_or_else(|| "the image has no `mm` record".into())
}

/// The runs and data of a `pages` record.
pub(crate) fn pages(rec: &Record) -> Result<(layout::Runs, &[u8]), String> {
    if rec.kind.as_str() != "pages" || rec.format != RecordFormat::Raw {
        return Err(format!("unexpected record `{}` among the pages", rec.kind));
    }
    layout::decode_runs(&rec.payload)
}

/// Checks the ranges of a pre-copy round's `live` record: page-aligned, in user space,
/// clear of the scratch area `(addr, len)`.
pub(crate) fn check_live(live: &Live, scratch: (u64, u64)) -> Result<(), String> {
    for &(s, e) in live.drop.iter().chain(&live.map) {
        if s % PAGE != 0 || e % PAGE != 0 || s >= e || e > layout::USER_TOP || (s < scratch.0 + scratch.1 && scratch.0 < e) {
            return Err(format!("a pre-copy round names a bad range {s:#x}-{e:#x}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fuzz_seeds_of_real_checkpoints_decode() {
        ferry_plugin_api::testing::assert_seeds_decode(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/plugin_memory"), super::decode);
    }
}
