//! An independent oracle: random sequences of every operation, run on both
//! managers and on a reference model written from the documents alone;
//! every answer of all three must be the same.
//!
//! `differential.rs` checks that the two managers agree with each other;
//! they share the crate's rules, so a mistake there is made twice and
//! passes. The model shares nothing with them but the types of their
//! answers: it keeps plain integers (a window's start and usage, a bucket's
//! mark and counts) and applies the documents' sentences to them. Its
//! sources are `docs::semantics`, the "Refilling buckets" section of
//! `docs::implementation`, the README's "Semantics in short" and the API
//! docs; each piece of it quotes the sentence it implements.
//!
//! - `oracle/level.rs`: one level's arithmetic, a window or a bucket.
//! - `oracle/model.rs`: agents, chains, and the operations of the API.
//! - `oracle/regressions.rs`: what the oracle found, one minimal test each
//!   (see "What it found").
//! - This file: the generator, the comparison after every operation of
//!   every answer and of every agent's `full_info`, and the check that the
//!   generated runs reach every outcome and rule.
//!
//! # What the model implements, and from which sentences
//!
//! - **Time** (semantics, "Time"): whole milliseconds since the manager was
//!   created; "a window starts at the next millisecond boundary and expires
//!   on the previous one"; "elapsed time saturates at zero" for a clock
//!   read backwards (`Now`). The clock is quanta's mock, moved by whole and
//!   fractional milliseconds, by days and decades, and a little backwards.
//! - **Windows** ("Windows"; README): the window starts at the first
//!   `set_budget`; "the next operation that observes the expiry — admitted
//!   or refused — starts a new, empty window at that instant"
//!   (`Policy::observe`, called by every write at every level it touches);
//!   "reads report an expired window as the fresh one" (`Window::in_use`);
//!   one expiry rule (`Window::expired`); `set_budget` keeps usage and
//!   window, `remove_budget` forgets both, `reset_window` starts afresh
//!   (`Model::set_budget`, `Model::remove_budget`, `Policy::reset`); an
//!   unknown agent reads as zeros and exhausted and is refused with
//!   `NoBudget` (`Model::remaining`, `Model::acquire`); requests of zero
//!   always fit (`Policy::take`).
//! - **Ranges** ("Ranges", "Seed defects, fixed"): budgets beyond
//!   `MAX_TOKENS`, `MAX_CALLS` enforced as the maximum and reported as
//!   configured (`Window::limit`, `Model::full_info`); larger requests
//!   refused with `retry_after: None` (`Policy::retry_after`); extra
//!   charges saturate at the maximum (`Policy::charge`); `window_secs = 0`
//!   is one millisecond and windows of 139 years never end
//!   (`Window::length_ms`); `release` saturates at zero (`Policy::refund`).
//! - **Chains** ("Budgets in a hierarchy"): linking, its refusals and
//!   their `HierarchyError` (`Model::set_parent`); admission at every level
//!   or none, level by level from the agent up, the levels below a refusal
//!   giving back, `refused_by` naming the level (`Model::acquire`); settles
//!   at every level in that level's own window, reporting the agent's own
//!   (`Model::book`); removing a parent detaches its children, removing a
//!   child settles its own level to `AgentRemoved` only
//!   (`Model::remove_budget`, `Model::book_level`); `can_schedule` over the
//!   chain, `chain_info`.
//! - **Sets of limits** ("Several limits at once"): `acquire_set` of up to
//!   three claims (duplicates, ancestors and unknown agents included), the
//!   order limits are taken in, the limit and claim a refusal names, the
//!   largest amounts at a limit reached twice, `settle_with` (the largest
//!   actual at a shared limit) and `cancel`, and the worst-outcome rule
//!   (`Model::acquire_set`, `Model::settle_set`).
//! - **Buckets** ("Continuous refill"; implementation, "Refilling
//!   buckets"): counts as of a mark and `in use = count − floor(budget ×
//!   (now − mark) / period)`, at least 0 (`Bucket::in_use`,
//!   `Bucket::refilled`); the mark moving by whole periods
//!   (`Bucket::normalize`); a full bucket restarting its mark at an
//!   admission, and one mark for both resources, the documented
//!   approximation (`Policy::take`); `retry_after` as the time until enough
//!   has refilled (`Bucket::retry_after`); refunds never above full, debt
//!   from overuse (`Policy::refund`, `Policy::charge`); budgets and periods
//!   and their ranges (`Bucket::limit`, `Bucket::period_ms`); switching
//!   policies keeping what is in use, and only a new rate converting
//!   (`Model::set_budget`, `Model::set_refill`); `full_info`'s period in
//!   seconds rounded up and time until full (`Policy::window_secs`).
//! - **Calendar windows** (semantics, "Calendar windows"): a manager
//!   whose clock zero is a generated UTC instant a little before a month's
//!   end (`with_clock_at`), runs that cross midnights and months' ends
//!   (`Op::ToBoundary`, a few milliseconds either side); "a day from 00:00
//!   UTC to the next 00:00 UTC, a month from the 1st at 00:00 UTC to the
//!   1st of the next month", computed from chrono's dates
//!   (`Now::calendar_window`), never from the crate's; the window is the
//!   one containing its start, and "otherwise every rule of fixed windows
//!   holds" (`Window::expired`, `Policy::observe`); `set_calendar` on a
//!   known agent on windows "keeps its usage and window, which now ends at
//!   the calendar boundary after its start" (`Model::set_calendar`);
//!   `full_info`'s "current window's length" and "time to the next
//!   boundary", and a refusal's `retry_after` as that time
//!   (`Policy::window_secs`, `Window::retry_after`).
//! - **Overuse carries over** ("Overuse carries over"; `Reservation::settle`
//!   and `Settlement`): `Applied` with what changed, `CarriedOver` into the
//!   current window, `WindowEnded`, `AgentRemoved` (`Model::book_level`).
//!
//! # Where the documents are silent: the crate's readings
//!
//! Marked "the crate's reading" in the model; each is a sentence the
//! documents could add.
//!
//! - Whole seconds (`window_remaining_secs`) are rounded down; a window's
//!   `retry_after` is its length less the whole milliseconds elapsed (so
//!   within the first, unfinished millisecond it is short by less than a
//!   millisecond), a bucket's counts from its mark.
//! - A bucket's mark starts, like a window, at the next millisecond
//!   boundary.
//! - "139 years" is 2^42 − 1 ms (139.4 years), for windows that never end
//!   and for the longest period; a window that never ends reads its
//!   `window_remaining_secs` as counting down from that.
//! - A bucket reports times no later than 2^44 − 2^39 − 2 ms (about 540
//!   years) after the manager was created: `retry_after` and "time until
//!   full" beyond it, and the time until a zero budget in debt is full.
//! - Where a bucket's debt saturates: its count (what is in use plus what
//!   refilled since the mark) stops a budget short of `MAX_TOKENS`; so does
//!   usage carried into a bucket by `set_refill`.
//! - `Settlement::Applied` and `CarriedOver` report what changed (a refund
//!   stopped at nothing in use, a charge at the maximum), not what was
//!   asked.
//! - With both resources short, the refusal names one that can never fit
//!   if there is one, else tokens.
//! - A bucket set again at the same enforced rate is not "a new rate": it
//!   keeps its mark.
//! - A reservation taken from a bucket, the agent since moved to a window:
//!   its window "has ended" (`WindowEnded`, or `CarriedOver` for overuse).
//! - `HierarchyError` precedence: the child unknown, the parent unknown, a
//!   cycle, too deep.
//! - Writes that change nothing leave no trace: a zero request keeps a
//!   bucket's mark, and so does a refund with nothing to give back (only a
//!   clock read backwards shows the difference). A full bucket whose mark
//!   moves by whole periods starts over at now.
//!
//! # What it found
//!
//! Five places where the crate departed from the documents, now fixed in
//! the crate (or, for the first, stated in the documents); each has its
//! regression test in `oracle/regressions.rs`: resets within a millisecond
//! (window starts are distinct, which the documents now say), a window
//! that never ends telling a `retry_after`, a bucket's `retry_after`
//! covering one of two short resources, a refund on a large bucket
//! forgetting usage, and a window told apart from another only by its
//! start instant after a switch of policy.
//!
//! # What it does not cover
//!
//! - **Concurrency.** One thread runs every operation in turn: the model
//!   says what each operation must answer given the ones before it, not
//!   how racing operations interleave. Linearizability, the chain's one
//!   exception to atomicity and the absence of over-admission under races
//!   are the loom models' and the stress tests' job.
//! - **Sets larger than `MAX_SET_LIMITS`**, and calendar windows'
//!   persistence: their own tests (`sets.rs`, `calendar.rs`) and the
//!   differential test cover them.
//! - **Waiting, handles, owned reservations, persistence, the coarse
//!   clock.** `acquire_wait`, `AgentHandle`, `OwnedReservation`,
//!   `persist`/`restore` and `with_coarse_clock` are not generated here;
//!   their own tests cover them, on the rules checked here.
//! - **Message wording** beyond the one the documents quote (`No budget
//!   configured for agent {id}`): the other messages are compared through
//!   the facts they are made of (`RefusalReason`).
//! - **The band between 139 and 139.4 years**, where "139 years" is read
//!   one way or the other: the generator keeps out of it.
//!
//! # A longer search
//!
//! `ORACLE_CASES=200000 cargo test --release -p agent-budget --test oracle`
//! (about two minutes on two cores).

