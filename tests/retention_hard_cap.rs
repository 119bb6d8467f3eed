//! The hard retention cap (`retention_hard_max_bytes`): by default a full log
//! refuses writes (503 `"false"`, naming the cap) rather than delete entries
//! not yet applied; with `retention_hard_max_policy = "drop_oldest"` it
//! deletes them, and a shard whose next entry is gone skips to the earliest
//! one left, counting what was lost. Either way the shard never stops.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::service_config;
use common::target::HttpTarget;
use serde_json::{Value, json};
use walden::backends::embedded::{EmbeddedLog, LogConfig, LogError, Retention};
use walden::entry::{Durable, ShardRef};
use walden::service::Spawned;

const SEGMENT: u64 = 64 << 10;
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn the_log_refuses_writes_at_the_cap_rather_than_delete_what_is_not_committed() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 4096,
        retention: Retention {
            hard_max_bytes: Some(4 * 4096),
            ..Retention::default()
        },
        ..LogConfig::default()
    };
    let log = EmbeddedLog::open(dir.path(), config).unwrap();
    let shard = ShardRef::new("ns", 0);
    let payload = vec![b'x'; 200];
    let mut refused = None;
    for i in 0..1000 {
        match log
            .append(&shard, common::entry(i.to_string(), &payload))
            .await
        {
            Ok(_) => {}
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (written, err) = refused.expect("the cap refuses writes");
    assert!(matches!(err, LogError::Full { .. }), "{err}");
    assert_eq!(err.durable(), Durable::False);
    assert!(
        err.to_string().contains("retention_hard_max_bytes"),
        "{err}"
    );
    assert!(log.size_bytes() <= 4 * 4096 + 4096, "{}", log.size_bytes());
    assert_eq!(
        log.earliest_offset(&shard),
        0,
        "nothing unapplied was deleted"
    );
    assert_eq!(log.stats().retention_forced.get(), 0);
    // Once a consumer group has committed, the space comes back.
    let offsets = std::collections::BTreeMap::from([(shard.clone(), written as u64)]);
    log.commit("g", &offsets).unwrap();
    log.append(&shard, common::entry("again", &payload))
        .await
        .expect("writes are taken again once committed entries can go");
    assert!(log.earliest_offset(&shard) > 0);
}

/// `ns` with small segments and a hard cap of four, `policy` for the cap.
fn capped(dir: &std::path::Path, target: &str, policy: Option<&str>) -> walden::config::Config {
    let mut config = service_config(dir, target, 1, "");
    let text = match policy {
        Some(p) => format!("retention_hard_max_policy = \"{p}\""),
        None => String::new(),
    };
    let ns = config.namespaces.get_mut("ns").unwrap();
    let mut backend: walden::config::EmbeddedConfig = toml_table(&text);
    backend.segment_bytes = SEGMENT;
    backend.retention_hard_max_bytes = 4 * SEGMENT;
    ns.backend = walden::config::BackendConfig::Embedded(backend);
    walden::config::validate(&config).unwrap();
    config
}

fn toml_table<T: serde::de::DeserializeOwned>(text: &str) -> T {
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .unwrap()
        .try_deserialize()
        .unwrap()
}

async fn write(client: &reqwest::Client, base: &str, id: &str) -> (u16, Value) {
    let r = client
        .post(format!("{base}/v1/namespaces/ns/log"))
        .json(&json!({"payload": "x".repeat(1000), "id": id, "key": id}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_answers_503_false_and_takes_writes_again_once_applied() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    target.fail_with(503);
    let svc = Spawned::start(capped(dir.path(), &target.url(), None)).unwrap();
    let base = format!("http://{}", svc.addr);
    let client = reqwest::Client::new();
    let mut acked = HashSet::new();
    let mut full = None;
    for i in 0..2000 {
        let id = format!("e{i}");
        match write(&client, &base, &id).await {
            (200, _) => {
                acked.insert(id);
            }
            (status, body) => {
                full = Some((status, body));
                break;
            }
        }
    }
    let (status, body) = full.expect("a full log refuses writes");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["durable"], "false");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("retention_hard_max_bytes"),
        "{body}"
    );
    // The target comes back: everything acknowledged is applied, and the
    // space it held is given back to new writes.
    target.fail_with(0);
    let deadline = Instant::now() + WAIT;
    loop {
        if write(&client, &base, "after").await.0 == 200 {
            acked.insert("after".into());
            break;
        }
        assert!(Instant::now() < deadline, "writes are never taken again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + WAIT;
    while !acked.is_subset(&target.ids()) {
        assert!(Instant::now() < deadline, "an acknowledged entry was lost");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_drop_oldest_a_shard_skips_what_was_dropped_counts_it_and_flows() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    target.fail_with(503);
    let config = capped(dir.path(), &target.url(), Some("drop_oldest"));
    let client = reqwest::Client::new();
    let mut acked = HashSet::new();
    {
        let svc = Spawned::start(config.clone()).unwrap();
        let base = format!("http://{}", svc.addr);
        // Twice the cap: the oldest segments go although nothing is applied.
        for i in 0..600 {
            let id = format!("e{i}");
            let (status, body) = write(&client, &base, &id).await;
            assert_eq!(status, 200, "{body}");
            acked.insert(id);
        }
    }
    target.fail_with(0);
    let svc = Spawned::start(config).unwrap();
    let base = format!("http://{}", svc.addr);
    assert_eq!(write(&client, &base, "after").await.0, 200);
    acked.insert("after".into());
    // The shard does not stop: it skips to what is left, and says how much
    // it lost. Every acknowledged entry is delivered or counted lost.
    let deadline = Instant::now() + WAIT;
    loop {
        let got: HashSet<String> = target.ids();
        let stats: Value = reqwest::get(format!("{base}/v1/namespaces/ns"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let lost = stats["lost_to_retention"].as_u64().unwrap_or(0);
        let delivered = acked.intersection(&got).count() as u64;
        if got.contains("after") && delivered + lost == acked.len() as u64 {
            assert!(lost > 0, "{stats}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "delivered {delivered} and lost {lost} of {} acknowledged: {stats}",
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
