//! Walden served on the Kafka backend, against a real broker (noida-db):
//! HTTP → topic → HTTP target, and → a Kafka target topic read back with a
//! plain Kafka client; split producer and consumer processes; what a Kafka
//! namespace refuses.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::target::HttpTarget;
use common::{get_json, post, test_server, unique};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use serde_json::{Value, json};
use walden::service::Spawned;

const WAIT: Duration = Duration::from_secs(30);

fn config(data: &std::path::Path, role: &str, namespaces: &str) -> walden::config::Config {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nrole = \"{role}\"\n{namespaces}",
        data.display()
    );
    walden::config::from_toml(&text).unwrap()
}

/// A namespace on `topic`, with a consumer group of its own: noida-db never
/// evicts a member that went away without leaving, so groups are not reused
/// across test runs.
fn kafka_namespace(name: &str, brokers: &str, topic: &str, target: &str) -> String {
    let group = format!("{topic}-group");
    format!(
        "[namespaces.{name}]\nshards = 3\n[namespaces.{name}.backend]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\ngroup = \"{group}\"\n[namespaces.{name}.target]\n{target}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_through_kafka_to_an_http_target_and_a_kafka_topic() {
    common::show_logs();
    let Some(brokers) = test_server("WALDEN_TEST_KAFKA_BROKERS") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let replica = unique("replica");
    walden::backends::kafka::KafkaSettings {
        brokers: brokers.clone(),
        topic: replica.clone(),
        partitions: 2,
        librdkafka: Default::default(),
        ack_timeout: Duration::from_secs(10),
    }
    .ensure_topic()
    .await
    .unwrap();
    let namespaces = kafka_namespace(
        "orders",
        &brokers,
        &unique("orders"),
        &format!("type = \"http\"\nurl = \"{}\"", target.url()),
    ) + &kafka_namespace(
        "mirror",
        &brokers,
        &unique("mirror"),
        &format!("type = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{replica}\""),
    );
    let svc = Spawned::start(config(dir.path(), "all", &namespaces)).unwrap();
    let base = format!("http://{}", svc.addr);

    let mut ids = Vec::new();
    for i in 0..10 {
        let (status, body) = post(
            &format!("{base}/v1/namespaces/orders/log"),
            json!({"payload": {"n": i}, "key": format!("k{}", i % 3)}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["durable"], "true");
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    let entries: Vec<Value> = (10..20)
        .map(|i| json!({"payload": {"n": i}, "key": format!("k{}", i % 3)}))
        .collect();
    let (status, body) = post(
        &format!("{base}/v1/namespaces/orders/log/batch"),
        json!({ "entries": entries }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for r in body["results"].as_array().unwrap() {
        assert_eq!(r["durable"], "true", "{r}");
        ids.push(r["id"].as_str().unwrap().to_string());
    }
    let got = target.wait_for(20, WAIT);
    let delivered: HashSet<String> = got.iter().map(|r| r.id().to_string()).collect();
    assert_eq!(delivered, ids.iter().cloned().collect::<HashSet<_>>());
    // Per key, in write order.
    for k in ["k0", "k1", "k2"] {
        let ns: Vec<u64> = got
            .iter()
            .filter(|r| r.key() == Some(k))
            .map(|r| r.body["payload"]["n"].as_u64().unwrap())
            .collect();
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "key {k}: {ns:?}");
    }

    let (status, body) = post(
        &format!("{base}/v1/namespaces/mirror/log"),
        json!({"payload": {"hello": "region-b"}, "key": "user-7", "id": "m1"}),
    )
    .await;
    assert_eq!(
        (status, body["durable"].as_str()),
        (200, Some("true")),
        "{body}"
    );
    let reader = reader(&brokers, &replica);
    let msg = tokio::time::timeout(WAIT, reader.recv())
        .await
        .expect("the replica topic gets the entry")
        .unwrap();
    assert_eq!(msg.key(), Some(&b"user-7"[..]));
    assert_eq!(
        serde_json::from_slice::<Value>(msg.payload().unwrap()).unwrap(),
        json!({"hello": "region-b"})
    );
    let headers = msg.headers().unwrap();
    let id = headers.iter().find(|h| h.key == "walden.id").unwrap();
    assert_eq!(id.value, Some(&b"m1"[..]));
    assert!(
        headers
            .iter()
            .any(|h| h.key == "walden.namespace" && h.value == Some(&b"mirror"[..]))
    );

    // Delays hop through the delay-tier topics: never early, at most about
    // the smallest tier (1 s) late.
    let mut due = Vec::new();
    for (id, delay) in [("d-short", 1_500u64), ("d-long", 12_000)] {
        let (status, body) = post(
            &format!("{base}/v1/namespaces/orders/log"),
            json!({"payload": 1, "id": id, "lifecycle": {"delay_ms": delay, "jitter_ms": 0}}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        due.push((id, delay));
    }
    let deadline = std::time::Instant::now() + WAIT;
    while due
        .iter()
        .any(|(id, _)| !target.received().iter().any(|r| r.id() == *id))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "delayed entries never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = target.received();
    for (id, _) in &due {
        let r = got.iter().find(|r| r.id() == *id).unwrap_or_else(|| {
            let ids: Vec<&str> = got.iter().map(|r| r.id()).collect();
            panic!("{id} not delivered: {ids:?}")
        });
        let due_ms = r.body["due_ms"].as_u64().unwrap();
        assert!(
            r.at_ms >= due_ms,
            "{id} arrived {} ms early",
            due_ms - r.at_ms
        );
        assert!(
            r.at_ms <= due_ms + 2_500,
            "{id} arrived {} ms late",
            r.at_ms - due_ms
        );
    }
    let listed = reqwest::get(format!("{base}/v1/namespaces/orders/delayed"))
        .await
        .unwrap();
    assert_eq!(
        listed.status(),
        400,
        "listing delays on kafka is not built yet, and says so"
    );
    let stats: Value = get_json(&format!("{base}/v1/namespaces/orders")).await;
    assert_eq!(stats["backend"], "kafka");
    svc.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_process_and_a_consumer_process_split_the_work() {
    common::show_logs();
    let Some(brokers) = test_server("WALDEN_TEST_KAFKA_BROKERS") else {
        return;
    };
    let target = HttpTarget::start();
    let topic = unique("split");
    let ns = kafka_namespace(
        "events",
        &brokers,
        &topic,
        &format!("type = \"http\"\nurl = \"{}\"", target.url()),
    );
    let (pdir, cdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let producer = Spawned::start(config(pdir.path(), "producer", &ns)).unwrap();
    let pbase = format!("http://{}", producer.addr);
    for i in 0..15 {
        let (status, body) = post(
            &format!("{pbase}/v1/namespaces/events/log"),
            json!({"payload": i, "key": format!("k{i}")}),
        )
        .await;
        assert_eq!(
            (status, body["durable"].as_str()),
            (200, Some("true")),
            "{body}"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        target.received().is_empty(),
        "a producer process never applies"
    );

    let consumer = Spawned::start(config(cdir.path(), "consumer", &ns)).unwrap();
    let cbase = format!("http://{}", consumer.addr);
    assert_eq!(target.wait_for(15, WAIT).len(), 15);
    let (status, body) = post(
        &format!("{cbase}/v1/namespaces/events/log"),
        json!({"payload": 1}),
    )
    .await;
    assert_eq!(
        status, 503,
        "a consumer process does not accept writes: {body}"
    );
    assert_eq!(body["durable"], "false");
    producer.stop();
    consumer.stop();
}

/// The broker goes away under a running service: every write is answered
/// 503 `durable:"false"` or 504 `"unknown"` within the ack timeout, never a
/// false `"true"`; once the broker is back, writes succeed again, and every
/// write answered `"true"` reaches the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_never_gets_a_false_true() {
    common::show_logs();
    let Some(mut broker) = common::broker::Broker::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let ns = kafka_namespace(
        "ns",
        &broker.brokers(),
        "outage",
        &format!("type = \"http\"\nurl = \"{}\"", target.url()),
    );
    let mut cfg = config(dir.path(), "all", &ns);
    cfg.server.ack_timeout_ms = 3000;
    let svc = Spawned::start(cfg).unwrap();
    let url = format!("http://{}/v1/namespaces/ns/log", svc.addr);
    let mut acked = HashSet::new();
    let write = |i: usize| {
        let url = url.clone();
        async move {
            post(
                &url,
                json!({"payload": i, "key": format!("k{i}"), "id": format!("w{i}")}),
            )
            .await
        }
    };
    for i in 0..5 {
        let (status, body) = write(i).await;
        assert_eq!(
            (status, body["durable"].as_str()),
            (200, Some("true")),
            "{body}"
        );
        acked.insert(format!("w{i}"));
    }

    broker.stop();
    let started = std::time::Instant::now();
    let answers = futures_util::future::join_all((5..10).map(write)).await;
    for (status, body) in &answers {
        match (*status, body["durable"].as_str()) {
            (503, Some("false")) | (504, Some("unknown")) => {}
            other => panic!("with the broker down: {other:?} {body}"),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "answered after {:?}",
        started.elapsed()
    );

    broker.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut i = 10;
    loop {
        let (status, body) = write(i).await;
        if status == 200 {
            assert_eq!(body["durable"], "true");
            acked.insert(format!("w{i}"));
            break;
        }
        assert_ne!(body["durable"], "true", "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "writes never recovered: {body}"
        );
        i += 1;
    }
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let seen: HashSet<String> = target.ids();
        if acked.is_subset(&seen) {
            break;
        }
        if std::time::Instant::now() >= deadline {
            // Whose loss is it? A write missing from the topic was lost by
            // the broker after its ack; one on the topic, below the group's
            // commit, was skipped by the consumer.
            let topic = topic_contents(&broker.brokers(), "outage").await;
            let committed = committed(&broker.brokers(), "outage", "outage-group", 3);
            panic!(
                "acked {acked:?}, delivered {seen:?}; on the topic (partition, offset, id): {topic:?}; the group's commits: {committed}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    svc.stop();
}

/// A plain consumer of `topic` from its start, in a group of its own.
fn reader(brokers: &str, topic: &str) -> StreamConsumer {
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    reader.subscribe(&[topic]).unwrap();
    reader
}

/// Every record on `topic`, as (partition, offset, `walden.id`), read with a
/// plain consumer until none has come for 3 s.
async fn topic_contents(brokers: &str, topic: &str) -> Vec<(i32, i64, String)> {
    let reader = reader(brokers, topic);
    let mut out = Vec::new();
    while let Ok(Ok(msg)) = tokio::time::timeout(Duration::from_secs(3), reader.recv()).await {
        let id = msg
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "walden.id"))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        out.push((msg.partition(), msg.offset(), id));
    }
    out.sort();
    out
}

/// `group`'s committed offsets on partitions `0..partitions` of `topic`.
fn committed(brokers: &str, topic: &str, group: &str, partitions: i32) -> String {
    let client: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    match client.committed_offsets(tpl, Duration::from_secs(10)) {
        Ok(tpl) => format!("{:?}", tpl.to_topic_map()),
        Err(e) => format!("unknown ({e})"),
    }
}

/// A dead letter of a Kafka namespace lives on the DLQ topic, keyed by the
/// entry id with its origin in headers; another process lists it, and a
/// redrive from a producer-only process re-produces it to its origin
/// partition, where a consumer process applies it with its first sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_go_to_the_dlq_topic_and_redrive_from_any_process() {
    common::show_logs();
    let Some(brokers) = test_server("WALDEN_TEST_KAFKA_BROKERS") else {
        return;
    };
    let target = HttpTarget::start();
    target.reject_key("poison", 400);
    let topic = unique("dl");
    let ns = kafka_namespace(
        "ns",
        &brokers,
        &topic,
        &format!("type = \"http\"\nurl = \"{}\"", target.url()),
    );
    let dir = tempfile::tempdir().unwrap();
    let svc = Spawned::start(config(dir.path(), "all", &ns)).unwrap();
    let base = format!("http://{}", svc.addr);
    for (id, key) in [("bad-1", "poison"), ("ok-1", "fine")] {
        let (status, body) = post(
            &format!("{base}/v1/namespaces/ns/log"),
            json!({"payload": {"id": id}, "key": key, "id": id}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    target.wait_for(1, WAIT);
    let listed = dlq_ids_when(&base, "never dead-lettered", |ids| !ids.is_empty()).await;
    assert_eq!(listed[0]["id"], "bad-1", "{listed:?}");

    // On the topic: keyed by id, origin in the headers.
    let reader = reader(&brokers, &format!("{topic}.dlq"));
    let msg = tokio::time::timeout(WAIT, reader.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.key(), Some(&b"bad-1"[..]));
    let headers = msg.headers().unwrap();
    let get = |k: &str| {
        headers
            .iter()
            .find(|h| h.key == k)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(get("walden.dlq.namespace").as_deref(), Some("ns"));
    assert_eq!(get("walden.key").as_deref(), Some("poison"));
    assert!(get("walden.dlq.last_error").unwrap().contains("400"));
    svc.stop();

    let original_sequence = listed[0]["sequence"].as_u64().unwrap();

    // A producer-only process (a fresh data dir) sees the letter and
    // redrives it: the entry goes back to its origin partition, where a
    // separate consumer process applies it with its original sequence.
    let (dir2, dir3) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let consumer = Spawned::start(config(dir2.path(), "consumer", &ns)).unwrap();
    let producer = Spawned::start(config(dir3.path(), "producer", &ns)).unwrap();
    let base = format!("http://{}", producer.addr);
    let shown = reqwest::get(format!("{base}/v1/namespaces/ns/dlq/bad-1"))
        .await
        .unwrap();
    assert_eq!(shown.status(), 200);
    target.reject_key("poison", 0);
    let (status, body) = post(
        &format!("{base}/v1/namespaces/ns/dlq/redrive"),
        json!({"ids": ["bad-1", "no-such"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["redriven"], 1, "{body}");
    assert_eq!(body["not_found"], json!(["no-such"]), "{body}");
    // Gone as soon as the redrive is answered: the entry is on the topic.
    let after = reqwest::get(format!("{base}/v1/namespaces/ns/dlq/bad-1"))
        .await
        .unwrap();
    assert_eq!(after.status(), 404);
    let deadline = std::time::Instant::now() + WAIT;
    let redelivered = loop {
        if let Some(r) = target.received().into_iter().find(|r| r.id() == "bad-1") {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the redriven entry was never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(redelivered.key(), Some("poison"));
    assert_eq!(redelivered.sequence(), original_sequence);
    producer.stop();
    consumer.stop();
}

/// The ids the DLQ lists, in DLQ order, once `done` holds of them.
async fn dlq_ids_when(base: &str, what: &str, done: impl Fn(&[String]) -> bool) -> Vec<Value> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let listed: Value = get_json(&format!("{base}/v1/namespaces/ns/dlq")).await;
        let letters = listed["entries"].as_array().cloned().unwrap_or_default();
        let ids: Vec<String> = letters
            .iter()
            .map(|l| l["id"].as_str().unwrap().to_string())
            .collect();
        if done(&ids) {
            return letters;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: the DLQ lists {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The ids the target applied with key `key`, in the order it got them.
fn applied(target: &HttpTarget, key: &str) -> Vec<String> {
    let got = target.received();
    got.iter()
        .filter(|r| r.key() == Some(key))
        .map(|r| r.id().to_string())
        .collect()
}

/// Wait until `done` holds, or fail naming `what`.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn write(base: &str, id: &str, key: &str) {
    let (status, body) = post(
        &format!("{base}/v1/namespaces/ns/log"),
        json!({"payload": {"id": id}, "key": key, "id": id}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// A `hold_key` namespace `ns` on a fresh topic, whose HTTP target rejects
/// the key `held` (400) for now.
fn held_key_namespace(brokers: &str, topic: &str) -> (HttpTarget, String) {
    let target = HttpTarget::start();
    target.reject_key("held", 400);
    let ns = kafka_namespace(
        "ns",
        brokers,
        &unique(topic),
        &format!("type = \"http\"\nurl = \"{}\"", target.url()),
    ) + "[namespaces.ns.dlq]\non_dead_letter = \"hold_key\"\n";
    (target, ns)
}

/// `hold_key` on Kafka: a dead letter holds its key, and the key's later
/// entries follow it into the DLQ topic, in order, while other keys flow.
/// The hold lives in the topic: a second process with an empty data dir
/// keeps it. Redriving them all applies the key's entries in their order
/// and releases the key. A purge through a producer-only process releases
/// it too, and the entries behind the purged letter stay listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_holds_its_key_in_the_dlq_topic() {
    common::show_logs();
    let Some(brokers) = test_server("WALDEN_TEST_KAFKA_BROKERS") else {
        return;
    };
    let (target, ns) = held_key_namespace(&brokers, "hold");
    let dir = tempfile::tempdir().unwrap();
    let first = Spawned::start(config(dir.path(), "all", &ns)).unwrap();
    let base = format!("http://{}", first.addr);
    for (id, key) in [
        ("held-1", "held"),
        ("held-2", "held"),
        ("free-1", "free"),
        ("held-3", "held"),
    ] {
        write(&base, id, key).await;
    }
    let letters = dlq_ids_when(&base, "the key's entries follow its dead letter", |ids| {
        ids == ["held-1", "held-2", "held-3"]
    })
    .await;
    assert!(
        letters[0]["last_error"].as_str().unwrap().contains("400"),
        "{letters:?}"
    );
    assert_eq!(letters[0]["holds_key"], "held", "{letters:?}");
    for l in &letters[1..] {
        assert!(l.get("holds_key").is_none(), "{l}");
        let error = l["last_error"].as_str().unwrap();
        assert!(error.contains("held behind dead letter held-1"), "{error}");
        assert_eq!(l["attempts"], 0, "never tried: {l}");
    }
    assert_eq!(applied(&target, "free"), ["free-1"]);
    first.stop();

    // A new process, with nothing on its disk, finds the hold in the topic.
    let dir2 = tempfile::tempdir().unwrap();
    let second = Spawned::start(config(dir2.path(), "all", &ns)).unwrap();
    let base = format!("http://{}", second.addr);
    write(&base, "held-4", "held").await;
    write(&base, "free-2", "free").await;
    let letters = dlq_ids_when(&base, "a new owner keeps the hold", |ids| {
        ids == ["held-1", "held-2", "held-3", "held-4"]
    })
    .await;
    let error = letters[3]["last_error"].as_str().unwrap();
    assert!(error.contains("held behind dead letter held-1"), "{error}");
    until("free-2 never arrived", || {
        applied(&target, "free").len() == 2
    })
    .await;
    assert!(applied(&target, "held").is_empty());

    // Redrive them all (named in any order): the holder comes back first,
    // and the rest follow it.
    target.reject_key("held", 0);
    let (status, body) = post(
        &format!("{base}/v1/namespaces/ns/dlq/redrive"),
        json!({"ids": ["held-4", "held-2", "held-3", "held-1"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["redriven"], 4, "{body}");
    until("the redriven entries never arrived", || {
        applied(&target, "held").len() >= 4
    })
    .await;
    // The holder's letter goes once it is applied, which releases the key.
    dlq_ids_when(&base, "the DLQ empties", |ids| ids.is_empty()).await;
    write(&base, "held-5", "held").await;
    until("held-5 never arrived", || {
        applied(&target, "held").len() >= 5
    })
    .await;
    assert_eq!(
        applied(&target, "held"),
        ["held-1", "held-2", "held-3", "held-4", "held-5"]
    );

    // Held again; a producer-only process purges the holder. The consumer
    // learns it from the topic, and the key flows again.
    target.reject_key("held", 400);
    write(&base, "held-6", "held").await;
    write(&base, "held-7", "held").await;
    dlq_ids_when(&base, "held again", |ids| ids == ["held-6", "held-7"]).await;
    target.reject_key("held", 0);
    let dir3 = tempfile::tempdir().unwrap();
    let producer = Spawned::start(config(dir3.path(), "producer", &ns)).unwrap();
    let (status, body) = post(
        &format!("http://{}/v1/namespaces/ns/dlq/purge", producer.addr),
        json!({"ids": ["held-6"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["purged"], 1, "{body}");
    dlq_ids_when(&base, "the purge reaches the consumer", |ids| {
        ids == ["held-7"]
    })
    .await;
    write(&base, "held-8", "held").await;
    until("held-8 never arrived", || {
        applied(&target, "held").contains(&"held-8".to_string())
    })
    .await;
    dlq_ids_when(&base, "held-7 stays listed", |ids| ids == ["held-7"]).await;
    producer.stop();
    second.stop();
}

/// With several targets, `hold_key` on Kafka holds a key for the target
/// whose letter it is: the other target's entries of the key go on, and a
/// redrive of the held target's letters releases the key for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_targets_a_dead_letter_holds_its_key_for_its_target_alone() {
    let Some(brokers) = test_server("WALDEN_TEST_KAFKA_BROKERS") else {
        return;
    };
    let (a, b) = (HttpTarget::start(), HttpTarget::start());
    b.reject_key("held", 400);
    let topic = unique("hold2");
    let ns = format!(
        "[namespaces.ns]\nshards = 3\n[namespaces.ns.backend]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\ngroup = \"{topic}-group\"\n[namespaces.ns.dlq]\non_dead_letter = \"hold_key\"\n[namespaces.ns.targets.a]\ntype = \"http\"\nurl = \"{}\"\n[namespaces.ns.targets.b]\ntype = \"http\"\nurl = \"{}\"\n",
        a.url(),
        b.url()
    );
    let dir = tempfile::tempdir().unwrap();
    let svc = Spawned::start(config(dir.path(), "all", &ns)).unwrap();
    let base = format!("http://{}", svc.addr);
    for (id, key) in [
        ("held-1", "held"),
        ("held-2", "held"),
        ("free-1", "free"),
        ("held-3", "held"),
    ] {
        write(&base, id, key).await;
    }
    let letters = dlq_ids_when(
        &base,
        "b's letters, the key's entries behind its hold",
        |ids| ids == ["held-1", "held-2", "held-3"],
    )
    .await;
    for l in &letters {
        assert_eq!(l["origin"]["target"], "b", "{l}");
    }
    assert_eq!(letters[0]["holds_key"], "held", "{letters:?}");
    until("a gets every entry of the key, unheld", || {
        applied(&a, "held").len() == 3
    })
    .await;
    assert_eq!(applied(&a, "held"), ["held-1", "held-2", "held-3"]);
    assert_eq!(applied(&b, "free"), ["free-1"]);
    assert!(applied(&b, "held").is_empty());

    b.reject_key("held", 0);
    let (status, body) = post(
        &format!("{base}/v1/namespaces/ns/dlq/redrive?target=b"),
        json!({"all": true}),
    )
    .await;
    assert_eq!((status, &body["redriven"]), (200, &json!(3)), "{body}");
    dlq_ids_when(&base, "the DLQ empties", |ids| ids.is_empty()).await;
    write(&base, "held-4", "held").await;
    until("b gets the key again, in order", || {
        applied(&b, "held").len() >= 4
    })
    .await;
    assert_eq!(
        applied(&b, "held"),
        ["held-1", "held-2", "held-3", "held-4"]
    );
    until("a gets held-4 once", || applied(&a, "held").len() >= 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        applied(&a, "held"),
        ["held-1", "held-2", "held-3", "held-4"],
        "the redrive went to b alone"
    );
    svc.stop();
}

/// Entries this process applied, from its namespace stats.
async fn applied_here(base: &str) -> u64 {
    let stats: Value = get_json(&format!("{base}/v1/namespaces/ns")).await;
    stats["applied"].as_u64().unwrap_or(0)
}

/// A hold follows its partition through rebalances: a second consumer joins
/// (taking some partitions), then the first leaves (handing over the rest).
/// Whoever owns the held key's partition keeps the key held, reading the
/// hold from the DLQ topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_follows_its_partition_through_rebalances() {
    common::show_logs();
    let Some(brokers) = test_server("WALDEN_TEST_KAFKA_BROKERS") else {
        return;
    };
    let (target, ns) = held_key_namespace(&brokers, "follow");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let first = Spawned::start(config(dirs[0].path(), "all", &ns)).unwrap();
    let base = format!("http://{}", first.addr);
    write(&base, "held-1", "held").await;
    dlq_ids_when(&base, "held-1 is dead-lettered", |ids| ids == ["held-1"]).await;

    let second = Spawned::start(config(dirs[1].path(), "consumer", &ns)).unwrap();
    let second_base = format!("http://{}", second.addr);
    // Wait until the second process owns a partition: it applies something.
    let deadline = std::time::Instant::now() + WAIT;
    for i in 0.. {
        write(&base, &format!("free-{i}"), &format!("f{i}")).await;
        if applied_here(&second_base).await > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second process never took a partition"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    write(&base, "held-2", "held").await;
    dlq_ids_when(&base, "held behind after a join", |ids| {
        ids == ["held-1", "held-2"]
    })
    .await;

    // The first leaves; a producer-only process writes from now on.
    first.stop();
    let producer = Spawned::start(config(dirs[2].path(), "producer", &ns)).unwrap();
    let base = format!("http://{}", producer.addr);
    write(&base, "held-3", "held").await;
    let letters = dlq_ids_when(&base, "held behind after a leave", |ids| {
        ids == ["held-1", "held-2", "held-3"]
    })
    .await;
    for l in &letters[1..] {
        let error = l["last_error"].as_str().unwrap();
        assert!(error.contains("held behind dead letter held-1"), "{error}");
    }
    assert!(applied(&target, "held").is_empty());
    producer.stop();
    second.stop();
}

/// librdkafka's send queue full is load, not failure: those entries get 429
/// and were never written; every entry answered 200 arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_client_queue_answers_429() {
    common::show_logs();
    let Some(brokers) = test_server("WALDEN_TEST_KAFKA_BROKERS") else {
        return;
    };
    let target = HttpTarget::start();
    let topic = unique("full");
    // Two messages fit in the queue, and a long linger keeps them there.
    let ns = kafka_namespace(
        "ns",
        &brokers,
        &topic,
        &format!("type = \"http\"\nurl = \"{}\"", target.url()),
    )
    .replace(
        "[namespaces.ns.target]",
        "librdkafka = { \"queue.buffering.max.messages\" = \"2\", \"linger.ms\" = \"200\" }\n[namespaces.ns.target]",
    );
    let dir = tempfile::tempdir().unwrap();
    let svc = Spawned::start(config(dir.path(), "all", &ns)).unwrap();
    let entries: Vec<Value> = (0..20)
        .map(|i| json!({"payload": {"n": i}, "key": "one-key"}))
        .collect();
    let (status, body) = post(
        &format!("http://{}/v1/namespaces/ns/log/batch", svc.addr),
        json!({ "entries": entries }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut ok = HashSet::new();
    let mut shed = 0;
    for r in body["results"].as_array().unwrap() {
        match r["status"].as_u64() {
            Some(200) => {
                ok.insert(r["id"].as_str().unwrap().to_string());
            }
            Some(429) => {
                shed += 1;
                assert_eq!(r["durable"], "false", "{r}");
                assert!(
                    r["message"].as_str().unwrap().contains("retry later"),
                    "{r}"
                );
            }
            other => panic!("unexpected status {other:?}: {r}"),
        }
    }
    assert!(shed > 0 && !ok.is_empty(), "{body}");
    let got = target.wait_for(ok.len(), WAIT);
    let delivered: HashSet<String> = got.iter().map(|r| r.id().to_string()).collect();
    assert_eq!(delivered, ok);
    svc.stop();
}
