//! Every request's path normalized before it is routed, so that the path
//! the budget is checked against is the path forwarded.
//!
//! # How it works
//!
//! A middleware around the whole router rewrites the request's path to
//! its canonical spelling ([`agent_budget_tower::path::normalize`]:
//! unreserved escapes decoded, `//` collapsed), or answers `400` for a
//! spelling upstreams disagree on (dot segments, encoded slashes), before
//! anything else sees the request. Routing, the budget layer and the proxy
//! then all see the one path: `/v1/chat/%63ompletions` is routed, estimated,
//! charged and forwarded as `/v1/chat/completions`, and `/v1/../admin`
//! never leaves the gateway.

use agent_budget_tower::path::normalize_uri;
use agent_budget_tower::Rejection;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;

/// Rewrites the request's path to its normalized form, or refuses it.
pub async fn normalize_path(mut request: Request, next: Next) -> Response {
    match normalize_uri(request.uri()) {
        Ok(None) => {}
        Ok(Some(uri)) => *request.uri_mut() = uri,
        Err(e) => return Rejection::bad_request(e.to_string()).into_response(),
    }
    next.run(request).await
}
