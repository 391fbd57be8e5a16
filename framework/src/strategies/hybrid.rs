//! Hybrid: a fixed number of pre-copy rounds (no budget, no throttle), then
//! post-copy for what was written since: the freeze is post-copy's, and fewer pages
//! are left to fault in after it.

use std::time::Duration;

use super::{rounds, Algorithm};
use crate::config::DirtyTracking;

pub struct Hybrid {
    pub tracking: DirtyTracking,
    pub rounds: u32,
}

impl Algorithm for Hybrid {
    fn live_rounds(&self) -> Option<rounds::Tuning> {
        Some(rounds::Tuning { budget: Duration::ZERO, max_rounds: self.rounds, throttle: false, tracking: self.tracking })
    }

    fn lazy(&self) -> bool {
        true
    }
}
