//! [`LockedBudgetManager`]: the seed's design, kept as a reference.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard, RwLock};
use smallvec::SmallVec;

use super::{budget_info, forward_budget_limiter, full_budget_info, unknown_agent_info, Events};
use crate::clock::Clock;
use crate::error::{BudgetExceeded, HierarchyError, Operation, PersistError, Refusal, Refused};
use crate::hierarchy::{ChainIds, Hierarchy, MAX_LEVELS};
use crate::limit::{Configured, Limit};
use crate::persist::{self, AgentState};
use crate::registry::SlotRef;
use crate::reservation::{
    set_level_amounts, Ledger, Level, Levels, OwnedReservation, OwnedSetReservation, Reservation,
    SetReservation, Settlement, Ticket,
};
use crate::rules::{Now, Refund, State};
use crate::set::{self, Plan, SetTicket, Shadowed, TooMany};
use crate::sync::ClockSource;
use crate::types::{
    AgentId, BudgetInfo, BudgetLimit, CalendarLimit, Claim, FullBudgetInfo, RefillLimit,
};

/// One agent's usage, and which incarnation of the agent it belongs to.
struct Slot {
    state: State,
    generation: u64,
}

/// The seed's design: limits and usage in two `RwLock<HashMap>`s, and one
/// global write lock for every `reserve`, `track_call` and `acquire`.
///
/// It answers exactly as [`BudgetManager`](crate::BudgetManager) does (both
/// take every decision from the same rules, including the seed's defects
/// fixed), which makes it the reference for differential tests and the
/// baseline for benchmarks. Two deliberate departures from the seed's
/// locking, both to keep it linearizable: `set_budget` holds both locks, as
/// `remove_budget` already did, and an agent whose usage vanished between
/// the two lookups is treated as removed instead of being recreated. A
/// request on a chain of budgets takes and (on a refusal) gives back level
/// by level under the one write lock, so no one ever sees a partial
/// admission here.
pub struct LockedBudgetManager {
    budgets: RwLock<HashMap<AgentId, Limit>>,
    usage: RwLock<HashMap<AgentId, Slot>>,
    /// Serializes configuration changes and holds the hierarchy they check
    /// links against; taken before the two maps' locks.
    config: Mutex<Hierarchy>,
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
    /// An empty manager on the real monotonic clock, read coarsely; see
    /// [`BudgetManager::new`](crate::BudgetManager::new).
    pub fn new() -> Self {
        Self::on(Clock::default_coarse())
    }

    /// An empty manager on `clock`.
    pub fn with_clock(clock: ClockSource) -> Self {
        Self::on(Clock::new(clock))
    }

