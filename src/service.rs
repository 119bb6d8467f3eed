//! Wiring: config → embedded log → per-namespace actors → HTTP server, and
//! the graceful shutdown on SIGTERM or SIGINT: stop accepting, finish the
//! writes in flight, commit what was applied, close the log, exit 0.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix::{Arbiter, ArbiterHandle};
use actix_web::{App, HttpServer, web};
use tokio::sync::{Semaphore, oneshot};
use tracing::{error, info, warn};

use crate::actors::Stores;
use crate::actors::ingest::Writes;
use crate::actors::rebalance::{RebalanceStats, Rebalancer};
use crate::actors::replay::Replays;
use crate::actors::supervisor::{NamespaceRuntime, Parts};
use crate::api::{self, AppState};
use crate::backends::embedded::{EmbeddedDlq, EmbeddedLog, LogConfig, LogError};
use crate::backends::kafka::Membership;
use crate::backends::open::{self, Opened};
use crate::backends::shard::NamespaceBackend;
use crate::backends::{BackendError, Fatal};
use crate::config::{BackendConfig, Config, ServerConfig, TargetStart};
use crate::entry::{ShardRef, now_ms};
use crate::routing::RouteHash;
use crate::sinks::SinkError;
use crate::state::{DedupIndex, ParkStore, ReplayStore, StateStore};
use crate::tls::ServerCert;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("opening the embedded log in {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: LogError,
    },
    #[error("namespace `{namespace}`: `shards`: {message}")]
    ShardsChanged { namespace: String, message: String },
    #[error("namespace `{namespace}`: `routing.hash`: {message}")]
    RoutingChanged { namespace: String, message: String },
    #[error("namespace `{namespace}`: `target`: {source}")]
    Target {
        namespace: String,
        #[source]
        source: SinkError,
    },
    #[error("namespace `{namespace}`: `backend`: {source}")]
    Backend {
        namespace: String,
        #[source]
        source: BackendError,
    },
    #[error(transparent)]
    State(crate::state::StateError),
    /// A backend can no longer work (fenced out of its consumer group).
    #[error("{0}")]
    Fatal(String),
    #[error("server.tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("listening on {listen}: {source}")]
    Bind {
        listen: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How long a target's record of a set it is done with is kept.
const SETS_DONE_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);
/// A started service: its address, and what shutdown needs.
pub struct Service {
    pub addr: SocketAddr,
    server: actix_web::dev::ServerHandle,
    state: Arc<AppState>,
    /// The local log and DLQ, closed last.
    log: Arc<EmbeddedLog>,
    dlq: Arc<EmbeddedDlq>,
    arbiters: Vec<Arbiter>,
    /// Stops the rebalancer, and waits for a move under way.
    rebalancer: Option<(
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    )>,
    /// Why a backend can no longer work (fenced out of a group).
    fatal: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// The HTTPS certificate, which a SIGHUP reloads.
    cert: Option<Arc<ServerCert>>,
}

