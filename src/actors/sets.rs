//! SetJoin: one target's sets of mutations (`POST .../mutations`).
//!
//! Each mutation of a set waits in its shard's applier until it is the first
//! of its key there, then joins here. A set therefore holds every key it
//! touches, in their shards, until it is applied, so per-key order holds
//! across sets and single writes alike. Once every mutation has joined, the
//! set is applied whole, in its order ([`Sink::apply_set`]), with the
//! namespace's retry policy and the target's breaker, and each mutation's
//! applier is told. A target that can apply several sets in one call, all
//! or nothing ([`Sink::applies_sets_together`]), gets the sets ready at once
//! together: one transaction, one commit. Sets are written to the log as
//! units, in one order, so the earliest set waiting never waits on a later
//! one: two sets cannot wait on each other.
//!
//! A set that fails permanently, or runs out of `max_attempts`, goes to the
//! DLQ as one letter ([`letter_entry`]), which is redriven or purged whole.
//!
//! Crash safety: the set is recorded done in the park store, durably, before
//! any of its mutations is acked. After a crash, the mutations not yet acked
//! are delivered again. If all of them come, the set is applied again (the
//! version guard makes that harmless); if some were acked before the crash,
//! the record says the set is done, and the rest are acked too.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::{error, warn};

use super::breaker::Breaker;
use super::panic_message;
use crate::backends::shard::AnyDlq;
use crate::backends::{DeadLetter, DeadLetters, Gathered, Origin, SetFate, SetStaging};
use crate::config::RetryConfig;
use crate::entry::{Delivered, Entry, PAYLOAD_ENCODING_HEADER, SetPlace, ShardRef, now_ms};
use crate::sinks::{Outcome, Sink, SinkError};
use crate::state::park::ParkStore;
use crate::stats::Counter;

/// The header of a dead letter that holds a whole set; its value is the
/// set's id.
pub const SET_LETTER_HEADER: &str = "walden.set_letter";

/// Sets remembered as done in memory, so that a mutation joining late (its
/// applier restarted) is answered without a lookup.
const RECENT: usize = 4096;
/// Most sets one call to the target applies together.
const MAX_SETS_TOGETHER: usize = 64;
/// Calls of sets together in flight at once, per target.
const TOGETHER_IN_FLIGHT: usize = 4;
/// How long a set gathers before the park store is asked whether it is
/// done already.
const LOOK_UP_AFTER: Duration = Duration::from_millis(500);
/// How long a mutation waits before joining again after the set's record
/// could not be written.
const REJOIN_AFTER: Duration = Duration::from_secs(1);

/// What became of a set, told to each of its mutations' appliers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    Applied(Outcome),
    /// Stored in the DLQ as one letter.
    DeadLettered,
    /// Given up, none of it applied: its marker never came (Kafka).
    Abandoned,
}

impl From<SetFate> for Settled {
    fn from(fate: SetFate) -> Self {
        match fate {
            SetFate::Applied => Settled::Applied(Outcome::Applied),
            SetFate::DeadLettered => Settled::DeadLettered,
            SetFate::Abandoned => Settled::Abandoned,
        }
    }
}

/// The answer a joined mutation waits for; an error means "join again
/// later".
pub type Joined = oneshot::Receiver<Result<Settled, String>>;

/// Counters of a target's sets.
#[derive(Default)]
pub struct SetStats {
    pub applied: Counter,
    pub dead_lettered: Counter,
}

pub struct SetJoin {
    namespace: Arc<str>,
    target: String,
    sink: Arc<dyn Sink>,
    retry: RetryConfig,
    /// `None`: the DLQ is off, and a set is retried until it applies.
    dlq: Option<AnyDlq>,
    breaker: Arc<Breaker>,
    /// The target's lane of the park store, where done sets are recorded.
    done: ParkStore,
    /// Where the backend stages sets that its log cannot write as one unit
    /// (Kafka): sets gather and are recorded done there instead.
    staging: Option<Arc<dyn SetStaging>>,
    state: Mutex<State>,
    /// Where sets go to be recorded done ([`SetJoin::record_done`]);
    /// started on first use, on an arbiter.
    recorder: OnceLock<mpsc::UnboundedSender<(String, Recorded)>>,
    /// Where ready sets go to be applied together, for a target that can
    /// ([`Sink::applies_sets_together`]); started on first use.
    together: OnceLock<mpsc::UnboundedSender<String>>,
    pub stats: SetStats,
}