    /// An empty manager on `clock`, its zero at `utc_origin`; see
    /// [`BudgetManager::with_clock_at`](crate::BudgetManager::with_clock_at).
    pub fn with_clock_at(clock: ClockSource, utc_origin: chrono::DateTime<chrono::Utc>) -> Self {
        Self::on(Clock::at(clock, utc_origin))
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
            config: Mutex::new(Hierarchy::default()),
            clock,
            generations: AtomicU64::new(0),
            events: Events::default(),
        }
    }

    fn next_generation(&self) -> u64 {
        // Relaxed: only uniqueness is needed, which the RMW gives.
        self.generations.fetch_add(1, Ordering::Relaxed)
    }

    fn config(&self) -> MutexGuard<'_, Hierarchy> {
        self.config.lock()
    }

    /// Sets an agent's budget; see [`BudgetManager::set_budget`](crate::BudgetManager::set_budget).
    pub fn set_budget(&self, limit: BudgetLimit) {
        self.configure(Configured::Window(limit));
    }

    /// Sets a budget on the UTC calendar; see
    /// [`BudgetManager::set_calendar`](crate::BudgetManager::set_calendar).
    pub fn set_calendar(&self, limit: CalendarLimit) {
        self.configure(Configured::Calendar(limit));
    }

    /// Sets a refilling budget; see [`BudgetManager::set_refill`](crate::BudgetManager::set_refill).
    pub fn set_refill(&self, limit: RefillLimit) {
        self.configure(Configured::Refill(limit));
    }

    fn configure(&self, configured: Configured) {
        let hierarchy = self.config();
        let agent_id = configured.agent_id();
        let limit = Limit::new(configured, hierarchy.parent_of(&agent_id));
        {
            let mut budgets = self.budgets.write();
            let mut usage = self.usage.write();
            let now = self.clock.now();
            if let (Some(old), Some(slot)) = (budgets.get(&agent_id), usage.get_mut(&agent_id)) {
                slot.state = slot
                    .state
                    .ended_window(&old.policy, &limit.policy, now)
                    .convert(&old.policy, &limit.policy, now);
            }
            budgets.insert(agent_id, limit);
            usage.entry(agent_id).or_insert_with(|| Slot {
                state: State::fresh(now.start_tick()),
                generation: self.next_generation(),
            });
        }
        drop(hierarchy);
        self.events.limit_changed(&agent_id);
    }

    /// Links budgets; see [`BudgetManager::set_parent`](crate::BudgetManager::set_parent).
    pub fn set_parent(
        &self,
        child: &AgentId,
        parent: Option<&AgentId>,
    ) -> Result<(), HierarchyError> {
        let mut hierarchy = self.config();
        let before = {
            let mut budgets = self.budgets.write();
            if !budgets.contains_key(child) {
                return Err(HierarchyError::UnknownAgent(*child));
            }
            if let Some(parent) = parent {
                if !budgets.contains_key(parent) {
                    return Err(HierarchyError::UnknownAgent(*parent));
                }
                hierarchy.check_link(*child, *parent)?;
            }
            let before = hierarchy.parent_of(child);
            hierarchy.set_parent(*child, parent.copied());
            if let Some(limit) = budgets.get_mut(child) {
                limit.parent = parent.copied();
            }
            before
        };
        drop(hierarchy);
        self.events.limit_changed(child);
        if let Some(before) = before {
            self.events.limit_changed(&before);
        }
        Ok(())
    }

    /// Forgets an agent's budget and usage, and detaches its children; see
    /// [`BudgetManager::remove_budget`](crate::BudgetManager::remove_budget).
    pub fn remove_budget(&self, agent_id: &AgentId) {
        let mut hierarchy = self.config();
        let children = {
            let mut budgets = self.budgets.write();
            let mut usage = self.usage.write();
            budgets.remove(agent_id);
            usage.remove(agent_id);
            let children = hierarchy.remove(*agent_id);
            for child in &children {
                if let Some(limit) = budgets.get_mut(child) {
                    limit.parent = None;
                }
            }
            children
        };
        drop(hierarchy);
        self.events.limit_changed(agent_id);
        for child in &children {
            self.events.limit_changed(child);
        }
    }

    /// Takes tokens and calls together; see [`BudgetManager::acquire`](crate::BudgetManager::acquire).
    pub fn acquire(
        &self,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> Result<Reservation<'_>, Refused> {
        let levels = self
            .admit(agent_id, (tokens, calls), None)
            .map_err(|r| r.refused(*agent_id, Operation::Acquire))?;
        Ok(Reservation::new(self, Ticket::new((tokens, calls), levels)))
    }

    /// Takes tokens and calls together, owned; see
    /// [`BudgetManager::acquire_owned`](crate::BudgetManager::acquire_owned).
    pub fn acquire_owned(
        self: &Arc<Self>,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> Result<OwnedReservation, Refused> {
        let levels = self
            .admit(agent_id, (tokens, calls), None)
            .map_err(|r| r.refused(*agent_id, Operation::Acquire))?;
        let ticket = Ticket::new((tokens, calls), levels);
        Ok(OwnedReservation::new(self.clone(), ticket))
    }

    /// [`acquire_owned`](Self::acquire_owned), then where each level of
    /// the agent's chain stands; see
    /// [`BudgetManager::acquire_owned_reporting`](crate::BudgetManager::acquire_owned_reporting).
    /// The reference reads the chain after the admission, under a lock of
    /// its own: another request may come between the two.
    pub fn acquire_owned_reporting(
        self: &Arc<Self>,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
        report: impl FnMut(FullBudgetInfo),
    ) -> Result<OwnedReservation, Refused> {
        let taken = self.acquire_owned(agent_id, tokens, calls)?;
        self.chain_info(agent_id).into_iter().for_each(report);
        Ok(taken)
    }

    /// Waits until the request fits; see
    /// [`BudgetManager::acquire_wait`](crate::BudgetManager::acquire_wait).
    #[cfg(feature = "async")]
    pub fn acquire_wait(
        &self,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> impl std::future::Future<Output = Result<Reservation<'_>, Refused>> + Send + '_ {
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
    ) -> impl std::future::Future<Output = Result<OwnedReservation, Refused>> + Send + 'static {
        crate::wait::acquire_owned_wait(self, agent_id, tokens, calls)
    }

    /// Takes every claim at its agent and its ancestors, all or none; see
    /// [`BudgetManager::acquire_set`](crate::BudgetManager::acquire_set).
    pub fn acquire_set(&self, claims: &[Claim]) -> Result<SetReservation<'_>, Refused> {
        self.acquire_ticket(claims, None)
            .map(|ticket| SetReservation::new(self, ticket))
    }

    /// Takes a set, the `shadowed` limits past their limit; see
    /// [`BudgetManager::acquire_set_shadowed`](crate::BudgetManager::acquire_set_shadowed).
    pub fn acquire_set_shadowed(
        &self,
        claims: &[Claim],
        shadowed: impl Fn(&AgentId) -> bool,
    ) -> Result<SetReservation<'_>, Refused> {
        self.acquire_ticket(claims, Some(&shadowed))
            .map(|ticket| SetReservation::new(self, ticket))
    }

    /// Takes a set, the `shadowed` limits past their limit, owned; see
    /// [`BudgetManager::acquire_set_owned_shadowed`](crate::BudgetManager::acquire_set_owned_shadowed).
    pub fn acquire_set_owned_shadowed(
        self: &Arc<Self>,
        claims: &[Claim],
        shadowed: impl Fn(&AgentId) -> bool,
    ) -> Result<OwnedSetReservation, Refused> {
        self.acquire_ticket(claims, Some(&shadowed))
            .map(|ticket| OwnedSetReservation::new(self.clone(), ticket))
    }

    /// Takes a set, owned; see
    /// [`BudgetManager::acquire_set_owned`](crate::BudgetManager::acquire_set_owned).
    pub fn acquire_set_owned(
        self: &Arc<Self>,
        claims: &[Claim],
    ) -> Result<OwnedSetReservation, Refused> {
        self.acquire_ticket(claims, None)
            .map(|ticket| OwnedSetReservation::new(self.clone(), ticket))
    }

    /// Waits until a set fits, owned; see
    /// [`BudgetManager::acquire_set_owned_wait`](crate::BudgetManager::acquire_set_owned_wait).
    #[cfg(feature = "async")]
    pub fn acquire_set_owned_wait(
        self: &Arc<Self>,
        claims: Vec<Claim>,
    ) -> impl std::future::Future<Output = Result<OwnedSetReservation, Refused>> + Send + 'static
    {
        crate::wait::acquire_set_owned_wait(self, claims)
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

    /// Gives tokens back at every level; see [`BudgetManager::release`](crate::BudgetManager::release).
    pub fn release(&self, agent_id: &AgentId, tokens: u64) {
        let mut released = ChainIds::new();
        {
            let budgets = self.budgets.read();
            let mut usage = self.usage.write();
            let now = self.clock.now();
            for (id, limit) in chain(&budgets, agent_id) {
                if let Some(slot) = usage.get_mut(&id) {
                    let before = slot.state;
                    slot.state = before.release(&limit.policy, now, tokens);
                    if slot.state != before {
                        released.push(id);
                    }
                }
            }
        }
        for level in released.iter() {
            self.events.refunded(level, || self.headroom(level));
        }
    }

    /// Takes `request` at every level of the agent's chain or at none: the
    /// set of one claim (see [`admit_set`](Self::admit_set)), refused as
    /// no budget unless the agent is incarnation `generation` (when one is
    /// given). The agent's own level comes first in the levels.
    fn admit(
        &self,
        agent_id: &AgentId,
        (tokens, calls): (u64, u64),
        generation: Option<u64>,
    ) -> Result<Levels, Refusal> {
        let claim = [Claim {
            agent_id: *agent_id,
            tokens,
            calls,
        }];
        let plan = self
            .take_claims(&claim, generation, None)
            .map_err(|(refusal, _)| refusal)?;
        let own = plan.limits.iter().find(|l| l.own).and_then(|l| l.taken);
        let mut levels = Levels::Own(own.ok_or(Refusal::NoBudget)?);
        for limit in plan.limits.iter().filter(|l| !l.own) {
            if let Some(level) = limit.taken {
                levels.push(level);
            }
        }
        Ok(levels)
    }

    /// [`admit_set`](Self::admit_set), its refusal as the public API
    /// answers it.
    #[inline]
    fn acquire_ticket(
        &self,
        claims: &[Claim],
        shadowed: Shadowed<'_>,
    ) -> Result<Box<SetTicket>, Refused> {
        self.admit_set(claims, shadowed)
            .map_err(|(r, agent_id)| r.refused(agent_id, Operation::Acquire))
    }

    /// Takes every limit `claims` reach, all or none; see
    /// [`BudgetManager::acquire_set`](crate::BudgetManager::acquire_set).
    fn admit_set(
        &self,
        claims: &[Claim],
        shadowed: Shadowed<'_>,
    ) -> Result<Box<SetTicket>, (Refusal, AgentId)> {
        let plan = self.take_claims(claims, None, shadowed)?;
        Ok(SetTicket::new(claims, plan.taken()))
    }

    /// The lock-free manager's `take_claims` under the write lock: the same
    /// plan (each limit once, ascending agent id), taken limit by limit and
    /// given back on a refusal, so the two agree on every state; no one
    /// ever sees a partial admission here.
    fn take_claims(
        &self,
        claims: &[Claim],
        generation: Option<u64>,
        shadowed: Shadowed<'_>,
    ) -> Result<Plan<()>, (Refusal, AgentId)> {
        let who = |n: usize| claims.get(n).map_or(AgentId::nil(), |c| c.agent_id);
        set::check_size(claims)?;
        let mut given_back = Plan::<()>::new();
        let verdict = {
            let budgets = self.budgets.read();
            let mut usage = self.usage.write();
            let mut plan = Plan::new();
            let mut own_generation = None;
            for (n, claim) in claims.iter().enumerate() {
                let slot = budgets
                    .contains_key(&claim.agent_id)
                    .then(|| usage.get(&claim.agent_id))
                    .flatten()
                    .ok_or((Refusal::NoBudget, claim.agent_id))?;
                if n == 0 {
                    if generation.is_some_and(|g| g != slot.generation) {
                        return Err((Refusal::NoBudget, claim.agent_id));
                    }
                    own_generation = Some(slot.generation);
                }
                let amounts = (claim.tokens, claim.calls);
                for (depth, (id, _)) in chain(&budgets, &claim.agent_id).enumerate() {
                    plan.add(id, (), n, amounts, depth)
                        .map_err(|TooMany(limits)| (Refusal::TooMany { limits }, claim.agent_id))?;
                }
            }
            plan.sort();
            let own_generation = own_generation.unwrap_or_default();
            let now = self.clock.now();
            let mut refused = None;
            for k in 0..plan.order.len() {
                let n = usize::from(plan.order[k]);
                let limit = plan.limits[n];
                let (Some(policy), Some(slot)) = (
                    budgets.get(&limit.id).map(|l| l.policy),
                    usage.get_mut(&limit.id),
                ) else {
                    continue;
                };
                let (next, verdict) = match shadowed {
                    Some(shadowed) if shadowed(&limit.id) => (
                        slot.state
                            .admit_past(&policy, now, limit.tokens, limit.calls),
                        Ok(()),
                    ),
                    _ => slot.state.admit(&policy, now, limit.tokens, limit.calls),
                };
                slot.state = next;
                match verdict {
                    Ok(()) => {
                        plan.limits[n].taken = Some(Level {
                            agent_id: limit.id,
                            generation: slot.generation,
                            taken_in: next.mark,
                            slot: SlotRef::NONE,
                        });
                    }
                    Err(shortfall) => {
                        refused = Some((
                            Refusal::Short {
                                shortfall,
                                asked: (limit.tokens, limit.calls),
                                generation: own_generation,
                                level: limit.id,
                            },
                            who(limit.first_claim()),
                        ));
                        break;
                    }
                }
            }
            match refused {
                None => Ok(plan),
                Some(refused) => {
                    for limit in plan.in_order().rev() {
                        if let Some(level) = limit.taken {
                            give_back(
                                &budgets,
                                &mut usage,
                                &level,
                                now,
                                (limit.tokens, limit.calls),
                            );
                            given_back.limits.push(*limit);
                        }
                    }
                    Err(refused)
                }
            }
        };
        for limit in given_back.limits.iter() {
            self.events.refunded(&limit.id, || self.headroom(&limit.id));
        }
        verdict
    }

    fn headroom(&self, agent_id: &AgentId) -> Option<(u64, u64)> {
        let now = self.clock.now();
        self.with_agent(agent_id, |limit, state| state.headroom(&limit.policy, now))
    }

    fn with_agent<R>(&self, agent_id: &AgentId, f: impl FnOnce(&Limit, State) -> R) -> Option<R> {
        let budgets = self.budgets.read();
        let limit = budgets.get(agent_id)?;
        let state = self.usage.read().get(agent_id)?.state;
        Some(f(limit, state))
    }

    /// What is left; see [`BudgetManager::remaining`](crate::BudgetManager::remaining).
    pub fn remaining(&self, agent_id: &AgentId) -> BudgetInfo {
        let now = self.clock.now();
        self.with_agent(agent_id, |limit, state| {
            budget_info(&limit.policy, state, now)
        })
        .unwrap_or_else(unknown_agent_info)
    }

    /// Whether `acquire` would be admitted now, taking nothing; see
    /// [`BudgetManager::check`](crate::BudgetManager::check).
    pub fn check(&self, agent_id: &AgentId, tokens: u64, calls: u64) -> Result<(), Refused> {
        let claim = Claim {
            agent_id: *agent_id,
            tokens,
            calls,
        };
        self.check_set(std::slice::from_ref(&claim))
    }

    /// Whether `acquire_set` would be admitted now, taking nothing; see
    /// [`BudgetManager::check_set`](crate::BudgetManager::check_set).
    pub fn check_set(&self, claims: &[Claim]) -> Result<(), Refused> {
        set::check_size(claims).map_err(|(r, agent_id)| r.refused(agent_id, Operation::Acquire))?;
        let now = self.clock.now();
        let budgets = self.budgets.read();
        let usage = self.usage.read();
        let check_chain = |claim: &Claim| -> Result<(), Refusal> {
            let own = budgets
                .contains_key(&claim.agent_id)
                .then(|| usage.get(&claim.agent_id))
                .flatten()
                .ok_or(Refusal::NoBudget)?;
            for (id, limit) in chain(&budgets, &claim.agent_id) {
                let Some(slot) = usage.get(&id) else { continue };
                let (_, verdict) = slot
                    .state
                    .admit(&limit.policy, now, claim.tokens, claim.calls);
                verdict.map_err(|shortfall| Refusal::Short {
                    shortfall,
                    asked: (claim.tokens, claim.calls),
                    generation: own.generation,
                    level: id,
                })?;
            }
            Ok(())
        };
        claims.iter().try_for_each(|claim| {
            check_chain(claim)
                .map_err(|refusal| refusal.refused(claim.agent_id, Operation::Acquire))
        })
    }

    /// Whether every level has both tokens and calls left; see
    /// [`BudgetManager::can_schedule`](crate::BudgetManager::can_schedule).
    pub fn can_schedule(&self, agent_id: &AgentId) -> bool {
        let now = self.clock.now();
        let budgets = self.budgets.read();
        let usage = self.usage.read();
        if !usage.contains_key(agent_id) {
            return false;
        }
        let open = chain(&budgets, agent_id).all(|(id, limit)| {
            usage
                .get(&id)
                .is_some_and(|slot| !budget_info(&limit.policy, slot.state, now).is_exhausted)
        });
        open
    }

    /// Starts a fresh window now.
    pub fn reset_window(&self, agent_id: &AgentId) {
        let reset = {
            let mut usage = self.usage.write();
            usage.get_mut(agent_id).map(|slot| {
                slot.state = slot.state.reset(self.clock.now());
            })
        };
        if reset.is_some() {
            self.events.refunded(agent_id, || self.headroom(agent_id));
        }
    }

    /// Limits and usage; see [`BudgetManager::full_info`](crate::BudgetManager::full_info).
    pub fn full_info(&self, agent_id: &AgentId) -> Option<FullBudgetInfo> {
        let now = self.clock.now();
        self.with_agent(agent_id, |limit, state| full_budget_info(limit, state, now))
    }

    /// Every level's limits and usage; see
    /// [`BudgetManager::chain_info`](crate::BudgetManager::chain_info).
    pub fn chain_info(&self, agent_id: &AgentId) -> Vec<FullBudgetInfo> {
        let now = self.clock.now();
        let budgets = self.budgets.read();
        let usage = self.usage.read();
        chain(&budgets, agent_id)
            .map_while(|(id, limit)| {
                let slot = usage.get(&id)?;
                Some(full_budget_info(limit, slot.state, now))
            })
            .collect()
    }

    /// Every agent's limit and state, under one read of each lock (the
    /// seed re-took the budgets lock per agent while holding it).
    fn all_agents<R>(&self, mut f: impl FnMut(&Limit, State) -> R) -> Vec<R> {
        let budgets = self.budgets.read();
        let usage = self.usage.read();
        budgets
            .iter()
            .filter_map(|(id, limit)| Some(f(limit, usage.get(id)?.state)))
            .collect()
    }

    /// [`full_info`](Self::full_info) of every agent, in no particular order.
    pub fn all_full_info(&self) -> Vec<FullBudgetInfo> {
        let now = self.clock.now();
        self.all_agents(|limit, state| full_budget_info(limit, state, now))
    }

    /// Writes the state to `path`; see [`BudgetManager::persist`](crate::BudgetManager::persist).
    pub fn persist(&self, path: &Path) -> Result<(), PersistError> {
        let at = self.clock.moment();
        let agents = self.all_agents(|limit, state| AgentState {
            configured: limit.configured.clone(),
            parent: limit.parent,
            state,
        });
        persist::write(path, &agents, at)
    }

    /// Replaces the state by `path`'s; see [`BudgetManager::restore`](crate::BudgetManager::restore).
    pub fn restore(&self, path: &Path) -> Result<(), PersistError> {
        let Some((agents, restored)) = persist::read(path, self.clock.moment())? else {
            return Ok(());
        };
        let mut hierarchy = self.config();
        {
            let mut budgets = self.budgets.write();
            let mut usage = self.usage.write();
            budgets.clear();
            usage.clear();
            for agent in agents {
                let id = agent.configured.agent_id();
                budgets.insert(id, Limit::new(agent.configured, agent.parent));
                let slot = Slot {
                    state: agent.state,
                    generation: self.next_generation(),
                };
                usage.insert(id, slot);
            }
        }
        *hierarchy = restored;
        drop(hierarchy);
        self.events.everything_changed();
        Ok(())
    }
}

