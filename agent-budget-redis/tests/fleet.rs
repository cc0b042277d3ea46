//! Nodes of one fleet against a real Redis: admissions, leases, windows.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_budget::{RefusalReason, Settlement};
use agent_budget_redis::{Amount, Denied, FakeClock, FleetClock, FleetManager};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_racing_admit_exactly_the_budget_and_never_more_at_any_moment() {
    let server = RedisServer::start();
    let clock = window_start_clock();
    let agent = agent();
    let (tokens, per_request) = (5_000u64, 5u64);
    let nodes = nodes(&server, Some(&clock), 3).await;
    nodes[0]
        .set_budget(budget(agent, tokens, 1_000_000, 60))
        .await
        .expect("set the budget");
    known_everywhere(&nodes, agent).await;

    let admitted = Arc::new(AtomicU64::new(0));
    let racing = Arc::new(AtomicBool::new(true));
    let key = window_key(&agent, 60, clock.now_ms());
    // The watcher: at every moment, what the nodes admitted is at most what
    // Redis says the fleet took, which is at most the budget.
    let watcher = {
        let (admitted, racing) = (admitted.clone(), racing.clone());
        let mut conn = server.connection();
        let key = key.clone();
        tokio::task::spawn_blocking(move || {
            let mut looks = 0u64;
            while racing.load(Ordering::SeqCst) && looks < 1_000_000 {
                let seen = admitted.load(Ordering::SeqCst);
                let fleet = taken(&mut conn, &key);
                assert!(seen <= tokens, "admitted {seen} > budget {tokens}");
                assert!(
                    fleet.tokens <= tokens,
                    "Redis has {} taken > {tokens}",
                    fleet.tokens
                );
                assert!(
                    seen <= fleet.tokens,
                    "admitted {seen} > taken {}",
                    fleet.tokens
                );
                looks += 1;
            }
            looks
        })
    };
    let mut workers = Vec::new();
    for node in &nodes {
        for _ in 0..2 {
            let (node, admitted) = (node.clone(), admitted.clone());
            workers.push(tokio::spawn(async move {
                let mut mine = 0u64;
                // Bounded: the budget admits 1,000 requests in all.
                for _ in 0..2_000 {
                    match node.acquire(&agent, per_request, 1).await {
                        Ok(reservation) => {
                            admitted.fetch_add(per_request, Ordering::SeqCst);
                            mine += per_request;
                            assert!(matches!(
                                reservation.settle(per_request),
                                Settlement::Applied { .. }
                            ));
                        }
                        Err(Denied::Refused(refused)) => {
                            assert!(
                                matches!(refused.reason, RefusalReason::Exceeded { .. }),
                                "{refused}"
                            );
                            return mine;
                        }
                        Err(other) => panic!("unexpected: {other}"),
                    }
                }
                panic!("a worker was never refused");
            }));
        }
    }
    let mut per_worker = Vec::new();
    for worker in workers {
        per_worker.push(worker.await.expect("worker"));
    }
    racing.store(false, Ordering::SeqCst);
    let looks = watcher.await.expect("the watcher saw no overrun");
    assert!(looks > 0, "the watcher looked");
    assert_eq!(
        admitted.load(Ordering::SeqCst),
        tokens,
        "exactly the budget, fleet-wide"
    );
    assert_eq!(per_worker.iter().sum::<u64>(), tokens);
    let mut conn = server.connection();
    assert_eq!(taken(&mut conn, &key).tokens, tokens);
    // Every node took part, and each node's lease is spent.
    for node in &nodes {
        let info = node.local().full_info(&agent).expect("known");
        assert!(info.tokens_used > 0, "{} admitted nothing", node.node_id());
        assert_eq!(info.tokens_remaining, 0);
    }
    // Far fewer Redis calls than requests: leases of 1% (50 tokens, ten
    // requests), refilled at half.
    let requests = tokens / per_request;
    let lease_calls: u64 = nodes.iter().map(|n| n.stats().leases).sum();
    assert!(
        lease_calls * 5 <= requests,
        "{lease_calls} leases for {requests} requests"
    );
}

/// A node whose lease is refilled only when a request finds it short (no
/// background refill), so each test sees exactly which leases it caused.
async fn on_demand_node(server: &RedisServer, name: &str, clock: &FakeClock) -> FleetManager {
    let mut config = config(server, name, Some(clock));
    config.lease.low_water = 0.0;
    node(config).await
}

/// One node refilling on demand, on a server of its own, and an agent
/// with a budget of 10,000 tokens and 1,000 calls per 60 s window.
struct Solo {
    /// Kept for its drop: the server lives as long as the test's `Solo`.
    _server: RedisServer,
    clock: FakeClock,
    node: FleetManager,
    agent: uuid::Uuid,
    /// The key of the agent's record for the current window.
    key: String,
    conn: redis::Connection,
}

