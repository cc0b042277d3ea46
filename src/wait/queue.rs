//! Per-agent queues of futures waiting for budget, and the rule that picks
//! whom an event wakes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::task::Waker;

use crate::sync::{fence, AgentMap, AtomicUsize, Mutex, MutexGuard, Ordering};
use crate::types::AgentId;

/// What an agent can still admit right now, `(tokens, calls)`, as the wake
/// rule sees it; `None` when the agent has no budget (any more).
pub(crate) type Headroom = Option<(u64, u64)>;

/// Every waiting future of one manager, queued by agent.
///
/// Queues exist only while someone waits: the first waiter of an agent
/// makes its queue, the last one to leave takes it out of the map. A
/// manager with no one waiting holds an empty map and a zero count, and
/// its refund paths read that count and nothing else.
pub(crate) struct Waiters {
    /// Futures in some queue. The refund paths read it to skip the map
    /// entirely when it is zero; see [`Waiters::wake`] for the pairing.
    registered: AtomicUsize,
    queues: AgentMap<Arc<WaitQueue>>,
}

/// The futures waiting on one agent, oldest first.
pub(crate) struct WaitQueue {
    agent_id: AgentId,
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    /// Keyed by arrival, so iteration is oldest first and the first key is
    /// the head.
    entries: BTreeMap<u64, Entry>,
    next_id: u64,
    /// Set by the last entry to leave, just before it takes the queue out
    /// of the map. A registrar that still finds it there helps take it out
    /// and makes a new one, so no entry is ever added to a dropped queue.
    closed: bool,
}

struct Entry {
    /// `(tokens, calls)` the future asks for.
    request: (u64, u64),
    waker: Waker,
    /// Woken by the wake rule and not polled since: the rule counts its
    /// request as already spoken for, so one refund does not wake two
    /// futures for the same tokens.
    woken: bool,
}

/// A future's place in its agent's queue, from registration to leaving.
pub(crate) struct Place {
    queue: Arc<WaitQueue>,
    id: u64,
}

/// Whom an event wakes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wake {
    /// The waiters whose requests fit in this headroom, oldest first.
    Fitting(Headroom),
    /// Every waiter: the limit changed or the agent went away, so each
    /// must look again (and some will give up).
    All,
}

impl Default for Waiters {
    fn default() -> Self {
        Self::new()
    }
}

impl Waiters {
    pub(crate) fn new() -> Self {
        Waiters {
            registered: AtomicUsize::new(0),
            queues: AgentMap::new(),
        }
    }

    /// How many futures are waiting, over all agents.
    pub(crate) fn len(&self) -> usize {
        // Relaxed: a statistic; nothing is read on the strength of it.
        self.registered.load(Ordering::Relaxed)
    }

    /// Puts a future at the back of `agent_id`'s queue.
    ///
    /// The caller must try to admit once more after this returns, before
    /// it sleeps: that attempt and a racing refund's [`Waiters::wake`] are
    /// the two halves of the pairing described there. Returns the place,
    /// and whether it is at the head of the queue.
    pub(crate) fn register(
        &self,
        agent_id: &AgentId,
        request: (u64, u64),
        waker: &Waker,
    ) -> (Place, bool) {
        let place = loop {
            let queue = self.queues.get_or_insert(agent_id, || {
                Arc::new(WaitQueue {
                    agent_id: *agent_id,
                    state: Mutex::new(QueueState::default()),
                })
            });
            let mut state = lock(&queue.state);
            if state.closed {
                drop(state);
                self.queues.remove_if(agent_id, |q| Arc::ptr_eq(q, &queue));
                continue;
            }
            let id = state.next_id;
            state.next_id += 1;
            let entry = Entry {
                request,
                waker: waker.clone(),
                woken: false,
            };
            state.entries.insert(id, entry);
            let head = state.is_head(id);
            drop(state);
            break (Place { queue, id }, head);
        };
        // SeqCst, and after the entry is in its queue: pairs with the load
        // in `wake`. If the refund's load comes later in the single total
        // order, it sees this increment (or a later one in the count's
        // chain of read-modify-writes, which still synchronizes with it) and
        // so finds the entry; if it comes earlier, the fence below comes
        // after the refund's compare-and-swap too, and the caller's next
        // attempt sees the refund.
        self.registered.fetch_add(1, Ordering::SeqCst);
        // Orders the caller's next attempt, a relaxed load of the usage
        // word, after the increment: the other half of the store-buffering
        // pattern with `wake` (a refund's SeqCst compare-and-swap, then its
        // SeqCst load of `registered`).
        fence(Ordering::SeqCst);
        place
    }

