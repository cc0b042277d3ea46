//! Counters and histograms, through the `metrics` facade.
//!
//! # How it works
//!
//! The layer records what it does with the [`metrics`] crate's macros, so
//! any recorder the application installs (Prometheus, StatsD, …) sees it,
//! and an application without one pays an atomic load per update. The
//! handles are registered once, when the layer is built, not looked up
//! per request: install the recorder before building the layer.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `agent_budget_requests_admitted_total` | counter | |
//! | `agent_budget_requests_refused_total` | counter | `reason`: `unidentified`, `bad_request`, `tokens`, `calls`, `no_budget`, `unavailable` |
//! | `agent_budget_tokens_reserved_total` | counter | |
//! | `agent_budget_tokens_refunded_total` | counter | |
//! | `agent_budget_tokens_charged_total` | counter | (what requests finally cost) |
//! | `agent_budget_tokens_overrun_total` | counter | (charged beyond the estimate) |
//! | `agent_budget_responses_abandoned_total` | counter | (bodies dropped or failed before their end) |
//! | `agent_budget_check_seconds` | histogram | (the budget check: `acquire` and the headers' read) |
//! | `agent_budget_wait_seconds` | histogram | (time spent waiting for budget, when waiting is on) |
//!
//! Per-agent series would be one per agent, which a Prometheus server
//! pays for in memory: agents get an `agent` label only when the operator
//! names them ([`BudgetLayer::agent_labels`](crate::BudgetLayer::agent_labels)).
//! Every other agent is counted in the series without the label, so
//! summing over `agent` always gives the totals.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use agent_budget::{AgentId, BudgetKind, Settlement};
use metrics::{Counter, Histogram, Label};

/// Times the budget check for its histogram: two reads of the CPU's
/// time-stamp counter and one scaling, where `std::time::Instant` makes
/// two `clock_gettime` calls through the vDSO and subtracts `timespec`s
/// (about 250 instructions a request more, counted with callgrind).
/// Where quanta finds no invariant TSC it reads the monotonic clock.
#[derive(Clone, Copy)]
pub(crate) struct CheckTimer(u64);

/// Calibrated once per process (quanta measures the TSC's rate when the
/// first clock is made).
fn check_clock() -> &'static quanta::Clock {
    static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();
    CLOCK.get_or_init(quanta::Clock::new)
}

impl CheckTimer {
    pub(crate) fn start() -> Self {
        CheckTimer(check_clock().raw())
    }

    /// Time since `start`; zero if the counter went backwards (a TSC read
    /// on another core can).
    pub(crate) fn elapsed(self) -> Duration {
        let clock = check_clock();
        Duration::from_nanos(clock.delta_as_nanos(self.0, clock.raw()))
    }
}

/// Why a request was not forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// No agent could be told from the request.
    Unidentified,
    /// The request could not be estimated (bad body).
    BadRequest,
    /// Not enough tokens.
    Tokens,
    /// Not enough calls.
    Calls,
    /// The agent has no budget.
    NoBudget,
    /// The budget could not be checked (`503`: a fleet's store is
    /// unreachable, say).
    Unavailable,
}

impl RefusalReason {
    const ALL: [RefusalReason; 6] = [
        RefusalReason::Unidentified,
        RefusalReason::BadRequest,
        RefusalReason::Tokens,
        RefusalReason::Calls,
        RefusalReason::NoBudget,
        RefusalReason::Unavailable,
    ];

    /// The `reason` label's value.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Unidentified => "unidentified",
            RefusalReason::BadRequest => "bad_request",
            RefusalReason::Tokens => "tokens",
            RefusalReason::Calls => "calls",
            RefusalReason::NoBudget => "no_budget",
            RefusalReason::Unavailable => "unavailable",
        }
    }

    /// The reason a budget of `kind` refused.
    pub(crate) fn of_kind(kind: BudgetKind) -> Self {
        match kind {
            BudgetKind::Token => RefusalReason::Tokens,
            BudgetKind::Call => RefusalReason::Calls,
        }
    }
}

/// Told the outcome of every request the layer decides on, per agent:
/// for what the metrics' series cannot keep (every agent's own counts, a
/// dashboard's history). Called on the request path, once per request,
/// after the decision: an implementation should cost a few atomic
/// operations, and must not block.
pub trait Observe: Send + Sync + 'static {
    /// A request of `agent` was admitted.
    fn admitted(&self, agent: &AgentId);
    /// A request of `agent` was refused, for `reason`.
    fn refused(&self, agent: &AgentId, reason: RefusalReason);
}

