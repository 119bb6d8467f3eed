//! A consumer process's membership in a namespace's consumer group: Kafka
//! splits the partitions between the processes, and moves them when one
//! joins or dies.
//!
//! One rdkafka consumer per namespace subscribes to the topic; each shard
//! reads its own partition's queue (split off the consumer) and owns a
//! [`Slot`]: whether this process owns the partition now, and the tracker of
//! what was handed out. A dedicated thread polls the consumer, which drives
//! the rebalance callbacks:
//!
//! - **Revoke.** The partition stops handing out entries, waits up to
//!   `rebalance_drain_ms` for what is in flight to be acked, commits the low
//!   watermark, and is fenced: this process never commits it again, even if
//!   late acks arrive. Entries not done by then are delivered again by the
//!   next owner (at least once).
//! - **Assign.** The tracker restarts at the group's committed offset, where
//!   librdkafka starts fetching.
//!
//! An epoch, bumped on every change, keeps a batch read under one assignment
//! from being recorded under the next.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{info, warn};

use super::{KafkaDlq, KafkaError, KafkaSettings, serve};
use crate::backends::Fatal;
use crate::backends::tracker::Tracker;
use crate::entry::{Entry, ShardRef};

/// An entry read from the partition, its offset, and its sequence (the
/// offset, or the original sequence of a redriven entry).
#[derive(Clone, Debug)]
pub(super) struct Received {
    pub offset: u64,
    pub sequence: u64,
    pub entry: Arc<Entry>,
}

/// One partition, as this process sees it.
pub(super) struct Slot {
    pub state: Mutex<SlotState>,
    pub tracker: Arc<Mutex<Tracker<Received>>>,
}

pub(super) struct SlotState {
    /// This process owns the partition now.
    pub owned: bool,
    /// Being revoked: hand out nothing more.
    pub draining: bool,
    /// Bumped on every assign and revoke.
    pub epoch: u64,
    /// The group's committed offset, as this process last knew it.
    pub committed: Option<u64>,
    /// The partition's end (high watermark), from librdkafka's statistics
    /// (every `statistics.interval.ms`, 5 s by default).
    pub end: Option<u64>,
}

impl Slot {
    /// A partition owned for good (a consumer assigned its partition by hand).
    pub fn owned(committed: Option<u64>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(SlotState {
                owned: true,
                draining: false,
                epoch: 0,
                committed,
                end: None,
            }),
            tracker: Arc::new(Mutex::new(Tracker::starting_at(committed.unwrap_or(0)))),
        })
    }

    fn unowned() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(SlotState {
                owned: false,
                draining: false,
                epoch: 0,
                committed: None,
                end: None,
            }),
            tracker: Arc::new(Mutex::new(Tracker::starting_at(0))),
        })
    }
}

/// What the rebalance callbacks need.
struct GroupState {
    topic: String,
    slots: Vec<Arc<Slot>>,
    drain: Duration,
    timeout: Duration,
}

/// The context of every Walden Kafka consumer; only a group member has
/// rebalances to handle.
pub struct WaldenContext {
    group: Option<GroupState>,
}

impl WaldenContext {
    pub(super) fn assigned() -> Self {
        Self { group: None }
    }
}

impl ClientContext for WaldenContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        super::log(level, facility, message);
    }

    /// Keep each partition's end, for the consumer lag in stats.
    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        let Some(g) = &self.group else { return };
        let Some(topic) = statistics.topics.get(&g.topic) else {
            return;
        };
        for (p, partition) in &topic.partitions {
            let slot = usize::try_from(*p).ok().and_then(|p| g.slots.get(p));
            if let (Some(slot), Ok(end)) = (slot, u64::try_from(partition.hi_offset)) {
                slot.state.lock().unwrap().end = Some(end);
            }
        }
    }
}

impl ConsumerContext for WaldenContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let (Some(g), Rebalance::Revoke(tpl)) = (&self.group, rebalance) else {
            return;
        };
        for p in partitions(tpl, &g.topic) {
            let Some(slot) = g.slots.get(p as usize) else {
                continue;
            };
            slot.state.lock().unwrap().draining = true;
            let deadline = Instant::now() + g.drain;
            while slot.tracker.lock().unwrap().outstanding() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let (left, watermark, read) = {
                let t = slot.tracker.lock().unwrap();
                (t.outstanding(), t.low_watermark(), t.any_delivered())
            };
            let mut st = slot.state.lock().unwrap();
            if worth_committing(&st, watermark, read) {
                match commit(consumer, &g.topic, p, watermark) {
                    Ok(()) => st.committed = Some(watermark),
                    Err(e) => {
                        warn!(topic = %g.topic, partition = p, error = %e, "Commit on revoke failed; the next owner starts earlier.")
                    }
                }
            }
            st.owned = false;
            st.draining = false;
            st.epoch += 1;
            info!(topic = %g.topic, partition = p, committed = watermark, not_done = left, "Partition revoked and fenced.");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let (Some(g), Rebalance::Assign(tpl)) = (&self.group, rebalance) else {
            return;
        };
        for p in partitions(tpl, &g.topic) {
            let Some(slot) = g.slots.get(p as usize) else {
                continue;
            };
            let committed = committed_offset(consumer, &g.topic, p, g.timeout);
            *slot.tracker.lock().unwrap() = Tracker::starting_at(committed.unwrap_or(0));
            let mut st = slot.state.lock().unwrap();
            st.owned = true;
            st.draining = false;
            st.epoch += 1;
            st.committed = committed;
            info!(topic = %g.topic, partition = p, from = ?committed, "Partition assigned.");
        }
    }
}

