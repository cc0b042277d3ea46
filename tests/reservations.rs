//! `acquire`, `settle` and `cancel`, on both managers.

mod common;

use std::time::Duration;

use agent_budget::{BudgetKind, Settlement, MAX_TOKENS};
use common::{agent, limit, mocked};

for_both_managers! {
    fn acquire_takes_tokens_and_calls_together_or_neither<M>() {
        let (m, _) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 2, 60));
        let r = m.acquire(&a, 60, 1).unwrap();
        assert_eq!((r.agent_id(), r.tokens(), r.calls()), (a, 60, 1));
        // Enough calls, not enough tokens: nothing is taken.
        let err = m.acquire(&a, 50, 1).unwrap_err();
        assert_eq!(err.kind, BudgetKind::Token);
        // Enough tokens, not enough calls: nothing is taken.
        let err = m.acquire(&a, 10, 2).unwrap_err();
        assert_eq!(err.kind, BudgetKind::Call);
        let full = m.full_info(&a).unwrap();
        assert_eq!((full.tokens_used, full.calls_used), (60, 1));
        drop(r);
    }
}

for_both_managers! {
    fn settle_refunds_what_was_not_used<M>() {
        let (m, _) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 1000, 10, 60));
        let r = m.acquire(&a, 800, 1).unwrap();
        assert_eq!(
            r.settle(300),
            Settlement::Applied { refunded_tokens: 500, charged_tokens: 0, refunded_calls: 0 }
        );
        let full = m.full_info(&a).unwrap();
        assert_eq!((full.tokens_used, full.calls_used), (300, 1));
    }
}

for_both_managers! {
    fn settle_charges_extra_even_past_the_limit<M>() {
        let (m, time) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 1000, 10, 60));
        let r = m.acquire(&a, 800, 1).unwrap();
        assert_eq!(
            r.settle(1500),
            Settlement::Applied { refunded_tokens: 0, charged_tokens: 700, refunded_calls: 0 }
        );
        let full = m.full_info(&a).unwrap();
        assert_eq!((full.tokens_used, full.tokens_remaining), (1500, 0));
        let err = m.acquire(&a, 1, 0).unwrap_err();
        assert_eq!(err.retry_after, Some(Duration::from_secs(60)));
        time.advance_secs(60);
        m.acquire(&a, 1000, 0).unwrap().settle(1000);
    }
}

for_both_managers! {
    fn settle_never_wraps<M>() {
        let (m, _) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, u64::MAX, u64::MAX, 60));
        let r = m.acquire(&a, 10, 1).unwrap();
        assert_eq!(
            r.settle(u64::MAX),
            Settlement::Applied { refunded_tokens: 0, charged_tokens: MAX_TOKENS - 10, refunded_calls: 0 }
        );
        assert_eq!(m.full_info(&a).unwrap().tokens_used, MAX_TOKENS);
        assert!(m.acquire(&a, 1, 0).is_err());
    }
}

for_both_managers! {
    fn cancel_gives_everything_back<M>() {
        let (m, _) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 1, 60));
        let r = m.acquire(&a, 100, 1).unwrap();
        assert!(!m.can_schedule(&a));
        assert_eq!(
            r.cancel(),
            Settlement::Applied { refunded_tokens: 100, charged_tokens: 0, refunded_calls: 1 }
        );
        assert!(m.can_schedule(&a));
        assert_eq!(m.remaining(&a).tokens_remaining, 100);
    }
}

for_both_managers! {
    fn a_dropped_reservation_stays_charged<M>() {
        let (m, _) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 5, 60));
        drop(m.acquire(&a, 70, 2).unwrap());
        let full = m.full_info(&a).unwrap();
        assert_eq!((full.tokens_used, full.calls_used), (70, 2));
    }
}

