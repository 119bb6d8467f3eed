//! Ingest: the one write path. Every write to every namespace, whatever its
//! backend, goes through here: validate it against the namespace's limits,
//! route it to its shard, dedup its id, append it through the namespace's
//! [`Producer`], and answer. The HTTP API only turns a request into these
//! calls and the answer back into HTTP.
//!
//! It is a plain call on the task that took the request, with no mailbox hop:
//! the producer hands each entry to the backend's own queue (the embedded
//! log's committer, librdkafka, the SQS client), and the answer comes back
//! from its completion. An entry is answered `durable: "true"` only once the
//! backend says it is durable; past `server.ack_timeout_ms` the answer is
//! `"unknown"`, and its id stays claimed until the backend answers, so a retry
//! with it is safe.
//!
//! Load is shed (429) by the namespace's adaptive concurrency limit
//! ([`crate::shedding`], by the write's priority), by `server.max_in_flight`
//! across the server, by `server.mailbox_capacity` hand-offs waiting on one
//! shard, and by the backend's own queue.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use rand::RngExt;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use tokio::sync::{Semaphore, oneshot};
use tracing::error;

use crate::backends::{Appended, BackendError, EntryRejected, Producer};
use crate::config::{NamespaceConfig, Priority};
use crate::entry::{
    Durable, Entry, HOPS_HEADER, ORIGIN_NAMESPACE_HEADER, ORIGIN_SEQUENCE_HEADER,
    PAYLOAD_ENCODING_HEADER, SET_FINGERPRINT_HEADER, SET_HEADER, SET_INDEX_HEADER,
    SET_MARKER_HEADER, SET_MARKER_SHARD, SET_SIZE_HEADER, ShardRef, TARGETS_HEADER, now_ms,
};
use crate::routing::shard_of;
use crate::shedding::{Limiter, Shed};
use crate::sinks::mutation;
use crate::state::DedupIndex;
use crate::state::dedup::{self, Check};
use crate::stats::Counter;

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
    /// The targets the entry goes to: one name or a list of the
    /// namespace's targets; absent, every one of them.
    #[serde(default, deserialize_with = "target_names")]
    pub target: Option<Vec<String>>,
    pub headers: Option<BTreeMap<String, String>>,
    /// Under load `batch` is refused first, `critical` last; absent, the
    /// namespace's `shedding.priority`.
    pub priority: Option<Priority>,
}

/// The body of a set of mutations (`POST /v1/namespaces/{ns}/mutations`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetRequest<'a> {
    /// The set's idempotency key; a UUIDv7 is generated if absent.
    pub id: Option<String>,
    #[serde(borrow)]
    pub mutations: Vec<MutationRequest<'a>>,
    pub lifecycle: Option<Lifecycle>,
    pub priority: Option<Priority>,
}

/// One mutation of a set: a write with a required key and no id, lifecycle
/// or target of its own.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MutationRequest<'a> {
    pub key: Option<String>,
    #[serde(default, borrow, deserialize_with = "present")]
    pub payload: Option<&'a RawValue>,
    pub payload_base64: Option<String>,
    pub headers: Option<BTreeMap<String, String>>,
}

/// A set ready to append: its mutations routed, and its marker.
pub struct PreparedSet {
    pub id: String,
    client_id: bool,
    /// Each mutation's shard and entry, in the set's order.
    members: Vec<(u32, Entry)>,
    marker: Entry,
    fingerprint: u64,
    priority: Priority,
}

impl PreparedSet {
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// A set answered by the backend.
#[derive(Clone, Debug)]
pub struct SetAccepted {
    pub durable: Durable,
    pub id: String,
    pub mutations: usize,
    /// The marker's sequence: it orders the namespace's sets.
    pub sequence: u64,
}

/// What a Walden that forwards an entry says about it, from its request's
/// headers ([`crate::entry::relay`]); recorded on the entry.
#[derive(Clone, Copy, Debug)]
pub struct Relayed<'a> {
    /// The processes it passed through, `id,id,...`.
    pub hops: &'a str,
    /// The namespace it was first written to.
    pub namespace: Option<&'a str>,
    /// Its sequence there.
    pub sequence: Option<u64>,
}

impl Relayed<'_> {
    /// Record what the forwarding Walden said on the entry's headers.
    fn record(&self, headers: &mut Vec<(String, String)>) {
        headers.push((HOPS_HEADER.into(), self.hops.into()));
        if let Some(ns) = self.namespace {
            headers.push((ORIGIN_NAMESPACE_HEADER.into(), ns.into()));
        }
        if let Some(seq) = self.sequence {
            headers.push((ORIGIN_SEQUENCE_HEADER.into(), seq.to_string()));
        }
    }
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

