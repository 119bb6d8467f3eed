//! Sends entries to a namespace's topic, answering from the delivery report.

use rdkafka::ClientContext;
use rdkafka::bindings::{rd_kafka_message_status, rd_kafka_msg_status_t};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use tokio::sync::oneshot;

use super::{KafkaError, KafkaSettings, headers};
use crate::backends::{BackendError, Producer, Sent};
use crate::entry::{Durable, Entry, ShardRef, now_ms};

type Report = Result<i64, (rdkafka::error::KafkaError, Durable)>;

/// Routes each delivery report to the send waiting for it.
struct Reports;

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<oneshot::Sender<Report>>;

    fn delivery(&self, result: &DeliveryResult<'_>, waiter: Self::DeliveryOpaque) {
        let report = match result {
            Ok(msg) => Ok(msg.offset()),
            Err((e, msg)) => {
                // SAFETY: the message is valid for the length of this callback.
                let status = unsafe { rd_kafka_message_status(msg.ptr()) };
                let durable = match status {
                    rd_kafka_msg_status_t::RD_KAFKA_MSG_STATUS_NOT_PERSISTED => Durable::False,
                    // Persisted and yet failed, or possibly persisted: the
                    // broker may have it.
                    _ => Durable::Unknown,
                };
                Err((e.clone(), durable))
            }
        };
        // The send may have given up waiting; that is fine.
        let _ = waiter.send(report);
    }
}

/// Produces entries with `acks=all` and idempotence, one partition per shard.
#[derive(Clone)]
pub struct KafkaProducer {
    producer: std::sync::Arc<ThreadedProducer<Reports>>,
    topic: String,
    ack_timeout: std::time::Duration,
}

impl KafkaProducer {
    pub fn new(settings: &KafkaSettings) -> Result<Self, KafkaError> {
        let timeout = settings.ack_timeout.as_millis().max(1).to_string();
        let producer = settings
            .client_config(&[
                ("acks", "all"),
                ("enable.idempotence", "true"),
                // A send is answered within the server's ack timeout.
                ("message.timeout.ms", &timeout),
                ("linger.ms", "1"),
            ])
            .create_with_context(Reports)
            .map_err(|e| KafkaError::client("producer", &settings.topic, e))?;
        Ok(Self {
            producer: std::sync::Arc::new(producer),
            topic: settings.topic.clone(),
            ack_timeout: settings.ack_timeout,
        })
    }

    /// A producer to `topic` on the same client: one librdkafka instance (its
    /// threads and connections) serves every topic of a namespace.
    pub(crate) fn to_topic(&self, topic: &str) -> Self {
        Self {
            producer: self.producer.clone(),
            topic: topic.to_string(),
            ack_timeout: self.ack_timeout,
        }
    }

    /// Produce `entry` to `partition` (or where its key hashes, if `None`),
    /// with `extra` headers after the entry's; resolves with its offset and
    /// timestamp once the delivery report says it is written.
    pub(crate) async fn produce(
        &self,
        partition: Option<u32>,
        entry: &Entry,
        extra: &[(&str, String)],
    ) -> Result<(u64, u64), KafkaError> {
        let key = entry.key.as_deref().unwrap_or(&entry.id);
        self.produce_record(
            partition,
            key,
            Some(entry.payload.as_ref()),
            headers(entry, extra),
        )
        .await
    }

    /// Produce one record (`payload` `None`: a tombstone); resolves with its
    /// offset and timestamp from the delivery report.
    pub(crate) async fn produce_record(
        &self,
        partition: Option<u32>,
        key: &str,
        payload: Option<&[u8]>,
        headers: rdkafka::message::OwnedHeaders,
    ) -> Result<(u64, u64), KafkaError> {
        let (tx, rx) = oneshot::channel();
        let timestamp_ms = now_ms();
        let produce_error = |source, durable| KafkaError::Produce {
            topic: self.topic.clone(),
            partition,
            durable,
            source: Box::new(source),
        };
        let mut record = BaseRecord::with_opaque_to(&self.topic, Box::new(tx))
            .key(key)
            .headers(headers)
            .timestamp(timestamp_ms as i64);
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        if let Some(p) = partition {
            record = record.partition(p as i32);
        }
        if let Err((e, _)) = self.producer.send(record) {
            // Refused before it was queued (queue full, too large): never sent.
            return Err(produce_error(e, Durable::False));
        }
        // librdkafka can overrun `message.timeout.ms` while a connection is
        // being re-established, so the wait is bounded here too. Past it, the
        // message may still be written: the answer is "unknown".
        match tokio::time::timeout(self.ack_timeout, rx).await {
            Ok(Ok(Ok(offset))) => Ok((offset as u64, timestamp_ms)),
            Ok(Ok(Err((e, durable)))) => Err(produce_error(e, durable)),
            // The producer went away with the message queued.
            Ok(Err(_)) => Err(produce_error(
                rdkafka::error::KafkaError::Canceled,
                Durable::Unknown,
            )),
            Err(_) => Err(produce_error(
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::MessageTimedOut,
                ),
                Durable::Unknown,
            )),
        }
    }
}

impl Producer for KafkaProducer {
    async fn send(&self, shard: &ShardRef, entry: Entry) -> Result<Sent, BackendError> {
        let (sequence, _) = self.produce(Some(shard.shard), &entry, &[]).await?;
        Ok(Sent {
            sequence,
            durable: Durable::True,
        })
    }
}
