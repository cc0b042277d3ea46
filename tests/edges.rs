//! Every `u64` edge, zero budgets and extreme windows: admitted exactly or
//! refused cleanly, never wrapped, never a panic.

mod common;

use agent_budget::{MAX_CALLS, MAX_TOKENS};
use common::{agent, limit, mocked};

const EDGES: [u64; 7] = [0, 1, 999, 1000, 1001, u64::MAX - 1, u64::MAX];

for_both_managers! {
    fn reserve_at_every_edge_admits_exactly_what_fits<M>() {
        let (m, _) = mocked::<M>();
        for first in EDGES {
            for second in EDGES {
                let a = agent();
                m.set_budget(limit(a, 1000, 10, 60));
                let first_fits = first <= 1000;
                assert_eq!(m.reserve(&a, first).is_ok(), first_fits, "{first}");
                let used = if first_fits { first } else { 0 };
                assert_eq!(m.reserve(&a, second).is_ok(), second <= 1000 - used, "{first} then {second}");
                let full = m.full_info(&a).unwrap();
                assert!(full.tokens_used <= 1000);
                assert_eq!(full.tokens_used + full.tokens_remaining, 1000);
            }
        }
    }
}

for_both_managers! {
    fn release_at_every_edge_saturates_at_zero<M>() {
        let (m, _) = mocked::<M>();
        for amount in EDGES {
            let a = agent();
            m.set_budget(limit(a, 1000, 10, 60));
            m.reserve(&a, 500).unwrap();
            m.release(&a, amount);
            assert_eq!(m.remaining(&a).tokens_remaining, 1000 - 500u64.saturating_sub(amount));
        }
    }
}

for_both_managers! {
    fn zero_budgets_admit_only_zero<M>() {
        let (m, _) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 0, 0, 60));
        assert!(!m.can_schedule(&a));
        m.reserve(&a, 0).unwrap();
        assert!(m.reserve(&a, 1).is_err());
        assert!(m.track_call(&a).is_err());
        m.acquire(&a, 0, 0).unwrap().cancel();
        let err = m.acquire(&a, 1, 0).unwrap_err();
        assert_eq!(err.retry_after, None);
    }
}

for_both_managers! {
    fn exact_ranges_hold_at_their_stated_bounds<M>() {
        let (m, _) = mocked::<M>();
        let a = agent();
        let tokens = 1_000_000_000_000u64;
        let calls = 1_000_000_000u64;
        let ten_years = 10 * 366 * 86_400;
        m.set_budget(limit(a, tokens, calls, ten_years));
        m.reserve(&a, tokens - 1).unwrap();
        m.reserve(&a, 1).unwrap();
        assert!(m.reserve(&a, 1).is_err());
        let r = m.acquire(&a, 0, calls).unwrap();
        assert!(m.track_call(&a).is_err());
        r.cancel();
        m.track_call(&a).unwrap();
        let full = m.full_info(&a).unwrap();
        assert_eq!((full.tokens_used, full.calls_used), (tokens, 1));
        assert_eq!(full.window_remaining_secs, ten_years);
    }
}

for_both_managers! {
    fn budgets_above_the_exact_range_are_enforced_at_its_maximum<M>() {
        let (m, _) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, u64::MAX, u64::MAX, u64::MAX));
        let full = m.full_info(&a).unwrap();
        assert_eq!((full.token_limit, full.calls_limit), (u64::MAX, u64::MAX));
        assert_eq!((full.tokens_remaining, full.calls_remaining), (MAX_TOKENS, MAX_CALLS));
        // Windows beyond 2^42 - 1 ms (139 years) are that long, and never end.
        assert_eq!(full.window_remaining_secs, ((1u64 << 42) - 1) / 1000);
        assert!(m.reserve(&a, u64::MAX).is_err());
        m.reserve(&a, MAX_TOKENS).unwrap();
        assert!(m.reserve(&a, 1).is_err());
        m.track_call(&a).unwrap();
    }
}

for_both_managers! {
    fn a_zero_second_window_lasts_a_millisecond<M>() {
        let (m, time) = mocked::<M>();
        let a = agent();
        m.set_budget(limit(a, 10, 1, 0));
        m.reserve(&a, 10).unwrap();
        assert!(m.reserve(&a, 1).is_err());
        assert_eq!(m.remaining(&a).window_remaining_secs, 0);
        time.advance(std::time::Duration::from_millis(1));
        m.reserve(&a, 10).unwrap();
    }
}

for_both_managers! {
    fn a_mock_clock_read_backwards_neither_panics_nor_ends_the_window<M>() {
        let (clock, mock) = quanta::Clock::mock();
        mock.increment(std::time::Duration::from_secs(100));
        let m = M::with_clock(clock);
        let a = agent();
        m.set_budget(limit(a, 10, 1, 5));
        m.reserve(&a, 10).unwrap();
        // A reading from before the window started (as quanta can give
        // across cores), and one from before the manager existed.
        mock.decrement(std::time::Duration::from_secs(2));
        assert!(m.reserve(&a, 1).is_err());
        assert_eq!(m.remaining(&a).window_remaining_secs, 5);
        mock.decrement(std::time::Duration::from_secs(50));
        assert!(m.reserve(&a, 1).is_err());
        mock.increment(std::time::Duration::from_secs(57));
        m.reserve(&a, 10).unwrap();
    }
}

for_both_managers! {
    fn a_zero_upkeep_interval_is_refused_clearly<M>() {
        let err = M::with_coarse_clock(quanta::Clock::new(), std::time::Duration::ZERO)
            .err()
            .expect("a zero interval would spin a core");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("longer than zero"), "{err}");
    }
}
