//! The embedded durable log: Walden's default backend.
//!
//! One journal per data directory holds the records of every shard of every
//! embedded namespace. A single committer thread group-commits appends from all
//! of them, so one `fdatasync` covers many writers; readers follow one shard
//! each through per-shard sparse indexes.
//!
//! # On-disk layout
//! ```text
//! <dir>/log/00000000000000000001.seg    segments, numbered without gaps
//! <dir>/log/00000000000000000001.idx    sparse index of a sealed segment
//! <dir>/checkpoints/<group>.ckpt        committed offsets of a consumer group
//! ```
//!
//! A segment starts with a header:
//! ```text
//! magic "WALDENLG" | u32 version | u32 header length | u64 segment id
//! | u64 created ms | u32 n | n × (u16 len, namespace, u32 shard, u64 next offset)
//! | u32 crc32c of everything before it
//! ```
//! The shard table holds each shard's next offset when the segment was
//! created, so offsets stay monotonic after retention deletes old segments.
//!
//! Then records, back to back, little-endian:
//! ```text
//! u32 len | u32 crc32c(body) | body:
//!   u8 kind (1 = entry) | u32 shard | u64 offset | u64 timestamp ms | u64 due ms
//!   | u16 len, namespace | u16 len, id | u32 len (u32::MAX = no key), key
//!   | u16 n headers, n × (u16 len, name, u32 len, value) | payload (the rest)
//! ```
//!
//! # Invariants
//! 1. **An append resolves only after the fsync that covers it** (`always` and
//!    `interval` modes). The committer writes a batch, calls `fdatasync`, and
//!    only then publishes the batch to readers and answers its appenders.
//! 2. **Readers see only durable records.** They read up to the published
//!    durable mark, never up to the end of the file, or take what the
//!    committer hands them after the fsync (`recent.rs`). (In `never` mode the
//!    mark follows the writes; that mode promises nothing.)
//! 3. **Offsets are dense and strictly increasing per shard**, assigned by the
//!    single committer, and never reused for a record that a reader could have
//!    seen: only a torn tail, which no fsync covered, is ever truncated. A
//!    reader that meets a gap knows records were lost, and says so.
//! 4. **A new segment is durable before anything is written to it**: the old
//!    segment is fsynced, the new one's header is fsynced, then the directory.
//!    Deleting a segment also fsyncs the directory.
//! 5. **A failed fsync poisons the log.** The appends it covered are answered
//!    "unknown"; every later append fails at once and is never acknowledged,
//!    because the kernel may already have dropped the dirty pages.
//! 6. **Recovery fsyncs what it keeps** before any reader sees it: a kill
//!    leaves unfsynced records in the page cache, and recovery publishes
//!    them, so they must not be lost to a later power cut (invariant 3).
//! 7. **Recovery truncates only a torn tail**: a bad frame on the last segment
//!    with no valid frame after it. A bad frame with valid frames after it is
//!    corruption: it stays on disk, readers never deliver it, and
//!    [`OnCorruption`] decides whether its shard stops or skips it.
//! 8. **Checkpoints are atomic**: write a temp file, fsync, rename, fsync the
//!    directory.
//! 9. **Zeros are never records.** The active segment is zero-filled up to
//!    1 MiB ahead of the writes (an fsync that does not grow the file is
//!    cheaper), and a frame never starts with a zero length. Sealing a
//!    segment and closing the log trim the zeros, durably; after a crash,
//!    recovery cuts them off as it would a torn tail.
//!
//! # Durability modes ([`FsyncMode`])
//! - `always` (default): every acknowledgement follows the fsync that covers
//!   it. Acknowledged records survive a power cut.
//! - `interval`: writes are batched and fsynced every `fsync_interval_ms`; an
//!   acknowledgement still waits for the fsync that covers it, so it is as
//!   safe as `always`, with higher latency and fewer fsyncs.
//! - `never`: no fsync at all. Appends answer `durable: "unknown"`. A power cut
//!   can lose records that were already delivered, and their offsets can then
//!   be reused. **Unsafe; for benchmarks only.**

