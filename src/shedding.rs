//! Adaptive load shedding at ingest: a concurrency limit per namespace,
//! adapted from the latency of the durable append, as Netflix's
//! concurrency-limits does (<https://github.com/Netflix/concurrency-limits>).
//!
//! A write request (a single write, a batch, a set) takes one slot for as
//! long as its append is in flight, as a request does in concurrency-limits;
//! one that finds no slot is answered 429 `"durable":"false"` at once, with
//! a `Retry-After`, instead of waiting in a queue that only makes every write
//! slower. Each finished append is one latency sample for the algorithm,
//! which moves the limit. (`server.max_in_flight` bounds the entries.)
//!
//! **Priorities.** Each priority may fill a share of the limit: by default
//! `batch` 80%, `normal` 90%, `critical` all of it. As load rises, `batch`
//! writes are refused first, then `normal`, and `critical` last. (Netflix's
//! partitioned limiter instead guarantees each class a share, which does not
//! shed `batch` first when `batch` is a small part of the traffic; nested
//! shares do.)
//!
//! A leaf: it knows the config and the clock, nothing of HTTP or backends.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::config::{Priority, ShedAlgorithm, SheddingConfig};

/// One namespace's limiter. Shared by every request to the namespace.
pub struct Limiter {
    algorithm: Mutex<Algorithm>,
    /// The current limit, in requests (read without the lock).
    limit: AtomicUsize,
    in_flight: AtomicUsize,
    /// The smoothed append latency, in microseconds, for `Retry-After`.
    latency_us: AtomicU64,
    /// The share of the limit each priority may fill, by [`Priority::index`].
    shares: [f64; 3],
    /// Requests refused, by [`Priority::index`].
    shed: [AtomicU64; 3],
}

/// A refusal: the limit is full for this priority.
#[derive(Debug, Clone, Copy)]
pub struct Shed {
    pub limit: usize,
    pub in_flight: usize,
    /// How long the writes in flight take to drain at the measured latency.
    pub retry_after: Duration,
}

/// The slot of a request in flight. [`Permit::done`] reports its latency;
/// dropped without it (a panic, a cancelled request), the slot is freed and
/// nothing is learned.
pub struct Permit<'a> {
    limiter: &'a Limiter,
    in_flight_at_start: usize,
    started: Instant,
}

/// The counters and the limit, for stats and `/metrics`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct LimiterStats {
    pub algorithm: &'static str,
    pub limit: usize,
    pub in_flight: usize,
    pub latency_us: u64,
    pub shed_critical: u64,
    pub shed_normal: u64,
    pub shed_batch: u64,
}

impl Limiter {
    pub fn new(config: &SheddingConfig) -> Self {
        let algorithm = Algorithm::new(config);
        let limit = algorithm.limit();
        Self {
            algorithm: Mutex::new(algorithm),
            limit: AtomicUsize::new(limit),
            in_flight: AtomicUsize::new(0),
            latency_us: AtomicU64::new(0),
            shares: [1.0, config.normal_share, config.batch_share],
            shed: Default::default(),
        }
    }

    /// Take a slot at `priority`, or refuse: a request is let in while what
    /// is in flight is under its priority's share of the limit.
    pub fn acquire(&self, priority: Priority) -> Result<Permit<'_>, Shed> {
        let limit = self.limit.load(Ordering::Relaxed);
        let allowed = ((limit as f64) * self.shares[priority.index()]).ceil() as usize;
        let before = self.in_flight.load(Ordering::Acquire);
        if before >= allowed {
            self.shed[priority.index()].fetch_add(1, Ordering::Relaxed);
            return Err(Shed {
                limit,
                in_flight: before,
                retry_after: self.retry_after(before, limit),
            });
        }
        // Two requests may pass the check together and overshoot a little:
        // the limit is a target, not an invariant.
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        Ok(Permit {
            limiter: self,
            in_flight_at_start: before + 1,
            started: Instant::now(),
        })
    }

    /// The writes in flight drain in about one latency per limit's worth of
    /// them; never less than a millisecond.
    fn retry_after(&self, in_flight: usize, limit: usize) -> Duration {
        let latency = self.latency_us.load(Ordering::Relaxed).max(1_000);
        let rounds = (in_flight as f64 / limit.max(1) as f64).max(1.0);
        Duration::from_micros((latency as f64 * rounds) as u64)
    }

    pub fn stats(&self) -> LimiterStats {
        let shed = |p: Priority| self.shed[p.index()].load(Ordering::Relaxed);
        LimiterStats {
            algorithm: self.algorithm.lock().unwrap().name(),
            limit: self.limit.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            latency_us: self.latency_us.load(Ordering::Relaxed),
            shed_critical: shed(Priority::Critical),
            shed_normal: shed(Priority::Normal),
            shed_batch: shed(Priority::Batch),
        }
    }

    fn sample(&self, rtt: Duration, in_flight: usize, dropped: bool) {
        let us = rtt.as_micros().min(u64::MAX as u128) as u64;
        // An exponential average over about 100 samples.
        let old = self.latency_us.load(Ordering::Relaxed);
        let smoothed = match old {
            0 => us,
            _ => old - old / 100 + us / 100,
        };
        self.latency_us.store(smoothed, Ordering::Relaxed);
        let mut algorithm = self.algorithm.lock().unwrap();
        let limit = algorithm.update(rtt, in_flight, dropped);
        self.limit.store(limit, Ordering::Relaxed);
    }
}

