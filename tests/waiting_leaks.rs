//! A million dropped waits leave the manager as it was: no waiter, no
//! budget taken, and no memory held.
//!
//! A test binary of its own, because it counts every byte the process
//! allocates: another test running beside it
//! would be counted too.
#![cfg(feature = "async")]

mod common;

use std::alloc::System;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Waker};

use agent_budget::{BudgetLimiter, BudgetManager, LockedBudgetManager};
use common::{agent, limit, mocked};
use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static ALLOCATOR: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes allocated and not yet freed, process-wide.
fn live_bytes() -> isize {
    let stats = ALLOCATOR.stats();
    stats.bytes_allocated as isize - stats.bytes_deallocated as isize + stats.bytes_reallocated
}

const DROPPED_WAITS: usize = 1_000_000;
/// What the map's deferred reclamation may hold at any moment: measured to
/// swing within ±16 KiB whatever the number of waits.
const GARBAGE_IN_FLIGHT: isize = 64 * 1024;

fn a_million_dropped_waits_leave_nothing_behind<M: BudgetLimiter>() {
    let (m, _) = mocked::<M>();
    // Many agents, so that a queue left behind per agent would show too,
    // and one more to warm up on.
    let agents: Vec<_> = (0..1_001).map(|_| agent()).collect();
    for a in &agents {
        m.set_budget(limit(*a, 100, 10, 60));
        let _spent = m.acquire(a, 100, 1).unwrap();
    }
    let before = (m.all_full_info().len(), m.waiting());
    let mut cx = Context::from_waker(Waker::noop());
    // Warm up once: tokio's timer wheel and thread-locals allocate on first
    // use and keep what they allocated.
    let mut pending = 0;
    for round in 0..2 {
        let live = live_bytes();
        let count = if round == 0 { 1_000 } else { DROPPED_WAITS };
        for i in 0..count {
            let a = match round {
                0 => &agents[1_000],
                _ => &agents[i % 1_000],
            };
            let mut waiting = pin!(m.acquire_wait(a, 1 + (i % 50) as u64, 1));
            pending += usize::from(waiting.as_mut().poll(&mut cx).is_pending());
        }
        if round == 1 {
            // papaya frees removed entries in batches (seize), so a few KiB
            // may be waiting to be freed at any moment; a leak of even one
            // small allocation per wait, or per agent, would be far more.
            let grown = live_bytes() - live;
            assert!(
                grown <= GARBAGE_IN_FLIGHT,
                "{count} dropped waits left {grown} bytes allocated"
            );
        }
    }
    assert_eq!(
        pending,
        1_000 + DROPPED_WAITS,
        "every wait was pending when dropped"
    );
    assert_eq!((m.all_full_info().len(), m.waiting()), before);
    for a in &agents {
        let info = m.full_info(a).unwrap();
        assert_eq!(
            (info.tokens_used, info.calls_used),
            (100, 1),
            "nothing taken"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_million_dropped_waits_on_either_manager_leave_nothing_behind() {
    a_million_dropped_waits_leave_nothing_behind::<BudgetManager>();
    a_million_dropped_waits_leave_nothing_behind::<LockedBudgetManager>();
}