/// The agent's limit, then each ancestor's, as linked in `budgets`: at most
/// [`MAX_LEVELS`], stopping at a parent without a budget or seen before.
fn chain<'b>(
    budgets: &'b HashMap<AgentId, Limit>,
    agent_id: &AgentId,
) -> impl Iterator<Item = (AgentId, &'b Limit)> {
    let mut seen = ChainIds::new();
    let mut next = Some(*agent_id);
    std::iter::from_fn(move || {
        let id = next.take()?;
        if seen.contains(&id) {
            return None;
        }
        let limit = budgets.get(&id)?;
        seen.push(id);
        next = limit.parent;
        Some((id, limit))
    })
    .take(MAX_LEVELS)
}

/// Gives `request` back to one level, in the window it was taken from.
fn give_back(
    budgets: &HashMap<AgentId, Limit>,
    usage: &mut HashMap<AgentId, Slot>,
    level: &Level,
    now: Now,
    request: (u64, u64),
) {
    let (Some(limit), Some(slot)) = (budgets.get(&level.agent_id), usage.get_mut(&level.agent_id))
    else {
        return;
    };
    if slot.generation != level.generation {
        return;
    }
    if let Refund::Applied { next, .. } =
        slot.state
            .settle(&limit.policy, now, level.taken_in, request, (0, 0))
    {
        slot.state = next;
    }
}

