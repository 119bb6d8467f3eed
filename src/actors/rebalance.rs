//! The rebalancer: the part of the supervisor that moves a shard's actors
//! from a busy arbiter to a quiet one.
//!
//! Shards start on arbiter `shard % arbiters`, so a few hot shards can land
//! on one thread while another idles. Every `rebalance.every_ms` the
//! rebalancer reads each arbiter's busy time (tokio's
//! `worker_total_busy_duration` of the arbiter's one thread) and each
//! shard's work over the sample: entries applied, plus its backlog (entries
//! in its applier's mailbox, and waiting for a retry). When the busiest
//! arbiter is over `hot`, another is less busy by `gap`, and moving one of
//! the busy arbiter's shards would lower the busier of the two, for
//! `sustain` samples in a row, it moves that shard
//! ([`TargetRuntime::move_shard`]): the shard drains and commits, and its
//! new actors read on from the committed offset, as after a restart.
//! Hysteresis: a move must leave the two arbiters closer than they were by
//! half the gap, every move starts the count again, and a moved shard stays
//! put for `cooldown_ms`. So shards don't bounce.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::ArbiterHandle;
use serde::Serialize;
use tokio::runtime::RuntimeMetrics;
use tracing::{info, warn};

use super::supervisor::NamespaceRuntime;
use crate::config::RebalanceConfig;
use crate::entry::now_ms;

/// Moves remembered for the stats.
const MOVES_KEPT: usize = 32;

/// One shard's actors for one target, and its share of its arbiter's work
/// over the last sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Unit {
    pub arbiter: usize,
    pub weight: f64,
    /// Not in its cooldown.
    pub movable: bool,
}

/// The move that best evens the busiest and the least busy arbiter, if
/// there is an imbalance worth one: `(unit, to)`.
pub fn choose(busy: &[f64], units: &[Unit], cfg: &RebalanceConfig) -> Option<(usize, usize)> {
    let by_busy = |a: &(usize, &f64), b: &(usize, &f64)| a.1.total_cmp(b.1);
    let (hot, &hot_busy) = busy.iter().enumerate().max_by(by_busy)?;
    let (cold, &cold_busy) = busy.iter().enumerate().min_by(by_busy)?;
    if hot_busy < cfg.hot || hot_busy - cold_busy < cfg.gap {
        return None;
    }
    let total: f64 = units
        .iter()
        .filter(|u| u.arbiter == hot)
        .map(|u| u.weight)
        .sum();
    if total <= 0.0 {
        return None; // Busy with something that is not a shard's.
    }
    units
        .iter()
        .enumerate()
        .filter(|(_, u)| u.arbiter == hot && u.movable && u.weight > 0.0)
        .map(|(i, u)| {
            let share = hot_busy * u.weight / total;
            (i, (hot_busy - share).max(cold_busy + share))
        })
        .filter(|&(_, after)| after <= hot_busy - cfg.gap / 2.0)
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| (i, cold))
}

/// Entries a shard holds and has yet to apply: in its applier's mailbox,
/// and waiting for a retry.
fn backlog(stats: &super::ShardStats) -> f64 {
    (stats.mailbox.get().max(0) + stats.in_retry.get().max(0)) as f64
}

/// A move the rebalancer made.
#[derive(Clone, Debug, Serialize)]
pub struct MoveRecord {
    pub namespace: String,
    pub target: String,
    pub shard: u32,
    pub from: usize,
    pub to: usize,
    pub at_ms: u64,
    /// The arbiters' busy shares when it was decided.
    pub busy: Vec<f64>,
}

/// What the stats and metrics show of the rebalancer.
#[derive(Debug, Default)]
pub struct RebalanceStats {
    state: Mutex<(Vec<f64>, VecDeque<MoveRecord>, u64)>,
}

impl RebalanceStats {
    /// Each arbiter's busy share over the last sample.
    pub fn busy(&self) -> Vec<f64> {
        self.state.lock().unwrap().0.clone()
    }

    /// The latest moves, oldest first.
    pub fn moves(&self) -> Vec<MoveRecord> {
        self.state.lock().unwrap().1.iter().cloned().collect()
    }

    /// Moves since start.
    pub fn total_moves(&self) -> u64 {
        self.state.lock().unwrap().2
    }

    fn sampled(&self, busy: Vec<f64>) {
        self.state.lock().unwrap().0 = busy;
    }

    fn moved(&self, record: MoveRecord) {
        let mut state = self.state.lock().unwrap();
        if state.1.len() == MOVES_KEPT {
            state.1.pop_front();
        }
        state.1.push_back(record);
        state.2 += 1;
    }
}

/// Where a unit is in the namespaces, and what it did up to the last
/// sample.
struct Tracked {
    namespace: usize,
    target: usize,
    shard: usize,
    applied: u64,
    moved_at: Option<Instant>,
}

pub struct Rebalancer {
    config: RebalanceConfig,
    arbiters: Vec<ArbiterHandle>,
    namespaces: Vec<Arc<NamespaceRuntime>>,
    stats: Arc<RebalanceStats>,
}

impl Rebalancer {
    pub fn new(
        config: RebalanceConfig,
        arbiters: Vec<ArbiterHandle>,
        namespaces: Vec<Arc<NamespaceRuntime>>,
        stats: Arc<RebalanceStats>,
    ) -> Self {
        Self {
            config,
            arbiters,
            namespaces,
            stats,
        }
    }

