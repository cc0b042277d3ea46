//! [`BudgetManager`]: agents in a concurrent map, usage in packed atomics.

use std::path::Path;
use std::sync::Arc;

use super::{budget_info, forward_budget_limiter, full_budget_info, unknown_agent_info, Events};
use crate::cell::Enforced;
use crate::clock::Clock;
use crate::error::{BudgetExceeded, HierarchyError, Operation, PersistError, Refusal, Refused};
use crate::handle::{AgentHandle, OwnedAgentHandle};
use crate::hierarchy::{ChainIds, Hierarchy, MAX_LEVELS};
use crate::limit::{Configured, Limit};
use crate::persist::{self, AgentState};
use crate::registry::{CellRef, Pinned, Registry, SlotRef};
use crate::reservation::{
    set_level_amounts, Ledger, Level, Levels, OwnedReservation, OwnedSetReservation, Reservation,
    SetReservation, Settlement, Ticket,
};
use crate::rules::{Now, Policy, Refund, State};
use crate::set::{self, Plan, SetLevel, SetTicket, Shadowed, TooMany};
use crate::sync::{AtomicU64, ClockSource, Mutex, MutexGuard, Ordering};
use crate::types::{
    AgentId, BudgetInfo, BudgetLimit, CalendarLimit, Claim, FullBudgetInfo, RefillLimit,
};

/// Tracks token and call budgets per agent, in fixed windows or refilling
/// buckets, alone or in chains of budgets, without locks.
///
/// Every operation on one agent is a lookup in the registry, one clock read
/// and (for writes) a compare-and-swap loop on that agent's usage word (64
/// bits for fixed windows with small budgets, 128 otherwise), and
/// one more of each per ancestor for an agent with a parent; no lock is
/// taken (only configuration changes serialize among themselves) and
/// nothing is allocated on the admitted paths of
/// [`acquire`](Self::acquire), [`reserve`](Self::reserve),
/// [`track_call`](Self::track_call), [`release`](Self::release),
/// [`remaining`](Self::remaining) and [`can_schedule`](Self::can_schedule).
/// (Only the seed's `reserve` and `track_call` allocate, for the message
/// of a refusal.) Share it through an `Arc`. For callers that come back to
/// the same agent, [`handle`](Self::handle) skips the lookup too.
///
/// ```
/// use agent_budget::{BudgetLimit, BudgetManager};
///
/// let budgets = BudgetManager::new();
/// let agent = uuid::Uuid::new_v4();
/// budgets.set_budget(BudgetLimit { agent_id: agent, token_budget: 1_000, calls_budget: 10, window_secs: 60 });
///
/// let reservation = budgets.acquire(&agent, 600, 1)?;
/// // ... forward the request, learn it used 250 tokens ...
/// reservation.settle(250);
/// assert_eq!(budgets.remaining(&agent).tokens_remaining, 750);
/// # Ok::<(), agent_budget::BudgetExceeded>(())
/// ```
pub struct BudgetManager {
    agents: Registry,
    clock: Clock,
    generations: AtomicU64,
    /// Serializes configuration changes (`set_budget`, `set_refill`,
    /// `set_parent`, `remove_budget`, `restore`) and holds the hierarchy they
    /// check links against. A cell keeps its limit twice (the packed policy
    /// it enforces, the configured limit it reports), and two unserialized
    /// writers could leave one's policy beside the other's limit for good.
    /// Requests never take it.
    config: Mutex<Hierarchy>,
    /// Who waits for budget on which agent (with the `async` feature).
    events: Events,
}

impl Default for BudgetManager {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for BudgetManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BudgetManager").finish_non_exhaustive()
    }
}

impl BudgetManager {
    /// An empty manager on the real monotonic clock, read coarsely: quanta's
    /// *recent* time, refreshed every millisecond by its upkeep thread (see
    /// [`with_coarse_clock`](Self::with_coarse_clock), which this is at
    /// 1 ms). Reading it is one atomic load instead of a TSC read and its
    /// scaling, a third of an admission's cost on the benchmark machine; the
    /// price, windows and `retry_after` accurate to about a millisecond, is
    /// nothing next to budgets counted in seconds. For the precise clock,
    /// use `with_clock(quanta::Clock::new())`. (If the upkeep thread cannot
    /// be started, the precise clock is used.)
    pub fn new() -> Self {
        Self::on(Clock::default_coarse())
    }

    /// An empty manager on `clock`; tests pass `quanta::Clock::mock()` and
    /// move time by hand.
    pub fn with_clock(clock: ClockSource) -> Self {
        Self::on(Clock::new(clock))
    }

    /// An empty manager on `clock` whose zero is the instant `utc_origin`:
    /// calendar windows ([`set_calendar`](Self::set_calendar)) and the wall
    /// times [`persist`](Self::persist) writes follow `clock` from there.
    /// For tests: pass `quanta::Clock::mock()` and a UTC instant, and move
    /// time across days and months by hand. (Other managers map their
    /// clock's zero to the wall clock read when they are created.)
    pub fn with_clock_at(clock: ClockSource, utc_origin: chrono::DateTime<chrono::Utc>) -> Self {
        Self::on(Clock::at(clock, utc_origin))
    }

    /// An empty manager that reads a coarse clock: quanta's *recent* time,
    /// one atomic load (about 2 ns) instead of a TSC read and its scaling
    /// (about 20 ns on the benchmark machine, a fifth of a `reserve`).
    ///
    /// The price is resolution: time moves in steps of the upkeep interval,
    /// so each window lasts its length to within about one `interval` of the
    /// real clock, early or late, and `retry_after` is that coarse too.
    /// Every operation still sees one monotonic timeline.
    ///
    /// Starts quanta's process-wide upkeep thread at `interval` unless one
    /// is running already (then its interval applies), and keeps it running
    /// for the life of the process. Pass `quanta::Clock::new()`, or a mock
    /// clock in tests (its recent time is its value). Fails if `interval`
    /// is zero (the thread would spin) or the thread cannot be spawned.
    #[cfg(not(agent_budget_loom))]
    pub fn with_coarse_clock(
        clock: ClockSource,
        interval: std::time::Duration,
    ) -> std::io::Result<Self> {
        Ok(Self::on(Clock::coarse(clock, interval)?))
    }

    fn on(clock: Clock) -> Self {
        BudgetManager {
            agents: Registry::new(),
            clock,
            generations: AtomicU64::new(0),
            config: Mutex::new(Hierarchy::default()),
            events: Events::default(),
        }
    }

    fn next_generation(&self) -> u64 {
        // Relaxed: only uniqueness is needed, which the RMW gives.
        self.generations.fetch_add(1, Ordering::Relaxed)
    }

    /// The one clock read of an operation.
    #[inline]
    pub(crate) fn now(&self) -> Now {
        self.clock.now()
    }

