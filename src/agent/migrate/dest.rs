//! The destination side (host B): serves a migration stream opened by the region's
//! owner, driving [`MigrateDest`]. Everything from the peer is checked before use: frame
//! caps, chunk indices and lengths against our region, blake3 of every chunk, bitmap
//! lengths; the engine checks generations and phases. A bad frame closes the stream
//! with a named code (the source sees a link loss and aborts, or asks again).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::receive::{ReceivingApp, RecvState};
use super::{frame_cap, lock, micros, AbortOnDrop, Slot, ACK_BATCH};
use crate::agent::Inner;
use crate::engine::migrate::{
    DestAction, DestEvent, DestPhase, Message, MigrateDest, MigrateError, SourcePhase,
};
use crate::fault::uffd;
use crate::proto::codec::{read_exact, read_frame, write_frame, FrameError};
use crate::proto::{
    ErrorKind, ErrorReply, MigrateBack, MigrateFrame, MigrateOpen, Reply, WireCode, MAX_MESSAGE_LEN,
};
use crate::region::{Bitmap, FileRegion, Geometry};
use std::os::fd::AsRawFd;

async fn refuse(send: &mut quinn::SendStream, kind: ErrorKind, mut message: String) {
    message.truncate(MAX_MESSAGE_LEN);
    let _ = write_frame(send, &Reply::Error(ErrorReply { kind, message })).await;
    let _ = send.finish();
}

pub(crate) type Fail = (WireCode, String);

