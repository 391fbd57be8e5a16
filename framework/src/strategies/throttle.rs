//! Auto-converge for pre-copy: a process that dirties memory faster than the link
//! sends it is given less CPU, a step at a time, until its dirty set shrinks. The
//! process is moved into a cgroup of ferry's with a CPU quota — v2 `cpu.max` where the
//! v2 hierarchy has the cpu controller, else the v1 cpu controller's
//! `cpu.cfs_quota_us` — and back home, unthrottled, when the event ends.

use std::path::PathBuf;

use crate::{
    kernel::freezer::{cgroup_of, write, FreezeError, Placement},
    kernel::mounts::mounts,
};

const PERIOD_US: u64 = 100_000;

/// The CPU share of each step, in percent: roughly halved every time, down to 1%.
pub fn share_of_step(step: u32) -> u64 {
    const SHARES: [u64; 6] = [50, 25, 10, 5, 2, 1];
    SHARES[(step.max(1) as usize - 1).min(SHARES.len() - 1)]
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Flavor {
    V2,
    V1,
}

/// A process under a CPU quota of ferry's.
pub struct Throttle {
    place: Placement,
    flavor: Flavor,
    steps: u32,
}

/// Where a quota can be set: the v2 root when it has the cpu controller, else the v1
/// cpu hierarchy.
fn hierarchy() -> Result<(Flavor, PathBuf), String> {
    let all = mounts()?;
    if let Some(v2) = all.iter().find(|m| m.fstype == "cgroup2") {
        let controllers = std::fs::read_to_string(v2.point.join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "cpu") {
            // Children get the controller only where the root hands it down.
            let _ = std::fs::write(v2.point.join("cgroup.subtree_control"), "+cpu");
            return Ok((Flavor::V2, v2.point.clone()));
        }
    }
    all.iter()
        .find(|m| m.fstype == "cgroup" && m.super_opts.split(',').any(|o| o == "cpu"))
        .map(|m| (Flavor::V1, m.point.clone()))
        .ok_or_else(|| "no cgroup cpu controller (v2 cpu.max or v1 cpu) on this machine".into())
}

impl Throttle {
    /// Moves `pid` into a cgroup of ferry's, not yet limited.
    pub fn new(pid: i32) -> Result<Throttle, String> {
        let (flavor, root) = hierarchy()?;
        let rel = cgroup_of(pid, if flavor == Flavor::V1 { Some("cpu") } else { None }).map_err(|e| e.to_string())?;
        let place = Placement::enter(pid, &root, &rel, "throttle-").map_err(|e| e.to_string())?;
        Ok(Throttle { place, flavor, steps: 0 })
    }

    /// One step tighter; answers the CPU share now allowed, in percent.
    pub fn step(&mut self) -> Result<u64, String> {
        self.steps += 1;
        let share = share_of_step(self.steps);
        let quota = PERIOD_US * share / 100;
        let set = match self.flavor {
            Flavor::V2 => write(&self.place.ours.join("cpu.max"), &format!("{quota} {PERIOD_US}")),
            Flavor::V1 => write(&self.place.ours.join("cpu.cfs_period_us"), &PERIOD_US.to_string())
                .and_then(|_| write(&self.place.ours.join("cpu.cfs_quota_us"), &quota.to_string())),
        };
        set.map_err(|e: FreezeError| e.to_string())?;
        Ok(share)
    }

    /// Lets the process have all the CPU again (before the freeze: every injected call
    /// would otherwise wait for the quota to come round).
    pub fn lift(&mut self) -> Result<(), String> {
        let set = match self.flavor {
            Flavor::V2 => write(&self.place.ours.join("cpu.max"), &format!("max {PERIOD_US}")),
            Flavor::V1 => write(&self.place.ours.join("cpu.cfs_quota_us"), "-1"),
        };
        set.map_err(|e| e.to_string())
    }

    pub fn steps(&self) -> u32 {
        self.steps
    }

    /// Takes the process home from another thread (the watchdog's last resort).
    pub fn rescue(&self) -> impl FnOnce() + Send + 'static {
        self.place.rescue()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_step_about_halves_the_share_down_to_one_percent() {
        let shares: Vec<u64> = (1..=8).map(share_of_step).collect();
        assert_eq!(shares, [50, 25, 10, 5, 2, 1, 1, 1]);
    }
}
