//! Helpers shared by the integration tests.
#![allow(dead_code)]

use bytes::Bytes;
use walden::backends::embedded::{EmbeddedLog, Record};
use walden::entry::{Entry, ShardRef};

pub fn entry(id: impl Into<String>, payload: impl AsRef<[u8]>) -> Entry {
    Entry {
        id: id.into(),
        key: Some("k".into()),
        headers: vec![("h".into(), "v".into())],
        payload: Bytes::copy_from_slice(payload.as_ref()),
        timestamp_ms: 0,
        due_ms: 0,
    }
}

/// Everything readable in `shard` from `from`, read without waiting.
pub fn read_all(log: &EmbeddedLog, shard: &ShardRef, from: u64) -> Vec<Record> {
    let mut r = log.reader(shard, from).expect("open reader");
    let mut out = Vec::new();
    loop {
        let batch = r.read_batch(1000).expect("read");
        if batch.is_empty() {
            return out;
        }
        out.extend(batch);
    }
}

pub fn payloads(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.entry.payload).into_owned())
        .collect()
}

use std::path::{Path, PathBuf};
use std::sync::Arc;
use walden::backends::embedded::LogConfig;
use walden::fs::SimFs;

pub const DIR: &str = "/data";

/// Open a log on a simulated filesystem.
pub fn open_sim(fs: &SimFs, config: LogConfig) -> EmbeddedLog {
    EmbeddedLog::open_with_fs(Arc::new(fs.clone()), DIR, config).expect("open on SimFs")
}

pub fn segment(dir: &Path, id: u64) -> PathBuf {
    dir.join("log").join(format!("{id:020}.seg"))
}

/// Small segments, so tests roll often.
pub fn small_segments() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        ..LogConfig::default()
    }
}

pub mod target;

/// A config with one namespace `ns` (embedded, `shards` shards) delivering to
/// the file at `path`.
pub fn file_target_config(data_dir: &Path, path: &Path, shards: u32) -> walden::config::Config {
    let target = format!("type = \"file\"\npath = \"{}\"", path.display());
    one_namespace(data_dir, shards, "", &target, "")
}

/// A config with one namespace `ns` (embedded, `shards` shards) delivering to
/// `target_url`; `extra` is appended to the namespace's table.
pub fn service_config(
    data_dir: &Path,
    target_url: &str,
    shards: u32,
    extra: &str,
) -> walden::config::Config {
    let target = format!("type = \"http\"\nurl = \"{target_url}\"");
    let retry =
        "[namespaces.ns.retry]\ninitial_backoff_ms = 20\nmax_backoff_ms = 200\nmax_attempts = 1000";
    one_namespace(data_dir, shards, extra, &target, retry)
}

/// One embedded namespace `ns`: `extra` in its table, `target` as its target
/// table's body, then `rest`. Parsed and validated.
fn one_namespace(
    data_dir: &Path,
    shards: u32,
    extra: &str,
    target: &str,
    rest: &str,
) -> walden::config::Config {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{}"

[namespaces.ns]
shards = {shards}
{extra}

[namespaces.ns.backend]
type = "embedded"

[namespaces.ns.target]
{target}

{rest}
"#,
        data_dir.display()
    );
    let config = walden::config::from_toml(&text).expect("test config parses");
    walden::config::validate(&config).expect("test config is valid");
    config
}

/// Make namespace `ns` fsync on a timer of `ms` instead of per batch.
pub fn interval_fsync(config: &mut walden::config::Config, ms: u64) {
    if let walden::config::BackendConfig::Embedded(e) =
        &mut config.namespaces.get_mut("ns").unwrap().backend
    {
        e.fsync = walden::config::FsyncSetting::Interval;
        e.fsync_interval_ms = ms;
    }
}

/// The URL of a test server from `var`, or `None` after saying loudly which
/// variable enables the test. `scripts/test.sh` always sets these; under
/// `CI=true` a missing one fails the test, so a broken install step cannot
/// pass unseen.
pub fn test_server(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{var} is not set, and CI=true: scripts/test.sh must start the server")
        }
        _ => {
            eprintln!("SKIPPED: {var} is not set; scripts/test.sh sets it and starts the server");
            None
        }
    }
}

/// A delivered mutation, as a sink receives it.
pub fn mutation(sequence: u64, payload: serde_json::Value) -> walden::entry::Delivered {
    walden::entry::Delivered {
        shard: ShardRef::new("ns", 0),
        sequence,
        entry: Arc::new(Entry {
            id: format!("m{sequence}"),
            payload: Bytes::from(payload.to_string()),
            ..Entry::default()
        }),
    }
}