    /// Announces one operation on the registry and holds its index.
    #[inline]
    pub(crate) fn pin(&self) -> Pinned<'_> {
        self.agents.pin(&self.clock)
    }

    /// [`pin`](Self::pin) for a handle, which reaches its cell by slot: the
    /// index is taken only if the agent has to be looked up.
    #[inline]
    pub(crate) fn pin_unindexed(&self) -> Pinned<'_> {
        self.agents.pin_unindexed(&self.clock)
    }

    fn config(&self) -> MutexGuard<'_, Hierarchy> {
        // A poisoned lock is taken over: every change it guards is made
        // whole before anything that could panic.
        self.config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets an agent's budget: a fixed window. A new agent's first window
    /// starts now; a known agent keeps its usage and window, judged from now
    /// on against the new limit (and its parent, if it has one). An agent on
    /// a refilling budget switches to windows with what it has in use.
    pub fn set_budget(&self, limit: BudgetLimit) {
        self.configure(Configured::Window(limit));
    }

    /// Sets an agent's budget: windows on the UTC calendar (see
    /// [`CalendarLimit`]): days from 00:00 UTC, or months from the 1st,
    /// 00:00 UTC. The current window is the day or month containing now,
    /// and ends at the next boundary. Like [`set_budget`](Self::set_budget):
    /// a known agent on windows keeps its usage in its current window (which
    /// now ends at the calendar boundary after it started), an agent on a
    /// bucket switches with what it has in use, and its parent is kept.
    ///
    /// UTC comes from the manager's clock: its zero is mapped to the wall
    /// clock when the manager is created (see
    /// [`with_clock_at`](Self::with_clock_at)), and the monotonic clock
    /// measures from there, so a wall clock stepped later does not move
    /// the windows.
    pub fn set_calendar(&self, limit: CalendarLimit) {
        self.configure(Configured::Calendar(limit));
    }

    /// Sets an agent's budget: a bucket that refills continuously (see
    /// [`RefillLimit`]). A new agent starts full; a known agent keeps what
    /// it has in use (under a fixed window: its window's usage), now
    /// refilling at the new rate, and keeps its parent.
    pub fn set_refill(&self, limit: RefillLimit) {
        self.configure(Configured::Refill(limit));
    }

    fn configure(&self, configured: Configured) {
        let hierarchy = self.config();
        let agent_id = configured.agent_id();
        let now = self.clock.now();
        let limit = Limit::new(configured, hierarchy.parent_of(&agent_id));
        if let Some(cell) = self.pin().get(&agent_id) {
            // A budget set again finds a window that has run its length
            // over, as any write does (the new limit then applies to a
            // fresh window). SeqCst: it makes room, as a refund does; the
            // waiters are woken below.
            let policy = cell.enforced().policy;
            cell.update(Ordering::SeqCst, now, |s| {
                (s.ended_window(&policy, &limit.policy, now), ())
            });
        }
        let fresh = State::fresh(now.start_tick());
        self.agents
            .configure(agent_id, &limit, now, fresh, || self.next_generation());
        drop(hierarchy);
        self.events.limit_changed(&agent_id);
    }

    /// Puts `child`'s budget under `parent`'s (or, with `None`, detaches
    /// it): from then on a request for `child` is admitted only if every
    /// level of its chain (the child, its parent, the parent's parent...)
    /// can take it, and is taken at all of them or at none.
    ///
    /// Both must have budgets. A link that would close a cycle, or make a
    /// chain longer than [`MAX_LEVELS`](crate::MAX_LEVELS), is refused, and
    /// nothing changes. Reservations already taken keep the levels they were
    /// taken at.
    pub fn set_parent(
        &self,
        child: &AgentId,
        parent: Option<&AgentId>,
    ) -> Result<(), HierarchyError> {
        let mut hierarchy = self.config();
        let known = |id: &AgentId| self.pin().get(id).is_some();
        if !known(child) {
            return Err(HierarchyError::UnknownAgent(*child));
        }
        if let Some(parent) = parent {
            if !known(parent) {
                return Err(HierarchyError::UnknownAgent(*parent));
            }
            hierarchy.check_link(*child, *parent)?;
        }
        let before = hierarchy.parent_of(child);
        hierarchy.set_parent(*child, parent.copied());
        self.relink(child, parent.copied());
        drop(hierarchy);
        // Waiters refused at the old parent may fit under the new one.
        self.events.limit_changed(child);
        if let Some(before) = before {
            self.events.limit_changed(&before);
        }
        Ok(())
    }

    /// Stores `child`'s new parent beside its cell; under the config lock.
    fn relink(&self, child: &AgentId, parent: Option<AgentId>) {
        let now = self.clock.now();
        let limit = self.pin().get(child).map(|cell| cell.limit(*child));
        if let Some(limit) = limit {
            let limit = limit.with_parent(parent);
            let fresh = State::fresh(now.start_tick());
            self.agents
                .configure(*child, &limit, now, fresh, || self.next_generation());
        }
    }

    /// Forgets an agent's budget and usage. Its reservations settle to
    /// [`Settlement::AgentRemoved`] at its own level (and still apply at
    /// its ancestors), even if its budget is set again, and its waiting
    /// futures end with a refusal. Its children, if any, are detached: they
    /// keep their own budgets, now without a parent.
    pub fn remove_budget(&self, agent_id: &AgentId) {
        let mut hierarchy = self.config();
        // Retired, then out of the index: from here on no handle and no
        // lookup that raced the removal admits anything into it.
        self.agents.remove(agent_id, self.clock.now());
        let children = hierarchy.remove(*agent_id);
        for child in &children {
            self.relink(child, None);
        }
        drop(hierarchy);
        self.events.limit_changed(agent_id);
        for child in &children {
            self.events.limit_changed(child);
        }
    }

    /// Takes `tokens` and `calls` together, or neither, and returns a
    /// [`Reservation`] to settle once the real usage is known.
    ///
    /// This is the operation new code should use: see the crate docs for
    /// the gateway flow. Zero of a resource always fits. For an agent with
    /// ancestors, every level must take the request, or none keeps it.
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

    /// [`acquire`](Self::acquire), returning an [`OwnedReservation`] that
    /// holds an `Arc` of the manager: it can move into a spawned task or a
    /// response body, and settle there.
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

    /// [`acquire_owned`](Self::acquire_owned), and where each level the
    /// request was taken at stands just after: `report` gets the agent's
    /// own [`FullBudgetInfo`], then each ancestor's, nearest first, as
    /// [`chain_info`](Self::chain_info) lists them. Nothing is reported
    /// on a refusal.
    ///
    /// It is `acquire_owned` followed by `chain_info`, without a second
    /// announcement on the registry or a `Vec`: what a gateway needs for
    /// an admitted response's rate-limit headers, about 400 instructions
    /// less a request (callgrind, `budget-gateway/benches/instructions.sh`).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use agent_budget::{BudgetLimit, BudgetManager};
    ///
    /// let budgets = Arc::new(BudgetManager::new());
    /// let agent = uuid::Uuid::new_v4();
    /// budgets.set_budget(BudgetLimit { agent_id: agent, token_budget: 100, calls_budget: 10, window_secs: 60 });
    /// let mut left = Vec::new();
    /// let taken = budgets.acquire_owned_reporting(&agent, 40, 1, |info| left.push(info.tokens_remaining))?;
    /// assert_eq!(left, [60]);
    /// taken.settle(40);
    /// # Ok::<(), agent_budget::Refused>(())
    /// ```
    pub fn acquire_owned_reporting(
        self: &Arc<Self>,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
        mut report: impl FnMut(FullBudgetInfo),
    ) -> Result<OwnedReservation, Refused> {
        let refused = |r: Refusal| r.refused(*agent_id, Operation::Acquire);
        let pinned = self.pin();
        let own = pinned
            .get(agent_id)
            .ok_or_else(|| refused(Refusal::NoBudget))?;
        let enforced = own.enforced();
        if !enforced.has_parent {
            // One level (the common case): reported from the state the
            // take left, not looked up and loaded again.
            let now = self.clock.now();
            let (level, after) =
                take_own(agent_id, own, &enforced, now, (tokens, calls)).map_err(refused)?;
            report(full_budget_info(&own.limit(*agent_id), after, now));
            let ticket = Ticket::new((tokens, calls), Levels::Own(level));
            return Ok(OwnedReservation::new(self.clone(), ticket));
        }
        let levels = self
            .admit_from(&pinned, agent_id, own, (tokens, calls))
            .map_err(refused)?;
        let now = self.clock.now();
        for level in levels.iter() {
            let info = pinned
                .get(&level.agent_id)
                .and_then(|cell| info_of(&level.agent_id, cell.expecting(level.generation), now));
            if let Some(info) = info {
                report(info);
            }
        }
        let ticket = Ticket::new((tokens, calls), levels);
        Ok(OwnedReservation::new(self.clone(), ticket))
    }

    /// Waits until `tokens` and `calls` fit, then takes them together, like
    /// [`acquire`](Self::acquire).
    ///
    /// Resolves as soon as the request fits: woken by a settle or cancel
    /// that refunds, a `release`, a `reset_window`, a `set_budget`, or the
    /// window's end, and only by events on this agent. Resolves to an error
    /// at once when waiting cannot help (no budget, or a request larger
    /// than the limit), and when the agent's budget is removed while it
    /// waits. Dropping the future at any point takes nothing and leaves
    /// nothing behind. A deadline is the caller's: wrap it in
    /// `tokio::time::timeout`. It must be polled inside a tokio runtime
    /// with its time driver enabled (for the window-end timer).
    ///
    /// Fairness: see [waiting](crate::docs::semantics#waiting-for-budget).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use std::time::Duration;
    /// use agent_budget::{BudgetLimit, BudgetManager};
    ///
    /// let budgets = BudgetManager::new();
    /// let agent = uuid::Uuid::new_v4();
    /// budgets.set_budget(BudgetLimit { agent_id: agent, token_budget: 100, calls_budget: 10, window_secs: 60 });
    /// let first = budgets.acquire(&agent, 100, 1).unwrap();
    /// let (waited, _) = tokio::join!(
    ///     tokio::time::timeout(Duration::from_secs(5), budgets.acquire_wait(&agent, 60, 1)),
    ///     async { first.settle(30); }, // 70 tokens come back: the waiter is woken
    /// );
    /// let second = waited.expect("in time").expect("fits");
    /// assert_eq!(second.tokens(), 60);
    /// # }
    /// ```
    #[cfg(feature = "async")]
    pub fn acquire_wait(
        &self,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> impl std::future::Future<Output = Result<Reservation<'_>, Refused>> + Send + '_ {
        crate::wait::acquire_wait(self, agent_id, tokens, calls)
    }

    /// [`acquire_wait`](Self::acquire_wait) on an `Arc` of the manager: the
    /// future is `'static`, so it can be spawned, and resolves to an
    /// [`OwnedReservation`].
    #[cfg(feature = "async")]
    pub fn acquire_owned_wait(
        self: &Arc<Self>,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> impl std::future::Future<Output = Result<OwnedReservation, Refused>> + Send + 'static {
        crate::wait::acquire_owned_wait(self, agent_id, tokens, calls)
    }

    /// Takes every claim at its agent and at each of that agent's
    /// ancestors (with that claim's amounts), all or none, and returns a
    /// [`SetReservation`] to settle once the real usage is known.
    ///
    /// This is how a request is admitted against several limits at once: a
    /// key's per-minute and per-day limits, its spend in micro-dollars, a
    /// per-model limit, each kept as an agent of its own. A limit reached
    /// by two claims (directly or through ancestors) is taken once, with
    /// the largest amount of each resource among them. A refusal names the
    /// limit that refused (`refused_by`), the agent of the claim that
    /// reached it (`agent_id`) and when that limit frees (`retry_after`);
    /// nothing is then taken anywhere. More than
    /// [`MAX_SET_LIMITS`](crate::MAX_SET_LIMITS) claims or limits are
    /// refused with [`RefusalReason::TooManyLimits`](crate::RefusalReason::TooManyLimits).
    /// An empty set is admitted, taking nothing. See
    /// [`docs::semantics`](crate::docs::semantics#several-limits-at-once).
    ///
    /// ```
    /// use agent_budget::{BudgetLimit, BudgetManager, Claim};
    ///
    /// let budgets = BudgetManager::new();
    /// let (per_minute, per_day) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    /// budgets.set_budget(BudgetLimit { agent_id: per_minute, token_budget: 1_000, calls_budget: 10, window_secs: 60 });
    /// budgets.set_budget(BudgetLimit { agent_id: per_day, token_budget: 50_000, calls_budget: 1_000, window_secs: 86_400 });
    ///
    /// let claims = [
    ///     Claim { agent_id: per_minute, tokens: 600, calls: 1 },
    ///     Claim { agent_id: per_day, tokens: 600, calls: 1 },
    /// ];
    /// let reservation = budgets.acquire_set(&claims)?;
    /// reservation.settle(250);
    /// assert_eq!(budgets.remaining(&per_minute).tokens_remaining, 750);
    /// assert_eq!(budgets.remaining(&per_day).tokens_remaining, 49_750);
    /// # Ok::<(), agent_budget::Refused>(())
    /// ```
    #[inline]
    pub fn acquire_set(&self, claims: &[Claim]) -> Result<SetReservation<'_>, Refused> {
        self.acquire_ticket(claims, None)
            .map(|ticket| SetReservation::new(self, ticket))
    }

    /// [`acquire_set`](Self::acquire_set), except that a limit for which
    /// `shadowed` is true (a limit rolled out in shadow mode) never
    /// refuses: it takes what the claims ask of it even past its limit,
    /// and counts it, while every other limit is enforced as ever, all in
    /// the one admission. Settled and given back like any set: what a
    /// shadowed limit took beyond its limit is rebooked at the settle.
    ///
    /// `shadowed` is asked once for each limit the claims reach (their
    /// agents and ancestors), while the admission runs: it should be a
    /// quick lookup.
    ///
    /// ```
    /// use agent_budget::{BudgetLimit, BudgetManager, Claim};
    ///
    /// let budgets = BudgetManager::new();
    /// let (team, trial) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    /// budgets.set_budget(BudgetLimit { agent_id: team, token_budget: 1_000, calls_budget: 100, window_secs: 60 });
    /// budgets.set_budget(BudgetLimit { agent_id: trial, token_budget: 10, calls_budget: 1, window_secs: 60 });
    /// budgets.set_parent(&trial, Some(&team)).unwrap();
    ///
    /// // The trial limit is rolled out in shadow mode: it counts, it does
    /// // not refuse; the team's limit still does.
    /// let claim = [Claim { agent_id: trial, tokens: 600, calls: 1 }];
    /// let taken = budgets.acquire_set_shadowed(&claim, |id| *id == trial)?;
    /// assert_eq!(budgets.full_info(&trial).unwrap().tokens_used, 600);
    /// assert!(budgets.acquire_set_shadowed(&claim, |id| *id == trial).is_err());
    /// taken.settle(500);
    /// assert_eq!(budgets.remaining(&team).tokens_remaining, 500);
    /// # Ok::<(), agent_budget::Refused>(())
    /// ```
    pub fn acquire_set_shadowed(
        &self,
        claims: &[Claim],
        shadowed: impl Fn(&AgentId) -> bool,
    ) -> Result<SetReservation<'_>, Refused> {
        self.acquire_ticket(claims, Some(&shadowed))
            .map(|ticket| SetReservation::new(self, ticket))
    }

    /// [`acquire_set_shadowed`](Self::acquire_set_shadowed), returning an
    /// [`OwnedSetReservation`] that holds an `Arc` of the manager.
    pub fn acquire_set_owned_shadowed(
        self: &Arc<Self>,
        claims: &[Claim],
        shadowed: impl Fn(&AgentId) -> bool,
    ) -> Result<OwnedSetReservation, Refused> {
        self.acquire_ticket(claims, Some(&shadowed))
            .map(|ticket| OwnedSetReservation::new(self.clone(), ticket))
    }

    /// [`acquire_set`](Self::acquire_set), returning an
    /// [`OwnedSetReservation`] that holds an `Arc` of the manager.
    pub fn acquire_set_owned(
        self: &Arc<Self>,
        claims: &[Claim],
    ) -> Result<OwnedSetReservation, Refused> {
        self.acquire_ticket(claims, None)
            .map(|ticket| OwnedSetReservation::new(self.clone(), ticket))
    }

    /// [`acquire_set_owned`](Self::acquire_set_owned), and where each
    /// limit taken stands just after: `report` gets, for every limit in the
    /// order they were taken (each claim's own agent first, then parents,
    /// ...; each depth by ascending agent id), the first claim (its index
    /// in `claims`) that reaches it, directly or through an ancestor, and
    /// its [`FullBudgetInfo`]. Nothing is reported on a refusal.
    ///
    /// It is the set's acquire followed by a `full_info` of each limit,
    /// under the admission's own guard: what a gateway reports in a
    /// response's headers, without reading the registry again.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use agent_budget::{BudgetLimit, BudgetManager, Claim};
    ///
    /// let budgets = Arc::new(BudgetManager::new());
    /// let (per_minute, per_day) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    /// budgets.set_budget(BudgetLimit { agent_id: per_minute, token_budget: 1_000, calls_budget: 10, window_secs: 60 });
    /// budgets.set_budget(BudgetLimit { agent_id: per_day, token_budget: 50_000, calls_budget: 1_000, window_secs: 86_400 });
    ///
    /// let claims = [
    ///     Claim { agent_id: per_minute, tokens: 600, calls: 1 },
    ///     Claim { agent_id: per_day, tokens: 600, calls: 1 },
    /// ];
    /// let mut left = Vec::new();
    /// let taken = budgets.acquire_set_owned_reporting(&claims, |claim, info| {
    ///     left.push((claim, info.agent_id, info.tokens_remaining))
    /// })?;
    /// left.sort_by_key(|&(claim, _, _)| claim);
    /// assert_eq!(left, [(0, per_minute, 400), (1, per_day, 49_400)]);
    /// taken.settle(250);
    /// # Ok::<(), agent_budget::Refused>(())
    /// ```
    pub fn acquire_set_owned_reporting(
        self: &Arc<Self>,
        claims: &[Claim],
        mut report: impl FnMut(usize, FullBudgetInfo),
    ) -> Result<OwnedSetReservation, Refused> {
        let pinned = self.pin();
        let now = self.clock.now();
        let refused = |(r, agent_id): (Refusal, AgentId)| r.refused(agent_id, Operation::Acquire);
        let mut flat = Flat::new();
        if let Some(taken) = self.take_flat(&pinned, claims, now, &mut flat) {
            taken.map_err(refused)?;
            for taken in flat.iter() {
                let id = claims[usize::from(taken.claim)].agent_id;
                let info = full_budget_info(&taken.cell.limit(id), taken.left, now);
                report(usize::from(taken.claim), info);
            }
            let ticket = SetTicket::new(claims, flat.levels(claims));
            return Ok(OwnedSetReservation::new(self.clone(), ticket));
        }
        let mut plan = Plan::new();
        self.take_claims(&pinned, claims, None, None, now, &mut plan)
            .map_err(refused)?;
        // Each limit from the state its take left, not looked up and
        // loaded again.
        for limit in plan.in_order() {
            if let (Some(_), Some(left)) = (limit.taken, limit.left) {
                let (cell, _) = limit.payload;
                let info = full_budget_info(&cell.limit(limit.id), left, now);
                report(limit.first_claim(), info);
            }
        }
        let ticket = SetTicket::new(claims, plan.taken());
        Ok(OwnedSetReservation::new(self.clone(), ticket))
    }

    /// Waits until every claim fits, then takes them all, like
    /// [`acquire_set_owned`](Self::acquire_set_owned).
    ///
    /// Waits as [`acquire_owned_wait`](Self::acquire_owned_wait) does, at
    /// the limit that refused it last (the one that binds): woken by the
    /// events there (a refund, a new window), it tries the whole set again,
    /// and if another limit then refuses, waits there. Resolves to an error
    /// at once when waiting cannot help: a claim's agent without a budget,
    /// an amount larger than a limit, a set too large.
    #[cfg(feature = "async")]
    pub fn acquire_set_owned_wait(
        self: &Arc<Self>,
        claims: Vec<Claim>,
    ) -> impl std::future::Future<Output = Result<OwnedSetReservation, Refused>> + Send + 'static
    {
        crate::wait::acquire_set_owned_wait(self, claims)
    }

    /// How many [`acquire_wait`](Self::acquire_wait) and
    /// [`acquire_owned_wait`](Self::acquire_owned_wait) futures are waiting
    /// right now, over all agents (for a gauge).
    #[cfg(feature = "async")]
    pub fn waiting(&self) -> usize {
        self.events.waiters().len()
    }

    /// Takes `tokens` if they fit in the current window (the seed's API;
    /// prefer [`acquire`](Self::acquire)).
    ///
    /// Starts a new window first if the current one has expired.
    pub fn reserve(&self, agent_id: &AgentId, tokens: u64) -> Result<(), BudgetExceeded> {
        self.admit(agent_id, (tokens, 0), None)
            .map(drop)
            .map_err(|r| r.into_error(*agent_id, Operation::Reserve))
    }

    /// Counts one call if it fits in the current window (the seed's API;
    /// prefer [`acquire`](Self::acquire)).
    pub fn track_call(&self, agent_id: &AgentId) -> Result<(), BudgetExceeded> {
        self.admit(agent_id, (0, 1), None)
            .map(drop)
            .map_err(|r| r.into_error(*agent_id, Operation::TrackCall))
    }

    /// Gives `tokens` back now, never below zero, at the agent's level and
    /// at each of its ancestors' (the seed's API). It trusts the caller's
    /// amount and cannot tell which window the tokens were spent in; a
    /// [`Reservation`] can.
    pub fn release(&self, agent_id: &AgentId, tokens: u64) {
        let pinned = self.pin();
        if let Some(own) = pinned.get(agent_id) {
            self.release_from(&pinned, agent_id, own, tokens);
        }
    }

    /// [`release`](Self::release) for an agent whose cell is at hand.
    pub(crate) fn release_from(
        &self,
        pinned: &Pinned<'_>,
        agent_id: &AgentId,
        own: CellRef<'_>,
        tokens: u64,
    ) {
        let now = self.clock.now();
        let mut released = ChainIds::new();
        walk_chain(pinned, *agent_id, own, |id, cell, enforced| {
            let policy = enforced.policy;
            // SeqCst: a refund, paired with waiters' registration (see
            // `Waiters::wake`).
            let updated = cell.update(Ordering::SeqCst, now, |s| {
                (s.release(&policy, now, tokens), ())
            });
            if updated.is_some_and(|(before, after, ())| after != before) {
                released.push(id);
            }
            true
        });
        for level in released.iter() {
            self.events.refunded(level, || self.headroom(level));
        }
    }

    /// A handle on the agent, for callers that come back to it again and
    /// again: its operations skip the map lookup. `None` if the agent has
    /// no budget. See [`AgentHandle`] for what happens once the agent is
    /// removed.
    pub fn handle(&self, agent_id: &AgentId) -> Option<AgentHandle<'_>> {
        let (slot, generation) = self.place_of(agent_id)?;
        Some(AgentHandle::new(self, *agent_id, slot, generation))
    }

    /// [`handle`](Self::handle) on an `Arc` of the manager: the handle is
    /// `Send`, `Sync` and `'static`.
    pub fn handle_owned(self: &Arc<Self>, agent_id: &AgentId) -> Option<OwnedAgentHandle> {
        let (slot, generation) = self.place_of(agent_id)?;
        Some(OwnedAgentHandle::new(
            self.clone(),
            *agent_id,
            slot,
            generation,
        ))
    }

    /// Where the agent's cell is now, and its incarnation: what a handle
    /// holds.
    fn place_of(&self, agent_id: &AgentId) -> Option<(SlotRef, u64)> {
        let pinned = self.pin();
        let cell = pinned.get(agent_id)?.current();
        Some((cell.slot(), cell.generation()))
    }

    /// Takes `request` (tokens, calls) at every level of the agent's chain,
    /// or at none, if the agent is incarnation `generation` (when one is
    /// given). Returns the levels it was taken at.
    #[inline(always)]
    fn admit(
        &self,
        agent_id: &AgentId,
        request: (u64, u64),
        generation: Option<u64>,
    ) -> Result<Levels, Refusal> {
        self.admit_under(&self.pin(), agent_id, request, generation)
    }

    /// [`admit`](Self::admit) within an operation the caller announced.
    #[inline(always)]
    fn admit_under(
        &self,
        pinned: &Pinned<'_>,
        agent_id: &AgentId,
        request: (u64, u64),
        generation: Option<u64>,
    ) -> Result<Levels, Refusal> {
        let Some(own) = pinned.get(agent_id) else {
            return Err(Refusal::NoBudget);
        };
        let own = match generation {
            Some(generation) => own.expecting(generation),
            None => own,
        };
        self.admit_from(pinned, agent_id, own, request)
    }

    /// [`admit`](Self::admit) for an agent whose cell is at hand (found in
    /// the map, or held by a handle): the set of one claim, `(tokens,
    /// calls)` on `agent_id`, taken by [`take_claims`](Self::take_claims).
    ///
    /// An agent without a parent is a plan of one limit, taken here
    /// directly (the same take, without building the plan), so the common
    /// case stays one lookup and one compare-and-swap.
    #[inline(always)]
    pub(crate) fn admit_from(
        &self,
        pinned: &Pinned<'_>,
        agent_id: &AgentId,
        own: CellRef<'_>,
        (tokens, calls): (u64, u64),
    ) -> Result<Levels, Refusal> {
        let now = self.clock.now();
        let enforced = own.enforced();
        let (own_level, _) = take_own(agent_id, own, &enforced, now, (tokens, calls))?;
        if !enforced.has_parent {
            return Ok(Levels::Own(own_level));
        }
        // A chain is the plan of one claim, whose order is the walk's (one
        // limit per depth, nothing to merge): taken as walked, without
        // building the plan (a third of a chain's admission, measured).
        let generation = own.generation();
        let mut levels = Levels::Own(own_level);
        let mut refused = None;
        walk_ancestors(pinned, *agent_id, own, |id, cell, enforced| {
            match take(id, cell, enforced.policy, now, (tokens, calls), generation) {
                Ok(Some(level)) => levels.push(level),
                // An ancestor removed meanwhile is no longer a limit.
                Ok(None) => {}
                Err(refusal) => refused = Some(refusal),
            }
            refused.is_none()
        });
        match refused {
            None => Ok(levels),
            Some(refusal) => {
                self.give_back_levels(pinned, &levels, (tokens, calls), now);
                Err(refusal)
            }
        }
    }

    /// Takes every limit `claims` reach (each claim's agent, then its
    /// ancestors), all or none: the one admission both `acquire` on a chain
    /// and `acquire_set` run.
    ///
    /// The plan lists each limit once (with the largest amounts among the
    /// claims that reach it) by depth (claims' agents, then parents...),
    /// then ascending agent id, and takes them in that order, each a
    /// compare-and-swap on that limit's own word: a chain is taken from the
    /// agent up, as always, and the first limit to refuse is the lowest
    /// one short of room, the one a refusal names. If
    /// one refuses, those taken give back what they took (into the window
    /// they took it from). Between the take and the give-back another
    /// request may be refused by a limit that is about to get the budget
    /// back: the one exception to all-or-nothing being atomic, and never an
    /// over-admission (see `docs::semantics`). The fixed order makes two
    /// requests that share limits at one depth meet first at the lowest id
    /// they share, so that one of them wins there instead of each holding
    /// what the other needs.
    ///
    /// `first` is `claims[0]`'s cell when the caller has it at hand;
    /// `shadowed` names the limits that take past their limit instead of
    /// refusing (see [`acquire_set_shadowed`](Self::acquire_set_shadowed));
    /// `plan` an empty plan, filled in place (it is a kilobyte inline:
    /// returning it by value would copy it). A refusal comes with the
    /// agent of the claim it concerns.
    #[inline]
    pub(crate) fn take_claims<'p>(
        &self,
        pinned: &'p Pinned<'_>,
        claims: &[Claim],
        first: Option<CellRef<'p>>,
        shadowed: Shadowed<'_>,
        now: Now,
        plan: &mut Plan<(CellRef<'p>, Policy)>,
    ) -> Result<(), (Refusal, AgentId)> {
        let who = |n: usize| claims.get(n).map_or(AgentId::nil(), |c| c.agent_id);
        set::check_size(claims)?;
        let mut generation = None;
        for (n, claim) in claims.iter().enumerate() {
            let cell = match (n, first) {
                (0, Some(cell)) => Some(cell),
                _ => pinned.get(&claim.agent_id),
            };
            let Some(cell) = cell else {
                return Err((Refusal::NoBudget, claim.agent_id));
            };
            generation.get_or_insert(cell.generation());
            let amounts = (claim.tokens, claim.calls);
            let too_many = |TooMany(limits)| (Refusal::TooMany { limits }, claim.agent_id);
            // The policy read once here is the one the take enforces, as
            // for a single agent.
            let enforced = cell.enforced();
            plan.add(claim.agent_id, (cell, enforced.policy), n, amounts, 0)
                .map_err(too_many)?;
            if enforced.has_parent {
                let (mut full, mut depth) = (Ok(()), 0);
                walk_ancestors(pinned, claim.agent_id, cell, |id, cell, enforced| {
                    depth += 1;
                    full = plan.add(id, (cell, enforced.policy), n, amounts, depth);
                    full.is_ok()
                });
                full.map_err(too_many)?;
            }
        }
        plan.sort();
        let generation = generation.unwrap_or_default();
        for k in 0..plan.order.len() {
            let n = usize::from(plan.order[k]);
            // By reference: a planned limit is over a hundred bytes.
            let limit = &plan.limits[n];
            let (cell, policy) = limit.payload;
            let amounts = (limit.tokens, limit.calls);
            let taken = match shadowed {
                Some(shadowed) if shadowed(&limit.id) => {
                    Ok(take_past(limit.id, cell, policy, now, amounts))
                }
                _ => take_reporting(limit.id, cell, policy, now, amounts, generation),
            };
            let refusal = match taken {
                Ok(Some((level, left))) => {
                    plan.limits[n].taken = Some(level);
                    plan.limits[n].left = Some(left);
                    continue;
                }
                // An ancestor removed meanwhile is no longer a limit.
                Ok(None) if !limit.own => continue,
                Ok(None) => Refusal::NoBudget,
                Err(refusal) => refusal,
            };
            let claim = limit.first_claim();
            self.give_back(pinned, plan, now);
            return Err((refusal, who(claim)));
        }
        Ok(())
    }

    /// [`take_claims`](Self::take_claims) for the common set: at most
    /// [`FLAT_CLAIMS`] claims, each on its own agent, none with a parent
    /// (a key's minute, day and spend limits, say). Its plan would be the
    /// claims themselves in ascending order of agent id, so none is built:
    /// the same limits, taken in the same order, with the same refusal
    /// and give-back, without the plan's kilobyte of bookkeeping (see
    /// `docs::implementation`, "Sets of limits").
    ///
    /// `None` when the set is of another shape, or a claim's agent has no
    /// budget: nothing was taken, and the general plan takes it (or
    /// refuses it) from the start. `flat` is an empty [`Flat`], filled in
    /// place (returned, it would be copied).
    #[inline]
    fn take_flat<'p>(
        &self,
        pinned: &'p Pinned<'_>,
        claims: &[Claim],
        now: Now,
        flat: &mut Flat<'p>,
    ) -> Option<Result<(), (Refusal, AgentId)>> {
        if claims.is_empty() || claims.len() > FLAT_CLAIMS {
            return None;
        }
        let mut cells = [None; FLAT_CLAIMS];
        for (slot, claim) in cells.iter_mut().zip(claims) {
            let cell = pinned.get(&claim.agent_id)?;
            // The policy read once here is the one the take enforces.
            let enforced = cell.enforced();
            if enforced.has_parent {
                return None;
            }
            *slot = Some((cell, enforced.policy));
        }
        let order = flat_order(claims)?;
        let generation = cells[0].map_or(0, |(cell, _)| cell.generation());
        for (k, &n) in order[..claims.len()].iter().enumerate() {
            let claim = &claims[usize::from(n)];
            let amounts = (claim.tokens, claim.calls);
            let taken = match cells[usize::from(n)] {
                Some((cell, policy)) => {
                    take_reporting(claim.agent_id, cell, policy, now, amounts, generation)
                        .map(|taken| taken.map(|(level, left)| (cell, level, left)))
                }
                // Not so: every claim's cell was found above.
                None => Ok(None),
            };
            let refusal = match taken {
                Ok(Some((cell, level, left))) => {
                    flat.taken[k] = Some(FlatTaken {
                        claim: n,
                        cell,
                        level,
                        left,
                    });
                    continue;
                }
                // Its agent removed meanwhile: a claim's own agent gone.
                Ok(None) => Refusal::NoBudget,
                Err(refusal) => refusal,
            };
            for taken in flat.taken[..k].iter().rev().flatten() {
                let claim = &claims[usize::from(taken.claim)];
                self.give_back_level(pinned, &taken.level, (claim.tokens, claim.calls), now);
            }
            return Some(Err((refusal, claim.agent_id)));
        }
        Some(Ok(()))
    }

    /// Undoes a partial admission: each limit of `plan` taken so far gets
    /// what it took back, in the window it was taken from.
    fn give_back<P: Copy>(&self, pinned: &Pinned<'_>, plan: &Plan<P>, now: Now) {
        for limit in plan.in_order().rev() {
            if let Some(level) = &limit.taken {
                self.give_back_level(pinned, level, (limit.tokens, limit.calls), now);
            }
        }
    }

    /// Gives `request` back to the limit it was taken from, into the window
    /// it was taken in, and wakes its waiters.
    fn give_back_level(&self, pinned: &Pinned<'_>, level: &Level, request: (u64, u64), now: Now) {
        if let Some(cell) = pinned.get(&level.agent_id) {
            let cell = cell.expecting(level.generation);
            let policy = cell.enforced().policy;
            // SeqCst: a refund; see `release`.
            cell.update(Ordering::SeqCst, now, |s| {
                match s.settle(&policy, now, level.taken_in, request, (0, 0)) {
                    Refund::Applied { next, .. } => (next, ()),
                    _ => (s, ()),
                }
            });
        }
        let agent_id = &level.agent_id;
        self.events.refunded(agent_id, || self.headroom(agent_id));
    }

    /// [`give_back`](Self::give_back) for a chain's levels, each of which
    /// took `request`.
    fn give_back_levels(
        &self,
        pinned: &Pinned<'_>,
        levels: &Levels,
        request: (u64, u64),
        now: Now,
    ) {
        for level in levels.iter().rev() {
            self.give_back_level(pinned, level, request, now);
        }
    }

    /// [`admit_set`](Self::admit_set), its refusal as the public API
    /// answers it.
    #[inline]
    fn acquire_ticket(
        &self,
        claims: &[Claim],
        shadowed: Shadowed<'_>,
    ) -> Result<Box<SetTicket>, Refused> {
        self.admit_set(&self.pin(), claims, shadowed)
            .map_err(|(r, agent_id)| r.refused(agent_id, Operation::Acquire))
    }

    /// Takes every limit `claims` reach, all or none, the `shadowed` ones
    /// past their limit; see [`take_claims`](Self::take_claims).
    #[inline]
    fn admit_set(
        &self,
        pinned: &Pinned<'_>,
        claims: &[Claim],
        shadowed: Shadowed<'_>,
    ) -> Result<Box<SetTicket>, (Refusal, AgentId)> {
        let now = self.clock.now();
        // One claim on an agent without a parent is a plan of one limit:
        // taken directly, as `acquire` takes it.
        if let ([claim], None) = (claims, shadowed) {
            let cell = pinned
                .get(&claim.agent_id)
                .ok_or((Refusal::NoBudget, claim.agent_id))?;
            let enforced = cell.enforced();
            if !enforced.has_parent {
                let amounts = (claim.tokens, claim.calls);
                let generation = cell.generation();
                return match take(
                    claim.agent_id,
                    cell,
                    enforced.policy,
                    now,
                    amounts,
                    generation,
                ) {
                    Ok(Some(level)) => Ok(SetTicket::new(
                        claims,
                        std::iter::once(SetLevel {
                            level,
                            tokens: claim.tokens,
                            calls: claim.calls,
                            reached_by: 1,
                        }),
                    )),
                    Ok(None) => Err((Refusal::NoBudget, claim.agent_id)),
                    Err(refusal) => Err((refusal, claim.agent_id)),
                };
            }
        }
        if shadowed.is_none() {
            let mut flat = Flat::new();
            if let Some(taken) = self.take_flat(pinned, claims, now, &mut flat) {
                return taken.map(|()| SetTicket::new(claims, flat.levels(claims)));
            }
        }
        let mut plan = Plan::new();
        self.take_claims(pinned, claims, None, shadowed, now, &mut plan)?;
        Ok(SetTicket::new(claims, plan.taken()))
    }

    /// What the agent's own level can admit right now, for the wake rule.
    fn headroom(&self, agent_id: &AgentId) -> Option<(u64, u64)> {
        let now = self.clock.now();
        let pinned = self.pin();
        let cell = pinned.get(agent_id)?;
        let state = cell.load(now)?;
        Some(state.headroom(&cell.enforced().policy, now))
    }

    /// What is left at the agent's own level: in its current window, or in
    /// its bucket. A window that has expired reads as the fresh one the next
    /// write will start; an unknown agent reads as exhausted.
    pub fn remaining(&self, agent_id: &AgentId) -> BudgetInfo {
        self.pin()
            .get(agent_id)
            .map_or_else(unknown_agent_info, |cell| self.remaining_of(cell))
    }

    /// `remaining` of a cell at hand.
    pub(crate) fn remaining_of(&self, cell: CellRef<'_>) -> BudgetInfo {
        let now = self.clock.now();
        cell.load(now).map_or_else(unknown_agent_info, |state| {
            budget_info(&cell.enforced().policy, state, now)
        })
    }

    /// Whether [`acquire`](Self::acquire) of `tokens` and `calls` would be
    /// admitted now, taking nothing: `Err` with the refusal it would give
    /// (naming the lowest level short of room) if not.
    ///
    /// A check and a later acquire are two moments, and other requests
    /// may take or give back between them: `Ok` promises nothing. It is for
    /// deciding early what is already known, as a gateway refuses a request
    /// before reading its body when not even the least a request costs
    /// fits. Unlike an acquire and its cancel, it never makes a concurrent
    /// request find less room, and it costs one read per level.
    ///
    /// ```
    /// use agent_budget::{BudgetLimit, BudgetManager};
    ///
    /// let budgets = BudgetManager::new();
    /// let agent = uuid::Uuid::new_v4();
    /// budgets.set_budget(BudgetLimit { agent_id: agent, token_budget: 100, calls_budget: 1, window_secs: 60 });
    /// assert!(budgets.check(&agent, 100, 1).is_ok());
    /// assert_eq!(budgets.remaining(&agent).calls_remaining, 1, "nothing taken");
    /// let _taken = budgets.acquire(&agent, 10, 1)?;
    /// assert!(budgets.check(&agent, 1, 1).unwrap_err().retry_after.is_some());
    /// # Ok::<(), agent_budget::Refused>(())
    /// ```
    pub fn check(&self, agent_id: &AgentId, tokens: u64, calls: u64) -> Result<(), Refused> {
        let claim = Claim {
            agent_id: *agent_id,
            tokens,
            calls,
        };
        self.check_set(std::slice::from_ref(&claim))
    }

    /// [`check`](Self::check) for [`acquire_set`](Self::acquire_set):
    /// whether every limit the claims reach has room now for what each
    /// claim asks of it, taking nothing. `Ok` is no promise, as for
    /// `check`; nor does it count the limits against the set's maximum,
    /// which the acquire does.
    pub fn check_set(&self, claims: &[Claim]) -> Result<(), Refused> {
        set::check_size(claims).map_err(|(r, agent_id)| r.refused(agent_id, Operation::Acquire))?;
        let now = self.clock.now();
        let pinned = self.pin();
        claims.iter().try_for_each(|claim| {
            check_chain(&pinned, claim, now)
                .map_err(|refusal| refusal.refused(claim.agent_id, Operation::Acquire))
        })
    }

    /// Whether the agent, and every level above it, has both tokens and
    /// calls left.
    pub fn can_schedule(&self, agent_id: &AgentId) -> bool {
        let now = self.clock.now();
        let pinned = self.pin();
        let Some(own) = pinned.get(agent_id) else {
            return false;
        };
        let mut open = true;
        walk_chain(&pinned, *agent_id, own, |_, cell, enforced| {
            open &= cell
                .load(now)
                .is_some_and(|s| !budget_info(&enforced.policy, s, now).is_exhausted);
            open
        });
        open
    }

    /// Starts a fresh window (or a full bucket) for the agent's own level,
    /// now, with nothing used.
    pub fn reset_window(&self, agent_id: &AgentId) {
        let now = self.clock.now();
        let reset = self.pin().get(agent_id).and_then(|cell| {
            // SeqCst: a refund; see `release`.
            cell.update(Ordering::SeqCst, now, |s| (s.reset(now), ()))
        });
        if reset.is_some() {
            self.events.refunded(agent_id, || self.headroom(agent_id));
        }
    }

    /// The limits and usage of the agent's own level, or `None` if it has no
    /// budget.
    pub fn full_info(&self, agent_id: &AgentId) -> Option<FullBudgetInfo> {
        let now = self.clock.now();
        info_of(agent_id, self.pin().get(agent_id)?, now)
    }

    /// [`full_info`](Self::full_info) of the agent, then of each of its
    /// ancestors in order; empty if the agent has no budget.
    pub fn chain_info(&self, agent_id: &AgentId) -> Vec<FullBudgetInfo> {
        let now = self.clock.now();
        let mut chain = Vec::new();
        let pinned = self.pin();
        if let Some(own) = pinned.get(agent_id) {
            walk_chain(&pinned, *agent_id, own, |id, cell, _| {
                chain.extend(info_of(&id, cell, now));
                true
            });
        }
        chain
    }

    /// [`full_info`](Self::full_info) of every agent, in no particular order.
    pub fn all_full_info(&self) -> Vec<FullBudgetInfo> {
        let now = self.clock.now();
        let mut all = Vec::new();
        self.pin()
            .for_each(|id, cell| all.extend(info_of(&id, cell, now)));
        all
    }

    /// Writes every budget, its usage and its parent to `path` as JSON (the
    /// seed's layout, extended), atomically: a crash leaves the old file or
    /// the new one.
    ///
    /// Each agent is read atomically; agents changed during the call may be
    /// written as they were before or after the change.
    pub fn persist(&self, path: &Path) -> Result<(), PersistError> {
        let at = self.clock.moment();
        let mut agents = Vec::new();
        self.pin().for_each(|id, cell| {
            let Some(state) = cell.load(at.now) else {
                return;
            };
            let limit = cell.limit(id);
            agents.push(AgentState {
                configured: limit.configured,
                parent: limit.parent,
                state,
            });
        });
        persist::write(path, &agents, at)
    }

    /// Replaces every budget, its usage and its parent by those in `path`.
    /// A missing file changes nothing; a file that cannot be read or trusted
    /// (a parent cycle or a dangling parent included) changes nothing and is
    /// an error. Windows keep the part that was left. Handles to the agents
    /// that were there are retired, like those of removed agents.
    ///
    /// Meant for start-up: operations running concurrently may see a mix of
    /// the old and the restored agents while it runs.
    pub fn restore(&self, path: &Path) -> Result<(), PersistError> {
        let Some((agents, restored)) = persist::read(path, self.clock.moment())? else {
            return Ok(());
        };
        let mut hierarchy = self.config();
        let agents = agents
            .into_iter()
            .map(|agent| {
                let id = agent.configured.agent_id();
                let limit = Limit::new(agent.configured, agent.parent);
                (id, limit, agent.state, self.next_generation())
            })
            .collect();
        self.agents.replace_all(self.clock.now(), agents);
        *hierarchy = restored;
        drop(hierarchy);
        self.events.everything_changed();
        Ok(())
    }
}

