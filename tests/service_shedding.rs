//! Load shedding at ingest: past its namespace's concurrency limit a write
//! gets 429 `"durable":"false"` with a `Retry-After`, `batch` writes are
//! refused first and `critical` last, and nothing acknowledged is lost.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{eventually, get_json};
use serde_json::{Value, json};
use walden::service::Spawned;

/// Namespace `ns` on the embedded log (one shard, so one committer holds
/// every write when it stalls), to the file at `out`, with `shedding` as its
/// `[shedding]` table.
fn config(data: &Path, out: &Path, shedding: &str) -> walden::config::Config {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{}"
# Longer than the stalls below: the writes they hold are answered "true".
ack_timeout_ms = 30000
[namespaces.ns]
shards = 1
[namespaces.ns.backend]
type = "embedded"
[namespaces.ns.target]
type = "file"
path = "{}"
[namespaces.ns.shedding]
{shedding}
"#,
        data.display(),
        out.display()
    );
    let c = walden::config::from_toml(&text).unwrap();
    walden::config::validate(&c).expect("the test config is valid");
    c
}

/// The ids the file target holds.
fn applied(out: &Path) -> HashSet<String> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["id"].as_str().map(str::to_string))
        .collect()
}

/// POST one write; its status, `Retry-After` and body.
async fn write(client: &reqwest::Client, url: &str, body: Value) -> (u16, Option<String>, Value) {
    let resp = client.post(url).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry_after, resp.json().await.unwrap())
}

async fn shedding(base: &str) -> Value {
    get_json(base).await["shedding"].clone()
}

/// The resident set of this process (the service runs in it), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A service with namespace `ns` (see [`config`]), open and warm after one
/// write.
struct Running {
    svc: Spawned,
    out: PathBuf,
    base: String,
    url: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn start(shedding: &str) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let svc = Spawned::start(config(dir.path(), &out, shedding)).unwrap();
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);
    let url = format!("{base}/log");
    let client = reqwest::Client::new();
    assert_eq!(write(&client, &url, json!({"payload": 0})).await.0, 200);
    Running {
        svc,
        out,
        base,
        url,
        client,
        _dir: dir,
    }
}

/// Wait until the file target holds every id in `accepted`.
async fn all_applied(out: &Path, accepted: &HashSet<String>) {
    eventually(
        "every accepted write applied",
        Duration::from_secs(30),
        || async {
            match accepted.difference(&applied(out)).count() {
                0 => Ok(()),
                n => Err(format!("{n} missing")),
            }
        },
    )
    .await;
}

/// With the log's committer stalled, writes stay in flight: the limit
/// (fixed at 100 requests) fills, `batch` is refused at 80, `normal` at 90,
/// `critical` at 100; each refusal is a 429 `"false"` with a `Retry-After`;
/// and every write let in is durable and applied once the stall ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_writes_are_shed_first_and_critical_ones_last() {
    let Running {
        svc,
        out,
        base,
        url,
        client,
        // Bound, not `..`: the directory lives as long as the test.
        _dir,
    } = start("algorithm = \"fixed\"\ninitial_limit = 100\nmin_limit = 1").await;

    walden::failpoints::arm_sleep("log.commit", 1, 8_000);
    // `n` single writes at `priority`, all at once, in flight until the
    // stall ends: each one's id and status.
    let spawn_write = |id: &str, priority: &str, n: usize| {
        let (client, url) = (client.clone(), url.clone());
        let (id, priority) = (id.to_string(), priority.to_string());
        tokio::spawn(async move {
            let writes = (0..n).map(|i| {
                let (client, url) = (&client, &url);
                let id = format!("{id}-{i}");
                let body = json!({"id": id, "payload": i, "priority": priority});
                async move { (id, Some(write(client, url, body).await.0 as u64)) }
            });
            futures_util::future::join_all(writes).await
        })
    };
    let in_flight = |n: u64| {
        let base = base.clone();
        async move {
            eventually(
                &format!("{n} entries in flight"),
                Duration::from_secs(5),
                || async {
                    let s = shedding(&base).await;
                    match s["in_flight"].as_u64() >= Some(n) {
                        true => Ok(()),
                        false => Err(s.to_string()),
                    }
                },
            )
            .await
        }
    };
    // 85 normal writes in flight, held by the stall.
    let mut held = vec![spawn_write("n1", "normal", 85)];
    in_flight(85).await;

    // A write at `priority` now: refused 429 "false", with when to retry.
    let refused = |id: &'static str, priority: &'static str| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let body = json!({"id": id, "payload": 0, "priority": priority});
            let (status, retry_after, body) = write(&client, &url, body).await;
            assert_eq!(status, 429, "{priority}: {body}");
            assert_eq!(body["durable"], "false", "{body}");
            assert!(retry_after.is_some_and(|s| s.parse::<u64>().unwrap() >= 1));
            assert!(body["retry_after_ms"].as_u64().unwrap() >= 1, "{body}");
            let message = body["message"].as_str().unwrap();
            assert!(message.contains("concurrency limit"), "{body}");
        }
    };
    // Past batch's 80%: a batch write is refused, normal ones let in.
    refused("late-batch", "batch").await;
    // Normal fills to 90; then normal is refused and critical let in.
    held.push(spawn_write("n2", "normal", 5));
    in_flight(90).await;
    refused("late-normal", "normal").await;
    held.push(spawn_write("c1", "critical", 10));
    in_flight(100).await;
    refused("late-critical", "critical").await;

    // The stall ends: every write let in is durable, and applied.
    let mut accepted = HashSet::new();
    for h in held {
        for (id, status) in h.await.unwrap() {
            assert_eq!(status, Some(200), "{id}");
            accepted.insert(id);
        }
    }
    assert_eq!(accepted.len(), 100);
    all_applied(&out, &accepted).await;
    let s = shedding(&base).await;
    assert_eq!(
        (&s["shed_batch"], &s["shed_normal"], &s["shed_critical"]),
        (&json!(1), &json!(1), &json!(1)),
        "{s}"
    );
    assert_eq!(s["in_flight"], 0, "{s}");
    let metrics = reqwest::get(format!("http://{}/metrics", svc.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("walden_shedding_limit{namespace=\"ns\"} 100"));
    assert!(metrics.contains("walden_shed_total{namespace=\"ns\",priority=\"batch\"} 1"));
    svc.stop();
}

