//! Lazy mounts, agent side: an application attached a region (see [`crate::client`]) and
//! handed us its mapping's descriptors. A pull fills the mapping in the background
//! (installing chunks with `UFFDIO_COPY`, or writing them into the shared file and
//! flipping their state word in mprotect mode); every fault becomes an urgent fetch of
//! its chunk, coalesced with other faults on the same chunk, and the bulk copy moves next
//! to it (locality). When every chunk is here the uffd is unregistered and the mapping
//! runs at native speed.
//!
//! What the application sees when things go wrong:
//! * the serving peer goes away: faulting threads wait; fetches resume when it is back;
//! * it stays away longer than `fault_timeout` while a thread waits: the mount fails,
//!   every waiting thread (and any later touch of a missing page) gets SIGBUS, as on a
//!   file mapping whose disk failed;
//! * the application exits or unmaps the region: the session ends and everything it held
//!   (descriptors, the pull, fault bookkeeping) is freed.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::pull::{Dest, FetchError, Fetcher, PullHandle};
use super::Inner;
use crate::control::{AttachFds, MountStatus};
use crate::fault::{state, uffd, ChunkTable, Mechanism};
use crate::region::{Geometry, RegionError};

/// Latency samples kept per mount (the newest win).
const MAX_SAMPLES: usize = 1 << 16;
/// Finished mounts kept for `status`.
const KEEP_FINISHED: usize = 16;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Setting up a mount from the application's descriptors failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The descriptors or the mapping description do not fit the region.
    #[error("bad attach: {0}")]
    Bad(String),
    /// A descriptor could not be used.
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
}

enum Kind {
    Uffd { fd: OwnedFd },
    Mprotect { table: ChunkTable },
}

/// The application's mapping, as a pull destination.
pub(crate) struct MountSink {
    label: PathBuf,
    page: u64,
    base: AtomicU64,
    map_len: u64,
    /// Set when an install found the application's mapping gone (it exited or unmapped).
    app_gone: AtomicBool,
    /// Every chunk is here and the range is unregistered: a late install (an urgent fetch
    /// that raced the background copy's last chunk) has nothing left to do.
    complete: AtomicBool,
    /// Released (set to `None`) when the session ends, so the descriptors close even
    /// while status still lists the mount.
    io: RwLock<Option<(File, Kind)>>,
}

impl MountSink {
    fn err(&self, op: &'static str, chunk: u64, e: impl std::fmt::Display) -> RegionError {
        RegionError::Io {
            op,
            chunk,
            path: self.label.clone(),
            source: std::io::Error::other(e.to_string()),
        }
    }

    fn gone(&self, chunk: u64) -> RegionError {
        self.err("installing", chunk, "the application detached")
    }

    /// Installs a verified chunk; pages already there (the application's own writes) are
    /// kept.
    pub(crate) fn install(&self, g: &Geometry, chunk: u64, data: &[u8]) -> Result<(), RegionError> {
        let io = self.io.read().unwrap_or_else(|e| e.into_inner());
        if self.complete.load(Ordering::Acquire) {
            // The chunk is here already (every chunk is); after the unregistration a
            // UFFDIO_COPY would fail with ENOENT, which is not the application leaving.
            return Ok(());
        }
        let Some((file, kind)) = io.as_ref() else {
            return Err(self.gone(chunk));
        };
        match kind {
            Kind::Uffd { fd } => {
                let len = (data.len() as u64).next_multiple_of(self.page);
                let padded;
                let src = if len == data.len() as u64 {
                    data.as_ptr()
                } else {
                    let mut v = data.to_vec();
                    v.resize(len as usize, 0);
                    padded = v;
                    padded.as_ptr()
                };
                let dst = self.base.load(Ordering::Acquire) + g.offset(chunk);
                // SAFETY: `src` points at `len` readable bytes (`data` or its padded copy,
                // both alive until the call returns).
                unsafe { uffd::copy(fd.as_raw_fd(), dst, src, len, self.page) }.map_err(|e| {
                    if matches!(e, uffd::UffdError::Gone) {
                        self.app_gone.store(true, Ordering::Release);
                    }
                    self.err("installing", chunk, e)
                })?;
            }
            Kind::Mprotect { table } => {
                if table.claim(chunk) {
                    if let Err(e) = file.write_all_at(data, g.offset(chunk)) {
                        table.set(chunk, state::MISSING);
                        return Err(self.err("writing", chunk, e));
                    }
                    table.set(chunk, state::PRESENT);
                }
            }
        }
        Ok(())
    }

