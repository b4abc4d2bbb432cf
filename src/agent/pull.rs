//! Pulls: copy a whole region from a peer into a local file, in the background, while
//! urgent fetches of single chunks go ahead of it. Survives dropped connections: when the
//! peer is back, a new bulk stream asks for exactly the chunks not yet verified.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::serve::URGENT_PRIORITY;
use super::{reason, Inner};
use crate::control::{PullSummary, TransferStatus};
use crate::engine::pull::{PullState, TransferError, UrgentStart};
use crate::proto::codec::{read_exact, read_frame, write_frame, FrameError};
use crate::proto::{valid_name, BulkControl, ErrorReply, Reply, Request, WireCode, MAX_CHUNK_SIZE};
use crate::region::{DestFile, Geometry, GeometryError, RegionError};

/// Cap on reply frames (headers and error messages; chunk bytes are read separately).
const REPLY_CAP: usize = 4096;
/// Finished transfers kept for `status`.
const KEEP_FINISHED: usize = 16;
/// How long past two round trips an urgent fetch waits for a chunk the bulk stream is
/// already delivering before asking for it on the urgent lane.
const BULK_WAIT_SLACK: Duration = Duration::from_millis(1);
/// Paths with a min RTT up to this are local: see [`urgent_pause`].
const LOCAL_RTT: Duration = Duration::from_millis(1);

