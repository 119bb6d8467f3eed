//! The mutation payload that database targets apply:
//! `{"op": "put" | "delete", "key": ..., "value": ...}`.
//!
//! Each apply is guarded by the entry's sequence (its version), so applying
//! an entry twice, or replaying an old one, never moves stored state back.

use serde::Deserialize;

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
        let m: Mutation = serde_json::from_slice(&d.entry.payload).map_err(|e| {
            format!(
                "entry {} is not a mutation {{\"op\": \"put\"|\"delete\", \"key\", \"value\"}}: {e}",
                d.entry.id
            )
        })?;
        if m.key.is_empty() {
            return Err(format!("entry {}: the mutation's key is empty", d.entry.id));
        }
        if m.op == Op::Put && m.value.is_none() {
            return Err(format!("entry {}: a put needs a value", d.entry.id));
        }
        Ok(m)
    }
}

/// The version stored with a mutation: the entry's sequence. Sequences only
/// grow, so a larger version is a newer write.
pub fn version(d: &Delivered) -> i64 {
    // Sequences stay far below 2^63.
    d.sequence.min(i64::MAX as u64) as i64
}
