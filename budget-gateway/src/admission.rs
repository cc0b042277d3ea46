//! [`LimitAdmission`]: admits a request against every limit that applies
//! to it, the agent's and its ancestors', each with its own amount.
//!
//! # How it works
//!
//! Each agent's limits are laid out as core budgets, its cells
//! ([`crate::limits::Cell`]). A [`Plan`] per agent, rebuilt by the
//! [`Catalog`](crate::catalog::Catalog) whenever limits or parents change
//! and read lock-free by requests, lists what a request of the agent
//! claims besides its own core budget (which reaches its ancestors' own
//! through the core's parents): every other cell of the agent and of its
//! ancestors, with its model glob and whether it counts dollars.
//!
//! For a request:
//!
//! - an agent whose chain has one limit per level, on tokens and requests
//!   for every model (every agent before lists), takes the core's
//!   one-budget path, `acquire_owned`, as before;
//! - otherwise every cell whose glob matches the request's `model` (a cell
//!   without one matches all) is claimed: tokens and one call for a token
//!   and request limit, the priced estimate in micro-dollars for a spend
//!   limit; all or none. The settle gives each its own actual amount: the
//!   response's tokens, or their price.
//!
//! Pricing: the estimate is the prompt's tokens at the input price plus
//! the completion's maximum at the output price, rounded up to the
//! micro-dollar ([`ModelPrice::cost_micros`]); the settle prices the
//! response's usage, its cached prompt tokens at the cached price. A
//! request that claims a spend limit for a model no `[[models]]` entry
//! prices is refused with `400` before anything is taken.
//!
//! See [`crate::docs::limits`] for the reasoning.

// A `Denial` (a refusal and its message) is returned on the cold path
// only: boxing it would cost an allocation to save a copy, as in the tower
// layer.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agent_budget::{
    AgentId, BudgetManager, Claim, FullBudgetInfo, OwnedReservation, OwnedSetReservation, Refused,
    Settlement,
};
use agent_budget_tower::headers::{RateLimitSnapshot, ValueText};
use agent_budget_tower::openai::pricing::{ModelPrice, PriceTable, TokenCounts};
use agent_budget_tower::{
    acquire_reporting, Admission, Denial, Estimate, Reservation, UsageLog, UsedTokens,
};
use arc_swap::ArcSwap;
use http::header::{HeaderMap, HeaderName};
use smallvec::SmallVec;

use crate::limits::{micros_to_usd, Counts, Limits};

/// `x-budget-spend-limit-usd`: the dollars of the spend limit that binds
/// the request (the one with the least left), per its window.
pub const X_BUDGET_SPEND_LIMIT_USD: HeaderName =
    HeaderName::from_static("x-budget-spend-limit-usd");
/// `x-budget-spend-remaining-usd`: the dollars left in it.
pub const X_BUDGET_SPEND_REMAINING_USD: HeaderName =
    HeaderName::from_static("x-budget-spend-remaining-usd");
/// `x-budget-spend-reset`: the time until its window ends (a bucket: until
/// it is full), written like the `x-ratelimit-reset-*` headers (`6m0s`).
pub const X_BUDGET_SPEND_RESET: HeaderName = HeaderName::from_static("x-budget-spend-reset");

/// The Prometheus counter of dollars spent, in micro-dollars, as settled.
pub const SPEND_METRIC: &str = "budget_spend_micro_usd_total";

/// What a request of one agent with more than the core's chain to claim
/// takes besides its own core budget.
#[derive(Debug, Default)]
pub struct Plan {
    /// The cells beyond each level's own core budget, the agent's first,
    /// then its ancestors', nearest first.
    cells: Box<[PlanCell]>,
}

/// One cell a request may claim.
#[derive(Debug)]
struct PlanCell {
    id: AgentId,
    /// The agent whose limit it is (the agent or one of its ancestors).
    owner: AgentId,
    model: Option<Arc<str>>,
    spend: bool,
}

impl PlanCell {
    fn counts(&self, model: Option<&str>) -> bool {
        match (&self.model, model) {
            (None, _) => true,
            (Some(glob), Some(model)) => {
                agent_budget_tower::openai::pricing::glob_matches(glob, model)
            }
            (Some(_), None) => false,
        }
    }
}

/// The [`Plan`] of every agent whose chain has more than one limit at
/// some level, or a limit on one model: the others are not in it, and
/// take the core's one-budget path. Swapped whole when a limit or a
/// parent changes; clones share it.
#[derive(Clone, Debug, Default)]
pub struct Plans(Arc<PlansCell>);

