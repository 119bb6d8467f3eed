//! The HTTP API (actix-web). The WriteToLog contract is fixed: it may grow,
//! but what is documented in the README must not change.
//!
//! - `POST /v1/namespaces/{ns}/log` and `.../log/batch`: [`write`]
//! - `GET /v1/namespaces`, `GET /v1/namespaces/{ns}`, `/healthz`, `/readyz`,
//!   `/metrics`: [`admin`]
//! - `/v1/namespaces/{ns}/dlq…`: [`dlq`]
//! - `/v1/namespaces/{ns}/delayed…`: [`delayed`]
//! - `/v1/namespaces/{ns}/replays…` and `.../entries`: [`replay`]
//!
//! Every route is registered from [`auth::ENDPOINTS`], with the scope it
//! needs; [`auth::admit`] checks it before the handler runs.

pub mod admin;
pub mod auth;
pub mod delayed;
pub mod dlq;
pub mod error;
pub mod replay;
pub mod write;

use std::collections::BTreeMap;
use std::sync::Arc;

use actix_web::web;
use futures_util::StreamExt;

pub use error::ApiError;

use crate::actors::supervisor::{NamespaceRuntime, TargetRuntime};
use crate::backends::LogHealth;
use crate::config::ServerConfig;

/// Who called, once admitted with a token ([`auth::admit`]): handlers that
/// answer per namespace (`GET /v1/namespaces`) read it.
#[derive(Clone, Debug)]
pub struct Caller(pub crate::config::TokenConfig);

/// What every handler shares.
pub struct AppState {
    pub namespaces: BTreeMap<String, Arc<NamespaceRuntime>>,
    /// The process's own log (readiness, `/metrics`).
    pub log: Arc<dyn LogHealth>,
    pub server: ServerConfig,
    /// Walden's own state (parked and delayed entries, idempotency keys).
    pub state: Arc<crate::state::StateStore>,
    /// The process's replays.
    pub replays: Arc<crate::actors::replay::Replays>,
    /// Who may call the API; a SIGHUP swaps in the config file's tokens.
    pub tokens: std::sync::RwLock<Arc<auth::Tokens>>,
    /// The arbiters' busy time and the shards moved between them.
    pub rebalance: Arc<crate::actors::rebalance::RebalanceStats>,
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

/// Register every route ([`auth::ENDPOINTS`], each with its rule).
pub fn routes(cfg: &mut web::ServiceConfig) {
    auth::register(cfg);
    cfg.default_service(web::to(|| async {
        Err::<actix_web::HttpResponse, _>(ApiError::not_found("no such route"))
    }));
}

/// Read a JSON request body, refusing anything that is not JSON (415) or
/// larger than `server.max_body_bytes` (413, before any of it is buffered
/// when `Content-Length` says so), or that does not arrive whole within
/// `server.body_timeout_ms` (408, and the connection is closed: a client
/// that trickles its body holds nothing for long).
pub(crate) async fn read_json_body(
    req: &actix_web::HttpRequest,
    mut body: web::Payload,
    server: &ServerConfig,
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
    let limit = server.max_body_bytes;
    let too_large = || {
        ApiError::too_large(format!(
            "the body is larger than server.max_body_bytes ({limit})"
        ))
        .closing()
    };
    let declared = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let read = async {
        let mut buf = web::BytesMut::new();
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
            if buf.len() + chunk.len() > limit {
                return Err(too_large());
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    };
    match tokio::time::timeout(server.body_timeout(), read).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::rejected(
            actix_web::http::StatusCode::REQUEST_TIMEOUT,
            format!(
                "the body did not arrive within server.body_timeout_ms ({} ms)",
                server.body_timeout_ms
            ),
        )
        .closing()),
    }
}
