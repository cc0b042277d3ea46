//! Many threads on both managers: exact admission, no lost update, no panic.
//!
//! These see only the interleavings two cores happen to produce; the loom
//! models in `loom-tests/` see all of them for small cases.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Barrier;
use std::thread;

use agent_budget::{AgentId, BudgetLimiter, Settlement};
use common::{agent, limit};

const HOUR: u64 = 3600;

fn real<M: BudgetLimiter>() -> M {
    M::with_clock(quanta::Clock::new())
}

/// Runs `work(thread_index)` on `threads` threads started together and
/// returns the sum of what they return.
fn together(threads: usize, work: impl Fn(usize) -> u64 + Sync) -> u64 {
    let barrier = Barrier::new(threads);
    thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, work) = (&barrier, &work);
                s.spawn(move || {
                    barrier.wait();
                    work(t)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    })
}

/// Reads `agent` until `done`, asserting the limits hold at every moment.
fn watch<M: BudgetLimiter>(m: &M, agent: &AgentId, tokens: u64, calls: u64, done: &AtomicBool) {
    while !done.load(Ordering::Acquire) {
        if let Some(full) = m.full_info(agent) {
            assert!(full.tokens_used <= tokens, "{full:?}");
            assert!(full.calls_used <= calls, "{full:?}");
        }
    }
}

for_both_managers! {
    fn a_hot_agent_admits_exactly_its_budget<M>() {
        for threads in [2, 4, 8] {
            let m: M = real();
            let a = agent();
            m.set_budget(limit(a, 20_000, u64::MAX, HOUR));
            let done = AtomicBool::new(false);
            let admitted = thread::scope(|s| {
                s.spawn(|| watch(&m, &a, 20_000, u64::MAX, &done));
                let admitted = together(threads, |_| {
                    let mut mine = 0;
                    while m.reserve(&a, 1).is_ok() {
                        mine += 1;
                    }
                    mine
                });
                done.store(true, Ordering::Release);
                admitted
            });
            assert_eq!(admitted, 20_000, "{threads} threads");
            assert_eq!(m.full_info(&a).unwrap().tokens_used, 20_000);
        }
    }
}

for_both_managers! {
    fn acquire_admits_exactly_what_both_budgets_allow<M>() {
        for threads in [2, 4, 8] {
            let m: M = real();
            let a = agent();
            // 3 tokens a call: tokens allow 10,000 acquires, calls 7,000.
            m.set_budget(limit(a, 30_000, 7_000, HOUR));
            let done = AtomicBool::new(false);
            let admitted = thread::scope(|s| {
                s.spawn(|| watch(&m, &a, 30_000, 7_000, &done));
                let admitted = together(threads, |_| {
                    let mut mine = 0;
                    while let Ok(r) = m.acquire(&a, 3, 1) {
                        mine += 1;
                        // Settling exactly what was reserved changes nothing.
                        assert!(matches!(r.settle(3), Settlement::Applied { refunded_tokens: 0, charged_tokens: 0, .. }));
                    }
                    mine
                });
                done.store(true, Ordering::Release);
                admitted
            });
            assert_eq!(admitted, 7_000, "{threads} threads");
            let full = m.full_info(&a).unwrap();
            assert_eq!((full.tokens_used, full.calls_used), (21_000, 7_000));
        }
    }
}

for_both_managers! {
    fn thousands_of_agents_each_admit_exactly_their_budget<M>() {
        const AGENTS: usize = 2_000;
        const BUDGET: u64 = 20;
        for threads in [2, 4, 8] {
            let m: M = real();
            let agents: Vec<AgentId> = (0..AGENTS).map(|_| agent()).collect();
            for a in &agents {
                m.set_budget(limit(*a, BUDGET, u64::MAX, HOUR));
            }
            let admitted = together(threads, |t| {
                let mut mine = 0;
                // Each thread walks the agents from its own offset, more
                // times than the budget needs.
                for round in 0..=BUDGET as usize {
                    for i in 0..AGENTS {
                        let a = &agents[(i * 7 + t * 500 + round) % AGENTS];
                        mine += u64::from(m.reserve(a, 1).is_ok());
                    }
                }
                mine
            });
            assert_eq!(admitted, AGENTS as u64 * BUDGET, "{threads} threads");
            for a in &agents {
                assert_eq!(m.remaining(a).tokens_remaining, 0);
            }
        }
    }
}

for_both_managers! {
    fn reserve_release_and_acquire_cancel_pairs_leave_usage_at_zero<M>() {
        let m: M = real();
        let a = agent();
        m.set_budget(limit(a, 1_000, 100, HOUR));
        together(4, |t| {
            for _ in 0..3_000 {
                if t % 2 == 0 {
                    if m.reserve(&a, 5).is_ok() {
                        m.release(&a, 5);
                    }
                } else if let Ok(r) = m.acquire(&a, 7, 1) {
                    assert!(matches!(r.cancel(), Settlement::Applied { .. }));
                }
            }
            0
        });
        let full = m.full_info(&a).unwrap();
        assert_eq!((full.tokens_used, full.calls_used), (0, 0));
    }
}

