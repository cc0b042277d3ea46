//! Chat completions and the legacy completions: their bodies' cost.
//!
//! A chat body's prompt is its messages (text, names, tool calls) with
//! OpenAI's framing, its tool definitions and its `response_format`; its
//! completion is `max_completion_tokens` (else `max_tokens`, else the
//! default) for each of its `n` choices. A completions body's prompt is a
//! string, strings, or token arrays, each prompt getting `max_tokens` for
//! each of `max(n, best_of)` completions (the upstream generates `best_of`
//! and returns `n`).

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::request::{
    non_negative, parse, saturating_sum, Cost, EstimateOptions, ModelField, ModelName,
    TokenCounter, NON_TEXT_PART_TOKENS,
};
use super::scan::{Cursor, Fields};

/// Framing tokens per chat message.
pub(super) const TOKENS_PER_MESSAGE: u64 = 3;
/// Framing tokens per message name.
const TOKENS_PER_NAME: u64 = 1;
/// Tokens that prime the assistant's reply.
pub(super) const REPLY_PRIMING: u64 = 3;
/// The most choices (`n`, `best_of`) a request may ask for.
const MAX_CHOICES: u64 = 128;

/// The narrow view of a chat body.
#[derive(Deserialize)]
struct ChatBody<'a> {
    #[serde(default, borrow)]
    model: Option<ModelField<'a>>,
    #[serde(default, borrow)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(default, borrow)]
    tools: Option<&'a RawValue>,
    #[serde(default, borrow)]
    functions: Option<&'a RawValue>,
    #[serde(default, borrow)]
    response_format: Option<&'a RawValue>,
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

/// The narrow view of a completions body.
#[derive(Deserialize)]
struct CompletionsBody<'a> {
    #[serde(default, borrow)]
    model: Option<ModelField<'a>>,
    #[serde(default, borrow)]
    prompt: Option<Prompt<'a>>,
    #[serde(default)]
    max_tokens: Option<Value>,
    #[serde(default)]
    n: Option<Value>,
    #[serde(default)]
    best_of: Option<Value>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

/// Whether a body streams without asking for its usage (so the layer
/// must ask).
fn needs_usage_asked(stream: Option<bool>, options: Option<&StreamOptions>) -> bool {
    let asked = options.and_then(|o| o.include_usage).unwrap_or(false);
    stream == Some(true) && !asked
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

/// A message's content: a string, or parts (text and otherwise). The
/// Responses API's input messages have the same shape.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Content<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Parts(#[serde(borrow)] Vec<Part<'a>>),
}

#[derive(Deserialize)]
pub(super) struct Part<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

impl Content<'_> {
    /// The content's tokens: its text, and a flat rate per part that is
    /// not text.
    pub(super) fn tokens(&self, counter: &dyn TokenCounter) -> u64 {
        match self {
            Content::Text(text) => counter.count(text),
            Content::Parts(parts) => saturating_sum(parts.iter().map(|part| match &part.text {
                Some(text) => counter.count(text),
                None => NON_TEXT_PART_TOKENS,
            })),
        }
    }
}

/// A completions prompt, or an embeddings input: text, texts, or token
/// arrays.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Prompt<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Texts(#[serde(borrow)] Vec<Cow<'a, str>>),
    Tokens(Vec<u64>),
    TokenLists(Vec<Vec<u64>>),
}

impl Prompt<'_> {
    /// The tokens of every prompt, and how many prompts there are (each
    /// gets its own completions).
    pub(super) fn tokens(&self, counter: &dyn TokenCounter) -> (u64, u64) {
        match self {
            Prompt::Text(text) => (counter.count(text), 1),
            Prompt::Texts(texts) => (
                saturating_sum(texts.iter().map(|t| counter.count(t))),
                texts.len().max(1) as u64,
            ),
            Prompt::Tokens(tokens) => (tokens.len() as u64, 1),
            Prompt::TokenLists(lists) => (
                saturating_sum(lists.iter().map(|l| l.len() as u64)),
                lists.len().max(1) as u64,
            ),
        }
    }
}

/// What a chat body says about its cost, however it was read.
#[derive(Debug, Default, PartialEq, Eq)]
struct ChatFacts {
    model: ModelName,
    prompt_tokens: u64,
    max_completion_tokens: Option<u64>,
    max_tokens: Option<u64>,
    n: Option<u64>,
    stream: Option<bool>,
    /// `stream_options.include_usage`.
    include_usage: Option<bool>,
}