for_both_managers! {
    fn nothing_is_refunded_into_a_later_window<M>() {
        let (m, time) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 5, 10));
        let settled_late = m.acquire(&a, 80, 1).unwrap();
        let cancelled_late = m.acquire(&a, 20, 1).unwrap();
        // The window ends; no operation has rolled it over yet.
        time.advance_secs(10);
        assert_eq!(settled_late.settle(0), Settlement::WindowEnded);
        // A new window is started and used.
        m.acquire(&a, 90, 1).unwrap().settle(90);
        assert_eq!(cancelled_late.cancel(), Settlement::WindowEnded);
        let full = m.full_info(&a).unwrap();
        assert_eq!((full.tokens_used, full.calls_used), (90, 1));
    }
}

for_both_managers! {
    fn overuse_settled_after_the_window_ended_is_carried_into_the_current_one<M>() {
        let (m, time) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 5, 10));
        let late = m.acquire(&a, 60, 1).unwrap();
        let unrolled = m.acquire(&a, 10, 1).unwrap();
        time.advance_secs(10);
        // The window ended and no operation has rolled it over: the 25
        // tokens used beyond the reservation are owed all the same.
        assert_eq!(late.settle(85), Settlement::CarriedOver { charged_tokens: 25 });
        let full = m.full_info(&a).unwrap();
        assert_eq!((full.tokens_used, full.calls_used), (25, 0));
        // Within the reservation: nothing owed, nothing crosses.
        assert_eq!(unrolled.settle(10), Settlement::WindowEnded);
        // A later window that is used already: the debt adds to it, and
        // can take it past its limit.
        let third = m.acquire(&a, 70, 1).unwrap();
        time.advance_secs(10);
        m.acquire(&a, 90, 1).unwrap().settle(90);
        assert_eq!(third.settle(100), Settlement::CarriedOver { charged_tokens: 30 });
        let full = m.full_info(&a).unwrap();
        assert_eq!((full.tokens_used, full.tokens_remaining), (120, 0));
        assert_eq!(m.acquire(&a, 1, 0).unwrap_err().kind, BudgetKind::Token);
    }
}

for_both_managers! {
    fn nothing_is_refunded_across_a_manual_reset<M>() {
        let (m, _) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 5, 10));
        let r = m.acquire(&a, 80, 1).unwrap();
        m.reset_window(&a);
        m.reserve(&a, 50).unwrap();
        assert_eq!(r.cancel(), Settlement::WindowEnded);
        assert_eq!(m.full_info(&a).unwrap().tokens_used, 50);
    }
}

for_both_managers! {
    fn nothing_is_refunded_into_a_removed_or_re_added_agent<M>() {
        let (m, _) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 5, 10));
        let removed = m.acquire(&a, 80, 1).unwrap();
        let re_added = m.acquire(&a, 20, 1).unwrap();
        m.remove_budget(&a);
        assert_eq!(removed.settle(0), Settlement::AgentRemoved);
        m.set_budget(limit(a, 100, 5, 10));
        m.reserve(&a, 60).unwrap();
        assert_eq!(re_added.cancel(), Settlement::AgentRemoved);
        assert_eq!(m.full_info(&a).unwrap().tokens_used, 60);
    }
}

for_both_managers! {
    fn set_budget_keeps_reservations_settleable<M>() {
        let (m, _) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 5, 10));
        let r = m.acquire(&a, 80, 1).unwrap();
        m.set_budget(limit(a, 200, 5, 10));
        assert!(matches!(r.settle(30), Settlement::Applied { refunded_tokens: 50, .. }));
        assert_eq!(m.remaining(&a).tokens_remaining, 170);
    }
}

for_both_managers! {
    fn a_reservation_settles_where_its_agent_has_moved_and_nowhere_else<M>() {
        let (m, _) = mocked::<M>();
        let (a, b) = (agent(), agent());
        m.set_budget(limit(a, 100, 5, 10));
        let r = m.acquire(&a, 80, 1).unwrap();
        // A limit past the 64-bit word's moves the agent to a wide cell
        // (the lock-free manager's); the cell it left may go to another.
        m.set_budget(limit(a, 1 << 40, 5, 10));
        m.set_budget(limit(b, 100, 5, 10));
        m.reserve(&b, 7).unwrap();
        assert!(matches!(r.settle(30), Settlement::Applied { refunded_tokens: 50, .. }));
        assert_eq!(m.full_info(&a).unwrap().tokens_used, 30);
        assert_eq!(m.full_info(&b).unwrap().tokens_used, 7);
    }
}

