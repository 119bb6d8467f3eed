//! Replays and the log's entries:
//! - `POST /v1/namespaces/{ns}/replays`: start one (202), or a dry run (200)
//! - `GET /v1/namespaces/{ns}/replays` and `.../replays/{id}`: their state
//! - `DELETE /v1/namespaces/{ns}/replays/{id}`: cancel one
//! - `GET /v1/namespaces/{ns}/entries?key=&from_ms=&to_ms=&limit=`: what the
//!   log holds, to find the write to leave out

use std::collections::BTreeSet;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, AppState};
use crate::actors::replay::ReplayError;
use crate::backends::Limit;
use crate::config::ReplayIdempotency;
use crate::entry::{Delivered, ShardRef, now_ms};
use crate::sinks::DeliveredJson;
use crate::state::replays::{Counts, ReplayRecord, ReplaySpec, Select};

const DEFAULT_ENTRIES: usize = 100;
const MAX_ENTRIES: usize = 1000;

/// A replay request's body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    from_ms: Option<u64>,
    to_ms: Option<u64>,
    #[serde(default)]
    select: Select,
    #[serde(default)]
    exclude_ids: BTreeSet<String>,
    #[serde(default)]
    exclude_keys: BTreeSet<String>,
    #[serde(default)]
    exclude_sequences: Vec<SequencePair>,
    #[serde(default)]
    include_purged: bool,
    target: Option<String>,
    #[serde(default)]
    dry_run: bool,
    idempotency_key: Option<ReplayIdempotency>,
}

/// An entry named by where it is: `{"shard": 0, "sequence": 12}` or `[0, 12]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum SequencePair {
    Named { shard: u32, sequence: u64 },
    Pair(u32, u64),
}

impl SequencePair {
    fn pair(&self) -> (u32, u64) {
        match *self {
            SequencePair::Named { shard, sequence } | SequencePair::Pair(shard, sequence) => {
                (shard, sequence)
            }
        }
    }
}

fn replay_error(e: ReplayError) -> ApiError {
    match e {
        ReplayError::Invalid(m) => ApiError::bad_request(m),
        ReplayError::NotFound(_) => ApiError::not_found(e.to_string()),
        e => ApiError::unavailable(crate::entry::Durable::False, format!("replay: {e}")),
    }
}

/// A replay's status object.
fn status(r: &ReplayRecord) -> serde_json::Value {
    json!({
        "replay": r.replay,
        "namespace": r.namespace,
        "state": r.state,
        "matched": r.counts.matched,
        "replayed": r.counts.replayed,
        "excluded": r.counts.excluded,
        "failed": r.counts.failed,
        "from_ms": r.spec.from_ms,
        "to_ms": r.spec.to_ms,
        "position_ms": r.position_ms(),
        "read": r.progress().0,
        "to_read": r.progress().1,
        "select": r.spec.select,
        "target": r.spec.target,
        "created_ms": r.created_ms,
        "finished_ms": r.finished_ms,
        "error": r.error,
    })
}

/// `POST /v1/namespaces/{ns}/replays`
pub async fn start(
    state: web::Data<AppState>,
    path: web::Path<String>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let ns = state.namespace(&path)?.clone();
    let bytes = super::read_json_body(&req, body, &state.server).await?;
    let b: ReplayBody = super::write::parse(&bytes, || "replay request".into())?;
    let from_ms = b
        .from_ms
        .ok_or_else(|| ApiError::bad_request("`from_ms` is required (epoch milliseconds)"))?;
    let spec = ReplaySpec {
        from_ms,
        to_ms: b.to_ms.unwrap_or_else(now_ms),
        select: b.select,
        exclude_ids: b.exclude_ids,
        exclude_keys: b.exclude_keys,
        exclude_sequences: b.exclude_sequences.iter().map(SequencePair::pair).collect(),
        include_purged: b.include_purged,
        target: b.target,
        idempotency_key: b
            .idempotency_key
            .unwrap_or(ns.config.replay.idempotency_key),
    };
    if b.dry_run {
        let counts: Counts = state
            .replays
            .dry_run(&ns, spec.clone())
            .await
            .map_err(replay_error)?;
        return Ok(HttpResponse::Ok().json(json!({
            "replay": null,
            "namespace": ns.name,
            "state": "dry_run",
            "matched": counts.matched,
            "replayed": counts.replayed,
            "excluded": counts.excluded,
            "failed": 0,
            "from_ms": spec.from_ms,
            "to_ms": spec.to_ms,
            "position_ms": spec.to_ms,
            "select": spec.select,
            "target": spec.target,
        })));
    }
    let record = state.replays.start(&ns, spec).await.map_err(replay_error)?;
    Ok(HttpResponse::Accepted().json(status(&record)))
}

