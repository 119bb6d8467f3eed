//! Idempotency keys: a client id seen within the dedup window gets the
//! original answer and is not appended again, even across a SIGKILL.

mod common;

use std::time::Duration;

use common::target::HttpTarget;
use common::{free_port, post, service_config, start_walden, wait_healthy};
use serde_json::{Value, json};
use walden::service::Spawned;

async fn entries_in_log(base: &str) -> u64 {
    let st: Value = reqwest::get(format!("{base}/v1/namespaces/ns"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    st["per_shard"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["next_sequence"].as_u64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_id_gets_the_original_answer_and_one_entry() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let svc = Spawned::start(service_config(dir.path(), &target.url(), 4, "")).unwrap();
    let base = format!("http://{}", svc.addr);
    let url = format!("{base}/v1/namespaces/ns/log");
    let body = json!({"payload": {"v": 1}, "key": "k", "id": "order-1", "headers": {"a": "1"}});
    let (s1, first) = post(&url, body.clone()).await;
    let (s2, second) = post(&url, body.clone()).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(first, second, "the same answer");
    // A retry that differs only in its trace context is the same write.
    let resp = reqwest::Client::new()
        .post(&url)
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.json::<Value>().await.unwrap(), first);
    assert_eq!(entries_in_log(&base).await, 1);

    // The same id with a different body is refused, and writes nothing.
    let (status, answer) = post(
        &url,
        json!({"payload": {"v": 2}, "key": "k", "id": "order-1"}),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["durable"], "false");
    assert!(answer["message"].as_str().unwrap().contains("order-1"));
    assert_eq!(entries_in_log(&base).await, 1);

    // Ids without a client id are never deduplicated.
    post(&url, json!({"payload": 1})).await;
    post(&url, json!({"payload": 1})).await;
    assert_eq!(entries_in_log(&base).await, 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        target
            .received()
            .iter()
            .filter(|r| r.id() == "order-1")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_wait_for_the_first_and_share_its_answer() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let svc = Spawned::start(service_config(dir.path(), &target.url(), 2, "")).unwrap();
    let base = format!("http://{}", svc.addr);
    let url = format!("{base}/v1/namespaces/ns/log");
    let writes: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { post(&url, json!({"payload": "same", "id": "dup"})).await })
        })
        .collect();
    let mut answers = Vec::new();
    for w in writes {
        let (status, answer) = w.await.unwrap();
        assert_eq!(status, 200, "{answer}");
        answers.push(answer);
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    assert_eq!(entries_in_log(&base).await, 1);

    // Twice in one batch: one entry, the same answer twice.
    let (status, batch) = post(
        &format!("{url}/batch"),
        json!({"entries": [{"payload": 1, "id": "b"}, {"payload": 1, "id": "b"}, {"payload": 2, "id": "b"}]}),
    )
    .await;
    assert_eq!(status, 200);
    let r = batch["results"].as_array().unwrap();
    assert_eq!(
        (r[0]["status"].as_u64(), r[1]["status"].as_u64()),
        (Some(200), Some(200))
    );
    assert_eq!(r[0]["sequence"], r[1]["sequence"]);
    assert_eq!(r[2]["status"], 409);
    assert_eq!(entries_in_log(&base).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_expires_and_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let svc = Spawned::start(service_config(
        dir.path(),
        &target.url(),
        1,
        "dedup_window_ms = 300",
    ))
    .unwrap();
    let base = format!("http://{}", svc.addr);
    let url = format!("{base}/v1/namespaces/ns/log");
    let (_, first) = post(&url, json!({"payload": 1, "id": "x"})).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (_, again) = post(&url, json!({"payload": 1, "id": "x"})).await;
    assert_ne!(
        first["sequence"], again["sequence"],
        "past the window it is a new write"
    );
    drop(svc);

    let dir = tempfile::tempdir().unwrap();
    let svc = Spawned::start(service_config(
        dir.path(),
        &target.url(),
        1,
        "dedup_window_ms = 0",
    ))
    .unwrap();
    let url = format!("http://{}/v1/namespaces/ns/log", svc.addr);
    let (_, a) = post(&url, json!({"payload": 1, "id": "y"})).await;
    let (_, b) = post(&url, json!({"payload": 1, "id": "y"})).await;
    assert_ne!(a["sequence"], b["sequence"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_remembered_across_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let config_path = dir.path().join("walden.toml");
    let start = |port: u16| {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n[namespaces.ns.backend]\ntype = \"embedded\"\n[namespaces.ns.target]\ntype = \"http\"\nurl = \"{}\"\n",
            dir.path().join("data").display(),
            target.url()
        );
        std::fs::write(&config_path, text).unwrap();
        start_walden(&config_path)
    };
    let port = free_port();
    let mut child = start(port);
    wait_healthy(port).await;
    let url = format!("http://127.0.0.1:{port}/v1/namespaces/ns/log");
    let mut answers = Vec::new();
    for i in 0..20 {
        let (status, a) = post(&url, json!({"payload": i, "id": format!("id-{i}")})).await;
        assert_eq!(status, 200);
        answers.push(a);
    }
    child.kill().unwrap(); // SIGKILL: the index may not have reached the disk
    child.wait().unwrap();
    // Worse than that: lose the whole index. The log alone must bring it back.
    std::fs::remove_dir_all(dir.path().join("data").join("state")).unwrap();

    let port = free_port();
    let mut child = start(port);
    wait_healthy(port).await;
    let url = format!("http://127.0.0.1:{port}/v1/namespaces/ns/log");
    for (i, before) in answers.iter().enumerate() {
        let (status, a) = post(&url, json!({"payload": i, "id": format!("id-{i}")})).await;
        assert_eq!(status, 200);
        assert_eq!(&a, before, "id-{i} keeps its original answer");
    }
    let total = entries_in_log(&format!("http://127.0.0.1:{port}")).await;
    assert_eq!(total, 20, "nothing was appended twice");
    child.kill().unwrap();
    child.wait().unwrap();
}
