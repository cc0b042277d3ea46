//! What to reserve for a request, before it is forwarded.
//!
//! # How it works
//!
//! An LLM request's real cost is known only from its response, so the
//! layer reserves an [`Estimate`] first: the prompt's tokens, the most the
//! completion may use, and the calls. The reservation is all-or-nothing,
//! so racing requests cannot overshoot the budget between a check and a
//! charge; the response's real usage then replaces the estimate.
//!
//! An [`Estimator`] computes it. It receives the whole request and hands
//! it back, because the good estimates need the body: the
//! [`OpenAiEstimator`](crate::OpenAiEstimator) reads the JSON, counts the
//! prompt and may rewrite the body (to ask a streaming upstream for its
//! usage). [`FixedCost`] is the estimate for requests whose body says
//! nothing: a fixed number of tokens and calls.

use std::future::Future;

use http::Request;

use crate::Rejection;

/// What a request is expected to cost, and what the meter should know
/// about it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Estimate {
    /// Tokens of the prompt: spent as soon as the upstream reads it, and so
    /// charged even if the client hangs up before any answer.
    pub prompt_tokens: u64,
    /// The most tokens the completion may use (`max_tokens` times the
    /// number of choices).
    pub completion_tokens: u64,
    /// Calls.
    pub calls: u64,
    /// Whether the response stream's final usage chunk was requested by
    /// the layer, not the client, and should be hidden from the client.
    pub hide_usage_chunk: bool,
}

impl Estimate {
    /// Tokens to reserve: prompt plus completion, saturating.
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// Computes the [`Estimate`] of a request.
pub trait Estimator<B>: Clone + Send + Sync + 'static {
    /// The estimate of `request`, and the request to forward (its body may
    /// have been read and put back, or rewritten); or the rejection to
    /// answer (`400` for a body that cannot be read), with nothing charged.
    fn estimate(
        &self,
        request: Request<B>,
    ) -> impl Future<Output = Result<(Request<B>, Estimate), Rejection>> + Send;
}

/// The same cost for every request: `tokens` (counted as prompt) and
/// `calls`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixedCost {
    /// Tokens reserved per request.
    pub tokens: u64,
    /// Calls reserved per request.
    pub calls: u64,
}

impl Default for FixedCost {
    /// One call and no tokens: a plain request limiter, whose tokens come
    /// from the responses' usage.
    fn default() -> Self {
        FixedCost {
            tokens: 0,
            calls: 1,
        }
    }
}

impl FixedCost {
    /// The estimate this cost stands for.
    pub fn estimate(&self) -> Estimate {
        Estimate {
            prompt_tokens: self.tokens,
            completion_tokens: 0,
            calls: self.calls,
            hide_usage_chunk: false,
        }
    }
}

impl<B: Send + 'static> Estimator<B> for FixedCost {
    fn estimate(
        &self,
        request: Request<B>,
    ) -> impl Future<Output = Result<(Request<B>, Estimate), Rejection>> + Send {
        std::future::ready(Ok((request, FixedCost::estimate(self))))
    }
}
