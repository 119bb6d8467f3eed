//! Tracing: WriteToLog and apply spans are exported over OTLP/HTTP to a real
//! receiver, and the apply span joins the trace of the write through the
//! `traceparent` carried inside the entry. Its own process: the tracing
//! subscriber is global.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use common::service_config;
use common::target::HttpTarget;
use serde_json::json;
use walden::service::Spawned;

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";

/// An OTLP/HTTP receiver that keeps every request body.
fn start_collector() -> (String, Arc<Mutex<Vec<u8>>>) {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let data = web::Data::new(bodies.clone());
    std::thread::spawn(move || {
        actix::System::new().block_on(async move {
            let server = HttpServer::new(move || {
                App::new()
                    .app_data(data.clone())
                    .default_service(web::post().to(
                        |body: web::Bytes, seen: web::Data<Arc<Mutex<Vec<u8>>>>| async move {
                            seen.lock().unwrap().extend_from_slice(&body);
                            HttpResponse::Ok()
                                .content_type("application/x-protobuf")
                                .finish()
                        },
                    ))
            })
            .workers(1)
            .disable_signals()
            .bind("127.0.0.1:0")
            .unwrap();
            tx.send(server.addrs()[0]).unwrap();
            let _ = server.run().await;
        })
    });
    let addr = rx.recv().unwrap();
    (format!("http://{addr}/v1/traces"), bodies)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_and_apply_spans_share_one_trace() {
    let (endpoint, exported) = start_collector();
    let otel = walden::config::OtelConfig {
        endpoint,
        service_name: "walden-test".into(),
    };
    let telemetry = walden::telemetry::init(&otel).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let svc = Spawned::start(service_config(dir.path(), &target.url(), 1, "")).unwrap();
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/namespaces/ns/log", svc.addr))
        .header("traceparent", format!("00-{TRACE_ID}-b7ad6b7169203331-01"))
        .json(&json!({"payload": 1, "id": "traced"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = target.wait_for(1, Duration::from_secs(10));
    let tp = got[0]
        .traceparent
        .clone()
        .expect("the target gets a traceparent");
    assert!(
        tp.contains(TRACE_ID),
        "same trace as the client's write: {tp}"
    );
    assert!(
        !tp.contains("b7ad6b7169203331"),
        "a child span, not the client's: {tp}"
    );

    svc.stop();
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .unwrap();
    let bytes = exported.lock().unwrap().clone();
    let trace_id: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&TRACE_ID[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    assert!(contains(&bytes, &trace_id), "spans carry the trace id");
    assert!(
        contains(&bytes, b"write_to_log"),
        "the write span was exported"
    );
    assert!(contains(&bytes, b"apply"), "the apply span was exported");
    assert!(contains(&bytes, b"traced"), "spans carry the entry id");
    assert!(contains(&bytes, b"walden-test"), "the service name is set");
}
