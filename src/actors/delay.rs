//! DelayScheduler: holds one shard's delayed entries until they are due.
//!
//! Delayed entries are written to the delay store (fjall, fsynced), and only
//! then acked, so they never hold up the entries behind them or the
//! consumer's watermark. Memory holds only the near-term window (entries due
//! within [`WINDOW_MS`], at most [`WINDOW_MAX_ENTRIES`] and
//! [`WINDOW_MAX_BYTES`]), refilled from the store as time passes; one timer
//! per shard fires them in due order (sequence order for equal due times).
//! Entries found overdue, after a restart or an outage, fire at no more than
//! `delay.catch_up_per_s`, and are counted.
//!
//! Time here is [`clock_ms`]: the wall clock read once, then advanced by the
//! monotonic clock (tokio's, so tests can pause it). A wall-clock step while
//! the process runs neither bunches nor stalls the timers.
//!
//! A cancel goes through the scheduler, so it cannot race a fire: an entry
//! still waiting is removed from memory and then from the store; one that has
//! already fired is reported as [`CancelOutcome::Fired`].

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, Recipient,
    ResponseActFuture, SpawnHandle, Supervised, WrapFuture,
};
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::messages::{ApplyDelayed, Cancel, CancelOutcome, Delay, Reset, Retire, Rewind};
use super::{ShardStats, Work, ack, guarded};
use crate::backends::{BackendError, DelayStore, Delivery, Limit};
use crate::entry::{Delivered, ShardRef, now_ms};

/// Milliseconds since the epoch on a monotonic clock: the wall clock at the
/// first call, plus tokio's monotonic time since.
pub fn clock_ms() -> u64 {
    static ANCHOR: OnceLock<(u64, Instant)> = OnceLock::new();
    let (wall, at) = ANCHOR.get_or_init(|| (now_ms(), Instant::now()));
    wall + Instant::now().saturating_duration_since(*at).as_millis() as u64
}

/// Entries due within this much of now are held in memory.
const WINDOW_MS: u64 = 10_000;
/// How often the window is refilled from the store.
const REFILL_EVERY: Duration = Duration::from_secs(1);
/// The most entries, and payload bytes, the window holds from the store: a
/// backlog of overdue entries (after a restart or an outage) stays on disk
/// and comes in as the window empties at the catch-up rate.
const WINDOW_MAX_ENTRIES: usize = 10_000;
const WINDOW_MAX_BYTES: usize = 8 << 20;
/// An entry due longer ago than this is overdue: it fires under the
/// catch-up rate.
const OVERDUE_MS: u64 = 1_000;

pub struct DelayScheduler {
    /// `None` once retired ([`Retire`]).
    applier: Option<Recipient<ApplyDelayed>>,
    rewind: Option<Recipient<Rewind>>,
    stats: Arc<ShardStats>,
    store: Arc<dyn DelayStore>,
    shard: ShardRef,
    catch_up_per_s: u64,
    /// (due ms, sequence) → entry, for entries due before `loaded_until`.
    window: BTreeMap<(u64, u64), Delivered>,
    /// Payload bytes in `window`.
    window_bytes: usize,
    /// A refill is in flight.
    refilling: bool,
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
    /// Cancelled before they were loaded: a refill already in flight may
    /// still bring them back, so it skips these.
    cancelled: HashSet<(u64, u64)>,
    /// How long a restart waits before working ([`super::RestartBackoff`]).
    pause: Duration,
    /// This scheduler's target, in a namespace of several: a store that puts
    /// entries back on the shared topic puts them back for it alone.
    target: Option<Arc<str>>,
}

impl DelayScheduler {
    pub fn new(
        applier: Recipient<ApplyDelayed>,
        rewind: Recipient<Rewind>,
        stats: Arc<ShardStats>,
        store: Arc<dyn DelayStore>,
        shard: ShardRef,
        catch_up_per_s: u64,
        target: Option<Arc<str>>,
    ) -> Self {
        Self {
            target,
            applier: Some(applier),
            rewind: Some(rewind),
            stats,
            store,
            shard,
            catch_up_per_s,
            window: BTreeMap::new(),
            window_bytes: 0,
            refilling: false,
            loaded_until: 0,
            stored: 0,
            generation: 0,
            tokens: catch_up_per_s as f64,
            refilled_tokens_at: Instant::now(),
            timer: None,
            cancelled: HashSet::new(),
            pause: Duration::ZERO,
        }
    }

