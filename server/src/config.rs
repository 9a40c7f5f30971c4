//! One `Config` for the node: clap flags, each with a matching `CHORUS_*` environment variable.

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "chorus",
    version,
    about = "Chorus: real-time sync for yrs/Yjs documents, presence and cursors over WebSocket",
    long_about = "Chorus: real-time sync for yrs/Yjs documents, presence and cursors over WebSocket.\n\n\
        With no backplane configured, one process serves everything from an embedded, fsynced \
        log and a local snapshot directory under --data-dir."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a Chorus node.
    Serve(Config),
}

/// Everything a node needs to run. Durations take humane values: `30s`, `500ms`, `10m`.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on (HTTP and WebSocket).
    #[arg(long, env = "CHORUS_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Directory for the embedded log (`log.redb` and its write-ahead segments) and snapshots (`snapshots/`).
    #[arg(long, env = "CHORUS_DATA_DIR", default_value = "./chorus-data")]
    pub data_dir: PathBuf,

    /// Page cache of the embedded log (redb). Hot documents keep their recent entries
    /// themselves, and the OS caches the file; this mostly serves document loads and catch-up
    /// reads. Checkpoints fill it with the pages they write, so a write burst grows the node by
    /// about this much: 1 MiB grew a node by 6.5 MB under 42 MB of overwrites, 4 MiB by 9.2–9.9
    /// MB, for the same CPU (`bench_slow_readers`).
    #[arg(long, env = "CHORUS_LOG_CACHE_BYTES", default_value_t = 1 << 20)]
    pub log_cache_bytes: usize,

    /// Directory of static files served at `/` (the web demo), if it exists.
    #[arg(long, env = "CHORUS_STATIC_DIR")]
    pub static_dir: Option<PathBuf>,

    /// Largest WebSocket message accepted from a client; larger ones close the socket with 1009.
    #[arg(long, env = "CHORUS_MAX_MESSAGE_BYTES", default_value_t = 4 << 20)]
    pub max_message_bytes: usize,

    /// Largest single document update accepted (native `update`, y-websocket sync, HTTP POST).
    #[arg(long, env = "CHORUS_MAX_UPDATE_BYTES", default_value_t = 2 << 20)]
    pub max_update_bytes: usize,

    /// Most documents one native socket may subscribe to at once.
    #[arg(long, env = "CHORUS_MAX_DOCS_PER_CONNECTION", default_value_t = 256)]
    pub max_docs_per_connection: usize,

    /// New documents one native socket may subscribe to per second (burst: as many as
    /// `--max-docs-per-connection`), so a socket that subscribes and unsubscribes in a loop
    /// cannot load document after document. More are refused with `rate_limited`.
    #[arg(long, env = "CHORUS_MAX_SUBSCRIBES_PER_SECOND", default_value_t = 10)]
    pub max_subscribes_per_second: u32,

    /// Most documents loaded at once on this node. At the cap an idle document (no
    /// subscribers) is unloaded early to make room; when none is idle, opening another one is
    /// refused (native `unavailable`, HTTP 503 with Retry-After).
    #[arg(long, env = "CHORUS_MAX_HOT_DOCUMENTS", default_value_t = 10_000)]
    pub max_hot_documents: usize,

    /// Requests per second one IP address may make to the document API (`/v1/docs/...`:
    /// GET, POST, SSE and long-poll; token bucket, burst twice that). More get HTTP 429 with
    /// Retry-After. 0: no limit (behind a proxy every client shares the proxy's address).
    #[arg(
        long,
        env = "CHORUS_MAX_API_REQUESTS_PER_SECOND",
        default_value_t = 200
    )]
    pub max_api_requests_per_second: u32,

    /// Interval between WebSocket pings the server sends.
    #[arg(long, env = "CHORUS_PING_INTERVAL", default_value = "20s", value_parser = parse_duration)]
    pub ping_interval: Duration,

    /// A connection from which nothing (not even a pong) arrived for ping-interval plus this
    /// long is closed and everything it held is released.
    #[arg(long, env = "CHORUS_PING_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub ping_timeout: Duration,

    /// How long a document stays loaded after its last client left.
    #[arg(long, env = "CHORUS_EVICT_AFTER", default_value = "30s", value_parser = parse_duration)]
    pub evict_after: Duration,

    /// Write a snapshot and trim the log once this many entries arrived since the last one and
    /// their bytes are at least a quarter of that snapshot; after 16 times this many in any case.
    #[arg(long, env = "CHORUS_COMPACT_ENTRIES", default_value_t = 1000)]
    pub compact_entries: usize,

    /// ...or once this many update bytes arrived since the last snapshot.
    #[arg(long, env = "CHORUS_COMPACT_BYTES", default_value_t = 4 << 20)]
    pub compact_bytes: usize,

    /// Log entries younger than this are kept after compaction, so clients that were away for
    /// less than this resume by replay instead of a state-vector sync.
    #[arg(long, env = "CHORUS_REPLAY_WINDOW", default_value = "10m", value_parser = parse_duration)]
    pub replay_window: Duration,

    /// Recent log entries a loaded document keeps in memory to answer resumes without I/O.
    #[arg(long, env = "CHORUS_REPLAY_MEMORY_BYTES", default_value_t = 1 << 20)]
    pub replay_memory_bytes: usize,

    /// Bytes that may wait in one connection's outbox. Past it, what waits is dropped and the
    /// connection is brought up to date from its last delivered position once it drains.
    #[arg(long, env = "CHORUS_OUTBOX_BYTES", default_value_t = 256 << 10)]
    pub outbox_bytes: usize,

    /// A connection whose socket accepts nothing for this long is treated as stalled: it gets
    /// one more period to read what is in flight, then is closed with 4001 ("too slow,
    /// reconnect and resume").
    #[arg(long, env = "CHORUS_SLOW_CLIENT_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub slow_client_timeout: Duration,

    /// Gathers updates for a connection while they keep coming (0 = write each as it comes).
    /// The first update after a quiet spell goes out at once; what arrives after a write waits
    /// for the node's next flush tick (one every interval, shared by all connections) and goes
    /// out with the rest in a single syscall. Trades latency for CPU in big rooms: measured
    /// with 50 readers and 100 updates/s, 30ms cut the node's CPU per delivery by about a third
    /// and added about 16 ms to the median latency (BENCHMARKS.md).
    #[arg(long, env = "CHORUS_FLUSH_INTERVAL", default_value = "0ms", value_parser = parse_duration)]
    pub flush_interval: Duration,

    /// Most awareness (presence) frames per second sent to one connection for one document;
    /// in between, states merge and the newest per client wins.
    #[arg(long, env = "CHORUS_AWARENESS_HZ", default_value_t = 10)]
    pub awareness_hz: u32,

    /// Most WebSocket connections open at once; more get HTTP 503 with Retry-After.
    #[arg(long, env = "CHORUS_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// New WebSocket connections accepted per second (token bucket, burst of the same size);
    /// more get HTTP 429 with Retry-After.
    #[arg(long, env = "CHORUS_MAX_CONNECTIONS_PER_SECOND", default_value_t = 500)]
    pub max_connections_per_second: u32,

    /// Most TCP connections open at once from one IP address (HTTP and WebSocket alike); more
    /// are closed at accept. 0: no per-address limit (behind a proxy every client shares the
    /// proxy's address: set 0 there and limit at the proxy).
    #[arg(long, env = "CHORUS_MAX_CONNECTIONS_PER_IP", default_value_t = 1024)]
    pub max_connections_per_ip: usize,

    /// A client must send a complete HTTP request head within this long after connecting (or
    /// after its previous request on a kept-alive connection); slower ones are dropped. Defends
    /// against slowloris and sockets that connect and never speak.
    #[arg(long, env = "CHORUS_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// Messages per second one connection may send (token bucket, burst twice that). Over it,
    /// native frames are refused with `rate_limited`; y-websocket reads simply slow down.
    #[arg(long, env = "CHORUS_MAX_MESSAGES_PER_SECOND", default_value_t = 500)]
    pub max_messages_per_second: u32,

    /// A document larger than this (encoded size at its last snapshot plus updates since)
    /// takes no more updates: native clients get `document_too_large`, y-websocket clients
    /// a permission-denied message. Reading it keeps working.
    #[arg(long, env = "CHORUS_MAX_DOCUMENT_BYTES", default_value_t = 64 << 20)]
    pub max_document_bytes: usize,

    /// How long an update that builds on changes this node has not applied yet may wait for
    /// them (they may still be on their way from another node) before it is refused with
    /// `missing_dependencies`. yrs would otherwise park it in `pending` forever.
    #[arg(long, env = "CHORUS_MISSING_DEPS_WAIT", default_value = "2s", value_parser = parse_duration)]
    pub missing_deps_wait: Duration,

    /// Redis backplane: `redis://host:port` for one server; repeat the flag (or use
    /// `redis+cluster://h1:p1,h2:p2`) for the seeds of a Redis Cluster. Unset: the embedded log.
    #[arg(long = "redis-url", env = "CHORUS_REDIS_URL")]
    pub redis_url: Vec<String>,

    /// Bound on one Redis round trip: with Redis unreachable, an append fails (retryable
    /// `append_failed`) within about this long, and nothing unappended is acknowledged.
    #[arg(long, env = "CHORUS_REDIS_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub redis_timeout: Duration,

    /// With Redis: a node that stopped heartbeating for this long is dead, and the presence of
    /// its clients disappears from every other node.
    #[arg(long, env = "CHORUS_PRESENCE_TTL", default_value = "15s", value_parser = parse_duration)]
    pub presence_ttl: Duration,

    /// Snapshot directory (default `<data-dir>/snapshots`). Nodes sharing a Redis must share
    /// their snapshots too: point them all at one shared directory.
    #[arg(long, env = "CHORUS_SNAPSHOT_DIR")]
    pub snapshot_dir: Option<PathBuf>,

    /// Snapshots in an S3-compatible object store instead of a directory: `s3://bucket/prefix`.
    /// Endpoint and credentials come from `AWS_ENDPOINT_URL`, `AWS_REGION`,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (`AWS_ALLOW_HTTP=true` for plain HTTP).
    #[arg(long, env = "CHORUS_SNAPSHOT_STORE")]
    pub snapshot_store: Option<String>,

    /// Turns auth on: tokens are HS256 JWTs signed with this secret. Without this or
    /// `--auth-public-key` the node is open to everyone (and says so in its log and /healthz).
    #[arg(long, env = "CHORUS_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,

    /// Turns auth on with a public key (PEM file): Ed25519 (EdDSA) or P-256 (ES256) tokens.
    #[arg(long, env = "CHORUS_AUTH_PUBLIC_KEY")]
    pub auth_public_key: Option<PathBuf>,

    /// Key for the admin API (`Authorization: Bearer <key>`, e.g. revocation); without it the
    /// admin API answers 404.
    #[arg(long, env = "CHORUS_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,

    /// Browser origins allowed to open WebSockets and call the HTTP API, comma-separated
    /// (e.g. `https://app.example.com`). Empty: any origin. Requests without `Origin`
    /// (non-browser clients) are not affected.
    #[arg(long, env = "CHORUS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// A native socket is warned (`auth_expiring`) this long before its token expires.
    #[arg(long, env = "CHORUS_TOKEN_WARNING", default_value = "30s", value_parser = parse_duration)]
    pub token_warning: Duration,

    /// Graceful shutdown deadline: after SIGTERM/SIGINT, the node closes sockets, saves
    /// documents and exits within this long.
    #[arg(long, env = "CHORUS_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Automatic versions of a document: one this long after the first edit since its last
    /// version (a document nobody edits gets none); 0 turns them off.
    #[arg(long, env = "CHORUS_VERSION_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub version_interval: Duration,

    /// Automatic versions kept per document (the newest); named versions are kept until deleted.
    #[arg(long, env = "CHORUS_KEEP_VERSIONS", default_value_t = 50)]
    pub keep_versions: usize,

    /// Change webhooks: POST `document.changed` to this URL (repeatable, or comma-separated);
    /// see the README's "Change webhooks". Needs `--webhook-secret`.
    #[arg(
        long = "webhook-url",
        env = "CHORUS_WEBHOOK_URL",
        value_delimiter = ','
    )]
    pub webhook_url: Vec<String>,

    /// Key of the `X-Chorus-Signature` HMAC-SHA256 over each webhook body.
    #[arg(long, env = "CHORUS_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// A document's webhook is sent this long after its last change...
    #[arg(long, env = "CHORUS_WEBHOOK_DEBOUNCE", default_value = "2s", value_parser = parse_duration)]
    pub webhook_debounce: Duration,

    /// ...and at most this long after its first unsent change.
    #[arg(long, env = "CHORUS_WEBHOOK_MAX_WAIT", default_value = "10s", value_parser = parse_duration)]
    pub webhook_max_wait: Duration,

    /// A webhook request not answered within this long failed (and is retried).
    #[arg(long, env = "CHORUS_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub webhook_timeout: Duration,

    /// With Redis: one node sends a document's webhooks under a lease of this length, renewed
    /// while it sends; if that node dies another takes over once it expires. Longer than
    /// `--webhook-timeout`.
    #[arg(long, env = "CHORUS_WEBHOOK_LEASE", default_value = "30s", value_parser = parse_duration)]
    pub webhook_lease: Duration,
}

