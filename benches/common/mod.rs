//! What the benchmarks share: an HTTP load driver and percentiles.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

pub struct Run {
    pub writes: u64,
    pub elapsed: Duration,
    pub latencies_us: Vec<u32>,
}

impl Run {
    pub fn per_s(&self) -> f64 {
        self.writes as f64 / self.elapsed.as_secs_f64()
    }
}

/// Distinct request bodies per connection (keys cycle through them).
const BODIES: usize = 64;

pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `conns` keep-alive connections write to namespace `ns` at `addr` for
/// `secs`: single writes when `batch` is 1, else batches of `batch`. Every
/// answer must be 200. Latencies are per request.
pub fn http_load(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    ns: &str,
    conns: usize,
    batch: usize,
    payload_bytes: usize,
    secs: u64,
) -> Run {
    let url = if batch == 1 {
        format!("http://{addr}/v1/namespaces/{ns}/log")
    } else {
        format!("http://{addr}/v1/namespaces/{ns}/log/batch")
    };
    let payload = "p".repeat(payload_bytes);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|c| {
            let (url, payload, stop) = (url.clone(), payload.clone(), stop.clone());
            rt.spawn(async move {
                // One client per task: one keep-alive connection each.
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .build()
                    .unwrap();
                // Bodies are encoded up front, so the client's own JSON work
                // does not take CPU from the service on a small machine.
                let bodies: Vec<bytes::Bytes> = (0..BODIES)
                    .map(|i| {
                        let body = if batch == 1 {
                            json!({"payload": payload, "key": format!("{c}-{i}")})
                        } else {
                            let entries: Vec<_> = (0..batch)
                                .map(|j| json!({"payload": payload, "key": format!("{c}-{i}-{j}")}))
                                .collect();
                            json!({ "entries": entries })
                        };
                        serde_json::to_vec(&body).unwrap().into()
                    })
                    .collect();
                let mut lat = Vec::new();
                let mut writes = 0u64;
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let body = bodies[i % BODIES].clone();
                    let t0 = Instant::now();
                    let resp = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .expect("request");
                    assert_eq!(resp.status(), 200);
                    let _ = resp.bytes().await;
                    lat.push(t0.elapsed().as_micros() as u32);
                    writes += batch as u64;
                    i += 1;
                }
                (writes, lat)
            })
        })
        .collect();
    finish(rt, tasks, &stop, start, secs)
}

/// Let load tasks (each answering its writes and latencies) run for `secs`,
/// stop them, and sum them up.
pub fn finish(
    rt: &tokio::runtime::Runtime,
    tasks: Vec<tokio::task::JoinHandle<(u64, Vec<u32>)>>,
    stop: &AtomicBool,
    start: Instant,
    secs: u64,
) -> Run {
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let mut run = Run {
        writes: 0,
        elapsed: Duration::ZERO,
        latencies_us: Vec::new(),
    };
    for t in tasks {
        let (w, l) = rt.block_on(t).unwrap();
        run.writes += w;
        run.latencies_us.extend(l);
    }
    run.elapsed = start.elapsed();
    run.latencies_us.sort_unstable();
    run
}
