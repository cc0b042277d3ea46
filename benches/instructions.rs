//! Instructions per operation of the core, counted by callgrind: what the
//! machine's noise does not move (issues 16 and 17 compare these beside
//! `benches/admission.rs`'s times).
//!
//! `benches/instructions.sh` runs it from a fresh clone (it installs
//! valgrind if need be). Each row runs this binary again under
//! `valgrind --tool=callgrind`, in a child process that sets up the
//! manager and then runs the operation `--ops` times and twice that;
//! only the measured loop is counted (`--toggle-collect`), and the
//! difference of the two counts divided by `--ops` is the cost of one
//! operation, set-up and warm-up cancelled. The registry's hash is keyed
//! at random per manager, so probe lengths differ a little from process
//! to process: each figure is the median of `--runs` processes.
//!
//! With `--cache`, the 100,000-agent rows also run under cachegrind with
//! a simulated 4 MiB last-level cache (about what a neighbour-shared L3
//! leaves one process here), counting data reads that miss it: the
//! dependent misses that decide the time at that size.
//!
//! ```text
//! benches/instructions.sh                    # every row, 3 processes each
//! benches/instructions.sh --only set --runs 1
//! benches/instructions.sh --cache
//! ```

mod common;

use std::hint::black_box;
use std::num::NonZeroU32;
use std::process::Command;
use std::sync::Arc;

use agent_budget::{AgentId, BudgetLimit, BudgetManager, CalendarLimit, CalendarPeriod, Claim};
use common::{Clocking, Keys};

/// One row: what is measured, on how many agents (or keys).
struct Row {
    name: &'static str,
    agents: usize,
}

const ROWS: &[Row] = &[
    Row {
        name: "floor",
        agents: 1_000,
    },
    Row {
        name: "reserve/64-bit",
        agents: 1_000,
    },
    Row {
        name: "reserve/128-bit",
        agents: 1_000,
    },
    Row {
        name: "handle-reserve/64-bit",
        agents: 1_000,
    },
    Row {
        name: "acquire-refused/64-bit",
        agents: 1_000,
    },
    Row {
        name: "acquire-refused/128-bit",
        agents: 1_000,
    },
    Row {
        name: "governor",
        agents: 1_000,
    },
    Row {
        name: "governor-refused",
        agents: 1_000,
    },
    Row {
        name: "reserve/64-bit",
        agents: 100_000,
    },
    Row {
        name: "handle-reserve/64-bit",
        agents: 100_000,
    },
    Row {
        name: "governor",
        agents: 100_000,
    },
    Row {
        name: "acquire-settle",
        agents: 1_000,
    },
    Row {
        name: "set-settle/1",
        agents: 1_000,
    },
    Row {
        name: "set-settle/4",
        agents: 1_000,
    },
    Row {
        name: "set-reported-settle/3",
        agents: 1_000,
    },
];

/// Runs `op` on `ops` agents drawn uniformly from `ids` (by index): the
/// only frame callgrind counts.
#[inline(never)]
fn measured(ids: &[AgentId], ops: usize, mut op: impl FnMut(usize)) {
    // A window starts at the next millisecond after `set_budget`'s clock
    // reading; until quanta's upkeep thread (which valgrind runs only now
    // and then) has moved the coarse clock past it, every 64-bit cell's
    // start reads as ahead of the clock and costs a second clock read.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut draw = Keys::new(ids, 7);
    for _ in 0..ops {
        op(draw.next_index());
    }
}

/// A 64-bit cell's budget that outlasts the run: 4 million tokens, 1,000
/// calls, 23 days.
fn narrow(agent_id: AgentId) -> BudgetLimit {
    BudgetLimit {
        agent_id,
        token_budget: (1 << 22) - 1,
        calls_budget: 1_000,
        window_secs: 2_000_000,
    }
}