mod checkpoint;
mod committer;
mod dlq;
pub mod format;
pub use crate::fs;
mod index;
mod queue;
mod reader;
mod recent;
mod recovery;
mod retention;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Sender, TrySendError};
use tokio::sync::{oneshot, watch};

use crate::backends::BackendError;
use crate::config::{CorruptionSetting, EmbeddedConfig, FsyncSetting, HardMaxPolicy};
use crate::entry::{Durable, Entry, ShardRef};
pub use crate::stats::Counter;
pub use dlq::EmbeddedDlq;
pub(crate) use dlq::decode as decode_letter;
pub use format::Record;
use fs::{Fs, StdFs};
use index::{DurableMark, Index};
pub use queue::{EmbeddedCheckpointer, EmbeddedConsumer, EmbeddedDelivery, EmbeddedProducer};
pub use reader::ShardReader;
pub use recovery::RecoveryReport;
pub use retention::RetentionReport;

/// What one read of a scan (a rebuild at open, a search by time) brings into
/// memory at most: records are up to 16 MiB each, so a count alone is no
/// bound.
pub(crate) const SCAN: crate::backends::Limit = crate::backends::Limit {
    entries: 1024,
    bytes: 4 << 20,
};

/// When the committer calls `fdatasync`. See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FsyncMode {
    #[default]
    Always,
    Interval(Duration),
    Never,
}

/// What a reader does with a record whose checksum does not match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnCorruption {
    /// The shard stops at the bad record and reports where it is.
    #[default]
    Stop,
    /// The bad record is skipped and counted.
    Skip,
}

/// Retention limits. Unset limits never delete anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Delete sealed segments whose newest record is older than this, once
    /// every consumer group has committed them.
    pub max_age: Option<Duration>,
    /// Delete the oldest committed segments while the log is larger than this.
    pub max_bytes: Option<u64>,
    /// The most the log may hold; what happens there is `on_hard_max`.
    pub hard_max_bytes: Option<u64>,
    pub on_hard_max: HardMax,
}

/// What the log does at `hard_max_bytes` when its oldest segments are not
/// yet committed by every consumer group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HardMax {
    /// Refuse appends ([`LogError::Full`]) until consumers commit and
    /// retention can delete what they are done with. Nothing is lost.
    #[default]
    RefuseWrites,
    /// Delete the oldest segments anyway (logged and counted); a consumer
    /// whose next record is gone skips to the earliest one left and counts
    /// what it lost.
    DropOldest,
}

/// Settings of one embedded log.
#[derive(Clone, Debug)]
pub struct LogConfig {
    pub fsync: FsyncMode,
    /// Roll to a new segment once the current one reaches this size.
    pub segment_bytes: u64,
    pub on_corruption: OnCorruption,
    pub retention: Retention,
    /// Appends waiting for the committer; past it, appends fail with `Busy`.
    pub queue_capacity: usize,
    /// The most bytes written by one `write` call.
    pub max_batch_bytes: usize,
}

impl LogConfig {
    /// The log settings an embedded backend's config asks for.
    pub fn from_config(c: &EmbeddedConfig) -> Self {
        let nonzero = |v: u64| (v > 0).then_some(v);
        LogConfig {
            fsync: match c.fsync {
                FsyncSetting::Always => FsyncMode::Always,
                FsyncSetting::Interval => {
                    FsyncMode::Interval(Duration::from_millis(c.fsync_interval_ms))
                }
                FsyncSetting::Never => FsyncMode::Never,
            },
            segment_bytes: c.segment_bytes,
            on_corruption: match c.on_corruption {
                CorruptionSetting::Stop => OnCorruption::Stop,
                CorruptionSetting::Skip => OnCorruption::Skip,
            },
            retention: Retention {
                max_age: nonzero(c.retention_max_age_ms).map(Duration::from_millis),
                max_bytes: nonzero(c.retention_max_bytes),
                hard_max_bytes: nonzero(c.retention_hard_max_bytes),
                on_hard_max: match c.retention_hard_max_policy {
                    HardMaxPolicy::RefuseWrites => HardMax::RefuseWrites,
                    HardMaxPolicy::DropOldest => HardMax::DropOldest,
                },
            },
            ..LogConfig::default()
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            fsync: FsyncMode::Always,
            segment_bytes: 64 << 20,
            on_corruption: OnCorruption::Stop,
            retention: Retention::default(),
            queue_capacity: 65_536,
            max_batch_bytes: 8 << 20,
        }
    }
}

