//! The embedded dead-letter queue: its own durable log under `data_dir/dlq`,
//! one shard per namespace.
//!
//! A dead letter is the original entry, unchanged, with its origin and failure
//! history in `walden.dlq.*` headers. A log cannot forget, so purge and a
//! successful redrive append a tombstone naming the letter's DLQ sequence. At
//! open the log is read once to rebuild which letters are live; letters are
//! read back from the log on demand, so memory holds only an index: each
//! live letter's position and a hash of its id, a few dozen bytes a letter.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{EmbeddedLog, LogConfig, LogError};
use crate::backends::{BackendError, DeadLetter, DeadLetters, Origin};
use crate::entry::{Entry, ShardRef};

const PREFIX: &str = "walden.dlq.";
const TOMBSTONE: &str = "walden.dlq.tombstone";
/// On a tombstone: the DLQ sequence of the letter it removes. Tombstones
/// written before it existed remove every letter of their id.
const REMOVES: &str = "walden.dlq.removes";

/// The live letters of one namespace: each one's DLQ sequence and a hash of
/// its id, and the letters of each id hash. A hash collision only costs a
/// read: a letter read back is checked for its id.
#[derive(Default)]
struct Live {
    /// DLQ sequence → id hash, in order.
    by_seq: BTreeMap<u64, u64>,
    by_id: HashMap<u64, Seqs>,
}

/// The DLQ sequences of one id hash: nearly always one.
enum Seqs {
    One(u64),
    Many(Vec<u64>),
}

impl Seqs {
    fn as_slice(&self) -> &[u64] {
        match self {
            Seqs::One(seq) => std::slice::from_ref(seq),
            Seqs::Many(seqs) => seqs,
        }
    }
}

