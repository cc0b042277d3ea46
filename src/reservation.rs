//! Reservations: take an estimate now, settle the real amount later.

use std::sync::Arc;

use crate::hierarchy::MAX_LEVELS;
use crate::registry::SlotRef;
use crate::rules::{Refund, Tick};
use crate::set::{SetLevel, SetTicket};
use crate::types::AgentId;
use crate::types::Claim;

/// Where a reservation was taken at one level of an agent's chain: one
/// window (or bucket) of one incarnation of one agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Level {
    pub(crate) agent_id: AgentId,
    /// Which incarnation of the agent (changes on remove + set).
    pub(crate) generation: u64,
    /// Which window (starts strictly increase per incarnation).
    pub(crate) taken_in: Tick,
    /// Where the agent's cell was when the level was taken: the settle
    /// goes there first, as a handle does, and looks the agent up only if
    /// it is not there (the incarnation is what is trusted). The locked
    /// manager has no slots: [`SlotRef::NONE`].
    pub(crate) slot: SlotRef,
}

/// The levels a request was admitted at: the agent first, then its
/// ancestors. An agent without a parent (the common case) holds its one
/// level inline, so its reservations stay small and never allocate; a chain
/// keeps its levels in one allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Levels {
    /// The agent alone.
    Own(Level),
    /// The agent and its ancestors, at most [`MAX_LEVELS`].
    Chain(Box<ChainLevels>),
}

/// The levels of a chain: `len` of `at` are in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ChainLevels {
    len: u8,
    at: [Level; MAX_LEVELS],
}

impl Levels {
    /// Adds the next level up; the caller stops at [`MAX_LEVELS`].
    pub(crate) fn push(&mut self, level: Level) {
        match self {
            Levels::Own(own) => {
                let mut at = [*own; MAX_LEVELS];
                at[1] = level;
                *self = Levels::Chain(Box::new(ChainLevels { len: 2, at }));
            }
            Levels::Chain(chain) => {
                chain.at[usize::from(chain.len)] = level;
                chain.len += 1;
            }
        }
    }

    /// The agent's own level, then its ancestors'.
    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = &Level> {
        match self {
            Levels::Own(own) => std::slice::from_ref(own),
            Levels::Chain(chain) => &chain.at[..usize::from(chain.len)],
        }
        .iter()
    }

    fn own(&self) -> &Level {
        match self {
            Levels::Own(own) => own,
            Levels::Chain(chain) => &chain.at[0],
        }
    }
}

/// What a reservation took, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub(crate) tokens: u64,
    pub(crate) calls: u64,
    /// Never empty: the agent's own level comes first.
    pub(crate) levels: Levels,
}

impl Ticket {
    /// The ticket of `tokens` and `calls` admitted at `levels`.
    pub(crate) fn new((tokens, calls): (u64, u64), levels: Levels) -> Self {
        Ticket {
            tokens,
            calls,
            levels,
        }
    }

    pub(crate) fn agent_id(&self) -> AgentId {
        self.levels.own().agent_id
    }

    fn fmt_fields(&self, mut f: std::fmt::DebugStruct<'_, '_>) -> std::fmt::Result {
        f.field("agent_id", &self.agent_id())
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

    /// Settles each limit of a set's reservation, in its own window, with
    /// the tokens `actuals` gives its claims (`None`: a cancel, nothing
    /// used, calls included); returns [`crate::set::worst`] of the outcomes.
    fn settle_set(&self, ticket: &SetTicket, actuals: Option<&[u64]>) -> Settlement;
}

/// What one limit of a set settles with: its reserved amounts, and what it
/// used (`None` actuals: a cancel).
pub(crate) fn set_level_amounts(
    level: &SetLevel,
    actuals: Option<&[u64]>,
) -> ((u64, u64), (u64, u64)) {
    let reserved = (level.tokens, level.calls);
    let used = actuals.map_or((0, 0), |actuals| level.used(actuals));
    (reserved, used)
}

/// The methods both kinds of reservation share. They differ only in how
/// they hold the manager (a borrow, or an `Arc`); the ticket and the one
/// ledger path that books it are the same.
macro_rules! reservation_methods {
    () => {
        /// The agent the budget was taken from.
        pub fn agent_id(&self) -> AgentId {
            self.ticket.agent_id()
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
        /// Less than reserved is refunded, into the window it was taken from
        /// (a refund never reaches a later window). More than reserved is
        /// charged even past the limit, because those tokens were spent: into
        /// the reservation's window if it is still current, else into the
        /// current one (overuse is never forgiven). The agent is then refused
        /// until its budget recovers. For an agent with ancestors, the same
        /// happens at every level, each in its own window; the
        /// [`Settlement`] reports the agent's own level.
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

/// The methods both kinds of set reservation share.
macro_rules! set_reservation_methods {
    () => {
        /// The claims the reservation was admitted for, as given.
        pub fn claims(&self) -> &[Claim] {
            &self.ticket.claims
        }

        /// Books what was really used: `actual_tokens(index, claim)` is the
        /// tokens the claim at `index` (into [`claims`](Self::claims), as
        /// given) really used; the calls stay as charged (they were made).
        ///
        /// Every limit is settled in the window it was taken in, as a
        /// [`Reservation`] is: less than reserved is refunded there, more
        /// is charged even past the limit (into the current window if that
        /// one has ended). A limit reached by several claims settles with
        /// the largest of their actuals. Returns the worst outcome over the
        /// limits: [`Settlement::AgentRemoved`] over
        /// [`Settlement::WindowEnded`] over [`Settlement::CarriedOver`] over
        /// [`Settlement::Applied`]; among equals, the one that charged the
        /// most tokens beyond its reservation, then the lowest agent id (see
        /// [`docs::semantics`](crate::docs::semantics#several-limits-at-once)).
        /// An empty set settles as `Applied` with nothing moved.
        pub fn settle_with(
            self,
            mut actual_tokens: impl FnMut(usize, &Claim) -> u64,
        ) -> Settlement {
            let actuals: smallvec::SmallVec<[u64; 4]> = self
                .ticket
                .claims
                .iter()
                .enumerate()
                .map(|(n, claim)| actual_tokens(n, claim))
                .collect();
            self.ledger.settle_set(&self.ticket, Some(&actuals))
        }

        /// [`settle_with`](Self::settle_with) the same `actual_tokens` for
        /// every claim.
        pub fn settle(self, actual_tokens: u64) -> Settlement {
            self.settle_with(|_, _| actual_tokens)
        }

        /// Gives everything back at every limit, tokens and calls: the work
        /// never happened. Returns the worst outcome, as
        /// [`settle_with`](Self::settle_with) does.
        pub fn cancel(self) -> Settlement {
            self.ledger.settle_set(&self.ticket, None)
        }
    };
}

/// Budget taken at a set of limits by
/// [`acquire_set`](crate::BudgetManager::acquire_set), to be settled
/// against what was really used.
///
/// Like a [`Reservation`]: settle or cancel it once; dropped without
/// either, everything it took stays charged (the manager cannot know
/// whether the work happened).
#[must_use = "dropping a reservation keeps it fully charged; settle or cancel it"]
pub struct SetReservation<'m> {
    ledger: &'m dyn Ledger,
    ticket: Box<SetTicket>,
}

impl std::fmt::Debug for SetReservation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetReservation")
            .field("claims", &self.ticket.claims)
            .finish_non_exhaustive()
    }
}

impl<'m> SetReservation<'m> {
    #[inline]
    pub(crate) fn new(ledger: &'m dyn Ledger, ticket: Box<SetTicket>) -> Self {
        SetReservation { ledger, ticket }
    }

