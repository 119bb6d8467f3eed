//! Timer accuracy of the DelayScheduler, on tokio's paused clock: hours of
//! delays run in milliseconds, and "late" is measured exactly.
//!
//! The real delay store (fjall on its own thread) cannot run under a paused
//! clock: tokio would advance time while a store call is in flight. So these
//! tests use an in-memory store whose calls complete at once. The durable
//! path, with the real store and real time, is tested in
//! `tests/service_delays.rs`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor, Addr, Context, Handler, Supervisor};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use walden::actors::ShardStats;
use walden::actors::delay::{DelayScheduler, clock_ms};
use walden::actors::messages::{ApplyDelayed, Cancel, CancelOutcome, Rewind};
use walden::backends::{BackendError, DelayStore, Limit};
use walden::entry::{Delivered, Entry, ShardRef};

/// (due ms, sequence) → entry, for one shard.
/// A delay store in memory, which remembers every entry it has handed out.
#[derive(Default)]
struct MemoryDelays(
    Mutex<BTreeMap<(u64, u64), Delivered>>,
    Mutex<std::collections::HashSet<(u64, u64)>>,
);

impl MemoryDelays {
    /// How many distinct entries the scheduler has loaded.
    fn loaded(&self) -> usize {
        self.1.lock().unwrap().len()
    }
}

impl DelayStore for MemoryDelays {
    fn delay(&self, items: Vec<Delivered>) -> BoxFuture<'_, Result<(), BackendError>> {
        let mut map = self.0.lock().unwrap();
        for d in items {
            map.insert((d.entry.due_ms, d.sequence), d);
        }
        Box::pin(async { Ok(()) })
    }

    fn due_between(
        &self,
        _: &ShardRef,
        from_ms: u64,
        until_ms: u64,
        limit: Limit,
    ) -> BoxFuture<'_, Result<Vec<Delivered>, BackendError>> {
        let map = self.0.lock().unwrap();
        let in_range = map
            .range((from_ms, 0)..(until_ms, 0))
            .map(|(_, d)| d.clone());
        let found: Vec<Delivered> = limit.take(in_range, |d| d.entry.payload.len());
        self.1
            .lock()
            .unwrap()
            .extend(found.iter().map(|d| (d.entry.due_ms, d.sequence)));
        Box::pin(async { Ok(found) })
    }

    fn summary(&self, _: &ShardRef) -> BoxFuture<'_, Result<(u64, Option<u64>), BackendError>> {
        let map = self.0.lock().unwrap();
        let summary = (map.len() as u64, map.keys().next().map(|k| k.0));
        Box::pin(async move { Ok(summary) })
    }

    fn undelay(&self, d: Delivered) -> BoxFuture<'_, Result<(), BackendError>> {
        self.0.lock().unwrap().remove(&(d.entry.due_ms, d.sequence));
        Box::pin(async { Ok(()) })
    }

    fn find(&self, _: &str, id: &str) -> BoxFuture<'_, Result<Option<Delivered>, BackendError>> {
        let map = self.0.lock().unwrap();
        let found = map.values().find(|d| d.entry.id == id).cloned();
        Box::pin(async { Ok(found) })
    }

    fn cancel(&self, d: &Delivered) -> BoxFuture<'_, Result<bool, BackendError>> {
        let removed = self
            .0
            .lock()
            .unwrap()
            .remove(&(d.entry.due_ms, d.sequence))
            .is_some();
        Box::pin(async move { Ok(removed) })
    }
}

/// What the applier would get: (clock ms when handed over, entry).
type Fired = Arc<Mutex<Vec<(u64, Delivered)>>>;

/// Stands in for the applier (and the consumer): records what fires. It
/// never finishes a delivery, so fired entries stay in the store, as they do
/// while a real applier is still delivering them.
struct Sink {
    fired: Fired,
}

impl Actor for Sink {
    type Context = Context<Self>;
}

impl Handler<ApplyDelayed> for Sink {
    type Result = ();

