//! Admissions side by side: the lock-free manager (on 128-bit and on 64-bit
//! cells), its handles, the locked manager and governor's keyed limiter.
//!
//! Method (issue 16): every contender sits behind the same trait object;
//! each operation draws its agent from a fast generator (xorshift, v4 ids);
//! each group runs `ROUNDS` rounds, each round every contender once, in an
//! order that rotates from round to round; a contender's figure is the
//! median of its per-round times, and its ratios are the medians of the
//! per-round ratios against governor and the locked manager in the same
//! round, which cancels most of a shared machine's drift.
//!
//! `cargo bench --bench admission` runs everything (about two minutes);
//! `cargo bench --bench admission -- hot` runs the groups whose name
//! contains `hot`. `ROUNDS` and `OPS` (operations per thread per round)
//! override the defaults; `AGENTS=100000` and `THREADS=2,1` (lists) choose
//! the agent counts and thread counts of the admission groups, in order.

mod common;

use std::hint::black_box;
use std::num::NonZeroU32;

use agent_budget::{AgentHandle, AgentId, BudgetLimit, BudgetManager, LockedBudgetManager};
use agent_budget::{BudgetLimiter, MAX_CALLS, MAX_TOKENS};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// A fast generator: xorshift64, reduced to a range by multiplication.
struct Draw(u64);

impl Draw {
    #[inline]
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((u128::from(self.0) * n as u128) >> 64) as usize
    }
}

/// `n` v4 ids, the same in every run.
fn v4_ids(n: usize) -> Vec<AgentId> {
    let mut draw = Draw(0x5eed_1234_abcd_0001);
    (0..n)
        .map(|_| {
            let mut bytes = [0u8; 16];
            for chunk in bytes.chunks_mut(8) {
                draw.below(2);
                chunk.copy_from_slice(&draw.0.to_le_bytes());
            }
            uuid::Builder::from_random_bytes(bytes).into_uuid()
        })
        .collect()
}

/// One operation on agent number `agent`: admitted or refused, whichever
/// the group measures.
trait Contender: Sync {
    fn op(&self, agent: usize) -> bool;
}

/// Which budgets a lock-free manager gets.
#[derive(Clone, Copy)]
enum Width {
    /// The largest budgets, in a window that never ends: 128-bit cells.
    Wide,
    /// 4 million tokens a minute (a millisecond for one hot agent): 64-bit
    /// cells.
    Narrow { window_secs: u64 },
}

fn admitting_limit(agent_id: AgentId, width: Width) -> BudgetLimit {
    match width {
        Width::Wide => BudgetLimit {
            agent_id,
            token_budget: MAX_TOKENS,
            calls_budget: MAX_CALLS,
            window_secs: u64::MAX,
        },
        Width::Narrow { window_secs } => BudgetLimit {
            agent_id,
            token_budget: (1 << 22) - 1,
            calls_budget: 1_000,
            window_secs,
        },
    }
}

/// A manager where every agent in `ids` admits `reserve(1)` for the whole
/// run.
fn admitting<M: BudgetLimiter>(ids: &[AgentId], width: Width) -> M {
    let manager = M::with_coarse_clock(quanta::Clock::new(), std::time::Duration::from_millis(1))
        .expect("the upkeep thread starts");
    for &id in ids {
        manager.set_budget(admitting_limit(id, width));
    }
    manager
}

/// A manager where every agent in `ids` has spent a one-token, one-call
/// budget in a window that outlasts the run (23 days: narrow cells fit).
fn refusing<M: BudgetLimiter>(ids: &[AgentId]) -> M {
    common::refusing(ids, common::Clocking::Coarse, 2_000_000)
}

struct Reserve<'a, M>(M, &'a [AgentId]);

impl<M: BudgetLimiter> Contender for Reserve<'_, M> {
    #[inline]
    fn op(&self, agent: usize) -> bool {
        self.0.reserve(&self.1[agent], 1).is_ok()
    }
}

struct AcquireRefused<'a, M>(M, &'a [AgentId]);

impl<M: BudgetLimiter> Contender for AcquireRefused<'_, M> {
    #[inline]
    fn op(&self, agent: usize) -> bool {
        self.0.acquire(&self.1[agent], 1, 1).is_ok()
    }
}

struct Handles<'m>(Vec<AgentHandle<'m>>);

impl Contender for Handles<'_> {
    #[inline]
    fn op(&self, agent: usize) -> bool {
        self.0[agent].reserve(1).is_ok()
    }
}

struct Governor<'a>(DefaultKeyedRateLimiter<AgentId>, &'a [AgentId]);

impl Contender for Governor<'_> {
    #[inline]
    fn op(&self, agent: usize) -> bool {
        self.0.check_key_n(&self.1[agent], NonZeroU32::MIN).is_ok()
    }
}

fn keyed(ids: &[AgentId], quota: Quota) -> Governor<'_> {
    let limiter = RateLimiter::keyed(quota);
    for id in ids {
        assert!(limiter.check_key(id).is_ok(), "a fresh key admits");
    }
    Governor(limiter, ids)
}

/// Nanoseconds of wall time per operation: `threads` threads, each doing
/// `ops` operations on agents drawn from `agents`.
fn run(contender: &dyn Contender, threads: usize, agents: usize, ops: usize, seed: u64) -> f64 {
    let elapsed = common::timed_threads(
        threads,
        |t| Draw(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (t as u64 + 1)),
        |_, mut draw| {
            for _ in 0..ops {
                black_box(contender.op(draw.below(agents)));
            }
        },
    );
    elapsed.as_nanos() as f64 / (threads * ops) as f64
}

