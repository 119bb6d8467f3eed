//! Delays on Kafka: delay-tier topics, so a broker namespace never holds a
//! delayed entry on one machine's disk.
//!
//! A delayed entry goes to the tier topic that fits its remaining delay (the
//! largest tier not longer than it; the smallest tier for less): `1s`,
//! `10s`, `1m`, `10m` or `1h`, named `<topic>.delay-<tier>`, on the entry's
//! own partition. A worker per tier partition reads its records in order,
//! waits until each is ready (produced + tier, or due, whichever is first),
//! then forwards it: to a shorter tier while time remains, or back to the
//! namespace's topic once due, where the shard consumer applies it. A record
//! is acked (and later committed) only after its forward is acknowledged, so
//! a crash repeats a hop, never loses one.
//!
//! Accuracy: a record waits behind the one ahead of it in its tier
//! partition, so an entry can be late by up to the smallest tier (1 s); an
//! entry back on the namespace's topic gets a new offset (its sequence), in
//! due order.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{BoxFuture, join_all};
use tracing::warn;

use super::{KafkaError, KafkaGroup, KafkaProducer, KafkaSettings, Membership};
use crate::backends::{BackendError, Consumer, DelayStore, Delivery};
use crate::entry::{Delivered, Entry, ShardRef, now_ms};

/// The tiers, shortest first: (name, ms).
pub const TIERS: [(&str, u64); 5] = [
    ("1s", 1_000),
    ("10s", 10_000),
    ("1m", 60_000),
    ("10m", 600_000),
    ("1h", 3_600_000),
];

fn tier_for(remaining_ms: u64) -> usize {
    TIERS
        .iter()
        .rposition(|(_, ms)| *ms <= remaining_ms)
        .unwrap_or(0)
}

/// The delay-tier topics of one namespace, and the way back to its topic.
pub struct KafkaDelayTiers {
    main: KafkaProducer,
    tiers: Vec<KafkaProducer>,
    settings: KafkaSettings,
}

impl KafkaDelayTiers {
    /// Create the tier topics (with the namespace's partitions) if missing.
    pub async fn open(settings: &KafkaSettings) -> Result<Arc<Self>, KafkaError> {
        let main = KafkaProducer::new(settings)?;
        let mut tiers = Vec::new();
        for (name, _) in TIERS {
            let tier = Self::tier_settings(settings, name);
            tier.ensure_topic().await?;
            tiers.push(main.to_topic(&tier.topic));
        }
        Ok(Arc::new(Self {
            main,
            tiers,
            settings: settings.clone(),
        }))
    }

    fn tier_settings(settings: &KafkaSettings, name: &str) -> KafkaSettings {
        KafkaSettings {
            topic: format!("{}.delay-{name}", settings.topic),
            ..settings.clone()
        }
    }

    /// Move an entry one hop: to the tier that fits what remains of its
    /// delay, or to the namespace's topic once it is due.
    async fn forward(&self, partition: u32, entry: &Entry) -> Result<(), KafkaError> {
        let now = now_ms();
        let producer = match entry.due_ms.checked_sub(now) {
            Some(remaining) if remaining > 0 => &self.tiers[tier_for(remaining)],
            _ => &self.main,
        };
        producer.produce(Some(partition), entry, &[]).await?;
        Ok(())
    }

    /// Join each tier's consumer group (`{group}.delay-{tier}`) and run a
    /// worker per tier partition. The groups are returned so the caller can
    /// leave them on shutdown.
    pub fn start_workers(
        self: &Arc<Self>,
        group: &str,
        drain: Duration,
        membership: &Membership,
    ) -> Result<Vec<Arc<KafkaGroup>>, KafkaError> {
        let mut groups = Vec::new();
        for (name, ms) in TIERS {
            let tier = Self::tier_settings(&self.settings, name);
            let id = format!("{group}.delay-{name}");
            let member = KafkaGroup::join(&tier, &id, drain, membership, false)?;
            for p in 0..tier.partitions {
                let shard = ShardRef::new(tier.topic.as_str(), p);
                let (this, member) = (self.clone(), member.clone());
                tokio::spawn(async move {
                    match member.shard_consumer(&shard).await {
                        Ok(consumer) => this.work(consumer, p, ms).await,
                        Err(e) => warn!(error = %e, "Cannot start a delay tier worker."),
                    }
                });
            }
            groups.push(member);
        }
        Ok(groups)
    }

    /// Forward one tier partition's records as they become ready, in order.
    async fn work(
        self: Arc<Self>,
        mut consumer: super::KafkaConsumer,
        partition: u32,
        tier_ms: u64,
    ) {
        let checkpointer = consumer.checkpointer();
        loop {
            let batch = match consumer.receive(256, Duration::from_millis(500)).await {
                Ok(batch) => batch,
                Err(e) => {
                    warn!(error = %e, "Delay tier read failed; retrying.");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            for d in batch {
                let e = d.entry();
                let ready = (e.timestamp_ms + tier_ms).min(e.due_ms);
                let wait = ready.saturating_sub(now_ms());
                if wait > 0 {
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                // Never acked before the next hop is durable.
                while let Err(err) = self.forward(partition, d.entry()).await {
                    warn!(id = %d.entry().id, error = %err, "Cannot forward a delayed entry; retrying.");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                let _ = d.ack().await;
            }
            if let Err(e) = checkpointer.commit().await {
                warn!(error = %e, "Delay tier commit failed; will retry.");
            }
        }
    }
}

/// The DelayScheduler's store for a Kafka namespace: `delay` hands entries
/// to the tiers, and the tier workers fire them, so the scheduler itself
/// holds nothing.
impl DelayStore for KafkaDelayTiers {
    fn fires_itself(&self) -> bool {
        true
    }

    fn delay(&self, items: Vec<Delivered>) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let sends = items.iter().map(|d| self.forward(d.shard.shard, &d.entry));
            for r in join_all(sends).await {
                r?;
            }
            Ok(())
        })
    }

    fn find(&self, _: &str, _: &str) -> BoxFuture<'_, Result<Option<Delivered>, BackendError>> {
        Box::pin(async {
            Err(BackendError::NotHere(
                "delayed entries on a kafka namespace cannot be listed or cancelled yet",
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_goes_to_the_largest_tier_that_fits() {
        assert_eq!(TIERS[tier_for(0)].0, "1s");
        assert_eq!(TIERS[tier_for(999)].0, "1s");
        assert_eq!(TIERS[tier_for(1_000)].0, "1s");
        assert_eq!(TIERS[tier_for(59_999)].0, "10s");
        assert_eq!(TIERS[tier_for(60_000)].0, "1m");
        assert_eq!(TIERS[tier_for(30 * 86_400_000)].0, "1h");
    }
}
