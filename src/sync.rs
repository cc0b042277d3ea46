//! The one door through which the per-agent cell reaches shared memory.
//!
//! Every atomic, `Arc`, limit snapshot, clock read and map access of the
//! lock-free manager goes through this module, so that building with
//! `--cfg agent_budget_loom` swaps them all for types the `loom` model
//! checker can see, and loom checks the code that ships. In that build:
//!
//! | here                | normal build                 | loom build                               |
//! |---------------------|------------------------------|------------------------------------------|
//! | `AtomicU64`         | `std`'s                      | loom's: narrow words and index entries, with their orderings checked |
//! | `Published`         | `std`'s `AtomicU64`          | `std`'s: a cell's id and incarnation, written before the word that publishes them (one step fewer per load) |
//! | `AtomicU128`        | `portable_atomic::AtomicU128`| a loom `Mutex<u128>`: one visible step   |
//! | `Arc`               | `std::sync::Arc`             | loom's                                   |
//! | `Shared`            | `arc_swap::ArcSwap` (the registry's index) | none: the indexes kept by generation (see `registry::current`) |
//! | `announce`, `observe`, `writer_barrier` | a store and a compiler fence; a load; `membarrier` (`SeqCst` fences where it is missing) | read-modify-writes of the reader's slot, no barrier (see `registry::grace`) |
//! | `Snapshot`          | `arc_swap::ArcSwapOption`    | a loom `RwLock<Option<Arc<T>>>`          |
//! | [`ClockSource`]     | `quanta::Clock`              | a loom `AtomicU64` of nanoseconds        |
//! | `AgentMap` (waiters)| `papaya::HashMap` (aHash)    | a loom `RwLock<HashMap>`                 |
//!
//! The registry's arena chunks are `std::sync::OnceLock`s in both builds:
//! only the writer makes them, before any entry names their slots.
//!
//! What the model therefore does and does not cover is written down in the
//! crate docs, under "Model checking".

pub use imp::*;

#[cfg(not(agent_budget_loom))]
mod imp {
    pub(crate) use portable_atomic::AtomicU128;
    #[cfg(feature = "async")]
    pub(crate) use std::sync::atomic::{fence, AtomicUsize};
    pub(crate) use std::sync::atomic::{AtomicU64, Ordering};
    pub(crate) use std::sync::{Arc, Mutex, MutexGuard};

    /// A field the registry's writer stores before the word that publishes
    /// it (a cell's id and incarnation): an `AtomicU64` in both builds, but
    /// not one loom tracks (see the loom build's).
    pub(crate) type Published = AtomicU64;

    #[cfg(feature = "async")]
    use crate::types::AgentId;

    /// The clock the managers read: quanta's, calibrated at construction.
    pub type ClockSource = quanta::Clock;

    /// Reads nanoseconds elapsed since the moment it was made.
    pub(crate) enum Stopwatch {
        /// A TSC read and its scaling on every call.
        Precise { clock: ClockSource, origin: u64 },
        /// quanta's "recent" time: one atomic load of a value the upkeep
        /// thread refreshes every interval.
        Recent {
            clock: ClockSource,
            origin: quanta::Instant,
        },
    }

    impl Stopwatch {
        pub(crate) fn start(clock: ClockSource) -> Self {
            let origin = clock.raw();
            Stopwatch::Precise { clock, origin }
        }

        /// Reads `clock.recent()`, after making sure quanta's process-wide
        /// upkeep thread is running (started here at `interval` if no one
        /// has started it). A mock clock's recent time is its value.
        pub(crate) fn start_recent(
            clock: ClockSource,
            interval: std::time::Duration,
        ) -> std::io::Result<Self> {
            keep_recent_time_current(interval)?;
            let origin = clock.recent();
            Ok(Stopwatch::Recent { clock, origin })
        }

