//! Opening a namespace's backend from its config and this process's role
//! (`server.role`): what a writing process needs to append, what a
//! consuming one needs to deliver, and the backend's DLQ and delay store.

use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use super::embedded::{EmbeddedDlq, EmbeddedLog};
use super::kafka::{
    KafkaDelayTiers, KafkaDlq, KafkaGroup, KafkaProducer, KafkaReplayLog, KafkaSets, KafkaSettings,
    Membership,
};
use super::shard::{AnyDlq, NamespaceBackend};
use super::sqs::{
    Hlc, SqsArchive, SqsDelays, SqsDlq, SqsError, SqsNamespace, SqsProducer, SqsSettings, SqsShards,
};
use super::{BackendError, DelayStore};
use crate::config::{
    BackendConfig, CompositeConfig, DelaysConfig, KafkaConfig, NamespaceConfig, OnDeadLetter,
    ServerConfig, SqsConfig, TargetStart,
};

/// A namespace's parts, opened.
pub struct Opened {
    pub backend: NamespaceBackend,
    pub dlq: AnyDlq,
    /// Its own delay store; `None`: the process's shared one.
    pub delays: Option<Arc<dyn DelayStore>>,
}

/// A namespace's backend, DLQ and (if not the shared local one) delay store:
/// the shared embedded log and local DLQ, or its Kafka topic (created with
/// `shards` partitions if missing, and checked otherwise), DLQ topic and
/// delay tiers.
pub async fn namespace(
    name: &str,
    ns: &NamespaceConfig,
    server: &ServerConfig,
    log: &Arc<EmbeddedLog>,
    local_dlq: &Arc<EmbeddedDlq>,
    membership: &Membership,
) -> Result<Opened, BackendError> {
    match &ns.backend {
        BackendConfig::Embedded(_) => Ok(Opened {
            backend: NamespaceBackend::Embedded(log.clone()),
            dlq: AnyDlq::Embedded(local_dlq.clone()),
            delays: None,
        }),
        BackendConfig::Kafka(k) => kafka(name, ns, k, server, true, membership).await,
        BackendConfig::Sqs(q) => Ok(sqs(name, ns, q, server).await?),
        BackendConfig::Composite(c) => composite(name, ns, c, server, membership).await,
    }
}

/// A Kafka namespace: its topic (created with `shards` partitions if
/// missing, and checked otherwise), a producer in a writing process, the
/// group membership of a consuming one, the DLQ topic, and (`tiers`) the
/// delay-tier topics with their workers.
async fn kafka(
    name: &str,
    ns: &NamespaceConfig,
    k: &KafkaConfig,
    server: &ServerConfig,
    tiers: bool,
    membership: &Membership,
) -> Result<Opened, BackendError> {
    let settings = KafkaSettings::of(k, name, ns.shards, server.ack_timeout());
    settings.ensure_topic().await?;
    let producer = match server.role.writes() {
        true => Some(KafkaProducer::new(&settings)?),
        false => None,
    };
    let tiers = match tiers {
        true => Some(KafkaDelayTiers::open(&settings).await?),
        false => None,
    };
    // One group per target, each with its own committed offsets; the delay
    // tiers are shared, and put an entry back for the target that delayed it.
    let (groups, delay_groups) = match server.role.applies() {
        true => {
            let id = k.group(name);
            let drain = Duration::from_millis(k.rebalance_drain_ms);
            let mut groups = Vec::with_capacity(ns.targets.len());
            for target in &ns.targets {
                let group_id = target.group(&id);
                groups.push((
                    group_id.clone(),
                    KafkaGroup::join(
                        &settings,
                        &group_id,
                        drain,
                        membership,
                        target.start == TargetStart::Latest,
                    )?,
                ));
            }
            let tier_groups = match &tiers {
                Some(tiers) => tiers.start_workers(&id, drain, membership)?,
                None => Vec::new(),
            };
            (groups, tier_groups)
        }
        false => (Vec::new(), Vec::new()),
    };
    // Sets of mutations meet there, for the processes that apply them.
    let sets = match server.role.applies() {
        true => {
            let abandon_after = Duration::from_millis(k.set_abandon_after_ms);
            let retention = Duration::from_millis(k.sets_retention_ms);
            Some(KafkaSets::open(&settings, name, abandon_after, retention).await?)
        }
        false => None,
    };
    let dlq_settings = KafkaSettings {
        topic: k.dlq_topic(name),
        ..settings.clone()
    };
    let dlq = KafkaDlq::open(&dlq_settings, &settings.topic).await?;
    if ns.targets.len() > 1 {
        dlq.redrive_to_failed_target_only();
    }
    if ns.dlq.on_dead_letter == OnDeadLetter::HoldKey {
        for (_, group) in &groups {
            group.follow_holds(dlq.clone());
        }
    }
    // Replays read the topic with readers of their own, outside the groups.
    let replay = Arc::new(KafkaReplayLog::new(&settings)?);
    info!(namespace = name, topic = %settings.topic, brokers = %settings.brokers, "Kafka topic ready.");
    Ok(Opened {
        backend: NamespaceBackend::Kafka {
            producer,
            groups,
            delay_groups,
            sets,
            replay,
        },
        dlq: AnyDlq::Kafka(dlq),
        delays: tiers.map(|t| t as Arc<dyn DelayStore>),
    })
}

