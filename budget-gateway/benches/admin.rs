//! What the admin API costs and how fast it acts, measured three ways:
//!
//! ```text
//! cargo bench -p budget-gateway --bench admin -- identify
//! cargo bench -p budget-gateway --bench admin -- create [--agents 10000] [--clients 8] [--postgres]
//! cargo bench -p budget-gateway --bench admin -- revoke [--rounds 50]
//! ```
//!
//! - `identify`: the request path's one change, in process on one thread:
//!   telling the agent from its bearer key with the tower layer's
//!   `BearerKeys` (a `HashMap` of plaintext keys, what the gateway used
//!   before) and with the [`KeyTable`] (a lock-free map of SHA-256
//!   digests), the digest made every time or remembered by the thread, for
//!   10,000 keys in turn and for one key again and again, in rotated
//!   rounds; the median of the rounds' nanoseconds per lookup.
//! - `create`: the release binary with a SQLite database in a temporary
//!   folder (or, with `--postgres`, a database of its own on the machine's
//!   PostgreSQL), and `--agents` agents created through the API with a key
//!   each, by `--clients` concurrent clients: the wall time.
//! - `revoke`: two release binaries on one PostgreSQL database and one
//!   Redis (both the bench's own); a key made on the first, admitted by the
//!   second, then revoked on the first: the first's next request is
//!   checked, and the time until the second refuses it is measured
//!   (polled every 2 ms), `--rounds` times, the revocations spread over
//!   the second's poll cycle.

#[path = "../tests/common/postgres.rs"]
#[allow(dead_code)]
mod postgres;
#[path = "../tests/common/redis.rs"]
#[allow(dead_code)]
mod redis;

use std::hint::black_box;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_budget::AgentId;
use agent_budget_tower::BearerKeys;
use budget_gateway::keys::{self, KeyHash, KeyTable};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_budget-gateway");
const ADMIN_KEY: &str = "bench-admin-key";

struct Options {
    what: String,
    agents: usize,
    clients: usize,
    postgres: bool,
    rounds: usize,
}

fn options() -> Options {
    let mut o = Options {
        what: String::new(),
        agents: 10_000,
        clients: 8,
        postgres: false,
        rounds: 50,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--agents" => o.agents = value().parse().expect("--agents N"),
            "--clients" => o.clients = value().parse().expect("--clients N"),
            "--rounds" => o.rounds = value().parse().expect("--rounds N"),
            "--postgres" => o.postgres = true,
            "--bench" => {}
            "identify" | "create" | "revoke" => o.what = arg,
            other => panic!("unknown argument {other}"),
        }
    }
    o
}

