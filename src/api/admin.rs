//! Stats, health and metrics.
//!
//! `readyz` means writes can be accepted: the backend is healthy. A target
//! that is down does not make Walden unready (absorbing that outage is its
//! job); it shows in stats and metrics instead.

use std::fmt::Write as _;
use std::time::Duration;

use actix_web::{HttpResponse, web};
use serde::Serialize;

use super::{ApiError, AppState};
use crate::actors::breaker::{BreakerView, State as BreakerState};
use crate::actors::messages::{ConsumerState, GetState};
use crate::actors::supervisor::{NamespaceRuntime, TargetRuntime};
use crate::entry::now_ms;
use crate::stats::Counter;

const STATE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Serialize)]
pub struct ShardView {
    pub shard: u32,
    /// The sequence the next entry will get.
    pub next_sequence: u64,
    /// Every entry before this has been applied.
    pub applied_through: u64,
    pub committed: u64,
    pub consumer_lag: u64,
    pub written: u64,
    pub applied: u64,
    pub in_retry: i64,
    /// Entries sent to the applier and not yet taken in.
    pub mailbox: i64,
    pub delayed: i64,
    pub restarts: u64,
    /// Entries written to the park store since start.
    pub parked: u64,
    /// Overdue delayed entries fired under the catch-up rate since start.
    pub caught_up: u64,
    /// Entries skipped because the hard retention cap (`drop_oldest`)
    /// deleted them before they were applied, since start.
    pub lost_to_retention: u64,
    /// The arbiter (thread) its actors run on.
    pub arbiter: usize,
    /// Times it moved to another arbiter since start.
    pub moves: u64,
}

#[derive(Serialize)]
pub struct TargetView {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub healthy: bool,
    pub last_error: Option<String>,
    /// The circuit breaker: `closed`, `open` (delivery paused, entries
    /// wait) or `half_open` (a probe is in flight).
    pub breaker: BreakerView,
}

/// One target's delivery: its own progress, apart from the others'.
#[derive(Serialize)]
pub struct TargetStats {
    #[serde(flatten)]
    pub target: TargetView,
    /// The consumer group that keeps its progress.
    pub group: String,
    pub applied: u64,
    /// Entries written and not yet applied to this target (all shards).
    pub pending: u64,
    pub in_retry: i64,
    pub delayed: i64,
    pub next_due_ms: Option<i64>,
    pub consumer_lag: u64,
    pub oldest_pending_age_ms: Option<u64>,
    pub failed_deliveries: u64,
    pub superseded: u64,
    /// Entries this target moved to the DLQ since start.
    pub dead_lettered_since_start: u64,
    /// Its sets of mutations.
    pub sets: SetsView,
    /// Requests in flight to it, under their (adaptive) limit.
    pub concurrency: crate::actors::concurrency::ConcurrencyStats,
    pub per_shard: Vec<ShardView>,
}

/// A target's sets of mutations.
#[derive(Serialize)]
pub struct SetsView {
    /// Applied whole since start.
    pub applied: u64,
    /// Moved to the DLQ (one letter each) since start.
    pub dead_lettered: u64,
    /// How long the oldest set that is gathering its mutations, or being
    /// applied, has waited.
    pub oldest_waiting_age_ms: Option<u64>,
}

