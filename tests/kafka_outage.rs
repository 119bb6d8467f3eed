//! The broker goes away: a send is answered `false` or `unknown` within the
//! ack timeout, never a false `true`; an entry answered `false` is not on the
//! broker; every entry answered `true` is. Then the broker comes back and
//! sends succeed again.
//!
//! The broker is stopped with SIGTERM: noida-db acks before its data is on
//! disk, so after a SIGKILL it can lose records it acked (seen here: all five
//! of the first sends). On a real cluster, durability across a broker crash
//! comes from replication (`min.insync.replicas`), which one test broker
//! cannot show.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::broker::Broker;
use walden::backends::kafka::{KafkaConsumer, KafkaProducer, KafkaSettings};
use walden::backends::{Appended, BackendError, Consumer, Delivery, append_one};
use walden::entry::{Durable, Entry, ShardRef};

const ACK_TIMEOUT: Duration = Duration::from_secs(3);

fn entry(id: &str) -> Entry {
    Entry {
        id: id.to_string(),
        key: Some("k".into()),
        payload: Bytes::from_static(b"{}"),
        ..Entry::default()
    }
}

/// Append through the write path's producer, waiting at most the ack
/// timeout, as Ingest does: no answer by then is "unknown".
async fn send(p: &KafkaProducer, shard: &ShardRef, e: Entry) -> Result<Appended, BackendError> {
    tokio::time::timeout(ACK_TIMEOUT, append_one(p, shard, e))
        .await
        .unwrap_or(Err(BackendError::Lost("no delivery report in time")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_broker_never_gets_a_false_true() {
    let Some(mut broker) = Broker::start() else {
        return;
    };
    let settings = KafkaSettings {
        brokers: broker.brokers(),
        topic: "outage".into(),
        partitions: 1,
        librdkafka: BTreeMap::new(),
        ack_timeout: ACK_TIMEOUT,
    };
    settings.ensure_topic().await.unwrap();
    let shard = ShardRef::new("outage", 0);
    let producer = KafkaProducer::new(&settings).unwrap();
    let mut acked = Vec::new();
    let mut refused = Vec::new();
    for i in 0..5 {
        let id = format!("before-{i}");
        let sent = send(&producer, &shard, entry(&id)).await.unwrap();
        assert_eq!(sent.durable, Durable::True);
        acked.push(id);
    }

    // A consumer that lives through the outage.
    let mut live = KafkaConsumer::new(&settings, "live", &shard).await.unwrap();
    let mut live_seen = HashSet::new();
    while live_seen.len() < 5 {
        for d in live.receive(100, Duration::from_millis(500)).await.unwrap() {
            live_seen.insert(d.entry().id.clone());
            let _ = d.ack().await;
        }
    }
    broker.stop();
    let started = Instant::now();
    let sends = (0..5).map(|i| {
        let (p, shard) = (producer.clone(), shard.clone());
        async move {
            let id = format!("during-{i}");
            (id.clone(), send(&p, &shard, entry(&id)).await)
        }
    });
    for (id, result) in futures_util::future::join_all(sends).await {
        match result {
            Ok(sent) => panic!("{id} was answered {:?} with no broker", sent.durable),
            Err(e) => match e.durable() {
                Durable::False => refused.push(id),
                Durable::Unknown => {}
                Durable::True => panic!("{id}: an error that says true: {e}"),
            },
        }
    }
    let waited = started.elapsed();
    assert!(
        waited < ACK_TIMEOUT + Duration::from_secs(3),
        "answered after {waited:?}; the ack timeout is {ACK_TIMEOUT:?}"
    );

    broker.restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    loop {
        let id = format!("after-{i}");
        i += 1;
        match send(&producer, &shard, entry(&id)).await {
            Ok(sent) => {
                assert_eq!(sent.durable, Durable::True);
                acked.push(id);
                break;
            }
            Err(e) => {
                assert_ne!(e.durable(), Durable::True);
                if e.durable() == Durable::False {
                    refused.push(id);
                }
                assert!(Instant::now() < deadline, "sends never recovered: {e}");
            }
        }
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    while !acked.iter().all(|id| live_seen.contains(id)) && Instant::now() < deadline {
        // Connection errors are logged inside; a receive does not fail.
        for d in live.receive(100, Duration::from_millis(500)).await.unwrap() {
            live_seen.insert(d.entry().id.clone());
            let _ = d.ack().await;
        }
    }
    for id in &acked {
        assert!(
            live_seen.contains(id),
            "{id}: the consumer that lived through the outage never got it"
        );
    }
    let mut consumer = KafkaConsumer::new(&settings, "check", &shard)
        .await
        .unwrap();
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !acked.iter().all(|id| seen.contains(id)) && Instant::now() < deadline {
        for d in consumer
            .receive(100, Duration::from_millis(500))
            .await
            .unwrap()
        {
            seen.insert(d.entry().id.clone());
            let _ = d.ack().await;
        }
    }
    for id in &acked {
        assert!(
            seen.contains(id),
            "{id} was answered true and is not on the broker"
        );
    }
    for id in &refused {
        assert!(
            !seen.contains(id),
            "{id} was answered false and is on the broker"
        );
    }
}
