//! The source side (host A): drives [`MigrateSource`] over one migration stream.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{frame_cap, lock, AbortOnDrop, Slot, CONNECT_TIMEOUT};
use crate::agent::{reason, Inner};
use crate::control::{MigrationProgress, MigrationReport};
use crate::engine::migrate::{
    Config, Message, MigrateError, MigrateSource, Outcome, Report, SourceAction, SourceEvent,
    SourcePhase, Window,
};
use crate::proto::codec::{encode, read_frame, FrameError, FrameReader};
use crate::proto::{
    ChunkHeader, ErrorKind, MigrateBack, MigrateFrame, MigrateOpen, Reply, Request, WireCode,
};
use crate::region::{chunk_hash, is_zero, Bitmap, FileRegion};
use crate::track::file::Inotify;

/// How the writer of the region is paused for the final sync.
#[derive(Clone)]
pub enum Freeze {
    /// Nothing is paused: the final snapshot is the freeze; writes after it are not
    /// migrated.
    Snapshot,
    /// SIGSTOP this process (and wait until it is stopped); SIGCONT if the migration
    /// aborts. After a successful migration it stays stopped.
    Pid(i32),
    /// Called with `true` to pause (return once the writer is at a safe point) and with
    /// `false` to resume after an abort. Runs on a blocking thread.
    Hook(Arc<dyn Fn(bool) -> Result<(), String> + Send + Sync>),
    /// Write-protect the whole region and hold every write fault: each writing thread
    /// stops at its next store (reads go on). Needs memory an application published
    /// with the client library (any tracker: A's agent holds uffd-wp-sync write faults;
    /// for uffd-wp-async and mprotect the library holds them, `fault::hold`). Released
    /// if the migration aborts; after a successful one the writers STAY HELD until the
    /// application ends its publication (or exits), since they must not write the old
    /// copy.
    WriteProtect,
}

impl Freeze {
    fn label(&self) -> String {
        match self {
            Freeze::Snapshot => "snapshot".into(),
            Freeze::Pid(p) => format!("pid {p}"),
            Freeze::Hook(_) => "hook".into(),
            Freeze::WriteProtect => "write-protect".into(),
        }
    }
}

impl std::fmt::Debug for Freeze {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

/// How to migrate.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The destination peer.
    pub to: String,
    /// Downtime budget (freeze to resume).
    pub budget: Duration,
    /// Pre-copy rounds at most.
    pub max_rounds: u32,
    /// Pre-copy stops after this long and the migration switches over.
    pub max_time: Duration,
    pub freeze: Freeze,
    /// Chunk data sent at most this many bytes per second (`None`: as fast as the link
    /// goes). Applies to every phase, the final sync included.
    pub max_bandwidth: Option<u64>,
    /// Post-copy: hand over once the predicted downtime fits the budget even if chunks
    /// are still stale; the destination's application (`client::receive`) fetches them
    /// on demand while the rest streams in. False: everything is sent before the
    /// handover (nothing depends on this host afterwards).
    pub postcopy: bool,
    /// File regions: the caller promises that nothing writes the file through a shared
    /// mapping during the migration (only write(2) and the like, which inotify reports).
    /// A collection that finds no inotify event since the previous one then skips the
    /// pass over the file — at the freeze too, so an idle file's downtime no longer
    /// includes a rehash. A broken promise loses the mmap writes made since the last
    /// pass. Ignored for memory published with a kernel tracker.
    pub no_mmap_writers: bool,
}

impl MigrateOptions {
    pub fn new(to: &str) -> MigrateOptions {
        MigrateOptions {
            to: to.into(),
            budget: Duration::from_millis(50),
            max_rounds: 30,
            max_time: Duration::from_secs(60),
            freeze: Freeze::Snapshot,
            max_bandwidth: None,
            postcopy: false,
            no_mmap_writers: false,
        }
    }
}

/// A migration could not start or did not complete.
#[derive(Debug, thiserror::Error)]
pub enum MigrateRunError {
    /// The region is not served by this agent.
    #[error("this agent has no region {0:?} (serve it with --region {0}=PATH)")]
    UnknownRegion(String),
    /// The destination is not a peer (or is this agent).
    #[error("{0:?} is not a peer of this agent")]
    UnknownPeer(String),
    /// A migration of the region is already running here, or it was handed over.
    #[error("region {region}: {why}")]
    Busy { region: String, why: String },
    /// The destination refused the migration.
    #[error("{peer} refused the migration: {why}")]
    Refused { peer: String, why: String },
    /// The migration ended early; the region stays on this agent.
    #[error("migration of {region} to {peer} aborted ({outcome}): {why}; the region stays here{resumed}")]
    Aborted {
        region: String,
        peer: String,
        outcome: &'static str,
        why: String,
        resumed: &'static str,
    },
    /// Pausing the writer failed (the migration was aborted).
    #[error("freeze: {0}")]
    Freeze(String),
    /// Reading or hashing the region failed.
    #[error("reading the region: {0}")]
    Region(String),
    /// The agent is shutting down.
    #[error("agent shutting down")]
    Shutdown,
}

pub(crate) fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Migrated => "migrated",
        Outcome::LinkLost => "link-lost",
        Outcome::SourceFailed => "source-error",
        Outcome::Cancelled => "cancelled",
        Outcome::Refused => "refused",
        Outcome::HandoverRefused => "handover-refused",
        Outcome::DestinationLost => "destination-lost",
    }
}

/// Trackers that see every write through the application's mapping (a region published
/// with the client library): a migration of such a region asks the tracker, not hashes.
const MEMORY_TRACKERS: [&str; 3] = ["uffd-wp-async", "uffd-wp-sync", "mprotect"];

/// How the source finds what changed.
enum Scanner {
    /// xxh3 hashes: what B has of each chunk (the hash of what was sent) and what the
    /// file had at the previous collection.
    Hashes {
        region: Arc<FileRegion>,
        prev: Vec<u64>,
        sent: Vec<Option<u64>>,
        sent_since: Vec<bool>,
        /// With `no_mmap_writers`: a collection rehashes only after an event.
        inotify: Option<Inotify>,
        /// Full passes over the file (the baseline's included).
        passes: u64,
    },
    /// The publication's kernel dirty tracker (its migration share).
    Tracked(Arc<crate::agent::replicate::Publication>),
}

