//! Sets of mutations on Kafka (`POST .../mutations`), staged in the topics
//! themselves, so that no part of a set depends on one machine.
//!
//! Kafka cannot write records to several partitions as one unit without
//! transactions (which neither test broker has), so a set is written in two
//! phases, as Netflix's WAL does:
//! 1. Its mutations go to their keys' partitions, each getting its sequence
//!    there (comparable with single writes), and each carrying the attempt's
//!    id and a deadline.
//! 2. Once all of them are acked, the marker goes to partition 0. The write
//!    is answered `"true"` only if the marker is acked before the deadline.
//!
//! The topic `<topic>.sets` (one partition), read from its start by every
//! consuming process, is where a set's partitions meet, whichever processes
//! own them:
//! - a mutation that is the first of its key for a target publishes a
//!   `ready` record (the mutation itself, with its partition and offset), and
//!   waits for its set's `done` record before it is acked, holding its key;
//! - the target's owner of partition 0, at the marker, waits for every
//!   mutation to be ready, applies the set whole, writes `done`, then acks
//!   the marker.
//!
//! A process that dies anywhere in this loses nothing: mutations and markers
//! not yet acked are delivered again to their partitions' next owners, who
//! publish or gather again (a set applied twice is applied under the version
//! guard).
//!
//! **A producer that dies between the phases** leaves mutations without a
//! marker. Each of them, once past its deadline plus `abandon_after` (room
//! for the clocks of two machines to differ), writes a request to give its
//! set up into partition 0. Partition 0 is one order that every reader agrees
//! on: if the marker comes before the request, the set stands and the
//! request is ignored; if the request comes first, the set is given up for
//! every target (`done`, `abandoned`), its mutations are acked unapplied, and
//! a late marker is ignored. A marker acked after the deadline is answered
//! `"unknown"`, never `"true"`, so no acknowledged set is ever given up.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use super::{
    KafkaError, KafkaProducer, KafkaSettings, WaldenContext, entry_of, headers, pairs, serve,
};
use crate::backends::{Gathered, SetFate, SetStaging};
use crate::entry::{
    Delivered, Entry, SET_ABANDON_HEADER, SET_ATTEMPT_HEADER, SET_DEADLINE_HEADER,
    SET_MARKER_SHARD, SET_SIZE_HEADER, ShardRef, now_ms,
};

const KIND: &str = "walden.sets.kind";
const TARGET: &str = "walden.sets.target";
const PARTITION: &str = "walden.sets.partition";
const OFFSET: &str = "walden.sets.offset";
const TIMESTAMP: &str = "walden.sets.timestamp_ms";
const FATE: &str = "walden.sets.fate";
/// A ready mutation's own key (the record's key is its set's attempt).
const KEY: &str = "walden.key";
const READY: &str = "ready";
const DONE: &str = "done";
/// Written once the owner of partition 0 has read a set's marker: the
/// marker exists, so its mutations need not ask for the set to be given up.
const MARKED: &str = "marked";
/// The target of a `done` record that settles a set for every target.
const EVERY_TARGET: &str = "*";
/// How often a mutation whose set stays unsettled asks again for it to be
/// given up (the request is ignored where the marker came first).
const ASK_AGAIN: Duration = Duration::from_secs(30);

type ByTarget<T> = HashMap<String, HashMap<String, T>>;

/// What the `<topic>.sets` topic says, plus who waits on it.
#[derive(Default)]
struct View {
    /// How long a settled set is remembered (the topic's retention): longer
    /// than a mutation of it can be delivered again.
    remember_ms: u64,
    /// Ready mutations, by attempt and target, in their set's order.
    ready: ByTarget<BTreeMap<u32, Delivered>>,
    /// Settled attempts, by attempt and target (`*`: every target).
    done: ByTarget<SetFate>,
    /// When each attempt was first settled, oldest first, to forget it.
    done_order: VecDeque<(u64, String)>,
    /// Attempts whose marker has been read, not yet settled.
    marked: HashSet<String>,
    /// Mutations waiting for their set's fate.
    waiting: ByTarget<Vec<oneshot::Sender<SetFate>>>,
    /// Markers waiting for their set's mutations.
    gathering: ByTarget<Gatherer>,
}

struct Gatherer {
    size: u32,
    since_ms: u64,
    waiting: Vec<oneshot::Sender<Gathered>>,
}

impl View {
    fn fate(&self, attempt: &str, target: &str) -> Option<SetFate> {
        let done = self.done.get(attempt)?;
        done.get(target).or_else(|| done.get(EVERY_TARGET)).copied()
    }

