//! One agent's state for the lock-free manager: a packed usage word updated
//! by compare-and-swap, a packed policy word beside it, the agent's id and
//! incarnation, and, for the few agents that need it, what those cannot say.
//!
//! A cell comes in one of two widths, chosen per agent from its limit:
//!
//! - **narrow** (40 bytes, 64-bit words): a fixed window whose budget fits
//!   ([`Narrow::MAX_TOKENS`] tokens, [`Narrow::MAX_CALLS`] calls, a window
//!   under 24.8 days), without a parent. The common case, and the cheap one:
//!   a 64-bit compare-and-swap is one `lock cmpxchg` (2.4 ns on the
//!   benchmark machine), where a 128-bit one is a run-time-dispatched
//!   `cmpxchg16b` (9 ns).
//! - **wide** (64 bytes, one cache line, 128-bit words): everything else,
//!   buckets and chains included.
//!
//! A cell never changes width in place: the registry replaces it (see
//! `registry`), so no byte is ever accessed both as a 64-bit and as a
//! 128-bit atomic.
//!
//! # The wide usage word
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
//! calls are not, and nothing to roll back. The mark's last value is a
//! sentinel: a cell that was removed (`RETIRED`) or replaced by one of the
//! other width (`MOVED`, with the new slot in the calls field).
//!
//! # The wide policy word
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
//! extra snapshot: agents without one never load it). A period of zero,
//! which no window or bucket has, marks a calendar window: a UTC day, or
//! with `kind` set a UTC month (calendar windows are always wide).
//!
//! # The narrow words
//!
//! ```text
//!  63                            32 31          22 21                     0
//! +-------------------------------+--------------+------------------------+
//! |  window start mod 2^32 (ms)   | calls (10)   |     tokens (22 bits)   |
//! +-------------------------------+--------------+------------------------+
//!  63                            32 31          22 21                     0
//! +-------------------------------+--------------+------------------------+
//! |  window length (ms)           | call limit   |     token limit        |
//! +-------------------------------+--------------+------------------------+
//! ```
//!
//! The start is kept to the millisecond, modulo 2^32 (49.7 days), and read
//! back against the operation's clock reading: a live window started less
//! than its length ago, and its length is under 2^31 ms, so the difference
//! names it exactly. A reading earlier than the start (a clock read before
//! another thread's rollover) would look like a start 49 days ago; a
//! difference of 2^31 or more is therefore read again against a fresh clock,
//! which comes after every start stored so far (see `Narrow::decode`). What
//! modular time cannot tell apart is a window last touched exactly k × 2^32
//! ms ago, give or take its length: after 49.7 idle days, an agent may find
//! its old window's usage still counted for up to one window. That only
//! ever makes a window stricter; `docs::implementation` weighs it against a
//! window *index* modulo 2^16, the other layout that fits in 64 bits. The
//! calls field's all-ones value marks the sentinels.
//!
//! # Orderings
//!
//! The usage word is the whole of the agent's usage. Its compare-and-swaps
//! are `Relaxed` where nothing else rides on them (a narrow word's are
//! `Release`, see `Narrow::compare_exchange_weak`), except that refunds are
//! `SeqCst` (for waiting futures: see `wait::Waiters::wake`), and its loads
//! are `Acquire`:
//! a handle, or a reservation, checks the cell's incarnation *after* loading
//! the word, and the registry stores a reused slot's incarnation before its
//! first usage word (`Release`), so a word that belongs to the slot's next
//! occupant is always seen with that occupant's incarnation. On x86-64 an
//! `Acquire` load is a plain load.
//!
//! The policy word is stored with `Release` and loaded with `Acquire`: a
//! change of policy kind first converts the usage word (a compare-and-swap)
//! and then stores the policy, so an operation that sees the new policy
//! sees the converted usage too. The cell itself is published by the
//! registry's index entry (`Release`, loaded with `Acquire`).

use crate::limit::{Configured, Limit};
use crate::rules::{
    Now, Policy, Refill, State, Tick, CALL_BITS, MAX_CALLS, MAX_TOKENS, TOKEN_BITS,
};
use crate::sync::{AtomicU128, AtomicU64, Ordering, Published, Snapshot};
use crate::types::{AgentId, CalendarPeriod};

/// What a usage word holds: a state, or one of the sentinels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Word {
    /// The agent's usage.
    Live(State),
    /// The agent was removed (or the slot is free): it is unknown.
    Retired,
    /// The cell was replaced by one of the other width, at this slot.
    Moved(u32),
}

/// Kinds of sentinel, in the tokens field of a sentinel word.
const SENTINEL_RETIRED: u64 = 0;
const SENTINEL_MOVED: u64 = 1;

/// What the hot paths read of a limit: the policy, and whether there is a
/// parent to look up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Enforced {
    pub(crate) policy: Policy,
    pub(crate) has_parent: bool,
}

impl Enforced {
    pub(crate) fn of(limit: &Limit) -> Self {
        Enforced {
            policy: limit.policy,
            has_parent: limit.parent.is_some(),
        }
    }
}

/// What the two words cannot say about an agent, kept only for the few
/// (wide) agents that need it: a configured limit the policy word does not
/// give back exactly (a budget beyond the fields, a window beyond 139
/// years, a sub-millisecond period), and a parent.
#[derive(Debug)]
pub(crate) struct Extra {
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

/// A cell's width: how its words are laid out and accessed.
pub(crate) trait Layout: Sized + Send + Sync + 'static {
    /// The raw word.
    type Raw: Copy + Eq + std::fmt::Debug;
    /// The atomic that holds it.
    type Atomic: Send + Sync;
    /// What beside the words the cell keeps: an [`Extra`] snapshot, or
    /// nothing.
    type Side: Send + Sync;