impl LockedBudgetManager {
    /// Settles each of `levels` (a level, what it reserved and what it
    /// used) under the write lock; returns each outcome, and the levels
    /// that got budget back.
    fn settle_locked(
        &self,
        levels: impl Iterator<Item = (Level, (u64, u64), (u64, u64))>,
    ) -> (SmallVec<[Settlement; 4]>, ChainIds) {
        let budgets = self.budgets.read();
        let mut usage = self.usage.write();
        let now = self.clock.now();
        let mut outcomes = SmallVec::new();
        let mut refunded = ChainIds::new();
        for (level, reserved, used) in levels {
            let limit = budgets.get(&level.agent_id);
            let slot = usage
                .get_mut(&level.agent_id)
                .filter(|slot| slot.generation == level.generation);
            let settlement = match (limit, slot) {
                (Some(limit), Some(slot)) => {
                    let refund =
                        slot.state
                            .settle(&limit.policy, now, level.taken_in, reserved, used);
                    if let Refund::Applied { next, .. } | Refund::CarriedOver { next, .. } = refund
                    {
                        slot.state = next;
                    }
                    Settlement::of(refund)
                }
                _ => Settlement::AgentRemoved,
            };
            if settlement.refunded() {
                refunded.push(level.agent_id);
            }
            outcomes.push(settlement);
        }
        (outcomes, refunded)
    }

