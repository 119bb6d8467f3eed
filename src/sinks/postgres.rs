//! `type = "postgres"`: upsert each mutation into a table, guarded by its
//! version, so a retry or a replay never moves a row backwards:
//!
//! ```sql
//! INSERT INTO t (key, value, version, deleted) VALUES ($1, $2, $3, $4), ...
//! ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value,
//!   version = EXCLUDED.version, deleted = EXCLUDED.deleted
//! WHERE t.version < EXCLUDED.version
//! RETURNING t.key
//! ```
//!
//! A batch (at most one entry per key) is one statement and one commit; keys
//! not returned were superseded by a newer stored version. If the statement
//! fails for a reason that may be one row's (a constraint, bad data), the
//! entries are applied one statement each, so only the bad one fails.
//!
//! A set of mutations is one transaction: each row is still version-guarded,
//! one statement each, in the set's order, and readers see all of it or none.
//!
//! A delete leaves a tombstone (`deleted = true`, `value = NULL`) carrying
//! its version. The table is not created by Walden:
//!
//! ```sql
//! CREATE TABLE t (key TEXT PRIMARY KEY, value JSONB, version BIGINT NOT NULL,
//!                 deleted BOOLEAN NOT NULL DEFAULT false);
//! ```
//!
//! TLS follows libpq's `sslmode` and `sslrootcert` in the URL
//! ([`crate::config::parse_postgres_url`]): `verify-full` checks the
//! server's certificate and name, `verify-ca` (or `require` with a
//! `sslrootcert`) its chain only, `require` and `prefer` encrypt without
//! checking.
//!
//! Errors: connection errors, serialization failures, deadlocks and resource
//! shortages are transient; constraint and data errors are permanent. A
//! missing table fails the healthcheck and is retried (transient), so a
//! config mistake does not dead-letter every entry.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::collections::HashSet;

use futures_util::future::{BoxFuture, join_all};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::mutation::{Mutation, Op, version};
use super::{ApplyResult, Outcome, Sink, SinkError};
use crate::config::SslMode;
use crate::entry::Delivered;
use crate::tls::Verify;

pub struct PostgresSink {
    name: String,
    table: String,
    pool: Pool,
    /// `INSERT INTO t (columns)`, before the VALUES.
    insert: String,
    /// The version-guarded conflict clause, after the VALUES.
    on_conflict: &'static str,
    timeout: Duration,
}

impl PostgresSink {
    /// Check the settings and build the pool; connects lazily.
    pub fn new(
        name: &str,
        url: &str,
        table: &str,
        pool_size: usize,
        timeout: Duration,
    ) -> Result<Self, SinkError> {
        let pg = crate::config::parse_postgres_url(url)
            .map_err(|e| SinkError::permanent(name, format!("bad postgres url: {e}")))?;
        let verify = match (pg.ssl_mode, &pg.root_cert) {
            (SslMode::VerifyFull, _) => Verify::Full,
            // libpq: `require` with a root certificate is `verify-ca`.
            (SslMode::VerifyCa, _) | (SslMode::Require, Some(_)) => Verify::Chain,
            // Encrypted when the server offers it, unauthenticated, as libpq.
            _ => Verify::Nothing,
        };
        let tls = crate::tls::client_config(verify, pg.root_cert.as_deref())
            .map_err(|e| SinkError::permanent(name, e.to_string()))?;
        let quoted = quote_table(table)
            .ok_or_else(|| SinkError::permanent(name, format!("bad table name {table:?}")))?;
        let manager = Manager::from_config(
            pg.config,
            tokio_postgres_rustls::MakeRustlsConnect::new(tls),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| SinkError::permanent(name, format!("postgres pool: {e}")))?;
        Ok(Self {
            name: name.into(),
            table: table.into(),
            pool,
            insert: format!("INSERT INTO {quoted} AS t (key, value, version, deleted)"),
            on_conflict: "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, \
                          version = EXCLUDED.version, deleted = EXCLUDED.deleted \
                          WHERE t.version < EXCLUDED.version",
            timeout,
        })
    }

