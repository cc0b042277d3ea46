//! [`FleetManager`]: a local [`BudgetManager`] fed by leases from Redis.
//!
//! The I/O half of the protocol (the decisions are in
//! [`crate::protocol`]): the request path, the background tasks (refills,
//! heartbeats, window ends, idle returns) and the bookkeeping that ties
//! each agent's local cell to its records in Redis.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use agent_budget::{
    AgentId, BudgetKind, BudgetLimit, BudgetManager, FullBudgetInfo, OwnedAgentHandle,
    OwnedReservation, RefusalReason, Refused,
};
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;

use crate::clock::{FleetClock, MonotonicClock, Timeline};
use crate::error::{Denied, FleetError};
use crate::protocol::{
    allowance, allowance_grant, close_window, Activity, Amount, Ask, LeasePlan, LeasePolicy,
    ServerClock, TakeRequest, Window,
};
use crate::store::{Beat, Store, StoreOptions, TakeReply, TakeStatus};

/// What a node does when it cannot reach Redis and its lease does not
/// cover a request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FailMode {
    /// Refuse ([`Denied::Unavailable`]): the fleet never admits more than
    /// its budget, and an outage longer than the leases last stops
    /// traffic. The default.
    Closed,
    /// Admit up to `allowance` (a fraction of each agent's budget per
    /// window, per node) on the node's own authority, then refuse. What it
    /// admits is charged to the fleet once Redis is back. With `N` nodes
    /// the fleet may admit up to `N × allowance` beyond its budget in a
    /// window during an outage.
    Open {
        /// Fraction of each agent's budget per window, e.g. `0.05`.
        allowance: f64,
    },
}

/// How a [`FleetManager`] connects and behaves.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// Redis, as `redis://host:port`.
    pub url: String,
    /// Prefix of every key this fleet keeps in Redis; fleets that share a
    /// Redis must use different ones. Default `agent-budget`.
    pub prefix: String,
    /// A name for this node (its host name, say). Its takes are recorded
    /// under this name followed by a random suffix drawn at
    /// [`connect`](FleetManager::connect), so two processes never share a
    /// record, even under one name: a node that restarts must not take
    /// over its former self's record, whose lease it no longer holds (and
    /// whose consumption it would otherwise hand back). Default `node`.
    pub node_id: String,
    /// Lease size and low-water mark.
    pub lease: LeasePolicy,
    /// What to do when Redis is unreachable and the lease is spent.
    pub fail_mode: FailMode,
    /// How often the node reads the fleet's time, epoch and budgets'
    /// version, and looks after its leases (window ends, idle agents,
    /// overuse to charge). Default 100 ms.
    pub heartbeat: Duration,
    /// An agent with no request on this node for this long gives its
    /// unused lease back. Default 500 ms (so within a second, with the
    /// heartbeat).
    pub idle_after: Duration,
    /// After Redis lost its data, no new lease is granted in the windows it
    /// lost for this long, while every node re-establishes what it holds.
    /// Must exceed `heartbeat` plus a round trip. Default 1 s.
    pub recovery_grace: Duration,
    /// A Redis call that takes longer has failed. Default 250 ms.
    pub timeout: Duration,
    /// The timeline windows are aligned to. Default: Redis's `TIME`.
    pub timeline: Timeline,
    /// The node's own monotonic clock (idleness, estimates of the server's
    /// time). Tests pass a [`FakeClock`](crate::FakeClock).
    pub clock: Arc<dyn FleetClock>,
}

impl FleetConfig {
    /// The defaults, on Redis at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        FleetConfig {
            url: url.into(),
            prefix: "agent-budget".into(),
            node_id: "node".into(),
            lease: LeasePolicy::default(),
            fail_mode: FailMode::Closed,
            heartbeat: Duration::from_millis(100),
            idle_after: Duration::from_millis(500),
            recovery_grace: Duration::from_secs(1),
            timeout: Duration::from_millis(250),
            timeline: Timeline::RedisTime,
            clock: Arc::new(MonotonicClock::new()),
        }
    }
}

/// Counters of what a node did, for gauges and for the benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FleetStats {
    /// Calls made to Redis (each one round trip), heartbeats included.
    pub redis_calls: u64,
    /// Leases granted to this node (background refills and requests').
    pub leases: u64,
    /// Requests that found the lease short and went to Redis (or to the
    /// fail mode) before they were answered.
    pub waited: u64,
    /// Leases the node granted itself, fail-open, with Redis unreachable.
    pub fail_open_grants: u64,
}

/// The fleet's view of one agent, for an admin page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetInfo {
    /// The agent's budget per window.
    pub limit: BudgetLimit,
    /// The current window on the fleet's timeline.
    pub window: Window,
    /// Time left in it.
    pub window_remaining: Duration,
    /// Taken fleet-wide in the window: consumed, or leased to a node and
    /// not yet given back. What the fleet has really consumed is at most
    /// this, and at least this less one lease per node.
    pub taken: Amount,
    /// Taken by each node, by node id.
    pub nodes: Vec<(String, Amount)>,
    /// This node's unused lease.
    pub lease_left: Amount,
}

