//! Cost of one operation on one thread, with no contention.
//!
//! Each operation is written once, generically over [`BudgetLimiter`], and
//! run for the lock-free [`BudgetManager`] and the locked reference
//! [`LockedBudgetManager`], at 1,000 agents (everything cached) and 100,000
//! agents (keys drawn uniformly, so most lookups miss the caches). governor's
//! keyed limiter, what users would otherwise pick, runs the two operations
//! it has an equivalent for (an admitted and a refused check).
//!
//! The `floor` group measures, in the same run, the parts every operation
//! of the lock-free manager is made of: drawing the key, one clock read,
//! one map lookup, one uncontended compare-and-swap, and the three together.
//! The gap between that floor and `reserve_admitted` is what the manager's
//! own logic costs.
//!
//! `cargo bench --bench single_thread -- reserve_admitted` runs one operation.

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use agent_budget::{AgentId, BudgetLimiter, BudgetManager, LockedBudgetManager};
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion};
use portable_atomic::AtomicU128;

use common::{agent_ids, Clocking, Keys, AGENT_COUNTS};

type Group<'a> = BenchmarkGroup<'a, WallTime>;

/// Every operation of one manager, on agents `ids`.
fn manager_ops<M: BudgetLimiter>(
    group: &mut Group<'_>,
    name: &str,
    ids: &[AgentId],
    clocking: Clocking,
) {
    let admitting: M = common::admitting(ids, clocking);
    let refusing: M = common::refusing(ids, clocking);
    let mut keys = Keys::new(ids, 1);
    let n = ids.len();

    group.bench_function(
        BenchmarkId::new(format!("reserve_admitted/{name}"), n),
        |b| b.iter(|| admitting.reserve(keys.next_id(), 1)),
    );
    group.bench_function(
        BenchmarkId::new(format!("reserve_refused/{name}"), n),
        |b| b.iter(|| refusing.reserve(keys.next_id(), 1)),
    );
    group.bench_function(BenchmarkId::new(format!("track_call/{name}"), n), |b| {
        b.iter(|| admitting.track_call(keys.next_id()))
    });
    group.bench_function(BenchmarkId::new(format!("remaining/{name}"), n), |b| {
        b.iter(|| admitting.remaining(keys.next_id()))
    });
    group.bench_function(BenchmarkId::new(format!("acquire_settle/{name}"), n), |b| {
        b.iter(|| {
            admitting
                .acquire(keys.next_id(), 100, 1)
                .map(|reservation| reservation.settle(60))
        })
    });
}

/// governor's keyed limiter on the same agents: `check_key_n` admitted and
/// refused, the counterparts of `reserve`.
fn governor_ops(group: &mut Group<'_>, ids: &[AgentId]) {
    let admitting = common::governor_admitting(ids);
    let refusing = common::governor_refusing(ids);
    let mut keys = Keys::new(ids, 1);
    let one = std::num::NonZeroU32::MIN;
    let n = ids.len();

    group.bench_function(BenchmarkId::new("reserve_admitted/governor", n), |b| {
        b.iter(|| admitting.check_key_n(keys.next_id(), one))
    });
    group.bench_function(BenchmarkId::new("reserve_refused/governor", n), |b| {
        b.iter(|| refusing.check_key_n(keys.next_id(), one))
    });
}

/// The operations of both managers and governor, at each agent count.
fn single_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("single_thread");
    for n in AGENT_COUNTS {
        let ids = agent_ids(n);
        manager_ops::<BudgetManager>(&mut group, "lock-free", &ids, Clocking::Precise);
        manager_ops::<BudgetManager>(&mut group, "lock-free-coarse", &ids, Clocking::Coarse);
        manager_ops::<LockedBudgetManager>(&mut group, "locked", &ids, Clocking::Precise);
        governor_ops(&mut group, &ids);
    }
    group.finish();
}

/// The physical floor of a lock-free operation, piece by piece and whole.
fn floor(c: &mut Criterion) {
    let mut group = c.benchmark_group("floor");
    let clock = quanta::Clock::new();
    group.bench_function("clock_now", |b| b.iter(|| clock.now()));
    // What a coarse-clock manager reads instead: one atomic load.
    let _coarse: BudgetManager = common::manager(Clocking::Coarse);
    group.bench_function("clock_recent", |b| b.iter(|| clock.recent()));
    // What the managers actually read: the raw counter, scaled once.
    let origin = clock.raw();
    group.bench_function("clock_raw_delta", |b| {
        b.iter(|| clock.delta_as_nanos(origin, clock.raw()))
    });

    let word64 = AtomicU64::new(0);
    group.bench_function("cas_u64", |b| {
        b.iter(|| {
            let current = word64.load(Ordering::Relaxed);
            word64.compare_exchange(current, current + 1, Ordering::Relaxed, Ordering::Relaxed)
        })
    });
    // The manager's usage word is 128 bits (cmpxchg16b on x86-64).
    let word128 = AtomicU128::new(0);
    group.bench_function("cas_u128", |b| {
        b.iter(|| {
            let current = word128.load(Ordering::Relaxed);
            word128.compare_exchange(current, current + 1, Ordering::Relaxed, Ordering::Relaxed)
        })
    });

    for n in AGENT_COUNTS {
        let ids = agent_ids(n);
        // The same map, hasher and value width as the lock-free manager.
        let map = papaya::HashMap::with_hasher(ahash::RandomState::new());
        for &id in &ids {
            map.pin().insert(id, AtomicU128::new(0));
        }
        let mut keys = Keys::new(&ids, 1);

        group.bench_function(BenchmarkId::new("draw_key", n), |b| {
            b.iter(|| *keys.next_id())
        });
        group.bench_function(BenchmarkId::new("lookup", n), |b| {
            b.iter(|| {
                map.pin()
                    .get(keys.next_id())
                    .map(|w| w.load(Ordering::Relaxed))
            })
        });
        group.bench_function(BenchmarkId::new("lookup_cas_clock", n), |b| {
            b.iter(|| {
                black_box(clock.delta_as_nanos(origin, clock.raw()));
                map.pin().get(keys.next_id()).map(|word| {
                    let current = word.load(Ordering::Relaxed);
                    word.compare_exchange(
                        current,
                        current + 1,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                })
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::short_config();
    targets = floor, single_thread
}
criterion_main!(benches);
