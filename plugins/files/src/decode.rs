//! The plugin's records read and checked in the order a restart reads them, with the
//! checks a restart makes on each before it acts on it (the header, each description
//! and pipe, the content chunks that follow them); the fuzz target `plugin_files`'s
//! entry point.

use std::collections::HashSet;

use ferry_plugin_api::{
    util::{expect_json, next_record, parse_json},
    RecordFormat, SourceRef,
};

use crate::model::{check_chunk, Desc, Header, PipeRec, KIND_DESC, KIND_DESC_DATA, KIND_HEADER, KIND_PIPE, KIND_PIPE_DATA};

pub fn decode(source: &mut SourceRef<'_>) -> Result<(), String> {
    let h: Header = expect_json(source, KIND_HEADER)?;
    h.validate()?;
    let (mut descs, mut pipes) = (h.descriptions, h.pipes);
    let mut seen = HashSet::new();
    while descs > 0 || pipes > 0 {
        let rec = next_record(source)?
            .ok_or_else(|| format!("the image ends with {descs} descriptions and {pipes} pipes of the files plugin still missing"))?;
        let (what, kind, mut remaining) = match rec.kind.as_str() {
            KIND_DESC if descs > 0 => {
                descs -= 1;
                let desc: Desc = parse_json(&rec, KIND_DESC)?;
                desc.validate(&mut seen)?;
                (desc.label(), KIND_DESC_DATA, desc.data_len())
            }
            KIND_PIPE if pipes > 0 => {
                pipes -= 1;
                let pipe: PipeRec = parse_json(&rec, KIND_PIPE)?;
                pipe.validate(&mut seen)?;
                ("a pipe".to_string(), KIND_PIPE_DATA, pipe.data_len)
            }
            other => return Err(format!("unexpected `{other}` record in the files image ({descs} descriptions and {pipes} pipes still expected)")),
        };
        while remaining > 0 {
            let rec = next_record(source)?.ok_or_else(|| format!("{what}: the image ends with {remaining} content bytes missing"))?;
            check_chunk(&what, kind, rec.kind.as_str(), rec.format == RecordFormat::Raw, rec.payload.len(), remaining)?;
            remaining -= rec.payload.len() as u64;
        }
    }
    if let Some(extra) = next_record(source)? {
        return Err(format!("unexpected `{}` record after the last of the files plugin", extra.kind));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fuzz_seeds_of_real_checkpoints_decode() {
        ferry_plugin_api::testing::assert_seeds_decode(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/plugin_files"), super::decode);
    }
}
