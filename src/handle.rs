//! Agent handles: a grip on one agent's cell, for callers that come back to
//! the same agent again and again.
//!
//! A scheduler keeps per-agent state anyway; a handle kept beside it makes
//! every request on that agent skip the lookup (hashing the id, probing
//! the index), which at many agents is a cache miss of its own. A handle
//! holds where the agent's cell is (a slot number and width) and which
//! incarnation of the agent it is for: no `Arc`, no count to touch, 24
//! bytes beside the manager.
//!
//! What it does not hold on to is the agent's budget itself. `remove_budget`
//! retires the cell (a sentinel in its usage word, stored by the same kind
//! of atomic write every admission compares against), so from the moment it
//! returns a handle admits nothing more into the removed agent. The slot
//! may later hold another agent, or a new incarnation of the same one (a
//! `set_budget` after the removal): the handle checks the cell's
//! incarnation after every load of its usage word and finds no one, so its
//! operations are refused as for an unknown agent, and a fresh handle is
//! needed. If the agent moves to a cell of the other width (its limit
//! changed), the handle follows it: an operation through the hint finds
//! the old cell's word saying where the agent went, stops there (the old
//! cell keeps the policy it had when the agent left, and an operation
//! reads its policy before it follows the word), and the handle looks
//! the agent up by id and remembers its new place. Before this, a handle
//! made before a move judged a later, smaller limit by the old policy.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::error::{Operation, Refusal, Refused};
use crate::manager::lockfree::BudgetManager;
use crate::registry::{CellRef, Pinned, SlotRef};
use crate::reservation::{OwnedReservation, Reservation, Ticket};
use crate::types::{AgentId, BudgetInfo};

/// Where one incarnation of an agent lives, and the operations a handle
/// offers on it.
struct Grip {
    agent_id: AgentId,
    generation: u64,
    /// Where the cell was last seen: a hint, updated when the agent has
    /// moved (its slot is checked against the incarnation every time).
    slot: AtomicU32,
}

impl Grip {
    fn new(agent_id: AgentId, slot: SlotRef, generation: u64) -> Self {
        Grip {
            agent_id,
            generation,
            slot: AtomicU32::new(slot.to_bits()),
        }
    }

    /// Where the hint points, as this incarnation's cell.
    #[inline]
    fn hinted<'p>(&self, pinned: &'p Pinned<'_>) -> Option<CellRef<'p>> {
        // Relaxed: a hint; the cell's incarnation is what is trusted.
        let hint = SlotRef::from_bits(self.slot.load(Ordering::Relaxed));
        pinned.at(hint, self.generation)
    }

    /// This incarnation's cell, looked up by id, when the hint found no
    /// one: the agent moved to the other width (its old cell keeps the
    /// policy it had then, so it is not used), and its old slot may have
    /// been reused. Remembers the new place. `None` if the agent is gone.
    #[cold]
    fn moved<'p>(&self, pinned: &'p Pinned<'_>) -> Option<CellRef<'p>> {
        let hint = self.slot.load(Ordering::Relaxed);
        let found = pinned.get(&self.agent_id)?.current();
        if found.slot().to_bits() == hint || found.generation() != self.generation {
            return None;
        }
        self.slot.store(found.slot().to_bits(), Ordering::Relaxed);
        Some(found.expecting(self.generation))
    }

    /// Runs `op` on this incarnation's cell, found by the hint or, failing
    /// that, by a lookup; `None` if the agent is gone.
    fn with<R>(
        &self,
        manager: &BudgetManager,
        op: impl Fn(&Pinned<'_>, CellRef<'_>) -> Option<R>,
    ) -> Option<R> {
        let pinned = manager.pin_unindexed();
        self.hinted(&pinned)
            .and_then(|cell| op(&pinned, cell))
            .or_else(|| op(&pinned, self.moved(&pinned)?))
    }

    #[inline(always)]
    fn admit(
        &self,
        manager: &BudgetManager,
        request: (u64, u64),
        operation: Operation,
    ) -> Result<Ticket, Refused> {
        let pinned = manager.pin_unindexed();
        let mut admitted = match self.hinted(&pinned) {
            Some(cell) => manager.admit_from(&pinned, &self.agent_id, cell, request),
            None => Err(Refusal::NoBudget),
        };
        if let Err(Refusal::NoBudget) = admitted {
            if let Some(cell) = self.moved(&pinned) {
                admitted = manager.admit_from(&pinned, &self.agent_id, cell, request);
            }
        }
        admitted
            .map(|levels| Ticket::new(request, levels))
            .map_err(|refusal: Refusal| refusal.refused(self.agent_id, operation))
    }
}

