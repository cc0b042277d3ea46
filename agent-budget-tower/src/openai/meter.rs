//! [`OpenAiUsage`]: the meter that reads OpenAI's `usage` from a response
//! as it streams to the client.
//!
//! # How it works
//!
//! The response's `content-type` picks the reading:
//!
//! - **JSON** (anything but `text/event-stream`): chunks go to the client
//!   as they come, and a copy is kept (up to a limit) to read `usage` from
//!   when the body ends. A body larger than the limit keeps its estimate.
//! - **Server-sent events**: each chunk is cut into whole events, which
//!   are read for their text (streamed tokens) and for the final usage
//!   chunk. When the layer asked the upstream for usage on the client's
//!   behalf ([`Estimate::hide_usage_chunk`]), that chunk is taken out of
//!   the stream, so events are held until they are whole (an upstream
//!   sends each event in one write, so in practice nothing waits);
//!   otherwise the chunks pass through untouched.
//!
//! - **Compressed** (a `content-encoding` other than `identity`): the
//!   usage cannot be read as the bytes go by, so the body passes through
//!   untouched and the estimate stays charged (an error status cancels).
//!   The gateway asks its upstream for `identity`, so this is a fallback
//!   for upstreams that compress regardless, and for services that
//!   compress inside the layer (put compression outside it).
//!
//! The outcome, once the body is over:
//!
//! | the body | reported usage | no usage, status 2xx | no usage, error status |
//! |---|---|---|---|
//! | ended | `Used(usage)` | `Reserved` | `Cancel` |
//! | dropped or failed, JSON | `Used(usage)` | `Reserved`: the upstream generated it all before answering | `Cancel` |
//! | dropped or failed, stream | `Used(usage)` | `Used(prompt + streamed)` | `Cancel` |
//! | compressed, in any way | | `Reserved` | `Cancel` |
//!
//! Streamed tokens are estimated from the text the client received: the
//! number of chunks with text, or a quarter of its bytes if that is more
//! (OpenAI sends about one token per chunk; others batch).

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::response::Parts;

use super::response::{
    event_used_tokens, json_used_tokens, read_event, EventSplitter, StreamEvent,
};
use crate::UsedTokens;
use crate::{Estimate, Meter, MeterSession, Outcome};

/// Reads OpenAI's `usage` from JSON bodies and event streams.
#[derive(Clone, Copy, Debug)]
pub struct OpenAiUsage {
    max_buffered: usize,
}

impl Default for OpenAiUsage {
    /// Keeps up to 16 MiB of a JSON body to read its usage.
    fn default() -> Self {
        OpenAiUsage {
            max_buffered: 16 << 20,
        }
    }
}

impl OpenAiUsage {
    /// Keeps up to `bytes` of a JSON body to read its usage from.
    pub fn max_buffered(bytes: usize) -> Self {
        OpenAiUsage {
            max_buffered: bytes,
        }
    }
}

/// The session of [`OpenAiUsage`] for one response.
#[derive(Debug)]
pub struct OpenAiSession {
    reading: Reading,
    success: bool,
    usage: Option<UsedTokens>,
}

#[derive(Debug)]
enum Reading {
    Json {
        /// The body's first chunk: most bodies are one, and need no list.
        first: Option<Bytes>,
        /// The chunks after the first (shared, not copied).
        more: Vec<Bytes>,
        length: usize,
        limit: usize,
        overflowed: bool,
    },
    Stream {
        splitter: EventSplitter,
        hide_usage: bool,
        text_chunks: u64,
        text_bytes: u64,
        /// The request's estimate, for its prompt: what a stream the
        /// client left is charged at least (only a stream keeps it: a JSON
        /// body that ends early was generated whole).
        estimate: Estimate,
    },
    /// Compressed: nothing can be read as it goes by.
    Opaque,
}

impl Meter for OpenAiUsage {
    type Session = OpenAiSession;