for_both_managers! {
    fn budget_churn_under_load_never_panics_or_over_admits<M>() {
        let m: M = real();
        let a = agent();
        let max_tokens = 100;
        m.set_budget(limit(a, max_tokens, 50, HOUR));
        let done = AtomicBool::new(false);
        thread::scope(|s| {
            s.spawn(|| watch(&m, &a, max_tokens, 50, &done));
            s.spawn(|| {
                for i in 0..2_000u64 {
                    match i % 4 {
                        0 => m.remove_budget(&a),
                        1 => m.set_budget(limit(a, max_tokens / 2, 25, HOUR)),
                        2 => m.reset_window(&a),
                        _ => m.set_budget(limit(a, max_tokens, 50, HOUR)),
                    }
                }
                done.store(true, Ordering::Release);
            });
            together(3, |_| {
                let mut outcomes = 0;
                while !done.load(Ordering::Acquire) {
                    let _ = m.reserve(&a, 3);
                    let _ = m.track_call(&a);
                    if let Ok(r) = m.acquire(&a, 4, 1) {
                        outcomes += u64::from(matches!(r.settle(2), Settlement::Applied { .. }));
                    }
                    let _ = m.remaining(&a);
                }
                outcomes
            });
        });
    }
}

/// A settle or cancel racing the window's end refunds into the window it was
/// taken in or not at all: the new window's usage never drops below what
/// was certainly acquired in it.
#[test]
fn cancels_racing_a_rollover_never_refund_into_the_new_window() {
    use agent_budget::BudgetManager;
    for _ in 0..20 {
        let (clock, mock) = quanta::Clock::mock();
        let m = BudgetManager::with_clock(clock);
        let a = agent();
        m.set_budget(limit(a, 1_000_000, 1_000_000, 10));
        let old: Vec<_> = (0..2_000).map(|_| m.acquire(&a, 10, 1).unwrap()).collect();
        let advanced = AtomicBool::new(false);
        let (certain, uncertain) = (AtomicU64::new(0), AtomicU64::new(0));
        let mut reservations = old.into_iter();
        let first_half: Vec<_> = reservations.by_ref().take(1_000).collect();
        let second_half: Vec<_> = reservations.collect();
        thread::scope(|s| {
            for half in [first_half, second_half] {
                s.spawn(move || {
                    for r in half {
                        assert_ne!(r.cancel(), Settlement::AgentRemoved);
                    }
                });
            }
            s.spawn(|| {
                for _ in 0..2_000 {
                    let after_advance = advanced.load(Ordering::Acquire);
                    let r = m.acquire(&a, 10, 1).unwrap();
                    let counter = if after_advance { &certain } else { &uncertain };
                    counter.fetch_add(1, Ordering::Relaxed);
                    drop(r); // a dropped reservation stays charged
                }
            });
            thread::yield_now();
            mock.increment(std::time::Duration::from_secs(10));
            advanced.store(true, Ordering::Release);
        });
        let used = m.full_info(&a).unwrap().tokens_used;
        let (certain, uncertain) = (certain.into_inner(), uncertain.into_inner());
        assert!(
            used >= certain * 10,
            "refunded into the new window: {used} < {}",
            certain * 10
        );
        assert!(used <= (certain + uncertain) * 10);
    }
}

// ---------------------------------------------------------------------------
// Chains of budgets under load

/// Reads every level of each leaf's chain until `done`, asserting that no
/// level is ever over its limit (nobody here settles more than it reserved).
/// Returns how many chains it read.
fn watch_chains<M: BudgetLimiter>(
    m: &M,
    leaves: &[AgentId],
    levels: usize,
    done: &AtomicBool,
) -> u64 {
    let mut reads = 0;
    // At least one pass, even if the hammering ended before this thread
    // was first scheduled (two cores, eight threads).
    loop {
        let finished = done.load(Ordering::Acquire);
        for leaf in leaves {
            let chain = m.chain_info(leaf);
            assert_eq!(chain.len(), levels, "{chain:?}");
            for level in &chain {
                assert!(level.tokens_used <= level.token_limit, "{level:?}");
                assert!(level.calls_used <= level.calls_limit, "{level:?}");
            }
            reads += 1;
        }
        if finished {
            return reads;
        }
    }
}

/// Tokens and calls an agent kept, as counted by the threads that kept them.
type Kept = (AtomicU64, AtomicU64);

