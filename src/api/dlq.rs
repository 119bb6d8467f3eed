//! The dead-letter admin API:
//!
//! - `GET  /v1/namespaces/{ns}/dlq?limit=&after=&target=`: live letters in
//!   DLQ order
//! - `GET  /v1/namespaces/{ns}/dlq/{id}`: every live letter of that entry id
//! - `POST /v1/namespaces/{ns}/dlq/redrive?target=` `{"ids": [...]}` or
//!   `{"all": true}`
//! - `POST /v1/namespaces/{ns}/dlq/purge?target=`, the same body
//!
//! Each letter names the target that failed it (`origin.target`); `target=`
//! picks one target's letters. A redrive sends each entry back to its origin
//! shard with its original sequence and fresh attempts, for the target that
//! failed it and no other.
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
use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::future::join_all;
use serde::Deserialize;

use super::{ApiError, AppState, read_json_body};
use crate::actors::messages::{Purged, Redrive, RedriveBacklog, RedrivenLetter};
use crate::actors::supervisor::NamespaceRuntime;
use crate::backends::shard::AnyDlq;
use crate::backends::{DeadLetter, DeadLetters, Pick, RedriveReport, Selection};
use crate::entry::Delivered;
use crate::sinks::DeliveredJson;

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<usize>,
    after: Option<u64>,
    target: Option<String>,
}

/// `?target=` on a redrive or purge.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetQuery {
    target: Option<String>,
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
        entry: Arc::new(letter.entry.clone()),
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
    let (letters, total) = match &query.target {
        None => ns
            .dlq
            .list(&ns.name, query.after, limit)
            .await
            .map_err(backend_error)?,
        Some(target) => {
            super::targets_named(ns, Some(target))?;
            one_target(ns, target, query.after, limit).await?
        }
    };
    let next_after = (letters.len() == limit && limit > 0)
        .then(|| letters.last().map(|l| l.dlq_sequence))
        .flatten();
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "entries": letters.iter().map(|l| letter_json(&ns.dlq, l)).collect::<Vec<_>>(),
        "total": total,
        "next_after": next_after,
    })))
}

/// One target's letters after `after`, up to `limit`, and how many it has:
/// the DLQ is shared, so this reads it through.
async fn one_target(
    ns: &NamespaceRuntime,
    target: &str,
    mut after: Option<u64>,
    limit: usize,
) -> Result<(Vec<DeadLetter>, usize), ApiError> {
    let (mut out, mut total) = (Vec::new(), 0);
    loop {
        let (page, _) = ns
            .dlq
            .list(&ns.name, after, MAX_LIMIT)
            .await
            .map_err(backend_error)?;
        after = page.last().map(|l| l.dlq_sequence);
        let full = page.len() == MAX_LIMIT;
        for l in page.into_iter().filter(|l| l.origin.target == target) {
            total += 1;
            if out.len() < limit {
                out.push(l);
            }
        }
        if !full {
            return Ok((out, total));
        }
    }
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

/// Which letters a request's body picks.
async fn selection(
    state: &AppState,
    ns: &NamespaceRuntime,
    query: TargetQuery,
    req: &HttpRequest,
    body: web::Payload,
) -> Result<Selection, ApiError> {
    super::targets_named(ns, query.target.as_deref())?;
    let bytes = read_json_body(req, body, &state.server).await?;
    let select: Select = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))?;
    let pick = match (select.ids, select.all) {
        (Some(ids), false) => Selection::ids(ids),
        (None, true) => Selection::all(),
        _ => {
            return Err(ApiError::bad_request(
                "give either `ids` (a list) or `all: true`",
            ));
        }
    };
    Ok(Selection {
        target: query.target,
        ..pick
    })
}

/// The letters a selection picks, a page at a time and oldest first, so a
/// large DLQ is never held in memory at once. Named ids are one page (every
/// letter of each, whatever order the ids came in).
struct Pages<'a> {
    ns: &'a NamespaceRuntime,
    selection: &'a Selection,
    after: Option<u64>,
    done: bool,
}

