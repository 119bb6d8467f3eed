//! Adaptive concurrency towards a target, after Vector's Adaptive Request
//! Concurrency (RFC 1858, "Automatically Adjust Request Limits"): one limit
//! per target, shared by its shards' appliers, on the requests in flight to
//! it. A sink that sends each entry as its own request
//! ([`crate::sinks::Sink::concurrent_entries`]) counts requests: each holds
//! a [`Slot`] for as long as it takes, and is a round-trip sample. One that
//! writes a batch in one go counts calls.
//!
//! Every adjustment period (about one round trip long) the controller
//! looks at the period's mean round trip:
//! - the target pushed back (a transient error: a 429, a 503, a timeout,
//!   a refused connection), or the round trip rose past 1.25× the least of
//!   the last 100 periods' (plus 1 ms of slack): the limit is cut to 0.9 of
//!   itself;
//! - else, if the limit was reached in the period: it grows by one.
//!
//! That is ARC's additive increase and multiplicative decrease. Its latency
//! test differs: ARC compares with an EWMA of past round trips, which
//! follows a queue as it builds one step at a time (against a target that
//! serves 8 at once, the limit climbed past 20). With 1.25×, a period's mean
//! rises past the line once about a fifth of the requests wait at the
//! target: against that target the limit hovers at 8 to 13. The least of
//! the recent round trips is the target's pace without a queue, as TCP
//! Vegas and Netflix's concurrency-limits take it. A sink that writes a
//! batch in one go takes longer for a bigger batch with no queue anywhere,
//! so for it only a push back cuts the limit.
//!
//! So it climbs while the target keeps up and stops where requests start to
//! queue there. The breaker handles a target that is down; this handles one
//! that is slow. Per-key order is the applier's: it never has two entries
//! of a key in flight, whatever the limit.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::ConcurrencyConfig;

const DECREASE_RATIO: f64 = 0.9;
/// A round trip past this many times the floor means a queue.
const TOLERANCE: f64 = 1.25;
const SLACK: f64 = 0.001;
/// Periods the floor is the least of.
const FLOOR_PERIODS: usize = 100;
/// A period lasts at least this long, so a fast target's periods still
/// gather several round trips.
const MIN_PERIOD: Duration = Duration::from_millis(10);
/// A waiting applier looks again this often even if no release woke it.
const WAIT_AT_MOST: Duration = Duration::from_millis(20);

/// How a call to the target ended, for the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// Answered (applied, superseded, or refused for good: the target
    /// coped).
    Answered,
    /// The target pushed back: a transient error.
    Backpressure,
}

/// A slot of a target's limit, held by one request.
pub struct Slot<'a> {
    concurrency: &'a Concurrency,
    done: bool,
}

impl Slot<'_> {
    /// Its request took `rtt` and ended so.
    pub fn done(mut self, rtt: Duration, signal: Signal) {
        self.done = true;
        self.concurrency.release(1, rtt, signal);
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        // Dropped with its request (the applier stopped): no sample.
        if !self.done {
            self.concurrency.forget(1);
        }
    }
}

/// What the stats and metrics show.
#[derive(Clone, Debug, Serialize)]
pub struct ConcurrencyStats {
    pub adaptive: bool,
    /// Requests (or calls) the target may have in flight now.
    pub limit: usize,
    pub in_flight: usize,
    /// The last period's mean round trip of a call, in ms.
    pub rtt_ms: Option<f64>,
    /// The least of the recent periods' (the target's pace without a
    /// queue), in ms.
    pub rtt_floor_ms: Option<f64>,
}

#[derive(Debug)]
struct State {
    limit: usize,
    in_flight: usize,
    /// The recent periods' mean round trips, in seconds.
    recent: std::collections::VecDeque<f64>,
    period_start: Instant,
    period_sum: f64,
    period_samples: u32,
    reached: bool,
    pushed_back: bool,
}

pub struct Concurrency {
    config: ConcurrencyConfig,
    /// A rising round trip cuts the limit (not for a batch-writing sink).
    latency_signals: bool,
    state: Mutex<State>,
    released: tokio::sync::Notify,
}

