//! TLS towards the targets, against real servers started here with
//! certificates from a private CA made here:
//! - Postgres: a private cluster (`ssl = on`, plain connections refused),
//!   never the shared server; libpq's `verify-full`, `verify-ca` and
//!   `sslrootcert`;
//! - Redis: a private `redis-server` on a TLS port, `rediss://` with
//!   `ca_file`;
//! - HTTP: an HTTPS target trusted through `ca_file`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::tls::Ca;
use serde_json::json;
use walden::sinks::{HttpSink, PostgresSink, RedisSink, Sink};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A private Postgres cluster serving only TLS, stopped when dropped.
struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
}

impl Cluster {
    /// Start one with `cert`/`key`, or `None` (and say why) where it cannot
    /// be had: initdb refuses root, so this runs it as `postgres`.
    fn start(ca: &Ca, names: &[&str]) -> Option<Self> {
        let initdb = Path::new(PG_BIN).join("initdb");
        if !initdb.exists() || !Command::new("id").arg("postgres").status().ok()?.success() {
            eprintln!("SKIPPED: no {} or no postgres user", initdb.display());
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let leaf = ca.server(dir.path(), "server", names);
        let chown = |p: &Path| {
            assert!(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(p)
                    .status()
                    .unwrap()
                    .success()
            )
        };
        chown(dir.path());
        let as_postgres = |bin: &str| {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"])
                .arg(Path::new(PG_BIN).join(bin));
            c
        };
        let out = as_postgres("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = common::free_port();
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nfsync = off\n",
            dir.path().display(),
            leaf.cert.display(),
            leaf.key.display()
        );
        let mut text = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        text += &conf;
        std::fs::write(data.join("postgresql.conf"), text).unwrap();
        // TLS or nothing: a plain connection is refused.
        std::fs::write(
            data.join("pg_hba.conf"),
            "hostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        std::fs::set_permissions(
            &leaf.key,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        chown(dir.path());
        let out = as_postgres("pg_ctl")
            .args(["-w", "-t", "60", "-l"])
            .arg(dir.path().join("log"))
            .arg("-D")
            .arg(&data)
            .arg("start")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
        );
        Some(Self { dir, port })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Path::new(PG_BIN).join("pg_ctl"))
            .args(["-m", "immediate", "-D"])
            .arg(self.dir.path().join("data"))
            .arg("stop")
            .output();
    }
}

fn put(sequence: u64, key: &str) -> walden::entry::Delivered {
    common::mutation(
        sequence,
        json!({"op": "put", "key": key, "value": sequence}),
    )
}

fn pg_sink(url: &str) -> PostgresSink {
    PostgresSink::new("pg", url, "t", 2, Duration::from_secs(5)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_verify_full_and_verify_ca_hold_libpq_s_meaning() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Postgres test CA");
    let ca_pem = ca.write(dir.path(), "ca");
    // The certificate names `localhost` only, not 127.0.0.1.
    let Some(cluster) = Cluster::start(&ca, &["localhost"]) else {
        return;
    };
    let at = |host: &str, query: &str| {
        format!(
            "postgres://postgres@{host}:{}/postgres?{query}",
            cluster.port
        )
    };
    let root = format!("sslrootcert={}", ca_pem.display());
    // Create the table through a verified connection of Walden's own kind.
    let setup = pg_sink(&at("localhost", &format!("sslmode=verify-full&{root}")));
    assert!(setup.healthcheck().await.is_err(), "no table yet");
    {
        let tls = walden::tls::client_config(walden::tls::Verify::Full, Some(&ca_pem)).unwrap();
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "host=localhost port={} user=postgres dbname=postgres sslmode=require",
                cluster.port
            ),
            tokio_postgres_rustls::MakeRustlsConnect::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(
                "CREATE TABLE t (key TEXT PRIMARY KEY, value JSONB, version BIGINT NOT NULL, deleted BOOLEAN NOT NULL DEFAULT false)",
            )
            .await
            .unwrap();
    }

    // verify-full: the CA and the name check out.
    let results = setup.apply(&[put(1, "a")]).await;
    assert!(results[0].is_ok(), "{:?}", results[0]);

    // verify-full to an address the certificate does not name: refused.
    let wrong_name = pg_sink(&at("127.0.0.1", &format!("sslmode=verify-full&{root}")));
    let e = wrong_name
        .apply(&[put(2, "b")])
        .await
        .remove(0)
        .unwrap_err();
    assert!(e.to_string().contains("certificate"), "{e}");
    // verify-ca checks the chain only, as libpq; so does require with a root.
    for mode in ["verify-ca", "require"] {
        let chain_only = pg_sink(&at("127.0.0.1", &format!("sslmode={mode}&{root}")));
        let r = chain_only.apply(&[put(3, "c")]).await.remove(0);
        assert!(r.is_ok(), "{mode}: {r:?}");
    }

    // A CA that did not sign the server's certificate: refused.
    let stranger = Ca::new("Someone else").write(dir.path(), "stranger");
    let untrusted = pg_sink(&at(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", stranger.display()),
    ));
    let e = untrusted.apply(&[put(4, "d")]).await.remove(0).unwrap_err();
    assert!(e.to_string().contains("certificate"), "{e}");

    // require alone encrypts without checking; disable is refused by the
    // server, which takes TLS only.
    let unchecked = pg_sink(&at("127.0.0.1", "sslmode=require"));
    assert!(unchecked.apply(&[put(5, "e")]).await.remove(0).is_ok());
    let plain = pg_sink(&at("127.0.0.1", "sslmode=disable"));
    assert!(plain.apply(&[put(6, "f")]).await.remove(0).is_err());
}

