//! One namespace's backend as the actors see it: the same write path, shard
//! consumers, deliveries and checkpoints whatever the backend. An enum per
//! role keeps the actors free of generics; each arm only forwards.

use std::sync::Arc;
use std::time::Duration;

use super::embedded::{
    EmbeddedCheckpointer, EmbeddedConsumer, EmbeddedDelivery, EmbeddedDlq, EmbeddedLog,
    EmbeddedProducer,
};
use super::kafka::{
    KafkaCheckpointer, KafkaConsumer, KafkaDelivery, KafkaDlq, KafkaGroup, KafkaProducer,
    KafkaReplayLog, KafkaSets,
};
use super::sqs::{SqsCheckpointer, SqsConsumer, SqsDelivery, SqsDlq, SqsNamespace};
use super::{
    BackendError, Consumer, DeadLetter, DeadLetters, Delivery, NoWrites, Producer, RedriveReport,
    Selection, SetStaging,
};
use crate::entry::{Entry, ShardRef};

/// Where a namespace's entries live.
#[derive(Clone)]
pub enum NamespaceBackend {
    Embedded(Arc<EmbeddedLog>),
    Kafka {
        /// `None` in a consumer-only process.
        producer: Option<KafkaProducer>,
        /// This process's memberships in the consumer groups of the
        /// namespace's targets, by group id; none in a producer-only process.
        groups: Vec<(String, Arc<KafkaGroup>)>,
        /// Memberships in the delay tiers' groups (consumer processes).
        delay_groups: Vec<Arc<KafkaGroup>>,
        /// Where sets of mutations meet (consumer processes).
        sets: Option<KafkaSets>,
        /// What replays read the topic with.
        replay: Arc<KafkaReplayLog>,
    },
    Sqs(Arc<SqsNamespace>),
}

impl NamespaceBackend {
    pub fn kind(&self) -> &'static str {
        match self {
            NamespaceBackend::Embedded(_) => "embedded",
            NamespaceBackend::Kafka { .. } => "kafka",
            NamespaceBackend::Sqs(_) => "sqs",
        }
    }

    /// Where this backend stages sets of mutations for the targets, if its
    /// log cannot write a set as one unit (Kafka).
    pub fn set_staging(&self) -> Option<Arc<dyn SetStaging>> {
        match self {
            NamespaceBackend::Kafka { sets, .. } => {
                sets.clone().map(|s| Arc::new(s) as Arc<dyn SetStaging>)
            }
            _ => None,
        }
    }

    /// The log a replay reads, or why this backend has none to read.
    pub fn replay_log(&self) -> Result<Arc<dyn super::ReplayLog>, &'static str> {
        match self {
            NamespaceBackend::Embedded(log) => Ok(log.clone()),
            NamespaceBackend::Kafka { replay, .. } => Ok(replay.clone()),
            NamespaceBackend::Sqs(ns) => match &ns.archive {
                Some(archive) => Ok(archive.clone()),
                None => Err(
                    "SQS keeps no log to replay (a message is deleted once applied): set backend.archive = true to keep a copy of each entry for replays",
                ),
            },
        }
    }

    /// Entries an SQS namespace's archive could not keep since start
    /// (`None`: the namespace keeps no archive).
    pub fn archive_failed(&self) -> Option<u64> {
        match self {
            NamespaceBackend::Sqs(ns) => ns.archive.as_ref().map(|a| a.failed.get()),
            _ => None,
        }
    }

    /// Close what the namespace keeps on local disk besides the shared log
    /// (an SQS namespace's archive). Blocking.
    pub fn close(&self) {
        if let NamespaceBackend::Sqs(ns) = self
            && let Some(archive) = &ns.archive
        {
            archive.close();
        }
    }

    /// A long backoff may park entries on this machine's disk (the park
    /// store). A broker namespace never does: its entries wait in memory,
    /// holding the watermark, so another process can take the shard over.
    pub fn parks_locally(&self) -> bool {
        matches!(self, NamespaceBackend::Embedded(_))
    }

    /// The sequence the next entry of `shard` will get, where the backend
    /// knows it locally (the embedded log); a broker's comes from its
    /// consumer's statistics instead.
    pub fn next_sequence(&self, shard: &ShardRef) -> Option<u64> {
        match self {
            NamespaceBackend::Embedded(log) => Some(log.next_offset(shard)),
            _ => None,
        }
    }

    /// Entries of `shard` the hard retention cap deleted before they were
    /// applied, since start (only the embedded log has such a cap).
    pub fn lost_to_retention(&self, shard: &ShardRef) -> u64 {
        match self {
            NamespaceBackend::Embedded(log) => log.lost_to_retention(shard),
            _ => 0,
        }
    }

    /// Entries of `shard` after `group`'s committed offset, where the
    /// backend keeps both locally (the embedded log).
    pub fn local_lag(&self, group: &str, shard: &ShardRef) -> Option<u64> {
        match self {
            NamespaceBackend::Embedded(log) => {
                let committed = log.committed(group).get(shard).copied().unwrap_or(0);
                Some(log.next_offset(shard).saturating_sub(committed))
            }
            _ => None,
        }
    }

    /// This process is a member of consumer groups for the namespace (a
    /// broker that splits its shards between processes): shutting down
    /// leaves them, which hands the shards over.
    pub fn in_groups(&self) -> bool {
        matches!(self, NamespaceBackend::Kafka { groups, delay_groups, .. }
            if !groups.is_empty() || !delay_groups.is_empty())
    }

    /// Leave every group this process is in for the namespace, each revoke
    /// waiting up to `drain` for the entries in flight, then committing.
    /// Blocking.
    pub fn leave_groups(&self, drain: Duration) {
        if let NamespaceBackend::Kafka {
            groups,
            delay_groups,
            ..
        } = self
        {
            for g in groups.iter().map(|(_, g)| g).chain(delay_groups) {
                g.leave(drain);
            }
        }
    }

    /// How this namespace takes writes: the one [`Producer`] of its backend
    /// (one that refuses them in a consumer-only process).
    pub fn producer(&self) -> Arc<dyn Producer> {
        match self {
            NamespaceBackend::Embedded(log) => Arc::new(EmbeddedProducer::new(log.clone())),
            NamespaceBackend::Kafka {
                producer: Some(p), ..
            } => Arc::new(p.clone()),
            NamespaceBackend::Kafka { producer: None, .. } => Arc::new(NoWrites),
            NamespaceBackend::Sqs(ns) => ns.clone(),
        }
    }

    /// Open `shard` for `group`, at the group's committed position. On Kafka
    /// the shard comes from this process's group membership.
    pub async fn open_consumer(
        &self,
        group: &str,
        shard: &ShardRef,
    ) -> Result<AnyConsumer, BackendError> {
        Ok(match self {
            NamespaceBackend::Embedded(log) => {
                AnyConsumer::Embedded(EmbeddedConsumer::new(log.clone(), group, shard)?)
            }
            NamespaceBackend::Kafka { groups, .. } => {
                let Some((_, member)) = groups.iter().find(|(id, _)| id == group) else {
                    return Err(BackendError::NotHere(
                        "this process is not in the group (--role producer reads nothing)",
                    ));
                };
                AnyConsumer::Kafka(member.shard_consumer(shard).await?)
            }
            NamespaceBackend::Sqs(ns) => AnyConsumer::Sqs(ns.consumer(shard).await?),
        })
    }
}

