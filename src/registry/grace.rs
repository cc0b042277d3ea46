//! Grace periods: when no operation can still be looking at a freed slot.
//!
//! # Implementation details
//!
//! Every operation on the registry announces itself in its thread's
//! *reader slot*: an odd sequence number while it runs, the next (even)
//! one once it is over. Nested operations on one thread announce once.
//!
//! The writer frees a slot in two steps. It first unlinks it (the index
//! entry becomes a tombstone or names another slot, the cell's word is
//! sealed), then calls [`Readers::begin_grace`], which puts a barrier between the
//! unlinking and everything after (see below) and notes every reader slot
//! that is odd: those operations may have found the slot before it was
//! unlinked. Once each of them has moved on ([`Grace::is_over`]: its slot
//! holds another number), no operation can still reach the old occupant,
//! and the slot can be given to another agent. The writer does not wait:
//! freed slots sit in limbo, and the next allocation takes those whose
//! grace period is over.
//!
//! **The barrier.** A reader announces with a plain store and goes on to
//! load index entries and cells; the writer unlinks with stores and then
//! reads the reader slots. Each side must see the other's first step, or
//! a reader could miss the unlink while the writer misses the
//! announcement (the store-buffering shape). The usual cure is a full
//! fence on both sides, which costs every operation a locked instruction
//! (arc-swap's guard, this module's predecessor, took two: 13–15 ns of a
//! 33 ns admission). Here the reader's side is a compiler fence only, and
//! the writer's is `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which
//! makes every running thread of the process execute a full barrier
//! before it returns. That barrier splits each reader: what it did
//! before is visible to the writer (its announcement, if it was running),
//! and what it does after sees the unlink. The writer pays about half a
//! microsecond, on removals and moves only. Where `membarrier` is not
//! available (not Linux, or a kernel older than 4.14), both sides use a
//! `SeqCst` fence instead: the same protocol, symmetric.
//!
//! Sequence numbers, not a global epoch: a reader may read a new epoch
//! and still load an index entry before its barrier point, so "announced
//! after the unlink" cannot be told from the number; "still the same
//! operation" can.
//!
//! Under loom the announcement and the writer's reads of the slots are
//! read-modify-writes (`AcqRel`) instead: loom does not model
//! `membarrier`, and treats `SeqCst` fences as acquire-release, which
//! would not forbid the store-buffering outcome. Two read-modify-writes
//! of one slot are ordered, and the later reads from the earlier, so
//! either the writer sees the announcement or the reader sees the unlink:
//! the guarantee the barrier gives, modelled. Loom's thread-locals and
//! statics must not hold loom objects across its executions, so there the
//! registry makes the slots itself ([`Readers`], one per model thread)
//! and a thread-local keeps only which slot is the thread's, its depth and
//! its sequence number.

#[cfg(not(agent_budget_loom))]
use std::cell::Cell;
use std::marker::PhantomData;

#[cfg(not(agent_budget_loom))]
use crate::sync::Mutex;
use crate::sync::{announce, observe, writer_barrier, Arc, AtomicU64, Ordering};

/// One thread's announcements: odd while an operation runs.
pub(super) struct Reader {
    sequence: AtomicU64,
}

/// Every thread's reader slot, for the writer to read. A thread's slot
/// leaves the list after the thread has ended (then only the list holds
/// it), when the next thread registers or a grace period begins.
#[cfg(not(agent_budget_loom))]
static READERS: Mutex<Vec<Arc<Reader>>> = Mutex::new(Vec::new());

/// The list, locked, without the slots of threads that have ended (only
/// the list held those). Both who lock it prune it: a thread registering,
/// so that a process whose threads come and go (tokio's blocking pool)
/// and that never removes an agent does not keep every slot it ever made;
/// and a grace period, which has no need to read them.
#[cfg(not(agent_budget_loom))]
fn live_readers() -> crate::sync::MutexGuard<'static, Vec<Arc<Reader>>> {
    let mut readers = READERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    readers.retain(|reader| Arc::strong_count(reader) > 1);
    readers
}