/// A comma-separated list of numbers from the environment, or `default`.
fn list_var(key: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(key).map_or_else(
        |_| default.to_vec(),
        |list| {
            list.split(',')
                .map(|n| {
                    n.trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("{key}: {list:?} is not a list of numbers"))
                })
                .collect()
        },
    )
}

struct Settings {
    rounds: usize,
    ops: usize,
    filter: Option<String>,
}

/// Runs one group and prints its rows: ns per operation, and the ratios
/// (how many times faster) against governor and the locked manager.
fn group(
    settings: &Settings,
    name: &str,
    threads: usize,
    agents: usize,
    contenders: &[(&str, &dyn Contender)],
) {
    if settings
        .filter
        .as_deref()
        .is_some_and(|f| !name.contains(f))
    {
        return;
    }
    let mut times = vec![Vec::new(); contenders.len()];
    for round in 0..settings.rounds {
        for k in 0..contenders.len() {
            let at = (k + round) % contenders.len();
            let seed = round as u64 * 31 + at as u64;
            times[at].push(run(contenders[at].1, threads, agents, settings.ops, seed));
        }
    }
    let find = |wanted: &str| contenders.iter().position(|(n, _)| *n == wanted);
    let (governor, locked) = (find("governor"), find("locked"));
    let ratio = |base: Option<usize>, k: usize| {
        base.map_or(String::from("-"), |b| {
            let per_round = (0..settings.rounds)
                .map(|r| times[b][r] / times[k][r])
                .collect();
            format!("{:.2}x", common::median(per_round))
        })
    };
    for (k, (contender, _)) in contenders.iter().enumerate() {
        println!(
            "| {name} | {agents} | {threads} | {contender} | {:.1} | {} | {} |",
            common::median(times[k].clone()),
            ratio(governor, k),
            ratio(locked, k),
        );
    }
}

fn main() {
    let var = |key: &str, default: usize| {
        std::env::var(key)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    // `cargo bench` passes `--bench`; anything else is a group filter.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let settings = Settings {
        rounds: var("ROUNDS", 7),
        ops: var("OPS", 1_000_000),
        filter,
    };
    println!(
        "{} rounds, {} operations per thread per round; ns per operation (median), \
         and the median per-round ratio of governor's (or the locked manager's) time to this one's",
        settings.rounds, settings.ops
    );
    println!("| group | agents | threads | contender | ns/op | vs governor | vs locked |");
    println!("|---|---|---|---|---|---|---|");
    let generous = Quota::per_second(NonZeroU32::new(1_000_000_000).expect("non-zero"));
    let sizes = list_var("AGENTS", &[1_000, 100_000, 1_000_000]);
    let thread_counts = list_var("THREADS", &[1, 2]);
    for agents in sizes {
        let ids = v4_ids(agents);
        let narrow = Width::Narrow { window_secs: 60 };
        let wide_manager = Reserve(admitting::<BudgetManager>(&ids, Width::Wide), &ids);
        let narrow_manager = Reserve(admitting::<BudgetManager>(&ids, narrow), &ids);
        let locked = Reserve(admitting::<LockedBudgetManager>(&ids, Width::Wide), &ids);
        let governor = keyed(&ids, generous);
        let wide_handles = Handles(
            ids.iter()
                .map(|id| wide_manager.0.handle(id).expect("set"))
                .collect(),
        );
        let narrow_handles = Handles(
            ids.iter()
                .map(|id| narrow_manager.0.handle(id).expect("set"))
                .collect(),
        );
        for &threads in &thread_counts {
            group(
                &settings,
                "reserve admitted",
                threads,
                agents,
                &[
                    ("lock-free (128-bit)", &wide_manager),
                    ("lock-free (64-bit)", &narrow_manager),
                    ("handle (128-bit)", &wide_handles),
                    ("handle (64-bit)", &narrow_handles),
                    ("locked", &locked),
                    ("governor", &governor),
                ],
            );
        }
        if agents == 1_000 {
            let refusing_narrow = AcquireRefused(refusing::<BudgetManager>(&ids), &ids);
            let locked_refusing = AcquireRefused(refusing::<LockedBudgetManager>(&ids), &ids);
            let governor_refusing = keyed(&ids, Quota::per_hour(NonZeroU32::MIN));
            group(
                &settings,
                "acquire refused",
                1,
                agents,
                &[
                    ("lock-free (64-bit)", &refusing_narrow),
                    ("lock-free reserve admitted (64-bit)", &narrow_manager),
                    ("locked", &locked_refusing),
                    ("governor", &governor_refusing),
                ],
            );
        }
    }
    let ids = v4_ids(1);
    let wide_manager = Reserve(admitting::<BudgetManager>(&ids, Width::Wide), &ids);
    let narrow_manager = Reserve(
        admitting::<BudgetManager>(&ids, Width::Narrow { window_secs: 0 }),
        &ids,
    );
    let locked = Reserve(admitting::<LockedBudgetManager>(&ids, Width::Wide), &ids);
    let governor = keyed(&ids, Quota::per_second(NonZeroU32::MAX));
    for threads in [2, 8] {
        group(
            &settings,
            "hot agent",
            threads,
            1,
            &[
                ("lock-free (128-bit)", &wide_manager),
                ("lock-free (64-bit)", &narrow_manager),
                ("locked", &locked),
                ("governor", &governor),
            ],
        );
    }
}
