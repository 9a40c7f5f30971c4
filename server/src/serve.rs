//! The accept loop (data-flow step 1): TCP connections in, HTTP/1 requests and WebSocket
//! upgrades out to the router, with the limits a public listener needs before any handler runs.
//!
//! Why not `axum::serve`: it configures no timer, so hyper's header-read timeout is silently
//! off and a client trickling a request head one byte at a time (slowloris), or connecting and
//! never speaking, holds its socket forever. Here every connection has `--header-timeout` to
//! send a complete head, each IP address may hold at most `--max-connections-per-ip`
//! connections, and every connection task is tracked so shutdown can wait for it.

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Open connections per IP address.
#[derive(Default)]
pub struct PerIp {
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
    /// Connections refused at accept for being over the per-address limit.
    pub refused: AtomicU64,
}

/// One connection's place in its address's count; released when the last holder drops it.
/// Handlers find it in the request's extensions: an upgraded socket keeps a clone, so the
/// address count covers WebSockets for as long as they are open.
#[derive(Clone)]
pub struct ConnSlot(Arc<IpSlot>);

impl ConnSlot {
    /// The client's address (what per-address limits count by).
    pub fn ip(&self) -> IpAddr {
        self.0.ip
    }
}

pub struct IpSlot {
    ip: IpAddr,
    per_ip: Arc<PerIp>,
}

impl PerIp {
    pub fn new(limit: usize) -> Self {
        PerIp {
            limit,
            ..Default::default()
        }
    }

    fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if self.limit > 0 && *n >= self.limit {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *n += 1;
        Some(IpSlot {
            ip,
            per_ip: self.clone(),
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.per_ip.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Serves `router` on `listener` until `stop` is cancelled, then lets in-flight requests finish
/// (upgraded sockets live on in their own tasks and are closed by the node's drain) for at most
/// `grace`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    per_ip: Arc<PerIp>,
    header_timeout: Duration,
    stop: CancellationToken,
    grace: Duration,
) {
    let tracker = TaskTracker::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, usually: back off instead of spinning; the
                    // connections already open keep being served.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = per_ip.acquire(peer.ip()) else {
            tracing::debug!(%peer, "connection refused: too many from this address");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let slot = ConnSlot(Arc::new(slot));
        let router = router.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(slot.clone());
                let mut router = router.clone();
                async move { tower_service::Service::call(&mut router, req).await }
            });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let stop = stop.clone();
        tracker.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("HTTP requests still running at the shutdown deadline");
    }
}