/// `"target"`: a name, or a list of names.
fn target_names<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    struct Names;
    impl<'de> serde::de::Visitor<'de> for Names {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a target's name, or a list of names")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<String>, E> {
            Ok(vec![v.to_string()])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<String>, A::Error> {
            let mut names = Vec::new();
            while let Some(name) = seq.next_element::<String>()? {
                names.push(name);
            }
            Ok(names)
        }
    }
    d.deserialize_any(Names).map(Some)
}

/// `"payload": null` is a payload (JSON null), not a missing one.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// A write answered by the backend: durable (`True`), or accepted with its
/// durability not known (`Unknown`, with `fsync = "never"`).
#[derive(Clone, Debug)]
pub struct Accepted {
    pub durable: Durable,
    pub id: String,
    pub shard: u32,
    pub sequence: u64,
}

/// Why a write was refused, or why its outcome is not known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The request is not a valid write (400).
    Invalid,
    /// Larger than a limit (413).
    TooLarge,
    /// The id was accepted before with another body (409).
    Conflict,
    /// Shed for load; nothing was written (429).
    Shed,
    /// The backend could not take it now (503).
    Unavailable,
    /// Handed to the backend, with no answer in time (504).
    Timeout,
}

/// A write not answered `durable: "true"`, and what the client should know.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct IngestError {
    pub refusal: Refusal,
    pub durable: Durable,
    pub message: String,
    /// The entry's id (given or generated): a client that got `"unknown"`
    /// retries with it safely.
    pub id: Option<String>,
    /// When to try again, if the refusal says (a shed write).
    pub retry_after: Option<Duration>,
}

impl IngestError {
    fn new(refusal: Refusal, durable: Durable, message: impl Into<String>) -> Self {
        Self {
            refusal,
            durable,
            message: message.into(),
            id: None,
            retry_after: None,
        }
    }

    /// Refused by the namespace's concurrency limit.
    fn limited(name: &str, priority: Priority, shed: Shed) -> Self {
        Self {
            retry_after: Some(shed.retry_after),
            ..Self::shed(format!(
                "namespace {name:?} is at its concurrency limit for {} writes ({} requests in flight, limit {}; shedding); retry later",
                priority.as_str(),
                shed.in_flight,
                shed.limit
            ))
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(Refusal::Invalid, Durable::False, message)
    }

    fn too_large(message: impl Into<String>) -> Self {
        Self::new(Refusal::TooLarge, Durable::False, message)
    }

    fn conflict(message: impl Into<String>) -> Self {
        Self::new(Refusal::Conflict, Durable::False, message)
    }

    fn shed(message: impl Into<String>) -> Self {
        Self::new(Refusal::Shed, Durable::False, message)
    }

    fn unavailable(durable: Durable, message: impl Into<String>) -> Self {
        Self::new(Refusal::Unavailable, durable, message)
    }

    fn timeout(message: impl Into<String>) -> Self {
        Self::new(Refusal::Timeout, Durable::Unknown, message)
    }

    /// A sign of overload for the concurrency limit: the backend did not
    /// answer in time, or could not take the write.
    fn overload(&self) -> bool {
        matches!(self.refusal, Refusal::Timeout | Refusal::Unavailable)
    }

    /// The same error, answering the write of entry `id`.
    pub fn with_id(self, id: &str) -> Self {
        Self {
            id: Some(id.to_string()),
            ..self
        }
    }
}

/// An entry ready to append: valid, routed, its id given or generated.
pub struct Prepared {
    pub shard: u32,
    pub entry: Entry,
    /// The client chose the id, so it is an idempotency key.
    client_id: bool,
    priority: Priority,
}

/// What every namespace's Ingest shares.
#[derive(Clone)]
pub struct Writes {
    /// Idempotency keys of every namespace.
    pub dedup: Arc<DedupIndex>,
    /// Writes in flight across the server (`server.max_in_flight`).
    pub in_flight: Arc<Semaphore>,
    /// `server.ack_timeout_ms`.
    pub ack_timeout: Duration,
    /// `server.mailbox_capacity`: hand-offs waiting on one shard, at most.
    pub per_shard: usize,
}

/// One namespace's write path.
pub struct Ingest {
    name: String,
    config: NamespaceConfig,
    producer: Arc<dyn Producer>,
    shards: Vec<ShardRef>,
    /// Entries answered durable, per shard.
    written: Arc<[Counter]>,
    /// Sets of mutations answered durable.
    pub sets_written: Counter,
    /// Hand-offs waiting on each shard.
    waiting: Vec<AtomicUsize>,
    dedup: Arc<DedupIndex>,
    in_flight: Arc<Semaphore>,
    /// The namespace's adaptive concurrency limit (`[shedding]`).
    pub limiter: Arc<Limiter>,
    ack_timeout: Duration,
    per_shard: usize,
}

/// A hand-off waiting on a shard; the slot frees when it is answered.
struct ShardSlot<'a>(&'a AtomicUsize);

