//! The Responses API (`POST /v1/responses`): its bodies' cost.
//!
//! The prompt is `instructions` (a string, or items) and `input`: a string
//! is one user message; an array holds items, of which messages (an item
//! with a `role`, or of `"type": "message"`) are counted like chat
//! messages, with the same framing, and every other item (a function call
//! or its output, a reasoning item, a reference to a stored item) as its
//! JSON. Tools and `text` (the output format) count as their JSON. The
//! completion is `max_output_tokens`, which includes reasoning tokens, or
//! the default.
//!
//! Nothing is rewritten for a stream: a Responses stream always ends with
//! the response and its usage (`response.completed`, or
//! `response.incomplete` / `response.failed`).

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::chat::{Content, REPLY_PRIMING, TOKENS_PER_MESSAGE};
use super::request::{
    non_negative, parse, saturating_sum, Cost, EstimateOptions, ModelField, ModelName, TokenCounter,
};

/// The narrow view of a Responses body.
#[derive(Deserialize)]
struct ResponsesBody<'a> {
    #[serde(default, borrow)]
    model: Option<ModelField<'a>>,
    #[serde(default, borrow)]
    input: Option<&'a RawValue>,
    #[serde(default, borrow)]
    instructions: Option<&'a RawValue>,
    #[serde(default, borrow)]
    tools: Option<&'a RawValue>,
    #[serde(default, borrow)]
    text: Option<&'a RawValue>,
    #[serde(default)]
    max_output_tokens: Option<Value>,
    // Read to refuse a `"stream": "yes"` as chat does; a stream needs no
    // rewriting here.
    #[serde(default)]
    #[allow(dead_code)]
    stream: Option<bool>,
}

/// An input item, as far as telling a message from other items goes.
#[derive(Deserialize)]
struct Item<'a> {
    #[serde(default, borrow)]
    role: Option<&'a RawValue>,
    #[serde(default, borrow, rename = "type")]
    kind: Option<&'a RawValue>,
    #[serde(default, borrow)]
    content: Option<Content<'a>>,
}

/// The cost of a Responses body.
pub(super) fn cost(
    body: &[u8],
    counter: &dyn TokenCounter,
    options: &EstimateOptions,
) -> Result<Cost, String> {
    let parsed: ResponsesBody<'_> = parse(body)?;
    let max = non_negative("max_output_tokens", parsed.max_output_tokens.as_ref())?;
    let instructions = parsed
        .instructions
        .map(|raw| input_tokens("instructions", raw, counter))
        .transpose()?;
    let input = parsed
        .input
        .map(|raw| input_tokens("input", raw, counter))
        .transpose()?;
    let mut prompt_tokens = saturating_sum(instructions.into_iter().chain(input).flatten());
    if instructions.flatten().is_some() || input.flatten().is_some() {
        prompt_tokens = prompt_tokens.saturating_add(REPLY_PRIMING);
    }
    for raw in [parsed.tools, parsed.text].into_iter().flatten() {
        prompt_tokens = prompt_tokens.saturating_add(counter.count(raw.get()));
    }
    Ok(Cost {
        prompt_tokens,
        completion_tokens: max.unwrap_or(options.default_max_tokens),
        needs_usage_asked: false,
        model: ModelName::of(body, parsed.model),
    })
}

/// The tokens of an `input` or `instructions` value: `None` for `null`, a
/// string as one message, an array item by item.
fn input_tokens(
    field: &str,
    raw: &RawValue,
    counter: &dyn TokenCounter,
) -> Result<Option<u64>, String> {
    let invalid = |e: serde_json::Error| format!("{field} is not valid: {e}");
    match raw.get().as_bytes().first() {
        Some(b'n') => Ok(None),
        Some(b'"') => {
            let text: Cow<'_, str> = serde_json::from_str(raw.get()).map_err(invalid)?;
            Ok(Some(
                TOKENS_PER_MESSAGE.saturating_add(counter.count(&text)),
            ))
        }
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(raw.get()).map_err(invalid)?;
            Ok(Some(saturating_sum(
                items.iter().map(|item| item_tokens(item, counter)),
            )))
        }
        _ => Err(format!(
            "{field} must be a string or an array of items, not {}",
            raw.get()
        )),
    }
}

