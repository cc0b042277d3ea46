//! An agent's limits as operators write them, in the TOML file and in the
//! admin API alike, and the core budgets that enforce them.
//!
//! # How it works
//!
//! A limit is written the same way in both places:
//!
//! ```toml
//! [[agents.limits]]
//! window = "1m"      # a fixed window: "30s", "1m", "1h", "1d"; or refill = "1m" for a bucket
//! requests = 100     # any of: requests, tokens, spend_usd
//! tokens = 100000
//! model = "gpt-4o*"  # optional: counts only requests for matching models
//! ```
//!
//! and in JSON as `{"window": "1m", "requests": 100, "tokens": 100000}`.
//! The older fields `token_budget`, `calls_budget` and `window_secs` still
//! mean one fixed-window limit, and are turned into the same
//! [`LimitSpec`]. [`Limits::from_fields`] is the one place that reads
//! either form, checks it and says what is wrong ([`LimitError`] names the
//! field, relative to the agent: `limits[0].window`, `window_secs`); the
//! configuration turns that into `FILE:LINE:COLUMN`, the admin API into a
//! `422` with the field as `param`.
//!
//! A resource a limit leaves out is not limited by it: `requests = 100`
//! alone admits any number of tokens. A limit with none is refused, as
//! is a zero-length period.
//!
//! Each limit is enforced by one or two core budgets, its **cells**
//! ([`Cell`]): its tokens and requests share one (the core's tokens and
//! calls), its `spend_usd` has one whose tokens are micro-dollars. The
//! first limit on tokens or requests without a `model` is the agent's own
//! core budget (its id is the agent's, so the budgets view, the state file
//! and a fleet see it as before); every other cell's id is derived from
//! the agent's id and the cell's identity (its window or refill, its model
//! glob and what it counts), never from its place in the list, so a `PUT`
//! that keeps a limit keeps its usage. See [`crate::docs::limits`] for how
//! a request is admitted against them all.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use agent_budget::{
    AgentId, BudgetLimit, BudgetManager, CalendarLimit, CalendarPeriod, FullBudgetInfo, RefillLimit,
};
use agent_budget_tower::openai::pricing::glob_matches;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

/// A length of time written as a whole number and a unit: `30s`, `1m`,
/// `1h`, `1d` (seconds, minutes, hours, days), counted from the window's
/// first use; or a calendar window in UTC: `"day"` (00:00 to 00:00 UTC)
/// or `"1mo"` (from the 1st, 00:00 UTC, to the next month's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Period {
    secs: u64,
    calendar: Option<Calendar>,
}

/// A window aligned to the UTC calendar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Calendar {
    /// From 00:00 UTC to the next 00:00 UTC.
    Day,
    /// From the 1st of a month, 00:00 UTC, to the 1st of the next.
    Month,
}

/// The units a [`Period`] may be written in, longest first (the order
/// [`Display`](fmt::Display) tries them in).
const UNITS: [(&str, u64); 4] = [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)];

/// The longest period: a hundred years of 365 days, well within what the
/// core's clock marks count (about 139 years), so that no period is
/// silently shortened.
pub const MAX_PERIOD_SECS: u64 = 100 * 365 * 86_400;

impl Period {
    /// A period of `secs` seconds; `None` for zero or more than
    /// [`MAX_PERIOD_SECS`].
    pub fn from_secs(secs: u64) -> Option<Self> {
        (1..=MAX_PERIOD_SECS).contains(&secs).then_some(Period {
            secs,
            calendar: None,
        })
    }

    /// A calendar window.
    pub fn calendar(calendar: Calendar) -> Self {
        let secs = match calendar {
            Calendar::Day => 86_400,
            // The longest month: what a reset may be away, at most.
            Calendar::Month => 31 * 86_400,
        };
        Period {
            secs,
            calendar: Some(calendar),
        }
    }

    /// Its length in seconds (at least one); a calendar month's is the
    /// longest month's.
    pub fn secs(self) -> u64 {
        self.secs
    }

    /// The calendar window it is, if it is one.
    pub fn as_calendar(self) -> Option<Calendar> {
        self.calendar
    }
}

impl FromStr for Period {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let usage = || {
            format!(
                "{text:?} is not a period: write a whole number and a unit, s, m, h or d \
                 (\"30s\", \"1m\", \"1h\", \"1d\"), or a calendar window, \"day\" or \"1mo\""
            )
        };
        match text {
            "1mo" => return Ok(Period::calendar(Calendar::Month)),
            "day" => return Ok(Period::calendar(Calendar::Day)),
            _ => {}
        }
        let digits = text.bytes().take_while(u8::is_ascii_digit).count();
        let (number, unit) = text.split_at(digits);
        if unit == "mo" {
            return Err(format!(
                "{text:?}: a calendar window is one month, \"1mo\"; for longer, use days (\"60d\")"
            ));
        }
        let (_, scale) = UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .ok_or_else(usage)?;
        let count: u64 = number.parse().map_err(|_| usage())?;
        match count.checked_mul(*scale) {
            Some(0) => Err(format!("{text:?}: a period must not be zero")),
            secs => secs.and_then(Period::from_secs).ok_or_else(|| {
                format!("{text:?} is too long: a period is at most 100 years (\"36500d\")")
            }),
        }
    }
}

