//! Replays: a namespace's log read again from a point in time and applied
//! through the target's sink, leaving out the writes an operator excludes
//! (after a datastore was restored from a backup, without the write that
//! corrupted it).
//!
//! A replay runs beside live delivery, never touching its progress: each
//! shard is read by a cursor of the replay's own, in order, so a key's
//! entries are applied in the order they were written, with their original
//! ids and sequences (a version-guarded target stays correct). Its request,
//! cursors and counts live in the state store, so it resumes after a restart
//! and reaches `done` once; what it has not read yet is held against
//! retention like a consumer group's progress.
//!
//! Failures follow the namespace's retry policy, with one difference from
//! live delivery: a batch that fails as a whole (the target is down) waits
//! without spending attempts, since an outage is not a poison entry. An entry
//! that still fails goes to the DLQ, marked with the replay's id.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tracing::{info, warn};

use super::supervisor::NamespaceRuntime;
use crate::backends::{BackendError, DeadLetter, DeadLetters, Limit, Logged, Origin, ReplayLog};
use crate::config::ReplayIdempotency;
use crate::entry::{Delivered, IDEMPOTENCY_KEY_HEADER, REPLAY_HEADER, ShardRef, now_ms};
use crate::sinks::{Outcome, Sink, SinkError};
use crate::state::StateError;
use crate::state::replays::{
    Counts, ReplayRecord, ReplaySpec, ReplayState, ReplayStore, Select, ShardCursor,
};

/// What one read of a replay brings into memory at most.
const READ: Limit = Limit {
    entries: 512,
    bytes: 4 << 20,
};
/// How often a running replay's cursors and counts are made durable.
const SAVE_EVERY: Duration = Duration::from_millis(500);
/// The longest a replay waits between tries while its target is down.
const MAX_OUTAGE_WAIT: Duration = Duration::from_secs(10);

/// Why a replay cannot start, or an operation on one failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The request cannot be served as asked (the client is told 400).
    #[error("{0}")]
    Invalid(String),
    #[error("no replay {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// Where a replay's entries go: the sinks, by target name.
type Sinks = Vec<(String, Arc<dyn Sink>)>;

/// A replay in progress.
struct Running {
    record: Mutex<ReplayRecord>,
    /// Set to stop it (a cancel, or a shutdown's pause).
    cancel: tokio::sync::watch::Sender<bool>,
    last_save: Mutex<Instant>,
}

impl Running {
    fn stop(&self) {
        self.cancel.send_replace(true);
    }

    fn stopped(&self) -> bool {
        *self.cancel.borrow()
    }

    /// Sleep `wait`, or less if the replay is stopped meanwhile.
    async fn sleep(&self, wait: Duration) {
        let mut rx = self.cancel.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = rx.wait_for(|stopped| *stopped) => {}
        }
    }
}

/// The process's replays: starts them, answers for them, resumes them.
pub struct Replays {
    store: Arc<ReplayStore>,
    running: DashMap<(String, String), Arc<Running>>,
    /// The runtime replays run on (the service's own, not an HTTP worker's).
    runtime: tokio::runtime::Handle,
    /// The process is shutting down: replays stop where they are, still
    /// running in the store, and the next start resumes them.
    stopping: AtomicBool,
}

/// How a replay reads one namespace.
struct Plan {
    log: Arc<dyn ReplayLog>,
    sinks: Sinks,
    /// With `applied_after`: entries redriven from the DLQ since `from_ms`
    /// (shard, sequence), not applied then however early they were written.
    redriven: Arc<HashSet<(u32, u64)>>,
}

impl Replays {
    pub fn new(store: Arc<ReplayStore>, runtime: tokio::runtime::Handle) -> Arc<Self> {
        Arc::new(Self {
            store,
            running: DashMap::new(),
            runtime,
            stopping: AtomicBool::new(false),
        })
    }

