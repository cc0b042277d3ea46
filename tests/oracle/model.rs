//! The reference model: what `docs::semantics`, the "Refilling buckets"
//! section of `docs::implementation`, the README's "Semantics in short" and
//! the public API docs say the managers answer, kept as plain integers and
//! structs. Nothing here comes from the crate but the vocabulary of its
//! answers (`Settlement`, `FullBudgetInfo`, `HierarchyError`...): no rule,
//! cell or clock code is shared, so a mistake in the crate's arithmetic is
//! not repeated here.
//!
//! `level.rs` holds one level's arithmetic (a window, a bucket); this file
//! holds agents, their chains, and the operations of the API.

use std::collections::BTreeMap;
use std::time::Duration;

use agent_budget::{
    AgentId, BudgetInfo, BudgetKind, CalendarPeriod, FullBudgetInfo, HierarchyError, RefusalReason,
    Settlement,
};
use chrono::{DateTime, Utc};

use crate::level::{note, restart, Bucket, Now, Pair, Policy, Window, MAX_CALLS, MAX_TOKENS};

/// "make any chain longer than MAX_LEVELS (8) levels"
pub const MAX_LEVELS: usize = 8;

/// A refusal, told by the public facts of `Refused` (or `BudgetExceeded`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub agent_id: AgentId,
    pub kind: BudgetKind,
    pub refused_by: AgentId,
    pub retry_after: Option<Duration>,
    pub reason: RefusalReason,
}

/// What an admission took, and where: settles apply "each in the window
/// that level was in when the reservation was taken".
#[derive(Clone, Debug)]
pub struct Ticket {
    taken: Pair,
    /// The agent's own level first, then its ancestors'.
    levels: Vec<Taken>,
}

/// What a set's admission took, limit by limit, in the order taken.
#[derive(Clone, Debug)]
pub struct SetTicket {
    levels: Vec<SetLevel>,
}

/// One limit of a set's ticket: where, how much, and which claims reach it.
#[derive(Clone, Debug)]
struct SetLevel {
    at: Taken,
    pair: Pair,
    reached_by: Vec<usize>,
}

/// Where a ticket was taken at one level.
#[derive(Clone, Copy, Debug)]
struct Taken {
    agent: AgentId,
    incarnation: u64,
    /// The window it was taken in; `None` for a bucket ("Buckets have no
    /// windows").
    window: Option<u64>,
}

#[derive(Clone, Debug)]
struct Agent {
    /// Changes on remove + set: "`Settlement::AgentRemoved` ... even if
    /// its budget is set again".
    incarnation: u64,
    policy: Policy,
    parent: Option<AgentId>,
}

/// Every agent's budget and usage, and the time.
pub struct Model {
    now: Now,
    agents: BTreeMap<AgentId, Agent>,
    incarnations: u64,
    windows: u64,
}

impl Model {
    /// The documents' model, with no agent yet, of a manager created at
    /// `utc_origin`.
    pub fn new(utc_origin: DateTime<Utc>) -> Self {
        Model {
            now: Now { ns: 0, utc_origin },
            agents: BTreeMap::new(),
            incarnations: 0,
            windows: 0,
        }
    }

    /// Sets the clock (quanta's mock, in ns since the manager was created),
    /// backwards too: "a clock that reads slightly backwards".
    pub fn set_now(&mut self, ns: u128) {
        self.now = Now { ns, ..self.now };
    }

    fn new_window(&mut self) -> u64 {
        self.windows += 1;
        self.windows
    }

    fn agent(&self, id: &AgentId) -> &Agent {
        &self.agents[id]
    }

    fn policy(&mut self, id: &AgentId) -> &mut Policy {
        &mut self.agents.get_mut(id).expect("a known agent").policy
    }

    /// What every write at a level does first (see `Policy::observe`).
    fn observe(&mut self, id: &AgentId) {
        let (now, next) = (self.now, self.windows + 1);
        if self.policy(id).observe(now, next) {
            self.windows = next;
        }
    }

    // ----- Configuration -------------------------------------------------

    fn insert(&mut self, id: AgentId, policy: Policy) {
        self.incarnations += 1;
        let agent = Agent {
            incarnation: self.incarnations,
            policy,
            parent: None,
        };
        self.agents.insert(id, agent);
    }