    fn classify(&self, e: &tokio_postgres::Error) -> SinkError {
        let message = match e.as_db_error() {
            Some(db) => format!(
                "table {}: {} ({})",
                self.table,
                db.message(),
                db.code().code()
            ),
            None => format!("table {}: {e}", self.table),
        };
        if transient(e.code()) {
            SinkError::transient(&self.name, message)
        } else {
            SinkError::permanent(&self.name, message)
        }
    }

    async fn apply_all(&self, batch: &[Delivered]) -> Vec<ApplyResult> {
        let client = match tokio::time::timeout(self.timeout, self.pool.get()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let e = SinkError::transient(
                    &self.name,
                    format!("postgres connection: {}", super::with_causes(&e)),
                );
                return vec![Err(e); batch.len()];
            }
            Err(_) => {
                let e = SinkError::transient(&self.name, "postgres connection: timed out");
                return vec![Err(e); batch.len()];
            }
        };
        let mut results: Vec<Option<ApplyResult>> = vec![None; batch.len()];
        let mut rows = Vec::with_capacity(batch.len());
        for (i, d) in batch.iter().enumerate() {
            match Mutation::parse(d) {
                Ok(m) => rows.push((i, Row::new(m, version(d)))),
                Err(e) => results[i] = Some(Err(SinkError::permanent(&self.name, e))),
            }
        }
        let distinct = rows
            .iter()
            .map(|(_, r)| &r.key)
            .collect::<HashSet<_>>()
            .len()
            == rows.len();
        let together = if distinct && rows.len() > 1 {
            self.upsert_together(&client, &rows).await
        } else {
            None
        };
        match together {
            Some(outcomes) => {
                for ((i, _), outcome) in rows.iter().zip(outcomes) {
                    results[*i] = Some(outcome);
                }
            }
            None => {
                // One statement each, so each entry gets its own answer.
                let one_by_one = rows.iter().map(|(_, row)| self.upsert_one(&client, row));
                for ((i, _), outcome) in rows.iter().zip(join_all(one_by_one).await) {
                    results[*i] = Some(outcome);
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every entry answered"))
            .collect()
    }

    /// The whole batch as one multi-row upsert: one statement, one commit.
    /// `None` when it failed for a reason that might be one entry's fault,
    /// so the caller retries the entries one by one to find it.
    async fn upsert_together(
        &self,
        client: &deadpool_postgres::Client,
        rows: &[(usize, Row)],
    ) -> Option<Vec<ApplyResult>> {
        let params: Vec<&(dyn ToSql + Sync)> =
            rows.iter().flat_map(|(_, row)| row.params()).collect();
        let sql = format!(
            "{} VALUES {} {} RETURNING t.key",
            self.insert,
            values_sql(rows.len()),
            self.on_conflict
        );
        let run = async {
            let stmt = client.prepare_cached(&sql).await?;
            client.query(&stmt, &params).await
        };
        match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(returned)) => {
                let applied: HashSet<String> = returned.iter().map(|r| r.get(0)).collect();
                Some(
                    rows.iter()
                        .map(|(_, row)| {
                            // Not returned: the stored version was newer.
                            Ok(if applied.contains(&row.key) {
                                Outcome::Applied
                            } else {
                                Outcome::Superseded
                            })
                        })
                        .collect(),
                )
            }
            Ok(Err(e)) => {
                let err = self.classify(&e);
                // A transient failure is the whole batch's; anything else may
                // be one row's, so find it.
                err.is_transient().then(|| vec![Err(err); rows.len()])
            }
            Err(_) => {
                let err = SinkError::transient(&self.name, "postgres statement timed out");
                Some(vec![Err(err); rows.len()])
            }
        }
    }

