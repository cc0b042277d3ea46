//! Admissions with leases against one Redis round trip per request, side
//! by side on loopback, and the lease-size trade-off.
//!
//! `cargo bench -p agent-budget-redis --bench fleet` (starts its own
//! `redis-server`; `-- --quick` for a short run). Every variant serves the
//! same requests: `concurrency` tasks on a two-worker tokio runtime, each
//! admitting `tokens` and one call, then settling the same amount. The
//! latency is that of the admission alone (the `acquire` and its `.await`);
//! throughput counts whole requests. The fleet's budget is twice what a
//! run takes, so the run uses half of it (one window of an hour).
//!
//! - `in-process`: `Arc<BudgetManager>::acquire_owned`, no Redis at all;
//! - `lease N%`: `FleetManager::acquire` on one node, leases of N% of the
//!   budget refilled at half;
//! - `round trip`: one `EVALSHA` per request that checks and charges the
//!   budget in Redis (the usual design), on the same client.

#[path = "../tests/common/mod.rs"]
mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_budget::{BudgetLimit, BudgetManager};
use agent_budget_redis::{FleetManager, LeasePolicy};
use hdrhistogram::Histogram;
use redis::aio::ConnectionManager;

const TOKENS: u64 = 100;
const CONCURRENCY: usize = 8;

/// One variant's run.
struct Run {
    requests: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
    redis_calls: u64,
}

impl Run {
    fn per_sec(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn quantile_us(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1_000.0
    }
}

/// Runs `per_task` requests on each of `CONCURRENCY` tasks; `op` makes one
/// request and returns how long its admission took.
async fn drive<F, Fut>(per_task: u64, op: F) -> Run
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Duration> + Send,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut latency =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
                for _ in 0..per_task {
                    let took = op().await;
                    // A handler yields between requests (it does I/O):
                    // the background refills get their turn.
                    tokio::task::yield_now().await;
                    latency.saturating_record(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
                }
                latency
            })
        })
        .collect();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
    for task in tasks {
        latency.add(task.await.expect("task")).expect("same bounds");
    }
    Run {
        requests: per_task * CONCURRENCY as u64,
        elapsed: started.elapsed(),
        latency,
        redis_calls: 0,
    }
}

fn budget(agent: uuid::Uuid, requests: u64) -> BudgetLimit {
    BudgetLimit {
        agent_id: agent,
        token_budget: 2 * requests * TOKENS,
        calls_budget: 2 * requests,
        window_secs: 3_600,
    }
}

async fn in_process(per_task: u64) -> Run {
    let manager = Arc::new(BudgetManager::new());
    let agent = uuid::Uuid::new_v4();
    manager.set_budget(budget(agent, per_task * CONCURRENCY as u64));
    drive(per_task, move || {
        let manager = manager.clone();
        async move {
            let start = Instant::now();
            let reservation = manager
                .acquire_owned(&agent, TOKENS, 1)
                .expect("half the budget");
            let took = start.elapsed();
            reservation.settle(TOKENS);
            took
        }
    })
    .await
}

async fn leased(server: &common::RedisServer, fraction: f64, per_task: u64) -> Run {
    let mut config = agent_budget_redis::FleetConfig::new(server.url());
    config.lease = LeasePolicy {
        fraction,
        low_water: 0.5,
    };
    config.prefix = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let fleet = Arc::new(FleetManager::connect(config).await.expect("connect"));
    let agent = uuid::Uuid::new_v4();
    fleet
        .set_budget(budget(agent, per_task * CONCURRENCY as u64))
        .await
        .expect("set");
    // The fleet record is new, and fences the window it was made in for
    // the grace period (see the crate docs): wait that out first.
    fleet
        .acquire(&agent, TOKENS, 1)
        .await
        .expect("admitted once the fence is past")
        .settle(TOKENS);
    let before = fleet.stats().redis_calls;
    let node = fleet.clone();
    let mut run = drive(per_task, move || {
        let fleet = node.clone();
        async move {
            let start = Instant::now();
            let reservation = fleet
                .acquire(&agent, TOKENS, 1)
                .await
                .expect("half the budget");
            let took = start.elapsed();
            reservation.settle(TOKENS);
            took
        }
    })
    .await;
    run.redis_calls = fleet.stats().redis_calls - before;
    fleet.shutdown().await.expect("shut down");
    run
}

