//! The Kafka backend (rdkafka, with its bundled librdkafka): the broker
//! carries durability, so producers and consumers can run as separate
//! processes that scale apart.
//!
//! # Mapping
//! - A namespace is one topic; shard `n` is partition `n` (so the topic has
//!   exactly `shards` partitions). Walden picks the partition from the entry's
//!   key, as on the embedded log; the key is also the Kafka key.
//! - An entry's sequence is its partition offset: it only grows, so targets
//!   can use it as a version.
//! - Headers carry Walden's fields (`walden.id`, `walden.due_ms`) beside the
//!   entry's own headers (`traceparent` among them).
//!
//! # Durability
//! The producer runs with `acks=all` and idempotence on, and a send resolves
//! only from its delivery report. `message.timeout.ms` is the server's ack
//! timeout, so a send never hangs: a failed report is `durable: "false"` when
//! librdkafka knows the broker never got the message, and `"unknown"` when it
//! might have.
//!
//! # Consuming
//! A shard consumer is assigned its one partition and starts at the group's
//! committed offset. It commits its low watermark (the first offset not yet
//! acked), which in Kafka terms is the next offset to read.

mod consumer;
mod delays;
mod dlq;
mod group;
mod producer;
mod replay;
mod sets;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::{ClientConfig, ClientContext};

pub use consumer::{KafkaCheckpointer, KafkaConsumer, KafkaDelivery};
pub use delays::{KafkaDelayTiers, TIERS};
pub use dlq::KafkaDlq;
pub(crate) use dlq::letter_from;
pub use group::{KafkaGroup, Membership, WaldenContext};
pub use producer::{KafkaProducer, KafkaTopic};
pub use replay::KafkaReplayLog;
pub use sets::KafkaSets;

use tracing::warn;

use crate::backends::Throttle;
use crate::entry::{Durable, Entry};

/// The context of a client with nothing of its own to handle (an admin
/// client). Its log is every Walden Kafka client's: see [`log`].
pub(crate) struct Logs;

impl ClientContext for Logs {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log(level, facility, message);
    }
}

/// librdkafka's log lines, forwarded as rdkafka does by default, except the
/// warning that an option does not apply to this kind of client: Walden
/// gives a namespace's `librdkafka` map to its producers, consumers and
/// admin clients alike, so that warning points at nothing wrong.
pub(crate) fn log(level: RDKafkaLogLevel, facility: &str, message: &str) {
    if is_option_for_other_clients(facility, message) {
        tracing::debug!(target: "librdkafka", "librdkafka: {facility} {message}");
        return;
    }
    DefaultClientContext.log(level, facility, message);
}

/// librdkafka's "Configuration property X is a consumer property and will be
/// ignored by this producer instance" (or the other way round).
fn is_option_for_other_clients(facility: &str, message: &str) -> bool {
    facility == "CONFWARN" && message.contains("property and will be ignored by this")
}

/// Where a namespace lives on Kafka.
#[derive(Clone, Debug)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    pub topic: String,
    /// Partitions of the topic: the namespace's shard count.
    pub partitions: u32,
    /// Extra librdkafka options, passed through unchanged (and applied last).
    pub librdkafka: BTreeMap<String, String>,
    /// The most a send may wait for its delivery report.
    pub ack_timeout: Duration,
}

impl KafkaSettings {
    /// The client settings of namespace `namespace` with `shards` shards.
    pub fn of(
        config: &crate::config::KafkaConfig,
        namespace: &str,
        shards: u32,
        ack_timeout: Duration,
    ) -> Self {
        Self {
            brokers: config.brokers.clone(),
            topic: config.topic(namespace),
            partitions: shards,
            librdkafka: config.librdkafka.clone(),
            ack_timeout,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("kafka {what} ({topic}): {source}")]
    Client {
        what: &'static str,
        topic: String,
        #[source]
        source: Box<rdkafka::error::KafkaError>,
    },
    /// A produce whose delivery report failed; `durable` says whether the
    /// broker may have the message anyway.
    #[error("kafka produce to {topic} (partition {partition:?}): {source}")]
    Produce {
        topic: String,
        /// `None`: the key's partition.
        partition: Option<u32>,
        durable: Durable,
        #[source]
        source: Box<rdkafka::error::KafkaError>,
    },
    #[error("kafka topic {topic}: {message}")]
    Topic { topic: String, message: String },
}

impl KafkaError {
    pub fn durable(&self) -> Durable {
        match self {
            KafkaError::Produce { durable, .. } => *durable,
            _ => Durable::False,
        }
    }