/// The cost of a chat completions body: read by the [fast path](fast_chat)
/// where it can, else by serde.
pub(super) fn chat_cost(
    body: &[u8],
    counter: &dyn TokenCounter,
    options: &EstimateOptions,
) -> Result<Cost, String> {
    let facts = match fast_chat(body, counter) {
        Some(facts) => facts,
        None => serde_chat(body, counter)?,
    };
    let max = facts.max_completion_tokens.or(facts.max_tokens);
    let n = choices("n", facts.n)?;
    Ok(Cost {
        prompt_tokens: facts.prompt_tokens,
        completion_tokens: max.unwrap_or(options.default_max_tokens).saturating_mul(n),
        needs_usage_asked: facts.stream == Some(true) && facts.include_usage != Some(true),
        model: facts.model,
    })
}

/// A chat body read by serde into its narrow view: any body, with serde's
/// errors.
fn serde_chat(body: &[u8], counter: &dyn TokenCounter) -> Result<ChatFacts, String> {
    let parsed: ChatBody<'_> = parse(body)?;
    Ok(ChatFacts {
        model: ModelName::of(body, parsed.model.clone()),
        prompt_tokens: count_messages(&parsed, counter),
        max_completion_tokens: non_negative(
            "max_completion_tokens",
            parsed.max_completion_tokens.as_ref(),
        )?,
        max_tokens: non_negative("max_tokens", parsed.max_tokens.as_ref())?,
        n: non_negative("n", parsed.n.as_ref())?,
        stream: parsed.stream,
        include_usage: parsed.stream_options.and_then(|o| o.include_usage),
    })
}

/// A chat body read by the [strict reader](super::scan), or `None` for
/// anything it leaves to serde: escapes in the text it counts, numbers
/// other than plain integers, duplicate fields, unexpected types. Where it
/// answers, it answers as [`serde_chat`] does.
fn fast_chat(body: &[u8], counter: &dyn TokenCounter) -> Option<ChatFacts> {
    let mut cursor = Cursor::new(body)?;
    let mut facts = ChatFacts::default();
    let mut seen = Fields::default();
    cursor.object(|c, key| {
        match key {
            "model" => {
                seen.first(9)?;
                if let Some(model) = c.optional(Cursor::string)? {
                    facts.model = ModelName::within(body, model.text()?);
                }
            }
            "messages" => {
                seen.first(0)?;
                if !c.null()? {
                    let messages = fast_messages(c, counter)?;
                    facts.prompt_tokens = facts
                        .prompt_tokens
                        .saturating_add(messages)
                        .saturating_add(REPLY_PRIMING);
                }
            }
            "tools" | "functions" | "response_format" => {
                seen.first(match key {
                    "tools" => 1,
                    "functions" => 2,
                    _ => 3,
                })?;
                if !c.null()? {
                    let raw = counter.count(c.skip()?);
                    facts.prompt_tokens = facts.prompt_tokens.saturating_add(raw);
                }
            }
            "max_tokens" => {
                seen.first(4)?;
                facts.max_tokens = c.optional(Cursor::integer)?;
            }
            "max_completion_tokens" => {
                seen.first(5)?;
                facts.max_completion_tokens = c.optional(Cursor::integer)?;
            }
            "n" => {
                seen.first(6)?;
                facts.n = c.optional(Cursor::integer)?;
            }
            "stream" => {
                seen.first(7)?;
                facts.stream = c.optional(Cursor::boolean)?;
            }
            "stream_options" => {
                seen.first(8)?;
                if !c.null()? {
                    let mut seen = Fields::default();
                    c.object(|c, key| {
                        if key == "include_usage" {
                            seen.first(0)?;
                            facts.include_usage = c.optional(Cursor::boolean)?;
                        } else {
                            c.skip()?;
                        }
                        Some(())
                    })?;
                }
            }
            _ => {
                c.skip()?;
            }
        }
        Some(())
    })?;
    cursor.end()?;
    Some(facts)
}

