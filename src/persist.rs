//! The seed's JSON layout, extended, and crash-safe writing of it.
//!
//! ```json
//! {
//!   "budgets": { "<uuid>": { "agent_id": "<uuid>", "token_budget": 1000,
//!                            "calls_budget": 10, "window_secs": 60 } },
//!   "usage":   { "<uuid>": { "tokens_used": 250, "calls_used": 3,
//!                            "window_start": "2026-11-28T16:13:57.123Z" } },
//!   "refills": { "<uuid>": { "agent_id": "<uuid>", "token_budget": 1000,
//!                            "calls_budget": 10,
//!                            "refill_period": { "secs": 60, "nanos": 0 } } },
//!   "calendars": { "<uuid>": { "agent_id": "<uuid>", "token_budget": 1000,
//!                              "calls_budget": 10, "period": "month" } },
//!   "parents": { "<child uuid>": "<parent uuid>" }
//! }
//! ```
//!
//! `budgets` and `usage` are the seed's; `refills` (agents on a refilling
//! budget, whose `usage` holds their bucket's counts at its time mark),
//! `calendars` (agents on UTC days or months, whose `window_start` is a time
//! in their current window) and `parents` are this crate's, and optional: a file without them, as the
//! seed wrote, restores as it always did, and the seed reading one of ours
//! sees the windowed agents and ignores the rest.
//!
//! Windows live on a monotonic clock in memory and on the wall clock on
//! disk. Both conversions go through the age of the window ("started this
//! long ago"), so a window restored in another process keeps the part of
//! it that was left. A start in the future (a wall clock set back between
//! persist and restore) is taken as now rather than trusted, so no window
//! can be stretched without bound by a bad file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::error::PersistError;
use crate::hierarchy::Hierarchy;
use crate::limit::Configured;
use crate::rules::{Now, State, Tick, MAX_CALLS, MAX_TOKENS};
use crate::types::{AgentId, BudgetLimit, CalendarLimit, RefillLimit, Usage};

/// One agent's state, as the managers hand it over and take it back.
pub(crate) struct AgentState {
    pub(crate) configured: Configured,
    pub(crate) parent: Option<AgentId>,
    pub(crate) state: State,
}

#[derive(Serialize)]
struct PersistedRef<'a> {
    budgets: BTreeMap<AgentId, &'a BudgetLimit>,
    usage: BTreeMap<AgentId, Usage>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    refills: BTreeMap<AgentId, &'a RefillLimit>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    calendars: BTreeMap<AgentId, &'a CalendarLimit>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    parents: BTreeMap<AgentId, AgentId>,
}

#[derive(Deserialize)]
struct Persisted {
    budgets: HashMap<AgentId, BudgetLimit>,
    usage: HashMap<AgentId, Usage>,
    #[serde(default)]
    refills: HashMap<AgentId, RefillLimit>,
    #[serde(default)]
    calendars: HashMap<AgentId, CalendarLimit>,
    #[serde(default)]
    parents: HashMap<AgentId, AgentId>,
}

/// The moment a conversion is made, on both clocks at once.
#[derive(Clone, Copy)]
pub(crate) struct Moment {
    pub(crate) now: Now,
    pub(crate) wall: DateTime<Utc>,
}

impl Moment {
    fn wall_time_of(&self, start: Tick) -> DateTime<Utc> {
        let now = self.now.tick();
        let (ago, ahead) = (now.millis_since(start), start.millis_since(now));
        let shift = TimeDelta::milliseconds(ahead as i64 - ago as i64);
        self.wall
            .checked_add_signed(shift)
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    fn tick_of(&self, wall_start: DateTime<Utc>) -> Tick {
        let age = self
            .wall
            .signed_duration_since(wall_start)
            .num_milliseconds();
        if age <= 0 {
            return self.now.start_tick();
        }
        Tick(self.now.tick().0.saturating_sub(age as u64))
    }
}

/// Writes `agents` to `path`: to a temporary file in the same folder, synced,
/// then renamed over `path`, then the folder synced. A crash leaves either
/// the old file or the new one; a failure leaves no temporary file.
pub(crate) fn write(path: &Path, agents: &[AgentState], at: Moment) -> Result<(), PersistError> {
    let mut data = PersistedRef {
        budgets: BTreeMap::new(),
        usage: BTreeMap::new(),
        refills: BTreeMap::new(),
        calendars: BTreeMap::new(),
        parents: BTreeMap::new(),
    };
    for agent in agents {
        let id = agent.configured.agent_id();
        match &agent.configured {
            Configured::Window(limit) => data.budgets.insert(id, limit).map(drop),
            Configured::Refill(limit) => data.refills.insert(id, limit).map(drop),
            Configured::Calendar(limit) => data.calendars.insert(id, limit).map(drop),
        };
        let usage = Usage {
            tokens_used: agent.state.tokens,
            calls_used: agent.state.calls,
            window_start: at.wall_time_of(agent.state.mark),
        };
        data.usage.insert(id, usage);
        if let Some(parent) = agent.parent {
            data.parents.insert(id, parent);
        }
    }
    let write_error = |source| PersistError::Write {
        path: path.to_path_buf(),
        source,
    };
    let json = serde_json::to_vec_pretty(&data).map_err(|e| write_error(e.into()))?;
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&folder).map_err(write_error)?;
    let mut file = tempfile::Builder::new()
        .prefix(".agent-budget-")
        .suffix(".tmp")
        .tempfile_in(&folder)
        .map_err(write_error)?;
    file.write_all(&json).map_err(write_error)?;
    file.as_file().sync_all().map_err(write_error)?;
    file.persist(path).map_err(|e| write_error(e.error))?;
    sync_folder(&folder).map_err(write_error)
}

