//! Counters and gauges shared by the log, the actors and the API.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A monotonic counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn add(&self, v: i64) {
        self.0.fetch_add(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A rate over a recent window, from a running total sampled now and then.
#[derive(Debug)]
pub struct RateMeter {
    samples: Mutex<VecDeque<(Instant, u64)>>,
    window: Duration,
}

impl RateMeter {
    pub fn new(window: Duration) -> Self {
        Self {
            samples: Mutex::default(),
            window,
        }
    }

    /// Record the total as of now.
    pub fn observe(&self, total: u64) {
        let now = Instant::now();
        let mut samples = self.samples.lock().unwrap();
        samples.push_back((now, total));
        while samples.len() > 2 && samples[1].0 + self.window <= now {
            samples.pop_front();
        }
    }

    /// Per second over the window; `None` until it spans a second.
    pub fn per_s(&self) -> Option<f64> {
        let samples = self.samples.lock().unwrap();
        let (first, last) = (samples.front()?, samples.back()?);
        let span = last.0.duration_since(first.0).as_secs_f64();
        (span >= 1.0).then(|| last.1.saturating_sub(first.1) as f64 / span)
    }
}

/// Upper bounds (ms) of the lateness histogram's buckets; the last bucket
/// counts everything later.
pub const LATENESS_BOUNDS_MS: [u64; 8] = [1, 2, 5, 10, 20, 50, 100, 1000];

/// A fixed-bucket histogram of milliseconds (cumulative on export).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 9],
}

impl Histogram {
    pub fn record(&self, ms: u64) {
        let i = LATENESS_BOUNDS_MS
            .iter()
            .position(|&b| ms <= b)
            .unwrap_or(LATENESS_BOUNDS_MS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts per bucket, not cumulative.
    pub fn counts(&self) -> [u64; 9] {
        std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed))
    }
}