impl Drop for ShardSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Ingest {
    pub fn new(
        name: &str,
        config: &NamespaceConfig,
        producer: Arc<dyn Producer>,
        written: Arc<[Counter]>,
        writes: &Writes,
    ) -> Self {
        Self {
            name: name.to_string(),
            config: config.clone(),
            producer,
            shards: (0..config.shards).map(|i| ShardRef::new(name, i)).collect(),
            waiting: (0..config.shards).map(|_| AtomicUsize::new(0)).collect(),
            written,
            sets_written: Counter::default(),
            dedup: writes.dedup.clone(),
            in_flight: writes.in_flight.clone(),
            limiter: Arc::new(Limiter::new(&config.shedding)),
            ack_timeout: writes.ack_timeout,
            per_shard: writes.per_shard,
        }
    }

    fn shard_slot(&self, shard: u32) -> Option<ShardSlot<'_>> {
        let waiting = &self.waiting[shard as usize];
        if waiting.fetch_add(1, Ordering::AcqRel) >= self.per_shard {
            waiting.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ShardSlot(waiting))
    }

    /// Check a request against the namespace's limits and build its entry.
    /// `body` is the request's body, which a JSON payload is a slice of;
    /// `traceparent` is the write's, for the entry's header. An error names the
    /// entry's id (given or generated).
    pub fn prepare(
        &self,
        mut req: WriteRequest<'_>,
        body: &Bytes,
        traceparent: Option<&str>,
        relayed: Option<Relayed<'_>>,
    ) -> Result<Prepared, IngestError> {
        let client_id = req.id.is_some();
        let priority = req.priority.unwrap_or(self.config.shedding.priority);
        let id = req
            .id
            .take()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let parts = self
            .check(req, &id, body, traceparent)
            .map_err(|e| e.with_id(&id))?;
        let shard = shard_of(
            self.config.route_hash(),
            parts.key.as_deref(),
            &id,
            self.config.shards,
        );
        let mut headers = parts.headers;
        if let Some(r) = relayed {
            r.record(&mut headers);
        }
        let entry = Entry {
            id,
            key: parts.key,
            headers,
            payload: parts.payload,
            timestamp_ms: 0,
            due_ms: parts.due_ms,
        };
        self.producer.check_entry(&entry).map_err(|e| {
            match e {
                EntryRejected::TooLarge(why) => IngestError::too_large(why),
                EntryRejected::Invalid(why) => IngestError::bad_request(why),
            }
            .with_id(&entry.id)
        })?;
        Ok(Prepared {
            shard,
            client_id,
            entry,
            priority,
        })
    }

    /// Check a set against the namespace's limits and build its entries:
    /// each mutation in its key's shard, then the marker. An error names the
    /// set's id (given or generated) and the mutation at fault.
    /// `relayed` says, per mutation, what a forwarding Walden said of it.
    pub fn prepare_set(
        &self,
        mut req: SetRequest<'_>,
        body: &Bytes,
        traceparent: Option<&str>,
        relayed: Option<&[Relayed<'_>]>,
    ) -> Result<PreparedSet, IngestError> {
        let client_id = req.id.is_some();
        let id = req
            .id
            .take()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        self.check_set(req, &id, client_id, body, traceparent, relayed)
            .map_err(|e| e.with_id(&id))
    }

    fn check_set(
        &self,
        req: SetRequest<'_>,
        id: &str,
        client_id: bool,
        body: &Bytes,
        traceparent: Option<&str>,
        relayed: Option<&[Relayed<'_>]>,
    ) -> Result<PreparedSet, IngestError> {
        self.producer
            .check_set()
            .map_err(IngestError::bad_request)?;
        let limits = &self.config.limits;
        let n = req.mutations.len();
        if n == 0 {
            return Err(IngestError::bad_request(
                "`mutations` is empty: a set needs at least one mutation",
            ));
        }
        if n > limits.max_set_mutations {
            return Err(IngestError::too_large(format!(
                "`mutations`: {n} mutations; limits.max_set_mutations is {}",
                limits.max_set_mutations
            )));
        }
        let priority = req.priority.unwrap_or(self.config.shedding.priority);
        let mut lifecycle = req.lifecycle;
        let mut members = Vec::with_capacity(n);
        let mut bytes = 0usize;
        let mut due_ms = 0;
        for (i, m) in req.mutations.into_iter().enumerate() {
            let at = |e: IngestError| IngestError {
                message: format!("`mutations[{i}]`: {}", e.message),
                ..e
            };
            let Some(key) = m.key else {
                return Err(IngestError::bad_request(format!(
                    "`mutations[{i}].key` is missing: every mutation of a set needs its key"
                )));
            };
            let write = WriteRequest {
                payload: m.payload,
                payload_base64: m.payload_base64,
                key: Some(key),
                id: None,
                // The set's delay is drawn once, with the first mutation.
                lifecycle: lifecycle.take(),
                target: None,
                priority: None,
                headers: m.headers,
            };
            let parts = self.check(write, id, body, traceparent).map_err(at)?;
            if i == 0 {
                due_ms = parts.due_ms;
            }
            bytes += parts.payload.len();
            if bytes > limits.max_set_bytes {
                return Err(IngestError::too_large(format!(
                    "the set's payloads are more than limits.max_set_bytes ({})",
                    limits.max_set_bytes
                )));
            }
            let shard = shard_of(
                self.config.route_hash(),
                parts.key.as_deref(),
                id,
                self.config.shards,
            );
            let mut headers = parts.headers;
            if let Some(r) = relayed.and_then(|r| r.get(i)) {
                r.record(&mut headers);
            }
            headers.push((SET_HEADER.into(), id.into()));
            headers.push((SET_INDEX_HEADER.into(), i.to_string()));
            headers.push((SET_SIZE_HEADER.into(), n.to_string()));
            let entry = Entry {
                id: format!("{id}.{i}"),
                key: parts.key,
                headers,
                payload: parts.payload,
                timestamp_ms: 0,
                due_ms,
            };
            self.producer.check_entry(&entry).map_err(|e| {
                at(match e {
                    EntryRejected::TooLarge(why) => IngestError::too_large(why),
                    EntryRejected::Invalid(why) => IngestError::bad_request(why),
                })
            })?;
            members.push((shard, entry));
        }
        let fingerprint = members.iter().fold(n as u64, |acc, (_, e)| {
            (acc.rotate_left(17) ^ dedup::fingerprint(e)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        });
        let marker = Entry {
            id: id.to_string(),
            key: None,
            headers: vec![
                (SET_MARKER_HEADER.into(), id.into()),
                (SET_SIZE_HEADER.into(), n.to_string()),
                (SET_FINGERPRINT_HEADER.into(), format!("{fingerprint:016x}")),
                (PAYLOAD_ENCODING_HEADER.into(), "json".into()),
            ],
            payload: Bytes::from(serde_json::json!({"set": id, "mutations": n}).to_string()),
            timestamp_ms: 0,
            due_ms: 0,
        };
        Ok(PreparedSet {
            id: id.to_string(),
            client_id,
            members,
            marker,
            fingerprint,
            priority,
        })
    }

    fn check(
        &self,
        req: WriteRequest<'_>,
        id: &str,
        body: &Bytes,
        traceparent: Option<&str>,
    ) -> Result<Parts, IngestError> {
        let limits = &self.config.limits;
        let (payload, json) = match (req.payload, req.payload_base64) {
            (Some(_), Some(_)) => {
                return Err(IngestError::bad_request(
                    "give exactly one of `payload` and `payload_base64`, not both",
                ));
            }
            (None, None) => {
                return Err(IngestError::bad_request(
                    "give exactly one of `payload` (any JSON value) and `payload_base64`",
                ));
            }
            (Some(raw), None) => {
                if nested_deeper_than(raw.get().as_bytes(), limits.max_payload_depth) {
                    return Err(IngestError::bad_request(format!(
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
                        IngestError::bad_request(format!(
                            "`payload_base64` is not valid base64: {e}"
                        ))
                    })?;
                (Bytes::from(bytes), false)
            }
        };
        if payload.len() > limits.max_payload_bytes {
            return Err(payload_too_large(limits.max_payload_bytes));
        }
        let key = self.routing_key(req.key, &payload)?;
        if let Some(key) = &key {
            check_len("key", key.len(), limits.max_key_bytes)?;
        }
        if id.is_empty() {
            return Err(IngestError::bad_request("`id` must not be empty"));
        }
        check_len("id", id.len(), limits.max_id_bytes)?;
        let targets = self.targets_of(req.target)?;
        let user_headers = req.headers.unwrap_or_default();
        if user_headers.len() > limits.max_headers {
            return Err(IngestError::bad_request(format!(
                "`headers`: {} headers; the limit is {}",
                user_headers.len(),
                limits.max_headers
            )));
        }
        let mut headers = Vec::with_capacity(user_headers.len() + 3);
        for (name, value) in user_headers {
            if name.is_empty() || name.len() > MAX_HEADER_NAME || value.len() > MAX_HEADER_VALUE {
                return Err(IngestError::bad_request(format!(
                    "`headers`: names must be 1 to {MAX_HEADER_NAME} bytes and values at most {MAX_HEADER_VALUE}"
                )));
            }
            if name.starts_with(RESERVED_PREFIX) || name == "traceparent" {
                return Err(IngestError::bad_request(format!(
                    "`headers.{name}`: headers named traceparent or starting with {RESERVED_PREFIX:?} are reserved"
                )));
            }
            headers.push((name, value));
        }
        let lifecycle = req.lifecycle.unwrap_or_default();
        let delay = lifecycle.delay_ms.unwrap_or(0);
        // A delayed write without its own jitter gets the namespace's.
        let default_jitter = if delay > 0 {
            self.config.delay.jitter_ms
        } else {
            0
        };
        let jitter = lifecycle.jitter_ms.unwrap_or(default_jitter);
        let max_delay = self.config.delay.max_delay_ms;
        if delay.saturating_add(jitter) > max_delay {
            return Err(IngestError::bad_request(format!(
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
        if let Some(targets) = targets {
            headers.push((TARGETS_HEADER.into(), targets));
        }
        Ok(Parts {
            key,
            headers,
            payload,
            due_ms,
        })
    }

    /// The targets a write names, as the entry's header keeps them; `None`
    /// when it goes to every target. An unknown name is a 400.
    fn targets_of(&self, named: Option<Vec<String>>) -> Result<Option<String>, IngestError> {
        let Some(mut named) = named else {
            return Ok(None);
        };
        let ours = &self.config.targets;
        if named.is_empty() {
            return Err(IngestError::bad_request(
                "`target`: an empty list names no target; leave `target` out to write to every target",
            ));
        }
        if let Some(unknown) = named
            .iter()
            .find(|n| !ours.iter().any(|t| t.name() == n.as_str()))
        {
            let names: Vec<&str> = ours.iter().map(|t| t.name()).collect();
            return Err(IngestError::bad_request(format!(
                "`target`: namespace {:?} has no target {unknown:?} (its targets are {names:?})",
                self.name
            )));
        }
        named.sort();
        named.dedup();
        Ok((named.len() < ours.len()).then(|| named.join(",")))
    }

    /// The key a write is routed by. A namespace whose target versions rows
    /// routes by the mutation's key, so every write to a row shares one shard
    /// and its sequence orders them; a `key` that differs is refused.
    fn routing_key(
        &self,
        key: Option<String>,
        payload: &[u8],
    ) -> Result<Option<String>, IngestError> {
        // Routed by the first target that versions rows; every such
        // target's rows then share the entry's shard.
        let target = self
            .config
            .targets
            .iter()
            .map(|t| &t.config)
            .find(|t| t.versions_rows())
            .unwrap_or(&self.config.targets[0].config);
        let why = || {
            format!(
                "namespace {:?} applies to a {} target, which versions each row by its shard's sequence",
                self.name,
                target.kind()
            )
        };
        match (mutation::row_of(target, payload), key) {
            (Ok(None), key) => Ok(key),
            (Err(e), _) => Err(IngestError::bad_request(format!(
                "`payload`: {e} ({})",
                why()
            ))),
            (Ok(Some(row)), None) => Ok(Some(row)),
            (Ok(Some(row)), Some(key)) if key == row => Ok(Some(key)),
            (Ok(Some(row)), Some(key)) => Err(IngestError::bad_request(format!(
                "`key` {key:?} is not the mutation's key {row:?}: {}, so its writes are routed by the mutation's key; leave `key` out or make it equal",
                why()
            ))),
        }
    }

    /// Append prepared entries; one answer per entry, in order. A client id
    /// seen within the namespace's dedup window gets its original answer.
    pub fn submit<'a>(
        &'a self,
        items: Vec<Prepared>,
    ) -> futures_util::future::BoxFuture<'a, Vec<Result<Accepted, IngestError>>> {
        Box::pin(async move {
            let n = items.len();
            let mut answers: Vec<Option<Result<Accepted, IngestError>>> =
                (0..n).map(|_| None).collect();
            let window = Duration::from_millis(self.config.dedup_window_ms);
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
                let (index, name) = (self.dedup.clone(), self.name.clone());
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
                        answers[i] = Some(Ok(accepted_answer(&p.entry.id, a)))
                    }
                    Ok(Check::Conflict(a)) => {
                        answers[i] = Some(Err(conflict(&p.entry.id, a).with_id(&p.entry.id)))
                    }
                    Ok(Check::Wait(rx)) => waiting.push((i, p, rx)),
                    Ok(Check::Claimed(claim)) => to_send.push((i, p, Some((claim, fingerprint)))),
                    Err(e) => {
                        let e = IngestError::unavailable(Durable::False, e.to_string());
                        answers[i] = Some(Err(e.with_id(&p.entry.id)))
                    }
                }
            }
            for (i, answer) in self.append(to_send).await {
                answers[i] = Some(answer);
            }
            // Duplicates of writes that were in flight: wait for those, then
            // answer as they were answered (or write, if they failed).
            for (i, p, mut rx) in waiting {
                while rx.changed().await.is_ok() {}
                answers[i] = Some(self.submit(vec![p]).await.remove(0));
            }
            answers
                .into_iter()
                .map(|a| a.expect("every entry is answered"))
                .collect()
        })
    }

    /// Append a set as one unit and answer for all of it: `durable: "true"`
    /// only once every mutation and the marker are durable. A client id seen
    /// within the dedup window gets its original answer (409 for another
    /// body).
    pub fn submit_set(
        &self,
        set: PreparedSet,
    ) -> futures_util::future::BoxFuture<'_, Result<SetAccepted, IngestError>> {
        Box::pin(async move {
            let window = Duration::from_millis(self.config.dedup_window_ms);
            let id = set.id.clone();
            let n = set.members.len();
            if !set.client_id || window.is_zero() {
                return self.append_set(set, None).await;
            }
            let (index, name, key, fp) = (
                self.dedup.clone(),
                self.name.clone(),
                id.clone(),
                set.fingerprint,
            );
            let check = tokio::task::spawn_blocking(move || index.check(&name, &key, fp, window))
                .await
                .expect("dedup checks do not panic");
            match check {
                Ok(Check::Duplicate(a)) => Ok(SetAccepted {
                    durable: Durable::True,
                    id,
                    mutations: n,
                    sequence: a.sequence,
                }),
                Ok(Check::Conflict(a)) => Err(conflict(&id, a).with_id(&id)),
                Ok(Check::Wait(mut rx)) => {
                    while rx.changed().await.is_ok() {}
                    self.submit_set(set).await
                }
                Ok(Check::Claimed(claim)) => {
                    let fp = set.fingerprint;
                    self.append_set(set, Some((claim, fp))).await
                }
                Err(e) => Err(IngestError::unavailable(Durable::False, e.to_string()).with_id(&id)),
            }
        })
    }

    async fn append_set(
        &self,
        set: PreparedSet,
        claim: Claimed,
    ) -> Result<SetAccepted, IngestError> {
        let PreparedSet {
            id,
            members,
            marker,
            fingerprint,
            priority,
            ..
        } = set;
        let permit = self
            .limiter
            .acquire(priority)
            .map_err(|shed| IngestError::limited(&self.name, priority, shed).with_id(&id))?;
        let outcome = self
            .append_set_admitted(id, members, marker, fingerprint, claim)
            .await;
        permit.done(outcome.as_ref().is_err_and(IngestError::overload));
        outcome
    }

    async fn append_set_admitted(
        &self,
        id: String,
        members: Vec<(u32, Entry)>,
        marker: Entry,
        fingerprint: u64,
        claim: Claimed,
    ) -> Result<SetAccepted, IngestError> {
        let n = members.len();
        let Ok(_permits) = self.in_flight.clone().try_acquire_many_owned(n as u32 + 1) else {
            return Err(IngestError::shed(
                "too many writes in flight (server.max_in_flight); retry later",
            )
            .with_id(&id));
        };
        let mut writes = Vec::with_capacity(n + 1);
        let mut answers = Vec::with_capacity(n + 1);
        let all = members
            .into_iter()
            .chain(std::iter::once((SET_MARKER_SHARD, marker)));
        for (shard, entry) in all {
            let (tx, rx) = oneshot::channel();
            writes.push((self.shards[shard as usize].clone(), entry, tx));
            answers.push((shard, rx));
        }
        // As for single writes: a panic here drops the replies, and the set
        // is answered "unknown".
        let handed = std::panic::catch_unwind(AssertUnwindSafe(|| {
            crate::failpoint!("ingest.write");
            self.producer.append_set(writes);
        }));
        if let Err(panic) = handed {
            error!(namespace = %self.name, set = %id, panic = crate::actors::panic_message(&panic), "Handing a set to the backend panicked.");
        }
        let deadline = tokio::time::sleep(self.ack_timeout);
        tokio::pin!(deadline);
        let mut outcome: Result<Vec<(u32, Appended)>, IngestError> = Ok(Vec::with_capacity(n + 1));
        let mut pending = answers.into_iter();
        for (shard, mut rx) in pending.by_ref() {
            let answered = tokio::select! {
                biased;
                answer = &mut rx => answer,
                () = &mut deadline => {
                    let claim = claim.or_else(|| self.claim_late(&id, fingerprint));
                    if claim.is_some() {
                        // Keep the id claimed until the log answers the
                        // marker, so a retry waits for the real outcome.
                        let rest: Vec<_> = std::iter::once(rx).chain(pending.map(|(_, rx)| rx)).collect();
                        let (dedup, ns_name, id) = (self.dedup.clone(), self.name.clone(), id.clone());
                        actix::spawn(async move {
                            let mut last = None;
                            for rx in rest {
                                match rx.await {
                                    Ok(Ok(a)) => last = Some(a),
                                    _ => return,
                                }
                            }
                            if let Some(a) = last {
                                record(&dedup, &ns_name, &id, SET_MARKER_SHARD, &a, claim);
                            }
                        });
                    }
                    return Err(IngestError::timeout(format!(
                        "no answer from the backend within server.ack_timeout_ms ({} ms); the set's outcome is unknown, and a retry with its id is safe",
                        self.ack_timeout.as_millis()
                    ))
                    .with_id(&id));
                }
            };
            let answer = match answered {
                Ok(Ok(a)) => Ok(a),
                Ok(Err(e)) => Err(append_error(e)),
                Err(_) => Err(IngestError::unavailable(
                    Durable::Unknown,
                    "the set was lost in flight (its hand-off to the backend failed); its outcome is unknown",
                )),
            };
            outcome = match (outcome, answer) {
                (Ok(mut done), Ok(a)) => {
                    done.push((shard, a));
                    Ok(done)
                }
                // A set is one unit: keep the first error, but an "unknown"
                // anywhere makes the set's outcome unknown.
                (Ok(_), Err(e)) => Err(e),
                (Err(e), Err(later)) if later.durable == Durable::Unknown => Err(IngestError {
                    durable: Durable::Unknown,
                    ..e
                }),
                (Err(e), _) => Err(e),
            };
        }
        let done = outcome.map_err(|e| e.with_id(&id))?;
        let (_, marker) = *done.last().expect("the marker is answered");
        for (shard, _) in &done[..n] {
            self.written[*shard as usize].inc();
        }
        self.sets_written.inc();
        record(
            &self.dedup,
            &self.name,
            &id,
            SET_MARKER_SHARD,
            &marker,
            claim,
        );
        Ok(SetAccepted {
            durable: marker.durable,
            id,
            mutations: n,
            sequence: marker.sequence,
        })
    }

    /// Hand entries to the backend, shard by shard, and wait for its
    /// answers. A claimed id is recorded once its entry is durable.
    async fn append(
        &self,
        items: Vec<(usize, Prepared, Claimed)>,
    ) -> Vec<(usize, Result<Accepted, IngestError>)> {
        // The concurrency limit first: a slot for each priority present
        // (one for a single write; a batch may mix priorities).
        let mut refused = Vec::new();
        let mut permits = Vec::new();
        let mut admitted = Vec::with_capacity(items.len());
        for priority in Priority::ALL {
            if !items.iter().any(|(_, p, _)| p.priority == priority) {
                continue;
            }
            match self.limiter.acquire(priority) {
                Ok(permit) => permits.push(permit),
                Err(shed) => refused.push((priority, shed)),
            }
        }
        let mut out = Vec::new();
        for (i, p, claim) in items {
            match refused.iter().find(|(priority, _)| *priority == p.priority) {
                Some((priority, shed)) => out.push((
                    i,
                    Err(IngestError::limited(&self.name, *priority, *shed).with_id(&p.entry.id)),
                )),
                None => admitted.push((i, p, claim)),
            }
        }
        let answers = self.append_admitted(admitted).await;
        let overload = answers
            .iter()
            .any(|(_, a)| a.as_ref().is_err_and(IngestError::overload));
        for permit in permits {
            permit.done(overload);
        }
        out.extend(answers);
        out
    }

    async fn append_admitted(
        &self,
        items: Vec<(usize, Prepared, Claimed)>,
    ) -> Vec<(usize, Result<Accepted, IngestError>)> {
        let n = items.len();
        let mut out = Vec::with_capacity(n);
        if n == 0 {
            return out;
        }
        let Ok(_permits) = self.in_flight.clone().try_acquire_many_owned(n as u32) else {
            let e =
                IngestError::shed("too many writes in flight (server.max_in_flight); retry later");
            return items
                .into_iter()
                .map(|(i, p, _)| (i, Err(e.clone().with_id(&p.entry.id))))
                .collect();
        };
        let dedups = self.config.dedup_window_ms > 0;
        let mut waiting = Vec::with_capacity(n);
        let mut by_shard: BTreeMap<u32, Vec<(usize, Entry, Claimed)>> = BTreeMap::new();
        for (i, p, claim) in items {
            by_shard
                .entry(p.shard)
                .or_default()
                .push((i, p.entry, claim));
        }
        let mut slots = Vec::new();
        for (shard, entries) in by_shard {
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
            let Some(slot) = self.shard_slot(shard) else {
                let err = IngestError::shed(format!(
                    "shard {shard} of {:?} is overloaded (server.mailbox_capacity); retry later",
                    self.name
                ));
                out.extend(
                    rxs.into_iter()
                        .map(|(i, id, ..)| (i, Err(err.clone().with_id(&id)))),
                );
                continue;
            };
            slots.push(slot);
            // The hand-off runs on this task. A panic in it drops the replies
            // it still holds: those writes are answered "unknown", never "true".
            let handed = std::panic::catch_unwind(AssertUnwindSafe(|| {
                crate::failpoint!("ingest.write");
                self.producer.append(&self.shards[shard as usize], msg);
            }));
            if let Err(panic) = handed {
                error!(namespace = %self.name, shard, panic = crate::actors::panic_message(&panic), "Handing writes to the backend panicked.");
            }
            waiting.extend(
                rxs.into_iter()
                    .map(|(i, id, rx, c, fp)| (i, id, shard, rx, c, fp)),
            );
        }
        // One timer for the whole request, not one per entry.
        let deadline = tokio::time::sleep(self.ack_timeout);
        tokio::pin!(deadline);
        for (i, id, shard, mut rx, claim, fingerprint) in waiting {
            let answered = tokio::select! {
                biased;
                answer = &mut rx => Ok(answer),
                () = &mut deadline => Err(()),
            };
            let answer = match answered {
                Ok(Ok(Ok(appended))) => {
                    self.written[shard as usize].inc();
                    record(&self.dedup, &self.name, &id, shard, &appended, claim);
                    Ok(Accepted {
                        durable: appended.durable,
                        id,
                        shard,
                        sequence: appended.sequence,
                    })
                }
                Ok(Ok(Err(e))) => Err(append_error(e).with_id(&id)),
                Ok(Err(_)) => Err(IngestError::unavailable(
                    Durable::Unknown,
                    "the write was lost in flight (its hand-off to the backend failed); its outcome is unknown",
                )
                .with_id(&id)),
                Err(_) => {
                    // A generated id is claimed now, before the client hears
                    // "unknown" and may retry with it.
                    let claim = claim.or_else(|| self.claim_late(&id, fingerprint?));
                    // Keep the id claimed until the log answers, so a retry
                    // with the same id waits for the real outcome.
                    let err = IngestError::timeout(format!(
                        "no answer from the backend within server.ack_timeout_ms ({} ms); the outcome is unknown",
                        self.ack_timeout.as_millis()
                    ))
                    .with_id(&id);
                    if claim.is_some() {
                        let (dedup, ns_name) = (self.dedup.clone(), self.name.clone());
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
    fn claim_late(&self, id: &str, fingerprint: u64) -> Claimed {
        let window = Duration::from_millis(self.config.dedup_window_ms);
        match self.dedup.check(&self.name, id, fingerprint, window) {
            Ok(Check::Claimed(claim)) => Some((claim, fingerprint)),
            // A fresh UUID is known nowhere else.
            _ => None,
        }
    }
}

/// What a valid request makes of its entry, besides the id.
struct Parts {
    key: Option<String>,
    headers: Vec<(String, String)>,
    payload: Bytes,
    due_ms: u64,
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

fn check_len(field: &str, len: usize, max: usize) -> Result<(), IngestError> {
    if len > max {
        return Err(IngestError::bad_request(format!(
            "`{field}` is {len} bytes; the limit is {max}"
        )));
    }
    Ok(())
}

fn payload_too_large(max: usize) -> IngestError {
    IngestError::too_large(format!(
        "the payload is larger than limits.max_payload_bytes ({max})"
    ))
}

/// What the client is told about a failed append.
fn append_error(e: BackendError) -> IngestError {
    match e {
        e if e.is_busy() => IngestError::shed(format!("{e}; retry later")),
        // The backend may have it: 504, as for an answer that never came.
        e if e.durable() == Durable::Unknown => {
            IngestError::timeout(format!("{e}; the outcome is unknown"))
        }
        e if e.is_invalid() => IngestError::bad_request(e.to_string()),
        e => IngestError::unavailable(e.durable(), e.to_string()),
    }
}

fn accepted_answer(id: &str, a: dedup::Accepted) -> Accepted {
    Accepted {
        durable: Durable::True,
        id: id.to_string(),
        shard: a.shard,
        sequence: a.sequence,
    }
}

fn conflict(id: &str, a: dedup::Accepted) -> IngestError {
    IngestError::conflict(format!(
        "id {id:?} was already accepted (sequence {}) with a different body; use a new id",
        a.sequence
    ))
}

type Claimed = Option<(dedup::Claim, u64)>;

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
        sequence: appended.sequence,
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
