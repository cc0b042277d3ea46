//! Harness for the loom models of `agent-budget`.
//!
//! Built only with `RUSTFLAGS="--cfg agent_budget_loom"`, in which the
//! library routes every atomic, `Arc`, limit snapshot, clock read and map
//! access of its lock-free manager through loom (see the library's `sync`
//! module). Without that flag this crate is empty. The models themselves
//! are in `tests/`; run them with the command in the README.
#![cfg(agent_budget_loom)]

use std::sync::atomic::{AtomicUsize, Ordering as StdOrdering};

use agent_budget::{AgentId, BudgetLimit};
use loom::sync::atomic::{AtomicU64, Ordering};

/// The agent every model works on.
pub const AGENT: AgentId = AgentId::from_u128(0xa9e7);

/// A budget for [`AGENT`].
pub fn limit(tokens: u64, calls: u64, window_secs: u64) -> BudgetLimit {
    BudgetLimit {
        agent_id: AGENT,
        token_budget: tokens,
        calls_budget: calls,
        window_secs,
    }
}

/// A budget of `tokens` tokens and 10 calls a minute for `agent_id`.
pub fn window(agent_id: AgentId, tokens: u64) -> BudgetLimit {
    BudgetLimit {
        agent_id,
        token_budget: tokens,
        calls_budget: 10,
        window_secs: 60,
    }
}

/// Runs `model` under loom and prints how many executions (interleavings,
/// up to the preemption bound) it explored.
pub fn explore(name: &str, model: impl Fn() + Sync + Send + 'static) {
    run(name, loom::model::Builder::new(), model);
}

/// [`explore`] with at most `cap` preemptions, whatever
/// `LOOM_MAX_PREEMPTIONS` says: for the models whose state space at the
/// suite's bound would take too long for CI. Each use says what it costs
/// at the higher bound.
pub fn explore_capped(name: &str, cap: usize, model: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(builder.preemption_bound.map_or(cap, |b| b.min(cap)));
    run(name, builder, model);
}

fn run(name: &str, builder: loom::model::Builder, model: impl Fn() + Sync + Send + 'static) {
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    let before = EXECUTIONS.load(StdOrdering::Relaxed);
    let started = std::time::Instant::now();
    builder.check(move || {
        EXECUTIONS.fetch_add(1, StdOrdering::Relaxed);
        model();
    });
    // Tests run one at a time (`--test-threads=1`), so the difference is
    // this model's count.
    let explored = EXECUTIONS.load(StdOrdering::Relaxed) - before;
    println!(
        "loom model {name}: {explored} interleavings in {:.1?}",
        started.elapsed()
    );
}

/// Something that admits tokens against a limit: the real manager, or the
/// canary below. The over-reservation models are written once against it.
pub trait Admit: Send + Sync + 'static {
    /// Takes `tokens` if they fit; whether they were taken.
    fn admit(&self, tokens: u64) -> bool;
    /// Tokens used so far.
    fn used(&self) -> u64;
}

impl Admit for agent_budget::BudgetManager {
    fn admit(&self, tokens: u64) -> bool {
        self.reserve(&AGENT, tokens).is_ok()
    }

    fn used(&self) -> u64 {
        self.full_info(&AGENT).map_or(0, |info| info.tokens_used)
    }
}

/// The canary: a budget cell with the classic check-then-act race. It loads
/// the usage, checks the limit, then *stores* the sum instead of
/// compare-and-swapping it, so two threads can both pass the check. Its
/// test asserts that loom finds that interleaving, which proves the
/// harness can fail.
pub struct RacyCell {
    used: AtomicU64,
    limit: u64,
}

impl RacyCell {
    /// An empty cell admitting up to `limit` tokens.
    pub fn new(limit: u64) -> Self {
        RacyCell {
            used: AtomicU64::new(0),
            limit,
        }
    }
}

impl Admit for RacyCell {
    fn admit(&self, tokens: u64) -> bool {
        let used = self.used.load(Ordering::SeqCst);
        if used + tokens > self.limit {
            return false;
        }
        self.used.store(used + tokens, Ordering::SeqCst);
        true
    }

    fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }
}

/// The over-reservation model: `threads` threads each admit `tokens` once
/// against `cell`, whose limit is `limit`. Asserts that at most `limit`
/// tokens were admitted and that the usage is exactly what was admitted.
pub fn concurrent_admissions<C: Admit>(cell: C, limit: u64, threads: usize, tokens: u64) {
    let cell = loom::sync::Arc::new(cell);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let cell = cell.clone();
            loom::thread::spawn(move || if cell.admit(tokens) { tokens } else { 0 })
        })
        .collect();
    let admitted: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(admitted <= limit, "admitted {admitted} > limit {limit}");
    assert_eq!(
        cell.used(),
        admitted,
        "usage differs from what was admitted"
    );
}
