//! Applier: delivers one shard's due entries to the sink.
//!
//! A transient failure is retried with the namespace's backoff and full
//! jitter. The applier never sleeps: while one key waits to retry, other keys
//! keep flowing. With `ordering = "per_key"`, later entries of a waiting key
//! wait behind it, and a sink batch holds at most one entry per key, unless
//! the sink applies a batch whole and in order.
//!
//! A backoff longer than `retry.park_after_ms` parks the entry, with the later
//! entries of its key, in the park store (fsynced before they are acked), so a
//! long wait never pins the shard's memory or its watermark. While a key is
//! parked or held, its new entries park behind it; when the head is due, the
//! key's entries come back in order.
//!
//! An entry that fails permanently, or runs out of `max_attempts`, goes to the
//! DeadLetter actor (with the DLQ off, it is retried forever: nothing is
//! dropped). With `dlq.on_dead_letter = "hold_key"`, its key is held until the
//! dead letter is redriven or purged. Redriven dead letters come back here
//! with their original sequence.
//!
//! While the target is down, the namespace's [`Breaker`] is open: no sink
//! call starts and no entry spends an attempt; one entry at a time goes as a
//! probe. Attempts and the DLQ are for entries that fail on a healthy target.
//!
//! A target that panics is caught where it is called: the call's entries are
//! applied again one per call, and an entry that panics alone three times is
//! poison and goes to the DLQ with the panic's message. Nothing restarts.
//!
//! On Kafka nothing parks on this machine's disk. A hold lives with its dead
//! letter in the DLQ topic, where any process that takes over the partition
//! finds it, and the entries behind a held key are dead-lettered behind it
//! (in order). A redriven entry comes back through the partition: the
//! holder's return releases its key once applied, and the entries redriven
//! after it wait behind it in the queue.

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, Recipient, SpawnHandle,
    Supervised, WrapFuture,
};
use futures_util::FutureExt;
use tracing::{Instrument, error, info, info_span, warn};

use super::breaker::{Admit, Breaker};
use super::concurrency::{Concurrency, Signal};
use super::messages::{
    Apply, ApplyDelayed, Bury, Done, Doomed, Purged, Quiesce, Redrive, RedriveBacklog, Redriven,
    RedrivenLetter, Reset, Retire, Rewind,
};
use super::sets::{SET_LETTER_HEADER, SetJoin, Settled};
use super::{ShardStats, Stores, Work, ack, backoff, guarded, panic_message, transient};
use crate::backends::{DelayStore, Delivery, KeyHolds, Limit};
use crate::config::{Ordering, RetryConfig};
use crate::entry::{Delivered, Entry, SET_HEADER, ShardRef, now_ms};
use crate::sinks::{ApplyResult, Outcome, Sink, SinkError};
use crate::state::park::{ParkStore, Parked};
use crate::telemetry;

/// Payload bytes per sink call, at most (one entry always); the entries
/// per call are the sink's [`Sink::max_batch`].
const MAX_BATCH_BYTES: usize = 4 << 20;
/// A parked key's backlog comes back a page at a time.
const PARK_PAGE: Limit = Limit {
    entries: 1000,
    bytes: 4 << 20,
};
/// A target that panics on an entry applied alone this many times has met a
/// poison entry: it goes to the DLQ with the panic's message.
const POISON_AFTER: u32 = 3;
/// Where sets are staged (Kafka), how long a set's mutation waits behind
/// others of its key before it joins its set anyway (see `join_sets`).
const STAGED_WAIT: Duration = Duration::from_secs(5);

/// Entries applied and waiting for the sink's flush, at most: past this, it
/// flushes at once.
const MAX_UNFLUSHED: usize = 4096;

/// Where an item came from, which decides what its success means.
enum Source {
    /// Read from the log: success acks it, so the watermark can pass it.
    Log(Work),
    /// Sent back from the DLQ: success removes its dead letter.
    Redrive(RedrivenLetter),
    /// Loaded from the park store: success removes it there.
    Parked(Delivered),
    /// Fired from the delay store: success removes it there.
    Delayed(Delivered),
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
    /// Applied in a sink call of its own: a call it was in panicked.
    alone: bool,
    /// Sink calls that panicked with it alone in them.
    panics: u32,
    /// A mutation of a set, or a dead letter holding a whole set: it goes
    /// through the target's [`SetJoin`], never into a sink batch.
    in_set: bool,
    /// When it was queued.
    queued_at: Instant,
}

impl Item {
    fn marked(mut self) -> Self {
        let e = self.entry();
        // One pass over the headers for the many entries that are no part
        // of a set: every set header starts so.
        let maybe = e.headers.iter().any(|(k, _)| k.starts_with(SET_HEADER));
        self.in_set = maybe
            && (e.set_place().is_some()
                || e.header(SET_LETTER_HEADER).is_some()
                // Only where sets are staged (Kafka) do these reach an applier.
                || e.is_set_marker()
                || e.is_set_abandon());
        self
    }

    fn delivered(&self) -> Delivered {
        match &self.source {
            Source::Log(w) => Delivered {
                shard: w.delivery.shard().clone(),
                sequence: w.delivery.sequence(),
                entry: w.delivery.entry().clone(),
            },
            Source::Redrive(r) => r.delivered.clone(),
            Source::Parked(d) | Source::Delayed(d) => d.clone(),
        }
    }

    fn entry(&self) -> &Entry {
        match &self.source {
            Source::Log(w) => w.delivery.entry(),
            Source::Redrive(r) => &r.delivered.entry,
            Source::Parked(d) | Source::Delayed(d) => &d.entry,
        }
    }

    fn order_key(&self, ordering: Ordering) -> &str {
        order_key(self.entry(), ordering)
    }
}

/// The key an entry orders under: its key with `per_key` (or its id when it
/// has none), its own id with `none`.
fn order_key(e: &Entry, ordering: Ordering) -> &str {
    match ordering {
        Ordering::PerKey => e.key.as_deref().unwrap_or(&e.id),
        Ordering::None => &e.id,
    }
}

/// How an applier treats entries that keep failing.
#[derive(Clone)]
pub struct Policy {
    pub retry: RetryConfig,
    pub ordering: Ordering,
    /// Failed entries go to the DLQ; without it they are retried forever.
    pub dlq: bool,
    /// A dead letter holds its key until redriven or purged.
    pub hold_key: bool,
    /// The target's name, recorded with each dead letter.
    pub target: String,
    /// Long backoffs may go to the park store (local disk).
    pub may_park: bool,
    /// Where `hold_key` keeps its holds.
    pub holds: Holds,
    /// The target's breaker, shared by the namespace's shards.
    pub breaker: Arc<Breaker>,
    /// Where the target's sets of mutations gather and are applied.
    pub sets: Arc<SetJoin>,
    /// The target's concurrency limit, shared by the namespace's shards.
    pub concurrency: Arc<Concurrency>,
}

/// Where `hold_key` keeps its holds, and what waits behind them.
#[derive(Clone)]
pub enum Holds {
    /// In the park store, with the entries parked behind each hold.
    Park,
    /// In the DLQ topic, as the holding letter itself; the entries behind a
    /// hold are dead-lettered behind it.
    Broker(Arc<dyn KeyHolds>),
}

/// Why a key cannot deliver its new entries now.
#[derive(Debug, Default)]
struct Block {
    /// Its parked head's due time; `None` once loaded back (or never parked).
    head_due_ms: Option<u64>,
    /// The dead letter holding it.
    held_by: Option<String>,
    /// On a broker: the DLQ view shows `held_by`'s letter (until then it is
    /// on its way, and the hold stands regardless).
    confirmed: bool,
    /// Park writes for it not yet durable.
    parks_in_flight: u32,
    /// A reload from the park store is running.
    loading: bool,
    /// The last sequence of the page loaded last: the next page starts
    /// after it. `None`: load from the key's first parked entry.
    resume_after: Option<u64>,
}

