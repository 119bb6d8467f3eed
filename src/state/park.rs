//! The park store: entries that wait outside the applier's memory, in fjall.
//!
//! - An entry whose retry backoff is longer than `retry.park_after_ms` is
//!   parked, with the entries of its key that wait behind it.
//! - With `dlq.on_dead_letter = "hold_key"`, a dead-lettered entry leaves a
//!   hold on its key, and later entries of the key park behind it until the
//!   dead letter is redriven or purged.
//!
//! Parked entries are fsynced (`persist(SyncData)`) before their deliveries
//! are acked, so the consumer's watermark never passes an entry that lives
//! only in memory. After a crash, the blocked keys are rebuilt from here, so a
//! later entry for a held key still waits behind the parked one.
//!
//! Keys sort by namespace, shard, entry key, then sequence, so a key's parked
//! entries come back in order. All operations run one at a time, in order, on
//! the store's own thread: a reload always sees the parks issued before it.

use std::sync::Arc;

use crossbeam_channel::Sender;
use futures_util::future::BoxFuture;
use tokio::sync::oneshot;
use tracing::error;

use super::{StateError, StateStore};
use crate::backends::BackendError;
use crate::backends::{DelayStore, Limit};
use crate::entry::frame::{self, Frame};
use crate::entry::{Delivered, ShardRef};

/// A parked entry and its retry state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parked {
    pub delivered: Delivered,
    /// The key it orders under (the entry's key, or its id when unordered).
    pub order_key: String,
    pub attempts: u32,
    pub first_failure_ms: u64,
    /// When to try it next; 0 for an entry waiting behind another.
    pub due_ms: u64,
}

/// A key that cannot deliver now, as found at startup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    pub order_key: String,
    /// The first parked entry's due time, if any is parked.
    pub head_due_ms: Option<u64>,
    /// The dead letter holding the key, if any.
    pub held_by: Option<String>,
}

type Job = Box<dyn FnOnce(&Inner) + Send>;

struct Inner {
    store: Arc<StateStore>,
    parked: fjall::Keyspace,
    holds: fjall::Keyspace,
    /// Sets of mutations a target is done with: namespace (and lane), set
    /// id → when.
    sets_done: fjall::Keyspace,
    /// The same, by when, for forgetting old ones.
    sets_done_at: fjall::Keyspace,
    /// Delayed entries by shard, due time, sequence.
    delayed: fjall::Keyspace,
    /// Namespace and id → the delayed entry's key, for cancelling.
    delayed_ids: fjall::Keyspace,
}

/// A handle to the park store; cheap to clone. Each of a namespace's
/// targets parks, holds and delays in a lane of its own
/// ([`ParkStore::lane`]); the namespace's own target uses the plain keys,
/// as before several targets existed.
#[derive(Clone)]
pub struct ParkStore {
    jobs: Sender<Job>,
    lane: Option<Arc<str>>,
}

/// Separates a namespace from its lane in a key's namespace part; namespace
/// names cannot hold it.
const LANE_MARK: char = '\u{1f}';

impl ParkStore {
    /// The same store, keyed apart for the target whose progress is in
    /// `group` (`None`: the namespace's own target).
    pub fn lane(&self, group: Option<&str>) -> Self {
        Self {
            jobs: self.jobs.clone(),
            lane: group.map(Arc::from),
        }
    }

    /// `shard` as this lane keys it.
    fn at(&self, shard: &ShardRef) -> ShardRef {
        match &self.lane {
            None => shard.clone(),
            Some(lane) => {
                ShardRef::new(format!("{}{LANE_MARK}{lane}", shard.namespace), shard.shard)
            }
        }
    }
}

fn shard_prefix(shard: &ShardRef) -> Vec<u8> {
    let mut k = Vec::with_capacity(shard.namespace.len() + 6);
    k.extend_from_slice(&(shard.namespace.len() as u16).to_be_bytes());
    k.extend_from_slice(shard.namespace.as_bytes());
    k.extend_from_slice(&shard.shard.to_be_bytes());
    k
}

fn key_prefix(shard: &ShardRef, order_key: &str) -> Vec<u8> {
    let mut k = shard_prefix(shard);
    k.extend_from_slice(&(order_key.len() as u32).to_be_bytes());
    k.extend_from_slice(order_key.as_bytes());
    k
}

fn set_key(namespace: &ShardRef, set: &str) -> Vec<u8> {
    let mut k = shard_prefix(namespace);
    k.extend_from_slice(set.as_bytes());
    k
}