/// Errors of the embedded log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fsync of {path} failed; the outcome of these appends is unknown: {source}")]
    SyncFailed {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("write to {path} failed (rolled back: {rolled_back}): {source}")]
    WriteFailed {
        path: PathBuf,
        /// The partial write was removed, so the append certainly failed.
        rolled_back: bool,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the log is poisoned after an earlier failure ({cause}); it accepts no appends until reopened"
    )]
    Poisoned { cause: String },
    #[error("the log's append queue is full")]
    Busy,
    #[error(
        "the log is full: it holds backend.retention_hard_max_bytes ({cap} bytes) and its oldest entries are not yet applied; writes are refused until they are (retention_hard_max_policy = \"drop_oldest\" drops them instead)"
    )]
    Full { cap: u64 },
    #[error("the log is closed")]
    Closed,
    #[error("the committer stopped before answering; the outcome of this append is unknown")]
    CommitterGone,
    #[error("record refused: {0}")]
    InvalidRecord(#[from] format::FormatError),
    #[error("segment {path} has a bad header: {source}")]
    BadSegmentHeader {
        path: PathBuf,
        #[source]
        source: format::HeaderError,
    },
    #[error("segment {id} is missing ({path}); segments must be numbered without gaps")]
    MissingSegment { id: u64, path: PathBuf },
    #[error(
        "shard {shard}: corrupt record in segment {segment} at byte {position} (offset {offset}): {reason}"
    )]
    Corrupt {
        shard: ShardRef,
        segment: u64,
        position: u64,
        offset: u64,
        reason: String,
    },
    #[error(
        "shard {shard}: offset {requested} is not in the log (earliest retained {earliest}, next {next})"
    )]
    OffsetOutOfRange {
        shard: ShardRef,
        requested: u64,
        earliest: u64,
        next: u64,
    },
    #[error("checkpoint {path} is damaged: {reason}")]
    BadCheckpoint { path: PathBuf, reason: String },
    #[error("invalid consumer group name {0:?}: use letters, digits, '-', '_' and '.'")]
    BadGroupName(String),
}

impl LogError {
    /// What a client should be told about an append that failed this way.
    pub fn durable(&self) -> Durable {
        match self {
            LogError::SyncFailed { .. }
            | LogError::CommitterGone
            | LogError::WriteFailed {
                rolled_back: false, ..
            } => Durable::Unknown,
            _ => Durable::False,
        }
    }

    pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LogError {
        let path = path.to_path_buf();
        move |source| LogError::Io { op, path, source }
    }
}

/// A successful append: its sequence is the record's offset in its shard.
pub use crate::backends::Appended;

/// Counters since the log was opened.
#[derive(Debug, Default)]
pub struct LogStats {
    pub appends: Counter,
    pub bytes: Counter,
    pub fsyncs: Counter,
    pub batches: Counter,
    pub segments_rolled: Counter,
    /// Records a reader skipped as damaged (`on_corruption = "skip"`).
    pub corrupt_skipped: Counter,
    pub retention_deleted: Counter,
    /// Segments deleted by the hard size cap before every group committed them.
    pub retention_forced: Counter,
    /// Appends refused because the log was at its hard size cap.
    pub refused_full: Counter,
    /// Records consumers skipped because the hard cap deleted them first.
    pub retention_lost: Counter,
    /// Records a reader took from another reader of its shard (another
    /// target's) instead of reading the journal again.
    pub shared_reads: Counter,
    /// Records a reader took from what the committer had just made durable,
    /// with no read of the journal.
    pub tail_reads: Counter,
}

