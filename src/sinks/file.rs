//! `type = "file"`: JSON lines appended to a file. A batch counts as applied
//! only after `fdatasync`, so an acknowledged delivery survives a power cut.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;

use super::{ApplyResult, DeliveredJson, Outcome, Sink, SinkError};
use crate::entry::Delivered;

pub struct FileSink {
    name: String,
    path: PathBuf,
    /// Opened on first use, so a missing directory is a delivery error (and
    /// retried), not a startup failure.
    file: Arc<Mutex<Option<std::fs::File>>>,
}

impl FileSink {
    pub fn new(name: &str, path: &Path) -> Result<Self, SinkError> {
        if path.as_os_str().is_empty() {
            return Err(SinkError::permanent(name, "file target needs a path"));
        }
        Ok(Self {
            name: name.into(),
            path: path.to_path_buf(),
            file: Arc::default(),
        })
    }

    fn write(
        path: &Path,
        slot: &Mutex<Option<std::fs::File>>,
        bytes: &[u8],
    ) -> std::io::Result<()> {
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            );
        }
        let file = slot.as_mut().expect("opened above");
        let result = file.write_all(bytes).and_then(|()| file.sync_data());
        if result.is_err() {
            // Reopen next time: the handle may be in a bad state.
            *slot = None;
        }
        result
    }
}

impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn apply<'a>(&'a self, batch: &'a [Delivered]) -> BoxFuture<'a, Vec<ApplyResult>> {
        Box::pin(async move {
            let mut bytes = Vec::new();
            for d in batch {
                bytes.extend(DeliveredJson::line(d));
            }
            let (path, file) = (self.path.clone(), self.file.clone());
            // File I/O and fsync never run on an arbiter thread.
            let result = tokio::task::spawn_blocking(move || Self::write(&path, &file, &bytes))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
                .map(|()| Outcome::Applied)
                .map_err(|e| {
                    SinkError::transient(&self.name, format!("{}: {e}", self.path.display()))
                });
            vec![result; batch.len()]
        })
    }

    fn healthcheck(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let dir = self
                .path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
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