    fn members(&self, attempt: &str, target: &str, size: u32) -> Option<Vec<Delivered>> {
        let ready = self.ready.get(attempt)?.get(target)?;
        (ready.len() as u32 >= size).then(|| ready.values().cloned().collect())
    }

    fn put_ready(&mut self, attempt: &str, target: &str, index: u32, member: Delivered) {
        if self.fate(attempt, target).is_some() {
            return;
        }
        self.ready
            .entry(attempt.to_string())
            .or_default()
            .entry(target.to_string())
            .or_default()
            .insert(index, member);
        let Some(size) = self
            .gathering
            .get(attempt)
            .and_then(|g| g.get(target))
            .map(|g| g.size)
        else {
            return;
        };
        if let Some(members) = self.members(attempt, target, size)
            && let Some(g) = remove(&mut self.gathering, attempt, target)
        {
            for tx in g.waiting {
                let _ = tx.send(Gathered::Members(members.clone()));
            }
        }
    }

    fn put_done(&mut self, attempt: &str, target: &str, fate: SetFate) {
        self.marked.remove(attempt);
        let known = self.done.contains_key(attempt);
        self.done
            .entry(attempt.to_string())
            .or_default()
            .entry(target.to_string())
            .or_insert(fate);
        if !known {
            self.done_order.push_back((now_ms(), attempt.to_string()));
            self.forget_old();
        }
        let every = target == EVERY_TARGET;
        let targets: Vec<String> = match every {
            true => self
                .ready
                .get(attempt)
                .into_iter()
                .flat_map(|t| t.keys())
                .chain(self.waiting.get(attempt).into_iter().flat_map(|t| t.keys()))
                .chain(
                    self.gathering
                        .get(attempt)
                        .into_iter()
                        .flat_map(|t| t.keys()),
                )
                .cloned()
                .collect(),
            false => vec![target.to_string()],
        };
        for t in targets {
            let fate = self.fate(attempt, &t).unwrap_or(fate);
            remove(&mut self.ready, attempt, &t);
            for tx in remove(&mut self.waiting, attempt, &t).into_iter().flatten() {
                let _ = tx.send(fate);
            }
            if let Some(g) = remove(&mut self.gathering, attempt, &t) {
                for tx in g.waiting {
                    let _ = tx.send(Gathered::Settled(fate));
                }
            }
        }
    }

    fn forget_old(&mut self) {
        let horizon = now_ms().saturating_sub(self.remember_ms);
        while let Some((at, _)) = self.done_order.front()
            && *at < horizon
        {
            if let Some((_, attempt)) = self.done_order.pop_front() {
                self.done.remove(&attempt);
            }
        }
    }
}

fn remove<T>(map: &mut ByTarget<T>, attempt: &str, target: &str) -> Option<T> {
    let by_target = map.get_mut(attempt)?;
    let found = by_target.remove(target);
    if by_target.is_empty() {
        map.remove(attempt);
    }
    found
}

