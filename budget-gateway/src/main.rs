//! `budget-gateway`: see the library's docs, or `budget-gateway --help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use agent_budget::BudgetManager;
use agent_budget_redis::{FleetConfig, FleetManager};
use budget_gateway::db::Database;
use budget_gateway::gateway::{stop_signal, Gateway, Limiter};
use budget_gateway::server::ServerLimits;

const USAGE: &str = "\
budget-gateway: token and call budgets per API key in front of an OpenAI-compatible upstream

USAGE:
    budget-gateway --config FILE --listen ADDR --upstream URL [--db FILE|URL] [--state FILE | --redis URL]
    budget-gateway --mock-upstream --listen ADDR

OPTIONS:
    --config FILE            the TOML configuration (admin_key, [[agents]], ...)
    --listen ADDR            where to listen, e.g. 127.0.0.1:8080
    --upstream URL           the upstream's base, e.g. http://127.0.0.1:9000; /v1/... is forwarded there
    --db FILE|URL            keep agents and keys made through the admin API (/v1/agents) in a
                             SQLite file (created if missing), or in PostgreSQL (postgres://...)
                             shared by a fleet; without it, the agents are the file's only
    --state FILE             restore usage from FILE at start, save it periodically and on shutdown
    --redis URL              share every budget with all gateways on this Redis (redis://host:port);
                             usage lives in Redis, so not with --state; budgets cannot nest (no `parent`)
    --upstream-timeout SECS  answer 504 when the upstream has not answered by then (default 600)
    --threads N              worker threads (default: one per core)
    --admin-listen ADDR      serve the admin API and /metrics on ADDR instead of --listen (then 404 there)
    --max-connections N      client connections at once (default: half the open-file limit less 64,
                             at most 16384); past it a new one replaces one that holds no request,
                             else it is refused with 503
    --header-timeout SECS    a request head must arrive whole within this (also the keep-alive
                             idle timeout; default 10)
    --body-timeout SECS      a request body must arrive whole within this of its head (default 60)
    --upstream-idle-timeout SECS  an upstream response that sends nothing for this long is cut
                             off, and settled as a hang-up (default 300)
    --shutdown-timeout SECS  on SIGTERM, requests in flight get this long, then are cancelled and
                             settled (default 30)
    --limiter KIND           budget (default), none or governor: the last two are for measuring the layer's cost
    --mock-upstream          serve a small OpenAI-compatible mock instead (for trying the gateway)
    -h, --help               this text

SIGHUP re-reads the configuration file; a bad file is refused and the running one stays.
";

struct Args {
    config: Option<PathBuf>,
    listen: Option<SocketAddr>,
    upstream: Option<String>,
    state: Option<PathBuf>,
    redis: Option<String>,
    db: Option<String>,
    upstream_timeout: Duration,
    limiter: Limiter,
    threads: Option<usize>,
    mock: bool,
    admin_listen: Option<SocketAddr>,
    server: ServerLimits,
    upstream_idle_timeout: Duration,
}

/// Seconds, fractions allowed (`0.2`), as a duration of at least 1 ms.
fn seconds(flag: &str, v: &str) -> Result<Duration, String> {
    let secs: f64 = v.parse().map_err(|e| format!("{flag} {v:?}: {e}"))?;
    if !secs.is_finite() || !(0.0..=31_536_000.0).contains(&secs) {
        return Err(format!("{flag} {v:?}: give seconds, at most a year"));
    }
    Ok(Duration::from_secs_f64(secs).max(Duration::from_millis(1)))
}

fn parse_args() -> Result<Args, String> {
    use lexopt::prelude::*;
    let mut args = Args {
        config: None,
        listen: None,
        upstream: None,
        state: None,
        redis: None,
        db: None,
        upstream_timeout: Duration::from_secs(600),
        limiter: Limiter::Budget,
        threads: None,
        mock: false,
        admin_listen: None,
        server: ServerLimits::default(),
        upstream_idle_timeout: Duration::from_secs(300),
    };
    let mut parser = lexopt::Parser::from_env();
    let text = |v: std::ffi::OsString| v.into_string().map_err(|v| format!("not UTF-8: {v:?}"));
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("config") => args.config = Some(parser.value().map_err(|e| e.to_string())?.into()),
            Long("listen") => {
                let v = text(parser.value().map_err(|e| e.to_string())?)?;
                args.listen = Some(v.parse().map_err(|e| format!("--listen {v:?}: {e}"))?);
            }
            Long("upstream") => {
                args.upstream = Some(text(parser.value().map_err(|e| e.to_string())?)?)
            }
            Long("state") => args.state = Some(parser.value().map_err(|e| e.to_string())?.into()),
            Long("redis") => args.redis = Some(text(parser.value().map_err(|e| e.to_string())?)?),
            Long("db") => args.db = Some(text(parser.value().map_err(|e| e.to_string())?)?),
            Long("upstream-timeout") => {
                let v = text(parser.value().map_err(|e| e.to_string())?)?;
                let secs: u64 = v
                    .parse()
                    .map_err(|e| format!("--upstream-timeout {v:?}: {e}"))?;
                args.upstream_timeout = Duration::from_secs(secs.max(1));
            }
            Long("limiter") => {
                args.limiter = text(parser.value().map_err(|e| e.to_string())?)?.parse()?
            }
            Long("threads") => {
                let v = text(parser.value().map_err(|e| e.to_string())?)?;
                let n: usize = v.parse().map_err(|e| format!("--threads {v:?}: {e}"))?;
                args.threads = Some(n.max(1));
            }
            Long("admin-listen") => {
                let v = text(parser.value().map_err(|e| e.to_string())?)?;
                args.admin_listen = Some(
                    v.parse()
                        .map_err(|e| format!("--admin-listen {v:?}: {e}"))?,
                );
            }
            Long("max-connections") => {
                let v = text(parser.value().map_err(|e| e.to_string())?)?;
                let n: usize = v
                    .parse()
                    .map_err(|e| format!("--max-connections {v:?}: {e}"))?;
                args.server.max_connections = n.max(1);
            }
            Long("header-timeout") => {
                let v = text(parser.value().map_err(|e| e.to_string())?)?;
                args.server.header_timeout = seconds("--header-timeout", &v)?;
            }
            Long("body-timeout") => {
                let v = text(parser.value().map_err(|e| e.to_string())?)?;
                args.server.body_timeout = seconds("--body-timeout", &v)?;
            }
            Long("shutdown-timeout") => {
                let v = text(parser.value().map_err(|e| e.to_string())?)?;
                args.server.shutdown_timeout = seconds("--shutdown-timeout", &v)?;
            }
            Long("upstream-idle-timeout") => {
                let v = text(parser.value().map_err(|e| e.to_string())?)?;
                args.upstream_idle_timeout = seconds("--upstream-idle-timeout", &v)?;
            }
            Long("mock-upstream") => args.mock = true,
            Short('h') | Long("help") => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    if args.redis.is_some() {
        if args.state.is_some() {
            return Err(
                "--state cannot be used with --redis: the fleet's usage lives in Redis \
                        (keep it across Redis restarts with Redis's own persistence, AOF)"
                    .to_owned(),
            );
        }
        if args.limiter != Limiter::Budget {
            return Err("--limiter none|governor cannot be used with --redis".to_owned());
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("budget-gateway: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("budget-gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("budget-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let listen = args.listen.ok_or("--listen ADDR is required")?;
    if args.mock {
        let listener = bind(listen).await?;
        let (router, _) = budget_gateway::mock::router();
        eprintln!(
            "budget-gateway: mock upstream on http://{}",
            local(&listener)
        );
        return axum::serve(listener, router)
            .with_graceful_shutdown(stop_signal())
            .await
            .map_err(|e| e.to_string());
    }
    let config_path = args.config.ok_or("--config FILE is required")?;
    let upstream = args.upstream.ok_or("--upstream URL is required")?;
    let config = budget_gateway::config::load(&config_path).map_err(|e| e.to_string())?;
    let db = match &args.db {
        Some(target) => Some(Database::open(target).await.map_err(|e| e.to_string())?),
        None => None,
    };
    let conflict = |e: budget_gateway::gateway::GatewayError| match e {
        budget_gateway::gateway::GatewayError::Conflict(_) => {
            format!("{}: {e}", config_path.display())
        }
        e => e.to_string(),
    };
    let (gateway, budgets) = match &args.redis {
        None => {
            let gateway = Gateway::with_database(
                config,
                Arc::new(BudgetManager::new()),
                &upstream,
                args.upstream_timeout,
                args.limiter,
                args.state,
                db,
            )
            .await
            .map_err(conflict)?;
            (gateway, format!("limiter {:?}", args.limiter))
        }
        Some(url) => {
            // Before connecting: a configuration a fleet cannot enforce is
            // refused whether or not Redis is up.
            Gateway::check_fleet_config(&config)
                .map_err(|e| format!("{}: {e}", config_path.display()))?;
            let mut fleet = FleetConfig::new(url.as_str());
            fleet.node_id = node_name();
            let fleet = FleetManager::connect(fleet)
                .await
                .map_err(|e| format!("cannot connect to Redis at {url}: {e}"))?;
            let fleet = Arc::new(fleet);
            let node = fleet.node_id().to_owned();
            let gateway =
                Gateway::fleet_with_database(config, fleet, &upstream, args.upstream_timeout, db)
                    .await
                    .map_err(conflict)?;
            (
                gateway,
                format!("budgets shared through {url} as node {node}"),
            )
        }
    };
    let agents = gateway.catalog().agent_ids().len();
    let stored = gateway.catalog().database().map_or_else(String::new, |db| {
        format!(", agents and keys in {}", db.shown())
    });
    tokio::spawn(budget_gateway::reload::reload_on_hangup(
        gateway.catalog().clone(),
        config_path,
    ));
    let listener = bind(listen).await?;
    let admin = match args.admin_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let admin_at = admin.as_ref().map_or_else(String::new, |admin| {
        format!(", admin API and /metrics on http://{}", local(admin))
    });
    eprintln!(
        "budget-gateway: listening on http://{}, forwarding /v1/ to {upstream}, {agents} agents, {budgets}{stored}{admin_at}",
        local(&listener),
    );
    gateway
        .server_limits(args.server)
        .upstream_idle_timeout(args.upstream_idle_timeout)
        .serve_with_admin(listener, admin, stop_signal())
        .await
        .map_err(|e| e.to_string())?;
    eprintln!("budget-gateway: stopped");
    Ok(())
}

/// This node's name in the fleet's records: the host's name, or
/// `budget-gateway` (the fleet adds a random suffix either way).
fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| {
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        })
        .unwrap_or_else(|| "budget-gateway".to_owned())
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))
}

fn local(listener: &tokio::net::TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string())
}
