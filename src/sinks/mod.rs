//! Sinks deliver entries to a namespace's target.
//!
//! Every sink has the same shape: a struct built from its `TargetConfig` by
//! `new` (which checks the config but does not connect), and an impl of
//! [`Sink`]: apply a batch, answering each entry with success or a classified
//! [`SinkError`], plus a `healthcheck`. A target being down never takes Walden
//! out of service; it shows in stats and metrics instead.

mod file;
mod http;
mod kafka;
mod memcached;
pub mod mutation;
pub mod postgres;
mod redis;
mod stdout;
mod walden;

use std::time::Duration;

use base64::Engine;
use futures_util::future::BoxFuture;
use serde::Serialize;

pub use self::walden::WaldenSink;
pub use file::FileSink;
pub use http::HttpSink;
pub use kafka::KafkaSink;
pub use memcached::MemcachedSink;
pub use postgres::PostgresSink;
pub use redis::RedisSink;
pub use stdout::StdoutSink;

use crate::config::TargetConfig;
use crate::entry::{
    Delivered, IDEMPOTENCY_KEY_HEADER, PAYLOAD_ENCODING_HEADER, SET_HEADER, SET_INDEX_HEADER,
    SET_SIZE_HEADER, TARGETS_HEADER,
};

/// Whether retrying can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retry with backoff: the target is down, slow or overloaded.
    Transient,
    /// Retrying the same entry will fail the same way.
    Permanent,
}

/// What a successful delivery did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The target took the entry.
    Applied,
    /// The target already held a newer version; nothing changed.
    Superseded,
}

/// One entry's answer from a sink.
pub type ApplyResult = Result<Outcome, SinkError>;

/// A failed delivery, classified.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{target} ({class:?}): {message}")]
pub struct SinkError {
    pub target: String,
    pub class: ErrorClass,
    pub message: String,
    /// The target asked to wait this long (e.g. HTTP `Retry-After`).
    pub retry_after: Option<Duration>,
    /// The HTTP status the target answered, for `retry.permanent_http_statuses`.
    pub http_status: Option<u16>,
}

impl SinkError {
    pub fn transient(target: &str, message: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            class: ErrorClass::Transient,
            message: message.into(),
            retry_after: None,
            http_status: None,
        }
    }

    pub fn permanent(target: &str, message: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            class: ErrorClass::Permanent,
            message: message.into(),
            retry_after: None,
            http_status: None,
        }
    }

    pub fn is_transient(&self) -> bool {
        self.class == ErrorClass::Transient
    }
}

/// A target that entries are delivered to.
pub trait Sink: Send + Sync {
    /// The target's name, as configured.
    fn name(&self) -> &str;

    /// Deliver a batch. The answer has one result per entry, in order.
    /// Unless the sink [applies in order](Sink::applies_in_order), a batch
    /// holds at most one entry per key, so its entries may be applied
    /// concurrently (an HTTP request each) or as a set (a database upsert).
    fn apply<'a>(&'a self, batch: &'a [Delivered]) -> BoxFuture<'a, Vec<ApplyResult>>;

    /// Apply a set of mutations (`POST .../mutations`) whole and in its
    /// order, or nothing of it, where the target can: one transaction, one
    /// request, one fsynced append. The default applies the mutations one
    /// call each, in order: a failure part way leaves the ones before it
    /// applied, and the retry applies them again, which the version guard
    /// makes harmless but which a reader can see between.
    fn apply_set<'a>(&'a self, set: &'a [Delivered]) -> BoxFuture<'a, Result<Outcome, SinkError>> {
        Box::pin(async move {
            let mut outcome = Outcome::Superseded;
            for d in set {
                match self.apply(std::slice::from_ref(d)).await.pop() {
                    Some(Ok(Outcome::Applied)) => outcome = Outcome::Applied,
                    Some(Ok(Outcome::Superseded)) => {}
                    Some(Err(e)) => return Err(e),
                    None => {
                        return Err(SinkError::transient(
                            self.name(),
                            "the target gave no answer for a mutation",
                        ));
                    }
                }
            }
            Ok(outcome)
        })
    }

    /// [`Sink::apply_set`] of several sets run together, one after another,
    /// still applies all of it or none (one transaction, one script, one
    /// fsynced write): the sets ready at once then share one call, and one
    /// commit.
    fn applies_sets_together(&self) -> bool {
        false
    }

    /// The sink applies a batch in its order, whole or not at all (one
    /// append for the file target). Such a sink may get
    /// several entries of one key in a batch, in their order: a failure
    /// fails them all, so none overtakes another.
    fn applies_in_order(&self) -> bool {
        false
    }

    /// Each entry of a batch goes out as a request of its own, all at once
    /// (an HTTP POST, a Redis script): the target's concurrency limit
    /// counts entries. Otherwise it counts calls.
    fn concurrent_entries(&self) -> bool {
        false
    }

    /// The most entries one call takes. A sink whose entries go out
    /// concurrently keeps this small; one that writes a batch in one go
    /// takes more, so a call's fixed cost (an fsync) is shared.
    fn max_batch(&self) -> usize {
        64
    }

    /// How long what [`Sink::apply`] wrote may wait for a [`Sink::flush`].
    /// `None` (the default): `apply` is durable by itself. With `Some`, an
    /// entry counts as applied (it is acknowledged, its letter or delayed
    /// copy removed) only once a flush after its apply has succeeded; the
    /// applier flushes at most this long after an apply, and before it
    /// stops. The file target defers its fsync so.
    fn flush_within(&self) -> Option<Duration> {
        None
    }