    /// Called by a future each time it is polled: stores its current waker
    /// and clears its "woken" mark (this poll is the wake's answer).
    /// Returns whether it is at the head of its queue.
    pub(crate) fn refresh(&self, place: &Place, waker: &Waker) -> bool {
        let mut state = lock(&place.queue.state);
        if let Some(entry) = state.entries.get_mut(&place.id) {
            if !entry.waker.will_wake(waker) {
                entry.waker = waker.clone();
            }
            entry.woken = false;
        }
        state.is_head(place.id)
    }

    /// Takes a future out of its queue, for good.
    ///
    /// A future that leaves without taking budget after it was woken passes
    /// its wake on (the budget it was woken for is still there, and another
    /// waiter may need it); a head that leaves wakes the new head, which
    /// then keeps the timer for the window's end. The last one out takes
    /// the queue out of the map.
    pub(crate) fn leave(&self, place: Place, took: bool, headroom: impl FnOnce() -> Headroom) {
        let agent_id = place.queue.agent_id;
        let mut state = lock(&place.queue.state);
        let was_head = state.is_head(place.id);
        let entry = state.entries.remove(&place.id);
        if state.entries.is_empty() {
            state.closed = true;
            drop(state);
            self.queues
                .remove_if(&agent_id, |q| Arc::ptr_eq(q, &place.queue));
        } else {
            if entry.is_some_and(|e| e.woken && !took) {
                state.wake(Wake::Fitting(headroom()), None);
            }
            if was_head {
                state.wake_head();
            }
        }
        // Relaxed: the count only lets refunds skip the map; a stale
        // non-zero costs one needless lookup.
        self.registered.fetch_sub(1, Ordering::Relaxed);
    }

    /// Wakes `agent_id`'s waiters that `wake` selects, if it has any.
    ///
    /// Refund paths call this right after their compare-and-swap, which
    /// must be `SeqCst`: with the `SeqCst` load of `registered` below, it
    /// pairs with [`Waiters::register`] so that a refund racing a future's
    /// registration either is seen by the future's next attempt or finds the
    /// future here. When no one waits anywhere, this is that one load.
    pub(crate) fn wake(&self, agent_id: &AgentId, wake: impl FnOnce() -> Wake) {
        if self.registered.load(Ordering::SeqCst) == 0 {
            return;
        }
        if let Some(queue) = self.queues.get(agent_id, Arc::clone) {
            lock(&queue.state).wake(wake(), None);
        }
    }

    /// Wakes every waiter of every agent: the whole state was replaced.
    pub(crate) fn wake_everyone(&self) {
        if self.registered.load(Ordering::SeqCst) == 0 {
            return;
        }
        self.queues
            .for_each(|_, queue| lock(&queue.state).wake(Wake::All, None));
    }

    /// The head's timer fired: its window has ended, so the waiters that
    /// fit in the fresh one are woken, oldest first. The head itself is
    /// polling and is not woken, but its request is counted first.
    pub(crate) fn window_ended(&self, place: &Place, headroom: Headroom) {
        lock(&place.queue.state).wake(Wake::Fitting(headroom), Some(place.id));
    }
}

impl QueueState {
    fn is_head(&self, id: u64) -> bool {
        self.entries
            .first_key_value()
            .is_some_and(|(&k, _)| k == id)
    }

