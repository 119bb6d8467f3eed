//! Reads one shard (one partition) for a consumer group, and commits the low
//! watermark.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

use super::{KafkaError, KafkaSettings, entry_of};
use crate::backends::tracker::Tracker;
use crate::backends::{BackendError, Consumer, Delivery};
use crate::entry::{Entry, ShardRef};

/// An entry read from the partition, and its offset.
#[derive(Clone, Debug)]
struct Received {
    offset: u64,
    entry: Entry,
}

pub struct KafkaConsumer {
    consumer: Arc<StreamConsumer>,
    topic: String,
    shard: ShardRef,
    tracker: Arc<Mutex<Tracker<Received>>>,
    checkpointer: KafkaCheckpointer,
    last_error_log: Option<std::time::Instant>,
}

const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// Commits a consumer's progress without holding the consumer, so a commit
/// can run while a receive waits.
#[derive(Clone)]
pub struct KafkaCheckpointer {
    consumer: Arc<StreamConsumer>,
    topic: String,
    partition: i32,
    tracker: Arc<Mutex<Tracker<Received>>>,
    /// The offset last committed (or found at start).
    committed: Arc<Mutex<Option<u64>>>,
}

impl KafkaCheckpointer {
    /// Everything before this offset has been acked.
    pub fn low_watermark(&self) -> u64 {
        self.tracker.lock().unwrap().low_watermark()
    }

    pub fn outstanding(&self) -> usize {
        self.tracker.lock().unwrap().outstanding()
    }

    pub fn oldest_outstanding_ms(&self) -> Option<u64> {
        self.tracker.lock().unwrap().oldest_outstanding_ms()
    }

    /// The group's committed offset, as this consumer knows it.
    pub fn committed(&self) -> Option<u64> {
        *self.committed.lock().unwrap()
    }

    /// Commit the low watermark (the next offset to read, in Kafka's terms);
    /// returns it.
    pub async fn commit(&self) -> Result<u64, KafkaError> {
        let offset = self.low_watermark();
        if self.committed() == Some(offset) {
            return Ok(offset);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, self.partition, Offset::Offset(offset as i64))
            .map_err(|e| KafkaError::client("commit", &self.topic, e))?;
        let (c, topic) = (self.consumer.clone(), self.topic.clone());
        tokio::task::spawn_blocking(move || {
            c.commit(&tpl, CommitMode::Sync)
                .map_err(|e| KafkaError::client("commit", &topic, e))
        })
        .await
        .map_err(|e| KafkaError::Topic {
            topic: self.topic.clone(),
            message: format!("the commit panicked: {e}"),
        })??;
        *self.committed.lock().unwrap() = Some(offset);
        Ok(offset)
    }
}

