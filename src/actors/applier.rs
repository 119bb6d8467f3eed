//! Applier: delivers one shard's due entries to the sink.
//!
//! A transient failure is retried with the namespace's backoff and full
//! jitter. The applier never sleeps: while one key waits to retry, other keys
//! keep flowing. With `ordering = "per_key"`, later entries of a waiting key
//! wait behind it, and a sink batch holds at most one entry per key. Until
//! the DLQ lands, a failing entry is retried without end (permanent errors
//! included), so nothing is dropped.

use std::collections::{HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorContext, ActorFutureExt, Addr, AsyncContext, Context, Handler, Message,
    SpawnHandle, Supervised, WrapFuture,
};
use futures_util::FutureExt;
use rand::RngExt;
use tracing::{Instrument, error, info_span, warn};

use super::consumer::{Rewind, ShardConsumer};
use super::{ShardStats, Work, guarded, panic_message};
use crate::backends::Delivery;
use crate::config::{Ordering, RetryConfig};
use crate::entry::Delivered;
use crate::sinks::{Sink, SinkError};
use crate::telemetry;

/// Entries per sink call, at most.
const MAX_BATCH: usize = 64;

struct Item {
    work: Work,
    attempts: u32,
    /// Not to be tried before this (after a failure).
    not_before: Option<Instant>,
}

impl Item {
    fn key(&self, ordering: Ordering) -> Option<&str> {
        match ordering {
            Ordering::None => None,
            // An entry without a key orders only with itself.
            Ordering::PerKey => {
                let e = self.work.delivery.entry();
                Some(e.key.as_deref().unwrap_or(&e.id))
            }
        }
    }
}

pub struct Applier {
    sink: Arc<dyn Sink>,
    consumer: Addr<ShardConsumer>,
    retry: RetryConfig,
    ordering: Ordering,
    stats: Arc<ShardStats>,
    queue: VecDeque<Item>,
    generation: u64,
    /// A sink call is in flight.
    busy: bool,
    timer: Option<SpawnHandle>,
}

impl Applier {
    pub fn new(
        sink: Arc<dyn Sink>,
        consumer: Addr<ShardConsumer>,
        retry: RetryConfig,
        ordering: Ordering,
        stats: Arc<ShardStats>,
    ) -> Self {
        Self {
            sink,
            consumer,
            retry,
            ordering,
            stats,
            queue: VecDeque::new(),
            generation: 0,
            busy: false,
            timer: None,
        }
    }

    /// Pick the next batch: in queue order, the first entry of each key that
    /// is ready now.
    fn next_batch(&self, now: Instant) -> Vec<usize> {
        let mut seen: HashSet<&str> = HashSet::new();
        let mut batch = Vec::new();
        for (i, item) in self.queue.iter().enumerate() {
            if let Some(k) = item.key(self.ordering)
                && !seen.insert(k)
            {
                continue;
            }
            if item.not_before.is_some_and(|t| t > now) {
                continue;
            }
            batch.push(i);
            if batch.len() == MAX_BATCH {
                break;
            }
        }
        batch
    }

    fn pump(&mut self, ctx: &mut Context<Self>) {
        crate::failpoint!("applier.apply");
        if self.busy || self.queue.is_empty() {
            return;
        }
        let now = Instant::now();
        let batch = self.next_batch(now);
        if batch.is_empty() {
            self.wake_at_next_retry(ctx);
            return;
        }
        self.busy = true;
        let delivered: Vec<Delivered> = batch
            .iter()
            .map(|&i| {
                let d = &self.queue[i].work.delivery;
                Delivered {
                    shard: d.shard().clone(),
                    sequence: d.sequence(),
                    entry: d.entry().clone(),
                }
            })
            .collect();
        let sequences: Vec<u64> = delivered.iter().map(|d| d.sequence).collect();
        let sink = self.sink.clone();
        let span = info_span!("apply", namespace = %delivered[0].shard.namespace,
            shard = delivered[0].shard.shard, entries = delivered.len(),
            first_id = %delivered[0].entry.id);
        telemetry::set_parent_from(&span, &delivered[0].entry);
        let generation = self.generation;
        let apply = async move {
            AssertUnwindSafe(sink.apply(&delivered))
                .catch_unwind()
                .await
        }
        .instrument(span);
        ctx.spawn(apply.into_actor(self).map(move |result, act, ctx| {
            guarded(act, ctx, |act, ctx| {
                act.applied(generation, &sequences, result, ctx)
            });
        }));
    }

