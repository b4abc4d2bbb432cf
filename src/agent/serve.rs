//! Serving a peer's requests: region info, urgent fetches and bulk copies.
//!
//! Every byte from the peer is checked: a frame that does not decode, is too large or
//! comes at the wrong time closes *that stream* with a named code and one log line; a
//! request that is well-formed but wrong (unknown region, chunk out of range) gets an
//! error reply. Nothing here panics on peer data, and the connection keeps serving.

use std::sync::Arc;
use std::time::Duration;

use super::Inner;
use crate::engine::pull::{BulkSender, Next};
use crate::proto::codec::{read_frame, write_frame, FrameError, FrameReader};
use crate::proto::{
    valid_name, BulkControl, BulkStart, ChunkHeader, ErrorKind, ErrorReply, RegionInfo, Reply,
    Request, WireCode,
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
    // A request is small except a bulk want-bitmap, which never needs more than our
    // largest region's bitmap: cap by that, not by the protocol's absolute maximum, so a
    // peer opening many streams cannot make us buffer MAX_FRAME on each.
    let cap = inner.request_cap();
    let req = match tokio::time::timeout(REQUEST_TIMEOUT, read_frame::<_, Request>(&mut recv, cap))
        .await
    {
        Err(_) => {
            return refuse(
                &peer,
                &mut send,
                &mut recv,
                WireCode::Timeout,
                &"no request in time",
            )
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
        Request::Replicate(r) => &r.region,
        Request::Migrate(m) => &m.region,
        Request::MigrateUrgent { region, .. } => region,
        Request::Owns { region } => region,
        Request::ReplicationEnded { region, .. } => region,
    };
    if !valid_name(region_name) {
        return reply_error(
            &mut send,
            ErrorKind::BadRequest,
            "invalid region name".into(),
        )
        .await;
    }
    let Some(region) = inner.region(region_name) else {
        let hint = if matches!(req, Request::Migrate(_)) {
            // What the operator of the destination has to do.
            format!(
                ": to receive a migration of it, run `pagewire receive --from {peer} --region {region_name} --to PATH` on {} first (or start an application that receives it, client::receive)",
                inner.name
            )
        } else {
            String::new()
        };
        return reply_error(
            &mut send,
            ErrorKind::UnknownRegion,
            format!("agent {} has no region {region_name:?}{hint}", inner.name),
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
        Request::Replicate(start) => {
            super::replica::serve(inner.clone(), peer, region, start, send, recv).await
        }
        Request::Migrate(open) => {
            super::migrate::dest::serve(inner.clone(), peer, region, open, send, recv).await
        }
        Request::MigrateUrgent { generation, .. } => {
            super::migrate::dest::serve_urgent(inner.clone(), peer, region, generation, send, recv)
                .await
        }
        Request::Owns { .. } => {
            super::migrate::learn_owner(&inner, &peer, region.name());
            let _ = write_frame(&mut send, &Reply::Done).await;
            let _ = send.finish();
        }
        Request::ReplicationEnded { reason, .. } => {
            if reason.len() > crate::proto::MAX_STOP_REASON {
                return refuse(
                    &peer,
                    &mut send,
                    &mut recv,
                    WireCode::ProtocolViolation,
                    &"replication end reason too long",
                );
            }
            super::replica::learn_ended(&inner, &peer, region.name(), &reason);
            let _ = write_frame(&mut send, &Reply::Done).await;
            let _ = send.finish();
        }
        Request::Hello(_) => {}
    }
}

/// Writes one chunk as a reply: a zero marker, or a header and its bytes. The bytes are
/// read into a fresh buffer that is handed to quinn as is (no copy into its send buffer).
async fn send_chunk(
    region: &FileRegion,
    chunk: u64,
    send: &mut quinn::SendStream,
) -> Result<u32, ChunkSendError> {
    let mut buf = vec![0u8; region.geometry().chunk_len(chunk) as usize];
    let read = region
        .read_chunk(chunk, &mut buf)
        .map_err(|e| ChunkSendError::Read(e.to_string()))?;
    match read {
        ChunkRead::Zero => {
            write_frame(
                send,
                &Reply::Zero {
                    first: chunk,
                    count: 1,
                },
            )
            .await?;
            Ok(0)
        }
        ChunkRead::Data(len) => {
            buf.truncate(len as usize);
            let header = Reply::Chunk(ChunkHeader {
                chunk,
                len,
                hash: *blake3::hash(&buf).as_bytes(),
            });
            write_frame(send, &header).await?;
            send.write_chunk(bytes::Bytes::from(buf))
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
    match send_chunk(region, chunk, send).await {
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
    recv: quinn::RecvStream,
) {
    let g = region.geometry();
    let mut sender = match BulkSender::new(g, &start) {
        Ok(s) => s,
        Err(e) => return reply_error(&mut send, ErrorKind::Mismatch, e.to_string()).await,
    };
    // One task both applies the receiver's control frames (credit, seek, have) and sends
    // chunks: no hand-off between tasks on the credit loop, which matters when waking
    // another thread costs tens of microseconds.
    let mut control = FrameReader::new(recv, CONTROL_CAP);
    let mut control_open = true;
    let result: Result<(), String> = async {
        loop {
            // Apply every control frame that has already arrived, without waiting.
            while control_open {
                let frame = tokio::select! {
                    biased;
                    f = control.next::<BulkControl>() => f,
                    _ = std::future::ready(()) => break,
                };
                control_open = apply_control(peer, &mut sender, &mut control, frame)?;
            }
            match sender.next() {
                Next::Done => {
                    write_frame(&mut send, &Reply::Done)
                        .await
                        .map_err(|e| e.to_string())?;
                    let _ = send.finish();
                    return Ok(());
                }
                Next::WaitCredit => {
                    if !control_open {
                        return Err("receiver stopped granting credit".into());
                    }
                    let frame = control.next::<BulkControl>().await;
                    control_open = apply_control(peer, &mut sender, &mut control, frame)?;
                }
                Next::Chunk(c) => {
                    let hole = region.hole_run(c);
                    if hole > 0 {
                        let n = sender.take_run(c, hole);
                        write_frame(&mut send, &Reply::Zero { first: c, count: n })
                            .await
                            .map_err(|e| e.to_string())?;
                        continue;
                    }
                    sender.take_run(c, 1);
                    match send_chunk(&region, c, &mut send).await {
                        Ok(len) => {
                            sender.spend(len);
                            // quinn streams are not tokio coop resources: without this a
                            // bulk loop whose writes never block would keep the worker
                            // from urgent requests for as long as it has credit.
                            tokio::task::yield_now().await;
                        }
                        Err(ChunkSendError::Read(e)) => {
                            let _ = write_frame(&mut send, &error_reply(ErrorKind::Io, e.clone()))
                                .await;
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
        Err(e) => {
            tracing::debug!(peer = %peer, region = %region.name(), "bulk copy ended: {e}");
            let _ = send.reset(WireCode::Cancelled.varint());
        }
    }
}

/// Applies one control frame; returns whether the control direction is still open.
/// A bad frame stops the stream with its code and ends the copy.
fn apply_control(
    peer: &str,
    sender: &mut BulkSender,
    control: &mut FrameReader<quinn::RecvStream>,
    frame: Result<Option<BulkControl>, FrameError>,
) -> Result<bool, String> {
    let code = match frame {
        Ok(Some(c)) => match sender.on_control(c) {
            Ok(()) => return Ok(true),
            Err(e) => {
                tracing::warn!(peer = %peer, code = WireCode::ProtocolViolation.name(), "closing bulk stream: {e}");
                WireCode::ProtocolViolation
            }
        },
        // The receiver finished its side: no more control, keep sending what has credit.
        Ok(None) => return Ok(false),
        Err(FrameError::Io(e)) => return Err(format!("receiver went away: {e}")),
        Err(e) => {
            tracing::warn!(peer = %peer, code = e.code().name(), "closing bulk stream: {e}");
            e.code()
        }
    };
    let _ = control.get_mut().stop(code.varint());
    Err(format!("closed with {}", code.name()))
}
