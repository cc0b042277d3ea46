//! The reference model: what `docs::semantics`, the "Refilling buckets"
//! section of `docs::implementation`, the README's "Semantics in short" and
//! the public API docs say the managers do, written as plain integers and
//! structs. Nothing here comes from the crate but the vocabulary of its
//! answers (`Settlement`, `FullBudgetInfo`, `HierarchyError`...): no rule,
//! cell or clock code is shared, so a mistake in the crate's arithmetic is
//! not repeated here.
//!
//! Quotes in the comments are the sentences each piece implements.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Duration;

use agent_budget::{
    AgentId, BudgetInfo, BudgetKind, FullBudgetInfo, HierarchyError, RefusalReason, Settlement,
};

/// "up to MAX_TOKENS (2^52 − 1, about 4.5 × 10^15) tokens"
pub const MAX_TOKENS: u64 = (1 << 52) - 1;
/// "and MAX_CALLS (2^32 − 1, about 4.3 × 10^9) calls per window"
pub const MAX_CALLS: u64 = (1 << 32) - 1;
/// "make any chain longer than MAX_LEVELS (8) levels"
pub const MAX_LEVELS: usize = 8;

const MS: u128 = 1_000_000;
/// A year of 365 days, in seconds. "139 years" in the documents is not
/// exact to the second (see the test's module docs): the generator keeps
/// out of the band where the reading matters, and the model takes the
/// crate's value for it (`LONGEST_MS`).
pub const YEAR_SECS: u64 = 365 * 24 * 3600;
/// "a window of 139 years or longer never ends"; "periods ... beyond 139
/// years, 139 years". The documents round; the exact bound is 2^42 − 1 ms
/// (139.4 years), read off the crate where the documents are silent.
pub const LONGEST_MS: u64 = (1 << 42) - 1;

/// The latest instant, in ms since the manager was created, at which
/// `full_info` tells a bucket will be full, and what it tells of one that
/// never will be (debt on a zero budget): the documents are silent; the
/// crate's is 2^44 − 2^39 − 2 ms (about 540 years).
const NEVER_FULL_MS: u64 = (1 << 44) - (1 << 39) - 2;

/// A refusal, told by the public facts of `Refused` (or `BudgetExceeded`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub agent_id: AgentId,
    pub kind: BudgetKind,
    pub refused_by: AgentId,
    pub retry_after: Option<Duration>,
    pub reason: RefusalReason,
}

/// What an admission took, and where: "each in the window that level was
/// in when the reservation was taken".
#[derive(Clone, Debug)]
pub struct Ticket {
    tokens: u64,
    calls: u64,
    /// The agent's own level first, then its ancestors'.
    levels: Vec<Level>,
}

#[derive(Clone, Copy, Debug)]
struct Level {
    agent: AgentId,
    incarnation: u64,
    /// The window it was taken in; `None` for a bucket ("Buckets have no
    /// windows").
    window: Option<u64>,
    /// The instant (ms) that window started, or the bucket's mark: what
    /// the crate tells windows apart by (a known defect, see
    /// `Model::book_level`).
    stamp: u64,
}

/// What `set_budget` or `set_refill` was given.
#[derive(Clone, Copy, Debug)]
enum Config {
    Window {
        tokens: u64,
        calls: u64,
        secs: u64,
    },
    Bucket {
        tokens: u64,
        calls: u64,
        period: Duration,
    },
}

/// What is in use at one level.
#[derive(Clone, Copy, Debug)]
enum Usage {
    /// A fixed window: its identity, its start (ms) and what it used.
    Window {
        id: u64,
        start: u64,
        tokens: u64,
        calls: u64,
    },
    /// A bucket: "the counts of a bucket are what was in use as of the
    /// mark, and what has refilled since is computed from the time
    /// elapsed, never stored". Counts may be past the budget (debt).
    Bucket { mark: u64, tokens: u64, calls: u64 },
}

#[derive(Clone, Debug)]
struct Agent {
    /// Changes on remove + set: "Settlement::AgentRemoved ... even if its
    /// budget is set again".
    incarnation: u64,
    config: Config,
    usage: Usage,
    parent: Option<AgentId>,
}

/// Two resources side by side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pair {
    tokens: u64,
    calls: u64,
}

impl Pair {
    fn get(self, kind: BudgetKind) -> u64 {
        match kind {
            BudgetKind::Token => self.tokens,
            BudgetKind::Call => self.calls,
        }
    }
}

const KINDS: [BudgetKind; 2] = [BudgetKind::Token, BudgetKind::Call];

/// The state of every agent, and the time.
pub struct Model {
    /// Nanoseconds since the manager was created (the mock clock's value).
    now_ns: u128,
    agents: BTreeMap<AgentId, Agent>,
    incarnations: u64,
    windows: u64,
    /// Whether to follow the crate where it departs from the documents in
    /// the ways reported (each one named where it applies), or the
    /// documents alone.
    known_defects: bool,
    /// How often each rule of the model came into play, for the coverage
    /// check.
    /// (Reads note too, hence the cell.)
    events: RefCell<BTreeMap<&'static str, u32>>,
}