/// Start everything. Must run inside an actix `System`.
pub async fn start(mut config: Config) -> Result<Service, ServiceError> {
    // Certificates first: a bad file stops the start before anything opens.
    let tls = match &config.server.tls {
        Some(t) => {
            let cert = Arc::new(ServerCert::load(&t.cert, &t.key)?);
            let rustls = crate::tls::server_config(cert.clone(), t.client_ca.as_deref())?;
            Some((cert, rustls))
        }
        None => None,
    };
    let data_dir = config.server.data_dir.clone();
    let log_config = config
        .namespaces
        .values()
        .find_map(|ns| match &ns.backend {
            BackendConfig::Embedded(e) => Some(LogConfig::from_config(e)),
            _ => None,
        })
        .unwrap_or_default();
    let log = {
        let dir = data_dir.clone();
        tokio::task::spawn_blocking(move || EmbeddedLog::open(&dir, log_config))
            .await
            .expect("log open does not panic")
            .map_err(|source| ServiceError::Log {
                path: data_dir.clone(),
                source,
            })?
    };
    let log = Arc::new(log);
    check_layouts(&data_dir, &mut config, &log)?;
    subscribe_targets(&config, &log).map_err(|source| ServiceError::Log {
        path: data_dir.clone(),
        source,
    })?;

    let dlq = {
        let dir = data_dir.join("dlq");
        tokio::task::spawn_blocking(move || EmbeddedDlq::open(&dir))
            .await
            .expect("DLQ open does not panic")
            .map_err(|source| ServiceError::Log {
                path: data_dir.join("dlq"),
                source,
            })?
    };
    // One fjall database for Walden's own state: idempotency keys and parked
    // entries.
    let state_store =
        Arc::new(StateStore::open(&data_dir.join("state")).map_err(ServiceError::State)?);
    let park = ParkStore::open(state_store.clone()).map_err(ServiceError::State)?;
    let n = match config.server.arbiters {
        0 => std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .max(2),
        n => n,
    };
    let arbiters: Vec<Arbiter> = (0..n).map(|_| Arbiter::new()).collect();
    let handles: Vec<ArbiterHandle> = arbiters.iter().map(Arbiter::handle).collect();
    // Embedded namespaces keep their delayed entries in the same store.
    // Sets a target is done with are remembered for a week (they matter
    // only to a mutation delivered again after a crash).
    let sets_done = park.clone();
    actix::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tick.tick().await;
            let week_ago = crate::entry::now_ms().saturating_sub(SETS_DONE_KEPT.as_millis() as u64);
            if let Err(error) = sets_done.forget_sets(week_ago).await {
                warn!(%error, "Forgetting old sets failed.");
            }
        }
    });
    let replays_store =
        Arc::new(ReplayStore::open(state_store.clone()).map_err(ServiceError::State)?);
    let stores = Stores {
        delays: Arc::new(park.clone()),
        park,
        replays: replays_store.clone(),
    };
    let (fatal, fatal_rx) = Fatal::channel();
    // Kept in data_dir: it names this process in Kafka's groups and to the
    // Waldens it forwards to.
    config.server.instance_id = instance_id(&config.server)?;
    let membership = Membership {
        instance_id: uses_groups(&config).then(|| config.server.instance_id.clone()),
        fatal,
    };
    let writes = Writes {
        dedup: open_dedup(state_store.clone(), &data_dir, &config, &log).await?,
        in_flight: Arc::new(Semaphore::new(config.server.max_in_flight)),
        ack_timeout: config.server.ack_timeout(),
        per_shard: config.server.mailbox_capacity,
    };
    let mut namespaces = BTreeMap::new();
    for (name, ns) in &config.namespaces {
        let Opened {
            backend,
            dlq: ns_dlq,
            delays,
        } = open::namespace(name, ns, &config.server, &log, &dlq, &membership)
            .await
            .map_err(|source| ServiceError::Backend {
                namespace: name.clone(),
                source,
            })?;
        // A broker namespace's delays go to its tiers; the rest share fjall.
        let stores = Stores {
            park: stores.park.clone(),
            delays: delays.unwrap_or_else(|| stores.delays.clone()),
            replays: stores.replays.clone(),
        };
        let runtime = NamespaceRuntime::start(
            name,
            ns,
            &config.server,
            Parts {
                backend: &backend,
                dlq: &ns_dlq,
                stores: &stores,
            },
            &writes,
            &handles,
        )
        .map_err(|source| ServiceError::Target {
            namespace: name.clone(),
            source,
        })?;
        namespaces.insert(name.clone(), Arc::new(runtime));
    }
    let replays = Replays::new(replays_store, tokio::runtime::Handle::current());
    replays.resume(
        &namespaces,
        &(log.clone() as Arc<dyn crate::backends::ReplayLog>),
    );
    let positions = replays.store().clone();
    actix::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tick.tick().await;
            let p = positions.clone();
            let now = crate::entry::now_ms();
            if let Ok(Err(error)) = tokio::task::spawn_blocking(move || p.thin_positions(now)).await
            {
                warn!(%error, "Thinning the committed positions failed.");
            }
        }
    });
    let state = Arc::new(AppState {
        namespaces,
        log: log.clone(),
        server: config.server.clone(),
        state: state_store,
        replays,
        tokens: std::sync::RwLock::new(Arc::new(api::auth::Tokens::new(&config.server))),
        rebalance: Arc::new(RebalanceStats::default()),
    });
    // A producer-only process runs no shard actors worth moving.
    let rebalancer = (config.server.rebalance.enabled && config.server.role.applies()).then(|| {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let rebalancer = Rebalancer::new(
            config.server.rebalance.clone(),
            handles.clone(),
            state.namespaces.values().cloned().collect(),
            state.rebalance.clone(),
        );
        (stop, actix::spawn(rebalancer.run(stopped)))
    });

    let app_state = web::Data::from(state.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(app_state.clone())
            .wrap_fn(|req, srv| {
                use actix_web::dev::Service as _;
                use futures_util::FutureExt as _;
                match api::auth::admit(&req) {
                    Ok(caller) => {
                        if let Some(c) = caller {
                            actix_web::HttpMessage::extensions_mut(&req).insert(c);
                        }
                        srv.call(req)
                            .map(|r| r.map(|r| r.map_into_boxed_body()))
                            .boxed_local()
                    }
                    Err(e) => {
                        let denied =
                            req.into_response(actix_web::ResponseError::error_response(&e));
                        async move { Ok(denied) }.boxed_local()
                    }
                }
            })
            .configure(api::routes)
    })
    .disable_signals()
    .workers(http_workers(&config.server))
    .client_request_timeout(Duration::from_millis(config.server.request_head_timeout_ms))
    .max_connections(config.server.max_connections)
    .shutdown_timeout(config.server.shutdown_timeout_ms.div_ceil(1000));
    let (server, cert) = match tls {
        Some((cert, rustls)) => (
            server.bind_rustls_0_23(&config.server.listen, rustls),
            Some(cert),
        ),
        None => (server.bind(&config.server.listen), None),
    };
    let server = server.map_err(|source| ServiceError::Bind {
        listen: config.server.listen.clone(),
        source,
    })?;
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix::spawn(server);
    let scheme = match cert {
        Some(_) => "https",
        None => "http",
    };
    info!(%addr, scheme, data_dir = %data_dir.display(), "Walden is serving.");
    Ok(Service {
        addr,
        server: handle,
        state,
        log,
        dlq,
        arbiters,
        rebalancer,
        fatal: fatal_rx,
        cert,
    })
}