/// The most claims a set may have to be taken as a flat set (see
/// [`BudgetManager::take_flat`]): a key's limits (a minute, a day and a
/// month's spend, say) fit.
const FLAT_CLAIMS: usize = 4;

/// What a flat set took, in the order it was taken: filled from the
/// front, the first `None` ends it.
struct Flat<'p> {
    taken: [Option<FlatTaken<'p>>; FLAT_CLAIMS],
}

/// One limit a flat set took.
#[derive(Clone, Copy)]
struct FlatTaken<'p> {
    /// The claim's index in the set, as given.
    claim: u8,
    cell: CellRef<'p>,
    level: Level,
    /// The state the take left: what a report of the limit reads.
    left: State,
}

impl<'p> Flat<'p> {
    fn new() -> Self {
        Flat {
            taken: [None; FLAT_CLAIMS],
        }
    }

    /// The limits taken, in the order they were taken.
    fn iter(&self) -> impl Iterator<Item = &FlatTaken<'p>> + '_ {
        self.taken.iter().map_while(Option::as_ref)
    }

    /// The set's levels, each with its claim's amounts, as a ticket keeps
    /// them.
    fn levels<'a>(&'a self, claims: &'a [Claim]) -> impl Iterator<Item = SetLevel> + 'a {
        self.iter().map(|taken| {
            let claim = &claims[usize::from(taken.claim)];
            SetLevel {
                level: taken.level,
                tokens: claim.tokens,
                calls: claim.calls,
                reached_by: 1 << taken.claim,
            }
        })
    }
}

