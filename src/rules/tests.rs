//! The rules, without threads: fixed windows (ported from the window
//! logic's first tests), token buckets, carried-over overuse and policy
//! switches.

use super::*;
use crate::types::{BudgetLimit, RefillLimit};
use proptest::prelude::*;

const SEC: u64 = 1_000_000_000;

fn policy(tokens: u64, calls: u64, window_secs: u64) -> Policy {
    Policy::from_limit(&BudgetLimit {
        agent_id: uuid::Uuid::nil(),
        token_budget: tokens,
        calls_budget: calls,
        window_secs,
    })
}

fn at(nanos: u64) -> Now {
    Now::from_nanos(nanos)
}

impl State {
    fn try_admit(self, p: &Policy, now: Now, tokens: u64, calls: u64) -> Result<State, Shortfall> {
        let (next, verdict) = self.admit(p, now, tokens, calls);
        verdict.map(|()| next)
    }
}

#[test]
fn a_refusal_that_observes_expiry_still_starts_the_new_window() {
    let p = policy(10, 1, 1);
    let w = State::fresh(at(0).start_tick());
    let (next, verdict) = w.admit(&p, at(3 * SEC), 11, 0);
    assert!(verdict.is_err());
    assert_eq!(next, State::fresh(at(3 * SEC).start_tick()));
    // Not expired: a refusal leaves the window exactly as it was.
    let (same, verdict) = next.admit(&p, at(3 * SEC), 0, 2);
    assert!(verdict.is_err());
    assert_eq!(same, next);
}

#[test]
fn rounding_never_ends_a_window_early() {
    let p = policy(10, 10, 1);
    // Started half a millisecond after the origin: rounds up to tick 1.
    let w = State::fresh(at(SEC / 2_000).start_tick());
    assert_eq!(w.mark, Tick(Tick::ORIGIN.0 + 1));
    assert!(!w.is_expired(&p, at(SEC / 2_000 + SEC - 1)));
    assert!(!w.is_expired(&p, at(SEC + SEC / 2_000)));
    assert!(w.is_expired(&p, at(SEC + SEC / 1_000)));
}

#[test]
fn a_window_started_on_a_tick_lasts_exactly_its_length() {
    let p = policy(10, 10, 60);
    let w = State::fresh(at(0).start_tick());
    assert!(!w.is_expired(&p, at(60 * SEC - 1)));
    assert!(w.is_expired(&p, at(60 * SEC)));
    assert_eq!(w.millis_left(&p, at(0)), 60_000);
    assert_eq!(w.millis_left(&p, at(59 * SEC + 1)), 1_000);
}

#[test]
fn a_clock_read_before_the_window_start_is_not_expiry() {
    let p = policy(10, 10, 1);
    let w = State::fresh(at(5 * SEC).start_tick());
    // Another core read a slightly earlier time.
    let earlier = at(5 * SEC - 3_000);
    assert!(!w.is_expired(&p, earlier));
    assert_eq!(w.current(&p, earlier), w);
    assert_eq!(w.millis_left(&p, earlier), 1_000);
}

#[test]
fn a_zero_second_window_lasts_one_millisecond_and_does_not_creep() {
    let p = policy(10, 10, 0);
    let mut w = State::fresh(at(0).start_tick());
    w = w.try_admit(&p, at(0), 10, 1).unwrap();
    assert!(w.try_admit(&p, at(SEC / 2_000), 1, 0).is_err());
    for step in 1..=100 {
        w = w.try_admit(&p, at(step * SEC / 1_000), 10, 1).unwrap();
        assert_eq!(w.mark, Tick(Tick::ORIGIN.0 + step));
    }
}

#[test]
fn resets_within_a_millisecond_still_name_distinct_windows() {
    let w = State::fresh(at(0).start_tick());
    let a = w.reset(at(10));
    let b = a.reset(at(20));
    assert!(w.mark < a.mark && a.mark < b.mark);
}

