//! Where the crate departed from its documents, as the oracle found: one
//! minimal test each, asserting what the documents say, on both managers.

use std::time::Duration;

use agent_budget::{RefillLimit, Settlement, MAX_CALLS, MAX_TOKENS};

use crate::common::{agent, limit, mocked};
use crate::for_both_managers;
use crate::level::YEAR_SECS;

fn bucket(agent_id: agent_budget::AgentId, tokens: u64, calls: u64, secs: u64) -> RefillLimit {
    RefillLimit {
        agent_id,
        token_budget: tokens,
        calls_budget: calls,
        refill_period: Duration::from_secs(secs),
    }
}

for_both_managers! {
    /// "`reset_window` starts a new, empty window now", and starts are
    /// distinct: resets within one millisecond each start a millisecond
    /// after the last. (The crate tells windows apart by their starts; the
    /// oracle found this undocumented, and the documents now say it.)
    fn resets_within_a_millisecond_start_a_millisecond_apart<M>() {
        let (m, time) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 5, 5, 1));
        time.advance(Duration::from_millis(500));
        let stale = m.acquire(&a, 1, 1).unwrap();
        for _ in 0..3 {
            m.reset_window(&a);
        }
        // The windows start at 500, 501 and 502 ms: the reservation's is
        // over.
        assert_eq!(stale.cancel(), Settlement::WindowEnded);
        m.reserve(&a, 5).unwrap();
        time.advance(Duration::from_millis(1_001));
        assert!(m.reserve(&a, 1).is_err(), "1,501 ms: the window started at 502 ms");
        time.advance(Duration::from_millis(1));
        m.reserve(&a, 5).unwrap();
    }
}

for_both_managers! {
    /// "`retry_after` ... `None` if it never can", and "a window of 139
    /// years or longer never ends": a request that does not fit what is
    /// left of such a window never will. The crate tells 139.4 years, and
    /// once those have passed, `Some(0)`, while it keeps refusing.
    fn a_window_that_never_ends_tells_no_retry<M>() {
        let (m, time) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 10, 10, 200 * YEAR_SECS));
        m.reserve(&a, 10).unwrap();
        time.advance_secs(140 * YEAR_SECS);
        let refused = m.reserve(&a, 1).unwrap_err();
        assert_eq!(refused.retry_after, None, "{refused}");
    }
}

for_both_managers! {
    /// "`retry_after` ... when that level can take the request": with both
    /// resources of a bucket short, the crate tells when the one it names
    /// has room, and the request is refused again then.
    fn a_bucket_tells_when_the_whole_request_fits<M>() {
        let (m, time) = mocked::<M>();
        let a = agent();
        m.set_refill(bucket(a, 10, 2, 1));
        drop(m.acquire(&a, 10, 2).unwrap());
        // Tokens have room after 100 ms, calls after a second.
        let refused = m.acquire(&a, 1, 2).unwrap_err();
        let wait = refused.retry_after.expect("the request fits the bucket");
        time.advance(wait);
        assert!(
            m.acquire(&a, 1, 2).is_ok(),
            "refused again after the retry_after of {wait:?} (kind {:?})",
            refused.kind
        );
    }
}

for_both_managers! {
    /// "Settle and cancel refund into the bucket, never above full", and
    /// buckets are exact for "budgets up to half of MAX_TOKENS and
    /// MAX_CALLS". A bucket of 2 × 10^9 calls per period, drained, refilled
    /// and drained again: cancelling a one-call reservation gives back 1.7
    /// × 10^9 calls (the crate clamps the count at the maximum less a
    /// budget, though it may reach twice the budget).
    fn cancelling_one_call_gives_back_one_call_on_a_large_bucket<M>() {
        let (m, time) = mocked::<M>();
        let a = agent();
        let budget = 2_000_000_000;
        assert!(budget <= MAX_CALLS / 2);
        m.set_refill(bucket(a, 10, budget, 1_000));
        let one = m.acquire(&a, 0, 1).unwrap();
        drop(m.acquire(&a, 0, budget - 1).unwrap());
        time.advance_secs(999);
        let used = m.full_info(&a).unwrap().calls_used;
        drop(m.acquire(&a, 0, budget - used).unwrap());
        assert_eq!(
            one.cancel(),
            Settlement::Applied { refunded_tokens: 0, charged_tokens: 0, refunded_calls: 1 }
        );
        assert_eq!(m.full_info(&a).unwrap().calls_used, budget - 1);
    }
}

