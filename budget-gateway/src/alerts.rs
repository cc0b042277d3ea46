//! Alerts: an HTTP POST when an agent's usage of a limit crosses a
//! fraction of it, once per limit, window and fraction.
//!
//! ```toml
//! [[alerts]]
//! url = "http://127.0.0.1:9000/hooks/budget"
//! at = [0.8, 1.0]
//! headers = { "x-hook-secret" = "s3cret" }
//! ```
//!
//! Each `[[alerts]]` entry watches every agent. The body is JSON:
//!
//! ```json
//! {"agent_id": "7f9c24e8-…", "metrics_label": "search-bot",
//!  "limit": {"window": "1m", "refill": null, "resource": "tokens", "model": null, "amount": 100000},
//!  "threshold": 0.8, "used": 81234, "window_resets_at": "2026-12-06T08:01:00Z",
//!  "at": "2026-12-06T08:00:17.250Z", "enforced": true, "reason": null}
//! ```
//!
//! `reason` is set (`"tokens"`, `"calls"`, …) when the crossing comes with
//! a refusal: a refused request counts as reaching the whole limit (every
//! fraction up to `1.0`) of the resource it was refused for, whatever was
//! used, since that is when the agent's clients notice. An agent in shadow
//! mode alerts the same way (`"enforced": false`), its would-be refusals
//! included.
//!
//! # How it works
//!
//! Nothing of this is on the request path but what the history records
//! anyway ([`crate::history`]: a count of refusals and the last one's
//! reason, two relaxed atomic operations on a refusal). A background task
//! looks every [`SCAN_INTERVAL`] at the agents with requests this minute
//! or the one before, reads where each limit stands (as `/v1/agents`
//! shows it: every resource of every limit, whatever they are), and
//! compares each resource's used fraction with the fractions of every
//! entry. It alone keeps, per agent, limit and resource, which fractions
//! were sent in the current window, so each is sent once, however many
//! requests cross it at once. A fixed window's end (its time to reset went
//! up, or more time went by than it had left) forgets what was sent; for a
//! bucket (`refill`), a fraction is sent again once usage has fallen below
//! 90% of it.
//!
//! An alert goes into a bounded queue per entry ([`QUEUE`]); a full queue
//! drops it, counted in `budget_gateway_alerts_dropped_total`. One task per
//! entry POSTs them in order, each retried up to [`ATTEMPTS`] times with a
//! backoff doubling from 100 ms to 5 s (about 11 s of waiting in all), each try given
//! 5 s; a `2xx` is delivered (`budget_gateway_alerts_sent_total`), anything
//! else is retried, and an alert that never got through is counted in
//! `budget_gateway_alerts_failed_total`. While an endpoint is down, the
//! alerts behind the one being retried wait in the queue.
//!
//! Limits: `http://` endpoints only (no TLS client is built in: post to a
//! relay on a trusted network); alerts are per gateway (each gateway of a
//! fleet alerts for what it sees of the shared budgets); what was sent is
//! forgotten at a restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_budget::AgentId;
use agent_budget_tower::RefusalReason;
use axum::body::Body;
use chrono::{SecondsFormat, Utc};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::catalog::Catalog;
use crate::config::AlertTarget;
use crate::gateway::Budgets;
use crate::history::History;

/// How often usage is compared with the fractions.
pub const SCAN_INTERVAL: Duration = Duration::from_millis(200);

/// Alerts waiting per entry before new ones are dropped.
pub const QUEUE: usize = 1024;

/// Tries per alert.
pub const ATTEMPTS: u32 = 8;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const TRY_TIMEOUT: Duration = Duration::from_secs(5);

/// The configured alerts: what the scan sends to.
#[derive(Clone, Debug)]
pub struct Alerts {
    targets: Arc<[AlertTarget]>,
}

/// Per agent, limit (its index) and resource: what was sent this window.
#[derive(Debug)]
struct Sent {
    /// Bit `i`: the `i`-th fraction of [`Scan::fractions`] was sent.
    bits: u64,
    /// The time to reset at the last look.
    resets_in: u64,
    /// When it was last looked at.
    seen: Instant,
}

