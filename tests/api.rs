//! The seed's API and window semantics, on both managers.

mod common;

use agent_budget::BudgetKind;
use common::{agent, limit, mocked};

for_both_managers! {
    fn a_new_budget_is_fully_available<M>() {
        let (m, _) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 1000, 10, 60));
        let info = m.remaining(&a);
        assert_eq!((info.tokens_remaining, info.calls_remaining), (1000, 10));
        assert_eq!(info.window_remaining_secs, 60);
        assert!(!info.is_exhausted);
        assert!(m.can_schedule(&a));
    }
}

for_both_managers! {
    fn reserve_takes_tokens_until_the_budget_is_spent<M>() {
        let (m, _) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 1000, 10, 60));
        m.reserve(&a, 600).unwrap();
        assert_eq!(m.remaining(&a).tokens_remaining, 400);
        m.reserve(&a, 400).unwrap();
        let err = m.reserve(&a, 1).unwrap_err();
        assert_eq!((err.agent_id, err.kind), (a, BudgetKind::Token));
        assert_eq!(err.message, "Token budget exceeded: requested 1 but only 0 remaining");
        assert!(m.remaining(&a).is_exhausted);
        // Zero tokens always fit, as in the seed.
        m.reserve(&a, 0).unwrap();
    }
}

for_both_managers! {
    fn track_call_counts_calls_until_the_limit<M>() {
        let (m, _) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 1000, 3, 60));
        for _ in 0..3 {
            m.track_call(&a).unwrap();
        }
        let err = m.track_call(&a).unwrap_err();
        assert_eq!((err.agent_id, err.kind), (a, BudgetKind::Call));
        assert_eq!(err.message, "Call budget exceeded: 3 calls used, limit is 3");
        assert!(!m.can_schedule(&a));
        // Calls and tokens are separate budgets.
        m.reserve(&a, 1000).unwrap();
    }
}

for_both_managers! {
    fn an_expired_window_is_fresh_for_reads_and_restarted_by_the_next_write<M>() {
        let (m, time) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 100, 5, 10));
        m.reserve(&a, 100).unwrap();
        m.track_call(&a).unwrap();
        time.advance_secs(4);
        assert_eq!(m.remaining(&a).window_remaining_secs, 6);
        assert!(m.reserve(&a, 1).is_err());

        time.advance_secs(6);
        // Reads already see the fresh window.
        let info = m.remaining(&a);
        assert_eq!((info.tokens_remaining, info.calls_remaining), (100, 5));
        let full = m.full_info(&a).unwrap();
        assert_eq!((full.tokens_used, full.calls_used), (0, 0));
        assert_eq!(full.window_remaining_secs, 10);

        // The window that the next write starts begins at that write.
        time.advance_secs(3);
        m.reserve(&a, 30).unwrap();
        time.advance_secs(2);
        let info = m.remaining(&a);
        assert_eq!((info.tokens_remaining, info.window_remaining_secs), (70, 8));
    }
}

for_both_managers! {
    fn an_unknown_agent_reads_as_exhausted_and_is_refused<M>() {
        let (m, _) = mocked::<M>();
        let a = agent();
        let info = m.remaining(&a);
        assert_eq!(
            (info.tokens_remaining, info.calls_remaining, info.window_remaining_secs),
            (0, 0, 0)
        );
        assert!(info.is_exhausted && !m.can_schedule(&a));
        assert!(m.full_info(&a).is_none());
        let expected = format!("No budget configured for agent {a}");
        let err = m.reserve(&a, 1).unwrap_err();
        assert_eq!((err.kind, &err.message, err.retry_after), (BudgetKind::Token, &expected, None));
        let err = m.track_call(&a).unwrap_err();
        assert_eq!((err.kind, &err.message), (BudgetKind::Call, &expected));
        assert!(m.acquire(&a, 0, 0).is_err());
        // Writes on an unknown agent are no-ops, not panics.
        m.release(&a, 5);
        m.reset_window(&a);
        m.remove_budget(&a);
        assert!(m.all_full_info().is_empty());
    }
}

for_both_managers! {
    fn remove_budget_forgets_limits_and_usage<M>() {
        let (m, _) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 1000, 10, 60));
        m.reserve(&a, 900).unwrap();
        m.remove_budget(&a);
        assert!(m.reserve(&a, 1).is_err());
        m.set_budget(limit(a, 1000, 10, 60));
        assert_eq!(m.remaining(&a).tokens_remaining, 1000);
    }
}

