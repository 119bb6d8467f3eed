//! The per-namespace supervisor: starts each target's actors on every shard
//! under actix `Supervisor`s (which restart an actor that stops), wires them
//! together, and watches each target's health. A target that is down never takes Walden
//! out of service: it shows in stats and metrics.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor, Addr, ArbiterHandle, AsyncContext, Context, Supervisor, WrapFuture};
use tracing::{info, warn};

use super::applier::{Applier, ApplierPeers, Holds, Policy};
use super::breaker::Breaker;
use super::concurrency::Concurrency;
use super::consumer::ShardConsumer;
use super::dead_letter::DeadLetterActor;
use super::delay::DelayScheduler;
use super::ingest::{Ingest, Writes};
use super::messages::{Drain, Peers, Retire, Wire};
use super::sets::SetJoin;
use super::{ShardStats, Stores};
use crate::backends::DelayStore;
use crate::backends::shard::{AnyDlq, NamespaceBackend};
use crate::config::{NamespaceConfig, OnDeadLetter, ServerConfig, TargetSpec};
use crate::entry::{ShardRef, relay};
use crate::sinks::{self, Sink, SinkError};
use crate::stats::{Counter, RateMeter};

/// Deliveries a shard holds unacked, at most (its read-ahead bound).
const MAX_OUTSTANDING: usize = 4096;
const HEALTH_EVERY: Duration = Duration::from_secs(5);
/// The apply rate (for `/scale`): sampled every second over ten.
const RATE_SAMPLE_EVERY: Duration = Duration::from_secs(1);
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// The target's last known health.
#[derive(Debug, Default)]
pub struct SinkHealth {
    state: Mutex<(bool, Option<String>)>,
}

impl SinkHealth {
    pub fn healthy(&self) -> (bool, Option<String>) {
        self.state.lock().unwrap().clone()
    }

    fn set(&self, result: Result<(), SinkError>) {
        *self.state.lock().unwrap() = match result {
            Ok(()) => (true, None),
            Err(e) => (false, Some(e.to_string())),
        };
    }
}

/// One shard's actors for one target.
#[derive(Clone)]
pub struct ShardActors {
    pub consumer: Addr<ShardConsumer>,
    /// Takes redriven dead letters.
    pub applier: Addr<Applier>,
    /// Told when a delayed entry is cancelled.
    pub delay: Addr<DelayScheduler>,
    dead_letter: Addr<DeadLetterActor>,
}

/// One shard of one target, as the API and the rebalancer see it. Its
/// actors change when the shard moves to another arbiter; the API reads
/// them through [`ShardHandle::actors`], which waits out a move.
pub struct ShardHandle {
    pub shard: ShardRef,
    pub stats: Arc<ShardStats>,
    actors: tokio::sync::RwLock<ShardActors>,
    /// The arbiter its actors run on (an index into the service's).
    arbiter: AtomicUsize,
    /// Times it moved since start.
    moves: AtomicU64,
}

impl ShardHandle {
    /// Its actors now (after any move under way).
    pub async fn actors(&self) -> ShardActors {
        self.actors.read().await.clone()
    }

    /// The arbiter its actors run on.
    pub fn arbiter(&self) -> usize {
        self.arbiter.load(Relaxed)
    }

    /// Times it moved to another arbiter since start.
    pub fn moves(&self) -> u64 {
        self.moves.load(Relaxed)
    }
}

/// Everything a target's shard needs to start its actors: kept, so that a
/// shard can start again on another arbiter.
struct ShardKit {
    backend: NamespaceBackend,
    dlq: AnyDlq,
    group: String,
    /// This target's name, in a namespace of several.
    only: Option<Arc<str>>,
    stores: Stores,
    sink: Arc<dyn Sink>,
    policy: Policy,
    catch_up_per_s: u64,
    /// The process applies (a producer-only process never reads).
    applies: bool,
}

