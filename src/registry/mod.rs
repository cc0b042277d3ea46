//! The agents' cells, and the index that finds them: built for admissions.
//!
//! # Implementation details
//!
//! ```text
//! Registry
//!  ├─ current: the index (open addressing, 8-byte entries
//!  │    [ id hash's low 32 bits | slot, width ]), kept by each thread
//!  │    in a cache checked against a generation (see `current`)
//!  ├─ readers: the threads' announcements, for grace periods (`grace`)
//!  ├─ narrow: arena of 40-byte cells  (chunks that never move)
//!  ├─ wide:   arena of 64-byte cells  (one cache line each)
//!  └─ writer: Mutex (the index, free slots, slots in limbo, counts)
//! ```
//!
//! An operation announces itself on its thread (a plain store), takes
//! its thread's copy of the index (a load of the generation and a
//! non-atomic increment), hashes the id with a keyed folded multiply,
//! probes the index linearly from the hash's home (its high bits scaled to
//! the capacity; one cache line of 8 entries, usually the first entry) and
//! goes to the slot an entry with the right tag names, where the cell's own
//! id confirms the match. Two cache lines: the entry and the cell, which
//! holds the usage word, the policy word and the id. No locked instruction
//! but the usage word's compare-and-swap. A handle's operation goes to its
//! slot directly and does not take the index at all (`pin_unindexed`)
//! unless its agent has moved.
//!
//! **One writer.** Every change (insert, limit change, width change,
//! removal, growth) happens under the registry's writer mutex, which only
//! configuration changes take (and, once, a settle whose overuse does not
//! fit a narrow word). Readers never take it. The writer stores whole
//! entries (`Release`), after the cell they name is written, so a reader
//! that loads an entry (`Acquire`) finds the cell complete; a removal
//! stores a tombstone, which probes skip. When live entries and tombstones
//! would pass three quarters of the index, the writer builds a new index
//! (three fifths full, so a quarter more agents fit before the next) and
//! publishes it; operations still on the old one finish on it, and it is
//! freed with the last thread's copy.
//!
//! **Cells never move in memory**; agents move between cells. A cell
//! changes width by moving its agent to a vacant cell of the other width
//! (see `Cell::move_to`): the new cell gets the exact last state, then the
//! old word becomes `Moved(slot)` by compare-and-swap, so an operation
//! that loses its race to the move follows the forwarding word. No byte is
//! ever accessed at two widths.
//!
//! **Slots are reused only after a grace period.** An operation checks
//! who a cell is (its id, or for handles and reservations its
//! incarnation) and then compares-and-swaps its usage word. If the slot
//! could be handed to another agent in between, and that agent's word
//! happened to hold the same bits, the compare-and-swap would succeed on
//! the wrong agent. So a slot, once unlinked (its entry a tombstone or
//! pointing elsewhere, its word sealed), waits in limbo until every
//! operation that was running when it was unlinked is over (`grace`: the
//! writer notes which threads were mid-operation, behind a barrier that
//! orders their announcements and its unlinking). An operation is
//! announced for its whole length, so none that could have seen the old
//! occupant is still running when the slot is reused. Handles and
//! reservations, which keep a slot number across operations, load the
//! usage word (`Acquire`) before they check the incarnation, and the
//! writer stores a reused slot's incarnation before its usage word
//! (`Release`): a word they load is either the old occupant's, whose slot
//! they are protected on, or comes with the new incarnation, which they
//! refuse.
//!
//! All of this is safe Rust: the arena's chunks are `OnceLock`s owned by
//! the registry (freed with it), the index is an `Arc` (the writer's own,
//! published behind arc-swap for threads to refresh their copies from,
//! each copy in an `Rc`), every field of a cell is an atomic, and the
//! barrier is rustix's `membarrier`.

mod arena;
mod current;
mod grace;
mod index;

use crate::cell::{Cell, Enforced, Narrow, Wide, Word};
use crate::clock::Clock;
use crate::limit::Limit;
use crate::rules::{Now, State};
use crate::sync::{Mutex, MutexGuard, Ordering};
use crate::types::AgentId;
use arena::Arena;
use current::{Current, Held};
use grace::{Announced, Grace, Readers};
use index::{Index, TOMBSTONE};
use std::sync::Arc;

