//! Cells that never move: chunks allocated once, never freed or grown.

use std::sync::OnceLock;

/// The first chunk's cells; chunk `k` holds `FIRST << k`. Small under loom,
/// where every cell's atomics are objects the model tracks.
#[cfg(not(agent_budget_loom))]
const FIRST: usize = 64;
#[cfg(agent_budget_loom)]
const FIRST: usize = 2;

/// Enough chunks for every slot a [`SlotRef`](super::SlotRef) can name.
const CHUNKS: usize = 32 - FIRST.trailing_zeros() as usize;

/// Cells by slot number, in chunks of doubling size. A chunk is allocated
/// by the registry's writer before any index entry names one of its slots,
/// and then stays where it is for the life of the arena: a reference to a
/// cell is good for as long as the arena is, whatever the index does.
///
/// Doubling keeps the chunk of a slot one `leading_zeros` away and the
/// chunks few (26 at most); the last chunk may be up to half unused.
pub(super) struct Arena<C> {
    chunks: [OnceLock<Box<[C]>>; CHUNKS],
}

/// The chunk holding `slot`, and the slot's place in it.
#[inline]
fn locate(slot: u32) -> (usize, usize) {
    let n = slot as usize / FIRST + 1;
    let chunk = (usize::BITS - 1 - n.leading_zeros()) as usize;
    (chunk, slot as usize - FIRST * ((1 << chunk) - 1))
}

impl<C> Arena<C> {
    pub(super) fn new() -> Self {
        Arena {
            chunks: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// The cell at `slot`, if its chunk exists (it does for every slot an
    /// index entry or a handle names).
    #[inline]
    pub(super) fn get(&self, slot: u32) -> Option<&C> {
        let (chunk, at) = locate(slot);
        self.chunks.get(chunk)?.get()?.get(at)
    }

    /// The cell at `slot`, making its chunk with `vacant` cells first if
    /// need be. The writer's alone. `None` past the last chunk.
    pub(super) fn make(&self, slot: u32, vacant: impl Fn() -> C) -> Option<&C> {
        let (chunk, at) = locate(slot);
        let cells = self
            .chunks
            .get(chunk)?
            .get_or_init(|| (0..FIRST << chunk).map(|_| vacant()).collect());
        cells.get(at)
    }
}

#[cfg(all(test, not(agent_budget_loom)))]
mod tests {
    use super::*;

    #[test]
    fn slots_map_onto_chunks_of_doubling_size_without_gaps() {
        let mut expected = (0, 0);
        for slot in 0..(FIRST as u32) * 40 {
            assert_eq!(locate(slot), expected, "slot {slot}");
            expected.1 += 1;
            if expected.1 == FIRST << expected.0 {
                expected = (expected.0 + 1, 0);
            }
        }
        assert_eq!(locate(u32::MAX >> 1).0, CHUNKS - 1);
    }

    #[test]
    fn cells_stay_put_and_are_found_again() {
        let arena = Arena::new();
        let first = arena.make(0, || std::cell::Cell::new(0)).unwrap() as *const _;
        for slot in 0..1_000 {
            arena
                .make(slot, || std::cell::Cell::new(0))
                .unwrap()
                .set(slot);
        }
        assert_eq!(arena.get(0).unwrap() as *const _, first);
        assert_eq!(arena.get(999).map(std::cell::Cell::get), Some(999));
        assert!(arena.get(100_000).is_none());
    }
}