    fn insert(&mut self, key: (u64, u64), d: Delivered) {
        self.window_bytes += d.entry.payload.len();
        if let Some(old) = self.window.insert(key, d) {
            self.window_bytes -= old.entry.payload.len();
        }
    }

    fn remove(&mut self, key: &(u64, u64)) -> Option<Delivered> {
        let d = self.window.remove(key)?;
        self.window_bytes -= d.entry.payload.len();
        Some(d)
    }

    /// Load the store's entries due within the window into memory, as far
    /// as the window has room.
    fn refill(&mut self, ctx: &mut Context<Self>) {
        let limit = Limit {
            entries: WINDOW_MAX_ENTRIES.saturating_sub(self.window.len()),
            bytes: WINDOW_MAX_BYTES.saturating_sub(self.window_bytes),
        };
        if limit.entries == 0 || limit.bytes == 0 || self.refilling {
            return;
        }
        self.refilling = true;
        let (store, shard) = (self.store.clone(), self.shard.clone());
        let (from, until) = (self.loaded_until, clock_ms() + WINDOW_MS);
        ctx.spawn(
            async move { store.due_between(&shard, from, until, limit).await }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    act.refilling = false;
                    act.loaded(result, limit, until, ctx);
                }),
        );
    }

    /// A refill came back: take what it loaded into the window.
    fn loaded(
        &mut self,
        result: Result<Vec<Delivered>, BackendError>,
        limit: Limit,
        until: u64,
        ctx: &mut Context<Self>,
    ) {
        let loaded = match result {
            Ok(loaded) => loaded,
            Err(e) => return error!(error = %e, "Cannot read the delay store; retrying."),
        };
        // A load cut short by the limit stops mid-range: continue from its
        // last due time next time (reloading that instant is harmless).
        let bytes: usize = loaded.iter().map(|d| d.entry.payload.len()).sum();
        let full = loaded.len() == limit.entries || bytes >= limit.bytes;
        let last_due = loaded.last().map(|d| d.entry.due_ms);
        for d in loaded {
            let key = (d.entry.due_ms, d.sequence);
            if !self.cancelled.contains(&key) {
                self.insert(key, d);
            }
        }
        self.loaded_until = self.loaded_until.max(match (full, last_due) {
            (true, Some(due)) => due,
            _ => until,
        });
        self.arm(ctx);
    }

    /// Fire what is due, in due order; overdue entries only as the catch-up
    /// rate allows.
    fn fire(&mut self, ctx: &mut Context<Self>) {
        crate::failpoint!("delay.fire");
        self.timer = None;
        let now = clock_ms();
        // A refill that could still return these started long ago.
        self.cancelled.retain(|(due, _)| due + WINDOW_MS > now);
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
            let d = entry.remove();
            self.window_bytes -= d.entry.payload.len();
            due.push(d);
        }
        if overdue > 0 {
            self.stats.caught_up.add(overdue);
        }
        if !due.is_empty() {
            self.stored -= due.len() as i64;
            if let Some(applier) = &self.applier {
                applier.do_send(ApplyDelayed(due));
            }
        }
        // An overdue backlog beyond the window comes in as soon as half of
        // it has fired, not only at the next tick.
        if self.window.len() < WINDOW_MAX_ENTRIES / 2 && self.loaded_until <= now {
            self.refill(ctx);
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
        let now = clock_ms();
        let at = if next > now {
            next
        } else if now - next > OVERDUE_MS && self.tokens < 1.0 {
            // Waiting for a catch-up token: look again when one has accrued.
            now + (1000 / self.catch_up_per_s.max(1)).clamp(1, 50)
        } else {
            // Came due since the last fire (the clock ticked): fire now.
            now
        };
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

impl DelayScheduler {
    /// Count what the store holds, then load the window and keep it filled.
    fn start(&mut self, ctx: &mut Context<Self>) {
        let (store, shard) = (self.store.clone(), self.shard.clone());
        ctx.spawn(async move { store.summary(&shard).await }.into_actor(self).map(
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

impl Actor for DelayScheduler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.applier.is_none() {
            return; // Restarted by its supervisor after retiring: stays idle.
        }
        match std::mem::take(&mut self.pause) {
            pause if pause.is_zero() => self.start(ctx),
            pause => {
                ctx.run_later(pause, |act, ctx| act.start(ctx));
            }
        }
    }
}

impl Supervised for DelayScheduler {
    fn restarting(&mut self, _: &mut Context<Self>) {
        let Some(rewind) = &self.rewind else {
            return; // Retired.
        };
        warn!("Restarting a delay scheduler; its window reloads from the store.");
        self.stats.restarts.inc();
        self.pause = self.stats.restart_backoff.restarted();
        // Entries handed over but not yet stored were not acked: read again.
        rewind.do_send(Rewind);
        self.forget();
    }
}

impl DelayScheduler {
    /// Drop the window: it reloads from the store.
    fn forget(&mut self) {
        self.window.clear();
        self.window_bytes = 0;
        self.refilling = false;
        self.loaded_until = 0;
        self.timer = None;
    }
}

/// Its entries wait in the store, where the shard's new scheduler finds
/// them. A cancel still reaches the store through a retired scheduler.
impl Handler<Retire> for DelayScheduler {
    type Result = ();

    fn handle(&mut self, _: Retire, ctx: &mut Context<Self>) {
        self.applier = None;
        self.rewind = None;
        self.forget();
        ctx.stop();
    }
}

impl Handler<Delay> for DelayScheduler {
    type Result = ();

    fn handle(&mut self, msg: Delay, ctx: &mut Context<Self>) {
        if self.applier.is_none() {
            return; // Retired: read again by the shard's new actors.
        }
        let works: Vec<Work> = msg
            .0
            .into_iter()
            .filter(|w| w.generation >= self.generation)
            .collect();
        if works.is_empty() {
            return;
        }
        let narrow = self.target.as_deref().filter(|_| self.store.fires_itself());
        let items: Vec<Delivered> = works
            .iter()
            .map(|w| {
                let mut entry = w.delivery.entry().clone();
                if let Some(target) = narrow {
                    Arc::make_mut(&mut entry).narrow_to(target);
                }
                Delivered {
                    shard: w.delivery.shard().clone(),
                    sequence: w.delivery.sequence(),
                    entry,
                }
            })
            .collect();
        let store = self.store.clone();
        let stored = items.clone();
        ctx.spawn(
            async move { store.delay(stored).await }
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(()) if act.store.fires_itself() => {
                        for w in works {
                            ack(w.delivery);
                        }
                    }
                    Ok(()) => {
                        act.stored += items.len() as i64;
                        for d in items {
                            let key = (d.entry.due_ms, d.sequence);
                            if key.0 < act.loaded_until && !act.cancelled.contains(&key) {
                                act.insert(key, d);
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

impl Handler<Cancel> for DelayScheduler {
    type Result = ResponseActFuture<Self, Result<CancelOutcome, BackendError>>;

    fn handle(&mut self, Cancel(d): Cancel, _: &mut Context<Self>) -> Self::Result {
        let key = (d.entry.due_ms, d.sequence);
        let in_window = self.remove(&key).is_some();
        let store = self.store.clone();
        if !in_window && key.0 < self.loaded_until {
            // Everything stored that is due before `loaded_until` was in
            // memory; not being there any more means it has fired (and is
            // being delivered while the store still has it).
            let (ns, id) = (d.shard.namespace.clone(), d.entry.id.clone());
            return Box::pin(
                async move {
                    Ok(match store.find(&ns, &id).await? {
                        Some(_) => CancelOutcome::Fired,
                        None => CancelOutcome::Gone,
                    })
                }
                .into_actor(self),
            );
        }
        if !in_window {
            self.cancelled.insert(key);
        }
        Box::pin(
            async move {
                let result = store.cancel(&d).await;
                (result, d)
            }
            .into_actor(self)
            .map(move |(result, d), act, ctx| {
                let removed = match result {
                    Ok(removed) => removed,
                    Err(e) => {
                        // Still stored: it must still fire.
                        act.cancelled.remove(&key);
                        if in_window {
                            act.insert(key, d);
                        }
                        return Err(e);
                    }
                };
                if removed {
                    act.stored -= 1;
                }
                act.arm(ctx);
                Ok(if removed {
                    CancelOutcome::Cancelled
                } else {
                    CancelOutcome::Gone
                })
            }),
        )
    }
}

impl Handler<Reset> for DelayScheduler {
    type Result = ();

    fn handle(&mut self, Reset(generation): Reset, _: &mut Context<Self>) {
        // Stored entries are not tied to a generation: they stay.
        self.generation = generation;
    }
}
