//! The destination side (host B): serves a migration stream opened by the region's
//! owner, driving [`MigrateDest`]. Everything from the peer is checked before use: frame
//! caps, chunk indices and lengths against our region, blake3 of every chunk, bitmap
//! lengths; the engine checks generations and phases. A bad frame closes the stream
//! with a named code (the source sees a link loss and aborts, or asks again).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{frame_cap, lock, Slot, ACK_BATCH};
use crate::agent::Inner;
use crate::engine::migrate::{
    DestAction, DestEvent, DestPhase, Message, MigrateDest, MigrateError, SourcePhase,
};
use crate::proto::codec::{read_exact, read_frame, write_frame, FrameError};
use crate::proto::{
    ErrorKind, ErrorReply, MigrateBack, MigrateFrame, MigrateOpen, Reply, WireCode, MAX_MESSAGE_LEN,
};
use crate::region::{Bitmap, FileRegion};

async fn refuse(send: &mut quinn::SendStream, kind: ErrorKind, mut message: String) {
    message.truncate(MAX_MESSAGE_LEN);
    let _ = write_frame(send, &Reply::Error(ErrorReply { kind, message })).await;
    let _ = send.finish();
}

type Fail = (WireCode, String);

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
    let writer = match OpenOptions::new().write(true).open(region.path()) {
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
    let started = Instant::now();
    let now = || started.elapsed();
    let mut s = Session {
        peer: &peer,
        region: &region,
        writer: &writer,
        engine: &engine,
        send,
        recv,
        cap: frame_cap(g.chunks()),
        refusal: None,
    };
    // A reused engine: this is a new connection.
    let _ = lock(&engine).handle(now(), DestEvent::LinkUp);
    let r = s.run(started).await;
    let actions = lock(&engine).handle(now(), DestEvent::LinkDown);
    if let Ok(actions) = actions {
        if actions.contains(&DestAction::Discard) {
            tracing::warn!(peer = %peer, region = %name, "migration abandoned: the partial copy in {} is not valid", region.path().display());
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
            let _ = s.recv.stop(code.varint());
        }
    }
}

struct Session<'a> {
    peer: &'a str,
    region: &'a FileRegion,
    writer: &'a std::fs::File,
    engine: &'a Mutex<MigrateDest>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    cap: usize,
    /// What to tell the peer when the engine refused one of its frames.
    refusal: Option<ErrorKind>,
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

impl Session<'_> {
    async fn run(&mut self, started: Instant) -> Result<(), Fail> {
        let now = || started.elapsed();
        let g = self.region.geometry();
        let mut data = vec![0u8; g.chunk_size as usize];
        loop {
            let frame = match read_frame::<_, MigrateFrame>(&mut self.recv, self.cap).await {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(FrameError::Io(_)) => return Ok(()), // the connection is gone
                Err(e) => return Err((e.code(), e.to_string())),
            };
            let (ev, chunk) = match frame {
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
                    tracing::info!(peer = %self.peer, region = %self.region.name(), generation, "incoming migration");
                    (
                        DestEvent::Message(Message::Begin {
                            generation,
                            size,
                            chunk_size,
                        }),
                        None,
                    )
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
                    let buf = &mut data[..h.len as usize];
                    read_exact(&mut self.recv, buf)
                        .await
                        .map_err(|e| (e.code(), e.to_string()))?;
                    if blake3::hash(buf).as_bytes() != &h.hash {
                        return Err((
                            WireCode::ProtocolViolation,
                            format!("chunk {} failed blake3 verification", h.chunk),
                        ));
                    }
                    (DestEvent::Arrived(vec![h.chunk]), Some((h.chunk, false)))
                }
                MigrateFrame::Zero { chunk } => {
                    if chunk >= g.chunks() {
                        return Err((
                            WireCode::ProtocolViolation,
                            format!("zero chunk {chunk} is past the end ({} chunks)", g.chunks()),
                        ));
                    }
                    (DestEvent::Arrived(vec![chunk]), Some((chunk, true)))
                }
                MigrateFrame::Handover {
                    generation,
                    stale,
                    sent,
                } => {
                    let stale = Bitmap::from_bytes(&stale, g.chunks())
                        .map_err(|e| (WireCode::ProtocolViolation, format!("stale bitmap: {e}")))?;
                    (
                        DestEvent::Message(Message::Handover {
                            generation,
                            stale,
                            sent,
                        }),
                        None,
                    )
                }
                MigrateFrame::Query { generation } => {
                    (DestEvent::Message(Message::Query { generation }), None)
                }
            };
            let handled = lock(self.engine).handle(now(), ev);
            let actions = match handled {
                Ok(a) => a,
                Err(e) => {
                    self.refusal = Some(refusal_kind(&e));
                    return Err(engine_fail(e));
                }
            };
            for a in actions {
                match a {
                    DestAction::Install(chunks) => {
                        let Some((c, zero)) = chunk else { continue };
                        if !chunks.contains(&c) {
                            continue;
                        }
                        let len = g.chunk_len(c) as usize;
                        if zero {
                            data[..len].fill(0);
                        }
                        self.writer
                            .write_all_at(&data[..len], g.offset(c))
                            .map_err(|e| {
                                (WireCode::Shutdown, format!("writing the region: {e}"))
                            })?;
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
                            Message::Accept { generation } => MigrateBack::Accept { generation },
                            Message::Status {
                                generation,
                                missing,
                            } => MigrateBack::Status {
                                generation,
                                missing: missing.map(|b| b.to_bytes()),
                            },
                            Message::Fetch { chunks } => MigrateBack::Fetch { chunks },
                            other => {
                                tracing::warn!(
                                    "destination engine asked to send {other:?}: ignored"
                                );
                                continue;
                            }
                        };
                        write_frame(&mut self.send, &back)
                            .await
                            .map_err(|e| (WireCode::Cancelled, e.to_string()))?;
                    }
                    DestAction::Resume => {
                        tracing::info!(peer = %self.peer, region = %self.region.name(), "migration: this agent owns the region now");
                    }
                    DestAction::Discard => {}
                    DestAction::Complete => {
                        tracing::info!(peer = %self.peer, region = %self.region.name(), "migration complete: every chunk is here");
                    }
                }
            }
        }
    }
}
