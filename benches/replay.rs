//! Replay, in one process and one run, on the embedded backend:
//!
//! - **throughput**: about 1 M entries (100 B payloads) are written to a
//!   namespace and applied to its file target. The service restarts with a
//!   second, new file target (`start = "earliest"`), and the time it takes
//!   to apply the whole backlog gives the live apply rate; then a replay of
//!   the same entries to a replay-only file target gives the replay rate.
//!   `ratio=` is replay ÷ live;
//! - **live latency**: paced single writes to an HTTP target, the p99 of
//!   each entry's delivery (the write's answer to its arrival), first with
//!   no replay, then while a replay of the backlog runs at the default
//!   `replay.max_per_s`. `ratio=` is with ÷ without (goal ≤ 2).
//!
//! `cargo bench --bench replay`. Environment: `WALDEN_BENCH_REPLAY_ENTRIES`
//! (default 1,000,000), `WALDEN_BENCH_SECS` (the latency phases, default
//! 5), `WALDEN_BENCH_DIR`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use walden::service::Spawned;

mod common;
use common::{env_u64, http_load, paced_latencies, percentile, receiver};

/// The namespace `bench` on `dir`: its live targets `targets`, the
/// replay-only file target `scratch`, and `extra` in its table.
fn service(dir: &Path, targets: &str, extra: &str) -> Spawned {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{0}\"\nmax_in_flight = 100000\nmailbox_capacity = 100000\n\
         [namespaces.bench]\nshards = 4\n{extra}\n[namespaces.bench.backend]\ntype = \"embedded\"\n{targets}\
         [namespaces.bench.targets.scratch]\ntype = \"file\"\npath = \"{0}/scratch.jsonl\"\nlive = false\n",
        dir.display()
    );
    let config = walden::config::from_toml(&text).expect("bench config");
    walden::config::validate(&config).expect("valid bench config");
    Spawned::start(config).expect("service starts")
}

fn file(dir: &Path, name: &str, start: &str) -> String {
    format!(
        "[namespaces.bench.targets.{name}]\ntype = \"file\"\npath = \"{}/{name}.jsonl\"\nstart = \"{start}\"\n",
        dir.display()
    )
}

async fn get(url: &str) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// Wait until target `name` has applied `n` entries since start.
async fn applied(addr: SocketAddr, name: &str, n: u64) {
    loop {
        let st = get(&format!("http://{addr}/v1/namespaces/bench")).await;
        let done = st["targets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == name && t["applied"].as_u64() >= Some(n));
        if done {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Start a replay of the whole log to `scratch`; its id.
async fn start_replay(addr: SocketAddr) -> String {
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/v1/namespaces/bench/replays"))
        .json(&json!({"from_ms": 0, "select": "written", "target": "scratch"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    v["replay"].as_str().unwrap().to_string()
}

fn main() {
    let n = env_u64("WALDEN_BENCH_REPLAY_ENTRIES", 1_000_000);
    let secs = env_u64("WALDEN_BENCH_SECS", 5);
    let base = std::env::var("WALDEN_BENCH_DIR").map_or_else(|_| std::env::temp_dir(), Into::into);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-client")
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir_in(&base).unwrap();
    let d = dir.path();
    // No pacing for the throughput phase: the replay's own speed.
    let unpaced = "[namespaces.bench.replay]\nmax_per_s = 100000000";

    // The backlog.
    let svc = service(d, &file(d, "a", "earliest"), unpaced);
    let mut written = 0;
    while written < n {
        written += http_load(&rt, svc.addr, "bench", 16, 100, 100, 1).writes;
    }
    rt.block_on(applied(svc.addr, "a", written));
    svc.stop();

    // Live: a new target applies the whole backlog.
    let targets = file(d, "a", "earliest") + &file(d, "b", "earliest");
    let svc = service(d, &targets, unpaced);
    let start = Instant::now();
    rt.block_on(applied(svc.addr, "b", written));
    let live_s = start.elapsed().as_secs_f64();

    // Replay: the same entries to the replay-only target.
    let start = Instant::now();
    let status = rt.block_on(async {
        let id = start_replay(svc.addr).await;
        loop {
            let st = get(&format!(
                "http://{}/v1/namespaces/bench/replays/{id}",
                svc.addr
            ))
            .await;
            if st["state"] != "running" {
                return st;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let replay_s = start.elapsed().as_secs_f64();
    svc.stop();
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["replayed"].as_u64(), Some(written), "{status}");
    let count = |name: &str| {
        let text = std::fs::read_to_string(d.join(format!("{name}.jsonl"))).unwrap();
        text.lines().count() as u64
    };
    assert_eq!(count("b"), written, "the new target has every entry");
    assert_eq!(
        count("scratch"),
        written,
        "the replay target has every entry"
    );
    let (live, replay) = (written as f64 / live_s, written as f64 / replay_s);
    println!(
        "replay throughput entries={written} live_apply_per_s={live:.0} replay_per_s={replay:.0} ratio={:.2}",
        replay / live
    );

    // Live latency, without and with a replay at the default pace.
    let probe = receiver();
    let targets = file(d, "a", "earliest")
        + &format!(
            "[namespaces.bench.targets.probe]\ntype = \"http\"\nurl = \"http://{}/\"\nstart = \"latest\"\n",
            probe.addr
        );
    let svc = service(d, &targets, "");
    let settle = Duration::from_secs(2);
    // A fresh process's first requests are slower (connections, caches).
    paced_latencies(&rt, svc.addr, "bench", &probe, "w", 1, settle);
    let quiet = paced_latencies(&rt, svc.addr, "bench", &probe, "q", secs, settle);
    let id = rt.block_on(start_replay(svc.addr));
    let busy = paced_latencies(&rt, svc.addr, "bench", &probe, "r", secs, settle);
    let st = rt.block_on(get(&format!(
        "http://{}/v1/namespaces/bench/replays/{id}",
        svc.addr
    )));
    svc.stop();
    let (p_quiet, p_busy) = (percentile(&quiet, 0.99), percentile(&busy, 0.99));
    println!(
        "replay live_latency p99_us_without={p_quiet} p99_us_during={p_busy} p50_without={} p50_during={} replayed_meanwhile={} ratio={:.2} (goal <= 2)",
        percentile(&quiet, 0.5),
        percentile(&busy, 0.5),
        st["replayed"],
        p_busy as f64 / p_quiet.max(1) as f64
    );
}
