//! The usage an OpenAI-style response reports (pure): from a JSON body, or
//! from a stream of server-sent events.
//!
//! # How it works
//!
//! A JSON response carries `"usage"`: `{"prompt_tokens",
//! "completion_tokens", "total_tokens"}` from chat, completions and
//! embeddings, `{"input_tokens", "output_tokens", "total_tokens"}` from the
//! Responses API; [`json_usage`] reads either, skipping everything else:
//! from its key on where it can be ([`seek`](super::seek)), else by the
//! strict reader from the start, else by serde.
//!
//! A streamed response (`text/event-stream`) is a sequence of events, each
//! one or more `data:` lines ended by a blank line. An [`EventSplitter`]
//! cuts the bytes as they arrive into whole events (a chunk may hold
//! several events, or part of one). [`read_event`] then says what each
//! event is: a delta with some text (streamed tokens), the event with the
//! usage, or something else (`[DONE]`, comments). The two APIs stream
//! differently:
//!
//! - chat and completions: the usage chunk of a stream that asked for
//!   usage has empty `choices` and a `usage` object; every other chunk has
//!   `"usage": null` or none, and its text in `choices[].delta.content`
//!   (chat) or `choices[].text` (completions);
//! - Responses: text comes in `*.delta` events (`"delta": "…"`), and the
//!   last event (`response.completed`, `response.incomplete` or
//!   `response.failed`) carries the whole response, with its usage in
//!   `response.usage`.
//!
//! Numbers that are not non-negative integers, or fields of the wrong
//! shape, read as "no usage": the caller falls back to its estimate.

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Number;

use super::scan::{Cursor, Fields};
use super::seek::read_usage;
use crate::{TokenSplit, UsedTokens};

/// An OpenAI `usage` object, read without allocating: numbers stay
/// numbers until they are checked, other fields are skipped.
#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    total_tokens: Option<Number>,
    #[serde(default)]
    prompt_tokens: Option<Number>,
    #[serde(default)]
    completion_tokens: Option<Number>,
    /// The Responses API's names for the prompt and completion.
    #[serde(default)]
    input_tokens: Option<Number>,
    #[serde(default)]
    output_tokens: Option<Number>,
    /// Chat's and completions' cached prompt tokens.
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
    /// The Responses API's.
    #[serde(default)]
    input_tokens_details: Option<Details>,
}

/// `usage.prompt_tokens_details` (or `input_tokens_details`).
#[derive(Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<Number>,
}

impl Usage {
    /// The usage by how it is priced: the total, and the prompt (with its
    /// cached part) and completion when both are given; `None` when there
    /// is no total.
    fn split(&self) -> Option<UsedTokens> {
        let total = self.total()?;
        let part = |n: &Option<Number>| n.as_ref().and_then(Number::as_u64);
        let input = part(&self.prompt_tokens).or(part(&self.input_tokens));
        let output = part(&self.completion_tokens).or(part(&self.output_tokens));
        let cached = self
            .prompt_tokens_details
            .as_ref()
            .or(self.input_tokens_details.as_ref())
            .and_then(|d| part(&d.cached_tokens))
            .unwrap_or(0);
        Some(match (input, output) {
            (Some(input), Some(output)) => UsedTokens {
                total,
                split: Some(TokenSplit {
                    input,
                    cached_input: cached.min(input),
                    output,
                }),
            },
            _ => UsedTokens { total, split: None },
        })
    }

    /// `total_tokens`, or the prompt's plus the completion's when the total
    /// is missing (`prompt_tokens + completion_tokens`, or the Responses
    /// API's `input_tokens + output_tokens`); `None` unless they are
    /// non-negative integers. Half a usage is no usage: the estimate is
    /// kept rather than trusting a count that may leave the completion out.
    fn total(&self) -> Option<u64> {
        if let Some(total) = self.total_tokens.as_ref() {
            return total.as_u64();
        }
        let part = |n: &Option<Number>| n.as_ref().and_then(Number::as_u64);
        let input = part(&self.prompt_tokens).or(part(&self.input_tokens))?;
        let output = part(&self.completion_tokens).or(part(&self.output_tokens))?;
        Some(input.saturating_add(output))
    }
}