fn entry_key(shard: &ShardRef, order_key: &str, sequence: u64) -> Vec<u8> {
    let mut k = key_prefix(shard, order_key);
    k.extend_from_slice(&sequence.to_be_bytes());
    k
}

/// The order key inside a store key, after the shard prefix.
fn order_key_of(key: &[u8], prefix_len: usize) -> Option<String> {
    let len_bytes = key.get(prefix_len..prefix_len + 4)?;
    let len = u32::from_be_bytes(len_bytes.try_into().ok()?) as usize;
    let bytes = key.get(prefix_len + 4..prefix_len + 4 + len)?;
    String::from_utf8(bytes.to_vec()).ok()
}

/// Value: attempts, first failure, due, the order key, then the entry as a
/// CRC-checked log record.
fn encode(p: &Parked) -> Vec<u8> {
    let mut v = Vec::with_capacity(p.delivered.entry.payload.len() + 128);
    v.extend_from_slice(&p.attempts.to_le_bytes());
    v.extend_from_slice(&p.first_failure_ms.to_le_bytes());
    v.extend_from_slice(&p.due_ms.to_le_bytes());
    v.extend_from_slice(&(p.order_key.len() as u32).to_le_bytes());
    v.extend_from_slice(p.order_key.as_bytes());
    let d = &p.delivered;
    frame::encode_record(
        &mut v,
        &d.shard.namespace,
        d.shard.shard,
        d.sequence,
        &d.entry,
    )
    .expect("entries were checked when they were appended");
    v
}

fn decode(v: &[u8]) -> Option<Parked> {
    let attempts = u32::from_le_bytes(v.get(0..4)?.try_into().ok()?);
    let first_failure_ms = u64::from_le_bytes(v.get(4..12)?.try_into().ok()?);
    let due_ms = u64::from_le_bytes(v.get(12..20)?.try_into().ok()?);
    let klen = u32::from_le_bytes(v.get(20..24)?.try_into().ok()?) as usize;
    let order_key = String::from_utf8(v.get(24..24 + klen)?.to_vec()).ok()?;
    match frame::decode_frame(v.get(24 + klen..)?) {
        Frame::Valid { record, .. } => Some(Parked {
            delivered: Delivered {
                shard: ShardRef {
                    namespace: record.namespace,
                    shard: record.shard,
                },
                sequence: record.offset,
                entry: record.entry,
            },
            order_key,
            attempts,
            first_failure_ms,
            due_ms,
        }),
        _ => None,
    }
}

impl Inner {
    fn err(&self, e: fjall::Error) -> StateError {
        self.store.error(e)
    }

    fn persist(&self) -> Result<(), StateError> {
        self.store.persist()
    }
}

impl ParkStore {
    pub fn open(store: Arc<StateStore>) -> Result<Self, StateError> {
        let inner = Inner {
            parked: store.keyspace("parked")?,
            holds: store.keyspace("holds")?,
            delayed: store.keyspace("delayed")?,
            sets_done: store.keyspace("sets_done")?,
            sets_done_at: store.keyspace("sets_done_at")?,
            delayed_ids: store.keyspace("delayed_ids")?,
            store,
        };
        let (jobs, rx) = crossbeam_channel::unbounded::<Job>();
        std::thread::Builder::new()
            .name("walden-park-store".into())
            .spawn(move || {
                for job in rx {
                    job(&inner);
                }
            })
            .map_err(|e| StateError {
                path: "park store thread".into(),
                source: fjall::Error::Io(e),
            })?;
        Ok(Self { jobs, lane: None })
    }

