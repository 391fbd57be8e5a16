//! Pre-copy: memory goes while the process runs, then rounds of the pages written
//! meanwhile until what is left fits the downtime budget (or the rounds stop
//! shrinking it); the freeze sends only the last dirty pages.

use super::{rounds, Algorithm};

pub struct PreCopy(pub rounds::Tuning);

impl Algorithm for PreCopy {
    fn live_rounds(&self) -> Option<rounds::Tuning> {
        Some(self.0)
    }
}
