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

async fn namespace_stats(client: &reqwest::Client, svc: &Spawned) -> Value {
    client
        .get(format!("http://{}/v1/namespaces/ns", svc.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
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
    let stats = namespace_stats(&client, &svc).await;
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

/// A target that panics on one key: the panicking call is caught where it is
/// made, its batch is applied again entry by entry, and only the entry that
/// panics alone goes to the DLQ, with the panic's message. Nothing restarts,
/// so nothing is redelivered; the other keys keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_panics_on_one_key_dead_letters_that_key_alone() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let svc = Spawned::start(service_config(dir.path(), &target.url(), 2, "")).unwrap();
    let client = reqwest::Client::new();
    let base = format!("http://{}", svc.addr);
    let url = format!("{base}/v1/namespaces/ns/log");
    walden::failpoints::arm_on("sink.http.key", "k3");
    let ids = write_n(&client, &url, 0, 50).await;
    let (poison, good): (Vec<String>, Vec<String>) = ids
        .into_iter()
        .partition(|id| id[1..].parse::<usize>().unwrap() % 5 == 3);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got: HashSet<String> = target.ids();
        let dlq: Value = client
            .get(format!("{base}/v1/namespaces/ns/dlq?limit=100"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let dead: HashSet<String> = dlq["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["id"].as_str().unwrap().to_string())
            .collect();
        if good.iter().all(|id| got.contains(id)) && poison.iter().all(|id| dead.contains(id)) {
            assert!(poison.iter().all(|id| !got.contains(id)));
            assert!(
                good.iter().all(|id| !dead.contains(id)),
                "only k3 is dead-lettered"
            );
            let error = dlq["entries"][0]["last_error"].as_str().unwrap();
            assert!(
                error.contains("panicked") && error.contains("k3"),
                "{error}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "delivered {} of {} good, dead-lettered {} of {} poison",
            good.iter().filter(|id| got.contains(*id)).count(),
            good.len(),
            dead.len(),
            poison.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    walden::failpoints::disarm_on("sink.http.key");
    let restarts = common::restarts(&base, "ns").await;
    assert_eq!(restarts, 0, "a target's panic restarts nothing");
    // Nothing was delivered twice: no rewind redelivered the batch.
    let received = target.ids::<Vec<String>>();
    assert_eq!(received.len(), good.len(), "{received:?}");
}

/// An actor that fails again at once after each restart (a store that keeps
/// erroring, a bug on its start path) is restarted with a growing pause, not
/// in a tight loop; when the fault clears, the shard goes on and loses
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_back_off_and_the_shard_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let svc = Spawned::start(service_config(dir.path(), &target.url(), 1, "")).unwrap();
    let client = reqwest::Client::new();
    let base = format!("http://{}", svc.addr);
    walden::failpoints::arm("applier.apply", 1_000_000);
    let ids = write_n(&client, &format!("{base}/v1/namespaces/ns/log"), 0, 10).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = common::restarts(&base, "ns").await;
    assert!(
        (3..=12).contains(&n),
        "{n} restarts in 3 s: a restart storm, or none at all"
    );
    walden::failpoints::arm("applier.apply", 0);
    let want: HashSet<String> = ids.into_iter().collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !want.is_subset(&target.ids()) {
        assert!(Instant::now() < deadline, "the shard never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The file target defers its fsync: an entry counts as applied, and is
/// acknowledged, only once a flush covers it. While every flush fails, the
/// lines reach the file but nothing is acknowledged: the committed offset
/// stays at 0, and each restart applies the entries again. Once a flush
/// succeeds, they are applied and committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_target_acknowledges_only_what_a_flush_made_durable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    let config = common::file_target_config(&dir.path().join("data"), &path, 1);
    let svc = Spawned::start(config).unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/namespaces/ns/log", svc.addr);
    let shard = || async { namespace_stats(&client, &svc).await["per_shard"][0].clone() };
    let lines_of = |id: &str| {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&format!("\"id\":\"{id}\"")))
            .count()
    };

    walden::failpoints::arm("applier.flush", u32::MAX);
    let ids = write_n(&client, &url, 0, 5).await;
    // Applied, its flush failed, applied again after the rewind.
    let deadline = Instant::now() + Duration::from_secs(20);
    while ids.iter().any(|id| lines_of(id) < 2) {
        assert!(Instant::now() < deadline, "never applied again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = shard().await;
    assert_eq!(s["applied"], 0, "nothing flushed, nothing applied: {s}");
    assert_eq!(s["committed"], 0, "nothing flushed, nothing committed: {s}");
    assert!(s["restarts"].as_u64().unwrap() >= 1, "{s}");

    walden::failpoints::arm("applier.flush", 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = shard().await;
        if s["applied"] == 5 && s["committed"] == 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not applied after the flush: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