    /// A set in one transaction, each row under its version guard, one
    /// statement each and in order (a multi-row upsert that touches a row
    /// twice fails).
    async fn upsert_set(&self, set: &[Delivered]) -> Result<Outcome, SinkError> {
        let rows = set
            .iter()
            .map(|d| Mutation::parse(d).map(|m| Row::new(m, version(d))))
            .collect::<Result<Vec<Row>, String>>()
            .map_err(|e| SinkError::permanent(&self.name, e))?;
        let mut client = match tokio::time::timeout(self.timeout, self.pool.get()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(SinkError::transient(
                    &self.name,
                    format!("postgres connection: {}", super::with_causes(&e)),
                ));
            }
            Err(_) => {
                return Err(SinkError::transient(
                    &self.name,
                    "postgres connection: timed out",
                ));
            }
        };
        // Runs of rows with distinct keys, each one multi-row upsert: a
        // statement that touched a row twice would fail.
        let mut chunks: Vec<&[Row]> = Vec::new();
        let mut start = 0;
        let mut keys: HashSet<&str> = HashSet::new();
        for (i, row) in rows.iter().enumerate() {
            if i - start == MAX_ROWS_PER_STATEMENT || !keys.insert(&row.key) {
                chunks.push(&rows[start..i]);
                start = i;
                keys.clear();
                keys.insert(&row.key);
            }
        }
        chunks.push(&rows[start..]);
        let run = async {
            let tx = client.transaction().await?;
            let mut statements = Vec::with_capacity(chunks.len());
            for chunk in &chunks {
                let sql = format!(
                    "{} VALUES {} {}",
                    self.insert,
                    values_sql(chunk.len()),
                    self.on_conflict
                );
                let params: Vec<&(dyn ToSql + Sync)> = chunk.iter().flat_map(Row::params).collect();
                statements.push((tx.prepare_cached(&sql).await?, params));
            }
            // Pipelined on the one connection: sent, and run, in order.
            let runs = statements.iter().map(|(stmt, p)| tx.execute(stmt, p));
            let changed = futures_util::future::try_join_all(runs).await?;
            tx.commit().await?;
            Ok::<u64, tokio_postgres::Error>(changed.iter().sum())
        };
        match tokio::time::timeout(self.timeout, run).await {
            // No row changed: newer versions of every key are stored.
            Ok(Ok(0)) => Ok(Outcome::Superseded),
            Ok(Ok(_)) => Ok(Outcome::Applied),
            Ok(Err(e)) => Err(self.classify(&e)),
            Err(_) => Err(SinkError::transient(
                &self.name,
                "postgres transaction timed out; it was rolled back",
            )),
        }
    }

    async fn upsert_one(&self, client: &deadpool_postgres::Client, row: &Row) -> ApplyResult {
        let sql = format!(
            "{} VALUES {} {}",
            self.insert,
            values_sql(1),
            self.on_conflict
        );
        let run = async {
            let stmt = client.prepare_cached(&sql).await?;
            client.execute(&stmt, &row.params()).await
        };
        match tokio::time::timeout(self.timeout, run).await {
            // 0 rows: a newer version is stored; the entry is superseded.
            Ok(Ok(0)) => Ok(Outcome::Superseded),
            Ok(Ok(_)) => Ok(Outcome::Applied),
            Ok(Err(e)) => Err(self.classify(&e)),
            Err(_) => Err(SinkError::transient(
                &self.name,
                "postgres statement timed out",
            )),
        }
    }
}

/// Whether an error with this SQL state is worth retrying: no state (the
/// connection or the protocol failed), a serialization failure or deadlock,
/// a missing table or column (a migration not yet run), or the classes of
/// connection (08), resources (53), operator intervention (57), system (58)
/// and rollback (40) errors. Any state is read safely, however short.
fn transient(code: Option<&SqlState>) -> bool {
    let Some(code) = code else { return true };
    let class = code.code().get(..2).unwrap_or_default();
    *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
        || *code == SqlState::UNDEFINED_TABLE
        || *code == SqlState::UNDEFINED_COLUMN
        || matches!(class, "08" | "53" | "57" | "58" | "40")
}

