//! The owner side of replication. A *publication* is one region this agent owns and
//! replicates to named peers. A producer task asks the region's dirty tracker what was
//! written, on a cadence and on `flush`, reads those bytes, and makes them an **epoch**
//! (numbered, in order). Each replica has a link task with one long-lived stream to it:
//! on (re)connect it compares chunk hashes with the replica and sends what differs (a
//! catch-up epoch), then forwards epochs as they are produced; the replica acknowledges
//! each once applied. A replica more than `window` bytes behind is cut loose and caught
//! up by hash later, so it never holds back the others (see [`crate::engine::replicate`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;

use super::{reason, Inner};
use crate::control::{ReplicaLinkStatus, ReplicationStatus};
use crate::engine::replicate::{Link, Queued};
use crate::proto::codec::{read_frame, write_frame, FrameError};
use crate::proto::{Push, ReplicaAck, ReplicateStart, Reply, Request, WireCode, MAX_STOP_REASON};
use crate::region::{is_zero, FileRegion, Geometry};
use crate::track::{DirtyTracker, Ranges};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starting or driving a replication failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    /// The region is not served by this agent.
    #[error("this agent has no region {0:?} (serve it with --region {0}=PATH)")]
    UnknownRegion(String),
    /// A replica is not a peer.
    #[error("{0:?} is not a peer of this agent")]
    UnknownPeer(String),
    /// The region is already replicated (with other settings) or is itself a replica.
    #[error("{0}")]
    Conflict(String),
    /// The tracker could not be set up.
    #[error("tracker: {0}")]
    Tracker(String),
    /// A flush or wait did not finish in time.
    #[error("{0}")]
    Timeout(String),
    /// The agent is shutting down.
    #[error("agent shutting down")]
    Shutdown,
    /// The replication was stopped (by an operator, or because the region was migrated
    /// away); the reason says which.
    #[error("replication of region {0} ended: {1}")]
    Ended(String, String),
}

/// One piece of an epoch.
#[derive(Debug)]
enum Piece {
    Data {
        offset: u64,
        len: u32,
        /// Raw bytes, or lz4 when `compressed` is not zero.
        bytes: Bytes,
        compressed: u32,
        hash: [u8; 32],
    },
    Zero {
        offset: u64,
        len: u64,
    },
}

/// An epoch's content, shared by every link.
#[derive(Debug)]
pub(crate) struct EpochData {
    epoch: u64,
    catch_up: bool,
    pieces: Vec<Piece>,
}

/// Reads `ranges` of `region` into pieces (split at chunk boundaries; zeros as markers;
/// lz4 where it saves at least 1/8).
fn read_pieces(region: &FileRegion, ranges: &Ranges) -> Result<(Vec<Piece>, u64), String> {
    let g = region.geometry();
    let mut pieces = Vec::new();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; g.chunk_size as usize];
    for r in ranges {
        let mut off = r.start.min(g.size);
        let end = r.end.min(g.size);
        while off < end {
            let chunk_end = (g.chunk_of(off) + 1) * g.chunk_size as u64;
            let n = (end.min(chunk_end) - off) as usize;
            let data = &mut buf[..n];
            region.read_at(off, data).map_err(|e| e.to_string())?;
            pieces.push(piece(off, data));
            bytes += n as u64;
            off += n as u64;
        }
    }
    Ok((pieces, bytes))
}

fn piece(offset: u64, data: &[u8]) -> Piece {
    if is_zero(data) {
        return Piece::Zero {
            offset,
            len: data.len() as u64,
        };
    }
    let hash = *blake3::hash(data).as_bytes();
    let packed = lz4_flex::block::compress(data);
    if packed.len() < data.len() - data.len() / 8 {
        Piece::Data {
            offset,
            len: data.len() as u32,
            compressed: packed.len() as u32,
            bytes: Bytes::from(packed),
            hash,
        }
    } else {
        Piece::Data {
            offset,
            len: data.len() as u32,
            compressed: 0,
            bytes: Bytes::copy_from_slice(data),
            hash,
        }
    }
}

/// The chunks whose hashes differ, as pieces.
fn catch_up_pieces(region: &FileRegion, theirs: &[u64]) -> Result<(Vec<Piece>, u64), String> {
    let ours = region.chunk_hashes().map_err(|e| e.to_string())?;
    let g = region.geometry();
    let ranges: Ranges = ours
        .iter()
        .zip(theirs)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(c, _)| {
            let c = c as u64;
            g.offset(c)..g.offset(c) + g.chunk_len(c) as u64
        })
        .collect();
    read_pieces(region, &crate::track::normalize(ranges))
}

struct LinkHandle {
    peer: String,
    state: Mutex<Link<Arc<EpochData>>>,
    wake: Notify,
    acked: watch::Sender<u64>,
    connected: AtomicBool,
    catch_ups: AtomicU64,
    catch_up_bytes: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// The last attempt was refused by the replica (see `ReplicaLinkStatus::refused`).
    refused: AtomicBool,
    /// The replica acknowledged this session's catch-up (see `ReplicaLinkStatus::caught_up`).
    caught_up: AtomicBool,
    /// The replica confirmed the end of the replication (see `ReplicaLinkStatus::told_end`).
    told_end: AtomicBool,
    /// The link's task ended.
    done: AtomicBool,
    /// Collect-to-applied latency of tracked epochs, µs (newest `LAG_SAMPLES`).
    lags: Mutex<std::collections::VecDeque<u32>>,
}

