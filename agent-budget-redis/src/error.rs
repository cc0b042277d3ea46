//! Errors: a request the fleet did not admit, and a fleet operation that
//! failed.

use std::time::Duration;

use agent_budget::{AgentId, Refused};

/// A request the fleet did not admit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The budget refused it: the agent has no budget, or not enough is
    /// left fleet-wide (the figures are the fleet's: its limit, what the
    /// fleet has taken, and what is left; `retry_after` is the time to the
    /// fleet window's end, or `None` if the request is larger than the
    /// limit). A gateway answers `429`.
    #[error(transparent)]
    Refused(Refused),
    /// Redis could not be asked (unreachable, or recovering its data) and
    /// the node's lease does not cover the request: refused without
    /// knowing whether the fleet has budget (fail-closed, or fail-open with
    /// the local allowance spent). A gateway answers `503`.
    #[error("budget for agent {agent_id} cannot be checked now: {why}; retry in {:.3}s", retry_after.as_secs_f64())]
    Unavailable {
        /// The agent whose request was not admitted.
        agent_id: AgentId,
        /// When to try again.
        retry_after: Duration,
        /// Why, for people.
        why: &'static str,
    },
}

impl Denied {
    /// The budget's refusal, if that is what it is.
    pub fn refused(&self) -> Option<&Refused> {
        match self {
            Denied::Refused(refused) => Some(refused),
            Denied::Unavailable { .. } => None,
        }
    }

    /// When to try again, if ever.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Denied::Refused(refused) => refused.retry_after,
            Denied::Unavailable { retry_after, .. } => Some(*retry_after),
        }
    }
}

/// A fleet operation (connecting, setting a budget, reading the fleet's
/// view) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// Redis answered with an error, or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer within the configured timeout.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis answered something the protocol does not expect (another
    /// program's data under the same key prefix?).
    #[error("unexpected reply from redis: {0}")]
    Protocol(String),
    /// The manager was shut down.
    #[error("the fleet manager was shut down")]
    ShutDown,
}
