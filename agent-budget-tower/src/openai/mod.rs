//! OpenAI's API: estimating its requests and reading its responses' usage.
//!
//! The pure parts ([`estimate_body`], [`json_usage`], [`read_event`],
//! [`EventSplitter`]) are public so other layers and tests can use them;
//! [`OpenAiEstimator`] and [`OpenAiUsage`] plug them into the layer.

mod chat;
mod embeddings;
mod estimator;
mod meter;
pub mod pricing;
mod request;
mod response;
mod responses;
mod scan;

pub use estimator::{OpenAiEstimator, OtherRequests, PromptCount};
pub use meter::{OpenAiSession, OpenAiUsage};
pub use request::{
    estimate_body, prompt_tokens, ByteCount, Endpoint, EstimateOptions, RequestEstimate,
    TokenCounter, NON_TEXT_PART_TOKENS,
};
pub use response::{json_usage, read_event, EventSplitter, StreamEvent, MAX_EVENT_BYTES};
