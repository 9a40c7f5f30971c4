//! Change webhooks, the wire end (after data-flow step 4): one signed `document.changed` POST, and the retry clock.

use chorus_protocol::{DocId, Position};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Requests in flight per node, over every document and URL: a node with thousands of marked
/// documents and a slow receiver holds at most this many sockets and bodies.
pub const MAX_IN_FLIGHT: usize = 64;

/// First retry delay after a failed delivery; it doubles per failure up to [`BACKOFF_CAP`].
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);

/// What one request says: the range (from, to] of one document's log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Changed {
    pub event: &'static str,
    pub doc: String,
    /// `null`: no earlier delivery in this epoch (the receiver loads the whole document).
    pub from: Option<String>,
    pub to: String,
    pub updates: u64,
    pub bytes: u64,
    pub sent_at: String,
}

impl Changed {
    pub fn new(
        doc: &DocId,
        from: Option<Position>,
        to: Position,
        updates: u64,
        bytes: u64,
    ) -> Self {
        Changed {
            event: "document.changed",
            doc: doc.to_string(),
            from: from.map(|p| p.to_string()),
            to: to.to_string(),
            updates,
            bytes,
            sent_at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("the receiver answered {0}")]
    Status(u16),
    #[error("no answer within the webhook timeout")]
    Timeout,
    #[error("request failed: {0}")]
    Request(#[from] reqwest::Error),
    #[error("could not encode the body: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the node is shutting down")]
    Closed,
}

/// Sends signed requests, at most [`MAX_IN_FLIGHT`] at a time.
pub struct Sender {
    client: reqwest::Client,
    secret: Vec<u8>,
    timeout: Duration,
    permits: Arc<Semaphore>,
}

impl Sender {
    pub fn new(secret: &str, timeout: Duration) -> Result<Self, reqwest::Error> {
        Ok(Sender {
            client: reqwest::Client::builder()
                .timeout(timeout)
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            secret: secret.as_bytes().to_vec(),
            timeout,
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        })
    }

    /// POSTs `body` to `url`; Ok only on a 2xx answer.
    pub async fn send(&self, url: &str, body: &Changed) -> Result<(), DeliveryError> {
        let bytes = serde_json::to_vec(body)?;
        let signature = sign(&self.secret, &bytes);
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| DeliveryError::Closed)?;
        let request = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Chorus-Signature", format!("sha256={signature}"))
            .header("X-Chorus-Delivery", delivery_id())
            .body(bytes)
            .send();
        // reqwest's own timeout covers the body too; this one also bounds connecting.
        let response = tokio::time::timeout(self.timeout, request)
            .await
            .map_err(|_| DeliveryError::Timeout)??;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(DeliveryError::Status(status.as_u16()))
        }
    }
}

/// Hex HMAC-SHA256 of `body` with `secret`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    hex(&mac.finalize().into_bytes())
}

/// A fresh id per attempt (128 random bits, hex): receivers dedupe by position, the id only
/// tells one attempt from another in their logs and ours.
fn delivery_id() -> String {
    hex(&rand::random::<[u8; 16]>())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// How long to wait before attempt `failures + 1`: doubling from [`BACKOFF_BASE`] to
/// [`BACKOFF_CAP`], with the upper half jittered so that receivers coming back are not hit
/// by every node's and document's retries in the same instant.
pub fn backoff(failures: u32) -> Duration {
    let doubled = BACKOFF_BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    let full = doubled.min(BACKOFF_CAP);
    let half = full / 2;
    half + half.mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter() {
        for failures in 1..40 {
            let d = backoff(failures);
            let full = BACKOFF_BASE
                .saturating_mul(1u32 << (failures - 1).min(20))
                .min(BACKOFF_CAP);
            assert!(d >= full / 2 && d <= full, "{failures}: {d:?}");
        }
    }
}