/// Makes the rename itself durable. Only Unix can open a folder to sync it.
fn sync_folder(folder: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(folder)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = folder;
    Ok(())
}

/// Reads `path`: every agent's state, and the hierarchy they form. `Ok(None)`
/// if there is no such file; an error, and nothing else, if it cannot be
/// read, parsed or trusted.
pub(crate) fn read(
    path: &Path,
    at: Moment,
) -> Result<Option<(Vec<AgentState>, Hierarchy)>, PersistError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PersistError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let data: Persisted =
        serde_json::from_slice(&bytes).map_err(|source| PersistError::Malformed {
            path: path.to_path_buf(),
            source,
        })?;
    let inconsistent = |reason: String| PersistError::Inconsistent {
        path: path.to_path_buf(),
        reason,
    };
    let windows = data
        .budgets
        .into_iter()
        .map(|(id, limit)| (id, Configured::Window(limit)));
    let refills = data
        .refills
        .into_iter()
        .map(|(id, limit)| (id, Configured::Refill(limit)));
    let calendars = data
        .calendars
        .into_iter()
        .map(|(id, limit)| (id, Configured::Calendar(limit)));
    let mut usage = data.usage;
    let mut agents = Vec::new();
    let mut known = HashSet::new();
    for (id, configured) in windows.chain(refills).chain(calendars) {
        if configured.agent_id() != id {
            return Err(inconsistent(format!(
                "budget filed under {id} is for agent {}",
                configured.agent_id()
            )));
        }
        if !known.insert(id) {
            return Err(inconsistent(format!(
                "agent {id} has more than one budget (windowed, refilling, calendar)"
            )));
        }
        // Usage past what a count can hold is clamped: the agent stays
        // exhausted, which is what such a file means.
        let state = match usage.remove(&id) {
            Some(u) => State {
                tokens: u.tokens_used.min(MAX_TOKENS),
                calls: u.calls_used.min(MAX_CALLS),
                mark: at.tick_of(u.window_start),
            },
            None => State::fresh(at.now.start_tick()),
        };
        let parent = data.parents.get(&id).copied();
        agents.push(AgentState {
            configured,
            parent,
            state,
        });
    }
    let hierarchy =
        Hierarchy::from_links(&known, data.parents).map_err(|source| PersistError::Hierarchy {
            path: path.to_path_buf(),
            source,
        })?;
    // Usage left in `usage` belongs to agents without a budget. An unknown
    // agent is refused whatever its usage, so it is dropped, not kept to
    // resurface if a budget is set later.
    Ok(Some((agents, hierarchy)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moment(now_ms: u64) -> Moment {
        Moment {
            now: Now::from_nanos(now_ms * 1_000_000),
            wall: DateTime::parse_from_rfc3339("2026-11-28T12:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
        }
    }

    #[test]
    fn a_window_keeps_its_age_across_the_two_clocks() {
        let at = moment(5_000);
        let start = Tick(Tick::ORIGIN.0 + 2_000);
        let wall = at.wall_time_of(start);
        assert_eq!(wall.to_rfc3339(), "2026-11-28T11:59:57+00:00");
        // Restored in a process whose clock is elsewhere: same age.
        let later = moment(90_000);
        assert_eq!(later.tick_of(wall), Tick(Tick::ORIGIN.0 + 87_000));
    }

    #[test]
    fn a_start_ahead_of_the_clock_round_trips_and_a_future_wall_time_is_now() {
        let at = moment(0);
        let ahead = Tick(Tick::ORIGIN.0 + 3);
        let wall = at.wall_time_of(ahead);
        assert_eq!(at.tick_of(wall), at.now.start_tick());
        let far_future = DateTime::parse_from_rfc3339("2999-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(at.tick_of(far_future), at.now.start_tick());
    }

    #[test]
    fn a_window_older_than_the_timeline_saturates_instead_of_wrapping() {
        let at = moment(0);
        let ancient = DateTime::<Utc>::MIN_UTC;
        assert_eq!(at.tick_of(ancient), Tick(0));
        assert!(at.wall_time_of(Tick(0)) < at.wall);
    }
}
