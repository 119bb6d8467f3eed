//! Idempotency keys: a write whose `id` was already accepted within the
//! namespace's dedup window gets the original answer back and is not appended
//! again; the same id with a different body is refused.
//!
//! An id is recorded only after its append is durable. A concurrent duplicate
//! waits for the first write's outcome. The index lives in fjall, keyed
//! `namespace \0 id`; it is not fsynced per write, because the log is the
//! source of truth: on open, the window is rebuilt from the log's recent
//! records, which covers anything a crash kept out of fjall.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::watch;

use super::{StateError, StateStore};
use crate::entry::{Entry, SET_FINGERPRINT_HEADER, ShardRef, now_ms};

/// What a write with a known id was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub fingerprint: u64,
    pub shard: u32,
    pub sequence: u64,
    pub written_ms: u64,
}

impl Accepted {
    fn encode(&self) -> [u8; 28] {
        let mut b = [0; 28];
        b[0..8].copy_from_slice(&self.fingerprint.to_le_bytes());
        b[8..12].copy_from_slice(&self.shard.to_le_bytes());
        b[12..20].copy_from_slice(&self.sequence.to_le_bytes());
        b[20..28].copy_from_slice(&self.written_ms.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let u64_at = |i: usize| Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?));
        Some(Self {
            fingerprint: u64_at(0)?,
            shard: u32::from_le_bytes(b.get(8..12)?.try_into().ok()?),
            sequence: u64_at(12)?,
            written_ms: u64_at(20)?,
        })
    }
}

/// The result of looking up an id before writing.
pub enum Check {
    /// Accepted before with the same body: answer as then.
    Duplicate(Accepted),
    /// Accepted before with a different body.
    Conflict(Accepted),
    /// A write with this id is in flight; wait for it, then check again.
    Wait(watch::Receiver<()>),
    /// This write owns the id until the guard is dropped.
    Claimed(Claim),
}

/// Ownership of an id while its write is in flight. Dropping it wakes the
/// writes waiting on the same id.
pub struct Claim {
    index: Arc<DedupIndex>,
    key: Vec<u8>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.index.inflight.remove(&self.key);
    }
}

pub struct DedupIndex {
    store: Arc<StateStore>,
    keyspace: fjall::Keyspace,
    inflight: DashMap<Vec<u8>, watch::Sender<()>>,
}

