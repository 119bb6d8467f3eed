//! The backend conformance suite on the Kafka backend, against a real
//! Kafka-protocol broker (noida-db, started by `scripts/test.sh`).

mod common;
mod conformance;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use walden::backends::DelayStore;
use walden::backends::kafka::{KafkaConsumer, KafkaDelayTiers, KafkaProducer, KafkaSettings};
use walden::entry::ShardRef;

struct Kafka {
    settings: KafkaSettings,
    producer: KafkaProducer,
    tiers: Option<Arc<KafkaDelayTiers>>,
    /// The tier workers' groups (their tasks end with the test's runtime).
    tier_groups: Vec<Arc<walden::backends::kafka::KafkaGroup>>,
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
        Some(Self {
            settings,
            producer,
            tiers: None,
            tier_groups: Vec::new(),
        })
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

    async fn open_delays(&mut self) -> Option<Arc<dyn DelayStore>> {
        let tiers = KafkaDelayTiers::open(&self.settings).await.expect("tiers");
        self.tiers = Some(tiers.clone());
        Some(tiers)
    }

    async fn start_firing(&mut self) {
        let tiers = self.tiers.as_ref().expect("open_delays first");
        let group = format!("{}-tiers", self.settings.topic);
        self.tier_groups = tiers
            .start_workers(&group, Duration::from_secs(1), &Default::default())
            .expect("tier workers");
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
    let dlq = walden::backends::kafka::KafkaDlq::open(&settings, "conformance-origin")
        .await
        .unwrap();
    conformance::dead_letters_append_list_get_remove(dlq.as_ref(), "conformance").await;
    // A new process rebuilds the same view from the topic.
    drop(dlq);
    let dlq = walden::backends::kafka::KafkaDlq::open(&settings, "conformance-origin")
        .await
        .unwrap();
    let (all, total) = walden::backends::DeadLetters::list(dlq.as_ref(), "conformance", None, 10)
        .await
        .unwrap();
    assert_eq!(total, 4);
    assert_eq!(all.last().unwrap().entry.id, "dead-2");
    assert!(
        all.iter().all(|l| l.entry.id != "dead-1"),
        "the tombstone holds"
    );
}

/// A redrive puts the entry back on its origin partition, delivered with its
/// original sequence, and removes only the letter it redrove: a newer letter
/// for the same id (another entry, dead-lettered meanwhile) stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_returns_the_entry_to_its_partition() {
    use walden::backends::{Consumer, DeadLetter, DeadLetters, Delivery, Origin};
    let Some(h) = <Kafka as conformance::Harness>::new().await else {
        return;
    };
    let dlq_settings = KafkaSettings {
        topic: format!("{}.dlq", h.settings.topic),
        partitions: 1,
        ..h.settings.clone()
    };
    let dlq = walden::backends::kafka::KafkaDlq::open(&dlq_settings, &h.settings.topic)
        .await
        .unwrap();
    let shard = ShardRef::new("conformance", 1);
    let letter = DeadLetter {
        dlq_sequence: 0,
        entry: walden::entry::Entry {
            id: "back-1".into(),
            key: Some("k".into()),
            headers: vec![("h".into(), "v".into())],
            payload: bytes::Bytes::from_static(b"again"),
            timestamp_ms: 5,
            due_ms: 0,
        },
        origin: Origin {
            shard: shard.clone(),
            sequence: 7777,
            target: "default".into(),
        },
        attempts: 3,
        first_failure_ms: 1,
        last_failure_ms: 2,
        last_error: "boom".into(),
    };
    let first = dlq.append(letter.clone()).await.unwrap();
    let stale = dlq.get("conformance", "back-1").await.unwrap().remove(0);
    assert_eq!(stale.dlq_sequence, first);
    // Another entry with the same id, dead-lettered before the first
    // redrive's tombstone is written. (The same entry twice is one letter.)
    let mut other = letter.clone();
    other.origin.sequence = 7778;
    let newer = dlq.append(other).await.unwrap();
    dlq.redrive(&stale).await.unwrap();
    let left = dlq.get("conformance", "back-1").await.unwrap();
    assert_eq!(
        left.iter().map(|l| l.dlq_sequence).collect::<Vec<_>>(),
        [newer]
    );

    let mut consumer = conformance::Harness::consumer(&h, "redrive").await;
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while got.is_empty() && std::time::Instant::now() < deadline {
        got = consumer
            .receive(10, Duration::from_millis(500))
            .await
            .unwrap();
    }
    let d = got
        .iter()
        .find(|d| d.entry().id == "back-1")
        .expect("back-1 arrives");
    assert_eq!(d.shard(), &shard);
    assert_eq!(d.sequence(), 7777, "the original sequence travels with it");
    assert_eq!(d.entry().payload.as_ref(), b"again");
    assert_eq!(d.entry().key.as_deref(), Some("k"));
    assert_eq!(d.entry().headers, vec![("h".to_string(), "v".to_string())]);

    // Redriving the live letter removes it.
    let live = dlq.get("conformance", "back-1").await.unwrap().remove(0);
    dlq.redrive(&live).await.unwrap();
    assert_eq!(dlq.get("conformance", "back-1").await.unwrap(), []);
}

/// A group member learns each partition's end from librdkafka's statistics,
/// before it hands anything out, so stats can show entries not read yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_member_knows_the_end_of_its_partitions() {
    let Some(brokers) = common::test_server("WALDEN_TEST_KAFKA_BROKERS") else {
        return;
    };
    let settings = KafkaSettings {
        brokers,
        topic: common::unique("ends"),
        partitions: 1,
        librdkafka: BTreeMap::from([("statistics.interval.ms".into(), "200".into())]),
        ack_timeout: Duration::from_secs(10),
    };
    settings.ensure_topic().await.unwrap();
    let producer = KafkaProducer::new(&settings).unwrap();
    let shard = ShardRef::new("ends", 0);
    for i in 0..5 {
        walden::backends::append_one(&producer, &shard, common::entry(format!("e{i}"), "x"))
            .await
            .unwrap();
    }
    let group = walden::backends::kafka::KafkaGroup::join(
        &settings,
        &format!("{}-group", settings.topic),
        Duration::from_secs(1),
        &Default::default(),
        false,
    )
    .unwrap();
    let consumer = group.shard_consumer(&shard).await.unwrap();
    let checkpointer = consumer.checkpointer();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while checkpointer.end_offset() != Some(5) {
        assert!(
            std::time::Instant::now() < deadline,
            "end never reported: {:?}",
            checkpointer.end_offset()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(checkpointer.low_watermark(), 0, "nothing handed out yet");
}
