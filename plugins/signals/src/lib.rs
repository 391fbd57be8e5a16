//! The `signals` subsystem plugin: Signal actions, masks, pending signals, itimers.
//! Its checkpoint and restart arrive with the checkpoint/restore issue; here it loads,
//! registers and describes itself.

use ferry_plugin_api::{
    abi_stable::std_types::{RString, RVec},
    plugin::SubsystemPlugin,
    ContextRef, Progress, SinkRef, SourceRef, SubsystemInfo,
};

struct Plugin;

fn names(items: &[&str]) -> RVec<RString> {
    items.iter().map(|s| RString::from(*s)).collect()
}

impl SubsystemPlugin for Plugin {
    fn info(&self) -> SubsystemInfo {
        SubsystemInfo {
            entity_kinds: names(&["sigaction", "pending-signal", "itimer"]),
            after: names(&["threads"]),
            shared_resources: names(&[]),
        }
    }

    fn checkpoint(&mut self, _ctx: &mut ContextRef<'_>, _sink: &mut SinkRef<'_>) -> Result<Progress, String> {
        Err("checkpoint of signals state is not implemented in this build".into())
    }

    fn restart(&mut self, _ctx: &mut ContextRef<'_>, _source: &mut SourceRef<'_>) -> Result<Progress, String> {
        Err("restart of signals state is not implemented in this build".into())
    }
}

ferry_plugin_api::export_subsystem!("signals", "Signal actions, masks, pending signals, itimers", || Plugin);
