//! Several limits per key, spend in dollars and per-model limits, over
//! real HTTP: the gateway in process on loopback, in front of the mock
//! upstream, its budgets on a mock clock where time matters.

mod common;

use std::time::Duration;

use agent_budget::BudgetManager;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

const TEAM: &str = "5d1e7c2a-0000-4000-8000-00000000a11a";

/// A configuration whose agent A (key `KEY_A`) has the limits `limits`
/// (TOML tables, `[[agents.limits]]` each), with `top` lines at the top
/// (prices, tokenizer) and `more` agents after it.
fn with_limits(top: &str, limits: &str, more: &str) -> String {
    format!(
        r#"admin_key = "{ADMIN_KEY}"
tokenizer = "bytes"
{top}

[[agents]]
api_key = "{KEY_A}"
agent_id = "{AGENT_A}"
{limits}
{more}
"#
    )
}

/// A chat request for `model` whose usage the mock reports as `prompt`
/// and `completion` tokens, asking for at most `max_tokens`.
fn chat(model: &str, max_tokens: u64, prompt: u64, completion: u64) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "mock_prompt_tokens": prompt,
        "mock_completion_tokens": completion,
    })
}

fn small(model: &str) -> Value {
    chat(model, 10, 5, 5)
}

#[tokio::test]
async fn two_windows_on_one_key_each_bind_in_turn() {
    let (clock, time) = quanta::Clock::mock();
    let text = with_limits(
        "",
        "[[agents.limits]]\nwindow = \"1m\"\nrequests = 3\n[[agents.limits]]\nwindow = \"1h\"\nrequests = 5\n",
        "",
    );
    let g = start_with(BudgetManager::with_clock(clock), &text, None).await;
    for i in 0..3 {
        let r = g.chat(KEY_A, &small("m")).await;
        assert_eq!(r.status(), StatusCode::OK, "request {i}");
        // The minute binds: it has the fewest left.
        assert_eq!(header(&r, "x-ratelimit-limit-requests"), "3");
        assert_eq!(
            header(&r, "x-ratelimit-remaining-requests"),
            (2 - i).to_string()
        );
    }
    let r = g.chat(KEY_A, &small("m")).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "3");
    assert_eq!(header(&r, "retry-after"), "60");

    // The next minute: two more, and then the hour binds.
    time.increment(Duration::from_secs(60));
    for i in 0..2 {
        let r = g.chat(KEY_A, &small("m")).await;
        assert_eq!(r.status(), StatusCode::OK, "request {i} of minute 2");
        // The hour, the key's second limit, binds now: it has 1, then 0
        // left, where the minute has 2, then 1.
        assert_eq!(header(&r, "x-ratelimit-limit-requests"), "5");
        assert_eq!(
            header(&r, "x-ratelimit-remaining-requests"),
            (1 - i).to_string()
        );
    }
    let r = g.chat(KEY_A, &small("m")).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "5");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
    let wait: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((60..=3_540).contains(&wait), "the hour's end: {wait}");
    // A fresh minute does not help: the hour still binds.
    time.increment(Duration::from_secs(60));
    assert_eq!(
        g.chat(KEY_A, &small("m")).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(calls(&g.stats), 5);
    // The budgets view lists the agent's own budget, not its other cells.
    let all: Vec<Value> = admin_view(&g.client, &g.url, "/v1/budgets").await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["agent_id"], AGENT_A);
    // The hour's end frees both.
    time.increment(Duration::from_secs(3_600));
    assert_eq!(g.chat(KEY_A, &small("m")).await.status(), StatusCode::OK);
}

const PRICES: &str = r#"
[[models]]
name = "gpt-4o*"
input_usd_per_mtok = 2.50
output_usd_per_mtok = 10.00
cached_input_usd_per_mtok = 1.25
"#;

