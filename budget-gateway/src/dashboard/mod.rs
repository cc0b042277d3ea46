//! `GET /dashboard`: a page that shows every agent's limits live, served
//! by the gateway itself.
//!
//! # How it works
//!
//! Three files, plain HTML, CSS and JavaScript with no dependency and no
//! build step, are compiled into the binary (`include_str!`), so the page
//! works with no network beyond the gateway. The page asks for the admin
//! key (`#admin-key`, `#sign-in`), keeps it in the tab's `sessionStorage`
//! only (it is gone when the tab closes, and never in a cookie, so no other
//! site can make the browser use it), and calls the admin API with it:
//! `GET /v1/agents` every second, `GET /v1/agents/{agent_id}/history` every
//! two. A `401` or `403` signs out and says the key is wrong.
//!
//! Each agent is a `<section data-agent-id="…">` with its label, source,
//! parent, and for every limit and every resource it limits (every numeric
//! field of the limit: `requests`, `tokens`, `spend_usd`, …) the amount
//! used, the limit, the time to its reset and a bar: green, amber past
//! 80%, red once used up (requests are refused). A small chart shows the
//! requests admitted and refused each minute of the last hour
//! ([`crate::history`]). The grid is one column on a phone.
//!
//! The page itself holds no data and needs no key: every number comes
//! from the admin API, which checks the key on every call. It is served
//! with a Content-Security-Policy that allows its own scripts and styles
//! and connections to the gateway only.

use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::HeaderValue;

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");

/// The page's Content-Security-Policy: nothing from elsewhere.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                      connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                      form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("content-security-policy", HeaderValue::from_static(POLICY));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// The dashboard's routes: `/dashboard` and its two assets.
pub fn router() -> Router {
    Router::new()
        .route(
            "/dashboard",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/dashboard/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/dashboard/app.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}
