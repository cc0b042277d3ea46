//! Reservations: take an estimate now, settle the real amount later.

use std::sync::Arc;

use crate::types::AgentId;
use crate::window::{Refund, Tick, Window};

/// Where a reservation was taken: one window of one incarnation of an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub(crate) agent_id: AgentId,
    pub(crate) tokens: u64,
    pub(crate) calls: u64,
    /// Which incarnation of the agent (changes on remove + set).
    pub(crate) generation: u64,
    /// Which window (starts strictly increase per incarnation).
    pub(crate) window_start: Tick,
}

impl Ticket {
    /// The ticket of `tokens` and `calls` admitted for `agent_id` into the
    /// window starting at `window_start` of incarnation `generation`.
    pub(crate) fn new(
        agent_id: AgentId,
        (tokens, calls): (u64, u64),
        (window_start, generation): (Tick, u64),
    ) -> Self {
        Ticket {
            agent_id,
            tokens,
            calls,
            generation,
            window_start,
        }
    }

    fn fmt_fields(&self, mut f: std::fmt::DebugStruct<'_, '_>) -> std::fmt::Result {
        f.field("agent_id", &self.agent_id)
            .field("tokens", &self.tokens)
            .field("calls", &self.calls)
            .finish_non_exhaustive()
    }
}

/// Implemented by each manager: books a settle or cancel.
///
/// `Send + Sync + 'static` so that an [`OwnedReservation`] can hold its
/// manager as an `Arc<dyn Ledger>` and travel to any thread or task.
pub(crate) trait Ledger: Send + Sync + 'static {
    /// Replaces the reservation's `(tokens, calls)` by `used` in its window.
    fn settle(&self, ticket: &Ticket, used: (u64, u64)) -> Settlement;
}

/// The methods both kinds of reservation share. They differ only in how
/// they hold the manager (a borrow, or an `Arc`); the ticket and the one
/// ledger path that books it are the same.
macro_rules! reservation_methods {
    () => {
        /// The agent the budget was taken from.
        pub fn agent_id(&self) -> AgentId {
            self.ticket.agent_id
        }

        /// Tokens taken.
        pub fn tokens(&self) -> u64 {
            self.ticket.tokens
        }

        /// Calls taken.
        pub fn calls(&self) -> u64 {
            self.ticket.calls
        }

        /// Books what was really used: `actual_tokens` replaces the reserved
        /// tokens, and the calls stay charged (the calls were made).
        ///
        /// Less than reserved is refunded. More than reserved is charged even
        /// past the limit, because those tokens were spent: the agent is then
        /// refused until its window ends.
        pub fn settle(self, actual_tokens: u64) -> Settlement {
            let calls = self.ticket.calls;
            self.ledger.settle(&self.ticket, (actual_tokens, calls))
        }

        /// Gives everything back, tokens and calls: the work never happened.
        pub fn cancel(self) -> Settlement {
            self.ledger.settle(&self.ticket, (0, 0))
        }
    };
}

/// Budget taken by [`acquire`](crate::BudgetManager::acquire), to be settled
/// against what was really used.
///
/// Settling or cancelling consumes the reservation, so it is booked at most
/// once. Dropping it without either leaves everything it took charged: the
/// conservative choice, since the manager cannot know whether the work it
/// paid for happened. A refund or extra charge only ever applies to the
/// window the reservation was taken in; once that window has ended, settling
/// changes nothing and says so.
///
/// It borrows its manager; [`OwnedReservation`] is the same thing holding an
/// `Arc` of it, for spawned tasks and response bodies.
#[must_use = "dropping a reservation keeps it fully charged; settle or cancel it"]
pub struct Reservation<'m> {
    ledger: &'m dyn Ledger,
    ticket: Ticket,
}

impl std::fmt::Debug for Reservation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.ticket.fmt_fields(f.debug_struct("Reservation"))
    }
}

impl<'m> Reservation<'m> {
    pub(crate) fn new(ledger: &'m dyn Ledger, ticket: Ticket) -> Self {
        Reservation { ledger, ticket }
    }

    reservation_methods!();
}

/// A [`Reservation`] that owns a share of its manager: `Send`, `Sync` and
/// `'static`, so it can move into a `tokio::spawn`ed task, live across an
/// `.await`, or sit in a response body that settles when the stream ends.
///
/// Taken by [`acquire_owned`](crate::BudgetManager::acquire_owned) on an
/// `Arc` of the manager, which it keeps alive. It has the same methods and
/// the same semantics as [`Reservation`]: settle or cancel it once; dropped,
/// it stays fully charged.
#[must_use = "dropping a reservation keeps it fully charged; settle or cancel it"]
pub struct OwnedReservation {
    ledger: Arc<dyn Ledger>,
    ticket: Ticket,
}

impl std::fmt::Debug for OwnedReservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.ticket.fmt_fields(f.debug_struct("OwnedReservation"))
    }
}

impl OwnedReservation {
    pub(crate) fn new(ledger: Arc<dyn Ledger>, ticket: Ticket) -> Self {
        OwnedReservation { ledger, ticket }
    }

    reservation_methods!();
}

/// What settling or cancelling a [`Reservation`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// The reservation's window is still current; the difference was
    /// booked there.
    Applied {
        /// Tokens given back to the window.
        refunded_tokens: u64,
        /// Tokens charged beyond the reservation.
        charged_tokens: u64,
        /// Calls given back to the window.
        refunded_calls: u64,
    },
    /// The window the reservation was taken in has ended; nothing changed.
    WindowEnded,
    /// The agent's budget was removed (and perhaps set again) since the
    /// reservation; nothing changed.
    AgentRemoved,
}

impl Settlement {
    /// Whether it gave anything back (and so may let a waiter in).
    pub(crate) fn refunded(&self) -> bool {
        matches!(self, Settlement::Applied { refunded_tokens, refunded_calls, .. }
            if *refunded_tokens > 0 || *refunded_calls > 0)
    }

    /// What a settle decided on the window `before` comes to: the
    /// difference it made, or that the window had ended.
    pub(crate) fn of(before: Window, refund: Refund) -> Self {
        match refund {
            Refund::Applied(after) => Settlement::Applied {
                refunded_tokens: before.tokens.saturating_sub(after.tokens),
                charged_tokens: after.tokens.saturating_sub(before.tokens),
                refunded_calls: before.calls.saturating_sub(after.calls),
            },
            Refund::WindowEnded => Settlement::WindowEnded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(tokens: u64, calls: u64) -> Window {
        Window {
            tokens,
            calls,
            start: Tick(0),
        }
    }

    fn applied(before: Window, after: Window) -> Settlement {
        Settlement::of(before, Refund::Applied(after))
    }

    #[test]
    fn an_ended_window_settles_to_nothing() {
        assert_eq!(
            Settlement::of(window(80, 2), Refund::WindowEnded),
            Settlement::WindowEnded
        );
    }

    #[test]
    fn an_applied_settlement_reports_the_difference_it_made() {
        assert_eq!(
            applied(window(80, 2), window(30, 2)),
            Settlement::Applied {
                refunded_tokens: 50,
                charged_tokens: 0,
                refunded_calls: 0
            }
        );
        assert_eq!(
            applied(window(80, 2), window(95, 2)),
            Settlement::Applied {
                refunded_tokens: 0,
                charged_tokens: 15,
                refunded_calls: 0
            }
        );
        assert_eq!(
            applied(window(80, 2), window(0, 1)),
            Settlement::Applied {
                refunded_tokens: 80,
                charged_tokens: 0,
                refunded_calls: 1
            }
        );
    }
}
