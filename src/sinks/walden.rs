//! `type = "walden"`: forward entries to another Walden's WriteToLog, a
//! batch at a time (`POST {url}/v1/namespaces/{namespace}/log/batch`).
//!
//! Each entry keeps its id, so the far side's idempotency index drops a
//! resend; its key, payload, headers and original write time go as they
//! were. The request's headers carry the namespace and sequences the
//! entries had where they were first written, and the Walden processes they
//! passed through ([`relay`]); the receiver records them, and refuses an
//! entry that comes back to it (508).
//!
//! A set of mutations goes whole to the far side's sets endpoint
//! (`POST .../mutations`), under its id, and is a set there too.
//!
//! Answers: `"durable":"true"` is applied; `"unknown"` is retried with the
//! same id; `"false"`, 429, 503 and 5xx are transient; 401, 403 and 404 (a
//! wrong token or namespace) are transient and fail the healthcheck, which
//! opens the breaker rather than dead-lettering every entry; 508 (a loop)
//! and other 4xx, 409 among them, are permanent for the entry.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use futures_util::future::BoxFuture;
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::{ApplyResult, Outcome, Sink, SinkError, http};
use crate::entry::{
    Delivered, HOPS_HEADER, ORIGIN_NAMESPACE_HEADER, ORIGIN_SEQUENCE_HEADER,
    PAYLOAD_ENCODING_HEADER, relay,
};

/// Payload bytes one request carries, at most (past one entry): well under
/// a receiver's default `max_body_bytes`, base64 included.
const MAX_REQUEST_BYTES: usize = 4 << 20;

pub struct WaldenSink {
    name: String,
    batch_url: reqwest::Url,
    sets_url: reqwest::Url,
    stats_url: reqwest::Url,
    /// `url` without user info or query, for errors.
    shown: String,
    token: Option<String>,
    /// The sending namespace in the hop list ([`relay::hop_id`]).
    hop: String,
    client: reqwest::Client,
}

/// One entry as the far side's batch endpoint takes it; a JSON payload goes
/// as written, byte for byte.
#[derive(Serialize)]
struct Forward<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<&'a str, &'a str>,
    lifecycle: Lifecycle,
}

#[derive(Serialize)]
struct Lifecycle {
    original_write_time_ms: u64,
}

/// One request's worth: entries that share their hops and origin namespace.
struct Request<'a> {
    hops: String,
    origin_namespace: String,
    entries: Vec<(usize, &'a Delivered)>,
    bytes: usize,
}

impl WaldenSink {
    pub fn new(
        name: &str,
        url: &str,
        namespace: &str,
        token: Option<&str>,
        timeout: Duration,
        ca_file: Option<&Path>,
        hop: String,
    ) -> Result<Self, SinkError> {
        let base = reqwest::Url::parse(url)
            .map_err(|e| SinkError::permanent(name, format!("bad url: {e}")))?;
        let at = |path: String| {
            base.join(&path)
                .map_err(|e| SinkError::permanent(name, format!("bad url: {e}")))
        };
        let stats_url = at(format!("v1/namespaces/{namespace}"))?;
        let batch_url = at(format!("v1/namespaces/{namespace}/log/batch"))?;
        let sets_url = at(format!("v1/namespaces/{namespace}/mutations"))?;
        Ok(Self {
            name: name.into(),
            client: http::client(name, timeout, ca_file)?,
            shown: http::redacted(&stats_url),
            batch_url,
            sets_url,
            stats_url,
            token: token.map(str::to_owned),
            hop,
        })
    }

