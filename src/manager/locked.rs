//! [`LockedBudgetManager`]: the seed's design, kept as a reference.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use super::{
    budget_info, forward_budget_limiter, full_budget_info, headroom, unknown_agent_info, Events,
};
use crate::cell::Limit;
use crate::clock::Clock;
use crate::error::{BudgetExceeded, Operation, PersistError, Refusal};
use crate::persist::{self, AgentState};
use crate::reservation::{Ledger, OwnedReservation, Reservation, Settlement, Ticket};
use crate::sync::{default_clock, ClockSource};
use crate::types::{AgentId, BudgetInfo, BudgetLimit, FullBudgetInfo};
use crate::window::{Refund, Tick, Window};

/// One agent's usage, and which incarnation of the agent it belongs to.
struct Slot {
    window: Window,
    generation: u64,
}

/// The seed's design: limits and usage in two `RwLock<HashMap>`s, and one
/// global write lock for every `reserve`, `track_call` and `acquire`.
///
/// It answers exactly as [`BudgetManager`](crate::BudgetManager) does (both
/// take every decision from the same window logic, including the seed's
/// defects fixed), which makes it the reference for differential tests and
/// the baseline for benchmarks. Two deliberate departures from the seed's
/// locking, both to keep it linearizable: `set_budget` holds both locks, as
/// `remove_budget` already did, and an agent whose usage vanished between
/// the two lookups is treated as removed instead of being recreated.
pub struct LockedBudgetManager {
    budgets: RwLock<HashMap<AgentId, Limit>>,
    usage: RwLock<HashMap<AgentId, Slot>>,
    clock: Clock,
    generations: AtomicU64,
    events: Events,
}

impl Default for LockedBudgetManager {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for LockedBudgetManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockedBudgetManager")
            .field("agents", &self.budgets.read().len())
            .finish_non_exhaustive()
    }
}

impl LockedBudgetManager {
    /// An empty manager on the real monotonic clock.
    pub fn new() -> Self {
        Self::with_clock(default_clock())
    }

    /// An empty manager on `clock`.
    pub fn with_clock(clock: ClockSource) -> Self {
        Self::on(Clock::new(clock))
    }

    /// An empty manager on a coarse clock; see
    /// [`BudgetManager::with_coarse_clock`](crate::BudgetManager::with_coarse_clock).
    #[cfg(not(agent_budget_loom))]
    pub fn with_coarse_clock(
        clock: ClockSource,
        interval: std::time::Duration,
    ) -> std::io::Result<Self> {
        Ok(Self::on(Clock::coarse(clock, interval)?))
    }

    fn on(clock: Clock) -> Self {
        LockedBudgetManager {
            budgets: RwLock::new(HashMap::new()),
            usage: RwLock::new(HashMap::new()),
            clock,
            generations: AtomicU64::new(0),
            events: Events::default(),
        }
    }

    fn next_generation(&self) -> u64 {
        // Relaxed: only uniqueness is needed, which the RMW gives.
        self.generations.fetch_add(1, Ordering::Relaxed)
    }

    /// Sets an agent's budget; see [`BudgetManager::set_budget`](crate::BudgetManager::set_budget).
    pub fn set_budget(&self, limit: BudgetLimit) {
        let agent_id = limit.agent_id;
        {
            let mut budgets = self.budgets.write();
            let mut usage = self.usage.write();
            budgets.insert(agent_id, Limit::new(limit));
            usage.entry(agent_id).or_insert_with(|| Slot {
                window: Window::fresh(self.clock.now().start_tick()),
                generation: self.next_generation(),
            });
        }
        self.events.limit_changed(&agent_id);
    }

    /// Forgets an agent's budget and usage.
    pub fn remove_budget(&self, agent_id: &AgentId) {
        {
            let mut budgets = self.budgets.write();
            let mut usage = self.usage.write();
            budgets.remove(agent_id);
            usage.remove(agent_id);
        }
        self.events.limit_changed(agent_id);
    }

    /// Takes tokens and calls together; see [`BudgetManager::acquire`](crate::BudgetManager::acquire).
    pub fn acquire(
        &self,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> Result<Reservation<'_>, BudgetExceeded> {
        let taken_in = self
            .admit(agent_id, (tokens, calls), None)
            .map_err(|r| r.into_error(*agent_id, Operation::Acquire))?;
        let ticket = Ticket::new(*agent_id, (tokens, calls), taken_in);
        Ok(Reservation::new(self, ticket))
    }

