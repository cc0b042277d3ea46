//! Cost of one operation on one thread, with no contention.
//!
//! One group per agent count: 1 (a single hot agent), 1,000 (everything
//! cached) and 100,000 (keys drawn uniformly, so most lookups miss the
//! caches). In each group, side by side:
//!
//! - the lock-free [`BudgetManager`] on its default clock (`lock-free`:
//!   quanta's recent time, as `BudgetManager::new()` reads) and on the
//!   precise one (`lock-free-precise`: a TSC read per operation);
//! - the locked reference [`LockedBudgetManager`] (default clock);
//! - the lock-free manager's agent handles (`handle`), which skip the
//!   lookup;
//! - governor's keyed limiter, what users would otherwise pick, on the two
//!   operations it has (`check_key_n` admitted and refused).
//!
//! Each operation is written once, generically over [`BudgetLimiter`].
//!
//! The `floor` group measures, in the same run, the parts every operation
//! of the lock-free manager is made of: drawing the key, one clock read,
//! one uncontended compare-and-swap (64 and 128 bits), and, for reference,
//! the papaya lookup the manager used before its registry (see
//! `docs::implementation`, "The registry"; `benches/admission.rs` compares
//! the managers themselves the way issue 16 asks).
//!
//! `cargo bench --bench single_thread -- reserve_admitted` runs one operation.

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use agent_budget::{AgentHandle, AgentId, BudgetLimiter, BudgetManager, LockedBudgetManager};
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use portable_atomic::AtomicU128;

use common::{agent_ids, Clocking, Keys};

type Group<'a> = BenchmarkGroup<'a, WallTime>;

/// The agent counts, one group each.
const COUNTS: [usize; 3] = [1, 1_000, 100_000];

/// Every operation of one manager, on agents `ids`.
fn manager_ops<M: BudgetLimiter>(
    group: &mut Group<'_>,
    name: &str,
    ids: &[AgentId],
    clocking: Clocking,
) {
    let admitting: M = common::admitting(ids, clocking);
    let refusing: M = common::refusing(ids, clocking, u64::MAX);
    let mut keys = Keys::new(ids, 1);

    group.bench_function(format!("reserve_admitted/{name}"), |b| {
        b.iter(|| admitting.reserve(keys.next_id(), 1))
    });
    group.bench_function(format!("reserve_refused/{name}"), |b| {
        b.iter(|| refusing.reserve(keys.next_id(), 1))
    });
    group.bench_function(format!("acquire_refused/{name}"), |b| {
        b.iter(|| refusing.acquire(keys.next_id(), 1, 1).map(drop))
    });
    group.bench_function(format!("acquire_settle/{name}"), |b| {
        b.iter(|| {
            admitting
                .acquire(keys.next_id(), 100, 1)
                .map(|reservation| reservation.settle(60))
        })
    });
    group.bench_function(format!("track_call/{name}"), |b| {
        b.iter(|| admitting.track_call(keys.next_id()))
    });
    group.bench_function(format!("remaining/{name}"), |b| {
        b.iter(|| admitting.remaining(keys.next_id()))
    });
}

/// The lock-free manager's operations through handles held for every agent.
fn handle_ops(group: &mut Group<'_>, ids: &[AgentId]) {
    let admitting: BudgetManager = common::admitting(ids, Clocking::Coarse);
    let refusing: BudgetManager = common::refusing(ids, Clocking::Coarse, u64::MAX);
    let (admitting, refusing) = (handles(&admitting, ids), handles(&refusing, ids));
    let mut keys = Keys::new(ids, 1);

    group.bench_function("reserve_admitted/handle", |b| {
        b.iter(|| admitting[keys.next_index()].reserve(1))
    });
    group.bench_function("reserve_refused/handle", |b| {
        b.iter(|| refusing[keys.next_index()].reserve(1))
    });
    group.bench_function("acquire_refused/handle", |b| {
        b.iter(|| refusing[keys.next_index()].acquire(1, 1).map(drop))
    });
    group.bench_function("acquire_settle/handle", |b| {
        b.iter(|| {
            admitting[keys.next_index()]
                .acquire(100, 1)
                .map(|reservation| reservation.settle(60))
        })
    });
}

/// A handle on each of `ids`, in order.
fn handles<'m>(manager: &'m BudgetManager, ids: &[AgentId]) -> Vec<AgentHandle<'m>> {
    ids.iter()
        .map(|id| manager.handle(id).expect("configured"))
        .collect()
}

/// governor's keyed limiter on the same agents: `check_key_n` admitted and
/// refused, the counterparts of `reserve`.
fn governor_ops(group: &mut Group<'_>, ids: &[AgentId]) {
    let admitting = common::governor_admitting(ids);
    let refusing = common::governor_refusing(ids);
    let mut keys = Keys::new(ids, 1);
    let one = std::num::NonZeroU32::MIN;

    group.bench_function("reserve_admitted/governor", |b| {
        b.iter(|| admitting.check_key_n(keys.next_id(), one))
    });
    group.bench_function("reserve_refused/governor", |b| {
        b.iter(|| refusing.check_key_n(keys.next_id(), one))
    });
}

/// The operations of both managers, the handles and governor, one group per
/// agent count.
fn single_thread(c: &mut Criterion) {
    for n in COUNTS {
        let ids = agent_ids(n);
        let mut group = c.benchmark_group(format!("agents_{n}"));
        manager_ops::<BudgetManager>(&mut group, "lock-free", &ids, Clocking::Coarse);
        manager_ops::<BudgetManager>(&mut group, "lock-free-precise", &ids, Clocking::Precise);
        manager_ops::<LockedBudgetManager>(&mut group, "locked", &ids, Clocking::Coarse);
        handle_ops(&mut group, &ids);
        governor_ops(&mut group, &ids);
        group.finish();
    }
}

/// The physical floor of a lock-free operation, piece by piece and whole.
fn floor(c: &mut Criterion) {
    let mut group = c.benchmark_group("floor");
    let clock = quanta::Clock::new();
    group.bench_function("clock_now", |b| b.iter(|| clock.now()));
    // What the default (coarse-clock) manager reads instead: one atomic
    // load, kept current by quanta's upkeep thread.
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

    for n in COUNTS {
        let ids = agent_ids(n);
        // The map, hasher and value the lock-free manager used before its
        // registry: an `Arc` of a 16-byte-aligned word.
        let map = papaya::HashMap::with_hasher(ahash::RandomState::new());
        for &id in &ids {
            map.pin().insert(id, Arc::new(AtomicU128::new(0)));
        }
        let mut keys = Keys::new(&ids, 1);

        group.bench_function(format!("draw_key/{n}"), |b| b.iter(|| *keys.next_id()));
        group.bench_function(format!("lookup/{n}"), |b| {
            b.iter(|| {
                map.pin()
                    .get(keys.next_id())
                    .map(|w| w.load(Ordering::Relaxed))
            })
        });
        group.bench_function(format!("lookup_cas_clock/{n}"), |b| {
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
