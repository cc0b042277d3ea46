//! Agent handles: a grip on one agent's cell, for callers that come back to
//! the same agent again and again.
//!
//! A scheduler keeps per-agent state anyway; a handle kept beside it makes
//! every request on that agent skip the map lookup (hashing the id, probing
//! the table, following the entry), which at many agents is most of an
//! operation's cost. A handle holds an `Arc` of the agent's cell, the same
//! one the manager's map holds, so it stays valid as long as it lives,
//! whatever happens to the map.
//!
//! What it does not hold on to is the agent's budget itself. `remove_budget`
//! retires the cell (a reserved mark in its usage word, stored by the same
//! kind of atomic write every admission compares against), so from the
//! moment it returns a handle admits nothing more into the removed agent.
//! A later `set_budget` for the same id makes a new cell, which the old
//! handle never sees: its operations are refused as for an unknown agent,
//! and a fresh handle is needed.

use std::sync::Arc;

use crate::cell::AgentCell;
use crate::error::{Operation, Refusal, Refused};
use crate::manager::lockfree::BudgetManager;
use crate::reservation::{OwnedReservation, Reservation, Ticket};
use crate::types::{AgentId, BudgetInfo};

/// One agent's cell, and the operations a handle offers on it.
struct Grip {
    agent_id: AgentId,
    cell: Arc<AgentCell>,
}

impl Grip {
    #[inline]
    fn admit(
        &self,
        manager: &BudgetManager,
        request: (u64, u64),
        operation: Operation,
    ) -> Result<Ticket, Refused> {
        manager
            .admit_from(&self.agent_id, &self.cell, request)
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
            self.manager
                .release_from(&self.grip.agent_id, &self.grip.cell, tokens);
        }

        /// [`BudgetManager::remaining`] on this agent, without the lookup.
        /// A removed agent reads as unknown: all zeros, exhausted.
        pub fn remaining(&self) -> BudgetInfo {
            self.manager.remaining_of(&self.grip.cell)
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
    pub(crate) fn new(manager: &'m BudgetManager, agent_id: AgentId, cell: Arc<AgentCell>) -> Self {
        AgentHandle {
            manager,
            grip: Grip { agent_id, cell },
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
        cell: Arc<AgentCell>,
    ) -> Self {
        OwnedAgentHandle {
            manager,
            grip: Grip { agent_id, cell },
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