/// The index's capacity when it is first made, and never less.
#[cfg(not(agent_budget_loom))]
const MIN_CAPACITY: usize = 16;
#[cfg(agent_budget_loom)]
const MIN_CAPACITY: usize = 4;

/// Which cell: a slot number and the arena (width) it is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SlotRef(u32);

impl SlotRef {
    /// No slot: what a level the locked manager took (it has none) holds.
    /// Past every arena, so it finds no cell.
    pub(crate) const NONE: SlotRef = SlotRef(u32::MAX);

    /// The reference as a handle stores it (in an atomic, as a hint).
    pub(crate) fn to_bits(self) -> u32 {
        self.0
    }

    pub(crate) fn from_bits(bits: u32) -> Self {
        SlotRef(bits)
    }

    fn new(slot: u32, wide: bool) -> Self {
        debug_assert!(slot < 1 << 31);
        SlotRef(slot << 1 | u32::from(wide))
    }

    fn slot(self) -> u32 {
        self.0 >> 1
    }

    fn is_wide(self) -> bool {
        self.0 & 1 == 1
    }

    /// Slot `slot` of the other arena: where a `Moved(slot)` word points.
    fn moved_to(self, slot: u32) -> Self {
        SlotRef::new(slot, !self.is_wide())
    }

    fn entry(self, hash: u64) -> u64 {
        index::tag(hash) << 32 | u64::from(self.0)
    }

    fn of_entry(entry: u64) -> Self {
        SlotRef(entry as u32)
    }
}

