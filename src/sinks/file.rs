//! `type = "file"`: JSON lines appended to a file. A line counts as applied
//! only after an `fdatasync` covers it, so an acknowledged delivery survives
//! a power cut. The fsync is deferred ([`Sink::flush_within`]): one per
//! [`FLUSH_WITHIN`] rather than one per batch, so that a slow trickle of
//! entries does not put an fsync of the target beside every fsync of the
//! log on the same disk.
//!
//! - A file the sink creates is made durable in its directory too (the
//!   directory is fsynced), or a power cut could take the whole file.
//! - A failed write (a full disk) is cut back to where it started, so the
//!   retry never follows a torn line. A file found ending in a partial line
//!   (a crash mid-write, nothing of it acknowledged) is cut back to its last
//!   whole line when opened.
//! - A file rotated away (renamed or deleted, as logrotate does) is let go:
//!   the next batch goes to a new file at the path. A file truncated in place
//!   (`copytruncate`) is written from its new end.
//!
//! All of it goes through the [`Fs`] seam, so the power-cut model tests it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::{ApplyResult, DeliveredJson, Outcome, Sink, SinkError};
use crate::entry::Delivered;
use crate::fs::{Fs, FsFile, StdFs};

/// How long written lines wait for their fsync, at most.
pub const FLUSH_WITHIN: Duration = Duration::from_millis(50);

pub struct FileSink {
    name: String,
    path: PathBuf,
    fs: Arc<dyn Fs>,
    /// Opened on first use, so a missing directory is a delivery error (and
    /// retried), not a startup failure.
    open: Arc<Mutex<Slot>>,
    /// One flush at a time: a flush that finds nothing to sync must still
    /// wait for the one that took its writes to finish.
    flushing: Arc<Mutex<()>>,
}

#[derive(Default)]
struct Slot {
    open: Option<Open>,
    /// Files written since their last fsync (a rotated-away one too).
    dirty: Vec<Arc<dyn FsFile>>,
}

/// The file being appended to, and where its next line goes.
struct Open {
    file: Arc<dyn FsFile>,
    identity: u64,
    end: u64,
}

impl FileSink {
    pub fn new(name: &str, path: &Path) -> Result<Self, SinkError> {
        Self::with_fs(name, path, Arc::new(StdFs))
    }

    /// A file target on a filesystem seam (tests use the simulated one).
    pub fn with_fs(name: &str, path: &Path, fs: Arc<dyn Fs>) -> Result<Self, SinkError> {
        if path.as_os_str().is_empty() {
            return Err(SinkError::permanent(name, "file target needs a path"));
        }
        Ok(Self {
            name: name.into(),
            path: path.to_path_buf(),
            fs,
            open: Arc::default(),
            flushing: Arc::default(),
        })
    }

    fn dir(path: &Path) -> &Path {
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    }

