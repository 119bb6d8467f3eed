//! Sets of mutations on Kafka (noida-db): staged in the topics, applied
//! whole at their marker; a set whose producer died before its marker is
//! given up, and nothing of it is applied, even if the marker comes late;
//! a set the target rejects goes to the DLQ whole and comes back whole; a
//! consumer killed half-way finishes the set; two consumer processes that
//! split the partitions apply sets that span both.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::target::HttpTarget;
use common::{eventually, get_json, post, test_server, unique};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use walden::service::Spawned;

const PG: &str = "WALDEN_TEST_POSTGRES_URL";
const KAFKA: &str = "WALDEN_TEST_KAFKA_BROKERS";
const WAIT: Duration = Duration::from_secs(30);

/// `[server]` with `role`, and the Kafka namespace `kv` (3 shards) on
/// `topic` delivering to `target`; `extra` goes into the backend table.
fn config(
    data: &Path,
    role: &str,
    brokers: &str,
    topic: &str,
    target: &str,
    extra: &str,
) -> walden::config::Config {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{}"
role = "{role}"
[namespaces.kv]
shards = 3
[namespaces.kv.backend]
type = "kafka"
brokers = "{brokers}"
topic = "{topic}"
group = "{topic}-group"
{extra}
[namespaces.kv.target]
{target}
[namespaces.kv.retry]
initial_backoff_ms = 10
max_backoff_ms = 50
"#,
        data.display()
    );
    let c = walden::config::from_toml(&text).unwrap();
    walden::config::validate(&c).expect("the test config is valid");
    c
}

/// key → value (`None`: deleted)
async fn rows(url: &str, table: &str) -> HashMap<String, Option<Value>> {
    common::pg(url)
        .await
        .query(&format!("SELECT key, value, deleted FROM {table}"), &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            let deleted: bool = r.get(2);
            (r.get(0), if deleted { None } else { r.get(1) })
        })
        .collect()
}

