//! The bulk-delete persona (`config/bulk-delete.toml`): 2,000 deletes written
//! through the batch endpoint with `delay_ms` = 1 s and the namespace's 5 s
//! jitter. Deliveries are counted at a real target per whole second of the
//! jitter window: none comes early, every one arrives, and no second gets more
//! than twice the mean.

mod common;

use std::time::{Duration, Instant};

use common::target::HttpTarget;
use serde_json::json;
use walden::config::TargetConfig;
use walden::service::Spawned;

const N: usize = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_deletes_are_spread_over_the_jitter_window() {
    let persona = concat!(env!("CARGO_MANIFEST_DIR"), "/config/bulk-delete.toml");
    let mut config =
        walden::config::load(std::path::Path::new(persona)).expect("the persona validates");
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    config.server.listen = "127.0.0.1:0".into();
    config.server.data_dir = dir.path().to_path_buf();
    let ns = config.namespaces.get_mut("bulk_deletes").unwrap();
    let jitter = Duration::from_millis(ns.delay.jitter_ms);
    assert_eq!(jitter, Duration::from_secs(5));
    match &mut ns.targets[0].config {
        TargetConfig::Http { url, .. } => *url = target.url(),
        other => panic!("the persona delivers over HTTP, not {}", other.kind()),
    }
    let svc = Spawned::start(config).unwrap();
    let url = format!("http://{}/v1/namespaces/bulk_deletes/log/batch", svc.addr);
    let client = reqwest::Client::new();
    let delay = Duration::from_secs(1);
    let start = Instant::now();
    for chunk in 0..N / 1000 {
        let entries: Vec<_> = (chunk * 1000..(chunk + 1) * 1000)
            .map(|i| {
                let key = format!("user-{i}");
                json!({"payload": {"op": "delete", "key": key}, "key": key, "lifecycle": {"delay_ms": 1000}})
            })
            .collect();
        let resp = client
            .post(&url)
            .json(&json!({ "entries": entries }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let written = start.elapsed();
    let got = target.wait_for(N, delay + jitter + Duration::from_secs(15));
    assert_eq!(got.len(), N, "every delete arrives");
    let mut buckets = vec![0usize; jitter.as_secs() as usize + 1];
    for r in &got {
        let since = r.at.duration_since(start);
        assert!(
            since >= delay,
            "a delete came {since:?} after the first write, before its delay"
        );
        let second = (since - delay).as_secs() as usize;
        let last = buckets.len() - 1;
        buckets[second.min(last)] += 1;
    }
    let mean = N as f64 / jitter.as_secs() as f64;
    eprintln!(
        "deliveries per second of the window: {buckets:?} (mean {mean}, writes took {written:?})"
    );
    for (s, &count) in buckets.iter().take(jitter.as_secs() as usize).enumerate() {
        assert!(
            count as f64 <= 2.0 * mean,
            "second {s}: {count} deliveries, over 2 × the mean {mean}"
        );
    }
}