/// Serves one migration stream from `peer` for `region`.
pub(crate) async fn serve(
    inner: Arc<Inner>,
    peer: String,
    region: Arc<FileRegion>,
    open: MigrateOpen,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let g = region.geometry();
    let name = region.name().to_string();
    if open.size != g.size || open.chunk_size != g.chunk_size {
        return refuse(
            &mut send,
            ErrorKind::Mismatch,
            format!(
                "region {name} on {} is {} bytes in {} byte chunks; the source's is {} in {}",
                inner.name, g.size, g.chunk_size, open.size, open.chunk_size
            ),
        )
        .await;
    }
    let expected = lock(&inner.migrations.expected).get(&name).cloned();
    if let Some(from) = expected.filter(|from| *from != peer) {
        return refuse(
            &mut send,
            ErrorKind::Busy,
            format!(
                "region {name} on {} waits for a migration from {from}, not from {peer}",
                inner.name
            ),
        )
        .await;
    }
    if inner.publications.is_published(&name) {
        return refuse(
            &mut send,
            ErrorKind::Busy,
            format!("agent {} replicates region {name} (it owns it)", inner.name),
        )
        .await;
    }
    if inner.replicas.get(&name).is_some_and(|e| e.is_connected()) {
        return refuse(
            &mut send,
            ErrorKind::Busy,
            format!(
                "region {name} on {} is a live replica of another owner",
                inner.name
            ),
        )
        .await;
    }
    // Take (or reuse, after a reconnect) this region's destination engine.
    let taken: Result<Arc<Mutex<MigrateDest>>, String> = {
        let mut map = lock(&inner.migrations.map);
        let decision = match map.get(&name) {
            Some(Slot::Dest { engine, peer: p }) if *p == peer => Ok(Some(engine.clone())),
            Some(Slot::Dest { engine, peer: p }) => {
                if lock(engine).phase() == DestPhase::Receiving {
                    Err(format!("region {name} is being migrated here from {p}"))
                } else {
                    Ok(None)
                }
            }
            Some(Slot::Source { engine, .. }) => {
                let e = lock(engine);
                match e.phase() {
                    SourcePhase::Idle | SourcePhase::Aborted(_) | SourcePhase::Released => Ok(None),
                    p => Err(format!(
                        "region {name} is being migrated away from {} ({p:?})",
                        inner.name
                    )),
                }
            }
            None => Ok(None),
        };
        match decision {
            Err(why) => Err(why),
            Ok(Some(e)) => Ok(e),
            Ok(None) => {
                let e = Arc::new(Mutex::new(MigrateDest::new()));
                map.insert(
                    name.clone(),
                    Slot::Dest {
                        peer: peer.clone(),
                        engine: e.clone(),
                    },
                );
                Ok(e)
            }
        }
    };
    let engine = match taken {
        Ok(e) => e,
        Err(why) => return refuse(&mut send, ErrorKind::Busy, why).await,
    };
    // A replication of the region that ended when it was migrated away is history now
    // that it is coming back.
    inner.publications.forget_ended(&name);
    let app = lock(&inner.migrations.receiving).get(&name).cloned();
    if open.postcopy && app.is_none() {
        return refuse(
            &mut send,
            ErrorKind::BadRequest,
            format!(
                "post-copy needs an application receiving region {name} on {} (client::receive)",
                inner.name
            ),
        )
        .await;
    }
    let opened = match &app {
        Some(a) => a.region.file().try_clone(),
        None => OpenOptions::new().write(true).open(region.path()),
    };
    let writer = match opened {
        Ok(f) => f,
        Err(e) => {
            return refuse(
                &mut send,
                ErrorKind::Io,
                format!("cannot open {} for writing: {e}", region.path().display()),
            )
            .await
        }
    };
    if write_frame(&mut send, &Reply::Migrating).await.is_err() {
        return;
    }
    // Which start of the source this session talks to, and which session this is.
    let source_boot = inner.peers.boot(&peer);
    let session = app
        .as_ref()
        .map(|a| a.sessions.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1);
    let started = Instant::now();
    let now = || started.elapsed();
    let mut s = Session {
        peer: &peer,
        region: &region,
        writer: &writer,
        engine: &engine,
        send,
        cap: frame_cap(g.chunks()),
        refusal: None,
        app: app.clone(),
        migrations: &inner.migrations,
        handover_read: None,
        started,
    };
    // A reused engine: this is a new connection.
    let _ = lock(&engine).handle(now(), DestEvent::LinkUp);
    let r = s.run(started, recv).await;
    let actions = lock(&engine).handle(now(), DestEvent::LinkDown);
    if let Ok(actions) = actions {
        if actions.contains(&DestAction::Discard) {
            if let Some(a) = &app {
                a.state.send_replace(RecvState::Failed);
            }
            tracing::warn!(peer = %peer, region = %name, "migration abandoned: the partial copy in {} is not valid", region.path().display());
        }
    }
    if let (Some(app), Some(session)) = (&app, session) {
        if lock(&engine).phase() == DestPhase::Owner {
            inner.tasks.spawn(watch_lost_source(
                inner.clone(),
                app.clone(),
                engine.clone(),
                peer.clone(),
                source_boot,
                session,
            ));
        }
    }
    match r {
        Ok(()) => tracing::debug!(peer = %peer, region = %name, "migration stream ended"),
        Err((code, why)) => {
            tracing::warn!(peer = %peer, region = %name, code = code.name(), "closing migration stream: {why}");
            let kind = match code {
                WireCode::UnexpectedFrame | WireCode::ProtocolViolation => {
                    Some(s.refusal.unwrap_or(ErrorKind::BadRequest))
                }
                _ => None,
            };
            if let Some(kind) = kind {
                let mut message = why.clone();
                message.truncate(MAX_MESSAGE_LEN);
                let _ = write_frame(
                    &mut s.send,
                    &MigrateBack::Error(ErrorReply { kind, message }),
                )
                .await;
                let _ = s.send.finish();
            } else {
                let _ = s.send.reset(code.varint());
            }
        }
    }
}

