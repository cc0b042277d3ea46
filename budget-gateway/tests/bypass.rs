//! No way around a budget: every spelling of a path, every endpoint that
//! consumes tokens, and every encoding, tried as a hostile client would,
//! over real HTTP on loopback, each checking what the upstream served
//! against what the gateway charged.

mod common;

use std::io::Write;
use std::time::Duration;

use agent_budget::BudgetManager;
use axum::body::Bytes;
use axum::http::{header, HeaderMap};
use axum::routing::post;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Charges agent A `tokens` through one admitted chat request whose
/// upstream reports exactly that (overuse past the estimate is charged).
async fn spend(g: &Running, tokens: u64) {
    let before = g.used(AGENT_A).0;
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "spend"}],
        "max_tokens": 1, "mock_prompt_tokens": tokens, "mock_completion_tokens": 0});
    let r = g.chat(KEY_A, &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.bytes().await.unwrap();
    eventually("the spend is charged", || {
        g.used(AGENT_A).0 == before + tokens
    })
    .await;
}

/// Both agents' tokens charged, against the upstream's tokens served.
async fn charged_is_served(g: &Running) {
    eventually("every token served is charged", || {
        g.used(AGENT_A).0 + g.used(AGENT_B).0 == tokens(&g.stats)
    })
    .await;
}

fn forwarded(g: &Running) -> Vec<String> {
    g.seen
        .lock()
        .unwrap()
        .iter()
        .map(|(r, _)| r.clone())
        .collect()
}

const SPELLINGS: [&str; 5] = [
    "/v1/chat/%63ompletions",
    "/v1//chat/completions",
    "//v1/chat/completions",
    "/v1/%63hat/completion%73",
    "/v1/chat/completions",
];

#[tokio::test]
async fn every_spelling_of_a_path_is_metered_as_the_endpoint_it_reaches() {
    let g = start(1_000, 100).await;
    spend(&g, 910).await;
    // The probe: past a spent budget, a stream asking for 2,000 tokens.
    let greedy = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2000, "stream": true})
    .to_string();
    for path in SPELLINGS {
        let (status, body) = g.raw("POST", path, KEY_A, &greedy).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{path}: {body}");
    }
    assert_eq!(calls(&g.stats), 1, "only the spending request went out");

    // With budget, each spelling is estimated, forwarded as the one path,
    // and charged what the upstream served.
    let small = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3, "stream": true})
    .to_string();
    for path in SPELLINGS {
        let (status, _) = g.raw("POST", path, KEY_B, &small).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    assert_eq!(calls(&g.stats), 1 + SPELLINGS.len() as u64);
    assert_eq!(g.used(AGENT_B).1, SPELLINGS.len() as u64);
    charged_is_served(&g).await;
    let paths = forwarded(&g);
    assert!(
        paths.iter().all(|p| p == "POST /v1/chat/completions"),
        "{paths:?}"
    );
}

#[tokio::test]
async fn dot_segments_and_encoded_separators_are_400_and_never_forwarded() {
    let g = start(1_000, 100).await;
    for path in [
        "/v1/../admin",
        "/v1/%2e%2e/admin",
        "/v1/%2E./admin",
        "/v1/..%2fadmin",
        "/v1/..;/admin",
        "/v1/./chat/completions",
        "/v1/chat/completions/..",
        "/v1/%252e%252e/admin",
        "/v1/x%5c..%5cadmin",
        "/v1/chat/completions%00",
    ] {
        for method in ["GET", "POST", "DELETE"] {
            let (status, body) = g.raw(method, path, KEY_A, "{}").await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {path}");
            assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        }
    }
    assert_eq!(forwarded(&g), Vec::<String>::new());
    assert_eq!(g.used(AGENT_A), (0, 0));
}

