//! WriteToLog: `POST /v1/namespaces/{ns}/log` and `.../log/batch`.
//!
//! A write is answered 200 `durable: "true"` only after the backend has made
//! it durable. The handler hands the entry to its shard's Ingest actor with
//! `try_send` (a full mailbox is 429) and awaits the log committer's answer
//! for at most `server.ack_timeout_ms` (then 504 `"unknown"`).

use std::collections::BTreeMap;
use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine;
use bytes::Bytes;
use rand::RngExt;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use tokio::sync::oneshot;
use tracing::{Instrument, Span, field, info_span};

use super::{ApiError, AppState, read_json_body};
use crate::actors::ingest::Write;
use crate::actors::supervisor::NamespaceRuntime;
use crate::backends::embedded::{Appended, LogError};
use crate::backends::{BackendError, EntryRejected};
use crate::entry::{Durable, Entry, PAYLOAD_ENCODING_HEADER, now_ms};
use crate::routing::shard_of;
use crate::sinks::mutation;
use crate::state::dedup::{self, Check};
use crate::telemetry;
use std::time::Duration;

/// Header names under this prefix are Walden's own.
const RESERVED_PREFIX: &str = "walden.";
const MAX_HEADER_NAME: usize = 256;
const MAX_HEADER_VALUE: usize = 8192;

/// The body of one write.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteRequest<'a> {
    /// Any JSON value, delivered as written. Borrowed from the body, which
    /// the entry's payload then shares rather than copies.
    #[serde(default, borrow, deserialize_with = "present")]
    pub payload: Option<&'a RawValue>,
    /// Opaque bytes, base64-encoded.
    pub payload_base64: Option<String>,
    /// Routes the entry to a shard and orders entries that share it.
    pub key: Option<String>,
    /// Client id; a UUIDv7 is generated if absent.
    pub id: Option<String>,
    pub lifecycle: Option<Lifecycle>,
    /// The name of one of the namespace's targets.
    pub target: Option<String>,
    pub headers: Option<BTreeMap<String, String>>,
}

/// When the entry may be delivered, and when it was first written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lifecycle {
    pub delay_ms: Option<u64>,
    /// A uniform random extra delay in `[0, jitter_ms]`.
    pub jitter_ms: Option<u64>,
    pub original_write_time_ms: Option<u64>,
}

/// `"payload": null` is a payload (JSON null), not a missing one.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest<'a> {
    #[serde(borrow)]
    entries: Vec<&'a RawValue>,
}

/// A batch whose every entry parses.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WellFormedBatch<'a> {
    #[serde(borrow)]
    entries: Vec<WriteRequest<'a>>,
}

/// A successful write. Borrows its namespace's name: a batch answers with
/// one per entry.
#[derive(Debug, Serialize)]
pub struct Written<'a> {
    pub durable: &'static str,
    pub id: String,
    pub namespace: &'a str,
    pub shard: u32,
    pub sequence: u64,
    /// Set in a batch's results, where each entry carries its own status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

impl Written<'_> {
    fn http_status(&self) -> StatusCode {
        // `fsync = "never"` answers "unknown": accepted, durability not known.
        if self.durable == Durable::True.as_str() {
            StatusCode::OK
        } else {
            StatusCode::ACCEPTED
        }
    }
}

/// An entry ready to append.
struct Prepared {
    shard: u32,
    entry: Entry,
    /// The client chose the id, so it is an idempotency key.
    client_id: bool,
}

/// Parse JSON into `T`, naming the field of any error. `what` names the
/// document in an error; it is only built on one.
fn parse<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    what: impl FnOnce() -> String,
) -> Result<T, ApiError> {
    // The plain parse is the fast path; a failed one is parsed again with
    // path tracking, for an error that names the field.
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let what = what();
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        if matches!(path.as_str(), "." | "?" | "") {
            ApiError::bad_request(format!("invalid {what}: {}", e.inner()))
        } else {
            ApiError::bad_request(format!("invalid {what} at `{path}`: {}", e.inner()))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("invalid {what}: {e}")))?;
    Ok(value)
}

