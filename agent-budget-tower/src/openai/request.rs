//! The estimate of an OpenAI-style request, from its path and JSON body
//! (pure).
//!
//! # How it works
//!
//! Four endpoints consume tokens, and each is estimated from its body
//! ([`estimate_body`]), read into a narrow view that borrows the text
//! where it can (only the fields that bear on the cost are looked at):
//!
//! | endpoint | prompt | completion |
//! |---|---|---|
//! | `…/chat/completions` | every message's text, names, tool calls, plus OpenAI's framing (3 tokens a message, 1 a name, 3 to prime the reply); tool definitions and `response_format` as their JSON | `max_completion_tokens`, else `max_tokens`, else the default, × `n` |
//! | `…/completions` | the prompt: a string, strings, or token arrays (whose length is their count) | `max_tokens`, else the default (16), × `max(n, best_of)` × the number of prompts |
//! | `…/responses` | `instructions`, and `input` (a string, or items: messages counted like chat's, any other item as its JSON), tools and `text` as their JSON | `max_output_tokens` (reasoning included), else the default |
//! | `…/embeddings` | `input`, in the same shapes as a completions prompt | none |
//!
//! Each non-text content part (an image, audio, a file) counts
//! [`NON_TEXT_PART_TOKENS`]. Every estimate is at least one token, so that
//! an exhausted token budget refuses every metered request. State the
//! upstream keeps (a Responses request's `previous_response_id` or
//! `conversation`, stored files) cannot be counted here: it is charged
//! when the response reports its usage.
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
//! For a streamed chat or completions request the layer needs the
//! upstream's usage, which OpenAI sends only when asked: if the client did
//! not set `stream_options.include_usage`, the body is rewritten to ask,
//! and the estimate says to hide the usage chunk from the client. A
//! Responses stream always ends with its usage (in `response.completed`),
//! so nothing is rewritten.

use bytes::Bytes;
use serde_json::Value;

use super::scan::{Cursor, Fields, JsonStr};
use super::{chat, embeddings, responses};
use crate::Estimate;

/// Tokens counted for a content part that is not text (an image, audio, a
/// file).
pub const NON_TEXT_PART_TOKENS: u64 = 1_000;

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
#[non_exhaustive]
pub enum Endpoint {
    /// `…/chat/completions`.
    Chat,
    /// `…/completions` (the legacy text completions).
    Completions,
    /// `…/responses`: the Responses API.
    Responses,
    /// `…/embeddings`.
    Embeddings,
    /// Anything else: not estimated from its body.
    Other,
}

impl Endpoint {
    /// The endpoint of a request path, by its last segments (a trailing
    /// `/` allowed). The path should be [normalized](crate::path::normalize)
    /// first: this compares it as it is spelled.
    pub fn of_path(path: &str) -> Self {
        let path = path.strip_suffix('/').unwrap_or(path);
        if path.ends_with("/chat/completions") {
            Endpoint::Chat
        } else if path.ends_with("/completions") {
            Endpoint::Completions
        } else if path.ends_with("/responses") {
            Endpoint::Responses
        } else if path.ends_with("/embeddings") {
            Endpoint::Embeddings
        } else {
            Endpoint::Other
        }
    }
}

/// Knobs of the estimate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EstimateOptions {
    /// Completion tokens reserved when a chat or Responses request sets no
    /// maximum.
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
    /// The body with `stream_options.include_usage` set, when a chat or
    /// completions request streams and did not ask for usage itself.
    pub rewritten_body: Option<Bytes>,
}

/// What an endpoint's view of a body says about its cost.
pub(super) struct Cost {
    pub(super) prompt_tokens: u64,
    pub(super) completion_tokens: u64,
    /// Streams without asking for usage (chat and completions only).
    pub(super) needs_usage_asked: bool,
    /// The body's top-level `"model"`, read in the same pass.
    pub(super) model: ModelName,
}

/// A body's top-level `"model"`, as the pass that read its cost found it:
/// where it is in the body when written without escapes (sliced out of
/// the body's `Bytes` later, no copy), else decoded. Every view reads it,
/// so a duplicate or a model that is not a string is refused with the
/// rest of the body's errors, instead of leaving the request without a
/// model (and so outside every per-model limit).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) enum ModelName {
    /// None, or `null`.
    #[default]
    Absent,
    /// The bytes of the body between the string's quotes.
    At(std::ops::Range<usize>),
    /// Written with escapes: the decoded text.
    Decoded(String),
}