/// The indices of `claims` (at most [`FLAT_CLAIMS`]) in ascending order
/// of agent id, the order the general plan takes limits of one depth in;
/// `None` if two claims are on one agent, which the general plan merges.
#[inline]
fn flat_order(claims: &[Claim]) -> Option<[u8; FLAT_CLAIMS]> {
    let mut order: [u8; FLAT_CLAIMS] = std::array::from_fn(|n| n as u8);
    let sorted = &mut order[..claims.len()];
    let id = |n: u8| &claims[usize::from(n)].agent_id;
    set::sort_indices(sorted, id);
    let distinct = sorted.windows(2).all(|pair| id(pair[0]) != id(pair[1]));
    distinct.then_some(order)
}

/// Takes `request` at one level of a chain, `id`'s `cell` under `policy`;
/// `Ok(None)` if the cell was retired (its agent removed) meanwhile.
/// Inlined into each caller, so the verdict is never copied through memory.
#[inline(always)]
fn take(
    id: AgentId,
    cell: CellRef<'_>,
    policy: crate::rules::Policy,
    now: Now,
    request: (u64, u64),
    own_generation: u64,
) -> Result<Option<Level>, Refusal> {
    take_reporting(id, cell, policy, now, request, own_generation)
        .map(|taken| taken.map(|(level, _)| level))
}

