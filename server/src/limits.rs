//! Admission and rate limits at the edge: token buckets for new connections, for each
//! connection's messages and for each address's document-API requests, and the slot that
//! counts open connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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

    /// Takes a token, or says how long until one is available.
    pub fn take_or_wait(&mut self) -> Result<(), Duration> {
        if self.try_take() {
            Ok(())
        } else {
            Err(self.wait_time())
        }
    }

    /// Whether the bucket refilled completely: forgetting it changes nothing, since a new
    /// bucket starts full.
    fn is_full(&mut self) -> bool {
        self.refill();
        self.tokens >= self.burst
    }
}

/// Addresses tracked one by one; past this, addresses not yet tracked share one bucket.
const MAX_TRACKED_ADDRESSES: usize = 65_536;
/// Full buckets are forgotten at most this often (a sweep walks every tracked address).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A token bucket per client address, for requests that are not on a connection of their own
/// (the HTTP document API). Memory is bounded whatever the addresses: a bucket that refilled
/// is forgotten, and when [`MAX_TRACKED_ADDRESSES`] are busy at once the others share one
/// bucket, so they are still limited (together) rather than tracked without bound.
pub struct PerIpRate {
    rate: u32,
    burst: u32,
    state: Mutex<RateState>,
    /// Requests refused so far.
    pub refused: AtomicU64,
}

struct RateState {
    buckets: HashMap<IpAddr, TokenBucket>,
    overflow: TokenBucket,
    swept: Instant,
}

impl PerIpRate {
    /// `rate` requests per second per address, bursts of `burst`; a rate of 0 limits nothing.
    pub fn new(rate: u32, burst: u32) -> Self {
        PerIpRate {
            rate,
            burst,
            state: Mutex::new(RateState {
                buckets: HashMap::new(),
                overflow: TokenBucket::new(rate, burst),
                swept: Instant::now(),
            }),
            refused: AtomicU64::new(0),
        }
    }

    /// Takes a token for a request from `ip`, or says how long until it may retry.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        if self.rate == 0 {
            return Ok(());
        }
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut *guard;
        if !s.buckets.contains_key(&ip)
            && s.buckets.len() >= MAX_TRACKED_ADDRESSES
            && s.swept.elapsed() >= SWEEP_EVERY
        {
            s.buckets.retain(|_, b| !b.is_full());
            s.swept = Instant::now();
        }
        let answer = if s.buckets.len() < MAX_TRACKED_ADDRESSES || s.buckets.contains_key(&ip) {
            s.buckets
                .entry(ip)
                .or_insert_with(|| TokenBucket::new(self.rate, self.burst))
                .take_or_wait()
        } else {
            s.overflow.take_or_wait()
        };
        if answer.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        answer
    }

    /// Addresses tracked right now.
    pub fn tracked(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .buckets
            .len()
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
    fn per_address_buckets_limit_each_address_and_stay_bounded() {
        let rate = PerIpRate::new(1, 2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        assert!(rate.check(a).is_ok() && rate.check(a).is_ok());
        let wait = rate.check(a).expect_err("third request in the burst");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(rate.check(b).is_ok(), "another address has its own bucket");
        assert_eq!(rate.refused.load(Ordering::Relaxed), 1);

        // Many addresses: never more buckets than the bound; the rest share one.
        let many = PerIpRate::new(1, 1);
        for i in 0..(MAX_TRACKED_ADDRESSES as u32 + 10) {
            let _ = many.check(IpAddr::from(i.to_be_bytes()));
        }
        assert_eq!(many.tracked(), MAX_TRACKED_ADDRESSES);
        assert!(PerIpRate::new(0, 0).check(a).is_ok(), "rate 0: no limit");
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