    fn start(&self, estimate: &Estimate, response: &mut Parts) -> OpenAiSession {
        let is_stream = response
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
        let reading = if super::compression(&response.headers).is_some() {
            Reading::Opaque
        } else if is_stream {
            if estimate.hide_usage_chunk {
                // The body will be shorter than the upstream said.
                response.headers.remove(CONTENT_LENGTH);
            }
            Reading::Stream {
                splitter: EventSplitter::default(),
                hide_usage: estimate.hide_usage_chunk,
                text_chunks: 0,
                text_bytes: 0,
                estimate: estimate.clone(),
            }
        } else {
            Reading::Json {
                first: None,
                more: Vec::new(),
                length: 0,
                limit: self.max_buffered,
                overflowed: false,
            }
        };
        OpenAiSession {
            reading,
            success: response.status.is_success(),
            usage: None,
        }
    }
}

impl OpenAiSession {
    fn fallback(&self) -> Option<Outcome> {
        match self.usage {
            Some(used) => Some(Outcome::Used(used.total)),
            None if !self.success => Some(Outcome::Cancel),
            None => None,
        }
    }
}

impl MeterSession for OpenAiSession {
    fn data(&mut self, chunk: Bytes) -> Option<Bytes> {
        match &mut self.reading {
            Reading::Json {
                first,
                more,
                length,
                limit,
                overflowed,
            } => {
                if !*overflowed {
                    *length = length.saturating_add(chunk.len());
                    if *length > *limit {
                        *overflowed = true;
                        (*first, *more) = (None, Vec::new());
                    } else if first.is_none() {
                        *first = Some(chunk.clone());
                    } else {
                        more.push(chunk.clone());
                    }
                }
                Some(chunk)
            }
            Reading::Stream {
                splitter,
                hide_usage,
                text_chunks,
                text_bytes,
                ..
            } => {
                let events = splitter.push(chunk.clone());
                let mut kept = BytesMut::new();
                for event in events {
                    match read_event(&event) {
                        StreamEvent::Delta { text_bytes: n } => {
                            *text_chunks += u64::from(n > 0);
                            *text_bytes = text_bytes.saturating_add(n);
                        }
                        StreamEvent::Usage { total_tokens, bare } => {
                            self.usage = Some(event_used_tokens(&event).unwrap_or(UsedTokens {
                                total: total_tokens,
                                split: None,
                            }));
                            if *hide_usage && bare {
                                continue;
                            }
                        }
                        StreamEvent::Other => {}
                    }
                    if *hide_usage {
                        kept.extend_from_slice(&event);
                    }
                }
                if *hide_usage {
                    (!kept.is_empty()).then(|| kept.freeze())
                } else {
                    Some(chunk)
                }
            }
            Reading::Opaque => Some(chunk),
        }
    }

    fn preserves_body(&self) -> bool {
        !matches!(
            self.reading,
            Reading::Stream {
                hide_usage: true,
                ..
            }
        )
    }

    fn flush(&mut self) -> Option<Bytes> {
        match &mut self.reading {
            Reading::Stream {
                splitter,
                hide_usage: true,
                ..
            } => splitter.rest(),
            _ => None,
        }
    }

    fn finish(&mut self) -> Outcome {
        if let Reading::Json {
            first: Some(first),
            more,
            overflowed: false,
            ..
        } = &self.reading
        {
            // One chunk (the usual case) is read where it lies.
            let usage = if more.is_empty() {
                json_used_tokens(first)
            } else {
                let mut whole = first.to_vec();
                for chunk in more {
                    whole.extend_from_slice(chunk);
                }
                json_used_tokens(&whole)
            };
            self.usage = self.usage.or(usage);
        }
        self.fallback().unwrap_or(Outcome::Reserved)
    }

    fn used_tokens(&self) -> Option<UsedTokens> {
        self.usage
    }