    /// Chunks known to be zero. uffd: nothing (they stay holes; a fault there gets a zero
    /// page); mprotect: mark them present (the shared file's holes read as zero).
    pub(crate) fn zero(&self, _g: &Geometry, first: u64, count: u64) -> Result<(), RegionError> {
        let io = self.io.read().unwrap_or_else(|e| e.into_inner());
        if let Some((_, Kind::Mprotect { table })) = io.as_ref() {
            for c in first..first.saturating_add(count).min(table.chunks()) {
                if table.claim(c) {
                    table.set(c, state::PRESENT);
                }
            }
        }
        Ok(())
    }

    /// Lets a thread that faulted on a present chunk go on: a zero page where the page is
    /// a hole (a zero chunk), a plain wake where it is there.
    fn release_page(&self, addr: u64) -> Result<(), uffd::UffdError> {
        let io = self.io.read().unwrap_or_else(|e| e.into_inner());
        if let Some((_, Kind::Uffd { fd })) = io.as_ref() {
            let page = addr & !(self.page - 1);
            uffd::zero(fd.as_raw_fd(), page, self.page, self.page)?;
        }
        Ok(())
    }

    pub(crate) fn read_chunk(&self, g: &Geometry, chunk: u64) -> Result<Vec<u8>, RegionError> {
        let io = self.io.read().unwrap_or_else(|e| e.into_inner());
        let Some((file, _)) = io.as_ref() else {
            return Err(self.gone(chunk));
        };
        let mut buf = vec![0; g.chunk_len(chunk) as usize];
        file.read_exact_at(&mut buf, g.offset(chunk))
            .map_err(|e| self.err("reading", chunk, e))?;
        Ok(buf)
    }

    fn fail_all(&self) {
        let io = self.io.read().unwrap_or_else(|e| e.into_inner());
        if let Some((_, Kind::Mprotect { table })) = io.as_ref() {
            table.fail_missing();
        }
    }

    /// Every chunk is here: marks the sink complete and unregisters the range. Holds the
    /// write lock so an install in progress finishes first and later ones see `complete`.
    fn finish(&self) -> Result<(), uffd::UffdError> {
        let io = self.io.write().unwrap_or_else(|e| e.into_inner());
        self.complete.store(true, Ordering::Release);
        if let Some((_, Kind::Uffd { fd })) = io.as_ref() {
            uffd::unregister(
                fd.as_raw_fd(),
                self.base.load(Ordering::Acquire),
                self.map_len,
            )?;
        }
        Ok(())
    }

    fn release(&self) {
        *self.io.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[derive(Default)]
struct Faults {
    served: u64,
    failed: u64,
    samples: Vec<u32>,
    next_sample: usize,
    /// Faults waiting, by chunk: when they came and which thread (uffd) and page.
    pending: HashMap<u64, Vec<Waiter>>,
}

struct Waiter {
    since: Instant,
    tid: u32,
    addr: u64,
}

impl Faults {
    fn record(&mut self, us: u64) {
        let v = us.min(u32::MAX as u64) as u32;
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(v);
        } else {
            self.samples[self.next_sample] = v;
            self.next_sample = (self.next_sample + 1) % MAX_SAMPLES;
        }
    }

    fn percentiles(&self) -> (Option<u64>, Option<u64>) {
        if self.samples.is_empty() {
            return (None, None);
        }
        let mut s = self.samples.clone();
        s.sort_unstable();
        let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize] as u64;
        (Some(at(0.5)), Some(at(0.99)))
    }
}