#[derive(Debug, Default)]
struct PlansCell {
    table: ArcSwap<PlanTable>,
    /// Whether `table` holds any plan: read first, so that where no agent
    /// has one (a gateway without lists of limits) a request asks nothing
    /// more. An arc-swap load is two locked instructions; a request asked
    /// twice (141 instructions, callgrind).
    any: AtomicBool,
}

impl Plans {
    /// The current table.
    pub fn load(&self) -> arc_swap::Guard<Arc<PlanTable>> {
        self.0.table.load()
    }

    /// Replaces the table.
    pub fn store(&self, table: Arc<PlanTable>) {
        let any = !table.by_agent.is_empty();
        self.0.table.store(table);
        // Release: pairs with the Acquire in `plan_table`, so a request
        // that sees some plan loads this table or a later one.
        self.0.any.store(any, Ordering::Release);
    }

    /// The table, unless no agent has a plan. A request that reads `false`
    /// while a first plan is being stored is judged under the table before
    /// it, as one that loaded that table would be.
    fn plan_table(&self) -> Option<arc_swap::Guard<Arc<PlanTable>>> {
        self.0
            .any
            .load(Ordering::Acquire)
            .then(|| self.0.table.load())
    }
}

/// The plans [`Plans`] swaps.
#[derive(Debug, Default)]
pub struct PlanTable {
    /// Keyed with ahash: ids are the operator's (from the file and the
    /// admin API), and SipHash cost more than the rest of a lookup.
    by_agent: HashMap<AgentId, Arc<Plan>, ahash::RandomState>,
}

impl PlanTable {
    /// The agent's plan; `None` for an agent whose chain is all it claims
    /// (every agent when no agent has lists), found without hashing then.
    fn get(&self, agent: &AgentId) -> Option<&Arc<Plan>> {
        if self.by_agent.is_empty() {
            return None;
        }
        self.by_agent.get(agent)
    }
}

/// The `[[models]]` prices, swapped whole when the file is reloaded.
pub type Prices = Arc<ArcSwap<PriceTable>>;

/// The plans of `agents` (each with its limits and parent).
pub fn build_plans<'a>(
    agents: impl Iterator<Item = (AgentId, &'a Limits, Option<AgentId>)>,
) -> PlanTable {
    let all: HashMap<AgentId, (&Limits, Option<AgentId>)> = agents
        .map(|(id, limits, parent)| (id, (limits, parent)))
        .collect();
    let mut by_agent = HashMap::default();
    for &id in all.keys() {
        let mut single = true;
        let mut cells = Vec::new();
        let mut level = Some(id);
        // Bounded by the configuration's checks (no loops, at most
        // MAX_LEVELS levels); the bound guards against a bug there.
        for _ in 0..agent_budget::MAX_LEVELS {
            let Some(at) = level else { break };
            let Some(&(limits, parent)) = all.get(&at) else {
                break;
            };
            single &= limits.is_single();
            for cell in limits.cells().iter().filter(|c| !c.primary) {
                cells.push(PlanCell {
                    id: cell.id(at),
                    owner: at,
                    model: cell.model.clone(),
                    spend: matches!(cell.counts, Counts::Spend { .. }),
                });
            }
            level = parent;
        }
        // One limit per level, on tokens and requests for every model:
        // the core's chain is all there is to claim.
        if !single {
            by_agent.insert(
                id,
                Arc::new(Plan {
                    cells: cells.into(),
                }),
            );
        }
    }
    PlanTable { by_agent }
}

/// A model's prices, copied out of the table.
#[derive(Clone, Copy, Debug)]
struct Price {
    input: agent_budget_tower::openai::pricing::PicoPerToken,
    output: agent_budget_tower::openai::pricing::PicoPerToken,
    cached_input: Option<agent_budget_tower::openai::pricing::PicoPerToken>,
}

impl Price {
    fn of(model: &ModelPrice) -> Self {
        Price {
            input: model.input,
            output: model.output,
            cached_input: model.cached_input,
        }
    }

    fn cost(&self, tokens: TokenCounts) -> u64 {
        ModelPrice {
            name: String::new(),
            input: self.input,
            output: self.output,
            cached_input: self.cached_input,
        }
        .cost_micros(tokens)
    }

