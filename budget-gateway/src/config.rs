//! The gateway's TOML configuration, and errors that point at the line.
//!
//! # How it works
//!
//! The file is parsed by `toml` into structs that refuse unknown fields,
//! then checked as a whole (keys unique, ids valid, budgets sensible).
//! Every error, from the parser or from a check, is reported as
//! `FILE:LINE:COLUMN: field NAME: what is wrong`: the parser's errors
//! carry the byte span of the offending value or key, the checks keep the
//! spans of the fields they look at (`toml::Spanned`), and the span is
//! turned into a line and column here. The field is named by its path
//! (`agents[2].token_budget`), found from the key on that line and the
//! `[[agents]]` tables above it.
//!
//! An agent's limit is written either with the fields `token_budget`,
//! `calls_budget` and `window_secs` (one fixed window), or as a list of
//! `[[agents.limits]]` tables (see [`crate::limits`], which the admin API
//! reads limits with too): `window = "1m"` (or `"day"`, `"1mo"`: the UTC
//! calendar's) or `refill = "1m"`, any of `requests`, `tokens` and
//! `spend_usd`, and optionally `model`, a glob; as many limits as wanted.
//! `[[models]]` tables price models for spend limits (see
//! [`crate::docs::limits`]): `name` (a glob), `input_usd_per_mtok`,
//! `output_usd_per_mtok`, optional `cached_input_usd_per_mtok`.
//!
//! ```toml
//! admin_key = "admin-secret"
//! upstream_api_key = "sk-upstream"       # optional: replaces clients' Authorization upstream
//! other_endpoints = "fixed"              # optional: POSTs to endpoints not metered from their
//! other_endpoint_tokens = 1000           #   body cost this much; "refuse" (404) is the default
//!
//! [[agents]]
//! api_key = "sk-agent-1"
//! agent_id = "7f9c24e8-3b1a-4c5d-9e2f-1a2b3c4d5e6f"
//! token_budget = 100000
//! calls_budget = 1000
//! window_secs = 60
//! metrics_label = "search-bot"           # optional: an `agent` label on the metrics
//! enforce = false                        # optional: shadow mode, nothing refused (crate::shadow)
//! parent = "5d1e7c2a-0000-4000-8000-00000000a11a"  # optional: the team's budget, below
//!
//! [[agents]]                             # a team: a budget without a key of its own
//! agent_id = "5d1e7c2a-0000-4000-8000-00000000a11a"
//! [[agents.limits]]                      # the same as token_budget, calls_budget, window_secs
//! window = "1h"                          # or refill = "1h": a bucket refilling in an hour
//! tokens = 500000
//! requests = 5000
//!
//! [[alerts]]                             # optional, any number: POSTed when any agent's usage
//! url = "http://127.0.0.1:9100/hook"     #   of a limit crosses a fraction (crate::alerts)
//! at = [0.8, 1.0]
//! headers = { "x-hook-secret" = "s3cret" }
//! ```
//!
//! # Nested budgets
//!
//! An agent with a `parent` spends from its own budget and from its
//! parent's, and from the parent's parent's, up to
//! [`MAX_LEVELS`] levels: a request is admitted
//! only if every level can take it, and charged to every level (see
//! `agent_budget::BudgetManager::set_parent`). The parent must be another
//! `[[agents]]` entry of the file. An entry may leave out `api_key`: it is
//! then a budget no client can spend directly, only through its children
//! (a team, an organisation), and it must be some agent's parent. A parent
//! that is not configured, an agent that is its own ancestor, and a chain
//! deeper than `MAX_LEVELS` are refused, with the line of the `parent`
//! that is to blame.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use agent_budget::{AgentId, MAX_LEVELS};
use agent_budget_tower::openai::pricing::{ModelPrice, PicoPerToken, PriceTable};
use agent_budget_tower::openai::{OtherRequests, PromptCount};
use agent_budget_tower::FixedCost;
use serde::Deserialize;
use toml::Spanned;

use crate::limits::{LegacyFields, LimitError, LimitSpec, Limits};

/// The gateway's configuration, checked.
#[derive(Clone, Debug)]
pub struct Config {
    /// The key of `GET /v1/budgets`.
    pub admin_key: String,
    /// Sent upstream as `Authorization: Bearer …` instead of the client's.
    pub upstream_api_key: Option<String>,
    /// Completion tokens reserved for a chat request without a maximum.
    pub default_max_tokens: u64,
    /// How long a request may wait for budget before it is refused (0:
    /// not at all).
    pub max_wait_ms: u64,
    /// Whether responses carry the IETF `RateLimit` fields too.
    pub ietf_headers: bool,
    /// The prompt's token counter: `o200k_base`, `cl100k_base` or `bytes`.
    pub tokenizer: Tokenizer,
    /// When prompts are counted with the tokenizer: `when_tight` (the
    /// default: one token per byte is reserved while the budget has room
    /// for it) or `always`.
    pub count_prompts: PromptCount,
    /// Seconds between two saves of the state (with `--state`).
    pub persist_interval_secs: u64,
    /// What a write to any other endpoint than chat completions,
    /// completions, responses and embeddings does: refused (the default),
    /// or admitted at a fixed cost.
    pub other_endpoints: OtherRequests,
    /// The prices of models (`[[models]]`), for spend limits.
    pub prices: PriceTable,
    /// The agents.
    pub agents: Vec<Agent>,
    /// Where to POST an alert when an agent's usage crosses a fraction of
    /// a limit (`[[alerts]]`, see [`crate::alerts`]).
    pub alerts: Vec<AlertTarget>,
}

