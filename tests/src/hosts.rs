//! Two hosts on one machine: network namespaces joined by a veth pair, at 10.231.0.1
//! (`a`) and 10.231.0.2 (`b`), removed on drop. Each pair has names of its own (the
//! test process's pid and a counter), so tests of one binary may run side by side.

use std::{
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

/// The address of host `a`, and of host `b`.
pub const A: &str = "10.231.0.1";
pub const B: &str = "10.231.0.2";

pub struct Hosts {
    pub a: String,
    pub b: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Hosts {
    /// The pair, or None when iproute2 could not make it (whatever it made is removed).
    pub fn new() -> Option<Hosts> {
        let id = format!("{}{}", std::process::id() % 10000, NEXT.fetch_add(1, Ordering::Relaxed));
        let h = Hosts { a: format!("ferry-a-{id}"), b: format!("ferry-b-{id}") };
        let ip = |args: &[&str]| Command::new("ip").args(args).status().map(|s| s.success()).unwrap_or(false);
        let (va, vb) = (format!("fva{id}"), format!("fvb{id}"));
        let (a_net, b_net) = (format!("{A}/24"), format!("{B}/24"));
        let ok = ip(&["netns", "add", &h.a])
            && ip(&["netns", "add", &h.b])
            && ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])
            && ip(&["link", "set", &va, "netns", &h.a])
            && ip(&["link", "set", &vb, "netns", &h.b])
            && ip(&["-n", &h.a, "addr", "add", &a_net, "dev", &va])
            && ip(&["-n", &h.b, "addr", "add", &b_net, "dev", &vb])
            && ip(&["-n", &h.a, "link", "set", &va, "up"])
            && ip(&["-n", &h.b, "link", "set", &vb, "up"])
            && ip(&["-n", &h.a, "link", "set", "lo", "up"])
            && ip(&["-n", &h.b, "link", "set", "lo", "up"]);
        if !ok {
            // A veth left in the root namespace goes with its own delete.
            let _ = Command::new("ip").args(["link", "delete", &va]).status();
        }
        ok.then_some(h)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}