impl fmt::Display for Period {
    /// The longest unit that divides it: 60 seconds is `1m`, 90 is `90s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.calendar {
            Some(Calendar::Day) => return f.write_str("day"),
            Some(Calendar::Month) => return f.write_str("1mo"),
            None => {}
        }
        let (unit, scale) = UNITS
            .iter()
            .find(|(_, scale)| self.secs.is_multiple_of(*scale))
            .expect("every whole number of seconds divides by one");
        write!(f, "{}{unit}", self.secs / scale)
    }
}

impl Serialize for Period {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Period;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a period such as \"30s\", \"1m\", \"1h\", \"1d\", \"day\" or \"1mo\"")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Period, E> {
                text.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

impl utoipa::PartialSchema for Period {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^([1-9][0-9]*(s|m|h|d)|day|1mo)$"))
            .description(Some(
                "A whole number and a unit: s, m, h or d (\"30s\", \"1m\", \"1h\", \"1d\"), \
                 counted from the window's first use; or a UTC calendar window: \"day\" \
                 (from 00:00 UTC) or \"1mo\" (from the 1st, 00:00 UTC).",
            ))
            .examples(["1m"])
            .into()
    }
}

impl ToSchema for Period {}

/// One limit of an agent: `[[agents.limits]]` in the file, an element of
/// `limits` in the admin API.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    /// A fixed window of this length: what it admits is counted from the
    /// window's start and forgotten at its end (`"day"` and `"1mo"`: the
    /// UTC calendar's day and month).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Period>)]
    pub window: Option<Period>,
    /// A bucket that refills from empty to full in this long, continuously.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Period>)]
    pub refill: Option<Period>,
    /// Requests admitted per window (or held by the bucket, at most half
    /// the maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 4_294_967_295_f64)]
    pub requests: Option<u64>,
    /// Tokens admitted per window (or held by the bucket, at most half the
    /// maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 4_503_599_627_370_495_f64)]
    pub tokens: Option<u64>,
    /// Dollars per window (or held by the bucket), priced by the
    /// configuration's `[[models]]` table, counted in micro-dollars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 1_000_000.0_f64)]
    pub spend_usd: Option<f64>,
    /// Counts only requests whose `model` matches this glob (`*` any run
    /// of characters, `?` one); every request when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 256)]
    pub model: Option<String>,
}

/// What is wrong with an agent's limits, and which field is to blame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitError {
    /// The field, relative to the agent: `limits[1].window`, `calls_budget`;
    /// `None` when the agent as a whole is to blame (no limits at all).
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "`{field}`: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for LimitError {}

/// The older way to write one limit: `token_budget`, `calls_budget` and
/// `window_secs`, all three or none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LegacyFields {
    /// `token_budget`.
    pub token_budget: Option<u64>,
    /// `calls_budget`.
    pub calls_budget: Option<u64>,
    /// `window_secs`.
    pub window_secs: Option<u64>,
}

impl LegacyFields {
    fn is_empty(&self) -> bool {
        *self == LegacyFields::default()
    }
}

/// The most dollars a spend limit may hold per window: a million, so its
/// micro-dollars (10^12) stay within what the core counts exactly (10^12
/// tokens per window: see `agent_budget::MAX_TOKENS`).
pub const MAX_SPEND_USD: f64 = 1e6;

/// The longest `model` glob, in characters.
pub const MAX_MODEL_GLOB_CHARS: usize = 256;

/// The most limits one agent may have: their cells (at most two each)
/// then fit in one core admission ([`agent_budget::MAX_SET_LIMITS`]).
pub const MAX_LIMITS_PER_AGENT: usize = 16;

/// The most tokens a limit may admit per window: what the core counts
/// exactly ([`agent_budget::MAX_TOKENS`]; half of it for a bucket). A
/// larger number would be enforced as this one, so it is refused instead.
pub const MAX_LIMIT_TOKENS: u64 = agent_budget::MAX_TOKENS;

/// The most requests a limit may admit per window: what the core counts
/// exactly ([`agent_budget::MAX_CALLS`]; half of it for a bucket).
pub const MAX_LIMIT_REQUESTS: u64 = agent_budget::MAX_CALLS;

/// An agent's limits, checked, and the limit cells the core enforces them
/// with (see [`crate::docs::limits`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    specs: Arc<[LimitSpec]>,
    cells: Arc<[Cell]>,
}

/// How a limit's amounts come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Timing {
    /// All at once when the window ends.
    Window(Period),
    /// Continuously, the whole amount in this long.
    Refill(Period),
}

impl fmt::Display for Timing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Timing::Window(p) => write!(f, "window={p}"),
            Timing::Refill(p) => write!(f, "refill={p}"),
        }
    }
}

