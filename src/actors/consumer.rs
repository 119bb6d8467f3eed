//! ShardConsumer: reads one shard in order for one target and routes each
//! entry to the Applier (due now) or the DelayScheduler (due later); an
//! entry whose write named other targets, or a set's marker, is acked at
//! once. Commits the low
//! watermark every 100 ms when it moved, and bounds how far it reads ahead,
//! in entries and in payload bytes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, ResponseActFuture,
    ResponseFuture, SpawnHandle, Supervised, WrapFuture,
};
use tracing::{error, info, warn};

use super::messages::{
    Apply, ConsumerState, Delay, Drain, GetState, Peers, Quiesce, Reset, Retire, Rewind, Wire,
};
use super::{ShardStats, Work, guarded};
use crate::backends::shard::{AnyCheckpointer, AnyConsumer, AnyDelivery, NamespaceBackend};
use crate::backends::{Consumer, Delivery};
use crate::entry::{ShardRef, now_ms};
use crate::state::{ParkStore, ReplayStore};

const COMMIT_EVERY: Duration = Duration::from_millis(100);
/// How often the committed position is recorded for replays, at most: a
/// replay then starts up to this much earlier than it needs to.
const POSITION_EVERY: Duration = Duration::from_secs(2);
/// Payload bytes a shard holds unacked, at most: with the count bound
/// (`max_outstanding`), its read-ahead bound. Reading pauses past either.
pub const MAX_OUTSTANDING_BYTES: usize = 16 << 20;
const READ_BATCH: usize = 256;
const READ_WAIT: Duration = Duration::from_millis(500);

/// Where the committed positions go, and what lowers them.
struct Positions {
    store: Arc<ReplayStore>,
    /// The target's park store: a parked entry is past the committed
    /// offset, yet not applied.
    park: ParkStore,
    /// When a position was last recorded, and which committed offset.
    last: Option<(Instant, u64)>,
}

