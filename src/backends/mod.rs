//! Queue backends, split by capability in the style of omniqueue: a
//! [`Producer`] appends, a [`Consumer`] delivers entries in order, and every
//! [`Delivery`] carries its own ack and nack. A failed ack or nack hands the
//! delivery back, so the caller can retry without losing it.
//!
//! Each backend lives in its own folder and only sets itself up; what does
//! not depend on a backend stays here. [`DeadLetters`] and [`DelayStore`]
//! are the backend's places for entries that failed or must wait; a broker
//! backend keeps them on the broker. The conformance suite in
//! `tests/conformance/` is written once against these traits and runs on
//! every backend.

pub mod embedded;
pub mod fuzz;
pub mod kafka;
pub mod open;
pub mod shard;
pub mod sqs;
pub(crate) mod tracker;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::entry::{Delivered, Durable, Entry, ShardRef};

/// Lets a repeated warning through at most once per interval: a broker or
/// queue server that is down makes every retry fail the same way.
#[derive(Default)]
pub(crate) struct Throttle(Option<std::time::Instant>);

impl Throttle {
    const EVERY: Duration = Duration::from_secs(10);

    pub(crate) const fn new() -> Self {
        Self(None)
    }

    pub(crate) fn ready(&mut self) -> bool {
        let now = std::time::Instant::now();
        let ready = self.0.is_none_or(|t| now.duration_since(t) >= Self::EVERY);
        if ready {
            self.0 = Some(now);
        }
        ready
    }
}

/// Where a part of a backend that can no longer work says why (a consumer
/// fenced out of its group); the service then stops with that error.
#[derive(Clone, Debug, Default)]
pub struct Fatal(Option<tokio::sync::mpsc::UnboundedSender<String>>);

impl Fatal {
    pub fn channel() -> (Self, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Self(Some(tx)), rx)
    }

    pub fn report(&self, why: String) {
        tracing::error!(error = %why, "Fatal: the service stops.");
        if let Some(tx) = &self.0 {
            let _ = tx.send(why);
        }
    }
}

/// Errors of any backend, each keeping its backend's own typed error.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Embedded(#[from] embedded::LogError),
    #[error(transparent)]
    Kafka(#[from] kafka::KafkaError),
    #[error(transparent)]
    Sqs(#[from] sqs::SqsError),
    /// The local state store (park, delay and dedup) failed. Boxed, so the
    /// backends know nothing of the store that sits above them.
    #[error(transparent)]
    State(Box<dyn std::error::Error + Send + Sync>),
    /// This process's role does not do that.
    #[error("{0}")]
    NotHere(&'static str),
    /// The backend dropped a write without answering: it may have it.
    #[error("{0}; its outcome is unknown")]
    Lost(&'static str),
}

impl BackendError {
    /// What a client should be told about a send that failed this way.
    pub fn durable(&self) -> Durable {
        match self {
            BackendError::Embedded(e) => e.durable(),
            BackendError::Kafka(e) => e.durable(),
            BackendError::Sqs(e) => e.durable(),
            // The state store is only written after the entry is durable.
            BackendError::State(_) | BackendError::NotHere(_) => Durable::False,
            BackendError::Lost(_) => Durable::Unknown,
        }
    }

    /// The backend refused the entry itself (it can never be written): the
    /// client is told 400.
    pub fn is_invalid(&self) -> bool {
        match self {
            BackendError::Embedded(e) => matches!(e, embedded::LogError::InvalidRecord(_)),
            BackendError::Kafka(e) => e.is_invalid(),
            _ => false,
        }
    }

    /// Retrying cannot change this answer: the entry is invalid, or the
    /// broker refuses this client (not authorized).
    pub fn is_permanent(&self) -> bool {
        self.is_invalid() || matches!(self, BackendError::Kafka(e) if e.is_unauthorized())
    }

    /// The backend refused the write for load (nothing was written): the
    /// client is told 429 and retries later.
    pub fn is_busy(&self) -> bool {
        match self {
            BackendError::Embedded(e) => matches!(e, embedded::LogError::Busy),
            BackendError::Kafka(e) => e.is_queue_full(),
            BackendError::Sqs(_)
            | BackendError::State(_)
            | BackendError::NotHere(_)
            | BackendError::Lost(_) => false,
        }
    }
}

/// An entry a backend cannot take, and why; checked at ingest.
#[derive(Debug)]
pub enum EntryRejected {
    /// Larger than the backend can store (413).
    TooLarge(String),
    /// Not valid on this backend (400).
    Invalid(String),
}

/// A backend's answer for an appended entry: the one answer type of the
/// write path, on every backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The entry's position in its shard (the log offset, the Kafka offset,
    /// or an HLC on SQS); it only grows, so targets can use it as a version.
    pub sequence: u64,
    /// When it was written, ms since the epoch.
    pub timestamp_ms: u64,
    /// `True` once durable (fsync, acks=all, SendMessage); `Unknown` when the
    /// backend does not say (the embedded log with `fsync = "never"`).
    pub durable: Durable,
}

/// Where the answer to one append goes.
pub type WriteReply = tokio::sync::oneshot::Sender<Result<Appended, BackendError>>;

/// Where a dead letter came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub shard: ShardRef,
    /// The entry's sequence in its shard; a redrive keeps it.
    pub sequence: u64,
    /// The name of the target it failed to reach.
    pub target: String,
}

/// An entry that could not be delivered, with why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// Position in the DLQ (set by the store; ignored on append).
    pub dlq_sequence: u64,
    /// The original entry, unchanged.
    pub entry: Entry,
    pub origin: Origin,
    pub attempts: u32,
    pub first_failure_ms: u64,
    pub last_failure_ms: u64,
    pub last_error: String,
}