#[tokio::test]
async fn a_spend_limit_refuses_at_the_request_that_would_pass_it() {
    let text = with_limits(
        PRICES,
        "[[agents.limits]]\nwindow = \"1h\"\nspend_usd = 0.01\n",
        "",
    );
    let g = start_with(BudgetManager::new(), &text, None).await;
    // Each request reports 200 prompt and 100 completion tokens: 200 ×
    // $2.50/M + 100 × $10/M = 500 + 1,000 µ$ = $0.0015. Its estimate is
    // its prompt's bound at the input price plus 100 × $10/M = 1,000 µ$
    // and a little. Six are spent ($0.009); the seventh's estimate does
    // not fit the $0.001 left.
    let body = chat("gpt-4o", 100, 200, 100);
    let mut admitted: u32 = 0;
    for i in 0..10 {
        let r = g.chat(KEY_A, &body).await;
        if r.status() != StatusCode::OK {
            assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "request {i}");
            assert_eq!(header(&r, "x-budget-spend-limit-usd"), "0.010000");
            assert_eq!(header(&r, "x-budget-spend-remaining-usd"), "0.001000");
            let error: Value = r.json().await.unwrap();
            assert_eq!(error["error"]["type"], "spend", "{error}");
            assert!(
                error["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("spend limit"),
                "{error}"
            );
            break;
        }
        // Where the spend limit stands with this request's estimate (a
        // little over $0.001) taken: what the earlier ones spent, $0.0015
        // each, and the estimate, are gone.
        let remaining: f64 = header(&r, "x-budget-spend-remaining-usd").parse().unwrap();
        let before = 0.010 - 0.0015 * f64::from(admitted);
        assert!(
            (before - 0.0012..=before - 0.001).contains(&remaining),
            "request {i}: ${remaining} left of ${before}"
        );
        assert_eq!(header(&r, "x-budget-spend-limit-usd"), "0.010000");
        r.bytes().await.unwrap();
        admitted += 1;
        let spent = 1_500 * u64::from(admitted);
        eventually("the settle", || {
            let view = g.budgets.all_full_info();
            view.iter()
                .any(|i| i.token_limit == 10_000 && i.tokens_used == spent)
        })
        .await;
    }
    assert_eq!(admitted, 6);
    assert_eq!(calls(&g.stats), 6);
    let agent: Value = admin_view(&g.client, &g.url, &format!("/v1/agents/{AGENT_A}")).await;
    let limit = &agent["limits"][0];
    assert_eq!(limit["used"]["spend_usd"], json!(0.009), "{agent}");
    assert_eq!(limit["remaining"]["spend_usd"], json!(0.001), "{agent}");
    assert!(limit["resets_in_secs"].as_u64().unwrap() > 3_500);
    let metrics = g.admin("/metrics", None).await.text().await.unwrap();
    assert!(
        metrics.contains("budget_spend_micro_usd_total"),
        "{metrics}"
    );
}

#[tokio::test]
async fn cached_prompt_tokens_are_priced_at_their_own_price() {
    let text = with_limits(
        PRICES,
        "[[agents.limits]]\nwindow = \"1h\"\nspend_usd = 1.0\n",
        "",
    );
    let (upstream, served) = fixed_usage_upstream(
        json!({"prompt_tokens": 1_000, "completion_tokens": 0, "total_tokens": 1_000,
               "prompt_tokens_details": {"cached_tokens": 400}}),
    )
    .await;
    let g = start_with(BudgetManager::new(), &text, Some(upstream)).await;
    let r = g.chat(KEY_A, &chat("gpt-4o", 10, 0, 0)).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.bytes().await.unwrap();
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);
    // 600 × $2.50/M + 400 × $1.25/M = 1,500 + 500 µ$.
    eventually("the settle", || {
        g.budgets
            .all_full_info()
            .iter()
            .any(|i| i.token_limit == 1_000_000 && i.tokens_used == 2_000)
    })
    .await;
}

/// An upstream that answers every chat with `usage`, and counts.
async fn fixed_usage_upstream(
    usage: Value,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = served.clone();
    let router = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move || {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let usage = usage.clone();
            async move {
                axum::Json(
                    json!({"id": "x", "object": "chat.completion", "choices": [], "usage": usage}),
                )
            }
        }),
    );
    (serve_on_loopback(router).await, served)
}