/// One cell, of either width.
#[derive(Clone, Copy)]
enum Target<'a> {
    Narrow(&'a Cell<Narrow>),
    Wide(&'a Cell<Wide>),
}

/// Runs `$body` with `$cell` bound to the cell of either width.
macro_rules! on {
    ($target:expr, $cell:ident => $body:expr) => {
        match $target {
            Target::Narrow($cell) => $body,
            Target::Wide($cell) => $body,
        }
    };
}

/// A wide cell on a cache line of its own: 64 bytes, 64-aligned, so a
/// lookup's second miss is its only one. (A narrow cell, 40 bytes, is not
/// padded: half of them straddle two lines, which costs less than the 24
/// bytes per agent padding would.)
#[repr(align(64))]
struct Line<T>(T);

/// The writer's state: where new cells go, and what is waiting to be
/// reused.
struct Writer {
    /// Per width (narrow, wide): slots free for reuse, and the next slot
    /// never used.
    free: [Vec<u32>; 2],
    next: [u32; 2],
    /// Slots unlinked, waiting for the grace period that began after.
    limbo: Vec<(Grace, Vec<SlotRef>)>,
    /// The current index (the one `current` publishes).
    index: Arc<Index>,
    /// Live entries, and live entries plus tombstones, in the current index.
    live: usize,
    used: usize,
}

/// The lock-free manager's agents: see the module docs.
pub(crate) struct Registry {
    current: Current,
    readers: Readers,
    narrow: Arena<Cell<Narrow>>,
    wide: Arena<Line<Cell<Wide>>>,
    /// The hash's key: ids may come from clients, who must not be able to
    /// choose ids that collide.
    keys: [u64; 2],
    writer: Mutex<Writer>,
}

/// A per-registry random key (fixed under loom, whose executions must
/// repeat exactly).
fn random_keys() -> [u64; 2] {
    #[cfg(not(agent_budget_loom))]
    {
        use std::hash::{BuildHasher, Hasher};
        let state = std::collections::hash_map::RandomState::new();
        std::array::from_fn(|i| {
            let mut hasher = state.build_hasher();
            hasher.write_usize(i);
            hasher.finish()
        })
    }
    #[cfg(agent_budget_loom)]
    {
        [0x9e37_79b9_7f4a_7c15, 0xc2b2_ae3d_27d4_eb4f]
    }
}

impl Registry {
    pub(crate) fn new() -> Self {
        let index = Arc::new(Index::new(MIN_CAPACITY));
        Registry {
            current: Current::new(index.clone()),
            readers: Readers::new(),
            narrow: Arena::new(),
            wide: Arena::new(),
            keys: random_keys(),
            writer: Mutex::new(Writer {
                free: [Vec::new(), Vec::new()],
                next: [0, 0],
                limbo: Vec::new(),
                index,
                live: 0,
                used: 0,
            }),
        }
    }

    /// The id's hash: the two halves of the id, each keyed, multiplied, and
    /// the product's halves folded together. Every bit of the id reaches
    /// the high bits (the home) and the low bits (the tag); v4 and v7 ids
    /// need no more mixing than that, and the key keeps chosen ids from
    /// colliding on purpose.
    #[inline]
    fn hash(&self, id: &AgentId) -> u64 {
        let (high, low) = id.as_u64_pair();
        let product = u128::from(low ^ self.keys[0]) * u128::from(high ^ self.keys[1]);
        (product as u64) ^ ((product >> 64) as u64)
    }

    /// Announces an operation on this thread and holds the current index
    /// for its lookups; `clock` is read again where a narrow word needs it.
    #[inline(always)]
    pub(crate) fn pin<'r>(&'r self, clock: &'r Clock) -> Pinned<'r> {
        // The announcement first: it must come before every load it
        // protects, the index's included. Built here rather than as
        // `pin_unindexed` with the index set after: that form measured 8
        // to 30 instructions more on every lookup by id.
        let announced = self.readers.announce();
        Pinned {
            registry: self,
            index: std::cell::OnceCell::from(self.current.load()),
            _announced: announced,
            clock,
            confirm: false,
        }
    }

    /// [`pin`](Self::pin) for an operation that reaches its cell by slot
    /// (a handle's): the index is taken only if a lookup by id turns out
    /// to be needed, which saves a thread-local cache probe and a
    /// reference count, a tenth of a handle's admission.
    #[inline(always)]
    pub(crate) fn pin_unindexed<'r>(&'r self, clock: &'r Clock) -> Pinned<'r> {
        Pinned {
            registry: self,
            index: std::cell::OnceCell::new(),
            _announced: self.readers.announce(),
            clock,
            confirm: false,
        }
    }

    /// [`pin`](Self::pin) for a waiting future's tries: every transition
    /// that changes nothing is confirmed by a compare-and-swap of the word
    /// with itself (`SeqCst`), which reads the latest value where a load
    /// may not. A refund and a waiter's registration form the
    /// store-buffering shape (see `wait::Waiters::wake`); with the waiter's
    /// read a read-modify-write, the refund and the waiter's try are two
    /// writes to one word, one of which sees the other, under any memory
    /// model loom checks (loom treats `SeqCst` as acquire-release, and
    /// found the lost wake-up that the plain load allows there).
    #[cfg(feature = "async")]
    pub(crate) fn pin_confirming<'r>(&'r self, clock: &'r Clock) -> Pinned<'r> {
        Pinned {
            confirm: true,
            ..self.pin(clock)
        }
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        // A poisoned lock is taken over: every change it guards is made
        // whole before anything that could panic.
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[inline]
    fn target(&self, at: SlotRef) -> Option<Target<'_>> {
        if at.is_wide() {
            self.wide.get(at.slot()).map(|line| Target::Wide(&line.0))
        } else {
            self.narrow.get(at.slot()).map(Target::Narrow)
        }
    }

    /// The entry place and cell of `agent_id` in `index`.
    fn find(&self, index: &Index, agent_id: &AgentId) -> Option<(usize, SlotRef)> {
        let hash = self.hash(agent_id);
        let tag = index::tag(hash);
        index.probe(hash).find_map(|(place, entry)| {
            let at = SlotRef::of_entry(entry);
            (entry >> 32 == tag && self.target(at).is_some_and(|t| on!(t, c => c.is(agent_id))))
                .then_some((place, at))
        })
    }

    /// Sets `agent_id`'s limit, or adds it with usage `fresh` and the
    /// incarnation `generation()` gives. Picks the cell's width from the
    /// limit, and moves the agent to the other width if it changed.
    pub(crate) fn configure(
        &self,
        agent_id: AgentId,
        limit: &Limit,
        now: Now,
        fresh: State,
        generation: impl FnOnce() -> u64,
    ) {
        let mut writer = self.writer();
        let narrow = Narrow::fits(agent_id, limit);
        if let Some((place, at)) = self.find(&writer.index, &agent_id) {
            if at.is_wide() == narrow
                && self
                    .relocate(&mut writer, place, at, agent_id, limit, now)
                    .is_some()
            {
                return;
            }
            let Some(target) = self.target(at) else {
                return;
            };
            // A narrow cell takes any limit it was not moved away from: a
            // wide limit always moves (a wide cell takes any state).
            let set = on!(target, c => c.set_limit(agent_id, limit, now));
            debug_assert!(set, "a cell kept a limit it cannot hold");
            return;
        }
        let generation = generation();
        if let Some(at) = self.occupy(&mut writer, agent_id, limit, fresh, generation) {
            self.insert(&mut writer, agent_id, at);
        }
    }

    /// A vacant cell made `agent_id`'s: narrow if the limit and the state
    /// fit one, else wide (which always takes them).
    fn occupy(
        &self,
        writer: &mut Writer,
        agent_id: AgentId,
        limit: &Limit,
        state: State,
        generation: u64,
    ) -> Option<SlotRef> {
        let narrow = Narrow::fits(agent_id, limit);
        [narrow, false].into_iter().find_map(|narrow| {
            let at = self.vacant(writer, !narrow);
            let occupied = on!(self.target(at)?, c => c.occupy(agent_id, limit, state, generation));
            if !occupied {
                writer.free[usize::from(at.is_wide())].push(at.slot());
            }
            occupied.then_some(at)
        })
    }

    /// A vacant cell of the given width, its chunk made: a slot out of
    /// limbo if one's grace has passed, a free one, or a new one.
    fn vacant(&self, writer: &mut Writer, wide: bool) -> SlotRef {
        let Writer {
            limbo, free, next, ..
        } = writer;
        limbo.retain_mut(|(grace, slots)| {
            if !grace.is_over() {
                return true;
            }
            for at in slots.drain(..) {
                free[usize::from(at.is_wide())].push(at.slot());
            }
            false
        });
        let width = usize::from(wide);
        let slot = free[width].pop().unwrap_or_else(|| {
            next[width] += 1;
            next[width] - 1
        });
        let at = SlotRef::new(slot, wide);
        // Past 2^31 cells of one width (tens of gigabytes) there is no slot.
        let made = if wide {
            self.wide.make(slot, || Line(Cell::vacant())).is_some()
        } else {
            self.narrow.make(slot, Cell::vacant).is_some()
        };
        assert!(made, "the registry holds at most 2^31 agents of one width");
        at
    }

    /// Adds an entry for `agent_id` at `at`, rebuilding the index first if
    /// it would be too full.
    fn insert(&self, writer: &mut Writer, agent_id: AgentId, at: SlotRef) {
        let hash = self.hash(&agent_id);
        let index = writer.index.clone();
        if !index::fits(writer.used + 1, index.capacity()) {
            let index = Arc::new(self.rebuild(&index, writer.live + 1));
            writer.used = writer.live;
            let (place, _) = index.free_place(hash);
            index.set(place, at.entry(hash));
            writer.live += 1;
            writer.used += 1;
            return self.publish(writer, index);
        }
        let (place, reused) = index.free_place(hash);
        index.set(place, at.entry(hash));
        writer.live += 1;
        writer.used += usize::from(!reused);
    }

    /// A new index with the live entries of `old`, room for `live` of them
    /// at three fifths full.
    fn rebuild(&self, old: &Index, live: usize) -> Index {
        let capacity = index::capacity_for(live, MIN_CAPACITY);
        let index = Index::new(capacity);
        for (_, entry) in old.live() {
            let at = SlotRef::of_entry(entry);
            if let Some(target) = self.target(at) {
                let hash = self.hash(&on!(target, c => c.agent_id()));
                let (place, _) = index.free_place(hash);
                index.set(place, entry);
            }
        }
        index
    }

    /// Makes `index` current. An operation still on the old one finishes
    /// on it; the old one is freed with the last thread's copy.
    fn publish(&self, writer: &mut Writer, index: Arc<Index>) {
        writer.index = index.clone();
        self.current.publish(index);
    }

    /// Puts `slots` in limbo, under a grace period that begins now: after
    /// every store that unlinked them, and after the index that no longer
    /// names them is published.
    fn retire(&self, writer: &mut Writer, slots: Vec<SlotRef>) {
        writer.limbo.push((self.readers.begin_grace(), slots));
    }

    /// Moves `agent_id` from `at` (its entry at `place`) to a vacant cell
    /// of the other width, on `limit`. `None` if it could not: the state
    /// does not fit the other width, or the cell was retired.
    #[allow(clippy::too_many_arguments)]
    fn relocate(
        &self,
        writer: &mut Writer,
        place: usize,
        at: SlotRef,
        agent_id: AgentId,
        limit: &Limit,
        now: Now,
    ) -> Option<SlotRef> {
        let to = self.vacant(writer, !at.is_wide());
        let moved = match (self.target(at)?, self.target(to)?) {
            (Target::Narrow(from), Target::Wide(into)) => {
                from.move_to(into, to.slot(), agent_id, limit, now)
            }
            (Target::Wide(from), Target::Narrow(into)) => {
                from.move_to(into, to.slot(), agent_id, limit, now)
            }
            _ => false,
        };
        if !moved {
            writer.free[usize::from(to.is_wide())].push(to.slot());
            return None;
        }
        writer.index.set(place, to.entry(self.hash(&agent_id)));
        self.retire(writer, vec![at]);
        Some(to)
    }

    /// Moves the agent in the narrow cell `at` to a wide one: a settle
    /// charged more than a narrow word counts. Returns where it is now, or
    /// `None` if it was removed meanwhile.
    fn widen(&self, at: SlotRef, now: Now) -> Option<SlotRef> {
        let mut writer = self.writer();
        let cell = self.narrow.get(at.slot())?;
        match cell.word(now, &|| now) {
            Word::Moved(slot) => return Some(at.moved_to(slot)),
            Word::Retired => return None,
            Word::Live(_) => {}
        }
        let agent_id = cell.agent_id();
        let limit = cell.limit(agent_id);
        let (place, found) = self.find(&writer.index, &agent_id)?;
        debug_assert_eq!(found, at);
        self.relocate(&mut writer, place, at, agent_id, &limit, now)
    }

    /// Removes `agent_id`: its cell is retired for good (every operation
    /// that reaches it from here on finds no one), its entry becomes a
    /// tombstone, and its slot waits out a grace period. Whether it was
    /// there.
    pub(crate) fn remove(&self, agent_id: &AgentId, now: Now) -> bool {
        let mut writer = self.writer();
        let Some((place, at)) = self.find(&writer.index, agent_id) else {
            return false;
        };
        if let Some(target) = self.target(at) {
            on!(target, c => c.seal(Word::Retired, now));
        }
        writer.index.set(place, TOMBSTONE);
        writer.live -= 1;
        self.retire(&mut writer, vec![at]);
        true
    }

    /// Replaces every agent by `agents` (id, limit, usage, incarnation):
    /// the old cells are retired, as by `remove`.
    pub(crate) fn replace_all(&self, now: Now, agents: Vec<(AgentId, Limit, State, u64)>) {
        let mut writer = self.writer();
        let unlinked: Vec<SlotRef> = writer
            .index
            .live()
            .map(|(_, entry)| SlotRef::of_entry(entry))
            .collect();
        for &at in &unlinked {
            if let Some(target) = self.target(at) {
                on!(target, c => c.seal(Word::Retired, now));
            }
        }
        let capacity = index::capacity_for(agents.len(), MIN_CAPACITY);
        let index = Index::new(capacity);
        writer.live = 0;
        for (agent_id, limit, state, generation) in agents {
            if let Some(at) = self.occupy(&mut writer, agent_id, &limit, state, generation) {
                let hash = self.hash(&agent_id);
                let (place, _) = index.free_place(hash);
                index.set(place, at.entry(hash));
                writer.live += 1;
            }
        }
        writer.used = writer.live;
        self.publish(&mut writer, Arc::new(index));
        if !unlinked.is_empty() {
            self.retire(&mut writer, unlinked);
        }
    }

    /// How many agents of each width (narrow, wide) are registered.
    #[cfg(test)]
    pub(crate) fn widths(&self) -> (usize, usize) {
        let index = self.writer().index.clone();
        index.live().fold((0, 0), |(n, w), (_, entry)| {
            if SlotRef::of_entry(entry).is_wide() {
                (n, w + 1)
            } else {
                (n + 1, w)
            }
        })
    }
}

/// An operation on the registry: announced on its thread, with the index
/// it probes held. See [`Registry::pin`].
pub(crate) struct Pinned<'r> {
    registry: &'r Registry,
    /// Taken by `pin`, or at the first lookup by id after
    /// `pin_unindexed`.
    index: std::cell::OnceCell<Held>,
    _announced: Announced<'r>,
    clock: &'r Clock,
    /// See [`Registry::pin_confirming`].
    confirm: bool,
}

