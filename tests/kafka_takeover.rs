//! Two consumer processes in one group split a Kafka namespace's partitions
//! (the second joins mid-stream); SIGKILL one in the middle of a stream, and
//! the other takes over its partitions: every acknowledged entry is
//! delivered. Runs on tansu, which evicts a killed dynamic member (noida-db
//! never does); neither test broker ever evicts a killed static member (real
//! Kafka does, after `session.timeout.ms`), so these consumers join as
//! dynamic members.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::target::HttpTarget;
use common::{free_port, start_walden, test_server, unique, wait_healthy};
use serde_json::{Value, json};
use walden::service::Spawned;

fn namespace(brokers: &str, topic: &str, target: &str) -> String {
    namespace_with(
        brokers,
        topic,
        &format!("[namespaces.events.target]\ntype = \"http\"\nurl = \"{target}\""),
    )
}

/// The namespace with `targets` as its target tables.
fn namespace_with(brokers: &str, topic: &str, targets: &str) -> String {
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
{targets}
"#
    )
}

fn consumer_config(dir: &std::path::Path, port: u16, ns: &str) -> std::path::PathBuf {
    let path = dir.join("walden.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nrole = \"consumer\"\nstatic_membership = false\n{ns}",
        dir.join("data").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

async fn applied_by(port: u16) -> u64 {
    let st: Value = reqwest::get(format!("http://127.0.0.1:{port}/v1/namespaces/events"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    st["applied"].as_u64().unwrap_or(0)
}

async fn write(client: &reqwest::Client, base: &str, from: usize, to: usize) -> HashSet<String> {
    let entries: Vec<Value> = (from..to)
        .map(|i| json!({"payload": i, "key": format!("k{}", i % 40), "id": format!("e{i}")}))
        .collect();
    let r: Value = client
        .post(format!("{base}/v1/namespaces/events/log/batch"))
        .json(&json!({ "entries": entries }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["durable"] == "true")
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

/// Wait until `target` has every id in `acked`, failing at `deadline`.
async fn arrive_by(target: &HttpTarget, acked: &HashSet<String>, deadline: Instant, what: &str) {
    loop {
        let seen: HashSet<String> = target.ids();
        let missing: Vec<&String> = acked.difference(&seen).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged entries never arrived {what}, e.g. {:?}",
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_consumer_hands_its_partitions_over_and_loses_nothing() {
    let Some(brokers) = test_server("WALDEN_TEST_TANSU_BROKERS") else {
        return;
    };
    let target = HttpTarget::start();
    let ns = namespace(&brokers, &unique("takeover"), &target.url());
    let pdir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nrole = \"producer\"\n{ns}",
        pdir.path().display()
    );
    let producer = Spawned::start(walden::config::from_toml(&text).unwrap()).unwrap();
    let base = format!("http://{}", producer.addr);

    let (adir, bdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (aport, bport) = (free_port(), free_port());
    let mut a = start_walden(&consumer_config(adir.path(), aport, &ns));
    wait_healthy(aport).await;
    let client = reqwest::Client::new();
    let mut acked = write(&client, &base, 0, 100).await;
    // The second consumer joins mid-stream: the first gives up half of its
    // partitions (drain, commit, fence) while entries flow.
    let mut b = start_walden(&consumer_config(bdir.path(), bport, &ns));
    for from in (100..200).step_by(20) {
        acked.extend(write(&client, &base, from, from + 20).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_healthy(bport).await;
    assert_eq!(acked.len(), 200);
    // Both processes apply: the group split the partitions between them.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (na, nb) = (applied_by(aport).await, applied_by(bport).await);
        if na > 0 && nb > 0 && target.received().len() >= 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no split: a applied {na}, b applied {nb}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Mid-stream: a batch goes in, and one consumer dies with it in flight.
    acked.extend(write(&client, &base, 200, 400).await);
    a.kill().unwrap();
    a.wait().unwrap();
    let killed = Instant::now();
    acked.extend(write(&client, &base, 400, 600).await);

    arrive_by(
        &target,
        &acked,
        killed + Duration::from_secs(60),
        "after the takeover",
    )
    .await;
    eprintln!("takeover complete {:?} after the kill", killed.elapsed());
    let _ = b.kill();
    let _ = b.wait();
    producer.stop();
}

/// Fan-out on Kafka: each target reads in a group of its own, and when one
/// of two consumer processes dies, the other takes its partitions over in
/// both groups. Both targets get every acknowledged entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_targets_each_get_everything_when_a_consumer_is_killed() {
    let Some(brokers) = test_server("WALDEN_TEST_TANSU_BROKERS") else {
        return;
    };
    let (ta, tb) = (HttpTarget::start(), HttpTarget::start());
    let targets = format!(
        "[namespaces.events.targets.a]\ntype = \"http\"\nurl = \"{}\"\n[namespaces.events.targets.b]\ntype = \"http\"\nurl = \"{}\"",
        ta.url(),
        tb.url()
    );
    let ns = namespace_with(&brokers, &unique("fanout"), &targets);
    let pdir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nrole = \"producer\"\n{ns}",
        pdir.path().display()
    );
    let producer = Spawned::start(walden::config::from_toml(&text).unwrap()).unwrap();
    let base = format!("http://{}", producer.addr);
    let (adir, bdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (aport, bport) = (free_port(), free_port());
    let mut a = start_walden(&consumer_config(adir.path(), aport, &ns));
    let mut b = start_walden(&consumer_config(bdir.path(), bport, &ns));
    wait_healthy(aport).await;
    wait_healthy(bport).await;
    let client = reqwest::Client::new();
    let mut acked = HashSet::new();
    for from in (0..200).step_by(20) {
        acked.extend(write(&client, &base, from, from + 20).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.kill().unwrap();
    a.wait().unwrap();
    let killed = Instant::now();
    acked.extend(write(&client, &base, 200, 400).await);
    assert_eq!(acked.len(), 400);
    for (name, t) in [("a", &ta), ("b", &tb)] {
        let at = format!("at target {name}");
        arrive_by(t, &acked, killed + Duration::from_secs(60), &at).await;
    }
    let _ = b.kill();
    let _ = b.wait();
    producer.stop();
}