/// What one limit cell counts: a core budget's tokens and calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counts {
    /// Tokens and requests (the core's tokens and calls); a resource the
    /// limit leaves out is `u64::MAX`, which the core never runs out of.
    Usage {
        /// Tokens per window.
        tokens: u64,
        /// Requests per window.
        requests: u64,
    },
    /// Micro-dollars per window, in the core's tokens; its calls are
    /// `u64::MAX` and never claimed.
    Spend {
        /// Micro-dollars per window.
        micros: u64,
    },
}

/// One core budget enforcing (part of) one of an agent's limits: the
/// tokens and requests of a `[[agents.limits]]` entry share one, its
/// `spend_usd` has one of its own.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    /// The index of the limit it enforces in the agent's list.
    pub spec: usize,
    /// Its window or bucket.
    pub timing: Timing,
    /// The glob on the request's `model` it counts, if not every request.
    pub model: Option<Arc<str>>,
    /// What it counts.
    pub counts: Counts,
    /// Whether it is the agent's own core budget (its id is the agent's):
    /// the first limit on tokens or requests that counts every model.
    pub primary: bool,
}

impl Cell {
    /// Whether it counts requests for `model` (`None`: a request that
    /// names no model, which only limits without a glob count).
    pub fn counts_model(&self, model: Option<&str>) -> bool {
        match (&self.model, model) {
            (None, _) => true,
            (Some(glob), Some(model)) => glob_matches(glob, model),
            (Some(_), None) => false,
        }
    }

    /// What identifies it among the agent's cells, whatever its index: a
    /// `PUT` that keeps a limit keeps its cell, and its usage.
    fn identity(&self) -> String {
        let resource = match self.counts {
            Counts::Usage { .. } => "usage",
            Counts::Spend { .. } => "spend",
        };
        format!(
            "{}|{}|{resource}",
            self.timing,
            self.model.as_deref().unwrap_or("")
        )
    }

    /// Its core budget's id for `agent`: the agent's own for the primary
    /// cell, else derived from the agent's id and the cell's identity
    /// (SHA-256, as a version 8 UUID).
    pub fn id(&self, agent: AgentId) -> AgentId {
        if self.primary {
            return agent;
        }
        let mut hash = Sha256::new();
        hash.update(b"agent-budget limit cell\0");
        hash.update(agent.as_bytes());
        hash.update(self.identity().as_bytes());
        let digest = hash.finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        uuid::Builder::from_custom_bytes(bytes).into_uuid()
    }

    /// What the core enforces for it, under `id`.
    pub fn core(&self, id: AgentId) -> CoreLimit {
        let (token_budget, calls_budget) = match self.counts {
            Counts::Usage { tokens, requests } => (tokens, requests),
            Counts::Spend { micros } => (micros, u64::MAX),
        };
        match self.timing {
            Timing::Refill(period) => CoreLimit::Refill(RefillLimit {
                agent_id: id,
                token_budget,
                calls_budget,
                refill_period: Duration::from_secs(period.secs()),
            }),
            Timing::Window(period) => match period.as_calendar() {
                Some(calendar) => CoreLimit::Calendar(CalendarLimit {
                    agent_id: id,
                    token_budget,
                    calls_budget,
                    period: match calendar {
                        Calendar::Day => CalendarPeriod::Day,
                        Calendar::Month => CalendarPeriod::Month,
                    },
                }),
                None => CoreLimit::Window(BudgetLimit {
                    agent_id: id,
                    token_budget,
                    calls_budget,
                    window_secs: period.secs(),
                }),
            },
        }
    }
}

/// One limit as the core enforces it: a fixed window, or a bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoreLimit {
    /// A fixed window ([`BudgetManager::set_budget`]).
    Window(BudgetLimit),
    /// A bucket ([`BudgetManager::set_refill`]).
    Refill(RefillLimit),
    /// A window of the UTC calendar ([`BudgetManager::set_calendar`]).
    Calendar(CalendarLimit),
}

impl CoreLimit {
    /// Sets it in `budgets`: the agent keeps what it used in its window.
    pub fn apply(&self, budgets: &BudgetManager) {
        match self {
            CoreLimit::Window(limit) => budgets.set_budget(limit.clone()),
            CoreLimit::Refill(limit) => budgets.set_refill(limit.clone()),
            CoreLimit::Calendar(limit) => budgets.set_calendar(limit.clone()),
        }
    }
}

fn error(field: impl Into<Option<String>>, message: impl Into<String>) -> LimitError {
    LimitError {
        field: field.into(),
        message: message.into(),
    }
}