/// State shared by the committer, readers and the handle.
pub(crate) struct Shared {
    pub fs: Arc<dyn Fs>,
    pub log_dir: PathBuf,
    pub checkpoint_dir: PathBuf,
    pub config: LogConfig,
    pub index: RwLock<Index>,
    pub durable_tx: watch::Sender<DurableMark>,
    pub poisoned: AtomicBool,
    pub poison_cause: Mutex<Option<String>>,
    pub stats: LogStats,
    /// Committed offsets of every consumer group, as last written.
    pub checkpoints: Mutex<BTreeMap<String, BTreeMap<ShardRef, u64>>>,
    /// Serialises checkpoint writers.
    pub checkpoint_write: Mutex<()>,
    /// Records each shard's consumers skipped because retention deleted them
    /// first, since the log was opened.
    pub lost: Mutex<BTreeMap<ShardRef, u64>>,
    /// What each shard's readers read last, for its other readers.
    pub recent: recent::Recent,
}

impl Shared {
    pub fn poison(&self, cause: String) {
        *self.poison_cause.lock().unwrap_or_else(|p| p.into_inner()) = Some(cause);
        self.poisoned.store(true, Ordering::Release);
    }

    pub fn poisoned_error(&self) -> LogError {
        let cause = self
            .poison_cause
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        LogError::Poisoned { cause }
    }

    pub fn segment_path(&self, id: u64) -> PathBuf {
        segment_path(&self.log_dir, id)
    }
}

pub(crate) fn segment_path(log_dir: &Path, id: u64) -> PathBuf {
    log_dir.join(format!("{id:020}.seg"))
}

pub(crate) fn index_path(log_dir: &Path, id: u64) -> PathBuf {
    log_dir.join(format!("{id:020}.idx"))
}

/// Requests to the committer thread.
pub(crate) enum Command {
    Append(AppendRequest),
    /// A set of mutations and its marker: one unit, all or nothing.
    AppendSet(Vec<AppendRequest>),
    /// fsync everything written so far, then answer.
    Flush(oneshot::Sender<Result<(), LogError>>),
    /// Apply retention now.
    Retention(oneshot::Sender<Result<RetentionReport, LogError>>),
    /// Flush, then stop.
    Shutdown,
}

pub(crate) struct AppendRequest {
    pub shard: ShardRef,
    pub entry: Entry,
    pub reply: AppendReply,
}

/// Where the answer to an append goes: a caller of [`EmbeddedLog::append`]
/// gets the log's own error; the service's write path, which serves every
/// backend, gets a [`BackendError`](crate::backends::BackendError).
pub enum AppendReply {
    Log(oneshot::Sender<Result<Appended, LogError>>),
    Backend(oneshot::Sender<Result<Appended, crate::backends::BackendError>>),
}

impl AppendReply {
    /// Answer; false if nobody waits any more.
    pub fn send(self, result: Result<Appended, LogError>) -> bool {
        match self {
            AppendReply::Log(tx) => tx.send(result).is_ok(),
            AppendReply::Backend(tx) => tx.send(result.map_err(Into::into)).is_ok(),
        }
    }
}

/// One durable log in a data directory.
pub struct EmbeddedLog {
    shared: Arc<Shared>,
    tx: Sender<Command>,
    committer: Mutex<Option<JoinHandle<()>>>,
    recovery: RecoveryReport,
}

