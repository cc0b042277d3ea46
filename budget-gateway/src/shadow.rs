//! Shadow mode: `enforce = false` on an agent (in the file, or through the
//! admin API) rolls a limit out without refusing anyone.
//!
//! # What it does
//!
//! An agent in shadow mode has its limits set in the core as any other,
//! so its usage is counted, the dashboard and `/v1/agents` show it, the
//! rate-limit headers say what an enforced limit would say (`remaining 0`
//! once it is used up), and alerts fire at the same fractions (with
//! `"enforced": false`). What differs: a request its own budget refuses is
//! admitted anyway, counted in `/metrics` as
//! `budget_gateway_shadow_refusals_total{reason="tokens"|"calls"}` (with
//! an `agent` label for agents with a `metrics_label`, as the layer's
//! metrics have), and
//! noted for the alerts as a refusal would be.
//!
//! # How it works
//!
//! [`Shadow`] wraps the layer's [`Admission`] (the core's manager or a
//! fleet's). An admission goes through untouched. A refusal for tokens or
//! calls (not "no budget") of an agent with a level in shadow mode is
//! asked again with [`Admission::admit_shadowed`]: the limits of every
//! agent in shadow mode take the request past their limit, counting it,
//! while every other limit the request reaches (an enforced parent's, an
//! enforced spend limit beside it) is enforced as ever, all in the one
//! atomic admission of the core's sets
//! (`BudgetManager::acquire_set_owned_shadowed`). If that admits it, the
//! first refusal is counted as a would-be refusal; if it refuses, an
//! enforced limit refused, and that refusal is the answer. The request's
//! reservation is settled like any other: its calls, tokens and dollars
//! are counted past the limit, at every level. An agent whose chain is all
//! enforced pays nothing for this: one look at the catalog, on a refusal.
//!
//! A request that may wait (`max_wait`) is never kept waiting by a limit in
//! shadow mode: it is admitted at once past that limit, and waits only for
//! what an enforced limit refuses.
//!
//! Limits of the approach:
//!
//! - **A fleet's budgets** (Redis leases) cannot take past a limit: there
//!   the request is admitted with nothing reserved and charged its tokens
//!   at the settle (its call is not counted past the limit). A fleet's
//!   budgets are flat, so no enforced parent is skipped.
//! - **A refusal judged on the first estimate**: with `count_prompts =
//!   "when_tight"` the layer counts the prompt only after a refusal for
//!   tokens; a shadow agent is admitted at the first one, so a would-be
//!   refusal may be counted for a request the exact count would have
//!   admitted. `count_prompts = "always"` makes the counts exact.

use std::sync::Arc;

use agent_budget::{AgentId, BudgetKind, FullBudgetInfo, RefusalReason, Refused};
use agent_budget_tower::headers::RateLimitSnapshot;
use agent_budget_tower::{admit_polling, Admission, Denial, Estimate, RefusalReason as Reason};
use http::HeaderMap;

use crate::catalog::Catalog;
use crate::watch::Watch;

/// Would-be refusals, by `reason` (and `agent`, where it has a label).
const SHADOW_METRIC: &str = "budget_gateway_shadow_refusals_total";

/// An [`Admission`] that admits what shadow-mode budgets refuse.
pub struct Shadow<M> {
    inner: Arc<M>,
    catalog: Catalog,
    watch: Watch,
}

impl<M> std::fmt::Debug for Shadow<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shadow").finish_non_exhaustive()
    }
}

impl<M: Admission> Shadow<M> {
    /// `inner`, with the agents `catalog` says are not enforced in shadow
    /// mode; would-be refusals noted in `watch`.
    pub fn new(inner: Arc<M>, catalog: Catalog, watch: Watch) -> Self {
        metrics::describe_counter!(
            SHADOW_METRIC,
            metrics::Unit::Count,
            "Requests admitted in shadow mode that an enforced limit would have refused"
        );
        Shadow {
            inner,
            catalog,
            watch,
        }
    }

    /// The refusal in `denial`, if it is one that shadow mode may let
    /// through: for tokens or calls, of an agent with a level in shadow
    /// mode.
    fn shadowable(&self, agent: &AgentId, denial: &Denial) -> Option<Refused> {
        let refused = refusal(denial)?;
        (matches!(refused.reason, RefusalReason::Exceeded { .. })
            && self.catalog.shadow_in_chain(agent))
        .then_some(*refused)
    }

