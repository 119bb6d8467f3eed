//! `type = "memcached"`: apply mutation payloads to Memcached (the EVCache
//! persona), each item guarded by its version so that a retry or an old
//! replay never overwrites a newer value.
//!
//! An item is `{"version": v, "value": ...}` (a delete: `{"version": v,
//! "deleted": true}`, a tombstone), at `{key_prefix}key`. A put or delete
//! reads the item with `gets`; if the stored version is the same or newer,
//! the entry is superseded; otherwise it writes with `cas` (or `add` for a
//! key with no item), and reads again if another writer got there first.
//!
//! **Eviction weakens the guard.** Memcached may evict an item, tombstone
//! included, or expire it (`ttl_s`); a replay of an older entry then finds
//! no version to compare with and writes its value. Size the cache, or keep
//! tombstones longer than any replay reaches back.
//!
//! Errors: I/O, timeouts and pool exhaustion are transient; a value too
//! large for the server, or a payload that is not a mutation, is permanent.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use memcache::{CommandError, MemcacheError};
use serde_json::{Value, json};

use super::mutation::{Mutation, Op, check_memcached_key, version};
use super::{ApplyResult, Outcome, Sink, SinkError};
use crate::entry::{Delivered, now_ms};

/// Reads and writes of one item, at most, while other writers race it.
const MAX_RACES: usize = 16;
/// Memcached takes an expiry longer than this as a Unix time.
const RELATIVE_EXPIRY_MAX_S: u64 = 30 * 24 * 3600;

pub struct MemcachedSink(Arc<Inner>);

/// What an apply on a blocking thread shares with the sink.
struct Inner {
    name: String,
    pool: Pool,
    key_prefix: String,
    ttl_s: u64,
}

/// The client, made at first use: building one connects, and a target that
/// is down at start must not keep Walden from starting.
struct Pool {
    url: String,
    size: u32,
    timeout: Duration,
    client: Mutex<Option<Arc<memcache::Client>>>,
}

impl Pool {
    /// The client, connecting if there is none yet. Blocking.
    fn get(&self) -> Result<Arc<memcache::Client>, MemcacheError> {
        let mut client = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = client.as_ref() {
            return Ok(c.clone());
        }
        let made = Arc::new(
            memcache::Client::builder()
                .add_server(self.url.as_str())?
                .with_max_pool_size(self.size)
                .with_connection_timeout(self.timeout)
                .with_read_timeout(self.timeout)
                .with_write_timeout(self.timeout)
                .build()?,
        );
        *client = Some(made.clone());
        Ok(made)
    }
}

/// What a write found.
enum Race {
    Done(Outcome),
    /// Another writer changed the item between the read and the write.
    Lost,
}

impl MemcachedSink {
    pub fn new(
        name: &str,
        url: &str,
        key_prefix: &str,
        ttl_s: u64,
        pool_size: usize,
        timeout: Duration,
    ) -> Result<Self, SinkError> {
        // Checked now, connected at first use.
        memcache::Client::builder()
            .add_server(url)
            .map_err(|e| SinkError::permanent(name, format!("memcached url: {e}")))?;
        Ok(Self(Arc::new(Inner {
            name: name.into(),
            pool: Pool {
                url: url.into(),
                size: pool_size as u32,
                timeout,
                client: Mutex::new(None),
            },
            key_prefix: key_prefix.into(),
            ttl_s,
        })))
    }
}

impl Inner {
    /// The expiry to send: relative up to 30 days, a Unix time past that.
    fn expiry(&self) -> u32 {
        match self.ttl_s {
            0 => 0,
            t if t <= RELATIVE_EXPIRY_MAX_S => t as u32,
            t => (now_ms() / 1000 + t).min(u64::from(u32::MAX)) as u32,
        }
    }

    fn error(&self, e: MemcacheError) -> SinkError {
        match e {
            MemcacheError::CommandError(CommandError::ValueTooLarge) => {
                SinkError::permanent(&self.name, format!("memcached: {e}"))
            }
            e => SinkError::transient(&self.name, format!("memcached: {e}")),
        }
    }