/// The actors an applier talks to.
pub struct ApplierPeers {
    /// Its shard's consumer, told to rewind when the applier restarts.
    pub rewind: Recipient<Rewind>,
    /// Its shard's DeadLetter actor: letters to store, redrives to remove.
    pub bury: Recipient<Bury>,
    pub redriven: Recipient<Redriven>,
}

pub struct Applier {
    sink: Arc<dyn Sink>,
    shard: ShardRef,
    /// `None` once retired ([`Retire`]).
    peers: Option<ApplierPeers>,
    park: ParkStore,
    delays: Arc<dyn DelayStore>,
    policy: Policy,
    stats: Arc<ShardStats>,
    queue: VecDeque<Item>,
    /// Set items handed to the [`SetJoin`], by uid: out of the queue while
    /// they wait for their sets.
    joined: HashMap<u64, Item>,
    /// The keys they hold meanwhile, and how many hold each.
    set_held: HashMap<String, usize>,
    /// A wakeup is armed for a staged mutation's [`STAGED_WAIT`].
    staged_wake: bool,
    blocked: HashMap<String, Block>,
    /// Holds on the broker this applier released (its holder applied) whose
    /// letter the DLQ view may still show: key → the holder's id.
    released: HashMap<String, String>,
    next_uid: u64,
    generation: u64,
    /// The blocked keys have been loaded from the park store. Until then
    /// nothing is applied, or a held key's later entry could overtake it.
    ready: bool,
    /// A sink call is in flight.
    busy: bool,
    /// Applied by a sink that defers durability ([`Sink::flush_within`]),
    /// and waiting for its flush: only then do they count as applied.
    unflushed: Vec<(Item, Outcome)>,
    /// The last flush's buffer, emptied, for the next one: a buffer grown
    /// afresh every flush was a steady cost of reallocations and page faults.
    spare_unflushed: Vec<(Item, Outcome)>,
    /// A flush is in flight, or armed to start.
    flushing: bool,
    flush_timer: Option<SpawnHandle>,
    /// The call in flight is the breaker's probe, on this key.
    probing: Option<String>,
    /// Waiting for the breaker: a timer for the next probe, and whether a
    /// watch for its closing is running.
    breaker_timer: Option<SpawnHandle>,
    watching_breaker: bool,
    /// Shutting down: no new sink call starts.
    quiescing: bool,
    /// Answered once the sink call in flight has settled ([`Quiesce`]).
    quiesced: Vec<tokio::sync::oneshot::Sender<()>>,
    timer: Option<SpawnHandle>,
    /// How long a restart waits before working ([`super::RestartBackoff`]).
    pause: Duration,
    /// The shard moved to another arbiter: this applier is done for good.
    retired: bool,
    /// Slots of the target's concurrency limit the call in flight holds,
    /// and when it started.
    slots: usize,
    call_started: Instant,
    /// Waiting for a slot to come free.
    awaiting_slot: bool,
}

impl Applier {
    pub fn new(
        sink: Arc<dyn Sink>,
        shard: ShardRef,
        peers: ApplierPeers,
        stores: Stores,
        policy: Policy,
        stats: Arc<ShardStats>,
    ) -> Self {
        Self {
            sink,
            shard,
            peers: Some(peers),
            park: stores.park,
            delays: stores.delays,
            policy,
            stats,
            queue: VecDeque::new(),
            joined: HashMap::new(),
            set_held: HashMap::new(),
            staged_wake: false,
            blocked: HashMap::new(),
            released: HashMap::new(),
            next_uid: 0,
            generation: 0,
            ready: false,
            busy: false,
            unflushed: Vec::new(),
            spare_unflushed: Vec::new(),
            flushing: false,
            flush_timer: None,
            probing: None,
            breaker_timer: None,
            watching_breaker: false,
            quiescing: false,
            quiesced: Vec::new(),
            timer: None,
            pause: Duration::ZERO,
            retired: false,
            slots: 0,
            call_started: Instant::now(),
            awaiting_slot: false,
        }
    }

    /// Take a slot of the target's concurrency limit for a call, for a sink
    /// that writes a batch in one go. (A sink that sends each entry on its
    /// own takes a slot per request, inside the call: [`apply_gated`].)
    /// False: none free; the pump runs again once one is.
    fn take_slot(&mut self, ctx: &mut Context<Self>) -> bool {
        if self.sink.concurrent_entries() {
            return true;
        }
        let granted = self.policy.concurrency.acquire(1);
        if granted == 0 {
            if !self.awaiting_slot {
                self.awaiting_slot = true;
                let concurrency = self.policy.concurrency.clone();
                ctx.spawn(
                    async move { concurrency.released().await }
                        .into_actor(self)
                        .map(|_, act, ctx| {
                            act.awaiting_slot = false;
                            act.pump(ctx);
                        }),
                );
            }
            return false;
        }
        self.slots = granted;
        self.call_started = Instant::now();
        true
    }

    /// The call in flight ended: give its slots back, with how it went.
    fn give_slots(&mut self, signal: Option<Signal>) {
        let slots = std::mem::take(&mut self.slots);
        if slots == 0 {
            return;
        }
        match signal {
            Some(s) => self
                .policy
                .concurrency
                .release(slots, self.call_started.elapsed(), s),
            None => self.policy.concurrency.forget(slots),
        }
    }

    fn bury(&self, bury: Bury) {
        if let Some(p) = &self.peers {
            p.bury.do_send(bury);
        }
    }

    fn redriven(&self, redriven: Redriven) {
        if let Some(p) = &self.peers {
            p.redriven.do_send(redriven);
        }
    }

    fn item(&mut self, source: Source) -> Item {
        self.next_uid += 1;
        Item {
            uid: self.next_uid,
            source,
            attempts: 0,
            not_before: None,
            first_failure_ms: 0,
            alone: false,
            panics: 0,
            in_set: false,
            queued_at: Instant::now(),
        }
        .marked()
    }