    fn atomic(raw: Self::Raw) -> Self::Atomic;
    /// The raw word in a `u128` (a narrow one in the low half), so code
    /// that handles both widths has one loop.
    fn to_wide(raw: Self::Raw) -> u128;
    fn from_wide(raw: u128) -> Self::Raw;
    fn load(word: &Self::Atomic, order: Ordering) -> Self::Raw;
    fn store(word: &Self::Atomic, raw: Self::Raw, order: Ordering);
    fn compare_exchange_weak(
        word: &Self::Atomic,
        current: Self::Raw,
        new: Self::Raw,
        success: Ordering,
    ) -> Result<Self::Raw, Self::Raw>;

    /// `state` packed, or `None` if a field does not fit.
    fn encode(state: State) -> Option<Self::Raw>;
    /// The word read at `now`; `fresh` reads the clock again, for the
    /// narrow word's one ambiguous case.
    fn decode(raw: Self::Raw, now: Now, fresh: &dyn Fn() -> Now) -> Word;
    fn sentinel(word: Word) -> Self::Raw;

    /// The policy packed, or `None` if it does not fit this width.
    fn encode_policy(enforced: Enforced) -> Option<Self::Raw>;
    fn decode_policy(raw: Self::Raw) -> Enforced;

    fn side(agent_id: AgentId, limit: &Limit) -> Self::Side;
    fn store_side(side: &Self::Side, agent_id: AgentId, limit: &Limit);
    /// The configured limit and parent kept beside the words, if any.
    fn read_side(side: &Self::Side) -> (Option<Configured>, Option<AgentId>);
}

/// The 128-bit layout: every limit and state the crate can enforce.
pub(crate) struct Wide;

const CALLS_SHIFT: u32 = TOKEN_BITS;
const HIGH_SHIFT: u32 = TOKEN_BITS + CALL_BITS;
const TOKEN_MASK: u128 = MAX_TOKENS as u128;
const CALL_MASK: u128 = MAX_CALLS as u128;
/// In the policy word's high field: set for a bucket.
const BUCKET_FLAG: u64 = 1 << 43;
/// In the policy word's high field: set when the agent has a parent.
const PARENT_FLAG: u64 = 1 << 42;
const PERIOD_MASK: u64 = PARENT_FLAG - 1;
/// The wide mark that marks a sentinel: one past the last tick time can
/// reach ([`Tick::MAX`]), so no live state has it.
const WIDE_SENTINEL_MARK: u64 = Tick::MAX.0 + 1;

const _: () = assert!(Policy::MAX_PERIOD == PERIOD_MASK);
const _: () = assert!(WIDE_SENTINEL_MARK == (BUCKET_FLAG << 1) - 1);

/// Packs three fields into the wide layout. The rules keep every field
/// within its width; the masks only make a broken invariant visible in
/// tests (by a wrong value) instead of corrupting the neighbouring field.
fn pack_wide(tokens: u64, calls: u64, high: u64) -> u128 {
    debug_assert!(tokens <= MAX_TOKENS && calls <= MAX_CALLS && high <= WIDE_SENTINEL_MARK);
    (u128::from(tokens) & TOKEN_MASK)
        | ((u128::from(calls) & CALL_MASK) << CALLS_SHIFT)
        | (u128::from(high) << HIGH_SHIFT)
}

/// Unpacks the three fields. The casts truncate exactly the bits each mask
/// keeps.
fn unpack_wide(word: u128) -> (u64, u64, u64) {
    (
        (word & TOKEN_MASK) as u64,
        ((word >> CALLS_SHIFT) & CALL_MASK) as u64,
        (word >> HIGH_SHIFT) as u64,
    )
}

impl Layout for Wide {
    type Raw = u128;
    type Atomic = AtomicU128;
    type Side = Snapshot<Extra>;

    #[inline]
    fn atomic(raw: u128) -> AtomicU128 {
        AtomicU128::new(raw)
    }
    #[inline(always)]
    fn to_wide(raw: u128) -> u128 {
        raw
    }
    #[inline(always)]
    fn from_wide(raw: u128) -> u128 {
        raw
    }
    #[inline]
    fn load(word: &AtomicU128, order: Ordering) -> u128 {
        word.load(order)
    }
    #[inline]
    fn store(word: &AtomicU128, raw: u128, order: Ordering) {
        word.store(raw, order)
    }
    #[inline]
    fn compare_exchange_weak(
        word: &AtomicU128,
        current: u128,
        new: u128,
        success: Ordering,
    ) -> Result<u128, u128> {
        word.compare_exchange_weak(current, new, success, Ordering::Acquire)
    }

    #[inline]
    fn encode(state: State) -> Option<u128> {
        Some(pack_wide(state.tokens, state.calls, state.mark.0))
    }

    #[inline(always)]
    fn decode(raw: u128, _: Now, _: &dyn Fn() -> Now) -> Word {
        let (tokens, calls, mark) = unpack_wide(raw);
        if mark != WIDE_SENTINEL_MARK {
            return Word::Live(State {
                tokens,
                calls,
                mark: Tick(mark),
            });
        }
        match tokens {
            SENTINEL_MOVED => Word::Moved(calls as u32),
            _ => Word::Retired,
        }
    }

    fn sentinel(word: Word) -> u128 {
        let (kind, slot) = match word {
            Word::Moved(slot) => (SENTINEL_MOVED, u64::from(slot)),
            Word::Retired | Word::Live(_) => (SENTINEL_RETIRED, 0),
        };
        pack_wide(kind, slot, WIDE_SENTINEL_MARK)
    }