/// A composite namespace: Kafka for entries and its DLQ, an SQS queue for
/// delays. Due entries go back to their partition with their sequence.
async fn composite(
    name: &str,
    ns: &NamespaceConfig,
    c: &CompositeConfig,
    server: &ServerConfig,
    membership: &Membership,
) -> Result<Opened, BackendError> {
    let BackendConfig::Kafka(k) = c.entries.as_ref() else {
        return Err(BackendError::NotHere(
            "a composite's entries must be on kafka (validation says so)",
        ));
    };
    let DelaysConfig::Sqs(d) = &c.delays;
    let Opened { backend, dlq, .. } = kafka(name, ns, k, server, false, membership).await?;
    let back = KafkaProducer::new(&KafkaSettings::of(k, name, ns.shards, server.ack_timeout()))?;
    let client = SqsSettings::client_for(&d.region, d.endpoint_url.as_deref()).await;
    let delays = SqsDelays::open(
        &client,
        &d.queue,
        name,
        Duration::from_secs(d.delay_hop_s.into()),
        Arc::new(back),
    )
    .await?;
    if server.role.applies() {
        delays.start_worker(Duration::from_secs(d.wait_time_s.into()));
    }
    info!(namespace = name, delays = %d.queue, "Composite: entries on Kafka, delays on SQS.");
    Ok(Opened {
        backend,
        dlq,
        delays: Some(delays as Arc<dyn DelayStore>),
    })
}

/// An SQS namespace: its queues (created if missing), the producers of a
/// writing process, the DLQ queue, and the delay queue with its worker in a
/// consuming process.
async fn sqs(
    name: &str,
    ns: &NamespaceConfig,
    q: &SqsConfig,
    server: &ServerConfig,
) -> Result<Opened, SqsError> {
    let queues: Vec<SqsSettings> = q
        .queues
        .iter()
        .map(|queue| SqsSettings {
            queue: queue.clone(),
            region: q.region.clone(),
            endpoint_url: q.endpoint_url.clone(),
            wait_time: Duration::from_secs(q.wait_time_s.into()),
            visibility_timeout: Duration::from_secs(q.visibility_timeout_s.into()),
            max_messages_per_poll: q.max_messages_per_poll,
            poll_interval: Duration::from_millis(q.poll_interval_ms),
        })
        .collect();
    let client = queues[0].client().await;
    // One clock for the namespace's sequences, its letters and its delays.
    let clock = Arc::new(Hlc::default());
    let mut producers = Vec::with_capacity(queues.len());
    for settings in &queues {
        producers.push(SqsProducer::with_client(&client, &settings.queue, clock.clone()).await?);
    }
    let shards = Arc::new(SqsShards(producers.clone()));
    let dlq = SqsDlq::open(
        &client,
        &q.dlq_queue(),
        name,
        producers,
        ns.route_hash(),
        clock.clone(),
    )
    .await?;
    let delays = SqsDelays::open(
        &client,
        &q.delay_queue(),
        name,
        Duration::from_secs(q.delay_hop_s.into()),
        shards.clone(),
    )
    .await?;
    if server.role.applies() {
        delays.start_worker(Duration::from_secs(q.wait_time_s.into()));
    }
    info!(namespace = name, queues = ?q.queues, dlq = %q.dlq_queue(), delays = %q.delay_queue(), shards = ns.shards, "SQS queues ready.");
    // A copy of each entry this process sends, for replays.
    let archive = match q.archive {
        true => {
            let dir = server.data_dir.join("archive").join(name);
            let nonzero = |v: u64| (v > 0).then_some(v);
            let (max_age, max_bytes) = (
                nonzero(q.archive_max_age_ms).map(Duration::from_millis),
                nonzero(q.archive_max_bytes),
            );
            let (ns_name, shards) = (name.to_string(), ns.shards);
            let archive = tokio::task::spawn_blocking(move || {
                SqsArchive::open(&dir, &ns_name, shards, max_age, max_bytes)
            })
            .await
            .expect("opening the archive does not panic")
            .map_err(|e| SqsError::Queue {
                queue: q.queues[0].clone(),
                message: format!("cannot open the archive: {e}"),
            })?;
            archive.start_retention();
            Some(archive)
        }
        false => None,
    };
    let backend = SqsNamespace {
        client,
        fifo: q.is_fifo(),
        max_message_bytes: q.max_message_bytes as usize,
        queues,
        producers: server.role.writes().then_some(shards),
        archive,
    };
    Ok(Opened {
        backend: NamespaceBackend::Sqs(Arc::new(backend)),
        dlq: AnyDlq::Sqs(dlq),
        delays: Some(delays as Arc<dyn DelayStore>),
    })
}