/// Post-copy lost its stream to the source (`session` was the last one): the
/// application's threads touching a stale page wait for the source to come back. If it
/// comes back as a new start (it restarted: it no longer has the chunks), or not within
/// `fault_timeout`, post-copy fails: the application is told, and from then on every
/// thread touching a page that is not here gets SIGBUS rather than waiting forever —
/// until a new session resumes (the source came back after all) or the application goes.
async fn watch_lost_source(
    inner: Arc<Inner>,
    app: Arc<ReceivingApp>,
    engine: Arc<Mutex<MigrateDest>>,
    peer: String,
    boot: Option<u64>,
    session: u64,
) {
    use std::sync::atomic::Ordering;
    let lost = Instant::now();
    let timeout = inner.config.fault_timeout;
    let resumed = || {
        app.sessions.load(Ordering::Acquire) != session
            || lock(&engine).phase() != DestPhase::Owner
            || app.detached.load(Ordering::Acquire)
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LOST_SOURCE_POLL) => {}
            _ = inner.shutdown.cancelled() => return,
        }
        if resumed() {
            return;
        }
        let stale = lock(&engine).missing_count();
        let why = match inner.peers.boot(&peer) {
            Some(b) if boot.is_some_and(|old| old != b) => format!(
                "the source agent {peer} restarted during post-copy: the {stale} chunks that were only there are lost"
            ),
            _ if lost.elapsed() >= timeout => format!(
                "no contact with the source agent {peer} for {timeout:?} (fault_timeout) after the connection was lost, during post-copy; {stale} chunks never arrived"
            ),
            _ => continue,
        };
        app.fail(&why);
        break;
    }
    // Failed: answer every fault with SIGBUS (the fd is non-blocking; polled, so that a
    // session that takes the fd over again is not raced by a second registration).
    // Threads already waiting on faults the last session read are woken: they fault
    // again, and those faults are answered here.
    let fd = app.uffd.as_raw_fd();
    if let Err(e) = uffd::wake(fd, app.base, app.map_len) {
        tracing::debug!(region = %app.region.name(), "waking the waiting threads: {e}");
    }
    while !resumed() && !inner.shutdown.is_cancelled() {
        loop {
            match uffd::read_event(fd) {
                Ok(Some(uffd::Event::Fault { tid, .. })) => app.sigbus(tid),
                Ok(Some(uffd::Event::Unmap { .. })) => {
                    app.detached.store(true, Ordering::Release);
                    return;
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(region = %app.region.name(), "reading the userfaultfd after post-copy failed: {e}");
                    return;
                }
            }
        }
        tokio::time::sleep(LOST_SOURCE_POLL).await;
    }
}

/// How often a watch over a lost post-copy source looks.
const LOST_SOURCE_POLL: Duration = Duration::from_millis(20);

struct Session<'a> {
    peer: &'a str,
    region: &'a FileRegion,
    writer: &'a std::fs::File,
    engine: &'a Mutex<MigrateDest>,
    send: quinn::SendStream,
    cap: usize,
    /// What to tell the peer when the engine refused one of its frames.
    refusal: Option<ErrorKind>,
    /// An application receiving the region (post-copy possible).
    app: Option<Arc<ReceivingApp>>,
    migrations: &'a super::Migrations,
    /// When the last `Handover` was taken from the stream: its `Accept` says how long
    /// this side held the application after it (dropping stale copies included).
    handover_read: Option<Instant>,
    /// The origin of the engine's clock (its `now`), which `Pong` and `Accept` report.
    started: Instant,
}

/// Unregisters a session's inbox when the session ends.
struct InboxGuard<'a> {
    migrations: &'a super::Migrations,
    region: String,
    tx: Inbox,
}

impl Drop for InboxGuard<'_> {
    fn drop(&mut self) {
        let mut boxes = lock(&self.migrations.inboxes);
        if boxes
            .get(&self.region)
            .is_some_and(|(_, tx)| tx.same_channel(&self.tx))
        {
            boxes.remove(&self.region);
        }
    }
}

/// How an engine refusal is answered: busy (another migration holds the region, or the
/// generation was fenced) or a bad request.
fn refusal_kind(e: &MigrateError) -> ErrorKind {
    match e {
        MigrateError::Busy(_) | MigrateError::NotOwner | MigrateError::Fenced { .. } => {
            ErrorKind::Busy
        }
        _ => ErrorKind::BadRequest,
    }
}

fn engine_fail(e: MigrateError) -> Fail {
    match e {
        MigrateError::Busy(_)
        | MigrateError::NotOwner
        | MigrateError::Unexpected { .. }
        | MigrateError::Fenced { .. }
        | MigrateError::Generation { .. } => (WireCode::UnexpectedFrame, e.to_string()),
        _ => (WireCode::ProtocolViolation, e.to_string()),
    }
}

