//! The lease protocol's decisions, as pure functions: no Redis, no clock,
//! no atomics.
//!
//! Everything a node or the server decides is here, so it can be tested
//! exhaustively on its own:
//!
//! - [`take`] is the server side: what one call of the Lua script does to
//!   one window's record (`src/lua/take.lua` is its line-for-line twin,
//!   and the test `tests/script.rs` runs both on the same random calls);
//!   [`gate`] is whether that call may be granted new budget.
//! - [`LeasePlan`] is the node side: how large a lease is, when it runs low,
//!   what a request that does not fit asks for, and what a node holding too
//!   much gives back.
//! - [`close_window`], [`allowance_grant`], [`Activity`] and [`ServerClock`]
//!   are the rest of a node's bookkeeping: what it reports when a window
//!   ends, what it may admit with Redis unreachable (fail-open), when an
//!   agent counts as idle, and what time it is on the server.

use std::time::Duration;

/// The largest count the protocol keeps: 2^52 − 1, the core's
/// [`MAX_TOKENS`](agent_budget::MAX_TOKENS). Redis's Lua counts in
/// doubles, which are exact up to 2^53, so every sum of two counts is exact
/// there too before it is clamped back to this.
pub const MAX_COUNT: u64 = (1 << 52) - 1;

/// Tokens and calls, together: what a lease, a budget or a request is made
/// of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Amount {
    /// Tokens.
    pub tokens: u64,
    /// Calls.
    pub calls: u64,
}

impl Amount {
    /// No tokens, no calls.
    pub const ZERO: Amount = Amount::new(0, 0);

    /// `tokens` and `calls`.
    pub const fn new(tokens: u64, calls: u64) -> Self {
        Amount { tokens, calls }
    }

    /// Both counts cut to [`MAX_COUNT`].
    pub fn clamped(self) -> Self {
        self.map(|n| n.min(MAX_COUNT))
    }

    /// Whether both are zero.
    pub fn is_zero(self) -> bool {
        self == Amount::ZERO
    }

    /// Whether both fit in `other`.
    pub fn fits_in(self, other: Amount) -> bool {
        self.tokens <= other.tokens && self.calls <= other.calls
    }

    /// Each count minus `other`'s, never below zero.
    pub fn saturating_sub(self, other: Amount) -> Self {
        self.zip(other, u64::saturating_sub)
    }

    /// Each count plus `other`'s, never above [`MAX_COUNT`].
    pub fn clamped_add(self, other: Amount) -> Self {
        self.zip(other, |a, b| a.saturating_add(b).min(MAX_COUNT))
    }

    /// The smaller of each count.
    pub fn min(self, other: Amount) -> Self {
        self.zip(other, u64::min)
    }

    /// The larger of each count.
    pub fn max(self, other: Amount) -> Self {
        self.zip(other, u64::max)
    }

    fn map(self, f: impl Fn(u64) -> u64) -> Self {
        Amount::new(f(self.tokens), f(self.calls))
    }

    fn zip(self, other: Amount, f: impl Fn(u64, u64) -> u64) -> Self {
        Amount::new(f(self.tokens, other.tokens), f(self.calls, other.calls))
    }
}

/// One window of one agent as Redis keeps it, seen from one node: what the
/// whole fleet has taken in it, and what this node has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowRecord {
    /// Taken by every node together: leased out, consumed or not.
    pub taken: Amount,
    /// Taken by this node (its part of `taken`).
    pub mine: Amount,
}

/// One call of the take script: a node states what it believes it holds,
/// gives some back, charges some, and asks for more; all in one atomic
/// step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TakeRequest {
    /// What the node believes it has taken in this window. The server's
    /// record of the node is set to this first: a lease whose reply was
    /// lost (the node never got it) goes back to the fleet, and after a
    /// Redis restart that lost its data the node's take is re-established.
    pub belief: Amount,
    /// Unused lease given back (at most what the node holds).
    pub give: Amount,
    /// Charged whatever the budget says: overuse reported by a settle,
    /// already spent.
    pub force: Amount,
    /// New lease asked for.
    pub want: Amount,
    /// The least new lease worth having: with less left fleet-wide, nothing
    /// is granted (a request that needs this much cannot be admitted with
    /// less, and a part of it would only be stranded on this node).
    pub min: Amount,
}