/// The answer to a set's record.
type Recorded = oneshot::Sender<Result<(), String>>;

#[derive(Default)]
struct State {
    gathering: HashMap<String, Gathering>,
    recent: HashSet<String>,
    recent_order: VecDeque<String>,
    /// The keys of the sets being applied. Where sets are staged (Kafka),
    /// two sets that share a key can be ready at once; the later one waits,
    /// so their transactions neither deadlock nor reorder.
    busy: HashSet<String>,
    /// Ready sets waiting for a busy key, in the order they became ready.
    parked: VecDeque<String>,
}

impl State {
    /// The distinct keys of a gathered set.
    fn keys(&self, set: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .gathering
            .get(set)
            .into_iter()
            .flat_map(|g| g.members.values())
            .map(|d| d.entry.key.clone().unwrap_or_default())
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Take the keys of `set` if none is busy, nor wanted by a set parked
    /// before it (`ahead`).
    fn claim(&mut self, set: &str, ahead: &HashSet<String>) -> bool {
        let keys = self.keys(set);
        if keys
            .iter()
            .any(|k| self.busy.contains(k) || ahead.contains(k))
        {
            return false;
        }
        self.busy.extend(keys);
        true
    }
}

struct Gathering {
    size: u32,
    since_ms: u64,
    /// By their place in the set.
    members: BTreeMap<u32, Delivered>,
    waiting: Vec<oneshot::Sender<Result<Settled, String>>>,
    applying: bool,
}

impl SetJoin {
    pub fn new(
        namespace: &str,
        target: &str,
        sink: Arc<dyn Sink>,
        retry: RetryConfig,
        dlq: Option<AnyDlq>,
        breaker: Arc<Breaker>,
        done: ParkStore,
    ) -> Self {
        Self {
            staging: None,
            namespace: namespace.into(),
            target: target.into(),
            sink,
            retry,
            dlq,
            breaker,
            done,
            state: Mutex::default(),
            recorder: OnceLock::new(),
            together: OnceLock::new(),
            stats: SetStats::default(),
        }
    }

    /// Gather and record sets where the backend stages them, if it does.
    pub fn staged(mut self, staging: Option<Arc<dyn SetStaging>>) -> Self {
        self.staging = staging;
        self
    }

    /// A mutation, first of its key in its shard, joins its set. Runs on an
    /// actix arbiter: the set is applied on a task of the one whose
    /// mutation completes it.
    pub fn join(self: &Arc<Self>, delivered: Delivered, place: SetPlace) -> Joined {
        let (tx, rx) = oneshot::channel();
        if let Some(staging) = &self.staging {
            // Its set is gathered and applied at its marker, maybe by
            // another process.
            let fate = staging.member(&self.target, delivered);
            actix::spawn(async move {
                let _ = tx.send(fate.await.map(Settled::from));
            });
            return rx;
        }
        let mut st = self.state.lock().unwrap();
        if st.recent.contains(&place.set) {
            let _ = tx.send(Ok(Settled::Applied(Outcome::Superseded)));
            return rx;
        }
        let fresh = !st.gathering.contains_key(&place.set);
        let g = st
            .gathering
            .entry(place.set.clone())
            .or_insert_with(|| Gathering {
                size: place.size,
                since_ms: now_ms(),
                members: BTreeMap::new(),
                waiting: Vec::new(),
                applying: false,
            });
        g.members.entry(place.index).or_insert(delivered);
        g.waiting.push(tx);
        let complete = !g.applying && g.members.len() as u32 >= g.size;
        g.applying |= complete;
        drop(st);
        if complete {
            self.ready(place.set);
        } else if fresh {
            // Its other mutations may have been acked before a restart.
            actix::spawn(self.clone().check_done(place.set));
        }
        rx
    }

