//! One namespace's backend as the actors see it: the same write path, shard
//! consumers, deliveries and checkpoints whatever the backend. An enum per
//! role keeps the actors free of generics; each arm only forwards.

use std::sync::Arc;
use std::time::Duration;

use super::embedded::{
    AppendReply, Appended, EmbeddedCheckpointer, EmbeddedConsumer, EmbeddedDelivery, EmbeddedDlq,
    EmbeddedLog,
};
use super::kafka::{
    KafkaCheckpointer, KafkaConsumer, KafkaDelivery, KafkaDlq, KafkaGroup, KafkaProducer,
};
use super::{BackendError, Consumer, DeadLetter, DeadLetters, Delivery};
use crate::entry::{Entry, ShardRef};

/// Where the answer to a write goes.
pub type WriteReply = tokio::sync::oneshot::Sender<Result<Appended, BackendError>>;

/// Where a namespace's entries live.
#[derive(Clone)]
pub enum NamespaceBackend {
    Embedded(Arc<EmbeddedLog>),
    Kafka {
        /// `None` in a consumer-only process.
        producer: Option<KafkaProducer>,
        /// This process's membership in the namespace's consumer group;
        /// `None` in a producer-only process.
        group: Option<Arc<KafkaGroup>>,
        /// Memberships in the delay tiers' groups (consumer processes).
        delay_groups: Vec<Arc<KafkaGroup>>,
    },
}

impl NamespaceBackend {
    pub fn kind(&self) -> &'static str {
        match self {
            NamespaceBackend::Embedded(_) => "embedded",
            NamespaceBackend::Kafka { .. } => "kafka",
        }
    }

    /// The backend's client queues writes itself and is safe to call from
    /// any thread (librdkafka), so the HTTP worker hands entries straight
    /// to it: a hop through the shard's Ingest actor would add two thread
    /// wakeups per write and nothing else. Load is still shed by
    /// `server.max_in_flight`, and by the client's own queue limit.
    pub fn queues_writes_itself(&self) -> bool {
        matches!(self, NamespaceBackend::Kafka { .. })
    }

    /// Append entries to `shard`; each answer goes to its own reply once
    /// the backend has made that entry durable (or failed to).
    pub fn append_all(&self, shard: &ShardRef, writes: Vec<(Entry, WriteReply)>) {
        match self {
            NamespaceBackend::Embedded(log) => {
                for (entry, tx) in writes {
                    log.append_to(shard, entry, AppendReply::Backend(tx));
                }
            }
            NamespaceBackend::Kafka { producer, .. } => {
                let Some(producer) = producer.clone() else {
                    for (_, tx) in writes {
                        let _ = tx.send(Err(BackendError::NotHere(
                            "this process does not accept writes (--role consumer)",
                        )));
                    }
                    return;
                };
                // Each write is answered from its delivery report.
                for (entry, tx) in writes {
                    producer.write(shard.shard, &entry, tx);
                }
            }
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
            NamespaceBackend::Kafka {
                group: Some(member),
                ..
            } => AnyConsumer::Kafka(member.shard_consumer(shard).await?),
            NamespaceBackend::Kafka { group: None, .. } => {
                return Err(BackendError::NotHere(
                    "this process does not consume (--role producer)",
                ));
            }
        })
    }
}

pub enum AnyConsumer {
    Embedded(EmbeddedConsumer),
    Kafka(KafkaConsumer),
}

impl AnyConsumer {
    pub fn checkpointer(&self) -> AnyCheckpointer {
        match self {
            AnyConsumer::Embedded(c) => AnyCheckpointer::Embedded(c.checkpointer()),
            AnyConsumer::Kafka(c) => AnyCheckpointer::Kafka(c.checkpointer()),
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
        })
    }

    async fn commit(&mut self) -> Result<(), BackendError> {
        match self {
            AnyConsumer::Embedded(c) => c.commit().await,
            AnyConsumer::Kafka(c) => c.commit().await,
        }
    }
}

/// Commits a shard consumer's progress while it reads.
#[derive(Clone)]
pub enum AnyCheckpointer {
    Embedded(EmbeddedCheckpointer),
    Kafka(KafkaCheckpointer),
}

