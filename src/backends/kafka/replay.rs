//! A namespace's topic read again for a replay: one reader per partition,
//! assigned (no consumer group, so the targets' groups never see it), and
//! `offsets_for_times` to find where a time starts.
//!
//! A broker's answer to `offsets_for_times` is checked: the offset it names
//! must be the first one written at or after the time. A broker that answers
//! otherwise (some Kafka-protocol servers do not keep a time index) is
//! scanned instead, partition from its start, and the log says so once.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

use super::{KafkaError, KafkaSettings, REDRIVEN_SEQUENCE, WaldenContext, entry_of, pairs};
use crate::backends::{BackendError, Limit, Logged, ReplayLog};
use crate::entry::{Delivered, ShardRef};

/// The longest one read waits for a message the watermark says is there.
const READ_WAIT: Duration = Duration::from_secs(5);

/// A partition's reader and the offset it reads next.
struct Reader {
    consumer: BaseConsumer<WaldenContext>,
    next: Option<u64>,
}

pub struct KafkaReplayLog {
    settings: KafkaSettings,
    /// One per partition, made when first read.
    readers: Vec<Mutex<Option<Reader>>>,
    /// For watermarks and `offsets_for_times`.
    meta: BaseConsumer<WaldenContext>,
    /// The broker answered `offsets_for_times` wrongly once: scan instead.
    scan: AtomicBool,
}

impl KafkaReplayLog {
    pub fn new(settings: &KafkaSettings) -> Result<Self, KafkaError> {
        let meta = Self::consumer(settings)?;
        Ok(Self {
            readers: (0..settings.partitions).map(|_| Mutex::new(None)).collect(),
            settings: settings.clone(),
            meta,
            scan: AtomicBool::new(false),
        })
    }

    /// Times are found by scanning: the broker answered `offsets_for_times`
    /// wrongly.
    pub fn scanning(&self) -> bool {
        self.scan.load(Ordering::Relaxed)
    }

    fn consumer(settings: &KafkaSettings) -> Result<BaseConsumer<WaldenContext>, KafkaError> {
        settings
            .client_config(&[
                // Assigned, never subscribed: the id only names the client.
                ("group.id", "walden-replay"),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("fetch.wait.max.ms", "50"),
                // The end of a partition shows, so a read past its last
                // message (before a gap of control records) need not wait.
                ("enable.partition.eof", "true"),
            ])
            .create_with_context(WaldenContext::assigned())
            .map_err(|e| KafkaError::client("replay reader", &settings.topic, e))
    }

    fn error(&self, what: &'static str, e: rdkafka::error::KafkaError) -> BackendError {
        KafkaError::client(what, &self.settings.topic, e).into()
    }

    fn watermarks(&self, shard: &ShardRef) -> Result<(u64, u64), BackendError> {
        let (low, high) = self
            .meta
            .fetch_watermarks(
                &self.settings.topic,
                shard.shard as i32,
                self.settings.ack_timeout,
            )
            .map_err(|e| self.error("replay watermarks", e))?;
        Ok((low.max(0) as u64, high.max(0) as u64))
    }

    /// The write time of the message at `position`, if there is one.
    fn time_at(&self, shard: &ShardRef, position: u64) -> Result<Option<u64>, BackendError> {
        let one = self.read(shard, position, Limit::entries(1))?;
        Ok(one
            .first()
            .filter(|l| l.position == position)
            .map(|l| l.delivered.entry.timestamp_ms))
    }

    /// The first position at or after `at_ms`, by reading the partition.
    fn scan_for(&self, shard: &ShardRef, at_ms: u64) -> Result<u64, BackendError> {
        let (mut next, high) = self.watermarks(shard)?;
        while next < high {
            let batch = self.read(shard, next, Limit::entries(1024))?;
            let Some(last) = batch.last() else { break };
            if let Some(l) = batch
                .iter()
                .find(|l| l.delivered.entry.timestamp_ms >= at_ms)
            {
                return Ok(l.position);
            }
            next = last.position + 1;
        }
        Ok(high)
    }

