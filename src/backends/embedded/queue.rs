//! The embedded log behind the backend traits: a producer that appends, and
//! a per-shard consumer that tracks acks and commits its low watermark as the
//! group's checkpoint.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::error;

use super::{AppendReply, EmbeddedLog, LogError, Record, ShardReader};
use crate::backends::{BackendError, Consumer, Delivery, Limit, Producer, WriteReply};
use crate::entry::{Entry, ShardRef};

/// Appends to the embedded log.
#[derive(Clone)]
pub struct EmbeddedProducer {
    log: Arc<EmbeddedLog>,
}

impl EmbeddedProducer {
    pub fn new(log: Arc<EmbeddedLog>) -> Self {
        Self { log }
    }
}

impl Producer for EmbeddedProducer {
    /// Each entry goes to the committer's queue; its reply is answered once
    /// an fsync covers it (group commit), or at once when the queue is full.
    fn append(&self, shard: &ShardRef, writes: Vec<(Entry, WriteReply)>) {
        for (entry, tx) in writes {
            self.log.append_to(shard, entry, AppendReply::Backend(tx));
        }
    }

    /// The set goes to the committer as one request, written in one write
    /// and covered by one fsync.
    fn append_set(&self, writes: Vec<(ShardRef, Entry, WriteReply)>) {
        let writes = writes
            .into_iter()
            .map(|(shard, entry, tx)| (shard, entry, AppendReply::Backend(tx)))
            .collect();
        self.log.append_set(writes);
    }

    fn check_set(&self) -> Result<(), String> {
        Ok(())
    }
}

type Tracker = crate::backends::tracker::Tracker<Record>;

/// Payload bytes one read brings into memory, at most (one record always).
const READ_MAX_BYTES: usize = 4 << 20;
/// A consumer woken by a commit reads no sooner than this after its last
/// read: under load, each read takes several commits' records, and a
/// write's answer does not share the cores with its own delivery.
const READ_LINGER: Duration = Duration::from_millis(1);

/// Commits a consumer's progress without holding the consumer, so a commit
/// can run while a read is waiting for new records.
#[derive(Clone)]
pub struct EmbeddedCheckpointer {
    log: Arc<EmbeddedLog>,
    group: String,
    shard: ShardRef,
    tracker: Arc<Mutex<Tracker>>,
}

impl EmbeddedCheckpointer {
    /// Everything before this offset has been acked.
    pub fn low_watermark(&self) -> u64 {
        self.tracker.lock().unwrap().low_watermark()
    }

    /// Deliveries not yet acked.
    pub fn outstanding(&self) -> usize {
        self.tracker.lock().unwrap().outstanding()
    }

    /// Payload bytes of the deliveries not yet acked.
    pub fn outstanding_bytes(&self) -> usize {
        self.tracker.lock().unwrap().outstanding_bytes()
    }

    /// Timestamp of the oldest delivery not yet acked.
    pub fn oldest_outstanding_ms(&self) -> Option<u64> {
        self.tracker.lock().unwrap().oldest_outstanding_ms()
    }

    /// The group's committed offset for this shard.
    pub fn committed(&self) -> Option<u64> {
        self.log.committed(&self.group).get(&self.shard).copied()
    }

    /// Write the low watermark as the group's checkpoint; returns it. The
    /// checkpoint fsyncs, so it runs on a blocking thread.
    pub async fn commit(&self) -> Result<u64, LogError> {
        let offset = self.low_watermark();
        let offsets = BTreeMap::from([(self.shard.clone(), offset)]);
        let (log, group) = (self.log.clone(), self.group.clone());
        tokio::task::spawn_blocking(move || log.commit(&group, &offsets))
            .await
            .map_err(|_| LogError::Closed)??;
        Ok(offset)
    }
}

