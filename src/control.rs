//! The local control socket: how `pagewire pull`, `pagewire status` (and later the client
//! library) talk to their agent. One JSON object per line; a request is one line, the
//! answer is one or more lines (a pull streams `progress` events, then `done` or `error`).
//! The socket is created mode 0600: whoever can open it can drive the agent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest line either side accepts.
pub const MAX_LINE: usize = 1 << 20;

/// The control socket used when `--control` is not given: `$PAGEWIRE_CONTROL`, else
/// `$XDG_RUNTIME_DIR/pagewire.sock`, else `/tmp/pagewire-UID.sock`.
pub fn default_socket() -> PathBuf {
    if let Some(p) = std::env::var_os("PAGEWIRE_CONTROL") {
        return p.into();
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&d).join("pagewire.sock");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    PathBuf::from(format!("/tmp/pagewire-{uid}.sock"))
}

/// A request to the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    Status,
    Pull(PullArgs),
    /// Step one of a lazy attach (client library): the agent asks the peer for the
    /// region's geometry and answers [`ControlEvent::AttachInfo`].
    Attach(AttachArgs),
    /// Step two, sent with the mapping's descriptors attached (SCM_RIGHTS): the agent
    /// starts filling the mapping and answers [`ControlEvent::Mounted`], then streams
    /// progress, and [`ControlEvent::Complete`] or an error.
    AttachFds(AttachFds),
    /// Start replicating a region this agent serves to peers; answered once every replica
    /// has caught up ([`ControlEvent::Replicating`]), with progress meanwhile.
    Replicate(ReplicateArgs),
    /// On the owner: make an epoch of everything written so far and wait until every
    /// replica applied it ([`ControlEvent::Flushed`]).
    Flush {
        region: String,
        timeout_ms: u64,
    },
    /// On a replica: the last epoch applied, after waiting for `wait` if given
    /// ([`ControlEvent::Epoch`]).
    Epoch {
        region: String,
        wait: Option<u64>,
        timeout_ms: u64,
    },
    /// An application publishes a region it writes in memory (client library), with the
    /// memfd and the tracker's descriptors attached (SCM_RIGHTS): the memfd, then for
    /// `uffd-wp-async` the uffd and the process's pagemap, for `uffd-wp-sync` the uffd.
    /// Answered with [`ControlEvent::Published`]; the session lasts as long as the
    /// connection.
    Publish(PublishArgs),
    /// The application's answer to [`ControlEvent::Collect`] (mprotect tracker).
    Collected {
        ranges: Vec<(u64, u64)>,
        error: Option<String>,
    },
    /// The application's answer to [`ControlEvent::Hold`] (its writers are held) and to
    /// [`ControlEvent::Release`].
    Held {
        error: Option<String>,
    },
    /// An application on the destination receives a region being migrated here, with its
    /// memfd and a userfaultfd registered in MISSING mode over the mapping attached
    /// (SCM_RIGHTS). Answered with [`ControlEvent::Receiving`], then
    /// [`ControlEvent::Owner`] when the handover is accepted (the application may run:
    /// stale pages fault and are fetched from the source), [`ControlEvent::Received`] when
    /// every chunk is here, or an error if the migration is given up.
    Receive(ReceiveArgs),
    /// Live-migrate a region this agent serves to a peer: answered with
    /// [`ControlEvent::MigrateProgress`] lines, then [`ControlEvent::Migrated`] or an error.
    Migrate(MigrateArgs),
    /// On the destination, for a region that lives on a peer and is not served here:
    /// make a file of the peer region's size the target of its migration from that peer
    /// (`pagewire receive`). Answered with [`ControlEvent::ReceiveProgress`] lines, then
    /// [`ControlEvent::ReceivedFile`] once this agent owns the region and has every chunk,
    /// or an error. The target is withdrawn if the client goes away before a migration
    /// into it started.
    ReceiveFile(ReceiveFileArgs),
    /// On the owner: stop replicating `region` (`pagewire replicate --stop`). Every
    /// replica is told and keeps what it applied. Answered with
    /// [`ControlEvent::ReplicationStopped`].
    StopReplication {
        region: String,
    },
}