    /// The wake rule. Walks the queue oldest first with what is left,
    /// counting the requests of waiters already woken (and not yet polled)
    /// as taken, and wakes each waiter whose request fits in the rest.
    /// A request that does not fit is skipped, not waited for: a smaller
    /// one behind it may take a refund it cannot use. `polling` is the
    /// waiter running this rule from its own poll: counted, not woken.
    fn wake(&mut self, wake: Wake, polling: Option<u64>) {
        let Wake::Fitting(Some((mut tokens, mut calls))) = wake else {
            for (&id, entry) in &mut self.entries {
                if Some(id) != polling && !entry.woken {
                    entry.woken = true;
                    entry.waker.wake_by_ref();
                }
            }
            return;
        };
        for (&id, entry) in &mut self.entries {
            let (want_tokens, want_calls) = entry.request;
            let fits = want_tokens <= tokens && want_calls <= calls;
            if entry.woken || fits {
                tokens = tokens.saturating_sub(want_tokens);
                calls = calls.saturating_sub(want_calls);
            }
            if fits && !entry.woken && Some(id) != polling {
                entry.woken = true;
                entry.waker.wake_by_ref();
            }
            if tokens == 0 && calls == 0 {
                // Requests of zero never wait, so nothing else fits.
                break;
            }
        }
    }

    /// Wakes the head so that it takes over the window-end timer; its
    /// "woken" mark stays clear, as no budget is spoken for.
    fn wake_head(&self) {
        if let Some((_, head)) = self.entries.first_key_value() {
            if !head.woken {
                head.waker.wake_by_ref();
            }
        }
    }
}

