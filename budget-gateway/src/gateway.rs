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
//! `persist_interval_secs` (with a [`Journal`] of every admission and
//! settle in between, so that a crash loses at most 50 ms of usage), and
//! saved once more after the server has stopped: on SIGTERM or Ctrl-C it
//! stops accepting connections, lets the requests in flight finish (their
//! bodies end, and settle) for up to the [`ServerLimits`]'
//! `shutdown_timeout`, cancels (and so settles) those left, saves, and
//! returns. The server and what it bounds (the request head's and body's
//! deadlines, the connections) are [`crate::server`]'s. A fleet gateway keeps no state file (usage lives in Redis,
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
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::{GovernorError, GovernorLayer};

use crate::admin::Admin;
use crate::admission::LimitAdmission;
use crate::catalog::Catalog;
use crate::config::{Config, Tokenizer};
use crate::db::{Database, DbError, Snapshot};
use crate::journal::Journal;
use crate::keys::KeyTable;
use crate::paths::NormalizePath;
use crate::proxy::Proxy;
use crate::server::ServerLimits;
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
    journal: Option<Journal>,
    server: ServerLimits,
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
        // What was admitted since the snapshot, from the journal beside it.
        let journal = match &state {
            Some(path) => {
                let windowed: std::collections::HashSet<AgentId> = config
                    .agents
                    .iter()
                    .filter(|a| a.limits.fleet_window(a.agent_id).is_ok())
                    .map(|a| a.agent_id)
                    .collect();
                Some(Journal::open(path, &budgets, &|id| windowed.contains(id))?)
            }
            None => None,
        };
        Counter::new(config.tokenizer).warm_up();
        Ok(Gateway {
            watch: Watch::new(&config),
            config,
            budgets: Budgets::Local(budgets),
            catalog,
            proxy,
            limiter,
            state,
            journal,
            server: ServerLimits::default(),
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
            journal: None,
            server: ServerLimits::default(),
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

    /// Serves under `limits` (connections, timeouts, the stop's deadline)
    /// instead of [`ServerLimits::default`].
    pub fn server_limits(mut self, limits: ServerLimits) -> Self {
        self.server = limits;
        self
    }

    /// Cuts off an upstream response that sends nothing for `idle` (300 s
    /// unless set): the layer settles it as a hang-up.
    pub fn upstream_idle_timeout(mut self, idle: Duration) -> Self {
        self.proxy = self.proxy.idle_timeout(idle);
        self
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

    /// The operator's routes: the admin API and `/metrics`.
    fn admin_router(&self) -> Router {
        let metrics = metrics_handle();
        let admin = Admin {
            budgets: self.budgets.clone(),
            catalog: self.catalog.clone(),
            history: self.watch.history.clone(),
        };
        admin.router().merge(crate::dashboard::router()).route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
        )
    }

    /// The gateway's routes (which [`serve`](Self::serve) puts behind
    /// path normalization): the proxy's, and the operator's unless they
    /// are served on their own address (`separate_admin`), in which case
    /// their paths are `404` here rather than forwarded.
    fn router(&self, separate_admin: bool) -> Router {
        let router = if separate_admin {
            self.admin_router().route_layer(axum::middleware::from_fn(
                |_: Request, _: axum::middleware::Next| {
                    std::future::ready(
                        agent_budget_tower::Rejection::not_found(
                            "the admin API and /metrics are served on the admin address",
                        )
                        .into_response::<axum::body::Body>(),
                    )
                },
            ))
        } else {
            self.admin_router()
        };
        let proxy = self.proxy.clone();
        match self.limiter {
            Limiter::Budget => match &self.budgets {
                Budgets::Local(budgets) => {
                    let admission = LimitAdmission::new(
                        budgets.clone(),
                        self.catalog.plans().clone(),
                        self.catalog.prices().clone(),
                    );
                    router.route_service(
                        "/v1/{*path}",
                        tower::Layer::layer(&self.budget_layer(Arc::new(admission)), proxy),
                    )
                }
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
        let layer = match &self.journal {
            Some(journal) => layer.usage_log(journal.log()),
            None => layer,
        };
        if c.max_wait_ms > 0 {
            layer.max_wait(Duration::from_millis(c.max_wait_ms))
        } else {
            layer
        }
    }

    /// Serves on `listener` until `shutdown` resolves, then lets requests
    /// in flight finish (cancelling those left at the limits'
    /// `shutdown_timeout`) and saves the state (or, in a fleet, gives the
    /// unused leases back).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GatewayError> {
        self.serve_with_admin(listener, None, shutdown).await
    }

    /// [`serve`](Self::serve), with the admin API and `/metrics` on
    /// `admin` instead of `listener` when it is given.
    pub async fn serve_with_admin(
        self,
        listener: tokio::net::TcpListener,
        admin: Option<tokio::net::TcpListener>,
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
                let journal = self.journal.clone();
                tokio::spawn(async move {
                    let mut ticks = tokio::time::interval(every);
                    ticks.tick().await;
                    loop {
                        ticks.tick().await;
                        let (path, budgets, journal) =
                            (path.clone(), budgets.clone(), journal.clone());
                        let saved = tokio::task::spawn_blocking(move || {
                            save(&path, &budgets, journal.as_ref())
                        })
                        .await;
                        if let Ok(Err(e)) = saved {
                            eprintln!("budget-gateway: {e}");
                        }
                    }
                })
            });
        let mut watchers = self.catalog.spawn_watchers();
        watchers.extend(self.watch.spawn(&self.catalog, &self.budgets));
        let app = NormalizePath::new(self.router(admin.is_some()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop.send(true);
        });
        let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        let admin_served = admin.map(|admin| {
            let app = NormalizePath::new(self.admin_router());
            // The operator's few connections are not the clients' to crowd.
            let limits = ServerLimits {
                max_connections: 64,
                ..self.server
            };
            tokio::spawn(crate::server::serve(
                admin,
                app,
                limits,
                until_stopped(stopped.clone()),
            ))
        });
        let served = crate::server::serve(listener, app, self.server, until_stopped(stopped)).await;
        if let Some(admin_served) = admin_served {
            let _ = admin_served.await;
        }
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
            save(path, &budgets, self.journal.as_ref())?;
        }
        if let Budgets::Fleet(fleet) = &self.budgets {
            fleet.shutdown().await?;
        }
        Ok(served?)
    }
}

/// Saves the usage to the state file (through the journal, which then
/// starts afresh, if there is one).
fn save(
    path: &std::path::Path,
    budgets: &BudgetManager,
    journal: Option<&Journal>,
) -> Result<(), agent_budget::PersistError> {
    match journal {
        Some(journal) => journal.snapshot(budgets),
        None => budgets.persist(path),
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
