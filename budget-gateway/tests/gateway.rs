//! The gateway in process, on loopback ports, in front of the mock
//! upstream, driven by reqwest over real HTTP.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_budget::BudgetManager;
use agent_budget_tower::openai::TokenCounter;
use budget_gateway::config::{self, Tokenizer};
use budget_gateway::gateway::{Gateway, Limiter};
use budget_gateway::tokenizer::Counter;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

const QUESTION: &str = "What is the capital of France? Answer in one word.";

fn question(max_tokens: u64) -> Value {
    json!({"model": "gpt-4o", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens})
}

/// What the gateway reserves for `question(n)` while the budget has room:
/// OpenAI's framing (3 per message, 3 to prime the reply) around one token
/// per byte of the text, plus `n`.
fn question_bound(max_tokens: u64) -> u64 {
    3 + QUESTION.len() as u64 + 3 + max_tokens
}

/// The same with the prompt counted (o200k), as reserved where the bound
/// does not fit, or with `count_prompts = "always"`.
fn question_counted(max_tokens: u64) -> u64 {
    3 + Counter::new(Tokenizer::O200kBase).count(QUESTION) + 3 + max_tokens
}

#[tokio::test]
async fn missing_or_unknown_keys_are_401_and_nothing_is_forwarded() {
    let g = start(10_000, 100).await;
    let r = g
        .client
        .post(format!("{}/v1/chat/completions", g.url))
        .json(&question(10))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let error: Value = r.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_api_key");
    assert_eq!(
        g.chat("sk-unknown", &question(10)).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let r = g
        .client
        .post(format!("{}/v1/chat/completions", g.url))
        .header("authorization", "Bearer \u{7f}")
        .body("{}")
        .send()
        .await;
    // A header reqwest refuses to send is no test of ours; one it sends
    // must be refused.
    if let Ok(r) = r {
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(calls(&g.stats), 0);
    assert_eq!(g.used(AGENT_A), (0, 0));
}

#[tokio::test]
async fn bodies_that_are_not_valid_requests_are_400_and_nothing_is_charged() {
    let g = start(10_000, 100).await;
    for body in [
        "{not json",
        "",
        "[]",
        r#"{"messages":[],"max_tokens":1e30}"#,
        r#"{"messages":[],"max_tokens":-5}"#,
        r#"{"messages":[],"max_tokens":"many"}"#,
        r#"{"messages":[{"content":{"nested":true}}]}"#,
    ] {
        let r = g
            .client
            .post(format!("{}/v1/chat/completions", g.url))
            .bearer_auth(KEY_A)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{body:?}");
        let error: Value = r.json().await.unwrap();
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }
    assert_eq!(calls(&g.stats), 0);
    assert_eq!(g.used(AGENT_A), (0, 0));
}

#[tokio::test]
async fn a_chat_completion_reserves_the_estimate_and_settles_the_upstreams_usage() {
    let g = start(10_000, 100).await;
    let r = g.chat(KEY_A, &question(50)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "10000");
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "100");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "99");
    assert_eq!(
        header(&r, "x-ratelimit-remaining-tokens"),
        (10_000 - question_bound(50)).to_string()
    );
    assert!(header(&r, "x-ratelimit-reset-tokens").ends_with('s'));
    let body: Value = r.json().await.unwrap();
    let used = body["usage"]["total_tokens"].as_u64().unwrap();
    eventually("the settle", || g.used(AGENT_A) == (used, 1)).await;
    assert_eq!(used, tokens(&g.stats));

    // The admin view shows the same, with the seed's field names.
    let r = g
        .admin(&format!("/v1/budgets/{AGENT_A}"), Some(ADMIN_KEY))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let info: Value = r.json().await.unwrap();
    assert_eq!(info["agent_id"], AGENT_A);
    assert_eq!(info["token_limit"], 10_000);
    assert_eq!(info["tokens_used"], used);
    assert_eq!(info["tokens_remaining"], 10_000 - used);
    assert_eq!(info["calls_limit"], 100);
    assert_eq!(info["calls_used"], 1);
    assert_eq!(info["calls_remaining"], 99);
    assert_eq!(info["window_secs"], 60);
    assert!(info["window_remaining_secs"].as_u64().unwrap() <= 60);
    assert_eq!(info["is_exhausted"], false);
}

