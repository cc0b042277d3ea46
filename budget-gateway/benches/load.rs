//! Load and overhead of the gateway, on loopback: the same proxy with the
//! budget layer, with nothing (a plain proxy) and with `tower_governor` in
//! its place, side by side in one run; then 64 clients on one key against
//! a budget, checked against the upstream's own count.
//!
//! ```text
//! cargo bench -p budget-gateway --bench load                  # 5 rounds of 2 s per variant and concurrency
//! cargo bench -p budget-gateway --bench load -- --seconds 1 --rounds 2
//! cargo bench -p budget-gateway --bench load -- --variants budget,limits
//! ```
//!
//! `--variants` picks some of `none`, `budget`, `governor` (the default
//! three) and `limits` (the load key under two windows and a spend limit
//! in a calendar month, as `benches/instructions.rs` counts it: issue 17's
//! comparison with `budget`). Besides throughput and latency, each
//! variant's gateway process is charged its CPU time (user and system,
//! from `/proc/PID/stat`, the kernel's share included, which instruction
//! counts leave out) per request served.
//!
//! It starts the mock upstream and the three gateways as processes of the
//! release binary, and drives them with a load generator written with
//! hyper: each connection sends a chat completion (a 35-token prompt,
//! `max_tokens` 16), waits for the whole response, and sends the next (a
//! closed loop). Rounds rotate the order of the variants, so drift in a
//! shared machine's speed hits all three alike; each variant's latencies
//! from all rounds go into one histogram.

#[path = "support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use support::{
    chat_completion, connect, free_addr, gateway_args, start, start_mock, variant_name,
    write_config, write_limits_config, LOAD_KEY, VARIANTS,
};

const EXACT_KEY: &str = "sk-exact";
const EXACT_AGENT: &str = "0b3c9a30-4f2e-4b8a-9d41-6c0e2f7a1b55";
const EXACT_CALLS: u64 = 5_000;

struct Options {
    seconds: u64,
    rounds: usize,
    concurrency: Vec<usize>,
    variants: Vec<String>,
}

fn options() -> Options {
    let mut o = Options {
        seconds: 2,
        rounds: 5,
        concurrency: vec![1, 32],
        variants: VARIANTS.map(str::to_owned).to_vec(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--seconds" => o.seconds = value().parse().expect("--seconds N"),
            "--rounds" => o.rounds = value().parse().expect("--rounds N"),
            "--concurrency" => {
                o.concurrency = value()
                    .split(',')
                    .map(|c| c.parse().expect("--concurrency 1,32"))
                    .collect()
            }
            "--variants" => o.variants = value().split(',').map(str::to_owned).collect(),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        !o.variants.is_empty()
            && o.variants
                .iter()
                .all(|v| VARIANTS.contains(&v.as_str()) || v == "limits"),
        "--variants takes some of none,budget,governor,limits"
    );
    o
}

/// CPU time (user and system, all threads) the process `pid` has used, in
/// clock ticks of `/proc` (`CLK_TCK`, 100 a second on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // The fields after the command's closing parenthesis: state is field
    // 3, utime and stime fields 14 and 15.
    let after = &stat[stat.rfind(')').expect("a command in parentheses") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| fields[n - 3].parse::<u64>().expect("a tick count");
    field(14) + field(15)
}

/// Microseconds a clock tick of `/proc` lasts.
const MICROS_PER_TICK: f64 = 10_000.0;

/// One connection's closed loop until `until`: latencies in nanoseconds,
/// and the count of each status.
async fn connection(
    addr: SocketAddr,
    key: &'static str,
    until: Instant,
    max_requests: u64,
) -> (Histogram<u64>, u64, u64) {
    let mut hist = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3).unwrap();
    let mut sender = connect(addr).await;
    let (mut ok, mut refused, mut sent) = (0, 0, 0);
    while Instant::now() < until && sent < max_requests {
        let started = Instant::now();
        let status = chat_completion(&mut sender, addr, key).await;
        let _ = hist.record(started.elapsed().as_nanos() as u64);
        sent += 1;
        match status.as_u16() {
            200 => ok += 1,
            429 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    (hist, ok, refused)
}

async fn load(addr: SocketAddr, connections: usize, seconds: u64) -> (Histogram<u64>, u64) {
    let until = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(connection(addr, LOAD_KEY, until, u64::MAX)))
        .collect();
    let mut all = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3).unwrap();
    let mut ok = 0;
    for t in tasks {
        let (h, o, refused) = t.await.unwrap();
        assert_eq!(refused, 0, "the load key's budget is too large to refuse");
        all.add(h).unwrap();
        ok += o;
    }
    (all, ok)
}

