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
mod seek;

pub use estimator::{OpenAiEstimator, OtherRequests, PromptCount};
pub use meter::{OpenAiSession, OpenAiUsage};
pub use request::{
    estimate_body, prompt_tokens, request_model, ByteCount, Endpoint, EstimateOptions,
    RequestEstimate, TokenCounter, NON_TEXT_PART_TOKENS,
};
#[cfg(fuzzing)]
pub use response::serde_used_tokens;
pub use response::{
    event_used_tokens, json_usage, json_used_tokens, read_event, EventSplitter, StreamEvent,
    MAX_EVENT_BYTES,
};

/// The `Content-Encoding` of a message whose body is compressed (anything
/// but `identity`): a body the layer cannot read, neither a request's to
/// estimate it nor a response's to meter it. `None` for a plain body.
fn compression(headers: &http::HeaderMap) -> Option<&http::HeaderValue> {
    headers
        .get(http::header::CONTENT_ENCODING)
        .filter(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"))
}
