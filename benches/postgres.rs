//! Postgres apply benchmark. In one run, against the same server:
//!
//! - `walden_sink`: the Postgres sink applying batches of 64 mutations, as the
//!   applier calls it (one version-guarded upsert per entry, pipelined);
//! - `walden_end_to_end`: writes through the HTTP API until every entry is in
//!   the table (log, consumer, applier and sink);
//! - `plain`: multi-row `INSERT`s of 64 rows into a table of the same shape,
//!   the bound.
//!
//! `cargo bench --bench postgres`. Environment: `WALDEN_BENCH_POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`),
//! `WALDEN_BENCH_ROWS` (default 20000).

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use walden::entry::{Delivered, Entry, ShardRef};
use walden::service::Spawned;
use walden::sinks::{PostgresSink, Sink};

const BATCH: usize = 64;

async fn connect(url: &str) -> Option<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(client)
}

async fn fresh_table(client: &tokio_postgres::Client, name: &str) {
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (key TEXT PRIMARY KEY, value JSONB, \
             version BIGINT NOT NULL, deleted BOOLEAN NOT NULL DEFAULT false)"
        ))
        .await
        .unwrap();
}

fn mutation(i: usize) -> Delivered {
    Delivered {
        shard: ShardRef::new("bench", 0),
        sequence: i as u64,
        entry: std::sync::Arc::new(Entry {
            id: i.to_string(),
            payload: Bytes::from(
                json!({"op": "put", "key": format!("k{i}"), "value": {"n": i}}).to_string(),
            ),
            ..Entry::default()
        }),
    }
}

async fn sink_rate(url: &str, client: &tokio_postgres::Client, rows: usize) -> f64 {
    fresh_table(client, "walden_bench_sink").await;
    let sink =
        PostgresSink::new("pg", url, "walden_bench_sink", 8, Duration::from_secs(10)).unwrap();
    let all: Vec<Delivered> = (0..rows).map(mutation).collect();
    let start = Instant::now();
    for chunk in all.chunks(BATCH) {
        for r in sink.apply(chunk).await {
            r.expect("apply");
        }
    }
    rows as f64 / start.elapsed().as_secs_f64()
}

async fn plain_rate(client: &tokio_postgres::Client, rows: usize) -> f64 {
    fresh_table(client, "walden_bench_plain").await;
    let start = Instant::now();
    for chunk_start in (0..rows).step_by(BATCH) {
        let end = (chunk_start + BATCH).min(rows);
        let mut sql =
            String::from("INSERT INTO walden_bench_plain (key, value, version, deleted) VALUES ");
        let mut params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = Vec::new();
        for (j, i) in (chunk_start..end).enumerate() {
            if j > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "(${}, ${}, ${}, false)",
                3 * j + 1,
                3 * j + 2,
                3 * j + 3
            ));
            params.push(Box::new(format!("k{i}")));
            params.push(Box::new(json!({"n": i})));
            params.push(Box::new(i as i64));
        }
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        client.execute(&sql, &refs).await.unwrap();
    }
    rows as f64 / start.elapsed().as_secs_f64()
}

async fn end_to_end_rate(url: &str, client: &tokio_postgres::Client, rows: usize) -> f64 {
    fresh_table(client, "walden_bench_e2e").await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{}"
[namespaces.bench]
shards = 4
[namespaces.bench.backend]
type = "embedded"
[namespaces.bench.target]
type = "postgres"
url = "{url}"
table = "walden_bench_e2e"
"#,
        dir.path().display()
    );
    let svc = Spawned::start(walden::config::from_toml(&text).unwrap()).unwrap();
    let http = reqwest::Client::new();
    let endpoint = format!("http://{}/v1/namespaces/bench/log/batch", svc.addr);
    let start = Instant::now();
    for chunk_start in (0..rows).step_by(500) {
        let entries: Vec<_> = (chunk_start..(chunk_start + 500).min(rows))
            .map(|i| {
                let key = format!("k{i}");
                json!({"payload": {"op": "put", "key": key, "value": {"n": i}}, "key": key})
            })
            .collect();
        let r = http
            .post(&endpoint)
            .json(&json!({ "entries": entries }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    loop {
        let n: i64 = client
            .query_one("SELECT count(*) FROM walden_bench_e2e", &[])
            .await
            .unwrap()
            .get(0);
        if n as usize >= rows {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = rows as f64 / start.elapsed().as_secs_f64();
    svc.stop();
    rate
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("postgres benchmark: run with `cargo bench --bench postgres`");
        return;
    }
    let url = std::env::var("WALDEN_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let rows: usize = std::env::var("WALDEN_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let Some(client) = connect(&url).await else {
            println!("postgres benchmark skipped: cannot connect to {url} (set WALDEN_BENCH_POSTGRES_URL)");
            return;
        };
        let plain = plain_rate(&client, rows).await;
        let sink = sink_rate(&url, &client, rows).await;
        let e2e = end_to_end_rate(&url, &client, rows).await;
        println!("postgres rows={rows} batch={BATCH} plain_rows_per_s={plain:.0}");
        println!(
            "postgres walden_sink_rows_per_s={sink:.0} ratio={:.2}",
            sink / plain
        );
        println!(
            "postgres walden_end_to_end_rows_per_s={e2e:.0} ratio={:.2}",
            e2e / plain
        );
    });
}
