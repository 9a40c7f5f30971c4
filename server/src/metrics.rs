//! Operator view of the data flow: `/metrics` (Prometheus text) and `/readyz` figures.
//!
//! Event counters and latency histograms are recorded where the bytes pass (reader, writer,
//! append, fan-out, backplane) through the `metrics` facade. The facade has one global
//! recorder per process, so [`handle`] installs a Prometheus recorder once (`OnceLock`) and
//! every node in the process renders from it: a process runs one node in production, and in
//! tests that start several in-process nodes the event series are the sum over them (the
//! tests only check that series move). Figures that are a node's *state* — open connections,
//! hot documents, outbox bytes, outbox merges and sheds — are not summed: each node writes
//! them from its own state when it renders ([`render`]).

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Every series name in one place, so a grep finds where each is recorded.
pub mod names {
    pub const CONNECTIONS: &str = "chorus_connections";
    pub const HOT_DOCUMENTS: &str = "chorus_hot_documents";
    pub const FRAMES_IN: &str = "chorus_frames_in_total";
    pub const BYTES_IN: &str = "chorus_bytes_in_total";
    pub const FRAMES_OUT: &str = "chorus_frames_out_total";
    pub const BYTES_OUT: &str = "chorus_bytes_out_total";
    pub const UPDATES_IN: &str = "chorus_updates_in_total";
    pub const UPDATES_OUT: &str = "chorus_updates_out_total";
    pub const APPEND_ERRORS: &str = "chorus_append_errors_total";
    pub const APPEND_SECONDS: &str = "chorus_append_seconds";
    pub const FANOUT_SECONDS: &str = "chorus_fanout_seconds";
    pub const OUTBOX_BYTES: &str = "chorus_outbox_bytes";
    pub const OUTBOX_LARGEST_BYTES: &str = "chorus_outbox_largest_bytes";
    pub const OUTBOX_MERGED_FRAMES: &str = "chorus_outbox_merged_frames_total";
    pub const OUTBOX_MERGED_UPDATES: &str = "chorus_outbox_merged_updates_total";
    pub const OUTBOX_SHEDS: &str = "chorus_outbox_sheds_total";
    pub const RESYNCS: &str = "chorus_resyncs_total";
    pub const LOG_GAPS: &str = "chorus_log_gaps_total";
    pub const ANSWERED_WHILE_LOADING: &str = "chorus_answered_while_loading_total";
    pub const CLOSES: &str = "chorus_closes_total";
    pub const STREAM_READ_LAG_SECONDS: &str = "chorus_stream_read_lag_seconds";
    pub const REDIS_ERRORS: &str = "chorus_redis_errors_total";
    pub const LOG_CHECKPOINTS: &str = "chorus_log_checkpoints_total";
    pub const LOG_CHECKPOINT_SECONDS: &str = "chorus_log_checkpoint_seconds";
}

/// Latency buckets (seconds): 50 µs to 5 s, dense where a healthy node lives.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's Prometheus handle, installing the recorder on first use. `None` if another
/// recorder was installed first (an embedding application's own): then `/metrics` shows only
/// the per-node state figures.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    describe();
                    Some(handle)
                }
                Err(_) => {
                    tracing::warn!(
                        "a metrics recorder was already installed; /metrics shows node state only"
                    );
                    None
                }
            }
        })
        .as_ref()
}

fn describe() {
    use names::*;
    metrics::describe_counter!(FRAMES_IN, "WebSocket binary messages received from clients");
    metrics::describe_counter!(BYTES_IN, "Bytes of WebSocket binary messages received");
    metrics::describe_counter!(FRAMES_OUT, "WebSocket binary messages sent to clients");
    metrics::describe_counter!(BYTES_OUT, "Bytes of WebSocket binary messages sent");
    metrics::describe_counter!(UPDATES_IN, "Client updates appended to the log");
    metrics::describe_counter!(
        UPDATES_OUT,
        "Updates handed to subscriber outboxes (one per recipient)"
    );
    metrics::describe_counter!(APPEND_ERRORS, "Appends the log refused or failed");
    metrics::describe_histogram!(
        APPEND_SECONDS,
        "Time from a client update's append call until the log acknowledged it"
    );
    metrics::describe_histogram!(
        FANOUT_SECONDS,
        "Time one log entry takes to reach every subscriber's outbox"
    );
    metrics::describe_counter!(RESYNCS, "Connections brought up to date by a resync");
    metrics::describe_counter!(
        LOG_GAPS,
        "Documents that found their log trimmed past what they applied and reloaded from the snapshot"
    );
    metrics::describe_counter!(
        ANSWERED_WHILE_LOADING,
        "Joins and reads answered from a large snapshot's bytes while it was being integrated"
    );
    metrics::describe_counter!(CLOSES, "Connections closed, by WebSocket close code");
    metrics::describe_histogram!(
        STREAM_READ_LAG_SECONDS,
        "Age of the newest entry of each batch read from the log when it reached the node"
    );
    metrics::describe_counter!(REDIS_ERRORS, "Failed Redis commands, by operation");
    metrics::describe_counter!(
        LOG_CHECKPOINTS,
        "Embedded log: write-ahead segments moved into redb, by outcome"
    );
    metrics::describe_histogram!(
        LOG_CHECKPOINT_SECONDS,
        "Embedded log: time one checkpoint of write-ahead segments into redb took"
    );
}

