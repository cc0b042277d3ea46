//! What the policies beyond a plain fixed window cost, one thread, side by
//! side with the plain case in the same run:
//!
//! - `levels`: `acquire` + `settle` on an agent alone, and on an agent two
//!   levels below the top of a chain (key → team → org): 1,000 keys under
//!   10 teams under one org, every level with room to spare.
//! - `refill`: `reserve` admitted on a fixed window and on a refilling
//!   bucket, 1,000 agents each.
//! - `sets`: a request admitted and settled against one limit (`acquire`,
//!   and `acquire_set` of one claim) and against four (`acquire_set` of
//!   four claims on four agents: a key's minute, day, spend and per-model
//!   limits), 1,000 keys, every limit with room to spare. The issue's
//!   target: four limits at most three times one. Beside them, the same
//!   four limits taken one by one (`four_acquires`: four `acquire` +
//!   `settle`, without all-or-none).
//!
//! `cargo bench --bench policies`

mod common;

use std::time::Duration;

use agent_budget::{
    AgentId, BudgetLimiter, BudgetManager, Claim, LockedBudgetManager, RefillLimit, MAX_CALLS,
    MAX_TOKENS,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

use common::{agent_ids, Clocking, Keys};

const AGENTS: usize = 1_000;
const TEAMS: usize = 10;

/// A bucket that never runs dry during a bench: as large as a bucket can
/// be, refilling over a century.
fn roomy_bucket(agent_id: AgentId) -> RefillLimit {
    RefillLimit {
        agent_id,
        token_budget: MAX_TOKENS / 2,
        calls_budget: MAX_CALLS / 2,
        refill_period: Duration::from_secs(100 * 365 * 86_400),
    }
}

/// `keys` each under one of `TEAMS` teams, all under one org, every budget
/// unlimited.
fn chained<M: BudgetLimiter>(keys: &[AgentId]) -> M {
    let manager: M = common::admitting(keys, Clocking::Precise);
    let org = AgentId::from_u128(u128::MAX);
    manager.set_budget(common::unlimited(org));
    let teams: Vec<_> = (0..TEAMS as u128)
        .map(|t| AgentId::from_u128(u128::MAX - 1 - t))
        .collect();
    for team in &teams {
        manager.set_budget(common::unlimited(*team));
        manager
            .set_parent(team, Some(&org))
            .expect("a two-level chain");
    }
    for (i, key) in keys.iter().enumerate() {
        manager
            .set_parent(key, Some(&teams[i % TEAMS]))
            .expect("a three-level chain");
    }
    manager
}

fn levels_of<M: BudgetLimiter>(c: &mut Criterion, name: &str) {
    let keys = agent_ids(AGENTS);
    let alone: M = common::admitting(&keys, Clocking::Precise);
    let chain: M = chained(&keys);
    let mut draw = Keys::new(&keys, 1);
    let mut group = c.benchmark_group("levels");
    for (levels, manager) in [(1, &alone), (3, &chain)] {
        group.bench_function(
            BenchmarkId::new(format!("acquire_settle/{name}"), levels),
            |b| {
                b.iter(|| {
                    manager
                        .acquire(draw.next_id(), 100, 1)
                        .map(|reservation| reservation.settle(60))
                })
            },
        );
    }
    group.finish();
}

fn levels(c: &mut Criterion) {
    levels_of::<BudgetManager>(c, "lock-free");
    levels_of::<LockedBudgetManager>(c, "locked");
}

fn refill_of<M: BudgetLimiter>(c: &mut Criterion, name: &str) {
    let ids = agent_ids(AGENTS);
    let window: M = common::admitting(&ids, Clocking::Precise);
    let bucket: M = common::manager(Clocking::Precise);
    for &id in &ids {
        bucket.set_refill(roomy_bucket(id));
    }
    let mut draw = Keys::new(&ids, 1);
    let mut group = c.benchmark_group("refill");
    for (policy, manager) in [("window", &window), ("bucket", &bucket)] {
        group.bench_function(
            BenchmarkId::new(format!("reserve_admitted/{name}"), policy),
            |b| b.iter(|| manager.reserve(draw.next_id(), 1)),
        );
    }
    group.finish();
}

fn refill(c: &mut Criterion) {
    refill_of::<BudgetManager>(c, "lock-free");
    refill_of::<LockedBudgetManager>(c, "locked");
}

/// A key's four limits: the key itself and three more agents of its own.
const LIMITS_PER_KEY: usize = 4;

fn sets_of<M: BudgetLimiter>(c: &mut Criterion, name: &str) {
    let all = agent_ids(AGENTS * LIMITS_PER_KEY);
    let manager: M = common::admitting(&all, Clocking::Precise);
    let keys: Vec<[Claim; LIMITS_PER_KEY]> = all
        .chunks(LIMITS_PER_KEY)
        .map(|limits| {
            std::array::from_fn(|i| Claim {
                agent_id: limits[i],
                tokens: 100,
                calls: 1,
            })
        })
        .collect();
    let mut draw = Keys::new(&all[..AGENTS], 1);
    let mut group = c.benchmark_group("sets");
    group.bench_function(BenchmarkId::new(format!("acquire_settle/{name}"), 1), |b| {
        b.iter(|| {
            let claims = &keys[draw.next_index()];
            manager
                .acquire(&claims[0].agent_id, 100, 1)
                .map(|reservation| reservation.settle(60))
        })
    });
    // The four limits taken one by one, each its own `acquire` and
    // `settle`: what the set's one admission is to be compared with where
    // all-or-none is not needed.
    group.bench_function(BenchmarkId::new(format!("four_acquires/{name}"), 4), |b| {
        b.iter(|| {
            let claims = &keys[draw.next_index()];
            claims.iter().all(|claim| {
                manager
                    .acquire(&claim.agent_id, 100, 1)
                    .map(|reservation| reservation.settle(60))
                    .is_ok()
            })
        })
    });
    for limits in [1, LIMITS_PER_KEY] {
        group.bench_function(
            BenchmarkId::new(format!("acquire_set_settle/{name}"), limits),
            |b| {
                b.iter(|| {
                    let claims = &keys[draw.next_index()][..limits];
                    manager
                        .acquire_set(claims)
                        .map(|reservation| reservation.settle(60))
                })
            },
        );
    }
    group.finish();
}

fn sets(c: &mut Criterion) {
    sets_of::<BudgetManager>(c, "lock-free");
    sets_of::<LockedBudgetManager>(c, "locked");
}

criterion_group! {
    name = benches;
    config = common::short_config();
    targets = levels, refill, sets
}
criterion_main!(benches);