        /// Both readings saturate: `delta_as_nanos` and
        /// `saturating_duration_since` give zero for a reading below the
        /// origin, which quanta's TSC source can produce across cores.
        #[inline]
        pub(crate) fn nanos(&self) -> u64 {
            match self {
                Stopwatch::Precise { clock, origin } => clock.delta_as_nanos(*origin, clock.raw()),
                Stopwatch::Recent { clock, origin } => {
                    let elapsed = clock.recent().saturating_duration_since(*origin);
                    // Exact without `as_nanos`'s 128 bits: the duration is
                    // the difference of two u64 nanosecond counts.
                    elapsed
                        .as_secs()
                        .wrapping_mul(1_000_000_000)
                        .wrapping_add(u64::from(elapsed.subsec_nanos()))
                }
            }
        }
    }

    /// The upkeep thread this crate started, kept for the life of the
    /// process: dropping quanta's handle would stop the thread and freeze
    /// every recent clock.
    static UPKEEP: std::sync::Mutex<Option<quanta::Handle>> = std::sync::Mutex::new(None);

    fn keep_recent_time_current(interval: std::time::Duration) -> std::io::Result<()> {
        if interval.is_zero() {
            // The upkeep thread would spin on a core without ever sleeping.
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the coarse clock's upkeep interval must be longer than zero",
            ));
        }
        let mut upkeep = UPKEEP
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if upkeep.is_some() {
            return Ok(());
        }
        match quanta::Upkeep::new(interval).start() {
            Ok(handle) => {
                *upkeep = Some(handle);
                Ok(())
            }
            // Someone else runs it, at their interval.
            Err(quanta::Error::UpkeepRunning) => Ok(()),
            Err(quanta::Error::FailedToSpawnUpkeepThread(e)) => Err(e),
        }
    }

    /// Whether readers may announce with a compiler fence alone, the
    /// writer's `membarrier` supplying the CPU's (see `registry::grace`).
    /// Decided once per process, before the first announcement.
    #[inline]
    fn asymmetric() -> bool {
        static ASYMMETRIC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ASYMMETRIC.get_or_init(register_membarrier)
    }

    #[cfg(target_os = "linux")]
    fn register_membarrier() -> bool {
        use rustix::thread::{membarrier, membarrier_query, MembarrierCommand};
        membarrier_query().contains_command(MembarrierCommand::PrivateExpedited)
            && membarrier(MembarrierCommand::RegisterPrivateExpedited).is_ok()
    }

    #[cfg(not(target_os = "linux"))]
    fn register_membarrier() -> bool {
        false
    }

    /// A reader's announcement: `value` stored in its slot, ordered before
    /// the loads of the operation it announces.
    #[inline]
    pub(crate) fn announce(slot: &AtomicU64, value: u64) {
        slot.store(value, Ordering::Relaxed);
        if asymmetric() {
            std::sync::atomic::compiler_fence(Ordering::SeqCst);
        } else {
            std::sync::atomic::fence(Ordering::SeqCst);
        }
    }

    /// The writer's read of a reader's slot, after [`writer_barrier`].
    /// Acquire: pairs with the Release that ends an operation.
    pub(crate) fn observe(slot: &AtomicU64) -> u64 {
        slot.load(Ordering::Acquire)
    }

    /// Orders the writer's stores so far before its reads of the reader
    /// slots, and every reader's announcement before them or after the
    /// stores: `membarrier` (a full barrier on every running thread of the
    /// process), or a `SeqCst` fence where readers fence themselves.
    /// `false` if the barrier could not be made.
    pub(crate) fn writer_barrier() -> bool {
        if !asymmetric() {
            std::sync::atomic::fence(Ordering::SeqCst);
            return true;
        }
        #[cfg(target_os = "linux")]
        {
            use rustix::thread::{membarrier, MembarrierCommand};
            membarrier(MembarrierCommand::PrivateExpedited).is_ok()
        }
        #[cfg(not(target_os = "linux"))]
        {
            true
        }
    }

    pub(crate) fn default_clock() -> ClockSource {
        // Calibrates the TSC (once per process) here, not on a hot path.
        quanta::Clock::new()
    }

    /// An atomically replaceable, optional `Arc<T>`, read without locks.
    pub(crate) struct Snapshot<T>(arc_swap::ArcSwapOption<T>);

    impl<T> Snapshot<T> {
        pub(crate) fn new(value: Option<T>) -> Self {
            Snapshot(arc_swap::ArcSwapOption::new(value.map(std::sync::Arc::new)))
        }

        /// Reads the value through a cheap, short-lived view: arc-swap's
        /// thread-local debt slot, not a reference-count increment, so
        /// readers of a hot agent do not contend on the `Arc`'s counter.
        pub(crate) fn read<R>(&self, f: impl FnOnce(Option<&T>) -> R) -> R {
            f(self.0.load().as_deref())
        }

        pub(crate) fn store(&self, value: Option<T>) {
            self.0.store(value.map(std::sync::Arc::new));
        }
    }

    /// An atomically replaceable `Arc<T>`: the registry's index, which
    /// threads load whole into their caches (see `registry::current`).
    pub(crate) struct Shared<T>(arc_swap::ArcSwap<T>);

    impl<T> Shared<T> {
        pub(crate) fn new(value: Arc<T>) -> Self {
            Shared(arc_swap::ArcSwap::new(value))
        }

        /// The value itself, counted.
        pub(crate) fn load_full(&self) -> Arc<T> {
            self.0.load_full()
        }

        /// Replaces the value. Once this returns, the old value's reference
        /// count counts every reader still holding it.
        pub(crate) fn store(&self, value: Arc<T>) {
            self.0.store(value);
        }
    }

    /// A concurrent map from agent id to `V` (a waiters' queue behind an
    /// `Arc`).
    ///
    /// aHash with a random per-process key: agent ids may come from clients,
    /// so the hasher must resist chosen collisions, and aHash does so at a
    /// fraction of SipHash's cost for a 16-byte key.
    ///
    /// Blocking resizes: with papaya's default incremental mode, lookups
    /// after a resize begun by `try_insert` kept probing the old table
    /// (measured: 130 ns instead of 16 ns per lookup at 1,000 agents).
    /// Blocking only makes the insert that grows the table wait; every
    /// lookup then sees a single table.
    #[cfg(feature = "async")]
    pub(crate) struct AgentMap<V>(papaya::HashMap<AgentId, V, ahash::RandomState>);

    #[cfg(feature = "async")]
    impl<V: Send + Sync> AgentMap<V> {
        pub(crate) fn new() -> Self {
            let map = papaya::HashMap::builder()
                .hasher(ahash::RandomState::new())
                .resize_mode(papaya::ResizeMode::Blocking)
                .build();
            AgentMap(map)
        }

        pub(crate) fn get<R>(&self, id: &AgentId, f: impl FnOnce(&V) -> R) -> Option<R> {
            self.0.pin().get(id).map(f)
        }

        /// The value for `id`, inserting `make()` if there is none. `make`
        /// may run and be thrown away if another thread inserts first.
        pub(crate) fn get_or_insert(&self, id: &AgentId, make: impl Fn() -> V) -> V
        where
            V: Clone,
        {
            let map = self.0.pin();
            loop {
                if let Some(present) = map.get(id) {
                    return present.clone();
                }
                // Inserted, or someone else's is there now: read it above (or,
                // if it is already removed again, insert once more).
                let _ = map.try_insert(*id, make());
            }
        }

        /// Removes the value for `id` if `condition` holds for it.
        pub(crate) fn remove_if(&self, id: &AgentId, condition: impl Fn(&V) -> bool) {
            // Err: the value is there and `condition` does not hold.
            let _ = self.0.pin().remove_if(id, |_, present| condition(present));
        }

        pub(crate) fn for_each(&self, mut f: impl FnMut(&AgentId, &V)) {
            for (id, value) in self.0.pin().iter() {
                f(id, value);
            }
        }
    }
}