impl Concurrency {
    /// With `latency_signals`, a rising round trip cuts the limit, as a
    /// push back does.
    pub fn new(config: ConcurrencyConfig, latency_signals: bool) -> Self {
        let limit = match config.adaptive {
            true => config.initial.clamp(config.min, config.max),
            false => config.max,
        };
        Self {
            config,
            latency_signals,
            state: Mutex::new(State {
                limit,
                in_flight: 0,
                recent: std::collections::VecDeque::with_capacity(FLOOR_PERIODS),
                period_start: Instant::now(),
                period_sum: 0.0,
                period_samples: 0,
                reached: false,
                pushed_back: false,
            }),
            released: tokio::sync::Notify::new(),
        }
    }

    /// Take up to `want` slots; how many were granted (0: wait, then try
    /// again).
    pub fn acquire(&self, want: usize) -> usize {
        let mut s = self.state.lock().unwrap();
        let granted = want.min(s.limit.saturating_sub(s.in_flight));
        s.in_flight += granted;
        if s.in_flight >= s.limit || granted < want {
            s.reached = true;
        }
        granted
    }

    /// Give back `slots` taken for a call that took `rtt` and ended so.
    pub fn release(&self, slots: usize, rtt: Duration, signal: Signal) {
        {
            let mut s = self.state.lock().unwrap();
            s.in_flight = s.in_flight.saturating_sub(slots);
            if self.config.adaptive {
                self.observe(&mut s, rtt.as_secs_f64(), signal);
            }
        }
        self.wake(slots);
    }

    /// Give back `slots` of a call whose outcome is unknown (its applier
    /// stopped): no sample.
    pub fn forget(&self, slots: usize) {
        let mut s = self.state.lock().unwrap();
        s.in_flight = s.in_flight.saturating_sub(slots);
        drop(s);
        self.wake(slots);
    }

    /// Wake a waiter per freed slot (and one more, for a limit that grew).
    fn wake(&self, slots: usize) {
        for _ in 0..=slots {
            self.released.notify_one();
        }
    }

    /// Until some slot is given back (or a short while has passed).
    pub async fn released(&self) {
        let _ = tokio::time::timeout(WAIT_AT_MOST, self.released.notified()).await;
    }

    /// One slot, once one is free. It goes back when dropped; say how its
    /// request went with [`Slot::done`].
    pub async fn slot(&self) -> Slot<'_> {
        loop {
            let freed = self.released.notified();
            tokio::pin!(freed);
            // Registered before the look, so a release in between wakes it.
            freed.as_mut().enable();
            if self.acquire(1) == 1 {
                return Slot {
                    concurrency: self,
                    done: false,
                };
            }
            let _ = tokio::time::timeout(WAIT_AT_MOST, freed).await;
        }
    }

    pub fn stats(&self) -> ConcurrencyStats {
        let s = self.state.lock().unwrap();
        ConcurrencyStats {
            adaptive: self.config.adaptive,
            limit: s.limit,
            in_flight: s.in_flight,
            rtt_ms: s.recent.back().map(|r| r * 1000.0),
            rtt_floor_ms: floor(&s.recent).map(|r| r * 1000.0),
        }
    }

    fn observe(&self, s: &mut State, rtt: f64, signal: Signal) {
        s.period_sum += rtt;
        s.period_samples += 1;
        s.pushed_back |= signal == Signal::Backpressure;
        let floor = floor(&s.recent);
        let period = floor
            .map_or(Duration::ZERO, Duration::from_secs_f64)
            .max(MIN_PERIOD);
        if s.period_start.elapsed() < period {
            return;
        }
        let current = s.period_sum / f64::from(s.period_samples);
        let rising = self.latency_signals && floor.is_some_and(|f| current > f * TOLERANCE + SLACK);
        if s.pushed_back || rising {
            s.limit = cut(s.limit, self.config.min);
        } else if s.reached {
            s.limit = (s.limit + 1).min(self.config.max);
        }
        // A period that pushed back says nothing about the target's pace.
        if !s.pushed_back {
            if s.recent.len() == FLOOR_PERIODS {
                s.recent.pop_front();
            }
            s.recent.push_back(current);
        }
        s.period_start = Instant::now();
        s.period_sum = 0.0;
        s.period_samples = 0;
        s.reached = s.in_flight >= s.limit;
        s.pushed_back = false;
    }
}

