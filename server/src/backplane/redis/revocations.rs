//! Redis backplane, revocations (beside the data flow): every node follows one revocation stream.

use super::conn::{Conn, query};
use super::keys::REVOCATIONS_KEY;
use super::reader::{BLOCK, ReadConn, Reader};
use super::reply::parse_xread;
use crate::backplane::{BackplaneResult, Revocation, RevocationSink};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::oneshot;

/// Appends one revocation to the stream every node follows.
pub(super) async fn publish(
    mut conn: Conn,
    timeout: Duration,
    rev: Revocation,
) -> BackplaneResult<()> {
    let mut cmd = redis::cmd("XADD");
    // Kept generously: a subject revocation matters for as long as tokens issued before
    // it live, and entries are tiny.
    cmd.arg(REVOCATIONS_KEY)
        .arg("MAXLEN")
        .arg("~")
        .arg(100_000)
        .arg("*")
        .arg("t")
        .arg(rev.at);
    if let Some(sub) = &rev.sub {
        cmd.arg("s").arg(sub);
    }
    if let Some(jti) = &rev.jti {
        cmd.arg("j").arg(jti);
    }
    if let Some(exp) = rev.exp {
        cmd.arg("x").arg(exp);
    }
    query(&mut conn, &cmd, timeout).await.map(drop)
}

/// Follows the revocation stream from its start for as long as the node runs, reconnecting
/// after Redis failures and continuing after the last entry applied. Until it has read to the
/// end of the stream once, it reads without blocking; then it says so on `caught_up` (the node
/// serves nobody before that) and blocks for new entries from then on.
pub(super) async fn run_revocations(
    reader: Reader,
    apply: RevocationSink,
    caught_up: oneshot::Sender<()>,
) {
    let mut caught_up = Some(caught_up);
    let mut last = "0-0".to_string();
    let mut backoff = Duration::from_millis(50);
    while !reader.inner.cancel.is_cancelled() {
        let conn = tokio::select! {
            _ = reader.inner.cancel.cancelled() => return,
            c = reader.connect() => c,
        };
        let mut conn = match conn {
            Ok(ReadConn::Single(c)) => Conn::Plain(c),
            Ok(ReadConn::Cluster(c)) => Conn::Cluster(c),
            Err(e) => {
                tracing::warn!(error = %e, "revocation reader cannot reach redis; retrying");
                tokio::select! {
                    _ = reader.inner.cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        loop {
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT").arg(1000);
            if caught_up.is_none() {
                cmd.arg("BLOCK").arg(BLOCK.as_millis() as u64);
            }
            cmd.arg("STREAMS").arg(REVOCATIONS_KEY).arg(&last);
            let reply = tokio::select! {
                _ = reader.inner.cancel.cancelled() => return,
                r = query(&mut conn, &cmd, BLOCK + reader.inner.settings.timeout) => r,
            };
            let batches = match reply.and_then(parse_xread) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "revocation reader lost redis; reconnecting");
                    break;
                }
            };
            let mut read = 0;
            for (_, entries) in batches {
                for (id, fields) in entries {
                    read += 1;
                    if let Some(rev) = revocation_from(&fields) {
                        apply(rev);
                    }
                    last = id;
                }
            }
            if read == 0
                && let Some(done) = caught_up.take()
            {
                tracing::debug!(last = %last, "revocations caught up");
                let _ = done.send(());
            }
        }
    }
}

fn revocation_from(fields: &HashMap<String, Vec<u8>>) -> Option<Revocation> {
    let text = |k: &str| {
        fields
            .get(k)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned)
    };
    let number = |k: &str| text(k).and_then(|v| v.parse::<u64>().ok());
    let rev = Revocation {
        sub: text("s"),
        jti: text("j"),
        exp: number("x"),
        at: number("t")?,
    };
    (rev.sub.is_some() || rev.jti.is_some()).then_some(rev)
}