pub enum AnyConsumer {
    Embedded(EmbeddedConsumer),
    Kafka(KafkaConsumer),
    Sqs(SqsConsumer),
}

impl AnyConsumer {
    pub fn checkpointer(&self) -> AnyCheckpointer {
        match self {
            AnyConsumer::Embedded(c) => AnyCheckpointer::Embedded(c.checkpointer()),
            AnyConsumer::Kafka(c) => AnyCheckpointer::Kafka(c.checkpointer()),
            AnyConsumer::Sqs(c) => AnyCheckpointer::Sqs(c.checkpointer()),
        }
    }
}

impl Consumer for AnyConsumer {
    type Delivery = AnyDelivery;

    async fn receive(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<AnyDelivery>, BackendError> {
        Ok(match self {
            AnyConsumer::Embedded(c) => c
                .receive(max, timeout)
                .await?
                .into_iter()
                .map(AnyDelivery::Embedded)
                .collect(),
            AnyConsumer::Kafka(c) => c
                .receive(max, timeout)
                .await?
                .into_iter()
                .map(AnyDelivery::Kafka)
                .collect(),
            AnyConsumer::Sqs(c) => c
                .receive(max, timeout)
                .await?
                .into_iter()
                .map(AnyDelivery::Sqs)
                .collect(),
        })
    }

    async fn commit(&mut self) -> Result<(), BackendError> {
        match self {
            AnyConsumer::Embedded(c) => c.commit().await,
            AnyConsumer::Kafka(c) => c.commit().await,
            AnyConsumer::Sqs(c) => c.commit().await,
        }
    }
}

/// Commits a shard consumer's progress while it reads.
#[derive(Clone)]
pub enum AnyCheckpointer {
    Embedded(EmbeddedCheckpointer),
    Kafka(KafkaCheckpointer),
    /// SQS has no offsets: a message is deleted once acked.
    Sqs(SqsCheckpointer),
}

impl AnyCheckpointer {
    pub fn low_watermark(&self) -> u64 {
        match self {
            AnyCheckpointer::Embedded(c) => c.low_watermark(),
            AnyCheckpointer::Kafka(c) => c.low_watermark(),
            AnyCheckpointer::Sqs(_) => 0,
        }
    }

