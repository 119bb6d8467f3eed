//! The backend conformance suite on the embedded log.

mod conformance;

use std::sync::Arc;

use tempfile::TempDir;
use walden::backends::embedded::{EmbeddedConsumer, EmbeddedLog, EmbeddedProducer, LogConfig};
use walden::entry::ShardRef;

struct Embedded {
    dir: TempDir,
    log: Option<Arc<EmbeddedLog>>,
}

impl Embedded {
    fn log(&self) -> Arc<EmbeddedLog> {
        self.log.clone().expect("log is open")
    }
}

impl conformance::Harness for Embedded {
    type P = EmbeddedProducer;
    type C = EmbeddedConsumer;

    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EmbeddedLog::open(dir.path(), LogConfig::default()).unwrap());
        Self {
            dir,
            log: Some(log),
        }
    }

    fn shard(&self) -> ShardRef {
        ShardRef::new("conformance", 1)
    }

    fn producer(&self) -> EmbeddedProducer {
        EmbeddedProducer::new(self.log())
    }

    async fn consumer(&self, group: &str) -> EmbeddedConsumer {
        EmbeddedConsumer::new(self.log(), group, &self.shard()).unwrap()
    }

    async fn restart(&mut self) {
        let log = self.log.take().unwrap();
        let log = Arc::try_unwrap(log).ok().expect("no other handle is open");
        tokio::task::spawn_blocking(move || log.close())
            .await
            .unwrap();
        let log = EmbeddedLog::open(self.dir.path(), LogConfig::default()).unwrap();
        self.log = Some(Arc::new(log));
    }
}

conformance_suite!(Embedded);
