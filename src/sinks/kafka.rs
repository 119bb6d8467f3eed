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
//! With `transactions = true`, a set of mutations is produced in one
//! transaction (committed whole or aborted), so `read_committed` readers
//! see all of it or none; the transactional id is
//! `walden-<process and namespace>-<target>`. Without, a set's mutations go
//! one after another, in order.
//!
//! Errors: an answer that retrying cannot change (the message is too large,
//! the topic is not authorized, the message is invalid) is permanent; the
//! rest (broker down, timeouts, unknown topic) are transient.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::future::{BoxFuture, join_all};

use super::{ApplyResult, Outcome, Sink, SinkError};
use crate::backends::{self, BackendError, Topic, TopicAddress};
use crate::entry::Delivered;

pub struct KafkaSink {
    name: String,
    topic: Box<dyn Topic>,
}

impl KafkaSink {
    pub fn new(
        name: &str,
        brokers: &str,
        topic: &str,
        librdkafka: &BTreeMap<String, String>,
        timeout: Duration,
        transactional_id: Option<String>,
    ) -> Result<Self, SinkError> {
        let topic = backends::open_topic(TopicAddress {
            brokers,
            topic,
            options: librdkafka,
            timeout,
            transactional_id,
        })
        .map_err(|e| SinkError::permanent(name, format!("kafka producer: {e}")))?;
        Ok(Self {
            name: name.into(),
            topic,
        })
    }

    fn classify(&self, e: &BackendError) -> SinkError {
        if e.is_permanent() {
            SinkError::permanent(&self.name, e.to_string())
        } else {
            SinkError::transient(&self.name, e.to_string())
        }
    }

    async fn deliver(&self, d: &Delivered) -> ApplyResult {
        match self.topic.publish(&d.entry, &extra(d)).await {
            Ok(()) => Ok(Outcome::Applied),
            Err(e) => Err(self.classify(&e)),
        }
    }
}

/// The headers a delivered entry carries to the topic beside its own.
fn extra(d: &Delivered) -> Vec<(&'static str, String)> {
    vec![
        ("walden.namespace", d.shard.namespace.to_string()),
        ("walden.sequence", d.sequence.to_string()),
    ]
}

impl Sink for KafkaSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn concurrent_entries(&self) -> bool {
        true
    }

    fn apply<'a>(&'a self, batch: &'a [Delivered]) -> BoxFuture<'a, Vec<ApplyResult>> {
        // One entry per key in a batch: they may be in flight together.
        Box::pin(join_all(batch.iter().map(|d| self.deliver(d))))
    }

    /// In one transaction with `transactions = true`; else in order.
    fn apply_set<'a>(&'a self, set: &'a [Delivered]) -> BoxFuture<'a, Result<Outcome, SinkError>> {
        Box::pin(async move {
            let entries: Vec<_> = set.iter().map(|d| (&*d.entry, extra(d))).collect();
            match self.topic.publish_all(&entries).await {
                Ok(()) => Ok(Outcome::Applied),
                Err(e) => Err(self.classify(&e)),
            }
        })
    }

    fn healthcheck(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move { self.topic.check().await.map_err(|e| self.classify(&e)) })
    }
}
