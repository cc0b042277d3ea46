//! The Lua script against its Rust twin: the same random calls, from
//! several nodes, across windows and the fence, on a real Redis.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use agent_budget_redis::protocol::{gate, take, EpochRecord, Gate, TakeRequest, Window};
use agent_budget_redis::store::{Store, StoreOptions, TakeStatus};
use agent_budget_redis::{Amount, FakeClock, FleetClock, Timeline};
use common::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const GRACE: Duration = Duration::from_secs(5);
const LENGTH_MS: u64 = 10_000;

async fn store(server: &RedisServer, node: &str, clock: &FakeClock) -> Store {
    Store::connect(StoreOptions {
        url: server.url(),
        prefix: "diff".into(),
        node: node.into(),
        grace: GRACE,
        timeout: Duration::from_secs(2),
        timeline: Timeline::Shared(Arc::new(clock.clone())),
    })
    .await
    .expect("connect")
}

/// What the model keeps of one window: the fleet's total and each node's.
#[derive(Default, Clone)]
struct Record {
    taken: Amount,
    mine: HashMap<usize, Amount>,
}

fn count(rng: &mut SmallRng, typical: u64) -> u64 {
    match rng.random_range(0..20) {
        0 => u64::MAX,
        1 => 0,
        2 => rng.random_range(0..=u64::from(u32::MAX)),
        _ => rng.random_range(0..=typical),
    }
}

fn amount(rng: &mut SmallRng, typical: u64) -> Amount {
    Amount::new(count(rng, typical), count(rng, typical / 10 + 1))
}

#[tokio::test]
async fn the_lua_script_and_its_rust_twin_agree_on_random_calls() {
    let server = RedisServer::start();
    for seed in 0..4u64 {
        let clock = FakeClock::new(1_000 * LENGTH_MS + 2_500 + seed);
        let stores = [
            store(&server, "n0", &clock).await,
            store(&server, "n1", &clock).await,
            store(&server, "n2", &clock).await,
        ];
        let agent = agent();
        let limit = Amount::new(1_000, 100);
        stores[0]
            .set_budget(&budget(agent, limit.tokens, limit.calls, LENGTH_MS / 1_000))
            .await
            .expect("set");
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut windows: HashMap<u64, Record> = HashMap::new();
        let mut epoch: Option<EpochRecord> = None;
        let mut statuses: HashMap<String, usize> = HashMap::new();
        for step in 0..400 {
            if rng.random_range(0..10) == 0 {
                clock.advance(Duration::from_millis(rng.random_range(0..3_000)));
            }
            let now = clock.now_ms();
            let node = rng.random_range(0..stores.len());
            let current = Window::containing(now, LENGTH_MS);
            let window = match rng.random_range(0..10) {
                0 => Window {
                    index: current.index - 1,
                    ..current
                },
                1 => Window {
                    index: current.index + 1,
                    ..current
                },
                _ => current,
            };
            let record = windows.entry(window.index).or_default();
            let held = record.mine.get(&node).copied().unwrap_or_default();
            let request = TakeRequest {
                belief: if rng.random_bool(0.7) {
                    held
                } else {
                    amount(&mut rng, 400)
                },
                give: amount(&mut rng, 150),
                force: if rng.random_bool(0.2) {
                    amount(&mut rng, 50)
                } else {
                    Amount::ZERO
                },
                want: amount(&mut rng, 300),
                min: amount(&mut rng, 300),
            };
            let reply = stores[node]
                .take(&agent, window, &request)
                .await
                .expect("redis answers");
            assert_eq!(reply.now_ms, now, "the script reads the shared clock");
            let fleet = *epoch.get_or_insert(EpochRecord {
                created_ms: reply.fence_ms - GRACE.as_millis() as u64,
                fence_ms: reply.fence_ms,
            });
            let opened = gate(now, window, fleet);
            let seen = agent_budget_redis::protocol::WindowRecord {
                taken: record.taken,
                mine: held,
            };
            let expected = take(seen, limit, &request, opened == Gate::Open);
            let status = match (opened, expected.short) {
                (Gate::WrongWindow { .. }, _) => TakeStatus::WrongWindow,
                (Gate::Fenced { .. }, _) => TakeStatus::Fenced,
                (Gate::Open, true) => TakeStatus::Short,
                (Gate::Open, false) => TakeStatus::Granted,
            };
            let context = format!("seed {seed} step {step}: {request:?} at {now} in {window:?}");
            assert_eq!(reply.status, status, "{context}");
            assert_eq!(reply.granted, expected.granted, "{context}");
            assert_eq!(reply.taken, expected.record.taken, "{context}");
            assert_eq!(reply.mine, expected.record.mine, "{context}");
            assert_eq!(reply.limit, limit);
            record.taken = expected.record.taken;
            record.mine.insert(node, expected.record.mine);
            *statuses.entry(format!("{status:?}")).or_default() += 1;
        }
        // The random walk went through every case.
        for status in ["Granted", "Short", "WrongWindow", "Fenced"] {
            assert!(
                statuses.get(status).copied().unwrap_or(0) > 0,
                "seed {seed}: no {status}: {statuses:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_take_for_an_unknown_agent_or_a_stale_window_length_changes_nothing() {
    let server = RedisServer::start();
    let clock = FakeClock::new(1_000 * LENGTH_MS);
    let store = store(&server, "n0", &clock).await;
    let agent = agent();
    let now = clock.now_ms();
    let request = TakeRequest {
        want: Amount::new(10, 1),
        ..TakeRequest::default()
    };
    let window = Window::containing(now, LENGTH_MS);
    let reply = store.take(&agent, window, &request).await.expect("redis");
    assert_eq!(reply.status, TakeStatus::NoBudget);
    store
        .set_budget(&budget(agent, 100, 10, LENGTH_MS / 1_000))
        .await
        .expect("set");
    let stale = Window::containing(now, 2 * LENGTH_MS);
    let reply = store.take(&agent, stale, &request).await.expect("redis");
    assert_eq!(
        (reply.status, reply.limit),
        (TakeStatus::Config, Amount::new(100, 10))
    );
    let view = store.window(&agent, stale).await.expect("redis");
    assert_eq!(view.taken, Amount::ZERO, "nothing booked");
    let reply = store.take(&agent, window, &request).await.expect("redis");
    assert_eq!(
        (reply.status, reply.granted),
        (TakeStatus::Granted, Amount::new(10, 1))
    );
    let view = store.window(&agent, window).await.expect("redis");
    assert_eq!(view.nodes, vec![("n0".to_owned(), Amount::new(10, 1))]);
    // Setting the same budget again changes nothing (no version bump);
    // removing it does, and only once.
    let (version, changed) = store
        .set_budget(&budget(agent, 100, 10, LENGTH_MS / 1_000))
        .await
        .expect("set");
    assert!(!changed);
    assert_eq!(
        store.remove_budget(&agent).await.expect("remove"),
        (version + 1, true)
    );
    assert_eq!(
        store.remove_budget(&agent).await.expect("remove"),
        (version + 1, false)
    );
    let (listed_version, listed) = store.budgets().await.expect("list");
    assert_eq!((listed_version, listed.len()), (version + 1, 0));
}
