//! Alerts received by a webhook on loopback: each crossing once per
//! window (however many requests cross it together), again in the next
//! window, with the refusal's reason when a refusal crossed it, retried
//! while the webhook is down, and delivered within a second when it is up.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_budget::BudgetManager;
use budget_gateway::config;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// A webhook on a loopback port: what it accepted, how often it was
/// tried, and a switch that makes it answer `503`.
#[derive(Clone, Default)]
struct Hook {
    received: Arc<Mutex<Vec<(Instant, Value)>>>,
    tries: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
    secrets: Arc<Mutex<Vec<String>>>,
}

impl Hook {
    async fn start() -> (Hook, String) {
        let hook = Hook::default();
        let state = hook.clone();
        let router = axum::Router::new().route(
            "/hook",
            axum::routing::post(
                move |headers: http::HeaderMap, axum::Json(body): axum::Json<Value>| {
                    let state = state.clone();
                    async move {
                        state.tries.fetch_add(1, Ordering::SeqCst);
                        if state.down.load(Ordering::SeqCst) {
                            return StatusCode::SERVICE_UNAVAILABLE;
                        }
                        let secret = headers
                            .get("x-hook-secret")
                            .map(|v| v.to_str().unwrap().to_owned())
                            .unwrap_or_default();
                        state.secrets.lock().unwrap().push(secret);
                        state.received.lock().unwrap().push((Instant::now(), body));
                        StatusCode::NO_CONTENT
                    }
                },
            ),
        );
        let url = serve_on_loopback(router).await;
        (hook, format!("{url}/hook"))
    }

    fn bodies(&self) -> Vec<Value> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| b.clone())
            .collect()
    }

    /// Waits (at most 10 s) until `n` alerts were received; when the
    /// last arrived.
    async fn wait_for(&self, n: usize) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((at, _)) = self.received.lock().unwrap().get(n - 1) {
                return *at;
            }
            assert!(
                Instant::now() < deadline,
                "{n} alerts never arrived: {:?}",
                self.bodies()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Checks that nothing more than `n` alerts arrives for a while
    /// (three scans and a delivery).
    async fn still(&self, n: usize) {
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(self.bodies().len(), n, "{:#?}", self.bodies());
    }
}

fn alerts_config(hook: &str, at: &str) -> String {
    format!(
        "[[alerts]]\nurl = \"{hook}\"\nat = {at}\nheaders = {{ \"x-hook-secret\" = \"s3cret\" }}\n"
    )
}

