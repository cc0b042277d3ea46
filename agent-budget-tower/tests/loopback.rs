//! The layer on the wire: an axum server on a loopback port, with the
//! layer in front of a handler that plays the LLM, and reqwest as the
//! client. Every wait in these tests is bounded.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_budget::{BudgetLimit, BudgetManager, FullBudgetInfo};
use agent_budget_tower::{BearerKeys, BudgetLayer, HeaderStyle};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::Notify;
use uuid::Uuid;

/// What the handler behind the layer saw and does.
#[derive(Default)]
struct Upstream {
    calls: AtomicU64,
    /// Held requests wait for this before answering.
    release: Notify,
}

/// Plays an OpenAI-compatible model. The request says what to report:
/// `mock_usage` (the total tokens), `mock_no_usage` (report none),
/// `mock_hold` (wait for a release), `mock_endless` (stream three deltas,
/// then never end).
async fn complete(State(up): State<Arc<Upstream>>, Json(request): Json<Value>) -> Response {
    up.calls.fetch_add(1, Ordering::SeqCst);
    if request["mock_hold"] == true {
        up.release.notified().await;
    }
    let usage = request["mock_usage"].as_u64().unwrap_or(10);
    if request["stream"] == true {
        let delta = |text: &str| {
            format!(
                "data: {}\n\n",
                json!({"choices": [{"delta": {"content": text}}], "usage": null})
            )
        };
        let mut events: Vec<Result<Bytes, Infallible>> = ["one", "two", "three"]
            .iter()
            .map(|t| Ok(Bytes::from(delta(t))))
            .collect();
        if request["mock_endless"] == true {
            let stream = futures_util::stream::iter(events).chain(futures_util::stream::pending());
            return (
                [(header::CONTENT_TYPE, "text/event-stream")],
                Body::from_stream(stream),
            )
                .into_response();
        }
        if request["stream_options"]["include_usage"] == true {
            let usage = json!({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": usage - 1, "total_tokens": usage}});
            events.push(Ok(Bytes::from(format!("data: {usage}\n\n"))));
        }
        events.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
        return (
            [(header::CONTENT_TYPE, "text/event-stream")],
            Body::from_stream(futures_util::stream::iter(events)),
        )
            .into_response();
    }
    if request["mock_no_usage"] == true {
        return Json(json!({"id": "chatcmpl-1", "choices": []})).into_response();
    }
    Json(json!({
        "id": "chatcmpl-1",
        "choices": [{"message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": usage - 1, "total_tokens": usage},
    }))
    .into_response()
}

use futures_util::StreamExt as _;

struct Server {
    url: String,
    budgets: Arc<BudgetManager>,
    upstream: Arc<Upstream>,
    agent: Uuid,
}

const KEY: &str = "sk-test";

async fn serve_with<E: agent_budget_tower::Estimator<Body>>(
    budgets: Arc<BudgetManager>,
    limit: (u64, u64),
    configure: impl FnOnce(
        BudgetLayer<BudgetManager, BearerKeys>,
    ) -> BudgetLayer<BudgetManager, BearerKeys, E>,
) -> Server {
    let agent = Uuid::new_v4();
    budgets.set_budget(BudgetLimit {
        agent_id: agent,
        token_budget: limit.0,
        calls_budget: limit.1,
        window_secs: 60,
    });
    let upstream = Arc::new(Upstream::default());
    let layer = configure(
        BudgetLayer::new(budgets.clone())
            .identify(BearerKeys::from_iter([(KEY.to_owned(), agent)])),
    );
    let app = Router::new()
        .route("/v1/chat/completions", post(complete))
        .with_state(upstream.clone())
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server {
        url,
        budgets,
        upstream,
        agent,
    }
}

async fn serve(limit: (u64, u64)) -> Server {
    serve_with(Arc::new(BudgetManager::new()), limit, |l| l).await
}

impl Server {
    fn info(&self) -> FullBudgetInfo {
        self.budgets.full_info(&self.agent).unwrap()
    }

    async fn chat(&self, client: &reqwest::Client, body: Value) -> reqwest::Response {
        client
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Waits (at most 5 s) until the agent's usage is `tokens`.
    async fn settled_to(&self, tokens: u64) {
        for _ in 0..500 {
            if self.info().tokens_used == tokens {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("usage is {}, never {tokens}", self.info().tokens_used);
    }
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

/// One message "hi" with the byte counter: 3 framing + 2 bytes + 3
/// priming.
const PROMPT: u64 = 8;

fn hi(max_tokens: u64) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})
}

#[tokio::test]
async fn an_admitted_request_carries_the_headers_and_settles_its_usage() {
    let s = serve((1_000, 10)).await;
    let client = reqwest::Client::new();
    let mut body = hi(100);
    body["mock_usage"] = json!(30);
    let r = s.chat(&client, body).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "10");
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "1000");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "9");
    // Remaining after the reservation of prompt + max_tokens.
    assert_eq!(
        header(&r, "x-ratelimit-remaining-tokens"),
        (1_000 - PROMPT - 100).to_string()
    );
    assert!(header(&r, "x-ratelimit-reset-tokens").ends_with('s'));
    assert!(
        r.headers().get("ratelimit").is_none(),
        "IETF fields are opt-in"
    );
    let json: Value = r.json().await.unwrap();
    assert_eq!(json["usage"]["total_tokens"], 30);
    s.settled_to(30).await;
    assert_eq!(s.info().calls_used, 1);
}

#[tokio::test]
async fn a_refusal_is_429_with_retry_after_rounded_up_and_nothing_forwarded() {
    let (clock, mock) = quanta::Clock::mock();
    let budgets = Arc::new(BudgetManager::with_clock(clock));
    let s = serve_with(budgets, (200, 10), |l| {
        l.headers(HeaderStyle {
            openai: true,
            ietf: true,
        })
    })
    .await;
    let client = reqwest::Client::new();
    assert_eq!(s.chat(&client, hi(150)).await.status(), StatusCode::OK);
    s.settled_to(10).await;
    // 59.7 s into the 60 s window: 300 ms left.
    mock.increment(Duration::from_millis(59_700));
    let r = s.chat(&client, hi(190)).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(&r, "retry-after"),
        "1",
        "300 ms rounds up to 1 s, not 0"
    );
    assert_eq!(header(&r, "x-ratelimit-reset-tokens"), "300ms");
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), "190");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "9");
    assert_eq!(
        header(&r, "ratelimit-policy"),
        r#""tokens";q=200;w=60, "requests";q=10;w=60"#
    );
    assert_eq!(
        header(&r, "ratelimit"),
        r#""tokens";r=190;t=1, "requests";r=9;t=1"#
    );
    let error: Value = r.json().await.unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert_eq!(error["error"]["type"], "tokens");
    assert_eq!(
        s.upstream.calls.load(Ordering::SeqCst),
        1,
        "the refusal was not forwarded"
    );
    // The window ends: the same request fits.
    mock.increment(Duration::from_millis(300));
    assert_eq!(s.chat(&client, hi(190)).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_request_that_can_never_fit_has_no_retry_after() {
    let s = serve((100, 10)).await;
    let r = s.chat(&reqwest::Client::new(), hi(1_000)).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().get("retry-after").is_none());
    let error: Value = r.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("never admitted"),
        "{error}"
    );
}

