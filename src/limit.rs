//! An agent's budget as configured, with the policy derived from it once.

use crate::rules::{Policy, Refill};
use crate::types::{AgentId, BudgetLimit, CalendarLimit, RefillLimit};

/// What `set_budget` or `set_refill` was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Configured {
    /// A fixed window.
    Window(BudgetLimit),
    /// A token bucket.
    Refill(RefillLimit),
    /// Windows on the UTC calendar.
    Calendar(CalendarLimit),
}

impl Configured {
    pub(crate) fn agent_id(&self) -> AgentId {
        match self {
            Configured::Window(limit) => limit.agent_id,
            Configured::Refill(limit) => limit.agent_id,
            Configured::Calendar(limit) => limit.agent_id,
        }
    }

    pub(crate) fn token_budget(&self) -> u64 {
        match self {
            Configured::Window(limit) => limit.token_budget,
            Configured::Refill(limit) => limit.token_budget,
            Configured::Calendar(limit) => limit.token_budget,
        }
    }

    pub(crate) fn calls_budget(&self) -> u64 {
        match self {
            Configured::Window(limit) => limit.calls_budget,
            Configured::Refill(limit) => limit.calls_budget,
            Configured::Calendar(limit) => limit.calls_budget,
        }
    }

    /// The window's length, or the refill period in whole seconds, rounded
    /// up: what `full_info` reports as `window_secs`. `None` for calendar
    /// windows, whose length depends on the window.
    pub(crate) fn period_secs(&self) -> Option<u64> {
        Some(match self {
            Configured::Calendar(_) => return None,
            Configured::Window(limit) => limit.window_secs,
            Configured::Refill(limit) => {
                let period = limit.refill_period;
                // Saturating: `Duration::MAX` has a fraction of a second.
                period
                    .as_secs()
                    .saturating_add(u64::from(period.subsec_nanos() > 0))
            }
        })
    }

    /// The configured limit that `policy` gives back exactly: what a cell
    /// reports when it keeps no configured limit of its own.
    pub(crate) fn derived(agent_id: AgentId, policy: &Policy) -> Self {
        match policy.refill {
            Refill::Window => Configured::Window(BudgetLimit {
                agent_id,
                token_budget: policy.tokens,
                calls_budget: policy.calls,
                window_secs: policy.period / 1_000,
            }),
            Refill::Bucket => Configured::Refill(RefillLimit {
                agent_id,
                token_budget: policy.tokens,
                calls_budget: policy.calls,
                refill_period: std::time::Duration::from_millis(policy.period),
            }),
            Refill::Calendar(period) => Configured::Calendar(CalendarLimit {
                agent_id,
                token_budget: policy.tokens,
                calls_budget: policy.calls,
                period,
            }),
        }
    }

    pub(crate) fn policy(&self) -> Policy {
        match self {
            Configured::Window(limit) => Policy::from_limit(limit),
            Configured::Refill(limit) => Policy::from_refill(limit),
            Configured::Calendar(limit) => Policy::from_calendar(limit),
        }
    }
}

/// A limit as configured, the policy derived from it, and the agent's
/// parent in a hierarchy of budgets.
#[derive(Clone, Debug)]
pub(crate) struct Limit {
    pub(crate) configured: Configured,
    pub(crate) policy: Policy,
    pub(crate) parent: Option<AgentId>,
}

impl Limit {
    pub(crate) fn new(configured: Configured, parent: Option<AgentId>) -> Self {
        let policy = configured.policy();
        Limit {
            configured,
            policy,
            parent,
        }
    }

    /// The same limit under another parent.
    pub(crate) fn with_parent(&self, parent: Option<AgentId>) -> Self {
        Limit {
            parent,
            ..self.clone()
        }
    }
}