impl EmbeddedLog {
    /// Open (or create) the log under `dir` on the real filesystem.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Self, LogError> {
        Self::open_with_fs(Arc::new(StdFs), dir, config)
    }

    /// Open the log through a filesystem seam.
    pub fn open_with_fs(
        fs: Arc<dyn Fs>,
        dir: impl AsRef<Path>,
        config: LogConfig,
    ) -> Result<Self, LogError> {
        let dir = dir.as_ref();
        let log_dir = dir.join("log");
        let checkpoint_dir = dir.join("checkpoints");
        for d in [dir, &log_dir, &checkpoint_dir] {
            fs.create_dir_all(d)
                .map_err(LogError::io("create directory", d))?;
        }
        if config.fsync != FsyncMode::Never {
            // A new directory's own entry must be durable too, or a power cut
            // can take the whole log with it.
            for d in [Some(dir), dir.parent()].into_iter().flatten() {
                if d.as_os_str().is_empty() {
                    continue;
                }
                fs.sync_dir(d).map_err(LogError::io("fsync directory", d))?;
            }
        }
        let recovered = recovery::recover(fs.as_ref(), &log_dir, &config)?;
        let checkpoints = checkpoint::load_all(fs.as_ref(), &checkpoint_dir)?;
        let (durable_tx, _) = watch::channel(recovered.index.mark);
        let shared = Arc::new(Shared {
            fs,
            log_dir,
            checkpoint_dir,
            config,
            index: RwLock::new(recovered.index),
            durable_tx,
            poisoned: AtomicBool::new(false),
            poison_cause: Mutex::new(None),
            stats: LogStats::default(),
            checkpoints: Mutex::new(checkpoints),
            checkpoint_write: Mutex::new(()),
            lost: Mutex::new(BTreeMap::new()),
            recent: recent::Recent::default(),
        });
        let (tx, rx) = crossbeam_channel::bounded(shared.config.queue_capacity);
        let committer = committer::Committer::new(shared.clone(), rx, recovered.writer);
        let handle = std::thread::Builder::new()
            .name("walden-log-committer".into())
            .spawn(move || committer.run())
            .map_err(LogError::io("spawn committer", dir))?;
        Ok(Self {
            shared,
            tx,
            committer: Mutex::new(Some(handle)),
            recovery: recovered.report,
        })
    }

    /// Append an entry to a shard. The returned future resolves once the entry
    /// is durable (or the append failed); it can also be waited on from a
    /// plain thread with [`Appending::wait`].
    pub fn append(&self, shard: &ShardRef, entry: Entry) -> Appending {
        let (reply, rx) = oneshot::channel();
        self.append_to(shard, entry, AppendReply::Log(reply));
        Appending(rx)
    }

    /// Append, and answer on `reply` once the entry is durable (or the
    /// append failed). Lets a caller hand its own channel to the committer,
    /// so the answer takes no extra hop.
    pub fn append_to(&self, shard: &ShardRef, entry: Entry, reply: AppendReply) {
        if self.shared.poisoned.load(Ordering::Acquire) {
            let _ = reply.send(Err(self.shared.poisoned_error()));
            return;
        }
        let req = AppendRequest {
            shard: shard.clone(),
            entry,
            reply,
        };
        if let Err(e) = self.tx.try_send(Command::Append(req)) {
            let (err, req) = match e {
                TrySendError::Full(c) => (LogError::Busy, c),
                TrySendError::Disconnected(c) => (LogError::Closed, c),
            };
            if let Command::Append(req) = req {
                let _ = req.reply.send(Err(err));
            }
        }
    }

    /// Append a set of mutations and its marker (last) as one unit: they go
    /// into one segment back to back, in one write covered by one fsync, so
    /// a reader sees all of them or none. Each answer goes to its reply.
    /// After a crash, recovery cuts off a set whose marker did not make it.
    pub fn append_set(&self, writes: Vec<(ShardRef, Entry, AppendReply)>) {
        let reqs: Vec<AppendRequest> = writes
            .into_iter()
            .map(|(shard, entry, reply)| AppendRequest {
                shard,
                entry,
                reply,
            })
            .collect();
        let refuse = |reqs: Vec<AppendRequest>, err: &dyn Fn() -> LogError| {
            for req in reqs {
                let _ = req.reply.send(Err(err()));
            }
        };
        if self.shared.poisoned.load(Ordering::Acquire) {
            return refuse(reqs, &|| self.shared.poisoned_error());
        }
        if let Err(e) = self.tx.try_send(Command::AppendSet(reqs)) {
            let (busy, cmd) = match e {
                TrySendError::Full(c) => (true, c),
                TrySendError::Disconnected(c) => (false, c),
            };
            if let Command::AppendSet(reqs) = cmd {
                refuse(reqs, &|| match busy {
                    true => LogError::Busy,
                    false => LogError::Closed,
                });
            }
        }
    }

    /// A reader of one shard that starts at `offset`.
    pub fn reader(&self, shard: &ShardRef, offset: u64) -> Result<ShardReader, LogError> {
        ShardReader::open(self.shared.clone(), shard.clone(), offset)
    }

    /// Hand `each` the records of `shard` written at or after `since_ms`,
    /// a bounded read at a time, oldest first.
    pub fn scan_since(
        &self,
        shard: &ShardRef,
        since_ms: u64,
        mut each: impl FnMut(&[Record]),
    ) -> Result<(), LogError> {
        let from = self.offset_for_time(shard, since_ms)?;
        let mut reader = self.reader(shard, from)?;
        loop {
            let batch = reader.read_within(SCAN)?;
            if batch.is_empty() {
                return Ok(());
            }
            each(&batch);
        }
    }

    /// The first offset of `shard` whose timestamp is at or after
    /// `timestamp_ms`, or the shard's next offset if there is none.
    pub fn offset_for_time(&self, shard: &ShardRef, timestamp_ms: u64) -> Result<u64, LogError> {
        reader::offset_for_time(&self.shared, shard, timestamp_ms)
    }

    /// The offset the next durable record of `shard` will have.
    pub fn next_offset(&self, shard: &ShardRef) -> u64 {
        self.shared.index.read().unwrap().next_offset(shard)
    }

    /// The earliest offset of `shard` still in the log.
    pub fn earliest_offset(&self, shard: &ShardRef) -> u64 {
        self.shared.index.read().unwrap().earliest_offset(shard)
    }

    /// Every shard that has ever had a record, with its next offset.
    pub fn shards(&self) -> Vec<(ShardRef, u64)> {
        self.shared.index.read().unwrap().shards()
    }

    /// Atomically record a consumer group's committed offsets (the next offset
    /// to read, per shard). Shards not named keep their previous value.
    pub fn commit(&self, group: &str, offsets: &BTreeMap<ShardRef, u64>) -> Result<(), LogError> {
        checkpoint::commit(&self.shared, group, offsets)
    }

    /// Make `group` a reader of `shards`: one with no committed offset yet
    /// starts at the oldest record the log holds (`from_end`: at the next
    /// one written), and retention keeps what it has not read from then on.
    pub fn subscribe(
        &self,
        group: &str,
        shards: &[ShardRef],
        from_end: bool,
    ) -> Result<(), LogError> {
        let known = self.committed(group);
        let start: BTreeMap<ShardRef, u64> = shards
            .iter()
            .filter(|s| !known.contains_key(*s))
            .map(|s| {
                let at = match from_end {
                    true => self.next_offset(s),
                    false => self.earliest_offset(s),
                };
                (s.clone(), at)
            })
            .collect();
        match start.is_empty() {
            true => Ok(()),
            false => self.commit(group, &start),
        }
    }

    /// `group` no longer reads `shards`: retention stops keeping records
    /// for it.
    pub fn unsubscribe(&self, group: &str, shards: &[ShardRef]) -> Result<(), LogError> {
        checkpoint::forget(&self.shared, group, shards)
    }

    /// Every consumer group with a checkpoint.
    pub fn groups(&self) -> Vec<String> {
        self.shared
            .checkpoints
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    /// A consumer group's committed offsets.
    pub fn committed(&self, group: &str) -> BTreeMap<ShardRef, u64> {
        let all = self.shared.checkpoints.lock().unwrap();
        all.get(group).cloned().unwrap_or_default()
    }

    /// fsync everything appended so far.
    pub async fn flush(&self) -> Result<(), LogError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Flush(tx))
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Delete the segments that retention allows, now. The committer also
    /// does this after every segment roll.
    pub async fn enforce_retention(&self) -> Result<RetentionReport, LogError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Retention(tx))
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// What recovery found when the log was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    pub fn stats(&self) -> &LogStats {
        &self.shared.stats
    }

    /// Total bytes of all segments.
    pub fn size_bytes(&self) -> u64 {
        self.shared.index.read().unwrap().total_bytes()
    }

    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    /// Whether the log is at its hard size cap with the oldest entries not
    /// yet committed, refusing appends (`HardMax::RefuseWrites`).
    pub fn is_full(&self) -> bool {
        let r = self.shared.config.retention;
        r.on_hard_max == HardMax::RefuseWrites
            && r.hard_max_bytes.is_some_and(|cap| self.size_bytes() >= cap)
    }

    /// Records of `shard` its consumers skipped because retention deleted
    /// them before they were committed, since the log was opened.
    pub fn lost_to_retention(&self, shard: &ShardRef) -> u64 {
        let lost = self.shared.lost.lock().unwrap();
        lost.get(shard).copied().unwrap_or(0)
    }

    pub(crate) fn count_lost(&self, shard: &ShardRef, n: u64) {
        *self
            .shared
            .lost
            .lock()
            .unwrap()
            .entry(shard.clone())
            .or_default() += n;
        self.shared.stats.retention_lost.add(n);
    }

    /// Finish the appends already queued, fsync, and stop the committer.
    /// Later appends fail with `Closed`.
    pub fn close(&self) {
        let handle = self.committer.lock().unwrap().take();
        if let Some(handle) = handle {
            let _ = self.tx.send(Command::Shutdown);
            let _ = handle.join();
        }
    }
}