/// One `[[alerts]]` entry: an HTTP endpoint told when any agent's usage
/// of a limit crosses one of the fractions `at`.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertTarget {
    /// `http://host:port/path`.
    pub url: http::Uri,
    /// The fractions of a limit to alert at (`0.8` is 80%), ascending.
    pub at: Vec<f64>,
    /// Headers sent with every alert (a shared secret, say).
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// `other_endpoints` in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OtherEndpoints {
    /// `404`, nothing forwarded.
    Refuse,
    /// `other_endpoint_tokens` and one call, settled from the response's
    /// `usage` if it has one.
    Fixed,
}

/// `count_prompts` in the file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum CountPrompts {
    #[default]
    WhenTight,
    Always,
}

/// Which token counter estimates prompts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tokenizer {
    /// GPT-4o's and later models' encoding.
    O200kBase,
    /// GPT-4's and GPT-3.5's encoding.
    Cl100kBase,
    /// One token per byte: an upper bound for any byte-level BPE.
    Bytes,
}

/// One agent: its key, id and budget.
#[derive(Clone, Debug, PartialEq)]
pub struct Agent {
    /// The key clients send as `Authorization: Bearer …`; `None` for a
    /// budget that only its children spend (a team's).
    pub api_key: Option<String>,
    /// Its id.
    pub agent_id: AgentId,
    /// Its limits.
    pub limits: Limits,
    /// Its own `agent` label on the metrics, if the operator wants one.
    pub metrics_label: Option<String>,
    /// The agent whose budget it also spends from, if any.
    pub parent: Option<AgentId>,
    /// `false` for shadow mode: nothing is refused for its own budget,
    /// usage is counted, and what would have been refused is counted (see
    /// [`crate::shadow`]).
    pub enforce: bool,
}

impl Config {
    /// The map of API keys to agents.
    pub fn keys(&self) -> HashMap<String, AgentId> {
        self.agents
            .iter()
            .filter_map(|a| Some((a.api_key.clone()?, a.agent_id)))
            .collect()
    }

    /// Each agent that has a parent, and its parent.
    pub fn parents(&self) -> HashMap<AgentId, AgentId> {
        self.agents
            .iter()
            .filter_map(|a| Some((a.agent_id, a.parent?)))
            .collect()
    }

    /// The agents that asked for a metrics label of their own.
    pub fn metrics_labels(&self) -> HashMap<AgentId, String> {
        self.agents
            .iter()
            .filter_map(|a| Some((a.agent_id, a.metrics_label.clone()?)))
            .collect()
    }

    /// The settings that differ in `new` and that only a restart applies
    /// (they are built into the proxy and the layer), by name.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<String> {
        let mut changed = Vec::new();
        let mut compare = |name: &str, differs: bool| {
            if differs {
                changed.push(name.to_owned());
            }
        };
        compare(
            "upstream_api_key",
            self.upstream_api_key != new.upstream_api_key,
        );
        compare(
            "default_max_tokens",
            self.default_max_tokens != new.default_max_tokens,
        );
        compare("max_wait_ms", self.max_wait_ms != new.max_wait_ms);
        compare("ietf_headers", self.ietf_headers != new.ietf_headers);
        compare("tokenizer", self.tokenizer != new.tokenizer);
        compare(
            "persist_interval_secs",
            self.persist_interval_secs != new.persist_interval_secs,
        );
        compare(
            "other_endpoints",
            self.other_endpoints != new.other_endpoints,
        );
        compare("alerts", self.alerts != new.alerts);
        changed
    }
}

/// A configuration that cannot be used: where, which field, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the configuration: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid configuration.
    #[error("{}:{line}:{column}: {}{message}", path.display(), field.as_ref().map(|f| format!("field `{f}`: ")).unwrap_or_default())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The line (from 1).
        line: usize,
        /// The column (from 1).
        column: usize,
        /// The field, as a path (`agents[0].api_key`), when one is to blame.
        field: Option<String>,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    admin_key: Spanned<String>,
    #[serde(default)]
    upstream_api_key: Option<Spanned<String>>,
    #[serde(default = "default_max_tokens")]
    default_max_tokens: u64,
    #[serde(default)]
    max_wait_ms: u64,
    #[serde(default)]
    ietf_headers: bool,
    #[serde(default = "default_tokenizer")]
    tokenizer: Tokenizer,
    #[serde(default)]
    count_prompts: CountPrompts,
    #[serde(default = "default_persist_interval")]
    persist_interval_secs: Spanned<u64>,
    #[serde(default)]
    other_endpoints: Option<Spanned<OtherEndpoints>>,
    #[serde(default)]
    other_endpoint_tokens: Option<Spanned<u64>>,
    #[serde(default)]
    models: Vec<Spanned<RawModel>>,
    #[serde(default)]
    agents: Vec<Spanned<RawAgent>>,
    #[serde(default)]
    alerts: Vec<Spanned<RawAlert>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlert {
    url: Spanned<String>,
    at: Spanned<Vec<f64>>,
    #[serde(default)]
    headers: Option<Spanned<std::collections::BTreeMap<String, String>>>,
}

/// A `[[models]]` entry: prices in dollars per million tokens.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: Spanned<String>,
    input_usd_per_mtok: Spanned<f64>,
    output_usd_per_mtok: Spanned<f64>,
    #[serde(default)]
    cached_input_usd_per_mtok: Option<Spanned<f64>>,
}

fn default_max_tokens() -> u64 {
    4_096
}

fn default_tokenizer() -> Tokenizer {
    Tokenizer::O200kBase
}

fn default_persist_interval() -> Spanned<u64> {
    Spanned::new(0..0, 10)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    #[serde(default)]
    api_key: Option<Spanned<String>>,
    agent_id: Spanned<String>,
    #[serde(default)]
    token_budget: Option<Spanned<u64>>,
    #[serde(default)]
    calls_budget: Option<Spanned<u64>>,
    #[serde(default)]
    window_secs: Option<Spanned<u64>>,
    #[serde(default)]
    limits: Option<Vec<Spanned<LimitSpec>>>,
    #[serde(default)]
    metrics_label: Option<String>,
    #[serde(default)]
    parent: Option<Spanned<String>>,
    #[serde(default)]
    enforce: Option<bool>,
}

