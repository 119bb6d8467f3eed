//! The per-namespace supervisor: starts each shard's actors under actix
//! `Supervisor`s (which restart an actor that stops), wires them together,
//! and watches the target's health. A target that is down never takes Walden
//! out of service: it shows in stats and metrics.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor, Addr, ArbiterHandle, AsyncContext, Context, Supervisor, WrapFuture};
use tracing::{info, warn};

use super::applier::{Applier, ApplierPeers, Holds, Policy};
use super::breaker::Breaker;
use super::consumer::ShardConsumer;
use super::dead_letter::DeadLetterActor;
use super::delay::DelayScheduler;
use super::ingest::{Ingest, Writes};
use super::messages::{Drain, Peers, Wire};
use super::{ShardStats, Stores};
use crate::backends::DelayStore;
use crate::backends::shard::{AnyDlq, NamespaceBackend};
use crate::config::{BackendConfig, NamespaceConfig, OnDeadLetter, ServerConfig};
use crate::entry::ShardRef;
use crate::sinks::{self, Sink, SinkError};

/// The consumer group the service reads the embedded log with.
pub const CONSUMER_GROUP: &str = "walden";

/// Deliveries a shard holds unacked, at most (its read-ahead bound).
const MAX_OUTSTANDING: usize = 4096;
const HEALTH_EVERY: Duration = Duration::from_secs(5);

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

/// One shard's actors, as the API sees them.
pub struct ShardHandle {
    pub shard: ShardRef,
    pub consumer: Addr<ShardConsumer>,
    /// Takes redriven dead letters.
    pub applier: Addr<Applier>,
    /// Told when a delayed entry is cancelled.
    pub delay: Addr<DelayScheduler>,
    pub stats: Arc<ShardStats>,
}

/// A running namespace.
pub struct NamespaceRuntime {
    pub name: String,
    pub config: NamespaceConfig,
    pub shards: Vec<ShardHandle>,
    /// The namespace's write path.
    pub ingest: Ingest,
    pub sink_health: Arc<SinkHealth>,
    /// The target's circuit breaker.
    pub breaker: Arc<Breaker>,
    /// Where this namespace's delayed entries wait.
    pub delays: Arc<dyn DelayStore>,
    pub backend: NamespaceBackend,
    /// This namespace's dead letters.
    pub dlq: AnyDlq,
    _supervisor: Addr<NamespaceSupervisor>,
}

/// What a namespace runs on: its backend and DLQ as opened, and the stores
/// for what waits (parked and delayed entries).
pub struct Parts<'a> {
    pub backend: &'a NamespaceBackend,
    pub dlq: &'a AnyDlq,
    pub stores: &'a Stores,
}