/// The messages' tokens, with their framing.
fn fast_messages(c: &mut Cursor<'_>, counter: &dyn TokenCounter) -> Option<u64> {
    let mut tokens = 0u64;
    c.array(|c| {
        tokens = tokens.saturating_add(TOKENS_PER_MESSAGE);
        let mut seen = Fields::default();
        c.object(|c, key| {
            let counted = match key {
                "content" => {
                    seen.first(0)?;
                    match c.peek()? {
                        b'n' => c.null().map(|_| 0)?,
                        b'"' => counter.count(c.string()?.text()?),
                        b'[' => fast_parts(c, counter)?,
                        _ => return None,
                    }
                }
                "name" => {
                    seen.first(1)?;
                    match c.optional(Cursor::string)? {
                        Some(name) => counter.count(name.text()?).saturating_add(TOKENS_PER_NAME),
                        None => 0,
                    }
                }
                "tool_calls" | "function_call" => {
                    seen.first(if key == "tool_calls" { 2 } else { 3 })?;
                    match c.optional(Cursor::skip)? {
                        Some(raw) => counter.count(raw),
                        None => 0,
                    }
                }
                _ => c.skip().map(|_| 0)?,
            };
            tokens = tokens.saturating_add(counted);
            Some(())
        })
    })?;
    Some(tokens)
}

/// A content array's tokens: its text parts', and a flat rate for others.
fn fast_parts(c: &mut Cursor<'_>, counter: &dyn TokenCounter) -> Option<u64> {
    let mut tokens = 0u64;
    c.array(|c| {
        let (mut text, mut seen) = (None, Fields::default());
        c.object(|c, key| {
            if key == "text" {
                seen.first(0)?;
                text = c.optional(Cursor::string)?;
            } else {
                c.skip()?;
            }
            Some(())
        })?;
        let counted = match text {
            Some(text) => counter.count(text.text()?),
            None => NON_TEXT_PART_TOKENS,
        };
        tokens = tokens.saturating_add(counted);
        Some(())
    })?;
    Some(tokens)
}

/// The cost of a legacy completions body.
pub(super) fn completions_cost(
    body: &[u8],
    counter: &dyn TokenCounter,
    options: &EstimateOptions,
) -> Result<Cost, String> {
    let parsed: CompletionsBody<'_> = parse(body)?;
    let max = non_negative("max_tokens", parsed.max_tokens.as_ref())?;
    let n = choices("n", non_negative("n", parsed.n.as_ref())?)?;
    let best_of = choices("best_of", non_negative("best_of", parsed.best_of.as_ref())?)?;
    let (prompt_tokens, prompts) = parsed.prompt.as_ref().map_or((0, 1), |p| p.tokens(counter));
    Ok(Cost {
        prompt_tokens,
        completion_tokens: max
            .unwrap_or(options.default_completions_max_tokens)
            .saturating_mul(n.max(best_of))
            .saturating_mul(prompts),
        needs_usage_asked: needs_usage_asked(parsed.stream, parsed.stream_options.as_ref()),
        model: ModelName::of(body, parsed.model),
    })
}

/// A count of choices (`n`, `best_of`): 1 when absent, else 1 to
/// [`MAX_CHOICES`].
fn choices(field: &str, value: Option<u64>) -> Result<u64, String> {
    let n = value.unwrap_or(1);
    if n == 0 || n > MAX_CHOICES {
        return Err(format!("{field} must be between 1 and {MAX_CHOICES}"));
    }
    Ok(n)
}