    /// Admit new work, in order: queue each item, or park it behind its key
    /// if the key is blocked (one park per key for the lot). Then apply what
    /// is ready.
    fn take_in(&mut self, sources: Vec<Source>, ctx: &mut Context<Self>) {
        if self.retired {
            return; // Read again by the shard's new actors.
        }
        guarded(self, ctx, |act, ctx| {
            let mut behind: Vec<(String, Vec<Item>)> = Vec::new();
            for source in sources {
                let item = act.item(source);
                let key = item.order_key(act.policy.ordering).to_string();
                if !act.ready || !act.must_wait(&key, &item) {
                    act.queue.push_back(item);
                } else {
                    match behind.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, items)) => items.push(item),
                        None => behind.push((key, vec![item])),
                    }
                }
            }
            for (key, items) in behind {
                act.park_items(key, items, None, ctx);
            }
            act.pump(ctx);
        });
    }

    /// Whether `item` of `key` must wait behind its blocked key (parked, or
    /// on a broker dead-lettered behind the hold) rather than be queued.
    fn must_wait(&mut self, key: &str, item: &Item) -> bool {
        match item.source {
            // Redriven entries are older than anything parked behind their
            // key, and are retried in place, never parked.
            Source::Redrive(_) => false,
            // Loaded from the store: it is the key's own backlog.
            Source::Parked(_) => false,
            Source::Log(_) | Source::Delayed(_) => match &self.policy.holds {
                Holds::Park => self.blocked.contains_key(key),
                Holds::Broker(_) if !self.policy.hold_key => false,
                Holds::Broker(dlq) => {
                    let dlq = dlq.clone();
                    self.held_on_broker(dlq.as_ref(), key, item)
                }
            },
        }
    }

    /// On a broker: whether `item` of `key` waits behind a hold. The hold is
    /// this applier's own, or one the DLQ view shows (written by an earlier
    /// owner of the partition). The holder itself passes (it is back from a
    /// redrive), and so does what follows it while it is queued.
    fn held_on_broker(&mut self, dlq: &dyn KeyHolds, key: &str, item: &Item) -> bool {
        let local = self.blocked.get(key).and_then(|b| {
            let h = b.held_by.clone()?;
            Some((h, b.confirmed))
        });
        let holder = match local {
            // Its letter is on its way to the DLQ.
            Some((h, false)) => Some(h),
            Some((h, true)) if dlq.is_holding(&self.policy.target, &h) => Some(h),
            // Its letter is gone: purged, or applied after a redrive by
            // another owner of the partition. The hold is over.
            Some(_) => {
                self.blocked.remove(key);
                self.held_in_view(dlq, key)
            }
            None => self.held_in_view(dlq, key),
        };
        let Some(holder) = holder else {
            return false;
        };
        let ordering = self.policy.ordering;
        item.entry().id != holder
            && !self
                .queue
                .iter()
                .any(|i| i.order_key(ordering) == key && i.entry().id == holder)
    }

    /// A hold on `key` the DLQ view shows (written by an earlier owner of
    /// the partition, or before a restart): adopt it.
    fn held_in_view(&mut self, dlq: &dyn KeyHolds, key: &str) -> Option<String> {
        match dlq.holder(&self.policy.target, self.shard.shard, key) {
            // Released here; the view has not yet seen its letter go.
            Some(h) if self.released.get(key) == Some(&h) => None,
            found => {
                self.released.remove(key);
                if let Some(h) = &found {
                    info!(key, held_by = %h, "Key is held (its dead letter is in the DLQ topic).");
                    let block = self.blocked.entry(key.to_string()).or_default();
                    block.held_by = Some(h.clone());
                    block.confirmed = true;
                }
                found
            }
        }
    }

    /// On a broker: once the DLQ view shows the letter `id` holding `key`,
    /// this applier's hold on it follows the view (so it ends when the
    /// letter goes, wherever that happens).
    fn confirm_when_stored(
        &mut self,
        dlq: Arc<dyn KeyHolds>,
        key: String,
        id: String,
        ctx: &mut Context<Self>,
    ) {
        let watch = {
            let (id, target) = (id.clone(), self.policy.target.clone());
            async move {
                while !dlq.is_holding(&target, &id) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        ctx.spawn(watch.into_actor(self).map(move |(), act, _| {
            if let Some(b) = act.blocked.get_mut(&key)
                && b.held_by.as_deref() == Some(id.as_str())
            {
                b.confirmed = true;
            }
        }));
    }

    /// Move the blocked keys' entries still in the queue into the store
    /// (after a load at start, or a new hold).
    fn park_queued_behind_blocks(&mut self, ctx: &mut Context<Self>) {
        let ordering = self.policy.ordering;
        let mut behind: HashMap<String, Vec<Item>> = HashMap::new();
        let queue = std::mem::take(&mut self.queue);
        for item in queue {
            let key = item.order_key(ordering).to_string();
            let blocked = matches!(item.source, Source::Log(_)) && self.must_wait(&key, &item);
            if blocked {
                behind.entry(key).or_default().push(item);
            } else {
                self.queue.push_back(item);
            }
        }
        for (key, items) in behind {
            self.park_items(key, items, None, ctx);
        }
    }

    /// Park `items` (all of one key, in order) durably; `head_due` is set when
    /// the first of them waits for a retry. Log items are acked once durable.
    fn park_items(
        &mut self,
        key: String,
        items: Vec<Item>,
        head_due: Option<u64>,
        ctx: &mut Context<Self>,
    ) {
        if let Holds::Broker(_) = self.policy.holds {
            return self.bury_behind(&key, items);
        }
        let block = self.blocked.entry(key.clone()).or_default();
        if head_due.is_some() {
            block.head_due_ms = head_due;
            // It comes back from its first parked entry, its new head.
            block.resume_after = None;
        }
        block.parks_in_flight += 1;
        let mut parked = Vec::with_capacity(items.len());
        let mut acks = Vec::new();
        let mut undelay = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            // Loaded from the store and never tried: it is still there, as
            // it was. Only a head that failed has new retry state to write.
            if i > 0 && matches!(item.source, Source::Parked(_)) {
                continue;
            }
            let due = if i == 0 { head_due.unwrap_or(0) } else { 0 };
            parked.push(Parked {
                delivered: item.delivered(),
                order_key: key.clone(),
                attempts: item.attempts,
                first_failure_ms: item.first_failure_ms,
                due_ms: due,
            });
            match item.source {
                Source::Log(w) => acks.push(w),
                Source::Delayed(d) => undelay.push(d),
                Source::Parked(_) => {}
                // Not parked: its dead letter stays until it applies.
                Source::Redrive(_) => unreachable!("redriven entries are retried in place"),
            }
        }
        let n = parked.len();
        let park = self.park.clone();
        ctx.spawn(async move { park.park(parked).await }.into_actor(self).map(
            move |result, act, ctx| match result {
                Ok(()) => {
                    act.stats.parked.add(n as u64);
                    for w in acks {
                        ack(w.delivery);
                    }
                    // Parked now: it may leave the delay store.
                    for d in undelay {
                        act.undelay(d, ctx);
                    }
                    if let Some(b) = act.blocked.get_mut(&key) {
                        b.parks_in_flight -= 1;
                    }
                    act.arm(ctx);
                }
                Err(e) => {
                    // Nothing was acked: a restart reads them again.
                    error!(error = %e, "Parking failed; restarting the applier.");
                    ctx.stop();
                }
            },
        ));
    }

    /// On a broker: dead-letter `items` (all of `key`, in order) behind the
    /// letter that holds the key. They are acked once their letters are on
    /// the broker, and return with the holder when the DLQ is redriven.
    fn bury_behind(&mut self, key: &str, items: Vec<Item>) {
        let holder = self.blocked.get(key).and_then(|b| b.held_by.as_deref());
        let why = format!(
            "held behind dead letter {}: its key waits until that letter is redriven and applied, or purged",
            holder.unwrap_or_default()
        );
        let now = now_ms();
        let mut doomed = Vec::with_capacity(items.len());
        for item in items {
            let delivered = item.delivered();
            let done = match item.source {
                Source::Log(w) => Done::Ack(w),
                Source::Delayed(_) => Done::Undelay(self.delays.clone()),
                Source::Parked(_) | Source::Redrive(_) => {
                    unreachable!("a broker namespace neither parks nor redrives in place")
                }
            };
            doomed.push(Doomed {
                delivered,
                done,
                attempts: item.attempts,
                first_failure_ms: Some(item.first_failure_ms)
                    .filter(|&t| t > 0)
                    .unwrap_or(now),
                last_failure_ms: now,
                last_error: why.clone(),
                target: self.policy.target.clone(),
                holds: None,
            });
        }
        self.bury(Bury(doomed));
    }

    /// Load the store's blocked keys for this shard, then start applying.
    fn load_blocked(&mut self, ctx: &mut Context<Self>) {
        let (park, shard) = (self.park.clone(), self.shard.clone());
        ctx.spawn(async move { park.blocked(shard).await }.into_actor(self).map(
            |result, act, ctx| match result {
                Ok(blocked) => {
                    for b in blocked {
                        if b.held_by.is_some() || b.head_due_ms.is_some() {
                            info!(key = %b.order_key, held_by = ?b.held_by, "Key is blocked (restored from the park store).");
                        }
                        act.blocked.insert(
                            b.order_key,
                            Block {
                                head_due_ms: b.head_due_ms,
                                held_by: b.held_by,
                                ..Block::default()
                            },
                        );
                    }
                    act.ready = true;
                    act.park_queued_behind_blocks(ctx);
                    act.arm(ctx);
                    guarded(act, ctx, |act, ctx| act.pump(ctx));
                }
                Err(e) => {
                    error!(error = %e, "Cannot read the park store; retrying in 1 s.");
                    ctx.run_later(Duration::from_secs(1), |act, ctx| act.load_blocked(ctx));
                }
            },
        ));
    }

    /// Bring back the parked entries of keys whose head is due.
    fn wake(&mut self, ctx: &mut Context<Self>) {
        let now = now_ms();
        let due: Vec<String> = self
            .blocked
            .iter()
            .filter(|(_, b)| {
                b.held_by.is_none() && !b.loading && b.head_due_ms.is_some_and(|d| d <= now)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.reload(key, ctx);
        }
        self.arm(ctx);
    }

    /// Load a key's parked entries back into the queue, in order; unblock
    /// it when none are left.
    fn reload(&mut self, key: String, ctx: &mut Context<Self>) {
        let Some(b) = self.blocked.get_mut(&key) else {
            return;
        };
        if b.loading {
            return;
        }
        b.loading = true;
        b.head_due_ms = None;
        let after = b.resume_after;
        let (park, shard) = (self.park.clone(), self.shard.clone());
        let k = key.clone();
        let load = async move { park.load(shard, k, after, PARK_PAGE).await };
        ctx.spawn(load.into_actor(self).map(move |result, act, ctx| {
            let Some(b) = act.blocked.get_mut(&key) else {
                return;
            };
            b.loading = false;
            match result {
                Ok(parked) if parked.is_empty() => {
                    if b.parks_in_flight == 0 && b.held_by.is_none() {
                        act.blocked.remove(&key);
                    } else if b.held_by.is_none() {
                        // A park for it is landing; look again then.
                        b.head_due_ms = Some(now_ms() + 10);
                        act.arm(ctx);
                    }
                }
                Ok(parked) => {
                    b.resume_after = parked.last().map(|p| p.delivered.sequence);
                    for p in parked {
                        let mut item = act.item(Source::Parked(p.delivered));
                        item.attempts = p.attempts;
                        item.first_failure_ms = p.first_failure_ms;
                        act.queue.push_back(item);
                    }
                    guarded(act, ctx, |act, ctx| act.pump(ctx));
                }
                Err(e) => {
                    error!(error = %e, key = %key, "Cannot load parked entries; retrying in 1 s.");
                    b.head_due_ms = Some(now_ms() + 1000);
                    act.arm(ctx);
                }
            }
        }));
    }

    /// Pick the next batch, in queue order: the first entry of each key that
    /// is ready now and, for a sink that applies in order, the entries of its
    /// key that follow it while each is ready. An entry to be applied alone
    /// gets a call of its own.
    fn next_batch(&self, now: Instant) -> Vec<usize> {
        let in_order = self.sink.applies_in_order();
        let max = self.sink.max_batch().max(1);
        // Per key seen: whether every entry of it so far is in the batch.
        let mut seen: HashMap<&str, bool> = HashMap::new();
        let mut batch = Vec::new();
        let mut bytes = 0;
        for (i, item) in self.queue.iter().enumerate() {
            if bytes >= MAX_BATCH_BYTES {
                break;
            }
            // A set's mutation is never in a batch: it holds its key.
            let ready = item.not_before.is_none_or(|t| t <= now) && !item.in_set;
            match seen.get_mut(item.order_key(self.policy.ordering)) {
                // A later entry of its key: only right behind the ones taken.
                Some(chain) => {
                    if !(in_order && *chain && ready && !item.alone) {
                        *chain = false;
                        continue;
                    }
                }
                None => {
                    let key = item.order_key(self.policy.ordering);
                    let held = !self.set_held.is_empty() && self.set_held.contains_key(key);
                    let first = ready && !item.alone && !held;
                    seen.insert(key, first);
                    if item.alone && ready && !held && batch.is_empty() {
                        return vec![i];
                    }
                    if !first {
                        continue;
                    }
                }
            }
            batch.push(i);
            bytes += item.entry().payload.len();
            if batch.len() == max {
                break;
            }
        }
        batch
    }

    fn pump(&mut self, ctx: &mut Context<Self>) {
        crate::failpoint!("applier.apply");
        if self.quiescing || self.queue.is_empty() || !self.ready {
            return;
        }
        self.join_sets(ctx);
        // Joining sets may have emptied the queue.
        if self.busy || self.queue.is_empty() {
            return;
        }
        let now = Instant::now();
        let breaker = self.policy.breaker.clone();
        let batch = match breaker.admit(now, |avoid| self.probe_item(Some(avoid)).1) {
            Admit::Deliver => self.next_batch(now),
            Admit::Probe => {
                let (i, _) = self.probe_item(breaker.avoid().as_deref());
                let item = &self.queue[i];
                if item.in_set
                    || self
                        .set_held
                        .contains_key(item.order_key(self.policy.ordering))
                {
                    // Only sets, or what waits behind them: sets try the
                    // target themselves.
                    breaker.abandon_probe();
                    self.arm(ctx);
                    return;
                }
                self.probing = Some(self.queue[i].order_key(self.policy.ordering).to_string());
                vec![i]
            }
            Admit::Wait(at) => return self.wait_for_breaker(at, ctx),
        };
        if batch.is_empty() {
            self.arm(ctx);
            return;
        }
        if !self.take_slot(ctx) {
            if self.probing.take().is_some() {
                breaker.abandon_probe();
            }
            return;
        }
        // Tests make chosen shards' arbiter busy here.
        crate::failpoint!("applier.busy", &self.shard.to_string());
        self.busy = true;
        let delivered: Vec<Delivered> = batch.iter().map(|&i| self.queue[i].delivered()).collect();
        let uids: Vec<u64> = batch.iter().map(|&i| self.queue[i].uid).collect();
        let sink = self.sink.clone();
        let concurrency = self.policy.concurrency.clone();
        let span = info_span!("apply", namespace = %delivered[0].shard.namespace,
            shard = delivered[0].shard.shard, entries = delivered.len(),
            first_id = %delivered[0].entry.id);
        telemetry::set_parent_from(&span, &delivered[0].entry);
        let apply = async move {
            AssertUnwindSafe(apply_gated(&*sink, &delivered, &concurrency))
                .catch_unwind()
                .await
        }
        .instrument(span);
        ctx.spawn(apply.into_actor(self).map(move |result, act, ctx| {
            guarded(act, ctx, |act, ctx| act.applied(&uids, result, ctx));
        }));
    }

    /// Hand each set item that is first of its key and ready to the
    /// target's [`SetJoin`]: a mutation joins its set; a dead letter that
    /// holds a whole set (a redrive) is applied whole. It leaves the queue
    /// for `joined` while it waits, and holds its key meanwhile.
    fn join_sets(&mut self, ctx: &mut Context<Self>) {
        if !self.queue.iter().any(|i| i.in_set) {
            return;
        }
        let (now, ordering) = (Instant::now(), self.policy.ordering);
        let staged = self.policy.sets.is_staged();
        let mut seen: HashSet<&str> = HashSet::new();
        // Keys with something ahead that is not a set's mutation.
        let mut not_sets: HashSet<&str> = HashSet::new();
        let mut joins = Vec::new();
        let mut wake: Option<Instant> = None;
        for (i, item) in self.queue.iter().enumerate() {
            let key = item.order_key(ordering);
            let first = seen.insert(key) && !self.set_held.contains_key(key);
            let member = item.in_set && item.entry().set_place().is_some();
            // Staged sets are not written as units, so two sets' mutations
            // can sit in two keys in opposite orders: a staged mutation does
            // not wait for other sets' mutations ahead of it (the target's
            // SetJoin applies sets that share a key one at a time), only
            // for single writes.
            let after_sets = staged && member && !not_sets.contains(key);
            if !member {
                not_sets.insert(key);
            }
            let ready = item.not_before.is_none_or(|t| t <= now);
            if !(ready && item.in_set) {
                continue;
            }
            if first || after_sets {
                joins.push(i);
            } else if staged && member {
                // Single writes between two sets' mutations, in two keys in
                // opposite orders, still make a cycle: a mutation that
                // waited this long joins anyway, and the version guard
                // ranks what it overtook.
                let at = item.queued_at + STAGED_WAIT;
                if at <= now {
                    joins.push(i);
                } else {
                    wake = Some(wake.map_or(at, |w| w.min(at)));
                }
            }
        }
        if let Some(at) = wake
            && !self.staged_wake
        {
            self.staged_wake = true;
            ctx.run_later(at.saturating_duration_since(now), |act, ctx| {
                act.staged_wake = false;
                act.pump(ctx);
            });
        }
        if joins.is_empty() {
            return;
        }
        let mut joining = Vec::with_capacity(joins.len());
        let mut next = joins.into_iter().peekable();
        let queue = std::mem::take(&mut self.queue);
        self.queue = queue
            .into_iter()
            .enumerate()
            .filter_map(|(i, item)| match next.next_if_eq(&i) {
                Some(_) => {
                    joining.push(item);
                    None
                }
                None => Some(item),
            })
            .collect();
        for item in joining {
            let key = item.order_key(ordering).to_string();
            *self.set_held.entry(key).or_default() += 1;
            let (uid, delivered) = (item.uid, item.delivered());
            self.joined.insert(uid, item);
            let sets = self.policy.sets.clone();
            let (marker, abandon) = (
                delivered.entry.is_set_marker(),
                delivered.entry.is_set_abandon(),
            );
            let joined = match delivered.entry.set_place() {
                Some(place) => sets.join(delivered, place),
                None if marker => sets.join_marker(delivered),
                None if abandon => sets.abandon(delivered),
                None => {
                    let apply =
                        async move { sets.apply_letter(&delivered.shard, &delivered.entry).await };
                    ctx.spawn(apply.into_actor(self).map(move |result, act, ctx| {
                        guarded(act, ctx, |act, ctx| {
                            // Back at the head of its key, to settle as a
                            // sink call's entry does.
                            if let Some(item) = act.unjoin(uid) {
                                act.queue.push_front(item);
                                act.settle(&[uid], vec![result], None, ctx);
                            }
                            act.pump(ctx);
                        });
                    }));
                    continue;
                }
            };
            ctx.spawn(joined.into_actor(self).map(move |answer, act, ctx| {
                let answer = answer.unwrap_or_else(|_| Err("the set was dropped".into()));
                guarded(act, ctx, |act, ctx| act.set_settled(uid, answer, ctx));
            }));
        }
    }

    /// Take a joined item back, releasing its key; `None` if a rewind
    /// dropped it meanwhile.
    fn unjoin(&mut self, uid: u64) -> Option<Item> {
        let item = self.joined.remove(&uid)?;
        let key = item.order_key(self.policy.ordering);
        if let Some(n) = self.set_held.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.set_held.remove(key);
            }
        }
        Some(item)
    }

    /// A joined mutation's set is settled: done with it, or (its record
    /// could not be written) join again in a moment.
    fn set_settled(&mut self, uid: u64, answer: Result<Settled, String>, ctx: &mut Context<Self>) {
        // Dropped by a rewind meanwhile: its delivery is gone.
        let Some(mut item) = self.unjoin(uid) else {
            return;
        };
        match answer {
            // A marker (Kafka) is not an entry of the target's.
            Ok(Settled::Applied(_)) if item.entry().is_set_marker() => self.finish(item, ctx),
            Ok(Settled::Applied(outcome)) => self.succeeded(item, outcome, ctx),
            // One letter holds the whole set; the target's set counters
            // count it. A set given up was never acknowledged.
            Ok(Settled::DeadLettered | Settled::Abandoned) => self.finish(item, ctx),
            Err(why) => {
                warn!(set = ?item.entry().set_place().map(|p| p.set), error = %why,
                    "A set could not be settled; its mutation joins again.");
                item.not_before = Some(Instant::now() + self.policy.sets.rejoin_after());
                // It was the first of its key: it goes back ahead of the rest.
                self.queue.push_front(item);
                self.arm(ctx);
            }
        }
        self.answer_quiesced();
        self.pump(ctx);
    }

    /// The probe: the first entry of a key (so per-key order holds), ready
    /// or not, preferring a key the last probe did not fail on, so a poison
    /// key does not keep a healthy target's breaker open. Also whether it is
    /// such a fresh key. The queue is not empty.
    fn probe_item(&self, avoid: Option<&str>) -> (usize, bool) {
        let ordering = self.policy.ordering;
        let mut seen: HashSet<&str> = HashSet::new();
        let mut first = None;
        for (i, item) in self.queue.iter().enumerate() {
            let key = item.order_key(ordering);
            if !seen.insert(key) || item.in_set || self.set_held.contains_key(key) {
                continue;
            }
            if avoid != Some(key) {
                return (i, true);
            }
            first.get_or_insert(i);
        }
        (first.unwrap_or(0), false)
    }

    /// The breaker is open: try again when the next probe is due, or at
    /// once when another applier's probe closes it.
    fn wait_for_breaker(&mut self, at: Instant, ctx: &mut Context<Self>) {
        if let Some(h) = self.breaker_timer.take() {
            ctx.cancel_future(h);
        }
        let wait = at.saturating_duration_since(Instant::now());
        self.breaker_timer = Some(ctx.run_later(wait, |act, ctx| {
            act.breaker_timer = None;
            guarded(act, ctx, |act, ctx| act.pump(ctx));
        }));
        if !self.watching_breaker {
            self.watching_breaker = true;
            let mut closed = self.policy.breaker.subscribe();
            closed.mark_unchanged();
            let watch = async move {
                let _ = closed.changed().await;
            };
            ctx.spawn(watch.into_actor(self).map(|(), act, ctx| {
                act.watching_breaker = false;
                guarded(act, ctx, |act, ctx| act.pump(ctx));
            }));
        }
    }

    /// Run the target's healthcheck for the breaker (after failures).
    fn check_health(&mut self, ctx: &mut Context<Self>) {
        let (sink, breaker) = (self.sink.clone(), self.policy.breaker.clone());
        ctx.spawn(
            async move {
                let result = sink.healthcheck().await;
                breaker.health(&result);
            }
            .into_actor(self)
            .map(|(), act, ctx| {
                guarded(act, ctx, |act, ctx| act.pump(ctx));
            }),
        );
    }

    /// A sink call finished: settle its entries, then apply what is next.
    fn applied(
        &mut self,
        uids: &[u64],
        result: std::thread::Result<Vec<ApplyResult>>,
        ctx: &mut Context<Self>,
    ) {
        self.busy = false;
        self.give_slots(Some(match &result {
            Ok(results) if results.iter().any(|r| signal(r) == Signal::Backpressure) => {
                Signal::Backpressure
            }
            Ok(_) => Signal::Answered,
            Err(_) => Signal::Backpressure,
        }));
        let probe = self.probing.take();
        match result {
            Ok(results) => self.settle(uids, results, probe, ctx),
            Err(panic) => {
                if let Some(key) = probe {
                    // The target's code answered, if by panicking.
                    self.policy.breaker.probed(&key, None);
                }
                self.panicked(uids, panic_message(&panic), ctx)
            }
        }
        self.arm_flush(ctx);
        self.answer_quiesced();
        self.pump(ctx);
    }

    /// Everything settled and flushed, and no set this applier has joined
    /// is being applied: a [`Quiesce`] waiting may go on. (A set still
    /// gathering is not waited for: its other mutations may never come.)
    fn answer_quiesced(&mut self) {
        if self.quiesced.is_empty() {
            return; // Nobody waits: skip the look at the sets (a hot path).
        }
        let sets = &self.policy.sets;
        let set_applying = || {
            self.joined
                .values()
                .any(|i| i.entry().set_place().is_some_and(|p| sets.applying(&p.set)))
        };
        if !self.busy && !self.flushing && self.unflushed.is_empty() && !set_applying() {
            for tx in self.quiesced.drain(..) {
                let _ = tx.send(());
            }
        }
    }

    /// Flush what the sink applied but has not made durable: within the
    /// sink's [`Sink::flush_within`], at once when stopping, and when much
    /// waits.
    fn arm_flush(&mut self, ctx: &mut Context<Self>) {
        let Some(within) = self.sink.flush_within() else {
            return;
        };
        if self.unflushed.is_empty() || self.flushing {
            return;
        }
        if self.quiescing || self.unflushed.len() >= MAX_UNFLUSHED {
            if let Some(h) = self.flush_timer.take() {
                ctx.cancel_future(h);
            }
            self.flush(ctx);
        } else if self.flush_timer.is_none() {
            self.flush_timer = Some(ctx.run_later(within, |act, ctx| {
                act.flush_timer = None;
                guarded(act, ctx, |act, ctx| act.flush(ctx));
            }));
        }
    }

    /// One flush of the sink. What it covers counts as applied once it
    /// succeeds; if it fails, the applier restarts, and the rewind applies
    /// them again (at least once), in order.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.flushing || self.unflushed.is_empty() {
            return;
        }
        self.flushing = true;
        let spare = std::mem::take(&mut self.spare_unflushed);
        let covered = std::mem::replace(&mut self.unflushed, spare);
        let sink = self.sink.clone();
        let flush = async move {
            AssertUnwindSafe(async {
                crate::failpoint!("applier.flush");
                sink.flush().await
            })
            .catch_unwind()
            .await
        };
        ctx.spawn(flush.into_actor(self).map(move |result, act, ctx| {
            guarded(act, ctx, |act, ctx| act.flushed(covered, result, ctx));
        }));
    }

    fn flushed(
        &mut self,
        mut covered: Vec<(Item, Outcome)>,
        result: std::thread::Result<Result<(), SinkError>>,
        ctx: &mut Context<Self>,
    ) {
        self.flushing = false;
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(panic) => Some(format!("the flush panicked: {}", panic_message(&panic))),
        };
        match error {
            None => {
                for (item, outcome) in covered.drain(..) {
                    // Dropped by a rewind meanwhile: its delivery is gone.
                    if matches!(&item.source, Source::Log(w) if w.generation < self.generation) {
                        continue;
                    }
                    self.succeeded(item, outcome, ctx);
                }
                self.spare_unflushed = covered;
            }
            Some(error) => {
                // What the target holds of them is unknown, and later entries
                // of their keys may be written already: start over from the
                // last checkpoint, which none of them has passed, so they are
                // applied again in order (restarts back off).
                error!(target = %self.policy.target, entries = covered.len(), %error, "The target's flush failed; restarting the applier, so its shard rewinds.");
                self.stats.apply_errors.inc();
                ctx.stop();
                return;
            }
        }
        self.arm_flush(ctx);
        self.answer_quiesced();
        self.pump(ctx);
    }

    /// The target panicked in a call. The panic was caught there, so nothing
    /// restarts or is redelivered: the call's entries are applied again one
    /// per call, and an entry that panics alone [`POISON_AFTER`] times goes
    /// to the DLQ with the panic's message (with the DLQ off, it is retried
    /// with backoff, forever).
    fn panicked(&mut self, uids: &[u64], message: &str, ctx: &mut Context<Self>) {
        let alone = uids.len() == 1;
        error!(
            panic = message,
            entries = uids.len(),
            "The target panicked; applying those entries one by one."
        );
        for uid in uids {
            let Some(pos) = self.queue.iter().position(|i| i.uid == *uid) else {
                continue;
            };
            let item = &mut self.queue[pos];
            item.alone = true;
            if !alone {
                continue;
            }
            item.panics += 1;
            item.attempts += 1;
            if item.first_failure_ms == 0 {
                item.first_failure_ms = now_ms();
            }
            let e = SinkError::permanent(
                &self.policy.target,
                format!(
                    "the target panicked on entry {} ({} times alone): {message}",
                    item.entry().id,
                    item.panics
                ),
            );
            if item.panics >= POISON_AFTER && self.policy.dlq {
                let item = self.queue.remove(pos).expect("found above");
                self.give_up(item, &e, ctx);
            } else {
                let wait = backoff(&self.policy.retry, item.panics, &e);
                item.not_before = Some(Instant::now() + wait);
            }
        }
        self.arm(ctx);
    }

    /// Ack what succeeded; retry, park, dead-letter or keep what failed.
    /// Items dropped by a rewind while their call was in flight no longer
    /// match a uid, and are skipped. While the breaker is open, transient
    /// failures spend no attempts: the entries wait for the target.
    fn settle(
        &mut self,
        uids: &[u64],
        results: Vec<ApplyResult>,
        probe: Option<String>,
        ctx: &mut Context<Self>,
    ) {
        let now = Instant::now();
        let outage = self.tell_breaker(uids, &results, probe, ctx);
        for (uid, result) in uids.iter().zip(results) {
            let Some(pos) = self.queue.iter().position(|i| i.uid == *uid) else {
                continue;
            };
            match result {
                Ok(outcome) => {
                    let item = self.queue.remove(pos).expect("found above");
                    if self.sink.flush_within().is_some() {
                        self.unflushed.push((item, outcome));
                    } else {
                        self.succeeded(item, outcome, ctx);
                    }
                }
                Err(e) => {
                    self.stats.apply_errors.inc();
                    let item = &mut self.queue[pos];
                    if outage && transient(&self.policy.retry, &e) {
                        // The target's fault, not the entry's.
                        item.not_before = None;
                        continue;
                    }
                    item.attempts += 1;
                    if item.first_failure_ms == 0 {
                        item.first_failure_ms = now_ms();
                    }
                    let retry = &self.policy.retry;
                    let permanent = !transient(retry, &e);
                    let exhausted = item.attempts >= retry.max_attempts;
                    if (permanent || exhausted) && self.policy.dlq {
                        let item = self.queue.remove(pos).expect("found above");
                        self.give_up(item, &e, ctx);
                        continue;
                    }
                    let backoff = backoff(retry, item.attempts, &e);
                    warn!(
                        id = %item.entry().id,
                        attempts = item.attempts,
                        retry_in_ms = backoff.as_millis() as u64,
                        error = %e,
                        "Delivery failed; will retry."
                    );
                    let parks = self.policy.may_park
                        && backoff > Duration::from_millis(retry.park_after_ms)
                        && !matches!(item.source, Source::Redrive(_));
                    if parks {
                        let key = item.order_key(self.policy.ordering).to_string();
                        let due = now_ms() + backoff.as_millis() as u64;
                        let items = self.take_key(&key);
                        self.park_items(key, items, Some(due), ctx);
                    } else {
                        item.not_before = Some(now + backoff);
                    }
                }
            }
        }
        let in_retry = self.queue.iter().filter(|i| i.attempts > 0).count();
        self.stats.in_retry.set(in_retry as i64);
    }

    /// Report a settled call to the breaker; answers whether it is open (the
    /// call's transient failures then spend no attempts). Transient failures
    /// also run a healthcheck (at most one a second), so a target that
    /// refuses connections opens it before a lone key spends its attempts.
    fn tell_breaker(
        &mut self,
        uids: &[u64],
        results: &[ApplyResult],
        probe: Option<String>,
        ctx: &mut Context<Self>,
    ) -> bool {
        let breaker = self.policy.breaker.clone();
        let ordering = self.policy.ordering;
        let mut ok = 0;
        let mut failed: Vec<String> = Vec::new();
        let mut error = None;
        for (uid, result) in uids.iter().zip(results) {
            match result {
                Ok(_) => ok += 1,
                Err(e) if transient(&self.policy.retry, e) => {
                    if let Some(item) = self.queue.iter().find(|i| i.uid == *uid) {
                        failed.push(item.order_key(ordering).to_string());
                    }
                    error.get_or_insert(e);
                }
                Err(_) => {}
            }
        }
        let open = match probe {
            Some(key) => {
                breaker.probed(&key, error);
                breaker.is_open()
            }
            None => {
                let keys: Vec<&str> = failed.iter().map(String::as_str).collect();
                breaker.delivered(ok, &keys, error)
            }
        };
        let check = !failed.is_empty()
            && (!open || breaker.stuck_on_one_key())
            && breaker.should_check(Instant::now());
        if check {
            self.check_health(ctx);
        }
        open
    }

    /// Remove and return the queued items of `key` that may park, in order.
    fn take_key(&mut self, key: &str) -> Vec<Item> {
        let ordering = self.policy.ordering;
        // Redriven entries stay: they are retried in place, never parked.
        let (mine, rest): (Vec<Item>, Vec<Item>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|i| i.order_key(ordering) == key && !matches!(i.source, Source::Redrive(_)));
        self.queue = rest.into();
        mine
    }

    fn succeeded(&mut self, item: Item, outcome: Outcome, ctx: &mut Context<Self>) {
        match outcome {
            Outcome::Applied => self.stats.applied.inc(),
            Outcome::Superseded => self.stats.superseded.inc(),
        }
        self.finish(item, ctx);
    }

    /// The item is done with (applied, or its set dead-lettered): ack it,
    /// remove its letter, or take it out of its store.
    fn finish(&mut self, item: Item, ctx: &mut Context<Self>) {
        // No key is held (the common case): an ack, with no key or id copied
        // to look one up.
        if self.blocked.is_empty()
            && let Source::Log(work) = item.source
        {
            return ack(work.delivery);
        }
        let key = item.order_key(self.policy.ordering).to_string();
        match item.source {
            Source::Log(work) => {
                let id = work.delivery.entry().id.clone();
                ack(work.delivery);
                let holder = self.blocked.get(&key).and_then(|b| b.held_by.as_deref());
                if let Holds::Broker(dlq) = &self.policy.holds
                    && holder == Some(id.as_str())
                {
                    // The holder is back from a redrive, and applied: its
                    // holding letter goes, which ends the hold everywhere.
                    if let Some(dlq_sequence) = dlq.holding_letter(&self.policy.target, &id) {
                        self.redriven(Redriven {
                            namespace: self.shard.namespace.to_string(),
                            dlq_sequence,
                        });
                    }
                    self.blocked.remove(&key);
                    self.released.insert(key, id);
                }
            }
            Source::Redrive(r) => {
                self.redriven(Redriven {
                    namespace: r.delivered.shard.namespace.to_string(),
                    dlq_sequence: r.dlq_sequence,
                });
                if self.blocked.get(&key).and_then(|b| b.held_by.as_deref())
                    == Some(r.delivered.entry.id.as_str())
                {
                    self.release(key, ctx);
                }
            }
            Source::Delayed(d) => self.undelay(d, ctx),
            Source::Parked(d) => {
                let (park, shard) = (self.park.clone(), self.shard.clone());
                let (k, seq) = (key.clone(), d.sequence);
                ctx.spawn(
                    async move {
                        if let Err(e) = park.remove(shard, k, seq).await {
                            // Applied again after a restart: at least once.
                            warn!(error = %e, "Could not remove an applied entry from the park store.");
                        }
                    }
                    .into_actor(self),
                );
                self.drained(key, ctx);
            }
        }
    }

    /// A delayed entry was applied (or moved on): remove it from the store.
    fn undelay(&mut self, d: Delivered, ctx: &mut Context<Self>) {
        let delays = self.delays.clone();
        ctx.spawn(
            async move {
                if let Err(e) = delays.undelay(d).await {
                    // It fires again after a restart: at least once.
                    warn!(error = %e, "Could not remove a fired entry from the delay store.");
                }
            }
            .into_actor(self),
        );
    }

    /// A loaded entry of `key` left the queue: when it was the last one,
    /// look for more in the store (and unblock the key when there are none).
    fn drained(&mut self, key: String, ctx: &mut Context<Self>) {
        let ordering = self.policy.ordering;
        let more = self.queue.iter().any(|i| i.order_key(ordering) == key);
        let blocked = self
            .blocked
            .get(&key)
            .is_some_and(|b| b.head_due_ms.is_none() && b.held_by.is_none());
        if !more && blocked {
            self.reload(key, ctx);
        }
    }

    /// Release a key held by a dead letter (redriven or purged), durably, then
    /// deliver what waited behind it.
    fn release(&mut self, key: String, ctx: &mut Context<Self>) {
        if let Holds::Broker(_) = self.policy.holds {
            // Nothing waits here: what was behind it is in the DLQ.
            self.blocked.remove(&key);
            return;
        }
        let (park, shard) = (self.park.clone(), self.shard.clone());
        let k = key.clone();
        ctx.spawn(
            async move { park.release(shard, k).await }
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(()) => {
                        if let Some(b) = act.blocked.get_mut(&key) {
                            b.held_by = None;
                            b.resume_after = None;
                        }
                        act.reload(key, ctx);
                    }
                    Err(e) => error!(error = %e, key = %key, "Could not release a held key."),
                }),
        );
    }

    /// Out of attempts, or a permanent error: to the DLQ (and, with
    /// `hold_key`, hold its key first).
    fn give_up(&mut self, item: Item, e: &SinkError, ctx: &mut Context<Self>) {
        let key = item.order_key(self.policy.ordering).to_string();
        let delivered = item.delivered();
        let done = match item.source {
            Source::Log(work) => Done::Ack(work),
            Source::Delayed(_) => Done::Undelay(self.delays.clone()),
            Source::Parked(d) => Done::Unpark {
                store: self.park.clone(),
                order_key: key.clone(),
                sequence: d.sequence,
            },
            Source::Redrive(r) => {
                // Its dead letter was never removed: it simply stays.
                self.stats.redrive_failed.inc();
                warn!(id = %r.delivered.entry.id, error = %e, "A redriven entry failed again; it stays in the DLQ.");
                return;
            }
        };
        let doomed = Doomed {
            delivered,
            done,
            attempts: item.attempts,
            first_failure_ms: item.first_failure_ms,
            last_failure_ms: now_ms(),
            last_error: e.to_string(),
            target: self.policy.target.clone(),
            holds: None,
        };
        if !self.policy.hold_key {
            let was_parked = matches!(doomed.done, Done::Unpark { .. });
            self.bury(Bury(vec![doomed]));
            if was_parked {
                self.drained(key, ctx);
            }
            return;
        }
        if let Holds::Broker(dlq) = self.policy.holds.clone() {
            // The letter is the hold: it names its key, and the entries behind
            // it follow it into the DLQ, in order.
            let id = doomed.delivered.entry.id.clone();
            let block = self.blocked.entry(key.clone()).or_default();
            block.held_by = Some(id.clone());
            block.confirmed = false;
            self.released.remove(&key);
            self.confirm_when_stored(dlq, key.clone(), id, ctx);
            let doomed = Doomed {
                holds: Some(key),
                ..doomed
            };
            self.bury(Bury(vec![doomed]));
            self.park_queued_behind_blocks(ctx);
            return;
        }
        // Hold the key durably before the entry leaves: its later entries
        // must wait behind the dead letter, even after a crash.
        let block = self.blocked.entry(key.clone()).or_default();
        block.held_by = Some(doomed.delivered.entry.id.clone());
        block.head_due_ms = None;
        let (park, shard) = (self.park.clone(), self.shard.clone());
        let (k, id) = (key.clone(), doomed.delivered.entry.id.clone());
        ctx.spawn(
            async move { park.hold(shard, k, id).await }
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(()) => {
                        act.bury(Bury(vec![doomed]));
                        act.park_queued_behind_blocks(ctx);
                    }
                    Err(e) => {
                        error!(error = %e, "Could not hold a key; restarting the applier.");
                        ctx.stop();
                    }
                }),
        );
        self.park_queued_behind_blocks(ctx);
    }

    /// Arm one timer for the earliest retry or parked head.
    fn arm(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let retry = self.queue.iter().filter_map(|i| i.not_before).min();
        let wall = now_ms();
        let parked = self
            .blocked
            .values()
            .filter(|b| b.held_by.is_none() && !b.loading)
            .filter_map(|b| b.head_due_ms)
            .min()
            .map(|due| now + Duration::from_millis(due.saturating_sub(wall)));
        let Some(at) = retry.into_iter().chain(parked).min() else {
            return;
        };
        if let Some(h) = self.timer.take() {
            ctx.cancel_future(h);
        }
        self.timer = Some(
            ctx.run_later(at.saturating_duration_since(now), |act, ctx| {
                act.timer = None;
                guarded(act, ctx, |act, ctx| {
                    act.wake(ctx);
                    act.pump(ctx);
                });
            }),
        );
    }
}