/// The reader slots a registry's writer reads: every thread's (a
/// process-wide list), or under loom the registry's own, one per model
/// thread.
#[cfg(not(agent_budget_loom))]
pub(super) struct Readers;

#[cfg(not(agent_budget_loom))]
impl Readers {
    pub(super) fn new() -> Self {
        Readers
    }
}

#[cfg(agent_budget_loom)]
pub(super) struct Readers {
    /// Tells registries apart in the threads' records (not modelled).
    id: usize,
    slots: Vec<Arc<Reader>>,
    /// Slots handed to threads so far. A loom mutex, as the process-wide
    /// list's is: a thread that takes its slot after a grace period began
    /// is ordered after the writer's unlinking by it (with a counter outside
    /// the model, loom found a reader that missed both).
    taken: crate::sync::Mutex<usize>,
}

/// Slots a registry makes under loom: more than a model has threads.
#[cfg(agent_budget_loom)]
const LOOM_THREADS: usize = 8;

#[cfg(agent_budget_loom)]
impl Readers {
    pub(super) fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        Readers {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            slots: (0..LOOM_THREADS)
                .map(|_| {
                    Arc::new(Reader {
                        sequence: AtomicU64::new(0),
                    })
                })
                .collect(),
            taken: crate::sync::Mutex::new(0),
        }
    }
}

/// Under loom, what a thread keeps for one registry: plain data only.
#[cfg(agent_budget_loom)]
struct LoomLocal {
    registry: usize,
    slot: usize,
    depth: u32,
    sequence: u64,
}

#[cfg(agent_budget_loom)]
loom::thread_local! {
    static LOOM_LOCAL: std::cell::RefCell<Vec<LoomLocal>> = std::cell::RefCell::new(Vec::new());
}

/// This thread's slot, how deep its operations are nested, and its next
/// sequence number.
#[cfg(not(agent_budget_loom))]
struct Local {
    reader: Arc<Reader>,
    depth: Cell<u32>,
    sequence: Cell<u64>,
}

#[cfg(not(agent_budget_loom))]
impl Local {
    fn register() -> Self {
        let reader = Arc::new(Reader {
            sequence: AtomicU64::new(0),
        });
        live_readers().push(reader.clone());
        Local {
            reader,
            depth: Cell::new(0),
            sequence: Cell::new(0),
        }
    }

    fn enter(&self) {
        let depth = self.depth.get();
        self.depth.set(depth + 1);
        if depth == 0 {
            let odd = self.sequence.get() + 1;
            self.sequence.set(odd);
            announce(&self.reader.sequence, odd);
        }
    }

    fn leave(&self) {
        let depth = self.depth.get() - 1;
        self.depth.set(depth);
        if depth == 0 {
            let even = self.sequence.get() + 1;
            self.sequence.set(even);
            // Release: pairs with the writer's read of the slot, so all
            // this operation did comes before the slot's reuse.
            self.reader.sequence.store(even, Ordering::Release);
        }
    }
}

#[cfg(not(agent_budget_loom))]
std::thread_local! {
    static LOCAL: Local = Local::register();
}

/// An operation in progress on this thread: while it lives, no slot it
/// could have found is reused. Not `Send`: it announces this thread.
pub(super) struct Announced<'r> {
    /// The registry's slots (under loom, where they are its own).
    #[cfg(agent_budget_loom)]
    readers: &'r Readers,
    #[cfg(not(agent_budget_loom))]
    readers: PhantomData<&'r Readers>,
    #[cfg(not(agent_budget_loom))]
    /// Set when the thread's slot was already gone (an operation made by a
    /// thread-local destructor): a slot of its own, dropped with it. A
    /// thread that ends mid-operation (an `Announced` leaked) leaves its
    /// slot odd: what it announced stays protected, and the slots waiting
    /// on it are never reused. Boxed so that an announcement is one word:
    /// with the slot inline (24 bytes), the common case wrote only its
    /// `None` and then copied the whole, and the copy's 16-byte load
    /// waited on that 8-byte store (store forwarding fails across sizes):
    /// `perf annotate` put a fifth of an admission's samples there.
    own: Option<Box<Local>>,
    _thread: PhantomData<*const ()>,
}

