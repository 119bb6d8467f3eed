//! DelayScheduler: holds one shard's delayed entries until they are due.
//!
//! Delayed entries are written to the delay store (fjall, fsynced), and only
//! then acked, so they never hold up the entries behind them or the
//! consumer's watermark. Memory holds only the near-term window (entries due
//! within [`WINDOW_MS`]), refilled from the store as time passes; one timer
//! per shard fires them in due order (sequence order for equal due times).
//! Entries found overdue, after a restart or an outage, fire at no more than
//! `delay.catch_up_per_s`, and are counted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorContext, ActorFutureExt, Addr, AsyncContext, Context, Handler, Message,
    SpawnHandle, Supervised, WrapFuture,
};
use tracing::{error, info, warn};

use super::applier::{Applier, ApplyDelayed, Reset};
use super::consumer::{Rewind, ShardConsumer};
use super::{ShardStats, Work, ack, guarded};
use crate::backends::Delivery;
use crate::entry::{Delivered, ShardRef, now_ms};
use crate::state::ParkStore;

/// Entries due within this much of now are held in memory.
const WINDOW_MS: u64 = 10_000;
/// How often the window is refilled from the store.
const REFILL_EVERY: Duration = Duration::from_secs(1);
/// Most entries loaded into memory by one refill.
const REFILL_LIMIT: usize = 20_000;
/// An entry due longer ago than this is overdue: it fires under the
/// catch-up rate.
const OVERDUE_MS: u64 = 1_000;

pub struct DelayScheduler {
    applier: Addr<Applier>,
    consumer: Addr<ShardConsumer>,
    stats: Arc<ShardStats>,
    park: ParkStore,
    shard: ShardRef,
    catch_up_per_s: u64,
    /// (due ms, sequence) → entry, for entries due before `loaded_until`.
    window: BTreeMap<(u64, u64), Delivered>,
    /// Every stored entry due before this is in `window` (or has fired).
    loaded_until: u64,
    /// Entries in the store, not yet fired.
    stored: i64,
    generation: u64,
    /// Catch-up tokens, and when they were last topped up.
    tokens: f64,
    refilled_tokens_at: Instant,
    /// The armed timer and the due time it was armed for.
    timer: Option<(SpawnHandle, u64)>,
}

impl DelayScheduler {
    pub fn new(
        applier: Addr<Applier>,
        consumer: Addr<ShardConsumer>,
        stats: Arc<ShardStats>,
        park: ParkStore,
        shard: ShardRef,
        catch_up_per_s: u64,
    ) -> Self {
        Self {
            applier,
            consumer,
            stats,
            park,
            shard,
            catch_up_per_s,
            window: BTreeMap::new(),
            loaded_until: 0,
            stored: 0,
            generation: 0,
            tokens: catch_up_per_s as f64,
            refilled_tokens_at: Instant::now(),
            timer: None,
        }
    }

    /// Load the store's entries due within the window into memory.
    fn refill(&mut self, ctx: &mut Context<Self>) {
        let (park, shard) = (self.park.clone(), self.shard.clone());
        let (from, until) = (self.loaded_until, now_ms() + WINDOW_MS);
        ctx.spawn(
            async move { park.due_between(shard, from, until, REFILL_LIMIT).await }
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(loaded) => {
                        let full = loaded.len() == REFILL_LIMIT;
                        let last_due = loaded.last().map(|d| d.entry.due_ms);
                        for d in loaded {
                            act.window.insert((d.entry.due_ms, d.sequence), d);
                        }
                        // A full load stops mid-range: continue from its last
                        // due time next time (reloading that instant is harmless).
                        act.loaded_until = act.loaded_until.max(match (full, last_due) {
                            (true, Some(due)) => due,
                            _ => until,
                        });
                        act.arm(ctx);
                    }
                    Err(e) => error!(error = %e, "Cannot read the delay store; retrying."),
                }),
        );
    }

    /// Fire what is due, in due order; overdue entries only as the catch-up
    /// rate allows.
    fn fire(&mut self, ctx: &mut Context<Self>) {
        crate::failpoint!("delay.fire");
        self.timer = None;
        let now = now_ms();
        let elapsed = self.refilled_tokens_at.elapsed().as_secs_f64();
        self.refilled_tokens_at = Instant::now();
        let cap = self.catch_up_per_s as f64;
        self.tokens = (self.tokens + elapsed * cap).min(cap);
        let mut due = Vec::new();
        let mut overdue = 0;
        while let Some(entry) = self.window.first_entry() {
            let (at, _) = *entry.key();
            if at > now {
                break;
            }
            if now - at > OVERDUE_MS {
                if self.tokens < 1.0 {
                    break;
                }
                self.tokens -= 1.0;
                overdue += 1;
            }
            self.stats.fire_lateness.record(now - at);
            due.push(entry.remove());
        }
        if overdue > 0 {
            self.stats.caught_up.add(overdue);
        }
        if !due.is_empty() {
            self.stored -= due.len() as i64;
            self.applier.do_send(ApplyDelayed(due));
        }
        self.arm(ctx);
    }

    fn arm(&mut self, ctx: &mut Context<Self>) {
        self.stats.delayed.set(self.stored.max(0));
        let Some(&(next, _)) = self.window.keys().next() else {
            self.stats.next_due_ms.set(0);
            if let Some((h, _)) = self.timer.take() {
                ctx.cancel_future(h);
            }
            return;
        };
        self.stats.next_due_ms.set(next as i64);
        let now = now_ms();
        // Overdue entries waiting for catch-up tokens: look again shortly.
        let at = if next <= now { now + 50 } else { next };
        if let Some((h, armed)) = self.timer {
            if armed <= at {
                return;
            }
            ctx.cancel_future(h);
        }
        let handle = ctx.run_later(Duration::from_millis(at.saturating_sub(now)), |act, ctx| {
            guarded(act, ctx, |act, ctx| act.fire(ctx));
        });
        self.timer = Some((handle, at));
    }
}

