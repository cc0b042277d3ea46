//! The operator's view: `GET /v1/budgets` and `GET /v1/budgets/{agent_id}`.
//!
//! # How it works
//!
//! Both need `Authorization: Bearer <admin_key>`: without a bearer key the
//! answer is `401`, with any other key (a client's included) `403`. The
//! key is compared in constant time, so response times say nothing about
//! how much of a guess was right. The bodies are the core's
//! `FullBudgetInfo` as JSON, with the seed's field names (`token_limit`,
//! `tokens_used`, `tokens_remaining`, `calls_limit`, `calls_used`,
//! `calls_remaining`, `window_secs`, `window_remaining_secs`,
//! `is_exhausted`), and `parent` (its id) for an agent that has one; the
//! list is sorted by agent id.
//!
//! In a fleet (`--redis`), they show the fleet's usage, read from Redis at
//! each request ([`FleetManager::fleet_info`]): "used" is what the whole
//! fleet has taken in the window (consumed, or leased to a gateway and not
//! yet consumed or given back), the same on every gateway. The list is the
//! agents of this gateway's configuration. Redis unreachable: `503`.

use std::collections::HashMap;
use std::sync::Arc;

use agent_budget::{AgentId, FullBudgetInfo};
use agent_budget_redis::FleetManager;
use agent_budget_tower::{bearer_key, Rejection};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{HeaderMap, StatusCode};
use serde::Serialize;

use crate::gateway::Budgets;
use crate::keys::constant_time_eq;

/// What the admin endpoints need.
#[derive(Clone)]
pub struct Admin {
    /// The budgets to show.
    pub budgets: Budgets,
    /// The key that may see them.
    pub admin_key: Arc<str>,
    /// The configured agents (the list a fleet shows).
    pub agents: Arc<[AgentId]>,
    /// Each configured agent's parent.
    pub parents: Arc<HashMap<AgentId, AgentId>>,
}

/// One agent in the admin view: its `FullBudgetInfo`, and its parent.
#[derive(Serialize)]
struct Entry {
    #[serde(flatten)]
    info: FullBudgetInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<AgentId>,
}

impl Admin {
    /// Why the request may not read budgets, if it may not.
    fn denial(&self, headers: &HeaderMap) -> Option<Response<Body>> {
        let Some(key) = bearer_key(headers) else {
            return Some(
                Rejection::unauthenticated(
                    "send the admin key as `Authorization: Bearer <admin_key>`",
                )
                .into_response(),
            );
        };
        (!constant_time_eq(key.as_bytes(), self.admin_key.as_bytes())).then(|| {
            Rejection::new(
                StatusCode::FORBIDDEN,
                "this key may not read budgets",
                "invalid_request_error",
                "forbidden",
            )
            .into_response()
        })
    }

    /// The view of one agent: its budget and its parent.
    fn entry(&self, info: FullBudgetInfo) -> Entry {
        let parent = self.parents.get(&info.agent_id).copied();
        Entry { info, parent }
    }

    /// One agent's budget, `Ok(None)` if it has none; a fleet's from Redis.
    async fn one(&self, agent_id: &AgentId) -> Result<Option<FullBudgetInfo>, Response<Body>> {
        match &self.budgets {
            Budgets::Local(budgets) => Ok(budgets.full_info(agent_id)),
            Budgets::Fleet(fleet) => match fleet.fleet_info(agent_id).await {
                Ok(info) => Ok(info.map(|i| i.to_full_info())),
                Err(e) => Err(unavailable(fleet, e)),
            },
        }
    }

    /// Every agent's budget.
    async fn all(&self) -> Result<Vec<FullBudgetInfo>, Response<Body>> {
        match &self.budgets {
            Budgets::Local(budgets) => Ok(budgets.all_full_info()),
            Budgets::Fleet(_) => {
                let mut all = Vec::with_capacity(self.agents.len());
                for agent_id in self.agents.iter() {
                    all.extend(self.one(agent_id).await?);
                }
                Ok(all)
            }
        }
    }
}

/// `503`: the fleet's view could not be read.
fn unavailable(fleet: &FleetManager, e: agent_budget_redis::FleetError) -> Response<Body> {
    Rejection::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "cannot read the fleet's budgets (node {}): {e}",
            fleet.node_id()
        ),
        "server_error",
        "budget_unavailable",
    )
    .into_response()
}

/// `GET /v1/budgets`: every agent's budget.
pub async fn all_budgets(State(admin): State<Admin>, headers: HeaderMap) -> Response<Body> {
    if let Some(denied) = admin.denial(&headers) {
        return denied;
    }
    let mut all = match admin.all().await {
        Ok(all) => all,
        Err(response) => return response,
    };
    all.sort_unstable_by_key(|info| info.agent_id);
    let entries: Vec<Entry> = all.into_iter().map(|info| admin.entry(info)).collect();
    Json(entries).into_response()
}

/// `GET /v1/budgets/{agent_id}`: one agent's budget.
pub async fn one_budget(
    State(admin): State<Admin>,
    headers: HeaderMap,
    Path(agent_id): Path<String>,
) -> Response<Body> {
    if let Some(denied) = admin.denial(&headers) {
        return denied;
    }
    let Ok(agent_id) = AgentId::try_parse(&agent_id) else {
        return Rejection::bad_request(format!("{agent_id:?} is not an agent id (a UUID)"))
            .into_response();
    };
    match admin.one(&agent_id).await {
        Ok(Some(info)) => Json(admin.entry(info)).into_response(),
        Ok(None) => Rejection::new(
            StatusCode::NOT_FOUND,
            format!("no budget for agent {agent_id}"),
            "invalid_request_error",
            "not_found",
        )
        .into_response(),
        Err(response) => response,
    }
}
