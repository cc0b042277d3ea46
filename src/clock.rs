//! The managers' view of time: one monotonic reading per operation.

use crate::persist::Moment;
use crate::rules::Now;
use crate::sync::{ClockSource, Stopwatch};

/// A monotonic clock whose zero is the moment the manager was created.
pub(crate) struct Clock {
    stopwatch: Stopwatch,
}

impl Clock {
    pub(crate) fn new(source: ClockSource) -> Self {
        Clock {
            stopwatch: Stopwatch::start(source),
        }
    }

    /// A clock that reads quanta's recent time, kept current every
    /// `interval` by quanta's upkeep thread: see
    /// [`BudgetManager::with_coarse_clock`](crate::BudgetManager::with_coarse_clock).
    #[cfg(not(agent_budget_loom))]
    pub(crate) fn coarse(
        source: ClockSource,
        interval: std::time::Duration,
    ) -> std::io::Result<Self> {
        Ok(Clock {
            stopwatch: Stopwatch::start_recent(source, interval)?,
        })
    }

    /// The one clock read of an operation.
    pub(crate) fn now(&self) -> Now {
        Now::from_nanos(self.stopwatch.nanos())
    }

    /// Now on both the monotonic and the wall clock, for persistence.
    pub(crate) fn moment(&self) -> Moment {
        Moment {
            now: self.now(),
            wall: chrono::Utc::now(),
        }
    }
}
