//! The pure decision logic of one agent's fixed window: state in, state out.
//!
//! Nothing here touches an atomic, a lock or a clock. Both managers (the
//! lock-free [`crate::BudgetManager`] and the locked
//! [`crate::LockedBudgetManager`]) read the time once, load a [`Window`]
//! from their storage, ask this module what the next [`Window`] is, and
//! store it back (with one compare-and-swap, or under a write lock). Keeping
//! the decisions here means they are written once, tested exhaustively
//! without threads, and shared by every storage that comes later.
//!
//! # Time
//!
//! Time is a [`Tick`]: whole milliseconds on the manager's own monotonic
//! timeline, which starts at [`Tick::ORIGIN`] when the manager is created.
//! The origin sits [`Tick::ORIGIN`] milliseconds (about 17 years) above zero
//! so that a window restored from a file, which began before the manager
//! existed, still has a representable start.
//!
//! A window is never allowed to end early, whatever the rounding: a new
//! window starts at the *next* millisecond boundary ([`Now::start_tick`],
//! rounded up) while expiry is judged on the *previous* one
//! ([`Now::tick`], rounded down). A window therefore lasts at least its
//! nominal length on the underlying clock, and at most one millisecond more.

use crate::types::BudgetLimit;

/// Bits of the packed word that hold tokens used in the window.
pub(crate) const TOKEN_BITS: u32 = 52;
/// Bits of the packed word that hold calls used in the window.
pub(crate) const CALL_BITS: u32 = 32;
/// Bits of the packed word that hold the window's start tick.
pub(crate) const START_BITS: u32 = 44;

/// The largest token count a window can hold: about 4.5 × 10^15.
///
/// Token budgets above it are enforced as if they were this value.
pub const MAX_TOKENS: u64 = (1 << TOKEN_BITS) - 1;
/// The largest call count a window can hold: 2^32 − 1, about 4.3 × 10^9.
///
/// Call budgets above it are enforced as if they were this value.
pub const MAX_CALLS: u64 = (1 << CALL_BITS) - 1;

const NANOS_PER_TICK: u64 = 1_000_000;
const TICKS_PER_SEC: u64 = 1_000;

// The promised exact ranges, checked when the crate compiles: the fields fill
// the word, count 10^12 tokens and 10^9 calls, hold ten years of window below
// the origin (for restored windows) and five centuries of uptime above it.
const _: () = assert!(TOKEN_BITS + CALL_BITS + START_BITS == 128);
const _: () = assert!(MAX_TOKENS >= 1_000_000_000_000);
const _: () = assert!(MAX_CALLS >= 1_000_000_000);
const _: () = assert!(Tick::ORIGIN.0 > 10 * 366 * 86_400 * TICKS_PER_SEC);
const _: () = assert!(Tick::MAX.0 - Tick::ORIGIN.0 > 500 * 365 * 86_400 * TICKS_PER_SEC);

/// A point on the manager's timeline, in whole milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Tick(pub(crate) u64);

impl Tick {
    /// The tick at which the manager was created: 2^39 ms, about 17.4
    /// years, so restored windows up to that old keep their exact start.
    pub(crate) const ORIGIN: Tick = Tick(1 << 39);
    /// The last tick the packed word can hold: about 540 years after
    /// [`Tick::ORIGIN`]. Later times are clamped here.
    pub(crate) const MAX: Tick = Tick((1 << START_BITS) - 1);

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    ///
    /// Saturation is what makes a clock that reads slightly backwards
    /// harmless: a window that seems to start in the future has simply
    /// not elapsed at all.
    pub(crate) fn millis_since(self, earlier: Tick) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// One reading of the clock, in nanoseconds since the manager's creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Now {
    nanos: u64,
}

impl Now {
    pub(crate) fn from_nanos(nanos: u64) -> Self {
        Now { nanos }
    }

    /// The current tick, rounded down: used to judge expiry.
    pub(crate) fn tick(self) -> Tick {
        Tick((Tick::ORIGIN.0 + self.nanos / NANOS_PER_TICK).min(Tick::MAX.0))
    }

    /// The tick a window started now begins at, rounded up.
    pub(crate) fn start_tick(self) -> Tick {
        Tick((Tick::ORIGIN.0 + self.nanos.div_ceil(NANOS_PER_TICK)).min(Tick::MAX.0))
    }
}

/// The limits of one agent, clamped to what a window can count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Tokens admitted per window, at most [`MAX_TOKENS`].
    pub(crate) tokens: u64,
    /// Calls admitted per window, at most [`MAX_CALLS`].
    pub(crate) calls: u64,
    /// Window length in ticks, from one to [`Policy::MAX_WINDOW`].
    pub(crate) window: u64,
}