    fn handle(&mut self, ApplyDelayed(batch): ApplyDelayed, _: &mut Context<Self>) {
        let now = clock_ms();
        for d in batch {
            self.fired.lock().unwrap().push((now, d));
        }
    }
}

impl Handler<Rewind> for Sink {
    type Result = ();

    fn handle(&mut self, _: Rewind, _: &mut Context<Self>) {}
}

fn entry(sequence: u64, due_ms: u64) -> Delivered {
    Delivered {
        shard: ShardRef::new("timers", 0),
        sequence,
        entry: Arc::new(Entry {
            id: format!("e{sequence}"),
            key: Some(format!("k{}", sequence % 7)),
            payload: Bytes::from_static(b"{}"),
            due_ms,
            ..Entry::default()
        }),
    }
}

struct Harness {
    scheduler: Addr<DelayScheduler>,
    fired: Fired,
    stats: Arc<ShardStats>,
}

fn start(store: Arc<MemoryDelays>, catch_up_per_s: u64) -> Harness {
    let fired = Fired::default();
    let sink = Sink {
        fired: fired.clone(),
    }
    .start();
    let stats = Arc::new(ShardStats::default());
    let (applier, rewind) = (sink.clone().recipient(), sink.recipient());
    let s = stats.clone();
    let scheduler = Supervisor::start(move |_| {
        DelayScheduler::new(
            applier,
            rewind,
            s,
            store,
            ShardRef::new("timers", 0),
            catch_up_per_s,
            None,
        )
    });
    Harness {
        scheduler,
        fired,
        stats,
    }
}

/// Run `f` in an actix system on a paused tokio clock.
fn paused(f: impl AsyncFnOnce()) {
    let system = actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    });
    system.block_on(f());
}

#[test]
fn entries_fire_at_their_due_time_in_due_then_sequence_order() {
    paused(async || {
        let t0 = clock_ms();
        let store = Arc::new(MemoryDelays::default());
        let mut items = Vec::new();
        // From 50 ms to 2 hours: most lie far beyond the in-memory window.
        for i in 0..300u64 {
            items.push(entry(i, t0 + 50 + i * i * 80));
        }
        // Ties: equal due times, stored in reverse sequence order.
        for seq in (1000..1010).rev() {
            items.push(entry(seq, t0 + 7_777));
        }
        let last_due = items.iter().map(|d| d.entry.due_ms).max().unwrap();
        // Came due just before the start (not overdue enough for catch-up):
        // they fire at once, not after some polling interval.
        items.extend((2000..2005).map(|seq| entry(seq, t0 - 300)));
        store.delay(items.clone()).await.unwrap();

        let h = start(store.clone(), 1000);
        tokio::time::sleep(Duration::from_millis(last_due - t0 + 5_000)).await;

        let fired = h.fired.lock().unwrap().clone();
        assert_eq!(fired.len(), items.len(), "every entry fires exactly once");
        let mut late = Vec::new();
        for (at, d) in &fired {
            if d.sequence >= 2000 {
                assert_eq!(*at, t0, "{} came due before the start", d.entry.id);
                continue;
            }
            assert!(
                *at >= d.entry.due_ms,
                "{} fired {} ms early",
                d.entry.id,
                d.entry.due_ms - at
            );
            late.push(at - d.entry.due_ms);
        }
        assert!(
            late.iter().all(|&l| l <= 1),
            "lateness on a paused clock: {late:?}"
        );
        let order: Vec<(u64, u64)> = fired
            .iter()
            .map(|(_, d)| (d.entry.due_ms, d.sequence))
            .collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, sorted, "fired in due order, then sequence order");
        assert_eq!(h.stats.delayed.get(), 0);
        assert_eq!(h.stats.caught_up.get(), 0, "nothing was overdue");
    });
}