/// A `"model"` as serde reads it into the endpoints' views: borrowed from
/// the body where it can be (serde borrows a `Cow` only as a struct's
/// field, not inside an `Option`).
#[derive(Clone, serde::Deserialize)]
pub(super) struct ModelField<'a>(#[serde(borrow)] pub(super) std::borrow::Cow<'a, str>);

impl ModelName {
    /// The model a serde view of `body` read: borrowed from the body
    /// where serde could (no escapes), decoded where it could not.
    pub(super) fn of(body: &[u8], model: Option<ModelField<'_>>) -> Self {
        match model.map(|m| m.0) {
            None => ModelName::Absent,
            Some(std::borrow::Cow::Borrowed(text)) => ModelName::within(body, text),
            Some(std::borrow::Cow::Owned(text)) => ModelName::Decoded(text),
        }
    }

    /// `text`, a slice of `body`, by its place in it.
    pub(super) fn within(body: &[u8], text: &str) -> Self {
        let start = text.as_ptr() as usize - body.as_ptr() as usize;
        ModelName::At(start..start + text.len())
    }

    /// The model as a slice of `body` (the bytes it was read from).
    fn slice_of(self, body: &Bytes) -> Option<Bytes> {
        match self {
            ModelName::Absent => None,
            ModelName::At(range) => Some(body.slice(range)),
            ModelName::Decoded(text) => Some(Bytes::from(text)),
        }
    }

    /// The model copied out of `body` (the bytes it was read from).
    fn copied_from(self, body: &[u8]) -> Option<Bytes> {
        match self {
            ModelName::Absent => None,
            ModelName::At(range) => Some(Bytes::copy_from_slice(&body[range])),
            ModelName::Decoded(text) => Some(Bytes::from(text)),
        }
    }
}

/// The estimate of a request body to `endpoint`, with its top-level
/// `model` (read in the same pass). Errors are messages for a `400`
/// (a `model` given twice, or not a string, is one); [`Endpoint::Other`]
/// is one (it has no body to estimate).
pub fn estimate_body(
    endpoint: Endpoint,
    body: &[u8],
    counter: &dyn TokenCounter,
    options: &EstimateOptions,
) -> Result<RequestEstimate, String> {
    estimate_with_model(endpoint, body, counter, options)
        .map(|(estimated, model)| estimated.with_model(model.copied_from(body)))
}

/// [`estimate_body`] of a body held as `Bytes`: its model is a slice of
/// them, not a copy.
pub(crate) fn estimate_bytes(
    endpoint: Endpoint,
    body: &Bytes,
    counter: &dyn TokenCounter,
    options: &EstimateOptions,
) -> Result<RequestEstimate, String> {
    estimate_with_model(endpoint, body, counter, options)
        .map(|(estimated, model)| estimated.with_model(model.slice_of(body)))
}

/// The estimate of a body without its model, and its model.
fn estimate_with_model(
    endpoint: Endpoint,
    body: &[u8],
    counter: &dyn TokenCounter,
    options: &EstimateOptions,
) -> Result<(RequestEstimate, ModelName), String> {
    let cost = cost(endpoint, body, counter, options)?;
    let rewritten_body = if cost.needs_usage_asked {
        Some(ask_for_usage(body)?)
    } else {
        None
    };
    let estimated = RequestEstimate {
        estimate: Estimate {
            prompt_tokens: cost.prompt_tokens.max(1),
            completion_tokens: cost.completion_tokens,
            calls: 1,
            hide_usage_chunk: cost.needs_usage_asked,
            deferred_count: None,
            model: None,
        },
        rewritten_body,
    };
    Ok((estimated, cost.model))
}

impl RequestEstimate {
    fn with_model(mut self, model: Option<Bytes>) -> Self {
        self.estimate.model = model;
        self
    }
}

/// The top-level `"model"` of a request body, as a slice of it (no copy)
/// when it is written without escapes, else decoded; `None` when the body
/// names none (or is not a JSON object, which the estimate refuses).
pub fn request_model(body: &Bytes) -> Option<Bytes> {
    match fast_model(body) {
        Some(found) => found.slice_of(body),
        None => {
            #[derive(serde::Deserialize)]
            struct Model {
                #[serde(default)]
                model: Option<String>,
            }
            let parsed: Model = serde_json::from_slice(body).ok()?;
            parsed.model.map(Bytes::from)
        }
    }
}

/// [`request_model`] by the strict reader: where the model is; `None`
/// for a body it leaves to serde (an escaped model, a duplicate key).
fn fast_model(body: &[u8]) -> Option<ModelName> {
    let mut cursor = Cursor::new(body)?;
    let mut found = ModelName::Absent;
    let mut seen = Fields::default();
    cursor.object(|c, key| {
        if key == "model" {
            seen.first(0)?;
            found = ModelName::within(body, c.string()?.text()?);
        } else {
            c.skip()?;
        }
        Some(())
    })?;
    Some(found)
}

