//! What a hostile client or a failing upstream may cost the gateway: the
//! server's deadlines and connection limit, the budget checked before the
//! body, the stop's deadline, and the smaller defects of issue 21, over
//! real loopback sockets.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_budget::BudgetManager;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use budget_gateway::config;
use budget_gateway::gateway::{Gateway, Limiter};
use budget_gateway::server::ServerLimits;
use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// How the test upstream answers a chat completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// At once, with usage: 10 prompt tokens, 5 completion tokens.
    Answer,
    /// Never (until the test's end).
    Stall,
    /// The head and half a JSON body, then nothing.
    StallMidBody,
}

/// An upstream that records what it received and answers per its mode.
#[derive(Default)]
struct Upstream {
    mode: Mutex<Option<Mode>>,
    bodies: Mutex<Vec<Bytes>>,
    headers: Mutex<Vec<HeaderMap>>,
    /// Told each time a request arrives.
    arrived: Notify,
}

async fn upstream_chat(
    State(up): State<Arc<Upstream>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    up.bodies.lock().unwrap().push(body);
    up.headers.lock().unwrap().push(headers);
    up.arrived.notify_waiters();
    let mode = up.mode.lock().unwrap().unwrap_or(Mode::Answer);
    match mode {
        Mode::Answer => {
            let body = json!({"id": "x", "object": "chat.completion", "choices": [],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}});
            Response::builder()
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap()
        }
        Mode::Stall => std::future::pending().await,
        Mode::StallMidBody => {
            let first = futures_util::stream::once(async {
                Ok::<_, std::io::Error>(Bytes::from_static(b"{\"id\":\"x\",\"choices\":["))
            });
            let stream = futures_util::StreamExt::chain(first, futures_util::stream::pending());
            Response::builder()
                .header("content-type", "application/json")
                .body(Body::from_stream(stream))
                .unwrap()
        }
    }
}

async fn start_upstream(mode: Mode) -> (String, Arc<Upstream>) {
    let up = Arc::new(Upstream::default());
    *up.mode.lock().unwrap() = Some(mode);
    let router = Router::new()
        .route("/v1/chat/completions", post(upstream_chat))
        .with_state(up.clone());
    (serve_on_loopback(router).await, up)
}

/// A gateway in process: its URL, its admin URL (if separate), its
/// budgets, and a trigger for its stop, with the task serving it.
struct Served {
    url: String,
    admin_url: Option<String>,
    budgets: Arc<BudgetManager>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

struct Options {
    limits: ServerLimits,
    upstream_timeout: Duration,
    upstream_idle: Duration,
    extra: &'static str,
    tokens: u64,
    calls: u64,
    separate_admin: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            limits: ServerLimits {
                max_connections: 64,
                header_timeout: Duration::from_secs(5),
                body_timeout: Duration::from_secs(5),
                shutdown_timeout: Duration::from_secs(5),
            },
            upstream_timeout: Duration::from_secs(10),
            upstream_idle: Duration::from_secs(10),
            extra: "",
            tokens: 100_000,
            calls: 1_000,
            separate_admin: false,
        }
    }
}

