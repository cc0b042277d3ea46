//! Admission across a set of limits: the plan both managers follow.
//!
//! A request names [`Claim`]s; each reaches its agent and that agent's
//! ancestors. The plan lists every limit reached once (a limit reached by
//! two claims takes the largest amount of each resource among them), in
//! the order they are taken: the claims' own agents first, then their
//! parents, and so on, each level in ascending order of agent id. The managers then take the plan's limits one by one and, on
//! a refusal, give back what they took: see `docs::implementation`.

use smallvec::SmallVec;

use crate::reservation::{Level, Settlement};
use crate::rules::State;
use crate::types::{AgentId, Claim};

/// The most claims one request may name, and the most distinct limits
/// (claims' agents and their ancestors, each counted once) it may reach. A
/// larger set is refused with
/// [`RefusalReason::TooManyLimits`](crate::RefusalReason::TooManyLimits),
/// taking nothing.
pub const MAX_SET_LIMITS: usize = 32;

/// The refusal of more than [`MAX_SET_LIMITS`] claims, given before
/// anything is read or taken (by the acquire and the check alike), with
/// the first claim's agent.
#[inline]
pub(crate) fn check_size(claims: &[Claim]) -> Result<(), (crate::error::Refusal, AgentId)> {
    match claims.first() {
        Some(first) if claims.len() > MAX_SET_LIMITS => Err((
            crate::error::Refusal::TooMany {
                limits: claims.len(),
            },
            first.agent_id,
        )),
        _ => Ok(()),
    }
}

/// How many limits a plan holds without allocating: four claims of one
/// level each, or one chain of [`MAX_LEVELS`](crate::MAX_LEVELS).
pub(crate) const INLINE_LIMITS: usize = 8;

/// Which limits of a set take past their limit instead of refusing (those
/// in shadow mode): `None` for none, the common case, which asks nothing.
pub(crate) type Shadowed<'a> = Option<&'a dyn Fn(&AgentId) -> bool>;

/// Which claims (by index, as given) reach a limit.
pub(crate) type ClaimMask = u32;

const _: () = assert!(MAX_SET_LIMITS <= ClaimMask::BITS as usize);

/// One limit of a plan: `payload` is how the manager reaches it (a cell,
/// or nothing for the locked manager, which looks it up under its lock).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Planned<P> {
    pub(crate) id: AgentId,
    pub(crate) payload: P,
    pub(crate) tokens: u64,
    pub(crate) calls: u64,
    pub(crate) reached_by: ClaimMask,
    /// Whether it is some claim's own agent (not only an ancestor): a
    /// claim's own agent gone is a refusal, an ancestor gone is skipped, as
    /// for a single agent.
    pub(crate) own: bool,
    /// How far above a claim's agent it is (0: a claim's agent itself), the
    /// least over the claims that reach it: a refusal names the lowest
    /// limit short of room.
    pub(crate) depth: u8,
    /// Where it was taken, once it is.
    pub(crate) taken: Option<Level>,
    /// The state the take left (the lock-free manager's, for a report of
    /// the limit: see `acquire_set_owned_reporting`).
    pub(crate) left: Option<State>,
}

impl<P> Planned<P> {
    /// The first claim (as given) that reaches this limit.
    pub(crate) fn first_claim(&self) -> usize {
        self.reached_by.trailing_zeros() as usize
    }
}

/// The limits a request will be taken at, deduplicated, and the order to
/// take them in.
pub(crate) struct Plan<P> {
    /// In the order they were reached: a chain's own level first, then up.
    pub(crate) limits: SmallVec<[Planned<P>; INLINE_LIMITS]>,
    /// Indices into `limits`, in the order they are taken (see
    /// [`sort`](Self::sort)): sorting these bytes moves far less than
    /// sorting the limits (a third of a set's admission, measured, when
    /// the limits themselves were sorted).
    pub(crate) order: SmallVec<[u8; INLINE_LIMITS]>,
}

/// A set is larger than [`MAX_SET_LIMITS`]: how many it has (at least).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TooMany(pub(crate) usize);

impl<P: Copy> Plan<P> {
    pub(crate) fn new() -> Self {
        Plan {
            limits: SmallVec::new(),
            order: SmallVec::new(),
        }
    }