impl<'r> Pinned<'r> {
    /// The index this operation's lookups probe: the current one when it
    /// first asks, then the same to its end.
    #[inline(always)]
    fn index(&self) -> &Index {
        match self.index.get() {
            Some(index) => index,
            None => self.take_index(),
        }
    }

    /// Out of line: a handle's operation that has to look its agent up.
    #[cold]
    #[inline(never)]
    fn take_index(&self) -> &Index {
        self.index.get_or_init(|| self.registry.current.load())
    }

    /// The cell of `agent_id`, if it has one.
    #[inline(always)]
    pub(crate) fn get(&self, agent_id: &AgentId) -> Option<CellRef<'_>> {
        let registry = self.registry;
        let hash = registry.hash(agent_id);
        let tag = index::tag(hash);
        for (_, entry) in self.index().probe(hash) {
            if entry >> 32 != tag {
                continue;
            }
            let at = SlotRef::of_entry(entry);
            let Some(target) = registry.target(at) else {
                continue;
            };
            if on!(target, c => c.is(agent_id)) {
                return Some(CellRef {
                    pinned: self,
                    target,
                    at,
                    expect: None,
                    follows_moves: true,
                });
            }
        }
        None
    }

    /// The cell at `at`, for incarnation `generation` of its agent: what a
    /// handle reaches its agent by. Operations on it find no one if the
    /// agent moved to the other width (its old cell keeps the policy it
    /// had then), or if the slot holds another incarnation (the agent was
    /// removed, or moved and its old slot reused): the handle then looks
    /// the agent up again.
    #[inline]
    pub(crate) fn at(&self, at: SlotRef, generation: u64) -> Option<CellRef<'_>> {
        Some(CellRef {
            pinned: self,
            target: self.registry.target(at)?,
            at,
            expect: Some(generation),
            follows_moves: false,
        })
    }

    /// Every agent and its cell.
    pub(crate) fn for_each(&self, mut f: impl FnMut(AgentId, CellRef<'_>)) {
        for (_, entry) in self.index().live() {
            let at = SlotRef::of_entry(entry);
            if let Some(target) = self.registry.target(at) {
                let agent_id = on!(target, c => c.agent_id());
                f(
                    agent_id,
                    CellRef {
                        pinned: self,
                        target,
                        at,
                        expect: None,
                        follows_moves: true,
                    },
                );
            }
        }
    }

    fn fresh(&self) -> Now {
        self.clock.now()
    }
}

