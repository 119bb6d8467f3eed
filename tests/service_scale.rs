//! Signals for autoscaling: `GET .../scale` asks for more consumers while a
//! backlog would outlast `scale.target_lag_s`, and for one again once it
//! has cleared; `/metrics` carries the same figures. The examples under
//! `deploy/` are valid YAML of the kinds they claim.

mod common;

use std::time::Duration;

use common::target::HttpTarget;
use common::{eventually, get_json, service_config, write_batch};
use serde_json::json;
use walden::service::Spawned;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_asks_for_more_consumers_and_the_signal_falls_once_it_clears() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let config = service_config(
        dir.path(),
        &target.url(),
        4,
        "[namespaces.ns.scale]\ntarget_lag_s = 1",
    );
    backlog_then_drain(config, &target, 4).await;
}

/// The same on Kafka (noida-db): the lag is the partitions' end offsets
/// (from librdkafka's statistics) less what is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_a_backlog_asks_for_more_consumers_and_the_signal_falls_once_it_clears() {
    let Some(brokers) = common::test_server("WALDEN_TEST_KAFKA_BROKERS") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let topic = common::unique("scale");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
         [namespaces.ns]\nshards = 3\n[namespaces.ns.scale]\ntarget_lag_s = 1\n\
         [namespaces.ns.backend]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\n\
         topic = \"{topic}\"\ngroup = \"{topic}-group\"\n\
         [namespaces.ns.target]\ntype = \"http\"\nurl = \"{}\"\n",
        dir.path().display(),
        target.url()
    );
    let config = walden::config::from_toml(&text).unwrap();
    walden::config::validate(&config).unwrap();
    backlog_then_drain(config, &target, 3).await;
}

/// Write 4,000 entries over four keys to a target that takes 10 ms a
/// request (a key's requests go one at a time, in order): about ten seconds
/// of backlog, against the one second the namespace allows. `/scale` asks
/// for 2 to `partitions` consumers, then for 1 once the backlog is gone.
async fn backlog_then_drain(config: walden::config::Config, target: &HttpTarget, partitions: u64) {
    target.answer_after(Duration::from_millis(10));
    let svc = Spawned::start(config).unwrap();
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);
    for chunk in 0..4 {
        let entries: Vec<_> = (0..1000)
            .map(|i| json!({"key": format!("k{}", i % 4), "payload": {"i": chunk * 1000 + i}}))
            .collect();
        write_batch(&format!("{base}/log/batch"), &entries).await;
    }
    let scale_url = format!("{base}/scale");
    eventually(
        "a backlog asks for more consumers",
        Duration::from_secs(30),
        || async {
            let s = get_json(&scale_url).await;
            match s["consumers"].as_u64() {
                Some(n) if n >= 2 && s["targets"][0]["apply_per_s"].as_f64() > Some(0.0) => Ok(()),
                _ => Err(s.to_string()),
            }
        },
    )
    .await;
    let s = get_json(&scale_url).await;
    assert_eq!(s["partitions"], partitions, "{s}");
    assert!(
        s["consumers"].as_u64().unwrap() <= partitions,
        "never more than one per partition: {s}"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", svc.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "walden_scale_consumers{namespace=\"ns\",target=\"default\"}",
        "walden_oldest_pending_age_seconds{namespace=\"ns\",target=\"default\"}",
        "walden_apply_per_second{namespace=\"ns\",target=\"default\"}",
        "walden_shedding_utilization{namespace=\"ns\"}",
    ] {
        assert!(metrics.contains(name), "{name} missing");
    }
    eventually(
        "the signal falls once the backlog clears",
        Duration::from_secs(120),
        || async {
            let s = get_json(&scale_url).await;
            match (
                s["consumers"].as_u64(),
                s["targets"][0]["lag_entries"].as_u64(),
            ) {
                (Some(1), Some(0)) => Ok(()),
                _ => Err(s.to_string()),
            }
        },
    )
    .await;
    svc.stop();
}

/// Each file under `deploy/` parses as YAML, and each document names its
/// `apiVersion`, `kind` and `metadata.name`; the KEDA object scales on
/// Walden's signal.
#[test]
fn the_deploy_examples_are_valid_yaml() {
    use yaml_rust2::YamlLoader;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let docs =
            YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!docs.is_empty(), "{}", path.display());
        for doc in docs {
            let kind = doc["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no kind", path.display()));
            assert!(doc["apiVersion"].as_str().is_some(), "{}", path.display());
            assert!(
                doc["metadata"]["name"].as_str().is_some(),
                "{}",
                path.display()
            );
            if kind == "ScaledObject" {
                let trigger = &doc["spec"]["triggers"][0];
                assert_eq!(trigger["type"].as_str(), Some("prometheus"));
                let query = trigger["metadata"]["query"].as_str().unwrap();
                assert!(query.contains("walden_"), "{query}");
            }
            kinds.push(kind.to_string());
        }
    }
    for want in ["ScaledObject", "HorizontalPodAutoscaler"] {
        assert!(
            kinds.iter().any(|k| k == want),
            "no {want} in deploy/: {kinds:?}"
        );
    }
}
