//! Nodes of one fleet against a real Redis: admissions, leases, windows.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_budget::{RefusalReason, Settlement};
use agent_budget_redis::{Amount, Denied, FakeClock, FleetClock, FleetManager};
use common::*;

/// A fake fleet clock at the start of a 60 s window (so the fleet record,
/// made now, fences nothing).
fn window_start_clock() -> FakeClock {
    FakeClock::new(60_000 * 1_000)
}

fn window_key(agent: &uuid::Uuid, window_secs: u64, now_ms: u64) -> String {
    let length = window_secs * 1_000;
    format!("agent-budget:w:{agent}:{length}:{}", now_ms / length)
}

fn taken(conn: &mut redis::Connection, key: &str) -> Amount {
    let (t, c): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
        .arg(key)
        .arg("t")
        .arg("c")
        .query(conn)
        .expect("read the window's record");
    Amount::new(t.unwrap_or(0), c.unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_racing_admit_exactly_the_budget_and_never_more_at_any_moment() {
    let server = RedisServer::start();
    let clock = window_start_clock();
    let agent = agent();
    let (tokens, per_request) = (5_000u64, 5u64);
    let nodes: Vec<Arc<FleetManager>> = futures_nodes(&server, &clock, 3).await;
    nodes[0]
        .set_budget(budget(agent, tokens, 1_000_000, 60))
        .await
        .expect("set the budget");
    for node in &nodes {
        let node = node.clone();
        eventually(
            Duration::from_secs(5),
            "every node knows the budget",
            move || node.budget(&agent).is_some(),
        )
        .await;
    }

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

async fn futures_nodes(
    server: &RedisServer,
    clock: &FakeClock,
    n: usize,
) -> Vec<Arc<FleetManager>> {
    let mut nodes = Vec::new();
    for i in 0..n {
        nodes.push(Arc::new(
            node(config(server, &format!("node-{i}"), Some(clock))).await,
        ));
    }
    nodes
}
