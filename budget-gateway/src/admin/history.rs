//! `GET /v1/agents/{agent_id}/history`: an agent's requests admitted and
//! refused each minute of the last hour ([`crate::history`]).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{HeaderMap, StatusCode};

use super::{uuid_in_path, Admin, ApiError, Denied, ErrorBody};
use crate::history::HistoryView;

/// An agent's requests admitted and refused in each of the last 60
/// minutes, as this gateway saw them (kept in memory: empty after a
/// restart; each gateway of a fleet counts its own).
#[utoipa::path(
    get,
    path = "/v1/agents/{agent_id}/history",
    tag = "agents",
    params(("agent_id" = Uuid, Path, description = "The agent")),
    responses(
        (status = 200, description = "Its last hour", body = HistoryView),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 404, description = "No such agent", body = ErrorBody),
        Denied,
    ),
)]
pub async fn agent_history(
    State(admin): State<Admin>,
    headers: HeaderMap,
    Path(agent_id): Path<String>,
) -> Response<Body> {
    if let Some(denied) = admin.denial(&headers) {
        return denied;
    }
    let answer = uuid_in_path("an agent id", &agent_id).and_then(|agent_id| {
        admin.catalog.agent(&agent_id).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no agent {agent_id}"),
            )
        })?;
        Ok(Json(admin.history.view(&agent_id)))
    });
    match answer {
        Ok(view) => view.into_response(),
        Err(e) => e.into_response(),
    }
}
