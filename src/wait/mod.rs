//! Waiting for budget: futures that resolve as soon as a request fits.
//!
//! How this is built, and why it costs callers who never wait nothing, is
//! written down in [`crate::docs::implementation`] (section "Waiting"); what
//! a waiter can expect, in [`crate::docs::semantics`].
//!
//! The pieces: [`Waiters`] (in `queue.rs`) holds each agent's queue and the
//! wake rule; [`Wait`] is the future, which tries, registers, tries once
//! more, and sleeps until an event on its agent or (at the head of the
//! queue) the window's end; the two free functions at the bottom are what
//! both managers' `acquire_wait` and `acquire_owned_wait` call.

mod queue;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use queue::Place;
pub(crate) use queue::{Headroom, Waiters, Wake};

use crate::error::{Operation, Refusal, Refused};
use crate::reservation::{
    Ledger, Levels, OwnedReservation, OwnedSetReservation, Reservation, Ticket,
};
use crate::set::SetTicket;
use crate::types::{AgentId, Claim};

/// What a manager offers the waiting future: an admission attempt, its
/// registry of waiters, and the headroom the wake rule reads.
pub(crate) trait Waitable: Send + Sync {
    /// The manager's waiters.
    fn waiters(&self) -> &Waiters;

    /// One admission attempt, exactly as `acquire` makes it (at every
    /// level of the agent's chain), but refused as [`Refusal::NoBudget`]
    /// unless the agent is still incarnation `generation` (when one is
    /// given).
    fn try_admit(
        &self,
        agent_id: &AgentId,
        request: (u64, u64),
        generation: Option<u64>,
    ) -> Result<Levels, Refusal>;

    /// One admission attempt of a set, exactly as `acquire_set` makes it;
    /// a refusal comes with the agent of the claim it concerns.
    fn try_admit_set(&self, claims: &[Claim]) -> Result<Box<SetTicket>, (Refusal, AgentId)>;

    /// What one agent's own level can admit right now.
    fn headroom(&self, agent_id: &AgentId) -> Headroom;
}

/// The future behind `acquire_wait` and `acquire_owned_wait`: resolves to
/// the ticket of the admitted request, or to the refusal that waiting
/// cannot cure. (The owned variant is an `async` block that owns an `Arc`
/// of the manager and awaits this future on a borrow of it.)
pub(crate) struct Wait<'m, M: Waitable, A: Ask = One> {
    source: &'m M,
    asked: A,
    /// The incarnation of the agent this wait began on: if the agent is
    /// removed (even if set again), the wait ends in a refusal.
    generation: Option<u64>,
    /// Where the future is queued: at the level of the agent's chain that
    /// refused it last (the agent itself, or an ancestor), whose events are
    /// the ones that can let it in.
    place: Option<(AgentId, Place)>,
    timer: timer::WindowEnd,
}

/// What a waiter asks for, and how one attempt at it is made.
pub(crate) trait Ask: Send + Unpin {
    /// What an admission gives.
    type Taken;
    /// Whether the wait ends once the asked agent's incarnation changes
    /// (only one agent's chain pins it).
    const PINS_GENERATION: bool;
    /// One attempt; a refusal with the agent it concerns.
    fn attempt<M: Waitable>(
        &self,
        source: &M,
        generation: Option<u64>,
    ) -> Result<Self::Taken, (Refusal, AgentId)>;
}

/// One agent's chain: `acquire_wait`.
pub(crate) struct One {
    agent_id: AgentId,
    request: (u64, u64),
}

impl Ask for One {
    type Taken = Ticket;
    const PINS_GENERATION: bool = true;
    fn attempt<M: Waitable>(
        &self,
        source: &M,
        generation: Option<u64>,
    ) -> Result<Ticket, (Refusal, AgentId)> {
        source
            .try_admit(&self.agent_id, self.request, generation)
            .map(|levels| Ticket::new(self.request, levels))
            .map_err(|refusal| (refusal, self.agent_id))
    }
}

/// A set of claims: `acquire_set_owned_wait`.
pub(crate) struct Set(Vec<Claim>);

impl Ask for Set {
    type Taken = Box<SetTicket>;
    // A set's incarnations are not pinned: a claim's agent removed ends
    // the wait at the next try (it has no budget then).
    const PINS_GENERATION: bool = false;
    fn attempt<M: Waitable>(
        &self,
        source: &M,
        _generation: Option<u64>,
    ) -> Result<Box<SetTicket>, (Refusal, AgentId)> {
        source.try_admit_set(&self.0)
    }
}

impl<'m, M: Waitable> Wait<'m, M> {
    pub(crate) fn new(source: &'m M, agent_id: AgentId, tokens: u64, calls: u64) -> Self {
        Wait::asking(
            source,
            One {
                agent_id,
                request: (tokens, calls),
            },
        )
    }
}

impl<'m, M: Waitable, A: Ask> Wait<'m, M, A> {
    fn asking(source: &'m M, asked: A) -> Self {
        Wait {
            source,
            asked,
            generation: None,
            place: None,
            timer: timer::WindowEnd::new(),
        }
    }

    fn leave(&mut self, took: bool) {
        self.timer.disarm();
        if let Some((level, place)) = self.place.take() {
            let source = self.source;
            source
                .waiters()
                .leave(place, took, || source.headroom(&level));
        }
    }
}