    /// Takes tokens and calls together, owned; see
    /// [`BudgetManager::acquire_owned`](crate::BudgetManager::acquire_owned).
    pub fn acquire_owned(
        self: &Arc<Self>,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> Result<OwnedReservation, BudgetExceeded> {
        let taken_in = self
            .admit(agent_id, (tokens, calls), None)
            .map_err(|r| r.into_error(*agent_id, Operation::Acquire))?;
        let ticket = Ticket::new(*agent_id, (tokens, calls), taken_in);
        Ok(OwnedReservation::new(self.clone(), ticket))
    }

    /// Waits until the request fits; see
    /// [`BudgetManager::acquire_wait`](crate::BudgetManager::acquire_wait).
    #[cfg(feature = "async")]
    pub fn acquire_wait(
        &self,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> impl std::future::Future<Output = Result<Reservation<'_>, BudgetExceeded>> + Send + '_
    {
        crate::wait::acquire_wait(self, agent_id, tokens, calls)
    }

    /// Waits until the request fits, owned; see
    /// [`BudgetManager::acquire_owned_wait`](crate::BudgetManager::acquire_owned_wait).
    #[cfg(feature = "async")]
    pub fn acquire_owned_wait(
        self: &Arc<Self>,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> impl std::future::Future<Output = Result<OwnedReservation, BudgetExceeded>> + Send + 'static
    {
        crate::wait::acquire_owned_wait(self, agent_id, tokens, calls)
    }

    /// How many futures wait for budget; see
    /// [`BudgetManager::waiting`](crate::BudgetManager::waiting).
    #[cfg(feature = "async")]
    pub fn waiting(&self) -> usize {
        self.events.waiters().len()
    }

    /// Takes tokens; see [`BudgetManager::reserve`](crate::BudgetManager::reserve).
    pub fn reserve(&self, agent_id: &AgentId, tokens: u64) -> Result<(), BudgetExceeded> {
        self.admit(agent_id, (tokens, 0), None)
            .map(drop)
            .map_err(|r| r.into_error(*agent_id, Operation::Reserve))
    }

    /// Counts a call; see [`BudgetManager::track_call`](crate::BudgetManager::track_call).
    pub fn track_call(&self, agent_id: &AgentId) -> Result<(), BudgetExceeded> {
        self.admit(agent_id, (0, 1), None)
            .map(drop)
            .map_err(|r| r.into_error(*agent_id, Operation::TrackCall))
    }

    /// Gives tokens back; see [`BudgetManager::release`](crate::BudgetManager::release).
    pub fn release(&self, agent_id: &AgentId, tokens: u64) {
        let Some(policy) = self.budgets.read().get(agent_id).map(|l| l.policy) else {
            return;
        };
        let released = {
            let mut usage = self.usage.write();
            usage.get_mut(agent_id).is_some_and(|slot| {
                let before = slot.window;
                slot.window = before.release(&policy, self.clock.now(), tokens);
                slot.window.tokens < before.tokens
            })
        };
        if released {
            self.events.refunded(agent_id, || self.headroom(agent_id));
        }
    }

    fn admit(
        &self,
        agent_id: &AgentId,
        (tokens, calls): (u64, u64),
        generation: Option<u64>,
    ) -> Result<(Tick, u64), Refusal> {
        let policy = self
            .budgets
            .read()
            .get(agent_id)
            .map(|l| l.policy)
            .ok_or(Refusal::NoBudget)?;
        let mut usage = self.usage.write();
        let slot = usage.get_mut(agent_id).ok_or(Refusal::NoBudget)?;
        if generation.is_some_and(|g| g != slot.generation) {
            return Err(Refusal::NoBudget);
        }
        let now = self.clock.now();
        let (next, verdict) = slot.window.admit(&policy, now, tokens, calls);
        slot.window = next;
        match verdict {
            Ok(()) => Ok((next.start, slot.generation)),
            Err(shortfall) => Err(Refusal::Short {
                shortfall,
                generation: slot.generation,
            }),
        }
    }

    fn headroom(&self, agent_id: &AgentId) -> Option<(u64, u64)> {
        let now = self.clock.now();
        self.with_agent(agent_id, |limit, window| {
            headroom(&limit.policy, window, now)
        })
    }

    fn with_agent<R>(&self, agent_id: &AgentId, f: impl FnOnce(&Limit, Window) -> R) -> Option<R> {
        let budgets = self.budgets.read();
        let limit = budgets.get(agent_id)?;
        let window = self.usage.read().get(agent_id)?.window;
        Some(f(limit, window))
    }

    /// What is left; see [`BudgetManager::remaining`](crate::BudgetManager::remaining).
    pub fn remaining(&self, agent_id: &AgentId) -> BudgetInfo {
        let now = self.clock.now();
        self.with_agent(agent_id, |limit, window| {
            budget_info(&limit.policy, window, now)
        })
        .unwrap_or_else(unknown_agent_info)
    }

    /// Whether the agent has both tokens and calls left.
    pub fn can_schedule(&self, agent_id: &AgentId) -> bool {
        !self.remaining(agent_id).is_exhausted
    }

    /// Starts a fresh window now.
    pub fn reset_window(&self, agent_id: &AgentId) {
        let reset = {
            let mut usage = self.usage.write();
            usage.get_mut(agent_id).map(|slot| {
                slot.window = slot.window.reset(self.clock.now());
            })
        };
        if reset.is_some() {
            self.events.refunded(agent_id, || self.headroom(agent_id));
        }
    }

    /// Limits and usage; see [`BudgetManager::full_info`](crate::BudgetManager::full_info).
    pub fn full_info(&self, agent_id: &AgentId) -> Option<FullBudgetInfo> {
        let now = self.clock.now();
        self.with_agent(agent_id, |limit, window| {
            full_budget_info(*agent_id, limit, window, now)
        })
    }

    /// Every agent's limit and window, under one read of each lock (the
    /// seed re-took the budgets lock per agent while holding it).
    fn all_agents<R>(&self, mut f: impl FnMut(AgentId, &Limit, Window) -> R) -> Vec<R> {
        let budgets = self.budgets.read();
        let usage = self.usage.read();
        budgets
            .iter()
            .filter_map(|(id, limit)| Some(f(*id, limit, usage.get(id)?.window)))
            .collect()
    }

    /// [`full_info`](Self::full_info) of every agent, in no particular order.
    pub fn all_full_info(&self) -> Vec<FullBudgetInfo> {
        let now = self.clock.now();
        self.all_agents(|id, limit, window| full_budget_info(id, limit, window, now))
    }

    /// Writes the state to `path`; see [`BudgetManager::persist`](crate::BudgetManager::persist).
    pub fn persist(&self, path: &Path) -> Result<(), PersistError> {
        let at = self.clock.moment();
        let agents = self.all_agents(|id, limit, window| {
            let limit = limit.configured.clone();
            (id, AgentState { limit, window })
        });
        persist::write(path, &agents, at)
    }

    /// Replaces the state by `path`'s; see [`BudgetManager::restore`](crate::BudgetManager::restore).
    pub fn restore(&self, path: &Path) -> Result<(), PersistError> {
        let Some(agents) = persist::read(path, self.clock.moment())? else {
            return Ok(());
        };
        {
            let mut budgets = self.budgets.write();
            let mut usage = self.usage.write();
            budgets.clear();
            usage.clear();
            for (id, state) in agents {
                budgets.insert(id, Limit::new(state.limit));
                let slot = Slot {
                    window: state.window,
                    generation: self.next_generation(),
                };
                usage.insert(id, slot);
            }
        }
        self.events.everything_changed();
        Ok(())
    }
}

impl LockedBudgetManager {
    fn settle_locked(&self, ticket: &Ticket, used: (u64, u64)) -> Settlement {
        let Some(policy) = self.budgets.read().get(&ticket.agent_id).map(|l| l.policy) else {
            return Settlement::AgentRemoved;
        };
        let mut usage = self.usage.write();
        let Some(slot) = usage.get_mut(&ticket.agent_id) else {
            return Settlement::AgentRemoved;
        };
        if slot.generation != ticket.generation {
            return Settlement::AgentRemoved;
        }
        let reserved = (ticket.tokens, ticket.calls);
        let now = self.clock.now();
        let before = slot.window;
        let refund = before.settle(&policy, now, ticket.window_start, reserved, used);
        if let Refund::Applied(after) = refund {
            slot.window = after;
        }
        Settlement::of(before, refund)
    }
}

impl Ledger for LockedBudgetManager {
    fn settle(&self, ticket: &Ticket, used: (u64, u64)) -> Settlement {
        let settlement = self.settle_locked(ticket, used);
        // After the lock is released: a woken waiter takes it at once.
        if settlement.refunded() {
            let agent_id = &ticket.agent_id;
            self.events.refunded(agent_id, || self.headroom(agent_id));
        }
        settlement
    }
}

#[cfg(feature = "async")]
impl crate::wait::Waitable for LockedBudgetManager {
    fn waiters(&self) -> &crate::wait::Waiters {
        self.events.waiters()
    }

    fn try_admit(
        &self,
        agent_id: &AgentId,
        request: (u64, u64),
        generation: Option<u64>,
    ) -> Result<(Tick, u64), Refusal> {
        self.admit(agent_id, request, generation)
    }

    fn headroom(&self, agent_id: &AgentId) -> Option<(u64, u64)> {
        self.headroom(agent_id)
    }
}

forward_budget_limiter!(LockedBudgetManager);
