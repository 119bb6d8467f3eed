//! A namespace's dead-letter queue on Kafka: the topic `<topic>.dlq` (one
//! partition, so a letter's offset is its DLQ sequence).
//!
//! - A letter is a record keyed by the entry id, with the entry's payload and
//!   headers, plus its origin, attempts, failure times and last error in
//!   `walden.dlq.*` headers (the entry's own key in `walden.key`).
//! - A topic is immutable, so a purge or a redrive writes a tombstone (the
//!   id with no payload, naming the letter's DLQ sequence); that letter is
//!   gone from then on. A later letter for the same id is not touched by it.
//! - A redrive re-produces the entry to its origin topic and partition, with
//!   its original sequence in a header, and then writes the tombstone. The
//!   partition's owner applies it like any entry; if it fails again it comes
//!   back as a new letter. A crash between the two leaves the letter listed
//!   with its entry also back on the topic: a second redrive repeats it, and
//!   the version guard or the idempotency key makes that harmless.
//! - Each process keeps a view of the live letters by reading the topic from
//!   the start and then tailing it. The view is an index: each live letter's
//!   offset, id, shard and the key it holds, never its payload or headers;
//!   `list`, `get` and a redrive read the letters themselves from the topic,
//!   a page at a time. An append or a remove resolves once the broker has it
//!   (`acks=all`) and the view has caught up to it, so a process reads its
//!   own writes. Letters written by other processes show up as the tail
//!   reaches them.
//! - With `dlq.on_dead_letter = "hold_key"`, the letter that holds a key says
//!   so (`walden.dlq.holds`, the key), so the hold lives on the broker and
//!   follows the partition to its next owner. The entries behind it become
//!   letters too. A holding letter is not removed by its redrive: the
//!   partition's owner removes it once the redriven entry is applied, which
//!   is what releases the key. Any removal (that, or a purge) ends the hold.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::{info, warn};

use super::group::WaldenContext;
use super::{KafkaError, KafkaProducer, KafkaSettings, entry_of, pairs, serve};
use crate::backends::{BackendError, DeadLetter, DeadLetters, Origin, RedriveReport, Selection};
use crate::entry::ShardRef;

const H_NAMESPACE: &str = "walden.dlq.namespace";
const H_SHARD: &str = "walden.dlq.shard";
const H_SEQUENCE: &str = "walden.dlq.sequence";
const H_TARGET: &str = "walden.dlq.target";
const H_ATTEMPTS: &str = "walden.dlq.attempts";
const H_FIRST: &str = "walden.dlq.first_failure_ms";
const H_LAST: &str = "walden.dlq.last_failure_ms";
const H_ERROR: &str = "walden.dlq.last_error";
const H_KEY: &str = "walden.key";
const H_TIMESTAMP: &str = "walden.timestamp_ms";
const H_REMOVED: &str = "walden.dlq.removed";
/// On a tombstone: the DLQ sequence of the letter it removes.
const H_REMOVES: &str = "walden.dlq.removes";
/// On a letter that holds its key (`hold_key`): the key it holds.
const H_HOLDS: &str = "walden.dlq.holds";

/// What the view keeps of a live letter: enough to find, order and hold it,
/// not its contents.
#[derive(Clone, Debug)]
struct Meta {
    id: Arc<str>,
    namespace: Arc<str>,
    /// The target it failed to reach (empty in letters written before
    /// letters named their target: those hold for every target).
    target: Arc<str>,
    shard: u32,
    /// The entry's sequence in its shard.
    origin: u64,
}

/// The live letters, by DLQ sequence and by id.
#[derive(Default)]
struct View {
    by_sequence: BTreeMap<u64, Meta>,
    /// id → the DLQ sequences of its letters.
    by_id: HashMap<Arc<str>, BTreeSet<u64>>,
    /// The live letters that hold a key: shard → key → their DLQ sequences
    /// (the oldest is the hold).
    held: HashMap<u32, HashMap<String, BTreeSet<u64>>>,
    /// The key each of those letters holds, by DLQ sequence.
    holds_of: HashMap<u64, String>,
    /// Namespace and target names, shared by every letter of each.
    names: HashSet<Arc<str>>,
}