    /// What `used` costs: its split priced as such; a total without a
    /// split all at the dearer of the two prices, so it is never
    /// under-charged.
    fn cost_of(&self, used: UsedTokens) -> u64 {
        match used.split {
            Some(split) => self.cost(TokenCounts {
                input: split.input,
                cached_input: split.cached_input,
                output: split.output,
            }),
            None => {
                let dearer = Price {
                    input: self.input.max(self.output),
                    output: self.input.max(self.output),
                    cached_input: None,
                };
                dearer.cost(TokenCounts {
                    input: used.total,
                    cached_input: 0,
                    output: 0,
                })
            }
        }
    }
}

/// The gateway's admission: the core's budgets, each agent's plan, and the
/// prices.
pub struct LimitAdmission {
    budgets: Arc<BudgetManager>,
    plans: Plans,
    prices: Prices,
    spent: metrics::Counter,
}

impl std::fmt::Debug for LimitAdmission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitAdmission").finish_non_exhaustive()
    }
}

impl LimitAdmission {
    /// Admits from `budgets` by `plans`, pricing with `prices` (both kept
    /// up to date by the catalog).
    pub fn new(budgets: Arc<BudgetManager>, plans: Plans, prices: Prices) -> Self {
        metrics::describe_counter!(
            SPEND_METRIC,
            metrics::Unit::Count,
            "Dollars spent by admitted requests under spend limits, in micro-dollars, as settled"
        );
        LimitAdmission {
            budgets,
            plans,
            prices,
            spent: metrics::counter!(SPEND_METRIC),
        }
    }

    /// The plans, read lock-free: [`PlanTable::get`] the agent's.
    fn plans(&self) -> arc_swap::Guard<Arc<PlanTable>> {
        self.plans.load()
    }

    /// Takes everything `estimate` claims of the agent's limits, or nothing;
    /// with the `x-ratelimit-*` snapshot of where they stand right after,
    /// read in the same step (the core's `acquire_owned_reporting` and
    /// `acquire_set_owned_reporting`: no second read of the registry).
    fn take(
        &self,
        agent: &AgentId,
        estimate: &Estimate,
    ) -> Result<(Held, Option<RateLimitSnapshot>), Denial> {
        let plans = self.plans.plan_table();
        let plan = match plans.as_ref().and_then(|plans| plans.get(agent)) {
            Some(plan) => plan,
            // One budget per level (or an agent the plans do not know
            // yet, which the core refuses if it has no budget).
            None => {
                return acquire_reporting(&self.budgets, agent, estimate)
                    .map(|(taken, snapshot)| (Held::One(taken), snapshot))
                    .map_err(Denial::Refused);
            }
        };
        let claims = self.claims(agent, plan, estimate)?;
        let mut standing = Standing::default();
        let taken = self
            .budgets
            .acquire_set_owned_reporting(&claims.claims, |n, info| standing.add(&claims, n, info));
        match taken {
            Ok(set) => {
                let snapshot = standing.snapshot();
                let spend = Some(standing.spend());
                Ok((claims.held(set, self.spent.clone(), spend), snapshot))
            }
            Err(refused) => Err(self.denial(agent, plan, refused, claims.micros)),
        }
    }

    /// [`take`](Self::take), except that the limits of the agents
    /// `shadowed` names take past their limit (see
    /// [`Admission::admit_shadowed`]): one set admission, whatever the
    /// plan, so that calls and dollars are counted past a limit in shadow
    /// mode and an enforced ancestor's limit still refuses.
    fn take_shadowed(
        &self,
        agent: &AgentId,
        estimate: &Estimate,
        shadowed: &(dyn Fn(&AgentId) -> bool + Send + Sync),
    ) -> Result<Held, Denial> {
        let plans = self.plans();
        let plan = plans.get(agent);
        // A limit is an agent's own budget (its id is the agent's) or one
        // of the plan's cells.
        let owner = |id: &AgentId| {
            plan.and_then(|p| p.cells.iter().find(|c| c.id == *id))
                .map_or(*id, |c| c.owner)
        };
        let past = |id: &AgentId| shadowed(&owner(id));
        let claims = match plan {
            Some(plan) => self.claims(agent, plan, estimate)?,
            None => Claims::one(*agent, estimate.tokens(), estimate.calls),
        };
        match self
            .budgets
            .acquire_set_owned_shadowed(&claims.claims, past)
        {
            Ok(set) => Ok(claims.held(set, self.spent.clone(), None)),
            Err(refused) => Err(match plan {
                Some(plan) => self.denial(agent, plan, refused, claims.micros),
                None => Denial::Refused(refused),
            }),
        }
    }

