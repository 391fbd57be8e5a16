//! The plugin side of the ABI: plain Rust traits with default bodies, so a simple
//! plugin implements almost nothing, and the adapters that turn them into ABI-stable
//! objects. Every call goes through [`guard`], so a panic inside a plugin becomes an
//! error naming the plugin instead of unwinding into the host.

use std::panic::{catch_unwind, AssertUnwindSafe};

use abi_stable::std_types::{RResult, RSlice, RSliceMut, RStr, RString};

use crate::{
    ContextRef, EventKind, Medium, PResult, PluginError, Progress, Recovery, SinkRef,
    SourceRef, Status, Subsystem, SubsystemInfo,
};

/// A subsystem plugin, written in plain Rust.
pub trait SubsystemPlugin: Send + 'static {
    fn info(&self) -> SubsystemInfo {
        SubsystemInfo::default()
    }
    fn setup(&mut self, _ctx: &mut ContextRef<'_>, _event: EventKind) -> Result<(), String> {
        Ok(())
    }
    /// Pre-copy round (see [`crate::Subsystem::precopy`]); by default nothing is
    /// sent early and everything goes at the freeze.
    fn precopy(&mut self, _ctx: &mut ContextRef<'_>, _sink: &mut SinkRef<'_>, _round: u32) -> Result<Progress, String> {
        Ok(Progress::Done)
    }
    fn checkpoint(&mut self, ctx: &mut ContextRef<'_>, sink: &mut SinkRef<'_>)
        -> Result<Progress, String>;
    fn restart(&mut self, ctx: &mut ContextRef<'_>, source: &mut SourceRef<'_>)
        -> Result<Progress, String>;
    fn resume(&mut self, _ctx: &mut ContextRef<'_>) -> Result<(), String> {
        Ok(())
    }
    fn cleanup(&mut self, _ctx: &mut ContextRef<'_>, _ok: bool) {}
    fn fault(&mut self, _ctx: &mut ContextRef<'_>, _error: &PluginError) -> Recovery {
        Recovery::GiveUp
    }
    fn status(&self) -> Status {
        Status::default()
    }
    /// The plugin's own account of a fatal error; by default the error's message.
    fn dump(&self, error: &PluginError) -> String {
        error.message.to_string()
    }
}

/// A medium plugin, written in plain Rust.
pub trait MediumPlugin: Send + 'static {
    fn pushdata(&mut self, stream: u32, data: &[u8]) -> Result<(), String>;
    fn popdata(&mut self, stream: u32, buf: &mut [u8]) -> Result<usize, String>;
    fn command(&mut self, _cmd: &str) -> Result<String, String> {
        Err("unknown command".into())
    }
    fn flush(&mut self) -> Result<(), String>;
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// Runs `f`, turning an `Err` or a panic into a [`PluginError`] naming `plugin`.
pub fn guard<T>(plugin: &str, f: impl FnOnce() -> Result<T, String>) -> PResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(PluginError::new(plugin, e)),
        Err(p) => RResult::RErr(PluginError::new(plugin, format!("panicked: {}", panic_text(&*p)))),
    }
}

/// Runs an infallible `f`; a panic is reported on stderr and `fallback` answered.
fn guard_or<T>(plugin: &str, fallback: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(p) => {
            eprintln!("ferry: plugin {plugin} panicked: {}", panic_text(&*p));
            fallback
        }
    }
}

/// Wraps a plugin implementation with its name, for the ABI-stable traits.
pub struct Guarded<T> {
    pub name: &'static str,
    pub inner: T,
}

