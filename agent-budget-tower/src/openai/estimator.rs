//! [`OpenAiEstimator`]: reads an OpenAI-style request to estimate it.
//!
//! # How it works
//!
//! The path is [normalized](crate::path::normalize) first (a path that
//! cannot be is `400`), and the request goes on with the normalized path,
//! so the endpoint it was estimated as is the one it reaches. Then:
//!
//! | request | estimate |
//! |---|---|
//! | `POST` to chat completions, completions, responses or embeddings | the body is read whole (up to a limit: `413` beyond it), estimated by [`estimate_body`](super::estimate_body) (`400` if it is not a valid request), and put back, rewritten if the upstream must be asked for a stream's usage |
//! | `GET` or `HEAD` (a read: models, files, a stored response) | the reads' [`FixedCost`]: one call and no tokens by default; a read with a body is `400` (an upstream that routed it like a `POST` would serve tokens nobody estimated) |
//! | anything else (another `POST`, `PUT`, `DELETE`, …) | [`OtherRequests`]: refused with `404` by default, nothing forwarded; or a fixed cost, settled from the `usage` its response may report |

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH};
use http::{Method, Request};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::request::{estimate_body, ByteCount, Endpoint, EstimateOptions, TokenCounter};
use crate::path::normalize_uri;
use crate::{Estimate, Estimator, FixedCost, Rejection};

/// What [`OpenAiEstimator`] does with a request it cannot estimate: one
/// that is neither a read (`GET`, `HEAD`) nor a `POST` to an endpoint whose
/// body says what it costs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OtherRequests {
    /// Refused with `404`, nothing forwarded or charged (the default: an
    /// endpoint the estimator does not know may consume tokens it would
    /// not see coming).
    #[default]
    Refuse,
    /// Admitted at this cost (its tokens reserved like any estimate), and
    /// settled from the `usage` the response reports, if it does.
    Fixed(FixedCost),
}

/// Estimates OpenAI-style requests from their JSON bodies, counting the
/// prompt with a [`TokenCounter`] (the conservative [`ByteCount`] unless
/// given a tokenizer).
pub struct OpenAiEstimator<C = ByteCount> {
    counter: Arc<C>,
    options: EstimateOptions,
    max_body_bytes: usize,
    reads: FixedCost,
    other: OtherRequests,
}

impl<C> Clone for OpenAiEstimator<C> {
    fn clone(&self) -> Self {
        OpenAiEstimator {
            counter: self.counter.clone(),
            options: self.options,
            max_body_bytes: self.max_body_bytes,
            reads: self.reads,
            other: self.other,
        }
    }
}

impl<C> std::fmt::Debug for OpenAiEstimator<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiEstimator")
            .field("options", &self.options)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("reads", &self.reads)
            .field("other", &self.other)
            .finish_non_exhaustive()
    }
}

impl Default for OpenAiEstimator<ByteCount> {
    fn default() -> Self {
        Self::new(ByteCount)
    }
}

impl<C: TokenCounter> OpenAiEstimator<C> {
    /// Counts prompts with `counter`; bodies up to 16 MiB; reads cost one
    /// call; other requests are refused.
    pub fn new(counter: C) -> Self {
        OpenAiEstimator {
            counter: Arc::new(counter),
            options: EstimateOptions::default(),
            max_body_bytes: 16 << 20,
            reads: FixedCost::default(),
            other: OtherRequests::default(),
        }
    }

    /// Sets the defaults for requests without a maximum.
    pub fn options(mut self, options: EstimateOptions) -> Self {
        self.options = options;
        self
    }

    /// Sets the largest body read (`413` beyond it).
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// Sets the cost of reads (`GET`, `HEAD`): one call and no tokens
    /// unless set here.
    pub fn reads(mut self, cost: FixedCost) -> Self {
        self.reads = cost;
        self
    }

    /// Sets what happens to requests that are neither reads nor `POST`s to
    /// an endpoint estimated from its body.
    pub fn other_requests(mut self, other: OtherRequests) -> Self {
        self.other = other;
        self
    }

    /// What `request`'s method and (normalized) path cost, when the body
    /// need not be read: `None` for a `POST` to a metered endpoint.
    fn cost_without_body<B: Body>(
        &self,
        request: &Request<B>,
        endpoint: Endpoint,
    ) -> Option<Result<Estimate, Rejection>> {
        let method = request.method();
        if method == Method::GET || method == Method::HEAD {
            return Some(if request.body().size_hint().upper() == Some(0) {
                Ok(self.reads.estimate())
            } else {
                Err(Rejection::bad_request(format!(
                    "a {method} request must not have a body"
                )))
            });
        }
        if method == Method::POST && endpoint != Endpoint::Other {
            return None;
        }
        Some(match self.other {
            OtherRequests::Fixed(cost) => Ok(cost.estimate()),
            OtherRequests::Refuse => Err(Rejection::not_found(format!(
                "{method} {} is not forwarded: the budget is enforced on chat completions, \
                 completions, responses and embeddings (POST), and on reads (GET)",
                request.uri().path()
            ))),
        })
    }
}

