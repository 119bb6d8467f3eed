//! The backend conformance suite on the embedded log.

mod conformance;

use std::sync::Arc;

use tempfile::TempDir;
use walden::backends::DelayStore;
use walden::backends::embedded::{EmbeddedConsumer, EmbeddedLog, EmbeddedProducer, LogConfig};
use walden::entry::ShardRef;
use walden::state::StateStore;
use walden::state::park::ParkStore;

struct Embedded {
    dir: TempDir,
    log: Option<Arc<EmbeddedLog>>,
}

/// The fjall state store under the harness's dir; a reopen waits for the
/// previous store's thread to let go of it.
fn open_park_store(dir: &std::path::Path) -> ParkStore {
    let path = dir.join("state");
    for _ in 0..100 {
        if let Ok(store) = StateStore::open(&path) {
            return ParkStore::open(Arc::new(store)).expect("park store");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("the state store stayed locked");
}

impl Embedded {
    fn log(&self) -> Arc<EmbeddedLog> {
        self.log.clone().expect("log is open")
    }
}

impl conformance::Harness for Embedded {
    type P = EmbeddedProducer;
    type C = EmbeddedConsumer;

    async fn new() -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EmbeddedLog::open(dir.path(), LogConfig::default()).unwrap());
        Some(Self {
            dir,
            log: Some(log),
        })
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

    async fn open_delays(&mut self) -> Option<Arc<dyn DelayStore>> {
        Some(Arc::new(open_park_store(self.dir.path())))
    }

    async fn start_firing(&mut self) {}
}

conformance_suite!(Embedded);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let dlq = walden::backends::embedded::EmbeddedDlq::open(dir.path()).unwrap();
    conformance::dead_letters_append_list_get_remove(dlq.as_ref(), "conformance").await;
    // And all of it survives a reopen.
    dlq.close();
    drop(dlq);
    let dlq = walden::backends::embedded::EmbeddedDlq::open(dir.path()).unwrap();
    let (all, total) = walden::backends::DeadLetters::list(dlq.as_ref(), "conformance", None, 10)
        .await
        .unwrap();
    assert_eq!(total, 4);
    assert_eq!(all.last().unwrap().entry.id, "dead-2");
}
