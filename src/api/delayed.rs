//! Delayed entries:
//!
//! - `GET /v1/namespaces/{ns}/delayed?limit=`: upcoming entries, soonest first
//! - `DELETE /v1/namespaces/{ns}/delayed/{id}`: cancel one before it fires

use actix_web::{HttpResponse, web};
use serde::Deserialize;

use super::{ApiError, AppState};
use crate::actors::delay::Cancelled;
use crate::entry::Durable;

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<usize>,
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
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT);
    let mut upcoming = Vec::new();
    for h in &ns.shards {
        let shard = upcoming_of(&state, h.shard.clone(), limit).await?;
        upcoming.extend(shard);
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

async fn upcoming_of(
    state: &AppState,
    shard: crate::entry::ShardRef,
    limit: usize,
) -> Result<Vec<crate::entry::Delivered>, ApiError> {
    state
        .park
        .due_between(shard, 0, u64::MAX, limit)
        .await
        .map_err(store_error)
}

/// `DELETE /v1/namespaces/{ns}/delayed/{id}`
pub async fn cancel(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (ns, id) = path.into_inner();
    let ns = state.namespace(&ns)?;
    match state
        .park
        .cancel(ns.name.clone(), id.clone())
        .await
        .map_err(store_error)?
    {
        Some(d) => {
            if let Some(h) = ns.shards.get(d.shard.shard as usize) {
                h.delay.do_send(Cancelled(d));
            }
            Ok(HttpResponse::Ok().json(serde_json::json!({ "cancelled": id })))
        }
        None => Err(ApiError::not_found(format!(
            "no delayed entry {id:?} is waiting in namespace {:?} (it may have fired already)",
            ns.name
        ))),
    }
}
