//! `type = "redis"`: apply each mutation with one atomic Lua script that
//! compares versions before `SET` or `DEL`, so a retry or a replay never moves
//! a key backwards.
//!
//! A mutation of key `k` writes the value at `{key_prefix}k` and its version at
//! `{key_prefix}k:walden-version`; a delete removes the value and keeps the
//! version as a tombstone. A key ending in `:walden-version` is refused (at
//! ingest, and here as a permanent error): it would overwrite another key's
//! version. (On Redis Cluster both must land in one slot: put a
//! hash tag in the prefix or the keys.) A JSON string value is stored as the
//! string itself; any other JSON value as its JSON text.
//!
//! A set of mutations is one script that reads and compares every version
//! before it writes anything, so it applies whole or not at all. On Redis
//! Cluster a script's keys must share one hash slot, so a set's keys need a
//! common hash tag (`{order-991}:cart`, ...).
//!
//! Errors: I/O, timeouts, dropped connections and `BUSY`/`LOADING`/`TRYAGAIN`
//! style answers are transient; other server answers are permanent.

use std::path::Path;
use std::time::Duration;

use futures_util::future::{BoxFuture, join_all};
use redis::aio::ConnectionManager;
use tokio::sync::OnceCell;

use super::mutation::{Mutation, Op, VERSION_SUFFIX, check_redis_key, version};
use super::{ApplyResult, Outcome, Sink, SinkError};
use crate::entry::Delivered;

/// Versions are zero-padded to 20 digits so the script compares them as
/// strings: Lua numbers are doubles and lose precision past 2^53.
const GUARDED_APPLY: &str = r#"
local stored = redis.call('GET', KEYS[2])
if stored and stored >= ARGV[1] then
  return 0
end
if ARGV[2] == 'put' then
  redis.call('SET', KEYS[1], ARGV[3])
else
  redis.call('DEL', KEYS[1])
end
redis.call('SET', KEYS[2], ARGV[1])
return 1
"#;

/// A set of mutations in one script. Every version is read and compared
/// first, and only then is anything written: Redis does not roll a script
/// back, so a read that fails (a version key holding another type) must
/// fail before the first write. Per mutation: KEYS value, version; ARGV
/// version, op, value. Two mutations of one key apply in order.
const GUARDED_SET: &str = r#"
local n = #ARGV / 3
local latest = {}
local apply = {}
for i = 1, n do
  local vkey = KEYS[2 * i]
  local stored = latest[vkey]
  if stored == nil then
    stored = redis.call('GET', vkey) or ''
  end
  local v = ARGV[3 * i - 2]
  if stored < v then
    apply[i] = true
    latest[vkey] = v
  else
    latest[vkey] = stored
  end
end
local changed = 0
for i = 1, n do
  if apply[i] then
    if ARGV[3 * i - 1] == 'put' then
      redis.call('SET', KEYS[2 * i - 1], ARGV[3 * i])
    else
      redis.call('DEL', KEYS[2 * i - 1])
    end
    redis.call('SET', KEYS[2 * i], ARGV[3 * i - 2])
    changed = changed + 1
  end
end
return changed
"#;

pub struct RedisSink {
    name: String,
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    /// Connected on first use, so a Redis that is down at startup is a
    /// delivery error (retried), not a startup failure.
    conn: OnceCell<ConnectionManager>,
    script: redis::Script,
    set_script: redis::Script,
}

