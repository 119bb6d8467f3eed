//! Adaptive concurrency towards a target: against an HTTP target that serves
//! N requests at once and queues the rest, the target's limit climbs from 1
//! and settles near N; when the target starts to answer 429 to what it has
//! no room for, the limit backs off; nothing is lost.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::target::HttpTarget;
use common::{eventually, get_json, show_logs, write_batch};
use serde_json::{Value, json};
use walden::service::Spawned;

/// The target's capacity: requests it serves at once.
const N: usize = 8;
const ENTRIES: usize = 6_000;

async fn concurrency(base: &str) -> Value {
    get_json(base).await["targets"][0]["concurrency"].clone()
}

#[actix_rt::test]
async fn the_limit_settles_near_the_targets_capacity_and_backs_off_on_429() {
    show_logs();
    let target = HttpTarget::start();
    target.serve_at_once(N, Duration::from_millis(20));
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{}"
[namespaces.ns]
shards = 4
[namespaces.ns.backend]
type = "embedded"
[namespaces.ns.target]
type = "http"
url = "{}"
[namespaces.ns.concurrency]
initial = 1
"#,
        dir.path().display(),
        target.url()
    );
    let config = walden::config::from_toml(&text).unwrap();
    walden::config::validate(&config).unwrap();
    let svc = Spawned::start(config).unwrap();
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);
    assert_eq!(concurrency(&base).await["limit"], 1);

    // A backlog of distinct keys, so every shard has work for many slots.
    let url = format!("{base}/log/batch");
    let mut written = HashSet::new();
    for chunk in 0..ENTRIES / 100 {
        let entries: Vec<Value> = (0..100)
            .map(|i| {
                let id = format!("e{}", chunk * 100 + i);
                written.insert(id.clone());
                json!({"id": id, "key": id, "payload": i})
            })
            .collect();
        write_batch(&url, &entries).await;
    }

    // Climbing from 1 takes a round trip per step; then it hovers.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut limits = Vec::new();
    for _ in 0..30 {
        limits.push(concurrency(&base).await["limit"].as_u64().unwrap() as f64);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mean = limits.iter().sum::<f64>() / limits.len() as f64;
    println!("target capacity {N}; limit samples {limits:?}; mean {mean:.1}");
    // The band: within half and twice the target's capacity.
    let band = (N as f64 / 2.0)..=(N as f64 * 2.0);
    assert!(
        band.contains(&mean),
        "mean limit {mean} outside {band:?}: {limits:?}"
    );

    // The target sheds what is beyond N/2 in hand with a 429: the limit
    // falls to about that.
    target.shed_beyond((N / 2) as u64);
    eventually("the limit backs off", Duration::from_secs(10), || async {
        let c = concurrency(&base).await;
        match c["limit"].as_u64().unwrap() {
            l if l <= (N / 2 + 1) as u64 => Ok(()),
            l => Err(format!("limit {l}: {c}")),
        }
    })
    .await;
    let mut limits = Vec::new();
    for _ in 0..10 {
        limits.push(concurrency(&base).await["limit"].as_u64().unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("shedding beyond {}; limit samples {limits:?}", N / 2);
    assert!(limits.iter().all(|&l| l <= N as u64), "{limits:?}");

    // Nothing was lost.
    target.shed_beyond(0);
    eventually("every entry applied", Duration::from_secs(120), || async {
        let got: HashSet<String> = target.ids();
        match written.difference(&got).count() {
            0 => Ok(()),
            n => Err(format!("{n} missing; {}", concurrency(&base).await)),
        }
    })
    .await;
    drop(svc);
}

/// Bad `[concurrency]` values are config errors that name the namespace and
/// the field.
#[test]
fn bad_concurrency_config_names_the_field() {
    for (table, field) in [
        ("min = 0", "concurrency.min"),
        ("min = 10\nmax = 5", "concurrency.min"),
        ("initial = 1000", "concurrency.initial"),
    ] {
        let text = format!(
            "[server]\n[namespaces.ns]\n[namespaces.ns.backend]\ntype = \"embedded\"\n\
             [namespaces.ns.target]\ntype = \"file\"\npath = \"x\"\n\
             [namespaces.ns.concurrency]\n{table}\n"
        );
        let c = walden::config::from_toml(&text).unwrap();
        let err = walden::config::validate(&c).unwrap_err().to_string();
        assert!(err.contains(field) && err.contains("ns"), "{table}: {err}");
    }
}
