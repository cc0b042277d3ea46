//! The fleet under network faults between its nodes and Redis: slow
//! links, a node partitioned away (fail-closed and fail-open), and links
//! that keep dropping their connections. Each node talks to Redis through
//! a proxy of its own (`common::faulty`), so one node can be cut off while
//! the others go on.
//!
//! In every case: at no moment does the fleet admit more than Redis says
//! it took, nor Redis grant more than the budget (fail-open: more than the
//! allowance it was configured to risk); the fail mode is the one
//! configured; and once the links heal, the books agree again and the
//! whole budget can be admitted, exactly.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_budget_redis::{Denied, FakeClock, FleetClock, FleetConfig, FleetManager};
use common::faulty::{Fault, FaultyLink};
use common::*;

const TOKENS: u64 = 4_000;
const PER_REQUEST: u64 = 10;

/// Three nodes on one fake clock, each behind a link of its own; the
/// budget set and known everywhere.
struct Fleet {
    server: RedisServer,
    clock: FakeClock,
    links: Vec<FaultyLink>,
    nodes: Vec<Arc<FleetManager>>,
    /// Tokens admitted on each node (each request settles what it took).
    consumed: Arc<[AtomicU64; 3]>,
    agent: uuid::Uuid,
    key: String,
}

async fn fleet(configure: impl Fn(usize, FleetConfig) -> FleetConfig) -> Fleet {
    let server = RedisServer::start();
    let clock = window_start_clock();
    let mut links = Vec::new();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let link = FaultyLink::start(&server.url()).await;
        let mut config = config(&server, &format!("node-{i}"), Some(&clock));
        config.url = link.url();
        nodes.push(Arc::new(node(configure(i, config)).await));
        links.push(link);
    }
    let agent = agent();
    nodes[0]
        .set_budget(budget(agent, TOKENS, 1_000_000, 60))
        .await
        .expect("set the budget");
    known_everywhere(&nodes, agent).await;
    let key = window_key(&agent, 60, clock.now_ms());
    Fleet {
        server,
        clock,
        links,
        nodes,
        consumed: Arc::default(),
        agent,
        key,
    }
}

/// What one worker did: the tokens it admitted, and the denials it met.
#[derive(Debug, Default)]
struct Tally {
    admitted: u64,
    refused: u64,
    unavailable: u64,
}