    /// Sample and move until `stop` says so; a move under way finishes
    /// first.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let Some(metrics) = self.metrics().await else {
            warn!("Cannot read the arbiters' busy time; shards stay where they started.");
            return;
        };
        let mut units: Vec<Tracked> = Vec::new();
        for (n, ns) in self.namespaces.iter().enumerate() {
            for (t, target) in ns.targets.iter().enumerate() {
                for (s, h) in target.shards.iter().enumerate() {
                    units.push(Tracked {
                        namespace: n,
                        target: t,
                        shard: s,
                        applied: h.stats.applied.get(),
                        moved_at: None,
                    });
                }
            }
        }
        let every = Duration::from_millis(self.config.every_ms);
        let cooldown = Duration::from_millis(self.config.cooldown_ms);
        let busy_now = || -> Vec<Duration> {
            metrics
                .iter()
                .map(|m| m.worker_total_busy_duration(0))
                .collect()
        };
        let (mut last_busy, mut last_at) = (busy_now(), Instant::now());
        let mut streak = 0u32;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let (now_busy, now) = (busy_now(), Instant::now());
            let elapsed = now.duration_since(last_at).as_secs_f64().max(1e-3);
            let busy: Vec<f64> = now_busy
                .iter()
                .zip(&last_busy)
                .map(|(n, l)| (n.saturating_sub(*l).as_secs_f64() / elapsed).min(1.0))
                .collect();
            (last_busy, last_at) = (now_busy, now);
            self.stats.sampled(busy.clone());
            let sample: Vec<Unit> = units
                .iter_mut()
                .map(|u| {
                    let h = &self.namespaces[u.namespace].targets[u.target].shards[u.shard];
                    let applied = h.stats.applied.get();
                    let done = applied.saturating_sub(std::mem::replace(&mut u.applied, applied));
                    Unit {
                        arbiter: h.arbiter(),
                        weight: done as f64 + backlog(&h.stats),
                        movable: u.moved_at.is_none_or(|t| t.elapsed() >= cooldown),
                    }
                })
                .collect();
            let Some((unit, to)) = choose(&busy, &sample, &self.config) else {
                streak = 0;
                continue;
            };
            streak += 1;
            if streak < self.config.sustain {
                continue;
            }
            streak = 0;
            let u = &mut units[unit];
            let ns = &self.namespaces[u.namespace];
            let target = &ns.targets[u.target];
            let from = sample[unit].arbiter;
            info!(namespace = %ns.name, target = %target.name, shard = u.shard, from, to,
                busy = ?busy, "An arbiter stays busy while another is not; moving a shard.");
            let settle = Duration::from_millis(self.config.settle_ms);
            if target
                .move_shard(u.shard, to, &self.arbiters[to], settle)
                .await
            {
                u.moved_at = Some(Instant::now());
                self.stats.moved(MoveRecord {
                    namespace: ns.name.clone(),
                    target: target.name.clone(),
                    shard: u.shard as u32,
                    from,
                    to,
                    at_ms: now_ms(),
                    busy,
                });
            }
            // The move's own pause is not a sample.
            (last_busy, last_at) = (busy_now(), Instant::now());
        }
    }

    /// Each arbiter's runtime metrics, read on the arbiter itself.
    async fn metrics(&self) -> Option<Vec<RuntimeMetrics>> {
        let mut out = Vec::with_capacity(self.arbiters.len());
        for a in &self.arbiters {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let sent = a.spawn(async move {
                let _ = tx.send(tokio::runtime::Handle::current().metrics());
            });
            if !sent {
                return None;
            }
            out.push(rx.await.ok()?);
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(arbiter: usize, weight: f64) -> Unit {
        Unit {
            arbiter,
            weight,
            movable: true,
        }
    }

    fn cfg() -> RebalanceConfig {
        RebalanceConfig::default()
    }

    #[test]
    fn two_hot_shards_on_one_arbiter_are_split() {
        let units = [unit(0, 100.0), unit(1, 0.0), unit(0, 100.0), unit(1, 0.0)];
        assert_eq!(choose(&[0.9, 0.05], &units, &cfg()), Some((0, 1)));
    }

    #[test]
    fn one_hot_shard_stays_put_since_moving_it_only_moves_the_heat() {
        let units = [unit(0, 100.0), unit(1, 0.0), unit(0, 0.0), unit(1, 0.0)];
        assert_eq!(choose(&[0.9, 0.05], &units, &cfg()), None);
    }

    #[test]
    fn no_move_below_hot_or_within_the_gap() {
        let units = [unit(0, 100.0), unit(0, 100.0), unit(1, 10.0)];
        assert_eq!(choose(&[0.7, 0.0], &units, &cfg()), None);
        assert_eq!(choose(&[0.95, 0.7], &units, &cfg()), None);
    }

    #[test]
    fn a_shard_in_its_cooldown_stays() {
        let mut units = vec![unit(0, 100.0), unit(0, 100.0)];
        units[0].movable = false;
        assert_eq!(choose(&[0.9, 0.1], &units, &cfg()), Some((1, 1)));
        units[1].movable = false;
        assert_eq!(choose(&[0.9, 0.1], &units, &cfg()), None);
    }

    #[test]
    fn the_move_that_evens_best_wins() {
        // 0.9 on arbiter 0: shares 0.6, 0.2, 0.1. Moving 0.2 or 0.1 leaves
        // 0.7 or 0.8 there; moving 0.6 leaves 0.6 on arbiter 1.
        let units = [unit(0, 60.0), unit(0, 20.0), unit(0, 10.0)];
        assert_eq!(choose(&[0.9, 0.0, 0.5], &units, &cfg()), Some((0, 1)));
    }

    #[test]
    fn an_arbiter_busy_with_no_shard_work_moves_nothing() {
        let units = [unit(0, 0.0), unit(1, 5.0)];
        assert_eq!(choose(&[0.95, 0.1], &units, &cfg()), None);
    }
}