/// One attached mapping.
pub(crate) struct Mount {
    id: u64,
    peer: String,
    region: String,
    label: String,
    pid: Option<i32>,
    mechanism: Mechanism,
    geometry: Geometry,
    sink: Arc<MountSink>,
    fetcher: Fetcher,
    faults: Mutex<Faults>,
    phase: Mutex<&'static str>,
    /// The application went away (unmapped, exited): the session loop ends on this, not
    /// on the phase, which keeps saying "failed" for a mount that failed first.
    detached: AtomicBool,
    started: Instant,
    finished: Mutex<Option<Instant>>,
}

impl Mount {
    pub(crate) fn status(&self) -> MountStatus {
        let t = self.fetcher.pull.status();
        let f = lock(&self.faults);
        let (p50, p99) = f.percentiles();
        let elapsed = lock(&self.finished)
            .map(|e| e - self.started)
            .unwrap_or_else(|| self.started.elapsed())
            .as_secs_f64();
        MountStatus {
            id: self.id,
            peer: self.peer.clone(),
            region: self.region.clone(),
            label: self.label.clone(),
            pid: self.pid,
            mechanism: self.mechanism.name().into(),
            state: lock(&self.phase).to_string(),
            chunks_present: t.chunks_done,
            chunks_total: t.chunks_total,
            bytes_present: t.bytes_done,
            bytes_total: t.bytes_total,
            faults: f.served,
            faults_failed: f.failed,
            fault_p50_us: p50,
            fault_p99_us: p99,
            background_rate_bps: t.rate_bps,
            elapsed_s: elapsed,
        }
    }

    /// The file an application still has mapped through this mount (`None` for a
    /// memfd, or once it detached).
    pub(crate) fn attached_file(&self) -> Option<&Path> {
        let file = Path::new(&self.label);
        (file.is_absolute() && !self.detached.load(Ordering::Acquire)).then_some(file)
    }

    fn set_phase(&self, p: &'static str) {
        *lock(&self.phase) = p;
    }

    /// The application is gone: ends the session. A failed mount stays "failed".
    fn detach(&self) {
        self.detached.store(true, Ordering::Release);
        let mut ph = lock(&self.phase);
        if *ph != "failed" {
            *ph = "detached";
        }
    }

    /// A fault on `chunk` (at page `addr`, by thread `tid`; 0/0 in mprotect mode).
    fn on_fault(self: &Arc<Self>, chunk: u64, addr: u64, tid: u32) {
        let now = Instant::now();
        if *lock(&self.phase) == "failed" {
            self.fail_waiter(tid);
            return;
        }
        if self.fetcher.pull.is_present(chunk) {
            // Raced with the background copy, or a zero chunk left as a hole.
            let r = self.sink.release_page(addr);
            let mut f = lock(&self.faults);
            f.served += 1;
            f.record(now.elapsed().as_micros() as u64);
            if let Err(e) = r {
                tracing::debug!(id = self.id, "releasing page {addr:#x}: {e}");
            }
            return;
        }
        let first = {
            let mut f = lock(&self.faults);
            let w = f.pending.entry(chunk).or_default();
            w.push(Waiter {
                since: now,
                tid,
                addr,
            });
            w.len() == 1
        };
        if first {
            let m = self.clone();
            tokio::spawn(async move { m.serve_fault(chunk).await });
        }
    }