    /// Apply one mutation, on a blocking thread (the client is synchronous).
    fn apply_one(&self, d: &Delivered) -> ApplyResult {
        let m = Mutation::parse(d).map_err(|e| SinkError::permanent(&self.name, e))?;
        check_memcached_key(&self.key_prefix, &m.key)
            .map_err(|e| SinkError::permanent(&self.name, e))?;
        let key = format!("{}{}", self.key_prefix, m.key);
        let v = version(d);
        let item = match m.op {
            Op::Put => json!({"version": v, "value": m.value}),
            Op::Delete => json!({"version": v, "deleted": true}),
        }
        .to_string();
        for _ in 0..MAX_RACES {
            match self.race(&key, v, &item)? {
                Race::Done(outcome) => return Ok(outcome),
                Race::Lost => continue,
            }
        }
        Err(SinkError::transient(
            &self.name,
            format!("memcached: key {key:?} changed under {MAX_RACES} writes in a row"),
        ))
    }

    fn race(&self, key: &str, v: i64, item: &str) -> Result<Race, SinkError> {
        let client = self.pool.get().map_err(|e| self.error(e))?;
        let found = client
            .gets::<(Vec<u8>, u32, Option<u64>)>(&[key])
            .map_err(|e| self.error(e))?
            .remove(key);
        let written = match found {
            None => match client.add(key, item, self.expiry()) {
                Ok(()) => true,
                Err(MemcacheError::CommandError(
                    CommandError::KeyExists | CommandError::KeyNotFound,
                )) => false,
                // The text protocol answers an add of an existing key NOT_STORED.
                Err(MemcacheError::ServerError(_)) => false,
                Err(e) => return Err(self.error(e)),
            },
            Some((bytes, _, cas)) => {
                // An item Walden did not write has no version: any write
                // is newer.
                let stored = serde_json::from_slice::<Value>(&bytes)
                    .ok()
                    .and_then(|i| i["version"].as_i64());
                if stored.is_some_and(|s| s >= v) {
                    return Ok(Race::Done(Outcome::Superseded));
                }
                let Some(cas) = cas else {
                    return Err(SinkError::transient(
                        &self.name,
                        "memcached answered gets without a CAS id",
                    ));
                };
                match client.cas(key, item, self.expiry(), cas) {
                    Ok(stored) => stored,
                    Err(MemcacheError::CommandError(
                        CommandError::KeyExists | CommandError::KeyNotFound,
                    )) => false,
                    Err(e) => return Err(self.error(e)),
                }
            }
        };
        Ok(match written {
            true => Race::Done(Outcome::Applied),
            false => Race::Lost,
        })
    }
}

impl Sink for MemcachedSink {
    fn name(&self) -> &str {
        &self.0.name
    }

    fn concurrent_entries(&self) -> bool {
        true
    }

    fn apply<'a>(&'a self, batch: &'a [Delivered]) -> BoxFuture<'a, Vec<ApplyResult>> {
        Box::pin(async move {
            // One entry per key in a batch: they may go at once, each on a
            // blocking thread with a pooled connection.
            let calls = batch.iter().map(|d| {
                let (inner, d) = (self.0.clone(), d.clone());
                async move {
                    tokio::task::spawn_blocking(move || inner.apply_one(&d))
                        .await
                        .unwrap_or_else(|e| {
                            Err(SinkError::transient(
                                &self.0.name,
                                format!("memcached call: {e}"),
                            ))
                        })
                }
            });
            futures_util::future::join_all(calls).await
        })
    }

    fn healthcheck(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        let inner = self.0.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || inner.pool.get()?.version().map(|_| ()))
                .await
                .map_err(|e| SinkError::transient(&self.0.name, format!("memcached call: {e}")))?
                .map_err(|e| SinkError::transient(&self.0.name, format!("memcached: {e}")))
        })
    }
}
