//! Adaptive concurrency towards a target, in one process and one run: an
//! HTTP target that serves N requests at once (each for `WALDEN_BENCH_SERVICE_MS`,
//! default 10) and queues the rest gets a backlog of distinct keys, first
//! from a namespace with a fixed concurrency of N, then from one with the
//! adaptive default (starting at 1, between 1 and 256). Applied/s is from
//! the first entry written to the last applied. `ratio=` is adaptive ÷ fixed
//! (goal ≥ 0.9).
//!
//! `cargo bench --bench concurrency`. Environment: `WALDEN_BENCH_N`
//! (default 8), `WALDEN_BENCH_ENTRIES` (default 20000), `WALDEN_BENCH_DIR`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use walden::service::Spawned;

mod common;
use common::{env_u64, slow_target, write_backlog};

async fn target_stats(addr: SocketAddr) -> Value {
    let url = format!("http://{addr}/v1/namespaces/bench");
    let st: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    st["targets"][0].clone()
}

/// Write `entries` distinct keys, then wait until all are applied:
/// (applied/s, the limit's samples while applying).
fn drain(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    target: SocketAddr,
    concurrency: &str,
    entries: usize,
) -> (f64, Vec<u64>) {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[namespaces.bench]\nshards = 4\n[namespaces.bench.backend]\ntype = \"embedded\"\n[namespaces.bench.target]\ntype = \"http\"\nurl = \"http://{target}/\"\n[namespaces.bench.concurrency]\n{concurrency}\n",
        dir.display()
    );
    let config = walden::config::from_toml(&text).expect("bench config");
    walden::config::validate(&config).expect("valid bench config");
    let svc = Spawned::start(config).expect("service starts");
    let url = format!("http://{}/v1/namespaces/bench/log/batch", svc.addr);
    let out = rt.block_on(async {
        let start = Instant::now();
        write_backlog(&url, entries).await;
        let mut limits = Vec::new();
        loop {
            let t = target_stats(svc.addr).await;
            limits.push(t["concurrency"]["limit"].as_u64().unwrap_or(0));
            if t["applied"].as_u64() >= Some(entries as u64) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (entries as f64 / start.elapsed().as_secs_f64(), limits)
    });
    svc.stop();
    out
}

fn main() {
    let n = env_u64("WALDEN_BENCH_N", 8) as usize;
    let entries = env_u64("WALDEN_BENCH_ENTRIES", 20_000) as usize;
    let service = Duration::from_millis(env_u64("WALDEN_BENCH_SERVICE_MS", 10));
    let base = std::env::var("WALDEN_BENCH_DIR").map_or_else(|_| std::env::temp_dir(), Into::into);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (target, _) = slow_target(service, Some(n));
    let bound = n as f64 / service.as_secs_f64();

    let fixed_dir = tempfile::tempdir_in(&base).unwrap();
    let fixed = format!("adaptive = false\nmax = {n}");
    let (fixed_rate, _) = drain(&rt, fixed_dir.path(), target, &fixed, entries);
    let adaptive_dir = tempfile::tempdir_in(&base).unwrap();
    let (adaptive_rate, limits) = drain(&rt, adaptive_dir.path(), target, "", entries);
    if std::env::var("WALDEN_BENCH_TRACE").is_ok() {
        let again = tempfile::tempdir_in(&base).unwrap();
        let (fixed_again, _) = drain(&rt, again.path(), target, &fixed, entries);
        println!("fixed again: {fixed_again:.0}/s");
    }

    if std::env::var("WALDEN_BENCH_TRACE").is_ok() {
        println!("limit every 50 ms: {limits:?}");
    }
    let settled = &limits[limits.len() / 2..];
    let mean = settled.iter().sum::<u64>() as f64 / settled.len().max(1) as f64;
    println!(
        "target_concurrency capacity={n} service_ms={} bound={bound:.0}/s fixed={fixed_rate:.0}/s adaptive={adaptive_rate:.0}/s ratio={:.2} (goal >= 0.9) adaptive_limit_second_half_mean={mean:.1}",
        service.as_millis(),
        adaptive_rate / fixed_rate
    );
}
