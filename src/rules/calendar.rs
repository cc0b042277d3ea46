//! Calendar windows: fixed windows whose boundaries are UTC days or months.
//!
//! The mark is a tick inside the current window (where it started, or the
//! first operation that found the last one over); the window is the UTC day
//! or month that contains it, so its end is computed from the mark: the
//! next boundary after it. Everything else (expiry, rollover, refunds into
//! the reservation's own window) is the fixed window's rule (`fixed.rs`).
//!
//! Ticks become UTC through the reading's [`Now::unix_millis_at_origin`]:
//! the manager's clock zero mapped to a UTC instant when it was created.
//! Dates use the proleptic Gregorian calendar (Howard Hinnant's
//! `days_from_civil` and `civil_from_days`): pure integer arithmetic, so no
//! date can fail to convert and nothing can panic.

use super::{Now, Tick};
use crate::types::CalendarPeriod;

const MILLIS_PER_DAY: i64 = 86_400_000;

/// Days since 1970-01-01 of the date `y`-`m`-`d` (`m` in 1..=12).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date (`y`, `m`, `d`) of `days` since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The start (Unix milliseconds) of the window containing `unix_ms`, and
/// the start of the next one.
pub(crate) fn window_around(period: CalendarPeriod, unix_ms: i64) -> (i64, i64) {
    let day = unix_ms.div_euclid(MILLIS_PER_DAY);
    match period {
        CalendarPeriod::Day => (day * MILLIS_PER_DAY, (day + 1) * MILLIS_PER_DAY),
        CalendarPeriod::Month => {
            let (y, m, _) = civil_from_days(day);
            let (next_y, next_m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            (
                days_from_civil(y, m, 1) * MILLIS_PER_DAY,
                days_from_civil(next_y, next_m, 1) * MILLIS_PER_DAY,
            )
        }
    }
}

/// The calendar window the mark `mark` is in, as ticks: (start, end). Ticks
/// outside the timeline are clamped to it.
///
/// Remembers its last answer on each thread: a calendar limit asks for
/// the same window several times per request (expiry, time left, the
/// settle, `full_info`), and every limit of one period on one manager
/// asks for the same few windows, whatever its mark; the dates cost 1,800
/// instructions a request of the gateway's bench with a monthly spend
/// limit (callgrind). A remembered window answers any mark inside it,
/// for the same period and clock origin: the window that contains a mark
/// is the computed one, and windows of one period do not overlap.
pub(crate) fn window_of(period: CalendarPeriod, mark: Tick, now: Now) -> (Tick, Tick) {
    let origin = now.unix_millis_at_origin();
    let key = (period == CalendarPeriod::Month, origin);
    let remembered = LAST_WINDOW.with(|last| {
        last.get()
            .filter(|&(k, (start, end))| k == key && start <= mark && mark < end)
            .map(|(_, window)| window)
    });
    if let Some(window) = remembered {
        return window;
    }
    let window = compute_window_of(period, mark, origin);
    LAST_WINDOW.with(|last| last.set(Some((key, window))));
    window
}

/// The period (as "is a month") and clock origin of a thread's last
/// [`window_of`], and the window it answered.
type LastWindow = Option<((bool, i64), (Tick, Tick))>;

std::thread_local! {
    static LAST_WINDOW: std::cell::Cell<LastWindow> = const { std::cell::Cell::new(None) };
}

/// [`window_of`], computed.
fn compute_window_of(period: CalendarPeriod, mark: Tick, origin: i64) -> (Tick, Tick) {
    // Ticks are below 2^44 and the origin a Unix time in milliseconds, so
    // none of this overflows an i64; saturating anyway.
    let unix = origin.saturating_add(mark.0 as i64 - Tick::ORIGIN.0 as i64);
    let (start, end) = window_around(period, unix);
    let tick = |unix: i64| {
        let t = unix
            .saturating_sub(origin)
            .saturating_add(Tick::ORIGIN.0 as i64);
        Tick(t.clamp(0, Tick::MAX.0 as i64) as u64)
    };
    (tick(start), tick(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(date: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(date)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn a_remembered_window_answers_marks_inside_it_and_no_others() {
        let origin = unix("2024-02-10T12:34:56Z");
        let now = Now::on_utc(0, origin);
        for period in [CalendarPeriod::Day, CalendarPeriod::Month] {
            let (start, end) = compute_window_of(period, Tick::ORIGIN, origin);
            assert!(start < Tick::ORIGIN && Tick::ORIGIN < end, "{period:?}");
            // Remember the window, then ask at its edges and just past them.
            let _ = window_of(period, Tick::ORIGIN, now);
            for mark in [
                start,
                Tick(start.0 + 1),
                Tick(end.0 - 1),
                end,
                Tick(start.0 - 1),
            ] {
                let expected = compute_window_of(period, mark, origin);
                assert_eq!(
                    window_of(period, mark, now),
                    expected,
                    "{period:?} {mark:?}"
                );
                assert!(
                    expected.0 <= mark && mark < expected.1,
                    "{period:?} {mark:?}"
                );
                let _ = window_of(period, Tick::ORIGIN, now);
            }
        }
    }

    #[test]
    fn a_remembered_window_is_only_ever_the_one_asked_for() {
        // Alternating periods, marks and origins on one thread: each
        // answer is the one computed for its own arguments.
        let month = unix("2024-02-10T00:00:00Z");
        let marks = [Tick(1_000), Tick(1_000 + 40 * 86_400_000), Tick(1_000)];
        for origin in [month, month + 86_400_000, month] {
            for mark in marks {
                for period in [
                    CalendarPeriod::Day,
                    CalendarPeriod::Month,
                    CalendarPeriod::Day,
                ] {
                    let now = Now::on_utc(0, origin);
                    for _ in 0..2 {
                        assert_eq!(
                            window_of(period, mark, now),
                            compute_window_of(period, mark, origin),
                            "{period:?} {mark:?} {origin}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn dates_convert_both_ways_over_four_centuries() {
        for days in (-200_000..200_000).step_by(7) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
        assert_eq!(
            days_from_civil(2025, 3, 1) - days_from_civil(2025, 2, 1),
            28
        );
        assert_eq!(
            days_from_civil(2024, 3, 1) - days_from_civil(2024, 2, 1),
            29
        );
        assert_eq!(
            days_from_civil(2100, 3, 1) - days_from_civil(2100, 2, 1),
            28
        );
        assert_eq!(
            days_from_civil(2000, 3, 1) - days_from_civil(2000, 2, 1),
            29
        );
    }

    #[test]
    fn months_and_days_start_at_midnight_utc() {
        let at = unix("2024-02-29T23:59:59.999Z");
        assert_eq!(
            window_around(CalendarPeriod::Month, at),
            (unix("2024-02-01T00:00:00Z"), unix("2024-03-01T00:00:00Z"))
        );
        assert_eq!(
            window_around(CalendarPeriod::Day, at),
            (unix("2024-02-29T00:00:00Z"), unix("2024-03-01T00:00:00Z"))
        );
        assert_eq!(
            window_around(CalendarPeriod::Month, unix("2025-12-31T12:00:00Z")),
            (unix("2025-12-01T00:00:00Z"), unix("2026-01-01T00:00:00Z"))
        );
        // A boundary belongs to the window it starts.
        assert_eq!(
            window_around(CalendarPeriod::Month, unix("2025-03-01T00:00:00Z")).0,
            unix("2025-03-01T00:00:00Z")
        );
        // Before 1970 too.
        assert_eq!(
            window_around(CalendarPeriod::Day, unix("1969-12-31T06:00:00Z")),
            (unix("1969-12-31T00:00:00Z"), unix("1970-01-01T00:00:00Z"))
        );
    }
}
