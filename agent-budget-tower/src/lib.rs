//! Token and call budgets enforced on the wire: a tower layer over
//! [`agent_budget`]'s lock-free manager.
//!
//! A [`BudgetLayer`] sits in a tower stack (axum, hyper, tonic) in front of
//! a service that calls an LLM, or is one. For every request it reserves
//! an estimate of the tokens and one call before the request goes on,
//! refuses with `429` and `Retry-After` when the agent's budget cannot
//! take it, and settles the real usage when the response's body ends,
//! read from the response itself. The reservation is all-or-nothing and
//! takes one compare-and-swap, so racing requests never overshoot a budget
//! between a check and a charge. The check itself (the `acquire` and the
//! read for the headers) takes about 0.3 µs; reading and estimating an
//! OpenAI body costs more (about 4 µs with a real tokenizer, and a trip
//! through the scheduler to await the body: see the workspace README's
//! "Load and overhead").
//!
//! # The parts
//!
//! | part | trait | default | others |
//! |---|---|---|---|
//! | who the agent is | [`Identify`] | [`AgentIdHeader`] (`x-agent-id: <uuid>`) | [`BearerKeys`] (`Authorization: Bearer <key>` through a map), [`AgentIdExtension`], closures |
//! | what to reserve | [`Estimator`] | [`OpenAiEstimator`]: for chat completions, completions, responses and embeddings, the prompt and the most the completion may use, and one call; reads one call; other requests refused (see [`OtherRequests`]) | [`FixedCost`] |
//! | what was used | [`Meter`] | [`OpenAiUsage`]: `usage` from the JSON body or the stream's usage event | [`HeaderUsage`] |
//! | what admits | [`Admission`] | any [`BudgetLimiter`](agent_budget::BudgetLimiter) (`Arc<BudgetManager>`, the argument of [`BudgetLayer::new`]) | `agent-budget-redis`'s `FleetManager` (its `tower` feature): one budget for a fleet |
//!
//! # What a client sees
//!
//! - Admitted: the response, with OpenAI's `x-ratelimit-limit-*`,
//!   `x-ratelimit-remaining-*` and `x-ratelimit-reset-*` headers (and the
//!   IETF `RateLimit-Policy` / `RateLimit` fields if
//!   [`HeaderStyle::ietf`] is on).
//! - Refused: `429 Too Many Requests` with `Retry-After` in whole seconds
//!   (rounded up, never `0`), the same headers, and an OpenAI-style error
//!   body; `403` if the agent has no budget at all; `401` if no agent can
//!   be told; `400` if the body cannot be estimated or the path has a
//!   spelling servers disagree on ([`path`]); `404` for a request the
//!   estimator will not forward ([`OtherRequests`]). Nothing is forwarded
//!   or charged for any of these.
//! - With [`BudgetLayer::max_wait`], a request that does not fit waits
//!   for budget (a refund or the window's end) up to that long first.
//! - Under nested budgets (`set_parent`: a key under its team), the
//!   headers report, for each resource, the level that binds the agent
//!   (the one with the least left, or the one that refused it).
//! - `503 Service Unavailable` with `Retry-After` when the budget could
//!   not be checked at all (only a budget kept elsewhere, such as a
//!   fleet's in Redis, answers that: see [`Admission`]).
//!
//! # Settling
//!
//! The reservation is settled once, by the response body (see [`body`
//! module docs](BudgetBody)): with the usage the response reported when
//! the body ends; with at least the prompt and what streamed when the
//! client hangs up (axum and hyper drop the body; the settle is in a
//! `Drop`); cancelled when the inner service fails before any response.
//! Usage beyond the estimate is charged even past the limit.
//!
//! # Embedding it in axum
//!
//! `Router::new().route(...).layer(BudgetLayer::new(budgets).identify(keys))`:
//! the crate's README has the whole example, compiled as a doc test.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// A `Rejection` (status, message, headers) is 160 bytes, moved once per
// refused request, the cold path: boxing it would cost an allocation to
// save a copy.
#![allow(clippy::result_large_err)]

mod admission;
mod body;
mod estimate;
pub mod headers;
mod identify;
mod meter;
pub mod openai;
pub mod path;
mod rejection;
mod service;
mod telemetry;

pub use admission::{Admission, Denial, POLL_INTERVAL};
pub use body::BudgetBody;
pub use estimate::{CountTokens, DeferredCount, Estimate, Estimator, FixedCost};
pub use identify::{bearer_key, AgentIdExtension, AgentIdHeader, BearerKeys, Identify};
pub use meter::{HeaderUsage, HeaderUsageSession, Meter, MeterSession, Outcome};
pub use openai::{OpenAiEstimator, OpenAiUsage, OtherRequests, PromptCount};
pub use rejection::Rejection;
pub use service::{BudgetLayer, BudgetResponse, BudgetService, HeaderStyle};
pub use telemetry::RefusalReason;

/// The README's example, compiled as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
