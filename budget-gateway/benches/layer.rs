//! What the budget layer costs a request in CPU, without the network: a
//! chat completion through `BudgetLayer` around a service that answers at
//! once with a canned completion, against the same service alone, on one
//! thread.
//!
//! ```text
//! cargo bench -p budget-gateway --bench layer
//! ```
//!
//! Each row reads the request body, and the response body to its end (the
//! settle happens there), as the gateway does. The estimator rows show
//! where the time goes: the prompt's count with o200k, the same with the
//! byte count, and a fixed cost (no body read at all).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/mod.rs"]
mod support;

use agent_budget::{BudgetLimit, BudgetManager};
use agent_budget_tower::openai::{ByteCount, OpenAiEstimator};
use agent_budget_tower::{BudgetLayer, FixedCost};
use axum::body::Body;
use budget_gateway::config::Tokenizer;
use budget_gateway::tokenizer::Counter;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use tower::{Layer, Service, ServiceExt};

const AGENT: &str = "7f9c24e8-3b1a-4c5d-9e2f-1a2b3c4d5e6f";
const RESPONSE: &str = r#"{"id":"mock-1","object":"chat.completion","model":"mock-model","choices":[{"index":0,"message":{"role":"assistant","content":"tok tok tok tok "},"finish_reason":"stop"}],"usage":{"prompt_tokens":30,"completion_tokens":16,"total_tokens":46}}"#;

fn request() -> Request<Body> {
    Request::post("/v1/chat/completions")
        .header("x-agent-id", AGENT)
        .header("content-type", "application/json")
        .body(Body::from(support::REQUEST_BODY))
        .unwrap()
}

/// The upstream: reads the body, answers the canned completion.
async fn upstream(request: Request<Body>) -> Result<Response<Body>, Infallible> {
    let _ = request.into_body().collect().await;
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(Bytes::from_static(RESPONSE.as_bytes())))
        .unwrap())
}

/// Nanoseconds per request of `service`, over `n` requests.
async fn time<S, B>(service: &S, n: u32) -> f64
where
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let start = Instant::now();
    for _ in 0..n {
        let response = service.clone().oneshot(request()).await.unwrap();
        let _ = response.into_body().collect().await.unwrap();
    }
    start.elapsed().as_nanos() as f64 / f64::from(n)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let budgets = Arc::new(BudgetManager::new());
    budgets.set_budget(BudgetLimit {
        agent_id: AGENT.parse().unwrap(),
        token_budget: u64::MAX / 2,
        calls_budget: u64::MAX / 2,
        window_secs: 1 << 30,
    });
    let inner = tower::service_fn(upstream);
    let base = BudgetLayer::new(budgets);
    let o200k = base
        .clone()
        .estimator(OpenAiEstimator::new(Counter::new(Tokenizer::O200kBase)))
        .layer(inner);
    let bytes = base
        .clone()
        .estimator(OpenAiEstimator::new(ByteCount))
        .layer(inner);
    let fixed = base.estimator(FixedCost::default()).layer(inner);
    let count = 200_000;
    runtime.block_on(async {
        Counter::new(Tokenizer::O200kBase).warm_up();
        let mut totals = [0f64; 4];
        let rounds = 5;
        for round in 0..rounds {
            // Rotate the order, so a slow patch of a shared machine is
            // shared.
            for k in 0..4 {
                let i = (round + k) % 4;
                totals[i] += match i {
                    0 => time(&inner, count).await,
                    1 => time(&o200k, count).await,
                    2 => time(&bytes, count).await,
                    _ => time(&fixed, count).await,
                };
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mean = totals.map(|t| t / rounds as f64);
        println!("| service | ns per request | added by the layer |");
        println!("|---|---|---|");
        for (name, ns) in [
            ("the inner service alone", mean[0]),
            ("layer, prompt counted with o200k", mean[1]),
            ("layer, prompt counted as bytes", mean[2]),
            ("layer, fixed cost (body not read)", mean[3]),
        ] {
            println!("| {name} | {ns:.0} | {:+.0} ns |", ns - mean[0]);
        }
    });
}