/// What one call of the take script did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TakeOutcome {
    /// The record after the call.
    pub record: WindowRecord,
    /// New lease granted to the node.
    pub granted: Amount,
    /// Whether `min` was more than what was left (nothing granted).
    pub short: bool,
}

/// The server side of one take, as `take.lua` computes it against the
/// agent's `limit`; new budget is granted only if `grants_open` (see
/// [`gate`]).
///
/// In order: the node's record is set to its belief (the fleet total
/// moving by the difference), the gift is subtracted (at most what the
/// node holds), the forced charge added, and then, if grants are open and
/// at least `min` is left of each resource, the node is granted `want`
/// (never less than `min`), cut to what is left. Counts never go below zero
/// nor above [`MAX_COUNT`].
pub fn take(
    record: WindowRecord,
    limit: Amount,
    request: &TakeRequest,
    grants_open: bool,
) -> TakeOutcome {
    let belief = request.belief.clamped();
    let mut taken = record.taken.saturating_sub(record.mine).clamped_add(belief);
    let mut mine = belief;
    let give = request.give.clamped().min(mine);
    mine = mine.saturating_sub(give);
    taken = taken.saturating_sub(give);
    let force = request.force.clamped();
    mine = mine.clamped_add(force);
    taken = taken.clamped_add(force);
    let mut granted = Amount::ZERO;
    let mut short = false;
    if grants_open {
        let left = limit.clamped().saturating_sub(taken);
        let min = request.min.clamped();
        if min.fits_in(left) {
            granted = request.want.clamped().max(min).min(left);
            mine = mine.clamped_add(granted);
            taken = taken.clamped_add(granted);
        } else {
            short = true;
        }
    }
    TakeOutcome {
        record: WindowRecord { taken, mine },
        granted,
        short,
    }
}

/// A window of the fleet: windows are aligned to one timeline (Redis's
/// `TIME`, or a clock the fleet shares), window `index` covering
/// `[index × length_ms, (index + 1) × length_ms)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Window {
    /// Its length in milliseconds.
    pub length_ms: u64,
    /// Which one it is.
    pub index: u64,
}

impl Window {
    /// A window of `window_secs` seconds lasts this many milliseconds:
    /// zero seconds is one millisecond (as in the core), and lengths
    /// beyond [`MAX_COUNT`] ms are that.
    pub fn length_ms(window_secs: u64) -> u64 {
        window_secs.saturating_mul(1_000).clamp(1, MAX_COUNT)
    }

    /// The window of length `length_ms` that holds `now_ms`.
    pub fn containing(now_ms: u64, length_ms: u64) -> Self {
        let length_ms = length_ms.clamp(1, MAX_COUNT);
        Window {
            length_ms,
            index: now_ms / length_ms,
        }
    }

    /// When it starts.
    pub fn start_ms(&self) -> u64 {
        self.index.saturating_mul(self.length_ms)
    }

    /// When it ends (the next one's start).
    pub fn end_ms(&self) -> u64 {
        self.index.saturating_add(1).saturating_mul(self.length_ms)
    }

    /// How long the server keeps its record after `now_ms`: until the end
    /// of the window after it (so the last window can still be read), at
    /// least a second.
    pub fn ttl_ms(&self, now_ms: u64) -> u64 {
        self.index
            .saturating_add(2)
            .saturating_mul(self.length_ms)
            .saturating_sub(now_ms)
            .max(1_000)
    }
}

/// What the server knows of the fleet itself: when its data began (the
/// epoch was made), and until when it holds back new leases after that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochRecord {
    /// When the server's fleet record was created: at the fleet's first
    /// start, or after Redis lost its data.
    pub created_ms: u64,
    /// Until then, windows that began before `created_ms` are fenced.
    pub fence_ms: u64,
}