#[derive(Serialize)]
pub struct NamespaceView {
    pub namespace: String,
    pub backend: &'static str,
    pub shards: u32,
    /// The first target (of one, the only one); `targets` has them all.
    pub target: TargetView,
    /// Every target, each with its own figures.
    pub targets: Vec<TargetStats>,
    /// Entries answered `durable: "true"` since this process started.
    pub written: u64,
    /// Sets of mutations answered `durable: "true"` since start (their
    /// mutations count in `written`).
    pub sets_written: u64,
    /// The write path's adaptive concurrency limit: the limit and the write
    /// requests in flight, the smoothed append latency, requests shed by
    /// priority since start.
    pub shedding: crate::shedding::LimiterStats,
    // With several targets, the figures below add up the targets' (the
    // counts) or take the slowest's (`pending`, `consumer_lag`,
    // `oldest_pending_age_ms`).
    /// Entries applied since this process started.
    pub applied: u64,
    /// Entries written and not yet applied (all shards).
    pub pending: u64,
    pub in_retry: i64,
    /// Entries in the DLQ now.
    pub dead_lettered: u64,
    /// Entries the target already held a newer version of (since start).
    pub superseded: u64,
    pub delayed: i64,
    /// Earliest due time of a delayed entry, ms since epoch.
    pub next_due_ms: Option<i64>,
    /// Entries not yet applied, counted from the committed offsets.
    pub consumer_lag: u64,
    pub oldest_pending_age_ms: Option<u64>,
    pub failed_deliveries: u64,
    /// Entries lost to the hard retention cap since start (all shards).
    pub lost_to_retention: u64,
    /// The first target's shards.
    pub per_shard: Vec<ShardView>,
    /// The earliest write time a replay can reach back to: the oldest entry
    /// the log holds (`None`: the log is empty, or the backend keeps none).
    pub replayable_from_ms: Option<u64>,
    /// The replays running now, with their progress.
    pub replays: Vec<ReplayProgress>,
    /// The arbiters' busy time, and this namespace's shards that moved
    /// between them (per target, `per_shard` shows where each is now).
    pub rebalance: RebalanceView,
}

#[derive(Serialize)]
pub struct RebalanceView {
    /// Each arbiter's busy share over the last sample (0 to 1).
    pub arbiter_busy: Vec<f64>,
    /// Moves of any namespace's shards since start.
    pub moves_total: u64,
    /// This namespace's latest moves, oldest first.
    pub moves: Vec<crate::actors::rebalance::MoveRecord>,
}

/// A running replay, as the stats show it.
#[derive(Serialize)]
pub struct ReplayProgress {
    pub replay: String,
    pub matched: u64,
    pub replayed: u64,
    pub excluded: u64,
    pub failed: u64,
    pub position_ms: u64,
    pub to_ms: u64,
}

/// The oldest write time the namespace's log holds, over its shards.
async fn replayable_from(ns: &NamespaceRuntime) -> Option<u64> {
    let log = ns.backend.replay_log().ok()?;
    let (name, shards) = (ns.name.clone(), ns.config.shards);
    tokio::task::spawn_blocking(move || {
        (0..shards)
            .filter_map(|i| {
                log.earliest(&crate::entry::ShardRef::new(name.as_str(), i))
                    .ok()
            })
            .filter_map(|(_, at)| at)
            .min()
    })
    .await
    .ok()
    .flatten()
}

async fn target_view(ns: &NamespaceRuntime, t: &TargetRuntime) -> TargetStats {
    let mut per_shard = Vec::new();
    let mut oldest: Option<u64> = None;
    let mut failed = 0;
    let mut next_due: Option<i64> = None;
    for h in &t.shards {
        let state = tokio::time::timeout(STATE_TIMEOUT, async {
            h.actors().await.consumer.send(GetState).await
        })
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(ConsumerState::default());
        // Before the consumer has read anything, the committed offset is the
        // best lower bound.
        let applied_through = state.low_watermark.max(state.committed);
        // On Kafka the partition's end comes from librdkafka's statistics
        // (every few seconds); on SQS, which has no offsets, pending counts
        // what was read and is not yet applied.
        let read = applied_through + state.outstanding as u64;
        let next = ns
            .backend
            .next_sequence(&h.shard)
            .unwrap_or_else(|| state.end_offset.map_or(read, |end| end.max(read)));
        if let Some(ts) = state.oldest_outstanding_ms {
            oldest = Some(oldest.map_or(ts, |o| o.min(ts)));
        }
        failed += h.stats.apply_errors.get();
        let due = h.stats.next_due_ms.get();
        if due > 0 {
            next_due = Some(next_due.map_or(due, |d| d.min(due)));
        }
        per_shard.push(ShardView {
            shard: h.shard.shard,
            next_sequence: next,
            applied_through,
            committed: state.committed,
            consumer_lag: next.saturating_sub(state.committed),
            written: ns.written[h.shard.shard as usize].get(),
            applied: h.stats.applied.get(),
            in_retry: h.stats.in_retry.get(),
            mailbox: h.stats.mailbox.get(),
            delayed: h.stats.delayed.get(),
            restarts: h.stats.restarts.get(),
            parked: h.stats.parked.get(),
            caught_up: h.stats.caught_up.get(),
            lost_to_retention: ns.backend.lost_to_retention(&h.shard),
            arbiter: h.arbiter(),
            moves: h.moves(),
        });
    }
    let (healthy, last_error) = t.sink_health.healthy();
    let sum = |f: fn(&ShardView) -> u64| per_shard.iter().map(f).sum::<u64>();
    let stat = |f: fn(&crate::actors::ShardStats) -> u64| -> u64 {
        t.shards.iter().map(|h| f(&h.stats)).sum()
    };
    TargetStats {
        target: TargetView {
            name: t.name.clone(),
            kind: t.kind,
            healthy,
            last_error,
            breaker: t.breaker.view(),
        },
        group: t.group.clone(),
        applied: sum(|s| s.applied),
        pending: sum(|s| s.next_sequence.saturating_sub(s.applied_through)),
        in_retry: per_shard.iter().map(|s| s.in_retry).sum(),
        delayed: per_shard.iter().map(|s| s.delayed).sum(),
        next_due_ms: next_due,
        consumer_lag: sum(|s| s.consumer_lag),
        oldest_pending_age_ms: oldest.map(|ts| now_ms().saturating_sub(ts)),
        failed_deliveries: failed,
        superseded: stat(|s| s.superseded.get()),
        dead_lettered_since_start: stat(|s| s.dead_lettered.get()),
        sets: SetsView {
            applied: t.sets.stats.applied.get(),
            dead_lettered: t.sets.stats.dead_lettered.get(),
            oldest_waiting_age_ms: t
                .sets
                .oldest_waiting_ms()
                .map(|ts| now_ms().saturating_sub(ts)),
        },
        concurrency: t.concurrency.stats(),
        per_shard,
    }
}

