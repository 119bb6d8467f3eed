//! Routing: a new namespace spreads its keys with murmur2; a namespace that
//! holds data keeps the hash it was created with, across restarts; and a
//! config that would move keys between shards is refused at start, naming
//! `routing.hash`.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::service_config;
use common::target::HttpTarget;
use serde_json::{Value, json};
use walden::routing::RouteHash;
use walden::service::Spawned;

/// Write one entry per key; the shard each was answered with.
async fn shards_of(svc: &Spawned, keys: &[String]) -> Vec<u32> {
    let client = reqwest::Client::new();
    let mut out = Vec::new();
    for key in keys {
        let v: Value = client
            .post(format!("http://{}/v1/namespaces/ns/log", svc.addr))
            .json(&json!({"key": key, "payload": {"k": key}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["durable"], "true", "{v}");
        out.push(v["shard"].as_u64().unwrap() as u32);
    }
    out
}

fn short_keys() -> Vec<String> {
    (0..10).map(|i| format!("k{i}")).collect()
}

fn recorded(data: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(data.join("namespaces.json")).unwrap()).unwrap()
}

fn start_error(config: walden::config::Config) -> String {
    match Spawned::start(config) {
        Ok(_) => panic!("the service started"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_namespace_spreads_short_keys_with_murmur2() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let svc = Spawned::start(service_config(dir.path(), &target.url(), 4, "")).unwrap();
    let shards = shards_of(&svc, &short_keys()).await;
    let want: Vec<u32> = short_keys()
        .iter()
        .map(|k| RouteHash::Murmur2.shard(k.as_bytes(), 4))
        .collect();
    assert_eq!(shards, want);
    let used: BTreeSet<u32> = shards.into_iter().collect();
    assert!(used.len() >= 3, "k0..k9 landed on {used:?}");
    drop(svc);
    assert_eq!(
        recorded(dir.path())["ns"],
        json!({"shards": 4, "hash": "murmur2"})
    );
}

/// A data directory from before murmur2 records a bare shard count: its
/// namespace routed with crc32c and keeps doing so, also after a restart
/// that rewrites the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_created_before_keeps_its_mapping_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("namespaces.json"), r#"{"ns": 4}"#).unwrap();
    let target = HttpTarget::start();
    let want: Vec<u32> = short_keys()
        .iter()
        .map(|k| RouteHash::Crc32c.shard(k.as_bytes(), 4))
        .collect();
    for _ in 0..2 {
        let svc = Spawned::start(service_config(dir.path(), &target.url(), 4, "")).unwrap();
        assert_eq!(shards_of(&svc, &short_keys()).await, want);
    }
    assert_eq!(
        recorded(dir.path())["ns"],
        json!({"shards": 4, "hash": "crc32c"})
    );
    // Asking for another hash would move its keys.
    let err = start_error(service_config(
        dir.path(),
        &target.url(),
        4,
        r#"routing = { hash = "murmur2" }"#,
    ));
    assert!(
        err.contains("`routing.hash`") && err.contains("crc32c"),
        "{err}"
    );
    // Saying what it is works.
    let svc = Spawned::start(service_config(
        dir.path(),
        &target.url(),
        4,
        r#"routing = { hash = "crc32c" }"#,
    ))
    .unwrap();
    assert_eq!(shards_of(&svc, &short_keys()).await, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_whose_record_is_lost_needs_its_hash_said() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let svc = Spawned::start(service_config(dir.path(), &target.url(), 4, "")).unwrap();
    shards_of(&svc, &short_keys()).await;
    drop(svc);
    std::fs::remove_file(dir.path().join("namespaces.json")).unwrap();
    let err = start_error(service_config(dir.path(), &target.url(), 4, ""));
    assert!(
        err.contains("`routing.hash`") && err.contains("namespaces.json"),
        "{err}"
    );
    let svc = Spawned::start(service_config(
        dir.path(),
        &target.url(),
        4,
        r#"routing = { hash = "murmur2" }"#,
    ))
    .unwrap();
    let want: Vec<u32> = short_keys()
        .iter()
        .map(|k| RouteHash::Murmur2.shard(k.as_bytes(), 4))
        .collect();
    assert_eq!(shards_of(&svc, &short_keys()).await, want);
}

fn kafka_config(data: &Path, extra: &str) -> walden::config::Config {
    // Refused before any connection: no broker is needed.
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{}"

[namespaces.ns]
shards = 4
{extra}

[namespaces.ns.backend]
type = "kafka"
brokers = "127.0.0.1:1"
topic = "walden-routing"

[namespaces.ns.target]
type = "stdout"
"#,
        data.display()
    );
    walden::config::from_toml(&text).expect("test config parses")
}

/// On a broker every process must route alike, so a Kafka namespace that
/// routed with crc32c before is not moved to the new default silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_namespace_from_before_must_name_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("namespaces.json"), r#"{"ns": 4}"#).unwrap();
    let err = start_error(kafka_config(dir.path(), ""));
    assert!(
        err.contains("`routing.hash`") && err.contains("routing.hash = \"crc32c\""),
        "{err}"
    );
}
