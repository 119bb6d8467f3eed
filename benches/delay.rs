//! Delay benchmark.
//!
//! 1. Memory: 1,000,000 pending delayed entries (100 B payloads) in the delay
//!    store, as resident bytes per entry, beside the same count held in a
//!    plain `BinaryHeap` of full entries.
//! 2. Lateness: entries due over a few seconds, written through the HTTP API
//!    of a real service; how late each reaches a receiver after its due time
//!    (p50, p99). This includes the apply and the HTTP delivery.
//! 3. Firing throughput: many entries due at the same instant; entries/s from
//!    that instant until the last one is delivered.
//!
//! `cargo bench --bench delay`. Environment: `WALDEN_BENCH_DIR`,
//! `WALDEN_BENCH_DELAYED` (default 1000000), `WALDEN_BENCH_FIRE` (default 20000).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{App, HttpResponse, HttpServer, web};
use bytes::Bytes;
use serde_json::json;
use walden::backends::DelayStore;
use walden::entry::{Delivered, Entry, ShardRef, now_ms};
use walden::service::Spawned;
use walden::state::{ParkStore, StateStore};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident set size of this process, from /proc.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn delivered(i: usize, due_ms: u64) -> Delivered {
    Delivered {
        shard: ShardRef::new("bench", (i % 4) as u32),
        sequence: i as u64,
        entry: std::sync::Arc::new(Entry {
            id: format!("delayed-{i}"),
            key: Some(format!("key-{i}")),
            payload: Bytes::from(vec![b'p'; 100]),
            due_ms,
            ..Entry::default()
        }),
    }
}

fn memory(rt: &tokio::runtime::Runtime, base: &std::path::Path, n: usize) {
    let dir = tempfile::tempdir_in(base).unwrap();
    let store = Arc::new(StateStore::open(dir.path()).unwrap());
    let park = ParkStore::open(store).unwrap();
    let far = now_ms() + 3_600_000;
    let store_range = |from: usize, to: usize| {
        rt.block_on(async {
            let mut batch = Vec::with_capacity(10_000);
            for i in from..to {
                batch.push(delivered(i, far + i as u64));
                if batch.len() == 10_000 {
                    park.delay(std::mem::take(&mut batch)).await.unwrap();
                }
            }
            if !batch.is_empty() {
                park.delay(batch).await.unwrap();
            }
        });
        // Let fjall flush its memtables before measuring.
        std::thread::sleep(Duration::from_secs(2));
        rss_bytes()
    };
    let before = rss_bytes();
    let t0 = Instant::now();
    // Growth from a fifth to all of them: what each further entry costs,
    // apart from fjall's fixed buffers.
    let fifth = store_range(0, n / 5);
    let all = store_range(n / 5, n);
    let stored_in = t0.elapsed();
    let walden = all.saturating_sub(before);
    let marginal = all.saturating_sub(fifth) as f64 / (n - n / 5) as f64;
    drop(park);

    let before = rss_bytes();
    let mut heap = BinaryHeap::with_capacity(n);
    for i in 0..n {
        let d = delivered(i, far + i as u64);
        heap.push(Reverse((d.entry.due_ms, d.sequence, DeliveredOrd(d))));
    }
    let heap_bytes = rss_bytes().saturating_sub(before);
    let heap_per = heap_bytes as f64 / n as f64;
    println!(
        "delay memory pending={n} walden_bytes_per_entry={:.1} (marginal {marginal:.1}) heap_bytes_per_entry={heap_per:.1} ratio={:.3} (stored in {:.1} s)",
        walden as f64 / n as f64,
        marginal / heap_per,
        stored_in.as_secs_f64(),
    );
    drop(heap);
}

