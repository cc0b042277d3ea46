//! One agent's state for the lock-free manager: a packed 128-bit usage word
//! updated by compare-and-swap, a packed 128-bit policy word beside it, and
//! the configured limit in an atomically swapped snapshot.
//!
//! # The usage word
//!
//! ```text
//!  127                     84 83                52 51                      0
//! +-------------------------+--------------------+-------------------------+
//! |  time mark (44 bits)    |  calls (32 bits)   |    tokens (52 bits)     |
//! +-------------------------+--------------------+-------------------------+
//! ```
//!
//! Tokens, calls and the time mark (a window's start, or a bucket's refill
//! phase: see [`crate::rules`]) live in one word so that every transition
//! (admit both resources, roll the window over, refund) is a single
//! compare-and-swap: there is never a moment where tokens are taken but
//! calls are not, and nothing to roll back.
//!
//! # The policy word
//!
//! ```text
//!  127  126  125             84 83                52 51                      0
//! +----+----+-----------------+--------------------+-------------------------+
//! |kind|par.| period (42 bits)|  calls (32 bits)   |    tokens (52 bits)     |
//! +----+----+-----------------+--------------------+-------------------------+
//! ```
//!
//! The same layout, with the window's length or refill period where the
//! usage word has its mark, and two flags above it: `kind` (set for a
//! bucket) and `par.` (set when the agent has a parent, whose id is in the
//! limit snapshot: agents without one never load it).
//!
//! # Orderings
//!
//! The usage word is the whole of the agent's usage: no other memory is
//! published through it and nothing is read on the strength of having seen
//! it. Its loads, stores and compare-and-swaps are therefore `Relaxed`
//! (except that refunds are `SeqCst`, for waiting futures: see
//! `wait::Waiters::wake`). Exclusion comes from the atomicity of the
//! read-modify-write on one location (all of them are totally ordered in
//! its modification order, each reading the latest value), and a reader
//! ordered after a writer by some other happens-before edge (a join, a
//! channel) sees that write or a later one by read-write coherence.
//!
//! The policy word is stored with `Release` and loaded with `Acquire`: a
//! change of policy kind first converts the usage word (a compare-and-swap)
//! and then stores the policy, so an operation that sees the new policy
//! sees the converted usage too. The cell itself is published to other
//! threads by the agent map's insertion, and the limit by arc-swap; each
//! carries its own release/acquire pairing.

use crate::limit::Limit;
use crate::rules::{
    Now, Policy, Refill, State, Tick, CALL_BITS, MAX_CALLS, MAX_TOKENS, TOKEN_BITS,
};
use crate::sync::{AtomicU128, Keyed, Ordering, Snapshot};
use crate::types::AgentId;

const CALLS_SHIFT: u32 = TOKEN_BITS;
const HIGH_SHIFT: u32 = TOKEN_BITS + CALL_BITS;
const TOKEN_MASK: u128 = MAX_TOKENS as u128;
const CALL_MASK: u128 = MAX_CALLS as u128;
/// In the policy word's high field: set for a bucket.
const BUCKET_FLAG: u64 = 1 << 43;
/// In the policy word's high field: set when the agent has a parent.
const PARENT_FLAG: u64 = 1 << 42;
const PERIOD_MASK: u64 = PARENT_FLAG - 1;

const _: () = assert!(Policy::MAX_PERIOD == PERIOD_MASK);
const _: () = assert!(Tick::MAX.0 == (BUCKET_FLAG << 1) - 1);

/// Packs three fields into the word's layout. The rules keep every field
/// within its width; the masks only make a broken invariant visible in
/// tests (by a wrong value) instead of corrupting the neighbouring field.
fn pack_fields(tokens: u64, calls: u64, high: u64) -> u128 {
    debug_assert!(tokens <= MAX_TOKENS && calls <= MAX_CALLS && high <= Tick::MAX.0);
    (u128::from(tokens) & TOKEN_MASK)
        | ((u128::from(calls) & CALL_MASK) << CALLS_SHIFT)
        | (u128::from(high) << HIGH_SHIFT)
}