/// One event of a streamed request, as [`ControlClient::follow`] sorts it.
enum Streamed<P, R> {
    Progress(P),
    End(R),
    Other(Box<ControlEvent>),
}

/// `pagewire receive` arguments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceiveFileArgs {
    /// The peer the region is migrated from (its current owner).
    pub from: String,
    pub region: String,
    /// The file to receive it into: created (mode 0600) if absent; an existing regular
    /// file must be empty or exactly the region's size, and is overwritten.
    pub to: PathBuf,
    /// Give up (and withdraw the target) if no migration completed within this long.
    pub timeout_ms: Option<u64>,
}

/// A migration into a file on its destination (`pagewire receive`), for a progress
/// display.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReceiveProgress {
    pub region: String,
    pub from: String,
    /// `waiting` (no migration yet), then the destination engine's phase: `receiving`,
    /// `owner`, `complete`, or `aborted` (an attempt failed; its partial copy is not
    /// valid; the next attempt starts over).
    pub phase: String,
    pub size: u64,
    pub chunk_size: u32,
    /// Chunk frames received so far (re-sent chunks count again).
    pub chunks_received: u64,
    /// Chunks this agent holds a copy of in the current attempt (at most `chunks`; 0
    /// while waiting or after an aborted attempt): what progress is measured by.
    #[serde(default)]
    pub chunks_present: u64,
    pub chunks: u64,
    /// Attempts that failed so far.
    pub aborted_attempts: u32,
    pub elapsed_s: f64,
}

/// The end of `pagewire receive`: this agent owns the region and serves it from `path`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReceiveReport {
    pub region: String,
    pub from: String,
    pub path: PathBuf,
    pub size: u64,
    pub chunk_size: u32,
    /// Chunk frames received (re-sent chunks count again).
    pub chunks_received: u64,
    /// Chunks received that were already current here.
    pub duplicate_chunks: u64,
    pub aborted_attempts: u32,
    /// From the registration to the end, ms (includes the wait for the migration).
    pub elapsed_ms: f64,
}

/// The lowest `--max-bandwidth` a migration accepts, bits/s (1 Mbit/s: a 64 KiB chunk
/// every 0.5 s, a GiB in 2.4 hours). Below it a migration would look hung.
pub const MIN_MAX_BANDWIDTH_BPS: u64 = 1_000_000;

/// `pagewire migrate` arguments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateArgs {
    pub region: String,
    /// The destination peer (it serves a region of the same name and size).
    pub to: String,
    /// Downtime budget (freeze on the source to resume on the destination), ms.
    pub downtime_budget_ms: u64,
    /// Pre-copy rounds at most (round 0 is the full copy).
    pub max_rounds: u32,
    /// Pre-copy stops and the migration switches over after this long, ms.
    pub max_time_ms: u64,
    /// Freeze the writer by SIGSTOP of this process (SIGCONT on abort; it stays stopped
    /// after a successful migration). Without it, the freeze is the final snapshot.
    pub freeze_pid: Option<i32>,
    /// Freeze by write-protecting the region and holding its writers (memory an
    /// application published with the client library); they stay held after a
    /// successful migration.
    #[serde(default)]
    pub freeze_writes: bool,
    /// Leave chunks stale at the handover for post-copy (the destination must have an
    /// application receiving the region).
    #[serde(default)]
    pub postcopy: bool,
    /// Chunk data sent at most this many bits per second (None: no cap; at least
    /// [`MIN_MAX_BANDWIDTH_BPS`]).
    pub max_bandwidth_bps: Option<u64>,
    /// File regions: nothing writes the file through a shared mapping, so a pass over it
    /// is needed only after an inotify event (see `MigrateOptions::no_mmap_writers`).
    #[serde(default)]
    pub no_mmap_writers: bool,
}

