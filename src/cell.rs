//! One agent's state for the lock-free manager: a packed 128-bit usage word
//! updated by compare-and-swap, a packed 128-bit policy word beside it, and
//! the configured limit in an atomically swapped snapshot.
//!
//! # The usage word
//!
//! ```text
//!  127                     84 83                52 51                      0
//! +-------------------------+--------------------+-------------------------+
//! |  window start (44 bits) |  calls (32 bits)   |    tokens (52 bits)     |
//! +-------------------------+--------------------+-------------------------+
//! ```
//!
//! Tokens, calls and the window they belong to live in one word so that
//! every transition of [`crate::window`] (admit both resources, roll the
//! window over, refund into one named window) is a single compare-and-swap:
//! there is never a moment where tokens are taken but calls are not, and
//! nothing to roll back.
//!
//! The policy word has the same layout, with the window's length where the
//! usage word has its start.
//!
//! # Orderings
//!
//! The usage word is the whole of the agent's usage, and the policy word the
//! whole of its policy: no other memory is published through either and
//! nothing is read on the strength of having seen them. Their loads, stores
//! and compare-and-swaps are therefore `Relaxed`. Exclusion comes
//! from the atomicity of the read-modify-write on one location (all of
//! them are totally ordered in its modification order, each reading the
//! latest value), and a reader ordered after a writer by some other
//! happens-before edge (a join, a channel) sees that write or a later one
//! by read-write coherence. The cell itself is published to other threads
//! by the agent map's insertion, and the limit by arc-swap; each carries
//! its own release/acquire pairing.

use crate::sync::{AtomicU128, Keyed, Ordering, Snapshot};
use crate::types::{AgentId, BudgetLimit};
use crate::window::{Policy, Tick, Window, CALL_BITS, MAX_CALLS, MAX_TOKENS, TOKEN_BITS};

const CALLS_SHIFT: u32 = TOKEN_BITS;
const HIGH_SHIFT: u32 = TOKEN_BITS + CALL_BITS;
const TOKEN_MASK: u128 = MAX_TOKENS as u128;
const CALL_MASK: u128 = MAX_CALLS as u128;

/// Packs three fields into the word's layout. The window module keeps every
/// field within its width; the masks only make a broken invariant visible in
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

pub(crate) fn pack(window: Window) -> u128 {
    pack_fields(window.tokens, window.calls, window.start.0)
}

pub(crate) fn unpack(word: u128) -> Window {
    let (tokens, calls, start) = unpack_fields(word);
    Window {
        tokens,
        calls,
        start: Tick(start),
    }
}

/// A policy packs into the same layout: tokens and calls in the same
/// fields, the window length where the usage word has its start (both are
/// at most 2^44 − 1 ms).
fn pack_policy(policy: Policy) -> u128 {
    pack_fields(policy.tokens, policy.calls, policy.window)
}

fn unpack_policy(word: u128) -> Policy {
    let (tokens, calls, window) = unpack_fields(word);
    Policy {
        tokens,
        calls,
        window,
    }
}

/// A limit as configured, with the policy derived from it once.
#[derive(Debug)]
pub(crate) struct Limit {
    pub(crate) configured: BudgetLimit,
    pub(crate) policy: Policy,
}

impl Limit {
    pub(crate) fn new(configured: BudgetLimit) -> Self {
        let policy = Policy::from_limit(&configured);
        Limit { configured, policy }
    }
}