#[tokio::test]
async fn an_unpriced_model_under_a_spend_limit_is_400_and_nothing_is_forwarded() {
    let limits = "[[agents.limits]]\nwindow = \"1h\"\nspend_usd = 5.0\n";
    let g = start_with(BudgetManager::new(), &with_limits(PRICES, limits, ""), None).await;
    let r = g.chat(KEY_A, &small("o3")).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let error: Value = r.json().await.unwrap();
    assert_eq!(error["error"]["code"], "model_not_priced", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"o3\""),
        "{error}"
    );
    assert_eq!(calls(&g.stats), 0);
    assert!(
        g.budgets.all_full_info().iter().all(|i| i.calls_used == 0),
        "nothing charged"
    );
    assert_eq!(
        g.chat(KEY_A, &small("gpt-4o")).await.status(),
        StatusCode::OK
    );

    // A default price prices every model.
    let default = format!(
        "{PRICES}\n[[models]]\nname = \"*\"\ninput_usd_per_mtok = 1\noutput_usd_per_mtok = 1\n"
    );
    let g = start_with(
        BudgetManager::new(),
        &with_limits(&default, limits, ""),
        None,
    )
    .await;
    assert_eq!(g.chat(KEY_A, &small("o3")).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_per_model_limit_refuses_its_models_while_others_pass() {
    let text = with_limits(
        "",
        "[[agents.limits]]\nwindow = \"1m\"\nrequests = 100\n[[agents.limits]]\nwindow = \"1m\"\nrequests = 2\nmodel = \"gpt-4o*\"\n",
        "",
    );
    let g = start_with(BudgetManager::new(), &text, None).await;
    for _ in 0..2 {
        assert_eq!(
            g.chat(KEY_A, &small("gpt-4o")).await.status(),
            StatusCode::OK
        );
    }
    let r = g.chat(KEY_A, &small("gpt-4o")).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "2");
    assert_eq!(
        g.chat(KEY_A, &small("gpt-4o-mini")).await.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the glob matches it too"
    );
    for _ in 0..3 {
        let r = g.chat(KEY_A, &small("o3")).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "x-ratelimit-limit-requests"), "100");
    }
    assert_eq!(calls(&g.stats), 5);
}

/// 40 requests at once on one key with two request limits admit exactly
/// what the tighter allows, whichever of the two it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_two_limits_admit_exactly_the_tighter() {
    for (minute, hour) in [(10, 20), (20, 10)] {
        let text = with_limits(
            "",
            &format!(
                "[[agents.limits]]\nwindow = \"1m\"\nrequests = {minute}\n[[agents.limits]]\nwindow = \"1h\"\nrequests = {hour}\ntokens = 1000000\n"
            ),
            "",
        );
        let g = std::sync::Arc::new(start_with(BudgetManager::new(), &text, None).await);
        let mut tasks = Vec::new();
        for _ in 0..40 {
            let g = g.clone();
            tasks.push(tokio::spawn(async move {
                g.chat(KEY_A, &small("m")).await.status()
            }));
        }
        let mut ok = 0;
        for task in tasks {
            let status = task.await.unwrap();
            assert!(
                status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS,
                "{status}"
            );
            ok += u64::from(status == StatusCode::OK);
        }
        assert_eq!(ok, minute.min(hour), "minute {minute}, hour {hour}");
        assert_eq!(calls(&g.stats), minute.min(hour));
    }
}

#[tokio::test]
async fn a_parents_list_of_limits_binds_its_children() {
    let team = format!(
        "parent = \"{TEAM}\"\n\n[[agents]]\napi_key = \"{KEY_B}\"\nagent_id = \"{AGENT_B}\"\ntoken_budget = 100000\ncalls_budget = 100\nwindow_secs = 60\nparent = \"{TEAM}\"\n\n[[agents]]\nagent_id = \"{TEAM}\"\n[[agents.limits]]\nwindow = \"1m\"\nrequests = 100\n[[agents.limits]]\nwindow = \"1h\"\nrequests = 3\n[[agents.limits]]\nwindow = \"1h\"\nspend_usd = 1.0\n"
    );
    let text = with_limits(
        PRICES,
        "token_budget = 100000\ncalls_budget = 100\nwindow_secs = 60",
        &team,
    );
    let g = start_with(BudgetManager::new(), &text, None).await;
    // The team's spend limit needs a price: an unpriced model is 400 for
    // its children too, nothing charged.
    assert_eq!(
        g.chat(KEY_A, &small("o3")).await.status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        g.chat(KEY_A, &small("gpt-4o")).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        g.chat(KEY_B, &small("gpt-4o")).await.status(),
        StatusCode::OK
    );
    let r = g.chat(KEY_A, &small("gpt-4o")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers().contains_key("x-budget-spend-remaining-usd"),
        "the team's spend is the child's"
    );
    let r = g.chat(KEY_B, &small("gpt-4o")).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "the team's hour");
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "3");
    // Once a limit that needs no body is spent, the refusal comes before
    // the body is read: an unpriced model is refused for the budget.
    assert_eq!(
        g.chat(KEY_A, &small("o3")).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(calls(&g.stats), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_takes_lists_with_spend_and_models() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, _stats) = start_mock().await;
    let db = dir.path().join("gw.db").display().to_string();
    // The admin helper's chat names no model: the default price prices it.
    let text = format!(
        "admin_key = \"{ADMIN_KEY}\"\n{PRICES}\n[[models]]\nname = \"*\"\ninput_usd_per_mtok = 1\noutput_usd_per_mtok = 1\n"
    );
    let g = common::admin::start_with_db(&text, &db, &upstream, None).await;
    let agent = g
        .create_agent(json!({"limits": [
            {"window": "1m", "requests": 5},
            {"window": "1h", "spend_usd": 2.5},
            {"window": "1m", "requests": 1, "model": "gpt-4o*"},
        ]}))
        .await;
    let id = agent["agent_id"].as_str().unwrap().to_owned();
    let limits = agent["limits"].as_array().unwrap();
    assert_eq!(limits.len(), 3, "{agent}");
    assert_eq!(limits[1]["remaining"]["spend_usd"], json!(2.5), "{agent}");
    assert_eq!(limits[2]["limit"]["model"], "gpt-4o*", "{agent}");
    let (_, key) = g.create_key(&id).await;
    assert_eq!(g.chat(&key).await, StatusCode::OK);
    let view = g.get(&format!("/v1/agents/{id}")).await;
    assert_eq!(view["limits"][0]["used"]["requests"], 1, "{view}");
    g.stop().await;
}