mod common;
#[path = "oracle/level.rs"]
mod level;
#[path = "oracle/model.rs"]
mod model;
#[path = "oracle/regressions.rs"]
mod regressions;

use std::collections::BTreeMap;
use std::time::Duration;

use agent_budget::{
    AgentId, BudgetExceeded, BudgetKind, BudgetManager, CalendarLimit, CalendarPeriod, Claim,
    HierarchyError, LockedBudgetManager, RefillLimit, Refused, Reservation, SetReservation,
    Settlement,
};
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use common::limit;
use level::{Pair, MAX_CALLS, MAX_TOKENS, YEAR_SECS};
use model::{Model, Refusal, SetTicket, Ticket};
use proptest::prelude::*;

/// Agents in a run: enough for a chain deeper than `MAX_LEVELS`; most
/// operations go to the first few, so that they meet.
const AGENTS: usize = 10;
/// The clock never passes this (quanta's mock counts nanoseconds in a
/// `u64`, about 584 years).
const LATEST: Duration = Duration::from_secs(400 * YEAR_SECS);

#[derive(Clone, Debug)]
enum Op {
    SetBudget {
        agent: usize,
        tokens: u64,
        calls: u64,
        window_secs: u64,
    },
    /// `set_budget` on every agent: room for deep chains.
    SetBudgetEach {
        tokens: u64,
        calls: u64,
    },
    SetRefill {
        agent: usize,
        tokens: u64,
        calls: u64,
        period: Duration,
    },
    SetCalendar {
        agent: usize,
        tokens: u64,
        calls: u64,
        period: CalendarPeriod,
    },
    SetParent(usize, Option<usize>),
    /// `set_parent(i, i + 1)` for `i` in `from..from + len`.
    Ladder {
        from: usize,
        len: usize,
    },
    Remove(usize),
    /// The agent's last `SetBudget`, `SetRefill` or `SetCalendar` again.
    SetAgain(usize),
    Reserve(usize, Amount),
    Release(usize, Amount),
    TrackCall(usize),
    Acquire(usize, Amount, Amount),
    AcquireSet(Vec<(usize, Amount, Amount)>),
    /// Each claim's actual, by index (cycled).
    SettleSet(usize, Vec<Used>),
    CancelSet(usize),
    Settle(usize, Used),
    Cancel(usize),
    Drop(usize),
    ResetWindow(usize),
    Read(usize),
    ReadAll,
    Advance(Duration),
    Rewind(Duration),
    /// To the next UTC midnight (`Day`) or first of a month (`Month`),
    /// give or take a few milliseconds (in ns).
    ToBoundary(CalendarPeriod, i64),
}

