//! The dead-letter admin API:
//!
//! - `GET  /v1/namespaces/{ns}/dlq?limit=&after=`: live letters in DLQ order
//! - `GET  /v1/namespaces/{ns}/dlq/{id}`: every live letter of that entry id
//! - `POST /v1/namespaces/{ns}/dlq/redrive` `{"ids": [...]}` or `{"all": true}`
//! - `POST /v1/namespaces/{ns}/dlq/purge`, the same body
//!
//! A redrive sends each entry back to its origin shard with its original
//! sequence and fresh attempts.
//! - Embedded log: the shard's applier retries it in place; its letter is
//!   removed once it is applied (or superseded by a newer version at the
//!   target). One that fails again stays.
//! - Kafka: the entry is re-produced to its origin partition (any process
//!   can do this, even a producer-only one), and its letter is removed once
//!   the broker has it. The partition's owner applies it; one that fails
//!   again becomes a new letter.
//! - SQS: the same, onto its origin queue. Listing an SQS DLQ is a
//!   best-effort peek (see `backends::sqs::dlq`).

use std::collections::BTreeMap;

use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::future::join_all;
use serde::Deserialize;

use super::{ApiError, AppState, read_json_body};
use crate::actors::applier::{Purged, Redrive, RedrivenLetter};
use crate::actors::supervisor::NamespaceRuntime;
use crate::backends::shard::AnyDlq;
use crate::backends::{BackendError, DeadLetter, DeadLetters};
use crate::entry::Delivered;
use crate::sinks::DeliveredJson;

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<usize>,
    after: Option<u64>,
}

/// Which letters a redrive or purge acts on.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Select {
    ids: Option<Vec<String>>,
    #[serde(default)]
    all: bool,
}

fn backend_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::unavailable(crate::entry::Durable::False, format!("the DLQ failed: {e}"))
}

/// The JSON form of a dead letter: the entry as a target would see it, plus
/// where it came from and why it failed (and, on Kafka, `holds_key` when it
/// holds its key).
fn letter_json(dlq: &AnyDlq, letter: &DeadLetter) -> serde_json::Value {
    let delivered = Delivered {
        shard: letter.origin.shard.clone(),
        sequence: letter.origin.sequence,
        entry: letter.entry.clone(),
    };
    let mut v = serde_json::to_value(DeliveredJson::new(&delivered)).expect("plain struct");
    v["dlq_sequence"] = letter.dlq_sequence.into();
    v["origin"] = serde_json::json!({
        "namespace": &*letter.origin.shard.namespace,
        "shard": letter.origin.shard.shard,
        "sequence": letter.origin.sequence,
        "target": letter.origin.target,
    });
    v["attempts"] = letter.attempts.into();
    v["first_failure_ms"] = letter.first_failure_ms.into();
    v["last_failure_ms"] = letter.last_failure_ms.into();
    v["last_error"] = letter.last_error.clone().into();
    if let Some(key) = dlq.holds_key(letter) {
        v["holds_key"] = key.into();
    }
    v
}

/// `GET /v1/namespaces/{ns}/dlq`
pub async fn list(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let ns = state.namespace(&path)?;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT);
    let (letters, total) = ns
        .dlq
        .list(&ns.name, query.after, limit)
        .await
        .map_err(backend_error)?;
    let next_after = (letters.len() == limit && limit > 0)
        .then(|| letters.last().map(|l| l.dlq_sequence))
        .flatten();
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "entries": letters.iter().map(|l| letter_json(&ns.dlq, l)).collect::<Vec<_>>(),
        "total": total,
        "next_after": next_after,
    })))
}

/// `GET /v1/namespaces/{ns}/dlq/{id}`
pub async fn show(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (ns, id) = path.into_inner();
    let ns = state.namespace(&ns)?;
    let letters = ns.dlq.get(&ns.name, &id).await.map_err(backend_error)?;
    if letters.is_empty() {
        return Err(ApiError::not_found(format!(
            "no dead letter {id:?} in namespace {:?}",
            ns.name
        )));
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "id": id,
        "entries": letters.iter().map(|l| letter_json(&ns.dlq, l)).collect::<Vec<_>>(),
        "total": letters.len(),
    })))
}

