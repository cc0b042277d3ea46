//! One level of a chain: a fixed window or a refilling bucket, as plain
//! integers, and the documents' arithmetic on them. `model.rs` puts levels
//! together into agents and chains.
//!
//! Quotes are the sentences each piece implements; "the crate's reading"
//! marks where the documents are silent and the model takes the crate's
//! answer.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Duration;

use agent_budget::{BudgetKind, CalendarPeriod};
use chrono::{DateTime, Datelike, NaiveDate, Utc};

/// "up to MAX_TOKENS (2^52 − 1, about 4.5 × 10^15) tokens"
pub const MAX_TOKENS: u64 = (1 << 52) - 1;
/// "and MAX_CALLS (2^32 − 1, about 4.3 × 10^9) calls per window"
pub const MAX_CALLS: u64 = (1 << 32) - 1;
/// A year of 365 days, in seconds.
pub const YEAR_SECS: u64 = 365 * 24 * 3600;
/// "a window of 139 years or longer never ends"; periods "beyond 139
/// years, 139 years". The documents round; the crate's bound is 2^42 − 1
/// ms (139.4 years), and the generator keeps out of the band between.
const LONGEST_MS: u64 = (1 << 42) - 1;
/// The crate's reading: the latest instant (ms since the manager was
/// created) a bucket tells as when it will be full or have room; a bucket
/// that never will (debt on a zero budget) tells this one.
const HORIZON_MS: u64 = (1 << 44) - (1 << 39) - 2;

const NS_PER_MS: u128 = 1_000_000;

thread_local! {
    static EVENTS: RefCell<BTreeMap<&'static str, u32>> = RefCell::default();
}

/// Counts a rule of the model coming into play, for the coverage check.
pub fn note(event: &'static str) {
    EVENTS.with(|events| *events.borrow_mut().entry(event).or_default() += 1);
}

/// The rules noted on this thread since the last call.
pub fn take_events() -> BTreeMap<&'static str, u32> {
    EVENTS.with(|events| std::mem::take(&mut *events.borrow_mut()))
}

/// Tokens and calls side by side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pair {
    pub tokens: u64,
    pub calls: u64,
}

pub const KINDS: [BudgetKind; 2] = [BudgetKind::Token, BudgetKind::Call];

impl Pair {
    pub fn get(self, kind: BudgetKind) -> u64 {
        match kind {
            BudgetKind::Token => self.tokens,
            BudgetKind::Call => self.calls,
        }
    }

    fn map(self, f: impl Fn(BudgetKind, u64) -> u64) -> Pair {
        Pair {
            tokens: f(BudgetKind::Token, self.tokens),
            calls: f(BudgetKind::Call, self.calls),
        }
    }
}

/// The instant of an operation: "Time ... is counted in whole milliseconds
/// since the manager was created"; "`with_clock_at(clock, utc_origin)`
/// gives that instant" in UTC.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub ns: u128,
    pub utc_origin: DateTime<Utc>,
}

impl Now {
    /// The last millisecond boundary passed: what elapsed time is counted
    /// in ("expires on the previous one").
    pub fn tick(self) -> u64 {
        (self.ns / NS_PER_MS) as u64
    }

    /// "A window starts at the next millisecond boundary".
    pub fn boundary(self) -> u64 {
        self.ns.div_ceil(NS_PER_MS) as u64
    }

    /// Whole milliseconds since `start`: "elapsed time saturates at zero"
    /// (a window starts at the next boundary, which may not have come).
    fn since(self, start: u64) -> u64 {
        self.tick().saturating_sub(start)
    }

    /// The calendar window containing the instant `at` (ms since the
    /// manager was created), as (start, end) in ms since then: "a day from
    /// 00:00 UTC to the next 00:00 UTC, a month from the 1st at 00:00 UTC to
    /// the 1st of the next month". From chrono's dates, not the crate's
    /// day arithmetic.
    pub fn calendar_window(self, period: CalendarPeriod, at: u64) -> (i64, i64) {
        let instant = self.utc_origin + chrono::Duration::milliseconds(at as i64);
        let date = instant.date_naive();
        let (first, next) = match period {
            CalendarPeriod::Day => (date, date.succ_opt().expect("a next day")),
            CalendarPeriod::Month => {
                let first = date.with_day(1).expect("every month has a 1st");
                let (y, m) = match first.month() {
                    12 => (first.year() + 1, 1),
                    m => (first.year(), m + 1),
                };
                (
                    first,
                    NaiveDate::from_ymd_opt(y, m, 1).expect("a next month"),
                )
            }
        };
        let ms = |date: NaiveDate| {
            let midnight = date.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
            (midnight - self.utc_origin).num_milliseconds()
        };
        (ms(first), ms(next))
    }
}