    /// A set's marker, where sets are staged (Kafka): gather the set's
    /// mutations there, apply it whole, and record it settled.
    pub fn join_marker(self: &Arc<Self>, marker: Delivered) -> Joined {
        let (tx, rx) = oneshot::channel();
        let (Some(staging), Some(attempt)) = (self.staging.clone(), marker.entry.set_attempt())
        else {
            // A log that writes sets as units has nothing to do at a marker.
            let _ = tx.send(Ok(Settled::Applied(Outcome::Superseded)));
            return rx;
        };
        let this = self.clone();
        actix::spawn(async move {
            let members = match staging.gather(&this.target, &marker).await {
                Ok(Gathered::Members(members)) => members,
                Ok(Gathered::Settled(fate)) => {
                    let _ = tx.send(Ok(fate.into()));
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let mut st = this.state.lock().unwrap();
            if let Some(g) = st.gathering.get_mut(&attempt) {
                g.waiting.push(tx);
                return;
            }
            st.gathering.insert(
                attempt.clone(),
                Gathering {
                    size: members.len() as u32,
                    since_ms: now_ms(),
                    members: members
                        .into_iter()
                        .enumerate()
                        .map(|(i, m)| (i as u32, m))
                        .collect(),
                    waiting: vec![tx],
                    applying: true,
                },
            );
            drop(st);
            this.ready(attempt);
        });
        rx
    }

    /// A request to give a set up (Kafka), reached after everything before
    /// it in its shard: it is ignored if the set's marker came first.
    pub fn abandon(self: &Arc<Self>, request: Delivered) -> Joined {
        let (tx, rx) = oneshot::channel();
        let Some(staging) = &self.staging else {
            let _ = tx.send(Ok(Settled::Abandoned));
            return rx;
        };
        let asked = staging.abandon(&self.target, &request);
        actix::spawn(async move {
            let _ = tx.send(asked.await.map(|()| Settled::Abandoned));
        });
        rx
    }

    /// Whether `set` is gathered whole and being applied now.
    pub fn applying(&self, set: &str) -> bool {
        let st = self.state.lock().unwrap();
        st.gathering.get(set).is_some_and(|g| g.applying)
    }

    /// When the oldest set still gathering or applying began to.
    pub fn oldest_waiting_ms(&self) -> Option<u64> {
        let st = self.state.lock().unwrap();
        let here = st.gathering.values().map(|g| g.since_ms).min();
        let staged = self
            .staging
            .as_ref()
            .and_then(|s| s.oldest_waiting_ms(&self.target));
        here.into_iter().chain(staged).min()
    }

    /// The backend stages sets (Kafka): they gather and are recorded there.
    pub fn is_staged(&self) -> bool {
        self.staging.is_some()
    }

    /// Apply a dead letter that holds a whole set (a redrive), once; the
    /// applier that got the redrive retries it.
    pub fn apply_letter<'a>(
        &'a self,
        shard: &ShardRef,
        letter: &'a Entry,
    ) -> BoxFuture<'a, Result<Outcome, SinkError>> {
        let members = letter_members(&shard.namespace, letter);
        Box::pin(async move {
            let members = members.map_err(|why| SinkError::permanent(&self.target, why))?;
            let result = AssertUnwindSafe(self.sink.apply_set(&members))
                .catch_unwind()
                .await;
            result.unwrap_or_else(|panic| Err(self.panicked(&letter.id, &panic)))
        })
    }

