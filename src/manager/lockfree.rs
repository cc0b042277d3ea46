//! [`BudgetManager`]: agents in a concurrent map, usage in packed atomics.

use std::path::Path;
use std::sync::Arc;

use super::{
    budget_info, forward_budget_limiter, full_budget_info, headroom, unknown_agent_info, Events,
};
use crate::cell::AgentCell;
use crate::clock::Clock;
use crate::error::{BudgetExceeded, Operation, PersistError, Refusal};
use crate::persist::{self, AgentState};
use crate::reservation::{Ledger, OwnedReservation, Reservation, Settlement, Ticket};
use crate::sync::{default_clock, AgentMap, AtomicU64, ClockSource, Keyed, Mutex, Ordering};
use crate::types::{AgentId, BudgetInfo, BudgetLimit, FullBudgetInfo};
use crate::window::{Refund, Tick, Window};

/// Tracks token and call budgets per agent, in fixed windows, without locks.
///
/// Every operation on one agent is a map lookup, one clock read and (for
/// writes) a compare-and-swap loop on that agent's 128-bit usage word; no
/// lock is taken (only `set_budget` calls serialize among themselves) and
/// nothing is allocated on the admitted paths of
/// [`acquire`](Self::acquire), [`reserve`](Self::reserve),
/// [`track_call`](Self::track_call), [`release`](Self::release),
/// [`remaining`](Self::remaining) and [`can_schedule`](Self::can_schedule).
/// (A refusal allocates the error's message.) Share it through an `Arc`.
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
    agents: AgentMap<AgentCell>,
    clock: Clock,
    generations: AtomicU64,
    /// Serializes `set_budget`s: a cell keeps its limit twice (the packed
    /// policy it enforces, the configured limit it reports), and two
    /// unserialized writers could leave one's policy beside the other's
    /// limit for good. Only `set_budget` takes it; requests never do.
    limit_writes: Mutex<()>,
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
    /// An empty manager on the real monotonic clock.
    ///
    /// quanta calibrates its clock here (once per process), not on the first
    /// operation.
    pub fn new() -> Self {
        Self::with_clock(default_clock())
    }

    /// An empty manager on `clock`; tests pass `quanta::Clock::mock()` and
    /// move time by hand.
    pub fn with_clock(clock: ClockSource) -> Self {
        Self::on(Clock::new(clock))
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
            agents: AgentMap::new(),
            clock,
            generations: AtomicU64::new(0),
            limit_writes: Mutex::new(()),
            events: Events::default(),
        }
    }

    fn next_generation(&self) -> u64 {
        // Relaxed: only uniqueness is needed, which the RMW gives.
        self.generations.fetch_add(1, Ordering::Relaxed)
    }

    /// Sets an agent's budget. A new agent's first window starts now; a
    /// known agent keeps its usage and window, judged from now on against
    /// the new limit.
    pub fn set_budget(&self, limit: BudgetLimit) {
        // A poisoned lock guards no data; the writes it orders are atomic.
        let _serial = self
            .limit_writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = self.clock.now();
        let (agent_id, for_new) = (limit.agent_id, limit.clone());
        self.agents.update_or_insert(
            agent_id,
            |cell| cell.set_limit(limit),
            || {
                let window = Window::fresh(now.start_tick());
                AgentCell::new(for_new.clone(), window, self.next_generation())
            },
        );
        self.events.limit_changed(&agent_id);
    }

    /// Forgets an agent's budget and usage. Its reservations settle to
    /// [`Settlement::AgentRemoved`], even if its budget is set again, and
    /// its waiting futures end with a refusal.
    pub fn remove_budget(&self, agent_id: &AgentId) {
        self.agents.remove(agent_id);
        self.events.limit_changed(agent_id);
    }

    /// Takes `tokens` and `calls` together, or neither, and returns a
    /// [`Reservation`] to settle once the real usage is known.
    ///
    /// This is the operation new code should use: see the crate docs for
    /// the gateway flow. Zero of a resource always fits.
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

    /// [`acquire`](Self::acquire), returning an [`OwnedReservation`] that
    /// holds an `Arc` of the manager: it can move into a spawned task or a
    /// response body, and settle there.
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
    ) -> impl std::future::Future<Output = Result<Reservation<'_>, BudgetExceeded>> + Send + '_
    {
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
    ) -> impl std::future::Future<Output = Result<OwnedReservation, BudgetExceeded>> + Send + 'static
    {
        crate::wait::acquire_owned_wait(self, agent_id, tokens, calls)
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

    /// Gives `tokens` back to the current window, never below zero (the
    /// seed's API). It trusts the caller's amount and cannot tell which
    /// window the tokens were spent in; a [`Reservation`] can.
    pub fn release(&self, agent_id: &AgentId, tokens: u64) {
        let now = self.clock.now();
        let released = self.agents.get(agent_id, |cell| {
            let policy = cell.policy();
            // SeqCst: a refund, paired with waiters' registration (see
            // `Waiters::wake`).
            let (before, after, ()) =
                cell.update(Ordering::SeqCst, |w| (w.release(&policy, now, tokens), ()));
            after.tokens < before.tokens
        });
        if released == Some(true) {
            self.events.refunded(agent_id, || self.headroom(agent_id));
        }
    }

    /// Takes `request` (tokens, calls) from the agent's current window, if
    /// the agent is incarnation `generation` (when one is given).
    fn admit(
        &self,
        agent_id: &AgentId,
        (tokens, calls): (u64, u64),
        generation: Option<u64>,
    ) -> Result<(Tick, u64), Refusal> {
        let now = self.clock.now();
        self.agents
            .get(agent_id, |cell| {
                if generation.is_some_and(|g| g != cell.generation()) {
                    return Err(Refusal::NoBudget);
                }
                let policy = cell.policy();
                // Relaxed: taking budget publishes nothing and wakes no one.
                let (_, after, verdict) =
                    cell.update(Ordering::Relaxed, |w| w.admit(&policy, now, tokens, calls));
                match verdict {
                    Ok(()) => Ok((after.start, cell.generation())),
                    Err(shortfall) => Err(Refusal::Short {
                        shortfall,
                        generation: cell.generation(),
                    }),
                }
            })
            .unwrap_or(Err(Refusal::NoBudget))
    }

    /// What the agent can admit right now, for the wake rule.
    fn headroom(&self, agent_id: &AgentId) -> Option<(u64, u64)> {
        let now = self.clock.now();
        self.agents
            .get(agent_id, |cell| headroom(&cell.policy(), cell.load(), now))
    }

    /// What is left in the agent's current window. A window that has
    /// expired reads as the fresh one the next write will start; an unknown
    /// agent reads as exhausted.
    pub fn remaining(&self, agent_id: &AgentId) -> BudgetInfo {
        let now = self.clock.now();
        self.agents
            .get(agent_id, |cell| {
                budget_info(&cell.policy(), cell.load(), now)
            })
            .unwrap_or_else(unknown_agent_info)
    }

    /// Whether the agent has both tokens and calls left.
    pub fn can_schedule(&self, agent_id: &AgentId) -> bool {
        !self.remaining(agent_id).is_exhausted
    }

    /// Starts a fresh window for the agent now, with nothing used.
    pub fn reset_window(&self, agent_id: &AgentId) {
        let now = self.clock.now();
        let reset = self.agents.get(agent_id, |cell| {
            // SeqCst: a refund; see `release`.
            cell.update(Ordering::SeqCst, |w| (w.reset(now), ()));
        });
        if reset.is_some() {
            self.events.refunded(agent_id, || self.headroom(agent_id));
        }
    }

    /// The agent's limits and usage, or `None` if it has no budget.
    pub fn full_info(&self, agent_id: &AgentId) -> Option<FullBudgetInfo> {
        let now = self.clock.now();
        self.agents.get(agent_id, |cell| {
            full_budget_info(*agent_id, &cell.limit(), cell.load(), now)
        })
    }

    /// [`full_info`](Self::full_info) of every agent, in no particular order.
    pub fn all_full_info(&self) -> Vec<FullBudgetInfo> {
        let now = self.clock.now();
        let mut all = Vec::new();
        self.agents.for_each(|cell| {
            all.push(full_budget_info(
                *cell.key(),
                &cell.limit(),
                cell.load(),
                now,
            ));
        });
        all
    }

    /// Writes every budget and its usage to `path` as JSON (the seed's
    /// layout), atomically: a crash leaves the old file or the new one.
    ///
    /// Each agent is read atomically; agents changed during the call may be
    /// written as they were before or after the change.
    pub fn persist(&self, path: &Path) -> Result<(), PersistError> {
        let at = self.clock.moment();
        let mut agents = Vec::new();
        self.agents.for_each(|cell| {
            let state = AgentState {
                limit: cell.limit().configured.clone(),
                window: cell.load(),
            };
            agents.push((*cell.key(), state));
        });
        persist::write(path, &agents, at)
    }

    /// Replaces every budget and its usage by those in `path`. A missing
    /// file changes nothing; a file that cannot be read or trusted changes
    /// nothing and is an error. Windows keep the part that was left.
    ///
    /// Meant for start-up: operations running concurrently may see a mix of
    /// the old and the restored agents while it runs.
    pub fn restore(&self, path: &Path) -> Result<(), PersistError> {
        let Some(agents) = persist::read(path, self.clock.moment())? else {
            return Ok(());
        };
        self.agents.replace_all(
            agents.into_iter().map(|(_, state)| {
                AgentCell::new(state.limit, state.window, self.next_generation())
            }),
        );
        self.events.everything_changed();
        Ok(())
    }
}