const LAG_SAMPLES: usize = 4096;

/// The reason replicas are given when an operator stops a replication.
pub(crate) const STOPPED_BY_OPERATOR: &str = "stopped on the owner (pagewire replicate --stop)";

/// How long the last epoch before a handover may take to be applied by the replicas.
const HANDOVER_FLUSH: Duration = Duration::from_secs(10);
/// How long a replica may take to receive the end of the replication.
const STOP_GRACE: Duration = Duration::from_secs(5);

fn percentile(v: &std::collections::VecDeque<u32>, q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s: Vec<u32> = v.iter().copied().collect();
    s.sort_unstable();
    Some(s[((s.len() - 1) as f64 * q).round() as usize] as f64 / 1e3)
}

/// A region this agent owns and replicates.
pub(crate) struct Publication {
    region: Arc<FileRegion>,
    tracker_name: &'static str,
    tracker: Arc<Mutex<Box<dyn DirtyTracker>>>,
    interval: Duration,
    /// The last epoch produced; held while epochs are handed to links, so a link's
    /// catch-up base and the epochs it forwards never overlap or leave a gap.
    epoch: Mutex<u64>,
    links: Vec<Arc<LinkHandle>>,
    flush_tx: mpsc::Sender<oneshot::Sender<Result<u64, String>>>,
    started: Instant,
    cancel: CancellationToken,
    /// What the tracker reported, for each consumer: replication takes its share at every
    /// epoch; a running migration takes its own ([`Publication::tap_migration`]), so
    /// neither steals the other's dirty pages.
    taps: Mutex<Taps>,
    /// Why the last collection of changes failed (`None` after one succeeds): epochs stop
    /// while it stands, so `status` shows it and every flush fails with it.
    collect_error: Mutex<Option<String>>,
    /// Most bytes queued for one replica (the `window` it was started with).
    window: u64,
    /// The tracker's periodic rescan, if any.
    scan_interval: Option<Duration>,
    /// Published by an application (its tracker also serves a migration of the region):
    /// ending the replication keeps the publication.
    by_app: bool,
    /// Why the replication ended (`pagewire replicate --stop`, or the region was migrated
    /// away); set once, with `links_ended` cancelled.
    ended: Mutex<Option<String>>,
    /// Ends the link tasks (each tells its replica why, between epochs).
    links_ended: CancellationToken,
    /// No epochs while set (a migration of the region is freezing it): see
    /// [`Publications::hold`].
    held: AtomicBool,
    /// Held by the producer while it collects and reads an epoch.
    collecting: Mutex<()>,
}

#[derive(Default)]
struct Taps {
    replication: Vec<std::ops::Range<u64>>,
    migration: Option<Vec<std::ops::Range<u64>>>,
}

impl Publication {
    pub(crate) fn region_geometry(&self) -> crate::region::Geometry {
        self.region.geometry()
    }

    /// The tracker's name (`uffd-wp-async`, `mprotect`, `inotify`, ...).
    pub(crate) fn tracker_name(&self) -> &'static str {
        self.tracker_name
    }

    /// Asks the tracker for what was written since its previous collection and hands the
    /// ranges to every consumer. Blocking (trackers may scan or ask the application).
    fn collect_into_taps(&self) -> Result<(), String> {
        let mut tracker = lock(&self.tracker);
        let r = tracker.collect().map_err(|e| e.to_string())?;
        let mut t = lock(&self.taps);
        if let Some(m) = t.migration.as_mut() {
            m.extend(r.iter().cloned());
        }
        t.replication.extend(r);
        Ok(())
    }

    /// Starts (or restarts, empty) the migration's share of the dirty ranges: from now
    /// on every write is reported to [`Publication::collect_migration`].
    pub(crate) fn tap_migration(&self) {
        lock(&self.taps).migration = Some(Vec::new());
    }

    /// Collects now and returns the ranges written since the previous call (or since
    /// [`Publication::tap_migration`]). Blocking.
    pub(crate) fn collect_migration(&self) -> Result<Ranges, String> {
        self.collect_into_taps()?;
        let mut t = lock(&self.taps);
        let m = t
            .migration
            .as_mut()
            .ok_or("no migration is tapping this region")?;
        Ok(crate::track::normalize(std::mem::take(m)))
    }

    /// Whether the tracker can hold the writers ([`Publication::freeze_writers`]).
    pub(crate) fn can_freeze(&self) -> bool {
        lock(&self.tracker).can_freeze()
    }

    /// Holds every writer of the region (a migration's freeze by write-protection).
    /// Blocking.
    pub(crate) fn freeze_writers(&self) -> Result<(), String> {
        lock(&self.tracker).freeze().map_err(|e| e.to_string())
    }

    /// Lets the writers held by [`Publication::freeze_writers`] go.
    pub(crate) fn thaw_writers(&self) -> Result<(), String> {
        lock(&self.tracker).thaw().map_err(|e| e.to_string())
    }

    /// Ends the migration's share.
    pub(crate) fn untap_migration(&self) {
        lock(&self.taps).migration = None;
    }
}

/// How a replicated region was handed over ([`Publications::handed_over`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handover {
    /// By a migration that froze the writers: the replicas can get all of it.
    Frozen,
    /// By a migration's snapshot (nothing frozen): the replicas keep an earlier state.
    Snapshot,
    /// Before this agent restarted (its new owner just said so): what a replication
    /// started since sent is this agent's stale copy.
    BeforeRestart,
}