/// Where `reset_window` (or a switch of policy) starts the window or the
/// bucket's refill that replaces one started at `previous`: "now", at the
/// next millisecond boundary, but "after the one it replaces: starts are
/// distinct, so several resets within one millisecond each start a
/// millisecond after the last".
pub fn restart(now: Now, previous: u64) -> u64 {
    if previous >= now.boundary() {
        note("a restart within a millisecond of the last start");
        return previous + 1;
    }
    now.boundary()
}

/// Why a level cannot take a request now.
pub struct Short {
    pub kind: BudgetKind,
    pub retry_after: Option<Duration>,
    /// What the refusal reports of `kind`: requested, remaining, used,
    /// limit.
    pub numbers: [u64; 4],
}

/// A fixed window, of a length or of the UTC calendar.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// As `set_budget` (or `set_calendar`) was given it.
    pub configured: Pair,
    pub secs: u64,
    /// A day or a month of the UTC calendar (`secs` then unused).
    pub calendar: Option<CalendarPeriod>,
    /// Tells this window from the agent's others.
    pub id: u64,
    /// Its start, in ms.
    pub start: u64,
    /// What it has used.
    pub used: Pair,
}

impl Window {
    /// "a larger budget is enforced as the maximum".
    fn limit(&self) -> Pair {
        Pair {
            tokens: self.configured.tokens.min(MAX_TOKENS),
            calls: self.configured.calls.min(MAX_CALLS),
        }
    }

    /// Its length in ms, `None` if it never ends: "`window_secs = 0` is a
    /// one-millisecond window"; "a window of 139 years or longer never
    /// ends".
    fn length_ms(&self) -> Option<u64> {
        match u128::from(self.secs) * 1000 {
            0 => Some(1),
            ms if ms >= u128::from(LONGEST_MS) => None,
            ms => Some(ms as u64),
        }
    }

    /// "a window has expired once the time since its start is at least its
    /// length"; a calendar window once the boundary after its start has
    /// come ("ends at the calendar boundary after its start").
    pub fn expired(&self, now: Now) -> bool {
        if let Some(period) = self.calendar {
            return i128::from(now.tick()) >= i128::from(now.calendar_window(period, self.start).1);
        }
        self.length_ms()
            .is_some_and(|len| now.since(self.start) >= len)
    }

    /// A calendar window's start and end as reads tell them: the one
    /// containing its start, or, once expired, the fresh one the next
    /// write will start at the next millisecond boundary.
    fn calendar_bounds(&self, period: CalendarPeriod, now: Now) -> (i64, i64) {
        let start = if self.expired(now) {
            now.boundary()
        } else {
            self.start
        };
        now.calendar_window(period, start)
    }

    /// Milliseconds from now to a calendar window's end: "the time to the
    /// next boundary".
    fn calendar_left(&self, period: CalendarPeriod, now: Now) -> u64 {
        let end = self.calendar_bounds(period, now).1;
        (i128::from(end) - i128::from(now.tick())).max(0) as u64
    }

    /// "Reads report an expired window as the fresh one the next write
    /// will start."
    fn in_use(&self, now: Now) -> Pair {
        if self.expired(now) {
            if self.used != Pair::default() {
                note("a used window read as fresh once expired");
            }
            return Pair::default();
        }
        if now.tick() < self.start {
            note("a window read before its start (a boundary ahead)");
        }
        self.used
    }

    /// Milliseconds until it ends, as reads tell it: a fresh window's
    /// length once expired. The crate's reading: one that never ends
    /// counts down as the longest one that does.
    fn remaining_ms(&self, now: Now) -> u64 {
        if let Some(period) = self.calendar {
            return self.calendar_left(period, now);
        }
        match self.length_ms() {
            None => LONGEST_MS.saturating_sub(now.since(self.start)),
            Some(len) if self.expired(now) => len,
            Some(len) => len - now.since(self.start),
        }
    }

    /// "the time until its window ends", in whole milliseconds of elapsed
    /// time; "`None` if it never can": a window that never ends never makes
    /// room.
    fn retry_after(&self, now: Now) -> Option<Duration> {
        if let Some(period) = self.calendar {
            return Some(Duration::from_millis(self.calendar_left(period, now)));
        }
        let len = self.length_ms()?;
        Some(Duration::from_millis(len - now.since(self.start)))
    }
}

