//! The pure decision logic of one agent's budget: state in, state out.
//!
//! Nothing here touches an atomic, a lock or a clock. Both managers (the
//! lock-free [`crate::BudgetManager`] and the locked
//! [`crate::LockedBudgetManager`]) read the time once, load a [`State`]
//! from their storage, ask this module what the next [`State`] is, and
//! store it back (with one compare-and-swap, or under a write lock). Keeping
//! the decisions here means they are written once, tested exhaustively
//! without threads, and shared by every storage.
//!
//! # One state, two policies
//!
//! A [`State`] is what fits in the agent's one 128-bit usage word: tokens
//! used, calls used, and a time mark. A [`Policy`] says how budget comes
//! back, and so what the mark means:
//!
//! - [`Refill::Window`] (`fixed.rs`): fixed windows. The mark is the start
//!   of the current window; once the window has run its length, the next
//!   operation starts a fresh one with nothing used.
//! - [`Refill::Bucket`] (`bucket.rs`): a token bucket that refills
//!   continuously from empty to full in one period. The counts are what was
//!   used as of the mark, and refill since the mark is computed, exactly,
//!   from the time elapsed.
//!
//! Both keep tokens and calls in one word, so every transition (admit both
//! resources, roll a window over, refund) is a single compare-and-swap from
//! one consistent state to the next.
//!
//! # Time
//!
//! Time is a [`Tick`]: whole milliseconds on the manager's own monotonic
//! timeline, which starts at [`Tick::ORIGIN`] when the manager is created.
//! The origin sits [`Tick::ORIGIN`] milliseconds (about 17 years) above zero
//! so that a window restored from a file, which began before the manager
//! existed, still has a representable start.
//!
//! Nothing is ever early, whatever the rounding: a window (or a bucket's
//! refill) starts at the *next* millisecond boundary ([`Now::start_tick`],
//! rounded up) while expiry and refill are judged on the *previous* one
//! ([`Now::tick`], rounded down).

mod bucket;
pub(crate) mod calendar;
mod fixed;
mod time;

pub(crate) use time::{Now, Tick};

use crate::types::{BudgetLimit, CalendarLimit, CalendarPeriod, RefillLimit};

/// Bits of the packed word that hold tokens used.
pub(crate) const TOKEN_BITS: u32 = 52;
/// Bits of the packed word that hold calls used.
pub(crate) const CALL_BITS: u32 = 32;
/// Bits of the packed word that hold the time mark.
pub(crate) const MARK_BITS: u32 = 44;

/// The largest token count a window can hold: about 4.5 × 10^15.
///
/// Token budgets above it are enforced as if they were this value (half of
/// it for a refilling bucket, see [`RefillLimit`]).
pub const MAX_TOKENS: u64 = (1 << TOKEN_BITS) - 1;
/// The largest call count a window can hold: 2^32 − 1, about 4.3 × 10^9.
///
/// Call budgets above it are enforced as if they were this value (half of
/// it for a refilling bucket, see [`RefillLimit`]).
pub const MAX_CALLS: u64 = (1 << CALL_BITS) - 1;

const TICKS_PER_SEC: u64 = 1_000;

// The promised exact ranges, checked when the crate compiles: the fields fill
// the word, count 10^12 tokens and 10^9 calls (in a bucket too, whose counts
// may reach twice its budget), hold ten years of window below the origin (for
// restored windows) and five centuries of uptime above it, and periods of ten
// years.
const _: () = assert!(TOKEN_BITS + CALL_BITS + MARK_BITS == 128);
const _: () = assert!(Policy::MAX_BUCKET_TOKENS >= 1_000_000_000_000);
const _: () = assert!(Policy::MAX_BUCKET_CALLS >= 1_000_000_000);
const _: () = assert!(Tick::ORIGIN.0 > 10 * 366 * 86_400 * TICKS_PER_SEC);
const _: () = assert!(Tick::MAX.0 - Tick::ORIGIN.0 > 500 * 365 * 86_400 * TICKS_PER_SEC);
const _: () = assert!(Policy::MAX_PERIOD > 100 * 366 * 86_400 * TICKS_PER_SEC);