/// [`take`], and the state the take left: what a report of the level
/// reads, without loading the word again.
#[inline(always)]
fn take_reporting(
    id: AgentId,
    cell: CellRef<'_>,
    policy: crate::rules::Policy,
    now: Now,
    (tokens, calls): (u64, u64),
    own_generation: u64,
) -> Result<Option<(Level, State)>, Refusal> {
    // Relaxed: taking budget publishes nothing and wakes no one.
    let Some((_, after, verdict)) = cell.update(Ordering::Relaxed, now, |s| {
        s.admit(&policy, now, tokens, calls)
    }) else {
        return Ok(None);
    };
    let level = Level {
        agent_id: id,
        generation: cell.generation(),
        taken_in: after.mark,
        slot: cell.slot(),
    };
    verdict
        .map(|()| Some((level, after)))
        .map_err(|shortfall| Refusal::Short {
            shortfall,
            asked: (tokens, calls),
            generation: own_generation,
            level: id,
        })
}

/// Takes `request` at the agent's own level, whose policy is `enforced`:
/// the level and the state the take left, or `NoBudget` if the cell was
/// retired meanwhile.
#[inline(always)]
fn take_own(
    agent_id: &AgentId,
    own: CellRef<'_>,
    enforced: &Enforced,
    now: Now,
    request: (u64, u64),
) -> Result<(Level, State), Refusal> {
    let generation = own.generation();
    take_reporting(*agent_id, own, enforced.policy, now, request, generation)?
        .ok_or(Refusal::NoBudget)
}

