//! Counters of the core itself, for the metrics listener (`metrics`): each is written where the
//! thing happens, once per batch, commit or socket (never per message unless asked for, see
//! [`Traffic`]), with relaxed atomics and no lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A histogram with fixed upper bounds (Prometheus' `le`), counted without a lock.
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, then the overflow (`+Inf`); not cumulative.
    counts: Box<[AtomicU64]>,
    /// The sum of the observations, in millionths of their unit.
    sum_micros: AtomicU64,
}

impl Histogram {
    #[must_use]
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        let bucket = self.bounds.iter().position(|&bound| value <= bound).unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add((value * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, duration: Duration) {
        self.observe(duration.as_secs_f64());
    }

    /// (upper bound, cumulative count) per bound, the total count, and the sum.
    #[must_use]
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.bounds.len());
        for (bound, count) in self.bounds.iter().zip(self.counts.iter()) {
            cumulative += count.load(Ordering::Relaxed);
            buckets.push((*bound, cumulative));
        }
        let total = cumulative + self.counts[self.bounds.len()].load(Ordering::Relaxed);
        (buckets, total, self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6)
    }
}

/// Events per batch.
pub const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];
/// Seconds, from 50 µs to 2.5 s.
pub const SECONDS_BOUNDS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// What the core counts of its own work, for one server.
pub struct CoreStats {
    /// Events per batch the application thread took.
    pub batch_sizes: Histogram,
    /// From the first event of a batch being queued to the application thread taking it.
    pub loop_lag: Histogram,
    /// Events interrupted for passing their CPU limit, or their wall-time limit.
    pub cpu_kills: AtomicU64,
    pub wall_kills: AtomicU64,
    /// How long each object's `COMMIT` took (on the application thread).
    pub commit_seconds: Histogram,
    /// How long each round of the committer took to make the commits durable (fsyncs).
    pub sync_seconds: Histogram,
}

impl Default for CoreStats {
    fn default() -> Self {
        Self {
            batch_sizes: Histogram::new(BATCH_BOUNDS),
            loop_lag: Histogram::new(SECONDS_BOUNDS),
            cpu_kills: AtomicU64::new(0),
            wall_kills: AtomicU64::new(0),
            commit_seconds: Histogram::new(SECONDS_BOUNDS),
            sync_seconds: Histogram::new(SECONDS_BOUNDS),
        }
    }
}

/// Nanoseconds since the first call in this process (a clock an atomic can hold).
#[must_use]
pub fn monotonic_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// One socket's traffic, for the access log (`--access-log`): kept only when it is on, so that
/// with it off the per-message path does no new work; with it on, one relaxed add on the
/// socket's own counters per message and per read or write.
#[derive(Debug)]
pub struct Traffic {
    pub opened: Instant,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

impl Default for Traffic {
    fn default() -> Self {
        Self {
            opened: Instant::now(),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        }
    }
}

impl Traffic {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// (messages in, messages out, bytes in, bytes out, seconds open).
    #[must_use]
    pub fn snapshot(&self) -> (u64, u64, u64, u64, f64) {
        (
            self.messages_in.load(Ordering::Relaxed),
            self.messages_out.load(Ordering::Relaxed),
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
            self.opened.elapsed().as_secs_f64(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let histogram = Histogram::new(&[1.0, 10.0]);
        for value in [0.5, 1.0, 5.0, 50.0] {
            histogram.observe(value);
        }
        let (buckets, count, sum) = histogram.snapshot();
        assert_eq!(buckets, vec![(1.0, 2), (10.0, 3)]);
        assert_eq!(count, 4);
        assert!((sum - 56.5).abs() < 1e-3);
    }
}
