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
//! `budget_gateway_shadow_refusals_total{reason="tokens"|"calls"}`, and
//! noted for the alerts as a refusal would be.
//!
//! # How it works
//!
//! [`Shadow`] wraps the layer's [`Admission`] (the core's manager or a
//! fleet's). An admission goes through untouched; a refusal by the budget
//! (not "no budget") is looked at: if the level of the chain that refused
//! (`Refused::refused_by`) is in shadow mode, the request is admitted
//! instead with a reservation of zero tokens and zero calls (zero always
//! fits, at every level). The layer then settles that reservation with the
//! response's real usage as it does any other, and the core charges
//! tokens beyond a reservation even past the limit (overuse is never
//! forgiven): so the agent's tokens keep being counted past its limit, at
//! every level of its chain. An enforced agent pays nothing for this: the
//! wrapper only matches on the result.
//!
//! Limits of the approach, each a consequence of charging through a settle:
//!
//! - **Calls past the limit are not counted**: a settle changes tokens
//!   only, so the call counter stops at its limit (tokens go on). The would-be
//!   refusals in `/metrics` count them.
//! - **An ancestor's limit is not checked** for a request admitted this
//!   way: its tokens are charged to every level at the settle, so an
//!   enforced parent may go past its limit through a child in shadow mode
//!   (and then refuses its other children until its budget recovers).
//! - **Spend is not charged past a spend limit**: the request is admitted
//!   with an estimate of nothing, which needs no price, so its settle has
//!   none to charge dollars with (tokens and requests limits are charged).
//! - **A refusal judged on the first estimate**: with `count_prompts =
//!   "when_tight"` the layer counts the prompt only after a refusal for
//!   tokens; a shadow agent is admitted at the first one, so a would-be
//!   refusal may be counted for a request the exact count would have
//!   admitted. `count_prompts = "always"` makes the counts exact.

use std::sync::Arc;

use agent_budget::{AgentId, BudgetKind, FullBudgetInfo, RefusalReason, Refused};
use agent_budget_tower::{Admission, Denial, Estimate, RefusalReason as Reason};
use http::HeaderMap;

use crate::catalog::Catalog;
use crate::watch::Watch;

/// An [`Admission`] that admits what shadow-mode budgets refuse.
pub struct Shadow<M> {
    inner: Arc<M>,
    catalog: Catalog,
    watch: Watch,
    /// Would-be refusals, for tokens and for calls.
    would_refuse: [metrics::Counter; 2],
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
        let counter = |reason: &'static str| metrics::counter!("budget_gateway_shadow_refusals_total", "reason" => reason);
        Shadow {
            inner,
            catalog,
            watch,
            would_refuse: [counter("tokens"), counter("calls")],
        }
    }

    /// Whether `refused` came from a budget in shadow mode.
    fn shadowed(&self, refused: &Refused) -> bool {
        matches!(refused.reason, RefusalReason::Exceeded { .. })
            && !self.catalog.enforces(&refused.refused_by)
    }

    /// Admits `agent`'s request that `refused` turned down, with nothing
    /// reserved; the refusal again if even that fails.
    async fn pass(
        &self,
        agent: &AgentId,
        estimate: &Estimate,
        refused: Refused,
    ) -> Result<M::Reservation, Denial> {
        self.note(agent, &refused);
        let nothing = Estimate {
            model: estimate.model.clone(),
            ..Estimate::default()
        };
        self.inner
            .admit(agent, &nothing)
            .await
            .map_err(|_| Denial::Refused(refused))
    }

    /// Counts a would-be refusal.
    fn note(&self, agent: &AgentId, refused: &Refused) {
        let reason = match refused.kind {
            BudgetKind::Token => Reason::Tokens,
            BudgetKind::Call => Reason::Calls,
        };
        self.would_refuse[usize::from(reason == Reason::Calls)].increment(1);
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
            Err(denial) if refusal(&denial).is_some_and(|r| self.shadowed(r)) => {
                let refused = refusal(&denial).cloned().expect("matched");
                self.pass(agent_id, estimate, refused).await
            }
            other => other,
        }
    }

    async fn admit_wait(
        self: &Arc<Self>,
        agent_id: &AgentId,
        estimate: &Estimate,
    ) -> Result<M::Reservation, Denial> {
        match self.inner.admit_wait(agent_id, estimate).await {
            Err(denial) if refusal(&denial).is_some_and(|r| self.shadowed(r)) => {
                let refused = refusal(&denial).cloned().expect("matched");
                self.pass(agent_id, estimate, refused).await
            }
            other => other,
        }
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

    /// A budget in shadow mode refuses nothing before the body either: the
    /// request goes on to its admission, which counts the would-be refusal.
    fn precheck(
        self: &Arc<Self>,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> Result<(), Denial> {
        match self.inner.precheck(agent_id, tokens, calls) {
            Err(denial) if refusal(&denial).is_some_and(|r| self.shadowed(r)) => Ok(()),
            other => other,
        }
    }
}