    pub fn outstanding(&self) -> usize {
        match self {
            AnyCheckpointer::Embedded(c) => c.outstanding(),
            AnyCheckpointer::Kafka(c) => c.outstanding(),
            AnyCheckpointer::Sqs(c) => c.outstanding(),
        }
    }

    /// Payload bytes of the deliveries not yet acked.
    pub fn outstanding_bytes(&self) -> usize {
        match self {
            AnyCheckpointer::Embedded(c) => c.outstanding_bytes(),
            AnyCheckpointer::Kafka(c) => c.outstanding_bytes(),
            AnyCheckpointer::Sqs(c) => c.outstanding_bytes(),
        }
    }

    pub fn oldest_outstanding_ms(&self) -> Option<u64> {
        match self {
            AnyCheckpointer::Embedded(c) => c.oldest_outstanding_ms(),
            AnyCheckpointer::Kafka(c) => c.oldest_outstanding_ms(),
            AnyCheckpointer::Sqs(_) => None,
        }
    }

    pub fn committed(&self) -> Option<u64> {
        match self {
            AnyCheckpointer::Embedded(c) => c.committed(),
            AnyCheckpointer::Kafka(c) => c.committed(),
            AnyCheckpointer::Sqs(_) => None,
        }
    }

    /// The shard's end on a broker (Kafka's high watermark), when known;
    /// the embedded log's end is read from the log itself.
    pub fn end_offset(&self) -> Option<u64> {
        match self {
            AnyCheckpointer::Kafka(c) => c.end_offset(),
            AnyCheckpointer::Embedded(_) | AnyCheckpointer::Sqs(_) => None,
        }
    }

    /// Commit the low watermark; returns it.
    pub async fn commit(&self) -> Result<u64, BackendError> {
        Ok(match self {
            AnyCheckpointer::Embedded(c) => c.commit().await?,
            AnyCheckpointer::Kafka(c) => c.commit().await?,
            AnyCheckpointer::Sqs(_) => 0,
        })
    }
}

pub enum AnyDelivery {
    Embedded(EmbeddedDelivery),
    Kafka(KafkaDelivery),
    Sqs(SqsDelivery),
}

impl AnyDelivery {
    /// Ack at once where an ack only moves the consumer's watermark (the
    /// log, a topic), with no future to allocate; the delivery back where
    /// the ack is a call to make (SQS deletes the message).
    pub fn ack_now(self) -> Option<Self> {
        match self {
            AnyDelivery::Embedded(d) => d.ack_now(),
            AnyDelivery::Kafka(d) => d.ack_now(),
            sqs @ AnyDelivery::Sqs(_) => return Some(sqs),
        }
        None
    }
}

impl Delivery for AnyDelivery {
    fn entry(&self) -> &Arc<Entry> {
        match self {
            AnyDelivery::Embedded(d) => d.entry(),
            AnyDelivery::Kafka(d) => d.entry(),
            AnyDelivery::Sqs(d) => d.entry(),
        }
    }

    fn shard(&self) -> &ShardRef {
        match self {
            AnyDelivery::Embedded(d) => d.shard(),
            AnyDelivery::Kafka(d) => d.shard(),
            AnyDelivery::Sqs(d) => d.shard(),
        }
    }

    fn sequence(&self) -> u64 {
        match self {
            AnyDelivery::Embedded(d) => d.sequence(),
            AnyDelivery::Kafka(d) => d.sequence(),
            AnyDelivery::Sqs(d) => d.sequence(),
        }
    }

    async fn ack(self) -> Result<(), (BackendError, Self)> {
        match self {
            AnyDelivery::Embedded(d) => d
                .ack()
                .await
                .map_err(|(e, d)| (e, AnyDelivery::Embedded(d))),
            AnyDelivery::Kafka(d) => d.ack().await.map_err(|(e, d)| (e, AnyDelivery::Kafka(d))),
            AnyDelivery::Sqs(d) => d.ack().await.map_err(|(e, d)| (e, AnyDelivery::Sqs(d))),
        }
    }

    async fn nack(self) -> Result<(), (BackendError, Self)> {
        match self {
            AnyDelivery::Embedded(d) => d
                .nack()
                .await
                .map_err(|(e, d)| (e, AnyDelivery::Embedded(d))),
            AnyDelivery::Kafka(d) => d.nack().await.map_err(|(e, d)| (e, AnyDelivery::Kafka(d))),
            AnyDelivery::Sqs(d) => d.nack().await.map_err(|(e, d)| (e, AnyDelivery::Sqs(d))),
        }
    }
}

/// A namespace's dead-letter queue: the local one beside the embedded log,
/// the namespace's DLQ topic, or its DLQ queue.
#[derive(Clone)]
pub enum AnyDlq {
    Embedded(Arc<EmbeddedDlq>),
    Kafka(Arc<KafkaDlq>),
    Sqs(Arc<SqsDlq>),
}

impl AnyDlq {
    /// Where `hold_key` keeps its holds when they live on the broker (with
    /// the letters in a Kafka DLQ topic); `None`: in the local park store.
    pub fn key_holds(&self) -> Option<Arc<dyn super::KeyHolds>> {
        match self {
            AnyDlq::Kafka(d) => Some(d.clone()),
            AnyDlq::Embedded(_) | AnyDlq::Sqs(_) => None,
        }
    }