impl Drop for EmbeddedLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// An append in flight. Await it, or call [`Appending::wait`] on a thread
/// that is not running async code.
pub struct Appending(oneshot::Receiver<Result<Appended, LogError>>);

impl Appending {
    /// Block the current thread until the append resolves.
    pub fn wait(self) -> Result<Appended, LogError> {
        self.0
            .blocking_recv()
            .unwrap_or(Err(LogError::CommitterGone))
    }
}

impl Future for Appending {
    type Output = Result<Appended, LogError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(LogError::CommitterGone)))
    }
}
/// Replace `path` with `bytes` atomically: write a temp file, fsync it,
/// rename it over `path`, fsync the directory.
pub(crate) fn write_atomic(
    fs: &dyn crate::fs::Fs,
    dir: &Path,
    path: &Path,
    bytes: &[u8],
    sync: bool,
) -> Result<(), LogError> {
    let tmp = path.with_extension("tmp");
    let file = fs.create(&tmp).map_err(LogError::io("create", &tmp))?;
    file.write_all_at(bytes, 0)
        .map_err(LogError::io("write", &tmp))?;
    if sync {
        file.sync_data().map_err(LogError::io("fsync", &tmp))?;
    }
    fs.rename(&tmp, path)
        .map_err(LogError::io("rename", &tmp))?;
    if sync {
        fs.sync_dir(dir)
            .map_err(LogError::io("fsync directory", dir))?;
    }
    Ok(())
}