impl Limits {
    /// Reads an agent's limits from either form: the list `limits`, or the
    /// older `token_budget`, `calls_budget` and `window_secs`. Exactly one
    /// of the two must be given.
    pub fn from_fields(
        limits: Option<&[LimitSpec]>,
        legacy: LegacyFields,
    ) -> Result<Limits, LimitError> {
        match (limits, legacy.is_empty()) {
            (Some(_), false) => {
                let field = if legacy.token_budget.is_some() {
                    "token_budget"
                } else if legacy.calls_budget.is_some() {
                    "calls_budget"
                } else {
                    "window_secs"
                };
                Err(error(
                    field.to_owned(),
                    "give either `limits` or `token_budget`, `calls_budget` and \
                     `window_secs`, not both",
                ))
            }
            (Some(list), true) => Self::from_list(list),
            (None, false) => Self::from_legacy(legacy),
            (None, true) => Err(error(
                None,
                "the agent has no limits: give `limits` (a list of limits), or \
                 `token_budget`, `calls_budget` and `window_secs`",
            )),
        }
    }

    fn from_legacy(legacy: LegacyFields) -> Result<Limits, LimitError> {
        let missing = |name: &str| error(None, format!("missing field `{name}`"));
        let tokens = legacy.token_budget.ok_or_else(|| missing("token_budget"))?;
        let calls = legacy.calls_budget.ok_or_else(|| missing("calls_budget"))?;
        let secs = legacy.window_secs.ok_or_else(|| missing("window_secs"))?;
        let window = Period::from_secs(secs).ok_or_else(|| {
            error(
                "window_secs".to_owned(),
                format!("a window is from one second to {MAX_PERIOD_SECS} (100 years)"),
            )
        })?;
        Self::from_list(&[LimitSpec {
            window: Some(window),
            requests: Some(calls),
            tokens: Some(tokens),
            ..LimitSpec::default()
        }])
        .map_err(|mut e| {
            // The one limit's fields, by the names they were given.
            e.field = e.field.map(|field| match field.as_str() {
                "limits[0].tokens" => "token_budget".to_owned(),
                "limits[0].requests" => "calls_budget".to_owned(),
                _ => field,
            });
            e
        })
    }

    /// Checks a list of limits, and lays out their cells.
    fn from_list(list: &[LimitSpec]) -> Result<Limits, LimitError> {
        if list.is_empty() {
            return Err(error(
                "limits".to_owned(),
                "the list is empty: give at least one limit",
            ));
        }
        if list.len() > MAX_LIMITS_PER_AGENT {
            return Err(error(
                "limits".to_owned(),
                format!(
                    "{} limits: an agent may have at most {MAX_LIMITS_PER_AGENT}",
                    list.len()
                ),
            ));
        }
        let mut cells: Vec<Cell> = Vec::with_capacity(list.len());
        let mut has_primary = false;
        for (i, spec) in list.iter().enumerate() {
            let at = |field: &str| format!("limits[{i}].{field}");
            let timing = spec
                .check()
                .map_err(|(field, message)| error(at(field), message))?;
            let model: Option<Arc<str>> = spec.model.as_deref().map(Arc::from);
            let mut add = |counts: Counts, field: &str| {
                let primary =
                    !has_primary && model.is_none() && matches!(counts, Counts::Usage { .. });
                has_primary |= primary;
                let cell = Cell {
                    spec: i,
                    timing,
                    model: model.clone(),
                    counts,
                    primary,
                };
                if let Some(same) = cells.iter().find(|c| c.identity() == cell.identity()) {
                    return Err(error(
                        at(field),
                        format!(
                            "limits[{}] already limits this with the same {} and model: \
                             give one limit per window and model",
                            same.spec,
                            match timing {
                                Timing::Window(_) => "window",
                                Timing::Refill(_) => "refill",
                            }
                        ),
                    ));
                }
                cells.push(cell);
                Ok(())
            };
            if spec.tokens.is_some() || spec.requests.is_some() {
                add(
                    Counts::Usage {
                        tokens: spec.tokens.unwrap_or(u64::MAX),
                        requests: spec.requests.unwrap_or(u64::MAX),
                    },
                    if spec.tokens.is_some() {
                        "tokens"
                    } else {
                        "requests"
                    },
                )?;
            }
            if let Some(usd) = spec.spend_usd {
                add(
                    Counts::Spend {
                        micros: usd_to_micros(usd),
                    },
                    "spend_usd",
                )?;
            }
        }
        Ok(Limits {
            specs: list.into(),
            cells: cells.into(),
        })
    }

    /// The limits, as given (a legacy agent's as one [`LimitSpec`]).
    pub fn specs(&self) -> &[LimitSpec] {
        &self.specs
    }

    /// The cells that enforce them, in the order of the limits.
    pub fn cells(&self) -> &[Cell] {
        &self.cells
    }

    /// Whether these are one limit on tokens and requests for every model,
    /// as before lists: the agent's own core budget is all there is, and
    /// requests take the core's one-budget path.
    pub fn is_single(&self) -> bool {
        matches!(&*self.cells, [cell] if cell.primary)
    }

    /// Whether a limit counts dollars.
    pub fn has_spend(&self) -> bool {
        self.cells
            .iter()
            .any(|c| matches!(c.counts, Counts::Spend { .. }))
    }