/// A private `redis-server` serving TLS only, stopped when dropped.
struct TlsRedis {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TlsRedis {
    fn start(ca: &Ca, ca_pem: &Path) -> Option<Self> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("SKIPPED: no redis-server");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let leaf = ca.server(dir.path(), "redis", &["127.0.0.1"]);
        let port = common::free_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendonly", "no"])
            .args(["--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(&leaf.cert)
            .arg("--tls-key-file")
            .arg(&leaf.key)
            .arg("--tls-ca-cert-file")
            .arg(ca_pem)
            .args(["--tls-auth-clients", "no", "--dir"])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start with TLS"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Self {
            child,
            port,
            _dir: dir,
        })
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Redis test CA");
    let ca_pem = ca.write(dir.path(), "ca");
    let Some(redis) = TlsRedis::start(&ca, &ca_pem) else {
        return;
    };
    let sink = |url: String, ca_file: Option<&Path>| {
        RedisSink::new("redis", &url, "tls:", Duration::from_secs(3), ca_file).unwrap()
    };
    let tls_url = format!("rediss://127.0.0.1:{}", redis.port);
    let trusted = sink(tls_url.clone(), Some(&ca_pem));
    let r = trusted.apply(&[put(1, "a")]).await.remove(0);
    assert!(r.is_ok(), "{r:?}");

    // The system's roots alone do not trust a private CA.
    let untrusted = sink(tls_url, None);
    assert!(untrusted.apply(&[put(2, "b")]).await.remove(0).is_err());
    // Plain Redis to the TLS port gets nowhere.
    let plain = sink(format!("redis://127.0.0.1:{}", redis.port), None);
    assert!(plain.apply(&[put(3, "c")]).await.remove(0).is_err());
}

/// An HTTPS target counting what it is sent.
async fn https_target(dir: &Path, ca: &Ca) -> (u16, Arc<AtomicU64>, actix_web::dev::ServerHandle) {
    let leaf = ca.server(dir, "target", &["127.0.0.1"]);
    let cert = Arc::new(walden::tls::ServerCert::load(&leaf.cert, &leaf.key).unwrap());
    let config = walden::tls::server_config(cert, None).unwrap();
    let got = Arc::new(AtomicU64::new(0));
    let counter = got.clone();
    let server = actix_web::HttpServer::new(move || {
        let counter = counter.clone();
        actix_web::App::new().default_service(actix_web::web::to(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { actix_web::HttpResponse::Ok().finish() }
        }))
    })
    .workers(1)
    .bind_rustls_0_23("127.0.0.1:0", config)
    .unwrap();
    let port = server.addrs()[0].port();
    let server = server.run();
    let handle = server.handle();
    tokio::spawn(server);
    (port, got, handle)
}

#[actix_web::test]
async fn an_http_target_is_trusted_through_its_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Target CA");
    let ca_pem: PathBuf = ca.write(dir.path(), "ca");
    let (port, got, server) = https_target(dir.path(), &ca).await;
    let url = format!("https://127.0.0.1:{port}/apply");
    let trusted = HttpSink::new("http", &url, Duration::from_secs(5), Some(&ca_pem)).unwrap();
    let r = trusted.apply(&[put(1, "a")]).await.remove(0);
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(got.load(Ordering::SeqCst), 1);

    let untrusted = HttpSink::new("http", &url, Duration::from_secs(5), None).unwrap();
    let e = untrusted.apply(&[put(2, "b")]).await.remove(0).unwrap_err();
    assert_eq!(got.load(Ordering::SeqCst), 1, "nothing reached it: {e}");

    // A ca_file that is not PEM is a clear error at start, naming it.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "nope").unwrap();
    let e = HttpSink::new("http", &url, Duration::from_secs(5), Some(&junk))
        .err()
        .unwrap();
    assert!(e.to_string().contains("junk.pem"), "{e}");
    server.stop(false).await;
}