/// How an agent's budget comes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refill {
    /// All at once, when a fixed window ends.
    Window,
    /// Continuously: a token bucket that refills from empty to full in one
    /// period.
    Bucket,
    /// All at once, when a UTC day or month ends (`calendar.rs`): a fixed
    /// window whose length follows the calendar (the policy's period is
    /// unused, zero).
    Calendar(CalendarPeriod),
}

/// The limits of one agent, clamped to what its state can count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Tokens admitted per window, or a full bucket's tokens.
    pub(crate) tokens: u64,
    /// Calls admitted per window, or a full bucket's calls.
    pub(crate) calls: u64,
    /// The window's length, or the time a bucket takes to refill from
    /// empty to full, in ticks: from one to [`Policy::MAX_PERIOD`].
    pub(crate) period: u64,
    /// How budget comes back.
    pub(crate) refill: Refill,
}

impl Policy {
    /// The longest window or refill period: 2^42 − 1 ms, about 139 years,
    /// which no process outlives. Longer ones are this long.
    pub(crate) const MAX_PERIOD: u64 = (1 << 42) - 1;
    /// A bucket's counts, taken at its time mark, reach up to twice its
    /// budget; its budget is therefore at most half of what a field holds.
    pub(crate) const MAX_BUCKET_TOKENS: u64 = MAX_TOKENS / 2;
    /// See [`Policy::MAX_BUCKET_TOKENS`].
    pub(crate) const MAX_BUCKET_CALLS: u64 = MAX_CALLS / 2;

    /// A fixed-window policy.
    pub(crate) fn from_limit(limit: &BudgetLimit) -> Self {
        Policy {
            tokens: limit.token_budget.min(MAX_TOKENS),
            calls: limit.calls_budget.min(MAX_CALLS),
            // A zero-second window is the shortest one we can name: a
            // millisecond. (The seed reset usage before every operation;
            // here operations within one millisecond share the budget.)
            period: limit
                .window_secs
                .saturating_mul(TICKS_PER_SEC)
                .clamp(1, Self::MAX_PERIOD),
            refill: Refill::Window,
        }
    }

    /// Whether every configuration this policy can be made from is the one
    /// it gives back ([`Configured::derived`](crate::limit::Configured::derived)),
    /// so that the configuration need not be kept beside it: a window or a
    /// calendar window whose budgets and period are below their maximums.
    /// A budget or period at its maximum may have been clamped from a
    /// larger one, and a bucket's period rounded up from a fraction of a
    /// millisecond.
    pub(crate) fn derives_exactly(&self) -> bool {
        let budgets = self.tokens < MAX_TOKENS && self.calls < MAX_CALLS;
        match self.refill {
            Refill::Window => budgets && self.period < Self::MAX_PERIOD,
            Refill::Calendar(_) => budgets,
            Refill::Bucket => false,
        }
    }

    /// A calendar-window policy.
    pub(crate) fn from_calendar(limit: &CalendarLimit) -> Self {
        Policy {
            tokens: limit.token_budget.min(MAX_TOKENS),
            calls: limit.calls_budget.min(MAX_CALLS),
            period: 0,
            refill: Refill::Calendar(limit.period),
        }
    }

    /// Whether budget comes back by windows (fixed or calendar): the mark
    /// is a window's start, and the window rules apply.
    pub(crate) fn is_windowed(&self) -> bool {
        matches!(self.refill, Refill::Window | Refill::Calendar(_))
    }