/// The publications of an agent, by region.
#[derive(Default)]
pub(crate) struct Publications {
    map: Mutex<BTreeMap<String, Arc<Publication>>>,
    /// Replications that ended while their replica was not connected, by (peer,
    /// region): the reason, told when the peer is connected again ([`tell_untold`]).
    untold: Mutex<BTreeMap<(String, String), String>>,
}

impl Publications {
    /// Whether this agent replicates `region` (or an application published it): a
    /// replication that ended does not count.
    pub(crate) fn is_published(&self, region: &str) -> bool {
        lock(&self.map)
            .get(region)
            .is_some_and(|p| p.by_app || !p.is_ended())
    }

    pub(crate) fn get(&self, region: &str) -> Option<Arc<Publication>> {
        lock(&self.map).get(region).cloned()
    }

    /// Ends of replications `peer` was not told of yet: (region, reason).
    fn untold_for(&self, peer: &str) -> Vec<(String, String)> {
        lock(&self.untold)
            .iter()
            .filter(|((p, _), _)| p == peer)
            .map(|((_, r), why)| (r.clone(), why.clone()))
            .collect()
    }

    /// The end of `region`'s replication could not be told to `peer`: told when it is
    /// connected again ([`tell_untold`]).
    fn untold(&self, peer: &str, region: &str, why: String) {
        lock(&self.untold).insert((peer.into(), region.into()), why);
    }

    /// Forgets the untold end of `region`'s replication to `peer` (it was told, or a new
    /// replication to it starts).
    fn told(&self, peer: &str, region: &str) {
        lock(&self.untold).remove(&(peer.to_string(), region.to_string()));
    }

    /// Ends the replication of `region` (`pagewire replicate --stop`): every replica is
    /// told why and keeps what it applied. A file region's publication goes (it may be
    /// replicated anew, with other settings); an application's stays published, with no
    /// replicas. Returns its last status once every replica was told (or could not be:
    /// `told_end` says which).
    pub(crate) async fn stop_replication(
        &self,
        region: &str,
        reason: &str,
    ) -> Result<ReplicationStatus, ReplicateError> {
        let p = self.end_replication_of(region, reason)?;
        p.links_done(STOP_GRACE + Duration::from_secs(2)).await;
        Ok(p.status())
    }

    fn end_replication_of(
        &self,
        region: &str,
        reason: &str,
    ) -> Result<Arc<Publication>, ReplicateError> {
        let mut map = lock(&self.map);
        let p = match map.get(region) {
            Some(p) if !p.is_ended() => p.clone(),
            _ => {
                return Err(ReplicateError::Conflict(format!(
                    "this agent does not replicate region {region:?}"
                )))
            }
        };
        p.end_replication(reason);
        if !p.by_app {
            map.remove(region);
        }
        Ok(p)
    }

    /// Forgets a file region's replication that ended (the region is being migrated back
    /// here: `status` and `flush` must not go on saying it was migrated away).
    pub(crate) fn forget_ended(&self, region: &str) {
        let mut map = lock(&self.map);
        if map.get(region).is_some_and(|p| !p.by_app && p.is_ended()) {
            if let Some(p) = map.remove(region) {
                p.cancel.cancel();
            }
        }
    }

    /// A migration of `region` is about to take its final snapshot: no epoch is made
    /// until [`Publications::release_hold`] (or the end of the replication), and one
    /// being collected now is waited for, so replicas never get writes that the
    /// migration's destination does not. Blocking.
    pub(crate) fn hold(&self, region: &str) {
        if let Some(p) = self.get(region) {
            p.held.store(true, Ordering::Release);
            drop(lock(&p.collecting));
        }
    }

    /// Lets epochs go again (the migration was given up).
    pub(crate) fn release_hold(&self, region: &str) {
        if let Some(p) = self.get(region) {
            // The producer goes on at its next tick.
            p.held.store(false, Ordering::Release);
        }
    }

    /// `region` was handed over to `peer`: the replication of it ends, its replicas are
    /// told why, and the publication stays (ended) so `status` and `flush` say so. With
    /// the writers frozen the replicas first get one last epoch (what was written up to
    /// the freeze), so they hold exactly what `peer` took over.
    pub(crate) fn handed_over(&self, region: &str, peer: &str, how: Handover) {
        let Some(p) = self.get(region) else { return };
        if p.links.is_empty() || p.is_ended() {
            p.held.store(false, Ordering::Release);
            return;
        }
        if how == Handover::Frozen {
            // The last epoch is made now.
            p.held.store(false, Ordering::Release);
        }
        let moved = format!("region {region} was migrated to {peer}");
        let reason = match how {
            Handover::Frozen => format!(
                "{moved}, which owns it now; this replica holds what {peer} took over (replicate it from {peer})"
            ),
            Handover::Snapshot => format!(
                "{moved}, which owns it now; this replica may hold an earlier state than {peer} took over (replicate it from {peer})"
            ),
            Handover::BeforeRestart => format!(
                "{moved} before this agent restarted, and {peer} owns it; this replica got this agent's stale copy, which may differ from {peer}'s (replicate it from {peer})"
            ),
        };
        if how != Handover::Frozen {
            return p.end_replication(&reason);
        }
        tokio::spawn(async move {
            if let Err(e) = p.flush(HANDOVER_FLUSH).await {
                tracing::warn!(region = %p.region.name(), "last epoch before ending the replication (the region was migrated away): {e}");
            }
            p.end_replication(&reason);
        });
    }

