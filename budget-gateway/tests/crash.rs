//! A `kill -9` under load: the usage restored at the next start is short
//! of what the upstream served by at most 100 ms of admissions (the
//! journal's group commit is 50 ms), and above it by at most the requests
//! that were in flight.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::*;
use common::*;
use serde_json::{json, Value};

/// Tokens the mock reports for one [`REQUEST`] at most: its prompt's words
/// and its `max_tokens`.
const MOST_PER_REQUEST: u64 = 4 + 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kill_9_under_load_the_restored_usage_is_within_100_ms_of_admissions() {
    let (upstream, stats) = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    let state = dir.path().join("state.json");
    // Snapshots an hour apart: only the journal can keep what is admitted.
    std::fs::write(
        &config,
        config_text(1_000_000_000, 1_000_000_000, "persist_interval_secs = 3600"),
    )
    .unwrap();
    let addr = free_addr();
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--listen",
        &addr,
        "--upstream",
        &upstream,
        "--state",
        state.to_str().unwrap(),
    ];
    let mut gateway = spawn(&args);
    wait_listening(&addr, &mut gateway);

    let running = Arc::new(AtomicBool::new(true));
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (running, addr) = (running.clone(), addr.clone());
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let body = json!({"messages": [{"role": "user", "content": "one two three four"}], "max_tokens": 8});
            // Bounded: the kill ends it well before.
            for _ in 0..1_000_000 {
                if !running.load(Ordering::SeqCst) {
                    return;
                }
                let sent = client
                    .post(format!("http://{addr}/v1/chat/completions"))
                    .bearer_auth(KEY_A)
                    .json(&body)
                    .send()
                    .await;
                match sent {
                    Ok(r) => {
                        let _ = r.bytes().await;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }));
    }
    // Under load for a while, then killed in the middle of it.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    gateway.0.kill().unwrap();
    let _ = gateway.0.wait();
    let elapsed = started.elapsed();
    running.store(false, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }
    let (served_calls, served_tokens) = (calls(&stats), tokens(&stats));
    assert!(
        served_calls > 100,
        "too little load to tell: {served_calls}"
    );

    let addr = free_addr();
    let mut args = args.map(str::to_owned);
    args[3] = addr.clone();
    let mut gateway = spawn(&args.each_ref().map(String::as_str));
    wait_listening(&addr, &mut gateway);
    let client = reqwest::Client::new();
    let info: Value = admin_view(
        &client,
        &format!("http://{addr}"),
        &format!("/v1/budgets/{AGENT_A}"),
    )
    .await;
    let restored_calls = info["calls_used"].as_u64().unwrap();
    let restored_tokens = info["tokens_used"].as_u64().unwrap();

    // 100 ms of admissions at the rate the load ran at, rounded up.
    let per_100ms = (served_calls as f64 * 0.1 / elapsed.as_secs_f64()).ceil() as u64 + 1;
    eprintln!(
        "served {served_calls} calls, {served_tokens} tokens in {elapsed:?}; restored \
         {restored_calls} calls, {restored_tokens} tokens; 100 ms is {per_100ms} calls"
    );
    assert!(
        restored_calls + per_100ms >= served_calls,
        "lost {} calls, more than 100 ms ({per_100ms})",
        served_calls - restored_calls
    );
    assert!(
        restored_tokens + per_100ms * MOST_PER_REQUEST >= served_tokens,
        "lost {} tokens",
        served_tokens - restored_tokens
    );
    // Above the truth by at most the requests in flight (8 clients), each
    // charged its estimate (prompt bound and max_tokens).
    assert!(
        restored_calls <= served_calls + 8,
        "{restored_calls} > {served_calls} + 8"
    );
    let estimate = 3 + "one two three four".len() as u64 + 3 + 8;
    // Settles lost in the last group commit leave their estimates too.
    assert!(
        restored_tokens <= served_tokens + (8 + per_100ms) * estimate,
        "{restored_tokens} tokens restored for {served_tokens} served"
    );
}