impl FleetInfo {
    /// In the core's shape (for a gateway's admin view): "used" is what the
    /// fleet has taken.
    pub fn to_full_info(&self) -> FullBudgetInfo {
        let limit = Amount::new(self.limit.token_budget, self.limit.calls_budget);
        let remaining = limit.saturating_sub(self.taken);
        FullBudgetInfo {
            agent_id: self.limit.agent_id,
            token_limit: self.limit.token_budget,
            tokens_used: self.taken.tokens,
            tokens_remaining: remaining.tokens,
            calls_limit: self.limit.calls_budget,
            calls_used: self.taken.calls,
            calls_remaining: remaining.calls,
            window_secs: self.limit.window_secs,
            window_remaining_secs: self.window_remaining.as_secs(),
            is_exhausted: remaining.tokens == 0 || remaining.calls == 0,
        }
    }
}

/// The local cell's window never ends by itself: the fleet's windows end
/// it (`reset_window` at each boundary on the fleet's timeline).
const NEVER: u64 = u64::MAX;
/// A request that finds the lease short tries this many leases before it
/// gives up (each one may be eaten by concurrent requests first).
const ATTEMPTS: usize = 4;

/// One agent on this node.
struct Agent {
    id: AgentId,
    /// The local cell: its limit is what the node was granted in the
    /// current window, its usage what it consumed plus what it gave back.
    handle: OwnedAgentHandle,
    /// A request came since the last heartbeat.
    touched: AtomicBool,
    /// A background refill is queued.
    queued: AtomicBool,
    /// The budgets' version this agent's budget was applied at: a list of
    /// budgets older than that neither removes nor changes it.
    since: AtomicU64,
    /// The budget, for readers that do not wait for the book.
    limit: StdMutex<BudgetLimit>,
    /// What the fleet had taken in the current window at this node's last
    /// call, and when the window ends (ms on the fleet's timeline).
    seen_tokens: AtomicU64,
    seen_calls: AtomicU64,
    window_end_ms: AtomicU64,
    /// The low-water mark, read by the request path.
    low_tokens: AtomicU64,
    low_calls: AtomicU64,
    /// Everything else, changed only by one lease operation at a time.
    book: Mutex<Book>,
}

/// A node's record of one agent in the current window.
struct Book {
    limit: BudgetLimit,
    plan: LeasePlan,
    window: Window,
    /// What the server records this node as having taken in `window`.
    net: Amount,
    /// The local cell's limit: everything granted in `window`.
    granted: Amount,
    /// Fail-open grants in `window`.
    allowance_used: Amount,
    activity: Activity,
}

impl Agent {
    fn touch(&self) {
        // Read first: the common case writes nothing, so requests on
        // several threads do not bounce the line.
        if !self.touched.load(Ordering::Relaxed) {
            self.touched.store(true, Ordering::Relaxed);
        }
    }

    fn left(&self) -> Amount {
        let info = self.handle.remaining();
        Amount::new(info.tokens_remaining, info.calls_remaining)
    }

    fn seen(&self, taken: Amount) {
        self.seen_tokens.store(taken.tokens, Ordering::Relaxed);
        self.seen_calls.store(taken.calls, Ordering::Relaxed);
    }

    fn set_low_water(&self, plan: &LeasePlan) {
        self.low_tokens
            .store(plan.low_water.tokens, Ordering::Relaxed);
        self.low_calls
            .store(plan.low_water.calls, Ordering::Relaxed);
    }
}

fn amount_of(limit: &BudgetLimit) -> Amount {
    Amount::new(limit.token_budget, limit.calls_budget).clamped()
}

struct Settings {
    lease: LeasePolicy,
    fail_mode: FailMode,
    heartbeat: Duration,
    idle_after: Duration,
    grace: Duration,
    timeline: Timeline,
    clock: Arc<dyn FleetClock>,
}

struct Inner {
    local: Arc<BudgetManager>,
    /// Never given a budget: mints the refusals for unknown agents.
    nobody: BudgetManager,
    store: Store,
    settings: Settings,
    agents: papaya::HashMap<AgentId, Arc<Agent>>,
    wake: mpsc::UnboundedSender<AgentId>,
    up: AtomicBool,
    closed: AtomicBool,
    server: StdMutex<ServerClock>,
    epoch: StdMutex<Option<String>>,
    budgets_version: StdMutex<Option<u64>>,
    reestablish: AtomicBool,
    leases: AtomicU64,
    waited: AtomicU64,
    fail_open_grants: AtomicU64,
}

/// A budget manager for one node of a fleet: every agent's budget is
/// shared by all the nodes given the same Redis (and key prefix).
///
/// Requests are admitted by a local lock-free [`BudgetManager`] from the
/// node's lease; leases are taken from Redis, atomically, in the
/// background before they run out. See the crate docs for the protocol.
///
/// Create it with [`connect`](Self::connect) inside a tokio runtime (it
/// spawns its background tasks there); call [`shutdown`](Self::shutdown)
/// before the process exits to give unused leases back. Dropping it
/// without `shutdown` stops its tasks and strands its leases until their
/// windows end, like a crash.
pub struct FleetManager {
    inner: Arc<Inner>,
    tasks: StdMutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for FleetManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetManager")
            .field("node", &self.inner.store.node())
            .finish_non_exhaustive()
    }
}

impl Drop for FleetManager {
    fn drop(&mut self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }
}

