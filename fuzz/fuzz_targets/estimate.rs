//! Request bodies through the estimator, for every endpoint: never panics,
//! and every estimate it gives reserves at least one token and one call.
//! A rewritten body (a stream asked for its usage) is still JSON that the
//! estimator accepts, and asks for no more rewriting.
#![no_main]

use agent_budget_tower::openai::{estimate_body, ByteCount, Endpoint, EstimateOptions};
use libfuzzer_sys::fuzz_target;

const ENDPOINTS: [Endpoint; 5] = [
    Endpoint::Chat,
    Endpoint::Completions,
    Endpoint::Responses,
    Endpoint::Embeddings,
    Endpoint::Other,
];

fuzz_target!(|input: (u8, &[u8])| {
    let (which, body) = input;
    let endpoint = ENDPOINTS[usize::from(which) % ENDPOINTS.len()];
    let options = EstimateOptions::default();
    let Ok(estimated) = estimate_body(endpoint, body, &ByteCount, &options) else {
        return;
    };
    assert!(estimated.estimate.tokens() >= 1);
    assert_eq!(estimated.estimate.calls, 1);
    if let Some(rewritten) = estimated.rewritten_body {
        let again = estimate_body(endpoint, &rewritten, &ByteCount, &options)
            .expect("a rewritten body is a valid request");
        assert!(again.rewritten_body.is_none(), "asked for usage twice");
        assert_eq!(
            again.estimate.completion_tokens,
            estimated.estimate.completion_tokens
        );
    }
});