    /// A token-bucket policy. The period is rounded up to whole
    /// milliseconds (never refilling faster than asked), at least one.
    pub(crate) fn from_refill(limit: &RefillLimit) -> Self {
        let nanos = limit.refill_period.as_nanos();
        let millis = u64::try_from(nanos.div_ceil(1_000_000)).unwrap_or(u64::MAX);
        Policy {
            tokens: limit.token_budget.min(Self::MAX_BUCKET_TOKENS),
            calls: limit.calls_budget.min(Self::MAX_BUCKET_CALLS),
            period: millis.clamp(1, Self::MAX_PERIOD),
            refill: Refill::Bucket,
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
    /// How much of `resource` was left.
    pub(crate) remaining: u64,
    /// How much of `resource` was in use.
    pub(crate) used: u64,
    /// The policy's limit for `resource`.
    pub(crate) limit: u64,
    /// Milliseconds until the whole request fits (the window ends, or the
    /// bucket has refilled enough of every resource it is short of);
    /// `None` if it never can: it is larger than a limit, or its window
    /// never ends.
    pub(crate) retry_after_ms: Option<u64>,
}

/// An agent's usage as its one word holds it: see the module docs for what
/// the mark means under each policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct State {
    pub(crate) tokens: u64,
    pub(crate) calls: u64,
    pub(crate) mark: Tick,
}

/// What a settle or cancel did, before it is reported to the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refund {
    /// Booked in the reservation's own window (or, for a bucket, into the
    /// bucket): the new state, and the `(tokens, calls)` given back and
    /// charged beyond the reservation.
    Applied {
        next: State,
        refunded: (u64, u64),
        charged: (u64, u64),
    },
    /// The reservation's window has ended; what was used beyond the
    /// reservation, `charged`, is charged to the current window instead,
    /// and this is the new state.
    CarriedOver { next: State, charged: (u64, u64) },
    /// The reservation's window has ended, and nothing was owed.
    WindowEnded,
}

/// What an observer reads of an agent at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reading {
    /// `(tokens, calls)` in use: in the current window, or taken from the
    /// bucket and not yet refilled.
    pub(crate) used: (u64, u64),
    /// `(tokens, calls)` an operation could take now.
    pub(crate) remaining: (u64, u64),
    /// Milliseconds until everything is available again: the window's end,
    /// or the bucket full.
    pub(crate) millis_to_reset: u64,
}

impl State {
    /// Nothing used, marked at `mark`: a fresh window, or a full bucket.
    pub(crate) fn fresh(mark: Tick) -> Self {
        State {
            tokens: 0,
            calls: 0,
            mark,
        }
    }

    /// The state as an operation at `now` finds it: a window rolled over
    /// if it has expired, a bucket's mark brought within one period of
    /// `now`. Same meaning, fewer moving parts. (The transitions below do
    /// this themselves; tests check it on its own.)
    #[cfg(test)]
    pub(crate) fn current(self, policy: &Policy, now: Now) -> Self {
        match policy.refill {
            Refill::Window | Refill::Calendar(_) => self.current_window(policy, now),
            Refill::Bucket => self.current_bucket(policy, now),
        }
    }

    /// What an observer reads at `now`.
    pub(crate) fn read(self, policy: &Policy, now: Now) -> Reading {
        match policy.refill {
            Refill::Window | Refill::Calendar(_) => self.read_window(policy, now),
            Refill::Bucket => self.read_bucket(policy, now),
        }
    }

    /// `(tokens, calls)` an operation at `now` could take.
    pub(crate) fn headroom(self, policy: &Policy, now: Now) -> (u64, u64) {
        self.read(policy, now).remaining
    }

    /// Admits `tokens` and `calls` together, or neither.
    ///
    /// Returns the state to store and the verdict. A refusal names the
    /// resource that fell short: tokens before calls, except that a
    /// resource the request can never fit (more than its limit) is named
    /// first, so `retry_after` is `None` whenever waiting cannot help. Zero
    /// of a resource always fits, even when that resource is exhausted (the
    /// seed's `reserve(0)` succeeds).
    #[inline]
    pub(crate) fn admit(
        self,
        policy: &Policy,
        now: Now,
        tokens: u64,
        calls: u64,
    ) -> (State, Result<(), Shortfall>) {
        match policy.refill {
            Refill::Window | Refill::Calendar(_) => self.admit_window(policy, now, tokens, calls),
            Refill::Bucket => self.admit_bucket(policy, now, tokens, calls),
        }
    }