/// Reads and checks the configuration in `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Parses and checks `text`, the contents of `path`.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let invalid = |span: Option<Range<usize>>, message: String| {
        let at = span.map_or(0, |s| s.start).min(text.len());
        let (line, column) = line_column(text, at);
        ConfigError::Invalid {
            path: path.to_owned(),
            line,
            column,
            field: field_at(text, at),
            message,
        }
    };
    let raw: RawConfig =
        toml::from_str(text).map_err(|e| invalid(e.span(), e.message().trim().to_owned()))?;
    let nonblank = |s: &Spanned<String>, what: &str| {
        if s.get_ref().trim().is_empty() {
            Err(invalid(Some(s.span()), format!("{what} must not be empty")))
        } else {
            Ok(s.get_ref().clone())
        }
    };
    // A key a client can never send as `Authorization: Bearer KEY` (see
    // `bearer_key`: the header's value is trimmed, and must be visible
    // ASCII, spaces and tabs) would lock its agent out without a word.
    let sendable = |s: &Spanned<String>, what: &str| {
        let key = nonblank(s, what)?;
        let why = if key.trim() != key {
            Some("has spaces at an end, which a header's value loses")
        } else if !key.is_ascii() {
            Some("has non-ASCII characters, which a bearer key cannot carry")
        } else if key.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            Some("has control characters, which a header's value cannot carry")
        } else {
            None
        };
        match why {
            Some(why) => Err(invalid(
                Some(s.span()),
                format!("{what} {why}: no client could ever send it"),
            )),
            None => Ok(key),
        }
    };
    let admin_key = sendable(&raw.admin_key, "the admin key")?;
    let upstream_api_key = raw
        .upstream_api_key
        .as_ref()
        .map(|k| nonblank(k, "the upstream API key"))
        .transpose()?;
    if *raw.persist_interval_secs.get_ref() == 0 {
        return Err(invalid(
            Some(raw.persist_interval_secs.span()),
            "must be at least 1".to_owned(),
        ));
    }
    let other_endpoints = other_endpoints(&raw, &invalid)?;
    let prices = prices(&raw.models, &invalid)?;
    let mut keys = HashMap::new();
    let mut ids = HashMap::new();
    let mut agents = Vec::with_capacity(raw.agents.len());
    for (i, spanned) in raw.agents.iter().enumerate() {
        let a = spanned.get_ref();
        let api_key = match &a.api_key {
            None => None,
            Some(spanned) => {
                let api_key = sendable(spanned, "an API key")?;
                if api_key == admin_key {
                    return Err(invalid(
                        Some(spanned.span()),
                        "an agent's API key must not be the admin key".to_owned(),
                    ));
                }
                if keys.insert(api_key.clone(), ()).is_some() {
                    return Err(invalid(
                        Some(spanned.span()),
                        "this API key is given to another agent already".to_owned(),
                    ));
                }
                Some(api_key)
            }
        };
        let agent_id = AgentId::try_parse(a.agent_id.get_ref().trim()).map_err(|e| {
            invalid(
                Some(a.agent_id.span()),
                format!("not a UUID ({e}): {:?}", a.agent_id.get_ref()),
            )
        })?;
        if ids.insert(agent_id, ()).is_some() {
            return Err(invalid(
                Some(a.agent_id.span()),
                "this agent id is configured twice".to_owned(),
            ));
        }
        let limits = agent_limits(text, spanned).map_err(|(span, e)| {
            let mut error = invalid(Some(span), e.message);
            // Named even where the span is a table's header, which has no
            // `key =` to name it by.
            if let (ConfigError::Invalid { field, .. }, Some(name)) = (&mut error, e.field) {
                *field = Some(format!("agents[{i}].{name}"));
            }
            error
        })?;
        agents.push(Agent {
            api_key,
            agent_id,
            limits,
            metrics_label: a.metrics_label.clone(),
            parent: None,
            enforce: a.enforce.unwrap_or(true),
        });
    }
    let raw_agents: Vec<&RawAgent> = raw.agents.iter().map(Spanned::get_ref).collect();
    link_parents(&raw_agents, &mut agents, &invalid)?;
    let alerts = raw
        .alerts
        .iter()
        .map(|a| alert_target(a.get_ref(), &invalid))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Config {
        admin_key,
        upstream_api_key,
        default_max_tokens: raw.default_max_tokens,
        max_wait_ms: raw.max_wait_ms,
        ietf_headers: raw.ietf_headers,
        tokenizer: raw.tokenizer,
        count_prompts: match raw.count_prompts {
            CountPrompts::WhenTight => PromptCount::WhenTight,
            CountPrompts::Always => PromptCount::Always,
        },
        persist_interval_secs: *raw.persist_interval_secs.get_ref(),
        other_endpoints,
        prices,
        agents,
        alerts,
    })
}

/// The `[[models]]` price table: each name a glob that is not blank and
/// not given twice, each price a number of dollars per million tokens
/// that is not negative.
fn prices(
    models: &[Spanned<RawModel>],
    invalid: &dyn Fn(Option<Range<usize>>, String) -> ConfigError,
) -> Result<PriceTable, ConfigError> {
    let mut table = Vec::with_capacity(models.len());
    for spanned in models {
        let m = spanned.get_ref();
        let name = m.name.get_ref();
        if name.trim().is_empty() || name.chars().any(char::is_control) {
            return Err(invalid(
                Some(m.name.span()),
                "a model's name must be a glob such as \"gpt-4o*\" (or \"*\" for every \
                 model): not blank, no control characters"
                    .to_owned(),
            ));
        }
        if table.iter().any(|p: &ModelPrice| p.name == *name) {
            return Err(invalid(
                Some(m.name.span()),
                format!("{name:?} is priced twice: give each name once"),
            ));
        }
        let price = |usd: &Spanned<f64>| {
            PicoPerToken::from_usd_per_mtok(*usd.get_ref()).ok_or_else(|| {
                invalid(
                    Some(usd.span()),
                    format!(
                        "{} is not a price: give dollars per million tokens, from 0 up",
                        usd.get_ref()
                    ),
                )
            })
        };
        table.push(ModelPrice {
            name: name.clone(),
            input: price(&m.input_usd_per_mtok)?,
            output: price(&m.output_usd_per_mtok)?,
            cached_input: m
                .cached_input_usd_per_mtok
                .as_ref()
                .map(price)
                .transpose()?,
        });
    }
    Ok(PriceTable::new(table))
}

