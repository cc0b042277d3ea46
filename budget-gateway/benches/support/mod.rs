//! What the gateway's benches share: the release binary as child
//! processes (the mock upstream and the gateways), the configuration they
//! load, the request they send, and a hyper client on one keep-alive
//! connection.
#![allow(dead_code)] // each bench uses its own part of this

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// The gateway's binary, built by cargo for the bench.
pub const BIN: &str = env!("CARGO_BIN_EXE_budget-gateway");
/// The key every load request is sent with; its budget never refuses.
pub const LOAD_KEY: &str = "sk-load";
/// The gateway's three ways of standing in front of the proxy, in the
/// order the tables list them.
pub const VARIANTS: [&str; 3] = ["none", "budget", "governor"];

/// What each variant is called in the tables.
pub fn variant_name(variant: &str) -> &'static str {
    match variant {
        "none" => "plain proxy (`--limiter none`)",
        "budget" => "budget layer",
        "governor" => "tower_governor (`--limiter governor`)",
        "limits" => "budget layer, two windows and spend (`1mo`)",
        "limits30d" => "budget layer, two windows and spend (`30d`)",
        _ => "?",
    }
}

/// The request every bench sends: a chat completion with a 35-token
/// prompt (o200k) and `max_tokens` 16.
pub const REQUEST_BODY: &str = r#"{"model":"gpt-4o","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Please summarise the history of the Roman empire in three short sentences, with the emperors' names."}],"max_tokens":16}"#;

/// A child process, killed when dropped.
pub struct Process(pub Child);

impl Process {
    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback address nobody listens on (yet).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Runs `program args` and waits until something listens on `addr`, at
/// most `patience`.
pub fn start_listening(
    program: &str,
    args: &[&str],
    addr: SocketAddr,
    patience: Duration,
) -> Process {
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let mut process = Process(child);
    let started = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = process.0.try_wait() {
            panic!("{program} {args:?} exited ({status}) before listening on {addr}");
        }
        assert!(
            started.elapsed() < patience,
            "{program} never listened on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    process
}

/// The release binary with `args`, once it listens on `addr`.
pub fn start(args: &[&str], addr: SocketAddr) -> Process {
    start_listening(BIN, args, addr, Duration::from_secs(20))
}

/// The mock upstream, on a free port: the process and its base URL.
pub fn start_mock() -> (Process, SocketAddr) {
    let addr = free_addr();
    let process = start(&["--mock-upstream", "--listen", &addr.to_string()], addr);
    (process, addr)
}

/// The arguments that start the gateway as `variant` on `listen`, in front
/// of `upstream`, with the configuration at `config`.
pub fn gateway_args(
    config: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    variant: &str,
) -> Vec<String> {
    [
        "--config",
        config.to_str().expect("a UTF-8 temporary path"),
        "--listen",
        &listen.to_string(),
        "--upstream",
        &format!("http://{upstream}"),
        "--limiter",
        variant,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Writes the configuration: [`LOAD_KEY`], with a budget no bench can
/// spend, and `extra` agents' tables after it.
pub fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            r#"admin_key = "admin"

[[agents]]
api_key = "{LOAD_KEY}"
agent_id = "7f9c24e8-3b1a-4c5d-9e2f-1a2b3c4d5e6f"
token_budget = 1000000000000000
calls_budget = 4000000000
window_secs = 86400
{extra}"#
        ),
    )
    .unwrap();
    path
}

/// The `limits` variant's configuration: the budget layer with the load
/// key under two windows and a spend limit (issue 17's target: within 10%
/// of one window without spend, the `budget` variant), none of which the
/// bench can spend; the spend limit's window is `spend_window` (`limits`:
/// a calendar month, `limits30d`: 30 days from first use).
pub fn write_limits_config(dir: &Path, spend_window: &str) -> std::path::PathBuf {
    let path = dir.join(format!("gateway-limits-{spend_window}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"admin_key = "admin"

[[models]]
name = "gpt-4o*"
input_usd_per_mtok = 2.50
output_usd_per_mtok = 10.00

[[agents]]
api_key = "{LOAD_KEY}"
agent_id = "7f9c24e8-3b1a-4c5d-9e2f-1a2b3c4d5e6f"
[[agents.limits]]
window = "1d"
tokens = 1000000000000000
requests = 4000000000
[[agents.limits]]
window = "1h"
tokens = 1000000000000000
requests = 4000000000
[[agents.limits]]
window = "{spend_window}"
spend_usd = 1000000.0
"#
        ),
    )
    .unwrap();
    path
}

/// One keep-alive HTTP/1.1 connection to `addr`.
pub async fn connect(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// Sends the bench's chat completion with `key` and reads the whole
/// response: its status.
pub async fn chat_completion(
    sender: &mut SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    key: &str,
) -> http::StatusCode {
    let request = http::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(REQUEST_BODY.as_bytes())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    response.into_body().collect().await.unwrap();
    status
}
