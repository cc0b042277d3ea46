//! The open-addressing index: 64-bit entries, id tag to slot, probed
//! linearly from a home the hash scales to the capacity.

use crate::sync::{AtomicU64, Ordering};

/// An entry: the hash's low 32 bits (forced odd) above a [`SlotRef`].
/// Zero is an empty entry, which ends a probe; a tag of zero with a
/// nonzero slot part is a tombstone, which does not.
///
/// [`SlotRef`]: super::SlotRef
pub(super) const EMPTY: u64 = 0;
pub(super) const TOMBSTONE: u64 = 1;

/// At most this share of entries is used (live or tombstone): three
/// quarters. A successful lookup then probes 2.5 entries on average, within
/// the 8 of one cache line most of the time.
pub(super) fn fits(used: usize, capacity: usize) -> bool {
    used.saturating_mul(4) <= capacity.saturating_mul(3)
}

/// The capacity an index is rebuilt with for `live` entries, at least
/// `min`: three fifths full, so that it takes a quarter more agents before
/// the next rebuild. Any capacity works (a home is the hash scaled to it,
/// not masked), so the index is not rounded up to a power of two, which
/// left it between 3/8 and 3/4 full: at 100,000 agents it was 2 MiB where
/// this is 1.3 (the index is one of the two cache lines a lookup
/// touches, and at that size both miss).
pub(super) fn capacity_for(live: usize, min: usize) -> usize {
    (live.saturating_mul(5) / 3).max(min)
}

/// A fixed-capacity table of entries: the registry replaces it whole when
/// it fills (see `Registry::rebuild`), and otherwise its one writer stores
/// single entries, which readers load one at a time.
pub(super) struct Index {
    entries: Box<[AtomicU64]>,
}

/// The tag an entry keeps of `hash`: its low 32 bits, made odd so that no
/// live entry is empty or a tombstone.
#[inline]
pub(super) fn tag(hash: u64) -> u64 {
    u64::from(hash as u32 | 1)
}

impl Index {
    /// An empty index of `capacity` entries (at least 2).
    pub(super) fn new(capacity: usize) -> Self {
        debug_assert!(capacity >= 2);
        Index {
            entries: (0..capacity).map(|_| AtomicU64::new(EMPTY)).collect(),
        }
    }

    pub(super) fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// The first entry of `hash`'s probe, then the next ones in order,
    /// wrapping around, each loaded with `Acquire` (it publishes the cell it
    /// names); stops at an empty entry, or after a full turn.
    #[inline]
    pub(super) fn probe(&self, hash: u64) -> Probe<'_> {
        Probe {
            index: self,
            at: self.home(hash),
            left: self.entries.len(),
        }
    }

    /// Stores `entry` at `at`. The writer's alone: `Release`, so a reader
    /// that loads it sees the cell it names written.
    pub(super) fn set(&self, at: usize, entry: u64) {
        self.entries[at].store(entry, Ordering::Release);
    }

    /// Where an entry for `hash` can go: the first empty entry or
    /// tombstone of its probe. The writer's alone; the index is never full
    /// (see [`fits`]).
    pub(super) fn free_place(&self, hash: u64) -> (usize, bool) {
        let mut at = self.home(hash);
        loop {
            // Relaxed: only the writer stores entries.
            match self.entries[at].load(Ordering::Relaxed) {
                EMPTY => return (at, false),
                TOMBSTONE => return (at, true),
                _ => at = self.after(at),
            }
        }
    }

    /// Where `hash`'s probe starts: its high bits scaled to the capacity
    /// (a multiplication, where a power-of-two capacity took a shift).
    #[inline]
    fn home(&self, hash: u64) -> usize {
        ((u128::from(hash) * self.entries.len() as u128) >> 64) as usize
    }

    /// The place after `at`, wrapping around.
    #[inline]
    fn after(&self, at: usize) -> usize {
        if at + 1 == self.entries.len() {
            0
        } else {
            at + 1
        }
    }

    /// Every live entry, with its place.
    pub(super) fn live(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.entries
            .iter()
            .map(|entry| entry.load(Ordering::Acquire))
            .enumerate()
            .filter(|&(_, entry)| entry > TOMBSTONE && entry >> 32 != 0)
    }
}

/// The entries of one probe: see [`Index::probe`].
pub(super) struct Probe<'i> {
    index: &'i Index,
    at: usize,
    left: usize,
}

impl Iterator for Probe<'_> {
    /// An entry's place and value.
    type Item = (usize, u64);

    #[inline]
    fn next(&mut self) -> Option<(usize, u64)> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let at = self.at;
        let entry = self.index.entries[at].load(Ordering::Acquire);
        if entry == EMPTY {
            self.left = 0;
            return None;
        }
        self.at = self.index.after(at);
        Some((at, entry))
    }
}

#[cfg(all(test, not(agent_budget_loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_rebuilt_index_fits_its_entries_and_a_quarter_more() {
        for live in 1..5_000 {
            let capacity = capacity_for(live, 4);
            assert!(fits(live, capacity), "{live} in {capacity}");
            let more = live + live / 4;
            if capacity > 4 {
                assert!(!fits(more + 2, capacity), "{live}: {capacity} is oversized");
            }
            assert!(more < capacity, "{live}: never full");
        }
    }

    #[test]
    fn every_hash_is_found_from_its_home_at_any_capacity() {
        for capacity in [2, 3, 5, 7, 16, 100, 1_000] {
            let index = Index::new(capacity);
            let hashes: Vec<u64> = (1..=capacity as u64 * 3 / 4)
                .map(|n| n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
                .collect();
            for (n, &hash) in hashes.iter().enumerate() {
                assert!(index.home(hash) < capacity);
                let (place, reused) = index.free_place(hash);
                assert!(!reused);
                index.set(place, (tag(hash) << 32) | (n as u64 + 2));
            }
            for (n, &hash) in hashes.iter().enumerate() {
                let found = index
                    .probe(hash)
                    .find(|&(_, entry)| entry == (tag(hash) << 32) | (n as u64 + 2));
                assert!(found.is_some(), "capacity {capacity}: entry {n} lost");
            }
            assert_eq!(index.live().count(), hashes.len());
        }
    }
}
