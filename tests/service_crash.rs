//! The real `walden` binary, killed with SIGKILL while entries are in flight,
//! then restarted: every entry answered `durable: "true"` reaches the target.
//! And SIGTERM shuts down gracefully with exit code 0.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::target::HttpTarget;
use common::{free_port, start_walden, wait_healthy};
use serde_json::json;

fn write_config(dir: &Path, port: u16, target: &str) -> std::path::PathBuf {
    let path = dir.join("walden.toml");
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
data_dir = "{}"

[namespaces.ns]
shards = 4

[namespaces.ns.backend]
type = "embedded"

[namespaces.ns.target]
type = "http"
url = "{target}"

[namespaces.ns.retry]
initial_backoff_ms = 20
max_backoff_ms = 200
"#,
        dir.join("data").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_flight_loses_no_acknowledged_entry() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let client = reqwest::Client::new();
    let acked = Arc::new(Mutex::new(HashSet::<String>::new()));

    for round in 0..3 {
        let port = free_port();
        let config = write_config(dir.path(), port, &target.url());
        let mut child = start_walden(&config);
        wait_healthy(port).await;
        let url = format!("http://127.0.0.1:{port}/v1/namespaces/ns/log");
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let (client, url, acked) = (client.clone(), url.clone(), acked.clone());
                tokio::spawn(async move {
                    for i in 0.. {
                        let id = format!("r{round}-w{w}-{i}");
                        let body =
                            json!({"payload": {"i": i}, "key": format!("k{}", i % 7), "id": id});
                        match client.post(&url).json(&body).send().await {
                            Ok(r) if r.status() == 200 => {
                                acked.lock().unwrap().insert(id);
                            }
                            // Not acknowledged: no promise was made.
                            Ok(_) => {}
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300 + 150 * round)).await;
        child.kill().unwrap(); // SIGKILL, mid-stream
        child.wait().unwrap();
        for w in writers {
            w.await.unwrap();
        }
    }

    // A last start delivers whatever was acknowledged and not yet applied.
    let port = free_port();
    let config = write_config(dir.path(), port, &target.url());
    let mut child = start_walden(&config);
    wait_healthy(port).await;
    let want = acked.lock().unwrap().clone();
    assert!(
        want.len() > 50,
        "only {} writes were acknowledged",
        want.len()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got: HashSet<String> = target.ids();
        let missing: Vec<_> = want.difference(&got).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged entries never arrived, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_gracefully_with_exit_code_zero() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let client = reqwest::Client::new();
    let port = free_port();
    let config = write_config(dir.path(), port, &target.url());
    let child = start_walden(&config);
    wait_healthy(port).await;
    let url = format!("http://127.0.0.1:{port}/v1/namespaces/ns/log");
    for i in 0..20 {
        let r = client
            .post(&url)
            .json(&json!({"payload": i}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    target.wait_for(20, Duration::from_secs(10));
    let pid = child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    let mut child = child;
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "graceful shutdown exits 0");
    // Progress was committed: a restart delivers nothing twice.
    let port = free_port();
    let config = write_config(dir.path(), port, &target.url());
    let mut child = start_walden(&config);
    wait_healthy(port).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(target.received().len(), 20);
    child.kill().unwrap();
    child.wait().unwrap();
}
