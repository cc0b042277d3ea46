//! Budgets that refill continuously (`set_refill`), on both managers: exact
//! refill on a mock clock, `retry_after`, refunds and debt, switching to and
//! from windows, extreme limits, and persistence.

mod common;

use std::sync::Barrier;
use std::thread;
use std::time::Duration;

use agent_budget::{
    AgentId, BudgetKind, BudgetLimiter, BudgetManager, FullBudgetInfo, LockedBudgetManager,
    RefillLimit, Settlement, MAX_CALLS, MAX_TOKENS,
};
use common::{agent, limit, mocked};

fn bucket(agent_id: AgentId, tokens: u64, calls: u64, period: Duration) -> RefillLimit {
    RefillLimit {
        agent_id,
        token_budget: tokens,
        calls_budget: calls,
        refill_period: period,
    }
}

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// What a drained bucket has regained after `elapsed_ms`: whole units of
/// `budget × elapsed / period`.
fn refilled(budget: u64, elapsed_ms: u64, period_ms: u64) -> u64 {
    u64::try_from(u128::from(budget) * u128::from(elapsed_ms) / u128::from(period_ms)).unwrap()
}

/// The first millisecond at which a drained bucket has regained `units`.
fn ms_until(units: u64, budget: u64, period_ms: u64) -> u64 {
    (units * period_ms).div_ceil(budget)
}

/// Tokens and calls that could be taken now.
fn remaining<M: BudgetLimiter>(m: &M, a: &AgentId) -> (u64, u64) {
    let info = m.remaining(a);
    (info.tokens_remaining, info.calls_remaining)
}

fn applied(refunded_tokens: u64, charged_tokens: u64, refunded_calls: u64) -> Settlement {
    Settlement::Applied {
        refunded_tokens,
        charged_tokens,
        refunded_calls,
    }
}

for_both_managers! {
    fn a_bucket_starts_full_and_reports_its_period_as_its_window<M>() {
        let (m, time) = mocked::<M>();
        let a = agent();
        let (tokens, calls, period) = (1_000, 10, ms(2_500));
        m.set_refill(bucket(a, tokens, calls, period));
        let period_secs = u64::try_from(period.as_millis().div_ceil(1_000)).unwrap();
        let full = FullBudgetInfo {
            agent_id: a,
            token_limit: tokens,
            tokens_used: 0,
            tokens_remaining: tokens,
            calls_limit: calls,
            calls_used: 0,
            calls_remaining: calls,
            window_secs: period_secs,
            window_remaining_secs: 0,
            is_exhausted: false,
        };
        assert_eq!(m.full_info(&a).unwrap(), full);
        assert!(m.can_schedule(&a));
        let everything = m.acquire(&a, tokens, calls).unwrap();
        let info = m.full_info(&a).unwrap();
        assert_eq!(
            (info.tokens_used, info.tokens_remaining, info.calls_used, info.calls_remaining),
            (tokens, 0, calls, 0)
        );
        assert!(info.is_exhausted && !m.can_schedule(&a));
        // Full again a whole period after it was drained.
        assert_eq!(info.window_remaining_secs, period.as_secs());
        time.advance(period);
        assert_eq!(m.full_info(&a).unwrap(), full);
        drop(everything);
    }
}

for_both_managers! {
    fn a_drained_bucket_regains_budget_times_elapsed_over_period_in_whole_units<M>() {
        let (m, time) = mocked::<M>();
        let a = agent();
        let (tokens, calls, period_ms) = (1_000, 7, 9_000);
        let step = 37;
        m.set_refill(bucket(a, tokens, calls, ms(period_ms)));
        m.acquire(&a, tokens, calls).map(drop).unwrap();
        for n in 0..=(period_ms + 100) / step {
            let t = n * step;
            let expected = (
                refilled(tokens, t, period_ms).min(tokens),
                refilled(calls, t, period_ms).min(calls),
            );
            assert_eq!(remaining(&m, &a), expected, "at {t} ms");
            let info = m.full_info(&a).unwrap();
            assert_eq!((info.tokens_used, info.calls_used), (tokens - expected.0, calls - expected.1));
            // Admission agrees with the reading, one unit either side.
            let err = m.acquire(&a, expected.0 + 1, 0).unwrap_err();
            assert_eq!(err.kind, BudgetKind::Token, "at {t} ms");
            let err = m.acquire(&a, 0, expected.1 + 1).unwrap_err();
            assert_eq!(err.kind, BudgetKind::Call, "at {t} ms");
            if n % 10 == 0 {
                let r = m.acquire(&a, expected.0, expected.1).unwrap();
                assert_eq!(remaining(&m, &a), (0, 0));
                r.cancel();
            }
            time.advance(ms(step));
        }
    }
}

