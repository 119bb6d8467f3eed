//! End to end into real databases: mutations written over HTTP reach
//! Postgres and Redis, and the final state equals applying every entry once,
//! in order, even across a SIGKILL in the middle of applying.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{free_port, start_walden, test_server, unique, wait_healthy};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use redis::AsyncCommands;
use serde_json::{Value, json};
use walden::routing::RouteHash;
use walden::service::Spawned;

const PG: &str = "WALDEN_TEST_POSTGRES_URL";
const REDIS: &str = "WALDEN_TEST_REDIS_URL";

async fn create_table(url: &str) -> String {
    let table = unique("walden_e2e");
    common::pg(url)
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (key TEXT PRIMARY KEY, value JSONB, version BIGINT NOT NULL, \
             deleted BOOLEAN NOT NULL DEFAULT false)"
        ))
        .await
        .unwrap();
    table
}

fn config_text(data: &Path, listen: &str, target: &str) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
data_dir = "{}"

[namespaces.kv]
shards = 4
[namespaces.kv.backend]
type = "embedded"
[namespaces.kv.target]
{target}
[namespaces.kv.retry]
initial_backoff_ms = 20
max_backoff_ms = 200
"#,
        data.display()
    )
}

/// A random sequence of puts and deletes over a few keys; returns the
/// mutations and, per key, the final value (None: deleted).
fn script(seed: u64, n: usize) -> (Vec<Value>, HashMap<String, Option<Value>>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut expected = HashMap::new();
    let mut muts = Vec::new();
    for i in 0..n {
        let key = format!("key-{}", rng.random_range(0..8));
        if rng.random_range(0..4) == 0 {
            muts.push(json!({"op": "delete", "key": key}));
            expected.insert(key, None);
        } else {
            muts.push(json!({"op": "put", "key": key, "value": {"i": i}}));
            expected.insert(key, Some(json!({"i": i})));
        }
    }
    (muts, expected)
}

async fn write_all(base: &str, muts: &[Value]) {
    let client = reqwest::Client::new();
    // Batches of 25, keyed by the mutation key so each key keeps its order.
    for chunk in muts.chunks(25) {
        let entries: Vec<_> = chunk
            .iter()
            .map(|m| json!({"payload": m, "key": m["key"]}))
            .collect();
        let resp = client
            .post(format!("{base}/v1/namespaces/kv/log/batch"))
            .json(&json!({ "entries": entries }))
            .send()
            .await
            .unwrap();
        let body: Value = resp.json().await.unwrap();
        for r in body["results"].as_array().unwrap() {
            assert_eq!(r["status"], 200, "{r}");
        }
    }
}

