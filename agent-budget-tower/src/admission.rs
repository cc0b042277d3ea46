//! [`Admission`]: what admits a request, in-process or fleet-wide.
//!
//! # How it works
//!
//! The layer asks its budget source three things: admit this estimate now
//! ([`Admission::admit`]: its tokens and calls, and whatever else the
//! source reads from it, such as the request's `model`), wait until it
//! fits ([`Admission::admit_wait`], which the layer bounds by
//! [`max_wait`](crate::BudgetLayer::max_wait)), and where the agent's
//! budget stands, for the rate-limit headers ([`Admission::budget_chain`],
//! or [`Admission::rate_limits`] for a source with more limits than a
//! chain, which may add headers of its own with
//! [`Admission::write_headers`]). What it admits is its
//! [`Reservation`], which the layer settles with the response's usage,
//! split into prompt, cached prompt and completion when the response says
//! ([`UsedTokens`](crate::UsedTokens)): a source that prices tokens (the
//! gateway's spend limits) settles each of its limits with its own
//! amount.
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
use std::time::{Duration, SystemTime};

use agent_budget::{AgentId, BudgetLimiter, FullBudgetInfo, OwnedReservation, Refused, Settlement};
use http::HeaderMap;

use crate::headers::RateLimitSnapshot;
use crate::{Estimate, UsageLog, UsedTokens};

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
    /// A refusal the admission words itself (a limit in dollars, whose
    /// core budget counts micro-dollars as tokens): answered like
    /// [`Refused`](Self::Refused), with this message and error `type`.
    Worded {
        /// The core's refusal.
        refused: Refused,
        /// The response's error message.
        message: String,
        /// The error's `type` (`"spend"`).
        error_type: &'static str,
    },
    /// The request cannot be admitted as it is, whatever the budget (a
    /// model no price is known for, under a spend limit): `400`, nothing
    /// forwarded or charged.
    Invalid {
        /// The agent whose request was not admitted.
        agent_id: AgentId,
        /// The response's error message.
        message: String,
        /// The error's `code`.
        code: &'static str,
    },
}

impl Denial {
    /// When the same request may be admitted, if waiting can help.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Denial::Refused(refused) | Denial::Worded { refused, .. } => refused.retry_after,
            Denial::Unavailable { retry_after, .. } => Some(*retry_after),
            Denial::Invalid { .. } => None,
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
            Denial::Unavailable { message, .. }
            | Denial::Worded { message, .. }
            | Denial::Invalid { message, .. } => f.write_str(message),
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
    /// What an admission holds until the response settles it.
    type Reservation: Reservation;

    /// Takes what `estimate` asks for from the agent's budget (its tokens
    /// and calls, at every level of its chain; more limits, if the
    /// admission has them), or nothing, without waiting for budget to come
    /// back. The reservation is settled by the layer when the response
    /// ends.
    fn admit(
        self: &Arc<Self>,
        agent_id: &AgentId,
        estimate: &Estimate,
    ) -> impl Future<Output = Result<Self::Reservation, Denial>> + Send;

    /// [`admit`](Self::admit), and the `x-ratelimit-*` snapshot of where
    /// the budgets stand right after, when the admission read it in the
    /// same step (as the gateway's does with the core's
    /// `acquire_owned_reporting`): the layer then does not ask
    /// [`rate_limits`](Self::rate_limits). By default `admit`, and `None`:
    /// the layer asks `rate_limits`.
    fn admit_reporting(
        self: &Arc<Self>,
        agent_id: &AgentId,
        estimate: &Estimate,
    ) -> impl Future<Output = Result<(Self::Reservation, Option<RateLimitSnapshot>), Denial>> + Send
    {
        let admitted = self.admit(agent_id, estimate);
        async move { admitted.await.map(|reservation| (reservation, None)) }
    }

    /// Like [`admit`](Self::admit), but waits while the denial has a
    /// `retry_after`; resolves when admitted, or with a denial that waiting
    /// cannot help. The layer drops it at its `max_wait`.
    ///
    /// The default asks again after each denial's `retry_after`, at most
    /// [`POLL_INTERVAL`] apart.
    fn admit_wait(
        self: &Arc<Self>,
        agent_id: &AgentId,
        estimate: &Estimate,
    ) -> impl Future<Output = Result<Self::Reservation, Denial>> + Send {
        admit_polling(self, agent_id, estimate)
    }

