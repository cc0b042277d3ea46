//! Two gateways sharing one PostgreSQL database (a test's own) and one
//! Redis (a test's own): what the admin API changes on one is enforced on
//! the other within a second.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_budget_redis::{FakeClock, FleetConfig, FleetManager, Timeline};
use budget_gateway::config;
use budget_gateway::db::Database;
use budget_gateway::gateway::Gateway;
use common::admin::Served;
use common::postgres::TestDb;
use common::redis::RedisServer;
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// A gateway of the fleet, with the fleet's defaults (a heartbeat every
/// 100 ms, unused leases back after 500 ms) but windows on `windows`, a
/// clock the fleet shares that stands still (no window ends during the
/// test), and the shared database.
async fn node(
    redis: &RedisServer,
    windows: &FakeClock,
    name: &str,
    text: &str,
    db: &str,
    upstream: &str,
) -> Served {
    let mut fleet = FleetConfig::new(redis.url());
    fleet.node_id = name.to_owned();
    fleet.timeline = Timeline::Shared(Arc::new(windows.clone()));
    let fleet = Arc::new(FleetManager::connect(fleet).await.unwrap());
    let config = config::parse(Path::new("fleet.toml"), text).unwrap();
    let gateway = Gateway::fleet_with_database(
        config,
        fleet,
        upstream,
        Duration::from_secs(10),
        Some(Database::open(db).await.unwrap()),
    )
    .await
    .unwrap();
    Served::serve(gateway).await
}

/// Checks `done` every 10 ms until it holds, for at most a second: how
/// long it took. (The gateways poll the database every 250 ms.)
async fn within_a_second<F, Fut>(what: &str, mut done: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        if done().await {
            let took = start.elapsed();
            eprintln!("{what}: {} ms", took.as_millis());
            return took;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not within a second: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_on_one_postgres_and_one_redis_see_each_others_changes_within_a_second() {
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let (upstream, stats) = start_mock().await;
    let text = config_text(1_000_000, 1_000, "");
    let windows = FakeClock::new(60_000 * 1_000);
    let a = node(&redis, &windows, "gw-a", &text, &db.url(), &upstream).await;
    let b = node(&redis, &windows, "gw-b", &text, &db.url(), &upstream).await;

    // What a fleet cannot share is refused.
    let (status, body) = a
        .call(
            Method::POST,
            "/v1/agents",
            Some(&json!({"limits": [{"refill": "1m", "requests": 5}]})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["param"], "limits[0].refill");

    // Created on A, with a key: B admits the key within a second.
    let agent = a
        .create_agent(json!({"limits": [{"window": "1m", "requests": 1000, "tokens": 1_000_000}]}))
        .await;
    let id = agent["agent_id"].as_str().unwrap().to_owned();
    let (status, body) = a
        .call(
            Method::POST,
            "/v1/agents",
            Some(&json!({"limits": [{"window": "1m", "requests": 5}], "parent": id})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["param"], "parent");
    let (key_id, key) = a.create_key(&id).await;
    assert_eq!(a.chat(&key).await, StatusCode::OK, "at once on A");
    within_a_second("a key made on A admitted by B", || async {
        b.chat(&key).await == StatusCode::OK
    })
    .await;
    // The budget is the fleet's: what both admitted, counted in Redis
    // (once the unused leases have gone back, half a second after the
    // last request).
    let admitted = calls(&stats);
    let mut fleet_used = Value::Null;
    for _ in 0..300 {
        let budget: Value = admin_view(&b.client, &b.url, &format!("/v1/budgets/{id}")).await;
        fleet_used = budget["calls_used"].clone();
        if fleet_used == admitted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fleet_used, admitted);

    // Changed on B: A shows and enforces the new limit within a second.
    let (status, body) = b
        .call(
            Method::PUT,
            &format!("/v1/agents/{id}"),
            Some(&json!({"limits": [{"window": "1m", "requests": 2000, "tokens": 1_000_000}]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    within_a_second("a change made on B shown by A", || async {
        a.get(&format!("/v1/agents/{id}")).await["limits"][0]["limit"]["requests"] == 2000
    })
    .await;

    // A second key made on B, then the first revoked on A: refused by A's
    // next request, and by B within a second; the second key still works.
    let (_, second) = b.create_key(&id).await;
    let (status, _) = a
        .call(
            Method::DELETE,
            &format!("/v1/agents/{id}/keys/{key_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let revoked = Instant::now();
    assert_eq!(
        a.chat(&key).await,
        StatusCode::UNAUTHORIZED,
        "A's next request"
    );
    within_a_second("a key revoked on A refused by B", || async {
        b.chat(&key).await == StatusCode::UNAUTHORIZED
    })
    .await;
    eprintln!(
        "revoked on A, refused by B {} ms after A answered the revocation",
        revoked.elapsed().as_millis()
    );
    within_a_second("a key made on B admitted by A", || async {
        a.chat(&second).await == StatusCode::OK
    })
    .await;

    // Deleted on B: A refuses its keys and forgets it within a second.
    let (status, _) = b
        .call(Method::DELETE, &format!("/v1/agents/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(b.chat(&second).await, StatusCode::UNAUTHORIZED);
    within_a_second("an agent deleted on B gone from A", || async {
        a.chat(&second).await == StatusCode::UNAUTHORIZED
            && a.call(Method::GET, &format!("/v1/agents/{id}"), None)
                .await
                .0
                == StatusCode::NOT_FOUND
    })
    .await;
    a.stop().await;
    b.stop().await;
}
