//! Windows on the UTC calendar (`set_calendar`), on both managers, on a
//! mock clock whose zero is a chosen UTC instant: day and month ends,
//! months of every length, leap years, the year's end, reservations across
//! a boundary, `full_info`, and persistence.

mod common;

use std::time::Duration;

use agent_budget::{
    AgentId, BudgetLimiter, CalendarLimit, CalendarPeriod, RefusalReason, Settlement,
};
use chrono::{DateTime, Utc};
use common::{agent, MockTime};

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// A manager whose clock reads `start` (UTC) now.
fn at<M: BudgetLimiter>(start: &str) -> (M, MockTime) {
    let (clock, mock) = quanta::Clock::mock();
    (M::with_clock_at(clock, utc(start)), MockTime(mock))
}

fn calendar(agent_id: AgentId, tokens: u64, period: CalendarPeriod) -> CalendarLimit {
    CalendarLimit {
        agent_id,
        token_budget: tokens,
        calls_budget: 1_000,
        period,
    }
}

/// Moves the mock clock from `from` to `to` (both UTC).
fn advance_to(time: &MockTime, from: &str, to: &str) {
    let by = utc(to) - utc(from);
    time.advance(by.to_std().expect("forward"));
}

/// Uses up an agent's tokens now, then checks when the window ends: still
/// refused one millisecond before `end` (with `retry_after` that
/// millisecond), admitted at `end`, with the full budget back.
fn ends_at<M: BudgetLimiter>(m: &M, time: &MockTime, a: &AgentId, now: &str, end: &str) {
    let left = m.remaining(a).tokens_remaining;
    m.acquire(a, left, 0)
        .expect("what is left fits")
        .settle(left);
    let to_end = (utc(end) - utc(now)).to_std().unwrap();
    let err = m.acquire(a, 1, 0).unwrap_err();
    assert_eq!(
        err.retry_after,
        Some(to_end),
        "now {now}, window ends {end}"
    );
    time.advance(to_end - Duration::from_millis(1));
    let err = m.acquire(a, 1, 0).unwrap_err();
    assert_eq!(err.retry_after, Some(Duration::from_millis(1)));
    time.advance(Duration::from_millis(1));
    let info = m.full_info(a).unwrap();
    assert_eq!(info.tokens_used, 0, "a new window at {end}");
    m.acquire(a, info.token_limit, 0)
        .expect("the whole budget is back")
        .cancel();
}

for_both_managers! {
    fn days_end_at_midnight_utc<M>() {
        let (m, time) = at::<M>("2025-06-10T13:45:00Z");
        let a = agent();
        m.set_calendar(calendar(a, 100, CalendarPeriod::Day));
        let info = m.full_info(&a).unwrap();
        assert_eq!(info.window_secs, 86_400);
        assert_eq!(info.window_remaining_secs, (10 * 3_600 + 15 * 60) as u64);
        ends_at(&m, &time, &a, "2025-06-10T13:45:00Z", "2025-06-11T00:00:00Z");
        // And the next day ends a whole day later.
        ends_at(&m, &time, &a, "2025-06-11T00:00:00Z", "2025-06-12T00:00:00Z");
    }
}

for_both_managers! {
    fn months_end_on_the_first_whatever_their_length<M>() {
        // Jan 31 -> Feb 1, then February of a leap year (29 days), March.
        let (m, time) = at::<M>("2024-01-31T22:00:00Z");
        let a = agent();
        m.set_calendar(calendar(a, 100, CalendarPeriod::Month));
        assert_eq!(m.full_info(&a).unwrap().window_secs, 31 * 86_400);
        ends_at(&m, &time, &a, "2024-01-31T22:00:00Z", "2024-02-01T00:00:00Z");
        assert_eq!(m.full_info(&a).unwrap().window_secs, 29 * 86_400);
        // Feb 28 is not the end in 2024: Feb 29 is a day of February.
        advance_to(&time, "2024-02-01T00:00:00Z", "2024-02-28T23:59:59Z");
        m.acquire(&a, 100, 0).unwrap().settle(100);
        advance_to(&time, "2024-02-28T23:59:59Z", "2024-02-29T12:00:00Z");
        assert_eq!(m.acquire(&a, 1, 0).unwrap_err().retry_after, Some(Duration::from_secs(12 * 3_600)));
        ends_at(&m, &time, &a, "2024-02-29T12:00:00Z", "2024-03-01T00:00:00Z");
        assert_eq!(m.full_info(&a).unwrap().window_secs, 31 * 86_400);
    }
}

for_both_managers! {
    fn february_of_a_common_year_ends_after_the_28th<M>() {
        let (m, time) = at::<M>("2025-02-28T23:00:00Z");
        let a = agent();
        m.set_calendar(calendar(a, 100, CalendarPeriod::Month));
        assert_eq!(m.full_info(&a).unwrap().window_secs, 28 * 86_400);
        ends_at(&m, &time, &a, "2025-02-28T23:00:00Z", "2025-03-01T00:00:00Z");
        // A day window across the same night.
        let (m, time) = at::<M>("2025-02-28T23:00:00Z");
        m.set_calendar(calendar(a, 100, CalendarPeriod::Day));
        ends_at(&m, &time, &a, "2025-02-28T23:00:00Z", "2025-03-01T00:00:00Z");
    }
}