    /// "A window starts when an agent's budget is first set"; "`set_budget`
    /// on a known agent keeps its usage and window; the new limit applies
    /// from then on"; "Switching an agent between `set_budget` and
    /// `set_refill` keeps what it has in use: the new policy starts with
    /// that much already used."
    pub fn set_budget(&mut self, id: AgentId, tokens: u64, calls: u64, secs: u64) {
        self.set_window(id, Pair { tokens, calls }, secs, None);
    }

    /// "`set_calendar(CalendarLimit { period: Day | Month, .. })` gives an
    /// agent fixed windows on the UTC calendar"; "Otherwise every rule of
    /// fixed windows holds"; "`set_calendar` on a known agent on windows
    /// keeps its usage and window, which now ends at the calendar boundary
    /// after its start".
    pub fn set_calendar(&mut self, id: AgentId, tokens: u64, calls: u64, period: CalendarPeriod) {
        if let Some(Policy::Window(w)) = self.agents.get(&id).map(|a| a.policy) {
            if w.calendar.is_none() && w.used != Pair::default() && !w.expired(self.now) {
                note("a fixed window switched to the calendar keeps its usage");
            }
        }
        self.set_window(id, Pair { tokens, calls }, 0, Some(period));
    }

    fn set_window(
        &mut self,
        id: AgentId,
        configured: Pair,
        secs: u64,
        calendar: Option<CalendarPeriod>,
    ) {
        let Pair { tokens, calls } = configured;
        if tokens > MAX_TOKENS || calls > MAX_CALLS {
            note("a budget beyond the maximum");
        }
        let now = self.now;
        let fresh = |id, used| Window {
            configured,
            secs,
            calendar,
            id,
            start: now.boundary(),
            used,
        };
        match self.agents.get(&id).map(|a| a.policy) {
            None => {
                let window = fresh(self.new_window(), Pair::default());
                self.insert(id, Policy::Window(window));
            }
            // "keeps its usage and window ... unless the window has already
            // run its old length: it is over, and a fresh one starts now".
            Some(Policy::Window(w)) if w.expired(now) => {
                note("a budget set again on an expired window");
                let window = fresh(self.new_window(), Pair::default());
                *self.policy(&id) = Policy::Window(window);
            }
            Some(Policy::Window(w)) => {
                *self.policy(&id) = Policy::Window(Window {
                    configured,
                    secs,
                    calendar,
                    ..w
                });
            }
            Some(bucket @ Policy::Bucket(b)) => {
                let used = bucket.in_use(now);
                if used != Pair::default() {
                    note("a bucket switched to a window with usage");
                }
                // "starts the new policy now ... after the old one's mark".
                let window = Window {
                    start: restart(now, b.mark),
                    ..fresh(self.new_window(), used)
                };
                *self.policy(&id) = Policy::Window(window);
            }
        }
    }

    /// "An agent starts full"; a known agent "keeps what it has in use
    /// (under a fixed window: its window's usage), now refilling at the new
    /// rate"; "A switch between a window and a bucket (or a new rate) first
    /// converts the usage word to the new policy at that instant".
    pub fn set_refill(&mut self, id: AgentId, tokens: u64, calls: u64, period: Duration) {
        let now = self.now;
        let mut bucket = Bucket {
            configured: Pair { tokens, calls },
            period,
            mark: now.boundary(),
            count: Pair::default(),
        };
        match self.agents.get(&id).map(|a| a.policy) {
            None => return self.insert(id, Policy::Bucket(bucket)),
            // Not a new rate: the bucket keeps its mark and counts. (The
            // rate is the one enforced: the documents do not say whether a
            // budget beyond the maximum set again as another is new.)
            Some(Policy::Bucket(old))
                if (old.limit(), old.period_ms()) == (bucket.limit(), bucket.period_ms()) =>
            {
                note("the same rate set again keeps its mark");
                bucket.mark = old.mark;
                bucket.count = old.count;
            }
            Some(old) => {
                let used = old.in_use(now);
                if used != Pair::default() {
                    note("a switch to a bucket with usage");
                }
                // "A bucket's refill starts now (or at the old mark, if that
                // is later still)".
                bucket.mark = now.boundary().max(old.stamp().1);
                // What is carried over stops where a bucket's debt
                // saturates.
                let most = bucket.saturation();
                bucket.count = Pair {
                    tokens: used.tokens.min(most.tokens),
                    calls: used.calls.min(most.calls),
                };
            }
        }
        *self.policy(&id) = Policy::Bucket(bucket);
    }