async fn serve(upstream: &str, o: Options) -> Served {
    let text = config_text(o.tokens, o.calls, o.extra);
    let config = config::parse(Path::new("test.toml"), &text).unwrap();
    let budgets = Arc::new(BudgetManager::new());
    let gateway = Gateway::new(
        config,
        budgets.clone(),
        upstream,
        o.upstream_timeout,
        Limiter::Budget,
        None,
    )
    .unwrap()
    .server_limits(o.limits)
    .upstream_idle_timeout(o.upstream_idle);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (admin, admin_url) = if o.separate_admin {
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", admin.local_addr().unwrap());
        (Some(admin), Some(url))
    } else {
        (None, None)
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        gateway
            .serve_with_admin(listener, admin, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Served {
        url,
        admin_url,
        budgets,
        stop: Some(stop),
        task,
    }
}

impl Served {
    fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    fn used(&self, agent: &str) -> (u64, u64) {
        let info = self.budgets.full_info(&agent.parse().unwrap()).unwrap();
        (info.tokens_used, info.calls_used)
    }
}

const CHAT: &str =
    r#"{"model":"m","messages":[{"role":"user","content":"hello there"}],"max_tokens":20}"#;

/// A whole chat request with `key`, as bytes on the wire.
fn chat_request(key: &str, body: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Reads until the peer closes or `limit` passes: what was read, and
/// whether it closed.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

/// Reads one response's head (up to the blank line).
async fn read_head(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while !out.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("a response head within 5 s")
            .unwrap();
        assert!(
            n == 1,
            "closed before a whole head: {:?}",
            String::from_utf8_lossy(&out)
        );
        out.push(byte[0]);
    }
    String::from_utf8_lossy(&out).to_lowercase()
}

#[tokio::test]
async fn a_head_dripped_a_byte_at_a_time_is_cut_off_at_the_heads_deadline() {
    let (up, _) = start_upstream(Mode::Answer).await;
    let mut o = Options::default();
    o.limits.header_timeout = Duration::from_millis(300);
    let g = serve(&up, o).await;
    let mut stream = TcpStream::connect(g.addr()).await.unwrap();
    let started = Instant::now();
    let head = chat_request(KEY_A, CHAT);
    // A byte every 50 ms: never idle for long, never done either.
    let mut closed_after = None;
    for byte in head.as_bytes().iter().take(60) {
        if stream.write_all(&[*byte]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed_after = Some(started.elapsed());
                break;
            }
            Ok(Ok(_)) => {
                // hyper may answer 408 before closing; then it closes.
                let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(2)).await;
                assert!(closed);
                closed_after = Some(started.elapsed());
                break;
            }
            Err(_) => {}
        }
    }
    let closed_after = closed_after.expect("the connection was never closed");
    assert!(
        closed_after >= Duration::from_millis(250) && closed_after < Duration::from_secs(2),
        "closed after {closed_after:?}"
    );
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_408_and_nothing_is_charged() {
    let (up, upstream) = start_upstream(Mode::Answer).await;
    let mut o = Options::default();
    o.limits.body_timeout = Duration::from_millis(200);
    let g = serve(&up, o).await;
    let mut stream = TcpStream::connect(g.addr()).await.unwrap();
    let whole = chat_request(KEY_A, CHAT);
    // The head and a few bytes of the body, then nothing.
    let cut = whole.find("\r\n\r\n").unwrap() + 4 + 10;
    stream.write_all(&whole.as_bytes()[..cut]).await.unwrap();
    let started = Instant::now();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("http/1.1 408"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(g.used(AGENT_A), (0, 0));
    assert!(upstream.bodies.lock().unwrap().is_empty());
}

#[tokio::test]
async fn idle_connections_are_shed_for_a_client_with_a_key_and_busy_ones_refuse_with_503() {
    let (up, upstream) = start_upstream(Mode::Stall).await;
    let mut o = Options::default();
    o.limits.max_connections = 4;
    let g = serve(&up, o).await;
    // Four connections that never send a thing fill the gateway.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(g.addr()).await.unwrap());
    }
    // Let the gateway accept all four before the next one comes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A client with a key gets in all the same: each of its connections
    // sheds an idle one. Its requests stall upstream, so they stay busy.
    let mut busy = Vec::new();
    for _ in 0..4 {
        let arrived = upstream.arrived.notified();
        let mut stream = TcpStream::connect(g.addr()).await.unwrap();
        stream
            .write_all(chat_request(KEY_A, CHAT).as_bytes())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), arrived)
            .await
            .expect("the request reached the upstream");
        busy.push(stream);
    }
    for mut stream in idle {
        let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(2)).await;
        assert!(
            closed,
            "an idle connection was kept while a keyed client waited"
        );
    }
    // Now every connection has a request in flight: the next is refused.
    let mut refused = TcpStream::connect(g.addr()).await.unwrap();
    let (text, closed) = read_until_closed(&mut refused, Duration::from_secs(3)).await;
    assert!(closed);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.to_lowercase().contains("connection: close"), "{text}");
    assert!(text.contains("too_many_connections"), "{text}");
    assert_eq!(upstream.bodies.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn a_401_on_a_keep_alive_connection_says_connection_close_when_its_body_was_left() {
    let (up, _) = start_upstream(Mode::Answer).await;
    let g = serve(&up, Options::default()).await;
    let mut stream = TcpStream::connect(g.addr()).await.unwrap();
    stream
        .write_all(chat_request("sk-nobody", CHAT).as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    // A request without a body keeps its connection: a read refused 401
    // and then a good one on the same connection.
    let mut stream = TcpStream::connect(g.addr()).await.unwrap();
    stream
        .write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-nobody\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
}

#[tokio::test]
async fn an_exhausted_key_is_refused_before_its_body_is_sent() {
    let (up, upstream) = start_upstream(Mode::Answer).await;
    let o = Options {
        calls: 1,
        ..Options::default()
    };
    let g = serve(&up, o).await;
    let (status, _) = raw_request(
        &g.url,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &format!("Bearer {KEY_A}"))],
        CHAT,
    )
    .await;
    assert_eq!(status, 200);
    // A 16 MB body announced, none of it sent: the answer comes anyway.
    let mut stream = TcpStream::connect(g.addr()).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY_A}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        16 << 20
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("http/1.1 429"), "{head}");
    assert!(head.contains("retry-after"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(upstream.bodies.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_504_charges_the_prompt_the_upstream_received() {
    let (up, upstream) = start_upstream(Mode::Stall).await;
    let o = Options {
        upstream_timeout: Duration::from_millis(200),
        extra: r#"tokenizer = "bytes""#,
        ..Options::default()
    };
    let g = serve(&up, o).await;
    let (status, body) = raw_request(
        &g.url,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &format!("Bearer {KEY_A}"))],
        CHAT,
    )
    .await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(upstream.bodies.lock().unwrap().len(), 1);
    // The prompt, one token a byte of "hello there" plus chat's framing;
    // the completion's reservation given back.
    let prompt = 3 + "hello there".len() as u64 + 3;
    eventually("the settle", || g.used(AGENT_A) == (prompt, 1)).await;
}

#[tokio::test]
async fn an_upstream_stalling_mid_body_is_cut_off_and_settled() {
    let (up, _) = start_upstream(Mode::StallMidBody).await;
    let o = Options {
        upstream_idle: Duration::from_millis(200),
        extra: r#"tokenizer = "bytes""#,
        ..Options::default()
    };
    let g = serve(&up, o).await;
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", g.url))
        .bearer_auth(KEY_A)
        .header("content-type", "application/json")
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.is_err(), "the body cannot end well");
    assert!(started.elapsed() < Duration::from_secs(3));
    // A JSON body cut short: the estimate stays charged, settled.
    let estimate = 3 + "hello there".len() as u64 + 3 + 20;
    eventually("the settle", || g.used(AGENT_A) == (estimate, 1)).await;
}