/// Far more writers than the limit lets in, on the default algorithm with
/// a low floor: some writes are shed with 429 and a `Retry-After`, the
/// service stays up, every write answered 200 is applied, and the
/// process's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overload_is_shed_and_nothing_acknowledged_is_lost() {
    let Running {
        svc,
        out,
        base,
        url,
        client,
        // Bound, not `..`: the directory lives as long as the test.
        _dir,
    } = start("initial_limit = 16\nmin_limit = 8\nmax_limit = 64").await;
    let rss_before = rss_kib();
    // The committer stalls now and then, as a slow disk would: the writes
    // in flight pile up behind it and the limit is what sheds them.
    walden::failpoints::arm_sleep("log.commit", 20, 50);
    let writers: Vec<_> = (0..256)
        .map(|w| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for i in 0..10 {
                    let id = format!("w{w}-{i}");
                    let (status, retry_after, body) =
                        write(&client, &url, json!({"id": id, "payload": i})).await;
                    if status == 429 {
                        assert!(retry_after.is_some(), "{body}");
                        assert_eq!(body["durable"], "false", "{body}");
                    } else {
                        assert_eq!(status, 200, "{body}");
                    }
                    seen.push((id, status));
                }
                seen
            })
        })
        .collect();
    let mut accepted = HashSet::new();
    let mut shed = 0;
    for w in writers {
        for (id, status) in w.await.unwrap() {
            match status {
                200 => {
                    accepted.insert(id);
                }
                _ => shed += 1,
            }
        }
    }
    let rss_after = rss_kib();
    println!(
        "accepted {} shed {shed}; RSS {} MiB → {} MiB",
        accepted.len(),
        rss_before / 1024,
        rss_after / 1024
    );
    assert!(
        shed > 0,
        "256 writers against a limit of at most 64 shed none"
    );
    assert!(!accepted.is_empty());
    assert!(
        rss_after < rss_before + 256 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    let health = reqwest::get(format!("http://{}/healthz", svc.addr))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    all_applied(&out, &accepted).await;
    let s = shedding(&base).await;
    assert!(s["shed_normal"].as_u64().unwrap() >= shed, "{s}");
    svc.stop();
}

/// Bad `[shedding]` values are config errors that name the field.
#[test]
fn bad_shedding_config_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    for (table, field) in [
        ("min_limit = 0", "shedding.min_limit"),
        ("initial_limit = 20000", "shedding.initial_limit"),
        ("batch_share = 0.95", "shedding.batch_share"),
        ("normal_share = 1.5", "shedding.normal_share"),
    ] {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[namespaces.ns]\n\
             [namespaces.ns.backend]\ntype = \"embedded\"\n[namespaces.ns.target]\n\
             type = \"file\"\npath = \"{}\"\n[namespaces.ns.shedding]\n{table}\n",
            dir.path().display(),
            out.display()
        );
        let c = walden::config::from_toml(&text).unwrap();
        let err = walden::config::validate(&c).unwrap_err().to_string();
        assert!(err.contains(field) && err.contains("ns"), "{table}: {err}");
    }
    let text = "[server]\n[namespaces.ns]\n[namespaces.ns.backend]\ntype = \"embedded\"\n\
                [namespaces.ns.target]\ntype = \"file\"\npath = \"x\"\n\
                [namespaces.ns.shedding]\nalgorithm = \"aimd\"\n";
    let err = walden::config::from_toml(text).unwrap_err().to_string();
    assert!(err.contains("aimd") || err.contains("algorithm"), "{err}");
}