impl crate::backends::LogHealth for EmbeddedLog {
    fn ready(&self) -> Result<(), String> {
        if self.is_poisoned() {
            return Err("the embedded log is poisoned after a failed fsync; restart Walden after checking the disk".into());
        }
        if self.is_full() {
            return Err("the embedded log is at backend.retention_hard_max_bytes with entries not yet applied; writes are refused until they are".into());
        }
        Ok(())
    }

    fn metrics(&self) -> Vec<crate::backends::Metric> {
        let s = self.stats();
        let counters = [
            ("walden_log_appends_total", "Records appended to the embedded log.", &s.appends),
            ("walden_log_bytes_total", "Bytes appended to the embedded log.", &s.bytes),
            ("walden_log_fsyncs_total", "fdatasync calls of the embedded log.", &s.fsyncs),
            ("walden_log_segments_rolled_total", "Segments rolled.", &s.segments_rolled),
            ("walden_log_corrupt_skipped_total", "Damaged records skipped.", &s.corrupt_skipped),
            ("walden_log_retention_deleted_total", "Segments deleted by retention.", &s.retention_deleted),
            ("walden_log_retention_forced_total", "Uncommitted segments deleted by the hard size cap.", &s.retention_forced),
            ("walden_log_refused_full_total", "Appends refused at the hard size cap (retention_hard_max_policy = \"refuse_writes\").", &s.refused_full),
            ("walden_log_retention_lost_total", "Entries consumers skipped because the hard size cap deleted them first.", &s.retention_lost),
            ("walden_log_shared_reads_total", "Records a target's reader took from another target's read of the shard.", &s.shared_reads),
            ("walden_log_tail_reads_total", "Records a reader took from what the committer had just made durable, with no read of the journal.", &s.tail_reads),
        ]
        .map(|(name, help, c)| (name, "counter", help, c.get()));
        let gauges = [
            (
                "walden_log_size_bytes",
                "gauge",
                "Size of the embedded log.",
                self.size_bytes(),
            ),
            (
                "walden_log_poisoned",
                "gauge",
                "1 if the log refuses appends after a failed fsync.",
                self.is_poisoned() as u64,
            ),
        ];
        counters
            .into_iter()
            .chain(gauges)
            .map(|(name, kind, help, value)| crate::backends::Metric {
                name,
                kind,
                help,
                value,
            })
            .collect()
    }
}

