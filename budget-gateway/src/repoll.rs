//! A connection's future polled again at once when it wakes itself.
//!
//! # Why
//!
//! A request whose body is read inside the connection's own task (the
//! budget layer reads it to estimate the cost) wakes that task while it
//! runs: hyper's body channel wakes its sender, the connection's
//! dispatcher, whenever the receiver takes a chunk. tokio treats a task
//! woken during its own poll as one that yielded: it goes to the back of
//! its worker's queue, and the worker wakes a parked sibling to come and
//! share the queue (`notify_parked_local`: a `futex` wake, and the
//! sibling's `futex` wait once it finds nothing to do). At one connection
//! that was two system calls and a thread's round trip per request: the
//! gateway with the layer served 76% of the plain proxy's requests a
//! second on two workers, and 98% on one (`wrk -c1`, where no sibling is
//! ever parked). A proxy that streams the body to the upstream has the
//! upstream connection's task take it, and does not wake itself.
//!
//! # How
//!
//! The connection is polled with a waker of its own. A wake that comes
//! while the connection is being polled only marks it woken, and the
//! connection is polled again as soon as that poll returns; a wake that
//! comes between polls wakes the task, as usual. A connection that keeps
//! waking itself is polled again at most [`REPOLLS`] times in a row, and
//! then handed to the scheduler like any task that yields, so it cannot
//! keep the others of its worker waiting.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// The most polls in a row one poll of the task makes of a connection that
/// wakes itself.
const REPOLLS: usize = 4;

/// Set while the connection is being polled.
const POLLING: u8 = 1;
/// Set by a wake while the connection is being polled.
const WOKEN: u8 = 2;

/// The waker the connection is polled with.
struct Shim {
    state: AtomicU8,
    /// The waker of the task that polls the connection.
    task: AtomicWaker,
}

impl Wake for Shim {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // AcqRel, and the poller's swap and compare-and-swap too: all
        // read-modify-writes of one word, so either this one sees a poll
        // running (the poller's exchange, or its next swap, then reads the
        // mark, and its next poll sees what this waker's thread wrote
        // before the wake), or the poller has finished, and the task is
        // woken.
        let before = self.state.fetch_or(WOKEN, Ordering::AcqRel);
        if before & POLLING == 0 {
            self.task.wake();
        }
    }
}

/// What polls one connection's future, for its whole life.
pub(crate) struct Repoller {
    shim: Arc<Shim>,
    waker: Waker,
}

impl Repoller {
    pub(crate) fn new() -> Self {
        let shim = Arc::new(Shim {
            state: AtomicU8::new(0),
            task: AtomicWaker::new(),
        });
        Repoller {
            waker: Waker::from(shim.clone()),
            shim,
        }
    }

    /// `future`, polled as the module's docs say.
    pub(crate) fn poll<F: Future + Unpin>(&self, future: F) -> Repolled<'_, F> {
        Repolled {
            repoller: self,
            future,
        }
    }
}

/// A future polled by a [`Repoller`].
pub(crate) struct Repolled<'a, F> {
    repoller: &'a Repoller,
    future: F,
}

impl<F: Future + Unpin> Future for Repolled<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Repolled { repoller, future } = &mut *self;
        let shim = &repoller.shim;
        shim.task.register(cx.waker());
        let mut own = Context::from_waker(&repoller.waker);
        for _ in 0..REPOLLS {
            // A swap, not a store: a wake that came since the last
            // exchange is read here, so this poll sees what its thread
            // wrote before it (a store would erase its mark unread, and
            // the exchange below could then succeed with the wake lost).
            shim.state.swap(POLLING, Ordering::AcqRel);
            if let Poll::Ready(output) = Pin::new(&mut *future).poll(&mut own) {
                shim.state.store(0, Ordering::Relaxed);
                return Poll::Ready(output);
            }
            // See `Shim::wake_by_ref` for the pairing.
            let finished =
                shim.state
                    .compare_exchange(POLLING, 0, Ordering::AcqRel, Ordering::Acquire);
            if finished.is_ok() {
                return Poll::Pending;
            }
        }
        shim.state.store(0, Ordering::Relaxed);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the wakes of the task that polls.
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Wakes itself on each of its first `wakes` polls, then is ready.
    struct WakesItself {
        wakes: usize,
        polls: usize,
    }

    impl Future for WakesItself {
        type Output = usize;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
            self.polls += 1;
            if self.polls > self.wakes {
                return Poll::Ready(self.polls);
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    fn task() -> (Arc<Counter>, Waker) {
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        (counter.clone(), Waker::from(counter))
    }

    #[test]
    fn a_self_wake_is_polled_again_in_place_and_the_task_is_not_woken() {
        let (counter, waker) = task();
        let repoller = Repoller::new();
        let mut future = std::pin::pin!(repoller.poll(WakesItself { wakes: 2, polls: 0 }));
        let polled = future.as_mut().poll(&mut Context::from_waker(&waker));
        assert_eq!(polled, Poll::Ready(3));
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            0,
            "no wake reached the task"
        );
    }

    #[test]
    fn a_future_that_keeps_waking_itself_is_handed_back_to_the_scheduler() {
        let (counter, waker) = task();
        let repoller = Repoller::new();
        let wakes = 2 * REPOLLS + 1;
        let mut future = std::pin::pin!(repoller.poll(WakesItself { wakes, polls: 0 }));
        let mut cx = Context::from_waker(&waker);
        assert_eq!(future.as_mut().poll(&mut cx), Poll::Pending);
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            1,
            "the task was woken to go on"
        );
        assert_eq!(future.as_mut().poll(&mut cx), Poll::Pending);
        assert_eq!(future.as_mut().poll(&mut cx), Poll::Ready(wakes + 1));
        assert_eq!(counter.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_wake_between_polls_wakes_the_task() {
        let (counter, waker) = task();
        let repoller = Repoller::new();
        let (sender, receiver) = tokio::sync::oneshot::channel::<usize>();
        let mut future = std::pin::pin!(repoller.poll(receiver));
        let mut cx = Context::from_waker(&waker);
        assert_eq!(future.as_mut().poll(&mut cx), Poll::Pending);
        assert_eq!(counter.0.load(Ordering::SeqCst), 0);
        std::thread::scope(|s| {
            s.spawn(move || sender.send(7));
        });
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            1,
            "woken from the other thread"
        );
        assert_eq!(future.as_mut().poll(&mut cx), Poll::Ready(Ok(7)));
    }

    #[test]
    fn no_wake_from_another_thread_is_lost_under_a_stream_of_them() {
        // Wakes racing the polls: each message a thread sends wakes the
        // receiver, sometimes while it is being polled, sometimes between
        // polls. A lost wake leaves the receiver waiting for a message
        // that came: the timeout fails the test instead of hanging it.
        const MESSAGES: usize = 50_000;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<usize>();
        let sending = std::thread::spawn(move || {
            for n in 0..MESSAGES {
                sender.send(n).unwrap();
                if n % 64 == 0 {
                    std::thread::yield_now();
                }
            }
        });
        let repoller = Repoller::new();
        let received = runtime.block_on(async {
            let all = Box::pin(async {
                let mut count = 0;
                while receiver.recv().await.is_some() {
                    count += 1;
                }
                count
            });
            tokio::time::timeout(std::time::Duration::from_secs(30), repoller.poll(all)).await
        });
        sending.join().unwrap();
        assert_eq!(
            received,
            Ok(MESSAGES),
            "every message received, none waited for in vain"
        );
    }
}
