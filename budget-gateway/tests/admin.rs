//! The admin API over real HTTP, on SQLite and on the machine's
//! PostgreSQL (a database of each test's own): agents and keys through
//! their whole life with the budget enforced at each step, a restart on
//! the same database, refused requests that change nothing, the file's
//! agents beside the API's, reloads, the OpenAPI document against the
//! routes, and no plaintext key in the database file.

mod common;

use std::path::Path;

use agent_budget::MAX_LEVELS;
use budget_gateway::config;
use budget_gateway::db::Database;
use budget_gateway::gateway::{Gateway, GatewayError, Limiter};
use budget_gateway::keys::KeyHash;
use common::admin::{start_with_db, Served};
use common::postgres::TestDb;
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// A minute's window of `requests` requests and plenty of tokens.
fn per_minute(requests: u64) -> Value {
    json!([{"window": "1m", "requests": requests, "tokens": 1_000_000}])
}

/// The agents as listed, without what the clock moves (the time to each
/// window's end).
fn unclocked(mut agents: Value) -> Value {
    for agent in agents.as_array_mut().unwrap() {
        for limit in agent["limits"].as_array_mut().unwrap() {
            limit.as_object_mut().unwrap().remove("resets_in_secs");
        }
    }
    agents
}

fn sqlite_in(dir: &tempfile::TempDir) -> String {
    dir.path().join("gateway.db").to_str().unwrap().to_owned()
}

/// A gateway with [`config_text`]'s agents (a thousand calls a minute
/// for A) on a SQLite file in `dir`, in front of `upstream`.
async fn on_sqlite(dir: &tempfile::TempDir, upstream: &str) -> Served {
    start_with_db(
        &config_text(1_000_000, 1_000, ""),
        &sqlite_in(dir),
        upstream,
        None,
    )
    .await
}

/// Two tests of `check`: on a SQLite file of its own, and on a PostgreSQL
/// database of its own.
macro_rules! on_both_databases {
    ($check:ident: $sqlite:ident, $postgres:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            let dir = tempfile::tempdir().unwrap();
            $check(&sqlite_in(&dir)).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            let db = TestDb::create().await;
            $check(&db.url()).await;
        }
    };
}

