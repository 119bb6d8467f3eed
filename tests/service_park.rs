//! The park store: a long backoff parks an entry and the later entries of
//! its key durably, other keys flow, and the key's entries come back in
//! order; `hold_key` keeps a dead-lettered key's later entries until redrive
//! or purge, across a SIGKILL too.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::target::HttpTarget;
use common::{free_port, start_walden, wait_healthy};
use serde_json::{Value, json};
use walden::service::Spawned;

const WAIT: Duration = Duration::from_secs(20);

fn config_text(data: &std::path::Path, listen: &str, target: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
data_dir = "{}"
[namespaces.ns]
shards = 2
[namespaces.ns.backend]
type = "embedded"
[namespaces.ns.target]
type = "http"
url = "{target}"
[namespaces.ns.retry]
initial_backoff_ms = 10
# Room for the targets' Retry-After (1-2 s), which is capped here.
max_backoff_ms = 2000
max_attempts = 1000
park_after_ms = 100
{extra}
"#,
        data.display()
    )
}

async fn post(url: &str, body: Value) -> u16 {
    reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn stats(base: &str) -> Value {
    reqwest::get(format!("{base}/v1/namespaces/ns"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn values_of(target: &HttpTarget, key: &str) -> Vec<i64> {
    target
        .received()
        .iter()
        .filter(|r| r.key() == Some(key))
        .map(|r| r.body["payload"]["n"].as_i64().unwrap())
        .collect()
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_backoff_parks_the_key_and_other_keys_flow() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    // Retry-After: 1 s, longer than park_after_ms: P's entries park.
    target.reject_key_for("P", 503, Some(1));
    let text = config_text(dir.path(), "127.0.0.1:0", &target.url(), "");
    let svc = Spawned::start(walden::config::from_toml(&text).unwrap()).unwrap();
    let base = format!("http://{}", svc.addr);
    let url = format!("{base}/v1/namespaces/ns/log");
    for n in 0..3 {
        assert_eq!(
            post(&url, json!({"payload": {"n": n}, "key": "P"})).await,
            200
        );
    }
    for n in 0..10 {
        assert_eq!(
            post(&url, json!({"payload": {"n": n}, "key": format!("Q{n}")})).await,
            200
        );
    }
    until("the other keys", || {
        target
            .received()
            .iter()
            .filter(|r| r.key().unwrap().starts_with('Q'))
            .count()
            == 10
    })
    .await;
    let deadline = Instant::now() + WAIT;
    loop {
        let st = stats(&base).await;
        let parked: u64 = st["per_shard"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["parked"].as_u64().unwrap())
            .sum();
        if parked >= 3 {
            // Parked entries are acked: they do not hold the watermark.
            assert_eq!(st["pending"], 0, "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "P never parked: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    target.reject_key("P", 0);
    until("P's entries", || values_of(&target, "P").len() >= 3).await;
    assert_eq!(
        values_of(&target, "P"),
        vec![0, 1, 2],
        "in order, after the parked head"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purging_the_dead_letter_that_holds_a_key_releases_it() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    target.reject_key("H", 400);
    let extra = "[namespaces.ns.dlq]\non_dead_letter = \"hold_key\"";
    let text = config_text(dir.path(), "127.0.0.1:0", &target.url(), extra);
    let svc = Spawned::start(walden::config::from_toml(&text).unwrap()).unwrap();
    let base = format!("http://{}", svc.addr);
    let url = format!("{base}/v1/namespaces/ns/log");
    assert_eq!(
        post(&url, json!({"payload": {"n": 0}, "key": "H", "id": "h0"})).await,
        200
    );
    let deadline = Instant::now() + WAIT;
    while stats(&base).await["dead_lettered"] != 1 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The key is held: H's next entries wait even though the target is fixed.
    target.reject_key("H", 0);
    for n in 1..3 {
        assert_eq!(
            post(&url, json!({"payload": {"n": n}, "key": "H"})).await,
            200
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        values_of(&target, "H").is_empty(),
        "held behind the dead letter"
    );
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/namespaces/ns/dlq/purge"))
        .json(&json!({"ids": ["h0"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    until("H's waiting entries", || values_of(&target, "H").len() == 2).await;
    assert_eq!(values_of(&target, "H"), vec![1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_key_stays_held_across_a_sigkill_and_redrive_delivers_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    target.reject_key("A", 400);
    let extra = "[namespaces.ns.dlq]\non_dead_letter = \"hold_key\"";
    let config = dir.path().join("walden.toml");
    let write_config = |port: u16| {
        let text = config_text(
            &dir.path().join("data"),
            &format!("127.0.0.1:{port}"),
            &target.url(),
            extra,
        );
        std::fs::write(&config, text).unwrap();
    };
    let port = free_port();
    write_config(port);
    let mut child = start_walden(&config);
    wait_healthy(port).await;
    let base = format!("http://127.0.0.1:{port}");
    let url = format!("{base}/v1/namespaces/ns/log");
    assert_eq!(
        post(&url, json!({"payload": {"n": 0}, "key": "A", "id": "a0"})).await,
        200
    );
    let deadline = Instant::now() + WAIT;
    while stats(&base).await["dead_lettered"] != 1 {
        assert!(Instant::now() < deadline, "a0 was never dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    target.reject_key("A", 0);
    for n in 1..3 {
        assert_eq!(
            post(&url, json!({"payload": {"n": n}, "key": "A"})).await,
            200
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().unwrap(); // SIGKILL while A is held with entries behind it
    child.wait().unwrap();
    assert!(values_of(&target, "A").is_empty());

    let port = free_port();
    write_config(port);
    let mut child = start_walden(&config);
    wait_healthy(port).await;
    let base = format!("http://127.0.0.1:{port}");
    let url = format!("{base}/v1/namespaces/ns/log");
    assert_eq!(
        post(&url, json!({"payload": {"n": 3}, "key": "A"})).await,
        200
    );
    assert_eq!(
        post(&url, json!({"payload": {"n": 0}, "key": "B"})).await,
        200
    );
    until("B, which is not held", || {
        !values_of(&target, "B").is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        values_of(&target, "A").is_empty(),
        "A is still held after the restart"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(["dlq", "redrive", "ns", "--all", "--url", &base])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    until("A's entries", || values_of(&target, "A").len() >= 4).await;
    assert_eq!(
        values_of(&target, "A"),
        vec![0, 1, 2, 3],
        "the dead letter first, then the rest, in order"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_key_survives_a_sigkill_with_its_entries_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    target.reject_key_for("P", 503, Some(2));
    let config = dir.path().join("walden.toml");
    let write_config = |port: u16| {
        let text = config_text(
            &dir.path().join("data"),
            &format!("127.0.0.1:{port}"),
            &target.url(),
            "",
        );
        std::fs::write(&config, text).unwrap();
    };
    let port = free_port();
    write_config(port);
    let mut child = start_walden(&config);
    wait_healthy(port).await;
    let base = format!("http://127.0.0.1:{port}");
    let url = format!("{base}/v1/namespaces/ns/log");
    for n in 0..3 {
        assert_eq!(
            post(&url, json!({"payload": {"n": n}, "key": "P"})).await,
            200
        );
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let st = stats(&base).await;
        let parked: u64 = st["per_shard"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["parked"].as_u64().unwrap())
            .sum();
        if parked >= 3 && st["pending"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "P never parked: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap(); // SIGKILL while P is parked with entries behind it
    child.wait().unwrap();
    target.reject_key("P", 0);

    let port = free_port();
    write_config(port);
    let mut child = start_walden(&config);
    wait_healthy(port).await;
    let url = format!("http://127.0.0.1:{port}/v1/namespaces/ns/log");
    // A later entry for P waits behind the parked ones, even after the crash.
    assert_eq!(
        post(&url, json!({"payload": {"n": 3}, "key": "P"})).await,
        200
    );
    until("P's entries", || values_of(&target, "P").len() >= 4).await;
    assert_eq!(values_of(&target, "P"), vec![0, 1, 2, 3]);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_into_a_parked_key_is_retried_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    target.reject_key("K", 400);
    let text = config_text(dir.path(), "127.0.0.1:0", &target.url(), "");
    let svc = Spawned::start(walden::config::from_toml(&text).unwrap()).unwrap();
    let base = format!("http://{}", svc.addr);
    let url = format!("{base}/v1/namespaces/ns/log");
    assert_eq!(
        post(&url, json!({"payload": {"n": 0}, "key": "K", "id": "k0"})).await,
        200
    );
    let deadline = Instant::now() + WAIT;
    while stats(&base).await["dead_lettered"] != 1 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Now K parks (a long Retry-After), and its dead letter is redriven
    // into the parked key.
    target.reject_key_for("K", 503, Some(1));
    assert_eq!(
        post(&url, json!({"payload": {"n": 1}, "key": "K", "id": "k1"})).await,
        200
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let st = stats(&base).await;
        if st["per_shard"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["parked"].as_u64().unwrap() > 0)
        {
            break;
        }
        assert!(Instant::now() < deadline, "k1 never parked: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/namespaces/ns/dlq/redrive"))
        .json(&json!({"all": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    target.reject_key("K", 0);
    until("both of K's entries", || values_of(&target, "K").len() >= 2).await;
    let mut got = values_of(&target, "K");
    got.sort();
    got.dedup();
    assert_eq!(got, vec![0, 1]);
    let st = stats(&base).await;
    let restarts: u64 = st["per_shard"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["restarts"].as_u64().unwrap())
        .sum();
    assert_eq!(restarts, 0, "no actor panicked: {st}");
    let deadline = Instant::now() + WAIT;
    while stats(&base).await["dead_lettered"] != 0 {
        assert!(
            Instant::now() < deadline,
            "the redriven letter left the DLQ"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A long backlog behind one parked key comes back a page at a time (1,000
/// entries), in order, through restarts of the head's wait, and none is
/// lost or delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_parked_backlog_comes_back_in_pages_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    target.reject_key_for("P", 503, Some(1));
    let text = config_text(dir.path(), "127.0.0.1:0", &target.url(), "");
    let svc = Spawned::start(walden::config::from_toml(&text).unwrap()).unwrap();
    let base = format!("http://{}", svc.addr);
    for chunk in 0..5 {
        let entries: Vec<Value> = (chunk * 500..(chunk + 1) * 500)
            .map(|n| json!({"payload": {"n": n}, "key": "P"}))
            .collect();
        common::write_batch(&format!("{base}/v1/namespaces/ns/log/batch"), &entries).await;
    }
    until("the backlog to park", || {
        std::thread::sleep(Duration::from_millis(100));
        target.received().is_empty()
    })
    .await;
    let deadline = Instant::now() + WAIT;
    loop {
        let st = stats(&base).await;
        if st["pending"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "never parked: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    target.reject_key("P", 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while values_of(&target, "P").len() < 2500 {
        assert!(
            Instant::now() < deadline,
            "{} of 2500 came back",
            values_of(&target, "P").len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(values_of(&target, "P"), (0..2500).collect::<Vec<i64>>());
}
