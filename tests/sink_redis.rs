//! The Redis target against a real Redis: an atomic, version-guarded script,
//! and error classes.

mod common;

use std::time::Duration;

use common::{mutation, test_server, unique};
use redis::AsyncCommands;
use serde_json::json;
use walden::sinks::{ErrorClass, RedisSink, Sink};

const VAR: &str = "WALDEN_TEST_REDIS_URL";

async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn applies_never_move_a_key_backwards() {
    let Some(url) = test_server(VAR) else { return };
    let prefix = format!("{}:", unique("walden"));
    let s = RedisSink::new("redis", &url, &prefix, Duration::from_secs(5), None).unwrap();
    s.healthcheck().await.unwrap();
    let mut c = conn(&url).await;
    let key = format!("{prefix}a");
    let get = |c: &mut redis::aio::MultiplexedConnection| {
        let (c, key) = (c.clone(), key.clone());
        async move {
            let mut c = c;
            let v: Option<String> = c.get(&key).await.unwrap();
            v
        }
    };
    let apply = |seq, payload| {
        let s = &s;
        async move { s.apply(&[mutation(seq, payload)]).await.remove(0) }
    };
    apply(5, json!({"op": "put", "key": "a", "value": "five"}))
        .await
        .unwrap();
    assert_eq!(get(&mut c).await.as_deref(), Some("five"));
    apply(3, json!({"op": "put", "key": "a", "value": "three"}))
        .await
        .unwrap();
    assert_eq!(
        get(&mut c).await.as_deref(),
        Some("five"),
        "an older write is superseded"
    );
    apply(7, json!({"op": "delete", "key": "a"})).await.unwrap();
    assert_eq!(get(&mut c).await, None);
    apply(6, json!({"op": "put", "key": "a", "value": "six"}))
        .await
        .unwrap();
    assert_eq!(get(&mut c).await, None, "the tombstone's version holds");
    apply(12, json!({"op": "put", "key": "a", "value": {"n": 12}}))
        .await
        .unwrap();
    assert_eq!(get(&mut c).await.as_deref(), Some(r#"{"n":12}"#));
    // Versions compare as numbers, not as text: 12 is newer than 9.
    apply(9, json!({"op": "put", "key": "a", "value": "nine"}))
        .await
        .unwrap();
    assert_eq!(get(&mut c).await.as_deref(), Some(r#"{"n":12}"#));
}

#[tokio::test]
async fn malformed_mutations_and_wrong_types_are_permanent() {
    let Some(url) = test_server(VAR) else { return };
    let prefix = format!("{}:", unique("walden"));
    let s = RedisSink::new("redis", &url, &prefix, Duration::from_secs(5), None).unwrap();
    let mut c = conn(&url).await;
    // Someone else's hash where the version belongs.
    let _: () = c
        .hset(format!("{prefix}h:walden-version"), "f", "v")
        .await
        .unwrap();
    let results = s
        .apply(&[
            mutation(1, json!({"op": "put", "key": "ok", "value": 1})),
            mutation(2, json!({"op": "put"})),
            mutation(3, json!({"op": "put", "key": "h", "value": 1})),
        ])
        .await;
    assert!(results[0].is_ok());
    for r in &results[1..] {
        assert_eq!(
            r.as_ref().unwrap_err().class,
            ErrorClass::Permanent,
            "{r:?}"
        );
    }
}

#[tokio::test]
async fn an_unreachable_server_is_transient() {
    let s = RedisSink::new(
        "redis",
        "redis://127.0.0.1:1",
        "",
        Duration::from_millis(500),
        None,
    )
    .unwrap();
    let e = s
        .apply(&[mutation(1, json!({"op": "put", "key": "a", "value": 1}))])
        .await
        .remove(0)
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient, "{e}");
    assert!(s.healthcheck().await.is_err());
}

#[tokio::test]
async fn a_set_is_one_script_all_of_it_or_none() {
    let Some(url) = test_server(VAR) else { return };
    let prefix = format!("{}:", unique("walden"));
    let s = RedisSink::new("redis", &url, &prefix, Duration::from_secs(5), None).unwrap();
    let mut c = conn(&url).await;
    let value = |c: &mut redis::aio::MultiplexedConnection, k: &str| {
        let (mut c, key) = (c.clone(), format!("{prefix}{k}"));
        async move { c.get::<_, Option<String>>(key).await.unwrap() }
    };
    s.apply(&[mutation(9, json!({"op": "put", "key": "b", "value": "b9"}))])
        .await
        .remove(0)
        .unwrap();
    // Two mutations of `a` apply in order; `b`'s older one is superseded,
    // and the rest of the set still applies.
    s.apply_set(&[
        mutation(4, json!({"op": "put", "key": "a", "value": "a4"})),
        mutation(5, json!({"op": "put", "key": "b", "value": "b5"})),
        mutation(6, json!({"op": "put", "key": "a", "value": "a6"})),
        mutation(7, json!({"op": "delete", "key": "c"})),
    ])
    .await
    .unwrap();
    assert_eq!(value(&mut c, "a").await.as_deref(), Some("a6"));
    assert_eq!(value(&mut c, "b").await.as_deref(), Some("b9"));
    assert_eq!(value(&mut c, "c").await, None);
    let c_version: Option<String> = c.get(format!("{prefix}c:walden-version")).await.unwrap();
    assert_eq!(
        c_version.as_deref(),
        Some("00000000000000000007"),
        "a tombstone"
    );
    // A set whose last read fails writes nothing, not even its first.
    let _: () = c
        .hset(format!("{prefix}h:walden-version"), "f", "v")
        .await
        .unwrap();
    let e = s
        .apply_set(&[
            mutation(20, json!({"op": "put", "key": "a", "value": "a20"})),
            mutation(21, json!({"op": "put", "key": "h", "value": 1})),
        ])
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent, "{e}");
    assert_eq!(
        value(&mut c, "a").await.as_deref(),
        Some("a6"),
        "nothing of it"
    );
}