/// The scan's own state: it alone reads and writes it.
struct Scan {
    /// Every entry's fractions, ascending, without repeats (at most 64).
    fractions: Vec<f64>,
    sent: HashMap<(AgentId, usize, String), Sent>,
    /// Per agent, the refusal count last seen.
    refusals: HashMap<AgentId, u64>,
}

/// One alert, for the entries whose fractions include its threshold.
struct Alert {
    threshold: f64,
    body: bytes::Bytes,
}

impl Alerts {
    /// The alerts of the configuration, if any.
    pub fn new(targets: &[AlertTarget]) -> Option<Self> {
        (!targets.is_empty()).then(|| Alerts {
            targets: targets.into(),
        })
    }

    /// Starts the scan and one sender per entry.
    pub fn spawn(
        &self,
        catalog: Catalog,
        budgets: Budgets,
        history: History,
    ) -> Vec<JoinHandle<()>> {
        let dropped = metrics::counter!("budget_gateway_alerts_dropped_total");
        let sent = metrics::counter!("budget_gateway_alerts_sent_total");
        let failed = metrics::counter!("budget_gateway_alerts_failed_total");
        let mut tasks = Vec::new();
        let mut queues = Vec::new();
        let client: Client<HttpConnector, Body> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        for target in self.targets.iter() {
            let (tx, rx) = mpsc::channel::<Arc<Alert>>(QUEUE);
            queues.push((target.at.clone(), tx));
            tasks.push(tokio::spawn(deliver(
                target.clone(),
                rx,
                client.clone(),
                sent.clone(),
                failed.clone(),
            )));
        }
        let mut fractions: Vec<f64> = self.targets.iter().flat_map(|t| t.at.clone()).collect();
        fractions.sort_by(f64::total_cmp);
        fractions.dedup();
        // At most 64 fractions fit the bit set; more would be odd anyway.
        fractions.truncate(64);
        let mut scan = Scan {
            fractions,
            sent: HashMap::new(),
            refusals: HashMap::new(),
        };
        tasks.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(SCAN_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                for alert in scan.look(&catalog, &budgets, &history) {
                    let alert = Arc::new(alert);
                    for (at, queue) in &queues {
                        if at.contains(&alert.threshold) && queue.try_send(alert.clone()).is_err() {
                            dropped.increment(1);
                        }
                    }
                }
            }
        }));
        tasks
    }
}

/// The resource a refusal's reason is about, as the limits name it.
fn resource_of(reason: RefusalReason) -> Option<&'static str> {
    match reason {
        RefusalReason::Tokens => Some("tokens"),
        RefusalReason::Calls => Some("requests"),
        _ => None,
    }
}