#[tokio::test]
async fn overuse_is_charged_past_the_limit_and_the_next_request_refused() {
    let s = serve((100, 10)).await;
    let client = reqwest::Client::new();
    let mut body = hi(10);
    body["mock_usage"] = json!(150);
    assert_eq!(s.chat(&client, body).await.status(), StatusCode::OK);
    s.settled_to(150).await;
    assert_eq!(s.info().tokens_remaining, 0);
    assert_eq!(
        s.chat(&client, hi(1)).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn unknown_keys_bad_bodies_and_agents_without_budget_are_not_forwarded() {
    let s = serve((1_000, 10)).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", s.url);
    let r = client.post(&url).json(&hi(1)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = client
        .post(&url)
        .bearer_auth("sk-nobody")
        .json(&hi(1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let error: Value = r.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_api_key");
    for bad in [
        "{not json",
        r#"{"messages":[],"max_tokens":-1}"#,
        r#"{"messages":[],"max_tokens":1e30}"#,
    ] {
        let r = client
            .post(&url)
            .bearer_auth(KEY)
            .body(bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    assert_eq!(s.upstream.calls.load(Ordering::SeqCst), 0);
    assert_eq!((s.info().tokens_used, s.info().calls_used), (0, 0));
    s.budgets.remove_budget(&s.agent);
    let r = s.chat(&client, hi(1)).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(s.upstream.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_stream_settles_from_its_usage_chunk_which_the_client_did_not_ask_for() {
    let s = serve((1_000, 10)).await;
    let client = reqwest::Client::new();
    let mut body = hi(100);
    body["stream"] = json!(true);
    body["mock_usage"] = json!(44);
    let r = s.chat(&client, body.clone()).await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("three") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    assert!(
        !text.contains("total_tokens"),
        "the usage chunk is hidden: {text}"
    );
    s.settled_to(44).await;

    // A client that asks for usage gets it.
    body["stream_options"] = json!({"include_usage": true});
    let text = s.chat(&client, body).await.text().await.unwrap();
    assert!(text.contains("\"total_tokens\":44"), "{text}");
    s.settled_to(88).await;
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_stream_pays_the_prompt_and_what_streamed() {
    let s = serve((1_000, 10)).await;
    let client = reqwest::Client::new();
    let mut body = hi(500);
    body["stream"] = json!(true);
    body["mock_endless"] = json!(true);
    let mut r = s.chat(&client, body).await;
    let mut received = Vec::new();
    while !String::from_utf8_lossy(&received).contains("three") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), r.chunk())
            .await
            .expect("the deltas arrive")
            .unwrap()
            .expect("the stream is endless");
        received.extend_from_slice(&chunk);
    }
    // Still streaming: the whole estimate is held.
    assert_eq!(s.info().tokens_used, PROMPT + 500);
    drop(r);
    // Three deltas of 3 to 5 bytes: three chunks with text, 11 bytes → 3.
    s.settled_to(PROMPT + 3).await;
}

/// A `429`'s error message.
async fn refusal_message(r: reqwest::Response) -> String {
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let error: Value = r.json().await.unwrap();
    error["error"]["message"].as_str().unwrap().to_owned()
}

/// One token per word: fewer than the bytes the bound reserves.
#[derive(Clone, Copy)]
struct Words;

impl agent_budget_tower::openai::TokenCounter for Words {
    fn count(&self, text: &str) -> u64 {
        text.split_whitespace().count() as u64
    }
}

/// Four words in 18 bytes: the bound is 3 + 18 + 3 = 24, the count
/// 3 + 4 + 3 = 10; plus 20 of completion.
fn four_words() -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "one two three four"}], "max_tokens": 20})
}

async fn serve_counted_when_tight(tokens: u64) -> Server {
    use agent_budget_tower::openai::{OpenAiEstimator, PromptCount};
    serve_with(Arc::new(BudgetManager::new()), (tokens, 10), |l| {
        l.estimator(OpenAiEstimator::new(Words).prompt_count(PromptCount::WhenTight))
    })
    .await
}

#[tokio::test]
async fn prompts_counted_when_tight_reserve_the_bound_while_it_fits() {
    let s = serve_counted_when_tight(1_000).await;
    let mut body = four_words();
    body["mock_usage"] = json!(12);
    let r = s.chat(&reqwest::Client::new(), body).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header(&r, "x-ratelimit-remaining-tokens"),
        "956",
        "the bound, 44"
    );
    r.bytes().await.unwrap();
    s.settled_to(12).await;
}

#[tokio::test]
async fn where_the_bound_does_not_fit_the_prompt_is_counted() {
    // 44 does not fit in 40, 30 does.
    let s = serve_counted_when_tight(40).await;
    let client = reqwest::Client::new();
    let mut body = four_words();
    body["mock_usage"] = json!(12);
    let r = s.chat(&client, body).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header(&r, "x-ratelimit-remaining-tokens"),
        "10",
        "the count, 30"
    );
    r.bytes().await.unwrap();
    s.settled_to(12).await;
    // 28 left: the count does not fit either, and the refusal says so.
    let message = refusal_message(s.chat(&client, four_words()).await).await;
    assert!(message.contains("requested 30 tokens"), "{message}");
    assert_eq!(s.upstream.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_exhausted_budget_refuses_without_counting_the_prompt() {
    let s = serve_counted_when_tight(40).await;
    let client = reqwest::Client::new();
    let mut body = four_words();
    body["mock_usage"] = json!(40);
    let r = s.chat(&client, body).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.bytes().await.unwrap();
    s.settled_to(40).await;
    // Not one token left: the refusal is the one the check before the
    // body gives, for the least a request costs (one token), whether the
    // body came with the head or not; no count (30, what a tight budget
    // would have made) is made.
    let message = refusal_message(s.chat(&client, four_words()).await).await;
    assert!(message.contains("requested 1 tokens"), "{message}");
    assert_eq!(s.upstream.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_spent_budget_answers_429_before_it_judges_the_body() {
    // One call: spent by the first request.
    let s = serve((1_000, 1)).await;
    let client = reqwest::Client::new();
    let r = s.chat(&client, hi(1)).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.bytes().await.unwrap();
    // A body that is not a request at all, sent with its head: the answer
    // is the spent budget's, as when the body has not arrived, not the
    // body's 400.
    let not_a_request = || async {
        let url = format!("{}/v1/chat/completions", s.url);
        let request = client.post(url).bearer_auth(KEY);
        let request = request.header("content-type", "application/json");
        request.body(r#"{"messages": 7}"#).send().await.unwrap()
    };
    assert_eq!(
        not_a_request().await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // With room, the same body is the client's error.
    s.budgets.reset_window(&s.agent);
    assert_eq!(not_a_request().await.status(), StatusCode::BAD_REQUEST);
    assert_eq!(s.upstream.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_client_that_leaves_before_the_answer_pays_the_counted_prompt_not_the_bound() {
    let s = serve_counted_when_tight(1_000).await;
    let mut held = four_words();
    held["mock_hold"] = json!(true);
    let client = reqwest::Client::new();
    let waiting = tokio::time::timeout(Duration::from_millis(300), s.chat(&client, held)).await;
    assert!(waiting.is_err(), "the upstream holds the answer");
    assert_eq!(s.upstream.calls.load(Ordering::SeqCst), 1);
    s.settled_to(10).await;
}

#[tokio::test]
async fn an_answer_without_usage_keeps_the_counted_estimate_not_the_bound() {
    let s = serve_counted_when_tight(1_000).await;
    let mut body = four_words();
    body["mock_no_usage"] = json!(true);
    let r = s.chat(&reqwest::Client::new(), body).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.bytes().await.unwrap();
    s.settled_to(30).await;
}

#[tokio::test]
async fn every_connection_enforces_the_same_budget() {
    let s = Arc::new(serve((1_000_000, 10)).await);
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                // A client of its own: a connection of its own, and so a
                // clone of the service of its own.
                let client = reqwest::Client::new();
                s.chat(&client, hi(1)).await.status()
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        if task.await.unwrap() == StatusCode::OK {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10);
    assert_eq!(s.upstream.calls.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn with_a_maximum_wait_a_request_waits_for_a_refund() {
    let s = Arc::new(
        serve_with(Arc::new(BudgetManager::new()), (200, 10), |l| {
            l.max_wait(Duration::from_secs(10))
        })
        .await,
    );
    let client = reqwest::Client::new();
    let mut held = hi(150);
    held["mock_hold"] = json!(true);
    held["mock_usage"] = json!(20);
    let first = {
        let (s, client) = (s.clone(), client.clone());
        tokio::spawn(async move { s.chat(&client, held).await.status() })
    };
    for _ in 0..500 {
        if s.upstream.calls.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // 158 reserved: 120 more does not fit until the first settles at 20.
    let second = {
        let (s, client) = (s.clone(), client.clone());
        tokio::spawn(async move { s.chat(&client, hi(112)).await.status() })
    };
    for _ in 0..500 {
        if s.budgets.waiting() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.budgets.waiting(), 1, "the second request waits");
    s.upstream.release.notify_one();
    assert_eq!(first.await.unwrap(), StatusCode::OK);
    assert_eq!(second.await.unwrap(), StatusCode::OK);
}

#[tokio::test]
async fn an_inner_service_error_cancels_the_reservation() {
    use tower::{Layer, ServiceExt};
    let budgets = Arc::new(BudgetManager::new());
    let agent = Uuid::new_v4();
    budgets.set_budget(BudgetLimit {
        agent_id: agent,
        token_budget: 1_000,
        calls_budget: 10,
        window_secs: 60,
    });
    let failing = tower::service_fn(|_: axum::http::Request<Body>| async {
        Err::<axum::http::Response<Body>, _>(std::io::Error::other("upstream unreachable"))
    });
    let service = BudgetLayer::new(budgets.clone()).layer(failing);
    let request = axum::http::Request::post("/v1/chat/completions")
        .header("x-agent-id", agent.to_string())
        .body(Body::from(hi(100).to_string()))
        .unwrap();
    let error = service.oneshot(request).await.unwrap_err();
    assert_eq!(error.to_string(), "upstream unreachable");
    let info = budgets.full_info(&agent).unwrap();
    assert_eq!((info.tokens_used, info.calls_used), (0, 0));
}

#[tokio::test]
async fn other_parts_and_the_locked_manager_plug_in_the_same_way() {
    use agent_budget::LockedBudgetManager;
    use agent_budget_tower::{AgentIdExtension, FixedCost, HeaderUsage};
    use axum::http::HeaderName;
    use tower::{Layer, ServiceExt};

    let budgets = Arc::new(LockedBudgetManager::new());
    let agent = Uuid::new_v4();
    budgets.set_budget(BudgetLimit {
        agent_id: agent,
        token_budget: 1_000,
        calls_budget: 2,
        window_secs: 60,
    });
    // The upstream reports its usage in a header.
    let upstream = tower::service_fn(|_: axum::http::Request<Body>| async {
        Ok::<_, Infallible>(
            axum::http::Response::builder()
                .header("x-usage-total-tokens", "77")
                .body(Body::empty())
                .unwrap(),
        )
    });
    let service = BudgetLayer::new(budgets.clone())
        .identify(AgentIdExtension)
        .estimator(FixedCost {
            tokens: 100,
            calls: 1,
        })
        .meter(HeaderUsage::new(HeaderName::from_static(
            "x-usage-total-tokens",
        )))
        .layer(upstream);
    let request = || {
        let mut r = axum::http::Request::get("/anything")
            .body(Body::empty())
            .unwrap();
        r.extensions_mut().insert(agent);
        r
    };
    let response = service.clone().oneshot(request()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-ratelimit-remaining-tokens"], "900");
    // An empty body is at its end at once: settled without being polled.
    drop(response);
    let info = budgets.full_info(&agent).unwrap();
    assert_eq!((info.tokens_used, info.calls_used), (77, 1));
    let no_agent = axum::http::Request::get("/").body(Body::empty()).unwrap();
    let response = service.clone().oneshot(no_agent).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

/// A budget source that cannot be checked for its first `outages` tries
/// (as a fleet's store that is down), then admits from a local manager.
struct Flaky {
    budgets: Arc<BudgetManager>,
    outages: AtomicU64,
    tries: AtomicU64,
}

impl agent_budget_tower::Admission for Flaky {
    type Reservation = agent_budget::OwnedReservation;

    fn admit(
        self: &Arc<Self>,
        agent_id: &Uuid,
        estimate: &agent_budget_tower::Estimate,
    ) -> impl std::future::Future<
        Output = Result<agent_budget::OwnedReservation, agent_budget_tower::Denial>,
    > + Send {
        self.tries.fetch_add(1, Ordering::SeqCst);
        let down = self
            .outages
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        std::future::ready(if down {
            Err(agent_budget_tower::Denial::Unavailable {
                agent_id: *agent_id,
                retry_after: Duration::from_millis(1_500),
                message: "the budget store is down".to_owned(),
            })
        } else {
            self.budgets
                .acquire_owned(agent_id, estimate.tokens(), estimate.calls)
                .map_err(agent_budget_tower::Denial::Refused)
        })
    }

    fn budget_chain(&self, agent_id: &Uuid) -> Vec<FullBudgetInfo> {
        self.budgets.chain_info(agent_id)
    }
}

/// The layer over `flaky` (down for `outages` tries), with `max_wait`.
async fn serve_flaky(outages: u64, max_wait: Option<Duration>) -> (Server, Arc<Flaky>) {
    let budgets = Arc::new(BudgetManager::new());
    let agent = Uuid::new_v4();
    budgets.set_budget(BudgetLimit {
        agent_id: agent,
        token_budget: 1_000,
        calls_budget: 10,
        window_secs: 60,
    });
    let flaky = Arc::new(Flaky {
        budgets: budgets.clone(),
        outages: AtomicU64::new(outages),
        tries: AtomicU64::new(0),
    });
    let mut layer =
        BudgetLayer::new(flaky.clone()).identify(BearerKeys::from_iter([(KEY.to_owned(), agent)]));
    if let Some(max_wait) = max_wait {
        layer = layer.max_wait(max_wait);
    }
    let upstream = Arc::new(Upstream::default());
    let app = Router::new()
        .route("/v1/chat/completions", post(complete))
        .with_state(upstream.clone())
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let server = Server {
        url,
        budgets,
        upstream,
        agent,
    };
    (server, flaky)
}

#[tokio::test]
async fn a_budget_that_cannot_be_checked_is_503_with_retry_after_and_nothing_forwarded() {
    let (s, flaky) = serve_flaky(1, None).await;
    let client = reqwest::Client::new();
    let r = s.chat(&client, hi(10)).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&r, "retry-after"), "2", "1.5 s rounds up");
    assert!(r.headers().get("x-ratelimit-remaining-tokens").is_none());
    let error: Value = r.json().await.unwrap();
    assert_eq!(error["error"]["code"], "budget_unavailable");
    assert_eq!(error["error"]["type"], "server_error");
    assert_eq!(error["error"]["message"], "the budget store is down");
    assert_eq!(s.upstream.calls.load(Ordering::SeqCst), 0);
    assert_eq!((s.info().tokens_used, s.info().calls_used), (0, 0));
    // Back: admitted, through the same `Admission`.
    assert_eq!(s.chat(&client, hi(10)).await.status(), StatusCode::OK);
    assert_eq!(flaky.tries.load(Ordering::SeqCst), 2);
    s.settled_to(10).await;
}

#[tokio::test]
async fn with_a_maximum_wait_an_unavailable_budget_is_asked_again_until_it_answers() {
    // Down for three tries: asked again every 50 ms at most (not at the
    // denial's 1.5 s), so admitted within the 2 s wait.
    let (s, flaky) = serve_flaky(3, Some(Duration::from_secs(2))).await;
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    let r = s.chat(&client, hi(10)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(flaky.tries.load(Ordering::SeqCst), 4);
    assert!(
        started.elapsed() < Duration::from_millis(1_500),
        "polled at 50 ms, took {:?}",
        started.elapsed()
    );
    // Down for good: given up at the wait's end, with a last try.
    let (s, flaky) = serve_flaky(u64::MAX, Some(Duration::from_millis(200))).await;
    let r = s.chat(&client, hi(10)).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let tries = flaky.tries.load(Ordering::SeqCst);
    assert!((3..=8).contains(&tries), "{tries} tries in 200 ms");
    assert_eq!(s.upstream.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_key_under_a_team_is_refused_by_the_team_with_the_teams_headers() {
    let (clock, mock) = quanta::Clock::mock();
    let budgets = Arc::new(BudgetManager::with_clock(clock));
    let team = Uuid::new_v4();
    budgets.set_budget(BudgetLimit {
        agent_id: team,
        token_budget: 300,
        calls_budget: 100,
        window_secs: 3_600,
    });
    let s = serve_with(budgets.clone(), (10_000, 5), |l| {
        l.headers(HeaderStyle {
            openai: true,
            ietf: true,
        })
    })
    .await;
    budgets.set_parent(&s.agent, Some(&team)).unwrap();
    let client = reqwest::Client::new();
    // Admitted: tokens are the team's to give (300 - 158 left), calls the
    // key's (4 of 5 left).
    let mut body = hi(150);
    body["mock_usage"] = json!(150);
    let r = s.chat(&client, body).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "300");
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), "142");
    assert_eq!(header(&r, "x-ratelimit-reset-tokens"), "1h0m0s");
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "5");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "4");
    assert_eq!(header(&r, "x-ratelimit-reset-requests"), "1m0s");
    r.bytes().await.unwrap();
    s.settled_to(150).await;
    // 10 s on, 158 more tokens: the key has 9,850 left, the team 150.
    mock.increment(Duration::from_millis(10_000));
    let r = s.chat(&client, hi(150)).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&r, "retry-after"), "3590", "the team's window end");
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "300");
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), "150");
    assert_eq!(header(&r, "x-ratelimit-reset-tokens"), "59m50s");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "4");
    assert_eq!(header(&r, "x-ratelimit-reset-requests"), "50s");
    assert_eq!(
        header(&r, "ratelimit-policy"),
        r#""tokens";q=300;w=3600, "requests";q=5;w=60"#
    );
    assert_eq!(
        header(&r, "ratelimit"),
        r#""tokens";r=150;t=3590, "requests";r=4;t=50"#
    );
    let error: Value = r.json().await.unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("at its ancestor {team}")),
        "{message}"
    );
    assert_eq!(s.upstream.calls.load(Ordering::SeqCst), 1);
}
