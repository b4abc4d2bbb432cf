//! The replica side of replication: a peer (the region's owner) opened a replication
//! stream for a region this agent serves; we answer with our epoch and chunk hashes, then
//! apply the owner's epochs into our copy, in order, acknowledging each once it is
//! written in full.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::watch;

use super::Inner;
use crate::control::ReplicaStatus;
use crate::proto::codec::{read_exact, read_frame, write_frame, FrameError};
use crate::proto::{
    ErrorKind, ErrorReply, Push, ReplicaAck, ReplicaState, ReplicateStart, Reply, WireCode,
    MAX_CHUNK_SIZE,
};
use crate::region::FileRegion;

/// Cap on push frames (headers only; data is read separately).
const PUSH_CAP: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What this agent holds as a replica, by region.
#[derive(Default)]
pub(crate) struct Replicas {
    map: Mutex<BTreeMap<String, Arc<ReplicaEntry>>>,
}

pub(crate) struct ReplicaEntry {
    pub(crate) region: String,
    owner: Mutex<String>,
    /// The last epoch applied in full, and whether the owner ended the replication.
    applied: watch::Sender<Applied>,
    bytes_applied: Mutex<u64>,
    connected: Mutex<bool>,
    /// One replication stream applies at a time (a new session waits for the old one to
    /// stop writing before it hashes the copy).
    apply: tokio::sync::Mutex<()>,
}

/// What a replica has applied.
#[derive(Default)]
struct Applied {
    /// The last epoch applied in full (0 before anything was).
    epoch: u64,
    /// When the last epoch was applied; `None` before any was (a catch-up is numbered 0
    /// while the owner produced none, so the number alone cannot say).
    updated: Option<Instant>,
    /// The owner ended the replication ([`Push::Stop`]), and why; cleared when an owner
    /// starts again.
    ended: Option<String>,
}

impl Applied {
    /// Epoch `n` (or later) is applied.
    fn holds(&self, n: u64) -> bool {
        self.updated.is_some() && self.epoch >= n
    }
}