for_both_managers! {
    /// The same with tokens and `release`: `release(1)` on a bucket of
    /// half of `MAX_TOKENS` forgets 2.2 × 10^15 tokens of usage.
    fn releasing_one_token_gives_back_one_token_on_a_large_bucket<M>() {
        let (m, time) = mocked::<M>();
        let a = agent();
        let budget = MAX_TOKENS / 2;
        m.set_refill(bucket(a, budget, 1, 1_000));
        m.reserve(&a, budget).unwrap();
        time.advance_secs(999);
        let used = m.full_info(&a).unwrap().tokens_used;
        m.reserve(&a, budget - used).unwrap();
        m.release(&a, 1);
        assert_eq!(m.full_info(&a).unwrap().tokens_used, budget - 1);
    }
}

for_both_managers! {
    /// A reservation taken from a bucket, the agent then moved to a fixed
    /// window: the documents do not say how it settles ("Buckets have no
    /// windows"; "Refunds never cross windows"), but the answer cannot
    /// depend on whether the move fell in the millisecond of the bucket's
    /// mark. The crate tells windows apart by their start instant, and
    /// takes the new window for the reservation's own when they coincide.
    fn a_reservation_from_a_bucket_settles_alike_whenever_the_agent_moves<M>() {
        let (m, time) = mocked::<M>();
        let outcomes: Vec<Settlement> = [0, 1]
            .into_iter()
            .map(|gap_ms| {
                let a = agent();
                m.set_refill(bucket(a, 100, 10, 100));
                let reservation = m.acquire(&a, 50, 1).unwrap();
                time.advance(Duration::from_millis(gap_ms));
                m.set_budget(limit(a, 100, 10, 60));
                reservation.settle(10)
            })
            .collect();
        assert_eq!(outcomes[0], outcomes[1], "moved at once, then a millisecond later");
    }
}

for_both_managers! {
    /// The same for a reservation taken in a window, the agent moved to a
    /// bucket and back: its window ended ("set_budget" on an agent on a
    /// bucket "switches to windows with what it has in use"), whether the
    /// moves took a millisecond or not.
    fn a_reservation_from_a_window_replaced_in_its_millisecond_has_ended<M>() {
        let (m, time) = mocked::<M>();
        let outcomes: Vec<Settlement> = [0, 1]
            .into_iter()
            .map(|gap_ms| {
                let a = agent();
                m.set_budget(limit(a, 100, 10, 60));
                let reservation = m.acquire(&a, 50, 1).unwrap();
                m.set_refill(bucket(a, 100, 10, 100));
                time.advance(Duration::from_millis(gap_ms));
                m.set_budget(limit(a, 100, 10, 60));
                reservation.settle(10)
            })
            .collect();
        assert_eq!(outcomes[0], outcomes[1], "moved back at once, then a millisecond later");
        assert_eq!(outcomes[0], Settlement::WindowEnded);
    }
}

for_both_managers! {
    /// A full bucket restarting its refill at an admission must not move
    /// its mark back to before the one a reset put a millisecond ahead:
    /// a window begun from the bucket then started where the reservation's
    /// bucket had, and the reservation took the window for its own.
    fn a_mark_never_goes_back_so_a_bucket_reservation_never_owns_a_later_window<M>() {
        let (m, time) = mocked::<M>();
        let a = agent();
        m.set_refill(bucket(a, 36, 2, 0));
        time.advance(Duration::from_micros(2_815));
        let reservation = m.acquire(&a, 0, 1).unwrap();
        time.0.decrement(Duration::from_micros(815));
        m.reset_window(&a);
        m.reserve(&a, 1).unwrap();
        m.set_budget(limit(a, 0, 0, 0));
        assert_eq!(reservation.settle(0), Settlement::WindowEnded);
    }
}
