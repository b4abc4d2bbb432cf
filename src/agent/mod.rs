//! The agent: a long-running daemon on every host. It keeps one QUIC connection to each
//! peer (dialing, re-dialing with backoff, accepting), serves its regions to them, runs
//! pulls for its local users, and answers on a Unix control socket.

pub mod config;
mod control_server;
mod migrate;
mod mount;
mod peers;
mod publish;
mod pull;
mod replica;
mod replicate;
mod serve;

pub use config::{AgentConfig, ConfigError, Overrides, PeerSpec, ReplicationConfig};
pub use migrate::{Freeze, MigrateOptions, MigrateRunError};
pub use pull::{FetchError, Fetched, PullError, PullHandle};
pub use replicate::{ReplicateError, ReplicateOptions};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::{PeerStatus, RegionStatus, StatusReport};
use crate::proto::WireCode;
use crate::region::{FileRegion, RegionError};
use crate::transport::{self, EndpointError, Identity, IdentityError};

/// Starting the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen address does not resolve.
    #[error("cannot resolve listen address {addr:?}: {why}")]
    Listen { addr: String, why: String },
    /// Certificates could not be loaded.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The UDP endpoint could not be bound.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// A region could not be opened.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// A configured replication could not start.
    #[error("replication: {0}")]
    Replicate(String),
    /// The control socket could not be created.
    #[error("control socket {path}: {source}")]
    Control {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Refuses `r` when another region name in `regions` serves the same file.
fn refuse_served_twice(
    regions: &BTreeMap<String, Arc<FileRegion>>,
    name: &str,
    r: &FileRegion,
) -> Result<(), RegionError> {
    let id = r.file_id();
    match regions
        .iter()
        .find(|(n, o)| n.as_str() != name && id.is_some() && o.file_id() == id)
    {
        Some((other, _)) => Err(RegionError::AlreadyServed {
            path: r.path().into(),
            other: other.clone(),
        }),
        None => Ok(()),
    }
}

/// A running agent. Dropping it does not stop it: call [`Agent::shutdown`].
pub struct Agent {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    name: String,
    /// A random id for this start of the agent, sent in hellos: a peer tells a restart
    /// (new id) from a second connection of the same agent.
    boot: u64,
    config: AgentConfig,
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    peers: peers::PeerTable,
    regions: RwLock<BTreeMap<String, Arc<FileRegion>>>,
    transfers: Mutex<BTreeMap<u64, Arc<pull::PullInner>>>,
    mounts: Mutex<BTreeMap<u64, Arc<mount::Mount>>>,
    publications: replicate::Publications,
    replicas: replica::Replicas,
    migrations: migrate::Migrations,
    next_transfer: AtomicU64,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Agent {
    /// Loads certificates, opens regions, binds the endpoint and the control socket,
    /// and starts dialing peers. Returns as soon as it is listening.
    pub async fn start(config: AgentConfig) -> Result<Agent, StartError> {
        let id = Identity::load(&config.name, &config.ca, &config.cert, &config.key)?;
        let listen = resolve(&config.listen)
            .await
            .map_err(|why| StartError::Listen {
                addr: config.listen.clone(),
                why,
            })?;
        let mut regions = BTreeMap::new();
        for (name, path) in &config.regions {
            let r = FileRegion::open(name, path, config.chunk_size)?;
            refuse_served_twice(&regions, name, &r)?;
            regions.insert(name.clone(), Arc::new(r));
        }
        let endpoint = transport::endpoint(listen, &id, &config.tuning)?;
        let local_addr = endpoint.local_addr().map_err(|e| {
            StartError::Endpoint(EndpointError::Bind {
                addr: listen,
                source: e,
            })
        })?;
        let inner = Arc::new(Inner {
            name: config.name.clone(),
            boot: rand::random(),
            peers: peers::PeerTable::new(&config.peers),
            config,
            endpoint,
            local_addr,
            regions: RwLock::new(regions),
            transfers: Mutex::new(BTreeMap::new()),
            mounts: Mutex::new(BTreeMap::new()),
            publications: Default::default(),
            replicas: Default::default(),
            migrations: Default::default(),
            next_transfer: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        if let Some(path) = inner.config.control.clone() {
            let listener = control_server::bind(&path)
                .map_err(|source| StartError::Control { path, source })?;
            inner
                .tasks
                .spawn(control_server::run(inner.clone(), listener));
        }
        inner.tasks.spawn(peers::accept_loop(inner.clone()));
        for p in &inner.config.peers {
            inner
                .tasks
                .spawn(peers::dial_loop(inner.clone(), p.clone()));
        }
        for r in inner.config.replications.clone() {
            let started = (|| {
                let region = inner
                    .region(&r.region)
                    .ok_or_else(|| format!("no region {}", r.region))?;
                let tracker = replicate::file_tracker(&r.tracker, &region, r.scan_interval)
                    .map_err(|e| e.to_string())?;
                let opts = ReplicateOptions {
                    to: r.to.clone(),
                    interval: r.interval,
                    window: r.window,
                };
                replicate::start(&inner, &r.region, tracker, &opts).map_err(|e| e.to_string())
            })();
            if let Err(e) = started {
                inner
                    .endpoint
                    .close(WireCode::Shutdown.varint(), b"agent failed to start");
                inner.shutdown.cancel();
                if let Some(path) = &inner.config.control {
                    let _ = std::fs::remove_file(path);
                }
                return Err(StartError::Replicate(format!("region {}: {e}", r.region)));
            }
        }
        tracing::info!(
            name = %inner.name,
            listen = %local_addr,
            peers = inner.config.peers.len(),
            regions = inner.regions.read().map(|r| r.len()).unwrap_or(0),
            "agent started"
        );
        Ok(Agent { inner })
    }

    /// This agent's node name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The UDP address the agent listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Serves `path` as region `name` (replacing a region of that name).
    pub fn add_region(&self, name: &str, path: &std::path::Path) -> Result<(), RegionError> {
        let r = FileRegion::open(name, path, self.inner.config.chunk_size)?;
        if let Ok(mut regions) = self.inner.regions.write() {
            refuse_served_twice(&regions, name, &r)?;
            regions.insert(name.into(), Arc::new(r));
        }
        Ok(())
    }

    /// True when a live connection to `peer` exists.
    pub fn is_connected(&self, peer: &str) -> bool {
        self.inner.peers.current(peer).is_some()
    }

    /// Waits until `peer` is connected, up to `timeout`.
    pub async fn wait_connected(&self, peer: &str, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.inner.peers.wait(peer, &self.inner.shutdown))
            .await
            .map(|c| c.is_some())
            .unwrap_or(false)
    }

    /// Starts pulling `region` from `peer` into `to`.
    pub async fn pull(
        &self,
        peer: &str,
        region: &str,
        to: &std::path::Path,
    ) -> Result<PullHandle, PullError> {
        pull::start(self.inner.clone(), peer, region, to).await
    }

    /// Fetches one chunk of `region` from `peer` on the urgent lane, outside any pull.
    pub async fn fetch(&self, peer: &str, region: &str, chunk: u64) -> Result<Fetched, FetchError> {
        let conn = self
            .inner
            .peers
            .wait(peer, &self.inner.shutdown)
            .await
            .ok_or(FetchError::Shutdown)?;
        pull::fetch_chunk(&conn, region, chunk).await
    }

    /// Starts replicating `region` (served by this agent) to `opts.to` with `tracker`.
    pub fn replicate(
        &self,
        region: &str,
        tracker: Box<dyn crate::track::DirtyTracker>,
        opts: &ReplicateOptions,
    ) -> Result<(), ReplicateError> {
        replicate::start(&self.inner, region, tracker, opts).map(|_| ())
    }

    /// Starts replicating a file region with a file tracker (`inotify` or `hash-scan`).
    pub fn replicate_file(
        &self,
        region: &str,
        tracker: &str,
        scan_interval: Option<Duration>,
        opts: &ReplicateOptions,
    ) -> Result<(), ReplicateError> {
        let r = self
            .inner
            .region(region)
            .ok_or_else(|| ReplicateError::UnknownRegion(region.into()))?;
        let t = replicate::file_tracker(tracker, &r, scan_interval)?;
        self.replicate(region, t, opts)
    }

    /// On the owner: stops replicating `region`; every replica is told and keeps what it
    /// applied. Returns the replication's last status.
    pub async fn stop_replication(
        &self,
        region: &str,
    ) -> Result<crate::control::ReplicationStatus, ReplicateError> {
        self.inner
            .publications
            .stop_replication(region, replicate::STOPPED_BY_OPERATOR)
            .await
    }

    /// On the owner: makes an epoch of everything written so far and waits until every
    /// replica applied it.
    pub async fn flush(&self, region: &str, timeout: Duration) -> Result<u64, ReplicateError> {
        let p = self.inner.publications.get(region).ok_or_else(|| {
            ReplicateError::Conflict(format!("this agent does not replicate region {region:?}"))
        })?;
        p.flush(timeout).await
    }

    /// On a replica: the last epoch of `region` applied in full.
    pub fn replica_epoch(&self, region: &str) -> u64 {
        self.inner.replicas.entry(region).epoch()
    }

    /// On a replica: waits until epoch `n` of `region` is applied.
    pub async fn wait_epoch(&self, region: &str, n: u64) -> Result<u64, String> {
        self.inner.replicas.entry(region).wait_epoch(n).await
    }

    /// Live-migrates `region` (served by this agent) to `opts.to`, which serves a region
    /// of the same name and size; `progress` is called about every 100 ms.
    pub async fn migrate(
        &self,
        region: &str,
        opts: MigrateOptions,
        mut progress: impl FnMut(&crate::control::MigrationProgress),
    ) -> Result<crate::control::MigrationReport, MigrateRunError> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let run = migrate::source::run(self.inner.clone(), region, opts, Some(tx));
        tokio::pin!(run);
        loop {
            tokio::select! {
                r = &mut run => {
                    while let Ok(p) = rx.try_recv() {
                        progress(&p);
                    }
                    return r;
                }
                Some(p) = rx.recv() => progress(&p),
            }
        }
    }

    /// A snapshot of peers, regions and transfers.
    pub fn status(&self) -> StatusReport {
        self.inner.status()
    }

    /// Stops everything: closes peer connections (peers see SHUTDOWN), cancels transfers,
    /// removes the control socket, and waits for the tasks to end.
    pub async fn shutdown(self) {
        let inner = self.inner;
        tracing::info!(name = %inner.name, "agent shutting down");
        // Close first, so peers see SHUTDOWN rather than the implicit close that dropping
        // the last handle of a connection would send.
        inner
            .endpoint
            .close(WireCode::Shutdown.varint(), b"agent shutting down");
        inner.shutdown.cancel();
        inner.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), inner.tasks.wait()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), inner.endpoint.wait_idle()).await;
        if let Some(path) = &inner.config.control {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Inner {
    /// Largest first frame a peer may send on a stream: headers plus the want-bitmap of
    /// our largest region.
    fn request_cap(&self) -> usize {
        let bitmap = self
            .regions
            .read()
            .map(|r| {
                r.values()
                    .map(|r| r.geometry().chunks().div_ceil(8))
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        4096 + bitmap as usize
    }

    fn region(&self, name: &str) -> Option<Arc<FileRegion>> {
        self.regions.read().ok()?.get(name).cloned()
    }

    fn status(&self) -> StatusReport {
        let peers = self
            .config
            .peers
            .iter()
            .map(|p| {
                let s = self.peers.snapshot(&p.name);
                let path = s.conn.as_ref().map(|c| c.stats().path);
                PeerStatus {
                    name: p.name.clone(),
                    addr: p.addr.clone(),
                    connected: s.conn.is_some(),
                    rtt_us: s.conn.as_ref().map(|c| c.rtt().as_micros() as u64),
                    mtu: path.map(|p| p.current_mtu),
                    cwnd: path.map(|p| p.cwnd),
                    lost_packets: path.map(|p| p.lost_packets),
                    sent_packets: path.map(|p| p.sent_packets),
                    congestion_events: path.map(|p| p.congestion_events),
                    connected_for_s: s.since.map(|t| t.elapsed().as_secs_f64()),
                    silent_s: s.silent.map(|d| d.as_secs_f64()),
                    idle_timeout_s: Some(self.config.tuning.idle_timeout.as_secs_f64()),
                    keep_alive_s: Some(self.config.tuning.keep_alive.as_secs_f64()),
                    last_error: s.last_error,
                }
            })
            .collect();
        let regions = self
            .regions
            .read()
            .map(|r| {
                r.values()
                    .map(|r| RegionStatus {
                        name: r.name().into(),
                        path: r.path().into(),
                        size: r.geometry().size,
                        chunk_size: r.geometry().chunk_size,
                        chunks: r.geometry().chunks(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let transfers = self
            .transfers
            .lock()
            .map(|t| t.values().map(|p| p.status()).collect())
            .unwrap_or_default();
        let mounts = self
            .mounts
            .lock()
            .map(|m| m.values().map(|m| m.status()).collect())
            .unwrap_or_default();
        StatusReport {
            mounts,
            replications: self.publications.status(),
            replicas: self.replicas.status(),
            migrations: self.migrations.status(),
            name: self.name.clone(),
            version: crate::VERSION.into(),
            listen: self.local_addr.to_string(),
            peers,
            regions,
            transfers,
        }
    }
}

/// Resolves `HOST:PORT` to one address.
pub(crate) async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    let mut it = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| e.to_string())?;
    it.next().ok_or_else(|| "no address".to_string())
}

/// Turns a quinn connection error into a short reason for logs and status, naming our
/// application codes.
pub(crate) fn reason(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let code = WireCode::from_u64(c.error_code.into_inner())
                .map(|c| c.name().to_string())
                .unwrap_or_else(|| format!("code {}", c.error_code));
            format!(
                "closed by peer: {code} ({})",
                String::from_utf8_lossy(&c.reason)
            )
        }
        quinn::ConnectionError::LocallyClosed => "closed locally".into(),
        quinn::ConnectionError::TimedOut => "timed out (no answer from peer)".into(),
        other => other.to_string(),
    }
}
