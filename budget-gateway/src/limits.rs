//! An agent's limits as operators write them, in the TOML file and in the
//! admin API alike, and what the core enforces of them.
//!
//! # How it works
//!
//! A limit is written the same way in both places:
//!
//! ```toml
//! [[agents.limits]]
//! window = "1m"      # a fixed window: "30s", "1m", "1h", "1d"; or refill = "1m" for a bucket
//! requests = 100     # any of: requests, tokens
//! tokens = 100000
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
//! alone admits any number of tokens. A limit with neither is refused, as
//! is a zero-length period.
//!
//! The core enforces exactly one limit per agent today (tokens and calls
//! together, in a fixed window or a bucket: [`CoreLimit`]), so a list of
//! several limits, `spend_usd`, `model` and calendar months (`"1mo"`) are
//! understood and refused with a message that says so, rather than
//! rejected as unknown. Several limits at once, spend and per-model
//! limits extend this module: the fields are already here.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use agent_budget::{AgentId, BudgetLimit, BudgetManager, FullBudgetInfo, RefillLimit};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A length of time written as a whole number and a unit: `30s`, `1m`,
/// `1h`, `1d` (seconds, minutes, hours, days).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Period {
    secs: u64,
}

/// The units a [`Period`] may be written in, longest first (the order
/// [`Display`](fmt::Display) tries them in).
const UNITS: [(&str, u64); 4] = [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)];

impl Period {
    /// A period of `secs` seconds; `None` for zero.
    pub fn from_secs(secs: u64) -> Option<Self> {
        (secs > 0).then_some(Period { secs })
    }

    /// Its length in seconds (at least one).
    pub fn secs(self) -> u64 {
        self.secs
    }
}

impl FromStr for Period {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let usage = || {
            format!(
                "{text:?} is not a period: write a whole number and a unit, s, m, h or d \
                 (\"30s\", \"1m\", \"1h\", \"1d\")"
            )
        };
        let digits = text.bytes().take_while(u8::is_ascii_digit).count();
        let (number, unit) = text.split_at(digits);
        if unit == "mo" {
            return Err(format!(
                "{text:?}: calendar months are not supported yet; use days (\"30d\")"
            ));
        }
        let (_, scale) = UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .ok_or_else(usage)?;
        let count: u64 = number.parse().map_err(|_| usage())?;
        let secs = count
            .checked_mul(*scale)
            .ok_or_else(|| format!("{text:?} is too long"))?;
        Period::from_secs(secs).ok_or_else(|| format!("{text:?}: a period must not be zero"))
    }
}

impl fmt::Display for Period {
    /// The longest unit that divides it: 60 seconds is `1m`, 90 is `90s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
                f.write_str("a period such as \"30s\", \"1m\", \"1h\" or \"1d\"")
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
            .pattern(Some("^[1-9][0-9]*(s|m|h|d)$"))
            .description(Some(
                "A whole number and a unit: s, m, h or d (\"30s\", \"1m\", \"1h\", \"1d\").",
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
    /// window's start and forgotten at its end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Period>)]
    pub window: Option<Period>,
    /// A bucket that refills from empty to full in this long, continuously.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Period>)]
    pub refill: Option<Period>,
    /// Requests admitted per window (or held by the bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub requests: Option<u64>,
    /// Tokens admitted per window (or held by the bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub tokens: Option<u64>,
    /// Dollars per window. Not supported yet: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_usd: Option<f64>,
    /// Counts only requests for models matching this glob. Not supported
    /// yet: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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

/// An agent's limits, checked: what the core can enforce.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    specs: Arc<[LimitSpec]>,
    enforced: Enforced,
}

/// The one limit the core enforces, as read from its [`LimitSpec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Enforced {
    refills: bool,
    period: Period,
    tokens: u64,
    calls: u64,
}

/// One limit as the core enforces it: a fixed window, or a bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoreLimit {
    /// A fixed window ([`BudgetManager::set_budget`]).
    Window(BudgetLimit),
    /// A bucket ([`BudgetManager::set_refill`]).
    Refill(RefillLimit),
}