#[test]
fn admit_is_all_or_nothing_and_names_what_can_never_fit_first() {
    let p = policy(100, 2, 60);
    let w = State::fresh(at(0).start_tick());
    let w = w.try_admit(&p, at(0), 60, 1).unwrap();
    let err = w.try_admit(&p, at(0), 50, 2).unwrap_err();
    assert_eq!(err.resource, Resource::Tokens);
    assert_eq!((err.requested, err.remaining), (50, 40));
    // Short of tokens for now, but more calls than the limit: the calls
    // are named, since no wait can help.
    let err = w.try_admit(&p, at(0), 50, 5).unwrap_err();
    assert_eq!((err.resource, err.retry_after_ms), (Resource::Calls, None));
    let err = w.try_admit(&p, at(0), 40, 2).unwrap_err();
    assert_eq!(err.resource, Resource::Calls);
    assert_eq!((err.requested, err.remaining, err.used), (2, 1, 1));
    let w = w.try_admit(&p, at(0), 40, 1).unwrap();
    assert_eq!((w.tokens, w.calls), (100, 2));
    // Zero of an exhausted resource still fits.
    assert_eq!(w.try_admit(&p, at(0), 0, 0), Ok(w));
}

#[test]
fn retry_after_is_the_rest_of_the_window_or_none_if_it_never_fits() {
    let p = policy(100, 2, 60);
    let w = State::fresh(at(0).start_tick())
        .try_admit(&p, at(0), 100, 0)
        .unwrap();
    let err = w.try_admit(&p, at(15 * SEC), 1, 0).unwrap_err();
    assert_eq!(err.retry_after_ms, Some(45_000));
    let err = w.try_admit(&p, at(15 * SEC), 101, 0).unwrap_err();
    assert_eq!(err.retry_after_ms, None);
    let err = w.try_admit(&p, at(15 * SEC), 0, 3).unwrap_err();
    assert_eq!(err.retry_after_ms, None);
}

#[test]
fn budgets_beyond_the_fields_are_clamped_not_wrapped() {
    let p = policy(u64::MAX, u64::MAX, u64::MAX);
    assert_eq!(
        (p.tokens, p.calls, p.period),
        (MAX_TOKENS, MAX_CALLS, Policy::MAX_PERIOD)
    );
    let w = State::fresh(at(0).start_tick());
    let w = w.try_admit(&p, at(0), MAX_TOKENS, MAX_CALLS).unwrap();
    assert!(w.try_admit(&p, at(0), 1, 0).is_err());
    let err = w.try_admit(&p, at(0), u64::MAX, 0).unwrap_err();
    assert_eq!(err.retry_after_ms, None);
    // A window of u64::MAX seconds never ends, even at the end of time.
    assert!(!w.is_expired(&p, at(u64::MAX)));
    assert!(!State::fresh(Tick(1)).is_expired(&p, at(u64::MAX)));
}

#[test]
fn release_saturates_at_zero_and_respects_expiry() {
    let p = policy(100, 2, 1);
    let w = State::fresh(at(0).start_tick())
        .try_admit(&p, at(0), 30, 1)
        .unwrap();
    assert_eq!(w.release(&p, at(0), 10).tokens, 20);
    assert_eq!(w.release(&p, at(0), u64::MAX).tokens, 0);
    let later = w.release(&p, at(2 * SEC), 10);
    assert_eq!((later.tokens, later.calls), (0, 0));
    assert!(later.mark > w.mark);
}

#[test]
fn settle_refunds_or_charges_only_in_its_own_window() {
    let p = policy(100, 5, 60);
    let start = at(0).start_tick();
    let w = State::fresh(start).try_admit(&p, at(0), 80, 1).unwrap();
    let Refund::Applied { next: less, .. } = w.settle(&p, at(0), start, (80, 1), (30, 1)) else {
        panic!("window is current");
    };
    assert_eq!((less.tokens, less.calls), (30, 1));
    let Refund::Applied { next: more, .. } = w.settle(&p, at(0), start, (80, 1), (500, 1)) else {
        panic!("window is current");
    };
    assert_eq!(more.tokens, 500);
    let Refund::Applied {
        next: cancelled, ..
    } = w.settle(&p, at(0), start, (80, 1), (0, 0))
    else {
        panic!("window is current");
    };
    assert_eq!((cancelled.tokens, cancelled.calls), (0, 0));
    let huge = w.settle(&p, at(0), start, (0, 0), (u64::MAX, u64::MAX));
    assert_eq!(
        huge,
        Refund::Applied {
            next: State {
                tokens: MAX_TOKENS,
                calls: MAX_CALLS,
                mark: start
            },
            refunded: (0, 0),
            charged: (MAX_TOKENS - 80, MAX_CALLS - 1),
        }
    );
    // Expired but not yet rolled over, and rolled over: a refund is lost
    // with its window.
    assert_eq!(
        w.settle(&p, at(60 * SEC), start, (80, 1), (0, 0)),
        Refund::WindowEnded
    );
    let next = w.current(&p, at(61 * SEC));
    assert_eq!(
        next.settle(&p, at(61 * SEC), start, (80, 1), (0, 0)),
        Refund::WindowEnded
    );
}