    /// Run `f` on the store's thread, after every job sent before it.
    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<R, StateError> + Send + 'static,
    ) -> Result<R, StateError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |inner| {
            let _ = tx.send(f(inner));
        });
        if self.jobs.send(job).is_err() {
            error!("The park store's thread is gone.");
        }
        rx.await.unwrap_or_else(|_| {
            Err(StateError {
                path: "park store thread".into(),
                source: fjall::Error::Io(std::io::Error::other("the park store stopped")),
            })
        })
    }

    /// Park these entries (or update their retry state), durably.
    pub async fn park(&self, items: Vec<Parked>) -> Result<(), StateError> {
        let keys: Vec<Vec<u8>> = items
            .iter()
            .map(|p| {
                entry_key(
                    &self.at(&p.delivered.shard),
                    &p.order_key,
                    p.delivered.sequence,
                )
            })
            .collect();
        self.run(move |s| {
            s.store.wait_for_flushes();
            for (p, k) in items.iter().zip(keys) {
                s.parked.insert(k, encode(p)).map_err(|e| s.err(e))?;
            }
            s.persist()
        })
        .await
    }

    /// One key's parked entries after sequence `after` (from its first when
    /// `None`), in sequence order, within `limit`: a long backlog comes back
    /// a page at a time.
    pub async fn load(
        &self,
        shard: ShardRef,
        order_key: String,
        after: Option<u64>,
        limit: Limit,
    ) -> Result<Vec<Parked>, StateError> {
        let shard = self.at(&shard);
        self.run(move |s| {
            let lo = match after {
                Some(seq) => entry_key(&shard, &order_key, seq.saturating_add(1)),
                None => key_prefix(&shard, &order_key),
            };
            let hi = entry_key(&shard, &order_key, u64::MAX);
            let mut out = Vec::new();
            let mut bytes = 0;
            for item in s.parked.range(lo..hi).take(limit.entries) {
                if !out.is_empty() && bytes >= limit.bytes {
                    break;
                }
                let (_, v) = item.into_inner().map_err(|e| s.err(e))?;
                bytes += v.len();
                if let Some(p) = decode(&v) {
                    out.push(p);
                }
            }
            Ok(out)
        })
        .await
    }

    /// Forget an entry that was applied or dead-lettered. Not fsynced: if a
    /// crash brings it back, it is applied again (at least once).
    pub async fn remove(
        &self,
        shard: ShardRef,
        order_key: String,
        sequence: u64,
    ) -> Result<(), StateError> {
        let shard = self.at(&shard);
        self.run(move |s| {
            s.parked
                .remove(entry_key(&shard, &order_key, sequence))
                .map_err(|e| s.err(e))
        })
        .await
    }

    /// Hold a key behind a dead letter, durably.
    pub async fn hold(
        &self,
        shard: ShardRef,
        order_key: String,
        dlq_id: String,
    ) -> Result<(), StateError> {
        let shard = self.at(&shard);
        self.run(move |s| {
            s.holds
                .insert(key_prefix(&shard, &order_key), dlq_id.into_bytes())
                .map_err(|e| s.err(e))?;
            s.persist()
        })
        .await
    }

    /// Release a key's hold, durably.
    pub async fn release(&self, shard: ShardRef, order_key: String) -> Result<(), StateError> {
        let shard = self.at(&shard);
        self.run(move |s| {
            s.holds
                .remove(key_prefix(&shard, &order_key))
                .map_err(|e| s.err(e))?;
            s.persist()
        })
        .await
    }

    /// Record that this lane's target is done with these sets of
    /// `namespace` (applied them, or dead-lettered them), durably, in one
    /// fsync, before any of their mutations is acked: a mutation delivered
    /// again after a crash then finds the record, rather than waiting for
    /// the others.
    pub async fn sets_done(&self, namespace: &str, sets: Vec<String>) -> Result<(), StateError> {
        let ns = self.at(&ShardRef::new(namespace, 0));
        self.run(move |s| {
            let now = crate::entry::now_ms();
            for set in &sets {
                let key = set_key(&ns, set);
                let mut at = now.to_be_bytes().to_vec();
                at.extend_from_slice(&key);
                s.sets_done
                    .insert(&key, now.to_be_bytes())
                    .map_err(|e| s.err(e))?;
                s.sets_done_at.insert(at, []).map_err(|e| s.err(e))?;
            }
            s.persist()
        })
        .await
    }

    /// Whether this lane's target is done with set `set` of `namespace`.
    pub async fn is_set_done(&self, namespace: &str, set: &str) -> Result<bool, StateError> {
        let key = set_key(&self.at(&ShardRef::new(namespace, 0)), set);
        self.run(move |s| s.sets_done.contains_key(&key).map_err(|e| s.err(e)))
            .await
    }

    /// Forget the sets recorded done before `before_ms`, of every lane;
    /// how many.
    pub async fn forget_sets(&self, before_ms: u64) -> Result<usize, StateError> {
        self.run(move |s| {
            let mut old = Vec::new();
            for item in s.sets_done_at.range(..before_ms.to_be_bytes().to_vec()) {
                old.push(item.key().map_err(|e| s.err(e))?);
            }
            for at in &old {
                s.sets_done.remove(&at[8..]).map_err(|e| s.err(e))?;
                s.sets_done_at.remove(at.to_vec()).map_err(|e| s.err(e))?;
            }
            Ok(old.len())
        })
        .await
    }

    /// The lowest sequence of `shard` parked now (`None`: nothing is).
    /// Only each key's head is read, as [`ParkStore::blocked`] does.
    pub async fn parked_floor(&self, shard: ShardRef) -> Result<Option<u64>, StateError> {
        let shard = self.at(&shard);
        self.run(move |s| {
            let prefix = shard_prefix(&shard);
            let mut floor: Option<u64> = None;
            let mut from = prefix.clone();
            loop {
                let Some(item) = s.parked.range(from.clone()..).next() else {
                    break;
                };
                let k = item.key().map_err(|e| s.err(e))?;
                if !k.starts_with(&prefix) {
                    break;
                }
                let Some(key) = order_key_of(&k, prefix.len()) else {
                    from = k.to_vec();
                    from.push(0);
                    continue;
                };
                // A head: the key's first entry, its lowest sequence.
                let at = prefix.len() + 4 + key.len();
                if let Some(seq) = k
                    .get(at..at + 8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                {
                    floor = Some(floor.map_or(seq, |f| f.min(seq)));
                }
                from = entry_key(&shard, &key, u64::MAX);
                from.push(0);
            }
            Ok(floor)
        })
        .await
    }

    /// The keys of a shard that cannot deliver now: parked heads and holds.
    /// Only each key's head is read: the scan seeks past the rest of its
    /// backlog, however long.
    pub async fn blocked(&self, shard: ShardRef) -> Result<Vec<Blocked>, StateError> {
        let shard = self.at(&shard);
        self.run(move |s| {
            let prefix = shard_prefix(&shard);
            let mut out: Vec<Blocked> = Vec::new();
            let mut from = prefix.clone();
            loop {
                let Some(item) = s.parked.range(from.clone()..).next() else {
                    break;
                };
                let (k, v) = item.into_inner().map_err(|e| s.err(e))?;
                if !k.starts_with(&prefix) {
                    break;
                }
                let Some(key) = order_key_of(&k, prefix.len()) else {
                    // Not a parked entry's key: step over it.
                    from = k.to_vec();
                    from.push(0);
                    continue;
                };
                // Past every sequence of this key.
                from = entry_key(&shard, &key, u64::MAX);
                from.push(0);
                let due = decode(&v).map(|p| p.due_ms).unwrap_or(0);
                out.push(Blocked {
                    order_key: key,
                    head_due_ms: Some(due),
                    held_by: None,
                });
            }
            for item in s.holds.prefix(&prefix) {
                let (k, v) = item.into_inner().map_err(|e| s.err(e))?;
                let Some(key) = order_key_of(&k, prefix.len()) else {
                    continue;
                };
                let held_by = String::from_utf8_lossy(&v).into_owned();
                match out.iter_mut().find(|b| b.order_key == key) {
                    Some(b) => b.held_by = Some(held_by),
                    None => out.push(Blocked {
                        order_key: key,
                        head_due_ms: None,
                        held_by: Some(held_by),
                    }),
                }
            }
            Ok(out)
        })
        .await
    }
}

