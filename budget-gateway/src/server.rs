//! The gateway's HTTP/1 server: what one client may hold, and a stop with
//! a deadline.
//!
//! # How it works
//!
//! An accept loop hands each connection to hyper's HTTP/1 server, under
//! these bounds ([`ServerLimits`]):
//!
//! - **The request head** must arrive whole within
//!   [`header_timeout`](ServerLimits::header_timeout) of the moment the
//!   connection starts waiting for it (its opening, or the end of the
//!   previous response): hyper's `header_read_timeout`, whose timer is set
//!   once when it starts reading a head and not re-armed by each byte, so a
//!   client dripping a byte every few seconds is cut off all the same. The
//!   same timer is the keep-alive idle timeout: a connection that sends no
//!   next request within it is closed.
//! - **The request body** must arrive whole within
//!   [`body_timeout`](ServerLimits::body_timeout) of its head; past it, the
//!   body's reader gets an error of kind `TimedOut` (the budget layer
//!   answers `408`, nothing charged).
//! - **Connections** are at most
//!   [`max_connections`](ServerLimits::max_connections). At the limit, a new
//!   connection takes the place of one that holds no request: the oldest of
//!   those that have not sent a complete request head yet, else the one idle
//!   the longest between requests. Only when every connection has a request
//!   in flight is the new one refused, with a `503` and `Connection: close`.
//!   So idle or keyless connections, however many, cannot keep a client
//!   with a key out: its connection sheds one of theirs.
//! - **A response to a request whose body was not read** (a `401`, a
//!   `429` decided before the body, a `413`) says `Connection: close`:
//!   hyper closes such a connection after the response, and a keep-alive
//!   client should know it before sending its next request on it.
//!
//! On shutdown the listener closes, every connection is told to finish its
//! request in flight and close (idle ones close at once), and after
//! [`shutdown_timeout`](ServerLimits::shutdown_timeout) the connections
//! still open are dropped: their requests are cancelled, and the budget
//! layer settles each (the prompt and what streamed stay charged). The
//! caller saves the state after that.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::deadline::{Deadline, DeadlineBody};
use crate::repoll::Repoller;

/// What one client may hold, and how long a stop may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections open at once (see the module's docs for who is shed).
    pub max_connections: usize,
    /// The most a request head may take to arrive, counted from the moment
    /// the connection waits for it; also the keep-alive idle timeout.
    pub header_timeout: Duration,
    /// The most a request body may take to arrive, counted from its head.
    pub body_timeout: Duration,
    /// How long requests in flight may run after a stop is asked for,
    /// before they are cancelled.
    pub shutdown_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: default_max_connections(),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// Descriptors kept for everything but client connections (the listeners,
/// the database, the state file, the journal, the runtime's own).
const RESERVED_FDS: u64 = 64;

/// The default connection limit: half of what the process's open-file limit
/// leaves after 64 reserved descriptors (each client connection may need one to
/// the upstream too), between 16 and 16,384; 1,024 if the limit cannot be
/// read.
pub fn default_max_connections() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits
                .lines()
                .find(|l| l.starts_with("Max open files"))?
                .to_owned();
            let soft = line.split_whitespace().nth(3)?;
            match soft {
                "unlimited" => Some(u64::MAX),
                n => n.parse().ok(),
            }
        });
    match soft {
        Some(soft) => (soft.saturating_sub(RESERVED_FDS) / 2).clamp(16, 16_384) as usize,
        None => 1_024,
    }
}

/// A connection's `in_flight` once it has been shed: no request may start.
const SHED: u32 = u32::MAX;

/// One open connection, as the limit sees it.
struct Conn {
    /// When it opened, for picking the oldest.
    opened: Instant,
    /// Requests in flight (head received, response not yet sent whole), or
    /// [`SHED`].
    in_flight: AtomicU32,
    /// Whether a complete request head ever arrived on it.
    served: AtomicBool,
    /// Milliseconds after `opened` when its last request ended.
    idle_since_ms: AtomicU64,
    /// Told when it is shed.
    shed: Notify,
}