    async fn serve_fault(self: Arc<Self>, chunk: u64) {
        loop {
            match self.fetcher.ensure(chunk).await {
                Ok(_) => break,
                Err(FetchError::Shutdown) => return,
                Err(FetchError::Connection(why)) => {
                    // Wait for the peer; the timeout check fails the mount if it takes too
                    // long.
                    tracing::debug!(id = self.id, chunk, "fault fetch interrupted: {why}");
                    if *lock(&self.phase) == "failed" {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    tracing::warn!(id = self.id, chunk, "fault fetch failed: {e}");
                    self.fail(&format!("chunk {chunk}: {e}"));
                    return;
                }
            }
        }
        let waiters = lock(&self.faults)
            .pending
            .remove(&chunk)
            .unwrap_or_default();
        for w in &waiters {
            // A zero chunk was not installed: give these pages zero pages. A data chunk
            // was installed by UFFDIO_COPY, which woke them: this is then a no-op.
            if self.mechanism == Mechanism::Userfaultfd {
                if let Err(e) = self.sink.release_page(w.addr) {
                    tracing::debug!(id = self.id, "releasing page {:#x}: {e}", w.addr);
                }
            }
        }
        let mut f = lock(&self.faults);
        for w in waiters {
            f.served += 1;
            f.record(w.since.elapsed().as_micros() as u64);
        }
    }

    fn fail_waiter(&self, tid: u32) {
        lock(&self.faults).failed += 1;
        if let (Some(pid), true) = (self.pid, tid != 0) {
            // SAFETY: tgkill with plain integers; signals the faulting thread of the
            // attached process.
            unsafe { libc::syscall(libc::SYS_tgkill, pid, tid as libc::pid_t, libc::SIGBUS) };
        }
    }

    /// Fails the mount: waiting threads, and later touches of missing pages, get SIGBUS.
    fn fail(&self, why: &str) {
        {
            let mut ph = lock(&self.phase);
            if *ph == "failed" {
                return;
            }
            if *ph == "complete" {
                // Every page is in the mapping: nothing can fail any more, and no thread
                // may get SIGBUS for a late error.
                tracing::debug!(id = self.id, "after completion: {why}");
                return;
            }
            *ph = "failed";
        }
        tracing::warn!(id = self.id, region = %self.region, "mount failed: {why}; faulting threads get SIGBUS");
        self.fetcher.pull.cancel_token().cancel();
        self.sink.fail_all();
        let waiters: Vec<Waiter> = lock(&self.faults)
            .pending
            .drain()
            .flat_map(|(_, w)| w)
            .collect();
        for w in waiters {
            self.fail_waiter(w.tid);
        }
    }

    /// Fails the mount when a fault has waited longer than `timeout`.
    fn check_timeouts(&self, timeout: Duration) {
        let oldest = lock(&self.faults)
            .pending
            .values()
            .flat_map(|w| w.iter().map(|w| w.since))
            .min();
        if let Some(t) = oldest {
            if t.elapsed() > timeout {
                self.fail(&format!(
                    "a fault waited more than {timeout:?} for peer {}",
                    self.peer
                ));
            }
        }
    }
}

/// Validates the application's descriptors and builds the sink.
fn build_sink(
    fds: Vec<OwnedFd>,
    req: &AttachFds,
    g: &Geometry,
) -> Result<(Arc<MountSink>, Option<OwnedFd>), MountError> {
    let page = uffd::page_size();
    let want_len = g.size.next_multiple_of(page);
    if req.map_len != want_len || req.base % page != 0 || req.base == 0 {
        return Err(MountError::Bad(format!(
            "mapping at {:#x} of {} bytes does not fit a region of {} bytes",
            req.base, req.map_len, g.size
        )));
    }
    if (g.chunk_size as u64) % page != 0 {
        return Err(MountError::Bad(format!(
            "chunk size {} is not a multiple of the page size {page}",
            g.chunk_size
        )));
    }
    let mut fds = fds.into_iter();
    let file = File::from(
        fds.next()
            .ok_or_else(|| MountError::Bad("no backing file descriptor".into()))?,
    );
    let len = file
        .metadata()
        .map_err(|e| MountError::Io("backing file", e))?
        .len();
    if len < g.size {
        return Err(MountError::Bad(format!(
            "backing file is {len} bytes, the region {}",
            g.size
        )));
    }
    let (kind, events) = match req.mechanism {
        Mechanism::Userfaultfd => {
            let fd = fds
                .next()
                .ok_or_else(|| MountError::Bad("no userfaultfd descriptor".into()))?;
            let reader = fd.try_clone().map_err(|e| MountError::Io("dup uffd", e))?;
            (Kind::Uffd { fd }, Some(reader))
        }
        Mechanism::Mprotect => {
            let table_file = File::from(
                fds.next()
                    .ok_or_else(|| MountError::Bad("no chunk table descriptor".into()))?,
            );
            let table = ChunkTable::map(&table_file, g.chunks())
                .map_err(|e| MountError::Io("chunk table", e))?;
            let sock = fds
                .next()
                .ok_or_else(|| MountError::Bad("no request socket".into()))?;
            (Kind::Mprotect { table }, Some(sock))
        }
        Mechanism::Auto => return Err(MountError::Bad("mechanism must be chosen".into())),
    };
    let sink = Arc::new(MountSink {
        label: PathBuf::from(&req.label),
        page,
        base: AtomicU64::new(req.base),
        map_len: req.map_len,
        app_gone: AtomicBool::new(false),
        complete: AtomicBool::new(false),
        io: RwLock::new(Some((file, kind))),
    });
    Ok((sink, events))
}

/// A started mount: the session loop drives it until the application goes away.
pub(crate) struct Session {
    pub(crate) mount: Arc<Mount>,
    handle: PullHandle,
    events: AsyncFd<OwnedFd>,
    /// The fill ended (completed or failed).
    fill_done: bool,
}

/// Starts filling the mapping described by `req` and `fds`.
pub(crate) fn start(
    inner: &Arc<Inner>,
    from: &str,
    region: &str,
    geometry: Geometry,
    req: &AttachFds,
    fds: Vec<OwnedFd>,
    pid: Option<i32>,
) -> Result<Session, MountError> {
    let (sink, events) = build_sink(fds, req, &geometry)?;
    let events = events.ok_or_else(|| MountError::Bad("no event descriptor".into()))?;
    set_nonblocking(&events).map_err(|e| MountError::Io("event descriptor", e))?;
    // SAFETY: the AsyncFd owns `events` (an OwnedFd), so the descriptor stays open and is
    // not reused while registered; it is deregistered when the AsyncFd drops, before the
    // descriptor closes.
    let events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| MountError::Io("event descriptor", e.into_parts().1))?;
    let handle = super::pull::launch(
        inner.clone(),
        from,
        region,
        geometry,
        Dest::Mount(sink.clone()),
        PathBuf::from(&req.label),
        "mount",
    );
    let mount = Arc::new(Mount {
        id: handle.id(),
        peer: from.into(),
        region: region.into(),
        label: req.label.clone(),
        pid,
        mechanism: req.mechanism,
        geometry,
        sink,
        fetcher: handle.fetcher(),
        faults: Mutex::new(Faults::default()),
        phase: Mutex::new("filling"),
        detached: AtomicBool::new(false),
        started: Instant::now(),
        finished: Mutex::new(None),
    });
    {
        let mut m = lock(&inner.mounts);
        m.insert(mount.id, mount.clone());
        let finished: Vec<u64> = m
            .iter()
            .filter(|(_, m)| lock(&m.finished).is_some())
            .map(|(id, _)| *id)
            .collect();
        for old in finished
            .iter()
            .take(finished.len().saturating_sub(KEEP_FINISHED))
        {
            m.remove(old);
        }
    }
    tracing::info!(id = mount.id, peer = from, region, label = %req.label, ?pid, mechanism = req.mechanism.name(), "mount started");
    Ok(Session {
        mount,
        handle,
        events,
        fill_done: false,
    })
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Why a session loop returned.
pub(crate) enum SessionEvent {
    /// Every chunk is here (uffd unregistered): nothing more to serve.
    Complete,
    /// The fill failed. Call `run` again: it keeps answering faults (with SIGBUS) until
    /// the application goes away.
    Failed(String),
    /// The application unmapped the region or its mapping is gone.
    Detached,
}

impl Session {
    /// Serves faults until the fill completes or fails, or the application detaches.
    /// After `Complete` or `Detached` there is nothing more to serve.
    pub(crate) async fn run(&mut self, timeout: Duration) -> SessionEvent {
        let m = self.mount.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                r = &mut self.handle.task, if !self.fill_done => {
                    self.fill_done = true;
                    return match r {
                        Ok(Ok(_)) => {
                            if let Err(e) = m.sink.finish() {
                                tracing::debug!(id = m.id, "unregister: {e}");
                            }
                            m.set_phase("complete");
                            *lock(&m.finished) = Some(Instant::now());
                            tracing::info!(id = m.id, region = %m.region, faults = lock(&m.faults).served, "mount complete: every chunk is here");
                            // Drop our descriptors: the mapping is the application's now.
                            m.sink.release();
                            SessionEvent::Complete
                        }
                        Ok(Err(_)) if m.sink.app_gone.load(Ordering::Acquire) => {
                            m.detach();
                            SessionEvent::Detached
                        }
                        Ok(Err(e)) => {
                            m.fail(&e.to_string());
                            SessionEvent::Failed(e.to_string())
                        }
                        Err(e) => {
                            m.fail(&e.to_string());
                            SessionEvent::Failed(e.to_string())
                        }
                    };
                }
                g = self.events.readable() => {
                    let mut guard = match g {
                        Ok(g) => g,
                        Err(e) => {
                            m.fail(&format!("event descriptor: {e}"));
                            m.detach();
                            return SessionEvent::Detached;
                        }
                    };
                    let fd = self.events.get_ref().as_raw_fd();
                    loop {
                        let r = match m.mechanism {
                            Mechanism::Userfaultfd => read_uffd(&m, fd),
                            _ => read_requests(&m, fd),
                        };
                        match r {
                            Ok(true) => continue,
                            Ok(false) => {
                                guard.clear_ready();
                                break;
                            }
                            Err(why) => {
                                m.fail(&why);
                                m.detach();
                                return SessionEvent::Detached;
                            }
                        }
                    }
                    if m.detached.load(Ordering::Acquire) {
                        return SessionEvent::Detached;
                    }
                }
                _ = tick.tick() => m.check_timeouts(timeout),
            }
        }
    }

    /// Ends the session: stops the fill and frees everything it holds.
    pub(crate) fn end(self, why: &str) {
        let m = &self.mount;
        if lock(&m.finished).is_none() {
            *lock(&m.finished) = Some(Instant::now());
        }
        {
            let mut ph = lock(&m.phase);
            if *ph == "filling" {
                *ph = "detached";
            }
        }
        self.handle.cancel();
        m.sink.release();
        tracing::info!(id = m.id, region = %m.region, "mount session ended: {why}");
    }
}

