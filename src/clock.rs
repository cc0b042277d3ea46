//! The managers' view of time: one monotonic reading per operation.

use crate::persist::Moment;
use crate::rules::Now;
use crate::sync::{ClockSource, Stopwatch};

/// A monotonic clock whose zero is the moment the manager was created.
pub(crate) struct Clock {
    stopwatch: Stopwatch,
}

/// How often quanta's upkeep thread refreshes the default clock's time.
#[cfg(not(agent_budget_loom))]
pub(crate) const DEFAULT_UPKEEP: std::time::Duration = std::time::Duration::from_millis(1);

impl Clock {
    /// The clock `new()` managers read: quanta's recent time, refreshed
    /// every [`DEFAULT_UPKEEP`] (one atomic load per operation instead of a
    /// TSC read and its scaling), or the precise clock if the upkeep thread
    /// cannot be started.
    pub(crate) fn default_coarse() -> Self {
        #[cfg(not(agent_budget_loom))]
        if let Ok(clock) = Self::coarse(crate::sync::default_clock(), DEFAULT_UPKEEP) {
            return clock;
        }
        Self::new(crate::sync::default_clock())
    }

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
    #[inline]
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
