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
//! `is_exhausted`); the list is sorted by agent id.

use std::sync::Arc;

use agent_budget::{AgentId, BudgetManager};
use agent_budget_tower::{bearer_key, Rejection};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{HeaderMap, StatusCode};

/// What the admin endpoints need.
#[derive(Clone)]
pub struct Admin {
    /// The budgets to show.
    pub budgets: Arc<BudgetManager>,
    /// The key that may see them.
    pub admin_key: Arc<str>,
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
}

/// `a == b`, in a time that depends on their lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `GET /v1/budgets`: every agent's budget.
pub async fn all_budgets(State(admin): State<Admin>, headers: HeaderMap) -> Response<Body> {
    if let Some(denied) = admin.denial(&headers) {
        return denied;
    }
    let mut all = admin.budgets.all_full_info();
    all.sort_unstable_by_key(|info| info.agent_id);
    Json(all).into_response()
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
    match admin.budgets.full_info(&agent_id) {
        Some(info) => Json(info).into_response(),
        None => Rejection::new(
            StatusCode::NOT_FOUND,
            format!("no budget for agent {agent_id}"),
            "invalid_request_error",
            "not_found",
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_equal_only_when_equal() {
        assert!(constant_time_eq(b"admin", b"admin"));
        assert!(!constant_time_eq(b"admin", b"admim"));
        assert!(!constant_time_eq(b"admin", b"admin2"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