    /// A set has all its mutations: apply it once no set being applied
    /// shares a key with it.
    fn ready(self: &Arc<Self>, set: String) {
        let mut st = self.state.lock().unwrap();
        let ahead: HashSet<String> = match st.parked.is_empty() {
            true => HashSet::new(),
            false => st.parked.iter().flat_map(|p| st.keys(p)).collect(),
        };
        if !st.claim(&set, &ahead) {
            st.parked.push_back(set);
            return;
        }
        drop(st);
        self.dispatch(set);
    }

    /// Apply a ready set, alone or, where the target can, together with
    /// the other sets ready now.
    fn dispatch(self: &Arc<Self>, set: String) {
        if !self.sink.applies_sets_together() {
            actix::spawn(self.clone().apply(set));
            return;
        }
        let tx = self.together.get_or_init(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<String>();
            let join = self.clone();
            let calls = Arc::new(Semaphore::new(TOGETHER_IN_FLIGHT));
            actix::spawn(async move {
                while let Some(first) = rx.recv().await {
                    // Sets gather while the calls in flight run.
                    let Ok(permit) = calls.clone().acquire_owned().await else {
                        return;
                    };
                    let mut sets = vec![first];
                    while sets.len() < MAX_SETS_TOGETHER
                        && let Ok(more) = rx.try_recv()
                    {
                        sets.push(more);
                    }
                    let join = join.clone();
                    actix::spawn(async move {
                        join.apply_together(sets).await;
                        drop(permit);
                    });
                }
            });
            tx
        });
        if let Err(mpsc::error::SendError(set)) = tx.send(set) {
            actix::spawn(self.clone().apply(set));
        }
    }

    /// Apply `sets` in one call. If that fails, each is applied on its own,
    /// one after another, with its own retries (and, if it fails for good,
    /// its own letter): not all at once, which would take every connection
    /// of the target's pool.
    async fn apply_together(self: Arc<Self>, sets: Vec<String>) {
        if sets.len() == 1 {
            let set = sets.into_iter().next().expect("one set");
            return self.apply(set).await;
        }
        let all: Vec<Delivered> = {
            let st = self.state.lock().unwrap();
            sets.iter()
                .filter_map(|id| st.gathering.get(id))
                .flat_map(|g| g.members.values().cloned())
                .collect()
        };
        let result = AssertUnwindSafe(self.sink.apply_set(&all))
            .catch_unwind()
            .await;
        let Ok(Ok(outcome)) = result else {
            for set in sets {
                self.clone().apply(set).await;
            }
            return;
        };
        self.breaker.delivered(all.len(), &[], None);
        let recorded = sets
            .iter()
            .map(|set| self.record_done(set.clone(), SetFate::Applied));
        let recorded = futures_util::future::join_all(recorded).await;
        for (set, record) in sets.iter().zip(recorded) {
            self.stats.applied.inc();
            let answer = record
                .map(|()| Settled::Applied(outcome))
                .map_err(|e| format!("could not record set {set} as done: {e}"));
            self.settle(set, answer);
        }
    }

    /// A set still gathering after [`LOOK_UP_AFTER`] may have had
    /// mutations acked before a restart: ask the park store. (Most sets
    /// complete sooner, and cost no lookup.)
    async fn check_done(self: Arc<Self>, set: String) {
        tokio::time::sleep(LOOK_UP_AFTER).await;
        let gathering = {
            let st = self.state.lock().unwrap();
            st.gathering.get(&set).is_some_and(|g| !g.applying)
        };
        if !gathering {
            return;
        }
        match self.done.is_set_done(&self.namespace, &set).await {
            Ok(true) => self.settle(&set, Ok(Settled::Applied(Outcome::Superseded))),
            Ok(false) => {}
            // It waits for its other mutations, as a set not yet done would.
            Err(error) => warn!(%error, set, "Could not look a set up in the park store."),
        }
    }

