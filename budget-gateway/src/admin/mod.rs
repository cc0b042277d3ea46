//! The operator's endpoints: the budgets' view, and agents and keys
//! managed at runtime.
//!
//! | endpoint | what it does |
//! |---|---|
//! | `GET /v1/budgets`, `GET /v1/budgets/{agent_id}` | every budget as the core sees it ([`budgets`]) |
//! | `POST /v1/agents` | creates an agent: `201` with it |
//! | `GET /v1/agents`, `GET /v1/agents/{agent_id}` | agents, their limits and where each stands |
//! | `PUT /v1/agents/{agent_id}` | replaces its limits, parent and label; usage kept |
//! | `DELETE /v1/agents/{agent_id}` | `204`; its keys are refused at once |
//! | `POST /v1/agents/{agent_id}/keys` | `201` with a new key, shown this once |
//! | `GET /v1/agents/{agent_id}/keys` | its keys, without their secrets |
//! | `DELETE /v1/agents/{agent_id}/keys/{key_id}` | `204`; that key is refused at once |
//! | `GET /v1/agents/{agent_id}/history` | requests admitted and refused each minute of the last hour ([`crate::history`]) |
//! | `GET /openapi.json` | the OpenAPI 3 document of all of these (no key needed) |
//!
//! # How it works
//!
//! Every endpoint but `/openapi.json` needs `Authorization: Bearer
//! <admin_key>`: without a bearer key the answer is `401`, with any other
//! key (a client's included) `403`. The key is compared in constant time,
//! so response times say nothing about how much of a guess was right; a
//! SIGHUP that changes `admin_key` in the file applies at once. Errors are
//! OpenAI's error object (`{"error": {"message", "type", "param",
//! "code"}}`), `param` naming the field to blame: `400` for a body that is
//! not JSON or a path that is not a UUID, `422` for JSON that asks for what
//! cannot be (an unknown field, a missing limit, an unknown parent, a
//! loop, a chain too deep), `404` for an unknown agent or key, `409` for
//! what conflicts with what exists (an id taken, an agent of the
//! configuration file, which the API does not change: see
//! [`crate::catalog`]), `503` when the database or Redis fails. A refused
//! request changes nothing.
//!
//! The handlers are thin: they check the key, read the request, and ask
//! the [`Catalog`] for the change, which is where the rules live. The
//! OpenAPI document is generated from the handlers' annotations and the
//! types they send and receive ([`openapi`]), so it describes what the
//! code does.

mod agents;
pub mod budgets;
mod error;
mod history;
pub mod openapi;

use agent_budget_tower::bearer_key;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http::{HeaderMap, StatusCode};

#[doc(hidden)]
pub use agents::{read_agent_body, read_key_body};
pub use agents::{AgentRequest, AgentView, KeyRequest, KeyView, NewKeyView, SourceView};
pub use budgets::BudgetView;
pub use error::{ApiError, Denied, ErrorBody, ErrorDetail};

use crate::catalog::Catalog;
use crate::gateway::Budgets;
use crate::history::History;

/// What the admin endpoints need.
#[derive(Clone, Debug)]
pub struct Admin {
    /// The budgets to show.
    pub budgets: Budgets,
    /// The agents, and the admin key.
    pub catalog: Catalog,
    /// Each agent's requests over the last hour.
    pub history: History,
}

impl Admin {
    /// Why the request may not use the admin API, if it may not.
    fn denial(&self, headers: &HeaderMap) -> Option<Response<Body>> {
        let Some(key) = bearer_key(headers) else {
            return Some(
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_api_key",
                    "send the admin key as `Authorization: Bearer <admin_key>`",
                )
                .into_response(),
            );
        };
        (!self.catalog.is_admin_key(key)).then(|| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this key is not the admin key: it may not use the admin API",
            )
            .into_response()
        })
    }

    /// The admin endpoints, `/openapi.json` included.
    pub fn router(self) -> Router {
        use axum::routing::delete;
        Router::new()
            .route("/v1/budgets", get(budgets::all_budgets))
            .route("/v1/budgets/{agent_id}", get(budgets::one_budget))
            .route(
                "/v1/agents",
                get(agents::list_agents).post(agents::create_agent),
            )
            .route(
                "/v1/agents/{agent_id}",
                get(agents::get_agent)
                    .put(agents::update_agent)
                    .delete(agents::delete_agent),
            )
            .route(
                "/v1/agents/{agent_id}/keys",
                get(agents::list_keys).post(agents::create_key),
            )
            .route(
                "/v1/agents/{agent_id}/keys/{key_id}",
                delete(agents::revoke_key),
            )
            .route("/v1/agents/{agent_id}/history", get(history::agent_history))
            .with_state(self)
            .route("/openapi.json", get(openapi::document))
    }
}

/// A path segment that must be a UUID: `400` if it is not.
fn uuid_in_path(what: &str, text: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::try_parse(text)
        .map_err(|_| ApiError::bad_request(format!("{text:?} is not {what} (a UUID)")))
}