/// Reads one uffd event: `Ok(false)` when none is pending.
fn read_uffd(m: &Arc<Mount>, fd: i32) -> Result<bool, String> {
    let ev = match uffd::read_event(fd) {
        Ok(Some(ev)) => ev,
        Ok(None) => return Ok(false),
        Err(e) => return Err(format!("reading userfaultfd: {e}")),
    };
    let base = m.sink.base.load(Ordering::Acquire);
    let end = base + m.sink.map_len;
    match ev {
        uffd::Event::Fault { addr, tid, .. } => {
            if addr >= base && addr < end {
                let chunk = m.geometry.chunk_of(addr - base);
                m.on_fault(chunk, addr, tid);
            }
        }
        uffd::Event::Unmap { start, end: e } => {
            if start < end && e > base {
                tracing::info!(id = m.id, "application unmapped the region");
                m.detach();
            }
        }
        uffd::Event::Remap { from, to, len } => {
            if from == base && len == m.sink.map_len {
                m.sink.base.store(to, Ordering::Release);
            } else if from < end && from + len > base {
                tracing::info!(id = m.id, "application remapped part of the region");
                m.detach();
            }
        }
        uffd::Event::Remove { .. } => {} // holes read as zero again: faults get zero pages
        uffd::Event::Other(e) => tracing::debug!(id = m.id, "ignoring uffd event {e:#x}"),
    }
    Ok(true)
}

