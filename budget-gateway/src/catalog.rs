//! Who the agents are, where each comes from, and how a change reaches the
//! budgets and the key table.
//!
//! # How it works
//!
//! Agents come from two places: the configuration file (`[[agents]]`) and
//! the database, through the admin API. The [`Catalog`] holds both, apart:
//!
//! - **File agents are the file's.** The admin API shows them, and refuses
//!   to change or delete them, or to give them keys (`409`): their keys
//!   are the file's `api_key`. SIGHUP re-reads the file ([`Catalog::reload`]).
//! - **API agents are the database's.** The file cannot name one: an id
//!   both claim is refused wherever it shows up, by the API (`409`), at
//!   start, and at a reload (the file is refused, the running
//!   configuration stays), so neither can silently undo the other. Only
//!   if two gateways of a fleet have different files can a database agent
//!   meet a file agent of the same id on one of them; that gateway keeps
//!   its file's and says so on stderr.
//! - **Parents stay on their side**: a file agent's parent is in the file
//!   (as before), an API agent's parent is an API agent, so a reload never
//!   detaches API agents and the API never changes a file budget.
//!
//! Every change to API agents and keys is a database transaction
//! ([`crate::db`]) stamped with the next revision; the catalog remembers
//! the revision it has applied. A change made here is checked inside its
//! transaction (the parent exists, no loop, the chain not too deep, the id
//! free), committed, and then read back with everything else committed
//! since the last revision applied ([`Catalog::sync`]; or, when nothing
//! else was, applied as written without the read), so a gateway's own
//! changes and those of the other gateways on the same database go
//! through one path, in revision order. A background task does the same
//! every 250 ms: what another gateway changed is enforced here within
//! that, plus a query. One async lock serializes all of this (changes,
//! polls, reloads); the request path never takes it.
//!
//! Applying a change sets the core's budgets (in-process: `set_budget`
//! keeps the agent's usage; in a fleet, the gateway that made the change
//! wrote it to Redis before committing, and the other gateways pick it up
//! from Redis) and the [`KeyTable`] (a key is inserted or removed; the
//! request path reads the table without a lock). A revoked key or a
//! deleted agent's keys leave the table before the API answers, so the
//! next request with them is refused.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use agent_budget::{AgentId, BudgetManager, MAX_LEVELS};
use agent_budget_redis::FleetManager;
use arc_swap::ArcSwap;
use tokio::task::JoinHandle;

use crate::admission::{build_plans, Plans, Prices};
use crate::config::Config;
use crate::db::{now_ms, AgentRow, Change, Database, DbError, KeyRow, Snapshot};
use crate::gateway::{Budgets, GatewayError};
use crate::keys::{self, constant_time_eq, KeyHash, KeyId, KeyTable};
use crate::limits::{LegacyFields, LimitError, LimitSpec, Limits};

/// How often a gateway with a database looks for changes made elsewhere.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// How often the keys' last use is written to the database.
pub const LAST_USED_INTERVAL: Duration = Duration::from_secs(5);

/// What an agent is configured with, wherever it comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentSettings {
    /// Its limits.
    pub limits: Limits,
    /// The agent whose budget it also spends from.
    pub parent: Option<AgentId>,
    /// Its `agent` label on the metrics.
    pub metrics_label: Option<String>,
    /// `false` in shadow mode: its own budget refuses nothing ([`crate::shadow`]).
    pub enforce: bool,
}

/// Where an agent comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The configuration file: read-only through the API.
    File,
    /// The database, through the admin API.
    Api,
}

/// One agent, as the admin API shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentEntry {
    /// Its id.
    pub agent_id: AgentId,
    /// Where it comes from.
    pub source: Source,
    /// Its configuration.
    pub settings: AgentSettings,
    /// When it was created (ms since the epoch; API agents only).
    pub created_at: Option<i64>,
    /// When it was last changed (API agents only).
    pub updated_at: Option<i64>,
}

/// Why a change through the admin API was not made. Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// The request asks for something that cannot be (`422`).
    #[error("{message}")]
    Invalid {
        /// The field to blame, if one is.
        field: Option<String>,
        /// Why.
        message: String,
    },
    /// The request conflicts with what exists (`409`).
    #[error("{0}")]
    Conflict(String),
    /// No such agent or key (`404`).
    #[error("{0}")]
    NotFound(String),
    /// The database or Redis failed (`503`).
    #[error("{0}")]
    Unavailable(String),
}

fn invalid(field: &str, message: impl Into<String>) -> ChangeError {
    ChangeError::Invalid {
        field: Some(field.to_owned()),
        message: message.into(),
    }
}

impl From<LimitError> for ChangeError {
    fn from(e: LimitError) -> Self {
        ChangeError::Invalid {
            field: e.field,
            message: e.message,
        }
    }
}

impl From<DbError> for ChangeError {
    fn from(e: DbError) -> Self {
        ChangeError::Unavailable(e.to_string())
    }
}

