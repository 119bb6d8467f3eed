//! DeadLetter: stores one shard's undeliverable entries in the DLQ, then
//! acks them so the watermark can pass. A key's letters are stored one after
//! another, in order. An append that fails is retried; the
//! entry stays unacked meanwhile, so a crash reads it again from the log.
//! It also removes a dead letter once its redrive has been applied.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, Recipient, Supervised,
    WrapFuture,
};
use tracing::{error, info, warn};

use super::messages::{Bury, Done, Doomed, Redriven, Reset, Retire, Rewind};
use super::{ShardStats, ack, guarded};
use crate::backends::shard::AnyDlq;
use crate::backends::{DeadLetter, DeadLetters, Origin};
use crate::entry::Delivered;

pub struct DeadLetterActor {
    dlq: AnyDlq,
    /// Its shard's consumer, told to rewind when this actor restarts;
    /// `None` once retired ([`Retire`]).
    rewind: Option<Recipient<Rewind>>,
    stats: Arc<ShardStats>,
    generation: u64,
    /// Keys with a letter being stored, and their letters waiting behind it.
    /// A key's letters are stored one after another, so the DLQ takes them
    /// in their order: an SQS queue keeps the order in which sends finish,
    /// and two sends in flight at once may finish either way round.
    storing: HashMap<String, VecDeque<Doomed>>,
}

impl DeadLetterActor {
    pub fn new(dlq: AnyDlq, rewind: Recipient<Rewind>, stats: Arc<ShardStats>) -> Self {
        Self {
            dlq,
            rewind: Some(rewind),
            stats,
            generation: 0,
            storing: HashMap::new(),
        }
    }

    /// The shard rewound past it: it will be read again.
    fn stale(&self, doomed: &Doomed) -> bool {
        matches!(&doomed.done, Done::Ack(w) if w.generation < self.generation)
    }

    fn store(&mut self, doomed: Doomed, ctx: &mut Context<Self>) {
        if self.stale(&doomed) {
            return;
        }
        let e = &doomed.delivered.entry;
        let key = e.key.clone().unwrap_or_else(|| e.id.clone());
        match self.storing.get_mut(&key) {
            Some(waiting) => waiting.push_back(doomed),
            None => {
                self.storing.insert(key.clone(), VecDeque::new());
                self.append(key, doomed, ctx);
            }
        }
    }

    /// The next letter of `key`, now that the one before it is stored.
    fn next(&mut self, key: String, ctx: &mut Context<Self>) {
        loop {
            let Some(waiting) = self.storing.get_mut(&key) else {
                return;
            };
            match waiting.pop_front() {
                None => {
                    self.storing.remove(&key);
                    return;
                }
                Some(d) if self.stale(&d) => continue,
                Some(d) => return self.append(key, d, ctx),
            }
        }
    }

    fn append(&mut self, key: String, doomed: Doomed, ctx: &mut Context<Self>) {
        crate::failpoint!("dead_letter.store");
        let d = &doomed.delivered;
        let letter = DeadLetter {
            dlq_sequence: 0,
            entry: (*d.entry).clone(),
            origin: Origin {
                shard: d.shard.clone(),
                sequence: d.sequence,
                target: doomed.target.clone(),
            },
            attempts: doomed.attempts,
            first_failure_ms: doomed.first_failure_ms,
            last_failure_ms: doomed.last_failure_ms,
            last_error: doomed.last_error.clone(),
        };
        let (dlq, holds) = (self.dlq.clone(), doomed.holds.clone());
        ctx.spawn(
            async move { dlq.append_holding(letter, holds.as_deref()).await }
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(dlq_sequence) => {
                        act.stats.dead_lettered.inc();
                        let d = &doomed.delivered;
                        info!(
                            shard = %d.shard,
                            sequence = d.sequence,
                            id = %d.entry.id,
                            dlq_sequence,
                            attempts = doomed.attempts,
                            error = %doomed.last_error,
                            "Entry dead-lettered."
                        );
                        finish(doomed.done, doomed.delivered);
                        guarded(act, ctx, |act, ctx| act.next(key, ctx));
                    }
                    Err(error) => {
                        // Its key's later letters keep waiting behind it.
                        error!(%error, "Could not store a dead letter; retrying in 1 s.");
                        ctx.run_later(Duration::from_secs(1), move |act, ctx| {
                            guarded(act, ctx, |act, ctx| match act.stale(&doomed) {
                                true => act.next(key, ctx),
                                false => act.append(key, doomed, ctx),
                            });
                        });
                    }
                }),
        );
    }
}

/// The dead letter is durable: let the entry go from where it was.
fn finish(done: Done, delivered: Delivered) {
    let shard = delivered.shard.clone();
    match done {
        Done::Ack(w) => ack(w.delivery),
        Done::Undelay(store) => {
            actix::spawn(async move {
                if let Err(e) = store.undelay(delivered).await {
                    warn!(error = %e, "Could not remove a dead-lettered entry from the delay store.");
                }
            });
        }
        Done::Unpark {
            store,
            order_key,
            sequence,
        } => {
            actix::spawn(async move {
                if let Err(e) = store.remove(shard, order_key, sequence).await {
                    warn!(error = %e, "Could not unpark a dead-lettered entry.");
                }
            });
        }
    }
}

impl Actor for DeadLetterActor {
    type Context = Context<Self>;
}

impl Supervised for DeadLetterActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        let Some(rewind) = &self.rewind else {
            return; // Retired.
        };
        warn!("Restarting a dead-letter actor; its shard rewinds.");
        self.stats.restarts.inc();
        // What it was storing is read again after the rewind.
        self.storing.clear();
        // It has nothing to start: the shard's rewind waits out the pause.
        self.stats.restart_backoff.restarted();
        rewind.do_send(Rewind);
    }
}

/// A letter still being stored is not acked: the shard's new actors read
/// its entry again (and may store a second letter for it).
impl Handler<Retire> for DeadLetterActor {
    type Result = ();

    fn handle(&mut self, _: Retire, ctx: &mut Context<Self>) {
        self.rewind = None;
        self.storing.clear();
        ctx.stop();
    }
}

impl Handler<Bury> for DeadLetterActor {
    type Result = ();

    fn handle(&mut self, msg: Bury, ctx: &mut Context<Self>) {
        for doomed in msg.0 {
            guarded(self, ctx, |act, ctx| act.store(doomed, ctx));
        }
    }
}

impl Handler<Redriven> for DeadLetterActor {
    type Result = ();

    fn handle(&mut self, msg: Redriven, ctx: &mut Context<Self>) {
        let dlq = self.dlq.clone();
        ctx.spawn(
            async move {
                if let Err(error) = dlq.remove(&msg.namespace, msg.dlq_sequence, "redriven").await {
                    // It stays listed; a later redrive applies it again, which the
                    // version guard or idempotency key makes harmless.
                    error!(%error, dlq_sequence = msg.dlq_sequence, "Could not remove a redriven dead letter.");
                }
            }
            .into_actor(self),
        );
    }
}

impl Handler<Reset> for DeadLetterActor {
    type Result = ();

    fn handle(&mut self, Reset(generation): Reset, _: &mut Context<Self>) {
        self.generation = generation;
    }
}
