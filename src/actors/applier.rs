//! Applier: delivers one shard's due entries to the sink.
//!
//! A transient failure is retried with the namespace's backoff and full
//! jitter. The applier never sleeps: while one key waits to retry, other keys
//! keep flowing. With `ordering = "per_key"`, later entries of a waiting key
//! wait behind it, and a sink batch holds at most one entry per key.
//!
//! An entry that fails permanently, or runs out of `max_attempts`, goes to the
//! DeadLetter actor (with the DLQ off, it is retried forever: nothing is
//! dropped). Redriven dead letters come back here with their original
//! sequence.

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
use super::dead_letter::{Bury, DeadLetterActor, Doomed, Redriven};
use super::{ShardStats, Work, ack, guarded, panic_message};
use crate::backends::Delivery;
use crate::config::{Ordering, RetryConfig};
use crate::entry::{Delivered, Entry, now_ms};
use crate::sinks::{ApplyResult, Outcome, Sink, SinkError};
use crate::telemetry;

/// Entries per sink call, at most.
const MAX_BATCH: usize = 64;

/// Where an item came from, which decides what its success means.
enum Source {
    /// Read from the log: success acks it, so the watermark can pass it.
    Log(Work),
    /// Sent back from the DLQ: success removes its dead letter.
    Redrive(Delivered),
}

struct Item {
    /// Unique in this applier: a redriven entry keeps its sequence, so the
    /// sequence alone cannot name an item.
    uid: u64,
    source: Source,
    attempts: u32,
    /// Not to be tried before this (after a failure).
    not_before: Option<Instant>,
    first_failure_ms: u64,
}

impl Item {
    fn delivered(&self) -> Delivered {
        match &self.source {
            Source::Log(w) => Delivered {
                shard: w.delivery.shard().clone(),
                sequence: w.delivery.sequence(),
                entry: w.delivery.entry().clone(),
            },
            Source::Redrive(d) => d.clone(),
        }
    }

    fn entry(&self) -> &Entry {
        match &self.source {
            Source::Log(w) => w.delivery.entry(),
            Source::Redrive(d) => &d.entry,
        }
    }

    fn key(&self, ordering: Ordering) -> Option<&str> {
        match ordering {
            Ordering::None => None,
            // An entry without a key orders only with itself.
            Ordering::PerKey => {
                let e = self.entry();
                Some(e.key.as_deref().unwrap_or(&e.id))
            }
        }
    }
}

/// How an applier treats entries that keep failing.
#[derive(Clone)]
pub struct Policy {
    pub retry: RetryConfig,
    pub ordering: Ordering,
    /// Failed entries go to the DLQ; without it they are retried forever.
    pub dlq: bool,
    /// The target's name, recorded with each dead letter.
    pub target: String,
}

pub struct Applier {
    sink: Arc<dyn Sink>,
    consumer: Addr<ShardConsumer>,
    dead_letter: Addr<DeadLetterActor>,
    policy: Policy,
    stats: Arc<ShardStats>,
    queue: VecDeque<Item>,
    next_uid: u64,
    generation: u64,
    /// A sink call is in flight.
    busy: bool,
    timer: Option<SpawnHandle>,
}

impl Applier {
    pub fn new(
        sink: Arc<dyn Sink>,
        consumer: Addr<ShardConsumer>,
        dead_letter: Addr<DeadLetterActor>,
        policy: Policy,
        stats: Arc<ShardStats>,
    ) -> Self {
        Self {
            sink,
            consumer,
            dead_letter,
            policy,
            stats,
            queue: VecDeque::new(),
            next_uid: 0,
            generation: 0,
            busy: false,
            timer: None,
        }
    }

    fn push(&mut self, source: Source) {
        self.next_uid += 1;
        self.queue.push_back(Item {
            uid: self.next_uid,
            source,
            attempts: 0,
            not_before: None,
            first_failure_ms: 0,
        });
    }