#[derive(Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<Usage>,
}

/// The total tokens a JSON response body reports in its `usage`, if it
/// does.
pub fn json_usage(body: &[u8]) -> Option<u64> {
    json_used_tokens(body).map(|used| used.total)
}

/// [`json_usage`], with the prompt's (and its cached part's) and the
/// completion's tokens when the usage gives them.
pub fn json_used_tokens(body: &[u8]) -> Option<UsedTokens> {
    if let Some(usage) = keyed_usage(body) {
        return usage;
    }
    match fast_usage(body) {
        Some(usage) => usage,
        None => serde_usage(body),
    }
}

/// The usage of a stream's usage event (one [`read_event`] calls
/// [`StreamEvent::Usage`]), split as [`json_used_tokens`] splits it.
pub fn event_used_tokens(event: &[u8]) -> Option<UsedTokens> {
    let data = event_data(event);
    let chunk = serde_json::from_slice::<Chunk<'_>>(&data).ok()?;
    chunk
        .usage
        .as_ref()
        .or(chunk.response.as_ref().and_then(|r| r.usage.as_ref()))?
        .split()
}

/// [`json_used_tokens`] by serde: any body.
fn serde_usage(body: &[u8]) -> Option<UsedTokens> {
    let parsed: WithUsage = serde_json::from_slice(body).ok()?;
    parsed.usage?.split()
}

/// [`json_used_tokens`] by serde alone: what the fuzz target `usage`
/// holds the layer's reading to, on every body that is JSON.
#[cfg(fuzzing)]
pub fn serde_used_tokens(body: &[u8]) -> Option<UsedTokens> {
    serde_usage(body)
}

/// [`json_used_tokens`] read from the `usage` key on (see
/// [`seek`](super::seek)): `None` where it cannot be, or where the strict
/// reader leaves the usage to serde.
fn keyed_usage(body: &[u8]) -> Option<Option<UsedTokens>> {
    let usage = read_usage(body, |c| c.optional(fast_usage_object))?;
    Some(usage.and_then(|usage| usage.split()))
}

/// [`json_usage`] by the [strict reader](super::scan), which skips the
/// rest of the body without building anything: `None` for a body it leaves
/// to serde (see [`serde_usage`]), whose answer it gives where it answers.
fn fast_usage(body: &[u8]) -> Option<Option<UsedTokens>> {
    let mut cursor = Cursor::new(body)?;
    let mut usage = None;
    let mut seen = Fields::default();
    cursor.object(|c, key| {
        if key == "usage" {
            seen.first(0)?;
            usage = c.optional(fast_usage_object)?;
        } else {
            c.skip()?;
        }
        Some(())
    })?;
    cursor.end()?;
    Some(usage.and_then(|usage| usage.split()))
}

/// A `usage` object whose counts are plain integers (or null).
fn fast_usage_object(c: &mut Cursor<'_>) -> Option<Usage> {
    let mut usage = Usage {
        total_tokens: None,
        prompt_tokens: None,
        completion_tokens: None,
        input_tokens: None,
        output_tokens: None,
        prompt_tokens_details: None,
        input_tokens_details: None,
    };
    let mut seen = Fields::default();
    c.object(|c, key| {
        let (field, details) = match key {
            "prompt_tokens_details" => (5, &mut usage.prompt_tokens_details),
            "input_tokens_details" => (6, &mut usage.input_tokens_details),
            _ => (7, &mut None),
        };
        if field < 7 {
            seen.first(field)?;
            *details = c.optional(fast_details)?;
            return Some(());
        }
        let (field, count) = match key {
            "total_tokens" => (0, &mut usage.total_tokens),
            "prompt_tokens" => (1, &mut usage.prompt_tokens),
            "completion_tokens" => (2, &mut usage.completion_tokens),
            "input_tokens" => (3, &mut usage.input_tokens),
            "output_tokens" => (4, &mut usage.output_tokens),
            _ => return c.skip().map(drop),
        };
        seen.first(field)?;
        *count = c.optional(Cursor::integer)?.map(Number::from);
        Some(())
    })?;
    Some(usage)
}