/// `Delivered` ordered only through the key in front of it.
struct DeliveredOrd(#[allow(dead_code)] Delivered);
impl PartialEq for DeliveredOrd {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for DeliveredOrd {}
impl PartialOrd for DeliveredOrd {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for DeliveredOrd {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

/// A receiver that notes when each delivery arrives, against its due time.
/// (due ms, arrival ms) of every delivery.
type Seen = Arc<Mutex<Vec<(u64, u64)>>>;

fn receiver() -> (SocketAddr, Seen) {
    let seen: Seen = Arc::default();
    let data = web::Data::new(seen.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix::System::new().block_on(async move {
            let server = HttpServer::new(move || {
                App::new()
                    .app_data(data.clone())
                    .default_service(web::post().to(
                        |body: web::Bytes, seen: web::Data<Seen>| async move {
                            let now = now_ms();
                            let v: serde_json::Value =
                                serde_json::from_slice(&body).unwrap_or_default();
                            let due = v["due_ms"].as_u64().unwrap_or(now);
                            seen.lock().unwrap().push((due, now));
                            HttpResponse::Ok().finish()
                        },
                    ))
            })
            .workers(1)
            .disable_signals()
            .bind("127.0.0.1:0")
            .unwrap();
            tx.send(server.addrs()[0]).unwrap();
            let _ = server.run().await;
        })
    });
    (rx.recv().unwrap(), seen)
}

fn service(base: &std::path::Path, target: SocketAddr) -> (tempfile::TempDir, Spawned) {
    let dir = tempfile::tempdir_in(base).unwrap();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{}"
max_in_flight = 100000
[namespaces.bench]
shards = 4
[namespaces.bench.backend]
type = "embedded"
[namespaces.bench.target]
type = "http"
url = "http://{target}/apply"
[namespaces.bench.delay]
catch_up_per_s = 1000000
"#,
        dir.path().display()
    );
    let svc = Spawned::start(walden::config::from_toml(&text).unwrap()).unwrap();
    (dir, svc)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Write `n` entries through the API; each gets `delay(i)`.
fn write_delayed(
    rt: &tokio::runtime::Runtime,
    svc: &Spawned,
    n: usize,
    delay: impl Fn(usize) -> u64,
) {
    let url = format!("http://{}/v1/namespaces/bench/log/batch", svc.addr);
    rt.block_on(async {
        let client = reqwest::Client::new();
        for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
            let entries: Vec<_> = chunk
                .iter()
                .map(|&i| json!({"payload": i, "key": format!("k{i}"), "lifecycle": {"delay_ms": delay(i), "jitter_ms": 0}}))
                .collect();
            let r = client.post(&url).json(&json!({ "entries": entries })).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    });
}

fn wait_for(seen: &Mutex<Vec<(u64, u64)>>, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while seen.lock().unwrap().len() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn lateness(rt: &tokio::runtime::Runtime, base: &std::path::Path, n: usize) {
    let (addr, seen) = receiver();
    let (_dir, svc) = service(base, addr);
    // Due times spread over 3 s, starting 3 s from now.
    write_delayed(rt, &svc, n, |i| 3000 + (i as u64 * 3000) / n as u64);
    wait_for(&seen, n, Duration::from_secs(60));
    let mut late: Vec<u64> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(due, at)| at.saturating_sub(*due))
        .collect();
    if let Ok(path) = std::env::var("WALDEN_BENCH_DUMP") {
        let rows: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|(d, a)| format!("{d} {a}"))
            .collect();
        std::fs::write(path, rows.join("\n")).unwrap();
    }
    late.sort_unstable();
    let early = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(due, at)| at < due)
        .count();
    let (fire_p50, fire_p99) = fire_lateness(rt, &svc);
    println!(
        "delay lateness entries={} fired_p50_ms<={fire_p50} fired_p99_ms<={fire_p99} delivered_p50_ms={} delivered_p99_ms={} delivered_max_ms={} early={early}",
        late.len(),
        percentile(&late, 0.50),
        percentile(&late, 0.99),
        late.last().copied().unwrap_or(0),
    );
    svc.stop();
}

/// The scheduler's own lateness at fire time, from its histogram in
/// `/metrics`: the bucket bounds holding p50 and p99.
fn fire_lateness(rt: &tokio::runtime::Runtime, svc: &Spawned) -> (String, String) {
    let text = rt.block_on(async {
        reqwest::get(format!("http://{}/metrics", svc.addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    let buckets: Vec<(String, u64)> = text
        .lines()
        .filter(|l| l.starts_with("walden_delay_fire_lateness_ms_bucket"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?.to_string();
            let n = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, n))
        })
        .collect();
    let total = buckets.last().map_or(0, |b| b.1).max(1);
    let at = |p: f64| {
        buckets
            .iter()
            .find(|(_, n)| *n as f64 >= p * total as f64)
            .map_or("?".into(), |(le, _)| le.clone())
    };
    (at(0.50), at(0.99))
}

fn firing(rt: &tokio::runtime::Runtime, base: &std::path::Path, n: usize) {
    let (addr, seen) = receiver();
    let (_dir, svc) = service(base, addr);
    let due_at = now_ms() + 5000;
    let start = now_ms();
    write_delayed(rt, &svc, n, |_| due_at.saturating_sub(start));
    wait_for(&seen, n, Duration::from_secs(120));
    let got = seen.lock().unwrap();
    let first_due = got.iter().map(|(d, _)| *d).min().unwrap_or(due_at);
    let last = got.iter().map(|(_, a)| *a).max().unwrap_or(first_due);
    let secs = (last.saturating_sub(first_due)).max(1) as f64 / 1000.0;
    println!(
        "delay firing entries={} all_due_at_once seconds_to_deliver={secs:.2} entries_per_s={:.0}",
        got.len(),
        got.len() as f64 / secs
    );
    drop(got);
    svc.stop();
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("delay benchmark: run with `cargo bench --bench delay`");
        return;
    }
    let base = std::env::var("WALDEN_BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(|_| std::env::temp_dir());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pending = env_usize("WALDEN_BENCH_DELAYED", 1_000_000);
    if pending > 0 {
        memory(&rt, &base, pending);
    }
    let fire = env_usize("WALDEN_BENCH_FIRE", 20_000);
    if fire > 0 {
        lateness(&rt, &base, fire);
        firing(&rt, &base, fire);
    }
}