proptest! {
    /// Whatever the operations, usage never exceeds the policy by
    /// admission (only a settle may charge past it), a fresh window's
    /// start never moves backwards, and admission agrees with a plain
    /// u128 model of the rule.
    #[test]
    fn admission_matches_a_wide_arithmetic_model(
        tokens_budget in prop_oneof![0..200u64, Just(MAX_TOKENS), Just(u64::MAX)],
        calls_budget in prop_oneof![0..10u64, Just(u64::MAX)],
        window_secs in prop_oneof![0..3u64, Just(u64::MAX)],
        ops in prop::collection::vec((0..4u8, any::<u64>(), 0..3u64, 0..1_500_000_000u64), 1..60),
    ) {
        let p = policy(tokens_budget, calls_budget, window_secs);
        let mut nanos = 0u64;
        let mut w = State::fresh(at(nanos).start_tick());
        for (op, amount, calls, advance) in ops {
            nanos += advance;
            let now = at(nanos);
            let amount = if op == 3 { amount % 300 } else { amount };
            let seen = w.current(&p, now);
            prop_assert!(seen.mark >= w.mark);
            match op {
                0 | 3 => {
                    let fits = u128::from(seen.tokens) + u128::from(amount) <= u128::from(p.tokens)
                        && u128::from(seen.calls) + u128::from(calls) <= u128::from(p.calls);
                    match w.try_admit(&p, now, amount, calls) {
                        Ok(next) => {
                            prop_assert!(fits);
                            prop_assert_eq!(next.tokens, seen.tokens + amount);
                            w = next;
                        }
                        Err(_) => prop_assert!(!fits),
                    }
                }
                1 => w = w.release(&p, now, amount),
                _ => w = w.reset(now),
            }
            prop_assert!(w.tokens <= p.tokens && w.calls <= p.calls);
        }
    }
}

// ---------------------------------------------------------------------------
// Overuse carried over.

#[test]
fn overuse_reported_after_the_window_ended_is_charged_to_the_current_window() {
    let p = policy(100, 5, 60);
    let start = at(0).start_tick();
    let w = State::fresh(start).try_admit(&p, at(0), 10, 1).unwrap();
    // The window ends; the next one has 30 tokens used already.
    let next = w.try_admit(&p, at(61 * SEC), 30, 1).unwrap();
    let Refund::CarriedOver {
        next: after,
        charged,
    } = next.settle(&p, at(62 * SEC), start, (10, 1), (10_000, 1))
    else {
        panic!("the excess is owed to the current window");
    };
    assert_eq!(charged, (9_990, 0));
    assert_eq!(
        (after.tokens, after.calls, after.mark),
        (30 + 9_990, 1, next.mark)
    );
    // Expired but not yet rolled over: the charge rolls it over first.
    let Refund::CarriedOver {
        next: after,
        charged,
    } = w.settle(&p, at(60 * SEC), start, (10, 1), (15, 1))
    else {
        panic!("the excess is owed to the current window");
    };
    assert_eq!((charged, after.tokens, after.calls), ((5, 0), 5, 0));
    assert!(after.mark > start);
    // A refund is still never carried.
    assert_eq!(
        next.settle(&p, at(62 * SEC), start, (10, 1), (3, 1)),
        Refund::WindowEnded
    );
}

// ---------------------------------------------------------------------------
// Token buckets.

const MS: u64 = 1_000_000;

fn bucket(tokens: u64, calls: u64, period: std::time::Duration) -> Policy {
    Policy::from_refill(&RefillLimit {
        agent_id: uuid::Uuid::nil(),
        token_budget: tokens,
        calls_budget: calls,
        refill_period: period,
    })
}

fn ms(millis: u64) -> std::time::Duration {
    std::time::Duration::from_millis(millis)
}