/// A namespace's set staging on Kafka; see the module's documentation.
#[derive(Clone)]
pub struct KafkaSets {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: Arc<str>,
    /// To `<topic>.sets`.
    producer: KafkaProducer,
    /// To the namespace's topic, for requests to give a set up.
    origin: KafkaProducer,
    topic: String,
    reader: Arc<StreamConsumer<WaldenContext>>,
    view: Arc<Mutex<View>>,
    /// The next offset the view will apply.
    applied: watch::Receiver<u64>,
    stop: Arc<AtomicBool>,
    timeout: Duration,
    abandon_after: Duration,
    /// When this process last asked for each attempt to be given up: one
    /// request per attempt per [`ASK_AGAIN`], however many of its mutations
    /// and targets wait here.
    asked: Mutex<HashMap<String, u64>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl KafkaSets {
    /// Open `<topic>.sets` (created with one partition if missing) and read
    /// it to its end before answering. `settings` are the namespace's.
    /// A settled set is kept in the topic, and remembered, for `retention`.
    pub async fn open(
        settings: &KafkaSettings,
        namespace: &str,
        abandon_after: Duration,
        retention: Duration,
    ) -> Result<Self, KafkaError> {
        let sets = KafkaSettings {
            topic: format!("{}.sets", settings.topic),
            partitions: 1,
            ..settings.clone()
        };
        let retention_ms = retention.as_millis().to_string();
        sets.ensure_topic_with(&[
            ("cleanup.policy", "delete"),
            ("retention.ms", retention_ms.as_str()),
        ])
        .await?;
        let topic = sets.topic.clone();
        let producer = KafkaProducer::new(&sets)?;
        let reader: StreamConsumer<WaldenContext> = sets
            .client_config(&[
                ("group.id", "walden-sets-view"),
                ("enable.auto.commit", "false"),
                ("auto.offset.reset", "earliest"),
                // Sets wait on this reader twice each (their mutations, then
                // their settlement): a fetch answers at once, not after
                // librdkafka's default wait of 500 ms for more data.
                ("fetch.wait.max.ms", "5"),
            ])
            .create_with_context(WaldenContext::assigned())
            .map_err(|e| KafkaError::client("sets reader", &topic, e))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)
            .map_err(|e| KafkaError::client("sets reader", &topic, e))?;
        reader
            .assign(&tpl)
            .map_err(|e| KafkaError::client("sets reader", &topic, e))?;
        let reader = Arc::new(reader);
        let view = Arc::new(Mutex::new(View {
            remember_ms: retention.as_millis() as u64,
            ..View::default()
        }));
        let (applied_tx, applied) = watch::channel(0u64);
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (reader, name, view, stop) =
                (reader.clone(), topic.clone(), view.clone(), stop.clone());
            let namespace: Arc<str> = namespace.into();
            std::thread::Builder::new()
                .name("walden-kafka-sets".into())
                .spawn(move || {
                    // It reads by assignment, outside any group.
                    let _ = serve(&reader, &stop, &name, "sets reader", |msg| {
                        let offset = msg.offset().max(0) as u64;
                        apply(&view, &name, &namespace, &msg);
                        applied_tx.send_replace(offset + 1);
                    });
                })
                .map_err(|e| KafkaError::Topic {
                    topic: topic.clone(),
                    message: format!("cannot start the sets reader: {e}"),
                })?;
        }
        let this = Self {
            inner: Arc::new(Inner {
                namespace: namespace.into(),
                origin: producer.to_topic(&settings.topic),
                producer,
                topic,
                reader,
                view,
                applied,
                stop,
                timeout: settings.ack_timeout,
                abandon_after,
                asked: Mutex::default(),
            }),
        };
        // Until the view has caught up, a set settled before a restart
        // would be gathered (and applied) again: harmless, but wasted.
        if let Err(e) = this.sync().await {
            warn!(topic = %this.inner.topic, error = %e, "The sets view is still catching up.");
        }
        info!(topic = %this.inner.topic, "Kafka set staging ready.");
        Ok(this)
    }

    /// Wait until the view holds everything written to the topic so far.
    async fn sync(&self) -> Result<(), KafkaError> {
        let inner = &self.inner;
        let (reader, topic, timeout) = (inner.reader.clone(), inner.topic.clone(), inner.timeout);
        let (_, high) =
            tokio::task::spawn_blocking(move || reader.fetch_watermarks(&topic, 0, timeout))
                .await
                .map_err(|e| KafkaError::Topic {
                    topic: inner.topic.clone(),
                    message: format!("reading the sets topic's end panicked: {e}"),
                })?
                .map_err(|e| KafkaError::client("sets watermarks", &inner.topic, e))?;
        self.caught_up(high.max(0) as u64).await
    }

    async fn caught_up(&self, offset: u64) -> Result<(), KafkaError> {
        let mut rx = self.inner.applied.clone();
        let wait = rx.wait_for(|&applied| applied >= offset);
        match tokio::time::timeout(self.inner.timeout, wait).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(KafkaError::Topic {
                topic: self.inner.topic.clone(),
                message: format!("the sets view did not reach offset {offset} in time"),
            }),
        }
    }

    async fn member(self, target: String, member: Delivered) -> Result<SetFate, String> {
        let entry = &member.entry;
        let (Some(attempt), Some(place)) = (entry.set_attempt(), entry.set_place()) else {
            return Err(format!("mutation {} lacks its set's attempt", entry.id));
        };
        let rx = {
            let mut view = self.inner.view.lock().unwrap();
            if let Some(fate) = view.fate(&attempt, &target) {
                return Ok(fate);
            }
            let (tx, rx) = oneshot::channel();
            view.waiting
                .entry(attempt.clone())
                .or_default()
                .entry(target.clone())
                .or_default()
                .push(tx);
            rx
        };
        let mut extra = vec![
            (KIND, READY.to_string()),
            (TARGET, target.clone()),
            (PARTITION, member.shard.shard.to_string()),
            (OFFSET, member.sequence.to_string()),
            (TIMESTAMP, entry.timestamp_ms.to_string()),
        ];
        if let Some(key) = &entry.key {
            extra.push((KEY, key.clone()));
        }
        self.inner
            .producer
            .produce_record(
                Some(0),
                &attempt,
                Some(entry.payload.as_ref()),
                headers(entry, &extra),
            )
            .await
            .map_err(|e| format!("could not publish mutation {}: {e}", entry.id))?;
        let deadline: u64 = entry
            .header(SET_DEADLINE_HEADER)
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        let mut ask_at = deadline + self.inner.abandon_after.as_millis() as u64;
        tokio::pin!(rx);
        loop {
            let wait = Duration::from_millis(ask_at.saturating_sub(now_ms()));
            tokio::select! {
                fate = &mut rx => return fate.map_err(|_| "the set staging stopped".to_string()),
                () = tokio::time::sleep(wait) => {
                    let marked = self.inner.view.lock().unwrap().marked.contains(&attempt);
                    if marked {
                        // Its marker exists: the set will be settled.
                    } else if let Err(error) = self.ask_to_abandon(&place.set, &attempt).await {
                        warn!(%error, set = %attempt, "Could not ask for a set without its marker to be given up; will ask again.");
                    }
                    ask_at = now_ms() + ASK_AGAIN.as_millis() as u64;
                }
            }
        }
    }

    /// Write a request to give `attempt` up into partition 0, after
    /// whatever is there: its marker, if it was written.
    async fn ask_to_abandon(&self, set: &str, attempt: &str) -> Result<(), KafkaError> {
        {
            let mut asked = self.inner.asked.lock().unwrap();
            let now = now_ms();
            let again = now.saturating_sub(ASK_AGAIN.as_millis() as u64);
            asked.retain(|_, at| *at > again);
            if asked.contains_key(attempt) {
                return Ok(());
            }
            asked.insert(attempt.to_string(), now);
        }
        warn!(set = %attempt, "A set's marker has not come by its deadline; asking for the set to be given up, unless the marker is in partition 0 before the request.");
        let own = attempt.rsplit_once('#').map_or("", |(_, a)| a);
        let request = Entry {
            id: format!("{attempt}.abandon"),
            key: Some(set.to_string()),
            headers: vec![
                (SET_ABANDON_HEADER.into(), set.into()),
                (SET_ATTEMPT_HEADER.into(), own.into()),
            ],
            payload: bytes::Bytes::new(),
            timestamp_ms: 0,
            due_ms: 0,
        };
        self.inner
            .origin
            .produce(Some(SET_MARKER_SHARD), &request, &[])
            .await?;
        Ok(())
    }

    async fn gather(self, target: String, marker: Delivered) -> Result<Gathered, String> {
        let entry = &marker.entry;
        let attempt = entry
            .set_attempt()
            .ok_or_else(|| format!("marker {} lacks its set's attempt", entry.id))?;
        let size: u32 = entry
            .header(SET_SIZE_HEADER)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("marker {} lacks its set's size", entry.id))?;
        let (rx, mark) = {
            let mut view = self.inner.view.lock().unwrap();
            if let Some(fate) = view.fate(&attempt, &target) {
                return Ok(Gathered::Settled(fate));
            }
            if let Some(members) = view.members(&attempt, &target, size) {
                return Ok(Gathered::Members(members));
            }
            let mark = !view.marked.contains(&attempt);
            let (tx, rx) = oneshot::channel();
            view.gathering
                .entry(attempt.clone())
                .or_default()
                .entry(target)
                .or_insert_with(|| Gatherer {
                    size,
                    since_ms: now_ms(),
                    waiting: Vec::new(),
                })
                .waiting
                .push(tx);
            (rx, mark)
        };
        if mark {
            // Best effort: without it, waiting mutations ask for the set to
            // be given up, and the requests are ignored.
            if let Err(error) = self.record(&attempt, MARKED, EVERY_TARGET, None).await {
                warn!(%error, set = %attempt, "Could not note a set's marker as read.");
            }
        }
        rx.await.map_err(|_| "the set staging stopped".to_string())
    }

    async fn settle(self, target: String, attempt: String, fate: SetFate) -> Result<(), String> {
        let offset = self
            .record(&attempt, DONE, &target, Some(fate))
            .await
            .map_err(|e| format!("could not record set {attempt} settled: {e}"))?;
        // So this process reads its own write: nothing waits on a settled
        // set that the view does not know yet.
        self.caught_up(offset + 1).await.map_err(|e| e.to_string())
    }

    /// Write a `kind` record about `attempt` to the sets topic; its offset.
    async fn record(
        &self,
        attempt: &str,
        kind: &str,
        target: &str,
        fate: Option<SetFate>,
    ) -> Result<u64, KafkaError> {
        let mut h = rdkafka::message::OwnedHeaders::new();
        let fields = [
            (KIND, Some(kind)),
            (TARGET, Some(target)),
            (FATE, fate.map(SetFate::as_str)),
        ];
        for (key, value) in fields {
            if let Some(value) = value {
                h = h.insert(rdkafka::message::Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
        }
        let (offset, _) = self
            .inner
            .producer
            .produce_record(Some(0), attempt, Some(b""), h)
            .await?;
        Ok(offset)
    }

    async fn abandon(self, target: String, request: Delivered) -> Result<(), String> {
        let attempt = request
            .entry
            .set_attempt()
            .ok_or_else(|| format!("request {} lacks its set's attempt", request.entry.id))?;
        // Settled by another process (before a rebalance), maybe.
        self.sync().await.map_err(|e| e.to_string())?;
        if self
            .inner
            .view
            .lock()
            .unwrap()
            .fate(&attempt, &target)
            .is_some()
        {
            return Ok(());
        }
        warn!(namespace = %self.inner.namespace, set = %attempt,
            "A set's marker did not come before the request to give it up: the set is given up, and none of it is applied.");
        self.settle(EVERY_TARGET.to_string(), attempt, SetFate::Abandoned)
            .await
    }
}

impl SetStaging for KafkaSets {
    fn member(
        &self,
        target: &str,
        member: Delivered,
    ) -> BoxFuture<'static, Result<SetFate, String>> {
        Box::pin(self.clone().member(target.to_string(), member))
    }

    fn gather(
        &self,
        target: &str,
        marker: &Delivered,
    ) -> BoxFuture<'static, Result<Gathered, String>> {
        Box::pin(self.clone().gather(target.to_string(), marker.clone()))
    }

    fn settle(
        &self,
        target: &str,
        attempt: &str,
        fate: SetFate,
    ) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(
            self.clone()
                .settle(target.to_string(), attempt.to_string(), fate),
        )
    }

    fn abandon(&self, target: &str, request: &Delivered) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(self.clone().abandon(target.to_string(), request.clone()))
    }

    fn oldest_waiting_ms(&self, target: &str) -> Option<u64> {
        let view = self.inner.view.lock().unwrap();
        view.gathering
            .values()
            .filter_map(|t| t.get(target))
            .map(|g| g.since_ms)
            .min()
    }
}

