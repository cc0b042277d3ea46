//! The `budget-gateway` binary as an operator runs it: flags, a bad
//! configuration, and a SIGTERM that lets a request in flight finish and
//! keeps the usage in the state file across a restart.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_budget-gateway");

/// A free loopback address (bound, then let go, for the child to bind).
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Kills the child if a test fails before it stops.
struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str]) -> Gateway {
    Gateway(
        Command::new(BIN)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// Waits (at most 20 s) until `addr` accepts connections.
fn wait_listening(addr: &str, child: &mut Gateway) {
    let start = Instant::now();
    while TcpStream::connect(addr).is_err() {
        if let Some(status) = child.0.try_wait().unwrap() {
            let mut err = String::new();
            child
                .0
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("the gateway exited ({status}): {err}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{addr} never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (at most 20 s) for the child to exit.
fn wait_exit(child: &mut Gateway) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the gateway never exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

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
    let info: Value = client
        .get(format!("http://{addr}/v1/budgets/{AGENT_A}"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["tokens_used"], tokens(&stats));
    assert_eq!(info["calls_used"], 2);
}
