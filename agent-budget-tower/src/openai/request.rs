//! The estimate of an OpenAI-style request, from its JSON body (pure).
//!
//! # How it works
//!
//! `/v1/chat/completions` and `/v1/completions` bodies are read into a
//! narrow view that borrows the text where it can: only the fields that
//! bear on the cost are looked at, the rest is skipped. The estimate is
//!
//! - **prompt**: the tokens of every message's text (plain content, text
//!   parts, names, tool calls' arguments) plus the per-message framing
//!   OpenAI documents (3 tokens per message, 1 per name, 3 to prime the
//!   reply), and the tool definitions' JSON; each non-text content part
//!   (an image, audio) counts [`NON_TEXT_PART_TOKENS`]. For completions,
//!   the prompt's text (a string, strings, or token arrays, whose length is
//!   their count).
//! - **completion**: `max_completion_tokens`, else `max_tokens`, else the
//!   configured default, times `n` (and times the number of prompts for
//!   completions), saturating.
//!
//! The counting itself is a [`TokenCounter`]: a real tokenizer where the
//! caller has one, or [`ByteCount`], the conservative bound (a byte-level
//! BPE token is at least one byte, so a text never has more tokens than
//! bytes; for English this reserves about four times the real count,
//! which the settle gives back).
//!
//! A body that is not JSON, not an object, or has a wrong type in a field
//! that matters (`"max_tokens": "lots"`, `-1`, `1e30`) is an error, which
//! the layer answers with `400` before anything is charged.
//!
//! For `"stream": true` the layer needs the upstream's usage, which
//! OpenAI sends only when asked: if the client did not set
//! `stream_options.include_usage`, the body is rewritten to ask, and the
//! estimate says to hide the usage chunk from the client.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::Estimate;

/// Tokens counted for a content part that is not text (an image, audio).
pub const NON_TEXT_PART_TOKENS: u64 = 1_000;
/// Framing tokens per chat message.
const TOKENS_PER_MESSAGE: u64 = 3;
/// Framing tokens per message name.
const TOKENS_PER_NAME: u64 = 1;
/// Tokens that prime the assistant's reply.
const REPLY_PRIMING: u64 = 3;
/// The most choices (`n`) a request may ask for.
const MAX_CHOICES: u64 = 128;

/// Counts the tokens of a text.
pub trait TokenCounter: Send + Sync + 'static {
    /// The tokens of `text`.
    fn count(&self, text: &str) -> u64;
}

/// The conservative count: one token per byte of UTF-8, an upper bound for
/// byte-level BPE tokenizers (GPT's, Llama 3's), about four times the real
/// count for English text.
#[derive(Clone, Copy, Debug, Default)]
pub struct ByteCount;

impl TokenCounter for ByteCount {
    fn count(&self, text: &str) -> u64 {
        text.len() as u64
    }
}

/// Which OpenAI endpoint a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `…/chat/completions`.
    Chat,
    /// `…/completions` (the legacy text completions).
    Completions,
    /// Anything else: not estimated from its body.
    Other,
}

impl Endpoint {
    /// The endpoint of a request path.
    pub fn of_path(path: &str) -> Self {
        let path = path.trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Endpoint::Chat
        } else if path.ends_with("/completions") {
            Endpoint::Completions
        } else {
            Endpoint::Other
        }
    }
}

/// Knobs of the estimate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EstimateOptions {
    /// Completion tokens reserved when a chat request sets no maximum.
    pub default_max_tokens: u64,
    /// Completion tokens reserved when a completions request sets no
    /// maximum (OpenAI's default there is 16).
    pub default_completions_max_tokens: u64,
}

impl Default for EstimateOptions {
    fn default() -> Self {
        EstimateOptions {
            default_max_tokens: 4_096,
            default_completions_max_tokens: 16,
        }
    }
}

/// A request body's estimate, and the body to forward if it had to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestEstimate {
    /// What to reserve (one call).
    pub estimate: Estimate,
    /// The body with `stream_options.include_usage` set, when the request
    /// streams and did not ask for usage itself.
    pub rewritten_body: Option<Bytes>,
}