/// The handles of one series (the unlabelled one, or one agent's).
#[derive(Clone)]
struct Handles {
    admitted: Counter,
    refused: [Counter; RefusalReason::ALL.len()],
    reserved: Counter,
    refunded: Counter,
    charged: Counter,
    overrun: Counter,
    abandoned: Counter,
    check: Histogram,
    wait: Histogram,
}

impl Handles {
    fn register(labels: Vec<Label>) -> Self {
        let refused = RefusalReason::ALL.map(|reason| {
            let mut labels = labels.clone();
            labels.push(Label::new("reason", reason.as_str()));
            metrics::counter!("agent_budget_requests_refused_total", labels)
        });
        Handles {
            admitted: metrics::counter!("agent_budget_requests_admitted_total", labels.clone()),
            refused,
            reserved: metrics::counter!("agent_budget_tokens_reserved_total", labels.clone()),
            refunded: metrics::counter!("agent_budget_tokens_refunded_total", labels.clone()),
            charged: metrics::counter!("agent_budget_tokens_charged_total", labels.clone()),
            overrun: metrics::counter!("agent_budget_tokens_overrun_total", labels.clone()),
            abandoned: metrics::counter!("agent_budget_responses_abandoned_total", labels.clone()),
            check: metrics::histogram!("agent_budget_check_seconds", labels.clone()),
            wait: metrics::histogram!("agent_budget_wait_seconds", labels),
        }
    }
}

/// The layer's metrics: the unlabelled series, and those of named agents;
/// and the observer, if one was given.
#[derive(Clone)]
pub(crate) struct Telemetry {
    all: Handles,
    named: HashMap<AgentId, Handles>,
    observer: Option<Arc<dyn Observe>>,
}

impl Telemetry {
    pub(crate) fn new(labels: &HashMap<AgentId, String>) -> Arc<Self> {
        let named = labels
            .iter()
            .map(|(id, name)| {
                (
                    *id,
                    Handles::register(vec![Label::new("agent", name.clone())]),
                )
            })
            .collect();
        Arc::new(Telemetry {
            all: Handles::register(Vec::new()),
            named,
            observer: None,
        })
    }

    /// The same metrics, with `observer` told of every decision.
    pub(crate) fn with_observer(&self, observer: Option<Arc<dyn Observe>>) -> Arc<Self> {
        Arc::new(Telemetry {
            observer,
            ..self.clone()
        })
    }

    pub(crate) fn observer(&self) -> Option<Arc<dyn Observe>> {
        self.observer.clone()
    }

    fn of(&self, agent: Option<&AgentId>) -> &Handles {
        agent.and_then(|a| self.named.get(a)).unwrap_or(&self.all)
    }

    pub(crate) fn admitted(&self, agent: &AgentId, tokens: u64, check: Duration) {
        let h = self.of(Some(agent));
        h.admitted.increment(1);
        h.reserved.increment(tokens);
        h.check.record(check.as_secs_f64());
        if let Some(observer) = &self.observer {
            observer.admitted(agent);
        }
    }

    pub(crate) fn refused(&self, agent: Option<&AgentId>, reason: RefusalReason) {
        let h = self.of(agent);
        h.refused[reason as usize].increment(1);
        if let (Some(observer), Some(agent)) = (&self.observer, agent) {
            observer.refused(agent, reason);
        }
    }

    pub(crate) fn checked(&self, agent: &AgentId, check: Duration) {
        self.of(Some(agent)).check.record(check.as_secs_f64());
    }

    pub(crate) fn waited(&self, agent: &AgentId, wait: Duration) {
        self.of(Some(agent)).wait.record(wait.as_secs_f64());
    }

    /// A reservation of `reserved` tokens settled as `settlement`.
    pub(crate) fn settled(
        &self,
        agent: &AgentId,
        reserved: u64,
        settlement: Settlement,
        abandoned: bool,
    ) {
        let h = self.of(Some(agent));
        if abandoned {
            h.abandoned.increment(1);
        }
        let charged = match settlement {
            Settlement::Applied {
                refunded_tokens,
                charged_tokens,
                ..
            } => {
                h.refunded.increment(refunded_tokens);
                h.overrun.increment(charged_tokens);
                reserved
                    .saturating_sub(refunded_tokens)
                    .saturating_add(charged_tokens)
            }
            // The window had ended; the overuse went to the current one.
            Settlement::CarriedOver { charged_tokens } => {
                h.overrun.increment(charged_tokens);
                reserved.saturating_add(charged_tokens)
            }
            // Nothing changed: the reservation stays charged where it was.
            Settlement::WindowEnded | Settlement::AgentRemoved => reserved,
        };
        h.charged.increment(charged);
    }
}
