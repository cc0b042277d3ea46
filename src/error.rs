//! Errors: a refused request, and a failed persist or restore.

use std::path::PathBuf;
use std::time::Duration;

use crate::rules::{Resource, Shortfall};
use crate::types::{AgentId, BudgetKind};

/// A request was refused: the agent has no budget, or not enough left.
///
/// What the seed's `reserve` and `track_call` return. It carries the same
/// facts as [`Refused`] (which it converts to and from without loss) and
/// the message, formatted when the refusal was made.
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
    /// The facts the message was made from, beyond the public fields.
    reason: RefusalReason,
    operation: Operation,
}

impl std::fmt::Display for BudgetExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BudgetExceeded {}

impl BudgetExceeded {
    /// The facts of the refusal, without the message.
    pub fn refused(&self) -> Refused {
        Refused {
            agent_id: self.agent_id,
            kind: self.kind,
            refused_by: self.refused_by,
            retry_after: self.retry_after,
            reason: self.reason,
            operation: self.operation,
        }
    }
}

impl From<Refused> for BudgetExceeded {
    /// Formats the message; nothing is lost.
    fn from(refused: Refused) -> Self {
        BudgetExceeded {
            agent_id: refused.agent_id,
            kind: refused.kind,
            refused_by: refused.refused_by,
            message: refused.to_string(),
            retry_after: refused.retry_after,
            reason: refused.reason,
            operation: refused.operation,
        }
    }
}

impl From<BudgetExceeded> for Refused {
    /// The facts the error carries; nothing is lost (its message is made
    /// from them, and [`Refused`] displays the same).
    fn from(exceeded: BudgetExceeded) -> Self {
        exceeded.refused()
    }
}

/// A request was refused, told by its facts alone: what
/// [`acquire`](crate::BudgetManager::acquire), the waiting futures and
/// [`AgentHandle`](crate::AgentHandle)s return.
///
/// Making one allocates nothing and formats nothing, so a refusal costs no
/// more than an admission (a gateway flooded by an over-budget tenant
/// refuses at full speed); the message is formatted only when it is
/// displayed, and reads as [`BudgetExceeded`]'s. The public fields callers
/// match on (`agent_id`, `kind`, `retry_after`, `refused_by`) have the
/// same names and meanings as there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The agent whose request was refused.
    pub agent_id: AgentId,
    /// Which budget refused it.
    pub kind: BudgetKind,
    /// The level of the agent's chain that refused it: the agent itself, or
    /// one of its ancestors.
    pub refused_by: AgentId,
    /// When the same request may succeed at the level that refused it;
    /// `None` when waiting cannot help.
    pub retry_after: Option<Duration>,
    /// Why: no budget, or the numbers that fell short.
    pub reason: RefusalReason,
    /// Which operation was refused, for the message's wording.
    operation: Operation,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefusalReason {
    /// The agent has no budget (or its budget was removed).
    NoBudget,
    /// The budget that refused (`kind`, at `refused_by`) had too little
    /// left.
    Exceeded {
        /// How much of it was asked for.
        requested: u64,
        /// How much of it was left.
        remaining: u64,
        /// How much of it was in use.
        used: u64,
        /// Its limit.
        limit: u64,
    },
    /// A set of limits ([`acquire_set`](crate::BudgetManager::acquire_set))
    /// names more claims, or reaches more distinct limits with their
    /// ancestors, than one request may be admitted against
    /// ([`MAX_SET_LIMITS`](crate::MAX_SET_LIMITS)). Nothing was taken;
    /// waiting cannot help.
    TooManyLimits {
        /// How many it has (at least: counting stops one past the maximum).
        limits: usize,
        /// The most one request may have.
        max: usize,
    },
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let agent_id = self.agent_id;
        let (requested, remaining, used, limit) = match self.reason {
            RefusalReason::Exceeded {
                requested,
                remaining,
                used,
                limit,
            } => (requested, remaining, used, limit),
            RefusalReason::NoBudget => {
                return write!(f, "No budget configured for agent {agent_id}")
            }
            RefusalReason::TooManyLimits { limits, max } => {
                return write!(
                    f,
                    "A request against {limits} limits (claims, or limits with their ancestors) is refused: at most {max} are allowed"
                )
            }
        };
        match self.operation {
            Operation::Reserve => write!(
                f,
                "Token budget exceeded: requested {requested} but only {remaining} remaining"
            )?,
            Operation::TrackCall => write!(
                f,
                "Call budget exceeded: {used} calls used, limit is {limit}"
            )?,
            Operation::Acquire => {
                let (name, unit) = match self.kind {
                    BudgetKind::Token => ("Token", "tokens"),
                    BudgetKind::Call => ("Call", "calls"),
                };
                write!(
                    f,
                    "{name} budget exceeded for agent {agent_id}: requested {requested} {unit} but only {remaining} remaining ("
                )?;
                match self.retry_after {
                    Some(wait) => write!(f, "fits in {:.3}s)", wait.as_secs_f64())?,
                    None => write!(f, "larger than the limit of {limit}, never admitted)")?,
                }
            }
        }
        if self.refused_by != agent_id {
            write!(f, ", at its ancestor {}", self.refused_by)?;
        }
        Ok(())
    }
}

impl std::error::Error for Refused {}

/// Which operation was refused; the seed's operations keep their messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Operation {
    Reserve,
    TrackCall,
    Acquire,
}

