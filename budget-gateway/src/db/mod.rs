//! The admin API's database: SQLite in a file by default, PostgreSQL for a
//! fleet of gateways.
//!
//! # How it works
//!
//! `--db FILE` opens (and on first start creates) a SQLite database;
//! `--db postgres://…` connects to PostgreSQL. Both are reached through
//! one `sqlx` `Any` pool with the same SQL (`$1` placeholders, types both
//! have), so every query below is written once. The schema is in
//! `budget-gateway/migrations`, embedded in the binary by `sqlx::migrate!`
//! and applied at start; PostgreSQL's migrations take an advisory lock, so
//! gateways starting together migrate once.
//!
//! Every change is a [`Change`]: a transaction that first bumps the
//! one-row `revision` counter and stamps every row it writes with the new
//! value. That first write makes writers take turns (the row's lock in
//! PostgreSQL, the database's write lock in SQLite), so their checks see
//! every change before them and revisions commit in order; a reader that
//! sees revision R has every row stamped R or less. Deleted agents and
//! revoked keys are kept as tombstones stamped like any change, so
//! [`Database::changes`] tells a gateway about deletions too. Reads that
//! must agree with each other (a snapshot, the changes since a revision)
//! run in one transaction, `REPEATABLE READ` in PostgreSQL, a read
//! transaction in SQLite's WAL mode: one consistent view.
//!
//! SQLite runs in WAL mode with `synchronous = NORMAL`: a commit does not
//! wait for the disk, and a crash of the process loses nothing; a power
//! loss may lose the last changes (WAL keeps the file consistent).
//!
//! Keys are stored as hex SHA-256 digests, never in plaintext, and no
//! query here carries a plaintext key: `sqlx` logs statements, not
//! arguments, and the gateway installs no logger anyway.

mod rows;

use std::path::Path;
use std::time::Duration;

use agent_budget::AgentId;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Executor, Transaction};

pub use rows::{AgentRow, KeyRow};

use crate::keys::KeyId;

/// The migrations, embedded at build time.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Which database the gateway keeps its agents and keys in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A file, for one gateway (or several on one host).
    Sqlite,
    /// A server, for a fleet of gateways.
    Postgres,
}

/// A database of agents and keys.
#[derive(Clone)]
pub struct Database {
    pool: AnyPool,
    backend: Backend,
    shown: String,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("at", &self.shown)
            .finish_non_exhaustive()
    }
}

/// A database operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database could not be opened, migrated or queried.
    #[error("the database {at}: {source}")]
    Sql {
        /// The database, as given (a URL's password left out).
        at: String,
        /// Why.
        source: sqlx::Error,
    },
    /// A row holds what this gateway cannot read.
    #[error("the database {at}: {message}")]
    Corrupt {
        /// The database.
        at: String,
        /// What is wrong.
        message: String,
    },
}

/// Every agent and key there is, as of one revision.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The revision this is as of.
    pub revision: i64,
    /// The agents (no tombstones).
    pub agents: Vec<AgentRow>,
    /// The keys in use (none revoked).
    pub keys: Vec<KeyRow>,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

const AGENT_COLUMNS: &str =
    "agent_id, parent, metrics_label, limits, created_at, updated_at, deleted_at, revision, enforce";
const KEY_COLUMNS: &str =
    "key_id, agent_id, name, shown, hash, created_at, last_used_at, revoked_at, revision";

impl Database {
    /// Opens `target`: `postgres://…` (or `postgresql://…`), `sqlite://…`,
    /// or else a SQLite file's path, created if missing. Applies the
    /// migrations not yet applied.
    pub async fn open(target: &str) -> Result<Database, DbError> {
        sqlx::any::install_default_drivers();
        let (backend, url, shown) =
            if target.starts_with("postgres://") || target.starts_with("postgresql://") {
                (
                    Backend::Postgres,
                    target.to_owned(),
                    without_password(target),
                )
            } else if target.starts_with("sqlite:") {
                (Backend::Sqlite, target.to_owned(), target.to_owned())
            } else {
                (
                    Backend::Sqlite,
                    sqlite_url(Path::new(target)),
                    target.to_owned(),
                )
            };
        let failed = |source| DbError::Sql {
            at: shown.clone(),
            source,
        };
        if backend == Backend::Sqlite {
            // Once per file, before the pool: WAL needs the database to
            // itself while it switches.
            let mut first = <sqlx::AnyConnection as sqlx::Connection>::connect(&url)
                .await
                .map_err(failed)?;
            first
                .execute("PRAGMA journal_mode = WAL")
                .await
                .map_err(failed)?;
            sqlx::Connection::close(first).await.map_err(failed)?;
        }
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 8 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        connection.execute("PRAGMA synchronous = NORMAL").await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(failed)?;
        MIGRATOR.run(&pool).await.map_err(|e| failed(e.into()))?;
        Ok(Database {
            pool,
            backend,
            shown,
        })
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The database, as given (a URL's password left out).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    fn sql(&self, source: sqlx::Error) -> DbError {
        DbError::Sql {
            at: self.shown.clone(),
            source,
        }
    }

    /// A read-only transaction whose statements all see one state.
    async fn consistent_read(&self) -> Result<Transaction<'static, Any>, DbError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.sql(e))?;
        if self.backend == Backend::Postgres {
            tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(|e| self.sql(e))?;
        }
        Ok(tx)
    }