impl View {
    /// One shared copy of a namespace's or target's name.
    fn name(&mut self, name: &str) -> Arc<str> {
        match self.names.get(name) {
            Some(n) => n.clone(),
            None => {
                let n: Arc<str> = name.into();
                self.names.insert(n.clone());
                n
            }
        }
    }

    /// Index the letter at `seq`: entry `id`, at `origin` in `shard` of
    /// `namespace`, for `target`. A second letter of the same entry for the
    /// same target (delivered again in a rebalance, and dead-lettered by
    /// both owners) is not one more letter: it is left out, and the first
    /// stands for both.
    fn put(
        &mut self,
        seq: u64,
        id: &str,
        at: (&str, u32, u64),
        target: &str,
        holds: Option<String>,
    ) {
        let (namespace, shard, origin) = at;
        let again = self.by_id.get(id).into_iter().flatten().any(|s| {
            self.by_sequence.get(s).is_some_and(|m| {
                m.origin == origin
                    && m.shard == shard
                    && &*m.namespace == namespace
                    && &*m.target == target
            })
        });
        if again {
            return;
        }
        let namespace = self.name(namespace);
        let target = self.name(target);
        let id: Arc<str> = match self.by_id.get_key_value(id) {
            Some((id, _)) => id.clone(),
            None => id.into(),
        };
        self.by_id.entry(id.clone()).or_default().insert(seq);
        if let Some(key) = holds {
            let seqs = self.held.entry(shard).or_default();
            seqs.entry(key.clone()).or_default().insert(seq);
            self.holds_of.insert(seq, key);
        }
        let meta = Meta {
            id,
            namespace,
            target,
            shard,
            origin,
        };
        self.by_sequence.insert(seq, meta);
    }

    /// Remove the letter of `id` at `only`; every letter of `id` when not
    /// given (tombstones written before that header existed).
    fn remove(&mut self, id: &str, only: Option<u64>) {
        let Some(seqs) = self.by_id.get_mut(id) else {
            return;
        };
        let gone: Vec<u64> = match only {
            Some(seq) if seqs.remove(&seq) => vec![seq],
            Some(_) => Vec::new(),
            None => std::mem::take(seqs).into_iter().collect(),
        };
        if seqs.is_empty() {
            self.by_id.remove(id);
        }
        for seq in gone {
            self.drop_letter(seq);
        }
    }

    /// Forget the letter at `seq`, and the hold it made, if any.
    fn drop_letter(&mut self, seq: u64) {
        let meta = self.by_sequence.remove(&seq);
        let Some((meta, key)) = meta.zip(self.holds_of.remove(&seq)) else {
            return;
        };
        if let Some(keys) = self.held.get_mut(&meta.shard)
            && let Some(seqs) = keys.get_mut(&key)
        {
            seqs.remove(&seq);
            if seqs.is_empty() {
                keys.remove(&key);
            }
        }
    }

    /// Whether the letter at `seq` holds for `target`.
    fn holds_for(&self, seq: u64, target: &str) -> bool {
        self.by_sequence
            .get(&seq)
            .is_some_and(|m| m.target.is_empty() || &*m.target == target)
    }

    /// The live letter holding `key` of `shard` for `target`, if any: its
    /// id.
    fn holder(&self, target: &str, shard: u32, key: &str) -> Option<&str> {
        let seqs = self.held.get(&shard)?.get(key)?;
        let seq = seqs.iter().find(|s| self.holds_for(**s, target))?;
        self.by_sequence.get(seq).map(|m| &*m.id)
    }

    /// The live letters of `id` that hold their key for `target`, oldest
    /// first.
    fn holding<'a>(&'a self, target: &'a str, id: &str) -> impl Iterator<Item = u64> + 'a {
        self.by_id
            .get(id)
            .into_iter()
            .flatten()
            .copied()
            .filter(move |seq| self.holds_of.contains_key(seq) && self.holds_for(*seq, target))
    }