    /// Stops replicating `region` (its tasks end; replicas keep what they have).
    pub(crate) fn stop(&self, region: &str) {
        if let Some(p) = lock(&self.map).remove(region) {
            p.cancel.cancel();
        }
    }

    pub(crate) fn status(&self) -> Vec<ReplicationStatus> {
        lock(&self.map).values().map(|p| p.status()).collect()
    }
}

/// How to replicate.
#[derive(Debug, Clone)]
pub struct ReplicateOptions {
    /// Replicas, by peer name.
    pub to: Vec<String>,
    /// How often the tracker is asked for changes.
    pub interval: Duration,
    /// Most bytes an epoch queue may hold for one replica before it is cut loose and
    /// caught up by hash later.
    pub window: u64,
}

impl Default for ReplicateOptions {
    fn default() -> Self {
        ReplicateOptions {
            to: Vec::new(),
            interval: Duration::from_millis(50),
            window: 256 << 20,
        }
    }
}

/// Builds the tracker for a file region: `inotify` (write(2) by any process, plus a
/// periodic hash scan every `scan_interval` for writes through mmaps; the default) or
/// `hash-scan` (a full hash scan at every collection).
pub(crate) fn file_tracker(
    kind: &str,
    region: &FileRegion,
    scan_interval: Option<Duration>,
) -> Result<Box<dyn DirtyTracker>, ReplicateError> {
    let inotify = match kind {
        "inotify" => true,
        "hash-scan" => false,
        o => {
            return Err(ReplicateError::Tracker(format!(
                "unknown file tracker {o:?} (inotify, hash-scan)"
            )))
        }
    };
    let t = crate::track::file::FileTracker::new(
        region.path(),
        region.geometry(),
        inotify,
        if inotify { scan_interval } else { None },
    )
    .map_err(|e| ReplicateError::Tracker(e.to_string()))?;
    Ok(Box::new(t))
}

/// Starts replicating `region` (served by this agent) with `tracker`.
pub(crate) fn start(
    inner: &Arc<Inner>,
    region_name: &str,
    tracker: Box<dyn DirtyTracker>,
    opts: &ReplicateOptions,
) -> Result<Arc<Publication>, ReplicateError> {
    if opts.to.is_empty() {
        return Err(ReplicateError::Conflict("no replicas given".into()));
    }
    if let Some(p) = opts
        .to
        .iter()
        .enumerate()
        .find_map(|(i, p)| opts.to[..i].contains(p).then_some(p))
    {
        return Err(ReplicateError::Conflict(format!(
            "replica {p} is given twice"
        )));
    }
    start_tracking(inner, region_name, tracker, opts, false)
}

/// Like [`start`], but with no replicas too: an application's published region
/// (`by_app`) is tracked (for a migration) even when nothing replicates it.
pub(crate) fn start_tracking(
    inner: &Arc<Inner>,
    region_name: &str,
    tracker: Box<dyn DirtyTracker>,
    opts: &ReplicateOptions,
    by_app: bool,
) -> Result<Arc<Publication>, ReplicateError> {
    let region = inner
        .region(region_name)
        .ok_or_else(|| ReplicateError::UnknownRegion(region_name.into()))?;
    for p in &opts.to {
        if !inner.peers.is_expected(p) {
            return Err(ReplicateError::UnknownPeer(p.clone()));
        }
    }
    if inner
        .replicas
        .get(region_name)
        .is_some_and(|e| e.is_connected())
    {
        return Err(ReplicateError::Conflict(format!(
            "region {region_name} is a replica here (its owner is replicating it to us); a region has one owner"
        )));
    }
    if let Some(why) = inner
        .migrations
        .outgoing(region_name)
        .filter(|_| !opts.to.is_empty())
    {
        return Err(ReplicateError::Conflict(format!(
            "region {region_name} {why}: replicate it from its owner once the migration is done"
        )));
    }
    if let Some(owner) = inner.migrations.handed_over_before_restart(region_name) {
        return Err(ReplicateError::Conflict(format!(
            "region {region_name} was migrated to {owner} before this agent restarted ({owner} owns it and said so): replicate it from {owner}"
        )));
    }
    if !inner.migrations.owns(region_name) {
        return Err(ReplicateError::Conflict(format!(
            "region {region_name} was handed over to another agent (or a migration into this agent did not complete): this agent does not own it"
        )));
    }
    let mut map = lock(&inner.publications.map);
    if let Some(p) = map.get(region_name).filter(|p| !p.by_app && p.is_ended()) {
        // A replication that ended (the region was migrated away, and is back): gone.
        p.cancel.cancel();
        map.remove(region_name);
    }
    if map.get(region_name).is_some_and(|p| p.is_ended()) {
        return Err(ReplicateError::Conflict(format!(
            "the replication of region {region_name} was stopped; an application's region takes its replicas when it is published: publish it again to replicate it"
        )));
    }
    if let Some(p) = map.get(region_name) {
        let mut have: Vec<&str> = p.links.iter().map(|l| l.peer.as_str()).collect();
        let mut want: Vec<&str> = opts.to.iter().map(|s| s.as_str()).collect();
        have.sort();
        want.sort();
        if have == want {
            return Ok(p.clone());
        }
        return Err(ReplicateError::Conflict(format!(
            "region {region_name} is already replicated to {}",
            have.join(", ")
        )));
    }
    let (flush_tx, flush_rx) = mpsc::channel(64);
    let links: Vec<Arc<LinkHandle>> = opts
        .to
        .iter()
        .map(|peer| {
            Arc::new(LinkHandle {
                peer: peer.clone(),
                state: Mutex::new(Link::new(opts.window)),
                wake: Notify::new(),
                acked: watch::channel(0).0,
                connected: AtomicBool::new(false),
                catch_ups: AtomicU64::new(0),
                catch_up_bytes: AtomicU64::new(0),
                last_error: Mutex::new(None),
                refused: AtomicBool::new(false),
                caught_up: AtomicBool::new(false),
                told_end: AtomicBool::new(false),
                done: AtomicBool::new(false),
                lags: Mutex::new(Default::default()),
            })
        })
        .collect();
    let p = Arc::new(Publication {
        region,
        tracker_name: tracker.name(),
        scan_interval: tracker.scan_interval(),
        tracker: Arc::new(Mutex::new(tracker)),
        interval: opts.interval,
        epoch: Mutex::new(0),
        links,
        flush_tx,
        started: Instant::now(),
        cancel: inner.shutdown.child_token(),
        taps: Mutex::new(Taps::default()),
        collect_error: Mutex::new(None),
        window: opts.window,
        by_app,
        ended: Mutex::new(None),
        links_ended: CancellationToken::new(),
        held: AtomicBool::new(false),
        collecting: Mutex::new(()),
    });
    map.insert(region_name.into(), p.clone());
    drop(map);
    for peer in &opts.to {
        inner.publications.told(peer, region_name);
    }
    tracing::info!(region = region_name, tracker = p.tracker_name, replicas = ?opts.to, "replication started");
    inner.tasks.spawn(produce(p.clone(), flush_rx));
    for l in &p.links {
        inner
            .tasks
            .spawn(run_link(inner.clone(), p.clone(), l.clone()));
    }
    Ok(p)
}

