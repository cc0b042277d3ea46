//! Servers on loopback ports for the gateway's tests.

#![allow(dead_code)]

pub mod redis;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use budget_gateway::mock::MockStats;

pub const ADMIN_KEY: &str = "admin-secret";
pub const KEY_A: &str = "sk-agent-a";
pub const KEY_B: &str = "sk-agent-b";
pub const AGENT_A: &str = "7f9c24e8-3b1a-4c5d-9e2f-1a2b3c4d5e6f";
pub const AGENT_B: &str = "0b3c9a30-4f2e-4b8a-9d41-6c0e2f7a1b55";

/// A configuration with agents A (`tokens`, `calls` per minute, a
/// metrics label) and B (large budgets), and `extra` lines at the top.
pub fn config_text(tokens: u64, calls: u64, extra: &str) -> String {
    format!(
        r#"admin_key = "{ADMIN_KEY}"
{extra}

[[agents]]
api_key = "{KEY_A}"
agent_id = "{AGENT_A}"
token_budget = {tokens}
calls_budget = {calls}
window_secs = 60
metrics_label = "agent-a"

[[agents]]
api_key = "{KEY_B}"
agent_id = "{AGENT_B}"
token_budget = 1000000
calls_budget = 1000000
window_secs = 60
"#
    )
}

/// The mock upstream on a free loopback port: its URL and its counters.
pub async fn start_mock() -> (String, Arc<MockStats>) {
    let (router, stats) = budget_gateway::mock::router();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (url, stats)
}

pub fn calls(stats: &MockStats) -> u64 {
    stats.calls.load(Ordering::SeqCst)
}

pub fn tokens(stats: &MockStats) -> u64 {
    stats.total_tokens.load(Ordering::SeqCst)
}

/// Retries `check` every 10 ms for at most 5 s; panics with `what` if it
/// never holds.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

/// The admin view at `base` (`http://host:port`) and `path` (`/v1/budgets`
/// or `/v1/budgets/{agent}`), read with the admin key; anything but `200`
/// fails the test.
pub async fn admin_view<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    base: &str,
    path: &str,
) -> T {
    let r = client
        .get(format!("{base}{path}"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK, "GET {base}{path}");
    r.json().await.unwrap()
}

/// The value of header `name`; a missing one fails the test with its name.
pub fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
        .to_owned()
}