impl<B, C> Estimator<B> for OpenAiEstimator<C>
where
    B: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    C: TokenCounter,
{
    fn estimate(
        &self,
        mut request: Request<B>,
    ) -> impl Future<Output = Result<(Request<B>, Estimate), Rejection>> + Send {
        let this = self.clone();
        async move {
            match normalize_uri(request.uri()) {
                Ok(None) => {}
                Ok(Some(uri)) => *request.uri_mut() = uri,
                Err(e) => return Err(Rejection::bad_request(e.to_string())),
            }
            let endpoint = Endpoint::of_path(request.uri().path());
            if let Some(cost) = this.cost_without_body(&request, endpoint) {
                return cost.map(|estimate| (request, estimate));
            }
            let (mut parts, body) = request.into_parts();
            let bytes = match Limited::new(body, this.max_body_bytes).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.is::<LengthLimitError>() => {
                    return Err(Rejection::too_large(format!(
                        "the request body is larger than {} bytes",
                        this.max_body_bytes
                    )))
                }
                Err(e) => {
                    return Err(Rejection::bad_request(format!(
                        "cannot read the request body: {e}"
                    )))
                }
            };
            let estimated = estimate_body(endpoint, &bytes, &*this.counter, &this.options)
                .map_err(Rejection::bad_request)?;
            let body = match estimated.rewritten_body {
                Some(rewritten) => {
                    parts
                        .headers
                        .insert(CONTENT_LENGTH, HeaderValue::from(rewritten.len()));
                    rewritten
                }
                None => bytes,
            };
            Ok((
                Request::from_parts(parts, B::from(body)),
                estimated.estimate,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;
    use http_body_util::Full;

    fn request(method: &str, uri: &str, body: &'static str) -> Request<Full<Bytes>> {
        Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    fn run(
        estimator: &OpenAiEstimator,
        request: Request<Full<Bytes>>,
    ) -> Result<(Request<Full<Bytes>>, Estimate), Rejection> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(estimator.estimate(request))
    }

    #[test]
    fn a_post_is_estimated_at_the_normalized_path_which_is_what_goes_on() {
        let e = OpenAiEstimator::default();
        let (forwarded, estimate) = run(
            &e,
            request(
                "POST",
                "/v1//chat/%63ompletions?x=%2F",
                r#"{"messages":[],"max_tokens":7}"#,
            ),
        )
        .unwrap();
        assert_eq!(forwarded.uri().path(), "/v1/chat/completions");
        assert_eq!(forwarded.uri().query(), Some("x=%2F"));
        assert_eq!(estimate.completion_tokens, 7);
    }

    #[test]
    fn a_path_that_cannot_be_normalized_is_400() {
        let e = OpenAiEstimator::default();
        for path in ["/v1/%2e%2e/admin", "/v1/..%2fadmin", "/v1/a%zz"] {
            let r = run(&e, request("GET", path, "")).unwrap_err();
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
        }
    }

    #[test]
    fn reads_cost_a_call_and_must_have_no_body() {
        let e = OpenAiEstimator::default();
        let (_, estimate) = run(&e, request("GET", "/v1/models", "")).unwrap();
        assert_eq!((estimate.tokens(), estimate.calls), (0, 1));
        let (_, estimate) = run(&e, request("HEAD", "/v1/chat/completions", "")).unwrap();
        assert_eq!((estimate.tokens(), estimate.calls), (0, 1));
        let r = run(
            &e,
            request("GET", "/v1/chat/completions", r#"{"messages":[]}"#),
        )
        .unwrap_err();
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn other_writes_are_refused_unless_given_a_fixed_cost() {
        let e = OpenAiEstimator::default();
        for (method, path) in [
            ("POST", "/v1/audio/speech"),
            ("POST", "/v1/responses/resp_1/cancel"),
            ("PUT", "/v1/chat/completions"),
            ("DELETE", "/v1/files/f1"),
            ("POST", "/v1/chat/Completions"),
        ] {
            let r = run(&e, request(method, path, "{}")).unwrap_err();
            assert_eq!(r.status, StatusCode::NOT_FOUND, "{method} {path}");
            assert!(r.message.contains(path), "{}", r.message);
        }
        let fixed = FixedCost {
            tokens: 250,
            calls: 1,
        };
        let e = OpenAiEstimator::default().other_requests(OtherRequests::Fixed(fixed));
        let (_, estimate) = run(&e, request("POST", "/v1/audio/speech", "{}")).unwrap();
        assert_eq!(estimate, fixed.estimate());
    }
}
