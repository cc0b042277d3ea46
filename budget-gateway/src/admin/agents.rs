//! `/v1/agents` and `/v1/agents/{agent_id}/keys`: agents and keys managed
//! at runtime.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, SecondsFormat, Utc};
use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::json_body;
use super::{uuid_in_path, Admin, ApiError, Denied, ErrorBody};
use crate::catalog::{AgentEntry, AgentSettings, Source};
use crate::db::KeyRow;
use crate::gateway::Budgets;
use crate::limits::{LegacyFields, LimitSpec, LimitState};

/// The longest `metrics_label` and key `name` accepted.
const MAX_LABEL_CHARS: usize = 128;

/// An agent to create (`POST`) or its new configuration (`PUT`): its
/// limits, either as `limits` or as the older `token_budget`,
/// `calls_budget` and `window_secs` (one fixed window), not both.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentRequest {
    /// The agent's id: generated when left out. In a `PUT`, the path's.
    #[serde(default)]
    pub agent_id: Option<Uuid>,
    /// An API agent whose budget this one also spends from (a team's):
    /// a request is admitted only if every level of the chain can take it.
    #[serde(default)]
    pub parent: Option<Uuid>,
    /// An `agent` label on the gateway's metrics (applied from the next
    /// start).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 128)]
    pub metrics_label: Option<String>,
    /// The agent's limits (at most 16), all of which a request must fit.
    #[serde(default)]
    #[schema(min_items = 1, max_items = 16)]
    pub limits: Option<Vec<LimitSpec>>,
    /// Tokens per window (with `calls_budget` and `window_secs`).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 4_503_599_627_370_495_f64)]
    pub token_budget: Option<u64>,
    /// Calls per window (with `token_budget` and `window_secs`).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 4_294_967_295_f64)]
    pub calls_budget: Option<u64>,
    /// The window's length in seconds (with `token_budget` and
    /// `calls_budget`).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3_153_600_000_f64)]
    pub window_secs: Option<u64>,
    /// `false` for shadow mode: usage is counted and would-be refusals
    /// are counted in `/metrics`, but the agent's own budget refuses
    /// nothing. Enforced when left out.
    #[serde(default)]
    pub enforce: Option<bool>,
}

/// Where an agent comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SourceView {
    /// The configuration file: read-only through the API.
    File,
    /// The admin API.
    Api,
}

/// An agent: its configuration, and where each limit stands.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct AgentView {
    /// Its id.
    pub agent_id: Uuid,
    /// Where it comes from: `file` agents are read-only through the API.
    pub source: SourceView,
    /// The agent whose budget it also spends from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<Uuid>,
    /// Its `agent` label on the metrics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_label: Option<String>,
    /// Its limits, each with where it stands now.
    pub limits: Vec<LimitState>,
    /// `false` in shadow mode: its own budget refuses nothing.
    pub enforce: bool,
    /// When it was created (API agents).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub created_at: Option<String>,
    /// When it was last changed (API agents).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub updated_at: Option<String>,
}

/// A key to make.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    /// A name to tell it apart (`ci`, `laptop`, `2026-rotation`).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 128)]
    pub name: Option<String>,
}

/// A key, without its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct KeyView {
    /// Its id (to revoke it).
    pub key_id: Uuid,
    /// The name it was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its first characters, to tell it apart (`sk-ab-1f3a9c`).
    pub prefix: String,
    /// When it was made.
    #[schema(value_type = String, format = DateTime)]
    pub created_at: String,
    /// When it was last used, to within a few seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<String>,
}

/// A key just made: the only time its secret is shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct NewKeyView {
    /// Its id (to revoke it).
    pub key_id: Uuid,
    /// The key, to send as `Authorization: Bearer <api_key>`. Shown this
    /// once: the gateway keeps only its hash.
    pub api_key: String,
    /// The agent it spends for.
    pub agent_id: Uuid,
    /// The name it was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its first characters, as key lists show them.
    pub prefix: String,
    /// When it was made.
    #[schema(value_type = String, format = DateTime)]
    pub created_at: String,
}

