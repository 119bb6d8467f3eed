//! Sink outage: a test-owned TCP proxy cuts the HTTP, Postgres and Redis
//! targets for `WALDEN_TEST_OUTAGE_S` seconds (5 by default) while entries
//! keep coming. Everything arrives afterwards, in per-key order, and nothing
//! goes to the DLQ.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::proxy::{Proxy, addr_of, through};
use common::target::HttpTarget;
use common::{test_server, unique};
use redis::AsyncCommands;
use serde_json::{Value, json};
use walden::service::Spawned;

fn outage() -> Duration {
    let secs = std::env::var("WALDEN_TEST_OUTAGE_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    Duration::from_secs(secs)
}

fn config(dir: &std::path::Path, target: &str) -> walden::config::Config {
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
{target}
timeout_ms = 1000
[namespaces.ns.retry]
initial_backoff_ms = 20
max_backoff_ms = 300
max_attempts = 10000
"#,
        dir.display()
    );
    let c = walden::config::from_toml(&text).unwrap();
    walden::config::validate(&c).unwrap();
    c
}

/// Write `n` puts over 6 keys, cutting the proxy for the outage part-way;
/// returns each key's last value.
async fn write_through_outage(
    base: &str,
    proxy: &Proxy,
    n: usize,
    mutation: bool,
) -> HashMap<String, i64> {
    let client = reqwest::Client::new();
    let url = format!("{base}/v1/namespaces/ns/log");
    let mut last = HashMap::new();
    let outage = outage();
    let cut_at = n / 4;
    let mut restore_at = None;
    for i in 0..n {
        if i == cut_at {
            proxy.cut();
            restore_at = Some(Instant::now() + outage);
        }
        if restore_at.is_some_and(|t| Instant::now() >= t) {
            proxy.restore();
            restore_at = None;
        }
        let key = format!("key-{}", i % 6);
        let payload = if mutation {
            json!({"op": "put", "key": key, "value": i})
        } else {
            json!({"n": i})
        };
        let r = client
            .post(&url)
            .json(&json!({"payload": payload, "key": key}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "writes go on during the outage");
        last.insert(key, i as i64);
        // Spread the writes over the outage.
        tokio::time::sleep(outage / (n as u32 / 2)).await;
    }
    if let Some(t) = restore_at {
        tokio::time::sleep_until(t.into()).await;
    }
    proxy.restore();
    last
}

async fn assert_no_dead_letters(base: &str) {
    let st: Value = reqwest::get(format!("{base}/v1/namespaces/ns"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["dead_lettered"], 0, "{st}");
    assert!(
        st["failed_deliveries"].as_u64().unwrap() > 0,
        "the outage was felt: {st}"
    );
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + Duration::from_secs(30) + outage();
    loop {
        match check().await {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_target_outage_loses_nothing_and_keeps_key_order() {
    let target = HttpTarget::start();
    let proxy = Proxy::start(target.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("type = \"http\"\nurl = \"http://{}/apply\"", proxy.addr);
    let svc = Spawned::start(config(dir.path(), &url)).unwrap();
    let base = format!("http://{}", svc.addr);
    let n = 120;
    write_through_outage(&base, &proxy, n, false).await;
    eventually("every entry delivered", || async {
        let distinct: std::collections::HashSet<_> = target
            .received()
            .iter()
            .map(|r| r.body["payload"]["n"].as_i64().unwrap())
            .collect();
        if distinct.len() == n {
            Ok(())
        } else {
            Err(format!("{} of {n}", distinct.len()))
        }
    })
    .await;
    // Per key, values arrive in order; a retry of a lost answer can repeat
    // a value, but never after a later one.
    let mut per_key: HashMap<String, i64> = HashMap::new();
    for r in target.received() {
        let n = r.body["payload"]["n"].as_i64().unwrap();
        let prev = per_key.insert(r.key().unwrap().to_string(), n);
        assert!(
            prev.is_none_or(|p| p <= n),
            "{:?}: {n} after {prev:?}",
            r.key()
        );
    }
    assert_no_dead_letters(&base).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_loses_nothing() {
    let Some(url) = test_server("WALDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let proxy = Proxy::start(addr_of(&url, 5432)).await;
    let via = through(&url, &proxy);
    let (client, table) = common::postgres_table(&url, "walden_outage").await;
    let dir = tempfile::tempdir().unwrap();
    let target = format!("type = \"postgres\"\nurl = \"{via}\"\ntable = \"{table}\"");
    let svc = Spawned::start(config(dir.path(), &target)).unwrap();
    let base = format!("http://{}", svc.addr);
    let last = write_through_outage(&base, &proxy, 120, true).await;
    eventually("postgres caught up", || async {
        let got = common::postgres_values(&client, &table).await;
        if got == last {
            Ok(())
        } else {
            Err(format!("{got:?} != {last:?}"))
        }
    })
    .await;
    assert_no_dead_letters(&base).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_loses_nothing() {
    let Some(url) = test_server("WALDEN_TEST_REDIS_URL") else {
        return;
    };
    let proxy = Proxy::start(addr_of(&url, 6379)).await;
    let prefix = format!("{}:", unique("walden_outage"));
    let dir = tempfile::tempdir().unwrap();
    let target = format!(
        "type = \"redis\"\nurl = \"redis://{}\"\nkey_prefix = \"{prefix}\"",
        proxy.addr
    );
    let svc = Spawned::start(config(dir.path(), &target)).unwrap();
    let base = format!("http://{}", svc.addr);
    let last = write_through_outage(&base, &proxy, 120, true).await;
    let conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    eventually("redis caught up", || {
        let (mut conn, prefix, last) = (conn.clone(), prefix.clone(), last.clone());
        async move {
            for (key, want) in &last {
                let got: Option<String> = conn.get(format!("{prefix}{key}")).await.unwrap();
                if got != Some(want.to_string()) {
                    return Err(format!("{key}: {got:?} != {want}"));
                }
            }
            Ok(())
        }
    })
    .await;
    assert_no_dead_letters(&base).await;
}