impl Fleet {
    /// Requests on every node (two workers each) until each worker is
    /// refused or has made `requests` requests, while a watcher checks at
    /// every moment that what was admitted is within what Redis says the
    /// fleet took, plus `slack` (fail-open's allowance), and that Redis
    /// never grants past the budget plus `slack`. Returns each node's tally.
    async fn race(&self, requests: usize, slack: u64, admitted: &Arc<AtomicU64>) -> Vec<Tally> {
        let racing = Arc::new(AtomicBool::new(true));
        let watcher = {
            let (admitted, racing, key) = (admitted.clone(), racing.clone(), self.key.clone());
            let mut conn = self.server.connection();
            tokio::task::spawn_blocking(move || {
                let mut looks = 0u64;
                while racing.load(Ordering::SeqCst) && looks < 1_000_000 {
                    let seen = admitted.load(Ordering::SeqCst);
                    let fleet = taken(&mut conn, &key);
                    assert!(
                        fleet.tokens <= TOKENS + slack,
                        "Redis has {} taken > {TOKENS} + {slack}",
                        fleet.tokens
                    );
                    assert!(
                        seen <= fleet.tokens + slack,
                        "admitted {seen} > taken {} + {slack}",
                        fleet.tokens
                    );
                    looks += 1;
                }
            })
        };
        let mut workers = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            for _ in 0..2 {
                let (node, admitted, agent) = (node.clone(), admitted.clone(), self.agent);
                let consumed = self.consumed.clone();
                workers.push(tokio::spawn(async move {
                    let mut tally = Tally::default();
                    for _ in 0..requests {
                        match node.acquire(&agent, PER_REQUEST, 1).await {
                            Ok(reservation) => {
                                admitted.fetch_add(PER_REQUEST, Ordering::SeqCst);
                                consumed[i].fetch_add(PER_REQUEST, Ordering::SeqCst);
                                tally.admitted += PER_REQUEST;
                                reservation.settle(PER_REQUEST);
                            }
                            Err(Denied::Refused(_)) => {
                                tally.refused += 1;
                                break;
                            }
                            Err(Denied::Unavailable { .. }) => tally.unavailable += 1,
                        }
                    }
                    (i, tally)
                }));
            }
        }
        let mut tallies: Vec<Tally> = (0..3).map(|_| Tally::default()).collect();
        for worker in workers {
            let (i, tally) = worker.await.expect("worker");
            tallies[i].admitted += tally.admitted;
            tallies[i].refused += tally.refused;
            tallies[i].unavailable += tally.unavailable;
        }
        racing.store(false, Ordering::SeqCst);
        watcher.await.expect("the watcher saw no over-admission");
        tallies
    }

    /// One request on node 0, which takes its first lease; returns the
    /// lease.
    async fn first_lease(&self) -> u64 {
        self.nodes[0]
            .acquire(&self.agent, PER_REQUEST, 1)
            .await
            .expect("fits")
            .settle(PER_REQUEST);
        self.consumed[0].fetch_add(PER_REQUEST, Ordering::SeqCst);
        local(&self.nodes[0], &self.agent).0.tokens
    }

    /// Heals every link and waits until every node is connected again and
    /// Redis's record of each node is what the node holds: what it
    /// consumed plus its unused lease. Every lost reply repaired.
    async fn heal(&self) {
        for link in &self.links {
            link.set(Fault::Pass);
        }
        eventually(Duration::from_secs(10), "every node reconnects", || {
            self.nodes.iter().all(|n| n.is_connected())
        })
        .await;
        self.books_agree().await;
    }

    async fn books_agree(&self) {
        let mut conn = self.server.connection();
        eventually(
            Duration::from_secs(10),
            "Redis's books agree with every node's",
            || {
                self.nodes.iter().enumerate().all(|(i, n)| {
                    let holds =
                        self.consumed[i].load(Ordering::SeqCst) + local(n, &self.agent).2.tokens;
                    taken_by(&mut conn, &self.key, n.node_id()).tokens == holds
                })
            },
        )
        .await;
    }

    /// Drains the fleet until no node can admit anything: rounds of each
    /// node in turn until refused, with a second of the fleet's (fake)
    /// time between rounds, in which idle nodes give their unused leases
    /// back for the others to take. Returns what was admitted.
    async fn drain_all(&self, admitted: &Arc<AtomicU64>) -> u64 {
        let before = admitted.load(Ordering::SeqCst);
        for _round in 0..10 {
            let mut progress = 0;
            for (i, node) in self.nodes.iter().enumerate() {
                for _ in 0..=TOKENS / PER_REQUEST {
                    match node.acquire(&self.agent, PER_REQUEST, 1).await {
                        Ok(reservation) => {
                            admitted.fetch_add(PER_REQUEST, Ordering::SeqCst);
                            self.consumed[i].fetch_add(PER_REQUEST, Ordering::SeqCst);
                            progress += PER_REQUEST;
                            reservation.settle(PER_REQUEST);
                        }
                        Err(Denied::Refused(_)) => break,
                        Err(other) => panic!("healed, yet {other}"),
                    }
                }
            }
            let held: u64 = self
                .nodes
                .iter()
                .map(|n| local(n, &self.agent).2.tokens)
                .sum();
            if progress == 0 && held == 0 {
                break;
            }
            self.clock.advance(Duration::from_secs(1));
            self.books_agree().await;
        }
        admitted.load(Ordering::SeqCst) - before
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_links_never_let_the_fleet_admit_more_than_its_budget() {
    let f = fleet(|_, config| config).await;
    // One fast link, one slow, one slower than the nodes' timeout (200 ms):
    // its every reply is lost, and its node must assume it got nothing.
    f.links[0].set(Fault::Delay(Duration::from_millis(2)));
    f.links[1].set(Fault::Delay(Duration::from_millis(60)));
    f.links[2].set(Fault::Delay(Duration::from_millis(260)));
    let admitted = Arc::new(AtomicU64::new(0));
    let tallies = f.race(150, 0, &admitted).await;
    assert!(tallies[2].unavailable > 0, "{tallies:?}");
    f.heal().await;
    f.drain_all(&admitted).await;
    assert_eq!(
        admitted.load(Ordering::SeqCst),
        TOKENS,
        "the budget, exactly once"
    );
    assert_eq!(taken(&mut f.server.connection(), &f.key).tokens, TOKENS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_fails_closed_while_the_others_take_the_rest() {
    let f = fleet(|_, config| config).await;
    // Node 0 holds a lease, then loses Redis: what it sends is held, and
    // delivered when the partition heals.
    let lease = f.first_lease().await;
    f.links[0].set(Fault::Partition);
    let admitted = Arc::new(AtomicU64::new(PER_REQUEST));
    let tallies = f.race(TOKENS as usize / 10, 0, &admitted).await;
    assert!(
        tallies[0].admitted <= lease,
        "node 0 admitted {} beyond its lease of {lease}",
        tallies[0].admitted
    );
    assert!(tallies[0].unavailable > 0, "fail-closed: {tallies:?}");
    assert_eq!(tallies[0].refused, 0, "it could not know: {tallies:?}");
    assert!(
        tallies[1].refused > 0 && tallies[2].refused > 0,
        "{tallies:?}"
    );
    f.heal().await;
    f.drain_all(&admitted).await;
    assert_eq!(admitted.load(Ordering::SeqCst), TOKENS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_fails_open_within_its_allowance_and_is_charged_after() {
    // Node 0 may admit 5% of the budget on its own authority.
    let allowance = TOKENS / 20;
    let f = fleet(|i, config| {
        if i == 0 {
            fail_open(config, 0.05)
        } else {
            config
        }
    })
    .await;
    let lease = f.first_lease().await;
    f.links[0].set(Fault::Partition);
    let admitted = Arc::new(AtomicU64::new(PER_REQUEST));
    let tallies = f.race(TOKENS as usize / 10, allowance, &admitted).await;
    assert!(
        tallies[0].admitted <= lease + allowance,
        "node 0 admitted {} beyond its lease of {lease} and allowance {allowance}",
        tallies[0].admitted
    );
    assert!(
        tallies[0].admitted > lease,
        "it used its allowance: {tallies:?}"
    );
    assert!(f.nodes[0].stats().fail_open_grants > 0);
    let before_heal = admitted.load(Ordering::SeqCst);
    assert!(before_heal <= TOKENS + allowance, "{before_heal}");
    f.heal().await;
    // What node 0 admitted on its own is charged to the fleet: Redis's
    // total is everything admitted, and nothing more is left to admit.
    assert_eq!(
        taken(&mut f.server.connection(), &f.key).tokens,
        before_heal
    );
    assert_eq!(f.drain_all(&admitted).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_that_keep_dropping_lose_nothing_and_count_nothing_twice() {
    let f = Arc::new(fleet(|_, config| config).await);
    let flapping = Arc::new(AtomicBool::new(true));
    let flapper = {
        let (f, flapping) = (f.clone(), flapping.clone());
        tokio::spawn(async move {
            let mut round = 0usize;
            while flapping.load(Ordering::SeqCst) && round < 10_000 {
                for (i, link) in f.links.iter().enumerate() {
                    let down = (round + i).is_multiple_of(3);
                    link.set(if down { Fault::Down } else { Fault::Pass });
                }
                round += 1;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    let admitted = Arc::new(AtomicU64::new(0));
    let tallies = f.race(150, 0, &admitted).await;
    flapping.store(false, Ordering::SeqCst);
    flapper.await.expect("flapper");
    let unavailable: u64 = tallies.iter().map(|t| t.unavailable).sum();
    assert!(unavailable > 0, "the faults bit: {tallies:?}");
    f.heal().await;
    f.drain_all(&admitted).await;
    assert_eq!(admitted.load(Ordering::SeqCst), TOKENS);
    assert_eq!(taken(&mut f.server.connection(), &f.key).tokens, TOKENS);
}