    /// Every agent and key in use, and the revision they are as of.
    pub async fn snapshot(&self) -> Result<Snapshot, DbError> {
        let read = self.read(None).await?;
        Ok(read.expect("a snapshot is always read"))
    }

    /// What changed after revision `since` (tombstones included), or
    /// `None` if nothing did.
    pub async fn changes(&self, since: i64) -> Result<Option<Snapshot>, DbError> {
        self.read(Some(since)).await
    }

    /// Agents and keys in one consistent read: those in use, or with
    /// `since`, those changed after it (`None` if none was).
    async fn read(&self, since: Option<i64>) -> Result<Option<Snapshot>, DbError> {
        let mut tx = self.consistent_read().await?;
        let now = revision(&mut tx).await.map_err(|e| self.sql(e))?;
        if since == Some(now) {
            tx.commit().await.map_err(|e| self.sql(e))?;
            return Ok(None);
        }
        let (agents, keys) = match since {
            None => ("deleted_at IS NULL", "revoked_at IS NULL"),
            Some(_) => ("revision > $1", "revision > $1"),
        };
        let agents = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE {agents}");
        let agents = self.fetch(&mut tx, &agents, since).await?;
        let keys = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE {keys}");
        let keys = self.fetch(&mut tx, &keys, since).await?;
        tx.commit().await.map_err(|e| self.sql(e))?;
        Ok(Some(Snapshot {
            revision: now,
            agents: self.decode(&agents, AgentRow::decode)?,
            keys: self.decode(&keys, KeyRow::decode)?,
        }))
    }

    /// The rows `sql` selects, `$1` bound to `since` if given.
    async fn fetch(
        &self,
        tx: &mut Transaction<'static, Any>,
        sql: &str,
        since: Option<i64>,
    ) -> Result<Vec<AnyRow>, DbError> {
        let mut query = sqlx::query(sql);
        if let Some(since) = since {
            query = query.bind(since);
        }
        query.fetch_all(&mut **tx).await.map_err(|e| self.sql(e))
    }

    fn decode<T>(
        &self,
        rows: &[AnyRow],
        decode: impl Fn(&AnyRow) -> Result<T, String>,
    ) -> Result<Vec<T>, DbError> {
        rows.iter()
            .map(|row| {
                decode(row).map_err(|message| DbError::Corrupt {
                    at: self.shown.clone(),
                    message,
                })
            })
            .collect()
    }

    /// The agent's keys in use, oldest first.
    pub async fn keys_of(&self, agent_id: &AgentId) -> Result<Vec<KeyRow>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE agent_id = $1 AND revoked_at IS NULL \
             ORDER BY created_at, key_id"
        ))
        .bind(agent_id.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.sql(e))?;
        self.decode(&rows, KeyRow::decode)
    }

    /// Records that the keys `ids` were used at `at` (ms). Not a change:
    /// no revision, no other gateway needs to know.
    pub async fn mark_used(&self, ids: &[KeyId], at: i64) -> Result<(), DbError> {
        for chunk in ids.chunks(500) {
            let placeholders: Vec<String> = (2..chunk.len() + 2).map(|i| format!("${i}")).collect();
            let sql = format!(
                "UPDATE api_keys SET last_used_at = $1 WHERE key_id IN ({})",
                placeholders.join(", ")
            );
            let mut query = sqlx::query(&sql).bind(at);
            for id in chunk {
                query = query.bind(id.to_string());
            }
            query.execute(&self.pool).await.map_err(|e| self.sql(e))?;
        }
        Ok(())
    }

    /// Starts a change: a transaction holding the next revision.
    pub async fn change(&self) -> Result<Change<'_>, DbError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.sql(e))?;
        let revision: i64 = sqlx::query_scalar(
            "UPDATE revision SET value = value + 1 WHERE id = 1 RETURNING value",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| self.sql(e))?;
        Ok(Change {
            db: self,
            tx,
            revision,
            written: Some(Snapshot {
                revision,
                ..Snapshot::default()
            }),
        })
    }

    /// Closes the pool, waiting for its connections to finish.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

