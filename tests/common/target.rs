//! A real HTTP target for tests: an actix-web server on 127.0.0.1:0 that
//! records what it receives and can be told to fail.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};

#[derive(Clone, Debug)]
pub struct Received {
    pub at: Instant,
    /// Wall-clock ms at arrival, to compare with an entry's `due_ms`.
    pub at_ms: u64,
    pub body: serde_json::Value,
    pub idempotency_key: Option<String>,
    pub traceparent: Option<String>,
}

impl Received {
    pub fn key(&self) -> Option<&str> {
        self.body["key"].as_str()
    }
    pub fn sequence(&self) -> u64 {
        self.body["sequence"].as_u64().unwrap()
    }
    pub fn id(&self) -> &str {
        self.body["id"].as_str().unwrap()
    }
}

#[derive(Default)]
struct Shared {
    received: Mutex<Vec<Received>>,
    /// Every request, answered 200 or not.
    requests: AtomicU64,
    /// 0: answer 200; otherwise answer this status.
    fail_status: AtomicU16,
    /// Entries with these keys get this status (and maybe a Retry-After).
    reject: Mutex<std::collections::HashMap<String, (u16, Option<u64>)>>,
    /// How long an accepted delivery waits, recorded, before its 200.
    answer_after_ms: AtomicU64,
    /// A target of limited capacity: it serves this many requests at once,
    /// each for the given time, and queues the rest.
    capacity: Mutex<Option<(Arc<tokio::sync::Semaphore>, Duration)>>,
    /// Requests arriving while this many are in hand get a 429 at once
    /// (0: none); and the requests in hand.
    shed_beyond: AtomicU64,
    in_hand: AtomicU64,
}

/// Counts a request in hand until dropped.
struct InHand<'a>(&'a AtomicU64);

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct HttpTarget {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

async fn receive(req: HttpRequest, body: web::Bytes, shared: web::Data<Shared>) -> HttpResponse {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let held = shared.in_hand.fetch_add(1, Ordering::SeqCst);
    let _in_hand = InHand(&shared.in_hand);
    let shed_beyond = shared.shed_beyond.load(Ordering::SeqCst);
    if shed_beyond > 0 && held >= shed_beyond {
        return HttpResponse::TooManyRequests().body("over capacity");
    }
    let capacity = shared.capacity.lock().unwrap().clone();
    let _serving = match capacity {
        Some((slots, service)) => {
            let permit = slots.acquire_owned().await.unwrap();
            tokio::time::sleep(service).await;
            Some(permit)
        }
        None => None,
    };
    let status = shared.fail_status.load(Ordering::SeqCst);
    if status != 0 {
        return HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap())
            .body("failing on purpose");
    }
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let rejected = body["key"]
        .as_str()
        .and_then(|k| shared.reject.lock().unwrap().get(k).copied());
    if let Some((status, retry_after)) = rejected {
        let mut resp = HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap());
        if let Some(secs) = retry_after {
            resp.insert_header(("Retry-After", secs.to_string()));
        }
        return resp.body("rejected on purpose");
    }
    shared.received.lock().unwrap().push(Received {
        at: Instant::now(),
        at_ms: walden::entry::now_ms(),
        body,
        idempotency_key: header("idempotency-key"),
        traceparent: header("traceparent"),
    });
    let wait = shared.answer_after_ms.load(Ordering::SeqCst);
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    HttpResponse::Ok().finish()
}

impl HttpTarget {
    pub fn start() -> Self {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let data = web::Data::from(shared.clone());
        let thread = std::thread::spawn(move || {
            actix::System::new().block_on(async move {
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(data.clone())
                        .default_service(web::post().to(receive))
                })
                .workers(1)
                .disable_signals()
                .bind("127.0.0.1:0")
                .unwrap();
                let addr = server.addrs()[0];
                let server = server.run();
                tx.send((addr, server.handle())).unwrap();
                let _ = server.await;
            })
        });
        let (addr, server) = rx.recv().unwrap();
        Self {
            addr,
            shared,
            server,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/apply", self.addr)
    }

    /// Answer every request with `status` (0: succeed again).
    pub fn fail_with(&self, status: u16) {
        self.shared.fail_status.store(status, Ordering::SeqCst);
    }

    /// Record each accepted delivery at once, but answer it only after
    /// `wait`: a delivery the target has, whose answer is still to come.
    pub fn answer_after(&self, wait: Duration) {
        self.shared
            .answer_after_ms
            .store(wait.as_millis() as u64, Ordering::SeqCst);
    }

    /// Serve `n` requests at once, each taking `service`, and queue the
    /// rest (a target of limited capacity).
    pub fn serve_at_once(&self, n: usize, service: Duration) {
        let slots = Arc::new(tokio::sync::Semaphore::new(n));
        *self.shared.capacity.lock().unwrap() = Some((slots, service));
    }

    /// Answer 429 at once to a request that arrives while `n` are in hand
    /// (0: never), as a target shedding load does.
    pub fn shed_beyond(&self, n: u64) {
        self.shared.shed_beyond.store(n, Ordering::SeqCst);
    }

    /// Answer entries with `key` with `status` (0: accept them again).
    pub fn reject_key(&self, key: &str, status: u16) {
        self.reject_key_for(key, status, None);
    }

    /// Like `reject_key`, with a `Retry-After` of `secs`.
    pub fn reject_key_for(&self, key: &str, status: u16, retry_after: Option<u64>) {
        let mut reject = self.shared.reject.lock().unwrap();
        if status == 0 {
            reject.remove(key);
        } else {
            reject.insert(key.to_string(), (status, retry_after));
        }
    }

    /// Requests so far, answered 200 or not.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// The ids of the deliveries so far, in arrival order (a `Vec`) or as a
    /// set.
    pub fn ids<C: FromIterator<String>>(&self) -> C {
        let received = self.shared.received.lock().unwrap();
        received.iter().map(|r| r.id().to_string()).collect()
    }

    /// Wait until at least `n` deliveries arrived; returns them all.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for HttpTarget {
    fn drop(&mut self) {
        let server = self.server.clone();
        std::thread::spawn(move || actix::System::new().block_on(server.stop(false)))
            .join()
            .ok();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
