//! The migration algorithms (docs/ARCHITECTURE.md, "Strategies"), each behind [`Algorithm`]: what
//! runs while the process still runs on the source, and what is left for after it
//! resumes on the destination. The coordinator (`commands::migrate`) asks the
//! algorithm and drives the mechanisms it names:
//!
//! - [`rounds`]: pre-copy rounds of dirty pages while the process runs, with
//!   [`throttle`] to slow a process that outruns them;
//! - [`pager`]: post-copy, the destination's userfaultfd pager and the source's
//!   answers to it.
//!
//! A new algorithm that combines these is one new file here and one name in
//! `config::Strategy`; a new mechanism is a module beside `rounds` and `pager`.

pub mod hybrid;
pub mod pager;
pub mod post_copy;
pub mod pre_copy;
pub mod rounds;
pub mod stop_copy;
pub mod throttle;

use crate::config::Strategy;

/// A migration algorithm, as the coordinator sees it. Stop-copy is the default of
/// every method: freeze, send everything, resume on the destination.
pub trait Algorithm {
    /// Pre-copy rounds to run while the process runs, tuned thus; `None`: the freeze
    /// comes first.
    fn live_rounds(&self) -> Option<rounds::Tuning> {
        None
    }

    /// Whether the private anonymous memory is left out of the freeze and follows
    /// after the resume, on demand ([`pager`]).
    fn lazy(&self) -> bool {
        false
    }

    /// Kernel features the destination needs beyond what every migration needs.
    fn features(&self) -> &'static [&'static str] {
        if self.lazy() {
            &["userfaultfd"]
        } else {
            &[]
        }
    }
}

/// What a request may tune of the algorithms.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub pre_copy: rounds::Tuning,
    /// Hybrid: pre-copy rounds before the post-copy.
    pub hybrid_rounds: u32,
}

/// The algorithm named `strategy`.
pub fn algorithm(strategy: Strategy, tuning: &Tuning) -> Box<dyn Algorithm> {
    match strategy {
        Strategy::StopCopy => Box::new(stop_copy::StopCopy),
        Strategy::PreCopy => Box::new(pre_copy::PreCopy(tuning.pre_copy)),
        Strategy::PostCopy => Box::new(post_copy::PostCopy),
        Strategy::Hybrid => Box::new(hybrid::Hybrid { tracking: tuning.pre_copy.tracking, rounds: tuning.hybrid_rounds }),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::DirtyTracking;

    fn tuning() -> Tuning {
        Tuning {
            pre_copy: rounds::Tuning { budget: Duration::from_millis(300), max_rounds: 30, throttle: true, tracking: DirtyTracking::PageHash },
            hybrid_rounds: 2,
        }
    }

    #[test]
    fn each_strategy_names_its_mechanisms() {
        let t = tuning();
        let got = |s| {
            let a = algorithm(s, &t);
            (a.live_rounds().map(|r| (r.max_rounds, r.throttle, r.budget)), a.lazy(), a.features())
        };
        assert_eq!(got(Strategy::StopCopy), (None, false, &[][..]));
        assert_eq!(got(Strategy::PreCopy), (Some((30, true, Duration::from_millis(300))), false, &[][..]));
        assert_eq!(got(Strategy::PostCopy), (None, true, &["userfaultfd"][..]));
        // Hybrid: its own number of rounds, no budget to wait for, no throttle.
        assert_eq!(got(Strategy::Hybrid), (Some((2, false, Duration::ZERO)), true, &["userfaultfd"][..]));
        let hybrid = algorithm(Strategy::Hybrid, &t).live_rounds().unwrap();
        assert_eq!(hybrid.tracking, DirtyTracking::PageHash);
    }
}
