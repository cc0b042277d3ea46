//! With the `tower` feature: a [`FleetManager`] admits requests for
//! `agent-budget-tower`'s `BudgetLayer`.
//!
//! `BudgetLayer::new(Arc::new(fleet))` enforces the fleet's budgets on
//! HTTP requests: [`admit`](Admission::admit) is
//! [`FleetManager::acquire`] (from the node's lease, without a round trip,
//! when the lease covers the request); [`Denied::Refused`] becomes the
//! layer's `429` with `Retry-After` (the fleet window's end) and
//! [`Denied::Unavailable`] its `503` with `Retry-After`. Waiting (the
//! layer's `max_wait`) asks again at the denial's `retry_after`, at most
//! 50 ms apart, until the layer's deadline. The rate-limit headers come
//! from [`FleetManager::full_info`] (the fleet's usage at this node's last
//! call to Redis, without a call of their own). Fleet budgets do not nest:
//! the chain is the agent's own level.

use std::sync::Arc;

use agent_budget::{AgentId, FullBudgetInfo, OwnedReservation};
use agent_budget_tower::{Admission, Denial, Estimate};

use crate::{Denied, FleetManager};

impl From<Denied> for Denial {
    fn from(denied: Denied) -> Self {
        match denied {
            Denied::Refused(refused) => Denial::Refused(refused),
            Denied::Unavailable {
                agent_id,
                retry_after,
                ..
            } => Denial::Unavailable {
                agent_id,
                retry_after,
                message: denied.to_string(),
            },
        }
    }
}

impl Admission for FleetManager {
    type Reservation = OwnedReservation;

    async fn admit(
        self: &Arc<Self>,
        agent_id: &AgentId,
        estimate: &Estimate,
    ) -> Result<OwnedReservation, Denial> {
        let (tokens, calls) = (estimate.tokens(), estimate.calls);
        self.acquire(agent_id, tokens, calls)
            .await
            .map_err(Denial::from)
    }

    fn budget_chain(&self, agent_id: &AgentId) -> Vec<FullBudgetInfo> {
        self.full_info(agent_id).into_iter().collect()
    }
}
