//! Time on a manager's own timeline, in whole milliseconds.

/// Nanoseconds in a tick.
const NANOS_PER_TICK: u64 = 1_000_000;

/// A point on the manager's timeline, in whole milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Tick(pub(crate) u64);

impl Tick {
    /// The tick at which the manager was created: 2^39 ms, about 17.4
    /// years, so restored windows up to that old keep their exact start.
    pub(crate) const ORIGIN: Tick = Tick(1 << 39);
    /// The last tick time can reach: about 540 years after
    /// [`Tick::ORIGIN`]. Later times are clamped here. (The one mark above
    /// it is kept for a removed agent's state.)
    pub(crate) const MAX: Tick = Tick((1 << super::MARK_BITS) - 2);

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    ///
    /// Saturation is what makes a clock that reads slightly backwards
    /// harmless: a window that seems to start in the future has simply
    /// not elapsed at all.
    pub(crate) fn millis_since(self, earlier: Tick) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// `millis` later, clamped to [`Tick::MAX`].
    pub(crate) fn plus(self, millis: u64) -> Tick {
        Tick(self.0.saturating_add(millis).min(Tick::MAX.0))
    }
}

/// One reading of the clock, in nanoseconds since the manager's creation,
/// and where that creation sits in UTC (for calendar windows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Now {
    nanos: u64,
    /// `nanos` in whole ticks, rounded down: divided once, when the clock
    /// is read, where an operation's rules ask for it several times
    /// (expiry, the time left, a 64-bit word's start read back against
    /// it).
    tick: Tick,
    /// Unix time, in milliseconds, of the manager's creation
    /// ([`Tick::ORIGIN`]).
    utc_origin_ms: i64,
}

impl Now {
    /// A reading on a timeline created at the Unix epoch.
    #[cfg(test)]
    pub(crate) fn from_nanos(nanos: u64) -> Self {
        Self::on_utc(nanos, 0)
    }

    /// A reading on a timeline created at Unix time `utc_origin_ms`.
    pub(crate) fn on_utc(nanos: u64, utc_origin_ms: i64) -> Self {
        Now {
            nanos,
            tick: Tick::ORIGIN.plus(nanos / NANOS_PER_TICK),
            utc_origin_ms,
        }
    }

    /// Unix time, in milliseconds, of [`Tick::ORIGIN`] on this timeline.
    pub(crate) fn unix_millis_at_origin(self) -> i64 {
        self.utc_origin_ms
    }

    /// The current tick, rounded down: used to judge expiry and refill, so
    /// neither ever comes early.
    #[inline]
    pub(crate) fn tick(self) -> Tick {
        self.tick
    }

    /// The tick a window (or a bucket's refill) started now begins at,
    /// rounded up.
    pub(crate) fn start_tick(self) -> Tick {
        Tick::ORIGIN.plus(self.nanos.div_ceil(NANOS_PER_TICK))
    }
}
