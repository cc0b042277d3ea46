//! Errors: a refused request, and a failed persist or restore.

use std::path::PathBuf;
use std::time::Duration;

use crate::rules::{Resource, Shortfall};
use crate::types::{AgentId, BudgetKind};

/// A request was refused: the agent has no budget, or not enough left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetExceeded {
    /// The agent whose request was refused.
    pub agent_id: AgentId,
    /// Which budget refused it.
    pub kind: BudgetKind,
    /// The level of the agent's chain of budgets that refused it: the
    /// agent itself, or one of its ancestors (see
    /// [`set_parent`](crate::BudgetManager::set_parent)).
    pub refused_by: AgentId,
    /// What happened, for people: the resource, how much was asked and how
    /// much is left. This is also the error's `Display`.
    pub message: String,
    /// When the same request may succeed at the level that refused it: the
    /// time until its window ends, or until its bucket has refilled enough.
    /// `None` when waiting cannot help: the request is larger than that
    /// level's limit, or the agent has no budget.
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

/// Why an admission was refused, before it is formatted for the caller:
/// the hot paths and the waiting futures decide on this, and only the
/// public boundary pays for a [`BudgetExceeded`] and its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The agent has no budget, or not the incarnation that was expected.
    NoBudget,
    /// A level of the agent's chain cannot take the request now.
    Short {
        shortfall: Shortfall,
        /// The incarnation of the agent itself.
        generation: u64,
        /// The level that refused: the agent or an ancestor.
        level: AgentId,
    },
}

impl Refusal {
    pub(crate) fn into_error(self, agent_id: AgentId, operation: Operation) -> BudgetExceeded {
        match self {
            Refusal::NoBudget => BudgetExceeded::no_budget(agent_id, operation),
            Refusal::Short {
                shortfall, level, ..
            } => BudgetExceeded::from_shortfall(agent_id, level, operation, shortfall),
        }
    }
}

impl BudgetExceeded {
    pub(crate) fn no_budget(agent_id: AgentId, operation: Operation) -> Self {
        BudgetExceeded {
            agent_id,
            kind: match operation {
                Operation::TrackCall => BudgetKind::Call,
                Operation::Reserve | Operation::Acquire => BudgetKind::Token,
            },
            refused_by: agent_id,
            message: format!("No budget configured for agent {agent_id}"),
            retry_after: None,
        }
    }

    pub(crate) fn from_shortfall(
        agent_id: AgentId,
        refused_by: AgentId,
        operation: Operation,
        s: Shortfall,
    ) -> Self {
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
                    Some(ms) => format!("fits in {:.3}s", ms as f64 / 1000.0),
                    None => format!("larger than the limit of {}, never admitted", s.limit),
                };
                format!(
                    "{name} budget exceeded for agent {agent_id}: requested {} {unit} but only {} remaining ({when})",
                    s.requested, s.remaining
                )
            }
        };
        let message = if refused_by == agent_id {
            message
        } else {
            format!("{message}, at its ancestor {refused_by}")
        };
        BudgetExceeded {
            agent_id,
            kind,
            refused_by,
            message,
            retry_after: s.retry_after_ms.map(Duration::from_millis),
        }
    }
}

/// A `set_parent` was refused. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HierarchyError {
    /// The agent has no budget: only agents with budgets can be linked.
    #[error("agent {0} has no budget")]
    UnknownAgent(AgentId),
    /// The parent is the child itself or one of its descendants.
    #[error("making {parent} the parent of {child} would close a cycle")]
    Cycle {
        /// The agent that was to get a parent.
        child: AgentId,
        /// The parent it was to get.
        parent: AgentId,
    },
    /// The longest chain through the link would have more than
    /// [`MAX_LEVELS`](crate::MAX_LEVELS) levels.
    #[error("the longest chain would have {levels} levels; at most {max} are allowed", max = crate::MAX_LEVELS)]
    TooDeep {
        /// How many levels it would have had.
        levels: usize,
    },
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
    /// The file's parents would make a cycle, dangle, or nest too deep.
    #[error("budget state in {path} has a bad hierarchy: {source}")]
    Hierarchy {
        /// The file that was being read.
        path: PathBuf,
        /// What is wrong with its parents.
        #[source]
        source: HierarchyError,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn shortfall(resource: Resource, retry_after_ms: Option<u64>) -> Shortfall {
        Shortfall {
            resource,
            requested: 40,
            remaining: 30,
            used: 70,
            limit: 100,
            retry_after_ms,
        }
    }

    #[test]
    fn the_seed_operations_keep_the_seed_messages() {
        let id = AgentId::nil();
        let e = BudgetExceeded::from_shortfall(
            id,
            id,
            Operation::Reserve,
            shortfall(Resource::Tokens, Some(5)),
        );
        assert_eq!(
            e.message,
            "Token budget exceeded: requested 40 but only 30 remaining"
        );
        assert_eq!(
            (e.kind, e.retry_after),
            (BudgetKind::Token, Some(Duration::from_millis(5)))
        );
        let e = BudgetExceeded::from_shortfall(
            id,
            id,
            Operation::TrackCall,
            shortfall(Resource::Calls, None),
        );
        assert_eq!(
            e.message,
            "Call budget exceeded: 70 calls used, limit is 100"
        );
        assert_eq!((e.kind, e.retry_after), (BudgetKind::Call, None));
        let e = BudgetExceeded::no_budget(id, Operation::TrackCall);
        assert_eq!(
            (e.kind, e.to_string()),
            (
                BudgetKind::Call,
                format!("No budget configured for agent {id}")
            )
        );
    }

    #[test]
    fn acquire_messages_name_resource_amounts_and_when_to_retry() {
        let id = AgentId::nil();
        let e = BudgetExceeded::from_shortfall(
            id,
            id,
            Operation::Acquire,
            shortfall(Resource::Calls, Some(1_500)),
        );
        assert_eq!(
            e.to_string(),
            format!("Call budget exceeded for agent {id}: requested 40 calls but only 30 remaining (fits in 1.500s)")
        );
        let parent = AgentId::from_u128(9);
        let e = BudgetExceeded::from_shortfall(
            id,
            parent,
            Operation::Acquire,
            shortfall(Resource::Calls, Some(1_500)),
        );
        assert!(
            e.to_string()
                .ends_with(&format!(", at its ancestor {parent}")),
            "{e}"
        );
        assert_eq!(e.refused_by, parent);
        let e = BudgetExceeded::from_shortfall(
            id,
            id,
            Operation::Acquire,
            shortfall(Resource::Tokens, None),
        );
        assert!(
            e.to_string()
                .ends_with("(larger than the limit of 100, never admitted)"),
            "{e}"
        );
    }
}