fn main() {
    let o = options();
    match o.what.as_str() {
        "identify" => identify(),
        "create" => runtime().block_on(create(&o)),
        "revoke" => runtime().block_on(revoke(&o)),
        _ => {
            eprintln!("say which: identify, create or revoke (see the bench's docs)");
            identify();
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn identify() {
    const KEYS: usize = 10_000;
    const LOOKUPS: usize = 1_000_000;
    let secrets: Vec<String> = (0..KEYS)
        .map(|_| keys::generate().unwrap().secret)
        .collect();
    let agents: Vec<AgentId> = (0..KEYS).map(|_| uuid::Uuid::new_v4()).collect();
    let plain: BearerKeys = secrets
        .iter()
        .cloned()
        .zip(agents.iter().copied())
        .collect();
    let table = KeyTable::default();
    for (secret, agent) in secrets.iter().zip(&agents) {
        table.insert(KeyHash::of(secret), *agent, None);
    }
    // Every key in turn, in no cache-friendly order (more keys than a
    // thread remembers: every lookup hashes), and one client's key again
    // and again (what a thread remembers).
    let rotating: Vec<usize> = (0..LOOKUPS).map(|i| (i * 7_919) % KEYS).collect();
    let repeated: Vec<usize> = vec![KEYS / 2; LOOKUPS];
    #[derive(Clone, Copy)]
    enum How {
        Plaintext,
        Sha256EveryTime,
        Remembered,
    }
    let contenders = [
        ("BearerKeys (plaintext HashMap)", How::Plaintext),
        ("KeyTable, SHA-256 every time", How::Sha256EveryTime),
        ("KeyTable, digests remembered", How::Remembered),
    ];
    for (name, order) in [("10,000 keys in turn", &rotating), ("one key", &repeated)] {
        let mut ns: Vec<Vec<f64>> = vec![Vec::new(); contenders.len()];
        for round in 0..9 {
            for k in 0..contenders.len() {
                let which = (round + k) % contenders.len();
                let how = contenders[which].1;
                let start = Instant::now();
                for &i in order {
                    let key = black_box(secrets[i].as_str());
                    let found = match how {
                        How::Plaintext => plain.agent_of(key),
                        How::Sha256EveryTime => table.agent_of_hash(&KeyHash::of(key)),
                        How::Remembered => table.agent_of(key),
                    };
                    assert_eq!(found, Some(agents[i]));
                }
                ns[which].push(start.elapsed().as_nanos() as f64 / LOOKUPS as f64);
            }
        }
        println!(
            "identify, {name} of {KEYS}, one thread, median of 9 rotated rounds of {LOOKUPS} lookups:"
        );
        for ((label, _), ns) in contenders.iter().zip(ns) {
            println!("  {label:32} {:6.1} ns/lookup", median(ns));
        }
    }
}

/// A child process, killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Starts the release binary with `args` on a free port; waits (at most
/// 30 s) until it listens.
fn start(args: &[&str]) -> (Process, String) {
    let addr = free_addr();
    let child = Command::new(BIN)
        .args(["--listen", &addr.to_string()])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{addr} never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (Process(child), format!("http://{addr}"))
}

fn config(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, format!("admin_key = \"{ADMIN_KEY}\"\n")).unwrap();
    path.to_str().unwrap().to_owned()
}

async fn post(client: &reqwest::Client, url: String, body: Value) -> Value {
    let response = client
        .post(url)
        .bearer_auth(ADMIN_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::CREATED);
    response.json().await.unwrap()
}

async fn create(o: &Options) {
    let dir = tempfile::tempdir().unwrap();
    let pg = if o.postgres {
        Some(postgres::TestDb::create().await)
    } else {
        None
    };
    let db = match &pg {
        Some(pg) => pg.url(),
        None => dir.path().join("gateway.db").to_str().unwrap().to_owned(),
    };
    let config = config(&dir);
    let (_gateway, base) = start(&[
        "--config",
        &config,
        "--upstream",
        "http://127.0.0.1:9",
        "--db",
        &db,
    ]);
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let clients: Vec<_> = (0..o.clients)
        .map(|_| {
            let (client, base, next, total) =
                (client.clone(), base.clone(), next.clone(), o.agents);
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    let agent = post(
                        &client,
                        format!("{base}/v1/agents"),
                        json!({"limits": [{"window": "1m", "requests": 100, "tokens": 100000}]}),
                    )
                    .await;
                    let id = agent["agent_id"].as_str().unwrap();
                    post(&client, format!("{base}/v1/agents/{id}/keys"), json!({})).await;
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let took = started.elapsed();
    let listed: Value = client
        .get(format!("{base}/v1/agents"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), o.agents);
    println!(
        "created {} agents with a key each on {} with {} clients in {:.2} s ({:.0} agents/s)",
        o.agents,
        if o.postgres { "PostgreSQL" } else { "SQLite" },
        o.clients,
        took.as_secs_f64(),
        o.agents as f64 / took.as_secs_f64()
    );
}

async fn revoke(o: &Options) {
    let redis = redis::RedisServer::start();
    let pg = postgres::TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir);
    let (_mock, upstream) = start(&["--mock-upstream"]);
    let db = pg.url();
    let fleet = ["--config", &config, "--upstream", &upstream, "--db", &db];
    let redis_url = redis.url();
    let (_a, a) = start(&[&fleet[..], &["--redis", &redis_url]].concat());
    let (_b, b) = start(&[&fleet[..], &["--redis", &redis_url]].concat());
    let client = reqwest::Client::new();
    let chat = |base: &str, key: &str| {
        client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
            .send()
    };
    let agent = post(
        &client,
        format!("{a}/v1/agents"),
        json!({"limits": [{"window": "1m", "requests": 1000000, "tokens": 1000000000}]}),
    )
    .await;
    let id = agent["agent_id"].as_str().unwrap().to_owned();
    let mut latencies = Vec::with_capacity(o.rounds);
    for round in 0..o.rounds {
        let key = post(&client, format!("{a}/v1/agents/{id}/keys"), json!({})).await;
        let (key_id, secret) = (
            key["key_id"].as_str().unwrap(),
            key["api_key"].as_str().unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while chat(&b, secret).await.unwrap().status() != reqwest::StatusCode::OK {
            assert!(Instant::now() < deadline, "B never admitted the key");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // B just polled (it has the key): revoke at a spread of moments
        // in its 250 ms poll cycle, not always right after a poll.
        tokio::time::sleep(Duration::from_millis((round as u64 * 97) % 250)).await;
        let revoked = client
            .delete(format!("{a}/v1/agents/{id}/keys/{key_id}"))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(revoked.status(), reqwest::StatusCode::NO_CONTENT);
        let at = Instant::now();
        assert_eq!(
            chat(&a, secret).await.unwrap().status(),
            reqwest::StatusCode::UNAUTHORIZED,
            "A's next request"
        );
        while chat(&b, secret).await.unwrap().status() != reqwest::StatusCode::UNAUTHORIZED {
            assert!(
                at.elapsed() < Duration::from_secs(5),
                "B never refused the key"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        latencies.push(at.elapsed().as_secs_f64() * 1_000.0);
    }
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    println!(
        "revoked on A: refused by A's next request {} times of {}; refused by B after \
         median {:.0} ms, p90 {:.0} ms, max {:.0} ms (min {:.0} ms)",
        o.rounds,
        o.rounds,
        at(0.5),
        at(0.9),
        at(1.0),
        at(0.0)
    );
}