/// `prompt_tokens_details` whose `cached_tokens` is a plain integer (or
/// null).
fn fast_details(c: &mut Cursor<'_>) -> Option<Details> {
    let mut cached_tokens = None;
    let mut seen = Fields::default();
    c.object(|c, key| {
        if key == "cached_tokens" {
            seen.first(0)?;
            cached_tokens = c.optional(Cursor::integer)?.map(Number::from);
            Some(())
        } else {
            c.skip().map(drop)
        }
    })?;
    Some(Details { cached_tokens })
}

/// What one server-sent event of a completion stream is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEvent {
    /// A chunk with this many bytes of generated text.
    Delta {
        /// Bytes of text in the chunk's choices.
        text_bytes: u64,
    },
    /// The chunk with the stream's usage; `bare` if it carries no choices
    /// (so hiding it hides nothing else).
    Usage {
        /// The total tokens.
        total_tokens: u64,
        /// Whether `choices` is empty or missing.
        bare: bool,
    },
    /// Anything else: `[DONE]`, comments, unknown shapes.
    Other,
}

/// An event's data: a chat or completions chunk, or a Responses event.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default, borrow)]
    choices: Option<Vec<Choice<'a>>>,
    /// A Responses event's response (the final one has its usage).
    #[serde(default)]
    response: Option<WithUsage>,
    /// A Responses `*.delta` event's text, as raw JSON: its length is
    /// all that is wanted, and a string's raw length (less its quotes) is
    /// never less than its text's.
    #[serde(default, borrow)]
    delta: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
}

/// Reads one whole event (as cut by [`EventSplitter`]).
pub fn read_event(event: &[u8]) -> StreamEvent {
    let data = event_data(event);
    if data.is_empty() || *data == b"[DONE]"[..] {
        return StreamEvent::Other;
    }
    let Ok(chunk) = serde_json::from_slice::<Chunk<'_>>(&data) else {
        return StreamEvent::Other;
    };
    let choices = chunk.choices.unwrap_or_default();
    let usage = chunk
        .usage
        .as_ref()
        .or(chunk.response.as_ref().and_then(|r| r.usage.as_ref()));
    if let Some(total_tokens) = usage.and_then(Usage::total) {
        return StreamEvent::Usage {
            total_tokens,
            bare: choices.is_empty(),
        };
    }
    let responses_delta = chunk
        .delta
        .map(RawValue::get)
        .filter(|raw| raw.starts_with('"'))
        .map_or(0, |raw| raw.len().saturating_sub(2) as u64);
    let text_bytes = choices
        .iter()
        .map(|c| {
            let delta = c.delta.as_ref().and_then(|d| d.content.as_deref());
            delta.or(c.text.as_deref()).map_or(0, str::len) as u64
        })
        .sum::<u64>()
        .saturating_add(responses_delta);
    StreamEvent::Delta { text_bytes }
}

/// The data of an event: its `data:` lines' values (one leading space
/// dropped), joined by newlines, as the SSE specification says.
fn event_data(event: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let mut lines = event
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter_map(|line| line.strip_prefix(b"data:"))
        .map(|value| value.strip_prefix(b" ").unwrap_or(value));
    let Some(first) = lines.next() else {
        return std::borrow::Cow::Borrowed(&[]);
    };
    match lines.next() {
        None => std::borrow::Cow::Borrowed(first),
        Some(second) => {
            let mut joined = first.to_vec();
            for line in std::iter::once(second).chain(lines) {
                joined.push(b'\n');
                joined.extend_from_slice(line);
            }
            std::borrow::Cow::Owned(joined)
        }
    }
}