    /// What a request of `agent` estimated as `estimate` claims under
    /// `plan` (not single): its own budget, and every cell whose glob
    /// matches its model; or the `400` of an unpriced model.
    fn claims(&self, agent: &AgentId, plan: &Plan, estimate: &Estimate) -> Result<Claims, Denial> {
        let (tokens, calls) = (estimate.tokens(), estimate.calls);
        let model = estimate.model();
        let spends = plan.cells.iter().any(|c| c.spend && c.counts(model));
        let price = if spends && tokens > 0 {
            Some(self.price(agent, model)?)
        } else {
            None
        };
        let micros = price.map_or(0, |p| {
            p.cost(TokenCounts {
                input: estimate.prompt_tokens,
                cached_input: 0,
                output: estimate.completion_tokens,
            })
        });
        let mut claims = SmallVec::new();
        claims.push(Claim {
            agent_id: *agent,
            tokens,
            calls,
        });
        let mut spend_claims = 0u64;
        for cell in plan.cells.iter().filter(|c| c.counts(model)) {
            if cell.spend {
                // Claims past the 64th are beyond the core's set limit
                // anyway (MAX_SET_LIMITS), which refuses the set.
                spend_claims |= 1u64.checked_shl(claims.len() as u32).unwrap_or(0);
            }
            claims.push(Claim {
                agent_id: cell.id,
                tokens: if cell.spend { micros } else { tokens },
                calls: if cell.spend { 0 } else { calls },
            });
        }
        Ok(Claims {
            agent: *agent,
            tokens,
            calls,
            claims,
            spend_claims,
            micros,
            price,
        })
    }

    /// The price of `model` for an agent with a spend limit on it, or the
    /// `400` that says none is known.
    fn price(&self, agent: &AgentId, model: Option<&str>) -> Result<Price, Denial> {
        let prices = self.prices.load();
        let found = match model {
            Some(model) => prices.price_of(model),
            None => prices.price_of(""),
        };
        found.map(Price::of).ok_or_else(|| Denial::Invalid {
            agent_id: *agent,
            message: match model {
                Some(model) => format!(
                    "the model {model:?} has no price, and this key has a spend limit: \
                     nothing was forwarded or charged (the gateway's operator can price it \
                     with a [[models]] entry, or a default with name = \"*\")"
                ),
                None => "the request names no model, and this key has a spend limit: \
                         nothing was forwarded or charged (name the model, or the gateway's \
                         operator can give a default price with name = \"*\")"
                    .to_owned(),
            },
            code: "model_not_priced",
        })
    }

    /// The refusal of `agent`'s request by one of its limits: in dollars
    /// when a spend limit refused it.
    fn denial(&self, agent: &AgentId, plan: &Plan, mut refused: Refused, micros: u64) -> Denial {
        refused.agent_id = *agent;
        let spend = plan
            .cells
            .iter()
            .any(|c| c.spend && c.id == refused.refused_by);
        if !spend {
            return Denial::Refused(refused);
        }
        let left = match self.budgets.full_info(&refused.refused_by) {
            Some(info) => format!(
                ", and ${:.6} of ${:.6} is left in the window",
                micros_to_usd(info.tokens_remaining),
                micros_to_usd(info.token_limit),
            ),
            None => String::new(),
        };
        Denial::Worded {
            refused,
            message: format!(
                "spend limit reached: this request may cost up to ${:.6}{left}",
                micros_to_usd(micros)
            ),
            error_type: "spend",
        }
    }
}

/// Whether claim `n` counts micro-dollars, by `spend_claims` (bit `n`;
/// claims past the 64th never do).
fn counts_spend(spend_claims: u64, n: usize) -> bool {
    1u64.checked_shl(n as u32)
        .is_some_and(|bit| spend_claims & bit != 0)
}

/// A set's claims, and what its settle needs to know of them.
struct Claims {
    agent: AgentId,
    tokens: u64,
    calls: u64,
    claims: SmallVec<[Claim; 4]>,
    /// Bit `i`: claim `i` counts micro-dollars.
    spend_claims: u64,
    micros: u64,
    price: Option<Price>,
}

impl Claims {
    /// Whether claim `n` counts micro-dollars.
    fn spends(&self, n: usize) -> bool {
        counts_spend(self.spend_claims, n)
    }

    /// The one claim of an agent whose levels each have one limit.
    fn one(agent: AgentId, tokens: u64, calls: u64) -> Self {
        Claims {
            agent,
            tokens,
            calls,
            claims: smallvec::smallvec![Claim {
                agent_id: agent,
                tokens,
                calls,
            }],
            spend_claims: 0,
            micros: 0,
            price: None,
        }
    }