/// Whether a take for `window` at `now_ms` may be granted new budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Yes.
    Open,
    /// No: `window` is not the current one (the node's window ended, or
    /// its clock runs ahead); the current one is `current`.
    WrongWindow {
        /// The index of the window current on the server.
        current: u64,
    },
    /// No, not yet: the fleet's record is new and this window began before
    /// it, so nodes may hold leases of this window that the server has not
    /// heard of yet (Redis lost its data). New leases wait until
    /// `until_ms`, while every node re-establishes what it took.
    Fenced {
        /// When grants open.
        until_ms: u64,
    },
}

/// The gate of `take.lua`: grants only in the current window, and not in a
/// fenced one.
pub fn gate(now_ms: u64, window: Window, epoch: EpochRecord) -> Gate {
    let current = Window::containing(now_ms, window.length_ms).index;
    if window.index != current {
        Gate::WrongWindow { current }
    } else if window.start_ms() < epoch.created_ms && now_ms < epoch.fence_ms {
        Gate::Fenced {
            until_ms: epoch.fence_ms,
        }
    } else {
        Gate::Open
    }
}

/// How a node sizes its leases: fractions of the agent's budget per window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LeasePolicy {
    /// A lease is this fraction of the window's budget, rounded up (at
    /// least one of each resource the budget has). 0.01 is one percent.
    pub fraction: f64,
    /// A lease is refilled in the background once less than this fraction
    /// of it is left (the low-water mark). 0.5 is half.
    pub low_water: f64,
}

impl Default for LeasePolicy {
    fn default() -> Self {
        LeasePolicy {
            fraction: 0.01,
            low_water: 0.5,
        }
    }
}

/// A node's lease sizes for one agent's budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeasePlan {
    /// How much a node holds at most, refilled: a lease.
    pub lease: Amount,
    /// Below this much left, the lease is refilled in the background.
    pub low_water: Amount,
}

/// What a node asks the server for: `want`, but nothing if less than `min`
/// is left (see [`TakeRequest`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ask {
    /// New lease asked for.
    pub want: Amount,
    /// The least worth having.
    pub min: Amount,
}

/// `fraction` of `n`, rounded up, within `[min(n, 1), n]`. A NaN or
/// negative fraction is zero; above one is one.
fn share(n: u64, fraction: f64) -> u64 {
    let fraction = if fraction.is_nan() {
        0.0
    } else {
        fraction.clamp(0.0, 1.0)
    };
    // `as` saturates: a product beyond u64 is u64::MAX, cut to `n` below.
    let raw = (n as f64 * fraction).ceil() as u64;
    raw.clamp(n.min(1), n)
}

impl LeasePlan {
    /// The plan for a budget of `limit` per window.
    pub fn new(limit: Amount, policy: LeasePolicy) -> Self {
        let limit = limit.clamped();
        let lease = Amount::new(
            share(limit.tokens, policy.fraction),
            share(limit.calls, policy.fraction),
        );
        // The mark is the fraction rounded up, at most the lease less one,
        // so a full lease is never "low"; with a lease of one, or a
        // fraction of zero, the mark is zero and the node refills only
        // when a request finds the lease short.
        let mark = |lease: u64| {
            let low = if policy.low_water.is_nan() {
                0.0
            } else {
                policy.low_water.clamp(0.0, 1.0)
            };
            ((lease as f64 * low).ceil() as u64).min(lease.saturating_sub(1))
        };
        LeasePlan {
            lease,
            low_water: Amount::new(mark(lease.tokens), mark(lease.calls)),
        }
    }

    /// The background refill once `left` is below the low-water mark: top
    /// the lease back up to its size. `None` while above the mark.
    pub fn refill(&self, left: Amount) -> Option<Ask> {
        let low = left.tokens < self.low_water.tokens || left.calls < self.low_water.calls;
        let want = self.lease.saturating_sub(left);
        (low && !want.is_zero()).then_some(Ask {
            want,
            min: Amount::ZERO,
        })
    }

