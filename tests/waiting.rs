//! Owned reservations and waiting for budget, on a real tokio runtime.
//!
//! Most tests run on a current-thread runtime with tokio's clock paused and
//! the managers on a quanta mock clock: the test moves both clocks by hand,
//! so "the window ended" happens exactly when the test says. Every wait is
//! bounded, by a count of turns or by a (virtual) timeout, so a lost
//! wake-up fails a test with a message instead of hanging it.
#![cfg(feature = "async")]

mod common;

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use agent_budget::{BudgetKind, BudgetLimiter, OwnedReservation, Settlement};
use common::{agent, limit, mocked, MockTime};

const WINDOW_SECS: u64 = 60;
const WINDOW: Duration = Duration::from_secs(WINDOW_SECS);

/// A manager in an `Arc` on a mock clock.
fn shared<M: BudgetLimiter>() -> (Arc<M>, MockTime) {
    let (m, time) = mocked::<M>();
    (Arc::new(m), time)
}

/// Yields to the runtime until `done()` holds, for a bounded number of
/// turns.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("gave up waiting until {what}");
}

/// Lets every runnable task run for a while, without moving any clock.
async fn settle_down() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

/// Awaits `f` for at most `limit` of tokio's (paused, virtual) time.
async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {limit:?}"))
}

/// Moves the managers' mock clock and tokio's paused clock together. Tokio
/// gets a millisecond more: its timer wheel rounds deadlines up to the next
/// millisecond.
async fn advance(time: &MockTime, by: Duration) {
    time.advance(by);
    tokio::time::advance(by + Duration::from_millis(1)).await;
}

/// Polls `future` once, with a waker that does nothing.
fn poll_once<F: Future>(future: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(Waker::noop()))
}

fn spawn_wait<M: BudgetLimiter + 'static>(
    m: &Arc<M>,
    agent_id: agent_budget::AgentId,
    tokens: u64,
    calls: u64,
) -> tokio::task::JoinHandle<Result<OwnedReservation, agent_budget::Refused>> {
    tokio::spawn(m.acquire_owned_wait(&agent_id, tokens, calls))
}

#[test]
fn owned_reservations_and_their_futures_can_go_anywhere() {
    fn send_sync_static<T: Send + Sync + 'static>() {}
    fn send_static<T: Send + 'static>(_: &T) {}
    send_sync_static::<OwnedReservation>();
    let m = Arc::new(agent_budget::BudgetManager::new());
    send_static(&m.acquire_owned_wait(&agent(), 1, 1));
    let m = Arc::new(agent_budget::LockedBudgetManager::new());
    send_static(&m.acquire_owned_wait(&agent(), 1, 1));
}

mod owned {
    use super::*;

    async fn spawned_tasks_hold_reservations_across_awaits<M: BudgetLimiter + 'static>() {
        let m = Arc::new(M::with_clock(quanta::Clock::new()));
        let a = agent();
        m.set_budget(limit(a, 1_000, 100, 3_600));
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let reservation = m.acquire_owned(&a, 10, 1).unwrap();
                tokio::spawn(async move {
                    tokio::task::yield_now().await;
                    tokio::time::sleep(Duration::from_millis(i % 3)).await;
                    reservation.settle(4)
                })
            })
            .collect();
        for task in tasks {
            assert!(matches!(
                task.await.unwrap(),
                Settlement::Applied {
                    refunded_tokens: 6,
                    ..
                }
            ));
        }
        let info = m.full_info(&a).unwrap();
        assert_eq!((info.tokens_used, info.calls_used), (200, 50));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lock_free() {
        spawned_tasks_hold_reservations_across_awaits::<agent_budget::BudgetManager>().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn locked() {
        spawned_tasks_hold_reservations_across_awaits::<agent_budget::LockedBudgetManager>().await;
    }
}

for_both_managers_async! {
    async fn an_owned_reservation_keeps_its_manager_alive_and_behaves_as_a_borrowed_one<M>() {
        let (m, _) = shared::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 5, WINDOW_SECS));
        let owned = m.acquire_owned(&a, 80, 2).unwrap();
        assert_eq!((owned.agent_id(), owned.tokens(), owned.calls()), (a, 80, 2));
        let err = m.acquire_owned(&a, 30, 1).unwrap_err();
        assert_eq!(err.kind, BudgetKind::Token);
        let reader = m.clone();
        drop(m);
        assert_eq!(
            owned.settle(50),
            Settlement::Applied { refunded_tokens: 30, charged_tokens: 0, refunded_calls: 0 }
        );
        assert_eq!(reader.full_info(&a).unwrap().tokens_used, 50);
        let dropped = reader.acquire_owned(&a, 50, 3).unwrap();
        drop(dropped);
        assert!(reader.full_info(&a).unwrap().is_exhausted, "a dropped reservation stays charged");
    }
}