/// How a delivery went, for the target's concurrency limit: a transient
/// error is the target pushing back.
fn signal(result: &ApplyResult) -> Signal {
    match result {
        Err(e) if e.class == crate::sinks::ErrorClass::Transient => Signal::Backpressure,
        _ => Signal::Answered,
    }
}

/// Apply `batch`. A sink that sends each entry as its own request gets them
/// one at a time, all at once, each holding a slot of the target's limit
/// for as long as its request takes: a slot comes back the moment its
/// request ends, not when the batch's slowest does, and each request is a
/// round-trip sample. (A batch holds one entry per key, so this keeps
/// per-key order.) Other sinks get the batch whole; the call holds one
/// slot, taken by the applier.
async fn apply_gated(
    sink: &dyn Sink,
    batch: &[Delivered],
    concurrency: &Concurrency,
) -> Vec<ApplyResult> {
    if !sink.concurrent_entries() {
        return sink.apply(batch).await;
    }
    let requests = batch.iter().map(|d| async move {
        let slot = concurrency.slot().await;
        let started = Instant::now();
        let result = sink
            .apply(std::slice::from_ref(d))
            .await
            .pop()
            .unwrap_or_else(|| {
                Err(SinkError::transient(
                    sink.name(),
                    "the target answered nothing",
                ))
            });
        slot.done(started.elapsed(), signal(&result));
        result
    });
    futures_util::future::join_all(requests).await
}