for_both_managers! {
    fn a_year_admits_exactly_the_burst_plus_the_rate_times_the_time<M>() {
        const YEAR_MS: u64 = 365 * 24 * 3_600 * 1_000;
        let (m, time) = mocked::<M>();
        let a = agent();
        let (tokens, calls, period_ms) = (1_000, 12, 3_600_000);
        m.set_refill(bucket(a, tokens, calls, ms(period_ms)));
        // Irregular steps, each too short for the bucket to fill up in: the
        // demand always exceeds the refill, so nothing overflows and is lost.
        let steps = [1_234_567, 7, 600_001, 59_999, 2_999_999];
        let max_steps = 4 * YEAR_MS / (steps.iter().sum::<u64>() / steps.len() as u64);
        let (mut got_tokens, mut got_calls) = (0, 0);
        let mut elapsed = 0;
        for n in 0..max_steps {
            // Offer one more than is left of each resource (refused), then
            // exactly what is left (admitted and kept).
            let (t, c) = remaining(&m, &a);
            assert_eq!(m.acquire(&a, t + 1, 0).unwrap_err().kind, BudgetKind::Token, "at {elapsed} ms");
            assert_eq!(m.acquire(&a, 0, c + 1).unwrap_err().kind, BudgetKind::Call, "at {elapsed} ms");
            m.acquire(&a, t, c).map(drop).unwrap();
            got_tokens += t;
            got_calls += c;
            assert_eq!(
                (got_tokens, got_calls),
                (tokens + refilled(tokens, elapsed, period_ms), calls + refilled(calls, elapsed, period_ms)),
                "after {elapsed} ms"
            );
            if elapsed >= YEAR_MS {
                break;
            }
            assert!(n + 1 < max_steps, "a year was not covered in {max_steps} steps");
            let step = steps[usize::try_from(n).unwrap() % steps.len()];
            time.advance(ms(step));
            elapsed += step;
        }
        assert!(elapsed >= YEAR_MS);
        // Idle for ten years, it is full, and no fuller.
        time.advance_secs(10 * 365 * 24 * 3_600);
        assert_eq!(remaining(&m, &a), (tokens, calls));
        assert!(m.acquire(&a, tokens + 1, 0).is_err());
    }
}

