//! `pagewire receive`: the destination's side of a migration for a command-line user. A
//! region that lives on a peer (a file region, or memory an application published there)
//! is migrated into a file here: the agent asks the peer for the region's size and chunk
//! size, creates the file (or takes an empty one, or one of exactly that size), serves it
//! under the region's name as the target of a migration **from that peer only**, and
//! reports progress until it owns the region with every chunk. Pre-copy only: post-copy
//! needs an application that faults stale pages in ([`super::receive`]).
//!
//! The target is withdrawn (the region is no longer served here; a file made for it is
//! removed, an existing one stays) when the client goes away, the timeout passes or the
//! agent shuts down before a migration into it started; a migration already running goes
//! on (its state shows in `pagewire status`).

use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::{lock, Slot};
use crate::agent::control_server::{send, LineReader};
use crate::agent::Inner;
use crate::control::{
    ControlEvent, ReceiveFileArgs, ReceiveProgress, ReceiveReport, PROGRESS_INTERVAL,
};
use crate::engine::migrate::{DestPhase, MigrateDest};
use crate::region::{FileRegion, Geometry};

pub(crate) async fn run(
    inner: Arc<Inner>,
    args: ReceiveFileArgs,
    reader: &mut LineReader,
    r: &OwnedReadHalf,
    w: &mut OwnedWriteHalf,
) {
    let started = Instant::now();
    let (g, created) = match register(&inner, &args).await {
        Ok(x) => x,
        Err(message) => {
            let _ = send(w, &ControlEvent::Error { message }).await;
            return;
        }
    };
    tracing::info!(region = %args.region, from = %args.from, path = %args.to.display(), size = g.size, "waiting for a migration into a file");
    let deadline = args
        .timeout_ms
        .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
    let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
    let mut watch = Watch::default();
    let end = loop {
        tokio::select! {
            _ = tick.tick() => {}
            l = reader.next(r) => match l {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break End::ClientGone,
            },
            _ = inner.shutdown.cancelled() => break End::Error("the agent is shutting down".into()),
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => break End::Error(format!(
                "no migration of region {} from {} completed within {:.1} s",
                args.region,
                args.from,
                started.elapsed().as_secs_f64()
            )),
        }
        let (phase, stats) = watch.poll(&inner, &args.region);
        if phase == Some(DestPhase::Complete) {
            break End::Complete(stats);
        }
        let p = ReceiveProgress {
            region: args.region.clone(),
            from: args.from.clone(),
            phase: phase.map_or("waiting", |p| p.name()).into(),
            size: g.size,
            chunk_size: g.chunk_size,
            chunks_received: stats.chunks_received,
            chunks_present: stats.chunks_present,
            chunks: g.chunks(),
            aborted_attempts: watch.aborted,
            elapsed_s: started.elapsed().as_secs_f64(),
        };
        if send(w, &ControlEvent::ReceiveProgress(p)).await.is_err() {
            break End::ClientGone;
        }
    };
    let ev = match end {
        End::Complete(stats) => {
            // (The destination session cleared the expected peer when it completed.)
            tracing::info!(region = %args.region, from = %args.from, "received: this agent owns the region and serves it from {}", args.to.display());
            ControlEvent::ReceivedFile(ReceiveReport {
                region: args.region.clone(),
                from: args.from.clone(),
                path: args.to.clone(),
                size: g.size,
                chunk_size: g.chunk_size,
                chunks_received: stats.chunks_received,
                duplicate_chunks: stats.duplicates,
                aborted_attempts: watch.aborted,
                elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
            })
        }
        End::ClientGone => {
            withdraw(&inner, &args, created);
            return;
        }
        End::Error(message) => {
            let message = if withdraw(&inner, &args, created) && created {
                format!(
                    "{message}; the file it had made, {}, was removed",
                    args.to.display()
                )
            } else {
                message
            };
            ControlEvent::Error { message }
        }
    };
    let _ = send(w, &ev).await;
}

enum End {
    Complete(crate::engine::migrate::DestStats),
    ClientGone,
    Error(String),
}

/// Follows the destination engine of one region across attempts.
#[derive(Default)]
struct Watch {
    engine: Option<Arc<Mutex<MigrateDest>>>,
    last: Option<DestPhase>,
    aborted: u32,
}

impl Watch {
    fn poll(
        &mut self,
        inner: &Inner,
        region: &str,
    ) -> (Option<DestPhase>, crate::engine::migrate::DestStats) {
        let engine = match lock(&inner.migrations.map).get(region) {
            Some(Slot::Dest { engine, .. }) => Some(engine.clone()),
            _ => None,
        };
        let Some(engine) = engine else {
            return (None, Default::default());
        };
        if !self
            .engine
            .as_ref()
            .is_some_and(|e| Arc::ptr_eq(e, &engine))
        {
            self.engine = Some(engine.clone());
            self.last = None;
        }
        let (phase, stats) = {
            let e = lock(&engine);
            (e.phase(), e.stats())
        };
        if phase == DestPhase::Aborted && self.last != Some(DestPhase::Aborted) {
            self.aborted += 1;
        }
        self.last = Some(phase);
        (Some(phase), stats)
    }
}

