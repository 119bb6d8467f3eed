//! Fan-out, in one process and one run, on the embedded backend:
//!
//! - **cost**: the same batches (100 B payloads, 16 × 100 in flight) to a
//!   namespace with one file target, then to one with two, each until every
//!   target has applied everything: applied/s per target, and the whole
//!   process's CPU per entry (user + system, client included). `ratio=` is
//!   two targets' CPU per entry ÷ one target's (goal ≤ 1.3). One round is
//!   a phase of each; rounds alternate the two, and the line gives the
//!   median round's ratio beside the lowest and highest, because one round
//!   on a shared 2-core host varies by ±15%;
//! - **isolation**: paced single writes to two HTTP targets; a healthy
//!   target's p99 delivery latency (from the write's answer to its arrival)
//!   with the other target up, then with it down. `ratio=` is down ÷ up
//!   (goal ≤ 1.5), the median of up to three rounds.
//!
//! `cargo bench --bench fanout`. Environment: `WALDEN_BENCH_SECS` (per
//! phase, default 5), `WALDEN_BENCH_ROUNDS` (cost rounds, default 5),
//! `WALDEN_BENCH_DIR`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use walden::service::Spawned;

mod common;
use common::{env_u64, http_load, paced_latencies, percentile, receiver};

/// This process's CPU time (user + system), in clock ticks (100 a second).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn service(dir: &Path, targets: &str) -> Spawned {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nmax_in_flight = 100000\nmailbox_capacity = 100000\n[namespaces.bench]\nshards = 4\n[namespaces.bench.backend]\ntype = \"embedded\"\n{targets}",
        dir.display()
    );
    let config = walden::config::from_toml(&text).expect("bench config");
    walden::config::validate(&config).expect("valid bench config");
    Spawned::start(config).expect("service starts")
}

async fn stats(addr: SocketAddr) -> Value {
    reqwest::get(format!("http://{addr}/v1/namespaces/bench"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Batches for `secs`, then wait until every target applied all of them:
/// (entries, seconds from the first write to the last apply, CPU ticks).
fn cost(rt: &tokio::runtime::Runtime, dir: &Path, targets: &str, secs: u64) -> (u64, f64, u64) {
    let svc = service(dir, targets);
    let (cpu, start) = (cpu_ticks(), Instant::now());
    let run = http_load(rt, svc.addr, "bench", 16, 100, 100, secs);
    rt.block_on(async {
        loop {
            let st = stats(svc.addr).await;
            let done = st["targets"]
                .as_array()
                .unwrap()
                .iter()
                .all(|t| t["applied"].as_u64() >= Some(run.writes));
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let (elapsed, ticks) = (start.elapsed().as_secs_f64(), cpu_ticks() - cpu);
    svc.stop();
    (run.writes, elapsed, ticks)
}

/// Paced single writes for `secs`; the healthy target's delivery latencies
/// (answer to arrival, µs), sorted.
fn isolation(rt: &tokio::runtime::Runtime, dir: &Path, other_up: bool, secs: u64) -> Vec<u32> {
    let healthy = receiver();
    let other = receiver();
    let other_url = match other_up {
        true => format!("http://{}/", other.addr),
        // Nothing listens there: connection refused, the breaker opens.
        false => format!("http://127.0.0.1:{}/", free_port()),
    };
    let targets = format!(
        "[namespaces.bench.targets.healthy]\ntype = \"http\"\nurl = \"http://{}/\"\n[namespaces.bench.targets.other]\ntype = \"http\"\nurl = \"{other_url}\"\ntimeout_ms = 1000\n",
        healthy.addr
    );
    let svc = service(dir, &targets);
    let lat = paced_latencies(
        rt,
        svc.addr,
        "bench",
        &healthy,
        "l",
        secs,
        Duration::from_secs(1),
    );
    svc.stop();
    lat
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn main() {
    let secs = env_u64("WALDEN_BENCH_SECS", 5);
    let base = std::env::var("WALDEN_BENCH_DIR").map_or_else(|_| std::env::temp_dir(), Into::into);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-client")
        .enable_all()
        .build()
        .unwrap();
    let file = |dir: &Path, name: &str| {
        format!(
            "[namespaces.bench.targets.{name}]\ntype = \"file\"\npath = \"{}/{name}.jsonl\"\n",
            dir.display()
        )
    };

    let rounds = env_u64("WALDEN_BENCH_ROUNDS", 5).max(1);
    let mut runs = Vec::new();
    for _ in 0..rounds {
        let one_dir = tempfile::tempdir_in(&base).unwrap();
        let (n1, s1, t1) = cost(&rt, one_dir.path(), &file(one_dir.path(), "a"), secs);
        let two_dir = tempfile::tempdir_in(&base).unwrap();
        let two = file(two_dir.path(), "a") + &file(two_dir.path(), "b");
        let (n2, s2, t2) = cost(&rt, two_dir.path(), &two, secs);
        let (cpu1, cpu2) = (
            t1 as f64 * 10_000.0 / n1 as f64,
            t2 as f64 * 10_000.0 / n2 as f64,
        );
        runs.push((cpu2 / cpu1, cpu1, cpu2, n1 as f64 / s1, n2 as f64 / s2));
    }
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (ratio, cpu1, cpu2, per_s1, per_s2) = runs[runs.len() / 2];
    println!(
        "fanout cost one_target_applied_per_s={per_s1:.0} two_targets_applied_per_s_each={per_s2:.0} cpu_us_per_entry_one={cpu1:.1} cpu_us_per_entry_two={cpu2:.1} rounds={rounds} lowest={:.2} highest={:.2} ratio={ratio:.2} (goal <= 1.3)",
        runs[0].0,
        runs[runs.len() - 1].0,
    );

    // Rounds of (up, down), as for the cost: one p99 of a few thousand
    // arrivals moves with a single stall of the host.
    let mut rounds_iso = Vec::new();
    for _ in 0..rounds.min(3) {
        let up_dir = tempfile::tempdir_in(&base).unwrap();
        let up = isolation(&rt, up_dir.path(), true, secs);
        let down_dir = tempfile::tempdir_in(&base).unwrap();
        let down = isolation(&rt, down_dir.path(), false, secs);
        let (p_up, p_down) = (percentile(&up, 0.99), percentile(&down, 0.99));
        let ratio = p_down as f64 / p_up.max(1) as f64;
        rounds_iso.push((
            ratio,
            p_up,
            p_down,
            percentile(&up, 0.5),
            percentile(&down, 0.5),
            down.len(),
        ));
    }
    rounds_iso.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (ratio, p_up, p_down, p50_up, p50_down, entries) = rounds_iso[rounds_iso.len() / 2];
    println!(
        "fanout isolation healthy_p99_us_other_up={p_up} healthy_p99_us_other_down={p_down} p50_up={p50_up} p50_down={p50_down} entries={entries} rounds={} lowest={:.2} highest={:.2} ratio={ratio:.2} (goal <= 1.5)",
        rounds_iso.len(),
        rounds_iso[0].0,
        rounds_iso[rounds_iso.len() - 1].0,
    );
}
