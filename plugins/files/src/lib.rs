//! The `files` subsystem plugin: File descriptors, offsets, pipes, cwd, root, umask.
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
            entity_kinds: names(&["fd", "cwd", "root"]),
            after: names(&["memory"]),
            shared_resources: names(&["pipe", "file-description"]),
        }
    }

    fn checkpoint(&mut self, _ctx: &mut ContextRef<'_>, _sink: &mut SinkRef<'_>) -> Result<Progress, String> {
        Err("checkpoint of files state is not implemented in this build".into())
    }

    fn restart(&mut self, _ctx: &mut ContextRef<'_>, _source: &mut SourceRef<'_>) -> Result<Progress, String> {
        Err("restart of files state is not implemented in this build".into())
    }
}

ferry_plugin_api::export_subsystem!("files", "File descriptors, offsets, pipes, cwd, root, umask", || Plugin);
