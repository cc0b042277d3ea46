//! The Redis side of the protocol: the keys, and one method per script.
//!
//! [`crate::FleetManager`] is built on this; it is public for tools that
//! inspect a fleet's records, and for the test that runs the Lua script
//! beside its Rust twin ([`crate::protocol::take`]).
//!
//! Keys, under a prefix (`agent-budget` unless configured):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{prefix}:fleet` | hash | `epoch` (who made the record), `created` and `fence` (ms on the fleet's timeline), `cfgver` (the budgets' version) |
//! | `{prefix}:budgets` | hash | agent id → `"tokens calls window_secs"` |
//! | `{prefix}:w:{agent}:{length_ms}:{index}` | hash | one window: `t`, `c` (taken by the fleet), `n:{node}:t`, `n:{node}:c` (taken by each node); expires one window after its end |

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use agent_budget::{AgentId, BudgetLimit};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};

use crate::clock::Timeline;
use crate::error::FleetError;
use crate::protocol::{Amount, TakeRequest, Window, MAX_COUNT};

const PRELUDE: &str = include_str!("lua/prelude.lua");

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

/// What a take call decided (see [`crate::protocol::take`] and
/// [`crate::protocol::gate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TakeStatus {
    /// Booked; new lease granted as asked (perhaps none was asked).
    Granted,
    /// Booked, but less than `min` was left: nothing granted.
    Short,
    /// Booked, but the window is not the server's current one: nothing
    /// granted.
    WrongWindow,
    /// Booked, but the window is fenced while the fleet re-establishes
    /// what its nodes hold (Redis lost its data): nothing granted.
    Fenced,
    /// Nothing done: the window's length is not the agent's budget's (the
    /// budget changed).
    Config,
    /// Nothing done: the agent has no budget.
    NoBudget,
}

/// The reply of a take call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TakeReply {
    /// What was decided.
    pub status: TakeStatus,
    /// The fleet's time when it was decided.
    pub now_ms: u64,
    /// The fleet record's epoch.
    pub epoch: String,
    /// The budgets' version.
    pub budgets_version: u64,
    /// Until when windows that began before the fleet record are fenced.
    pub fence_ms: u64,
    /// New lease granted.
    pub granted: Amount,
    /// Taken fleet-wide in the window, after the call.
    pub taken: Amount,
    /// The agent's budget per window.
    pub limit: Amount,
    /// Taken by this node in the window, after the call.
    pub mine: Amount,
}

/// The reply of a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Beat {
    /// The fleet's time.
    pub now_ms: u64,
    /// The fleet record's epoch: it changes when Redis lost its data.
    pub epoch: String,
    /// The budgets' version: it changes when a budget is set or removed.
    pub budgets_version: u64,
}

/// One window's record as Redis holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WindowView {
    /// Taken fleet-wide.
    pub taken: Amount,
    /// Taken by each node, by node id.
    pub nodes: Vec<(String, Amount)>,
}