pub struct ShardConsumer {
    backend: NamespaceBackend,
    group: String,
    shard: ShardRef,
    stats: Arc<ShardStats>,
    /// Deliveries not yet acked, at most; reading pauses past it.
    max_outstanding: usize,
    peers: Option<Peers>,
    /// `None` while a read is in flight (the read owns it), or while the
    /// shard is being opened.
    consumer: Option<AnyConsumer>,
    checkpointer: Option<AnyCheckpointer>,
    /// An open is in flight.
    opening: bool,
    /// Bumped on every rewind; work from older generations is dropped.
    generation: u64,
    reading: bool,
    committing: bool,
    last_committed: Option<u64>,
    stopped: bool,
    /// This consumer's target, in a namespace of several: entries whose
    /// write named other targets are acked at once.
    target: Option<Arc<str>>,
    /// The backend stages sets of mutations ([`NamespaceBackend::set_staging`]).
    stages_sets: bool,
    /// Where the committed position is recorded over time (for replays),
    /// and when it last was.
    positions: Option<Positions>,
    /// The commit timer.
    ticker: Option<SpawnHandle>,
    /// The shard moved to another arbiter: this consumer is done for good.
    retired: bool,
    /// [`Retire`]s waiting for the read in flight to end.
    retiring: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl ShardConsumer {
    pub fn new(
        backend: NamespaceBackend,
        group: String,
        shard: ShardRef,
        stats: Arc<ShardStats>,
        max_outstanding: usize,
        target: Option<Arc<str>>,
    ) -> Self {
        Self {
            target,
            stages_sets: backend.set_staging().is_some(),
            backend,
            group,
            shard,
            stats,
            max_outstanding,
            peers: None,
            consumer: None,
            checkpointer: None,
            opening: false,
            generation: 0,
            reading: false,
            committing: false,
            last_committed: None,
            stopped: false,
            positions: None,
            ticker: None,
            retired: false,
            retiring: Vec::new(),
        }
    }

    /// Record the committed position in `store`, at most every
    /// [`POSITION_EVERY`], whenever it moved: the committed offset, or the
    /// lowest parked entry's sequence if that is lower (a parked entry is
    /// not applied yet, though the offset passed it).
    pub fn recording_positions(mut self, store: Arc<ReplayStore>, park: ParkStore) -> Self {
        self.positions = Some(Positions {
            store,
            park,
            last: None,
        });
        self
    }

    /// Note the committed offset with the time, if it moved since the last
    /// note and that was [`POSITION_EVERY`] ago.
    fn record_position(&mut self) {
        let (Some(p), Some(offset)) = (&mut self.positions, self.last_committed) else {
            return;
        };
        if p.last
            .is_some_and(|(t, o)| o == offset || t.elapsed() < POSITION_EVERY)
        {
            return;
        }
        p.last = Some((Instant::now(), offset));
        let (store, park) = (p.store.clone(), p.park.clone());
        let (group, shard) = (self.group.clone(), self.shard.clone());
        let at = now_ms();
        tokio::spawn(async move {
            // A missing position makes a replay start earlier, no more; an
            // unreadable park store records nothing this time.
            let floor = match park.parked_floor(shard.clone()).await {
                Ok(floor) => floor,
                Err(error) => {
                    warn!(%shard, %error, "Cannot read the parked entries' floor.");
                    return;
                }
            };
            let position = floor.map_or(offset, |f| f.min(offset));
            let recorded = tokio::task::spawn_blocking(move || {
                store.record_position(&group, &shard, at, position)
            })
            .await;
            if let Ok(Err(error)) = recorded {
                warn!(%error, "Cannot record the committed position.");
            }
        });
    }

    /// (Re)open the consumer at the committed offset, under a new generation,
    /// and tell the peers to drop older work. Reading starts once it is open,
    /// after the pause of a restart in a storm ([`super::RestartBackoff`]).
    fn reopen(&mut self, ctx: &mut Context<Self>) {
        if self.retired {
            return;
        }
        self.generation += 1;
        self.consumer = None;
        self.checkpointer = None;
        if let Some(p) = &self.peers {
            let reset = Reset(self.generation);
            for peer in &p.resets {
                peer.do_send(reset);
            }
        }
        self.opening = true;
        let generation = self.generation;
        let pause = self.stats.restart_backoff.remaining();
        if pause.is_zero() {
            self.open(generation, ctx);
        } else {
            warn!(shard = %self.shard, pause_ms = pause.as_millis() as u64,
                "The shard's actors keep restarting; pausing before reading again.");
            ctx.run_later(pause, move |act, ctx| {
                if act.generation == generation {
                    act.open(generation, ctx);
                }
            });
        }
    }

    fn open(&mut self, generation: u64, ctx: &mut Context<Self>) {
        let (backend, group, shard) =
            (self.backend.clone(), self.group.clone(), self.shard.clone());
        ctx.spawn(
            async move { backend.open_consumer(&group, &shard).await }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    if act.generation != generation {
                        return; // A newer reopen is under way.
                    }
                    act.opening = false;
                    if act.retired {
                        return;
                    }
                    match result {
                        Ok(c) => {
                            act.checkpointer = Some(c.checkpointer());
                            act.consumer = Some(c);
                        }
                        Err(error) => {
                            error!(shard = %act.shard, %error, "Cannot open the shard for reading.");
                        }
                    }
                    act.schedule_read(ctx);
                }),
        );
    }

    fn schedule_read(&mut self, ctx: &mut Context<Self>) {
        if self.reading || self.opening || self.stopped || self.peers.is_none() {
            return;
        }
        let Some(mut consumer) = self.consumer.take() else {
            // Could not open; try again shortly.
            ctx.run_later(Duration::from_secs(1), |act, ctx| act.reopen(ctx));
            return;
        };
        let (outstanding, bytes) = self
            .checkpointer
            .as_ref()
            .map_or((0, 0), |c| (c.outstanding(), c.outstanding_bytes()));
        if outstanding >= self.max_outstanding || bytes >= MAX_OUTSTANDING_BYTES {
            self.consumer = Some(consumer);
            ctx.run_later(Duration::from_millis(10), |act, ctx| act.schedule_read(ctx));
            return;
        }
        self.reading = true;
        let generation = self.generation;
        let read = async move {
            let result = consumer.receive(READ_BATCH, READ_WAIT).await;
            (consumer, result)
        };
        ctx.spawn(
            read.into_actor(self)
                .map(move |(consumer, result), act, ctx| {
                    guarded(act, ctx, |act, ctx| {
                        act.read_done(generation, consumer, result, ctx)
                    });
                }),
        );
    }

    fn read_done(
        &mut self,
        generation: u64,
        consumer: AnyConsumer,
        result: Result<Vec<AnyDelivery>, crate::backends::BackendError>,
        ctx: &mut Context<Self>,
    ) {
        self.reading = false;
        if self.retired {
            // Its batch is read again by the shard's new consumer.
            drop((consumer, result));
            return self.finish_retiring(ctx);
        }
        if self.generation != generation {
            // Rewound while reading: this consumer and its batch are stale.
            self.schedule_read(ctx);
            return;
        }
        self.consumer = Some(consumer);
        match result {
            Ok(deliveries) => {
                self.route(deliveries);
                self.schedule_read(ctx);
            }
            Err(error) => {
                // For example a corrupt record with on_corruption = "stop":
                // the shard stops here and says why.
                error!(shard = %self.shard, %error, "Reading the shard failed; retrying in 5 s.");
                ctx.run_later(Duration::from_secs(5), |act, ctx| act.schedule_read(ctx));
            }
        }
    }

    fn route(&mut self, deliveries: Vec<AnyDelivery>) {
        crate::failpoint!("consumer.route");
        let Some(peers) = &self.peers else { return };
        let now = now_ms();
        let (mut due, mut later) = (Vec::new(), Vec::new());
        for d in deliveries {
            // A set's marker only completes its set in a log that writes
            // the set as one unit: nothing to apply. Where the set is
            // staged instead, the marker is where the set is applied.
            let elsewhere = self.target.as_ref().is_some_and(|t| !d.entry().is_for(t));
            if elsewhere || (d.entry().is_set_marker() && !self.stages_sets) {
                super::ack(d);
                continue;
            }
            let work = Work {
                generation: self.generation,
                delivery: d,
            };
            if work.delivery.entry().due_ms > now {
                later.push(work);
            } else {
                due.push(work);
            }
        }
        if !due.is_empty() {
            let queued = super::InMailbox::new(&self.stats, due.len());
            peers.apply.do_send(Apply(due, queued));
        }
        if !later.is_empty() {
            peers.delay.do_send(Delay(later));
        }
    }

    fn commit(&mut self, ctx: &mut Context<Self>) {
        if self.committing {
            return;
        }
        let Some(cp) = self.checkpointer.clone() else {
            return;
        };
        if Some(cp.low_watermark()) == self.last_committed {
            return;
        }
        self.committing = true;
        let shard = self.shard.clone();
        ctx.spawn(
            async move { cp.commit().await }
                .into_actor(self)
                .map(move |result, act, _| {
                    act.committing = false;
                    match result {
                        Ok(offset) => act.last_committed = Some(offset),
                        Err(error) => warn!(%shard, %error, "Commit failed; will retry."),
                    }
                }),
        );
    }
}