async fn pg_state(url: &str, table: &str) -> HashMap<String, Option<Value>> {
    common::pg(url)
        .await
        .query(&format!("SELECT key, value, deleted FROM {table}"), &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            let deleted: bool = r.get(2);
            (r.get(0), if deleted { None } else { r.get(1) })
        })
        .collect()
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match check().await {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_ends_equal_to_in_order_application() {
    let Some(url) = test_server(PG) else { return };
    let table = create_table(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let target = format!("type = \"postgres\"\nurl = \"{url}\"\ntable = \"{table}\"");
    let config =
        walden::config::from_toml(&config_text(dir.path(), "127.0.0.1:0", &target)).unwrap();
    walden::config::validate(&config).unwrap();
    let svc = Spawned::start(config).unwrap();
    let (muts, expected) = script(1, 300);
    write_all(&format!("http://{}", svc.addr), &muts).await;
    eventually("postgres state", || async {
        let got = pg_state(&url, &table).await;
        if got == expected {
            Ok(())
        } else {
            Err(format!("{got:?} != {expected:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_ends_equal_to_in_order_application() {
    let Some(url) = test_server(REDIS) else {
        return;
    };
    let prefix = format!("{}:", unique("walden_e2e"));
    let dir = tempfile::tempdir().unwrap();
    let target = format!("type = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"{prefix}\"");
    let config =
        walden::config::from_toml(&config_text(dir.path(), "127.0.0.1:0", &target)).unwrap();
    let svc = Spawned::start(config).unwrap();
    let (muts, expected) = script(2, 300);
    write_all(&format!("http://{}", svc.addr), &muts).await;
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    eventually("redis state", || {
        let (mut conn, prefix, expected) = (conn.clone(), prefix.clone(), expected.clone());
        async move {
            for (key, want) in &expected {
                let got: Option<String> = conn.get(format!("{prefix}{key}")).await.unwrap();
                let want = want.as_ref().map(|v| v.to_string());
                if got != want {
                    return Err(format!("{key}: {got:?} != {want:?}"));
                }
            }
            Ok(())
        }
    })
    .await;
    let _ = &mut conn;
}

/// Reads a store's state: key → the `i` of its stored value (`None`: the
/// key is deleted).
type Reader =
    Box<dyn Fn() -> futures_util::future::BoxFuture<'static, HashMap<String, Option<i64>>>>;

fn pg_reader(url: String, table: String) -> Reader {
    Box::new(move || {
        let (url, table) = (url.clone(), table.clone());
        Box::pin(async move {
            common::pg(&url)
                .await
                .query(&format!("SELECT key, value FROM {table}"), &[])
                .await
                .unwrap()
                .into_iter()
                .map(|r| {
                    let v: Option<Value> = r.get(1);
                    (r.get(0), v.map(|v| v["i"].as_i64().unwrap()))
                })
                .collect()
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_applying_leaves_postgres_equal_to_in_order_application() {
    let Some(url) = test_server(PG) else { return };
    let table = create_table(&url).await;
    let target = format!("type = \"postgres\"\nurl = \"{url}\"\ntable = \"{table}\"");
    let run = Crashes {
        routing_key: true,
        deletes: false,
        kills: 1,
    };
    sigkill_while_applying(&target, pg_reader(url, table), run).await;
}

/// The case a harness found: puts and deletes with each row's key only in
/// the payload, four writers over 40 rows, three kill -9s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_keyed_only_in_payloads_end_at_their_last_writes_across_three_sigkills() {
    let Some(url) = test_server(PG) else { return };
    let table = create_table(&url).await;
    let target = format!("type = \"postgres\"\nurl = \"{url}\"\ntable = \"{table}\"");
    let run = Crashes {
        routing_key: false,
        deletes: true,
        kills: 3,
    };
    sigkill_while_applying(&target, pg_reader(url, table), run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_applying_leaves_redis_equal_to_in_order_application() {
    let Some(url) = test_server(REDIS) else {
        return;
    };
    let prefix = format!("{}:", unique("walden_crash"));
    let target = format!("type = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"{prefix}\"");
    let read: Reader = Box::new(move || {
        let (url, prefix) = (url.clone(), prefix.clone());
        Box::pin(async move {
            let mut conn = redis::Client::open(url.as_str())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            let keys: Vec<String> = conn.keys(format!("{prefix}w*")).await.unwrap();
            let mut out = HashMap::new();
            for k in keys.into_iter().filter(|k| !k.ends_with(":walden-version")) {
                let v: String = conn.get(&k).await.unwrap();
                let v: Value = serde_json::from_str(&v).unwrap();
                out.insert(k[prefix.len()..].to_string(), v["i"].as_i64());
            }
            out
        })
    });
    let run = Crashes {
        routing_key: true,
        deletes: false,
        kills: 1,
    };
    sigkill_while_applying(&target, read, run).await;
}

/// How a crash test writes and crashes.
struct Crashes {
    /// Writes give the row's key as their routing `key` too.
    routing_key: bool,
    /// One write in four is a delete.
    deletes: bool,
    /// SIGKILLs while writing, each followed by a restart.
    kills: u32,
}

/// What one writer did to one row: every attempted write in order, with
/// whether it was acknowledged, and what it left (`None`: a delete).
type History = Vec<(i64, Option<i64>, bool)>;

/// Writers own their rows and write one entry at a time, so per row the
/// acknowledged entries are known exactly; the process is killed mid-stream
/// and restarted, `kills` times; the store must end at the last acknowledged
/// write (or a later one that was in flight at a kill), never an older one.
async fn sigkill_while_applying(target: &str, read: Reader, run: Crashes) {
    let dir = tempfile::tempdir().unwrap();
    let start = |port: u16| {
        let path = dir.path().join("walden.toml");
        let text = config_text(
            &dir.path().join("data"),
            &format!("127.0.0.1:{port}"),
            target,
        );
        std::fs::write(&path, text).unwrap();
        start_walden(&path)
    };
    let client = reqwest::Client::new();
    let mut history: HashMap<String, History> = HashMap::new();
    let mut next_i = 0i64;
    for _ in 0..run.kills {
        let port = free_port();
        let mut child = start(port);
        wait_healthy(port).await;
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let client = client.clone();
                let url = format!("http://127.0.0.1:{port}/v1/namespaces/kv/log");
                let (routing_key, deletes) = (run.routing_key, run.deletes);
                // Each round's writers number their writes past the last
                // round's, so a write's `i` names it.
                let base = next_i + w * 1_000_000;
                tokio::spawn(async move {
                    let mut seen: HashMap<String, History> = HashMap::new();
                    for n in 0i64.. {
                        let i = base + n;
                        let key = format!("w{w}-k{}", n % 10);
                        let delete = deletes && n % 4 == 3;
                        let m = match delete {
                            true => json!({"op": "delete", "key": key}),
                            false => json!({"op": "put", "key": key, "value": {"i": i}}),
                        };
                        let body = match routing_key {
                            true => json!({"payload": m, "key": key}),
                            false => json!({"payload": m}),
                        };
                        let left = (!delete).then_some(i);
                        let rows = seen.entry(key.clone()).or_default();
                        match client.post(&url).json(&body).send().await {
                            Ok(r) => rows.push((i, left, r.status() == 200)),
                            Err(_) => {
                                rows.push((i, left, false));
                                return seen;
                            }
                        }
                    }
                    unreachable!()
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(700)).await;
        child.kill().unwrap(); // SIGKILL while entries are being applied
        child.wait().unwrap();
        for w in writers {
            for (key, rows) in w.await.unwrap() {
                history.entry(key).or_default().extend(rows);
            }
        }
        next_i += 10_000_000;
    }
    assert!(history.values().flatten().any(|(_, _, acked)| *acked));

    let port = free_port();
    let mut child = start(port);
    wait_healthy(port).await;
    eventually("the store after the SIGKILLs", || async {
        let got = read().await;
        for (key, rows) in &history {
            let Some(last_acked) = rows.iter().rposition(|(_, _, acked)| *acked) else {
                continue;
            };
            // The last acknowledged write, or one after it that was in
            // flight at a kill and became durable too; never an older one.
            let stored = got.get(key).copied().flatten();
            let allowed: Vec<Option<i64>> = rows[last_acked..].iter().map(|(_, l, _)| *l).collect();
            if !allowed.contains(&stored) {
                return Err(format!(
                    "{key}: stored {stored:?}; the last acknowledged write left {:?}",
                    rows[last_acked].1
                ));
            }
        }
        Ok(())
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_a_database_target_cannot_version_is_refused_at_ingest() {
    let Some(url) = test_server(PG) else { return };
    let table = create_table(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let target = format!("type = \"postgres\"\nurl = \"{url}\"\ntable = \"{table}\"");
    let config =
        walden::config::from_toml(&config_text(dir.path(), "127.0.0.1:0", &target)).unwrap();
    let svc = Spawned::start(config).unwrap();
    let url_log = format!("http://{}/v1/namespaces/kv/log", svc.addr);
    for (body, needle) in [
        (
            json!({"payload": "not a mutation", "id": "bad-1"}),
            "not a mutation",
        ),
        (
            json!({"payload": {"op": "put", "key": "k2"}, "id": "bad-2"}),
            "needs a value",
        ),
        (
            json!({"payload": {"op": "put", "key": "", "value": 1}}),
            "empty",
        ),
        (
            json!({"payload": {"op": "put", "key": "k3", "value": 3}, "key": "other"}),
            "mutation's key",
        ),
    ] {
        let (status, answer) = common::post(&url_log, body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let msg = answer["message"].as_str().unwrap();
        assert!(
            msg.contains(needle) && msg.contains("payload") || msg.contains("`key`"),
            "{msg}"
        );
        assert!(msg.contains(needle), "{msg}");
    }
    let good = json!({"payload": {"op": "put", "key": "k3", "value": 3}, "key": "k3"});
    assert_eq!(common::post(&url_log, good).await.0, 200);
    eventually("the good entry applied", || async {
        match pg_state(&url, &table).await.get("k3") {
            Some(Some(v)) if *v == json!(3) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// Ids that route (without a key) to `shard` of 4.
fn ids_on_shard(shard: u32, n: usize, tag: &str) -> Vec<String> {
    (0..)
        .map(|i| format!("{tag}-{i}"))
        .filter(|id| walden::routing::shard_of(RouteHash::default(), None, id, 4) == shard)
        .take(n)
        .collect()
}

/// The row's key only in the payload: its writes still share one shard, so
/// the version guard compares sequences of one shard and the last write wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_keyed_only_in_its_payload_ends_at_its_last_write() {
    let Some(url) = test_server(PG) else { return };
    let table = create_table(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let target = format!("type = \"postgres\"\nurl = \"{url}\"\ntable = \"{table}\"");
    let config =
        walden::config::from_toml(&config_text(dir.path(), "127.0.0.1:0", &target)).unwrap();
    let svc = Spawned::start(config).unwrap();
    let log = format!("http://{}/v1/namespaces/kv/log", svc.addr);
    // Five writes whose ids route to shard 0, then the last ones with ids
    // that route to shard 1, where sequences are still low: by id alone the
    // newest writes would rank below the old ones.
    let mut ids = ids_on_shard(0, 5, "early");
    ids.extend(ids_on_shard(1, 2, "late"));
    for (i, id) in ids.iter().enumerate() {
        let payload = match i {
            5 => json!({"op": "delete", "key": "row"}),
            _ => json!({"op": "put", "key": "row", "value": i}),
        };
        let (status, answer) = common::post(&log, json!({"payload": payload, "id": id})).await;
        assert_eq!(status, 200, "{answer}");
    }
    eventually("the row holds its last write", || async {
        match pg_state(&url, &table).await.get("row") {
            Some(Some(v)) if *v == json!(6) => Ok(()),
            other => Err(format!("row is {other:?}, the last write put 6")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_key_that_names_another_key_s_version_is_refused() {
    let Some(url) = test_server(REDIS) else {
        return;
    };
    let prefix = format!("{}:", unique("walden_e2e"));
    let dir = tempfile::tempdir().unwrap();
    let target = format!("type = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"{prefix}\"");
    let config =
        walden::config::from_toml(&config_text(dir.path(), "127.0.0.1:0", &target)).unwrap();
    let svc = Spawned::start(config).unwrap();
    let log = format!("http://{}/v1/namespaces/kv/log", svc.addr);
    let put = |key: &str, value: i64| json!({"payload": {"op": "put", "key": key, "value": value}});
    assert_eq!(common::post(&log, put("x", 1)).await.0, 200);
    let (status, answer) = common::post(&log, put("x:walden-version", 0)).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains(":walden-version"),
        "{answer}"
    );
    assert_eq!(common::post(&log, put("x", 2)).await.0, 200);
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    eventually("x holds its last write", || {
        let (mut conn, prefix) = (conn.clone(), prefix.clone());
        async move {
            let got: Option<String> = conn.get(format!("{prefix}x")).await.unwrap();
            match got.as_deref() {
                Some("2") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    let _ = &mut conn;
}
