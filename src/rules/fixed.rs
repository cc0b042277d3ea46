//! Fixed windows: the budget comes back all at once when a window ends.
//!
//! The mark is the window's start. A window has expired once the time
//! since its start is at least its length; the next operation that
//! observes that (admitted *or* refused) starts a fresh window at that
//! instant. Starts strictly increase per agent, so a start names one window
//! for good, and a reservation refunds only into the window it names.

use super::{calendar, judge, rebook, Now, Policy, Reading, Refill, Refund, State, Tick};

impl State {
    /// Whether this window has run its full length at `now`. A window of
    /// the longest length stands for any longer one, and never ends.
    /// A calendar window ends at the next UTC boundary after its mark.
    #[inline]
    pub(super) fn is_expired(&self, policy: &Policy, now: Now) -> bool {
        if let Refill::Calendar(period) = policy.refill {
            return now.tick() >= calendar::window_of(period, self.mark, now).1;
        }
        policy.period < Policy::MAX_PERIOD && now.tick().millis_since(self.mark) >= policy.period
    }

    /// Milliseconds left in this window at `now` (zero once expired).
    #[inline]
    pub(super) fn millis_left(&self, policy: &Policy, now: Now) -> u64 {
        if let Refill::Calendar(period) = policy.refill {
            return calendar::window_of(period, self.mark, now)
                .1
                .millis_since(now.tick());
        }
        policy
            .period
            .saturating_sub(now.tick().millis_since(self.mark))
    }

    /// The length, in milliseconds, of the window current at `now`: the
    /// policy's period, or the calendar day or month (what `full_info`
    /// reports as `window_secs`).
    pub(crate) fn window_millis(self, policy: &Policy, now: Now) -> u64 {
        match policy.refill {
            Refill::Calendar(period) => {
                let window = self.current_window(policy, now);
                let (start, end) = calendar::window_of(period, window.mark, now);
                end.millis_since(start)
            }
            Refill::Window | Refill::Bucket => policy.period,
        }
    }

    /// Itself, or a fresh window if it has expired. Writes store it, which
    /// is how "the next operation that observes the expiry starts a new
    /// window at that instant" comes about.
    #[inline]
    pub(super) fn current_window(self, policy: &Policy, now: Now) -> State {
        if self.is_expired(policy, now) {
            // An expiry comes at least one tick after the start (every
            // window lasts a tick or more), so this start is later still.
            State::fresh(self.next_mark(now))
        } else {
            self
        }
    }

    pub(super) fn read_window(self, policy: &Policy, now: Now) -> Reading {
        let window = self.current_window(policy, now);
        Reading {
            used: (window.tokens, window.calls),
            remaining: (
                policy.tokens.saturating_sub(window.tokens),
                policy.calls.saturating_sub(window.calls),
            ),
            millis_to_reset: window.millis_left(policy, now),
        }
    }

    /// The state to store is the current window even on a refusal, so a
    /// refused operation that observes an expiry still starts the new
    /// window (the seed's rule).
    #[inline]
    pub(super) fn admit_window(
        self,
        policy: &Policy,
        now: Now,
        tokens: u64,
        calls: u64,
    ) -> (State, Result<(), super::Shortfall>) {
        let window = self.current_window(policy, now);
        let used = (window.tokens, window.calls);
        // A window of the longest length never ends: no wait helps.
        let verdict = judge(policy, used, (tokens, calls), |_, _| {
            (policy.period < Policy::MAX_PERIOD).then(|| window.millis_left(policy, now))
        });
        if verdict.is_err() {
            return (window, verdict);
        }
        // Both sums are at most the policy's limits, which are clamped to
        // the field widths, so neither can overflow nor leave its field.
        let next = State {
            tokens: window.tokens + tokens,
            calls: window.calls + calls,
            mark: window.mark,
        };
        (next, Ok(()))
    }

    pub(super) fn release_window(self, policy: &Policy, now: Now, tokens: u64) -> State {
        let window = self.current_window(policy, now);
        State {
            tokens: window.tokens.saturating_sub(tokens),
            ..window
        }
    }

    /// In the reservation's own window, still current: the difference,
    /// either way. Once that window has ended (even if no one has rolled
    /// it over yet), a refund is lost with it, but what was used beyond the
    /// reservation is charged to the current window: overuse is never
    /// forgiven.
    pub(super) fn settle_window(
        self,
        policy: &Policy,
        now: Now,
        taken_in: Tick,
        reserved: (u64, u64),
        used: (u64, u64),
    ) -> Refund {
        if self.mark == taken_in && !self.is_expired(policy, now) {
            let next = State {
                tokens: rebook(self.tokens, reserved.0, used.0, super::MAX_TOKENS),
                calls: rebook(self.calls, reserved.1, used.1, super::MAX_CALLS),
                mark: self.mark,
            };
            let (before, after) = ((self.tokens, self.calls), (next.tokens, next.calls));
            return Refund::applied(next, before, after);
        }
        let charged = (
            used.0.saturating_sub(reserved.0),
            used.1.saturating_sub(reserved.1),
        );
        if charged == (0, 0) {
            return Refund::WindowEnded;
        }
        let window = self.current_window(policy, now);
        let next = State {
            tokens: window
                .tokens
                .saturating_add(charged.0)
                .min(super::MAX_TOKENS),
            calls: window.calls.saturating_add(charged.1).min(super::MAX_CALLS),
            mark: window.mark,
        };
        let charged = (next.tokens - window.tokens, next.calls - window.calls);
        Refund::CarriedOver { next, charged }
    }
}