impl Config {
    /// A config for tests and embedding: everything default, data under `data_dir`.
    pub fn for_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        let cli = Cli::parse_from(["chorus", "serve", "--listen", "127.0.0.1:0"]);
        let Command::Serve(mut config) = cli.command;
        config.data_dir = data_dir.into();
        config
    }
}

/// A configuration that parses but cannot keep Chorus's promises.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "--replay-window {window:?} is shorter than {min:?}: with a shared log (--redis-url) \
         compaction on another node could trim entries this node's reader has not read yet"
    )]
    ReplayWindowTooShort { window: Duration, min: Duration },
    #[error("--webhook-url needs --webhook-secret (receivers verify the signature with it)")]
    WebhookWithoutSecret,
    #[error("--webhook-url {url:?} is not an http:// or https:// URL")]
    WebhookUrl { url: String },
    #[error("--webhook-lease {lease:?} must be longer than --webhook-timeout {timeout:?}")]
    WebhookLeaseTooShort { lease: Duration, timeout: Duration },
}

impl Config {
    /// Checks what the flags' types cannot. `run` calls it before it opens anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let min = crate::backplane::MIN_SHARED_REPLAY_WINDOW;
        // The embedded log has one reader, in process, that sees every append before the
        // owner can compact: any window is safe there.
        if !self.redis_url.is_empty() && self.replay_window < min {
            return Err(ConfigError::ReplayWindowTooShort {
                window: self.replay_window,
                min,
            });
        }
        crate::webhook::validate(self)
    }
}

/// Parses `250ms`, `30s`, `10m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (try 30s, 500ms, 10m)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!(
            "unknown duration unit in {s:?} (use ms, s, m or h)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn a_shared_log_refuses_a_replay_window_a_reader_could_fall_behind() {
        let mut c = Config::for_data_dir("/tmp/x");
        c.replay_window = Duration::ZERO;
        assert!(c.validate().is_ok(), "the embedded log takes any window");
        c.redis_url = vec!["redis://127.0.0.1:1".into()];
        assert!(matches!(
            c.validate(),
            Err(ConfigError::ReplayWindowTooShort { .. })
        ));
        c.replay_window = crate::backplane::MIN_SHARED_REPLAY_WINDOW;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn defaults_are_sane() {
        let c = Config::for_data_dir("/tmp/x");
        assert!(c.max_update_bytes <= c.max_message_bytes);
        assert_eq!(c.listen.port(), 0);
    }
}