/// Takes `(tokens, calls)` at a limit in shadow mode: past its limit if
/// need be, never refused; `None` if the cell was retired meanwhile.
fn take_past(
    id: AgentId,
    cell: CellRef<'_>,
    policy: crate::rules::Policy,
    now: Now,
    (tokens, calls): (u64, u64),
) -> Option<(Level, State)> {
    // Relaxed: as for `take`, taking budget publishes nothing.
    let (_, after, ()) = cell.update(Ordering::Relaxed, now, |s| {
        (s.admit_past(&policy, now, tokens, calls), ())
    })?;
    let level = Level {
        agent_id: id,
        generation: cell.generation(),
        taken_in: after.mark,
        slot: cell.slot(),
    };
    Some((level, after))
}

/// Whether every level of `claim`'s chain has room for its amounts now
/// (read, not taken): [`State::admit`] on a copy, the verdict the take
/// would reach from the same word. A limit reached by several claims is
/// asked for each one's amounts, which is the same as asking for their
/// largest (each resource is admitted on its own), as the set's plan does.
fn check_chain(pinned: &Pinned<'_>, claim: &Claim, now: Now) -> Result<(), Refusal> {
    let own = pinned.get(&claim.agent_id).ok_or(Refusal::NoBudget)?;
    let generation = own.generation();
    let asked = (claim.tokens, claim.calls);
    let mut verdict = Ok(());
    walk_chain(pinned, claim.agent_id, own, |id, cell, enforced| {
        verdict = match cell.load(now) {
            Some(state) => state
                .admit(&enforced.policy, now, claim.tokens, claim.calls)
                .1
                .map_err(|shortfall| Refusal::Short {
                    shortfall,
                    asked,
                    generation,
                    level: id,
                }),
            // Removed meanwhile: the agent's own budget is gone; an
            // ancestor's is no longer a limit.
            None if id == claim.agent_id => Err(Refusal::NoBudget),
            None => Ok(()),
        };
        verdict.is_ok()
    });
    verdict
}

