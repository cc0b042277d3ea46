//! Reservations: take an estimate now, settle the real amount later.

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
}

/// Implemented by each manager: books a settle or cancel.
pub(crate) trait Ledger: Sync {
    /// Replaces the reservation's `(tokens, calls)` by `used` in its window.
    fn settle(&self, ticket: &Ticket, used: (u64, u64)) -> Settlement;
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
#[must_use = "dropping a reservation keeps it fully charged; settle or cancel it"]
pub struct Reservation<'m> {
    ledger: &'m dyn Ledger,
    ticket: Ticket,
}

impl std::fmt::Debug for Reservation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("agent_id", &self.ticket.agent_id)
            .field("tokens", &self.ticket.tokens)
            .field("calls", &self.ticket.calls)
            .finish_non_exhaustive()
    }
}

impl<'m> Reservation<'m> {
    pub(crate) fn new(ledger: &'m dyn Ledger, ticket: Ticket) -> Self {
        Reservation { ledger, ticket }
    }

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
        self.ledger
            .settle(&self.ticket, (actual_tokens, self.ticket.calls))
    }

    /// Gives everything back, tokens and calls: the work never happened.
    pub fn cancel(self) -> Settlement {
        self.ledger.settle(&self.ticket, (0, 0))
    }
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