    /// The reservation of `set`, taken for these claims; `spend` is where
    /// their spend limits stood right after, when it was read then.
    fn held(
        self,
        set: OwnedSetReservation,
        spent: metrics::Counter,
        spend: Option<Option<SpendStanding>>,
    ) -> Held {
        Held::Set(Box::new(SetHeld {
            spend,
            agent: self.agent,
            tokens: self.tokens,
            calls: self.calls,
            set,
            spend_claims: self.spend_claims,
            price: self.price,
            spent,
        }))
    }
}

impl Admission for LimitAdmission {
    type Reservation = Held;

    fn admit(
        self: &Arc<Self>,
        agent_id: &AgentId,
        estimate: &Estimate,
    ) -> impl Future<Output = Result<Held, Denial>> + Send {
        std::future::ready(self.take(agent_id, estimate).map(|(held, _)| held))
    }

    fn admit_reporting(
        self: &Arc<Self>,
        agent_id: &AgentId,
        estimate: &Estimate,
    ) -> impl Future<Output = Result<(Held, Option<RateLimitSnapshot>), Denial>> + Send {
        std::future::ready(self.take(agent_id, estimate))
    }

    fn admit_shadowed(
        self: &Arc<Self>,
        agent_id: &AgentId,
        estimate: &Estimate,
        shadowed: &(dyn Fn(&AgentId) -> bool + Send + Sync),
    ) -> impl Future<Output = Result<Held, Denial>> + Send {
        std::future::ready(self.take_shadowed(agent_id, estimate, shadowed))
    }

    fn admit_wait(
        self: &Arc<Self>,
        agent_id: &AgentId,
        estimate: &Estimate,
    ) -> impl Future<Output = Result<Held, Denial>> + Send {
        enum Waiting<One, Set> {
            One(One),
            Set(Set, Arc<Plan>, Claims),
            Invalid(Denial),
        }
        let waiting = match self.plans().get(agent_id).cloned() {
            None => Waiting::One(self.budgets.acquire_owned_wait(
                agent_id,
                estimate.tokens(),
                estimate.calls,
            )),
            Some(plan) => match self.claims(agent_id, &plan, estimate) {
                Ok(claims) => {
                    let set = self.budgets.acquire_set_owned_wait(claims.claims.to_vec());
                    Waiting::Set(set, plan, claims)
                }
                Err(denial) => Waiting::Invalid(denial),
            },
        };
        let this = self.clone();
        let agent = *agent_id;
        async move {
            match waiting {
                Waiting::One(one) => one.await.map(Held::One).map_err(Denial::Refused),
                Waiting::Set(set, plan, claims) => match set.await {
                    Ok(set) => Ok(claims.held(set, this.spent.clone(), None)),
                    Err(refused) => Err(this.denial(&agent, &plan, refused, claims.micros)),
                },
                Waiting::Invalid(denial) => Err(denial),
            }
        }
    }

    fn budget_chain(&self, agent_id: &AgentId) -> Vec<FullBudgetInfo> {
        self.budgets.chain_info(agent_id)
    }

    /// Checks the least a request can cost, taking nothing (the core's
    /// `check`), at the agent's own budget (its chain's) and at every
    /// limit that counts every model: those whose glob needs the request's
    /// `model`, and spend limits (which need its price), wait for the body.
    fn precheck(
        self: &Arc<Self>,
        agent_id: &AgentId,
        tokens: u64,
        calls: u64,
    ) -> Result<(), Denial> {
        let plans = self.plans();
        let Some(plan) = plans.get(agent_id) else {
            return self
                .budgets
                .check(agent_id, tokens, calls)
                .map_err(Denial::Refused);
        };
        let mut claims: SmallVec<[Claim; 4]> = SmallVec::new();
        claims.push(Claim {
            agent_id: *agent_id,
            tokens,
            calls,
        });
        claims.extend(
            plan.cells
                .iter()
                .filter(|c| !c.spend && c.counts(None))
                .map(|c| Claim {
                    agent_id: c.id,
                    tokens,
                    calls,
                }),
        );
        self.budgets
            .check_set(&claims)
            .map_err(|refused| self.denial(agent_id, plan, refused, 0))
    }

    fn rate_limits(&self, agent_id: &AgentId, estimate: &Estimate) -> Vec<FullBudgetInfo> {
        let mut levels = self.budgets.chain_info(agent_id);
        if let Some(plan) = self.plans().get(agent_id) {
            let model = estimate.model();
            levels.extend(
                plan.cells
                    .iter()
                    .filter(|c| !c.spend && c.counts(model))
                    .filter_map(|c| self.budgets.full_info(&c.id)),
            );
        }
        levels
    }