/// Commit only what this process owns and has moved. With nothing read
/// and the committed offset unknown (it could not be fetched), the tracker's
/// start is a guess: committing it could move the group backwards.
pub(super) fn worth_committing(st: &SlotState, watermark: u64, read_any: bool) -> bool {
    st.owned && st.committed != Some(watermark) && (st.committed.is_some() || read_any)
}

fn partitions(tpl: &TopicPartitionList, topic: &str) -> Vec<i32> {
    tpl.elements()
        .iter()
        .filter(|e| e.topic() == topic)
        .map(|e| e.partition())
        .collect()
}

pub(super) fn commit<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    partition: i32,
    offset: u64,
) -> Result<(), KafkaError> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset as i64))
        .map_err(|e| KafkaError::client("commit", topic, e))?;
    consumer
        .commit(&tpl, CommitMode::Sync)
        .map_err(|e| KafkaError::client("commit", topic, e))
}

pub(super) fn committed_offset<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> Option<u64> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    match consumer.committed_offsets(tpl, timeout) {
        Ok(found) => match found.elements().first().map(|e| e.offset()) {
            Some(Offset::Offset(o)) if o >= 0 => Some(o as u64),
            _ => None,
        },
        Err(e) => {
            warn!(topic, partition, error = %e, "Cannot read the committed offset; starting from the reset position.");
            None
        }
    }
}

/// How this process belongs to consumer groups.
#[derive(Clone, Debug, Default)]
pub struct Membership {
    /// `group.instance.id` (static membership): a process that restarts
    /// under it takes its partitions back at once, instead of waiting for
    /// its old session to time out and the group to rebalance.
    pub instance_id: Option<String>,
    /// Told when the group fences this process out: another process joined
    /// with the same `instance_id`.
    pub fatal: Fatal,
}

/// A shard's part of a group membership ([`KafkaGroup::share`]).
pub(super) struct Share {
    pub client: Arc<StreamConsumer<WaldenContext>>,
    pub queue: Arc<StreamPartitionQueue<WaldenContext>>,
    pub slot: Arc<Slot>,
    pub topic: String,
    pub holds: Option<Arc<KafkaDlq>>,
}

/// This process's membership in a namespace's consumer group.
pub struct KafkaGroup {
    consumer: Arc<StreamConsumer<WaldenContext>>,
    settings: KafkaSettings,
    queues: Vec<Arc<StreamPartitionQueue<WaldenContext>>>,
    slots: Vec<Arc<Slot>>,
    stop: Arc<AtomicBool>,
    /// With `hold_key`: the DLQ whose view must be current before a shard
    /// reads a newly assigned partition.
    holds: Mutex<Option<Arc<KafkaDlq>>>,
}

