//! The backend conformance suite on the Kafka backend, against a real
//! Kafka-protocol broker (noida-db, started by `scripts/test.sh`).

mod common;
mod conformance;

use std::collections::BTreeMap;
use std::time::Duration;

use walden::backends::kafka::{KafkaConsumer, KafkaProducer, KafkaSettings};
use walden::entry::ShardRef;

struct Kafka {
    settings: KafkaSettings,
    producer: KafkaProducer,
}

impl conformance::Harness for Kafka {
    type P = KafkaProducer;
    type C = KafkaConsumer;

    async fn new() -> Option<Self> {
        let brokers = common::test_server("WALDEN_TEST_KAFKA_BROKERS")?;
        let settings = KafkaSettings {
            brokers,
            topic: common::unique("conformance"),
            partitions: 2,
            librdkafka: BTreeMap::new(),
            ack_timeout: Duration::from_secs(10),
        };
        settings.ensure_topic().await.expect("create the topic");
        let producer = KafkaProducer::new(&settings).expect("producer");
        Some(Self { settings, producer })
    }

    fn shard(&self) -> ShardRef {
        ShardRef::new("conformance", 1)
    }

    fn producer(&self) -> KafkaProducer {
        self.producer.clone()
    }

    async fn consumer(&self, group: &str) -> KafkaConsumer {
        // Groups are per topic, so tests never share one.
        let group = format!("{}-{group}", self.settings.topic);
        KafkaConsumer::new(&self.settings, &group, &self.shard())
            .await
            .expect("consumer")
    }

    async fn restart(&mut self) {
        // All local state is in the clients; the broker keeps the rest.
        self.producer = KafkaProducer::new(&self.settings).expect("producer");
    }
}

conformance_suite!(Kafka);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters() {
    let Some(brokers) = common::test_server("WALDEN_TEST_KAFKA_BROKERS") else {
        return;
    };
    let settings = KafkaSettings {
        brokers,
        topic: format!("{}.dlq", common::unique("conformance")),
        partitions: 1,
        librdkafka: BTreeMap::new(),
        ack_timeout: Duration::from_secs(10),
    };
    let dlq = walden::backends::kafka::KafkaDlq::open(&settings)
        .await
        .unwrap();
    conformance::dead_letters_append_list_get_remove(dlq.as_ref(), "conformance").await;
    // A new process rebuilds the same view from the topic.
    drop(dlq);
    let dlq = walden::backends::kafka::KafkaDlq::open(&settings)
        .await
        .unwrap();
    let (all, total) =
        walden::backends::DeadLetters::list(dlq.as_ref(), "conformance", None, 10).unwrap();
    assert_eq!(total, 4);
    assert_eq!(all.last().unwrap().entry.id, "dead-2");
    assert!(
        all.iter().all(|l| l.entry.id != "dead-1"),
        "the tombstone holds"
    );
}