fn lock<T>(mutex: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while these are held; a poisoned one is taken over.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FleetManager {
    /// Connects to Redis, loads the fleet's budgets and starts the
    /// background tasks on the current tokio runtime. Fails if Redis cannot
    /// be reached.
    pub async fn connect(config: FleetConfig) -> Result<Self, FleetError> {
        let store = Store::connect(StoreOptions {
            url: config.url.clone(),
            prefix: config.prefix.clone(),
            node: format!(
                "{}.{}",
                config.node_id,
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            ),
            grace: config.recovery_grace,
            timeout: config.timeout,
            timeline: config.timeline.clone(),
        })
        .await?;
        let (wake, woken) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            local: Arc::new(BudgetManager::new()),
            nobody: BudgetManager::new(),
            store,
            settings: Settings {
                lease: config.lease,
                fail_mode: config.fail_mode,
                heartbeat: config.heartbeat.max(Duration::from_millis(1)),
                idle_after: config.idle_after,
                grace: config.recovery_grace,
                timeline: config.timeline,
                clock: config.clock,
            },
            agents: papaya::HashMap::new(),
            wake,
            up: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            server: StdMutex::new(ServerClock::default()),
            epoch: StdMutex::new(None),
            budgets_version: StdMutex::new(None),
            reestablish: AtomicBool::new(false),
            leases: AtomicU64::new(0),
            waited: AtomicU64::new(0),
            fail_open_grants: AtomicU64::new(0),
        });
        inner.beat().await?;
        inner.reload_budgets().await?;
        let tasks = vec![
            tokio::spawn(refills(inner.clone(), woken)),
            tokio::spawn(heartbeats(inner.clone())),
        ];
        Ok(FleetManager {
            inner,
            tasks: StdMutex::new(tasks),
        })
    }

    /// Takes `tokens` and `calls` together from the fleet's budget for the
    /// agent, or neither; settle or cancel the reservation as with the
    /// core (refunds go back to this node's lease, in the same window;
    /// overuse is charged to the fleet).
    ///
    /// Served from the node's lease without waiting when it covers the
    /// request; otherwise waits for one lease operation on Redis (or, with
    /// Redis unreachable, answers as the [`FailMode`] says).
    pub async fn acquire(
        &self,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> Result<OwnedReservation, Denied> {
        let agent = {
            let agents = self.inner.agents.pin();
            let Some(agent) = agents.get(agent_id) else {
                return Err(Denied::Refused(
                    self.inner.no_budget(agent_id, tokens, calls),
                ));
            };
            agent.touch();
            match agent.handle.acquire(tokens, calls) {
                Ok(reservation) => {
                    self.inner.after_admit(agent);
                    return Ok(reservation);
                }
                Err(refused) if refused.reason == RefusalReason::NoBudget => {
                    return Err(Denied::Refused(refused))
                }
                Err(_) => Arc::clone(agent),
            }
        };
        self.inner
            .acquire_slow(&agent, Amount::new(tokens, calls))
            .await
    }

    /// Sets an agent's budget for the whole fleet: stored in Redis (the
    /// other nodes pick it up within a heartbeat) and applied here at once.
    /// As in the core, a known agent keeps what it used in the current
    /// window, judged against the new limit from now on.
    pub async fn set_budget(&self, limit: BudgetLimit) -> Result<(), FleetError> {
        self.inner.check_open()?;
        let (version, _) = self.inner.store.set_budget(&limit).await?;
        self.inner.apply_budget(limit, version).await;
        Ok(())
    }

    /// Removes an agent's budget from the whole fleet (the other nodes
    /// drop it within a heartbeat). Its reservations settle as
    /// [`AgentRemoved`](agent_budget::Settlement::AgentRemoved).
    pub async fn remove_budget(&self, agent_id: &AgentId) -> Result<(), FleetError> {
        self.inner.check_open()?;
        self.inner.store.remove_budget(agent_id).await?;
        self.inner.remove_agent(agent_id);
        Ok(())
    }

    /// The agent's budget as this node knows it.
    pub fn budget(&self, agent_id: &AgentId) -> Option<BudgetLimit> {
        let agents = self.inner.agents.pin();
        let agent = agents.get(agent_id)?;
        let limit = lock(&agent.limit).clone();
        Some(limit)
    }

    /// Where the agent's budget stands fleet-wide, in the core's shape,
    /// without calling Redis (for a gateway's rate-limit headers): "used"
    /// is what the fleet had taken at this node's last call to Redis for
    /// the agent, "remaining" what was left then plus this node's unused
    /// lease (what this node could still admit). `None` if the agent has no
    /// budget. [`fleet_info`](Self::fleet_info) reads Redis instead.
    pub fn full_info(&self, agent_id: &AgentId) -> Option<FullBudgetInfo> {
        let agents = self.inner.agents.pin();
        let agent = agents.get(agent_id)?;
        let limit = lock(&agent.limit).clone();
        let seen = Amount::new(
            agent.seen_tokens.load(Ordering::Relaxed),
            agent.seen_calls.load(Ordering::Relaxed),
        );
        let remaining = amount_of(&limit)
            .saturating_sub(seen)
            .clamped_add(agent.left());
        let end = agent.window_end_ms.load(Ordering::Relaxed);
        let now = self.inner.fleet_now().unwrap_or(end);
        Some(FullBudgetInfo {
            agent_id: *agent_id,
            token_limit: limit.token_budget,
            tokens_used: seen.tokens,
            tokens_remaining: remaining.tokens,
            calls_limit: limit.calls_budget,
            calls_used: seen.calls,
            calls_remaining: remaining.calls,
            window_secs: limit.window_secs,
            window_remaining_secs: end.saturating_sub(now) / 1_000,
            is_exhausted: remaining.tokens == 0 || remaining.calls == 0,
        })
    }

    /// The fleet's view of one agent, read from Redis now; `None` if the
    /// agent has no budget.
    pub async fn fleet_info(&self, agent_id: &AgentId) -> Result<Option<FleetInfo>, FleetError> {
        let agent = self.inner.agents.pin().get(agent_id).cloned();
        let Some(agent) = agent else {
            return Ok(None);
        };
        self.inner.info(&agent).await.map(Some)
    }

    /// [`fleet_info`](Self::fleet_info) of every agent.
    pub async fn all_fleet_info(&self) -> Result<Vec<FleetInfo>, FleetError> {
        let mut all = Vec::new();
        for agent in self.inner.all_agents() {
            all.push(self.inner.info(&agent).await?);
        }
        Ok(all)
    }

    /// The local manager the leases feed: its `full_info` of an agent
    /// shows this node's lease (limit: granted in the window; used:
    /// consumed here plus given back).
    pub fn local(&self) -> &Arc<BudgetManager> {
        &self.inner.local
    }

    /// What this node has done so far.
    pub fn stats(&self) -> FleetStats {
        FleetStats {
            redis_calls: self.inner.store.calls(),
            leases: self.inner.leases.load(Ordering::Relaxed),
            waited: self.inner.waited.load(Ordering::Relaxed),
            fail_open_grants: self.inner.fail_open_grants.load(Ordering::Relaxed),
        }
    }

    /// Whether the last call to Redis succeeded.
    pub fn is_connected(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed)
    }

    /// This node's id in the fleet's records: its name and a suffix of its
    /// own.
    pub fn node_id(&self) -> &str {
        self.inner.store.node()
    }

    /// Stops the background tasks and gives every unused lease back to the
    /// fleet. Requests that find their lease short from now on are
    /// refused ([`Denied::Unavailable`]). Returns the first error met;
    /// leases that could not be given back are stranded until their
    /// windows end.
    pub async fn shutdown(&self) -> Result<(), FleetError> {
        self.inner.closed.store(true, Ordering::SeqCst);
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
        let mut first_error = None;
        for agent in self.inner.all_agents() {
            let mut book = agent.book.lock().await;
            let left = agent.left();
            if let Err(e) = self
                .inner
                .give_back(&agent, &mut book, left, Amount::ZERO)
                .await
            {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Receives refill requests from the request path; each runs as its own
/// task (one Redis round trip), so refills of different agents overlap.
async fn refills(inner: Arc<Inner>, mut woken: mpsc::UnboundedReceiver<AgentId>) {
    while let Some(agent_id) = woken.recv().await {
        let agent = inner.agents.pin().get(&agent_id).cloned();
        if let Some(agent) = agent {
            let inner = inner.clone();
            tokio::spawn(async move { inner.refill(&agent).await });
        }
    }
}

/// Every heartbeat: the fleet's time, epoch and budgets, then each agent's
/// upkeep.
async fn heartbeats(inner: Arc<Inner>) {
    // `connect` made the first beat: the next is one period later.
    let period = inner.settings.heartbeat;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Ok(beat) = inner.beat().await {
            if inner.reestablish.load(Ordering::SeqCst) {
                inner.reestablish_all().await;
            } else if *lock(&inner.budgets_version) != Some(beat.budgets_version) {
                let _ = inner.reload_budgets().await;
            }
        }
        inner.upkeep();
    }
}

impl Inner {
    fn all_agents(&self) -> Vec<Arc<Agent>> {
        self.agents.pin().values().cloned().collect()
    }

    fn check_open(&self) -> Result<(), FleetError> {
        if self.closed.load(Ordering::SeqCst) {
            Err(FleetError::ShutDown)
        } else {
            Ok(())
        }
    }

    fn no_budget(&self, agent_id: &AgentId, tokens: u64, calls: u64) -> Refused {
        match self.nobody.acquire(agent_id, tokens, calls) {
            Err(refused) => refused,
            // `nobody` never has a budget, so this cannot happen; if it
            // did, nothing was taken from anyone that matters.
            Ok(reservation) => {
                let _ = reservation.cancel();
                self.nobody.remove_budget(agent_id);
                self.no_budget(agent_id, tokens, calls)
            }
        }
    }

    /// After an admission: below the low-water mark, queue a refill.
    fn after_admit(&self, agent: &Agent) {
        let left = agent.handle.remaining();
        if left.tokens_remaining < agent.low_tokens.load(Ordering::Relaxed)
            || left.calls_remaining < agent.low_calls.load(Ordering::Relaxed)
        {
            self.queue_refill(agent);
        }
    }

    fn queue_refill(&self, agent: &Agent) {
        if !agent.queued.load(Ordering::Relaxed) && !agent.queued.swap(true, Ordering::AcqRel) {
            let _ = self.wake.send(agent.id);
        }
    }

    /// The fleet's time now, if known.
    fn fleet_now(&self) -> Option<u64> {
        match &self.settings.timeline {
            Timeline::Shared(clock) => Some(clock.now_ms()),
            Timeline::RedisTime => lock(&self.server).server_ms(self.settings.clock.now_ms()),
        }
    }

    fn observe_server(&self, sent_ms: u64, server_ms: u64) {
        let received = self.settings.clock.now_ms();
        lock(&self.server).observe(sent_ms, received, server_ms);
    }

    /// Records the fleet's epoch; `true` if it changed (Redis lost its
    /// data): every node must re-establish what it holds.
    fn note_epoch(&self, epoch: &str) -> bool {
        let mut known = lock(&self.epoch);
        match known.as_deref() {
            Some(k) if k == epoch => false,
            None => {
                *known = Some(epoch.to_owned());
                false
            }
            Some(_) => {
                *known = Some(epoch.to_owned());
                self.reestablish.store(true, Ordering::SeqCst);
                true
            }
        }
    }

    fn set_local(&self, agent_id: AgentId, granted: Amount) {
        self.local.set_budget(BudgetLimit {
            agent_id,
            token_budget: granted.tokens,
            calls_budget: granted.calls,
            window_secs: NEVER,
        });
    }

    fn local_used(&self, agent_id: &AgentId) -> Amount {
        self.local
            .full_info(agent_id)
            .map_or(Amount::ZERO, |i| Amount::new(i.tokens_used, i.calls_used))
    }

    /// Consumed beyond what was granted (overuse from settles): owed to the
    /// fleet.
    fn debt(&self, agent: &Agent, book: &Book) -> Amount {
        self.local_used(&agent.id).saturating_sub(book.granted)
    }

    async fn beat(&self) -> Result<Beat, FleetError> {
        let sent = self.settings.clock.now_ms();
        match self.store.beat().await {
            Ok(beat) => {
                self.observe_server(sent, beat.now_ms);
                self.up.store(true, Ordering::SeqCst);
                self.note_epoch(&beat.epoch);
                Ok(beat)
            }
            Err(e) => {
                self.up.store(false, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// One take on the agent's current window, booked into `book` and the
    /// local cell. On an error the outcome is unknown: the node assumes
    /// what leaves it holding less (the gift made, no grant), and its next
    /// take's belief puts the server right.
    async fn take(
        &self,
        agent: &Agent,
        book: &mut Book,
        ask: Ask,
        give: Amount,
        force: Amount,
    ) -> Result<TakeReply, FleetError> {
        let request = TakeRequest {
            belief: book.net,
            give,
            force,
            want: ask.want,
            min: ask.min,
        };
        let sent = self.settings.clock.now_ms();
        let result = self.store.take(&agent.id, book.window, &request).await;
        match &result {
            Ok(reply) => {
                self.observe_server(sent, reply.now_ms);
                self.up.store(true, Ordering::SeqCst);
                self.note_epoch(&reply.epoch);
                if !matches!(reply.status, TakeStatus::Config | TakeStatus::NoBudget) {
                    book.net = reply.mine;
                    agent.seen(reply.taken);
                    let raise = force.clamped().clamped_add(reply.granted);
                    if !raise.is_zero() {
                        book.granted = book.granted.clamped_add(raise);
                        self.set_local(agent.id, book.granted);
                    }
                    if !reply.granted.is_zero() {
                        self.leases.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Err(_) => {
                self.up.store(false, Ordering::SeqCst);
                book.net = book.net.saturating_sub(give);
            }
        }
        result
    }

    /// Takes up to `want` of the local lease out of use (a reservation
    /// kept charged), so it can be given back: nothing admitted locally
    /// can then spend what the fleet is told is free.
    fn grab(&self, agent: &Agent, want: Amount) -> Option<(Amount, OwnedReservation)> {
        for _ in 0..ATTEMPTS {
            let part = want.min(agent.left());
            if part.is_zero() {
                return None;
            }
            if let Ok(reservation) = agent.handle.acquire(part.tokens, part.calls) {
                return Some((part, reservation));
            }
        }
        None
    }

    /// Gives up to `give` of the unused lease back, and charges `force`.
    async fn give_back(
        &self,
        agent: &Agent,
        book: &mut Book,
        give: Amount,
        force: Amount,
    ) -> Result<(), FleetError> {
        let grabbed = self.grab(agent, give);
        let gift = grabbed.as_ref().map_or(Amount::ZERO, |(part, _)| *part);
        if gift.is_zero() && force.is_zero() {
            return Ok(());
        }
        let none = Ask {
            want: Amount::ZERO,
            min: Amount::ZERO,
        };
        let reply = self.take(agent, book, none, gift, force).await;
        if let Some((_, reservation)) = grabbed {
            match &reply {
                // Not booked: the lease is the node's again.
                Ok(r) if matches!(r.status, TakeStatus::Config | TakeStatus::NoBudget) => {
                    let _ = reservation.cancel();
                }
                // Booked (or assumed so): it stays out of use for good.
                _ => drop(reservation),
            }
        }
        reply.map(drop)
    }

    /// The request path once the lease is short.
    async fn acquire_slow(
        &self,
        agent: &Arc<Agent>,
        request: Amount,
    ) -> Result<OwnedReservation, Denied> {
        self.waited.fetch_add(1, Ordering::Relaxed);
        let mut book = agent.book.lock().await;
        let mut fenced_waits = 0;
        let mut attempts = 0;
        while attempts < ATTEMPTS {
            let base = match agent.handle.acquire(request.tokens, request.calls) {
                Ok(reservation) => {
                    drop(book);
                    self.after_admit(agent);
                    return Ok(reservation);
                }
                Err(refused) if refused.reason == RefusalReason::NoBudget => {
                    return Err(Denied::Refused(refused))
                }
                Err(refused) => refused,
            };
            if self.closed.load(Ordering::SeqCst) {
                return Err(self.unavailable(agent, "the node is shutting down"));
            }
            self.roll_if_due(agent, &mut book).await;
            let limit = amount_of(&book.limit);
            if !request.fits_in(limit) {
                return Err(Denied::Refused(
                    self.refusal(base, request, limit, limit, None),
                ));
            }
            let left = agent.left();
            let ask = book.plan.demand(left, request);
            if !self.up.load(Ordering::SeqCst) {
                return self.fail_over(agent, &mut book, ask, request);
            }
            let force = self.debt(agent, &book);
            let epoch_before = lock(&self.epoch).clone();
            let reply = match self.take(agent, &mut book, ask, Amount::ZERO, force).await {
                Ok(reply) => reply,
                Err(_) => return self.fail_over(agent, &mut book, ask, request),
            };
            attempts += 1;
            match reply.status {
                TakeStatus::Granted => {}
                TakeStatus::Short => {
                    let available = reply.limit.saturating_sub(reply.taken).clamped_add(left);
                    let retry = self.until_window_end(&book);
                    return Err(Denied::Refused(self.refusal(
                        base,
                        request,
                        reply.limit,
                        available,
                        Some(retry),
                    )));
                }
                TakeStatus::Fenced => {
                    // Redis lost its data and the fleet is re-establishing
                    // its leases: wait for the fence, at most once.
                    let wait = Duration::from_millis(reply.fence_ms.saturating_sub(reply.now_ms))
                        .min(self.settings.grace);
                    if fenced_waits > 0 {
                        return Err(self.unavailable(
                            agent,
                            "Redis is re-establishing the fleet's leases after losing its data",
                        ));
                    }
                    fenced_waits += 1;
                    attempts -= 1;
                    tokio::time::sleep(wait).await;
                }
                TakeStatus::WrongWindow => {
                    let current = Window::containing(reply.now_ms, book.window.length_ms);
                    if current.index > book.window.index {
                        self.roll(agent, &mut book, current).await;
                    } else {
                        // This node's estimate of the fleet's time ran
                        // ahead: its window has not begun on the server.
                        return Err(self.unavailable(agent, "the fleet's window has not begun"));
                    }
                }
                TakeStatus::Config => match self.store.budgets().await {
                    Ok((_, budgets)) => {
                        match budgets.into_iter().find(|b| b.agent_id == agent.id) {
                            Some(limit) => self.apply_limit(agent, &mut book, limit).await,
                            None => return Err(self.gone(agent, request)),
                        }
                    }
                    Err(_) => return self.fail_over(agent, &mut book, ask, request),
                },
                TakeStatus::NoBudget => {
                    let lost = lock(&self.epoch).clone() != epoch_before
                        || self.reestablish.load(Ordering::SeqCst);
                    if !lost {
                        drop(book);
                        return Err(self.gone(agent, request));
                    }
                    // Redis lost the budgets too: put this one back.
                    if self.store.restore_budget(&book.limit).await.is_err() {
                        return self.fail_over(agent, &mut book, ask, request);
                    }
                }
            }
        }
        Err(self.unavailable(agent, "leases were taken by concurrent requests first"))
    }

    /// The agent's budget is gone from the fleet: gone here too.
    fn gone(&self, agent: &Agent, request: Amount) -> Denied {
        self.remove_agent(&agent.id);
        Denied::Refused(self.no_budget(&agent.id, request.tokens, request.calls))
    }

    fn unavailable(&self, agent: &Agent, why: &'static str) -> Denied {
        Denied::Unavailable {
            agent_id: agent.id,
            retry_after: self.settings.heartbeat,
            why,
        }
    }

    fn until_window_end(&self, book: &Book) -> Duration {
        let now = self.fleet_now().unwrap_or(0);
        Duration::from_millis(book.window.end_ms().saturating_sub(now).max(1))
    }

    /// A refusal with the fleet's figures, made from a local one (whose
    /// private parts say it was an `acquire`).
    fn refusal(
        &self,
        mut base: Refused,
        request: Amount,
        limit: Amount,
        available: Amount,
        retry_after: Option<Duration>,
    ) -> Refused {
        // Name first what can never fit, as the core does.
        let tokens_first = request.tokens > limit.tokens
            || (request.calls <= limit.calls && request.tokens > available.tokens);
        let (kind, requested, remaining, limit) = if tokens_first {
            (
                BudgetKind::Token,
                request.tokens,
                available.tokens,
                limit.tokens,
            )
        } else {
            (
                BudgetKind::Call,
                request.calls,
                available.calls,
                limit.calls,
            )
        };
        base.kind = kind;
        base.refused_by = base.agent_id;
        base.retry_after = if requested > limit { None } else { retry_after };
        base.reason = RefusalReason::Exceeded {
            requested,
            remaining,
            used: limit.saturating_sub(remaining),
            limit,
        };
        base
    }

    /// Redis is unreachable and the lease is short: the fail mode decides.
    fn fail_over(
        &self,
        agent: &Agent,
        book: &mut Book,
        ask: Ask,
        request: Amount,
    ) -> Result<OwnedReservation, Denied> {
        if let FailMode::Open {
            allowance: fraction,
        } = self.settings.fail_mode
        {
            let allowed = allowance(amount_of(&book.limit), fraction);
            if let Some(grant) = allowance_grant(ask, book.allowance_used, allowed) {
                book.allowance_used = book.allowance_used.clamped_add(grant);
                // Counted as taken: the next take's belief charges it.
                book.net = book.net.clamped_add(grant);
                book.granted = book.granted.clamped_add(grant);
                self.set_local(agent.id, book.granted);
                self.fail_open_grants.fetch_add(1, Ordering::Relaxed);
                if let Ok(reservation) = agent.handle.acquire(request.tokens, request.calls) {
                    return Ok(reservation);
                }
            }
        }
        Err(self.unavailable(agent, "Redis is unreachable and this node's lease is spent"))
    }

    /// Rolls the agent into the fleet's current window if its window ended.
    async fn roll_if_due(&self, agent: &Agent, book: &mut Book) {
        let Some(now) = self.fleet_now() else {
            return;
        };
        let current = Window::containing(now, book.window.length_ms);
        if current.index > book.window.index {
            self.roll(agent, book, current).await;
        }
    }

    /// Ends the agent's window on this node: the local cell is closed to
    /// new admissions, read, and reset (so reservations of the old window
    /// settle as ended, overuse carried into the new one); the old window
    /// is told what was left unused or overused (best effort: it is over).
    async fn roll(&self, agent: &Agent, book: &mut Book, next: Window) {
        self.set_local(agent.id, Amount::ZERO);
        let used = self.local_used(&agent.id);
        let close = close_window(book.granted, used, book.net);
        self.local.reset_window(&agent.id);
        let (old, net) = (book.window, book.net);
        agent.seen(Amount::ZERO);
        agent.window_end_ms.store(next.end_ms(), Ordering::Relaxed);
        book.window = next;
        book.net = Amount::ZERO;
        book.granted = Amount::ZERO;
        book.allowance_used = Amount::ZERO;
        if self.up.load(Ordering::SeqCst) && !(net.is_zero() && close.force.is_zero()) {
            let request = TakeRequest {
                belief: net,
                give: close.give,
                force: close.force,
                ..TakeRequest::default()
            };
            if self.store.take(&agent.id, old, &request).await.is_err() {
                self.up.store(false, Ordering::SeqCst);
            }
        }
    }

    /// A background refill, queued by the request path at the low-water
    /// mark.
    async fn refill(&self, agent: &Agent) {
        let mut book = agent.book.lock().await;
        agent.queued.store(false, Ordering::Release);
        if !self.up.load(Ordering::SeqCst) || self.closed.load(Ordering::SeqCst) {
            return;
        }
        self.roll_if_due(agent, &mut book).await;
        if let Some(ask) = book.plan.refill(agent.left()) {
            let force = self.debt(agent, &book);
            let _ = self.take(agent, &mut book, ask, Amount::ZERO, force).await;
        }
    }

    /// Each heartbeat, for each agent: note whether it had requests, and
    /// start its upkeep if it needs any (a window end, overuse to charge,
    /// an idle or oversized lease to give back, a refill the request path
    /// did not queue). The checks are local; only agents with work to do
    /// get a task and a Redis call.
    fn upkeep(self: &Arc<Self>) {
        let now = self.settings.clock.now_ms();
        let fleet_now = self.fleet_now();
        for agent in self.all_agents() {
            let Ok(mut book) = agent.book.try_lock() else {
                // A request or refill is at it; the next heartbeat will see
                // its touch.
                continue;
            };
            let touched = agent.touched.swap(false, Ordering::Relaxed);
            book.activity.observe(touched, now);
            let due = fleet_now.is_some_and(|t| {
                Window::containing(t, book.window.length_ms).index > book.window.index
            });
            let left = agent.left();
            let idle = book.activity.is_idle(now, self.settings.idle_after);
            let up = self.up.load(Ordering::SeqCst);
            let work = due
                || (up && idle && !left.is_zero())
                || (up && !book.plan.excess(left).is_zero())
                || (up && !self.debt(&agent, &book).is_zero())
                || (up && !idle && book.plan.refill(left).is_some());
            drop(book);
            if work {
                let inner = self.clone();
                tokio::spawn(async move { inner.look_after(&agent).await });
            }
        }
    }

    async fn look_after(&self, agent: &Agent) {
        let mut book = agent.book.lock().await;
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        self.roll_if_due(agent, &mut book).await;
        if !self.up.load(Ordering::SeqCst) {
            return;
        }
        let now = self.settings.clock.now_ms();
        let left = agent.left();
        let idle = book.activity.is_idle(now, self.settings.idle_after);
        let give = if idle { left } else { book.plan.excess(left) };
        let force = self.debt(agent, &book);
        if !give.is_zero() || !force.is_zero() {
            let _ = self.give_back(agent, &mut book, give, force).await;
        } else if !idle {
            if let Some(ask) = book.plan.refill(left) {
                let _ = self
                    .take(agent, &mut book, ask, Amount::ZERO, Amount::ZERO)
                    .await;
            }
        }
    }

    /// After Redis lost its data: put back every budget this node knows
    /// (only where missing), then state what it holds in each window.
    async fn reestablish_all(self: &Arc<Self>) {
        let agents = self.all_agents();
        for agent in &agents {
            let limit = agent.book.lock().await.limit.clone();
            if self.store.restore_budget(&limit).await.is_err() {
                self.up.store(false, Ordering::SeqCst);
                return;
            }
        }
        for agent in &agents {
            let mut book = agent.book.lock().await;
            self.roll_if_due(agent, &mut book).await;
            if book.net.is_zero() {
                continue;
            }
            let none = Ask {
                want: Amount::ZERO,
                min: Amount::ZERO,
            };
            if self
                .take(agent, &mut book, none, Amount::ZERO, Amount::ZERO)
                .await
                .is_err()
            {
                return;
            }
        }
        self.reestablish.store(false, Ordering::SeqCst);
        let _ = self.reload_budgets().await;
    }

    /// Makes this node's agents the fleet's: adds, changes and removes.
    async fn reload_budgets(&self) -> Result<(), FleetError> {
        let (version, budgets) = self.store.budgets().await?;
        let listed: HashMap<AgentId, BudgetLimit> =
            budgets.into_iter().map(|b| (b.agent_id, b)).collect();
        for agent in self.all_agents() {
            let older = agent.since.load(Ordering::SeqCst) <= version;
            if older && !listed.contains_key(&agent.id) {
                self.remove_agent(&agent.id);
            }
        }
        for limit in listed.into_values() {
            self.apply_budget(limit, version).await;
        }
        *lock(&self.budgets_version) = Some(version);
        Ok(())
    }

    /// Adds the agent, or applies a changed budget to it, as of the
    /// budgets' `version`.
    async fn apply_budget(&self, limit: BudgetLimit, version: u64) {
        let existing = self.agents.pin().get(&limit.agent_id).cloned();
        match existing {
            Some(agent) => {
                let mut book = agent.book.lock().await;
                if agent.since.load(Ordering::SeqCst) > version {
                    return; // a newer change was applied already
                }
                agent.since.store(version, Ordering::SeqCst);
                if book.limit != limit {
                    self.apply_limit(&agent, &mut book, limit).await;
                }
            }
            None => self.add_agent(limit, version),
        }
    }

    fn add_agent(&self, limit: BudgetLimit, version: u64) {
        let id = limit.agent_id;
        self.set_local(id, Amount::ZERO);
        let Some(handle) = self.local.handle_owned(&id) else {
            return;
        };
        let plan = LeasePlan::new(amount_of(&limit), self.settings.lease);
        let length = Window::length_ms(limit.window_secs);
        let window = Window::containing(self.fleet_now().unwrap_or(0), length);
        let agent = Arc::new(Agent {
            id,
            handle,
            touched: AtomicBool::new(false),
            queued: AtomicBool::new(false),
            since: AtomicU64::new(version),
            seen_tokens: AtomicU64::new(0),
            seen_calls: AtomicU64::new(0),
            window_end_ms: AtomicU64::new(window.end_ms()),
            limit: StdMutex::new(limit.clone()),
            low_tokens: AtomicU64::new(0),
            low_calls: AtomicU64::new(0),
            book: Mutex::new(Book {
                limit,
                plan,
                window,
                net: Amount::ZERO,
                granted: Amount::ZERO,
                allowance_used: Amount::ZERO,
                // Nothing asked for yet: no lease is fetched ahead.
                activity: Activity::default(),
            }),
        });
        agent.set_low_water(&plan);
        self.agents.pin().insert(id, agent);
    }

    async fn apply_limit(&self, agent: &Agent, book: &mut Book, limit: BudgetLimit) {
        let length = Window::length_ms(limit.window_secs);
        book.plan = LeasePlan::new(amount_of(&limit), self.settings.lease);
        *lock(&agent.limit) = limit.clone();
        book.limit = limit;
        agent.set_low_water(&book.plan);
        if length != book.window.length_ms {
            let now = self.fleet_now().unwrap_or(0);
            self.roll(agent, book, Window::containing(now, length))
                .await;
        }
    }

    fn remove_agent(&self, agent_id: &AgentId) {
        self.agents.pin().remove(agent_id);
        self.local.remove_budget(agent_id);
    }

    async fn info(&self, agent: &Agent) -> Result<FleetInfo, FleetError> {
        let (limit, window) = {
            let book = agent.book.lock().await;
            (book.limit.clone(), book.window)
        };
        let now = self.fleet_now().unwrap_or(0);
        let window = Window::containing(now, window.length_ms);
        let view = self.store.window(&agent.id, window).await?;
        Ok(FleetInfo {
            limit,
            window,
            window_remaining: Duration::from_millis(window.end_ms().saturating_sub(now)),
            taken: view.taken,
            nodes: view.nodes,
            lease_left: agent.left(),
        })
    }
}