/// A dead-letter queue. Appends are durable before they resolve.
///
/// Each letter is its own, named by its DLQ sequence: an entry id that is
/// dead-lettered twice (a client reusing it, or an entry failing again after
/// a redrive) has two letters, and neither hides the other.
pub trait DeadLetters: Send + Sync {
    /// Store a letter; resolves with its DLQ sequence once durable.
    fn append(&self, letter: DeadLetter) -> impl Future<Output = Result<u64, BackendError>> + Send;

    /// Live letters of `namespace` after DLQ sequence `after`, at most
    /// `limit`, in order; and how many are live in all.
    fn list(
        &self,
        namespace: &str,
        after: Option<u64>,
        limit: usize,
    ) -> impl Future<Output = Result<(Vec<DeadLetter>, usize), BackendError>> + Send;

    /// Every live letter of entry `id`, oldest first.
    fn get(
        &self,
        namespace: &str,
        id: &str,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, BackendError>> + Send;

    /// Remove the letter at `dlq_sequence` (purged, or redriven and
    /// applied); false if it was not live. Durable before it resolves.
    fn remove(
        &self,
        namespace: &str,
        dlq_sequence: u64,
        reason: &str,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;
}

/// Which dead letters an admin action picks: by entry id or all, and of one
/// target or of every target.
#[derive(Clone, Debug)]
pub struct Selection {
    pub pick: Pick,
    /// Only the letters of this target (`?target=`).
    pub target: Option<String>,
}

#[derive(Clone, Debug)]
pub enum Pick {
    /// Every letter of these entry ids.
    Ids(Vec<String>),
    All,
}

impl Selection {
    pub fn all() -> Self {
        Self {
            pick: Pick::All,
            target: None,
        }
    }

    pub fn ids(ids: Vec<String>) -> Self {
        Self {
            pick: Pick::Ids(ids),
            target: None,
        }
    }

    /// Ids were named (so the ones not found are reported).
    pub fn names_ids(&self) -> bool {
        matches!(self.pick, Pick::Ids(_))
    }

    pub fn picks(&self, letter: &DeadLetter) -> bool {
        self.picks_id(&letter.entry.id) && self.picks_target(&letter.origin.target)
    }

    pub fn picks_id(&self, id: &str) -> bool {
        match &self.pick {
            Pick::Ids(ids) => ids.iter().any(|i| i == id),
            Pick::All => true,
        }
    }

    pub fn picks_target(&self, target: &str) -> bool {
        self.target.as_deref().is_none_or(|t| t == target)
    }

    /// The named ids that are not among `found` (the ids of the letters an
    /// action found); none for `All`.
    pub fn missing<'a>(&self, found: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let Pick::Ids(ids) = &self.pick else {
            return Vec::new();
        };
        let found: std::collections::HashSet<&str> = found.into_iter().collect();
        let mut missing: Vec<String> = Vec::new();
        for id in ids {
            if !found.contains(id.as_str()) && !missing.contains(id) {
                missing.push(id.clone());
            }
        }
        missing
    }
}