    /// "`remove_budget` forgets limit and usage"; "`remove_budget` of a
    /// parent detaches its children, who keep their own budgets and usage".
    pub fn remove_budget(&mut self, id: &AgentId) {
        if self.agents.remove(id).is_none() {
            return;
        }
        for agent in self.agents.values_mut() {
            if agent.parent == Some(*id) {
                note("removing a parent detaches a child");
                agent.parent = None;
            }
        }
    }

    /// "Both must have budgets. A link that would close a cycle, or make
    /// any chain longer than MAX_LEVELS (8) levels, is refused with a
    /// HierarchyError, and nothing changes. `set_parent(&child, None)`
    /// detaches." The crate's reading of which error comes first: the
    /// child unknown, the parent unknown, a cycle, too deep.
    pub fn set_parent(
        &mut self,
        child: AgentId,
        parent: Option<AgentId>,
    ) -> Result<(), HierarchyError> {
        if !self.agents.contains_key(&child) {
            return Err(HierarchyError::UnknownAgent(child));
        }
        if let Some(parent) = parent {
            if !self.agents.contains_key(&parent) {
                return Err(HierarchyError::UnknownAgent(parent));
            }
            // "The parent is the child itself or one of its descendants."
            if self.chain(&parent).contains(&child) {
                return Err(HierarchyError::Cycle { child, parent });
            }
            // "The longest chain through the link would have more than
            // MAX_LEVELS levels": the parent's chain, and the longest chain
            // below the child, the child included.
            let levels = self.chain(&parent).len() + self.height(&child);
            if levels > MAX_LEVELS {
                return Err(HierarchyError::TooDeep { levels });
            }
        }
        self.agents.get_mut(&child).unwrap().parent = parent;
        Ok(())
    }

    /// The agent, its parent, its parent's parent...
    fn chain(&self, id: &AgentId) -> Vec<AgentId> {
        let mut chain = vec![*id];
        while let Some(parent) = self.agent(chain.last().unwrap()).parent {
            assert!(chain.len() < MAX_LEVELS, "links are checked");
            chain.push(parent);
        }
        chain
    }

    /// Levels in the longest chain from a leaf up to `id`, `id` included.
    fn height(&self, id: &AgentId) -> usize {
        let children = self.agents.iter().filter(|(_, a)| a.parent == Some(*id));
        1 + children
            .map(|(child, _)| self.height(child))
            .max()
            .unwrap_or(0)
    }

    // ----- Requests -------------------------------------------------------

    /// "`acquire`, `reserve` and `track_call` ... admit at every level of
    /// the chain or at none. On a refusal nothing stays taken at any level
    /// once the call returns, and the error names the level that refused
    /// (`refused_by`: the agent or an ancestor)"; "Levels are taken one
    /// after the other ... a level that refuses makes the levels below it
    /// give back what they took." `no_budget` is the kind an unknown agent
    /// is refused with ("also reported by `reserve` [or `track_call`] for
    /// an unknown agent").
    pub fn acquire(
        &mut self,
        id: AgentId,
        taken: Pair,
        no_budget: BudgetKind,
    ) -> Result<Ticket, Refusal> {
        if !self.agents.contains_key(&id) {
            // "every request for it is refused with `No budget configured
            // for agent {id}`"
            return Err(Refusal {
                agent_id: id,
                kind: no_budget,
                refused_by: id,
                retry_after: None,
                reason: RefusalReason::NoBudget,
            });
        }
        let now = self.now;
        let mut levels: Vec<Taken> = Vec::new();
        for level in self.chain(&id) {
            self.observe(&level);
            if let Err(short) = self.policy(&level).take(now, taken) {
                if !levels.is_empty() {
                    note("levels below a refusing ancestor give back");
                }
                for below in &levels {
                    self.policy(&below.agent).refund(now, taken);
                }
                let [requested, remaining, used, limit] = short.numbers;
                return Err(Refusal {
                    agent_id: id,
                    kind: short.kind,
                    refused_by: level,
                    retry_after: short.retry_after,
                    reason: RefusalReason::Exceeded {
                        requested,
                        remaining,
                        used,
                        limit,
                    },
                });
            }
            let agent = self.agent(&level);
            let (window, _) = agent.policy.stamp();
            levels.push(Taken {
                agent: level,
                incarnation: agent.incarnation,
                window,
            });
        }
        Ok(Ticket { taken, levels })
    }