for_both_managers! {
    fn retry_after_is_the_exact_time_until_enough_has_refilled<M>() {
        let (m, time) = mocked::<M>();
        let a = agent();
        // Three tokens in ten seconds: a token every 3,333.3 ms.
        let (tokens, calls, period_ms) = (3, 2, 10_000);
        m.set_refill(bucket(a, tokens, calls, ms(period_ms)));
        m.acquire(&a, tokens, calls).map(drop).unwrap();
        for units in 1..=tokens {
            let err = m.acquire(&a, units, 0).unwrap_err();
            assert_eq!((err.refused_by, err.kind), (a, BudgetKind::Token));
            assert_eq!(err.retry_after, Some(ms(ms_until(units, tokens, period_ms))), "{units} tokens");
        }
        let err = m.acquire(&a, 0, 1).unwrap_err();
        assert_eq!((err.kind, err.retry_after), (BudgetKind::Call, Some(ms(ms_until(1, calls, period_ms)))));
        // More than the bucket holds can never fit.
        assert_eq!(m.acquire(&a, tokens + 1, 0).unwrap_err().retry_after, None);
        assert_eq!(m.acquire(&a, 0, calls + 1).unwrap_err().retry_after, None);

        // Refused one millisecond before, admitted at the millisecond.
        let first = ms_until(1, tokens, period_ms);
        time.advance(ms(first - 1));
        assert_eq!(m.acquire(&a, 1, 0).unwrap_err().retry_after, Some(ms(1)));
        time.advance(ms(1));
        m.acquire(&a, 1, 0).map(drop).unwrap();
        // The next token is counted from the same start: no rounding carried.
        let second = ms_until(2, tokens, period_ms);
        assert_eq!(m.acquire(&a, 1, 0).unwrap_err().retry_after, Some(ms(second - first)));

        // Part-way through a refill: only the part still missing is waited for.
        let b = agent();
        let (b_tokens, b_period_ms) = (100, 10_000);
        m.set_refill(bucket(b, b_tokens, 10, ms(b_period_ms)));
        m.acquire(&b, b_tokens, 0).map(drop).unwrap();
        let (later, wanted) = (2_500, 40);
        time.advance(ms(later));
        let err = m.acquire(&b, wanted, 0).unwrap_err();
        assert_eq!(err.retry_after, Some(ms(ms_until(wanted, b_tokens, b_period_ms) - later)));
    }
}

for_both_managers! {
    fn zero_and_sub_millisecond_periods_round_up_to_whole_milliseconds<M>() {
        let (m, time) = mocked::<M>();
        let budget = 3;
        for (period, rounded_ms) in [
            (Duration::ZERO, 1),
            (Duration::from_nanos(1), 1),
            (ms(1), 1),
            (Duration::from_micros(1_500), 2),
        ] {
            let a = agent();
            m.set_refill(bucket(a, budget, budget, period));
            let secs = u64::try_from(period.as_nanos().div_ceil(1_000_000_000)).unwrap();
            assert_eq!(m.full_info(&a).unwrap().window_secs, secs, "{period:?}");
            m.acquire(&a, budget, budget).map(drop).unwrap();
            let err = m.acquire(&a, 1, 0).unwrap_err();
            assert_eq!(err.retry_after, Some(ms(ms_until(1, budget, rounded_ms))), "{period:?}");
            for t in 1..=rounded_ms {
                time.advance(ms(1));
                let expected = refilled(budget, t, rounded_ms);
                assert_eq!(remaining(&m, &a), (expected, expected), "{period:?} after {t} ms");
            }
            assert_eq!(remaining(&m, &a), (budget, budget), "{period:?}");
        }
    }
}

for_both_managers! {
    fn extreme_budgets_and_periods_never_panic<M>() {
        let dir = tempfile::tempdir().unwrap();
        // What a bucket's budget is enforced as, at most.
        let (max_tokens, max_calls) = (MAX_TOKENS / 2, MAX_CALLS / 2);
        let century = Duration::from_secs(100 * 365 * 24 * 3_600);
        for period in [Duration::ZERO, ms(1), Duration::from_secs(3_600), century, Duration::from_secs(u64::MAX)] {
            let (m, time) = mocked::<M>();
            let a = agent();
            m.set_refill(bucket(a, u64::MAX, u64::MAX, period));
            let info = m.full_info(&a).unwrap();
            assert_eq!((info.token_limit, info.calls_limit), (u64::MAX, u64::MAX));
            assert_eq!((info.tokens_remaining, info.calls_remaining), (max_tokens, max_calls), "{period:?}");
            assert_eq!(m.acquire(&a, u64::MAX, 0).unwrap_err().retry_after, None);
            assert_eq!(m.acquire(&a, 0, u64::MAX).unwrap_err().retry_after, None);
            let everything = m.acquire(&a, max_tokens, max_calls).unwrap();
            assert!(m.acquire(&a, 1, 0).unwrap_err().retry_after.is_some());
            assert!(matches!(everything.settle(u64::MAX), Settlement::Applied { refunded_tokens: 0, .. }));
            assert_eq!(remaining(&m, &a), (0, 0));
            let _ = (m.chain_info(&a), m.all_full_info(), m.can_schedule(&a));
            let err = m.acquire(&a, 1, 1).unwrap_err();
            assert_eq!(err.refused_by, a);
            let path = dir.path().join("extreme.json");
            m.persist(&path).unwrap();
            time.advance(century);
            let (t, c) = remaining(&m, &a);
            assert!(t <= max_tokens && c <= max_calls);
            if period <= Duration::from_secs(3_600) {
                assert_eq!((t, c), (max_tokens, max_calls), "{period:?}: a century repays any debt");
            }
            m.release(&a, u64::MAX);
            m.reset_window(&a);
            assert_eq!(remaining(&m, &a), (max_tokens, max_calls));
            m.set_budget(limit(a, u64::MAX, u64::MAX, u64::MAX));
            m.set_refill(bucket(a, u64::MAX, u64::MAX, period));
            let (restored, _) = mocked::<M>();
            restored.restore(&path).unwrap();
            assert_eq!(restored.full_info(&a).unwrap().token_limit, u64::MAX);
        }
    }
}