impl Readers {
    /// Announces an operation on this thread, until the result is dropped.
    #[cfg(not(agent_budget_loom))]
    #[inline(always)]
    pub(super) fn announce(&self) -> Announced<'_> {
        if LOCAL.try_with(Local::enter).is_ok() {
            return Announced {
                own: None,
                readers: PhantomData,
                _thread: PhantomData,
            };
        }
        let own = Box::new(Local::register());
        own.enter();
        Announced {
            own: Some(own),
            readers: PhantomData,
            _thread: PhantomData,
        }
    }

    #[cfg(agent_budget_loom)]
    pub(super) fn announce(&self) -> Announced<'_> {
        LOOM_LOCAL.with(|locals| {
            let mut locals = locals.borrow_mut();
            let at = match locals.iter().position(|l| l.registry == self.id) {
                Some(at) => at,
                None => {
                    let mut taken = self.taken.lock().unwrap();
                    let slot = *taken;
                    *taken += 1;
                    assert!(slot < LOOM_THREADS, "more model threads than reader slots");
                    locals.push(LoomLocal {
                        registry: self.id,
                        slot,
                        depth: 0,
                        sequence: 0,
                    });
                    locals.len() - 1
                }
            };
            let local = &mut locals[at];
            local.depth += 1;
            if local.depth == 1 {
                local.sequence += 1;
                announce(&self.slots[local.slot].sequence, local.sequence);
            }
        });
        Announced {
            readers: self,
            _thread: PhantomData,
        }
    }

    /// Begins a grace period for what the writer has unlinked so far.
    #[cfg(not(agent_budget_loom))]
    pub(super) fn begin_grace(&self) -> Grace {
        let barrier = writer_barrier();
        Grace::of(&live_readers(), barrier)
    }

    /// Begins a grace period for what the writer has unlinked so far.
    #[cfg(agent_budget_loom)]
    pub(super) fn begin_grace(&self) -> Grace {
        let barrier = writer_barrier();
        let taken = self.taken.lock().unwrap();
        Grace::of(&self.slots[..*taken], barrier)
    }
}

/// The end of an operation made on a slot of its own (see
/// `Announced::own`), which goes with it.
#[cfg(not(agent_budget_loom))]
#[cold]
#[inline(never)]
#[allow(clippy::boxed_local, reason = "the box is freed here, out of line")]
fn leave_own(own: Box<Local>) {
    own.leave();
}

impl Drop for Announced<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        // Taken, so that the field's own drop is known to have nothing
        // left to do and is not called out of line on the common path.
        #[cfg(not(agent_budget_loom))]
        match self.own.take() {
            None => {
                let _ = LOCAL.try_with(Local::leave);
            }
            Some(own) => leave_own(own),
        }
        #[cfg(agent_budget_loom)]
        {
            let readers = self.readers;
            LOOM_LOCAL.with(|locals| {
                let mut locals = locals.borrow_mut();
                let local = locals
                    .iter_mut()
                    .find(|l| l.registry == readers.id)
                    .expect("announced");
                local.depth -= 1;
                if local.depth == 0 {
                    local.sequence += 1;
                    readers.slots[local.slot]
                        .sequence
                        .store(local.sequence, Ordering::Release);
                }
            });
        }
    }
}

/// The operations a freed slot waits for.
pub(super) struct Grace {
    /// Each operation running when the grace period began: its thread's
    /// slot, and the number it held.
    running: Vec<(Arc<Reader>, u64)>,
    /// The barrier failed: the slot is never reused (it leaks; nothing
    /// else goes wrong).
    never: bool,
}