    set_reservation_methods!();
}

/// A [`SetReservation`] that owns a share of its manager: `Send`, `Sync`
/// and `'static`, as an [`OwnedReservation`] is. Taken by
/// [`acquire_set_owned`](crate::BudgetManager::acquire_set_owned).
#[must_use = "dropping a reservation keeps it fully charged; settle or cancel it"]
pub struct OwnedSetReservation {
    ledger: Arc<dyn Ledger>,
    ticket: Box<SetTicket>,
}

impl std::fmt::Debug for OwnedSetReservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedSetReservation")
            .field("claims", &self.ticket.claims)
            .finish_non_exhaustive()
    }
}

impl OwnedSetReservation {
    #[inline]
    pub(crate) fn new(ledger: Arc<dyn Ledger>, ticket: Box<SetTicket>) -> Self {
        OwnedSetReservation { ledger, ticket }
    }

    set_reservation_methods!();
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
    /// The window the reservation was taken in had ended, and the tokens
    /// used beyond the reservation were charged to the window current at
    /// the settle instead (a refund, by contrast, never crosses windows).
    CarriedOver {
        /// Tokens charged to the current window.
        charged_tokens: u64,
    },
    /// The window the reservation was taken in has ended, and nothing was
    /// owed beyond the reservation; nothing changed.
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

    /// What a settle decided comes to, for the caller.
    pub(crate) fn of(refund: Refund) -> Self {
        match refund {
            Refund::Applied {
                refunded, charged, ..
            } => Settlement::Applied {
                refunded_tokens: refunded.0,
                charged_tokens: charged.0,
                refunded_calls: refunded.1,
            },
            Refund::CarriedOver { charged, .. } => Settlement::CarriedOver {
                charged_tokens: charged.0,
            },
            Refund::WindowEnded => Settlement::WindowEnded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::State;

    #[test]
    fn a_settlement_reports_what_the_rules_booked() {
        let next = State::fresh(Tick(0));
        assert_eq!(Settlement::of(Refund::WindowEnded), Settlement::WindowEnded);
        assert_eq!(
            Settlement::of(Refund::Applied {
                next,
                refunded: (50, 1),
                charged: (0, 0)
            }),
            Settlement::Applied {
                refunded_tokens: 50,
                charged_tokens: 0,
                refunded_calls: 1
            }
        );
        assert_eq!(
            Settlement::of(Refund::CarriedOver {
                next,
                charged: (15, 0)
            }),
            Settlement::CarriedOver { charged_tokens: 15 }
        );
        assert!(Settlement::Applied {
            refunded_tokens: 0,
            charged_tokens: 3,
            refunded_calls: 1
        }
        .refunded());
        assert!(!Settlement::CarriedOver { charged_tokens: 3 }.refunded());
    }

    #[test]
    fn levels_hold_a_whole_chain_inline_in_order() {
        let level = |n: u128| Level {
            agent_id: AgentId::from_u128(n),
            generation: 0,
            taken_in: Tick(0),
            slot: SlotRef::NONE,
        };
        let mut levels = Levels::Own(level(1));
        assert_eq!(levels.iter().count(), 1);
        for n in 2..=MAX_LEVELS {
            levels.push(level(n as u128));
        }
        let ids: Vec<_> = levels.iter().map(|l| l.agent_id.as_u128()).collect();
        assert_eq!(ids, (1..=MAX_LEVELS as u128).collect::<Vec<_>>());
        let ticket = Ticket::new((5, 1), levels);
        assert_eq!(ticket.agent_id(), AgentId::from_u128(1));
    }
}
