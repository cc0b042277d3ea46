//! The fleet when things break: Redis restarted without its data, Redis
//! gone for a while (both fail modes), a node crashing with a lease.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_budget_redis::{Denied, FleetClock, FleetManager};
use common::*;

/// Admits `per_request`-token requests on `node` until refused or `limit`
/// requests; returns the tokens admitted and how it stopped.
async fn drain(
    node: &FleetManager,
    agent: &uuid::Uuid,
    per_request: u64,
    limit: usize,
    admitted: &AtomicU64,
) -> (u64, Option<Denied>) {
    let mut mine = 0;
    for _ in 0..limit {
        match node.acquire(agent, per_request, 1).await {
            Ok(reservation) => {
                admitted.fetch_add(per_request, Ordering::SeqCst);
                mine += per_request;
                reservation.settle(per_request);
            }
            Err(denied) => return (mine, Some(denied)),
        }
    }
    (mine, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_window_re_establishes_every_take_and_hands_nothing_out_twice() {
    let mut server = RedisServer::start();
    let clock = window_start_clock();
    // No background refills (a low-water mark of zero: a node leases only
    // when a request finds its lease short, before it is answered), so
    // what Redis records once the requests below are answered is what the
    // nodes hold when it restarts. With them, a refill could land between
    // the two and be re-established on top of `before`.
    let mut nodes = Vec::new();
    for i in 0..3 {
        let mut config = config(&server, &format!("node-{i}"), Some(&clock));
        config.lease.low_water = 0.0;
        nodes.push(Arc::new(node(config).await));
    }
    let agent = agent();
    let (tokens, per_request) = (3_000u64, 10u64);
    nodes[0]
        .set_budget(budget(agent, tokens, 1_000_000, 60))
        .await
        .expect("set");
    known_everywhere(&nodes, agent).await;
    // Into the window, so the record Redis makes after its restart is
    // younger than the window, which it must fence.
    clock.advance(Duration::from_secs(1));
    let key = window_key(&agent, 60, clock.now_ms());
    let admitted = AtomicU64::new(0);
    for node in &nodes {
        let (got, stop) = drain(node, &agent, per_request, 50, &admitted).await;
        assert_eq!((got, stop), (500, None));
    }
    let before = taken(&mut server.connection(), &key);
    assert!(before.tokens >= 1_500, "leases cover what was admitted");

    server.restart();
    // Every node notices (its heartbeat sees a new epoch), puts the budget
    // back and states what it took.
    let mut conn = server.connection();
    let held = |nodes: &[Arc<FleetManager>]| -> u64 {
        nodes.iter().map(|n| local(n, &agent).0.tokens).sum()
    };
    eventually(
        Duration::from_secs(10),
        "every take is re-established",
        || {
            taken(&mut conn, &key).tokens == held(&nodes)
                && nodes.iter().all(|n| {
                    taken_by(&mut conn, &key, n.node_id()).tokens == local(n, &agent).0.tokens
                })
        },
    )
    .await;
    assert_eq!(held(&nodes), before.tokens, "nothing was lost or made up");
    // While the fence stands, no new lease: a request beyond a node's lease
    // waits out the grace (real time here: the fleet's clock stands still)
    // and is refused as unavailable, not handed a second copy.
    let left = local(&nodes[0], &agent).2.tokens;
    match nodes[0].acquire(&agent, left + per_request, 1).await {
        Err(Denied::Unavailable { .. }) => {}
        other => panic!("expected the fence, got {other:?}"),
    }
    clock.advance(Duration::from_millis(200));

    // Past the fence: the nodes race for the rest, watched.
    let admitted = Arc::new(admitted);
    let racing = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (admitted, racing, key) = (admitted.clone(), racing.clone(), key.clone());
        let mut conn = server.connection();
        tokio::task::spawn_blocking(move || {
            let mut looks = 0u64;
            while racing.load(Ordering::SeqCst) && looks < 1_000_000 {
                let seen = admitted.load(Ordering::SeqCst);
                let fleet = taken(&mut conn, &key);
                assert!(seen <= tokens && fleet.tokens <= tokens, "{seen} {fleet:?}");
                assert!(seen <= fleet.tokens, "admitted {seen} > taken {fleet:?}");
                looks += 1;
            }
        })
    };
    let mut workers = Vec::new();
    for node in &nodes {
        let (node, admitted) = (node.clone(), admitted.clone());
        workers.push(tokio::spawn(async move {
            let (_, stop) = drain(&node, &agent, per_request, 1_000, &admitted).await;
            assert!(matches!(stop, Some(Denied::Refused(_))), "{stop:?}");
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    racing.store(false, Ordering::SeqCst);
    watcher.await.expect("never more than the budget");
    assert_eq!(
        admitted.load(Ordering::SeqCst),
        tokens,
        "the window's budget, once"
    );
}

/// One node on a fake clock, refilling only on demand, with its lease of
/// 100 tokens taken and 10 of it used.
async fn node_with_a_lease(
    server: &RedisServer,
    fail_open_allowance: Option<f64>,
) -> (FleetManager, uuid::Uuid, String) {
    let clock = window_start_clock();
    let mut config = config(server, "a", Some(&clock));
    config.lease.low_water = 0.0;
    if let Some(allowance) = fail_open_allowance {
        config = fail_open(config, allowance);
    }
    let node = node(config).await;
    let agent = agent();
    node.set_budget(budget(agent, 10_000, 100_000, 60))
        .await
        .expect("set");
    node.acquire(&agent, 10, 1).await.expect("fits").settle(10);
    assert_eq!(local(&node, &agent).2.tokens, 90);
    let key = window_key(&agent, 60, clock.now_ms());
    (node, agent, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_gone_fail_closed_serves_the_lease_then_refuses_and_recovers_by_itself() {
    let mut server = RedisServer::start();
    let (node, agent, key) = node_with_a_lease(&server, None).await;
    server.kill();
    let admitted = AtomicU64::new(0);
    let (got, stop) = drain(&node, &agent, 10, 100, &admitted).await;
    assert_eq!(got, 90, "exactly the lease it held");
    assert!(matches!(stop, Some(Denied::Unavailable { .. })), "{stop:?}");
    assert!(!node.is_connected());

    server.restart();
    let mut conn = server.connection();
    eventually(
        Duration::from_secs(10),
        "the node reconnects and re-establishes its take",
        || node.is_connected() && taken(&mut conn, &key).tokens == 100,
    )
    .await;
    node.acquire(&agent, 10, 1)
        .await
        .expect("served again")
        .settle(10);
    assert_eq!(taken(&mut conn, &key).tokens, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_gone_fail_open_admits_up_to_the_allowance_and_charges_it_afterwards() {
    let mut server = RedisServer::start();
    // 5% of 10,000 tokens: 500 on this node's own authority.
    let (node, agent, key) = node_with_a_lease(&server, Some(0.05)).await;
    server.kill();
    let admitted = AtomicU64::new(0);
    let (got, stop) = drain(&node, &agent, 10, 1_000, &admitted).await;
    assert_eq!(got, 90 + 500, "the lease, then the allowance");
    assert!(matches!(stop, Some(Denied::Unavailable { .. })), "{stop:?}");
    assert!(node.stats().fail_open_grants > 0);

    server.restart();
    let mut conn = server.connection();
    eventually(
        Duration::from_secs(10),
        "the allowance is charged to the fleet",
        || taken_by(&mut conn, &key, node.node_id()).tokens == 600,
    )
    .await;
    assert_eq!(taken(&mut conn, &key).tokens, 600);
    node.acquire(&agent, 10, 1)
        .await
        .expect("served from Redis again")
        .settle(10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_nodes_lease_is_lost_for_its_window_and_never_counted_twice() {
    let server = RedisServer::start();
    let clock = window_start_clock();
    let mut crashing = config(&server, "crashing", Some(&clock));
    crashing.lease.low_water = 0.0;
    let crashing = node(crashing).await;
    let survivor = node(config(&server, "survivor", Some(&clock))).await;
    let agent = agent();
    let tokens = 2_000u64;
    crashing
        .set_budget(budget(agent, tokens, 100_000, 60))
        .await
        .expect("set");
    eventually(
        Duration::from_secs(5),
        "the survivor knows the budget",
        || survivor.budget(&agent).is_some(),
    )
    .await;
    let key = window_key(&agent, 60, clock.now_ms());
    crashing
        .acquire(&agent, 5, 1)
        .await
        .expect("fits")
        .settle(5);
    let lease = taken_by(&mut server.connection(), &key, crashing.node_id()).tokens;
    assert_eq!(lease, tokens / 100);
    drop(crashing); // no shutdown: its tasks die with it, its lease is not given back

    let admitted = AtomicU64::new(0);
    let (got, stop) = drain(&survivor, &agent, 5, 1_000, &admitted).await;
    assert!(matches!(stop, Some(Denied::Refused(_))), "{stop:?}");
    assert_eq!(got, tokens - lease, "all but the crashed node's lease");
    assert_eq!(taken(&mut server.connection(), &key).tokens, tokens);

    // The next window is whole again.
    clock.advance(Duration::from_secs(60));
    let (got, _) = drain(&survivor, &agent, 5, 1_000, &admitted).await;
    assert_eq!(got, tokens);
}

#[tokio::test]
async fn a_node_cannot_start_without_redis_and_says_why() {
    let mut server = RedisServer::start();
    let config = config(&server, "a", None);
    server.kill();
    let error = FleetManager::connect(config)
        .await
        .expect_err("no Redis, no node");
    assert!(!error.to_string().is_empty());
    // The same config connects once Redis is there.
    server.restart();
    let node = node(common::config(&server, "a", None)).await;
    assert!(node.is_connected());
}

/// A heartbeat that comes while a request holds the agent's book (here: a
/// request waiting on a slow link for a lease larger than one) must not
/// lose the touch of a request that came meanwhile: the agent stays active,
/// and its lease stays with it. (Commit 0ca90d9 fixed a heartbeat that
/// consumed the touch and then gave an active node's lease back as idle.)
/// Idleness runs on a fake clock, so only the order of events decides: the
/// second request comes at fake time 300 ms, while the first holds the book
/// for about 100 ms more of real time, across heartbeats every 10 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_touch_during_a_busy_heartbeat_keeps_the_agent_active() {
    use common::faulty::{Fault, FaultyLink};
    let server = RedisServer::start();
    let link = FaultyLink::start(&server.url()).await;
    let clock = window_start_clock();
    let mut config = config(&server, "a", Some(&clock));
    config.url = link.url();
    let node = Arc::new(node(config).await);
    let agent = agent();
    // Leases of 100 tokens; idle after 500 ms of the fake clock.
    node.set_budget(budget(agent, 10_000, 100_000, 60))
        .await
        .expect("set");
    node.acquire(&agent, 10, 1).await.expect("fits").settle(10);
    tokio::time::sleep(Duration::from_millis(50)).await;

    // More than a lease: the request takes what it lacks from Redis,
    // holding the book through a slow round trip.
    link.set(Fault::Delay(Duration::from_millis(60)));
    let holding = {
        let node = node.clone();
        tokio::spawn(async move { node.acquire(&agent, 150, 1).await.map(|r| r.settle(150)) })
    };
    tokio::time::sleep(Duration::from_millis(15)).await;
    clock.advance(Duration::from_millis(300));
    node.acquire(&agent, 5, 1)
        .await
        .expect("served from the lease")
        .settle(5);
    holding.await.expect("task").expect("fits");
    link.set(Fault::Pass);
    eventually(
        Duration::from_secs(5),
        "the active agent's lease is topped up",
        || local(&node, &agent).2.tokens > 0,
    )
    .await;
    // Heartbeats see the second request's touch once the book is free.
    tokio::time::sleep(Duration::from_millis(100)).await;

    // 300 ms after the last request: still active, the lease stays.
    clock.advance(Duration::from_millis(300));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        local(&node, &agent).2.tokens > 0,
        "an active agent's lease was given back as idle"
    );
    // Once it really is idle, the lease goes back. (A touch is seen at the
    // first heartbeat that finds the book free: under load that may be as
    // late as fake time 600, so idleness is certain only 500 ms past that.)
    clock.advance(Duration::from_millis(600));
    eventually(
        Duration::from_secs(5),
        "an idle agent's lease goes back",
        || local(&node, &agent).2.tokens == 0,
    )
    .await;
}