/// The most bytes held while waiting for an event's end: an upstream that
/// never ends its events must not make the gateway hold its whole body.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// Cuts a byte stream into whole server-sent events.
///
/// An event ends at a blank line (`\n\n` or `\r\n\r\n`). Bytes after the
/// last blank line wait for the next chunk; [`EventSplitter::rest`] hands
/// them over at the end. Events are slices of the chunks they came in
/// when they lie in one chunk (no copy). More than [`MAX_EVENT_BYTES`]
/// without an end are handed over as they are, as if they were an event.
#[derive(Debug, Default)]
pub struct EventSplitter {
    partial: BytesMut,
}

impl EventSplitter {
    /// The whole events completed by `chunk`, in order, each with its
    /// terminating blank line.
    pub fn push(&mut self, chunk: Bytes) -> Vec<Bytes> {
        let mut data = if self.partial.is_empty() {
            chunk
        } else {
            self.partial.extend_from_slice(&chunk);
            self.partial.split().freeze()
        };
        let mut events = Vec::new();
        while let Some(end) = event_end(&data) {
            events.push(data.split_to(end));
        }
        if data.len() > MAX_EVENT_BYTES {
            events.push(data);
        } else if !data.is_empty() {
            self.partial.extend_from_slice(&data);
        }
        events
    }

    /// Bytes that never formed a whole event (the stream ended mid-event).
    pub fn rest(&mut self) -> Option<Bytes> {
        (!self.partial.is_empty()).then(|| self.partial.split().freeze())
    }
}

/// Where the first event of `data` ends (just past its blank line).
fn event_end(data: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = memchr_newline(&data[from..]) {
        let at = from + i;
        let next = &data[at + 1..];
        if next.first() == Some(&b'\n') {
            return Some(at + 2);
        }
        if next.starts_with(b"\r\n") {
            return Some(at + 3);
        }
        from = at + 1;
    }
    None
}

