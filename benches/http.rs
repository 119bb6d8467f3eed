//! The write path against its bounds, in one process and one run, on the
//! embedded backend with a file target (100 B payloads):
//!
//! - **ceiling**: a bare actix-web server with Walden's worker count that
//!   answers every write with Walden's answer and does nothing else: what
//!   HTTP alone allows;
//! - **fsync bound**: the same concurrency appending straight to an embedded
//!   log (group commit, fdatasync), with no HTTP and no actors;
//! - **redis**: `redis-server --appendonly yes --appendfsync always` on a
//!   port of its own, when the binary is installed: a durable peer;
//! - Walden's single writes at 1 and 64 in flight, and batches of 100 at 16
//!   in flight; 64 in flight again to a producer-only process, which applies
//!   nothing: the write path without delivery sharing the cores;
//! - **overload**: single writes from 8 connections (light), then 64, 80
//!   (10× light) and 512: the p99 of the writes accepted against light's,
//!   and accepted/s against the peak; the namespace's concurrency limit
//!   sheds (429) what the service cannot take;
//! - **sustained**: batches offered at 80% of what the batch case accepted,
//!   for `WALDEN_BENCH_SUSTAIN_SECS` (60): applied/s ÷ accepted/s, and the
//!   backlog left at the end in seconds of input.
//!
//! Each case prints one line with `ratio=` against its bound, and the
//! service's CPU time per write (the process's user + system time, less the
//! client's threads).
//!
//! `cargo bench --bench http`. Environment: `WALDEN_BENCH_DIR`,
//! `WALDEN_BENCH_SECS` (per case, default 3), `WALDEN_BENCH_SUSTAIN_SECS`,
//! `WALDEN_BENCH_CASES` (some of `one,many,alone,batch,overload,sustained`; all by
//! default; `sustained` needs `batch`, whose rate it offers).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use walden::backends::embedded::{EmbeddedLog, LogConfig};
use walden::entry::{Entry, ShardRef};
use walden::service::Spawned;

mod common;
use common::{Run, env_u64, percentile};

const PAYLOAD: usize = 100;
/// The client's threads: their CPU is not the service's.
const CLIENT_THREADS: &str = "bench-client";

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

/// CPU time (user + system) of this process, less the client's threads, in
/// clock ticks (Linux's 100 a second). Exited threads count in the process.
fn service_ticks() -> u64 {
    let ticks = |stat: &str| -> u64 {
        // After the command's closing parenthesis: state is field 3, utime
        // and stime fields 14 and 15.
        let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
    };
    let all = std::fs::read_to_string("/proc/self/stat").map_or(0, |s| ticks(&s));
    let mut client = 0;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim_end().starts_with(CLIENT_THREADS) {
                client += std::fs::read_to_string(t.path().join("stat")).map_or(0, |s| ticks(&s));
            }
        }
    }
    all.saturating_sub(client)
}

/// Microseconds of service CPU per write over a run.
struct Cpu(u64);

impl Cpu {
    fn start() -> Self {
        Cpu(service_ticks())
    }

    fn per_write_us(&self, writes: u64) -> f64 {
        (service_ticks() - self.0) as f64 * 10_000.0 / writes.max(1) as f64
    }
}

/// The same concurrency appending straight to the log: `appenders` tasks,
/// each appending `batch` at a time and waiting for them all.
fn fsync_bound(
    rt: &tokio::runtime::Runtime,
    base: &Path,
    appenders: usize,
    batch: usize,
    secs: u64,
) -> Run {
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
                let (mut n, mut lat) = (0u64, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
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
                    lat.push(t0.elapsed().as_micros() as u32);
                    n += batch as u64;
                }
                (n, lat)
            })
        })
        .collect();
    common::finish(rt, tasks, &stop, start, secs)
}