impl CoreLimit {
    /// Sets it in `budgets`: the agent keeps what it used in its window.
    pub fn apply(&self, budgets: &BudgetManager) {
        match self {
            CoreLimit::Window(limit) => budgets.set_budget(limit.clone()),
            CoreLimit::Refill(limit) => budgets.set_refill(limit.clone()),
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
                "the agent has no limits: give `limits` (a list with one limit), or \
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
                "a window must be at least one second",
            )
        })?;
        Self::from_list(&[LimitSpec {
            window: Some(window),
            requests: Some(calls),
            tokens: Some(tokens),
            ..LimitSpec::default()
        }])
    }

    /// Checks a list of limits.
    fn from_list(list: &[LimitSpec]) -> Result<Limits, LimitError> {
        if list.is_empty() {
            return Err(error(
                "limits".to_owned(),
                "the list is empty: give one limit",
            ));
        }
        let mut checked = Vec::with_capacity(list.len());
        for (i, spec) in list.iter().enumerate() {
            checked.push(
                spec.check()
                    .map_err(|(field, message)| error(format!("limits[{i}].{field}"), message))?,
            );
        }
        if list.len() > 1 {
            return Err(error(
                "limits[1]".to_owned(),
                "several limits per agent are not supported yet: give exactly one",
            ));
        }
        Ok(Limits {
            specs: list.into(),
            enforced: checked[0],
        })
    }

    /// The limits, as given (a legacy agent's as one [`LimitSpec`]).
    pub fn specs(&self) -> &[LimitSpec] {
        &self.specs
    }

    /// What the core enforces for `agent_id`.
    pub fn core(&self, agent_id: AgentId) -> CoreLimit {
        let Enforced {
            refills,
            period,
            tokens: token_budget,
            calls: calls_budget,
        } = self.enforced;
        if refills {
            CoreLimit::Refill(RefillLimit {
                agent_id,
                token_budget,
                calls_budget,
                refill_period: Duration::from_secs(period.secs()),
            })
        } else {
            CoreLimit::Window(BudgetLimit {
                agent_id,
                token_budget,
                calls_budget,
                window_secs: period.secs(),
            })
        }
    }

    /// The fixed window a fleet shares through Redis, or why these limits
    /// cannot be shared (a bucket).
    pub fn fleet_window(&self, agent_id: AgentId) -> Result<BudgetLimit, LimitError> {
        match self.core(agent_id) {
            CoreLimit::Window(limit) => Ok(limit),
            CoreLimit::Refill(_) => Err(error(
                "limits[0].refill".to_owned(),
                "budgets shared through Redis are fixed windows: use `window` instead of \
                 `refill`, or run without --redis",
            )),
        }
    }

    /// Where each limit stands, from the core's view of the agent; `None`
    /// (a budget not set yet: a fleet's, until Redis has it) shows nothing
    /// used.
    pub fn states(&self, info: Option<&FullBudgetInfo>) -> Vec<LimitState> {
        self.specs
            .iter()
            .map(|spec| LimitState::of(spec, info))
            .collect()
    }
}

impl LimitSpec {
    /// Checks one limit on its own, and reads what the core would enforce
    /// of it; the error names the field.
    fn check(&self) -> Result<Enforced, (&'static str, String)> {
        if self.spend_usd.is_some() {
            return Err((
                "spend_usd",
                "spend limits are not supported yet: limit `requests` and `tokens`".to_owned(),
            ));
        }
        if self.model.is_some() {
            return Err((
                "model",
                "per-model limits are not supported yet: leave out `model`".to_owned(),
            ));
        }
        let (refills, period) = match (self.window, self.refill) {
            (Some(window), None) => (false, window),
            (None, Some(refill)) => (true, refill),
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
        if self.requests.is_none() && self.tokens.is_none() {
            return Err((
                "requests",
                "a limit must limit something: give `requests`, `tokens` or both".to_owned(),
            ));
        }
        // A resource the limit leaves out is not limited by it.
        Ok(Enforced {
            refills,
            period,
            tokens: self.tokens.unwrap_or(u64::MAX),
            calls: self.requests.unwrap_or(u64::MAX),
        })
    }
}

/// Amounts of each resource a limit counts; a resource it does not limit
/// is left out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Amounts {
    /// Requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    /// Tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
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
    fn of(spec: &LimitSpec, info: Option<&FullBudgetInfo>) -> Self {
        let Some(info) = info else {
            return LimitState {
                limit: spec.clone(),
                used: Amounts {
                    requests: spec.requests.map(|_| 0),
                    tokens: spec.tokens.map(|_| 0),
                },
                remaining: Amounts {
                    requests: spec.requests,
                    tokens: spec.tokens,
                },
                resets_in_secs: 0,
                exhausted: false,
            };
        };
        let limited = |limit: Option<u64>, value: u64| limit.map(|_| value);
        LimitState {
            limit: spec.clone(),
            used: Amounts {
                requests: limited(spec.requests, info.calls_used),
                tokens: limited(spec.tokens, info.tokens_used),
            },
            remaining: Amounts {
                requests: limited(spec.requests, info.calls_remaining),
                tokens: limited(spec.tokens, info.tokens_remaining),
            },
            resets_in_secs: info.window_remaining_secs,
            exhausted: info.is_exhausted,
        }
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
        assert!(period("1mo").unwrap_err().contains("calendar months"));
        assert!(period("999999999999999999d")
            .unwrap_err()
            .contains("too long"));
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
        let e = Limits::from_fields(Some(limits.specs()), legacy).unwrap_err();
        assert!(e.message.contains("not both"), "{e}");
        let e = Limits::from_fields(None, LegacyFields::default()).unwrap_err();
        assert!(e.message.contains("no limits"), "{e}");
    }

    #[test]
    fn what_the_core_cannot_enforce_yet_is_refused_by_name() {
        for (json, field, says) in [
            ("[]", "limits", "empty"),
            (
                r#"[{"window": "1m", "requests": 1}, {"window": "1d", "tokens": 9}]"#,
                "limits[1]",
                "several limits",
            ),
            (
                r#"[{"window": "1m", "spend_usd": 5.0}]"#,
                "limits[0].spend_usd",
                "spend",
            ),
            (
                r#"[{"window": "1m", "requests": 1, "model": "gpt-4o*"}]"#,
                "limits[0].model",
                "per-model",
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
        let state = &limits.states(Some(&info))[0];
        assert_eq!(
            state.used,
            Amounts {
                requests: Some(3),
                tokens: None
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