/// Check a request against the namespace's limits and build its entry.
/// `body` is the request's body, which a JSON payload is a slice of;
/// `traceparent` is the write's, for the entry's header. An error names the
/// entry's id (given or generated).
fn prepare(
    ns: &NamespaceRuntime,
    mut req: WriteRequest<'_>,
    body: &Bytes,
    traceparent: Option<&str>,
) -> Result<Prepared, ApiError> {
    let client_id = req.id.is_some();
    let id = req
        .id
        .take()
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let parts = check(ns, req, &id, body, traceparent).map_err(|e| e.with_id(&id))?;
    let shard = shard_of(
        ns.config.route_hash(),
        parts.key.as_deref(),
        &id,
        ns.config.shards,
    );
    let entry = Entry {
        id,
        key: parts.key,
        headers: parts.headers,
        payload: parts.payload,
        timestamp_ms: 0,
        due_ms: parts.due_ms,
    };
    ns.backend.check_entry(&entry).map_err(|e| {
        match e {
            EntryRejected::TooLarge(why) => ApiError::too_large(why),
            EntryRejected::Invalid(why) => ApiError::bad_request(why),
        }
        .with_id(&entry.id)
    })?;
    Ok(Prepared {
        shard,
        client_id,
        entry,
    })
}

/// What a valid request makes of its entry, besides the id.
struct Parts {
    key: Option<String>,
    headers: Vec<(String, String)>,
    payload: Bytes,
    due_ms: u64,
}

fn check(
    ns: &NamespaceRuntime,
    req: WriteRequest<'_>,
    id: &str,
    body: &Bytes,
    traceparent: Option<&str>,
) -> Result<Parts, ApiError> {
    let limits = &ns.config.limits;
    let (payload, json) = match (req.payload, req.payload_base64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give exactly one of `payload` and `payload_base64`, not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::bad_request(
                "give exactly one of `payload` (any JSON value) and `payload_base64`",
            ));
        }
        (Some(raw), None) => {
            if nested_deeper_than(raw.get().as_bytes(), limits.max_payload_depth) {
                return Err(ApiError::bad_request(format!(
                    "`payload` is nested deeper than limits.max_payload_depth ({})",
                    limits.max_payload_depth
                )));
            }
            (share(body, raw.get().as_bytes()), true)
        }
        (None, Some(b64)) => {
            if b64.len() / 4 * 3 > limits.max_payload_bytes + 3 {
                return Err(payload_too_large(limits.max_payload_bytes));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| {
                    ApiError::bad_request(format!("`payload_base64` is not valid base64: {e}"))
                })?;
            (Bytes::from(bytes), false)
        }
    };
    if payload.len() > limits.max_payload_bytes {
        return Err(payload_too_large(limits.max_payload_bytes));
    }
    let key = routing_key(ns, req.key, &payload)?;
    if let Some(key) = &key {
        check_len("key", key.len(), limits.max_key_bytes)?;
    }
    if id.is_empty() {
        return Err(ApiError::bad_request("`id` must not be empty"));
    }
    check_len("id", id.len(), limits.max_id_bytes)?;
    if let Some(target) = &req.target {
        let ours = ns.config.target.name();
        if target != ours {
            return Err(ApiError::bad_request(format!(
                "`target`: namespace {:?} has no target {target:?} (its target is {ours:?})",
                ns.name
            )));
        }
    }
    let user_headers = req.headers.unwrap_or_default();
    if user_headers.len() > limits.max_headers {
        return Err(ApiError::bad_request(format!(
            "`headers`: {} headers; the limit is {}",
            user_headers.len(),
            limits.max_headers
        )));
    }
    let mut headers = Vec::with_capacity(user_headers.len() + 3);
    for (name, value) in user_headers {
        if name.is_empty() || name.len() > MAX_HEADER_NAME || value.len() > MAX_HEADER_VALUE {
            return Err(ApiError::bad_request(format!(
                "`headers`: names must be 1 to {MAX_HEADER_NAME} bytes and values at most {MAX_HEADER_VALUE}"
            )));
        }
        if name.starts_with(RESERVED_PREFIX) || name == "traceparent" {
            return Err(ApiError::bad_request(format!(
                "`headers.{name}`: headers named traceparent or starting with {RESERVED_PREFIX:?} are reserved"
            )));
        }
        headers.push((name, value));
    }
    let lifecycle = req.lifecycle.unwrap_or_default();
    let delay = lifecycle.delay_ms.unwrap_or(0);
    // A delayed write without its own jitter gets the namespace's.
    let default_jitter = if delay > 0 {
        ns.config.delay.jitter_ms
    } else {
        0
    };
    let jitter = lifecycle.jitter_ms.unwrap_or(default_jitter);
    let max_delay = ns.config.delay.max_delay_ms;
    if delay.saturating_add(jitter) > max_delay {
        return Err(ApiError::bad_request(format!(
            "`lifecycle`: delay_ms + jitter_ms is {}; delay.max_delay_ms is {max_delay}",
            delay.saturating_add(jitter)
        )));
    }
    // Computed once, here, and stored: a replay fires at a known time.
    let due_ms = if delay == 0 && jitter == 0 {
        0
    } else {
        now_ms() + delay + rand::rng().random_range(0..=jitter)
    };
    if json {
        headers.push((PAYLOAD_ENCODING_HEADER.into(), "json".into()));
    }
    if let Some(t) = lifecycle.original_write_time_ms {
        headers.push(("walden.original_write_time_ms".into(), t.to_string()));
    }
    if let Some(tp) = traceparent {
        headers.push(("traceparent".into(), tp.to_owned()));
    }
    Ok(Parts {
        key,
        headers,
        payload,
        due_ms,
    })
}

