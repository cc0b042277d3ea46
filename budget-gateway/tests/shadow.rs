//! Shadow mode over HTTP: an agent with `enforce = false` is admitted
//! past its limit, its usage still counted, its headers and alerts those
//! of an enforced limit, and `/metrics` counts what would have been
//! refused; the same set through the admin API, and switched back to
//! enforced.

mod common;

use std::sync::{Arc, Mutex};

use agent_budget::BudgetManager;
use common::admin::start_with_db;
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn question(max_tokens: u64) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})
}

/// A's configuration in shadow mode, with `extra` at the top.
fn shadow_config(tokens: u64, calls: u64, extra: &str) -> String {
    config_text(tokens, calls, extra).replacen(
        "metrics_label = \"agent-a\"",
        "metrics_label = \"agent-a\"\nenforce = false",
        1,
    )
}

/// The value of `name{labels}` in the Prometheus text, 0 if absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_agent_is_admitted_past_its_calls_counted_and_alerted() {
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let record = received.clone();
    let hook = serve_on_loopback(axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            record.lock().unwrap().push(body);
            std::future::ready(StatusCode::OK)
        }),
    ))
    .await;
    let alerts = format!("[[alerts]]\nurl = \"{hook}/hook\"\nat = [1.0]\n");
    let g = start_with(
        BudgetManager::new(),
        &shadow_config(1_000_000, 2, &alerts),
        None,
    )
    .await;
    let mut remaining = Vec::new();
    for _ in 0..5 {
        let r = g.chat(KEY_A, &question(5)).await;
        assert_eq!(r.status(), StatusCode::OK, "nothing is refused");
        remaining.push(header(&r, "x-ratelimit-remaining-requests"));
    }
    // The headers are an enforced limit's.
    assert_eq!(remaining, ["1", "0", "0", "0", "0"]);
    assert_eq!(calls(&g.stats), 5, "all five reached the upstream");
    // Tokens and calls are both counted past the limit.
    eventually("every token and call is charged", || {
        g.used(AGENT_A) == (tokens(&g.stats), 5)
    })
    .await;
    let metrics = g.admin("/metrics", None).await.text().await.unwrap();
    assert_eq!(
        metric(
            &metrics,
            "budget_gateway_shadow_refusals_total{agent=\"agent-a\",reason=\"calls\"}"
        ),
        3.0,
        "{metrics}"
    );
    // The view says so.
    let view: Value = admin_view(&g.client, &g.url, &format!("/v1/agents/{AGENT_A}")).await;
    assert_eq!(view["enforce"], false);
    let other: Value = admin_view(&g.client, &g.url, &format!("/v1/agents/{AGENT_B}")).await;
    assert_eq!(other["enforce"], true);
    // The alert fires as for an enforced limit, once, saying it is not.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while received.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no alert");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let alerts = received.lock().unwrap().clone();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["threshold"], 1.0);
    assert_eq!(alerts[0]["limit"]["resource"], "requests");
    assert_eq!(alerts[0]["enforced"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_agent_past_its_tokens_is_charged_what_it_used() {
    let g = start_with(BudgetManager::new(), &shadow_config(300, 100, ""), None).await;
    let mut big = question(500);
    big["mock_completion_tokens"] = json!(400);
    for _ in 0..2 {
        assert_eq!(g.chat(KEY_A, &big).await.status(), StatusCode::OK);
    }
    eventually("the overuse is charged", || {
        g.used(AGENT_A).0 == tokens(&g.stats)
    })
    .await;
    assert!(g.used(AGENT_A).0 > 800, "{:?}", g.used(AGENT_A));
    // An enforced agent with the same limit would have been refused.
    let enforced = start_with(BudgetManager::new(), &config_text(300, 100, ""), None).await;
    assert_eq!(
        enforced.chat(KEY_A, &big).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_is_set_and_cleared_through_the_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("g.db");
    let (upstream, _) = start_mock().await;
    let g = start_with_db(
        &config_text(1_000_000, 1_000, ""),
        db.to_str().unwrap(),
        &upstream,
        None,
    )
    .await;
    let limits = json!([{"window": "1m", "requests": 1, "tokens": 1_000_000}]);
    let agent = g
        .create_agent(json!({"limits": limits, "enforce": false}))
        .await;
    assert_eq!(agent["enforce"], false);
    let id = agent["agent_id"].as_str().unwrap().to_owned();
    let (_, key) = g.create_key(&id).await;
    for _ in 0..3 {
        assert_eq!(g.chat(&key).await, StatusCode::OK);
    }
    let (status, changed) = g
        .call(
            Method::PUT,
            &format!("/v1/agents/{id}"),
            Some(&json!({"limits": limits})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_eq!(changed["enforce"], true, "enforced when left out");
    assert_eq!(g.chat(&key).await, StatusCode::TOO_MANY_REQUESTS);
    // Kept in the database: a restart on it is still enforced, and an
    // agent made in shadow mode stays so.
    let shadow = g
        .create_agent(json!({"limits": limits, "enforce": false}))
        .await;
    let shadow_id = shadow["agent_id"].as_str().unwrap().to_owned();
    g.stop().await;
    let g = start_with_db(
        &config_text(1_000_000, 1_000, ""),
        db.to_str().unwrap(),
        &upstream,
        None,
    )
    .await;
    assert_eq!(g.get(&format!("/v1/agents/{id}")).await["enforce"], true);
    assert_eq!(
        g.get(&format!("/v1/agents/{shadow_id}")).await["enforce"],
        false
    );
}

const TEAM: &str = "5d1e7c2a-0000-4000-8000-00000000a11a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enforced_team_still_refuses_its_shadow_child() {
    let text = format!(
        r#"admin_key = "{ADMIN_KEY}"

[[agents]]
api_key = "{KEY_A}"
agent_id = "{AGENT_A}"
token_budget = 1000000
calls_budget = 1
window_secs = 60
enforce = false
parent = "{TEAM}"
metrics_label = "team-child"

[[agents]]
agent_id = "{TEAM}"
token_budget = 1000000
calls_budget = 3
window_secs = 60
"#
    );
    let g = start_with(BudgetManager::new(), &text, None).await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = g.chat(KEY_A, &question(5)).await;
        statuses.push(r.status().as_u16());
        r.bytes().await.unwrap();
    }
    // The child's one call is passed twice in shadow mode; the team's
    // three calls are enforced.
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    assert_eq!(calls(&g.stats), 3);
    eventually("the settles", || {
        g.used(AGENT_A) == (tokens(&g.stats), 3) && g.used(TEAM) == (tokens(&g.stats), 3)
    })
    .await;
    let metrics = g.admin("/metrics", None).await.text().await.unwrap();
    assert_eq!(
        metric(
            &metrics,
            "budget_gateway_shadow_refusals_total{agent=\"team-child\",reason=\"calls\"}"
        ),
        2.0,
        "only the child's own refusals were let through: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_spend_limit_is_charged_past_its_dollars() {
    let text = format!(
        r#"admin_key = "{ADMIN_KEY}"
tokenizer = "bytes"

[[models]]
name = "gpt-4o*"
input_usd_per_mtok = 2.50
output_usd_per_mtok = 10.00

[[agents]]
api_key = "{KEY_A}"
agent_id = "{AGENT_A}"
enforce = false
metrics_label = "spender"
[[agents.limits]]
window = "1h"
spend_usd = 0.01
"#
    );
    let g = start_with(BudgetManager::new(), &text, None).await;
    // Each request costs 200 × $2.50/M + 100 × $10/M = $0.0015: the
    // seventh would not fit the $0.01, enforced.
    let body = json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 100,
        "mock_prompt_tokens": 200,
        "mock_completion_tokens": 100,
    });
    for i in 1..=10u64 {
        let r = g.chat(KEY_A, &body).await;
        assert_eq!(r.status(), StatusCode::OK, "request {i}");
        r.bytes().await.unwrap();
        eventually("the settle", || {
            g.budgets
                .all_full_info()
                .iter()
                .any(|info| info.token_limit == 10_000 && info.tokens_used == 1_500 * i)
        })
        .await;
    }
    let agent: Value = admin_view(&g.client, &g.url, &format!("/v1/agents/{AGENT_A}")).await;
    assert_eq!(
        agent["limits"][0]["used"]["spend_usd"],
        json!(0.015),
        "{agent}"
    );
    let metrics = g.admin("/metrics", None).await.text().await.unwrap();
    assert_eq!(
        metric(
            &metrics,
            "budget_gateway_shadow_refusals_total{agent=\"spender\",reason=\"tokens\"}"
        ),
        4.0,
        "{metrics}"
    );
}
