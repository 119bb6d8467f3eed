//! Delayed entries:
//!
//! - `GET /v1/namespaces/{ns}/delayed?limit=`: upcoming entries, soonest first
//! - `DELETE /v1/namespaces/{ns}/delayed/{id}`: cancel one before it fires

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use serde::Deserialize;

use super::{ApiError, AppState};
use crate::actors::messages::{Cancel, CancelOutcome};
use crate::actors::supervisor::NamespaceRuntime;
use crate::backends::Limit;
use crate::entry::Durable;

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<usize>,
}

/// A broker namespace's delayed entries hop through its delay-tier topics,
/// which have no index by id or due time yet.
fn not_on_a_broker(ns: &NamespaceRuntime) -> Result<(), ApiError> {
    match ns.delays.fires_itself() {
        false => Ok(()),
        true => Err(ApiError::bad_request(format!(
            "namespace {:?} is on the {} backend, whose delayed entries cannot be listed or cancelled yet",
            ns.name,
            ns.backend.kind()
        ))),
    }
}

fn store_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::unavailable(Durable::False, format!("the delay store failed: {e}"))
}

/// `GET /v1/namespaces/{ns}/delayed`
pub async fn list(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let ns = state.namespace(&path)?;
    not_on_a_broker(ns)?;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT);
    let mut upcoming = Vec::new();
    for h in &ns.shards {
        let waiting = ns
            .delays
            .due_between(&h.shard, 0, u64::MAX, Limit::entries(limit))
            .await
            .map_err(store_error)?;
        upcoming.extend(waiting);
    }
    upcoming.sort_by_key(|d| (d.entry.due_ms, d.shard.shard, d.sequence));
    upcoming.truncate(limit);
    let entries: Vec<_> = upcoming
        .iter()
        .map(|d| {
            serde_json::json!({
                "id": d.entry.id,
                "key": d.entry.key,
                "shard": d.shard.shard,
                "sequence": d.sequence,
                "due_ms": d.entry.due_ms,
                "timestamp_ms": d.entry.timestamp_ms,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "entries": entries })))
}

/// `DELETE /v1/namespaces/{ns}/delayed/{id}`
///
/// The shard's scheduler decides, so a cancel never races a fire: 200 if the
/// entry will not fire, 409 if it already fired, 404 if no such entry waits.
pub async fn cancel(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (ns, id) = path.into_inner();
    let ns = state.namespace(&ns)?;
    not_on_a_broker(ns)?;
    let not_found = || {
        ApiError::not_found(format!(
            "no delayed entry {id:?} is waiting in namespace {:?} (it may have been delivered)",
            ns.name
        ))
    };
    let found = ns.delays.find(&ns.name, &id).await.map_err(store_error)?;
    let Some(d) = found else {
        return Err(not_found());
    };
    let Some(shard) = ns.shards.get(d.shard.shard as usize) else {
        return Err(not_found());
    };
    let outcome = shard
        .delay
        .send(Cancel(d))
        .await
        .map_err(|e| {
            ApiError::unavailable(
                Durable::Unknown,
                format!("the delay scheduler is restarting: {e}"),
            )
        })?
        .map_err(store_error)?;
    match outcome {
        CancelOutcome::Cancelled => {
            Ok(HttpResponse::Ok().json(serde_json::json!({ "cancelled": id })))
        }
        CancelOutcome::Fired => Err(ApiError::rejected(
            StatusCode::CONFLICT,
            format!(
                "delayed entry {id:?} already came due and is being delivered; it cannot be cancelled"
            ),
        )),
        CancelOutcome::Gone => Err(not_found()),
    }
}