/// The child: sets `row` up, then runs it `ops` times inside [`measured`].
fn child(name: &str, agents: usize, ops: usize) {
    let ids = common::agent_ids(agents);
    match name {
        // The loop and the draw alone: subtracted from every other row.
        "floor" => measured(&ids, ops, |n| {
            black_box(n);
        }),
        "reserve/64-bit" | "handle-reserve/64-bit" => {
            let manager: BudgetManager = common::manager(Clocking::Coarse);
            for &id in &ids {
                manager.set_budget(narrow(id));
            }
            if name.starts_with("handle") {
                let handles: Vec<_> = ids.iter().filter_map(|id| manager.handle(id)).collect();
                measured(&ids, ops, |n| {
                    black_box(handles[n].reserve(1).is_ok());
                });
            } else {
                measured(&ids, ops, |n| {
                    black_box(manager.reserve(&ids[n], 1).is_ok());
                });
            }
        }
        "reserve/128-bit" => {
            let manager: BudgetManager = common::admitting(&ids, Clocking::Coarse);
            measured(&ids, ops, |n| {
                black_box(manager.reserve(&ids[n], 1).is_ok());
            });
        }
        "acquire-refused/64-bit" | "acquire-refused/128-bit" => {
            // The 64-bit row is the admission bench's refusal: windows of
            // 23 days; the 128-bit one, windows that never end.
            let window_secs = match name {
                "acquire-refused/64-bit" => narrow(ids[0]).window_secs,
                _ => u64::MAX,
            };
            let manager: BudgetManager = common::refusing(&ids, Clocking::Coarse, window_secs);
            measured(&ids, ops, |n| {
                black_box(manager.acquire(&ids[n], 1, 1).is_ok());
            });
        }
        "governor" | "governor-refused" => {
            let limiter = if name == "governor" {
                common::governor_admitting(&ids)
            } else {
                common::governor_refusing(&ids)
            };
            measured(&ids, ops, |n| {
                black_box(limiter.check_key_n(&ids[n], NonZeroU32::MIN).is_ok());
            });
        }
        "acquire-settle" | "set-settle/1" | "set-settle/4" => {
            // The policies bench's `sets` group: keys of four 128-bit
            // limits, the precise clock.
            let all = common::agent_ids(agents * 4);
            let manager: BudgetManager = common::admitting(&all, Clocking::Precise);
            let keys: Vec<[Claim; 4]> = all.chunks(4).map(|l| claims(l, [100; 4])).collect();
            let limits = match name {
                "set-settle/4" => 4,
                _ => 1,
            };
            if name == "acquire-settle" {
                measured(&ids, ops, |n| {
                    let key = &keys[n][0].agent_id;
                    black_box(manager.acquire(key, 100, 1).map(|r| r.settle(60)).is_ok());
                });
            } else {
                measured(&ids, ops, |n| {
                    let set = &keys[n][..limits];
                    black_box(manager.acquire_set(set).map(|r| r.settle(60)).is_ok());
                });
            }
        }
        "set-reported-settle/3" => {
            // The gateway's shape: a key's minute and day windows (64-bit
            // cells) and a monthly spend (a calendar limit), each admission
            // reporting every limit's standing.
            let manager: Arc<BudgetManager> = Arc::new(common::manager(Clocking::Precise));
            let all = common::agent_ids(agents * 3);
            for key in all.chunks(3) {
                for (window_secs, &agent_id) in [60, 86_400].into_iter().zip(key) {
                    manager.set_budget(BudgetLimit {
                        agent_id,
                        token_budget: 1_000_000,
                        calls_budget: 1_000,
                        window_secs,
                    });
                }
                manager.set_calendar(CalendarLimit {
                    agent_id: key[2],
                    token_budget: 50_000_000,
                    calls_budget: agent_budget::MAX_CALLS,
                    period: CalendarPeriod::Month,
                });
            }
            let keys: Vec<[Claim; 3]> = all.chunks(3).map(|l| claims(l, [100, 100, 400])).collect();
            measured(&ids, ops, |n| {
                let mut left = 0;
                let taken = manager.acquire_set_owned_reporting(&keys[n], |_, info| {
                    left += info.tokens_remaining;
                });
                black_box(taken.map(|r| r.settle(60)).is_ok());
                black_box(left);
            });
        }
        _ => panic!("no row named {name}"),
    }
}

/// Claims of one call each on `limits`, with `tokens`.
fn claims<const N: usize>(limits: &[AgentId], tokens: [u64; N]) -> [Claim; N] {
    std::array::from_fn(|i| Claim {
        agent_id: limits[i],
        tokens: tokens[i],
        calls: 1,
    })
}