/// One agent's cell, found by a [`Pinned`] operation. Its operations
/// follow the agent if it moves to a cell of the other width meanwhile.
#[derive(Clone, Copy)]
pub(crate) struct CellRef<'p> {
    pinned: &'p Pinned<'p>,
    target: Target<'p>,
    at: SlotRef,
    /// The incarnation a handle or a reservation is for.
    expect: Option<u64>,
    /// Whether operations follow the agent into the cell it moved to.
    /// Not for a cell reached through a handle's slot hint: a cell the
    /// agent moved out of keeps the policy it had then, which the caller
    /// has already read, while `set_budget` changes the policy where the
    /// agent lives now. Such an operation finds no one, and the handle
    /// looks its agent up again (and reads the live cell's policy).
    follows_moves: bool,
}

impl<'p> CellRef<'p> {
    /// Where this cell's agent is now, as a handle keeps it.
    pub(crate) fn slot(&self) -> SlotRef {
        self.at
    }

    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        on!(self.target, c => c.generation())
    }

    /// The policy the hot paths enforce.
    #[inline]
    pub(crate) fn enforced(&self) -> Enforced {
        on!(self.target, c => c.enforced())
    }

    pub(crate) fn limit(&self, agent_id: AgentId) -> Limit {
        on!(self.target, c => c.limit(agent_id))
    }

    pub(crate) fn parent(&self) -> Option<AgentId> {
        on!(self.target, c => c.parent())
    }

    /// The same cell, for incarnation `generation` only: operations find
    /// no one if the agent was removed, even if it was added again.
    pub(crate) fn expecting(self, generation: u64) -> Self {
        CellRef {
            expect: Some(generation),
            ..self
        }
    }

    /// The state at `now`, unless the agent is gone.
    pub(crate) fn load(&self, now: Now) -> Option<State> {
        self.update(Ordering::Relaxed, now, |s| (s, ()))
            .map(|(state, _, ())| state)
    }

    /// [`Cell::update`] on wherever the agent is: follows a move to the
    /// other width (unless this reference came from a handle's hint: see
    /// `follows_moves`), and widens a narrow cell whose next state does not
    /// fit (the only time an operation takes the writer's lock). `None` if
    /// the agent is gone (removed, or another incarnation), or moved away
    /// from a hinted cell.
    ///
    /// One loop for both widths, on the raw word in a `u128`, so that
    /// `transition` has one call site and is inlined into it.
    #[inline(always)]
    pub(crate) fn update<R>(
        &self,
        order: Ordering,
        now: Now,
        mut transition: impl FnMut(State) -> (State, R),
    ) -> Option<(State, State, R)> {
        let pinned = self.pinned;
        let fresh = || pinned.fresh();
        let (mut target, mut at) = (self.target, self.at);
        // Acquire (in `load_raw`): the incarnation is checked next.
        let mut current = on!(target, c => c.load_raw());
        loop {
            if let Some(generation) = self.expect {
                if generation != on!(target, c => c.generation()) {
                    return None;
                }
            }
            let before = match on!(target, c => c.decode_raw(current, now, &fresh)) {
                Word::Live(state) => state,
                Word::Retired => return None,
                Word::Moved(_) if !self.follows_moves => return None,
                Word::Moved(slot) => {
                    at = at.moved_to(slot);
                    target = pinned.registry.target(at)?;
                    current = on!(target, c => c.load_raw());
                    continue;
                }
            };
            let (after, verdict) = transition(before);
            if after == before {
                if !pinned.confirm {
                    return Some((before, after, verdict));
                }
                match on!(target, c => c.compare_exchange_raw(current, current, Ordering::SeqCst)) {
                    Ok(()) => return Some((before, after, verdict)),
                    Err(actual) => {
                        current = actual;
                        continue;
                    }
                }
            }
            let Some(new) = on!(target, c => c.encode(after)) else {
                at = pinned.registry.widen(at, now)?;
                target = pinned.registry.target(at)?;
                current = on!(target, c => c.load_raw());
                continue;
            };
            match on!(target, c => c.compare_exchange_raw(current, new, order)) {
                Ok(()) => return Some((before, after, verdict)),
                Err(actual) => current = actual,
            }
        }
    }

    /// This reference, following the agent to wherever it is now.
    pub(crate) fn current(self) -> Self {
        let now = self.pinned.fresh();
        let mut cell = self;
        while let Word::Moved(slot) = on!(cell.target, c => c.word(now, &|| now)) {
            let at = cell.at.moved_to(slot);
            let Some(target) = self.pinned.registry.target(at) else {
                break;
            };
            cell = CellRef { target, at, ..cell };
        }
        cell
    }
}