/// The narrow view of a chat or completions body.
#[derive(Deserialize)]
struct Body<'a> {
    #[serde(default, borrow)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(default, borrow)]
    prompt: Option<Prompt<'a>>,
    #[serde(default, borrow)]
    tools: Option<&'a RawValue>,
    #[serde(default, borrow)]
    functions: Option<&'a RawValue>,
    #[serde(default)]
    max_tokens: Option<Value>,
    #[serde(default)]
    max_completion_tokens: Option<Value>,
    #[serde(default)]
    n: Option<Value>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(default, borrow)]
    content: Option<Content<'a>>,
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<&'a RawValue>,
    #[serde(default, borrow)]
    function_call: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Parts(#[serde(borrow)] Vec<Part<'a>>),
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Texts(#[serde(borrow)] Vec<Cow<'a, str>>),
    Tokens(Vec<u64>),
    TokenLists(Vec<Vec<u64>>),
}

/// The estimate of a chat or completions request body. Errors are
/// messages for a `400`.
pub fn estimate_body(
    endpoint: Endpoint,
    body: &[u8],
    counter: &dyn TokenCounter,
    options: &EstimateOptions,
) -> Result<RequestEstimate, String> {
    // serde would read a struct from an array too; a request is an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err("the request body must be a JSON object".to_owned());
    }
    let parsed: Body<'_> = serde_json::from_slice(body)
        .map_err(|e| format!("the request body is not a valid request: {e}"))?;
    let max = non_negative(
        "max_completion_tokens",
        parsed.max_completion_tokens.as_ref(),
    )?
    .or(non_negative("max_tokens", parsed.max_tokens.as_ref())?);
    let n = non_negative("n", parsed.n.as_ref())?.unwrap_or(1);
    if n == 0 || n > MAX_CHOICES {
        return Err(format!("n must be between 1 and {MAX_CHOICES}"));
    }
    let (prompt_tokens, prompts, default_max) = match endpoint {
        Endpoint::Completions => {
            let (tokens, prompts) = count_prompt(parsed.prompt.as_ref(), counter);
            (tokens, prompts, options.default_completions_max_tokens)
        }
        Endpoint::Chat | Endpoint::Other => (
            count_messages(&parsed, counter),
            1,
            options.default_max_tokens,
        ),
    };
    let completion_tokens = max
        .unwrap_or(default_max)
        .saturating_mul(n)
        .saturating_mul(prompts);
    let streams = parsed.stream == Some(true);
    let client_asked_usage = parsed
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let hide_usage_chunk = streams && !client_asked_usage;
    let rewritten_body = if hide_usage_chunk {
        Some(ask_for_usage(body)?)
    } else {
        None
    };
    Ok(RequestEstimate {
        estimate: Estimate {
            prompt_tokens,
            completion_tokens,
            calls: 1,
            hide_usage_chunk,
        },
        rewritten_body,
    })
}

/// A field that must be a non-negative integer, if present and not null.
fn non_negative(field: &str, value: Option<&Value>) -> Result<Option<u64>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("{field} must be a non-negative integer, not {v}")),
    }
}

fn count_messages(body: &Body<'_>, counter: &dyn TokenCounter) -> u64 {
    let mut tokens = 0u64;
    for message in body.messages.iter().flatten() {
        tokens = tokens.saturating_add(TOKENS_PER_MESSAGE);
        match &message.content {
            Some(Content::Text(text)) => tokens = tokens.saturating_add(counter.count(text)),
            Some(Content::Parts(parts)) => {
                for part in parts {
                    let part_tokens = match &part.text {
                        Some(text) => counter.count(text),
                        None => NON_TEXT_PART_TOKENS,
                    };
                    tokens = tokens.saturating_add(part_tokens);
                }
            }
            None => {}
        }
        if let Some(name) = &message.name {
            tokens = tokens
                .saturating_add(counter.count(name))
                .saturating_add(TOKENS_PER_NAME);
        }
        for raw in [message.tool_calls, message.function_call]
            .into_iter()
            .flatten()
        {
            tokens = tokens.saturating_add(counter.count(raw.get()));
        }
    }
    for raw in [body.tools, body.functions].into_iter().flatten() {
        tokens = tokens.saturating_add(counter.count(raw.get()));
    }
    if body.messages.is_some() {
        tokens = tokens.saturating_add(REPLY_PRIMING);
    }
    tokens
}