/// Whether this process joins consumer groups (it applies a Kafka
/// namespace) as a static member.
fn uses_groups(config: &Config) -> bool {
    config.server.static_membership
        && config.server.role.applies()
        && config
            .namespaces
            .values()
            .any(|ns| matches!(ns.backend.entries(), BackendConfig::Kafka(_)))
}

/// This process's stable `group.instance.id`: `server.instance_id`, or one
/// generated at first start and kept in `data_dir/instance-id`, so a
/// restarted process takes its partitions back at once.
fn instance_id(server: &ServerConfig) -> Result<String, ServiceError> {
    if !server.instance_id.is_empty() {
        return Ok(server.instance_id.clone());
    }
    let path = server.data_dir.join("instance-id");
    let io = |what| {
        let path = path.clone();
        move |source| ServiceError::Io { what, path, source }
    };
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("reading")(e)),
    }
    let id = format!("walden-{}", uuid::Uuid::now_v7().simple());
    // Written whole or not at all: a torn name would split the process in two.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &id).map_err(io("writing"))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io("fsyncing"))?;
    std::fs::rename(&tmp, &path).map_err(io("renaming"))?;
    std::fs::File::open(&server.data_dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsyncing the directory of"))?;
    info!(instance_id = %id, "Generated this process's group.instance.id.");
    Ok(id)
}

impl Service {
    /// Wait until a backend can no longer work; why.
    pub async fn fatal(&mut self) -> String {
        match self.fatal.recv().await {
            Some(why) => why,
            None => std::future::pending().await,
        }
    }

    /// Stop accepting, finish in-flight writes, commit progress, close the log.
    pub async fn shutdown(self) {
        info!("Shutting down: no new requests; finishing the writes in flight.");
        self.server.stop(true).await;
        if let Some((stop, running)) = self.rebalancer {
            let _ = stop.send(true);
            let _ = running.await;
        }
        // Replays stop where they are (they resume at the next start),
        // before the log they read closes.
        self.state.replays.pause_all(Duration::from_secs(5)).await;
        for ns in self.state.namespaces.values() {
            // Leaving a group revokes its partitions, and a revoke waits for
            // what is in flight with the appliers still running, then
            // commits. Without a group, the drain lets the delivery in
            // flight settle itself.
            let in_groups = ns.backend.in_groups();
            let settle = (!in_groups).then(|| self.state.server.shutdown_timeout());
            ns.drain(settle).await;
            if in_groups {
                let (backend, drain) = (ns.backend.clone(), ns.config.backend.rebalance_drain());
                let _ = tokio::task::spawn_blocking(move || backend.leave_groups(drain)).await;
            }
        }
        let (log, dlq) = (self.log.clone(), self.dlq.clone());
        let backends: Vec<_> = self
            .state
            .namespaces
            .values()
            .map(|ns| ns.backend.clone())
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            log.close();
            dlq.close();
            backends.iter().for_each(NamespaceBackend::close);
        })
        .await;
        for a in &self.arbiters {
            a.stop();
        }
        info!("Shutdown complete.");
    }
}