/// Create, key, use, change, rotate, revoke, delete: the budget enforced
/// at each step, counted by the upstream.
async fn lifecycle(db: &str) {
    let (upstream, stats) = start_mock().await;
    let g = start_with_db(&config_text(1_000_000, 1_000, ""), db, &upstream, None).await;

    // Create: an id is generated, the limit is shown with nothing used.
    let agent = g
        .create_agent(json!({"limits": per_minute(3), "metrics_label": "bot"}))
        .await;
    let id = agent["agent_id"].as_str().unwrap().to_owned();
    assert_eq!(agent["source"], "api");
    assert_eq!(agent["metrics_label"], "bot");
    assert_eq!(agent["limits"][0]["limit"]["window"], "1m");
    assert_eq!(agent["limits"][0]["limit"]["requests"], 3);
    assert_eq!(agent["limits"][0]["used"]["requests"], 0);
    assert_eq!(agent["limits"][0]["remaining"]["requests"], 3);
    let all = g.get("/v1/agents").await;
    let sources: Vec<(&str, &str)> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["agent_id"].as_str().unwrap(),
                a["source"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(sources.contains(&(id.as_str(), "api")), "{all}");
    assert!(sources.contains(&(AGENT_A, "file")), "{all}");
    assert_eq!(sources.len(), 3);

    // A key: shown once, listed by its prefix only.
    let (k1_id, k1) = g.create_key(&id).await;
    assert!(k1.starts_with("sk-ab-") && k1.len() >= 6 + 32, "{k1}");
    let keys = g.get(&format!("/v1/agents/{id}/keys")).await;
    assert_eq!(keys.as_array().unwrap().len(), 1);
    assert_eq!(keys[0]["key_id"], k1_id);
    assert_eq!(keys[0]["prefix"], k1[..12]);
    assert!(!keys.to_string().contains(&k1[12..]), "{keys}");

    // Use: three requests a minute.
    for _ in 0..3 {
        assert_eq!(g.chat(&k1).await, StatusCode::OK);
    }
    assert_eq!(g.chat(&k1).await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(calls(&stats), 3);

    // Change: five a minute; the three used stay used.
    let (status, changed) = g
        .call(
            Method::PUT,
            &format!("/v1/agents/{id}"),
            Some(&json!({"limits": per_minute(5), "metrics_label": "bot"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_eq!(changed["limits"][0]["used"]["requests"], 3, "{changed}");
    assert_eq!(
        changed["limits"][0]["remaining"]["requests"], 2,
        "{changed}"
    );
    for _ in 0..2 {
        assert_eq!(g.chat(&k1).await, StatusCode::OK);
    }
    assert_eq!(g.chat(&k1).await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(calls(&stats), 5);
    // The older fields mean the same window.
    let (status, changed) = g
        .call(
            Method::PUT,
            &format!("/v1/agents/{id}"),
            Some(&json!({"token_budget": 1_000_000, "calls_budget": 10, "window_secs": 60})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_eq!(
        changed["limits"][0]["limit"],
        json!({"window": "1m", "requests": 10, "tokens": 1_000_000})
    );
    assert_eq!(changed["limits"][0]["used"]["requests"], 5);
    assert!(
        changed.get("metrics_label").is_none(),
        "a PUT replaces: {changed}"
    );

    // Rotate: a second key works beside the first, then the first is
    // revoked and refused by the very next request.
    let (k2_id, k2) = g.create_key(&id).await;
    assert_ne!(k1, k2);
    assert_eq!(g.chat(&k2).await, StatusCode::OK);
    assert_eq!(g.chat(&k1).await, StatusCode::OK);
    let (status, _) = g
        .call(
            Method::DELETE,
            &format!("/v1/agents/{id}/keys/{k1_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(g.chat(&k1).await, StatusCode::UNAUTHORIZED);
    assert_eq!(g.chat(&k2).await, StatusCode::OK);
    let keys = g.get(&format!("/v1/agents/{id}/keys")).await;
    assert_eq!(keys.as_array().unwrap().len(), 1);
    assert_eq!(keys[0]["key_id"], k2_id);
    let (status, _) = g
        .call(
            Method::DELETE,
            &format!("/v1/agents/{id}/keys/{k1_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "revoked once");
    assert_eq!(calls(&stats), 8);

    // Delete: its keys are refused at once, and it is gone.
    let (status, _) = g
        .call(Method::DELETE, &format!("/v1/agents/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(g.chat(&k2).await, StatusCode::UNAUTHORIZED);
    let (status, _) = g.call(Method::GET, &format!("/v1/agents/{id}"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = g
        .call(Method::GET, &format!("/v1/agents/{id}/keys"), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(g.get("/v1/agents").await.as_array().unwrap().len(), 2);
    // Nothing more reached the upstream; the file's agents still work.
    assert_eq!(calls(&stats), 8);
    assert_eq!(g.chat(KEY_A).await, StatusCode::OK);
    // An id can be used again once deleted, without the old keys.
    let again = g
        .create_agent(json!({"agent_id": id, "limits": per_minute(1)}))
        .await;
    assert_eq!(again["limits"][0]["used"]["requests"], 0);
    assert_eq!(g.chat(&k2).await, StatusCode::UNAUTHORIZED);
    g.stop().await;
}

on_both_databases!(lifecycle: the_whole_lifecycle_on_sqlite, the_whole_lifecycle_on_postgres);

/// A gateway whose agents have one limit each admits without reading the
/// plans (no agent has one); an agent made at runtime with two limits is
/// held to both from its first request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_limit_made_at_runtime_binds_from_the_first_request() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, stats) = start_mock().await;
    let g = on_sqlite(&dir, &upstream).await;
    let limits = json!([
        {"window": "1m", "requests": 5, "tokens": 1_000_000},
        {"window": "1h", "requests": 2},
    ]);
    let id = g.create_agent(json!({ "limits": limits })).await["agent_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, key) = g.create_key(&id).await;
    for _ in 0..2 {
        assert_eq!(g.chat(&key).await, StatusCode::OK);
    }
    assert_eq!(
        g.chat(&key).await,
        StatusCode::TOO_MANY_REQUESTS,
        "the hour's two requests are spent, with three left in the minute"
    );
    assert_eq!(calls(&stats), 2);
    g.stop().await;
}

/// Agents, keys and usage (with `--state`) survive a restart on the same
/// database; so does the keys' last use.
async fn restart(db: &str) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let (upstream, stats) = start_mock().await;
    let text = config_text(1_000_000, 1_000, "");
    let g = start_with_db(&text, db, &upstream, Some(&state)).await;
    let id = g.create_agent(json!({"limits": per_minute(5)})).await["agent_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, key) = g.create_key(&id).await;
    for _ in 0..2 {
        assert_eq!(g.chat(&key).await, StatusCode::OK);
    }
    g.stop().await;

    let g = start_with_db(&text, db, &upstream, Some(&state)).await;
    assert_eq!(g.chat(&key).await, StatusCode::OK);
    let agent = g.get(&format!("/v1/agents/{id}")).await;
    assert_eq!(agent["limits"][0]["used"]["requests"], 3, "{agent}");
    let keys = g.get(&format!("/v1/agents/{id}/keys")).await;
    assert!(keys[0]["last_used_at"].is_string(), "{keys}");
    for _ in 0..2 {
        assert_eq!(g.chat(&key).await, StatusCode::OK);
    }
    assert_eq!(g.chat(&key).await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(calls(&stats), 5);
    g.stop().await;
}

on_both_databases!(restart: agents_keys_and_usage_survive_a_restart_on_sqlite, agents_keys_and_usage_survive_a_restart_on_postgres);

/// Requests the API refuses, with their status and the field to blame;
/// none of them changes anything.
async fn refusals(db: &str) {
    let (upstream, stats) = start_mock().await;
    let g = start_with_db(&config_text(1_000_000, 1_000, ""), db, &upstream, None).await;
    let limits = per_minute(10);
    let l = limits.to_string();
    let id = |agent: &Value| agent["agent_id"].as_str().unwrap().to_owned();
    let team = id(&g.create_agent(json!({"limits": limits})).await);
    let member = id(&g
        .create_agent(json!({"limits": limits, "parent": team}))
        .await);
    // A chain as deep as allowed: team, member, and six more below.
    let mut deepest = member.clone();
    for _ in 2..MAX_LEVELS {
        deepest = id(&g
            .create_agent(json!({"limits": limits, "parent": deepest}))
            .await);
    }
    let outsider = id(&g.create_agent(json!({"limits": limits})).await);
    let (_, key) = g.create_key(&member).await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let before = unclocked(g.get("/v1/agents").await);
    let keys_before = g.get(&format!("/v1/agents/{member}/keys")).await;

    // Without the admin key.
    for key in [None, Some(KEY_A), Some(key.as_str())] {
        for (method, path) in [
            (Method::GET, "/v1/agents".to_owned()),
            (Method::POST, "/v1/agents".to_owned()),
            (Method::DELETE, format!("/v1/agents/{member}")),
            (Method::POST, format!("/v1/agents/{member}/keys")),
        ] {
            let (status, body) = g
                .call_as(key, method.clone(), &path, Some(&json!({"limits": limits})))
                .await;
            let want = if key.is_some() {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::UNAUTHORIZED
            };
            assert_eq!(status, want, "{method} {path} with {key:?}: {body}");
            assert!(body["error"]["message"].is_string(), "{body}");
        }
    }

    let agents = "/v1/agents".to_owned();
    let one = |agent: &str| format!("/v1/agents/{agent}");
    let cases: Vec<(Method, String, String, StatusCode, Option<&str>)> = vec![
        (
            Method::POST,
            agents.clone(),
            "{".into(),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            Method::POST,
            agents.clone(),
            "[]".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            Method::POST,
            agents.clone(),
            "{}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            Method::POST,
            agents.clone(),
            format!(r#"{{"limits": {l}, "colour": "red"}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            Method::POST,
            agents.clone(),
            r#"{"limits": [{"window": "1m", "requests": 1}, {"window": "60s", "tokens": 5}]}"#
                .into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("limits[1].tokens"),
        ),
        (
            Method::POST,
            agents.clone(),
            r#"{"limits": [{"window": "1m", "spend_usd": -5.0}]}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("limits[0].spend_usd"),
        ),
        (
            Method::POST,
            agents.clone(),
            r#"{"limits": [{"window": "1 minute", "requests": 1}]}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            Method::POST,
            agents.clone(),
            r#"{"limits": [{"refill": "1m"}]}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("limits[0].requests"),
        ),
        (
            Method::POST,
            agents.clone(),
            format!(
                r#"{{"limits": {l}, "token_budget": 5, "calls_budget": 1, "window_secs": 60}}"#
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("token_budget"),
        ),
        (
            Method::POST,
            agents.clone(),
            r#"{"token_budget": 5, "window_secs": 60}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            Method::POST,
            agents.clone(),
            r#"{"token_budget": 5, "calls_budget": 1, "window_secs": 0}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("window_secs"),
        ),
        (
            Method::POST,
            agents.clone(),
            format!(r#"{{"limits": {l}, "parent": "{unknown}"}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("parent"),
        ),
        (
            Method::POST,
            agents.clone(),
            format!(r#"{{"agent_id": "{unknown}", "limits": {l}, "parent": "{unknown}"}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("parent"),
        ),
        (
            Method::POST,
            agents.clone(),
            format!(r#"{{"limits": {l}, "parent": "{AGENT_A}"}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("parent"),
        ),
        (
            Method::POST,
            agents.clone(),
            format!(r#"{{"limits": {l}, "parent": "{deepest}"}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("parent"),
        ),
        (
            Method::POST,
            agents.clone(),
            format!(r#"{{"limits": {l}, "metrics_label": "  "}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("metrics_label"),
        ),
        (
            Method::POST,
            agents.clone(),
            format!(r#"{{"limits": {l}, "agent_id": "not-a-uuid"}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            Method::POST,
            agents.clone(),
            format!(r#"{{"limits": {l}, "agent_id": "{AGENT_A}"}}"#),
            StatusCode::CONFLICT,
            None,
        ),
        (
            Method::POST,
            agents.clone(),
            format!(r#"{{"limits": {l}, "agent_id": "{team}"}}"#),
            StatusCode::CONFLICT,
            None,
        ),
        // A loop, and a subtree moved where the chain grows too deep.
        (
            Method::PUT,
            one(&team),
            format!(r#"{{"limits": {l}, "parent": "{deepest}"}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("parent"),
        ),
        (
            Method::PUT,
            one(&team),
            format!(r#"{{"limits": {l}, "parent": "{outsider}"}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("parent"),
        ),
        (
            Method::PUT,
            one(&member),
            format!(r#"{{"limits": {l}, "parent": "{team}", "agent_id": "{team}"}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("agent_id"),
        ),
        (
            Method::PUT,
            one(&member),
            "nope".into(),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            Method::PUT,
            one(AGENT_A),
            format!(r#"{{"limits": {l}}}"#),
            StatusCode::CONFLICT,
            None,
        ),
        (
            Method::PUT,
            one(&unknown),
            format!(r#"{{"limits": {l}}}"#),
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            Method::PUT,
            one("not-a-uuid"),
            format!(r#"{{"limits": {l}}}"#),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            Method::DELETE,
            one(&team),
            String::new(),
            StatusCode::CONFLICT,
            None,
        ),
        (
            Method::DELETE,
            one(AGENT_A),
            String::new(),
            StatusCode::CONFLICT,
            None,
        ),
        (
            Method::DELETE,
            one(&unknown),
            String::new(),
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            Method::GET,
            one(&unknown),
            String::new(),
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            Method::POST,
            format!("/v1/agents/{AGENT_A}/keys"),
            "{}".into(),
            StatusCode::CONFLICT,
            None,
        ),
        (
            Method::GET,
            format!("/v1/agents/{AGENT_A}/keys"),
            String::new(),
            StatusCode::CONFLICT,
            None,
        ),
        (
            Method::POST,
            format!("/v1/agents/{member}/keys"),
            r#"{"nme": "ci"}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            Method::POST,
            format!("/v1/agents/{member}/keys"),
            r#"{"name": ""}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("name"),
        ),
        (
            Method::POST,
            format!("/v1/agents/{unknown}/keys"),
            "{}".into(),
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            Method::DELETE,
            format!("/v1/agents/{member}/keys/{unknown}"),
            String::new(),
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            Method::DELETE,
            format!("/v1/agents/{member}/keys/x"),
            String::new(),
            StatusCode::BAD_REQUEST,
            None,
        ),
    ];
    for (method, path, body, status, param) in cases {
        let (got, answer) = g.call_raw(method.clone(), &path, &body).await;
        assert_eq!(got, status, "{method} {path} {body}: {answer}");
        let error = &answer["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{answer}"
        );
        assert_eq!(
            error["param"].as_str(),
            param,
            "{method} {path} {body}: {answer}"
        );
        assert_eq!(
            unclocked(g.get("/v1/agents").await),
            before,
            "after {method} {path} {body}"
        );
    }
    assert_eq!(
        g.get(&format!("/v1/agents/{member}/keys")).await,
        keys_before
    );
    assert_eq!(
        g.chat(&key).await,
        StatusCode::OK,
        "the member's key still works"
    );
    assert_eq!(calls(&stats), 1);
    g.stop().await;
}

on_both_databases!(refusals: bad_requests_are_refused_and_change_nothing_on_sqlite, bad_requests_are_refused_and_change_nothing_on_postgres);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_api_agents_spend_from_their_parent() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, stats) = start_mock().await;
    let g = on_sqlite(&dir, &upstream).await;
    let team = g.create_agent(json!({"limits": per_minute(3)})).await;
    let team = team["agent_id"].as_str().unwrap();
    let mut keys = Vec::new();
    for _ in 0..2 {
        let member = g
            .create_agent(json!({"limits": per_minute(10), "parent": team}))
            .await;
        assert_eq!(member["parent"], team);
        keys.push(g.create_key(member["agent_id"].as_str().unwrap()).await.1);
    }
    // The team's three requests, whichever member sends them.
    assert_eq!(g.chat(&keys[0]).await, StatusCode::OK);
    assert_eq!(g.chat(&keys[1]).await, StatusCode::OK);
    assert_eq!(g.chat(&keys[0]).await, StatusCode::OK);
    assert_eq!(g.chat(&keys[1]).await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(calls(&stats), 3);
    let budget: Value = admin_view(&g.client, &g.url, &format!("/v1/budgets/{team}")).await;
    assert_eq!(budget["calls_used"], 3);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plaintext_key_is_nowhere_in_the_database_files() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, _) = start_mock().await;
    let g = on_sqlite(&dir, &upstream).await;
    let id = g.create_agent(json!({"limits": per_minute(10)})).await;
    let id = id["agent_id"].as_str().unwrap();
    let mut secrets = Vec::new();
    for _ in 0..3 {
        secrets.push(g.create_key(id).await.1);
    }
    assert_eq!(g.chat(&secrets[0]).await, StatusCode::OK);
    g.stop().await;
    let files: Vec<Vec<u8>> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    let anywhere = |needle: &[u8]| {
        files
            .iter()
            .any(|f| f.windows(needle.len()).any(|w| w == needle))
    };
    for secret in &secrets {
        // What the database does hold: the key's hash (so the search looks
        // in the right place).
        assert!(anywhere(KeyHash::of(secret).to_hex().as_bytes()));
        assert!(!anywhere(secret.as_bytes()), "{secret} is in the database");
        assert!(!anywhere(&secret.as_bytes()["sk-ab-".len()..]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_names_an_api_agent_is_refused_at_start_and_at_reload() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite_in(&dir);
    let (upstream, _) = start_mock().await;
    let text = config_text(1_000_000, 1_000, "");
    let g = start_with_db(&text, &db, &upstream, None).await;
    let id = g.create_agent(json!({"limits": per_minute(10)})).await;
    let id = id["agent_id"].as_str().unwrap().to_owned();
    let claiming = format!(
        "{text}\n[[agents]]\napi_key = \"sk-claim\"\nagent_id = \"{id}\"\ntoken_budget = 5\ncalls_budget = 5\nwindow_secs = 60\n"
    );
    let claiming = config::parse(Path::new("claiming.toml"), &claiming).unwrap();
    // At reload: refused, the running configuration stays.
    let e = g.catalog.reload(&claiming).await.unwrap_err();
    assert!(
        e.to_string().contains(&format!(
            "agent {id} of the file is managed through the admin API"
        )),
        "{e}"
    );
    assert_eq!(g.chat("sk-claim").await, StatusCode::UNAUTHORIZED);
    assert_eq!(g.get(&format!("/v1/agents/{id}")).await["source"], "api");
    g.stop().await;
    // At start: refused.
    let refused = Gateway::with_database(
        claiming,
        std::sync::Arc::new(agent_budget::BudgetManager::new()),
        &upstream,
        std::time::Duration::from_secs(10),
        Limiter::Budget,
        None,
        Some(Database::open(&db).await.unwrap()),
    )
    .await;
    assert!(
        matches!(&refused, Err(GatewayError::Conflict(m)) if m.contains("managed through the admin API")),
        "{:?}",
        refused.err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_file_agents_keeping_usage_and_leaves_api_agents_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, stats) = start_mock().await;
    let g = start_with_db(
        &config_text(1_000_000, 3, ""),
        &sqlite_in(&dir),
        &upstream,
        None,
    )
    .await;
    let api = g.create_agent(json!({"limits": per_minute(10)})).await;
    let api = api["agent_id"].as_str().unwrap().to_owned();
    let (_, api_key) = g.create_key(&api).await;
    for _ in 0..3 {
        assert_eq!(g.chat(KEY_A).await, StatusCode::OK);
    }
    assert_eq!(g.chat(KEY_A).await, StatusCode::TOO_MANY_REQUESTS);
    // Five calls a minute, a new key for B, a new admin key, agent A's
    // label changed.
    let text = config_text(1_000_000, 5, "")
        .replace(KEY_B, "sk-agent-b-2")
        .replace(ADMIN_KEY, "admin-2")
        .replace("\"agent-a\"", "\"agent-a-2\"");
    let reloaded = g
        .catalog
        .reload(&config::parse(Path::new("new.toml"), &text).unwrap())
        .await
        .unwrap();
    assert_eq!(
        (reloaded.added, reloaded.removed, reloaded.changed),
        (0, 0, 2)
    );
    assert_eq!(reloaded.at_restart, ["metrics_label"]);
    // A's three calls are still used: two more fit.
    assert_eq!(g.chat(KEY_A).await, StatusCode::OK);
    assert_eq!(g.chat(KEY_A).await, StatusCode::OK);
    assert_eq!(g.chat(KEY_A).await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(g.chat(KEY_B).await, StatusCode::UNAUTHORIZED);
    assert_eq!(g.chat("sk-agent-b-2").await, StatusCode::OK);
    assert_eq!(g.chat(&api_key).await, StatusCode::OK);
    let (status, _) = g.call(Method::GET, "/v1/agents", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "the old admin key");
    let (status, agent) = g
        .call_as(
            Some("admin-2"),
            Method::GET,
            &format!("/v1/agents/{AGENT_A}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(agent["limits"][0]["limit"]["requests"], 5);
    assert_eq!(agent["limits"][0]["used"]["requests"], 5);
    // A file without B: B is gone, the API agent stays.
    let without_b = text[..text.find("[[agents]]\napi_key = \"sk-agent-b-2\"").unwrap()].to_owned();
    let reloaded = g
        .catalog
        .reload(&config::parse(Path::new("new.toml"), &without_b).unwrap())
        .await
        .unwrap();
    assert_eq!(reloaded.removed, 1);
    assert_eq!(g.chat("sk-agent-b-2").await, StatusCode::UNAUTHORIZED);
    assert_eq!(g.chat(&api_key).await, StatusCode::OK);
    assert_eq!(calls(&stats), 8);
    g.stop().await;
}

/// Every operation the OpenAPI document lists is routed to the admin API
/// and answers one of the statuses it documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_served_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, stats) = start_mock().await;
    let g = on_sqlite(&dir, &upstream).await;
    let (status, doc) = g.call_as(None, Method::GET, "/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK, "served without a key");
    let unknown = uuid::Uuid::new_v4().to_string();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let concrete = path
                .replace("{agent_id}", &unknown)
                .replace("{key_id}", &unknown);
            let method: Method = method.to_uppercase().parse().unwrap();
            let (status, body) = g.call(method.clone(), &concrete, None).await;
            let documented = operation["responses"].as_object().unwrap();
            assert!(
                documented.contains_key(status.as_str()),
                "{method} {concrete}: {status} is not documented ({body})"
            );
            if !status.is_success() {
                assert!(
                    body["error"]["code"].is_string(),
                    "{method} {concrete}: {body}"
                );
                assert_ne!(
                    body["error"]["code"], "invalid_api_key",
                    "the proxy's answer"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 11);
    assert_eq!(calls(&stats), 0, "nothing was forwarded");
    // What is not an admin route goes on to the layer: the admin key is
    // no client's key.
    let (status, body) = g.call(Method::GET, "/v1/agents/x/y/z", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
}

/// Without `--db`, the agents are the file's: listed, and the API's
/// changes refused with a message that says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_database_the_file_agents_are_listed_and_changes_refused() {
    let g = start(1_000, 10).await;
    let listed: Value = admin_view(&g.client, &g.url, "/v1/agents").await;
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["agent_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [AGENT_B, AGENT_A], "by id");
    assert_eq!(listed[1]["source"], "file");
    assert_eq!(listed[1]["limits"][0]["limit"]["requests"], 10);
    let r = g
        .client
        .post(format!("{}/v1/agents", g.url))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"limits": per_minute(5)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains("--db"),
        "{body}"
    );
}

#[tokio::test]
async fn a_reload_replaces_the_prices_that_spend_limits_charge() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, _) = start_mock().await;
    let priced = |usd_per_mtok: &str| {
        format!(
            r#"admin_key = "{ADMIN_KEY}"
tokenizer = "bytes"

[[models]]
name = "gpt-4o*"
input_usd_per_mtok = {usd_per_mtok}
output_usd_per_mtok = {usd_per_mtok}

[[agents]]
api_key = "{KEY_A}"
agent_id = "{AGENT_A}"
[[agents.limits]]
window = "1h"
spend_usd = 1.0
"#
        )
    };
    let g = start_with_db(&priced("10.0"), &sqlite_in(&dir), &upstream, None).await;
    let spent = || async {
        let (status, agent) = g
            .call(Method::GET, &format!("/v1/agents/{AGENT_A}"), None)
            .await;
        assert_eq!(status, StatusCode::OK);
        agent["limits"][0]["used"]["spend_usd"].as_f64().unwrap()
    };
    let ask = || async {
        let r = g
            .client
            .post(format!("{}/v1/chat/completions", g.url))
            .bearer_auth(KEY_A)
            .json(&json!({
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 100,
                "mock_prompt_tokens": 100,
                "mock_completion_tokens": 100,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.bytes().await.unwrap();
    };
    // 200 tokens at $10 a million: $0.002.
    ask().await;
    let mut waited = 0;
    while spent().await < 0.002 {
        waited += 1;
        assert!(waited < 200, "the settle at the first price");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(spent().await, 0.002);
    let reloaded = g
        .catalog
        .reload(&config::parse(Path::new("new.toml"), &priced("20.0")).unwrap())
        .await
        .unwrap();
    assert!(reloaded.at_restart.is_empty(), "{:?}", reloaded.at_restart);
    // The same 200 tokens at $20 a million: $0.004 more.
    ask().await;
    let mut waited = 0;
    while spent().await < 0.006 {
        waited += 1;
        assert!(waited < 200, "the settle at the new price");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(spent().await, 0.006);
}