impl Policy {
    /// The longest window: 2^44 − 1 ms, about 557 years, as long as the
    /// whole timeline, so a window this long outlasts any process. Longer
    /// windows are this long, and a policy fits in 128 bits like the usage.
    pub(crate) const MAX_WINDOW: u64 = (1 << START_BITS) - 1;

    pub(crate) fn from_limit(limit: &BudgetLimit) -> Self {
        Policy {
            tokens: limit.token_budget.min(MAX_TOKENS),
            calls: limit.calls_budget.min(MAX_CALLS),
            // A zero-second window is the shortest one we can name: a
            // millisecond. (The seed reset usage before every operation;
            // here operations within one millisecond share the budget.)
            window: limit
                .window_secs
                .saturating_mul(TICKS_PER_SEC)
                .clamp(1, Self::MAX_WINDOW),
        }
    }
}

/// Which resource a request ran out of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Resource {
    Tokens,
    Calls,
}

/// Why a request was refused, with what the caller needs to report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shortfall {
    pub(crate) resource: Resource,
    /// How much of `resource` was asked for.
    pub(crate) requested: u64,
    /// How much of `resource` was left in the window.
    pub(crate) remaining: u64,
    /// How much of `resource` was used in the window.
    pub(crate) used: u64,
    /// The policy's limit for `resource`.
    pub(crate) limit: u64,
    /// Milliseconds until the window ends; `None` if the request is larger
    /// than the limit itself and so can never be admitted.
    pub(crate) retry_after_ms: Option<u64>,
}

/// The usage of one agent in its current fixed window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) tokens: u64,
    pub(crate) calls: u64,
    pub(crate) start: Tick,
}

/// What a settle or cancel did, before it is reported to the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refund {
    /// The reservation's window was still current; this is the new state.
    Applied(Window),
    /// The reservation's window has ended; nothing may change.
    WindowEnded,
}

impl Window {
    /// An empty window starting at `start`.
    pub(crate) fn fresh(start: Tick) -> Self {
        Window {
            tokens: 0,
            calls: 0,
            start,
        }
    }

    /// Whether this window has run its full length at `now`.
    pub(crate) fn is_expired(&self, policy: &Policy, now: Now) -> bool {
        now.tick().millis_since(self.start) >= policy.window
    }

    /// Milliseconds left in this window at `now` (zero once expired).
    pub(crate) fn millis_left(&self, policy: &Policy, now: Now) -> u64 {
        policy
            .window
            .saturating_sub(now.tick().millis_since(self.start))
    }

    /// The window as an operation at `now` sees it: itself, or a fresh one
    /// if it has expired. Reads call this without storing the result;
    /// writes store it, which is how "the next operation that observes the
    /// expiry starts a new window at that instant" comes about.
    pub(crate) fn current(self, policy: &Policy, now: Now) -> Self {
        if self.is_expired(policy, now) {
            Window::fresh(self.next_start(now))
        } else {
            self
        }
    }

    /// A manual reset: a fresh window from `now`.
    pub(crate) fn reset(self, now: Now) -> Self {
        Window::fresh(self.next_start(now))
    }

    /// The start of the window that follows this one.
    ///
    /// Starts strictly increase, so a start tick names one window of one
    /// agent for good, and a reservation can tell whether its window is
    /// still the current one. Only [`Window::reset`] called twice within a
    /// millisecond needs the `+ 1`: an expiry comes at least one tick after
    /// the start, since every window lasts at least one tick, so the clock
    /// alone moves the start forward and it never creeps ahead of the clock.
    fn next_start(self, now: Now) -> Tick {
        let after_this = Tick((self.start.0 + 1).min(Tick::MAX.0));
        now.start_tick().max(after_this)
    }

    /// Tokens and calls left under `policy`.
    pub(crate) fn remaining(&self, policy: &Policy) -> (u64, u64) {
        (
            policy.tokens.saturating_sub(self.tokens),
            policy.calls.saturating_sub(self.calls),
        )
    }

