//! [`Admission`]: what admits a request, in-process or fleet-wide.
//!
//! # How it works
//!
//! The layer asks its budget source three things: admit these tokens and
//! calls now ([`Admission::admit`]), wait until they fit
//! ([`Admission::admit_wait`], which the layer bounds by
//! [`max_wait`](crate::BudgetLayer::max_wait)), and where the agent's
//! budget stands, for the rate-limit headers ([`Admission::budget_chain`]).
//!
//! Every [`BudgetLimiter`] (the core's [`BudgetManager`](agent_budget::BudgetManager)
//! and [`LockedBudgetManager`](agent_budget::LockedBudgetManager)) is one,
//! as it always was: `admit` is `acquire_owned`, ready at once (the future
//! holds the result; nothing is allocated or scheduled), `admit_wait` is
//! `acquire_owned_wait`, woken by refunds and the window's end, and the
//! chain is `chain_info`. A budget kept elsewhere (a fleet sharing one
//! budget through Redis, say: `agent-budget-redis` implements this trait
//! for its `FleetManager` with its `tower` feature) may take a round trip
//! in `admit`, and may answer [`Denial::Unavailable`] when it cannot tell:
//! the layer answers `503` with `Retry-After`, where a refusal by the
//! budget is a `429`. Its `admit_wait` may keep the default, which asks
//! again at the denial's `retry_after`, at most [`POLL_INTERVAL`] apart.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use agent_budget::{AgentId, BudgetLimiter, FullBudgetInfo, OwnedReservation, Refused};

/// The longest the default [`Admission::admit_wait`] sleeps between two
/// tries: 50 ms.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Why a request was not admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// The budget refused it: the agent has no budget (`403`), or not
    /// enough is left at one level of its chain (`429`, with
    /// `Retry-After` when waiting can help).
    Refused(Refused),
    /// The budget could not be checked now (its store is unreachable, say):
    /// `503`, with `Retry-After`. Nothing is known about the budget itself.
    Unavailable {
        /// The agent whose request was not admitted.
        agent_id: AgentId,
        /// When to try again.
        retry_after: Duration,
        /// Why, for people; the response's error message.
        message: String,
    },
}

impl Denial {
    /// When the same request may be admitted, if waiting can help.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Denial::Refused(refused) => refused.retry_after,
            Denial::Unavailable { retry_after, .. } => Some(*retry_after),
        }
    }
}

impl From<Refused> for Denial {
    fn from(refused: Refused) -> Self {
        Denial::Refused(refused)
    }
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denial::Refused(refused) => refused.fmt(f),
            Denial::Unavailable { message, .. } => f.write_str(message),
        }
    }
}

impl std::error::Error for Denial {}

/// What admits requests for a [`BudgetLayer`](crate::BudgetLayer): takes an
/// agent's tokens and calls together, or neither, and tells where its
/// budget stands.
///
/// The layer calls [`admit`](Self::admit) for each request, and
/// [`admit_wait`](Self::admit_wait) under its `max_wait` when that was
/// denied with a `retry_after`; it reads [`budget_chain`](Self::budget_chain)
/// for the rate-limit headers. A [`Denial::Refused`] is answered `429`
/// (`403` without a budget), a [`Denial::Unavailable`] `503`, both with
/// `Retry-After` when they have one.
///
/// Every [`BudgetLimiter`] is one, as the layer's managers always were:
/// `admit` is `acquire_owned`, ready at once (nothing allocated or
/// scheduled), `admit_wait` is `acquire_owned_wait` (woken by refunds and
/// the window's end), `budget_chain` is `chain_info`. A budget kept
/// elsewhere implements it too: `agent-budget-redis`'s `FleetManager` does
/// (its `tower` feature), admitting from the node's lease and answering
/// `Unavailable` when Redis cannot be reached and the lease is spent.
pub trait Admission: Send + Sync + 'static {
    /// Takes `tokens` and `calls` from the agent's budget (at every level
    /// of its chain), or nothing, without waiting for budget to come back.
    /// The reservation is settled by the layer when the response ends.
    fn admit(
        self: &Arc<Self>,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> impl Future<Output = Result<OwnedReservation, Denial>> + Send;

    /// Like [`admit`](Self::admit), but waits while the denial has a
    /// `retry_after`; resolves when admitted, or with a denial that waiting
    /// cannot help. The layer drops it at its `max_wait`.
    ///
    /// The default asks again after each denial's `retry_after`, at most
    /// [`POLL_INTERVAL`] apart.
    fn admit_wait(
        self: &Arc<Self>,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> impl Future<Output = Result<OwnedReservation, Denial>> + Send {
        async move {
            loop {
                let denial = match self.admit(agent_id, tokens, calls).await {
                    Ok(reservation) => return Ok(reservation),
                    Err(denial) => denial,
                };
                match denial.retry_after() {
                    Some(wait) => tokio::time::sleep(wait.min(POLL_INTERVAL)).await,
                    None => return Err(denial),
                }
            }
        }
    }

    /// Where the agent's budget stands: its own level first, then each
    /// ancestor's, nearest first; empty if the agent has no budget.
    fn budget_chain(&self, agent_id: &AgentId) -> Vec<FullBudgetInfo>;

    /// Whether `tokens` and `calls` would be admitted now, asked before a
    /// request's body is read (with the least any request of its kind can
    /// cost): the denial if they would not, taking nothing either way.
    /// The default knows nothing without asking, and answers `Ok`: a
    /// budget kept elsewhere is asked when the request is admitted.
    fn precheck(
        self: &Arc<Self>,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> Result<(), Denial> {
        let _ = (agent_id, tokens, calls);
        Ok(())
    }
}

impl<M: BudgetLimiter + 'static> Admission for M {
    fn admit(
        self: &Arc<Self>,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> impl Future<Output = Result<OwnedReservation, Denial>> + Send {
        std::future::ready(
            self.acquire_owned(agent_id, tokens, calls)
                .map_err(Denial::Refused),
        )
    }

    fn admit_wait(
        self: &Arc<Self>,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> impl Future<Output = Result<OwnedReservation, Denial>> + Send {
        let waiting = self.acquire_owned_wait(agent_id, tokens, calls);
        async move { waiting.await.map_err(Denial::Refused) }
    }

    fn budget_chain(&self, agent_id: &AgentId) -> Vec<FullBudgetInfo> {
        self.chain_info(agent_id)
    }

    /// Takes the amounts and gives them back at once: the same all-or-
    /// nothing check as an admission, with its refusal's `Retry-After`.
    fn precheck(
        self: &Arc<Self>,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> Result<(), Denial> {
        let taken = self
            .acquire_owned(agent_id, tokens, calls)
            .map_err(Denial::Refused)?;
        let _ = taken.cancel();
        Ok(())
    }
}
