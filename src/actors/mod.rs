//! The pipeline. Writes take one path, a plain call with no mailbox hop;
//! then, for each of the namespace's targets, each shard runs four actors on
//! one arbiter (a target's progress, retries and letters are its own):
//!
//! ```text
//! HTTP handler --> Ingest --Producer::append--> backend   (the handler awaits
//!                                                          the backend's answer)
//! backend --> ShardConsumer --due--> Applier --> Sink
//!                          \-later-> DelayScheduler --due--> Applier
//!                                      Applier --failed--> DeadLetter --> DLQ
//!                                      Applier --a set's mutation--> SetJoin --whole set--> Sink
//! ```
//!
//! The actors' messages live in [`messages`]; each actor holds its peers as
//! `Recipient`s, so no actor imports another.
//!
//! Every actor is `Supervised`: a panic in a handler is caught and turned
//! into a stop, and the supervisor restarts the actor. Actors keep no state
//! that can't be rebuilt: a restarted DelayScheduler or Applier asks the
//! consumer to rewind to the last committed offset, and every message carries
//! the consumer's generation, so work from before the rewind is dropped.
//! Entries are then delivered again (at least once).
//!
//! The consumer's committed offset is a low watermark: every entry before it
//! has been applied, parked or delayed durably in the state store, or
//! dead-lettered.
//!
//! A shard's four actors may move to another arbiter ([`rebalance`]), as a
//! restart would: the old ones drain, commit and retire, and new ones read
//! on from the committed offset.

pub mod applier;
pub mod breaker;
pub mod concurrency;
pub mod consumer;
pub mod dead_letter;
pub mod delay;
pub mod ingest;
pub mod messages;
pub mod rebalance;
pub mod replay;
pub mod sets;
pub mod supervisor;

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, ActorContext, Context};
use rand::RngExt;
use tracing::{error, warn};

use crate::backends::DelayStore;
use crate::backends::shard::AnyDelivery;
use crate::config::RetryConfig;
use crate::sinks::SinkError;
use crate::state::{ParkStore, ReplayStore};
use crate::stats::{Counter, Gauge, Histogram};

/// Counters of one shard's delivery to one target, shared with the API.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Entries the sink accepted since start.
    pub applied: Counter,
    /// Failed delivery attempts since start.
    pub apply_errors: Counter,
    /// Entries waiting to be retried now.
    pub in_retry: Gauge,
    /// Entries read and sent to the applier, not yet taken in: its mailbox.
    pub mailbox: Gauge,
    /// Entries waiting for their due time.
    pub delayed: Gauge,
    /// When the next delayed entry is due (ms since epoch; 0: none).
    pub next_due_ms: Gauge,
    /// Actor restarts since start.
    pub restarts: Counter,
    /// The shard's restart history, which paces its restarts.
    pub restart_backoff: RestartBackoff,
    /// Entries moved to the DLQ since start.
    pub dead_lettered: Counter,
    /// Entries the target already held a newer version of.
    pub superseded: Counter,
    /// Redriven entries that failed again (they stay in the DLQ).
    pub redrive_failed: Counter,
    /// Entries written to the park store (a long backoff, or behind a parked
    /// or held key).
    pub parked: Counter,
    /// Overdue delayed entries fired under the catch-up rate.
    pub caught_up: Counter,
    /// How late delayed entries fired, against their due time.
    pub fire_lateness: Histogram,
}

/// A shard's restarts. The first in a while goes at once; each one within
/// [`RestartBackoff::QUIET`] of the last makes the restarted actor wait twice
/// as long before it works again (100 ms, 200 ms, … up to 30 s), and the
/// shard's consumer waits with it before reading again. So a failure that
/// repeats at once (a store that keeps erroring, a bug on a start path)
/// cannot spin, rewinding the shard thousands of times a second.
#[derive(Debug, Default)]
pub struct RestartBackoff(std::sync::Mutex<BackoffState>);

#[derive(Debug, Default)]
struct BackoffState {
    /// Restarts in a row, each within `QUIET` of the one before.
    streak: u32,
    last: Option<std::time::Instant>,
    /// When the latest restart's pause ends.
    resume_at: Option<std::time::Instant>,
}

impl RestartBackoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(30);
    /// A restart this long after the last one starts a new streak.
    pub const QUIET: Duration = Duration::from_secs(60);

    /// Record a restart; how long the restarted actor waits before working.
    pub fn restarted(&self) -> Duration {
        let now = std::time::Instant::now();
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.streak = match s.last {
            Some(t) if now.duration_since(t) < Self::QUIET => s.streak + 1,
            _ => 1,
        };
        s.last = Some(now);
        let pause = match s.streak {
            0 | 1 => Duration::ZERO,
            n => Self::FIRST
                .saturating_mul(1 << (n - 2).min(16))
                .min(Self::MAX),
        };
        s.resume_at = Some(now + pause);
        pause
    }

    /// What is left of the latest restart's pause.
    pub fn remaining(&self) -> Duration {
        let s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.resume_at.map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(std::time::Instant::now())
        })
    }
}