    fn write_headers(&self, agent_id: &AgentId, estimate: &Estimate, headers: &mut HeaderMap) {
        let plans = self.plans.plan_table();
        let Some(plan) = plans.as_ref().and_then(|plans| plans.get(agent_id)) else {
            return;
        };
        let model = estimate.model();
        let binding = plan
            .cells
            .iter()
            .filter(|c| c.spend && c.counts(model))
            .filter_map(|c| self.budgets.full_info(&c.id))
            .min_by_key(|info| info.tokens_remaining);
        if let Some(info) = binding {
            SpendStanding::of(&info).write(headers);
        }
    }

    /// From where the spend limits stood right after the admission, when
    /// it read them; otherwise as [`write_headers`](Self::write_headers).
    fn write_admitted_headers(&self, held: &Held, estimate: &Estimate, headers: &mut HeaderMap) {
        match held {
            Held::Set(set) if set.spend.is_some() => {
                if let Some(spend) = set.spend.flatten() {
                    spend.write(headers);
                }
            }
            _ => self.write_headers(&held.agent_id(), estimate, headers),
        }
    }
}

/// Where the limits a set's admission took stand right after it, sorted
/// out as it reports them ([`BudgetManager::acquire_set_owned_reporting`]),
/// the way [`LimitAdmission::rate_limits`] and
/// [`LimitAdmission::write_headers`] read them: the agent's chain (reached
/// by the first claim), then the other cells each claim is for, in claim
/// order, for the `x-ratelimit-*` headers; the spend cells for the spend
/// headers. A cell's ancestors, reached only through it, are neither.
#[derive(Default)]
struct Standing {
    /// The limits the rate-limit headers report from, in claim order (the
    /// chain first, in its own order), placed as they are reported: sorted
    /// after the fact and copied out, they cost two more copies each.
    rate: SmallVec<[FullBudgetInfo; 4]>,
    /// Each one's claim.
    rate_claims: SmallVec<[usize; 4]>,
    /// The spend cell with the least left, and its claim (the first such
    /// cell, in claim order, on a tie).
    spend: Option<(usize, FullBudgetInfo)>,
}

impl Standing {
    fn add(&mut self, claims: &Claims, n: usize, info: FullBudgetInfo) {
        if n == 0 {
            self.add_rate(n, info);
            return;
        }
        if claims
            .claims
            .get(n)
            .is_none_or(|c| c.agent_id != info.agent_id)
        {
            return;
        }
        if !claims.spends(n) {
            self.add_rate(n, info);
            return;
        }
        let binds = self
            .spend
            .as_ref()
            .is_none_or(|(m, least)| (info.tokens_remaining, n) < (least.tokens_remaining, *m));
        if binds {
            self.spend = Some((n, info));
        }
    }

    /// Places `info`, claim `n`'s, after every limit of a claim up to
    /// `n`: the chain (claim 0) keeps the order it is reported in (the
    /// agent, then up).
    fn add_rate(&mut self, n: usize, info: FullBudgetInfo) {
        let at = self.rate_claims.partition_point(|&m| m <= n);
        self.rate_claims.insert(at, n);
        self.rate.insert(at, info);
    }

    /// The `x-ratelimit-*` snapshot, as `rate_limits` would read it.
    fn snapshot(&self) -> Option<RateLimitSnapshot> {
        RateLimitSnapshot::from_chain(&self.rate)
    }

    /// What the spend headers report, if the request reached a spend cell.
    fn spend(&self) -> Option<SpendStanding> {
        self.spend.as_ref().map(|(_, info)| SpendStanding::of(info))
    }
}

/// What the spend headers report: the binding spend limit's dollars (in
/// micro-dollars), what is left of them, and when its window ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpendStanding {
    limit_micros: u64,
    remaining_micros: u64,
    reset: Duration,
}

impl SpendStanding {
    fn of(info: &FullBudgetInfo) -> Self {
        SpendStanding {
            limit_micros: info.token_limit,
            remaining_micros: info.tokens_remaining,
            reset: Duration::from_secs(info.window_remaining_secs),
        }
    }

