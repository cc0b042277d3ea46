//! Response bodies and event streams through the OpenAI meter, cut into
//! arbitrary chunks: never panics; what reaches the client is exactly the
//! upstream's bytes (less, when the layer asked for the stream's usage on
//! the client's behalf, the bare usage chunk); the outcome is the one the
//! meter's table gives for the body's kind and fate.
#![no_main]

use agent_budget_tower::openai::OpenAiUsage;
use agent_budget_tower::{Estimate, Meter, MeterSession, Outcome};
use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Case<'a> {
    stream: bool,
    hide_usage: bool,
    compressed: bool,
    status_ok: bool,
    abandon: bool,
    prompt_tokens: u16,
    /// Where the body is cut, as lengths of successive chunks.
    cuts: Vec<u8>,
    body: &'a [u8],
}

fuzz_target!(|case: Case<'_>| {
    let mut builder = http::Response::builder()
        .status(if case.status_ok { 200 } else { 500 })
        .header(
            "content-type",
            if case.stream {
                "text/event-stream"
            } else {
                "application/json"
            },
        );
    if case.compressed {
        builder = builder.header("content-encoding", "gzip");
    }
    let (mut parts, ()) = builder.body(()).unwrap().into_parts();
    let estimate = Estimate {
        prompt_tokens: u64::from(case.prompt_tokens),
        completion_tokens: 100,
        calls: 1,
        hide_usage_chunk: case.hide_usage,
        deferred_count: None,
            model: None,
    };
    let mut session = OpenAiUsage::max_buffered(1 << 16).start(&estimate, &mut parts);
    let mut sent = Vec::new();
    let mut rest = case.body;
    let mut cuts = case.cuts.iter();
    while !rest.is_empty() {
        let n = cuts
            .next()
            .map_or(rest.len(), |&c| usize::from(c).max(1))
            .min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        if let Some(out) = session.data(Bytes::copy_from_slice(chunk)) {
            sent.extend_from_slice(&out);
        }
    }
    let outcome = if case.abandon {
        session.abandon()
    } else {
        if let Some(out) = session.flush() {
            sent.extend_from_slice(&out);
        }
        session.finish()
    };
    if session.preserves_body() {
        assert_eq!(sent, case.body, "the body changed on its way");
    } else {
        assert!(sent.len() <= case.body.len());
    }
    // The outcome follows the meter's table.
    match (case.compressed, case.status_ok) {
        (true, true) => assert_eq!(outcome, Outcome::Reserved),
        (true, false) => assert_eq!(outcome, Outcome::Cancel),
        (false, true) if case.abandon && case.stream => {
            // The prompt and what streamed, or the usage reported.
            assert!(matches!(outcome, Outcome::Used(_)), "{outcome:?}");
        }
        (false, true) => assert!(
            matches!(outcome, Outcome::Used(_) | Outcome::Reserved),
            "{outcome:?}"
        ),
        (false, false) => assert!(
            matches!(outcome, Outcome::Used(_) | Outcome::Cancel),
            "{outcome:?}"
        ),
    }
});