for_both_managers! {
    fn refunds_go_into_the_bucket_never_above_full<M>() {
        let (m, time) = mocked::<M>();
        let (tokens, calls, period_ms) = (100, 10, 10_000);
        let per_token = period_ms / tokens;
        let per_call = period_ms / calls;
        // A settle part-way through the refill gives back what was not used.
        let a = agent();
        m.set_refill(bucket(a, tokens, calls, ms(period_ms)));
        let r = m.acquire(&a, 60, 1).unwrap();
        time.advance(ms(10 * per_token)); // 10 tokens and 1 call have come back
        assert_eq!(per_call, 10 * per_token);
        assert_eq!(remaining(&m, &a), (50, calls));
        assert_eq!(r.settle(20), applied(40, 0, 0));
        assert_eq!(remaining(&m, &a), (90, calls));
        // A cancel gives back only what has not refilled already.
        let b = agent();
        m.set_refill(bucket(b, tokens, calls, ms(period_ms)));
        let r = m.acquire(&b, 60, 1).unwrap();
        time.advance(ms(30 * per_token));
        assert_eq!(remaining(&m, &b), (70, calls));
        assert_eq!(r.cancel(), applied(30, 0, 0));
        assert_eq!(remaining(&m, &b), (tokens, calls));
        // Once full again, a cancel gives back nothing.
        let r = m.acquire(&b, 60, 1).unwrap();
        time.advance(ms(period_ms));
        assert_eq!(r.cancel(), applied(0, 0, 0));
        assert_eq!(remaining(&m, &b), (tokens, calls));
        assert_eq!(m.acquire(&b, tokens + 1, 0).unwrap_err().retry_after, None);
        m.acquire(&b, tokens, calls).map(drop).unwrap();
    }
}

for_both_managers! {
    fn overuse_is_debt_refused_until_repaid_at_the_exact_millisecond<M>() {
        let (m, time) = mocked::<M>();
        let a = agent();
        let (tokens, period_ms) = (100, 10_000);
        let (reserved, used) = (100, 150);
        m.set_refill(bucket(a, tokens, 10, ms(period_ms)));
        let r = m.acquire(&a, reserved, 1).unwrap();
        assert_eq!(r.settle(used), applied(0, used - reserved, 0));
        let info = m.full_info(&a).unwrap();
        assert_eq!((info.tokens_used, info.tokens_remaining), (used, 0));
        assert_eq!(info.window_remaining_secs, ms_until(used, tokens, period_ms) / 1_000);
        // One token fits once the debt and one more have refilled.
        let repaid = ms_until(used - tokens + 1, tokens, period_ms);
        assert_eq!(m.acquire(&a, 1, 0).unwrap_err().retry_after, Some(ms(repaid)));
        time.advance(ms(repaid - 1));
        assert_eq!(m.acquire(&a, 1, 0).unwrap_err().retry_after, Some(ms(1)));
        assert_eq!(m.remaining(&a).tokens_remaining, 0);
        time.advance(ms(1));
        m.acquire(&a, 1, 0).map(drop).unwrap();
        assert_eq!(m.full_info(&a).unwrap().tokens_used, tokens);
    }
}