    /// Writes the three `x-budget-spend-*` headers.
    fn write(&self, headers: &mut HeaderMap) {
        // The three values in one buffer, each header a slice of it (one
        // allocation, not three), the dollars as integer digits (formatting
        // them as a float, {:.6}, cost four times as much: callgrind).
        let mut text = ValueText::default();
        let limit = push_usd(&mut text, self.limit_micros);
        let remaining = push_usd(&mut text, self.remaining_micros);
        let reset = text.push_go_duration(self.reset);
        let value = text.into_values();
        headers.reserve(3);
        headers.insert(X_BUDGET_SPEND_LIMIT_USD, value(limit));
        headers.insert(X_BUDGET_SPEND_REMAINING_USD, value(remaining));
        headers.insert(X_BUDGET_SPEND_RESET, value(reset));
    }
}

/// Appends `micros` as dollars with six decimals (`12.345000`); where they
/// lie. One `itoa` of the micro-dollars, the point put in before their
/// last six digits: about 150 instructions a value (callgrind), where the
/// dollars and the decimals each formatted cost 190, and a digit at a
/// time, with a division each, 290.
fn push_usd(text: &mut ValueText, micros: u64) -> std::ops::Range<usize> {
    const DECIMALS: usize = 6;
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(micros).as_bytes();
    let (whole, decimals) = match digits.len().checked_sub(DECIMALS) {
        Some(split) if split > 0 => {
            let whole = text.push(&digits[..split]);
            text.push(b".");
            (whole, text.push(&digits[split..]))
        }
        // Less than a dollar: `0.` and the decimals' leading zeros.
        _ => (
            text.push(&b"0.000000"[..2 + DECIMALS - digits.len()]),
            text.push(digits),
        ),
    };
    whole.start..decimals.end
}

/// What one request holds: the core's one reservation, or one per cell.
#[derive(Debug)]
pub enum Held {
    /// The agent's own budget (and its chain's).
    One(OwnedReservation),
    /// Every cell the request claimed. Boxed: the request's future moves
    /// it several times, which, when the set's reservation kept its limits
    /// inline, cost 1,900 instructions of copies where the box costs an
    /// allocation (callgrind).
    Set(Box<SetHeld>),
}

/// The reservation of a request admitted against several cells.
#[derive(Debug)]
pub struct SetHeld {
    /// Where the spend limits stood right after the admission, when it
    /// read them (`None`: not read; `Some(None)`: no spend limit reached).
    spend: Option<Option<SpendStanding>>,
    agent: AgentId,
    tokens: u64,
    calls: u64,
    set: OwnedSetReservation,
    /// Bit `i`: claim `i` counts micro-dollars.
    spend_claims: u64,
    price: Option<Price>,
    spent: metrics::Counter,
}

impl Reservation for Held {
    fn agent_id(&self) -> AgentId {
        match self {
            Held::One(r) => r.agent_id(),
            Held::Set(set) => set.agent,
        }
    }

    fn tokens(&self) -> u64 {
        match self {
            Held::One(r) => r.tokens(),
            Held::Set(set) => set.tokens,
        }
    }

    fn calls(&self) -> u64 {
        match self {
            Held::One(r) => r.calls(),
            Held::Set(set) => set.calls,
        }
    }

    fn settle(self, used: UsedTokens) -> Settlement {
        match self {
            Held::One(r) => r.settle(used.total),
            Held::Set(set) => set.settle(Some(used), None),
        }
    }

    fn cancel(self) -> Settlement {
        match self {
            Held::One(r) => r.cancel(),
            Held::Set(set) => set.settle(None, None),
        }
    }

    /// Every limit the request claimed, each with its own amounts: a
    /// journal replays them limit by limit.
    fn log_admitted(&self, log: &dyn UsageLog, at: SystemTime) {
        match self {
            Held::One(r) => log.admitted(&r.agent_id(), r.tokens(), r.calls(), at),
            Held::Set(set) => {
                for claim in set.set.claims() {
                    log.admitted(&claim.agent_id, claim.tokens, claim.calls, at);
                }
            }
        }
    }

    fn settle_logged(
        self,
        used: Option<UsedTokens>,
        log: Option<&dyn UsageLog>,
        admitted_at: SystemTime,
    ) -> Settlement {
        match self {
            Held::One(r) => {
                let agent = r.agent_id();
                let settlement = match used {
                    Some(used) => r.settle(used.total),
                    None => r.cancel(),
                };
                if let Some(log) = log {
                    log.settled(&agent, admitted_at, settlement);
                }
                settlement
            }
            Held::Set(set) => set.settle(used, log.map(|log| (log, admitted_at))),
        }
    }
}