    /// A sink call finished: settle its entries, then apply what is next.
    fn applied(
        &mut self,
        generation: u64,
        sequences: &[u64],
        result: std::thread::Result<Vec<Result<(), SinkError>>>,
        ctx: &mut Context<Self>,
    ) {
        self.busy = false;
        match result {
            Ok(results) if self.generation == generation => self.settle(sequences, results),
            // Rewound while applying: the queue was replaced.
            Ok(_) => {}
            Err(panic) => {
                error!(
                    panic = panic_message(&panic),
                    "The sink panicked; restarting the applier."
                );
                ctx.stop();
                return;
            }
        }
        self.pump(ctx);
    }

    /// Ack what succeeded; schedule retries for what failed.
    fn settle(&mut self, sequences: &[u64], results: Vec<Result<(), SinkError>>) {
        let now = Instant::now();
        let mut done = HashSet::new();
        for (seq, result) in sequences.iter().zip(results) {
            let Some(item) = self
                .queue
                .iter_mut()
                .find(|i| i.work.delivery.sequence() == *seq)
            else {
                continue;
            };
            match result {
                Ok(()) => {
                    done.insert(*seq);
                }
                Err(e) => {
                    item.attempts += 1;
                    self.stats.apply_errors.inc();
                    let backoff = backoff(&self.retry, item.attempts, &e);
                    item.not_before = Some(now + backoff);
                    warn!(
                        shard = %item.work.delivery.shard(),
                        sequence = seq,
                        id = %item.work.delivery.entry().id,
                        attempts = item.attempts,
                        retry_in_ms = backoff.as_millis() as u64,
                        error = %e,
                        "Delivery failed; will retry."
                    );
                }
            }
        }
        let queue = std::mem::take(&mut self.queue);
        for item in queue {
            if done.contains(&item.work.delivery.sequence()) {
                self.stats.applied.inc();
                ack(item.work.delivery);
            } else {
                self.queue.push_back(item);
            }
        }
        let in_retry = self.queue.iter().filter(|i| i.attempts > 0).count();
        self.stats.in_retry.set(in_retry as i64);
    }

    fn wake_at_next_retry(&mut self, ctx: &mut Context<Self>) {
        let Some(at) = self.queue.iter().filter_map(|i| i.not_before).min() else {
            return;
        };
        if let Some(h) = self.timer.take() {
            ctx.cancel_future(h);
        }
        let wait = at.saturating_duration_since(Instant::now());
        self.timer = Some(ctx.run_later(wait, |act, ctx| {
            act.timer = None;
            guarded(act, ctx, |act, ctx| act.pump(ctx));
        }));
    }
}

/// Full jitter on the namespace's backoff, or the target's `Retry-After` if it
/// asked for longer.
fn backoff(retry: &RetryConfig, attempts: u32, e: &SinkError) -> Duration {
    let cap = retry.backoff(attempts);
    let jittered = Duration::from_millis(rand::rng().random_range(0..=cap.as_millis() as u64));
    e.retry_after.map_or(jittered, |ra| ra.max(jittered))
}

fn ack(d: crate::backends::embedded::EmbeddedDelivery) {
    // The embedded ack only updates the consumer's watermark; it is ready at
    // once and cannot fail.
    if let Some(Err((e, _))) = d.ack().now_or_never() {
        error!(error = %e, "Ack failed.");
    }
}

impl Actor for Applier {
    type Context = Context<Self>;
}

impl Supervised for Applier {
    fn restarting(&mut self, _: &mut Context<Self>) {
        warn!("Restarting an applier; its shard rewinds.");
        self.stats.restarts.inc();
        self.queue.clear();
        self.busy = false;
        self.timer = None;
        self.stats.in_retry.set(0);
        self.consumer.do_send(Rewind);
    }
}

/// Deliver these entries (in order).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Apply(pub Vec<Work>);

impl Handler<Apply> for Applier {
    type Result = ();

    fn handle(&mut self, msg: Apply, ctx: &mut Context<Self>) {
        let generation = self.generation;
        self.queue.extend(
            msg.0
                .into_iter()
                .filter(|w| w.generation >= generation)
                .map(|work| Item {
                    work,
                    attempts: 0,
                    not_before: None,
                }),
        );
        guarded(self, ctx, |act, ctx| act.pump(ctx));
    }
}

/// The consumer rewound: drop work read before generation `.0`.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct Reset(pub u64);

impl Handler<Reset> for Applier {
    type Result = ();

    fn handle(&mut self, Reset(generation): Reset, _: &mut Context<Self>) {
        self.generation = generation;
        self.queue.retain(|i| i.work.generation >= generation);
        let in_retry = self.queue.iter().filter(|i| i.attempts > 0).count();
        self.stats.in_retry.set(in_retry as i64);
    }
}