/// The largest fraction an alert may be set at: ten times the limit (an
/// agent in shadow mode may go past its limit).
const MAX_ALERT_FRACTION: f64 = 10.0;

/// One `[[alerts]]` entry, checked.
fn alert_target(
    raw: &RawAlert,
    invalid: &dyn Fn(Option<Range<usize>>, String) -> ConfigError,
) -> Result<AlertTarget, ConfigError> {
    let url: http::Uri = raw.url.get_ref().parse().map_err(|e| {
        invalid(
            Some(raw.url.span()),
            format!("not a URL ({e}): {:?}", raw.url.get_ref()),
        )
    })?;
    if url.scheme_str() != Some("http") || url.authority().is_none() {
        return Err(invalid(
            Some(raw.url.span()),
            "an alert URL must be http://host[:port]/path (https is not supported: \
             send to a relay on a trusted network)"
                .to_owned(),
        ));
    }
    let mut at = raw.at.get_ref().clone();
    if at.is_empty() {
        return Err(invalid(
            Some(raw.at.span()),
            "give at least one fraction, e.g. `at = [0.8, 1.0]`".to_owned(),
        ));
    }
    if let Some(bad) = at
        .iter()
        .find(|f| !(f.is_finite() && **f > 0.0 && **f <= MAX_ALERT_FRACTION))
    {
        return Err(invalid(
            Some(raw.at.span()),
            format!(
                "{bad} is not a fraction of a limit: give numbers above 0 and at most \
                 {MAX_ALERT_FRACTION} (0.8 is 80%, 1.0 the whole limit)"
            ),
        ));
    }
    at.sort_by(f64::total_cmp);
    at.dedup();
    let mut headers = Vec::new();
    if let Some(raw_headers) = &raw.headers {
        for (name, value) in raw_headers.get_ref() {
            let bad =
                |what: &str| invalid(Some(raw_headers.span()), format!("header {name:?}: {what}"));
            let name = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| bad("not a valid header name"))?;
            let value =
                http::HeaderValue::from_str(value).map_err(|_| bad("not a valid header value"))?;
            headers.push((name, value));
        }
    }
    Ok(AlertTarget { url, at, headers })
}

/// `other_endpoints` and `other_endpoint_tokens`, which go together: a
/// fixed cost must be given, and a cost without `"fixed"` would be
/// ignored, which is refused rather than left to surprise.
fn other_endpoints(
    raw: &RawConfig,
    invalid: &dyn Fn(Option<Range<usize>>, String) -> ConfigError,
) -> Result<OtherRequests, ConfigError> {
    let policy = raw.other_endpoints.as_ref();
    match (policy.map(|p| *p.get_ref()), &raw.other_endpoint_tokens) {
        (None | Some(OtherEndpoints::Refuse), None) => Ok(OtherRequests::Refuse),
        (Some(OtherEndpoints::Fixed), Some(tokens)) => Ok(OtherRequests::Fixed(FixedCost {
            tokens: *tokens.get_ref(),
            calls: 1,
        })),
        (Some(OtherEndpoints::Fixed), None) => Err(invalid(
            policy.map(Spanned::span),
            "`other_endpoints = \"fixed\"` needs `other_endpoint_tokens`, the tokens reserved \
             for each such request"
                .to_owned(),
        )),
        (_, Some(tokens)) => Err(invalid(
            Some(tokens.span()),
            "applies only with `other_endpoints = \"fixed\"` (other endpoints are refused \
             without it)"
                .to_owned(),
        )),
    }
}

/// Reads each agent's `parent` and checks the links as a whole: every
/// parent configured, no agent its own ancestor, no chain deeper than
/// [`MAX_LEVELS`], and every agent without a key some agent's parent.
/// `agents[i]` is `raw[i]`, checked; `invalid` makes an error at a span.
fn link_parents(
    raw: &[&RawAgent],
    agents: &mut [Agent],
    invalid: &dyn Fn(Option<Range<usize>>, String) -> ConfigError,
) -> Result<(), ConfigError> {
    let index: HashMap<AgentId, usize> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| (a.agent_id, i))
        .collect();
    let mut parent_of = vec![None; agents.len()];
    for (i, a) in raw.iter().enumerate() {
        let Some(parent) = &a.parent else { continue };
        let id = agents[i].agent_id;
        let parent_id = AgentId::try_parse(parent.get_ref().trim()).map_err(|e| {
            invalid(
                Some(parent.span()),
                format!("not a UUID ({e}): {:?}", parent.get_ref()),
            )
        })?;
        if parent_id == id {
            return Err(invalid(
                Some(parent.span()),
                format!("agent {id} cannot be its own parent"),
            ));
        }
        let Some(&p) = index.get(&parent_id) else {
            return Err(invalid(
                Some(parent.span()),
                format!(
                    "agent {id}'s parent {parent_id} is not configured: a parent must have an \
                     [[agents]] entry of its own (it may leave out `api_key`)"
                ),
            ));
        };
        parent_of[i] = Some(p);
        agents[i].parent = Some(parent_id);
    }
    // Walk up from each agent: a walk longer than there are agents loops.
    for (i, a) in raw.iter().enumerate() {
        let Some(parent) = &a.parent else { continue };
        let mut chain = vec![i];
        let mut at = i;
        while let Some(p) = parent_of[at] {
            if p == i {
                let names: Vec<String> = chain
                    .iter()
                    .chain(std::iter::once(&i))
                    .map(|&k| agents[k].agent_id.to_string())
                    .collect();
                return Err(invalid(
                    Some(parent.span()),
                    format!(
                        "agent {}'s parents loop back to it: {}",
                        agents[i].agent_id,
                        names.join(" -> ")
                    ),
                ));
            }
            if chain.len() > agents.len() {
                // A loop above this agent, not through it: reported from
                // an agent on it.
                break;
            }
            chain.push(p);
            at = p;
        }
        if chain.len() > MAX_LEVELS && chain.len() <= agents.len() {
            return Err(invalid(
                Some(parent.span()),
                format!(
                    "agent {}'s chain of budgets has {} levels (itself and its ancestors); \
                     at most {MAX_LEVELS} are allowed",
                    agents[i].agent_id,
                    chain.len()
                ),
            ));
        }
    }
    for (i, a) in raw.iter().enumerate() {
        if a.api_key.is_none() && !parent_of.contains(&Some(i)) {
            return Err(invalid(
                Some(a.agent_id.span()),
                format!(
                    "agent {} has no api_key and is no agent's parent: nothing could spend \
                     its budget (give it a key, or make it some agent's parent)",
                    agents[i].agent_id
                ),
            ));
        }
    }
    Ok(())
}

