//! The gateway: routes, the budget layer in front of the proxy, state
//! kept across restarts, and a graceful stop.
//!
//! # How it works
//!
//! One [`BudgetManager`] holds every agent's budget, set from the
//! configuration. The router sends
//!
//! - `GET /v1/budgets` and `GET /v1/budgets/{agent_id}` to the admin view;
//! - `GET /metrics` to the Prometheus exporter;
//! - everything else under `/v1/` through the budget layer to the proxy:
//!   the agent from its bearer key, the estimate from the body (prompt
//!   tokens by the configured tokenizer, plus `max_tokens`), the settle
//!   from the upstream's `usage`.
//!
//! With a state file, the budgets' usage is restored at start (the limits
//! come from the configuration, which wins), saved every
//! `persist_interval_secs`, and saved once more after the server has
//! stopped: on SIGTERM or Ctrl-C it stops accepting connections, lets the
//! requests in flight finish (their bodies end, and settle), saves, and
//! returns.
//!
//! [`Limiter`] swaps the budget layer for nothing or for `tower_governor`:
//! the same proxy three ways, for measuring what the layer costs.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use agent_budget::BudgetManager;
use agent_budget_tower::openai::{EstimateOptions, OpenAiEstimator, OpenAiUsage};
use agent_budget_tower::{bearer_key, BearerKeys, BudgetLayer, HeaderStyle};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::{GovernorError, GovernorLayer};

use crate::admin::{all_budgets, one_budget, Admin};
use crate::config::Config;
use crate::proxy::Proxy;
use crate::tokenizer::Counter;

/// What stands between the client and the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limiter {
    /// The budget layer (the gateway's purpose).
    Budget,
    /// Nothing: a plain proxy, for measurements.
    None,
    /// `tower_governor`, keyed by the bearer key, with a quota too large
    /// to refuse anything: its cost, for measurements.
    Governor,
}

impl std::str::FromStr for Limiter {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "budget" => Ok(Limiter::Budget),
            "none" => Ok(Limiter::None),
            "governor" => Ok(Limiter::Governor),
            other => Err(format!(
                "unknown limiter {other:?}: budget, none or governor"
            )),
        }
    }
}

/// A configured gateway, ready to serve.
pub struct Gateway {
    config: Config,
    budgets: Arc<BudgetManager>,
    proxy: Proxy,
    limiter: Limiter,
    state: Option<PathBuf>,
}

/// Why the gateway could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The upstream URL is unusable.
    #[error(transparent)]
    Upstream(#[from] crate::proxy::BadUpstream),
    /// The state file could not be read or written.
    #[error(transparent)]
    State(#[from] agent_budget::PersistError),
    /// The server failed.
    #[error("the server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// The process's Prometheus recorder, installed on first use. The layer
/// registers its metrics when it is built, so this comes first.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (a host
            // application's); ours then renders nothing, which is all
            // that can be done without replacing theirs.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

impl Gateway {
    /// A gateway for `config` in front of `upstream`, with the budgets in
    /// `budgets` (tests pass a manager on a mock clock). With `state`, the
    /// usage saved there is restored now.
    pub fn new(
        config: Config,
        budgets: Arc<BudgetManager>,
        upstream: &str,
        upstream_timeout: Duration,
        limiter: Limiter,
        state: Option<PathBuf>,
    ) -> Result<Self, GatewayError> {
        let proxy = Proxy::new(
            upstream,
            config.upstream_api_key.as_deref(),
            upstream_timeout,
        )?;
        if let Some(path) = &state {
            budgets.restore(path)?;
        }
        // The configuration decides who has a budget and how large; the
        // state file only brings back usage.
        let configured: std::collections::HashSet<_> =
            config.agents.iter().map(|a| a.limit.agent_id).collect();
        for stale in budgets
            .all_full_info()
            .into_iter()
            .filter(|i| !configured.contains(&i.agent_id))
        {
            budgets.remove_budget(&stale.agent_id);
        }
        for agent in &config.agents {
            budgets.set_budget(agent.limit.clone());
        }
        Counter::new(config.tokenizer).warm_up();
        Ok(Gateway {
            config,
            budgets,
            proxy,
            limiter,
            state,
        })
    }

    /// The budgets the gateway enforces.
    pub fn budgets(&self) -> &Arc<BudgetManager> {
        &self.budgets
    }

    /// The gateway's routes.
    pub fn router(&self) -> Router {
        let metrics = metrics_handle();
        let admin = Admin {
            budgets: self.budgets.clone(),
            admin_key: self.config.admin_key.as_str().into(),
        };
        let router = Router::new()
            .route("/v1/budgets", get(all_budgets))
            .route("/v1/budgets/{agent_id}", get(one_budget))
            .with_state(admin)
            .route(
                "/metrics",
                get(move || std::future::ready(metrics.render())),
            );
        let proxy = self.proxy.clone();
        match self.limiter {
            Limiter::Budget => router.route_service(
                "/v1/{*path}",
                tower::Layer::layer(&self.budget_layer(), proxy),
            ),
            Limiter::None => router.route_service("/v1/{*path}", proxy),
            Limiter::Governor => {
                let config = GovernorConfigBuilder::default()
                    .per_nanosecond(1)
                    .burst_size(u32::MAX)
                    .key_extractor(BearerKeyExtractor)
                    .finish()
                    .expect("a non-zero period and burst");
                router.route_service(
                    "/v1/{*path}",
                    tower::Layer::layer(&GovernorLayer::new(config), proxy),
                )
            }
        }
    }

    fn budget_layer(&self) -> BudgetLayer<BudgetManager, BearerKeys, OpenAiEstimator<Counter>> {
        let c = &self.config;
        let estimator = OpenAiEstimator::new(Counter::new(c.tokenizer)).options(EstimateOptions {
            default_max_tokens: c.default_max_tokens,
            ..EstimateOptions::default()
        });
        let layer = BudgetLayer::new(self.budgets.clone())
            .identify(BearerKeys::new(c.keys()))
            .estimator(estimator)
            .meter(OpenAiUsage::default())
            .headers(HeaderStyle {
                openai: true,
                ietf: c.ietf_headers,
            })
            .agent_labels(c.metrics_labels());
        if c.max_wait_ms > 0 {
            layer.max_wait(Duration::from_millis(c.max_wait_ms))
        } else {
            layer
        }
    }

    /// Serves on `listener` until `shutdown` resolves, then lets requests
    /// in flight finish and saves the state.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GatewayError> {
        let saver = self.state.clone().map(|path| {
            let budgets = self.budgets.clone();
            let every = Duration::from_secs(self.config.persist_interval_secs);
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(every);
                ticks.tick().await;
                loop {
                    ticks.tick().await;
                    if let Err(e) = budgets.persist(&path) {
                        eprintln!("budget-gateway: {e}");
                    }
                }
            })
        });
        let served = axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await;
        if let Some(saver) = saver {
            saver.abort();
        }
        if let Some(path) = &self.state {
            self.budgets.persist(path)?;
        }
        Ok(served?)
    }
}

/// tower_governor's key: the bearer key.
#[derive(Clone, Copy, Debug)]
struct BearerKeyExtractor;

impl KeyExtractor for BearerKeyExtractor {
    type Key = String;

    fn extract<T>(&self, request: &http::Request<T>) -> Result<String, GovernorError> {
        bearer_key(request.headers())
            .map(str::to_owned)
            .ok_or(GovernorError::UnableToExtractKey)
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