/// `full_info` of a cell, `None` if it was retired meanwhile.
fn info_of(agent_id: &AgentId, cell: CellRef<'_>, now: Now) -> Option<FullBudgetInfo> {
    let state = cell.load(now)?;
    Some(full_budget_info(&cell.limit(*agent_id), state, now))
}

/// Visits the agent's own cell, then its ancestors' (see
/// [`walk_ancestors`]), while `visit` returns `true`.
fn walk_chain<'p>(
    pinned: &'p Pinned<'_>,
    agent_id: AgentId,
    own: CellRef<'p>,
    mut visit: impl FnMut(AgentId, CellRef<'p>, &Enforced) -> bool,
) {
    let enforced = own.enforced();
    if visit(agent_id, own, &enforced) && enforced.has_parent {
        walk_ancestors(pinned, agent_id, own, visit);
    }
}

/// Visits `own`'s parent's cell, then its parent's, and so on, while
/// `visit` returns `true`. Stops at an agent without a parent, at
/// [`MAX_LEVELS`], and at a parent that is gone or already visited (which
/// only a `set_parent` or `remove_budget` racing the walk can produce: the
/// walk then sees the chain as it was before or after).
fn walk_ancestors<'p>(
    pinned: &'p Pinned<'_>,
    agent_id: AgentId,
    own: CellRef<'p>,
    mut visit: impl FnMut(AgentId, CellRef<'p>, &Enforced) -> bool,
) {
    let mut seen = ChainIds::new();
    seen.push(agent_id);
    let mut parent = own.parent();
    for _ in 1..MAX_LEVELS {
        let Some(id) = parent.filter(|id| !seen.contains(id)) else {
            return;
        };
        let Some(cell) = pinned.get(&id) else {
            return;
        };
        let enforced = cell.enforced();
        if !visit(id, cell, &enforced) || !enforced.has_parent {
            return;
        }
        seen.push(id);
        parent = cell.parent();
    }
}

