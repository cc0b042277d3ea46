//! One budget for a fleet: [`agent_budget`]'s lock-free fast path, fed by
//! leases taken atomically from Redis.
//!
//! # Implementation details
//!
//! A gateway in production is several replicas behind a load balancer, and
//! a budget enforced per process is `N` times too generous with `N`
//! replicas. The usual cure keeps every budget in Redis and pays a round
//! trip on every request. This crate keeps the in-process fast path and
//! makes the budget fleet-wide all the same: each node *leases* chunks of
//! an agent's window budget from Redis and serves requests from its lease
//! with the core's lock-free cell; only lease refills touch the network.
//! Redis is the one source of truth; there is no consensus of our own.
//!
//! **The records.** For each agent and window, Redis keeps one hash: what
//! the whole fleet has *taken* (tokens and calls) and what each node has
//! taken. Taken means leased out: consumed, or still held unused by a
//! node. Every change is one Lua script, [`take`](protocol::take) (its
//! Rust twin, tested against it), which in one atomic step sets the node's
//! record to what the node *believes* it took, subtracts what it gives
//! back, adds overuse it was charged, and grants it a new lease: at most
//! what is left under the limit, and nothing unless at least the minimum
//! the node asked for is left. So the fleet never takes more than its
//! budget: every grant is checked and booked by the server in one step.
//!
//! **Windows** are aligned on one timeline for the whole fleet: by default
//! Redis's own clock (`TIME`, read inside the script), window `i` of
//! length `L` covering `[i·L, (i+1)·L)`; its index is part of the record's
//! key, and the record expires one window after its end. The node
//! estimates the server's time from its round trips (to within half a
//! round trip) to know when its windows end; the server has the last word:
//! a take for a window that is not current is never granted anything.
//! ([`Timeline::Shared`] aligns windows to a clock the nodes share
//! instead: the wall clock, or a fake one in tests.)
//!
//! **The node's cell.** Each agent has a cell in a local
//! [`BudgetManager`](agent_budget::BudgetManager) whose limit is what the
//! node was granted in the current window, and whose window never ends by
//! itself. A request is `acquire` on that cell: the lock-free path, no
//! network. A new lease raises the limit (`set_budget` keeps usage); a
//! settle refunds into the cell, so into the node's lease, in the same
//! window; overuse pushes the cell's usage past its limit, and the node
//! charges the excess to Redis. At the fleet window's end the node closes
//! the cell (limit zero), reads it, tells the old window's record what was
//! left unused or overused, and resets the cell (`reset_window`): a
//! reservation of the old window then settles as ended, and its overuse
//! is carried into the new one, as the core does.
//!
//! **Refills.** A lease is a fraction of the budget (1% by default). After
//! each admission the node compares what is left with a low-water mark
//! (half a lease); below it, a background task tops the lease back up, so
//! requests keep being served locally while the refill is in flight. Only
//! a request that finds the lease short waits: it asks Redis for at least
//! what it lacks (and, if it is no larger than a lease, a full lease),
//! exactly what it lacks if it is larger than a lease.
//!
//! **Giving back.** An agent with no request on a node for half a second
//! (configurable) has its unused lease given back; so does a lease that
//! piled up beyond two leases from refunds, every lease at
//! [`FleetManager::shutdown`], and the unused part of every lease at its
//! window's end. To give back, the node first takes the amount out of its
//! own cell (a reservation it keeps), so nothing admitted locally can spend
//! what the fleet is told is free. Budget stranded on nodes is therefore at
//! most one lease per node per agent (two while refunds pile up between
//! heartbeats).
//!
//! **Failures.** A call whose reply is lost leaves the node unsure; it
//! assumes what leaves it holding less (no grant, the gift made), and its
//! next call's belief puts the server right. With Redis unreachable the node
//! serves from its lease, then refuses ([`FailMode::Closed`]) or admits up
//! to a local allowance ([`FailMode::Open`]), which its next call charges.
//! When Redis comes back without its data (a restart without persistence),
//! the first script to run notices the fleet record is missing and makes a
//! new one, with a new epoch and a *fence*: windows that began before it
//! grant nothing for a grace period, while every node, seeing the epoch
//! change at its next heartbeat, puts back the budgets it knows and states
//! what it took. A node that crashes strands its unused lease until the
//! window ends: the record still counts it as taken, so it is never handed
//! out twice. [`docs::fleet`] has the whole story, with what each failure
//! costs.
//!
//! # Use
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use agent_budget::BudgetLimit;
//! use agent_budget_redis::{FleetConfig, FleetManager};
//!
//! let fleet = FleetManager::connect(FleetConfig::new("redis://127.0.0.1:6379")).await?;
//! let agent = uuid::Uuid::new_v4();
//! fleet.set_budget(BudgetLimit { agent_id: agent, token_budget: 1_000_000, calls_budget: 10_000, window_secs: 60 }).await?;
//!
//! let reservation = fleet.acquire(&agent, 2_000, 1).await?; // from the lease, usually
//! // ... forward the request; the response used 1,545 tokens ...
//! reservation.settle(1_545); // the rest goes back to this node's lease
//!
//! fleet.shutdown().await?; // unused leases back to the fleet
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! - `tower`: [`FleetManager`] implements `agent_budget_tower::Admission`,
//!   so `BudgetLayer::new(Arc::new(fleet))` enforces the fleet's budgets on
//!   HTTP requests (`Denied::Refused` a `429`, `Denied::Unavailable` a
//!   `503`, both with `Retry-After`). `budget-gateway --redis URL` is built
//!   on it.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "tower")]
mod admission;
mod clock;
pub mod docs;
mod error;
mod fleet;
pub mod protocol;
pub mod store;

pub use clock::{FakeClock, FleetClock, MonotonicClock, Timeline, WallClock};
pub use error::{Denied, FleetError};
pub use fleet::{FailMode, FleetConfig, FleetInfo, FleetManager, FleetStats};
pub use protocol::{Amount, LeasePolicy};

/// The README's example, compiled as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