impl Publication {
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    pub(crate) fn status(&self) -> ReplicationStatus {
        let now = self.now();
        ReplicationStatus {
            region: self.region.name().into(),
            tracker: self.tracker_name.into(),
            epoch: *lock(&self.epoch),
            interval_ms: self.interval.as_millis() as u64,
            error: lock(&self.collect_error).clone(),
            window: self.window,
            scan_interval_ms: self.scan_interval.map(|d| d.as_millis() as u64),
            ended: lock(&self.ended).clone(),
            replicas: self
                .links
                .iter()
                .map(|l| {
                    // One lock at a time: a second lock of the same mutex in one
                    // expression would deadlock.
                    let (p50, p99) = {
                        let lags = lock(&l.lags);
                        (percentile(&lags, 0.5), percentile(&lags, 0.99))
                    };
                    let s = lock(&l.state);
                    let (lag_bytes, lag) = s.lag(now);
                    ReplicaLinkStatus {
                        peer: l.peer.clone(),
                        connected: l.connected.load(Ordering::Relaxed),
                        acked_epoch: s.acked(),
                        lag_bytes,
                        lag_ms: lag.as_secs_f64() * 1e3,
                        bytes_sent: s.sent_bytes(),
                        catch_ups: l.catch_ups.load(Ordering::Relaxed),
                        catch_up_bytes: l.catch_up_bytes.load(Ordering::Relaxed),
                        last_error: lock(&l.last_error).clone(),
                        refused: l.refused.load(Ordering::Relaxed),
                        caught_up: l.caught_up.load(Ordering::Relaxed),
                        told_end: l.told_end.load(Ordering::Relaxed),
                        apply_p50_ms: p50,
                        apply_p99_ms: p99,
                    }
                })
                .collect(),
        }
    }

    /// Ends the replication (once): the link tasks tell their replicas `reason` between
    /// epochs and stop; a file region's producer stops too.
    fn end_replication(&self, reason: &str) {
        {
            let mut e = lock(&self.ended);
            if e.is_some() {
                return;
            }
            *e = Some(reason.to_string());
        }
        tracing::info!(region = %self.region.name(), "replication ended: {reason}");
        self.links_ended.cancel();
        for l in &self.links {
            l.wake.notify_one();
        }
    }

    /// Published by an application (not a file region replicated by `pagewire replicate`).
    pub(crate) fn is_by_app(&self) -> bool {
        self.by_app
    }

