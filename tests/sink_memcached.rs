//! The Memcached target against a real memcached: the version guard (`gets`,
//! compare, `cas`) keeps an old replay from overwriting a newer value, a
//! delete leaves a versioned tombstone, racing writers end at the newest
//! version, and `ttl_s` expires items. And end to end: a namespace applying
//! to Memcached ends with each key's last write.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{mutation, post, test_server, unique};
use serde_json::{Value, json};
use walden::service::Spawned;
use walden::sinks::{ErrorClass, MemcachedSink, Outcome, Sink};

const VAR: &str = "WALDEN_TEST_MEMCACHED_URL";

fn sink(url: &str, prefix: &str, ttl_s: u64) -> MemcachedSink {
    MemcachedSink::new("cache", url, prefix, ttl_s, 4, Duration::from_secs(5)).unwrap()
}

fn client(url: &str) -> memcache::Client {
    memcache::Client::connect(url).unwrap()
}

/// The item at `key`, as Walden stored it.
fn item(c: &memcache::Client, key: &str) -> Option<Value> {
    let raw: Option<String> = c.get(key).unwrap();
    raw.map(|r| serde_json::from_str(&r).unwrap())
}

async fn apply(s: &MemcachedSink, seq: u64, payload: Value) -> Result<Outcome, ErrorClass> {
    let mut r = s.apply(&[mutation(seq, payload)]).await;
    r.pop().unwrap().map_err(|e| e.class)
}

#[tokio::test]
async fn an_old_write_never_overwrites_a_newer_one_and_deletes_leave_tombstones() {
    let Some(url) = test_server(VAR) else { return };
    let prefix = format!("{}:", unique("walden"));
    let s = sink(&url, &prefix, 0);
    s.healthcheck().await.unwrap();
    let c = client(&url);
    let key = format!("{prefix}user-7");
    let put = |v: i64| json!({"op": "put", "key": "user-7", "value": {"v": v}});
    assert_eq!(apply(&s, 5, put(5)).await, Ok(Outcome::Applied));
    assert_eq!(
        item(&c, &key).unwrap(),
        json!({"version": 5, "value": {"v": 5}})
    );
    // A replay of an older write finds a newer version.
    assert_eq!(apply(&s, 3, put(3)).await, Ok(Outcome::Superseded));
    assert_eq!(apply(&s, 5, put(5)).await, Ok(Outcome::Superseded));
    assert_eq!(item(&c, &key).unwrap()["version"], 5);
    let delete = json!({"op": "delete", "key": "user-7"});
    assert_eq!(apply(&s, 7, delete).await, Ok(Outcome::Applied));
    assert_eq!(
        item(&c, &key).unwrap(),
        json!({"version": 7, "deleted": true})
    );
    // The tombstone keeps an older put out.
    assert_eq!(apply(&s, 6, put(6)).await, Ok(Outcome::Superseded));
    assert_eq!(apply(&s, 8, put(8)).await, Ok(Outcome::Applied));
    assert_eq!(item(&c, &key).unwrap()["value"]["v"], 8);
    // A payload that is not a mutation, or a key Memcached cannot hold,
    // is the entry's fault.
    assert_eq!(
        apply(&s, 9, json!({"x": 1})).await,
        Err(ErrorClass::Permanent)
    );
    assert_eq!(
        apply(&s, 10, json!({"op": "put", "key": "has space", "value": 1})).await,
        Err(ErrorClass::Permanent)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_end_at_the_newest_version() {
    let Some(url) = test_server(VAR) else { return };
    let prefix = format!("{}:", unique("walden"));
    let s = Arc::new(sink(&url, &prefix, 0));
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                for i in 0..50u64 {
                    let seq = i * 4 + w + 1;
                    let r = apply(&s, seq, json!({"op": "put", "key": "hot", "value": seq})).await;
                    assert!(r.is_ok(), "{r:?}");
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let stored = item(&client(&url), &format!("{prefix}hot")).unwrap();
    assert_eq!(stored, json!({"version": 200, "value": 200}));
}

#[tokio::test]
async fn items_expire_after_ttl_s() {
    let Some(url) = test_server(VAR) else { return };
    let prefix = format!("{}:", unique("walden"));
    let c = client(&url);
    // Memcached counts time in whole seconds: a 1 s item can go within a
    // moment of its put, so the brief one lives 2 s and is looked at first.
    let short = sink(&url, &prefix, 2);
    apply(&short, 1, json!({"op": "put", "key": "brief", "value": 1}))
        .await
        .unwrap();
    assert!(item(&c, &format!("{prefix}brief")).is_some());
    // Past 30 days the expiry goes as a point in time; sent as relative
    // seconds, Memcached would take it as a date in 1970 and drop the item.
    let long = sink(&url, &prefix, 40 * 24 * 3600);
    apply(&long, 1, json!({"op": "put", "key": "lasting", "value": 1}))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert!(item(&c, &format!("{prefix}brief")).is_none(), "expired");
    assert!(item(&c, &format!("{prefix}lasting")).is_some(), "kept");
}

#[tokio::test]
async fn a_server_that_is_down_is_transient() {
    let port = common::free_port();
    let url = format!("memcache://127.0.0.1:{port}");
    let s = MemcachedSink::new("cache", &url, "p:", 0, 1, Duration::from_millis(500)).unwrap();
    assert!(s.healthcheck().await.is_err());
    let r = apply(&s, 1, json!({"op": "put", "key": "k", "value": 1})).await;
    assert_eq!(r, Err(ErrorClass::Transient));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_on_memcached_ends_with_each_key_s_last_write() {
    let Some(url) = test_server(VAR) else { return };
    let prefix = format!("{}:", unique("walden"));
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[namespaces.cache]\nshards = 4\n[namespaces.cache.backend]\ntype = \"embedded\"\n[namespaces.cache.target]\ntype = \"memcached\"\nurl = \"{url}\"\nkey_prefix = \"{prefix}\"\n",
        dir.path().display()
    );
    let config = walden::config::from_toml(&text).unwrap();
    walden::config::validate(&config).unwrap();
    let svc = Spawned::start(config).unwrap();
    let base = format!("http://{}/v1/namespaces/cache", svc.addr);
    let mut last = std::collections::HashMap::new();
    for i in 0..100 {
        let key = format!("k{}", i % 7);
        let body = match i % 10 {
            9 => json!({"payload": {"op": "delete", "key": key}}),
            _ => json!({"payload": {"op": "put", "key": key, "value": i}}),
        };
        let (status, answer) = post(&format!("{base}/log"), body.clone()).await;
        assert_eq!(status, 200, "{answer}");
        last.insert(key, body["payload"].clone());
    }
    let c = client(&url);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let matches = last.iter().all(|(key, p)| {
            let got = item(&c, &format!("{prefix}{key}"));
            match p["op"].as_str().unwrap() {
                "delete" => got.is_some_and(|g| g["deleted"] == true),
                _ => got.is_some_and(|g| g["value"] == p["value"]),
            }
        });
        if matches {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cache never matched the last writes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    svc.stop();
}