/// A migration running on its source, for a progress display.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MigrationProgress {
    pub region: String,
    pub to: String,
    /// `precopy`, `freezing`, `final-sync`, `handing-over`, `postcopy`, `released`,
    /// `aborted`, or `in-doubt` (link lost during the handover; waiting for the peer).
    pub phase: String,
    /// Pre-copy rounds completed.
    pub round: u32,
    /// Bytes dirtied per second in the last round.
    pub dirty_rate_bps: f64,
    /// Delivered bandwidth (from acknowledgements), bytes per second.
    pub bandwidth_bps: f64,
    /// Predicted downtime if the source switched over now.
    pub expected_downtime_ms: Option<f64>,
    /// Bytes the destination does not have current.
    pub remaining_bytes: u64,
    pub bytes_sent: u64,
    pub elapsed_ms: f64,
}

/// The end of a migration, as its source saw it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MigrationReport {
    pub region: String,
    pub to: String,
    /// `migrated`, `link-lost`, `handover-refused` or `destination-lost`.
    pub outcome: String,
    pub size: u64,
    pub total_ms: f64,
    pub precopy_ms: f64,
    /// Freeze on the source to resume on the destination.
    pub downtime_ms: f64,
    /// The most `downtime_ms` can be off by when the destination's resume was placed
    /// with its clock (half a clock sample's round trip plus drift; the figure itself
    /// assumes both directions take equal time); `null` when it is an estimate from
    /// the source's own stamps (no clock sample, or the handover ended after a cut).
    #[serde(default)]
    pub downtime_error_ms: Option<f64>,
    pub postcopy_ms: f64,
    pub bytes_sent: u64,
    pub bytes_acked: u64,
    pub rounds: u32,
    /// Chunks the destination fetched on demand (0: this slice finishes the copy before
    /// handover).
    pub postcopy_faults: u64,
    pub deferred_chunks: u64,
    pub bandwidth_bps: f64,
    pub rtt_ms: f64,
    /// How the writer was frozen: `snapshot`, `pid N` or `hook`.
    pub freeze: String,
    /// How changes were found: the published region's tracker (`uffd-wp-async`, ...) or
    /// `xxh3 chunk hashes` (file regions).
    #[serde(default)]
    pub dirty_tracking: String,
    /// Full passes over the file to find what changed (file regions; the baseline's
    /// included; 0 with a kernel tracker).
    #[serde(default)]
    pub hash_passes: u64,
    /// Times the copy started over because its connection to the destination was
    /// replaced during pre-copy (both agents dialed each other at once).
    #[serde(default)]
    pub restarts: u32,
}

impl MigrationReport {
    /// The downtime for people: `12.3 ms (± 0.2 ms worst case)`, or `(estimated)`
    /// without a bound.
    pub fn downtime_text(&self) -> String {
        match self.downtime_error_ms {
            Some(e) => format!("{:.1} ms (± {e:.1} ms worst case)", self.downtime_ms),
            None => format!("{:.1} ms (estimated)", self.downtime_ms),
        }
    }
}

/// A region's migration state on this agent, in `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MigrationStatus {
    pub region: String,
    /// `source` or `destination`.
    pub role: String,
    pub peer: String,
    /// The engine's phase (`precopy` ... `released` on a source; `receiving`, `owner`,
    /// `complete`, `aborted` on a destination).
    pub phase: String,
    /// Whether this agent holds the region's ownership token (its copy may be written).
    pub owner: bool,
    pub generation: u64,
}

/// A region published by an application.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublishArgs {
    pub region: String,
    pub size: u64,
    /// Where the application mapped it, and the mapping's length (page-rounded).
    pub base: u64,
    pub map_len: u64,
    /// `uffd-wp-async`, `uffd-wp-sync` or `mprotect`.
    pub tracker: String,
    pub to: Vec<String>,
    pub interval_ms: u64,
}

/// `client::receive` arguments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceiveArgs {
    pub region: String,
    pub size: u64,
    /// Where the application mapped it, and the mapping's length (page-rounded).
    pub base: u64,
    pub map_len: u64,
}