    fn abandon(&mut self) -> Outcome {
        if let Some(outcome) = self.fallback() {
            return outcome;
        }
        match &self.reading {
            Reading::Json { .. } | Reading::Opaque => Outcome::Reserved,
            Reading::Stream {
                text_chunks,
                text_bytes,
                estimate,
                ..
            } => {
                let streamed = (*text_chunks).max(text_bytes.div_ceil(4));
                Outcome::Used(estimate.counted_prompt_tokens().saturating_add(streamed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::CONTENT_ENCODING;
    use http::{Response, StatusCode};

    fn session(content_type: &str, status: StatusCode, hide: bool) -> OpenAiSession {
        let (mut parts, ()) = Response::builder()
            .status(status)
            .header(CONTENT_TYPE, content_type)
            .header(CONTENT_LENGTH, "100")
            .body(())
            .unwrap()
            .into_parts();
        let estimate = Estimate {
            prompt_tokens: 10,
            completion_tokens: 100,
            calls: 1,
            hide_usage_chunk: hide,
            deferred_count: None,
            model: None,
        };
        let s = OpenAiUsage::max_buffered(64).start(&estimate, &mut parts);
        assert_eq!(
            parts.headers.contains_key(CONTENT_LENGTH),
            !(hide && content_type == "text/event-stream")
        );
        s
    }

    const DELTA: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"hello\"}}]}\n\n";
    const USAGE: &[u8] = b"data: {\"choices\":[],\"usage\":{\"total_tokens\":33}}\n\n";
    const DONE: &[u8] = b"data: [DONE]\n\n";

    #[test]
    fn a_json_body_settles_from_its_usage_in_any_chunking() {
        let body = br#"{"id":"1","usage":{"total_tokens":21}}"#;
        for cut in 0..body.len() {
            let mut s = session("application/json", StatusCode::OK, false);
            let a = s.data(Bytes::copy_from_slice(&body[..cut])).unwrap();
            let b = s.data(Bytes::copy_from_slice(&body[cut..])).unwrap();
            assert_eq!([a, b].concat(), body.to_vec());
            assert_eq!(s.finish(), Outcome::Used(21));
        }
    }

    #[test]
    fn a_json_body_without_usage_keeps_the_estimate_or_cancels_on_error() {
        let mut s = session("application/json", StatusCode::OK, false);
        s.data(Bytes::from_static(b"{}"));
        assert_eq!(s.finish(), Outcome::Reserved);
        let mut s = session("application/json", StatusCode::INTERNAL_SERVER_ERROR, false);
        s.data(Bytes::from_static(b"{\"error\":{}}"));
        assert_eq!(s.finish(), Outcome::Cancel);
        let mut s = session("application/json", StatusCode::OK, false);
        s.data(Bytes::from_static(b"{\"usage\":"));
        assert_eq!(s.abandon(), Outcome::Reserved);
    }

    #[test]
    fn a_json_body_over_the_limit_keeps_the_estimate() {
        let mut s = session("application/json", StatusCode::OK, false);
        let big = format!(
            "{{\"pad\":\"{}\",\"usage\":{{\"total_tokens\":5}}}}",
            "x".repeat(100)
        );
        assert_eq!(s.data(Bytes::from(big.clone())).unwrap(), big.as_bytes());
        assert_eq!(s.finish(), Outcome::Reserved);
    }

    #[test]
    fn a_stream_passes_through_and_settles_from_its_usage_chunk() {
        let mut s = session("text/event-stream", StatusCode::OK, false);
        let all = [DELTA, USAGE, DONE].concat();
        assert_eq!(s.data(Bytes::from(all.clone())).unwrap(), all);
        assert_eq!(s.flush(), None);
        assert_eq!(s.finish(), Outcome::Used(33));
    }

    #[test]
    fn a_usage_chunk_asked_for_by_the_layer_is_hidden() {
        let mut s = session("text/event-stream", StatusCode::OK, true);
        let mut out = Vec::new();
        for chunk in [DELTA, USAGE, DONE] {
            // Split each event in two to exercise the hold-back.
            let (a, b) = chunk.split_at(7);
            out.extend(s.data(Bytes::copy_from_slice(a)).unwrap_or_default());
            out.extend(s.data(Bytes::copy_from_slice(b)).unwrap_or_default());
        }
        assert_eq!(out, [DELTA, DONE].concat());
        assert_eq!(s.finish(), Outcome::Used(33));
    }

    #[test]
    fn a_usage_chunk_with_choices_is_not_hidden() {
        let mut s = session("text/event-stream", StatusCode::OK, true);
        let chunk = b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":{\"total_tokens\":4}}\n\n";
        assert_eq!(s.data(Bytes::from_static(chunk)).unwrap(), &chunk[..]);
        assert_eq!(s.finish(), Outcome::Used(4));
    }

    #[test]
    fn an_unfinished_event_is_flushed_at_the_end() {
        let mut s = session("text/event-stream", StatusCode::OK, true);
        assert_eq!(s.data(Bytes::from_static(b"data: tail")), None);
        assert_eq!(s.flush().as_deref(), Some(&b"data: tail"[..]));
    }

    #[test]
    fn a_compressed_body_passes_untouched_and_keeps_the_estimate() {
        for content_type in ["application/json", "text/event-stream"] {
            let (mut parts, ()) = Response::builder()
                .header(CONTENT_TYPE, content_type)
                .header(CONTENT_ENCODING, "gzip")
                .body(())
                .unwrap()
                .into_parts();
            let estimate = Estimate {
                prompt_tokens: 10,
                completion_tokens: 100,
                calls: 1,
                hide_usage_chunk: true,
                deferred_count: None,
                model: None,
            };
            let mut s = OpenAiUsage::default().start(&estimate, &mut parts);
            let gzipped = Bytes::from_static(b"\x1f\x8b\x08\x00garbage");
            assert_eq!(s.data(gzipped.clone()), Some(gzipped));
            assert!(s.preserves_body());
            assert_eq!(s.flush(), None);
            assert_eq!(s.abandon(), Outcome::Reserved, "{content_type}");
            assert_eq!(s.finish(), Outcome::Reserved, "{content_type}");
        }
    }

    #[test]
    fn a_responses_stream_settles_from_response_completed() {
        let mut s = session("text/event-stream", StatusCode::OK, false);
        let delta = b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hello\"}\n\n";
        let done = b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":2,\"total_tokens\":11}}}\n\n";
        let all = [&delta[..], delta, done].concat();
        assert_eq!(s.data(Bytes::from(all.clone())).unwrap(), all);
        assert_eq!(s.finish(), Outcome::Used(11));
        // Abandoned after two deltas: the prompt and what streamed.
        let mut s = session("text/event-stream", StatusCode::OK, false);
        s.data(Bytes::from([&delta[..], delta].concat()));
        // Two chunks of 5 bytes: max(2, ceil(10 / 4) = 3).
        assert_eq!(s.abandon(), Outcome::Used(10 + 3));
    }

    #[test]
    fn an_abandoned_stream_charges_the_counted_prompt_where_a_bound_was_reserved() {
        let (mut parts, ()) = Response::builder()
            .header(CONTENT_TYPE, "text/event-stream")
            .body(())
            .unwrap()
            .into_parts();
        let estimate = Estimate {
            prompt_tokens: 40,
            completion_tokens: 100,
            calls: 1,
            hide_usage_chunk: false,
            deferred_count: Some(crate::DeferredCount::new(
                std::sync::Arc::new(|_: &[u8]| 10),
                Bytes::new(),
            )),
            model: None,
        };
        let mut s = OpenAiUsage::default().start(&estimate, &mut parts);
        s.data(Bytes::from([DELTA, DELTA].concat()));
        // The count (10), not the bound (40), and what streamed: two
        // chunks, 10 bytes of text → 3.
        assert_eq!(s.abandon(), Outcome::Used(10 + 3));
    }

    #[test]
    fn an_abandoned_stream_charges_the_prompt_and_what_streamed() {
        let mut s = session("text/event-stream", StatusCode::OK, true);
        s.data(Bytes::from([DELTA, DELTA, DELTA].concat()));
        // 3 chunks of 5 bytes: max(3, ceil(15 / 4) = 4) = 4, plus the prompt.
        assert_eq!(s.abandon(), Outcome::Used(10 + 4));
        let mut s = session("text/event-stream", StatusCode::OK, false);
        assert_eq!(s.abandon(), Outcome::Used(10));
        let mut s = session("text/event-stream", StatusCode::OK, false);
        s.data(Bytes::from([DELTA, USAGE].concat()));
        assert_eq!(s.abandon(), Outcome::Used(33));
        let mut s = session("text/event-stream", StatusCode::BAD_GATEWAY, false);
        assert_eq!(s.abandon(), Outcome::Cancel);
    }
}
