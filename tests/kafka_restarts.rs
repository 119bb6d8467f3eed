//! A consumer process killed (SIGKILL) five times within 8 s: with static
//! group membership (`group.instance.id`, kept in its data_dir) each restart
//! takes its partitions back at once instead of waiting for the dead
//! member's session to time out, and every acknowledged entry arrives within
//! 30 s of the last start (on both test brokers). Two processes sharing one
//! id fence each other: the fenced one stops with a clear error (noida-db
//! fences; tansu 0.x does not, and lets both run).

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::broker::{Broker, Tansu};
use common::target::HttpTarget;
use common::{Walden, free_port, unique, wait_healthy};
use serde_json::{Value, json};
use walden::service::Spawned;

fn namespace(brokers: &str, topic: &str, target: &str) -> String {
    format!(
        r#"
[namespaces.events]
shards = 4
[namespaces.events.backend]
type = "kafka"
brokers = "{brokers}"
topic = "{topic}"
group = "{topic}-group"
rebalance_drain_ms = 2000
[namespaces.events.backend.librdkafka]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "1000"
[namespaces.events.target]
type = "http"
url = "{target}"
"#
    )
}

/// A consumer process's config file, in `dir` (its data_dir inside).
fn consumer(dir: &std::path::Path, port: u16, ns: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join(format!("walden-{port}.toml"));
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nrole = \"consumer\"\n{extra}\n{ns}",
        dir.join("data").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A consumer process, its errors kept for the test to read.
fn start(config: &std::path::Path) -> Walden {
    Walden(
        std::process::Command::new(env!("CARGO_BIN_EXE_walden"))
            .args(["serve", "--config"])
            .arg(config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// Keep writing batches until `stop`; the ids acknowledged.
fn writer(base: String, stop: Arc<Mutex<bool>>) -> tokio::task::JoinHandle<HashSet<String>> {
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut acked = HashSet::new();
        let mut i = 0;
        while !*stop.lock().unwrap() {
            let entries: Vec<Value> = (i..i + 20)
                .map(
                    |i| json!({"payload": i, "key": format!("k{}", i % 40), "id": format!("e{i}")}),
                )
                .collect();
            i += 20;
            let r: Value = client
                .post(format!("{base}/v1/namespaces/events/log/batch"))
                .json(&json!({ "entries": entries }))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            for r in r["results"].as_array().unwrap() {
                if r["durable"] == "true" {
                    acked.insert(r["id"].as_str().unwrap().to_string());
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        acked
    })
}

/// Five SIGKILLs of one consumer process within 8 s, then a last start: how
/// long until every acknowledged entry arrived, or what is still missing
/// after `limit`.
async fn five_quick_restarts(brokers: &str, limit: Duration) -> Result<Duration, String> {
    let target = HttpTarget::start();
    let ns = namespace(brokers, &unique("restarts"), &target.url());
    let pdir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nrole = \"producer\"\n{ns}",
        pdir.path().display()
    );
    let producer = Spawned::start(walden::config::from_toml(&text).unwrap()).unwrap();
    let stop = Arc::new(Mutex::new(false));
    let writes = writer(format!("http://{}", producer.addr), stop.clone());
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = consumer(dir.path(), port, &ns, "");
    let first = Instant::now();
    for _ in 0..5 {
        let mut c = start(&config);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        c.kill().unwrap();
        c.wait().unwrap();
    }
    assert!(
        first.elapsed() < Duration::from_secs(9),
        "the kills took too long"
    );
    let mut last = start(&config);
    let started = Instant::now();
    wait_healthy(port).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    *stop.lock().unwrap() = true;
    let acked = writes.await.unwrap();
    let result = loop {
        let got: HashSet<String> = target.ids();
        let missing = acked.difference(&got).count();
        if missing == 0 {
            break Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            break Err(format!(
                "{missing} of {} acknowledged entries had not arrived {limit:?} after the last start",
                acked.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let _ = last.kill();
    let _ = last.wait();
    producer.stop();
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_tansu_a_restarted_consumer_takes_its_partitions_back_at_once() {
    let Some(tansu) = Tansu::start() else { return };
    let took = five_quick_restarts(&tansu.brokers(), Duration::from_secs(30))
        .await
        .unwrap();
    eprintln!("tansu: every acknowledged entry arrived {took:?} after the last start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_noida_db_a_restarted_consumer_takes_its_partitions_back_at_once() {
    let Some(noida) = Broker::start() else { return };
    let took = five_quick_restarts(&noida.brokers(), Duration::from_secs(30))
        .await
        .unwrap();
    eprintln!("noida-db: every acknowledged entry arrived {took:?} after the last start");
}

/// Two processes under one `group.instance.id`: the group fences one out,
/// and it stops with an error that says why. Returns what it said.
async fn twins_fence_each_other(brokers: &str) -> String {
    let target = HttpTarget::start();
    let ns = namespace(brokers, &unique("twins"), &target.url());
    let (adir, bdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (aport, bport) = (free_port(), free_port());
    let same = "instance_id = \"twin\"";
    let mut a = start(&consumer(adir.path(), aport, &ns, same));
    wait_healthy(aport).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut b = start(&consumer(bdir.path(), bport, &ns, same));
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut fenced, other) = loop {
        if a.try_wait().unwrap().is_some() {
            break (a, b);
        }
        if b.try_wait().unwrap().is_some() {
            break (b, a);
        }
        assert!(Instant::now() < deadline, "neither twin was fenced out");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let status = fenced.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(fenced.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let mut other = other;
    let _ = other.kill();
    let _ = other.wait();
    assert!(!status.success(), "a fenced process exits with an error");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_noida_db_two_processes_with_one_instance_id_fence_each_other() {
    let Some(noida) = Broker::start() else { return };
    let said = twins_fence_each_other(&noida.brokers()).await;
    assert!(
        said.contains("group.instance.id") && said.contains("\"twin\""),
        "{said}"
    );
    eprintln!("{said}");
}