impl BudgetManager {
    /// Books one level of a reservation: `used` replaces `reserved` in the
    /// window it was taken in; wakes waiters if it refunded.
    fn settle_level(
        &self,
        pinned: &Pinned<'_>,
        level: &Level,
        now: Now,
        reserved: (u64, u64),
        used: (u64, u64),
    ) -> Settlement {
        // Where the take found the cell, for this incarnation only (as a
        // handle goes); looked up by id once if the agent has moved to a
        // cell of the other width since, or is gone. One call site of
        // `update`, so that it is inlined here.
        let mut cell = pinned.at(level.slot, level.generation);
        let mut looked_up = false;
        let settlement = loop {
            let Some(at) = cell else {
                break Settlement::AgentRemoved;
            };
            let policy = at.enforced().policy;
            // SeqCst: may refund; see `release`.
            let updated = at.update(Ordering::SeqCst, now, |s| {
                let refund = s.settle(&policy, now, level.taken_in, reserved, used);
                match refund {
                    Refund::Applied { next, .. } | Refund::CarriedOver { next, .. } => {
                        (next, refund)
                    }
                    Refund::WindowEnded => (s, refund),
                }
            });
            match updated {
                Some((_, _, refund)) => break Settlement::of(refund),
                None if !looked_up => {
                    looked_up = true;
                    cell = pinned
                        .get(&level.agent_id)
                        .map(|found| found.expecting(level.generation));
                }
                None => break Settlement::AgentRemoved,
            }
        };
        if settlement.refunded() {
            let agent_id = &level.agent_id;
            self.events.refunded(agent_id, || self.headroom(agent_id));
        }
        settlement
    }
}

impl Ledger for BudgetManager {
    /// Settles at every level the reservation was taken at, each in its own
    /// window; reports the agent's own level.
    fn settle(&self, ticket: &Ticket, used: (u64, u64)) -> Settlement {
        let now = self.clock.now();
        let reserved = (ticket.tokens, ticket.calls);
        let mut own = None;
        let pinned = self.pin();
        for level in ticket.levels.iter() {
            let settlement = self.settle_level(&pinned, level, now, reserved, used);
            own.get_or_insert(settlement);
        }
        own.unwrap_or(Settlement::AgentRemoved)
    }

    fn settle_set(&self, ticket: &SetTicket, actuals: Option<&[u64]>) -> Settlement {
        let now = self.clock.now();
        let pinned = self.pin();
        set::worst(ticket.levels.iter().map(|level| {
            let (reserved, used) = set_level_amounts(level, actuals);
            self.settle_level(&pinned, &level.level, now, reserved, used)
        }))
    }
}

#[cfg(feature = "async")]
impl crate::wait::Waitable for BudgetManager {
    fn waiters(&self) -> &crate::wait::Waiters {
        self.events.waiters()
    }

    fn try_admit(
        &self,
        agent_id: &AgentId,
        request: (u64, u64),
        generation: Option<u64>,
    ) -> Result<Levels, Refusal> {
        // A waiter's tries read the usage word by read-modify-write: see
        // `Registry::pin_confirming`.
        let pinned = self.agents.pin_confirming(&self.clock);
        self.admit_under(&pinned, agent_id, request, generation)
    }

    fn try_admit_set(&self, claims: &[Claim]) -> Result<Box<SetTicket>, (Refusal, AgentId)> {
        let pinned = self.agents.pin_confirming(&self.clock);
        self.admit_set(&pinned, claims, None)
    }

    fn headroom(&self, agent_id: &AgentId) -> Option<(u64, u64)> {
        self.headroom(agent_id)
    }
}

forward_budget_limiter!(BudgetManager);
