//! The mutation payload that database targets apply:
//! `{"op": "put" | "delete", "key": ..., "value": ...}`.
//!
//! Each apply is guarded by the entry's sequence (its version), so applying
//! an entry twice, or replaying an old one, never moves stored state back.
//! That holds because a row's writes all share one shard ([`row_of`]) and no
//! two namespaces write one table or key space (config validation).

use serde::Deserialize;

use crate::config::TargetConfig;
use crate::entry::Delivered;

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Put,
    Delete,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mutation {
    pub op: Op,
    pub key: String,
    /// Required for `put`; ignored for `delete`.
    #[serde(default)]
    pub value: Option<serde_json::Value>,
}

impl Mutation {
    /// Parse an entry's payload. An error here is permanent: retrying the
    /// same bytes cannot succeed.
    pub fn parse(d: &Delivered) -> Result<Self, String> {
        Self::from_payload(&d.entry.payload).map_err(|why| format!("entry {}: {why}", d.entry.id))
    }

    /// Parse a payload as a mutation.
    pub fn from_payload(payload: &[u8]) -> Result<Self, String> {
        let m: Mutation = serde_json::from_slice(payload).map_err(|e| {
            format!("the payload is not a mutation {{\"op\": \"put\"|\"delete\", \"key\", \"value\"}}: {e}")
        })?;
        if m.key.is_empty() {
            return Err("the mutation's key is empty".into());
        }
        if m.op == Op::Put && m.value.is_none() {
            return Err("a put needs a value".into());
        }
        Ok(m)
    }
}

/// The row a write changes, for a namespace whose target versions rows
/// (`None` for other targets), checked at ingest. Such a target guards each
/// row with the entry's sequence, which only orders entries of one shard, so
/// every write to a row must go to one shard: the write is routed by its
/// mutation's key, and an error says why a payload cannot be a row's write.
pub fn row_of(target: &TargetConfig, payload: &[u8]) -> Result<Option<String>, String> {
    if !target.versions_rows() {
        return Ok(None);
    }
    let m = Mutation::from_payload(payload)?;
    match target {
        TargetConfig::Redis { .. } => check_redis_key(&m.key)?,
        TargetConfig::Memcached { key_prefix, .. } => check_memcached_key(key_prefix, &m.key)?,
        _ => {}
    }
    Ok(Some(m.key))
}

/// The version stored with a mutation: the entry's sequence. Sequences only
/// grow within a shard, and every write to a row is routed to one shard
/// ([`row_of`]), so a larger version is a newer write.
pub fn version(d: &Delivered) -> i64 {
    // Sequences stay far below 2^63.
    d.sequence.min(i64::MAX as u64) as i64
}

/// On Redis, a key's version lives beside it, at the key plus this suffix.
pub(crate) const VERSION_SUFFIX: &str = ":walden-version";

/// A Redis mutation's key may not end in [`VERSION_SUFFIX`]: its value
/// would be another key's version.
pub(crate) fn check_redis_key(key: &str) -> Result<(), String> {
    if key.ends_with(VERSION_SUFFIX) {
        return Err(format!(
            "the mutation's key {key:?} ends in {VERSION_SUFFIX:?}, which is reserved for the versions Redis keeps beside each key"
        ));
    }
    Ok(())
}

/// A Memcached key is at most 250 bytes, without spaces or control
/// characters; the prefix counts.
pub(crate) fn check_memcached_key(prefix: &str, key: &str) -> Result<(), String> {
    if prefix.len() + key.len() > 250 {
        return Err(format!(
            "the mutation's key is {} bytes with the target's key_prefix; Memcached keys are at most 250",
            prefix.len() + key.len()
        ));
    }
    if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "the mutation's key {key:?} has a space or a control character, which Memcached keys cannot"
        ));
    }
    Ok(())
}
