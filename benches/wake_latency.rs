//! How long a waiting request takes to resume once budget comes back.
//!
//! A task waits in `acquire_owned_wait` on an agent whose budget is spent;
//! the bench cancels the reservation that holds it and measures the time
//! from just before the cancel to the first instruction of the waiter after
//! its `.await`. On a two-worker tokio runtime the waiter may resume on the
//! other worker (a cross-thread wake) or on the cancelling one.
//!
//! For contrast it measures, the same way, the wait a caller has without
//! waiting support: sleeping on `retry_after` and retrying, as governor's
//! `until_ready` does. With a window of 60 s that caller would sleep for
//! the whole window; the bench gives it the shortest useful poll, 1 ms, to
//! show the floor of polling.
//!
//! `cargo bench --bench wake_latency` (prints p50 / p99 / p99.9 / max).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_budget::{BudgetLimit, BudgetLimiter, BudgetManager, LockedBudgetManager};
use hdrhistogram::Histogram;

const ROUNDS: u64 = 20_000;
const POLL_ROUNDS: u64 = 500;

fn budget(agent_id: agent_budget::AgentId) -> BudgetLimit {
    BudgetLimit {
        agent_id,
        token_budget: 100,
        calls_budget: 1_000_000,
        window_secs: 60,
    }
}

/// One round: a spent budget, a waiter, a cancel; returns the nanoseconds
/// from the cancel to the waiter's resumption.
async fn woken_by_cancel<M: BudgetLimiter + 'static>(
    m: &Arc<M>,
    agent: agent_budget::AgentId,
) -> u64 {
    let held = m.acquire_owned(&agent, 100, 1).expect("the budget is free");
    let waiting = m.acquire_owned_wait(&agent, 100, 1);
    let waiter = tokio::spawn(async move {
        let reservation = waiting.await.expect("fits after the cancel");
        let resumed = Instant::now();
        reservation.cancel();
        resumed
    });
    // Bounded: the waiter queues itself within a few turns.
    for _ in 0..1_000_000 {
        if m.waiting() == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(m.waiting(), 1, "the waiter never queued");
    let cancelled = Instant::now();
    held.cancel();
    let resumed = waiter.await.expect("the waiter does not panic");
    resumed.saturating_duration_since(cancelled).as_nanos() as u64
}

/// The same round for a caller that sleeps `poll` and retries.
async fn found_by_polling<M: BudgetLimiter + 'static>(
    m: &Arc<M>,
    agent: agent_budget::AgentId,
    poll: Duration,
) -> u64 {
    let held = m.acquire_owned(&agent, 100, 1).expect("the budget is free");
    let started = Arc::new(AtomicBool::new(false));
    let poller = {
        let (m, started) = (m.clone(), started.clone());
        tokio::spawn(async move {
            started.store(true, Ordering::SeqCst);
            loop {
                if let Ok(reservation) = m.acquire_owned(&agent, 100, 1) {
                    let resumed = Instant::now();
                    reservation.cancel();
                    return resumed;
                }
                tokio::time::sleep(poll).await;
            }
        })
    };
    while !started.load(Ordering::SeqCst) {
        tokio::task::yield_now().await;
    }
    // Let the poller fall asleep at a random point of its period.
    tokio::time::sleep(poll / 3).await;
    let cancelled = Instant::now();
    held.cancel();
    let resumed = poller.await.expect("the poller does not panic");
    resumed.saturating_duration_since(cancelled).as_nanos() as u64
}

fn report(name: &str, histogram: &Histogram<u64>) {
    let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1_000.0;
    println!(
        "{name:<40} p50 {:>8.1} µs   p99 {:>8.1} µs   p99.9 {:>8.1} µs   max {:>8.1} µs   ({} rounds)",
        us(0.5),
        us(0.99),
        us(0.999),
        histogram.max() as f64 / 1_000.0,
        histogram.len()
    );
}

fn measure<M: BudgetLimiter + 'static>(name: &str, runtime: &tokio::runtime::Runtime) {
    let m = Arc::new(M::with_clock(quanta::Clock::new()));
    let agent = uuid::Uuid::new_v4();
    m.set_budget(budget(agent));
    let mut woken = Histogram::<u64>::new(3).expect("valid precision");
    let mut polled = Histogram::<u64>::new(3).expect("valid precision");
    runtime.block_on(async {
        for _ in 0..ROUNDS {
            woken
                .record(woken_by_cancel(&m, agent).await)
                .expect("in range");
        }
        for _ in 0..POLL_ROUNDS {
            polled
                .record(found_by_polling(&m, agent, Duration::from_millis(1)).await)
                .expect("in range");
        }
    });
    report(&format!("{name}: acquire_owned_wait, woken"), &woken);
    report(&format!("{name}: sleep 1 ms and retry"), &polled);
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // and only wants to see that this runs.
    let quick = !std::env::args().any(|a| a == "--bench");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if quick {
        let m = Arc::new(BudgetManager::new());
        let agent = uuid::Uuid::new_v4();
        m.set_budget(budget(agent));
        runtime.block_on(woken_by_cancel(&m, agent));
        return;
    }
    println!(
        "wake-up latency: cancel -> waiter resumes ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    measure::<BudgetManager>("lock-free", &runtime);
    measure::<LockedBudgetManager>("locked", &runtime);
}