/// What a reload changed, and what it could not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Agents the file added.
    pub added: usize,
    /// Agents the file no longer has.
    pub removed: usize,
    /// Agents whose limits, parent or key changed.
    pub changed: usize,
    /// Settings that changed but apply only at the next start.
    pub at_restart: Vec<String>,
}

/// A file agent: its settings and its key's hash.
#[derive(Clone, Debug, PartialEq)]
struct FileAgent {
    settings: AgentSettings,
    key: Option<KeyHash>,
}

/// An API agent: its settings and its times.
#[derive(Clone, Debug, PartialEq)]
struct ApiAgent {
    settings: AgentSettings,
    created_at: i64,
    updated_at: i64,
}

/// What the catalog knows; what the admin API reads.
#[derive(Default)]
struct View {
    file: BTreeMap<AgentId, FileAgent>,
    api: BTreeMap<AgentId, ApiAgent>,
    /// The API keys in use: their agents and hashes.
    api_keys: HashMap<KeyId, (AgentId, KeyHash)>,
    /// The file as last applied (for what a reload cannot change).
    config: Option<Config>,
}

impl View {
    /// An agent's settings, from the file or the database.
    fn settings(&self, agent_id: &AgentId) -> Option<&AgentSettings> {
        self.file
            .get(agent_id)
            .map(|a| &a.settings)
            .or_else(|| self.api.get(agent_id).map(|a| &a.settings))
    }
}

struct Inner {
    budgets: Budgets,
    keys: KeyTable,
    db: Option<Database>,
    admin_key: ArcSwap<String>,
    view: RwLock<View>,
    /// Held by whoever changes the view; the revision applied.
    writer: tokio::sync::Mutex<i64>,
    /// Whether the last poll failed (to report failures once).
    poll_failing: AtomicBool,
    /// What each agent's requests claim, rebuilt whenever limits or
    /// parents change (see [`crate::admission`]).
    plans: Plans,
    /// The file's `[[models]]` prices, replaced by a reload.
    prices: Prices,
}

/// The agents of the file and of the database, and the machinery that
/// applies their changes. Clones share it.
#[derive(Clone)]
pub struct Catalog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let view = self.view();
        f.debug_struct("Catalog")
            .field("file_agents", &view.file.len())
            .field("api_agents", &view.api.len())
            .field("db", &self.inner.db)
            .finish_non_exhaustive()
    }
}

impl AgentSettings {
    /// Settings read from the admin API or a database row: the limits in
    /// either form, checked.
    pub fn new(
        limits: Option<&[LimitSpec]>,
        legacy: LegacyFields,
        parent: Option<AgentId>,
        metrics_label: Option<String>,
    ) -> Result<Self, ChangeError> {
        let limits = Limits::from_fields(limits, legacy)?;
        Ok(AgentSettings {
            limits,
            parent,
            metrics_label,
            enforce: true,
        })
    }

    /// The same settings, enforced or in shadow mode.
    pub fn with_enforce(self, enforce: bool) -> Self {
        AgentSettings { enforce, ..self }
    }

    fn of_row(row: &AgentRow) -> Result<Self, String> {
        let specs: Vec<LimitSpec> = serde_json::from_str(&row.limits)
            .map_err(|e| format!("its limits cannot be read ({e}): {}", row.limits))?;
        Self::new(
            Some(&specs),
            LegacyFields::default(),
            row.parent,
            row.metrics_label.clone(),
        )
        .map(|settings| settings.with_enforce(row.enforce))
        .map_err(|e| format!("its limits cannot be enforced: {e}"))
    }
}

fn file_agents(config: &Config) -> BTreeMap<AgentId, FileAgent> {
    config
        .agents
        .iter()
        .map(|a| {
            let agent = FileAgent {
                settings: AgentSettings {
                    limits: a.limits.clone(),
                    parent: a.parent,
                    metrics_label: a.metrics_label.clone(),
                    enforce: a.enforce,
                },
                key: a.api_key.as_deref().map(KeyHash::of),
            };
            (a.agent_id, agent)
        })
        .collect()
}

impl Catalog {
    /// The agents of `config`, with their budgets in `budgets`, and those
    /// of `db` as of `snapshot`. Nothing is applied to the budgets or the
    /// keys yet: [`install_local`](Self::install_local) or
    /// [`install_fleet`](Self::install_fleet) does. Fails if the file names
    /// an agent of the database.
    pub fn new(
        config: &Config,
        budgets: Budgets,
        db: Option<(Database, Snapshot)>,
    ) -> Result<Self, GatewayError> {
        let mut view = View {
            file: file_agents(config),
            config: Some(config.clone()),
            ..View::default()
        };
        let (db, revision) = match db {
            Some((db, snapshot)) => {
                for row in &snapshot.agents {
                    if view.file.contains_key(&row.agent_id) {
                        return Err(GatewayError::Conflict(collision(row.agent_id, db.shown())));
                    }
                }
                let revision = snapshot.revision;
                apply_rows(&mut view, &snapshot, None);
                (Some(db), revision)
            }
            None => (None, 0),
        };
        Ok(Catalog {
            inner: Arc::new(Inner {
                budgets,
                keys: KeyTable::default(),
                db,
                admin_key: ArcSwap::from_pointee(config.admin_key.clone()),
                view: RwLock::new(view),
                writer: tokio::sync::Mutex::new(revision),
                poll_failing: AtomicBool::new(false),
                plans: Plans::default(),
                prices: Prices::new(ArcSwap::from_pointee(config.prices.clone())),
            }),
        })
    }