/// A refilling bucket: "The counts of a bucket are what was in use *as of
/// the mark*, and what has refilled since is computed from the time
/// elapsed, never stored". Counts past the budget are debt.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    /// As `set_refill` was given it.
    pub configured: Pair,
    pub period: Duration,
    /// In ms.
    pub mark: u64,
    pub count: Pair,
}

impl Bucket {
    /// "budgets up to half of MAX_TOKENS and MAX_CALLS" (larger ones "are
    /// enforced as those").
    pub fn limit(&self) -> Pair {
        Pair {
            tokens: self.configured.tokens.min(MAX_TOKENS / 2),
            calls: self.configured.calls.min(MAX_CALLS / 2),
        }
    }

    /// "periods in whole milliseconds (rounded up; zero is one
    /// millisecond; beyond 139 years, 139 years)".
    pub fn period_ms(&self) -> u64 {
        let ms = self.period.as_nanos().div_ceil(NS_PER_MS);
        ms.clamp(1, u128::from(LONGEST_MS)) as u64
    }

    /// "After `t`, a drained resource has regained exactly floor(budget ×
    /// t / refill_period)".
    fn refilled(&self, now: Now, kind: BudgetKind) -> u128 {
        let t = u128::from(now.since(self.mark));
        u128::from(self.limit().get(kind)) * t / u128::from(self.period_ms())
    }

    /// "in use at now = count − floor(budget × (now − mark) / period), at
    /// least 0".
    fn in_use(&self, now: Now) -> Pair {
        let used = self
            .count
            .map(|kind, count| u128::from(count).saturating_sub(self.refilled(now, kind)) as u64);
        if KINDS.iter().any(|&k| used.get(k) > self.limit().get(k)) {
            note("a bucket read in debt");
        }
        if now.tick() < self.mark {
            note("a bucket read before its mark (a boundary ahead)");
        }
        used
    }

    /// "The mark moves by whole periods. Once `now − mark` reaches a
    /// period, the mark moves forward by as many whole periods as fit, and
    /// each count drops by as many budgets." The crate's reading: a bucket
    /// found full then starts over, its mark moving to now (the documents
    /// say so of admissions; it shows only in where a later charge's refill
    /// starts).
    fn normalize(&mut self, now: Now) {
        let p = self.period_ms();
        let periods = now.since(self.mark) / p;
        if periods == 0 {
            return;
        }
        let limit = self.limit();
        self.count = self.count.map(|kind, count| {
            let dropped = u128::from(periods) * u128::from(limit.get(kind));
            u128::from(count).saturating_sub(dropped) as u64
        });
        if self.count == Pair::default() {
            note("a full bucket starts over when its mark moves");
            self.mark = now.boundary();
        } else {
            self.mark += periods * p;
        }
    }

    /// Milliseconds from now until `ms` after the mark, told no later than
    /// the horizon.
    fn until(&self, now: Now, ms: u128) -> u64 {
        let at = (u128::from(self.mark) + ms).min(u128::from(HORIZON_MS));
        at.saturating_sub(u128::from(now.tick())) as u64
    }

    /// "`retry_after` is the time until enough has refilled": the first
    /// instant at which every short resource has room for the request, its
    /// count less what refilled.
    fn retry_after(&self, now: Now, request: Pair) -> Duration {
        let (used, limit, p) = (self.in_use(now), self.limit(), self.period_ms());
        let mut wait = 0;
        for kind in KINDS {
            if request.get(kind) == 0 || used.get(kind) + request.get(kind) <= limit.get(kind) {
                continue;
            }
            let owed = u128::from(self.count.get(kind)) + u128::from(request.get(kind))
                - u128::from(limit.get(kind));
            let ms = (owed * u128::from(p)).div_ceil(u128::from(limit.get(kind)));
            wait = wait.max(self.until(now, ms));
        }
        if wait == HORIZON_MS.saturating_sub(now.tick()) {
            note("a retry at the horizon");
        }
        Duration::from_millis(wait)
    }

    /// "`window_remaining_secs` the time until the bucket is full", in ms.
    fn until_full_ms(&self, now: Now) -> u64 {
        let (used, limit, p) = (self.in_use(now), self.limit(), self.period_ms());
        KINDS
            .iter()
            .filter(|&&kind| used.get(kind) > 0)
            .map(|&kind| match limit.get(kind) {
                0 => HORIZON_MS.saturating_sub(now.tick()),
                budget => {
                    let count = u128::from(self.count.get(kind));
                    self.until(now, (count * u128::from(p)).div_ceil(u128::from(budget)))
                }
            })
            .max()
            .unwrap_or(0)
    }