fn timestamp(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl KeyView {
    fn new(row: KeyRow) -> Self {
        KeyView {
            key_id: row.key_id,
            name: row.name,
            prefix: row.shown,
            created_at: timestamp(row.created_at),
            last_used_at: row.last_used_at.map(timestamp),
        }
    }
}

impl AgentView {
    /// How the API shows `entry`, each limit standing where `info` (the
    /// core's view of a limit cell's budget, by the cell's id) says.
    pub fn new(
        entry: AgentEntry,
        info: impl Fn(&agent_budget::AgentId) -> Option<agent_budget::FullBudgetInfo>,
    ) -> Self {
        let id = entry.agent_id;
        AgentView {
            agent_id: id,
            source: match entry.source {
                Source::File => SourceView::File,
                Source::Api => SourceView::Api,
            },
            parent: entry.settings.parent,
            metrics_label: entry.settings.metrics_label.clone(),
            limits: entry.settings.limits.states(id, info),
            enforce: entry.settings.enforce,
            created_at: entry.created_at.map(timestamp),
            updated_at: entry.updated_at.map(timestamp),
        }
    }
}

impl Admin {
    fn agent_view(&self, entry: AgentEntry) -> AgentView {
        AgentView::new(entry, |cell| match &self.budgets {
            Budgets::Local(budgets) => budgets.full_info(cell),
            Budgets::Fleet(fleet) => fleet.full_info(cell),
        })
    }
}

/// A label or a name: not blank, not too long, no control characters.
fn check_label(field: &str, value: Option<String>) -> Result<Option<String>, ApiError> {
    let Some(value) = value else { return Ok(None) };
    let problem = if value.trim().is_empty() {
        Some("must not be blank")
    } else if value.chars().count() > MAX_LABEL_CHARS {
        Some("must be at most 128 characters")
    } else if value.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(ApiError::invalid(
            Some(field.to_owned()),
            format!("`{field}` {problem}"),
        )),
        None => Ok(Some(value)),
    }
}

/// Reads a `POST /v1/agents` body (`path_id` `None`) or a `PUT
/// /v1/agents/{agent_id}` body (`path_id` the path's) and checks it as the
/// handlers do before they ask the [`Catalog`](crate::catalog::Catalog):
/// the agent's id, if one is given, and its settings. What needs the
/// catalog (a parent that exists, no loop, an id not taken) is not
/// checked here.
#[doc(hidden)]
pub fn read_agent_body(
    body: &[u8],
    path_id: Option<Uuid>,
) -> Result<(Option<Uuid>, AgentSettings), ApiError> {
    let request: AgentRequest = json_body(body)?;
    if let Some(path_id) = path_id {
        if request.agent_id.is_some_and(|id| id != path_id) {
            return Err(ApiError::invalid(
                Some("agent_id".to_owned()),
                format!("`agent_id` must be the path's, {path_id}, or left out"),
            ));
        }
    }
    let agent_id = request.agent_id.or(path_id);
    Ok((agent_id, request.settings()?))
}

/// Reads a `POST /v1/agents/{agent_id}/keys` body and checks the name it
/// gives the key, as the handler does: no body, or `null`, is `{}`.
#[doc(hidden)]
pub fn read_key_body(body: &[u8]) -> Result<Option<String>, ApiError> {
    // No body at all asks for no name; anything else must be JSON (a body
    // of whitespace is not, and the OpenAPI document says so).
    let request: KeyRequest = if body.is_empty() {
        KeyRequest::default()
    } else {
        json_body::<Option<KeyRequest>>(body)?.unwrap_or_default()
    };
    check_label("name", request.name)
}

impl AgentRequest {
    /// The settings asked for, checked.
    fn settings(self) -> Result<AgentSettings, ApiError> {
        let metrics_label = check_label("metrics_label", self.metrics_label)?;
        let legacy = LegacyFields {
            token_budget: self.token_budget,
            calls_budget: self.calls_budget,
            window_secs: self.window_secs,
        };
        Ok(
            AgentSettings::new(self.limits.as_deref(), legacy, self.parent, metrics_label)?
                .with_enforce(self.enforce.unwrap_or(true)),
        )
    }
}

/// Runs `f` if the request carries the admin key; its error, if any, as
/// the answer.
async fn admin_only<F, T>(admin: &Admin, headers: &HeaderMap, f: F) -> Response<Body>
where
    F: std::future::Future<Output = Result<T, ApiError>>,
    T: IntoResponse,
{
    if let Some(denied) = admin.denial(headers) {
        return denied;
    }
    match f.await {
        Ok(answer) => answer.into_response(),
        Err(e) => e.into_response(),
    }
}

/// Every agent, from the file and the API, by id.
#[utoipa::path(
    get,
    path = "/v1/agents",
    tag = "agents",
    responses(
        (status = 200, description = "Every agent", body = Vec<AgentView>),
        Denied,
    ),
)]
pub async fn list_agents(State(admin): State<Admin>, headers: HeaderMap) -> Response<Body> {
    admin_only(&admin, &headers, async {
        let views: Vec<AgentView> = admin
            .catalog
            .agents()
            .into_iter()
            .map(|entry| admin.agent_view(entry))
            .collect();
        Ok(Json(views))
    })
    .await
}