    /// Like [`admit`](Self::admit), for a request whose agent (or one of
    /// its ancestors) rolls its limits out in shadow mode: every limit of
    /// an agent for which `shadowed` is true takes what the request asks
    /// even past that limit, counting it, instead of refusing; every other
    /// limit the request reaches is enforced as ever, all in one admission.
    ///
    /// The default cannot take past a limit: for an agent in shadow mode it
    /// admits the request with nothing reserved (its settle then charges
    /// the tokens used, past the limit; its call is not counted), and for
    /// any other agent it is [`admit`](Self::admit). The core's sets do
    /// better (`BudgetManager::acquire_set_owned_shadowed`).
    fn admit_shadowed(
        self: &Arc<Self>,
        agent_id: &AgentId,
        estimate: &Estimate,
        shadowed: &(dyn Fn(&AgentId) -> bool + Send + Sync),
    ) -> impl Future<Output = Result<Self::Reservation, Denial>> + Send {
        let estimate = if shadowed(agent_id) {
            Estimate {
                model: estimate.model.clone(),
                ..Estimate::default()
            }
        } else {
            estimate.clone()
        };
        let (this, agent_id) = (self.clone(), *agent_id);
        async move { this.admit(&agent_id, &estimate).await }
    }

    /// Where the agent's budget stands: its own level first, then each
    /// ancestor's, nearest first; empty if the agent has no budget.
    fn budget_chain(&self, agent_id: &AgentId) -> Vec<FullBudgetInfo>;

    /// The budgets the `x-ratelimit-*` headers of a response to a request
    /// estimated as `estimate` report from (each resource from the one
    /// with the least left): [`budget_chain`](Self::budget_chain) unless
    /// the admission has more limits than the chain.
    fn rate_limits(&self, agent_id: &AgentId, estimate: &Estimate) -> Vec<FullBudgetInfo> {
        let _ = estimate;
        self.budget_chain(agent_id)
    }

    /// Writes headers of the admission's own on a response to a request
    /// estimated as `estimate`, admitted or refused for its budget (spend,
    /// say). None by default.
    fn write_headers(&self, agent_id: &AgentId, estimate: &Estimate, headers: &mut HeaderMap) {
        let _ = (agent_id, estimate, headers);
    }

    /// Writes headers of the admission's own on the response to a request
    /// it admitted as `reservation`. By default
    /// [`write_headers`](Self::write_headers) for the reservation's agent;
    /// an admission whose reservation knows where its budgets stood when it
    /// was taken writes from that, without reading them again.
    fn write_admitted_headers(
        &self,
        reservation: &Self::Reservation,
        estimate: &Estimate,
        headers: &mut HeaderMap,
    ) {
        self.write_headers(&reservation.agent_id(), estimate, headers);
    }

    /// Whether `tokens` and `calls` would be admitted now, asked before
    /// waiting for a request's body that has not arrived (with the least
    /// any request of its kind can cost): the denial if they would not,
    /// taking nothing either way.
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

/// Asks `admission` to [`admit`](Admission::admit) again after each
/// denial's `retry_after`, at most [`POLL_INTERVAL`] apart, until it is
/// admitted or denied without one: the default
/// [`admit_wait`](Admission::admit_wait), for an admission that has no
/// wake-ups of its own (or wraps one whose wait it must not use).
pub async fn admit_polling<A: Admission + ?Sized>(
    admission: &Arc<A>,
    agent_id: &AgentId,
    estimate: &Estimate,
) -> Result<A::Reservation, Denial> {
    loop {
        let denial = match admission.admit(agent_id, estimate).await {
            Ok(reservation) => return Ok(reservation),
            Err(denial) => denial,
        };
        match denial.retry_after() {
            Some(wait) => tokio::time::sleep(wait.min(POLL_INTERVAL)).await,
            None => return Err(denial),
        }
    }
}

/// Takes what `estimate` asks of the agent's budget (`acquire_owned`), and
/// the `x-ratelimit-*` snapshot of its chain as the admission left it
/// (`acquire_owned_reporting`): what [`Admission::admit_reporting`]
/// answers for every [`BudgetLimiter`], for an admission of its own that
/// admits an agent's chain the same way.
pub fn acquire_reporting<M: BudgetLimiter>(
    budgets: &Arc<M>,
    agent_id: &AgentId,
    estimate: &Estimate,
) -> Result<(OwnedReservation, Option<RateLimitSnapshot>), Refused> {
    let mut chain: smallvec::SmallVec<[FullBudgetInfo; 2]> = smallvec::SmallVec::new();
    let taken =
        budgets.acquire_owned_reporting(agent_id, estimate.tokens(), estimate.calls, |info| {
            chain.push(info)
        })?;
    Ok((taken, RateLimitSnapshot::from_chain(&chain)))
}

/// What an [`Admission`] took for one request, settled once when its
/// response is over: the core's [`OwnedReservation`], or a set of them.
pub trait Reservation: Send + 'static {
    /// The agent it was taken for.
    fn agent_id(&self) -> AgentId;