/// The key a write is routed by. A namespace whose target versions rows
/// routes by the mutation's key, so every write to a row shares one shard
/// and its sequence orders them; a `key` that differs is refused.
fn routing_key(
    ns: &NamespaceRuntime,
    key: Option<String>,
    payload: &[u8],
) -> Result<Option<String>, ApiError> {
    let target = &ns.config.target;
    let why = || {
        format!(
            "namespace {:?} applies to a {} target, which versions each row by its shard's sequence",
            ns.name,
            target.kind()
        )
    };
    match (mutation::row_of(target, payload), key) {
        (Ok(None), key) => Ok(key),
        (Err(e), _) => Err(ApiError::bad_request(format!("`payload`: {e} ({})", why()))),
        (Ok(Some(row)), None) => Ok(Some(row)),
        (Ok(Some(row)), Some(key)) if key == row => Ok(Some(key)),
        (Ok(Some(row)), Some(key)) => Err(ApiError::bad_request(format!(
            "`key` {key:?} is not the mutation's key {row:?}: {}, so its writes are routed by the mutation's key; leave `key` out or make it equal",
            why()
        ))),
    }
}

/// Whether the arrays and objects of valid JSON `text` nest deeper than
/// `max`. One pass over the bytes, skipping strings.
fn nested_deeper_than(text: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in text {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// `part` of `body` as a `Bytes` that shares `body`'s buffer; a copy if it
/// is not a slice of it.
fn share(body: &Bytes, part: &[u8]) -> Bytes {
    let within = body.as_ptr_range();
    let range = part.as_ptr_range();
    if within.start <= range.start && range.end <= within.end {
        body.slice_ref(part)
    } else {
        Bytes::copy_from_slice(part)
    }
}

fn check_len(field: &str, len: usize, max: usize) -> Result<(), ApiError> {
    if len > max {
        return Err(ApiError::bad_request(format!(
            "`{field}` is {len} bytes; the limit is {max}"
        )));
    }
    Ok(())
}

fn payload_too_large(max: usize) -> ApiError {
    ApiError::too_large(format!(
        "the payload is larger than limits.max_payload_bytes ({max})"
    ))
}

/// What the client is told about a failed append.
fn append_error(e: BackendError) -> ApiError {
    match e {
        e if e.is_busy() => ApiError::shed(format!("{e}; retry later")),
        BackendError::Embedded(LogError::InvalidRecord(e)) => ApiError::bad_request(e.to_string()),
        // The backend may have it: 504, as for an answer that never came.
        e if e.durable() == Durable::Unknown => {
            ApiError::timeout(format!("{e}; the outcome is unknown"))
        }
        e => ApiError::unavailable(e.durable(), e.to_string()),
    }
}

/// Append prepared entries; one answer per entry, in order. A client id
/// seen within the namespace's dedup window gets its original answer.
fn submit<'a>(
    state: &'a AppState,
    ns: &'a Arc<NamespaceRuntime>,
    items: Vec<Prepared>,
) -> futures_util::future::BoxFuture<'a, Vec<Result<Written<'a>, ApiError>>> {
    Box::pin(async move {
        let n = items.len();
        let mut answers: Vec<Option<Result<Written<'a>, ApiError>>> =
            (0..n).map(|_| None).collect();
        let window = Duration::from_millis(ns.config.dedup_window_ms);
        let mut to_send = Vec::with_capacity(n);
        let mut waiting = Vec::new();
        let mut lookups = Vec::new();
        let mut keyed = Vec::new();
        for (i, p) in items.into_iter().enumerate() {
            if !p.client_id || window.is_zero() {
                to_send.push((i, p, None));
            } else {
                lookups.push((p.entry.id.clone(), dedup::fingerprint(&p.entry)));
                keyed.push((i, p));
            }
        }
        // The index lives in fjall: look ids up off the HTTP worker thread.
        let checks = if lookups.is_empty() {
            Vec::new()
        } else {
            let (index, name) = (state.dedup.clone(), ns.name.clone());
            tokio::task::spawn_blocking(move || {
                lookups
                    .into_iter()
                    .map(|(id, fp)| (fp, index.check(&name, &id, fp, window)))
                    .collect()
            })
            .await
            .expect("dedup checks do not panic")
        };
        for ((i, p), (fingerprint, check)) in keyed.into_iter().zip(checks) {
            match check {
                Ok(Check::Duplicate(a)) => {
                    answers[i] = Some(Ok(accepted_answer(ns, &p.entry.id, a)))
                }
                Ok(Check::Conflict(a)) => {
                    answers[i] = Some(Err(conflict(&p.entry.id, a).with_id(&p.entry.id)))
                }
                Ok(Check::Wait(rx)) => waiting.push((i, p, rx)),
                Ok(Check::Claimed(claim)) => to_send.push((i, p, Some((claim, fingerprint)))),
                Err(e) => {
                    let e = ApiError::unavailable(Durable::False, e.to_string());
                    answers[i] = Some(Err(e.with_id(&p.entry.id)))
                }
            }
        }
        for (i, answer) in append(state, ns, to_send).await {
            answers[i] = Some(answer);
        }
        // Duplicates of writes that were in flight: wait for those, then
        // answer as they were answered (or write, if they failed).
        for (i, p, mut rx) in waiting {
            while rx.changed().await.is_ok() {}
            answers[i] = Some(submit(state, ns, vec![p]).await.remove(0));
        }
        answers
            .into_iter()
            .map(|a| a.expect("every entry is answered"))
            .collect()
    })
}

fn accepted_answer<'a>(ns: &'a NamespaceRuntime, id: &str, a: dedup::Accepted) -> Written<'a> {
    Written {
        durable: Durable::True.as_str(),
        id: id.to_string(),
        namespace: &ns.name,
        shard: a.shard,
        sequence: a.sequence,
        status: None,
    }
}