    fn view(&self) -> RwLockReadGuard<'_, View> {
        // Nothing panics while the view is held; a poisoned lock is
        // taken over.
        self.inner
            .view
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn view_mut(&self) -> RwLockWriteGuard<'_, View> {
        self.inner
            .view
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What each agent's requests claim, for the admission.
    pub fn plans(&self) -> &Plans {
        &self.inner.plans
    }

    /// The `[[models]]` prices, for the admission (a reload replaces them).
    pub fn prices(&self) -> &Prices {
        &self.inner.prices
    }

    /// Lays out every agent's plan from `view` (after any change to
    /// limits or parents).
    fn rebuild_plans(&self, view: &View) {
        let all = view
            .file
            .iter()
            .map(|(id, a)| (*id, &a.settings))
            .chain(view.api.iter().map(|(id, a)| (*id, &a.settings)))
            .map(|(id, s)| (id, &s.limits, s.parent));
        self.inner.plans.store(Arc::new(build_plans(all)));
    }

    /// The key table the budget layer identifies agents with.
    pub fn keys(&self) -> &KeyTable {
        &self.inner.keys
    }

    /// The database, if the gateway keeps one.
    pub fn database(&self) -> Option<&Database> {
        self.inner.db.as_ref()
    }

    /// Whether `key` is the admin key (compared in constant time).
    pub fn is_admin_key(&self, key: &str) -> bool {
        constant_time_eq(key.as_bytes(), self.inner.admin_key.load().as_bytes())
    }

    /// Sets every agent's budget in `budgets`, which a state file may have
    /// filled: budgets of agents no longer configured are removed, every
    /// agent's limit is set (keeping its usage), and parents are linked as
    /// configured. Then accepts every agent's keys.
    pub fn install_local(&self, budgets: &BudgetManager) -> Result<(), GatewayError> {
        let view = self.view();
        let all: Vec<(AgentId, &AgentSettings)> = view
            .file
            .iter()
            .map(|(id, a)| (*id, &a.settings))
            .chain(view.api.iter().map(|(id, a)| (*id, &a.settings)))
            .collect();
        // The agents' own budgets and their limits' other cells.
        let configured: HashSet<AgentId> = all
            .iter()
            .flat_map(|(id, settings)| settings.limits.core_ids(*id))
            .collect();
        for stale in budgets
            .all_full_info()
            .into_iter()
            .filter(|i| !configured.contains(&i.agent_id))
        {
            budgets.remove_budget(&stale.agent_id);
        }
        for (id, settings) in &all {
            settings.limits.apply(*id, budgets);
        }
        // Parents once every budget exists; detached first, so links a
        // state file brought back (or an order of linking) cannot close a
        // loop with the configuration's.
        for (id, _) in &all {
            let _ = budgets.set_parent(id, None);
        }
        for (id, settings) in &all {
            if let Some(parent) = &settings.parent {
                budgets
                    .set_parent(id, Some(parent))
                    .map_err(|source| GatewayError::Parent {
                        agent: *id,
                        parent: *parent,
                        source,
                    })?;
            }
        }
        self.rebuild_plans(&view);
        self.accept_all_keys(&view);
        Ok(())
    }

    /// Sets every agent's budget in the fleet's Redis (a budget already
    /// there keeps what the fleet used in its window), then accepts every
    /// agent's keys. Budgets in a fleet are flat fixed windows: an agent
    /// with a parent or a bucket is refused.
    pub async fn install_fleet(&self, fleet: &FleetManager) -> Result<(), GatewayError> {
        let limits = {
            let view = self.view();
            let mut limits = Vec::with_capacity(view.file.len() + view.api.len());
            let all = view
                .file
                .iter()
                .map(|(id, a)| (id, &a.settings))
                .chain(view.api.iter().map(|(id, a)| (id, &a.settings)));
            for (id, settings) in all {
                limits.push(
                    fleet_limit(*id, settings)
                        .map_err(|e| GatewayError::Unsupported(format!("agent {id}: {e}")))?,
                );
            }
            limits
        };
        for limit in limits {
            fleet.set_budget(limit).await?;
        }
        self.accept_all_keys(&self.view());
        Ok(())
    }

    fn accept_all_keys(&self, view: &View) {
        for (id, agent) in &view.file {
            if let Some(hash) = agent.key {
                self.inner.keys.insert(hash, *id, None);
            }
        }
        for (key_id, (agent, hash)) in &view.api_keys {
            self.inner.keys.insert(*hash, *agent, Some(*key_id));
        }
    }

    /// The budget manager changes are applied to, if budgets are local.
    fn local(&self) -> Option<&BudgetManager> {
        match &self.inner.budgets {
            Budgets::Local(budgets) => Some(budgets),
            Budgets::Fleet(_) => None,
        }
    }

