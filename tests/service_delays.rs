//! Durable delays: pending delayed entries survive a SIGKILL and fire at
//! their due time; a cancelled one never fires; overdue entries after a
//! restart fire in due order under `delay.catch_up_per_s`.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::target::HttpTarget;
use common::{free_port, start_walden, wait_healthy};
use serde_json::{Value, json};
use walden::service::Spawned;

const WAIT: Duration = Duration::from_secs(30);

fn config_text(data: &std::path::Path, listen: &str, target: &str, delay: &str) -> String {
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
[namespaces.ns.delay]
{delay}
"#,
        data.display()
    )
}

/// POST `body`, which must be answered 200; the JSON answer.
async fn post(url: &str, body: Value) -> Value {
    let (status, answer) = common::post(url, body).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

async fn stats(base: &str) -> Value {
    reqwest::get(format!("{base}/v1/namespaces/ns"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn until_stats(base: &str, what: &str, f: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let st = stats(base).await;
        if f(&st) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {st}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_delays_survive_a_sigkill_and_fire_on_time_once() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let config = dir.path().join("walden.toml");
    let write = |port: u16| {
        let text = config_text(
            &dir.path().join("data"),
            &format!("127.0.0.1:{port}"),
            &target.url(),
            "",
        );
        std::fs::write(&config, text).unwrap();
    };
    let port = free_port();
    write(port);
    let mut child = start_walden(&config);
    wait_healthy(port).await;
    let base = format!("http://127.0.0.1:{port}");
    let mut due: HashMap<String, u64> = HashMap::new();
    for i in 0..20 {
        let id = format!("d{i}");
        post(
            &format!("{base}/v1/namespaces/ns/log"),
            json!({"payload": i, "id": id, "lifecycle": {"delay_ms": 2500}}),
        )
        .await;
        due.insert(id, 0);
    }
    // Stored and acked: nothing is pending in the log, all 20 are delayed.
    until_stats(&base, "20 stored delays", |st| {
        st["delayed"] == 20 && st["pending"] == 0
    })
    .await;
    let listed: Value = reqwest::get(format!("{base}/v1/namespaces/ns/delayed?limit=5"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries = listed["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 5);
    assert!(
        entries
            .windows(2)
            .all(|w| w[0]["due_ms"].as_u64() <= w[1]["due_ms"].as_u64()),
        "soonest first"
    );
    for e in entries {
        due.insert(
            e["id"].as_str().unwrap().into(),
            e["due_ms"].as_u64().unwrap(),
        );
    }
    child.kill().unwrap(); // SIGKILL with every delay pending
    child.wait().unwrap();

    let port = free_port();
    write(port);
    let mut child = start_walden(&config);
    wait_healthy(port).await;
    let got = target.wait_for(20, WAIT);
    assert_eq!(got.len(), 20, "every delayed entry fires after the restart");
    for r in &got {
        let at = r.body["due_ms"].as_u64().unwrap();
        let ts = r.body["timestamp_ms"].as_u64().unwrap();
        assert!(
            at + 50 >= ts + 2500, // due is set at ingest, just before the log stamps ts
            "due {at} is the write time {ts} plus the delay"
        );
        if let Some(&listed_due) = due.get(r.id()).filter(|d| **d > 0) {
            assert_eq!(at, listed_due, "fires at the due time it was listed with");
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(target.received().len(), 20, "none fires twice");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_delay_never_fires_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let text = config_text(dir.path(), "127.0.0.1:0", &target.url(), "");
    let cfg = walden::config::from_toml(&text).unwrap();
    let started = Instant::now();
    {
        let svc = Spawned::start(cfg.clone()).unwrap();
        let base = format!("http://{}", svc.addr);
        for id in ["c0", "c1", "c2"] {
            post(
                &format!("{base}/v1/namespaces/ns/log"),
                json!({"payload": id, "id": id, "lifecycle": {"delay_ms": 1500}}),
            )
            .await;
        }
        until_stats(&base, "3 stored delays", |st| st["delayed"] == 3).await;
        let client = reqwest::Client::new();
        let r = client
            .delete(format!("{base}/v1/namespaces/ns/delayed/c1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = client
            .delete(format!("{base}/v1/namespaces/ns/delayed/c1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["durable"], "false");
        until_stats(&base, "2 stored delays", |st| st["delayed"] == 2).await;
        let listed: Value = reqwest::get(format!("{base}/v1/namespaces/ns/delayed"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ids: Vec<&str> = listed["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap())
            .collect();
        assert!(
            ids.contains(&"c0") && ids.contains(&"c2") && !ids.contains(&"c1"),
            "{ids:?}"
        );
        // Stop before they are due; the cancel must hold across the restart.
    }
    let svc = Spawned::start(cfg).unwrap();
    let got = target.wait_for(2, WAIT);
    assert!(started.elapsed() >= Duration::from_millis(1500));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let ids: Vec<String> = target.ids();
    assert_eq!(got.len(), 2);
    assert!(
        !ids.contains(&"c1".to_string()),
        "the cancelled entry never fired: {ids:?}"
    );
    drop(svc);
}

/// A cancel that comes after the fire is refused (409), and the entry is
/// still delivered: the answer never claims a cancel that did not happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_after_the_fire_is_refused_and_the_entry_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    target.fail_with(503);
    let retry = "[namespaces.ns.retry]\nmax_attempts = 1000\nmax_backoff_ms = 200";
    let text = config_text(dir.path(), "127.0.0.1:0", &target.url(), retry);
    let svc = Spawned::start(walden::config::from_toml(&text).unwrap()).unwrap();
    let base = format!("http://{}", svc.addr);
    post(
        &format!("{base}/v1/namespaces/ns/log"),
        json!({"payload": "x", "id": "late", "lifecycle": {"delay_ms": 300}}),
    )
    .await;
    until_stats(&base, "the entry fired and is being retried", |st| {
        st["delayed"] == 0 && st["failed_deliveries"].as_u64().unwrap_or(0) > 0
    })
    .await;
    let r = reqwest::Client::new()
        .delete(format!("{base}/v1/namespaces/ns/delayed/late"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("already came due"),
        "{body}"
    );
    target.fail_with(0);
    let got = target.wait_for(1, WAIT);
    assert_eq!(got[0].id(), "late");
    drop(svc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overdue_entries_catch_up_in_due_order_at_the_configured_rate() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let text = config_text(
        dir.path(),
        "127.0.0.1:0",
        &target.url(),
        "catch_up_per_s = 10",
    );
    let cfg = walden::config::from_toml(&text).unwrap();
    // Long enough that a slow machine writes all 30 before any comes due.
    let delay = Duration::from_millis(4000);
    let last_due = {
        let svc = Spawned::start(cfg.clone()).unwrap();
        let base = format!("http://{}", svc.addr);
        for i in 0..30 {
            post(
                &format!("{base}/v1/namespaces/ns/log"),
                json!({"payload": i, "key": "one-key", "lifecycle": {"delay_ms": delay.as_millis() as u64}}),
            )
            .await;
        }
        let last_due = Instant::now() + delay;
        until_stats(&base, "30 stored delays", |st| st["delayed"] == 30).await;
        last_due
    };
    // Down while they came due: by the restart they are over a second late.
    tokio::time::sleep_until((last_due + Duration::from_millis(1500)).into()).await;
    let restart = Instant::now();
    let svc = Spawned::start(cfg).unwrap();
    let got = target.wait_for(30, WAIT);
    let took = restart.elapsed();
    assert_eq!(got.len(), 30, "none lost");
    // 30 at 10/s with a burst of 10 takes about 2 s, not an instant.
    assert!(
        took >= Duration::from_millis(1500),
        "caught up in {took:?}: faster than the rate allows"
    );
    let values: Vec<i64> = got
        .iter()
        .map(|r| r.body["payload"].as_i64().unwrap())
        .collect();
    assert_eq!(values, (0..30).collect::<Vec<_>>(), "in due order");
    let st = stats(&format!("http://{}", svc.addr)).await;
    let caught: u64 = st["per_shard"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["caught_up"].as_u64().unwrap())
        .sum();
    assert!(caught >= 20, "overdue entries are counted: {st}");
    // Every fired entry is in the lateness histogram.
    let metrics = reqwest::get(format!("http://{}/metrics", svc.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("walden_delay_fire_lateness_ms_count{namespace=\"ns\"} 30"),
        "{metrics}"
    );
}