/// An amount of tokens or calls to ask for or give back: fixed, or
/// relative to what the agent has left or to its limit, so that requests
/// meet the edges of what fits.
#[derive(Clone, Copy, Debug)]
enum Amount {
    Fixed(u64),
    Left(i8),
    Limit(i8),
}

/// What a settle reports used: fixed, or relative to what was reserved.
#[derive(Clone, Copy, Debug)]
enum Used {
    Fixed(u64),
    Reserved(i8),
}

fn agent() -> impl Strategy<Value = usize> {
    prop_oneof![8 => 0..4usize, 1 => 0..AGENTS]
}

fn token_budget() -> impl Strategy<Value = u64> {
    prop_oneof![
        14 => 0..60u64,
        1 => Just(u64::MAX),
        1 => Just(MAX_TOKENS),
        1 => Just(MAX_TOKENS + 1),
        1 => Just(MAX_TOKENS / 2),
        1 => Just(MAX_TOKENS / 2 + 1),
    ]
}

fn call_budget() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => Just(0),
        14 => 1..8u64,
        1 => Just(u64::MAX),
        1 => Just(MAX_CALLS),
        1 => Just(MAX_CALLS + 1),
        1 => Just(MAX_CALLS / 2),
        1 => Just(MAX_CALLS / 2 + 1),
    ]
}

fn window_secs() -> impl Strategy<Value = u64> {
    prop_oneof![
        12 => 0..4u64,
        1 => Just(60),
        1 => Just(100 * YEAR_SECS),
        1 => Just(200 * YEAR_SECS),
        1 => Just(u64::MAX),
    ]
}

fn period() -> impl Strategy<Value = Duration> {
    prop_oneof![
        8 => (0..3_000u64).prop_map(Duration::from_millis),
        2 => (0..5_000_000u64).prop_map(Duration::from_nanos),
        1 => Just(Duration::from_secs(3_600)),
        1 => Just(Duration::from_millis(u64::MAX)),
        1 => Just(Duration::MAX),
    ]
}

fn fixed_tokens() -> impl Strategy<Value = u64> {
    prop_oneof![
        24 => 0..40u64,
        1 => Just(u64::MAX),
        1 => Just(u64::MAX - 1),
        1 => Just(MAX_TOKENS),
        1 => Just(MAX_TOKENS + 1),
        1 => Just(MAX_TOKENS / 2),
    ]
}

fn tokens() -> impl Strategy<Value = Amount> {
    prop_oneof![
        6 => fixed_tokens().prop_map(Amount::Fixed),
        3 => (-1..=1i8).prop_map(Amount::Left),
        1 => (-1..=1i8).prop_map(Amount::Limit),
    ]
}

fn calls() -> impl Strategy<Value = Amount> {
    prop_oneof![
        8 => (0..3u64).prop_map(Amount::Fixed),
        1 => prop_oneof![Just(MAX_CALLS), Just(MAX_CALLS + 1), Just(u64::MAX)].prop_map(Amount::Fixed),
        2 => (-1..=1i8).prop_map(Amount::Left),
        1 => (0..=1i8).prop_map(Amount::Limit),
    ]
}