async fn view(state: &AppState, ns: &NamespaceRuntime) -> NamespaceView {
    // A DLQ that cannot be counted right now shows 0, not a failed view.
    let dead_lettered = tokio::time::timeout(STATE_TIMEOUT, ns.dlq.count(&ns.name))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(0);
    let mut targets = Vec::with_capacity(ns.targets.len());
    for t in &ns.targets {
        targets.push(target_view(ns, t).await);
    }
    let first = &targets[0];
    let sum = |f: fn(&TargetStats) -> u64| targets.iter().map(f).sum::<u64>();
    let max = |f: fn(&TargetStats) -> u64| targets.iter().map(f).max().unwrap_or(0);
    NamespaceView {
        namespace: ns.name.clone(),
        backend: ns.backend.kind(),
        shards: ns.config.shards,
        target: TargetView {
            name: first.target.name.clone(),
            kind: first.target.kind,
            healthy: first.target.healthy,
            last_error: first.target.last_error.clone(),
            breaker: first.target.breaker.clone(),
        },
        written: ns.written.iter().map(Counter::get).sum(),
        sets_written: ns.ingest.sets_written.get(),
        shedding: ns.ingest.limiter.stats(),
        applied: sum(|t| t.applied),
        pending: max(|t| t.pending),
        in_retry: targets.iter().map(|t| t.in_retry).sum(),
        dead_lettered,
        superseded: sum(|t| t.superseded),
        delayed: targets.iter().map(|t| t.delayed).sum(),
        next_due_ms: targets.iter().filter_map(|t| t.next_due_ms).min(),
        consumer_lag: max(|t| t.consumer_lag),
        oldest_pending_age_ms: targets.iter().filter_map(|t| t.oldest_pending_age_ms).max(),
        failed_deliveries: sum(|t| t.failed_deliveries),
        lost_to_retention: first.per_shard.iter().map(|s| s.lost_to_retention).sum(),
        per_shard: first.per_shard.clone(),
        targets,
        replayable_from_ms: replayable_from(ns).await,
        rebalance: RebalanceView {
            arbiter_busy: state.rebalance.busy(),
            moves_total: state.rebalance.total_moves(),
            moves: state
                .rebalance
                .moves()
                .into_iter()
                .filter(|m| m.namespace == ns.name)
                .collect(),
        },
        replays: state
            .replays
            .running(&ns.name)
            .iter()
            .map(|r| ReplayProgress {
                replay: r.replay.clone(),
                matched: r.counts.matched,
                replayed: r.counts.replayed,
                excluded: r.counts.excluded,
                failed: r.counts.failed,
                position_ms: r.position_ms(),
                to_ms: r.spec.to_ms,
            })
            .collect(),
    }
}