    /// What a request of `request` that finds only `left` in the lease
    /// asks for: at least what it lacks (`min`), and, for a request no
    /// larger than a lease, enough to bring the lease back to its size. A
    /// resource the request needs more of than a lease takes exactly what
    /// it lacks.
    pub fn demand(&self, left: Amount, request: Amount) -> Ask {
        let lacks = request.saturating_sub(left);
        let want = |request: u64, lacks: u64, lease: u64, left: u64| {
            if request > lease {
                lacks
            } else {
                lacks.max(lease.saturating_sub(left))
            }
        };
        Ask {
            want: Amount::new(
                want(request.tokens, lacks.tokens, self.lease.tokens, left.tokens),
                want(request.calls, lacks.calls, self.lease.calls, left.calls),
            ),
            min: lacks,
        }
    }

    /// What a node holding `left` gives back so as not to strand more than
    /// a lease: of a resource it holds more than two leases of (refunds
    /// from settles can pile up), all but one lease.
    pub fn excess(&self, left: Amount) -> Amount {
        let trim = |left: u64, lease: u64| {
            if left > lease.saturating_mul(2) {
                left - lease
            } else {
                0
            }
        };
        Amount::new(
            trim(left.tokens, self.lease.tokens),
            trim(left.calls, self.lease.calls),
        )
    }
}

/// What a node reports for a window that has ended, from its local cell's
/// limit (all it was granted in the window) and usage (all it consumed,
/// and the parts of leases it gave back), and `net`, what the server
/// records it as holding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Close {
    /// The lease left unused: given back, so the closed window's record
    /// shows what was really consumed.
    pub give: Amount,
    /// Consumed beyond what was granted (overuse reported by settles):
    /// charged.
    pub force: Amount,
}

/// See [`Close`].
pub fn close_window(local_limit: Amount, local_used: Amount, net: Amount) -> Close {
    Close {
        give: local_limit.saturating_sub(local_used).min(net),
        force: local_used.saturating_sub(local_limit),
    }
}

/// The fail-open allowance of a budget of `limit` per window: `fraction`
/// of it, rounded down (a NaN or negative fraction is none, above one is
/// the whole budget).
pub fn allowance(limit: Amount, fraction: f64) -> Amount {
    let fraction = if fraction.is_nan() {
        0.0
    } else {
        fraction.clamp(0.0, 1.0)
    };
    let part = |n: u64| ((n as f64 * fraction).floor() as u64).min(n);
    let limit = limit.clamped();
    Amount::new(part(limit.tokens), part(limit.calls))
}

/// Fail-open: with Redis unreachable and the lease short by `lacks` for a
/// request, what the node grants itself out of its `allowance` per window,
/// of which it has used `used`: a full `ask` if the allowance has room for
/// it, else as much as is left of the allowance if that covers `lacks`,
/// else nothing.
pub fn allowance_grant(ask: Ask, used: Amount, allowance: Amount) -> Option<Amount> {
    let room = allowance.saturating_sub(used);
    ask.min
        .fits_in(room)
        .then(|| ask.want.max(ask.min).min(room))
}

/// Whether an agent still has demand on this node: the last time a tick
/// saw it touched, if ever.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Activity {
    last_active_ms: Option<u64>,
}

impl Activity {
    /// Active at `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        Activity {
            last_active_ms: Some(now_ms),
        }
    }

    /// A tick at `now_ms`: `touched` says whether a request came since the
    /// last tick.
    pub fn observe(&mut self, touched: bool, now_ms: u64) {
        if touched {
            self.last_active_ms = Some(self.last_active_ms.map_or(now_ms, |t| t.max(now_ms)));
        }
    }

    /// Whether no request came for at least `idle_after` (or ever).
    pub fn is_idle(&self, now_ms: u64, idle_after: Duration) -> bool {
        let idle_ms = u64::try_from(idle_after.as_millis()).unwrap_or(u64::MAX);
        self.last_active_ms
            .is_none_or(|t| now_ms.saturating_sub(t) >= idle_ms)
    }
}

