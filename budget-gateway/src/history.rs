//! Requests admitted and refused per agent over the last hour, kept in
//! memory for the dashboard: a bounded ring of per-minute counts per agent.
//!
//! # How it works
//!
//! The budget layer tells the [`History`] of every decision (it is the
//! layer's [`Observe`]r). Each agent has a [`Ring`] of [`MINUTES`] slots,
//! one per minute, the slot of minute `m` being `m % MINUTES`. A slot is
//! two `AtomicU64`s, admitted and refused, each holding the minute it
//! counts in its top 24 bits and the count in the rest. A
//! decision costs the request path a lookup of the agent's ring in a
//! lock-free map (`papaya`, hashed by the id's first eight bytes), a
//! relaxed load of the current minute, a relaxed load of the slot and one
//! relaxed `fetch_add` on it; only the first decision of a minute swaps the
//! slot over from the minute an hour ago (a compare-and-swap, retried at
//! most once).
//!
//! The current minute is not read from the clock on the request path: a
//! background task ([`History::tick`], every second, from
//! [`crate::watch`]) stores it in one atomic that every decision reads.
//!
//! A count is exact for a minute unless a thread is preempted for a whole
//! hour between reading a slot's stamp and adding to it (it would then add
//! to the newer minute). A reader may see a slot being swapped over as
//! empty. The history is per gateway (a fleet's gateways each keep their
//! own) and starts empty at each start.

use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use agent_budget::AgentId;
use agent_budget_tower::{Observe, RefusalReason};
use serde::Serialize;
use utoipa::ToSchema;

use crate::keys::DigestHasher;

/// Minutes kept: an hour.
pub const MINUTES: usize = 60;

/// Bits of a slot's word that hold its minute (the rest hold the count):
/// 24 bits of minutes wrap after 31 years, 40 bits of count hold a
/// trillion requests a minute.
const STAMP_BITS: u32 = 24;
const COUNT_BITS: u32 = 64 - STAMP_BITS;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
const STAMP_MASK: u64 = (1 << STAMP_BITS) - 1;

/// The minutes since the Unix epoch, now.
pub fn minute_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 60)
}

/// One counter of a slot: `(minute & STAMP_MASK) << COUNT_BITS | count`.
#[derive(Default)]
struct Counter(AtomicU64);

impl Counter {
    fn stamp(minute: u64) -> u64 {
        (minute & STAMP_MASK) << COUNT_BITS
    }

    /// Adds one in `minute`, starting the slot over if it holds an older
    /// minute.
    fn add(&self, minute: u64) {
        let stamp = Self::stamp(minute);
        // Relaxed: the counts publish nothing; readers want numbers only.
        let mut seen = self.0.load(Ordering::Relaxed);
        for _ in 0..2 {
            if seen & !COUNT_MASK == stamp {
                self.0.fetch_add(1, Ordering::Relaxed);
                return;
            }
            match self
                .0
                .compare_exchange(seen, stamp | 1, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return,
                // Someone else started it over (or counted in the old
                // minute): look again.
                Err(now) => seen = now,
            }
        }
        // Two changes under us in one call: the slot is this minute's now
        // unless an hour went by; count here.
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The count for `minute`, zero if the slot holds another.
    fn get(&self, minute: u64) -> u64 {
        let word = self.0.load(Ordering::Relaxed);
        if word & !COUNT_MASK == Self::stamp(minute) {
            word & COUNT_MASK
        } else {
            0
        }
    }
}

/// One agent's last hour: a slot per minute; and its refusals since the
/// start, with the last one's reason, for the alerts.
pub struct Ring {
    admitted: [Counter; MINUTES],
    refused: [Counter; MINUTES],
    refusals: AtomicU64,
    last_reason: AtomicU8,
}

impl Default for Ring {
    fn default() -> Self {
        Ring {
            admitted: std::array::from_fn(|_| Counter::default()),
            refused: std::array::from_fn(|_| Counter::default()),
            refusals: AtomicU64::new(0),
            last_reason: AtomicU8::new(0),
        }
    }
}

/// The reasons a refusal is noted with, by their code (index + 1; 0 is
/// none).
const REASONS: [RefusalReason; 6] = [
    RefusalReason::Unidentified,
    RefusalReason::BadRequest,
    RefusalReason::Tokens,
    RefusalReason::Calls,
    RefusalReason::NoBudget,
    RefusalReason::Unavailable,
];

fn reason_code(reason: RefusalReason) -> u8 {
    REASONS
        .iter()
        .position(|r| *r == reason)
        .map_or(0, |i| i as u8 + 1)
}

impl Ring {
    /// Counts an admission in `minute`.
    pub fn admit(&self, minute: u64) {
        self.admitted[slot(minute)].add(minute);
    }