    /// What the core enforces for `agent_id`: each cell's budget, and, when
    /// no cell is the agent's own (only spend or per-model limits), an
    /// unlimited budget in its name, which links it to its parent's.
    pub fn core_limits(&self, agent_id: AgentId) -> Vec<CoreLimit> {
        let mut all: Vec<CoreLimit> = self.cells.iter().map(|c| c.core(c.id(agent_id))).collect();
        if !self.cells.iter().any(|c| c.primary) {
            all.push(CoreLimit::Window(BudgetLimit {
                agent_id,
                token_budget: u64::MAX,
                calls_budget: u64::MAX,
                window_secs: 86_400,
            }));
        }
        all
    }

    /// Sets every core budget of the agent's limits in `budgets`, keeping
    /// the usage of those it had already.
    pub fn apply(&self, agent_id: AgentId, budgets: &BudgetManager) {
        for limit in self.core_limits(agent_id) {
            limit.apply(budgets);
        }
    }

    /// [`apply`](Self::apply) in place of `old` (the agent's limits until
    /// now, if any): the cells `old` had and these have not are removed.
    pub fn apply_over(&self, old: Option<&Limits>, agent_id: AgentId, budgets: &BudgetManager) {
        self.apply(agent_id, budgets);
        if let Some(old) = old {
            let kept = self.core_ids(agent_id);
            for id in old.core_ids(agent_id) {
                if !kept.contains(&id) {
                    budgets.remove_budget(&id);
                }
            }
        }
    }

    /// Removes every core budget of the agent's limits.
    pub fn remove(&self, agent_id: AgentId, budgets: &BudgetManager) {
        for id in self.core_ids(agent_id) {
            budgets.remove_budget(&id);
        }
    }

    /// The ids of the core budgets of the agent's limits (its own first).
    pub fn core_ids(&self, agent_id: AgentId) -> Vec<AgentId> {
        let mut ids = vec![agent_id];
        ids.extend(
            self.cells
                .iter()
                .filter(|c| !c.primary)
                .map(|c| c.id(agent_id)),
        );
        ids
    }

    /// What the core enforces for `agent_id` of its own limit: the first
    /// cell's.
    pub fn core(&self, agent_id: AgentId) -> CoreLimit {
        self.core_limits(agent_id).swap_remove(0)
    }

    /// The fixed window a fleet shares through Redis, or why these limits
    /// cannot be shared (a bucket, several limits, spend, a model).
    pub fn fleet_window(&self, agent_id: AgentId) -> Result<BudgetLimit, LimitError> {
        let unsupported = |field: String, what: &str| {
            error(
                field,
                format!(
                    "budgets shared through Redis are one fixed window on tokens and \
                     requests: {what} is enforced by a gateway on its own; run without --redis"
                ),
            )
        };
        if self.specs.len() > 1 {
            return Err(unsupported(
                "limits[1]".to_owned(),
                "a list of several limits",
            ));
        }
        if self.specs[0].spend_usd.is_some() {
            return Err(unsupported("limits[0].spend_usd".to_owned(), "spend"));
        }
        if self.specs[0].model.is_some() {
            return Err(unsupported(
                "limits[0].model".to_owned(),
                "a per-model limit",
            ));
        }
        match self.core(agent_id) {
            CoreLimit::Window(limit) => Ok(limit),
            CoreLimit::Calendar(_) => Err(unsupported(
                "limits[0].window".to_owned(),
                "a calendar window",
            )),
            CoreLimit::Refill(_) => Err(error(
                "limits[0].refill".to_owned(),
                "budgets shared through Redis are fixed windows: use `window` instead of \
                 `refill`, or run without --redis",
            )),
        }
    }

    /// Where each limit stands, from the core's view of each of its cells
    /// (`info` of a cell's id); a cell without a budget yet (a fleet's,
    /// until Redis has it) shows nothing used.
    pub fn states(
        &self,
        agent_id: AgentId,
        info: impl Fn(&AgentId) -> Option<FullBudgetInfo>,
    ) -> Vec<LimitState> {
        let mut states: Vec<LimitState> = self.specs.iter().map(LimitState::unused).collect();
        for cell in self.cells.iter() {
            if let Some(info) = info(&cell.id(agent_id)) {
                states[cell.spec].add(cell, &info);
            }
        }
        states
    }
}

/// Dollars as micro-dollars, to the nearest (the spend was checked to be
/// finite, not negative and at most [`MAX_SPEND_USD`]).
fn usd_to_micros(usd: f64) -> u64 {
    (usd * 1e6).round() as u64
}

/// Micro-dollars as dollars, for display.
pub fn micros_to_usd(micros: u64) -> f64 {
    micros as f64 / 1e6
}

