//! The circuit breaker in front of a namespace's target, shared by its
//! shards' appliers.
//!
//! An outage is not a failure of the entry. The breaker opens when the
//! target's healthcheck fails, or when transient failures come from
//! `trip_after_keys` distinct keys with no success between them. While it is
//! open, no applier starts a sink call and no entry spends an attempt: the
//! entries wait in the log (unacked, so the watermark holds). One entry at a
//! time, across the namespace, goes as a probe, with a doubling wait between
//! probes; a probe spends no attempt. The first success closes the breaker
//! and every applier resumes, in order.
//!
//! One key failing alone never opens it, so poison still reaches the DLQ
//! after `max_attempts`. A probe that keeps failing on the only key there is
//! to try, while the healthcheck passes, is that key's fault: the breaker
//! closes, and the key spends its attempts.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::BreakerConfig;
use crate::entry::now_ms;
use crate::sinks::SinkError;
use crate::stats::Counter;

/// Probes of one key in a row, failing while the healthcheck passes, that
/// make the failure the key's rather than the target's.
const SAME_KEY_PROBES: u32 = 3;
/// A probe not settled in this long is taken as lost (its applier restarted).
const PROBE_LOST_AFTER: Duration = Duration::from_secs(120);
/// How long a due probe waits for an applier with another key than the one
/// the last probe failed on, before one without may take it.
const FRESH_KEY_GRACE: Duration = Duration::from_secs(1);
/// Healthchecks started by failures, at most one per this.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What an applier may do now.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Deliver as usual.
    Deliver,
    /// Send one entry as the probe, and report it with [`Breaker::probed`].
    Probe,
    /// Start nothing until then (or until [`Breaker::subscribe`] changes).
    Wait(Instant),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Closed,
    Open,
    /// A probe is in flight.
    HalfOpen,
}

/// The breaker as stats show it.
#[derive(Clone, Debug, Serialize)]
pub struct BreakerView {
    pub state: State,
    /// When it last opened (ms since epoch), while it is open.
    pub open_since_ms: Option<u64>,
    /// Times it opened since start.
    pub trips: u64,
    /// Probes sent since start.
    pub probes: u64,
    /// What opened it, or what the last probe met.
    pub last_error: Option<String>,
}

struct Inner {
    state: State,
    /// Distinct keys with transient failures since the last success.
    failing: Vec<String>,
    open_since_ms: Option<u64>,
    next_probe: Instant,
    probe_wait: Duration,
    probe_started: Option<Instant>,
    /// The key of the last failed probe, and how many in a row failed on it.
    probe_key: Option<(String, u32)>,
    last_error: Option<String>,
    last_check: Option<Instant>,
}