/// One frame from the source, checked against the region: the engine's event and, for a
/// chunk, its number and bytes (`None`: a zero chunk).
pub(crate) struct Inbound {
    ev: DestEvent,
    chunk: Option<(u64, Option<Vec<u8>>)>,
}

/// Reads and checks the next frame. `Ok(None)`: the stream ended.
async fn next_inbound(
    recv: &mut quinn::RecvStream,
    cap: usize,
    g: &Geometry,
    peer: &str,
    region: &str,
) -> Result<Option<Inbound>, Fail> {
    let frame = match read_frame::<_, MigrateFrame>(recv, cap).await {
        Ok(Some(f)) => f,
        Ok(None) => return Ok(None),
        Err(FrameError::Io(_)) => return Ok(None), // the connection is gone
        Err(e) => return Err((e.code(), e.to_string())),
    };
    Ok(Some(match frame {
        MigrateFrame::Begin {
            generation,
            size,
            chunk_size,
        } => {
            if size != g.size || chunk_size != g.chunk_size {
                return Err((
                    WireCode::ProtocolViolation,
                    format!("Begin for {size} bytes in {chunk_size} byte chunks does not match the region"),
                ));
            }
            tracing::info!(peer, region, generation, "incoming migration");
            Inbound {
                ev: DestEvent::Message(Message::Begin {
                    generation,
                    size,
                    chunk_size,
                }),
                chunk: None,
            }
        }
        MigrateFrame::Chunk(h) => {
            if h.chunk >= g.chunks() || h.len != g.chunk_len(h.chunk) {
                return Err((
                    WireCode::ProtocolViolation,
                    format!(
                        "chunk {} of {} bytes does not fit the region",
                        h.chunk, h.len
                    ),
                ));
            }
            let mut buf = vec![0u8; h.len as usize];
            read_exact(recv, &mut buf)
                .await
                .map_err(|e| (e.code(), e.to_string()))?;
            if blake3::hash(&buf).as_bytes() != &h.hash {
                return Err((
                    WireCode::ProtocolViolation,
                    format!("chunk {} failed blake3 verification", h.chunk),
                ));
            }
            Inbound {
                ev: DestEvent::Arrived(vec![h.chunk]),
                chunk: Some((h.chunk, Some(buf))),
            }
        }
        MigrateFrame::Zero { chunk } => {
            if chunk >= g.chunks() {
                return Err((
                    WireCode::ProtocolViolation,
                    format!("zero chunk {chunk} is past the end ({} chunks)", g.chunks()),
                ));
            }
            Inbound {
                ev: DestEvent::Arrived(vec![chunk]),
                chunk: Some((chunk, None)),
            }
        }
        MigrateFrame::Handover {
            generation,
            stale,
            sent,
        } => {
            tracing::debug!(region, sent, "handover received");
            let stale = Bitmap::from_bytes(&stale, g.chunks())
                .map_err(|e| (WireCode::ProtocolViolation, format!("stale bitmap: {e}")))?;
            Inbound {
                ev: DestEvent::Message(Message::Handover {
                    generation,
                    stale,
                    sent,
                }),
                chunk: None,
            }
        }
        MigrateFrame::Query { generation } => Inbound {
            ev: DestEvent::Message(Message::Query { generation }),
            chunk: None,
        },
        MigrateFrame::Stale { chunks } => {
            let chunks = Bitmap::from_bytes(&chunks, g.chunks())
                .map_err(|e| (WireCode::ProtocolViolation, format!("stale bitmap: {e}")))?;
            Inbound {
                ev: DestEvent::Message(Message::Stale { chunks }),
                chunk: None,
            }
        }
        MigrateFrame::Ping { at_us } => Inbound {
            ev: DestEvent::Message(Message::Ping {
                at: Duration::from_micros(at_us),
            }),
            chunk: None,
        },
    }))
}

