//! Memory stays bounded however much waits on disk: a restarted `walden
//! serve` holding 1 GB of overdue delayed entries, 1 GB parked behind one
//! key, or 1 GB of dead letters being redriven, and one holding a target
//! that is down 1 GB behind a healthy one, peaks at no more than its idle
//! footprint plus 256 MiB (VmHWM, the resident high-water mark).
//!
//! Slow (each case writes a gigabyte), so `#[ignore]`d; run by hand:
//!
//! ```sh
//! cargo test --test memory_bounds -- --ignored --nocapture --test-threads 1
//! ```
//!
//! `WALDEN_MEMORY_GB` sets the size (1 by default; 1 KiB payloads, about a
//! million entries per GB).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::target::HttpTarget;
use common::{Walden, free_port, start_walden, wait_healthy, wait_healthy_within};
use serde_json::{Value, json};

const BOUND: u64 = 256 << 20;

fn entries() -> usize {
    let gb: f64 = std::env::var("WALDEN_MEMORY_GB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    (gb * 1_000_000.0) as usize
}

fn config(data: &Path, port: u16, target: &str, extra: &str) -> std::path::PathBuf {
    let path = data.with_extension(format!("{port}.toml"));
    // One HTTP target at `target`, or none here (`extra` has `targets`).
    let target = match target {
        "" => String::new(),
        url => format!("[namespaces.ns.target]\ntype = \"http\"\nurl = \"{url}\""),
    };
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
data_dir = "{}"
max_in_flight = 20000
[namespaces.ns]
shards = 4
[namespaces.ns.backend]
type = "embedded"
{target}
[namespaces.ns.limits]
max_batch_entries = 2000
[namespaces.ns.retry]
initial_backoff_ms = 50
max_backoff_ms = 2000
max_attempts = 1000000
park_after_ms = 1000
{extra}
"#,
        data.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Resident memory of `pid`: (now, high-water mark), in bytes.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The high-water mark of a fresh process on an empty data dir, a few
/// seconds after it starts: the idle footprint.
async fn idle(target: &str, extra: &str) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = start_walden(&config(&dir.path().join("data"), port, target, extra));
    wait_healthy(port).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    rss(child.id()).1
}

/// Write `n` entries of 1 KiB, `make(i)` giving each one's JSON (without
/// payload), 2,000 a batch, four batches at a time.
async fn write(port: u16, n: usize, make: impl Fn(usize) -> Value + Send + Sync + 'static) {
    let make = std::sync::Arc::new(make);
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/v1/namespaces/ns/log/batch");
    let payload = "x".repeat(1000);
    let started = Instant::now();
    let batches: Vec<(usize, usize)> = (0..n)
        .step_by(2000)
        .map(|i| (i, (i + 2000).min(n)))
        .collect();
    for group in batches.chunks(4) {
        let sends = group.iter().map(|&(from, to)| {
            let (client, url, make, payload) =
                (client.clone(), url.clone(), make.clone(), payload.clone());
            async move {
                let entries: Vec<Value> = (from..to)
                    .map(|i| {
                        let mut e = make(i);
                        e["payload"] = payload.clone().into();
                        e
                    })
                    .collect();
                loop {
                    let r = client
                        .post(&url)
                        .json(&json!({ "entries": entries }))
                        .send()
                        .await;
                    let Ok(r) = r else { continue };
                    let body: Value = r.json().await.unwrap();
                    let results = body["results"].as_array().unwrap();
                    if results.iter().all(|r| r["status"] == 200) {
                        break;
                    }
                    // Shed (429): a full mailbox; go again.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        });
        futures_util::future::join_all(sends).await;
    }
    eprintln!("wrote {n} entries in {:?}", started.elapsed());
}

async fn stats(port: u16) -> Value {
    reqwest::get(format!("http://127.0.0.1:{port}/v1/namespaces/ns"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn until(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Start on `data`, let it work for `secs`, and report its high-water mark
/// against `idle`.
async fn peak_after_restart(
    case: &str,
    data: &Path,
    target: &str,
    extra: &str,
    idle: u64,
    work: impl AsyncFnOnce(u16),
) {
    let port = free_port();
    let child = start_walden(&config(data, port, target, extra));
    // It reads its DLQ and its idempotency window back at start.
    wait_healthy_within(port, Duration::from_secs(600)).await;
    work(port).await;
    let (now, peak) = rss(child.id());
    let over = peak.saturating_sub(idle);
    eprintln!(
        "{case}: idle {} MiB, peak {} MiB (+{} MiB), now {} MiB; bound +{} MiB",
        idle >> 20,
        peak >> 20,
        over >> 20,
        now >> 20,
        BOUND >> 20
    );
    assert!(
        over <= BOUND,
        "{case}: the peak is {} MiB over idle",
        over >> 20
    );
}

fn stop(mut w: Walden) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &w.id().to_string()])
        .status();
    let _ = w.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes a gigabyte; run by hand"]
async fn a_gigabyte_of_overdue_delays_stays_on_disk() {
    let n = entries();
    let target = HttpTarget::start();
    let extra = "[namespaces.ns.delay]\ncatch_up_per_s = 50";
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let first = start_walden(&config(&data, port, &target.url(), extra));
    wait_healthy(port).await;
    // Due well after the last is written (writing takes about two minutes),
    // so none fires before the stop.
    let delay = Duration::from_secs(240);
    let delay_ms = delay.as_millis() as u64;
    write(
        port,
        n,
        move |i| json!({"key": format!("k{i}"), "lifecycle": {"delay_ms": delay_ms}}),
    )
    .await;
    let written = tokio::time::Instant::now();
    until(
        "every entry delayed",
        Duration::from_secs(600),
        async || stats(port).await["delayed"].as_u64() == Some(n as u64),
    )
    .await;
    stop(first);
    // Overdue when it starts again, the last one written too.
    tokio::time::sleep_until(written + delay + Duration::from_secs(5)).await;
    let idle = idle(&target.url(), extra).await;
    peak_after_restart(
        "overdue delays",
        &data,
        &target.url(),
        extra,
        idle,
        async |_| {
            tokio::time::sleep(Duration::from_secs(30)).await;
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes a gigabyte; run by hand"]
async fn a_gigabyte_parked_behind_one_key_stays_on_disk() {
    let n = entries();
    let target = HttpTarget::start();
    // The key's head fails every 2 s: each retry comes back from the store.
    target.reject_key_for("P", 503, Some(2));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let first = start_walden(&config(&data, port, &target.url(), ""));
    wait_healthy(port).await;
    write(port, n, |_| json!({"key": "P"})).await;
    until(
        "every entry parked",
        Duration::from_secs(1200),
        async || stats(port).await["pending"].as_u64() == Some(0),
    )
    .await;
    stop(first);
    let idle = idle(&target.url(), "").await;
    peak_after_restart(
        "parked behind one key",
        &data,
        &target.url(),
        "",
        idle,
        async |_| {
            tokio::time::sleep(Duration::from_secs(30)).await;
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes a gigabyte; run by hand"]
async fn a_gigabyte_of_dead_letters_is_redriven_a_page_at_a_time() {
    let n = entries();
    let target = HttpTarget::start();
    for k in 0..100 {
        target.reject_key(&format!("d{k}"), 422);
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let first = start_walden(&config(&data, port, &target.url(), ""));
    wait_healthy(port).await;
    write(port, n, |i| json!({"key": format!("d{}", i % 100)})).await;
    let dlq = |port: u16| async move {
        let v: Value = reqwest::get(format!(
            "http://127.0.0.1:{port}/v1/namespaces/ns/dlq?limit=0"
        ))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        v["total"].as_u64().unwrap_or(0)
    };
    until(
        "every entry dead-lettered",
        Duration::from_secs(1800),
        async || dlq(port).await == n as u64,
    )
    .await;
    stop(first);
    let idle = idle(&target.url(), "").await;
    // The target still refuses them: the redrive goes through all of them,
    // and they stay.
    peak_after_restart(
        "a redrive of the DLQ",
        &data,
        &target.url(),
        "",
        idle,
        async |port| {
            let r = reqwest::Client::builder()
                .timeout(Duration::from_secs(3600))
                .build()
                .unwrap()
                .post(format!(
                    "http://127.0.0.1:{port}/v1/namespaces/ns/dlq/redrive"
                ))
                .json(&json!({"all": true}))
                .send()
                .await
                .unwrap();
            let body: Value = r.json().await.unwrap();
            eprintln!("redrive: {}", body["redriven"]);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes a gigabyte; run by hand"]
async fn a_target_a_gigabyte_behind_holds_no_more_than_the_bound() {
    let healthy = HttpTarget::start();
    // Nothing listens there: the second target is down all along.
    let targets = format!(
        "[namespaces.ns.targets.up]\ntype = \"http\"\nurl = \"{}\"\n[namespaces.ns.targets.down]\ntype = \"http\"\nurl = \"http://127.0.0.1:{}/\"\ntimeout_ms = 1000\n",
        healthy.url(),
        free_port()
    );
    let idle = idle("", &targets).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = start_walden(&config(&dir.path().join("data"), port, "", &targets));
    wait_healthy(port).await;
    let n = entries();
    write(port, n, |i| json!({"key": format!("k{}", i % 1000)})).await;
    until(
        "the healthy target applied everything",
        Duration::from_secs(900),
        async || {
            let st = stats(port).await;
            st["targets"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["name"] == "up" && t["applied"] == n)
        },
    )
    .await;
    let st = stats(port).await;
    let down = st["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "down")
        .unwrap()
        .clone();
    assert_eq!(
        down["pending"], n,
        "the down target is a gigabyte behind: {st}"
    );
    let (now, peak) = rss(child.id());
    let over = peak.saturating_sub(idle);
    eprintln!(
        "a target 1 GB behind: idle {} MiB, peak {} MiB (+{} MiB), now {} MiB; bound +{} MiB",
        idle >> 20,
        peak >> 20,
        over >> 20,
        now >> 20,
        BOUND >> 20
    );
    assert!(over <= BOUND, "the peak is {} MiB over idle", over >> 20);
    stop(child);
}