    /// Every agent, by id.
    pub fn agents(&self) -> Vec<AgentEntry> {
        let view = self.view();
        let mut all: Vec<AgentEntry> = view
            .file
            .iter()
            .map(|(id, a)| file_entry(*id, a))
            .chain(view.api.iter().map(|(id, a)| api_entry(*id, a)))
            .collect();
        all.sort_unstable_by_key(|a| a.agent_id);
        all
    }

    /// One agent.
    pub fn agent(&self, agent_id: &AgentId) -> Option<AgentEntry> {
        let view = self.view();
        view.file
            .get(agent_id)
            .map(|a| file_entry(*agent_id, a))
            .or_else(|| view.api.get(agent_id).map(|a| api_entry(*agent_id, a)))
    }

    /// Every agent's id.
    pub fn agent_ids(&self) -> Vec<AgentId> {
        let view = self.view();
        view.file.keys().chain(view.api.keys()).copied().collect()
    }

    /// Whether `agent_id`'s own budget refuses requests: `false` for an
    /// agent in shadow mode (an unknown agent is enforced).
    pub fn enforces(&self, agent_id: &AgentId) -> bool {
        self.view().settings(agent_id).is_none_or(|s| s.enforce)
    }

    /// The agent's parent, if it has one.
    pub fn parent_of(&self, agent_id: &AgentId) -> Option<AgentId> {
        self.view().settings(agent_id).and_then(|s| s.parent)
    }

    /// The agent's `agent` label on the metrics, if it has one.
    pub fn metrics_label(&self, agent_id: &AgentId) -> Option<String> {
        self.view()
            .settings(agent_id)
            .and_then(|s| s.metrics_label.clone())
    }

    /// Whether the agent or one of its ancestors is in shadow mode: only
    /// then may a refusal of its requests be one to let through.
    pub fn shadow_in_chain(&self, agent_id: &AgentId) -> bool {
        let view = self.view();
        let settings = |id: &AgentId| view.settings(id);
        let mut level = Some(*agent_id);
        // Bounded by the configuration's checks (no loops, at most
        // MAX_LEVELS levels); the bound guards against a bug there.
        for _ in 0..agent_budget::MAX_LEVELS {
            let Some(settings) = level.as_ref().and_then(settings) else {
                return false;
            };
            if !settings.enforce {
                return true;
            }
            level = settings.parent;
        }
        false
    }

    /// The agents' `agent` labels on the metrics, as of now (the layer
    /// takes them when it is built).
    pub fn metrics_labels(&self) -> HashMap<AgentId, String> {
        let view = self.view();
        view.file
            .iter()
            .map(|(id, a)| (id, &a.settings))
            .chain(view.api.iter().map(|(id, a)| (id, &a.settings)))
            .filter_map(|(id, s)| Some((*id, s.metrics_label.clone()?)))
            .collect()
    }

    /// Applies what changed in the database since the revision applied
    /// last; `true` if anything did.
    pub async fn sync(&self) -> Result<bool, DbError> {
        let Some(db) = &self.inner.db else {
            return Ok(false);
        };
        let mut applied = self.inner.writer.lock().await;
        self.sync_locked(db, &mut applied).await
    }

    async fn sync_locked(&self, db: &Database, applied: &mut i64) -> Result<bool, DbError> {
        let Some(changes) = db.changes(*applied).await? else {
            return Ok(false);
        };
        {
            let mut view = self.view_mut();
            apply_rows(&mut view, &changes, Some(self));
        }
        *applied = changes.revision;
        Ok(true)
    }

    /// After a change committed here: applies it and whatever else
    /// committed before it. If nothing else did (the revision applied is
    /// the one before this change's) and the change knows the rows it
    /// wrote, they are applied as written, saving the read back (half of
    /// a creation's round trips to the database); otherwise they are read
    /// back, and a failure to read is reported and left to the next poll.
    async fn after_commit(&self, db: &Database, applied: &mut i64, written: Option<Snapshot>) {
        match written {
            Some(rows) if rows.revision == *applied + 1 => {
                apply_rows(&mut self.view_mut(), &rows, Some(self));
                *applied = rows.revision;
            }
            _ => {
                if let Err(e) = self.sync_locked(db, applied).await {
                    eprintln!("budget-gateway: a change was saved but not read back yet: {e}");
                }
            }
        }
    }

