//! Errors: a refused request, and a failed persist or restore.

use std::path::PathBuf;
use std::time::Duration;

use crate::types::{AgentId, BudgetKind};
use crate::window::{Resource, Shortfall};

/// A request was refused: the agent has no budget, or not enough left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetExceeded {
    /// The agent whose request was refused.
    pub agent_id: AgentId,
    /// Which budget refused it.
    pub kind: BudgetKind,
    /// What happened, for people: the resource, how much was asked and how
    /// much is left. This is also the error's `Display`.
    pub message: String,
    /// When the same request may succeed: the time until the current window
    /// ends. `None` when waiting cannot help: the request is larger than
    /// the limit itself, or the agent has no budget.
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for BudgetExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BudgetExceeded {}

/// Which operation was refused; the seed's operations keep their messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Operation {
    Reserve,
    TrackCall,
    Acquire,
}

impl BudgetExceeded {
    pub(crate) fn no_budget(agent_id: AgentId, operation: Operation) -> Self {
        BudgetExceeded {
            agent_id,
            kind: match operation {
                Operation::TrackCall => BudgetKind::Call,
                Operation::Reserve | Operation::Acquire => BudgetKind::Token,
            },
            message: format!("No budget configured for agent {agent_id}"),
            retry_after: None,
        }
    }

    pub(crate) fn from_shortfall(agent_id: AgentId, operation: Operation, s: Shortfall) -> Self {
        let kind = match s.resource {
            Resource::Tokens => BudgetKind::Token,
            Resource::Calls => BudgetKind::Call,
        };
        let message = match (operation, s.resource) {
            (Operation::Reserve, _) => format!(
                "Token budget exceeded: requested {} but only {} remaining",
                s.requested, s.remaining
            ),
            (Operation::TrackCall, _) => format!(
                "Call budget exceeded: {} calls used, limit is {}",
                s.used, s.limit
            ),
            (Operation::Acquire, resource) => {
                let (name, unit) = match resource {
                    Resource::Tokens => ("Token", "tokens"),
                    Resource::Calls => ("Call", "calls"),
                };
                let when = match s.retry_after_ms {
                    Some(ms) => format!("window ends in {:.3}s", ms as f64 / 1000.0),
                    None => format!("larger than the limit of {}, never admitted", s.limit),
                };
                format!(
                    "{name} budget exceeded for agent {agent_id}: requested {} {unit} but only {} remaining ({when})",
                    s.requested, s.remaining
                )
            }
        };
        BudgetExceeded {
            agent_id,
            kind,
            message,
            retry_after: s.retry_after_ms.map(Duration::from_millis),
        }
    }
}

/// Saving or loading budget state failed. Nothing was changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PersistError {
    /// The file or its folder could not be written, synced or renamed.
    #[error("cannot write budget state to {path}: {source}")]
    Write {
        /// The file that was being written.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The file exists but could not be read.
    #[error("cannot read budget state from {path}: {source}")]
    Read {
        /// The file that was being read.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid JSON in the persisted layout.
    #[error("budget state in {path} is malformed: {source}")]
    Malformed {
        /// The file that was being read.
        path: PathBuf,
        /// Where and why parsing failed.
        #[source]
        source: serde_json::Error,
    },
    /// The file parses but contradicts itself.
    #[error("budget state in {path} is inconsistent: {reason}")]
    Inconsistent {
        /// The file that was being read.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}