fn used() -> impl Strategy<Value = Used> {
    prop_oneof![
        3 => fixed_tokens().prop_map(Used::Fixed),
        4 => (-2..=2i8).prop_map(Used::Reserved),
    ]
}

fn step() -> impl Strategy<Value = Duration> {
    prop_oneof![
        8 => (0..1_500u64).prop_map(Duration::from_millis),
        2 => Just(Duration::from_secs(1)),
        1 => Just(Duration::from_secs(3)),
        3 => (0..2_000_000u64).prop_map(Duration::from_nanos),
        1 => Just(Duration::from_secs(24 * 3600)),
        1 => Just(Duration::from_secs(50 * YEAR_SECS)),
    ]
}

fn calendar_period() -> impl Strategy<Value = CalendarPeriod> {
    prop_oneof![Just(CalendarPeriod::Day), Just(CalendarPeriod::Month)]
}

/// Where the manager's clock zero sits in UTC: a little before the end of
/// a month (a day's end too) of a year from 1960 to 2110 (leap years, 2000
/// and 2100 among them), so that runs cross midnights and month ends.
fn utc_origin() -> impl Strategy<Value = DateTime<Utc>> {
    let before = prop_oneof![
        2 => 0..5_000i64,
        2 => 0..600_000i64,
        1 => 0..3 * 86_400_000i64,
    ];
    (1960..2110i32, 1..=12u32, before).prop_map(|(year, month, before_ms)| {
        let first = NaiveDate::from_ymd_opt(year, month, 1).expect("a 1st of a month");
        let end = first.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
        // The 1st of the next month is this one's plus 31 days, set back
        // to the 1st.
        let next = end + chrono::Duration::days(31);
        let next = next - chrono::Duration::days(i64::from(next.day() - 1));
        next - chrono::Duration::milliseconds(before_ms)
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (agent(), token_budget(), call_budget(), window_secs())
            .prop_map(|(agent, tokens, calls, window_secs)| Op::SetBudget { agent, tokens, calls, window_secs }),
        1 => (token_budget(), call_budget()).prop_map(|(tokens, calls)| Op::SetBudgetEach { tokens, calls }),
        2 => (agent(), token_budget(), call_budget(), period())
            .prop_map(|(agent, tokens, calls, period)| Op::SetRefill { agent, tokens, calls, period }),
        2 => (agent(), token_budget(), call_budget(), calendar_period())
            .prop_map(|(agent, tokens, calls, period)| Op::SetCalendar { agent, tokens, calls, period }),
        3 => (agent(), prop::option::weighted(0.8, agent())).prop_map(|(c, p)| Op::SetParent(c, p)),
        2 => (0..AGENTS, 2..AGENTS).prop_map(|(from, len)| Op::Ladder { from, len }),
        2 => agent().prop_map(Op::Remove),
        1 => agent().prop_map(Op::SetAgain),
        4 => (agent(), tokens()).prop_map(|(a, n)| Op::Reserve(a, n)),
        1 => (agent(), tokens()).prop_map(|(a, n)| Op::Release(a, n)),
        3 => agent().prop_map(Op::TrackCall),
        6 => (agent(), tokens(), calls()).prop_map(|(a, t, c)| Op::Acquire(a, t, c)),
        4 => prop::collection::vec((agent(), tokens(), calls()), 0..4).prop_map(Op::AcquireSet),
        3 => (any::<usize>(), prop::collection::vec(used(), 1..4)).prop_map(|(i, u)| Op::SettleSet(i, u)),
        1 => any::<usize>().prop_map(Op::CancelSet),
        5 => (any::<usize>(), used()).prop_map(|(i, n)| Op::Settle(i, n)),
        1 => any::<usize>().prop_map(Op::Cancel),
        1 => any::<usize>().prop_map(Op::Drop),
        1 => agent().prop_map(Op::ResetWindow),
        2 => agent().prop_map(Op::Read),
        1 => Just(Op::ReadAll),
        5 => step().prop_map(Op::Advance),
        1 => (0..3_000_000u64).prop_map(|ns| Op::Rewind(Duration::from_nanos(ns))),
        2 => (calendar_period(), -3_000_000..3_000_000i64).prop_map(|(p, ns)| Op::ToBoundary(p, ns)),
    ]
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 1..150)
}

/// The facts of a refusal, as the model tells them.
fn facts(refused: Refused) -> Refusal {
    Refusal {
        agent_id: refused.agent_id,
        kind: refused.kind,
        refused_by: refused.refused_by,
        retry_after: refused.retry_after,
        reason: refused.reason,
    }
}

/// One reservation, as each of the three holds it.
type Open<'m> = (Reservation<'m>, Reservation<'m>, Ticket);
/// One set's reservation, as each of the three holds it.
type OpenSet<'m> = (SetReservation<'m>, SetReservation<'m>, SetTicket);