#[tokio::test]
async fn the_clients_credentials_for_the_upstream_are_dropped_with_upstream_api_key() {
    let (up, upstream) = start_upstream(Mode::Answer).await;
    let o = Options {
        extra: r#"upstream_api_key = "sk-operator""#,
        ..Options::default()
    };
    let g = serve(&up, o).await;
    let (status, _) = raw_request(
        &g.url,
        "POST",
        "/v1/chat/completions",
        &[
            ("authorization", &format!("Bearer {KEY_A}")),
            ("openai-organization", "org-client"),
            ("openai-project", "proj-client"),
            ("cookie", "session=client"),
            ("x-other", "kept"),
        ],
        CHAT,
    )
    .await;
    assert_eq!(status, 200);
    let headers = upstream.headers.lock().unwrap()[0].clone();
    assert_eq!(headers["authorization"], "Bearer sk-operator");
    for dropped in ["openai-organization", "openai-project", "cookie"] {
        assert!(headers.get(dropped).is_none(), "{dropped} was forwarded");
    }
    assert_eq!(headers["x-other"], "kept");
}

#[tokio::test]
async fn with_an_admin_address_the_admin_api_and_metrics_are_served_only_there() {
    let (up, _) = start_upstream(Mode::Answer).await;
    let o = Options {
        separate_admin: true,
        ..Options::default()
    };
    let g = serve(&up, o).await;
    let admin = g.admin_url.clone().unwrap();
    let client = reqwest::Client::new();
    for path in ["/metrics", "/v1/budgets", &format!("/v1/budgets/{AGENT_A}")] {
        let here = client
            .get(format!("{}{path}", g.url))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(here.status(), 404, "{path} on the client port");
        let there = client
            .get(format!("{admin}{path}"))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(there.status(), 200, "{path} on the admin port");
    }
    // The client port still proxies; the admin port does not.
    let r = client
        .post(format!("{}/v1/chat/completions", g.url))
        .bearer_auth(KEY_A)
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post(format!("{admin}/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn a_streams_body_reaches_the_upstream_byte_for_byte_but_for_the_spliced_options() {
    let (up, upstream) = start_upstream(Mode::Answer).await;
    let g = serve(&up, Options::default()).await;
    let body = r#"{"stream":true,  "model":"m","messages":[{"role":"user","content":"hi"}],"seed":99999999999999999999,"x":1e400,"y":-0.0,"max_tokens":5}"#;
    let _ = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", g.url))
        .bearer_auth(KEY_A)
        .body(body)
        .send()
        .await
        .unwrap()
        .bytes()
        .await;
    let received = upstream.bodies.lock().unwrap()[0].clone();
    let received = std::str::from_utf8(&received).unwrap();
    let spliced = r#""stream_options":{"include_usage":true},"#;
    assert!(received.contains(spliced), "{received}");
    assert_eq!(received.replacen(spliced, "", 1), body);
}

#[tokio::test]
async fn a_stop_cancels_what_is_still_in_flight_at_its_deadline_and_settles_it() {
    let (up, upstream) = start_upstream(Mode::Stall).await;
    let mut o = Options {
        extra: r#"tokenizer = "bytes""#,
        ..Options::default()
    };
    o.limits.shutdown_timeout = Duration::from_millis(300);
    let mut g = serve(&up, o).await;
    let arrived = upstream.arrived.notified();
    let url = g.url.clone();
    let client = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(KEY_A)
            .body(CHAT)
            .send()
            .await
    });
    tokio::time::timeout(Duration::from_secs(5), arrived)
        .await
        .expect("the request reached the upstream");
    // A half-sent request too, which must not hold the stop either.
    let mut half = TcpStream::connect(g.addr()).await.unwrap();
    half.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    g.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(3), &mut g.task)
        .await
        .expect("the gateway stopped within its deadline")
        .unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(250), "stopped after {took:?}");
    assert!(client.await.unwrap().is_err(), "the request was cancelled");
    // Cancelled after the upstream had the prompt: the prompt is charged.
    let prompt = 3 + "hello there".len() as u64 + 3;
    assert_eq!(g.used(AGENT_A), (prompt, 1));
}