for_both_managers! {
    fn switching_between_windows_and_buckets_keeps_what_is_in_use<M>() {
        let (m, time) = mocked::<M>();
        let a = agent();
        let (tokens, calls, window_secs, period_ms) = (100, 10, 60, 10_000);
        let used = |m: &M| {
            let info = m.full_info(&a).unwrap();
            (info.tokens_used, info.calls_used)
        };
        m.set_budget(limit(a, tokens, calls, window_secs));
        m.acquire(&a, 70, 3).map(drop).unwrap();
        // Window to bucket: still 70 and 3 in use, now refilling.
        m.set_refill(bucket(a, tokens, calls, ms(period_ms)));
        assert_eq!(used(&m), (70, 3));
        assert_eq!(remaining(&m, &a), (30, 7));
        assert_eq!(m.full_info(&a).unwrap().window_secs, period_ms / 1_000);
        time.advance(ms(1_000));
        let back = (refilled(tokens, 1_000, period_ms), refilled(calls, 1_000, period_ms));
        assert_eq!(used(&m), (70 - back.0, 3 - back.1));
        // Bucket to a faster bucket: same in use, refilling at the new rate.
        m.set_refill(bucket(a, 2 * tokens, 2 * calls, ms(period_ms)));
        let in_use = (70 - back.0, 3 - back.1);
        assert_eq!(used(&m), in_use);
        time.advance(ms(1_000));
        let back = (refilled(2 * tokens, 1_000, period_ms), refilled(2 * calls, 1_000, period_ms));
        let in_use = (in_use.0 - back.0, in_use.1 - back.1);
        assert_eq!(used(&m), in_use);
        // Bucket to window: the same in use, in a window starting now.
        m.set_budget(limit(a, tokens, calls, window_secs));
        assert_eq!(used(&m), in_use);
        let info = m.full_info(&a).unwrap();
        assert_eq!((info.window_secs, info.window_remaining_secs), (window_secs, window_secs));
        let err = m.acquire(&a, tokens - in_use.0 + 1, 0).unwrap_err();
        assert_eq!(err.retry_after, Some(Duration::from_secs(window_secs)));
        time.advance_secs(window_secs - 1);
        assert_eq!(used(&m), in_use, "no refill in a window");
        time.advance_secs(1);
        assert_eq!(used(&m), (0, 0));
    }
}

/// Everything but the seconds left, which the wall clock's passing between
/// persist and restore may tick down by one.
fn same_state(x: &[FullBudgetInfo], y: &[FullBudgetInfo]) {
    let strip = |i: &FullBudgetInfo| FullBudgetInfo {
        window_remaining_secs: 0,
        ..i.clone()
    };
    assert_eq!(
        x.iter().map(strip).collect::<Vec<_>>(),
        y.iter().map(strip).collect::<Vec<_>>()
    );
    for (x, y) in x.iter().zip(y) {
        assert!(
            x.window_remaining_secs.abs_diff(y.window_remaining_secs) <= 1,
            "{x:?} {y:?}"
        );
    }
}