    /// The write that puts `d` on the far side, as the batch endpoint takes
    /// it. Walden's own headers travel in the request's headers instead.
    fn write_of(d: &Delivered) -> Forward<'_> {
        let e = &d.entry;
        let payload = e
            .header(PAYLOAD_ENCODING_HEADER)
            .is_some_and(|v| v == "json")
            .then(|| std::str::from_utf8(&e.payload).ok())
            .flatten()
            .and_then(|s| serde_json::from_str::<&RawValue>(s).ok());
        Forward {
            id: &e.id,
            key: e.key.as_deref(),
            payload_base64: payload
                .is_none()
                .then(|| base64::engine::general_purpose::STANDARD.encode(&e.payload)),
            payload,
            headers: e
                .headers
                .iter()
                .filter(|(k, _)| !k.starts_with("walden.") && k != "traceparent")
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            lifecycle: Lifecycle {
                original_write_time_ms: e
                    .header("walden.original_write_time_ms")
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(e.timestamp_ms),
            },
        }
    }

    /// Split a batch into requests by hops and origin, within the size cap.
    fn requests<'a>(&self, batch: &'a [Delivered]) -> Vec<Request<'a>> {
        let mut out: Vec<Request<'a>> = Vec::new();
        for (i, d) in batch.iter().enumerate() {
            let hops = match d.entry.header(HOPS_HEADER) {
                Some(h) if !h.is_empty() => format!("{h},{}", self.hop),
                _ => self.hop.clone(),
            };
            let origin = d
                .entry
                .header(ORIGIN_NAMESPACE_HEADER)
                .unwrap_or(&d.shard.namespace)
                .to_string();
            let size = d.entry.payload.len() * 4 / 3 + 256;
            match out.iter_mut().find(|r| {
                r.hops == hops
                    && r.origin_namespace == origin
                    && r.bytes + size <= MAX_REQUEST_BYTES
            }) {
                Some(r) => {
                    r.entries.push((i, d));
                    r.bytes += size;
                }
                None => out.push(Request {
                    hops,
                    origin_namespace: origin,
                    entries: vec![(i, d)],
                    bytes: size,
                }),
            }
        }
        out
    }

    async fn send(&self, r: &Request<'_>) -> Vec<ApplyResult> {
        let n = r.entries.len();
        let sequences: Vec<String> = r.entries.iter().map(|(_, d)| origin_sequence(d)).collect();
        #[derive(Serialize)]
        struct Batch<'a> {
            entries: Vec<Forward<'a>>,
        }
        let body = Batch {
            entries: r.entries.iter().map(|(_, d)| Self::write_of(d)).collect(),
        };
        let req = self.relayed_post(&self.batch_url, r, &sequences, &body);
        let all = |e: SinkError| (0..n).map(|_| Err(e.clone())).collect::<Vec<_>>();
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let e = e.without_url();
                return all(SinkError::transient(
                    &self.name,
                    format!("POST {}: {}", self.shown, super::with_causes(&e)),
                ));
            }
        };
        let status = resp.status();
        let retry_after = http::retry_after(&resp);
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        if status != StatusCode::OK {
            let mut e = self.classify(status, &answer);
            e.retry_after = retry_after;
            return all(e);
        }
        let results = answer["results"].as_array().cloned().unwrap_or_default();
        if results.len() != n {
            return all(SinkError::transient(
                &self.name,
                format!(
                    "POST {} answered {} results for {n} entries",
                    self.shown,
                    results.len()
                ),
            ));
        }
        results
            .iter()
            .map(|one| {
                let status = one["status"]
                    .as_u64()
                    .and_then(|s| StatusCode::from_u16(s as u16).ok())
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                match one["durable"].as_str() {
                    Some("true") => Ok(Outcome::Applied),
                    _ => Err(self.classify(status, one)),
                }
            })
            .collect()
    }

    /// A POST of `body` to the far side, with the relay headers of `r` and
    /// the token.
    fn relayed_post(
        &self,
        url: &reqwest::Url,
        r: &Request<'_>,
        sequences: &[String],
        body: &impl Serialize,
    ) -> reqwest::RequestBuilder {
        let req = self
            .client
            .post(url.clone())
            .header(relay::HOPS, &r.hops)
            .header(relay::ORIGIN_NAMESPACE, &r.origin_namespace)
            .header(relay::ORIGIN_SEQUENCES, sequences.join(","))
            .json(body);
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Forward a set whole, under its id, to the far side's sets endpoint:
    /// it is a set there too, applied whole.
    async fn send_set(&self, set: &[Delivered]) -> Result<Outcome, SinkError> {
        let Some(first) = set.first() else {
            return Ok(Outcome::Superseded);
        };
        let Some(id) = first.entry.set_place().map(|p| p.set) else {
            return Err(SinkError::permanent(&self.name, "a set without its id"));
        };
        let request = &self.requests(set)[0];
        #[derive(Serialize)]
        struct Mutation<'a> {
            key: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            payload: Option<&'a RawValue>,
            #[serde(skip_serializing_if = "Option::is_none")]
            payload_base64: Option<String>,
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            headers: BTreeMap<&'a str, &'a str>,
        }
        #[derive(Serialize)]
        struct Set<'a> {
            id: &'a str,
            mutations: Vec<Mutation<'a>>,
            lifecycle: Lifecycle,
        }
        let mut lifecycle = None;
        let mutations = set
            .iter()
            .map(|d| {
                let w = Self::write_of(d);
                lifecycle.get_or_insert(w.lifecycle);
                Mutation {
                    key: w.key,
                    payload: w.payload,
                    payload_base64: w.payload_base64,
                    headers: w.headers,
                }
            })
            .collect();
        let body = Set {
            id: &id,
            mutations,
            lifecycle: lifecycle.expect("a set has a mutation"),
        };
        let sequences: Vec<String> = set.iter().map(origin_sequence).collect();
        let req = self.relayed_post(&self.sets_url, request, &sequences, &body);
        let resp = req.send().await.map_err(|e| {
            let e = e.without_url();
            SinkError::transient(
                &self.name,
                format!("POST {}: {}", self.shown, super::with_causes(&e)),
            )
        })?;
        let (status, retry_after) = (resp.status(), http::retry_after(&resp));
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        match (status, answer["durable"].as_str()) {
            (StatusCode::OK, Some("true")) => Ok(Outcome::Applied),
            _ => {
                let mut e = self.classify(status, &answer);
                e.retry_after = retry_after;
                Err(e)
            }
        }
    }

    /// An answer other than durable, for the whole request or one entry.
    fn classify(&self, status: StatusCode, answer: &Value) -> SinkError {
        let durable = answer["durable"].as_str().unwrap_or("false");
        let message = format!(
            "POST {}: {status}, durable {durable:?}: {}",
            self.shown,
            answer["message"].as_str().unwrap_or_default()
        );
        let transient = durable == "unknown"
            || status.is_server_error() && status != StatusCode::LOOP_DETECTED
            || matches!(
                status,
                StatusCode::TOO_MANY_REQUESTS
                    | StatusCode::REQUEST_TIMEOUT
                    | StatusCode::ACCEPTED
                    // A wrong token or namespace: the healthcheck fails too,
                    // so the breaker holds every entry until it is fixed.
                    | StatusCode::UNAUTHORIZED
                    | StatusCode::FORBIDDEN
                    | StatusCode::NOT_FOUND
            );
        let mut e = match transient {
            true => SinkError::transient(&self.name, message),
            false => SinkError::permanent(&self.name, message),
        };
        e.http_status = Some(status.as_u16());
        e
    }
}