    /// Adds limit `id`, reached by claim number `claim` with `claim`'s
    /// amounts; merges it into the same limit reached before.
    #[inline]
    pub(crate) fn add(
        &mut self,
        id: AgentId,
        payload: P,
        claim: usize,
        (tokens, calls): (u64, u64),
        depth: usize,
    ) -> Result<(), TooMany> {
        let depth = u8::try_from(depth).unwrap_or(u8::MAX);
        let own = depth == 0;
        let bit = 1 << claim;
        // The first claim's walk up its chain meets each limit once (the
        // walk stops at a limit seen before): only later claims can merge.
        let known = match claim {
            0 => None,
            _ => self.limits.iter_mut().find(|l| l.id == id),
        };
        if let Some(known) = known {
            known.tokens = known.tokens.max(tokens);
            known.calls = known.calls.max(calls);
            known.reached_by |= bit;
            known.own |= own;
            known.depth = known.depth.min(depth);
            return Ok(());
        }
        if self.limits.len() == MAX_SET_LIMITS {
            return Err(TooMany(MAX_SET_LIMITS + 1));
        }
        self.limits.push(Planned {
            id,
            payload,
            tokens,
            calls,
            reached_by: bit,
            own,
            depth,
            taken: None,
            left: None,
        });
        Ok(())
    }

    /// The limits, in the order they are taken.
    pub(crate) fn in_order(&self) -> impl DoubleEndedIterator<Item = &Planned<P>> + '_ {
        self.order.iter().map(|&n| &self.limits[usize::from(n)])
    }

    /// The limits taken, in the order they were taken, as a set's
    /// reservation keeps them.
    pub(crate) fn taken(&self) -> impl Iterator<Item = SetLevel> + '_ {
        self.in_order().filter_map(|l| {
            l.taken.map(|level| SetLevel {
                level,
                tokens: l.tokens,
                calls: l.calls,
                reached_by: l.reached_by,
            })
        })
    }

    /// Puts the limits in the order they are taken in: by depth (the
    /// claims' own agents, then their parents, ...), then by agent id.
    /// A chain is so taken from the agent up, as it always was, and the
    /// first limit to refuse is the lowest one short of room.
    #[inline]
    pub(crate) fn sort(&mut self) {
        let limits: &[Planned<P>] = &self.limits;
        self.order.clear();
        self.order.extend(0..limits.len() as u8); // at most MAX_SET_LIMITS
        if limits.iter().all(|l| l.reached_by == 1) {
            // One claim: its chain, walked from the agent up, is already
            // in order (one limit per depth). What `acquire` on a chain
            // runs.
            return;
        }
        sort_indices(&mut self.order, |n| {
            let l = &limits[usize::from(n)];
            (l.depth, l.id)
        });
    }
}

/// Sorts `order`, indices into a set's limits or claims, by `key`: an
/// insertion sort, as a set holds a few, at most [`MAX_SET_LIMITS`].
#[inline]
pub(crate) fn sort_indices<K: Ord>(order: &mut [u8], key: impl Fn(u8) -> K) {
    for sorted in 1..order.len() {
        let mut at = sorted;
        while at > 0 && key(order[at]) < key(order[at - 1]) {
            order.swap(at, at - 1);
            at -= 1;
        }
    }
}

/// Where a set's request was taken at one limit, and what it took there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SetLevel {
    pub(crate) level: Level,
    pub(crate) tokens: u64,
    pub(crate) calls: u64,
    pub(crate) reached_by: ClaimMask,
}

impl SetLevel {
    /// The tokens this limit settles with: the largest actual among the
    /// claims that reach it.
    pub(crate) fn used(&self, actuals: &[u64]) -> (u64, u64) {
        let mut tokens = 0;
        let mut mask = self.reached_by;
        while mask != 0 {
            let claim = mask.trailing_zeros() as usize;
            tokens = tokens.max(actuals.get(claim).copied().unwrap_or(0));
            mask &= mask - 1;
        }
        (tokens, self.calls)
    }
}

/// What a set's reservation took: the claims as given, and each limit
/// taken, in ascending order of agent id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SetTicket {
    pub(crate) claims: SmallVec<[Claim; 4]>,
    pub(crate) levels: SmallVec<[SetLevel; 4]>,
}

impl SetTicket {
    /// The ticket of `claims`, taken at `levels`, boxed: a ticket of
    /// four claims is some 400 bytes, which the reservation, the `Result`
    /// around it and the caller's future would each copy (two copies were
    /// a quarter of a set of one's admit-and-settle time, their loads
    /// waiting on the stores just made); a box is moved as a pointer. The
    /// one copy left is the box's own, from the stack.
    #[inline]
    pub(crate) fn new(claims: &[Claim], levels: impl Iterator<Item = SetLevel>) -> Box<Self> {
        // The levels pushed in place: collected, they were built aside and
        // then copied in.
        let mut ticket = Box::new(SetTicket {
            claims: SmallVec::from_slice(claims),
            levels: SmallVec::new(),
        });
        ticket.levels.extend(levels);
        ticket
    }
}