/// `pagewire replicate` arguments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicateArgs {
    pub region: String,
    /// Replica peers.
    pub to: Vec<String>,
    /// `inotify` (default for files) or `hash-scan`.
    pub tracker: Option<String>,
    /// How often changes are collected, ms.
    pub interval_ms: Option<u64>,
    /// With `inotify`: also hash-scan the whole file this often, ms (sees writes through
    /// mmaps of processes that did not attach; 0 = never).
    pub scan_interval_ms: Option<u64>,
    /// Most bytes queued for one replica before it is cut loose and caught up by hash.
    pub window: Option<u64>,
}

/// One replicated region on its owner, in `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplicationStatus {
    pub region: String,
    pub tracker: String,
    /// The last epoch produced.
    pub epoch: u64,
    pub interval_ms: u64,
    /// Why collecting the region's changes fails (replicas get nothing new meanwhile).
    #[serde(default)]
    pub error: Option<String>,
    /// Most bytes queued for one replica before it is cut loose and caught up by hash.
    #[serde(default)]
    pub window: u64,
    /// The inotify tracker's periodic hash scan, ms (`None`: none).
    #[serde(default)]
    pub scan_interval_ms: Option<u64>,
    /// Why the replication ended (stopped by an operator, or the region was migrated
    /// away): the replicas were told and keep what they applied; `None` while it runs.
    #[serde(default)]
    pub ended: Option<String>,
    pub replicas: Vec<ReplicaLinkStatus>,
}

/// One replica of a replicated region, as its owner sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplicaLinkStatus {
    pub peer: String,
    pub connected: bool,
    /// The last epoch the replica acknowledged.
    pub acked_epoch: u64,
    /// Bytes produced for it and not yet acknowledged.
    pub lag_bytes: u64,
    /// Age of the oldest unacknowledged epoch.
    pub lag_ms: f64,
    /// Payload bytes sent to it (epochs and catch-ups).
    pub bytes_sent: u64,
    /// Catch-ups by hash comparison (one per session; more when it fell behind).
    pub catch_ups: u64,
    pub catch_up_bytes: u64,
    pub last_error: Option<String>,
    /// The replica answered the last attempt with a refusal (no such region, another
    /// size): waiting will not bring it; the owner retries in the background.
    #[serde(default)]
    pub refused: bool,
    /// The replica applied this session's catch-up (its copy equals the owner's as of
    /// then); false while the catch-up is on its way.
    #[serde(default)]
    pub caught_up: bool,
    /// After the replication ended: the replica confirmed it was told (a replica that was
    /// down or did not answer in time keeps its copy but does not know it ended).
    #[serde(default)]
    pub told_end: bool,
    /// Time from an epoch's collection to the replica's acknowledgement (newest 4096
    /// epochs): what a write waits beyond the collection interval.
    pub apply_p50_ms: Option<f64>,
    pub apply_p99_ms: Option<f64>,
}

/// A region this agent holds as a replica, in `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplicaStatus {
    pub region: String,
    pub owner: String,
    pub connected: bool,
    /// The last epoch applied in full.
    pub epoch: u64,
    pub bytes_applied: u64,
    pub last_update_s_ago: Option<f64>,
    /// The owner ended the replication, and why (the region was migrated away, or an
    /// operator stopped it): nothing more comes from that owner.
    #[serde(default)]
    pub ended: Option<String>,
}

/// Which region to attach lazily.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachArgs {
    /// The peer that has the region.
    pub from: String,
    /// The region's name on that peer.
    pub region: String,
    /// The mechanism the application wants (`auto` lets the agent's config decide).
    #[serde(default)]
    pub mechanism: crate::fault::Mechanism,
    /// The file the application will map (`pagewire mount --to`), if not a memfd: the
    /// agent refuses one it serves or a running pull or mount writes, before the
    /// application creates (and truncates) it.
    #[serde(default)]
    pub backing: Option<std::path::PathBuf>,
}