impl ShardKit {
    /// Start `shard`'s actors on `arbiter`, wired and reading.
    fn start(
        &self,
        shard: &ShardRef,
        stats: &Arc<ShardStats>,
        arbiter: &ArbiterHandle,
    ) -> ShardActors {
        let consumer = {
            let (backend, shard, stats) = (self.backend.clone(), shard.clone(), stats.clone());
            let (group, only) = (self.group.clone(), self.only.clone());
            let (positions, park) = (self.stores.replays.clone(), self.stores.park.clone());
            Supervisor::start_in_arbiter(arbiter, move |_| {
                ShardConsumer::new(backend, group, shard, stats, MAX_OUTSTANDING, only)
                    .recording_positions(positions, park)
            })
        };
        let dead_letter = {
            let (dlq, consumer, stats) = (self.dlq.clone(), consumer.clone(), stats.clone());
            let rewind = consumer.recipient();
            Supervisor::start_in_arbiter(arbiter, move |_| DeadLetterActor::new(dlq, rewind, stats))
        };
        let applier = {
            let (sink, stats) = (self.sink.clone(), stats.clone());
            let peers = ApplierPeers {
                rewind: consumer.clone().recipient(),
                bury: dead_letter.clone().recipient(),
                redriven: dead_letter.clone().recipient(),
            };
            let (stores, shard, policy) = (self.stores.clone(), shard.clone(), self.policy.clone());
            Supervisor::start_in_arbiter(arbiter, move |_| {
                Applier::new(sink, shard, peers, stores, policy, stats)
            })
        };
        let delay = {
            let applier = applier.clone().recipient();
            let rewind = consumer.clone().recipient();
            let (store, shard, stats) = (self.stores.delays.clone(), shard.clone(), stats.clone());
            let (catch_up, only) = (self.catch_up_per_s, self.only.clone());
            Supervisor::start_in_arbiter(arbiter, move |_| {
                DelayScheduler::new(applier, rewind, stats, store, shard, catch_up, only)
            })
        };
        if self.applies {
            consumer.do_send(Wire(Peers {
                apply: applier.clone().recipient(),
                quiesce: applier.clone().recipient(),
                delay: delay.clone().recipient(),
                resets: vec![
                    delay.clone().recipient(),
                    applier.clone().recipient(),
                    dead_letter.clone().recipient(),
                ],
            }));
        }
        ShardActors {
            consumer,
            applier,
            delay,
            dead_letter,
        }
    }
}

/// One of a namespace's targets: every shard's actors delivering to it, with
/// progress, retries, breaker, parked keys and delays of its own, so a slow
/// or dead target never holds the others back.
pub struct TargetRuntime {
    pub name: String,
    pub kind: &'static str,
    /// The consumer group that keeps its progress.
    pub group: String,
    pub shards: Vec<Arc<ShardHandle>>,
    pub sink_health: Arc<SinkHealth>,
    /// The target's circuit breaker.
    pub breaker: Arc<Breaker>,
    /// Where its delayed entries wait.
    pub delays: Arc<dyn DelayStore>,
    /// Its sets of mutations, gathering and applying.
    pub sets: Arc<SetJoin>,
    /// Where its entries go (a replay applies through it too).
    pub sink: Arc<dyn Sink>,
    /// Entries this process applies per second, lately.
    pub apply_rate: Arc<RateMeter>,
    /// Its requests in flight, and their adaptive limit.
    pub concurrency: Arc<Concurrency>,
    kit: Arc<ShardKit>,
    _watch: Addr<TargetWatch>,
}

/// A running namespace.
pub struct NamespaceRuntime {
    pub name: String,
    pub config: NamespaceConfig,
    /// Its targets, in config order (the `target` table alone, or the
    /// `targets` tables by name).
    pub targets: Vec<TargetRuntime>,
    /// The namespace's write path.
    pub ingest: Ingest,
    /// Entries answered `durable: "true"` per shard, since start.
    pub written: Arc<[Counter]>,
    pub backend: NamespaceBackend,
    /// This namespace's dead letters (every target's, each marked with it).
    pub dlq: AnyDlq,
    /// Its replay-only targets (`live = false`): a sink each, no actors.
    pub replay_targets: Vec<(String, Arc<dyn Sink>)>,
}

/// What a namespace runs on: its backend and DLQ as opened, and the stores
/// for what waits (parked and delayed entries).
pub struct Parts<'a> {
    pub backend: &'a NamespaceBackend,
    pub dlq: &'a AnyDlq,
    pub stores: &'a Stores,
}