    /// "Several limits at once": "A claim reaches its agent and every
    /// ancestor of it, each with the claim's amounts"; "Every limit
    /// reached takes its amount, or none keeps anything"; "Limits are taken
    /// in a fixed order: the claims' own agents first, then their parents,
    /// then the grandparents..., each level in ascending order of agent
    /// id"; "A refusal names the first limit in that order that is short of
    /// room ... `agent_id` the agent of the first claim (as given) that
    /// reaches it"; "A claim whose agent has no budget refuses the set
    /// (`NoBudget`, `agent_id` that agent)" (the first such, as given); "A
    /// limit reached twice ... is charged once, with the largest amount of
    /// each resource among the claims that reach it". (The runs never
    /// reach `MAX_SET_LIMITS`.)
    pub fn acquire_set(&mut self, claims: &[(AgentId, Pair)]) -> Result<SetTicket, Refusal> {
        if let Some((unknown, _)) = claims.iter().find(|(id, _)| !self.agents.contains_key(id)) {
            return Err(Refusal {
                agent_id: *unknown,
                kind: BudgetKind::Token,
                refused_by: *unknown,
                retry_after: None,
                reason: RefusalReason::NoBudget,
            });
        }
        // Each limit: (depth, id) -> (amounts, claims reaching it).
        let mut plan: BTreeMap<AgentId, (usize, Pair, Vec<usize>)> = BTreeMap::new();
        for (n, (id, pair)) in claims.iter().enumerate() {
            for (depth, level) in self.chain(id).into_iter().enumerate() {
                let entry = plan
                    .entry(level)
                    .or_insert((depth, Pair::default(), Vec::new()));
                if !entry.2.is_empty() {
                    note("a limit reached twice in a set");
                }
                entry.0 = entry.0.min(depth);
                entry.1.tokens = entry.1.tokens.max(pair.tokens);
                entry.1.calls = entry.1.calls.max(pair.calls);
                entry.2.push(n);
            }
        }
        let mut order: Vec<(usize, AgentId)> = plan.iter().map(|(id, e)| (e.0, *id)).collect();
        order.sort();
        let now = self.now;
        let mut levels: Vec<SetLevel> = Vec::new();
        for (_, level) in order {
            let (_, pair, reached_by) = plan[&level].clone();
            self.observe(&level);
            if let Err(short) = self.policy(&level).take(now, pair) {
                if !levels.is_empty() {
                    note("a refused set gives back what it took");
                }
                for taken in &levels {
                    self.policy(&taken.at.agent).refund(now, taken.pair);
                }
                let [requested, remaining, used, limit] = short.numbers;
                return Err(Refusal {
                    agent_id: claims[reached_by[0]].0,
                    kind: short.kind,
                    refused_by: level,
                    retry_after: short.retry_after,
                    reason: RefusalReason::Exceeded {
                        requested,
                        remaining,
                        used,
                        limit,
                    },
                });
            }
            let agent = self.agent(&level);
            let (window, _) = agent.policy.stamp();
            levels.push(SetLevel {
                at: Taken {
                    agent: level,
                    incarnation: agent.incarnation,
                    window,
                },
                pair,
                reached_by,
            });
        }
        Ok(SetTicket { levels })
    }

