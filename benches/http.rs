//! End-to-end HTTP benchmark: N keep-alive connections send WriteToLog
//! requests (single writes, and batches of 100) to a Walden on the embedded
//! backend. Beside each case, the same number of appenders append straight to
//! an embedded log in the same run, so `ratio` = HTTP writes/s ÷ log-only
//! appends/s shows what the API and actors cost.
//!
//! `cargo bench --bench http`. Environment: `WALDEN_BENCH_DIR`,
//! `WALDEN_BENCH_SECS` (per case, default 3).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use walden::backends::embedded::{EmbeddedLog, LogConfig};
use walden::entry::{Entry, ShardRef};
use walden::service::Spawned;

mod common;
use common::{Run, percentile};

const PAYLOAD: usize = 100;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(data: &Path) -> walden::config::Config {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{data}"
max_in_flight = 100000
mailbox_capacity = 100000

[namespaces.bench]
shards = 4
[namespaces.bench.backend]
type = "embedded"
[namespaces.bench.target]
type = "file"
path = "{data}/delivered.jsonl"
"#,
        data = data.display()
    );
    walden::config::from_toml(&text).expect("bench config")
}

fn http(rt: &tokio::runtime::Runtime, base: &Path, conns: usize, batch: usize, secs: u64) -> Run {
    let dir = tempfile::tempdir_in(base).unwrap();
    let svc = Spawned::start(config(dir.path())).unwrap();
    let run = common::http_load(rt, svc.addr, "bench", conns, batch, PAYLOAD, secs);
    svc.stop();
    run
}

/// The same concurrency appending straight to the log, no HTTP, no actors.
fn log_only(
    rt: &tokio::runtime::Runtime,
    base: &Path,
    appenders: usize,
    batch: usize,
    secs: u64,
) -> f64 {
    let dir = tempfile::tempdir_in(base).unwrap();
    let log = Arc::new(EmbeddedLog::open(dir.path(), LogConfig::default()).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..appenders)
        .map(|t| {
            let (log, stop) = (log.clone(), stop.clone());
            rt.spawn(async move {
                let shard = ShardRef::new("bench", (t % 4) as u32);
                let payload = Bytes::from(vec![b'p'; PAYLOAD]);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let pending: Vec<_> = (0..batch)
                        .map(|i| {
                            log.append(
                                &shard,
                                Entry {
                                    id: format!("{t}-{n}-{i}"),
                                    payload: payload.clone(),
                                    ..Entry::default()
                                },
                            )
                        })
                        .collect();
                    for p in pending {
                        p.await.expect("append");
                    }
                    n += batch as u64;
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let total: u64 = tasks.into_iter().map(|t| rt.block_on(t).unwrap()).sum();
    total as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("http benchmark: run with `cargo bench --bench http`");
        return;
    }
    let base = std::env::var("WALDEN_BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(|_| std::env::temp_dir());
    let secs = env_u64("WALDEN_BENCH_SECS", 3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "http benchmark in {} ({secs} s per case, {PAYLOAD} B payloads)",
        base.display()
    );
    for (conns, batch) in [(1, 1), (16, 1), (64, 1), (1, 100), (16, 100)] {
        let run = http(&rt, &base, conns, batch, secs);
        let wps = run.writes as f64 / run.elapsed.as_secs_f64();
        let log_wps = log_only(&rt, &base, conns, batch, secs);
        println!(
            "http connections={conns} batch={batch} writes_per_s={wps:.0} p50_us={} p99_us={} log_only_per_s={log_wps:.0} ratio={:.2}",
            percentile(&run.latencies_us, 0.50),
            percentile(&run.latencies_us, 0.99),
            wps / log_wps,
        );
    }
}
