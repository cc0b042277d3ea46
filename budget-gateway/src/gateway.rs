//! The gateway: routes, the budget layer in front of the proxy, state
//! kept across restarts, and a graceful stop.
//!
//! # How it works
//!
//! One [`BudgetManager`] holds every agent's budget, set from the
//! configuration, with the parents it names linked once every budget is
//! set. Or, with [`Gateway::fleet`] (`--redis URL`), a
//! [`FleetManager`] does: every budget is then shared by all the gateways
//! given the same Redis, each request still admitted in-process from this
//! gateway's lease (see `agent_budget_redis::docs::fleet`). The router
//! sends
//!
//! - `/v1/budgets`, `/v1/agents` and their sub-paths, and `/openapi.json`,
//!   to the admin API ([`crate::admin`]);
//! - `GET /metrics` to the Prometheus exporter;
//! - everything else under `/v1/` through the budget layer to the proxy:
//!   the agent from its bearer key (looked up by hash in the
//!   [`KeyTable`], which the file's keys and the
//!   database's fill), the estimate from the body for the
//!   endpoints that consume tokens (prompt tokens by the configured
//!   tokenizer where the budget is tight, else one per byte, plus the most
//!   the completion may use), one call for reads,
//!   the configured policy for anything else; the settle from the
//!   upstream's `usage`.
//!
//! Before routing, every path is normalized ([`crate::paths`]), so routing,
//! the layer and the proxy see the same path.
//!
//! The agents are the [`Catalog`]'s: the file's, and with a database
//! ([`Gateway::with_database`], `--db`) those of the admin API, whose
//! changes it applies as they are made here or on another gateway of the
//! same database.
//!
//! With a state file, the budgets' usage is restored at start (the limits
//! and parents come from the configuration and the database, which win;
//! the usage of every agent, file or API, is kept), saved every
//! `persist_interval_secs`, and saved once more after the server has
//! stopped: on SIGTERM or Ctrl-C it stops accepting connections, lets the
//! requests in flight finish (their bodies end, and settle), saves, and
//! returns. A fleet gateway keeps no state file (usage lives in Redis,
//! which persists it if configured to); once the requests in flight have
//! finished it gives its unused leases back to the fleet
//! ([`FleetManager::shutdown`]).
//!
//! [`Limiter`] swaps the budget layer for nothing or for `tower_governor`:
//! the same proxy three ways, for measuring what the layer costs.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use agent_budget::{AgentId, BudgetManager, HierarchyError};
use agent_budget_redis::{FleetError, FleetManager};
use agent_budget_tower::openai::{EstimateOptions, OpenAiEstimator, OpenAiUsage, PromptCount};
use agent_budget_tower::{bearer_key, Admission, BudgetLayer, HeaderStyle};
use axum::extract::Request;
use axum::routing::get;
use axum::{Router, ServiceExt};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::{GovernorError, GovernorLayer};

use crate::admin::Admin;
use crate::catalog::Catalog;
use crate::config::{Config, Tokenizer};
use crate::db::{Database, DbError, Snapshot};
use crate::keys::KeyTable;
use crate::paths::NormalizePath;
use crate::proxy::Proxy;
use crate::shadow::Shadow;
use crate::tokenizer::Counter;
use crate::watch::Watch;

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

/// Where the gateway's budgets live.
#[derive(Clone, Debug)]
pub enum Budgets {
    /// In this process.
    Local(Arc<BudgetManager>),
    /// Shared by every gateway on the same Redis.
    Fleet(Arc<FleetManager>),
}

