//! Delayed entries:
//!
//! - `GET /v1/namespaces/{ns}/delayed?limit=&target=`: upcoming entries,
//!   soonest first; each target waits for its own copy
//! - `DELETE /v1/namespaces/{ns}/delayed/{id}`: cancel one before it fires,
//!   for every target

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
    target: Option<String>,
}

/// A broker namespace's delayed entries hop through its delay-tier topics,
/// which have no index by id or due time yet.
fn not_on_a_broker(ns: &NamespaceRuntime) -> Result<(), ApiError> {
    match ns.targets[0].delays.fires_itself() {
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
    let targets = super::targets_named(ns, query.target.as_deref())?;
    let mut upcoming = Vec::new();
    for t in targets {
        for h in &t.shards {
            let waiting = t
                .delays
                .due_between(&h.shard, 0, u64::MAX, Limit::entries(limit))
                .await
                .map_err(store_error)?;
            upcoming.extend(waiting.into_iter().map(|d| (d, t.name.as_str())));
        }
    }
    upcoming.sort_by_key(|(d, t)| (d.entry.due_ms, d.shard.shard, d.sequence, *t));
    upcoming.truncate(limit);
    let entries: Vec<_> = upcoming
        .iter()
        .map(|(d, target)| {
            serde_json::json!({
                "id": d.entry.id,
                "key": d.entry.key,
                "shard": d.shard.shard,
                "sequence": d.sequence,
                "due_ms": d.entry.due_ms,
                "timestamp_ms": d.entry.timestamp_ms,
                "target": target,
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
    // Each target holds its own copy; the cancel goes to every one.
    let (mut cancelled, mut fired) = (Vec::new(), Vec::new());
    for t in &ns.targets {
        let Some(d) = t.delays.find(&ns.name, &id).await.map_err(store_error)? else {
            continue;
        };
        if let Some(place) = d.entry.set_place() {
            // Without it, the rest of its set would wait for it forever.
            return Err(ApiError::rejected(
                StatusCode::CONFLICT,
                format!(
                    "delayed entry {id:?} is mutation {} of set {:?}; a set is delivered whole, and one mutation of it cannot be cancelled",
                    place.index, place.set
                ),
            ));
        }
        let Some(shard) = t.shards.get(d.shard.shard as usize) else {
            continue;
        };
        let outcome = shard
            .actors()
            .await
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
            CancelOutcome::Cancelled => cancelled.push(t.name.as_str()),
            CancelOutcome::Fired => fired.push(t.name.as_str()),
            CancelOutcome::Gone => {}
        }
    }
    match (cancelled.is_empty(), fired.is_empty()) {
        (true, true) => Err(not_found()),
        (false, true) => {
            Ok(HttpResponse::Ok()
                .json(serde_json::json!({ "cancelled": id, "targets": cancelled })))
        }
        _ => Err(ApiError::rejected(
            StatusCode::CONFLICT,
            format!(
                "delayed entry {id:?} already came due for {fired:?} and is being delivered there; it cannot be cancelled{}",
                match cancelled.is_empty() {
                    true => String::new(),
                    false => format!(" (it was cancelled for {cancelled:?})"),
                }
            ),
        )),
    }
}