/// The usual design: one script per request checks and charges.
const ROUND_TRIP: &str = r"
local used = tonumber(redis.call('HGET', KEYS[1], 't') or '0')
if used + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], 't', ARGV[1])
return 1
";

async fn round_trip(server: &common::RedisServer, per_task: u64) -> Run {
    let client = redis::Client::open(server.url()).expect("url");
    let conn = ConnectionManager::new(client).await.expect("connect");
    let script = Arc::new(redis::Script::new(ROUND_TRIP));
    let key = format!("bench-rt:{}", uuid::Uuid::new_v4().simple());
    let limit = 2 * per_task * CONCURRENCY as u64 * TOKENS;
    let mut run = drive(per_task, move || {
        let (mut conn, script, key) = (conn.clone(), script.clone(), key.clone());
        async move {
            let start = Instant::now();
            let admitted: i64 = script
                .key(&key)
                .arg(TOKENS)
                .arg(limit)
                .invoke_async(&mut conn)
                .await
                .expect("redis answers");
            let took = start.elapsed();
            assert_eq!(admitted, 1, "half the budget");
            took
        }
    })
    .await;
    run.redis_calls = run.requests;
    run
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, fast, slow) = if quick {
        (1, 5_000, 1_000)
    } else {
        (5, 50_000, 5_000)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let server = common::RedisServer::start();
    let fractions = [0.0001, 0.001, 0.01, 0.1];
    // name -> per round: (ops/s, p50, p99, p99.9, redis calls per request)
    let mut results: Vec<(String, Vec<[f64; 5]>)> = Vec::new();
    let mut record = |name: String, run: &Run| {
        let row = [
            run.per_sec(),
            run.quantile_us(0.5),
            run.quantile_us(0.99),
            run.quantile_us(0.999),
            run.redis_calls as f64 / run.requests as f64,
        ];
        match results.iter_mut().find(|(n, _)| *n == name) {
            Some((_, rows)) => rows.push(row),
            None => results.push((name, vec![row])),
        }
    };
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        runtime.block_on(async {
            record("in-process".into(), &in_process(fast).await);
            for fraction in fractions {
                let run = leased(&server, fraction, fast).await;
                record(format!("lease {}%", fraction * 100.0), &run);
            }
            record("round trip".into(), &round_trip(&server, slow).await);
        });
    }
    println!(
        "{CONCURRENCY} tasks on 2 tokio workers, {TOKENS} tokens + 1 call per request, medians of {rounds} rounds\n"
    );
    let budget_requests = 2 * fast * CONCURRENCY as u64;
    println!(
        "fleet budget: {budget_requests} requests per window ({} tokens); each run takes half\n",
        budget_requests * TOKENS
    );
    println!("| limiter | requests/s | p50 | p99 | p99.9 | Redis calls per request | lease, in requests | stranded at worst, per node |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, rows) in &mut results {
        let column = |i: usize| median(&mut rows.iter().map(|r| r[i]).collect::<Vec<_>>());
        let (lease, stranded) = match name.strip_prefix("lease ") {
            Some(pct) => {
                let fraction = pct.trim_end_matches('%').parse::<f64>().unwrap_or(0.0) / 100.0;
                let requests = (budget_requests as f64 * fraction).ceil();
                (
                    format!("{requests:.0}"),
                    format!("one lease: {pct} of the budget"),
                )
            }
            None => ("-".into(), "none".into()),
        };
        println!(
            "| {name} | {:.0} | {:.2} µs | {:.2} µs | {:.2} µs | {:.5} | {lease} | {stranded} |",
            column(0),
            column(1),
            column(2),
            column(3),
            column(4)
        );
    }
}
