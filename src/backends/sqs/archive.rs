//! `backend.archive = true`: SQS deletes a message once it is applied, so an
//! SQS namespace keeps a copy of each entry it sends in an embedded log of
//! its own, under `data_dir/archive/<namespace>`, with its own retention. A
//! replay reads the archive.
//!
//! Each producer process archives what it sent: a replay on one process
//! sees that process's writes only (the README says how to reach them all).
//! The copy is appended once SQS has stored the entry, before the write is
//! answered; an archive that fails leaves the write durable in SQS (it is
//! answered as such) and is counted and logged.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::backends::embedded::{EmbeddedLog, LogConfig, LogError, Retention};
use crate::backends::{BackendError, Limit, Logged, ReplayLog};
use crate::entry::{Entry, ShardRef};
use crate::stats::Counter;

/// On an archived copy: the sequence SQS delivery gave the entry (its
/// version at the target), and the time it was written.
const SEQUENCE: &str = "walden.archive.sequence";
const WRITTEN: &str = "walden.archive.timestamp_ms";
/// The archive's own reader: it has read everything, so retention may
/// delete what its limits say.
const HOLDER: &str = "walden.archive";

pub struct SqsArchive {
    log: Arc<EmbeddedLog>,
    shards: u32,
    namespace: String,
    /// Copies that could not be archived, since start.
    pub failed: Counter,
}

impl SqsArchive {
    /// Open (creating) the archive of `namespace` under `dir`, keeping
    /// entries for `max_age` (and at most `max_bytes`, when set). Blocking.
    pub fn open(
        dir: &Path,
        namespace: &str,
        shards: u32,
        max_age: Option<Duration>,
        max_bytes: Option<u64>,
    ) -> Result<Arc<Self>, LogError> {
        let config = LogConfig {
            // Segments small enough for retention to free space steadily.
            segment_bytes: 16 << 20,
            retention: Retention {
                max_age,
                max_bytes,
                ..Retention::default()
            },
            ..LogConfig::default()
        };
        let log = Arc::new(EmbeddedLog::open(dir, config)?);
        Ok(Arc::new(Self {
            log,
            shards,
            namespace: namespace.to_string(),
            failed: Counter::default(),
        }))
    }

    /// Keep marking everything read, so retention's limits alone decide
    /// what goes (a log keeps what no reader has read).
    pub fn start_retention(self: &Arc<Self>) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tick.tick().await;
                let Some(this) = this.upgrade() else { return };
                let read: BTreeMap<ShardRef, u64> = (0..this.shards)
                    .map(|i| {
                        let shard = ShardRef::new(this.namespace.as_str(), i);
                        let next = this.log.next_offset(&shard);
                        (shard, next)
                    })
                    .collect();
                let log = this.log.clone();
                let _ = tokio::task::spawn_blocking(move || log.commit(HOLDER, &read)).await;
            }
        });
    }

    /// Archive the entries SQS stored, `(shard, entry, sequence)`, and wait
    /// until they are durable. A failure is counted and logged, not
    /// returned: the writes are durable in SQS all the same.
    pub async fn keep(&self, copies: Vec<(u32, Entry, u64)>) {
        let appends: Vec<_> = copies
            .into_iter()
            .map(|(shard, mut entry, sequence)| {
                entry.headers.push((SEQUENCE.into(), sequence.to_string()));
                entry
                    .headers
                    .push((WRITTEN.into(), entry.timestamp_ms.to_string()));
                self.log
                    .append(&ShardRef::new(self.namespace.as_str(), shard), entry)
            })
            .collect();
        for result in futures_util::future::join_all(appends).await {
            if let Err(error) = result {
                self.failed.inc();
                tracing::warn!(namespace = %self.namespace, %error,
                    "An entry SQS stored could not be archived; a replay will miss it.");
            }
        }
    }

    pub fn close(&self) {
        self.log.close();
    }
}

/// An archived copy as SQS delivered it: its sequence and write time back,
/// the archive's headers gone.
fn restore(mut l: Logged) -> Logged {
    let e = Arc::make_mut(&mut l.delivered.entry);
    let mut take = |name: &str| {
        let i = e.headers.iter().position(|(k, _)| k == name)?;
        e.headers.remove(i).1.parse::<u64>().ok()
    };
    let (sequence, written) = (take(SEQUENCE), take(WRITTEN));
    if let Some(s) = sequence {
        l.delivered.sequence = s;
    }
    if let Some(t) = written {
        e.timestamp_ms = t;
    }
    l
}

impl ReplayLog for SqsArchive {
    fn position_at(&self, shard: &ShardRef, at_ms: u64) -> Result<u64, BackendError> {
        self.log.position_at(shard, at_ms)
    }

    fn end(&self, shard: &ShardRef) -> Result<u64, BackendError> {
        ReplayLog::end(&*self.log, shard)
    }

    fn earliest(&self, shard: &ShardRef) -> Result<(u64, Option<u64>), BackendError> {
        self.log.earliest(shard)
    }

    fn trimmed(&self, shard: &ShardRef) -> Result<bool, BackendError> {
        self.log.trimmed(shard)
    }

    fn read(&self, shard: &ShardRef, from: u64, limit: Limit) -> Result<Vec<Logged>, BackendError> {
        Ok(self
            .log
            .read(shard, from, limit)?
            .into_iter()
            .map(restore)
            .collect())
    }

    fn hold(&self, holder: &str, from: &BTreeMap<ShardRef, u64>) -> Result<(), BackendError> {
        self.log.hold(holder, from)
    }

    fn release(&self, holder: &str, shards: &[ShardRef]) -> Result<(), BackendError> {
        self.log.release(holder, shards)
    }
}