    /// The tokens it holds.
    fn tokens(&self) -> u64;

    /// The calls it holds.
    fn calls(&self) -> u64;

    /// Settles it with what the response used (`used.total` tokens), and
    /// gives the rest back.
    fn settle(self, used: UsedTokens) -> Settlement;

    /// Gives everything back.
    fn cancel(self) -> Settlement;

    /// Tells `log` what it took at `at`, budget by budget. By default one
    /// budget, the agent's: its [`tokens`](Self::tokens) and
    /// [`calls`](Self::calls).
    fn log_admitted(&self, log: &dyn UsageLog, at: SystemTime) {
        log.admitted(&self.agent_id(), self.tokens(), self.calls(), at);
    }

    /// [`settle`](Self::settle) with `used`, or [`cancel`](Self::cancel)
    /// for `None`, and tells `log` (when there is one) what that did to
    /// each budget it held, as the reservation taken at `admitted_at`. By
    /// default one budget, the agent's, with the core's settlement.
    fn settle_logged(
        self,
        used: Option<UsedTokens>,
        log: Option<&dyn UsageLog>,
        admitted_at: SystemTime,
    ) -> Settlement
    where
        Self: Sized,
    {
        let agent = self.agent_id();
        let settlement = match used {
            Some(used) => self.settle(used),
            None => self.cancel(),
        };
        if let Some(log) = log {
            log.settled(&agent, admitted_at, settlement);
        }
        settlement
    }
}

impl Reservation for OwnedReservation {
    fn agent_id(&self) -> AgentId {
        OwnedReservation::agent_id(self)
    }

    fn tokens(&self) -> u64 {
        OwnedReservation::tokens(self)
    }

    fn calls(&self) -> u64 {
        OwnedReservation::calls(self)
    }

    fn settle(self, used: UsedTokens) -> Settlement {
        OwnedReservation::settle(self, used.total)
    }

    fn cancel(self) -> Settlement {
        OwnedReservation::cancel(self)
    }
}

impl<M: BudgetLimiter + 'static> Admission for M {
    type Reservation = OwnedReservation;

    fn admit(
        self: &Arc<Self>,
        agent_id: &AgentId,
        estimate: &Estimate,
    ) -> impl Future<Output = Result<OwnedReservation, Denial>> + Send {
        std::future::ready(
            self.acquire_owned(agent_id, estimate.tokens(), estimate.calls)
                .map_err(Denial::Refused),
        )
    }

    /// `acquire_owned_reporting`: the chain is read in the admission, not
    /// looked up again for the headers.
    fn admit_reporting(
        self: &Arc<Self>,
        agent_id: &AgentId,
        estimate: &Estimate,
    ) -> impl Future<Output = Result<(OwnedReservation, Option<RateLimitSnapshot>), Denial>> + Send
    {
        std::future::ready(acquire_reporting(self, agent_id, estimate).map_err(Denial::Refused))
    }

    fn admit_wait(
        self: &Arc<Self>,
        agent_id: &AgentId,
        estimate: &Estimate,
    ) -> impl Future<Output = Result<OwnedReservation, Denial>> + Send {
        let waiting = self.acquire_owned_wait(agent_id, estimate.tokens(), estimate.calls);
        async move { waiting.await.map_err(Denial::Refused) }
    }

    fn budget_chain(&self, agent_id: &AgentId) -> Vec<FullBudgetInfo> {
        self.chain_info(agent_id)
    }

    /// The core's [`check`](agent_budget::BudgetManager::check): the admission's verdict
    /// and its refusal's `Retry-After`, taking nothing.
    fn precheck(
        self: &Arc<Self>,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> Result<(), Denial> {
        self.check(agent_id, tokens, calls).map_err(Denial::Refused)
    }
}