    /// Admits `tokens` and `calls` together, or neither.
    ///
    /// Returns the window to store and the verdict. The window to store is
    /// the [`current`](Self::current) one even on a refusal, so a refused
    /// operation that observes an expiry still starts the new window.
    /// A refusal names the resource that fell short: tokens before calls,
    /// except that a resource the request can never fit (more than its
    /// limit) is named first, so `retry_after` is `None` whenever waiting
    /// cannot help. Zero of a resource always fits, even when that
    /// resource is exhausted (the seed's `reserve(0)` succeeds).
    pub(crate) fn admit(
        self,
        policy: &Policy,
        now: Now,
        tokens: u64,
        calls: u64,
    ) -> (Window, Result<(), Shortfall>) {
        let window = self.current(policy, now);
        let (tokens_left, calls_left) = window.remaining(policy);
        let shortfall = |resource, requested, remaining, used, limit| Shortfall {
            resource,
            requested,
            remaining,
            used,
            limit,
            retry_after_ms: (requested <= limit).then(|| window.millis_left(policy, now)),
        };
        let calls_never_fit = calls > policy.calls;
        if tokens > tokens_left && (tokens > policy.tokens || !calls_never_fit) {
            let s = shortfall(
                Resource::Tokens,
                tokens,
                tokens_left,
                window.tokens,
                policy.tokens,
            );
            return (window, Err(s));
        }
        if calls > calls_left {
            let s = shortfall(
                Resource::Calls,
                calls,
                calls_left,
                window.calls,
                policy.calls,
            );
            return (window, Err(s));
        }
        // Both sums are at most the policy's limits, which are clamped to
        // the field widths, so neither can overflow nor leave its field.
        let next = Window {
            tokens: window.tokens + tokens,
            calls: window.calls + calls,
            start: window.start,
        };
        (next, Ok(()))
    }

    /// The seed's `release`: gives tokens back to the current window,
    /// never below zero. (Any caller may call it with any amount; new code
    /// settles a [`crate::Reservation`] instead.)
    pub(crate) fn release(self, policy: &Policy, now: Now, tokens: u64) -> Window {
        let window = self.current(policy, now);
        Window {
            tokens: window.tokens.saturating_sub(tokens),
            ..window
        }
    }