    /// Whether a live letter of `id` holds its key for `target`.
    fn is_holding(&self, target: &str, id: &str) -> bool {
        self.holding(target, id).next().is_some()
    }

    /// The DLQ sequences of `namespace`'s live letters from `from` on, in
    /// order, that `picks` takes.
    fn sequences<'a>(
        &'a self,
        namespace: &'a str,
        from: u64,
        picks: impl Fn(&Meta) -> bool + 'a,
    ) -> impl Iterator<Item = u64> + 'a {
        self.by_sequence
            .range(from..)
            .filter(move |(_, m)| &*m.namespace == namespace && picks(m))
            .map(|(seq, _)| *seq)
    }
}

pub struct KafkaDlq {
    producer: KafkaProducer,
    /// To the namespace's topic, for redrives (same client as `producer`).
    origin: KafkaProducer,
    topic: String,
    /// The view's reader (tailed on its own thread), also asked for the end.
    reader: Arc<StreamConsumer<WaldenContext>>,
    /// Reads letters back from the topic for `list`, `get` and a redrive.
    fetcher: Arc<Mutex<BaseConsumer<WaldenContext>>>,
    view: Arc<Mutex<View>>,
    /// The next offset the view will apply.
    applied: watch::Receiver<u64>,
    stop: Arc<AtomicBool>,
    timeout: Duration,
    /// The namespace has several targets: a redriven entry is marked for
    /// the target that failed it, which alone reads it again.
    narrow_redrives: AtomicBool,
}

impl KafkaDlq {
    /// Mark each redriven entry for the target that failed it (a namespace
    /// of several targets, which all read the topic it goes back to).
    pub fn redrive_to_failed_target_only(&self) {
        self.narrow_redrives.store(true, Ordering::Relaxed);
    }

    /// Open the DLQ topic (created with one partition if missing) and read
    /// it up to its end before answering. Redrives go to `origin_topic`.
    pub async fn open(
        settings: &KafkaSettings,
        origin_topic: &str,
    ) -> Result<Arc<Self>, KafkaError> {
        let settings = KafkaSettings {
            partitions: 1,
            ..settings.clone()
        };
        settings.ensure_topic().await?;
        let topic = settings.topic.clone();
        let producer = KafkaProducer::new(&settings)?;
        let consumer: StreamConsumer<WaldenContext> = settings
            .client_config(&[
                ("group.id", "walden-dlq-view"),
                ("enable.auto.commit", "false"),
                ("auto.offset.reset", "earliest"),
            ])
            .create_with_context(WaldenContext::assigned())
            .map_err(|e| KafkaError::client("dlq reader", &topic, e))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)
            .map_err(|e| KafkaError::client("dlq reader", &topic, e))?;
        consumer
            .assign(&tpl)
            .map_err(|e| KafkaError::client("dlq reader", &topic, e))?;
        let fetcher: BaseConsumer<WaldenContext> = settings
            .client_config(&[
                ("group.id", "walden-dlq-fetch"),
                ("enable.auto.commit", "false"),
                ("enable.partition.eof", "true"),
            ])
            .create_with_context(WaldenContext::assigned())
            .map_err(|e| KafkaError::client("dlq fetcher", &topic, e))?;
        let (c, t) = (Arc::new(consumer), topic.clone());
        let view = Arc::new(Mutex::new(View::default()));
        let (applied_tx, applied) = watch::channel(0u64);
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (view, stop) = (view.clone(), stop.clone());
            std::thread::Builder::new()
                .name("walden-kafka-dlq".into())
                .spawn({
                    let c = c.clone();
                    move || tail(c, t, view, applied_tx, stop)
                })
                .map_err(|e| KafkaError::Topic {
                    topic: topic.clone(),
                    message: format!("cannot start the DLQ reader: {e}"),
                })?;
        }
        let dlq = Arc::new(Self {
            origin: producer.to_topic(origin_topic),
            producer,
            topic,
            reader: c,
            fetcher: Arc::new(Mutex::new(fetcher)),
            view,
            applied,
            stop,
            timeout: settings.ack_timeout,
            narrow_redrives: AtomicBool::new(false),
        });
        let end = dlq.end().await?;
        if let Err(e) = dlq.caught_up(end).await {
            warn!(topic = %dlq.topic, error = %e, "The DLQ view is still catching up; listings may be short for now.");
        }
        info!(topic = %dlq.topic, letters = dlq.view.lock().unwrap().by_sequence.len(), "Kafka DLQ ready.");
        Ok(dlq)
    }

    /// Wait until the view has applied everything before `offset`.
    async fn caught_up(&self, offset: u64) -> Result<(), KafkaError> {
        let mut rx = self.applied.clone();
        let wait = rx.wait_for(|&applied| applied >= offset);
        match tokio::time::timeout(self.timeout, wait).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(KafkaError::Topic {
                topic: self.topic.clone(),
                message: format!("the DLQ view did not reach offset {offset} in time"),
            }),
        }
    }
}

