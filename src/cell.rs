//! One agent's state for the lock-free manager: a packed 128-bit usage word
//! updated by compare-and-swap, a packed 128-bit policy word beside it, and,
//! for the few agents that need it, what those cannot say in an atomically
//! swapped snapshot.
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
//! threads by the agent map's insertion (or an `Arc` handed over), and the
//! extra by arc-swap; each carries its own release/acquire pairing.

use crate::limit::{Configured, Limit};
use crate::rules::{
    Now, Policy, Refill, State, Tick, CALL_BITS, MAX_CALLS, MAX_TOKENS, TOKEN_BITS,
};
use crate::sync::{AtomicU128, Ordering, Snapshot};
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
const _: () = assert!(RETIRED.0 == (BUCKET_FLAG << 1) - 1);

/// Packs three fields into the word's layout. The rules keep every field
/// within its width; the masks only make a broken invariant visible in
/// tests (by a wrong value) instead of corrupting the neighbouring field.
fn pack_fields(tokens: u64, calls: u64, high: u64) -> u128 {
    debug_assert!(tokens <= MAX_TOKENS && calls <= MAX_CALLS && high <= RETIRED.0);
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

#[inline]
pub(crate) fn pack(state: State) -> u128 {
    pack_fields(state.tokens, state.calls, state.mark.0)
}

#[inline]
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

#[inline]
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

/// What the two words cannot say about an agent, kept only for the few
/// agents that need it: a configured limit the policy word does not give
/// back exactly (a budget beyond the fields, a window beyond 139 years, a
/// sub-millisecond period), and a parent.
#[derive(Debug)]
struct Extra {
    configured: Option<Configured>,
    parent: Option<AgentId>,
}

impl Extra {
    /// What `limit` needs beside the policy word, if anything.
    fn of(agent_id: AgentId, limit: &Limit) -> Option<Extra> {
        let derived = Configured::derived(agent_id, &limit.policy);
        let configured = (derived != limit.configured).then(|| limit.configured.clone());
        (configured.is_some() || limit.parent.is_some()).then_some(Extra {
            configured,
            parent: limit.parent,
        })
    }
}

/// The mark of a removed agent's state: past the last tick time can reach
/// ([`Tick::MAX`]), so no live state has it. An operation that finds it
/// treats the agent as unknown.
const RETIRED: Tick = Tick(Tick::MAX.0 + 1);

/// The state of one agent in the lock-free manager, shared through an
/// `Arc` by the agent map and by [`AgentHandle`](crate::AgentHandle)s.
///
/// The two words first, so a lookup's one cache line (usually) holds both;
/// the agent's id is the map's key, not repeated here; what the words cannot
/// say (see `Extra`) sits behind an optional arc-swap snapshot, empty for
/// nearly every agent. 48 bytes, in one 64-byte allocation with the `Arc`'s
/// counts.
#[repr(C)]
pub(crate) struct AgentCell {
    usage: AtomicU128,
    policy: AtomicU128,
    /// Distinguishes this cell from one made for the same agent after a
    /// `remove_budget`, so a reservation never settles into its successor.
    generation: u64,
    extra: Snapshot<Extra>,
}

#[cfg(not(agent_budget_loom))]
const _: () = assert!(std::mem::size_of::<AgentCell>() == 48);

impl AgentCell {
    pub(crate) fn new(agent_id: AgentId, limit: &Limit, state: State, generation: u64) -> Self {
        AgentCell {
            usage: AtomicU128::new(pack(state)),
            policy: AtomicU128::new(pack_policy(enforced(limit))),
            generation,
            extra: Snapshot::new(Extra::of(agent_id, limit)),
        }
    }

    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// The configured limit with its policy and parent, one consistent
    /// snapshot (the policy word is read after the extra, and `set_limit`
    /// stores them in the other order).
    pub(crate) fn limit(&self, agent_id: AgentId) -> Limit {
        let (configured, parent) = self.extra.read(|extra| {
            (
                extra.and_then(|e| e.configured.clone()),
                extra.and_then(|e| e.parent),
            )
        });
        let policy = self.enforced().policy;
        let configured = configured.unwrap_or_else(|| Configured::derived(agent_id, &policy));
        Limit::new(configured, parent)
    }

    /// The agent's parent, if it has one: only agents whose policy word
    /// says so need to ask.
    pub(crate) fn parent(&self) -> Option<AgentId> {
        self.extra.read(|extra| extra.and_then(|e| e.parent))
    }

    /// The policy the hot paths enforce: one 16-byte load, no pointer to
    /// follow.
    #[inline]
    pub(crate) fn enforced(&self) -> Enforced {
        // Acquire: pairs with the Release in `set_limit`, so the usage this
        // operation then loads is at least the conversion to this policy.
        unpack_policy(self.policy.load(Ordering::Acquire))
    }

    /// Replaces the limit (a new budget, a new kind of policy, or a new
    /// parent). A change that involves a bucket first converts the usage
    /// to the new policy at `now` (see `rules::State::convert`), then stores
    /// the extra and the policy word; an operation racing this call is
    /// judged against the old policy or the new one, never past the larger
    /// limit. Callers must not run two `set_limit`s on one cell at once
    /// (the manager serializes them), or the copies could end up from
    /// different calls.
    pub(crate) fn set_limit(&self, agent_id: AgentId, limit: &Limit, now: Now) {
        let old = self.enforced().policy;
        // SeqCst: may refund (a switch can make room); a no-op is not written.
        self.update(Ordering::SeqCst, |s| {
            (s.convert(&old, &limit.policy, now), ())
        });
        self.extra.store(Extra::of(agent_id, limit));
        // Release: see `enforced`.
        self.policy
            .store(pack_policy(enforced(limit)), Ordering::Release);
    }

    /// Marks the cell as removed, for good: from here on every operation
    /// that reaches it (through a handle, or a lookup that raced the
    /// removal) treats the agent as unknown. A store, which every later
    /// compare-and-swap on the word fails against.
    pub(crate) fn retire(&self) {
        // SeqCst: waiters must see it (see `wait::Waiters::wake`).
        self.usage
            .store(pack(State::fresh(RETIRED)), Ordering::SeqCst);
    }

    /// The state, unless the cell is retired.
    #[inline]
    pub(crate) fn load(&self) -> Option<State> {
        // Relaxed: see "Orderings" above; the word publishes nothing else.
        let state = unpack(self.usage.load(Ordering::Relaxed));
        (state.mark != RETIRED).then_some(state)
    }

    /// Applies `transition` until its result is stored without interference,
    /// unless the cell is retired (`None`).
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
    #[inline]
    pub(crate) fn update<R>(
        &self,
        order: Ordering,
        mut transition: impl FnMut(State) -> (State, R),
    ) -> Option<(State, State, R)> {
        // Relaxed: the compare-and-swap below reads the latest value anyway.
        let mut current = self.usage.load(Ordering::Relaxed);
        loop {
            let before = unpack(current);
            if before.mark == RETIRED {
                return None;
            }
            let (after, verdict) = transition(before);
            if after == before {
                return Some((before, after, verdict));
            }
            match self
                .usage
                .compare_exchange_weak(current, pack(after), order, Ordering::Relaxed)
            {
                Ok(_) => return Some((before, after, verdict)),
                Err(actual) => current = actual,
            }
        }
    }
}

fn enforced(limit: &Limit) -> Enforced {
    Enforced {
        policy: limit.policy,
        has_parent: limit.parent.is_some(),
    }
}

#[cfg(all(test, not(agent_budget_loom)))]
mod tests {
    use super::*;
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
            mark: RETIRED,
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
        let id = uuid::Uuid::nil();
        let cell = AgentCell::new(
            id,
            &Limit::new(Configured::Window(limit), None),
            State::fresh(Tick::ORIGIN),
            7,
        );
        let (before, after, verdict) = cell
            .update(Ordering::Relaxed, |w| (w, "unchanged"))
            .unwrap();
        assert_eq!((before, after, verdict), (before, before, "unchanged"));
        let (before, after, verdict) = cell
            .update(Ordering::SeqCst, |w| (State { tokens: 4, ..w }, 9))
            .unwrap();
        assert_eq!((before.tokens, after.tokens, verdict), (0, 4, 9));
        assert_eq!(cell.load().map(|s| s.tokens), Some(4));
        assert_eq!(cell.generation(), 7);
        // A retired cell refuses every transition and reads as nothing.
        cell.retire();
        assert_eq!(cell.load(), None);
        assert!(cell.update(Ordering::Relaxed, |w| (w, ())).is_none());
    }

    #[test]
    fn only_limits_the_policy_word_cannot_give_back_keep_an_extra() {
        let id = uuid::Uuid::from_u128(3);
        let window = |tokens, window_secs| BudgetLimit {
            agent_id: id,
            token_budget: tokens,
            calls_budget: 10,
            window_secs,
        };
        let plain = Limit::new(Configured::Window(window(1_000, 60)), None);
        assert!(Extra::of(id, &plain).is_none());
        assert!(Extra::of(id, &Limit::new(Configured::Window(window(0, 0)), None)).is_none());
        for exotic in [window(u64::MAX, 60), window(1_000, u64::MAX)] {
            let limit = Limit::new(Configured::Window(exotic.clone()), None);
            let cell = AgentCell::new(id, &limit, State::fresh(Tick::ORIGIN), 0);
            assert_eq!(cell.limit(id).configured, Configured::Window(exotic));
        }
        let refill = crate::types::RefillLimit {
            agent_id: id,
            token_budget: 5,
            calls_budget: 1,
            refill_period: std::time::Duration::from_micros(1_500),
        };
        let limit = Limit::new(Configured::Refill(refill.clone()), Some(id));
        let cell = AgentCell::new(id, &limit, State::fresh(Tick::ORIGIN), 0);
        let back = cell.limit(id);
        assert_eq!(
            (back.configured, back.parent),
            (Configured::Refill(refill), Some(id))
        );
        assert!(cell.enforced().has_parent);
    }
}