impl NamespaceRuntime {
    /// Build the sink and start every shard's actors, spread over `arbiters`.
    pub fn start(
        name: &str,
        config: &NamespaceConfig,
        server: &ServerConfig,
        Parts {
            backend,
            dlq,
            stores,
        }: Parts<'_>,
        writes: &Writes,
        arbiters: &[ArbiterHandle],
    ) -> Result<Self, SinkError> {
        let sink: Arc<dyn Sink> = Arc::from(sinks::build(&config.target)?);
        let breaker = Arc::new(Breaker::new(config.breaker.clone()));
        let mut shards = Vec::with_capacity(config.shards as usize);
        for i in 0..config.shards {
            let arbiter = &arbiters[i as usize % arbiters.len()];
            let shard = ShardRef::new(name, i);
            let stats = Arc::new(ShardStats::default());
            let consumer = {
                let (backend, shard, stats) = (backend.clone(), shard.clone(), stats.clone());
                let group = match config.backend.entries() {
                    BackendConfig::Kafka(k) => k.group(name),
                    _ => CONSUMER_GROUP.to_string(),
                };
                Supervisor::start_in_arbiter(arbiter, move |_| {
                    ShardConsumer::new(backend, group, shard, stats, MAX_OUTSTANDING)
                })
            };
            let dead_letter = {
                let (dlq, consumer, stats) = (dlq.clone(), consumer.clone(), stats.clone());
                let rewind = consumer.recipient();
                Supervisor::start_in_arbiter(arbiter, move |_| {
                    DeadLetterActor::new(dlq, rewind, stats)
                })
            };
            let applier = {
                let (sink, stats) = (sink.clone(), stats.clone());
                let peers = ApplierPeers {
                    rewind: consumer.clone().recipient(),
                    bury: dead_letter.clone().recipient(),
                    redriven: dead_letter.clone().recipient(),
                };
                let policy = Policy {
                    retry: config.retry.clone(),
                    ordering: config.ordering,
                    dlq: config.dlq.enabled,
                    hold_key: config.dlq.on_dead_letter == OnDeadLetter::HoldKey,
                    // A broker namespace never parks on this machine's disk:
                    // a long backoff waits in memory, holding the watermark.
                    may_park: backend.parks_locally(),
                    holds: dlq.key_holds().map_or(Holds::Park, Holds::Broker),
                    target: config.target.name().to_string(),
                    breaker: breaker.clone(),
                };
                let (stores, shard) = (stores.clone(), shard.clone());
                Supervisor::start_in_arbiter(arbiter, move |_| {
                    Applier::new(sink, shard, peers, stores, policy, stats)
                })
            };
            let delay = {
                let applier = applier.clone().recipient();
                let rewind = consumer.clone().recipient();
                let (store, shard, stats) = (stores.delays.clone(), shard.clone(), stats.clone());
                let catch_up = config.delay.catch_up_per_s;
                Supervisor::start_in_arbiter(arbiter, move |_| {
                    DelayScheduler::new(applier, rewind, stats, store, shard, catch_up)
                })
            };
            // A producer-only process never reads: its consumers stay unwired.
            if server.role.applies() {
                consumer.do_send(Wire(Peers {
                    apply: applier.clone().recipient(),
                    quiesce: applier.clone().recipient(),
                    delay: delay.clone().recipient(),
                    resets: vec![
                        delay.clone().recipient(),
                        applier.clone().recipient(),
                        dead_letter.recipient(),
                    ],
                }));
            }
            shards.push(ShardHandle {
                shard,
                consumer,
                applier,
                delay,
                stats,
            });
        }
        let stats = shards.iter().map(|s| s.stats.clone()).collect();
        let ingest = Ingest::new(name, config, backend.producer(), stats, writes);
        let sink_health = Arc::new(SinkHealth::default());
        let supervisor = NamespaceSupervisor {
            name: name.into(),
            sink,
            health: sink_health.clone(),
            breaker: breaker.clone(),
        }
        .start();
        info!(
            namespace = name,
            shards = config.shards,
            target = config.target.kind(),
            "Namespace started."
        );
        Ok(Self {
            name: name.into(),
            config: config.clone(),
            shards,
            ingest,
            sink_health,
            breaker,
            delays: stores.delays.clone(),
            backend: backend.clone(),
            dlq: dlq.clone(),
            _supervisor: supervisor,
        })
    }

    /// Stop reading and commit what each shard has applied, all shards at
    /// once. With `settle`, a sink call in flight gets up to that long to
    /// finish first, and no new one starts.
    pub async fn drain(&self, settle: Option<Duration>) {
        let drains = self.shards.iter().map(|s| async move {
            if let Err(error) = s.consumer.send(Drain(settle)).await {
                warn!(shard = %s.shard, %error, "Could not drain a shard.");
            }
        });
        futures_util::future::join_all(drains).await;
    }
}

/// Watches the target's health for one namespace.
struct NamespaceSupervisor {
    name: String,
    sink: Arc<dyn Sink>,
    health: Arc<SinkHealth>,
    breaker: Arc<Breaker>,
}

impl NamespaceSupervisor {
    fn check(&mut self, ctx: &mut Context<Self>) {
        let (sink, health, name) = (self.sink.clone(), self.health.clone(), self.name.clone());
        let breaker = self.breaker.clone();
        ctx.spawn(
            async move {
                let result = sink.healthcheck().await;
                if let Err(error) = &result {
                    warn!(namespace = %name, %error, "Target is unhealthy; entries wait in the log.");
                }
                breaker.health(&result);
                health.set(result);
            }
            .into_actor(self),
        );
    }
}

impl Actor for NamespaceSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.check(ctx);
        ctx.run_interval(HEALTH_EVERY, |act, ctx| act.check(ctx));
    }
}
