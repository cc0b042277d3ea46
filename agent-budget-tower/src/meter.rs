//! What a response really used: read from its headers or its body as it
//! streams past.
//!
//! # How it works
//!
//! When the inner service answers, the layer asks its [`Meter`] for a
//! [`MeterSession`] for that response. The session sees each chunk of the
//! body on its way to the client (and may rewrite it: the OpenAI meter
//! hides a usage chunk the client did not ask for), and is asked for an
//! [`Outcome`] once:
//!
//! - when the body ends: [`MeterSession::finish`], with what it saw;
//! - when the body is dropped before its end (the client hung up: hyper
//!   and axum drop the body) or fails: [`MeterSession::abandon`]. The
//!   tokens were spent all the same, so the outcome must not refund what
//!   the upstream already consumed: at least the prompt plus what streamed.
//!
//! The outcome settles the reservation: [`Outcome::Used`] replaces the
//! estimate by the real count (refunding the rest, or charging the excess
//! even past the limit), [`Outcome::Reserved`] keeps the estimate charged
//! (nothing better is known), [`Outcome::Cancel`] gives everything back
//! (the upstream did no work).
//!
//! [`HeaderUsage`] reads the count from a response header; the
//! [`OpenAiUsage`](crate::OpenAiUsage) meter reads OpenAI's `usage` object
//! from a JSON body or a stream of server-sent events.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName};
use http::response::Parts;

use crate::Estimate;

/// Put in a response's extensions by the inner service when the upstream
/// received the request although its response says nothing of what was
/// used (it timed out, or failed after the request was sent): the prompt
/// may have been read and worked on, so an outcome of
/// [`Outcome::Cancel`] charges the prompt instead of giving it back, as a
/// client hanging up before the answer is charged. The layer removes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PromptReceived;

/// Told of every admission and settle, in the order they happen for each
/// request: a journal of usage between snapshots (the gateway's) is one.
///
/// Called on the request's path (an admission) or where its body ends (a
/// settle): it must not block.
pub trait UsageLog: Send + Sync + 'static {
    /// `tokens` and `calls` were taken from `agent`'s budget at `at`.
    fn admitted(
        &self,
        agent: &agent_budget::AgentId,
        tokens: u64,
        calls: u64,
        at: std::time::SystemTime,
    );
    /// The reservation taken at `admitted_at` was settled, with this
    /// effect on `agent`'s budget.
    fn settled(
        &self,
        agent: &agent_budget::AgentId,
        admitted_at: std::time::SystemTime,
        settlement: agent_budget::Settlement,
    );
}

/// How a reservation is settled once its response is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The response used this many tokens in total: the estimate is
    /// replaced by it.
    Used(u64),
    /// Nothing better than the estimate is known: it stays charged (with
    /// the prompt as counted, when a bound was reserved in its place: see
    /// [`Estimate::deferred_count`]).
    Reserved,
    /// No work was done: tokens and calls are given back.
    Cancel,
}

/// What a response used: its total tokens, and how they split between
/// the prompt and the completion when the response says (what prices go
/// by).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsedTokens {
    /// Tokens in all: what [`Outcome::Used`] carries.
    pub total: u64,
    /// The prompt's and the completion's, if known.
    pub split: Option<TokenSplit>,
}

/// A usage's prompt and completion tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenSplit {
    /// Prompt tokens, cached ones included.
    pub input: u64,
    /// Of which read from the provider's cache (at most `input`).
    pub cached_input: u64,
    /// Completion tokens (reasoning included).
    pub output: u64,
}

/// Starts a [`MeterSession`] for each response.
pub trait Meter: Clone + Send + Sync + 'static {
    /// The per-response state.
    type Session: MeterSession;

    /// A session for a response to a request estimated as `estimate`. It
    /// may change the response's head (drop `content-length` if it will
    /// rewrite the body).
    fn start(&self, estimate: &Estimate, response: &mut Parts) -> Self::Session;
}

/// Watches one response body go by and decides what it used.
pub trait MeterSession: Send + 'static {
    /// A chunk of the body on its way to the client; returns what to send
    /// instead (`None`: nothing, for now).
    fn data(&mut self, chunk: Bytes) -> Option<Bytes> {
        Some(chunk)
    }

    /// The body's trailers, if it has any.
    fn trailers(&mut self, _trailers: &HeaderMap) {}

    /// Whether every chunk goes out as it came, so the body's length
    /// stays as the inner service said. A session that holds back or
    /// drops bytes returns `false`.
    fn preserves_body(&self) -> bool {
        true
    }

    /// The body has ended: anything still held back, to send last.
    fn flush(&mut self) -> Option<Bytes> {
        None
    }

    /// The body ended: what it used.
    fn finish(&mut self) -> Outcome;

    /// The body was dropped before its end, or failed: what to charge.
    fn abandon(&mut self) -> Outcome;

    /// After [`finish`](Self::finish) or [`abandon`](Self::abandon) said
    /// [`Outcome::Used`]: how those tokens split, when the response said
    /// (its `usage`). `None` by default.
    fn used_tokens(&self) -> Option<UsedTokens> {
        None
    }
}

/// The total tokens in a response header (`x-usage-total-tokens`, for
/// instance), for upstreams that report usage there. Without the header,
/// a successful response keeps its estimate charged and a failed one is
/// cancelled.
#[derive(Clone, Debug)]
pub struct HeaderUsage {
    name: HeaderName,
}

impl HeaderUsage {
    /// Reads the usage from the header `name`.
    pub fn new(name: HeaderName) -> Self {
        HeaderUsage { name }
    }
}

/// The session of [`HeaderUsage`]: decided when the head arrives.
#[derive(Clone, Copy, Debug)]
pub struct HeaderUsageSession {
    outcome: Outcome,
}

impl Meter for HeaderUsage {
    type Session = HeaderUsageSession;

    fn start(&self, _estimate: &Estimate, response: &mut Parts) -> Self::Session {
        let used = response
            .headers
            .get(&self.name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let outcome = match used {
            Some(n) => Outcome::Used(n),
            None if response.status.is_success() => Outcome::Reserved,
            None => Outcome::Cancel,
        };
        HeaderUsageSession { outcome }
    }
}

impl MeterSession for HeaderUsageSession {
    fn finish(&mut self) -> Outcome {
        self.outcome
    }

    fn abandon(&mut self) -> Outcome {
        self.outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Response, StatusCode};

    fn session(status: StatusCode, header: Option<&str>) -> HeaderUsageSession {
        let mut builder = Response::builder().status(status);
        if let Some(v) = header {
            builder = builder.header("x-usage-total-tokens", v);
        }
        let (mut parts, ()) = builder.body(()).unwrap().into_parts();
        HeaderUsage::new(HeaderName::from_static("x-usage-total-tokens"))
            .start(&Estimate::default(), &mut parts)
    }

    #[test]
    fn header_usage_reads_the_count_or_falls_back_by_status() {
        assert_eq!(
            session(StatusCode::OK, Some("42")).finish(),
            Outcome::Used(42)
        );
        assert_eq!(
            session(StatusCode::OK, Some("-1")).finish(),
            Outcome::Reserved
        );
        assert_eq!(
            session(StatusCode::OK, Some("1e30")).finish(),
            Outcome::Reserved
        );
        assert_eq!(session(StatusCode::OK, None).abandon(), Outcome::Reserved);
        assert_eq!(
            session(StatusCode::BAD_GATEWAY, None).finish(),
            Outcome::Cancel
        );
    }
}
