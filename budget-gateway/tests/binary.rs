//! The `budget-gateway` binary as an operator runs it: flags, a bad
//! configuration, and a SIGTERM that lets a request in flight finish and
//! keeps the usage in the state file across a restart.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::process::*;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

#[test]
fn a_bad_configuration_is_refused_with_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    let text =
        config_text(1_000, 10, "").replace("calls_budget = 10\n", "calls_budget = \"ten\"\n");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN)
        .args([
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--upstream", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    let want = format!(
        "{}:8:16: field `agents[0].calls_budget`: invalid type",
        path.display()
    );
    assert!(err.contains(&want), "{err}");

    let out = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config FILE is required"));
    let out = Command::new(BIN).arg("--bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_in_flight_finish_and_keeps_usage_across_a_restart() {
    let (upstream, stats) = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    let state = dir.path().join("state.json");
    std::fs::write(&config, config_text(100_000, 1_000, "")).unwrap();
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
    let client = reqwest::Client::new();
    let chat = |delay_ms: u64| {
        client
            .post(format!("http://{addr}/v1/chat/completions"))
            .bearer_auth(KEY_A)
            .json(&json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "mock_delay_ms": delay_ms}))
            .send()
    };
    assert_eq!(chat(0).await.unwrap().status(), StatusCode::OK);
    // A slow request is in flight when SIGTERM arrives.
    // (The mock counts a call when it answers, so the real clock it is:
    // the slow request reaches the mock well within 300 ms.)
    let slow = tokio::spawn(chat(1_000));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = rustix::process::Pid::from_raw(gateway.0.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let slow = slow.await.unwrap().unwrap();
    assert_eq!(
        slow.status(),
        StatusCode::OK,
        "the request in flight finished"
    );
    slow.bytes().await.unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let status = wait_exit(&mut gateway);
        (status, gateway)
    })
    .await
    .unwrap()
    .0;
    assert!(status.success(), "{status}");
    assert_eq!(calls(&stats), 2);

    // The state file has both requests' usage, and a restart brings it back.
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(saved["usage"][AGENT_A]["tokens_used"], tokens(&stats));
    assert_eq!(saved["usage"][AGENT_A]["calls_used"], 2);
    let addr = free_addr();
    let mut args = args.map(str::to_owned);
    args[3] = addr.clone();
    let mut gateway = spawn(&args.each_ref().map(String::as_str));
    wait_listening(&addr, &mut gateway);
    let info: Value = admin_view(
        &client,
        &format!("http://{addr}"),
        &format!("/v1/budgets/{AGENT_A}"),
    )
    .await;
    assert_eq!(info["tokens_used"], tokens(&stats));
    assert_eq!(info["calls_used"], 2);
}