/// Creates an agent through the API.
#[utoipa::path(
    post,
    path = "/v1/agents",
    tag = "agents",
    request_body(content = AgentRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Created", body = AgentView),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 409, description = "The id is taken (by an API agent or the file's), or the gateway keeps no database", body = ErrorBody),
        (status = 422, description = "Limits, parent or label that cannot be", body = ErrorBody),
        (status = 503, description = "The database or Redis failed", body = ErrorBody),
        Denied,
    ),
)]
pub async fn create_agent(
    State(admin): State<Admin>,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    admin_only(&admin, &headers, async {
        let (agent_id, settings) = read_agent_body(&body, None)?;
        let entry = admin.catalog.create_agent(agent_id, settings).await?;
        Ok((StatusCode::CREATED, Json(admin.agent_view(entry))))
    })
    .await
}

/// One agent, from the file or the API.
#[utoipa::path(
    get,
    path = "/v1/agents/{agent_id}",
    tag = "agents",
    params(("agent_id" = Uuid, Path, description = "The agent")),
    responses(
        (status = 200, description = "The agent", body = AgentView),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 404, description = "No such agent", body = ErrorBody),
        Denied,
    ),
)]
pub async fn get_agent(
    State(admin): State<Admin>,
    headers: HeaderMap,
    Path(agent_id): Path<String>,
) -> Response<Body> {
    admin_only(&admin, &headers, async {
        let agent_id = uuid_in_path("an agent id", &agent_id)?;
        let entry = admin.catalog.agent(&agent_id).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no agent {agent_id}"),
            )
        })?;
        Ok(Json(admin.agent_view(entry)))
    })
    .await
}

/// Replaces an API agent's limits, parent and label. What it used in the
/// current window is kept, judged against the new limits.
#[utoipa::path(
    put,
    path = "/v1/agents/{agent_id}",
    tag = "agents",
    params(("agent_id" = Uuid, Path, description = "The agent")),
    request_body(content = AgentRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Changed", body = AgentView),
        (status = 400, description = "Not a UUID, or the body is not JSON", body = ErrorBody),
        (status = 404, description = "No such API agent", body = ErrorBody),
        (status = 409, description = "An agent of the file, or the gateway keeps no database", body = ErrorBody),
        (status = 422, description = "Limits, parent or label that cannot be: an unknown parent, a loop, a chain too deep", body = ErrorBody),
        (status = 503, description = "The database or Redis failed", body = ErrorBody),
        Denied,
    ),
)]
pub async fn update_agent(
    State(admin): State<Admin>,
    headers: HeaderMap,
    Path(agent_id): Path<String>,
    body: Bytes,
) -> Response<Body> {
    admin_only(&admin, &headers, async {
        let agent_id = uuid_in_path("an agent id", &agent_id)?;
        let (_, settings) = read_agent_body(&body, Some(agent_id))?;
        let entry = admin.catalog.update_agent(agent_id, settings).await?;
        Ok(Json(admin.agent_view(entry)))
    })
    .await
}