impl LimitSpec {
    /// Checks one limit on its own, and reads its window; the error names
    /// the field.
    fn check(&self) -> Result<Timing, (&'static str, String)> {
        if let Some(usd) = self.spend_usd {
            if !(usd.is_finite() && (0.0..=MAX_SPEND_USD).contains(&usd)) {
                return Err((
                    "spend_usd",
                    format!("{usd} is not a spend limit: give dollars from 0 to {MAX_SPEND_USD:e}"),
                ));
            }
        }
        if let Some(model) = &self.model {
            if model.trim().is_empty()
                || model.chars().count() > MAX_MODEL_GLOB_CHARS
                || model.chars().any(char::is_control)
            {
                return Err((
                    "model",
                    format!(
                        "{model:?} is not a model glob: give 1 to {MAX_MODEL_GLOB_CHARS} \
                         characters without control characters (\"gpt-4o*\")"
                    ),
                ));
            }
        }
        let timing = match (self.window, self.refill) {
            (Some(window), None) => Timing::Window(window),
            (None, Some(refill)) if refill.as_calendar().is_some() => {
                return Err((
                    "refill",
                    "a bucket refills over a length of time (\"1h\", \"30d\"), not a \
                     calendar window"
                        .to_owned(),
                ))
            }
            (None, Some(refill)) => Timing::Refill(refill),
            (Some(_), Some(_)) => {
                return Err((
                    "refill",
                    "give `window` (a fixed window) or `refill` (a bucket), not both".to_owned(),
                ))
            }
            (None, None) => {
                return Err((
                    "window",
                    "give `window` (a fixed window, e.g. \"1m\") or `refill` (a bucket that \
                     refills in that long)"
                        .to_owned(),
                ))
            }
        };
        let (max_tokens, max_requests) = match timing {
            Timing::Window(_) => (MAX_LIMIT_TOKENS, MAX_LIMIT_REQUESTS),
            Timing::Refill(_) => (MAX_LIMIT_TOKENS / 2, MAX_LIMIT_REQUESTS / 2),
        };
        if let Some(tokens) = self.tokens.filter(|&t| t > max_tokens) {
            return Err((
                "tokens",
                format!("{tokens} tokens is more than a limit counts: give at most {max_tokens}"),
            ));
        }
        if let Some(requests) = self.requests.filter(|&r| r > max_requests) {
            return Err((
                "requests",
                format!(
                    "{requests} requests is more than a limit counts: give at most {max_requests}"
                ),
            ));
        }
        if self.requests.is_none() && self.tokens.is_none() && self.spend_usd.is_none() {
            return Err((
                "requests",
                "a limit must limit something: give `requests`, `tokens`, `spend_usd`, or \
                 several"
                    .to_owned(),
            ));
        }
        Ok(timing)
    }
}

/// Amounts of each resource a limit counts; a resource it does not limit
/// is left out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Amounts {
    /// Requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    /// Tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// Dollars (to the micro-dollar).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_usd: Option<f64>,
}

/// A limit and where it stands now.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct LimitState {
    /// The limit, as configured (what a `PUT` takes back).
    pub limit: LimitSpec,
    /// Used in the current window (for a bucket: taken and not yet
    /// refilled). A settled request may have pushed it past the limit.
    pub used: Amounts,
    /// What could still be admitted now.
    pub remaining: Amounts,
    /// Whole seconds until the window ends (for a bucket: until it is full
    /// again).
    pub resets_in_secs: u64,
    /// Whether a limited resource is used up: requests are refused until
    /// the reset.
    pub exhausted: bool,
}

impl LimitState {
    /// A limit with nothing used.
    fn unused(spec: &LimitSpec) -> Self {
        LimitState {
            limit: spec.clone(),
            used: Amounts {
                requests: spec.requests.map(|_| 0),
                tokens: spec.tokens.map(|_| 0),
                spend_usd: spec.spend_usd.map(|_| 0.0),
            },
            remaining: Amounts {
                requests: spec.requests,
                tokens: spec.tokens,
                spend_usd: spec.spend_usd,
            },
            resets_in_secs: 0,
            exhausted: false,
        }
    }