/// `server.http_workers`, with 0 meaning one per CPU core.
fn http_workers(server: &ServerConfig) -> usize {
    match server.http_workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Open the idempotency index, rebuild its window from the log, and purge
/// expired ids once a minute.
async fn open_dedup(
    store: Arc<StateStore>,
    data_dir: &Path,
    config: &Config,
    log: &Arc<EmbeddedLog>,
) -> Result<Arc<DedupIndex>, ServiceError> {
    let dedup = DedupIndex::open(store).map_err(ServiceError::State)?;
    let windows: Vec<(Vec<ShardRef>, Duration)> = config
        .namespaces
        .iter()
        // A broker namespace's index holds what this process accepted; it is
        // not rebuilt from the topic.
        .filter(|(_, ns)| {
            ns.dedup_window_ms > 0 && matches!(ns.backend, BackendConfig::Embedded(_))
        })
        .map(|(name, ns)| {
            let shards = (0..ns.shards)
                .map(|s| ShardRef::new(name.as_str(), s))
                .collect();
            (shards, Duration::from_millis(ns.dedup_window_ms))
        })
        .collect();
    let longest = windows.iter().map(|(_, w)| *w).max().unwrap_or_default();
    {
        let (dedup, log) = (dedup.clone(), log.clone());
        tokio::task::spawn_blocking(move || {
            let mut ids = 0;
            for (shards, window) in &windows {
                let since = now_ms().saturating_sub(window.as_millis() as u64);
                for shard in shards {
                    log.scan_since(shard, since, |records| {
                        ids += dedup.remember(shard, records.iter().map(|r| (r.offset, &*r.entry)));
                    })?;
                }
            }
            info!(ids, "Rebuilt the idempotency index from the log.");
            Ok::<_, LogError>(())
        })
        .await
        .expect("rebuild does not panic")
        .map_err(|source| ServiceError::Log {
            path: data_dir.to_path_buf(),
            source,
        })?;
    }
    if !longest.is_zero() {
        let dedup = dedup.clone();
        actix::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let d = dedup.clone();
                if let Ok(Err(error)) = tokio::task::spawn_blocking(move || d.purge(longest)).await
                {
                    warn!(%error, "Purging expired idempotency keys failed.");
                }
            }
        });
    }
    Ok(dedup)
}

/// Where the running config came from, so a SIGHUP can read it again.
pub struct ConfigSource {
    pub path: PathBuf,
    pub role: Option<crate::config::Role>,
}

/// Run until SIGTERM or SIGINT, or a fatal backend error, then shut down
/// gracefully; a fatal error is the result.
pub fn run(config: Config, source: Option<ConfigSource>) -> Result<(), ServiceError> {
    let system = actix::System::new();
    system.block_on(async move {
        // Listening before the server answers: a SIGHUP's default is to
        // end the process.
        let hup = source.and_then(|source| {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(hup) => Some((hup, source)),
                Err(error) => {
                    warn!(%error, "Cannot listen for SIGHUP; tokens reload only on a restart.");
                    None
                }
            }
        });
        let mut service = start(config).await?;
        if let Some((hup, source)) = hup {
            actix::spawn(reload_on_sighup(
                service.state.clone(),
                service.cert.clone(),
                hup,
                source,
            ));
        }
        let fatal = tokio::select! {
            () = wait_for_signal() => None,
            why = service.fatal() => Some(why),
        };
        service.shutdown().await;
        match fatal {
            Some(why) => Err(ServiceError::Fatal(why)),
            None => Ok(()),
        }
    })
}