/// The prompt tokens of a body [`estimate_body`] accepts, as it counts
/// them (at least one); `None` for a body it refuses.
pub fn prompt_tokens(
    endpoint: Endpoint,
    body: &[u8],
    counter: &dyn TokenCounter,
    options: &EstimateOptions,
) -> Option<u64> {
    cost(endpoint, body, counter, options)
        .ok()
        .map(|cost| cost.prompt_tokens.max(1))
}

fn cost(
    endpoint: Endpoint,
    body: &[u8],
    counter: &dyn TokenCounter,
    options: &EstimateOptions,
) -> Result<Cost, String> {
    // serde would read a struct from an array too; a request is an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err("the request body must be a JSON object".to_owned());
    }
    match endpoint {
        Endpoint::Chat => chat::chat_cost(body, counter, options),
        Endpoint::Completions => chat::completions_cost(body, counter, options),
        Endpoint::Responses => responses::cost(body, counter, options),
        Endpoint::Embeddings => embeddings::cost(body, counter),
        Endpoint::Other => Err("this endpoint is not estimated from its body".to_owned()),
    }
}

/// Parses a body into an endpoint's view, with the message the `400`
/// gives when it cannot.
pub(super) fn parse<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, String> {
    serde_json::from_slice(body)
        .map_err(|e| format!("the request body is not a valid request: {e}"))
}

/// A field that must be a non-negative integer, if present and not null.
pub(super) fn non_negative(field: &str, value: Option<&Value>) -> Result<Option<u64>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("{field} must be a non-negative integer, not {v}")),
    }
}

/// The sum of `counts`, saturating.
pub(super) fn saturating_sum(counts: impl IntoIterator<Item = u64>) -> u64 {
    counts.into_iter().fold(0, u64::saturating_add)
}