/// Methods shared by [`AgentHandle`] and [`OwnedAgentHandle`]: they differ
/// only in how they hold the manager.
macro_rules! handle_methods {
    () => {
        /// The agent this handle is for.
        pub fn agent_id(&self) -> AgentId {
            self.grip.agent_id
        }

        /// [`BudgetManager::reserve`] on this agent, without the lookup.
        /// Its refusal is a [`Refused`] (no message is formatted until it
        /// is displayed, and it reads as the seed's); convert it with
        /// `BudgetExceeded::from` where the seed's type is wanted.
        pub fn reserve(&self, tokens: u64) -> Result<(), Refused> {
            self.grip
                .admit(&self.manager, (tokens, 0), Operation::Reserve)
                .map(drop)
        }

        /// [`BudgetManager::track_call`] on this agent, without the lookup.
        pub fn track_call(&self) -> Result<(), Refused> {
            self.grip
                .admit(&self.manager, (0, 1), Operation::TrackCall)
                .map(drop)
        }

        /// [`BudgetManager::release`] on this agent (and its ancestors),
        /// without the lookup.
        pub fn release(&self, tokens: u64) {
            let manager = &self.manager;
            self.grip.with(manager, |pinned, cell| {
                cell.load(manager.now())?;
                manager.release_from(pinned, &self.grip.agent_id, cell, tokens);
                Some(())
            });
        }

        /// [`BudgetManager::remaining`] on this agent, without the lookup.
        /// A removed agent reads as unknown: all zeros, exhausted.
        pub fn remaining(&self) -> BudgetInfo {
            let manager = &self.manager;
            self.grip
                .with(manager, |_, cell| {
                    cell.load(manager.now())?;
                    Some(manager.remaining_of(cell))
                })
                .unwrap_or_else(crate::manager::unknown_agent_info)
        }
    };
}

/// A handle on one agent of a [`BudgetManager`], borrowed from it: see
/// [`BudgetManager::handle`].
///
/// Its operations have the manager's semantics (chains of budgets
/// included) and skip the lookup of the agent. Once the agent's budget is
/// removed, every operation is refused as for an unknown agent, even if a
/// budget is set again for the same id.
///
/// ```
/// use agent_budget::{BudgetLimit, BudgetManager};
///
/// let budgets = BudgetManager::new();
/// let agent = uuid::Uuid::new_v4();
/// budgets.set_budget(BudgetLimit { agent_id: agent, token_budget: 1_000, calls_budget: 10, window_secs: 60 });
/// let handle = budgets.handle(&agent).expect("the agent has a budget");
/// for _ in 0..10 {
///     handle.acquire(50, 1)?.settle(40);
/// }
/// assert!(handle.track_call().is_err(), "ten calls a window");
/// assert_eq!(handle.remaining().tokens_remaining, 600);
/// # Ok::<(), agent_budget::Refused>(())
/// ```
pub struct AgentHandle<'m> {
    manager: &'m BudgetManager,
    grip: Grip,
}

impl<'m> AgentHandle<'m> {
    pub(crate) fn new(
        manager: &'m BudgetManager,
        agent_id: AgentId,
        slot: SlotRef,
        generation: u64,
    ) -> Self {
        AgentHandle {
            manager,
            grip: Grip::new(agent_id, slot, generation),
        }
    }

    /// [`BudgetManager::acquire`] on this agent, without the lookup.
    pub fn acquire(&self, tokens: u64, calls: u64) -> Result<Reservation<'m>, Refused> {
        let ticket = self
            .grip
            .admit(self.manager, (tokens, calls), Operation::Acquire)?;
        Ok(Reservation::new(self.manager, ticket))
    }

    handle_methods!();
}

impl std::fmt::Debug for AgentHandle<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentHandle")
            .field("agent_id", &self.grip.agent_id)
            .finish_non_exhaustive()
    }
}

/// An [`AgentHandle`] that holds an `Arc` of its manager: `Send`, `Sync`
/// and `'static`, for tasks and long-lived per-agent state. See
/// [`BudgetManager::handle_owned`].
pub struct OwnedAgentHandle {
    manager: Arc<BudgetManager>,
    grip: Grip,
}

impl OwnedAgentHandle {
    pub(crate) fn new(
        manager: Arc<BudgetManager>,
        agent_id: AgentId,
        slot: SlotRef,
        generation: u64,
    ) -> Self {
        OwnedAgentHandle {
            manager,
            grip: Grip::new(agent_id, slot, generation),
        }
    }

    /// [`BudgetManager::acquire_owned`] on this agent, without the lookup.
    pub fn acquire(&self, tokens: u64, calls: u64) -> Result<OwnedReservation, Refused> {
        let ticket = self
            .grip
            .admit(&self.manager, (tokens, calls), Operation::Acquire)?;
        Ok(OwnedReservation::new(self.manager.clone(), ticket))
    }

    handle_methods!();
}

impl std::fmt::Debug for OwnedAgentHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedAgentHandle")
            .field("agent_id", &self.grip.agent_id)
            .finish_non_exhaustive()
    }
}