/// A replay reads the log through a reader of its own, and holds what it has
/// not read yet against retention as a consumer group's checkpoint does.
impl crate::backends::ReplayLog for EmbeddedLog {
    fn position_at(&self, shard: &ShardRef, at_ms: u64) -> Result<u64, BackendError> {
        Ok(self.offset_for_time(shard, at_ms)?)
    }

    fn end(&self, shard: &ShardRef) -> Result<u64, BackendError> {
        Ok(self.next_offset(shard))
    }

    fn earliest(&self, shard: &ShardRef) -> Result<(u64, Option<u64>), BackendError> {
        let first = self.earliest_offset(shard);
        let mut reader = self.reader(shard, first)?;
        let at = reader
            .read_within(crate::backends::Limit::entries(1))?
            .first()
            .map(|r| r.entry.timestamp_ms);
        Ok((first, at))
    }

    fn trimmed(&self, shard: &ShardRef) -> Result<bool, BackendError> {
        Ok(self.earliest_offset(shard) > 0)
    }

    fn read(
        &self,
        shard: &ShardRef,
        from: u64,
        limit: crate::backends::Limit,
    ) -> Result<Vec<crate::backends::Logged>, BackendError> {
        let mut reader = self.reader(shard, from)?;
        Ok(reader
            .read_within(limit)?
            .into_iter()
            .map(|r| crate::backends::Logged {
                position: r.offset,
                delivered: crate::entry::Delivered {
                    shard: shard.clone(),
                    sequence: r.offset,
                    entry: r.entry,
                },
            })
            .collect())
    }

    fn hold(&self, holder: &str, from: &BTreeMap<ShardRef, u64>) -> Result<(), BackendError> {
        Ok(self.commit(holder, from)?)
    }

    fn release(&self, holder: &str, shards: &[ShardRef]) -> Result<(), BackendError> {
        Ok(self.unsubscribe(holder, shards)?)
    }
}