impl KafkaConsumer {
    /// Read `shard`'s partition for `group`, from the group's committed
    /// offset (or the start of the partition).
    pub async fn new(
        settings: &KafkaSettings,
        group: &str,
        shard: &ShardRef,
    ) -> Result<Self, KafkaError> {
        let topic = settings.topic.clone();
        let consumer: StreamConsumer = settings
            .client_config(&[
                ("group.id", group),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
            ])
            .create()
            .map_err(|e| KafkaError::client("consumer", &topic, e))?;
        let consumer = Arc::new(consumer);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&topic, shard.shard as i32);
        // Blocking calls: the group's committed offset, then the assignment.
        let (c, t, timeout) = (consumer.clone(), topic.clone(), settings.ack_timeout);
        let committed = tokio::task::spawn_blocking(move || {
            let found = c
                .committed_offsets(tpl, timeout)
                .map_err(|e| KafkaError::client("committed offsets", &t, e))?;
            let committed = match found.elements().first().map(|e| e.offset()) {
                Some(Offset::Offset(o)) if o >= 0 => Some(o as u64),
                _ => None,
            };
            let mut assign = TopicPartitionList::new();
            let from = committed.map_or(Offset::Beginning, |o| Offset::Offset(o as i64));
            assign
                .add_partition_offset(&t, found.elements()[0].partition(), from)
                .map_err(|e| KafkaError::client("assign", &t, e))?;
            c.assign(&assign)
                .map_err(|e| KafkaError::client("assign", &t, e))?;
            Ok::<_, KafkaError>(committed)
        })
        .await
        .map_err(|e| KafkaError::Topic {
            topic: topic.clone(),
            message: format!("setting up the consumer panicked: {e}"),
        })??;
        let tracker = Arc::new(Mutex::new(Tracker::starting_at(committed.unwrap_or(0))));
        let checkpointer = KafkaCheckpointer {
            consumer: consumer.clone(),
            topic: topic.clone(),
            partition: shard.shard as i32,
            tracker: tracker.clone(),
            committed: Arc::new(Mutex::new(committed)),
        };
        Ok(Self {
            consumer,
            topic,
            shard: shard.clone(),
            tracker,
            checkpointer,
            last_error_log: None,
        })
    }

    /// Everything before this offset has been acked.
    pub fn low_watermark(&self) -> u64 {
        self.tracker.lock().unwrap().low_watermark()
    }

    /// A handle that commits this consumer's progress.
    pub fn checkpointer(&self) -> KafkaCheckpointer {
        self.checkpointer.clone()
    }

    fn received(&self, msg: &rdkafka::message::BorrowedMessage<'_>) -> Received {
        let offset = msg.offset();
        let entry = entry_of(
            &self.topic,
            msg.partition(),
            offset,
            msg.key(),
            msg.payload(),
            msg.headers(),
            msg.timestamp().to_millis(),
        );
        Received {
            offset: offset as u64,
            entry,
        }
    }

    /// Log a consumer error: at most one per `ERROR_LOG_EVERY`, since a broker
    /// outage makes librdkafka report one per reconnect attempt.
    fn transient(&mut self, e: &rdkafka::error::KafkaError) {
        let now = std::time::Instant::now();
        if self
            .last_error_log
            .is_none_or(|t| now.duration_since(t) >= ERROR_LOG_EVERY)
        {
            self.last_error_log = Some(now);
            warn!(topic = %self.topic, partition = self.shard.shard, error = %e, "Kafka consumer error; librdkafka retries.");
        }
    }

    fn delivery(&self, r: Received) -> KafkaDelivery {
        KafkaDelivery {
            shard: self.shard.clone(),
            received: r,
            tracker: self.tracker.clone(),
        }
    }
}

impl Consumer for KafkaConsumer {
    type Delivery = KafkaDelivery;

    async fn receive(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<KafkaDelivery>, BackendError> {
        let redelivered = self.tracker.lock().unwrap().take_redeliveries(max);
        if !redelivered.is_empty() {
            return Ok(redelivered.into_iter().map(|r| self.delivery(r)).collect());
        }
        // librdkafka reports connection trouble as consumer errors and
        // recovers on its own; they are logged, never a failed read (which
        // would make the shard back off).
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out: Vec<Received> = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Err(_) => return Ok(Vec::new()),
                Ok(Ok(msg)) => {
                    out.push(self.received(&msg));
                    break;
                }
                Ok(Err(e)) => self.transient(&e),
            }
        }
        // Then whatever is already fetched, without waiting. An error here
        // ends the batch; the messages already taken must still go out, or
        // the watermark would pass them.
        while out.len() < max {
            match self.consumer.recv().now_or_never() {
                Some(Ok(msg)) => out.push(self.received(&msg)),
                Some(Err(e)) => {
                    self.transient(&e);
                    break;
                }
                None => break,
            }
        }
        let end = out.last().map_or(0, |r| r.offset + 1);
        let delivered = out.iter().map(|r| (r.offset, r.entry.timestamp_ms));
        self.tracker.lock().unwrap().delivered(delivered, end);
        Ok(out.into_iter().map(|r| self.delivery(r)).collect())
    }

    async fn commit(&mut self) -> Result<(), BackendError> {
        self.checkpointer.commit().await?;
        Ok(())
    }
}

/// One message delivered by a [`KafkaConsumer`].
pub struct KafkaDelivery {
    shard: ShardRef,
    received: Received,
    tracker: Arc<Mutex<Tracker<Received>>>,
}

impl Delivery for KafkaDelivery {
    fn entry(&self) -> &Entry {
        &self.received.entry
    }

    fn shard(&self) -> &ShardRef {
        &self.shard
    }

    fn sequence(&self) -> u64 {
        self.received.offset
    }

    async fn ack(self) -> Result<(), (BackendError, Self)> {
        self.tracker.lock().unwrap().ack(self.received.offset);
        Ok(())
    }

    async fn nack(self) -> Result<(), (BackendError, Self)> {
        // Still outstanding: the watermark stays behind it until it is acked.
        self.tracker.lock().unwrap().nack(self.received);
        Ok(())
    }
}