/// The two managers and the model, on one mock clock, and how often each
/// kind of answer came up.
struct Trio<'m> {
    lock_free: &'m BudgetManager,
    locked: &'m LockedBudgetManager,
    model: Model,
    mock: &'m quanta::Mock,
    /// The UTC instant of the clock's zero.
    utc_origin: DateTime<Utc>,
    agents: Vec<AgentId>,
    open: Vec<Open<'m>>,
    open_sets: Vec<OpenSet<'m>>,
    /// Each agent's last `SetBudget` or `SetRefill`, for `SetAgain`.
    last_set: BTreeMap<usize, Op>,
    seen: BTreeMap<&'static str, u32>,
}

impl<'m> Trio<'m> {
    fn count(&mut self, what: &'static str) {
        *self.seen.entry(what).or_default() += 1;
    }

    /// Counts a refusal's kind of answer.
    fn count_refusal(&mut self, refusal: &Refusal) {
        if refusal.reason == agent_budget::RefusalReason::NoBudget {
            self.count("refused: no budget");
        } else if refusal.refused_by != refusal.agent_id {
            self.count("refused by an ancestor");
        } else {
            self.count("refused by the agent's own level");
        }
        match refusal.retry_after {
            Some(_) => self.count("refused until later (retry_after)"),
            None => self.count("refused for good (retry_after None)"),
        }
    }

    /// A seed operation's answer (`reserve`, `track_call`): the same on
    /// all three, with the documented message when there is no budget.
    fn check_seed(
        &mut self,
        what: &str,
        lock_free: Result<(), BudgetExceeded>,
        locked: Result<(), BudgetExceeded>,
        model: Result<Ticket, Refusal>,
    ) {
        assert_eq!(lock_free, locked, "{what}: the managers disagree");
        let lock_free = lock_free.map_err(|e| {
            if e.refused().reason == agent_budget::RefusalReason::NoBudget {
                assert_eq!(
                    e.message,
                    format!("No budget configured for agent {}", e.agent_id)
                );
            }
            facts(e.refused())
        });
        let model = model.map(drop);
        assert_eq!(lock_free, model, "{what}: the crate (left) and the model");
        match model {
            Ok(()) => self.count("admitted"),
            Err(refusal) => self.count_refusal(&refusal),
        }
    }

    fn set_parent(&mut self, child: usize, parent: Option<usize>) {
        let (child, parent) = (self.agents[child], parent.map(|p| self.agents[p]));
        let lock_free = self.lock_free.set_parent(&child, parent.as_ref());
        assert_eq!(
            lock_free,
            self.locked.set_parent(&child, parent.as_ref()),
            "set_parent: the managers disagree"
        );
        let model = self.model.set_parent(child, parent);
        assert_eq!(
            lock_free, model,
            "set_parent: the crate (left) and the model"
        );
        self.count(match model {
            Ok(()) => "linked",
            Err(HierarchyError::UnknownAgent(_)) => "link refused: unknown agent",
            Err(HierarchyError::Cycle { .. }) => "link refused: cycle",
            Err(HierarchyError::TooDeep { .. }) => "link refused: too deep",
            Err(_) => unreachable!("the model has no other error"),
        });
    }

    fn settled(&mut self, lock_free: Settlement, locked: Settlement, model: Settlement) {
        assert_eq!(lock_free, locked, "settle: the managers disagree");
        assert_eq!(lock_free, model, "settle: the crate (left) and the model");
        self.count(match model {
            Settlement::Applied { .. } => "settled: applied",
            Settlement::CarriedOver { .. } => "settled: carried over",
            Settlement::WindowEnded => "settled: window ended",
            Settlement::AgentRemoved => "settled: agent removed",
        });
    }

    /// An amount of `kind` for `agent`, resolved against what it has now
    /// (as the lock-free manager reads it: any reader would do, the
    /// answers are compared after every operation).
    fn resolve(&self, agent: usize, amount: Amount, kind: BudgetKind) -> u64 {
        let info = self.lock_free.full_info(&self.agents[agent]);
        let (left, limit) = info.map_or((0, 0), |i| match kind {
            BudgetKind::Token => (i.tokens_remaining, i.token_limit),
            BudgetKind::Call => (i.calls_remaining, i.calls_limit),
        });
        let near = |base: u64, by: i8| base.saturating_add_signed(i64::from(by));
        match amount {
            Amount::Fixed(n) => n,
            Amount::Left(by) => near(left, by),
            Amount::Limit(by) => near(limit, by),
        }
    }