/// The body with `stream_options.include_usage` set to `true`, everything
/// else as it was, byte for byte: the few bytes are spliced in where they
/// go (a number serde_json would round, `99999999999999999999` or
/// `1e400`, a key's order, the spacing, all stay as the client wrote
/// them, and nothing is parsed into a tree and written out again).
///
/// The body is one that an endpoint's view accepted: an object, with at
/// most one `stream_options`, an object or `null`. One the strict reader
/// leaves to serde (nesting past 64, a skipped string that is not UTF-8)
/// is parsed and written out again.
fn ask_for_usage(body: &[u8]) -> Result<Bytes, String> {
    let Some((open, options)) = find_member(body, "stream_options") else {
        return rewrite_asking_for_usage(body);
    };
    let unusable = || "cannot ask the upstream for the stream's usage".to_owned();
    let (at, cut, insert): (usize, usize, &[u8]) = match options {
        // No options: the field, first in the object.
        None => {
            let empty = body[open + 1..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
            let field: &[u8] = if empty {
                br#""stream_options":{"include_usage":true}"#
            } else {
                br#""stream_options":{"include_usage":true},"#
            };
            (open + 1, 0, field)
        }
        Some(span) if &body[span.clone()] == b"null" => {
            (span.start, span.len(), br#"{"include_usage":true}"#)
        }
        // Options: their `include_usage` set to true, or added first.
        Some(span) => {
            let (_, usage) =
                find_member(&body[span.clone()], "include_usage").ok_or_else(unusable)?;
            match usage {
                Some(value) => (span.start + value.start, value.len(), b"true"),
                None if body[span.start + 1..span.end - 1].trim_ascii().is_empty() => {
                    (span.start + 1, 0, br#""include_usage":true"#)
                }
                None => (span.start + 1, 0, br#""include_usage":true,"#),
            }
        }
    };
    let mut rewritten = Vec::with_capacity(body.len() + insert.len());
    rewritten.extend_from_slice(&body[..at]);
    rewritten.extend_from_slice(insert);
    rewritten.extend_from_slice(&body[at + cut..]);
    Ok(Bytes::from(rewritten))
}

/// [`ask_for_usage`] through a `serde_json::Value`: the body written out
/// again (numbers beyond `f64` rounded or refused, keys re-ordered).
fn rewrite_asking_for_usage(body: &[u8]) -> Result<Bytes, String> {
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

/// The object `json` holds: where its `{` is, and where the value of its
/// member `name` (escapes in keys decoded) lies, if it has one.
fn find_member(json: &[u8], name: &str) -> Option<(usize, Option<std::ops::Range<usize>>)> {
    let mut cursor = Cursor::new(json)?;
    let open = cursor.position();
    let mut found = None;
    cursor.members(|c, key| {
        let start = c.position();
        let value = c.skip()?;
        if key_is(key, name)? {
            found = Some(start..start + value.len());
        }
        Some(())
    })?;
    Some((open, found))
}

/// Whether an object's key is `name`, escapes decoded; `None` if an
/// escape is malformed.
fn key_is(key: JsonStr<'_>, name: &str) -> Option<bool> {
    match key.text() {
        Some(text) => Some(text == name),
        None => {
            let decoded: String = serde_json::from_str(&format!("\"{}\"", key.raw)).ok()?;
            Some(decoded == name)
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// One token per whitespace-separated word: easy to count by eye.
    pub(in crate::openai) struct Words;
    impl TokenCounter for Words {
        fn count(&self, text: &str) -> u64 {
            text.split_whitespace().count() as u64
        }
    }

    pub(in crate::openai) fn estimate(
        endpoint: Endpoint,
        body: &str,
    ) -> Result<RequestEstimate, String> {
        estimate_body(
            endpoint,
            body.as_bytes(),
            &Words,
            &EstimateOptions::default(),
        )
    }

    #[test]
    fn endpoints_are_told_apart_by_path() {
        for (path, endpoint) in [
            ("/v1/chat/completions", Endpoint::Chat),
            ("/v1/chat/completions/", Endpoint::Chat),
            ("/v1/completions", Endpoint::Completions),
            ("/v1/responses", Endpoint::Responses),
            ("/openai/v1/responses/", Endpoint::Responses),
            ("/v1/embeddings", Endpoint::Embeddings),
            ("/v1/responses/resp_1", Endpoint::Other),
            ("/v1/responses/resp_1/cancel", Endpoint::Other),
            ("/v1/chat/completions/chatcmpl-1", Endpoint::Other),
            ("/v1/chat/xcompletions", Endpoint::Other),
            ("/v1/audio/speech", Endpoint::Other),
            ("/v1/models", Endpoint::Other),
            ("/", Endpoint::Other),
        ] {
            assert_eq!(Endpoint::of_path(path), endpoint, "{path}");
        }
    }

    #[test]
    fn bodies_that_are_not_objects_are_errors_for_every_endpoint() {
        for endpoint in [
            Endpoint::Chat,
            Endpoint::Completions,
            Endpoint::Responses,
            Endpoint::Embeddings,
        ] {
            for bad in ["", "not json", "[1,2]", "[]", "null", "{", "{\"a\":1} x"] {
                assert!(estimate(endpoint, bad).is_err(), "{endpoint:?} {bad:?}");
            }
        }
        assert!(estimate(Endpoint::Other, "{}").is_err());
    }

    #[test]
    fn every_estimate_is_at_least_one_token() {
        for (endpoint, body) in [
            (Endpoint::Embeddings, r#"{"input":""}"#),
            (Endpoint::Embeddings, r#"{"input":[]}"#),
            (Endpoint::Completions, r#"{"prompt":"","max_tokens":0}"#),
            (Endpoint::Responses, r#"{"max_output_tokens":0}"#),
        ] {
            assert!(
                estimate(endpoint, body).unwrap().estimate.tokens() >= 1,
                "{body}"
            );
        }
    }

    /// The rewritten body of a stream that did not ask for its usage.
    fn rewritten(body: &str) -> String {
        let e = estimate(Endpoint::Chat, body).unwrap();
        assert!(e.estimate.hide_usage_chunk, "{body}");
        String::from_utf8(e.rewritten_body.unwrap().to_vec()).unwrap()
    }

    #[test]
    fn a_streams_body_is_spliced_not_rewritten() {
        // Numbers serde_json would round or refuse, the keys' order and the
        // spacing stay as written.
        let body =
            r#"{"stream":true, "messages":[], "seed":99999999999999999999, "x":1e400, "y":-0.0}"#;
        assert_eq!(
            rewritten(body),
            r#"{"stream_options":{"include_usage":true},"stream":true, "messages":[], "seed":99999999999999999999, "x":1e400, "y":-0.0}"#
        );
        for (before, after) in [
            (
                r#" { "messages":[],"stream":true,"stream_options":null } "#,
                r#" { "messages":[],"stream":true,"stream_options":{"include_usage":true} } "#,
            ),
            (
                r#"{"messages":[],"stream":true,"stream_options":{"include_usage":false,"other":1e400}}"#,
                r#"{"messages":[],"stream":true,"stream_options":{"include_usage":true,"other":1e400}}"#,
            ),
            (
                r#"{"messages":[],"stream":true,"stream_options":{"include_usage":null}}"#,
                r#"{"messages":[],"stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"messages":[],"stream":true,"stream_options":{ }}"#,
                r#"{"messages":[],"stream":true,"stream_options":{"include_usage":true }}"#,
            ),
            (
                r#"{"messages":[],"stream":true,"stream_options":{"other":[1,{"include_usage":false}]}}"#,
                r#"{"messages":[],"stream":true,"stream_options":{"include_usage":true,"other":[1,{"include_usage":false}]}}"#,
            ),
            (
                r#"{"messages":[],"stream":true,"stre\u0061m_options":{"include\u005fusage":false}}"#,
                r#"{"messages":[],"stream":true,"stre\u0061m_options":{"include\u005fusage":true}}"#,
            ),
            (
                r#"{"messages":[{"content":"\"stream_options\":null"}],"stream":true}"#,
                r#"{"stream_options":{"include_usage":true},"messages":[{"content":"\"stream_options\":null"}],"stream":true}"#,
            ),
        ] {
            assert_eq!(rewritten(before), after, "{before}");
            #[derive(serde::Deserialize)]
            struct Asked {
                stream_options: Options,
            }
            #[derive(serde::Deserialize)]
            struct Options {
                include_usage: bool,
            }
            let asked: Asked = serde_json::from_str(after).unwrap();
            assert!(asked.stream_options.include_usage, "{after}");
        }
        // Deeper than the strict reader goes: serde's tree, written out.
        let deep = format!(
            r#"{{"messages":[],"stream":true,"x":{}1{}}}"#,
            "[".repeat(70),
            "]".repeat(70)
        );
        let body: Value = serde_json::from_str(&rewritten(&deep)).unwrap();
        assert_eq!(body["stream_options"]["include_usage"], true);
        let e = estimate(Endpoint::Completions, r#"{"prompt":"a","stream":true}"#).unwrap();
        assert_eq!(
            e.rewritten_body.unwrap(),
            r#"{"stream_options":{"include_usage":true},"prompt":"a","stream":true}"#
        );
    }

    #[test]
    fn byte_count_is_the_utf8_length() {
        assert_eq!(ByteCount.count("héllo"), 6);
        assert_eq!(ByteCount.count(""), 0);
    }

    #[test]
    fn every_endpoints_estimate_carries_the_model_it_read() {
        for (endpoint, rest) in [
            (
                Endpoint::Chat,
                r#""messages":[{"role":"user","content":"hi"}]"#,
            ),
            (Endpoint::Completions, r#""prompt":"hi""#),
            (Endpoint::Responses, r#""input":"hi""#),
            (Endpoint::Embeddings, r#""input":"hi""#),
        ] {
            let model = |model: &str| {
                estimate(endpoint, &format!("{{{rest},\"model\":{model}}}"))
                    .map(|e| e.estimate.model)
            };
            assert_eq!(
                model(r#""gpt-4o""#),
                Ok(Some(Bytes::from_static(b"gpt-4o"))),
                "{endpoint:?}"
            );
            assert_eq!(
                model(r#""gpt-\u0034o""#),
                Ok(Some(Bytes::from_static(b"gpt-4o"))),
                "{endpoint:?}: escaped, decoded"
            );
            assert_eq!(model("null"), Ok(None), "{endpoint:?}");
            assert_eq!(
                estimate(endpoint, &format!("{{{rest}}}")).map(|e| e.estimate.model),
                Ok(None),
                "{endpoint:?}"
            );
            // Either would leave the request outside every per-model
            // limit, while the upstream picks a model.
            assert!(model("5").is_err(), "{endpoint:?}: not a string");
            assert!(
                model(r#""cheap","model":"gpt-4o""#).is_err(),
                "{endpoint:?}: named twice"
            );
        }
    }

    #[test]
    fn the_model_is_read_from_the_top_level() {
        let model = |body: &str| request_model(&Bytes::from(body.to_owned()));
        assert_eq!(
            model(r#"{"messages":[{"model":"inner"}],"model":"gpt-4o-mini"}"#).as_deref(),
            Some(&b"gpt-4o-mini"[..])
        );
        assert_eq!(
            model(r#"{"model":"gpt-\u0034o"}"#).as_deref(),
            Some(&b"gpt-4o"[..]),
            "escaped: decoded by serde"
        );
        assert_eq!(model(r#"{"messages":[]}"#), None);
        assert_eq!(model(r#"{"model":null}"#), None);
        assert_eq!(model(r#"{"model":5}"#), None);
        assert_eq!(model("[1]"), None);
    }
}