/// The least of the recent round trips.
fn floor(recent: &std::collections::VecDeque<f64>) -> Option<f64> {
    recent.iter().copied().reduce(f64::min)
}

/// The limit after a push back: 0.9 of it, and at least one less.
fn cut(limit: usize, min: usize) -> usize {
    let cut = ((limit as f64) * DECREASE_RATIO) as usize;
    cut.min(limit.saturating_sub(1)).max(min)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adaptive(initial: usize) -> Concurrency {
        let config = ConcurrencyConfig {
            adaptive: true,
            initial,
            min: 1,
            max: 100,
        };
        Concurrency::new(config, true)
    }

    /// Run one period: fill the limit, then release every slot after
    /// `rtt_ms`, each ending with `signal`. The first release closes the
    /// period before; the limit after it.
    fn period(c: &Concurrency, rtt_ms: u64, signal: Signal) -> usize {
        let limit = c.stats().limit;
        assert_eq!(c.acquire(limit + 5), limit);
        std::thread::sleep(MIN_PERIOD.max(Duration::from_millis(rtt_ms)));
        c.release(1, Duration::from_millis(rtt_ms), signal);
        let after = c.stats().limit;
        c.release(limit - 1, Duration::from_millis(rtt_ms), signal);
        after
    }

    #[test]
    fn the_limit_climbs_while_the_round_trip_stays_flat() {
        let c = adaptive(2);
        let mut limit = 2;
        for _ in 0..5 {
            let next = period(&c, 12, Signal::Answered);
            assert!(next >= limit, "{next} < {limit}");
            limit = next;
        }
        assert!(limit > 3, "{limit}");
    }

    #[test]
    fn a_push_back_cuts_the_limit() {
        let c = adaptive(50);
        let before = period(&c, 12, Signal::Answered);
        let after = period(&c, 12, Signal::Backpressure);
        assert!(after < before, "{after} !< {before}");
        assert_eq!(after, cut(before, 1));
    }

    #[test]
    fn a_rising_round_trip_cuts_the_limit() {
        let c = adaptive(20);
        for _ in 0..4 {
            period(&c, 12, Signal::Answered);
        }
        let before = c.stats().limit;
        let after = period(&c, 60, Signal::Answered);
        assert!(after < before, "{after} !< {before}");
    }

    #[test]
    fn a_batch_writing_sink_ignores_the_round_trip() {
        let c = Concurrency::new(
            ConcurrencyConfig {
                adaptive: true,
                initial: 20,
                min: 1,
                max: 100,
            },
            false,
        );
        for _ in 0..3 {
            period(&c, 12, Signal::Answered);
        }
        let before = c.stats().limit;
        assert!(period(&c, 60, Signal::Answered) > before);
    }

    #[test]
    fn fixed_stays_at_max_and_never_grants_past_it() {
        let config = ConcurrencyConfig {
            adaptive: false,
            initial: 1,
            min: 1,
            max: 4,
        };
        let c = Concurrency::new(config, true);
        assert_eq!(c.acquire(3), 3);
        assert_eq!(c.acquire(3), 1);
        assert_eq!(c.acquire(1), 0);
        c.release(4, Duration::from_millis(1), Signal::Backpressure);
        assert_eq!(c.stats().limit, 4);
        assert_eq!(c.acquire(10), 4);
    }

    #[test]
    fn a_cut_never_goes_below_min() {
        assert_eq!(cut(1, 1), 1);
        assert_eq!(cut(5, 1), 4);
        assert_eq!(cut(100, 1), 90);
        assert_eq!(cut(10, 9), 9);
    }
}