/// Where a namespace's entries wait outside the log: parked keys (always
/// local fjall for now) and delayed entries (the backend's delay store).
#[derive(Clone)]
pub struct Stores {
    pub park: ParkStore,
    pub delays: Arc<dyn DelayStore>,
    /// Where each target's committed position over time is recorded, for
    /// replays.
    pub replays: Arc<ReplayStore>,
}

/// Entries in a shard's applier mailbox, counted in [`ShardStats::mailbox`]
/// from the send until the message is handled, or dropped with its actor.
pub struct InMailbox {
    stats: Arc<ShardStats>,
    entries: i64,
}

impl InMailbox {
    pub fn new(stats: &Arc<ShardStats>, entries: usize) -> Self {
        let entries = entries as i64;
        stats.mailbox.add(entries);
        Self {
            stats: stats.clone(),
            entries,
        }
    }
}

impl Drop for InMailbox {
    fn drop(&mut self) {
        self.stats.mailbox.add(-self.entries);
    }
}

/// A delivery, tagged with the consumer generation that read it.
pub struct Work {
    pub generation: u64,
    pub delivery: AnyDelivery,
}

/// One line per interval for the acks that fail together in an outage.
static ACK_LOG: std::sync::Mutex<crate::backends::Throttle> =
    std::sync::Mutex::new(crate::backends::Throttle::new());

/// Ack a delivery: it is applied, parked or dead-lettered.
pub(crate) fn ack(d: AnyDelivery) {
    use crate::backends::Delivery;
    use futures_util::FutureExt;
    // On a log or a topic an ack only updates the consumer's watermark (a
    // commit persists it later): it is ready at once. On SQS it deletes the
    // message, a call that finishes in the background, retried a few times;
    // if it never succeeds the message shows again and is applied again (at
    // least once, never lost).
    let Some(d) = d.ack_now() else {
        return;
    };
    let mut acking = Box::pin(d.ack());
    match (&mut acking).now_or_never() {
        Some(Ok(())) => {}
        Some(Err((e, _))) => error!(error = %e, "Ack failed."),
        None => {
            actix::spawn(async move {
                let mut result = acking.await;
                for attempt in 1..=4u32 {
                    let Err((e, d)) = result else { return };
                    if ACK_LOG.lock().unwrap().ready() {
                        warn!(error = %e, attempt, "Ack failed; retrying.");
                    }
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                    result = d.ack().await;
                }
                if let Err((e, _)) = result
                    && ACK_LOG.lock().unwrap().ready()
                {
                    error!(error = %e, "Ack failed; the entry will be delivered again.");
                }
            });
        }
    }
}

/// Run a handler body. A panic is logged and stops the actor, so its
/// supervisor restarts it; actix would otherwise lose the arbiter.
pub(crate) fn guarded<A, R>(
    act: &mut A,
    ctx: &mut Context<A>,
    f: impl FnOnce(&mut A, &mut Context<A>) -> R,
) -> Option<R>
where
    A: Actor<Context = Context<A>>,
{
    match std::panic::catch_unwind(AssertUnwindSafe(|| f(act, ctx))) {
        Ok(r) => Some(r),
        Err(panic) => {
            error!(
                actor = std::any::type_name::<A>(),
                panic = panic_message(&panic),
                "Actor panicked; stopping it for a restart."
            );
            ctx.stop();
            None
        }
    }
}

pub(crate) fn panic_message(panic: &Box<dyn Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic)")
}

/// Whether retrying `e` can help (the namespace may make HTTP statuses
/// permanent).
pub(crate) fn transient(retry: &RetryConfig, e: &SinkError) -> bool {
    e.is_transient()
        && !e
            .http_status
            .is_some_and(|s| retry.permanent_http_statuses.contains(&s))
}

/// Full jitter on the namespace's backoff, or the target's `Retry-After` if it
/// asked for longer, up to `max_backoff_ms`: a target that asks for an hour
/// does not stall its keys past what the namespace allows.
pub(crate) fn backoff(retry: &RetryConfig, attempts: u32, e: &SinkError) -> Duration {
    let cap = retry.backoff(attempts);
    let jittered = Duration::from_millis(rand::rng().random_range(0..=cap.as_millis() as u64));
    let most = Duration::from_millis(retry.max_backoff_ms);
    e.retry_after
        .map_or(jittered, |ra| ra.min(most).max(jittered))
}