impl<T: SubsystemPlugin> Subsystem for Guarded<T> {
    fn info(&self) -> SubsystemInfo {
        guard_or(self.name, SubsystemInfo::default(), || self.inner.info())
    }
    fn setup(&mut self, ctx: &mut ContextRef<'_>, event: EventKind) -> PResult<()> {
        guard(self.name, || self.inner.setup(ctx, event))
    }
    fn precopy(&mut self, ctx: &mut ContextRef<'_>, sink: &mut SinkRef<'_>, round: u32) -> PResult<Progress> {
        guard(self.name, || self.inner.precopy(ctx, sink, round))
    }
    fn checkpoint(&mut self, ctx: &mut ContextRef<'_>, sink: &mut SinkRef<'_>) -> PResult<Progress> {
        guard(self.name, || self.inner.checkpoint(ctx, sink))
    }
    fn restart(&mut self, ctx: &mut ContextRef<'_>, source: &mut SourceRef<'_>) -> PResult<Progress> {
        guard(self.name, || self.inner.restart(ctx, source))
    }
    fn resume(&mut self, ctx: &mut ContextRef<'_>) -> PResult<()> {
        guard(self.name, || self.inner.resume(ctx))
    }
    fn cleanup(&mut self, ctx: &mut ContextRef<'_>, ok: bool) {
        guard_or(self.name, (), || self.inner.cleanup(ctx, ok))
    }
    fn fault(&mut self, ctx: &mut ContextRef<'_>, error: &PluginError) -> Recovery {
        guard_or(self.name, Recovery::GiveUp, || self.inner.fault(ctx, error))
    }
    fn status(&self) -> Status {
        guard_or(self.name, Status::default(), || self.inner.status())
    }
    fn dump(&self, error: &PluginError) -> RString {
        guard_or(self.name, error.message.to_string(), || self.inner.dump(error)).into()
    }
}

impl<T: MediumPlugin> Medium for Guarded<T> {
    fn pushdata(&mut self, stream: u32, data: RSlice<'_, u8>) -> PResult<()> {
        guard(self.name, || self.inner.pushdata(stream, data.as_slice()))
    }
    fn popdata(&mut self, stream: u32, mut buf: RSliceMut<'_, u8>) -> PResult<usize> {
        guard(self.name, || self.inner.popdata(stream, buf.as_mut_slice()))
    }
    fn command(&mut self, cmd: RStr<'_>) -> PResult<RString> {
        guard(self.name, || self.inner.command(cmd.as_str()).map(RString::from))
    }
    fn flush(&mut self) -> PResult<()> {
        guard(self.name, || self.inner.flush())
    }
}

/// The answer of a medium constructor for a subsystem plugin, and the reverse.
pub fn not_a_subsystem(name: &str) -> PResult<crate::SubsystemBox> {
    RResult::RErr(PluginError::new(name, "is a medium plugin, not a subsystem"))
}
pub fn not_a_medium(name: &str) -> PResult<crate::MediumBox> {
    RResult::RErr(PluginError::new(name, "is a subsystem plugin, not a medium"))
}