    /// Counts a refusal in `minute`.
    pub fn refuse(&self, minute: u64) {
        self.refused[slot(minute)].add(minute);
    }

    /// Notes a refusal (a real one or, in shadow mode, one that would have
    /// been) for the alerts: the count, and the reason of the last.
    pub fn note_refusal(&self, reason: RefusalReason) {
        // Relaxed, both: the alert task reads them as hints, a little
        // late at worst; the reason may be a later refusal's.
        self.last_reason
            .store(reason_code(reason), Ordering::Relaxed);
        self.refusals.fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals noted so far, and the last one's reason.
    pub fn refusals(&self) -> (u64, Option<RefusalReason>) {
        let count = self.refusals.load(Ordering::Relaxed);
        let code = self.last_reason.load(Ordering::Relaxed);
        (
            count,
            REASONS.get(usize::from(code).wrapping_sub(1)).copied(),
        )
    }

    /// The counts of the [`MINUTES`] minutes ending with `minute`, oldest
    /// first: `(admitted, refused)`.
    pub fn counts(&self, minute: u64) -> (Vec<u64>, Vec<u64>) {
        let minutes = (0..MINUTES as u64)
            .rev()
            .map(|back| minute.wrapping_sub(back));
        minutes
            .map(|m| (self.admitted[slot(m)].get(m), self.refused[slot(m)].get(m)))
            .unzip()
    }
}

fn slot(minute: u64) -> usize {
    (minute % MINUTES as u64) as usize
}

/// Every agent's last hour, and the current minute. Clones share it.
#[derive(Clone)]
pub struct History {
    inner: Arc<Inner>,
}

struct Inner {
    rings: papaya::HashMap<AgentId, Arc<Ring>, BuildHasherDefault<DigestHasher>>,
    minute: AtomicU64,
}

impl Default for History {
    fn default() -> Self {
        History {
            inner: Arc::new(Inner {
                rings: papaya::HashMap::with_hasher(BuildHasherDefault::default()),
                minute: AtomicU64::new(minute_now()),
            }),
        }
    }
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("agents", &self.inner.rings.len())
            .field("minute", &self.minute())
            .finish()
    }
}

impl History {
    /// The minute decisions are counted in.
    pub fn minute(&self) -> u64 {
        // Relaxed: a number, read alone.
        self.inner.minute.load(Ordering::Relaxed)
    }

    /// Sets the minute decisions are counted in (the background task
    /// does, every second; tests do).
    pub fn set_minute(&self, minute: u64) {
        self.inner.minute.store(minute, Ordering::Relaxed);
    }

    /// Reads the clock into the current minute.
    pub fn tick(&self) {
        self.set_minute(minute_now());
    }

    /// `agent`'s ring, if it has had a decision since the start.
    pub fn ring_of(&self, agent: &AgentId) -> Option<Arc<Ring>> {
        self.inner.rings.pin().get(agent).cloned()
    }

    /// The agents with a decision this minute or the one before.
    pub fn active_agents(&self) -> Vec<AgentId> {
        let minute = self.minute();
        let recent = [minute, minute.wrapping_sub(1)];
        self.inner
            .rings
            .pin()
            .iter()
            .filter(|(_, ring)| {
                recent
                    .iter()
                    .any(|&m| ring.admitted[slot(m)].get(m) > 0 || ring.refused[slot(m)].get(m) > 0)
            })
            .map(|(agent, _)| *agent)
            .collect()
    }

    /// Notes a refusal of `agent` for the alerts (not counted in the
    /// history: [`refuse`](Self::refuse) does that).
    pub fn note_refusal(&self, agent: &AgentId, reason: RefusalReason) {
        self.ring(agent).note_refusal(reason);
    }

    fn ring(&self, agent: &AgentId) -> Arc<Ring> {
        let rings = self.inner.rings.pin();
        if let Some(ring) = rings.get(agent) {
            return ring.clone();
        }
        rings.get_or_insert_with(*agent, Arc::default).clone()
    }

    /// Counts an admission for `agent` now.
    pub fn admit(&self, agent: &AgentId) {
        let rings = self.inner.rings.pin();
        let minute = self.minute();
        match rings.get(agent) {
            Some(ring) => ring.admit(minute),
            None => self.ring(agent).admit(minute),
        }
    }