#[tokio::test]
async fn legacy_completions_are_estimated_and_settled_too() {
    let g = start(10_000, 100).await;
    let r = g
        .post(
            "/v1/completions",
            KEY_A,
            &json!({"model": "m", "prompt": "Say this is a test", "max_tokens": 7}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let prompt = "Say this is a test".len() as u64;
    assert_eq!(
        header(&r, "x-ratelimit-remaining-tokens"),
        (10_000 - prompt - 7).to_string()
    );
    let body: Value = r.json().await.unwrap();
    let used = body["usage"]["total_tokens"].as_u64().unwrap();
    eventually("the settle", || g.used(AGENT_A) == (used, 1)).await;
}

#[tokio::test]
async fn a_prompt_is_counted_where_its_bound_does_not_fit_or_when_configured() {
    // Room for the count, not for the bound: admitted on the count.
    let room = question_counted(50) + 10;
    assert!(room < question_bound(50));
    let g = start(room, 100).await;
    let r = g.chat(KEY_A, &question(50)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), "10");
    let body: Value = r.json().await.unwrap();
    let used = body["usage"]["total_tokens"].as_u64().unwrap();
    eventually("the settle", || g.used(AGENT_A) == (used, 1)).await;
    // Less room than the count: refused, on the count.
    let r = g.chat(KEY_A, &question(50)).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let error: Value = r.json().await.unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    let counted = format!("requested {} tokens", question_counted(50));
    assert!(message.contains(&counted), "{message}");
    assert_eq!(calls(&g.stats), 1);

    // `count_prompts = "always"`: the count, even with room for the bound.
    let text = config_text(10_000, 100, "count_prompts = \"always\"");
    let g = start_with(BudgetManager::new(), &text, None).await;
    let r = g.chat(KEY_A, &question(50)).await;
    assert_eq!(
        header(&r, "x-ratelimit-remaining-tokens"),
        (10_000 - question_counted(50)).to_string()
    );
}

#[tokio::test]
async fn a_stream_passes_its_events_and_settles_from_the_usage_chunk() {
    let g = start(10_000, 100).await;
    let mut body = question(5);
    body["stream"] = json!(true);
    let r = g.chat(KEY_A, &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-type"), "text/event-stream");
    let text = r.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    // Five one-token chunks and [DONE]; the usage chunk the gateway asked
    // for is not shown.
    assert_eq!(events.len(), 6, "{text}");
    assert_eq!(events[5], "data: [DONE]");
    assert!(!text.contains("total_tokens"), "{text}");
    eventually("the settle", || g.used(AGENT_A) == (tokens(&g.stats), 1)).await;

    // A client that asks for usage sees it.
    body["stream_options"] = json!({"include_usage": true});
    let text = g.chat(KEY_A, &body).await.text().await.unwrap();
    assert!(text.contains("\"total_tokens\""), "{text}");
    eventually("the second settle", || {
        g.used(AGENT_A) == (tokens(&g.stats), 2)
    })
    .await;
}

#[tokio::test]
async fn overuse_is_charged_past_the_limit_and_the_next_request_is_refused() {
    let (clock, mock) = quanta::Clock::mock();
    let g = start_with(
        BudgetManager::with_clock(clock),
        &config_text(1_000, 100, ""),
        None,
    )
    .await;
    let mut body = question(10);
    body["mock_completion_tokens"] = json!(2_000);
    assert_eq!(g.chat(KEY_A, &body).await.status(), StatusCode::OK);
    eventually("the overrun is charged", || {
        g.used(AGENT_A).0 == tokens(&g.stats)
    })
    .await;
    assert!(g.used(AGENT_A).0 > 1_000);

    mock.increment(Duration::from_millis(59_250));
    let r = g.chat(KEY_A, &question(1)).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&r, "retry-after"), "1");
    assert_eq!(header(&r, "x-ratelimit-reset-tokens"), "750ms");
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), "0");
    let error: Value = r.json().await.unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert_eq!(calls(&g.stats), 1);

    // A new window: admitted again.
    mock.increment(Duration::from_millis(750));
    assert_eq!(g.chat(KEY_A, &question(1)).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_unreachable_upstream_is_502_and_consumes_nothing() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let g = start_with(
        BudgetManager::new(),
        &config_text(10_000, 100, ""),
        Some(closed),
    )
    .await;
    let r = g.chat(KEY_A, &question(10)).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let error: Value = r.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("upstream"),
        "{error}"
    );
    eventually("the cancel", || g.used(AGENT_A) == (0, 0)).await;
}

#[tokio::test]
async fn an_upstream_error_status_is_passed_on_and_consumes_nothing() {
    let g = start(10_000, 100).await;
    let mut body = question(10);
    body["mock_status"] = json!(503);
    let r = g.chat(KEY_A, &body).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "mock_error"
    );
    eventually("the cancel", || g.used(AGENT_A) == (0, 0)).await;
}

