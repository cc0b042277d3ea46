//! The budgets' view: `GET /v1/budgets` and `GET /v1/budgets/{agent_id}`.
//!
//! # How it works
//!
//! The bodies are the core's `FullBudgetInfo` as JSON ([`BudgetView`]), with the seed's field names (`token_limit`,
//! `tokens_used`, `tokens_remaining`, `calls_limit`, `calls_used`,
//! `calls_remaining`, `window_secs`, `window_remaining_secs`,
//! `is_exhausted`), and `parent` (its id) for an agent that has one; the
//! list is sorted by agent id. Each agent's budget here is its own core
//! budget: its first limit on tokens and requests for every model (an
//! unlimited one when it has none); `GET /v1/agents/{id}` shows every
//! limit, spend and per-model ones included.
//!
//! In a fleet (`--redis`), they show the fleet's usage, read from Redis at
//! each request ([`FleetManager::fleet_info`]): "used" is what the whole
//! fleet has taken in the window (consumed, or leased to a gateway and not
//! yet consumed or given back), the same on every gateway. The list is the
//! agents this gateway knows (its file's and its database's). Redis
//! unreachable: `503`.

use agent_budget::{AgentId, FullBudgetInfo};
use agent_budget_redis::FleetManager;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{HeaderMap, StatusCode};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{uuid_in_path, Admin, ApiError, Denied, ErrorBody};
use crate::gateway::Budgets;

/// One agent's budget as the core sees it (the seed's field names), and
/// its parent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct BudgetView {
    /// The agent.
    pub agent_id: Uuid,
    /// Tokens admitted per window.
    pub token_limit: u64,
    /// Tokens used in the current window.
    pub tokens_used: u64,
    /// Tokens left in the current window.
    pub tokens_remaining: u64,
    /// Calls admitted per window.
    pub calls_limit: u64,
    /// Calls made in the current window.
    pub calls_used: u64,
    /// Calls left in the current window.
    pub calls_remaining: u64,
    /// Length of a window, in seconds (a bucket's refill period).
    pub window_secs: u64,
    /// Whole seconds until the current window ends.
    pub window_remaining_secs: u64,
    /// Whether tokens or calls are used up.
    pub is_exhausted: bool,
    /// The agent whose budget it also spends from, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<Uuid>,
}

impl BudgetView {
    fn new(info: FullBudgetInfo, parent: Option<AgentId>) -> Self {
        let FullBudgetInfo {
            agent_id,
            token_limit,
            tokens_used,
            tokens_remaining,
            calls_limit,
            calls_used,
            calls_remaining,
            window_secs,
            window_remaining_secs,
            is_exhausted,
        } = info;
        BudgetView {
            agent_id,
            token_limit,
            tokens_used,
            tokens_remaining,
            calls_limit,
            calls_used,
            calls_remaining,
            window_secs,
            window_remaining_secs,
            is_exhausted,
            parent,
        }
    }
}

impl Admin {
    /// The view of one agent: its budget and its parent.
    fn budget_view(&self, info: FullBudgetInfo) -> BudgetView {
        let parent = self.catalog.parent_of(&info.agent_id);
        BudgetView::new(info, parent)
    }

    /// One agent's budget, `Ok(None)` if it has none; a fleet's from Redis.
    async fn one(&self, agent_id: &AgentId) -> Result<Option<FullBudgetInfo>, ApiError> {
        match &self.budgets {
            Budgets::Local(budgets) => Ok(budgets.full_info(agent_id)),
            Budgets::Fleet(fleet) => match fleet.fleet_info(agent_id).await {
                Ok(info) => Ok(info.map(|i| i.to_full_info())),
                Err(e) => Err(unavailable(fleet, e)),
            },
        }
    }

    /// Every agent's budget.
    async fn all(&self) -> Result<Vec<FullBudgetInfo>, ApiError> {
        match &self.budgets {
            // The agents' own budgets: the other cells of their limits
            // (see `crate::docs::limits`) are shown by `/v1/agents`.
            Budgets::Local(budgets) => {
                let agents: std::collections::HashSet<AgentId> =
                    self.catalog.agent_ids().into_iter().collect();
                Ok(budgets
                    .all_full_info()
                    .into_iter()
                    .filter(|info| agents.contains(&info.agent_id))
                    .collect())
            }
            Budgets::Fleet(_) => {
                let agents = self.catalog.agent_ids();
                let mut all = Vec::with_capacity(agents.len());
                for agent_id in &agents {
                    all.extend(self.one(agent_id).await?);
                }
                Ok(all)
            }
        }
    }
}

/// `503`: the fleet's view could not be read.
fn unavailable(fleet: &FleetManager, e: agent_budget_redis::FleetError) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "budget_unavailable",
        format!(
            "cannot read the fleet's budgets (node {}): {e}",
            fleet.node_id()
        ),
    )
}

/// Every agent's budget, by agent id.
#[utoipa::path(
    get,
    path = "/v1/budgets",
    tag = "budgets",
    responses(
        (status = 200, description = "Every budget", body = Vec<BudgetView>),
        (status = 503, description = "The fleet's Redis cannot be read", body = ErrorBody),
        Denied,
    ),
)]
pub async fn all_budgets(State(admin): State<Admin>, headers: HeaderMap) -> Response<Body> {
    if let Some(denied) = admin.denial(&headers) {
        return denied;
    }
    let mut all = match admin.all().await {
        Ok(all) => all,
        Err(e) => return e.into_response(),
    };
    all.sort_unstable_by_key(|info| info.agent_id);
    let views: Vec<BudgetView> = all
        .into_iter()
        .map(|info| admin.budget_view(info))
        .collect();
    Json(views).into_response()
}

/// One agent's budget.
#[utoipa::path(
    get,
    path = "/v1/budgets/{agent_id}",
    tag = "budgets",
    params(("agent_id" = Uuid, Path, description = "The agent")),
    responses(
        (status = 200, description = "The agent's budget", body = BudgetView),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 404, description = "No budget for this agent", body = ErrorBody),
        (status = 503, description = "The fleet's Redis cannot be read", body = ErrorBody),
        Denied,
    ),
)]
pub async fn one_budget(
    State(admin): State<Admin>,
    headers: HeaderMap,
    Path(agent_id): Path<String>,
) -> Response<Body> {
    if let Some(denied) = admin.denial(&headers) {
        return denied;
    }
    let agent_id = match uuid_in_path("an agent id", &agent_id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    match admin.one(&agent_id).await {
        Ok(Some(info)) => Json(admin.budget_view(info)).into_response(),
        Ok(None) => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no budget for agent {agent_id}"),
        )
        .into_response(),
        Err(e) => e.into_response(),
    }
}