/// A pull could not start or failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The peer is not in this agent's peer list.
    #[error("{0:?} is not a peer of this agent (start it with --peer {0}=HOST:PORT)")]
    UnknownPeer(String),
    /// The region name is not valid.
    #[error("invalid region name {0:?}")]
    BadName(String),
    /// The peer was not connected within the wait time.
    #[error("peer {peer:?} is not connected after {waited:?}: {last_error}")]
    PeerUnavailable {
        peer: String,
        waited: Duration,
        last_error: String,
    },
    /// The peer answered with an error.
    #[error("peer {peer:?}: {}: {}", .reply.kind, .reply.message)]
    Remote { peer: String, reply: ErrorReply },
    /// The peer's region cannot be pulled (size or chunk size out of our limits).
    #[error("peer's region does not fit: {0}")]
    Geometry(#[from] GeometryError),
    /// The peer's region changed size or chunk size between connections.
    #[error("the region changed on the peer between connections ({0}); start the pull again")]
    RegionChanged(String),
    /// The peer sent data that breaks the protocol.
    #[error("protocol error from peer: {0}")]
    Protocol(String),
    /// A chunk did not match its blake3 hash.
    #[error("chunk {0} failed blake3 verification")]
    HashMismatch(u64),
    /// The destination file could not be written.
    #[error(transparent)]
    Dest(#[from] RegionError),
    /// The destination is a region this agent serves, or another pull's destination;
    /// truncating it would destroy data.
    #[error("refusing to write {0}: {1}")]
    DestInUse(PathBuf, &'static str),
    /// The pull was cancelled.
    #[error("pull cancelled")]
    Cancelled,
    /// The agent is shutting down.
    #[error("agent shutting down")]
    Shutdown,
}

/// An urgent fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The agent is shutting down (or the pull was cancelled).
    #[error("agent shutting down or pull cancelled")]
    Shutdown,
    /// The connection failed during the fetch.
    #[error("connection: {0}")]
    Connection(String),
    /// The peer answered with an error.
    #[error("{}: {}", .0.kind, .0.message)]
    Remote(ErrorReply),
    /// The peer's answer broke the protocol.
    #[error("protocol error from peer: {0}")]
    Protocol(String),
    /// The chunk did not match its blake3 hash.
    #[error("chunk {0} failed blake3 verification")]
    HashMismatch(u64),
    /// The chunk index is past the end of the region.
    #[error(transparent)]
    Range(#[from] TransferError),
    /// Writing or reading the local copy failed.
    #[error(transparent)]
    Local(#[from] RegionError),
}

/// One fetched chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// All zero bytes.
    Zero,
    /// The chunk's bytes, verified.
    Data(Vec<u8>),
}

impl Fetched {
    /// The bytes, with zero chunks expanded to `len`.
    pub fn into_bytes(self, len: usize) -> Vec<u8> {
        match self {
            Fetched::Zero => vec![0; len],
            Fetched::Data(d) => d,
        }
    }
}

/// Fetches one chunk on its own stream at urgent priority. Standalone: used by pulls and
/// (later) by post-copy fault handling.
pub(crate) async fn fetch_chunk(
    conn: &quinn::Connection,
    region: &str,
    chunk: u64,
) -> Result<Fetched, FetchError> {
    let lost = |e: &dyn std::fmt::Display| match conn.close_reason() {
        Some(r) => FetchError::Connection(reason(&r)),
        None => FetchError::Connection(e.to_string()),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
    let _ = send.set_priority(URGENT_PRIORITY);
    write_frame(
        &mut send,
        &Request::Fetch {
            region: region.into(),
            chunk,
        },
    )
    .await
    .map_err(|e| lost(&e))?;
    let _ = send.finish();
    let reply = match read_frame::<_, Reply>(&mut recv, REPLY_CAP).await {
        Ok(Some(r)) => r,
        Ok(None) => return Err(FetchError::Protocol("stream ended without a reply".into())),
        Err(FrameError::Io(e)) => return Err(lost(&e)),
        Err(e) => {
            let _ = recv.stop(e.code().varint());
            return Err(FetchError::Protocol(e.to_string()));
        }
    };
    match reply {
        Reply::Chunk(h) if h.chunk == chunk && h.len <= MAX_CHUNK_SIZE => {
            let mut data = vec![0u8; h.len as usize];
            read_exact(&mut recv, &mut data)
                .await
                .map_err(|e| match e {
                    FrameError::Io(e) => lost(&e),
                    e => FetchError::Protocol(e.to_string()),
                })?;
            if blake3::hash(&data).as_bytes() != &h.hash {
                return Err(FetchError::HashMismatch(chunk));
            }
            Ok(Fetched::Data(data))
        }
        Reply::Zero { first, count: 1 } if first == chunk => Ok(Fetched::Zero),
        Reply::Error(e) => Err(FetchError::Remote(e)),
        other => {
            let _ = recv.stop(WireCode::UnexpectedFrame.varint());
            Err(FetchError::Protocol(format!(
                "unexpected reply to fetch of chunk {chunk}: {}",
                describe(&other)
            )))
        }
    }
}

fn describe(r: &Reply) -> String {
    match r {
        Reply::Chunk(h) => format!("chunk {} ({} bytes)", h.chunk, h.len),
        Reply::Zero { first, count } => format!("zero run {first}+{count}"),
        other => format!("{other:?}"),
    }
}

async fn region_info(
    conn: &quinn::Connection,
    peer: &str,
    region: &str,
) -> Result<crate::proto::RegionInfo, Step> {
    let lost = |e: &dyn std::fmt::Display| {
        Step::Lost(match conn.close_reason() {
            Some(r) => reason(&r),
            None => e.to_string(),
        })
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
    write_frame(
        &mut send,
        &Request::RegionInfo {
            region: region.into(),
        },
    )
    .await
    .map_err(|e| lost(&e))?;
    let _ = send.finish();
    match read_frame::<_, Reply>(&mut recv, REPLY_CAP).await {
        Ok(Some(Reply::RegionInfo(i))) => Ok(i),
        Ok(Some(Reply::Error(reply))) => Err(Step::Fatal(PullError::Remote {
            peer: peer.into(),
            reply,
        })),
        Ok(Some(other)) => Err(Step::Fatal(PullError::Protocol(format!(
            "unexpected reply to region info: {}",
            describe(&other)
        )))),
        Ok(None) => Err(lost(&"stream ended without a reply")),
        Err(FrameError::Io(e)) => Err(lost(&e)),
        Err(e) => Err(Step::Fatal(PullError::Protocol(e.to_string()))),
    }
}

/// How one bulk stream ended, if not with `Done`.
enum Step {
    /// The connection went away: wait for the peer and resume.
    Lost(String),
    /// Give up.
    Fatal(PullError),
}

/// Where a pull puts what arrives: a file (`pagewire pull`) or an application's mapping
/// (a lazy mount, see [`super::mount`]).
pub(crate) enum Dest {
    File(DestFile),
    Mount(Arc<super::mount::MountSink>),
}

impl Dest {
    fn write_chunk(&self, g: &Geometry, chunk: u64, data: &[u8]) -> Result<(), RegionError> {
        match self {
            Dest::File(f) => f.write_chunk(g, chunk, data),
            Dest::Mount(m) => m.install(g, chunk, data),
        }
    }

    /// A chunk known to be all zero: files keep their hole; mappings get zero pages
    /// where a fault may be waiting.
    fn zero_chunks(&self, g: &Geometry, first: u64, count: u64) -> Result<(), RegionError> {
        match self {
            Dest::File(_) => Ok(()),
            Dest::Mount(m) => m.zero(g, first, count),
        }
    }

    fn read_chunk(&self, g: &Geometry, chunk: u64) -> Result<Vec<u8>, RegionError> {
        match self {
            Dest::File(f) => f.read_chunk(g, chunk),
            Dest::Mount(m) => m.read_chunk(g, chunk),
        }
    }

    fn sync(&self) -> Result<(), RegionError> {
        match self {
            Dest::File(f) => f.sync(),
            Dest::Mount(_) => Ok(()),
        }
    }
}

/// Shared between the pull's driver task, its urgent fetches and `status`.
pub(crate) struct PullInner {
    id: u64,
    peer: String,
    region: String,
    to: PathBuf,
    geometry: Geometry,
    kind: &'static str,
    state: Mutex<PullState>,
    dest: Dest,
    /// The send half of the current bulk stream, for control frames (none while
    /// disconnected). Written in place by whoever has something to say: no hand-off task.
    ctl: Mutex<Option<Arc<tokio::sync::Mutex<quinn::SendStream>>>>,
    /// Woken whenever chunks arrive or an urgent fetch ends.
    arrived: Notify,
    phase: Mutex<&'static str>,
    /// Why it failed.
    error: Mutex<Option<String>>,
    started: Instant,
    finished: Mutex<Option<Instant>>,
    reconnects: AtomicU64,
    cancel: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state consistent; a panic elsewhere must not
    // stop the transfer from being reported.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PullInner {
    pub(crate) fn is_present(&self, chunk: u64) -> bool {
        lock(&self.state).is_present(chunk)
    }

    pub(crate) fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    fn set_phase(&self, p: &'static str) {
        *lock(&self.phase) = p;
    }

    fn elapsed(&self) -> Duration {
        lock(&self.finished)
            .map(|f| f - self.started)
            .unwrap_or_else(|| self.started.elapsed())
    }

    pub(crate) fn status(&self) -> TransferStatus {
        let (stats, bytes_done, chunks_done) = {
            let s = lock(&self.state);
            (s.stats(), s.present_bytes(), s.present_chunks())
        };
        let elapsed = self.elapsed().as_secs_f64();
        TransferStatus {
            id: self.id,
            kind: self.kind.into(),
            peer: self.peer.clone(),
            region: self.region.clone(),
            to: self.to.clone(),
            state: lock(&self.phase).to_string(),
            bytes_done,
            bytes_total: self.geometry.size,
            chunks_done,
            chunks_total: self.geometry.chunks(),
            wire_bytes: stats.data_bytes,
            rate_bps: if elapsed > 0.0 {
                bytes_done as f64 / elapsed
            } else {
                0.0
            },
            elapsed_s: elapsed,
            urgent_fetches: stats.urgent_fetches,
            reconnects: self.reconnects.load(Ordering::Relaxed),
            error: lock(&self.error).clone(),
        }
    }

    fn summary(&self) -> PullSummary {
        let st = self.status();
        let stats = lock(&self.state).stats();
        PullSummary {
            peer: self.peer.clone(),
            region: self.region.clone(),
            to: self.to.clone(),
            size: self.geometry.size,
            chunk_size: self.geometry.chunk_size,
            chunks: self.geometry.chunks(),
            data_chunks: stats.data_chunks,
            zero_chunks: stats.zero_chunks,
            wire_bytes: stats.data_bytes,
            duplicate_chunks: stats.duplicate_chunks,
            urgent_fetches: stats.urgent_fetches,
            reconnects: st.reconnects,
            elapsed_s: st.elapsed_s,
            rate_bps: st.rate_bps,
        }
    }

    async fn send_control(&self, msgs: Vec<BulkControl>) {
        let stream = lock(&self.ctl).clone();
        if let Some(stream) = stream {
            let mut send = stream.lock().await;
            for m in msgs {
                if write_frame(&mut *send, &m).await.is_err() {
                    // The stream is gone; the next bulk stream asks afresh.
                    return;
                }
            }
        }
    }
}

/// A running pull.
pub struct PullHandle {
    agent: Arc<Inner>,
    pub(crate) pull: Arc<PullInner>,
    pub(crate) task: JoinHandle<Result<PullSummary, PullError>>,
}

impl PullHandle {
    /// The transfer id shown in `status`.
    pub fn id(&self) -> u64 {
        self.pull.id
    }

    /// The region's geometry.
    pub fn geometry(&self) -> Geometry {
        self.pull.geometry
    }

    /// Progress so far.
    pub fn status(&self) -> TransferStatus {
        self.pull.status()
    }

    /// Stops the pull; [`wait`](Self::wait) then returns [`PullError::Cancelled`].
    pub fn cancel(&self) {
        self.pull.cancel.cancel();
    }

    /// A handle that can cancel the pull after `wait` has taken `self`.
    pub fn cancel_token(&self) -> CancellationToken {
        self.pull.cancel.clone()
    }

    /// Waits for the pull to end.
    pub async fn wait(self) -> Result<PullSummary, PullError> {
        match self.task.await {
            Ok(r) => r,
            Err(_) => Err(PullError::Cancelled),
        }
    }

    /// The bytes of `chunk`, now: from the local copy if it is here, else fetched on the
    /// urgent lane ahead of the bulk copy, which then carries on right after `chunk`.
    pub async fn fetch(&self, chunk: u64) -> Result<Vec<u8>, FetchError> {
        self.fetcher().fetch(chunk).await
    }

    pub(crate) fn fetcher(&self) -> Fetcher {
        Fetcher {
            agent: self.agent.clone(),
            pull: self.pull.clone(),
        }
    }
}

/// Urgent fetches for one pull; cheap to clone (one per fault).
#[derive(Clone)]
pub(crate) struct Fetcher {
    agent: Arc<Inner>,
    pub(crate) pull: Arc<PullInner>,
}

impl Fetcher {
    /// See [`PullHandle::fetch`].
    pub async fn fetch(&self, chunk: u64) -> Result<Vec<u8>, FetchError> {
        let g = self.pull.geometry;
        match self.ensure(chunk).await? {
            None => Ok(self.pull.dest.read_chunk(&g, chunk)?),
            Some(f) => Ok(f.into_bytes(g.chunk_len(chunk) as usize)),
        }
    }

    /// Makes `chunk` present: `None` when it already was (or another fetch of it, which
    /// we waited for, brought it), else what our own fetch brought, already written to
    /// the destination.
    pub async fn ensure(&self, chunk: u64) -> Result<Option<Fetched>, FetchError> {
        let p = &self.pull;
        let mut wait_for_bulk = true;
        loop {
            let arrived = p.arrived.notified();
            let start = lock(&p.state).urgent_begin(chunk, wait_for_bulk)?;
            match start {
                UrgentStart::Present => return Ok(None),
                UrgentStart::InFlight => {
                    tokio::select! {
                        _ = arrived => {}
                        _ = p.cancel.cancelled() => return Err(FetchError::Shutdown),
                    }
                }
                UrgentStart::Bulk => {
                    // Already on its way in the bulk stream: give it about a round trip
                    // (plus slack for a busy receiver) before asking on the urgent lane.
                    let rtt = self
                        .agent
                        .peers
                        .current(&p.peer)
                        .map(|c| c.rtt())
                        .unwrap_or_default();
                    let wait = (rtt * 2 + BULK_WAIT_SLACK).min(Duration::from_millis(200));
                    tokio::select! {
                        _ = arrived => {}
                        _ = tokio::time::sleep(wait) => wait_for_bulk = false,
                        _ = p.cancel.cancelled() => return Err(FetchError::Shutdown),
                    }
                }
                UrgentStart::Fetch => break,
            }
        }
        // Move the bulk stream on while the fetch runs, not before it.
        let seek = lock(&p.state).urgent_seek(chunk);
        let (_, r) = tokio::join!(p.send_control(seek), self.fetch_now(chunk));
        let got = match &r {
            Ok(Fetched::Zero) => Some(0),
            Ok(Fetched::Data(d)) => Some(d.len() as u32),
            Err(_) => None,
        };
        let ctl = lock(&p.state).urgent_end(chunk, got);
        p.arrived.notify_waiters();
        p.send_control(ctl).await;
        r.map(Some)
    }

    async fn fetch_now(&self, chunk: u64) -> Result<Fetched, FetchError> {
        let p = &self.pull;
        let conn = tokio::select! {
            c = self.agent.peers.wait(&p.peer, &self.agent.shutdown) => c.ok_or(FetchError::Shutdown)?,
            _ = p.cancel.cancelled() => return Err(FetchError::Shutdown),
        };
        let f = fetch_chunk(&conn, &p.region, chunk).await?;
        match &f {
            Fetched::Data(d) => {
                let want = p.geometry.chunk_len(chunk) as usize;
                if d.len() != want {
                    return Err(FetchError::Protocol(format!(
                        "chunk {chunk} has {} bytes, expected {want}",
                        d.len()
                    )));
                }
                if !lock(&p.state).is_present(chunk) {
                    p.dest.write_chunk(&p.geometry, chunk, d)?;
                }
            }
            Fetched::Zero => p.dest.zero_chunks(&p.geometry, chunk, 1)?,
        }
        Ok(f)
    }
}

pub(crate) async fn start(
    inner: Arc<Inner>,
    peer: &str,
    region: &str,
    to: &Path,
) -> Result<PullHandle, PullError> {
    check_dest(&inner, to)?;
    let geometry = prepare(&inner, peer, region).await?;
    let dest = DestFile::create(to, geometry.size)?;
    Ok(launch(
        inner,
        peer,
        region,
        geometry,
        Dest::File(dest),
        to.into(),
        "pull",
    ))
}

/// Checks the peer and the region name, waits for the connection and asks the peer for
/// the region's geometry.
pub(crate) async fn prepare(
    inner: &Inner,
    peer: &str,
    region: &str,
) -> Result<Geometry, PullError> {
    if !inner.peers.is_expected(peer) {
        return Err(PullError::UnknownPeer(peer.into()));
    }
    if !valid_name(region) {
        return Err(PullError::BadName(region.into()));
    }
    let waited = inner.config.peer_wait;
    let conn = tokio::time::timeout(waited, inner.peers.wait(peer, &inner.shutdown))
        .await
        .ok()
        .flatten()
        .ok_or_else(|| PullError::PeerUnavailable {
            peer: peer.into(),
            waited,
            last_error: inner
                .peers
                .snapshot(peer)
                .last_error
                .unwrap_or_else(|| "no connection yet".into()),
        })?;
    let info = match region_info(&conn, peer, region).await {
        Ok(i) => i,
        Err(Step::Fatal(e)) => return Err(e),
        Err(Step::Lost(why)) => {
            return Err(PullError::PeerUnavailable {
                peer: peer.into(),
                waited,
                last_error: why,
            })
        }
    };
    Ok(Geometry::new(info.size, info.chunk_size as u64)?)
}

/// Starts the background copy of `region` (of `geometry`) from `peer` into `dest`.
pub(crate) fn launch(
    inner: Arc<Inner>,
    peer: &str,
    region: &str,
    geometry: Geometry,
    dest: Dest,
    to: PathBuf,
    kind: &'static str,
) -> PullHandle {
    let id = inner.next_transfer.fetch_add(1, Ordering::Relaxed);
    let pull = Arc::new(PullInner {
        id,
        peer: peer.into(),
        region: region.into(),
        to: to.clone(),
        geometry,
        kind,
        state: Mutex::new(PullState::new(geometry, inner.config.bulk_window)),
        dest,
        ctl: Mutex::new(None),
        arrived: Notify::new(),
        phase: Mutex::new("copying"),
        error: Mutex::new(None),
        started: Instant::now(),
        finished: Mutex::new(None),
        reconnects: AtomicU64::new(0),
        cancel: inner.shutdown.child_token(),
    });
    {
        let mut t = lock(&inner.transfers);
        t.insert(id, pull.clone());
        // Keep the newest finished transfers for `status`, drop older ones.
        let finished: Vec<u64> = t
            .iter()
            .filter(|(_, p)| lock(&p.finished).is_some())
            .map(|(id, _)| *id)
            .collect();
        for old in finished
            .iter()
            .take(finished.len().saturating_sub(KEEP_FINISHED))
        {
            t.remove(old);
        }
    }
    tracing::info!(id, kind, peer, region, to = %to.display(), size = geometry.size, chunks = geometry.chunks(), "{kind} started");
    let task = inner.tasks.spawn(drive(inner.clone(), pull.clone()));
    PullHandle {
        agent: inner,
        pull,
        task,
    }
}

/// Refuses a destination that is one of our served regions or the target of a pull
/// still running (same file, whatever the path spelling; a mount's file counts as its
/// pull's); also used by `pagewire receive` and `pagewire mount`.
pub(crate) fn check_dest(inner: &Inner, to: &Path) -> Result<(), PullError> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let Some(target) = id(to) else {
        return Ok(()); // does not exist yet
    };
    let served = inner
        .regions
        .read()
        .map(|r| r.values().any(|r| id(r.path()) == Some(target)))
        .unwrap_or(false);
    if served {
        return Err(PullError::DestInUse(
            to.into(),
            "it is a region this agent serves",
        ));
    }
    let busy = lock(&inner.transfers)
        .values()
        .any(|p| lock(&p.finished).is_none() && id(&p.to) == Some(target));
    if busy {
        return Err(PullError::DestInUse(
            to.into(),
            "another pull or mount is writing it",
        ));
    }
    let mapped = lock(&inner.mounts)
        .values()
        .any(|m| m.attached_file().is_some_and(|f| id(f) == Some(target)));
    if mapped {
        return Err(PullError::DestInUse(
            to.into(),
            "an application has it mapped through a mount",
        ));
    }
    Ok(())
}

async fn drive(inner: Arc<Inner>, p: Arc<PullInner>) -> Result<PullSummary, PullError> {
    let r = drive_inner(&inner, &p).await;
    *lock(&p.finished) = Some(Instant::now());
    match &r {
        Ok(_) => {
            p.set_phase("done");
            let s = p.status();
            tracing::info!(id = p.id, peer = %p.peer, region = %p.region, bytes = s.bytes_total, secs = s.elapsed_s, "pull done");
        }
        Err(e) => {
            p.set_phase("failed");
            *lock(&p.error) = Some(e.to_string());
            tracing::warn!(id = p.id, peer = %p.peer, region = %p.region, "pull failed: {e}");
            // The file was created (or emptied) at full size for this pull: left behind
            // it would look complete by its size. A new pull starts afresh anyway.
            if let Dest::File(_) = &p.dest {
                match std::fs::remove_file(&p.to) {
                    Ok(()) => {
                        tracing::info!(id = p.id, to = %p.to.display(), "removed the incomplete file")
                    }
                    Err(e) => {
                        tracing::warn!(id = p.id, to = %p.to.display(), "removing the incomplete file: {e}")
                    }
                }
            }
        }
    }
    r.map(|_| p.summary())
}

async fn drive_inner(inner: &Arc<Inner>, p: &Arc<PullInner>) -> Result<(), PullError> {
    let mut attempt = 0u64;
    loop {
        if lock(&p.state).is_complete() {
            break;
        }
        let conn = tokio::select! {
            _ = p.cancel.cancelled() => return Err(cancelled(inner)),
            c = inner.peers.wait(&p.peer, &inner.shutdown) => c.ok_or(PullError::Shutdown)?,
        };
        if attempt > 0 {
            p.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        attempt += 1;
        p.set_phase("copying");
        let step = tokio::select! {
            _ = p.cancel.cancelled() => return Err(cancelled(inner)),
            s = run_bulk(p, &conn, inner.config.urgent_pause) => s,
        };
        match step {
            Ok(()) => {}
            Err(Step::Fatal(e)) => return Err(e),
            Err(Step::Lost(why)) => {
                p.set_phase("waiting for peer");
                tracing::info!(id = p.id, peer = %p.peer, "pull interrupted ({why}); resuming when the peer is back");
                tokio::select! {
                    _ = p.cancel.cancelled() => return Err(cancelled(inner)),
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
    p.dest.sync()?;
    Ok(())
}

fn cancelled(inner: &Inner) -> PullError {
    if inner.shutdown.is_cancelled() {
        PullError::Shutdown
    } else {
        PullError::Cancelled
    }
}

/// One bulk stream: asks for every missing chunk and takes what comes until `Done`.
/// (A two-task read/verify pipeline was measured and gave no gain, so it is one loop.)
async fn run_bulk(
    p: &Arc<PullInner>,
    conn: &quinn::Connection,
    pause: Duration,
) -> Result<(), Step> {
    let g = p.geometry;
    let info = region_info(conn, &p.peer, &p.region).await?;
    if info.size != g.size || info.chunk_size != g.chunk_size {
        return Err(Step::Fatal(PullError::RegionChanged(format!(
            "was {} bytes in {} byte chunks, now {} in {}",
            g.size, g.chunk_size, info.size, info.chunk_size
        ))));
    }
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(conn, &e))?;
    let start = lock(&p.state).bulk_start(&p.region);
    write_frame(&mut send, &Request::Bulk(start))
        .await
        .map_err(|e| lost(conn, &e))?;
    let send = Arc::new(tokio::sync::Mutex::new(send));
    *lock(&p.ctl) = Some(send.clone());
    let result = read_bulk(p, conn, &mut recv, &send, pause).await;
    *lock(&p.ctl) = None;
    lock(&p.state).bulk_stopped();
    if result.is_ok() {
        let _ = send.lock().await.finish();
    }
    result
}

fn lost(conn: &quinn::Connection, e: &dyn std::fmt::Display) -> Step {
    Step::Lost(match conn.close_reason() {
        Some(r) => reason(&r),
        None => e.to_string(),
    })
}

/// While an urgent fetch is in flight on a local link (min RTT up to [`LOCAL_RTT`]), the
/// bulk copy stops taking chunks, for at most the agent's `urgent_pause`: there the CPU,
/// not the link, is what bulk and urgent traffic share, and each bulk chunk verified and
/// installed is CPU the urgent reply waits for. The sender stops once its credit is spent.
/// Measured (README, "Post-copy benchmarks"): loopback first touch p50 -20%, sequential
/// lazy read and bulk rate unchanged. On a longer path the link is what they share, and a
/// pause would only cost bulk throughput.
async fn urgent_pause(p: &PullInner, conn: &quinn::Connection, pause: Duration) {
    // Cheapest first: this runs before every bulk frame.
    if pause.is_zero() || lock(&p.state).urgent_in_flight() == 0 || conn.min_rtt() > LOCAL_RTT {
        return;
    }
    let deadline = tokio::time::Instant::now() + pause;
    loop {
        let arrived = p.arrived.notified();
        if lock(&p.state).urgent_in_flight() == 0 {
            return;
        }
        tokio::select! {
            _ = arrived => {}
            _ = tokio::time::sleep_until(deadline) => return,
            _ = p.cancel.cancelled() => return,
        }
    }
}

async fn read_bulk(
    p: &PullInner,
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
    send: &tokio::sync::Mutex<quinn::SendStream>,
    pause: Duration,
) -> Result<(), Step> {
    let g = p.geometry;
    let mut buf = vec![0u8; g.chunk_size as usize];
    let mut credit_open = true;
    let protocol = |recv: &mut quinn::RecvStream, code: WireCode, e: &dyn std::fmt::Display| {
        tracing::warn!(peer = %p.peer, code = code.name(), "closing bulk stream: {e}");
        let _ = recv.stop(code.varint());
        Step::Fatal(PullError::Protocol(e.to_string()))
    };
    loop {
        urgent_pause(p, conn, pause).await;
        match read_frame::<_, Reply>(recv, REPLY_CAP).await {
            Ok(Some(Reply::Chunk(h))) => {
                if let Err(e) = lock(&p.state).check_header(&h) {
                    return Err(protocol(recv, WireCode::ProtocolViolation, &e));
                }
                let data = &mut buf[..h.len as usize];
                match read_exact(recv, data).await {
                    Ok(()) => {}
                    Err(FrameError::Io(e)) => return Err(lost(conn, &e)),
                    Err(e) => return Err(protocol(recv, e.code(), &e)),
                }
                if blake3::hash(data).as_bytes() != &h.hash {
                    tracing::warn!(peer = %p.peer, chunk = h.chunk, "chunk failed blake3 verification");
                    let _ = recv.stop(WireCode::ProtocolViolation.varint());
                    return Err(Step::Fatal(PullError::HashMismatch(h.chunk)));
                }
                if !lock(&p.state).is_present(h.chunk) {
                    p.dest
                        .write_chunk(&g, h.chunk, data)
                        .map_err(|e| Step::Fatal(e.into()))?;
                }
                let grant = {
                    let mut s = lock(&p.state);
                    s.accept(h.chunk, h.len);
                    let before = s.window();
                    s.tune(p.started.elapsed(), conn.min_rtt());
                    if s.window() != before {
                        tracing::trace!(
                            peer = %p.peer,
                            window = s.window(),
                            min_rtt_us = conn.min_rtt().as_micros() as u64,
                            "bulk window"
                        );
                    }
                    s.grant(h.len as u64)
                };
                p.arrived.notify_waiters();
                if let (Some(n), true) = (grant, credit_open) {
                    // The server stops reading credit once it has sent everything it
                    // will (its `Done` may still be on its way): a failed credit write
                    // is no lost link. A real loss shows on the next read.
                    let mut send = send.lock().await;
                    if let Err(e) = write_frame(&mut *send, &BulkControl::Credit(n)).await {
                        tracing::debug!(peer = %p.peer, "credit not sent: {e}");
                        credit_open = false;
                    }
                }
                // Let urgent fetches on this worker run between bulk chunks (quinn reads
                // that find data never yield by themselves).
                tokio::task::yield_now().await;
            }
            Ok(Some(Reply::Zero { first, count })) => {
                if let Err(e) = lock(&p.state).accept_zero(first, count) {
                    return Err(protocol(recv, WireCode::ProtocolViolation, &e));
                }
                p.dest
                    .zero_chunks(&g, first, count)
                    .map_err(|e| Step::Fatal(e.into()))?;
                p.arrived.notify_waiters();
            }
            Ok(Some(Reply::Done)) => return Ok(()),
            Ok(Some(Reply::Error(reply))) => {
                return Err(Step::Fatal(PullError::Remote {
                    peer: p.peer.clone(),
                    reply,
                }))
            }
            Ok(Some(other)) => {
                return Err(protocol(
                    recv,
                    WireCode::UnexpectedFrame,
                    &format!("unexpected on a bulk stream: {}", describe(&other)),
                ))
            }
            Ok(None) => return Err(lost(conn, &"bulk stream ended before Done")),
            Err(FrameError::Io(e)) => return Err(lost(conn, &e)),
            Err(e) => return Err(protocol(recv, e.code(), &e)),
        }
    }
}