/// One mutation as the columns it writes.
struct Row {
    key: String,
    value: Option<serde_json::Value>,
    version: i64,
    deleted: bool,
}

impl Row {
    /// Its four parameters, in the order of the columns.
    fn params(&self) -> [&(dyn ToSql + Sync); 4] {
        [&self.key, &self.value, &self.version, &self.deleted]
    }

    fn new(m: Mutation, version: i64) -> Self {
        let (value, deleted) = match m.op {
            Op::Put => (m.value, false),
            Op::Delete => (None, true),
        };
        Self {
            key: m.key,
            value,
            version,
            deleted,
        }
    }
}

/// `($1, $2, $3, $4),(...)` for `n` rows.
fn values_sql(n: usize) -> String {
    let mut values = String::with_capacity(n * 24);
    for j in 0..n {
        if j > 0 {
            values.push(',');
        }
        let b = 4 * j;
        values.push_str(&format!("(${}, ${}, ${}, ${})", b + 1, b + 2, b + 3, b + 4));
    }
    values
}

/// Rows in one statement of a set, at most (Postgres takes at most 65535
/// parameters, and each distinct size is a prepared statement).
const MAX_ROWS_PER_STATEMENT: usize = 256;

/// Quote `table` or `schema.table` as identifiers; `None` if it isn't one.
fn quote_table(table: &str) -> Option<String> {
    if !crate::config::valid_table_name(table) {
        return None;
    }
    let parts: Vec<&str> = table.split('.').collect();
    Some(
        parts
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join("."),
    )
}

impl Sink for PostgresSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn apply<'a>(&'a self, batch: &'a [Delivered]) -> BoxFuture<'a, Vec<ApplyResult>> {
        Box::pin(self.apply_all(batch))
    }

    fn applies_sets_together(&self) -> bool {
        true
    }

    fn apply_set<'a>(&'a self, set: &'a [Delivered]) -> BoxFuture<'a, Result<Outcome, SinkError>> {
        Box::pin(self.upsert_set(set))
    }

    fn healthcheck(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let client = tokio::time::timeout(self.timeout, self.pool.get())
                .await
                .map_err(|_| SinkError::transient(&self.name, "postgres connection: timed out"))?
                .map_err(|e| {
                    SinkError::transient(
                        &self.name,
                        format!("postgres connection: {}", super::with_causes(&e)),
                    )
                })?;
            let quoted = quote_table(&self.table).expect("checked in new");
            // The columns the upsert needs, without reading any rows.
            let probe = format!("SELECT key, value, version, deleted FROM {quoted} LIMIT 0");
            client.query(&probe, &[]).await.map(|_| ()).map_err(|e| {
                let mut err = self.classify(&e);
                err.message = format!(
                    "{}; the table needs columns key TEXT PRIMARY KEY, value JSONB, version BIGINT, deleted BOOLEAN",
                    err.message
                );
                err
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_sql_state_is_classified_without_panicking() {
        assert!(transient(None));
        assert!(transient(Some(&SqlState::from_code("08006"))));
        assert!(!transient(Some(&SqlState::from_code("23505"))));
        // A server that sends a short or empty state.
        for short in ["", "0", "4"] {
            assert!(!transient(Some(&SqlState::from_code(short))), "{short:?}");
        }
    }

    #[test]
    fn table_names_are_checked_and_quoted() {
        assert_eq!(quote_table("kv").as_deref(), Some("\"kv\""));
        assert_eq!(quote_table("app.kv_2").as_deref(), Some("\"app\".\"kv_2\""));
        for bad in ["", "1kv", "kv; drop table x", "a.b.c", "k\"v", "k v"] {
            assert!(quote_table(bad).is_none(), "{bad:?}");
        }
    }
}