/// What a redrive onto a broker did.
#[derive(Debug, Default)]
pub struct RedriveReport {
    pub redriven: usize,
    /// Named ids with no letter.
    pub not_found: Vec<String>,
    /// Letters whose origin is not one of the namespace's shards.
    pub unroutable: Vec<String>,
    /// Entry ids not put back, and why; their letters stay.
    pub failed: Vec<(String, String)>,
}

/// The first DLQ sequence a listing `after` starts at; `None` when nothing
/// can follow (`after` is the largest sequence).
pub(crate) fn listing_start(after: Option<u64>) -> Option<u64> {
    match after {
        None => Some(0),
        Some(a) => a.checked_add(1),
    }
}

/// Key holds that live with their dead letters on a broker (`hold_key` on
/// Kafka), where any process that takes a partition over finds them; each
/// target's holds are its own. The applier asks this capability; it never
/// names the backend.
pub trait KeyHolds: Send + Sync {
    /// The id of the live letter holding `key` of `shard` for `target`, if
    /// any. The view may trail the broker by a moment.
    fn holder(&self, target: &str, shard: u32, key: &str) -> Option<String>;
    /// Whether a live letter of `id` holds its key for `target`.
    fn is_holding(&self, target: &str, id: &str) -> bool;
    /// The DLQ sequence of the oldest live letter of `id` that holds its key
    /// for `target`.
    fn holding_letter(&self, target: &str, id: &str) -> Option<u64>;
}

/// What became of a set of mutations staged on a backend that cannot write
/// it as one unit ([`SetStaging`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetFate {
    Applied,
    /// Stored in the DLQ as one letter.
    DeadLettered,
    /// Its marker never came (its producer died half-way): nothing of it is
    /// applied.
    Abandoned,
}

impl SetFate {
    pub fn as_str(self) -> &'static str {
        match self {
            SetFate::Applied => "applied",
            SetFate::DeadLettered => "dead_lettered",
            SetFate::Abandoned => "abandoned",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "applied" => Some(SetFate::Applied),
            "dead_lettered" => Some(SetFate::DeadLettered),
            "abandoned" => Some(SetFate::Abandoned),
            _ => None,
        }
    }
}

/// A staged set at its marker: its mutations, or its fate if it is settled
/// already.
pub enum Gathered {
    Members(Vec<Delivered>),
    Settled(SetFate),
}

/// Where a backend whose log cannot write a set as one unit (Kafka: its
/// mutations sit in several partitions, maybe owned by several processes)
/// stages the set for its targets. Each mutation is published once it is
/// the first of its key for a target; the owner of the marker's shard
/// gathers them, applies the set whole, and settles it for every mutation.
/// Sets are named by attempt ([`Entry::set_attempt`]).
pub trait SetStaging: Send + Sync {
    /// `member` is ready for `target`: resolves with its set's fate.
    fn member(
        &self,
        target: &str,
        member: Delivered,
    ) -> BoxFuture<'static, Result<SetFate, String>>;
    /// The set of `marker`, once every mutation of it is ready for `target`.
    fn gather(
        &self,
        target: &str,
        marker: &Delivered,
    ) -> BoxFuture<'static, Result<Gathered, String>>;
    /// Record the set `attempt` settled for `target`, durably.
    fn settle(
        &self,
        target: &str,
        attempt: &str,
        fate: SetFate,
    ) -> BoxFuture<'static, Result<(), String>>;
    /// A request to give a set up, reached in shard 0 for `target` after
    /// anything before it there: the set is given up unless its marker came
    /// first (and has settled it for `target`).
    fn abandon(&self, target: &str, request: &Delivered) -> BoxFuture<'static, Result<(), String>>;
    /// When the oldest set `target` still gathers began to.
    fn oldest_waiting_ms(&self, target: &str) -> Option<u64>;
}