    /// Waits (at most `limit`) until every link task has told its replica that the
    /// replication ended, or given up.
    pub(crate) async fn links_done(&self, limit: Duration) {
        let end = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < end
            && !self.links.iter().all(|l| l.done.load(Ordering::Acquire))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the replication ended (see [`Publication::end_replication`]).
    pub(crate) fn is_ended(&self) -> bool {
        lock(&self.ended).is_some()
    }

    fn check_ended(&self) -> Result<(), ReplicateError> {
        match lock(&self.ended).clone() {
            Some(why) => Err(ReplicateError::Ended(self.region.name().into(), why)),
            None => Ok(()),
        }
    }

    /// Makes an epoch of everything written so far and waits until every replica has
    /// applied it. Returns the epoch.
    pub(crate) async fn flush(&self, timeout: Duration) -> Result<u64, ReplicateError> {
        self.check_ended()?;
        let (tx, rx) = oneshot::channel();
        self.flush_tx
            .send(tx)
            .await
            .map_err(|_| ReplicateError::Shutdown)?;
        let epoch = match rx.await {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => return Err(ReplicateError::Tracker(e)),
            Err(_) => {
                self.check_ended()?;
                return Err(ReplicateError::Shutdown);
            }
        };
        self.wait_acked(epoch, timeout).await?;
        Ok(epoch)
    }

    /// Waits until every replica acknowledged `epoch`.
    pub(crate) async fn wait_acked(
        &self,
        epoch: u64,
        timeout: Duration,
    ) -> Result<(), ReplicateError> {
        let all = async {
            for l in &self.links {
                let mut rx = l.acked.subscribe();
                let _ = rx.wait_for(|a| *a >= epoch).await;
            }
        };
        tokio::select! {
            _ = all => Ok(()),
            _ = self.links_ended.cancelled() => self.check_ended(),
            _ = tokio::time::sleep(timeout) => {
                let late: Vec<String> = self
                    .links
                    .iter()
                    .filter(|l| *l.acked.borrow() < epoch)
                    .map(|l| {
                        let why = match (l.connected.load(Ordering::Relaxed), lock(&l.last_error).clone()) {
                            (true, _) => String::new(),
                            (false, Some(e)) => format!(", not replicating: {e}"),
                            (false, None) => ", not connected".into(),
                        };
                        format!("{} (acked {}{why})", l.peer, *l.acked.borrow())
                    })
                    .collect();
                Err(ReplicateError::Timeout(format!(
                    "epoch {epoch} not acknowledged within {timeout:?} by {}",
                    late.join(", ")
                )))
            }
            _ = self.cancel.cancelled() => Err(ReplicateError::Shutdown),
        }
    }
}

/// The producer: tracker → epochs → links.
async fn produce(
    p: Arc<Publication>,
    mut flush_rx: mpsc::Receiver<oneshot::Sender<Result<u64, String>>>,
) {
    let mut tick = tokio::time::interval(p.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Flushes waiting for the next epoch (kept while a migration holds epochs back).
    let mut waiters = Vec::new();
    loop {
        tokio::select! {
            _ = p.cancel.cancelled() => return,
            _ = p.links_ended.cancelled(), if !p.by_app => return,
            _ = tick.tick() => {}
            w = flush_rx.recv() => match w {
                Some(w) => waiters.push(w),
                None => return,
            },
        }
        // Flushes that arrived meanwhile share this epoch.
        while let Ok(w) = flush_rx.try_recv() {
            waiters.push(w);
        }
        if p.held.load(Ordering::Acquire) {
            continue;
        }
        let pc = p.clone();
        let collected = tokio::task::spawn_blocking(move || {
            let _collecting = lock(&pc.collecting);
            if pc.held.load(Ordering::Acquire) {
                return Ok(None);
            }
            pc.collect_into_taps()?;
            let ranges = crate::track::normalize(std::mem::take(&mut lock(&pc.taps).replication));
            if pc.links.is_empty() || pc.links_ended.is_cancelled() {
                // Published for migration only: nobody to send epochs to.
                return Ok(Some((Vec::new(), 0)));
            }
            read_pieces(&pc.region, &ranges).map(Some)
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        let (pieces, bytes) = match collected {
            Ok(Some(x)) => x,
            Ok(None) => continue, // held since the check above
            Err(e) => {
                let again = lock(&p.collect_error).replace(e.clone()).as_ref() == Some(&e);
                if again {
                    tracing::debug!(region = %p.region.name(), "collecting changes failed: {e}");
                } else {
                    tracing::warn!(region = %p.region.name(), "collecting changes failed (replicas get no changes until this is fixed): {e}");
                }
                for w in std::mem::take(&mut waiters) {
                    let _ = w.send(Err(e.clone()));
                }
                continue;
            }
        };
        lock(&p.collect_error).take();
        if pieces.is_empty() && waiters.is_empty() {
            continue;
        }
        let at = p.now();
        let epoch = {
            let mut e = lock(&p.epoch);
            *e += 1;
            let data = Arc::new(EpochData {
                epoch: *e,
                catch_up: false,
                pieces,
            });
            for l in &p.links {
                let ok = lock(&l.state).enqueue(Queued {
                    epoch: *e,
                    bytes,
                    at,
                    payload: data.clone(),
                });
                if !ok {
                    tracing::debug!(peer = %l.peer, epoch = *e, "replica behind its window: it will be caught up by hash");
                }
                l.wake.notify_one();
            }
            *e
        };
        for w in std::mem::take(&mut waiters) {
            let _ = w.send(Ok(epoch));
        }
    }
}

/// One replica: sessions until the publication ends.
async fn run_link(inner: Arc<Inner>, p: Arc<Publication>, l: Arc<LinkHandle>) {
    link(inner.clone(), &p, &l).await;
    let ended = lock(&p.ended).clone();
    if let (Some(why), false) = (ended, l.told_end.load(Ordering::Relaxed)) {
        inner.publications.untold(&l.peer, p.region.name(), why);
    }
    l.done.store(true, Ordering::Release);
}

/// Tells `peer`, just connected, of the replications that ended while it was not
/// connected ([`Request::ReplicationEnded`]); each one it answers is forgotten.
pub(crate) async fn tell_untold(inner: Arc<Inner>, peer: String, conn: quinn::Connection) {
    for (region, mut reason) in inner.publications.untold_for(&peer) {
        truncate_reason(&mut reason);
        let ended = Request::ReplicationEnded {
            region: region.clone(),
            reason,
        };
        match super::peers::ask(&conn, &ended, STOP_GRACE).await {
            Ok(Reply::Done) => {
                inner.publications.told(&peer, &region);
                // An ended replication the owner still shows (a handover): its link to
                // this replica is told now.
                if let Some(l) = inner
                    .publications
                    .get(&region)
                    .filter(|p| p.is_ended())
                    .and_then(|p| p.links.iter().find(|l| l.peer == peer).cloned())
                {
                    l.told_end.store(true, Ordering::Relaxed);
                    *lock(&l.last_error) = None;
                }
                tracing::info!(peer = %peer, region = %region, "replica told, now that it is connected again, that the replication ended");
            }
            Ok(other) => {
                tracing::debug!(peer = %peer, region = %region, "telling the replica that the replication ended: answered {other:?}")
            }
            Err(e) => {
                tracing::debug!(peer = %peer, region = %region, "telling the replica that the replication ended: {e}")
            }
        }
    }
}

/// Cuts a replication's end reason to what the protocol carries.
fn truncate_reason(reason: &mut String) {
    if reason.len() > MAX_STOP_REASON {
        let mut cut = MAX_STOP_REASON;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
}

async fn link(inner: Arc<Inner>, p: &Arc<Publication>, l: &Arc<LinkHandle>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let conn = tokio::select! {
            _ = p.cancel.cancelled() => return,
            _ = p.links_ended.cancelled() => {
                *lock(&l.last_error) = Some("not connected when the replication ended: it is told when it is connected again".into());
                return;
            }
            c = inner.peers.wait(&l.peer, &inner.shutdown) => match c {
                Some(c) => c,
                None => return,
            },
        };
        let r = tokio::select! {
            _ = p.cancel.cancelled() => return,
            r = session(p, l, &conn) => r,
            // The session tells the replica between epochs; one stuck in an epoch (the
            // replica stopped reading) is cut after a grace period.
            _ = async {
                p.links_ended.cancelled().await;
                tokio::time::sleep(STOP_GRACE + Duration::from_secs(1)).await;
            } => Err("the replica did not take the end of the replication in time: it is told when it is connected again".into()),
        };
        l.connected.store(false, Ordering::Relaxed);
        if p.links_ended.is_cancelled() {
            if let Err(why) = r {
                *lock(&l.last_error) = Some(why);
            }
            return;
        }
        match r {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(why) => {
                tracing::info!(peer = %l.peer, region = %p.region.name(), "replication session ended: {why}");
                *lock(&l.last_error) = Some(why);
                tokio::select! {
                    _ = p.cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn lost(conn: &quinn::Connection, e: &dyn std::fmt::Display) -> String {
    match conn.close_reason() {
        Some(r) => reason(&r),
        None => e.to_string(),
    }
}

/// Small pieces are gathered into one buffer of about this size before going to quinn:
/// thousands of tiny writes per epoch (one 4 KiB page each, a few dozen bytes once
/// compressed) made quinn's stream-frame assembly the hottest code in the agent.
const SEND_BATCH: usize = 256 << 10;

async fn send_epoch(send: &mut quinn::SendStream, e: &EpochData) -> Result<(), std::io::Error> {
    let mut buf: Vec<u8> = Vec::with_capacity(SEND_BATCH);
    let frame =
        |buf: &mut Vec<u8>, msg: &Push| buf.extend_from_slice(&crate::proto::codec::encode(msg));
    frame(
        &mut buf,
        &Push::Begin {
            epoch: e.epoch,
            catch_up: e.catch_up,
        },
    );
    for piece in &e.pieces {
        match piece {
            Piece::Data {
                offset,
                len,
                bytes,
                compressed,
                hash,
            } => {
                frame(
                    &mut buf,
                    &Push::Data {
                        offset: *offset,
                        len: *len,
                        compressed: *compressed,
                        hash: *hash,
                    },
                );
                if bytes.len() >= SEND_BATCH / 4 {
                    // Large payloads go as they are (no copy).
                    send.write_all(&std::mem::take(&mut buf)).await?;
                    send.write_chunk(bytes.clone())
                        .await
                        .map_err(std::io::Error::from)?;
                } else {
                    buf.extend_from_slice(bytes);
                }
            }
            Piece::Zero { offset, len } => frame(
                &mut buf,
                &Push::Zero {
                    offset: *offset,
                    len: *len,
                },
            ),
        }
        if buf.len() >= SEND_BATCH {
            send.write_all(&std::mem::take(&mut buf)).await?;
            buf.reserve(SEND_BATCH);
        }
    }
    frame(&mut buf, &Push::End { epoch: e.epoch });
    send.write_all(&buf).await.map_err(std::io::Error::from)
}

/// One stream to the replica: catch-up by hash, then epochs as produced.
async fn session(p: &Publication, l: &LinkHandle, conn: &quinn::Connection) -> Result<(), String> {
    let g: Geometry = p.region.geometry();
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(conn, &e))?;
    write_frame(
        &mut send,
        &Request::Replicate(ReplicateStart {
            region: p.region.name().into(),
            size: g.size,
            chunk_size: g.chunk_size,
        }),
    )
    .await
    .map_err(|e| lost(conn, &e))?;
    let cap = 4096 + g.chunks() as usize * 10;
    let state = match read_frame::<_, Reply>(&mut recv, cap).await {
        Ok(Some(Reply::ReplicaState(s))) => s,
        Ok(Some(Reply::Error(e))) => {
            l.refused.store(true, Ordering::Relaxed);
            return Err(format!("replica refused: {}: {}", e.kind, e.message));
        }
        Ok(Some(_)) => return Err("unexpected reply to replicate".into()),
        Ok(None) => return Err("replica closed the stream".into()),
        Err(FrameError::Io(e)) => return Err(lost(conn, &e)),
        Err(e) => {
            let _ = recv.stop(e.code().varint());
            return Err(format!("bad reply from replica: {e}"));
        }
    };
    if state.hashes.len() as u64 != g.chunks() {
        let _ = recv.stop(WireCode::ProtocolViolation.varint());
        return Err(format!(
            "replica sent {} chunk hashes for {} chunks",
            state.hashes.len(),
            g.chunks()
        ));
    }
    // Everything produced up to `base` is covered by the catch-up read below.
    l.caught_up.store(false, Ordering::Relaxed);
    let base = {
        let e = lock(&p.epoch);
        lock(&l.state).start_session(*e);
        *e
    };
    let region = p.region.clone();
    let (pieces, bytes) =
        tokio::task::spawn_blocking(move || catch_up_pieces(&region, &state.hashes))
            .await
            .map_err(|e| e.to_string())??;
    let data = Arc::new(EpochData {
        epoch: base,
        catch_up: true,
        pieces,
    });
    send_epoch(&mut send, &data)
        .await
        .map_err(|e| lost(conn, &e))?;
    l.catch_ups.fetch_add(1, Ordering::Relaxed);
    l.catch_up_bytes.fetch_add(bytes, Ordering::Relaxed);
    lock(&l.state).sent_catch_up(base, bytes, p.now(), data);
    l.connected.store(true, Ordering::Relaxed);
    *lock(&l.last_error) = None;
    l.refused.store(false, Ordering::Relaxed);
    tracing::info!(peer = %l.peer, region = %p.region.name(), base, bytes, "catch-up by hash sent; streaming epochs");

    let acks = async {
        loop {
            match read_frame::<_, ReplicaAck>(&mut recv, 64).await {
                Ok(Some(a)) => {
                    if a.epoch >= base && !l.caught_up.swap(true, Ordering::Relaxed) {
                        tracing::info!(peer = %l.peer, region = %p.region.name(), base, "replica caught up (it applied the catch-up)");
                    }
                    let r = lock(&l.state).ack(a.epoch);
                    let now = p.now();
                    match r {
                        Err(e) => return Err(e.to_string()),
                        Ok(at) => {
                            let mut lags = lock(&l.lags);
                            for t in at {
                                if lags.len() == LAG_SAMPLES {
                                    lags.pop_front();
                                }
                                lags.push_back(
                                    now.saturating_sub(t).as_micros().min(u32::MAX as u128) as u32,
                                );
                            }
                        }
                    }
                    l.acked.send_if_modified(|v| {
                        let changed = a.epoch > *v;
                        *v = (*v).max(a.epoch);
                        changed
                    });
                }
                Ok(None) => return Err("replica closed the stream".to_string()),
                Err(FrameError::Io(e)) => return Err(lost(conn, &e)),
                Err(e) => return Err(format!("bad ack: {e}")),
            }
        }
    };
    let sender = async {
        loop {
            loop {
                let next = lock(&l.state).next_to_send().map(|q| q.payload.clone());
                let Some(e) = next else { break };
                send_epoch(&mut send, &e)
                    .await
                    .map_err(|e| lost(conn, &e))?;
            }
            let ended = lock(&p.ended).clone();
            if let Some(mut reason) = ended {
                truncate_reason(&mut reason);
                write_frame(&mut send, &Push::Stop { reason })
                    .await
                    .map_err(|e| lost(conn, &e))?;
                let _ = send.finish();
                tracing::info!(peer = %l.peer, region = %p.region.name(), "replica told that the replication ended");
                return Ok(());
            }
            if lock(&l.state).is_behind() {
                return Err::<(), String>(
                    "replica fell behind its window: catching up by hash".into(),
                );
            }
            tokio::select! {
                _ = l.wake.notified() => {}
                _ = p.links_ended.cancelled() => {}
            }
        }
    };
    let r = tokio::select! {
        r = acks => r,
        r = sender => r,
    };
    let r = match r {
        // Stop was sent and the stream finished: the replica read it once the stream
        // drained (or it stopped reading after it).
        Ok(()) => match tokio::time::timeout(STOP_GRACE, send.stopped()).await {
            Ok(Ok(_)) => {
                l.told_end.store(true, Ordering::Relaxed);
                Ok(())
            }
            _ => Err(
                "the replica did not take the end of the replication in time: it is told when it is connected again"
                    .into(),
            ),
        },
        e => e,
    };
    let _ = send.reset(WireCode::Cancelled.varint());
    let _ = recv.stop(WireCode::Cancelled.varint());
    r
}