    /// "`settle_with(|index, claim| actual)` gives each claim's actual
    /// tokens ...; calls stay as charged"; "settled with the largest of
    /// their actual amounts"; "Each limit is settled in the window it was
    /// taken in, with the rules of a single reservation"; "The returned
    /// `Settlement` is the worst over the limits: `AgentRemoved`, then
    /// `WindowEnded`, then `CarriedOver`, then `Applied`; among equals, the
    /// one that charged the most beyond its reservation; among those, the
    /// first in the order taken. An empty set ... settles as `Applied` with
    /// nothing moved." `None`: a cancel ("gives everything back").
    pub fn settle_set(&mut self, ticket: SetTicket, actuals: Option<&[u64]>) -> Settlement {
        let rank = |s: &Settlement| match *s {
            Settlement::AgentRemoved => (3, 0),
            Settlement::WindowEnded => (2, 0),
            Settlement::CarriedOver { charged_tokens } => (1, charged_tokens),
            Settlement::Applied { charged_tokens, .. } => (0, charged_tokens),
        };
        let mut worst = Settlement::Applied {
            refunded_tokens: 0,
            charged_tokens: 0,
            refunded_calls: 0,
        };
        for (k, level) in ticket.levels.iter().enumerate() {
            let used = match actuals {
                Some(actuals) => Pair {
                    tokens: level
                        .reached_by
                        .iter()
                        .map(|&n| actuals[n])
                        .max()
                        .unwrap_or(0),
                    calls: level.pair.calls,
                },
                None => Pair::default(),
            };
            let outcome = self.book_level(&level.at, level.pair, used);
            if k > 0 && outcome != worst {
                note("a settle books differently at two levels");
            }
            if k == 0 || rank(&outcome) > rank(&worst) {
                worst = outcome;
            }
        }
        worst
    }

    /// "Books what was really used: `actual_tokens` replaces the reserved
    /// tokens, and the calls stay charged"; "Settle and cancel apply at
    /// every level, each in the window that level was in when the
    /// reservation was taken. The returned `Settlement` reports the
    /// agent's own level."
    pub fn settle(&mut self, ticket: Ticket, actual_tokens: u64) -> Settlement {
        let used = Pair {
            tokens: actual_tokens,
            calls: ticket.taken.calls,
        };
        self.book(&ticket, used)
    }

    /// "Gives everything back, tokens and calls: the work never happened."
    pub fn cancel(&mut self, ticket: Ticket) -> Settlement {
        self.book(&ticket, Pair::default())
    }

    fn book(&mut self, ticket: &Ticket, used: Pair) -> Settlement {
        let outcomes: Vec<Settlement> = ticket
            .levels
            .iter()
            .map(|level| self.book_level(level, ticket.taken, used))
            .collect();
        if outcomes[1..].iter().any(|o| *o != outcomes[0]) {
            note("a settle books differently at two levels");
        }
        outcomes[0]
    }

    /// Replaces `taken` by `used` at one level.
    fn book_level(&mut self, level: &Taken, taken: Pair, used: Pair) -> Settlement {
        // "Of a child: its reservations settle to `AgentRemoved` at its own
        // level and still apply at its ancestors".
        let Some(agent) = self.agents.get(&level.agent).cloned() else {
            return Settlement::AgentRemoved;
        };
        if agent.incarnation != level.incarnation {
            return Settlement::AgentRemoved;
        }
        let now = self.now;
        let refund = Pair {
            tokens: taken.tokens.saturating_sub(used.tokens),
            calls: taken.calls - used.calls,
        };
        let charge = used.tokens.saturating_sub(taken.tokens);
        let current = match agent.policy {
            // "Buckets have no windows: every settle is booked into the
            // bucket."
            Policy::Bucket(_) => true,
            Policy::Window(w) => {
                // The documents' reading: a window begun since (by a roll
                // over, a reset, or a move from a bucket) is another.
                level.window == Some(w.id) && !w.expired(now)
            }
        };
        let policy = self.policy(&level.agent);
        if current {
            // "Less than reserved is refunded, into the window it was taken
            // from ... More than reserved is charged even past the limit":
            // the settlement tells what changed (a refund stops at nothing
            // in use, a charge at the maximum).
            let before = policy.in_use(now);
            policy.refund(now, refund);
            policy.charge(now, charge);
            let after = policy.in_use(now);
            return Settlement::Applied {
                refunded_tokens: before.tokens.saturating_sub(after.tokens),
                charged_tokens: after.tokens.saturating_sub(before.tokens),
                refunded_calls: before.calls.saturating_sub(after.calls),
            };
        }
        if charge == 0 {
            // "Refunds never cross windows: a settle below the reservation
            // after its window ended changes nothing".
            return Settlement::WindowEnded;
        }
        // "If the reservation's window has ended by then, the excess is
        // charged to the window current at the settle, at every level of
        // the chain".
        self.observe(&level.agent);
        let policy = self.policy(&level.agent);
        let before = policy.in_use(now).tokens;
        policy.charge(now, charge);
        Settlement::CarriedOver {
            charged_tokens: policy.in_use(now).tokens - before,
        }
    }