impl Permit<'_> {
    /// The append finished: `dropped` if the backend failed it or did not
    /// answer in time, which counts as overload.
    pub fn done(self, dropped: bool) {
        let rtt = self.started.elapsed();
        self.limiter.sample(rtt, self.in_flight_at_start, dropped);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.limiter.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

enum Algorithm {
    Fixed(usize),
    Gradient2(Gradient2),
    Vegas(Vegas),
}

impl Algorithm {
    fn new(c: &SheddingConfig) -> Self {
        let initial = c.initial_limit as f64;
        match c.algorithm {
            ShedAlgorithm::Fixed => Self::Fixed(c.initial_limit),
            ShedAlgorithm::Gradient2 => Self::Gradient2(Gradient2 {
                limit: initial,
                min: c.min_limit as f64,
                max: c.max_limit as f64,
                long_rtt: Ema::new(600, 10),
            }),
            ShedAlgorithm::Vegas => Self::Vegas(Vegas {
                limit: initial,
                max: c.max_limit as f64,
                min: c.min_limit as f64,
                rtt_noload: None,
                probes: 0,
            }),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Fixed(_) => "fixed",
            Self::Gradient2(_) => "gradient2",
            Self::Vegas(_) => "vegas",
        }
    }

    fn limit(&self) -> usize {
        match self {
            Self::Fixed(l) => *l,
            Self::Gradient2(g) => g.limit as usize,
            Self::Vegas(v) => v.limit as usize,
        }
    }

    fn update(&mut self, rtt: Duration, in_flight: usize, dropped: bool) -> usize {
        let rtt = rtt.as_secs_f64().max(1e-6);
        match self {
            Self::Fixed(_) => {}
            Self::Gradient2(g) => g.update(rtt, in_flight as f64, dropped),
            Self::Vegas(v) => v.update(rtt, in_flight as f64, dropped),
        }
        self.limit()
    }
}

/// Gradient2, after concurrency-limits' `Gradient2Limit`: the ratio of a
/// long-term latency average to the latest sample says whether a queue is
/// forming.
///
/// ```text
/// gradient  = clamp(tolerance × long_rtt / rtt, 0.5, 1.0)
/// new_limit = limit × gradient + queue_size
/// limit     = limit × (1 − smoothing) + new_limit × smoothing
/// ```
///
/// with tolerance 1.5 and smoothing 0.2 as there. The queue size is
/// `√limit` (Gradient v1's), not the fixed 4 of `Gradient2Limit`, so the
/// limit climbs to a log's group-commit concurrency in hundreds of samples,
/// not thousands.
struct Gradient2 {
    limit: f64,
    min: f64,
    max: f64,
    long_rtt: Ema,
}

impl Gradient2 {
    const TOLERANCE: f64 = 1.5;
    const SMOOTHING: f64 = 0.2;

    fn update(&mut self, rtt: f64, in_flight: f64, dropped: bool) {
        let long = self.long_rtt.add(rtt);
        // After a long overload the average lags far above the present:
        // pull it down rather than wait for the smoothing.
        if long / rtt > 2.0 {
            self.long_rtt.scale(0.95);
        }
        if dropped {
            // Not in Gradient2Limit, which ignores drops; here a failed or
            // timed-out append is the plainest sign of overload.
            self.limit = (self.limit * 0.9).max(self.min);
            return;
        }
        // Too little traffic to say anything about the limit.
        if in_flight < self.limit / 2.0 {
            return;
        }
        let gradient = (Self::TOLERANCE * long / rtt).clamp(0.5, 1.0);
        let new_limit = self.limit * gradient + self.limit.sqrt();
        let smoothed = self.limit * (1.0 - Self::SMOOTHING) + new_limit * Self::SMOOTHING;
        self.limit = smoothed.clamp(self.min, self.max);
    }
}

/// Vegas, after concurrency-limits' `VegasLimit` (from TCP Vegas, Brakmo and
/// Peterson 1995): the queue is estimated from the least latency seen (no
/// load) and the latest sample.
///
/// ```text
/// queue = ceil(limit × (1 − rtt_noload / rtt))
/// α = 3·log10(limit), β = 6·log10(limit), threshold = log10(limit)
/// queue ≤ threshold: limit += β;  queue < α: limit += log10(limit)
/// queue > β: limit −= log10(limit);  a drop: limit −= log10(limit)
/// ```
///
/// The no-load latency is measured again every `30 × limit` samples (the
/// probe), so a change of disk or host is learned.
struct Vegas {
    limit: f64,
    min: f64,
    max: f64,
    rtt_noload: Option<f64>,
    probes: u64,
}

impl Vegas {
    const PROBE_MULTIPLIER: f64 = 30.0;

    fn update(&mut self, rtt: f64, in_flight: f64, dropped: bool) {
        self.probes += 1;
        if self.probes as f64 >= Self::PROBE_MULTIPLIER * self.limit {
            self.probes = 0;
            self.rtt_noload = Some(rtt);
            return;
        }
        let noload = match self.rtt_noload {
            Some(n) if rtt >= n => n,
            _ => {
                self.rtt_noload = Some(rtt);
                return;
            }
        };
        let log = self.limit.log10().max(1.0);
        let new_limit = if dropped {
            self.limit - log
        } else if in_flight * 2.0 < self.limit {
            return;
        } else {
            let queue = (self.limit * (1.0 - noload / rtt)).ceil();
            if queue <= log {
                self.limit + 6.0 * log
            } else if queue < 3.0 * log {
                self.limit + log
            } else if queue > 6.0 * log {
                self.limit - log
            } else {
                return;
            }
        };
        self.limit = new_limit.clamp(self.min, self.max);
    }
}

/// An exponential moving average over `window` samples, a plain mean over
/// the first `warmup` (as concurrency-limits' `ExpAvgMeasurement`).
struct Ema {
    value: f64,
    count: u32,
    window: u32,
    warmup: u32,
}

impl Ema {
    fn new(window: u32, warmup: u32) -> Self {
        Self {
            value: 0.0,
            count: 0,
            window,
            warmup,
        }
    }

    fn add(&mut self, sample: f64) -> f64 {
        if self.count < self.warmup {
            self.count += 1;
            self.value += (sample - self.value) / self.count as f64;
        } else {
            let factor = 2.0 / (self.window as f64 + 1.0);
            self.value = self.value * (1.0 - factor) + sample * factor;
        }
        self.value
    }

    fn scale(&mut self, by: f64) {
        self.value *= by;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(algorithm: ShedAlgorithm, initial: usize) -> SheddingConfig {
        SheddingConfig {
            algorithm,
            initial_limit: initial,
            min_limit: 10,
            max_limit: 10_000,
            ..SheddingConfig::default()
        }
    }

    /// Feed `n` samples at `rtt` with the limit full.
    fn run(l: &Limiter, n: usize, rtt: Duration) {
        for _ in 0..n {
            let full = l.limit.load(Ordering::Relaxed);
            l.sample(rtt, full, false);
        }
    }

    #[test]
    fn gradient2_grows_while_latency_is_flat_and_falls_when_it_rises() {
        let l = Limiter::new(&config(ShedAlgorithm::Gradient2, 100));
        run(&l, 2_000, Duration::from_millis(1));
        let grown = l.stats().limit;
        assert!(grown > 1_000, "{grown}");
        run(&l, 200, Duration::from_millis(10));
        let fallen = l.stats().limit;
        assert!(fallen < grown / 4, "{grown} → {fallen}");
        assert!(fallen >= 10);
    }

    #[test]
    fn vegas_grows_without_a_queue_and_falls_with_one() {
        let l = Limiter::new(&config(ShedAlgorithm::Vegas, 100));
        run(&l, 500, Duration::from_millis(1));
        let grown = l.stats().limit;
        assert!(grown > 200, "{grown}");
        run(&l, 500, Duration::from_millis(5));
        let fallen = l.stats().limit;
        assert!(fallen < grown, "{grown} → {fallen}");
    }

    #[test]
    fn an_idle_namespace_keeps_its_limit() {
        let l = Limiter::new(&config(ShedAlgorithm::Gradient2, 100));
        for _ in 0..1_000 {
            l.sample(Duration::from_millis(50), 1, false);
        }
        assert_eq!(l.stats().limit, 100);
    }

    #[test]
    fn fixed_never_moves() {
        let l = Limiter::new(&config(ShedAlgorithm::Fixed, 64));
        run(&l, 100, Duration::from_millis(1));
        run(&l, 100, Duration::from_secs(1));
        assert_eq!(l.stats().limit, 64);
    }

    #[test]
    fn batch_is_refused_first_and_critical_last() {
        let l = Limiter::new(&config(ShedAlgorithm::Fixed, 100));
        let take = |p: Priority, n: usize| -> Vec<Permit<'_>> {
            (0..n).map(|_| l.acquire(p).unwrap()).collect()
        };
        let mut held = take(Priority::Normal, 80);
        assert!(l.acquire(Priority::Batch).is_err(), "batch fills 80%");
        held.extend(take(Priority::Normal, 10));
        assert!(l.acquire(Priority::Normal).is_err(), "normal fills 90%");
        held.extend(take(Priority::Critical, 10));
        let shed = l.acquire(Priority::Critical).err().expect("full");
        assert_eq!((shed.limit, shed.in_flight), (100, 100));
        assert!(shed.retry_after >= Duration::from_millis(1));
        drop(held);
        assert_eq!(l.stats().in_flight, 0);
        assert_eq!(take(Priority::Batch, 80).len(), 80);
        let s = l.stats();
        assert_eq!((s.shed_batch, s.shed_normal, s.shed_critical), (1, 1, 1));
    }
}
