//! Clocks: the node's own, and the fleet's timeline that windows are
//! aligned to.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A clock in milliseconds. A node reads its own (monotonic) clock to judge
/// idleness and to estimate the server's time; a fleet that aligns its
/// windows to a clock of its own (see [`Timeline::Shared`]) reads that one
/// for window boundaries.
pub trait FleetClock: Send + Sync + 'static {
    /// Now, in milliseconds since the clock's origin.
    fn now_ms(&self) -> u64;
}

impl std::fmt::Debug for dyn FleetClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FleetClock({} ms)", self.now_ms())
    }
}

/// The process's monotonic clock, in milliseconds since it was made.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    /// A clock starting at zero now.
    pub fn new() -> Self {
        MonotonicClock {
            origin: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl FleetClock for MonotonicClock {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// The wall clock: milliseconds since the Unix epoch (zero before it). For
/// [`Timeline::Shared`] on nodes whose clocks are kept in step (NTP).
#[derive(Debug, Clone, Copy, Default)]
pub struct WallClock;

impl FleetClock for WallClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A clock that moves only when told: for tests, shared by every node of a
/// test fleet.
#[derive(Debug, Clone, Default)]
pub struct FakeClock {
    now_ms: Arc<AtomicU64>,
}

impl FakeClock {
    /// A clock reading `start_ms`.
    pub fn new(start_ms: u64) -> Self {
        FakeClock {
            now_ms: Arc::new(AtomicU64::new(start_ms)),
        }
    }

    /// Moves the clock forward by `by` (saturating).
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        let _ = self
            .now_ms
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                Some(now.saturating_add(by))
            });
    }
}

impl FleetClock for FakeClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

/// The timeline the fleet's windows are aligned to: window `i` of length
/// `L` covers `[i × L, (i + 1) × L)` on it, the same for every node.
#[derive(Clone)]
pub enum Timeline {
    /// Redis's own clock (`TIME`, read inside every script): one clock for
    /// the whole fleet, whatever the nodes' clocks say. Nodes estimate it
    /// from their round trips to plan window ends; the server has the last
    /// word. The default.
    RedisTime,
    /// A clock the nodes share, passed to every script: [`WallClock`] on
    /// nodes kept in step by NTP, or a [`FakeClock`] in tests.
    Shared(Arc<dyn FleetClock>),
}

impl std::fmt::Debug for Timeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Timeline::RedisTime => f.write_str("RedisTime"),
            Timeline::Shared(_) => f.write_str("Shared(..)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fake_clock_moves_only_when_told_and_never_wraps() {
        let clock = FakeClock::new(5);
        let shared = clock.clone();
        assert_eq!(shared.now_ms(), 5);
        clock.advance(Duration::from_millis(1_500));
        assert_eq!(shared.now_ms(), 1_505);
        clock.advance(Duration::MAX);
        assert_eq!(shared.now_ms(), u64::MAX);
    }

    #[test]
    fn the_real_clocks_move_forward() {
        let mono = MonotonicClock::new();
        let (a, b) = (mono.now_ms(), mono.now_ms());
        assert!(b >= a);
        // After 2001-09-09 (10^12 ms): the wall clock is in ms, not s.
        assert!(WallClock.now_ms() > 1_000_000_000_000);
    }
}
