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
//! [`limits`], which the admin API shares), [`gateway::Gateway`] builds
//! the routes and serves them behind [`paths`]' normalization, [`proxy`]
//! forwards, [`admin`] is the operator's API (budgets, agents, keys, its
//! OpenAPI document), [`catalog`] holds the agents of the file and of the
//! database ([`db`]) and applies their changes, [`keys`] makes, hashes and
//! looks up API keys, [`reload`] re-reads the file on SIGHUP,
//! [`tokenizer`] counts prompts, [`mock`] is a small upstream to try it all
//! against.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod catalog;
pub mod config;
pub mod db;
pub mod gateway;
pub mod keys;
pub mod limits;
pub mod mock;
pub mod paths;
pub mod proxy;
pub mod reload;
pub mod tokenizer;