    /// Apply the gathered set until it applies or goes to the DLQ; record
    /// it done; then tell its mutations.
    async fn apply(self: Arc<Self>, set: String) {
        let members: Vec<Delivered> = {
            let st = self.state.lock().unwrap();
            match st.gathering.get(&set) {
                Some(g) => g.members.values().cloned().collect(),
                None => return,
            }
        };
        // `set` names the attempt where sets are staged; the letter and
        // the logs name the set.
        let id = members
            .first()
            .and_then(|m| m.entry.set_place())
            .map_or_else(|| set.clone(), |p| p.set);
        let keys: Vec<String> = members
            .iter()
            .map(|d| d.entry.key.clone().unwrap_or_default())
            .collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let (mut attempts, mut first_failure_ms) = (0u32, 0u64);
        let settled = loop {
            let result = AssertUnwindSafe(self.sink.apply_set(&members))
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| Err(self.panicked(&set, &panic)));
            let e = match result {
                Ok(outcome) => {
                    self.breaker.delivered(members.len(), &[], None);
                    break Settled::Applied(outcome);
                }
                Err(e) => e,
            };
            let transient = super::transient(&self.retry, &e);
            let open = self.breaker.delivered(0, &keys, transient.then_some(&e));
            if first_failure_ms == 0 {
                first_failure_ms = now_ms();
            }
            // While the target is down, waiting spends no attempts.
            if !(open && transient) {
                attempts += 1;
            }
            let give_up = !transient || attempts >= self.retry.max_attempts;
            if give_up && let Some(dlq) = &self.dlq {
                let letter = DeadLetter {
                    dlq_sequence: 0,
                    entry: letter_entry(&id, &members),
                    origin: Origin {
                        shard: members[0].shard.clone(),
                        sequence: members[0].sequence,
                        target: self.target.clone(),
                    },
                    attempts,
                    first_failure_ms,
                    last_failure_ms: now_ms(),
                    last_error: e.to_string(),
                };
                match dlq.append(letter).await {
                    Ok(_) => break Settled::DeadLettered,
                    Err(error) => {
                        error!(%error, set, "Could not store a set's dead letter; will retry.")
                    }
                }
            }
            let wait = super::backoff(&self.retry, attempts.max(1), &e);
            warn!(set, attempts, retry_in_ms = wait.as_millis() as u64, error = %e,
                "A set failed; will retry it whole.");
            tokio::time::sleep(wait).await;
        };
        let fate = match settled {
            Settled::DeadLettered => {
                self.stats.dead_lettered.inc();
                SetFate::DeadLettered
            }
            _ => {
                self.stats.applied.inc();
                SetFate::Applied
            }
        };
        let answer = match self.record_done(set.clone(), fate).await {
            Ok(()) => Ok(settled),
            Err(e) => Err(format!("could not record set {set} as done: {e}")),
        };
        self.settle(&set, answer);
    }

    /// Record `set` done, durably. Sets finishing together share one
    /// fsync: while one write is in flight, the next ones gather.
    async fn record_done(&self, set: String, fate: SetFate) -> Result<(), String> {
        if let Some(staging) = &self.staging {
            return staging.settle(&self.target, &set, fate).await;
        }
        let tx = self.recorder.get_or_init(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<(String, Recorded)>();
            let (done, namespace) = (self.done.clone(), self.namespace.clone());
            actix::spawn(async move {
                while let Some(first) = rx.recv().await {
                    let mut batch = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    let sets = batch.iter().map(|(s, _)| s.clone()).collect();
                    let result = done
                        .sets_done(&namespace, sets)
                        .await
                        .map_err(|e| e.to_string());
                    for (_, reply) in batch {
                        let _ = reply.send(result.clone());
                    }
                }
            });
            tx
        });
        let (reply, rx) = oneshot::channel();
        let stopped = || "the set recorder stopped".to_string();
        tx.send((set, reply)).map_err(|_| stopped())?;
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }

    fn panicked(&self, set: &str, panic: &Box<dyn std::any::Any + Send>) -> SinkError {
        SinkError::permanent(
            &self.target,
            format!("the target panicked on set {set}: {}", panic_message(panic)),
        )
    }

    /// Tell every mutation of `set` that has joined, and forget it.
    fn settle(self: &Arc<Self>, set: &str, answer: Result<Settled, String>) {
        let mut st = self.state.lock().unwrap();
        let keys = st.keys(set);
        let Some(g) = st.gathering.remove(set) else {
            return;
        };
        // Its keys go to the sets parked for them, in order.
        let mut go = Vec::new();
        if g.applying {
            for k in &keys {
                st.busy.remove(k);
            }
            let mut ahead = HashSet::new();
            for p in std::mem::take(&mut st.parked) {
                if st.claim(&p, &ahead) {
                    go.push(p);
                } else {
                    ahead.extend(st.keys(&p));
                    st.parked.push_back(p);
                }
            }
        }
        if answer.is_ok() {
            st.recent.insert(set.to_string());
            st.recent_order.push_back(set.to_string());
            if st.recent_order.len() > RECENT
                && let Some(old) = st.recent_order.pop_front()
            {
                st.recent.remove(&old);
            }
        }
        drop(st);
        for tx in g.waiting {
            let _ = tx.send(answer.clone());
        }
        for p in go {
            self.dispatch(p);
        }
    }

    /// How long a mutation whose set could not be settled waits before it
    /// joins again.
    pub fn rejoin_after(&self) -> Duration {
        REJOIN_AFTER
    }
}

