//! One measured run: a manager, N worker threads, a fixed duration.
//!
//! Each worker cycles through its pre-drawn [`Request`]s, timing every
//! `acquire` + `settle` (or refused `acquire`) with two raw reads of
//! quanta's clock into its own HDR histogram; the histograms are merged
//! when the run ends, so recording costs no shared writes.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use agent_budget::{AgentId, BudgetLimiter, BudgetManager, LockedBudgetManager};
use hdrhistogram::Histogram;

use crate::cli::{ManagerKind, SimConfig};
use crate::workload::{self, Request};

/// Requests between two looks at the stop flag and progress updates.
const BATCH: usize = 64;
/// Latencies above this (nanoseconds) are recorded as this.
const MAX_LATENCY_NS: u64 = 10_000_000_000;
/// How often the progress line is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// What one run measured.
pub struct RunResult {
    /// The manager that ran.
    pub manager: ManagerKind,
    /// Worker threads.
    pub threads: usize,
    /// Wall time from the start signal until every worker stopped.
    pub elapsed: Duration,
    /// Requests admitted (and then settled).
    pub admitted: u64,
    /// Requests refused.
    pub refused: u64,
    /// Nanoseconds per acquire + settle, or per refused acquire.
    pub latency: Histogram<u64>,
}

impl RunResult {
    /// Requests handled, admitted or refused.
    pub fn ops(&self) -> u64 {
        self.admitted + self.refused
    }

    /// Requests handled per second, over all threads.
    pub fn ops_per_sec(&self) -> f64 {
        self.ops() as f64 / self.elapsed.as_secs_f64()
    }

    /// Share of the requests refused, in percent.
    pub fn refused_percent(&self) -> f64 {
        100.0 * self.refused as f64 / self.ops().max(1) as f64
    }
}

/// Runs the workload on `manager` with `threads` workers for the agents
/// `ids`, each given its budget first.
pub fn run(manager: ManagerKind, threads: usize, config: &SimConfig, ids: &[AgentId]) -> RunResult {
    match manager {
        ManagerKind::LockFree => run_on::<BudgetManager>(manager, threads, config, ids),
        ManagerKind::Locked => run_on::<LockedBudgetManager>(manager, threads, config, ids),
    }
}

/// A worker's running count of requests, alone on its cache line so the
/// progress reader does not slow the workers.
#[repr(align(128))]
#[derive(Default)]
struct Counter(AtomicU64);

/// One worker's results.
struct Tally {
    admitted: u64,
    refused: u64,
    latency: Histogram<u64>,
}

fn run_on<M: BudgetLimiter>(
    kind: ManagerKind,
    threads: usize,
    config: &SimConfig,
    ids: &[AgentId],
) -> RunResult {
    let manager = if config.precise_clock {
        M::with_clock(quanta::Clock::new())
    } else {
        M::with_coarse_clock(quanta::Clock::new(), Duration::from_millis(1))
            .expect("quanta's upkeep thread starts")
    };
    for &id in ids {
        manager.set_budget(workload::budget(id));
    }
    let buffers: Vec<Vec<Request>> = (0..threads)
        .map(|t| workload::requests(ids.len(), config.skew, t as u64 + 1))
        .collect();
    let counters: Vec<Counter> = (0..threads).map(|_| Counter::default()).collect();
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(threads + 1);
    let clock = quanta::Clock::new();

    std::thread::scope(|scope| {
        let workers: Vec<_> = buffers
            .iter()
            .zip(&counters)
            .map(|(requests, counter)| {
                let (manager, stop, barrier, clock) = (&manager, &stop, &barrier, clock.clone());
                scope.spawn(move || {
                    barrier.wait();
                    work(manager, ids, requests, counter, stop, &clock)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        watch(kind, threads, config.duration, start, &counters);
        stop.store(true, Ordering::Relaxed);
        let tallies: Vec<Tally> = workers
            .into_iter()
            .map(|worker| worker.join().expect("a worker panicked"))
            .collect();
        let elapsed = start.elapsed();
        let mut result = RunResult {
            manager: kind,
            threads,
            elapsed,
            admitted: 0,
            refused: 0,
            latency: new_histogram(),
        };
        for tally in tallies {
            result.admitted += tally.admitted;
            result.refused += tally.refused;
            result
                .latency
                .add(&tally.latency)
                .expect("histograms share their bounds");
        }
        result
    })
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("valid histogram bounds")
}

/// A worker: acquire, then settle at the actual amount, until told to stop.
fn work<M: BudgetLimiter>(
    manager: &M,
    ids: &[AgentId],
    requests: &[Request],
    counter: &Counter,
    stop: &AtomicBool,
    clock: &quanta::Clock,
) -> Tally {
    debug_assert!(requests.len().is_power_of_two());
    let mask = requests.len() - 1;
    let mut tally = Tally {
        admitted: 0,
        refused: 0,
        latency: new_histogram(),
    };
    let mut next = 0;
    // Relaxed: the flag carries no data; the join publishes the tallies.
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..BATCH {
            let request = requests[next & mask];
            next += 1;
            let agent = &ids[request.agent as usize];
            let started = clock.raw();
            // The refusal's error is dropped inside the timed region too.
            let admitted = manager
                .acquire(agent, request.estimate.into(), 1)
                .map(|reservation| reservation.settle(request.actual.into()))
                .is_ok();
            let took = clock.delta_as_nanos(started, clock.raw());
            tally.latency.saturating_record(took.max(1));
            if admitted {
                tally.admitted += 1;
            } else {
                tally.refused += 1;
            }
        }
        counter
            .0
            .store(tally.admitted + tally.refused, Ordering::Relaxed);
    }
    tally
}

/// Waits out the run, redrawing a progress line on stderr if it is a
/// terminal, and erases it at the end.
fn watch(
    kind: ManagerKind,
    threads: usize,
    duration: Duration,
    start: Instant,
    counters: &[Counter],
) {
    let show = std::io::stderr().is_terminal();
    let mut stderr = std::io::stderr().lock();
    loop {
        let elapsed = start.elapsed();
        if elapsed >= duration {
            break;
        }
        std::thread::sleep(PROGRESS_EVERY.min(duration - elapsed));
        if show {
            let ops: u64 = counters.iter().map(|c| c.0.load(Ordering::Relaxed)).sum();
            let secs = start.elapsed().as_secs_f64();
            // Progress is best effort: a closed stderr is not an error.
            let _ = write!(
                stderr,
                "\r{:>9}, {threads:>3} threads: {secs:>5.1} / {:.1} s, {:>12} ops/s ",
                kind.name(),
                duration.as_secs_f64(),
                crate::report::rate(ops as f64 / secs),
            );
            let _ = stderr.flush();
        }
    }
    if show {
        let _ = write!(stderr, "\r{:70}\r", "");
        let _ = stderr.flush();
    }
}