    /// Checks for changes every [`POLL_INTERVAL`], and writes the keys'
    /// last use every [`LAST_USED_INTERVAL`], until aborted. Without a
    /// database, nothing to do.
    pub fn spawn_watchers(&self) -> Vec<JoinHandle<()>> {
        if self.inner.db.is_none() {
            return Vec::new();
        }
        let poller = self.clone();
        let recorder = self.clone();
        vec![
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(POLL_INTERVAL);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    poller.poll_once().await;
                }
            }),
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(LAST_USED_INTERVAL);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticks.tick().await;
                loop {
                    ticks.tick().await;
                    recorder.record_key_use().await;
                }
            }),
        ]
    }

    async fn poll_once(&self) {
        let failing = &self.inner.poll_failing;
        match self.sync().await {
            Ok(_) => {
                if failing.swap(false, Ordering::Relaxed) {
                    eprintln!("budget-gateway: the database answers again");
                }
            }
            Err(e) => {
                if !failing.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "budget-gateway: cannot read changes ({e}); retrying every {} ms",
                        POLL_INTERVAL.as_millis()
                    );
                }
            }
        }
    }

    /// Writes to the database which keys were used since the last call.
    pub async fn record_key_use(&self) {
        let Some(db) = &self.inner.db else { return };
        let used = self.inner.keys.take_used();
        if used.is_empty() {
            return;
        }
        if let Err(e) = db.mark_used(&used, now_ms()).await {
            eprintln!(
                "budget-gateway: cannot record the last use of {} keys: {e}",
                used.len()
            );
        }
    }

    fn db(&self) -> Result<&Database, ChangeError> {
        self.inner.db.as_ref().ok_or_else(|| {
            ChangeError::Conflict(
                "this gateway keeps no database, so its agents are the configuration file's: \
                 start it with --db FILE (SQLite) or --db postgres://… to manage agents and \
                 keys through the API"
                    .to_owned(),
            )
        })
    }

    fn refuse_file_agent(&self, agent_id: &AgentId, what: &str) -> Result<(), ChangeError> {
        if self.view().file.contains_key(agent_id) {
            return Err(ChangeError::Conflict(format!(
                "agent {agent_id} is configured in the file and is read-only through the API \
                 ({what}): change the file and send the gateway SIGHUP"
            )));
        }
        Ok(())
    }

    /// What a fleet cannot share is refused before anything is written.
    fn check_fleet(&self, agent_id: AgentId, settings: &AgentSettings) -> Result<(), ChangeError> {
        if let Budgets::Fleet(_) = self.inner.budgets {
            fleet_limit(agent_id, settings)?;
        }
        Ok(())
    }

    /// Creates an API agent, with `agent_id` or a new id.
    pub async fn create_agent(
        &self,
        agent_id: Option<AgentId>,
        settings: AgentSettings,
    ) -> Result<AgentEntry, ChangeError> {
        let db = self.db()?;
        let agent_id = agent_id.unwrap_or_else(uuid::Uuid::new_v4);
        self.check_fleet(agent_id, &settings)?;
        let mut applied = self.inner.writer.lock().await;
        if self.view().file.contains_key(&agent_id) {
            return Err(ChangeError::Conflict(format!(
                "agent {agent_id} is configured in the file: an API agent cannot take its id"
            )));
        }
        let mut change = db.change().await?;
        if change.agent(&agent_id).await?.is_some() {
            return Err(ChangeError::Conflict(format!(
                "agent {agent_id} exists already: PUT /v1/agents/{agent_id} changes it"
            )));
        }
        if let Some(parent) = settings.parent {
            self.check_parent(&mut change, agent_id, parent, 1).await?;
        }
        self.save_agent(db, change, &mut applied, agent_id, settings, None)
            .await
    }

    /// Replaces an API agent's limits, parent and label; its usage in the
    /// current window is kept.
    pub async fn update_agent(
        &self,
        agent_id: AgentId,
        settings: AgentSettings,
    ) -> Result<AgentEntry, ChangeError> {
        let db = self.db()?;
        self.check_fleet(agent_id, &settings)?;
        let mut applied = self.inner.writer.lock().await;
        self.refuse_file_agent(&agent_id, "it cannot be changed")?;
        let mut change = db.change().await?;
        let Some(before) = change.agent(&agent_id).await? else {
            return Err(not_found(agent_id));
        };
        if let Some(parent) = settings.parent.filter(|p| Some(*p) != before.parent) {
            let below = change.depth_below(&agent_id, MAX_LEVELS as i64 + 1).await?;
            let levels = usize::try_from(below)
                .unwrap_or(usize::MAX)
                .saturating_add(1);
            self.check_parent(&mut change, agent_id, parent, levels)
                .await?;
        }
        self.save_agent(
            db,
            change,
            &mut applied,
            agent_id,
            settings,
            Some(before.created_at),
        )
        .await
    }

    /// Writes a checked agent: in a fleet, its budget to Redis first (if
    /// Redis fails, nothing is saved); then its row, committed and applied.
    /// `created_at` is an existing agent's.
    async fn save_agent(
        &self,
        db: &Database,
        mut change: Change<'_>,
        applied: &mut i64,
        agent_id: AgentId,
        settings: AgentSettings,
        created_at: Option<i64>,
    ) -> Result<AgentEntry, ChangeError> {
        if let Budgets::Fleet(fleet) = &self.inner.budgets {
            let limit = fleet_limit(agent_id, &settings)?;
            fleet
                .set_budget(limit)
                .await
                .map_err(|e| ChangeError::Unavailable(format!("the fleet's Redis: {e}")))?;
        }
        let now = now_ms();
        let created_at = created_at.unwrap_or(now);
        let row = AgentRow {
            enforce: settings.enforce,
            ..AgentRow::new(
                agent_id,
                settings.parent,
                settings.metrics_label.clone(),
                settings.limits.specs(),
                created_at,
                now,
            )
        };
        change.put_agent(&row).await?;
        let written = change.commit().await?;
        self.after_commit(db, applied, written).await;
        Ok(AgentEntry {
            agent_id,
            source: Source::Api,
            settings,
            created_at: Some(created_at),
            updated_at: Some(now),
        })
    }

    /// Checks that `child`, with `levels` levels from itself down to its
    /// deepest descendant, may go under `parent`: the parent is an API
    /// agent, not the child or one of its descendants, and the chain stays
    /// within [`MAX_LEVELS`]. Read inside the change, so no concurrent
    /// change can make it wrong.
    async fn check_parent(
        &self,
        change: &mut Change<'_>,
        child: AgentId,
        parent: AgentId,
        levels: usize,
    ) -> Result<(), ChangeError> {
        if parent == child {
            return Err(invalid(
                "parent",
                format!("agent {child} cannot be its own parent"),
            ));
        }
        if self.view().file.contains_key(&parent) {
            return Err(invalid(
                "parent",
                format!(
                    "{parent} is an agent of the configuration file: an API agent's parent \
                     must be an API agent"
                ),
            ));
        }
        let mut chain = vec![child];
        let mut at = Some(parent);
        while let Some(id) = at {
            if id == child {
                chain.push(child);
                let names: Vec<String> = chain.iter().map(AgentId::to_string).collect();
                return Err(invalid(
                    "parent",
                    format!(
                        "agent {child}'s parents would loop back to it: {}",
                        names.join(" -> ")
                    ),
                ));
            }
            let Some(row) = change.agent(&id).await? else {
                return Err(invalid(
                    "parent",
                    if id == parent {
                        format!("parent {parent} is not an agent")
                    } else {
                        format!("parent {parent}'s ancestor {id} is not an agent")
                    },
                ));
            };
            chain.push(id);
            if chain.len() > MAX_LEVELS + 1 {
                break;
            }
            at = row.parent;
        }
        let total = (chain.len() - 1).saturating_add(levels);
        if total > MAX_LEVELS {
            return Err(invalid(
                "parent",
                format!(
                    "agent {child}'s chain of budgets would have {total} levels (itself, its \
                     descendants and its ancestors); at most {MAX_LEVELS} are allowed"
                ),
            ));
        }
        Ok(())
    }

    /// Deletes an API agent: its budget and keys are gone at once.
    pub async fn delete_agent(&self, agent_id: AgentId) -> Result<(), ChangeError> {
        let db = self.db()?;
        let mut applied = self.inner.writer.lock().await;
        self.refuse_file_agent(&agent_id, "it cannot be deleted")?;
        let mut change = db.change().await?;
        if change.agent(&agent_id).await?.is_none() {
            return Err(not_found(agent_id));
        }
        let children = change.children(&agent_id, 5).await?;
        if !children.is_empty() {
            return Err(ChangeError::Conflict(format!(
                "agent {agent_id} is the parent of {}: delete those agents or give them \
                 another parent first",
                children.join(", ")
            )));
        }
        if let Budgets::Fleet(fleet) = &self.inner.budgets {
            fleet
                .remove_budget(&agent_id)
                .await
                .map_err(|e| ChangeError::Unavailable(format!("the fleet's Redis: {e}")))?;
        }
        change.delete_agent(&agent_id, now_ms()).await?;
        let written = change.commit().await?;
        self.forget_agent(&agent_id);
        self.after_commit(db, &mut applied, written).await;
        Ok(())
    }

    /// Makes a key for an API agent: its row, and the key itself (shown
    /// once, kept nowhere).
    pub async fn create_key(
        &self,
        agent_id: AgentId,
        name: Option<String>,
    ) -> Result<(KeyRow, String), ChangeError> {
        let db = self.db()?;
        let mut applied = self.inner.writer.lock().await;
        self.refuse_file_agent(&agent_id, "its key is the file's `api_key`")?;
        let mut change = db.change().await?;
        if change.agent(&agent_id).await?.is_none() {
            return Err(not_found(agent_id));
        }
        let key = keys::generate().map_err(|e| {
            ChangeError::Unavailable(format!("the system's random source failed: {e}"))
        })?;
        let row = KeyRow {
            key_id: uuid::Uuid::new_v4(),
            agent_id,
            name,
            shown: key.shown.clone(),
            hash: key.hash,
            created_at: now_ms(),
            last_used_at: None,
            revoked: false,
            revision: change.revision,
        };
        change.add_key(&row).await?;
        let written = change.commit().await?;
        self.after_commit(db, &mut applied, written).await;
        Ok((row, key.secret))
    }

    /// An API agent's keys in use, without their secrets.
    pub async fn keys_of(&self, agent_id: AgentId) -> Result<Vec<KeyRow>, ChangeError> {
        let db = self.db()?;
        self.refuse_file_agent(&agent_id, "its key is the file's `api_key`")?;
        if !self.view().api.contains_key(&agent_id) {
            return Err(not_found(agent_id));
        }
        Ok(db.keys_of(&agent_id).await?)
    }

    /// Revokes one of an API agent's keys: refused from the next request.
    pub async fn revoke_key(&self, agent_id: AgentId, key_id: KeyId) -> Result<(), ChangeError> {
        let db = self.db()?;
        let mut applied = self.inner.writer.lock().await;
        self.refuse_file_agent(&agent_id, "its key is the file's `api_key`")?;
        let mut change = db.change().await?;
        if !change.revoke_key(&agent_id, &key_id, now_ms()).await? {
            return Err(ChangeError::NotFound(format!(
                "agent {agent_id} has no key {key_id} in use"
            )));
        }
        let written = change.commit().await?;
        self.forget_key(&key_id);
        self.after_commit(db, &mut applied, written).await;
        Ok(())
    }

    /// Refuses the key from now on (also done when the revocation is read
    /// back; this does not wait for that read).
    fn forget_key(&self, key_id: &KeyId) {
        if let Some((_, hash)) = self.view_mut().api_keys.remove(key_id) {
            self.inner.keys.remove(&hash);
        }
    }

    /// Refuses the agent's keys from now on.
    fn forget_agent(&self, agent_id: &AgentId) {
        let mut view = self.view_mut();
        forget_keys_of(&mut view, agent_id, Some(&self.inner.keys));
    }

    /// Applies a newly read configuration file: file agents added, removed
    /// and changed (usage kept), their keys, and the admin key. Refused,
    /// with nothing changed, if it names an API agent, or (in a fleet) an
    /// agent a fleet cannot share, or if Redis refuses a budget.
    pub async fn reload(&self, config: &Config) -> Result<Reloaded, GatewayError> {
        let _applied = self.inner.writer.lock().await;
        let new = file_agents(config);
        let (old, at_restart) = {
            let view = self.view();
            if let Some(id) = new.keys().find(|id| view.api.contains_key(id)) {
                let db = self
                    .inner
                    .db
                    .as_ref()
                    .map_or("the database", Database::shown);
                return Err(GatewayError::Conflict(collision(*id, db)));
            }
            let at_restart = view
                .config
                .as_ref()
                .map(|old| old.restart_only_changes(config))
                .unwrap_or_default();
            (view.file.clone(), at_restart)
        };
        let changed: Vec<AgentId> = new
            .iter()
            .filter(|(id, a)| old.get(id) != Some(a))
            .map(|(id, _)| *id)
            .collect();
        if let Budgets::Fleet(fleet) = &self.inner.budgets {
            let mut limits = Vec::new();
            for id in &changed {
                limits.push(
                    fleet_limit(*id, &new[id].settings)
                        .map_err(|e| GatewayError::Unsupported(format!("agent {id}: {e}")))?,
                );
            }
            for limit in limits {
                fleet.set_budget(limit).await?;
            }
        }
        let mut reloaded = Reloaded {
            added: new.keys().filter(|id| !old.contains_key(id)).count(),
            removed: old.keys().filter(|id| !new.contains_key(id)).count(),
            changed: changed.iter().filter(|id| old.contains_key(id)).count(),
            at_restart,
        };
        let label_changed = new.iter().any(|(id, a)| {
            old.get(id)
                .is_some_and(|o| o.settings.metrics_label != a.settings.metrics_label)
        });
        if label_changed {
            reloaded.at_restart.push("metrics_label".to_owned());
        }
        self.inner.prices.store(Arc::new(config.prices.clone()));
        if let Some(budgets) = self.local() {
            for (id, gone) in old.iter().filter(|(id, _)| !new.contains_key(id)) {
                gone.settings.limits.remove(*id, budgets);
            }
            for id in &changed {
                let before = old.get(id).map(|o| &o.settings.limits);
                new[id].settings.limits.apply_over(before, *id, budgets);
            }
            let relinked: Vec<AgentId> = changed
                .iter()
                .filter(|id| {
                    old.get(id).map(|a| a.settings.parent) != Some(new[*id].settings.parent)
                })
                .copied()
                .collect();
            link_parents(
                budgets,
                relinked.iter().map(|id| (*id, new[id].settings.parent)),
            );
        }
        // New keys first, then old ones out: a key in both is never
        // refused in between.
        for (id, agent) in &new {
            if let Some(hash) = agent.key {
                self.inner.keys.insert(hash, *id, None);
            }
        }
        let kept: HashSet<KeyHash> = new.values().filter_map(|a| a.key).collect();
        for hash in old.values().filter_map(|a| a.key) {
            if !kept.contains(&hash) {
                self.inner.keys.remove(&hash);
            }
        }
        self.inner
            .admin_key
            .store(Arc::new(config.admin_key.clone()));
        let mut view = self.view_mut();
        view.file = new;
        view.config = Some(config.clone());
        self.rebuild_plans(&view);
        Ok(reloaded)
    }
}