/// Appends entries to a backend: the one write path. Ingest calls it for
/// every client write, and the conformance suite calls it too.
pub trait Producer: Send + Sync {
    /// Hand `writes` to the backend for `shard`, in order. Each answer goes to
    /// its reply once the backend has made that entry durable, or failed to.
    /// Does not wait: the backend queues them itself (the embedded log's
    /// committer, librdkafka, the SQS client), so it is called on the task
    /// that took the request. A reply dropped unanswered means the outcome
    /// is unknown.
    fn append(&self, shard: &ShardRef, writes: Vec<(Entry, WriteReply)>);

    /// Why the backend cannot take `entry`, asked before it is appended so
    /// the client is told at once (an SQS message is at most 256 KiB).
    fn check_entry(&self, _entry: &Entry) -> Result<(), EntryRejected> {
        Ok(())
    }

    /// Append a set of mutations as one unit: each entry to its shard, in
    /// order, the set's marker last. A reader sees all of them or none, and
    /// they are durable together; each answer goes to its reply. Ingest asks
    /// [`Producer::check_set`] first.
    fn append_set(&self, writes: Vec<(ShardRef, Entry, WriteReply)>) {
        for (_, _, tx) in writes {
            let _ = tx.send(Err(BackendError::NotHere(
                "this backend does not take sets of mutations",
            )));
        }
    }

    /// Why the backend cannot take sets of mutations, if it cannot: the
    /// client is told 400 with this reason.
    fn check_set(&self) -> Result<(), String> {
        Err("this namespace's backend does not take sets of mutations".into())
    }
}

/// Append one entry through `producer` and wait for its answer.
pub async fn append_one(
    producer: &dyn Producer,
    shard: &ShardRef,
    entry: Entry,
) -> Result<Appended, BackendError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    producer.append(shard, vec![(entry, tx)]);
    rx.await
        .unwrap_or(Err(BackendError::Lost("the backend dropped the write")))
}

/// The producer of a process that takes no writes (`--role consumer`).
pub struct NoWrites;

impl Producer for NoWrites {
    fn append(&self, _shard: &ShardRef, writes: Vec<(Entry, WriteReply)>) {
        for (_, tx) in writes {
            let _ = tx.send(Err(BackendError::NotHere(
                "this process does not accept writes (--role consumer)",
            )));
        }
    }
}

/// Reads one shard's entries in order for a consumer group.
pub trait Consumer: Send {
    type Delivery: Delivery;

    /// Wait up to `timeout` for entries; returns at most `max`, possibly none.
    /// Nacked entries come first.
    fn receive(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<Self::Delivery>, BackendError>> + Send;

    /// Persist progress: the low watermark, before which every delivery has
    /// been acked. Entries after it are delivered again after a restart.
    fn commit(&mut self) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// One delivered entry and its ack handle.
pub trait Delivery: Send + Sized {
    fn entry(&self) -> &Arc<Entry>;
    fn shard(&self) -> &ShardRef;
    fn sequence(&self) -> u64;
    /// The entry is done with (applied, parked or dead-lettered).
    fn ack(self) -> impl Future<Output = Result<(), (BackendError, Self)>> + Send;
    /// The entry must be delivered again.
    fn nack(self) -> impl Future<Output = Result<(), (BackendError, Self)>> + Send;
}

/// The way back onto a namespace's shards for an entry that left them (a
/// delay that came due on another queue): with the sequence it was first
/// given, so a target's version guard ranks it where it was written.
pub trait PutBack: Send + Sync {
    fn put_back<'a>(
        &'a self,
        shard: u32,
        entry: &'a Entry,
        sequence: u64,
    ) -> BoxFuture<'a, Result<(), BackendError>>;
}

/// The process's own log, shared by its namespaces, as `/readyz` and
/// `/metrics` see it.
pub trait LogHealth: Send + Sync {
    /// `Err(why)` while the log refuses writes.
    fn ready(&self) -> Result<(), String>;

