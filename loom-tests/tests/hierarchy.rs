//! Every interleaving (up to `LOOM_MAX_PREEMPTIONS`) of requests racing on
//! a chain of budgets, and on a refilling bucket: no level is ever
//! over-admitted, and nothing stays taken at any level after a refusal.
#![cfg(agent_budget_loom)]

use std::time::Duration;

use agent_budget::{AgentId, BudgetManager, ClockSource, RefillLimit};
use loom::sync::Arc;
use loom::thread;
use loom_tests::{explore, window};

const PARENT: AgentId = AgentId::from_u128(0x9a);
const LEFT: AgentId = AgentId::from_u128(0x1e);
const RIGHT: AgentId = AgentId::from_u128(0x21);

fn used(m: &BudgetManager, agent: &AgentId) -> u64 {
    m.full_info(agent).expect("configured").tokens_used
}

/// Reads `agent` on another thread, asserting its limit holds at that
/// moment, whatever the racing requests are doing.
fn watch(m: &Arc<BudgetManager>, agent: AgentId, limit: u64) -> thread::JoinHandle<()> {
    let m = m.clone();
    thread::spawn(move || {
        let info = m.full_info(&agent).expect("configured");
        assert!(info.tokens_used <= limit, "{info:?} over {limit}");
    })
}

/// Reserves `tokens` for `agent` on another thread; whether it was taken.
fn reserve(m: &Arc<BudgetManager>, agent: AgentId, tokens: u64) -> thread::JoinHandle<bool> {
    let m = m.clone();
    thread::spawn(move || m.reserve(&agent, tokens).is_ok())
}

#[test]
fn two_children_racing_at_their_parents_limit_never_over_admit_it() {
    explore("two children's reserve(2) vs a reader, parent of 3", || {
        let m = BudgetManager::with_clock(ClockSource::mock());
        m.set_budget(window(PARENT, 3));
        for child in [LEFT, RIGHT] {
            m.set_budget(window(child, 10));
            m.set_parent(&child, Some(&PARENT)).unwrap();
        }
        let m = Arc::new(m);
        let left = reserve(&m, LEFT, 2);
        let right = reserve(&m, RIGHT, 2);
        let watcher = watch(&m, PARENT, 3);
        let (left, right) = (left.join().unwrap(), right.join().unwrap());
        watcher.join().unwrap();
        // Either fits alone; together they would take 4 of the parent's 3.
        assert!(left || right, "one of them fits");
        assert!(
            !(left && right),
            "the parent's limit of 3 was over-admitted"
        );
        // A refused child keeps nothing, at its own level or the parent's.
        assert_eq!(used(&m, &LEFT), if left { 2 } else { 0 });
        assert_eq!(used(&m, &RIGHT), if right { 2 } else { 0 });
        assert_eq!(used(&m, &PARENT), 2);
    });
}

#[test]
fn a_child_and_its_parent_racing_at_both_limits_never_over_admit() {
    explore(
        "child reserve(1) vs parent reserve(2) vs a reader, limits 2 and 3",
        || {
            let m = BudgetManager::with_clock(ClockSource::mock());
            m.set_budget(window(PARENT, 3));
            m.set_budget(window(LEFT, 2));
            m.set_parent(&LEFT, Some(&PARENT)).unwrap();
            m.reserve(&LEFT, 1).unwrap(); // one in use at both levels
            let m = Arc::new(m);
            // The child's request takes its last token and one of the parent's
            // two left; the parent's own request needs both of those.
            let child = reserve(&m, LEFT, 1);
            let parent = reserve(&m, PARENT, 2);
            let watcher = watch(&m, PARENT, 3);
            let (child, parent) = (child.join().unwrap(), parent.join().unwrap());
            watcher.join().unwrap();
            assert!(child != parent, "exactly one of them fits");
            assert!(used(&m, &LEFT) <= 2, "the child's limit was over-admitted");
            assert!(
                used(&m, &PARENT) <= 3,
                "the parent's limit was over-admitted"
            );
            assert_eq!(used(&m, &LEFT), 1 + u64::from(child));
            assert_eq!(
                used(&m, &PARENT),
                1 + u64::from(child) + 2 * u64::from(parent)
            );
        },
    );
}

#[test]
fn a_bucket_refilling_under_racing_reserves_admits_only_what_came_back() {
    explore("clock advance vs reserve(1) x2 on a drained bucket", || {
        let clock = ClockSource::mock();
        let m = BudgetManager::with_clock(clock.clone());
        // Three tokens a second: 1.5 refilled in 500 ms, of which one whole.
        m.set_refill(RefillLimit {
            agent_id: PARENT,
            token_budget: 3,
            calls_budget: 10,
            refill_period: Duration::from_secs(1),
        });
        m.reserve(&PARENT, 3).unwrap();
        let m = Arc::new(m);
        let advance = thread::spawn(move || clock.advance(Duration::from_millis(500)));
        let first = reserve(&m, PARENT, 1);
        let second = reserve(&m, PARENT, 1);
        advance.join().unwrap();
        let admitted = u64::from(first.join().unwrap()) + u64::from(second.join().unwrap());
        // One token came back; nothing else can be admitted.
        assert!(admitted <= 1, "admitted {admitted} with one token refilled");
        let info = m.full_info(&PARENT).unwrap();
        assert_eq!(info.tokens_remaining, 1 - admitted);
    });
}