for_both_managers_async! {
    async fn a_cancel_wakes_a_waiter_long_before_the_window_ends<M>() {
        let (m, _time) = shared::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 10, WINDOW_SECS));
        let held = m.acquire_owned(&a, 100, 1).unwrap();
        let waiter = spawn_wait(&m, a, 60, 1);
        until("the waiter is queued", || m.waiting() == 1).await;
        // The managers' clock never moves in this test, so the window cannot
        // end: only the cancel can let the waiter in.
        held.cancel();
        let got = within(Duration::from_secs(1), "the woken waiter", waiter)
            .await
            .unwrap()
            .expect("fits after the cancel");
        assert_eq!((got.tokens(), got.calls()), (60, 1));
        assert_eq!(m.waiting(), 0);
        assert_eq!(m.full_info(&a).unwrap().tokens_used, 60);
    }
}

for_both_managers_async! {
    async fn a_settle_release_or_reset_wakes_a_waiter<M>() {
        let (m, _time) = shared::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 10, WINDOW_SECS));
        // A settle that refunds.
        let held = m.acquire_owned(&a, 100, 1).unwrap();
        let waiter = spawn_wait(&m, a, 50, 1);
        until("queued", || m.waiting() == 1).await;
        held.settle(40);
        let _admitted = within(Duration::from_secs(1), "woken by settle", waiter).await.unwrap().unwrap();
        // The seed's release.
        m.reserve(&a, 10).unwrap();
        let waiter = spawn_wait(&m, a, 5, 1);
        until("queued", || m.waiting() == 1).await;
        m.release(&a, 5);
        let _admitted = within(Duration::from_secs(1), "woken by release", waiter).await.unwrap().unwrap();
        // A manual reset.
        let waiter = spawn_wait(&m, a, 100, 1);
        until("queued", || m.waiting() == 1).await;
        m.reset_window(&a);
        let _admitted = within(Duration::from_secs(1), "woken by reset", waiter).await.unwrap().unwrap();
    }
}

for_both_managers_async! {
    async fn the_window_end_wakes_a_waiter_and_not_a_moment_before<M>() {
        let (m, time) = shared::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 10, WINDOW_SECS));
        let spent = m.acquire_owned(&a, 100, 1).unwrap();
        let waiter = spawn_wait(&m, a, 100, 1);
        until("queued", || m.waiting() == 1).await;
        advance(&time, WINDOW - Duration::from_secs(1)).await;
        settle_down().await;
        assert!(!waiter.is_finished(), "admitted before the window ended");
        advance(&time, Duration::from_secs(1)).await;
        let got = within(Duration::from_secs(1), "woken by the window end", waiter)
            .await
            .unwrap()
            .expect("fits in the fresh window");
        assert_eq!(got.tokens(), 100);
        // The old reservation's window is gone: its refund goes nowhere.
        assert_eq!(spent.cancel(), Settlement::WindowEnded);
    }
}

/// Once on the real clock, both managers side by side: a one-second window.
#[tokio::test]
async fn the_window_end_wakes_a_waiter_on_the_real_clock() {
    async fn case<M: BudgetLimiter>() -> Duration {
        let m = M::with_clock(quanta::Clock::new());
        let a = agent();
        m.set_budget(limit(a, 10, 1, 1));
        let _spent = m.acquire(&a, 0, 1).unwrap();
        let started = std::time::Instant::now();
        let got = tokio::time::timeout(Duration::from_secs(5), m.acquire_wait(&a, 0, 1))
            .await
            .expect("the window ends within a second")
            .expect("fits in the next window");
        drop(got);
        started.elapsed()
    }
    let (lock_free, locked) = tokio::join!(
        case::<agent_budget::BudgetManager>(),
        case::<agent_budget::LockedBudgetManager>()
    );
    for waited in [lock_free, locked] {
        // Not before the window's end (less the time to set it up), and
        // promptly after it.
        assert!(
            waited >= Duration::from_millis(900),
            "woken early: {waited:?}"
        );
        assert!(waited < Duration::from_secs(3), "woken late: {waited:?}");
    }
}