pub struct Breaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
    /// Bumped whenever it closes, so waiting appliers resume at once.
    closed: watch::Sender<u64>,
    trips: Counter,
    probes: Counter,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            inner: Mutex::new(Inner {
                state: State::Closed,
                failing: Vec::new(),
                open_since_ms: None,
                next_probe: Instant::now(),
                probe_wait: Duration::from_millis(config.probe_initial_ms),
                probe_started: None,
                probe_key: None,
                last_error: None,
                last_check: None,
            }),
            config,
            closed: watch::Sender::new(0),
            trips: Counter::default(),
            probes: Counter::default(),
        }
    }

    /// Whether a sink call may start now, as a delivery or as the probe.
    /// `fresh` tells whether the asking applier has a key other than the
    /// one the last probe failed on, which it is given (asked only when a
    /// probe is due, under the breaker's lock: it must not call back). Such
    /// an applier gets the probe first, so probes go round the keys, and a
    /// poison key cannot hold the breaker open.
    pub fn admit(&self, now: Instant, fresh: impl FnOnce(&str) -> bool) -> Admit {
        let mut g = self.inner.lock().unwrap();
        match g.state {
            State::Closed => Admit::Deliver,
            State::HalfOpen
                if g.probe_started
                    .is_some_and(|t| now.duration_since(t) < PROBE_LOST_AFTER) =>
            {
                Admit::Wait(now + Duration::from_millis(self.config.probe_initial_ms))
            }
            State::Open | State::HalfOpen if now >= g.next_probe => {
                let grace = g.next_probe + FRESH_KEY_GRACE;
                let stale = g.probe_key.as_ref().is_some_and(|(k, _)| !fresh(k));
                if stale && now < grace {
                    return Admit::Wait(grace);
                }
                g.state = State::HalfOpen;
                g.probe_started = Some(now);
                self.probes.inc();
                Admit::Probe
            }
            State::Open | State::HalfOpen => Admit::Wait(g.next_probe),
        }
    }

    /// The key a probe should avoid: the last probe failed on it.
    pub fn avoid(&self) -> Option<String> {
        let g = self.inner.lock().unwrap();
        g.probe_key.as_ref().map(|(k, _)| k.clone())
    }

    /// A sink call (not a probe) settled: `ok` entries succeeded and these
    /// keys failed transiently. Answers whether the breaker is open now, in
    /// which case those failures spend no attempts.
    pub fn delivered(&self, ok: usize, failed_keys: &[&str], error: Option<&SinkError>) -> bool {
        if !self.config.enabled {
            return false;
        }
        let mut g = self.inner.lock().unwrap();
        if ok > 0 {
            g.failing.clear();
            if g.state != State::Closed {
                // A call begun before it opened got through: the target is up.
                self.close(&mut g, "a delivery succeeded");
            }
        }
        for key in failed_keys {
            if !g.failing.iter().any(|k| k == key) {
                g.failing.push(key.to_string());
            }
        }
        if g.state == State::Closed && g.failing.len() >= self.config.trip_after_keys as usize {
            let why = format!(
                "transient failures from {} keys with no success between them{}",
                g.failing.len(),
                error.map(|e| format!(": {e}")).unwrap_or_default()
            );
            self.open(&mut g, why);
        }
        g.state != State::Closed
    }

    /// The probe on `key` settled: `None` if the target answered (a success,
    /// or an error that is the entry's own), or the transient error it met.
    pub fn probed(&self, key: &str, transient: Option<&SinkError>) {
        let mut g = self.inner.lock().unwrap();
        g.probe_started = None;
        if g.state == State::Closed {
            // Another call got through meanwhile: it is closed already.
            return;
        }
        let Some(e) = transient else {
            g.failing.clear();
            g.probe_key = None;
            self.close(&mut g, "a probe got through");
            return;
        };
        let in_a_row = match &g.probe_key {
            Some((k, n)) if k == key => n + 1,
            _ => 1,
        };
        g.probe_key = Some((key.to_string(), in_a_row));
        g.state = State::Open;
        g.last_error = Some(e.to_string());
        let most = Duration::from_millis(self.config.probe_max_ms);
        g.probe_wait = (g.probe_wait * 2).min(most);
        // A target that asks for longer (Retry-After) gets it, up to the cap.
        let asked = e.retry_after.unwrap_or_default().min(most);
        g.next_probe = Instant::now() + g.probe_wait.max(asked);
    }

    /// The probe in flight was lost (its applier restarted): another may go.
    pub fn abandon_probe(&self) {
        let mut g = self.inner.lock().unwrap();
        if g.state == State::HalfOpen {
            g.state = State::Open;
            g.probe_started = None;
            g.next_probe = Instant::now();
        }
    }

    /// Whether a probe's failure should be checked against the healthcheck:
    /// it kept failing on one key, with no other key to try.
    pub fn stuck_on_one_key(&self) -> bool {
        let g = self.inner.lock().unwrap();
        g.state != State::Closed
            && g.probe_key
                .as_ref()
                .is_some_and(|(_, n)| *n >= SAME_KEY_PROBES)
    }

    /// Whether a healthcheck should run now, after a transient failure (at
    /// most one per second): a target that refuses connections opens the
    /// breaker before a lone key spends its attempts.
    pub fn should_check(&self, now: Instant) -> bool {
        if !self.config.enabled {
            return false;
        }
        let mut g = self.inner.lock().unwrap();
        if g.last_check
            .is_some_and(|t| now.duration_since(t) < CHECK_EVERY)
        {
            return false;
        }
        g.last_check = Some(now);
        true
    }

    /// The target's healthcheck answered.
    pub fn health(&self, result: &Result<(), SinkError>) {
        if !self.config.enabled {
            return;
        }
        let mut g = self.inner.lock().unwrap();
        match result {
            Err(e) if g.state == State::Closed => {
                self.open(&mut g, format!("the healthcheck failed: {e}"));
            }
            Err(_) => {}
            Ok(())
                if g.state == State::Open
                    && g.probe_key
                        .as_ref()
                        .is_some_and(|(_, n)| *n >= SAME_KEY_PROBES) =>
            {
                // The target is up; it is that one key that fails.
                g.failing.clear();
                g.probe_key = None;
                self.close(
                    &mut g,
                    "the healthcheck passes and probes failed on one key only",
                );
            }
            Ok(()) => {}
        }
    }

    /// Waiting appliers watch this; it changes when the breaker closes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.closed.subscribe()
    }

    pub fn is_open(&self) -> bool {
        self.inner.lock().unwrap().state != State::Closed
    }

    pub fn view(&self) -> BreakerView {
        let g = self.inner.lock().unwrap();
        BreakerView {
            state: g.state,
            open_since_ms: g.open_since_ms,
            trips: self.trips.get(),
            probes: self.probes.get(),
            last_error: g.last_error.clone(),
        }
    }

    fn open(&self, g: &mut Inner, why: String) {
        warn!(reason = %why, "Target looks down: the breaker opens. Delivery pauses and entries wait in the log, spending no attempts.");
        g.state = State::Open;
        g.open_since_ms = Some(now_ms());
        g.probe_wait = Duration::from_millis(self.config.probe_initial_ms);
        g.next_probe = Instant::now() + g.probe_wait;
        g.probe_key = None;
        g.last_error = Some(why);
        self.trips.inc();
    }

    fn close(&self, g: &mut Inner, why: &str) {
        let open_ms = g.open_since_ms.map(|t| now_ms().saturating_sub(t));
        info!(
            reason = why,
            open_ms, "The breaker closes: delivery resumes."
        );
        g.state = State::Closed;
        g.open_since_ms = None;
        g.probe_started = None;
        self.closed.send_modify(|n| *n += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig {
            probe_initial_ms: 100,
            probe_max_ms: 400,
            ..BreakerConfig::default()
        })
    }

    fn down() -> SinkError {
        SinkError::transient("t", "connection refused")
    }

    #[test]
    fn one_key_failing_alone_never_opens_it() {
        let b = breaker();
        for _ in 0..20 {
            assert!(!b.delivered(0, &["poison"], Some(&down())));
        }
        // Others succeed between its failures.
        assert!(!b.delivered(3, &["poison"], Some(&down())));
        assert!(!b.delivered(0, &["poison"], Some(&down())));
        assert_eq!(b.admit(Instant::now(), |_| true), Admit::Deliver);
    }

    #[test]
    fn two_keys_failing_with_no_success_between_open_it() {
        let b = breaker();
        assert!(!b.delivered(0, &["a"], Some(&down())));
        assert!(b.delivered(0, &["b"], Some(&down())));
        let now = Instant::now();
        assert!(matches!(b.admit(now, |_| true), Admit::Wait(_)));
        // One probe at a time, once due.
        let later = now + Duration::from_millis(150);
        assert_eq!(b.admit(later, |_| true), Admit::Probe);
        assert!(matches!(b.admit(later, |_| true), Admit::Wait(_)));
        b.probed("a", Some(&down()));
        assert_eq!(b.avoid().as_deref(), Some("a"));
        assert_eq!(b.view().state, State::Open);
        b.probed("b", None);
        assert_eq!(b.admit(Instant::now(), |_| true), Admit::Deliver);
        assert_eq!(b.view().trips, 1);
    }

    #[test]
    fn a_probe_goes_first_to_an_applier_with_another_key() {
        let b = breaker();
        b.health(&Err(down()));
        let due = Instant::now() + Duration::from_millis(150);
        assert_eq!(b.admit(due, |_| false), Admit::Probe, "no probe failed yet");
        b.probed("a", Some(&down()));
        let due = Instant::now() + Duration::from_millis(250);
        // Only "a" to offer: wait for one with another key, a while.
        assert!(matches!(b.admit(due, |_| false), Admit::Wait(_)));
        assert_eq!(b.admit(due, |_| true), Admit::Probe);
        b.probed("b", Some(&down()));
        let late = Instant::now() + Duration::from_millis(450) + FRESH_KEY_GRACE;
        assert_eq!(b.admit(late, |_| false), Admit::Probe);
    }

    #[test]
    fn probe_waits_double_up_to_the_cap() {
        let b = breaker();
        b.health(&Err(down()));
        let mut waits = Vec::new();
        for _ in 0..5 {
            let before = Instant::now();
            let Admit::Wait(at) = b.admit(before, |_| true) else {
                panic!("open")
            };
            waits.push(at.saturating_duration_since(before).as_millis() as u64);
            assert_eq!(b.admit(at, |_| true), Admit::Probe);
            b.probed("k", Some(&down()));
        }
        assert!(waits[0] <= 100, "{waits:?}");
        assert!(waits[1] > 150 && waits[1] <= 200, "{waits:?}");
        assert!(waits[4] > 350 && waits[4] <= 400, "{waits:?}");
    }

    #[test]
    fn a_probe_stuck_on_one_key_closes_when_the_healthcheck_passes() {
        let b = breaker();
        b.health(&Err(down()));
        for _ in 0..SAME_KEY_PROBES {
            let far = Instant::now() + Duration::from_secs(10);
            assert_eq!(b.admit(far, |_| true), Admit::Probe);
            b.probed("poison", Some(&down()));
        }
        assert!(b.stuck_on_one_key());
        b.health(&Ok(()));
        assert_eq!(b.admit(Instant::now(), |_| true), Admit::Deliver);
    }

    #[test]
    fn disabled_it_never_opens() {
        let b = Breaker::new(BreakerConfig {
            enabled: false,
            ..BreakerConfig::default()
        });
        b.health(&Err(down()));
        assert!(!b.delivered(0, &["a", "b", "c"], Some(&down())));
        assert_eq!(b.admit(Instant::now(), |_| true), Admit::Deliver);
    }
}
