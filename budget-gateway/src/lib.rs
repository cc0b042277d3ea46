//! `budget-gateway`: an HTTP reverse proxy that enforces token and call
//! budgets per API key in front of an OpenAI-compatible upstream, built on
//! the `agent-budget-tower` layer.
//!
//! ```text
//! budget-gateway --config gateway.toml --listen 127.0.0.1:8080 --upstream http://127.0.0.1:9000
//! budget-gateway --mock-upstream --listen 127.0.0.1:9000
//! ```
//!
//! The binary is a thin shell over this library, which tests drive in
//! process: [`config`] reads and checks the TOML (its limits through
//! [`limits`], which the admin API shares), [`admission`] admits each
//! request against every limit that applies to it (spend priced,
//! per-model limits; the design in [`docs::limits`]), [`gateway::Gateway`] builds
//! the routes and serves them behind [`paths`]' normalization on
//! [`server`] (deadlines, a connection limit, a stop with a deadline),
//! [`journal`] keeps usage between two saves of the state file, [`proxy`]
//! forwards, [`admin`] is the operator's API (budgets, agents, keys, its
//! OpenAPI document), [`catalog`] holds the agents of the file and of the
//! database ([`db`]) and applies their changes, [`keys`] makes, hashes and
//! looks up API keys, [`reload`] re-reads the file on SIGHUP,
//! [`tokenizer`] counts prompts, [`mock`] is a small upstream to try it all
//! against. [`dashboard`] serves the page at `/dashboard`, fed by the
//! admin API and by [`history`] (each agent's last hour, told of every
//! decision through [`watch`]); [`alerts`] POSTs crossings of a limit's
//! fractions; [`shadow`] is `enforce = false`.
//!
//! # The admin API
//!
//! With a database (`--db FILE` for SQLite, `--db postgres://…` for a
//! fleet), agents and their API keys are created, changed, rotated,
//! revoked and deleted at runtime over HTTP (the endpoints are listed in
//! [`admin`], and described by the OpenAPI document at `/openapi.json`).
//!
//! - **Where agents come from.** The file's agents and the database's live
//!   side by side in the [`catalog`]: the file's are shown by the API and
//!   read-only through it (`409`); an id claimed by both is refused by the
//!   API, at start and at a SIGHUP reload; an API agent's parent is an API
//!   agent. So the file never silently undoes the API, nor the API the
//!   file. SIGHUP re-reads the file ([`reload`]); a bad one is refused with
//!   the error a start gives, and the running configuration stays.
//! - **Keys.** 160 bits from the OS's random source, prefixed `sk-ab-`,
//!   shown once; the database and the memory keep their SHA-256 and their
//!   first 12 characters, and the plaintext is never written or logged
//!   ([`keys`]). The request path hashes the bearer key and reads a
//!   lock-free map: a key made or revoked at runtime never makes a request
//!   wait, and a revoked key is refused by the next request. A key's last
//!   use is written every 5 s in one batch, off the request path.
//! - **Changes.** Every change is a database transaction stamped with the
//!   next revision, checked inside it (a parent must exist, no loop, at
//!   most [`MAX_LEVELS`](agent_budget::MAX_LEVELS) levels, the id free) and
//!   applied to the budgets (`set_budget`: usage in the window is kept) and
//!   the key table after it commits ([`db`], [`catalog`]).
//! - **A fleet.** Gateways on one PostgreSQL database poll its revision
//!   every 250 ms and apply what changed, in revision order; with one
//!   Redis (`--redis`) as well, they share the budgets, which the gateway
//!   that made a change writes to Redis before it commits. A budget shared
//!   through Redis is a flat fixed window: a parent or a bucket (`refill`)
//!   is refused there (`422`, or at start for the file).
//! - **Usage across restarts.** Unchanged: `--state FILE` keeps the usage
//!   of every agent, the file's and the API's (a fleet's lives in Redis).
//!   The database holds configuration, not usage: usage changes with every
//!   request, which a database write per request would slow.
//!
//! Not yet: a `metrics_label` set through the API applies from the next
//! start (the layer registers its labelled series when it is built), and
//! the PostgreSQL connection is not encrypted (put it on a trusted network
//! or a local socket).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod admission;
pub mod alerts;
pub mod catalog;
pub mod config;
pub mod dashboard;
pub mod db;
mod deadline;
pub mod docs;
pub mod gateway;
pub mod history;
pub mod journal;
pub mod keys;
pub mod limits;
pub mod mock;
pub mod paths;
pub mod proxy;
pub mod reload;
mod repoll;
pub mod server;
pub mod shadow;
pub mod tokenizer;
pub mod watch;
