//! Token buckets: the budget comes back continuously, from empty to full in
//! one period.
//!
//! # The representation
//!
//! The counts are what was in use *as of the mark*; what has refilled
//! since is computed, never stored: after `e` milliseconds a resource with
//! budget `b` and period `p` has regained `floor(b × e / p)`. So
//!
//! ```text
//! in use at now = counts − floor(budget × (now − mark) / period), at least 0
//! ```
//!
//! and the refill carries no rounding from one operation to the next: an
//! admission adds to the counts and leaves the mark where it is, so many
//! small admissions get exactly what one large one would.
//!
//! Two rules keep the numbers small without losing exactness:
//!
//! - **The mark moves by whole periods.** Once `now − mark` reaches a
//!   period, the mark moves forward by as many whole periods as fit and
//!   each count drops by that many budgets: over a whole period a resource
//!   regains exactly its budget, so both resources stay exact. After this,
//!   `now − mark` is less than a period and the refill term is less than
//!   the budget, which is what bounds the counts (below twice the budget,
//!   plus any debt) and lets them live in the usage word's fields.
//! - **A full bucket starts over.** When both resources are full at an
//!   admission, the mark moves to now and the counts to the request: the
//!   refill of what is taken then starts at that instant, exactly as a
//!   continuous bucket's would.
//!
//! The one approximation: when one resource is full and the other is not,
//! the full one cannot restart its refill at the admission (the mark is
//! shared), and it regains its units at fixed points of the shared phase
//! (`mark + k × period / budget`) instead. It may therefore regain its
//! first unit up to one unit-time early, never more: over any span of `t`,
//! a resource regains at most `floor(budget × t / period) + 1`, with no
//! drift over time.
//!
//! # Debt
//!
//! A settle that reports more than was reserved charges the excess even if
//! the bucket goes below empty: the counts then exceed the budget, and the
//! refill pays the debt back before anything is admitted again.

use super::{judge, Now, Policy, Reading, Resource, State};

/// What `budget` refills over `elapsed` of `period` ticks, in whole units.
fn refilled(budget: u64, elapsed: u64, period: u64) -> u64 {
    let units = u128::from(budget) * u128::from(elapsed) / u128::from(period);
    u64::try_from(units).unwrap_or(u64::MAX)
}

/// The ticks after which at least `units` have refilled: the least `e`
/// with `floor(budget × e / period) >= units`. `budget` is not zero.
fn ticks_until_refilled(budget: u64, units: u64, period: u64) -> u64 {
    let ticks = (u128::from(units) * u128::from(period)).div_ceil(u128::from(budget));
    u64::try_from(ticks).unwrap_or(u64::MAX)
}

impl State {
    /// The mark moved forward by whole periods to within one period of
    /// `now`, the counts lowered by a budget per period; a bucket found
    /// full on both resources is marked afresh at `now`.
    pub(super) fn current_bucket(self, policy: &Policy, now: Now) -> State {
        let elapsed = now.tick().millis_since(self.mark);
        if elapsed < policy.period {
            return self;
        }
        let periods = elapsed / policy.period;
        let after = |count: u64, budget: u64| {
            let regained = u128::from(budget) * u128::from(periods);
            u64::try_from(u128::from(count).saturating_sub(regained)).unwrap_or(0)
        };
        let (tokens, calls) = (
            after(self.tokens, policy.tokens),
            after(self.calls, policy.calls),
        );
        if (tokens, calls) == (0, 0) {
            return State::fresh(now.start_tick());
        }
        State {
            tokens,
            calls,
            // At most `elapsed` ticks on, so still at or before now.
            mark: self.mark.plus(periods * policy.period),
        }
    }

    /// The bucket at `now`: its current form, and what its refill term has
    /// regained since its mark, per resource.
    fn bucket_at(self, policy: &Policy, now: Now) -> (State, (u64, u64)) {
        let bucket = self.current_bucket(policy, now);
        // Less than a period: `current_bucket` moved the mark.
        let elapsed = now.tick().millis_since(bucket.mark);
        let regained = (
            refilled(policy.tokens, elapsed, policy.period),
            refilled(policy.calls, elapsed, policy.period),
        );
        (bucket, regained)
    }