/// The letters a request selects, and the ids it named that are not live.
async fn select(
    state: &AppState,
    ns: &NamespaceRuntime,
    req: &HttpRequest,
    body: web::Payload,
) -> Result<(Vec<DeadLetter>, Vec<String>), ApiError> {
    let bytes = read_json_body(req, body, state.server.max_body_bytes).await?;
    let select: Select = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))?;
    let (dlq, name) = (&ns.dlq, &ns.name);
    match (select.ids, select.all) {
        (Some(ids), false) => {
            let mut found = Vec::new();
            let mut missing = Vec::new();
            for id in ids {
                let letters = dlq.get(name, &id).await.map_err(backend_error)?;
                if letters.is_empty() {
                    missing.push(id);
                }
                found.extend(letters);
            }
            // An id named twice is acted on once.
            found.sort_by_key(|l| l.dlq_sequence);
            found.dedup_by_key(|l| l.dlq_sequence);
            // Oldest first, whatever order the ids came in: a held key's
            // entries go back behind their holder.
            Ok((found, missing))
        }
        (None, true) => {
            let mut all = Vec::new();
            let mut after = None;
            loop {
                let (page, _) = dlq
                    .list(name, after, MAX_LIMIT)
                    .await
                    .map_err(backend_error)?;
                let Some(last) = page.last() else { break };
                after = Some(last.dlq_sequence);
                all.extend(page);
            }
            Ok((all, Vec::new()))
        }
        _ => Err(ApiError::bad_request(
            "give either `ids` (a list) or `all: true`",
        )),
    }
}

/// `POST /v1/namespaces/{ns}/dlq/redrive`
pub async fn redrive(
    state: web::Data<AppState>,
    path: web::Path<String>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let ns = state.namespace(&path)?.clone();
    let (letters, not_found) = select(&state, &ns, &req, body).await?;
    let (routable, unroutable): (Vec<_>, Vec<_>) = letters.into_iter().partition(|l| {
        *l.origin.shard.namespace == *ns.name && l.origin.shard.shard < ns.config.shards
    });
    let unroutable: Vec<String> = unroutable.into_iter().map(|l| l.entry.id).collect();
    if ns.dlq.redrives_to_broker() {
        // Each send is queued at its first poll, so the entries go back in
        // DLQ order: a held key's entries return behind their holder.
        let sends = routable.iter().map(|l| ns.dlq.redrive_to_broker(l));
        return put_back(&routable, join_all(sends).await, not_found, unroutable);
    }
    let mut by_shard: BTreeMap<u32, Vec<RedrivenLetter>> = BTreeMap::new();
    for l in routable {
        by_shard
            .entry(l.origin.shard.shard)
            .or_default()
            .push(RedrivenLetter {
                dlq_sequence: l.dlq_sequence,
                delivered: Delivered {
                    shard: l.origin.shard,
                    sequence: l.origin.sequence,
                    entry: l.entry,
                },
            });
    }
    let mut redriven = 0;
    for (shard, entries) in by_shard {
        redriven += entries.len();
        ns.shards[shard as usize].applier.do_send(Redrive(entries));
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "redriven": redriven,
        "not_found": not_found,
        "unroutable": unroutable,
    })))
}

/// On a broker a redrive puts each entry back on its origin partition or
/// queue, where whichever process reads it applies it. Answered once every
/// entry is back; 503 naming the ids that are not (they stay in the DLQ).
fn put_back(
    letters: &[DeadLetter],
    results: Vec<Result<(), BackendError>>,
    not_found: Vec<String>,
    unroutable: Vec<String>,
) -> Result<HttpResponse, ApiError> {
    let mut redriven = 0;
    let mut failed = Vec::new();
    for (letter, result) in letters.iter().zip(results) {
        match result {
            Ok(()) => redriven += 1,
            Err(e) => {
                failed.push(serde_json::json!({"id": letter.entry.id, "error": e.to_string()}))
            }
        }
    }
    let body = serde_json::json!({
        "redriven": redriven,
        "not_found": not_found,
        "unroutable": unroutable,
        "failed": failed,
    });
    Ok(match failed.is_empty() {
        true => HttpResponse::Ok().json(body),
        false => HttpResponse::ServiceUnavailable().json(body),
    })
}

/// `POST /v1/namespaces/{ns}/dlq/purge`
pub async fn purge(
    state: web::Data<AppState>,
    path: web::Path<String>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let ns = state.namespace(&path)?.clone();
    let (letters, mut not_found) = select(&state, &ns, &req, body).await?;
    let mut purged = 0;
    for l in letters {
        match ns.dlq.remove(&ns.name, l.dlq_sequence, "purged").await {
            Ok(true) => {
                purged += 1;
                // If it held its key, the key's waiting entries may go.
                if let Some(h) = ns.shards.get(l.origin.shard.shard as usize) {
                    h.applier.do_send(Purged(l.entry.clone()));
                }
            }
            // Gone meanwhile (redriven and applied, or purged by another).
            Ok(false) if !not_found.contains(&l.entry.id) => not_found.push(l.entry.id),
            Ok(false) => {}
            Err(e) => return Err(backend_error(e)),
        }
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "purged": purged, "not_found": not_found })))
}