impl Actor for DelayScheduler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let (park, shard) = (self.park.clone(), self.shard.clone());
        ctx.spawn(async move { park.delayed_summary(shard).await }.into_actor(self).map(
            |result, act, ctx| {
                if let Ok((n, first)) = result {
                    act.stored = n as i64;
                    if n > 0 {
                        info!(shard = %act.shard, delayed = n, first_due_ms = ?first, "Delayed entries restored.");
                    }
                }
                act.refill(ctx);
            },
        ));
        ctx.run_interval(REFILL_EVERY, |act, ctx| act.refill(ctx));
    }
}

impl Supervised for DelayScheduler {
    fn restarting(&mut self, _: &mut Context<Self>) {
        warn!("Restarting a delay scheduler; its window reloads from the store.");
        self.stats.restarts.inc();
        self.window.clear();
        self.loaded_until = 0;
        self.timer = None;
        // Entries handed over but not yet stored were not acked: read again.
        self.consumer.do_send(Rewind);
    }
}

/// Hold these entries until they are due: store them, then ack them.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Delay(pub Vec<Work>);

impl Handler<Delay> for DelayScheduler {
    type Result = ();

    fn handle(&mut self, msg: Delay, ctx: &mut Context<Self>) {
        let works: Vec<Work> = msg
            .0
            .into_iter()
            .filter(|w| w.generation >= self.generation)
            .collect();
        if works.is_empty() {
            return;
        }
        let items: Vec<Delivered> = works
            .iter()
            .map(|w| Delivered {
                shard: w.delivery.shard().clone(),
                sequence: w.delivery.sequence(),
                entry: w.delivery.entry().clone(),
            })
            .collect();
        let park = self.park.clone();
        let stored = items.clone();
        ctx.spawn(
            async move { park.delay(stored).await }
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(()) => {
                        act.stored += items.len() as i64;
                        for d in items {
                            if d.entry.due_ms < act.loaded_until {
                                act.window.insert((d.entry.due_ms, d.sequence), d);
                            }
                        }
                        for w in works {
                            ack(w.delivery);
                        }
                        guarded(act, ctx, |act, ctx| act.arm(ctx));
                    }
                    Err(e) => {
                        // Nothing was acked: a restart reads them again.
                        error!(error = %e, "Cannot store delayed entries; restarting.");
                        ctx.stop();
                    }
                }),
        );
    }
}

/// A delayed entry was cancelled (and removed from the store).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Cancelled(pub Delivered);

impl Handler<Cancelled> for DelayScheduler {
    type Result = ();

    fn handle(&mut self, Cancelled(d): Cancelled, ctx: &mut Context<Self>) {
        self.window.remove(&(d.entry.due_ms, d.sequence));
        self.stored -= 1;
        self.arm(ctx);
    }
}

impl Handler<Reset> for DelayScheduler {
    type Result = ();

    fn handle(&mut self, Reset(generation): Reset, _: &mut Context<Self>) {
        // Stored entries are not tied to a generation: they stay.
        self.generation = generation;
    }
}
