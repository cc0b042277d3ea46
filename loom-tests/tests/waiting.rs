//! Every interleaving (up to `LOOM_MAX_PREEMPTIONS`) of the waiter
//! protocol: registering, being woken by a refund, racing direct acquires,
//! and being dropped.
//!
//! A waiting future runs under `loom::future::block_on`, which parks its
//! thread until the future's waker is called: a lost wake-up leaves every
//! thread parked, and loom reports that execution as a deadlock. Under loom
//! there is no window-end timer, so only the refunds in the model can wake
//! a waiter.
#![cfg(agent_budget_loom)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use agent_budget::{BudgetManager, ClockSource};
use loom::future::block_on;
use loom::thread;
use loom_tests::{explore, explore_capped, limit, AGENT};

/// A manager with [`AGENT`]'s budget set, in the `Arc` the owned API needs.
fn manager(tokens: u64) -> Arc<BudgetManager> {
    let m = BudgetManager::with_clock(ClockSource::mock());
    m.set_budget(limit(tokens, 10, 60));
    Arc::new(m)
}

/// Polls a future once with a waker that does nothing: it registers (if it
/// has to wait) and returns.
fn poll_once<F: Future + ?Sized>(future: Pin<&mut F>) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(Waker::noop()))
}

#[test]
fn a_refund_racing_a_registration_always_wakes_the_waiter() {
    explore("cancel vs acquire_wait", || {
        let m = manager(1);
        let held = m.acquire_owned(&AGENT, 1, 1).unwrap();
        let cancel = thread::spawn(move || held.cancel());
        let waited = block_on(m.acquire_wait(&AGENT, 1, 1));
        cancel.join().unwrap();
        let got = waited.expect("the cancel made room");
        assert_eq!(got.tokens(), 1);
        assert_eq!(m.waiting(), 0);
    });
}

/// Capped at 4 preemptions: 957,000 interleavings in 38 s on the CI
/// machine; at 5 it is 10.9 million in 7.5 minutes.
#[test]
fn a_woken_waiter_that_loses_to_a_direct_acquire_waits_again() {
    explore_capped("cancel vs acquire (then cancel) vs acquire_wait", 4, || {
        let m = manager(1);
        let held = m.acquire_owned(&AGENT, 1, 1).unwrap();
        let cancel = thread::spawn(move || held.cancel());
        let thief = {
            let m = m.clone();
            // Takes the budget if it can, and gives it back: either way the
            // waiter must end admitted, never refused.
            thread::spawn(move || {
                if let Ok(stolen) = m.acquire_owned(&AGENT, 1, 1) {
                    stolen.cancel();
                }
            })
        };
        let waited = block_on(m.acquire_wait(&AGENT, 1, 1));
        cancel.join().unwrap();
        thief.join().unwrap();
        let _admitted = waited.expect("woken and admitted in the end, never refused");
        assert_eq!(m.waiting(), 0);
    });
}

/// Capped at 4 preemptions: 228,000 interleavings in 10 s on the CI
/// machine; at 5 it is 1.4 million in 60 s.
#[test]
fn a_dropped_waiter_does_not_swallow_the_wake_another_needed() {
    explore_capped("cancel vs drop(woken waiter) vs acquire_wait", 4, || {
        let m = manager(2);
        let first = m.acquire_owned(&AGENT, 1, 1).unwrap();
        let _second = m.acquire_owned(&AGENT, 1, 1).unwrap();
        // At the head, a waiter no refund of one token can pay for; behind
        // it, one that a refund can (and that will be dropped), then the
        // one that must get the token in the end.
        let mut head = Box::pin(m.acquire_owned_wait(&AGENT, 2, 1));
        assert!(poll_once(head.as_mut()).is_pending());
        let mut dropped = Box::pin(m.acquire_owned_wait(&AGENT, 1, 1));
        assert!(poll_once(dropped.as_mut()).is_pending());
        let cancel = thread::spawn(move || first.cancel());
        let drop_it = thread::spawn(move || drop(dropped));
        let waited = block_on(m.acquire_wait(&AGENT, 1, 1));
        cancel.join().unwrap();
        drop_it.join().unwrap();
        let _admitted = waited.expect("the token the dropped waiter did not take");
        drop(head);
        assert_eq!(m.waiting(), 0);
    });
}
