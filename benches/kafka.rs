//! Kafka write-path benchmark: Walden's write path on the Kafka backend
//! (HTTP → Ingest on the worker's task → librdkafka's queue → delivery report
//! → answer) beside raw rdkafka producers
//! with the same settings (`acks=all`, idempotence, `linger.ms=1`), the same
//! 100 B payloads and the same concurrency, against the same kind of broker
//! in the same run. Three peers:
//! - `peer=raw` writes bare records: the key and the payload.
//! - `peer=id_only` adds the one header the issue requires of every record:
//!   a fresh UUIDv7 in `walden.id`.
//! - `peer=same_records` writes the records Walden writes for the same
//!   request: the payload's JSON text, `walden.id` and `walden.payload:
//!   json`. Against it, the ratio is the cost of Walden's write path (HTTP,
//!   JSON, bookkeeping), apart from what its records carry.
//! - `peer=http_ceiling` is not a producer: a bare actix-web server with
//!   Walden's worker count answering the same JSON, driven by the same
//!   client. Against it, the ratio shows what the broker costs beyond HTTP.
//!
//! `ratio` = Walden writes/s ÷ the peer's over all rounds; `round_ratios` is
//! the range of the rounds' own ratios; `p99_ratio` = Walden p99 ÷ the
//! peer's p99 (lower is better). A last line per case, `headers`, gives each
//! raw peer with headers against the bare one: what the headers alone cost
//! the broker and librdkafka. On tansu that is most visible at 16x100,
//! where the id header alone cost the bare producer 10-23% (six runs).
//!
//! The Walden process runs with `role = "producer"`, so applying does not
//! compete with the write path for the two cores, and with one HTTP worker
//! (`server.http_workers = 1`; `WALDEN_BENCH_HTTP_WORKERS` to change it).
//! On two cores shared with tansu, the load client and librdkafka's broker
//! thread, a second worker costs more in wakeups and contention than it
//! adds: in alternating runs, 64x1 gave ratios 1.06 and 0.96 with one worker
//! against 1.01 and 0.82 with two, and four workers lost a quarter of the
//! throughput. At 16x100 one and two came out even (0.75 and 0.73 against
//! the bare peer with one; 0.74 and 0.80 with two).
//!
//! Every side is warm before the clock starts: Walden answers one write, a
//! raw producer delivers one record. Without that, a raw producer's first
//! send waited for its broker connection and producer id inside the timed
//! window (a few hundred ms of each 3 s run), and the ratios were 15-30% too
//! kind to Walden: 1x1 showed 1.15 rather than 0.96, 16x100 0.92 rather
//! than 0.70. (The 64x1 worker-count figures above were measured that way;
//! both Walden variants paid nothing extra, so their comparison stands.)
//!
//! How far 64x1 falls depends on the host. Where a core is slow (a host
//! on which the bare producer made 170-200k records/s at 16x100, not
//! 496k), 64x1 came out at 0.51-0.60 while 1x1 and 16x1 held at
//! 0.86-0.95. There the raw side waits on the broker (a third of the two
//! cores idle), and Walden's one HTTP worker is the bottleneck at about
//! 42 us of CPU per write: a third of it in the `send` of the response
//! (loopback TCP runs the client's receive path inline), an eighth in
//! Walden's own handler, the rest in actix-http and reading the request
//! (`perf record --call-graph dwarf -t <worker tid>`). Two workers did
//! worse (10-12k writes/s against 14-16k).
//!
//! `cargo bench --bench kafka`. Every run (each side, each round) gets a
//! tansu of its own, started empty on a free port from the binary
//! `scripts/test.sh` installs (`WALDEN_BENCH_TANSU_BIN` to name another).
//! tansu keeps everything in memory and slows down as it fills, and
//! Walden's write path feels a slower broker more than the raw producer
//! does: its writes reach librdkafka one HTTP answer at a time rather than
//! in bursts. librdkafka 2.12's idempotent producer sends no new
//! ProduceRequest to a partition that has five or more *messages* in flight
//! (in effect one request at a time; librdkafka PR #4989), and while a batch
//! is ready behind it, the broker thread polls in a loop (timeout 0). The
//! raw loop's writes arrive in bursts, between requests; Walden's trickle
//! in while one is in flight. At 64x1, `perf stat` counted 620k `poll`
//! calls in a Walden run against 67k in a raw one. On two shared cores
//! that spin takes CPU from the broker and the HTTP worker. On a
//! shared, filling broker the ratio at 64x1 fell from 0.87 to 0.56 over
//! eight runs while the raw side held steady. `WALDEN_BENCH_KAFKA=host:port`
//! uses that broker for every run instead.
//! `WALDEN_BENCH_SECS` per run (default 3); `WALDEN_BENCH_ROUNDS` runs per
//! side, taking turns (default 3); `WALDEN_BENCH_CASES`, e.g. `16x1,16x100`
//! (connections x batch); `WALDEN_BENCH_LIBRDKAFKA`, e.g. `linger.ms=5`:
//! extra producer options, given to every side; `WALDEN_BENCH_ONLY=walden`,
//! `raw`, `id` or `same` runs that side alone.
//!
//! Use tansu (in-memory), not noida-db: noida-db keeps every topic in one
//! JSON file that an `autosave` thread rewrites whole, so its CPU cost grows
//! with everything ever written to it and swamps both sides.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use walden::backends::kafka::KafkaSettings;
use walden::service::Spawned;