impl KafkaGroup {
    /// Join `group` on the settings' topic; partitions arrive by rebalance.
    /// A partition the group has no offset for starts at its earliest
    /// record, or (`from_end`) at the next one written.
    pub fn join(
        settings: &KafkaSettings,
        group: &str,
        drain: Duration,
        membership: &Membership,
        from_end: bool,
    ) -> Result<Arc<Self>, KafkaError> {
        let topic = settings.topic.clone();
        let slots: Vec<Arc<Slot>> = (0..settings.partitions).map(|_| Slot::unowned()).collect();
        let context = WaldenContext {
            group: Some(GroupState {
                topic: topic.clone(),
                slots: slots.clone(),
                drain,
                timeout: settings.ack_timeout,
            }),
        };
        let mut base = vec![
            ("group.id", group),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            (
                "auto.offset.reset",
                if from_end { "latest" } else { "earliest" },
            ),
            // Statistics carry each partition's end, for the lag.
            ("statistics.interval.ms", "5000"),
        ];
        if let Some(id) = &membership.instance_id {
            base.push(("group.instance.id", id));
        }
        let consumer: StreamConsumer<WaldenContext> = settings
            .client_config(&base)
            .create_with_context(context)
            .map_err(|e| KafkaError::client("group consumer", &topic, e))?;
        let consumer = Arc::new(consumer);
        // Every partition gets its own queue before any is assigned, so no
        // message lands on the main queue.
        let queues = (0..settings.partitions as i32)
            .map(|p| {
                consumer
                    .split_partition_queue(&topic, p)
                    .map(Arc::new)
                    .ok_or_else(|| KafkaError::Topic {
                        topic: topic.clone(),
                        message: format!("cannot split off partition {p}'s queue"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        consumer
            .subscribe(&[&topic])
            .map_err(|e| KafkaError::client("subscribe", &topic, e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s, t, owned) = (consumer.clone(), stop.clone(), topic.clone(), slots.clone());
        let fenced = {
            let (fatal, group, id) = (
                membership.fatal.clone(),
                group.to_string(),
                membership.instance_id.clone().unwrap_or_default(),
            );
            move |reason: String| {
                fatal.report(format!(
                    "kafka consumer group {group}: this process was fenced out ({reason}); another process joined with the same group.instance.id {id:?} (server.instance_id): give each process its own"
                ))
            }
        };
        std::thread::Builder::new()
            .name("walden-kafka-group".into())
            .spawn(move || poll_group(c, s, t, owned, fenced))
            .map_err(|e| KafkaError::Topic {
                topic: topic.clone(),
                message: format!("cannot start the group's polling thread: {e}"),
            })?;
        info!(topic = %topic, group, "Joined the consumer group.");
        Ok(Arc::new(Self {
            consumer,
            settings: settings.clone(),
            queues,
            slots,
            stop,
            holds: Mutex::new(None),
        }))
    }

    /// What the consumer of one shard reads through: the group's client,
    /// the partition's queue and slot, and the DLQ holds it follows.
    pub(super) fn share(&self, shard: &ShardRef) -> Result<Share, KafkaError> {
        let p = shard.shard as usize;
        let (Some(queue), Some(slot)) = (self.queues.get(p), self.slots.get(p)) else {
            return Err(KafkaError::Topic {
                topic: self.settings.topic.clone(),
                message: format!("shard {} is outside the topic's partitions", shard.shard),
            });
        };
        Ok(Share {
            client: self.consumer.clone(),
            queue: queue.clone(),
            slot: slot.clone(),
            topic: self.settings.topic.clone(),
            holds: self.holds.lock().unwrap().clone(),
        })
    }

    /// Holds live in `dlq` (`hold_key`): before a shard reads a partition
    /// newly assigned to this process, the DLQ view catches up with the
    /// topic, so it sees the holds the partition's last owner wrote.
    pub fn follow_holds(&self, dlq: Arc<KafkaDlq>) {
        *self.holds.lock().unwrap() = Some(dlq);
    }
}

impl KafkaGroup {
    /// Leave the group cleanly, so the other members take over at once
    /// rather than after the session timeout. The revoke commits what is
    /// done first. Blocks (up to the drain time): call it off the runtime.
    pub fn leave(&self, drain: Duration) {
        self.consumer.unsubscribe();
        // The polling thread serves the revoke; wait for it to let go.
        let deadline = Instant::now() + drain + Duration::from_secs(5);
        while self.slots.iter().any(|s| s.state.lock().unwrap().owned) && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for KafkaGroup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Serve the consumer's main queue: rebalances, errors and logs. Runs on its
/// own thread because a revoke may wait out the drain there. A fatal error
/// (fenced out of the group) goes to `fatal`.
fn poll_group(
    consumer: Arc<StreamConsumer<WaldenContext>>,
    stop: Arc<AtomicBool>,
    topic: String,
    slots: Vec<Arc<Slot>>,
    fatal: impl FnOnce(String),
) {
    let fatal_error = serve(&consumer, &stop, &topic, "group consumer", |msg| {
        // Cannot happen while every partition has its own queue; if it
        // does, fetch it again rather than skip it.
        use rdkafka::Message;
        let (p, o) = (msg.partition(), msg.offset());
        drop(msg);
        warn!(%topic, partition = p, offset = o, "A message reached the group's main queue; seeking back to it.");
        if let Err(e) = consumer.seek(&topic, p, Offset::Offset(o), Duration::from_secs(5)) {
            warn!(%topic, partition = p, error = %e, "Seek failed.");
        }
    });
    if let Some(reason) = fatal_error {
        // Fenced: another member owns the partitions now; this one hands
        // out and commits nothing more.
        for slot in &slots {
            let mut st = slot.state.lock().unwrap();
            st.owned = false;
            st.epoch += 1;
        }
        fatal(reason);
        return;
    }
    consumer.unsubscribe();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(owned: bool, committed: Option<u64>) -> SlotState {
        SlotState {
            owned,
            draining: false,
            epoch: 0,
            committed,
            end: None,
        }
    }

    #[test]
    fn only_an_owned_partition_that_moved_is_committed() {
        assert!(worth_committing(&state(true, Some(5)), 7, true));
        assert!(
            !worth_committing(&state(true, Some(7)), 7, true),
            "no change"
        );
        assert!(!worth_committing(&state(false, Some(5)), 7, true), "fenced");
        // The committed offset could not be read and nothing was read since:
        // the watermark is a guess (0) and must not move the group back.
        assert!(!worth_committing(&state(true, None), 0, false));
        assert!(worth_committing(&state(true, None), 3, true));
    }
}
