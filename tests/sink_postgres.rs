//! The Postgres target against a real Postgres: version-guarded upserts and
//! tombstones, error classes, and a clear error for a missing table.

mod common;

use std::time::Duration;

use common::{mutation, test_server, unique};
use serde_json::json;
use walden::sinks::{ErrorClass, Outcome, PostgresSink, Sink};

const VAR: &str = "WALDEN_TEST_POSTGRES_URL";

async fn client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

async fn create_table(url: &str, extra: &str) -> String {
    let table = unique("walden_t");
    client(url)
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (key TEXT PRIMARY KEY, value JSONB, version BIGINT NOT NULL, \
             deleted BOOLEAN NOT NULL DEFAULT false {extra})"
        ))
        .await
        .unwrap();
    table
}

async fn row(url: &str, table: &str, key: &str) -> Option<(Option<serde_json::Value>, i64, bool)> {
    client(url)
        .await
        .query_opt(
            &format!("SELECT value, version, deleted FROM {table} WHERE key = $1"),
            &[&key],
        )
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

fn sink(url: &str, table: &str) -> PostgresSink {
    PostgresSink::new("pg", url, table, 4, Duration::from_secs(5)).unwrap()
}

#[tokio::test]
async fn applies_never_move_a_row_backwards() {
    let Some(url) = test_server(VAR) else { return };
    let table = create_table(&url, "").await;
    let s = sink(&url, &table);
    s.healthcheck().await.unwrap();
    let apply = |seq, payload| {
        let s = &s;
        async move {
            let r = s.apply(&[mutation(seq, payload)]).await;
            r.into_iter().next().unwrap()
        }
    };
    apply(5, json!({"op": "put", "key": "a", "value": {"n": 5}}))
        .await
        .unwrap();
    assert_eq!(
        row(&url, &table, "a").await,
        Some((Some(json!({"n": 5})), 5, false))
    );
    // An older write (a retry or a replay) is superseded, not applied.
    apply(3, json!({"op": "put", "key": "a", "value": {"n": 3}}))
        .await
        .unwrap();
    assert_eq!(
        row(&url, &table, "a").await,
        Some((Some(json!({"n": 5})), 5, false))
    );
    // A delete leaves a tombstone with its version.
    apply(7, json!({"op": "delete", "key": "a"})).await.unwrap();
    assert_eq!(row(&url, &table, "a").await, Some((None, 7, true)));
    apply(6, json!({"op": "put", "key": "a", "value": 6}))
        .await
        .unwrap();
    apply(7, json!({"op": "delete", "key": "a"})).await.unwrap();
    assert_eq!(row(&url, &table, "a").await, Some((None, 7, true)));
    apply(9, json!({"op": "put", "key": "a", "value": "back"}))
        .await
        .unwrap();
    assert_eq!(
        row(&url, &table, "a").await,
        Some((Some(json!("back")), 9, false))
    );
}

#[tokio::test]
async fn a_batch_answers_each_entry_and_malformed_ones_are_permanent() {
    let Some(url) = test_server(VAR) else { return };
    let table = create_table(&url, "").await;
    let s = sink(&url, &table);
    let batch = vec![
        mutation(1, json!({"op": "put", "key": "x", "value": 1})),
        mutation(2, json!("not a mutation")),
        mutation(3, json!({"op": "put", "key": "y"})),
        mutation(4, json!({"op": "upsert", "key": "z", "value": 1})),
        mutation(5, json!({"op": "put", "key": "w", "value": [1, 2]})),
    ];
    let results = s.apply(&batch).await;
    assert!(results[0].is_ok());
    for i in [1, 2, 3] {
        let e = results[i].as_ref().unwrap_err();
        assert_eq!(e.class, ErrorClass::Permanent, "{e}");
        assert!(
            e.message.contains(&format!("m{}", i + 1)),
            "names the entry: {e}"
        );
    }
    assert!(results[4].is_ok());
    assert_eq!(row(&url, &table, "w").await.unwrap().0, Some(json!([1, 2])));
}

#[tokio::test]
async fn constraint_errors_are_permanent() {
    let Some(url) = test_server(VAR) else { return };
    let table = create_table(&url, ", CHECK (version > 10)").await;
    let e = sink(&url, &table)
        .apply(&[mutation(5, json!({"op": "put", "key": "a", "value": 1}))])
        .await
        .remove(0)
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent, "{e}");
    assert!(e.message.contains("23514"), "{e}");
}

#[tokio::test]
async fn a_missing_table_is_a_clear_health_error_and_is_retried() {
    let Some(url) = test_server(VAR) else { return };
    let table = unique("walden_missing");
    let s = sink(&url, &table);
    let e = s.healthcheck().await.unwrap_err();
    assert!(
        e.message.contains(&table) && e.message.contains("does not exist"),
        "{e}"
    );
    assert!(
        e.message.contains("version BIGINT"),
        "says what the table needs: {e}"
    );
    let e = s
        .apply(&[mutation(1, json!({"op": "put", "key": "a", "value": 1}))])
        .await
        .remove(0)
        .unwrap_err();
    assert_eq!(
        e.class,
        ErrorClass::Transient,
        "retried until the table exists: {e}"
    );
}

#[tokio::test]
async fn an_unreachable_server_is_transient() {
    let s = PostgresSink::new(
        "pg",
        "postgres://postgres@127.0.0.1:1/test",
        "kv",
        1,
        Duration::from_millis(500),
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
async fn a_batch_is_one_statement_and_reports_superseded_entries() {
    let Some(url) = test_server(VAR) else { return };
    let table = create_table(&url, "").await;
    let s = sink(&url, &table);
    let first = s
        .apply(&[
            mutation(10, json!({"op": "put", "key": "a", "value": 10})),
            mutation(11, json!({"op": "put", "key": "b", "value": 11})),
        ])
        .await;
    assert!(
        first
            .iter()
            .all(|r| *r.as_ref().unwrap() == Outcome::Applied)
    );
    let second = s
        .apply(&[
            mutation(5, json!({"op": "put", "key": "a", "value": 5})),
            mutation(12, json!({"op": "delete", "key": "b"})),
            mutation(13, json!({"op": "put", "key": "c", "value": 13})),
        ])
        .await;
    let outcomes: Vec<Outcome> = second.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        outcomes,
        vec![Outcome::Superseded, Outcome::Applied, Outcome::Applied]
    );
    assert_eq!(
        row(&url, &table, "a").await,
        Some((Some(json!(10)), 10, false))
    );
    assert_eq!(row(&url, &table, "b").await, Some((None, 12, true)));
}

#[tokio::test]
async fn one_bad_row_fails_alone() {
    let Some(url) = test_server(VAR) else { return };
    let table = create_table(&url, ", CHECK (version > 10)").await;
    let results = sink(&url, &table)
        .apply(&[
            mutation(20, json!({"op": "put", "key": "a", "value": 1})),
            mutation(5, json!({"op": "put", "key": "b", "value": 1})),
            mutation(21, json!({"op": "put", "key": "c", "value": 1})),
        ])
        .await;
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert_eq!(
        results[1].as_ref().unwrap_err().class,
        ErrorClass::Permanent
    );
    assert!(row(&url, &table, "a").await.is_some() && row(&url, &table, "c").await.is_some());
}