fn memchr_newline(data: &[u8]) -> Option<usize> {
    data.iter().position(|&b| b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_usage_reads_the_total_or_the_parts() {
        assert_eq!(
            json_usage(
                br#"{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#
            ),
            Some(7)
        );
        assert_eq!(
            json_usage(br#"{"usage":{"prompt_tokens":3,"completion_tokens":4}}"#),
            Some(7)
        );
        for none in [
            &br#"{"usage":null}"#[..],
            br#"{"choices":[]}"#,
            br#"{"usage":{"total_tokens":-5}}"#,
            br#"{"usage":{"total_tokens":1e30}}"#,
            br#"{"usage":{"total_tokens":"7"}}"#,
            br#"{"usage":{"prompt_tokens":3}}"#,
            br#"{"usage":7}"#,
            b"garbage",
            b"",
            br#"{"usage":{"total_tokens":7}"#,
        ] {
            assert_eq!(json_usage(none), None, "{}", String::from_utf8_lossy(none));
        }
    }

    #[test]
    fn where_the_fast_usage_answers_it_answers_as_serde_does() {
        let usages = [
            r#"{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}"#,
            r#"{"prompt_tokens":3,"completion_tokens":4}"#,
            r#"{"input_tokens":5,"output_tokens":7,"total_tokens":12,"output_tokens_details":{"reasoning_tokens":2}}"#,
            r#"{"total_tokens":null,"prompt_tokens":1,"completion_tokens":2}"#,
            r#"{"total_tokens":18446744073709551615}"#,
            r#"{"total_tokens":18446744073709551616}"#,
            r#"{"total_tokens":-1}"#,
            r#"{"total_tokens":7.0}"#,
            r#"{"total_tokens":1e400}"#,
            r#"{"total_tokens":"7"}"#,
            r#"{"total_tokens":7,"total_tokens":8}"#,
            r#"{"prompt_tokens":3}"#,
            r#"{}"#,
            r#"null"#,
            r#"[7]"#,
            r#"7"#,
        ];
        let around = [
            ("", ""),
            (
                r#""id":"chatcmpl-1","choices":[{"message":{"role":"assistant","content":"a \"quoted\" é 🦀"}}],"#,
                "",
            ),
            ("", r#","model":"m","system_fingerprint":null"#),
            (r#""usage":null,"#, ""),
            (r#""x":99999999999999999999999,"y":[1e400],"#, ""),
            (r#""\u0075sage":{"total_tokens":1},"#, ""),
        ];
        let mut answered = 0;
        for usage in usages {
            for (before, after) in around {
                let body = format!(r#" {{{before}"usage":{usage}{after}}} "#);
                for end in (1..=body.len()).filter(|&end| body.is_char_boundary(end)) {
                    let body = &body.as_bytes()[..end];
                    if let Some(fast) = fast_usage(body) {
                        answered += 1;
                        assert_eq!(fast, serde_usage(body), "{}", String::from_utf8_lossy(body));
                    }
                }
            }
        }
        assert!(answered > 30, "the fast path answered {answered} bodies");
        for body in [
            &br#"{"id":"x","choices":[],"usage":{"prompt_tokens":27,"completion_tokens":16,"total_tokens":43}}"#[..],
            br#"{"object":"list","data":[{"embedding":[0.1,-0.2e-3]}],"usage":{"prompt_tokens":8,"total_tokens":8}}"#,
        ] {
            assert!(fast_usage(body).is_some(), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn for_any_json_body_the_usage_read_from_its_key_is_serdes() {
        let usages = [
            r#"{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}"#,
            r#"{"prompt_tokens":3,"completion_tokens":4,"prompt_tokens_details":{"cached_tokens":2}}"#,
            r#"{"input_tokens":5,"output_tokens":7,"total_tokens":12,"output_tokens_details":{"reasoning_tokens":2}}"#,
            r#"{"total_tokens":18446744073709551616}"#,
            r#"{"total_tokens":7.0}"#,
            r#"{"total_tokens":7,"total_tokens":8}"#,
            r#"{"tot\u0061l_tokens":7}"#,
            r#"{}"#,
            r#"null"#,
        ];
        let spoof = serde_json::to_string(r#"","usage":{"total_tokens":1}}"#).unwrap();
        let before = [
            String::new(),
            r#""id":"chatcmpl-1","choices":[{"message":{"content":"a \"quoted\" é 🦀\n"}}],"#
                .to_owned(),
            format!(r#""choices":[{{"text":{spoof}}}],"#),
            r#""usage":null,"#.to_owned(),
            r#""\u0075sage":{"total_tokens":1},"#.to_owned(),
            r#""object":"usage","#.to_owned(),
        ];
        let after = [
            String::new(),
            r#","service_tier":"default","system_fingerprint":"fp_1""#.to_owned(),
            r#","user":null,"metadata":{"k":"v","n":{"usage":1}}"#.to_owned(),
            r#","usage":null"#.to_owned(),
            format!(r#","note":{spoof}"#),
            r#","choices":[]"#.to_owned(),
        ];
        let (mut bodies, mut from_the_key) = (0, 0);
        for usage in usages {
            for before in &before {
                for after in &after {
                    let body = format!("{{{before}\"usage\":{usage}{after}}}\n");
                    let body = body.as_bytes();
                    // Every prefix that is JSON too (most are not).
                    for end in 1..=body.len() {
                        let body = &body[..end];
                        if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() {
                            continue;
                        }
                        bodies += 1;
                        let lossy = String::from_utf8_lossy(body);
                        if let Some(tail) = keyed_usage(body) {
                            from_the_key += 1;
                            assert_eq!(tail, serde_usage(body), "{lossy}");
                        }
                        assert_eq!(json_used_tokens(body), serde_usage(body), "{lossy}");
                    }
                }
            }
        }
        // Most of the combinations are built for the walk to give up on.
        assert!(
            from_the_key >= 40,
            "{from_the_key} of {bodies} bodies were read from the key"
        );
    }

    #[test]
    fn a_body_that_is_not_json_is_read_from_its_key_as_only_an_upstream_writes() {
        // What `seek` trusts (see its docs): the structure before the usage
        // is not validated.
        let body = br#"{not json,"usage":{"total_tokens":7}}"#;
        assert_eq!(serde_usage(body), None);
        assert_eq!(json_usage(body), Some(7));
    }

    #[test]
    fn json_usage_reads_the_responses_apis_names_too() {
        assert_eq!(
            json_usage(br#"{"object":"response","usage":{"input_tokens":5,"output_tokens":7,"total_tokens":12}}"#),
            Some(12)
        );
        assert_eq!(
            json_usage(br#"{"usage":{"input_tokens":5,"output_tokens":7}}"#),
            Some(12)
        );
        assert_eq!(json_usage(br#"{"usage":{"input_tokens":5}}"#), None);
        assert_eq!(
            json_usage(br#"{"object":"list","usage":{"prompt_tokens":8,"total_tokens":8}}"#),
            Some(8)
        );
    }

    #[test]
    fn responses_events_are_told_apart() {
        assert_eq!(
            read_event(b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"item_id\":\"m\",\"delta\":\"h\xc3\xa9\"}\n\n"),
            StreamEvent::Delta { text_bytes: 3 }
        );
        assert_eq!(
            read_event(b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"usage\":null}}\n\n"),
            StreamEvent::Delta { text_bytes: 0 }
        );
        for kind in ["completed", "incomplete", "failed"] {
            let event = format!("event: response.{kind}\ndata: {{\"type\":\"response.{kind}\",\"response\":{{\"id\":\"r\",\"output\":[],\"usage\":{{\"input_tokens\":4,\"output_tokens\":6,\"total_tokens\":10}}}}}}\n\n");
            assert_eq!(
                read_event(event.as_bytes()),
                StreamEvent::Usage {
                    total_tokens: 10,
                    bare: true
                },
                "{kind}"
            );
        }
        // A delta that is not text (an object) counts no text.
        assert_eq!(
            read_event(b"data: {\"type\":\"x.delta\",\"delta\":{\"a\":1}}\n\n"),
            StreamEvent::Delta { text_bytes: 0 }
        );
    }

    #[test]
    fn events_are_told_apart() {
        assert_eq!(
            read_event(
                b"data: {\"choices\":[{\"delta\":{\"content\":\"h\xc3\xa9\"}}],\"usage\":null}\n\n"
            ),
            StreamEvent::Delta { text_bytes: 3 }
        );
        assert_eq!(
            read_event(b"data: {\"choices\":[{\"text\":\"abc\"}]}\n\n"),
            StreamEvent::Delta { text_bytes: 3 }
        );
        assert_eq!(
            read_event(b"data: {\"choices\":[],\"usage\":{\"total_tokens\":12}}\r\n\r\n"),
            StreamEvent::Usage {
                total_tokens: 12,
                bare: true
            }
        );
        assert_eq!(
            read_event(b"data: {\"choices\":[{\"delta\":{}}],\"usage\":{\"total_tokens\":12}}\n\n"),
            StreamEvent::Usage {
                total_tokens: 12,
                bare: false
            }
        );
        assert_eq!(read_event(b"data: [DONE]\n\n"), StreamEvent::Other);
        assert_eq!(read_event(b": keep-alive\n\n"), StreamEvent::Other);
        assert_eq!(read_event(b"data: {broken\n\n"), StreamEvent::Other);
        assert_eq!(read_event(b""), StreamEvent::Other);
    }

    #[test]
    fn multi_line_data_is_joined() {
        assert_eq!(
            read_event(b"event: x\ndata: {\"usage\":\ndata: {\"total_tokens\":5}}\n\n"),
            StreamEvent::Usage {
                total_tokens: 5,
                bare: true
            }
        );
    }

    #[test]
    fn the_splitter_cuts_whole_events_across_chunks() {
        let stream = b"data: a\n\ndata: b\r\n\r\ndata: c\n\ndata: tail";
        // Every way of cutting the stream in two gives the same events.
        for cut in 0..=stream.len() {
            let mut s = EventSplitter::default();
            let mut events = s.push(Bytes::copy_from_slice(&stream[..cut]));
            events.extend(s.push(Bytes::copy_from_slice(&stream[cut..])));
            let events: Vec<&[u8]> = events.iter().map(|e| &e[..]).collect();
            assert_eq!(
                events,
                vec![&b"data: a\n\n"[..], b"data: b\r\n\r\n", b"data: c\n\n"],
                "cut at {cut}"
            );
            assert_eq!(s.rest().as_deref(), Some(&b"data: tail"[..]));
            assert_eq!(s.rest(), None);
        }
    }

    #[test]
    fn a_stream_that_never_ends_an_event_is_not_held_whole() {
        let mut s = EventSplitter::default();
        let line = Bytes::from(vec![b'x'; MAX_EVENT_BYTES / 2]);
        assert!(s.push(line.clone()).is_empty());
        let out = s.push(line.clone());
        assert!(out.is_empty(), "exactly the limit is still held");
        let out = s.push(Bytes::from_static(b"y"));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), MAX_EVENT_BYTES + 1);
        assert_eq!(s.rest(), None);
    }

    #[test]
    fn byte_by_byte_delivery_gives_the_same_events() {
        let stream = b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n";
        let mut s = EventSplitter::default();
        let mut events = Vec::new();
        for b in stream {
            events.extend(s.push(Bytes::copy_from_slice(&[*b])));
        }
        assert_eq!(events.len(), 2);
        assert_eq!(events.concat(), stream.to_vec());
        assert_eq!(s.rest(), None);
    }

    #[test]
    fn usage_splits_into_prompt_cached_and_completion() {
        let body = br#"{"id":"x","usage":{"prompt_tokens":100,"completion_tokens":20,"total_tokens":120,"prompt_tokens_details":{"cached_tokens":60,"audio_tokens":0}}}"#;
        let want = UsedTokens {
            total: 120,
            split: Some(TokenSplit {
                input: 100,
                cached_input: 60,
                output: 20,
            }),
        };
        assert_eq!(json_used_tokens(body), Some(want));
        assert_eq!(serde_usage(body), Some(want), "serde agrees");
        let responses = br#"{"usage":{"input_tokens":7,"output_tokens":3,"total_tokens":10,"input_tokens_details":{"cached_tokens":2}}}"#;
        assert_eq!(
            json_used_tokens(responses).unwrap().split,
            Some(TokenSplit {
                input: 7,
                cached_input: 2,
                output: 3
            })
        );
        let total_only = br#"{"usage":{"total_tokens":10}}"#;
        assert_eq!(
            json_used_tokens(total_only),
            Some(UsedTokens {
                total: 10,
                split: None
            })
        );
        // More cached than prompt reads as all cached; an escaped key
        // goes to serde, with the same answer.
        let odd = br#"{"usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":9}, "tot\u0061l_tokens": 6}}"#;
        assert_eq!(
            json_used_tokens(odd).unwrap().split.unwrap().cached_input,
            5
        );
        let event = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2,\"total_tokens\":6}}\n\n";
        assert_eq!(event_used_tokens(event).unwrap().split.unwrap().output, 2);
    }
}