impl Actor for Applier {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.retired {
            return; // Restarted by its supervisor after retiring: stays idle.
        }
        match std::mem::take(&mut self.pause) {
            pause if pause.is_zero() => self.load_blocked(ctx),
            pause => {
                ctx.run_later(pause, |act, ctx| act.load_blocked(ctx));
            }
        }
    }
}

impl Supervised for Applier {
    fn restarting(&mut self, _: &mut Context<Self>) {
        if self.retired {
            return;
        }
        warn!("Restarting an applier; its shard rewinds.");
        self.stats.restarts.inc();
        self.pause = self.stats.restart_backoff.restarted();
        self.forget();
        if let Some(p) = &self.peers {
            p.rewind.do_send(Rewind);
        }
    }
}

impl Applier {
    /// Drop every piece of work held in memory: the shard's rewind reads
    /// it again from the log.
    fn forget(&mut self) {
        // A call in flight is dropped with the context: its slots come back.
        self.give_slots(None);
        self.awaiting_slot = false;
        self.queue.clear();
        self.joined.clear();
        self.set_held.clear();
        self.blocked.clear();
        self.released.clear();
        self.ready = false;
        self.busy = false;
        // Never acknowledged: the rewind delivers them again.
        self.unflushed.clear();
        self.flushing = false;
        self.flush_timer = None;
        if self.probing.take().is_some() {
            self.policy.breaker.abandon_probe();
        }
        self.breaker_timer = None;
        self.watching_breaker = false;
        // Its call's outcome is lost with the queue: nothing left to wait for.
        self.quiesced.clear();
        self.timer = None;
        self.stats.in_retry.set(0);
    }
}