fn timestamp(at: chrono::DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl Scan {
    /// The alerts due now.
    fn look(&mut self, catalog: &Catalog, budgets: &Budgets, history: &History) -> Vec<Alert> {
        let mut due = Vec::new();
        let now = Instant::now();
        let wall = Utc::now();
        for agent in history.active_agents() {
            let Some(entry) = catalog.agent(&agent) else {
                continue;
            };
            let refused = history.ring_of(&agent).and_then(|ring| {
                let (count, reason) = ring.refusals();
                let last = self.refusals.insert(agent, count).unwrap_or(0);
                (count > last).then_some(reason).flatten()
            });
            let info = |cell: &AgentId| match budgets {
                Budgets::Local(b) => b.full_info(cell),
                Budgets::Fleet(f) => f.full_info(cell),
            };
            let states = entry.settings.limits.states(agent, info);
            for (index, state) in states.iter().enumerate() {
                // Read as JSON: every resource of every kind of limit, as
                // the admin API shows them, whatever kinds there are.
                let Ok(state) = serde_json::to_value(state) else {
                    continue;
                };
                let limit = &state["limit"];
                let resets_in = state["resets_in_secs"].as_u64().unwrap_or(0);
                let bucket = !limit["refill"].is_null();
                let Some(fields) = limit.as_object() else {
                    continue;
                };
                for (resource, amount) in fields {
                    let Some(amount) = amount.as_f64() else {
                        continue;
                    };
                    let used = &state["used"][resource];
                    let used_f = used.as_f64().unwrap_or(0.0);
                    let mut fraction = if amount > 0.0 {
                        used_f / amount
                    } else if used_f > 0.0 {
                        f64::INFINITY
                    } else {
                        0.0
                    };
                    let reason = refused.filter(|r| resource_of(*r) == Some(resource.as_str()));
                    if reason.is_some() {
                        fraction = fraction.max(1.0);
                    }
                    let key = (agent, index, resource.clone());
                    let sent = self.sent.entry(key).or_insert(Sent {
                        bits: 0,
                        resets_in,
                        seen: now,
                    });
                    if bucket {
                        for (i, f) in self.fractions.iter().enumerate() {
                            if fraction < f * 0.9 {
                                sent.bits &= !(1 << i);
                            }
                        }
                    } else if resets_in > sent.resets_in
                        || now.duration_since(sent.seen).as_secs() > sent.resets_in
                    {
                        sent.bits = 0;
                    }
                    sent.resets_in = resets_in;
                    sent.seen = now;
                    for (i, &threshold) in self.fractions.iter().enumerate() {
                        if fraction < threshold || sent.bits & (1 << i) != 0 {
                            continue;
                        }
                        sent.bits |= 1 << i;
                        let body = json!({
                            "agent_id": agent,
                            "metrics_label": entry.settings.metrics_label,
                            "limit": {
                                "window": limit["window"],
                                "refill": limit["refill"],
                                "resource": resource,
                                "model": limit["model"],
                                "amount": fields[resource],
                            },
                            "threshold": threshold,
                            "used": used,
                            "window_resets_at": timestamp(
                                wall + chrono::Duration::seconds(resets_in.min(i64::MAX as u64) as i64)
                            ),
                            "at": timestamp(wall),
                            "enforced": entry.settings.enforce,
                            "reason": reason.map(RefusalReason::as_str),
                        });
                        due.push(Alert {
                            threshold,
                            body: serde_json::to_vec(&body).unwrap_or_default().into(),
                        });
                    }
                }
            }
        }
        // Forget the agents no longer active, once their windows are
        // surely over (the longest window a look can have missed).
        self.sent
            .retain(|_, s| now.duration_since(s.seen).as_secs() <= s.resets_in.max(60) * 2);
        self.refusals
            .retain(|agent, _| history.ring_of(agent).is_some());
        due
    }
}

/// POSTs `target`'s alerts as they come, each retried with backoff.
async fn deliver(
    target: AlertTarget,
    mut queue: mpsc::Receiver<Arc<Alert>>,
    client: Client<HttpConnector, Body>,
    sent: metrics::Counter,
    failed: metrics::Counter,
) {
    while let Some(alert) = queue.recv().await {
        let mut backoff = FIRST_BACKOFF;
        let mut delivered = false;
        for attempt in 1..=ATTEMPTS {
            if post(&client, &target, &alert.body).await {
                delivered = true;
                break;
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        if delivered {
            sent.increment(1);
        } else {
            failed.increment(1);
            eprintln!(
                "budget-gateway: an alert to {} was not delivered after {ATTEMPTS} tries",
                target.url
            );
        }
    }
}

/// One try: whether the endpoint answered `2xx` in time.
async fn post(
    client: &Client<HttpConnector, Body>,
    target: &AlertTarget,
    body: &bytes::Bytes,
) -> bool {
    let mut request = http::Request::post(target.url.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "budget-gateway");
    for (name, value) in &target.headers {
        request = request.header(name, value);
    }
    let Ok(request) = request.body(Body::from(body.clone())) else {
        return false;
    };
    match tokio::time::timeout(TRY_TIMEOUT, client.request(request)).await {
        Ok(Ok(response)) => response.status().is_success(),
        _ => false,
    }
}