#[tokio::test]
async fn a_responses_call_is_estimated_refused_past_a_spent_budget_and_settled() {
    let g = start(1_000, 100).await;
    let ask = |stream: bool| {
        json!({"model": "gpt-4o", "instructions": "Be brief.", "input": "Tell me a story about a robot.",
            "max_output_tokens": 12, "stream": stream})
    };
    let r = g.post("/v1/responses", KEY_A, &ask(false)).await;
    assert_eq!(r.status(), StatusCode::OK);
    // The estimate was reserved before the call: prompt and 12 output tokens.
    let remaining: u64 = header(&r, "x-ratelimit-remaining-tokens").parse().unwrap();
    assert!(remaining <= 1_000 - 12 - 10, "{remaining}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["object"], "response");
    charged_is_served(&g).await;

    // Streamed: the usage comes in `response.completed`, which the client
    // sees as it was sent.
    let r = g.post("/v1/responses", KEY_A, &ask(true)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert!(text.contains("event: response.completed"), "{text}");
    assert_eq!(text.matches("response.output_text.delta").count(), 2 * 12);
    charged_is_served(&g).await;
    assert_eq!(g.used(AGENT_A).1, 2);

    // Spent (overuse is charged past the limit): both forms are refused,
    // and nothing reaches the upstream.
    let mut overuse = ask(false);
    overuse["mock_prompt_tokens"] = json!(2_000);
    let r = g.post("/v1/responses", KEY_A, &overuse).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.bytes().await.unwrap();
    charged_is_served(&g).await;
    let served = calls(&g.stats);
    for stream in [false, true] {
        let r = g.post("/v1/responses", KEY_A, &ask(stream)).await;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    }
    assert_eq!(calls(&g.stats), served);
}

#[tokio::test]
async fn a_responses_stream_abandoned_halfway_is_charged_at_least_what_was_served() {
    let g = start(100_000, 100).await;
    let body = json!({"model": "gpt-4o", "input": "Tell me a story about a robot.",
        "max_output_tokens": 16, "stream": true, "mock_chunk_delay_ms": 40});
    let mut r = g.post("/v1/responses", KEY_A, &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    let reserved = g.used(AGENT_A).0;
    let mut received = String::new();
    while received.matches("response.output_text.delta").count() < 2 * 4 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), r.chunk())
            .await
            .expect("the deltas arrive")
            .unwrap()
            .expect("the stream is still going");
        received.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(r);
    eventually("the abandoned stream is settled", || {
        g.used(AGENT_A).0 != reserved
    })
    .await;
    // Long enough for the upstream to have sent all 16 tokens, had the
    // gateway kept reading after the client left.
    tokio::time::sleep(Duration::from_millis(16 * 40 + 200)).await;
    let (charged, served) = (g.used(AGENT_A).0, tokens(&g.stats));
    assert!(
        charged >= served,
        "charged {charged} for {served} tokens served"
    );
    assert!(charged < reserved, "the unstreamed rest was refunded");
    assert!(
        served < reserved,
        "the upstream stopped when the client left: {served} of {reserved}"
    );
}

#[tokio::test]
async fn embeddings_cost_their_input_and_an_exactly_spent_budget_refuses_them() {
    let g = start(1_000, 100).await;
    let embed =
        json!({"model": "text-embedding-3-small", "input": ["the quick brown fox", "jumps"]});
    let r = g.post("/v1/embeddings", KEY_A, &embed).await;
    assert_eq!(r.status(), StatusCode::OK);
    let remaining: u64 = header(&r, "x-ratelimit-remaining-tokens").parse().unwrap();
    assert!(
        remaining < 1_000,
        "the input was reserved: {remaining} left"
    );
    r.bytes().await.unwrap();
    charged_is_served(&g).await;
    spend(&g, 1_000 - g.used(AGENT_A).0).await;
    assert_eq!(g.used(AGENT_A).0, 1_000);
    let served = calls(&g.stats);
    let r = g.post("/v1/embeddings", KEY_A, &embed).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let r = g
        .post("/v1/embeddings", KEY_A, &json!({"model": "e", "input": ""}))
        .await;
    assert_eq!(
        r.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "even an empty input"
    );
    assert_eq!(calls(&g.stats), served);
}

/// An upstream that compresses its answers when asked to, reporting
/// 50,000 tokens each time; it records the `accept-encoding` it got.
async fn compressing_upstream() -> (String, Seen) {
    let seen = Seen::default();
    let record = seen.clone();
    let answer = move |headers: HeaderMap, _body: Bytes| {
        let record = record.clone();
        async move {
            let encoding = headers
                .get(header::ACCEPT_ENCODING)
                .map(|v| v.to_str().unwrap().to_owned());
            record
                .lock()
                .unwrap()
                .push(("POST".to_owned(), encoding.clone()));
            let body = json!({"object": "x", "usage": {"prompt_tokens": 20_000, "completion_tokens": 30_000, "total_tokens": 50_000}}).to_string();
            if encoding.is_some_and(|e| e.contains("gzip")) {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(body.as_bytes()).unwrap();
                (
                    [
                        (header::CONTENT_TYPE, "application/json"),
                        (header::CONTENT_ENCODING, "gzip"),
                    ],
                    gz.finish().unwrap(),
                )
            } else {
                (
                    [
                        (header::CONTENT_TYPE, "application/json"),
                        (header::CONTENT_ENCODING, "identity"),
                    ],
                    body.into_bytes(),
                )
            }
        }
    };
    let router = axum::Router::new()
        .route("/v1/chat/completions", post(answer.clone()))
        .route("/v1/embeddings", post(answer));
    (serve_on_loopback(router).await, seen)
}

#[tokio::test]
async fn a_client_asking_for_gzip_cannot_hide_the_usage() {
    let (upstream, seen) = compressing_upstream().await;
    let g = start_with(
        BudgetManager::new(),
        &config_text(1_000_000, 100, ""),
        Some(upstream),
    )
    .await;
    let gzip = [
        ("authorization", &*format!("Bearer {KEY_A}")),
        ("accept-encoding", "gzip, deflate, br"),
    ];
    for (path, body) in [
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#,
        ),
        ("/v1/embeddings", r#"{"input":"hi"}"#),
    ] {
        let (status, answer) = raw_request(&g.url, "POST", path, &gzip, body).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(
            answer["usage"]["total_tokens"], 50_000,
            "{path}: uncompressed"
        );
    }
    eventually("both usages are charged", || {
        g.used(AGENT_A).0 == 2 * 50_000
    })
    .await;
    let encodings: Vec<_> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, e)| e.clone())
        .collect();
    assert_eq!(encodings, vec![Some("identity".to_owned()); 2]);
}