/// Options of the table.
struct Options {
    ops: usize,
    runs: usize,
    only: Option<String>,
    cache: bool,
}

fn options() -> Options {
    let mut o = Options {
        ops: 100_000,
        runs: 3,
        only: None,
        cache: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} takes a value"));
        match arg.as_str() {
            "--ops" => o.ops = value().parse().expect("--ops N"),
            "--runs" => o.runs = value().parse().expect("--runs N"),
            "--only" => o.only = Some(value()),
            "--cache" => o.cache = true,
            // What `cargo bench` passes to every bench target.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    o
}

/// A number from a valgrind tool's `summary:` / `events:` lines: the
/// event `event`'s total in the output file `path`.
fn total(path: &str, event: &str) -> u64 {
    let text = std::fs::read_to_string(path).expect("valgrind wrote its output");
    let events = text
        .lines()
        .find_map(|l| l.strip_prefix("events: "))
        .expect("an events line");
    let at = events
        .split_whitespace()
        .position(|e| e == event)
        .unwrap_or_else(|| panic!("no event {event}"));
    let totals = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("summary: ")
                .or_else(|| l.strip_prefix("totals: "))
        })
        .expect("a summary line");
    totals
        .split_whitespace()
        .nth(at)
        .and_then(|n| n.parse().ok())
        .expect("a count")
}

/// `event` per operation of `row` under valgrind's `tool` with `options`:
/// the difference between `2 * ops` and `ops` operations, divided by
/// `ops`.
fn per_operation(tool: &str, options: &[&str], event: &str, row: &Row, ops: usize) -> f64 {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let count = |n: usize| {
        let out = dir.path().join(format!("out.{n}"));
        let out = out.to_str().expect("a UTF-8 path").to_owned();
        let status = Command::new("valgrind")
            .arg(format!("--tool={tool}"))
            .args(options)
            .arg(format!("--{tool}-out-file={out}"))
            .arg(std::env::current_exe().expect("this binary"))
            .args(["--child", row.name, &row.agents.to_string(), &n.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("valgrind runs (benches/instructions.sh installs it)");
        assert!(status.success(), "{} under valgrind failed", row.name);
        total(&out, event)
    };
    let (once, twice) = (count(ops), count(2 * ops));
    twice.saturating_sub(once) as f64 / ops as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        let number = |i: usize| args[i].parse::<usize>().expect("a count");
        return child(&args[2], number(3), number(4));
    }
    let o = options();
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("valgrind is not installed: run benches/instructions.sh, which installs it");
        return;
    }
    // Only the measured loop is counted.
    let callgrind = ["--toggle-collect=*instructions::measured*"];
    let cachegrind = ["--cache-sim=yes", "--LL=4194304,16,64"];
    println!(
        "Instructions per operation (callgrind, the measured loop only, less the loop and its \
         random draw; median of {} processes, {} and {} operations each):\n",
        o.runs,
        o.ops,
        2 * o.ops
    );
    let header = if o.cache {
        "| operation | agents | instructions | last-level read misses (4 MiB, cachegrind) |\n|---|---|---|---|"
    } else {
        "| operation | agents | instructions |\n|---|---|---|"
    };
    println!("{header}");
    let count = |row: &Row| {
        common::median(
            (0..o.runs)
                .map(|_| per_operation("callgrind", &callgrind, "Ir", row, o.ops))
                .collect(),
        )
    };
    let floor = count(&ROWS[0]);
    for row in &ROWS[1..] {
        if o.only
            .as_deref()
            .is_some_and(|only| !row.name.contains(only))
        {
            continue;
        }
        let instructions = count(row) - floor;
        let mut line = format!("| {} | {} | {:.0} |", row.name, row.agents, instructions);
        if o.cache {
            let misses = if row.agents >= 100_000 {
                format!(
                    "{:.2}",
                    per_operation("cachegrind", &cachegrind, "DLmr", row, o.ops)
                )
            } else {
                String::new()
            };
            line.push_str(&format!(" {misses} |"));
        }
        println!("{line}");
    }
}