/// From `threads` threads, `rounds` times each: acquires on one of `leaves`,
/// then settles for less than reserved, cancels or drops, in turn. Counts
/// what each leaf kept in `kept`, and returns how many refusals came from
/// a level above the leaf.
fn hammer<M: BudgetLimiter>(
    m: &M,
    leaves: &[AgentId],
    threads: usize,
    rounds: usize,
    kept: &[Kept],
) -> u64 {
    together(threads, |t| {
        let mut refused_above = 0;
        for i in 0..rounds {
            let which = (t + i) % leaves.len();
            let leaf = &leaves[which];
            let tokens = 1 + (i as u64 * 7 + t as u64) % 9;
            match m.acquire(leaf, tokens, 1) {
                Ok(r) => {
                    let (tokens, calls) = match i % 3 {
                        0 => {
                            let used = tokens / 2;
                            assert!(matches!(r.settle(used), Settlement::Applied { .. }));
                            (used, 1)
                        }
                        1 => {
                            assert!(matches!(r.cancel(), Settlement::Applied { .. }));
                            (0, 0)
                        }
                        _ => {
                            drop(r); // stays charged
                            (tokens, 1)
                        }
                    };
                    kept[which].0.fetch_add(tokens, Ordering::Relaxed);
                    kept[which].1.fetch_add(calls, Ordering::Relaxed);
                }
                Err(e) => refused_above += u64::from(e.refused_by != *leaf),
            }
        }
        refused_above
    })
}

fn kept(k: &Kept) -> (u64, u64) {
    (k.0.load(Ordering::Relaxed), k.1.load(Ordering::Relaxed))
}

fn used<M: BudgetLimiter>(m: &M, a: &AgentId) -> (u64, u64) {
    let info = m.full_info(a).unwrap();
    (info.tokens_used, info.calls_used)
}

for_both_managers! {
    fn children_of_one_parent_never_overrun_it_and_keep_exactly_what_they_kept<M>() {
        const CHILDREN: usize = 4;
        const ROUNDS: usize = 3_000;
        for threads in [2, 4, 8] {
            let m: M = real();
            let parent = agent();
            // Calls bind here: the children together could make more than
            // the parent allows.
            m.set_budget(limit(parent, 3_000, 600, HOUR));
            let children: Vec<AgentId> = (0..CHILDREN).map(|_| agent()).collect();
            for child in &children {
                m.set_budget(limit(*child, 1_000, 200, HOUR));
                m.set_parent(child, Some(&parent)).unwrap();
            }
            let kept_by: Vec<Kept> = (0..CHILDREN).map(|_| Default::default()).collect();
            let done = AtomicBool::new(false);
            let (refused_above, reads) = thread::scope(|s| {
                let watcher = s.spawn(|| watch_chains(&m, &children, 2, &done));
                let refused_above = hammer(&m, &children, threads, ROUNDS, &kept_by);
                done.store(true, Ordering::Release);
                (refused_above, watcher.join().unwrap())
            });
            assert!(reads > 0, "{threads} threads: the watcher never read");
            assert!(refused_above > 0, "{threads} threads: the parent never refused");
            let mut total = (0, 0);
            for (child, k) in children.iter().zip(&kept_by) {
                assert_eq!(used(&m, child), kept(k), "{threads} threads");
                total = (total.0 + kept(k).0, total.1 + kept(k).1);
            }
            assert_eq!(used(&m, &parent), total, "{threads} threads");
        }
    }
}

for_both_managers! {
    fn keys_under_teams_under_an_org_never_overrun_any_level<M>() {
        const ROUNDS: usize = 3_000;
        for threads in [2, 4, 8] {
            let m: M = real();
            let org = agent();
            let teams = [agent(), agent()];
            // Two keys per team: keys[2 * team + n].
            let keys: Vec<AgentId> = (0..4).map(|_| agent()).collect();
            // Tokens bind here (calls are plenty): the teams together could
            // take more than the org allows, and each team's keys more than
            // the team.
            m.set_budget(limit(org, 2_000, 100_000, HOUR));
            for team in &teams {
                m.set_budget(limit(*team, 1_500, 50_000, HOUR));
                m.set_parent(team, Some(&org)).unwrap();
            }
            for (n, key) in keys.iter().enumerate() {
                m.set_budget(limit(*key, 1_000, 20_000, HOUR));
                m.set_parent(key, Some(&teams[n / 2])).unwrap();
            }
            let kept_by: Vec<Kept> = (0..keys.len()).map(|_| Default::default()).collect();
            let done = AtomicBool::new(false);
            let (refused_above, reads) = thread::scope(|s| {
                let watcher = s.spawn(|| watch_chains(&m, &keys, 3, &done));
                let refused_above = hammer(&m, &keys, threads, ROUNDS, &kept_by);
                done.store(true, Ordering::Release);
                (refused_above, watcher.join().unwrap())
            });
            assert!(reads > 0, "{threads} threads: the watcher never read");
            assert!(refused_above > 0, "{threads} threads: no level above a key refused");
            let per_key: Vec<(u64, u64)> = kept_by.iter().map(kept).collect();
            for (key, k) in keys.iter().zip(&per_key) {
                assert_eq!(used(&m, key), *k, "{threads} threads");
            }
            let sum = |ks: &[(u64, u64)]| ks.iter().fold((0, 0), |acc, k| (acc.0 + k.0, acc.1 + k.1));
            for (n, team) in teams.iter().enumerate() {
                assert_eq!(used(&m, team), sum(&per_key[2 * n..2 * n + 2]), "{threads} threads");
            }
            assert_eq!(used(&m, &org), sum(&per_key), "{threads} threads");
        }
    }
}