impl Scanner {
    /// The tracker of an application's published region if there is one, else hashes
    /// (gated by inotify with `no_mmap_writers`).
    fn new(
        inner: &Inner,
        region: Arc<FileRegion>,
        no_mmap_writers: bool,
    ) -> Result<Scanner, String> {
        if let Some(p) = inner.publications.get(region.name()) {
            if MEMORY_TRACKERS.contains(&p.tracker_name()) {
                p.tap_migration();
                return Ok(Scanner::Tracked(p));
            }
        }
        // Watch first, then hash: a write in between is seen by both, never by neither.
        let inotify = if no_mmap_writers {
            Some(Inotify::watch(region.path()).map_err(|e| e.to_string())?)
        } else {
            None
        };
        let prev = region.chunk_hashes().map_err(|e| e.to_string())?;
        let n = prev.len();
        Ok(Scanner::Hashes {
            region,
            prev,
            sent: vec![None; n],
            sent_since: vec![false; n],
            inotify,
            passes: 1,
        })
    }

    fn kind(&self) -> &'static str {
        match self {
            Scanner::Hashes { inotify: None, .. } => "xxh3 chunk hashes",
            Scanner::Hashes { .. } => "xxh3 chunk hashes after inotify events",
            Scanner::Tracked(p) => p.tracker_name(),
        }
    }

    /// Full passes over the file so far (0 with a kernel tracker).
    fn passes(&self) -> u64 {
        match self {
            Scanner::Hashes { passes, .. } => *passes,
            Scanner::Tracked(_) => 0,
        }
    }

    /// Whether the writers can be held by write-protection (`Freeze::WriteProtect`).
    fn check_freeze(&self) -> Result<(), String> {
        match self {
            Scanner::Tracked(p) if p.can_freeze() => Ok(()),
            Scanner::Tracked(p) => Err(format!(
                "the region is tracked by {}, which cannot hold writers (only memory an application published with the client library can be); freeze with a hook or --freeze-pid",
                p.tracker_name()
            )),
            Scanner::Hashes { .. } => Err(
                "a file region's writers cannot be held by write-protection (only memory an application published with the client library can be); use --freeze-pid".into(),
            ),
        }
    }

    fn freeze_writers(&self) -> Result<(), String> {
        match self {
            Scanner::Tracked(p) => p.freeze_writers(),
            Scanner::Hashes { .. } => self.check_freeze(),
        }
    }

    fn thaw_writers(&self) -> Result<(), String> {
        match self {
            Scanner::Tracked(p) => p.thaw_writers(),
            Scanner::Hashes { .. } => Ok(()),
        }
    }

    /// Records what was sent of chunk `c` (hash mode).
    fn sent(&mut self, c: u64, data: &[u8]) {
        if let Scanner::Hashes {
            sent, sent_since, ..
        } = self
        {
            sent[c as usize] = Some(chunk_hash(data));
            sent_since[c as usize] = true;
        }
    }

    /// Pre-copy: chunks changed since the previous collection (hash mode: and chunks sent
    /// since then whose content is not what was sent). Final (hash mode): every chunk B's
    /// copy differs in; a tracker reports every write since the migration started, so its
    /// final collection is simply the writes since the previous one.
    fn collect(&mut self, last: bool) -> Result<Vec<u64>, String> {
        let (region, prev, sent, sent_since, inotify, passes) = match self {
            Scanner::Tracked(p) => {
                let g = p.region_geometry();
                let mut out: Vec<u64> = Vec::new();
                for r in p.collect_migration()? {
                    let end = r.end.min(g.size);
                    if r.start >= end {
                        continue;
                    }
                    for c in g.chunk_of(r.start)..=g.chunk_of(end - 1) {
                        if out.last() != Some(&c) {
                            out.push(c);
                        }
                    }
                }
                return Ok(out);
            }
            Scanner::Hashes {
                region,
                prev,
                sent,
                sent_since,
                inotify,
                passes,
            } => (region, prev, sent, sent_since, inotify, passes),
        };
        // Events are drained before the pass: a write during it leaves one for the next
        // collection. No event since the previous pass: the file is what it hashed to
        // then (write(2) queues its event before it returns, and the writers are
        // promised to use nothing else), so the pass is skipped.
        let changed = match inotify {
            Some(i) => i.drain().map_err(|e| e.to_string())?,
            None => true,
        };
        let fresh = if changed {
            *passes += 1;
            Some(region.chunk_hashes().map_err(|e| e.to_string())?)
        } else {
            None
        };
        let now = fresh.as_deref().unwrap_or(prev);
        let mut out = Vec::new();
        for (c, h) in now.iter().enumerate() {
            let stale = sent[c] != Some(*h);
            let dirty = if last {
                stale
            } else {
                *h != prev[c] || (sent_since[c] && stale)
            };
            if dirty {
                out.push(c as u64);
            }
        }
        if let Some(f) = fresh {
            *prev = f;
        }
        sent_since.iter_mut().for_each(|s| *s = false);
        Ok(out)
    }
}

impl Drop for Scanner {
    fn drop(&mut self) {
        if let Scanner::Tracked(p) = self {
            p.untap_migration();
        }
    }
}