fn id_hash(id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

impl Live {
    fn insert(&mut self, seq: u64, id: &str) {
        let hash = id_hash(id);
        self.by_seq.insert(seq, hash);
        match self.by_id.remove(&hash) {
            None => self.by_id.insert(hash, Seqs::One(seq)),
            Some(Seqs::One(first)) => self.by_id.insert(hash, Seqs::Many(vec![first, seq])),
            Some(Seqs::Many(mut seqs)) => {
                seqs.push(seq);
                self.by_id.insert(hash, Seqs::Many(seqs))
            }
        };
    }

    /// Remove the letter at `seq`; false if it was not live.
    fn remove(&mut self, seq: u64) -> bool {
        let Some(hash) = self.by_seq.remove(&seq) else {
            return false;
        };
        let left: Vec<u64> = match self.by_id.remove(&hash) {
            Some(s) => s.as_slice().iter().copied().filter(|s| *s != seq).collect(),
            None => Vec::new(),
        };
        match left[..] {
            [] => {}
            [one] => {
                self.by_id.insert(hash, Seqs::One(one));
            }
            _ => {
                self.by_id.insert(hash, Seqs::Many(left));
            }
        }
        true
    }

    /// Remove every letter of `id` (a tombstone written before tombstones
    /// named their letter).
    fn remove_id(&mut self, id: &str) {
        let seqs: Vec<u64> = self
            .by_id
            .get(&id_hash(id))
            .map(|s| s.as_slice().to_vec())
            .unwrap_or_default();
        for seq in seqs {
            self.remove(seq);
        }
    }

    /// The sequences that may be letters of `id`, in order.
    fn candidates(&self, id: &str) -> Vec<u64> {
        let mut seqs = self
            .by_id
            .get(&id_hash(id))
            .map(|s| s.as_slice().to_vec())
            .unwrap_or_default();
        seqs.sort_unstable();
        seqs
    }
}

pub struct EmbeddedDlq {
    log: EmbeddedLog,
    live: Mutex<HashMap<String, Live>>,
}

fn shard(namespace: &str) -> ShardRef {
    ShardRef::new(namespace, 0)
}

impl EmbeddedDlq {
    /// Open the DLQ log in `dir` and rebuild the set of live letters.
    pub fn open(dir: &Path) -> Result<Arc<Self>, LogError> {
        let log = EmbeddedLog::open(dir, LogConfig::default())?;
        let mut live: HashMap<String, Live> = HashMap::new();
        for (s, _) in log.shards() {
            let ns = live.entry(s.namespace.to_string()).or_default();
            let mut reader = log.reader(&s, log.earliest_offset(&s))?;
            loop {
                let batch = reader.read_within(super::SCAN)?;
                if batch.is_empty() {
                    break;
                }
                for r in batch {
                    if r.entry.header(TOMBSTONE).is_none() {
                        ns.insert(r.offset, &r.entry.id);
                    } else {
                        match r.entry.header(REMOVES).and_then(|s| s.parse().ok()) {
                            Some(seq) => {
                                ns.remove(seq);
                            }
                            None => ns.remove_id(&r.entry.id),
                        }
                    }
                }
            }
        }
        Ok(Arc::new(Self {
            log,
            live: Mutex::new(live),
        }))
    }

    /// The letters at `seqs` (in order), read in one pass from the first to
    /// the last.
    fn read(&self, namespace: &str, seqs: &[u64]) -> Result<Vec<DeadLetter>, LogError> {
        let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else {
            return Ok(Vec::new());
        };
        let mut reader = self.log.reader(&shard(namespace), first)?;
        let mut out = Vec::with_capacity(seqs.len());
        while reader.next_offset() <= last {
            let batch = reader.read_within(super::SCAN)?;
            if batch.is_empty() {
                break;
            }
            for r in batch {
                if r.offset <= last && seqs.binary_search(&r.offset).is_ok() {
                    out.extend(decode(r.offset, Arc::unwrap_or_clone(r.entry)));
                }
            }
        }
        Ok(out)
    }

    /// Stop the DLQ log (flush and join its committer).
    pub fn close(&self) {
        self.log.close();
    }
}

/// Reads from the DLQ log: blocking, so callers on an async worker use
/// `spawn_blocking`.
impl EmbeddedDlq {
    pub fn list_now(
        &self,
        namespace: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, usize), BackendError> {
        let (seqs, total): (Vec<u64>, usize) = {
            let live = self.live.lock().unwrap();
            let Some(ns) = live.get(namespace) else {
                return Ok((Vec::new(), 0));
            };
            let page = match crate::backends::listing_start(after) {
                Some(from) => ns
                    .by_seq
                    .range(from..)
                    .take(limit)
                    .map(|(s, _)| *s)
                    .collect(),
                None => Vec::new(),
            };
            (page, ns.by_seq.len())
        };
        Ok((self.read(namespace, &seqs)?, total))
    }

    pub fn get_now(&self, namespace: &str, id: &str) -> Result<Vec<DeadLetter>, BackendError> {
        let seqs: Vec<u64> = {
            let live = self.live.lock().unwrap();
            live.get(namespace)
                .map(|ns| ns.candidates(id))
                .unwrap_or_default()
        };
        let mut out = Vec::with_capacity(seqs.len());
        // Letters of one id are few, and may lie far apart: one read each.
        for seq in seqs {
            out.extend(self.read(namespace, &[seq])?);
        }
        out.retain(|l| l.entry.id == id);
        Ok(out)
    }
}

impl DeadLetters for EmbeddedDlq {
    async fn append(&self, letter: DeadLetter) -> Result<u64, BackendError> {
        let namespace = letter.origin.shard.namespace.clone();
        let id = letter.entry.id.clone();
        // One entry dead-lettered twice (delivered again after a crash
        // between its bury and its ack) is one letter. Only an id that has
        // letters already is read back.
        let o = &letter.origin;
        if let Some(l) = self
            .get_now(&namespace, &id)?
            .into_iter()
            .find(|l| l.origin.shard == o.shard && l.origin.sequence == o.sequence)
        {
            return Ok(l.dlq_sequence);
        }
        let ack = self.log.append(&shard(&namespace), encode(letter)).await?;
        self.live
            .lock()
            .unwrap()
            .entry(namespace.to_string())
            .or_default()
            .insert(ack.sequence, &id);
        Ok(ack.sequence)
    }

    async fn list(
        &self,
        namespace: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, usize), BackendError> {
        self.list_now(namespace, after, limit)
    }

    async fn get(&self, namespace: &str, id: &str) -> Result<Vec<DeadLetter>, BackendError> {
        self.get_now(namespace, id)
    }

    async fn remove(
        &self,
        namespace: &str,
        dlq_sequence: u64,
        reason: &str,
    ) -> Result<bool, BackendError> {
        let live_now = {
            let live = self.live.lock().unwrap();
            live.get(namespace)
                .is_some_and(|ns| ns.by_seq.contains_key(&dlq_sequence))
        };
        if !live_now {
            return Ok(false);
        }
        // It names its letter by sequence; the index has the rest.
        let tombstone = Entry {
            headers: vec![
                (TOMBSTONE.into(), reason.into()),
                (REMOVES.into(), dlq_sequence.to_string()),
            ],
            ..Entry::default()
        };
        self.log.append(&shard(namespace), tombstone).await?;
        let mut live = self.live.lock().unwrap();
        Ok(live
            .get_mut(namespace)
            .is_some_and(|ns| ns.remove(dlq_sequence)))
    }
}

fn encode(letter: DeadLetter) -> Entry {
    let DeadLetter {
        entry,
        origin,
        attempts,
        first_failure_ms,
        last_failure_ms,
        last_error,
        ..
    } = letter;
    let mut headers = entry.headers;
    let h = |k: &str, v: String| (format!("{PREFIX}{k}"), v);
    headers.extend([
        h("origin_namespace", origin.shard.namespace.to_string()),
        h("origin_shard", origin.shard.shard.to_string()),
        h("origin_sequence", origin.sequence.to_string()),
        h("target", origin.target),
        h("attempts", attempts.to_string()),
        h("first_failure_ms", first_failure_ms.to_string()),
        h("last_failure_ms", last_failure_ms.to_string()),
        h("last_error", last_error),
        h("timestamp_ms", entry.timestamp_ms.to_string()),
    ]);
    Entry {
        id: entry.id,
        key: entry.key,
        headers,
        payload: entry.payload,
        // The DLQ log stamps its own append time; the original is a header.
        timestamp_ms: 0,
        due_ms: entry.due_ms,
    }
}

pub(crate) fn decode(dlq_sequence: u64, stored: Entry) -> Option<DeadLetter> {
    let mut meta = HashMap::new();
    let mut headers = Vec::new();
    for (k, v) in stored.headers {
        match k.strip_prefix(PREFIX) {
            Some(name) => {
                meta.insert(name.to_string(), v);
            }
            None => headers.push((k, v)),
        }
    }
    let last_error = meta.remove("last_error").unwrap_or_default();
    let num = |k: &str| meta.get(k).and_then(|v| v.parse::<u64>().ok());
    Some(DeadLetter {
        dlq_sequence,
        origin: Origin {
            shard: ShardRef::new(
                meta.get("origin_namespace")?.as_str(),
                num("origin_shard")? as u32,
            ),
            sequence: num("origin_sequence")?,
            target: meta.get("target").cloned().unwrap_or_default(),
        },
        attempts: num("attempts").unwrap_or(0) as u32,
        first_failure_ms: num("first_failure_ms").unwrap_or(0),
        last_failure_ms: num("last_failure_ms").unwrap_or(0),
        last_error,
        entry: Entry {
            id: stored.id,
            key: stored.key,
            headers,
            payload: stored.payload,
            timestamp_ms: num("timestamp_ms").unwrap_or(0),
            due_ms: stored.due_ms,
        },
    })
}