    /// Books the difference between what a reservation took in the window
    /// starting at `taken_in` and what it really used.
    ///
    /// `used_tokens` and `used_calls` above the reservation are charged even
    /// past the limit (they were really spent), saturating at the field
    /// width; below it, the difference is refunded, never below zero. If
    /// the window the reservation was taken in is no longer current, or has
    /// expired without anyone noticing yet, nothing changes.
    pub(crate) fn settle(
        self,
        policy: &Policy,
        now: Now,
        taken_in: Tick,
        reserved: (u64, u64),
        used: (u64, u64),
    ) -> Refund {
        if self.start != taken_in || self.is_expired(policy, now) {
            return Refund::WindowEnded;
        }
        let rebook = |current: u64, reserved: u64, used: u64, max: u64| {
            if used >= reserved {
                current.saturating_add(used - reserved).min(max)
            } else {
                current.saturating_sub(reserved - used)
            }
        };
        Refund::Applied(Window {
            tokens: rebook(self.tokens, reserved.0, used.0, MAX_TOKENS),
            calls: rebook(self.calls, reserved.1, used.1, MAX_CALLS),
            start: self.start,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;

    fn policy(tokens: u64, calls: u64, window_secs: u64) -> Policy {
        Policy::from_limit(&BudgetLimit {
            agent_id: uuid::Uuid::nil(),
            token_budget: tokens,
            calls_budget: calls,
            window_secs,
        })
    }

    fn at(nanos: u64) -> Now {
        Now::from_nanos(nanos)
    }

    impl Window {
        fn try_admit(
            self,
            p: &Policy,
            now: Now,
            tokens: u64,
            calls: u64,
        ) -> Result<Window, Shortfall> {
            let (next, verdict) = self.admit(p, now, tokens, calls);
            verdict.map(|()| next)
        }
    }

    #[test]
    fn a_refusal_that_observes_expiry_still_starts_the_new_window() {
        let p = policy(10, 1, 1);
        let w = Window::fresh(at(0).start_tick());
        let (next, verdict) = w.admit(&p, at(3 * SEC), 11, 0);
        assert!(verdict.is_err());
        assert_eq!(next, Window::fresh(at(3 * SEC).start_tick()));
        // Not expired: a refusal leaves the window exactly as it was.
        let (same, verdict) = next.admit(&p, at(3 * SEC), 0, 2);
        assert!(verdict.is_err());
        assert_eq!(same, next);
    }

    #[test]
    fn rounding_never_ends_a_window_early() {
        let p = policy(10, 10, 1);
        // Started half a millisecond after the origin: rounds up to tick 1.
        let w = Window::fresh(at(SEC / 2_000).start_tick());
        assert_eq!(w.start, Tick(Tick::ORIGIN.0 + 1));
        assert!(!w.is_expired(&p, at(SEC / 2_000 + SEC - 1)));
        assert!(!w.is_expired(&p, at(SEC + SEC / 2_000)));
        assert!(w.is_expired(&p, at(SEC + SEC / 1_000)));
    }

    #[test]
    fn a_window_started_on_a_tick_lasts_exactly_its_length() {
        let p = policy(10, 10, 60);
        let w = Window::fresh(at(0).start_tick());
        assert!(!w.is_expired(&p, at(60 * SEC - 1)));
        assert!(w.is_expired(&p, at(60 * SEC)));
        assert_eq!(w.millis_left(&p, at(0)), 60_000);
        assert_eq!(w.millis_left(&p, at(59 * SEC + 1)), 1_000);
    }

    #[test]
    fn a_clock_read_before_the_window_start_is_not_expiry() {
        let p = policy(10, 10, 1);
        let w = Window::fresh(at(5 * SEC).start_tick());
        // Another core read a slightly earlier time.
        let earlier = at(5 * SEC - 3_000);
        assert!(!w.is_expired(&p, earlier));
        assert_eq!(w.current(&p, earlier), w);
        assert_eq!(w.millis_left(&p, earlier), 1_000);
    }

    #[test]
    fn a_zero_second_window_lasts_one_millisecond_and_does_not_creep() {
        let p = policy(10, 10, 0);
        let mut w = Window::fresh(at(0).start_tick());
        w = w.try_admit(&p, at(0), 10, 1).unwrap();
        assert!(w.try_admit(&p, at(SEC / 2_000), 1, 0).is_err());
        for step in 1..=100 {
            w = w.try_admit(&p, at(step * SEC / 1_000), 10, 1).unwrap();
            assert_eq!(w.start, Tick(Tick::ORIGIN.0 + step));
        }
    }

    #[test]
    fn resets_within_a_millisecond_still_name_distinct_windows() {
        let w = Window::fresh(at(0).start_tick());
        let a = w.reset(at(10));
        let b = a.reset(at(20));
        assert!(w.start < a.start && a.start < b.start);
    }

    #[test]
    fn admit_is_all_or_nothing_and_names_what_can_never_fit_first() {
        let p = policy(100, 2, 60);
        let w = Window::fresh(at(0).start_tick());
        let w = w.try_admit(&p, at(0), 60, 1).unwrap();
        let err = w.try_admit(&p, at(0), 50, 2).unwrap_err();
        assert_eq!(err.resource, Resource::Tokens);
        assert_eq!((err.requested, err.remaining), (50, 40));
        // Short of tokens for now, but more calls than the limit: the calls
        // are named, since no wait can help.
        let err = w.try_admit(&p, at(0), 50, 5).unwrap_err();
        assert_eq!((err.resource, err.retry_after_ms), (Resource::Calls, None));
        let err = w.try_admit(&p, at(0), 40, 2).unwrap_err();
        assert_eq!(err.resource, Resource::Calls);
        assert_eq!((err.requested, err.remaining, err.used), (2, 1, 1));
        let w = w.try_admit(&p, at(0), 40, 1).unwrap();
        assert_eq!((w.tokens, w.calls), (100, 2));
        // Zero of an exhausted resource still fits.
        assert_eq!(w.try_admit(&p, at(0), 0, 0), Ok(w));
    }

    #[test]
    fn retry_after_is_the_rest_of_the_window_or_none_if_it_never_fits() {
        let p = policy(100, 2, 60);
        let w = Window::fresh(at(0).start_tick())
            .try_admit(&p, at(0), 100, 0)
            .unwrap();
        let err = w.try_admit(&p, at(15 * SEC), 1, 0).unwrap_err();
        assert_eq!(err.retry_after_ms, Some(45_000));
        let err = w.try_admit(&p, at(15 * SEC), 101, 0).unwrap_err();
        assert_eq!(err.retry_after_ms, None);
        let err = w.try_admit(&p, at(15 * SEC), 0, 3).unwrap_err();
        assert_eq!(err.retry_after_ms, None);
    }

    #[test]
    fn budgets_beyond_the_fields_are_clamped_not_wrapped() {
        let p = policy(u64::MAX, u64::MAX, u64::MAX);
        assert_eq!(
            (p.tokens, p.calls, p.window),
            (MAX_TOKENS, MAX_CALLS, Policy::MAX_WINDOW)
        );
        let w = Window::fresh(at(0).start_tick());
        let w = w.try_admit(&p, at(0), MAX_TOKENS, MAX_CALLS).unwrap();
        assert!(w.try_admit(&p, at(0), 1, 0).is_err());
        let err = w.try_admit(&p, at(0), u64::MAX, 0).unwrap_err();
        assert_eq!(err.retry_after_ms, None);
        // A window of u64::MAX seconds never ends, even at the end of time.
        assert!(!w.is_expired(&p, at(u64::MAX)));
        assert!(!Window::fresh(Tick(1)).is_expired(&p, at(u64::MAX)));
    }

    #[test]
    fn release_saturates_at_zero_and_respects_expiry() {
        let p = policy(100, 2, 1);
        let w = Window::fresh(at(0).start_tick())
            .try_admit(&p, at(0), 30, 1)
            .unwrap();
        assert_eq!(w.release(&p, at(0), 10).tokens, 20);
        assert_eq!(w.release(&p, at(0), u64::MAX).tokens, 0);
        let later = w.release(&p, at(2 * SEC), 10);
        assert_eq!((later.tokens, later.calls), (0, 0));
        assert!(later.start > w.start);
    }

    #[test]
    fn settle_refunds_or_charges_only_in_its_own_window() {
        let p = policy(100, 5, 60);
        let start = at(0).start_tick();
        let w = Window::fresh(start).try_admit(&p, at(0), 80, 1).unwrap();
        let Refund::Applied(less) = w.settle(&p, at(0), start, (80, 1), (30, 1)) else {
            panic!("window is current");
        };
        assert_eq!((less.tokens, less.calls), (30, 1));
        let Refund::Applied(more) = w.settle(&p, at(0), start, (80, 1), (500, 1)) else {
            panic!("window is current");
        };
        assert_eq!(more.tokens, 500);
        let Refund::Applied(cancelled) = w.settle(&p, at(0), start, (80, 1), (0, 0)) else {
            panic!("window is current");
        };
        assert_eq!((cancelled.tokens, cancelled.calls), (0, 0));
        let huge = w.settle(&p, at(0), start, (0, 0), (u64::MAX, u64::MAX));
        assert_eq!(
            huge,
            Refund::Applied(Window {
                tokens: MAX_TOKENS,
                calls: MAX_CALLS,
                start
            })
        );
        // Expired but not yet rolled over, and rolled over: both refuse.
        assert_eq!(
            w.settle(&p, at(60 * SEC), start, (80, 1), (0, 0)),
            Refund::WindowEnded
        );
        let next = w.current(&p, at(61 * SEC));
        assert_eq!(
            next.settle(&p, at(61 * SEC), start, (80, 1), (0, 0)),
            Refund::WindowEnded
        );
    }

    proptest! {
        /// Whatever the operations, usage never exceeds the policy by
        /// admission (only a settle may charge past it), a fresh window's
        /// start never moves backwards, and admission agrees with a plain
        /// u128 model of the rule.
        #[test]
        fn admission_matches_a_wide_arithmetic_model(
            tokens_budget in prop_oneof![0..200u64, Just(MAX_TOKENS), Just(u64::MAX)],
            calls_budget in prop_oneof![0..10u64, Just(u64::MAX)],
            window_secs in prop_oneof![0..3u64, Just(u64::MAX)],
            ops in prop::collection::vec((0..4u8, any::<u64>(), 0..3u64, 0..1_500_000_000u64), 1..60),
        ) {
            let p = policy(tokens_budget, calls_budget, window_secs);
            let mut nanos = 0u64;
            let mut w = Window::fresh(at(nanos).start_tick());
            for (op, amount, calls, advance) in ops {
                nanos += advance;
                let now = at(nanos);
                let amount = if op == 3 { amount % 300 } else { amount };
                let seen = w.current(&p, now);
                prop_assert!(seen.start >= w.start);
                match op {
                    0 | 3 => {
                        let fits = u128::from(seen.tokens) + u128::from(amount) <= u128::from(p.tokens)
                            && u128::from(seen.calls) + u128::from(calls) <= u128::from(p.calls);
                        match w.try_admit(&p, now, amount, calls) {
                            Ok(next) => {
                                prop_assert!(fits);
                                prop_assert_eq!(next.tokens, seen.tokens + amount);
                                w = next;
                            }
                            Err(_) => prop_assert!(!fits),
                        }
                    }
                    1 => w = w.release(&p, now, amount),
                    _ => w = w.reset(now),
                }
                prop_assert!(w.tokens <= p.tokens && w.calls <= p.calls);
            }
        }
    }
}