impl Conn {
    /// Counts a request in; `false` if the connection was shed.
    fn begin(&self) -> bool {
        self.served.store(true, Ordering::SeqCst);
        self.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n != SHED).then_some(n + 1)
            })
            .is_ok()
    }

    fn end(&self) {
        self.idle_since_ms
            .store(self.opened.elapsed().as_millis() as u64, Ordering::SeqCst);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The open connections.
struct Registry {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    max: usize,
}

impl Registry {
    fn new(max: usize) -> Self {
        Registry {
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            max: max.max(1),
        }
    }

    /// Admits a new connection: at the limit, sheds one that holds no
    /// request; `None` if every connection has one in flight.
    fn admit(&self) -> Option<(u64, Arc<Conn>)> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        while conns.len() >= self.max {
            let victim = shed_candidate(&conns)?;
            let conn = &conns[&victim];
            // A request that began since the pick keeps its connection.
            if conn
                .in_flight
                .compare_exchange(0, SHED, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                conn.shed.notify_one();
                conns.remove(&victim);
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            opened: Instant::now(),
            in_flight: AtomicU32::new(0),
            served: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
            shed: Notify::new(),
        });
        conns.insert(id, conn.clone());
        Some((id, conn))
    }

    fn remove(&self, id: u64) {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

/// The connection to shed: the oldest that never sent a whole request
/// head, else the one idle the longest; `None` if all are busy.
fn shed_candidate(conns: &HashMap<u64, Arc<Conn>>) -> Option<u64> {
    let idle = conns
        .iter()
        .filter(|(_, c)| c.in_flight.load(Ordering::SeqCst) == 0);
    let never_served = idle
        .clone()
        .filter(|(_, c)| !c.served.load(Ordering::SeqCst))
        .min_by_key(|(_, c)| c.opened)
        .map(|(id, _)| *id);
    never_served.or_else(|| {
        idle.min_by_key(|(_, c)| {
            c.opened + Duration::from_millis(c.idle_since_ms.load(Ordering::SeqCst))
        })
        .map(|(id, _)| *id)
    })
}

/// Where the server is in its stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Serving,
    Draining,
    Cancelling,
}

/// Serves `app` on `listener` under `limits` until `stop` resolves; then
/// drains, and cancels what is left after `limits.shutdown_timeout`.
/// Returns once every connection has closed.
pub async fn serve<S>(
    listener: TcpListener,
    app: S,
    limits: ServerLimits,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let registry = Arc::new(Registry::new(limits.max_connections));
    let (phase, watching) = watch::channel(Phase::Serving);
    let mut tasks = JoinSet::new();
    // Refusals are written by their own tasks, few at a time: beyond that,
    // a connection past the limit is closed without a word.
    let refusals = Arc::new(tokio::sync::Semaphore::new(64));
    let mut stop = std::pin::pin!(stop);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        while tasks.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of descriptors, most likely: let connections close.
                eprintln!("budget-gateway: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match registry.admit() {
            Some((id, conn)) => {
                let registry = registry.clone();
                let app = app.clone();
                let watching = watching.clone();
                tasks.spawn(async move {
                    serve_connection(stream, conn.clone(), app, limits, watching).await;
                    registry.remove(id);
                });
            }
            None => {
                if let Ok(permit) = refusals.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse(stream).await;
                        drop(permit);
                    });
                }
            }
        }
    }
    drop(listener);
    let _ = phase.send(Phase::Draining);
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        let _ = phase.send(Phase::Cancelling);
        while tasks.join_next().await.is_some() {}
    }
    Ok(())
}

/// Errors of one connection, not of the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// The answer to a connection past the limit.
async fn refuse(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    const BODY: &str = r#"{"error":{"message":"the gateway has as many connections as it is configured to hold, each with a request in flight; try again shortly","type":"server_error","param":null,"code":"too_many_connections"}}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

async fn serve_connection<S>(
    stream: TcpStream,
    conn: Arc<Conn>,
    app: S,
    limits: ServerLimits,
    mut phase: watch::Receiver<Phase>,
) where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let (conn, app) = (conn.clone(), app.clone());
            async move {
                if !conn.begin() {
                    return Ok::<_, Infallible>(shed_response());
                }
                let guard = InFlight(conn);
                let read = Arc::new(AtomicBool::new(false));
                let had_body = request.body().size_hint().upper() != Some(0);
                let request = request.map(|body| {
                    let body = DeadlineBody::new(
                        body,
                        Deadline::Fixed,
                        limits.body_timeout,
                        "the request body did not arrive within",
                    );
                    Body::new(body.tell_finished(read.clone()))
                });
                let Ok(mut response) = app.oneshot(request).await;
                // hyper closes a connection whose request body was left
                // unread: the client is told so.
                if had_body && !read.load(Ordering::SeqCst) {
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok(response.map(|body| {
                    Body::new(Guarded {
                        inner: body,
                        _guard: guard,
                    })
                }))
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    // A request whose body the layer reads wakes its own task: see
    // `repoll`.
    let repoller = Repoller::new();
    let mut draining = false;
    loop {
        if !draining && *phase.borrow() == Phase::Draining {
            draining = true;
            connection.as_mut().graceful_shutdown();
        }
        if *phase.borrow() == Phase::Cancelling {
            return;
        }
        tokio::select! {
            _ = repoller.poll(connection.as_mut()) => return,
            () = conn.shed.notified() => return,
            changed = phase.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// The answer to a request on a connection that was just shed.
fn shed_response() -> Response<Body> {
    let mut response = agent_budget_tower::Rejection::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the connection was closed to make room for another",
        "server_error",
        "connection_shed",
    )
    .into_response::<Body>();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A request in flight on its connection, until its response has been
/// sent or dropped.
struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A response body that keeps its request counted as in flight.
struct Guarded {
    inner: Body,
    _guard: InFlight,
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