mod common;
use common::{Broker, Run, percentile};

const PAYLOAD: usize = 100;
const PARTITIONS: u32 = 4;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// `WALDEN_BENCH_HTTP_WORKERS`: the Walden side's `server.http_workers`.
fn http_workers() -> usize {
    env_or("WALDEN_BENCH_HTTP_WORKERS", "1")
        .parse()
        .unwrap_or(1)
}

/// `WALDEN_BENCH_LIBRDKAFKA`: `key=value` pairs, comma-separated.
fn extra_options() -> Vec<(String, String)> {
    env_or("WALDEN_BENCH_LIBRDKAFKA", "")
        .split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

fn topic(rt: &tokio::runtime::Runtime, brokers: &str, name: String) -> String {
    let settings = KafkaSettings {
        brokers: brokers.into(),
        topic: name.clone(),
        partitions: PARTITIONS,
        librdkafka: BTreeMap::new(),
        ack_timeout: Duration::from_secs(10),
    };
    rt.block_on(settings.ensure_topic())
        .expect("create the topic");
    name
}

fn walden(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    conns: usize,
    batch: usize,
    secs: u64,
) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let topic = topic(
        rt,
        brokers,
        format!("walden-bench-{}", uuid::Uuid::now_v7().simple()),
    );
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{}"
role = "producer"
http_workers = {}
max_in_flight = 100000
mailbox_capacity = 100000
[namespaces.bench]
shards = {PARTITIONS}
dedup_window_ms = 0
[namespaces.bench.backend]
type = "kafka"
brokers = "{brokers}"
topic = "{topic}"
[namespaces.bench.backend.librdkafka]
{}
[namespaces.bench.target]
type = "stdout"
"#,
        dir.path().display(),
        http_workers(),
        extra_options()
            .iter()
            .map(|(k, v)| format!("\"{k}\" = \"{v}\"\n"))
            .collect::<String>()
    );
    let svc = Spawned::start(walden::config::from_toml(&text).unwrap()).unwrap();
    common::warm_up(rt, svc.addr, "bench");
    let run = common::http_load(rt, svc.addr, "bench", conns, batch, PAYLOAD, secs);
    svc.stop();
    run
}

/// What the raw producer writes.
#[derive(Clone, Copy)]
enum Records {
    /// The key and the 100 B payload, nothing else.
    Bare,
    /// A bare record plus the one header the issue requires of every
    /// record: a fresh UUIDv7 in `walden.id`. Between this peer and `Bare`
    /// is what that header alone costs the broker and librdkafka.
    IdOnly,
    /// The records Walden writes for the same request: the payload as its
    /// JSON text (quoted), a fresh UUIDv7 in `walden.id` and
    /// `walden.payload: json`. Against this peer the ratio is the cost of
    /// Walden's write path alone, not of what the issue asks its records to
    /// carry.
    LikeWalden,
}

impl Records {
    /// The headers of one record, with entry id `id`; `None` for bare ones.
    fn headers(self, id: &str) -> Option<OwnedHeaders> {
        let with_id = |capacity| {
            OwnedHeaders::new_with_capacity(capacity).insert(Header {
                key: walden::backends::kafka::ID,
                value: Some(id.as_bytes()),
            })
        };
        match self {
            Records::Bare => None,
            Records::IdOnly => Some(with_id(1)),
            Records::LikeWalden => Some(with_id(2).insert(Header {
                key: walden::entry::PAYLOAD_ENCODING_HEADER,
                value: Some("json".as_bytes()),
            })),
        }
    }
}

