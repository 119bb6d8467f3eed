//! Who may call what: every route of the table is walked without a token
//! (401), with an unknown one (401), with one for another namespace or
//! without the scope (403), and with the right one (through); listings
//! answer only for the token's namespaces; with no tokens Walden stays on
//! loopback unless told otherwise.

use actix_web::http::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use walden::api::auth::{Access, ENDPOINTS};
use walden::config::Scope;
use walden::service::Spawned;

const TOKENS: &[(&str, &str, &str, &str)] = &[
    // name, token, namespaces, scopes
    ("writer", "tok-writer", r#"["ns"]"#, r#"["write"]"#),
    ("reader", "tok-reader", r#"["ns"]"#, r#"["read"]"#),
    ("admin", "tok-admin", r#"["ns"]"#, r#"["admin"]"#),
    ("everyone", "tok-everyone", r#"["*"]"#, r#"["read"]"#),
    (
        "other",
        "tok-other",
        r#"["other"]"#,
        r#"["write", "read", "admin"]"#,
    ),
];

fn config(dir: &std::path::Path, listen: &str, tokens: bool, extra: &str) -> String {
    let mut text = format!(
        "[server]\nlisten = \"{listen}\"\ndata_dir = \"{}\"\n{extra}\n",
        dir.display()
    );
    if tokens {
        for (name, token, namespaces, scopes) in TOKENS {
            let sha256 = hex::encode(Sha256::digest(token.as_bytes()));
            text += &format!(
                "[[server.tokens]]\nname = \"{name}\"\nsha256 = \"{sha256}\"\nnamespaces = {namespaces}\nscopes = {scopes}\n"
            );
        }
    }
    for ns in ["ns", "other"] {
        text += &format!(
            "[namespaces.{ns}.backend]\ntype = \"embedded\"\n[namespaces.{ns}.target]\ntype = \"file\"\npath = \"{}/{ns}.jsonl\"\n",
            dir.display()
        );
    }
    text
}

/// Call `endpoint` on namespace `ns` with `token`; the status and body.
async fn call(base: &str, method: &Method, path: &str, token: Option<&str>) -> (u16, Value) {
    let url = format!("{base}{}", path.replace("{ns}", "ns").replace("{id}", "x"));
    let client = reqwest::Client::new();
    let method = reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap();
    let mut req = client.request(method.clone(), &url);
    if method == reqwest::Method::POST {
        req = req.json(&json!({}));
    }
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn holding(scope: Scope) -> &'static str {
    match scope {
        Scope::Write => "tok-writer",
        Scope::Read => "tok-reader",
        Scope::Admin => "tok-admin",
    }
}

fn lacking(scope: Scope) -> &'static str {
    match scope {
        Scope::Write => "tok-reader",
        Scope::Read | Scope::Admin => "tok-writer",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_asks_for_its_scope_on_its_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = walden::config::from_toml(&config(dir.path(), "127.0.0.1:0", true, "")).unwrap();
    walden::config::validate(&cfg).unwrap();
    let svc = Spawned::start(cfg).unwrap();
    let base = format!("http://{}", svc.addr);
    for e in ENDPOINTS {
        let (m, p) = (&e.method, e.path);
        let through = |status: u16| status != 401 && status != 403;
        match e.access {
            Access::Open => {
                let (status, body) = call(&base, m, p, None).await;
                assert!(through(status), "{m} {p} is open: {status} {body}");
            }
            Access::Scoped(scope) => {
                let (status, body) = call(&base, m, p, None).await;
                assert_eq!(status, 401, "{m} {p} without a token: {body}");
                assert_eq!(body["durable"], "false", "{body}");
                let (status, _) = call(&base, m, p, Some("not-a-token")).await;
                assert_eq!(status, 401, "{m} {p} with an unknown token");
                let (status, body) = call(&base, m, p, Some("tok-other")).await;
                assert_eq!(
                    status, 403,
                    "{m} {p} with another namespace's token: {body}"
                );
                let (status, body) = call(&base, m, p, Some(lacking(scope))).await;
                assert_eq!(status, 403, "{m} {p} without {scope:?}: {body}");
                let (status, body) = call(&base, m, p, Some(holding(scope))).await;
                assert!(through(status), "{m} {p} with {scope:?}: {status} {body}");
            }
            Access::ReadListed => {
                assert_eq!(call(&base, m, p, None).await.0, 401, "{m} {p}");
                assert_eq!(
                    call(&base, m, p, Some("tok-writer")).await.0,
                    403,
                    "{m} {p}"
                );
                let names = |v: &Value| -> Vec<String> {
                    v["namespaces"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|n| n["namespace"].as_str().unwrap().to_string())
                        .collect()
                };
                let (status, body) = call(&base, m, p, Some("tok-reader")).await;
                assert_eq!((status, names(&body)), (200, vec!["ns".to_string()]));
                let (status, body) = call(&base, m, p, Some("tok-everyone")).await;
                assert_eq!(status, 200);
                assert_eq!(names(&body), vec!["ns".to_string(), "other".to_string()]);
            }
            Access::Metrics => {
                assert_eq!(call(&base, m, p, None).await.0, 401, "{m} {p}");
                assert_eq!(
                    call(&base, m, p, Some("tok-reader")).await.0,
                    403,
                    "{m} {p}"
                );
                assert_eq!(
                    call(&base, m, p, Some("tok-everyone")).await.0,
                    200,
                    "{m} {p}"
                );
            }
        }
    }
    // A write with the right token is a write.
    let answer: Value = reqwest::Client::new()
        .post(format!("{base}/v1/namespaces/ns/log"))
        .bearer_auth("tok-writer")
        .json(&json!({"payload": {"a": 1}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["durable"], "true", "{answer}");
    svc.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_may_be_public() {
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path(), "127.0.0.1:0", true, "metrics_public = true");
    let svc = Spawned::start(walden::config::from_toml(&text).unwrap()).unwrap();
    let base = format!("http://{}", svc.addr);
    assert_eq!(call(&base, &Method::GET, "/metrics", None).await.0, 200);
    assert_eq!(
        call(&base, &Method::GET, "/v1/namespaces", None).await.0,
        401
    );
    svc.stop();
}

#[test]
fn listening_beyond_loopback_needs_tokens_or_a_choice() {
    let dir = tempfile::tempdir().unwrap();
    let check = |listen: &str, tokens: bool, extra: &str| {
        let text = config(dir.path(), listen, tokens, extra);
        walden::config::validate(&walden::config::from_toml(&text).unwrap())
    };
    let refused = check("0.0.0.0:7070", false, "").expect_err("0.0.0.0 without tokens");
    assert!(
        refused
            .0
            .iter()
            .any(|e| e.field == "server.listen" && e.message.contains("allow_unauthenticated")),
        "{refused:?}"
    );
    check("0.0.0.0:7070", true, "").expect("with tokens");
    check("0.0.0.0:7070", false, "allow_unauthenticated = true").expect("on purpose");
    check("127.0.0.1:7070", false, "").expect("loopback");
    check("[::1]:7070", false, "").expect("loopback v6");
    // `walden serve` says so and stops.
    let path = dir.path().join("walden.toml");
    std::fs::write(&path, config(dir.path(), "0.0.0.0:0", false, "")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("server.listen") && err.contains("tokens"),
        "{err}"
    );
}

#[test]
fn a_new_token_prints_its_config_lines() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walden"))
        .args([
            "token",
            "new",
            "checkout",
            "--namespaces",
            "orders,payments",
            "--scopes",
            "write",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let lines = String::from_utf8_lossy(&out.stderr).into_owned();
    let sha256 = hex::encode(Sha256::digest(token.as_bytes()));
    assert!(lines.contains(&format!("sha256 = \"{sha256}\"")), "{lines}");
    assert!(
        lines.contains(r#"namespaces = ["orders", "payments"]"#),
        "{lines}"
    );
    assert!(
        !lines.contains(&token),
        "the config lines never hold the token"
    );
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(["token", "new", "x", "--namespaces", "*", "--scopes", "root"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

/// A SIGHUP reads the config file again and takes its tokens: a revoked
/// token stops working without a restart. A file that does not validate
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_reloads_the_tokens_and_a_bad_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = dir.path().join("walden.toml");
    let with_tokens = |tokens: &[(&str, &str)], sha_of_first: Option<&str>| {
        let mut text = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n",
            dir.path().display()
        );
        for (i, (name, token)) in tokens.iter().enumerate() {
            let sha = match (i, sha_of_first) {
                (0, Some(sha)) => sha.to_string(),
                _ => hex::encode(Sha256::digest(token.as_bytes())),
            };
            text += &format!(
                "[[server.tokens]]\nname = \"{name}\"\nsha256 = \"{sha}\"\nnamespaces = [\"*\"]\nscopes = [\"write\", \"read\"]\n"
            );
        }
        text += &format!(
            "[namespaces.ns.backend]\ntype = \"embedded\"\n[namespaces.ns.target]\ntype = \"file\"\npath = \"{}/ns.jsonl\"\n",
            dir.path().display()
        );
        text
    };
    std::fs::write(&path, with_tokens(&[("old", "tok-old")], None)).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let status = |token: &'static str| {
        let base = base.clone();
        async move {
            call(&base, &Method::GET, "/v1/namespaces/{ns}", Some(token))
                .await
                .0
        }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while reqwest::get(format!("{base}/healthz")).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "walden did not come up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(status("tok-old").await, 200);
    assert_eq!(status("tok-new").await, 401);
    let hup = || {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    // Revoke "old", add "new".
    std::fs::write(&path, with_tokens(&[("new", "tok-new")], None)).unwrap();
    hup();
    let mut reloaded = false;
    for _ in 0..100 {
        if status("tok-new").await == 200 {
            reloaded = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(reloaded, "the new token never worked");
    assert_eq!(status("tok-old").await, 401, "a revoked token still works");
    // A file that does not validate: the tokens in use stay.
    std::fs::write(&path, with_tokens(&[("broken", "x")], Some("not-a-hash"))).unwrap();
    hup();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(status("tok-new").await, 200);
    let _ = child.kill();
    let _ = child.wait();
}
