//! Token and call budgets per agent, enforced without locks.
//!
//! A [`BudgetManager`] gives each agent a budget of tokens and calls per
//! fixed window, and admits or refuses requests against it from any number
//! of threads at once. Each agent's usage lives in one 128-bit word updated
//! by compare-and-swap, so a scheduler's threads never queue behind a lock
//! and a gateway's tail latency is not a preempted lock holder's.
//!
//! # The gateway flow
//!
//! A gateway in front of an LLM learns a request's real token count only
//! when the response is back. It reserves an estimate and one call before
//! forwarding, then settles what was really used:
//!
//! ```
//! use agent_budget::{BudgetLimit, BudgetManager, Settlement};
//!
//! let budgets = BudgetManager::new();
//! let agent = uuid::Uuid::new_v4();
//! budgets.set_budget(BudgetLimit { agent_id: agent, token_budget: 10_000, calls_budget: 100, window_secs: 60 });
//!
//! // 1. Estimate: prompt tokens plus the completion's `max_tokens`.
//! let (prompt_tokens, max_tokens) = (1_200, 800);
//! // 2. Acquire tokens and one call together, or neither. A refusal says
//! //    when to come back (`retry_after`; `None` if it can never fit):
//! //    a gateway answers 429 with it.
//! let reservation = budgets.acquire(&agent, prompt_tokens + max_tokens, 1)?;
//! // 3. Forward the request (elided); the response reports the real usage.
//! let used = 1_200 + 345;
//! // 4. Settle: the unused 455 tokens go back to the window they came from.
//! let outcome = reservation.settle(used);
//! assert_eq!(outcome, Settlement::Applied { refunded_tokens: 455, charged_tokens: 0, refunded_calls: 0 });
//! assert_eq!(budgets.remaining(&agent).tokens_remaining, 10_000 - 1_545);
//! # Ok::<(), agent_budget::Refused>(())
//! ```
//!
//! If the response used more than was reserved, `settle` charges the extra
//! even past the limit (the tokens were spent) and the agent is refused until
//! its window ends. A refund never reaches a later window: once the window a
//! reservation was taken in has ended, `settle` and `cancel` change nothing
//! and return [`Settlement::WindowEnded`]. A reservation dropped without
//! either stays fully charged.
//!
//! # With tokio: waiting for budget, and reservations that travel
//!
//! A gateway on tokio holds the reservation across `.await`s and settles it
//! when the response stream ends, perhaps in another task: [`acquire_owned`]
//! returns an [`OwnedReservation`] that holds an `Arc` of the manager. And a
//! request that does not fit can wait for budget instead of being refused:
//! [`acquire_owned_wait`] resolves as soon as a refund or the window's end
//! makes room (feature `async`, on by default). The deadline is the caller's:
//!
//! ```
//! # #[cfg(feature = "async")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use agent_budget::{BudgetLimit, BudgetManager};
//!
//! let budgets = Arc::new(BudgetManager::new());
//! let agent = uuid::Uuid::new_v4();
//! budgets.set_budget(BudgetLimit { agent_id: agent, token_budget: 10_000, calls_budget: 100, window_secs: 60 });
//!
//! // Reserve the estimate, waiting at most two seconds for it to fit.
//! let estimate = 1_200 + 800;
//! let waiting = budgets.acquire_owned_wait(&agent, estimate, 1);
//! let reservation = match tokio::time::timeout(Duration::from_secs(2), waiting).await {
//!     Ok(Ok(reservation)) => reservation,
//!     Ok(Err(refused)) => return Err(refused.into()), // 429: no budget, or it can never fit
//!     Err(_) => return Err("429: no room within two seconds".into()), // nothing was taken
//! };
//! // The reservation is `'static`: it can go with the response body, and
//! // settle wherever the stream ends.
//! let stream_end = tokio::spawn(async move {
//!     let used = 1_545; // the upstream's usage.total_tokens
//!     reservation.settle(used)
//! });
//! stream_end.await?;
//! assert_eq!(budgets.remaining(&agent).tokens_remaining, 10_000 - 1_545);
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "async"))]
//! # fn main() {}
//! ```
//!
//! [`acquire_owned`]: BudgetManager::acquire_owned
//! [`acquire_owned_wait`]: BudgetManager::acquire_owned_wait
//!
//! # Nested budgets, and budgets that refill
//!
//! [`set_parent`](BudgetManager::set_parent) nests budgets (a key under its
//! team under its organisation, up to [`MAX_LEVELS`] levels): a request is
//! admitted at every level of its chain or at none, and no level is ever
//! over-admitted by racing requests. [`set_refill`](BudgetManager::set_refill)
//! gives an agent a token bucket ([`RefillLimit`]) that refills continuously
//! instead of by fixed windows. Both live in the same one-word cell; see
//! [`docs::semantics`] for the rules, including overuse reported after a
//! window ended, which is charged to the current one
//! ([`Settlement::CarriedOver`]).
//!
//! # The seed's API
//!
//! [`BudgetManager`] keeps the API of the locked design it replaces:
//! [`reserve`](BudgetManager::reserve), [`track_call`](BudgetManager::track_call)
//! and [`release`](BudgetManager::release) work as they did, with its defects
//! fixed (see [`docs::semantics`]). New code should use
//! [`acquire`](BudgetManager::acquire): `release` trusts any amount from any
//! caller and refunds into whatever window is current.
//!
//! [`LockedBudgetManager`] is that locked design, kept as the reference for
//! differential tests and the baseline for benchmarks; [`BudgetLimiter`] is
//! the trait both implement.
//!
//! # Further reading
//!
//! - [`docs::semantics`]: windows, time, waiting, ranges, persistence, and
//!   the seed's defects and how they are fixed.
//! - [`docs::implementation`]: the bit layout, the orderings, what is
//!   lock-free on which targets, and why each dependency is there.
//! - [`docs::model_checking`]: the loom models, and what they do and do not
//!   cover.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cell;
mod clock;
pub mod docs;
mod error;
mod handle;
mod hierarchy;
mod limit;
mod limiter;
mod manager;
mod persist;
mod registry;
mod reservation;
mod rules;
mod set;
mod sync;
mod types;
#[cfg(feature = "async")]
mod wait;

pub use error::{BudgetExceeded, HierarchyError, PersistError, RefusalReason, Refused};
pub use handle::{AgentHandle, OwnedAgentHandle};
pub use hierarchy::MAX_LEVELS;
pub use limiter::BudgetLimiter;
pub use manager::locked::LockedBudgetManager;
pub use manager::lockfree::BudgetManager;
pub use reservation::{
    OwnedReservation, OwnedSetReservation, Reservation, SetReservation, Settlement,
};
pub use rules::{MAX_CALLS, MAX_TOKENS};
pub use set::MAX_SET_LIMITS;
pub use sync::ClockSource;
pub use types::{
    AgentId, BudgetInfo, BudgetKind, BudgetLimit, CalendarLimit, CalendarPeriod, Claim,
    FullBudgetInfo, RefillLimit, Usage,
};

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