for_both_managers! {
    fn set_budget_on_a_known_agent_keeps_usage_and_window<M>() {
        let (m, time) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 1000, 10, 60));
        m.reserve(&a, 700).unwrap();
        time.advance_secs(20);
        m.set_budget(limit(a, 500, 10, 30));
        let full = m.full_info(&a).unwrap();
        assert_eq!((full.token_limit, full.tokens_used, full.tokens_remaining), (500, 700, 0));
        assert_eq!(full.window_remaining_secs, 10);
        assert!(full.is_exhausted);
        time.advance_secs(10);
        m.reserve(&a, 500).unwrap();
    }
}

for_both_managers! {
    fn release_gives_tokens_back_but_never_below_zero<M>() {
        let (m, _) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 1000, 10, 60));
        m.reserve(&a, 500).unwrap();
        m.release(&a, 200);
        assert_eq!(m.remaining(&a).tokens_remaining, 700);
        m.release(&a, u64::MAX);
        assert_eq!(m.remaining(&a).tokens_remaining, 1000);
    }
}

for_both_managers! {
    fn reset_window_starts_over_now<M>() {
        let (m, time) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 1000, 10, 60));
        m.reserve(&a, 500).unwrap();
        m.track_call(&a).unwrap();
        time.advance_secs(45);
        m.reset_window(&a);
        let info = m.remaining(&a);
        assert_eq!((info.tokens_remaining, info.calls_remaining), (1000, 10));
        assert_eq!(info.window_remaining_secs, 60);
    }
}

for_both_managers! {
    fn agents_are_independent_and_all_listed<M>() {
        let (m, _) = mocked::<M>();
        let (a, b) = (agent(), agent());
        m.set_budget(limit(a, 1000, 10, 60));
        m.set_budget(limit(b, 500, 5, 60));
        m.reserve(&a, 300).unwrap();
        m.reserve(&b, 200).unwrap();
        assert_eq!(m.remaining(&a).tokens_remaining, 700);
        assert_eq!(m.remaining(&b).tokens_remaining, 300);
        let mut all = m.all_full_info();
        all.sort_by_key(|i| i.token_limit);
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].agent_id, all[0].tokens_used), (b, 200));
        assert_eq!((all[1].agent_id, all[1].tokens_used), (a, 300));
        assert_eq!(all[1], m.full_info(&a).unwrap());
    }
}

/// The one test on the real clock: a one-second window really ends.
#[test]
fn a_window_ends_on_the_real_clock() {
    let m = agent_budget::BudgetManager::new();
    let a = agent();
    m.set_budget(limit(a, 100, 5, 1));
    m.reserve(&a, 100).unwrap();
    assert!(m.reserve(&a, 1).is_err());
    std::thread::sleep(std::time::Duration::from_millis(1_050));
    m.reserve(&a, 50).unwrap();
    assert_eq!(m.remaining(&a).tokens_remaining, 50);
}

for_both_managers! {
    fn a_coarse_clock_keeps_the_window_semantics<M>() {
        // A mock clock's recent time is its value, so this is exact.
        let (clock, mock) = quanta::Clock::mock();
        let m = M::with_coarse_clock(clock, std::time::Duration::from_millis(1)).unwrap();
        let a = agent();
        m.set_budget(limit(a, 100, 5, 10));
        m.reserve(&a, 100).unwrap();
        mock.increment(std::time::Duration::from_secs(4));
        assert!(m.reserve(&a, 1).is_err());
        assert_eq!(m.remaining(&a).window_remaining_secs, 6);
        mock.increment(std::time::Duration::from_secs(6));
        m.reserve(&a, 100).unwrap();
    }
}

/// The second test on the real clock: the coarse clock really advances,
/// driven by quanta's upkeep thread.
#[test]
fn a_window_ends_on_the_real_coarse_clock() {
    let m = agent_budget::BudgetManager::with_coarse_clock(
        quanta::Clock::new(),
        std::time::Duration::from_millis(1),
    )
    .unwrap();
    let a = agent();
    m.set_budget(limit(a, 100, 5, 1));
    m.reserve(&a, 100).unwrap();
    assert!(m.reserve(&a, 1).is_err());
    std::thread::sleep(std::time::Duration::from_millis(1_100));
    m.reserve(&a, 50).unwrap();
}

#[test]
fn the_managers_are_send_sync_and_static() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<agent_budget::BudgetManager>();
    shareable::<agent_budget::LockedBudgetManager>();
    // A gateway settles on whichever thread or task the response lands on.
    fn sendable<T: Send + Sync>() {}
    sendable::<agent_budget::Reservation<'static>>();
}
