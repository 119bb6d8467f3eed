//! WriteToLog over HTTP: `POST /v1/namespaces/{ns}/log` and `.../log/batch`.
//!
//! These handlers only turn HTTP into calls to the namespace's
//! [`Ingest`](crate::actors::ingest::Ingest), which owns the write (validate,
//! route, dedup, append, answer), and its answers back into HTTP. A write is
//! answered 200 `durable: "true"` only once the backend has made it durable.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::{Instrument, Span, field, info_span};

use super::{ApiError, AppState, read_json_body};
use crate::actors::ingest::{
    Accepted, IngestError, Refusal, Relayed, SetAccepted, SetRequest, WriteRequest,
};
use crate::entry::{Durable, relay};
use crate::telemetry;

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        let status = match e.refusal {
            Refusal::Invalid => StatusCode::BAD_REQUEST,
            Refusal::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Conflict => StatusCode::CONFLICT,
            Refusal::Shed => StatusCode::TOO_MANY_REQUESTS,
            Refusal::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Timeout => StatusCode::GATEWAY_TIMEOUT,
        };
        let retry_after = matches!(e.refusal, Refusal::Shed | Refusal::Unavailable)
            .then(|| e.retry_after.unwrap_or(std::time::Duration::from_secs(1)));
        ApiError {
            status,
            durable: e.durable,
            message: e.message,
            retry_after,
            id: e.id,
            close: false,
        }
    }
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

/// A successful write, as answered. Borrows its namespace's name: a batch
/// answers with one per entry.
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

impl<'a> Written<'a> {
    fn new(namespace: &'a str, a: Accepted) -> Self {
        Self {
            durable: a.durable.as_str(),
            id: a.id,
            namespace,
            shard: a.shard,
            sequence: a.sequence,
            status: None,
        }
    }

    fn http_status(&self) -> StatusCode {
        // `fsync = "never"` answers "unknown": accepted, durability not known.
        if self.durable == Durable::True.as_str() {
            StatusCode::OK
        } else {
            StatusCode::ACCEPTED
        }
    }
}

/// Parse JSON into `T`, naming the field of any error. `what` names the
/// document in an error; it is only built on one.
pub fn parse<'a, T: Deserialize<'a>>(
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

/// A batch body's entries, each parsed or refused on its own. The fast path
/// parses every entry in one pass; if any entry is malformed, each is
/// parsed alone, so the others still go in and the error names its entry.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<Result<WriteRequest<'_>, ApiError>>, ApiError> {
    if let Ok(batch) = serde_json::from_slice::<WellFormedBatch>(bytes) {
        return Ok(batch.entries.into_iter().map(Ok).collect());
    }
    let batch: BatchRequest = parse(bytes, || "batch body".into())?;
    Ok(batch
        .entries
        .iter()
        .enumerate()
        .map(|(i, raw)| parse(raw.get().as_bytes(), || format!("entries[{i}]")))
        .collect())
}

/// What a forwarding Walden's request headers say ([`relay`]), checked: a
/// request that passed through this process already, or through too many,
/// is a loop (508); the sequences, when given, are one per entry.
struct Relay<'a> {
    hops: &'a str,
    namespace: Option<&'a str>,
    sequences: Option<Vec<u64>>,
}