/// Delayed entries sort by shard, then due time, then sequence.
fn delayed_key(shard: &ShardRef, due_ms: u64, sequence: u64) -> Vec<u8> {
    let mut k = shard_prefix(shard);
    k.extend_from_slice(&due_ms.to_be_bytes());
    k.extend_from_slice(&sequence.to_be_bytes());
    k
}

fn id_key(namespace: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(namespace.len() + id.len() + 2);
    k.extend_from_slice(&(namespace.len() as u16).to_be_bytes());
    k.extend_from_slice(namespace.as_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

fn delayed_value(d: &Delivered, due_ms: u64) -> Vec<u8> {
    encode(&Parked {
        delivered: d.clone(),
        order_key: String::new(),
        attempts: 0,
        first_failure_ms: 0,
        due_ms,
    })
}

/// The embedded delay store: the same worker, other keyspaces. Entries are
/// keyed by shard, due time and sequence; a second keyspace maps an id to
/// that key for `find` and `cancel`.
impl DelayStore for ParkStore {
    fn for_target(&self, group: Option<&str>) -> Option<Arc<dyn DelayStore>> {
        Some(Arc::new(self.lane(group)))
    }

    fn delay(&self, items: Vec<Delivered>) -> BoxFuture<'_, Result<(), BackendError>> {
        let keys: Vec<(Vec<u8>, Vec<u8>)> = items
            .iter()
            .map(|d| {
                let at = self.at(&d.shard);
                (
                    delayed_key(&at, d.entry.due_ms, d.sequence),
                    id_key(&at.namespace, &d.entry.id),
                )
            })
            .collect();
        Box::pin(async move {
            self.run(move |s| {
                s.store.wait_for_flushes();
                for (d, (k, ik)) in items.iter().zip(keys) {
                    s.delayed
                        .insert(k.clone(), delayed_value(d, d.entry.due_ms))
                        .map_err(|e| s.err(e))?;
                    s.delayed_ids.insert(ik, k).map_err(|e| s.err(e))?;
                }
                s.persist()
            })
            .await?;
            Ok(())
        })
    }

    fn due_between(
        &self,
        shard: &ShardRef,
        from_ms: u64,
        until_ms: u64,
        limit: Limit,
    ) -> BoxFuture<'_, Result<Vec<Delivered>, BackendError>> {
        let shard = self.at(shard);
        let lo = delayed_key(&shard, from_ms, 0);
        let hi = delayed_key(&shard, until_ms, 0);
        Box::pin(async move {
            let found = self
                .run(move |s| {
                    let mut out = Vec::new();
                    let mut bytes = 0;
                    for item in s.delayed.range(lo..hi).take(limit.entries) {
                        if !out.is_empty() && bytes >= limit.bytes {
                            break;
                        }
                        let (_, v) = item.into_inner().map_err(|e| s.err(e))?;
                        bytes += v.len();
                        if let Some(p) = decode(&v) {
                            out.push(p.delivered);
                        }
                    }
                    Ok(out)
                })
                .await?;
            Ok(found)
        })
    }

    fn summary(&self, shard: &ShardRef) -> BoxFuture<'_, Result<(u64, Option<u64>), BackendError>> {
        let prefix = shard_prefix(&self.at(shard));
        Box::pin(async move {
            let summary = self
                .run(move |s| {
                    let mut n = 0;
                    let mut first = None;
                    for item in s.delayed.prefix(&prefix) {
                        let k = item.key().map_err(|e| s.err(e))?;
                        if first.is_none() {
                            first = k
                                .get(prefix.len()..prefix.len() + 8)
                                .and_then(|b| b.try_into().ok())
                                .map(u64::from_be_bytes);
                        }
                        n += 1;
                    }
                    Ok((n, first))
                })
                .await?;
            Ok(summary)
        })
    }

    fn undelay(&self, d: Delivered) -> BoxFuture<'_, Result<(), BackendError>> {
        let at = self.at(&d.shard);
        let (k, ik) = (
            delayed_key(&at, d.entry.due_ms, d.sequence),
            id_key(&at.namespace, &d.entry.id),
        );
        Box::pin(async move {
            self.run(move |s| {
                s.delayed.remove(k).map_err(|e| s.err(e))?;
                s.delayed_ids.remove(ik).map_err(|e| s.err(e))
            })
            .await?;
            Ok(())
        })
    }

    fn find(
        &self,
        namespace: &str,
        id: &str,
    ) -> BoxFuture<'_, Result<Option<Delivered>, BackendError>> {
        let ik = id_key(&self.at(&ShardRef::new(namespace, 0)).namespace, id);
        Box::pin(async move {
            let found = self
                .run(move |s| {
                    let Some(k) = s.delayed_ids.get(ik).map_err(|e| s.err(e))? else {
                        return Ok(None);
                    };
                    let v = s.delayed.get(&k).map_err(|e| s.err(e))?;
                    Ok(v.and_then(|v| decode(&v)).map(|p| p.delivered))
                })
                .await?;
            Ok(found)
        })
    }

    fn cancel(&self, d: &Delivered) -> BoxFuture<'_, Result<bool, BackendError>> {
        let at = self.at(&d.shard);
        let k = delayed_key(&at, d.entry.due_ms, d.sequence);
        let ik = id_key(&at.namespace, &d.entry.id);
        Box::pin(async move {
            let removed = self
                .run(move |s| {
                    if s.delayed.get(&k).map_err(|e| s.err(e))?.is_none() {
                        return Ok(false);
                    }
                    s.delayed.remove(k).map_err(|e| s.err(e))?;
                    s.delayed_ids.remove(ik).map_err(|e| s.err(e))?;
                    s.persist()?;
                    Ok(true)
                })
                .await?;
            Ok(removed)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::Entry;
    use bytes::Bytes;

    #[tokio::test]
    async fn sets_done_are_kept_per_lane_and_forgotten_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(StateStore::open(dir.path()).unwrap());
        let own = ParkStore::open(store).unwrap();
        let other = own.lane(Some("walden.ns.search"));
        own.sets_done("ns", vec!["s1".into()]).await.unwrap();
        assert!(own.is_set_done("ns", "s1").await.unwrap());
        assert!(!other.is_set_done("ns", "s1").await.unwrap(), "lanes apart");
        assert!(!own.is_set_done("other", "s1").await.unwrap());
        other.sets_done("ns", vec!["s1".into()]).await.unwrap();
        assert_eq!(own.forget_sets(0).await.unwrap(), 0, "nothing that old");
        let later = crate::entry::now_ms() + 1;
        assert_eq!(own.forget_sets(later).await.unwrap(), 2, "every lane");
        assert!(!own.is_set_done("ns", "s1").await.unwrap());
        assert!(!other.is_set_done("ns", "s1").await.unwrap());
    }

    #[tokio::test]
    async fn the_parked_floor_is_the_lowest_head_of_the_shard_and_lane() {
        let dir = tempfile::tempdir().unwrap();
        let own = ParkStore::open(Arc::new(StateStore::open(dir.path()).unwrap())).unwrap();
        let other = own.lane(Some("walden.ns.search"));
        let parked = |shard: u32, key: &str, sequence: u64| Parked {
            delivered: Delivered {
                shard: ShardRef::new("ns", shard),
                sequence,
                entry: Entry::default().into(),
            },
            order_key: key.into(),
            attempts: 1,
            first_failure_ms: 0,
            due_ms: 0,
        };
        let (s0, s1) = (ShardRef::new("ns", 0), ShardRef::new("ns", 1));
        assert_eq!(own.parked_floor(s0.clone()).await.unwrap(), None);
        own.park(vec![
            parked(0, "b", 30),
            parked(0, "b", 31),
            parked(0, "a", 40),
        ])
        .await
        .unwrap();
        own.park(vec![parked(1, "a", 5)]).await.unwrap();
        other.park(vec![parked(0, "c", 2)]).await.unwrap();
        own.hold(s0.clone(), "h".into(), "letter".into())
            .await
            .unwrap();
        assert_eq!(own.parked_floor(s0.clone()).await.unwrap(), Some(30));
        assert_eq!(own.parked_floor(s1.clone()).await.unwrap(), Some(5));
        assert_eq!(other.parked_floor(s0.clone()).await.unwrap(), Some(2));
        own.remove(s0.clone(), "b".into(), 30).await.unwrap();
        assert_eq!(own.parked_floor(s0.clone()).await.unwrap(), Some(31));
    }

    #[test]
    fn parked_entries_round_trip() {
        let p = Parked {
            delivered: Delivered {
                shard: ShardRef::new("ns", 3),
                sequence: 42,
                entry: Arc::new(Entry {
                    id: "e".into(),
                    key: Some("k".into()),
                    payload: Bytes::from_static(b"{}"),
                    ..Entry::default()
                }),
            },
            order_key: "k".into(),
            attempts: 4,
            first_failure_ms: 7,
            due_ms: 99,
        };
        assert_eq!(decode(&encode(&p)), Some(p));
    }

    #[test]
    fn past_a_key_s_last_sequence_comes_the_next_key() {
        let s = ShardRef::new("ns", 1);
        let mut past_a = entry_key(&s, "a", u64::MAX);
        past_a.push(0);
        assert!(entry_key(&s, "a", u64::MAX) < past_a);
        assert!(past_a < entry_key(&s, "b", 0));
        assert!(past_a < entry_key(&s, "aa", 0));
    }

    #[test]
    fn keys_sort_by_key_then_sequence() {
        let s = ShardRef::new("ns", 1);
        assert!(entry_key(&s, "a", 9) < entry_key(&s, "a", 10));
        assert!(entry_key(&s, "a", 300) < entry_key(&s, "b", 1));
        assert_eq!(
            order_key_of(&entry_key(&s, "a\0b", 5), shard_prefix(&s).len()).as_deref(),
            Some("a\0b")
        );
    }
}
