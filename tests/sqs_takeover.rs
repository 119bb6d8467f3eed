//! A `walden serve` process on SQS is SIGKILLed while it holds entries it
//! has received (its target refusing them, so they wait in retry with their
//! visibility kept alive): a second process takes every one of them over
//! once their visibility runs out, and applies them in key order. Nothing
//! acknowledged is lost.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::target::HttpTarget;
use common::{free_port, post, start_walden, test_server, unique, wait_healthy};
use serde_json::json;

fn config(
    dir: &std::path::Path,
    port: u16,
    url: &str,
    queue: &str,
    target: &str,
) -> std::path::PathBuf {
    let path = dir.join(format!("walden-{port}.toml"));
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
data_dir = "{}"
[namespaces.events]
shards = 1
[namespaces.events.retry]
initial_backoff_ms = 100
max_backoff_ms = 300
max_attempts = 1000
[namespaces.events.backend]
type = "sqs"
queues = ["{queue}"]
region = "us-east-1"
endpoint_url = "{url}"
wait_time_s = 1
poll_interval_ms = 100
visibility_timeout_s = 3
[namespaces.events.target]
type = "http"
url = "{target}"
"#,
        dir.join(format!("data-{port}")).display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_loses_nothing_it_held() {
    let Some(url) = test_server("WALDEN_TEST_SQS_URL") else {
        return;
    };
    let target = HttpTarget::start();
    target.fail_with(503);
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("takeover") + ".fifo";
    let aport = free_port();
    let mut a = start_walden(&config(dir.path(), aport, &url, &queue, &target.url()));
    wait_healthy(aport).await;

    let mut acked = HashSet::new();
    for i in 0..30 {
        let (status, body) = post(
            &format!("http://127.0.0.1:{aport}/v1/namespaces/events/log"),
            json!({"payload": i, "key": format!("k{}", i % 5), "id": format!("e{i}")}),
        )
        .await;
        assert_eq!(
            (status, body["durable"].as_str()),
            (200, Some("true")),
            "{body}"
        );
        acked.insert(format!("e{i}"));
    }
    // Let it receive and hold them past one visibility timeout (extended).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stats: serde_json::Value =
        reqwest::get(format!("http://127.0.0.1:{aport}/v1/namespaces/events"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert!(
        stats["in_retry"].as_u64().unwrap() > 0,
        "the first process holds entries in retry: {stats}"
    );
    a.kill().unwrap();
    a.wait().unwrap();
    assert!(target.received().is_empty(), "nothing was applied before");
    target.fail_with(0);

    let bport = free_port();
    let mut b = start_walden(&config(dir.path(), bport, &url, &queue, &target.url()));
    wait_healthy(bport).await;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let got = target.received();
        let applied: HashSet<String> = got.iter().map(|r| r.id().to_string()).collect();
        if applied.is_superset(&acked) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "missing after the kill: {:?}",
            acked.difference(&applied).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = target.received();
    for k in 0..5 {
        let key = format!("k{k}");
        let order: Vec<u64> = got
            .iter()
            .filter(|r| r.key() == Some(key.as_str()))
            .map(|r| r.body["payload"].as_u64().unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{key}: {order:?}");
    }
    let _ = b.kill();
    let _ = b.wait();
}