/// A node's estimate of the server's time, from round trips: the server's
/// reading is taken to be from the middle of the round trip, so the
/// estimate is off by at most half of it. A reading from a round trip more
/// than twice as slow as the last one trusted is ignored (and the bar is
/// raised, so a network that got slower for good is followed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerClock {
    /// Server time minus local time, in ms; `None` before the first reading.
    offset_ms: Option<i128>,
    best_rtt_ms: u64,
}

impl ServerClock {
    /// A round trip sent at local time `sent_ms` and answered at
    /// `received_ms` said the server's time was `server_ms`.
    pub fn observe(&mut self, sent_ms: u64, received_ms: u64, server_ms: u64) {
        let received_ms = received_ms.max(sent_ms);
        let rtt = received_ms - sent_ms;
        if self.offset_ms.is_some() && rtt > self.best_rtt_ms.saturating_mul(2).saturating_add(1) {
            // Too slow to trust; but relax the bar, so a network that got
            // slower for good is followed after a few readings.
            self.best_rtt_ms = self.best_rtt_ms.saturating_mul(2).saturating_add(1);
            return;
        }
        let middle = sent_ms + rtt / 2;
        self.offset_ms = Some(i128::from(server_ms) - i128::from(middle));
        self.best_rtt_ms = rtt;
    }