    /// Counts a refusal for `agent` now.
    pub fn refuse(&self, agent: &AgentId) {
        let rings = self.inner.rings.pin();
        let minute = self.minute();
        match rings.get(agent) {
            Some(ring) => ring.refuse(minute),
            None => self.ring(agent).refuse(minute),
        }
    }

    /// Whether `agent` had a decision this minute or the one before.
    pub fn recently_active(&self, agent: &AgentId) -> bool {
        let rings = self.inner.rings.pin();
        let Some(ring) = rings.get(agent) else {
            return false;
        };
        let minute = self.minute();
        [minute, minute.wrapping_sub(1)]
            .iter()
            .any(|&m| ring.admitted[slot(m)].get(m) > 0 || ring.refused[slot(m)].get(m) > 0)
    }

    /// Forgets the agents `keep` says no to (deleted ones).
    pub fn retain(&self, keep: impl Fn(&AgentId) -> bool) {
        self.inner.rings.pin().retain(|agent, _| keep(agent));
    }

    /// `agent`'s last hour.
    pub fn view(&self, agent: &AgentId) -> HistoryView {
        let minute = self.minute();
        let (admitted, refused) = match self.inner.rings.pin().get(agent) {
            Some(ring) => ring.counts(minute),
            None => (vec![0; MINUTES], vec![0; MINUTES]),
        };
        HistoryView {
            agent_id: *agent,
            minute_secs: 60,
            last_minute_start: (minute.saturating_mul(60)).min(i64::MAX as u64) as i64,
            admitted,
            refused,
        }
    }
}

impl Observe for History {
    fn admitted(&self, agent: &AgentId) {
        self.admit(agent);
    }

    fn refused(&self, agent: &AgentId, reason: RefusalReason) {
        // A request that could not be read was not a budget's decision.
        if reason != RefusalReason::BadRequest {
            let rings = self.inner.rings.pin();
            let minute = self.minute();
            let ring = match rings.get(agent) {
                Some(ring) => ring.clone(),
                None => self.ring(agent),
            };
            ring.refuse(minute);
            ring.note_refusal(reason);
        }
    }
}

/// An agent's requests over the last hour, a count per minute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct HistoryView {
    /// The agent.
    pub agent_id: uuid::Uuid,
    /// The length of each count's interval, in seconds (60).
    pub minute_secs: u64,
    /// When the last (current) minute began, in seconds since the Unix
    /// epoch; the counts before it are the minutes before that.
    pub last_minute_start: i64,
    /// Requests admitted in each of the last 60 minutes, oldest first.
    #[schema(min_items = 60, max_items = 60)]
    pub admitted: Vec<u64>,
    /// Requests refused (by a budget, or because it could not be checked)
    /// in each of the last 60 minutes, oldest first.
    #[schema(min_items = 60, max_items = 60)]
    pub refused: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_their_minute_and_an_hour_later_start_over() {
        let history = History::default();
        let a = AgentId::from_u128(1);
        history.set_minute(1_000);
        history.admit(&a);
        history.admit(&a);
        history.refuse(&a);
        history.set_minute(1_001);
        history.admit(&a);
        let view = history.view(&a);
        assert_eq!(view.admitted.len(), MINUTES);
        assert_eq!(view.admitted[MINUTES - 2..], [2, 1]);
        assert_eq!(view.refused[MINUTES - 2..], [1, 0]);
        assert_eq!(view.last_minute_start, 1_001 * 60);
        assert!(history.recently_active(&a));
        // An hour on, the same slots hold the new minutes, from zero.
        history.set_minute(1_060);
        assert_eq!(history.view(&a).admitted.iter().sum::<u64>(), 1);
        assert!(!history.recently_active(&a));
        history.admit(&a);
        let view = history.view(&a);
        assert_eq!(view.admitted[MINUTES - 1], 1);
        assert_eq!(
            view.admitted.iter().sum::<u64>(),
            2,
            "1_001's one is still in the hour"
        );
        history.set_minute(1_061);
        assert_eq!(history.view(&a).admitted[MINUTES - 2..], [1, 0]);
        assert_eq!(history.view(&AgentId::from_u128(2)).admitted, vec![0; 60]);
    }

    #[test]
    fn concurrent_counts_are_all_counted() {
        let history = History::default();
        history.set_minute(7);
        let a = AgentId::from_u128(3);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        history.admit(&a);
                    }
                });
            }
        });
        assert_eq!(history.view(&a).admitted[MINUTES - 1], 40_000);
    }
}
