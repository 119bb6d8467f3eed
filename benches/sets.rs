//! Sets of mutations against single writes of the same mutations, in one
//! run, on the embedded backend to Postgres: 16 requests in flight, each a
//! set of 10 mutations (`POST .../mutations`) or one mutation
//! (`POST .../log`), timed from the first write until every mutation is in
//! the table. `ratio=` is mutations/s in sets ÷ mutations/s as single writes
//! (goal ≥ 0.8).
//!
//! `cargo bench --bench sets`. Environment: `WALDEN_BENCH_POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`), `WALDEN_BENCH_ROWS`
//! (mutations per phase, default 20000).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use walden::service::Spawned;

mod common;
use common::env_u64;

const IN_FLIGHT: usize = 16;
const SET_SIZE: usize = 10;
const KEYS: usize = 5000;

async fn connect(url: &str) -> Option<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(client)
}

fn mutation(i: usize) -> Value {
    let key = format!("k{}", i % KEYS);
    json!({"op": "put", "key": key, "value": {"n": i}})
}

/// Write `rows` mutations, `per` to a request, `IN_FLIGHT` requests at
/// once, and wait until the target has applied all of them: mutations/s.
async fn rate(url: &str, client: &tokio_postgres::Client, rows: usize, per: usize) -> f64 {
    let table = format!("walden_bench_sets_{per}");
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (key TEXT PRIMARY KEY, value JSONB, \
             version BIGINT NOT NULL, deleted BOOLEAN NOT NULL DEFAULT false)"
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[namespaces.bench]\nshards = 4\n[namespaces.bench.backend]\ntype = \"embedded\"\n[namespaces.bench.target]\ntype = \"postgres\"\nurl = \"{url}\"\ntable = \"{table}\"\n",
        dir.path().display()
    );
    let svc = Spawned::start(walden::config::from_toml(&text).unwrap()).unwrap();
    let base = format!("http://{}/v1/namespaces/bench", svc.addr);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let writers: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (next, base) = (next.clone(), base.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                loop {
                    let first = next.fetch_add(per, Ordering::Relaxed);
                    if first >= rows {
                        return;
                    }
                    let (path, body) = match per {
                        1 => ("log", json!({"payload": mutation(first)})),
                        _ => {
                            let muts: Vec<Value> = (first..(first + per).min(rows))
                                .map(|i| {
                                    let m = mutation(i);
                                    json!({"key": m["key"], "payload": m})
                                })
                                .collect();
                            ("mutations", json!({ "mutations": muts }))
                        }
                    };
                    let r = http
                        .post(format!("{base}/{path}"))
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let written = start.elapsed();
    loop {
        let st: Value = reqwest::get(&base).await.unwrap().json().await.unwrap();
        let applied = st["applied"].as_u64().unwrap_or(0) + st["superseded"].as_u64().unwrap_or(0);
        if applied as usize >= rows {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "sets per_request={per} rows={rows} written_in_s={:.2} applied_in_s={elapsed:.2} mutations_per_s={:.0}",
        written.as_secs_f64(),
        rows as f64 / elapsed
    );
    svc.stop();
    rows as f64 / elapsed
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("sets benchmark: run with `cargo bench --bench sets`");
        return;
    }
    let url = std::env::var("WALDEN_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let rows = env_u64("WALDEN_BENCH_ROWS", 20_000) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let Some(client) = connect(&url).await else {
            println!("sets benchmark skipped: cannot connect to {url} (set WALDEN_BENCH_POSTGRES_URL)");
            return;
        };
        let singles = rate(&url, &client, rows, 1).await;
        let sets = rate(&url, &client, rows, SET_SIZE).await;
        println!(
            "sets sets_per_s={:.0} mutations_per_s={sets:.0} single_writes_mutations_per_s={singles:.0} ratio={:.2} (goal >= 0.8)",
            sets / SET_SIZE as f64,
            sets / singles
        );
    });
}