    fn encode_policy(enforced: Enforced) -> Option<u128> {
        let Enforced { policy, has_parent } = enforced;
        // Windows and buckets last at least a tick: a period of zero
        // names a calendar window, the kind flag its day or month.
        let mut high = match policy.refill {
            Refill::Window => policy.period.max(1),
            Refill::Bucket => policy.period.max(1) | BUCKET_FLAG,
            Refill::Calendar(CalendarPeriod::Day) => 0,
            Refill::Calendar(CalendarPeriod::Month) => BUCKET_FLAG,
        };
        if has_parent {
            high |= PARENT_FLAG;
        }
        Some(pack_wide(policy.tokens, policy.calls, high))
    }

    #[inline]
    fn decode_policy(raw: u128) -> Enforced {
        let (tokens, calls, high) = unpack_wide(raw);
        let refill = match (high & PERIOD_MASK == 0, high & BUCKET_FLAG != 0) {
            (false, false) => Refill::Window,
            (false, true) => Refill::Bucket,
            (true, false) => Refill::Calendar(CalendarPeriod::Day),
            (true, true) => Refill::Calendar(CalendarPeriod::Month),
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

    fn side(agent_id: AgentId, limit: &Limit) -> Snapshot<Extra> {
        Snapshot::new(Extra::of(agent_id, limit))
    }

    fn store_side(side: &Snapshot<Extra>, agent_id: AgentId, limit: &Limit) {
        side.store(Extra::of(agent_id, limit));
    }

    fn read_side(side: &Snapshot<Extra>) -> (Option<Configured>, Option<AgentId>) {
        side.read(|extra| {
            (
                extra.and_then(|e| e.configured.clone()),
                extra.and_then(|e| e.parent),
            )
        })
    }
}

/// The 64-bit layout: fixed windows with small budgets and no parent.
pub(crate) struct Narrow;

const NARROW_TOKEN_BITS: u32 = 22;
const NARROW_CALL_BITS: u32 = 10;
const NARROW_MARK_SHIFT: u32 = 32;
const NARROW_TOKEN_MASK: u64 = (1 << NARROW_TOKEN_BITS) - 1;
const NARROW_CALL_MASK: u64 = (1 << NARROW_CALL_BITS) - 1;
/// The calls field of a narrow sentinel: its all-ones value, which no
/// state holds.
const NARROW_SENTINEL_CALLS: u64 = NARROW_CALL_MASK;
/// Half the mark's range: a live window is younger, and any start read
/// against a fresh clock is at most about a millisecond in its future.
const NARROW_HALF_RANGE: u32 = 1 << 31;

impl Narrow {
    /// The most tokens a narrow word counts: 2^22 − 1, about 4.2 million.
    pub(crate) const MAX_TOKENS: u64 = NARROW_TOKEN_MASK;
    /// The most calls a narrow word counts: 2^10 − 2 (the all-ones value
    /// marks sentinels).
    pub(crate) const MAX_CALLS: u64 = NARROW_SENTINEL_CALLS - 1;
    /// The longest narrow window, in milliseconds: under 2^31 (24.8 days),
    /// so a live window's start is always the unambiguous one.
    pub(crate) const MAX_PERIOD: u64 = (NARROW_HALF_RANGE - 1) as u64;

    /// Whether an agent on `limit` may live in a narrow cell: a fixed
    /// window within the narrow fields, no parent, and a configured limit
    /// the policy word gives back exactly (nothing kept beside it).
    pub(crate) fn fits(agent_id: AgentId, limit: &Limit) -> bool {
        let policy = &limit.policy;
        policy.refill == Refill::Window
            && limit.parent.is_none()
            && policy.tokens <= Self::MAX_TOKENS
            && policy.calls <= Self::MAX_CALLS
            && policy.period <= Self::MAX_PERIOD
            && Configured::derived(agent_id, policy) == limit.configured
    }

    fn pack(tokens: u64, calls: u64, high: u32) -> u64 {
        (tokens & NARROW_TOKEN_MASK)
            | ((calls & NARROW_CALL_MASK) << NARROW_TOKEN_BITS)
            | (u64::from(high) << NARROW_MARK_SHIFT)
    }

    fn unpack(raw: u64) -> (u64, u64, u32) {
        (
            raw & NARROW_TOKEN_MASK,
            (raw >> NARROW_TOKEN_BITS) & NARROW_CALL_MASK,
            (raw >> NARROW_MARK_SHIFT) as u32,
        )
    }
}

/// The full mark whose low 32 bits are `low`, nearest `reference`: at most
/// 2^31 − 1 ms before it, or (for `Some(ahead)`) at most `ahead` after it.
fn unwrap_mark(low: u32, reference: Tick, ahead: Option<u32>) -> Option<Tick> {
    let behind = (reference.0 as u32).wrapping_sub(low);
    if behind < NARROW_HALF_RANGE {
        return Some(Tick(reference.0 - u64::from(behind)));
    }
    let forward = low.wrapping_sub(reference.0 as u32);
    match ahead {
        Some(ahead) if forward <= ahead => Some(Tick(reference.0 + u64::from(forward))),
        Some(_) => Some(Tick(reference.0 - u64::from(behind))),
        None => None,
    }
}

/// How far in the future of a fresh clock reading a stored start can be:
/// starts are rounded up to the next millisecond, and the coarse clock
/// moves in steps of its upkeep interval. Anything further is read as old.
const NARROW_AHEAD_MS: u32 = 1 << 10;

impl Layout for Narrow {
    type Raw = u64;
    type Atomic = AtomicU64;
    type Side = ();

    #[inline]
    fn atomic(raw: u64) -> AtomicU64 {
        AtomicU64::new(raw)
    }
    #[inline(always)]
    fn to_wide(raw: u64) -> u128 {
        u128::from(raw)
    }
    #[inline(always)]
    fn from_wide(raw: u128) -> u64 {
        raw as u64
    }
    #[inline]
    fn load(word: &AtomicU64, order: Ordering) -> u64 {
        word.load(order)
    }
    #[inline]
    fn store(word: &AtomicU64, raw: u64, order: Ordering) {
        word.store(raw, order)
    }
    /// At least `Release`: a narrow word's start is read back against a
    /// clock reading that must come after the clock read that stored it
    /// (see `decode`), and that edge is this store's `Release` and the
    /// next load's `Acquire`. (loom found the interleaving without it: a
    /// `Relaxed` rollover, then a thread whose fresh clock reading was
    /// still older than the rollover's start took it for a 49-day-old
    /// window and rolled it over again.) Free on x86-64.
    #[inline]
    fn compare_exchange_weak(
        word: &AtomicU64,
        current: u64,
        new: u64,
        success: Ordering,
    ) -> Result<u64, u64> {
        let success = match success {
            Ordering::Relaxed => Ordering::Release,
            stronger => stronger,
        };
        word.compare_exchange_weak(current, new, success, Ordering::Acquire)
    }

    #[inline]
    fn encode(state: State) -> Option<u64> {
        (state.tokens <= Self::MAX_TOKENS && state.calls <= Self::MAX_CALLS)
            .then(|| Self::pack(state.tokens, state.calls, state.mark.0 as u32))
    }

    /// Against `now`, a start less than 2^31 ms back is the one; anything
    /// else is either a start in `now`'s future (`now` was read before
    /// another thread's rollover, however long ago) or an old window. A
    /// fresh reading settles it: the word was loaded (`Acquire`) before the
    /// clock is read again, so the reading comes after the clock read that
    /// stored the start, and a start ahead of it by more than rounding is
    /// an old one.
    #[inline(always)]
    fn decode(raw: u64, now: Now, fresh: &dyn Fn() -> Now) -> Word {
        let (tokens, calls, low) = Self::unpack(raw);
        if calls == NARROW_SENTINEL_CALLS {
            return match tokens {
                SENTINEL_MOVED => Word::Moved(low),
                _ => Word::Retired,
            };
        }
        let mark = unwrap_mark(low, now.tick(), None).unwrap_or_else(|| {
            let reference = fresh().tick();
            unwrap_mark(low, reference, Some(NARROW_AHEAD_MS)).unwrap_or(reference)
        });
        Word::Live(State {
            tokens,
            calls,
            mark,
        })
    }

    fn sentinel(word: Word) -> u64 {
        let (kind, slot) = match word {
            Word::Moved(slot) => (SENTINEL_MOVED, slot),
            Word::Retired | Word::Live(_) => (SENTINEL_RETIRED, 0),
        };
        Self::pack(kind, NARROW_SENTINEL_CALLS, slot)
    }

    fn encode_policy(enforced: Enforced) -> Option<u64> {
        let Enforced { policy, has_parent } = enforced;
        let fits = policy.refill == Refill::Window
            && !has_parent
            && policy.tokens <= Self::MAX_TOKENS
            && policy.calls <= Self::MAX_CALLS
            && policy.period <= Self::MAX_PERIOD;
        fits.then(|| Self::pack(policy.tokens, policy.calls, policy.period as u32))
    }

    #[inline]
    fn decode_policy(raw: u64) -> Enforced {
        let (tokens, calls, period) = Self::unpack(raw);
        Enforced {
            policy: Policy {
                tokens,
                calls,
                period: u64::from(period),
                refill: Refill::Window,
            },
            has_parent: false,
        }
    }

    fn side(_: AgentId, _: &Limit) {}
    fn store_side(_: &(), _: AgentId, _: &Limit) {}
    fn read_side(_: &()) -> (Option<Configured>, Option<AgentId>) {
        (None, None)
    }
}

/// The state of one agent in the lock-free manager, in a slot of the
/// registry's arena of its width.
///
/// The words first, so a lookup's one cache line holds what it reads; the
/// id (checked by lookups) and the incarnation (checked by handles and
/// reservations) after them. Every field is an atomic: a slot is reused for
/// another agent once no operation can still be looking at it (see
/// `registry`), and is written while readers may read it.
#[repr(C)]
pub(crate) struct Cell<L: Layout> {
    usage: L::Atomic,
    policy: L::Atomic,
    id: [Published; 2],
    /// Distinguishes this incarnation of the agent from one made after a
    /// `remove_budget` (a reservation never settles into its successor, a
    /// handle never admits into it). Kept when the cell changes width.
    generation: Published,
    side: L::Side,
}

/// One wide cell is one cache line.
#[cfg(not(agent_budget_loom))]
const _: () = assert!(std::mem::size_of::<Cell<Wide>>() == 64);
#[cfg(not(agent_budget_loom))]
const _: () = assert!(std::mem::size_of::<Cell<Narrow>>() == 40);

impl<L: Layout> Cell<L> {
    /// An unused cell: retired, so a stale reader finds no one.
    pub(crate) fn vacant() -> Self {
        Cell {
            usage: L::atomic(L::sentinel(Word::Retired)),
            policy: L::atomic(L::sentinel(Word::Retired)),
            id: [Published::new(0), Published::new(0)],
            generation: Published::new(u64::MAX),
            side: L::side(AgentId::nil(), &vacant_limit()),
        }
    }

    /// Makes this (vacant) cell agent `agent_id`'s, incarnation
    /// `generation`, on `limit` with usage `state`. The writer's alone:
    /// the usage word goes last, with `Release`, so a reader that loads it
    /// (`Acquire`) sees the rest. `false` if the limit or the state do not
    /// fit this width (nothing is written then).
    pub(crate) fn occupy(
        &self,
        agent_id: AgentId,
        limit: &Limit,
        state: State,
        generation: u64,
    ) -> bool {
        let (Some(policy), Some(usage)) = (L::encode_policy(Enforced::of(limit)), L::encode(state))
        else {
            return false;
        };
        let (high, low) = agent_id.as_u64_pair();
        // Relaxed: published by the usage word's Release store below.
        self.id[0].store(low, Ordering::Relaxed);
        self.id[1].store(high, Ordering::Relaxed);
        self.generation.store(generation, Ordering::Relaxed);
        L::store_side(&self.side, agent_id, limit);
        L::store(&self.policy, policy, Ordering::Relaxed);
        L::store(&self.usage, usage, Ordering::Release);
        true
    }

    /// Whether this cell is agent `agent_id`'s (of some incarnation).
    #[inline]
    pub(crate) fn is(&self, agent_id: &AgentId) -> bool {
        let (high, low) = agent_id.as_u64_pair();
        // Relaxed: the index entry that led here was loaded with Acquire,
        // which orders these after the writer's stores of the cell.
        self.id[0].load(Ordering::Relaxed) == low && self.id[1].load(Ordering::Relaxed) == high
    }

    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        // Relaxed: read after an Acquire load of the usage word (see
        // "Orderings"), or under the registry's writer lock.
        self.generation.load(Ordering::Relaxed)
    }

    pub(crate) fn agent_id(&self) -> AgentId {
        AgentId::from_u64_pair(
            self.id[1].load(Ordering::Relaxed),
            self.id[0].load(Ordering::Relaxed),
        )
    }

    /// The usage word, raw (see [`Layout::to_wide`]): `Acquire`, see
    /// "Orderings".
    #[inline(always)]
    pub(crate) fn load_raw(&self) -> u128 {
        L::to_wide(L::load(&self.usage, Ordering::Acquire))
    }

    #[inline(always)]
    pub(crate) fn decode_raw(&self, raw: u128, now: Now, fresh: &dyn Fn() -> Now) -> Word {
        L::decode(L::from_wide(raw), now, fresh)
    }

    /// `state` as this cell's raw word, or `None` if it does not fit.
    #[inline(always)]
    pub(crate) fn encode(&self, state: State) -> Option<u128> {
        L::encode(state).map(L::to_wide)
    }

    /// One compare-and-swap of the raw usage word; on failure, the word
    /// found (`Acquire`).
    #[inline(always)]
    pub(crate) fn compare_exchange_raw(
        &self,
        current: u128,
        new: u128,
        order: Ordering,
    ) -> Result<(), u128> {
        L::compare_exchange_weak(&self.usage, L::from_wide(current), L::from_wide(new), order)
            .map(drop)
            .map_err(L::to_wide)
    }

    /// The usage word as it is now.
    #[inline]
    pub(crate) fn word(&self, now: Now, fresh: &dyn Fn() -> Now) -> Word {
        L::decode(L::load(&self.usage, Ordering::Acquire), now, fresh)
    }

    /// The configured limit with its policy and parent, one consistent
    /// snapshot (the policy word is read after the extra, and `set_limit`
    /// stores them in the other order).
    pub(crate) fn limit(&self, agent_id: AgentId) -> Limit {
        let enforced = self.enforced();
        // The side is behind an arc-swap load (about 50 instructions, per
        // limit a gateway reports on): read only where it can hold
        // something, a parent or a configured limit the policy does not
        // give back.
        let (configured, parent) = if enforced.has_parent || !enforced.policy.derives_exactly() {
            L::read_side(&self.side)
        } else {
            (None, None)
        };
        let configured =
            configured.unwrap_or_else(|| Configured::derived(agent_id, &enforced.policy));
        Limit::new(configured, parent)
    }

    /// The agent's parent, if it has one: only agents whose policy word
    /// says so need to ask.
    pub(crate) fn parent(&self) -> Option<AgentId> {
        L::read_side(&self.side).1
    }

    /// The policy the hot paths enforce: one load, no pointer to follow.
    #[inline]
    pub(crate) fn enforced(&self) -> Enforced {
        // Acquire: pairs with the Release in `set_limit`, so the usage this
        // operation then loads is at least the conversion to this policy.
        L::decode_policy(L::load(&self.policy, Ordering::Acquire))
    }

    /// Replaces the limit (a new budget, a new kind of policy, or a new
    /// parent), if it fits this width: the registry's writer alone calls
    /// it. A change that involves a bucket first converts the usage to the
    /// new policy at `now` (see `rules::State::convert`), then stores the
    /// extra and the policy word; an operation racing this call is judged
    /// against the old policy or the new one, never past the larger limit.
    pub(crate) fn set_limit(&self, agent_id: AgentId, limit: &Limit, now: Now) -> bool {
        let Some(policy) = L::encode_policy(Enforced::of(limit)) else {
            return false;
        };
        let old = self.enforced().policy;
        // SeqCst: may refund (a switch can make room); a no-op is not
        // written. A converted state always fits: conversion only arises
        // with a bucket, which is always wide.
        self.update(Ordering::SeqCst, now, |s| {
            (s.convert(&old, &limit.policy, now), ())
        });
        L::store_side(&self.side, agent_id, limit);
        // Release: see `enforced`.
        L::store(&self.policy, policy, Ordering::Release);
        true
    }

    /// Stores a sentinel for good (a removal, or a move to the other
    /// width); returns the word it replaced. A swap by compare-and-swap:
    /// every later compare-and-swap on the word fails against it.
    pub(crate) fn seal(&self, sentinel: Word, now: Now) -> Word {
        let new = L::sentinel(sentinel);
        // Relaxed first load: the compare-and-swap reads the latest value.
        let mut current = L::load(&self.usage, Ordering::Relaxed);
        loop {
            // SeqCst: waiters must see a removal (see `wait::Waiters::wake`).
            match L::compare_exchange_weak(&self.usage, current, new, Ordering::SeqCst) {
                Ok(_) => return L::decode(current, now, &|| now),
                Err(actual) => current = actual,
            }
        }
    }

    /// Moves this cell's agent into `target` (a vacant cell of the other
    /// width) for good, atomically with respect to every operation on it:
    /// `target` gets exactly the last state, then this word says
    /// `Moved(slot)`, so an operation that loses its compare-and-swap to
    /// the move follows it to `target`. The registry's writer alone calls
    /// it. `false` (nothing moved) if the state does not fit `target`'s
    /// width, or the cell is already retired.
    pub(crate) fn move_to<T: Layout>(
        &self,
        target: &Cell<T>,
        slot: u32,
        agent_id: AgentId,
        limit: &Limit,
        now: Now,
    ) -> bool {
        let moved = L::sentinel(Word::Moved(slot));
        let mut current = L::load(&self.usage, Ordering::Acquire);
        loop {
            let Word::Live(state) = L::decode(current, now, &|| now) else {
                return false;
            };
            let state = state.convert(&self.enforced().policy, &limit.policy, now);
            if !target.occupy(agent_id, limit, state, self.generation()) {
                return false;
            }
            // Release: `target` (written above) is published by this word;
            // SeqCst for waiters, as any change of a limit.
            match L::compare_exchange_weak(&self.usage, current, moved, Ordering::SeqCst) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// Applies `transition` until its result is stored without
    /// interference; `None` (nothing stored) if the cell holds no live
    /// state, or the next state does not fit this width. What the writer
    /// uses to convert a cell's usage; operations go through the
    /// registry's `CellRef::update`, the same loop over either width.
    ///
    /// A transition that changes nothing is not written back: the load was
    /// its linearization point, and a hot agent's cache line stays shared.
    fn update<R>(
        &self,
        order: Ordering,
        now: Now,
        mut transition: impl FnMut(State) -> (State, R),
    ) -> Option<(State, State, R)> {
        let mut current = self.load_raw();
        loop {
            let Word::Live(before) = self.decode_raw(current, now, &|| now) else {
                return None;
            };
            let (after, verdict) = transition(before);
            if after == before {
                return Some((before, after, verdict));
            }
            match self.compare_exchange_raw(current, self.encode(after)?, order) {
                Ok(()) => return Some((before, after, verdict)),
                Err(actual) => current = actual,
            }
        }
    }
}

/// The limit a vacant cell's side is made from.
fn vacant_limit() -> Limit {
    Limit::new(
        Configured::derived(
            AgentId::nil(),
            &Policy::from_limit(&crate::types::BudgetLimit {
                agent_id: AgentId::nil(),
                token_budget: 0,
                calls_budget: 0,
                window_secs: 0,
            }),
        ),
        None,
    )
}

#[cfg(all(test, not(agent_budget_loom)))]
mod tests {
    use super::*;
    use crate::types::{BudgetLimit, CalendarLimit, RefillLimit};
    use proptest::prelude::*;

    fn now_at(tick: Tick) -> Now {
        Now::from_nanos((tick.0 - Tick::ORIGIN.0) * 1_000_000)
    }

    proptest! {
        #[test]
        fn wide_policies_pack_and_unpack_over_the_full_ranges(
            tokens in 0..=MAX_TOKENS,
            calls in 0..=MAX_CALLS,
            period in 1..=Policy::MAX_PERIOD,
            bucket in any::<bool>(),
            has_parent in any::<bool>(),
        ) {
            let refill = if bucket { Refill::Bucket } else { Refill::Window };
            let enforced = Enforced { policy: Policy { tokens, calls, period, refill }, has_parent };
            prop_assert_eq!(Wide::decode_policy(Wide::encode_policy(enforced).unwrap()), enforced);
        }

        /// Where the policy says it derives exactly, the configuration is
        /// not kept beside it, and `limit` reads it back from the policy:
        /// it must be the one configured.
        #[test]
        fn a_policy_that_derives_exactly_gives_back_its_configuration(
            tokens in prop_oneof![0..=MAX_TOKENS + 2, Just(u64::MAX)],
            calls in prop_oneof![0..=MAX_CALLS + 2, Just(u64::MAX)],
            secs in prop_oneof![0..=Policy::MAX_PERIOD / 1_000 + 2, Just(u64::MAX)],
            micros in 0..=u64::MAX / 2,
            kind in 0..4u8,
        ) {
            let agent_id = AgentId::from_u128(7);
            let configured = match kind {
                0 => Configured::Window(BudgetLimit { agent_id, token_budget: tokens, calls_budget: calls, window_secs: secs }),
                1 => Configured::Refill(RefillLimit {
                    agent_id,
                    token_budget: tokens,
                    calls_budget: calls,
                    refill_period: std::time::Duration::from_micros(micros),
                }),
                2 => Configured::Calendar(CalendarLimit { agent_id, token_budget: tokens, calls_budget: calls, period: CalendarPeriod::Day }),
                _ => Configured::Calendar(CalendarLimit { agent_id, token_budget: tokens, calls_budget: calls, period: CalendarPeriod::Month }),
            };
            let limit = Limit::new(configured.clone(), None);
            if limit.policy.derives_exactly() {
                prop_assert_eq!(&Configured::derived(agent_id, &limit.policy), &configured);
                let cell = Cell::<Wide>::vacant();
                prop_assert!(cell.occupy(agent_id, &limit, State::fresh(Tick::ORIGIN), 0));
                prop_assert_eq!(cell.limit(agent_id).configured, configured);
            }
        }

        #[test]
        fn wide_words_pack_and_unpack_over_the_full_ranges(
            tokens in 0..=MAX_TOKENS,
            calls in 0..=MAX_CALLS,
            mark in 0..=Tick::MAX.0,
        ) {
            let state = State { tokens, calls, mark: Tick(mark) };
            let now = Now::from_nanos(0);
            prop_assert_eq!(Wide::decode(Wide::encode(state).unwrap(), now, &|| now), Word::Live(state));
        }

        /// A narrow start read against any clock reading up to 2^31 − 1 ms
        /// after it, or before it by up to 2^31 ms (a reading taken before
        /// another thread's rollover, and kept that long), is the exact
        /// start.
        #[test]
        fn narrow_words_give_back_their_start_exactly(
            tokens in 0..=Narrow::MAX_TOKENS,
            calls in 0..=Narrow::MAX_CALLS,
            start in Tick::ORIGIN.0..Tick::MAX.0 - (1 << 32),
            age in 0..u64::from(NARROW_HALF_RANGE),
            stale_by in 0..(1u64 << 31) - 1,
            fresh_behind in 0..u64::from(NARROW_AHEAD_MS),
        ) {
            let state = State { tokens, calls, mark: Tick(start) };
            let raw = Narrow::encode(state).unwrap();
            let now = now_at(Tick(start + age));
            prop_assert_eq!(Narrow::decode(raw, now, &|| unreachable!()), Word::Live(state));
            // A reading before the start, however far: the fresh reading
            // (at most rounding behind the start) decides.
            let stale = now_at(Tick(start.saturating_sub(stale_by + 1).max(Tick::ORIGIN.0)));
            let fresh = now_at(Tick(start - fresh_behind));
            prop_assert_eq!(Narrow::decode(raw, stale, &|| fresh), Word::Live(state));
        }

        #[test]
        fn narrow_policies_pack_and_unpack_where_they_fit(
            tokens in 0..=Narrow::MAX_TOKENS,
            calls in 0..=Narrow::MAX_CALLS,
            period in 1..=Narrow::MAX_PERIOD,
        ) {
            let enforced = Enforced {
                policy: Policy { tokens, calls, period, refill: Refill::Window },
                has_parent: false,
            };
            prop_assert_eq!(Narrow::decode_policy(Narrow::encode_policy(enforced).unwrap()), enforced);
        }
    }

    #[test]
    fn an_old_narrow_window_reads_as_old_and_so_expired() {
        // Started 2^31 + 5 ms before a fresh reading: an old window, which
        // any narrow policy has seen expire.
        let start = Tick(Tick::ORIGIN.0 + 7);
        let raw = Narrow::encode(State::fresh(start)).unwrap();
        let later = now_at(Tick(start.0 + u64::from(NARROW_HALF_RANGE) + 5));
        assert_eq!(
            Narrow::decode(raw, later, &|| later),
            Word::Live(State::fresh(Tick(
                later.tick().0 - u64::from(NARROW_HALF_RANGE) - 5
            )))
        );
        // What 32 bits cannot tell: exactly 2^32 ms later, the same start.
        let aliased = now_at(Tick(start.0 + (1 << 32)));
        assert_eq!(
            Narrow::decode(raw, aliased, &|| aliased),
            Word::Live(State::fresh(Tick(start.0 + (1 << 32))))
        );
    }

    #[test]
    fn sentinels_never_read_as_states() {
        for word in [Word::Retired, Word::Moved(0), Word::Moved(u32::MAX >> 1)] {
            let now = Now::from_nanos(0);
            assert_eq!(Wide::decode(Wide::sentinel(word), now, &|| now), word);
            assert_eq!(Narrow::decode(Narrow::sentinel(word), now, &|| now), word);
        }
        // The fullest states are not sentinels.
        let full = State {
            tokens: Narrow::MAX_TOKENS,
            calls: Narrow::MAX_CALLS,
            mark: Tick::MAX,
        };
        assert!(Narrow::encode(State {
            calls: Narrow::MAX_CALLS + 1,
            ..full
        })
        .is_none());
        let now = now_at(Tick::MAX);
        assert_eq!(
            Narrow::decode(Narrow::encode(full).unwrap(), now, &|| now),
            Word::Live(full)
        );
        let full = State {
            tokens: MAX_TOKENS,
            calls: MAX_CALLS,
            mark: Tick::MAX,
        };
        assert_eq!(
            Wide::decode(Wide::encode(full).unwrap(), now, &|| now),
            Word::Live(full)
        );
    }

    fn window(id: AgentId, tokens: u64, calls: u64, window_secs: u64) -> Limit {
        Limit::new(
            Configured::Window(BudgetLimit {
                agent_id: id,
                token_budget: tokens,
                calls_budget: calls,
                window_secs,
            }),
            None,
        )
    }

    #[test]
    fn narrow_cells_take_exactly_the_limits_that_fit() {
        let id = AgentId::from_u128(3);
        assert!(Narrow::fits(id, &window(id, 1_000, 10, 60)));
        assert!(Narrow::fits(
            id,
            &window(id, Narrow::MAX_TOKENS, Narrow::MAX_CALLS, 0)
        ));
        assert!(!Narrow::fits(
            id,
            &window(id, Narrow::MAX_TOKENS + 1, 10, 60)
        ));
        assert!(!Narrow::fits(
            id,
            &window(id, 1_000, Narrow::MAX_CALLS + 1, 60)
        ));
        assert!(!Narrow::fits(id, &window(id, 1_000, 10, 30 * 86_400)));
        assert!(!Narrow::fits(id, &window(id, 1_000, 10, u64::MAX)));
        assert!(!Narrow::fits(
            id,
            &window(id, 1_000, 10, 60).with_parent(Some(id))
        ));
        let bucket = Limit::new(
            Configured::Refill(RefillLimit {
                agent_id: id,
                token_budget: 5,
                calls_budget: 1,
                refill_period: std::time::Duration::from_secs(1),
            }),
            None,
        );
        assert!(!Narrow::fits(id, &bucket));
    }

    #[test]
    fn update_stores_the_transition_and_returns_its_verdict() {
        let id = AgentId::from_u128(7);
        let now = now_at(Tick::ORIGIN);
        let cell = Cell::<Narrow>::vacant();
        assert!(cell.occupy(id, &window(id, 10, 1, 1), State::fresh(Tick::ORIGIN), 7));
        assert!(cell.is(&id) && cell.agent_id() == id);
        let (before, after, verdict) = cell
            .update(Ordering::Relaxed, now, |w| (w, "unchanged"))
            .unwrap();
        assert_eq!((before, after, verdict), (before, before, "unchanged"));
        let (before, after, verdict) = cell
            .update(Ordering::SeqCst, now, |w| (State { tokens: 4, ..w }, 9))
            .unwrap();
        assert_eq!((before.tokens, after.tokens, verdict), (0, 4, 9));
        assert_eq!(cell.generation(), 7);
        // A state past the narrow fields is not written.
        assert!(cell
            .update(Ordering::Relaxed, now, |w| (
                State {
                    tokens: u64::MAX >> 12,
                    ..w
                },
                ()
            ))
            .is_none());
        assert_eq!(
            cell.word(now, &|| now),
            Word::Live(State {
                tokens: 4,
                ..before
            })
        );
        // A sealed cell refuses every transition.
        assert!(matches!(cell.seal(Word::Retired, now), Word::Live(s) if s.tokens == 4));
        assert!(cell.update(Ordering::Relaxed, now, |w| (w, ())).is_none());
    }

    #[test]
    fn a_move_hands_the_exact_state_over_and_leaves_a_forwarding_word() {
        let id = AgentId::from_u128(9);
        let now = now_at(Tick::ORIGIN);
        let narrow = Cell::<Narrow>::vacant();
        let limit = window(id, 10, 2, 60);
        assert!(narrow.occupy(id, &limit, State::fresh(Tick::ORIGIN), 3));
        narrow.update(Ordering::Relaxed, now, |s| {
            (
                State {
                    tokens: 6,
                    calls: 1,
                    ..s
                },
                (),
            )
        });
        let wide = Cell::<Wide>::vacant();
        let wider = window(id, 1 << 40, 2, 60);
        assert!(narrow.move_to(&wide, 5, id, &wider, now));
        assert_eq!(narrow.word(now, &|| now), Word::Moved(5));
        assert_eq!(
            wide.word(now, &|| now),
            Word::Live(State {
                tokens: 6,
                calls: 1,
                mark: Tick::ORIGIN
            })
        );
        assert_eq!(
            (wide.generation(), wide.enforced().policy.tokens),
            (3, 1 << 40)
        );
    }

    #[test]
    fn only_limits_the_policy_word_cannot_give_back_keep_an_extra() {
        let id = AgentId::from_u128(3);
        let plain = window(id, 1_000, 10, 60);
        assert!(Extra::of(id, &plain).is_none());
        assert!(Extra::of(id, &window(id, 0, 0, 0)).is_none());
        let now = now_at(Tick::ORIGIN);
        for exotic in [
            window(id, u64::MAX, 10, 60),
            window(id, 1_000, 10, u64::MAX),
        ] {
            let cell = Cell::<Wide>::vacant();
            assert!(cell.occupy(id, &exotic, State::fresh(Tick::ORIGIN), 0));
            assert_eq!(cell.limit(id).configured, exotic.configured);
            let _ = now;
        }
        let refill = RefillLimit {
            agent_id: id,
            token_budget: 5,
            calls_budget: 1,
            refill_period: std::time::Duration::from_micros(1_500),
        };
        let limit = Limit::new(Configured::Refill(refill.clone()), Some(id));
        let cell = Cell::<Wide>::vacant();
        assert!(cell.occupy(id, &limit, State::fresh(Tick::ORIGIN), 0));
        let back = cell.limit(id);
        assert_eq!(
            (back.configured, back.parent),
            (Configured::Refill(refill), Some(id))
        );
        assert!(cell.enforced().has_parent);
        // Nothing of that fits a narrow cell.
        assert!(!Cell::<Narrow>::vacant().occupy(id, &limit, State::fresh(Tick::ORIGIN), 0));
    }
}
