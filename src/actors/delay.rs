//! DelayScheduler: holds one shard's entries until they are due, then hands
//! them to the Applier. One timer per shard, never one per entry. Entries
//! are held in memory for now; the consumer's watermark stays behind them, so
//! a restart reads them again from the log and nothing is lost.

use std::collections::BTreeMap;
use std::time::Duration;

use actix::{Actor, Addr, AsyncContext, Context, Handler, Message, SpawnHandle, Supervised};
use tracing::warn;

use super::applier::{Applier, Apply, Reset};
use super::consumer::{Rewind, ShardConsumer};
use super::{ShardStats, Work, guarded};
use crate::backends::Delivery;
use crate::entry::now_ms;
use std::sync::Arc;

pub struct DelayScheduler {
    applier: Addr<Applier>,
    consumer: Addr<ShardConsumer>,
    stats: Arc<ShardStats>,
    /// (due ms, sequence) → work. Entries due at the same moment fire in
    /// sequence order.
    pending: BTreeMap<(u64, u64), Work>,
    generation: u64,
    /// The armed timer and the due time it was armed for.
    timer: Option<(SpawnHandle, u64)>,
}

impl DelayScheduler {
    pub fn new(
        applier: Addr<Applier>,
        consumer: Addr<ShardConsumer>,
        stats: Arc<ShardStats>,
    ) -> Self {
        Self {
            applier,
            consumer,
            stats,
            pending: BTreeMap::new(),
            generation: 0,
            timer: None,
        }
    }

    /// Fire everything due, then arm the timer for the next entry.
    fn fire(&mut self, ctx: &mut Context<Self>) {
        crate::failpoint!("delay.fire");
        self.timer = None;
        let now = now_ms();
        let later = self.pending.split_off(&(now + 1, 0));
        let due = std::mem::replace(&mut self.pending, later);
        if !due.is_empty() {
            self.applier.do_send(Apply(due.into_values().collect()));
        }
        self.arm(ctx);
    }

    fn arm(&mut self, ctx: &mut Context<Self>) {
        self.stats.delayed.set(self.pending.len() as i64);
        let Some(&(next, _)) = self.pending.keys().next() else {
            self.stats.next_due_ms.set(0);
            if let Some((h, _)) = self.timer.take() {
                ctx.cancel_future(h);
            }
            return;
        };
        self.stats.next_due_ms.set(next as i64);
        if let Some((h, at)) = self.timer {
            if at <= next {
                return;
            }
            ctx.cancel_future(h);
        }
        let wait = Duration::from_millis(next.saturating_sub(now_ms()));
        let handle = ctx.run_later(wait, |act, ctx| {
            guarded(act, ctx, |act, ctx| act.fire(ctx));
        });
        self.timer = Some((handle, next));
    }
}

impl Actor for DelayScheduler {
    type Context = Context<Self>;
}

impl Supervised for DelayScheduler {
    fn restarting(&mut self, _: &mut Context<Self>) {
        warn!("Restarting a delay scheduler; its shard rewinds.");
        self.stats.restarts.inc();
        self.pending.clear();
        self.timer = None;
        self.stats.delayed.set(0);
        self.consumer.do_send(Rewind);
    }
}

/// Hold these entries until they are due.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Delay(pub Vec<Work>);

impl Handler<Delay> for DelayScheduler {
    type Result = ();

    fn handle(&mut self, msg: Delay, ctx: &mut Context<Self>) {
        guarded(self, ctx, |act, ctx| {
            for w in msg.0 {
                if w.generation < act.generation {
                    continue;
                }
                let key = (w.delivery.entry().due_ms, w.delivery.sequence());
                act.pending.insert(key, w);
            }
            act.arm(ctx);
        });
    }
}

impl Handler<Reset> for DelayScheduler {
    type Result = ();

    fn handle(&mut self, Reset(generation): Reset, ctx: &mut Context<Self>) {
        guarded(self, ctx, |act, ctx| {
            act.generation = generation;
            act.pending.retain(|_, w| w.generation >= generation);
            act.arm(ctx);
        });
    }
}
