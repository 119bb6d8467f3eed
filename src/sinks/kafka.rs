//! `type = "kafka"`: deliver each entry to a topic, as the cross-region
//! replication persona needs (the other region's Walden, or anything else,
//! reads that topic).
//!
//! The Kafka key is the entry's key (its id when it has none), so a key keeps
//! its order within one partition of the target topic. The payload goes
//! unchanged; the headers are the entry's own (`traceparent` among them) plus
//! `walden.id`, `walden.due_ms`, `walden.namespace` and `walden.sequence`.
//! An entry counts as applied once its delivery report says it is written
//! (`acks=all`, idempotent producer). Walden does not create the target
//! topic: until it exists, deliveries fail and are retried.
//!
//! Errors: an answer that retrying cannot change (the message is too large,
//! the topic is not authorized, the message is invalid) is permanent; the
//! rest (broker down, timeouts, unknown topic) are transient.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::future::{BoxFuture, join_all};
use rdkafka::error::RDKafkaErrorCode;

use super::{ApplyResult, Outcome, Sink, SinkError};
use crate::backends::kafka::{KafkaError, KafkaProducer, KafkaSettings};
use crate::entry::Delivered;

pub struct KafkaSink {
    name: String,
    settings: KafkaSettings,
    producer: KafkaProducer,
}

impl KafkaSink {
    pub fn new(
        name: &str,
        brokers: &str,
        topic: &str,
        librdkafka: &BTreeMap<String, String>,
        timeout: Duration,
    ) -> Result<Self, SinkError> {
        let settings = KafkaSettings {
            brokers: brokers.into(),
            topic: topic.into(),
            // Unused: the target topic is the user's, with its own layout.
            partitions: 0,
            librdkafka: librdkafka.clone(),
            ack_timeout: timeout,
        };
        // Creating a producer checks the options; it does not connect.
        let producer = KafkaProducer::new(&settings)
            .map_err(|e| SinkError::permanent(name, format!("kafka producer: {e}")))?;
        Ok(Self {
            name: name.into(),
            settings,
            producer,
        })
    }

    fn classify(&self, e: &KafkaError) -> SinkError {
        let code = match e {
            KafkaError::Produce { source, .. } | KafkaError::Client { source, .. } => {
                source.rdkafka_error_code()
            }
            KafkaError::Topic { .. } => None,
        };
        let permanent = matches!(
            code,
            Some(
                RDKafkaErrorCode::MessageSizeTooLarge
                    | RDKafkaErrorCode::InvalidMessage
                    | RDKafkaErrorCode::InvalidMessageSize
                    | RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::InvalidRecord
            )
        );
        if permanent {
            SinkError::permanent(&self.name, e.to_string())
        } else {
            SinkError::transient(&self.name, e.to_string())
        }
    }

    async fn deliver(&self, d: &Delivered) -> ApplyResult {
        let extra = [
            ("walden.namespace", d.shard.namespace.to_string()),
            ("walden.sequence", d.sequence.to_string()),
        ];
        match self.producer.produce(None, &d.entry, &extra).await {
            Ok(_) => Ok(Outcome::Applied),
            Err(e) => Err(self.classify(&e)),
        }
    }
}

impl Sink for KafkaSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn apply<'a>(&'a self, batch: &'a [Delivered]) -> BoxFuture<'a, Vec<ApplyResult>> {
        // One entry per key in a batch: they may be in flight together.
        Box::pin(join_all(batch.iter().map(|d| self.deliver(d))))
    }

    fn healthcheck(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            self.settings
                .topic_exists()
                .await
                .map_err(|e| self.classify(&e))
        })
    }
}
