//! The public data types, with the seed's names and fields.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Identifies an agent. Any UUID will do; ids may come from clients, so
/// the maps keyed by them use a hasher with a random per-process key.
pub type AgentId = uuid::Uuid;

/// The budget of one agent: how much it may spend per window.
///
/// Budgets up to [`MAX_TOKENS`](crate::MAX_TOKENS) tokens and
/// [`MAX_CALLS`](crate::MAX_CALLS) calls per window are enforced exactly;
/// larger ones are enforced as those maxima. A window of `0` seconds is
/// treated as one millisecond; a window too long to represent never ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetLimit {
    /// The agent this budget applies to.
    pub agent_id: AgentId,
    /// Maximum tokens admitted per window.
    pub token_budget: u64,
    /// Maximum calls admitted per window.
    pub calls_budget: u64,
    /// Length of a window, in seconds.
    pub window_secs: u64,
}

/// A budget that refills continuously: a token bucket holding at most
/// `token_budget` tokens and `calls_budget` calls, refilling from empty to
/// full in `refill_period`.
///
/// It mirrors [`BudgetLimit`]: "10 requests a second, in bursts of at most
/// 1" is `calls_budget: 1, refill_period: 100 ms`; "100,000 tokens a minute,
/// all at once if need be" is `token_budget: 100_000, refill_period: 60 s`.
/// An agent starts full; an admission takes from the bucket; refill runs at
/// `budget / refill_period` up to the budget, exactly (see
/// [`docs::semantics`](crate::docs::semantics#continuous-refill)).
///
/// Periods are counted in whole milliseconds, rounded up; a zero period is
/// one millisecond, and periods beyond 139 years are 139 years. Budgets
/// are exact up to half of [`MAX_TOKENS`](crate::MAX_TOKENS) and
/// [`MAX_CALLS`](crate::MAX_CALLS) (over 2 × 10^15 tokens and 2 × 10^9
/// calls); larger ones are enforced as those.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefillLimit {
    /// The agent this budget applies to.
    pub agent_id: AgentId,
    /// Tokens a full bucket holds.
    pub token_budget: u64,
    /// Calls a full bucket holds.
    pub calls_budget: u64,
    /// How long an empty bucket takes to refill completely.
    pub refill_period: std::time::Duration,
}

/// The usage of one agent, as it is persisted.
///
/// This is the persistence format only; managers keep usage in their own
/// representation and convert at [`persist`](crate::BudgetManager::persist)
/// and [`restore`](crate::BudgetManager::restore).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens used in the window.
    pub tokens_used: u64,
    /// Calls made in the window.
    pub calls_used: u64,
    /// When the window started (RFC 3339, UTC, in JSON).
    pub window_start: DateTime<Utc>,
}

/// What is left of an agent's budget in its current window.
///
/// An agent without a budget reads as all zeros and exhausted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetInfo {
    /// Tokens left in the current window.
    pub tokens_remaining: u64,
    /// Calls left in the current window.
    pub calls_remaining: u64,
    /// Whole seconds until the current window ends.
    pub window_remaining_secs: u64,
    /// Whether tokens or calls are used up.
    pub is_exhausted: bool,
}

/// An agent's limits and usage together, for dashboards.
///
/// For an agent on a [`RefillLimit`], the "window" fields describe its
/// bucket: `window_secs` is the refill period in whole seconds (rounded
/// up), `window_remaining_secs` the time until the bucket is full again,
/// and the used and remaining amounts are what is taken and not yet
/// refilled, and what could be taken now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullBudgetInfo {
    /// The agent this describes.
    pub agent_id: AgentId,
    /// Tokens admitted per window, as configured.
    pub token_limit: u64,
    /// Tokens used in the current window. A settled
    /// [`Reservation`](crate::Reservation) may have pushed it past the limit.
    pub tokens_used: u64,
    /// Tokens left in the current window.
    pub tokens_remaining: u64,
    /// Calls admitted per window, as configured.
    pub calls_limit: u64,
    /// Calls made in the current window.
    pub calls_used: u64,
    /// Calls left in the current window.
    pub calls_remaining: u64,
    /// Length of a window, in seconds.
    pub window_secs: u64,
    /// Whole seconds until the current window ends.
    pub window_remaining_secs: u64,
    /// Whether tokens or calls are used up.
    pub is_exhausted: bool,
}

/// Which budget refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BudgetKind {
    /// The token budget (also reported by `reserve` for an unknown agent).
    Token,
    /// The call budget (also reported by `track_call` for an unknown agent).
    Call,
}

/// One limit a request is admitted against, and what it takes there: see
/// [`acquire_set`](crate::BudgetManager::acquire_set).
///
/// A request is admitted against every claim's agent and each of that
/// agent's ancestors (each with this claim's amounts), all or none. The
/// amounts are in the limit's own unit: tokens for a token limit,
/// micro-dollars for a spend limit kept as "tokens", one call for a request
/// limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Claim {
    /// The limit (an agent's budget) the request is admitted against.
    pub agent_id: AgentId,
    /// Tokens (or whatever the limit counts as tokens) taken there.
    pub tokens: u64,
    /// Calls taken there.
    pub calls: u64,
}

/// A budget whose windows follow the UTC calendar: a day from 00:00 UTC,
/// or a calendar month from the 1st, 00:00 UTC; see
/// [`set_calendar`](crate::BudgetManager::set_calendar).
///
/// Budgets are clamped as for a [`BudgetLimit`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalendarLimit {
    /// The agent this budget applies to.
    pub agent_id: AgentId,
    /// Maximum tokens admitted per window.
    pub token_budget: u64,
    /// Maximum calls admitted per window.
    pub calls_budget: u64,
    /// Which calendar windows.
    pub period: CalendarPeriod,
}

/// The windows of a [`CalendarLimit`], in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CalendarPeriod {
    /// Days, each from 00:00 UTC to the next 00:00 UTC (86,400 s: UTC
    /// days here have no leap seconds).
    Day,
    /// Calendar months, each from the 1st at 00:00 UTC to the 1st of the
    /// next month: 28, 29, 30 or 31 days (Gregorian leap years).
    Month,
}
