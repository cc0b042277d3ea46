//! What the gateway keeps an eye on besides the budgets themselves: each
//! agent's last hour ([`crate::history`]), told by the budget layer of
//! every decision, the background task that keeps its clock, and the
//! alerts ([`crate::alerts`]), which read both.

use std::sync::Arc;
use std::time::Duration;

use agent_budget::AgentId;
use agent_budget_tower::{Observe, RefusalReason};
use tokio::task::JoinHandle;

use crate::alerts::Alerts;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::gateway::Budgets;
use crate::history::History;

/// How often the history's minute is read from the clock.
const TICK: Duration = Duration::from_secs(1);

/// The gateway's watchers. Clones share them.
#[derive(Clone, Debug)]
pub struct Watch {
    /// Each agent's requests over the last hour.
    pub history: History,
    /// The alerts of the configuration, if it has any.
    alerts: Option<Alerts>,
}

impl Watch {
    /// The watchers for a gateway with `config`.
    pub fn new(config: &Config) -> Self {
        Watch {
            history: History::default(),
            alerts: Alerts::new(&config.alerts),
        }
    }

    /// Notes a request that shadow mode admitted but the budget would have
    /// refused, for the alerts.
    pub fn shadow_refused(&self, agent: &AgentId, reason: RefusalReason) {
        self.history.note_refusal(agent, reason);
    }

    /// What the budget layer tells of its decisions.
    pub fn observer(&self) -> Arc<dyn Observe> {
        Arc::new(self.clone())
    }

    /// Starts the background tasks: the history's clock (every second),
    /// which also forgets deleted agents once a minute, and the alerts'.
    pub fn spawn(&self, catalog: &Catalog, budgets: &Budgets) -> Vec<JoinHandle<()>> {
        let mut tasks = match &self.alerts {
            Some(alerts) => alerts.spawn(catalog.clone(), budgets.clone(), self.history.clone()),
            None => Vec::new(),
        };
        let history = self.history.clone();
        let catalog = catalog.clone();
        let clock = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(TICK);
            let mut last = history.minute();
            loop {
                ticks.tick().await;
                history.tick();
                if history.minute() != last {
                    last = history.minute();
                    let ids: std::collections::HashSet<AgentId> =
                        catalog.agent_ids().into_iter().collect();
                    history.retain(|agent| ids.contains(agent));
                }
            }
        });
        tasks.push(clock);
        tasks
    }
}

impl Observe for Watch {
    fn admitted(&self, agent: &AgentId) {
        self.history.admitted(agent);
    }

    fn refused(&self, agent: &AgentId, reason: RefusalReason) {
        self.history.refused(agent, reason);
    }
}