for_both_managers! {
    fn the_year_ends_with_december<M>() {
        let (m, time) = at::<M>("2025-12-31T23:59:30Z");
        let (month, day) = (agent(), agent());
        m.set_calendar(calendar(month, 100, CalendarPeriod::Month));
        m.set_calendar(calendar(day, 100, CalendarPeriod::Day));
        ends_at(&m, &time, &month, "2025-12-31T23:59:30Z", "2026-01-01T00:00:00Z");
        assert_eq!(m.full_info(&month).unwrap().window_secs, 31 * 86_400);
        assert_eq!(m.full_info(&day).unwrap().tokens_used, 0);
        assert_eq!(m.full_info(&day).unwrap().window_remaining_secs, 86_400);
    }
}

for_both_managers! {
    fn an_idle_agent_finds_the_month_it_is_in<M>() {
        let (m, time) = at::<M>("2025-01-15T00:00:00Z");
        let a = agent();
        m.set_calendar(calendar(a, 100, CalendarPeriod::Month));
        m.acquire(&a, 60, 1).unwrap().settle(60);
        // Months pass with nothing happening: the window is the current
        // month, not the one after the last seen.
        advance_to(&time, "2025-01-15T00:00:00Z", "2025-04-20T06:00:00Z");
        let info = m.full_info(&a).unwrap();
        assert_eq!((info.tokens_used, info.window_secs), (0, 30 * 86_400));
        assert_eq!(info.window_remaining_secs, 10 * 86_400 + 18 * 3_600);
        ends_at(&m, &time, &a, "2025-04-20T06:00:00Z", "2025-05-01T00:00:00Z");
    }
}

for_both_managers! {
    fn a_reservation_settles_in_the_month_it_was_taken_in<M>() {
        let (m, time) = at::<M>("2025-03-31T23:00:00Z");
        let a = agent();
        m.set_calendar(calendar(a, 100, CalendarPeriod::Month));
        let early = m.acquire(&a, 50, 1).unwrap();
        let late = m.acquire(&a, 10, 1).unwrap();
        advance_to(&time, "2025-03-31T23:00:00Z", "2025-04-01T00:30:00Z");
        // April: a refund of March's is lost, an overuse is carried over.
        assert_eq!(early.settle(20), Settlement::WindowEnded);
        assert_eq!(late.settle(25), Settlement::CarriedOver { charged_tokens: 15 });
        assert_eq!(m.full_info(&a).unwrap().tokens_used, 15);
        let err = m.acquire(&a, 86, 0).unwrap_err();
        assert!(matches!(err.reason, RefusalReason::Exceeded { remaining: 85, .. }), "{err:?}");
    }
}

for_both_managers! {
    fn a_fixed_window_switched_to_the_calendar_keeps_its_usage<M>() {
        let (m, time) = at::<M>("2025-05-31T20:00:00Z");
        let a = agent();
        m.set_budget(common::limit(a, 100, 10, 3_600));
        m.acquire(&a, 40, 1).unwrap().settle(40);
        m.set_calendar(calendar(a, 100, CalendarPeriod::Day));
        let info = m.full_info(&a).unwrap();
        assert_eq!((info.tokens_used, info.window_secs, info.window_remaining_secs), (40, 86_400, 4 * 3_600));
        ends_at(&m, &time, &a, "2025-05-31T20:00:00Z", "2025-06-01T00:00:00Z");
    }
}

for_both_managers! {
    fn calendar_budgets_persist_and_restore<M>() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (m, _time) = at::<M>("2025-07-31T10:00:00Z");
        let a = agent();
        m.set_calendar(calendar(a, 100, CalendarPeriod::Month));
        m.acquire(&a, 30, 2).unwrap().settle(30);
        m.persist(&path).unwrap();
        let json = std::fs::read_to_string(&path).unwrap();
        assert!(json.contains("\"calendars\"") && json.contains("\"month\""), "{json}");

        // Restored the same day: the month's usage is kept.
        let (restored, time) = at::<M>("2025-07-31T12:00:00Z");
        restored.restore(&path).unwrap();
        assert_eq!(restored.full_info(&a), m.full_info(&a).map(|mut info| {
            info.window_remaining_secs -= 2 * 3_600;
            info
        }));
        ends_at(&restored, &time, &a, "2025-07-31T12:00:00Z", "2025-08-01T00:00:00Z");
        // Restored next month: a fresh window.
        let (later, _time) = at::<M>("2025-08-02T00:00:00Z");
        later.restore(&path).unwrap();
        let info = later.full_info(&a).unwrap();
        assert_eq!((info.tokens_used, info.calls_used, info.window_secs), (0, 0, 31 * 86_400));
    }
}
