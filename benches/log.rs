//! Embedded-log benchmark: durable appends against the disk's own bound.
//!
//! For each payload size and appender count, appenders spread over 4 shards ×
//! 2 namespaces append in `always` mode for a fixed time. In the same run, a
//! plain loop of `write` + `fdatasync` of the same batch sizes on the same disk
//! gives the physical bound; `ratio` = Walden / bound.
//!
//! Appenders are tokio tasks, as the service's request handlers are. With 256
//! blocking OS threads on a 2-core machine, thread wake-ups, not the log,
//! dominate the cost.
//!
//! Then a 1 GB log is written and reopened, and its open time is printed
//! beside the time to read the same bytes.
//!
//! `cargo bench --bench log`. Environment: `WALDEN_BENCH_DIR` (default: the
//! system temp dir), `WALDEN_BENCH_SECS` (per case, default 3),
//! `WALDEN_BENCH_RECOVERY_MB` (default 1024).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use walden::backends::embedded::format::encoded_len;
use walden::backends::embedded::{EmbeddedLog, FsyncMode, LogConfig};
use walden::entry::{Entry, ShardRef};

mod common;
use common::env_u64;

fn shards() -> Vec<ShardRef> {
    let mut v = Vec::new();
    for ns in ["orders", "users"] {
        for s in 0..4 {
            v.push(ShardRef::new(ns, s));
        }
    }
    v
}

fn entry(id: String, payload: &Bytes) -> Entry {
    Entry {
        id,
        key: None,
        headers: Vec::new(),
        payload: payload.clone(),
        timestamp_ms: 0,
        due_ms: 0,
    }
}

struct Measured {
    records: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
    records_per_fsync: f64,
}

fn walden(base: &Path, appenders: usize, size: usize, secs: u64) -> Measured {
    let dir = tempfile::tempdir_in(base).unwrap();
    let log = Arc::new(EmbeddedLog::open(dir.path(), LogConfig::default()).unwrap());
    let payload = Bytes::from(vec![b'p'; size]);
    let stop = Arc::new(AtomicBool::new(false));
    // Appenders are async tasks, as the service's request handlers are.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let start = Instant::now();
    let tasks: Vec<_> = (0..appenders)
        .map(|t| {
            let (log, stop, payload) = (log.clone(), stop.clone(), payload.clone());
            rt.spawn(async move {
                let shards = shards();
                let shard = &shards[t % shards.len()];
                let mut lat = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    log.append(shard, entry(format!("{t}-{i}"), &payload))
                        .await
                        .expect("append");
                    lat.push(t0.elapsed().as_micros() as u32);
                    i += 1;
                }
                lat
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let mut latencies_us = Vec::new();
    for t in tasks {
        latencies_us.extend(rt.block_on(t).unwrap());
    }
    let elapsed = start.elapsed();
    let stats = log.stats();
    let records = stats.appends.get();
    let records_per_fsync = records as f64 / stats.fsyncs.get().max(1) as f64;
    Measured {
        records,
        elapsed,
        latencies_us,
        records_per_fsync,
    }
}

/// The physical bound: append `batch_bytes` and fdatasync, in a loop.
fn bound(base: &Path, batch_records: f64, frame_bytes: usize, secs: u64) -> f64 {
    let dir = tempfile::tempdir_in(base).unwrap();
    let mut f = std::fs::File::create(dir.path().join("bound")).unwrap();
    let batch = ((batch_records.round() as usize).max(1)) * frame_bytes;
    let buf = vec![b'b'; batch];
    let start = Instant::now();
    let mut syncs = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        f.write_all(&buf).unwrap();
        f.sync_data().unwrap();
        syncs += 1;
    }
    (syncs as f64 * (batch / frame_bytes) as f64) / start.elapsed().as_secs_f64()
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn drop_caches() -> bool {
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn recovery(base: &Path, megabytes: u64) {
    let dir = tempfile::tempdir_in(base).unwrap();
    let payload = Bytes::from(vec![b'r'; 1024]);
    let write_config = LogConfig {
        fsync: FsyncMode::Never,
        ..LogConfig::default()
    };
    let records = megabytes * 1024 * 1024 / (1024 + 40);
    {
        let log = EmbeddedLog::open(dir.path(), write_config).unwrap();
        let shards = shards();
        let mut waiting = Vec::with_capacity(4096);
        for i in 0..records {
            let shard = &shards[(i % 8) as usize];
            waiting.push(log.append(shard, entry(i.to_string(), &payload)));
            if waiting.len() == 4096 {
                for w in waiting.drain(..) {
                    w.wait().unwrap();
                }
            }
        }
        for w in waiting {
            w.wait().unwrap();
        }
        let size = log.size_bytes();
        println!(
            "recovery wrote {records} records, {:.2} GiB in {} segments",
            size as f64 / (1u64 << 30) as f64,
            log.stats().segments_rolled.get() + 1
        );
    }
    let cold = drop_caches();
    let t0 = Instant::now();
    let log = EmbeddedLog::open(dir.path(), LogConfig::default()).unwrap();
    let open = t0.elapsed();
    let scanned = log.recovery_report().scanned_bytes;
    let total = log.size_bytes();
    drop(log);

    // The peer: read every byte of the log once, as a full scan would.
    drop_caches();
    let t0 = Instant::now();
    let mut read = 0u64;
    for e in std::fs::read_dir(dir.path().join("log")).unwrap() {
        read += std::fs::read(e.unwrap().path()).unwrap().len() as u64;
    }
    let full = t0.elapsed();
    println!(
        "recovery open_ms={:.1} scanned_mb={:.1} log_mb={:.0} full_read_ms={:.1} ratio={:.3} cache={}",
        open.as_secs_f64() * 1e3,
        scanned as f64 / 1e6,
        total.max(read) as f64 / 1e6,
        full.as_secs_f64() * 1e3,
        open.as_secs_f64() / full.as_secs_f64(),
        if cold { "dropped" } else { "warm" },
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // and must not run for minutes.
    if !std::env::args().any(|a| a == "--bench") {
        println!("log benchmark: run with `cargo bench --bench log`");
        return;
    }
    let base = std::env::var("WALDEN_BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(|_| std::env::temp_dir());
    let secs = env_u64("WALDEN_BENCH_SECS", 3);
    println!("log benchmark in {} ({secs} s per case)", base.display());
    for size in [100usize, 1024] {
        let frame = encoded_len(
            "orders",
            &entry("255-1000000".into(), &Bytes::from(vec![0; size])),
        );
        for appenders in [1usize, 16, 256] {
            let mut m = walden(&base, appenders, size, secs);
            m.latencies_us.sort_unstable();
            let rps = m.records as f64 / m.elapsed.as_secs_f64();
            let bound_rps = bound(&base, m.records_per_fsync, frame, secs);
            println!(
                "log appenders={appenders} size={size} records_per_s={rps:.0} mb_per_s={:.2} p50_us={} p99_us={} records_per_fsync={:.1} bound_records_per_s={bound_rps:.0} ratio={:.2}",
                rps * size as f64 / 1e6,
                percentile(&m.latencies_us, 0.50),
                percentile(&m.latencies_us, 0.99),
                m.records_per_fsync,
                rps / bound_rps,
            );
        }
    }
    recovery(&base, env_u64("WALDEN_BENCH_RECOVERY_MB", 1024));
}