for_both_managers_async! {
    async fn two_hundred_waiters_get_exactly_the_budget_of_each_window<M>() {
        const CALLS_PER_WINDOW: usize = 10;
        const WAITERS: usize = 200;
        let (m, time) = shared::<M>();
        let a = agent();
        m.set_budget(limit(a, 1_000_000, CALLS_PER_WINDOW as u64, 1));
        let window = Arc::new(AtomicUsize::new(0));
        let per_window: Arc<Vec<AtomicUsize>> =
            Arc::new((0..WAITERS).map(|_| AtomicUsize::new(0)).collect());
        let tasks: Vec<_> = (0..WAITERS)
            .map(|_| {
                let (waiting, window, per_window) =
                    (m.acquire_owned_wait(&a, 1, 1), window.clone(), per_window.clone());
                tokio::spawn(async move {
                    let reservation = waiting.await.expect("every waiter fits some window");
                    per_window[window.load(Ordering::SeqCst)].fetch_add(1, Ordering::SeqCst);
                    drop(reservation); // stays charged
                })
            })
            .collect();
        let admitted = || per_window.iter().map(|n| n.load(Ordering::SeqCst)).sum::<usize>();
        for w in 0..WAITERS / CALLS_PER_WINDOW {
            until(&format!("window {w} admits its {CALLS_PER_WINDOW}"), || {
                admitted() == CALLS_PER_WINDOW * (w + 1)
            })
            .await;
            settle_down().await;
            assert_eq!(per_window[w].load(Ordering::SeqCst), CALLS_PER_WINDOW, "window {w}");
            assert_eq!(admitted(), CALLS_PER_WINDOW * (w + 1), "over-admitted in window {w}");
            assert_eq!(m.full_info(&a).unwrap().calls_used, CALLS_PER_WINDOW as u64);
            window.store(w + 1, Ordering::SeqCst);
            advance(&time, Duration::from_secs(1)).await;
        }
        for task in tasks {
            within(Duration::from_secs(1), "every waiter", task).await.unwrap();
        }
        assert_eq!(m.waiting(), 0);
    }
}

for_both_managers_async! {
    async fn a_request_that_can_never_fit_is_refused_at_once<M>() {
        let (m, _) = shared::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 1, WINDOW_SECS));
        let _half = m.acquire_owned(&a, 50, 0).unwrap();
        // Too many tokens or calls for any window; or short of tokens for
        // now but with more calls than the limit, which no wait can cure.
        for (tokens, calls, kind) in
            [(101, 1, BudgetKind::Token), (1, 2, BudgetKind::Call), (60, 2, BudgetKind::Call)]
        {
            let mut waiting = pin!(m.acquire_wait(&a, tokens, calls));
            let Poll::Ready(Err(refused)) = poll_once(waiting.as_mut()) else {
                panic!("({tokens}, {calls}) can never fit, yet it waits");
            };
            assert_eq!((refused.kind, refused.retry_after), (kind, None));
        }
        let mut unknown = pin!(m.acquire_wait(&agent(), 1, 1));
        let Poll::Ready(Err(refused)) = poll_once(unknown.as_mut()) else {
            panic!("an unknown agent's request waits");
        };
        assert!(refused.to_string().starts_with("No budget configured"), "{refused}");
        assert_eq!(m.waiting(), 0);
    }
}

for_both_managers_async! {
    async fn removing_the_budget_ends_the_wait_with_a_refusal<M>() {
        let (m, _) = shared::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 10, WINDOW_SECS));
        let _spent = m.acquire_owned(&a, 100, 1).unwrap();
        let waiter = spawn_wait(&m, a, 10, 1);
        until("queued", || m.waiting() == 1).await;
        m.remove_budget(&a);
        let refused = within(Duration::from_secs(1), "the removal", waiter)
            .await
            .unwrap()
            .expect_err("the agent is gone");
        assert_eq!(refused.retry_after, None);
        assert_eq!(m.waiting(), 0);

        // Removed and set again before the waiter runs: still a refusal, and
        // the new incarnation is untouched.
        m.set_budget(limit(a, 100, 10, WINDOW_SECS));
        let _spent = m.acquire_owned(&a, 100, 1).unwrap();
        let waiter = spawn_wait(&m, a, 10, 1);
        until("queued", || m.waiting() == 1).await;
        m.remove_budget(&a);
        m.set_budget(limit(a, 100, 10, WINDOW_SECS));
        within(Duration::from_secs(1), "the removal", waiter)
            .await
            .unwrap()
            .expect_err("the agent it waited on is gone");
        assert_eq!(m.full_info(&a).unwrap().tokens_used, 0);
    }
}

