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
//!
//! An estimator may also reserve a cheap upper bound of the prompt and
//! leave the count for later ([`DeferredCount`]), when the count would cost
//! more than the rest of the check.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::Request;

use crate::Rejection;

/// What a request is expected to cost, and what the meter should know
/// about it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Estimate {
    /// Tokens of the prompt: spent as soon as the upstream reads it, and so
    /// charged even if the client hangs up before any answer. With a
    /// [`deferred_count`](Self::deferred_count), an upper bound of the
    /// prompt's count.
    pub prompt_tokens: u64,
    /// The most tokens the completion may use (`max_tokens` times the
    /// number of choices).
    pub completion_tokens: u64,
    /// Calls.
    pub calls: u64,
    /// Whether the response stream's final usage chunk was requested by
    /// the layer, not the client, and should be hidden from the client.
    pub hide_usage_chunk: bool,
    /// The prompt's count, when `prompt_tokens` is a cheap upper bound
    /// taken instead of it: made when asked for
    /// ([`counted_prompt_tokens`](Self::counted_prompt_tokens)).
    pub deferred_count: Option<DeferredCount>,
    /// The request's `model`, as sent, when the estimator read one: what
    /// per-model limits and prices go by (a slice of the body: no copy).
    pub model: Option<Bytes>,
}

impl Estimate {
    /// Tokens to reserve: prompt plus completion, saturating.
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    /// The prompt's tokens as counted: the [deferred
    /// count](Self::deferred_count), made now, or `prompt_tokens` when
    /// nothing was deferred.
    pub fn counted_prompt_tokens(&self) -> u64 {
        self.deferred_count
            .as_ref()
            .map_or(self.prompt_tokens, DeferredCount::tokens)
    }

    /// The request's `model`, when it names one in UTF-8.
    pub fn model(&self) -> Option<&str> {
        self.model
            .as_deref()
            .and_then(|m| std::str::from_utf8(m).ok())
    }

    /// [`tokens`](Self::tokens) with the prompt as counted.
    pub fn counted_tokens(&self) -> u64 {
        self.counted_prompt_tokens()
            .saturating_add(self.completion_tokens)
    }

    /// Replaces a bound of the prompt by its count; whether that changed
    /// what is reserved.
    pub fn count_prompt(&mut self) -> bool {
        let before = self.prompt_tokens;
        self.prompt_tokens = self.counted_prompt_tokens();
        self.deferred_count = None;
        self.prompt_tokens != before
    }
}

/// A prompt's token count, made when it is asked for, where the estimator
/// reserved a cheap upper bound in its place: a counting function and its
/// input, both shared (cloning one allocates nothing).
///
/// Counting a prompt with a real tokenizer costs far more than the rest of
/// the budget check, and the count is only an estimate: the settle
/// replaces it with the upstream's usage. So an estimator may reserve a
/// bound instead (one token per byte of text: see
/// [`PromptCount::WhenTight`](crate::PromptCount::WhenTight)) and defer the
/// count. The layer has it made only where it matters: when the bound does
/// not fit the budget (the request is then admitted, or refused, on the
/// count), and when the prompt alone is charged (a client that hung up
/// before the answer, a response without usage): rarely, so it is not
/// kept, and a request that needs it twice counts twice.
#[derive(Clone)]
pub struct DeferredCount {
    count: Arc<CountTokens>,
    input: Bytes,
}

/// A function that counts the tokens of a prompt in its input (a request's
/// body, say).
pub type CountTokens = dyn Fn(&[u8]) -> u64 + Send + Sync;

impl DeferredCount {
    /// The count `count` makes of `input` (a request's body, say), when it
    /// is asked for.
    pub fn new(count: Arc<CountTokens>, input: Bytes) -> Self {
        DeferredCount { count, input }
    }

    /// The length of the input the count is made of.
    pub fn input_len(&self) -> usize {
        self.input.len()
    }

    /// The count, made now.
    pub fn tokens(&self) -> u64 {
        (self.count)(&self.input)
    }
}

impl fmt::Debug for DeferredCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeferredCount({} bytes of input)", self.input.len())
    }
}

/// Two are equal when they count the same input the same way.
impl PartialEq for DeferredCount {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.count, &other.count) && self.input == other.input
    }
}

impl Eq for DeferredCount {}

/// Computes the [`Estimate`] of a request.
pub trait Estimator<B>: Clone + Send + Sync + 'static {
    /// The estimate of `request`, and the request to forward (its body may
    /// have been read and put back, or rewritten); or the rejection to
    /// answer (`400` for a body that cannot be read), with nothing charged.
    fn estimate(
        &self,
        request: Request<B>,
    ) -> impl Future<Output = Result<(Request<B>, Estimate), Rejection>> + Send;

    /// The least `(tokens, calls)` any estimate of a request like this one
    /// can come to, when the estimate has to read its body: when the body
    /// has not arrived by the estimate's first poll, the layer checks that
    /// the budget has that much room before waiting for it, and refuses at
    /// once when it has not (an exhausted budget then costs no body's
    /// memory, parsing or wait). A body that is already there is estimated
    /// at once and admitted without the check; the check is made only
    /// where that fails, and its refusal is then the answer, the same
    /// either way. `None` (the default): no such check.
    fn floor(&self, request: &Request<B>) -> Option<(u64, u64)> {
        let _ = request;
        None
    }
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
            deferred_count: None,
            model: None,
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
