//! A small OpenAI-compatible upstream, for trying the gateway, its tests
//! and its load measurements.
//!
//! # How it works
//!
//! `POST /v1/chat/completions` and `POST /v1/completions` answer at once
//! with an OpenAI-shaped completion and a `usage` object, as JSON or, for
//! `"stream": true`, as server-sent events (one chunk per completion
//! token, then the usage chunk if `stream_options.include_usage`, then
//! `[DONE]`). Usage is deterministic, so tests can predict it:
//!
//! - prompt tokens: the words of the messages' (or prompt's) text, plus 3
//!   per message;
//! - completion tokens: `max_completion_tokens` / `max_tokens`, at most 16.
//!
//! Requests may steer it with extra fields, which a real upstream would
//! ignore: `mock_prompt_tokens` and `mock_completion_tokens` set the
//! usage, `mock_status` answers that error status instead, `mock_delay_ms`
//! waits first. It counts the completions it served and the tokens it
//! reported, at `GET /mock/stats`, so tests can check the gateway against
//! the upstream's own books.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{header, StatusCode};
use serde_json::{json, Value};

/// What the mock served.
#[derive(Debug, Default)]
pub struct MockStats {
    /// Completions served (errors not counted).
    pub calls: AtomicU64,
    /// Total tokens reported in their `usage`.
    pub total_tokens: AtomicU64,
}

/// The mock's router, and its counters.
pub fn router() -> (Router, Arc<MockStats>) {
    let stats = Arc::new(MockStats::default());
    let router = Router::new()
        .route("/v1/chat/completions", post(complete))
        .route("/v1/completions", post(complete))
        .route("/v1/models", get(models))
        .route("/mock/stats", get(report))
        .with_state(stats.clone());
    (router, stats)
}

async fn models() -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": "mock-model", "object": "model", "owned_by": "mock"}]}),
    )
}

async fn report(State(stats): State<Arc<MockStats>>) -> Json<Value> {
    Json(json!({
        "calls": stats.calls.load(Ordering::SeqCst),
        "total_tokens": stats.total_tokens.load(Ordering::SeqCst),
    }))
}

fn error(status: StatusCode, message: &str) -> Response {
    let body =
        json!({"error": {"message": message, "type": "mock_error", "param": null, "code": null}});
    (status, Json(body)).into_response()
}

fn words(value: &Value) -> u64 {
    match value {
        Value::String(s) => s.split_whitespace().count() as u64,
        Value::Array(items) => items.iter().map(words).sum(),
        Value::Object(o) => o.get("text").map_or(0, words),
        _ => 0,
    }
}

/// The usage the mock reports for `request`.
pub fn usage_of(request: &Value) -> (u64, u64) {
    let prompt = request["mock_prompt_tokens"].as_u64().unwrap_or_else(|| {
        let messages = request["messages"].as_array();
        let framing = messages.map_or(0, |m| 3 * m.len() as u64);
        let text = messages.map_or_else(
            || words(&request["prompt"]),
            |m| m.iter().map(|m| words(&m["content"])).sum(),
        );
        framing + text
    });
    let completion = request["mock_completion_tokens"]
        .as_u64()
        .unwrap_or_else(|| {
            request["max_completion_tokens"]
                .as_u64()
                .or(request["max_tokens"].as_u64())
                .unwrap_or(16)
                .min(16)
        });
    (prompt, completion)
}

async fn complete(State(stats): State<Arc<MockStats>>, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "the body is not JSON");
    };
    if let Some(ms) = request["mock_delay_ms"].as_u64() {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    if let Some(status) = request["mock_status"].as_u64() {
        let status = u16::try_from(status)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error(status, "the mock was asked to fail");
    }
    let chat = request.get("messages").is_some();
    let (prompt, completion) = usage_of(&request);
    let total = prompt.saturating_add(completion);
    stats.calls.fetch_add(1, Ordering::SeqCst);
    stats.total_tokens.fetch_add(total, Ordering::SeqCst);
    let usage =
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total});
    if request["stream"] == true {
        let with_usage = request["stream_options"]["include_usage"] == true;
        return stream(chat, completion, with_usage.then_some(usage));
    }
    let choice = if chat {
        json!({"index": 0, "message": {"role": "assistant", "content": "tok ".repeat(completion as usize)}, "finish_reason": "stop"})
    } else {
        json!({"index": 0, "text": "tok ".repeat(completion as usize), "finish_reason": "stop"})
    };
    Json(json!({
        "id": "mock-1",
        "object": if chat { "chat.completion" } else { "text_completion" },
        "model": "mock-model",
        "choices": [choice],
        "usage": usage,
    }))
    .into_response()
}

/// A stream of `tokens` one-token chunks, the usage chunk if asked for,
/// and `[DONE]`.
fn stream(chat: bool, tokens: u64, usage: Option<Value>) -> Response {
    let chunk = |choices: Value, usage: Value| {
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let event = json!({"id": "mock-1", "object": object, "model": "mock-model", "choices": choices, "usage": usage});
        Ok::<_, Infallible>(Bytes::from(format!("data: {event}\n\n")))
    };
    let mut events: Vec<Result<Bytes, Infallible>> = (0..tokens)
        .map(|_| {
            let choice = if chat {
                json!([{"index": 0, "delta": {"content": "tok "}}])
            } else {
                json!([{"index": 0, "text": "tok "}])
            };
            chunk(choice, Value::Null)
        })
        .collect();
    if let Some(usage) = usage {
        events.push(chunk(json!([]), usage));
    }
    events.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(futures_util::stream::iter(events)),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_predictable() {
        let r = json!({"messages": [{"content": "a b c"}, {"content": [{"type": "text", "text": "d"}]}], "max_tokens": 5});
        assert_eq!(usage_of(&r), (2 * 3 + 4, 5));
        let r = json!({"prompt": "a b", "max_tokens": 500});
        assert_eq!(usage_of(&r), (2, 16));
        let r = json!({"messages": [], "mock_prompt_tokens": 7, "mock_completion_tokens": 900});
        assert_eq!(usage_of(&r), (7, 900));
    }
}