fn not_found(agent_id: AgentId) -> ChangeError {
    ChangeError::NotFound(format!("no agent {agent_id} was created through the API"))
}

/// Why a file that names an API agent is refused, at start and at reload.
fn collision(agent_id: AgentId, db: &str) -> String {
    format!(
        "agent {agent_id} of the file is managed through the admin API (in {db}): delete it \
         there, or give the file's agent another id"
    )
}

/// The budget a fleet shares for the agent through Redis, or why it
/// cannot be shared: a fleet's budgets are flat fixed windows.
fn fleet_limit(
    agent_id: AgentId,
    settings: &AgentSettings,
) -> Result<agent_budget::BudgetLimit, LimitError> {
    if settings.parent.is_some() {
        return Err(LimitError {
            field: Some("parent".to_owned()),
            message: "budgets shared through Redis cannot nest: leave out `parent`, or run \
                      without --redis"
                .to_owned(),
        });
    }
    settings.limits.fleet_window(agent_id)
}

fn file_entry(agent_id: AgentId, agent: &FileAgent) -> AgentEntry {
    AgentEntry {
        agent_id,
        source: Source::File,
        settings: agent.settings.clone(),
        created_at: None,
        updated_at: None,
    }
}

fn api_entry(agent_id: AgentId, agent: &ApiAgent) -> AgentEntry {
    AgentEntry {
        agent_id,
        source: Source::Api,
        settings: agent.settings.clone(),
        created_at: Some(agent.created_at),
        updated_at: Some(agent.updated_at),
    }
}

