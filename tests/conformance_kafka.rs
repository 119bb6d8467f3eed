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