impl<'a> Pages<'a> {
    fn new(ns: &'a NamespaceRuntime, selection: &'a Selection) -> Self {
        Self {
            ns,
            selection,
            after: None,
            done: false,
        }
    }

    async fn next(&mut self) -> Result<Option<Vec<DeadLetter>>, ApiError> {
        if self.done {
            return Ok(None);
        }
        let (dlq, name) = (&self.ns.dlq, &self.ns.name);
        match &self.selection.pick {
            Pick::Ids(ids) => {
                self.done = true;
                let mut found = Vec::new();
                for id in ids {
                    found.extend(dlq.get(name, id).await.map_err(backend_error)?);
                }
                // An id named twice is acted on once.
                found.sort_by_key(|l| l.dlq_sequence);
                found.dedup_by_key(|l| l.dlq_sequence);
                found.retain(|l| self.selection.picks(l));
                Ok(Some(found))
            }
            Pick::All => loop {
                let (mut page, _) = dlq
                    .list(name, self.after, MAX_LIMIT)
                    .await
                    .map_err(backend_error)?;
                self.after = page.last().map(|l| l.dlq_sequence);
                self.done = page.len() < MAX_LIMIT;
                page.retain(|l| self.selection.picks(l));
                if !page.is_empty() {
                    return Ok(Some(page));
                }
                if self.done {
                    return Ok(None);
                }
            },
        }
    }
}

/// `POST /v1/namespaces/{ns}/dlq/redrive`
pub async fn redrive(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<TargetQuery>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let ns = state.namespace(&path)?.clone();
    let selection = selection(&state, &ns, query.into_inner(), &req, body).await?;
    let report = if ns.dlq.redrives_to_broker() {
        ns.dlq
            .redrive_on_broker(&ns.name, ns.config.shards, &selection)
            .await
            .map_err(backend_error)?
    } else {
        redrive_in_place(&ns, &selection, state.replays.store()).await?
    };
    let failed: Vec<_> = report
        .failed
        .iter()
        .map(|(id, error)| serde_json::json!({"id": id, "error": error}))
        .collect();
    let body = serde_json::json!({
        "redriven": report.redriven,
        "not_found": report.not_found,
        "unroutable": report.unroutable,
        "failed": failed,
    });
    // 503 names the entries not put back (their letters stay).
    Ok(match failed.is_empty() {
        true => HttpResponse::Ok().json(body),
        false => HttpResponse::ServiceUnavailable().json(body),
    })
}

/// The target (its index) that failed a letter. A letter of a target since
/// renamed or removed belongs to a namespace's only target, or to none.
fn letter_target(ns: &NamespaceRuntime, letter: &DeadLetter) -> Option<usize> {
    // A replay-only target's letter has no live target to go back to.
    let replay_only = ns
        .replay_targets
        .iter()
        .any(|(name, _)| *name == letter.origin.target);
    ns.targets
        .iter()
        .position(|t| t.name == letter.origin.target)
        .or((ns.targets.len() == 1 && !replay_only).then_some(0))
}

/// Redriven entries an applier may hold before the next page goes to it.
const REDRIVE_BACKLOG: usize = MAX_LIMIT;