    /// Reads one of its cells' state.
    fn add(&mut self, cell: &Cell, info: &FullBudgetInfo) {
        let spec = &self.limit;
        let limited = |limit: Option<u64>, value: u64| limit.map(|_| value);
        match cell.counts {
            Counts::Usage { .. } => {
                self.used.requests = limited(spec.requests, info.calls_used);
                self.used.tokens = limited(spec.tokens, info.tokens_used);
                self.remaining.requests = limited(spec.requests, info.calls_remaining);
                self.remaining.tokens = limited(spec.tokens, info.tokens_remaining);
            }
            Counts::Spend { .. } => {
                self.used.spend_usd = Some(micros_to_usd(info.tokens_used));
                self.remaining.spend_usd = Some(micros_to_usd(info.tokens_remaining));
            }
        }
        self.resets_in_secs = self.resets_in_secs.max(info.window_remaining_secs);
        self.exhausted |= info.is_exhausted;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn period(text: &str) -> Result<Period, String> {
        text.parse()
    }

    #[test]
    fn periods_read_and_print_in_their_largest_unit() {
        for (text, secs, shown) in [
            ("30s", 30, "30s"),
            ("2s", 2, "2s"),
            ("1m", 60, "1m"),
            ("60s", 60, "1m"),
            ("90s", 90, "90s"),
            ("1h", 3_600, "1h"),
            ("1d", 86_400, "1d"),
            ("30d", 2_592_000, "30d"),
            ("48h", 172_800, "2d"),
        ] {
            let p = period(text).unwrap();
            assert_eq!(p.secs(), secs, "{text}");
            assert_eq!(p.to_string(), shown, "{text}");
        }
    }

    #[test]
    fn bad_periods_say_what_a_period_is() {
        for bad in ["", "1", "m", "1 m", "-1m", "1.5h", "1w", "1M", "+1m", "1mm"] {
            let e = period(bad).unwrap_err();
            assert!(e.contains("a whole number and a unit"), "{bad}: {e}");
        }
        assert!(period("0s").unwrap_err().contains("must not be zero"));
        assert!(period("2mo").unwrap_err().contains("one month"));
        assert_eq!(period("1mo").unwrap().to_string(), "1mo");
        assert_eq!(period("day").unwrap().as_calendar(), Some(Calendar::Day));
        assert!(period("999999999999999999d")
            .unwrap_err()
            .contains("too long"));
        assert_eq!(period("36500d").unwrap().secs(), MAX_PERIOD_SECS);
        assert!(period("36501d").unwrap_err().contains("at most 100 years"));
        assert!(Period::from_secs(MAX_PERIOD_SECS + 1).is_none());
    }

    fn spec(json: &str) -> LimitSpec {
        serde_json::from_str(json).unwrap()
    }

    fn list(json: &str) -> Result<Limits, LimitError> {
        let list: Vec<LimitSpec> = serde_json::from_str(json).unwrap();
        Limits::from_fields(Some(&list), LegacyFields::default())
    }

    #[test]
    fn one_window_or_one_bucket_becomes_the_cores_limit() {
        let id = AgentId::from_u128(1);
        let limits = list(r#"[{"window": "1m", "requests": 10, "tokens": 500}]"#).unwrap();
        assert_eq!(
            limits.core(id),
            CoreLimit::Window(BudgetLimit {
                agent_id: id,
                token_budget: 500,
                calls_budget: 10,
                window_secs: 60
            })
        );
        let limits = list(r#"[{"refill": "1h", "tokens": 500}]"#).unwrap();
        assert_eq!(
            limits.core(id),
            CoreLimit::Refill(RefillLimit {
                agent_id: id,
                token_budget: 500,
                calls_budget: u64::MAX,
                refill_period: Duration::from_secs(3_600)
            })
        );
        assert!(limits.fleet_window(id).is_err());
    }

    #[test]
    fn the_legacy_fields_are_one_window() {
        let legacy = LegacyFields {
            token_budget: Some(1_000),
            calls_budget: Some(10),
            window_secs: Some(60),
        };
        let limits = Limits::from_fields(None, legacy).unwrap();
        assert_eq!(
            limits.specs(),
            [spec(r#"{"window": "1m", "requests": 10, "tokens": 1000}"#)]
        );
        let e = Limits::from_fields(
            None,
            LegacyFields {
                calls_budget: None,
                ..legacy
            },
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "missing field `calls_budget`");
        let e = Limits::from_fields(
            None,
            LegacyFields {
                window_secs: Some(0),
                ..legacy
            },
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("window_secs"));
        let e = Limits::from_fields(
            None,
            LegacyFields {
                window_secs: Some(1 << 63),
                ..legacy
            },
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("window_secs"), "{e}");
        let e = Limits::from_fields(
            None,
            LegacyFields {
                token_budget: Some(1 << 63),
                ..legacy
            },
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("token_budget"), "{e}");
        let e = Limits::from_fields(
            None,
            LegacyFields {
                calls_budget: Some(u64::MAX),
                ..legacy
            },
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("calls_budget"), "{e}");
        let e = Limits::from_fields(Some(limits.specs()), legacy).unwrap_err();
        assert!(e.message.contains("not both"), "{e}");
        let e = Limits::from_fields(None, LegacyFields::default()).unwrap_err();
        assert!(e.message.contains("no limits"), "{e}");
    }

    #[test]
    fn bad_limits_are_refused_by_name() {
        for (json, field, says) in [
            ("[]", "limits", "empty"),
            (
                r#"[{"window": "1m", "requests": 1}, {"window": "1m", "tokens": 9}]"#,
                "limits[1].tokens",
                "limits[0] already limits this",
            ),
            (
                r#"[{"window": "1m", "spend_usd": -5.0}]"#,
                "limits[0].spend_usd",
                "not a spend limit",
            ),
            (
                r#"[{"window": "1m", "tokens": 4503599627370496}]"#,
                "limits[0].tokens",
                "at most 4503599627370495",
            ),
            (
                r#"[{"refill": "1m", "tokens": 2251799813685248}]"#,
                "limits[0].tokens",
                "at most 2251799813685247",
            ),
            (
                r#"[{"window": "1m", "requests": 4294967296}]"#,
                "limits[0].requests",
                "at most 4294967295",
            ),
            (
                r#"[{"window": "1m", "requests": 1, "model": " "}]"#,
                "limits[0].model",
                "not a model glob",
            ),
            (
                r#"[{"window": "1m", "refill": "1m", "requests": 1}]"#,
                "limits[0].refill",
                "not both",
            ),
            (r#"[{"requests": 1}]"#, "limits[0].window", "give `window`"),
            (
                r#"[{"window": "1m"}]"#,
                "limits[0].requests",
                "limit something",
            ),
        ] {
            let e = list(json).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{json}");
            assert!(e.message.contains(says), "{json}: {e}");
        }
        let many = |n: usize| {
            let specs: Vec<String> = (1..=n)
                .map(|i| format!(r#"{{"window": "{i}m", "requests": 1}}"#))
                .collect();
            list(&format!("[{}]", specs.join(",")))
        };
        assert!(many(MAX_LIMITS_PER_AGENT).is_ok());
        let e = many(MAX_LIMITS_PER_AGENT + 1).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("limits"));
        assert!(e.message.contains("at most 16"), "{e}");
    }

    #[test]
    fn several_limits_spend_and_models_become_cells_with_stable_ids() {
        let id = AgentId::from_u128(7);
        let limits = list(
            r#"[{"window": "1m", "requests": 100, "tokens": 1000},
                {"window": "1d", "tokens": 50000, "spend_usd": 1.5},
                {"window": "1m", "requests": 10, "model": "gpt-4o*"}]"#,
        )
        .unwrap();
        assert!(!limits.is_single());
        assert!(limits.has_spend());
        let cells = limits.cells();
        assert_eq!(cells.len(), 4);
        assert_eq!(
            cells[0].id(id),
            id,
            "the first unscoped limit is the agent's own"
        );
        assert_eq!(cells[2].counts, Counts::Spend { micros: 1_500_000 });
        let ids = limits.core_ids(id);
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), 4);
        assert!(cells[3].counts_model(Some("gpt-4o-mini")));
        assert!(!cells[3].counts_model(Some("o3")));
        assert!(!cells[3].counts_model(None));
        assert!(cells[1].counts_model(None));
        // The same limits in another order keep their cells' ids; another
        // agent's differ.
        let reordered = list(
            r#"[{"window": "1m", "requests": 100, "tokens": 1000},
                {"window": "1m", "requests": 10, "model": "gpt-4o*"},
                {"window": "1d", "tokens": 50000, "spend_usd": 1.5}]"#,
        )
        .unwrap();
        let mut a = limits.core_ids(id);
        let mut b = reordered.core_ids(id);
        a.sort();
        b.sort();
        assert_eq!(a, b);
        assert_ne!(cells[1].id(id), cells[1].id(AgentId::from_u128(8)));
        // A spend-only agent still has a budget of its own, unlimited.
        let spend = list(r#"[{"window": "1h", "spend_usd": 2.0}]"#).unwrap();
        let core = spend.core_limits(id);
        assert_eq!(core.len(), 2);
        assert!(
            matches!(&core[1], CoreLimit::Window(l) if l.agent_id == id && l.token_budget == u64::MAX)
        );
        assert!(spend.fleet_window(id).is_err());
    }

    #[test]
    fn unknown_fields_and_bad_periods_are_refused_when_read() {
        let e = serde_json::from_str::<LimitSpec>(r#"{"window": "1m", "token": 5}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `token`"), "{e}");
        let e = serde_json::from_str::<LimitSpec>(r#"{"window": "1x"}"#).unwrap_err();
        assert!(e.to_string().contains("is not a period"), "{e}");
    }

    #[test]
    fn states_show_only_the_limited_resources() {
        let limits = list(r#"[{"window": "1m", "requests": 10}]"#).unwrap();
        let info = FullBudgetInfo {
            agent_id: AgentId::from_u128(1),
            token_limit: u64::MAX,
            tokens_used: 300,
            tokens_remaining: u64::MAX,
            calls_limit: 10,
            calls_used: 3,
            calls_remaining: 7,
            window_secs: 60,
            window_remaining_secs: 42,
            is_exhausted: false,
        };
        let state = &limits.states(info.agent_id, |_| Some(info.clone()))[0];
        assert_eq!(
            state.used,
            Amounts {
                requests: Some(3),
                tokens: None,
                spend_usd: None
            }
        );
        assert_eq!(state.remaining.requests, Some(7));
        assert_eq!(state.resets_in_secs, 42);
        let json = serde_json::to_value(state).unwrap();
        assert_eq!(
            json["limit"],
            serde_json::json!({"window": "1m", "requests": 10})
        );
        assert_eq!(json["used"], serde_json::json!({"requests": 3}));
    }
}