/// `conns` tasks, each sending `batch` records at a time and waiting for
/// their delivery reports, as a Walden connection waits for its answer.
fn raw(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    records: Records,
    (conns, batch): (usize, usize),
    secs: u64,
) -> Run {
    let topic = topic(
        rt,
        brokers,
        format!("raw-bench-{}", uuid::Uuid::now_v7().simple()),
    );
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "1");
    for (k, v) in extra_options() {
        config.set(k, v);
    }
    let producer: FutureProducer = config.create().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let payload = match records {
        Records::Bare | Records::IdOnly => vec![b'p'; PAYLOAD],
        Records::LikeWalden => format!("\"{}\"", "p".repeat(PAYLOAD)).into_bytes(),
    };
    // Untimed, as Walden's warm-up write is: the first send waits for the
    // broker connection and the idempotent producer's id.
    rt.block_on(producer.send(
        FutureRecord::to(&topic).key("warm-up").payload(&payload),
        Duration::from_secs(10),
    ))
    .expect("the warm-up send");
    let start = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|c| {
            let (producer, topic, stop, payload) = (
                producer.clone(),
                topic.clone(),
                stop.clone(),
                payload.clone(),
            );
            rt.spawn(async move {
                let (mut writes, mut lat, mut i) = (0u64, Vec::new(), 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    let keys: Vec<String> = (0..batch).map(|j| format!("{c}-{i}-{j}")).collect();
                    let ids: Vec<String> = match records {
                        Records::Bare => Vec::new(),
                        Records::IdOnly | Records::LikeWalden => (0..batch)
                            .map(|_| uuid::Uuid::now_v7().to_string())
                            .collect(),
                    };
                    let sends = keys.iter().enumerate().map(|(j, k)| {
                        let mut record = FutureRecord::to(&topic).key(k).payload(&payload);
                        if let Some(headers) = ids.get(j).and_then(|id| records.headers(id)) {
                            record = record.headers(headers);
                        }
                        producer.send(record, Duration::from_secs(10))
                    });
                    for r in futures_util::future::join_all(sends).await {
                        r.expect("delivery report");
                    }
                    lat.push(t0.elapsed().as_micros() as u32);
                    writes += batch as u64;
                    i += 1;
                }
                (writes, lat)
            })
        })
        .collect();
    common::finish(rt, tasks, &stop, start, secs)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("kafka benchmark: run with `cargo bench --bench kafka`");
        return;
    }
    let brokers =
        std::env::var("WALDEN_BENCH_KAFKA").unwrap_or_else(|_| "a fresh tansu per run".to_string());
    let secs: u64 = env_or("WALDEN_BENCH_SECS", "3").parse().unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let workers = match http_workers() {
        0 => "one HTTP worker per core".to_string(),
        n => format!("{n} HTTP worker(s)"),
    };
    println!(
        "kafka benchmark against {brokers} ({secs} s per case, {PAYLOAD} B payloads, {PARTITIONS} partitions, {workers})"
    );
    // `WALDEN_BENCH_CASES=16x1,16x100` picks cases.
    let cases: Vec<(usize, usize)> = env_or("WALDEN_BENCH_CASES", "1x1,16x1,64x1,16x100")
        .split(',')
        .filter_map(|c| {
            let (conns, batch) = c.split_once('x')?;
            Some((conns.trim().parse().ok()?, batch.trim().parse().ok()?))
        })
        .collect();
    // `WALDEN_BENCH_ONLY=walden`, `=raw`, `=id` or `=same` runs one side only (for
    // profiling).
    let sides: Vec<Side> = match env_or("WALDEN_BENCH_ONLY", "").as_str() {
        "" => vec![
            Side::Walden,
            Side::Raw(Records::Bare),
            Side::Raw(Records::IdOnly),
            Side::Raw(Records::LikeWalden),
        ],
        "walden" => vec![Side::Walden],
        "raw" => vec![Side::Raw(Records::Bare)],
        "id" => vec![Side::Raw(Records::IdOnly)],
        "same" => vec![Side::Raw(Records::LikeWalden)],
        other => panic!("WALDEN_BENCH_ONLY={other:?}: give walden, raw, id or same"),
    };
    // Each side runs `rounds` times, in turn (Walden, raw, id, same, Walden,
    // ...), so drift in a shared machine hits them alike.
    let rounds: usize = env_or("WALDEN_BENCH_ROUNDS", "3").parse().unwrap_or(3);
    for (conns, batch) in cases {
        let mut runs: Vec<Vec<Run>> = sides.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for (side, runs) in sides.iter().zip(&mut runs) {
                let broker = Broker::for_run();
                runs.push(match side {
                    Side::Walden => walden(&rt, broker.addr(), conns, batch, secs),
                    Side::Raw(records) => raw(&rt, broker.addr(), *records, (conns, batch), secs),
                });
            }
        }
        let case = format!("kafka connections={conns} batch={batch}");
        let [w, peers @ ..] = runs.as_slice() else {
            unreachable!("at least one side")
        };
        if peers.is_empty() {
            println!(
                "{case} {}_per_s={:.0}",
                sides[0].name(),
                Run::merge(w).per_s()
            );
            continue;
        }
        for (side, peer) in sides[1..].iter().zip(peers) {
            println!("{case} peer={} {}", side.name(), compare(w, peer));
        }
        // The same client against a bare HTTP server with Walden's worker
        // count, answering with no work behind it: what HTTP alone allows,
        // so the per-request cost shows beside the broker's.
        let workers = match http_workers() {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let ceiling = common::Ceiling::start(workers);
        common::warm_up(&rt, ceiling.addr, "bench");
        let ceil = common::http_load(&rt, ceiling.addr, "bench", conns, batch, PAYLOAD, secs);
        ceiling.stop(&rt);
        let walden_per_s = Run::merge(w).per_s();
        println!(
            "{case} peer=http_ceiling walden_per_s={walden_per_s:.0} ceiling_per_s={:.0} ratio={:.2}",
            ceil.per_s(),
            walden_per_s / ceil.per_s()
        );
        // What the headers alone cost: each raw peer against the bare one.
        let raw_peers: Vec<(&Side, &Vec<Run>)> = sides[1..].iter().zip(peers).collect();
        let bare = raw_peers
            .iter()
            .find(|(side, _)| matches!(side, Side::Raw(Records::Bare)));
        if let Some((_, bare)) = bare
            && raw_peers.len() > 1
        {
            let bare = Run::merge(bare).per_s();
            let costs: Vec<String> = raw_peers
                .iter()
                .filter(|(side, _)| !matches!(side, Side::Raw(Records::Bare)))
                .map(|(side, runs)| {
                    format!("{}/raw={:.2}", side.name(), Run::merge(runs).per_s() / bare)
                })
                .collect();
            println!("{case} headers {}", costs.join(" "));
        }
    }
}