impl Handler<Retire> for Applier {
    type Result = ();

    fn handle(&mut self, _: Retire, ctx: &mut Context<Self>) {
        self.retired = true;
        self.quiescing = true;
        self.forget();
        self.peers = None;
        ctx.stop();
    }
}

impl Handler<Apply> for Applier {
    type Result = ();

    fn handle(&mut self, Apply(work, _taken_in): Apply, ctx: &mut Context<Self>) {
        let generation = self.generation;
        let sources = work
            .into_iter()
            .filter(|w| w.generation >= generation)
            .map(Source::Log);
        self.take_in(sources.collect(), ctx);
    }
}

impl Handler<ApplyDelayed> for Applier {
    type Result = ();

    fn handle(&mut self, msg: ApplyDelayed, ctx: &mut Context<Self>) {
        self.take_in(msg.0.into_iter().map(Source::Delayed).collect(), ctx);
    }
}

impl Handler<Redrive> for Applier {
    type Result = ();

    fn handle(&mut self, msg: Redrive, ctx: &mut Context<Self>) {
        self.take_in(msg.0.into_iter().map(Source::Redrive).collect(), ctx);
    }
}

impl Handler<RedriveBacklog> for Applier {
    type Result = usize;

    fn handle(&mut self, _: RedriveBacklog, _: &mut Context<Self>) -> usize {
        self.queue
            .iter()
            .filter(|i| matches!(i.source, Source::Redrive(_)))
            .count()
    }
}