    /// Stop every replay where it is (a shutdown), saving its cursors; the
    /// next start resumes them. Waits up to `wait`.
    pub async fn pause_all(&self, wait: Duration) {
        self.stopping.store(true, Ordering::Release);
        for r in self.running.iter() {
            r.value().stop();
        }
        let deadline = Instant::now() + wait;
        while !self.running.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn store(&self) -> &Arc<ReplayStore> {
        &self.store
    }

    /// Resume the replays a previous run of the process left running. One
    /// that can no longer run (its namespace or target is gone from the
    /// config, its backend keeps no log now) fails, and lets go of what it
    /// held in `local`, the process's own log.
    pub fn resume(
        self: &Arc<Self>,
        namespaces: &BTreeMap<String, Arc<NamespaceRuntime>>,
        local: &Arc<dyn ReplayLog>,
    ) {
        let records = match self.store.list(None) {
            Ok(r) => r,
            Err(error) => {
                warn!(%error, "Cannot read the replays to resume them.");
                return;
            }
        };
        for r in records.into_iter().filter(|r| !r.state.finished()) {
            let planned = match namespaces.get(&r.namespace) {
                None => Err((
                    local.clone(),
                    format!("namespace {:?} is no longer configured", r.namespace),
                )),
                Some(ns) => match plan(ns, &r.spec, &self.store) {
                    Ok(plan) => Ok((ns, plan)),
                    Err(e) => Err((
                        ns.backend.replay_log().unwrap_or(local.clone()),
                        e.to_string(),
                    )),
                },
            };
            match planned {
                Ok((ns, plan)) => {
                    info!(namespace = %r.namespace, replay = %r.replay, "Resuming a replay.");
                    self.spawn(ns.clone(), plan, r);
                }
                Err((log, why)) => {
                    warn!(namespace = %r.namespace, replay = %r.replay, %why, "A replay cannot resume; it fails.");
                    let failed = ReplayRecord {
                        state: ReplayState::Failed,
                        error: Some(format!("cannot resume: {why}")),
                        finished_ms: Some(now_ms()),
                        ..r
                    };
                    let shards: Vec<ShardRef> = failed
                        .shards
                        .iter()
                        .map(|c| ShardRef::new(failed.namespace.as_str(), c.shard))
                        .collect();
                    if let Err(error) = self
                        .store
                        .save(&failed)
                        .map_err(ReplayError::from)
                        .and_then(|()| Ok(log.release(&holder(&failed.replay), &shards)?))
                    {
                        warn!(replay = %failed.replay, %error, "Cannot record a replay's failure.");
                    }
                }
            }
        }
    }

    /// Start a replay; its record as it starts.
    pub async fn start(
        self: &Arc<Self>,
        ns: &Arc<NamespaceRuntime>,
        spec: ReplaySpec,
    ) -> Result<ReplayRecord, ReplayError> {
        let plan = plan(ns, &spec, &self.store)?;
        let cursors = {
            let (log, ns2, spec2, store) = (
                plan.log.clone(),
                ns.clone(),
                spec.clone(),
                self.store.clone(),
            );
            let redriven = plan.redriven.clone();
            tokio::task::spawn_blocking(move || cursors(&*log, &store, &ns2, &spec2, &redriven))
                .await
                .expect("planning a replay does not panic")?
        };
        let record = ReplayRecord {
            replay: format!("rp-{}", uuid::Uuid::now_v7().simple()),
            namespace: ns.name.clone(),
            spec,
            state: ReplayState::Running,
            counts: Counts::default(),
            created_ms: now_ms(),
            finished_ms: None,
            error: None,
            shards: cursors,
        };
        let holds: BTreeMap<ShardRef, u64> = record
            .shards
            .iter()
            .map(|c| (ShardRef::new(ns.name.as_str(), c.shard), c.next))
            .collect();
        let (log, store, r, group) = (
            plan.log.clone(),
            self.store.clone(),
            record.clone(),
            holder(&record.replay),
        );
        tokio::task::spawn_blocking(move || -> Result<(), ReplayError> {
            log.hold(&group, &holds)?;
            store.save(&r)?;
            Ok(())
        })
        .await
        .expect("saving a replay does not panic")?;
        info!(namespace = %ns.name, replay = %record.replay, from_ms = record.spec.from_ms,
            to_ms = record.spec.to_ms, "Replay started.");
        self.spawn(ns.clone(), plan, record.clone());
        Ok(record)
    }

    /// What a replay would do, applying nothing: its counts.
    pub async fn dry_run(
        &self,
        ns: &Arc<NamespaceRuntime>,
        spec: ReplaySpec,
    ) -> Result<Counts, ReplayError> {
        let plan = plan(ns, &spec, &self.store)?;
        let (store, ns) = (self.store.clone(), ns.clone());
        tokio::task::spawn_blocking(move || {
            let mut total = Counts::default();
            for mut cursor in cursors(&*plan.log, &store, &ns, &spec, &plan.redriven)? {
                let shard = ShardRef::new(ns.name.as_str(), cursor.shard);
                while !cursor.done() {
                    let batch = plan.log.read(&shard, cursor.next, READ)?;
                    let Some(last) = batch.last() else { break };
                    cursor.next = last.position + 1;
                    let (picked, counts) =
                        pick(&store, &ns, &spec, &plan.redriven, &cursor, batch)?;
                    total.add(&counts);
                    total.replayed += picked.len() as u64;
                }
            }
            Ok(total)
        })
        .await
        .expect("a dry run does not panic")
    }

    /// A replay as it stands (live figures while it runs).
    pub fn get(&self, namespace: &str, id: &str) -> Result<ReplayRecord, ReplayError> {
        if let Some(r) = self.running.get(&(namespace.to_string(), id.to_string())) {
            return Ok(r.record.lock().unwrap().clone());
        }
        self.store
            .get(namespace, id)?
            .ok_or_else(|| ReplayError::NotFound(id.to_string()))
    }

    /// The replays of `namespace`, oldest first.
    pub fn list(&self, namespace: &str) -> Result<Vec<ReplayRecord>, ReplayError> {
        Ok(self
            .store
            .list(Some(namespace))?
            .into_iter()
            .map(|r| self.get(namespace, &r.replay).unwrap_or(r))
            .collect())
    }

    /// The replays running now, with their live figures.
    pub fn running(&self, namespace: &str) -> Vec<ReplayRecord> {
        self.running
            .iter()
            .filter(|e| e.key().0 == namespace)
            .map(|e| e.value().record.lock().unwrap().clone())
            .collect()
    }

    /// Cancel a running replay; its record. A finished one is left as it is.
    pub async fn cancel(
        &self,
        ns: &NamespaceRuntime,
        id: &str,
    ) -> Result<ReplayRecord, ReplayError> {
        let namespace = ns.name.as_str();
        let key = (namespace.to_string(), id.to_string());
        let Some(running) = self.running.get(&key).map(|r| r.value().clone()) else {
            let mut r = self.get(namespace, id)?;
            if r.state == ReplayState::Running {
                // Stored as running, but not running here (it could not
                // resume): cancelled in the store, its hold let go.
                r.state = ReplayState::Cancelled;
                r.finished_ms = Some(now_ms());
                let (store, log, saved) = (self.store.clone(), ns.backend.replay_log(), r.clone());
                tokio::task::spawn_blocking(move || -> Result<(), ReplayError> {
                    store.save(&saved)?;
                    if let Ok(log) = log {
                        let shards: Vec<ShardRef> = saved
                            .shards
                            .iter()
                            .map(|c| ShardRef::new(saved.namespace.as_str(), c.shard))
                            .collect();
                        log.release(&holder(&saved.replay), &shards)?;
                    }
                    Ok(())
                })
                .await
                .expect("saving a replay does not panic")?;
            }
            return Ok(r);
        };
        running.stop();
        // The run stops at once, unless a call to the target is in flight.
        for _ in 0..250 {
            if !self.running.contains_key(&key) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.get(namespace, id)
    }

    fn spawn(self: &Arc<Self>, ns: Arc<NamespaceRuntime>, plan: Plan, record: ReplayRecord) {
        let key = (record.namespace.clone(), record.replay.clone());
        let running = Arc::new(Running {
            record: Mutex::new(record),
            cancel: tokio::sync::watch::channel(false).0,
            last_save: Mutex::new(Instant::now()),
        });
        self.running.insert(key.clone(), running.clone());
        let this = self.clone();
        self.runtime.spawn(async move {
            let result = this.run(&ns, &plan, &running).await;
            if this.stopping.load(Ordering::Acquire) {
                // Paused by a shutdown: saved as it stands, still running
                // (if its target made what it applied durable; else the
                // last save stands).
                if flush(&plan).await.is_ok() {
                    let r = running.record.lock().unwrap().clone();
                    let store = this.store.clone();
                    let _ = tokio::task::spawn_blocking(move || store.save(&r)).await;
                }
                this.running.remove(&key);
                return;
            }
            let (state, error) = match result {
                Ok(()) if running.stopped() => (ReplayState::Cancelled, None),
                Ok(()) => (ReplayState::Done, None),
                Err(e) => (ReplayState::Failed, Some(e.to_string())),
            };
            let record = {
                let mut r = running.record.lock().unwrap();
                r.state = state;
                r.error = error;
                r.finished_ms = Some(now_ms());
                r.clone()
            };
            let shards: Vec<ShardRef> = record
                .shards
                .iter()
                .map(|c| ShardRef::new(record.namespace.as_str(), c.shard))
                .collect();
            let (store, log, r) = (this.store.clone(), plan.log.clone(), record.clone());
            let saved = tokio::task::spawn_blocking(move || -> Result<(), ReplayError> {
                store.save(&r)?;
                log.release(&holder(&r.replay), &shards)?;
                Ok(())
            })
            .await
            .expect("saving a replay does not panic");
            if let Err(error) = saved {
                // Still running in the store: the next start resumes it from
                // its last cursor, and finishes it then.
                warn!(replay = %record.replay, %error, "Cannot record a replay's end.");
            }
            info!(namespace = %record.namespace, replay = %record.replay, state = ?record.state,
                matched = record.counts.matched, replayed = record.counts.replayed,
                excluded = record.counts.excluded, failed = record.counts.failed, "Replay ended.");
            this.running.remove(&key);
        });
    }

    /// Every shard at once, each in order.
    async fn run(
        &self,
        ns: &Arc<NamespaceRuntime>,
        plan: &Plan,
        running: &Arc<Running>,
    ) -> Result<(), ReplayError> {
        let (spec, shards) = {
            let r = running.record.lock().unwrap();
            (r.spec.clone(), r.shards.len())
        };
        let pacer = Pacer::new(ns.config.replay.max_per_s);
        let runs = (0..shards).map(|i| self.run_shard(ns, plan, running, &spec, i, &pacer));
        futures_util::future::try_join_all(runs).await?;
        // The end is recorded only once what was applied is durable there.
        let mut tries = 0u32;
        while let Err(error) = flush(plan).await {
            tries += 1;
            if running.stopped() {
                break;
            }
            warn!(namespace = %ns.name, %error, "A replay's target could not flush; retrying.");
            running
                .sleep(Duration::from_millis(100 << tries.min(6)))
                .await;
        }
        Ok(())
    }

    async fn run_shard(
        &self,
        ns: &Arc<NamespaceRuntime>,
        plan: &Plan,
        running: &Arc<Running>,
        spec: &ReplaySpec,
        index: usize,
        pacer: &Pacer,
    ) -> Result<(), ReplayError> {
        let mut cursor = running.record.lock().unwrap().shards[index].clone();
        let shard = ShardRef::new(ns.name.as_str(), cursor.shard);
        let id = running.record.lock().unwrap().replay.clone();
        let mut empty = 0;
        while !cursor.done() && !running.stopped() {
            let (log, s, from) = (plan.log.clone(), shard.clone(), cursor.next);
            let limit = read_limit(ns.config.replay.max_per_s);
            let (batch, end) = tokio::task::spawn_blocking(move || {
                let batch = log.read(&s, from, limit)?;
                let end = match batch.is_empty() {
                    true => Some(log.end(&s)?),
                    false => None,
                };
                Ok::<_, BackendError>((batch, end))
            })
            .await
            .expect("reading the log does not panic")?;
            let Some(last) = batch.last() else {
                // Nothing to read though the log reaches past the range's
                // end: the rest holds no entry (a topic's control records).
                empty += 1;
                if empty >= 3 && end.is_some_and(|end| end >= cursor.end) {
                    cursor.next = cursor.end;
                    self.advance(running, plan, index, &cursor, &Counts::default())
                        .await?;
                    break;
                }
                running.sleep(Duration::from_millis(100)).await;
                continue;
            };
            empty = 0;
            let (next, position_ms) = (last.position + 1, last.delivered.entry.timestamp_ms);
            let (store, ns2, spec2, c) =
                (self.store.clone(), ns.clone(), spec.clone(), cursor.clone());
            let redriven = plan.redriven.clone();
            let (picked, mut counts) = tokio::task::spawn_blocking(move || {
                pick(&store, &ns2, &spec2, &redriven, &c, batch)
            })
            .await
            .expect("picking entries does not panic")?;
            pacer.take(picked.len(), running).await;
            let picked: Vec<Delivered> = picked
                .into_iter()
                .map(|d| mark(d, &id, spec.idempotency_key))
                .collect();
            for (target, sink) in &plan.sinks {
                let mine: Vec<Delivered> = match &spec.target {
                    Some(_) => picked.clone(),
                    None => picked
                        .iter()
                        .filter(|d| d.entry.is_for(target))
                        .cloned()
                        .collect(),
                };
                let (ok, failed) = self.apply(ns, target, sink.as_ref(), mine, running).await?;
                counts.replayed += ok;
                counts.failed += failed;
            }
            if running.stopped() {
                // Stopped part-way through the batch (a retry cut short): the
                // cursor stays before it, so a resumed replay applies it
                // again rather than skip what was not applied.
                break;
            }
            cursor.next = next;
            cursor.position_ms = position_ms;
            self.advance(running, plan, index, &cursor, &counts).await?;
        }
        Ok(())
    }

    /// Record a shard's progress; make it durable every [`SAVE_EVERY`].
    async fn advance(
        &self,
        running: &Arc<Running>,
        plan: &Plan,
        index: usize,
        cursor: &ShardCursor,
        counts: &Counts,
    ) -> Result<(), ReplayError> {
        let snapshot = {
            let mut r = running.record.lock().unwrap();
            r.shards[index] = cursor.clone();
            r.counts.add(counts);
            let mut last = running.last_save.lock().unwrap();
            let due = last.elapsed() >= SAVE_EVERY || r.shards.iter().all(ShardCursor::done);
            due.then(|| {
                *last = Instant::now();
                r.clone()
            })
        };
        let Some(r) = snapshot else { return Ok(()) };
        if let Err(error) = flush(plan).await {
            // Not saved: the cursor must not pass entries a crash could
            // still take from the target. The next batch tries again.
            warn!(replay = %r.replay, %error, "A replay's target could not flush; its progress waits.");
            *running.last_save.lock().unwrap() = Instant::now() - SAVE_EVERY;
            return Ok(());
        }
        let (store, log) = (self.store.clone(), plan.log.clone());
        tokio::task::spawn_blocking(move || -> Result<(), ReplayError> {
            // The record first: a hold that lags it only keeps more.
            store.save(&r)?;
            let holds: BTreeMap<ShardRef, u64> = r
                .shards
                .iter()
                .map(|c| (ShardRef::new(r.namespace.as_str(), c.shard), c.next))
                .collect();
            log.hold(&holder(&r.replay), &holds)?;
            Ok(())
        })
        .await
        .expect("saving a replay does not panic")
    }

    /// Apply `entries` (one shard's, in order) to one target: how many were
    /// applied and how many failed for good.
    async fn apply(
        &self,
        ns: &Arc<NamespaceRuntime>,
        target: &str,
        sink: &dyn Sink,
        entries: Vec<Delivered>,
        running: &Arc<Running>,
    ) -> Result<(u64, u64), ReplayError> {
        let (mut ok, mut failed) = (0, 0);
        for run in runs(entries, sink) {
            if running.stopped() {
                break;
            }
            let (a, f) = self.apply_run(ns, target, sink, run, running).await?;
            ok += a;
            failed += f;
        }
        Ok((ok, failed))
    }

    /// Apply a run of entries with distinct keys, retrying what fails.
    async fn apply_run(
        &self,
        ns: &Arc<NamespaceRuntime>,
        target: &str,
        sink: &dyn Sink,
        mut run: Vec<Delivered>,
        running: &Arc<Running>,
    ) -> Result<(u64, u64), ReplayError> {
        let retry = &ns.config.retry;
        let (mut ok, mut failed) = (0, 0);
        let mut attempts: HashMap<u64, (u32, u64)> = HashMap::new();
        let mut outage = 0u32;
        while !run.is_empty() {
            let results = sink.apply(&run).await;
            let now = now_ms();
            let all_failed = results.iter().all(|r| r.is_err()) && run.len() == results.len();
            let mut again = Vec::new();
            let mut last_error: Option<SinkError> = None;
            for (i, d) in run.into_iter().enumerate() {
                match results.get(i).cloned().unwrap_or_else(|| {
                    Err(SinkError::transient(target, "the target gave no answer"))
                }) {
                    Ok(Outcome::Applied | Outcome::Superseded) => ok += 1,
                    Err(e) => {
                        let (n, first) = attempts.entry(d.sequence).or_insert((0, now));
                        // A batch that fails whole is an outage: it waits
                        // without spending the entries' attempts.
                        let transient = super::transient(retry, &e);
                        if !(transient && all_failed) {
                            *n += 1;
                        }
                        let spent = *n >= retry.max_attempts && ns.config.dlq.enabled;
                        if transient && !spent {
                            again.push(d);
                        } else {
                            failed += 1;
                            let first = *first;
                            self.bury(ns, target, d, *n, first, &e).await;
                        }
                        last_error = Some(e);
                    }
                }
            }
            run = again;
            if run.is_empty() || running.stopped() {
                break;
            }
            let e = last_error.expect("a retry follows an error");
            let wait = if all_failed {
                outage += 1;
                if outage == 1 || outage.is_multiple_of(10) {
                    warn!(namespace = %ns.name, target, error = %e,
                        "A replay's target is failing; the replay waits for it.");
                }
                super::backoff(retry, outage, &e).min(MAX_OUTAGE_WAIT)
            } else {
                let most = run
                    .iter()
                    .filter_map(|d| attempts.get(&d.sequence))
                    .map(|(n, _)| *n)
                    .max()
                    .unwrap_or(1);
                super::backoff(retry, most, &e)
            };
            running.sleep(wait).await;
        }
        Ok((ok, failed))
    }

    /// Dead-letter an entry the replay could not apply (marked with the
    /// replay's id); without a DLQ, say so and drop it.
    async fn bury(
        &self,
        ns: &Arc<NamespaceRuntime>,
        target: &str,
        d: Delivered,
        attempts: u32,
        first_failure_ms: u64,
        error: &SinkError,
    ) {
        if !ns.config.dlq.enabled {
            warn!(namespace = %ns.name, target, id = %d.entry.id, %error,
                "A replayed entry failed and the namespace has no DLQ; it is left out.");
            return;
        }
        let letter = DeadLetter {
            dlq_sequence: 0,
            origin: Origin {
                shard: d.shard.clone(),
                sequence: d.sequence,
                target: target.to_string(),
            },
            attempts,
            first_failure_ms,
            last_failure_ms: now_ms(),
            last_error: error.to_string(),
            entry: Arc::unwrap_or_clone(d.entry),
        };
        let id = letter.entry.id.clone();
        // A letter that cannot be written counts as failed all the same; the
        // entry is still in the log for another replay.
        for attempt in 1..=5u32 {
            match ns.dlq.append(letter.clone()).await {
                Ok(_) => return,
                Err(e) if attempt == 5 => {
                    warn!(namespace = %ns.name, %id, error = %e, "Cannot dead-letter a replayed entry.");
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100 << attempt)).await,
            }
        }
    }
}

/// Make durable what the replay applied, on the targets that defer it.
async fn flush(plan: &Plan) -> Result<(), SinkError> {
    for (_, sink) in &plan.sinks {
        if sink.flush_within().is_some() {
            sink.flush().await?;
        }
    }
    Ok(())
}

/// The retention holder of replay `id` (a consumer group of its own).
fn holder(id: &str) -> String {
    format!("walden.replay.{id}")
}

/// Check a replay's request against the namespace, and find what it reads
/// and where it sends the entries.
fn plan(
    ns: &NamespaceRuntime,
    spec: &ReplaySpec,
    store: &ReplayStore,
) -> Result<Plan, ReplayError> {
    let log = ns
        .backend
        .replay_log()
        .map_err(|why| ReplayError::Invalid(format!("namespace {:?}: {why}", ns.name)))?;
    if spec.from_ms > spec.to_ms {
        return Err(ReplayError::Invalid(format!(
            "`from_ms` ({}) is after `to_ms` ({})",
            spec.from_ms, spec.to_ms
        )));
    }
    let sinks: Sinks = match &spec.target {
        Some(name) => {
            let sink = ns
                .targets
                .iter()
                .map(|t| (&t.name, &t.sink))
                .chain(ns.replay_targets.iter().map(|(n, s)| (n, s)))
                .find(|(n, _)| *n == name)
                .map(|(_, s)| s.clone())
                .ok_or_else(|| {
                    let names: Vec<&str> = ns
                        .targets
                        .iter()
                        .map(|t| t.name.as_str())
                        .chain(ns.replay_targets.iter().map(|(n, _)| n.as_str()))
                        .collect();
                    ReplayError::Invalid(format!(
                        "`target`: namespace {:?} has no target {name:?} (its targets are {names:?})",
                        ns.name
                    ))
                })?;
            vec![(name.clone(), sink)]
        }
        None => ns
            .targets
            .iter()
            .map(|t| (t.name.clone(), t.sink.clone()))
            .collect(),
    };
    let redriven = match spec.select {
        Select::AppliedAfter => store.redriven_since(&ns.name, spec.from_ms)?,
        Select::Written => Vec::new(),
    };
    Ok(Plan {
        log,
        sinks,
        redriven: Arc::new(redriven.into_iter().collect()),
    })
}

/// Each shard's cursor: where the replay starts reading, where it stops,
/// and (with `applied_after`) where the unapplied entries begin. Blocking.
fn cursors(
    log: &dyn ReplayLog,
    store: &ReplayStore,
    ns: &NamespaceRuntime,
    spec: &ReplaySpec,
    redriven: &HashSet<(u32, u64)>,
) -> Result<Vec<ShardCursor>, ReplayError> {
    // With `applied_after`, the targets whose progress says what was applied:
    // the one named, if it is live, or every live target.
    let groups: Vec<&str> = match &spec.target {
        Some(name) => match ns.target(name) {
            Some(t) => vec![t.group.as_str()],
            None => ns.targets.iter().map(|t| t.group.as_str()).collect(),
        },
        None => ns.targets.iter().map(|t| t.group.as_str()).collect(),
    };
    let now = now_ms();
    let mut out = Vec::with_capacity(ns.config.shards as usize);
    for i in 0..ns.config.shards {
        let shard = ShardRef::new(ns.name.as_str(), i);
        let end = match spec.to_ms >= now {
            true => log.end(&shard)?,
            false => log.position_at(&shard, spec.to_ms.saturating_add(1))?,
        };
        let (earliest, earliest_ms) = log.earliest(&shard)?;
        let trimmed = log.trimmed(&shard)?;
        let not_held = |since: &str| {
            ReplayError::Invalid(format!(
                "`from_ms`: the log of namespace {:?} no longer holds {since} (shard {i} holds entries written from {} on; retention deleted the rest)",
                ns.name,
                earliest_ms.map_or("no time: it is empty".into(), |t| t.to_string()),
            ))
        };
        let (next, unapplied_from) = match spec.select {
            Select::Written => {
                if trimmed && earliest_ms.is_some_and(|t| spec.from_ms < t) {
                    return Err(not_held("every entry written since then"));
                }
                let start = log.position_at(&shard, spec.from_ms)?;
                (start, start)
            }
            Select::AppliedAfter => {
                let mut applied = u64::MAX;
                for g in &groups {
                    let at = store.position_at(g, &shard, spec.from_ms)?;
                    applied = applied.min(at.map_or(0, |(_, offset)| offset));
                }
                let applied = match groups.is_empty() {
                    true => 0,
                    false => applied,
                };
                if trimmed && applied < earliest {
                    return Err(not_held("every entry its targets had not applied then"));
                }
                // An entry still delayed at `from_ms` was not applied then,
                // however early it was written: look back as far as a delay
                // can reach.
                let delayed_since = spec.from_ms.saturating_sub(ns.config.delay.max_delay_ms);
                let look_back = log.position_at(&shard, delayed_since)?;
                // So was an entry redriven from the DLQ since then (its
                // sequence is its position in an embedded log).
                let dead = redriven
                    .iter()
                    .filter(|(s, _)| *s == i)
                    .map(|(_, seq)| *seq)
                    .min()
                    .unwrap_or(u64::MAX);
                (look_back.min(applied).min(dead).max(earliest), applied)
            }
        };
        out.push(ShardCursor {
            shard: i,
            start: next.min(end),
            next: next.min(end),
            end,
            unapplied_from,
            position_ms: 0,
        });
    }
    Ok(out)
}

/// Of a batch read at `cursor`, the entries the replay applies, in order, and
/// the counts of what it matched and left out. Blocking (the purged check).
fn pick(
    store: &ReplayStore,
    ns: &NamespaceRuntime,
    spec: &ReplaySpec,
    redriven: &HashSet<(u32, u64)>,
    cursor: &ShardCursor,
    batch: Vec<Logged>,
) -> Result<(Vec<Delivered>, Counts), ReplayError> {
    let mut counts = Counts::default();
    let mut out = Vec::with_capacity(batch.len());
    for Logged {
        position,
        delivered: d,
    } in batch
    {
        let e = &d.entry;
        if position >= cursor.end || e.timestamp_ms > spec.to_ms {
            continue;
        }
        let in_range = match spec.select {
            Select::Written => e.timestamp_ms >= spec.from_ms,
            Select::AppliedAfter => {
                position >= cursor.unapplied_from
                    || e.due_ms > spec.from_ms
                    || redriven.contains(&(d.shard.shard, d.sequence))
            }
        };
        // A set's marker carries nothing to apply; an entry meant for other
        // targets is not the named target's to replay.
        let for_target = match &spec.target {
            Some(t) if ns.target(t).is_some() => e.is_for(t),
            Some(_) => true,
            None => ns.targets.iter().any(|t| e.is_for(&t.name)),
        };
        if !in_range || !for_target || e.is_set_marker() {
            continue;
        }
        counts.matched += 1;
        let key = e.key.as_deref().unwrap_or(&e.id);
        let excluded = spec.exclude_ids.contains(&e.id)
            || spec.exclude_keys.contains(key)
            || spec
                .exclude_sequences
                .contains(&(d.shard.shard, d.sequence))
            || (!spec.include_purged && store.is_purged(&d.shard, d.sequence)?);
        match excluded {
            true => counts.excluded += 1,
            false => out.push(d),
        }
    }
    Ok((out, counts))
}

/// Mark a replayed entry with its replay, and give it the idempotency key
/// the replay asked for.
fn mark(mut d: Delivered, replay: &str, idempotency: ReplayIdempotency) -> Delivered {
    let entry = Arc::make_mut(&mut d.entry);
    entry
        .headers
        .push((REPLAY_HEADER.to_string(), replay.to_string()));
    if idempotency == ReplayIdempotency::Replay {
        let key = format!("{}.replay.{replay}", entry.id);
        entry
            .headers
            .push((IDEMPOTENCY_KEY_HEADER.to_string(), key));
    }
    d
}

/// Split one shard's entries into runs a sink can take as one batch: with
/// distinct keys (unless the sink applies a batch in order), within its
/// largest batch. Runs keep the entries' order.
fn runs(entries: Vec<Delivered>, sink: &dyn Sink) -> Vec<Vec<Delivered>> {
    let max = sink.max_batch().max(1);
    let in_order = sink.applies_in_order();
    let mut out: Vec<Vec<Delivered>> = Vec::new();
    let mut keys: std::collections::HashSet<String> = std::collections::HashSet::new();
    for d in entries {
        let key = d.entry.key.clone().unwrap_or_else(|| d.entry.id.clone());
        let full = out.last().is_none_or(|r| r.len() >= max);
        if full || (!in_order && keys.contains(&key)) {
            out.push(Vec::new());
            keys.clear();
        }
        keys.insert(key);
        out.last_mut().expect("a run was just pushed").push(d);
    }
    out
}

/// What one read of a replay takes: [`READ`], or a tenth of a second's
/// worth at a slow pace, so the pace stays smooth rather than a burst a
/// read.
fn read_limit(per_s: u64) -> Limit {
    Limit {
        entries: READ.entries.min((per_s / 10).max(1) as usize),
        ..READ
    }
}

/// Paces a replay's applies at `replay.max_per_s`, over all its shards.
struct Pacer {
    per_s: u64,
    next: Mutex<Instant>,
}

impl Pacer {
    fn new(per_s: u64) -> Self {
        Self {
            per_s: per_s.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// Wait for the turn of `n` more entries (less, if the replay stops).
    async fn take(&self, n: usize, running: &Running) {
        if n == 0 {
            return;
        }
        let start = {
            let mut next = self.next.lock().unwrap();
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(n as f64 / self.per_s as f64);
            start
        };
        running
            .sleep(start.saturating_duration_since(Instant::now()))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::Entry;

    fn d(seq: u64, key: &str) -> Delivered {
        Delivered {
            shard: ShardRef::new("ns", 0),
            sequence: seq,
            entry: Arc::new(Entry {
                id: format!("e{seq}"),
                key: Some(key.into()),
                ..Entry::default()
            }),
        }
    }

    /// A sink that takes a batch's entries concurrently.
    struct Concurrent;

    impl Sink for Concurrent {
        fn name(&self) -> &str {
            "concurrent"
        }

        fn apply<'a>(
            &'a self,
            batch: &'a [Delivered],
        ) -> futures_util::future::BoxFuture<'a, Vec<crate::sinks::ApplyResult>> {
            Box::pin(async move { batch.iter().map(|_| Ok(Outcome::Applied)).collect() })
        }

        fn healthcheck(&self) -> futures_util::future::BoxFuture<'_, Result<(), SinkError>> {
            Box::pin(async { Ok(()) })
        }
    }

    #[test]
    fn a_key_never_appears_twice_in_a_run_and_order_is_kept() {
        let entries = vec![d(1, "a"), d(2, "b"), d(3, "a"), d(4, "c"), d(5, "c")];
        let runs = runs(entries, &Concurrent);
        let seqs: Vec<Vec<u64>> = runs
            .iter()
            .map(|r| r.iter().map(|d| d.sequence).collect())
            .collect();
        assert_eq!(seqs, vec![vec![1, 2], vec![3, 4], vec![5]]);
    }
}
