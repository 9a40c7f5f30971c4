//! Admission and rate limits at the edge: token buckets for new connections and for each
//! connection's messages, and the slot that counts open connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32) -> Self {
        TokenBucket {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes a token if there is one.
    pub fn try_take(&mut self) -> bool {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until a token is available.
    pub fn wait_time(&mut self) -> Duration {
        self.refill();
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        }
    }
}

/// Counts open connections; a slot is released when dropped, even if the upgrade never
/// completed.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    /// Takes a slot if fewer than `max` are open.
    pub fn acquire(open: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| ConnectionSlot(open.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let mut b = TokenBucket::new(10, 3);
        assert!(b.try_take() && b.try_take() && b.try_take());
        assert!(!b.try_take());
        let w = b.wait_time();
        assert!(
            w > Duration::ZERO && w <= Duration::from_millis(100),
            "{w:?}"
        );
        std::thread::sleep(Duration::from_millis(120));
        assert!(b.try_take());
    }

    #[test]
    fn slots_are_bounded_and_released_on_drop() {
        let open = Arc::new(AtomicUsize::new(0));
        let a = ConnectionSlot::acquire(&open, 2).expect("first");
        let _b = ConnectionSlot::acquire(&open, 2).expect("second");
        assert!(ConnectionSlot::acquire(&open, 2).is_none());
        drop(a);
        assert!(ConnectionSlot::acquire(&open, 2).is_some());
        assert_eq!(open.load(Ordering::Acquire), 1);
    }
}