impl RedisSink {
    pub fn new(
        name: &str,
        url: &str,
        prefix: &str,
        timeout: Duration,
        ca_file: Option<&Path>,
    ) -> Result<Self, SinkError> {
        // The Redis client builds its rustls config from the process's
        // provider.
        crate::tls::install_default_provider();
        let client = match ca_file {
            None => redis::Client::open(url),
            Some(path) => {
                let root_cert = std::fs::read(path).map_err(|e| {
                    SinkError::permanent(name, format!("ca_file {}: {e}", path.display()))
                })?;
                redis::Client::build_with_tls(
                    url,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    },
                )
            }
        }
        .map_err(|e| SinkError::permanent(name, format!("bad redis url: {e}")))?;
        Ok(Self {
            name: name.into(),
            client,
            prefix: prefix.into(),
            timeout,
            conn: OnceCell::new(),
            script: redis::Script::new(GUARDED_APPLY),
            set_script: redis::Script::new(GUARDED_SET),
        })
    }

    async fn conn(&self) -> Result<ConnectionManager, SinkError> {
        let connect = self.conn.get_or_try_init(|| async {
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(self.timeout))
                .set_response_timeout(Some(self.timeout));
            ConnectionManager::new_with_config(self.client.clone(), config).await
        });
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(c)) => Ok(c.clone()),
            Ok(Err(e)) => Err(self.classify(&e)),
            Err(_) => Err(SinkError::transient(
                &self.name,
                "redis connection: timed out",
            )),
        }
    }

    fn classify(&self, e: &redis::RedisError) -> SinkError {
        let message = format!("redis: {e}");
        // Whatever the driver itself would retry (BUSY, LOADING, TRYAGAIN,
        // CLUSTERDOWN, dropped connections, ...) is transient.
        let transient = e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || !matches!(e.retry_method(), redis::RetryMethod::NoRetry);
        if transient {
            SinkError::transient(&self.name, message)
        } else {
            SinkError::permanent(&self.name, message)
        }
    }

    /// A mutation's keys (value, version) and arguments (version, op,
    /// value), as both scripts take them.
    fn args(&self, d: &Delivered) -> Result<([String; 2], [String; 3]), SinkError> {
        let m = Mutation::parse(d).map_err(|e| SinkError::permanent(&self.name, e))?;
        // Refused at ingest; this catches entries written before that.
        check_redis_key(&m.key)
            .map_err(|e| SinkError::permanent(&self.name, format!("entry {}: {e}", d.entry.id)))?;
        let key = format!("{}{}", self.prefix, m.key);
        let value = match &m.value {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => String::new(),
        };
        let op = match m.op {
            Op::Put => "put",
            Op::Delete => "delete",
        };
        let version_key = format!("{key}{VERSION_SUFFIX}");
        Ok((
            [key, version_key],
            [format!("{:020}", version(d)), op.into(), value],
        ))
    }

    async fn apply_one(&self, mut conn: ConnectionManager, d: &Delivered) -> ApplyResult {
        let ([key, version_key], [version, op, value]) = self.args(d)?;
        let mut invocation = self.script.key(key);
        invocation.key(version_key).arg(version).arg(op).arg(value);
        let run = invocation.invoke_async::<i64>(&mut conn);
        match tokio::time::timeout(self.timeout, run).await {
            // 0: a newer version is stored; the entry is superseded.
            Ok(Ok(0)) => Ok(Outcome::Superseded),
            Ok(Ok(_)) => Ok(Outcome::Applied),
            Ok(Err(e)) => Err(self.classify(&e)),
            Err(_) => Err(SinkError::transient(&self.name, "redis script timed out")),
        }
    }
}

impl Sink for RedisSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn concurrent_entries(&self) -> bool {
        true
    }

    fn apply<'a>(&'a self, batch: &'a [Delivered]) -> BoxFuture<'a, Vec<ApplyResult>> {
        Box::pin(async move {
            let conn = match self.conn().await {
                Ok(c) => c,
                Err(e) => return vec![Err(e); batch.len()],
            };
            // One entry per key in a batch: the scripts may run pipelined.
            join_all(batch.iter().map(|d| self.apply_one(conn.clone(), d))).await
        })
    }

    fn applies_sets_together(&self) -> bool {
        true
    }

    /// One script for the whole set (`GUARDED_SET`): all of it applies,
    /// each mutation under its version guard, or none of it.
    fn apply_set<'a>(&'a self, set: &'a [Delivered]) -> BoxFuture<'a, Result<Outcome, SinkError>> {
        Box::pin(async move {
            let mut invocation = self.set_script.prepare_invoke();
            for d in set {
                let (keys, args) = self.args(d)?;
                for k in keys {
                    invocation.key(k);
                }
                for a in args {
                    invocation.arg(a);
                }
            }
            let mut conn = self.conn().await?;
            let run = invocation.invoke_async::<i64>(&mut conn);
            match tokio::time::timeout(self.timeout, run).await {
                // Nothing changed: newer versions of every key are stored.
                Ok(Ok(0)) => Ok(Outcome::Superseded),
                Ok(Ok(_)) => Ok(Outcome::Applied),
                Ok(Err(e)) => Err(self.classify(&e)),
                Err(_) => Err(SinkError::transient(&self.name, "redis script timed out")),
            }
        })
    }

    fn healthcheck(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let cmd = redis::cmd("PING");
            let ping = cmd.query_async::<String>(&mut conn);
            match tokio::time::timeout(self.timeout, ping).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(self.classify(&e)),
                Err(_) => Err(SinkError::transient(&self.name, "redis PING timed out")),
            }
        })
    }
}