    /// The server's time at local time `local_ms`, if known.
    pub fn server_ms(&self, local_ms: u64) -> Option<u64> {
        let offset = self.offset_ms?;
        let server = i128::from(local_ms) + offset;
        Some(u64::try_from(server.max(0)).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amount(tokens: u64, calls: u64) -> Amount {
        Amount::new(tokens, calls)
    }

    #[test]
    fn a_take_reconciles_then_gives_then_charges_then_grants() {
        // The node believes it took 30; the server has it at 40 (a lease of
        // 10 whose reply was lost): 10 go back to the fleet first.
        let record = WindowRecord {
            taken: amount(100, 10),
            mine: amount(40, 4),
        };
        let request = TakeRequest {
            belief: amount(30, 3),
            give: amount(5, 1),
            force: amount(2, 0),
            want: amount(20, 2),
            min: amount(1, 1),
        };
        let out = take(record, amount(200, 20), &request, true);
        // Tokens: 100 - 40 + 30 = 90; -5 = 85; +2 = 87; +20 = 107. Calls:
        // 10 - 4 + 3 = 9; -1 = 8; +0; +2 = 10.
        assert_eq!(out.record.taken, amount(107, 10));
        assert_eq!(out.record.mine, amount(47, 4));
        assert_eq!(out.granted, amount(20, 2));
        assert!(!out.short);
    }

    #[test]
    fn a_grant_never_passes_the_limit_and_never_goes_below_min() {
        let limit = amount(100, 10);
        for taken in 0..=12u64 {
            for want in 0..=12u64 {
                for min in 0..=12u64 {
                    let record = WindowRecord {
                        taken: amount(taken * 10, taken),
                        mine: Amount::ZERO,
                    };
                    let request = TakeRequest {
                        want: amount(want * 10, want),
                        min: amount(min * 10, min),
                        ..TakeRequest::default()
                    };
                    let out = take(record, limit, &request, true);
                    let left = limit.saturating_sub(record.taken);
                    if min.saturating_mul(10) > left.tokens {
                        assert!(out.short && out.granted.is_zero(), "{taken} {want} {min}");
                    } else {
                        assert!(!out.short);
                        assert!(out.granted.fits_in(left), "never past the limit");
                        assert!(request.min.fits_in(out.granted), "never below min");
                        assert_eq!(out.granted, request.want.max(request.min).min(left));
                    }
                    assert_eq!(out.record.taken, record.taken.clamped_add(out.granted));
                }
            }
        }
    }

    #[test]
    fn a_closed_gate_grants_nothing_but_still_books_gifts_and_charges() {
        let record = WindowRecord {
            taken: amount(50, 5),
            mine: amount(20, 2),
        };
        let request = TakeRequest {
            belief: amount(20, 2),
            give: amount(8, 1),
            force: amount(3, 0),
            want: amount(10, 1),
            min: Amount::ZERO,
        };
        let out = take(record, amount(100, 10), &request, false);
        assert_eq!(out.granted, Amount::ZERO);
        assert!(!out.short);
        assert_eq!(out.record.taken, amount(45, 4));
        assert_eq!(out.record.mine, amount(15, 1));
    }

    #[test]
    fn a_gift_is_at_most_what_the_node_holds_and_counts_never_overflow() {
        let record = WindowRecord {
            taken: amount(10, 1),
            mine: amount(10, 1),
        };
        let request = TakeRequest {
            belief: amount(10, 1),
            give: amount(u64::MAX, u64::MAX),
            ..TakeRequest::default()
        };
        let out = take(record, amount(10, 1), &request, true);
        assert_eq!(out.record, WindowRecord::default());
        let huge = TakeRequest {
            belief: amount(u64::MAX, u64::MAX),
            force: amount(u64::MAX, u64::MAX),
            want: amount(u64::MAX, u64::MAX),
            ..TakeRequest::default()
        };
        let out = take(record, amount(u64::MAX, u64::MAX), &huge, true);
        assert_eq!(out.record.taken, amount(MAX_COUNT, MAX_COUNT));
        assert_eq!(out.record.mine, amount(MAX_COUNT, MAX_COUNT));
    }

    #[test]
    fn after_data_loss_a_belief_re_establishes_the_take() {
        // The server lost everything: the record is empty. Two nodes state
        // what they took; the fleet total is their sum, and only the rest
        // can be granted.
        let limit = amount(100, 10);
        let a = take(
            WindowRecord::default(),
            limit,
            &TakeRequest {
                belief: amount(60, 6),
                ..TakeRequest::default()
            },
            true,
        );
        let seen_by_b = WindowRecord {
            taken: a.record.taken,
            mine: Amount::ZERO,
        };
        let b = take(
            seen_by_b,
            limit,
            &TakeRequest {
                belief: amount(30, 3),
                want: amount(50, 5),
                ..TakeRequest::default()
            },
            true,
        );
        assert_eq!(b.granted, amount(10, 1));
        assert_eq!(b.record.taken, limit);
    }

    #[test]
    fn windows_are_aligned_and_their_records_outlive_them_by_one_window() {
        let w = Window::containing(12_345, 1_000);
        assert_eq!((w.index, w.start_ms(), w.end_ms()), (12, 12_000, 13_000));
        assert_eq!(w.ttl_ms(12_345), 14_000 - 12_345);
        assert_eq!(Window::containing(999_999, 1_000).ttl_ms(1 << 40), 1_000);
        assert_eq!(Window::length_ms(0), 1);
        assert_eq!(Window::length_ms(60), 60_000);
        assert_eq!(Window::length_ms(u64::MAX), MAX_COUNT);
        assert_eq!(Window::containing(5, 0).length_ms, 1);
    }

    #[test]
    fn the_gate_opens_only_on_the_current_unfenced_window() {
        let epoch = EpochRecord {
            created_ms: 10_500,
            fence_ms: 11_500,
        };
        let w = |index| Window {
            length_ms: 1_000,
            index,
        };
        assert_eq!(gate(10_600, w(9), epoch), Gate::WrongWindow { current: 10 });
        assert_eq!(
            gate(10_600, w(11), epoch),
            Gate::WrongWindow { current: 10 }
        );
        // Window 10 began at 10,000, before the record: fenced until 11,500
        // (but it ends at 11,000 first).
        assert_eq!(
            gate(10_600, w(10), epoch),
            Gate::Fenced { until_ms: 11_500 }
        );
        // Window 11 began after the record was made: open.
        assert_eq!(gate(11_100, w(11), epoch), Gate::Open);
        let later = EpochRecord {
            created_ms: 10_500,
            fence_ms: 10_700,
        };
        assert_eq!(gate(10_700, w(10), later), Gate::Open);
    }

    #[test]
    fn lease_sizes_are_the_fraction_rounded_up_with_a_mark_below_a_full_lease() {
        let policy = LeasePolicy {
            fraction: 0.01,
            low_water: 0.5,
        };
        let plan = LeasePlan::new(amount(100_000, 1_000), policy);
        assert_eq!(plan.lease, amount(1_000, 10));
        assert_eq!(plan.low_water, amount(500, 5));
        let tiny = LeasePlan::new(amount(7, 1), policy);
        assert_eq!(tiny.lease, amount(1, 1));
        assert_eq!(tiny.low_water, Amount::ZERO);
        let never = LeasePlan::new(
            amount(100_000, 1_000),
            LeasePolicy {
                fraction: 0.01,
                low_water: 0.0,
            },
        );
        assert_eq!(never.low_water, Amount::ZERO);
        let none = LeasePlan::new(Amount::ZERO, policy);
        assert_eq!((none.lease, none.low_water), (Amount::ZERO, Amount::ZERO));
        for fraction in [f64::NAN, -1.0, 0.0, 2.0, f64::INFINITY] {
            let plan = LeasePlan::new(
                amount(50, 5),
                LeasePolicy {
                    fraction,
                    low_water: fraction,
                },
            );
            assert!(plan.lease.fits_in(amount(50, 5)), "{fraction}");
            assert!(amount(1, 1).fits_in(plan.lease), "{fraction}");
            assert!(plan
                .low_water
                .fits_in(plan.lease.saturating_sub(amount(1, 1))));
        }
        for tokens in 0..300u64 {
            let plan = LeasePlan::new(amount(tokens, 0), policy);
            assert_eq!(plan.lease.tokens, tokens.div_ceil(100), "{tokens}");
        }
    }

    #[test]
    fn a_refill_tops_the_lease_up_once_it_is_below_the_mark() {
        let plan = LeasePlan {
            lease: amount(100, 10),
            low_water: amount(50, 5),
        };
        for tokens in 0..=120u64 {
            for calls in 0..=12u64 {
                let left = amount(tokens, calls);
                let ask = plan.refill(left);
                if tokens < 50 || calls < 5 {
                    let ask = ask.expect("below the mark");
                    assert_eq!(ask.want, plan.lease.saturating_sub(left));
                    assert_eq!(ask.min, Amount::ZERO);
                    assert!(left.clamped_add(ask.want).fits_in(plan.lease.max(left)));
                } else {
                    assert_eq!(ask, None, "{left:?}");
                }
            }
        }
    }

    #[test]
    fn a_request_asks_for_what_it_lacks_and_a_large_one_for_exactly_that() {
        let plan = LeasePlan {
            lease: amount(100, 10),
            low_water: amount(50, 5),
        };
        for left in 0..=100u64 {
            for request in 0..=250u64 {
                let ask = plan.demand(amount(left, 0), amount(request, 1));
                let lacks = request.saturating_sub(left);
                assert_eq!(ask.min.tokens, lacks);
                if request > 100 {
                    assert_eq!(ask.want.tokens, lacks, "exactly what it needs");
                } else {
                    assert_eq!(ask.want.tokens, lacks.max(100 - left));
                    // Granted in full, the request fits and a full lease
                    // remains or less.
                    assert!(left + ask.want.tokens >= request);
                    assert!(left + ask.want.tokens - request <= 100);
                }
                assert_eq!(ask.min.calls, 1, "no calls left: it lacks one");
            }
        }
    }

    #[test]
    fn a_node_trims_only_what_piles_up_beyond_two_leases() {
        let plan = LeasePlan {
            lease: amount(100, 10),
            low_water: amount(50, 5),
        };
        assert_eq!(plan.excess(amount(200, 20)), Amount::ZERO);
        assert_eq!(plan.excess(amount(201, 21)), amount(101, 11));
        assert_eq!(plan.excess(amount(5_000, 0)), amount(4_900, 0));
    }

    #[test]
    fn a_closed_window_gives_back_the_unused_lease_and_charges_overuse() {
        assert_eq!(
            close_window(amount(100, 10), amount(70, 10), amount(100, 10)),
            Close {
                give: amount(30, 0),
                force: Amount::ZERO
            }
        );
        assert_eq!(
            close_window(amount(100, 10), amount(130, 9), amount(100, 10)),
            Close {
                give: amount(0, 1),
                force: amount(30, 0)
            }
        );
        // The local limit includes a fail-open allowance the server has not
        // heard of: never give back more than the server holds.
        assert_eq!(
            close_window(amount(100, 10), Amount::ZERO, amount(40, 4)).give,
            amount(40, 4)
        );
    }

    #[test]
    fn the_allowance_covers_what_is_lacking_and_never_more_than_it_holds() {
        let allowance = amount(50, 5);
        for used in 0..=50u64 {
            for lacks in 0..=60u64 {
                let ask = Ask {
                    want: amount(lacks.max(20), 2),
                    min: amount(lacks, 1),
                };
                let got = allowance_grant(ask, amount(used, 0), allowance);
                match got {
                    Some(g) => {
                        assert!(used + g.tokens <= 50);
                        assert!(g.tokens >= lacks);
                    }
                    None => assert!(used + lacks > 50, "{used} {lacks}"),
                }
            }
        }
        assert_eq!(
            allowance_grant(
                Ask {
                    want: amount(1, 1),
                    min: amount(0, 1)
                },
                amount(0, 5),
                allowance
            ),
            None
        );
    }

    #[test]
    fn the_allowance_is_the_fraction_rounded_down_and_never_more_than_the_budget() {
        assert_eq!(allowance(amount(1_000, 10), 0.05), amount(50, 0));
        assert_eq!(allowance(amount(1_000, 10), 0.0), Amount::ZERO);
        assert_eq!(allowance(amount(1_000, 10), f64::NAN), Amount::ZERO);
        assert_eq!(allowance(amount(1_000, 10), 7.0), amount(1_000, 10));
        assert_eq!(allowance(amount(u64::MAX, 3), 1.0), amount(MAX_COUNT, 3));
    }

    #[test]
    fn an_agent_is_idle_once_no_tick_saw_it_touched_for_the_whole_span() {
        let mut activity = Activity::new(1_000);
        let idle_after = Duration::from_millis(500);
        assert!(!activity.is_idle(1_499, idle_after));
        assert!(activity.is_idle(1_500, idle_after));
        activity.observe(true, 1_400);
        assert!(!activity.is_idle(1_899, idle_after));
        activity.observe(false, 1_950);
        assert!(activity.is_idle(1_950, idle_after));
        // An older observation never moves it back.
        activity.observe(true, 1_000);
        assert!(activity.is_idle(1_950, idle_after));
        // Never active is idle, at any time.
        let mut never = Activity::default();
        assert!(never.is_idle(0, idle_after));
        never.observe(false, 10);
        assert!(never.is_idle(10, idle_after));
        never.observe(true, 10);
        assert!(!never.is_idle(10, idle_after));
    }

    #[test]
    fn the_server_clock_is_read_from_the_middle_of_the_shortest_round_trips() {
        let mut clock = ServerClock::default();
        assert_eq!(clock.server_ms(5), None);
        clock.observe(100, 110, 10_000);
        assert_eq!(clock.server_ms(105), Some(10_000));
        // A much slower round trip is not trusted.
        clock.observe(200, 300, 99_999);
        assert_eq!(clock.server_ms(205), Some(10_100));
        // A fast one is.
        clock.observe(400, 402, 20_000);
        assert_eq!(clock.server_ms(401), Some(20_000));
        // A reply "before" the request (a clock read backwards) is a zero
        // round trip, and a server behind the node never goes below zero.
        clock.observe(500, 499, 0);
        assert_eq!(clock.server_ms(0), Some(0));
    }
}