for_both_managers! {
    fn edge_amounts_are_admitted_exactly_or_refused_cleanly<M>() {
        let (m, _) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 3, 10));
        // Zero of everything always fits, even when exhausted.
        m.acquire(&a, 0, 0).unwrap().settle(0);
        for (tokens, calls) in [(101, 0), (0, 4), (u64::MAX, 0), (0, u64::MAX), (u64::MAX, u64::MAX)] {
            let err = m.acquire(&a, tokens, calls).unwrap_err();
            assert_eq!(err.retry_after, None, "{tokens}/{calls} can never fit");
        }
        let r = m.acquire(&a, 100, 3).unwrap();
        m.acquire(&a, 0, 0).unwrap().cancel();
        let err = m.acquire(&a, 1, 0).unwrap_err();
        assert_eq!(err.retry_after, Some(Duration::from_secs(10)));
        // Settling far more than the budget is booked, saturated, never wrapped.
        assert!(matches!(r.settle(u64::MAX), Settlement::Applied { .. }));
        let full = m.full_info(&a).unwrap();
        assert_eq!((full.tokens_used, full.tokens_remaining), (MAX_TOKENS, 0));
    }
}

for_both_managers! {
    fn the_error_says_which_resource_how_much_was_asked_and_how_much_is_left<M>() {
        let (m, time) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 2, 10));
        m.acquire(&a, 70, 2).unwrap().settle(70);
        time.advance(Duration::from_millis(2_500));
        let err = m.acquire(&a, 40, 0).unwrap_err();
        let text = err.to_string();
        // The refusal formats nothing until displayed; the seed's type,
        // converted, carries the same message.
        assert_eq!(text, agent_budget::BudgetExceeded::from(err).message);
        assert!(text.starts_with("Token budget exceeded"), "{text}");
        assert!(text.contains("requested 40 tokens but only 30 remaining"), "{text}");
        assert!(text.contains("7.500s"), "{text}");
        assert_eq!(err.retry_after, Some(Duration::from_millis(7_500)));
        let err = m.acquire(&a, 0, 1).unwrap_err();
        assert!(err.to_string().contains("requested 1 calls but only 0 remaining"), "{err}");
        let err = m.acquire(&a, 0, 3).unwrap_err();
        assert!(err.to_string().contains("larger than the limit of 2"), "{err}");
    }
}

for_both_managers! {
    // An agent alone: `acquire_owned_reporting` reports its level as
    // `full_info` reads it right after the take (the window's end
    // included); nothing for a refusal or an agent without a budget.
    fn an_admission_reports_the_agents_own_level_as_it_stands_after<M>() {
        let (m, time) = mocked::<M>();
        let m = std::sync::Arc::new(m);
        let a = agent();
        m.set_budget(limit(a, 100, 3, 60));
        time.advance_secs(20);
        let mut reported = Vec::new();
        let taken = m
            .acquire_owned_reporting(&a, 70, 1, |info| reported.push(info))
            .expect("room");
        assert_eq!(reported, [m.full_info(&a).expect("a budget")]);
        let info = &reported[0];
        assert_eq!((info.tokens_remaining, info.calls_remaining), (30, 2));
        assert_eq!(info.window_remaining_secs, 40);

        let mut more = Vec::new();
        let err = m
            .acquire_owned_reporting(&a, 31, 1, |info| more.push(info))
            .expect_err("30 left");
        assert_eq!(err.kind, BudgetKind::Token);
        let unknown = agent();
        assert!(m.acquire_owned_reporting(&unknown, 1, 1, |info| more.push(info)).is_err());
        assert!(more.is_empty(), "{more:?}");
        assert_eq!(taken.settle(50), Settlement::Applied { refunded_tokens: 20, charged_tokens: 0, refunded_calls: 0 });
    }
}