impl SetHeld {
    /// Settles every claim with its own actual (the response's tokens, or
    /// their price for a spend limit), or cancels them all (`used` of
    /// `None`), and tells `log` what each claim's settle did.
    ///
    /// The core reports one outcome for the set (the worst); the journal
    /// is told each claim's difference between actual and reserved as
    /// booked in the reservation's window. Where the core booked it
    /// otherwise (a window that ended before the settle), the journal
    /// errs the way it always does: its replay counts usage above the
    /// truth, never below.
    fn settle(
        self,
        used: Option<UsedTokens>,
        log: Option<(&dyn UsageLog, SystemTime)>,
    ) -> Settlement {
        let cost = match (&used, self.price) {
            (Some(used), Some(price)) => {
                let cost = price.cost_of(*used);
                self.spent.increment(cost);
                cost
            }
            _ => 0,
        };
        let spend_claims = self.spend_claims;
        let actual = |i: usize, total: u64| {
            if counts_spend(spend_claims, i) {
                cost
            } else {
                total
            }
        };
        let booked: SmallVec<[(AgentId, u64, u64, u64); 4]> = match (&used, log) {
            (_, None) => SmallVec::new(),
            (Some(used), Some(_)) => self
                .set
                .claims()
                .iter()
                .enumerate()
                .map(|(i, c)| (c.agent_id, c.tokens, actual(i, used.total), 0))
                .collect(),
            (None, Some(_)) => self
                .set
                .claims()
                .iter()
                .map(|c| (c.agent_id, c.tokens, 0, c.calls))
                .collect(),
        };
        let settlement = match used {
            Some(used) => self.set.settle_with(|i, _| actual(i, used.total)),
            None => self.set.cancel(),
        };
        if let Some((log, admitted_at)) = log {
            for (agent, reserved, actual, refunded_calls) in booked {
                log.settled(
                    &agent,
                    admitted_at,
                    Settlement::Applied {
                        refunded_tokens: reserved.saturating_sub(actual),
                        charged_tokens: actual.saturating_sub(reserved),
                        refunded_calls,
                    },
                );
            }
        }
        settlement
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_are_written_with_six_decimals() {
        for (micros, text) in [
            (0, "0.000000"),
            (1, "0.000001"),
            (10, "0.000010"),
            (100_000, "0.100000"),
            (999_999, "0.999999"),
            (1_000_000, "1.000000"),
            (1_000_001, "1.000001"),
            (12_345_678, "12.345678"),
            (u64::MAX, "18446744073709.551615"),
        ] {
            let mut out = ValueText::default();
            out.push(b"x");
            let range = push_usd(&mut out, micros);
            let value = out.into_values()(range);
            assert_eq!(value.as_bytes(), text.as_bytes(), "{micros}");
        }
    }

    /// A limit's standing as the core reports it: `limit` tokens and calls
    /// a window of `window_secs`, `left` of each remaining.
    fn standing_of(agent_id: AgentId, limit: u64, left: u64, window_secs: u64) -> FullBudgetInfo {
        FullBudgetInfo {
            agent_id,
            token_limit: limit,
            tokens_used: limit - left,
            tokens_remaining: left,
            calls_limit: limit,
            calls_used: limit - left,
            calls_remaining: left,
            window_secs,
            window_remaining_secs: window_secs,
            is_exhausted: left == 0,
        }
    }

    #[test]
    fn the_headers_report_the_limit_of_the_first_claim_among_those_tied() {
        // The core reports a set's limits in ascending agent id; the
        // headers break ties in claim order (the key's own chain, then its
        // cells as listed), whatever the ids.
        let key = AgentId::from_u128(5);
        let (minute, day) = (AgentId::from_u128(9), AgentId::from_u128(7));
        let claim = |agent_id| Claim {
            agent_id,
            tokens: 1,
            calls: 1,
        };
        let claims = Claims {
            agent: key,
            tokens: 1,
            calls: 1,
            claims: smallvec::smallvec![claim(key), claim(minute), claim(day)],
            spend_claims: 0,
            micros: 0,
            price: None,
        };
        let mut standing = Standing::default();
        standing.add(&claims, 0, standing_of(key, 1_000, 500, 3_600));
        standing.add(&claims, 2, standing_of(day, 100, 40, 86_400));
        standing.add(&claims, 1, standing_of(minute, 50, 40, 60));
        let snapshot = standing.snapshot().expect("three limits");
        assert_eq!((snapshot.token_limit, snapshot.tokens_remaining), (50, 40));
        assert_eq!(snapshot.tokens_window, Duration::from_secs(60));
        assert_eq!(
            (snapshot.calls_limit, snapshot.calls_window.as_secs()),
            (50, 60)
        );
    }
}