#[tokio::test]
async fn a_compressed_request_body_is_415_and_never_forwarded() {
    let g = start(1_000, 100).await;
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1});
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(body.to_string().as_bytes()).unwrap();
    let gzipped = gz.finish().unwrap();
    for encoding in ["gzip", "br", "deflate, gzip"] {
        let r = g
            .client
            .post(format!("{}/v1/chat/completions", g.url))
            .bearer_auth(KEY_A)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_ENCODING, encoding)
            .body(gzipped.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{encoding}");
        let error: Value = r.json().await.unwrap();
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(encoding), "{encoding}: {message}");
    }
    assert_eq!(forwarded(&g), Vec::<String>::new());
    assert_eq!(g.used(AGENT_A), (0, 0));
}

#[tokio::test]
async fn other_endpoints_are_refused_by_default_and_reads_cost_a_call() {
    let g = start(1_000, 100).await;
    for (method, path) in [
        ("POST", "/v1/audio/speech"),
        ("POST", "/v1/moderations"),
        ("POST", "/v1/responses/resp_1/cancel"),
        ("POST", "/v1/chat/Completions"),
        ("PUT", "/v1/chat/completions"),
        ("PATCH", "/v1/responses"),
        ("DELETE", "/v1/files/file-1"),
    ] {
        let (status, body) = g.raw(method, path, KEY_A, r#"{"input":"x"}"#).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
        assert_eq!(body["error"]["code"], "unknown_endpoint", "{body}");
    }
    // A read with a body could be routed as a write by a lax upstream.
    let (status, _) = g
        .raw("GET", "/v1/chat/completions", KEY_A, r#"{"messages":[]}"#)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(forwarded(&g), Vec::<String>::new());
    assert_eq!(g.used(AGENT_A), (0, 0));

    let (status, body) = g.raw("GET", "/v1/models", KEY_A, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"][0]["id"], "mock-model");
    assert_eq!(g.used(AGENT_A), (0, 1), "a read costs one call, no tokens");
}

#[tokio::test]
async fn other_endpoints_at_a_fixed_cost_are_charged_it_or_the_usage_they_report() {
    let text = config_text(
        1_000,
        100,
        "other_endpoints = \"fixed\"\nother_endpoint_tokens = 300",
    );
    let g = start_with(BudgetManager::new(), &text, None).await;
    let r = g
        .post("/v1/moderations", KEY_A, &json!({"input": "x"}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), "700");
    r.bytes().await.unwrap();
    eventually("no usage reported: the fixed cost stays", || {
        g.used(AGENT_A) == (300, 1)
    })
    .await;
    let r = g
        .post(
            "/v1/audio/transcriptions",
            KEY_A,
            &json!({"mock_prompt_tokens": 40, "mock_completion_tokens": 2}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    r.bytes().await.unwrap();
    eventually("the usage reported replaces the fixed cost", || {
        g.used(AGENT_A) == (342, 2)
    })
    .await;
    spend(&g, 400).await;
    let r = g.post("/v1/moderations", KEY_A, &json!({})).await;
    assert_eq!(
        r.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "258 left, 300 asked"
    );
}
