//! The API over HTTPS: a certificate from a private CA made here, the CLI's
//! `--cacert`, plain HTTP to the TLS port refused cleanly, mutual TLS, and a
//! SIGHUP that swaps the certificate (keeping the old one when the new
//! files do not load).

mod common;

use std::path::Path;
use std::time::Duration;

use common::tls::{Ca, Leaf};
use serde_json::{Value, json};

/// A config serving HTTPS on `port` with `leaf`; `client_ca` for mutual TLS.
fn config(dir: &Path, port: u16, leaf: &Leaf, client_ca: Option<&Path>) -> String {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n\n[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        dir.join("data").display(),
        leaf.cert.display(),
        leaf.key.display(),
    );
    if let Some(ca) = client_ca {
        text += &format!("client_ca = \"{}\"\n", ca.display());
    }
    text += &format!(
        "\n[namespaces.ns.backend]\ntype = \"embedded\"\n[namespaces.ns.target]\ntype = \"file\"\npath = \"{}\"\n",
        dir.join("ns.jsonl").display()
    );
    text
}

fn trusting(ca: &Path) -> reqwest::ClientBuilder {
    let pem = std::fs::read(ca).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .timeout(Duration::from_secs(5))
}

/// Wait until `client` gets an answer from `/healthz`.
async fn wait_up(client: &reqwest::Client, base: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match client.get(format!("{base}/healthz")).send().await {
            Ok(r) if r.status() == 200 => return,
            other => assert!(
                std::time::Instant::now() < deadline,
                "walden did not come up over HTTPS: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `walden write` against `base`, with these extra arguments.
async fn cli_write(base: &str, extra: &[&str]) -> std::process::Output {
    let mut args: Vec<String> = ["write", "ns", "--key", "k", "--url", base]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(r#"{"op":"put"}"#.into());
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_walden"))
            .args(&args)
            .env_remove("WALDEN_CACERT")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_private_ca_and_the_cli_s_cacert() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Walden test CA");
    let ca_pem = ca.write(dir.path(), "ca");
    let leaf = ca.server(dir.path(), "server", &["localhost", "127.0.0.1"]);
    let port = common::free_port();
    let path = dir.path().join("walden.toml");
    std::fs::write(&path, config(dir.path(), port, &leaf, None)).unwrap();
    let _walden = common::start_walden(&path);
    let base = format!("https://127.0.0.1:{port}");
    let client = trusting(&ca_pem).build().unwrap();
    wait_up(&client, &base).await;

    // The CLI with --cacert writes; without it the server is not trusted.
    let out = cli_write(&base, &["--cacert", ca_pem.to_str().unwrap()]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["durable"], "true");
    let out = cli_write(&base, &[]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("certificate"),
        "the refusal says why: {stderr}"
    );
    // A --cacert that is not a certificate is a clear error.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let out = cli_write(&base, &["--cacert", junk.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("junk.pem"));

    // A write through a client that trusts the CA, by name too.
    let resp = client
        .post(format!("https://localhost:{port}/v1/namespaces/ns/log"))
        .json(&json!({"key": "k", "payload": {"op": "put"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // Plain HTTP to the TLS port fails, and the server keeps serving.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await;
    assert!(
        plain.is_err() || plain.is_ok_and(|r| r.status().is_client_error()),
        "plain HTTP is not served on the TLS port"
    );
    wait_up(&client, &base).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_a_client_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Walden server CA");
    let ca_pem = ca.write(dir.path(), "ca");
    let leaf = ca.server(dir.path(), "server", &["127.0.0.1"]);
    let clients = Ca::new("Walden client CA");
    let clients_pem = clients.write(dir.path(), "client-ca");
    let port = common::free_port();
    let path = dir.path().join("walden.toml");
    std::fs::write(&path, config(dir.path(), port, &leaf, Some(&clients_pem))).unwrap();
    let _walden = common::start_walden(&path);
    let base = format!("https://127.0.0.1:{port}");
    let with_cert = trusting(&ca_pem)
        .identity(clients.client(dir.path(), "checkout").identity())
        .build()
        .unwrap();
    wait_up(&with_cert, &base).await;
    let resp = with_cert
        .post(format!("{base}/v1/namespaces/ns/log"))
        .json(&json!({"key": "k", "payload": {"op": "put"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let without = trusting(&ca_pem).build().unwrap();
    assert!(
        without.get(format!("{base}/healthz")).send().await.is_err(),
        "a client without a certificate is refused"
    );
    // A certificate from another CA is refused too.
    let stranger = Ca::new("Someone else");
    let other = trusting(&ca_pem)
        .identity(stranger.client(dir.path(), "stranger").identity())
        .build()
        .unwrap();
    assert!(other.get(format!("{base}/healthz")).send().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_swaps_the_certificate_and_a_bad_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = Ca::new("Old CA");
    let old_pem = old_ca.write(dir.path(), "old-ca");
    let new_ca = Ca::new("New CA");
    let new_pem = new_ca.write(dir.path(), "new-ca");
    // The files the config names, overwritten in place as a renewal would.
    let live = old_ca.server(dir.path(), "live", &["127.0.0.1"]);
    let port = common::free_port();
    let path = dir.path().join("walden.toml");
    std::fs::write(&path, config(dir.path(), port, &live, None)).unwrap();
    let walden = common::start_walden(&path);
    let base = format!("https://127.0.0.1:{port}");
    // Fresh clients each time: a pooled connection would keep its session.
    let healthy = |ca: &Path| {
        let client = trusting(ca).pool_max_idle_per_host(0).build().unwrap();
        let url = format!("{base}/healthz");
        async move { client.get(url).send().await.is_ok() }
    };
    wait_up(&trusting(&old_pem).build().unwrap(), &base).await;
    assert!(!healthy(&new_pem).await);
    let hup = || {
        assert!(
            std::process::Command::new("kill")
                .args(["-HUP", &walden.id().to_string()])
                .status()
                .unwrap()
                .success()
        )
    };

    let renewed = new_ca.server(dir.path(), "renewed", &["127.0.0.1"]);
    std::fs::copy(&renewed.cert, &live.cert).unwrap();
    std::fs::copy(&renewed.key, &live.key).unwrap();
    hup();
    common::eventually(
        "the new certificate is served",
        Duration::from_secs(10),
        || {
            let served = healthy(&new_pem);
            async move {
                match served.await {
                    true => Ok(()),
                    false => Err("the old one still is".to_string()),
                }
            }
        },
    )
    .await;
    assert!(!healthy(&old_pem).await, "the old certificate is gone");

    // A key that does not match, then a file that is not PEM: the
    // certificate in use stays.
    let stray = new_ca.server(dir.path(), "stray", &["127.0.0.1"]);
    std::fs::copy(&stray.key, &live.key).unwrap();
    hup();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(healthy(&new_pem).await);
    std::fs::write(&live.cert, "garbage").unwrap();
    hup();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(healthy(&new_pem).await, "the certificate in use stays");
}

#[test]
fn a_certificate_that_does_not_load_stops_the_start_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let leaf = Leaf {
        cert: dir.path().join("missing.crt"),
        key: dir.path().join("missing.key"),
    };
    let path = dir.path().join("walden.toml");
    std::fs::write(&path, config(dir.path(), 0, &leaf, None)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("server.tls") && stderr.contains("missing.crt"),
        "{stderr}"
    );
}