fn conflict(id: &str, a: dedup::Accepted) -> ApiError {
    ApiError::rejected(
        StatusCode::CONFLICT,
        format!(
            "id {id:?} was already accepted (sequence {}) with a different body; use a new id",
            a.sequence
        ),
    )
}

type Claimed = Option<(dedup::Claim, u64)>;

/// Hand entries to their shards' Ingest actors and wait for the log's
/// answers. A claimed id is recorded once its entry is durable.
async fn append<'a>(
    state: &AppState,
    ns: &'a Arc<NamespaceRuntime>,
    items: Vec<(usize, Prepared, Claimed)>,
) -> Vec<(usize, Result<Written<'a>, ApiError>)> {
    let n = items.len();
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return out;
    }
    let Ok(_permits) = state.in_flight.clone().try_acquire_many_owned(n as u32) else {
        let e = ApiError::shed("too many writes in flight (server.max_in_flight); retry later");
        return items
            .into_iter()
            .map(|(i, p, _)| (i, Err(e.clone().with_id(&p.entry.id))))
            .collect();
    };
    let dedups = ns.config.dedup_window_ms > 0;
    let mut waiting = Vec::with_capacity(n);
    let mut by_shard: BTreeMap<u32, Vec<(usize, Entry, Claimed)>> = BTreeMap::new();
    for (i, p, claim) in items {
        by_shard
            .entry(p.shard)
            .or_default()
            .push((i, p.entry, claim));
    }
    for (shard, entries) in by_shard {
        let handle = &ns.shards[shard as usize];
        let mut msg = Vec::with_capacity(entries.len());
        let mut rxs = Vec::with_capacity(entries.len());
        for (i, entry, claim) in entries {
            let (tx, rx) = oneshot::channel();
            // A generated id is claimed only if its answer is "unknown", so
            // that a retry with it is safe: keep what the claim needs.
            let fingerprint = (claim.is_none() && dedups).then(|| dedup::fingerprint(&entry));
            rxs.push((i, entry.id.clone(), rx, claim, fingerprint));
            msg.push((entry, tx));
        }
        let sent = match ns.backend.queues_writes_itself() {
            true => {
                ns.backend.append_all(&handle.shard, msg);
                Ok(())
            }
            false => handle.ingest.try_send(Write(msg)),
        };
        match sent {
            Ok(()) => waiting.extend(
                rxs.into_iter()
                    .map(|(i, id, rx, c, fp)| (i, id, shard, rx, c, fp)),
            ),
            Err(e) => {
                let err = match e {
                    actix::prelude::SendError::Full(_) => ApiError::shed(format!(
                        "shard {shard} of {:?} is overloaded; retry later",
                        ns.name
                    )),
                    actix::prelude::SendError::Closed(_) => ApiError::unavailable(
                        Durable::False,
                        format!("shard {shard} of {:?} is restarting; retry", ns.name),
                    ),
                };
                out.extend(
                    rxs.into_iter()
                        .map(|(i, id, ..)| (i, Err(err.clone().with_id(&id)))),
                );
            }
        }
    }
    // One timer for the whole request, not one per entry.
    let deadline = tokio::time::sleep(state.server.ack_timeout());
    tokio::pin!(deadline);
    for (i, id, shard, mut rx, claim, fingerprint) in waiting {
        let answered = tokio::select! {
            biased;
            answer = &mut rx => Ok(answer),
            () = &mut deadline => Err(()),
        };
        let answer = match answered {
            Ok(Ok(Ok(appended))) => {
                ns.shards[shard as usize].stats.written.inc();
                record(&state.dedup, &ns.name, &id, shard, &appended, claim);
                Ok(Written {
                    durable: appended.durable.as_str(),
                    id,
                    namespace: &ns.name,
                    shard,
                    sequence: appended.offset,
                    status: None,
                })
            }
            Ok(Ok(Err(e))) => Err(append_error(e).with_id(&id)),
            Ok(Err(_)) => Err(ApiError::unavailable(
                Durable::Unknown,
                "the write was lost in flight (an actor restarted); its outcome is unknown",
            )
            .with_id(&id)),
            Err(_) => {
                // A generated id is claimed now, before the client hears
                // "unknown" and may retry with it.
                let claim = claim.or_else(|| claim_late(state, ns, &id, fingerprint?));
                // Keep the id claimed until the log answers, so a retry
                // with the same id waits for the real outcome.
                let err = ApiError::timeout(format!(
                    "no answer from the backend within server.ack_timeout_ms ({} ms); the outcome is unknown",
                    state.server.ack_timeout_ms
                ))
                .with_id(&id);
                if claim.is_some() {
                    let (dedup, ns_name) = (state.dedup.clone(), ns.name.clone());
                    actix::spawn(async move {
                        if let Ok(Ok(appended)) = rx.await {
                            record(&dedup, &ns_name, &id, shard, &appended, claim);
                        }
                    });
                }
                Err(err)
            }
        };
        out.push((i, answer));
    }
    out
}

