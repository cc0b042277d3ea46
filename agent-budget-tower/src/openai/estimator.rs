//! [`OpenAiEstimator`]: reads an OpenAI-style request body to estimate it.
//!
//! # How it works
//!
//! For a `POST` to a chat or completions endpoint, the body is read whole
//! (up to a limit: `413` beyond it), estimated by
//! [`estimate_body`](super::estimate_body) (`400` if it is not a valid
//! request), and put back, rewritten if the upstream must be asked for a
//! stream's usage. Any other request costs a [`FixedCost`] (one call by
//! default) and its body is not touched: tokens an embeddings call uses
//! still come from its response's `usage`.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH};
use http::{Method, Request};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::request::{estimate_body, ByteCount, Endpoint, EstimateOptions, TokenCounter};
use crate::{Estimate, Estimator, FixedCost, Rejection};

/// Estimates OpenAI-style requests from their JSON bodies, counting the
/// prompt with a [`TokenCounter`] (the conservative [`ByteCount`] unless
/// given a tokenizer).
pub struct OpenAiEstimator<C = ByteCount> {
    counter: Arc<C>,
    options: EstimateOptions,
    max_body_bytes: usize,
    other: FixedCost,
}

impl<C> Clone for OpenAiEstimator<C> {
    fn clone(&self) -> Self {
        OpenAiEstimator {
            counter: self.counter.clone(),
            options: self.options,
            max_body_bytes: self.max_body_bytes,
            other: self.other,
        }
    }
}

impl<C> std::fmt::Debug for OpenAiEstimator<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiEstimator")
            .field("options", &self.options)
            .field("max_body_bytes", &self.max_body_bytes)
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
    /// Counts prompts with `counter`; bodies up to 16 MiB; other requests
    /// cost one call.
    pub fn new(counter: C) -> Self {
        OpenAiEstimator {
            counter: Arc::new(counter),
            options: EstimateOptions::default(),
            max_body_bytes: 16 << 20,
            other: FixedCost::default(),
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

    /// Sets the cost of requests that are not chat or completions.
    pub fn other_requests(mut self, cost: FixedCost) -> Self {
        self.other = cost;
        self
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
        request: Request<B>,
    ) -> impl Future<Output = Result<(Request<B>, Estimate), Rejection>> + Send {
        let this = self.clone();
        async move {
            let endpoint = Endpoint::of_path(request.uri().path());
            if request.method() != Method::POST || endpoint == Endpoint::Other {
                return Ok((request, this.other.estimate()));
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