    /// Where a bucket's debt saturates ("an extra charge ... saturates at
    /// the maximum"): its count stops at the field's maximum.
    pub fn saturation(&self) -> Pair {
        Pair {
            tokens: MAX_TOKENS,
            calls: MAX_CALLS,
        }
    }
}

/// A level's budget: a window or a bucket.
#[derive(Clone, Copy, Debug)]
pub enum Policy {
    Window(Window),
    Bucket(Bucket),
}

impl Policy {
    /// The limits enforced.
    pub fn limit(&self) -> Pair {
        match self {
            Policy::Window(w) => w.limit(),
            Policy::Bucket(b) => b.limit(),
        }
    }

    /// The limits as configured: "`full_info` still reports the configured
    /// limit".
    pub fn configured(&self) -> Pair {
        match self {
            Policy::Window(w) => w.configured,
            Policy::Bucket(b) => b.configured,
        }
    }

    /// What is in use now, as a read sees it.
    pub fn in_use(&self, now: Now) -> Pair {
        match self {
            Policy::Window(w) => w.in_use(now),
            Policy::Bucket(b) => b.in_use(now),
        }
    }

    /// `full_info`'s `window_secs` and `window_remaining_secs`: a window's
    /// own; for a calendar window "the current window's length (86,400 for
    /// a day; 2,419,200 to 2,678,400 for a month)"; or "the period in whole
    /// seconds (rounded up)" and "the time until the bucket is full". The
    /// crate's reading: whole seconds rounded down.
    pub fn window_secs(&self, now: Now) -> (u64, u64) {
        match self {
            Policy::Window(
                w @ Window {
                    calendar: Some(period),
                    ..
                },
            ) => {
                let (start, end) = w.calendar_bounds(*period, now);
                ((end - start) as u64 / 1000, w.remaining_ms(now) / 1000)
            }
            Policy::Window(w) => (w.secs, w.remaining_ms(now) / 1000),
            Policy::Bucket(b) => {
                let period = b
                    .period
                    .as_secs()
                    .saturating_add(u64::from(b.period.subsec_nanos() > 0));
                (period, b.until_full_ms(now) / 1000)
            }
        }
    }

    /// What every write does first: "Once it has run its length, the next
    /// operation that observes the expiry — admitted or refused — starts a
    /// new, empty window at that instant". Returns whether it started one
    /// (named `id`).
    pub fn observe(&mut self, now: Now, id: u64) -> bool {
        let Policy::Window(w) = self else {
            return false;
        };
        if !w.expired(now) {
            return false;
        }
        note("window rolled over by a write");
        if let Some(period) = w.calendar {
            // Which boundary was crossed: the day's, or the month's too.
            let crossed = now.calendar_window(CalendarPeriod::Month, w.start).1;
            note(match period {
                CalendarPeriod::Day if i128::from(now.tick()) >= i128::from(crossed) => {
                    "a calendar day rolled over into a new month"
                }
                CalendarPeriod::Day => "a calendar day rolled over",
                CalendarPeriod::Month => "a calendar month rolled over",
            });
        }
        *w = Window {
            id,
            start: now.boundary(),
            used: Pair::default(),
            ..*w
        };
        true
    }

    /// Sets what is in use now, keeping the window or the bucket's phase:
    /// a bucket's counts are what is in use plus what refilled since its
    /// mark, moved first by whole periods.
    fn store(&mut self, now: Now, used: Pair) {
        match self {
            Policy::Window(w) => w.used = used,
            Policy::Bucket(b) => {
                b.normalize(now);
                // Once the mark has moved, less than a budget has refilled.
                b.count = used.map(|kind, used| used + b.refilled(now, kind) as u64);
            }
        }
    }

