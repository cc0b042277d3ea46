//! Token and call budgets enforced on the wire: a tower layer over
//! [`agent_budget`]'s lock-free manager.
//!
//! A [`BudgetLayer`] sits in a tower stack (axum, hyper, tonic) in front of
//! a service that calls an LLM, or is one. For every request it reserves
//! an estimate of the tokens and one call before the request goes on,
//! refuses with `429` and `Retry-After` when the agent's budget cannot
//! take it, and settles the real usage when the response's body ends,
//! read from the response itself. The reservation is all-or-nothing and
//! takes one compare-and-swap, so racing requests never overshoot a budget
//! between a check and a charge. In `budget-gateway`, the layer adds about
//! 20,000 instructions to the 57,000 of a proxied chat completion (see
//! [Cost per request](#cost-per-request)).
//!
//! # The parts
//!
//! | part | trait | default | others |
//! |---|---|---|---|
//! | who the agent is | [`Identify`] | [`AgentIdHeader`] (`x-agent-id: <uuid>`) | [`BearerKeys`] (`Authorization: Bearer <key>` through a map), [`AgentIdExtension`], closures |
//! | what to reserve | [`Estimator`] | [`OpenAiEstimator`]: for chat completions, completions, responses and embeddings, the prompt and the most the completion may use, and one call; reads one call; other requests refused (see [`OtherRequests`]) | [`FixedCost`] |
//! | what was used | [`Meter`] | [`OpenAiUsage`]: `usage` from the JSON body or the stream's usage event | [`HeaderUsage`] |
//! | what admits | [`Admission`] | any [`BudgetLimiter`](agent_budget::BudgetLimiter) (`Arc<BudgetManager>`, the argument of [`BudgetLayer::new`]) | `agent-budget-redis`'s `FleetManager` (its `tower` feature): one budget for a fleet |
//!
//! # What a client sees
//!
//! - Admitted: the response, with OpenAI's `x-ratelimit-limit-*`,
//!   `x-ratelimit-remaining-*` and `x-ratelimit-reset-*` headers (and the
//!   IETF `RateLimit-Policy` / `RateLimit` fields if
//!   [`HeaderStyle::ietf`] is on).
//! - Refused: `429 Too Many Requests` with `Retry-After` in whole seconds
//!   (rounded up, never `0`), the same headers, and an OpenAI-style error
//!   body; `403` if the agent has no budget at all; `401` if no agent can
//!   be told; `400` if the body cannot be estimated or the path has a
//!   spelling servers disagree on ([`path`]); `404` for a request the
//!   estimator will not forward ([`OtherRequests`]). Nothing is forwarded
//!   or charged for any of these.
//! - With [`BudgetLayer::max_wait`], a request that does not fit waits
//!   for budget (a refund or the window's end) up to that long first.
//! - Under nested budgets (`set_parent`: a key under its team), the
//!   headers report, for each resource, the level that binds the agent
//!   (the one with the least left, or the one that refused it).
//! - `503 Service Unavailable` with `Retry-After` when the budget could
//!   not be checked at all (only a budget kept elsewhere, such as a
//!   fleet's in Redis, answers that: see [`Admission`]).
//!
//! # Settling
//!
//! The reservation is settled once, by the response body (see [`body`
//! module docs](BudgetBody)): with the usage the response reported when
//! the body ends; with at least the prompt and what streamed when the
//! client hangs up (axum and hyper drop the body; the settle is in a
//! `Drop`); cancelled when the inner service fails before any response.
//! Usage beyond the estimate is charged even past the limit.
//!
//! # Cost per request
//!
//! Counted with callgrind in `budget-gateway` (its
//! `benches/instructions.sh`: the gateway with the layer, and with nothing
//! in its place, serving the same 230-byte chat completion), the layer
//! adds about 16,600 instructions per request (`db939ca`, three processes
//! each: 77,533 against a plain proxy's 60,953, +16,580; the response
//! has carried its settle boxed since). It was 16,830 at `1b981e6`
//! (77,748 against 60,918), once the gateway's server stopped sending a
//! connection that wakes itself through tokio's yield ("The self-wake",
//! below); 19,700 before
//! (`114fbd2`: 80,356 against 60,710, +19,645; +19,775 in a second
//! run). The code before that measured +19,948 to +20,024 in three runs
//! the same day, and +19,503 the day before: runs differ by a few
//! hundred. `114fbd2` took the plan table's two arc-swap loads out of
//! the requests of agents without lists of limits (141). It was 66,800
//! before all the changes below, 21,400 before the response's usage was
//! read from its key. What they are, roughly:
//!
//! | part | instructions |
//! |---|---|
//! | the bearer key: its keyed SipHash, which finds the digest this thread made of it last (SHA-256 in software was 3,500: valgrind hides the CPU's SHA extensions, and many servers have none), and the lookup | 110 + 650 |
//! | reading the response's `usage`: its key found by memchr, the strict reader from there to the end (`openai::seek`) | 1,800 |
//! | the six `x-ratelimit-*` headers: `HeaderMap` inserts under names that are not standard (1,600, two thirds of it FNV over the names), values (1,000), Go durations | 3,300 |
//! | the request's estimate (the body's JSON, read and validated, its model with it) | 2,900 |
//! | the core: `acquire_owned_reporting` (the admission, and where the chain stands right after it, for the headers: read under the admission's guard, where a `chain_info` of its own cost 830), `settle` | 1,550 |
//! | hyper and tokio: the six headers written out (until `1b981e6` also tokio's yield of a task that woke itself, about 2,900: "The self-wake", below) | 100 (2,300 before) |
//! | the boxed service future and its moves, axum's boxed bodies | 2,000 |
//! | reading the body, and the path checked again (the gateway checked it before routing) | 1,500 |
//! | the meter's start, the settle's bookkeeping, metrics | 2,000 |
//!
//! What took the rest:
//!
//! - **The prompt's count** (37,000 with `bpe-openai`'s o200k: a regex
//!   that splits the text, then a fresh encoder per piece). With
//!   [`PromptCount::WhenTight`] the estimate reserves one token per byte
//!   while the budget has room, and the count is made only where it
//!   matters ([`DeferredCount`]).
//! - **serde_json** (5,900 for the request, 5,700 for the response):
//!   every key validated as UTF-8 on its own, an untagged enum buffered,
//!   vectors grown, nesting skipped through an allocation. A strict reader
//!   (`openai::scan`) answers for the shapes it understands, serde for the
//!   rest; differential tests hold the two to the same answers.
//! - **Allocations**: seven per response for the header values (now one),
//!   a closure per deferred count (now none), `Collect`'s queue for the
//!   body.
//! - Smaller: the path check in one pass and then eight bytes at a time,
//!   the bearer key read from its bytes and hashed with ahash, Go
//!   durations in `u64`.
//! - **The key's SHA-256** on every request (3,479; 215 ns where the CPU
//!   has no SHA extensions, 63 ns where it has): each thread now keeps the
//!   digests of the last 64 keys it hashed, found by a keyed 128-bit
//!   SipHash of the key (the gateway's `keys` module docs).
//! - **The model, read in a second pass** over the body (2,400), and a
//!   check before the body that took the least a request costs and gave
//!   it back (1,400, and a concurrent request could find less room
//!   meanwhile): now one pass, and the core's `check`, which takes nothing,
//!   made only when the body has not come with its head (the estimate is
//!   tried first: 1,300 less where it has).
//! - **The clocks**: the check's duration was two `std::time::Instant`
//!   reads (`clock_gettime` through the vDSO, and `timespec` arithmetic);
//!   it is now two reads of the time-stamp counter and one scaling
//!   (quanta's raw clock: `quanta::Instant::now`, which scales each read,
//!   had cost more than `std`'s). The wall clock's reading at admission
//!   is made only for a usage log, its one reader. Together 229 fewer
//!   (22,025 -> 21,796, three processes each, the same machine).
//! - **The core's guard**: each registry operation announced in its
//!   thread's slot instead of an arc-swap load (the core's
//!   `docs::implementation`, "The guard"): 329 fewer (21,796 -> 21,467).
//! - **The strict reader's strings**, inlined where they are read, with
//!   escapes out of line (a key of a few bytes cost more in the call and
//!   its saved registers than in its test): the request's estimate and the
//!   response's usage 7,116 -> 6,570 together (callgrind, 1,000 of each),
//!   and the estimate awaited once, from a function of its own, so its
//!   room in the request's future is shared with the admission's and the
//!   upstream's (4,480 -> 3,104 bytes, the copy into its box 448 -> 325
//!   instructions). In the gateway the reader's share fell by 546 (the
//!   usage 3,815 -> 3,515, the estimate 3,187 -> 2,941) and the whole by
//!   252 (82,409 -> 82,157 with the layer, three processes each; the
//!   plain proxy measured 60,732, 103 more than before with the same
//!   code: +21,424). The copies of the request's future's locals went up
//!   by about 90 (19 `memcpy`s a request where there were 12).
//! - **The response's usage, read from its key**: the strict reader
//!   validated every byte of the generated text on its way to the usage
//!   at the end (3,515). memchr finds the body's only `"usage"`, and the
//!   reader reads from there to the body's end, which proves the member is
//!   the top level's (`openai::seek` says why a model's output cannot
//!   spell it, and what that trusts the upstream with): 1,821. With the
//!   meter's session no longer cloning the estimate, dollars and Go
//!   durations written straight into the header values' text and the
//!   bearer key's check vectorized, the layer went from +21,690 to +19,503
//!   (`budget-gateway/benches/instructions.sh --runs 3`, the same machine
//!   and day).
//!
//! Tried and dropped, with their counts: the strict reader on `u128` words (3,724 -> 4,362 for
//! the usage), or without the body's UTF-8 check up front (keys and text
//! checked one by one: the request's estimate 2,830 -> 3,071). Earlier, a
//! runtime per core (no cross-worker wake-ups at all) moved the median
//! latency by -2 ± 9 µs at one connection: not kept. Tried again against
//! the self-wake (each connection served by a one-worker runtime of its
//! own thread, the accepting runtime handing it over): the `futex` calls
//! went from two a request to none (`strace -c -f`, 3 s of `wrk -c1`),
//! and the throughput at one connection went down, 3,689 requests/s
//! against 4,352 (medians of 9 rotated rounds of 3 s): not kept either.
//! The same gateway with one worker (`TOKIO_WORKER_THREADS=1`) serves
//! 5,800 to 6,100 requests/s at one connection against 5,000 to 5,400
//! with two (three rounds of 2 s each); a gateway is not run on one
//! worker for one connection's sake.
//!
//! Also tried: a request future small enough for glibc's per-thread cache
//! (832 bytes, under its 1,032: the request boxed, as an argument keeps
//! its room to the end; the estimate's future boxed; an admission at hand
//! taken without an await, its rare paths boxed; `rustc -Zprint-type-sizes`
//! showed where the room went). `malloc` got cheaper, but two more blocks
//! to free and the moves out of the block that let the room be shared
//! cost as much: 21,400 against 21,424, within the runs' spread. Not kept.
//!
//! Left, and where it would go: the serve future, 3,104 bytes that
//! `Box::pin` copies (about 325 instructions of `memcpy`) and that
//! `malloc` serves from its slow path, where a request is freed on the
//! other worker's thread as often as not.
//!
//! # The self-wake, and what a server can do about it
//!
//! The layer reads the request's body inside the connection's task, and
//! hyper's body channel wakes its sender, the connection's dispatcher,
//! whenever the receiver takes a chunk: the task wakes itself while it
//! runs. tokio takes that for a yield and wakes a parked sibling worker
//! (`notify_parked_local`), which finds nothing to do and parks again:
//! two `futex` calls and a thread's round trip per request whenever a
//! worker is idle, which at one connection is always (`perf record -e
//! syscalls:sys_enter_futex --call-graph dwarf` put every one of them
//! under `Harness::poll` → `yield_now`, and a breakpoint on tokio's waker
//! put the wake in `hyper::body::chan::Receiver::poll_next` under the
//! estimator). `budget-gateway`'s server polls each connection with a
//! waker of its own that turns a wake during the poll into one more poll
//! in place (its `repoll` module, about 80 lines): no `futex` call at all
//! under `wrk -c1` with the layer (10 in 2 s, against 8,544 before), and
//! its throughput at one connection went from 76% of the plain proxy's to
//! a median of 89.5% over five runs (81–97%;
//! `budget-gateway/benches/wrk.sh`, the README's Load section). A
//! server of your own that reads bodies in the connection's task (any
//! hyper server with this layer in front) can do the same around
//! `serve_connection`; with `axum::serve` the cost stays.
//!
//! # Embedding it in axum
//!
//! `Router::new().route(...).layer(BudgetLayer::new(budgets).identify(keys))`:
//! the crate's README has the whole example, compiled as a doc test.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// A `Rejection` (status, message, headers) is 160 bytes, moved once per
// refused request, the cold path: boxing it would cost an allocation to
// save a copy.
#![allow(clippy::result_large_err)]

mod admission;
mod body;
mod estimate;
pub mod headers;
mod identify;
mod meter;
pub mod openai;
pub mod path;
mod rejection;
mod service;
mod telemetry;

pub use admission::{
    acquire_reporting, admit_polling, Admission, Denial, Reservation, POLL_INTERVAL,
};
pub use body::BudgetBody;
pub use estimate::{CountTokens, DeferredCount, Estimate, Estimator, FixedCost};
pub use identify::{bearer_key, AgentIdExtension, AgentIdHeader, BearerKeys, Identify};
pub use meter::{
    HeaderUsage, HeaderUsageSession, Meter, MeterSession, Outcome, PromptReceived, TokenSplit,
    UsageLog, UsedTokens,
};
pub use openai::{OpenAiEstimator, OpenAiUsage, OtherRequests, PromptCount};
pub use rejection::Rejection;
pub use service::{BudgetLayer, BudgetResponse, BudgetService, HeaderStyle};
pub use telemetry::{Observe, RefusalReason};

/// The README's example, compiled as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