    /// Wakes the waiters of the levels a settle refunded, after the lock
    /// is released: a woken waiter takes it at once.
    fn woken(&self, refunded: &ChainIds) {
        for agent_id in refunded.iter() {
            self.events.refunded(agent_id, || self.headroom(agent_id));
        }
    }
}

impl Ledger for LockedBudgetManager {
    /// Settles at every level under the write lock; reports the agent's
    /// own.
    fn settle(&self, ticket: &Ticket, used: (u64, u64)) -> Settlement {
        let reserved = (ticket.tokens, ticket.calls);
        let levels = ticket.levels.iter().map(|level| (*level, reserved, used));
        let (outcomes, refunded) = self.settle_locked(levels);
        self.woken(&refunded);
        outcomes
            .first()
            .copied()
            .unwrap_or(Settlement::AgentRemoved)
    }

    fn settle_set(&self, ticket: &SetTicket, actuals: Option<&[u64]>) -> Settlement {
        let levels = ticket.levels.iter().map(|level| {
            let (reserved, used) = set_level_amounts(level, actuals);
            (level.level, reserved, used)
        });
        let (outcomes, refunded) = self.settle_locked(levels);
        self.woken(&refunded);
        set::worst(outcomes.into_iter())
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
    ) -> Result<Levels, Refusal> {
        self.admit(agent_id, request, generation)
    }

    fn try_admit_set(&self, claims: &[Claim]) -> Result<Box<SetTicket>, (Refusal, AgentId)> {
        self.admit_set(claims, None)
    }

    fn headroom(&self, agent_id: &AgentId) -> Option<(u64, u64)> {
        self.headroom(agent_id)
    }
}

forward_budget_limiter!(LockedBudgetManager);