/// Whether a request of `(tokens, calls)` fits at `now`.
fn fits(s: State, p: &Policy, now: Now, tokens: u64, calls: u64) -> bool {
    s.admit(p, now, tokens, calls).1.is_ok()
}

#[test]
fn a_bucket_starts_full_and_refills_floor_of_budget_times_elapsed_over_period() {
    let p = bucket(1_000, 10, ms(1_000));
    let full = State::fresh(at(0).start_tick());
    assert_eq!(full.read(&p, at(0)).remaining, (1_000, 10));
    let drained = full.try_admit(&p, at(0), 1_000, 10).unwrap();
    for elapsed in [0, 1, 7, 333, 999, 1_000, 5_000] {
        let reading = drained.read(&p, at(elapsed * MS));
        let expected_tokens = (1_000 * elapsed / 1_000).min(1_000);
        let expected_calls = (10 * elapsed / 1_000).min(10);
        assert_eq!(
            reading.remaining,
            (expected_tokens, expected_calls),
            "after {elapsed} ms"
        );
    }
    // Exactly full again after one period, not a millisecond before.
    assert!(!fits(drained, &p, at(999 * MS), 1_000, 10));
    assert!(fits(drained, &p, at(1_000 * MS), 1_000, 10));
    assert_eq!(drained.read(&p, at(400 * MS)).millis_to_reset, 600);
}

#[test]
fn retry_after_is_the_time_until_enough_has_refilled() {
    // 10 a second, bursts of 1: one call every 100 ms.
    let p = bucket(0, 1, ms(100));
    let s = State::fresh(at(0).start_tick())
        .try_admit(&p, at(0), 0, 1)
        .unwrap();
    let refusal = s.try_admit(&p, at(30 * MS), 0, 1).unwrap_err();
    assert_eq!(
        (refusal.resource, refusal.retry_after_ms),
        (Resource::Calls, Some(70))
    );
    let refusal = s.try_admit(&p, at(30 * MS), 0, 2).unwrap_err();
    assert_eq!(
        refusal.retry_after_ms, None,
        "more than a full bucket never fits"
    );
    // 1,000 tokens a second: 250 short after a drain takes 250 ms.
    let p = bucket(1_000, 100, ms(1_000));
    let s = State::fresh(at(0).start_tick())
        .try_admit(&p, at(0), 900, 1)
        .unwrap();
    let refusal = s.try_admit(&p, at(100 * MS), 450, 1).unwrap_err();
    // 900 − 100 refilled = 800 in use; 450 needs 250 more: 250 ms.
    assert_eq!(refusal.retry_after_ms, Some(250));
    assert!(!fits(s, &p, at(349 * MS), 450, 1));
    assert!(fits(s, &p, at(350 * MS), 450, 1));
}

/// Go's `x/time/rate` `TestLimiterBurst1`: 10 per second, bursts of 1.
#[test]
fn go_rate_burst_of_one() {
    let p = bucket(0, 1, ms(100));
    let mut s = State::fresh(at(0).start_tick());
    let steps = [
        (0, 1, true),
        (0, 1, false),
        (0, 1, false),
        (100, 1, true),
        (100, 1, false),
        (100, 1, false),
        (200, 2, false),
        (200, 1, true),
        (200, 1, false),
    ];
    for (i, (t, n, ok)) in steps.into_iter().enumerate() {
        let (next, verdict) = s.admit(&p, at(t * MS), 0, n);
        assert_eq!(verdict.is_ok(), ok, "step {i}: {n} at t{t}");
        s = next;
    }
}

/// Go's `x/time/rate` `TestLimiterBurst3`: 10 per second, bursts of 3.
#[test]
fn go_rate_burst_of_three() {
    let p = bucket(0, 3, ms(300));
    let mut s = State::fresh(at(0).start_tick());
    let steps = [
        (0, 2, true),
        (0, 2, false),
        (0, 1, true),
        (0, 1, false),
        (100, 4, false),
        (200, 1, true),
        (300, 1, true),
        (400, 1, true),
        (400, 1, true),
        (400, 1, false),
        (400, 1, false),
        (900, 3, true),
        (900, 0, true),
    ];
    for (i, (t, n, ok)) in steps.into_iter().enumerate() {
        let (next, verdict) = s.admit(&p, at(t * MS), 0, n);
        assert_eq!(verdict.is_ok(), ok, "step {i}: {n} at t{t}");
        s = next;
    }
}