/// Deletes an API agent: its keys are refused from the next request.
#[utoipa::path(
    delete,
    path = "/v1/agents/{agent_id}",
    tag = "agents",
    params(("agent_id" = Uuid, Path, description = "The agent")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 404, description = "No such API agent", body = ErrorBody),
        (status = 409, description = "An agent of the file, a parent of other agents, or the gateway keeps no database", body = ErrorBody),
        (status = 503, description = "The database or Redis failed", body = ErrorBody),
        Denied,
    ),
)]
pub async fn delete_agent(
    State(admin): State<Admin>,
    headers: HeaderMap,
    Path(agent_id): Path<String>,
) -> Response<Body> {
    admin_only(&admin, &headers, async {
        let agent_id = uuid_in_path("an agent id", &agent_id)?;
        admin.catalog.delete_agent(agent_id).await?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// Makes a key for an API agent. An agent may have several keys, so a key
/// can be rotated without downtime: make the new one, move clients, revoke
/// the old one.
#[utoipa::path(
    post,
    path = "/v1/agents/{agent_id}/keys",
    tag = "keys",
    params(("agent_id" = Uuid, Path, description = "The agent")),
    request_body(content = Option<KeyRequest>, content_type = "application/json", description = "Optional: no body, or `null`, is `{}`"),
    responses(
        (status = 201, description = "Made: the key is in `api_key`, shown this once", body = NewKeyView),
        (status = 400, description = "Not a UUID, or the body is not JSON", body = ErrorBody),
        (status = 404, description = "No such API agent", body = ErrorBody),
        (status = 409, description = "An agent of the file (its key is the file's), or the gateway keeps no database", body = ErrorBody),
        (status = 422, description = "A name that cannot be", body = ErrorBody),
        (status = 503, description = "The database failed", body = ErrorBody),
        Denied,
    ),
)]
pub async fn create_key(
    State(admin): State<Admin>,
    headers: HeaderMap,
    Path(agent_id): Path<String>,
    body: Bytes,
) -> Response<Body> {
    admin_only(&admin, &headers, async {
        let agent_id = uuid_in_path("an agent id", &agent_id)?;
        let name = read_key_body(&body)?;
        let (row, api_key) = admin.catalog.create_key(agent_id, name).await?;
        let view = NewKeyView {
            key_id: row.key_id,
            api_key,
            agent_id,
            name: row.name,
            prefix: row.shown,
            created_at: timestamp(row.created_at),
        };
        Ok((StatusCode::CREATED, Json(view)))
    })
    .await
}

/// An API agent's keys in use, oldest first, without their secrets.
#[utoipa::path(
    get,
    path = "/v1/agents/{agent_id}/keys",
    tag = "keys",
    params(("agent_id" = Uuid, Path, description = "The agent")),
    responses(
        (status = 200, description = "Its keys", body = Vec<KeyView>),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 404, description = "No such API agent", body = ErrorBody),
        (status = 409, description = "An agent of the file, or the gateway keeps no database", body = ErrorBody),
        (status = 503, description = "The database failed", body = ErrorBody),
        Denied,
    ),
)]
pub async fn list_keys(
    State(admin): State<Admin>,
    headers: HeaderMap,
    Path(agent_id): Path<String>,
) -> Response<Body> {
    admin_only(&admin, &headers, async {
        let agent_id = uuid_in_path("an agent id", &agent_id)?;
        let rows = admin.catalog.keys_of(agent_id).await?;
        Ok(Json(rows.into_iter().map(KeyView::new).collect::<Vec<_>>()))
    })
    .await
}

/// Revokes a key: it is refused from the next request; the agent's other
/// keys keep working.
#[utoipa::path(
    delete,
    path = "/v1/agents/{agent_id}/keys/{key_id}",
    tag = "keys",
    params(
        ("agent_id" = Uuid, Path, description = "The agent"),
        ("key_id" = Uuid, Path, description = "The key"),
    ),
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 404, description = "No such key in use", body = ErrorBody),
        (status = 409, description = "An agent of the file, or the gateway keeps no database", body = ErrorBody),
        (status = 503, description = "The database failed", body = ErrorBody),
        Denied,
    ),
)]
pub async fn revoke_key(
    State(admin): State<Admin>,
    headers: HeaderMap,
    Path((agent_id, key_id)): Path<(String, String)>,
) -> Response<Body> {
    admin_only(&admin, &headers, async {
        let agent_id = uuid_in_path("an agent id", &agent_id)?;
        let key_id = uuid_in_path("a key id", &key_id)?;
        admin.catalog.revoke_key(agent_id, key_id).await?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_body_is_nothing_or_json() {
        assert_eq!(read_key_body(b"").unwrap(), None);
        assert_eq!(read_key_body(b" {} ").unwrap(), None);
        for body in [&b"\r"[..], b" ", b"\n\t"] {
            assert_eq!(
                read_key_body(body).unwrap_err().status().as_u16(),
                400,
                "{body:?}"
            );
        }
    }

    #[test]
    fn a_limit_as_shown_is_read_back_exactly() {
        // serde_json parses a float to the nearest double only with its
        // `float_roundtrip` feature: without it, 24.5666... (50 digits)
        // was shown as 24.566666666666666, which read back one unit in the
        // last place off, so a PUT of what a GET showed changed the agent
        // (found by the `admin` fuzz target).
        let long = format!("24.5{}", "6".repeat(50));
        for usd in [
            &long,
            "24.566666666666666",
            "0.1",
            "50.0",
            "0.000001",
            "123456.789012",
        ] {
            let body = format!(r#"{{"limits":[{{"window":"1mo","spend_usd":{usd}}}]}}"#);
            let (_, first) = read_agent_body(body.as_bytes(), None).unwrap();
            let shown =
                serde_json::to_vec(&serde_json::json!({ "limits": first.limits.specs() })).unwrap();
            let (_, again) = read_agent_body(&shown, None).unwrap();
            assert_eq!(first, again, "{usd}");
        }
    }
}