async fn get_json(addr: SocketAddr, path: &str, key: Option<&str>) -> Value {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut request =
        http::Request::get(format!("http://{addr}{path}")).header("host", addr.to_string());
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

fn micros(ns: u64) -> String {
    format!("{:.1} µs", ns as f64 / 1_000.0)
}

fn main() {
    let o = options();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            r#"
[[agents]]
api_key = "{EXACT_KEY}"
agent_id = "{EXACT_AGENT}"
token_budget = 1000000000000000
calls_budget = {EXACT_CALLS}
window_secs = 86400
"#
        ),
    );
    let limits_config = write_limits_config(dir.path(), "1mo");
    let (_mock, mock_addr) = start_mock();
    let variants = &o.variants;
    let gateways: Vec<(SocketAddr, support::Process)> = variants
        .iter()
        .map(|variant| {
            let addr = free_addr();
            let args = match variant.as_str() {
                "limits" => gateway_args(&limits_config, addr, mock_addr, "budget"),
                limiter => gateway_args(&config, addr, mock_addr, limiter),
            };
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            (addr, start(&args, addr))
        })
        .collect();

    println!(
        "machine: {} cores; {} s per variant per round, {} rounds, order rotated each round",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        o.seconds,
        o.rounds
    );
    runtime.block_on(async {
        for (addr, _) in &gateways {
            load(*addr, 4, 1).await; // warm up: pools, caches, the tokenizer
        }
        for &connections in &o.concurrency {
            let mut hists: Vec<Histogram<u64>> = (0..variants.len())
                .map(|_| Histogram::new_with_bounds(1_000, 60_000_000_000, 3).unwrap())
                .collect();
            let mut counts = vec![0u64; variants.len()];
            // Each round's p50 and p99, per variant: a shared machine's
            // slow patches move whole rounds, and the median of the rounds
            // shrugs them off where one merged histogram would not.
            let mut per_round = vec![Vec::new(); variants.len()];
            // Each round's CPU time of the gateway, per request, in ns.
            let mut cpu = vec![Vec::new(); variants.len()];
            for round in 0..o.rounds {
                for k in 0..variants.len() {
                    let v = (round + k) % variants.len();
                    let pid = gateways[v].1 .0.id();
                    let ticks = cpu_ticks(pid);
                    let (h, ok) = load(gateways[v].0, connections, o.seconds).await;
                    let used = (cpu_ticks(pid) - ticks) as f64 * MICROS_PER_TICK;
                    cpu[v].push((used * 1_000.0 / ok.max(1) as f64) as u64);
                    per_round[v].push((h.value_at_quantile(0.5), h.value_at_quantile(0.99), ok));
                    hists[v].add(h).unwrap();
                    counts[v] += ok;
                }
            }
            let median = |v: usize, pick: fn(&(u64, u64, u64)) -> u64| {
                let mut xs: Vec<u64> = per_round[v].iter().map(pick).collect();
                xs.sort_unstable();
                xs[xs.len() / 2]
            };
            let median_cpu = |v: usize| {
                let mut xs = cpu[v].clone();
                xs.sort_unstable();
                xs[xs.len() / 2]
            };
            let first = variant_name(&variants[0]);
            println!("\n{connections} connection(s); p50, p99, requests/s and CPU per request are medians of the rounds, p99.9 over all; compared with {first}:\n");
            println!("| variant | requests/s | p50 | p99 | p99.9 | gateway CPU per request | p50 vs first | p99 vs first | CPU vs first |");
            println!("|---|---|---|---|---|---|---|---|---|");
            let (base50, base99) = (median(0, |r| r.0), median(0, |r| r.1));
            let base_cpu = median_cpu(0);
            for (v, variant) in variants.iter().enumerate() {
                let rate = median(v, |r| r.2) as f64 / o.seconds as f64;
                let (p50, p99) = (median(v, |r| r.0), median(v, |r| r.1));
                println!(
                    "| {} | {rate:.0} | {} | {} | {} | {} | {:+.1} µs | {:+.1}% | {:+.1}% |",
                    variant_name(variant),
                    micros(p50),
                    micros(p99),
                    micros(hists[v].value_at_quantile(0.999)),
                    micros(median_cpu(v)),
                    (p50 as f64 - base50 as f64) / 1_000.0,
                    (p99 as f64 / base99 as f64 - 1.0) * 100.0,
                    (median_cpu(v) as f64 / base_cpu as f64 - 1.0) * 100.0
                );
            }
            let total: u64 = counts.iter().sum();
            println!("({total} requests in all)");
        }

        // 64 clients on one key, against the budget layer.
        let Some(budget) = variants.iter().position(|v| v == "budget") else {
            return;
        };
        let budget_addr = gateways[budget].0;
        let before = get_json(mock_addr, "/mock/stats", None).await;
        let until = Instant::now() + Duration::from_secs(60);
        // Each client stops after a bounded number of requests: together
        // they ask for twice the budget.
        let per_client = EXACT_CALLS * 2 / 64 + 1;
        let tasks: Vec<_> = (0..64)
            .map(|_| tokio::spawn(connection(budget_addr, EXACT_KEY, until, per_client)))
            .collect();
        let (mut admitted, mut refused) = (0, 0);
        for t in tasks {
            let (_, ok, no) = t.await.unwrap();
            admitted += ok;
            refused += no;
        }
        let after = get_json(mock_addr, "/mock/stats", None).await;
        let upstream_calls = after["calls"].as_u64().unwrap() - before["calls"].as_u64().unwrap();
        let upstream_tokens =
            after["total_tokens"].as_u64().unwrap() - before["total_tokens"].as_u64().unwrap();
        let info = get_json(budget_addr, &format!("/v1/budgets/{EXACT_AGENT}"), Some("admin")).await;
        println!(
            "\n64 clients on one key, calls budget {EXACT_CALLS}: {admitted} admitted, {refused} refused; \
             the upstream served {upstream_calls} calls and reported {upstream_tokens} tokens; \
             the gateway charged {} calls and {} tokens",
            info["calls_used"], info["tokens_used"]
        );
        let exact = admitted == EXACT_CALLS
            && upstream_calls == EXACT_CALLS
            && info["calls_used"] == EXACT_CALLS
            && info["tokens_used"] == upstream_tokens;
        println!("exact: {exact}");
        assert!(exact, "the budget was not enforced exactly");
    });
}
