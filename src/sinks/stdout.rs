//! `type = "stdout"`: JSON lines on standard output.

use std::io::Write;

use futures_util::future::BoxFuture;

use super::{ApplyResult, DeliveredJson, Outcome, Sink, SinkError};
use crate::entry::Delivered;

pub struct StdoutSink {
    name: String,
}

impl StdoutSink {
    pub fn new(name: &str) -> Self {
        Self { name: name.into() }
    }
}

impl Sink for StdoutSink {
    fn name(&self) -> &str {
        &self.name
    }

    /// One write (and, for a file, one fsync) per batch: whole or not at all.
    fn applies_in_order(&self) -> bool {
        true
    }

    fn max_batch(&self) -> usize {
        1024
    }

    fn apply<'a>(&'a self, batch: &'a [Delivered]) -> BoxFuture<'a, Vec<ApplyResult>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for d in batch {
                DeliveredJson::write_line(d, &mut out);
            }
            // A full pipe blocks: write off the arbiter thread.
            let written = tokio::task::spawn_blocking(move || {
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(&out).and_then(|()| stdout.flush())
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            let result = written
                .map(|()| Outcome::Applied)
                .map_err(|e| SinkError::transient(&self.name, format!("stdout: {e}")));
            vec![result; batch.len()]
        })
    }

    fn healthcheck(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }
}