/// Links each agent to its parent: all detached first, then linked, so no
/// intermediate state closes a loop the final one does not have.
fn link_parents(
    budgets: &BudgetManager,
    links: impl Iterator<Item = (AgentId, Option<AgentId>)> + Clone,
) {
    for (child, _) in links.clone() {
        let _ = budgets.set_parent(&child, None);
    }
    for (child, parent) in links {
        if let Some(parent) = parent {
            if let Err(e) = budgets.set_parent(&child, Some(&parent)) {
                eprintln!("budget-gateway: agent {child} cannot go under {parent}: {e}");
            }
        }
    }
}

/// Drops the agent's API keys from the view and, if given, the table.
fn forget_keys_of(view: &mut View, agent_id: &AgentId, table: Option<&KeyTable>) {
    let gone: Vec<KeyId> = view
        .api_keys
        .iter()
        .filter(|(_, (agent, _))| agent == agent_id)
        .map(|(id, _)| *id)
        .collect();
    for key_id in gone {
        if let Some((_, hash)) = view.api_keys.remove(&key_id) {
            if let Some(table) = table {
                table.remove(&hash);
            }
        }
    }
}

/// Applies rows read from the database to the view, and, with `live`,
/// to the budgets and the key table too (at start, the install does that
/// for everything at once).
fn apply_rows(view: &mut View, rows: &Snapshot, live: Option<&Catalog>) {
    let table = live.map(|c| &c.inner.keys);
    let local = live.and_then(Catalog::local);
    let mut relinked = Vec::new();
    for row in &rows.agents {
        let id = row.agent_id;
        if view.file.contains_key(&id) {
            eprintln!(
                "budget-gateway: agent {id} of the database has the id of an agent of this \
                 gateway's file; the file's is kept (give every gateway of a fleet the same file)"
            );
            continue;
        }
        if row.deleted {
            if let Some(gone) = view.api.remove(&id) {
                if let Some(budgets) = local {
                    gone.settings.limits.remove(id, budgets);
                }
            }
            forget_keys_of(view, &id, table);
            continue;
        }
        let settings = match AgentSettings::of_row(row) {
            Ok(settings) => settings,
            Err(e) => {
                eprintln!("budget-gateway: agent {id} of the database is skipped: {e}");
                continue;
            }
        };
        let before = view.api.get(&id).map(|a| a.settings.clone());
        if let Some(budgets) = local {
            if before.as_ref().map(|b| &b.limits) != Some(&settings.limits) {
                let old = before.as_ref().map(|b| &b.limits);
                settings.limits.apply_over(old, id, budgets);
            }
            if before.as_ref().map(|b| b.parent) != Some(settings.parent) {
                relinked.push((id, settings.parent));
            }
        }
        view.api.insert(
            id,
            ApiAgent {
                settings,
                created_at: row.created_at,
                updated_at: row.updated_at,
            },
        );
    }
    if let Some(budgets) = local {
        link_parents(budgets, relinked.iter().copied());
    }
    for row in &rows.keys {
        if row.revoked {
            if let Some((_, hash)) = view.api_keys.remove(&row.key_id) {
                if let Some(table) = table {
                    table.remove(&hash);
                }
            }
            continue;
        }
        if !view.api.contains_key(&row.agent_id) {
            continue;
        }
        view.api_keys.insert(row.key_id, (row.agent_id, row.hash));
        if let Some(table) = table {
            table.insert(row.hash, row.agent_id, Some(row.key_id));
        }
    }
    if let Some(catalog) = live {
        catalog.rebuild_plans(view);
    }
}
