//! The entry that every layer shares.

pub mod frame;

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

/// One mutation written to the log.
///
/// `timestamp_ms` is assigned by the backend when the entry is appended (the
/// embedded log uses it for its time index, so it must not go backwards); a
/// value set by the caller is overwritten.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Entry {
    /// Client-supplied or generated id; the idempotency key.
    pub id: String,
    /// Routes the entry to a shard and orders entries that share it.
    pub key: Option<String>,
    /// Free-form string headers (`traceparent`, original write time, ...).
    pub headers: Vec<(String, String)>,
    /// Opaque bytes delivered to the target.
    pub payload: Bytes,
    /// Append time in milliseconds since the Unix epoch, set by the backend.
    pub timestamp_ms: u64,
    /// When the entry may be delivered, in milliseconds since the Unix epoch;
    /// 0 means "now".
    pub due_ms: u64,
}

/// The entry header that says how the payload was written: `json` when the
/// client sent `payload`, absent when it sent `payload_base64`. Headers under
/// `walden.` are reserved.
pub const PAYLOAD_ENCODING_HEADER: &str = "walden.payload";

/// The entry header that names the targets an entry is for (`a,b`), when
/// its write named some; absent: every target of its namespace.
pub const TARGETS_HEADER: &str = "walden.targets";
/// On an entry a replay applies (and on its dead letter): the replay's id.
pub const REPLAY_HEADER: &str = "walden.replay";
/// The `Idempotency-Key` an HTTP target gets for an entry, when it is not
/// the entry's id (a replay that asks targets to apply it again).
pub const IDEMPOTENCY_KEY_HEADER: &str = "walden.idempotency_key";

/// Entry headers that a Walden receiving a forwarded entry records: the
/// namespace and sequence it had where it was first written, and the
/// Walden processes it passed through (`id,id,...`), which refuse it if it
/// comes back.
pub const ORIGIN_NAMESPACE_HEADER: &str = "walden.origin_namespace";
pub const ORIGIN_SEQUENCE_HEADER: &str = "walden.origin_sequence";
pub const HOPS_HEADER: &str = "walden.hops";

/// Entry headers of a set of mutations (`POST .../mutations`). Each
/// mutation is an entry in its key's shard carrying the set's id, its
/// place in the set and the set's size; the set's completion marker is one
/// more entry, in shard 0, written last and carrying the set's id under
/// [`SET_MARKER_HEADER`]. All of a set's entries go to the log in one write
/// ([`crate::backends::Producer::append_set`]).
pub const SET_HEADER: &str = "walden.set";
pub const SET_INDEX_HEADER: &str = "walden.set_index";
pub const SET_SIZE_HEADER: &str = "walden.set_size";
pub const SET_MARKER_HEADER: &str = "walden.set_marker";
/// On a set's marker: the set's idempotency fingerprint (hex), so that the
/// idempotency index rebuilt from the log after a crash knows the set's
/// body, not the marker's.
pub const SET_FINGERPRINT_HEADER: &str = "walden.set_fingerprint";
/// The shard a namespace's set markers go to: their sequences there order
/// the sets among themselves.
pub const SET_MARKER_SHARD: u32 = 0;
/// On Kafka, where a set's records are not written as one unit, every
/// record of one attempt to write a set carries the attempt's id (a retry
/// of the same set is another attempt), and its mutations carry the time
/// by which the marker is written or never will be. A mutation whose
/// marker does not come asks for its set to be given up with an entry in
/// shard 0 carrying [`SET_ABANDON_HEADER`] (see `backends::kafka::sets`).
pub const SET_ATTEMPT_HEADER: &str = "walden.set_attempt";
pub const SET_DEADLINE_HEADER: &str = "walden.set_deadline_ms";
pub const SET_ABANDON_HEADER: &str = "walden.set_abandon";

/// Where a mutation sits in its set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetPlace {
    pub set: String,
    pub index: u32,
    pub size: u32,
}

