//! Reads one shard (one partition) for a consumer group, and commits the low
//! watermark. Two ways to get the partition: assigned by hand (every shard
//! its own client: the conformance suite, and tools), or as a member of the
//! namespace's group ([`KafkaGroup`](super::KafkaGroup)), where Kafka decides
//! which process owns which partition.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

use super::group::{
    KafkaGroup, Received, Slot, WaldenContext, commit, committed_offset, worth_committing,
};
use super::{KafkaDlq, KafkaError, KafkaSettings, REDRIVEN_SEQUENCE, entry_of, pairs};
use crate::backends::Throttle;
use crate::backends::tracker::Tracker;
use crate::backends::{BackendError, Consumer, Delivery};
use crate::entry::{Entry, ShardRef};

type Client = StreamConsumer<WaldenContext>;

/// Where a shard's messages come from.
enum Source {
    /// Its own client, assigned the partition for good.
    Assigned(Arc<Client>),
    /// The partition's queue, split off the group consumer.
    Group(Arc<StreamPartitionQueue<WaldenContext>>),
}

pub struct KafkaConsumer {
    source: Source,
    topic: String,
    shard: ShardRef,
    slot: Arc<Slot>,
    checkpointer: KafkaCheckpointer,
    error_log: Throttle,
    /// A group shard opened again (a rewind) starts over at the committed
    /// offset. Done at its first receive, not at open: a read of the
    /// consumer it replaces may still be taking messages off the shared
    /// partition queue until then.
    rewind: bool,
    /// With `hold_key`: the DLQ to catch up before reading a new assignment.
    pub(super) holds: Option<Arc<KafkaDlq>>,
    /// The assignment (epoch) the DLQ view last caught up for.
    holds_epoch: Option<u64>,
}

const SEEK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a shard whose partition this process does not own (or cannot
/// seek yet) waits per receive.
const UNOWNED_WAIT: Duration = Duration::from_millis(100);

/// Commits a consumer's progress without holding the consumer, so a commit
/// can run while a receive waits. It never commits a partition this process
/// does not own (or is giving up).
#[derive(Clone)]
pub struct KafkaCheckpointer {
    client: Arc<Client>,
    topic: String,
    partition: i32,
    slot: Arc<Slot>,
}

impl KafkaCheckpointer {
    /// Everything before this offset has been acked.
    pub fn low_watermark(&self) -> u64 {
        self.slot.tracker.lock().unwrap().low_watermark()
    }

    pub fn outstanding(&self) -> usize {
        self.slot.tracker.lock().unwrap().outstanding()
    }

    pub fn outstanding_bytes(&self) -> usize {
        self.slot.tracker.lock().unwrap().outstanding_bytes()
    }

    pub fn oldest_outstanding_ms(&self) -> Option<u64> {
        self.slot.tracker.lock().unwrap().oldest_outstanding_ms()
    }

    /// The group's committed offset, as this process knows it.
    pub fn committed(&self) -> Option<u64> {
        self.slot.state.lock().unwrap().committed
    }

    /// The partition's end (its high watermark) when last reported.
    pub fn end_offset(&self) -> Option<u64> {
        self.slot.state.lock().unwrap().end
    }

    /// Commit the low watermark (the next offset to read, in Kafka's terms);
    /// returns it. Skipped, not failed, when the partition is not ours.
    pub async fn commit(&self) -> Result<u64, KafkaError> {
        let (offset, read_any) = {
            let t = self.slot.tracker.lock().unwrap();
            (t.low_watermark(), t.any_delivered())
        };
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            // Held across the commit, so a revoke cannot fence in between;
            // while it drains, the revoke commits.
            let mut st = this.slot.state.lock().unwrap();
            if st.draining || !worth_committing(&st, offset, read_any) {
                return Ok(offset);
            }
            commit(this.client.as_ref(), &this.topic, this.partition, offset)?;
            st.committed = Some(offset);
            Ok(offset)
        })
        .await
        .map_err(|e| KafkaError::Topic {
            topic: self.topic.clone(),
            message: format!("the commit panicked: {e}"),
        })?
    }
}