/// Where a destination session takes its inbound frames from (the migration stream's
/// reader and the urgent lane).
pub(crate) type Inbox = tokio::sync::mpsc::Sender<Result<Option<Inbound>, Fail>>;

/// Serves the urgent lane of a migration in post-copy: chunk frames only, handed to the
/// running session of `region` with `peer`. Nothing is answered on this stream.
pub(crate) async fn serve_urgent(
    inner: Arc<Inner>,
    peer: String,
    region: Arc<FileRegion>,
    generation: u64,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let _ = send.finish();
    let name = region.name().to_string();
    let inbox = {
        let engines = lock(&inner.migrations.map);
        let ours = matches!(
            engines.get(&name),
            Some(Slot::Dest { engine, peer: p }) if *p == peer && lock(engine).generation() == generation
        );
        drop(engines);
        let boxes = lock(&inner.migrations.inboxes);
        match boxes.get(&name) {
            Some((p, tx)) if ours && *p == peer => Some(tx.clone()),
            _ => None,
        }
    };
    let Some(inbox) = inbox else {
        tracing::debug!(%peer, region = %name, generation, "urgent lane for no running migration session");
        let _ = recv.stop(WireCode::UnexpectedFrame.varint());
        return;
    };
    tracing::debug!(%peer, region = %name, generation, "post-copy urgent lane open");
    let g = region.geometry();
    let cap = frame_cap(g.chunks());
    loop {
        match next_inbound(&mut recv, cap, &g, &peer, &name).await {
            Ok(Some(inb)) if inb.chunk.is_some() => {
                if inbox.send(Ok(Some(inb))).await.is_err() {
                    return; // the session ended
                }
            }
            Ok(Some(_)) => {
                tracing::warn!(%peer, region = %name, "urgent lane carried a control frame: closing it");
                let _ = recv.stop(WireCode::UnexpectedFrame.varint());
                return;
            }
            Ok(None) => return,
            Err((code, why)) => {
                tracing::warn!(%peer, region = %name, code = code.name(), "closing the urgent lane: {why}");
                let _ = recv.stop(code.varint());
                return;
            }
        }
    }
}