/// On each SIGHUP, read the config file again and take its tokens, so a
/// token is revoked without a restart, and read the HTTPS certificate and
/// key again. A file that does not load or validate changes nothing, and
/// says why. Other settings need a restart.
async fn reload_on_sighup(
    state: Arc<AppState>,
    cert: Option<Arc<ServerCert>>,
    mut hup: tokio::signal::unix::Signal,
    source: ConfigSource,
) {
    while hup.recv().await.is_some() {
        let (path, role) = (source.path.clone(), source.role);
        let loaded = tokio::task::spawn_blocking(move || crate::config::load_as(&path, role))
            .await
            .expect("loading the config does not panic");
        match loaded {
            Ok(config) => {
                reload_cert(cert.as_deref(), &config);
                let tokens = Arc::new(api::auth::Tokens::new(&config.server));
                let n = tokens.len();
                *state.tokens.write().unwrap_or_else(|p| p.into_inner()) = tokens;
                info!(tokens = n, path = %source.path.display(), "SIGHUP: tokens reloaded.");
            }
            Err(error) => {
                error!(%error, path = %source.path.display(),
                    "SIGHUP: the config does not load; the tokens in use stay.");
            }
        }
    }
}

/// Take the certificate and key at the paths the config names now; if they
/// do not load, the pair in use stays.
fn reload_cert(cert: Option<&ServerCert>, config: &Config) {
    match (cert, &config.server.tls) {
        (Some(cert), Some(t)) => match cert.reload(&t.cert, &t.key) {
            Ok(()) => info!(cert = %t.cert.display(), "SIGHUP: TLS certificate reloaded."),
            Err(error) => error!(%error,
                "SIGHUP: the TLS certificate does not load; the one in use stays."),
        },
        (None, None) => {}
        (Some(_), None) | (None, Some(_)) => {
            warn!("SIGHUP: [server.tls] was added or removed; that takes a restart.")
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM received."),
                _ = tokio::signal::ctrl_c() => info!("SIGINT received."),
            }
        }
        Err(error) => {
            warn!(%error, "Cannot listen for SIGTERM; only SIGINT stops the service.");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A service running on its own thread, for tests and embedding.
pub struct Spawned {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spawned {
    /// Start a service on a new thread with its own actix `System`.
    pub fn start(config: Config) -> Result<Self, ServiceError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let system = actix::System::new();
            system.block_on(async move {
                match start(config).await {
                    Ok(service) => {
                        let _ = ready_tx.send(Ok(service.addr));
                        let _ = stop_rx.await;
                        service.shutdown().await;
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        });
        let addr = ready_rx.recv().expect("the service thread answers")?;
        Ok(Self {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Shut down gracefully and wait for it.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// How a namespace's keys map to shards, as `data_dir/namespaces.json`
/// records it. Files written before `hash` was recorded hold a bare shard
/// count: those namespaces routed with crc32c.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Layout {
    Routed { shards: u32, hash: RouteHash },
    Crc32c(u32),
}

impl Layout {
    fn shards(self) -> u32 {
        match self {
            Layout::Routed { shards, .. } | Layout::Crc32c(shards) => shards,
        }
    }

    fn hash(self) -> RouteHash {
        match self {
            Layout::Routed { hash, .. } => hash,
            Layout::Crc32c(_) => RouteHash::Crc32c,
        }
    }
}

/// A namespace's shard count and hash are fixed once it holds data: a key's
/// shard is its hash modulo the count, so changing either would move keys
/// between shards and lose their order. Fills in each namespace's
/// `routing.hash` from the record, and records new namespaces.
fn check_layouts(
    data_dir: &Path,
    config: &mut Config,
    log: &EmbeddedLog,
) -> Result<(), ServiceError> {
    let path = data_dir.join("namespaces.json");
    let mut known: BTreeMap<String, Layout> = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ServiceError::Io {
            what: "reading",
            path: path.clone(),
            source: std::io::Error::other(e),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(source) => {
            return Err(ServiceError::Io {
                what: "reading",
                path,
                source,
            });
        }
    };
    // Shards the log holds data for, in case the record was lost.
    let mut in_log: BTreeMap<String, u32> = BTreeMap::new();
    for (shard, _) in log.shards() {
        let n = in_log.entry(shard.namespace.to_string()).or_default();
        *n = (*n).max(shard.shard + 1);
    }
    let mut changed = false;
    for (name, ns) in config.namespaces.iter_mut() {
        let unordered = ns.ordering == crate::config::Ordering::None;
        let embedded = matches!(ns.backend, BackendConfig::Embedded(_));
        let shards_changed = |message: String| ServiceError::ShardsChanged {
            namespace: name.clone(),
            message,
        };
        let hash_changed = |message: String| ServiceError::RoutingChanged {
            namespace: name.clone(),
            message,
        };
        let layout = match known.get(name).copied() {
            // Unordered SQS queues may grow on the fly (Netflix's operators
            // add queues to a namespace's list): with no order to keep,
            // keys may move.
            Some(l)
                if ns.shards > l.shards()
                    && unordered
                    && matches!(ns.backend, BackendConfig::Sqs(_)) =>
            {
                Layout::Routed {
                    shards: ns.shards,
                    hash: ns.routing.hash.unwrap_or(l.hash()),
                }
            }
            Some(l) if l.shards() != ns.shards => {
                return Err(shards_changed(format!(
                    "the namespace holds data in {n} shards and cannot change to {}: keys would move \
                     between shards and lose their order. Keep shards = {n}, or write to a new namespace.",
                    ns.shards,
                    n = l.shards()
                )));
            }
            Some(l) => match ns.routing.hash {
                Some(h) if h != l.hash() && !unordered => {
                    return Err(hash_changed(format!(
                        "the namespace's keys were routed with {was} and cannot change to {h}: keys would \
                         move between shards and lose their order. Set routing.hash = \"{was}\", or write \
                         to a new namespace.",
                        was = l.hash()
                    )));
                }
                Some(h) => Layout::Routed {
                    shards: ns.shards,
                    hash: h,
                },
                // An embedded namespace keeps its hash: the record is the
                // only place it lives.
                None if embedded => Layout::Routed {
                    shards: ns.shards,
                    hash: l.hash(),
                },
                // On a broker every process must route alike, and this
                // record is one process's: the config must say.
                None if l.hash() != RouteHash::default() && !unordered => {
                    return Err(hash_changed(format!(
                        "the namespace routed keys with {was} before, and the default is now {new}. Set \
                         routing.hash = \"{was}\" in every process to keep keys where they are (or \
                         \"{new}\" to move them, with nothing in flight).",
                        was = l.hash(),
                        new = RouteHash::default()
                    )));
                }
                None => Layout::Routed {
                    shards: ns.shards,
                    hash: RouteHash::default(),
                },
            },
            None => {
                if let Some(&used) = in_log.get(name) {
                    if used > ns.shards {
                        return Err(shards_changed(format!(
                            "the log holds data in shard {} of this namespace, so shards must be at least {used}",
                            used - 1
                        )));
                    }
                    if ns.routing.hash.is_none() {
                        return Err(hash_changed(format!(
                            "the log holds data of this namespace, but {} does not say how its keys \
                             were routed. Set routing.hash (\"crc32c\" for data written before \
                             murmur2 became the default).",
                            path.display()
                        )));
                    }
                }
                Layout::Routed {
                    shards: ns.shards,
                    hash: ns.route_hash(),
                }
            }
        };
        ns.routing.hash = Some(layout.hash());
        if known.get(name) != Some(&layout) {
            known.insert(name.clone(), layout);
            changed = true;
        }
    }
    if changed {
        write_file_atomic(
            &path,
            &serde_json::to_vec_pretty(&known).expect("a map of layouts"),
        )?;
    }
    Ok(())
}

/// Each target of an embedded namespace reads the log under a group of its
/// own: a new one starts where its `start` says, and one no longer in the
/// config stops holding retention back, before anything is written.
fn subscribe_targets(config: &Config, log: &EmbeddedLog) -> Result<(), LogError> {
    for (name, ns) in &config.namespaces {
        if !matches!(ns.backend, BackendConfig::Embedded(_)) {
            continue;
        }
        let shards: Vec<ShardRef> = (0..ns.shards)
            .map(|i| ShardRef::new(name.as_str(), i))
            .collect();
        let namespace_group = ns.namespace_group(name);
        let mut groups = Vec::new();
        for t in &ns.targets {
            let group = t.group(&namespace_group);
            log.subscribe(&group, &shards, t.start == TargetStart::Latest)?;
            groups.push(group);
        }
        for group in log.groups() {
            let reads = log.committed(&group);
            if !groups.contains(&group) && shards.iter().any(|s| reads.contains_key(s)) {
                info!(namespace = %name, %group, "A target is no longer configured; releasing what the log kept for it.");
                log.unsubscribe(&group, &shards)?;
            }
        }
    }
    Ok(())
}

fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), ServiceError> {
    let io = |what, source| ServiceError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", e))?;
    std::io::Write::write_all(&mut f, bytes).map_err(|e| io("writing", e))?;
    f.sync_data().map_err(|e| io("syncing", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("renaming", e))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("syncing the directory of", e))?;
    }
    Ok(())
}
