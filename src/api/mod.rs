//! The HTTP API (actix-web). The WriteToLog contract is fixed: it may grow,
//! but what is documented in the README must not change.
//!
//! - `POST /v1/namespaces/{ns}/log` and `.../log/batch`: [`write`]
//! - `GET /v1/namespaces`, `GET /v1/namespaces/{ns}`, `/healthz`, `/readyz`,
//!   `/metrics`: [`admin`]
//! - `/v1/namespaces/{ns}/dlq…`: [`dlq`]
//! - `/v1/namespaces/{ns}/delayed…`: [`delayed`]

pub mod admin;
pub mod delayed;
pub mod dlq;
pub mod error;
pub mod write;

use std::collections::BTreeMap;
use std::sync::Arc;

use actix_web::web;
use futures_util::StreamExt;

pub use error::ApiError;

use crate::actors::supervisor::{NamespaceRuntime, TargetRuntime};
use crate::backends::LogHealth;
use crate::config::ServerConfig;

/// What every handler shares.
pub struct AppState {
    pub namespaces: BTreeMap<String, Arc<NamespaceRuntime>>,
    /// The process's own log (readiness, `/metrics`).
    pub log: Arc<dyn LogHealth>,
    pub server: ServerConfig,
    /// Walden's own state (parked and delayed entries, idempotency keys).
    pub state: Arc<crate::state::StateStore>,
}

impl AppState {
    pub fn namespace(&self, name: &str) -> Result<&Arc<NamespaceRuntime>, ApiError> {
        self.namespaces
            .get(name)
            .ok_or_else(|| ApiError::not_found(format!("unknown namespace {name:?}")))
    }
}

/// The targets a `?target=` names: that one (a 400 if the namespace has no
/// such target), or all of them.
pub(crate) fn targets_named<'a>(
    ns: &'a NamespaceRuntime,
    name: Option<&str>,
) -> Result<Vec<&'a TargetRuntime>, ApiError> {
    match name {
        None => Ok(ns.targets.iter().collect()),
        Some(name) => ns.target(name).map(|t| vec![t]).ok_or_else(|| {
            let names: Vec<&str> = ns.targets.iter().map(|t| t.name.as_str()).collect();
            ApiError::bad_request(format!(
                "`target`: namespace {:?} has no target {name:?} (its targets are {names:?})",
                ns.name
            ))
        }),
    }
}

/// Register every route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/namespaces/{ns}/log", web::post().to(write::write_one))
        .route(
            "/v1/namespaces/{ns}/mutations",
            web::post().to(write::write_set),
        )
        .route(
            "/v1/namespaces/{ns}/log/batch",
            web::post().to(write::write_batch),
        )
        .route("/v1/namespaces/{ns}/delayed", web::get().to(delayed::list))
        .route(
            "/v1/namespaces/{ns}/delayed/{id}",
            web::delete().to(delayed::cancel),
        )
        .route("/v1/namespaces/{ns}/dlq", web::get().to(dlq::list))
        .route(
            "/v1/namespaces/{ns}/dlq/redrive",
            web::post().to(dlq::redrive),
        )
        .route("/v1/namespaces/{ns}/dlq/purge", web::post().to(dlq::purge))
        .route("/v1/namespaces/{ns}/dlq/{id}", web::get().to(dlq::show))
        .route("/v1/namespaces", web::get().to(admin::list_namespaces))
        .route("/v1/namespaces/{ns}", web::get().to(admin::namespace_stats))
        .route("/healthz", web::get().to(admin::healthz))
        .route("/readyz", web::get().to(admin::readyz))
        .route("/metrics", web::get().to(admin::metrics))
        .default_service(web::to(|| async {
            Err::<actix_web::HttpResponse, _>(ApiError::not_found("no such route"))
        }));
}

/// Read a JSON request body, refusing anything that is not JSON (415) or
/// larger than `limit` (413) before buffering it.
pub(crate) async fn read_json_body(
    req: &actix_web::HttpRequest,
    mut body: web::Payload,
    limit: usize,
) -> Result<web::Bytes, ApiError> {
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::rejected(
            actix_web::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("the body must be JSON (Content-Type: application/json), not {content_type:?}"),
        ));
    }
    let mut buf = web::BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::too_large(format!(
                "the body is larger than server.max_body_bytes ({limit})"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}