/// POST `body` as JSON; the status and the JSON answer (`null` if none).
pub async fn post(url: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// POST `entries` to a batch endpoint (`…/log/batch`); the answer, after
/// checking that every entry was written.
pub async fn write_batch(url: &str, entries: &[serde_json::Value]) -> serde_json::Value {
    let (status, body) = post(url, serde_json::json!({ "entries": entries })).await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().expect("a batch answer");
    assert!(results.iter().all(|r| r["status"] == 200), "{body}");
    body
}

/// Actor restarts in every shard of namespace `ns` of the service at `base`.
pub async fn restarts(base: &str, ns: &str) -> u64 {
    let stats = get_json(&format!("{base}/v1/namespaces/{ns}")).await;
    stats["per_shard"]
        .as_array()
        .expect("per-shard stats")
        .iter()
        .map(|s| s["restarts"].as_u64().unwrap_or(0))
        .sum()
}

/// GET `url`; its JSON answer.
pub async fn get_json(url: &str) -> serde_json::Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// A short random suffix for table names, key prefixes and topics.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

pub mod broker;
pub mod proxy;
pub mod tls;

/// A free loopback port (for a `walden serve` child to listen on).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Start an SQS server (moto, `WALDEN_TEST_MOTO_BIN`) of the test's own on
/// `port`, for tests that stop it; waits until it listens.
pub fn start_moto(bin: &str, port: u16) -> std::process::Child {
    let child = std::process::Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start moto");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "moto did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child
}

/// Start the real `walden serve` binary on a config file.
pub fn start_walden(config: &Path) -> Walden {
    Walden(
        std::process::Command::new(env!("CARGO_BIN_EXE_walden"))
            .args(["serve", "--config"])
            .arg(config)
            .stdout(std::process::Stdio::null())
            .stderr(child_logs())
            .spawn()
            .unwrap(),
    )
}

/// A child's logs are dropped unless `WALDEN_TEST_CHILD_LOGS` is set, then
/// they go to the test's stderr.
fn child_logs() -> std::process::Stdio {
    if std::env::var_os("WALDEN_TEST_CHILD_LOGS").is_some() {
        std::process::Stdio::inherit()
    } else {
        std::process::Stdio::null()
    }
}

/// A `walden serve` child process, SIGKILLed when dropped, so a test that
/// fails half-way leaves none running.
pub struct Walden(pub std::process::Child);

impl std::ops::Deref for Walden {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Walden {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Walden {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wait until a service answers `/healthz` on `port`.
pub async fn wait_healthy(port: u16) {
    wait_healthy_within(port, std::time::Duration::from_secs(20)).await
}

/// Wait up to `limit` until a service answers `/healthz` on `port`.
pub async fn wait_healthy_within(port: u16, limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    let url = format!("http://127.0.0.1:{port}/healthz");
    while std::time::Instant::now() < deadline {
        if reqwest::get(&url).await.is_ok_and(|r| r.status() == 200) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("walden did not come up on port {port}");
}

/// Wait until `check` passes, polling every 100 ms; past `limit`, fail
/// with `what` and the check's last complaint.
pub async fn eventually<F, Fut>(what: &str, limit: std::time::Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        match check().await {
            Ok(()) => return,
            Err(e) if std::time::Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}

/// Walden's logs on stderr (the service's own subscriber, without OTLP),
/// which the test runner keeps and shows when the test fails. `RUST_LOG`
/// picks what; `info` by default.
pub fn show_logs() {
    let _ = walden::telemetry::init(&walden::config::OtelConfig::default());
}

/// A client of the test's own for the Postgres server at `url`.
pub async fn pg(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// A fresh table for a Postgres target (named from `prefix`), with a client
/// of the test's own that reads it.
pub async fn postgres_table(url: &str, prefix: &str) -> (tokio_postgres::Client, String) {
    let table = postgres_table_checked(url, prefix, "").await;
    (pg(url).await, table)
}

/// A fresh table for a Postgres target, with `check` (", CHECK (...)") as
/// an extra constraint when given.
pub async fn postgres_table_checked(url: &str, prefix: &str, check: &str) -> String {
    let table = unique(prefix);
    pg(url)
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (key TEXT PRIMARY KEY, value JSONB, version BIGINT NOT NULL, \
             deleted BOOLEAN NOT NULL DEFAULT false {check})"
        ))
        .await
        .unwrap();
    table
}

/// Each row of a Postgres target's table whose value is an integer: key →
/// value.
pub async fn postgres_values(
    client: &tokio_postgres::Client,
    table: &str,
) -> std::collections::HashMap<String, i64> {
    let rows = client
        .query(&format!("SELECT key, value FROM {table}"), &[])
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            let value: serde_json::Value = r.get(1);
            (r.get::<_, String>(0), value.as_i64().unwrap())
        })
        .collect()
}