impl KafkaConsumer {
    /// Read `shard`'s partition for `group` with a client of its own, from
    /// the group's committed offset (or the start of the partition).
    pub async fn new(
        settings: &KafkaSettings,
        group: &str,
        shard: &ShardRef,
    ) -> Result<Self, KafkaError> {
        let topic = settings.topic.clone();
        let client: Client = settings
            .client_config(&[
                ("group.id", group),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
            ])
            .create_with_context(WaldenContext::assigned())
            .map_err(|e| KafkaError::client("consumer", &topic, e))?;
        let client = Arc::new(client);
        let partition = shard.shard as i32;
        // Blocking calls: the group's committed offset, then the assignment.
        let (c, t, timeout) = (client.clone(), topic.clone(), settings.ack_timeout);
        let committed = tokio::task::spawn_blocking(move || {
            let committed = committed_offset(c.as_ref(), &t, partition, timeout);
            let mut assign = TopicPartitionList::new();
            let from = committed.map_or(Offset::Beginning, |o| Offset::Offset(o as i64));
            assign
                .add_partition_offset(&t, partition, from)
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
        let slot = Slot::owned(committed);
        Ok(Self::with(
            Source::Assigned(client.clone()),
            client,
            slot,
            &topic,
            shard,
        ))
    }

    fn with(
        source: Source,
        client: Arc<Client>,
        slot: Arc<Slot>,
        topic: &str,
        shard: &ShardRef,
    ) -> Self {
        let checkpointer = KafkaCheckpointer {
            client,
            topic: topic.to_string(),
            partition: shard.shard as i32,
            slot: slot.clone(),
        };
        Self {
            source,
            topic: topic.to_string(),
            shard: shard.clone(),
            slot,
            checkpointer,
            error_log: Throttle::default(),
            rewind: false,
            holds: None,
            holds_epoch: None,
        }
    }

    /// Fetch the partition again from the committed offset, and restart the
    /// tracker there; reads begun before belong to the old position. False if
    /// the seek failed: the tracker is left alone (restarting it without the
    /// seek would let the watermark pass messages never handed out).
    ///
    /// False too while the partition is not owned: the rewind waits for the
    /// next assign. A batch dropped across a revoke may have taken messages
    /// off the queue that the reassigned fetch does not bring back, so the
    /// seek is made even after an assign.
    async fn rewind_to_committed(&self) -> bool {
        let from = {
            let st = self.slot.state.lock().unwrap();
            if !st.owned || st.draining {
                return false;
            }
            st.committed.unwrap_or(0)
        };
        let (c, topic, p) = (
            self.checkpointer.client.clone(),
            self.topic.clone(),
            self.shard.shard as i32,
        );
        let seek = tokio::task::spawn_blocking(move || {
            c.seek(&topic, p, Offset::Offset(from as i64), SEEK_TIMEOUT)
        })
        .await;
        match seek {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(topic = %self.topic, partition = p, error = %e, "Seek to the committed offset failed; will retry.");
                return false;
            }
            Err(_) => return false,
        }
        *self.slot.tracker.lock().unwrap() = Tracker::starting_at(from);
        self.slot.state.lock().unwrap().epoch += 1;
        true
    }

    /// Everything before this offset has been acked.
    pub fn low_watermark(&self) -> u64 {
        self.slot.tracker.lock().unwrap().low_watermark()
    }

    /// A handle that commits this consumer's progress.
    pub fn checkpointer(&self) -> KafkaCheckpointer {
        self.checkpointer.clone()
    }

    fn received(&self, msg: &BorrowedMessage<'_>) -> Received {
        let offset = msg.offset();
        let mut entry = entry_of(
            &self.topic,
            msg.partition(),
            offset,
            msg.key(),
            msg.payload(),
            pairs(msg.headers()),
            msg.timestamp().to_millis(),
        );
        let mut sequence = offset as u64;
        if let Some(i) = entry
            .headers
            .iter()
            .position(|(k, _)| k == REDRIVEN_SEQUENCE)
        {
            let (_, original) = entry.headers.remove(i);
            sequence = original.parse().unwrap_or(sequence);
        }
        Received {
            offset: offset as u64,
            sequence,
            entry: entry.into(),
        }
    }

    /// Log a consumer error, throttled.
    fn transient(&mut self, e: &rdkafka::error::KafkaError) {
        if self.error_log.ready() {
            warn!(topic = %self.topic, partition = self.shard.shard, error = %e, "Kafka consumer error; librdkafka retries.");
        }
    }

    async fn next(&self) -> Result<BorrowedMessage<'_>, rdkafka::error::KafkaError> {
        match &self.source {
            Source::Assigned(c) => c.recv().await,
            Source::Group(q) => q.recv().await,
        }
    }

    fn next_now(&self) -> Option<Result<BorrowedMessage<'_>, rdkafka::error::KafkaError>> {
        match &self.source {
            Source::Assigned(c) => c.recv().now_or_never(),
            Source::Group(q) => q.recv().now_or_never(),
        }
    }

    /// Wait up to `timeout` for messages; at most `max`.
    async fn read(&mut self, max: usize, timeout: Duration) -> Vec<Received> {
        // librdkafka reports connection trouble as consumer errors and
        // recovers on its own; they are logged, never a failed read (which
        // would make the shard back off).
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::new();
        let mut errors = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Err(_) => break,
                Ok(Ok(msg)) => {
                    out.push(self.received(&msg));
                    break;
                }
                Ok(Err(e)) => errors.push(e),
            }
            for e in errors.drain(..) {
                self.transient(&e);
            }
        }
        // Then whatever is already fetched, without waiting. An error ends
        // the batch; what was taken before it still goes out.
        while !out.is_empty() && out.len() < max {
            match self.next_now() {
                Some(Ok(msg)) => out.push(self.received(&msg)),
                Some(Err(e)) => {
                    errors.push(e);
                    break;
                }
                None => break,
            }
        }
        for e in errors.drain(..) {
            self.transient(&e);
        }
        out
    }
}

