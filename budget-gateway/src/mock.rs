//! A small OpenAI-compatible upstream, for trying the gateway, its tests
//! and its load measurements.
//!
//! # How it works
//!
//! Every endpoint that consumes tokens answers at once with an
//! OpenAI-shaped body and its usage, as JSON or, for `"stream": true`, as
//! server-sent events:
//!
//! - `POST /v1/chat/completions` and `POST /v1/completions`: one chunk per
//!   completion token, then the usage chunk if
//!   `stream_options.include_usage`, then `[DONE]`;
//! - `POST /v1/responses`: `response.created`, one
//!   `response.output_text.delta` per completion token, then
//!   `response.completed` with the usage (always, as OpenAI does);
//! - `POST /v1/embeddings`: the input's tokens, no completion;
//! - any other `POST` under `/v1/`: a small JSON object, with a `usage`
//!   only if the request sets `mock_prompt_tokens` or
//!   `mock_completion_tokens`;
//! - `GET /v1/models`: a list.
//!
//! Usage is deterministic, so tests can predict it:
//!
//! - prompt tokens: the words of the text (messages' content, a prompt,
//!   an input, instructions), plus 3 per message (a Responses input
//!   string and its instructions are a message each);
//! - completion tokens: `max_completion_tokens` / `max_tokens` /
//!   `max_output_tokens`, at most 16.
//!
//! Requests may steer it with extra fields, which a real upstream would
//! ignore: `mock_prompt_tokens` and `mock_completion_tokens` set the
//! usage, `mock_status` answers that error status instead, `mock_delay_ms`
//! waits first, `mock_chunk_delay_ms` waits before each streamed token.
//!
//! `GET /mock/stats` reports the requests it served (errors not counted)
//! and the tokens it served: a JSON body's whole usage when it answers, a
//! stream's prompt when it starts and each completion token as its event
//! is handed to the connection, so that a stream the gateway stops reading
//! counts what really went out. Tests check the gateway's books against
//! these.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use http::{header, StatusCode};
use serde_json::{json, Value};

/// What the mock served.
#[derive(Debug, Default)]
pub struct MockStats {
    /// Requests served (errors not counted).
    pub calls: AtomicU64,
    /// Tokens served: prompts, and completions as they went out.
    pub total_tokens: AtomicU64,
}

/// The mock's router, and its counters.
pub fn router() -> (Router, Arc<MockStats>) {
    let stats = Arc::new(MockStats::default());
    let router = Router::new()
        .route("/v1/chat/completions", post(complete))
        .route("/v1/completions", post(complete))
        .route("/v1/responses", post(respond))
        .route("/v1/embeddings", post(embed))
        .route("/v1/models", get(models))
        .route("/v1/{*other}", post(other))
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

/// The usage the mock reports for a chat or completions `request`.
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
    (prompt, completion_of(request, "max_tokens"))
}

/// The usage the mock reports for a Responses `request`.
pub fn responses_usage_of(request: &Value) -> (u64, u64) {
    let message = |value: &Value| match value {
        Value::Null => 0,
        Value::String(text) => 3 + words(&Value::String(text.clone())),
        Value::Array(items) => items.iter().map(|i| 3 + words(&i["content"])).sum(),
        _ => 0,
    };
    let prompt = request["mock_prompt_tokens"]
        .as_u64()
        .unwrap_or_else(|| message(&request["instructions"]) + message(&request["input"]));
    (prompt, completion_of(request, "max_output_tokens"))
}

/// `mock_completion_tokens`, or the request's maximum (`max_field`, or
/// `max_completion_tokens`) capped at 16.
fn completion_of(request: &Value, max_field: &str) -> u64 {
    request["mock_completion_tokens"]
        .as_u64()
        .unwrap_or_else(|| {
            request["max_completion_tokens"]
                .as_u64()
                .or(request[max_field].as_u64())
                .unwrap_or(16)
                .min(16)
        })
}

/// The request's JSON, after its steering (`mock_delay_ms`,
/// `mock_status`), or the response that answers it instead.
async fn steered(body: &Bytes) -> Result<Value, Response> {
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return Err(error(StatusCode::BAD_REQUEST, "the body is not JSON"));
    };
    if let Some(ms) = request["mock_delay_ms"].as_u64() {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    if let Some(status) = request["mock_status"].as_u64() {
        let status = u16::try_from(status)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Err(error(status, "the mock was asked to fail"));
    }
    Ok(request)
}

/// Counts a served request and the tokens it served at once.
fn served(stats: &MockStats, tokens: u64) {
    stats.calls.fetch_add(1, Ordering::SeqCst);
    stats.total_tokens.fetch_add(tokens, Ordering::SeqCst);
}