/// A connection to a fleet's records in Redis, as one node.
pub struct Store {
    conn: ConnectionManager,
    prefix: String,
    node: String,
    candidate: String,
    made: AtomicU64,
    grace_ms: u64,
    timeout: Duration,
    timeline: Timeline,
    calls: AtomicU64,
    take: Script,
    beat: Script,
    budget: Script,
    list: Script,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("prefix", &self.prefix)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// How a [`Store`] connects and speaks.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// `redis://host:port` (or any URL the `redis` crate takes).
    pub url: String,
    /// Prefix of every key.
    pub prefix: String,
    /// This node's id, unique in the fleet.
    pub node: String,
    /// How long windows that began before the fleet record are fenced
    /// after it is made.
    pub grace: Duration,
    /// How long a call may take before it counts as failed.
    pub timeout: Duration,
    /// The timeline windows are aligned to.
    pub timeline: Timeline,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Store {
    /// Connects (failing if Redis cannot be reached within the timeout).
    /// The connection comes back by itself after Redis goes away.
    pub async fn connect(options: StoreOptions) -> Result<Self, FleetError> {
        let client = redis::Client::open(options.url.as_str())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.timeout))
            .set_response_timeout(Some(options.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(options.timeout);
        let connecting = ConnectionManager::new_with_config(client, config);
        let conn = tokio::time::timeout(options.timeout, connecting)
            .await
            .map_err(|_| FleetError::Timeout(options.timeout))??;
        Ok(Store {
            conn,
            prefix: options.prefix,
            candidate: format!("{}:{}", options.node, uuid::Uuid::new_v4().simple()),
            made: AtomicU64::new(0),
            node: options.node,
            grace_ms: ms(options.grace),
            timeout: options.timeout,
            timeline: options.timeline,
            calls: AtomicU64::new(0),
            take: script(include_str!("lua/take.lua")),
            beat: script(include_str!("lua/beat.lua")),
            budget: script(include_str!("lua/budget.lua")),
            list: script(include_str!("lua/list.lua")),
        })
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// How many calls this store has made to Redis (each one round trip).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn fleet_key(&self) -> String {
        format!("{}:fleet", self.prefix)
    }

    fn budgets_key(&self) -> String {
        format!("{}:budgets", self.prefix)
    }

    /// The key of one window's record.
    pub fn window_key(&self, agent: &AgentId, window: Window) -> String {
        format!(
            "{}:w:{}:{}:{}",
            self.prefix, agent, window.length_ms, window.index
        )
    }

    /// The epoch this call makes if the fleet record is missing: unique to
    /// the call, so a node that made the record before Redis lost it sees
    /// the new one as new.
    fn candidate(&self) -> String {
        let n = self.made.fetch_add(1, Ordering::Relaxed);
        format!("{}:{n}", self.candidate)
    }

    /// The time argument: the shared clock's, or empty for Redis's `TIME`.
    fn now_arg(&self) -> String {
        match &self.timeline {
            Timeline::RedisTime => String::new(),
            Timeline::Shared(clock) => clock.now_ms().to_string(),
        }
    }

    async fn run(&self, invocation: &redis::ScriptInvocation<'_>) -> Result<Value, FleetError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn)).await {
            Ok(reply) => Ok(reply?),
            Err(_) => Err(FleetError::Timeout(self.timeout)),
        }
    }

    /// One take (see [`crate::protocol::take`]) on `agent`'s `window`.
    pub async fn take(
        &self,
        agent: &AgentId,
        window: Window,
        request: &TakeRequest,
    ) -> Result<TakeReply, FleetError> {
        let mut call = self.take.key(self.fleet_key());
        call.key(self.budgets_key())
            .key(self.window_key(agent, window))
            .arg(&self.node)
            .arg(self.candidate())
            .arg(self.grace_ms)
            .arg(self.now_arg())
            .arg(agent.to_string())
            .arg(window.length_ms)
            .arg(window.index);
        for amount in [
            request.belief,
            request.give,
            request.force,
            request.want,
            request.min,
        ] {
            let amount = amount.clamped();
            call.arg(amount.tokens).arg(amount.calls);
        }
        let reply = self.run(&call).await?;
        let fields = array(&reply, 13)?;
        let status = match text(&fields[0])?.as_str() {
            "ok" => TakeStatus::Granted,
            "short" => TakeStatus::Short,
            "window" => TakeStatus::WrongWindow,
            "fenced" => TakeStatus::Fenced,
            "config" => TakeStatus::Config,
            "nobudget" => TakeStatus::NoBudget,
            other => return Err(FleetError::Protocol(format!("take status {other:?}"))),
        };
        let pair = |i: usize| -> Result<Amount, FleetError> {
            Ok(Amount::new(int(&fields[i])?, int(&fields[i + 1])?))
        };
        Ok(TakeReply {
            status,
            now_ms: int(&fields[1])?,
            epoch: text(&fields[2])?,
            budgets_version: int(&fields[3])?,
            fence_ms: int(&fields[4])?,
            granted: pair(5)?,
            taken: pair(7)?,
            limit: pair(9)?,
            mine: pair(11)?,
        })
    }