/// The mapping the application made. Descriptors, in order: the backing file (memfd or
/// tmpfs/disk file), then for `userfaultfd` the registered uffd, for `mprotect` the chunk
/// table memfd and the request socket (seqpacket).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachFds {
    /// Start of the mapping in the application's address space.
    pub base: u64,
    /// Length of the mapping (the region size rounded up to a page).
    pub map_len: u64,
    /// `userfaultfd` or `mprotect`.
    pub mechanism: crate::fault::Mechanism,
    /// What to call the mapping in status and logs (a path, or `memfd`).
    pub label: String,
}

/// The agent's answer to [`ControlRequest::Attach`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttachInfo {
    pub size: u64,
    pub chunk_size: u32,
    /// The agent's configured mechanism (`auto` leaves the choice to the application).
    pub mechanism: crate::fault::Mechanism,
    /// How long a fault waits for an unreachable peer before the faulting thread gets
    /// SIGBUS.
    pub fault_timeout_ms: u64,
}

/// One lazy mount (an attached application's mapping), in `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MountStatus {
    pub id: u64,
    pub peer: String,
    pub region: String,
    /// The mapping's label (backing path or `memfd`).
    pub label: String,
    /// The application's process id (from the control socket's credentials).
    pub pid: Option<i32>,
    /// `userfaultfd` or `mprotect`.
    pub mechanism: String,
    /// `filling`, `complete` (every chunk here; uffd unregistered, the mapping runs at
    /// native speed), `failed`, `detached`.
    pub state: String,
    pub chunks_present: u64,
    pub chunks_total: u64,
    pub bytes_present: u64,
    pub bytes_total: u64,
    /// Faults the agent served (uffd fault events, or mprotect requests).
    pub faults: u64,
    /// Faults that gave up (timeout): those threads got SIGBUS.
    pub faults_failed: u64,
    /// Fault latency, from the agent reading the fault to the chunk installed.
    pub fault_p50_us: Option<u64>,
    pub fault_p99_us: Option<u64>,
    /// Background copy rate since the start, bytes per second.
    pub background_rate_bps: f64,
    pub elapsed_s: f64,
}

/// `pagewire pull` arguments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PullArgs {
    /// The peer to pull from.
    pub from: String,
    /// The region's name on that peer.
    pub region: String,
    /// Where to write it (created or truncated).
    pub to: PathBuf,
}

/// One line from the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ControlEvent {
    Status(StatusReport),
    Progress(TransferStatus),
    Done(PullSummary),
    Error {
        message: String,
    },
    AttachInfo(AttachInfo),
    Mounted {
        id: u64,
    },
    MountProgress(MountStatus),
    Complete(MountStatus),
    ReplicateProgress(ReplicationStatus),
    Replicating(ReplicationStatus),
    Flushed {
        epoch: u64,
    },
    Epoch {
        epoch: u64,
    },
    Published {
        chunk_size: u32,
    },
    /// To a publishing application with the mprotect tracker: collect now and answer
    /// [`ControlRequest::Collected`].
    Collect,
    /// To a publishing application whose tracker cannot hold writers in the agent
    /// (uffd-wp-async, mprotect): hold every writer of the region (a migration's freeze
    /// by write-protection, [`crate::fault::hold`]) and answer [`ControlRequest::Held`]
    /// once no store can land.
    Hold,
    /// To a publishing application: let the writers held by [`ControlEvent::Hold`] go
    /// (the migration was aborted); answered with [`ControlRequest::Held`].
    Release,
    MigrateProgress(MigrationProgress),
    Migrated(MigrationReport),
    /// To a receiving application: registered; waiting for a migration.
    Receiving {
        chunk_size: u32,
    },
    /// To a receiving application: this host owns the region now; run.
    Owner {
        /// Chunks still to come from the source (fetched on demand or in the background).
        stale_chunks: u64,
    },
    /// To a receiving application: every chunk is here; the mapping runs at native speed.
    Received,
    ReceiveProgress(ReceiveProgress),
    ReceivedFile(ReceiveReport),
    /// The replication's last status, after [`ControlRequest::StopReplication`].
    ReplicationStopped(ReplicationStatus),
    /// A migration ended without moving the region: `outcome` as in
    /// [`MigrationReport`] (`refused`, `link-lost`, `cancelled`, ...; `failed` when it
    /// could not start), and why.
    MigrateFailed {
        outcome: String,
        message: String,
    },
}