#[cfg(agent_budget_loom)]
mod imp {
    pub(crate) use loom::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
    pub(crate) use loom::sync::Arc;
    use loom::sync::RwLock;

    /// A cell's id and incarnation: written by the registry's writer before
    /// the usage word (or index entry) that publishes them, which loom does
    /// track, with their orderings. Left out of the model so that each
    /// lookup is three steps fewer: what is checked is that every reader
    /// gets to them through a loom-tracked `Acquire` load.
    pub(crate) type Published = std::sync::atomic::AtomicU64;
    pub(crate) use loom::sync::{Mutex, MutexGuard};
    #[cfg(feature = "async")]
    use std::collections::HashMap;

    #[cfg(feature = "async")]
    use crate::types::AgentId;

    /// loom has no 128-bit atomic. A mutex makes each operation one
    /// loom-visible step, which is what a native `cmpxchg16b` is.
    pub(crate) struct AtomicU128(Mutex<u128>);

    impl AtomicU128 {
        pub(crate) fn new(value: u128) -> Self {
            AtomicU128(Mutex::new(value))
        }

        pub(crate) fn load(&self, _: Ordering) -> u128 {
            *self.0.lock().unwrap()
        }

        pub(crate) fn store(&self, value: u128, _: Ordering) {
            *self.0.lock().unwrap() = value;
        }