/// Locks a queue. A poisoned lock is taken over: every update of the state
/// it guards is complete before anything that could panic.
fn lock(state: &Mutex<QueueState>) -> MutexGuard<'_, QueueState> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(all(test, not(agent_budget_loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize as Counter;
    use std::task::Wake as WakeTrait;

    /// A waker that counts its wakes.
    #[derive(Default)]
    struct Count(Counter);

    impl WakeTrait for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count::default());
        (count.clone(), Waker::from(count))
    }

    fn wakes(count: &Count) -> usize {
        count.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    const AGENT: AgentId = AgentId::from_u128(1);

    #[test]
    fn a_refund_wakes_the_oldest_waiters_it_can_pay_for_and_skips_the_rest() {
        let waiters = Waiters::new();
        let (big, big_waker) = counting();
        let (small, small_waker) = counting();
        let (later, later_waker) = counting();
        let (_big_place, head) = waiters.register(&AGENT, (100, 1), &big_waker);
        assert!(head);
        let (_small_place, head) = waiters.register(&AGENT, (10, 1), &small_waker);
        assert!(!head);
        let (_later_place, _) = waiters.register(&AGENT, (10, 1), &later_waker);
        // 15 tokens come back: too few for the head, enough for one small.
        waiters.wake(&AGENT, || Wake::Fitting(Some((15, 5))));
        assert_eq!((wakes(&big), wakes(&small), wakes(&later)), (0, 1, 0));
        // Another 5 while the first small one has not run yet: its 10 are
        // spoken for, so this wakes no one.
        waiters.wake(&AGENT, || Wake::Fitting(Some((15, 5))));
        assert_eq!((wakes(&big), wakes(&small), wakes(&later)), (0, 1, 0));
        waiters.wake(&AGENT, || Wake::All);
        assert_eq!((wakes(&big), wakes(&small), wakes(&later)), (1, 1, 1));
    }

    #[test]
    fn a_fresh_window_goes_to_the_head_first() {
        let waiters = Waiters::new();
        let (big, big_waker) = counting();
        let (small, small_waker) = counting();
        let (big_place, _) = waiters.register(&AGENT, (100, 1), &big_waker);
        let (_small_place, _) = waiters.register(&AGENT, (10, 1), &small_waker);
        // The head's timer fired; the window holds exactly the head.
        waiters.window_ended(&big_place, Some((100, 10)));
        // The head is polling (not woken again); the small one does not fit
        // beside it.
        assert_eq!((wakes(&big), wakes(&small)), (0, 0));
        waiters.window_ended(&big_place, Some((110, 10)));
        assert_eq!((wakes(&big), wakes(&small)), (0, 1));
    }

    #[test]
    fn a_woken_waiter_that_leaves_without_taking_passes_its_wake_on() {
        let waiters = Waiters::new();
        let (_, first_waker) = counting();
        let (second, second_waker) = counting();
        let (first_place, _) = waiters.register(&AGENT, (10, 1), &first_waker);
        let (_second_place, _) = waiters.register(&AGENT, (10, 1), &second_waker);
        waiters.wake(&AGENT, || Wake::Fitting(Some((10, 1))));
        assert_eq!(wakes(&second), 0);
        // The first was woken for those 10 tokens, and is dropped instead.
        waiters.leave(first_place, false, || Some((10, 1)));
        // Woken twice: once as the new head, once for the budget.
        assert!(wakes(&second) >= 1);
        assert_eq!(waiters.len(), 1);
    }

    #[test]
    fn a_woken_waiter_behind_the_head_that_leaves_hands_its_wake_on() {
        // The head waits for more than comes back, so it stays the head:
        // only the hand-off can wake the third waiter.
        let waiters = Waiters::new();
        let (head, head_waker) = counting();
        let (_, woken_waker) = counting();
        let (next, next_waker) = counting();
        let (_head_place, _) = waiters.register(&AGENT, (100, 1), &head_waker);
        let (woken_place, _) = waiters.register(&AGENT, (10, 1), &woken_waker);
        let (_next_place, _) = waiters.register(&AGENT, (10, 1), &next_waker);
        waiters.wake(&AGENT, || Wake::Fitting(Some((10, 1))));
        assert_eq!((wakes(&head), wakes(&next)), (0, 0));
        waiters.leave(woken_place, false, || Some((10, 1)));
        assert_eq!((wakes(&head), wakes(&next)), (0, 1), "the wake passed on");
        // One that took what it was woken for passes nothing on.
        let (_, taker_waker) = counting();
        let (last, last_waker) = counting();
        let (taker_place, _) = waiters.register(&AGENT, (10, 1), &taker_waker);
        let (_last_place, _) = waiters.register(&AGENT, (10, 1), &last_waker);
        waiters.wake(&AGENT, || Wake::All);
        let before = wakes(&last);
        waiters.leave(taker_place, true, || Some((0, 0)));
        assert_eq!(wakes(&last), before);
    }

    #[test]
    fn the_last_to_leave_takes_the_queue_away_and_a_new_waiter_makes_another() {
        let waiters = Waiters::new();
        let (_, waker) = counting();
        let (place, _) = waiters.register(&AGENT, (1, 0), &waker);
        waiters.leave(place, true, || unreachable!("nothing to pass on"));
        assert_eq!(waiters.len(), 0);
        assert_eq!(waiters.queues.get(&AGENT, |_| ()), None);
        let (place, head) = waiters.register(&AGENT, (1, 0), &waker);
        assert!(head);
        assert_eq!(waiters.len(), 1);
        waiters.leave(place, false, || None);
        assert_eq!(waiters.queues.get(&AGENT, |_| ()), None);
    }

    #[test]
    fn refresh_clears_the_woken_mark_so_a_later_refund_wakes_again() {
        let waiters = Waiters::new();
        let (count, waker) = counting();
        let (place, _) = waiters.register(&AGENT, (5, 0), &waker);
        waiters.wake(&AGENT, || Wake::Fitting(Some((5, 0))));
        waiters.wake(&AGENT, || Wake::Fitting(Some((5, 0))));
        assert_eq!(wakes(&count), 1, "woken once until it is polled");
        assert!(waiters.refresh(&place, &waker));
        waiters.wake(&AGENT, || Wake::Fitting(Some((5, 0))));
        assert_eq!(wakes(&count), 2);
        waiters.leave(place, true, || None);
    }
}
