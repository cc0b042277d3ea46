//! The current index, read through a cache each thread keeps.
//!
//! The index is replaced whole when it grows (see `Registry::insert`), and
//! an operation must hold the one it probes for as long as it runs. An
//! `Arc` cloned per operation would make every admission increment and
//! decrement one shared counter; arc-swap's guard costs two locked
//! instructions. Instead each thread keeps the `Arc`s of the indexes it
//! read last, with the registry's generation when it read them, and an
//! operation takes its thread's copy (an `Rc`: a plain increment) as long
//! as the generation has not moved. The writer bumps the generation after
//! publishing a new index; a thread then loads the new one once.
//!
//! A thread's cache keeps an index alive until that thread's next
//! operation on the same registry, or until it has read [`CACHED`] other
//! registries since: at most that many indexes per thread, of registries
//! that may have been replaced or dropped since.
//!
//! Under loom there is no cache (loom's thread-locals must not hold
//! objects across its executions): each operation loads the index of the
//! generation it read, as a cache miss does. The indexes are kept by
//! generation in a `std` list the model does not split, so what makes an
//! index's entries visible to a reader is the generation's
//! `Release`/`Acquire` pair, which loom checks (a handover outside the
//! model that let a reader take a newer index than its generation let
//! loom show it that index's entries unwritten).

#[cfg(not(agent_budget_loom))]
use std::cell::RefCell;
use std::rc::Rc;

use super::index::Index;
use std::sync::Arc;

#[cfg(not(agent_budget_loom))]
use crate::sync::Shared;
use crate::sync::{AtomicU64, Ordering};

/// Registries a thread keeps an index of at once.
#[cfg(not(agent_budget_loom))]
const CACHED: usize = 4;

/// Tells registries apart in the caches (an address could be reused by a
/// registry made after another was dropped). Not part of loom's model: an
/// id is only ever compared.
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A registry's index, as published.
pub(super) struct Current {
    id: u64,
    generation: AtomicU64,
    #[cfg(not(agent_budget_loom))]
    index: Shared<Index>,
    /// Every index published, by generation.
    #[cfg(agent_budget_loom)]
    published: std::sync::Mutex<Vec<Arc<Index>>>,
}

/// One registry's index as a thread last read it.
#[cfg_attr(agent_budget_loom, allow(dead_code))]
struct Cached {
    id: u64,
    generation: u64,
    index: Arc<Index>,
}

#[cfg(not(agent_budget_loom))]
struct Cache {
    entries: [Option<Rc<Cached>>; CACHED],
    /// The entry a registry not in the cache replaces next.
    next: usize,
}

#[cfg(not(agent_budget_loom))]
std::thread_local! {
    // A constant initializer: no lazy-initialization check per access.
    static CACHE: RefCell<Cache> = const {
        RefCell::new(Cache {
            entries: [const { None }; CACHED],
            next: 0,
        })
    };
}

/// An index held for one operation (not `Send`: it is its thread's copy).
pub(super) struct Held(Rc<Cached>);

impl std::ops::Deref for Held {
    type Target = Index;

    #[inline]
    fn deref(&self) -> &Index {
        &self.0.index
    }
}

impl Current {
    pub(super) fn new(index: Arc<Index>) -> Self {
        Current {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            generation: AtomicU64::new(0),
            #[cfg(not(agent_budget_loom))]
            index: Shared::new(index),
            #[cfg(agent_budget_loom)]
            published: std::sync::Mutex::new(vec![index]),
        }
    }

    /// The current index, or one published after it.
    #[cfg(agent_budget_loom)]
    pub(super) fn load(&self) -> Held {
        let generation = self.generation.load(Ordering::Acquire);
        let index = self.published.lock().unwrap()[generation as usize].clone();
        Held(Rc::new(Cached {
            id: self.id,
            generation,
            index,
        }))
    }

    /// The current index, or one published after it.
    #[cfg(not(agent_budget_loom))]
    #[inline]
    pub(super) fn load(&self) -> Held {
        // Acquire: pairs with the Release in `publish`, so an index loaded
        // after this is the one published with this generation, or later.
        let generation = self.generation.load(Ordering::Acquire);
        let hit = CACHE.try_with(|cache| {
            let cache = cache.borrow();
            cache
                .entries
                .iter()
                .flatten()
                .find(|cached| cached.id == self.id && cached.generation == generation)
                .cloned()
        });
        match hit {
            Ok(Some(cached)) => Held(cached),
            _ => self.refresh(generation),
        }
    }

    /// Loads the index and keeps it in this thread's cache (in the entry of
    /// this registry if there is one, else in the next one round).
    #[cfg(not(agent_budget_loom))]
    #[cold]
    fn refresh(&self, generation: u64) -> Held {
        let fresh = Rc::new(Cached {
            id: self.id,
            generation,
            index: self.index.load_full(),
        });
        // During the thread's teardown the cache may be gone: the index is
        // then held for this operation only.
        let _ = CACHE.try_with(|cache| {
            let mut cache = cache.borrow_mut();
            let at = match cache
                .entries
                .iter()
                .position(|cached| cached.as_ref().is_some_and(|cached| cached.id == self.id))
            {
                Some(at) => at,
                None => {
                    let at = cache.next;
                    cache.next = (at + 1) % CACHED;
                    at
                }
            };
            cache.entries[at] = Some(fresh.clone());
        });
        Held(fresh)
    }

    /// Makes `index` current. The writer's alone.
    pub(super) fn publish(&self, index: Arc<Index>) {
        #[cfg(not(agent_budget_loom))]
        self.index.store(index);
        #[cfg(agent_budget_loom)]
        self.published.lock().unwrap().push(index);
        // Release: pairs with the Acquire in `load`: a thread that sees
        // this generation loads this index (or a later one).
        self.generation.fetch_add(1, Ordering::Release);
    }
}

#[cfg(all(test, not(agent_budget_loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_thread_reads_a_new_index_once_it_is_published_and_keeps_several_registries() {
        let registries: Vec<Current> = (0..CACHED + 1)
            .map(|_| Current::new(Arc::new(Index::new(4))))
            .collect();
        for (i, registry) in registries.iter().enumerate() {
            assert_eq!(registry.load().capacity(), 4, "registry {i}");
        }
        let first = &registries[1];
        let before = first.load();
        first.publish(Arc::new(Index::new(16)));
        assert_eq!(first.load().capacity(), 16, "the new index, at once");
        assert_eq!(before.capacity(), 4, "a held index stays as it was");
        let other = std::thread::scope(|s| s.spawn(|| first.load().capacity()).join().unwrap());
        assert_eq!(other, 16);
        // Cached: the same allocation again.
        assert!(Rc::ptr_eq(&first.load().0, &first.load().0));
    }
}