#[test]
fn keys_no_client_could_send_are_refused_at_start_with_file_line_and_column() {
    for (toml_key, why) in [
        ("sk-x ", "spaces at an end"),
        (" sk-x", "spaces at an end"),
        ("sk-\u{e9}", "non-ASCII"),
        ("sk-\\u0001x", "control characters"),
    ] {
        let text = config_text(10, 10, "").replace(KEY_A, toml_key);
        let at = text.find(toml_key).unwrap();
        let line = text[..at].matches('\n').count() + 1;
        let column = at - text[..at].rfind('\n').map_or(0, |n| n + 1);
        let e = config::parse(Path::new("test.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!(
                "test.toml:{line}:{column}: field `agents[0].api_key`"
            )),
            "{toml_key:?}: {e}"
        );
        assert!(e.contains(why), "{toml_key:?}: {e}");
    }
    let text = config_text(10, 10, "").replace(ADMIN_KEY, "admin ");
    let e = config::parse(Path::new("test.toml"), &text)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("test.toml:1:"), "{e}");
    assert!(e.contains("the admin key has spaces at an end"), "{e}");
    // Inner spaces are sent and matched as they are: accepted.
    let text = config_text(10, 10, "").replace(KEY_A, "sk a");
    assert!(config::parse(Path::new("test.toml"), &text).is_ok());
}