/// Exports a subsystem plugin: `export_subsystem!("memory", "Private memory", || Memory::new())`.
/// The version is the plugin crate's own.
#[macro_export]
macro_rules! export_subsystem {
    ($name:expr, $description:expr, $make:expr) => {
        $crate::__export_plugin!(
            $crate::PluginKind::Subsystem, $name, $description,
            {
                extern "C" fn new_subsystem() -> $crate::PResult<$crate::SubsystemBox> {
                    $crate::plugin::guard($name, || {
                        let inner = ($make)();
                        Ok($crate::Subsystem_TO::from_value(
                            $crate::plugin::Guarded { name: $name, inner },
                            $crate::abi_stable::sabi_trait::TD_Opaque,
                        ))
                    })
                }
                new_subsystem
            },
            {
                extern "C" fn open_medium(_: $crate::abi_stable::std_types::RStr<'_>)
                    -> $crate::PResult<$crate::MediumBox> {
                    $crate::plugin::not_a_medium($name)
                }
                open_medium
            }
        );
    };
}

/// Exports a medium plugin: `export_medium!("file", "Image directory", |params: &str| FileMedium::open(params))`,
/// where the closure answers `Result<impl MediumPlugin, String>`.
#[macro_export]
macro_rules! export_medium {
    ($name:expr, $description:expr, $open:expr) => {
        $crate::__export_plugin!(
            $crate::PluginKind::Medium, $name, $description,
            {
                extern "C" fn new_subsystem() -> $crate::PResult<$crate::SubsystemBox> {
                    $crate::plugin::not_a_subsystem($name)
                }
                new_subsystem
            },
            {
                extern "C" fn open_medium(params: $crate::abi_stable::std_types::RStr<'_>)
                    -> $crate::PResult<$crate::MediumBox> {
                    $crate::plugin::guard($name, || {
                        let inner = ($open)(params.as_str())?;
                        Ok($crate::Medium_TO::from_value(
                            $crate::plugin::Guarded { name: $name, inner },
                            $crate::abi_stable::sabi_trait::TD_Opaque,
                        ))
                    })
                }
                open_medium
            }
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __export_plugin {
    ($kind:expr, $name:expr, $description:expr, $new_subsystem:expr, $open_medium:expr) => {
        #[no_mangle]
        pub extern "C" fn ferry_plugin_abi_version() -> u32 {
            $crate::ABI_VERSION
        }

        #[$crate::abi_stable::export_root_module]
        pub fn ferry_plugin_root() -> $crate::PluginModRef {
            use $crate::abi_stable::prefix_type::PrefixTypeTrait;
            $crate::PluginMod {
                abi_version: $crate::ABI_VERSION,
                kind: $kind,
                name: $crate::abi_stable::std_types::RStr::from_str($name),
                version: $crate::abi_stable::std_types::RStr::from_str(env!("CARGO_PKG_VERSION")),
                description: $crate::abi_stable::std_types::RStr::from_str($description),
                new_subsystem: $new_subsystem,
                open_medium: $open_medium,
            }
            .leak_into_prefix()
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Subsystem_TO, SubsystemBox};
    use abi_stable::sabi_trait::TD_Opaque;

    struct Panicky;

    impl SubsystemPlugin for Panicky {
        fn info(&self) -> SubsystemInfo {
            panic!("info exploded")
        }
        fn checkpoint(&mut self, _: &mut ContextRef<'_>, _: &mut SinkRef<'_>) -> Result<Progress, String> {
            Ok(Progress::Done)
        }
        fn restart(&mut self, _: &mut ContextRef<'_>, _: &mut SourceRef<'_>) -> Result<Progress, String> {
            Ok(Progress::Done)
        }
        fn status(&self) -> Status {
            Status { entities_done: 1, ..Status::default() }
        }
        fn dump(&self, _: &PluginError) -> String {
            let v: Vec<u8> = Vec::new();
            format!("{}", v[3])
        }
    }

    #[test]
    fn a_panic_becomes_an_error_naming_the_plugin() {
        let r = guard::<()>("memory", || panic!("boom at 0x1000"));
        let e = r.into_result().unwrap_err();
        assert_eq!(e.plugin.as_str(), "memory");
        assert_eq!(e.message.as_str(), "panicked: boom at 0x1000");
        assert_eq!(e.to_string(), "plugin memory: panicked: boom at 0x1000");
        let r = guard::<u32>("files", || Err("fd 7: socket".into()));
        assert_eq!(r.into_result().unwrap_err().to_string(), "plugin files: fd 7: socket");
    }

    #[test]
    fn infallible_calls_survive_a_panic_through_the_abi_object() {
        let obj: SubsystemBox = Subsystem_TO::from_value(Guarded { name: "panicky", inner: Panicky }, TD_Opaque);
        assert_eq!(obj.info(), SubsystemInfo::default());
        assert_eq!(obj.status().entities_done, 1);
        let err = PluginError::new("panicky", "it broke");
        assert_eq!(obj.dump(&err).as_str(), "it broke");
    }
}
