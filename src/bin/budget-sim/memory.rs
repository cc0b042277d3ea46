//! `--memory N`: resident memory per agent for each manager.
//!
//! Method: each manager is measured in a fresh child process (this binary
//! with `--memory-child`), so neither inherits the other's heap. The child
//! draws the N ids and builds an empty manager, reads VmRSS from
//! `/proc/self/status`, sets N budgets, and reads VmRSS and VmHWM (peak)
//! again. Bytes per agent = RSS growth / N: it counts everything a real
//! process pays, including hash-table spare capacity and allocator slack,
//! and the peak includes tables being resized. The lock-free manager is
//! measured twice: on the simulation's budgets, which need its 128-bit
//! cells, and on budgets small enough for its 64-bit ones.

use std::process::Command;

use agent_budget::{AgentId, BudgetLimit, BudgetLimiter, BudgetManager, LockedBudgetManager};
use serde_json::{json, Value};

use crate::workload;

/// One measured configuration: a manager, and the budgets it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The lock-free manager on the simulation's budgets (128-bit cells).
    LockFree,
    /// The lock-free manager on budgets that fit its 64-bit cells.
    LockFreeNarrow,
    /// The locked manager on the simulation's budgets.
    Locked,
}

impl Phase {
    const ALL: [Phase; 3] = [Phase::LockFree, Phase::LockFreeNarrow, Phase::Locked];

    fn name(self) -> &'static str {
        match self {
            Phase::LockFree => "lock-free",
            Phase::LockFreeNarrow => "lock-free-narrow",
            Phase::Locked => "locked",
        }
    }

    pub fn parse(value: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|phase| phase.name() == value)
            .ok_or_else(|| format!("unknown memory phase '{value}'"))
    }

    fn budget(self, agent_id: AgentId) -> BudgetLimit {
        match self {
            Phase::LockFreeNarrow => BudgetLimit {
                agent_id,
                token_budget: 100_000,
                calls_budget: 100,
                window_secs: 60,
            },
            Phase::LockFree | Phase::Locked => workload::budget(agent_id),
        }
    }
}

/// How the numbers are obtained, printed with them.
const METHOD: &str = "VmRSS from /proc/self/status before and after set_budget for N agents; \
                      one fresh process per manager";

/// Measures both managers in child processes and returns the report.
pub fn report(agents: usize, json_output: bool) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let mut results = Vec::new();
    for kind in Phase::ALL {
        let output = Command::new(&exe)
            .args(["--memory-child", kind.name(), &agents.to_string()])
            .output()
            .map_err(|e| format!("cannot start the {} phase: {e}", kind.name()))?;
        if !output.status.success() {
            return Err(format!(
                "the {} phase failed: {}",
                kind.name(),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let result: Value = serde_json::from_slice(&output.stdout)
            .map_err(|e| format!("the {} phase printed no result: {e}", kind.name()))?;
        results.push(result);
    }
    if json_output {
        let report = json!({ "method": METHOD, "agents": agents, "managers": results });
        return Ok(format!("{report:#}\n"));
    }
    let mut out = format!("memory per agent at {agents} agents ({METHOD})\n\n");
    out += &format!(
        "{:<17} {:>14} {:>14} {:>16} {:>16}\n",
        "manager", "RSS before", "RSS after", "bytes/agent", "peak bytes/agent"
    );
    for r in &results {
        out += &format!(
            "{:<17} {:>11} kB {:>11} kB {:>16.1} {:>16.1}\n",
            r["manager"].as_str().unwrap_or("?"),
            r["rss_before_kb"],
            r["rss_after_kb"],
            r["bytes_per_agent"].as_f64().unwrap_or(f64::NAN),
            r["peak_bytes_per_agent"].as_f64().unwrap_or(f64::NAN),
        );
    }
    Ok(out)
}

/// The child's phase: measures one manager and returns its JSON line.
pub fn child(phase: Phase, agents: usize) -> Result<String, String> {
    let ids = workload::agent_ids(agents);
    let result = match phase {
        Phase::LockFree | Phase::LockFreeNarrow => measure::<BudgetManager>(phase, &ids)?,
        Phase::Locked => measure::<LockedBudgetManager>(phase, &ids)?,
    };
    Ok(format!("{result}\n"))
}

fn measure<M: BudgetLimiter>(kind: Phase, ids: &[AgentId]) -> Result<Value, String> {
    let manager = M::with_clock(quanta::Clock::new());
    let before = status_kb("VmRSS")?;
    for &id in ids {
        manager.set_budget(kind.budget(id));
    }
    let after = status_kb("VmRSS")?;
    let peak = status_kb("VmHWM")?;
    std::hint::black_box(&manager);
    let per_agent = |kb: u64| (kb.saturating_sub(before) * 1024) as f64 / ids.len() as f64;
    Ok(json!({
        "manager": kind.name(),
        "agents": ids.len(),
        "rss_before_kb": before,
        "rss_after_kb": after,
        "peak_rss_kb": peak,
        "bytes_per_agent": per_agent(after),
        "peak_bytes_per_agent": per_agent(peak),
    }))
}

/// A `kB` field of `/proc/self/status`.
fn status_kb(field: &str) -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status (Linux only): {e}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().strip_suffix("kB")?.trim().parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/self/status"))
}