impl Ledger for BudgetManager {
    fn settle(&self, ticket: &Ticket, used: (u64, u64)) -> Settlement {
        let now = self.clock.now();
        let settlement = self
            .agents
            .get(&ticket.agent_id, |cell| {
                if cell.generation() != ticket.generation {
                    return Settlement::AgentRemoved;
                }
                let policy = cell.policy();
                let reserved = (ticket.tokens, ticket.calls);
                // SeqCst: may refund; see `release`.
                let (before, _, refund) = cell.update(Ordering::SeqCst, |w| {
                    let refund = w.settle(&policy, now, ticket.window_start, reserved, used);
                    match refund {
                        Refund::Applied(next) => (next, refund),
                        Refund::WindowEnded => (w, refund),
                    }
                });
                Settlement::of(before, refund)
            })
            .unwrap_or(Settlement::AgentRemoved);
        if settlement.refunded() {
            let agent_id = &ticket.agent_id;
            self.events.refunded(agent_id, || self.headroom(agent_id));
        }
        settlement
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
    ) -> Result<(Tick, u64), Refusal> {
        self.admit(agent_id, request, generation)
    }

    fn headroom(&self, agent_id: &AgentId) -> Option<(u64, u64)> {
        self.headroom(agent_id)
    }
}

forward_budget_limiter!(BudgetManager);