/// Consumes one shard of the embedded log for a consumer group.
pub struct EmbeddedConsumer {
    log: Arc<EmbeddedLog>,
    group: String,
    /// `None` only while a read runs on the blocking pool.
    reader: Option<ShardReader>,
    shard: ShardRef,
    /// Wakes a waiting receive when its shard's next records are durable.
    shard_next: tokio::sync::watch::Receiver<u64>,
    tracker: Arc<Mutex<Tracker>>,
    /// When the last read that found records was.
    last_read: Option<tokio::time::Instant>,
}

impl EmbeddedConsumer {
    /// Start at the group's committed offset (or the start of the shard). If
    /// retention deleted it first, start at the earliest record left.
    pub fn new(log: Arc<EmbeddedLog>, group: &str, shard: &ShardRef) -> Result<Self, LogError> {
        let committed = log.committed(group).get(shard).copied();
        let from = committed.unwrap_or_else(|| log.earliest_offset(shard));
        let from = skip_lost(&log, shard, from);
        let reader = log.reader(shard, from)?;
        let shard_next = reader.shard_next();
        let tracker = Tracker::starting_at(from);
        Ok(Self {
            log,
            group: group.to_string(),
            reader: Some(reader),
            shard: shard.clone(),
            shard_next,
            tracker: Arc::new(Mutex::new(tracker)),
            last_read: None,
        })
    }

    /// Everything before this offset has been acked.
    pub fn low_watermark(&self) -> u64 {
        self.tracker.lock().unwrap().low_watermark()
    }

    /// A handle that commits this consumer's progress.
    pub fn checkpointer(&self) -> EmbeddedCheckpointer {
        EmbeddedCheckpointer {
            log: self.log.clone(),
            group: self.group.clone(),
            shard: self.shard.clone(),
            tracker: self.tracker.clone(),
        }
    }

    fn delivery(&self, record: Record) -> EmbeddedDelivery {
        EmbeddedDelivery {
            shard: self.shard.clone(),
            record,
            tracker: self.tracker.clone(),
        }
    }
}

impl EmbeddedConsumer {
    /// Wait up to `timeout` for records and read up to `max`. Records kept
    /// in memory (the committer's last, or another target's read) are taken
    /// on this task; a read of the journal (`pread`) runs on the blocking
    /// pool, never on the caller's thread, and only when the shard has
    /// records past this reader. Only the wait is bounded, so a read is never
    /// abandoned with the reader in it.
    async fn read(&mut self, max: usize, timeout: Duration) -> Result<Vec<Record>, LogError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let limit = Limit {
            entries: max,
            bytes: READ_MAX_BYTES,
        };
        let mut timed_out = false;
        loop {
            // Seen before looking, so a commit after the look wakes the wait.
            let durable_next = *self.shard_next.borrow_and_update();
            let reader = self.reader.as_mut().ok_or(LogError::Closed)?;
            let behind = match timed_out {
                // A last look at the index itself, should a wake be missed.
                true => self.log.next_offset(&self.shard) > reader.next_offset(),
                false => durable_next > reader.next_offset(),
            };
            let records = match reader.take_recent(limit) {
                Some(records) => records,
                None if behind => match self.read_journal(limit).await? {
                    Some(records) => records,
                    // Skipped past what retention deleted: look again.
                    None => continue,
                },
                None => Vec::new(),
            };
            if !records.is_empty() || timed_out {
                return Ok(self.delivered(records));
            }
            match tokio::time::timeout_at(deadline, self.shard_next.changed()).await {
                Ok(Ok(())) => {
                    if let Some(at) = self.last_read.map(|t| t + READ_LINGER) {
                        tokio::time::sleep_until(at.min(deadline)).await;
                    }
                }
                Ok(Err(_)) => return Err(LogError::Closed),
                Err(_) => timed_out = true,
            }
        }
    }

    /// Read the journal on the blocking pool. `None`: the reader's next
    /// record was deleted by the hard cap (`drop_oldest`), and the reader
    /// now starts at what is left.
    async fn read_journal(&mut self, limit: Limit) -> Result<Option<Vec<Record>>, LogError> {
        let mut reader = self.reader.take().ok_or(LogError::Closed)?;
        let (reader, result) = tokio::task::spawn_blocking(move || {
            let result = reader.read_within(limit);
            (reader, result)
        })
        .await
        .map_err(|_| LogError::Closed)?;
        let next = reader.next_offset();
        self.reader = Some(reader);
        match result {
            // Deleted under the reader by the hard cap (`drop_oldest`): go on
            // from what is left rather than stop for good.
            Err(LogError::OffsetOutOfRange { .. } | LogError::MissingSegment { .. })
                if self.log.earliest_offset(&self.shard) > next =>
            {
                let from = skip_lost(&self.log, &self.shard, next);
                let reader = self.log.reader(&self.shard, from)?;
                self.shard_next = reader.shard_next();
                self.reader = Some(reader);
                self.tracker.lock().unwrap().delivered([], from);
                Ok(None)
            }
            other => other.map(Some),
        }
    }

    /// Note `records` as delivered, up to the reader's position.
    fn delivered(&mut self, records: Vec<Record>) -> Vec<Record> {
        if let Some(reader) = &self.reader
            && !records.is_empty()
        {
            self.last_read = Some(tokio::time::Instant::now());
            let delivered = records
                .iter()
                .map(|r| (r.offset, r.entry.timestamp_ms, r.entry.payload.len()));
            self.tracker
                .lock()
                .unwrap()
                .delivered(delivered, reader.next_offset());
        }
        records
    }
}