#[tokio::test]
async fn calendar_windows_reset_at_midnight_utc_and_on_the_first() {
    use chrono::{DateTime, Utc};
    let (clock, time) = quanta::Clock::mock();
    // A minute before the end of February in a leap year.
    let start: DateTime<Utc> = "2028-02-29T23:59:00Z".parse().unwrap();
    let text = with_limits(
        "",
        "[[agents.limits]]\nwindow = \"1mo\"\nrequests = 3\n[[agents.limits]]\nwindow = \"day\"\nrequests = 2\n",
        "",
    );
    let g = start_with(BudgetManager::with_clock_at(clock, start), &text, None).await;
    for _ in 0..2 {
        assert_eq!(g.chat(KEY_A, &small("m")).await.status(), StatusCode::OK);
    }
    let r = g.chat(KEY_A, &small("m")).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "the day's two");
    assert_eq!(header(&r, "retry-after"), "60", "midnight UTC");
    // 1 March, 00:00 UTC: a new day and a new month.
    time.increment(Duration::from_secs(60));
    for _ in 0..2 {
        assert_eq!(g.chat(KEY_A, &small("m")).await.status(), StatusCode::OK);
    }
    // The next day: the month's third, then the month binds (3 a month).
    time.increment(Duration::from_secs(86_400));
    assert_eq!(g.chat(KEY_A, &small("m")).await.status(), StatusCode::OK);
    let r = g.chat(KEY_A, &small("m")).await;
    assert_eq!(
        r.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the month's three"
    );
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "3");
    let agent: Value = admin_view(&g.client, &g.url, &format!("/v1/agents/{AGENT_A}")).await;
    assert_eq!(agent["limits"][0]["limit"]["window"], "1mo", "{agent}");
    // 30 days of March are left: 2 March 00:00 to 1 April 00:00.
    assert_eq!(agent["limits"][0]["resets_in_secs"], 30 * 86_400, "{agent}");
    assert_eq!(calls(&g.stats), 5);
}

#[tokio::test]
async fn a_streamed_response_settles_its_spend_from_the_usage_chunk() {
    let text = with_limits(
        PRICES,
        "[[agents.limits]]\nwindow = \"1h\"\nspend_usd = 1.0\n",
        "",
    );
    let g = start_with(BudgetManager::new(), &text, None).await;
    let mut body = chat("gpt-4o", 100, 200, 100);
    body["stream"] = json!(true);
    let r = g.chat(KEY_A, &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert!(
        !text.contains("\"usage\":{"),
        "the usage chunk is hidden: {text}"
    );
    // 200 × $2.50/M + 100 × $10/M, from the stream's usage chunk.
    eventually("the settle", || {
        g.budgets
            .all_full_info()
            .iter()
            .any(|i| i.token_limit == 1_000_000 && i.tokens_used == 1_500)
    })
    .await;
}
