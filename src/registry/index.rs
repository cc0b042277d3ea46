//! The open-addressing index: 64-bit entries, id tag to slot, probed
//! linearly.

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
    used <= capacity / 4 * 3
}

/// A fixed-capacity table of entries: the registry replaces it whole when
/// it fills (see `Registry::rebuild`), and otherwise its one writer stores
/// single entries, which readers load one at a time.
pub(super) struct Index {
    entries: Box<[AtomicU64]>,
    /// 64 minus log2 of the capacity: a hash's top bits are its home.
    shift: u32,
}

/// The tag an entry keeps of `hash`: its low 32 bits, made odd so that no
/// live entry is empty or a tombstone.
#[inline]
pub(super) fn tag(hash: u64) -> u64 {
    u64::from(hash as u32 | 1)
}

impl Index {
    /// An empty index of `capacity` entries (a power of two, at least 2).
    pub(super) fn new(capacity: usize) -> Self {
        debug_assert!(capacity.is_power_of_two() && capacity >= 2);
        Index {
            entries: (0..capacity).map(|_| AtomicU64::new(EMPTY)).collect(),
            shift: 64 - capacity.trailing_zeros(),
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
            at: (hash >> self.shift) as usize,
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
        let mask = self.entries.len() - 1;
        let mut at = (hash >> self.shift) as usize;
        loop {
            // Relaxed: only the writer stores entries.
            match self.entries[at].load(Ordering::Relaxed) {
                EMPTY => return (at, false),
                TOMBSTONE => return (at, true),
                _ => at = (at + 1) & mask,
            }
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
        self.at = (at + 1) & (self.index.entries.len() - 1);
        Some((at, entry))
    }
}
