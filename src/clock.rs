//! The managers' view of time: one monotonic reading per operation.

use crate::persist::Moment;
use crate::rules::Now;
use crate::sync::{ClockSource, Stopwatch};

/// A monotonic clock whose zero is the moment the manager was created,
/// and where that zero sits in UTC.
pub(crate) struct Clock {
    stopwatch: Stopwatch,
    /// Unix time, in milliseconds, of the clock's zero: the wall clock read
    /// at creation, or the instant a test gave.
    utc_origin_ms: i64,
    /// Whether the origin was given: then wall time (for persistence) is
    /// read from it too, so that a mock clock moves both.
    given: bool,
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
        Self::on_wall(Stopwatch::start(source))
    }

    /// A clock started now whose zero is the instant `utc_origin`: calendar
    /// windows and persisted wall times follow it and the clock alone.
    pub(crate) fn at(source: ClockSource, utc_origin: chrono::DateTime<chrono::Utc>) -> Self {
        Clock {
            stopwatch: Stopwatch::start(source),
            utc_origin_ms: utc_origin.timestamp_millis(),
            given: true,
        }
    }

    /// `stopwatch`, its zero mapped to the wall clock read now.
    fn on_wall(stopwatch: Stopwatch) -> Self {
        let elapsed_ms = (stopwatch.nanos() / 1_000_000) as i64;
        Clock {
            stopwatch,
            utc_origin_ms: chrono::Utc::now().timestamp_millis() - elapsed_ms,
            given: false,
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
        Ok(Self::on_wall(Stopwatch::start_recent(source, interval)?))
    }

    /// The one clock read of an operation.
    #[inline]
    pub(crate) fn now(&self) -> Now {
        Now::on_utc(self.stopwatch.nanos(), self.utc_origin_ms)
    }

    /// Now on both the monotonic and the wall clock, for persistence.
    pub(crate) fn moment(&self) -> Moment {
        let now = self.now();
        let wall = if self.given {
            let ms = self
                .utc_origin_ms
                .saturating_add(now.tick().millis_since(crate::rules::Tick::ORIGIN) as i64);
            chrono::DateTime::from_timestamp_millis(ms).unwrap_or(chrono::DateTime::UNIX_EPOCH)
        } else {
            chrono::Utc::now()
        };
        Moment { now, wall }
    }
}