/// The state of one agent in the lock-free manager: exactly one cache line.
///
/// The agent map stores the cell itself as its key (see `sync::AgentMap`),
/// so the id a lookup compares, the usage word and the policy word it then
/// reads all sit in the same 64 bytes; the configured limit, which only the
/// reads of the whole state need, sits behind an arc-swap snapshot.
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
    pub(crate) fn new(limit: BudgetLimit, window: Window, generation: u64) -> Self {
        let limit = Limit::new(limit);
        AgentCell {
            agent_id: limit.configured.agent_id,
            usage: AtomicU128::new(pack(window)),
            policy: AtomicU128::new(pack_policy(limit.policy)),
            limit: Snapshot::new(limit),
            generation,
        }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// The configured limit with its policy, one consistent snapshot.
    pub(crate) fn limit(&self) -> impl std::ops::Deref<Target = Limit> {
        self.limit.load()
    }

    /// The policy the hot paths enforce: one 16-byte load, no pointer to
    /// follow.
    pub(crate) fn policy(&self) -> Policy {
        // Relaxed: the word is the whole policy and publishes nothing else.
        unpack_policy(self.policy.load(Ordering::Relaxed))
    }

    /// Replaces the limit. The snapshot and the policy word change one
    /// after the other, so an operation racing this call may be judged
    /// against the old policy or the new one: the one documented exception
    /// to linearizability, and never past the larger limit. Callers must
    /// not run two `set_limit`s on one cell at once (the manager serializes
    /// them), or the two copies could end up from different calls.
    pub(crate) fn set_limit(&self, limit: BudgetLimit) {
        let limit = Limit::new(limit);
        let policy = pack_policy(limit.policy);
        self.limit.store(limit);
        // Relaxed: see `policy`.
        self.policy.store(policy, Ordering::Relaxed);
    }

    pub(crate) fn load(&self) -> Window {
        // Relaxed: see "Orderings" above; the word publishes nothing else.
        unpack(self.usage.load(Ordering::Relaxed))
    }

    /// Applies `transition` until its result is stored without interference.
    ///
    /// `transition` sees the current window and returns the next one with
    /// a verdict for the caller; returns the windows before and after, and
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
        mut transition: impl FnMut(Window) -> (Window, R),
    ) -> (Window, Window, R) {
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
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn policies_pack_and_unpack_over_the_full_ranges(
            tokens in 0..=MAX_TOKENS,
            calls in 0..=MAX_CALLS,
            window in 1..=Policy::MAX_WINDOW,
        ) {
            let policy = Policy { tokens, calls, window };
            prop_assert_eq!(unpack_policy(pack_policy(policy)), policy);
        }

        #[test]
        fn pack_and_unpack_are_inverse_over_the_full_ranges(
            tokens in 0..=MAX_TOKENS,
            calls in 0..=MAX_CALLS,
            start in 0..=Tick::MAX.0,
        ) {
            let window = Window { tokens, calls, start: Tick(start) };
            prop_assert_eq!(unpack(pack(window)), window);
        }
    }

    #[test]
    fn the_extremes_do_not_bleed_into_neighbours() {
        let full = Window {
            tokens: MAX_TOKENS,
            calls: MAX_CALLS,
            start: Tick::MAX,
        };
        assert_eq!(pack(full), u128::MAX);
        for window in [
            Window {
                tokens: MAX_TOKENS,
                calls: 0,
                start: Tick(0),
            },
            Window {
                tokens: 0,
                calls: MAX_CALLS,
                start: Tick(0),
            },
            Window {
                tokens: 0,
                calls: 0,
                start: Tick::MAX,
            },
        ] {
            assert_eq!(unpack(pack(window)), window);
        }
    }

    #[test]
    fn update_stores_the_transition_and_returns_its_verdict() {
        let cell = AgentCell::new(
            BudgetLimit {
                agent_id: uuid::Uuid::nil(),
                token_budget: 10,
                calls_budget: 1,
                window_secs: 1,
            },
            Window::fresh(Tick::ORIGIN),
            7,
        );
        let (before, after, verdict) = cell.update(Ordering::Relaxed, |w| (w, "unchanged"));
        assert_eq!((before, after, verdict), (before, before, "unchanged"));
        let (before, after, verdict) =
            cell.update(Ordering::SeqCst, |w| (Window { tokens: 4, ..w }, 9));
        assert_eq!((before.tokens, after.tokens, verdict), (0, 4, 9));
        assert_eq!(cell.load().tokens, 4);
        assert_eq!(cell.generation(), 7);
    }
}