/// Handles for the series recorded once or more per message, looked up once: `counter!` by
/// name hashes the name and searches the recorder's registry on every call, which was 1.4 % of
/// the node's CPU in S1.
pub struct Hot {
    pub frames_in: Counter,
    pub bytes_in: Counter,
    pub frames_out: Counter,
    pub bytes_out: Counter,
    pub updates_in: Counter,
    pub updates_out: Counter,
    pub append_errors: Counter,
    pub append_seconds: Histogram,
    pub fanout_seconds: Histogram,
    pub stream_read_lag_seconds: Histogram,
}

static HOT: OnceLock<Hot> = OnceLock::new();

pub fn hot() -> &'static Hot {
    HOT.get_or_init(|| {
        // The recorder first: handles taken before it is installed would record nowhere.
        let _ = handle();
        use names::*;
        Hot {
            frames_in: metrics::counter!(FRAMES_IN),
            bytes_in: metrics::counter!(BYTES_IN),
            frames_out: metrics::counter!(FRAMES_OUT),
            bytes_out: metrics::counter!(BYTES_OUT),
            updates_in: metrics::counter!(UPDATES_IN),
            updates_out: metrics::counter!(UPDATES_OUT),
            append_errors: metrics::counter!(APPEND_ERRORS),
            append_seconds: metrics::histogram!(APPEND_SECONDS),
            fanout_seconds: metrics::histogram!(FANOUT_SECONDS),
            stream_read_lag_seconds: metrics::histogram!(STREAM_READ_LAG_SECONDS),
        }
    })
}

/// Records a histogram sample in seconds.
pub fn observe(name: &'static str, d: Duration) {
    metrics::histogram!(name).record(d.as_secs_f64());
}

/// `/metrics` body for one node: its state figures, then the process's event series.
///
/// State figures are written here from this node's own state rather than set on the global
/// recorder, so two nodes in one process (tests) never show each other's values.
// Stays whole: one table of this node's figures, one row each.
pub fn render(ctx: &crate::connection::ConnContext) -> String {
    use names::*;
    use std::fmt::Write;
    let (total, largest) = ctx.outbox_bytes();
    let s = &ctx.stats;
    let state: [(&str, &str, &str, u64); 13] = [
        (
            CONNECTIONS,
            "gauge",
            "Open WebSocket connections",
            ctx.open.load(Ordering::Relaxed) as u64,
        ),
        (
            HOT_DOCUMENTS,
            "gauge",
            "Documents loaded on this node",
            ctx.registry.hot_documents() as u64,
        ),
        (
            OUTBOX_BYTES,
            "gauge",
            "Bytes waiting in connection outboxes",
            total as u64,
        ),
        (
            OUTBOX_LARGEST_BYTES,
            "gauge",
            "Bytes waiting in the fullest outbox",
            largest as u64,
        ),
        (
            OUTBOX_MERGED_FRAMES,
            "counter",
            "Frames that carried several updates merged by an outbox",
            s.merged_frames.load(Ordering::Relaxed),
        ),
        (
            OUTBOX_MERGED_UPDATES,
            "counter",
            "Updates that went out inside merged frames",
            s.merged_updates.load(Ordering::Relaxed),
        ),
        (
            "chorus_outbox_writes_total",
            "counter",
            "Socket writes that carried drained outbox frames",
            s.writes.load(Ordering::Relaxed),
        ),
        (
            "chorus_outbox_frames_written_total",
            "counter",
            "Frames carried by those writes (several per write when they share one)",
            s.frames_written.load(Ordering::Relaxed),
        ),
        (
            OUTBOX_SHEDS,
            "counter",
            "Outboxes over budget whose pending updates were dropped for a resync",
            s.sheds.load(Ordering::Relaxed),
        ),
        (
            "chorus_refused_writes_total",
            "counter",
            "Updates refused because the token grants only read access",
            ctx.door.stats.refused_writes.load(Ordering::Relaxed),
        ),
        (
            "chorus_refused_missing_dependencies_total",
            "counter",
            "Updates refused because what they build on never reached the document",
            ctx.door.stats.refused_missing_deps.load(Ordering::Relaxed),
        ),
        (
            "chorus_refused_awareness_total",
            "counter",
            "Awareness updates refused for touching another connection's client id",
            ctx.registry.refused_awareness(),
        ),
        (
            "chorus_refused_connections_per_ip_total",
            "counter",
            "TCP connections closed at accept: over the per-address limit",
            ctx.per_ip.refused.load(Ordering::Relaxed),
        ),
    ];
    let mut out = String::with_capacity(4096);
    for (name, kind, help, v) in state {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        );
    }
    if let Some(h) = handle() {
        out.push_str(&h.render());
    }
    out
}