for_both_managers_async! {
    async fn a_new_limit_wakes_waiters_that_fit_it_and_refuses_those_that_never_will<M>() {
        let (m, _) = shared::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 10, WINDOW_SECS));
        let _spent = m.acquire_owned(&a, 100, 1).unwrap();
        let small = spawn_wait(&m, a, 50, 1);
        until("queued", || m.waiting() == 1).await;
        m.set_budget(limit(a, 150, 10, WINDOW_SECS));
        let _admitted = within(Duration::from_secs(1), "raised limit", small).await.unwrap().unwrap();
        let large = spawn_wait(&m, a, 120, 1);
        until("queued", || m.waiting() == 1).await;
        m.set_budget(limit(a, 100, 10, WINDOW_SECS));
        let refused = within(Duration::from_secs(1), "lowered limit", large)
            .await
            .unwrap()
            .expect_err("120 never fits a limit of 100");
        assert_eq!(refused.retry_after, None);
    }
}

for_both_managers_async! {
    async fn a_woken_waiter_that_loses_to_a_direct_acquire_waits_again<M>() {
        let (m, _) = shared::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 10, WINDOW_SECS));
        let held = m.acquire_owned(&a, 100, 1).unwrap();
        let waiter = spawn_wait(&m, a, 60, 1);
        until("queued", || m.waiting() == 1).await;
        // The cancel wakes the waiter, but this task runs on before it and
        // takes the budget first.
        held.cancel();
        let thief = m.acquire_owned(&a, 60, 1).expect("the budget is back");
        settle_down().await;
        assert!(!waiter.is_finished(), "the waiter was not refused, it waits");
        assert_eq!(m.waiting(), 1);
        thief.cancel();
        let _admitted = within(Duration::from_secs(1), "woken again", waiter).await.unwrap().unwrap();
    }
}

for_both_managers_async! {
    async fn a_dropped_waiter_passes_its_wake_on<M>() {
        let (m, _) = shared::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 10, WINDOW_SECS));
        let held = m.acquire_owned(&a, 60, 1).unwrap();
        let _rest = m.acquire_owned(&a, 40, 1).unwrap();
        // At the head, a request that no refund this window can pay for.
        let head = spawn_wait(&m, a, 100, 1);
        until("the head queued", || m.waiting() == 1).await;
        // The middle waiter is polled by hand, so it can be dropped between
        // its wake and its next poll.
        let mut middle = Box::pin(m.acquire_wait(&a, 60, 1));
        assert!(poll_once(middle.as_mut()).is_pending());
        let last = spawn_wait(&m, a, 60, 1);
        until("all queued", || m.waiting() == 3).await;
        held.cancel(); // 60 back: the middle waiter is woken, and only it
        settle_down().await;
        assert!(!last.is_finished());
        drop(middle);
        let _admitted = within(Duration::from_secs(1), "the last waiter", last).await.unwrap().unwrap();
        assert!(!head.is_finished());
        assert_eq!(m.waiting(), 1);
    }
}

for_both_managers_async! {
    async fn a_timeout_around_the_wait_leaves_nothing_behind<M>() {
        let (m, _) = shared::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 10, WINDOW_SECS));
        let _spent = m.acquire_owned(&a, 100, 1).unwrap();
        let before = m.full_info(&a);
        let timed_out = tokio::time::timeout(Duration::from_secs(5), m.acquire_wait(&a, 10, 1)).await;
        assert!(timed_out.is_err(), "the window lasts a minute");
        assert_eq!(m.waiting(), 0);
        assert_eq!(m.full_info(&a), before);
    }
}