/// Stops `pid` and waits until the kernel reports it stopped.
fn stop_pid(pid: i32) -> Result<(), String> {
    // SAFETY: kill(2) with a pid and a signal number.
    if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
        return Err(format!(
            "SIGSTOP {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
        // The state follows the last ')' (the command name may contain anything).
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].trim_start().chars().next());
        if matches!(state, Some('T') | Some('t')) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("process {pid} did not stop within 5 s"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn cont_pid(pid: i32) {
    // SAFETY: kill(2) with a pid and a signal number.
    if unsafe { libc::kill(pid, libc::SIGCONT) } != 0 {
        tracing::warn!(pid, "SIGCONT failed: {}", std::io::Error::last_os_error());
    }
}

/// A token bucket for `--max-bandwidth`, clockless: the caller passes the time.
#[derive(Debug)]
pub(crate) struct Pacer {
    /// Bytes per second.
    rate: f64,
    /// Most bytes that may go at once after an idle spell.
    burst: f64,
    tokens: f64,
    last: Option<Duration>,
}

impl Pacer {
    pub(crate) fn new(bytes_per_s: u64) -> Pacer {
        let rate = bytes_per_s.max(1) as f64;
        // 10 ms worth, but at least one chunk-sized write can go without waiting twice.
        let burst = (rate / 100.0).max(256.0 * 1024.0);
        Pacer {
            rate,
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// Takes `n` bytes at time `now`; returns how long to wait before sending them.
    pub(crate) fn take(&mut self, now: Duration, n: u64) -> Duration {
        if let Some(last) = self.last {
            let dt = now.saturating_sub(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        }
        self.last = Some(now);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// What a zero chunk costs on the wire (its marker frame), for bandwidth accounting.
const ZERO_MARKER_BYTES: u64 = 16;

/// A blocking step the driver waits for.
enum Pending {
    Collect(tokio::task::JoinHandle<Result<Vec<u64>, String>>),
    /// `Ok`: when the pause began (just before the hook, SIGSTOP or write-protection).
    Freeze(tokio::task::JoinHandle<Result<Instant, String>>),
}

/// A frame from B (or the end of the stream), stamped when it arrived.
type Inbound = (Instant, Result<Option<MigrateBack>, FrameError>);

struct Stream {
    send: quinn::SendStream,
    /// B's frames, read by their own task and stamped on arrival: an `Accept` or an ack
    /// that arrives while this task writes chunks is timed when it came, not when it
    /// was handled (the downtime and the delivery-rate samples depend on it).
    frames: mpsc::Receiver<Inbound>,
    /// Stops the receiving side with a code (a bad frame found here).
    stop: Option<tokio::sync::oneshot::Sender<quinn::VarInt>>,
    _reader: AbortOnDrop,
    conn: quinn::Connection,
    /// The post-copy urgent lane on this connection, once opened.
    urgent: Option<quinn::SendStream>,
}

/// Reads B's frames into a channel, stamping each with its arrival time.
fn spawn_reader(
    recv: quinn::RecvStream,
    cap: usize,
) -> (
    mpsc::Receiver<Inbound>,
    tokio::sync::oneshot::Sender<quinn::VarInt>,
    AbortOnDrop,
) {
    let (tx, frames) = mpsc::channel::<Inbound>(64);
    let (stop, mut stop_rx) = tokio::sync::oneshot::channel::<quinn::VarInt>();
    let task = tokio::spawn(async move {
        let mut reader = FrameReader::new(recv, cap);
        loop {
            tokio::select! {
                f = reader.next::<MigrateBack>() => {
                    let end = !matches!(f, Ok(Some(_)));
                    if let Err(e) = &f {
                        if !matches!(e, FrameError::Io(_)) {
                            let _ = reader.get_mut().stop(e.code().varint());
                        }
                    }
                    if tx.send((Instant::now(), f)).await.is_err() || end {
                        return;
                    }
                }
                code = &mut stop_rx => {
                    if let Ok(code) = code {
                        let _ = reader.get_mut().stop(code);
                    }
                    return;
                }
            }
        }
    });
    (frames, stop, AbortOnDrop(task))
}

/// Opens the urgent lane of a migration in post-copy (high priority; see
/// [`Request::MigrateUrgent`]).
async fn open_urgent(
    conn: &quinn::Connection,
    region: &str,
    generation: u64,
) -> Result<quinn::SendStream, std::io::Error> {
    let (mut send, recv) = conn.open_bi().await.map_err(std::io::Error::other)?;
    // B never answers on it.
    drop(recv);
    let _ = send.set_priority(crate::agent::serve::URGENT_PRIORITY);
    crate::proto::codec::write_frame(
        &mut send,
        &Request::MigrateUrgent {
            region: region.into(),
            generation,
        },
    )
    .await
    .map_err(std::io::Error::other)?;
    Ok(send)
}

/// Why a stream ended.
fn lost(conn: &quinn::Connection, e: &dyn std::fmt::Display) -> String {
    match conn.close_reason() {
        Some(r) => reason(&r),
        None => e.to_string(),
    }
}

/// Whether `conn` ended because another connection to `peer` replaced it (both agents
/// dialed each other at once; see `Peers::register`), rather than by a cut or B going.
fn replaced(inner: &Inner, peer: &str, conn: &quinn::Connection) -> bool {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            c.error_code == WireCode::Duplicate.varint()
        }
        Some(quinn::ConnectionError::LocallyClosed) => inner
            .peers
            .current(peer)
            .is_some_and(|c| c.stable_id() != conn.stable_id()),
        _ => false,
    }
}

/// How long a failed write waits for B's answer saying why it stopped reading.
const REFUSAL_GRACE: Duration = Duration::from_millis(500);

/// How a migration stream ended, from a frame of B's.
enum FrameFault {
    /// The stream or connection ended: a link loss.
    Lost(String),
    /// B broke the protocol: the stream is stopped with this code.
    Protocol(WireCode, String),
    /// B answered with an error.
    Refused(String),
}

/// Why a migration stream could not be opened.
enum OpenError {
    /// No connection, or it failed under us: worth another try.
    Link(String),
    /// B answered with an error, or broke the protocol. `busy`: B still holds the region
    /// for another migration (after a replaced connection, until B sees the old one go).
    Refused { busy: bool, why: String },
}

impl OpenError {
    fn refused(why: impl Into<String>) -> Self {
        OpenError::Refused {
            busy: false,
            why: why.into(),
        }
    }
}

/// Opens a migration stream to `peer` and waits for its answer.
async fn open(
    inner: &Inner,
    peer: &str,
    region: &FileRegion,
    postcopy: bool,
    wait: Option<Duration>,
) -> Result<Stream, OpenError> {
    let waited = async { inner.peers.wait(peer, &inner.shutdown).await };
    let conn = match wait {
        Some(t) => tokio::time::timeout(t, waited).await.ok().flatten(),
        None => waited.await,
    };
    let Some(conn) = conn else {
        return Err(OpenError::Link(format!("no connection to {peer}")));
    };
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| OpenError::Link(lost(&conn, &e)))?;
    let g = region.geometry();
    let req = Request::Migrate(MigrateOpen {
        region: region.name().into(),
        size: g.size,
        chunk_size: g.chunk_size,
        postcopy,
    });
    crate::proto::codec::write_frame(&mut send, &req)
        .await
        .map_err(|e| OpenError::Link(lost(&conn, &e)))?;
    match read_frame::<_, Reply>(&mut recv, 4096).await {
        Ok(Some(Reply::Migrating)) => {}
        Ok(Some(Reply::Error(e))) => {
            return Err(OpenError::Refused {
                busy: e.kind == ErrorKind::Busy,
                why: format!("{}: {}", e.kind, e.message),
            })
        }
        Ok(Some(_)) => {
            let _ = recv.stop(WireCode::UnexpectedFrame.varint());
            return Err(OpenError::refused("unexpected reply to migrate"));
        }
        Ok(None) => return Err(OpenError::Link("the peer closed the stream".into())),
        Err(FrameError::Io(e)) => return Err(OpenError::Link(lost(&conn, &e))),
        Err(e) => {
            let _ = recv.stop(e.code().varint());
            return Err(OpenError::refused(format!("bad reply: {e}")));
        }
    }
    let (frames, stop, reader) = spawn_reader(recv, frame_cap(g.chunks()));
    Ok(Stream {
        send,
        frames,
        stop: Some(stop),
        _reader: reader,
        conn,
        urgent: None,
    })
}

fn progress(
    region: &str,
    to: &str,
    engine: &MigrateSource,
    elapsed: Duration,
    in_doubt: bool,
) -> MigrationProgress {
    let p = engine.progress();
    let phase = if in_doubt {
        "in-doubt".to_string()
    } else {
        match engine.phase() {
            SourcePhase::Precopy { .. } => "precopy".into(),
            SourcePhase::Freezing => "freezing".into(),
            SourcePhase::FinalSync => "final-sync".into(),
            SourcePhase::HandingOver => "handing-over".into(),
            SourcePhase::Postcopy => "postcopy".into(),
            SourcePhase::Released => "released".into(),
            SourcePhase::Aborted(_) => "aborted".into(),
            SourcePhase::Idle => "idle".into(),
        }
    };
    MigrationProgress {
        region: region.into(),
        to: to.into(),
        phase,
        round: p.map_or(0, |p| p.rounds),
        dirty_rate_bps: p.map_or(0.0, |p| p.dirty_rate),
        bandwidth_bps: p.map_or(0.0, |p| p.bandwidth),
        expected_downtime_ms: p.and_then(|p| p.expected_downtime.map(|d| d.as_secs_f64() * 1e3)),
        remaining_bytes: p.map_or(0, |p| p.remaining),
        bytes_sent: p.map_or(0, |p| p.bytes_sent),
        elapsed_ms: elapsed.as_secs_f64() * 1e3,
    }
}

/// How often a tracked region's dirty pages are collected within a pre-copy round (see
/// `Config::peek`): a `PAGEMAP_SCAN` of 1 GiB costs 0.3-11 ms here. What was dirtied
/// since the last one goes in the `Stale` notice at the freeze decision, which B punches
/// on the downtime's path (~5-8 µs a chunk): at 100k pages/s, 100 ms left ~1300 chunks
/// (11 ms of punching), 40 ms ~200-480 (1-3 ms).
const PEEK_INTERVAL: Duration = Duration::from_millis(40);

/// How many times a migration starts over when its connection is replaced in pre-copy.
const MAX_RESTARTS: u32 = 3;

/// Runs one migration of `region_name` to `opts.to`; progress goes to `progress_tx`.
///
/// When both agents dial each other at once (at start-up, or both reconnecting), one of
/// the two connections is closed as a duplicate a moment later. A migration stream on it
/// is lost, and a loss in pre-copy aborts (nothing was handed over, the writer runs on),
/// but the peer was never unreachable: the copy starts over on the connection that stayed,
/// up to [`MAX_RESTARTS`] times. A cut link or a dead B still ends the migration.
pub(crate) async fn run(
    inner: Arc<Inner>,
    region_name: &str,
    opts: MigrateOptions,
    progress_tx: Option<mpsc::UnboundedSender<MigrationProgress>>,
) -> Result<MigrationReport, MigrateRunError> {
    let mut restart = 0;
    loop {
        let mut replaced = false;
        let r = attempt(
            inner.clone(),
            region_name,
            opts.clone(),
            progress_tx.clone(),
            restart,
            &mut replaced,
        )
        .await;
        match r {
            Err(MigrateRunError::Aborted {
                outcome: "link-lost",
                ref why,
                ..
            }) if replaced && restart < MAX_RESTARTS && !inner.shutdown.is_cancelled() => {
                restart += 1;
                tracing::info!(region = region_name, to = %opts.to, restart, "the connection was replaced during pre-copy ({why}); starting the migration again");
            }
            r => return r,
        }
    }
}

/// One attempt of [`run`]; sets `replaced` when its connection was replaced.
async fn attempt(
    inner: Arc<Inner>,
    region_name: &str,
    opts: MigrateOptions,
    progress_tx: Option<mpsc::UnboundedSender<MigrationProgress>>,
    restart: u32,
    replaced: &mut bool,
) -> Result<MigrationReport, MigrateRunError> {
    let region = inner
        .region(region_name)
        .ok_or_else(|| MigrateRunError::UnknownRegion(region_name.into()))?;
    if opts.to == inner.name || !inner.peers.is_expected(&opts.to) {
        return Err(MigrateRunError::UnknownPeer(opts.to.clone()));
    }
    let g = region.geometry();
    let busy = |why: String| MigrateRunError::Busy {
        region: region_name.into(),
        why,
    };
    if let Some(owner) = inner.migrations.handed_over_before_restart(region_name) {
        return Err(busy(format!(
            "it was migrated to {owner} before this agent restarted ({owner} owns it and said so); this agent no longer owns it"
        )));
    }
    // The dirty baseline is taken before the engine starts copying.
    let scanner = {
        let (r, i) = (region.clone(), inner.clone());
        let no_mmap = opts.no_mmap_writers;
        tokio::task::spawn_blocking(move || Scanner::new(&i, r, no_mmap))
            .await
            .map_err(|e| MigrateRunError::Region(e.to_string()))?
            .map_err(MigrateRunError::Region)?
    };
    let cfg = Config {
        size: g.size,
        chunk_size: g.chunk_size,
        budget: opts.budget,
        max_rounds: opts.max_rounds,
        max_time: opts.max_time,
        window: Window::Auto {
            min: 1 << 20,
            max: 16 << 20,
            gain_pct: 200,
        },
        postcopy: opts.postcopy,
        // A tracker's collection is cheap (one PAGEMAP_SCAN, or taking marks); a rehash
        // is a pass over the whole region, so file regions collect at round ends only.
        peek: matches!(scanner, Scanner::Tracked(_)).then_some(PEEK_INTERVAL),
    };
    if matches!(opts.freeze, Freeze::WriteProtect) {
        scanner.check_freeze().map_err(MigrateRunError::Freeze)?;
    }
    let scanner = Arc::new(Mutex::new(scanner));
    let started = Instant::now();
    // Registering and starting under the map's lock: a second migrate sees Busy.
    let (engine, in_doubt, first) = {
        let mut map = lock(&inner.migrations.map);
        let engine = match map.get(region_name) {
            None => Arc::new(Mutex::new(MigrateSource::new())),
            Some(Slot::Source { engine, .. }) => engine.clone(),
            Some(Slot::Dest { engine, peer }) => {
                let e = lock(engine);
                if !e.owns() {
                    return Err(busy(format!(
                        "this agent does not own it (an incoming migration from {peer} is {:?})",
                        e.phase()
                    )));
                }
                Arc::new(Mutex::new(MigrateSource::new()))
            }
        };
        let first = lock(&engine).handle(Duration::ZERO, SourceEvent::Start(cfg));
        let first = match first {
            Ok(a) => a,
            Err(MigrateError::Busy(phase)) => {
                return Err(busy(format!(
                    "a migration of it is already running (phase {phase})"
                )))
            }
            Err(MigrateError::NotOwner) => {
                return Err(busy(
                    "it was migrated away from this agent; this agent no longer owns it".into(),
                ))
            }
            Err(e) => return Err(busy(e.to_string())),
        };
        let in_doubt = Arc::new(std::sync::atomic::AtomicBool::new(false));
        map.insert(
            region_name.into(),
            Slot::Source {
                peer: opts.to.clone(),
                engine: engine.clone(),
                in_doubt: in_doubt.clone(),
            },
        );
        (engine, in_doubt, first)
    };
    tracing::info!(region = region_name, to = %opts.to, size = g.size, freeze = ?opts.freeze, dirty = lock(&scanner).kind(), "migration started");
    let mut d = Driver {
        inner: inner.clone(),
        region,
        opts,
        engine,
        in_doubt,
        scanner,
        started,
        queue: first.into(),
        pending: None,
        frozen: false,
        report: None,
        last_error: None,
        progress_tx,
        pacer: None,
        zero_sent: Bitmap::new(g.chunks()),
        restart,
        replaced: false,
    };
    d.pacer = d.opts.max_bandwidth.map(Pacer::new);
    let r = d.drive().await;
    *replaced = d.replaced;
    tracing::info!(region = region_name, result = ?r.as_ref().map(|r| &r.outcome), "migration ended");
    r
}

struct Driver {
    inner: Arc<Inner>,
    region: Arc<FileRegion>,
    opts: MigrateOptions,
    engine: Arc<Mutex<MigrateSource>>,
    in_doubt: Arc<std::sync::atomic::AtomicBool>,
    scanner: Arc<Mutex<Scanner>>,
    started: Instant,
    queue: VecDeque<SourceAction>,
    pending: Option<Pending>,
    /// The writer is paused by us.
    frozen: bool,
    report: Option<Report>,
    last_error: Option<String>,
    progress_tx: Option<mpsc::UnboundedSender<MigrationProgress>>,
    pacer: Option<Pacer>,
    /// Chunks whose last send was a zero marker: their acks count as the marker's few
    /// bytes, not the chunk's length, or a sparse region would fake a huge bandwidth.
    zero_sent: Bitmap,
    /// Which attempt this is (see [`run`]): 0 for the first.
    restart: u32,
    /// The stream was lost because its connection was replaced by another to B.
    replaced: bool,
}

impl Driver {
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Feeds one event; queues the actions. An error from a peer message means the peer
    /// broke the protocol: the caller drops the stream.
    fn feed(&mut self, ev: SourceEvent) -> Result<(), MigrateError> {
        self.feed_at(self.now(), ev)
    }

    /// Feeds an event that happened at `now` (a frame's arrival).
    fn feed_at(&mut self, now: Duration, ev: SourceEvent) -> Result<(), MigrateError> {
        if let SourceEvent::Message(Message::Pong { at, peer }) = &ev {
            tracing::debug!(region = %self.region.name(), sent = ?at, received = ?now, peer = ?peer,
                round_trip = ?now.saturating_sub(*at), "clock sample");
        }
        let actions = lock(&self.engine).handle(now, ev)?;
        self.queue.extend(actions);
        Ok(())
    }

    /// The migration stream on `conn` failed with `e` (read or write): a link loss, and
    /// noted if another connection to B replaced this one (see [`run`]).
    fn stream_lost(&mut self, conn: &quinn::Connection, e: &dyn std::fmt::Display) {
        self.replaced = replaced(&self.inner, &self.opts.to, conn);
        self.link_down(lost(conn, e));
    }

    /// B answered with an error: before the handover nothing is worth a retry; after
    /// it, handled as a cut (the engine decides).
    fn refused(&mut self, mut s: Stream, why: String) {
        tracing::info!(region = %self.region.name(), peer = %self.opts.to, "{why}");
        self.last_error = Some(why);
        let _ = s.send.reset(WireCode::Cancelled.varint());
        let _ = self.feed(SourceEvent::Refused);
    }

    /// A write to B failed. B may have refused what it read (it answers with an error
    /// frame and stops reading, and the stop can overtake the answer): the frames not
    /// read yet say so; otherwise the link was lost.
    async fn write_failed(&mut self, mut s: Stream, e: &(dyn std::fmt::Display + Sync)) {
        let conn = s.conn.clone();
        let deadline = tokio::time::sleep(REFUSAL_GRACE);
        tokio::pin!(deadline);
        loop {
            let f = tokio::select! {
                f = s.frames.recv() => f,
                _ = &mut deadline => None,
            };
            let Some(f) = f else { break };
            match self.on_frame(f) {
                Ok(()) => {}
                Err(FrameFault::Refused(why)) => return self.refused(s, why),
                Err(_) => break,
            }
        }
        self.stream_lost(&conn, e);
    }

    fn link_down(&mut self, why: String) {
        let why = if self.inner.shutdown.is_cancelled() {
            format!("this agent is shutting down ({why})")
        } else {
            why
        };
        tracing::info!(region = %self.region.name(), peer = %self.opts.to, "migration stream lost: {why}");
        self.last_error = Some(why);
        let _ = self.feed(SourceEvent::LinkDown);
    }

    fn send_progress(&self) {
        if let Some(tx) = &self.progress_tx {
            let p = progress(
                self.region.name(),
                &self.opts.to,
                &lock(&self.engine),
                self.now(),
                self.in_doubt.load(Ordering::Relaxed),
            );
            let _ = tx.send(p);
        }
    }

    async fn drive(&mut self) -> Result<MigrationReport, MigrateRunError> {
        // A connection replaced just then (both agents dialed each other at once, and
        // one of the two connections is closed as a duplicate) is worth another try;
        // nothing was sent yet. After a restart (see `run`) B may still hold the region
        // for the copy on the replaced connection until it sees that one go: Busy is
        // worth another try then too.
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let opened = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let r = open(
                &self.inner,
                &self.opts.to,
                &self.region,
                self.opts.postcopy,
                Some(left),
            )
            .await;
            let why = match &r {
                Err(OpenError::Link(why)) => why,
                Err(OpenError::Refused { busy: true, why }) if self.restart > 0 => why,
                _ => break r,
            };
            if Instant::now() >= deadline || self.inner.shutdown.is_cancelled() {
                break r;
            }
            tracing::debug!(peer = %self.opts.to, "migration stream not opened, trying again: {why}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut stream = match opened {
            Ok(s) => Some(s),
            Err(e) => {
                let ev = match e {
                    OpenError::Refused { .. } => SourceEvent::Refused,
                    OpenError::Link(_) => SourceEvent::LinkDown,
                };
                let _ = self.feed(ev);
                self.queue.clear();
                return Err(match e {
                    OpenError::Refused { why, .. } => MigrateRunError::Refused {
                        peer: self.opts.to.clone(),
                        why,
                    },
                    OpenError::Link(why) => MigrateRunError::Aborted {
                        region: self.region.name().into(),
                        peer: self.opts.to.clone(),
                        outcome: "link-lost",
                        why,
                        resumed: "",
                    },
                });
            }
        };
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_progress = Instant::now();
        loop {
            self.run_actions(&mut stream).await;
            if self.report.is_some() {
                break;
            }
            // Lost the stream while B may own the region: never two owners, so wait for
            // the peer and ask it (the engine sends `Query` on `LinkUp`).
            if stream.is_none() && !lock(&self.engine).owns() {
                self.in_doubt.store(true, Ordering::Relaxed);
                self.send_progress();
                let s = tokio::select! {
                    s = open(&self.inner, &self.opts.to, &self.region, self.opts.postcopy, None) => s,
                    _ = self.inner.shutdown.cancelled() => return Err(MigrateRunError::Shutdown),
                };
                match s {
                    Ok(s) => {
                        self.in_doubt.store(false, Ordering::Relaxed);
                        stream = Some(s);
                        let _ = self.feed(SourceEvent::LinkUp);
                    }
                    Err(OpenError::Link(why) | OpenError::Refused { why, .. }) => {
                        tracing::info!(region = %self.region.name(), "handover in doubt, peer not reachable: {why}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                continue;
            }
            enum Got {
                Frame(Inbound),
                Collected(Result<Vec<u64>, String>),
                Frozen(Result<Instant, String>),
                Tick,
                Shutdown,
            }
            let shutdown = self.inner.shutdown.clone();
            let pending_slot = &mut self.pending;
            let got = {
                let pending = async {
                    match pending_slot.as_mut() {
                        Some(Pending::Collect(h)) => {
                            Got::Collected(h.await.unwrap_or_else(|e| Err(e.to_string())))
                        }
                        Some(Pending::Freeze(h)) => {
                            Got::Frozen(h.await.unwrap_or_else(|e| Err(e.to_string())))
                        }
                        None => std::future::pending().await,
                    }
                };
                let frame = async {
                    match stream.as_mut() {
                        Some(s) => Got::Frame(s.frames.recv().await.unwrap_or_else(|| {
                            (
                                Instant::now(),
                                Err(FrameError::Io(std::io::Error::other(
                                    "the frame reader ended",
                                ))),
                            )
                        })),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    g = frame => g,
                    g = pending => g,
                    _ = tick.tick() => Got::Tick,
                    _ = shutdown.cancelled() => Got::Shutdown,
                }
            };
            match got {
                Got::Frame(f) => {
                    let Some(s) = stream.as_mut() else { continue };
                    let conn = s.conn.clone();
                    match self.on_frame(f) {
                        Ok(()) => {}
                        Err(FrameFault::Lost(why)) => {
                            stream = None;
                            self.stream_lost(&conn, &why);
                        }
                        Err(FrameFault::Protocol(code, why)) => {
                            tracing::warn!(peer = %self.opts.to, code = code.name(), "closing migration stream: {why}");
                            if let Some(stop) = s.stop.take() {
                                let _ = stop.send(code.varint());
                            }
                            let _ = s.send.reset(code.varint());
                            stream = None;
                            self.link_down(why);
                        }
                        Err(FrameFault::Refused(why)) => {
                            if let Some(s) = stream.take() {
                                self.refused(s, why);
                            }
                        }
                    }
                }
                Got::Collected(r) => {
                    self.pending = None;
                    match r {
                        Ok(chunks) => {
                            tracing::debug!(region = %self.region.name(), chunks = chunks.len(), "dirty chunks collected");
                            let _ = self.feed(SourceEvent::Dirty(chunks));
                        }
                        Err(e) => {
                            // Cannot know what changed: give up.
                            self.last_error = Some(format!("collecting changes: {e}"));
                            if let Some(mut s) = stream.take() {
                                let _ = s.send.reset(WireCode::Cancelled.varint());
                            }
                            let _ = self.feed(SourceEvent::Failed);
                        }
                    }
                }
                Got::Frozen(r) => {
                    self.pending = None;
                    match r {
                        Ok(began) => {
                            tracing::debug!(region = %self.region.name(), "writer frozen");
                            self.frozen = true;
                            let began = began.saturating_duration_since(self.started);
                            let _ = self.feed(SourceEvent::Frozen { began });
                        }
                        Err(e) => {
                            self.last_error = Some(format!("freeze failed: {e}"));
                            // A half-done freeze is undone by the abort's Resume.
                            self.frozen = true;
                            if let Some(mut s) = stream.take() {
                                let _ = s.send.reset(WireCode::Cancelled.varint());
                            }
                            let _ = self.feed(SourceEvent::Failed);
                        }
                    }
                }
                Got::Tick => {
                    // Whoever watched the progress went away (the `pagewire migrate`
                    // command ended: Ctrl-C): give up while A still owns it.
                    let watcher_gone = self.progress_tx.as_ref().is_some_and(|t| t.is_closed());
                    if watcher_gone && lock(&self.engine).cancellable() {
                        tracing::info!(region = %self.region.name(), "migration cancelled: its command went away");
                        self.last_error =
                            Some("cancelled: the command that started it went away".into());
                        if let Some(mut s) = stream.take() {
                            let _ = s.send.reset(WireCode::Cancelled.varint());
                        }
                        let _ = self.feed(SourceEvent::Cancel);
                        continue;
                    }
                    let _ = self.feed(SourceEvent::Tick);
                    if last_progress.elapsed() >= Duration::from_millis(100) {
                        last_progress = Instant::now();
                        self.send_progress();
                    }
                }
                Got::Shutdown => {
                    if let Some(mut s) = stream.take() {
                        let _ = s.send.reset(WireCode::Shutdown.varint());
                    }
                    self.link_down("agent shutting down".into());
                    self.run_actions(&mut stream).await;
                    if self.report.is_none() {
                        return Err(MigrateRunError::Shutdown);
                    }
                }
            }
        }
        if let Some(mut s) = stream.take() {
            let _ = s.send.finish();
            // Let B read to the end before the stream handles go.
            let _ = tokio::time::timeout(Duration::from_secs(2), s.send.stopped()).await;
        }
        self.send_progress();
        let r = self.report.take().ok_or(MigrateRunError::Shutdown)?;
        // One lock: a second one in the same expression would wait for the first.
        let (dirty_tracking, hash_passes) = {
            let sc = lock(&self.scanner);
            (sc.kind(), sc.passes())
        };
        let report = MigrationReport {
            region: self.region.name().into(),
            to: self.opts.to.clone(),
            outcome: outcome_name(r.outcome).into(),
            size: self.region.geometry().size,
            total_ms: r.total_ms,
            precopy_ms: r.precopy_ms,
            downtime_ms: r.downtime_ms,
            downtime_error_ms: r.downtime_error_ms,
            postcopy_ms: r.postcopy_ms,
            bytes_sent: r.bytes_sent,
            bytes_acked: r.bytes_acked,
            rounds: r.rounds,
            postcopy_faults: r.postcopy_faults,
            deferred_chunks: r.deferred_chunks,
            bandwidth_bps: r.bandwidth,
            rtt_ms: r.rtt_ms,
            freeze: self.opts.freeze.label(),
            dirty_tracking: dirty_tracking.into(),
            hash_passes,
            restarts: self.restart,
        };
        if r.outcome == Outcome::Migrated {
            Ok(report)
        } else {
            Err(MigrateRunError::Aborted {
                region: self.region.name().into(),
                peer: self.opts.to.clone(),
                outcome: outcome_name(r.outcome),
                why: self
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "the destination did not take it".into()),
                resumed: if matches!(self.opts.freeze, Freeze::Snapshot) {
                    ""
                } else {
                    " and its writer runs on"
                },
            })
        }
    }

    /// A frame from B; an error says how the stream ended.
    fn on_frame(&mut self, (at, f): Inbound) -> Result<(), FrameFault> {
        let g = self.region.geometry();
        let m = match f {
            Ok(Some(m)) => m,
            Ok(None) => return Err(FrameFault::Lost("the destination closed the stream".into())),
            Err(FrameError::Io(e)) => return Err(FrameFault::Lost(e.to_string())),
            Err(e) => return Err(FrameFault::Protocol(e.code(), e.to_string())),
        };
        let ev = match m {
            MigrateBack::Ack { chunks } => {
                if chunks.len() > super::ACK_BATCH {
                    return Err(FrameFault::Protocol(
                        WireCode::ProtocolViolation,
                        format!("ack of {} chunks", chunks.len()),
                    ));
                }
                let bytes = chunks
                    .iter()
                    .filter(|c| **c < g.chunks())
                    .map(|c| {
                        if self.zero_sent.get(*c) {
                            ZERO_MARKER_BYTES
                        } else {
                            g.chunk_len(*c) as u64
                        }
                    })
                    .sum();
                SourceEvent::Acked { bytes, chunks }
            }
            MigrateBack::Accept {
                generation,
                held_us,
                resumed_us,
            } => SourceEvent::Message(Message::Accept {
                generation,
                // Past an hour it is nonsense; a sum with it must not overflow.
                held: Duration::from_micros(held_us.min(3_600_000_000)),
                resumed: Duration::from_micros(resumed_us),
            }),
            MigrateBack::Pong { at_us, peer_us } => SourceEvent::Message(Message::Pong {
                at: Duration::from_micros(at_us),
                peer: Duration::from_micros(peer_us),
            }),
            MigrateBack::Status {
                generation,
                missing,
            } => {
                let missing = match missing {
                    None => None,
                    Some(b) => Some(Bitmap::from_bytes(&b, g.chunks()).map_err(|e| {
                        FrameFault::Protocol(
                            WireCode::ProtocolViolation,
                            format!("status bitmap: {e}"),
                        )
                    })?),
                };
                SourceEvent::Message(Message::Status {
                    generation,
                    missing,
                })
            }
            MigrateBack::Fetch { chunks } => {
                if chunks.len() > super::ACK_BATCH {
                    return Err(FrameFault::Protocol(
                        WireCode::ProtocolViolation,
                        format!("fetch of {} chunks", chunks.len()),
                    ));
                }
                SourceEvent::Message(Message::Fetch { chunks })
            }
            MigrateBack::Dropped => SourceEvent::Message(Message::Dropped),
            MigrateBack::Error(e) => {
                let mut m = e.message;
                m.truncate(crate::proto::MAX_MESSAGE_LEN);
                return Err(FrameFault::Refused(format!(
                    "the destination refused: {}: {m}",
                    e.kind
                )));
            }
        };
        self.feed_at(at.saturating_duration_since(self.started), ev)
            .map_err(|e| FrameFault::Protocol(WireCode::ProtocolViolation, e.to_string()))
    }

    /// Performs queued actions in order.
    async fn run_actions(&mut self, stream: &mut Option<Stream>) {
        while let Some(a) = self.queue.pop_front() {
            match a {
                SourceAction::Send(m) => {
                    let frame = match m {
                        Message::Begin {
                            generation,
                            size,
                            chunk_size,
                        } => MigrateFrame::Begin {
                            generation,
                            size,
                            chunk_size,
                        },
                        Message::Handover {
                            generation,
                            stale,
                            sent,
                        } => MigrateFrame::Handover {
                            generation,
                            stale: stale.to_bytes(),
                            sent,
                        },
                        Message::Query { generation } => MigrateFrame::Query { generation },
                        Message::Stale { chunks } => MigrateFrame::Stale {
                            chunks: chunks.to_bytes(),
                        },
                        Message::Ping { at } => MigrateFrame::Ping {
                            at_us: super::micros(at),
                        },
                        other => {
                            tracing::warn!("source engine asked to send {other:?}: ignored");
                            continue;
                        }
                    };
                    if let Some(s) = stream.as_ref() {
                        let st = s.conn.stats();
                        tracing::debug!(region = %self.region.name(), cwnd = st.path.cwnd, rtt = ?st.path.rtt, lost = st.path.lost_packets, congestion_events = st.path.congestion_events, "sending a control frame");
                    }
                    if let Some(s) = stream.as_mut() {
                        if let Err(e) = s.send.write_all(&encode(&frame)).await {
                            if let Some(s) = stream.take() {
                                self.write_failed(s, &e).await;
                            }
                        }
                    }
                }
                SourceAction::SendChunks { chunks, urgent } => {
                    if let Some(s) = stream.as_mut() {
                        let r = if urgent {
                            // Faulted chunks go on their own high-priority stream, ahead
                            // of the background chunks queued on the migration stream.
                            if s.urgent.is_none() {
                                let generation = lock(&self.engine).generation();
                                match open_urgent(&s.conn, self.region.name(), generation).await {
                                    Ok(u) => s.urgent = Some(u),
                                    Err(e) => tracing::debug!("opening the urgent lane: {e}"),
                                }
                            }
                            match s.urgent.as_mut() {
                                Some(u) => self.send_chunks(u, &chunks).await,
                                None => self.send_chunks(&mut s.send, &chunks).await,
                            }
                        } else {
                            self.send_chunks(&mut s.send, &chunks).await
                        };
                        if let Err(e) = r {
                            if let Some(s) = stream.take() {
                                self.write_failed(s, &e).await;
                            }
                        }
                    }
                }
                SourceAction::CollectDirty => {
                    let last = lock(&self.engine).phase() == SourcePhase::FinalSync;
                    let sc = self.scanner.clone();
                    self.pending = Some(Pending::Collect(tokio::task::spawn_blocking(move || {
                        lock(&sc).collect(last)
                    })));
                }
                SourceAction::Freeze => {
                    let f = self.opts.freeze.clone();
                    let sc = self.scanner.clone();
                    tracing::info!(region = %self.region.name(), freeze = ?f, "freezing the writer");
                    let (inner, name) = (self.inner.clone(), self.region.name().to_string());
                    self.pending = Some(Pending::Freeze(tokio::task::spawn_blocking(move || {
                        // Replicas of the region get nothing newer than what B will
                        // have: epochs stop before the final collection.
                        inner.publications.hold(&name);
                        let began = Instant::now();
                        match f {
                            Freeze::Snapshot => Ok(()),
                            Freeze::Pid(p) => stop_pid(p),
                            Freeze::Hook(h) => h(true),
                            Freeze::WriteProtect => lock(&sc).freeze_writers(),
                        }
                        .map(|()| began)
                    })));
                }
                SourceAction::Resume => {
                    self.inner.publications.release_hold(self.region.name());
                    // A freeze still running is waited for, then undone.
                    if let Some(Pending::Freeze(h)) = self.pending.take() {
                        let _ = h.await;
                        self.frozen = true;
                    }
                    if self.frozen {
                        self.frozen = false;
                        let f = self.opts.freeze.clone();
                        tracing::info!(region = %self.region.name(), freeze = ?f, "resuming the writer");
                        let sc = self.scanner.clone();
                        let _ = tokio::task::spawn_blocking(move || match f {
                            Freeze::Snapshot => {}
                            Freeze::Pid(p) => cont_pid(p),
                            Freeze::WriteProtect => {
                                if let Err(e) = lock(&sc).thaw_writers() {
                                    tracing::warn!("releasing the held writers: {e}");
                                }
                            }
                            Freeze::Hook(h) => {
                                if let Err(e) = h(false) {
                                    tracing::warn!("resume hook: {e}");
                                }
                            }
                        })
                        .await;
                    }
                }
                SourceAction::Release => {
                    tracing::info!(region = %self.region.name(), to = %self.opts.to, "region handed over: this agent no longer owns it");
                    // Replicas of the old copy would follow a region nobody writes here.
                    // With writers frozen, one last epoch gives them exactly what B took
                    // over; a snapshot froze nothing, so they keep what they had.
                    let how = match self.opts.freeze {
                        Freeze::Snapshot => crate::agent::replicate::Handover::Snapshot,
                        _ => crate::agent::replicate::Handover::Frozen,
                    };
                    self.inner
                        .publications
                        .handed_over(self.region.name(), &self.opts.to, how);
                }
                SourceAction::Report(r) => {
                    self.pending = None;
                    if lock(&self.engine).owns() {
                        self.inner.publications.release_hold(self.region.name());
                    }
                    self.report = Some(r);
                }
            }
        }
    }

    /// Reads and sends chunks in order, recording the hash of what was sent.
    async fn send_chunks(
        &mut self,
        send: &mut quinn::SendStream,
        chunks: &[u64],
    ) -> Result<(), std::io::Error> {
        let g = self.region.geometry();
        let mut buf: Vec<u8> = Vec::with_capacity(256 << 10);
        let mut since_yield = 0usize;
        for &c in chunks {
            let len = g.chunk_len(c) as usize;
            // quinn's streams are not tokio coop resources: while the window has room a
            // batch (up to a window: MiBs of reads, hashes and writes) never yields, and
            // the task stamping B's frames (an Accept, acks) on the same worker waited
            // for it (engine downtime 29 ms where the app's pause was 14 ms).
            since_yield += len;
            if since_yield >= 256 << 10 {
                since_yield = 0;
                tokio::task::yield_now().await;
            }
            let mut data = vec![0u8; len];
            self.region
                .read_at(g.offset(c), &mut data)
                .map_err(std::io::Error::other)?;
            lock(&self.scanner).sent(c, &data);
            let zero = is_zero(&data);
            if zero {
                self.zero_sent.set(c);
            } else {
                self.zero_sent.clear(c);
            }
            if zero {
                buf.extend_from_slice(&encode(&MigrateFrame::Zero { chunk: c }));
            } else {
                if let Some(p) = self.pacer.as_mut() {
                    let wait = p.take(self.started.elapsed(), len as u64);
                    if !wait.is_zero() {
                        if !buf.is_empty() {
                            send.write_all(&std::mem::take(&mut buf)).await?;
                        }
                        tokio::time::sleep(wait).await;
                    }
                }
                buf.extend_from_slice(&encode(&MigrateFrame::Chunk(ChunkHeader {
                    chunk: c,
                    len: len as u32,
                    hash: *blake3::hash(&data).as_bytes(),
                })));
                send.write_all(&std::mem::take(&mut buf)).await?;
                send.write_chunk(bytes::Bytes::from(data))
                    .await
                    .map_err(std::io::Error::from)?;
            }
            if buf.len() >= 64 << 10 {
                send.write_all(&std::mem::take(&mut buf)).await?;
            }
        }
        if !buf.is_empty() {
            send.write_all(&buf).await?;
        }
        tokio::task::yield_now().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Pacer;
    use std::time::Duration;

    #[test]
    fn pacer_holds_the_rate_after_the_burst() {
        // 1 MB/s, 64 KiB chunks sent back to back as soon as allowed.
        let mut p = Pacer::new(1_000_000);
        let mut now = Duration::ZERO;
        let mut sent = 0u64;
        while now < Duration::from_secs(10) {
            now += p.take(now, 65536);
            sent += 65536;
        }
        let rate = sent as f64 / now.as_secs_f64();
        assert!(
            (rate - 1e6).abs() < 0.05e6,
            "{rate} bytes/s over {now:?} for a 1 MB/s cap"
        );
    }

    #[test]
    fn pacer_lets_a_burst_go_after_idling_but_no_more() {
        let mut p = Pacer::new(10_000_000); // burst 100 kB -> 256 KiB floor
        assert_eq!(p.take(Duration::ZERO, 200_000), Duration::ZERO);
        // Idle for a minute: the bucket is capped at the burst, not 600 MB.
        let t = Duration::from_secs(60);
        assert_eq!(p.take(t, 262_144), Duration::ZERO);
        let w = p.take(t, 1_000_000);
        assert!(
            w >= Duration::from_millis(99) && w <= Duration::from_millis(101),
            "{w:?}"
        );
    }
}