impl<'a> Relay<'a> {
    fn of(
        req: &'a HttpRequest,
        own_instance: &str,
        namespace: &str,
        entries: usize,
    ) -> Result<Option<Self>, ApiError> {
        let header = |name| {
            req.headers()
                .get(name)
                .map(|v| {
                    v.to_str().map_err(|_| {
                        ApiError::bad_request(format!("the {name} header is not ASCII"))
                    })
                })
                .transpose()
        };
        let Some(hops) = header(relay::HOPS)? else {
            return Ok(None);
        };
        let own = relay::hop_id(own_instance, namespace);
        let seen: Vec<&str> = hops.split(',').map(str::trim).collect();
        if seen.contains(&own.as_str()) || seen.len() > relay::MAX_HOPS {
            return Err(ApiError::rejected(
                StatusCode::LOOP_DETECTED,
                format!(
                    "a forwarding loop: these entries passed through {} Walden namespaces ({hops}){}; they are not written again",
                    seen.len(),
                    match seen.contains(&own.as_str()) {
                        true => ", this one among them",
                        false => "",
                    }
                ),
            ));
        }
        let sequences = header(relay::ORIGIN_SEQUENCES)?
            .map(|list| {
                let seqs = list
                    .split(',')
                    .map(|s| s.trim().parse::<u64>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        ApiError::bad_request(format!(
                            "the {} header: {e}",
                            relay::ORIGIN_SEQUENCES
                        ))
                    })?;
                match seqs.len() == entries {
                    true => Ok(seqs),
                    false => Err(ApiError::bad_request(format!(
                        "the {} header names {} sequences for {entries} entries",
                        relay::ORIGIN_SEQUENCES,
                        seqs.len()
                    ))),
                }
            })
            .transpose()?;
        Ok(Some(Self {
            hops,
            namespace: header(relay::ORIGIN_NAMESPACE)?,
            sequences,
        }))
    }

    fn entry(&self, i: usize) -> Relayed<'_> {
        Relayed {
            hops: self.hops,
            namespace: self.namespace,
            sequence: self.sequences.as_ref().and_then(|s| s.get(i).copied()),
        }
    }
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
    let bytes = read_json_body(&req, body, &state.server).await?;
    let parsed: WriteRequest = parse(&bytes, || "request body".into())?;
    let relay = Relay::of(&req, &state.server.instance_id, &ns.name, 1)?;
    let span =
        info_span!("write_to_log", namespace = %ns.name, shard = field::Empty, id = field::Empty);
    telemetry::set_parent_from_traceparent(&span, traceparent_of(&req));
    let traceparent = entry_traceparent(&span, &req);
    let prepared = ns.ingest.prepare(
        parsed,
        &bytes,
        traceparent.as_deref(),
        relay.as_ref().map(|r| r.entry(0)),
    )?;
    span.record("shard", prepared.shard);
    span.record("id", prepared.entry.id.as_str());
    let answer = ns
        .ingest
        .submit(vec![prepared])
        .instrument(span)
        .await
        .pop()
        .expect("one answer");
    let written = Written::new(&ns.name, answer?);
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
    let bytes = read_json_body(&req, body, &state.server).await?;
    let requests = decode_batch(&bytes)?;
    let max = ns.config.limits.max_batch_entries;
    if requests.len() > max {
        return Err(ApiError::too_large(format!(
            "{} entries; limits.max_batch_entries is {max}",
            requests.len()
        )));
    }
    let relay = Relay::of(&req, &state.server.instance_id, &ns.name, requests.len())?;
    let span = info_span!("write_batch", namespace = %ns.name, entries = requests.len());
    telemetry::set_parent_from_traceparent(&span, traceparent_of(&req));
    let mut results: Vec<Option<BatchResult>> = (0..requests.len()).map(|_| None).collect();
    let mut ready = Vec::new();
    let mut slots = Vec::new();
    let traceparent = entry_traceparent(&span, &req);
    for (i, request) in requests.into_iter().enumerate() {
        let relayed = relay.as_ref().map(|r| r.entry(i));
        let prepared = request.and_then(|r| {
            Ok(ns
                .ingest
                .prepare(r, &bytes, traceparent.as_deref(), relayed)?)
        });
        match prepared {
            Ok(p) => {
                slots.push(i);
                ready.push(p);
            }
            Err(e) => results[i] = Some(BatchResult::Failed(error_result(&e))),
        }
    }
    let answers = ns.ingest.submit(ready).instrument(span).await;
    for (i, answer) in slots.into_iter().zip(answers) {
        results[i] = Some(match answer {
            Ok(accepted) => {
                let written = Written::new(&ns.name, accepted);
                BatchResult::Written(Written {
                    status: Some(written.http_status().as_u16()),
                    ..written
                })
            }
            Err(e) => BatchResult::Failed(error_result(&e.into())),
        });
    }
    let results: Vec<_> = results.into_iter().map(|r| r.expect("answered")).collect();
    Ok(HttpResponse::Ok().json(BatchResponse { results }))
}

/// A set of mutations, as answered.
#[derive(Debug, Serialize)]
struct SetWritten<'a> {
    durable: &'static str,
    id: String,
    namespace: &'a str,
    mutations: usize,
    sequence: u64,
}

/// `POST /v1/namespaces/{ns}/mutations`: a set of mutations, written whole
/// and applied whole, in order.
pub async fn write_set(
    state: web::Data<AppState>,
    path: web::Path<String>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let ns = state.namespace(&path)?.clone();
    let bytes = read_json_body(&req, body, &state.server).await?;
    let parsed: SetRequest = parse(&bytes, || "set body".into())?;
    let relay = Relay::of(
        &req,
        &state.server.instance_id,
        &ns.name,
        parsed.mutations.len(),
    )?;
    let span = info_span!("write_set", namespace = %ns.name, id = field::Empty,
        mutations = parsed.mutations.len());
    telemetry::set_parent_from_traceparent(&span, traceparent_of(&req));
    let traceparent = entry_traceparent(&span, &req);
    let relayed: Option<Vec<Relayed>> = relay
        .as_ref()
        .map(|r| (0..parsed.mutations.len()).map(|i| r.entry(i)).collect());
    let prepared =
        ns.ingest
            .prepare_set(parsed, &bytes, traceparent.as_deref(), relayed.as_deref())?;
    span.record("id", prepared.id.as_str());
    let SetAccepted {
        durable,
        id,
        mutations,
        sequence,
    } = ns.ingest.submit_set(prepared).instrument(span).await?;
    let status = match durable {
        Durable::True => StatusCode::OK,
        _ => StatusCode::ACCEPTED,
    };
    Ok(HttpResponse::build(status).json(SetWritten {
        durable: durable.as_str(),
        id,
        namespace: &ns.name,
        mutations,
        sequence,
    }))
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
