//! Command-line flags, parsed with `lexopt`. A bad flag is a message and
//! exit code 2, never a panic.

use std::time::Duration;

/// What the user asked for.
#[derive(Debug)]
pub enum Command {
    /// Run the scheduler simulation.
    Simulate(SimConfig),
    /// Measure resident memory per agent (`--memory N`).
    Memory {
        /// Agents to insert.
        agents: usize,
        /// Print JSON instead of a table.
        json: bool,
    },
    /// Internal: one manager's memory phase, in its own process.
    MemoryChild {
        /// Which manager, on which budgets.
        phase: crate::memory::Phase,
        /// Agents to insert.
        agents: usize,
    },
    /// Print the usage text.
    Help,
}

/// The two managers under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManagerKind {
    /// `agent_budget::BudgetManager`.
    LockFree,
    /// `agent_budget::LockedBudgetManager`.
    Locked,
}

impl ManagerKind {
    /// Both, in the order they run.
    pub const ALL: [ManagerKind; 2] = [ManagerKind::LockFree, ManagerKind::Locked];

    /// The name used in flags, tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            ManagerKind::LockFree => "lock-free",
            ManagerKind::Locked => "locked",
        }
    }

    fn parse(value: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == value)
            .ok_or_else(|| format!("unknown manager '{value}' (expected lock-free or locked)"))
    }
}

/// The simulation's parameters.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Worker thread counts, each run in turn for every manager.
    pub threads: Vec<usize>,
    /// Agents with a budget.
    pub agents: usize,
    /// Measured time per manager and thread count.
    pub duration: Duration,
    /// Zipf exponent of the agent popularity; 0 is uniform.
    pub skew: f64,
    /// Managers to run.
    pub managers: Vec<ManagerKind>,
    /// Print JSON on stdout instead of the table.
    pub json: bool,
    /// Build both managers on the precise clock (`with_clock`) instead of
    /// the default coarse one (what `new()` reads: recent time, 1 ms upkeep).
    pub precise_clock: bool,
}

/// The usage text of `--help`.
pub const USAGE: &str = "\
budget-sim: a scheduler hammering agent_budget's two managers

Worker threads draw agents from a Zipf distribution and call acquire, then
settle a random actual amount near the estimate, on the lock-free manager
and then on the locked one. Prints throughput, latency percentiles of each
acquire+settle, admitted/refused counts and the lock-free/locked ratio.

USAGE:
    budget-sim [OPTIONS]
    budget-sim --memory N [--json]

OPTIONS:
    --threads LIST     worker threads, comma-separated; `Nx` means N times the
                       available cores (default: 1x,4x)
    --agents N         agents with a budget (default: 10000)
    --duration SECS    measured seconds per manager and thread count
                       (default: 5)
    --skew S           Zipf exponent of agent popularity, 0 = uniform
                       (default: 1.0)
    --manager NAME     run only `lock-free` or `locked` (default: both)
    --precise-clock    both managers read the TSC on every operation instead of
                       quanta's recent time, kept current every 1 ms (the
                       default, as `BudgetManager::new()`; `--coarse-clock`
                       says so explicitly)
    --json             print the results as JSON on stdout
    --memory N         instead, measure resident memory per agent with N
                       agents, each manager in its own process
    -h, --help         print this help
";

const MAX_THREADS: usize = 1024;
const MAX_DURATION_SECS: f64 = 3600.0;

/// Parses the process's arguments.
pub fn parse_env() -> Result<Command, String> {
    parse(lexopt::Parser::from_env()).map_err(|e| e.to_string())
}