#[cfg(all(test, not(agent_budget_loom)))]
mod tests {
    use super::*;
    use crate::limit::Configured;
    use crate::rules::Tick;
    use crate::types::BudgetLimit;

    fn window(agent_id: AgentId, tokens: u64) -> Limit {
        Limit::new(
            Configured::Window(BudgetLimit {
                agent_id,
                token_budget: tokens,
                calls_budget: 10,
                window_secs: 60,
            }),
            None,
        )
    }

    fn clock() -> Clock {
        Clock::new(quanta::Clock::mock().0)
    }

    #[test]
    fn agents_are_found_through_growth_removal_and_reuse() {
        let registry = Registry::new();
        let clock = clock();
        let now = clock.now();
        let ids: Vec<AgentId> = (0..2_000u128)
            .map(|i| AgentId::from_u128(i * 7919))
            .collect();
        for (i, &id) in ids.iter().enumerate() {
            let tokens = if i % 3 == 0 { u64::MAX } else { 100 };
            registry.configure(
                id,
                &window(id, tokens),
                now,
                State::fresh(Tick::ORIGIN),
                || i as u64,
            );
        }
        assert_eq!(registry.widths(), (1_333, 667));
        for (i, id) in ids.iter().enumerate() {
            let pinned = registry.pin(&clock);
            let cell = pinned.get(id).expect("registered");
            assert_eq!(cell.generation(), i as u64);
        }
        for id in ids.iter().step_by(2) {
            assert!(registry.remove(id, now));
            assert!(!registry.remove(id, now));
        }
        // Slots come back once their grace has passed (no operation of this
        // test is running; other tests' may hold a few back), and the new
        // agents are found with the old ones.
        let more: Vec<AgentId> = (0..1_000u128).map(|i| AgentId::from_u128(!i)).collect();
        for (i, &id) in more.iter().enumerate() {
            registry.configure(id, &window(id, 5), now, State::fresh(Tick::ORIGIN), || {
                10_000 + i as u64
            });
        }
        let pinned = registry.pin(&clock);
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(pinned.get(id).is_some(), i % 2 == 1, "agent {i}");
        }
        for (i, id) in more.iter().enumerate() {
            assert_eq!(
                pinned.get(id).map(|c| c.generation()),
                Some(10_000 + i as u64)
            );
        }
        let mut seen = 0;
        pinned.for_each(|_, _| seen += 1);
        assert_eq!(seen, 2_000);
        let writer = registry.writer();
        assert!(
            writer.next[0] + writer.next[1] < 3_000,
            "freed slots were reused"
        );
    }

    #[test]
    fn a_slot_waits_while_an_operation_from_before_its_removal_runs() {
        let registry = Registry::new();
        let clock = clock();
        let now = clock.now();
        let (a, b) = (AgentId::from_u128(1), AgentId::from_u128(2));
        registry.configure(a, &window(a, 5), now, State::fresh(Tick::ORIGIN), || 1);
        let reader = registry.pin(&clock);
        let old = reader.get(&a).unwrap().slot();
        assert!(registry.remove(&a, now));
        // An operation begun after the removal (nested in this thread's)
        // finds the new agent; the old slot stays out of use.
        let later = registry.pin(&clock);
        registry.configure(b, &window(b, 5), now, State::fresh(Tick::ORIGIN), || 2);
        assert_ne!(later.get(&b).map(|c| c.slot()), None);
        assert_ne!(
            registry.pin(&clock).get(&b).unwrap().slot(),
            old,
            "reused under a reader"
        );
        drop((reader, later));
        // Reused once the operation is over. Other tests' threads may have
        // been mid-operation when the grace period began, and hold it a
        // little longer: bounded retries.
        let reused = (3..1_000u128).any(|n| {
            let c = AgentId::from_u128(n);
            registry.configure(c, &window(c, 5), now, State::fresh(Tick::ORIGIN), || 3);
            let slot = registry.pin(&clock).get(&c).unwrap().slot();
            if slot != old {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            slot == old
        });
        assert!(reused, "the slot was never reused");
    }

    #[test]
    fn a_limit_change_moves_the_agent_between_widths_and_keeps_its_usage() {
        let registry = Registry::new();
        let clock = clock();
        let now = clock.now();
        let a = AgentId::from_u128(42);
        registry.configure(
            a,
            &window(a, 100),
            now,
            State::fresh(now.start_tick()),
            || 9,
        );
        let pinned = registry.pin(&clock);
        let narrow = pinned.get(&a).unwrap();
        narrow.update(Ordering::Relaxed, now, |s| (State { tokens: 30, ..s }, ()));
        registry.configure(
            a,
            &window(a, u64::MAX),
            now,
            State::fresh(now.start_tick()),
            || 0,
        );
        assert_eq!(registry.widths(), (0, 1));
        // The old reference follows the move.
        assert_eq!(narrow.load(now).map(|s| s.tokens), Some(30));
        assert!(narrow.current().slot().is_wide());
        registry.configure(
            a,
            &window(a, 100),
            now,
            State::fresh(now.start_tick()),
            || 0,
        );
        assert_eq!(registry.widths(), (1, 0));
        let pinned = registry.pin(&clock);
        let cell = pinned.get(&a).unwrap();
        assert_eq!(
            (cell.load(now).map(|s| s.tokens), cell.generation()),
            (Some(30), 9)
        );
        // An overuse past the narrow fields widens the cell on its own.
        let charged = cell.update(Ordering::SeqCst, now, |s| {
            (
                State {
                    tokens: 1 << 40,
                    ..s
                },
                (),
            )
        });
        assert_eq!(charged.map(|(_, after, ())| after.tokens), Some(1 << 40));
        assert_eq!(registry.widths(), (0, 1));
    }
}
