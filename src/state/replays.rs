//! What replays need to outlive the process:
//! - each replay's request, per-shard cursor and counts, so a replay resumes
//!   where it was after a restart and reaches `done` once;
//! - each target's committed position over time, which is what
//!   `select = "applied_after"` reads: the entries not yet applied at a time
//!   start at the position the target had committed by then;
//! - the entries whose dead letters were purged, which replays leave out
//!   unless asked not to.
//!
//! Positions are not fsynced: one lost to a crash only makes a later replay
//! start at an earlier position, which sends more entries again (the version
//! guard makes that harmless), never fewer.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{StateError, StateStore};
use crate::config::ReplayIdempotency;
use crate::entry::ShardRef;

/// Where a replay stands.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReplayState {
    Running,
    Done,
    Failed,
    Cancelled,
}

impl ReplayState {
    pub fn finished(self) -> bool {
        self != ReplayState::Running
    }
}

/// What a replay's times mean.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Select {
    /// Every entry the target had not applied at `from_ms`, whenever it was
    /// written (up to `to_ms`): what a backup taken at `from_ms` lacks.
    #[default]
    AppliedAfter,
    /// Every entry written in `[from_ms, to_ms]`.
    Written,
}

/// A replay's request, as resolved when it started.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplaySpec {
    pub from_ms: u64,
    pub to_ms: u64,
    pub select: Select,
    pub exclude_ids: BTreeSet<String>,
    /// Routing keys (an entry without a key routes by its id).
    pub exclude_keys: BTreeSet<String>,
    /// (shard, sequence) pairs.
    pub exclude_sequences: BTreeSet<(u32, u64)>,
    pub include_purged: bool,
    /// One target for every entry; `None`: each entry's own live targets.
    pub target: Option<String>,
    pub idempotency_key: ReplayIdempotency,
}

/// A replay's figures. `matched`: entries the range and `select` pick;
/// `excluded`: those of them left out; `replayed`: applied (or, in a dry
/// run, what a real run would apply); `failed`: dead-lettered, or dropped
/// where the namespace has no DLQ.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub matched: u64,
    pub replayed: u64,
    pub excluded: u64,
    pub failed: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.matched += o.matched;
        self.replayed += o.replayed;
        self.excluded += o.excluded;
        self.failed += o.failed;
    }
}

/// One shard's part of a replay: it reads `[next, end)`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShardCursor {
    pub shard: u32,
    /// Where the replay started reading.
    pub start: u64,
    /// The next sequence to read.
    pub next: u64,
    /// The first sequence past the replay's range.
    pub end: u64,
    /// With `applied_after`: entries from here on were not applied at
    /// `from_ms`; before it, only an entry still delayed then was not.
    pub unapplied_from: u64,
    /// The write time of the last entry read (0: none yet).
    pub position_ms: u64,
}

impl ShardCursor {
    pub fn done(&self) -> bool {
        self.next >= self.end
    }
}

/// A replay, as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplayRecord {
    pub replay: String,
    pub namespace: String,
    pub spec: ReplaySpec,
    pub state: ReplayState,
    pub counts: Counts,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
    pub shards: Vec<ShardCursor>,
}

impl ReplayRecord {
    /// Entries read so far, and in all, of the range the replay reads.
    pub fn progress(&self) -> (u64, u64) {
        self.shards.iter().fold((0, 0), |(read, total), c| {
            (
                read + c.next.min(c.end).saturating_sub(c.start),
                total + c.end.saturating_sub(c.start),
            )
        })
    }

    /// How far the replay has come, as a write time: the oldest position of
    /// a shard still reading (the newest, once all are done).
    pub fn position_ms(&self) -> u64 {
        let open = self.shards.iter().filter(|c| !c.done());
        match open.clone().next() {
            Some(_) => open.map(|c| c.position_ms).min().unwrap_or(0),
            None => self.shards.iter().map(|c| c.position_ms).max().unwrap_or(0),
        }
    }
}

/// The replays' keyspaces in the state store.
pub struct ReplayStore {
    store: Arc<StateStore>,
    replays: fjall::Keyspace,
    positions: fjall::Keyspace,
    purged: fjall::Keyspace,
    /// Entries redriven from a DLQ in place, by namespace and time.
    redriven: fjall::Keyspace,
}