    /// What the broker says is the first position at or after `at_ms`, if
    /// the answer checks out.
    fn ask_broker(&self, shard: &ShardRef, at_ms: u64) -> Result<Option<u64>, BackendError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            &self.settings.topic,
            shard.shard as i32,
            Offset::Offset(at_ms.min(i64::MAX as u64) as i64),
        )
        .map_err(|e| self.error("replay offsets_for_times", e))?;
        let Ok(found) = self.meta.offsets_for_times(tpl, self.settings.ack_timeout) else {
            return Ok(None);
        };
        let (low, high) = self.watermarks(shard)?;
        let offset = match found.elements().first().map(|e| e.offset()) {
            Some(Offset::Offset(o)) if o >= 0 => (o as u64).clamp(low, high),
            Some(Offset::End) => high,
            _ => return Ok(None),
        };
        // The first at or after: its own time is not before, and the one
        // before it is.
        let here_ok = offset >= high || self.time_at(shard, offset)?.is_some_and(|t| t >= at_ms);
        let before_ok =
            offset <= low || self.time_at(shard, offset - 1)?.is_some_and(|t| t < at_ms);
        Ok((here_ok && before_ok).then_some(offset))
    }
}

impl ReplayLog for KafkaReplayLog {
    fn position_at(&self, shard: &ShardRef, at_ms: u64) -> Result<u64, BackendError> {
        if !self.scan.load(Ordering::Relaxed) {
            if let Some(offset) = self.ask_broker(shard, at_ms)? {
                return Ok(offset);
            }
            self.scan.store(true, Ordering::Relaxed);
            warn!(topic = %self.settings.topic,
                "The broker did not answer offsets_for_times correctly; replays of this topic find times by scanning its partitions.");
        }
        self.scan_for(shard, at_ms)
    }

    fn end(&self, shard: &ShardRef) -> Result<u64, BackendError> {
        Ok(self.watermarks(shard)?.1)
    }

    fn earliest(&self, shard: &ShardRef) -> Result<(u64, Option<u64>), BackendError> {
        let (low, high) = self.watermarks(shard)?;
        let at = match low < high {
            true => self.time_at(shard, low)?,
            false => None,
        };
        Ok((low, at))
    }

    fn trimmed(&self, shard: &ShardRef) -> Result<bool, BackendError> {
        Ok(self.watermarks(shard)?.0 > 0)
    }

    fn read(&self, shard: &ShardRef, from: u64, limit: Limit) -> Result<Vec<Logged>, BackendError> {
        let (_, high) = self.watermarks(shard)?;
        if from >= high {
            return Ok(Vec::new());
        }
        let slot = self
            .readers
            .get(shard.shard as usize)
            .ok_or(BackendError::NotHere(
                "a replay names a shard the topic does not have",
            ))?;
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(Reader {
                consumer: Self::consumer(&self.settings)?,
                next: None,
            });
        }
        let reader = slot.as_mut().expect("made above");
        if reader.next != Some(from) {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(
                &self.settings.topic,
                shard.shard as i32,
                Offset::Offset(from as i64),
            )
            .map_err(|e| self.error("replay assign", e))?;
            reader
                .consumer
                .assign(&tpl)
                .map_err(|e| self.error("replay assign", e))?;
            reader.next = Some(from);
        }
        let mut out: Vec<Logged> = Vec::new();
        let mut bytes = 0;
        let deadline = Instant::now() + READ_WAIT;
        while out.len() < limit.entries
            && (out.is_empty() || bytes < limit.bytes)
            && reader.next.is_some_and(|n| n < high)
            && Instant::now() < deadline
        {
            let Some(polled) = reader.consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let msg = match polled {
                Ok(m) => m,
                Err(rdkafka::error::KafkaError::PartitionEOF(_)) => break,
                Err(e) => {
                    // Read again from where it was, next time.
                    reader.next = None;
                    return match out.is_empty() {
                        true => Err(self.error("replay read", e)),
                        false => Ok(out),
                    };
                }
            };
            let offset = msg.offset().max(0) as u64;
            let mut entry = entry_of(
                &self.settings.topic,
                msg.partition(),
                msg.offset(),
                msg.key(),
                msg.payload(),
                pairs(msg.headers()),
                msg.timestamp().to_millis(),
            );
            // A redriven copy applies under its original sequence, as live
            // delivery applies it.
            let mut sequence = offset;
            if let Some(i) = entry
                .headers
                .iter()
                .position(|(k, _)| k == REDRIVEN_SEQUENCE)
            {
                let (_, original) = entry.headers.remove(i);
                sequence = original.parse().unwrap_or(sequence);
            }
            bytes += entry.payload.len();
            reader.next = Some(offset + 1);
            out.push(Logged {
                position: offset,
                delivered: Delivered {
                    shard: shard.clone(),
                    sequence,
                    entry: entry.into(),
                },
            });
        }
        Ok(out)
    }

    /// The broker's retention is its own: a replay cannot hold it.
    fn hold(&self, _: &str, _: &BTreeMap<ShardRef, u64>) -> Result<(), BackendError> {
        Ok(())
    }

    fn release(&self, _: &str, _: &[ShardRef]) -> Result<(), BackendError> {
        Ok(())
    }
}