/// A configured gateway, ready to serve.
pub struct Gateway {
    config: Config,
    budgets: Budgets,
    catalog: Catalog,
    proxy: Proxy,
    limiter: Limiter,
    state: Option<PathBuf>,
    watch: Watch,
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
    /// An agent could not be put under its parent (the configuration's
    /// checks make this unreachable for a parsed configuration).
    #[error("agent {agent} cannot be put under {parent}: {source}")]
    Parent {
        /// The agent.
        agent: AgentId,
        /// Its parent.
        parent: AgentId,
        /// Why.
        source: HierarchyError,
    },
    /// The configuration asks for what a fleet does not do.
    #[error("{0}")]
    Unsupported(String),
    /// Redis refused or failed an operation on the fleet's budgets.
    #[error("the fleet's budgets in Redis: {0}")]
    Fleet(#[from] FleetError),
    /// The database could not be read.
    #[error(transparent)]
    Database(#[from] DbError),
    /// The file and the database both claim an agent.
    #[error("{0}")]
    Conflict(String),
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
    /// usage saved there is restored now. Its agents are the file's only.
    pub fn new(
        config: Config,
        budgets: Arc<BudgetManager>,
        upstream: &str,
        upstream_timeout: Duration,
        limiter: Limiter,
        state: Option<PathBuf>,
    ) -> Result<Self, GatewayError> {
        Self::local(
            config,
            budgets,
            upstream,
            upstream_timeout,
            limiter,
            state,
            None,
        )
    }

    /// [`new`](Self::new), with the agents and keys of `db` (if any)
    /// beside the file's, managed through the admin API.
    pub async fn with_database(
        config: Config,
        budgets: Arc<BudgetManager>,
        upstream: &str,
        upstream_timeout: Duration,
        limiter: Limiter,
        state: Option<PathBuf>,
        db: Option<Database>,
    ) -> Result<Self, GatewayError> {
        let db = with_snapshot(db).await?;
        Self::local(
            config,
            budgets,
            upstream,
            upstream_timeout,
            limiter,
            state,
            db,
        )
    }

    fn local(
        config: Config,
        budgets: Arc<BudgetManager>,
        upstream: &str,
        upstream_timeout: Duration,
        limiter: Limiter,
        state: Option<PathBuf>,
        db: Option<(Database, Snapshot)>,
    ) -> Result<Self, GatewayError> {
        let proxy = Proxy::new(
            upstream,
            config.upstream_api_key.as_deref(),
            upstream_timeout,
        )?;
        if let Some(path) = &state {
            budgets.restore(path)?;
        }
        // The configuration and the database decide who has a budget and
        // how large; the state file only brings back usage.
        let catalog = Catalog::new(&config, Budgets::Local(budgets.clone()), db)?;
        catalog.install_local(&budgets)?;
        Counter::new(config.tokenizer).warm_up();
        Ok(Gateway {
            watch: Watch::new(&config),
            config,
            budgets: Budgets::Local(budgets),
            catalog,
            proxy,
            limiter,
            state,
        })
    }

    /// A gateway for `config` in front of `upstream` whose budgets are the
    /// fleet's: every configured budget is set in Redis (for every gateway
    /// on it; a budget already there keeps what the fleet used in its
    /// window), and requests are admitted from `fleet`'s leases. Budgets in
    /// a fleet do not nest: a configuration with a `parent` is refused.
    pub async fn fleet(
        config: Config,
        fleet: Arc<FleetManager>,
        upstream: &str,
        upstream_timeout: Duration,
    ) -> Result<Self, GatewayError> {
        Self::fleet_with_database(config, fleet, upstream, upstream_timeout, None).await
    }

    /// [`fleet`](Self::fleet), with the agents and keys of `db` (if any)
    /// beside the file's: gateways sharing a database and a Redis see each
    /// other's agents, keys and budgets.
    pub async fn fleet_with_database(
        config: Config,
        fleet: Arc<FleetManager>,
        upstream: &str,
        upstream_timeout: Duration,
        db: Option<Database>,
    ) -> Result<Self, GatewayError> {
        Self::check_fleet_config(&config)?;
        let db = with_snapshot(db).await?;
        let proxy = Proxy::new(
            upstream,
            config.upstream_api_key.as_deref(),
            upstream_timeout,
        )?;
        let catalog = Catalog::new(&config, Budgets::Fleet(fleet.clone()), db)?;
        catalog.install_fleet(&fleet).await?;
        Counter::new(config.tokenizer).warm_up();
        Ok(Gateway {
            watch: Watch::new(&config),
            config,
            budgets: Budgets::Fleet(fleet),
            catalog,
            proxy,
            limiter: Limiter::Budget,
            state: None,
        })
    }

    /// Refuses a configuration a fleet cannot enforce (budgets with a
    /// `parent`: fleet budgets are flat; buckets: fleet budgets are fixed
    /// windows). [`fleet`](Self::fleet) checks it; callers may check it
    /// first, before connecting to Redis.
    pub fn check_fleet_config(config: &Config) -> Result<(), GatewayError> {
        for agent in &config.agents {
            if agent.parent.is_some() {
                return Err(GatewayError::Unsupported(format!(
                    "agent {} has a parent, and budgets shared through Redis cannot nest: \
                     remove `parent` (and the keyless parents' entries), or run without --redis",
                    agent.agent_id
                )));
            }
            agent
                .limits
                .fleet_window(agent.agent_id)
                .map_err(|e| GatewayError::Unsupported(format!("agent {}: {e}", agent.agent_id)))?;
        }
        Ok(())
    }

    /// The budgets the gateway enforces.
    pub fn budgets(&self) -> &Budgets {
        &self.budgets
    }

    /// Its agents: reload the file or apply the database's changes
    /// through it.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The gateway's routes (which [`serve`](Self::serve) puts behind
    /// path normalization).
    fn router(&self) -> Router {
        let metrics = metrics_handle();
        let admin = Admin {
            budgets: self.budgets.clone(),
            catalog: self.catalog.clone(),
            history: self.watch.history.clone(),
        };
        let router = admin.router().merge(crate::dashboard::router()).route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
        );
        let proxy = self.proxy.clone();
        match self.limiter {
            Limiter::Budget => match &self.budgets {
                Budgets::Local(budgets) => router.route_service(
                    "/v1/{*path}",
                    tower::Layer::layer(&self.budget_layer(budgets.clone()), proxy),
                ),
                Budgets::Fleet(fleet) => router.route_service(
                    "/v1/{*path}",
                    tower::Layer::layer(&self.budget_layer(fleet.clone()), proxy),
                ),
            },
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

    fn budget_layer<M: Admission>(
        &self,
        budgets: Arc<M>,
    ) -> BudgetLayer<Shadow<M>, KeyTable, OpenAiEstimator<Counter>> {
        let c = &self.config;
        let estimator = OpenAiEstimator::new(Counter::new(c.tokenizer))
            .options(EstimateOptions {
                default_max_tokens: c.default_max_tokens,
                ..EstimateOptions::default()
            })
            .other_requests(c.other_endpoints)
            .prompt_count(match c.tokenizer {
                // Its count is the bound: nothing to defer.
                Tokenizer::Bytes => PromptCount::Always,
                _ => c.count_prompts,
            });
        let budgets = Shadow::new(budgets, self.catalog.clone(), self.watch.clone());
        let layer = BudgetLayer::new(Arc::new(budgets))
            .identify(self.catalog.keys().clone())
            .estimator(estimator)
            .meter(OpenAiUsage::default())
            .headers(HeaderStyle {
                openai: true,
                ietf: c.ietf_headers,
            })
            .agent_labels(self.catalog.metrics_labels())
            .observe(self.watch.observer());
        if c.max_wait_ms > 0 {
            layer.max_wait(Duration::from_millis(c.max_wait_ms))
        } else {
            layer
        }
    }

    /// Serves on `listener` until `shutdown` resolves, then lets requests
    /// in flight finish and saves the state (or, in a fleet, gives the
    /// unused leases back).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GatewayError> {
        let local = match &self.budgets {
            Budgets::Local(budgets) => Some(budgets.clone()),
            Budgets::Fleet(_) => None,
        };
        let saver = self
            .state
            .clone()
            .zip(local.clone())
            .map(|(path, budgets)| {
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
        let mut watchers = self.catalog.spawn_watchers();
        watchers.extend(self.watch.spawn(&self.catalog, &self.budgets));
        let app = NormalizePath::new(self.router());
        let served = axum::serve(listener, ServiceExt::<Request>::into_make_service(app))
            .with_graceful_shutdown(shutdown)
            .await;
        if let Some(saver) = saver {
            saver.abort();
        }
        for watcher in watchers {
            watcher.abort();
        }
        self.catalog.record_key_use().await;
        if let Some(db) = self.catalog.database() {
            db.close().await;
        }
        if let Some((path, budgets)) = self.state.as_ref().zip(local) {
            budgets.persist(path)?;
        }
        if let Budgets::Fleet(fleet) = &self.budgets {
            fleet.shutdown().await?;
        }
        Ok(served?)
    }
}

/// The database, if any, with what it holds now.
async fn with_snapshot(db: Option<Database>) -> Result<Option<(Database, Snapshot)>, DbError> {
    match db {
        Some(db) => {
            let snapshot = db.snapshot().await?;
            Ok(Some((db, snapshot)))
        }
        None => Ok(None),
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