/// A durable Redis (`appendfsync always`) on a port of its own, if
/// `redis-server` is installed.
struct Redis {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start(base: &Path) -> Option<Self> {
        let dir = tempfile::tempdir_in(base).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Self {
            child,
            port,
            _dir: dir,
        })
    }

    /// `conns` connections, each SETting `batch` keys (one pipeline) at a time.
    fn load(&self, rt: &tokio::runtime::Runtime, conns: usize, batch: usize, secs: u64) -> Run {
        let url = format!("redis://127.0.0.1:{}", self.port);
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let tasks: Vec<_> = (0..conns)
            .map(|c| {
                let (url, stop) = (url.clone(), stop.clone());
                rt.spawn(async move {
                    let client = redis::Client::open(url).unwrap();
                    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
                    let value = vec![b'p'; PAYLOAD];
                    let (mut n, mut lat) = (0u64, Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        let t0 = Instant::now();
                        let mut pipe = redis::pipe();
                        for i in 0..batch {
                            pipe.set(format!("{c}-{}", (n as usize + i) % 4096), &value)
                                .ignore();
                        }
                        let () = pipe.query_async(&mut conn).await.unwrap();
                        lat.push(t0.elapsed().as_micros() as u32);
                        n += batch as u64;
                    }
                    (n, lat)
                })
            })
            .collect();
        common::finish(rt, tasks, &stop, start, secs)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn stats(addr: SocketAddr) -> Value {
    reqwest::get(format!("http://{addr}/v1/namespaces/bench"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Batches of 100 on 16 connections, paced to `rate` entries a second
/// overall, for `secs`. Returns what was accepted.
fn paced(rt: &tokio::runtime::Runtime, addr: SocketAddr, rate: f64, secs: u64) -> u64 {
    let conns = 16;
    let every = Duration::from_secs_f64(100.0 * conns as f64 / rate);
    let accepted = Arc::new(AtomicU64::new(0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..conns)
        .map(|c| {
            let accepted = accepted.clone();
            rt.spawn(async move {
                let client = reqwest::Client::new();
                let url = format!("http://{addr}/v1/namespaces/bench/log/batch");
                let payload = "p".repeat(PAYLOAD);
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut n = 0u64;
                while tokio::time::Instant::now() < deadline {
                    tick.tick().await;
                    let entries: Vec<Value> = (0..100)
                        .map(|j| json!({"payload": payload, "key": format!("{c}-{}", (n + j) % 997)}))
                        .collect();
                    let resp = client
                        .post(&url)
                        .json(&json!({ "entries": entries }))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(resp.status(), 200);
                    accepted.fetch_add(100, Ordering::Relaxed);
                    n += 100;
                }
            })
        })
        .collect();
    for t in tasks {
        rt.block_on(t).unwrap();
    }
    accepted.load(Ordering::Relaxed)
}

/// The process's resident set, in MiB (the service and the client).
fn rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

/// Single writes from 8 connections, then 64, 80 and 512; each closed loop
/// sends a shed write again at once, so 80 connections offer about ten
/// times what 8 do.
fn overload(rt: &tokio::runtime::Runtime, addr: SocketAddr, secs: u64) {
    let p99 = |r: &Run| percentile(&r.latencies_us, 0.99);
    let rss_before = rss_mib();
    let light = common::http_load(rt, addr, "bench", 8, 1, PAYLOAD, secs);
    let many = common::http_load(rt, addr, "bench", 64, 1, PAYLOAD, secs);
    let peak = light.per_s().max(many.per_s());
    println!(
        "overload conns=8 accepted_per_s={:.0} p99_us={} shed={}",
        light.per_s(),
        p99(&light),
        light.shed
    );
    for conns in [80, 512] {
        let run = common::http_load(rt, addr, "bench", conns, 1, PAYLOAD, secs);
        println!(
            "overload conns={conns} accepted_per_s={:.0} p99_us={} shed={} shed_share={:.2} peak_per_s={peak:.0} rss_mib={} (before {rss_before}) ratio={:.2} (p99 against light's, goal <= 5) goodput_ratio={:.2} (goal >= 0.9)",
            run.per_s(),
            p99(&run),
            run.shed,
            run.shed as f64 / (run.shed + run.writes).max(1) as f64,
            rss_mib(),
            p99(&run) as f64 / p99(&light).max(1) as f64,
            run.per_s() / peak,
        );
    }
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
    let sustain = env_u64("WALDEN_BENCH_SUSTAIN_SECS", 60);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(CLIENT_THREADS)
        .enable_all()
        .build()
        .unwrap();
    // Walden's default: one HTTP worker per core.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!(
        "http benchmark in {} ({secs} s per case, {PAYLOAD} B payloads, {workers} HTTP workers)",
        base.display()
    );
    let ceiling = common::Ceiling::start(workers);
    let redis = Redis::start(&base);
    if redis.is_none() {
        println!("redis: redis-server not found; its cases are left out");
    }
    let dir = tempfile::tempdir_in(&base).unwrap();
    let svc = Spawned::start(config(dir.path())).unwrap();
    common::warm_up(&rt, svc.addr, "bench");

    let cases = std::env::var("WALDEN_BENCH_CASES")
        .unwrap_or_else(|_| "one,many,alone,batch,overload,sustained".into());
    let want = |case: &str| cases.split(',').any(|c| c.trim() == case);
    let walden = |conns, batch| {
        let cpu = Cpu::start();
        let run = common::http_load(&rt, svc.addr, "bench", conns, batch, PAYLOAD, secs);
        let us = cpu.per_write_us(run.writes);
        (run, us)
    };

    // One in flight: latency against the ceiling's plus an fsync's.
    let mut bound_one = None;
    if want("one") {
        let (one, cpu_one) = walden(1, 1);
        let ceil_one = common::http_load(&rt, ceiling.addr, "bench", 1, 1, PAYLOAD, secs);
        let fsync_one = fsync_bound(&rt, &base, 1, 1, secs);
        let p50 = |r: &Run| percentile(&r.latencies_us, 0.50);
        let bound = p50(&ceil_one) + p50(&fsync_one) + 100;
        bound_one = Some(bound);
        println!(
            "single in_flight=1 walden_p50_us={} ceiling_p50_us={} fsync_p50_us={} bound_us={bound} walden_per_s={:.0} cpu_us_per_write={cpu_one:.1} ratio={:.2} (goal <= 1)",
            p50(&one),
            p50(&ceil_one),
            p50(&fsync_one),
            one.per_s(),
            p50(&one) as f64 / bound as f64,
        );
    }

    // 64 in flight: throughput against the ceiling (and a durable Redis).
    let ceil_many = (want("many") || want("alone"))
        .then(|| common::http_load(&rt, ceiling.addr, "bench", 64, 1, PAYLOAD, secs));
    if let Some(ceil_many) = ceil_many.as_ref().filter(|_| want("many")) {
        let (many, cpu_many) = walden(64, 1);
        let redis_many = redis.as_ref().map(|r| r.load(&rt, 64, 1, secs));
        // The log alone with the same 64 appenders: no HTTP in front of it.
        let fsync_many = fsync_bound(&rt, &base, 64, 1, secs);
        println!(
            "single in_flight=64 walden_per_s={:.0} shed={} p99_us={} ceiling_per_s={:.0} fsync_bound_per_s={:.0} redis_always_per_s={} cpu_us_per_write={cpu_many:.1} ratio={:.2} (goal >= 0.8){}",
            many.per_s(),
            many.shed,
            percentile(&many.latencies_us, 0.99),
            ceil_many.per_s(),
            fsync_many.per_s(),
            redis_many
                .as_ref()
                .map_or("-".into(), |r| format!("{:.0}", r.per_s())),
            many.per_s() / ceil_many.per_s(),
            redis_many.as_ref().map_or(String::new(), |r| format!(
                " redis_ratio={:.2}",
                many.per_s() / r.per_s()
            )),
        );
    }

    // The write path alone: the same 64 in flight to a producer-only
    // process, which reads and applies nothing (above, delivery to the file
    // target shares the two cores).
    if let Some(ceil_many) = ceil_many.as_ref().filter(|_| want("alone")) {
        let dir = tempfile::tempdir_in(&base).unwrap();
        let mut config = config(dir.path());
        config.server.role = walden::config::Role::Producer;
        let svc = Spawned::start(config).unwrap();
        common::warm_up(&rt, svc.addr, "bench");
        let cpu = Cpu::start();
        let run = common::http_load(&rt, svc.addr, "bench", 64, 1, PAYLOAD, secs);
        let us = cpu.per_write_us(run.writes);
        println!(
            "single in_flight=64 write_path_only walden_per_s={:.0} p99_us={} ceiling_per_s={:.0} cpu_us_per_write={us:.1} ratio={:.2} (goal >= 0.8, with delivery above)",
            run.per_s(),
            percentile(&run.latencies_us, 0.99),
            ceil_many.per_s(),
            run.per_s() / ceil_many.per_s(),
        );
        // One in flight without delivery: no target's fsync shares the disk.
        let one = common::http_load(&rt, svc.addr, "bench", 1, 1, PAYLOAD, secs);
        let p50 = percentile(&one.latencies_us, 0.50);
        println!(
            "single in_flight=1 write_path_only walden_p50_us={p50}{}",
            bound_one.map_or(String::new(), |b| format!(
                " bound_us={b} ratio={:.2} (goal <= 1, with delivery above)",
                p50 as f64 / b as f64
            )),
        );
        svc.stop();
    }

    // Batches of 100 at 16 in flight: against the fsync bound with the same
    // 1,600 entries in flight.
    let batches = want("batch").then(|| {
    let (batches, cpu_batch) = walden(16, 100);
    let fsync_batch = fsync_bound(&rt, &base, 16, 100, secs);
    let redis_batch = redis.as_ref().map(|r| r.load(&rt, 16, 100, secs));
    println!(
        "batch in_flight=16x100 walden_per_s={:.0} shed={} fsync_bound_per_s={:.0} redis_always_per_s={} cpu_us_per_write={cpu_batch:.1} ratio={:.2} (goal >= 0.4)",
        batches.per_s(),
        batches.shed,
        fsync_batch.per_s(),
        redis_batch
            .as_ref()
            .map_or("-".into(), |r| format!("{:.0}", r.per_s())),
        batches.per_s() / fsync_batch.per_s(),
    );
    batches
    });
    if want("overload") {
        overload(&rt, svc.addr, secs);
    }
    ceiling.stop(&rt);
    drop(redis);
    svc.stop();

    // Sustained: a fresh service, offered 80% of what the batch case
    // accepted, for `sustain` seconds.
    let Some(batches) = batches.filter(|_| want("sustained")) else {
        return;
    };
    let dir = tempfile::tempdir_in(&base).unwrap();
    let svc = Spawned::start(config(dir.path())).unwrap();
    let rate = 0.8 * batches.per_s();
    let start = Instant::now();
    let cpu = Cpu::start();
    let accepted = paced(&rt, svc.addr, rate, sustain);
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_sustained = cpu.per_write_us(accepted);
    let st = rt.block_on(stats(svc.addr));
    let applied = st["applied"].as_u64().unwrap_or(0);
    let backlog = accepted.saturating_sub(applied);
    let accepted_per_s = accepted as f64 / elapsed;
    println!(
        "sustained secs={sustain} offered_per_s={rate:.0} accepted_per_s={accepted_per_s:.0} applied_per_s={:.0} backlog_entries={backlog} backlog_s={:.2} (goal <= 1) cpu_us_per_write={cpu_sustained:.1} ratio={:.2} (goal >= 0.95)",
        applied as f64 / elapsed,
        backlog as f64 / accepted_per_s.max(1.0),
        applied as f64 / accepted.max(1) as f64,
    );
    svc.stop();
}
