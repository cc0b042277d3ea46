//! The results as a table for people or as JSON for scripts, including the
//! lock-free/locked ratio for each thread count run on both managers.

use serde_json::{json, Value};

use crate::cli::{ManagerKind, SimConfig};
use crate::sim::RunResult;
use crate::workload;

/// The latency percentiles reported, with their column names.
const PERCENTILES: [(&str, f64); 3] = [("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9)];

/// The simulation's parameters, as a table heading or in the JSON.
fn setup(config: &SimConfig) -> String {
    format!(
        "{} agents, Zipf skew {}, {:.1} s per run, each agent {} tokens and {} calls \
         per {} s window; {} cores; {} clock",
        config.agents,
        config.skew,
        config.duration.as_secs_f64(),
        workload::TOKEN_BUDGET,
        workload::CALLS_BUDGET,
        workload::WINDOW_SECS,
        crate::cli::cores(),
        if config.precise_clock {
            "precise"
        } else {
            "coarse"
        },
    )
}

/// p50, p99, p99.9 and max latency of a run, in nanoseconds.
fn latencies(run: &RunResult) -> [u64; 4] {
    let [p50, p99, p999] = PERCENTILES.map(|(_, q)| run.latency.value_at_quantile(q / 100.0));
    [p50, p99, p999, run.latency.max()]
}

/// The lock-free and locked runs at the same thread count.
fn pairs(results: &[RunResult]) -> impl Iterator<Item = (&RunResult, &RunResult)> {
    results
        .iter()
        .filter(|r| r.manager == ManagerKind::LockFree)
        .filter_map(|lock_free| {
            results
                .iter()
                .find(|r| r.manager == ManagerKind::Locked && r.threads == lock_free.threads)
                .map(|locked| (lock_free, locked))
        })
}

/// The results as an aligned table.
pub fn table(config: &SimConfig, results: &[RunResult]) -> String {
    let mut out = format!("budget-sim: {}\n", setup(config));
    out += "latency: one acquire + settle (or refused acquire), per thread, merged\n\n";
    out += &format!(
        "{:>7}  {:<16} {:>10} {:>9} {:>9} {:>9} {:>9} {:>12} {:>20}\n",
        "threads", "manager", "ops/s", "p50", "p99", "p99.9", "max", "admitted", "refused"
    );
    for run in results {
        let [p50, p99, p999, max] = latencies(run).map(nanos);
        out += &format!(
            "{:>7}  {:<16} {:>10} {p50:>9} {p99:>9} {p999:>9} {max:>9} {:>12} {:>20}\n",
            run.threads,
            run.manager.name(),
            rate(run.ops_per_sec()),
            run.admitted,
            format!("{} ({:.1}%)", run.refused, run.refused_percent()),
        );
    }
    let mut ratios = pairs(results).peekable();
    if ratios.peek().is_some() {
        out += "\nlock-free / locked (ops/s: higher is better; latency: lower is better)\n";
    }
    for (lock_free, locked) in ratios {
        let [p50, p99, p999, max] = latency_ratios(lock_free, locked).map(|r| format!("{r:.2}x"));
        out += &format!(
            "{:>7}  {:<16} {:>10} {p50:>9} {p99:>9} {p999:>9} {max:>9}\n",
            lock_free.threads,
            "ratio",
            format!("{:.2}x", lock_free.ops_per_sec() / locked.ops_per_sec()),
        );
    }
    out
}

fn latency_ratios(lock_free: &RunResult, locked: &RunResult) -> [f64; 4] {
    let (a, b) = (latencies(lock_free), latencies(locked));
    [0, 1, 2, 3].map(|i| a[i] as f64 / b[i].max(1) as f64)
}

/// The results as JSON, latencies in nanoseconds.
pub fn json(config: &SimConfig, results: &[RunResult]) -> Value {
    let runs: Vec<Value> = results
        .iter()
        .map(|run| {
            let [p50, p99, p999, max] = latencies(run);
            json!({
                "manager": run.manager.name(),
                "threads": run.threads,
                "elapsed_secs": run.elapsed.as_secs_f64(),
                "ops": run.ops(),
                "ops_per_sec": run.ops_per_sec(),
                "admitted": run.admitted,
                "refused": run.refused,
                "latency_ns": { "p50": p50, "p99": p99, "p99.9": p999, "max": max },
            })
        })
        .collect();
    let ratios: Vec<Value> = pairs(results)
        .map(|(lock_free, locked)| {
            let [p50, p99, p999, max] = latency_ratios(lock_free, locked);
            json!({
                "threads": lock_free.threads,
                "ops_per_sec": lock_free.ops_per_sec() / locked.ops_per_sec(),
                "latency": { "p50": p50, "p99": p99, "p99.9": p999, "max": max },
            })
        })
        .collect();
    json!({
        "config": {
            "agents": config.agents,
            "skew": config.skew,
            "duration_secs": config.duration.as_secs_f64(),
            "threads": config.threads,
            "token_budget": workload::TOKEN_BUDGET,
            "calls_budget": workload::CALLS_BUDGET,
            "window_secs": workload::WINDOW_SECS,
            "cores": crate::cli::cores(),
            "precise_clock": config.precise_clock,
        },
        "runs": runs,
        "lock_free_over_locked": ratios,
    })
}

/// A rate with a metric suffix: `4.21 M`.
pub fn rate(per_sec: f64) -> String {
    match per_sec {
        r if r >= 1e9 => format!("{:.2} G", r / 1e9),
        r if r >= 1e6 => format!("{:.2} M", r / 1e6),
        r if r >= 1e3 => format!("{:.2} k", r / 1e3),
        r => format!("{r:.0}"),
    }
}

/// A duration in nanoseconds, in the unit that reads best.
fn nanos(ns: u64) -> String {
    match ns {
        n if n >= 1_000_000_000 => format!("{:.2} s", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} ms", n as f64 / 1e6),
        n if n >= 10_000 => format!("{:.1} µs", n as f64 / 1e3),
        n if n >= 1_000 => format!("{:.2} µs", n as f64 / 1e3),
        n => format!("{n} ns"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(rate(4_210_000.0), "4.21 M");
        assert_eq!(rate(12.0), "12");
        assert_eq!(nanos(950), "950 ns");
        assert_eq!(nanos(1_250), "1.25 µs");
        assert_eq!(nanos(2_500_000), "2.50 ms");
    }
}