    /// A redrive puts the entry back on the broker itself (a partition or a
    /// queue), where whichever process reads it applies it; the local DLQ
    /// hands it to the shard's applier instead.
    pub fn redrives_to_broker(&self) -> bool {
        !matches!(self, AnyDlq::Embedded(_))
    }

    /// Put the letters `selection` picks back on their origin partitions or
    /// queues, with their sequences, keeping each key's order, and remove
    /// them. `shards` is the namespace's shard count.
    pub async fn redrive_on_broker(
        &self,
        namespace: &str,
        shards: u32,
        selection: &Selection,
    ) -> Result<RedriveReport, BackendError> {
        match self {
            AnyDlq::Kafka(d) => d.redrive_selected(namespace, shards, selection).await,
            AnyDlq::Sqs(d) => Ok(d.redrive_selected(namespace, selection).await?),
            AnyDlq::Embedded(_) => Err(BackendError::NotHere(
                "the local DLQ redrives through the shard's applier",
            )),
        }
    }

    /// Store a letter that holds `holds` (its key, with `hold_key`). Only
    /// the Kafka DLQ keeps the hold with the letter; the embedded log keeps
    /// holds in the park store, and SQS has none.
    pub async fn append_holding(
        &self,
        letter: DeadLetter,
        holds: Option<&str>,
    ) -> Result<u64, BackendError> {
        match self {
            AnyDlq::Kafka(d) => d.append_holding(letter, holds).await,
            _ => self.append(letter).await,
        }
    }

    /// The key `letter` holds (`hold_key` on Kafka), if it holds one.
    pub fn holds_key(&self, letter: &DeadLetter) -> Option<String> {
        match self {
            AnyDlq::Kafka(d) => d.holds_key(letter.dlq_sequence),
            _ => None,
        }
    }

    /// How many letters `namespace` has: exact, or SQS's estimate (counting
    /// an SQS queue exactly would mean receiving all of it).
    pub async fn count(&self, namespace: &str) -> Result<u64, BackendError> {
        match self {
            AnyDlq::Sqs(d) => Ok(d.queue().approximate_len().await?),
            _ => Ok(self.list(namespace, None, 0).await?.1 as u64),
        }
    }
}

impl DeadLetters for AnyDlq {
    async fn append(&self, letter: DeadLetter) -> Result<u64, BackendError> {
        match self {
            AnyDlq::Embedded(d) => d.append(letter).await,
            AnyDlq::Kafka(d) => d.append(letter).await,
            AnyDlq::Sqs(d) => d.append(letter).await,
        }
    }

    /// The local DLQ reads its log off the async worker.
    async fn list(
        &self,
        namespace: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, usize), BackendError> {
        match self {
            AnyDlq::Embedded(d) => {
                let (d, namespace) = (d.clone(), namespace.to_string());
                tokio::task::spawn_blocking(move || d.list_now(&namespace, after, limit))
                    .await
                    .expect("reading the DLQ does not panic")
            }
            AnyDlq::Kafka(d) => d.list(namespace, after, limit).await,
            AnyDlq::Sqs(d) => d.list(namespace, after, limit).await,
        }
    }

    async fn get(&self, namespace: &str, id: &str) -> Result<Vec<DeadLetter>, BackendError> {
        match self {
            AnyDlq::Embedded(d) => {
                let (d, namespace, id) = (d.clone(), namespace.to_string(), id.to_string());
                tokio::task::spawn_blocking(move || d.get_now(&namespace, &id))
                    .await
                    .expect("reading the DLQ does not panic")
            }
            AnyDlq::Kafka(d) => d.get(namespace, id).await,
            AnyDlq::Sqs(d) => d.get(namespace, id).await,
        }
    }

    async fn remove(
        &self,
        namespace: &str,
        dlq_sequence: u64,
        reason: &str,
    ) -> Result<bool, BackendError> {
        match self {
            AnyDlq::Embedded(d) => d.remove(namespace, dlq_sequence, reason).await,
            AnyDlq::Kafka(d) => d.remove(namespace, dlq_sequence, reason).await,
            AnyDlq::Sqs(d) => d.remove(namespace, dlq_sequence, reason).await,
        }
    }
}
