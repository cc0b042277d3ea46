//! Forwarding a request to the upstream, and its response back.
//!
//! # How it works
//!
//! The proxy keeps one pooled HTTP/1 client (hyper-util's) to the
//! upstream. A request keeps its method, path, query, body and headers,
//! less the hop-by-hop ones (`Connection` and those it names,
//! `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding`,
//! `Upgrade`) and `Host` (the client sets the upstream's). If the
//! configuration has an `upstream_api_key`, it replaces the client's
//! `Authorization`, and the client's other credentials for the upstream's
//! account (`OpenAI-Organization`, `OpenAI-Project`, `Cookie`) are dropped:
//! clients never see the upstream's key, the upstream never sees the
//! clients', and no client picks which of the operator's organizations or
//! projects pays. Without one, the client's `Authorization` goes
//! through as it is. `Accept-Encoding` is replaced by `identity`: the
//! budget layer reads the usage from the response's bytes, which a
//! compressed response would hide (the client gets an uncompressed
//! response, which HTTP allows whatever it asked for).
//!
//! The response streams back as it arrives (hop-by-hop headers dropped),
//! so server-sent events reach the client event by event. An upstream
//! that cannot be reached is answered `502`, and the budget layer cancels
//! the reservation: nobody read the request. One that fails after the
//! connection was made, or does not answer within the timeout (`504`), may
//! have read the prompt and worked on it: the response carries
//! [`PromptReceived`], and the layer charges the prompt (as it does a
//! client that hangs up before the answer). A response whose body sends
//! nothing for the idle timeout is cut off with an error, which the layer
//! settles as a hang-up (the prompt and what streamed).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use agent_budget_tower::{PromptReceived, Rejection};
use axum::body::Body;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::deadline::{Deadline, DeadlineBody};

/// Forwards requests to one upstream.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

#[derive(Clone)]
struct Inner {
    client: Client<HttpConnector, Body>,
    /// `scheme://authority` of the upstream.
    base: Uri,
    authorization: Option<HeaderValue>,
    timeout: Duration,
    /// The longest a response body may send nothing.
    idle: Duration,
}

/// The client's headers that pick or prove an account upstream: dropped
/// when the operator's key replaces the client's.
const CLIENT_CREDENTIALS: [&str; 3] = ["openai-organization", "openai-project", "cookie"];

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("base", &self.inner.base)
            .finish_non_exhaustive()
    }
}

/// Why an upstream URL cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("the upstream URL {url:?} is not usable: {reason}")]
pub struct BadUpstream {
    url: String,
    reason: String,
}

impl Proxy {
    /// A proxy to `upstream` (`http://host:port`), sending `api_key` as
    /// its bearer key if given, and giving up on a response after
    /// `timeout`.
    pub fn new(
        upstream: &str,
        api_key: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, BadUpstream> {
        let bad = |reason: &str| BadUpstream {
            url: upstream.to_owned(),
            reason: reason.to_owned(),
        };
        let base: Uri = upstream
            .trim_end_matches('/')
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        if base.scheme_str() != Some("http") {
            return Err(bad("only http:// upstreams are supported"));
        }
        if base.authority().is_none() {
            return Err(bad("it names no host"));
        }
        if base.path() != "/" && !base.path().is_empty() {
            return Err(bad(
                "give the base only (http://host:port); paths are forwarded as they come",
            ));
        }
        let authorization = api_key
            .map(|key| HeaderValue::from_str(&format!("Bearer {key}")))
            .transpose()
            .map_err(|_| bad("the upstream API key is not a valid header value"))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(connector);
        Ok(Proxy {
            inner: Arc::new(Inner {
                client,
                base,
                authorization,
                timeout,
                idle: Duration::from_secs(300),
            }),
        })
    }

    /// Cuts off a response body that sends nothing for `idle`.
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        Arc::make_mut(&mut self.inner).idle = idle;
        self
    }

    /// Forwards `request` and returns the upstream's response, or the
    /// `502`/`504` that stands for it.
    pub async fn forward(&self, request: Request<Body>) -> Response<Body> {
        let (mut parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let mut uri = self.inner.base.clone().into_parts();
        uri.path_and_query = match path.parse() {
            Ok(p) => Some(p),
            Err(_) => return error_response(Rejection::bad_request("the request path is invalid")),
        };
        parts.uri = match Uri::from_parts(uri) {
            Ok(u) => u,
            Err(_) => return error_response(Rejection::bad_request("the request path is invalid")),
        };
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        // The budget layer reads the response's usage as it goes by: a
        // compressed response would hide it.
        parts.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        if let Some(authorization) = &self.inner.authorization {
            parts
                .headers
                .insert(header::AUTHORIZATION, authorization.clone());
            for name in CLIENT_CREDENTIALS {
                parts.headers.remove(name);
            }
        }
        parts.version = http::Version::HTTP_11;
        let sent = self.inner.client.request(Request::from_parts(parts, body));
        match tokio::time::timeout(self.inner.timeout, sent).await {
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let body = DeadlineBody::new(
                    body,
                    Deadline::Rearmed,
                    self.inner.idle,
                    "the upstream sent nothing for",
                );
                Response::from_parts(parts, Body::new(body))
            }
            Ok(Err(e)) => {
                let mut response = error_response(Rejection::new(
                    StatusCode::BAD_GATEWAY,
                    format!("the upstream failed: {}", source_chain(&e)),
                    "upstream_error",
                    "bad_gateway",
                ));
                // Connected, the request may have been read: only a
                // connection never made proves it was not.
                if !e.is_connect() {
                    response.extensions_mut().insert(PromptReceived);
                }
                response
            }
            Err(_) => {
                let mut response = error_response(Rejection::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "the upstream did not answer within {} s",
                        self.inner.timeout.as_secs_f64()
                    ),
                    "upstream_error",
                    "gateway_timeout",
                ));
                response.extensions_mut().insert(PromptReceived);
                response
            }
        }
    }
}

/// `e` and its sources, joined: hyper's top-level errors say little.
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn error_response(rejection: Rejection) -> Response<Body> {
    rejection.into_response::<Body>()
}

/// Headers that concern one connection and must not be forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop headers, and those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

impl tower::Service<Request<Body>> for Proxy {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let proxy = self.clone();
        Box::pin(async move { Ok(proxy.forward(request).await) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "x"),
            ("content-type", "application/json"),
            ("authorization", "Bearer sk"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "content-type"]);
    }

    #[test]
    fn upstream_urls_are_checked() {
        let t = Duration::from_secs(1);
        assert!(Proxy::new("http://127.0.0.1:9000", None, t).is_ok());
        assert!(Proxy::new("http://127.0.0.1:9000/", None, t).is_ok());
        for bad in ["", "127.0.0.1:9000", "https://x", "http://x/v1", "ftp://x"] {
            assert!(Proxy::new(bad, None, t).is_err(), "{bad}");
        }
        assert!(Proxy::new("http://x", Some("bad\nkey"), t).is_err());
    }
}