    /// A heartbeat: the fleet's time, epoch and budgets' version (making
    /// the fleet record, fenced, if it is missing).
    pub async fn beat(&self) -> Result<Beat, FleetError> {
        let mut call = self.beat.key(self.fleet_key());
        call.arg(self.candidate())
            .arg(self.grace_ms)
            .arg(self.now_arg());
        let reply = self.run(&call).await?;
        let fields = array(&reply, 3)?;
        Ok(Beat {
            now_ms: int(&fields[0])?,
            epoch: text(&fields[1])?,
            budgets_version: int(&fields[2])?,
        })
    }

    async fn budget_op(
        &self,
        agent: &AgentId,
        value: &str,
        mode: &str,
    ) -> Result<(u64, bool), FleetError> {
        let mut call = self.budget.key(self.fleet_key());
        call.key(self.budgets_key())
            .arg(self.candidate())
            .arg(self.grace_ms)
            .arg(self.now_arg())
            .arg(agent.to_string())
            .arg(value)
            .arg(mode);
        let reply = self.run(&call).await?;
        let fields = array(&reply, 2)?;
        Ok((int(&fields[0])?, int(&fields[1])? == 1))
    }

    /// Sets an agent's budget for the fleet. Returns the budgets' version
    /// after it, and whether it changed anything.
    pub async fn set_budget(&self, limit: &BudgetLimit) -> Result<(u64, bool), FleetError> {
        self.budget_op(&limit.agent_id, &encode(limit), "set").await
    }

    /// Sets an agent's budget only if the fleet has none for it (after
    /// Redis lost its data, nodes put back what they know).
    pub async fn restore_budget(&self, limit: &BudgetLimit) -> Result<(u64, bool), FleetError> {
        self.budget_op(&limit.agent_id, &encode(limit), "restore")
            .await
    }

    /// Removes an agent's budget from the fleet.
    pub async fn remove_budget(&self, agent: &AgentId) -> Result<(u64, bool), FleetError> {
        self.budget_op(agent, "", "remove").await
    }

    /// Every budget of the fleet, and the version they are at. Entries that
    /// do not parse are left out.
    pub async fn budgets(&self) -> Result<(u64, Vec<BudgetLimit>), FleetError> {
        let mut call = self.list.key(self.fleet_key());
        call.key(self.budgets_key())
            .arg(self.candidate())
            .arg(self.grace_ms)
            .arg(self.now_arg());
        let reply = self.run(&call).await?;
        let Value::Array(fields) = &reply else {
            return Err(FleetError::Protocol(format!("budgets: {reply:?}")));
        };
        let Some((version, rest)) = fields.split_first() else {
            return Err(FleetError::Protocol("budgets: empty reply".into()));
        };
        let budgets = rest
            .chunks_exact(2)
            .filter_map(|pair| {
                let agent = text(&pair[0]).ok()?.parse().ok()?;
                decode(agent, &text(&pair[1]).ok()?)
            })
            .collect();
        Ok((int(version)?, budgets))
    }

    /// One window's record: taken fleet-wide, and by each node.
    pub async fn window(&self, agent: &AgentId, window: Window) -> Result<WindowView, FleetError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut conn = self.conn.clone();
        let key = self.window_key(agent, window);
        let mut command = redis::cmd("HGETALL");
        command.arg(key);
        let reading = command.query_async::<Value>(&mut conn);
        let reply = tokio::time::timeout(self.timeout, reading)
            .await
            .map_err(|_| FleetError::Timeout(self.timeout))??;
        let pairs: Vec<(String, u64)> = match &reply {
            Value::Array(items) => items
                .chunks_exact(2)
                .filter_map(|p| Some((text(&p[0]).ok()?, int(&p[1]).ok()?)))
                .collect(),
            Value::Map(items) => items
                .iter()
                .filter_map(|(k, v)| Some((text(k).ok()?, int(v).ok()?)))
                .collect(),
            _ => return Err(FleetError::Protocol(format!("window: {reply:?}"))),
        };
        let mut view = WindowView::default();
        let mut nodes: std::collections::BTreeMap<String, Amount> = Default::default();
        for (field, n) in pairs {
            match field.as_str() {
                "t" => view.taken.tokens = n,
                "c" => view.taken.calls = n,
                _ => {
                    let Some(rest) = field.strip_prefix("n:") else {
                        continue;
                    };
                    if let Some(node) = rest.strip_suffix(":t") {
                        nodes.entry(node.to_owned()).or_default().tokens = n;
                    } else if let Some(node) = rest.strip_suffix(":c") {
                        nodes.entry(node.to_owned()).or_default().calls = n;
                    }
                }
            }
        }
        view.nodes = nodes.into_iter().collect();
        Ok(view)
    }
}