/// Runs the binary with `args` (after `--listen 127.0.0.1:0 --upstream
/// http://127.0.0.1:9`) to its end: its exit code and its stderr.
fn run_to_end(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:9",
        ])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn redis_is_refused_with_state_with_parents_and_when_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, config_text(1_000, 10, "")).unwrap();
    let config = path.to_str().unwrap();
    let closed = format!("redis://{}", free_addr());

    let (code, err) = run_to_end(&["--config", config, "--redis", &closed, "--state", "s.json"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--state cannot be used with --redis"), "{err}");
    let (code, err) = run_to_end(&["--config", config, "--redis", &closed, "--limiter", "none"]);
    assert_eq!(code, Some(2), "{err}");

    // Nothing listens there: a clear error, exit 1, no panic.
    let (code, err) = run_to_end(&["--config", config, "--redis", &closed]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with(&format!(
            "budget-gateway: cannot connect to Redis at {closed}: "
        )),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let (code, err) = run_to_end(&["--config", config, "--redis", "http://127.0.0.1:6379"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot connect to Redis at http://127.0.0.1:6379"),
        "{err}"
    );

    // Budgets in a fleet do not nest: refused before Redis is asked.
    let nested = config_text(1_000, 10, "").replace(
        "metrics_label = \"agent-a\"\n",
        &format!("metrics_label = \"agent-a\"\nparent = \"{AGENT_B}\"\n"),
    );
    std::fs::write(&path, nested).unwrap();
    let (code, err) = run_to_end(&["--config", config, "--redis", &closed]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("{config}: agent {AGENT_A} has a parent")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateway_processes_on_one_redis_share_a_budget_and_stop_cleanly() {
    let redis = common::redis::RedisServer::start();
    let (upstream, stats) = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    // A: 6 calls a day, fleet-wide (days, so no window ends mid-test).
    let text = config_text(1_000_000, 6, "").replace("window_secs = 60", "window_secs = 86400");
    std::fs::write(&config, text).unwrap();
    let url = redis.url();
    let addrs = [free_addr(), free_addr()];
    let mut gateways: Vec<Gateway> = addrs
        .iter()
        .map(|addr| {
            let mut gateway = spawn(&[
                "--config",
                config.to_str().unwrap(),
                "--listen",
                addr,
                "--upstream",
                &upstream,
                "--redis",
                &url,
            ]);
            wait_listening(addr, &mut gateway);
            gateway
        })
        .collect();
    let client = reqwest::Client::new();
    let chat = |addr: &str, key: &str| {
        client
            .post(format!("http://{addr}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}))
            .send()
    };
    // One request to each in turn, until both refuse and the upstream has
    // served the budget (a lease in flight may need one more round).
    let mut admitted = 0;
    for _ in 0..20 {
        let mut refused = 0;
        for addr in &addrs {
            match chat(addr, KEY_A).await.unwrap().status() {
                StatusCode::OK => admitted += 1,
                StatusCode::TOO_MANY_REQUESTS => refused += 1,
                other => panic!("unexpected {other}"),
            }
        }
        if refused == 2 && calls(&stats) == 6 {
            break;
        }
    }
    assert_eq!((admitted, calls(&stats)), (6, 6));
    for addr in &addrs {
        let info: Value = admin_view(
            &client,
            &format!("http://{addr}"),
            &format!("/v1/budgets/{AGENT_A}"),
        )
        .await;
        assert_eq!(info["calls_used"], 6, "{info}");
        assert_eq!(info["calls_remaining"], 0, "{info}");
    }
    // B through the first gateway (which leases 10,000 of B's calls), then
    // SIGTERM: it exits 0 and its lease is back, as the other one sees.
    assert_eq!(
        chat(&addrs[0], KEY_B).await.unwrap().status(),
        StatusCode::OK
    );
    let mut first = gateways.remove(0);
    let pid = rustix::process::Pid::from_raw(first.0.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let (status, err) = tokio::task::spawn_blocking(move || {
        let status = wait_exit(&mut first);
        let mut err = String::new();
        first
            .0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status, err)
    })
    .await
    .unwrap();
    assert!(status.success(), "{status}: {err}");
    assert!(
        err.contains(&format!("budgets shared through {url} as node ")),
        "{err}"
    );
    assert!(err.contains("budget-gateway: stopped"), "{err}");
    let info: Value = admin_view(
        &client,
        &format!("http://{}", addrs[1]),
        &format!("/v1/budgets/{AGENT_B}"),
    )
    .await;
    assert_eq!(info["calls_used"], 1, "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file_keeping_usage_and_refuses_a_bad_one() {
    let (upstream, stats) = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    let db = dir.path().join("gw.db");
    std::fs::write(&config, config_text(100_000, 3, "")).unwrap();
    let addr = free_addr();
    let mut child = Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), "--listen", &addr])
        .args(["--upstream", &upstream, "--db", db.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its stderr, read as it comes.
    let err = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut pipe = child.stderr.take().unwrap();
    let sink = err.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = pipe.read(&mut buf) {
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let mut gateway = Gateway(child);
    wait_listening(&addr, &mut gateway);
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let chat = |key: String| {
        client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}))
            .send()
    };
    let agent: Value = client
        .post(format!("{base}/v1/agents"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"limits": [{"window": "1m", "requests": 10}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = agent["agent_id"].as_str().unwrap();
    let key: Value = client
        .post(format!("{base}/v1/agents/{id}/keys"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let api_key = key["api_key"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        assert_eq!(chat(KEY_A.into()).await.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(
        chat(KEY_A.into()).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let hangup = || {
        let pid = rustix::process::Pid::from_raw(gateway.0.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    };
    let wait_for = |text: &'static str| {
        let err = err.clone();
        async move {
            for _ in 0..500 {
                if err.lock().unwrap().contains(text) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("never printed {text:?}: {}", err.lock().unwrap());
        }
    };

    // Five calls a minute now: the three used stay used.
    std::fs::write(&config, config_text(100_000, 5, "")).unwrap();
    hangup();
    wait_for("0 removed, 1 changed").await;
    for _ in 0..2 {
        assert_eq!(chat(KEY_A.into()).await.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(
        chat(KEY_A.into()).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );

    // A bad file: refused with the start's error; the running one stays.
    let bad =
        config_text(100_000, 50, "").replace("calls_budget = 50\n", "calls_budget = \"ten\"\n");
    std::fs::write(&config, bad).unwrap();
    hangup();
    wait_for("the running configuration stays").await;
    let said = err.lock().unwrap().clone();
    let want = format!(
        "{}:8:16: field `agents[0].calls_budget`: invalid type",
        config.display()
    );
    assert!(said.contains(&want), "{said}");
    assert_eq!(
        chat(KEY_A.into()).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS,
        "still five a minute"
    );
    assert_eq!(chat(api_key).await.unwrap().status(), StatusCode::OK);
    assert_eq!(calls(&stats), 6);
}