    /// Pick the next batch: in queue order, the first entry of each key that
    /// is ready now.
    fn next_batch(&self, now: Instant) -> Vec<usize> {
        let mut seen: HashSet<&str> = HashSet::new();
        let mut batch = Vec::new();
        for (i, item) in self.queue.iter().enumerate() {
            if let Some(k) = item.key(self.policy.ordering)
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
        let delivered: Vec<Delivered> = batch.iter().map(|&i| self.queue[i].delivered()).collect();
        let uids: Vec<u64> = batch.iter().map(|&i| self.queue[i].uid).collect();
        let sink = self.sink.clone();
        let span = info_span!("apply", namespace = %delivered[0].shard.namespace,
            shard = delivered[0].shard.shard, entries = delivered.len(),
            first_id = %delivered[0].entry.id);
        telemetry::set_parent_from(&span, &delivered[0].entry);
        let apply = async move {
            AssertUnwindSafe(sink.apply(&delivered))
                .catch_unwind()
                .await
        }
        .instrument(span);
        ctx.spawn(apply.into_actor(self).map(move |result, act, ctx| {
            guarded(act, ctx, |act, ctx| act.applied(&uids, result, ctx));
        }));
    }

    /// A sink call finished: settle its entries, then apply what is next.
    fn applied(
        &mut self,
        uids: &[u64],
        result: std::thread::Result<Vec<ApplyResult>>,
        ctx: &mut Context<Self>,
    ) {
        self.busy = false;
        match result {
            Ok(results) => self.settle(uids, results),
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

    /// Ack what succeeded; retry, dead-letter or keep what failed.
    /// Items dropped by a rewind while their call was in flight no longer
    /// match a uid, and are skipped.
    fn settle(&mut self, uids: &[u64], results: Vec<ApplyResult>) {
        let now = Instant::now();
        for (uid, result) in uids.iter().zip(results) {
            let Some(pos) = self.queue.iter().position(|i| i.uid == *uid) else {
                continue;
            };
            match result {
                Ok(outcome) => {
                    let item = self.queue.remove(pos).expect("found above");
                    self.succeeded(item, outcome);
                }
                Err(e) => {
                    self.stats.apply_errors.inc();
                    let item = &mut self.queue[pos];
                    item.attempts += 1;
                    if item.first_failure_ms == 0 {
                        item.first_failure_ms = now_ms();
                    }
                    let retry = &self.policy.retry;
                    let permanent = !e.is_transient()
                        || e.http_status
                            .is_some_and(|s| retry.permanent_http_statuses.contains(&s));
                    let exhausted = item.attempts >= retry.max_attempts;
                    if (permanent || exhausted) && self.policy.dlq {
                        let item = self.queue.remove(pos).expect("found above");
                        self.give_up(item, &e);
                        continue;
                    }
                    let backoff = backoff(retry, item.attempts, &e);
                    item.not_before = Some(now + backoff);
                    warn!(
                        id = %item.entry().id,
                        attempts = item.attempts,
                        retry_in_ms = backoff.as_millis() as u64,
                        error = %e,
                        "Delivery failed; will retry."
                    );
                }
            }
        }
        let in_retry = self.queue.iter().filter(|i| i.attempts > 0).count();
        self.stats.in_retry.set(in_retry as i64);
    }

    fn succeeded(&mut self, item: Item, outcome: Outcome) {
        match outcome {
            Outcome::Applied => self.stats.applied.inc(),
            Outcome::Superseded => self.stats.superseded.inc(),
        }
        match item.source {
            Source::Log(work) => ack(work.delivery),
            Source::Redrive(d) => self.dead_letter.do_send(Redriven {
                namespace: d.shard.namespace.to_string(),
                id: d.entry.id,
            }),
        }
    }

    /// Out of attempts, or a permanent error: to the DLQ.
    fn give_up(&mut self, item: Item, e: &SinkError) {
        match item.source {
            Source::Log(work) => self.dead_letter.do_send(Bury(vec![Doomed {
                work,
                attempts: item.attempts,
                first_failure_ms: item.first_failure_ms,
                last_failure_ms: now_ms(),
                last_error: e.to_string(),
                target: self.policy.target.clone(),
            }])),
            Source::Redrive(d) => {
                // Its dead letter was never removed: it simply stays.
                self.stats.redrive_failed.inc();
                warn!(id = %d.entry.id, error = %e, "A redriven entry failed again; it stays in the DLQ.");
            }
        }
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
        for work in msg.0 {
            if work.generation >= generation {
                self.push(Source::Log(work));
            }
        }
        guarded(self, ctx, |act, ctx| act.pump(ctx));
    }
}

/// Deliver these dead letters again, with their original sequences and fresh
/// attempts. Each is removed from the DLQ once applied.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Redrive(pub Vec<Delivered>);

impl Handler<Redrive> for Applier {
    type Result = ();

    fn handle(&mut self, msg: Redrive, ctx: &mut Context<Self>) {
        for d in msg.0 {
            self.push(Source::Redrive(d));
        }
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
        self.queue.retain(|i| match &i.source {
            Source::Log(w) => w.generation >= generation,
            Source::Redrive(_) => true,
        });
        let in_retry = self.queue.iter().filter(|i| i.attempts > 0).count();
        self.stats.in_retry.set(in_retry as i64);
    }
}