impl NamespaceRuntime {
    /// Build each target's sink and start its actors on every shard, spread
    /// over `arbiters`.
    pub fn start(
        name: &str,
        config: &NamespaceConfig,
        server: &ServerConfig,
        parts: Parts<'_>,
        writes: &Writes,
        arbiters: &[ArbiterHandle],
    ) -> Result<Self, SinkError> {
        let targets = config
            .targets
            .iter()
            .map(|spec| TargetRuntime::start(name, config, spec, server, &parts, arbiters))
            .collect::<Result<Vec<_>, _>>()?;
        let replay_targets = config
            .replay_targets
            .iter()
            .map(|spec| {
                let hop = relay::hop_id(&server.instance_id, name);
                let sink: Arc<dyn Sink> = Arc::from(sinks::build(&spec.config, &hop)?);
                Ok((spec.name().to_string(), sink))
            })
            .collect::<Result<Vec<_>, SinkError>>()?;
        let written: Arc<[Counter]> = (0..config.shards).map(|_| Counter::default()).collect();
        let ingest = Ingest::new(
            name,
            config,
            parts.backend.producer(),
            written.clone(),
            writes,
        );
        info!(
            namespace = name,
            shards = config.shards,
            targets = ?targets.iter().map(|t| format!("{} ({})", t.name, t.kind)).collect::<Vec<_>>(),
            "Namespace started."
        );
        Ok(Self {
            name: name.into(),
            config: config.clone(),
            targets,
            ingest,
            written,
            backend: parts.backend.clone(),
            dlq: parts.dlq.clone(),
            replay_targets,
        })
    }

    /// The target named `name`.
    pub fn target(&self, name: &str) -> Option<&TargetRuntime> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// Stop reading and commit what each shard has applied, every target
    /// and shard at once. With `settle`, a sink call in flight gets up to
    /// that long to finish first, and no new one starts.
    pub async fn drain(&self, settle: Option<Duration>) {
        let drains = self
            .targets
            .iter()
            .flat_map(|t| &t.shards)
            .map(|s| async move {
                if let Err(error) = s.actors().await.consumer.send(Drain(settle)).await {
                    warn!(shard = %s.shard, %error, "Could not drain a shard.");
                }
            });
        futures_util::future::join_all(drains).await;
    }
}

impl TargetRuntime {
    fn start(
        name: &str,
        config: &NamespaceConfig,
        spec: &TargetSpec,
        server: &ServerConfig,
        Parts {
            backend,
            dlq,
            stores,
        }: &Parts<'_>,
        arbiters: &[ArbiterHandle],
    ) -> Result<Self, SinkError> {
        let hop = relay::hop_id(&server.instance_id, name);
        let sink: Arc<dyn Sink> = Arc::from(sinks::build(&spec.config, &hop)?);
        let breaker = Arc::new(Breaker::new(config.breaker.clone()));
        let namespace_group = config.namespace_group(name);
        let group = spec.group(&namespace_group);
        // The namespace's own target keeps the store's plain keys.
        let lane = (group != namespace_group).then_some(group.as_str());
        let stores = Stores {
            park: stores.park.lane(lane),
            delays: stores
                .delays
                .for_target(lane)
                .unwrap_or_else(|| stores.delays.clone()),
            replays: stores.replays.clone(),
        };
        let sets = Arc::new(
            SetJoin::new(
                name,
                spec.name(),
                sink.clone(),
                config.retry.clone(),
                config.dlq.enabled.then(|| (*dlq).clone()),
                breaker.clone(),
                stores.park.clone(),
            )
            .staged(backend.set_staging()),
        );
        let concurrency = Arc::new(Concurrency::new(
            config.concurrency.clone(),
            sink.concurrent_entries(),
        ));
        // With one target there is nothing to tell apart.
        let only: Option<Arc<str>> = (config.targets.len() > 1).then(|| spec.name().into());
        let kit = Arc::new(ShardKit {
            backend: (*backend).clone(),
            dlq: (*dlq).clone(),
            group: group.clone(),
            only,
            stores: stores.clone(),
            sink: sink.clone(),
            policy: Policy {
                retry: config.retry.clone(),
                ordering: config.ordering,
                dlq: config.dlq.enabled,
                hold_key: config.dlq.on_dead_letter == OnDeadLetter::HoldKey,
                // A broker namespace never parks on this machine's disk: a
                // long backoff waits in memory, holding the watermark.
                may_park: backend.parks_locally(),
                holds: dlq.key_holds().map_or(Holds::Park, Holds::Broker),
                target: spec.name().to_string(),
                breaker: breaker.clone(),
                sets: sets.clone(),
                concurrency: concurrency.clone(),
            },
            catch_up_per_s: config.delay.catch_up_per_s,
            applies: server.role.applies(),
        });
        let shards: Vec<Arc<ShardHandle>> = (0..config.shards)
            .map(|i| {
                let at = i as usize % arbiters.len();
                let shard = ShardRef::new(name, i);
                let stats = Arc::new(ShardStats::default());
                let actors = kit.start(&shard, &stats, &arbiters[at]);
                Arc::new(ShardHandle {
                    shard,
                    stats,
                    actors: tokio::sync::RwLock::new(actors),
                    arbiter: AtomicUsize::new(at),
                    moves: AtomicU64::new(0),
                })
            })
            .collect();
        let sink_health = Arc::new(SinkHealth::default());
        let watch_sink = sink.clone();
        let apply_rate = Arc::new(RateMeter::new(RATE_WINDOW));
        let watch = TargetWatch {
            namespace: name.into(),
            target: spec.name().into(),
            sink,
            health: sink_health.clone(),
            breaker: breaker.clone(),
            shard_stats: shards.iter().map(|h| h.stats.clone()).collect(),
            apply_rate: apply_rate.clone(),
        }
        .start();
        Ok(Self {
            name: spec.name().to_string(),
            kind: spec.config.kind(),
            group,
            shards,
            sink_health,
            breaker,
            delays: stores.delays.clone(),
            sets,
            sink: watch_sink,
            apply_rate,
            concurrency,
            kit,
            _watch: watch,
        })
    }

