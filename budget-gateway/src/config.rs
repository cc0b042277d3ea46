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
//! ```toml
//! admin_key = "admin-secret"
//! upstream_api_key = "sk-upstream"       # optional: replaces clients' Authorization upstream
//!
//! [[agents]]
//! api_key = "sk-agent-1"
//! agent_id = "7f9c24e8-3b1a-4c5d-9e2f-1a2b3c4d5e6f"
//! token_budget = 100000
//! calls_budget = 1000
//! window_secs = 60
//! metrics_label = "search-bot"           # optional: an `agent` label on the metrics
//! ```

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use agent_budget::{AgentId, BudgetLimit};
use serde::Deserialize;
use toml::Spanned;

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
    /// Seconds between two saves of the state (with `--state`).
    pub persist_interval_secs: u64,
    /// The agents.
    pub agents: Vec<Agent>,
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agent {
    /// The key clients send as `Authorization: Bearer …`.
    pub api_key: String,
    /// Its budget.
    pub limit: BudgetLimit,
    /// Its own `agent` label on the metrics, if the operator wants one.
    pub metrics_label: Option<String>,
}

impl Config {
    /// The map of API keys to agents.
    pub fn keys(&self) -> HashMap<String, AgentId> {
        self.agents
            .iter()
            .map(|a| (a.api_key.clone(), a.limit.agent_id))
            .collect()
    }

    /// The agents that asked for a metrics label of their own.
    pub fn metrics_labels(&self) -> HashMap<AgentId, String> {
        self.agents
            .iter()
            .filter_map(|a| Some((a.limit.agent_id, a.metrics_label.clone()?)))
            .collect()
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
    #[serde(default = "default_persist_interval")]
    persist_interval_secs: Spanned<u64>,
    #[serde(default)]
    agents: Vec<RawAgent>,
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
    api_key: Spanned<String>,
    agent_id: Spanned<String>,
    token_budget: u64,
    calls_budget: u64,
    window_secs: Spanned<u64>,
    #[serde(default)]
    metrics_label: Option<String>,
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
    let admin_key = nonblank(&raw.admin_key, "the admin key")?;
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
    let mut keys = HashMap::new();
    let mut ids = HashMap::new();
    let mut agents = Vec::with_capacity(raw.agents.len());
    for a in &raw.agents {
        let api_key = nonblank(&a.api_key, "an API key")?;
        if api_key == admin_key {
            return Err(invalid(
                Some(a.api_key.span()),
                "an agent's API key must not be the admin key".to_owned(),
            ));
        }
        if keys.insert(api_key.clone(), ()).is_some() {
            return Err(invalid(
                Some(a.api_key.span()),
                "this API key is given to another agent already".to_owned(),
            ));
        }
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
        if *a.window_secs.get_ref() == 0 {
            return Err(invalid(
                Some(a.window_secs.span()),
                "a window must be at least one second".to_owned(),
            ));
        }
        agents.push(Agent {
            api_key,
            limit: BudgetLimit {
                agent_id,
                token_budget: a.token_budget,
                calls_budget: a.calls_budget,
                window_secs: *a.window_secs.get_ref(),
            },
            metrics_label: a.metrics_label.clone(),
        });
    }
    Ok(Config {
        admin_key,
        upstream_api_key,
        default_max_tokens: raw.default_max_tokens,
        max_wait_ms: raw.max_wait_ms,
        ietf_headers: raw.ietf_headers,
        tokenizer: raw.tokenizer,
        persist_interval_secs: *raw.persist_interval_secs.get_ref(),
        agents,
    })
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
    match tables.last().map(|l| l.trim()) {
        Some(table) if table.starts_with("[[agents]]") => {
            let index = tables
                .iter()
                .filter(|l| l.trim().starts_with("[[agents]]"))
                .count()
                - 1;
            Some(format!("agents[{index}].{key}"))
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
        assert_eq!(c.agents[1].limit.token_budget, 500);
        assert_eq!(c.agents[1].limit.agent_id.to_string(), ID2);
        assert_eq!(c.keys()["sk-1"].to_string(), ID1);
        assert_eq!(c.metrics_labels().len(), 1);
        assert_eq!(c.tokenizer, Tokenizer::O200kBase);
        assert_eq!((c.default_max_tokens, c.max_wait_ms), (4_096, 0));
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
}
