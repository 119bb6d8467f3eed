//! A Kafka topic read for a replay: the first offset at or after a time,
//! from the broker's `offsets_for_times` where it answers correctly and by a
//! scan where it does not, on both test brokers (noida-db and tansu).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use walden::backends::ReplayLog;
use walden::backends::kafka::{KafkaReplayLog, KafkaSettings};
use walden::entry::ShardRef;

async fn finds_times(brokers: String) {
    let settings = KafkaSettings {
        brokers: brokers.clone(),
        topic: common::unique("replay-times"),
        partitions: 1,
        librdkafka: BTreeMap::new(),
        ack_timeout: Duration::from_secs(10),
    };
    settings.ensure_topic().await.unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    // 30 messages, written at 1 s steps from two minutes ago: recent, as a
    // broker's time-based retention deletes old messages at once (noida-db
    // took messages stamped in 2023 within a second).
    let base = walden::entry::now_ms() as i64 - 120_000;
    for i in 0..30i64 {
        producer
            .send(
                FutureRecord::to(&settings.topic)
                    .partition(0)
                    .key("k")
                    .payload(&format!("{i}"))
                    .timestamp(base + i * 1000),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let log = KafkaReplayLog::new(&settings).unwrap();
    let shard = ShardRef::new("ns", 0);
    let at = |ms: i64| log.position_at(&shard, ms as u64).unwrap();
    assert_eq!(at(base - 5), 0);
    assert_eq!(at(base + 10_500), 11);
    assert_eq!(at(base + 12_000), 12);
    assert_eq!(at(base + 99_000), 30, "past the last: the end");
    assert_eq!(log.end(&shard).unwrap(), 30);
    assert_eq!(log.earliest(&shard).unwrap(), (0, Some(base as u64)));
    let read = log
        .read(&shard, 28, walden::backends::Limit::entries(10))
        .unwrap();
    let positions: Vec<u64> = read.iter().map(|l| l.position).collect();
    assert_eq!(positions, vec![28, 29]);
    eprintln!(
        "{brokers}: {}",
        match log.scanning() {
            true => "offsets_for_times answered wrongly; times found by scanning",
            false => "offsets_for_times answered correctly",
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noida_finds_the_first_offset_at_a_time() {
    let Some(brokers) = common::test_server("WALDEN_TEST_KAFKA_BROKERS") else {
        return;
    };
    finds_times(brokers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_finds_the_first_offset_at_a_time() {
    let Some(brokers) = common::test_server("WALDEN_TEST_TANSU_BROKERS") else {
        return;
    };
    finds_times(brokers).await;
}