impl Drop for KafkaDlq {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn header<'a>(h: &mut OwnedHeaders, key: &'a str, value: &'a str) {
    *h = std::mem::replace(h, OwnedHeaders::new()).insert(Header {
        key,
        value: Some(value.as_bytes()),
    });
}

impl DeadLetters for KafkaDlq {
    async fn append(&self, letter: DeadLetter) -> Result<u64, BackendError> {
        self.append_holding(letter, None).await
    }

    // The topic is the namespace's own; the filters only guard against a
    // topic shared by mistake.
    async fn list(
        &self,
        namespace: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, usize), BackendError> {
        let (page, total): (Vec<u64>, usize) = {
            let view = self.view.lock().unwrap();
            let page = match crate::backends::listing_start(after) {
                Some(from) => view
                    .sequences(namespace, from, |_| true)
                    .take(limit)
                    .collect(),
                None => Vec::new(),
            };
            (page, view.sequences(namespace, 0, |_| true).count())
        };
        Ok((self.fetch(page).await?, total))
    }

    async fn get(&self, namespace: &str, id: &str) -> Result<Vec<DeadLetter>, BackendError> {
        let seqs: Vec<u64> = {
            let view = self.view.lock().unwrap();
            let ours = |s: &&u64| {
                view.by_sequence
                    .get(s)
                    .is_some_and(|m| &*m.namespace == namespace)
            };
            view.by_id
                .get(id)
                .into_iter()
                .flatten()
                .filter(ours)
                .copied()
                .collect()
        };
        self.fetch(seqs).await
    }

    async fn remove(
        &self,
        namespace: &str,
        dlq_sequence: u64,
        reason: &str,
    ) -> Result<bool, BackendError> {
        let id = {
            let view = self.view.lock().unwrap();
            view.by_sequence
                .get(&dlq_sequence)
                .filter(|m| &*m.namespace == namespace)
                .map(|m| m.id.clone())
        };
        let Some(id) = id else {
            return Ok(false);
        };
        self.tombstone(&id, dlq_sequence, reason).await?;
        Ok(true)
    }
}

impl KafkaDlq {
    /// Store a letter; with `holds`, it holds that key of its shard (see the
    /// module docs).
    pub async fn append_holding(
        &self,
        letter: DeadLetter,
        holds: Option<&str>,
    ) -> Result<u64, BackendError> {
        let e = &letter.entry;
        let o = &letter.origin;
        let fields = [
            (H_NAMESPACE, o.shard.namespace.to_string()),
            (H_SHARD, o.shard.shard.to_string()),
            (H_SEQUENCE, o.sequence.to_string()),
            (H_TARGET, o.target.clone()),
            (H_ATTEMPTS, letter.attempts.to_string()),
            (H_FIRST, letter.first_failure_ms.to_string()),
            (H_LAST, letter.last_failure_ms.to_string()),
            (H_ERROR, letter.last_error.clone()),
            (H_TIMESTAMP, e.timestamp_ms.to_string()),
        ];
        let mut headers = super::headers(e, &[]);
        for (k, v) in &fields {
            header(&mut headers, k, v);
        }
        if let Some(key) = &e.key {
            header(&mut headers, H_KEY, key);
        }
        if let Some(key) = holds {
            header(&mut headers, H_HOLDS, key);
        }
        let (offset, _) = self
            .producer
            .produce_record(Some(0), &e.id, Some(e.payload.as_ref()), headers)
            .await?;
        self.caught_up(offset + 1).await?;
        Ok(offset)
    }