fn question() -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_crossing_is_sent_once_per_window_and_again_in_the_next() {
    let (hook, url) = Hook::start().await;
    let (clock, mock) = quanta::Clock::mock();
    // A: four requests a minute.
    let text = config_text(1_000_000, 4, "").replacen(
        "\n[[agents]]",
        &format!("\n{}\n[[agents]]", alerts_config(&url, "[1.0, 0.5]")),
        1,
    );
    let g = start_with(BudgetManager::with_clock(clock), &text, None).await;

    // Two at once cross a half: one alert.
    let sent = Instant::now();
    let q = question();
    let (a, b) = tokio::join!(g.chat(KEY_A, &q), g.chat(KEY_A, &q));
    assert_eq!((a.status(), b.status()), (StatusCode::OK, StatusCode::OK));
    let arrived = hook.wait_for(1).await;
    let latency = arrived.duration_since(sent);
    eprintln!(
        "alerts test: crossing delivered {} ms after the requests",
        latency.as_millis()
    );
    assert!(latency < Duration::from_secs(1), "{latency:?}");
    let alert = &hook.bodies()[0];
    assert_eq!(alert["agent_id"], AGENT_A);
    assert_eq!(alert["metrics_label"], "agent-a");
    assert_eq!(
        alert["limit"],
        json!({"window": "1m", "refill": null, "resource": "requests", "model": null, "amount": 4})
    );
    assert_eq!(alert["threshold"], 0.5);
    assert_eq!(alert["used"], 2);
    assert_eq!(alert["enforced"], true);
    assert_eq!(alert["reason"], Value::Null);
    let resets: chrono::DateTime<chrono::Utc> =
        alert["window_resets_at"].as_str().unwrap().parse().unwrap();
    let at: chrono::DateTime<chrono::Utc> = alert["at"].as_str().unwrap().parse().unwrap();
    let ahead = (resets - at).num_seconds();
    assert!(
        (59..=60).contains(&ahead),
        "the mock clock's window: {ahead}"
    );
    assert_eq!(*hook.secrets.lock().unwrap(), ["s3cret"]);

    // Three of four: nothing new.
    assert_eq!(g.chat(KEY_A, &question()).await.status(), StatusCode::OK);
    hook.still(1).await;
    // Four of four: the whole limit, once; the refusal after it adds
    // nothing in this window.
    assert_eq!(g.chat(KEY_A, &question()).await.status(), StatusCode::OK);
    hook.wait_for(2).await;
    assert_eq!(hook.bodies()[1]["threshold"], 1.0);
    assert_eq!(hook.bodies()[1]["used"], 4);
    assert_eq!(
        g.chat(KEY_A, &question()).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    hook.still(2).await;

    // The window ends (time moves on as it does, in steps the scan
    // sees): the next crossing is sent again.
    mock.increment(Duration::from_secs(30));
    tokio::time::sleep(Duration::from_millis(500)).await;
    mock.increment(Duration::from_secs(31));
    tokio::time::sleep(Duration::from_millis(500)).await;
    hook.still(2).await;
    let q = question();
    let (a, b) = tokio::join!(g.chat(KEY_A, &q), g.chat(KEY_A, &q));
    assert_eq!((a.status(), b.status()), (StatusCode::OK, StatusCode::OK));
    hook.wait_for(3).await;
    assert_eq!(hook.bodies()[2]["threshold"], 0.5);
    hook.still(3).await;
    // B, with plenty left, never alerted.
    assert!(hook.bodies().iter().all(|b| b["agent_id"] == AGENT_A));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_alerts_with_its_reason() {
    let (hook, url) = Hook::start().await;
    // A: 300 tokens a minute; a request that may use 500 is refused.
    let text = config_text(300, 100, "").replacen(
        "\n[[agents]]",
        &format!("\n{}\n[[agents]]", alerts_config(&url, "[0.8, 1.0]")),
        1,
    );
    let g = start_with(BudgetManager::new(), &text, None).await;
    let mut big = question();
    big["max_tokens"] = json!(500);
    assert_eq!(
        g.chat(KEY_A, &big).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    hook.wait_for(2).await;
    hook.still(2).await;
    let mut seen: Vec<(f64, String, String)> = hook
        .bodies()
        .iter()
        .map(|b| {
            (
                b["threshold"].as_f64().unwrap(),
                b["limit"]["resource"].as_str().unwrap().to_owned(),
                b["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    seen.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(
        seen,
        [
            (0.8, "tokens".to_owned(), "tokens".to_owned()),
            (1.0, "tokens".to_owned(), "tokens".to_owned())
        ]
    );
    assert_eq!(hook.bodies()[0]["used"], 0, "nothing was used: refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_are_retried_while_the_webhook_is_down() {
    let (hook, url) = Hook::start().await;
    hook.down.store(true, Ordering::SeqCst);
    let text = config_text(1_000_000, 2, "").replacen(
        "\n[[agents]]",
        &format!("\n{}\n[[agents]]", alerts_config(&url, "[0.5]")),
        1,
    );
    let g = start_with(BudgetManager::new(), &text, None).await;
    assert_eq!(g.chat(KEY_A, &question()).await.status(), StatusCode::OK);
    // Down for a while: tried, and tried again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while hook.tries.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "not retried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(hook.bodies().is_empty());
    // Up again: delivered, once.
    hook.down.store(false, Ordering::SeqCst);
    hook.wait_for(1).await;
    hook.still(1).await;
    assert_eq!(hook.bodies()[0]["threshold"], 0.5);
    assert!(hook.tries.load(Ordering::SeqCst) >= 4);
    let metrics = g
        .client
        .get(format!("{}/metrics", g.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("budget_gateway_alerts_sent_total"),
        "{metrics}"
    );
}

#[test]
fn bad_alerts_are_refused_with_their_line() {
    for (entry, says) in [
        ("url = \"https://x/hook\"\nat = [0.8]", "http://"),
        ("url = \"http://x/hook\"\nat = []", "at least one"),
        ("url = \"http://x/hook\"\nat = [0.0]", "above 0"),
        (
            "url = \"http://x/hook\"\nat = [0.8]\nheaders = { \"bad header\" = \"x\" }",
            "not a valid header name",
        ),
        (
            "url = \"http://x/hook\"\nat = [0.8]\nsecret = 1",
            "unknown field",
        ),
    ] {
        let text = format!("admin_key = \"k\"\n\n[[alerts]]\n{entry}\n");
        let e = config::parse(Path::new("g.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("g.toml:"), "{e}");
        assert!(e.contains(says), "{entry}: {e}");
    }
    let text = "admin_key = \"k\"\n[[alerts]]\nurl = \"http://x/hook\"\nat = [1.0, 0.8, 0.8]\n";
    let config = config::parse(Path::new("g.toml"), text).unwrap();
    assert_eq!(config.alerts[0].at, [0.8, 1.0]);
}
