//! The plugin's records read and checked in the order a restart reads them, with the
//! checks a restart makes before it touches the process; the fuzz target
//! `plugin_signals`'s entry point.

use super::*;

pub fn decode(source: &mut SourceRef<'_>) -> Result<(), String> {
    let mut status = Status::default();
    let a: Actions = read(source, "sigactions", &mut status)?;
    check_actions(&a)?;
    let p: Pending = read(source, "pending", &mut status)?;
    check_pending(&p)?;
    for s in p.shared.iter().chain(p.threads.iter().flat_map(|t| &t.pending)) {
        check_siginfo(s, "the image")?;
    }
    let t: Itimers = read(source, "itimers", &mut status)?;
    check_itimers(&t)?;
    if let Some(extra) = util::next_record(source)? {
        return Err(format!("unexpected `{}` record after the interval timers", extra.kind));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fuzz_seeds_of_real_checkpoints_decode() {
        ferry_plugin_api::testing::assert_seeds_decode(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/plugin_signals"), super::decode);
    }
}