/// Why an admission was refused, as the managers decide it; the public
/// boundary turns it into a [`Refused`] (or a [`BudgetExceeded`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The agent has no budget, or not the incarnation that was expected.
    NoBudget,
    /// A level of the agent's chain cannot take the request now.
    Short {
        shortfall: Shortfall,
        /// The (tokens, calls) asked of that level: what a waiter needs to
        /// fit there.
        asked: (u64, u64),
        /// The incarnation of the agent itself.
        generation: u64,
        /// The level that refused: the agent or an ancestor.
        level: AgentId,
    },
    /// A set larger than [`crate::MAX_SET_LIMITS`]: how many it has.
    TooMany { limits: usize },
}

impl Refusal {
    /// The refusal of `operation` on `agent_id`, without a message.
    pub(crate) fn refused(self, agent_id: AgentId, operation: Operation) -> Refused {
        match self {
            Refusal::NoBudget => Refused {
                agent_id,
                kind: match operation {
                    Operation::TrackCall => BudgetKind::Call,
                    Operation::Reserve | Operation::Acquire => BudgetKind::Token,
                },
                refused_by: agent_id,
                retry_after: None,
                reason: RefusalReason::NoBudget,
                operation,
            },
            Refusal::TooMany { limits } => Refused {
                agent_id,
                kind: BudgetKind::Token,
                refused_by: agent_id,
                retry_after: None,
                reason: RefusalReason::TooManyLimits {
                    limits,
                    max: crate::MAX_SET_LIMITS,
                },
                operation,
            },
            Refusal::Short {
                shortfall: s,
                level,
                ..
            } => Refused {
                agent_id,
                kind: match s.resource {
                    Resource::Tokens => BudgetKind::Token,
                    Resource::Calls => BudgetKind::Call,
                },
                refused_by: level,
                retry_after: s.retry_after_ms.map(Duration::from_millis),
                reason: RefusalReason::Exceeded {
                    requested: s.requested,
                    remaining: s.remaining,
                    used: s.used,
                    limit: s.limit,
                },
                operation,
            },
        }
    }

    /// The same, with its message: for the seed's `reserve` and
    /// `track_call`.
    pub(crate) fn into_error(self, agent_id: AgentId, operation: Operation) -> BudgetExceeded {
        self.refused(agent_id, operation).into()
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

    fn short(resource: Resource, retry_after_ms: Option<u64>, level: AgentId) -> Refusal {
        Refusal::Short {
            shortfall: Shortfall {
                resource,
                requested: 40,
                remaining: 30,
                used: 70,
                limit: 100,
                retry_after_ms,
            },
            asked: (40, 1),
            generation: 0,
            level,
        }
    }

    #[test]
    fn the_seed_operations_keep_the_seed_messages() {
        let id = AgentId::nil();
        let e = short(Resource::Tokens, Some(5), id).into_error(id, Operation::Reserve);
        assert_eq!(
            e.message,
            "Token budget exceeded: requested 40 but only 30 remaining"
        );
        assert_eq!(
            (e.kind, e.retry_after),
            (BudgetKind::Token, Some(Duration::from_millis(5)))
        );
        let e = short(Resource::Calls, None, id).into_error(id, Operation::TrackCall);
        assert_eq!(
            e.message,
            "Call budget exceeded: 70 calls used, limit is 100"
        );
        assert_eq!((e.kind, e.retry_after), (BudgetKind::Call, None));
        let e = Refusal::NoBudget.into_error(id, Operation::TrackCall);
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
        let e = short(Resource::Calls, Some(1_500), id).refused(id, Operation::Acquire);
        assert_eq!(
            e.to_string(),
            format!("Call budget exceeded for agent {id}: requested 40 calls but only 30 remaining (fits in 1.500s)")
        );
        let parent = AgentId::from_u128(9);
        let e = short(Resource::Calls, Some(1_500), parent).refused(id, Operation::Acquire);
        assert!(
            e.to_string()
                .ends_with(&format!(", at its ancestor {parent}")),
            "{e}"
        );
        assert_eq!(e.refused_by, parent);
        let e = short(Resource::Tokens, None, id).refused(id, Operation::Acquire);
        assert!(
            e.to_string()
                .ends_with("(larger than the limit of 100, never admitted)"),
            "{e}"
        );
    }

    #[test]
    fn refused_and_budget_exceeded_convert_both_ways_without_loss() {
        let (id, parent) = (AgentId::from_u128(1), AgentId::from_u128(2));
        for operation in [Operation::Reserve, Operation::TrackCall, Operation::Acquire] {
            for refusal in [
                Refusal::NoBudget,
                short(Resource::Tokens, Some(250), id),
                short(Resource::Calls, None, parent),
            ] {
                let refused = refusal.refused(id, operation);
                let exceeded = BudgetExceeded::from(refused);
                assert_eq!(exceeded.to_string(), refused.to_string());
                assert_eq!(
                    (
                        exceeded.agent_id,
                        exceeded.kind,
                        exceeded.refused_by,
                        exceeded.retry_after
                    ),
                    (
                        refused.agent_id,
                        refused.kind,
                        refused.refused_by,
                        refused.retry_after
                    )
                );
                assert_eq!(Refused::from(exceeded.clone()), refused);
                assert_eq!(exceeded.refused(), refused);
            }
        }
    }
}