    fn apply(&mut self, op: Op) {
        let (lock_free, locked) = (self.lock_free, self.locked);
        if let Op::SetBudget { agent, .. }
        | Op::SetRefill { agent, .. }
        | Op::SetCalendar { agent, .. } = op
        {
            self.last_set.insert(agent, op.clone());
        }
        match op {
            Op::SetBudget {
                agent,
                tokens,
                calls,
                window_secs,
            } => {
                let l = limit(self.agents[agent], tokens, calls, window_secs);
                lock_free.set_budget(l.clone());
                locked.set_budget(l);
                self.model
                    .set_budget(self.agents[agent], tokens, calls, window_secs);
            }
            Op::SetBudgetEach { tokens, calls } => {
                for agent in self.agents.clone() {
                    lock_free.set_budget(limit(agent, tokens, calls, 1));
                    locked.set_budget(limit(agent, tokens, calls, 1));
                    self.model.set_budget(agent, tokens, calls, 1);
                }
            }
            Op::SetRefill {
                agent,
                tokens,
                calls,
                period,
            } => {
                let l = RefillLimit {
                    agent_id: self.agents[agent],
                    token_budget: tokens,
                    calls_budget: calls,
                    refill_period: period,
                };
                lock_free.set_refill(l.clone());
                locked.set_refill(l);
                self.model
                    .set_refill(self.agents[agent], tokens, calls, period);
            }
            Op::SetCalendar {
                agent,
                tokens,
                calls,
                period,
            } => {
                let l = CalendarLimit {
                    agent_id: self.agents[agent],
                    token_budget: tokens,
                    calls_budget: calls,
                    period,
                };
                lock_free.set_calendar(l.clone());
                locked.set_calendar(l);
                self.model
                    .set_calendar(self.agents[agent], tokens, calls, period);
            }
            Op::SetAgain(agent) => {
                if let Some(op) = self.last_set.get(&agent).cloned() {
                    self.apply(op);
                }
            }
            Op::SetParent(child, parent) => self.set_parent(child, parent),
            Op::Ladder { from, len } => {
                for child in from..(from + len).min(AGENTS - 1) {
                    self.set_parent(child, Some(child + 1));
                }
            }
            Op::Remove(a) => {
                lock_free.remove_budget(&self.agents[a]);
                locked.remove_budget(&self.agents[a]);
                self.model.remove_budget(&self.agents[a]);
            }
            Op::Reserve(a, n) => {
                let n = self.resolve(a, n, BudgetKind::Token);
                let id = self.agents[a];
                let model = self.model.acquire(
                    id,
                    Pair {
                        tokens: n,
                        calls: 0,
                    },
                    BudgetKind::Token,
                );
                self.check_seed(
                    "reserve",
                    lock_free.reserve(&id, n),
                    locked.reserve(&id, n),
                    model,
                );
            }
            Op::TrackCall(a) => {
                let id = self.agents[a];
                let model = self.model.acquire(
                    id,
                    Pair {
                        tokens: 0,
                        calls: 1,
                    },
                    BudgetKind::Call,
                );
                self.check_seed(
                    "track_call",
                    lock_free.track_call(&id),
                    locked.track_call(&id),
                    model,
                );
            }
            Op::Release(a, n) => {
                let n = self.resolve(a, n, BudgetKind::Token);
                lock_free.release(&self.agents[a], n);
                locked.release(&self.agents[a], n);
                self.model.release(&self.agents[a], n);
            }
            Op::Acquire(a, t, c) => {
                let t = self.resolve(a, t, BudgetKind::Token);
                let c = self.resolve(a, c, BudgetKind::Call);
                let id = self.agents[a];
                let model = self.model.acquire(
                    id,
                    Pair {
                        tokens: t,
                        calls: c,
                    },
                    BudgetKind::Token,
                );
                match (
                    lock_free.acquire(&id, t, c),
                    locked.acquire(&id, t, c),
                    model,
                ) {
                    (Ok(x), Ok(y), Ok(z)) => {
                        assert_eq!((x.tokens(), x.calls()), (t, c));
                        self.count("admitted");
                        self.open.push((x, y, z));
                    }
                    (Err(x), Err(y), Err(z)) => {
                        assert_eq!(x, y, "acquire: the managers disagree");
                        assert_eq!(facts(x), z, "acquire: the crate (left) and the model");
                        self.count_refusal(&z);
                    }
                    (x, y, z) => panic!(
                        "acquire disagrees: lock-free {:?}, locked {:?}, model {:?}",
                        x.map(drop),
                        y.map(drop),
                        z.map(drop)
                    ),
                }
            }
            Op::AcquireSet(claims) => {
                let claims: Vec<Claim> = claims
                    .into_iter()
                    .map(|(a, t, c)| Claim {
                        agent_id: self.agents[a],
                        tokens: self.resolve(a, t, BudgetKind::Token),
                        calls: self.resolve(a, c, BudgetKind::Call),
                    })
                    .collect();
                let pairs: Vec<(AgentId, Pair)> = claims
                    .iter()
                    .map(|c| {
                        let pair = Pair {
                            tokens: c.tokens,
                            calls: c.calls,
                        };
                        (c.agent_id, pair)
                    })
                    .collect();
                let model = self.model.acquire_set(&pairs);
                match (
                    lock_free.acquire_set(&claims),
                    locked.acquire_set(&claims),
                    model,
                ) {
                    (Ok(x), Ok(y), Ok(z)) => {
                        assert_eq!(x.claims(), &claims[..]);
                        self.count("set admitted");
                        self.open_sets.push((x, y, z));
                    }
                    (Err(x), Err(y), Err(z)) => {
                        assert_eq!(x, y, "acquire_set: the managers disagree");
                        assert_eq!(facts(x), z, "acquire_set: the crate (left) and the model");
                        self.count("set refused");
                        self.count_refusal(&z);
                    }
                    (x, y, z) => panic!(
                        "acquire_set disagrees: lock-free {:?}, locked {:?}, model {:?}",
                        x.map(drop),
                        y.map(drop),
                        z.map(drop)
                    ),
                }
            }
            Op::SettleSet(i, used) if !self.open_sets.is_empty() => {
                let (x, y, z) = self.open_sets.swap_remove(i % self.open_sets.len());
                let actuals: Vec<u64> = x
                    .claims()
                    .iter()
                    .enumerate()
                    .map(|(n, claim)| match used[n % used.len()] {
                        Used::Fixed(n) => n,
                        Used::Reserved(by) => claim.tokens.saturating_add_signed(i64::from(by)),
                    })
                    .collect();
                let model = self.model.settle_set(z, Some(&actuals));
                let actual = |n: usize, _: &Claim| actuals[n];
                self.settled(x.settle_with(actual), y.settle_with(actual), model);
            }
            Op::CancelSet(i) if !self.open_sets.is_empty() => {
                let (x, y, z) = self.open_sets.swap_remove(i % self.open_sets.len());
                let model = self.model.settle_set(z, None);
                self.settled(x.cancel(), y.cancel(), model);
            }
            Op::SettleSet(..) | Op::CancelSet(_) => {}
            Op::Settle(i, n) if !self.open.is_empty() => {
                let (x, y, z) = self.open.swap_remove(i % self.open.len());
                let n = match n {
                    Used::Fixed(n) => n,
                    Used::Reserved(by) => x.tokens().saturating_add_signed(i64::from(by)),
                };
                let model = self.model.settle(z, n);
                self.settled(x.settle(n), y.settle(n), model);
            }
            Op::Cancel(i) if !self.open.is_empty() => {
                let (x, y, z) = self.open.swap_remove(i % self.open.len());
                let model = self.model.cancel(z);
                self.settled(x.cancel(), y.cancel(), model);
            }
            // "A reservation dropped without either stays fully charged":
            // the model forgets the ticket.
            Op::Drop(i) if !self.open.is_empty() => {
                drop(self.open.swap_remove(i % self.open.len()))
            }
            Op::Settle(..) | Op::Cancel(_) | Op::Drop(_) => {}
            Op::ResetWindow(a) => {
                lock_free.reset_window(&self.agents[a]);
                locked.reset_window(&self.agents[a]);
                self.model.reset_window(&self.agents[a]);
            }
            Op::Read(a) => {
                let id = &self.agents[a];
                let model = &self.model;
                assert_eq!(lock_free.remaining(id), locked.remaining(id));
                assert_eq!(lock_free.remaining(id), model.remaining(id), "remaining");
                assert_eq!(lock_free.can_schedule(id), locked.can_schedule(id));
                assert_eq!(
                    lock_free.can_schedule(id),
                    model.can_schedule(id),
                    "can_schedule"
                );
                assert_eq!(lock_free.chain_info(id), locked.chain_info(id));
                assert_eq!(lock_free.chain_info(id), model.chain_info(id), "chain_info");
            }
            Op::ReadAll => {
                let sorted = |mut v: Vec<agent_budget::FullBudgetInfo>| {
                    v.sort_by_key(|i| i.agent_id);
                    v
                };
                let all = sorted(lock_free.all_full_info());
                assert_eq!(all, sorted(locked.all_full_info()));
                assert_eq!(all, self.model.all_full_info(), "all_full_info");
            }
            Op::Advance(by) => {
                let now = Duration::from_nanos(self.mock.value());
                if now + by <= LATEST {
                    self.mock.increment(by);
                }
            }
            Op::Rewind(by) => {
                let by = by.min(Duration::from_nanos(self.mock.value()));
                self.mock.decrement(by);
            }
            Op::ToBoundary(period, off_ns) => {
                let now = Duration::from_nanos(self.mock.value());
                let at = self.utc_origin + chrono::Duration::from_std(now).expect("in range");
                let next = next_boundary(period, at) + chrono::Duration::nanoseconds(off_ns);
                if let Ok(by) = (next - at).to_std() {
                    if now + by <= LATEST {
                        self.mock.increment(by);
                    }
                }
            }
        }
        self.model.set_now(u128::from(self.mock.value()));
    }