#[test]
fn overdue_entries_fire_in_due_order_under_the_catch_up_rate() {
    paused(async || {
        let t0 = clock_ms();
        let store = Arc::new(MemoryDelays::default());
        // 50 entries that came due a minute ago, as after a long outage.
        let items: Vec<Delivered> = (0..50).map(|i| entry(i, t0 - 60_000 + i * 10)).collect();
        store.delay(items).await.unwrap();

        let h = start(store, 10);
        tokio::time::sleep(Duration::from_secs(30)).await;

        let fired = h.fired.lock().unwrap().clone();
        assert_eq!(fired.len(), 50);
        let seqs: Vec<u64> = fired.iter().map(|(_, d)| d.sequence).collect();
        assert_eq!(seqs, (0..50).collect::<Vec<_>>(), "due order");
        // A full bucket (10) at once, then 10 a second: 40 more take ~4 s.
        let span = fired.last().unwrap().0 - fired[0].0;
        assert!((3_900..=5_000).contains(&span), "took {span} ms");
        for w in fired.windows(11) {
            let within = w[10].0 - w[0].0;
            assert!(
                within >= 900 || w[0].0 == fired[0].0,
                "11 fired within {within} ms"
            );
        }
        assert_eq!(h.stats.caught_up.get(), 50);
    });
}

#[test]
fn a_cancel_never_races_a_fire() {
    paused(async || {
        let t0 = clock_ms();
        let store = Arc::new(MemoryDelays::default());
        let soon = entry(1, t0 + 1_000);
        let later = entry(2, t0 + 5_000);
        let far = entry(3, t0 + 3_600_000);
        store
            .delay(vec![soon.clone(), later.clone(), far.clone()])
            .await
            .unwrap();

        let h = start(store.clone(), 1000);
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        assert_eq!(h.fired.lock().unwrap().len(), 1, "the first one fired");

        let cancel = |d: &Delivered| h.scheduler.send(Cancel(d.clone()));
        assert_eq!(cancel(&soon).await.unwrap().unwrap(), CancelOutcome::Fired);
        assert_eq!(
            cancel(&later).await.unwrap().unwrap(),
            CancelOutcome::Cancelled
        );
        // Beyond the in-memory window: cancelled in the store alone.
        assert_eq!(
            cancel(&far).await.unwrap().unwrap(),
            CancelOutcome::Cancelled
        );
        assert_eq!(cancel(&later).await.unwrap().unwrap(), CancelOutcome::Gone);

        tokio::time::sleep(Duration::from_secs(3_700)).await;
        let fired: Vec<u64> = h
            .fired
            .lock()
            .unwrap()
            .iter()
            .map(|(_, d)| d.sequence)
            .collect();
        assert_eq!(fired, vec![1], "cancelled entries never fire");
        let left: Vec<u64> = store
            .0
            .lock()
            .unwrap()
            .values()
            .map(|d| d.sequence)
            .collect();
        assert_eq!(left, vec![1], "only the fired one, still being delivered");
        assert_eq!(h.stats.delayed.get(), 0);
    });
}

/// 100,000 overdue entries of 1 KiB after a restart: the scheduler holds at
/// most its window's bound in memory (8 MiB of payload), and loads more as
/// the catch-up rate fires them, instead of loading the whole backlog.
#[test]
fn an_overdue_backlog_stays_in_the_store_and_comes_in_as_it_fires() {
    paused(async || {
        let t0 = clock_ms();
        let store = Arc::new(MemoryDelays::default());
        let items: Vec<Delivered> = (0..100_000u64)
            .map(|i| {
                let mut d = entry(i, t0 - 60_000 + i / 100);
                Arc::make_mut(&mut d.entry).payload = Bytes::from(vec![b'x'; 1024]);
                d
            })
            .collect();
        store.delay(items).await.unwrap();
        let h = start(store.clone(), 500);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let fired = h.fired.lock().unwrap().len();
        assert!(
            (4_000..=5_600).contains(&fired),
            "{fired} fired at 500/s in 10 s"
        );
        let held = store.loaded() - fired;
        assert!(
            held * 1024 <= (8 << 20) + 1024,
            "{held} entries of 1 KiB held in memory"
        );
        assert!(held > 0, "the window is kept filled");
    });
}
