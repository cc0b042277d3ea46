//! # Sets of limits, spend and per-model limits
//!
//! An operator writes "$50 a month per key, 100 requests a minute, 1M
//! tokens a day, and at most 10 requests a minute to the expensive
//! model". The gateway admits each request against every one of those
//! that applies to it, and its parents', at once: all or none, each with
//! its own amount, and settles each with its own actual amount.
//!
//! ## Limits become core budgets: cells
//!
//! The core admits a *set of claims* (`BudgetManager::acquire_set_owned`):
//! each claim names a core budget and the tokens and calls to take there,
//! and the set is taken whole or not at all, under any interleaving; a
//! core budget reached twice (a claim's own and, through core parents,
//! another claim's ancestor) is charged once, with the larger amounts.
//!
//! Each `[[agents.limits]]` entry becomes one or two core budgets, its
//! *cells* ([`crate::limits::Cell`]):
//!
//! - its `tokens` and `requests` share one: the core's tokens and calls. A
//!   resource the entry leaves out is `u64::MAX`, which the core enforces
//!   as its largest count (about 4.5 × 10^15 tokens, 4.3 × 10^9 calls a
//!   window): never reached.
//! - its `spend_usd` has one of its own, whose *tokens* are micro-dollars
//!   (its calls are `u64::MAX` and never claimed). A spend limit is at most
//!   $1M a window, so its micro-dollars stay within the 10^12 the core
//!   counts exactly.
//!
//! **Which id.** The first entry on tokens or requests without a `model` is
//! the agent's *own* core budget: its id is the agent's, so everything
//! that knew one budget per agent (the budgets view, the state file, a
//! fleet in Redis, the core's parents between agents) keeps seeing it. An
//! agent with no such entry (only spend or per-model limits) gets an
//! unlimited own budget, which links it to its parent's. Every other
//! cell's id is derived: SHA-256 of the agent's id and the cell's
//! identity (its window or refill, its model glob, and whether it counts
//! spend or usage), as a version 8 UUID. The identity leaves the entry's
//! place in the list out on purpose: a `PUT` (or an edited file, on
//! SIGHUP) that keeps a limit keeps its cell, and `set_budget` keeps the
//! usage of the current window, so reordering or adding limits never
//! forgives what was spent. Two entries of one identity (the same window
//! and model, both on usage) are refused: they would be one cell. A cell
//! that disappears from an agent's limits is removed from the core.
//!
//! ## A request's claims
//!
//! A [`crate::admission::Plan`] per agent, rebuilt by the catalog whenever
//! limits or parents change and read lock-free (an `ArcSwap`) by requests,
//! lists the cells besides the levels' own budgets, for the agent and its
//! ancestors. A request claims:
//!
//! - the agent's own budget: its estimate's tokens and one call. The
//!   core's parent links carry this to every ancestor's own budget, as
//!   before lists;
//! - every other cell, of the agent and of its ancestors, whose `model`
//!   glob matches the request's `model` (a cell without a glob matches
//!   every request; a request without a model only those): tokens and a
//!   call for usage, the priced estimate for spend.
//!
//! An agent whose every level has one limit on usage for every model (all
//! agents before lists) skips the plan and takes the core's one-budget
//! path, `acquire_owned`, unchanged. The plan lookup, the model (a slice
//! of the request body, read by the estimator) and the globs (matched
//! without allocating) are the whole added cost of the set path besides
//! the core's, with one small vector of claims (inline up to four).
//!
//! ## Prices
//!
//! `[[models]]` gives dollars per million tokens, kept exactly as
//! pico-dollars per token (`agent_budget_tower::openai::pricing`); the
//! first entry whose glob matches the request's `model` prices it.
//!
//! - **Estimate**: the prompt's reserved tokens at the input price plus
//!   the completion's maximum (`max_tokens` × `n`) at the output price,
//!   rounded up to the micro-dollar.
//! - **Settle**: the response's usage (JSON or the stream's usage event):
//!   prompt tokens at the input price, of which
//!   `prompt_tokens_details.cached_tokens` at `cached_input_usd_per_mtok`
//!   when given, completion at the output price. A usage with a total but
//!   no split is priced all at the dearer price (never under-charged); a
//!   response without usage keeps its estimate's price, with the prompt as
//!   counted; a client that hung up mid-stream pays its prompt and what
//!   streamed, as output.
//! - **When is a spend limit "tight"?** Prompts are reserved at one token
//!   per byte while that fits (`count_prompts = "when_tight"`), and
//!   counted with the tokenizer when it does not. A spend cell is a core
//!   budget whose tokens are micro-dollars, and its refusal a refusal for
//!   tokens: so the same rule applies to dollars. A request whose bound's
//!   price does not fit the dollars left has its prompt counted and is
//!   tried again at the counted price, and only then refused (or made to
//!   wait). Spend is tight exactly when the byte bound's price does not
//!   fit.
//! - **Unpriced**: a request that claims a spend limit (its own or a
//!   parent's) for a model no entry prices is refused with `400`, code
//!   `model_not_priced`, before anything is taken or forwarded: never
//!   silently free. A `name = "*"` entry prices every model. A request
//!   that reserves no tokens (a read) needs no price.
//!
//! ## What a client sees
//!
//! - `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` report, per
//!   resource, the limit with the least left among the chain's own budgets
//!   and the usage cells the request claimed (on a refusal, the one that
//!   refused), as they did for a chain.
//! - `x-budget-spend-limit-usd`, `x-budget-spend-remaining-usd` (dollars,
//!   six decimals) and `x-budget-spend-reset` (a Go duration, like the
//!   `x-ratelimit-reset-*` headers) report the spend limit with the least
//!   left among those the request claimed; absent when none applies.
//! - On an admitted response, both report the limits as they stood right
//!   after the request was admitted (its estimate taken), read in the
//!   admission itself (the core's `acquire_owned_reporting` and
//!   `acquire_set_owned_reporting`), not looked up again.
//! - A spend refusal is a `429` whose error `type` is `"spend"`, with the
//!   estimate and what is left in dollars, and `Retry-After` when the
//!   window's end (or the bucket) frees room.
//!
//! The admin view (`GET /v1/agents/{id}`) lists every limit as configured
//! with `used` and `remaining` per resource it limits, `spend_usd`
//! included, `resets_in_secs` and `exhausted`. `/metrics` counts dollars
//! settled under spend limits in `budget_spend_micro_usd_total`.
//!
//! ## Windows
//!
//! `"30s"`, `"1m"`, `"1h"`, `"1d"`, `"30d"` are lengths of time counted
//! from the budget's first use, as before: `"1d"` stays 86,400 s so that
//! every configuration written before (and `window_secs = 86400`, which
//! reads as `"1d"`) keeps its meaning. The UTC calendar's windows are
//! spelled apart: `"day"` (00:00 to 00:00 UTC) and `"1mo"` (the 1st,
//! 00:00 UTC, to the next 1st, whatever the month's length), enforced by
//! the core's calendar budgets (`set_calendar`). A bucket (`refill`)
//! refills over a length, never a calendar window.
//!
//! ## Limits
//!
//! - A fleet (`--redis`) shares one fixed window per agent through Redis:
//!   lists, spend, `model`, calendar windows and buckets are refused there,
//!   at start and by the admin API.
//! - A request may reach at most `agent_budget::MAX_SET_LIMITS` (32) core
//!   budgets; a chain with more applicable cells is refused by the core.
//! - The price table is replaced by a SIGHUP reload: requests admitted
//!   from then on are priced with it; one admitted before is settled at
//!   the price it was admitted with.
//!
//! ## Cost
//!
//! Two measures, both side by side with the `budget` variant (the load key
//! under one window on tokens and requests) in one run on a 2-vCPU AMD
//! EPYC VM.
//!
//! **CPU time per request**, on the load bench the issue names
//! (`cargo bench -p budget-gateway --bench load -- --variants
//! budget,limits`: each gateway process's user and system time from
//! `/proc/PID/stat` over each round, divided by the requests it served;
//! the median of the rounds, 2 s each, the order rotated):
//!
//! | run | rounds | 1 connection | 32 connections |
//! |---|---|---|---|
//! | 1 | 7 | +6.7% (147.6 against 138.3 µs) | −2.8% (44.3 against 45.5 µs) |
//! | 2 (the order reversed) | 9 | +3.5% (141.9 against 137.1 µs) | +24.4% (52.1 against 41.9 µs) |
//! | 3 | 15 | | +8.3% (37.1 against 34.2 µs) |
//! | 4 | 11 | +8.2% (144.2 against 133.3 µs) | +9.4% (53.3 against 48.7 µs) |
//!
//! Within 10% in six of the seven, and one round set of 32 connections at
//! +24%: the one key of the bench is then written by both cores at once,
//! and the limits put three cells under that contention where one window
//! puts one. Throughput at 32 connections differs by −7.1% to +3.4%
//! (−16% in the second run), the median latency by −5% to +10%.
//!
//! **Instructions per request** (`budget-gateway/benches/instructions.sh
//! --variants none,budget,governor,limits`, callgrind, the median of three
//! processes per variant; user space only, where the CPU time above
//! includes the kernel's share of each request, which both pay alike):
//!
//! | configuration | instructions | vs one window |
//! |---|---|---|
//! | one window on tokens and requests (`budget`) | 80,356 at `114fbd2` (80,565 at `1f5cdcb`, 80,387 at `5b41e62`, 81,984 at `a33ec1c`, 82,409 before the registry's guard, 83,322 at `ee9a4d8`) | |
//! | two windows and a spend limit in `1mo` (`limits`) | 89,461 (89,381, 89,437, 91,425, 92,388, 93,215) | +11.3% (+10.9%, +11.3%, +11.5%, +12.1%, +11.9%) |
//!
//! (Earlier sessions, on other machines: 82,537 and 92,477, +12.0%;
//! 85,959 and 98,098, +14.1%.) Cutting what both pay leaves the
//! difference as it was and the ratio a little higher: the admission that
//! reports where its limits stand (`acquire_set_owned_reporting`), which
//! replaced the spend header's `full_info` and `rate_limits`' three reads,
//! took 827 instructions from `limits` and 913 from `budget`. By this
//! count the difference is still above 10%. Where it goes (inclusive,
//! `--compare budget,limits`): the core's set admission and settle (2,220
//! for three claims where `acquire_owned` is about 480; the set's settle
//! 1,570 where one budget's is 550: three lookups and compare-and-swaps
//! where there is one of each), the reports of three limits (1,500 while
//! each was a lookup, a load and a `full_info`), the spend headers (three inserts
//! under names of their own, their values, 2,900) and the claims (900).
//! Already cut: the dollars formatted from integer digits rather than
//! `{:.6}` (4,700), then by `itoa` (the whole dollars and the decimals one
//! call each, where each digit had its own division: 578 -> 383 for the
//! two values); the set's reservation boxed (its moves were 1,900 of
//! copies); the month's dates remembered per thread (they were computed
//! about ten times a request, 1,800) and `full_info` reading the state
//! once; the spend headers in one allocation; the plan table read without
//! cloning an `Arc`; the spend cell's and the windows' state read in the
//! admission; then the set's reports from the state each take left
//! instead of a lookup and a load per limit: 91,600 against 82,035, +11.7%
//! (three processes each, beside a CI run); settling through the slot the
//! take found, in the core (a lookup fewer per limit). Left to try: a
//! key's limits in one cell (see the core's `docs::implementation`, "Sets
//! of limits").
