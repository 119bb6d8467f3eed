//! A Kafka namespace over TLS, set through the `librdkafka` table
//! (`security.protocol`, `ssl.ca.location`). Neither test broker serves TLS
//! itself (tansu 0.6's `--cert` and `--key` refuse each other), so a TLS
//! terminator made here stands in front of tansu, which advertises it: every
//! connection librdkafka makes, bootstrap and broker, goes through TLS, and
//! the terminator speaks nothing else.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::broker::Tansu;
use common::tls::Ca;
use serde_json::json;
use walden::service::Spawned;

/// Accept TLS on `listener` with `cert`/`key`, and pass each connection to
/// `upstream` in plain text.
async fn terminate_tls(listener: tokio::net::TcpListener, upstream: u16, cert: &Path, key: &Path) {
    let cert = Arc::new(walden::tls::ServerCert::load(cert, key).unwrap());
    let config = walden::tls::server_config(cert, None).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let Ok(mut plain) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
            else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
        });
    }
}

fn config(data: &Path, brokers: &str, ca: Option<&Path>, out: &Path) -> walden::config::Config {
    let mut tls = "\"security.protocol\" = \"ssl\"\n".to_string();
    if let Some(ca) = ca {
        tls += &format!("\"ssl.ca.location\" = \"{}\"\n", ca.display());
    }
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nack_timeout_ms = 3000\n\
         [namespaces.ns]\nshards = 2\n\
         [namespaces.ns.backend]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{}\"\ngroup = \"{}\"\n\
         [namespaces.ns.backend.librdkafka]\n{tls}\
         [namespaces.ns.target]\ntype = \"file\"\npath = \"{}\"\n",
        data.display(),
        common::unique("tls"),
        common::unique("tls-group"),
        out.display(),
    );
    let config = walden::config::from_toml(&text).unwrap();
    walden::config::validate(&config).unwrap();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_namespace_speaks_tls_through_its_librdkafka_options() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    let Some(tansu) = Tansu::start_advertising(Some(proxy_port)) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Kafka test CA");
    let ca_pem = ca.write(dir.path(), "ca");
    let leaf = ca.server(dir.path(), "broker", &["127.0.0.1"]);
    tokio::spawn(async move { terminate_tls(listener, tansu.port, &leaf.cert, &leaf.key).await });
    let brokers = format!("127.0.0.1:{proxy_port}");

    // Trusting the CA: written, acknowledged, and delivered through the
    // consumer group.
    let out = dir.path().join("out.jsonl");
    let data = dir.path().join("data");
    let svc = tokio::task::spawn_blocking({
        let config = config(&data, &brokers, Some(&ca_pem), &out);
        move || Spawned::start(config).unwrap()
    })
    .await
    .unwrap();
    let base = format!("http://{}", svc.addr);
    for i in 0..5 {
        let (status, body) = common::post(
            &format!("{base}/v1/namespaces/ns/log"),
            json!({"key": format!("k{i}"), "payload": {"n": i}}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["durable"], "true");
    }
    common::eventually("the entries are delivered", Duration::from_secs(30), || {
        let out = out.clone();
        async move {
            let lines = std::fs::read_to_string(&out)
                .unwrap_or_default()
                .lines()
                .count();
            match lines >= 5 {
                true => Ok(()),
                false => Err(format!("{lines} of 5 delivered")),
            }
        }
    })
    .await;
    tokio::task::spawn_blocking(move || svc.stop())
        .await
        .unwrap();
}
