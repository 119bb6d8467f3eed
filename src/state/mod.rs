//! The fjall-backed state store: Walden's own state beside the log. It holds
//! the idempotency index and the park store; the delay index follows.

pub mod dedup;
pub mod park;

use std::path::{Path, PathBuf};

pub use dedup::DedupIndex;
pub use park::ParkStore;

#[derive(Debug, thiserror::Error)]
#[error("state store {path}: {source}")]
pub struct StateError {
    pub path: PathBuf,
    #[source]
    pub source: fjall::Error,
}

/// The most a keyspace keeps in memory before flushing to disk.
const MEMTABLE_BYTES: u64 = 8 << 20;
/// fjall's block cache. Recent writes are still in memtables, and lookups of
/// older state are rare, so a small cache serves.
const CACHE_BYTES: u64 = 8 << 20;

/// One fjall database under `data_dir/state`.
pub struct StateStore {
    path: PathBuf,
    db: fjall::Database,
}

impl StateStore {
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let db = fjall::Database::builder(path)
            .cache_size(CACHE_BYTES)
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
