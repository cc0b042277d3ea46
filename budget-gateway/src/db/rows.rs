//! The rows of `agents` and `api_keys`, and how they are read.

use agent_budget::AgentId;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::keys::{KeyHash, KeyId};
use crate::limits::LimitSpec;

/// An agent of the admin API, as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentRow {
    /// Its id.
    pub agent_id: AgentId,
    /// The agent whose budget it also spends from.
    pub parent: Option<AgentId>,
    /// Its `agent` label on the metrics.
    pub metrics_label: Option<String>,
    /// Its limits, as the JSON list they are stored as: read by the
    /// catalog, which skips an agent whose limits it cannot enforce (one
    /// written by a newer gateway, say) instead of failing every read.
    pub limits: String,
    /// When it was created (ms since the epoch).
    pub created_at: i64,
    /// When it was last changed.
    pub updated_at: i64,
    /// Whether it is a tombstone.
    pub deleted: bool,
    /// The revision of its last change.
    pub revision: i64,
    /// `false` for shadow mode ([`crate::shadow`]).
    pub enforce: bool,
}

/// A key of the admin API, as stored: never the key itself.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyRow {
    /// Its id.
    pub key_id: KeyId,
    /// Its agent.
    pub agent_id: AgentId,
    /// A name the operator gave it.
    pub name: Option<String>,
    /// Its first characters, to tell it apart.
    pub shown: String,
    /// Its SHA-256.
    pub hash: KeyHash,
    /// When it was created (ms since the epoch).
    pub created_at: i64,
    /// When it was last used, to within the collection interval.
    pub last_used_at: Option<i64>,
    /// Whether it is revoked.
    pub revoked: bool,
    /// The revision of its last change.
    pub revision: i64,
}

impl AgentRow {
    /// The row with `limits` stored as their JSON list.
    pub fn new(
        agent_id: AgentId,
        parent: Option<AgentId>,
        metrics_label: Option<String>,
        limits: &[LimitSpec],
        created_at: i64,
        updated_at: i64,
    ) -> Self {
        AgentRow {
            agent_id,
            parent,
            metrics_label,
            limits: serde_json::to_string(limits).expect("limit specs serialize"),
            created_at,
            updated_at,
            deleted: false,
            revision: 0,
            enforce: true,
        }
    }

    pub(super) fn decode(row: &AnyRow) -> Result<Self, String> {
        Ok(AgentRow {
            agent_id: uuid(row, "agent_id")?,
            parent: optional_uuid(row, "parent")?,
            metrics_label: column(row, "metrics_label")?,
            limits: column(row, "limits")?,
            created_at: column(row, "created_at")?,
            updated_at: column(row, "updated_at")?,
            deleted: column::<Option<i64>>(row, "deleted_at")?.is_some(),
            revision: column(row, "revision")?,
            enforce: column::<i64>(row, "enforce")? != 0,
        })
    }
}

impl KeyRow {
    pub(super) fn decode(row: &AnyRow) -> Result<Self, String> {
        let hash: String = column(row, "hash")?;
        Ok(KeyRow {
            key_id: uuid(row, "key_id")?,
            agent_id: uuid(row, "agent_id")?,
            name: column(row, "name")?,
            shown: column(row, "shown")?,
            hash: KeyHash::from_hex(&hash)
                .ok_or_else(|| format!("api_keys.hash {hash:?} is not a SHA-256 in hex"))?,
            created_at: column(row, "created_at")?,
            last_used_at: column(row, "last_used_at")?,
            revoked: column::<Option<i64>>(row, "revoked_at")?.is_some(),
            revision: column(row, "revision")?,
        })
    }
}

fn column<'r, T>(row: &'r AnyRow, name: &str) -> Result<T, String>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(name)
        .map_err(|e| format!("cannot read column {name}: {e}"))
}

fn uuid(row: &AnyRow, name: &str) -> Result<uuid::Uuid, String> {
    let text: String = column(row, name)?;
    uuid::Uuid::try_parse(&text).map_err(|e| format!("column {name}: {text:?} is not a UUID: {e}"))
}

fn optional_uuid(row: &AnyRow, name: &str) -> Result<Option<uuid::Uuid>, String> {
    let text: Option<String> = column(row, name)?;
    text.map(|text| {
        uuid::Uuid::try_parse(&text)
            .map_err(|e| format!("column {name}: {text:?} is not a UUID: {e}"))
    })
    .transpose()
}