fn put(key: &str, value: Value) -> Value {
    json!({"key": key, "payload": {"op": "put", "key": key, "value": value}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_sets_and_single_writes_reach_postgres_whole_and_in_order() {
    common::show_logs();
    let (Some(brokers), Some(url)) = (test_server(KAFKA), test_server(PG)) else {
        return;
    };
    let table = common::postgres_table_checked(&url, "walden_ksets", "").await;
    let dir = tempfile::tempdir().unwrap();
    let target = format!("type = \"postgres\"\nurl = \"{url}\"\ntable = \"{table}\"");
    let topic = unique("ksets");
    let svc = Spawned::start(config(dir.path(), "all", &brokers, &topic, &target, "")).unwrap();
    let base = format!("http://{}/v1/namespaces/kv", svc.addr);
    // One after another, over overlapping keys: each key ends with its last
    // write, whether that was a single write or in a set.
    let mut want: HashMap<String, Option<Value>> = HashMap::new();
    for i in 0..40u64 {
        let keys: Vec<String> = (0..4)
            .map(|j| format!("k{}", (i * 3 + j * 5) % 11))
            .collect();
        if i % 4 == 3 {
            let (status, body) = post(
                &format!("{base}/log"),
                json!({"payload": {"op": "put", "key": keys[0], "value": i}}),
            )
            .await;
            assert_eq!((status, &body["durable"]), (200, &json!("true")), "{body}");
            want.insert(keys[0].clone(), Some(json!(i)));
            continue;
        }
        let mut mutations: Vec<Value> = keys.iter().map(|k| put(k, json!(i))).collect();
        mutations[1] = json!({"key": keys[1], "payload": {"op": "delete", "key": keys[1]}});
        let (status, body) = post(
            &format!("{base}/mutations"),
            json!({"id": format!("set-{i}"), "mutations": mutations}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["durable"], "true", "{body}");
        assert_eq!(body["mutations"], 4);
        for (j, k) in keys.iter().enumerate() {
            want.insert(k.clone(), (j != 1).then(|| json!(i)));
        }
    }
    eventually("every key at its last write", WAIT, || async {
        let got = rows(&url, &table).await;
        match got == want {
            true => Ok(()),
            false => Err(format!("want {want:?}, got {got:?}")),
        }
    })
    .await;
    let stats = get_json(&base).await;
    assert_eq!(stats["sets_written"], 30, "{stats}");
    eventually("the sets counted", WAIT, || async {
        let stats = get_json(&base).await;
        let sets = &stats["targets"][0]["sets"];
        // Each mutation and single write once; markers are not entries.
        let entries = stats["applied"] == 130;
        match entries && sets["applied"] == 30 && sets["oldest_waiting_age_ms"].is_null() {
            true => Ok(()),
            false => Err(format!("{stats}")),
        }
    })
    .await;
    svc.stop();
}

/// A raw Kafka producer, to write what a producer that died half-way
/// leaves on the topic.
fn raw_producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .create()
        .unwrap()
}

async fn produce(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    key: &str,
    payload: &[u8],
    headers: &[(&str, String)],
) {
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    producer
        .send(
            FutureRecord::to(topic)
                .partition(partition)
                .key(key)
                .payload(payload)
                .headers(h),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
}

/// The partition Walden routes `key` to, of `shards`.
fn partition_of(key: &str, shards: u32) -> i32 {
    walden::routing::shard_of(walden::routing::RouteHash::default(), Some(key), "", shards) as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_a_set_whose_producer_died_before_its_marker_is_given_up_whole() {
    common::show_logs();
    let Some(brokers) = test_server(KAFKA) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let topic = unique("korphan");
    let svc = Spawned::start(config(
        dir.path(),
        "all",
        &brokers,
        &topic,
        &format!("type = \"http\"\nurl = \"{}\"", target.url()),
        "set_abandon_after_ms = 500",
    ))
    .unwrap();
    let base = format!("http://{}/v1/namespaces/kv", svc.addr);
    // What a producer that died between the two phases leaves: two of the
    // set's three mutations, past their deadline, and no marker.
    let raw = raw_producer(&brokers);
    let member = |i: usize| {
        vec![
            ("walden.id", format!("orphan.{i}")),
            ("walden.set", "orphan".to_string()),
            ("walden.set_index", i.to_string()),
            ("walden.set_size", "3".to_string()),
            ("walden.set_attempt", "00000000000000aa".to_string()),
            ("walden.set_deadline_ms", "1".to_string()),
        ]
    };
    for (i, key) in [(0, "a"), (1, "b")] {
        let p = partition_of(key, 3);
        produce(&raw, &topic, p, key, b"{\"lost\":true}", &member(i)).await;
    }
    // Single writes to the same keys, after the orphans: the keys are
    // released once the set is given up.
    for key in ["a", "b"] {
        let (status, body) = post(
            &format!("{base}/log"),
            json!({"id": format!("after-{key}"), "key": key, "payload": {"ok": key}}),
        )
        .await;
        assert_eq!((status, &body["durable"]), (200, &json!("true")), "{body}");
    }
    let got = target.wait_for(2, WAIT);
    let ids: Vec<&str> = got.iter().map(|r| r.id()).collect();
    assert!(
        ids.contains(&"after-a") && ids.contains(&"after-b"),
        "{ids:?}"
    );
    // Its marker, come late (after the request to give it up): ignored.
    produce(
        &raw,
        &topic,
        0,
        "orphan",
        b"{}",
        &[
            ("walden.id", "orphan".to_string()),
            ("walden.set_marker", "orphan".to_string()),
            ("walden.set_size", "3".to_string()),
            ("walden.set_attempt", "00000000000000aa".to_string()),
        ],
    )
    .await;
    // A set written now still goes through, after the late marker.
    let (status, body) = post(
        &format!("{base}/mutations"),
        json!({"id": "fine", "mutations": [put("a", json!(1)), put("c", json!(2))]}),
    )
    .await;
    assert_eq!((status, &body["durable"]), (200, &json!("true")), "{body}");
    let got = target.wait_for(3, WAIT);
    assert_eq!(got[2].body["set"], "fine", "{}", got[2].body);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = target.received();
    assert_eq!(
        got.len(),
        3,
        "nothing of the orphan set is applied: {got:?}"
    );
    assert!(got.iter().all(|r| !r.body.to_string().contains("lost")));
    svc.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_a_rejected_set_goes_to_the_dlq_whole_and_is_redriven_whole() {
    common::show_logs();
    let (Some(brokers), Some(url)) = (test_server(KAFKA), test_server(PG)) else {
        return;
    };
    let table = common::postgres_table_checked(
        &url,
        "walden_ksets",
        ", CHECK (value IS NULL OR value->>'bad' IS NULL)",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let target = format!("type = \"postgres\"\nurl = \"{url}\"\ntable = \"{table}\"");
    let topic = unique("kdlq");
    let svc = Spawned::start(config(dir.path(), "all", &brokers, &topic, &target, "")).unwrap();
    let base = format!("http://{}/v1/namespaces/kv", svc.addr);
    let set = json!({"id": "doomed", "mutations": [
        put("x", json!(1)), put("y", json!(2)), put("z", json!({"bad": true}))]});
    let (status, body) = post(&format!("{base}/mutations"), set).await;
    assert_eq!((status, &body["durable"]), (200, &json!("true")), "{body}");
    eventually("one letter for the set", WAIT, || async {
        let dlq = get_json(&format!("{base}/dlq")).await;
        match dlq["total"] == 1 {
            true => Ok(()),
            false => Err(format!("{dlq}")),
        }
    })
    .await;
    assert!(rows(&url, &table).await.is_empty(), "none of it applied");
    common::pg(&url)
        .await
        .batch_execute(&format!(
            "ALTER TABLE {table} DROP CONSTRAINT {table}_value_check"
        ))
        .await
        .unwrap();
    let (status, body) = post(&format!("{base}/dlq/redrive"), json!({"ids": ["doomed"]})).await;
    assert_eq!((status, &body["redriven"]), (200, &json!(1)), "{body}");
    eventually("the redriven set", WAIT, || async {
        let got = rows(&url, &table).await;
        match got.len() == 3 && got["z"] == Some(json!({"bad": true})) {
            true => Ok(()),
            false => Err(format!("{got:?}")),
        }
    })
    .await;
    svc.stop();
}

/// The namespace `kv` on tansu for a consumer process of its own (tansu
/// evicts a killed dynamic member; noida-db never does), on `port`.
fn consumer_process(
    dir: &Path,
    port: u16,
    brokers: &str,
    topic: &str,
    target: &str,
) -> std::path::PathBuf {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
data_dir = "{}"
role = "consumer"
static_membership = false
[namespaces.kv]
shards = 4
[namespaces.kv.backend]
type = "kafka"
brokers = "{brokers}"
topic = "{topic}"
group = "{topic}-group"
rebalance_drain_ms = 2000
[namespaces.kv.backend.librdkafka]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "1000"
[namespaces.kv.target]
{target}
"#,
        dir.join("data").display()
    );
    let path = dir.join("walden.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn applied_by(port: u16) -> u64 {
    let st = get_json(&format!("http://127.0.0.1:{port}/v1/namespaces/kv")).await;
    st["applied"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_sets_spanning_two_consumer_processes_apply_whole_even_when_one_is_killed() {
    common::show_logs();
    let (Some(brokers), Some(url)) = (test_server("WALDEN_TEST_TANSU_BROKERS"), test_server(PG))
    else {
        return;
    };
    let table = common::postgres_table_checked(&url, "walden_ksets", "").await;
    let target = format!("type = \"postgres\"\nurl = \"{url}\"\ntable = \"{table}\"");
    let topic = unique("ksplit");
    let pdir = tempfile::tempdir().unwrap();
    let mut producer_config = config(pdir.path(), "producer", &brokers, &topic, &target, "");
    producer_config.namespaces.get_mut("kv").unwrap().shards = 4;
    let producer = Spawned::start(producer_config).unwrap();
    let base = format!("http://{}/v1/namespaces/kv", producer.addr);
    let (adir, bdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (aport, bport) = (common::free_port(), common::free_port());
    let mut a = common::start_walden(&consumer_process(
        adir.path(),
        aport,
        &brokers,
        &topic,
        &target,
    ));
    let mut b = common::start_walden(&consumer_process(
        bdir.path(),
        bport,
        &brokers,
        &topic,
        &target,
    ));
    common::wait_healthy(aport).await;
    common::wait_healthy(bport).await;
    // Single writes until both processes apply: the group split the
    // partitions between them.
    let deadline = Instant::now() + WAIT * 2;
    let mut n = 0;
    loop {
        for _ in 0..8 {
            let key = format!("warm{n}");
            let (status, _) = post(
                &format!("{base}/log"),
                json!({"key": key, "payload": {"op": "put", "key": key, "value": 0}}),
            )
            .await;
            assert_eq!(status, 200);
            n += 1;
        }
        let (na, nb) = (applied_by(aport).await, applied_by(bport).await);
        if na > 0 && nb > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no split: a applied {na}, b applied {nb}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Sets over keys in every partition, so each spans both processes; one
    // process is killed while they flow, and the other finishes them.
    let keys: Vec<String> = (0..8).map(|i| format!("s{i}")).collect();
    // Meanwhile a reader must never see part of a set: every set writes
    // all eight keys, so one snapshot shows one value across them.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (url, table, stop) = (url.clone(), table.clone(), stop.clone());
        tokio::spawn(async move {
            let mut client = common::pg(&url).await;
            let mut looks = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let tx = client
                    .build_transaction()
                    .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                    .start()
                    .await
                    .unwrap();
                let rows = tx
                    .query(
                        &format!("SELECT value FROM {table} WHERE key LIKE 's%'"),
                        &[],
                    )
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                let values: std::collections::HashSet<String> = rows
                    .iter()
                    .map(|r| r.get::<_, Value>(0).to_string())
                    .collect();
                assert!(
                    rows.is_empty() || (rows.len() == 8 && values.len() == 1),
                    "part of a set seen: {values:?} over {} rows",
                    rows.len()
                );
                looks += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            looks
        })
    };
    let mut killed = false;
    for i in 0..30 {
        let mutations: Vec<Value> = keys.iter().map(|k| put(k, json!(i))).collect();
        let (status, body) = post(
            &format!("{base}/mutations"),
            json!({"id": format!("wide-{i}"), "mutations": mutations}),
        )
        .await;
        assert_eq!((status, &body["durable"]), (200, &json!("true")), "{body}");
        if i == 10 {
            a.kill().unwrap(); // SIGKILL, sets in flight
            a.wait().unwrap();
            killed = true;
        }
    }
    assert!(killed);
    eventually("every key at the last set", WAIT * 3, || async {
        let got = rows(&url, &table).await;
        match keys.iter().all(|k| got.get(k) == Some(&Some(json!(29)))) {
            true => Ok(()),
            false => Err(format!("{got:?}")),
        }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let looks = reader.await.expect("the reader never saw part of a set");
    assert!(looks > 10, "the reader looked {looks} times");
    let _ = b.kill();
    let _ = b.wait();
    producer.stop();
}

/// `<topic>.sets` is created with the namespace's `sets_retention_ms`, so
/// the topic every process reads from its start does not grow for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_the_sets_topic_is_created_with_its_retention() {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let Some(brokers) = test_server(KAFKA) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("ksets-retention");
    let target = format!(
        "type = \"file\"\npath = \"{}\"",
        dir.path().join("out.jsonl").display()
    );
    let svc = Spawned::start(config(
        dir.path(),
        "all",
        &brokers,
        &topic,
        &target,
        "sets_retention_ms = 3600000",
    ))
    .unwrap();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let sets = format!("{topic}.sets");
    let described = admin
        .describe_configs(
            [&ResourceSpecifier::Topic(&sets)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    let resource = described[0].as_ref().expect("the sets topic is described");
    let entry = |name: &str| {
        resource
            .get(name)
            .and_then(|e| e.value.clone())
            .unwrap_or_default()
    };
    assert_eq!(entry("retention.ms"), "3600000", "{:?}", resource.entries);
    assert_eq!(entry("cleanup.policy"), "delete", "{:?}", resource.entries);
    svc.stop();
}