/// The HTTP request headers of a forward from one Walden to another's batch
/// endpoint (`target.type = "walden"`), which the receiver records on each
/// entry as the headers above.
pub mod relay {
    /// The Walden namespaces the request's entries passed through, sender
    /// last: `id,id,...` ([`hop_id`]). A receiver that finds itself there
    /// refuses (508).
    pub const HOPS: &str = "walden-hops";
    /// The namespace the entries were first written to.
    pub const ORIGIN_NAMESPACE: &str = "walden-origin-namespace";
    /// Each entry's sequence there, in the body's order: `seq,seq,...`.
    pub const ORIGIN_SEQUENCES: &str = "walden-origin-sequences";
    /// Longer chains are refused as loops.
    pub const MAX_HOPS: usize = 8;

    /// A namespace of a process as `HOPS` names it, from the process's
    /// instance id: 16 hex digits, whatever characters the id has. Another
    /// namespace of the same process is another hop.
    pub fn hop_id(instance_id: &str, namespace: &str) -> String {
        let name = format!("{instance_id}/{namespace}");
        let lo = crc32c::crc32c(name.as_bytes());
        let hi = crc32c::crc32c_append(0x9e37_79b9, name.as_bytes());
        format!("{hi:08x}{lo:08x}")
    }
}

impl Entry {
    /// The first header with this name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the entry goes to the target named `target`.
    pub fn is_for(&self, target: &str) -> bool {
        self.header(TARGETS_HEADER)
            .is_none_or(|names| names.split(',').any(|n| n == target))
    }

    /// The entry's place in its set, when it is a mutation of one.
    pub fn set_place(&self) -> Option<SetPlace> {
        let set = self.header(SET_HEADER)?;
        let index = self.header(SET_INDEX_HEADER)?.parse().ok()?;
        let size = self.header(SET_SIZE_HEADER)?.parse().ok()?;
        (index < size).then(|| SetPlace {
            set: set.to_string(),
            index,
            size,
        })
    }

    /// The entry is a set's completion marker: it is never applied.
    pub fn is_set_marker(&self) -> bool {
        self.header(SET_MARKER_HEADER).is_some()
    }

    /// The entry asks for an attempt at a set to be given up (Kafka).
    pub fn is_set_abandon(&self) -> bool {
        self.header(SET_ABANDON_HEADER).is_some()
    }

    /// The attempt at a set that this mutation, marker or request to give
    /// up belongs to, as `set#attempt` (Kafka); `None` elsewhere.
    pub fn set_attempt(&self) -> Option<String> {
        let attempt = self.header(SET_ATTEMPT_HEADER)?;
        let set = self
            .header(SET_HEADER)
            .or_else(|| self.header(SET_MARKER_HEADER))
            .or_else(|| self.header(SET_ABANDON_HEADER))?;
        Some(format!("{set}#{attempt}"))
    }

    /// Make the entry go to `target` alone (a copy that one target put back
    /// on a shared topic: a redrive, a delay tier's forward).
    pub fn narrow_to(&mut self, target: &str) {
        self.headers.retain(|(k, _)| k != TARGETS_HEADER);
        self.headers.push((TARGETS_HEADER.into(), target.into()));
    }
}

/// An entry read back from a backend, on its way to a sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivered {
    pub shard: ShardRef,
    /// The entry's position in its shard: its version at the target.
    pub sequence: u64,
    /// Shared, not copied: the applier hands it to its sink, and a shard's
    /// targets may share one read.
    pub entry: Arc<Entry>,
}

/// Where an entry lives: a namespace and one of its shards.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardRef {
    pub namespace: Arc<str>,
    pub shard: u32,
}

impl ShardRef {
    pub fn new(namespace: impl Into<Arc<str>>, shard: u32) -> Self {
        Self {
            namespace: namespace.into(),
            shard,
        }
    }
}

impl fmt::Display for ShardRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.shard)
    }
}

/// Netflix's three-valued answer to "is this write durable?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durable {
    /// The backend has made the entry durable.
    True,
    /// The entry was not written; retrying is safe.
    False,
    /// The entry was submitted, and whether it survives is not known.
    Unknown,
}

impl Durable {
    pub fn as_str(self) -> &'static str {
        match self {
            Durable::True => "true",
            Durable::False => "false",
            Durable::Unknown => "unknown",
        }
    }
}

/// The current wall-clock time in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