    /// Every agent's `full_info`, on all three: after every operation, so
    /// that a difference shows where it is made.
    fn check_every_agent(&self) {
        for id in &self.agents {
            let lock_free = self.lock_free.full_info(id);
            assert_eq!(
                lock_free,
                self.locked.full_info(id),
                "full_info: the managers disagree"
            );
            assert_eq!(
                lock_free,
                self.model.full_info(id),
                "full_info: the crate (left) and the model"
            );
        }
    }
}

/// Runs `ops` on both managers and the model, asserting every answer is
/// the same; returns how often each kind of answer and each rule of the
/// model came up.
fn run(utc_origin: DateTime<Utc>, ops: Vec<Op>) -> BTreeMap<&'static str, u32> {
    level::take_events();
    let (clock, mock) = quanta::Clock::mock();
    let lock_free = BudgetManager::with_clock_at(clock.clone(), utc_origin);
    let locked = LockedBudgetManager::with_clock_at(clock, utc_origin);
    let mut trio = Trio {
        lock_free: &lock_free,
        locked: &locked,
        model: Model::new(utc_origin),
        mock: &mock,
        utc_origin,
        agents: (0..AGENTS).map(|_| common::agent()).collect(),
        open: Vec::new(),
        open_sets: Vec::new(),
        last_set: BTreeMap::new(),
        seen: BTreeMap::new(),
    };
    for (i, op) in ops.into_iter().enumerate() {
        let shown = format!("{op:?}");
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            trio.apply(op);
            trio.check_every_agent();
        }));
        if let Err(panic) = outcome {
            eprintln!("at operation {i}: {shown}");
            std::panic::resume_unwind(panic);
        }
    }
    for agent in 0..AGENTS {
        trio.apply(Op::Read(agent));
    }
    trio.apply(Op::ReadAll);
    let mut seen = std::mem::take(&mut trio.seen);
    for (event, n) in level::take_events() {
        *seen.entry(event).or_default() += n;
    }
    seen
}

