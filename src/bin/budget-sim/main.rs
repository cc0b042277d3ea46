//! `budget-sim`: simulates a scheduler in front of an LLM gateway, to
//! compare the lock-free `BudgetManager` with the locked reference under a
//! realistic, skewed load.
//!
//! Worker threads draw agents from a Zipf distribution, `acquire` an
//! estimated number of tokens and one call, then `settle` a random actual
//! amount near the estimate. Budgets are small enough that the hottest
//! agents run out and windows short enough (1 s) to roll over during a run.
//! Each manager runs in turn at each thread count; the table shows
//! throughput, latency percentiles, admitted/refused counts and the
//! lock-free/locked ratio. `--memory N` measures memory per agent instead.
//! `cargo run --release -- --help` lists the flags.

mod cli;
mod memory;
mod report;
mod sim;
mod workload;

use std::io::Write;
use std::process::ExitCode;

use cli::{Command, SimConfig};

fn main() -> ExitCode {
    let command = match cli::parse_env() {
        Ok(command) => command,
        Err(message) => {
            eprintln!("budget-sim: {message}\nTry 'budget-sim --help' for the flags.");
            return ExitCode::from(2);
        }
    };
    let output = match command {
        Command::Help => Ok(cli::USAGE.to_owned()),
        Command::Simulate(config) => Ok(simulate(&config)),
        Command::Memory { agents, json } => memory::report(agents, json),
        Command::MemoryChild { phase, agents } => memory::child(phase, agents),
    };
    match output {
        // A closed stdout (`| head`) is not worth a panic or a message.
        Ok(text) => match std::io::stdout().lock().write_all(text.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        },
        Err(message) => {
            eprintln!("budget-sim: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every manager at every thread count and renders the results.
fn simulate(config: &SimConfig) -> String {
    let ids = workload::agent_ids(config.agents);
    let mut results = Vec::new();
    for &threads in &config.threads {
        for &manager in &config.managers {
            results.push(sim::run(manager, threads, config, &ids));
        }
    }
    if config.json {
        format!("{:#}\n", report::json(config, &results))
    } else {
        report::table(config, &results)
    }
}