    /// Its figures for `/metrics`.
    fn metrics(&self) -> Vec<Metric>;
}

/// One Prometheus sample without labels.
#[derive(Clone, Debug)]
pub struct Metric {
    pub name: &'static str,
    /// `counter` or `gauge`.
    pub kind: &'static str,
    pub help: &'static str,
    pub value: u64,
}

/// A topic outside every namespace's own log, for a target that publishes
/// entries to a broker (the Kafka target): the broker client stays in its
/// backend, and the sink asks only for this.
pub trait Topic: Send + Sync {
    /// Publish `entry` keyed by its key (its id when it has none), with
    /// `extra` headers after its own; resolves once the broker has it.
    fn publish<'a>(
        &'a self,
        entry: &'a Entry,
        extra: &'a [(&'a str, String)],
    ) -> BoxFuture<'a, Result<(), BackendError>>;

    /// Publish `entries` (each with its `extra` headers) as one unit where
    /// the topic was opened with a transactional id: one transaction, which
    /// readers with `isolation.level = read_committed` see whole or not at
    /// all. Otherwise one after another, in order.
    fn publish_all<'a>(
        &'a self,
        entries: &'a [(&'a Entry, Vec<(&'a str, String)>)],
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            for (entry, extra) in entries {
                self.publish(entry, extra).await?;
            }
            Ok(())
        })
    }

    /// Ok when the topic exists and the broker answers.
    fn check(&self) -> BoxFuture<'_, Result<(), BackendError>>;
}

/// Where a [`Topic`] lives: a Kafka cluster's `brokers`, with librdkafka
/// options, answering within `timeout`.
pub struct TopicAddress<'a> {
    pub brokers: &'a str,
    pub topic: &'a str,
    pub options: &'a std::collections::BTreeMap<String, String>,
    pub timeout: Duration,
    /// Publish [`Topic::publish_all`] in transactions under this id; one
    /// producer may use an id at a time (a second fences the first out).
    pub transactional_id: Option<String>,
}

/// A producer for `address` (idempotent, acks=all). Checks the options;
/// does not connect.
pub fn open_topic(address: TopicAddress<'_>) -> Result<Box<dyn Topic>, BackendError> {
    Ok(Box::new(kafka::KafkaTopic::open(address)?))
}

/// How much one read may bring into memory: at most `entries`, and no more
/// entries once their payloads reach `bytes` (the first always comes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub entries: usize,
    pub bytes: usize,
}

impl Limit {
    /// At most `n` entries, whatever their size.
    pub const fn entries(n: usize) -> Self {
        Self {
            entries: n,
            bytes: usize::MAX,
        }
    }

    /// Take `items` (in order) while the limit allows.
    pub fn take<T>(self, items: impl IntoIterator<Item = T>, size: impl Fn(&T) -> usize) -> Vec<T> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in items.into_iter().take(self.entries) {
            if !out.is_empty() && bytes >= self.bytes {
                break;
            }
            bytes = bytes.saturating_add(size(&item));
            out.push(item);
        }
        out
    }
}

/// An entry read back from a log, with its position there (an offset: on
/// Kafka a redriven copy's position differs from its sequence).
#[derive(Clone, Debug)]
pub struct Logged {
    pub position: u64,
    pub delivered: Delivered,
}

/// A log that can be read again from a point in time: what a replay reads.
/// Positions are a shard's offsets. Blocking calls (a read of the log, a
/// broker round trip); run them off the async workers.
pub trait ReplayLog: Send + Sync {
    /// The first position of `shard` written at or after `at_ms` (the end,
    /// if there is none).
    fn position_at(&self, shard: &ShardRef, at_ms: u64) -> Result<u64, BackendError>;

