//! A Kafka target's sets in transactions (`transactions = true`). Neither
//! test broker (noida-db, tansu) has transactions, so this runs against
//! librdkafka's mock cluster: brokers inside the test process, spoken to over
//! real TCP connections, which implement the transaction protocol
//! (InitProducerId, AddPartitionsToTxn, EndTxn). A set is committed whole; a
//! set whose record is refused, or whose commit is refused, fails (so it is
//! retried whole) and is aborted; the producer goes on after it.
//!
//! What a `read_committed` reader sees of an aborted set is not tested: the
//! mock's Fetch answers no aborted transactions (librdkafka 2.12,
//! `rdkafka_mock_handlers.c`), so its readers see aborted records too.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use serde_json::json;
use walden::entry::Delivered;
use walden::sinks::{KafkaSink, Sink};

/// A set of `n` mutations over keys spread across partitions.
fn set(name: &str, first: u64, n: u64) -> Vec<Delivered> {
    (first..first + n)
        .map(|i| {
            let mut d = common::mutation(
                i,
                json!({"op": "put", "key": format!("k{i}"), "value": name}),
            );
            let e = std::sync::Arc::make_mut(&mut d.entry);
            e.key = Some(format!("k{i}"));
            e.id = format!("{name}-{i}");
            d
        })
        .collect()
}

/// Every committed record's id in the topic's three partitions, read with
/// `read_committed` until `quiet` passes with nothing new.
fn committed_ids(brokers: &str, topic: &str, quiet: Duration) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", common::unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    // Assigned, not subscribed: no group to join.
    let mut partitions = rdkafka::TopicPartitionList::new();
    for p in 0..3 {
        partitions
            .add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&partitions).unwrap();
    let mut ids = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < quiet {
        if let Some(Ok(msg)) = consumer.poll(Duration::from_millis(100)) {
            let id = msg
                .headers()
                .and_then(|h| {
                    rdkafka::message::Headers::iter(h)
                        .find(|h| h.key == "walden.id")
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                })
                .unwrap_or_default();
            ids.push(id);
            last = Instant::now();
        }
    }
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_is_one_transaction_committed_whole_or_failed_and_aborted() {
    let mock = MockCluster::new(3).unwrap();
    mock.create_topic("replica", 3, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    let sink = KafkaSink::new(
        "replica",
        &brokers,
        "replica",
        &BTreeMap::new(),
        Duration::from_secs(10),
        Some("walden-test-replica".into()),
    )
    .unwrap();

    let r = sink.apply_set(&set("first", 0, 3)).await;
    assert!(r.is_ok(), "{r:?}");

    // The broker takes the next set's first produce request and refuses its
    // second: the set fails.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD,
        ],
    );
    let r = sink.apply_set(&set("second", 3, 3)).await;
    assert!(r.is_err(), "a refused record fails its set: {r:?}");
    mock.clear_request_errors(RDKafkaApiKey::Produce);

    // The coordinator refuses the commit: the set fails (without a
    // transaction there would be no commit to refuse, and it would pass).
    mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_TXN_STATE],
    );
    let r = sink.apply_set(&set("third", 6, 3)).await;
    assert!(r.is_err(), "a refused commit fails its set: {r:?}");
    mock.clear_request_errors(RDKafkaApiKey::EndTxn);

    // The producer goes on with the next set.
    let r = sink.apply_set(&set("fourth", 9, 3)).await;
    assert!(r.is_ok(), "{r:?}");

    let brokers2 = brokers.clone();
    let ids = tokio::task::spawn_blocking(move || {
        committed_ids(&brokers2, "replica", Duration::from_secs(3))
    })
    .await
    .unwrap();
    for id in [
        "first-0",
        "first-1",
        "first-2",
        "fourth-9",
        "fourth-10",
        "fourth-11",
    ] {
        assert!(ids.iter().any(|i| i == id), "{id} is written: {ids:?}");
    }
}
