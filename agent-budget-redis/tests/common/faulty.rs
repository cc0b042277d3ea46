//! A TCP proxy between a node and Redis that can delay, cut and
//! partition the link, for the fault tests.
//!
//! Each node gets a proxy of its own, so one node can be cut off while the
//! rest of the fleet talks to Redis. The faults model what a network does:
//!
//! - [`Fault::Delay`]: every chunk, in both directions, waits this long
//!   (in order: a slow link, not a reordering one);
//! - [`Fault::Partition`]: connections stay open but nothing crosses;
//!   bytes sent meanwhile are held and delivered when the partition heals,
//!   as TCP's retransmissions would deliver them;
//! - [`Fault::Down`]: every open connection is closed, and new ones are
//!   closed as soon as they are accepted (Redis gone, or a firewall
//!   resetting connections).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// What the link does now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Bytes cross at once.
    Pass,
    /// Bytes cross after this long.
    Delay(Duration),
    /// Nothing crosses until the fault changes; nothing is lost.
    Partition,
    /// Connections are closed.
    Down,
}

/// A proxy on a free loopback port in front of one Redis.
pub struct FaultyLink {
    port: u16,
    fault: watch::Sender<Fault>,
    accepting: tokio::task::JoinHandle<()>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl FaultyLink {
    /// A link to the Redis at `redis_url` (`redis://127.0.0.1:PORT`).
    pub async fn start(redis_url: &str) -> Self {
        let upstream = redis_url.trim_start_matches("redis://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (fault, watching) = watch::channel(Fault::Pass);
        let connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let tracked = connections.clone();
        let accepting = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if *watching.borrow() == Fault::Down {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let task = tokio::spawn(relay(client, server, watching.clone()));
                let mut tracked = tracked.lock().unwrap();
                tracked.retain(|t| !t.is_finished());
                tracked.push(task);
            }
        });
        FaultyLink {
            port,
            fault,
            accepting,
            connections,
        }
    }

    /// The URL nodes connect to.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Changes what the link does, for open connections and new ones.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
        if fault == Fault::Down {
            for task in self.connections.lock().unwrap().drain(..) {
                task.abort();
            }
        }
    }
}

impl Drop for FaultyLink {
    fn drop(&mut self) {
        self.accepting.abort();
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// Carries bytes both ways until either side closes.
async fn relay(client: TcpStream, server: TcpStream, fault: watch::Receiver<Fault>) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        () = pump(client_read, server_write, fault.clone()) => {}
        () = pump(server_read, client_write, fault) => {}
    }
}

/// One direction. Chunks are stamped when read (a delay is latency, not a
/// queue that grows) and written in order once due, and not while the link
/// is partitioned.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
) {
    let (queue, mut queued) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reading = {
        let fault = fault.clone();
        async move {
            let mut buffer = vec![0u8; 16 * 1024];
            loop {
                let n = match from.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let delay = match *fault.borrow() {
                    Fault::Delay(by) => by,
                    _ => Duration::ZERO,
                };
                if queue
                    .send((Instant::now() + delay, buffer[..n].to_vec()))
                    .is_err()
                {
                    return;
                }
            }
        }
    };
    let writing = async move {
        while let Some((due, chunk)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            loop {
                match *fault.borrow_and_update() {
                    Fault::Pass | Fault::Delay(_) => break,
                    Fault::Down => return,
                    Fault::Partition => {}
                }
                if fault.changed().await.is_err() {
                    return;
                }
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    // Both to the end: what was read before a close is still delivered.
    tokio::join!(reading, writing);
}