/// Asks the peer for the region's geometry, prepares the file and serves it as the
/// region's migration target.
/// Registers the target; also says whether the file was made for it (it did not exist).
async fn register(inner: &Arc<Inner>, args: &ReceiveFileArgs) -> Result<(Geometry, bool), String> {
    if lock(&inner.migrations.expected).contains_key(&args.region) {
        return Err(format!(
            "region {} already waits for a migration here (another `pagewire receive`)",
            args.region
        ));
    }
    if inner.region(&args.region).is_some() {
        return Err(format!(
            "this agent already serves a region named {:?}: a migration into it needs no `receive` (it is received into that region's file)",
            args.region
        ));
    }
    let g = super::super::pull::prepare(inner, &args.from, &args.region)
        .await
        .map_err(|e| {
            format!(
                "cannot learn region {}'s size from {}: {e}",
                args.region, args.from
            )
        })?;
    // Not a file this agent serves as another region, nor a pull's destination.
    super::super::pull::check_dest(inner, &args.to).map_err(|e| e.to_string())?;
    let created = std::fs::symlink_metadata(&args.to).is_err();
    let file = open_target(&args.to, g.size)?;
    let region = Arc::new(
        FileRegion::from_file(&args.region, &args.to, file, g.chunk_size as u32)
            .map_err(|e| e.to_string())?,
    );
    {
        let mut map = lock(&inner.migrations.map);
        if let Some(Slot::Dest { engine, peer }) = map.get(&args.region) {
            if matches!(
                lock(engine).phase(),
                DestPhase::Receiving | DestPhase::Owner
            ) {
                return Err(format!(
                    "region {} is being migrated here from {peer}",
                    args.region
                ));
            }
            // What is left of an earlier attempt: a new migration starts afresh.
            map.remove(&args.region);
        }
    }
    let mut regions = inner
        .regions
        .write()
        .map_err(|_| "region table poisoned".to_string())?;
    if regions.contains_key(&args.region) {
        return Err(format!(
            "this agent already serves a region named {:?}",
            args.region
        ));
    }
    regions.insert(args.region.clone(), region);
    lock(&inner.migrations.expected).insert(args.region.clone(), args.from.clone());
    Ok((g, created))
}

/// Opens (or creates, mode 0600) the file to receive `size` bytes into. An existing file
/// must be a regular file, empty or of exactly that size.
fn open_target(path: &Path, size: u64) -> Result<std::fs::File, String> {
    let show = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => {
            let what = if m.file_type().is_block_device() {
                "a block device"
            } else if m.is_dir() {
                "a directory"
            } else if m.file_type().is_symlink() {
                "a symbolic link"
            } else {
                "not a regular file"
            };
            return Err(format!("{show} is {what}: receive into a regular file"));
        }
        Ok(m) if m.len() != 0 && m.len() != size => {
            return Err(format!(
                "{show} exists and is {} bytes; the region is {size}: remove it or pick another path",
                m.len()
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{show}: {e}")),
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open {show}: {e}"))?;
    // Checked again on what was opened (the path may have changed since).
    let m = f.metadata().map_err(|e| format!("{show}: {e}"))?;
    let len = m.len();
    if !m.file_type().is_file() || (len != 0 && len != size) {
        return Err(format!(
            "{show} changed while being opened: it must be a regular file, empty or of {size} bytes"
        ));
    }
    if len != size {
        f.set_len(size)
            .map_err(|e| format!("cannot size {show} to {size} bytes: {e}"))?;
    }
    Ok(f)
}

/// Stops serving the target unless a migration into it is running or done (then returns
/// false). A file made for it (`created`) is removed: nothing was received into it.
fn withdraw(inner: &Inner, args: &ReceiveFileArgs, created: bool) -> bool {
    let running = match lock(&inner.migrations.map).get(&args.region) {
        Some(Slot::Dest { engine, .. }) => matches!(
            lock(engine).phase(),
            DestPhase::Receiving | DestPhase::Owner | DestPhase::Complete
        ),
        _ => false,
    };
    if running {
        tracing::warn!(region = %args.region, "the receive client went away; the migration into {} goes on", args.to.display());
        return false;
    }
    lock(&inner.migrations.expected).remove(&args.region);
    if let Ok(mut r) = inner.regions.write() {
        if r.get(&args.region).is_some_and(|x| x.path() == args.to) {
            r.remove(&args.region);
        }
    }
    tracing::info!(region = %args.region, "no longer waiting for a migration into {}", args.to.display());
    if created {
        if let Err(e) = std::fs::remove_file(&args.to) {
            tracing::warn!(path = %args.to.display(), "removing the unused target: {e}");
        }
    }
    true
}