/// `pagewire status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub name: String,
    pub version: String,
    pub listen: String,
    pub peers: Vec<PeerStatus>,
    pub regions: Vec<RegionStatus>,
    pub transfers: Vec<TransferStatus>,
    #[serde(default)]
    pub mounts: Vec<MountStatus>,
    /// Regions this agent owns and replicates.
    #[serde(default)]
    pub replications: Vec<ReplicationStatus>,
    /// Regions this agent holds as a replica.
    #[serde(default)]
    pub replicas: Vec<ReplicaStatus>,
    /// Regions migrated from or to this agent (since it started).
    #[serde(default)]
    pub migrations: Vec<MigrationStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub name: String,
    pub addr: String,
    pub connected: bool,
    /// Smoothed round-trip time, when connected.
    pub rtt_us: Option<u64>,
    /// Current path MTU (UDP payload bytes), when connected.
    #[serde(default)]
    pub mtu: Option<u16>,
    /// The current connection's congestion window (bytes), when connected.
    #[serde(default)]
    pub cwnd: Option<u64>,
    /// Packets the current connection declared lost (and re-sent what they carried).
    #[serde(default)]
    pub lost_packets: Option<u64>,
    /// Packets the current connection sent.
    #[serde(default)]
    pub sent_packets: Option<u64>,
    /// Times the current connection's congestion controller backed off.
    #[serde(default)]
    pub congestion_events: Option<u64>,
    /// Seconds since the current connection was made.
    pub connected_for_s: Option<f64>,
    /// Seconds since anything was received on the current connection (sampled every
    /// 250 ms; keep-alives make it small on a healthy link). A peer that vanished without
    /// closing stays `connected` until the idle timeout, with this growing.
    #[serde(default)]
    pub silent_s: Option<f64>,
    /// This agent's idle timeout: a connection silent this long is dropped (or sooner,
    /// if the peer's is shorter: QUIC takes the smaller of the two).
    #[serde(default)]
    pub idle_timeout_s: Option<f64>,
    /// This agent's keep-alive interval: a live peer is heard from about this often.
    #[serde(default)]
    pub keep_alive_s: Option<f64>,
    /// Why the last connection attempt or connection ended.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RegionStatus {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub chunk_size: u32,
    pub chunks: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TransferStatus {
    pub id: u64,
    pub kind: String,
    pub peer: String,
    pub region: String,
    pub to: PathBuf,
    /// `connecting`, `copying`, `waiting for peer`, `done`, `failed`.
    pub state: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub chunks_done: u64,
    pub chunks_total: u64,
    /// Data bytes that crossed the wire (zero chunks are not counted).
    pub wire_bytes: u64,
    /// Average rate since the start, bytes of region per second.
    pub rate_bps: f64,
    pub elapsed_s: f64,
    pub urgent_fetches: u64,
    pub reconnects: u64,
    /// Why a `failed` transfer failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// The end of a pull.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PullSummary {
    pub peer: String,
    pub region: String,
    pub to: PathBuf,
    pub size: u64,
    pub chunk_size: u32,
    pub chunks: u64,
    pub data_chunks: u64,
    pub zero_chunks: u64,
    pub wire_bytes: u64,
    pub duplicate_chunks: u64,
    pub urgent_fetches: u64,
    pub reconnects: u64,
    pub elapsed_s: f64,
    pub rate_bps: f64,
}

/// Talking to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be reached.
    #[error("cannot reach the agent at {path}: {source} (is `pagewire agent` running with --control {path}?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The connection failed mid-way.
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    /// The agent sent something that is not a control event.
    #[error("bad answer from the agent: {0}")]
    Protocol(String),
    /// The agent reported an error.
    #[error("{0}")]
    Agent(String),
    /// A migration ended without moving the region ([`ControlEvent::MigrateFailed`]).
    #[error("{message}")]
    Migration { outcome: String, message: String },
}