        pub(crate) fn compare_exchange_weak(
            &self,
            current: u128,
            new: u128,
            _: Ordering,
            _: Ordering,
        ) -> Result<u128, u128> {
            let mut value = self.0.lock().unwrap();
            if *value == current {
                *value = new;
                Ok(current)
            } else {
                Err(*value)
            }
        }
    }

    /// A mock clock the model's threads advance: nanoseconds in a loom
    /// atomic, so a clock read is a step loom can interleave.
    #[derive(Clone)]
    pub struct ClockSource(Arc<AtomicU64>);

    impl ClockSource {
        /// A clock at zero.
        pub fn mock() -> Self {
            ClockSource(Arc::new(AtomicU64::new(0)))
        }

        /// Moves the clock forward.
        pub fn advance(&self, by: std::time::Duration) {
            let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
            // Relaxed: the clock value is all that is shared; a reader that
            // misses the advance reads an earlier time, as a real one may.
            self.0.fetch_add(nanos, Ordering::Relaxed);
        }
    }

    pub(crate) struct Stopwatch {
        clock: ClockSource,
        origin: u64,
    }

    impl Stopwatch {
        pub(crate) fn start(clock: ClockSource) -> Self {
            let origin = clock.0.load(Ordering::Relaxed);
            Stopwatch { clock, origin }
        }

        pub(crate) fn nanos(&self) -> u64 {
            self.clock
                .0
                .load(Ordering::Relaxed)
                .saturating_sub(self.origin)
        }
    }

    pub(crate) fn default_clock() -> ClockSource {
        ClockSource::mock()
    }

    /// A read-modify-write: loom models neither `membarrier` nor `SeqCst`
    /// fences as more than acquire-release, but two read-modify-writes of
    /// one slot are ordered and the later reads from the earlier (see
    /// `registry::grace`).
    pub(crate) fn announce(slot: &AtomicU64, value: u64) {
        slot.swap(value, Ordering::AcqRel);
    }

    /// A read-modify-write, for the same reason as [`announce`].
    pub(crate) fn observe(slot: &AtomicU64) -> u64 {
        slot.fetch_add(0, Ordering::AcqRel)
    }

    pub(crate) fn writer_barrier() -> bool {
        true
    }

    pub(crate) struct Snapshot<T>(RwLock<Option<Arc<T>>>);

    impl<T> Snapshot<T> {
        pub(crate) fn new(value: Option<T>) -> Self {
            Snapshot(RwLock::new(value.map(Arc::new)))
        }