/// A set in a dead letter: its mutations, each with where it was in the log.
#[derive(Debug, Serialize, Deserialize)]
struct LetterBody {
    set: String,
    mutations: Vec<LetterMutation>,
}

#[derive(Debug, Serialize, Deserialize)]
struct LetterMutation {
    shard: u32,
    sequence: u64,
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    headers: Vec<(String, String)>,
    timestamp_ms: u64,
    payload_base64: String,
}

/// The dead letter's entry for a whole set: its id is the set's, and its
/// payload (JSON) holds every mutation with its shard and sequence, so a
/// redrive applies the set whole, at the versions it was written with.
pub fn letter_entry(set: &str, members: &[Delivered]) -> Entry {
    let body = LetterBody {
        set: set.to_string(),
        mutations: members
            .iter()
            .map(|d| LetterMutation {
                shard: d.shard.shard,
                sequence: d.sequence,
                id: d.entry.id.clone(),
                key: d.entry.key.clone(),
                headers: d.entry.headers.clone(),
                timestamp_ms: d.entry.timestamp_ms,
                payload_base64: base64::engine::general_purpose::STANDARD.encode(&d.entry.payload),
            })
            .collect(),
    };
    Entry {
        id: set.to_string(),
        key: None,
        headers: vec![
            (SET_LETTER_HEADER.into(), set.into()),
            (PAYLOAD_ENCODING_HEADER.into(), "json".into()),
        ],
        payload: serde_json::to_vec(&body).expect("a set serializes").into(),
        timestamp_ms: members.first().map_or(0, |d| d.entry.timestamp_ms),
        due_ms: 0,
    }
}

/// The mutations of a set's dead letter, as they were delivered.
pub fn letter_members(namespace: &Arc<str>, letter: &Entry) -> Result<Vec<Delivered>, String> {
    let body: LetterBody = serde_json::from_slice(&letter.payload)
        .map_err(|e| format!("dead letter {} is not a set: {e}", letter.id))?;
    body.mutations
        .into_iter()
        .map(|m| {
            let payload = base64::engine::general_purpose::STANDARD
                .decode(m.payload_base64.as_bytes())
                .map_err(|e| format!("dead letter {}: mutation {}: {e}", letter.id, m.id))?;
            Ok(Delivered {
                shard: ShardRef::new(namespace.clone(), m.shard),
                sequence: m.sequence,
                entry: Arc::new(Entry {
                    id: m.id,
                    key: m.key,
                    headers: m.headers,
                    payload: payload.into(),
                    timestamp_ms: m.timestamp_ms,
                    due_ms: 0,
                }),
            })
        })
        .collect()
}
