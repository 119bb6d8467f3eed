//! The fjall-backed state store: Walden's own state beside the log. It holds
//! the idempotency index and the park store; the delay index follows.

pub mod dedup;
pub mod park;
pub mod replays;

use std::path::{Path, PathBuf};

pub use dedup::DedupIndex;
pub use park::ParkStore;
pub use replays::ReplayStore;

#[derive(Debug, thiserror::Error)]
#[error("state store {path}: {source}")]
pub struct StateError {
    pub path: PathBuf,
    #[source]
    pub source: fjall::Error,
}

impl From<StateError> for crate::backends::BackendError {
    fn from(e: StateError) -> Self {
        crate::backends::BackendError::State(Box::new(e))
    }
}

/// The most a keyspace keeps in memory before flushing to disk.
const MEMTABLE_BYTES: u64 = 8 << 20;
/// fjall's block cache. Recent writes are still in memtables, and lookups of
/// older state are rare, so a small cache serves.
const CACHE_BYTES: u64 = 8 << 20;
/// The journal not yet flushed to tables, at most (fjall's minimum). At open
/// fjall replays it into memtables: at its default (512 MiB), a restart
/// after a gigabyte parked or delayed peaked near a gigabyte of memory.
const JOURNAL_BYTES: u64 = 64 << 20;
/// Memtables (active and sealed, not yet flushed) that writers wait behind.
/// (`write_buffer_size` is fjall 3's own, if not yet stable, measure of it;
/// it counts keys and values, and the memory behind them is two to three
/// times that.)
const MAX_MEMTABLES: u64 = 16 << 20;
/// The longest one write waits for flushes; past it, it goes ahead.
const MAX_STALL: std::time::Duration = std::time::Duration::from_secs(5);

/// One fjall database under `data_dir/state`.
pub struct StateStore {
    path: PathBuf,
    db: fjall::Database,
}

impl StateStore {
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let db = fjall::Database::builder(path)
            .cache_size(CACHE_BYTES)
            .max_journaling_size(JOURNAL_BYTES)
            .open()
            .map_err(|source| StateError {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            db,
        })
    }

    pub(crate) fn keyspace(&self, name: &str) -> Result<fjall::Keyspace, StateError> {
        // Small memtables: the state store holds millions of delayed entries
        // on disk, and fjall's default (64 MiB per keyspace) would keep tens
        // of megabytes of them in memory.
        let options = || fjall::KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES);
        self.db.keyspace(name, options).map_err(|e| self.error(e))
    }

    /// Wait while fjall holds more than [`MAX_MEMTABLES`] in memtables (its
    /// flushes to disk have fallen behind a burst of parks or delays), for
    /// at most [`MAX_STALL`]: writers slow down instead of memory growing
    /// with what waits on disk.
    pub(crate) fn wait_for_flushes(&self) {
        let deadline = std::time::Instant::now() + MAX_STALL;
        while self.db.write_buffer_size() > MAX_MEMTABLES && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Bytes in memtables not yet flushed, flushes queued, and journal
    /// files: how far fjall's flushes lag its writers.
    pub fn lag(&self) -> (u64, usize, usize) {
        (
            self.db.write_buffer_size(),
            self.db.outstanding_flushes(),
            self.db.journal_count(),
        )
    }

    /// fsync fjall's journal: everything written so far survives a power cut.
    pub(crate) fn persist(&self) -> Result<(), StateError> {
        self.db
            .persist(fjall::PersistMode::SyncData)
            .map_err(|e| self.error(e))
    }

    pub(crate) fn error(&self, source: fjall::Error) -> StateError {
        StateError {
            path: self.path.clone(),
            source,
        }
    }
}