/// Go's `x/time/rate` `TestLongRunningQPS`, on a mock clock: 100 per
/// second, bursts of 100, offered every 2 ms for 5 s. Admitted must be
/// `burst + rate × elapsed` to within 0.1% (Go allows +1 above).
#[test]
fn go_rate_long_running_qps() {
    let p = bucket(0, 100, ms(1_000));
    let mut s = State::fresh(at(0).start_tick());
    let mut admitted = 0u64;
    let mut t = 0;
    while t <= 5_000 {
        let (next, verdict) = s.admit(&p, at(t * MS), 0, 1);
        admitted += u64::from(verdict.is_ok());
        s = next;
        t += 2;
    }
    let ideal = 100.0 + 100.0 * 5.0;
    assert!(
        (admitted as f64) <= ideal + 1.0,
        "admitted {admitted}, ideal {ideal}"
    );
    assert!(
        (admitted as f64) >= 0.999 * ideal,
        "admitted {admitted}, ideal {ideal}"
    );
}

#[test]
fn debt_from_overuse_is_paid_back_before_anything_is_admitted() {
    let p = bucket(100, 10, ms(1_000));
    let start = at(0).start_tick();
    let s = State::fresh(start).try_admit(&p, at(0), 50, 1).unwrap();
    let Refund::Applied { next: owing, .. } = s.settle(&p, at(0), start, (50, 1), (250, 1)) else {
        panic!("a bucket books every settle");
    };
    let reading = owing.read(&p, at(0));
    assert_eq!((reading.used, reading.remaining), ((250, 1), (0, 9)));
    // 150 of debt is 1.5 s of refill; one token more is 10 ms after that.
    let refusal = owing.try_admit(&p, at(0), 1, 0).unwrap_err();
    assert_eq!(refusal.retry_after_ms, Some(1_510));
    assert!(!fits(owing, &p, at(1_509 * MS), 1, 0));
    assert!(fits(owing, &p, at(1_510 * MS), 1, 0));
    assert_eq!(owing.read(&p, at(0)).millis_to_reset, 2_500);
}

#[test]
fn refunds_go_back_into_the_bucket_never_above_full() {
    let p = bucket(100, 10, ms(1_000));
    let start = at(0).start_tick();
    let s = State::fresh(start).try_admit(&p, at(0), 80, 2).unwrap();
    let Refund::Applied { next: half, .. } = s.settle(&p, at(500 * MS), start, (80, 2), (30, 2))
    else {
        panic!("a bucket books every settle");
    };
    // 80 tokens taken, 50 refilled by 500 ms, 50 refunded: full; the two
    // calls refilled (5 a half-second) long ago.
    assert_eq!(half.read(&p, at(500 * MS)).remaining, (100, 10));
    let Refund::Applied {
        next: cancelled, ..
    } = s.settle(&p, at(900 * MS), start, (80, 2), (0, 0))
    else {
        panic!("a bucket books every settle");
    };
    assert_eq!(cancelled.read(&p, at(900 * MS)).remaining, (100, 10));
}

#[test]
fn rates_at_both_ends_of_the_promised_range_are_exact() {
    // One per hour.
    let p = bucket(1, 1, std::time::Duration::from_secs(3_600));
    let s = State::fresh(at(0).start_tick())
        .try_admit(&p, at(0), 1, 1)
        .unwrap();
    assert_eq!(
        s.try_admit(&p, at(0), 1, 1).unwrap_err().retry_after_ms,
        Some(3_600_000)
    );
    assert!(!fits(s, &p, at(3_599_999 * MS), 1, 1));
    assert!(fits(s, &p, at(3_600_000 * MS), 1, 1));
    // 10^9 calls a second: 10^6 a millisecond.
    let p = bucket(0, 1_000_000_000, ms(1_000));
    let s = State::fresh(at(0).start_tick())
        .try_admit(&p, at(0), 0, 1_000_000_000)
        .unwrap();
    assert_eq!(s.read(&p, at(MS)).remaining.1, 1_000_000);
    assert_eq!(s.read(&p, at(777 * MS)).remaining.1, 777_000_000);
    // 10^12 tokens over ten years.
    let ten_years = std::time::Duration::from_secs(10 * 365 * 86_400);
    let p = bucket(1_000_000_000_000, 1, ten_years);
    let s = State::fresh(at(0).start_tick())
        .try_admit(&p, at(0), 1_000_000_000_000, 0)
        .unwrap();
    let one_year = 365 * 86_400 * 1_000 * MS;
    assert_eq!(s.read(&p, at(one_year)).remaining.0, 100_000_000_000);
    assert_eq!(s.read(&p, at(10 * one_year)).remaining.0, 1_000_000_000_000);
}