impl AnyCheckpointer {
    pub fn low_watermark(&self) -> u64 {
        match self {
            AnyCheckpointer::Embedded(c) => c.low_watermark(),
            AnyCheckpointer::Kafka(c) => c.low_watermark(),
        }
    }

    pub fn outstanding(&self) -> usize {
        match self {
            AnyCheckpointer::Embedded(c) => c.outstanding(),
            AnyCheckpointer::Kafka(c) => c.outstanding(),
        }
    }

    pub fn oldest_outstanding_ms(&self) -> Option<u64> {
        match self {
            AnyCheckpointer::Embedded(c) => c.oldest_outstanding_ms(),
            AnyCheckpointer::Kafka(c) => c.oldest_outstanding_ms(),
        }
    }

    pub fn committed(&self) -> Option<u64> {
        match self {
            AnyCheckpointer::Embedded(c) => c.committed(),
            AnyCheckpointer::Kafka(c) => c.committed(),
        }
    }

    /// Commit the low watermark; returns it.
    pub async fn commit(&self) -> Result<u64, BackendError> {
        Ok(match self {
            AnyCheckpointer::Embedded(c) => c.commit().await?,
            AnyCheckpointer::Kafka(c) => c.commit().await?,
        })
    }
}

pub enum AnyDelivery {
    Embedded(EmbeddedDelivery),
    Kafka(KafkaDelivery),
}

impl Delivery for AnyDelivery {
    fn entry(&self) -> &Entry {
        match self {
            AnyDelivery::Embedded(d) => d.entry(),
            AnyDelivery::Kafka(d) => d.entry(),
        }
    }

    fn shard(&self) -> &ShardRef {
        match self {
            AnyDelivery::Embedded(d) => d.shard(),
            AnyDelivery::Kafka(d) => d.shard(),
        }
    }

    fn sequence(&self) -> u64 {
        match self {
            AnyDelivery::Embedded(d) => d.sequence(),
            AnyDelivery::Kafka(d) => d.sequence(),
        }
    }

    async fn ack(self) -> Result<(), (BackendError, Self)> {
        match self {
            AnyDelivery::Embedded(d) => d
                .ack()
                .await
                .map_err(|(e, d)| (e, AnyDelivery::Embedded(d))),
            AnyDelivery::Kafka(d) => d.ack().await.map_err(|(e, d)| (e, AnyDelivery::Kafka(d))),
        }
    }

    async fn nack(self) -> Result<(), (BackendError, Self)> {
        match self {
            AnyDelivery::Embedded(d) => d
                .nack()
                .await
                .map_err(|(e, d)| (e, AnyDelivery::Embedded(d))),
            AnyDelivery::Kafka(d) => d.nack().await.map_err(|(e, d)| (e, AnyDelivery::Kafka(d))),
        }
    }
}

/// A namespace's dead-letter queue: the local one beside the embedded log,
/// or the namespace's DLQ topic.
#[derive(Clone)]
pub enum AnyDlq {
    Embedded(Arc<EmbeddedDlq>),
    Kafka(Arc<KafkaDlq>),
}

impl DeadLetters for AnyDlq {
    async fn append(&self, letter: DeadLetter) -> Result<u64, BackendError> {
        match self {
            AnyDlq::Embedded(d) => d.append(letter).await,
            AnyDlq::Kafka(d) => d.append(letter).await,
        }
    }

    fn list(
        &self,
        namespace: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, usize), BackendError> {
        match self {
            AnyDlq::Embedded(d) => d.list(namespace, after, limit),
            AnyDlq::Kafka(d) => d.list(namespace, after, limit),
        }
    }

    fn get(&self, namespace: &str, id: &str) -> Result<Option<DeadLetter>, BackendError> {
        match self {
            AnyDlq::Embedded(d) => d.get(namespace, id),
            AnyDlq::Kafka(d) => d.get(namespace, id),
        }
    }

    async fn remove(&self, namespace: &str, id: &str, reason: &str) -> Result<bool, BackendError> {
        match self {
            AnyDlq::Embedded(d) => d.remove(namespace, id, reason).await,
            AnyDlq::Kafka(d) => d.remove(namespace, id, reason).await,
        }
    }
}