    /// The file at `path`, creating it (durably) if it is missing, with its
    /// end after its last whole line.
    fn open(fs: &dyn Fs, path: &Path) -> io::Result<Open> {
        let file = match fs.open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let f = fs.create(path)?;
                f.sync_data()?;
                fs.sync_dir(Self::dir(path))?;
                f
            }
            Err(e) => return Err(e),
        };
        let end = whole_lines_end(file.as_ref())?;
        if end < file.len()? {
            file.set_len(end)?;
            file.sync_data()?;
        }
        Ok(Open {
            identity: file.identity()?,
            file,
            end,
        })
    }

    /// Append `bytes`, reopening first if the file was rotated away; a
    /// failed write is cut back. The file is left for [`Self::sync`].
    fn write(fs: &dyn Fs, path: &Path, slot: &Mutex<Slot>, bytes: &[u8]) -> io::Result<()> {
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut *slot;
        let rotated = match (&slot.open, fs.identity(path)) {
            (Some(open), Ok(now)) => open.identity != now,
            (Some(_), Err(_)) => true,
            (None, _) => false,
        };
        if rotated {
            slot.open = None;
        }
        if slot.open.is_none() {
            slot.open = Some(Self::open(fs, path)?);
        }
        let open = slot.open.as_mut().expect("opened above");
        // Truncated in place (copytruncate): go on from its new end, not past
        // it, which would leave a hole of zeros.
        open.end = open.end.min(open.file.len()?);
        match open.file.write_all_at(bytes, open.end) {
            Ok(()) => {
                open.end += bytes.len() as u64;
                if !slot.dirty.iter().any(|f| Arc::ptr_eq(f, &open.file)) {
                    slot.dirty.push(open.file.clone());
                }
                Ok(())
            }
            Err(e) => {
                // Cut back what was written; if even that fails, the reopen
                // cuts the torn line.
                let _ = open.file.set_len(open.end);
                slot.open = None;
                Err(e)
            }
        }
    }

    /// fsync every file written since its last fsync. A file that fails
    /// stays dirty, so the next flush tries it again.
    fn sync(slot: &Mutex<Slot>, flushing: &Mutex<()>) -> io::Result<()> {
        let _one = flushing.lock().unwrap_or_else(|p| p.into_inner());
        let dirty = std::mem::take(&mut slot.lock().unwrap_or_else(|p| p.into_inner()).dirty);
        for (i, file) in dirty.iter().enumerate() {
            if let Err(e) = file.sync_data() {
                let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
                for f in &dirty[i..] {
                    if !slot.dirty.iter().any(|d| Arc::ptr_eq(d, f)) {
                        slot.dirty.push(f.clone());
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Where the last whole line of `file` ends: its length, or just after its
/// last newline when it ends in a partial line.
fn whole_lines_end(file: &dyn FsFile) -> io::Result<u64> {
    let len = file.len()?;
    let mut end = len;
    let mut chunk = [0u8; 4096];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let buf = &mut chunk[..(end - start) as usize];
        file.read_exact_at(buf, start)?;
        if end == len && buf.last() == Some(&b'\n') {
            return Ok(len);
        }
        if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    /// One write per batch: whole or not at all.
    fn applies_in_order(&self) -> bool {
        true
    }

    fn max_batch(&self) -> usize {
        1024
    }

    fn flush_within(&self) -> Option<Duration> {
        Some(FLUSH_WITHIN)
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        let (open, flushing) = (self.open.clone(), self.flushing.clone());
        Box::pin(async move {
            // fsync never runs on an arbiter thread.
            tokio::task::spawn_blocking(move || Self::sync(&open, &flushing))
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e.to_string())))
                .map_err(|e| {
                    SinkError::transient(&self.name, format!("{}: fsync: {e}", self.path.display()))
                })
        })
    }

    fn apply<'a>(&'a self, batch: &'a [Delivered]) -> BoxFuture<'a, Vec<ApplyResult>> {
        Box::pin(async move {
            let mut bytes = Vec::new();
            for d in batch {
                DeliveredJson::write_line(d, &mut bytes);
            }
            let (fs, path, open) = (self.fs.clone(), self.path.clone(), self.open.clone());
            // File I/O never runs on an arbiter thread.
            let result =
                tokio::task::spawn_blocking(move || Self::write(fs.as_ref(), &path, &open, &bytes))
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e.to_string())))
                    .map(|()| Outcome::Applied)
                    .map_err(|e| {
                        SinkError::transient(&self.name, format!("{}: {e}", self.path.display()))
                    });
            vec![result; batch.len()]
        })
    }

    fn applies_sets_together(&self) -> bool {
        true
    }

    /// The set's lines in one write, then an fsync: they are applied
    /// together, each line carrying `set`, `set_index` and `set_size`.
    fn apply_set<'a>(&'a self, set: &'a [Delivered]) -> BoxFuture<'a, Result<Outcome, SinkError>> {
        Box::pin(async move {
            let written = self.apply(set).await.pop();
            match written {
                Some(Ok(_)) => self.flush().await.map(|()| Outcome::Applied),
                Some(Err(e)) => Err(e),
                None => Ok(Outcome::Superseded),
            }
        })
    }

    fn healthcheck(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let dir = Self::dir(&self.path);
            if dir.is_dir() {
                Ok(())
            } else {
                Err(SinkError::transient(
                    &self.name,
                    format!("directory {} does not exist", dir.display()),
                ))
            }
        })
    }
}
