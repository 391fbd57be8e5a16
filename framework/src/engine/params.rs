//! The request's per-plugin options (`mechanism.plugin_params`), offered to plugins
//! through their context (`ProcessContext::plugin_param`). An event runs on one thread
//! from start to end (its tracer is bound to it), so the options of the request being
//! served are the thread's: set for the scope of the event with [`scope`].

use std::{cell::RefCell, collections::BTreeMap};

/// Plugin name → option → value.
pub type PluginParams = BTreeMap<String, BTreeMap<String, String>>;

thread_local! {
    static CURRENT: RefCell<PluginParams> = const { RefCell::new(BTreeMap::new()) };
}

/// The options in force on this thread until the guard is dropped (the ones before
/// come back then).
pub struct Scope {
    before: PluginParams,
}

pub fn scope(params: PluginParams) -> Scope {
    Scope { before: CURRENT.with(|c| std::mem::replace(&mut *c.borrow_mut(), params)) }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let before = std::mem::take(&mut self.before);
        CURRENT.with(|c| *c.borrow_mut() = before);
    }
}

/// The options in force on this thread (for a thread that serves part of the same
/// request: give them to it with [`scope`]).
pub fn current() -> PluginParams {
    CURRENT.with(|c| c.borrow().clone())
}

/// Option `key` of plugin `plugin` in the request served on this thread.
pub fn get(plugin: &str, key: &str) -> Option<String> {
    CURRENT.with(|c| c.borrow().get(plugin).and_then(|m| m.get(key)).cloned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_sets_the_options_and_gives_the_earlier_ones_back() {
        let one = |k: &str, v: &str| PluginParams::from([("files".to_string(), BTreeMap::from([(k.to_string(), v.to_string())]))]);
        assert_eq!(get("files", "tcp_close"), None);
        let outer = scope(one("tcp_close", "1"));
        assert_eq!(get("files", "tcp_close").as_deref(), Some("1"));
        assert_eq!(get("memory", "tcp_close"), None);
        {
            let _inner = scope(one("other", "x"));
            assert_eq!(get("files", "tcp_close"), None);
            assert_eq!(get("files", "other").as_deref(), Some("x"));
        }
        assert_eq!(get("files", "tcp_close").as_deref(), Some("1"));
        drop(outer);
        assert_eq!(get("files", "tcp_close"), None);
        // Another thread (another request) has its own.
        let _s = scope(one("tcp_close", "1"));
        assert_eq!(std::thread::spawn(|| get("files", "tcp_close")).join().unwrap(), None);
    }
}