    /// Make durable everything `apply` wrote before this call.
    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }

    /// Whether the target can take deliveries now.
    fn healthcheck(&self) -> BoxFuture<'_, Result<(), SinkError>>;
}

/// Build the sink a target config names. Checks, does not connect.
/// `hop` names the sending namespace to a Walden it forwards to
/// ([`crate::entry::relay::hop_id`]).
pub fn build(target: &TargetConfig, hop: &str) -> Result<Box<dyn Sink>, SinkError> {
    Ok(match target {
        TargetConfig::Memcached {
            name,
            url,
            key_prefix,
            ttl_s,
            pool_size,
            timeout_ms,
        } => Box::new(MemcachedSink::new(
            name,
            url,
            key_prefix,
            *ttl_s,
            *pool_size,
            Duration::from_millis(*timeout_ms),
        )?),
        TargetConfig::Walden {
            name,
            url,
            namespace,
            token,
            timeout_ms,
            ca_file,
        } => Box::new(WaldenSink::new(
            name,
            url,
            namespace,
            token.as_deref(),
            Duration::from_millis(*timeout_ms),
            ca_file.as_deref(),
            hop.to_string(),
        )?),
        TargetConfig::Stdout { name } => Box::new(StdoutSink::new(name)),
        TargetConfig::File { name, path } => Box::new(FileSink::new(name, path)?),
        TargetConfig::Http {
            name,
            url,
            timeout_ms,
            ca_file,
        } => Box::new(HttpSink::new(
            name,
            url,
            Duration::from_millis(*timeout_ms),
            ca_file.as_deref(),
        )?),
        TargetConfig::Postgres {
            name,
            url,
            table,
            pool_size,
            timeout_ms,
        } => Box::new(PostgresSink::new(
            name,
            url,
            table,
            *pool_size,
            Duration::from_millis(*timeout_ms),
        )?),
        TargetConfig::Redis {
            name,
            url,
            key_prefix,
            timeout_ms,
            ca_file,
        } => Box::new(RedisSink::new(
            name,
            url,
            key_prefix,
            Duration::from_millis(*timeout_ms),
            ca_file.as_deref(),
        )?),
        TargetConfig::Kafka {
            name,
            brokers,
            topic,
            librdkafka,
            timeout_ms,
            transactions,
        } => Box::new(KafkaSink::new(
            name,
            brokers,
            topic,
            librdkafka,
            Duration::from_millis(*timeout_ms),
            // One per process, namespace and target: a second producer with
            // the id (a restart) fences the first out.
            transactions.then(|| format!("walden-{hop}-{name}")),
        )?),
    })
}

/// An error and the causes under it (a certificate not trusted, a refused
/// connection), each said once. Client errors here carry no credentials.
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let said = s.to_string();
        if !text.contains(&said) {
            text = format!("{text}: {said}");
        }
        source = s.source();
    }
    text
}

/// The JSON form of a delivered entry, shared by every JSON-speaking sink.
#[derive(Serialize)]
pub struct DeliveredJson<'a> {
    pub namespace: &'a str,
    pub shard: u32,
    pub sequence: u64,
    pub id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<&'a str>,
    pub headers: Headers<'a>,
    pub timestamp_ms: u64,
    pub due_ms: u64,
    /// The payload as written, when it was written as JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<&'a serde_json::value::RawValue>,
    /// The payload's bytes, when it was written as base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    /// A mutation of a set: the set's id, its place in it, and its size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set_index: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set_size: Option<u32>,
}

impl<'a> DeliveredJson<'a> {
    pub fn new(d: &'a Delivered) -> Self {
        let e = &d.entry;
        let json_payload = e
            .header(PAYLOAD_ENCODING_HEADER)
            .is_some_and(|v| v == "json")
            .then(|| std::str::from_utf8(&e.payload).ok())
            .flatten()
            .and_then(|s| serde_json::from_str::<&serde_json::value::RawValue>(s).ok());
        let payload_base64 = json_payload
            .is_none()
            .then(|| base64::engine::general_purpose::STANDARD.encode(&e.payload));
        let headers = Headers(&e.headers);
        let place = e.set_place();
        Self {
            set_index: place.as_ref().map(|p| p.index),
            set_size: place.as_ref().map(|p| p.size),
            set: place.map(|p| p.set),
            namespace: &d.shard.namespace,
            shard: d.shard.shard,
            sequence: d.sequence,
            id: &e.id,
            key: e.key.as_deref(),
            headers,
            timestamp_ms: e.timestamp_ms,
            due_ms: e.due_ms,
            payload: json_payload,
            payload_base64,
        }
    }

    /// Append one JSON line, newline included, to `out` (a batch's buffer:
    /// no line of its own).
    pub fn write_line(d: &Delivered, out: &mut Vec<u8>) {
        serde_json::to_writer(&mut *out, &DeliveredJson::new(d)).expect("JSON of owned data");
        out.push(b'\n');
    }
}

/// An entry's headers as a JSON object of strings, written straight from
/// the entry (no map is built); Walden's own bookkeeping headers are left
/// out.
pub struct Headers<'a>(&'a [(String, String)]);

impl Serialize for Headers<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let shown = |(k, _): &&(String, String)| {
            !matches!(
                k.as_str(),
                PAYLOAD_ENCODING_HEADER
                    | TARGETS_HEADER
                    | IDEMPOTENCY_KEY_HEADER
                    | SET_HEADER
                    | SET_INDEX_HEADER
                    | SET_SIZE_HEADER
            )
        };
        let mut map = s.serialize_map(Some(self.0.iter().filter(shown).count()))?;
        for (k, v) in self.0.iter().filter(shown) {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}