    /// The live letter holding `key` of `shard` for `target` (`hold_key`),
    /// if any: its id. The view trails the topic, so a hold written a moment
    /// ago by another process may not show yet.
    pub fn holder(&self, target: &str, shard: u32, key: &str) -> Option<String> {
        self.view
            .lock()
            .unwrap()
            .holder(target, shard, key)
            .map(str::to_string)
    }

    /// The key the live letter at `dlq_sequence` holds, if it holds one.
    pub fn holds_key(&self, dlq_sequence: u64) -> Option<String> {
        self.view
            .lock()
            .unwrap()
            .holds_of
            .get(&dlq_sequence)
            .cloned()
    }

    /// Whether a live letter of `id` holds its key for `target`. Once none
    /// does (it was purged, or applied after a redrive, perhaps by another
    /// process), its hold is over.
    pub fn is_holding(&self, target: &str, id: &str) -> bool {
        self.view.lock().unwrap().is_holding(target, id)
    }

    /// The DLQ sequence of the oldest live letter of `id` that holds its
    /// key for `target`: the one its redriven entry's success removes.
    pub fn holding_letter(&self, target: &str, id: &str) -> Option<u64> {
        self.view.lock().unwrap().holding(target, id).next()
    }

    /// Wait until the view has read the topic up to its current end.
    pub async fn sync(&self) -> Result<(), KafkaError> {
        let end = self.end().await?;
        self.caught_up(end).await
    }

    /// The topic's current end (its high watermark).
    async fn end(&self) -> Result<u64, KafkaError> {
        let (reader, topic, timeout) = (self.reader.clone(), self.topic.clone(), self.timeout);
        let (_, high) =
            tokio::task::spawn_blocking(move || reader.fetch_watermarks(&topic, 0, timeout))
                .await
                .map_err(|e| KafkaError::Topic {
                    topic: self.topic.clone(),
                    message: format!("reading the DLQ's end panicked: {e}"),
                })?
                .map_err(|e| KafkaError::client("dlq watermarks", &self.topic, e))?;
        Ok(high.max(0) as u64)
    }

    /// Redrive the letters of `namespace` that `selection` picks, in DLQ
    /// order (the order the topic took them, so a key's letters go back in
    /// its order): each produce is queued at its first poll, in turn, and
    /// librdkafka keeps a partition's records in the order they are queued.
    pub async fn redrive_selected(
        &self,
        namespace: &str,
        shards: u32,
        selection: &Selection,
    ) -> Result<RedriveReport, BackendError> {
        let picked: Vec<u64> = {
            let view = self.view.lock().unwrap();
            let picks = |m: &Meta| selection.picks_id(&m.id);
            view.sequences(namespace, 0, picks).collect()
        };
        let mut report = RedriveReport::default();
        let mut found = HashSet::new();
        // A page of letters in memory at a time, in DLQ order.
        for page in picked.chunks(REDRIVE_PAGE) {
            let mut letters = self.fetch(page.to_vec()).await?;
            letters.retain(|l| selection.picks_target(&l.origin.target));
            // Only named ids need looking for (all of a large DLQ would not).
            if selection.names_ids() {
                found.extend(letters.iter().map(|l| l.entry.id.clone()));
            }
            let (routable, unroutable): (Vec<_>, Vec<_>) = letters
                .into_iter()
                .partition(|l| l.origin.shard.shard < shards);
            report
                .unroutable
                .extend(unroutable.into_iter().map(|l| l.entry.id));
            let sends = routable.iter().map(|l| self.redrive(l));
            let results = futures_util::future::join_all(sends).await;
            for (letter, result) in routable.iter().zip(results) {
                match result {
                    Ok(()) => report.redriven += 1,
                    Err(e) => report.failed.push((letter.entry.id.clone(), e.to_string())),
                }
            }
        }
        report.not_found = selection.missing(found.iter().map(String::as_str));
        Ok(report)
    }