/// The error for an answer that is not the `expected` event: the agent may have gone
/// away (closed the connection) rather than said something wrong.
fn unexpected(expected: &str, got: Option<ControlEvent>) -> ControlError {
    match got {
        None => ControlError::Agent(
            "the agent closed the control connection before answering (did it stop?)".into(),
        ),
        Some(other) => ControlError::Protocol(format!("expected {expected}, got {other:?}")),
    }
}

/// A connection to the local agent.
pub struct ControlClient {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl ControlClient {
    /// Connects to the agent's control socket.
    pub async fn connect(path: &Path) -> Result<ControlClient, ControlError> {
        let s = UnixStream::connect(path)
            .await
            .map_err(|source| ControlError::Connect {
                path: path.into(),
                source,
            })?;
        let (r, w) = s.into_split();
        Ok(ControlClient {
            reader: BufReader::new(r),
            writer: w,
        })
    }

    async fn send(&mut self, req: &ControlRequest) -> Result<(), ControlError> {
        let mut line =
            serde_json::to_vec(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        Ok(())
    }

    /// The next event; `None` when the agent closed the connection.
    pub async fn next_event(&mut self) -> Result<Option<ControlEvent>, ControlError> {
        match read_line(&mut self.reader).await? {
            None => Ok(None),
            Some(line) => serde_json::from_slice(&line)
                .map(Some)
                .map_err(|e| ControlError::Protocol(e.to_string())),
        }
    }

    /// Asks for the agent's status.
    pub async fn status(mut self) -> Result<StatusReport, ControlError> {
        self.send(&ControlRequest::Status).await?;
        match self.next_event().await? {
            Some(ControlEvent::Status(s)) => Ok(s),
            Some(ControlEvent::Error { message }) => Err(ControlError::Agent(message)),
            other => Err(unexpected("status", other)),
        }
    }

    /// Reads the events of a streamed request (pull, replicate, migrate, receive) until
    /// its end: `classify` names its progress and end events; an `Error` event, any other
    /// event, or the connection closing (`closed` says so) ends it with an error.
    async fn follow<P, R>(
        &mut self,
        closed: &str,
        mut progress: impl FnMut(&P),
        classify: impl Fn(ControlEvent) -> Streamed<P, R>,
    ) -> Result<R, ControlError> {
        loop {
            match self.next_event().await? {
                Some(ControlEvent::Error { message }) => return Err(ControlError::Agent(message)),
                Some(ev) => match classify(ev) {
                    Streamed::Progress(p) => progress(&p),
                    Streamed::End(r) => return Ok(r),
                    Streamed::Other(other) => {
                        return Err(ControlError::Protocol(format!("unexpected {other:?}")))
                    }
                },
                None => return Err(ControlError::Protocol(closed.into())),
            }
        }
    }

    /// Starts a pull; call [`next_event`](Self::next_event) for progress and the result.
    pub async fn start_pull(&mut self, args: PullArgs) -> Result<(), ControlError> {
        self.send(&ControlRequest::Pull(args)).await
    }

    /// Runs a pull to its end, calling `progress` on each progress event.
    pub async fn pull(
        mut self,
        args: PullArgs,
        progress: impl FnMut(&TransferStatus),
    ) -> Result<PullSummary, ControlError> {
        self.start_pull(args).await?;
        self.follow(
            "the agent closed the connection before the pull ended",
            progress,
            |ev| match ev {
                ControlEvent::Progress(p) => Streamed::Progress(p),
                ControlEvent::Done(r) => Streamed::End(r),
                other => Streamed::Other(Box::new(other)),
            },
        )
        .await
    }
}

impl ControlClient {
    /// Starts a replication; calls `progress` until every replica caught up.
    pub async fn replicate(
        mut self,
        args: ReplicateArgs,
        progress: impl FnMut(&ReplicationStatus),
    ) -> Result<ReplicationStatus, ControlError> {
        self.send(&ControlRequest::Replicate(args)).await?;
        self.follow("the agent closed the connection", progress, |ev| match ev {
            ControlEvent::ReplicateProgress(p) => Streamed::Progress(p),
            ControlEvent::Replicating(r) => Streamed::End(r),
            other => Streamed::Other(Box::new(other)),
        })
        .await
    }