/// The agent's limits, from `[[agents.limits]]` or the older fields; an
/// error comes with the span of the field to blame.
fn agent_limits(
    text: &str,
    agent: &Spanned<RawAgent>,
) -> Result<Limits, (Range<usize>, LimitError)> {
    let a = agent.get_ref();
    let legacy = LegacyFields {
        token_budget: a.token_budget.as_ref().map(|v| *v.get_ref()),
        calls_budget: a.calls_budget.as_ref().map(|v| *v.get_ref()),
        window_secs: a.window_secs.as_ref().map(|v| *v.get_ref()),
    };
    let specs: Option<Vec<LimitSpec>> = a
        .limits
        .as_ref()
        .map(|list| list.iter().map(|s| s.get_ref().clone()).collect());
    Limits::from_fields(specs.as_deref(), legacy).map_err(|e| {
        let span = match e.field.as_deref() {
            Some("token_budget") => a.token_budget.as_ref().map(Spanned::span),
            Some("calls_budget") => a.calls_budget.as_ref().map(Spanned::span),
            Some("window_secs") => a.window_secs.as_ref().map(Spanned::span),
            Some(field) => limit_span(text, a.limits.as_deref().unwrap_or_default(), field),
            None => None,
        };
        (span.unwrap_or_else(|| agent.span()), e)
    })
}

/// The span of `limits[I]` or of the value of `limits[I].KEY`, found in
/// the text of the I-th limit's table.
fn limit_span(text: &str, limits: &[Spanned<LimitSpec>], field: &str) -> Option<Range<usize>> {
    let rest = field.strip_prefix("limits[")?;
    let (index, rest) = rest.split_once(']')?;
    let mut table = limits.get(index.parse::<usize>().ok()?)?.span();
    let Some(key) = rest.strip_prefix('.') else {
        return Some(table);
    };
    if text.get(table.clone())?.starts_with("[[") {
        // A `[[agents.limits]]` table's span is its header: its keys are
        // on the lines up to the next header.
        let after = &text[table.end..];
        let next = after
            .match_indices('\n')
            .map(|(i, _)| i + 1)
            .find(|&i| after[i..].trim_start().starts_with('['))
            .unwrap_or(after.len());
        table.end += next;
    }
    let body = text.get(table.clone())?;
    let mut from = 0;
    while let Some(found) = body[from..].find(key) {
        let start = from + found;
        let before = body[..start].chars().next_back();
        let after = body[start + key.len()..].trim_start();
        if before.is_none_or(|c| c.is_whitespace() || c == '{' || c == ',')
            && after.starts_with('=')
        {
            let value = after[1..].trim_start();
            let at = table.start + body.len() - value.len();
            return Some(at..at);
        }
        from = start + key.len();
    }
    Some(table)
}

/// The 1-based line and column of byte `at` in `text`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..at];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

