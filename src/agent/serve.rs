//! Serving a peer's requests: region info, urgent fetches and bulk copies.
//!
//! Every byte from the peer is checked: a frame that does not decode, is too large or
//! comes at the wrong time closes *that stream* with a named code and one log line; a
//! request that is well-formed but wrong (unknown region, chunk out of range) gets an
//! error reply. Nothing here panics on peer data, and the connection keeps serving.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::Inner;
use crate::engine::pull::{BulkSender, Next};
use crate::proto::codec::{read_frame, write_frame, FrameError};
use crate::proto::{
    valid_name, BulkControl, BulkStart, ChunkHeader, ErrorKind, ErrorReply, RegionInfo, Reply,
    Request, WireCode, MAX_FRAME,
};
use crate::region::{ChunkRead, FileRegion};

/// Priority of urgent replies; bulk streams stay at 0.
pub(crate) const URGENT_PRIORITY: i32 = 100;
/// A peer must send its request this soon after opening a stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Cap on a bulk control frame (they are a few bytes).
const CONTROL_CAP: usize = 64;

/// Closes both directions of a stream with `code`, and logs why.
pub(crate) fn refuse(
    peer: &str,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    code: WireCode,
    why: &dyn std::fmt::Display,
) {
    tracing::warn!(peer = %peer, code = code.name(), "closing stream: {why}");
    let _ = send.reset(code.varint());
    let _ = recv.stop(code.varint());
}

fn error_reply(kind: ErrorKind, message: impl Into<String>) -> Reply {
    let mut message = message.into();
    message.truncate(crate::proto::MAX_MESSAGE_LEN);
    Reply::Error(ErrorReply { kind, message })
}

async fn reply_error(send: &mut quinn::SendStream, kind: ErrorKind, message: String) {
    let _ = write_frame(send, &error_reply(kind, message)).await;
    let _ = send.finish();
}

pub(crate) async fn handle_stream(
    inner: Arc<Inner>,
    peer: String,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let req = match tokio::time::timeout(REQUEST_TIMEOUT, read_frame::<_, Request>(&mut recv, MAX_FRAME)).await {
        Err(_) => {
            return refuse(&peer, &mut send, &mut recv, WireCode::Timeout, &"no request in time")
        }
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => return,
        Ok(Err(e)) if !e.is_protocol() => return,
        Ok(Err(e)) => return refuse(&peer, &mut send, &mut recv, e.code(), &e),
    };
    let region_name = match &req {
        Request::Hello(_) => {
            return refuse(
                &peer,
                &mut send,
                &mut recv,
                WireCode::UnexpectedFrame,
                &"hello after the connection was set up",
            )
        }
        Request::RegionInfo { region } | Request::Fetch { region, .. } => region,
        Request::Bulk(b) => &b.region,
    };
    if !valid_name(region_name) {
        return reply_error(&mut send, ErrorKind::BadRequest, "invalid region name".into()).await;
    }
    let Some(region) = inner.region(region_name) else {
        return reply_error(
            &mut send,
            ErrorKind::UnknownRegion,
            format!("agent {} has no region {region_name:?}", inner.name),
        )
        .await;
    };
    match req {
        Request::RegionInfo { .. } => {
            let g = region.geometry();
            let _ = write_frame(
                &mut send,
                &Reply::RegionInfo(RegionInfo {
                    name: region.name().into(),
                    size: g.size,
                    chunk_size: g.chunk_size,
                }),
            )
            .await;
            let _ = send.finish();
        }
        Request::Fetch { chunk, .. } => {
            let _ = send.set_priority(URGENT_PRIORITY);
            serve_fetch(&region, chunk, &mut send).await;
        }
        Request::Bulk(start) => serve_bulk(&peer, region, start, send, recv).await,
        Request::Hello(_) => {}
    }
}