for_both_managers_async! {
    /// What a waiter can expect: waiters are served oldest first at each
    /// window's end, and a refund too small for the oldest goes to a
    /// smaller request behind it. So small requests overtake a large one
    /// within a window, but not past the window's end.
    async fn a_large_waiter_is_overtaken_within_a_window_but_served_at_its_end<M>() {
        let (m, time) = shared::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 1_000, 1));
        let mut windows_waited = Vec::new();
        for round in 0..5 {
            let mut held: Vec<_> = (0..10).map(|_| m.acquire_owned(&a, 10, 1).unwrap()).collect();
            let large = spawn_wait(&m, a, 100, 1);
            until("the large request is queued", || m.waiting() == 1).await;
            let smalls: Vec<_> = (0..5).map(|_| spawn_wait(&m, a, 10, 1)).collect();
            until("the small requests are queued", || m.waiting() == 6).await;
            // 30 tokens come back: not enough for the large request at the
            // head, enough for three small ones behind it.
            for reservation in held.drain(..3) {
                reservation.cancel();
            }
            until("three small requests overtake", || m.waiting() == 3).await;
            settle_down().await;
            assert_eq!(smalls.iter().filter(|s| s.is_finished()).count(), 3, "round {round}");
            assert!(!large.is_finished(), "round {round}: 100 tokens do not fit in 30");
            // At the window's end the oldest waiter goes first.
            let mut waited = 0;
            while !large.is_finished() && waited < 5 {
                advance(&time, Duration::from_secs(1)).await;
                settle_down().await;
                waited += 1;
            }
            windows_waited.push(waited);
            let large = large.await.unwrap().unwrap();
            assert_eq!(m.waiting(), 2, "round {round}: the small ones wait for the next window");
            large.cancel();
            for small in smalls {
                let _admitted = within(Duration::from_secs(1), "the small ones", small).await.unwrap().unwrap();
            }
            advance(&time, Duration::from_secs(1)).await;
        }
        assert_eq!(windows_waited, [1; 5], "windows the large request waited, per round");
    }
}

mod under_real_threads {
    use super::*;

    /// Many tasks on two worker threads take turns on a budget of ten
    /// calls: each waits for one, holds it across an await, and cancels it.
    /// Every task must get through (a lost wake-up would leave one waiting
    /// until the timeout), and a watcher checks that the budget is never
    /// exceeded at any moment.
    async fn waiters_take_turns_without_loss_or_excess<M: BudgetLimiter + 'static>() {
        const TASKS: usize = 200;
        const TURNS: usize = 20;
        let (m, _time) = shared::<M>();
        let a = agent();
        m.set_budget(limit(a, 1_000, 10, WINDOW_SECS));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (m, done) = (m.clone(), done.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                // At least one read, however late this thread is scheduled
                // on a busy machine.
                loop {
                    let finished = done.load(Ordering::Acquire);
                    let info = m.full_info(&a).expect("configured");
                    assert!(info.calls_used <= 10, "over-admitted: {info:?}");
                    reads += 1;
                    if finished {
                        return reads;
                    }
                }
            })
        };
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let m = m.clone();
                tokio::spawn(async move {
                    for _ in 0..TURNS {
                        let turn = m.acquire_owned_wait(&a, 1, 1).await.expect("fits in turn");
                        tokio::task::yield_now().await;
                        turn.cancel();
                    }
                })
            })
            .collect();
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("every task gets all its turns: no lost wake-up")
                .expect("no task panics");
        }
        done.store(true, Ordering::Release);
        assert!(watcher.join().expect("the limit held") > 0);
        assert_eq!(m.waiting(), 0);
        assert_eq!(m.full_info(&a).unwrap().calls_used, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lock_free() {
        waiters_take_turns_without_loss_or_excess::<agent_budget::BudgetManager>().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn locked() {
        waiters_take_turns_without_loss_or_excess::<agent_budget::LockedBudgetManager>().await;
    }
}

// ---------------------------------------------------------------------------
// Waiting on a chain of budgets

/// A future that counts its polls: a waiter that sleeps until an event that
/// concerns it is not polled while nothing happens (a busy-polling one would
/// get in as soon as there is room, and pass every other check).
struct Counted<F> {
    inner: std::pin::Pin<Box<F>>,
    polls: Arc<AtomicUsize>,
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        self.inner.as_mut().poll(cx)
    }
}

/// `spawn_wait`, counting the waiter's polls.
fn spawn_counted_wait<M: BudgetLimiter + 'static>(
    m: &Arc<M>,
    agent_id: agent_budget::AgentId,
    tokens: u64,
    calls: u64,
) -> (
    tokio::task::JoinHandle<Result<OwnedReservation, agent_budget::Refused>>,
    Arc<AtomicUsize>,
) {
    let polls = Arc::new(AtomicUsize::new(0));
    let counted = Counted {
        inner: Box::pin(m.acquire_owned_wait(&agent_id, tokens, calls)),
        polls: polls.clone(),
    };
    (tokio::spawn(counted), polls)
}

/// Lets the runtime run while nothing happens, and checks the waiter slept
/// through it.
async fn asleep(polls: &AtomicUsize, what: &str) {
    settle_down().await;
    let before = polls.load(Ordering::SeqCst);
    settle_down().await;
    assert_eq!(
        polls.load(Ordering::SeqCst),
        before,
        "{what}: polled while nothing happened"
    );
}