/// How bad a settlement is for the caller, for [`worst`]: the larger, the
/// less of the settle went as asked.
fn severity(s: &Settlement) -> (u8, u64) {
    match *s {
        Settlement::Applied { charged_tokens, .. } => (0, charged_tokens),
        Settlement::CarriedOver { charged_tokens } => (1, charged_tokens),
        Settlement::WindowEnded => (2, 0),
        Settlement::AgentRemoved => (3, 0),
    }
}

/// The outcome a set's settle reports: `AgentRemoved` over `WindowEnded`
/// over `CarriedOver` over `Applied`; among equals, the one that charged
/// the most tokens beyond the reservation; among those, the first in the
/// order the limits were taken (ascending agent id). An empty set settles
/// as `Applied` with nothing moved.
pub(crate) fn worst(outcomes: impl Iterator<Item = Settlement>) -> Settlement {
    let mut worst: Option<Settlement> = None;
    for outcome in outcomes {
        if worst.is_none_or(|w| severity(&outcome) > severity(&w)) {
            worst = Some(outcome);
        }
    }
    worst.unwrap_or(Settlement::Applied {
        refunded_tokens: 0,
        charged_tokens: 0,
        refunded_calls: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> AgentId {
        AgentId::from_u128(n)
    }

    #[test]
    fn a_limit_reached_twice_is_planned_once_with_the_largest_amounts() {
        let mut plan = Plan::<()>::new();
        plan.add(id(5), (), 0, (10, 1), 0).unwrap();
        plan.add(id(3), (), 0, (10, 1), 1).unwrap();
        plan.add(id(3), (), 1, (4, 2), 0).unwrap();
        plan.sort();
        let got: Vec<_> = plan
            .in_order()
            .map(|l| (l.id, l.tokens, l.calls, l.reached_by, l.own))
            .collect();
        assert_eq!(
            got,
            vec![(id(3), 10, 2, 0b11, true), (id(5), 10, 1, 0b01, true)]
        );
        assert_eq!(plan.in_order().next().unwrap().first_claim(), 0);
        // Depth first, then id: a claim's own agent before any ancestor.
        let mut plan = Plan::<()>::new();
        plan.add(id(1), (), 0, (1, 1), 1).unwrap();
        plan.add(id(9), (), 0, (1, 1), 0).unwrap();
        plan.add(id(4), (), 1, (1, 1), 0).unwrap();
        plan.add(id(2), (), 1, (1, 1), 2).unwrap();
        plan.sort();
        let ids: Vec<_> = plan.in_order().map(|l| l.id).collect();
        assert_eq!(ids, [id(4), id(9), id(1), id(2)]);
    }

    #[test]
    fn a_plan_refuses_more_than_the_maximum_of_limits() {
        let mut plan = Plan::<()>::new();
        for n in 0..MAX_SET_LIMITS {
            plan.add(id(n as u128), (), 0, (1, 1), 0).unwrap();
        }
        // The same limit again merges; a new one is one too many.
        assert_eq!(plan.add(id(0), (), 1, (1, 1), 0), Ok(()));
        assert_eq!(
            plan.add(id(999), (), 1, (1, 1), 0),
            Err(TooMany(MAX_SET_LIMITS + 1))
        );
    }

    #[test]
    fn a_shared_limit_settles_with_the_largest_actual_of_its_claims() {
        let level = SetLevel {
            level: Level {
                agent_id: id(1),
                generation: 0,
                taken_in: crate::rules::Tick(0),
                slot: crate::registry::SlotRef::NONE,
            },
            tokens: 100,
            calls: 1,
            reached_by: 0b101,
        };
        assert_eq!(level.used(&[7, 90, 30]), (30, 1));
    }

    #[test]
    fn the_worst_settlement_wins() {
        let applied = |charged| Settlement::Applied {
            refunded_tokens: 0,
            charged_tokens: charged,
            refunded_calls: 0,
        };
        assert_eq!(
            worst([applied(0), applied(5), applied(2)].into_iter()),
            applied(5)
        );
        assert_eq!(
            worst([applied(9), Settlement::CarriedOver { charged_tokens: 1 }].into_iter()),
            Settlement::CarriedOver { charged_tokens: 1 }
        );
        assert_eq!(
            worst([Settlement::AgentRemoved, Settlement::WindowEnded].into_iter()),
            Settlement::AgentRemoved
        );
        assert_eq!(worst(std::iter::empty()), applied(0));
    }
}