/// A group member hands out the consumer of each of its shards.
impl KafkaGroup {
    /// The consumer of one shard (partition): it reads only while this
    /// process owns the partition. Opened again after a rewind (an actor
    /// restarted and lost its work), it starts over at the committed offset
    /// (at its first receive).
    pub async fn shard_consumer(&self, shard: &ShardRef) -> Result<KafkaConsumer, KafkaError> {
        let share = self.share(shard)?;
        let mut c = KafkaConsumer::with(
            Source::Group(share.queue),
            share.client,
            share.slot,
            &share.topic,
            shard,
        );
        c.rewind = true;
        c.holds = share.holds;
        Ok(c)
    }
}

impl Consumer for KafkaConsumer {
    type Delivery = KafkaDelivery;

    async fn receive(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<KafkaDelivery>, BackendError> {
        if self.rewind {
            if !self.rewind_to_committed().await {
                tokio::time::sleep(timeout.min(UNOWNED_WAIT)).await;
                return Ok(Vec::new());
            }
            self.rewind = false;
        }
        let epoch = {
            let st = self.slot.state.lock().unwrap();
            (st.owned && !st.draining).then_some(st.epoch)
        };
        let Some(epoch) = epoch else {
            tokio::time::sleep(timeout.min(UNOWNED_WAIT)).await;
            return Ok(Vec::new());
        };
        if let Some(dlq) = &self.holds
            && self.holds_epoch != Some(epoch)
        {
            // A partition's last owner may have held keys just before it
            // let go: see those holds before applying anything.
            if let Err(e) = dlq.sync().await {
                warn!(shard = %self.shard, error = %e, "The DLQ view may miss the newest holds.");
            }
            self.holds_epoch = Some(epoch);
        }
        let redelivered = self.slot.tracker.lock().unwrap().take_redeliveries(max);
        if !redelivered.is_empty() {
            return Ok(redelivered.into_iter().map(|r| self.delivery(r)).collect());
        }
        let out = self.read(max, timeout).await;
        if out.is_empty() {
            return Ok(Vec::new());
        }
        {
            // Recorded only under the assignment they were read in. A batch
            // read across a change may hold messages of the new position,
            // taken off the queue: dropping them alone would skip them, so
            // the next receive fetches again from the committed offset.
            let st = self.slot.state.lock().unwrap();
            if st.epoch != epoch || !st.owned || st.draining {
                drop(st);
                self.rewind = true;
                return Ok(Vec::new());
            }
            let end = out.last().map_or(0, |r| r.offset + 1);
            let delivered = out
                .iter()
                .map(|r| (r.offset, r.entry.timestamp_ms, r.entry.payload.len()));
            self.slot.tracker.lock().unwrap().delivered(delivered, end);
        }
        Ok(out.into_iter().map(|r| self.delivery(r)).collect())
    }

    async fn commit(&mut self) -> Result<(), BackendError> {
        self.checkpointer.commit().await?;
        Ok(())
    }
}

impl KafkaConsumer {
    fn delivery(&self, r: Received) -> KafkaDelivery {
        KafkaDelivery {
            shard: self.shard.clone(),
            received: r,
            tracker: self.slot.tracker.clone(),
        }
    }
}

/// One message delivered by a [`KafkaConsumer`].
pub struct KafkaDelivery {
    shard: ShardRef,
    received: Received,
    tracker: Arc<Mutex<Tracker<Received>>>,
}

impl KafkaDelivery {
    /// An ack only moves the consumer's watermark (a commit sends it
    /// later): it is done at once.
    pub fn ack_now(self) {
        self.tracker.lock().unwrap().ack(self.received.offset);
    }
}

impl Delivery for KafkaDelivery {
    fn entry(&self) -> &Arc<Entry> {
        &self.received.entry
    }

    fn shard(&self) -> &ShardRef {
        &self.shard
    }

    fn sequence(&self) -> u64 {
        self.received.sequence
    }

    async fn ack(self) -> Result<(), (BackendError, Self)> {
        self.ack_now();
        Ok(())
    }

    async fn nack(self) -> Result<(), (BackendError, Self)> {
        // Still outstanding: the watermark stays behind it until it is acked.
        self.tracker.lock().unwrap().nack(self.received);
        Ok(())
    }
}