impl Model {
    /// The documents' model, or (with `known_defects`) the documents' with
    /// the crate's reported departures from them.
    pub fn new(known_defects: bool) -> Self {
        Model {
            now_ns: 0,
            agents: BTreeMap::new(),
            incarnations: 0,
            windows: 0,
            known_defects,
            events: RefCell::default(),
        }
    }

    fn note(&self, event: &'static str) {
        *self.events.borrow_mut().entry(event).or_default() += 1;
    }

    /// How often each rule came into play.
    pub fn events(&self) -> BTreeMap<&'static str, u32> {
        self.events.borrow().clone()
    }

    // ----- Time --------------------------------------------------------

    /// Moves the clock; backwards too ("a clock that reads slightly
    /// backwards").
    pub fn set_now(&mut self, ns: u128) {
        self.now_ns = ns;
    }

    /// "counted in whole milliseconds since the manager was created": the
    /// last millisecond boundary passed.
    fn tick(&self) -> u64 {
        (self.now_ns / MS) as u64
    }

    /// "A window starts at the next millisecond boundary".
    fn boundary(&self) -> u64 {
        self.now_ns.div_ceil(MS) as u64
    }

    // ----- Limits and lengths --------------------------------------------

    /// "a larger budget is enforced as the maximum"; for buckets, "budgets
    /// up to half of MAX_TOKENS and MAX_CALLS".
    fn enforced(config: Config) -> Pair {
        match config {
            Config::Window { tokens, calls, .. } => Pair {
                tokens: tokens.min(MAX_TOKENS),
                calls: calls.min(MAX_CALLS),
            },
            Config::Bucket { tokens, calls, .. } => Pair {
                tokens: tokens.min(MAX_TOKENS / 2),
                calls: calls.min(MAX_CALLS / 2),
            },
        }
    }

    /// The most a level can have in use. A window: the maximum ("an extra
    /// charge ... saturates at the maximum"). A bucket: its count (what is
    /// in use plus what has refilled since the mark) stops a budget short
    /// of the maximum, so this is the most at its mark; the documents do
    /// not say where a bucket's debt saturates.
    fn most_in_use(config: Config) -> Pair {
        match config {
            Config::Window { .. } => Pair {
                tokens: MAX_TOKENS,
                calls: MAX_CALLS,
            },
            Config::Bucket { .. } => {
                let budget = Self::enforced(config);
                Pair {
                    tokens: MAX_TOKENS - budget.tokens,
                    calls: MAX_CALLS - budget.calls,
                }
            }
        }
    }

    fn configured(config: Config) -> Pair {
        match config {
            Config::Window { tokens, calls, .. } | Config::Bucket { tokens, calls, .. } => {
                Pair { tokens, calls }
            }
        }
    }

    /// A window's length in ms, `None` if it never ends: "`window_secs = 0`
    /// is a one-millisecond window"; "a window of 139 years or longer never
    /// ends".
    fn window_ms(secs: u64) -> Option<u64> {
        let ms = u128::from(secs) * 1000;
        if secs == 0 {
            Some(1)
        } else if ms >= u128::from(LONGEST_MS) {
            None
        } else {
            Some(ms as u64)
        }
    }

    /// "periods in whole milliseconds (rounded up; zero is one
    /// millisecond; beyond 139 years, 139 years)".
    fn period_ms(period: Duration) -> u64 {
        let ms = period.as_nanos().div_ceil(MS);
        ms.clamp(1, u128::from(LONGEST_MS)) as u64
    }

    /// "`window_secs` is the period in whole seconds (rounded up)".
    fn period_secs(period: Duration) -> u64 {
        period
            .as_secs()
            .saturating_add(u64::from(period.subsec_nanos() > 0))
    }

    // ----- One level's usage ---------------------------------------------

    fn agent(&self, id: &AgentId) -> &Agent {
        &self.agents[id]
    }

    /// Whether a window starting at `start` of `secs` has expired now: "a
    /// window has expired once the time since its start is at least its
    /// length"; "elapsed time saturates at zero".
    fn expired(&self, start: u64, secs: u64) -> bool {
        Self::window_ms(secs).is_some_and(|len| self.elapsed(start) >= len)
    }

    /// Whole milliseconds since `start`, "saturating at zero" (a window
    /// starts at the next boundary, which may not have come yet).
    fn elapsed(&self, start: u64) -> u64 {
        self.tick().saturating_sub(start)
    }

    /// What a bucket has regained since its mark, per resource: "After `t`,
    /// a drained resource has regained exactly floor(budget × t /
    /// refill_period)".
    fn refilled(&self, mark: u64, budget: u64, period_ms: u64) -> u128 {
        let t = u128::from(self.tick().saturating_sub(mark));
        u128::from(budget) * t / u128::from(period_ms)
    }

    /// Milliseconds from now until `at` milliseconds after a bucket's
    /// mark.
    fn until(&self, mark: u64, at: u128) -> u128 {
        (u128::from(mark) + at).saturating_sub(u128::from(self.tick()))
    }

    /// What is in use at a level now, as a read sees it: "Reads report an
    /// expired window as the fresh one the next write will start";
    /// "in use at now = count − floor(budget × (now − mark) / period), at
    /// least 0".
    fn in_use(&self, agent: &Agent) -> Pair {
        match (agent.config, agent.usage) {
            (
                Config::Window { secs, .. },
                Usage::Window {
                    start,
                    tokens,
                    calls,
                    ..
                },
            ) => {
                if self.expired(start, secs) {
                    if tokens > 0 || calls > 0 {
                        self.note("a used window read as fresh once expired");
                    }
                    Pair {
                        tokens: 0,
                        calls: 0,
                    }
                } else {
                    if self.tick() < start {
                        self.note("a window read before its start (a boundary ahead)");
                    }
                    Pair { tokens, calls }
                }
            }
            (
                Config::Bucket { period, .. },
                Usage::Bucket {
                    mark,
                    tokens,
                    calls,
                },
            ) => {
                let budget = Self::enforced(agent.config);
                let p = Self::period_ms(period);
                let left = |count: u64, budget: u64| {
                    u128::from(count).saturating_sub(self.refilled(mark, budget, p)) as u64
                };
                let used = Pair {
                    tokens: left(tokens, budget.tokens),
                    calls: left(calls, budget.calls),
                };
                if used.tokens > budget.tokens || used.calls > budget.calls {
                    self.note("a bucket read in debt");
                }
                if self.tick() < mark {
                    self.note("a bucket read before its mark (a boundary ahead)");
                }
                used
            }
            _ => unreachable!("a level's usage follows its policy"),
        }
    }

    /// What every write does first at a level: "Once it has run its
    /// length, the next operation that observes the expiry — admitted or
    /// refused — starts a new, empty window at that instant".
    fn observe(&mut self, id: &AgentId) {
        let agent = self.agents.get(id).expect("observed agents exist").clone();
        if let (Config::Window { secs, .. }, Usage::Window { start, .. }) =
            (agent.config, agent.usage)
        {
            if self.expired(start, secs) {
                self.note("window rolled over by a write");
                let window = self.new_window();
                self.agents.get_mut(id).unwrap().usage = Usage::Window {
                    id: window,
                    start: self.boundary(),
                    tokens: 0,
                    calls: 0,
                };
            }
        }
    }

    /// What a bucket's write does first: "the mark moves by whole periods":
    /// "once `now − mark` reaches a period, the mark moves forward by as
    /// many whole periods as fit, and each count drops by as many budgets".
    /// Only a write that changes what is in use moves it (a clock read
    /// backwards shows the difference).
    fn normalize(&mut self, id: &AgentId) {
        let agent = self.agent(id).clone();
        let (
            Config::Bucket { period, .. },
            Usage::Bucket {
                mark,
                tokens,
                calls,
            },
        ) = (agent.config, agent.usage)
        else {
            return;
        };
        let p = Self::period_ms(period);
        let periods = self.tick().saturating_sub(mark) / p;
        if periods > 0 {
            let budget = Self::enforced(agent.config);
            let drop = |count: u64, budget: u64| {
                u128::from(count).saturating_sub(u128::from(periods) * u128::from(budget)) as u64
            };
            let (tokens, calls) = (drop(tokens, budget.tokens), drop(calls, budget.calls));
            // A bucket found full when its mark moves starts over: the
            // mark moves to now. (The documents say so of admissions; the
            // crate does it at every write that moves the mark, which
            // shows only in where a later charge's refill starts.)
            let mark = if tokens == 0 && calls == 0 {
                self.note("a full bucket starts over when its mark moves");
                self.boundary()
            } else {
                mark + periods * p
            };
            self.agents.get_mut(id).unwrap().usage = Usage::Bucket {
                mark,
                tokens,
                calls,
            };
        }
    }

    /// Where `reset_window` starts a window (or a bucket's mark) that
    /// replaces one started at `previous`: "now", "at the next millisecond
    /// boundary". Known defect: the crate starts it at least a millisecond
    /// after the one it replaces, so resets within one millisecond push
    /// the window (or the bucket's refill) into the future.
    fn restart(&mut self, previous: u64) -> u64 {
        let documented = self.boundary();
        if self.known_defects && previous >= documented {
            self.note("known defect: a reset within a millisecond starts later");
            return previous + 1;
        }
        documented
    }

    fn new_window(&mut self) -> u64 {
        self.windows += 1;
        self.windows
    }

    /// Sets a level's in-use amounts to `used` now, keeping its window or
    /// the bucket's phase: the bucket's count is "what was in use as of the
    /// mark", so it is what is in use now plus what refilled since.
    ///
    /// Known defect: the crate clamps a bucket's counts to a budget short
    /// of the maximum at every write but an admission (`clamp`), though a
    /// count may reach twice the budget: with budgets above a third of the
    /// maximum (up to half is documented as exact) a refund or a release
    /// then forgets usage.
    fn store(&mut self, id: &AgentId, used: Pair, clamp: bool) {
        self.normalize(id);
        let agent = self.agent(id).clone();
        let usage = match (agent.config, agent.usage) {
            (Config::Window { .. }, Usage::Window { id, start, .. }) => Usage::Window {
                id,
                start,
                tokens: used.tokens,
                calls: used.calls,
            },
            (Config::Bucket { period, .. }, Usage::Bucket { mark, .. }) => {
                let budget = Self::enforced(agent.config);
                let p = Self::period_ms(period);
                let count = |used: u64, budget: u64| {
                    let count = u128::from(used) + self.refilled(mark, budget, p);
                    u64::try_from(count).expect("normalized counts stay small")
                };
                let (mut tokens, mut calls) = (
                    count(used.tokens, budget.tokens),
                    count(used.calls, budget.calls),
                );
                if clamp && self.known_defects {
                    let most = Self::most_in_use(agent.config);
                    if tokens > most.tokens || calls > most.calls {
                        self.note("known defect: a write clamps a bucket's count");
                    }
                    (tokens, calls) = (tokens.min(most.tokens), calls.min(most.calls));
                }
                Usage::Bucket {
                    mark,
                    tokens,
                    calls,
                }
            }
            _ => unreachable!("a level's usage follows its policy"),
        };
        self.agents.get_mut(id).unwrap().usage = usage;
    }

    /// Tries to take `request` at one level: `Ok` with where it was taken,
    /// or the refusal's facts at this level.
    fn take(&mut self, id: &AgentId, request: Pair) -> Result<(), Short> {
        self.observe(id);
        let agent = self.agent(id).clone();
        let used = self.in_use(&agent);
        let limit = Self::enforced(agent.config);
        // "requests of zero always fit for a known agent, even an
        // exhausted one"; otherwise what is in use plus the request must
        // stay within the limit.
        let fits = |kind| {
            request.get(kind) == 0
                || u128::from(used.get(kind)) + u128::from(request.get(kind))
                    <= u128::from(limit.get(kind))
        };
        // Both may fall short: the documents do not say which is named. The
        // crate names one that can never fit if there is one (so that
        // `kind` and `retry_after: None` tell the same story), else tokens.
        let never = |kind| request.get(kind) > limit.get(kind);
        let short = KINDS
            .iter()
            .find(|&&kind| never(kind))
            .or_else(|| KINDS.iter().find(|&&kind| !fits(kind)));
        if let Some(&kind) = short {
            if KINDS.iter().all(|&kind| !fits(kind)) {
                self.note("both resources short at one level");
            }
            let retry_after = self.retry_after(&agent, used, request, kind);
            return Err(Short {
                kind,
                retry_after,
                reason: RefusalReason::Exceeded {
                    requested: request.get(kind),
                    remaining: limit.get(kind).saturating_sub(used.get(kind)),
                    used: used.get(kind),
                    limit: limit.get(kind),
                },
            });
        }
        match agent.usage {
            Usage::Window { .. } => {
                self.store(
                    id,
                    Pair {
                        tokens: used.tokens + request.tokens,
                        calls: used.calls + request.calls,
                    },
                    false,
                );
                Ok(())
            }
            Usage::Bucket { .. } => {
                if request
                    == (Pair {
                        tokens: 0,
                        calls: 0,
                    })
                {
                    // Nothing taken, nothing written: the mark stays (seen
                    // only through the known defect in `book_level`).
                } else if used
                    == (Pair {
                        tokens: 0,
                        calls: 0,
                    })
                {
                    // "When both resources are full at an admission, the
                    // mark moves to now".
                    self.note("a full bucket restarts its mark");
                    self.agents.get_mut(id).unwrap().usage = Usage::Bucket {
                        mark: self.boundary(),
                        tokens: request.tokens,
                        calls: request.calls,
                    };
                } else {
                    if used.tokens == 0 || used.calls == 0 {
                        self.note("one resource full, the other not, at an admission");
                    }
                    self.store(
                        id,
                        Pair {
                            tokens: used.tokens + request.tokens,
                            calls: used.calls + request.calls,
                        },
                        false,
                    );
                }
                Ok(())
            }
        }
    }

    /// "`retry_after` ... when that level can take the request (`None` if
    /// it never can)": the time until its window ends, or until its bucket
    /// has refilled enough; `None` when the request is larger than the
    /// level's limit.
    fn retry_after(
        &mut self,
        agent: &Agent,
        used: Pair,
        request: Pair,
        named: BudgetKind,
    ) -> Option<Duration> {
        let limit = Self::enforced(agent.config);
        if KINDS.iter().any(|&k| request.get(k) > limit.get(k)) {
            self.note("a request larger than the limit is refused for good");
            return None;
        }
        let now = self.tick();
        let ms = match (agent.config, agent.usage) {
            (Config::Window { secs, .. }, Usage::Window { start, .. }) => {
                match Self::window_ms(secs) {
                    Some(len) => len - self.elapsed(start),
                    // A window that never ends never makes room: "None if
                    // it never can". Known defect: the crate tells the time
                    // until the longest window that does end would.
                    None if self.known_defects => {
                        self.note("known defect: a window that never ends tells a retry");
                        LONGEST_MS.saturating_sub(self.elapsed(start))
                    }
                    None => return None,
                }
            }
            (
                Config::Bucket { period, .. },
                Usage::Bucket {
                    mark,
                    tokens,
                    calls,
                },
            ) => {
                // The first instant at which every resource has room: the
                // count minus what refilled reaches `limit − request`.
                let p = u128::from(Self::period_ms(period));
                let mut wait = 0;
                for (kind, count) in [(BudgetKind::Token, tokens), (BudgetKind::Call, calls)] {
                    if used.get(kind) + request.get(kind) <= limit.get(kind)
                        || request.get(kind) == 0
                    {
                        continue;
                    }
                    if kind != named {
                        // Known defect: the crate tells when the resource
                        // it names has room, though the other may still be
                        // short then.
                        if self.known_defects {
                            self.note("known defect: retry_after for one resource of two short");
                            continue;
                        }
                    }
                    let owed = u128::from(count) + u128::from(request.get(kind))
                        - u128::from(limit.get(kind));
                    let at = (owed * p).div_ceil(u128::from(limit.get(kind)));
                    wait = wait.max(self.until(mark, at));
                }
                // The crate tells no instant later than `NEVER_FULL_MS`
                // (the documents are silent; only debts of centuries reach
                // it).
                let horizon = u128::from(NEVER_FULL_MS).saturating_sub(u128::from(now));
                if wait > horizon {
                    self.note("a retry beyond the horizon");
                    wait = horizon;
                }
                u64::try_from(wait).expect("a wait within a few periods")
            }
            _ => unreachable!("a level's usage follows its policy"),
        };
        Some(Duration::from_millis(ms))
    }

    /// Gives `amount` back at a level: "release saturates at zero";
    /// buckets: "refund into the bucket, never above full". Returns what
    /// was given back.
    fn refund(&mut self, id: &AgentId, amount: Pair) -> Pair {
        let used = self.in_use(self.agent(id));
        if amount.tokens > used.tokens || amount.calls > used.calls {
            self.note("a refund stops at nothing in use");
        }
        let given = Pair {
            tokens: amount.tokens.min(used.tokens),
            calls: amount.calls.min(used.calls),
        };
        // Nothing to give back, nothing written (a clock read backwards
        // would show a bucket's counts rebased by a write).
        if given
            == (Pair {
                tokens: 0,
                calls: 0,
            })
        {
            return given;
        }
        self.store(
            id,
            Pair {
                tokens: used.tokens - given.tokens,
                calls: used.calls - given.calls,
            },
            true,
        );
        given
    }

    /// Charges tokens past the limit at a level: "An extra charge from
    /// `Reservation::settle` saturates at the maximum". Returns what was
    /// charged.
    fn charge(&mut self, id: &AgentId, tokens: u64) -> u64 {
        if tokens == 0 {
            return 0;
        }
        self.normalize(id);
        let used = self.in_use(self.agent(id));
        let most = self.most_tokens(id);
        let total = used
            .tokens
            .saturating_add(tokens)
            .min(most)
            .max(used.tokens);
        if total - used.tokens < tokens {
            self.note("a charge saturates at the maximum");
        }
        self.store(
            id,
            Pair {
                tokens: total,
                calls: used.calls,
            },
            true,
        );
        total - used.tokens
    }

    /// The most tokens a level can have in use now (see `most_in_use`).
    fn most_tokens(&self, id: &AgentId) -> u64 {
        let agent = self.agent(id);
        match (agent.config, agent.usage) {
            (Config::Bucket { period, .. }, Usage::Bucket { mark, .. }) => {
                let budget = Self::enforced(agent.config).tokens;
                // Measured from the mark as the next write will move it:
                // by whole periods.
                let p = Self::period_ms(period);
                let mark = mark + self.tick().saturating_sub(mark) / p * p;
                let refilled = self.refilled(mark, budget, p) as u64;
                Self::most_in_use(agent.config).tokens - refilled
            }
            _ => Self::most_in_use(agent.config).tokens,
        }
    }

    // ----- Configuration ----------------------------------------------------

    fn insert(&mut self, id: AgentId, config: Config, usage: Usage) {
        self.incarnations += 1;
        let agent = Agent {
            incarnation: self.incarnations,
            config,
            usage,
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
        let config = Config::Window {
            tokens,
            calls,
            secs,
        };
        if tokens > MAX_TOKENS || calls > MAX_CALLS {
            self.note("a budget beyond the maximum");
        }
        let Some(agent) = self.agents.get(&id).cloned() else {
            let window = self.new_window();
            let usage = Usage::Window {
                id: window,
                start: self.boundary(),
                tokens: 0,
                calls: 0,
            };
            return self.insert(id, config, usage);
        };
        let usage = match agent.usage {
            Usage::Window { .. } => agent.usage,
            Usage::Bucket { .. } => {
                let used = self.in_use(&agent);
                if used
                    != (Pair {
                        tokens: 0,
                        calls: 0,
                    })
                {
                    self.note("a bucket switched to a window with usage");
                }
                Usage::Window {
                    id: self.new_window(),
                    start: self.boundary(),
                    tokens: used.tokens,
                    calls: used.calls,
                }
            }
        };
        let agent = self.agents.get_mut(&id).unwrap();
        agent.config = config;
        agent.usage = usage;
    }

    /// "An agent starts full"; a known agent "keeps what it has in use
    /// (under a fixed window: its window's usage), now refilling at the new
    /// rate, and keeps its parent"; "A switch between a window and a bucket
    /// (or a new rate) first converts the usage word to the new policy at
    /// that instant".
    pub fn set_refill(&mut self, id: AgentId, tokens: u64, calls: u64, period: Duration) {
        let config = Config::Bucket {
            tokens,
            calls,
            period,
        };
        if let Some(agent) = self.agents.get_mut(&id) {
            // Only "a switch between a window and a bucket (or a new rate)"
            // converts; the same rate keeps its mark. The rate is the one
            // enforced (the documents do not say whether a budget beyond
            // the maximum, set again as another, is a new rate).
            if let Config::Bucket { period: old, .. } = agent.config {
                let rate = |config, period| (Self::enforced(config), Self::period_ms(period));
                if rate(agent.config, old) == rate(config, period) {
                    agent.config = config;
                    self.note("the same rate set again keeps its mark");
                    return;
                }
            }
        }
        let used = match self.agents.get(&id) {
            Some(agent) => self.in_use(agent),
            None => Pair {
                tokens: 0,
                calls: 0,
            },
        };
        if self.agents.contains_key(&id)
            && used
                != (Pair {
                    tokens: 0,
                    calls: 0,
                })
        {
            self.note("a switch to a bucket with usage");
        }
        let most = Self::most_in_use(config);
        let used = Pair {
            tokens: used.tokens.min(most.tokens),
            calls: used.calls.min(most.calls),
        };
        let usage = Usage::Bucket {
            mark: self.boundary(),
            tokens: used.tokens,
            calls: used.calls,
        };
        match self.agents.get_mut(&id) {
            Some(agent) => {
                agent.config = config;
                agent.usage = usage;
            }
            None => self.insert(id, config, usage),
        }
    }

    /// "`remove_budget` forgets limit and usage"; "`remove_budget` of a
    /// parent detaches its children, who keep their own budgets and usage".
    pub fn remove_budget(&mut self, id: &AgentId) {
        if self.agents.remove(id).is_none() {
            return;
        }
        let children: Vec<AgentId> = self
            .agents
            .iter()
            .filter(|(_, agent)| agent.parent == Some(*id))
            .map(|(child, _)| *child)
            .collect();
        for child in children {
            self.note("removing a parent detaches a child");
            self.agents.get_mut(&child).unwrap().parent = None;
        }
    }

    /// "Both must have budgets. A link that would close a cycle, or make
    /// any chain longer than MAX_LEVELS (8) levels, is refused with a
    /// HierarchyError, and nothing changes. `set_parent(&child, None)`
    /// detaches."
    pub fn set_parent(
        &mut self,
        child: AgentId,
        parent: Option<AgentId>,
    ) -> Result<(), HierarchyError> {
        if !self.agents.contains_key(&child) {
            return Err(HierarchyError::UnknownAgent(child));
        }
        let Some(parent) = parent else {
            self.agents.get_mut(&child).unwrap().parent = None;
            return Ok(());
        };
        if !self.agents.contains_key(&parent) {
            return Err(HierarchyError::UnknownAgent(parent));
        }
        // "The parent is the child itself or one of its descendants."
        if self.chain(&parent).contains(&child) {
            return Err(HierarchyError::Cycle { child, parent });
        }
        // "The longest chain through the link would have more than
        // MAX_LEVELS levels": the parent's chain above, plus the longest
        // chain below the child (the child included).
        let levels = self.chain(&parent).len() + self.height(&child);
        if levels > MAX_LEVELS {
            return Err(HierarchyError::TooDeep { levels });
        }
        self.agents.get_mut(&child).unwrap().parent = Some(parent);
        Ok(())
    }

    /// The agent, its parent, its parent's parent...
    fn chain(&self, id: &AgentId) -> Vec<AgentId> {
        let mut chain = vec![*id];
        while let Some(parent) = self.agent(chain.last().unwrap()).parent {
            assert!(chain.len() <= MAX_LEVELS, "links are checked");
            chain.push(parent);
        }
        chain
    }

    /// Levels in the longest chain from a leaf up to `id`, `id` included.
    fn height(&self, id: &AgentId) -> usize {
        let below = self
            .agents
            .iter()
            .filter(|(_, a)| a.parent == Some(*id))
            .map(|(child, _)| self.height(child))
            .max()
            .unwrap_or(0);
        below + 1
    }

    // ----- Requests ------------------------------------------------------------

    /// "`acquire`, `reserve` and `track_call` ... admit at every level of
    /// the chain or at none. On a refusal nothing stays taken at any level
    /// once the call returns, and the error names the level that refused";
    /// "Levels are taken one after the other ... a level that refuses makes
    /// the levels below it give back what they took."
    pub fn acquire(
        &mut self,
        id: AgentId,
        tokens: u64,
        calls: u64,
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
        let request = Pair { tokens, calls };
        let chain = self.chain(&id);
        let mut levels = Vec::new();
        for level in &chain {
            match self.take(level, request) {
                Ok(()) => {
                    let agent = self.agent(level);
                    let (window, stamp) = match agent.usage {
                        Usage::Window { id, start, .. } => (Some(id), start),
                        Usage::Bucket { mark, .. } => (None, mark),
                    };
                    levels.push(Level {
                        agent: *level,
                        incarnation: agent.incarnation,
                        window,
                        stamp,
                    });
                }
                Err(short) => {
                    if !levels.is_empty() {
                        self.note("levels below a refusing ancestor give back");
                    }
                    for taken in &levels {
                        self.refund(&taken.agent, request);
                    }
                    return Err(Refusal {
                        agent_id: id,
                        kind: short.kind,
                        refused_by: *level,
                        retry_after: short.retry_after,
                        reason: short.reason,
                    });
                }
            }
        }
        Ok(Ticket {
            tokens,
            calls,
            levels,
        })
    }

    /// "Settle and cancel apply at every level, each in the window that
    /// level was in when the reservation was taken. The returned
    /// `Settlement` reports the agent's own level."
    pub fn settle(&mut self, ticket: Ticket, actual: u64) -> Settlement {
        self.book(&ticket, actual, 0)
    }

    /// "Gives everything back, tokens and calls: the work never happened."
    pub fn cancel(&mut self, ticket: Ticket) -> Settlement {
        self.book(&ticket, 0, ticket.calls)
    }

    fn book(&mut self, ticket: &Ticket, actual: u64, refunded_calls: u64) -> Settlement {
        let outcomes: Vec<Settlement> = ticket
            .levels
            .iter()
            .map(|level| self.book_level(level, ticket.tokens, actual, refunded_calls))
            .collect();
        if outcomes[1..].iter().any(|o| *o != outcomes[0]) {
            self.note("a settle books differently at two levels");
        }
        outcomes[0]
    }

    fn book_level(
        &mut self,
        level: &Level,
        reserved: u64,
        actual: u64,
        refunded_calls: u64,
    ) -> Settlement {
        // "Of a child: its reservations settle to `AgentRemoved` at its own
        // level and still apply at its ancestors"; "even if its budget is
        // set again".
        let Some(agent) = self.agents.get(&level.agent).cloned() else {
            return Settlement::AgentRemoved;
        };
        if agent.incarnation != level.incarnation {
            return Settlement::AgentRemoved;
        }
        let refunded_tokens = reserved.saturating_sub(actual);
        let charged_tokens = actual.saturating_sub(reserved);
        let current = match (agent.config, agent.usage) {
            // "Buckets have no windows: every settle is booked into the
            // bucket."
            (Config::Bucket { .. }, _) => true,
            (Config::Window { secs, .. }, Usage::Window { id, start, .. }) => {
                let own = level.window == Some(id);
                // Known defect: the crate tells windows apart by their
                // start, so a window that a switch from a bucket starts in
                // the millisecond of a reservation's (the bucket's mark, or
                // the start of a window replaced by a bucket in that
                // millisecond) is taken for the reservation's own.
                let taken_for_own = self.known_defects && level.stamp == start;
                if taken_for_own && !own {
                    self.note("known defect: another window taken for the reservation's");
                }
                (own || taken_for_own) && !self.expired(start, secs)
            }
            _ => unreachable!("a level's usage follows its policy"),
        };
        if current {
            // "Less than reserved is refunded, into the window it was taken
            // from ... More than reserved is charged even past the limit".
            self.observe(&level.agent);
            let before = self.in_use(self.agent(&level.agent));
            self.refund(
                &level.agent,
                Pair {
                    tokens: refunded_tokens,
                    calls: refunded_calls,
                },
            );
            self.charge(&level.agent, charged_tokens);
            // What changed: a refund stops at nothing in use, a charge at
            // the maximum (and, under the known defect of `store`, a
            // bucket's count at its clamp).
            let after = self.in_use(self.agent(&level.agent));
            Settlement::Applied {
                refunded_tokens: before.tokens.saturating_sub(after.tokens),
                charged_tokens: after.tokens.saturating_sub(before.tokens),
                refunded_calls: before.calls.saturating_sub(after.calls),
            }
        } else if charged_tokens > 0 {
            // "If the reservation's window has ended by then, the excess is
            // charged to the window current at the settle, at every level of
            // the chain".
            self.observe(&level.agent);
            Settlement::CarriedOver {
                charged_tokens: self.charge(&level.agent, charged_tokens),
            }
        } else {
            // "Refunds never cross windows: a settle below the reservation
            // after its window ended changes nothing".
            Settlement::WindowEnded
        }
    }

    /// "Gives `tokens` back now, never below zero, at the agent's level and
    /// at each of its ancestors'".
    pub fn release(&mut self, id: &AgentId, tokens: u64) {
        if !self.agents.contains_key(id) {
            return;
        }
        for level in self.chain(id) {
            self.observe(&level);
            self.refund(&level, Pair { tokens, calls: 0 });
        }
    }

    /// "`reset_window` starts a new, empty window now"; "Starts a fresh
    /// window (or a full bucket) for the agent's own level, now, with
    /// nothing used."
    pub fn reset_window(&mut self, id: &AgentId) {
        let Some(agent) = self.agents.get(id).cloned() else {
            return;
        };
        let usage = match agent.usage {
            Usage::Window { start, .. } => Usage::Window {
                id: self.new_window(),
                start: self.restart(start),
                tokens: 0,
                calls: 0,
            },
            Usage::Bucket { mark, .. } => Usage::Bucket {
                mark: self.restart(mark),
                tokens: 0,
                calls: 0,
            },
        };
        self.agents.get_mut(id).unwrap().usage = usage;
    }

    // ----- Reads ---------------------------------------------------------------

    /// "The limits and usage of the agent's own level, or `None` if it has
    /// no budget."
    pub fn full_info(&self, id: &AgentId) -> Option<FullBudgetInfo> {
        let agent = self.agents.get(id)?;
        let configured = Self::configured(agent.config);
        let limit = Self::enforced(agent.config);
        let used = self.in_use(agent);
        // "the remaining amount under the maximum"
        let remaining = Pair {
            tokens: limit.tokens.saturating_sub(used.tokens),
            calls: limit.calls.saturating_sub(used.calls),
        };
        let (window_secs, window_remaining_secs) = match (agent.config, agent.usage) {
            (Config::Window { secs, .. }, Usage::Window { start, .. }) => {
                let left_ms = match Self::window_ms(secs) {
                    // A window that never ends counts down as if it lasted
                    // the longest (the documents are silent).
                    None => Some(LONGEST_MS.saturating_sub(self.elapsed(start))),
                    // "Reads report an expired window as the fresh one the
                    // next write will start."
                    Some(len) if self.expired(start, secs) => Some(len),
                    Some(len) => Some(len - self.elapsed(start)),
                };
                (secs, left_ms.map_or(u64::MAX, |ms| ms / 1000))
            }
            (Config::Bucket { period, .. }, Usage::Bucket { .. }) => {
                // "`window_remaining_secs` the time until the bucket is
                // full".
                (Self::period_secs(period), self.until_full_ms(agent) / 1000)
            }
            _ => unreachable!("a level's usage follows its policy"),
        };
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

    /// How long until a bucket has refilled everything in use (`full_info`
    /// tells it no later than `NEVER_FULL_MS`, which is also what it tells
    /// of a bucket that never will be full: a zero budget with debt).
    fn until_full_ms(&self, agent: &Agent) -> u64 {
        let (
            Config::Bucket { period, .. },
            Usage::Bucket {
                mark,
                tokens,
                calls,
            },
        ) = (agent.config, agent.usage)
        else {
            unreachable!("only buckets refill")
        };
        let used = self.in_use(agent);
        let limit = Self::enforced(agent.config);
        let p = u128::from(Self::period_ms(period));
        let mut full_at = 0u128;
        for (kind, count) in [(BudgetKind::Token, tokens), (BudgetKind::Call, calls)] {
            if used.get(kind) == 0 {
                continue;
            }
            let at = match limit.get(kind) {
                0 => u128::from(NEVER_FULL_MS),
                budget => u128::from(mark) + (u128::from(count) * p).div_ceil(u128::from(budget)),
            };
            full_at = full_at.max(at.min(u128::from(NEVER_FULL_MS)));
        }
        full_at.saturating_sub(u128::from(self.tick())) as u64
    }

    /// "What is left at the agent's own level ... an unknown agent reads as
    /// exhausted" ("all zeros and exhausted").
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
        self.agents.contains_key(id)
            && self
                .chain(id)
                .iter()
                .all(|level| !self.full_info(level).unwrap().is_exhausted)
    }

    /// "`chain_info` lists every level, the agent first"; "empty if the
    /// agent has no budget".
    pub fn chain_info(&self, id: &AgentId) -> Vec<FullBudgetInfo> {
        if !self.agents.contains_key(id) {
            return Vec::new();
        }
        self.chain(id)
            .iter()
            .map(|level| self.full_info(level).unwrap())
            .collect()
    }

    /// Every agent's `full_info`, sorted by id (the crate's order is "no
    /// particular order").
    pub fn all_full_info(&self) -> Vec<FullBudgetInfo> {
        self.agents
            .keys()
            .map(|id| self.full_info(id).unwrap())
            .collect()
    }
}

/// A level's refusal, before it is told as the agent's.
struct Short {
    kind: BudgetKind,
    retry_after: Option<Duration>,
    reason: RefusalReason,
}