async fn revision(tx: &mut Transaction<'static, Any>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT value FROM revision WHERE id = 1")
        .fetch_one(&mut **tx)
        .await
}

/// One change to agents and keys: every row it writes is stamped with
/// [`revision`](Self::revision). Dropped without [`commit`](Self::commit),
/// nothing happened.
pub struct Change<'a> {
    db: &'a Database,
    tx: Transaction<'static, Any>,
    /// This change's revision.
    pub revision: i64,
    /// The rows it wrote, as a reader would read them back; `None` once
    /// it has written rows it does not hold (ending an agent's keys).
    written: Option<Snapshot>,
}

impl Change<'_> {
    fn sql(&self, source: sqlx::Error) -> DbError {
        self.db.sql(source)
    }

    /// The agent, unless it is unknown or deleted.
    pub async fn agent(&mut self, agent_id: &AgentId) -> Result<Option<AgentRow>, DbError> {
        let row = sqlx::query(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = $1 AND deleted_at IS NULL"
        ))
        .bind(agent_id.to_string())
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(|e| self.sql(e))?;
        row.map(|row| {
            self.db
                .decode(&[row], AgentRow::decode)
                .map(|mut v| v.remove(0))
        })
        .transpose()
    }

    /// Up to `limit` of the agent's children, in id order.
    pub async fn children(
        &mut self,
        agent_id: &AgentId,
        limit: i64,
    ) -> Result<Vec<String>, DbError> {
        sqlx::query_scalar(
            "SELECT agent_id FROM agents WHERE parent = $1 AND deleted_at IS NULL \
             ORDER BY agent_id LIMIT $2",
        )
        .bind(agent_id.to_string())
        .bind(limit)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(|e| self.sql(e))
    }

    /// How many levels of descendants the agent has (0: no children),
    /// counting at most `cap`.
    pub async fn depth_below(&mut self, agent_id: &AgentId, cap: i64) -> Result<i64, DbError> {
        sqlx::query_scalar(
            "WITH RECURSIVE below (agent_id, depth) AS ( \
                SELECT agent_id, CAST(1 AS BIGINT) FROM agents \
                WHERE parent = $1 AND deleted_at IS NULL \
              UNION ALL \
                SELECT a.agent_id, b.depth + 1 FROM agents a JOIN below b ON a.parent = b.agent_id \
                WHERE a.deleted_at IS NULL AND b.depth < $2 \
             ) SELECT CAST(COALESCE(MAX(depth), 0) AS BIGINT) FROM below",
        )
        .bind(agent_id.to_string())
        .bind(cap)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(|e| self.sql(e))
    }

    /// Writes the agent (over a tombstone of the same id, if any).
    pub async fn put_agent(&mut self, agent: &AgentRow) -> Result<(), DbError> {
        sqlx::query(&format!(
            "INSERT INTO agents ({AGENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, NULL, $7, $8) \
             ON CONFLICT (agent_id) DO UPDATE SET parent = excluded.parent, enforce = excluded.enforce, \
             metrics_label = excluded.metrics_label, limits = excluded.limits, \
             created_at = excluded.created_at, updated_at = excluded.updated_at, \
             deleted_at = NULL, revision = excluded.revision"
        ))
        .bind(agent.agent_id.to_string())
        .bind(agent.parent.map(|p| p.to_string()))
        .bind(agent.metrics_label.clone())
        .bind(agent.limits.clone())
        .bind(agent.created_at)
        .bind(agent.updated_at)
        .bind(self.revision)
        .bind(i64::from(agent.enforce))
        .execute(&mut *self.tx)
        .await
        .map_err(|e| self.sql(e))?;
        if let Some(written) = &mut self.written {
            written.agents.push(AgentRow {
                revision: self.revision,
                ..agent.clone()
            });
        }
        Ok(())
    }

    /// Deletes the agent and revokes its keys; `false` if it was unknown
    /// or deleted already.
    pub async fn delete_agent(&mut self, agent_id: &AgentId, at: i64) -> Result<bool, DbError> {
        let deleted = self
            .end_rows(
                "UPDATE agents SET deleted_at = $2, updated_at = $2, revision = $3 \
                 WHERE agent_id = $1 AND deleted_at IS NULL",
                agent_id,
                at,
            )
            .await?;
        self.end_rows(
            "UPDATE api_keys SET revoked_at = $2, revision = $3 \
             WHERE agent_id = $1 AND revoked_at IS NULL",
            agent_id,
            at,
        )
        .await?;
        Ok(deleted > 0)
    }

    /// Runs `sql`, an update of the agent's rows (`$1`) that ends them at
    /// `$2` in this change's revision (`$3`): how many it ended.
    async fn end_rows(&mut self, sql: &str, agent_id: &AgentId, at: i64) -> Result<u64, DbError> {
        self.written = None;
        let done = sqlx::query(sql)
            .bind(agent_id.to_string())
            .bind(at)
            .bind(self.revision)
            .execute(&mut *self.tx)
            .await
            .map_err(|e| self.sql(e))?;
        Ok(done.rows_affected())
    }

    /// Adds a key.
    pub async fn add_key(&mut self, key: &KeyRow) -> Result<(), DbError> {
        sqlx::query(&format!(
            "INSERT INTO api_keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, NULL, NULL, $7)"
        ))
        .bind(key.key_id.to_string())
        .bind(key.agent_id.to_string())
        .bind(key.name.clone())
        .bind(key.shown.clone())
        .bind(key.hash.to_hex())
        .bind(key.created_at)
        .bind(self.revision)
        .execute(&mut *self.tx)
        .await
        .map_err(|e| self.sql(e))?;
        if let Some(written) = &mut self.written {
            written.keys.push(KeyRow {
                last_used_at: None,
                revoked: false,
                revision: self.revision,
                ..key.clone()
            });
        }
        Ok(())
    }

    /// Revokes the agent's key `key_id`; `false` if it has no such key in
    /// use.
    pub async fn revoke_key(
        &mut self,
        agent_id: &AgentId,
        key_id: &KeyId,
        at: i64,
    ) -> Result<bool, DbError> {
        self.written = None;
        let revoked = sqlx::query(
            "UPDATE api_keys SET revoked_at = $3, revision = $4 \
             WHERE key_id = $1 AND agent_id = $2 AND revoked_at IS NULL",
        )
        .bind(key_id.to_string())
        .bind(agent_id.to_string())
        .bind(at)
        .bind(self.revision)
        .execute(&mut *self.tx)
        .await
        .map_err(|e| self.sql(e))?;
        Ok(revoked.rows_affected() > 0)
    }

    /// Makes the change durable.
    /// Makes the change durable. Returns the rows it wrote, stamped as a
    /// reader would read them back, when it knows them all (it ended no
    /// agent's keys): the same as [`Database::changes`] would return for
    /// this revision alone, without reading it.
    pub async fn commit(self) -> Result<Option<Snapshot>, DbError> {
        let db = self.db;
        self.tx.commit().await.map_err(|e| db.sql(e))?;
        Ok(self.written)
    }
}

/// `sqlite://PATH?mode=rwc` for a file path (created if missing), with
/// the characters a URL would misread escaped.
fn sqlite_url(path: &Path) -> String {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut url = String::from("sqlite://");
    for byte in absolute.to_string_lossy().bytes() {
        if byte.is_ascii_alphanumeric() || b"/._-~".contains(&byte) {
            url.push(char::from(byte));
        } else {
            url.push_str(&format!("%{byte:02X}"));
        }
    }
    url.push_str("?mode=rwc");
    url
}

/// `url` with its password, if any, replaced by `***`.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_left_out_of_what_is_shown() {
        assert_eq!(
            without_password("postgres://u:secret@db:5432/x?sslmode=disable"),
            "postgres://u:***@db:5432/x?sslmode=disable"
        );
        assert_eq!(without_password("postgres://u@db/x"), "postgres://u@db/x");
        assert_eq!(without_password("postgres://db/x"), "postgres://db/x");
    }

    #[test]
    fn file_paths_become_urls_that_read_back() {
        let url = sqlite_url(Path::new("/tmp/a b/gw#1?.db"));
        assert_eq!(url, "sqlite:///tmp/a%20b/gw%231%3F.db?mode=rwc");
    }
}