    /// "Gives `tokens` back now, never below zero, at the agent's level and
    /// at each of its ancestors'".
    pub fn release(&mut self, id: &AgentId, tokens: u64) {
        if !self.agents.contains_key(id) {
            return;
        }
        let now = self.now;
        for level in self.chain(id) {
            self.observe(&level);
            let amount = Pair { tokens, calls: 0 };
            self.policy(&level).refund(now, amount);
        }
    }

    /// "`reset_window` starts a new, empty window now"; "Starts a fresh
    /// window (or a full bucket) for the agent's own level, now, with
    /// nothing used."
    pub fn reset_window(&mut self, id: &AgentId) {
        if self.agents.contains_key(id) {
            let (now, window) = (self.now, self.new_window());
            self.policy(id).reset(now, window);
        }
    }

    // ----- Reads ------------------------------------------------------------

    /// "The limits and usage of the agent's own level, or `None` if it has
    /// no budget."
    pub fn full_info(&self, id: &AgentId) -> Option<FullBudgetInfo> {
        let policy = self.agents.get(id)?.policy;
        let (configured, limit) = (policy.configured(), policy.limit());
        let used = policy.in_use(self.now);
        // "the remaining amount under the maximum"
        let remaining = Pair {
            tokens: limit.tokens.saturating_sub(used.tokens),
            calls: limit.calls.saturating_sub(used.calls),
        };
        let (window_secs, window_remaining_secs) = policy.window_secs(self.now);
        Some(FullBudgetInfo {
            agent_id: *id,
            token_limit: configured.tokens,
            tokens_used: used.tokens,
            tokens_remaining: remaining.tokens,
            calls_limit: configured.calls,
            calls_used: used.calls,
            calls_remaining: remaining.calls,
            window_secs,
            window_remaining_secs,
            // "Whether tokens or calls are used up."
            is_exhausted: remaining.tokens == 0 || remaining.calls == 0,
        })
    }

    /// "What is left at the agent's own level"; "An unknown agent reads as
    /// all zeros and exhausted".
    pub fn remaining(&self, id: &AgentId) -> BudgetInfo {
        match self.full_info(id) {
            Some(info) => BudgetInfo {
                tokens_remaining: info.tokens_remaining,
                calls_remaining: info.calls_remaining,
                window_remaining_secs: info.window_remaining_secs,
                is_exhausted: info.is_exhausted,
            },
            None => BudgetInfo {
                tokens_remaining: 0,
                calls_remaining: 0,
                window_remaining_secs: 0,
                is_exhausted: true,
            },
        }
    }

    /// "`can_schedule` answers for the whole chain": "Whether the agent,
    /// and every level above it, has both tokens and calls left."
    pub fn can_schedule(&self, id: &AgentId) -> bool {
        let info = self.chain_info(id);
        !info.is_empty() && info.iter().all(|level| !level.is_exhausted)
    }

    /// "`chain_info` lists every level, the agent first"; "empty if the
    /// agent has no budget".
    pub fn chain_info(&self, id: &AgentId) -> Vec<FullBudgetInfo> {
        if !self.agents.contains_key(id) {
            return Vec::new();
        }
        let chain = self.chain(id);
        chain
            .iter()
            .filter_map(|level| self.full_info(level))
            .collect()
    }

    /// "`full_info` of every agent, in no particular order": here sorted by
    /// id.
    pub fn all_full_info(&self) -> Vec<FullBudgetInfo> {
        let ids = self.agents.keys();
        ids.filter_map(|id| self.full_info(id)).collect()
    }
}