/// The first UTC midnight (`Day`) or first of a month (`Month`) after
/// `at`, by chrono's calendar.
fn next_boundary(period: CalendarPeriod, at: DateTime<Utc>) -> DateTime<Utc> {
    let date = at.date_naive();
    let next = match period {
        CalendarPeriod::Day => date.succ_opt().expect("a next day"),
        CalendarPeriod::Month if date.month() == 12 => {
            NaiveDate::from_ymd_opt(date.year() + 1, 1, 1).expect("a January")
        }
        CalendarPeriod::Month => {
            NaiveDate::from_ymd_opt(date.year(), date.month() + 1, 1).expect("a 1st")
        }
    };
    next.and_hms_opt(0, 0, 0).expect("midnight").and_utc()
}

/// Cases per run: 256 in CI; `ORACLE_CASES=100000 cargo test --release
/// --test oracle` for a long search.
fn cases() -> u32 {
    std::env::var("ORACLE_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// Every answer of both managers is the documents'.
    #[test]
    fn both_managers_answer_as_the_documents_say(utc_origin in utc_origin(), ops in ops()) {
        run(utc_origin, ops);
    }
}

/// The generated sequences reach every kind of answer, and every rule of
/// the model comes into play: without this, a generator drifting to cases
/// where everything is refused (or nothing ever expires) would make the
/// comparison prove nothing.
#[test]
fn the_generated_sequences_reach_every_outcome_and_rule() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let mut total: BTreeMap<&'static str, u32> = BTreeMap::new();
    for _ in 0..400 {
        let utc_origin = utc_origin().new_tree(&mut runner).unwrap().current();
        let ops = ops().new_tree(&mut runner).unwrap().current();
        for (what, n) in run(utc_origin, ops) {
            *total.entry(what).or_default() += n;
        }
    }
    for (what, n) in &total {
        println!("{what}: {n}");
    }
    // Every kind of answer, and every documented rule of the model (the
    // crate's readings of extremes are printed, not required: they are the
    // crate's, not the documents').
    let required = [
        "admitted",
        "refused by the agent's own level",
        "refused by an ancestor",
        "refused until later (retry_after)",
        "refused for good (retry_after None)",
        "refused: no budget",
        "settled: applied",
        "settled: carried over",
        "settled: window ended",
        "settled: agent removed",
        "linked",
        "link refused: unknown agent",
        "link refused: cycle",
        "link refused: too deep",
        "window rolled over by a write",
        "a used window read as fresh once expired",
        "a window read before its start (a boundary ahead)",
        "a request larger than the limit is refused for good",
        "a budget beyond the maximum",
        "a charge saturates at the maximum",
        "a refund stops at nothing in use",
        "levels below a refusing ancestor give back",
        "a settle books differently at two levels",
        "removing a parent detaches a child",
        "a full bucket restarts its mark",
        "one resource full, the other not, at an admission",
        "a bucket read in debt",
        "a bucket read before its mark (a boundary ahead)",
        "a switch to a bucket with usage",
        "a bucket switched to a window with usage",
        "the same rate set again keeps its mark",
        "both resources short at one level",
        "set admitted",
        "set refused",
        "a limit reached twice in a set",
        "a refused set gives back what it took",
        "a calendar day rolled over",
        "a calendar day rolled over into a new month",
        "a calendar month rolled over",
        "a fixed window switched to the calendar keeps its usage",
    ];
    for what in required {
        let n = total.get(what).copied().unwrap_or(0);
        assert!(n >= 20, "only {n} times: {what}");
    }
}
