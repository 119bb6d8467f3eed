//! Supervision: an actor that panics mid-stream is restarted, no acknowledged
//! entry is lost, and the rest keep flowing. The panic is injected through a
//! test-only failpoint (this file is its own process, so the failpoint cannot
//! hit another test's service).

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::service_config;
use common::target::HttpTarget;
use serde_json::{Value, json};
use walden::service::Spawned;

async fn write_n(client: &reqwest::Client, url: &str, from: usize, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in from..from + n {
        let id = format!("e{i}");
        let resp = client
            .post(url)
            .json(&json!({"payload": i, "key": format!("k{}", i % 5), "id": id}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        ids.push(id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_actors_are_restarted_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let svc = Spawned::start(service_config(dir.path(), &target.url(), 2, "")).unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/namespaces/ns/log", svc.addr);

    let mut ids = write_n(&client, &url, 0, 20).await;
    // Mid-stream: the applier panics twice, the consumer once, the delay
    // scheduler once.
    walden::failpoints::arm("applier.apply", 2);
    walden::failpoints::arm("consumer.route", 1);
    ids.extend(write_n(&client, &url, 20, 20).await);
    walden::failpoints::arm("delay.fire", 1);
    let resp = client
        .post(&url)
        .json(&json!({"payload": "late", "id": "delayed", "lifecycle": {"delay_ms": 100}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    ids.push("delayed".into());
    ids.extend(write_n(&client, &url, 40, 20).await);

    let deadline = Instant::now() + Duration::from_secs(20);
    let want: HashSet<String> = ids.into_iter().collect();
    loop {
        let got: HashSet<String> = target.ids();
        if want.is_subset(&got) {
            break;
        }
        let missing: Vec<_> = want.difference(&got).take(5).collect();
        assert!(
            Instant::now() < deadline,
            "still missing after restarts: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats: Value = client
        .get(format!("http://{}/v1/namespaces/ns", svc.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let restarts: u64 = stats["per_shard"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["restarts"].as_u64().unwrap())
        .sum();
    assert!(restarts >= 3, "actors were restarted: {stats}");
    // The service still takes writes.
    write_n(&client, &url, 100, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_ingest_answers_unknown_never_true() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let svc = Spawned::start(service_config(dir.path(), &target.url(), 1, "")).unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/namespaces/ns/log", svc.addr);
    walden::failpoints::arm("ingest.write", 1);
    let resp = client
        .post(&url)
        .json(&json!({"payload": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["durable"], "unknown");
    // The restarted ingest actor takes the next write.
    let resp = client
        .post(&url)
        .json(&json!({"payload": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_shard_mailbox_sheds_with_429_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let mut config = service_config(dir.path(), &target.url(), 1, "");
    config.server.mailbox_capacity = 1;
    let svc = Spawned::start(config).unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/namespaces/ns/log", svc.addr);
    // The shard's ingest actor stalls on its next message, so its one-slot
    // mailbox fills up behind it.
    walden::failpoints::arm_sleep("ingest.write", 1, 500);
    let writes: Vec<_> = (0..20)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let resp = client
                    .post(&url)
                    .json(&json!({"payload": i, "id": format!("m{i}")}))
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                let retry_after = resp.headers().contains_key("retry-after");
                let body: Value = resp.json().await.unwrap();
                (i, status, retry_after, body)
            })
        })
        .collect();
    let mut accepted = Vec::new();
    let mut shed = 0;
    for w in writes {
        let (i, status, retry_after, body) = w.await.unwrap();
        match status {
            200 => accepted.push(format!("m{i}")),
            429 => {
                shed += 1;
                assert!(retry_after);
                assert_eq!(body["durable"], "false");
                assert!(
                    body["message"].as_str().unwrap().contains("overloaded"),
                    "{body}"
                );
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(shed > 0, "a full mailbox sheds");
    assert!(!accepted.is_empty());
    let got = target.wait_for(accepted.len(), Duration::from_secs(10));
    let ids: HashSet<String> = got.iter().map(|r| r.id().to_string()).collect();
    assert!(
        accepted.iter().all(|id| ids.contains(id)),
        "every accepted write is delivered"
    );
    assert_eq!(ids.len(), accepted.len(), "nothing shed was written");
}