impl Replicas {
    pub(crate) fn entry(&self, region: &str) -> Arc<ReplicaEntry> {
        lock(&self.map)
            .entry(region.into())
            .or_insert_with(|| {
                Arc::new(ReplicaEntry {
                    region: region.into(),
                    owner: Mutex::new(String::new()),
                    applied: watch::channel(Applied::default()).0,
                    bytes_applied: Mutex::new(0),
                    connected: Mutex::new(false),
                    apply: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    pub(crate) fn get(&self, region: &str) -> Option<Arc<ReplicaEntry>> {
        lock(&self.map).get(region).cloned()
    }

    pub(crate) fn status(&self) -> Vec<ReplicaStatus> {
        lock(&self.map)
            .values()
            .map(|e| ReplicaStatus {
                region: e.region.clone(),
                owner: lock(&e.owner).clone(),
                connected: *lock(&e.connected),
                epoch: e.epoch(),
                bytes_applied: *lock(&e.bytes_applied),
                last_update_s_ago: e
                    .applied
                    .borrow()
                    .updated
                    .map(|t| t.elapsed().as_secs_f64()),
                ended: e.applied.borrow().ended.clone(),
            })
            .collect()
    }
}

impl ReplicaEntry {
    pub(crate) fn is_connected(&self) -> bool {
        *lock(&self.connected)
    }

    /// The last epoch applied in full.
    pub(crate) fn epoch(&self) -> u64 {
        self.applied.borrow().epoch
    }

    /// The last epoch applied, if any was.
    pub(crate) fn applied_epoch(&self) -> Option<u64> {
        let a = self.applied.borrow();
        a.updated.map(|_| a.epoch)
    }

    /// Waits until epoch `n` (or later) is applied — at least the owner's first catch-up,
    /// even for `n` = 0. Fails at once, with the owner's reason, if the owner ended the
    /// replication before that.
    pub(crate) async fn wait_epoch(&self, n: u64) -> Result<u64, String> {
        let mut rx = self.applied.subscribe();
        let r = rx.wait_for(|a| a.holds(n) || a.ended.is_some()).await;
        match r {
            Ok(a) if a.holds(n) => Ok(a.epoch),
            Ok(a) => Err(a.ended.clone().unwrap_or_default()),
            Err(_) => Err("the agent is shutting down".into()),
        }
    }
}

async fn reply_error(send: &mut quinn::SendStream, kind: ErrorKind, message: String) {
    let _ = write_frame(send, &Reply::Error(ErrorReply { kind, message })).await;
    let _ = send.finish();
}

/// Serves one replication stream from `peer` for `region`.
pub(crate) async fn serve(
    inner: Arc<Inner>,
    peer: String,
    region: Arc<FileRegion>,
    start: ReplicateStart,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let g = region.geometry();
    if start.size != g.size || start.chunk_size != g.chunk_size {
        return reply_error(
            &mut send,
            ErrorKind::Mismatch,
            format!(
                "replica {} of region {} is {} bytes in {} byte chunks, the owner's is {} in {}",
                inner.name,
                region.name(),
                g.size,
                g.chunk_size,
                start.size,
                start.chunk_size
            ),
        )
        .await;
    }
    if inner.publications.is_published(region.name()) {
        return reply_error(
            &mut send,
            ErrorKind::BadRequest,
            format!(
                "agent {} owns region {} (it replicates it to others); a region has one owner",
                inner.name,
                region.name()
            ),
        )
        .await;
    }
    if let Some(why) = inner.migrations.incoming(region.name()) {
        return reply_error(
            &mut send,
            ErrorKind::Busy,
            format!(
                "region {} on {} {why}; a region has one owner",
                region.name(),
                inner.name
            ),
        )
        .await;
    }
    let writer = match OpenOptions::new().write(true).open(region.path()) {
        Ok(f) => f,
        Err(e) => {
            return reply_error(
                &mut send,
                ErrorKind::Io,
                format!("cannot open {} for writing: {e}", region.path().display()),
            )
            .await
        }
    };
    let entry = inner.replicas.entry(region.name());
    let _apply = entry.apply.lock().await;
    let r2 = region.clone();
    let hashes = match tokio::task::spawn_blocking(move || r2.chunk_hashes()).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return reply_error(&mut send, ErrorKind::Io, e.to_string()).await,
        Err(e) => return reply_error(&mut send, ErrorKind::Io, e.to_string()).await,
    };
    *lock(&entry.owner) = peer.clone();
    entry.applied.send_modify(|a| a.ended = None);
    let state = ReplicaState {
        epoch: entry.epoch(),
        hashes,
    };
    if write_frame(&mut send, &Reply::ReplicaState(state))
        .await
        .is_err()
    {
        return;
    }
    *lock(&entry.connected) = true;
    tracing::info!(peer = %peer, region = %region.name(), epoch = entry.epoch(), "replica: owner connected");
    let r = apply_loop(&peer, &region, &writer, &entry, &mut send, &mut recv).await;
    *lock(&entry.connected) = false;
    match r {
        Ok(()) => {}
        Err((code, why)) => {
            tracing::warn!(peer = %peer, region = %region.name(), code = code.name(), "replica: closing replication stream: {why}");
            let _ = recv.stop(code.varint());
            let _ = send.reset(code.varint());
        }
    }
}

type Fail = (WireCode, String);

async fn apply_loop(
    peer: &str,
    region: &FileRegion,
    writer: &File,
    entry: &ReplicaEntry,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<(), Fail> {
    let g = region.geometry();
    let mut current: Option<u64> = None;
    let mut raw = vec![0u8; g.chunk_size as usize];
    let mut packed = Vec::new();
    loop {
        let frame = match read_frame::<_, Push>(recv, PUSH_CAP).await {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()), // the owner finished the stream
            Err(FrameError::Io(_)) => return Ok(()), // connection gone: the owner reconnects
            Err(e) => return Err((e.code(), e.to_string())),
        };
        match frame {
            Push::Begin { epoch, catch_up } => {
                if current.is_some() {
                    return Err((WireCode::UnexpectedFrame, "Begin inside an epoch".into()));
                }
                // A catch-up may restart the numbering (the owner restarted); tracked
                // epochs only move forward.
                if !catch_up && epoch < entry.epoch() {
                    return Err((
                        WireCode::ProtocolViolation,
                        format!("epoch {epoch} is older than the applied {}", entry.epoch()),
                    ));
                }
                current = Some(epoch);
            }
            Push::Data {
                offset,
                len,
                compressed,
                hash,
            } => {
                if current.is_none() {
                    return Err((WireCode::UnexpectedFrame, "data outside an epoch".into()));
                }
                let chunk_end = (g.chunk_of(offset) + 1) * g.chunk_size as u64;
                if len == 0
                    || len > MAX_CHUNK_SIZE
                    || offset
                        .checked_add(len as u64)
                        .is_none_or(|e| e > g.size.min(chunk_end))
                {
                    return Err((
                        WireCode::ProtocolViolation,
                        format!("piece {offset}+{len} does not fit the region"),
                    ));
                }
                let data = &mut raw[..len as usize];
                if compressed == 0 {
                    read_exact(recv, data)
                        .await
                        .map_err(|e| (e.code(), e.to_string()))?;
                } else {
                    if compressed as usize > lz4_flex::block::get_maximum_output_size(len as usize)
                    {
                        return Err((WireCode::FrameTooLarge, "compressed piece too large".into()));
                    }
                    packed.resize(compressed as usize, 0);
                    read_exact(recv, &mut packed)
                        .await
                        .map_err(|e| (e.code(), e.to_string()))?;
                    match lz4_flex::block::decompress_into(&packed, data) {
                        Ok(n) if n == len as usize => {}
                        _ => {
                            return Err((
                                WireCode::ProtocolViolation,
                                "bad lz4 data in a piece".into(),
                            ))
                        }
                    }
                }
                if blake3::hash(data).as_bytes() != &hash {
                    return Err((
                        WireCode::ProtocolViolation,
                        format!("piece at {offset} failed blake3 verification"),
                    ));
                }
                writer
                    .write_all_at(data, offset)
                    .map_err(|e| (WireCode::Shutdown, format!("writing the replica: {e}")))?;
                *lock(&entry.bytes_applied) += len as u64;
            }
            Push::Zero { offset, len } => {
                if current.is_none() {
                    return Err((WireCode::UnexpectedFrame, "zero outside an epoch".into()));
                }
                if offset.checked_add(len).is_none_or(|e| e > g.size) {
                    return Err((
                        WireCode::ProtocolViolation,
                        format!("zero range {offset}+{len} does not fit the region"),
                    ));
                }
                zero_range(writer, offset, len)
                    .map_err(|e| (WireCode::Shutdown, format!("zeroing the replica: {e}")))?;
            }
            Push::End { epoch } => {
                if current != Some(epoch) {
                    return Err((
                        WireCode::ProtocolViolation,
                        format!("End of epoch {epoch} does not match Begin {current:?}"),
                    ));
                }
                current = None;
                entry.applied.send_modify(|a| {
                    a.epoch = epoch;
                    a.updated = Some(Instant::now());
                });
                tracing::debug!(peer, region = %region.name(), epoch, "replica: epoch applied");
                write_frame(send, &ReplicaAck { epoch })
                    .await
                    .map_err(|e| (WireCode::Shutdown, e.to_string()))?;
            }
            Push::Stop { reason } => {
                if current.is_some() {
                    return Err((WireCode::UnexpectedFrame, "Stop inside an epoch".into()));
                }
                let why = format!("{peer} ended the replication: {reason}");
                tracing::info!(peer, region = %region.name(), epoch = entry.epoch(), "replica: {why}");
                entry.applied.send_modify(|a| a.ended = Some(why));
                return Ok(());
            }
        }
    }
}

/// `peer` says it ended its replication of `region` to us while we were not connected: a
/// replica of it from that owner, with no session now, ends with its reason.
pub(crate) fn learn_ended(inner: &Inner, peer: &str, region: &str, reason: &str) {
    let Some(entry) = inner.replicas.get(region) else {
        return;
    };
    if *lock(&entry.owner) != peer || entry.is_connected() {
        return;
    }
    let why =
        format!("{peer} ended the replication while this replica was not connected: {reason}");
    let set = entry.applied.send_if_modified(|a| {
        if a.ended.is_some() {
            return false;
        }
        a.ended = Some(why.clone());
        true
    });
    if set {
        tracing::info!(peer, region, epoch = entry.epoch(), "replica: {why}");
    }
}

/// Makes `[offset, offset+len)` read as zeros: punches a hole where the filesystem can,
/// else writes zeros.
fn zero_range(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor we own, with integer arguments.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; (len as usize).min(1 << 20)];
    let mut done = 0;
    while done < len {
        let n = ((len - done) as usize).min(zeros.len());
        f.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}
