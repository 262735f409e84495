//! Token buckets for link bandwidth limits (per peer: everything, and
//! resync traffic on its own, so a resync never takes the whole link).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket refilled at `rate` bytes/s, holding at most 100 ms of
/// tokens (bursts stay short). Rate 0 means unlimited.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: AtomicU64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A bucket at `rate` bytes per second (0: unlimited).
    pub(crate) fn new(rate: u64) -> Self {
        Self {
            rate: AtomicU64::new(rate),
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    /// Current rate (0: unlimited).
    pub(crate) fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Changes the rate.
    pub(crate) fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
    }

    /// Waits until `bytes` may be sent.
    pub(crate) async fn take(&self, bytes: u64) {
        loop {
            let rate = self.rate();
            if rate == 0 {
                return;
            }
            let wait = {
                let mut st = self.state.lock().expect("bucket lock poisoned");
                let now = Instant::now();
                let burst = rate as f64 / 10.0;
                st.0 = (st.0 + now.duration_since(st.1).as_secs_f64() * rate as f64).min(burst);
                st.1 = now;
                if st.0 >= 0.0 {
                    // Borrow: a frame larger than the burst goes out and
                    // the debt is paid by waiting before the next one.
                    st.0 -= bytes as f64;
                    return;
                }
                Duration::from_secs_f64(-st.0 / rate as f64)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_the_rate() {
        let bucket = TokenBucket::new(1 << 20);
        let started = tokio::time::Instant::now();
        for _ in 0..20 {
            bucket.take(256 << 10).await;
        }
        // 5 MiB at 1 MiB/s: about 5 s (the first frame goes out at once).
        let secs = started.elapsed().as_secs_f64();
        assert!((4.5..=5.5).contains(&secs), "{secs} s");
        bucket.set_rate(0);
        let started = tokio::time::Instant::now();
        bucket.take(1 << 30).await;
        assert!(started.elapsed() < Duration::from_millis(1));
    }
}