#[test]
fn zero_and_extreme_periods_and_budgets_never_panic() {
    for period in [
        std::time::Duration::ZERO,
        std::time::Duration::from_nanos(1),
        std::time::Duration::MAX,
    ] {
        for budget in [0, 1, u64::MAX] {
            let p = bucket(budget, budget, period);
            assert!(p.period >= 1 && p.period <= Policy::MAX_PERIOD);
            let mut s = State::fresh(at(0).start_tick());
            for t in [0, 1, MS, u64::MAX / 2, u64::MAX] {
                for n in [0, 1, u64::MAX] {
                    let (next, _) = s.admit(&p, at(t), n, n);
                    s = next;
                    let _ = s.read(&p, at(t));
                    let _ = s.settle(&p, at(t), s.mark, (n, n), (u64::MAX, u64::MAX));
                    s = s.release(&p, at(t), n);
                }
            }
        }
    }
}

proptest! {
    /// A bucket never used is exactly full after any amount of time.
    #[test]
    fn a_bucket_never_used_is_full_at_any_time(
        tokens in any::<u64>(), calls in any::<u64>(),
        period_ms in 1..=Policy::MAX_PERIOD, nanos in any::<u64>(),
    ) {
        let p = bucket(tokens, calls, ms(period_ms));
        let s = State::fresh(at(0).start_tick());
        prop_assert_eq!(s.read(&p, at(nanos)).remaining, (p.tokens, p.calls));
    }

    /// A bucket drained and left alone for one period is exactly full again,
    /// and not a millisecond before (when a unit takes at least that long).
    #[test]
    fn a_drained_bucket_is_full_after_exactly_one_period(
        tokens in 1..=Policy::MAX_BUCKET_TOKENS, calls in 1..=Policy::MAX_BUCKET_CALLS,
        period_ms in 1..=10 * 366 * 86_400 * 1_000u64, drained_at_ms in 0..100_000u64,
    ) {
        let p = bucket(tokens, calls, ms(period_ms));
        let drained_at = at(drained_at_ms * MS);
        let s = State::fresh(at(0).start_tick()).try_admit(&p, drained_at, tokens, calls).unwrap();
        prop_assert_eq!(s.read(&p, at((drained_at_ms + period_ms) * MS)).remaining, (tokens, calls));
        let before = s.read(&p, at((drained_at_ms + period_ms - 1) * MS)).remaining;
        prop_assert!(before != (tokens, calls));
    }

    /// No drift: taking one unit whenever one is there admits, step after
    /// step, exactly what a continuous token bucket computed in exact
    /// fractions admits (one that counts its level in units of
    /// `1 / period`, so nothing is ever rounded). The bucket fills up
    /// between sparse steps and then wastes refill, as a real one does;
    /// the two must agree on that too.
    #[test]
    fn many_small_admissions_match_an_exact_continuous_bucket(
        budget in 1..2_000u64, period_ms in 1..100_000u64,
        steps in prop::collection::vec(1..=300u64, 1..100),
    ) {
        let p = bucket(budget, 0, ms(period_ms));
        let mut small = State::fresh(at(0).start_tick()).try_admit(&p, at(0), budget, 0).unwrap();
        // The exact bucket: level × period, drained at 0.
        let (full, unit) = (u128::from(budget) * u128::from(period_ms), u128::from(period_ms));
        let (mut level, mut last) = (0u128, 0u64);
        let (mut taken, mut exact) = (0u64, 0u64);
        // Steps are thousandths of a period, over three periods at most.
        let mut t = 0u64;
        for step in steps {
            t += (step * period_ms / 1_000).max(1);
            if t > 3 * period_ms {
                break;
            }
            level = (level + u128::from(budget) * u128::from(t - last)).min(full);
            last = t;
            while level >= unit {
                level -= unit;
                exact += 1;
            }
            loop {
                let (next, verdict) = small.admit(&p, at(t * MS), 1, 0);
                if verdict.is_err() { break; }
                small = next;
                taken += 1;
            }
            prop_assert_eq!(taken, exact, "after {} ms", t);
        }
    }

    /// A single request at any time, on a bucket drained at 0, finds
    /// exactly `floor(budget × t / period)` (up to full).
    #[test]
    fn one_large_request_finds_exactly_what_refilled(
        budget in 1..1_000_000u64, period_ms in 1..1_000_000u64, t in 0..3_000_000u64,
    ) {
        let p = bucket(budget, 0, ms(period_ms));
        let drained = State::fresh(at(0).start_tick()).try_admit(&p, at(0), budget, 0).unwrap();
        let refilled = u128::from(budget) * u128::from(t) / u128::from(period_ms);
        let large = u64::try_from(refilled).unwrap().min(budget);
        prop_assert!(fits(drained, &p, at(t * MS), large, 0));
        prop_assert!(large == budget || !fits(drained, &p, at(t * MS), large + 1, 0));
    }
}

