//! Throughput of `reserve` (admitted) under contention: 1, 2, 4 and 8
//! threads, on one hot agent, on 1,000 agents and on 100,000 agents, for the
//! lock-free [`BudgetManager`], the locked [`LockedBudgetManager`] and
//! governor's keyed limiter (`check_key_n`).
//!
//! Each sample spawns its threads, releases them together from a barrier and
//! times until the last one has done its share of the sample's operations,
//! so the reported time per element is wall time / total operations and the
//! throughput is total operations per second across all threads. On a
//! machine with fewer cores than threads the extra threads time-slice, which
//! is where a lock held by a descheduled thread shows.
//!
//! `cargo bench --bench contention -- hot_agent` runs one group.

mod common;

use std::hint::black_box;
use std::time::Duration;

use agent_budget::{AgentId, BudgetLimiter, BudgetManager, LockedBudgetManager};
use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};

use common::{agent_ids, Clocking, Keys};

type Group<'a> = BenchmarkGroup<'a, WallTime>;

/// Thread counts measured.
const THREADS: [usize; 4] = [1, 2, 4, 8];

/// Runs `iters` calls of `op` split over `threads` threads, each drawing
/// its own uniform keys from `ids`, and returns the wall time they took
/// (scaled to exactly `iters` operations).
fn run_threads<R>(
    threads: usize,
    iters: u64,
    ids: &[AgentId],
    op: impl Fn(&AgentId) -> R + Sync,
) -> Duration {
    let per_thread = iters.div_ceil(threads as u64).max(1);
    let elapsed = common::timed_threads(
        threads,
        |t| Keys::new(ids, t as u64 + 1),
        |_, mut keys| {
            for _ in 0..per_thread {
                black_box(op(keys.next_id()));
            }
        },
    );
    elapsed.mul_f64(iters as f64 / (per_thread * threads as u64) as f64)
}

/// `reserve` on one manager at every thread count.
fn manager_throughput<M: BudgetLimiter>(
    group: &mut Group<'_>,
    name: &str,
    ids: &[AgentId],
    clocking: Clocking,
) {
    let manager: M = common::admitting(ids, clocking);
    for threads in THREADS {
        group.bench_function(BenchmarkId::new(name, threads), |b| {
            b.iter_custom(|iters| run_threads(threads, iters, ids, |id| manager.reserve(id, 1)))
        });
    }
}

/// governor's `check_key_n` at every thread count.
fn governor_throughput(group: &mut Group<'_>, ids: &[AgentId]) {
    let governor = common::governor_admitting(ids);
    let one = std::num::NonZeroU32::MIN;
    for threads in THREADS {
        group.bench_function(BenchmarkId::new("governor", threads), |b| {
            b.iter_custom(|iters| {
                run_threads(threads, iters, ids, |id| governor.check_key_n(id, one))
            })
        });
    }
}

/// One group per agent set, each with every thread count for the three
/// limiters.
fn contention(c: &mut Criterion) {
    for (label, agents) in [
        ("hot_agent", 1),
        ("1000_agents", 1_000),
        ("100000_agents", 100_000),
    ] {
        let ids = agent_ids(agents);
        let mut group = c.benchmark_group(format!("contention/{label}"));
        group.throughput(Throughput::Elements(1)).sample_size(10);
        // `lock-free` and `locked` on the default clock (what `new()` reads).
        manager_throughput::<BudgetManager>(&mut group, "lock-free", &ids, Clocking::Coarse);
        manager_throughput::<BudgetManager>(
            &mut group,
            "lock-free-precise",
            &ids,
            Clocking::Precise,
        );
        manager_throughput::<LockedBudgetManager>(&mut group, "locked", &ids, Clocking::Coarse);
        governor_throughput(&mut group, &ids);
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = common::short_config();
    targets = contention
}
criterion_main!(benches);
