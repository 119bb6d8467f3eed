//! What the benchmarks share: an HTTP load driver and percentiles.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
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

    /// Several runs as one: writes and time summed, latencies pooled.
    pub fn merge(runs: &[Run]) -> Run {
        let mut all = Run {
            writes: 0,
            elapsed: Duration::ZERO,
            latencies_us: Vec::new(),
        };
        for r in runs {
            all.writes += r.writes;
            all.elapsed += r.elapsed;
            all.latencies_us.extend_from_slice(&r.latencies_us);
        }
        all.latencies_us.sort_unstable();
        all
    }
}

/// Distinct request bodies per connection (keys cycle through them).
const BODIES: usize = 64;

/// A number from the environment, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

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
    let path = if batch == 1 {
        format!("/v1/namespaces/{ns}/log")
    } else {
        format!("/v1/namespaces/{ns}/log/batch")
    };
    let payload = "p".repeat(payload_bytes);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|c| {
            let (path, payload, stop) = (path.clone(), payload.clone(), stop.clone());
            rt.spawn(async move {
                let mut conn = Conn::open(addr).await;
                // Requests are encoded up front, so the client's own work
                // does not take CPU from the service on a small machine.
                let requests: Vec<Vec<u8>> = (0..BODIES)
                    .map(|i| {
                        let body = if batch == 1 {
                            json!({"payload": payload, "key": format!("{c}-{i}")})
                        } else {
                            let entries: Vec<_> = (0..batch)
                                .map(|j| json!({"payload": payload, "key": format!("{c}-{i}-{j}")}))
                                .collect();
                            json!({ "entries": entries })
                        };
                        let body = serde_json::to_vec(&body).unwrap();
                        let mut req = format!(
                            "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        req.extend_from_slice(&body);
                        req
                    })
                    .collect();
                let mut lat = Vec::new();
                let mut writes = 0u64;
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    let status = conn.round_trip(&requests[i % BODIES]).await;
                    assert_eq!(status, 200);
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

/// One write to namespace `ns` at `addr`, answered 200, before a timed run:
/// the backend's connections and producer id are then in place, as a raw
/// peer's are after its own warm-up send.
pub fn warm_up(rt: &tokio::runtime::Runtime, addr: SocketAddr, ns: &str) {
    let body = serde_json::to_vec(&json!({"payload": "warm-up"})).unwrap();
    let mut req = format!(
        "POST /v1/namespaces/{ns}/log HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    let status = rt.block_on(async { Conn::open(addr).await.round_trip(&req).await });
    assert_eq!(status, 200, "the warm-up write failed");
}

/// One keep-alive HTTP/1.1 connection that sends pre-encoded requests and
/// reads each response whole (by its Content-Length). A general client
/// (reqwest) cost a third of the two cores at 64 connections, CPU the
/// service under test then did not have; this one does only what the load
/// needs.
struct Conn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            buf: Vec::with_capacity(64 * 1024),
        }
    }

    /// Send one request and read its response; returns the status.
    async fn round_trip(&mut self, request: &[u8]) -> u16 {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(request).await.expect("send");
        self.buf.clear();
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).expect("ASCII head");
                let status: u16 = head[9..12].parse().expect("status");
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .expect("a content-length");
                let total = end + 4 + length;
                while self.buf.len() < total {
                    self.read_more().await;
                }
                return status;
            }
            self.read_more().await;
        }
    }

    /// Read into `buf`'s spare capacity: a zeroed 16 KiB chunk per read
    /// was a tenth of the client's CPU at 64 connections.
    async fn read_more(&mut self) {
        use tokio::io::AsyncReadExt;
        self.buf.reserve(16 * 1024);
        let n = self.stream.read_buf(&mut self.buf).await.expect("read");
        assert!(n > 0, "the server closed the connection");
    }
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

/// A bare actix-web server with Walden's worker count that answers every
/// write as Walden does, with no work behind it.
pub struct Ceiling {
    pub addr: SocketAddr,
    handle: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ceiling {
    pub fn start(workers: usize) -> Self {
        let one = json!({"durable": "true", "id": "01a24c33-9057-735d-9735-baa16c7ea4b8",
            "namespace": "bench", "shard": 1, "sequence": 0});
        let mut result = one.clone();
        result["status"] = json!(200);
        let single = Bytes::from(serde_json::to_vec(&one).unwrap());
        let batch =
            Bytes::from(serde_json::to_vec(&json!({"results": vec![result; 100]})).unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                use actix_web::{App, HttpResponse, HttpServer, web};
                let server = HttpServer::new(move || {
                    let (single, batch) = (single.clone(), batch.clone());
                    App::new()
                        .route(
                            "/v1/namespaces/{ns}/log",
                            web::post().to(move |_body: Bytes| {
                                let single = single.clone();
                                async move {
                                    HttpResponse::Ok()
                                        .content_type("application/json")
                                        .body(single)
                                }
                            }),
                        )
                        .route(
                            "/v1/namespaces/{ns}/log/batch",
                            web::post().to(move |_body: Bytes| {
                                let batch = batch.clone();
                                async move {
                                    HttpResponse::Ok()
                                        .content_type("application/json")
                                        .body(batch)
                                }
                            }),
                        )
                })
                .workers(workers)
                .bind("127.0.0.1:0")
                .unwrap();
                let addr = server.addrs()[0];
                let server = server.run();
                tx.send((addr, server.handle())).unwrap();
                server.await.unwrap();
            })
        });
        let (addr, handle) = rx.recv().unwrap();
        Self {
            addr,
            handle,
            thread: Some(thread),
        }
    }

    pub fn stop(mut self, rt: &tokio::runtime::Runtime) {
        rt.block_on(self.handle.stop(true));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
