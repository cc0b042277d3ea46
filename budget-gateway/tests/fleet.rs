//! Gateways sharing their budgets through a Redis of the test's own: two
//! gateways in process, on loopback ports, in front of one mock upstream
//! (which counts what it served), driven by reqwest over real HTTP.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_budget_redis::{FakeClock, FleetConfig, FleetManager, LeasePolicy, Timeline};
use budget_gateway::config;
use budget_gateway::gateway::{Gateway, GatewayError};
use common::redis::RedisServer;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// One gateway of the fleet.
struct Node {
    url: String,
    fleet: Arc<FleetManager>,
    /// Stops the gateway (as SIGTERM does the binary).
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The gateway's `serve`, which returns once it has stopped.
    served: tokio::task::JoinHandle<Result<(), GatewayError>>,
}

/// A node's fleet settings: fast heartbeats; windows on a fake clock the
/// fleet shares, at the start of a window (so no window boundary falls in
/// the test, and the fleet's first record fences nothing); idleness on the
/// real clock (unused leases go back half a second after demand stops).
fn fleet_config(redis: &RedisServer, name: &str, windows: &FakeClock) -> FleetConfig {
    let mut config = FleetConfig::new(redis.url());
    config.node_id = name.to_owned();
    config.heartbeat = Duration::from_millis(10);
    config.recovery_grace = Duration::from_millis(200);
    config.timeout = Duration::from_millis(200);
    config.lease = LeasePolicy {
        fraction: 0.01,
        low_water: 0.5,
    };
    config.timeline = Timeline::Shared(Arc::new(windows.clone()));
    config
}

/// The same, with idleness on the fake clock too: a lease never goes back
/// for want of requests.
fn never_idle(redis: &RedisServer, name: &str, windows: &FakeClock) -> FleetConfig {
    let mut config = fleet_config(redis, name, windows);
    config.clock = Arc::new(windows.clone());
    config
}

/// A gateway on `fleet` with the configuration `text`, in front of
/// `upstream`.
async fn node(fleet: FleetConfig, text: &str, upstream: &str) -> Node {
    let config = config::parse(Path::new("fleet.toml"), text).unwrap();
    let fleet = Arc::new(FleetManager::connect(fleet).await.unwrap());
    let gateway = Gateway::fleet(config, fleet.clone(), upstream, Duration::from_secs(10))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(gateway.serve(listener, async {
        let _ = stopped.await;
    }));
    Node {
        url,
        fleet,
        stop: Some(stop),
        served,
    }
}