        pub(crate) fn read<R>(&self, f: impl FnOnce(Option<&T>) -> R) -> R {
            let value = self.0.read().unwrap().clone();
            f(value.as_deref())
        }

        pub(crate) fn store(&self, value: Option<T>) {
            *self.0.write().unwrap() = value.map(Arc::new);
        }
    }

    /// Values are `Arc`s, cloned out and used after the lock is released,
    /// so, as with papaya, an operation may still be working on a cell that
    /// a concurrent `remove` has just taken out of the map.
    #[cfg(feature = "async")]
    pub(crate) struct AgentMap<V>(RwLock<HashMap<AgentId, V>>);

    #[cfg(feature = "async")]
    impl<V: Clone> AgentMap<V> {
        pub(crate) fn new() -> Self {
            AgentMap(RwLock::new(HashMap::new()))
        }

        fn find(&self, id: &AgentId) -> Option<V> {
            self.0.read().unwrap().get(id).cloned()
        }

        pub(crate) fn get<R>(&self, id: &AgentId, f: impl FnOnce(&V) -> R) -> Option<R> {
            self.find(id).map(|value| f(&value))
        }

        pub(crate) fn get_or_insert(&self, id: &AgentId, make: impl Fn() -> V) -> V {
            let mut map = self.0.write().unwrap();
            map.entry(*id).or_insert_with(make).clone()
        }

        pub(crate) fn remove_if(&self, id: &AgentId, condition: impl Fn(&V) -> bool) {
            let mut map = self.0.write().unwrap();
            if map.get(id).is_some_and(&condition) {
                map.remove(id);
            }
        }

        pub(crate) fn for_each(&self, mut f: impl FnMut(&AgentId, &V)) {
            let values: Vec<(AgentId, V)> = self
                .0
                .read()
                .unwrap()
                .iter()
                .map(|(id, v)| (*id, v.clone()))
                .collect();
            for (id, value) in values {
                f(&id, &value);
            }
        }
    }
}

#[cfg(all(test, not(agent_budget_loom)))]
mod tests {
    use super::*;
    #[cfg(feature = "async")]
    use crate::types::AgentId;

    #[cfg(feature = "async")]
    #[test]
    fn get_or_insert_inserts_once_and_remove_if_checks_first() {
        let map = AgentMap::new();
        let id = AgentId::from_u128(1);
        assert_eq!(map.get_or_insert(&id, || "first"), "first");
        assert_eq!(map.get_or_insert(&id, || "second"), "first");
        map.remove_if(&id, |v| *v == "second");
        assert_eq!(map.get(&id, |v| *v), Some("first"));
        map.remove_if(&id, |v| *v == "first");
        assert_eq!(map.get(&id, |v| *v), None);
        let mut seen = 0;
        map.for_each(|_, _| seen += 1);
        assert_eq!(seen, 0);
    }

    #[test]
    fn both_stopwatches_saturate_below_their_origin() {
        let (clock, mock) = quanta::Clock::mock();
        mock.increment(1_000u64);
        let precise = Stopwatch::start(clock.clone());
        let recent = Stopwatch::start_recent(clock, std::time::Duration::from_millis(1)).unwrap();
        mock.increment(500u64);
        assert_eq!((precise.nanos(), recent.nanos()), (500, 500));
        mock.decrement(900u64);
        assert_eq!((precise.nanos(), recent.nanos()), (0, 0));
    }

    #[test]
    fn both_stopwatches_count_every_nanosecond_past_whole_seconds() {
        let (clock, mock) = quanta::Clock::mock();
        let precise = Stopwatch::start(clock.clone());
        let recent = Stopwatch::start_recent(clock, std::time::Duration::from_millis(1)).unwrap();
        for step in [999_999_999u64, 1, 3_600_000_000_007, 7] {
            mock.increment(step);
            assert_eq!(precise.nanos(), recent.nanos(), "after a step of {step} ns");
        }
        assert_eq!(recent.nanos(), 3_601_000_000_014);
    }
}