#[tokio::test]
async fn the_admin_view_needs_the_admin_key() {
    let g = start(10_000, 100).await;
    assert_eq!(
        g.admin("/v1/budgets", None).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        g.admin("/v1/budgets", Some(KEY_A)).await.status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        g.admin("/v1/budgets", Some("nope")).await.status(),
        StatusCode::FORBIDDEN
    );
    let path = format!("/v1/budgets/{AGENT_A}");
    assert_eq!(
        g.admin(&path, None).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        g.admin(&path, Some(KEY_B)).await.status(),
        StatusCode::FORBIDDEN
    );
    let all: Vec<Value> = admin_view(&g.client, &g.url, "/v1/budgets").await;
    let mut ids: Vec<&str> = all
        .iter()
        .map(|i| i["agent_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, [AGENT_B, AGENT_A]);
    let unknown = "/v1/budgets/00000000-0000-0000-0000-000000000000";
    assert_eq!(
        g.admin(unknown, Some(ADMIN_KEY)).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        g.admin("/v1/budgets/xyz", Some(ADMIN_KEY)).await.status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(calls(&g.stats), 0);
}

#[tokio::test]
async fn metrics_count_admissions_refusals_and_tokens_with_labels_only_where_asked() {
    // A label no other test uses: the metrics registry is per process.
    let text = config_text(10_000, 1, "").replace("\"agent-a\"", "\"metrics-test\"");
    let g = start_with(BudgetManager::new(), &text, None).await;
    assert_eq!(g.chat(KEY_A, &question(10)).await.status(), StatusCode::OK);
    assert_eq!(
        g.chat(KEY_A, &question(10)).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(g.chat(KEY_B, &question(10)).await.status(), StatusCode::OK);
    assert_eq!(
        g.chat("sk-nobody", &question(10)).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let used_a = g.used(AGENT_A).0;
    eventually("settles", || g.used(AGENT_B).1 == 1).await;
    let text = g
        .client
        .get(format!("{}/metrics", g.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    // Agent A asked for a label: its series counts this test's agent A.
    assert_eq!(
        value("agent_budget_requests_admitted_total{agent=\"metrics-test\"}"),
        1.0
    );
    assert_eq!(
        value("agent_budget_requests_refused_total{agent=\"metrics-test\",reason=\"calls\"}"),
        1.0
    );
    assert_eq!(
        value("agent_budget_tokens_charged_total{agent=\"metrics-test\"}"),
        used_a as f64
    );
    assert!(value("agent_budget_requests_refused_total{reason=\"unidentified\"}") >= 1.0);
    assert!(value("agent_budget_tokens_reserved_total ") >= 1.0);
    assert!(text.contains("agent_budget_check_seconds"), "{text}");
    assert!(!text.contains(AGENT_B), "agent B asked for no label");
}

#[tokio::test]
async fn sixty_four_clients_on_one_key_get_exactly_the_budget() {
    let g = Arc::new(start(10_000_000, 100).await);
    let refused = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..64)
        .map(|i| {
            let (g, refused) = (g.clone(), refused.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut admitted = 0u64;
                for j in 0..3u64 {
                    let mut body = question(20);
                    body["mock_completion_tokens"] = json!((i * 3 + j) % 17 + 1);
                    let r = client
                        .post(format!("{}/v1/chat/completions", g.url))
                        .bearer_auth(KEY_A)
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    match r.status() {
                        StatusCode::OK => admitted += 1,
                        StatusCode::TOO_MANY_REQUESTS => {
                            refused.fetch_add(1, Ordering::SeqCst);
                        }
                        other => panic!("unexpected {other}"),
                    }
                    // Read the body: the settle happens at its end.
                    r.bytes().await.unwrap();
                }
                admitted
            })
        })
        .collect();
    let mut admitted = 0;
    for c in clients {
        admitted += c.await.unwrap();
    }
    assert_eq!(admitted, 100);
    assert_eq!(refused.load(Ordering::SeqCst), 64 * 3 - 100);
    assert_eq!(calls(&g.stats), 100, "the upstream saw exactly the budget");
    eventually("every settle", || {
        g.used(AGENT_A) == (tokens(&g.stats), 100)
    })
    .await;
}

#[tokio::test]
async fn headers_are_forwarded_but_hop_by_hop_ones_and_the_clients_key_are_not() {
    use axum::routing::get;
    // An upstream that answers with the headers it received.
    let echo = axum::Router::new().route(
        "/v1/echo",
        get(|headers: http::HeaderMap| async move {
            let map: serde_json::Map<String, Value> = headers
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or("?"))))
                .collect();
            axum::Json(Value::Object(map))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, echo).await.unwrap() });
    let text = config_text(10_000, 100, "upstream_api_key = \"sk-upstream\"");
    let g = start_with(BudgetManager::new(), &text, Some(upstream.clone())).await;
    let r = g
        .client
        .get(format!("{}/v1/echo?x=1", g.url))
        .bearer_auth(KEY_A)
        .header("x-custom", "kept")
        .header("connection", "x-private")
        .header("x-private", "dropped")
        .header("proxy-authorization", "dropped")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["authorization"], "Bearer sk-upstream");
    assert_eq!(seen["x-custom"], "kept");
    assert_eq!(seen["host"], upstream.trim_start_matches("http://"));
    for dropped in ["x-private", "proxy-authorization"] {
        assert!(
            seen.get(dropped).is_none(),
            "{dropped} was forwarded: {seen}"
        );
    }
    // Any request under /v1/ costs a call.
    eventually("the settle", || g.used(AGENT_A).1 == 1).await;
}

const TEAM: &str = "5d1e7c2a-0000-4000-8000-00000000a11a";

/// Keys A and B (100 calls a minute each) under a team without a key of
/// its own (7 calls a minute).
fn team_config() -> String {
    let under = |id: &str| format!("agent_id = \"{id}\"\nparent = \"{TEAM}\"");
    format!(
        "{}\n[[agents]]\nagent_id = \"{TEAM}\"\ntoken_budget = 1000000\ncalls_budget = 7\nwindow_secs = 60\n",
        config_text(1_000_000, 100, "")
            .replace("calls_budget = 1000000", "calls_budget = 100")
            .replace(&format!("agent_id = \"{AGENT_A}\""), &under(AGENT_A))
            .replace(&format!("agent_id = \"{AGENT_B}\""), &under(AGENT_B))
    )
}

#[tokio::test]
async fn two_keys_under_one_team_get_exactly_the_teams_budget_between_them() {
    let g = Arc::new(start_with(BudgetManager::new(), &team_config(), None).await);
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let g = g.clone();
            tokio::spawn(async move {
                let key = if i % 2 == 0 { KEY_A } else { KEY_B };
                let r = g.chat(key, &question(4)).await;
                let status = r.status();
                if status == StatusCode::TOO_MANY_REQUESTS {
                    // The team refused: its figures, its window.
                    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "7");
                    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
                    let error: Value = r.json().await.unwrap();
                    let message = error["error"]["message"].as_str().unwrap();
                    assert!(
                        message.contains(&format!("at its ancestor {TEAM}")),
                        "{message}"
                    );
                } else {
                    r.bytes().await.unwrap();
                }
                (key, status)
            })
        })
        .collect();
    let mut admitted = Vec::new();
    for task in tasks {
        let (key, status) = task.await.unwrap();
        if status == StatusCode::OK {
            admitted.push(key);
        } else {
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        }
    }
    assert_eq!(admitted.len(), 7, "the team's budget, whoever asked");
    assert_eq!(calls(&g.stats), 7);
    let by_a = admitted.iter().filter(|k| **k == KEY_A).count() as u64;
    assert_eq!(g.used(AGENT_A).1, by_a);
    assert_eq!(g.used(AGENT_B).1, 7 - by_a);
    assert_eq!(g.used(TEAM).1, 7);
    // The admin view lists the team, and each key's parent.
    let all: Vec<Value> = admin_view(&g.client, &g.url, "/v1/budgets").await;
    assert_eq!(all.len(), 3);
    for info in &all {
        let id = info["agent_id"].as_str().unwrap();
        if id == TEAM {
            assert!(info.get("parent").is_none(), "{info}");
            assert_eq!(info["calls_used"], 7);
            assert_eq!(info["is_exhausted"], true);
        } else {
            assert_eq!(info["parent"], TEAM, "{info}");
        }
    }
    // The team has no key: nobody can spend it directly.
    assert_eq!(
        g.chat(TEAM, &question(4)).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn the_configuration_decides_parents_over_a_restored_state() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let (a, b) = (AGENT_A.parse().unwrap(), AGENT_B.parse().unwrap());
    // A state saved when A was under B.
    let old = BudgetManager::new();
    let config = config::parse(Path::new("old.toml"), &config_text(1_000, 10, "")).unwrap();
    for agent in &config.agents {
        old.set_budget(agent.limit.clone());
    }
    old.set_parent(&a, Some(&b)).unwrap();
    old.persist(&state).unwrap();
    // Now B is under A: linked as the file says, though linking B under A
    // while A is still under B would close a loop.
    let text = config_text(1_000, 10, "").replace(
        &format!("agent_id = \"{AGENT_B}\""),
        &format!("agent_id = \"{AGENT_B}\"\nparent = \"{AGENT_A}\""),
    );
    let budgets = Arc::new(BudgetManager::new());
    let config = config::parse(Path::new("new.toml"), &text).unwrap();
    let (mock_url, _) = start_mock().await;
    Gateway::new(
        config,
        budgets.clone(),
        &mock_url,
        Duration::from_secs(10),
        Limiter::Budget,
        Some(state),
    )
    .unwrap();
    let chain = |agent| -> Vec<String> {
        budgets
            .chain_info(&agent)
            .iter()
            .map(|i| i.agent_id.to_string())
            .collect()
    };
    assert_eq!(chain(a), [AGENT_A]);
    assert_eq!(chain(b), [AGENT_B, AGENT_A]);
}