    /// Flushes a replicated region; returns the epoch every replica applied.
    pub async fn flush(mut self, region: &str, timeout: Duration) -> Result<u64, ControlError> {
        self.send(&ControlRequest::Flush {
            region: region.into(),
            timeout_ms: timeout.as_millis() as u64,
        })
        .await?;
        match self.next_event().await? {
            Some(ControlEvent::Flushed { epoch }) => Ok(epoch),
            Some(ControlEvent::Error { message }) => Err(ControlError::Agent(message)),
            other => Err(unexpected("flushed", other)),
        }
    }

    /// On the owner: stops replicating `region`; returns the replication's last status.
    pub async fn stop_replication(
        mut self,
        region: &str,
    ) -> Result<ReplicationStatus, ControlError> {
        self.send(&ControlRequest::StopReplication {
            region: region.into(),
        })
        .await?;
        match self.next_event().await? {
            Some(ControlEvent::ReplicationStopped(st)) => Ok(st),
            Some(ControlEvent::Error { message }) => Err(ControlError::Agent(message)),
            other => Err(unexpected("replication_stopped", other)),
        }
    }

    /// A replica's applied epoch of `region`, after waiting for `wait` if given.
    pub async fn epoch(
        mut self,
        region: &str,
        wait: Option<u64>,
        timeout: Duration,
    ) -> Result<u64, ControlError> {
        self.send(&ControlRequest::Epoch {
            region: region.into(),
            wait,
            timeout_ms: timeout.as_millis() as u64,
        })
        .await?;
        match self.next_event().await? {
            Some(ControlEvent::Epoch { epoch }) => Ok(epoch),
            Some(ControlEvent::Error { message }) => Err(ControlError::Agent(message)),
            other => Err(unexpected("epoch", other)),
        }
    }
}

impl ControlClient {
    /// Runs a migration to its end, calling `progress` on each progress event.
    pub async fn migrate(
        mut self,
        args: MigrateArgs,
        progress: impl FnMut(&MigrationProgress),
    ) -> Result<MigrationReport, ControlError> {
        self.send(&ControlRequest::Migrate(args)).await?;
        self.follow(
            "the agent closed the connection before the migration ended",
            progress,
            |ev| match ev {
                ControlEvent::MigrateProgress(p) => Streamed::Progress(p),
                ControlEvent::Migrated(r) => Streamed::End(Ok(r)),
                ControlEvent::MigrateFailed { outcome, message } => {
                    Streamed::End(Err(ControlError::Migration { outcome, message }))
                }
                other => Streamed::Other(Box::new(other)),
            },
        )
        .await?
    }

    /// `pagewire receive`: waits until the local agent owns `args.region`, migrated into
    /// `args.to` from `args.from`, calling `progress` meanwhile.
    pub async fn receive_file(
        mut self,
        args: ReceiveFileArgs,
        progress: impl FnMut(&ReceiveProgress),
    ) -> Result<ReceiveReport, ControlError> {
        self.send(&ControlRequest::ReceiveFile(args)).await?;
        self.follow(
            "the agent closed the connection before the region was received",
            progress,
            |ev| match ev {
                ControlEvent::ReceiveProgress(p) => Streamed::Progress(p),
                ControlEvent::ReceivedFile(r) => Streamed::End(r),
                other => Streamed::Other(Box::new(other)),
            },
        )
        .await
    }
}

/// Reads one `\n`-terminated line of at most [`MAX_LINE`] bytes.
pub async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> Result<Option<Vec<u8>>, std::io::Error> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return if line.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if line.len() > MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "control line too long",
            ));
        }
        if done {
            line.pop();
            return Ok(Some(line));
        }
    }
}

/// How often a pull reports progress on the control socket.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);
