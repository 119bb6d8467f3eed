//! Entry points for fuzzing: `fuzz/` drives them with cargo-fuzz, and
//! `tests/fuzz_corpora.rs` replays their corpora as ordinary tests on stable
//! Rust. Each takes arbitrary bytes and must neither panic nor hang.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;

use crate::actors::ingest::{Ingest, SetRequest, WriteRequest, Writes};
use crate::backends::{Producer, WriteReply};
use crate::config::{Config, TargetConfig};
use crate::entry::{Entry, ShardRef};
use crate::sinks::mutation::{Mutation, row_of};

pub use crate::backends::fuzz::{dlq_letters, log_recovery};

/// A namespace whose targets route by key (HTTP) and by the payload's row
/// (Postgres, Redis, Memcached), so each way through ingest is reached.
const NAMESPACES: &str = r#"
[namespaces.keyed.backend]
type = "embedded"
[namespaces.keyed.target]
type = "http"
url = "http://127.0.0.1:9/"
[namespaces.keyed.delay]
jitter_ms = 10

[namespaces.rows.backend]
type = "embedded"
[namespaces.rows.targets.pg]
type = "postgres"
url = "postgres://u@127.0.0.1:9/db"
table = "t"
[namespaces.rows.targets.cache]
type = "memcached"
url = "memcache://127.0.0.1:9"
"#;

/// Ingest as it is built for a namespace, before anything is appended.
struct Harness {
    ingests: Vec<Ingest>,
    targets: Vec<TargetConfig>,
}

/// A producer that takes nothing: decoding ends before an append.
struct Nowhere;

impl Producer for Nowhere {
    fn append(&self, _: &ShardRef, _: Vec<(Entry, WriteReply)>) {}

    fn check_set(&self) -> Result<(), String> {
        Ok(())
    }
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let config = crate::config::from_toml(NAMESPACES).expect("the fuzz config parses");
        let store = Arc::new(crate::state::StateStore::open(&state_dir()).expect("a state store"));
        let writes = Writes {
            dedup: crate::state::DedupIndex::open(store).expect("a dedup index"),
            in_flight: Arc::new(tokio::sync::Semaphore::new(1)),
            ack_timeout: Duration::from_secs(1),
            per_shard: 1,
        };
        let ingests = config
            .namespaces
            .iter()
            .map(|(name, ns)| {
                let written: Arc<[crate::stats::Counter]> =
                    (0..ns.shards).map(|_| Default::default()).collect();
                Ingest::new(name, ns, Arc::new(Nowhere), written, &writes)
            })
            .collect();
        Harness {
            ingests,
            targets: targets(&config),
        }
    })
}

fn targets(config: &Config) -> Vec<TargetConfig> {
    let mut all: Vec<TargetConfig> = config
        .namespaces
        .values()
        .flat_map(|ns| ns.targets.iter().map(|t| t.config.clone()))
        .collect();
    all.push(TargetConfig::Redis {
        name: "redis".into(),
        url: "redis://127.0.0.1:9".into(),
        key_prefix: String::new(),
        timeout_ms: 1,
        ca_file: None,
    });
    all
}

/// `data` as the body of WriteToLog, of a batch and of a set of mutations,
/// decoded and checked by each namespace's ingest as the API does.
pub fn write_body(data: &[u8]) {
    let h = harness();
    let body = Bytes::copy_from_slice(data);
    for ingest in &h.ingests {
        if let Ok(req) = crate::api::write::parse::<WriteRequest>(&body, || "body".into()) {
            let _ = ingest.prepare(
                req,
                &body,
                Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                None,
            );
        }
        if let Ok(entries) = crate::api::write::decode_batch(&body) {
            for req in entries.into_iter().flatten() {
                let _ = ingest.prepare(req, &body, None, None);
            }
        }
        if let Ok(set) = crate::api::write::parse::<SetRequest>(&body, || "set".into()) {
            let _ = ingest.prepare_set(set, &body, None, None);
        }
    }
}

/// `data` as a mutation payload, parsed as the database targets parse it.
pub fn mutation_payload(data: &[u8]) {
    let _ = Mutation::from_payload(data);
    for target in &harness().targets {
        let _ = row_of(target, data);
    }
}

/// `data` as a TOML config file, loaded and validated.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = crate::config::from_toml(text) {
        let _ = crate::config::validate(&config);
    }
}

/// A directory for the harness's state store: one per process, left
/// behind (a fuzzer is killed, not stopped), and small.
fn state_dir() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("walden-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&path).expect("a temporary directory");
    path
}
