//! Consumers scale out, on Kafka: a backlog on a namespace of 4 partitions
//! drains to an HTTP target that takes `WALDEN_BENCH_SERVICE_MS` (10) per
//! request and serves any number at once, first from one consumer process
//! (`role = "consumer"`), then, with a fresh backlog, from two in one
//! consumer group. Each holds at most 4 requests in flight to the target
//! (`concurrency.adaptive = false`, `max = 4`), so a process's pace is its
//! own limit, not the target's or the two cores'. Drain time runs from the
//! first entry's arrival to the last's: joining the group comes before it,
//! and tansu holds a new group's first join for about a session timeout
//! (45 s by librdkafka's default; 6 s here, as in the tests). A member that
//! joins after the first has begun is part of the drain. `ratio=` is two
//! consumers' drain time ÷ one's (goal ≤ 0.55: a second consumer halves
//! it). Each run also prints what `GET /scale` asked for 3 s into the drain.
//!
//! `cargo bench --bench scale`. Environment: `WALDEN_BENCH_ENTRIES`
//! (default 8000), `WALDEN_BENCH_KAFKA` (a broker to use instead of a fresh
//! tansu per run), `WALDEN_BENCH_TANSU_BIN`, `WALDEN_BENCH_DIR`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use walden::backends::kafka::KafkaSettings;
use walden::service::Spawned;

mod common;
use common::{Broker, env_u64, slow_target, write_backlog};

const PARTITIONS: u32 = 4;

fn walden(dir: &Path, role: &str, brokers: &str, topic: &str, target: SocketAddr) -> Spawned {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{}"
role = "{role}"
[namespaces.bench]
shards = {PARTITIONS}
[namespaces.bench.backend]
type = "kafka"
brokers = "{brokers}"
topic = "{topic}"
[namespaces.bench.backend.librdkafka]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "1000"
[namespaces.bench.target]
type = "http"
url = "http://{target}/"
[namespaces.bench.concurrency]
adaptive = false
max = 4
"#,
        dir.display()
    );
    let config = walden::config::from_toml(&text).expect("bench config");
    walden::config::validate(&config).expect("valid bench config");
    Spawned::start(config).expect("service starts")
}

/// Write a backlog of `entries`, then drain it with `consumers` processes:
/// (seconds from the first arrival to the last, what `/scale` asked for 3 s
/// into the drain).
fn drain(
    rt: &tokio::runtime::Runtime,
    base: &Path,
    consumers: usize,
    entries: usize,
    service: Duration,
) -> (f64, Value) {
    let broker = Broker::for_run();
    let topic = format!("walden-scale-{}", uuid::Uuid::now_v7().simple());
    let settings = KafkaSettings {
        brokers: broker.addr().into(),
        topic: topic.clone(),
        partitions: PARTITIONS,
        librdkafka: BTreeMap::new(),
        ack_timeout: Duration::from_secs(10),
    };
    rt.block_on(settings.ensure_topic())
        .expect("create the topic");
    let (target, seen) = slow_target(service, None);

    let dir = tempfile::tempdir_in(base).unwrap();
    let producer = walden(dir.path(), "producer", broker.addr(), &topic, target);
    let url = format!("http://{}/v1/namespaces/bench/log/batch", producer.addr);
    rt.block_on(write_backlog(&url, entries));
    producer.stop();

    let dirs: Vec<_> = (0..consumers)
        .map(|_| tempfile::tempdir_in(base).unwrap())
        .collect();
    let running: Vec<Spawned> = dirs
        .iter()
        .map(|d| walden(d.path(), "consumer", broker.addr(), &topic, target))
        .collect();
    let (first, scale) = rt.block_on(async {
        let url = format!("http://{}/v1/namespaces/bench/scale", running[0].addr);
        let mut first = None;
        let mut scale = Value::Null;
        loop {
            let arrived = seen.lock().unwrap().len();
            if arrived > 0 && first.is_none() {
                first = Some(Instant::now());
            }
            if let Some(since) = first {
                // The rate behind the signal is sampled over seconds.
                if scale.is_null() && since.elapsed() >= Duration::from_secs(3) {
                    scale = reqwest::get(&url).await.unwrap().json().await.unwrap();
                }
                if arrived >= entries {
                    return (since, scale);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let secs = first.elapsed().as_secs_f64();
    for r in running {
        r.stop();
    }
    (secs, scale)
}

fn main() {
    let entries = env_u64("WALDEN_BENCH_ENTRIES", 8_000) as usize;
    let service = Duration::from_millis(env_u64("WALDEN_BENCH_SERVICE_MS", 10));
    let base = std::env::var("WALDEN_BENCH_DIR").map_or_else(|_| std::env::temp_dir(), Into::into);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (one, one_scale) = drain(&rt, &base, 1, entries, service);
    let (two, two_scale) = drain(&rt, &base, 2, entries, service);
    let bound = 4.0 / service.as_secs_f64();
    println!(
        "consumers_drain entries={entries} one_consumer={one:.1}s two_consumers={two:.1}s ratio={:.2} (goal <= 0.55) per_process_bound={bound:.0}/s scale_with_one={} scale_with_two={}",
        two / one,
        one_scale["consumers"],
        two_scale["consumers"]
    );
}