/// One side of a comparison.
enum Side {
    Walden,
    Raw(Records),
}

impl Side {
    fn name(&self) -> &'static str {
        match self {
            Side::Walden => "walden",
            Side::Raw(Records::Bare) => "raw",
            Side::Raw(Records::IdOnly) => "id_only",
            Side::Raw(Records::LikeWalden) => "same_records",
        }
    }
}

/// Walden's rounds beside a peer's: throughput, latency and their ratios.
fn compare(walden: &[Run], peer: &[Run]) -> String {
    // Each round's own ratio, to show how far the machine's noise moves it.
    let pairs: Vec<f64> = walden
        .iter()
        .zip(peer)
        .map(|(w, p)| w.per_s() / p.per_s())
        .collect();
    let (low, high) = (
        pairs.iter().copied().fold(f64::INFINITY, f64::min),
        pairs.iter().copied().fold(0.0, f64::max),
    );
    let (w, p) = (Run::merge(walden), Run::merge(peer));
    let (w99, p99) = (
        percentile(&w.latencies_us, 0.99),
        percentile(&p.latencies_us, 0.99),
    );
    format!(
        "walden_per_s={:.0} walden_p50_us={} walden_p99_us={w99} peer_per_s={:.0} peer_p50_us={} peer_p99_us={p99} ratio={:.2} round_ratios={low:.2}-{high:.2} p99_ratio={:.2}",
        w.per_s(),
        percentile(&w.latencies_us, 0.50),
        p.per_s(),
        percentile(&p.latencies_us, 0.50),
        w.per_s() / p.per_s(),
        f64::from(w99) / f64::from(p99.max(1)),
    )
}
