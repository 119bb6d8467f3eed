//! The backend conformance suite on the SQS backend, against a real
//! SQS-protocol server (moto, started by `scripts/test.sh`), on a standard
//! queue and on a FIFO queue. moto checks that requests are signed, not by
//! whom: the script sets dummy credentials.

mod common;
mod conformance;

use std::sync::Arc;
use std::time::Duration;

use walden::backends::DelayStore;
use walden::backends::sqs::{SqsConsumer, SqsProducer, SqsSettings};
use walden::entry::ShardRef;

fn settings(url: String, queue: String) -> SqsSettings {
    SqsSettings {
        queue,
        region: "us-east-1".into(),
        endpoint_url: Some(url),
        wait_time: Duration::from_secs(1),
        // Short, so unacked messages of a "restarted" consumer show again
        // within the suite's wait.
        visibility_timeout: Duration::from_secs(2),
        max_messages_per_poll: 10,
    }
}

/// `FIFO`: a `.fifo` queue, or a standard one.
struct Sqs<const FIFO: bool> {
    settings: SqsSettings,
    producer: SqsProducer,
}

impl<const FIFO: bool> Sqs<FIFO> {
    async fn start() -> Option<Self> {
        let url = common::test_server("WALDEN_TEST_SQS_URL")?;
        let queue = common::unique("conformance") + if FIFO { ".fifo" } else { "" };
        let settings = settings(url, queue);
        let producer = SqsProducer::new(&settings).await.expect("producer");
        Some(Self { settings, producer })
    }
}

type Standard = Sqs<false>;
type Fifo = Sqs<true>;

macro_rules! harness {
    ($h:ty, ordered: $ordered:expr) => {
        impl conformance::Harness for $h {
            type P = SqsProducer;
            type C = SqsConsumer;
            const ORDERED: bool = $ordered;
            const LOG: bool = false;

            async fn new() -> Option<Self> {
                Self::start().await
            }

            fn shard(&self) -> ShardRef {
                ShardRef::new("conformance", 0)
            }

            fn producer(&self) -> SqsProducer {
                self.producer.clone()
            }

            async fn consumer(&self, _group: &str) -> SqsConsumer {
                SqsConsumer::new(&self.settings, &self.shard())
                    .await
                    .expect("consumer")
            }

            async fn restart(&mut self) {
                self.producer = SqsProducer::new(&self.settings).await.expect("producer");
            }

            async fn open_delays(&mut self) -> Option<Arc<dyn DelayStore>> {
                None
            }

            async fn start_firing(&mut self) {}
        }
    };
}

harness!(Standard, ordered: false);
harness!(Fifo, ordered: true);

mod standard {
    use super::*;
    conformance_suite!(Standard);
}

mod fifo {
    use super::*;
    conformance_suite!(Fifo);
}