/// Claim a generated id whose write timed out, so that a retry with it
/// waits for the real outcome rather than appending again.
fn claim_late(state: &AppState, ns: &NamespaceRuntime, id: &str, fingerprint: u64) -> Claimed {
    let window = Duration::from_millis(ns.config.dedup_window_ms);
    match state.dedup.check(&ns.name, id, fingerprint, window) {
        Ok(Check::Claimed(claim)) => Some((claim, fingerprint)),
        // A fresh UUID is known nowhere else.
        _ => None,
    }
}

/// Record a durable write under its claimed id, then release the claim (on
/// the blocking pool: the index lives in fjall). A duplicate waiting on the
/// claim wakes after the record is written.
fn record(
    dedup: &Arc<crate::state::DedupIndex>,
    namespace: &str,
    id: &str,
    shard: u32,
    appended: &Appended,
    claim: Claimed,
) {
    let Some((claim, fingerprint)) = claim else {
        return;
    };
    let accepted = (appended.durable == Durable::True).then_some(dedup::Accepted {
        fingerprint,
        shard,
        sequence: appended.offset,
        written_ms: appended.timestamp_ms,
    });
    let (dedup, namespace, id) = (dedup.clone(), namespace.to_string(), id.to_string());
    tokio::task::spawn_blocking(move || {
        if let Some(accepted) = accepted
            && let Err(error) = dedup.record(&namespace, &id, accepted)
        {
            tracing::warn!(%error, namespace, id, "Could not record an idempotency key.");
        }
        drop(claim);
    });
}

fn traceparent_of(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
}