/// Apply one record of `<topic>.sets` to the view.
fn apply(view: &Mutex<View>, topic: &str, namespace: &Arc<str>, msg: &BorrowedMessage<'_>) {
    let Some(attempt) = msg.key().map(|k| String::from_utf8_lossy(k).into_owned()) else {
        return;
    };
    let field = |name: &str| {
        msg.headers().and_then(|hs| {
            hs.iter()
                .find(|h| h.key == name)
                .and_then(|h| Some(String::from_utf8_lossy(h.value?).into_owned()))
        })
    };
    let (Some(kind), Some(target)) = (field(KIND), field(TARGET)) else {
        return;
    };
    match kind.as_str() {
        MARKED => {
            let mut view = view.lock().unwrap();
            if !view.done.contains_key(&attempt) {
                view.marked.insert(attempt);
            }
        }
        DONE => {
            if let Some(fate) = field(FATE).as_deref().and_then(SetFate::parse) {
                view.lock().unwrap().put_done(&attempt, &target, fate);
            }
        }
        READY => {
            let Some(member) = member_of(topic, namespace, msg) else {
                warn!(%topic, offset = msg.offset(), "A ready record of the sets topic is unreadable; skipped.");
                return;
            };
            let Some(place) = member.entry.set_place() else {
                return;
            };
            view.lock()
                .unwrap()
                .put_ready(&attempt, &target, place.index, member);
        }
        _ => {}
    }
}

/// The mutation a `ready` record holds, as it was delivered.
fn member_of(topic: &str, namespace: &Arc<str>, msg: &BorrowedMessage<'_>) -> Option<Delivered> {
    let mut entry = entry_of(
        topic,
        msg.partition(),
        msg.offset(),
        None,
        msg.payload(),
        pairs(msg.headers()),
        None,
    );
    let mut fields: HashMap<String, String> = HashMap::new();
    entry.headers.retain(|(k, v)| {
        let ours = k.starts_with("walden.sets.") || k == KEY;
        if ours {
            fields.insert(k.clone(), v.clone());
        }
        !ours
    });
    let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
    entry.key = fields.get(KEY).cloned();
    entry.timestamp_ms = num(TIMESTAMP).unwrap_or(0);
    Some(Delivered {
        shard: ShardRef::new(namespace.clone(), u32::try_from(num(PARTITION)?).ok()?),
        sequence: num(OFFSET)?,
        entry: entry.into(),
    })
}