/// Where a consumer of `shard` that is to read from `from` can start: there,
/// or at the earliest record left if retention deleted `from` (the hard cap's
/// `drop_oldest`). What it skips is logged and counted.
fn skip_lost(log: &EmbeddedLog, shard: &ShardRef, from: u64) -> u64 {
    let earliest = log.earliest_offset(shard);
    if from >= earliest {
        return from;
    }
    let lost = earliest - from;
    error!(
        %shard,
        from,
        earliest,
        lost,
        "Entries were deleted by the hard retention cap before they were applied; skipping them."
    );
    log.count_lost(shard, lost);
    earliest
}

impl Consumer for EmbeddedConsumer {
    type Delivery = EmbeddedDelivery;

    async fn receive(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<EmbeddedDelivery>, BackendError> {
        let redelivered = self.tracker.lock().unwrap().take_redeliveries(max);
        if !redelivered.is_empty() {
            return Ok(redelivered.into_iter().map(|r| self.delivery(r)).collect());
        }
        let records = self.read(max, timeout).await?;
        Ok(records.into_iter().map(|r| self.delivery(r)).collect())
    }

    async fn commit(&mut self) -> Result<(), BackendError> {
        self.checkpointer().commit().await?;
        Ok(())
    }
}

/// One record delivered by an [`EmbeddedConsumer`].
pub struct EmbeddedDelivery {
    shard: ShardRef,
    record: Record,
    tracker: Arc<Mutex<Tracker>>,
}

impl EmbeddedDelivery {
    pub fn record(&self) -> &Record {
        &self.record
    }
}

impl EmbeddedDelivery {
    /// An ack only moves the consumer's watermark: it is done at once.
    pub fn ack_now(self) {
        self.tracker.lock().unwrap().ack(self.record.offset);
    }
}

impl Delivery for EmbeddedDelivery {
    fn entry(&self) -> &Arc<Entry> {
        &self.record.entry
    }

    fn shard(&self) -> &ShardRef {
        &self.shard
    }

    fn sequence(&self) -> u64 {
        self.record.offset
    }

    async fn ack(self) -> Result<(), (BackendError, Self)> {
        self.ack_now();
        Ok(())
    }

    async fn nack(self) -> Result<(), (BackendError, Self)> {
        // Still outstanding: the watermark stays behind it until it is acked.
        let tracker = self.tracker.clone();
        tracker.lock().unwrap().nack(self.record);
        Ok(())
    }
}