/// The prompt's tokens, and how many prompts it holds (each gets its own
/// completions).
fn count_prompt(prompt: Option<&Prompt<'_>>, counter: &dyn TokenCounter) -> (u64, u64) {
    let sum = |it: &mut dyn Iterator<Item = u64>| it.fold(0u64, u64::saturating_add);
    match prompt {
        None => (0, 1),
        Some(Prompt::Text(text)) => (counter.count(text), 1),
        Some(Prompt::Texts(texts)) => (
            sum(&mut texts.iter().map(|t| counter.count(t))),
            texts.len().max(1) as u64,
        ),
        Some(Prompt::Tokens(tokens)) => (tokens.len() as u64, 1),
        Some(Prompt::TokenLists(lists)) => (
            sum(&mut lists.iter().map(|l| l.len() as u64)),
            lists.len().max(1) as u64,
        ),
    }
}

/// The body with `stream_options.include_usage` set to `true`, everything
/// else as it was.
fn ask_for_usage(body: &[u8]) -> Result<Bytes, String> {
    let mut value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the request body is not JSON: {e}"))?;
    let object = value
        .as_object_mut()
        .ok_or("the request body must be a JSON object")?;
    let options = object
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Default::default()));
    if !options.is_object() {
        *options = Value::Object(Default::default());
    }
    if let Some(options) = options.as_object_mut() {
        options.insert("include_usage".to_owned(), Value::Bool(true));
    }
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(|e| format!("cannot rewrite the request body: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per whitespace-separated word: easy to count by eye.
    struct Words;
    impl TokenCounter for Words {
        fn count(&self, text: &str) -> u64 {
            text.split_whitespace().count() as u64
        }
    }

    fn chat(body: &str) -> Result<RequestEstimate, String> {
        estimate_body(
            Endpoint::Chat,
            body.as_bytes(),
            &Words,
            &EstimateOptions::default(),
        )
    }

    fn completions(body: &str) -> Result<RequestEstimate, String> {
        estimate_body(
            Endpoint::Completions,
            body.as_bytes(),
            &Words,
            &EstimateOptions::default(),
        )
    }

    #[test]
    fn endpoints_are_told_apart_by_path() {
        assert_eq!(Endpoint::of_path("/v1/chat/completions"), Endpoint::Chat);
        assert_eq!(Endpoint::of_path("/v1/chat/completions/"), Endpoint::Chat);
        assert_eq!(Endpoint::of_path("/v1/completions"), Endpoint::Completions);
        assert_eq!(Endpoint::of_path("/v1/embeddings"), Endpoint::Other);
        assert_eq!(Endpoint::of_path("/"), Endpoint::Other);
    }

    #[test]
    fn a_chat_estimate_is_framed_prompt_plus_max_tokens() {
        let e = chat(r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hello there you","name":"bob"}],"max_tokens":50}"#).unwrap();
        // 2 messages × 3 + 2 + 3 words + name (1 + 1) + priming 3.
        assert_eq!(e.estimate.prompt_tokens, 6 + 5 + 2 + 3);
        assert_eq!(e.estimate.completion_tokens, 50);
        assert_eq!(e.estimate.calls, 1);
        assert!(!e.estimate.hide_usage_chunk);
        assert_eq!(e.rewritten_body, None);
    }

    #[test]
    fn max_completion_tokens_wins_and_n_multiplies() {
        let e =
            chat(r#"{"messages":[],"max_tokens":50,"max_completion_tokens":70,"n":3}"#).unwrap();
        assert_eq!(e.estimate.completion_tokens, 210);
        let e = chat(r#"{"messages":[],"max_tokens":null}"#).unwrap();
        assert_eq!(e.estimate.completion_tokens, 4_096);
    }

    #[test]
    fn content_parts_count_text_and_a_flat_rate_for_the_rest() {
        let e = chat(r#"{"messages":[{"role":"user","content":[{"type":"text","text":"one two"},{"type":"image_url","image_url":{"url":"data:..."}}]}],"max_tokens":1}"#).unwrap();
        assert_eq!(
            e.estimate.prompt_tokens,
            3 + 2 + NON_TEXT_PART_TOKENS + REPLY_PRIMING
        );
    }

    #[test]
    fn tools_and_tool_calls_count_as_their_json() {
        let e = chat(r#"{"messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"a b"}]}],"tools":[{"x": "y z"}],"max_tokens":0}"#).unwrap();
        // tool_calls `[{"id":"a b"}]` is 2 words, tools `[{"x": "y z"}]` 3.
        assert_eq!(e.estimate.prompt_tokens, 3 + 2 + 3 + REPLY_PRIMING);
    }

    #[test]
    fn completions_prompts_in_every_shape() {
        assert_eq!(
            completions(r#"{"prompt":"a b c"}"#).unwrap().estimate,
            Estimate {
                prompt_tokens: 3,
                completion_tokens: 16,
                calls: 1,
                hide_usage_chunk: false
            }
        );
        let e = completions(r#"{"prompt":["a b","c"],"max_tokens":10,"n":2}"#).unwrap();
        assert_eq!(
            (e.estimate.prompt_tokens, e.estimate.completion_tokens),
            (3, 40)
        );
        let e = completions(r#"{"prompt":[1,2,3,4],"max_tokens":5}"#).unwrap();
        assert_eq!(
            (e.estimate.prompt_tokens, e.estimate.completion_tokens),
            (4, 5)
        );
        let e = completions(r#"{"prompt":[[1,2],[3]],"max_tokens":5}"#).unwrap();
        assert_eq!(
            (e.estimate.prompt_tokens, e.estimate.completion_tokens),
            (3, 10)
        );
    }

    #[test]
    fn a_stream_without_usage_is_rewritten_to_ask_for_it() {
        let e =
            chat(r#"{"messages":[],"stream":true,"max_tokens":5,"extra":{"kept":[1,2]}}"#).unwrap();
        assert!(e.estimate.hide_usage_chunk);
        let body: Value = serde_json::from_slice(&e.rewritten_body.unwrap()).unwrap();
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["extra"]["kept"][1], 2);
        assert_eq!(body["stream"], true);

        let e = chat(r#"{"messages":[],"stream":true,"stream_options":{"include_usage":true}}"#)
            .unwrap();
        assert!(!e.estimate.hide_usage_chunk);
        assert_eq!(e.rewritten_body, None);

        let e = chat(
            r#"{"messages":[],"stream":true,"stream_options":{"include_usage":false,"other":1}}"#,
        )
        .unwrap();
        let body: Value = serde_json::from_slice(&e.rewritten_body.unwrap()).unwrap();
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["stream_options"]["other"], 1);
    }

    #[test]
    fn bad_bodies_are_errors_not_panics() {
        for bad in [
            "",
            "not json",
            "[1,2]",
            "[]",
            "[[], null]",
            "null",
            r#"{"messages":"x"}"#,
            r#"{"messages":[],"max_tokens":-1}"#,
            r#"{"messages":[],"max_tokens":1e30}"#,
            r#"{"messages":[],"max_tokens":"lots"}"#,
            r#"{"messages":[],"max_tokens":1.5}"#,
            r#"{"messages":[],"max_tokens":99999999999999999999999}"#,
            r#"{"messages":[],"n":0}"#,
            r#"{"messages":[],"n":1000}"#,
            r#"{"messages":[],"stream":"yes"}"#,
            r#"{"messages":[{"content":5}]}"#,
            "{\"messages\":[{\"content\":\"\u{0}\"}]",
        ] {
            assert!(chat(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn huge_but_valid_numbers_saturate() {
        let e = chat(&format!(
            r#"{{"messages":[],"max_tokens":{},"n":128}}"#,
            u64::MAX
        ))
        .unwrap();
        assert_eq!(e.estimate.completion_tokens, u64::MAX);
        assert_eq!(e.estimate.tokens(), u64::MAX);
    }

    #[test]
    fn escaped_text_is_counted_too() {
        let e = chat(r#"{"messages":[{"content":"a\nb \u00e9"}],"max_tokens":0}"#).unwrap();
        // Three words once unescaped: "a", "b", "é".
        assert_eq!(e.estimate.prompt_tokens, 3 + 3 + REPLY_PRIMING);
    }

    #[test]
    fn byte_count_is_the_utf8_length() {
        assert_eq!(ByteCount.count("héllo"), 6);
        assert_eq!(ByteCount.count(""), 0);
    }
}