fn parse(mut parser: lexopt::Parser) -> Result<Command, lexopt::Error> {
    use lexopt::prelude::*;

    let cores = cores();
    let mut config = SimConfig {
        threads: vec![cores, 4 * cores],
        agents: 10_000,
        duration: Duration::from_secs(5),
        skew: 1.0,
        managers: ManagerKind::ALL.to_vec(),
        json: false,
        precise_clock: false,
    };
    let mut memory = None;
    let mut memory_child = None;
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help),
            Long("threads") => {
                config.threads = parse_with(&mut parser, "--threads", |v| threads(v, cores))?
            }
            Long("agents") => config.agents = parse_with(&mut parser, "--agents", agents)?,
            Long("duration") => config.duration = parse_with(&mut parser, "--duration", duration)?,
            Long("skew") => config.skew = parse_with(&mut parser, "--skew", skew)?,
            Long("manager") => {
                config.managers = vec![parse_with(&mut parser, "--manager", ManagerKind::parse)?]
            }
            Long("json") => config.json = true,
            Long("coarse-clock") => config.precise_clock = false,
            Long("precise-clock") => config.precise_clock = true,
            Long("memory") => memory = Some(parse_with(&mut parser, "--memory", agents)?),
            Long("memory-child") => {
                let phase = parse_with(&mut parser, "--memory-child", crate::memory::Phase::parse)?;
                let count = parse_with(&mut parser, "--memory-child", agents)?;
                memory_child = Some((phase, count));
            }
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(match (memory_child, memory) {
        (Some((phase, agents)), _) => Command::MemoryChild { phase, agents },
        (None, Some(agents)) => Command::Memory {
            agents,
            json: config.json,
        },
        (None, None) => Command::Simulate(config),
    })
}

/// The cores this process may use (1 if unknown).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Takes the flag's value and converts it, naming the flag on failure.
fn parse_with<T>(
    parser: &mut lexopt::Parser,
    flag: &str,
    convert: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, lexopt::Error> {
    let value = parser.value()?;
    let text = value
        .to_str()
        .ok_or_else(|| lexopt::Error::from(format!("{flag}: value is not valid UTF-8")))?;
    convert(text).map_err(|message| lexopt::Error::from(format!("{flag} {text}: {message}")))
}

fn threads(value: &str, cores: usize) -> Result<Vec<usize>, String> {
    value
        .split(',')
        .map(|item| {
            let item = item.trim();
            let count = match item.strip_suffix('x') {
                Some(multiple) => positive(multiple)?.saturating_mul(cores),
                None => positive(item)?,
            };
            if count > MAX_THREADS {
                return Err(format!("at most {MAX_THREADS} threads"));
            }
            Ok(count)
        })
        .collect()
}

fn agents(value: &str) -> Result<usize, String> {
    let count = positive(value)?;
    // Requests name agents by u32 index.
    if count > u32::MAX as usize {
        return Err(format!("at most {} agents", u32::MAX));
    }
    Ok(count)
}

fn positive(value: &str) -> Result<usize, String> {
    match value.replace('_', "").parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a positive whole number".into()),
    }
}

fn duration(value: &str) -> Result<Duration, String> {
    match value.parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs <= MAX_DURATION_SECS => Ok(Duration::from_secs_f64(secs)),
        _ => Err(format!("expected seconds in (0, {MAX_DURATION_SECS}]")),
    }
}

fn skew(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..=100.0).contains(&s) => Ok(s),
        _ => Err("expected a number from 0 (uniform) to 100".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_args(args: &[&str]) -> Result<Command, String> {
        parse(lexopt::Parser::from_args(args)).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_flags() {
        let Ok(Command::Simulate(config)) = parse_args(&[]) else {
            panic!("no flags runs the simulation")
        };
        assert_eq!(config.threads, vec![cores(), 4 * cores()]);
        assert!(!config.precise_clock);
        let Ok(Command::Simulate(config)) = parse_args(&[
            "--precise-clock",
            "--threads",
            "3,2x",
            "--agents",
            "5",
            "--skew",
            "0",
            "--json",
        ]) else {
            panic!("valid flags")
        };
        assert_eq!(config.threads, vec![3, 2 * cores()]);
        assert_eq!((config.agents, config.skew, config.json), (5, 0.0, true));
        assert!(config.precise_clock);
        assert!(matches!(
            parse_args(&["--memory", "1000000"]),
            Ok(Command::Memory {
                agents: 1_000_000,
                json: false
            })
        ));
    }

    #[test]
    fn bad_flags_are_errors() {
        for args in [
            &["--threads", "0"][..],
            &["--threads"],
            &["--agents", "ten"],
            &["--duration", "-1"],
            &["--skew", "nan"],
            &["--manager", "fast"],
            &["--bogus"],
            &["stray"],
        ] {
            assert!(parse_args(args).is_err(), "{args:?} should be refused");
        }
    }
}
