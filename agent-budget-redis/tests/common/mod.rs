//! Helpers for the tests against real Redis servers.
#![allow(dead_code)] // each test crate uses its own subset

pub mod faulty;

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_budget::{AgentId, BudgetLimit};
use agent_budget_redis::{
    Amount, Denied, FailMode, FakeClock, FleetConfig, FleetManager, LeasePolicy, Timeline,
};

/// A `redis-server` of the test's own, on a free loopback port, with no
/// persistence; killed when dropped, so a failing test leaves no server.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one and waits until it answers.
    pub fn start() -> Self {
        let port = free_port();
        let mut server = RedisServer { port, child: None };
        server.launch();
        server
    }

    /// `redis://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start `redis-server` ({e}): these tests need it on PATH \
                     (Debian: apt-get install redis-server; `.ci/run` installs it)"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "redis-server on port {} did not answer within 10 s",
            self.port
        );
    }

    fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
            return false;
        };
        redis::cmd("PING").query::<String>(&mut conn).is_ok()
    }

    /// Kills the server: its data is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The port is free once nothing answers on it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts a fresh, empty server on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// A plain connection, for the test's own reads of the truth.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("connect to the test's redis-server")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    listener.local_addr().expect("local address").port()
}

/// A budget of `tokens` and `calls` per window of `window_secs`.
pub fn budget(agent: AgentId, tokens: u64, calls: u64, window_secs: u64) -> BudgetLimit {
    BudgetLimit {
        agent_id: agent,
        token_budget: tokens,
        calls_budget: calls,
        window_secs,
    }
}

/// A fresh agent id.
pub fn agent() -> AgentId {
    uuid::Uuid::new_v4()
}

/// A node's configuration for tests: fast heartbeats, a short grace, and
/// (with `clock`) windows and idleness on a fake clock shared by the fleet.
pub fn config(server: &RedisServer, node: &str, clock: Option<&FakeClock>) -> FleetConfig {
    let mut config = FleetConfig::new(server.url());
    config.node_id = node.to_owned();
    config.heartbeat = Duration::from_millis(10);
    config.idle_after = Duration::from_millis(500);
    config.recovery_grace = Duration::from_millis(200);
    config.timeout = Duration::from_millis(200);
    config.lease = LeasePolicy {
        fraction: 0.01,
        low_water: 0.5,
    };
    if let Some(clock) = clock {
        config.timeline = Timeline::Shared(Arc::new(clock.clone()));
        config.clock = Arc::new(clock.clone());
    }
    config
}

/// A node with `config`, connected.
pub async fn node(config: FleetConfig) -> FleetManager {
    FleetManager::connect(config).await.expect("connect a node")
}

/// Fail-open with this allowance.
pub fn fail_open(mut config: FleetConfig, allowance: f64) -> FleetConfig {
    config.fail_mode = FailMode::Open { allowance };
    config
}

/// Polls `check` every 5 ms until it holds or `within` passes; the
/// message says what never happened.
pub async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{what}: not within {within:?}");
}

/// The same with an async check.
pub async fn eventually_async<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{what}: not within {within:?}");
}

/// Whether a denial is the budget's refusal.
pub fn is_refused(denied: &Denied) -> bool {
    matches!(denied, Denied::Refused(_))
}

/// The key of `agent`'s record for the window of `window_secs` holding
/// `now_ms`, under the default prefix.
pub fn window_key(agent: &AgentId, window_secs: u64, now_ms: u64) -> String {
    let length = window_secs * 1_000;
    format!("agent-budget:w:{agent}:{length}:{}", now_ms / length)
}

fn read_pair(conn: &mut redis::Connection, key: &str, t: &str, c: &str) -> Amount {
    let (t, c): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
        .arg(key)
        .arg(t)
        .arg(c)
        .query(conn)
        .expect("read the window's record");
    Amount::new(t.unwrap_or(0), c.unwrap_or(0))
}

/// What the fleet has taken in a window, as Redis says.
pub fn taken(conn: &mut redis::Connection, key: &str) -> Amount {
    read_pair(conn, key, "t", "c")
}

/// What one node has taken in a window, as Redis says.
pub fn taken_by(conn: &mut redis::Connection, key: &str, node: &str) -> Amount {
    read_pair(conn, key, &format!("n:{node}:t"), &format!("n:{node}:c"))
}

/// What a node's local cell says: (granted in the window, consumed plus
/// given back, left).
pub fn local(node: &FleetManager, agent: &AgentId) -> (Amount, Amount, Amount) {
    let info = node
        .local()
        .full_info(agent)
        .expect("the node knows the agent");
    (
        Amount::new(info.token_limit, info.calls_limit),
        Amount::new(info.tokens_used, info.calls_used),
        Amount::new(info.tokens_remaining, info.calls_remaining),
    )
}

/// `n` nodes named `node-0`... on `server`, sharing `clock` if given.
pub async fn nodes(
    server: &RedisServer,
    clock: Option<&FakeClock>,
    n: usize,
) -> Vec<Arc<FleetManager>> {
    let mut nodes = Vec::new();
    for i in 0..n {
        nodes.push(Arc::new(
            node(config(server, &format!("node-{i}"), clock)).await,
        ));
    }
    nodes
}

/// Waits until every node knows `agent`'s budget.
pub async fn known_everywhere(nodes: &[Arc<FleetManager>], agent: AgentId) {
    for node in nodes {
        let node = node.clone();
        eventually(
            Duration::from_secs(5),
            "every node knows the budget",
            move || node.budget(&agent).is_some(),
        )
        .await;
    }
}

/// A fake fleet clock at the start of a 60 s window (so the fleet record,
/// made now, fences nothing).
pub fn window_start_clock() -> FakeClock {
    FakeClock::new(60_000 * 1_000)
}