async fn chat(client: &reqwest::Client, node: &Node, key: &str) -> reqwest::Response {
    client
        .post(format!("{}/v1/chat/completions", node.url))
        .bearer_auth(key)
        .json(&json!({"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}))
        .send()
        .await
        .unwrap()
}

async fn admin(client: &reqwest::Client, node: &Node, agent: &str) -> Value {
    admin_view(client, &node.url, &format!("/v1/budgets/{agent}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_redis_admit_exactly_the_budget_between_them() {
    let redis = RedisServer::start();
    let windows = FakeClock::new(60_000 * 1_000);
    let (upstream, stats) = start_mock().await;
    // Agent A: 40 calls a minute, fleet-wide.
    let text = config_text(1_000_000, 40, "");
    let nodes = Arc::new([
        node(fleet_config(&redis, "gw-a", &windows), &text, &upstream).await,
        node(fleet_config(&redis, "gw-b", &windows), &text, &upstream).await,
    ]);
    // Four clients on each gateway, all at once, 12 requests each: 96,
    // more than twice the budget.
    let (admitted, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for n in 0..2 {
        for _ in 0..4 {
            let (nodes, admitted, refused) = (nodes.clone(), admitted.clone(), refused.clone());
            clients.push(tokio::spawn(async move {
                let client = reqwest::Client::new();
                for _ in 0..12 {
                    let r = chat(&client, &nodes[n], KEY_A).await;
                    match r.status() {
                        StatusCode::OK => {
                            r.bytes().await.unwrap();
                            admitted.fetch_add(1, Ordering::SeqCst);
                        }
                        StatusCode::TOO_MANY_REQUESTS => {
                            refused.fetch_add(1, Ordering::SeqCst);
                            assert_eq!(header(&r, "x-ratelimit-limit-requests"), "40");
                            assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
                            // The fake window's end: 60 s away.
                            assert_eq!(header(&r, "retry-after"), "60");
                        }
                        // Leases taken by concurrent requests first, four
                        // times over: asked to come back.
                        StatusCode::SERVICE_UNAVAILABLE => {}
                        other => panic!("unexpected {other}"),
                    }
                }
            }));
        }
    }
    for client in clients {
        client.await.unwrap();
    }
    assert!(admitted.load(Ordering::SeqCst) <= 40);
    assert!(
        refused.load(Ordering::SeqCst) >= 48,
        "{} refused",
        refused.load(Ordering::SeqCst)
    );
    // A lease granted while a client was being refused may sit on a gateway
    // whose clients stopped: the fleet crate's stranded budget, at most a
    // lease per gateway. One more request per gateway spends it.
    let client = reqwest::Client::new();
    for _ in 0..10 {
        if calls(&stats) == 40 {
            break;
        }
        for node in nodes.iter() {
            if chat(&client, node, KEY_A).await.status() == StatusCode::OK {
                admitted.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    assert_eq!(admitted.load(Ordering::SeqCst), 40);
    assert_eq!(calls(&stats), 40, "the upstream served exactly the budget");
    // Both gateways show the fleet's usage: all 40 calls, and (once idle
    // gateways have given their unused token leases back) exactly the
    // tokens the upstream reported.
    let served = tokens(&stats);
    for node in nodes.iter() {
        let mut info = admin(&client, node, AGENT_A).await;
        for _ in 0..300 {
            if info["tokens_used"] == served {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            info = admin(&client, node, AGENT_A).await;
        }
        assert_eq!(info["calls_used"], 40, "{info}");
        assert_eq!(info["calls_remaining"], 0, "{info}");
        assert_eq!(info["is_exhausted"], true, "{info}");
        assert_eq!(info["tokens_used"], served, "{info}");
        assert_eq!(info["token_limit"], 1_000_000, "{info}");
        assert_eq!(info["window_remaining_secs"], 60, "{info}");
    }
    // Agent B, untouched, is listed with A on both.
    let all: Vec<Value> = admin_view(&client, &nodes[1].url, "/v1/budgets").await;
    assert_eq!(all.len(), 2);
    assert!(all
        .iter()
        .any(|i| i["agent_id"] == AGENT_B && i["calls_used"] == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_set_by_one_gateway_reaches_the_other_and_a_stop_gives_leases_back() {
    let redis = RedisServer::start();
    let windows = FakeClock::new(60_000 * 1_000);
    let (upstream, stats) = start_mock().await;
    let mut first = node(
        never_idle(&redis, "gw-a", &windows),
        &config_text(1_000_000, 1_000, ""),
        &upstream,
    )
    .await;
    let client = reqwest::Client::new();
    assert_eq!(chat(&client, &first, KEY_A).await.status(), StatusCode::OK);
    // The lease is a hundredth of the budget: 10 calls taken, 1 used.
    let info = admin(&client, &first, AGENT_A).await;
    assert_eq!(info["calls_used"], 10, "{info}");
    // A second gateway, started with a smaller budget for A: the fleet's
    // budget is now the smaller one, on both gateways.
    let second = node(
        never_idle(&redis, "gw-b", &windows),
        &config_text(1_000_000, 500, ""),
        &upstream,
    )
    .await;
    for node in [&first, &second] {
        let fleet = node.fleet.clone();
        eventually("the new budget reaches both gateways", move || {
            fleet
                .budget(&AGENT_A.parse().unwrap())
                .map(|b| b.calls_budget)
                == Some(500)
        })
        .await;
    }
    assert_eq!(admin(&client, &second, AGENT_A).await["calls_limit"], 500);
    // The first gateway stops (idleness never gives its lease back here):
    // the 9 calls it holds go back to the fleet.
    assert_eq!(admin(&client, &second, AGENT_A).await["calls_used"], 10);
    first.stop.take().unwrap().send(()).unwrap();
    first.served.await.unwrap().unwrap();
    assert!(
        first
            .fleet
            .acquire(&AGENT_A.parse().unwrap(), 1, 1)
            .await
            .is_err(),
        "shut down"
    );
    let info = admin(&client, &second, AGENT_A).await;
    assert_eq!(info["calls_used"], 1, "{info}");
    assert_eq!(calls(&stats), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_gone_a_gateway_serves_its_lease_then_answers_503() {
    let mut redis = RedisServer::start();
    let windows = FakeClock::new(60_000 * 1_000);
    let (upstream, stats) = start_mock().await;
    // Leases of 10 calls.
    let gateway = node(
        never_idle(&redis, "gw-a", &windows),
        &config_text(1_000_000, 1_000, ""),
        &upstream,
    )
    .await;
    let client = reqwest::Client::new();
    assert_eq!(
        chat(&client, &gateway, KEY_A).await.status(),
        StatusCode::OK
    );
    redis.kill();
    let mut served_from_lease = 0;
    let unavailable = loop {
        assert!(served_from_lease <= 20, "never refused");
        let r = chat(&client, &gateway, KEY_A).await;
        if r.status() != StatusCode::OK {
            break r;
        }
        served_from_lease += 1;
    };
    assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The lease was a hundredth of the budget, 10 calls: 9 were left.
    assert_eq!(served_from_lease, 9, "the rest of its lease, and no more");
    assert_eq!(header(&unavailable, "retry-after"), "1");
    let error: Value = unavailable.json().await.unwrap();
    assert_eq!(error["error"]["code"], "budget_unavailable");
    assert_eq!(calls(&stats), 1 + served_from_lease);
    // The admin view reads Redis: unavailable too.
    let r = client
        .get(format!("{}/v1/budgets/{AGENT_A}", gateway.url))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_gateway_refuses_nested_budgets() {
    let redis = RedisServer::start();
    let windows = FakeClock::new(60_000 * 1_000);
    let text = config_text(1_000, 10, "").replace(
        "metrics_label = \"agent-a\"\n",
        &format!("metrics_label = \"agent-a\"\nparent = \"{AGENT_B}\"\n"),
    );
    let config = config::parse(Path::new("fleet.toml"), &text).unwrap();
    assert!(config.agents[0].parent.is_some());
    let fleet = Arc::new(
        FleetManager::connect(fleet_config(&redis, "gw", &windows))
            .await
            .unwrap(),
    );
    let refused = Gateway::fleet(
        config,
        fleet.clone(),
        "http://127.0.0.1:9",
        Duration::from_secs(1),
    )
    .await
    .err()
    .expect("refused");
    assert!(matches!(refused, GatewayError::Unsupported(_)));
    let message = refused.to_string();
    assert!(
        message.contains(&format!("agent {AGENT_A} has a parent")),
        "{message}"
    );
    assert!(message.contains("cannot nest"), "{message}");
    assert_eq!(
        fleet.budget(&AGENT_A.parse().unwrap()),
        None,
        "nothing was set"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_leases_large_enough_for_the_fleet_cap_to_bind_the_fleet_admits_exactly_the_budget() {
    let redis = RedisServer::start();
    let windows = FakeClock::new(60_000 * 1_000);
    let (upstream, stats) = start_mock().await;
    // Leases of 30% of a 40-call budget (12 calls): two gateways' leases
    // and a refill each ask for more than the fleet has, so the last
    // grants are cut to what is left and the fleet-wide cap refuses.
    let lease = |name: &str| {
        let mut config = never_idle(&redis, name, &windows);
        config.lease = LeasePolicy {
            fraction: 0.3,
            low_water: 0.5,
        };
        config
    };
    let text = config_text(1_000_000, 40, "");
    let nodes = Arc::new([
        node(lease("gw-a"), &text, &upstream).await,
        node(lease("gw-b"), &text, &upstream).await,
    ]);
    let per_node = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let mut clients = Vec::new();
    for n in 0..2 {
        for _ in 0..4 {
            let (nodes, per_node) = (nodes.clone(), per_node.clone());
            clients.push(tokio::spawn(async move {
                let client = reqwest::Client::new();
                for _ in 0..20 {
                    let r = chat(&client, &nodes[n], KEY_A).await;
                    match r.status() {
                        StatusCode::OK => {
                            r.bytes().await.unwrap();
                            per_node[n].fetch_add(1, Ordering::SeqCst);
                        }
                        StatusCode::TOO_MANY_REQUESTS => {
                            assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
                        }
                        StatusCode::SERVICE_UNAVAILABLE => {}
                        other => panic!("unexpected {other}"),
                    }
                }
            }));
        }
    }
    for client in clients {
        client.await.unwrap();
    }
    // A refill granted after a gateway's clients stopped sits in its lease:
    // more requests on both spend it, until both refuse.
    let client = reqwest::Client::new();
    for _ in 0..40 {
        let mut any = false;
        for (n, node) in nodes.iter().enumerate() {
            let r = chat(&client, node, KEY_A).await;
            if r.status() == StatusCode::OK {
                per_node[n].fetch_add(1, Ordering::SeqCst);
                any = true;
            }
        }
        if !any && calls(&stats) >= 40 {
            break;
        }
    }
    let (a, b) = (
        per_node[0].load(Ordering::SeqCst),
        per_node[1].load(Ordering::SeqCst),
    );
    assert_eq!(a + b, 40, "admitted {a} + {b}");
    assert_eq!(calls(&stats), 40, "the upstream served exactly the budget");
    // Each gateway took more than one lease's worth or the other did: the
    // leases were refilled, up to the fleet's cap.
    assert!(a > 0 && b > 0, "{a} and {b}");
    assert!(a.max(b) > 12, "no refill was needed: {a} and {b}");
    for node in nodes.iter() {
        assert_eq!(
            chat(&client, node, KEY_A).await.status(),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
}