fn usage_json(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn complete(State(stats): State<Arc<MockStats>>, body: Bytes) -> Response {
    let request = match steered(&body).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    let chat = request.get("messages").is_some();
    let (prompt, completion) = usage_of(&request);
    let usage = usage_json(prompt, completion);
    if request["stream"] == true {
        served(&stats, prompt);
        let with_usage = request["stream_options"]["include_usage"] == true;
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let chunk = |choices: Value, usage: Value| {
            let event = json!({"id": "mock-1", "object": object, "model": "mock-model", "choices": choices, "usage": usage});
            format!("data: {event}\n\n")
        };
        let delta = if chat {
            json!([{"index": 0, "delta": {"content": "tok "}}])
        } else {
            json!([{"index": 0, "text": "tok "}])
        };
        let mut last = Vec::new();
        if with_usage {
            last.push(chunk(json!([]), usage));
        }
        last.push("data: [DONE]\n\n".to_owned());
        let tokens = vec![chunk(delta, Value::Null); completion as usize];
        return event_stream(stats, &request, Vec::new(), tokens, last);
    }
    served(&stats, prompt + completion);
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

async fn respond(State(stats): State<Arc<MockStats>>, body: Bytes) -> Response {
    let request = match steered(&body).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    let (prompt, completion) = responses_usage_of(&request);
    let text = "tok ".repeat(completion as usize);
    let response = |status: &str, usage: Value| {
        json!({
            "id": "resp_mock",
            "object": "response",
            "status": status,
            "model": "mock-model",
            "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}],
            "usage": usage,
        })
    };
    let usage = json!({"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion});
    if request["stream"] == true {
        served(&stats, prompt);
        let event = |kind: &str, data: Value| format!("event: {kind}\ndata: {data}\n\n");
        let first = vec![event(
            "response.created",
            json!({"type": "response.created", "response": response("in_progress", Value::Null)}),
        )];
        let delta = event(
            "response.output_text.delta",
            json!({"type": "response.output_text.delta", "item_id": "msg_mock", "output_index": 0, "content_index": 0, "delta": "tok "}),
        );
        let last = vec![event(
            "response.completed",
            json!({"type": "response.completed", "response": response("completed", usage)}),
        )];
        let tokens = vec![delta; completion as usize];
        return event_stream(stats, &request, first, tokens, last);
    }
    served(&stats, prompt + completion);
    Json(response("completed", usage)).into_response()
}

async fn embed(State(stats): State<Arc<MockStats>>, body: Bytes) -> Response {
    let request = match steered(&body).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    let input = &request["input"];
    let prompt = request["mock_prompt_tokens"].as_u64().unwrap_or_else(|| {
        match input.as_array() {
            // Token arrays count their tokens; texts their words.
            Some(items) if items.iter().all(Value::is_number) => items.len() as u64,
            Some(items) if items.iter().all(Value::is_array) => items
                .iter()
                .map(|i| i.as_array().map_or(0, Vec::len) as u64)
                .sum(),
            _ => words(input),
        }
    });
    served(&stats, prompt);
    Json(json!({
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.5, 1.0]}],
        "model": "mock-embedding",
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }))
    .into_response()
}

async fn other(State(stats): State<Arc<MockStats>>, body: Bytes) -> Response {
    let request = match steered(&body).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    let (prompt, completion) = (
        request["mock_prompt_tokens"].as_u64(),
        request["mock_completion_tokens"].as_u64(),
    );
    if prompt.is_none() && completion.is_none() {
        served(&stats, 0);
        return Json(json!({"object": "mock.other"})).into_response();
    }
    let (prompt, completion) = (prompt.unwrap_or(0), completion.unwrap_or(0));
    served(&stats, prompt + completion);
    Json(json!({"object": "mock.other", "usage": usage_json(prompt, completion)})).into_response()
}

/// A stream of server-sent events: `first`, then `tokens` (one completion
/// token each, counted as served as each is handed to the connection,
/// after `mock_chunk_delay_ms`), then `last`.
fn event_stream(
    stats: Arc<MockStats>,
    request: &Value,
    first: Vec<String>,
    tokens: Vec<String>,
    last: Vec<String>,
) -> Response {
    let delay = Duration::from_millis(request["mock_chunk_delay_ms"].as_u64().unwrap_or(0));
    let first = futures_util::stream::iter(first);
    let tokens = futures_util::stream::iter(tokens).then(move |event| {
        let stats = stats.clone();
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            stats.total_tokens.fetch_add(1, Ordering::SeqCst);
            event
        }
    });
    let events = first
        .chain(tokens)
        .chain(futures_util::stream::iter(last))
        .map(|event| Ok::<_, Infallible>(Bytes::from(event)));
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(events),
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

    #[test]
    fn responses_usage_is_predictable() {
        let r = json!({"instructions": "be brief", "input": "a b c", "max_output_tokens": 4});
        assert_eq!(responses_usage_of(&r), ((3 + 2) + (3 + 3), 4));
        let r = json!({"input": [{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "input_text", "text": "b c"}]}]});
        assert_eq!(responses_usage_of(&r), ((3 + 1) + (3 + 2), 16));
    }
}
