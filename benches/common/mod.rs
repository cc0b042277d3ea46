//! Setup shared by the benches: agent ids, managers filled with N agents,
//! governor limiters holding the same keys, and uniform key draws.
//!
//! Every bench builds its fixtures here so that the managers and governor
//! are measured on the same agents, budgets and key sequences.

// Each bench target compiles this module and uses only part of it.
#![allow(dead_code)]

use std::num::NonZeroU32;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use agent_budget::{AgentId, BudgetLimit, BudgetLimiter, MAX_CALLS, MAX_TOKENS};
use criterion::Criterion;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Criterion settings short enough for a shared 2-core machine; the
/// command line (`--warm-up-time`, `--measurement-time`, ...) overrides them.
pub fn short_config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
}

/// `n` distinct agent ids, the same in every run.
pub fn agent_ids(n: usize) -> Vec<AgentId> {
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    (0..n).map(|_| AgentId::from_u128(rng.random())).collect()
}

/// A budget that never runs out during a bench: the largest the manager
/// enforces, in a window that never ends.
pub fn unlimited(agent_id: AgentId) -> BudgetLimit {
    BudgetLimit {
        agent_id,
        token_budget: MAX_TOKENS,
        calls_budget: MAX_CALLS,
        window_secs: u64::MAX,
    }
}

/// Which clock a manager reads.
#[derive(Clone, Copy)]
pub enum Clocking {
    /// `quanta::Clock::raw` and its scaling, every operation.
    Precise,
    /// quanta's recent time, refreshed every millisecond by its upkeep
    /// thread (`with_coarse_clock` at 1 ms): what `new()` managers read.
    Coarse,
}

/// An empty manager reading `clocking`.
pub fn manager<M: BudgetLimiter>(clocking: Clocking) -> M {
    match clocking {
        Clocking::Precise => M::with_clock(quanta::Clock::new()),
        Clocking::Coarse => {
            M::with_coarse_clock(quanta::Clock::new(), std::time::Duration::from_millis(1))
                .expect("the upkeep thread starts")
        }
    }
}

/// A manager where every agent in `ids` has an [`unlimited`] budget, so
/// every request is admitted.
pub fn admitting<M: BudgetLimiter>(ids: &[AgentId], clocking: Clocking) -> M {
    let manager: M = manager(clocking);
    for &id in ids {
        manager.set_budget(unlimited(id));
    }
    manager
}

/// A manager where every agent in `ids` has used up a one-token, one-call
/// budget in windows of `window_secs`, so every request takes the refusal
/// path an agent that ran out takes (not the "can never fit" path of a
/// request larger than the budget). A window that never ends
/// (`u64::MAX`) needs a 128-bit cell and has no retry time; one that
/// outlasts the run but ends (under 24.8 days) fits a 64-bit cell and
/// reports when it frees.
pub fn refusing<M: BudgetLimiter>(ids: &[AgentId], clocking: Clocking, window_secs: u64) -> M {
    let manager: M = manager(clocking);
    for &id in ids {
        manager.set_budget(BudgetLimit {
            agent_id: id,
            token_budget: 1,
            calls_budget: 1,
            window_secs,
        });
        let reservation = manager
            .acquire(&id, 1, 1)
            .expect("a fresh budget admits its first request");
        let _ = reservation.settle(1);
    }
    manager
}

/// governor's keyed limiter, the usual alternative, holding every key in
/// `ids` with a quota no bench exhausts (10^9 cells per second).
pub fn governor_admitting(ids: &[AgentId]) -> DefaultKeyedRateLimiter<AgentId> {
    let quota = Quota::per_second(NonZeroU32::new(1_000_000_000).expect("non-zero"));
    let limiter = RateLimiter::keyed(quota);
    for id in ids {
        assert!(limiter.check_key(id).is_ok(), "a fresh key admits");
    }
    limiter
}

/// governor's keyed limiter with every key in `ids` out of its one cell
/// per hour, so every check is refused.
pub fn governor_refusing(ids: &[AgentId]) -> DefaultKeyedRateLimiter<AgentId> {
    let limiter = RateLimiter::keyed(Quota::per_hour(NonZeroU32::MIN));
    for id in ids {
        assert!(limiter.check_key(id).is_ok(), "a fresh key admits");
    }
    limiter
}

/// Draws agent ids uniformly from a set, so a large set really misses the
/// caches. Costs about a nanosecond a draw (the floor group measures it).
pub struct Keys<'a> {
    ids: &'a [AgentId],
    rng: SmallRng,
}

impl<'a> Keys<'a> {
    /// Draws from `ids`; different `seed`s give independent sequences (one
    /// per thread).
    pub fn new(ids: &'a [AgentId], seed: u64) -> Self {
        assert!(!ids.is_empty(), "no agents to draw from");
        Keys {
            ids,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// The next agent.
    #[inline]
    pub fn next_id(&mut self) -> &'a AgentId {
        &self.ids[self.next_index()]
    }

    /// The next agent's index in the set (for per-agent state, such as
    /// handles, kept in the same order).
    #[inline]
    pub fn next_index(&mut self) -> usize {
        self.rng.random_range(0..self.ids.len())
    }
}

/// Runs `work(t, state)` on `threads` threads at once and returns the wall
/// time from their common start until the last one finished; each thread
/// first builds its `state` with `prepare(t)`, outside the timing.
pub fn timed_threads<S>(
    threads: usize,
    prepare: impl Fn(usize) -> S + Sync,
    work: impl Fn(usize, S) + Sync,
) -> Duration {
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, prepare, work) = (&barrier, &prepare, &work);
                scope.spawn(move || {
                    let state = prepare(t);
                    barrier.wait();
                    work(t, state);
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        for worker in workers {
            worker.join().expect("bench thread panicked");
        }
        start.elapsed()
    })
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}