    /// Tries to take `request` now: "requests of zero always fit ... even
    /// an exhausted one"; otherwise what is in use plus the request must
    /// stay within the limit.
    pub fn take(&mut self, now: Now, request: Pair) -> Result<(), Short> {
        let (used, limit) = (self.in_use(now), self.limit());
        let fits = |kind| {
            request.get(kind) == 0
                || u128::from(used.get(kind)) + u128::from(request.get(kind))
                    <= u128::from(limit.get(kind))
        };
        if KINDS.iter().all(|&kind| !fits(kind)) {
            note("both resources short at one level");
        }
        // The crate's reading of which of two short resources is named: one
        // that can never fit if there is one (so that `kind` and
        // `retry_after: None` tell one story), else tokens.
        let never = |kind| request.get(kind) > limit.get(kind);
        let short = KINDS
            .into_iter()
            .find(|&kind| never(kind))
            .or_else(|| KINDS.into_iter().find(|&kind| !fits(kind)));
        if let Some(kind) = short {
            return Err(Short {
                kind,
                retry_after: self.retry_after(now, request),
                numbers: [
                    request.get(kind),
                    limit.get(kind).saturating_sub(used.get(kind)),
                    used.get(kind),
                    limit.get(kind),
                ],
            });
        }
        let taken = Pair {
            tokens: used.tokens + request.tokens,
            calls: used.calls + request.calls,
        };
        match self {
            // The crate's reading: nothing taken, nothing written (a bucket
            // keeps its mark).
            _ if request == Pair::default() => {}
            // "A full bucket starts over. When both resources are full at an
            // admission, the mark moves to now".
            Policy::Bucket(b) if used == Pair::default() => {
                note("a full bucket restarts its mark");
                // "the mark moves to now (never back: a mark a reset put
                // later stays)".
                b.mark = now.boundary().max(b.mark);
                b.count = request;
            }
            Policy::Bucket(_) if used.tokens == 0 || used.calls == 0 => {
                // "when one is full and the other is not, the full one
                // cannot restart its refill at the admission, and regains
                // units at fixed points of the shared phase instead".
                note("one resource full, the other not, at an admission");
                self.store(now, taken);
            }
            _ => self.store(now, taken),
        }
        Ok(())
    }

    /// "when that level can take the request (`retry_after`, `None` if it
    /// never can)": `None` for a request larger than the limit ("a request
    /// larger than the maximum is refused, with `retry_after: None`").
    fn retry_after(&self, now: Now, request: Pair) -> Option<Duration> {
        if KINDS.iter().any(|&k| request.get(k) > self.limit().get(k)) {
            note("a request larger than the limit is refused for good");
            return None;
        }
        match self {
            Policy::Window(w) => w.retry_after(now),
            Policy::Bucket(b) => Some(b.retry_after(now, request)),
        }
    }

    /// Gives `amount` back now: "`release` saturates at zero"; "Settle and
    /// cancel refund into the bucket, never above full". The crate's
    /// reading: with nothing to give back, nothing is written.
    pub fn refund(&mut self, now: Now, amount: Pair) {
        let used = self.in_use(now);
        if KINDS.iter().any(|&k| amount.get(k) > used.get(k)) {
            note("a refund stops at nothing in use");
        }
        let given = amount.map(|kind, amount| amount.min(used.get(kind)));
        if given != Pair::default() {
            let left = used.map(|kind, used| used - given.get(kind));
            self.store(now, left);
        }
    }

    /// Charges `tokens` past the limit: "More than reserved is charged even
    /// past the limit"; "an extra charge from `Reservation::settle`
    /// saturates at the maximum".
    pub fn charge(&mut self, now: Now, tokens: u64) {
        if tokens == 0 {
            return;
        }
        let most = match self {
            Policy::Window(_) => MAX_TOKENS,
            Policy::Bucket(b) => {
                b.normalize(now);
                let refilled = b.refilled(now, BudgetKind::Token) as u64;
                b.saturation().tokens.saturating_sub(refilled)
            }
        };
        let used = self.in_use(now);
        let total = used
            .tokens
            .saturating_add(tokens)
            .min(most)
            .max(used.tokens);
        if total - used.tokens < tokens {
            note("a charge saturates at the maximum");
        }
        self.store(
            now,
            Pair {
                tokens: total,
                calls: used.calls,
            },
        );
    }

    /// "`reset_window` starts a new, empty window now" ("or a full
    /// bucket").
    pub fn reset(&mut self, now: Now, id: u64) {
        match self {
            Policy::Window(w) => {
                w.start = restart(now, w.start);
                w.id = id;
                w.used = Pair::default();
            }
            Policy::Bucket(b) => {
                b.mark = restart(now, b.mark);
                b.count = Pair::default();
            }
        }
    }

    /// Its window (a bucket has none), and the window's start or the
    /// bucket's mark.
    pub fn stamp(&self) -> (Option<u64>, u64) {
        match self {
            Policy::Window(w) => (Some(w.id), w.start),
            Policy::Bucket(b) => (None, b.mark),
        }
    }
}