    /// Admits `agent`'s request that `refused` turned down, with the limits
    /// in shadow mode taken past their limit: counted as a would-be
    /// refusal if that admits it; an enforced limit's refusal if not.
    async fn pass(
        &self,
        agent: &AgentId,
        estimate: &Estimate,
        refused: Refused,
    ) -> Result<M::Reservation, Denial> {
        let catalog = &self.catalog;
        let shadowed = |id: &AgentId| !catalog.enforces(id);
        let admitted = self
            .inner
            .admit_shadowed(agent, estimate, &shadowed)
            .await?;
        self.note(agent, &refused);
        Ok(admitted)
    }

    /// Counts a would-be refusal.
    fn note(&self, agent: &AgentId, refused: &Refused) {
        let reason = match refused.kind {
            BudgetKind::Token => Reason::Tokens,
            BudgetKind::Call => Reason::Calls,
        };
        let reason_label = match reason {
            Reason::Calls => "calls",
            _ => "tokens",
        };
        // Looked up on each would-be refusal (not the admission's path):
        // labels change with the catalog.
        match self.catalog.metrics_label(agent) {
            Some(label) => {
                metrics::counter!(SHADOW_METRIC, "agent" => label, "reason" => reason_label)
            }
            None => metrics::counter!(SHADOW_METRIC, "reason" => reason_label),
        }
        .increment(1);
        self.watch.shadow_refused(agent, reason);
    }
}

/// The refusal inside a denial, where there is one.
fn refusal(denial: &Denial) -> Option<&Refused> {
    match denial {
        Denial::Refused(refused) | Denial::Worded { refused, .. } => Some(refused),
        _ => None,
    }
}

impl<M: Admission> Admission for Shadow<M> {
    type Reservation = M::Reservation;

    async fn admit(
        self: &Arc<Self>,
        agent_id: &AgentId,
        estimate: &Estimate,
    ) -> Result<M::Reservation, Denial> {
        match self.inner.admit(agent_id, estimate).await {
            Err(denial) => match self.shadowable(agent_id, &denial) {
                Some(refused) => self.pass(agent_id, estimate, refused).await,
                None => Err(denial),
            },
            admitted => admitted,
        }
    }

    async fn admit_reporting(
        self: &Arc<Self>,
        agent_id: &AgentId,
        estimate: &Estimate,
    ) -> Result<(M::Reservation, Option<RateLimitSnapshot>), Denial> {
        match self.inner.admit_reporting(agent_id, estimate).await {
            Err(denial) => match self.shadowable(agent_id, &denial) {
                Some(refused) => self
                    .pass(agent_id, estimate, refused)
                    .await
                    .map(|reservation| (reservation, None)),
                None => Err(denial),
            },
            admitted => admitted,
        }
    }

    async fn admit_wait(
        self: &Arc<Self>,
        agent_id: &AgentId,
        estimate: &Estimate,
    ) -> Result<M::Reservation, Denial> {
        if !self.catalog.shadow_in_chain(agent_id) {
            return self.inner.admit_wait(agent_id, estimate).await;
        }
        // Not the inner wait, which would wait at a limit in shadow mode:
        // asked again only while an enforced limit refuses (the layer
        // drops this at its `max_wait`).
        admit_polling(self, agent_id, estimate).await
    }

    fn admit_shadowed(
        self: &Arc<Self>,
        agent_id: &AgentId,
        estimate: &Estimate,
        shadowed: &(dyn Fn(&AgentId) -> bool + Send + Sync),
    ) -> impl std::future::Future<Output = Result<M::Reservation, Denial>> + Send {
        self.inner.admit_shadowed(agent_id, estimate, shadowed)
    }

    fn budget_chain(&self, agent_id: &AgentId) -> Vec<FullBudgetInfo> {
        self.inner.budget_chain(agent_id)
    }

    fn rate_limits(&self, agent_id: &AgentId, estimate: &Estimate) -> Vec<FullBudgetInfo> {
        self.inner.rate_limits(agent_id, estimate)
    }

    fn write_headers(&self, agent_id: &AgentId, estimate: &Estimate, headers: &mut HeaderMap) {
        self.inner.write_headers(agent_id, estimate, headers);
    }

    fn write_admitted_headers(
        &self,
        reservation: &M::Reservation,
        estimate: &Estimate,
        headers: &mut HeaderMap,
    ) {
        self.inner
            .write_admitted_headers(reservation, estimate, headers);
    }

    /// A budget in shadow mode refuses nothing before the body either: the
    /// request goes on to its admission, which tells a would-be refusal
    /// from an enforced limit's.
    fn precheck(
        self: &Arc<Self>,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> Result<(), Denial> {
        match self.inner.precheck(agent_id, tokens, calls) {
            Err(denial) if self.shadowable(agent_id, &denial).is_some() => Ok(()),
            checked => checked,
        }
    }
}