    /// The client's send queue is full (`queue.buffering.max.messages`):
    /// nothing was sent, and the writer should back off.
    pub fn is_queue_full(&self) -> bool {
        matches!(self, KafkaError::Produce { source, .. }
            if source.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull))
    }

    /// The broker refuses the record itself (too large, malformed): it
    /// can never be written.
    pub fn is_invalid(&self) -> bool {
        matches!(
            self.code(),
            Some(
                RDKafkaErrorCode::MessageSizeTooLarge
                    | RDKafkaErrorCode::InvalidMessage
                    | RDKafkaErrorCode::InvalidMessageSize
                    | RDKafkaErrorCode::InvalidRecord
            )
        )
    }

    /// The broker refuses this client the topic.
    pub fn is_unauthorized(&self) -> bool {
        self.code() == Some(RDKafkaErrorCode::TopicAuthorizationFailed)
    }

    fn code(&self) -> Option<RDKafkaErrorCode> {
        match self {
            KafkaError::Produce { source, .. } | KafkaError::Client { source, .. } => {
                source.rdkafka_error_code()
            }
            KafkaError::Topic { .. } => None,
        }
    }

    pub(crate) fn client(
        what: &'static str,
        topic: &str,
        source: rdkafka::error::KafkaError,
    ) -> Self {
        KafkaError::Client {
            what,
            topic: topic.to_string(),
            source: Box::new(source),
        }
    }
}

impl KafkaSettings {
    /// A client config with the brokers, then `base`, then the user's
    /// `librdkafka` options (which win).
    fn client_config(&self, base: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in base {
            c.set(*k, *v);
        }
        for (k, v) in &self.librdkafka {
            c.set(k, v);
        }
        c
    }

    fn admin(&self) -> Result<AdminClient<Logs>, KafkaError> {
        self.client_config(&[])
            .create_with_context(Logs)
            .map_err(|e| KafkaError::client("admin client", &self.topic, e))
    }

    /// Create the topic with `partitions` partitions if it does not exist;
    /// if it does, check that it has that many.
    pub async fn ensure_topic(&self) -> Result<(), KafkaError> {
        self.ensure_topic_with(&[]).await
    }

    /// [`Self::ensure_topic`], creating the topic with the topic configs
    /// `configs` (an existing topic keeps its own).
    pub async fn ensure_topic_with(&self, configs: &[(&str, &str)]) -> Result<(), KafkaError> {
        let admin = self.admin()?;
        let topic = configs.iter().fold(
            NewTopic::new(
                &self.topic,
                self.partitions as i32,
                TopicReplication::Fixed(1),
            ),
            |topic, (name, value)| topic.set(name, value),
        );
        let options = AdminOptions::new().operation_timeout(Some(self.ack_timeout));
        let results = admin
            .create_topics([&topic], &options)
            .await
            .map_err(|e| KafkaError::client("create topic", &self.topic, e))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(KafkaError::Topic {
                        topic: self.topic.clone(),
                        message: format!("cannot create it: {code}"),
                    });
                }
            }
        }
        let found = self.partition_count(&admin).await?;
        if found != self.partitions {
            return Err(KafkaError::Topic {
                topic: self.topic.clone(),
                message: format!(
                    "it has {found} partitions; the namespace has {} shards, and each shard is one partition",
                    self.partitions
                ),
            });
        }
        Ok(())
    }

    /// Whether the broker answers and knows the topic.
    pub async fn topic_exists(&self) -> Result<(), KafkaError> {
        let admin = self.admin()?;
        let (topic, timeout) = (self.topic.clone(), self.ack_timeout);
        tokio::task::spawn_blocking(move || {
            let md = admin
                .inner()
                .fetch_metadata(Some(&topic), timeout)
                .map_err(|e| KafkaError::client("metadata", &topic, e))?;
            match md.topics().first() {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
                _ => Err(KafkaError::Topic {
                    topic,
                    message: "the broker does not know it".into(),
                }),
            }
        })
        .await
        .map_err(|e| KafkaError::Topic {
            topic: self.topic.clone(),
            message: format!("the metadata call panicked: {e}"),
        })?
    }

    async fn partition_count(&self, admin: &AdminClient<Logs>) -> Result<u32, KafkaError> {
        let (client, topic, timeout) = (admin.inner(), self.topic.clone(), self.ack_timeout);
        // Metadata calls block; a newly created topic may take a moment to
        // show up, so look a few times.
        for _ in 0..20 {
            let md = client
                .fetch_metadata(Some(&topic), timeout)
                .map_err(|e| KafkaError::client("metadata", &topic, e))?;
            let n = md.topics().first().map_or(0, |t| t.partitions().len());
            if n > 0 {
                return Ok(n as u32);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(KafkaError::Topic {
            topic,
            message: "it has no partitions after creation".into(),
        })
    }
}

/// Drive `consumer` on the calling thread, on a runtime of its own, until
/// `stop`: each message goes to `on_message`. Errors are logged, throttled;
/// librdkafka retries them itself.
fn serve(
    consumer: &StreamConsumer<WaldenContext>,
    stop: &AtomicBool,
    topic: &str,
    what: &str,
    mut on_message: impl FnMut(BorrowedMessage<'_>),
) -> Option<String> {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            warn!(%topic, error = %e, "Cannot start the Kafka {what}.");
            return None;
        }
    };
    let mut error_log = Throttle::default();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let next = rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await
        });
        match next {
            Err(_) => {}
            Ok(Ok(msg)) => on_message(msg),
            Ok(Err(e)) => {
                // A fatal error (fenced out of a group) is not retried.
                if let Some((code, reason)) =
                    rdkafka::consumer::Consumer::client(consumer).fatal_error()
                {
                    return Some(format!("{code}: {reason}"));
                }
                if error_log.ready() {
                    warn!(%topic, error = %e, "Kafka {what} error; librdkafka retries.");
                }
            }
        }
    }
    None
}

