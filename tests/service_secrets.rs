//! No secret reaches the logs, the stats, `/metrics` or the DLQ: a real
//! `walden serve` with a password in its Postgres and Redis URLs, user info
//! and a token in an HTTP target's URL, and a forwarding token, made to fail
//! against each of them; then everything it printed or answers is searched
//! for the secrets.

mod common;

use std::time::Duration;

use common::target::HttpTarget;
use serde_json::json;

const SECRETS: &[&str] = &[
    "pg-secret-pw",
    "redis-secret-pw",
    "http-secret-pw",
    "query-secret-tok",
    "forward-secret-tok",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_stats_metrics_or_letters() {
    let dir = tempfile::tempdir().unwrap();
    let hook = HttpTarget::start();
    hook.reject_key("k", 422);
    let port = common::free_port();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
data_dir = "{dir}"
[namespaces.pg.backend]
type = "embedded"
[namespaces.pg.target]
type = "postgres"
url = "postgres://walden:pg-secret-pw@127.0.0.1:1/db"
table = "t"
[namespaces.rd.backend]
type = "embedded"
[namespaces.rd.target]
type = "redis"
url = "redis://:redis-secret-pw@127.0.0.1:1/0"
[namespaces.web.backend]
type = "embedded"
[namespaces.web.target]
type = "http"
url = "http://user:http-secret-pw@{hook}/apply?token=query-secret-tok"
[namespaces.web.retry]
max_attempts = 1
[namespaces.fwd.backend]
type = "embedded"
[namespaces.fwd.target]
type = "walden"
url = "http://127.0.0.1:1"
namespace = "x"
token = "forward-secret-tok"
"#,
        dir = dir.path().display(),
        hook = hook.addr,
    );
    let path = dir.path().join("walden.toml");
    std::fs::write(&path, text).unwrap();
    let log_path = dir.path().join("walden.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut walden = common::Walden(
        std::process::Command::new(env!("CARGO_BIN_EXE_walden"))
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    common::wait_healthy(port).await;
    let base = format!("http://127.0.0.1:{port}/v1/namespaces");
    for ns in ["pg", "rd", "web", "fwd"] {
        let payload = json!({"op": "put", "key": "k", "value": 1});
        let (status, body) = common::post(
            &format!("{base}/{ns}/log"),
            json!({"key": "k", "payload": payload}),
        )
        .await;
        assert_eq!(status, 200, "{ns}: {body}");
    }
    // Long enough for failed deliveries, health checks and a dead letter.
    common::eventually(
        "the web target's letter",
        Duration::from_secs(30),
        || async {
            let listed = common::get_json(&format!("{base}/web/dlq")).await;
            match listed["total"].as_u64() >= Some(1) {
                true => Ok(()),
                false => Err(listed.to_string()),
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut seen = String::new();
    for ns in ["pg", "rd", "web", "fwd"] {
        seen += &common::get_json(&format!("{base}/{ns}")).await.to_string();
        seen += &common::get_json(&format!("{base}/{ns}/dlq"))
            .await
            .to_string();
    }
    seen += &common::get_json(&base).await.to_string();
    seen += &reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    walden.kill().unwrap();
    walden.wait().unwrap();
    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logs.contains("Target is unhealthy"),
        "the targets failed: {logs}"
    );
    assert!(seen.contains("last_error"), "{seen}");
    for secret in SECRETS {
        assert!(
            !seen.contains(secret),
            "{secret} in the API's answers: {seen}"
        );
        assert!(!logs.contains(secret), "{secret} in the logs: {logs}");
    }
}