/// Reads one mprotect-mode request (a little-endian chunk number per packet).
fn read_requests(m: &Arc<Mount>, fd: i32) -> Result<bool, String> {
    let mut b = [0u8; 16];
    // SAFETY: reading into a 16-byte stack buffer.
    let n = unsafe { libc::recv(fd, b.as_mut_ptr().cast(), b.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(false),
            Some(libc::EINTR) => Ok(true),
            _ => Err(format!("request socket: {e}")),
        };
    }
    if n == 0 {
        // The application closed its end: it is going away.
        m.detach();
        return Ok(false);
    }
    if n != 8 {
        tracing::warn!(id = m.id, "ignoring a malformed fault request of {n} bytes");
        return Ok(true);
    }
    let chunk = u64::from_le_bytes(b[..8].try_into().unwrap_or([0xff; 8]));
    if chunk >= m.geometry.chunks() {
        tracing::warn!(id = m.id, chunk, "ignoring a fault request past the end");
        return Ok(true);
    }
    m.on_fault(chunk, 0, 0);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The background copy's last chunk completes the mount (the range is unregistered)
    /// while an urgent fetch of that chunk is still in flight: its late install must not
    /// read as the application leaving (which failed the mount and sent SIGBUS to the
    /// faulting threads).
    #[test]
    fn an_install_after_completion_is_not_an_error() {
        let page = uffd::page_size();
        let g = Geometry::new(4 * page, page).unwrap();
        let file = crate::fault::memfd("mount-test", g.size).unwrap();
        // SAFETY: a new shared mapping of our memfd; unmapped at the end.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                g.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let Ok(u) = uffd::create() else {
            eprintln!("userfaultfd unavailable here: skipped");
            return;
        };
        uffd::api(u.as_raw_fd()).unwrap();
        uffd::register_missing(u.as_raw_fd(), base as u64, g.size).unwrap();
        let req = AttachFds {
            base: base as u64,
            map_len: g.size,
            mechanism: Mechanism::Userfaultfd,
            label: "memfd".into(),
        };
        let (sink, _events) = build_sink(vec![file.into(), u], &req, &g).unwrap();
        let data = vec![7u8; page as usize];
        sink.install(&g, 0, &data).unwrap();
        // Without the completion mark, a UFFDIO_COPY into the unregistered range fails.
        uffd::unregister(
            {
                let io = sink.io.read().unwrap();
                match io.as_ref() {
                    Some((_, Kind::Uffd { fd })) => fd.as_raw_fd(),
                    _ => unreachable!(),
                }
            },
            base as u64,
            page,
        )
        .unwrap();
        assert!(sink.install(&g, 0, &data).is_err());
        sink.finish().unwrap();
        sink.install(&g, 1, &data).unwrap();
        sink.release();
        sink.install(&g, 2, &data).unwrap();
        // SAFETY: our mapping, no references into it remain.
        let page0 = unsafe { std::slice::from_raw_parts(base as *const u8, page as usize) };
        assert_eq!(page0, &data[..]);
        // SAFETY: as above.
        unsafe { libc::munmap(base, g.size as usize) };
    }
}