/// Unpacks the three fields. The casts truncate exactly the bits each mask
/// keeps.
fn unpack_fields(word: u128) -> (u64, u64, u64) {
    (
        (word & TOKEN_MASK) as u64,
        ((word >> CALLS_SHIFT) & CALL_MASK) as u64,
        (word >> HIGH_SHIFT) as u64,
    )
}

pub(crate) fn pack(state: State) -> u128 {
    pack_fields(state.tokens, state.calls, state.mark.0)
}

pub(crate) fn unpack(word: u128) -> State {
    let (tokens, calls, mark) = unpack_fields(word);
    State {
        tokens,
        calls,
        mark: Tick(mark),
    }
}

/// What the hot paths read of a limit: the policy, and whether there is a
/// parent to look up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Enforced {
    pub(crate) policy: Policy,
    pub(crate) has_parent: bool,
}

fn pack_policy(enforced: Enforced) -> u128 {
    let Enforced { policy, has_parent } = enforced;
    let mut high = policy.period;
    if policy.refill == Refill::Bucket {
        high |= BUCKET_FLAG;
    }
    if has_parent {
        high |= PARENT_FLAG;
    }
    pack_fields(policy.tokens, policy.calls, high)
}

fn unpack_policy(word: u128) -> Enforced {
    let (tokens, calls, high) = unpack_fields(word);
    let refill = if high & BUCKET_FLAG != 0 {
        Refill::Bucket
    } else {
        Refill::Window
    };
    Enforced {
        policy: Policy {
            tokens,
            calls,
            period: high & PERIOD_MASK,
            refill,
        },
        has_parent: high & PARENT_FLAG != 0,
    }
}

fn enforced(limit: &Limit) -> Enforced {
    Enforced {
        policy: limit.policy,
        has_parent: limit.parent.is_some(),
    }
}

/// The state of one agent in the lock-free manager: exactly one cache line.
///
/// The agent map stores the cell itself as its key (see `sync::AgentMap`),
/// so the id a lookup compares, the usage word and the policy word it then
/// reads all sit in the same 64 bytes; the configured limit and the parent,
/// which only reads of the whole state and chain walks need, sit behind an
/// arc-swap snapshot.
#[repr(C, align(64))]
pub(crate) struct AgentCell {
    agent_id: AgentId,
    usage: AtomicU128,
    policy: AtomicU128,
    /// Distinguishes this cell from one made for the same agent after a
    /// `remove_budget`, so a reservation never settles into its successor.
    generation: u64,
    limit: Snapshot<Limit>,
}

#[cfg(not(agent_budget_loom))]
const _: () = assert!(std::mem::size_of::<AgentCell>() == 64);

impl Keyed for AgentCell {
    fn key(&self) -> &AgentId {
        &self.agent_id
    }
}