/// Tokens and calls used at every level of the agent's chain, agent first.
fn chain_used<M: BudgetLimiter>(m: &M, a: &agent_budget::AgentId) -> Vec<(u64, u64)> {
    m.chain_info(a)
        .iter()
        .map(|info| (info.tokens_used, info.calls_used))
        .collect()
}

for_both_managers_async! {
    async fn a_waiter_refused_at_the_parent_is_woken_by_a_siblings_cancel<M>() {
        let (m, _time) = shared::<M>();
        let (parent, child, sibling) = (agent(), agent(), agent());
        m.set_budget(limit(parent, 100, 10, WINDOW_SECS));
        m.set_budget(limit(child, 1_000, 100, WINDOW_SECS));
        m.set_budget(limit(sibling, 1_000, 100, WINDOW_SECS));
        m.set_parent(&child, Some(&parent)).unwrap();
        m.set_parent(&sibling, Some(&parent)).unwrap();
        let held = m.acquire_owned(&sibling, 100, 1).unwrap();
        // The child has room of its own: only the parent refuses it.
        let refused = m.acquire(&child, 60, 1).unwrap_err();
        assert_eq!(refused.refused_by, parent);
        let (waiter, polls) = spawn_counted_wait(&m, child, 60, 1);
        until("the waiter is queued", || m.waiting() == 1).await;
        asleep(&polls, "queued at the parent").await;
        assert!(!waiter.is_finished(), "admitted while the parent was full");
        // The managers' clock never moves here: no window can end. Only the
        // sibling's refund at the parent can let the waiter in.
        assert_eq!(held.cancel(), Settlement::Applied { refunded_tokens: 100, charged_tokens: 0, refunded_calls: 1 });
        let got = within(Duration::from_secs(1), "the waiter woken by the sibling's cancel", waiter)
            .await
            .unwrap()
            .expect("fits after the cancel");
        assert_eq!((got.agent_id(), got.tokens(), got.calls()), (child, 60, 1));
        assert_eq!(m.waiting(), 0);
        assert_eq!(chain_used(&*m, &child), [(60, 1), (60, 1)]);
        assert_eq!(chain_used(&*m, &sibling), [(0, 0), (60, 1)]);
    }
}

for_both_managers_async! {
    async fn a_waiter_refused_at_the_parent_gets_in_when_the_parents_window_ends<M>() {
        let (m, time) = shared::<M>();
        let (parent, child, sibling) = (agent(), agent(), agent());
        // The child's own window is short; only the parent's end matters.
        // The sibling's is long.
        let child_window = Duration::from_secs(10);
        m.set_budget(limit(parent, 100, 10, WINDOW_SECS));
        m.set_budget(limit(child, 1_000, 100, child_window.as_secs()));
        m.set_budget(limit(sibling, 1_000, 100, 3_600));
        m.set_parent(&child, Some(&parent)).unwrap();
        m.set_parent(&sibling, Some(&parent)).unwrap();
        let spent = m.acquire_owned(&sibling, 100, 1).unwrap();
        let (waiter, polls) = spawn_counted_wait(&m, child, 50, 1);
        until("the waiter is queued", || m.waiting() == 1).await;
        asleep(&polls, "queued at the parent").await;
        advance(&time, child_window).await;
        asleep(&polls, "after the child's window ended").await;
        assert!(!waiter.is_finished(), "admitted when the child's window ended");
        advance(&time, WINDOW - child_window - Duration::from_secs(1)).await;
        asleep(&polls, "a second before the parent's window ends").await;
        assert!(!waiter.is_finished(), "admitted before the parent's window ended");
        advance(&time, Duration::from_secs(1)).await;
        let got = within(Duration::from_secs(1), "the waiter at the parent's window end", waiter)
            .await
            .unwrap()
            .expect("fits in the parent's fresh window");
        assert_eq!((got.tokens(), got.calls()), (50, 1));
        assert_eq!(m.waiting(), 0);
        assert_eq!(chain_used(&*m, &child), [(50, 1), (50, 1)]);
        // The sibling's reservation was taken in the parent's old window: its
        // refund reaches the sibling's own, still current, window only.
        assert_eq!(spent.cancel(), Settlement::Applied { refunded_tokens: 100, charged_tokens: 0, refunded_calls: 1 });
        assert_eq!(chain_used(&*m, &sibling), [(0, 0), (50, 1)]);
    }
}