    /// Send a letter's entry back to its origin partition, with its original
    /// sequence, then remove the letter (one that holds its key stays until
    /// its entry is applied). Resolves once both are on the broker. An error
    /// before the entry's produce is acknowledged leaves the letter listed.
    pub async fn redrive(&self, letter: &DeadLetter) -> Result<(), BackendError> {
        let sequence = letter.origin.sequence.to_string();
        // Back to the target that failed it, and only to it.
        let mut entry = letter.entry.clone();
        if self.narrow_redrives.load(Ordering::Relaxed) && !letter.origin.target.is_empty() {
            entry.narrow_to(&letter.origin.target);
        }
        self.origin
            .produce(
                Some(letter.origin.shard.shard),
                &entry,
                &[(super::REDRIVEN_SEQUENCE, sequence)],
            )
            .await?;
        if self.holds_key(letter.dlq_sequence).is_some() {
            // It stays until applied: removing it now would release its key
            // before the entry is back, letting later entries pass it.
            return Ok(());
        }
        self.tombstone(&letter.entry.id, letter.dlq_sequence, "redriven")
            .await
    }

    async fn tombstone(
        &self,
        id: &str,
        dlq_sequence: u64,
        reason: &str,
    ) -> Result<(), BackendError> {
        let removes = dlq_sequence.to_string();
        let mut headers = OwnedHeaders::new();
        header(&mut headers, H_REMOVED, reason);
        header(&mut headers, H_REMOVES, &removes);
        let (offset, _) = self
            .producer
            .produce_record(Some(0), id, None, headers)
            .await?;
        self.caught_up(offset + 1).await?;
        Ok(())
    }

    /// The letters at these DLQ sequences (offsets), read from the topic in
    /// one pass from the first to the last. A letter removed meanwhile is
    /// still read (the topic keeps it); one the topic no longer has (its
    /// retention deleted it) is an error.
    async fn fetch(&self, mut offsets: Vec<u64>) -> Result<Vec<DeadLetter>, BackendError> {
        offsets.sort_unstable();
        offsets.dedup();
        if offsets.is_empty() {
            return Ok(Vec::new());
        }
        let (fetcher, topic, timeout) = (self.fetcher.clone(), self.topic.clone(), self.timeout);
        let read = tokio::task::spawn_blocking(move || {
            let fetcher = fetcher.lock().unwrap();
            read_letters(&fetcher, &topic, &offsets, timeout)
        });
        let letters = read.await.map_err(|e| KafkaError::Topic {
            topic: self.topic.clone(),
            message: format!("reading letters panicked: {e}"),
        })??;
        Ok(letters)
    }
}

/// Letters a redrive reads back into memory at a time.
const REDRIVE_PAGE: usize = 1000;

/// Read the letters at `wanted` (sorted, not empty) from partition 0 of
/// `topic`, in one pass.
fn read_letters(
    fetcher: &BaseConsumer<WaldenContext>,
    topic: &str,
    wanted: &[u64],
    timeout: Duration,
) -> Result<Vec<DeadLetter>, KafkaError> {
    let (first, last) = (wanted[0], wanted[wanted.len() - 1]);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(first as i64))
        .map_err(|e| KafkaError::client("dlq fetcher", topic, e))?;
    fetcher
        .assign(&tpl)
        .map_err(|e| KafkaError::client("dlq fetcher", topic, e))?;
    let problem = |message: String| KafkaError::Topic {
        topic: topic.to_string(),
        message,
    };
    let missing = |at: u64| {
        problem(format!(
            "the letter at offset {at} is no longer in the topic (did its retention delete it?)"
        ))
    };
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::with_capacity(wanted.len());
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(problem(format!(
                "reading letters {first} to {last} timed out"
            )));
        }
        match fetcher.poll(left.min(Duration::from_millis(200))) {
            None => {}
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {
                return Err(missing(wanted[out.len()]));
            }
            Some(Err(e)) => return Err(KafkaError::client("dlq fetcher", topic, e)),
            Some(Ok(msg)) => {
                let at = msg.offset().max(0) as u64;
                if wanted.binary_search(&at).is_ok() {
                    let (letter, _) = letter_of(topic, &msg).ok_or_else(|| missing(at))?;
                    out.push(letter);
                }
                if at >= last {
                    return Ok(out);
                }
            }
        }
    }
}