/// A budget as the fleet stores it: `"tokens calls window_secs"`, each cut
/// so that the Lua side counts it exactly.
pub fn encode(limit: &BudgetLimit) -> String {
    format!(
        "{} {} {}",
        limit.token_budget.min(MAX_COUNT),
        limit.calls_budget.min(MAX_COUNT),
        limit.window_secs.min(MAX_COUNT / 1_000)
    )
}

/// The budget stored as `value` for `agent`, if it parses.
pub fn decode(agent: AgentId, value: &str) -> Option<BudgetLimit> {
    let mut parts = value.split(' ').map(str::parse::<u64>);
    let (Some(Ok(tokens)), Some(Ok(calls)), Some(Ok(window_secs)), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    Some(BudgetLimit {
        agent_id: agent,
        token_budget: tokens,
        calls_budget: calls,
        window_secs,
    })
}

fn array(reply: &Value, len: usize) -> Result<&[Value], FleetError> {
    match reply {
        Value::Array(items) if items.len() == len => Ok(items),
        _ => Err(FleetError::Protocol(format!(
            "expected {len} fields, got {reply:?}"
        ))),
    }
}

fn int(value: &Value) -> Result<u64, FleetError> {
    match value {
        Value::Int(n) => u64::try_from(*n).map_err(|_| FleetError::Protocol(format!("{n} < 0"))),
        Value::BulkString(_) | Value::SimpleString(_) => text(value)?
            .parse()
            .map_err(|_| FleetError::Protocol(format!("not a count: {value:?}"))),
        _ => Err(FleetError::Protocol(format!("not a count: {value:?}"))),
    }
}

fn text(value: &Value) -> Result<String, FleetError> {
    match value {
        Value::BulkString(bytes) => {
            String::from_utf8(bytes.clone()).map_err(|_| FleetError::Protocol("not UTF-8".into()))
        }
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Int(n) => Ok(n.to_string()),
        _ => Err(FleetError::Protocol(format!("not text: {value:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_round_trip_through_their_stored_form_and_bad_ones_are_rejected() {
        let agent = AgentId::from_u128(7);
        let limit = BudgetLimit {
            agent_id: agent,
            token_budget: 1_000,
            calls_budget: 10,
            window_secs: 60,
        };
        assert_eq!(encode(&limit), "1000 10 60");
        assert_eq!(decode(agent, &encode(&limit)), Some(limit.clone()));
        let huge = BudgetLimit {
            token_budget: u64::MAX,
            calls_budget: u64::MAX,
            window_secs: u64::MAX,
            ..limit
        };
        let back = decode(agent, &encode(&huge)).expect("parses");
        assert_eq!(
            (back.token_budget, back.calls_budget, back.window_secs),
            (MAX_COUNT, MAX_COUNT, MAX_COUNT / 1_000)
        );
        for bad in ["", "1 2", "1 2 3 4", "a 2 3", "-1 2 3", "1  2 3"] {
            assert_eq!(decode(agent, bad), None, "{bad:?}");
        }
    }

    #[test]
    fn replies_are_read_strictly() {
        assert_eq!(int(&Value::Int(5)).ok(), Some(5));
        assert!(int(&Value::Int(-1)).is_err());
        assert_eq!(int(&Value::BulkString(b"12".to_vec())).ok(), Some(12));
        assert!(int(&Value::Nil).is_err());
        assert!(array(&Value::Array(vec![Value::Int(1)]), 2).is_err());
        assert_eq!(
            text(&Value::SimpleString("ok".into())).ok().as_deref(),
            Some("ok")
        );
    }
}