/// The header that carries the entry id on every record Walden writes.
pub const ID: &str = "walden.id";
const DUE: &str = "walden.due_ms";
/// On a redriven entry: its sequence before it was dead-lettered. The
/// consumer delivers it with that sequence, so a target's version guard
/// still ranks it where it was first written.
const REDRIVEN_SEQUENCE: &str = "walden.redriven.sequence";

/// Kafka headers for an entry: Walden's fields, the entry's own, then `extra`.
/// The due time is left out when it is 0 (not delayed), its default.
fn headers(entry: &Entry, extra: &[(&str, String)]) -> OwnedHeaders {
    let mut h =
        OwnedHeaders::new_with_capacity(entry.headers.len() + extra.len() + 2).insert(Header {
            key: ID,
            value: Some(entry.id.as_bytes()),
        });
    if entry.due_ms > 0 {
        h = h.insert(Header {
            key: DUE,
            value: Some(entry.due_ms.to_string().as_bytes()),
        });
    }
    let own = entry.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    for (k, v) in own.chain(extra.iter().map(|(k, v)| (*k, v.as_str()))) {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    h
}

/// A record's headers, as (name, value) pairs.
fn pairs(
    headers: Option<&rdkafka::message::BorrowedHeaders>,
) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
    headers
        .into_iter()
        .flat_map(|hs| hs.iter())
        .map(|h| (h.key, h.value))
}

/// The entry inside a Kafka message. A message that Walden did not write
/// (no `walden.id`) gets an id from its position.
fn entry_of<'h>(
    topic: &str,
    partition: i32,
    offset: i64,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    headers: impl IntoIterator<Item = (&'h str, Option<&'h [u8]>)>,
    timestamp_ms: Option<i64>,
) -> Entry {
    let mut entry = Entry {
        id: String::new(),
        key: key.map(|k| String::from_utf8_lossy(k).into_owned()),
        headers: Vec::new(),
        payload: bytes::Bytes::copy_from_slice(payload.unwrap_or_default()),
        timestamp_ms: timestamp_ms.unwrap_or(0).max(0) as u64,
        due_ms: 0,
    };
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.unwrap_or_default()).into_owned();
        match name {
            ID => entry.id = value,
            DUE => entry.due_ms = value.parse().unwrap_or(0),
            k => entry.headers.push((k.to_string(), value)),
        }
    }
    if entry.id.is_empty() {
        entry.id = format!("{topic}-{partition}-{offset}");
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::is_option_for_other_clients;

    #[test]
    fn only_the_warning_about_another_kind_of_client_is_quieted() {
        // As librdkafka 2.12 words them.
        assert!(is_option_for_other_clients(
            "CONFWARN",
            "[thrd:app]: Configuration property session.timeout.ms is a consumer property and will be ignored by this producer instance"
        ));
        assert!(is_option_for_other_clients(
            "CONFWARN",
            "[thrd:app]: Configuration property acks is a producer property and will be ignored by this consumer instance"
        ));
        assert!(!is_option_for_other_clients(
            "CONFWARN",
            "[thrd:app]: Configuration property queue.buffering.max.ms is deprecated: use linger.ms"
        ));
        assert!(!is_option_for_other_clients(
            "FAIL",
            "property and will be ignored by this producer instance"
        ));
    }
}