/// Writes one chunk as a reply: a zero marker, or a header and its bytes.
async fn send_chunk(
    region: &FileRegion,
    chunk: u64,
    buf: &mut [u8],
    send: &mut quinn::SendStream,
) -> Result<u32, ChunkSendError> {
    let read = region
        .read_chunk(chunk, buf)
        .map_err(|e| ChunkSendError::Read(e.to_string()))?;
    match read {
        ChunkRead::Zero => {
            write_frame(send, &Reply::Zero { first: chunk, count: 1 }).await?;
            Ok(0)
        }
        ChunkRead::Data(len) => {
            let data = &buf[..len as usize];
            let header = Reply::Chunk(ChunkHeader {
                chunk,
                len,
                hash: *blake3::hash(data).as_bytes(),
            });
            write_frame(send, &header).await?;
            send.write_all(data)
                .await
                .map_err(|e| ChunkSendError::Write(e.into()))?;
            Ok(len)
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ChunkSendError {
    #[error("{0}")]
    Read(String),
    #[error("write: {0}")]
    Write(#[from] std::io::Error),
}

async fn serve_fetch(region: &FileRegion, chunk: u64, send: &mut quinn::SendStream) {
    let g = region.geometry();
    if chunk >= g.chunks() {
        return reply_error(
            send,
            ErrorKind::OutOfRange,
            format!("chunk {chunk} is past the end ({} chunks)", g.chunks()),
        )
        .await;
    }
    let mut buf = vec![0u8; g.chunk_len(chunk) as usize];
    match send_chunk(region, chunk, &mut buf, send).await {
        Ok(_) => {
            let _ = send.finish();
        }
        Err(ChunkSendError::Read(e)) => reply_error(send, ErrorKind::Io, e).await,
        Err(ChunkSendError::Write(_)) => {}
    }
}

async fn serve_bulk(
    peer: &str,
    region: Arc<FileRegion>,
    start: BulkStart,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let g = region.geometry();
    let sender = match BulkSender::new(g, &start) {
        Ok(s) => s,
        Err(e) => return reply_error(&mut send, ErrorKind::Mismatch, e.to_string()).await,
    };
    let state = Arc::new(Mutex::new(sender));
    let wake = Arc::new(Notify::new());
    // Control frames (credit, seek, have) arrive on the receive half; a task applies
    // them so the send loop below never blocks on reading.
    let control = {
        let state = state.clone();
        let wake = wake.clone();
        let peer = peer.to_string();
        tokio::spawn(async move {
            let end = loop {
                match read_frame::<_, BulkControl>(&mut recv, CONTROL_CAP).await {
                    Ok(Some(c)) => {
                        let r = state.lock().map(|mut s| s.on_control(c));
                        match r {
                            Ok(Ok(())) => wake.notify_one(),
                            Ok(Err(e)) => {
                                tracing::warn!(peer = %peer, code = WireCode::ProtocolViolation.name(), "closing bulk stream: {e}");
                                let _ = recv.stop(WireCode::ProtocolViolation.varint());
                                break Some(WireCode::ProtocolViolation);
                            }
                            Err(_) => break Some(WireCode::ProtocolViolation),
                        }
                    }
                    // The receiver finished its side: no more control, keep sending.
                    Ok(None) => break None,
                    Err(FrameError::Io(_)) => break Some(WireCode::Cancelled),
                    Err(e) => {
                        tracing::warn!(peer = %peer, code = e.code().name(), "closing bulk stream: {e}");
                        let _ = recv.stop(e.code().varint());
                        break Some(e.code());
                    }
                }
            };
            wake.notify_one();
            end
        })
    };
    let mut buf = vec![0u8; g.chunk_size as usize];
    let result: Result<(), String> = async {
        loop {
            let notified = wake.notified();
            let next = state.lock().map_err(|_| "state poisoned".to_string())?.next();
            match next {
                Next::Done => {
                    write_frame(&mut send, &Reply::Done).await.map_err(|e| e.to_string())?;
                    let _ = send.finish();
                    return Ok(());
                }
                Next::WaitCredit => {
                    if control.is_finished() {
                        return Err("receiver stopped granting credit".into());
                    }
                    notified.await;
                }
                Next::Chunk(c) => {
                    let hole = region.hole_run(c);
                    if hole > 0 {
                        let n = state.lock().map_err(|_| "poisoned".to_string())?.take_run(c, hole);
                        if n > 0 {
                            write_frame(&mut send, &Reply::Zero { first: c, count: n })
                                .await
                                .map_err(|e| e.to_string())?;
                        }
                        continue;
                    }
                    if state.lock().map_err(|_| "poisoned".to_string())?.take_run(c, 1) == 0 {
                        continue;
                    }
                    match send_chunk(&region, c, &mut buf, &mut send).await {
                        Ok(len) => {
                            if let Ok(mut s) = state.lock() {
                                s.spend(len);
                            }
                        }
                        Err(ChunkSendError::Read(e)) => {
                            let _ = write_frame(&mut send, &error_reply(ErrorKind::Io, e.clone())).await;
                            let _ = send.finish();
                            return Err(e);
                        }
                        Err(ChunkSendError::Write(e)) => return Err(e.to_string()),
                    }
                }
            }
        }
    }
    .await;
    match result {
        Ok(()) => tracing::debug!(peer = %peer, region = %region.name(), "bulk copy sent"),
        Err(e) => tracing::debug!(peer = %peer, region = %region.name(), "bulk copy ended: {e}"),
    }
    control.abort();
}
