//! Supervision on a Kafka namespace: actors that panic are restarted, the
//! shard rewinds to its committed offset, no acknowledged entry is lost, and
//! the committed offsets still reach the end (a rewind must not leave a
//! stale delivery holding the watermark). Its own process, for the
//! failpoints.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::target::HttpTarget;
use common::{test_server, unique};
use serde_json::{Value, json};
use walden::service::Spawned;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewind_on_kafka_loses_nothing_and_commits_to_the_end() {
    let Some(brokers) = test_server("WALDEN_TEST_KAFKA_BROKERS") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let topic = unique("supervised");
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{}"
[namespaces.ns]
shards = 2
[namespaces.ns.backend]
type = "kafka"
brokers = "{brokers}"
topic = "{topic}"
group = "{topic}-group"
[namespaces.ns.target]
type = "http"
url = "{}"
"#,
        dir.path().display(),
        target.url()
    );
    let svc = Spawned::start(walden::config::from_toml(&text).unwrap()).unwrap();
    let base = format!("http://{}", svc.addr);
    let client = reqwest::Client::new();
    let mut ends: HashMap<u64, u64> = HashMap::new();
    let mut want = HashSet::new();
    let mut write = async |from: usize, n: usize| {
        for i in from..from + n {
            let id = format!("e{i}");
            let r: Value = client
                .post(format!("{base}/v1/namespaces/ns/log"))
                .json(&json!({"payload": i, "key": format!("k{}", i % 5), "id": id}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(r["durable"], "true", "{r}");
            let (shard, seq) = (
                r["shard"].as_u64().unwrap(),
                r["sequence"].as_u64().unwrap(),
            );
            let end = ends.entry(shard).or_default();
            *end = (*end).max(seq + 1);
            want.insert(id);
        }
    };
    write(0, 20).await;
    target.wait_for(20, Duration::from_secs(30));
    walden::failpoints::arm("applier.apply", 2);
    walden::failpoints::arm("consumer.route", 1);
    write(20, 30).await;

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got: HashSet<String> = target.ids();
        let st: Value = reqwest::get(format!("{base}/v1/namespaces/ns"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let committed: HashMap<u64, u64> = st["per_shard"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["shard"].as_u64().unwrap(),
                    s["committed"].as_u64().unwrap(),
                )
            })
            .collect();
        let caught_up = ends.iter().all(|(s, end)| committed.get(s) == Some(end));
        if want.is_subset(&got) && caught_up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "missing {:?}; committed {committed:?}, ends {ends:?}",
            want.difference(&got).take(5).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    svc.stop();
}