#[test]
fn buckets_and_chains_persist_from_one_manager_to_the_other_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let (there, back) = (dir.path().join("there.json"), dir.path().join("back.json"));
    let (org, team, key) = (agent(), agent(), agent());
    // A token an hour at the org and the key; calls one per ten hours.
    let hour = Duration::from_secs(3_600);
    let (lock_free, time) = mocked::<BudgetManager>();
    lock_free.set_refill(bucket(org, 100, 10, 100 * hour));
    lock_free.set_budget(limit(team, 45, 100, 7_200));
    lock_free.set_refill(bucket(key, 50, 5, 50 * hour));
    lock_free.set_parent(&team, Some(&org)).unwrap();
    lock_free.set_parent(&key, Some(&team)).unwrap();
    lock_free.acquire(&key, 40, 2).map(drop).unwrap();
    time.advance(hour / 2);
    lock_free.persist(&there).unwrap();

    let (locked, locked_time) = mocked::<LockedBudgetManager>();
    locked.restore(&there).unwrap();
    let ids = |chain: &[FullBudgetInfo]| chain.iter().map(|i| i.agent_id).collect::<Vec<_>>();
    assert_eq!(ids(&locked.chain_info(&key)), [key, team, org]);
    same_state(&locked.chain_info(&key), &lock_free.chain_info(&key));
    // The buckets go on refilling at their rates from where they were: the
    // first token comes back an hour after the acquire.
    let before = (remaining(&locked, &org), remaining(&locked, &key));
    locked_time.advance(hour / 2 - Duration::from_secs(60));
    assert_eq!((remaining(&locked, &org), remaining(&locked, &key)), before);
    locked_time.advance(Duration::from_secs(120));
    assert_eq!(remaining(&locked, &org), (before.0 .0 + 1, before.0 .1));
    assert_eq!(remaining(&locked, &key), (before.1 .0 + 1, before.1 .1));
    // The team still limits the key after the trip: 5 of its 45 tokens are
    // left, while the key has 11.
    assert_eq!(remaining(&locked, &key).0, 11);
    let err = locked.acquire(&key, 6, 0).unwrap_err();
    assert_eq!(err.refused_by, team);
    // The team's window is 61 minutes old, and a few real milliseconds.
    let left = Duration::from_secs(7_200 - 61 * 60);
    let retry = err.retry_after.unwrap();
    assert!(
        retry <= left && retry > left - Duration::from_secs(1),
        "{retry:?}"
    );
    locked.persist(&back).unwrap();

    let (again, _) = mocked::<BudgetManager>();
    again.restore(&back).unwrap();
    assert_eq!(ids(&again.chain_info(&key)), [key, team, org]);
    same_state(&again.chain_info(&key), &locked.chain_info(&key));
    let mut all = again.all_full_info();
    all.sort_by_key(|i| i.agent_id);
    let mut expected = locked.all_full_info();
    expected.sort_by_key(|i| i.agent_id);
    same_state(&all, &expected);
}

/// Go's `x/time/rate` `TestSimultaneousRequests`: fifteen requests at once
/// on a bucket of five that refills one an hour admit exactly five. The one
/// test on the real clock (the refill is too slow to matter).
#[test]
fn simultaneous_requests_admit_exactly_the_burst() {
    const BURST: u64 = 5;
    const REQUESTS: usize = 15;
    fn case<M: BudgetLimiter>() {
        let m = M::with_clock(quanta::Clock::new());
        let a = agent();
        let period = Duration::from_secs(3_600 * BURST);
        m.set_refill(bucket(a, BURST, BURST, period));
        let barrier = Barrier::new(REQUESTS);
        let admitted: u64 = thread::scope(|s| {
            let handles: Vec<_> = (0..REQUESTS)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        u64::from(m.acquire(&a, 1, 1).is_ok())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(admitted, BURST);
        assert_eq!(remaining(&m, &a), (0, 0));
    }
    case::<BudgetManager>();
    case::<LockedBudgetManager>();
}

for_both_managers! {
    /// Regression: the period in whole seconds, rounded up, overflowed for
    /// `Duration::MAX` (whole seconds u64::MAX and a fraction).
    fn a_refill_period_of_duration_max_never_panics<M>() {
        let (m, _) = mocked::<M>();
        let a = agent();
        m.set_refill(RefillLimit {
            agent_id: a,
            token_budget: 10,
            calls_budget: 1,
            refill_period: Duration::MAX,
        });
        let info = m.full_info(&a).unwrap();
        assert_eq!(info.window_secs, u64::MAX, "the period in whole seconds, rounded up (saturating)");
        assert_eq!(m.chain_info(&a).len(), 1);
        assert_eq!(m.all_full_info().len(), 1);
    }
}