impl AgentCell {
    pub(crate) fn new(limit: Limit, state: State, generation: u64) -> Self {
        AgentCell {
            agent_id: limit.configured.agent_id(),
            usage: AtomicU128::new(pack(state)),
            policy: AtomicU128::new(pack_policy(enforced(&limit))),
            limit: Snapshot::new(limit),
            generation,
        }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// The configured limit with its policy and parent, one consistent
    /// snapshot.
    pub(crate) fn limit(&self) -> impl std::ops::Deref<Target = Limit> {
        self.limit.load()
    }

    /// The policy the hot paths enforce: one 16-byte load, no pointer to
    /// follow.
    pub(crate) fn enforced(&self) -> Enforced {
        // Acquire: pairs with the Release in `set_limit`, so the usage this
        // operation then loads is at least the conversion to this policy.
        unpack_policy(self.policy.load(Ordering::Acquire))
    }

    /// Replaces the limit (a new budget, a new kind of policy, or a new
    /// parent). A change that involves a bucket first converts the usage
    /// to the new policy at `now` (see `rules::State::convert`), then stores
    /// the snapshot and the policy word; an operation racing this call is
    /// judged against the old policy or the new one, never past the larger
    /// limit. Callers must not run two `set_limit`s on one cell at once
    /// (the manager serializes them), or the copies could end up from
    /// different calls.
    pub(crate) fn set_limit(&self, limit: Limit, now: Now) {
        let old = self.limit.load().policy;
        // SeqCst: may refund (a switch can make room); a no-op is not written.
        self.update(Ordering::SeqCst, |s| {
            (s.convert(&old, &limit.policy, now), ())
        });
        let word = pack_policy(enforced(&limit));
        self.limit.store(limit);
        // Release: see `enforced`.
        self.policy.store(word, Ordering::Release);
    }

    pub(crate) fn load(&self) -> State {
        // Relaxed: see "Orderings" above; the word publishes nothing else.
        unpack(self.usage.load(Ordering::Relaxed))
    }

    /// Applies `transition` until its result is stored without interference.
    ///
    /// `transition` sees the current state and returns the next one with
    /// a verdict for the caller; returns the states before and after, and
    /// the verdict of the attempt that was stored. A transition that changes
    /// nothing is not written back: the load was its linearization point,
    /// and a hot agent's cache line stays shared between readers.
    ///
    /// `order` is the compare-and-swap's: `Relaxed` (see "Orderings"
    /// above) except for the transitions that give budget back, which
    /// are `SeqCst` to pair with waiting futures (see `wait::Waiters::wake`).
    pub(crate) fn update<R>(
        &self,
        order: Ordering,
        mut transition: impl FnMut(State) -> (State, R),
    ) -> (State, State, R) {
        // Relaxed: the compare-and-swap below reads the latest value anyway.
        let mut current = self.usage.load(Ordering::Relaxed);
        loop {
            let before = unpack(current);
            let (after, verdict) = transition(before);
            if after == before {
                return (before, after, verdict);
            }
            match self
                .usage
                .compare_exchange_weak(current, pack(after), order, Ordering::Relaxed)
            {
                Ok(_) => return (before, after, verdict),
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(all(test, not(agent_budget_loom)))]
mod tests {
    use super::*;
    use crate::limit::Configured;
    use crate::types::BudgetLimit;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn policies_pack_and_unpack_over_the_full_ranges(
            tokens in 0..=MAX_TOKENS,
            calls in 0..=MAX_CALLS,
            period in 1..=Policy::MAX_PERIOD,
            bucket in any::<bool>(),
            has_parent in any::<bool>(),
        ) {
            let refill = if bucket { Refill::Bucket } else { Refill::Window };
            let enforced = Enforced { policy: Policy { tokens, calls, period, refill }, has_parent };
            prop_assert_eq!(unpack_policy(pack_policy(enforced)), enforced);
        }

        #[test]
        fn pack_and_unpack_are_inverse_over_the_full_ranges(
            tokens in 0..=MAX_TOKENS,
            calls in 0..=MAX_CALLS,
            mark in 0..=Tick::MAX.0,
        ) {
            let state = State { tokens, calls, mark: Tick(mark) };
            prop_assert_eq!(unpack(pack(state)), state);
        }
    }

    #[test]
    fn the_extremes_do_not_bleed_into_neighbours() {
        let full = State {
            tokens: MAX_TOKENS,
            calls: MAX_CALLS,
            mark: Tick::MAX,
        };
        assert_eq!(pack(full), u128::MAX);
        for state in [
            State {
                tokens: MAX_TOKENS,
                calls: 0,
                mark: Tick(0),
            },
            State {
                tokens: 0,
                calls: MAX_CALLS,
                mark: Tick(0),
            },
            State {
                tokens: 0,
                calls: 0,
                mark: Tick::MAX,
            },
        ] {
            assert_eq!(unpack(pack(state)), state);
        }
    }

    #[test]
    fn update_stores_the_transition_and_returns_its_verdict() {
        let limit = BudgetLimit {
            agent_id: uuid::Uuid::nil(),
            token_budget: 10,
            calls_budget: 1,
            window_secs: 1,
        };
        let cell = AgentCell::new(
            Limit::new(Configured::Window(limit), None),
            State::fresh(Tick::ORIGIN),
            7,
        );
        let (before, after, verdict) = cell.update(Ordering::Relaxed, |w| (w, "unchanged"));
        assert_eq!((before, after, verdict), (before, before, "unchanged"));
        let (before, after, verdict) =
            cell.update(Ordering::SeqCst, |w| (State { tokens: 4, ..w }, 9));
        assert_eq!((before.tokens, after.tokens, verdict), (0, 4, 9));
        assert_eq!(cell.load().tokens, 4);
        assert_eq!(cell.generation(), 7);
    }
}