/// Apply the DLQ topic to the view, from the start, until stopped.
fn tail(
    consumer: Arc<StreamConsumer<WaldenContext>>,
    topic: String,
    view: Arc<Mutex<View>>,
    applied: watch::Sender<u64>,
    stop: Arc<AtomicBool>,
) {
    // It reads by assignment, outside any group, so nothing fences it.
    let _ = serve(&consumer, &stop, &topic, "DLQ reader", |msg| {
        let offset = msg.offset().max(0) as u64;
        apply(&view, &topic, &msg);
        applied.send_replace(offset + 1);
    });
}

fn apply(view: &Mutex<View>, topic: &str, msg: &BorrowedMessage<'_>) {
    let Some(id) = msg.key().map(|k| String::from_utf8_lossy(k).into_owned()) else {
        return;
    };
    if msg.payload().is_none() {
        let only = msg.headers().and_then(|hs| {
            hs.iter()
                .find(|h| h.key == H_REMOVES)
                .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
        });
        view.lock().unwrap().remove(&id, only);
        return;
    }
    let Some((letter, holds)) = letter_of(topic, msg) else {
        return;
    };
    let o = &letter.origin;
    view.lock().unwrap().put(
        letter.dlq_sequence,
        &letter.entry.id,
        (&o.shard.namespace, o.shard.shard, o.sequence),
        &o.target,
        holds,
    );
}

/// The letter a record of the DLQ topic holds, and the key it holds; `None`
/// for a tombstone or a record without a key.
fn letter_of(topic: &str, msg: &BorrowedMessage<'_>) -> Option<(DeadLetter, Option<String>)> {
    msg.key()?;
    Some(letter_from(
        topic,
        msg.partition(),
        msg.offset(),
        msg.payload()?,
        pairs(msg.headers()),
        msg.timestamp().to_millis(),
    ))
}