    pub(super) fn read_bucket(self, policy: &Policy, now: Now) -> Reading {
        let (bucket, regained) = self.bucket_at(policy, now);
        let used = in_use(bucket, regained);
        // Full again once the refill term has caught up with each count; a
        // debt on a budget of zero is never paid back.
        let until_full = |count: u64, regained: u64, budget: u64| match () {
            () if count <= regained => 0,
            () if budget == 0 => u64::MAX,
            () => ticks_until_refilled(budget, count, policy.period),
        };
        let full_after = until_full(bucket.tokens, regained.0, policy.tokens).max(until_full(
            bucket.calls,
            regained.1,
            policy.calls,
        ));
        Reading {
            used,
            remaining: (
                policy.tokens.saturating_sub(used.0),
                policy.calls.saturating_sub(used.1),
            ),
            millis_to_reset: bucket.mark.plus(full_after).millis_since(now.tick()),
        }
    }

    /// A refusal changes nothing (there is no window to roll over), so it
    /// is not written back and a hot agent's cache line stays shared.
    pub(super) fn admit_bucket(
        self,
        policy: &Policy,
        now: Now,
        tokens: u64,
        calls: u64,
    ) -> (State, Result<(), super::Shortfall>) {
        if (tokens, calls) == (0, 0) {
            return (self, Ok(()));
        }
        let (bucket, regained) = self.bucket_at(policy, now);
        let used = in_use(bucket, regained);
        let verdict = judge(policy, used, (tokens, calls), |resource, short_by| {
            let (regained, budget) = match resource {
                Resource::Tokens => (regained.0, policy.tokens),
                Resource::Calls => (regained.1, policy.calls),
            };
            // A resource that is short is not full, so its count is above
            // the refill term: `short_by` more units are in once the term
            // has grown by that much. The budget is not zero: the request
            // fits the limit, and is not zero either.
            let after = ticks_until_refilled(budget, regained + short_by, policy.period);
            Some(bucket.mark.plus(after).millis_since(now.tick()))
        });
        if verdict.is_err() {
            return (self, verdict);
        }
        if used == (0, 0) {
            // Full on both: the refill of what is taken starts now, or at
            // the mark if a reset in this millisecond put it later: marks
            // never go back (a window begun from this bucket starts after
            // its mark, and must not take an earlier window's start).
            let next = State {
                tokens,
                calls,
                mark: now.start_tick().max(bucket.mark),
            };
            return (next, Ok(()));
        }
        // What is in use plus the request is within the budget, and the
        // refill term is below it, so each count stays below twice the
        // budget: within its field (see `Policy::MAX_BUCKET_TOKENS`).
        let next = State {
            tokens: bucket.tokens.max(regained.0) + tokens,
            calls: bucket.calls.max(regained.1) + calls,
            mark: bucket.mark,
        };
        (next, Ok(()))
    }

    /// Replaces what is in use by `rebook(in use)`, keeping the refill's
    /// phase: refunds (never above full) and charges (as debt, up to what
    /// the fields hold). Returns the new state, and what was in use before
    /// and after.
    pub(super) fn rebook_bucket(
        self,
        policy: &Policy,
        now: Now,
        rebook: impl FnOnce((u64, u64)) -> (u64, u64),
    ) -> (State, (u64, u64), (u64, u64)) {
        let (bucket, regained) = self.bucket_at(policy, now);
        let used = in_use(bucket, regained);
        let (tokens, calls) = rebook(used);
        if (tokens, calls) == used {
            return (self, used, used);
        }
        // The count that puts `in_use` in use now; nothing in use is a
        // count equal to the refill term (full, and staying full).
        let count = |in_use: u64, regained: u64, resource: Resource| {
            in_use.saturating_add(regained).min(resource.field())
        };
        let next = State {
            tokens: count(tokens, regained.0, Resource::Tokens),
            calls: count(calls, regained.1, Resource::Calls),
            mark: bucket.mark,
        };
        (next, used, in_use(next, regained))
    }
}

/// What is in use: each count less the refill term, at least zero.
fn in_use(bucket: State, regained: (u64, u64)) -> (u64, u64) {
    (
        bucket.tokens.saturating_sub(regained.0),
        bucket.calls.saturating_sub(regained.1),
    )
}