impl<M: Waitable, A: Ask> Future for Wait<'_, M, A> {
    type Output = Result<A::Taken, Refused>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let waiters = this.source.waiters();
        let mut head = match &this.place {
            Some((_, place)) => waiters.refresh(place, cx.waker()),
            None => false,
        };
        loop {
            let (refusal, agent_id) = match this.asked.attempt(this.source, this.generation) {
                Ok(taken) => {
                    this.leave(true);
                    return Poll::Ready(Ok(taken));
                }
                Err(refused) => refused,
            };
            let (retry_after_ms, level, asked) = match refusal {
                Refusal::Short {
                    shortfall,
                    asked,
                    generation,
                    level,
                } if shortfall.retry_after_ms.is_some() => {
                    if A::PINS_GENERATION {
                        this.generation = Some(generation);
                    }
                    (shortfall.retry_after_ms.unwrap_or_default(), level, asked)
                }
                // No budget, removed, larger than the limit, or a set too
                // large: waiting cannot help.
                _ => {
                    this.leave(false);
                    let error = refusal.refused(agent_id, Operation::Acquire);
                    return Poll::Ready(Err(error));
                }
            };
            let place = match &this.place {
                Some((queued_at, place)) if *queued_at == level => place,
                _ => {
                    // Not queued yet, or refused at another level than
                    // before: queue where the refusal came from.
                    this.leave(false);
                    let (place, is_head) = waiters.register(&level, asked, cx.waker());
                    this.place = Some((level, place));
                    head = is_head;
                    // Try once more now that a refund cannot miss us.
                    continue;
                }
            };
            if !head {
                this.timer.disarm();
                return Poll::Pending;
            }
            match this.timer.poll_after(retry_after_ms, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => {
                    let headroom = this.source.headroom(&level);
                    waiters.window_ended(place, headroom);
                    head = waiters.refresh(place, cx.waker());
                }
            }
        }
    }
}

impl<M: Waitable, A: Ask> Drop for Wait<'_, M, A> {
    /// Dropped while waiting: out of the queue, taking nothing.
    fn drop(&mut self) {
        self.leave(false);
    }
}

/// The timer the head of a queue sleeps on until its window ends.
#[cfg(not(agent_budget_loom))]
mod timer {
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;

    /// A tokio sleep, made when first needed and reused.
    pub(super) struct WindowEnd(Option<Pin<Box<tokio::time::Sleep>>>);

    impl WindowEnd {
        pub(super) fn new() -> Self {
            WindowEnd(None)
        }

        /// Sleeps until `millis` from now (re-armed on every poll, so the
        /// deadline follows the latest refusal's `retry_after`).
        pub(super) fn poll_after(&mut self, millis: u64, cx: &mut Context<'_>) -> Poll<()> {
            let deadline = tokio::time::Instant::now() + Duration::from_millis(millis);
            let sleep = self
                .0
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            sleep.as_mut().reset(deadline);
            sleep.as_mut().poll(cx)
        }

        pub(super) fn disarm(&mut self) {
            self.0 = None;
        }
    }

    use std::future::Future as _;
}

/// Under loom there is no timer: the models check the wake-ups that events
/// cause, and the head simply waits for one.
#[cfg(agent_budget_loom)]
mod timer {
    use std::task::{Context, Poll};

    pub(super) struct WindowEnd;

    impl WindowEnd {
        pub(super) fn new() -> Self {
            WindowEnd
        }

        pub(super) fn poll_after(&mut self, _millis: u64, _cx: &mut Context<'_>) -> Poll<()> {
            Poll::Pending
        }

        pub(super) fn disarm(&mut self) {}
    }
}

/// `acquire_wait` for either manager: waits on a borrow of it.
pub(crate) fn acquire_wait<'m, M: Waitable + Ledger>(
    manager: &'m M,
    agent_id: &AgentId,
    tokens: u64,
    calls: u64,
) -> impl Future<Output = Result<Reservation<'m>, Refused>> + Send + 'm {
    let wait = Wait::new(manager, *agent_id, tokens, calls);
    async move {
        let ticket = wait.await?;
        Ok(Reservation::new(manager, ticket))
    }
}

/// `acquire_owned_wait` for either manager: owns an `Arc` of it, and waits
/// on a borrow of that.
pub(crate) fn acquire_owned_wait<M: Waitable + Ledger>(
    manager: &Arc<M>,
    agent_id: &AgentId,
    tokens: u64,
    calls: u64,
) -> impl Future<Output = Result<OwnedReservation, Refused>> + Send + 'static {
    let (manager, agent_id) = (Arc::clone(manager), *agent_id);
    async move {
        let ticket = Wait::new(&*manager, agent_id, tokens, calls).await?;
        Ok(OwnedReservation::new(manager, ticket))
    }
}

/// `acquire_set_owned_wait` for either manager: owns an `Arc` of it and the
/// claims, and waits on a borrow of that.
pub(crate) fn acquire_set_owned_wait<M: Waitable + Ledger>(
    manager: &Arc<M>,
    claims: Vec<Claim>,
) -> impl Future<Output = Result<OwnedSetReservation, Refused>> + Send + 'static {
    let manager = Arc::clone(manager);
    async move {
        let ticket = Wait::asking(&*manager, Set(claims)).await?;
        Ok(OwnedSetReservation::new(manager, ticket))
    }
}