/// The letter a DLQ record holds, from the record's parts, and the key it
/// holds.
pub(crate) fn letter_from<'h>(
    topic: &str,
    partition: i32,
    offset: i64,
    payload: &[u8],
    headers: impl IntoIterator<Item = (&'h str, Option<&'h [u8]>)>,
    timestamp_ms: Option<i64>,
) -> (DeadLetter, Option<String>) {
    let mut entry = entry_of(
        topic,
        partition,
        offset,
        None,
        Some(payload),
        headers,
        timestamp_ms,
    );
    let mut fields: HashMap<String, String> = HashMap::new();
    entry.headers.retain(|(k, v)| {
        let ours = k.starts_with("walden.dlq.") || k == H_KEY || k == H_TIMESTAMP;
        if ours {
            fields.insert(k.clone(), v.clone());
        }
        !ours
    });
    let num = |k: &str| {
        fields
            .get(k)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    entry.key = fields.get(H_KEY).cloned();
    entry.timestamp_ms = num(H_TIMESTAMP);
    let namespace = fields.get(H_NAMESPACE).cloned().unwrap_or_default();
    let holds = fields.get(H_HOLDS).cloned();
    let letter = DeadLetter {
        dlq_sequence: offset.max(0) as u64,
        origin: Origin {
            shard: ShardRef::new(namespace, num(H_SHARD) as u32),
            sequence: num(H_SEQUENCE),
            target: fields.get(H_TARGET).cloned().unwrap_or_default(),
        },
        attempts: num(H_ATTEMPTS) as u32,
        first_failure_ms: num(H_FIRST),
        last_failure_ms: num(H_LAST),
        last_error: fields.get(H_ERROR).cloned().unwrap_or_default(),
        entry,
    };
    (letter, holds)
}

impl crate::backends::KeyHolds for KafkaDlq {
    fn holder(&self, target: &str, shard: u32, key: &str) -> Option<String> {
        KafkaDlq::holder(self, target, shard, key)
    }

    fn is_holding(&self, target: &str, id: &str) -> bool {
        KafkaDlq::is_holding(self, target, id)
    }

    fn holding_letter(&self, target: &str, id: &str) -> Option<u64> {
        KafkaDlq::holding_letter(self, target, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_lasts_while_its_letter_does() {
        let mut view = View::default();
        view.put(0, "a", ("ns", 1, 10), "t", Some("k".into()));
        view.put(1, "b", ("ns", 1, 11), "t", None);
        assert_eq!(view.holder("t", 1, "k"), Some("a"));
        assert_eq!(view.holder("t", 0, "k"), None, "another shard");
        assert!(view.is_holding("t", "a") && !view.is_holding("t", "b"));
        // Another entry with the same id: a second letter, and both hold.
        view.put(2, "a", ("ns", 1, 12), "t", Some("k".into()));
        assert_eq!(view.holder("t", 1, "k"), Some("a"));
        assert_eq!(view.holding("t", "a").collect::<Vec<_>>(), [0, 2]);
        // The letter behind it going changes nothing.
        view.remove("b", Some(1));
        assert_eq!(view.holder("t", 1, "k"), Some("a"));
        // A tombstone for the older letter leaves the newer one holding.
        view.remove("a", Some(0));
        assert!(view.is_holding("t", "a"));
        assert_eq!(view.by_id["a"].len(), 1);
        // Removed (applied after a redrive, or purged): the hold ends.
        view.remove("a", Some(2));
        assert_eq!(view.holder("t", 1, "k"), None);
        assert!(!view.is_holding("t", "a"));
        assert!(view.held[&1].is_empty());
        assert!(view.by_id.is_empty());
    }

    #[test]
    fn an_entry_dead_lettered_twice_is_one_letter() {
        let mut view = View::default();
        view.put(0, "a", ("ns", 1, 10), "t", Some("k".into()));
        // Its partition moved mid-delivery; the new owner buried it too.
        view.put(1, "a", ("ns", 1, 10), "t", Some("k".into()));
        assert_eq!(view.by_id["a"].len(), 1);
        assert_eq!(view.by_sequence.len(), 1);
        // The same id at another place, or in another shard, is its own.
        view.put(2, "a", ("ns", 1, 20), "t", None);
        view.put(3, "a", ("ns", 2, 10), "t", None);
        assert_eq!(view.by_id["a"].len(), 3);
        // Once the first is gone, the entry may be dead-lettered anew.
        view.remove("a", Some(0));
        view.put(4, "a", ("ns", 1, 10), "t", None);
        assert_eq!(view.by_id["a"].len(), 3);
    }

    #[test]
    fn holds_are_per_target() {
        let mut view = View::default();
        // One entry dead-lettered by two targets: two letters, each its
        // target's hold.
        view.put(0, "a", ("ns", 1, 10), "search", Some("k".into()));
        view.put(1, "a", ("ns", 1, 10), "db", Some("k".into()));
        assert_eq!(view.by_sequence.len(), 2);
        view.put(2, "b", ("ns", 1, 11), "search", Some("j".into()));
        assert_eq!(view.holder("search", 1, "j"), Some("b"));
        assert_eq!(view.holder("db", 1, "j"), None, "db's key j is free");
        assert_eq!(view.holding("db", "a").collect::<Vec<_>>(), [1]);
        view.remove("a", Some(1));
        assert_eq!(view.holder("db", 1, "k"), None);
        assert_eq!(view.holder("search", 1, "k"), Some("a"));
        // A letter from before letters named their target holds for all.
        view.put(3, "c", ("ns", 2, 5), "", Some("m".into()));
        assert_eq!(view.holder("db", 2, "m"), Some("c"));
        assert!(view.is_holding("search", "c"));
    }
}