/// The path of the field whose `key = value` line holds byte `at`:
/// `admin_key`, or `agents[N].key` under the N-th `[[agents]]` table.
fn field_at(text: &str, at: usize) -> Option<String> {
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('#') || key.starts_with('[') {
        return None;
    }
    let tables = text[..line_start]
        .lines()
        .filter(|l| l.trim_start().starts_with('['))
        .collect::<Vec<_>>();
    let agent_index = || {
        tables
            .iter()
            .filter(|l| l.trim().starts_with("[[agents]]"))
            .count()
            .checked_sub(1)
    };
    match tables.last().map(|l| l.trim()) {
        Some(table) if table.starts_with("[[agents]]") => {
            Some(format!("agents[{}].{key}", agent_index()?))
        }
        Some(table) if table.starts_with("[[agents.limits]]") => {
            let limit_index = tables
                .iter()
                .rev()
                .take_while(|l| !l.trim().starts_with("[[agents]]"))
                .count()
                - 1;
            Some(format!(
                "agents[{}].limits[{limit_index}].{key}",
                agent_index()?
            ))
        }
        Some(table) if table.starts_with("[[models]]") => {
            let index = tables
                .iter()
                .filter(|l| l.trim().starts_with("[[models]]"))
                .count()
                - 1;
            Some(format!("models[{index}].{key}"))
        }
        Some(table) => Some(format!("{}.{key}", table.trim_matches(['[', ']']))),
        None => Some(key.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID1: &str = "7f9c24e8-3b1a-4c5d-9e2f-1a2b3c4d5e6f";
    const ID2: &str = "0b3c9a30-4f2e-4b8a-9d41-6c0e2f7a1b55";

    fn good() -> String {
        format!(
            r#"admin_key = "admin"
upstream_api_key = "sk-up"

[[agents]]
api_key = "sk-1"
agent_id = "{ID1}"
token_budget = 1000
calls_budget = 10
window_secs = 60

[[agents]]
api_key = "sk-2"
agent_id = "{ID2}"
token_budget = 500
calls_budget = 5
window_secs = 30
metrics_label = "two"
"#
        )
    }

    fn error(text: &str) -> String {
        parse(Path::new("gw.toml"), text).unwrap_err().to_string()
    }

    #[test]
    fn a_good_config_parses() {
        let c = parse(Path::new("gw.toml"), &good()).unwrap();
        assert_eq!(c.admin_key, "admin");
        assert_eq!(c.upstream_api_key.as_deref(), Some("sk-up"));
        assert_eq!(c.agents.len(), 2);
        assert_eq!(c.agents[1].limits.specs()[0].tokens, Some(500));
        assert_eq!(c.agents[1].agent_id.to_string(), ID2);
        assert_eq!(c.keys()["sk-1"].to_string(), ID1);
        assert_eq!(c.metrics_labels().len(), 1);
        assert_eq!(c.tokenizer, Tokenizer::O200kBase);
        assert_eq!(c.count_prompts, PromptCount::WhenTight);
        assert_eq!((c.default_max_tokens, c.max_wait_ms), (4_096, 0));
    }

    #[test]
    fn prompts_are_counted_when_tight_unless_always() {
        let with =
            |line: &str| good().replace("upstream_api_key", &format!("{line}\nupstream_api_key"));
        let c = parse(Path::new("gw.toml"), &with("count_prompts = \"always\"")).unwrap();
        assert_eq!(c.count_prompts, PromptCount::Always);
        let c = parse(
            Path::new("gw.toml"),
            &with("count_prompts = \"when_tight\""),
        )
        .unwrap();
        assert_eq!(c.count_prompts, PromptCount::WhenTight);
        let e = error(&with("count_prompts = \"never\""));
        assert!(e.contains("count_prompts"), "{e}");
    }

    #[test]
    fn other_endpoints_are_refused_unless_given_a_fixed_cost() {
        let c = parse(Path::new("gw.toml"), &good()).unwrap();
        assert_eq!(c.other_endpoints, OtherRequests::Refuse);
        let with =
            |lines: &str| good().replace("upstream_api_key", &format!("{lines}\nupstream_api_key"));
        let c = parse(Path::new("gw.toml"), &with("other_endpoints = \"refuse\"")).unwrap();
        assert_eq!(c.other_endpoints, OtherRequests::Refuse);
        let c = parse(
            Path::new("gw.toml"),
            &with("other_endpoints = \"fixed\"\nother_endpoint_tokens = 500"),
        )
        .unwrap();
        assert_eq!(
            c.other_endpoints,
            OtherRequests::Fixed(FixedCost {
                tokens: 500,
                calls: 1
            })
        );
        let e = error(&with("other_endpoints = \"fixed\""));
        assert!(
            e.starts_with(
                "gw.toml:2:19: field `other_endpoints`: `other_endpoints = \"fixed\"` needs"
            ),
            "{e}"
        );
        let e = error(&with("other_endpoint_tokens = 5"));
        assert!(
            e.starts_with("gw.toml:2:25: field `other_endpoint_tokens`: applies only with"),
            "{e}"
        );
        let e = error(&with("other_endpoints = \"free\""));
        assert!(
            e.starts_with("gw.toml:2:19: field `other_endpoints`: unknown variant `free`"),
            "{e}"
        );
    }

    #[test]
    fn a_wrong_type_names_file_line_and_field() {
        let text = good().replace("token_budget = 500", "token_budget = \"lots\"");
        let e = error(&text);
        assert!(
            e.starts_with("gw.toml:14:16: field `agents[1].token_budget`: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn a_negative_budget_is_refused() {
        let e = error(&good().replace("calls_budget = 10", "calls_budget = -10"));
        assert!(
            e.starts_with("gw.toml:8:16: field `agents[0].calls_budget`"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_field_is_named() {
        let e = error(&good().replace("window_secs = 60", "window_secs = 60\ntoken_limit = 5"));
        assert!(
            e.starts_with("gw.toml:10:1: field `agents[0].token_limit`: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_field_is_named_in_the_message() {
        let e = error(&good().replace("calls_budget = 5\n", ""));
        // toml points at the table that lacks it.
        assert!(e.starts_with("gw.toml:11:"), "{e}");
        assert!(e.ends_with("missing field `calls_budget`"), "{e}");
        let e = error("");
        assert_eq!(e, "gw.toml:1:1: missing field `admin_key`");
    }

    #[test]
    fn a_bad_uuid_is_refused_at_its_line() {
        let e = error(&good().replace(ID2, "not-a-uuid"));
        assert!(
            e.starts_with("gw.toml:13:12: field `agents[1].agent_id`: not a UUID"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_keys_and_ids_are_refused() {
        let e = error(&good().replace("sk-2", "sk-1"));
        assert!(
            e.starts_with("gw.toml:12:11: field `agents[1].api_key`"),
            "{e}"
        );
        assert!(e.contains("another agent"), "{e}");
        let e = error(&good().replace(ID2, ID1));
        assert!(
            e.starts_with("gw.toml:13:12: field `agents[1].agent_id`"),
            "{e}"
        );
        let e = error(&good().replace("\"sk-2\"", "\"admin\""));
        assert!(e.contains("admin key"), "{e}");
    }

    #[test]
    fn empty_keys_and_zero_windows_are_refused() {
        let e = error(&good().replace("\"admin\"", "\"  \""));
        assert!(e.starts_with("gw.toml:1:13: field `admin_key`"), "{e}");
        let e = error(&good().replace("window_secs = 30", "window_secs = 0"));
        assert!(
            e.starts_with("gw.toml:16:15: field `agents[1].window_secs`"),
            "{e}"
        );
    }

    #[test]
    fn syntax_errors_point_at_the_line() {
        let e = error(&good().replace("calls_budget = 5", "calls_budget = = 5"));
        assert!(e.starts_with("gw.toml:15:"), "{e}");
    }

    #[test]
    fn a_missing_file_names_the_file() {
        let e = load(Path::new("/nonexistent/gw.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/nonexistent/gw.toml: cannot read"), "{e}");
    }

    #[test]
    fn the_example_configuration_parses() {
        let example = include_str!("../gateway.example.toml");
        let c = parse(Path::new("gateway.example.toml"), example).unwrap();
        assert_eq!(c.agents.len(), 2);
        assert_eq!(c.agents[1].limits.specs()[0].requests, Some(10_000));
    }

    #[test]
    fn the_spend_example_configuration_parses() {
        let example = include_str!("../gateway.spend.example.toml");
        let c = parse(Path::new("gateway.spend.example.toml"), example).unwrap();
        assert_eq!(c.agents[0].limits.specs().len(), 4);
        assert!(c.agents[0].limits.has_spend());
        assert_eq!(
            c.prices.price_of("gpt-4o-mini").unwrap().name,
            "gpt-4o-mini*"
        );
        assert_eq!(c.prices.price_of("o3").unwrap().name, "*");
    }

    /// [`good`] with agent 1's older fields replaced by `limits`.
    fn with_limits(limits: &str) -> String {
        good()
            .replace(
                "token_budget = 500\ncalls_budget = 5\nwindow_secs = 30\n",
                "",
            )
            .replace(
                "metrics_label = \"two\"\n",
                &format!("metrics_label = \"two\"\n{limits}"),
            )
    }

    #[test]
    fn a_list_of_limits_is_read_like_the_older_fields() {
        let c = parse(
            Path::new("gw.toml"),
            &with_limits("[[agents.limits]]\nwindow = \"30s\"\nrequests = 5\ntokens = 500\n"),
        )
        .unwrap();
        let old = parse(Path::new("gw.toml"), &good()).unwrap();
        assert_eq!(c.agents[1].limits, old.agents[1].limits);
        assert_eq!(c.agents[1].metrics_label.as_deref(), Some("two"));
        let c = parse(
            Path::new("gw.toml"),
            &with_limits("limits = [{ refill = \"1m\", tokens = 600 }]\n"),
        )
        .unwrap();
        assert_eq!(
            c.agents[1].limits.core(c.agents[1].agent_id),
            crate::limits::CoreLimit::Refill(agent_budget::RefillLimit {
                agent_id: c.agents[1].agent_id,
                token_budget: 600,
                calls_budget: u64::MAX,
                refill_period: std::time::Duration::from_secs(60),
            })
        );
    }

    #[test]
    fn limits_that_cannot_be_are_refused_at_their_field() {
        let table = |body: &str| with_limits(&format!("[[agents.limits]]\n{body}"));
        let e = error(&table("window = \"1m\"\nspend_usd = -50.0\n"));
        assert!(
            e.starts_with("gw.toml:17:13: field `agents[1].limits[0].spend_usd`: -50 is not"),
            "{e}"
        );
        let e = error(&table("window = \"1 minute\"\nrequests = 5\n"));
        assert!(
            e.starts_with(
                "gw.toml:16:10: field `agents[1].limits[0].window`: \"1 minute\" is not a period"
            ),
            "{e}"
        );
        let e = error(&table("window = \"1m\"\n"));
        assert!(e.contains("field `agents[1].limits[0]"), "{e}");
        assert!(e.contains("give `requests`, `tokens`, `spend_usd`"), "{e}");
        let e = error(&table(
            "window = \"1m\"\nrequests = 5\n[[agents.limits]]\nwindow = \"60s\"\ntokens = 9\n",
        ));
        assert!(
            e.starts_with("gw.toml:20:10: field `agents[1].limits[1].tokens`: limits[0] already"),
            "{e}"
        );
        let e = error(&table("window = \"1m\"\nrequests = 5\nmodel = \"\"\n"));
        assert!(
            e.starts_with(
                "gw.toml:18:9: field `agents[1].limits[0].model`: \"\" is not a model glob"
            ),
            "{e}"
        );
        let e = error(&format!(
            "{}[[agents.limits]]\nwindow = \"1m\"\nrequests = 5\n",
            good()
        ));
        assert!(
            e.starts_with("gw.toml:14:16: field `agents[1].token_budget`: give either"),
            "{e}"
        );
        let e = error(&good().replace(
            "token_budget = 500\ncalls_budget = 5\nwindow_secs = 30\n",
            "",
        ));
        assert!(e.starts_with("gw.toml:11:1: "), "{e}");
        assert!(e.contains("the agent has no limits"), "{e}");
    }

    #[test]
    fn models_are_priced_and_bad_prices_named_at_their_line() {
        let text = |models: &str| format!("{}{models}", good());
        let c = parse(
            Path::new("gw.toml"),
            &text("\n[[models]]\nname = \"gpt-4o*\"\ninput_usd_per_mtok = 2.5\noutput_usd_per_mtok = 10.0\ncached_input_usd_per_mtok = 1.25\n[[models]]\nname = \"*\"\ninput_usd_per_mtok = 1\noutput_usd_per_mtok = 2\n"),
        )
        .unwrap();
        let gpt = c.prices.price_of("gpt-4o-mini").unwrap();
        assert_eq!(gpt.input, PicoPerToken(2_500_000));
        assert_eq!(gpt.cached_input, Some(PicoPerToken(1_250_000)));
        assert_eq!(c.prices.price_of("o3").unwrap().name, "*");
        let e = error(&text(
            "\n[[models]]\nname = \"m\"\ninput_usd_per_mtok = -1.0\noutput_usd_per_mtok = 2.0\n",
        ));
        assert!(
            e.starts_with("gw.toml:21:22: field `models[0].input_usd_per_mtok`: -1 is not a price"),
            "{e}"
        );
        let e = error(&text("\n[[models]]\nname = \"m\"\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 2.0\n[[models]]\nname = \"m\"\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 2.0\n"));
        assert!(
            e.starts_with("gw.toml:24:8: field `models[1].name`: \"m\" is priced twice"),
            "{e}"
        );
        let e = error(&text(
            "\n[[models]]\nname = \"m\"\ninput_usd_per_mtok = 1.0\n",
        ));
        assert!(e.starts_with("gw.toml:19:1: "), "{e}");
        assert!(e.contains("missing field `output_usd_per_mtok`"), "{e}");
        let e = error(&text("\n[[models]]\nname = \"m\"\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 2.0\nprice = 3\n"));
        assert!(
            e.starts_with("gw.toml:23:1: field `models[0].price`: unknown field"),
            "{e}"
        );
    }

    /// The id of agent `i` in [`chain`]'s configurations.
    fn id(i: usize) -> String {
        format!("00000000-0000-4000-8000-{i:012}")
    }

    /// Agents 0..n, each with a key, agent `i` under `parents[i]` (an index).
    fn chain(n: usize, parents: &[(usize, usize)]) -> String {
        let mut text = "admin_key = \"admin\"\n".to_owned();
        for i in 0..n {
            text += &format!(
                "\n[[agents]]\napi_key = \"sk-{i}\"\nagent_id = \"{}\"\ntoken_budget = 100\ncalls_budget = 10\nwindow_secs = 60\n",
                id(i)
            );
            if let Some((_, p)) = parents.iter().find(|(c, _)| *c == i) {
                text += &format!("parent = \"{}\"\n", id(*p));
            }
        }
        text
    }

    #[test]
    fn parents_link_agents_and_a_parent_may_have_no_key() {
        let text = format!(
            "{}\n[[agents]]\nagent_id = \"{}\"\ntoken_budget = 150\ncalls_budget = 15\nwindow_secs = 3600\n",
            chain(2, &[(0, 2), (1, 2)]),
            id(2)
        );
        let c = parse(Path::new("gw.toml"), &text).unwrap();
        assert_eq!(c.agents.len(), 3);
        assert_eq!(c.agents[2].api_key, None);
        assert_eq!(c.keys().len(), 2, "the team has no key");
        let parents = c.parents();
        assert_eq!(parents.len(), 2);
        assert_eq!(parents[&id(0).parse().unwrap()].to_string(), id(2));
        assert_eq!(parents[&id(1).parse().unwrap()].to_string(), id(2));
        // The deepest chain allowed: MAX_LEVELS levels.
        let links: Vec<_> = (0..MAX_LEVELS - 1).map(|i| (i, i + 1)).collect();
        parse(Path::new("gw.toml"), &chain(MAX_LEVELS, &links)).unwrap();
    }

    #[test]
    fn an_unknown_parent_is_refused_at_its_line_naming_the_agent() {
        let text = chain(2, &[(1, 5)]);
        let e = error(&text);
        assert!(
            e.starts_with("gw.toml:16:10: field `agents[1].parent`: "),
            "{e}"
        );
        assert!(
            e.contains(&format!(
                "agent {}'s parent {} is not configured",
                id(1),
                id(5)
            )),
            "{e}"
        );
        let e = error(&text.replace(&id(5), "team-a"));
        assert!(
            e.starts_with("gw.toml:16:10: field `agents[1].parent`: not a UUID"),
            "{e}"
        );
    }

    #[test]
    fn a_cycle_is_refused_naming_its_agents() {
        let e = error(&chain(2, &[(0, 0)]));
        assert!(
            e.starts_with("gw.toml:9:10: field `agents[0].parent`"),
            "{e}"
        );
        assert!(e.contains("cannot be its own parent"), "{e}");
        let e = error(&chain(3, &[(0, 1), (1, 2), (2, 0)]));
        assert!(
            e.starts_with("gw.toml:9:10: field `agents[0].parent`"),
            "{e}"
        );
        let want = format!("{} -> {} -> {} -> {}", id(0), id(1), id(2), id(0));
        assert!(e.contains(&want), "{e}");
        // A loop above an agent is reported at an agent on it.
        let e = error(&chain(3, &[(0, 1), (1, 2), (2, 1)]));
        assert!(
            e.starts_with("gw.toml:17:10: field `agents[1].parent`"),
            "{e}"
        );
    }

    #[test]
    fn a_chain_deeper_than_the_core_allows_is_refused() {
        let n = MAX_LEVELS + 1;
        let links: Vec<_> = (0..n - 1).map(|i| (i, i + 1)).collect();
        let e = error(&chain(n, &links));
        assert!(
            e.starts_with("gw.toml:9:10: field `agents[0].parent`"),
            "{e}"
        );
        assert!(
            e.contains(&format!(
                "agent {}'s chain of budgets has 9 levels (itself and its ancestors); at most 8 are allowed",
                id(0)
            )),
            "{e}"
        );
    }

    #[test]
    fn an_agent_without_a_key_must_be_a_parent() {
        let e = error(&chain(2, &[]).replace("api_key = \"sk-1\"\n", ""));
        assert!(
            e.starts_with("gw.toml:11:12: field `agents[1].agent_id`"),
            "{e}"
        );
        assert!(
            e.contains(&format!(
                "agent {} has no api_key and is no agent's parent",
                id(1)
            )),
            "{e}"
        );
    }
}