impl Grace {
    /// Notes which of `readers` are mid-operation.
    fn of(readers: &[Arc<Reader>], barrier: bool) -> Self {
        let running = readers
            .iter()
            .filter_map(|reader| {
                let sequence = observe(&reader.sequence);
                (sequence % 2 == 1).then(|| (reader.clone(), sequence))
            })
            .collect();
        Grace {
            running,
            never: !barrier,
        }
    }

    /// Whether every operation that was running when it began is over.
    pub(super) fn is_over(&self) -> bool {
        !self.never
            && self
                .running
                .iter()
                .all(|(reader, sequence)| observe(&reader.sequence) != *sequence)
    }
}

#[cfg(all(test, not(agent_budget_loom)))]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    static TEST_READERS: Readers = Readers;

    // Other tests' threads may be mid-operation when a grace period
    // begins: each test looks at its own threads' slots only.
    fn mine() -> Arc<Reader> {
        LOCAL.with(|local| local.reader.clone())
    }

    fn waits_on(grace: &Grace, reader: &Arc<Reader>) -> bool {
        grace.running.iter().any(|(running, sequence)| {
            Arc::ptr_eq(running, reader) && observe(&running.sequence) == *sequence
        })
    }

    #[test]
    fn a_grace_period_waits_for_the_operations_running_when_it_began() {
        let (announced, ready) = mpsc::channel();
        let (finish, finished) = mpsc::channel::<()>();
        let reader = std::thread::spawn(move || {
            let operation = TEST_READERS.announce();
            announced.send(mine()).unwrap();
            finished.recv_timeout(Duration::from_secs(10)).unwrap();
            drop(operation);
        });
        let theirs = ready.recv_timeout(Duration::from_secs(10)).unwrap();
        let grace = TEST_READERS.begin_grace();
        assert!(waits_on(&grace, &theirs), "an operation from before runs");
        assert!(!grace.is_over());
        // An operation that begins afterwards is not waited for.
        let later = TEST_READERS.announce();
        let nested = TEST_READERS.announce();
        assert!(!waits_on(&grace, &mine()));
        finish.send(()).unwrap();
        reader.join().unwrap();
        assert!(!waits_on(&grace, &theirs), "still waiting once it ended");
        drop((nested, later));
    }

    #[test]
    fn this_threads_own_operation_holds_a_grace_period_until_it_ends() {
        let outer = TEST_READERS.announce();
        let inner = TEST_READERS.announce();
        let grace = TEST_READERS.begin_grace();
        drop(inner);
        assert!(
            waits_on(&grace, &mine()),
            "the nested one ended the outer one"
        );
        drop(outer);
        assert!(!waits_on(&grace, &mine()));
        let next = TEST_READERS.announce();
        assert!(
            !waits_on(&grace, &mine()),
            "a new operation is not the old one"
        );
        drop(next);
    }

    #[test]
    fn the_slots_of_ended_threads_are_dropped_when_a_thread_starts() {
        let ended: Vec<std::sync::Weak<Reader>> = (0..8)
            .map(|_| {
                std::thread::spawn(|| {
                    drop(TEST_READERS.announce());
                    Arc::downgrade(&mine())
                })
                .join()
                .unwrap()
            })
            .collect();
        // A new thread's first operation registers its slot, and nothing
        // else: no grace period begins.
        std::thread::spawn(|| drop(TEST_READERS.announce()))
            .join()
            .unwrap();
        for (i, slot) in ended.iter().enumerate() {
            assert!(
                slot.upgrade().is_none(),
                "thread {i}'s slot is still listed"
            );
        }
    }

    #[test]
    fn a_thread_that_ended_is_not_waited_for() {
        let ended = std::thread::spawn(|| {
            drop(TEST_READERS.announce());
            mine()
        })
        .join()
        .unwrap();
        let grace = TEST_READERS.begin_grace();
        assert!(!grace.running.iter().any(|(r, _)| Arc::ptr_eq(r, &ended)));
    }
}