/// `GET /v1/namespaces`
pub async fn list_namespaces(
    state: web::Data<AppState>,
    caller: Option<web::ReqData<super::Caller>>,
) -> HttpResponse {
    let mut out = Vec::new();
    // A token answers for its own namespaces.
    let shown = |ns: &str| caller.as_ref().is_none_or(|c| c.0.covers(Some(ns)));
    for ns in state.namespaces.values().filter(|ns| shown(&ns.name)) {
        out.push(view(&state, ns).await);
    }
    HttpResponse::Ok().json(serde_json::json!({ "namespaces": out }))
}

/// `GET /v1/namespaces/{ns}`
pub async fn namespace_stats(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let ns = state.namespace(&path)?;
    Ok(HttpResponse::Ok().json(view(&state, ns).await))
}

/// One target's consumer sizing, for `GET .../scale` and `/metrics`.
#[derive(Serialize)]
pub struct TargetScale {
    pub target: String,
    /// Entries written and not yet applied.
    pub lag_entries: u64,
    /// The age of the oldest entry read and not yet applied (0: none).
    pub lag_s: f64,
    /// Entries this process applied per second over the last 10 s.
    pub apply_per_s: Option<f64>,
    /// Consumer processes that would clear the backlog within
    /// `scale.target_lag_s` at this process's rate, from 1 to the partition
    /// count; `null` when no answer would help (see `reason`).
    pub consumers: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

/// `GET /v1/namespaces/{ns}/scale`.
#[derive(Serialize)]
pub struct ScaleView {
    pub namespace: String,
    pub target_lag_s: u64,
    /// The most consumers that can share the work: one per partition.
    pub partitions: u32,
    /// The most any target asks for.
    pub consumers: Option<u32>,
    pub targets: Vec<TargetScale>,
}

fn scale_of(ns: &NamespaceRuntime, t: &TargetRuntime, stats: &TargetStats) -> TargetScale {
    let partitions = ns.config.shards;
    let target_lag = ns.config.scale.target_lag_s as f64;
    let lag = stats.pending;
    let rate = t.apply_rate.per_s();
    let (consumers, reason) = if lag == 0 {
        (Some(1), None)
    } else if t.breaker.is_open() {
        (
            None,
            Some("the target's breaker is open: more consumers would not help"),
        )
    } else {
        match rate {
            None => (None, Some("no apply rate measured yet")),
            // Backlogged and applying nothing: as many as can share it.
            Some(r) if r <= 0.0 => (Some(partitions), None),
            Some(r) => {
                let n = (lag as f64 / (r * target_lag)).ceil() as u32;
                (Some(n.clamp(1, partitions)), None)
            }
        }
    };
    TargetScale {
        target: t.name.clone(),
        lag_entries: lag,
        lag_s: stats.oldest_pending_age_ms.unwrap_or(0) as f64 / 1000.0,
        apply_per_s: rate,
        consumers,
        reason,
    }
}

async fn scale_view(ns: &NamespaceRuntime) -> ScaleView {
    let mut targets = Vec::with_capacity(ns.targets.len());
    for t in &ns.targets {
        let stats = target_view(ns, t).await;
        targets.push(scale_of(ns, t, &stats));
    }
    ScaleView {
        namespace: ns.name.clone(),
        target_lag_s: ns.config.scale.target_lag_s,
        partitions: ns.config.shards,
        consumers: targets.iter().filter_map(|t| t.consumers).max(),
        targets,
    }
}

/// `GET /v1/namespaces/{ns}/scale`: how many consumer processes would clear
/// the backlog within `scale.target_lag_s`.
pub async fn scale(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let ns = state.namespace(&path)?;
    Ok(HttpResponse::Ok().json(scale_view(ns).await))
}

/// `GET /healthz`: the process is up.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// `GET /readyz`: writes can be accepted.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    if let Err(reason) = state.log.ready() {
        return HttpResponse::ServiceUnavailable().json(serde_json::json!({
            "ready": false,
            "reason": reason,
        }));
    }
    HttpResponse::Ok().json(serde_json::json!({ "ready": true }))
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let one = |v: u64| vec![(String::new(), v as f64)];
    for m in state.log.metrics() {
        metric(m.name, m.kind, m.help, one(m.value));
    }
    let (memtables, flushes, journals) = state.state.lag();
    metric(
        "walden_state_memtable_bytes",
        "gauge",
        "Bytes the state store holds in memtables, not yet flushed to disk.",
        one(memtables),
    );
    metric(
        "walden_state_flushes_queued",
        "gauge",
        "Memtable flushes the state store has queued.",
        one(flushes as u64),
    );
    metric(
        "walden_state_journals",
        "gauge",
        "Journal files the state store keeps until their memtables are flushed.",
        one(journals as u64),
    );

    let shard_metric = |f: &dyn Fn(&crate::actors::ShardStats) -> f64| {
        let mut v = Vec::new();
        for ns in state.namespaces.values() {
            for t in &ns.targets {
                for h in &t.shards {
                    v.push((
                        format!(
                            "{{namespace=\"{}\",target=\"{}\",shard=\"{}\"}}",
                            ns.name, t.name, h.shard.shard
                        ),
                        f(&h.stats),
                    ));
                }
            }
        }
        v
    };
    let archive_failed = state
        .namespaces
        .values()
        .filter_map(|ns| {
            let n = ns.backend.archive_failed()?;
            Some((format!("{{namespace=\"{}\"}}", ns.name), n as f64))
        })
        .collect();
    metric(
        "walden_archive_failed_total",
        "counter",
        "Entries an SQS namespace's archive could not keep (a replay misses them).",
        archive_failed,
    );
    let mut replayed = Vec::new();
    let mut replay_position = Vec::new();
    for ns in state.namespaces.values() {
        for r in state.replays.running(&ns.name) {
            let labels = format!("{{namespace=\"{}\",replay=\"{}\"}}", ns.name, r.replay);
            replayed.push((labels.clone(), r.counts.replayed as f64));
            replay_position.push((labels, r.position_ms() as f64));
        }
    }
    metric(
        "walden_replay_replayed",
        "gauge",
        "Entries a running replay has applied so far.",
        replayed,
    );
    metric(
        "walden_replay_position_ms",
        "gauge",
        "The write time a running replay has reached (ms since epoch).",
        replay_position,
    );
    let written = state
        .namespaces
        .values()
        .flat_map(|ns| {
            ns.written.iter().enumerate().map(|(shard, n)| {
                (
                    format!("{{namespace=\"{}\",shard=\"{shard}\"}}", ns.name),
                    n.get() as f64,
                )
            })
        })
        .collect();
    metric(
        "walden_written_total",
        "counter",
        "Entries answered durable.",
        written,
    );
    metric(
        "walden_applied_total",
        "counter",
        "Entries applied to their target.",
        shard_metric(&|s| s.applied.get() as f64),
    );
    metric(
        "walden_apply_errors_total",
        "counter",
        "Failed delivery attempts.",
        shard_metric(&|s| s.apply_errors.get() as f64),
    );
    metric(
        "walden_in_retry",
        "gauge",
        "Entries waiting to be retried.",
        shard_metric(&|s| s.in_retry.get() as f64),
    );
    metric(
        "walden_shard_mailbox",
        "gauge",
        "Entries sent to a shard's applier and not yet taken in.",
        shard_metric(&|s| s.mailbox.get() as f64),
    );
    metric(
        "walden_delayed",
        "gauge",
        "Entries waiting for their due time.",
        shard_metric(&|s| s.delayed.get() as f64),
    );
    metric(
        "walden_dead_lettered_total",
        "counter",
        "Entries moved to the DLQ.",
        shard_metric(&|s| s.dead_lettered.get() as f64),
    );
    let per_target = |f: &dyn Fn(&crate::actors::sets::SetJoin) -> f64| {
        let mut v = Vec::new();
        for ns in state.namespaces.values() {
            for t in &ns.targets {
                let labels = format!("{{namespace=\"{}\",target=\"{}\"}}", ns.name, t.name);
                v.push((labels, f(&t.sets)));
            }
        }
        v
    };
    let per_ns = |f: &dyn Fn(&crate::shedding::LimiterStats) -> f64| {
        state
            .namespaces
            .values()
            .map(|ns| {
                let labels = format!("{{namespace=\"{}\"}}", ns.name);
                (labels, f(&ns.ingest.limiter.stats()))
            })
            .collect::<Vec<_>>()
    };
    metric(
        "walden_shedding_limit",
        "gauge",
        "The write path's adaptive concurrency limit, in requests in flight.",
        per_ns(&|s| s.limit as f64),
    );
    metric(
        "walden_shedding_in_flight",
        "gauge",
        "Write requests in flight, against the limit.",
        per_ns(&|s| s.in_flight as f64),
    );
    metric(
        "walden_shedding_latency_seconds",
        "gauge",
        "The smoothed latency of the durable append the limit adapts to.",
        per_ns(&|s| s.latency_us as f64 / 1e6),
    );
    let mut shed = Vec::new();
    for ns in state.namespaces.values() {
        let s = ns.ingest.limiter.stats();
        for (priority, n) in [
            ("critical", s.shed_critical),
            ("normal", s.shed_normal),
            ("batch", s.shed_batch),
        ] {
            let labels = format!("{{namespace=\"{}\",priority=\"{priority}\"}}", ns.name);
            shed.push((labels, n as f64));
        }
    }
    metric(
        "walden_shedding_utilization",
        "gauge",
        "Write requests in flight as a share of the limit: the producers' scaling signal.",
        per_ns(&|s| s.in_flight as f64 / s.limit.max(1) as f64),
    );
    let (mut desired, mut age, mut rate) = (Vec::new(), Vec::new(), Vec::new());
    for ns in state.namespaces.values() {
        for t in scale_view(ns).await.targets {
            let labels = format!("{{namespace=\"{}\",target=\"{}\"}}", ns.name, t.target);
            if let Some(n) = t.consumers {
                desired.push((labels.clone(), n as f64));
            }
            age.push((labels.clone(), t.lag_s));
            rate.push((labels, t.apply_per_s.unwrap_or(0.0)));
        }
    }
    metric(
        "walden_scale_consumers",
        "gauge",
        "Consumer processes that would clear the backlog within scale.target_lag_s (GET .../scale).",
        desired,
    );
    metric(
        "walden_oldest_pending_age_seconds",
        "gauge",
        "The age of the oldest entry read and not yet applied: the lag in seconds.",
        age,
    );
    metric(
        "walden_apply_per_second",
        "gauge",
        "Entries this process applied per second over the last 10 s.",
        rate,
    );
    metric(
        "walden_shed_total",
        "counter",
        "Write requests refused 429 by the concurrency limit, by priority.",
        shed,
    );
    metric(
        "walden_sets_written_total",
        "counter",
        "Sets of mutations answered durable.",
        state
            .namespaces
            .values()
            .map(|ns| {
                (
                    format!("{{namespace=\"{}\"}}", ns.name),
                    ns.ingest.sets_written.get() as f64,
                )
            })
            .collect(),
    );
    metric(
        "walden_sets_applied_total",
        "counter",
        "Sets of mutations applied whole to their target.",
        per_target(&|s| s.stats.applied.get() as f64),
    );
    metric(
        "walden_sets_dead_lettered_total",
        "counter",
        "Sets of mutations moved to the DLQ, one letter each.",
        per_target(&|s| s.stats.dead_lettered.get() as f64),
    );
    metric(
        "walden_set_oldest_waiting_age_ms",
        "gauge",
        "How long the oldest set still gathering or applying has waited (0: none).",
        per_target(&|s| {
            s.oldest_waiting_ms()
                .map_or(0.0, |ts| now_ms().saturating_sub(ts) as f64)
        }),
    );
    metric(
        "walden_actor_restarts_total",
        "counter",
        "Actor restarts.",
        shard_metric(&|s| s.restarts.get() as f64),
    );
    let (mut placed, mut moved) = (Vec::new(), Vec::new());
    for ns in state.namespaces.values() {
        for t in &ns.targets {
            for h in &t.shards {
                let labels = format!(
                    "{{namespace=\"{}\",target=\"{}\",shard=\"{}\"}}",
                    ns.name, t.name, h.shard.shard
                );
                placed.push((labels.clone(), h.arbiter() as f64));
                moved.push((labels, h.moves() as f64));
            }
        }
    }
    metric(
        "walden_shard_arbiter",
        "gauge",
        "The arbiter (thread) a target's shard runs on.",
        placed,
    );
    metric(
        "walden_shard_moves_total",
        "counter",
        "Times the shard moved to another arbiter.",
        moved,
    );
    metric(
        "walden_arbiter_busy_ratio",
        "gauge",
        "The share of the last rebalance sample the arbiter's thread was busy.",
        state
            .rebalance
            .busy()
            .into_iter()
            .enumerate()
            .map(|(i, b)| (format!("{{arbiter=\"{i}\"}}"), b))
            .collect(),
    );
    let mut lag = Vec::new();
    let mut health = Vec::new();
    for ns in state.namespaces.values() {
        for t in &ns.targets {
            let labels = format!("namespace=\"{}\",target=\"{}\"", ns.name, t.name);
            for h in &t.shards {
                if let Some(n) = ns.backend.local_lag(&t.group, &h.shard) {
                    lag.push((
                        format!("{{{labels},shard=\"{}\"}}", h.shard.shard),
                        n as f64,
                    ));
                }
            }
            let (healthy, _) = t.sink_health.healthy();
            health.push((format!("{{{labels}}}"), healthy as u64 as f64));
        }
    }
    metric(
        "walden_consumer_lag",
        "gauge",
        "Entries after the target's committed offset.",
        lag,
    );
    metric(
        "walden_target_healthy",
        "gauge",
        "1 if the target's last healthcheck passed.",
        health,
    );
    let breaker_metric = |f: &dyn Fn(&BreakerView) -> f64| {
        let mut v = Vec::new();
        for ns in state.namespaces.values() {
            for t in &ns.targets {
                let labels = format!("{{namespace=\"{}\",target=\"{}\"}}", ns.name, t.name);
                v.push((labels, f(&t.breaker.view())));
            }
        }
        v
    };
    let mut limits = Vec::new();
    let mut in_flight = Vec::new();
    for ns in state.namespaces.values() {
        for t in &ns.targets {
            let labels = format!("{{namespace=\"{}\",target=\"{}\"}}", ns.name, t.name);
            let c = t.concurrency.stats();
            limits.push((labels.clone(), c.limit as f64));
            in_flight.push((labels, c.in_flight as f64));
        }
    }
    metric(
        "walden_target_concurrency_limit",
        "gauge",
        "Requests (or calls) the target may have in flight at once: its adaptive limit.",
        limits,
    );
    metric(
        "walden_target_in_flight",
        "gauge",
        "Requests (or calls) in flight to the target.",
        in_flight,
    );
    metric(
        "walden_breaker_open",
        "gauge",
        "1 while the target's breaker is open or half-open: delivery is paused.",
        breaker_metric(&|b| (b.state != BreakerState::Closed) as u64 as f64),
    );
    metric(
        "walden_breaker_trips_total",
        "counter",
        "Times the target's breaker opened.",
        breaker_metric(&|b| b.trips as f64),
    );
    metric(
        "walden_breaker_probes_total",
        "counter",
        "Probes sent while the target's breaker was open.",
        breaker_metric(&|b| b.probes as f64),
    );
    // How late delayed entries fired: a Prometheus histogram per namespace.
    let _ = writeln!(
        out,
        "# HELP walden_delay_fire_lateness_ms How late delayed entries fired, against their due time.\n# TYPE walden_delay_fire_lateness_ms histogram"
    );
    for ns in state.namespaces.values() {
        let mut counts = [0u64; 9];
        for h in ns.targets.iter().flat_map(|t| &t.shards) {
            for (c, n) in counts.iter_mut().zip(h.stats.fire_lateness.counts()) {
                *c += n;
            }
        }
        let mut cumulative = 0;
        for (i, n) in counts.iter().enumerate() {
            cumulative += n;
            let le = crate::stats::LATENESS_BOUNDS_MS
                .get(i)
                .map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(
                out,
                "walden_delay_fire_lateness_ms_bucket{{namespace=\"{}\",le=\"{le}\"}} {cumulative}",
                ns.name
            );
        }
        let _ = writeln!(
            out,
            "walden_delay_fire_lateness_ms_count{{namespace=\"{}\"}} {cumulative}",
            ns.name
        );
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(out)
}
