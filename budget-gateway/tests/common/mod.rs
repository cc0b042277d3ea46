//! Servers on loopback ports for the gateway's tests.

#![allow(dead_code)]

pub mod admin;
pub mod postgres;
pub mod process;
pub mod redis;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_budget::BudgetManager;
use budget_gateway::config;
use budget_gateway::gateway::{Gateway, Limiter};
use budget_gateway::mock::MockStats;
use reqwest::StatusCode;
use serde_json::Value;

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
    let (url, stats, _) = start_recording_mock().await;
    (url, stats)
}

/// What an upstream received: each request's method and path, and the
/// `accept-encoding` it was sent with.
pub type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// The mock upstream, recording every request it receives, whatever its
/// path (the mock's own books count only what it served).
pub async fn start_recording_mock() -> (String, Arc<MockStats>, Seen) {
    let (router, stats) = budget_gateway::mock::router();
    let seen = Seen::default();
    let record = seen.clone();
    let router = router.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            let encoding = request
                .headers()
                .get("accept-encoding")
                .map(|v| v.to_str().unwrap_or("?").to_owned());
            record
                .lock()
                .unwrap()
                .push((format!("{} {}", request.method(), request.uri()), encoding));
            next.run(request)
        },
    ));
    (serve_on_loopback(router).await, stats, seen)
}

/// Serves `router` on a free loopback port, for the rest of the test;
/// returns its URL.
pub async fn serve_on_loopback(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

/// A gateway in process in front of the mock (or `upstream`), its
/// budgets, and the mock's books.
pub struct Running {
    pub url: String,
    pub budgets: Arc<BudgetManager>,
    pub stats: Arc<MockStats>,
    pub seen: Seen,
    pub client: reqwest::Client,
}

/// A gateway with the configuration `text` and the manager `budgets`, in
/// front of the mock or `upstream`.
pub async fn start_with(budgets: BudgetManager, text: &str, upstream: Option<String>) -> Running {
    let (mock_url, stats, seen) = start_recording_mock().await;
    let config = config::parse(Path::new("test.toml"), text).unwrap();
    let budgets = Arc::new(budgets);
    let gateway = Gateway::new(
        config,
        budgets.clone(),
        upstream.as_deref().unwrap_or(&mock_url),
        Duration::from_secs(10),
        Limiter::Budget,
        None,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(gateway.serve(listener, std::future::pending()));
    Running {
        url,
        budgets,
        stats,
        seen,
        client: reqwest::Client::new(),
    }
}

/// A gateway with [`config_text`]'s agents, agent A's budget `tokens` and
/// `calls` a minute.
pub async fn start(tokens: u64, calls: u64) -> Running {
    start_with(BudgetManager::new(), &config_text(tokens, calls, ""), None).await
}

impl Running {
    pub async fn post(&self, path: &str, key: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.url))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn chat(&self, key: &str, body: &Value) -> reqwest::Response {
        self.post("/v1/chat/completions", key, body).await
    }

    pub async fn admin(&self, path: &str, key: Option<&str>) -> reqwest::Response {
        let mut request = self.client.get(format!("{}{path}", self.url));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send().await.unwrap()
    }

    /// Agent `agent`'s tokens and calls used.
    pub fn used(&self, agent: &str) -> (u64, u64) {
        let info = self.budgets.full_info(&agent.parse().unwrap()).unwrap();
        (info.tokens_used, info.calls_used)
    }

    /// Sends `method path` with `key` and `body`, the path spelled exactly
    /// as given (reqwest would resolve dot segments first).
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: &str,
    ) -> (StatusCode, Value) {
        raw_request(
            &self.url,
            method,
            path,
            &[("authorization", &format!("Bearer {key}"))],
            body,
        )
        .await
    }
}

/// Sends one request on a connection of its own, with the path spelled
/// exactly as given; returns the status and the body as JSON (`null` if it
/// is not JSON).
pub async fn raw_request(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, Value) {
    use http_body_util::BodyExt;
    let authority = base.trim_start_matches("http://");
    let stream = tokio::net::TcpStream::connect(authority).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", authority)
        .header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_owned(),
        )))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
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
