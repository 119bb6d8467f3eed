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
use walden::service::Spawned;

const PG: &str = "WALDEN_TEST_POSTGRES_URL";
const REDIS: &str = "WALDEN_TEST_REDIS_URL";

async fn pg(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

async fn create_table(url: &str) -> String {
    let table = unique("walden_e2e");
    pg(url)
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
    pg(url)
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

/// Reads a store's state: key → the `i` of its stored value.
type Reader = Box<dyn Fn() -> futures_util::future::BoxFuture<'static, HashMap<String, i64>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_applying_leaves_postgres_equal_to_in_order_application() {
    let Some(url) = test_server(PG) else { return };
    let table = create_table(&url).await;
    let target = format!("type = \"postgres\"\nurl = \"{url}\"\ntable = \"{table}\"");
    let read: Reader = Box::new(move || {
        let (url, table) = (url.clone(), table.clone());
        Box::pin(async move {
            pg(&url)
                .await
                .query(&format!("SELECT key, value FROM {table}"), &[])
                .await
                .unwrap()
                .into_iter()
                .map(|r| {
                    let v: Value = r.get(1);
                    (r.get(0), v["i"].as_i64().unwrap())
                })
                .collect()
        })
    });
    sigkill_while_applying(&target, read).await;
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
                out.insert(k[prefix.len()..].to_string(), v["i"].as_i64().unwrap());
            }
            out
        })
    });
    sigkill_while_applying(&target, read).await;
}

/// Writers own their keys and write one entry at a time, so per key the
/// acknowledged entries are known exactly; the process is killed mid-stream
/// and restarted; the store must end at the last acknowledged write (or the
/// one in flight at the kill), never an older one.
async fn sigkill_while_applying(target: &str, read: Reader) {
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

    // Each writer owns its keys and writes one entry at a time, so per key
    // the acknowledged entries are known exactly, in order.
    let port = free_port();
    let mut child = start(port);
    wait_healthy(port).await;
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let client = client.clone();
            let url = format!("http://127.0.0.1:{port}/v1/namespaces/kv/log");
            tokio::spawn(async move {
                // key → (last acknowledged i, last attempted i)
                let mut seen: HashMap<String, (Option<i64>, i64)> = HashMap::new();
                for i in 0i64.. {
                    let key = format!("w{w}-k{}", i % 3);
                    let m = json!({"op": "put", "key": key, "value": {"i": i}});
                    seen.entry(key.clone()).or_insert((None, i)).1 = i;
                    match client
                        .post(&url)
                        .json(&json!({"payload": m, "key": key}))
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == 200 => seen.get_mut(&key).unwrap().0 = Some(i),
                        Ok(_) => {}
                        Err(_) => return seen,
                    }
                }
                unreachable!()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    child.kill().unwrap(); // SIGKILL while entries are being applied
    child.wait().unwrap();
    let mut seen = HashMap::new();
    for w in writers {
        seen.extend(w.await.unwrap());
    }
    assert!(seen.values().any(|(acked, _)| acked.is_some()));

    let port = free_port();
    let mut child = start(port);
    wait_healthy(port).await;
    eventually("the store after a SIGKILL", || async {
        let got = read().await;
        for (key, (acked, attempted)) in &seen {
            let Some(acked) = acked else { continue };
            match got.get(key) {
                // The last acknowledged write, or the one in flight at the
                // kill if it too became durable; never an older one.
                Some(i) if i >= acked && i <= attempted => {}
                other => {
                    return Err(format!(
                        "{key}: stored {other:?}, acknowledged {acked}, attempted {attempted}"
                    ));
                }
            }
        }
        Ok(())
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_mutation_goes_to_the_dlq_not_a_crash() {
    let Some(url) = test_server(PG) else { return };
    let table = create_table(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let target = format!("type = \"postgres\"\nurl = \"{url}\"\ntable = \"{table}\"");
    let config =
        walden::config::from_toml(&config_text(dir.path(), "127.0.0.1:0", &target)).unwrap();
    let svc = Spawned::start(config).unwrap();
    let base = format!("http://{}", svc.addr);
    let client = reqwest::Client::new();
    for body in [
        json!({"payload": "not a mutation", "key": "k1", "id": "bad-1"}),
        json!({"payload": {"op": "put", "key": "k2"}, "key": "k2", "id": "bad-2"}),
        json!({"payload": {"op": "put", "key": "k3", "value": 3}, "key": "k3", "id": "good"}),
    ] {
        let r = client
            .post(format!("{base}/v1/namespaces/kv/log"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    eventually(
        "the good entry applied and the bad ones dead-lettered",
        || async {
            let list: Value = client
                .get(format!("{base}/v1/namespaces/kv/dlq"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let state = pg_state(&url, &table).await;
            if list["total"] == 2 && state.get("k3") == Some(&Some(json!(3))) {
                let errors: Vec<&str> = list["entries"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["last_error"].as_str().unwrap())
                    .collect();
                assert!(
                    errors
                        .iter()
                        .any(|e| e.contains("bad-1") && e.contains("not a mutation")),
                    "{errors:?}"
                );
                assert!(
                    errors
                        .iter()
                        .any(|e| e.contains("bad-2") && e.contains("needs a value")),
                    "{errors:?}"
                );
                Ok(())
            } else {
                Err(format!("dlq {} entries, state {state:?}", list["total"]))
            }
        },
    )
    .await;
}
