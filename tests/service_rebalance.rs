//! The supervisor rebalances: two busy shards start on one arbiter (of two);
//! the rebalancer moves one of them to the other arbiter, and across the
//! move no acknowledged entry is lost and no key's entries are applied out
//! of order.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use common::{eventually, get_json, show_logs, write_batch};
use serde_json::{Value, json};
use walden::service::Spawned;

const KEYS: usize = 40;

/// Namespace `ns`, 4 shards on 2 arbiters (shards 0 and 2 on arbiter 0), to
/// the file at `out`; the rebalancer samples every 200 ms.
fn config(data: &Path, out: &Path) -> walden::config::Config {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{}"
arbiters = 2
[server.rebalance]
every_ms = 200
sustain = 3
hot = 0.4
gap = 0.3
cooldown_ms = 600000
[namespaces.ns]
shards = 4
[namespaces.ns.backend]
type = "embedded"
[namespaces.ns.target]
type = "file"
path = "{}"
"#,
        data.display(),
        out.display()
    );
    let c = walden::config::from_toml(&text).unwrap();
    walden::config::validate(&c).expect("the test config is valid");
    c
}

/// The file target's lines, in the order they were applied.
fn applied(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[actix_rt::test]
async fn a_busy_arbiter_hands_a_shard_to_an_idle_one_losing_and_reordering_nothing() {
    show_logs();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let svc = Spawned::start(config(dir.path(), &out)).unwrap();
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);
    let stats = get_json(&base).await;
    let arbiters: Vec<u64> = stats["per_shard"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["arbiter"].as_u64().unwrap())
        .collect();
    assert_eq!(arbiters, [0, 1, 0, 1], "shards start on shard % arbiters");

    // Every batch applied on shards 0 and 2 blocks their arbiter for 25 ms.
    walden::failpoints::arm_sleep_on("applier.busy", &["ns/0", "ns/2"], 25);
    let url = format!("{base}/log/batch");
    let mut written = HashSet::new();
    let mut round: usize = 0;
    let mut moved_at_round: Option<usize> = None;
    // Write until a move shows, and as long again after it.
    while moved_at_round.is_none_or(|r| round < (2 * r).max(r + 50)) {
        assert!(round < 2_000, "no shard moved: {}", get_json(&base).await);
        let entries: Vec<Value> = (0..KEYS)
            .map(|k| {
                let id = format!("r{round}-k{k}");
                written.insert(id.clone());
                json!({"id": id, "key": format!("key-{k}"), "payload": {"round": round}})
            })
            .collect();
        write_batch(&url, &entries).await;
        round += 1;
        if moved_at_round.is_none() && round.is_multiple_of(5) {
            let stats = get_json(&base).await;
            if !stats["rebalance"]["moves"].as_array().unwrap().is_empty() {
                moved_at_round = Some(round);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    walden::failpoints::disarm_sleep_on("applier.busy");

    let stats = get_json(&base).await;
    let moves = stats["rebalance"]["moves"].as_array().unwrap().clone();
    let first = &moves[0];
    assert_eq!(
        (first["from"].as_u64(), first["to"].as_u64()),
        (Some(0), Some(1)),
        "{first}"
    );
    let moved = first["shard"].as_u64().unwrap();
    assert!(moved == 0 || moved == 2, "a busy shard moved: {first}");
    let per_shard = stats["per_shard"].as_array().unwrap();
    assert_eq!(per_shard[moved as usize]["arbiter"], 1, "{stats}");
    assert!(
        per_shard.iter().all(|s| s["moves"].as_u64() <= Some(1)),
        "no shard moved twice: {stats}"
    );

    // Nothing acknowledged is lost...
    eventually("every write applied", Duration::from_secs(60), || async {
        let ids: HashSet<String> = applied(&out)
            .iter()
            .map(|l| l["id"].as_str().unwrap().to_string())
            .collect();
        match written.difference(&ids).count() {
            0 => Ok(()),
            n => Err(format!("{n} of {} missing", written.len())),
        }
    })
    .await;
    // ...and no key's entry is applied after a later one of the same key.
    let mut last: HashMap<String, u64> = HashMap::new();
    for line in applied(&out) {
        let (key, seq) = (
            line["key"].as_str().unwrap(),
            line["sequence"].as_u64().unwrap(),
        );
        let before = last.insert(key.to_string(), seq).unwrap_or(0);
        assert!(
            seq >= before,
            "{key}: sequence {seq} applied after {before}"
        );
    }
    // The mailbox counts come back to nought: what the retired applier's
    // mailbox held was counted out when it was dropped.
    eventually("empty mailboxes", Duration::from_secs(10), || async {
        let stats = get_json(&base).await;
        let held: Vec<i64> = stats["per_shard"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["mailbox"].as_i64().unwrap())
            .collect();
        match held.iter().all(|&n| n == 0) {
            true => Ok(()),
            false => Err(format!("mailboxes {held:?}")),
        }
    })
    .await;
    let lines = applied(&out).len();
    println!(
        "{} writes, {lines} applied lines ({} delivered again), moves: {moves:?}",
        written.len(),
        lines - written.len()
    );
    drop(svc);
}