    /// The position the next entry of `shard` will get.
    fn end(&self, shard: &ShardRef) -> Result<u64, BackendError>;

    /// The earliest position of `shard` the log still holds, and its write
    /// time (`None`: the shard holds nothing).
    fn earliest(&self, shard: &ShardRef) -> Result<(u64, Option<u64>), BackendError>;

    /// Whether retention has deleted entries of `shard`: the log no longer
    /// reaches back to its first one.
    fn trimmed(&self, shard: &ShardRef) -> Result<bool, BackendError>;

    /// Entries of `shard` from position `from`, oldest first, within
    /// `limit`; empty at the end.
    fn read(&self, shard: &ShardRef, from: u64, limit: Limit) -> Result<Vec<Logged>, BackendError>;

    /// Keep the entries of these shards from these positions on against
    /// retention, under `holder`, as a consumer group's progress does (a
    /// log whose retention is not its own, a broker's, cannot).
    fn hold(
        &self,
        holder: &str,
        from: &std::collections::BTreeMap<ShardRef, u64>,
    ) -> Result<(), BackendError>;

    /// Stop holding for `holder`.
    fn release(&self, holder: &str, shards: &[ShardRef]) -> Result<(), BackendError>;
}

/// Where delayed entries wait until they are due, so that a shard's
/// DelayScheduler keeps only the near-term window in memory. Each store keeps
/// a full copy of an entry, since log retention may delete its segment first.
///
/// Object-safe (boxed futures): the scheduler holds an `Arc<dyn DelayStore>`
/// and does not care which backend is behind it.
pub trait DelayStore: Send + Sync {
    /// The store fires its entries itself (a broker's delay tiers), so the
    /// scheduler keeps none of them in memory.
    fn fires_itself(&self) -> bool {
        false
    }

    /// The store as one of a namespace's targets uses it, when each target
    /// needs its own keys (`group`: where the target keeps its progress;
    /// `None`: the namespace's own target). `None`: every target shares this
    /// one (a broker's tiers, which put an entry back on the shared topic
    /// for one target alone).
    fn for_target(&self, _group: Option<&str>) -> Option<Arc<dyn DelayStore>> {
        None
    }

    /// Hold these entries; resolves once they are durable (their deliveries
    /// are acked after).
    fn delay(&self, items: Vec<Delivered>) -> BoxFuture<'_, Result<(), BackendError>>;

    // The defaults of `due_between`, `summary`, `undelay` and `cancel` are
    // what a store that fires itself answers: it hands the scheduler
    // nothing, and forgets an entry once it has fired it.

    /// Entries of `shard` due in `[from_ms, until_ms)`, in (due, sequence)
    /// order, within `limit`.
    fn due_between(
        &self,
        _shard: &ShardRef,
        _from_ms: u64,
        _until_ms: u64,
        _limit: Limit,
    ) -> BoxFuture<'_, Result<Vec<Delivered>, BackendError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// How many entries of `shard` wait, and the earliest due time.
    fn summary(
        &self,
        _shard: &ShardRef,
    ) -> BoxFuture<'_, Result<(u64, Option<u64>), BackendError>> {
        Box::pin(async { Ok((0, None)) })
    }

    /// Forget an entry that was applied, parked or dead-lettered. Need not be
    /// durable: an entry forgotten in memory only fires again (at least once).
    fn undelay(&self, _item: Delivered) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async { Ok(()) })
    }

    /// The waiting entry with this id, if any.
    fn find(
        &self,
        namespace: &str,
        id: &str,
    ) -> BoxFuture<'_, Result<Option<Delivered>, BackendError>>;

    /// Remove a waiting entry for good, durably; false if it was not there.
    fn cancel(&self, _item: &Delivered) -> BoxFuture<'_, Result<bool, BackendError>> {
        Box::pin(async { Ok(false) })
    }
}