// ---------------------------------------------------------------------------
// Switching policies.

#[test]
fn switching_between_a_window_and_a_bucket_keeps_what_was_spent() {
    let window = policy(1_000, 10, 60);
    let refill = bucket(1_000, 10, ms(60_000));
    let w = State::fresh(at(0).start_tick())
        .try_admit(&window, at(0), 700, 4)
        .unwrap();
    let b = w.convert(&window, &refill, at(10 * SEC));
    assert_eq!(b.read(&refill, at(10 * SEC)).used, (700, 4));
    // The bucket refills from the switch on: 60 s refill 1,000 tokens.
    assert_eq!(b.read(&refill, at(16 * SEC)).used, (600, 3));
    let back = b.convert(&refill, &window, at(16 * SEC));
    assert_eq!(back.read(&window, at(16 * SEC)).used, (600, 3));
    // A fresh window from the switch, with that usage in it.
    assert_eq!(back.read(&window, at(16 * SEC)).millis_to_reset, 60_000);
    // Window to window keeps the window and its usage.
    let wider = policy(2_000, 20, 120);
    assert_eq!(w.convert(&window, &wider, at(10 * SEC)), w);
}

#[test]
fn a_take_past_the_limit_counts_beyond_it_and_settles_like_a_reservation() {
    let p = policy(100, 2, 60);
    let w = State::fresh(at(0).start_tick());
    let full = w.try_admit(&p, at(0), 100, 2).unwrap();
    let past = full.admit_past(&p, at(SEC), 30, 1);
    assert_eq!((past.tokens, past.calls, past.mark), (130, 3, full.mark));
    let reading = past.read(&p, at(SEC));
    assert_eq!(reading.used, (130, 3));
    assert_eq!(reading.remaining, (0, 0));
    // Settled for less than taken: the difference comes back, in its window.
    match past.settle(&p, at(2 * SEC), past.mark, (30, 1), (10, 1)) {
        Refund::Applied { next, .. } => assert_eq!((next.tokens, next.calls), (110, 3)),
        other => panic!("settled in its own window: {other:?}"),
    }
    // In an ended window, it goes into a fresh one.
    let later = full.admit_past(&p, at(61 * SEC), 30, 1);
    assert_ne!(later.mark, full.mark);
    assert_eq!((later.tokens, later.calls), (30, 1));
    // At the field's width it saturates instead of wrapping.
    let huge = past.admit_past(&p, at(SEC), u64::MAX, u64::MAX);
    assert_eq!((huge.tokens, huge.calls), (MAX_TOKENS, MAX_CALLS));
}

#[test]
fn a_bucket_taken_past_empty_refills_through_its_debt() {
    let p = bucket(1_000, 10, ms(1_000));
    let full = State::fresh(at(0).start_tick());
    let empty = full.try_admit(&p, at(0), 1_000, 10).unwrap();
    let past = empty.admit_past(&p, at(0), 500, 5);
    assert_eq!(past.read(&p, at(0)).used, (1_500, 15));
    // Half a period refills 500 tokens and 5 calls: the debt, nothing more.
    assert_eq!(past.read(&p, at(500 * MS)).remaining, (0, 0));
    assert_eq!(past.read(&p, at(1_000 * MS)).remaining, (500, 5));
    assert_eq!(past.read(&p, at(1_500 * MS)).remaining, (1_000, 10));
}
