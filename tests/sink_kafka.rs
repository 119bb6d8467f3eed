//! The Kafka target against a real broker (noida-db): entries land on the
//! target topic with their key, payload and headers, read back with a plain
//! rdkafka consumer; a broker that is down is a transient error.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use common::{test_server, unique};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use walden::backends::kafka::KafkaSettings;
use walden::entry::{Delivered, Entry, ShardRef};
use walden::sinks::{ErrorClass, KafkaSink, Outcome, Sink};

const VAR: &str = "WALDEN_TEST_KAFKA_BROKERS";

fn delivered(i: u64, key: &str) -> Delivered {
    Delivered {
        shard: ShardRef::new("orders", 2),
        sequence: 100 + i,
        entry: std::sync::Arc::new(Entry {
            id: format!("e{i}"),
            key: Some(key.into()),
            headers: vec![
                ("traceparent".into(), format!("00-{i:032x}-{i:016x}-01")),
                // Which of this namespace's targets it was for: not the
                // business of whoever reads the target topic.
                (walden::entry::TARGETS_HEADER.into(), "replica".into()),
            ],
            payload: Bytes::from(format!("{{\"n\":{i}}}")),
            timestamp_ms: 1,
            due_ms: 0,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_arrive_with_key_payload_and_headers() {
    let Some(brokers) = test_server(VAR) else {
        return;
    };
    let topic = unique("replica");
    let settings = KafkaSettings {
        brokers: brokers.clone(),
        topic: topic.clone(),
        partitions: 3,
        librdkafka: BTreeMap::new(),
        ack_timeout: Duration::from_secs(10),
    };
    settings.ensure_topic().await.unwrap();
    let sink = KafkaSink::new(
        "replica",
        &brokers,
        &topic,
        &BTreeMap::new(),
        Duration::from_secs(10),
        None,
    )
    .unwrap();
    sink.healthcheck().await.unwrap();
    // Two batches, keys interleaved: each key must keep its order.
    for batch in [[0, 1, 2], [3, 4, 5]] {
        let batch: Vec<Delivered> = batch
            .iter()
            .map(|&i| delivered(i, ["a", "b", "c"][i as usize % 3]))
            .collect();
        let results = sink.apply(&batch).await;
        assert!(
            results.iter().all(|r| matches!(r, Ok(Outcome::Applied))),
            "{results:?}"
        );
    }

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut got: Vec<(String, String, HashMap<String, String>, i32)> = Vec::new();
    while got.len() < 6 {
        let msg = tokio::time::timeout(Duration::from_secs(20), consumer.recv())
            .await
            .expect("the target topic has every entry")
            .unwrap();
        let headers: HashMap<String, String> = msg
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        got.push((
            String::from_utf8_lossy(msg.key().unwrap()).into_owned(),
            String::from_utf8_lossy(msg.payload().unwrap()).into_owned(),
            headers,
            msg.partition(),
        ));
    }
    for (key, payload, headers, _) in &got {
        let i: u64 = headers["walden.id"][1..].parse().unwrap();
        assert_eq!(key, ["a", "b", "c"][i as usize % 3]);
        assert_eq!(payload, &format!("{{\"n\":{i}}}"));
        assert_eq!(headers["traceparent"], format!("00-{i:032x}-{i:016x}-01"));
        assert_eq!(headers["walden.namespace"], "orders");
        assert_eq!(headers["walden.sequence"], (100 + i).to_string());
        assert!(
            !headers.contains_key(walden::entry::TARGETS_HEADER),
            "{headers:?}"
        );
    }
    for key in ["a", "b", "c"] {
        let of_key: Vec<&(String, String, HashMap<String, String>, i32)> =
            got.iter().filter(|g| g.0 == key).collect();
        assert_eq!(of_key[0].3, of_key[1].3, "one key, one partition");
        let seqs: Vec<&String> = of_key.iter().map(|g| &g.2["walden.sequence"]).collect();
        assert!(seqs[0] < seqs[1], "key {key} in order: {seqs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_a_transient_error_within_the_timeout() {
    let brokers = format!("127.0.0.1:{}", common::free_port());
    let timeout = Duration::from_secs(2);
    let sink = KafkaSink::new("replica", &brokers, "t", &BTreeMap::new(), timeout, None).unwrap();
    let started = std::time::Instant::now();
    let err = sink
        .apply(&[delivered(0, "a")])
        .await
        .remove(0)
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
    assert!(
        started.elapsed() < timeout + Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let err = sink.healthcheck().await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
}