fn count_messages(body: &ChatBody<'_>, counter: &dyn TokenCounter) -> u64 {
    let mut tokens = 0u64;
    for message in body.messages.iter().flatten() {
        tokens = tokens.saturating_add(TOKENS_PER_MESSAGE);
        if let Some(content) = &message.content {
            tokens = tokens.saturating_add(content.tokens(counter));
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
    for raw in [body.tools, body.functions, body.response_format]
        .into_iter()
        .flatten()
    {
        tokens = tokens.saturating_add(counter.count(raw.get()));
    }
    if body.messages.is_some() {
        tokens = tokens.saturating_add(REPLY_PRIMING);
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::super::request::tests::estimate;
    use super::super::request::{Endpoint, RequestEstimate};
    use super::*;
    use crate::Estimate;

    fn chat(body: &str) -> Result<RequestEstimate, String> {
        estimate(Endpoint::Chat, body)
    }

    fn completions(body: &str) -> Result<RequestEstimate, String> {
        estimate(Endpoint::Completions, body)
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
    fn tools_tool_calls_and_response_formats_count_as_their_json() {
        let e = chat(r#"{"messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"a b"}]}],"tools":[{"x": "y z"}],"response_format":{"type": "json_schema", "s": 1},"max_tokens":0}"#).unwrap();
        // tool_calls `[{"id":"a b"}]` is 2 words, tools `[{"x": "y z"}]` 3,
        // the response format 4.
        assert_eq!(e.estimate.prompt_tokens, 3 + 2 + 3 + 4 + REPLY_PRIMING);
    }

    #[test]
    fn completions_prompts_in_every_shape() {
        assert_eq!(
            completions(r#"{"prompt":"a b c"}"#).unwrap().estimate,
            Estimate {
                prompt_tokens: 3,
                completion_tokens: 16,
                calls: 1,
                hide_usage_chunk: false,
                deferred_count: None,
                model: None,
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
    fn best_of_generates_more_completions_than_n_returns() {
        let e = completions(r#"{"prompt":"a","max_tokens":10,"n":2,"best_of":5}"#).unwrap();
        assert_eq!(e.estimate.completion_tokens, 50);
        let e = completions(r#"{"prompt":"a","max_tokens":10,"n":3,"best_of":1}"#).unwrap();
        assert_eq!(e.estimate.completion_tokens, 30);
        assert!(completions(r#"{"prompt":"a","best_of":0}"#).is_err());
        assert!(completions(r#"{"prompt":"a","best_of":129}"#).is_err());
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

        let e = completions(r#"{"prompt":"a","stream":true}"#).unwrap();
        assert!(e.estimate.hide_usage_chunk);
        let body: Value = serde_json::from_slice(&e.rewritten_body.unwrap()).unwrap();
        assert_eq!(body["stream_options"]["include_usage"], true);
    }

    #[test]
    fn bad_bodies_are_errors_not_panics() {
        for bad in [
            "[[], null]",
            r#"{"messages":"x"}"#,
            r#"{"messages":[],"max_tokens":-1}"#,
            r#"{"messages":[],"max_tokens":1e30}"#,
            r#"{"messages":[],"max_tokens":"lots"}"#,
            r#"{"messages":[],"max_tokens":1.5}"#,
            r#"{"messages":[],"max_tokens":99999999999999999999999}"#,
            r#"{"messages":[],"max_tokens":1,"max_tokens":99999}"#,
            r#"{"messages":[],"n":0}"#,
            r#"{"messages":[],"n":1000}"#,
            r#"{"messages":[],"stream":"yes"}"#,
            r#"{"messages":[{"content":5}]}"#,
            "{\"messages\":[{\"content\":\"\u{0}\"}]",
        ] {
            assert!(chat(bad).is_err(), "{bad}");
        }
        for bad in [
            r#"{"prompt":5}"#,
            r#"{"prompt":"a","max_tokens":-1}"#,
            r#"{"prompt":"a","best_of":"x"}"#,
        ] {
            assert!(completions(bad).is_err(), "{bad}");
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
}

#[cfg(test)]
mod fast_path_tests {
    use super::super::request::tests::Words;
    use super::*;

    /// Bodies built from pieces that the fast path reads and pieces it
    /// leaves to serde, valid and not.
    fn bodies() -> Vec<String> {
        let contents = [
            r#""one two three""#,
            r#""""#,
            r#"null"#,
            r#"[]"#,
            r#"[{"type":"text","text":"a b"},{"type":"image_url","image_url":{"url":"x"}}]"#,
            r#"[{"text":null},{"text":"c"},{}]"#,
            r#""esc\"aped \u00e9""#,
            r#"[{"text":"a\nb"}]"#,
            r#"5"#,
            r#"{"text":"a"}"#,
            r#"[{"text":5}]"#,
            r#"[["a"]]"#,
            r#""日本語 🦀""#,
        ];
        let messages = contents
            .iter()
            .flat_map(|content| {
                [
                    format!(r#"[{{"role":"user","content":{content}}}]"#),
                    format!(
                        r#"[{{"role":"system","content":"be brief"}},{{"role":"user","name":"bob smith","content":{content}}}]"#
                    ),
                ]
            })
            .chain(
                [
                    "[]",
                    "null",
                    r#"[{"role":"assistant","content":null,"tool_calls":[{"id":"a b","function":{"arguments":"{}"}}]}]"#,
                    r#"[{"role":"assistant","function_call":{"name":"f"},"function_call":{}}]"#,
                    r#"[{"content":"a","content":"b"}]"#,
                    r#"[{"name":5}]"#,
                    r#"[{"name":null,"tool_calls":null}]"#,
                    r#"["not an object"]"#,
                    r#"{"role":"user"}"#,
                    r#""x""#,
                ]
                .map(str::to_owned),
            )
            .collect::<Vec<_>>();
        let numbers = [
            "16",
            "0",
            "null",
            "-1",
            "1.5",
            "1e3",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999",
            "1e400",
            r#""5""#,
            "true",
        ];
        let extras = [
            "",
            r#","stream":true"#,
            r#","stream":false,"stream_options":null"#,
            r#","stream":true,"stream_options":{"include_usage":true,"x":[1]}"#,
            r#","stream":true,"stream_options":{"include_usage":false}"#,
            r#","stream":"yes""#,
            r#","stream":true,"stream":false"#,
            r#","stream_options":{"include_usage":true,"include_usage":false}"#,
            r#","stream_options":5"#,
            r#","n":3"#,
            r#","n":0"#,
            r#","n":1000"#,
            r#","max_completion_tokens":70"#,
            r#","max_completion_tokens":null"#,
            r#","max_tokens":1"#,
            r#","tools":[{"type":"function","function":{"name":"f","parameters":{}}}],"response_format":{"type":"json_object"}"#,
            r#","functions":null,"tools":null"#,
            r#","tools":[],"tools":[]"#,
            r#","temperature":0.7,"top_p":1e-3,"user":"u\u00e9","metadata":{"a":[true,false,null]}"#,
            r#","\u006e":2"#,
        ];
        let mut bodies = Vec::new();
        for (i, messages) in messages.iter().enumerate() {
            for (j, number) in numbers.iter().enumerate() {
                let extra = extras[(i + j) % extras.len()];
                bodies.push(format!(
                    r#"{{"model":"gpt-4o","messages":{messages},"max_tokens":{number}{extra}}}"#
                ));
            }
            for extra in extras {
                bodies.push(format!(r#"{{"messages":{messages}{extra}}}"#));
            }
        }
        // Spacing, key order, and the body's end.
        bodies.push(
            " {\n \"max_tokens\" : 5 ,\r\n\t\"messages\" : [ { \"content\" : \"hi\" } ] } \n"
                .to_owned(),
        );
        bodies.push(r#"{"messages":[{"content":"hi"}]} x"#.to_owned());
        bodies.push(r#"{"messages":[{"content":"hi"}],}"#.to_owned());
        bodies
    }

    #[test]
    fn where_the_fast_path_answers_it_answers_as_serde_does() {
        let (mut fast, mut total) = (0, 0);
        for body in bodies() {
            // Every prefix too: cut bodies are never read as whole ones.
            for end in (1..=body.len()).filter(|&end| body.is_char_boundary(end)) {
                let body = &body.as_bytes()[..end];
                total += 1;
                if let Some(facts) = fast_chat(body, &Words) {
                    fast += 1;
                    let serde = serde_chat(body, &Words);
                    assert_eq!(
                        serde.as_ref(),
                        Ok(&facts),
                        "{}",
                        String::from_utf8_lossy(body)
                    );
                }
            }
        }
        assert!(fast > 200, "the fast path read {fast} of {total} bodies");
    }

    #[test]
    fn the_common_shapes_take_the_fast_path() {
        for body in [
            r#"{"model":"gpt-4o","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Please summarise the history of the Roman empire in three short sentences, with the emperors' names."}],"max_tokens":16}"#,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"what is this?"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}],"stream":true}"#,
            r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},{"role":"tool","tool_call_id":"c1","content":"42"}],"tools":[{"type":"function","function":{"name":"f"}}],"temperature":0.2}"#,
        ] {
            let facts = fast_chat(body.as_bytes(), &Words).expect(body);
            assert_eq!(Ok(facts), serde_chat(body.as_bytes(), &Words), "{body}");
        }
    }
}