impl ShardConsumer {
    /// No read is in flight: answer the [`Retire`]s and stop.
    fn finish_retiring(&mut self, ctx: &mut Context<Self>) {
        for tx in self.retiring.drain(..) {
            let _ = tx.send(());
        }
        ctx.stop();
    }
}

impl Actor for ShardConsumer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.retired {
            return; // Restarted by its supervisor after retiring: stays idle.
        }
        self.ticker = Some(ctx.run_interval(COMMIT_EVERY, |act, ctx| {
            act.commit(ctx);
            act.record_position();
        }));
        if self.peers.is_some() {
            self.reopen(ctx);
        }
    }
}

impl Supervised for ShardConsumer {
    fn restarting(&mut self, _: &mut Context<Self>) {
        if self.retired {
            return;
        }
        warn!(shard = %self.shard, "Restarting the shard consumer.");
        self.stats.restarts.inc();
        // Its reopen waits out the pause.
        self.stats.restart_backoff.restarted();
        self.reading = false;
        self.opening = false;
        self.committing = false;
        self.last_committed = None;
    }
}

impl Handler<Wire> for ShardConsumer {
    type Result = ();

    fn handle(&mut self, msg: Wire, ctx: &mut Context<Self>) {
        if self.retired {
            return;
        }
        self.peers = Some(msg.0);
        self.reopen(ctx);
    }
}

impl Handler<Rewind> for ShardConsumer {
    type Result = ();

    fn handle(&mut self, _: Rewind, ctx: &mut Context<Self>) {
        info!(shard = %self.shard, "Rewinding to the committed offset.");
        self.reopen(ctx);
    }
}

impl Handler<Drain> for ShardConsumer {
    type Result = ResponseActFuture<Self, Option<u64>>;

    fn handle(&mut self, Drain(settle): Drain, _: &mut Context<Self>) -> Self::Result {
        self.stopped = true;
        let cp = self.checkpointer.clone();
        let applier = self.peers.as_ref().map(|p| p.quiesce.clone());
        let shard = self.shard.clone();
        Box::pin(
            async move {
                if let (Some(wait), Some(applier)) = (settle, applier)
                    && tokio::time::timeout(wait, applier.send(Quiesce))
                        .await
                        .is_err()
                {
                    warn!(%shard, wait_ms = wait.as_millis() as u64,
                        "A delivery was still in flight at shutdown; it will be delivered again.");
                }
                match cp {
                    Some(cp) => cp.commit().await.ok(),
                    None => None,
                }
            }
            .into_actor(self),
        )
    }
}

impl Handler<Retire> for ShardConsumer {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Retire, ctx: &mut Context<Self>) -> Self::Result {
        self.retired = true;
        self.stopped = true;
        // Dropping the peers breaks the cycle of addresses between the
        // shard's actors, so each stops for good once the handle lets go.
        self.peers = None;
        self.consumer = None;
        self.checkpointer = None;
        self.positions = None;
        if let Some(t) = self.ticker.take() {
            ctx.cancel_future(t);
        }
        if !self.reading {
            self.finish_retiring(ctx);
            return Box::pin(async {});
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.retiring.push(tx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<GetState> for ShardConsumer {
    type Result = actix::MessageResult<GetState>;

    fn handle(&mut self, _: GetState, _: &mut Context<Self>) -> Self::Result {
        let state = self
            .checkpointer
            .as_ref()
            .map(|c| ConsumerState {
                committed: c.committed().unwrap_or(0),
                low_watermark: c.low_watermark(),
                outstanding: c.outstanding(),
                oldest_outstanding_ms: c.oldest_outstanding_ms(),
                end_offset: c.end_offset(),
            })
            .unwrap_or_default();
        actix::MessageResult(state)
    }
}