/// The sequence `d` had where it was first written.
fn origin_sequence(d: &Delivered) -> String {
    d.entry
        .header(ORIGIN_SEQUENCE_HEADER)
        .map_or_else(|| d.sequence.to_string(), str::to_owned)
}

impl Sink for WaldenSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn max_batch(&self) -> usize {
        256
    }

    fn apply<'a>(&'a self, batch: &'a [Delivered]) -> BoxFuture<'a, Vec<ApplyResult>> {
        Box::pin(async move {
            let mut results: Vec<Option<ApplyResult>> = (0..batch.len()).map(|_| None).collect();
            // At most one entry per key in a batch: the requests may go at once.
            let requests = self.requests(batch);
            let answers =
                futures_util::future::join_all(requests.iter().map(|r| self.send(r))).await;
            for (r, answer) in requests.iter().zip(answers) {
                for ((i, _), result) in r.entries.iter().zip(answer) {
                    results[*i] = Some(result);
                }
            }
            results.into_iter().map(|r| r.expect("answered")).collect()
        })
    }

    fn apply_set<'a>(&'a self, set: &'a [Delivered]) -> BoxFuture<'a, Result<Outcome, SinkError>> {
        Box::pin(self.send_set(set))
    }

    fn healthcheck(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let mut req = self.client.get(self.stats_url.clone());
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(SinkError::transient(
                    &self.name,
                    format!(
                        "GET {} answered {}{}",
                        self.shown,
                        r.status(),
                        match r.status().as_u16() {
                            401 | 403 => ": check the target's token",
                            404 => ": check the target's namespace",
                            _ => "",
                        }
                    ),
                )),
                Err(e) => Err(SinkError::transient(
                    &self.name,
                    format!(
                        "GET {}: {}",
                        self.shown,
                        super::with_causes(&e.without_url())
                    ),
                )),
            }
        })
    }
}