/// The traceparent a request's entries carry: the write span's context when
/// tracing export is on; otherwise the client's own, unchanged. Found once
/// per request, not per entry.
fn entry_traceparent(span: &Span, req: &HttpRequest) -> Option<String> {
    telemetry::traceparent(span).or_else(|| traceparent_of(req).map(str::to_owned))
}

/// `POST /v1/namespaces/{ns}/log`
pub async fn write_one(
    state: web::Data<AppState>,
    path: web::Path<String>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let ns = state.namespace(&path)?.clone();
    let bytes = read_json_body(&req, body, state.server.max_body_bytes).await?;
    let parsed: WriteRequest = parse(&bytes, || "request body".into())?;
    let span =
        info_span!("write_to_log", namespace = %ns.name, shard = field::Empty, id = field::Empty);
    telemetry::set_parent_from_traceparent(&span, traceparent_of(&req));
    let traceparent = entry_traceparent(&span, &req);
    let prepared = prepare(&ns, parsed, &bytes, traceparent.as_deref())?;
    span.record("shard", prepared.shard);
    span.record("id", prepared.entry.id.as_str());
    let answer = submit(&state, &ns, vec![prepared])
        .instrument(span)
        .await
        .pop()
        .expect("one answer");
    let written = answer?;
    Ok(HttpResponse::build(written.http_status()).json(written))
}

/// `POST /v1/namespaces/{ns}/log/batch`: one result per entry, in order, each
/// with its own status.
pub async fn write_batch(
    state: web::Data<AppState>,
    path: web::Path<String>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let ns = state.namespace(&path)?.clone();
    let bytes = read_json_body(&req, body, state.server.max_body_bytes).await?;
    // The fast path parses every entry in one pass; if any entry is
    // malformed, each is parsed on its own, so the others still go in and
    // the error names its entry.
    let requests: Vec<Result<WriteRequest, ApiError>> =
        match serde_json::from_slice::<WellFormedBatch>(&bytes) {
            Ok(batch) => batch.entries.into_iter().map(Ok).collect(),
            Err(_) => {
                let batch: BatchRequest = parse(&bytes, || "batch body".into())?;
                batch
                    .entries
                    .iter()
                    .enumerate()
                    .map(|(i, raw)| parse(raw.get().as_bytes(), || format!("entries[{i}]")))
                    .collect()
            }
        };
    let max = ns.config.limits.max_batch_entries;
    if requests.len() > max {
        return Err(ApiError::too_large(format!(
            "{} entries; limits.max_batch_entries is {max}",
            requests.len()
        )));
    }
    let span = info_span!("write_batch", namespace = %ns.name, entries = requests.len());
    telemetry::set_parent_from_traceparent(&span, traceparent_of(&req));
    let mut results: Vec<Option<BatchResult>> = (0..requests.len()).map(|_| None).collect();
    let mut ready = Vec::new();
    let mut slots = Vec::new();
    let traceparent = entry_traceparent(&span, &req);
    for (i, request) in requests.into_iter().enumerate() {
        let prepared = request.and_then(|r| prepare(&ns, r, &bytes, traceparent.as_deref()));
        match prepared {
            Ok(p) => {
                slots.push(i);
                ready.push(p);
            }
            Err(e) => results[i] = Some(BatchResult::Failed(error_result(&e))),
        }
    }
    let answers = submit(&state, &ns, ready).instrument(span).await;
    for (i, answer) in slots.into_iter().zip(answers) {
        results[i] = Some(match answer {
            Ok(written) => BatchResult::Written(Written {
                status: Some(written.http_status().as_u16()),
                ..written
            }),
            Err(e) => BatchResult::Failed(error_result(&e)),
        });
    }
    let results: Vec<_> = results.into_iter().map(|r| r.expect("answered")).collect();
    Ok(HttpResponse::Ok().json(BatchResponse { results }))
}

#[derive(Serialize)]
struct BatchResponse<'a> {
    results: Vec<BatchResult<'a>>,
}

/// One entry's result in a batch: a write with its status, or an error.
/// The status is a field of `Written`, not a `#[serde(flatten)]` wrapper,
/// which would serialize every result through a map.
#[derive(Serialize)]
#[serde(untagged)]
enum BatchResult<'a> {
    Written(Written<'a>),
    Failed(serde_json::Value),
}

fn error_result(e: &ApiError) -> serde_json::Value {
    let mut v = e.json();
    v["status"] = e.status.as_u16().into();
    v
}