/// A message item's framing and content; any other item's JSON.
fn item_tokens(raw: &RawValue, counter: &dyn TokenCounter) -> u64 {
    let message = serde_json::from_str::<Item<'_>>(raw.get())
        .ok()
        .filter(|item| item.role.is_some() || item.kind.is_some_and(|k| k.get() == "\"message\""));
    match message {
        Some(item) => TOKENS_PER_MESSAGE
            .saturating_add(item.content.as_ref().map_or(0, |c| c.tokens(counter))),
        None => counter.count(raw.get()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::request::tests::estimate;
    use super::super::request::{Endpoint, RequestEstimate, NON_TEXT_PART_TOKENS};
    use super::*;

    fn responses(body: &str) -> Result<RequestEstimate, String> {
        estimate(Endpoint::Responses, body)
    }

    fn prompt(body: &str) -> u64 {
        responses(body).unwrap().estimate.prompt_tokens
    }

    #[test]
    fn a_string_input_is_one_message_and_max_output_tokens_the_completion() {
        let e = responses(
            r#"{"model":"gpt-4o","input":"tell me a joke","max_output_tokens":300,"stream":true}"#,
        )
        .unwrap();
        assert_eq!(e.estimate.prompt_tokens, 3 + 4 + REPLY_PRIMING);
        assert_eq!(e.estimate.completion_tokens, 300);
        assert!(
            !e.estimate.hide_usage_chunk,
            "a Responses stream reports its usage"
        );
        assert_eq!(e.rewritten_body, None);
        let e = responses(r#"{"input":"a"}"#).unwrap();
        assert_eq!(e.estimate.completion_tokens, 4_096);
    }

    #[test]
    fn instructions_count_as_a_message() {
        assert_eq!(
            prompt(r#"{"instructions":"be brief","input":"hi there"}"#),
            (3 + 2) + (3 + 2) + REPLY_PRIMING
        );
        assert_eq!(
            prompt(r#"{"instructions":null,"input":null}"#),
            1,
            "nothing to count: the one-token floor"
        );
    }

    #[test]
    fn message_items_count_their_content_and_other_items_their_json() {
        let body = r#"{"input":[
            {"role":"user","content":"one two three"},
            {"type":"message","role":"assistant","content":[{"type":"output_text","text":"four five"}]},
            {"role":"user","content":[{"type":"input_text","text":"six"},{"type":"input_image","image_url":"data:x"}]},
            {"type":"function_call","call_id":"c1","name":"f","arguments":"{\"a\": 1}"},
            {"type":"function_call_output","call_id":"c1","output":"done and dusted"}
        ]}"#;
        let function_call =
            r#"{"type":"function_call","call_id":"c1","name":"f","arguments":"{\"a\": 1}"}"#;
        let output = r#"{"type":"function_call_output","call_id":"c1","output":"done and dusted"}"#;
        let json_words = |s: &str| s.split_whitespace().count() as u64;
        assert_eq!(
            prompt(body),
            (3 + 3)
                + (3 + 2)
                + (3 + 1 + NON_TEXT_PART_TOKENS)
                + json_words(function_call)
                + json_words(output)
                + REPLY_PRIMING
        );
    }

    #[test]
    fn tools_and_the_output_format_count_as_their_json() {
        assert_eq!(
            prompt(
                r#"{"input":"x","tools":[{"type": "web_search"}],"text":{"format": {"type": "json_object"}}}"#
            ),
            (3 + 1) + REPLY_PRIMING + 2 + 3
        );
    }

    #[test]
    fn bad_bodies_are_errors() {
        for bad in [
            r#"{"input":5}"#,
            r#"{"input":{"role":"user"}}"#,
            r#"{"input":[1,2"#,
            r#"{"instructions":true}"#,
            r#"{"input":"a","max_output_tokens":-1}"#,
            r#"{"input":"a","max_output_tokens":"many"}"#,
            r#"{"input":"a","max_output_tokens":1e30}"#,
            r#"{"input":"a","stream":"yes"}"#,
        ] {
            assert!(responses(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn items_of_odd_shapes_are_counted_not_refused() {
        // A message whose content is not text or parts, and items the
        // estimator does not know, count as their JSON.
        let odd = r#"{"role":"user","content":5}"#;
        assert_eq!(
            prompt(&format!(
                r#"{{"input":[{odd},{{"type":"item_reference","id":"msg_1"}}, 7, null]}}"#
            )),
            1 + 1 + 1 + 1 + REPLY_PRIMING
        );
    }
}
