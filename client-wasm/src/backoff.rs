//! Reconnect timing: exponential backoff with full jitter, capped; consulted by the session when a socket closes.

/// Exponential backoff with "full jitter": the n-th retry waits a uniformly random time in
/// `[0, min(cap, base * 2^n))`. Full jitter (rather than a fixed delay plus a little noise)
/// spreads a crowd of clients that lost the same server over the whole window, so a restarted
/// node is not hit by every client in the same few milliseconds.
#[derive(Debug, Clone)]
pub struct Backoff {
    base_ms: u32,
    cap_ms: u32,
    attempt: u32,
}

impl Backoff {
    pub fn new(base_ms: u32, cap_ms: u32) -> Self {
        Backoff {
            base_ms: base_ms.max(1),
            cap_ms: cap_ms.max(base_ms.max(1)),
            attempt: 0,
        }
    }

    /// The upper bound of the next delay, before jitter.
    pub fn window_ms(&self) -> u32 {
        // 2^attempt overflows quickly; saturate instead, the cap applies anyway.
        let factor = 1u64.checked_shl(self.attempt.min(31)).unwrap_or(u64::MAX);
        (u64::from(self.base_ms).saturating_mul(factor)).min(u64::from(self.cap_ms)) as u32
    }

    /// The delay before the next attempt, given `random` uniform in `[0, 1)` (the caller owns
    /// the randomness, so the core stays deterministic under test). Advances the attempt count.
    pub fn next_delay_ms(&mut self, random: f64) -> u32 {
        let window = self.window_ms();
        self.attempt = self.attempt.saturating_add(1);
        let r = if random.is_finite() {
            random.clamp(0.0, 1.0)
        } else {
            0.0
        };
        // floor(r * window) is below window for r < 1; r == 1 (a sloppy RNG) is clamped too.
        ((r * f64::from(window)) as u32).min(window.saturating_sub(1))
    }

    /// How many delays were handed out since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Called once a connection proved healthy (every document synced), not merely opened: a
    /// server that accepts and then drops sockets must not make clients retry in a tight loop.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_doubles_until_the_cap() {
        let mut b = Backoff::new(250, 5_000);
        let windows: Vec<u32> = (0..8)
            .map(|_| {
                let w = b.window_ms();
                b.next_delay_ms(0.5);
                w
            })
            .collect();
        assert_eq!(windows, [250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
    }

    #[test]
    fn full_jitter_stays_in_zero_to_window() {
        let mut b = Backoff::new(100, 3_000);
        // A cheap deterministic generator covering [0, 1), both ends included as inputs.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in 0..10_000 {
            let window = b.window_ms();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let r = match i % 100 {
                0 => 0.0,
                1 => 0.999_999_999,
                2 => 1.0,
                3 => f64::NAN,
                _ => (x >> 11) as f64 / (1u64 << 53) as f64,
            };
            let d = b.next_delay_ms(r);
            assert!(d < window, "delay {d} outside [0, {window})");
            if i % 50 == 49 {
                b.reset();
            }
        }
        let mut b = Backoff::new(100, 3_000);
        assert_eq!(b.next_delay_ms(0.0), 0, "full jitter reaches zero");
    }

    #[test]
    fn many_attempts_do_not_overflow_and_reset_restarts() {
        let mut b = Backoff::new(1_000, 30_000);
        for _ in 0..200 {
            assert!(b.next_delay_ms(0.99) < 30_000);
        }
        assert_eq!(b.window_ms(), 30_000);
        b.reset();
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.window_ms(), 1_000);
    }
}