    /// Move shard `index`'s actors to `arbiter` (number `to`), as a restart
    /// would: stop reading, let the sink call in flight settle (up to
    /// `settle`), commit, retire the old actors, and start new ones that
    /// read on from the committed offset. API calls to the shard wait for
    /// the move. Returns false if the shard was already there.
    pub async fn move_shard(
        &self,
        index: usize,
        to: usize,
        arbiter: &ArbiterHandle,
        settle: Duration,
    ) -> bool {
        let handle = &self.shards[index];
        let mut actors = handle.actors.write().await;
        if handle.arbiter() == to {
            return false;
        }
        let old = actors.clone();
        if let Err(error) = old.consumer.send(Drain(Some(settle))).await {
            warn!(shard = %handle.shard, %error, "Could not drain a shard before moving it.");
        }
        // The consumer first: it answers once its last read is over.
        let _ = old.consumer.send(Retire).await;
        let _ = old.applier.send(Retire).await;
        let _ = old.delay.send(Retire).await;
        let _ = old.dead_letter.send(Retire).await;
        *actors = self.kit.start(&handle.shard, &handle.stats, arbiter);
        let from = handle.arbiter.swap(to, Relaxed);
        handle.moves.fetch_add(1, Relaxed);
        info!(shard = %handle.shard, target = %self.name, from, to, "Moved a shard to another arbiter.");
        true
    }
}

/// Watches one target's health, and samples its apply rate.
struct TargetWatch {
    namespace: String,
    target: String,
    sink: Arc<dyn Sink>,
    health: Arc<SinkHealth>,
    breaker: Arc<Breaker>,
    shard_stats: Vec<Arc<ShardStats>>,
    apply_rate: Arc<RateMeter>,
}

impl TargetWatch {
    fn check(&mut self, ctx: &mut Context<Self>) {
        let (sink, health) = (self.sink.clone(), self.health.clone());
        let (namespace, target) = (self.namespace.clone(), self.target.clone());
        let breaker = self.breaker.clone();
        ctx.spawn(
            async move {
                let result = sink.healthcheck().await;
                if let Err(error) = &result {
                    warn!(%namespace, %target, %error, "Target is unhealthy; entries wait in the log.");
                }
                breaker.health(&result);
                health.set(result);
            }
            .into_actor(self),
        );
    }
}

impl Actor for TargetWatch {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.check(ctx);
        ctx.run_interval(HEALTH_EVERY, |act, ctx| act.check(ctx));
        ctx.run_interval(RATE_SAMPLE_EVERY, |act, _| {
            let applied = act.shard_stats.iter().map(|s| s.applied.get()).sum();
            act.apply_rate.observe(applied);
        });
    }
}