fn replay_key(namespace: &str, id: &str) -> Vec<u8> {
    let mut k = namespace.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn shard_prefix(name: &str, shard: &ShardRef) -> Vec<u8> {
    let mut k = name.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(shard.namespace.as_bytes());
    k.push(0);
    k.extend_from_slice(&shard.shard.to_be_bytes());
    k
}

fn position_key(group: &str, shard: &ShardRef, at_ms: u64) -> Vec<u8> {
    let mut k = shard_prefix(group, shard);
    k.extend_from_slice(&at_ms.to_be_bytes());
    k
}

fn u64_of(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

impl ReplayStore {
    pub fn open(store: Arc<StateStore>) -> Result<Self, StateError> {
        Ok(Self {
            replays: store.keyspace("replays")?,
            positions: store.keyspace("replay_positions")?,
            purged: store.keyspace("replay_purged")?,
            redriven: store.keyspace("replay_redriven")?,
            store,
        })
    }

    fn err(&self, e: fjall::Error) -> StateError {
        self.store.error(e)
    }

    /// Store a replay's record, durably.
    pub fn save(&self, r: &ReplayRecord) -> Result<(), StateError> {
        let json = serde_json::to_vec(r).expect("a replay record serializes");
        self.replays
            .insert(replay_key(&r.namespace, &r.replay), json)
            .map_err(|e| self.err(e))?;
        self.store.persist()
    }

    pub fn get(&self, namespace: &str, id: &str) -> Result<Option<ReplayRecord>, StateError> {
        let v = self
            .replays
            .get(replay_key(namespace, id))
            .map_err(|e| self.err(e))?;
        Ok(v.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// The replays of `namespace` (every namespace's with `None`), oldest
    /// first.
    pub fn list(&self, namespace: Option<&str>) -> Result<Vec<ReplayRecord>, StateError> {
        let prefix = namespace.map_or(Vec::new(), |ns| replay_key(ns, ""));
        let mut out: Vec<ReplayRecord> = Vec::new();
        for item in self.replays.prefix(prefix) {
            let (_, v) = item.into_inner().map_err(|e| self.err(e))?;
            if let Ok(r) = serde_json::from_slice(&v) {
                out.push(r);
            }
        }
        out.sort_by_key(|r| r.created_ms);
        Ok(out)
    }

    /// Note that `group` had committed `offset` of `shard` at `at_ms`.
    pub fn record_position(
        &self,
        group: &str,
        shard: &ShardRef,
        at_ms: u64,
        offset: u64,
    ) -> Result<(), StateError> {
        self.positions
            .insert(position_key(group, shard, at_ms), offset.to_be_bytes())
            .map_err(|e| self.err(e))
    }

    /// The position `group` had committed of `shard` at or before `at_ms`
    /// (the latest one recorded by then), with when.
    pub fn position_at(
        &self,
        group: &str,
        shard: &ShardRef,
        at_ms: u64,
    ) -> Result<Option<(u64, u64)>, StateError> {
        let lo = shard_prefix(group, shard);
        let hi = position_key(group, shard, at_ms.saturating_add(1));
        let Some(item) = self.positions.range(lo.clone()..hi).next_back() else {
            return Ok(None);
        };
        let (k, v) = item.into_inner().map_err(|e| self.err(e))?;
        Ok(u64_of(&k[lo.len()..]).zip(u64_of(&v)))
    }

    /// Thin the recorded positions as they age: all of the last day's stay,
    /// older ones one a minute per shard, and those past 30 days go, but for
    /// each shard's latest (it still answers for every time after it). A
    /// thinned history only makes a replay start a little earlier. How
    /// many went.
    pub fn thin_positions(&self, now_ms: u64) -> Result<usize, StateError> {
        const DAY: u64 = 24 * 3600 * 1000;
        let (fine_after, kept_after) =
            (now_ms.saturating_sub(DAY), now_ms.saturating_sub(30 * DAY));
        let mut gone: Vec<Vec<u8>> = Vec::new();
        // Keys sort by shard, then time.
        let mut prev: Option<(Vec<u8>, u64)> = None;
        for item in self.positions.iter() {
            let k = item.key().map_err(|e| self.err(e))?;
            let Some(at) = u64_of(&k[k.len().saturating_sub(8)..]) else {
                continue;
            };
            let shard = k[..k.len() - 8].to_vec();
            if let Some((p_shard, p_at)) = &prev
                && *p_shard == shard
                && (at < kept_after || (*p_at < fine_after && p_at / 60_000 == at / 60_000))
            {
                // The one before goes if this later one of its shard is past
                // 30 days too, or if it is past a day and this one shares
                // its minute.
                let mut old = shard.clone();
                old.extend_from_slice(&p_at.to_be_bytes());
                gone.push(old);
            }
            prev = Some((shard, at));
        }
        for k in &gone {
            self.positions.remove(k.clone()).map_err(|e| self.err(e))?;
        }
        // Redrive notes go after 30 days too.
        let mut old = Vec::new();
        for item in self.redriven.iter() {
            let k = item.key().map_err(|e| self.err(e))?;
            let Some(nul) = k.iter().position(|b| *b == 0) else {
                continue;
            };
            let at = k
                .get(nul + 1..nul + 9)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes);
            if at.is_some_and(|at| at < kept_after) {
                old.push(k.to_vec());
            }
        }
        for k in &old {
            self.redriven.remove(k.clone()).map_err(|e| self.err(e))?;
        }
        Ok(gone.len() + old.len())
    }

    /// Note that these entries (shard, sequence) were redriven from the DLQ
    /// at `at_ms`: not applied until then. Not fsynced (a lost note only
    /// leaves the entry out of an `applied_after` replay, as before).
    pub fn record_redriven(
        &self,
        entries: &[(ShardRef, u64)],
        at_ms: u64,
    ) -> Result<(), StateError> {
        for (shard, sequence) in entries {
            let mut k = replay_key(&shard.namespace, "");
            k.extend_from_slice(&at_ms.to_be_bytes());
            k.extend_from_slice(&shard.shard.to_be_bytes());
            k.extend_from_slice(&sequence.to_be_bytes());
            self.redriven.insert(k, []).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// The entries of `namespace` redriven from the DLQ at or after
    /// `since_ms`: (shard, sequence).
    pub fn redriven_since(
        &self,
        namespace: &str,
        since_ms: u64,
    ) -> Result<Vec<(u32, u64)>, StateError> {
        let prefix = replay_key(namespace, "");
        let mut lo = prefix.clone();
        lo.extend_from_slice(&since_ms.to_be_bytes());
        let mut out = Vec::new();
        for item in self.redriven.range(lo..) {
            let k = item.key().map_err(|e| self.err(e))?;
            if !k.starts_with(&prefix) {
                break;
            }
            let rest = &k[prefix.len()..];
            if let (Some(shard), Some(seq)) = (
                rest.get(8..12)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_be_bytes),
                rest.get(12..20)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes),
            ) {
                out.push((shard, seq));
            }
        }
        Ok(out)
    }

    /// Note that the dead letters of these entries (shard, sequence) were
    /// purged, durably.
    pub fn record_purged(&self, entries: &[(ShardRef, u64)]) -> Result<(), StateError> {
        if entries.is_empty() {
            return Ok(());
        }
        for (shard, sequence) in entries {
            let mut k = shard_prefix("", shard);
            k.extend_from_slice(&sequence.to_be_bytes());
            self.purged.insert(k, []).map_err(|e| self.err(e))?;
        }
        self.store.persist()
    }

    /// Whether the dead letter of `shard`'s entry `sequence` was purged.
    pub fn is_purged(&self, shard: &ShardRef, sequence: u64) -> Result<bool, StateError> {
        let mut k = shard_prefix("", shard);
        k.extend_from_slice(&sequence.to_be_bytes());
        self.purged.contains_key(k).map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_answers_for_the_times_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = ReplayStore::open(Arc::new(StateStore::open(dir.path()).unwrap())).unwrap();
        let s0 = ShardRef::new("ns", 0);
        let s1 = ShardRef::new("ns", 1);
        store.record_position("walden", &s0, 1_000, 10).unwrap();
        store.record_position("walden", &s0, 2_000, 20).unwrap();
        store.record_position("walden", &s1, 1_500, 7).unwrap();
        store.record_position("other", &s0, 1_800, 99).unwrap();
        assert_eq!(store.position_at("walden", &s0, 999).unwrap(), None);
        assert_eq!(
            store.position_at("walden", &s0, 1_999).unwrap(),
            Some((1_000, 10))
        );
        assert_eq!(
            store.position_at("walden", &s0, 2_000).unwrap(),
            Some((2_000, 20))
        );
        assert_eq!(
            store.position_at("walden", &s1, 9_999).unwrap(),
            Some((1_500, 7))
        );
    }

    #[test]
    fn old_positions_thin_out_and_each_shard_keeps_its_latest() {
        const DAY: u64 = 24 * 3600 * 1000;
        let dir = tempfile::tempdir().unwrap();
        let store = ReplayStore::open(Arc::new(StateStore::open(dir.path()).unwrap())).unwrap();
        let (s0, s1) = (ShardRef::new("ns", 0), ShardRef::new("ns", 1));
        let now = 100 * DAY;
        // Past 30 days: two of s0 (the later stays), one of s1 (stays).
        store.record_position("g", &s0, now - 40 * DAY, 1).unwrap();
        store.record_position("g", &s0, now - 35 * DAY, 2).unwrap();
        store.record_position("g", &s1, now - 40 * DAY, 5).unwrap();
        // Two days ago, within one minute: one stays.
        store.record_position("g", &s0, now - 2 * DAY, 3).unwrap();
        store
            .record_position("g", &s0, now - 2 * DAY + 2_000, 4)
            .unwrap();
        // Recent: all stay.
        store.record_position("g", &s0, now - 4_000, 6).unwrap();
        store.record_position("g", &s0, now - 2_000, 7).unwrap();
        assert_eq!(store.thin_positions(now).unwrap(), 2);
        assert_eq!(store.position_at("g", &s0, now - 36 * DAY).unwrap(), None);
        assert_eq!(
            store
                .position_at("g", &s0, now - 3 * DAY)
                .unwrap()
                .map(|p| p.1),
            Some(2)
        );
        assert_eq!(
            store.position_at("g", &s0, now - DAY).unwrap().map(|p| p.1),
            Some(4)
        );
        assert_eq!(
            store
                .position_at("g", &s0, now - 3_000)
                .unwrap()
                .map(|p| p.1),
            Some(6)
        );
        assert_eq!(
            store.position_at("g", &s1, now).unwrap().map(|p| p.1),
            Some(5)
        );
    }
}