impl Handler<Purged> for Applier {
    type Result = ();

    fn handle(&mut self, Purged(entry): Purged, ctx: &mut Context<Self>) {
        let key = order_key(&entry, self.policy.ordering).to_string();
        let held = self.blocked.get(&key).and_then(|b| b.held_by.as_deref());
        if held == Some(entry.id.as_str()) {
            self.release(key, ctx);
        }
    }
}

impl Handler<Quiesce> for Applier {
    type Result = actix::ResponseFuture<()>;

    fn handle(&mut self, _: Quiesce, ctx: &mut Context<Self>) -> Self::Result {
        self.quiescing = true;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.quiesced.push(tx);
        self.arm_flush(ctx);
        self.answer_quiesced();
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<Reset> for Applier {
    type Result = ();

    fn handle(&mut self, Reset(generation): Reset, _: &mut Context<Self>) {
        self.generation = generation;
        let current = |i: &Item| match &i.source {
            Source::Log(w) => w.generation >= generation,
            Source::Redrive(_) | Source::Parked(_) | Source::Delayed(_) => true,
        };
        self.queue.retain(current);
        let dropped: Vec<u64> = self
            .joined
            .values()
            .filter(|i| !current(i))
            .map(|i| i.uid)
            .collect();
        for uid in dropped {
            self.unjoin(uid);
        }
        let in_retry = self.queue.iter().filter(|i| i.attempts > 0).count();
        self.stats.in_retry.set(in_retry as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_set_header_starts_with_the_prefix_items_are_screened_by() {
        use crate::entry::*;
        for h in [
            SET_INDEX_HEADER,
            SET_SIZE_HEADER,
            SET_MARKER_HEADER,
            SET_ABANDON_HEADER,
            SET_LETTER_HEADER,
        ] {
            assert!(h.starts_with(SET_HEADER), "{h}");
        }
    }

    fn asked(ra: Duration) -> SinkError {
        let mut e = SinkError::transient("default", "503");
        e.retry_after = Some(ra);
        e
    }

    #[test]
    fn a_retry_after_is_kept_up_to_the_longest_backoff() {
        let retry = RetryConfig {
            initial_backoff_ms: 10,
            max_backoff_ms: 2_000,
            ..RetryConfig::default()
        };
        assert!(
            backoff(&retry, 1, &asked(Duration::from_millis(1_500)))
                >= Duration::from_millis(1_500)
        );
        for _ in 0..100 {
            let b = backoff(&retry, 1, &asked(Duration::from_secs(3_600)));
            assert_eq!(b, Duration::from_millis(2_000));
        }
    }
}