impl Session<'_> {
    async fn run(&mut self, started: Instant, recv: quinn::RecvStream) -> Result<(), Fail> {
        let now = || started.elapsed();
        let g = self.region.geometry();
        // Frames are read by their own task, so that the application's faults are
        // served while a chunk is half-read (reading a frame is not cancel-safe).
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Option<Inbound>, Fail>>(16);
        lock(&self.migrations.inboxes).insert(
            self.region.name().to_string(),
            (self.peer.to_string(), tx.clone()),
        );
        let _inbox = InboxGuard {
            migrations: self.migrations,
            region: self.region.name().to_string(),
            tx: tx.clone(),
        };
        let (cap, peer, name) = (
            self.cap,
            self.peer.to_string(),
            self.region.name().to_string(),
        );
        let _reader = AbortOnDrop(tokio::spawn(async move {
            let mut recv = recv;
            loop {
                let r = next_inbound(&mut recv, cap, &g, &peer, &name).await;
                let more = matches!(r, Ok(Some(_)));
                if let Err((code, _)) = &r {
                    let _ = recv.stop(code.varint());
                }
                if tx.send(r).await.is_err() || !more {
                    return;
                }
            }
        }));
        let faults = match &self.app {
            Some(app) => {
                let fd = app
                    .uffd
                    .try_clone()
                    .map_err(|e| (WireCode::Shutdown, format!("userfaultfd: {e}")))?;
                // SAFETY: the AsyncFd owns `fd` (an OwnedFd, a dup of the application's
                // uffd), so it stays open and is not reused while registered.
                let registered = unsafe {
                    tokio::io::unix::AsyncFd::register_with_interest(
                        fd,
                        tokio::io::Interest::READABLE,
                    )
                };
                Some(registered.map_err(|e| (WireCode::Shutdown, format!("userfaultfd: {e}")))?)
            }
            None => None,
        };
        loop {
            // Faults are read once the application runs (before that it waits anyway).
            let owner = lock(self.engine).phase() == DestPhase::Owner
                && !self
                    .app
                    .as_ref()
                    .is_some_and(|a| a.detached.load(std::sync::atomic::Ordering::Acquire));
            let fault_ready = async {
                match (&faults, owner) {
                    (Some(f), true) => f.readable().await.map(Some),
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                item = rx.recv() => match item {
                    None | Some(Ok(None)) => return Ok(()),
                    Some(Err(f)) => return Err(f),
                    Some(Ok(Some(inb))) => {
                        if matches!(inb.ev, DestEvent::Message(Message::Handover { .. })) {
                            self.handover_read = Some(Instant::now());
                        }
                        let handled = lock(self.engine).handle(now(), inb.ev);
                        let actions = match handled {
                            Ok(a) => a,
                            Err(e) => {
                                self.refusal = Some(refusal_kind(&e));
                                let owner = matches!(
                                    lock(self.engine).phase(),
                                    DestPhase::Owner | DestPhase::Complete
                                );
                                if owner && matches!(e, MigrateError::Busy(_)) {
                                    return Err((
                                        WireCode::UnexpectedFrame,
                                        format!(
                                            "region {} was migrated here from {} and this agent owns it: {} has no newer copy to migrate (if it restarted, it no longer remembers the handover); migrate it back from here instead",
                                            self.region.name(),
                                            self.peer,
                                            self.peer
                                        ),
                                    ));
                                }
                                return Err(engine_fail(e));
                            }
                        };
                        self.perform(actions, inb.chunk.as_ref()).await?;
                    }
                },
                ready = fault_ready => {
                    let Ok(Some(mut guard)) = ready else {
                        return Err((WireCode::Shutdown, "userfaultfd failed".into()));
                    };
                    let Some(app) = self.app.clone() else { continue };
                    loop {
                        match uffd::read_event(app.uffd.as_raw_fd()) {
                            Ok(Some(uffd::Event::Fault { addr, .. })) => {
                                self.on_fault(&app, addr, now()).await?;
                            }
                            Ok(Some(uffd::Event::Unmap { .. })) => {
                                // The application unmapped (part of) the region: the rest
                                // goes into the memfd the agent holds.
                                tracing::info!(region = %self.region.name(), "the receiving application unmapped the region");
                                app.detached.store(true, std::sync::atomic::Ordering::Release);
                            }
                            Ok(Some(other)) => {
                                tracing::debug!(region = %self.region.name(), "receiving mapping: {other:?}");
                            }
                            Ok(None) => {
                                guard.clear_ready();
                                break;
                            }
                            Err(e) => {
                                return Err((WireCode::Shutdown, format!("reading the userfaultfd: {e}")));
                            }
                        }
                    }
                }
            }
        }
    }

    /// The receiving application touched a page that is not here.
    async fn on_fault(
        &mut self,
        app: &Arc<ReceivingApp>,
        addr: u64,
        now: std::time::Duration,
    ) -> Result<(), Fail> {
        let g = self.region.geometry();
        if addr < app.base || addr >= app.base + g.size {
            app.wake(addr);
            return Ok(());
        }
        let c = g.chunk_of(addr - app.base);
        let actions = {
            let mut e = lock(self.engine);
            if !e.is_missing(c) {
                drop(e);
                // Installed since the fault was raised (or a hole of a current chunk).
                app.resolve_present(addr);
                return Ok(());
            }
            e.handle(now, DestEvent::Fault(c))
        };
        let actions = actions.map_err(engine_fail)?;
        self.perform(actions, None).await
    }

    async fn perform(
        &mut self,
        actions: Vec<DestAction>,
        chunk: Option<&(u64, Option<Vec<u8>>)>,
    ) -> Result<(), Fail> {
        let g = self.region.geometry();
        for a in actions {
            match a {
                DestAction::Install(chunks) => {
                    let Some((c, data)) = chunk else { continue };
                    if !chunks.contains(c) {
                        continue;
                    }
                    let len = g.chunk_len(*c) as usize;
                    let zeros;
                    let bytes: &[u8] = match data {
                        Some(d) => d,
                        None => {
                            zeros = vec![0u8; len];
                            &zeros
                        }
                    };
                    // After the handover the application runs: fill its mapping without
                    // ever overwriting a page; before, write the memfd or file.
                    let postcopy =
                        self.app.is_some() && lock(self.engine).phase() != DestPhase::Receiving;
                    if let (true, Some(app)) = (postcopy, &self.app) {
                        if let Err(e) = app.install(&g, *c, bytes) {
                            // The chunk is missing again: the next Status says so and A
                            // sends it again after the reconnect.
                            let _ = lock(self.engine).handle(
                                std::time::Duration::ZERO,
                                DestEvent::InstallFailed(vec![*c]),
                            );
                            return Err((WireCode::Shutdown, e));
                        }
                    } else {
                        self.writer
                            .write_all_at(&bytes[..len], g.offset(*c))
                            .map_err(|e| {
                                (WireCode::Shutdown, format!("writing the region: {e}"))
                            })?;
                    }
                }
                DestAction::Ack(chunks) => {
                    for part in chunks.chunks(ACK_BATCH) {
                        write_frame(
                            &mut self.send,
                            &MigrateBack::Ack {
                                chunks: part.to_vec(),
                            },
                        )
                        .await
                        .map_err(|e| (WireCode::Cancelled, e.to_string()))?;
                    }
                }
                DestAction::Send(m) => {
                    let back = match m {
                        // The application was released just before this (`Resume`).
                        Message::Accept {
                            generation, held, ..
                        } => MigrateBack::Accept {
                            generation,
                            held_us: micros(self.handover_read.map_or(held, |t| t.elapsed())),
                            // On the clock of the engine's `now` and of `Pong`.
                            resumed_us: micros(self.started.elapsed()),
                        },
                        Message::Pong { at, peer } => MigrateBack::Pong {
                            at_us: micros(at),
                            peer_us: micros(peer),
                        },
                        Message::Status {
                            generation,
                            missing,
                        } => MigrateBack::Status {
                            generation,
                            missing: missing.map(|b| b.to_bytes()),
                        },
                        Message::Fetch { chunks } => MigrateBack::Fetch { chunks },
                        Message::Dropped => MigrateBack::Dropped,
                        other => {
                            tracing::warn!("destination engine asked to send {other:?}: ignored");
                            continue;
                        }
                    };
                    write_frame(&mut self.send, &back)
                        .await
                        .map_err(|e| (WireCode::Cancelled, e.to_string()))?;
                }
                DestAction::Drop(chunks) => {
                    if let Some(app) = &self.app {
                        // Freeing memory takes a while (~190 ms per GiB here): off the
                        // runtime's threads, but in order with the frames around it.
                        let app = Arc::clone(app);
                        let t = Instant::now();
                        let n =
                            tokio::task::spawn_blocking(move || app.punch(&g, |c| chunks.get(c)))
                                .await
                                .map_err(|e| (WireCode::Shutdown, format!("punching: {e}")))?
                                .map_err(|e| (WireCode::Shutdown, e))?;
                        tracing::debug!(region = %self.region.name(), chunks = n, took = ?t.elapsed(), "dropped stale chunks");
                    }
                }
                DestAction::Resume => {
                    if let Some(app) = &self.app {
                        let stale = lock(self.engine).missing_count();
                        app.state.send_replace(RecvState::Owner { stale });
                        tracing::info!(peer = %self.peer, region = %self.region.name(), stale, "migration: this agent owns the region now; the application runs");
                    } else {
                        tracing::info!(peer = %self.peer, region = %self.region.name(), "migration: this agent owns the region now");
                    }
                }
                DestAction::Discard => {
                    if let Some(app) = &self.app {
                        app.state.send_replace(RecvState::Failed);
                    }
                }
                DestAction::Complete => {
                    if let Some(app) = &self.app {
                        app.finish();
                    }
                    // A `pagewire receive` target is done waiting (even if its client left).
                    lock(&self.migrations.expected).remove(self.region.name());
                    tracing::info!(peer = %self.peer, region = %self.region.name(), "migration complete: every chunk is here");
                }
            }
        }
        Ok(())
    }
}