    /// Takes `tokens` and `calls` without a verdict, for a limit in shadow
    /// mode: it counts what it would have refused. Into the current window
    /// (or the bucket), past the limit if need be, as overuse is charged at
    /// a settle: saturating at the field's width, so that a later settle
    /// rebooks it like any reservation.
    #[inline]
    pub(crate) fn admit_past(self, policy: &Policy, now: Now, tokens: u64, calls: u64) -> State {
        match policy.refill {
            Refill::Window | Refill::Calendar(_) => {
                let window = self.current_window(policy, now);
                State {
                    tokens: window.tokens.saturating_add(tokens).min(MAX_TOKENS),
                    calls: window.calls.saturating_add(calls).min(MAX_CALLS),
                    mark: window.mark,
                }
            }
            Refill::Bucket => {
                let (next, _, _) = self.rebook_bucket(policy, now, |used| {
                    (
                        rebook(used.0, 0, tokens, MAX_TOKENS),
                        rebook(used.1, 0, calls, MAX_CALLS),
                    )
                });
                next
            }
        }
    }

    /// The seed's `release`: gives tokens back now, never below zero. (Any
    /// caller may call it with any amount; new code settles a
    /// [`crate::Reservation`] instead.)
    pub(crate) fn release(self, policy: &Policy, now: Now, tokens: u64) -> State {
        match policy.refill {
            Refill::Window | Refill::Calendar(_) => self.release_window(policy, now, tokens),
            Refill::Bucket => {
                let (next, _, _) =
                    self.rebook_bucket(policy, now, |used| (used.0.saturating_sub(tokens), used.1));
                next
            }
        }
    }

    /// A manual reset: a fresh window, or a full bucket, from `now`.
    pub(crate) fn reset(self, now: Now) -> State {
        State::fresh(self.next_mark(now))
    }

    /// A mark after this one, at `now` or later: marks strictly increase,
    /// so a window's start names it for good. Only two resets within a
    /// millisecond need the `+ 1`; otherwise the clock alone moves it on.
    fn next_mark(self, now: Now) -> Tick {
        now.start_tick().max(self.mark.plus(1))
    }

    /// Books the difference between what a reservation took (in the window
    /// starting at `taken_in`, under a window policy) and what it really
    /// used.
    ///
    /// Less than reserved is refunded, never below zero, and only into the
    /// window it was taken from (or into the bucket, never above full). More
    /// than reserved is charged even past the limit, because it was really
    /// spent: into the reservation's window if it is still current, else
    /// into the current one.
    pub(crate) fn settle(
        self,
        policy: &Policy,
        now: Now,
        taken_in: Tick,
        reserved: (u64, u64),
        used: (u64, u64),
    ) -> Refund {
        match policy.refill {
            Refill::Window | Refill::Calendar(_) => {
                self.settle_window(policy, now, taken_in, reserved, used)
            }
            Refill::Bucket => {
                let (next, before, after) = self.rebook_bucket(policy, now, |in_use| {
                    (
                        rebook(in_use.0, reserved.0, used.0, MAX_TOKENS),
                        rebook(in_use.1, reserved.1, used.1, MAX_CALLS),
                    )
                });
                Refund::applied(next, before, after)
            }
        }
    }

    /// What `set_budget` finds before it changes a window's limit: a
    /// window that has run its length is over (as for any write that
    /// observes the expiry, a fresh one starts now), so the new limit does
    /// not revive it. (A switch to a bucket reads what is in use the same
    /// way: see [`convert`](Self::convert).)
    pub(crate) fn ended_window(self, from: &Policy, to: &Policy, now: Now) -> State {
        if from.is_windowed() && to.is_windowed() {
            self.current_window(from, now)
        } else {
            self
        }
    }