/// `GET /v1/namespaces/{ns}/replays`
pub async fn list(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let ns = state.namespace(&path)?;
    let all = state.replays.list(&ns.name).map_err(replay_error)?;
    Ok(HttpResponse::Ok().json(json!({
        "replays": all.iter().map(status).collect::<Vec<_>>(),
    })))
}

/// `GET /v1/namespaces/{ns}/replays/{id}`
pub async fn show(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (ns, id) = path.into_inner();
    let ns = state.namespace(&ns)?;
    let r = state.replays.get(&ns.name, &id).map_err(replay_error)?;
    Ok(HttpResponse::Ok().json(status(&r)))
}

/// `DELETE /v1/namespaces/{ns}/replays/{id}`: cancel it (a finished replay
/// is left as it is).
pub async fn cancel(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (ns, id) = path.into_inner();
    let ns = state.namespace(&ns)?;
    let r = state.replays.cancel(ns, &id).await.map_err(replay_error)?;
    Ok(HttpResponse::Ok().json(status(&r)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntriesQuery {
    key: Option<String>,
    from_ms: Option<u64>,
    to_ms: Option<u64>,
    limit: Option<usize>,
}

/// `GET /v1/namespaces/{ns}/entries`: the entries the log holds, written in
/// `[from_ms, to_ms]` (and of routing key `key`), oldest first, at most
/// `limit` (default 100, at most 1,000).
pub async fn entries(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<EntriesQuery>,
) -> Result<HttpResponse, ApiError> {
    let ns = state.namespace(&path)?.clone();
    let q = query.into_inner();
    let log = ns
        .backend
        .replay_log()
        .map_err(|why| ApiError::bad_request(format!("namespace {:?}: {why}", ns.name)))?;
    let (from_ms, to_ms) = (q.from_ms.unwrap_or(0), q.to_ms.unwrap_or(u64::MAX));
    if from_ms > to_ms {
        return Err(ApiError::bad_request(format!(
            "`from_ms` ({from_ms}) is after `to_ms` ({to_ms})"
        )));
    }
    let limit = q.limit.unwrap_or(DEFAULT_ENTRIES).min(MAX_ENTRIES);
    // A key lives in one shard; without one, every shard is read.
    let shards: Vec<u32> = match &q.key {
        Some(key) => vec![crate::routing::shard_of(
            ns.config.route_hash(),
            Some(key),
            key,
            ns.config.shards,
        )],
        None => (0..ns.config.shards).collect(),
    };
    let name = ns.name.clone();
    let key = q.key.clone();
    let found = tokio::task::spawn_blocking(move || {
        let mut out: Vec<Delivered> = Vec::new();
        for i in shards {
            let shard = ShardRef::new(name.as_str(), i);
            let mut next = log.position_at(&shard, from_ms)?;
            let mut mine = 0;
            'shard: while mine < limit {
                let batch = log.read(&shard, next, Limit::entries(512))?;
                let Some(last) = batch.last() else { break };
                next = last.position + 1;
                for d in batch.into_iter().map(|l| l.delivered) {
                    if d.entry.timestamp_ms > to_ms {
                        break 'shard;
                    }
                    let routed = d.entry.key.as_deref().unwrap_or(&d.entry.id);
                    if d.entry.is_set_marker() || key.as_deref().is_some_and(|k| k != routed) {
                        continue;
                    }
                    out.push(d);
                    mine += 1;
                    if mine >= limit {
                        break 'shard;
                    }
                }
            }
        }
        out.sort_by_key(|d| (d.entry.timestamp_ms, d.shard.shard, d.sequence));
        out.truncate(limit);
        Ok::<_, crate::backends::BackendError>(out)
    })
    .await
    .expect("reading the log does not panic")
    .map_err(|e| {
        ApiError::unavailable(
            crate::entry::Durable::False,
            format!("reading the log: {e}"),
        )
    })?;
    Ok(HttpResponse::Ok().json(json!({
        "entries": found.iter().map(DeliveredJson::new).collect::<Vec<_>>(),
    })))
}
