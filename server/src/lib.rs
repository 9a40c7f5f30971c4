//! Chorus: a collaborative-state sync server for yrs documents. Modules follow the bytes:
//!
//! - [`http`] — routes, WebSocket upgrades, the document API
//! - [`connection`] — per-socket reader/writer; native and y-websocket sessions; SSE and
//!   long-poll readers
//! - [`validate`] — guards every client-supplied update before yrs decodes it
//! - [`doc`] — the write door every update passes ([`doc::admit`]); registry of hot documents,
//!   each owned by one task; the coalescing outbox
//! - [`backplane`] — the log every update goes through (embedded: fsynced redb; or Redis streams
//!   shared by many nodes)
//! - [`storage`] — snapshots
//! - [`metrics`] — `/metrics` (Prometheus) and what `/readyz` checks
//! - [`webhook`] — change webhooks: debounced, signed `document.changed` requests per document
//!
//! [`run`] is the entry point: `main` only parses flags; tests bind port 0 and call it.

pub mod auth;
pub mod backplane;
pub mod config;
pub mod connection;
pub mod doc;
pub mod fuzzing;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod serve;
pub mod storage;
pub mod validate;
pub mod webhook;

pub use config::Config;

use backplane::Backplane;
use backplane::embedded::EmbeddedBackplane;
use backplane::redis::{RedisBackplane, RedisSettings};
use connection::ConnContext;
use doc::{DocSettings, Registry};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use storage::fs::FsSnapshotStore;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Runs a node on `listener` until `shutdown` resolves, then drains: stops accepting, closes
/// every socket with 1001 ("going away, reconnect"), saves every hot document, flushes the
/// log, and returns once every task has finished (or the shutdown deadline passed).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let config = Arc::new(config);
    // Before anything records: series recorded earlier would be lost.
    let _ = crate::metrics::handle();
    std::fs::create_dir_all(&config.data_dir)?;
    let tracker = TaskTracker::new();
    let conn_tracker = TaskTracker::new();

    let node = rand::random::<u64>();
    let backplane = open_backplane(&config, node, &tracker).await?;
    let registry = Registry::new(
        backplane.clone(),
        open_store(&config)?,
        doc_settings(&config),
        node,
        tracker.clone(),
    );
    let auth = Arc::new(open_auth(&config)?);
    let stop = CancellationToken::new();
    let ctx = Arc::new(ConnContext::new(
        registry.clone(),
        config.clone(),
        auth,
        stop.clone(),
        conn_tracker.clone(),
    ));
    // Before the first request: the log marks appends for webhooks from the first one on.
    if let Some(settings) = webhook::WebhookSettings::from_config(&config) {
        backplane.check_webhooks().await?;
        let hooks = webhook::Webhooks::start(settings, backplane.clone(), &tracker, stop.clone())?;
        let _ = ctx.door.webhooks.set(hooks);
    }
    // Revocations from any node (with Redis; the embedded backplane has no others) close the
    // matching sockets here too. Weak: the backplane outlives nothing it is handed.
    let revoker = Arc::downgrade(&ctx);
    let revocations_read = backplane.watch_revocations(Arc::new(move |rev| {
        if let Some(ctx) = revoker.upgrade() {
            let closed = ctx.revoke(&rev);
            tracing::info!(sub = ?rev.sub, jti = ?rev.jti, closed, "revocation applied");
        }
    }));
    tracing::info!(
        addr = %listener.local_addr()?,
        backplane = backplane.name(),
        data_dir = %config.data_dir.display(),
        "chorus node listening"
    );

    let stop_accepting = stop.clone();
    tracker.spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: closing sockets with 1001, saving documents");
        stop_accepting.cancel();
    });
    // Not one request is served before the revocations recorded so far are applied: a token
    // revoked before this node started is refused from its first request on. (Connections
    // wait in the listen backlog meanwhile.)
    tokio::select! {
        () = revocations_read => {}
        () = stop.cancelled() => {}
    }
    serve::serve(
        listener,
        http::router(ctx.clone()),
        ctx.per_ip.clone(),
        config.header_timeout,
        stop.clone(),
        config.shutdown_timeout,
    )
    .await;

    drain(
        &config,
        &ctx,
        &conn_tracker,
        &registry,
        &*backplane,
        &tracker,
        &stop,
    )
    .await;
    tracing::info!("chorus node stopped");
    Ok(())
}

/// The log: the embedded one in the data directory, or Redis when a URL is given.
async fn open_backplane(
    config: &Config,
    node: u64,
    tracker: &TaskTracker,
) -> anyhow::Result<Arc<dyn Backplane>> {
    Ok(if config.redis_url.is_empty() {
        Arc::new(EmbeddedBackplane::open(
            &config.data_dir.join("log.redb"),
            config.log_cache_bytes,
            tracker,
        )?)
    } else {
        let settings =
            RedisSettings::from_urls(&config.redis_url, config.redis_timeout, config.presence_ttl);
        Arc::new(RedisBackplane::connect(settings, node, tracker).await?)
    })
}

/// Snapshots: S3 when a URL is given, else files under the data directory (or the one named).
fn open_store(config: &Config) -> anyhow::Result<Arc<dyn storage::SnapshotStore>> {
    Ok(match &config.snapshot_store {
        Some(url) => Arc::new(storage::s3::S3SnapshotStore::from_url(url)?),
        None => Arc::new(FsSnapshotStore::open(
            config
                .snapshot_dir
                .clone()
                .unwrap_or_else(|| config.data_dir.join("snapshots")),
        )?),
    })
}

fn doc_settings(config: &Config) -> DocSettings {
    DocSettings {
        evict_after: config.evict_after,
        compact_entries: config.compact_entries,
        compact_bytes: config.compact_bytes,
        replay_window: config.replay_window,
        replay_memory_bytes: config.replay_memory_bytes,
        max_hot_documents: config.max_hot_documents,
        versions: doc::versions::VersionPolicy {
            interval: config.version_interval,
            keep: config.keep_versions,
        },
    }
}

/// Token checks: a shared secret, a public key, or (loudly) none.
fn open_auth(config: &Config) -> anyhow::Result<auth::Auth> {
    Ok(match (&config.auth_secret, &config.auth_public_key) {
        (Some(secret), _) => auth::Auth::hs256(secret.as_bytes()),
        (None, Some(path)) => auth::Auth::public_key_pem(&std::fs::read(path)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        (None, None) => {
            tracing::warn!(
                "AUTH IS OFF: anyone who can reach this node may read and write every document \
                 (set --auth-secret or --auth-public-key)"
            );
            auth::Auth::disabled()
        }
    })
}

/// After the listener stopped: connections close (1001), documents save, the log flushes,
/// every task ends; each step waits at most until the shutdown deadline.
async fn drain(
    config: &Config,
    ctx: &ConnContext,
    conn_tracker: &TaskTracker,
    registry: &Registry,
    backplane: &dyn Backplane,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) {
    let deadline = tokio::time::Instant::now() + config.shutdown_timeout;
    stop.cancel();
    conn_tracker.close();
    if tokio::time::timeout_at(deadline, conn_tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = ctx.open.load(Ordering::Relaxed),
            "connections still open at the shutdown deadline"
        );
    }
    if tokio::time::timeout_at(deadline, registry.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "documents still saving at the shutdown deadline; the log holds their updates"
        );
    }
    let _ = tokio::time::timeout_at(deadline + Duration::from_secs(1), backplane.close()).await;
    tracker.close();
    if tokio::time::timeout_at(deadline + Duration::from_secs(1), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not finish by the shutdown deadline");
    }
}