    /// The state under another policy. The same policy, or window to
    /// window, keeps the state (the seed's `set_budget` on a known agent
    /// keeps its window and usage). Any other change starts the new policy
    /// now with what is in use under the old one (a switch never forgives
    /// what was spent). A window begun so starts after the old mark: window
    /// starts name windows, so a reservation of an earlier window never
    /// takes this one for its own, even after a switch to a bucket and back
    /// within a millisecond. A bucket's refill starts now (or at the old
    /// mark, if that is later still, so that the next window's start stays
    /// after every earlier one).
    pub(crate) fn convert(self, from: &Policy, to: &Policy, now: Now) -> State {
        if from == to || (from.is_windowed() && to.is_windowed()) {
            return self;
        }
        let (tokens, calls) = self.read(from, now).used;
        let mark = match to.refill {
            Refill::Window | Refill::Calendar(_) => self.next_mark(now),
            Refill::Bucket => now.start_tick().max(self.mark),
        };
        State {
            tokens: tokens.min(Resource::Tokens.field()),
            calls: calls.min(Resource::Calls.field()),
            mark,
        }
    }
}

impl Refund {
    /// Booked: `before` and `after` are what was in use either side.
    fn applied(next: State, before: (u64, u64), after: (u64, u64)) -> Self {
        Refund::Applied {
            next,
            refunded: (
                before.0.saturating_sub(after.0),
                before.1.saturating_sub(after.1),
            ),
            charged: (
                after.0.saturating_sub(before.0),
                after.1.saturating_sub(before.1),
            ),
        }
    }
}

impl Resource {
    /// The most a count of this resource may hold: its field's width. (A
    /// bucket's counts stay below twice its budget plus any debt, and its
    /// budget is at most half a field; debt saturates at the field.)
    fn field(self) -> u64 {
        match self {
            Resource::Tokens => MAX_TOKENS,
            Resource::Calls => MAX_CALLS,
        }
    }
}

/// `current` with `reserved` replaced by `used`: the difference charged
/// (saturating at `max`) or refunded (never below zero).
fn rebook(current: u64, reserved: u64, used: u64, max: u64) -> u64 {
    if used >= reserved {
        current.saturating_add(used - reserved).min(max)
    } else {
        current.saturating_sub(reserved - used)
    }
}

/// The verdict on `request` against `used` under `policy`, both resources
/// at once. `wait_ms(resource, short_by)` says how long until `short_by`
/// more of `resource` is available, for requests that fit the limit.
#[inline]
fn judge(
    policy: &Policy,
    used: (u64, u64),
    request: (u64, u64),
    wait_ms: impl Fn(Resource, u64) -> Option<u64>,
) -> Result<(), Shortfall> {
    // Zero always fits, even past the limit (the seed's `reserve(0)`).
    let fits = |used: u64, requested: u64, limit: u64| requested <= limit.saturating_sub(used);
    let tokens_fit = fits(used.0, request.0, policy.tokens);
    let calls_fit = fits(used.1, request.1, policy.calls);
    let tokens_never_fit = request.0 > policy.tokens;
    let calls_never_fit = request.1 > policy.calls;
    let resource = if !tokens_fit && (tokens_never_fit || !calls_never_fit) {
        Resource::Tokens
    } else if !calls_fit {
        Resource::Calls
    } else {
        return Ok(());
    };
    let of = |resource: Resource| match resource {
        Resource::Tokens => (used.0, request.0, policy.tokens),
        Resource::Calls => (used.1, request.1, policy.calls),
    };
    let short_by = |resource: Resource| {
        let (used, requested, limit) = of(resource);
        let short_by = (u128::from(used) + u128::from(requested)).saturating_sub(u128::from(limit));
        u64::try_from(short_by).unwrap_or(u64::MAX)
    };
    // The request fits once every resource it is short of has room: the
    // latest of their waits, or never if one of them never will.
    let retry_after_ms = if tokens_never_fit || calls_never_fit {
        None
    } else {
        [(Resource::Tokens, tokens_fit), (Resource::Calls, calls_fit)]
            .into_iter()
            .filter(|&(_, fit)| !fit)
            .try_fold(0, |latest, (short, _)| {
                Some(latest.max(wait_ms(short, short_by(short))?))
            })
    };
    let (used, requested, limit) = of(resource);
    Err(Shortfall {
        resource,
        requested,
        remaining: limit.saturating_sub(used),
        used,
        limit,
        retry_after_ms,
    })
}

#[cfg(test)]
mod tests;