/// The local DLQ: each page goes to its shards' appliers, which retry the
/// entries in place and remove their letters once applied. The next page
/// waits until no applier holds more than [`REDRIVE_BACKLOG`] of them.
async fn redrive_in_place(
    ns: &NamespaceRuntime,
    selection: &Selection,
    replays: &std::sync::Arc<crate::state::ReplayStore>,
) -> Result<RedriveReport, ApiError> {
    let mut report = RedriveReport::default();
    let mut pages = Pages::new(ns, selection);
    let mut seen = Vec::new();
    while let Some(page) = pages.next().await? {
        // Only named ids need looking for (all of a large DLQ would not).
        if selection.names_ids() {
            seen.extend(page.iter().map(|l| l.entry.id.clone()));
        }
        let mut by_shard: BTreeMap<(usize, u32), Vec<RedrivenLetter>> = BTreeMap::new();
        for l in page {
            // Back to the target that failed it; a letter from before
            // targets were named (or of a target since removed) goes to a
            // namespace's only target, or nowhere.
            let Some(target) = letter_target(ns, &l).filter(|_| {
                *l.origin.shard.namespace == *ns.name && l.origin.shard.shard < ns.config.shards
            }) else {
                report.unroutable.push(l.entry.id);
                continue;
            };
            by_shard
                .entry((target, l.origin.shard.shard))
                .or_default()
                .push(RedrivenLetter {
                    dlq_sequence: l.dlq_sequence,
                    delivered: Delivered {
                        shard: l.origin.shard,
                        sequence: l.origin.sequence,
                        entry: Arc::new(l.entry),
                    },
                });
        }
        // A replay that picks what was not applied at a time before now
        // picks these too: they were dead, not applied, until now.
        let redriven: Vec<(crate::entry::ShardRef, u64)> = by_shard
            .values()
            .flatten()
            .map(|r| (r.delivered.shard.clone(), r.delivered.sequence))
            .collect();
        let store = replays.clone();
        tokio::task::spawn_blocking(move || {
            store.record_redriven(&redriven, crate::entry::now_ms())
        })
        .await
        .expect("recording redrives does not panic")
        .map_err(backend_error)?;
        for ((target, shard), entries) in by_shard {
            report.redriven += entries.len();
            let applier = ns.targets[target].shards[shard as usize]
                .actors()
                .await
                .applier;
            applier.do_send(Redrive(entries));
            // Backpressure: the applier holds what it was sent until applied.
            while applier
                .send(RedriveBacklog)
                .await
                .is_ok_and(|n| n > REDRIVE_BACKLOG)
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
    report.not_found = selection.missing(seen.iter().map(String::as_str));
    Ok(report)
}

/// `POST /v1/namespaces/{ns}/dlq/purge`, a page at a time; the removals of a
/// page go together, so one fsync covers many.
pub async fn purge(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<TargetQuery>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let ns = state.namespace(&path)?.clone();
    let selection = selection(&state, &ns, query.into_inner(), &req, body).await?;
    let mut pages = Pages::new(&ns, &selection);
    let mut purged = 0;
    let mut gone = Vec::new();
    while let Some(page) = pages.next().await? {
        let mut purged_entries = Vec::new();
        let removals = page
            .iter()
            .map(|l| ns.dlq.remove(&ns.name, l.dlq_sequence, "purged"));
        for (l, result) in page.iter().zip(join_all(removals).await) {
            // Not removed: gone meanwhile (redriven and applied, or purged
            // by another).
            if result.map_err(backend_error)? {
                purged += 1;
                purged_entries.push((l.origin.shard.clone(), l.origin.sequence));
                // Only named ids need looking for (all of a large DLQ would not).
                if selection.names_ids() {
                    gone.push(l.entry.id.clone());
                }
                // If it held its key, the key's waiting entries may go.
                if let Some(h) = letter_target(&ns, l)
                    .and_then(|t| ns.targets[t].shards.get(l.origin.shard.shard as usize))
                {
                    h.actors().await.applier.do_send(Purged(l.entry.clone()));
                }
            }
        }
        // Replays leave purged entries out (unless asked not to).
        let replays = state.replays.store().clone();
        tokio::task::spawn_blocking(move || replays.record_purged(&purged_entries))
            .await
            .expect("recording purges does not panic")
            .map_err(backend_error)?;
    }
    let not_found = selection.missing(gone.iter().map(String::as_str));
    Ok(HttpResponse::Ok().json(serde_json::json!({ "purged": purged, "not_found": not_found })))
}