fn key(namespace: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(namespace.len() + 1 + id.len());
    k.extend_from_slice(namespace.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

/// A stable 64-bit digest of what makes two writes "the same": key, payload
/// and headers (not `traceparent`, which differs on every retry). Computed
/// the same way from a request and from a log record, as two CRC32Cs with
/// different seeds, streamed over the parts without copying them.
pub fn fingerprint(entry: &Entry) -> u64 {
    let (mut lo, mut hi) = (0u32, 0x9e37_79b9u32);
    let mut feed = |bytes: &[u8]| {
        lo = crc32c::crc32c_append(lo, bytes);
        hi = crc32c::crc32c_append(hi, bytes);
    };
    match &entry.key {
        Some(k) => {
            feed(&[1]);
            feed(&(k.len() as u32).to_le_bytes());
            feed(k.as_bytes());
        }
        None => feed(&[0]),
    }
    let mut headers: Vec<_> = entry
        .headers
        .iter()
        .filter(|(k, _)| k != "traceparent")
        .collect();
    headers.sort();
    for (k, v) in headers {
        for part in [k, v] {
            feed(&(part.len() as u32).to_le_bytes());
            feed(part.as_bytes());
        }
    }
    feed(&entry.payload);
    (hi as u64) << 32 | lo as u64
}

impl DedupIndex {
    pub fn open(store: Arc<StateStore>) -> Result<Arc<Self>, StateError> {
        let keyspace = store.keyspace("dedup")?;
        Ok(Arc::new(Self {
            store,
            keyspace,
            inflight: DashMap::new(),
        }))
    }

    /// Look `id` up, or claim it for this write.
    pub fn check(
        self: &Arc<Self>,
        namespace: &str,
        id: &str,
        fingerprint: u64,
        window: Duration,
    ) -> Result<Check, StateError> {
        let key = key(namespace, id);
        if let Some(accepted) = self.lookup(&key, window)? {
            return Ok(if accepted.fingerprint == fingerprint {
                Check::Duplicate(accepted)
            } else {
                Check::Conflict(accepted)
            });
        }
        match self.inflight.entry(key.clone()) {
            dashmap::Entry::Occupied(e) => Ok(Check::Wait(e.get().subscribe())),
            dashmap::Entry::Vacant(e) => {
                e.insert(watch::channel(()).0);
                // It may have been recorded between the lookup and the claim.
                if let Some(accepted) = self.lookup(&key, window)? {
                    self.inflight.remove(&key);
                    return Ok(if accepted.fingerprint == fingerprint {
                        Check::Duplicate(accepted)
                    } else {
                        Check::Conflict(accepted)
                    });
                }
                Ok(Check::Claimed(Claim {
                    index: self.clone(),
                    key,
                }))
            }
        }
    }

    fn lookup(&self, key: &[u8], window: Duration) -> Result<Option<Accepted>, StateError> {
        let Some(bytes) = self.keyspace.get(key).map_err(|e| self.store.error(e))? else {
            return Ok(None);
        };
        let accepted = Accepted::decode(&bytes);
        let horizon = now_ms().saturating_sub(window.as_millis() as u64);
        Ok(accepted.filter(|a| a.written_ms >= horizon))
    }

    /// Record a durable write. Call before dropping its claim.
    pub fn record(&self, namespace: &str, id: &str, accepted: Accepted) -> Result<(), StateError> {
        self.keyspace
            .insert(key(namespace, id), accepted.encode())
            .map_err(|e| self.store.error(e))
    }

    /// Record ids the log holds as accepted (its records of the window,
    /// read at open), so that ids a crash kept out of the index are known
    /// again. Returns how many it wrote.
    pub fn remember<'a>(
        &self,
        shard: &ShardRef,
        records: impl IntoIterator<Item = (u64, &'a Entry)>,
    ) -> usize {
        self.store.wait_for_flushes();
        let mut n = 0;
        for (sequence, entry) in records {
            // A set's mutations carry ids of Walden's making; its marker
            // carries the set's id, and the set's fingerprint.
            let fingerprint = match entry.header(SET_FINGERPRINT_HEADER) {
                _ if entry.set_place().is_some() => continue,
                Some(hex) if entry.is_set_marker() => match u64::from_str_radix(hex, 16) {
                    Ok(fp) => fp,
                    Err(_) => continue,
                },
                _ => fingerprint(entry),
            };
            // Written blind: the same value as when it was written. (Asking
            // first costs a table lookup per id, slower than the write, and
            // most ids were generated, so absent.)
            let accepted = Accepted {
                fingerprint,
                shard: shard.shard,
                sequence,
                written_ms: entry.timestamp_ms,
            };
            // A failed index write only loses dedup for that id.
            let _ = self.record(&shard.namespace, &entry.id, accepted);
            n += 1;
        }
        n
    }

    /// Forget ids older than `window`.
    pub fn purge(&self, window: Duration) -> Result<usize, StateError> {
        let horizon = now_ms().saturating_sub(window.as_millis() as u64);
        let mut expired = Vec::new();
        for item in self.keyspace.iter() {
            let (k, v) = item.into_inner().map_err(|e| self.store.error(e))?;
            if Accepted::decode(&v).is_none_or(|a| a.written_ms < horizon) {
                expired.push(k);
            }
        }
        for k in &expired {
            self.keyspace
                .remove(k.clone())
                .map_err(|e| self.store.error(e))?;
        }
        Ok(expired.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_ignore_traceparent_and_header_order() {
        let base = Entry {
            key: Some("k".into()),
            headers: vec![("a".into(), "1".into()), ("b".into(), "2".into())],
            payload: bytes::Bytes::from_static(b"{}"),
            ..Entry::default()
        };
        let mut other = base.clone();
        other.headers.reverse();
        other.headers.push(("traceparent".into(), "00-x".into()));
        assert_eq!(fingerprint(&base), fingerprint(&other));
        let mut changed = base.clone();
        changed.payload = bytes::Bytes::from_static(b"[]");
        assert_ne!(fingerprint(&base), fingerprint(&changed));
        let mut no_key = base.clone();
        no_key.key = None;
        assert_ne!(fingerprint(&base), fingerprint(&no_key));
    }

    #[test]
    fn the_digest_is_the_one_indexes_already_hold() {
        // Computed over one buffer, as earlier versions stored it.
        let e = Entry {
            key: Some("k".into()),
            headers: vec![("a".into(), "1".into())],
            payload: bytes::Bytes::from_static(b"{}"),
            ..Entry::default()
        };
        let mut buf = vec![1];
        buf.extend_from_slice(&1u32.to_le_bytes());
        buf.extend_from_slice(b"k");
        for part in ["a", "1"] {
            buf.extend_from_slice(&1u32.to_le_bytes());
            buf.extend_from_slice(part.as_bytes());
        }
        buf.extend_from_slice(b"{}");
        let lo = crc32c::crc32c(&buf) as u64;
        let hi = crc32c::crc32c_append(0x9e37_79b9, &buf) as u64;
        assert_eq!(fingerprint(&e), hi << 32 | lo);
    }

    #[test]
    fn accepted_round_trips() {
        let a = Accepted {
            fingerprint: 7,
            shard: 3,
            sequence: 99,
            written_ms: 12345,
        };
        assert_eq!(Accepted::decode(&a.encode()), Some(a));
    }
}