async fn solo() -> Solo {
    let server = RedisServer::start();
    let clock = window_start_clock();
    let node = on_demand_node(&server, "a", &clock).await;
    let agent = agent();
    node.set_budget(budget(agent, 10_000, 1_000, 60))
        .await
        .expect("set");
    let key = window_key(&agent, 60, clock.now_ms());
    let conn = server.connection();
    Solo {
        _server: server,
        clock,
        node,
        agent,
        key,
        conn,
    }
}

#[tokio::test]
async fn a_request_larger_than_a_lease_takes_exactly_what_it_needs_and_a_small_one_a_lease() {
    let (tokens, calls) = (10_000, 1_000);
    let solo = solo().await;
    let (node, agent, key, mut conn) = (solo.node, solo.agent, solo.key, solo.conn);
    let lease = Amount::new(tokens / 100, calls / 100);

    let big = node
        .acquire(&agent, 3 * lease.tokens + 50, 1)
        .await
        .expect("fits the fleet");
    // Tokens: exactly what it lacked; calls (one is within a lease): a lease.
    assert_eq!(
        taken(&mut conn, &key),
        Amount::new(3 * lease.tokens + 50, lease.calls)
    );
    assert_eq!(local(&node, &agent).2, Amount::new(0, lease.calls - 1));
    // The node's view without a call: what the fleet had taken at its last
    // call, and what it could still admit.
    let info = node.full_info(&agent).expect("known");
    assert_eq!(
        (
            info.tokens_used,
            info.tokens_remaining,
            info.calls_remaining
        ),
        (
            3 * lease.tokens + 50,
            tokens - 3 * lease.tokens - 50,
            calls - 1
        )
    );
    assert_eq!(info.window_remaining_secs, 60);
    let small = node.acquire(&agent, 30, 1).await.expect("fits");
    // Tokens: a lease; calls: topped back up to a lease.
    assert_eq!(
        taken(&mut conn, &key),
        Amount::new(4 * lease.tokens + 50, lease.calls + 1)
    );
    assert_eq!(
        local(&node, &agent).2,
        Amount::new(lease.tokens - 30, lease.calls - 1)
    );
    // Larger than the whole budget: never, and no lease is taken for it.
    match node.acquire(&agent, tokens + 1, 1).await {
        Err(Denied::Refused(refused)) => {
            assert_eq!(refused.retry_after, None, "{refused}");
            assert!(
                matches!(refused.reason, RefusalReason::Exceeded { requested, limit, .. } if requested == tokens + 1 && limit == tokens)
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(taken(&mut conn, &key).tokens, 4 * lease.tokens + 50);
    drop((big, small));
}

#[tokio::test]
async fn settles_refund_into_the_lease_and_overuse_is_charged_to_the_fleet() {
    let solo = solo().await;
    let (node, agent, key, mut conn) = (solo.node, solo.agent, solo.key, solo.conn);

    let reservation = node.acquire(&agent, 60, 1).await.expect("fits");
    assert_eq!(taken(&mut conn, &key).tokens, 100, "one lease");
    assert_eq!(
        reservation.settle(20),
        Settlement::Applied {
            refunded_tokens: 40,
            charged_tokens: 0,
            refunded_calls: 0
        }
    );
    assert_eq!(
        local(&node, &agent).2.tokens,
        80,
        "the refund is the node's lease again"
    );
    assert_eq!(
        taken(&mut conn, &key).tokens,
        100,
        "and the fleet did not move"
    );

    // Overuse: 150 used on a reservation of 50, past the node's lease.
    let reservation = node.acquire(&agent, 50, 1).await.expect("fits the lease");
    reservation.settle(150);
    let (granted, used, _) = local(&node, &agent);
    assert_eq!(used.tokens, 170);
    assert!(granted.tokens < used.tokens, "in debt locally");
    // The upkeep charges the debt: the node's record covers what it used.
    let node_name = node.node_id().to_owned();
    eventually(Duration::from_secs(5), "the overuse is charged", || {
        let (granted, used, _) = local(&node, &agent);
        let mine = taken_by(&mut conn, &key, &node_name);
        granted.tokens >= used.tokens && mine.tokens == granted.tokens
    })
    .await;
    assert_eq!(taken(&mut conn, &key).tokens, 170);
}

#[tokio::test]
async fn a_window_end_gives_the_unused_lease_back_to_its_window_and_starts_afresh() {
    let solo = solo().await;
    let (clock, node, agent, first, mut conn) =
        (solo.clock, solo.node, solo.agent, solo.key, solo.conn);

    let kept = node.acquire(&agent, 30, 1).await.expect("fits");
    let overused = node.acquire(&agent, 10, 1).await.expect("fits");
    node.acquire(&agent, 5, 1).await.expect("fits").settle(5);
    assert_eq!(taken(&mut conn, &first), Amount::new(100, 10));

    clock.advance(Duration::from_secs(60));
    let second = window_key(&agent, 60, clock.now_ms());
    assert_ne!(first, second);
    // Within a heartbeat or two: the old window's record shows what was
    // consumed, the node's cell is fresh.
    eventually(
        Duration::from_secs(5),
        "the lease goes back at the window's end",
        || taken(&mut conn, &first) == Amount::new(45, 3),
    )
    .await;
    assert_eq!(local(&node, &agent).1, Amount::ZERO, "a fresh window");
    // A refund never crosses windows; overuse is carried into the new one
    // and charged to the fleet there.
    assert_eq!(kept.settle(10), Settlement::WindowEnded);
    assert_eq!(
        overused.settle(25),
        Settlement::CarriedOver { charged_tokens: 15 }
    );
    eventually(
        Duration::from_secs(5),
        "the carried overuse is charged",
        || taken(&mut conn, &second).tokens == 15,
    )
    .await;
    assert_eq!(
        taken(&mut conn, &first),
        Amount::new(45, 3),
        "the old window is closed"
    );
    let fresh = node
        .acquire(&agent, 100, 1)
        .await
        .expect("a new window's budget");
    assert_eq!(taken(&mut conn, &second).tokens, 115);
    drop(fresh);
}

#[tokio::test]
async fn an_idle_nodes_lease_goes_back_so_another_node_can_have_all_that_is_left() {
    let server = RedisServer::start();
    let clock = window_start_clock();
    let a = on_demand_node(&server, "a", &clock).await;
    let b = on_demand_node(&server, "b", &clock).await;
    let agent = agent();
    let tokens = 10_000;
    a.set_budget(budget(agent, tokens, 1_000, 60))
        .await
        .expect("set");
    eventually(Duration::from_secs(5), "b knows the budget", || {
        b.budget(&agent).is_some()
    })
    .await;
    let key = window_key(&agent, 60, clock.now_ms());
    let mut conn = server.connection();

    a.acquire(&agent, 5, 1).await.expect("fits").settle(5);
    assert_eq!(
        taken_by(&mut conn, &key, a.node_id()).tokens,
        100,
        "a holds a lease"
    );
    // While a is busy, b cannot have the last 100 tokens.
    match b.acquire(&agent, tokens - 5, 1).await {
        Err(Denied::Refused(refused)) => assert!(refused.retry_after.is_some(), "{refused}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // a's demand stops: half a second later (on the fleet's clock, moving
    // 10 ms per look) its lease goes back, and not before.
    let stopped = clock.now_ms();
    eventually(Duration::from_secs(5), "a gives its lease back", || {
        let back = taken_by(&mut conn, &key, a.node_id()) == Amount::new(5, 1);
        assert!(
            !back || clock.now_ms() - stopped >= 500,
            "given back while active"
        );
        clock.advance(Duration::from_millis(10));
        back
    })
    .await;
    assert!(
        clock.now_ms() - stopped <= 1_000,
        "within a second of the demand stopping"
    );
    assert_eq!(local(&a, &agent).2, Amount::ZERO);
    let rest = b
        .acquire(&agent, tokens - 5, 1)
        .await
        .expect("all that is left");
    assert_eq!(taken(&mut conn, &key).tokens, tokens);
    drop(rest);
}

#[tokio::test]
async fn shutdown_gives_every_lease_back_and_refuses_afterwards() {
    let solo = solo().await;
    let (node, agent, key, mut conn) = (solo.node, solo.agent, solo.key, solo.conn);
    let open = node.acquire(&agent, 40, 2).await.expect("fits");
    node.shutdown().await.expect("shut down");
    assert_eq!(
        taken(&mut conn, &key),
        Amount::new(40, 2),
        "only what is in use stays taken"
    );
    assert!(matches!(
        node.acquire(&agent, 1, 1).await,
        Err(Denied::Unavailable { .. })
    ));
    assert!(node.set_budget(budget(agent, 1, 1, 1)).await.is_err());
    drop(open);
}

#[tokio::test]
async fn budgets_set_and_removed_on_one_node_reach_the_others() {
    let server = RedisServer::start();
    let clock = window_start_clock();
    let nodes = nodes(&server, Some(&clock), 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let agent = agent();
    let first = budget(agent, 1_000, 10, 60);
    a.set_budget(first.clone()).await.expect("set");
    eventually(Duration::from_secs(5), "b learns the budget", || {
        b.budget(&agent) == Some(first.clone())
    })
    .await;
    let raised = budget(agent, 5_000, 50, 60);
    b.set_budget(raised.clone()).await.expect("raise");
    eventually(Duration::from_secs(5), "a learns the change", || {
        a.budget(&agent) == Some(raised.clone())
    })
    .await;
    // A node joining later knows it from the start.
    let late = node(config(&server, "late", Some(&clock))).await;
    assert_eq!(late.budget(&agent), Some(raised.clone()));
    b.acquire(&agent, 10, 1).await.expect("b admits").settle(10);
    a.remove_budget(&agent).await.expect("remove");
    eventually(Duration::from_secs(5), "b forgets it", || {
        b.budget(&agent).is_none()
    })
    .await;
    match b.acquire(&agent, 1, 1).await {
        Err(Denied::Refused(refused)) => assert_eq!(refused.reason, RefusalReason::NoBudget),
        other => panic!("expected no budget, got {other:?}"),
    }
    let info = a.fleet_info(&agent).await.expect("redis answers");
    assert_eq!(info, None);
}

#[tokio::test]
async fn windows_follow_redis_time_and_the_admin_view_shows_the_fleet() {
    let server = RedisServer::start();
    let mut config = config(&server, "a", None);
    config.lease.low_water = 0.0;
    let a = node(config).await;
    let b = node({
        let mut c = common::config(&server, "b", None);
        c.lease.low_water = 0.0;
        c
    })
    .await;
    let agent = agent();
    let window_secs = 3_600;
    a.set_budget(budget(agent, 100_000, 1_000, window_secs))
        .await
        .expect("set");
    eventually(Duration::from_secs(5), "b learns the budget", || {
        b.budget(&agent).is_some()
    })
    .await;
    let mut conn = server.connection();
    let server_ms = || {
        let mut conn = server.connection();
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query(&mut conn).expect("TIME");
        secs * 1_000 + micros / 1_000
    };
    // The fleet record was made at the first node's start: this window
    // began before it, and is fenced for the grace period (real time).
    let before = server_ms();
    let mut admitted = None;
    for _ in 0..100 {
        match a.acquire(&agent, 500, 1).await {
            Ok(r) => {
                admitted = Some(r);
                break;
            }
            Err(Denied::Unavailable { .. }) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(other) => panic!("{other}"),
        }
    }
    let reservation = admitted.expect("admitted once the fence is past");
    b.acquire(&agent, 2_000, 1)
        .await
        .expect("fits")
        .settle(1_000);
    let after = server_ms();
    // The record is under the index of Redis's clock.
    let keys = [
        window_key(&agent, window_secs, before),
        window_key(&agent, window_secs, after),
    ];
    let fleet = keys
        .iter()
        .map(|k| taken(&mut conn, k))
        .find(|t| !t.is_zero())
        .expect("a record");
    assert_eq!(fleet, Amount::new(1_000 + 2_000, 20), "a lease each");
    let info = b.fleet_info(&agent).await.expect("redis").expect("known");
    assert_eq!(info.taken, fleet);
    assert_eq!(info.nodes.len(), 2);
    assert_eq!(info.lease_left, Amount::new(1_000, 9));
    let full = info.to_full_info();
    assert_eq!((full.tokens_used, full.tokens_remaining), (3_000, 97_000));
    assert!(full.window_remaining_secs <= window_secs);
    assert_eq!(b.all_fleet_info().await.expect("redis").len(), 1);
    drop(reservation);
}

#[tokio::test]
async fn a_lease_below_its_low_water_mark_is_topped_up_in_the_background() {
    let server = RedisServer::start();
    let clock = window_start_clock();
    let mut config = config(&server, "a", Some(&clock));
    // No heartbeat within the test: only the request path can ask for the
    // refill.
    config.heartbeat = Duration::from_secs(3_600);
    let node = node(config).await;
    let agent = agent();
    node.set_budget(budget(agent, 10_000, 1_000, 60))
        .await
        .expect("set");
    let key = window_key(&agent, 60, clock.now_ms());
    let lease = Amount::new(100, 10);
    node.acquire(&agent, 10, 1).await.expect("fits").settle(10);
    assert_eq!(node.stats().waited, 1, "the first request found no lease");
    assert_eq!(local(&node, &agent).2, Amount::new(90, 9));
    // Down to 45 tokens, below the mark of 50: the request is served from
    // the lease, and the lease is topped up behind it.
    node.acquire(&agent, 45, 1).await.expect("fits").settle(45);
    let mut conn = server.connection();
    eventually(Duration::from_secs(5), "the lease is topped up", || {
        local(&node, &agent).2 == lease
    })
    .await;
    assert_eq!(
        taken(&mut conn, &key),
        Amount::new(155, 12),
        "to a lease, no more"
    );
    assert_eq!(node.stats().waited, 1, "no request waited for it");
    assert_eq!(node.stats().leases, 2);
}
