//! The agent's side of the control socket (see [`crate::control`]).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};

use super::Inner;
use crate::control::{
    AttachArgs, AttachInfo, ControlEvent, ControlRequest, MAX_LINE, MIN_MAX_BANDWIDTH_BPS,
    PROGRESS_INTERVAL,
};
use crate::fault::{fdpass, Mechanism};

/// Binds the control socket, replacing a stale one (a socket file nobody listens on) but
/// refusing to steal one that a live agent is using.
pub(crate) fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "it exists and is not a socket (give --control a path of its own; nothing was changed)",
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another agent is listening on it",
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub(crate) async fn run(inner: Arc<Inner>, listener: UnixListener) {
    loop {
        let stream = tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            s = listener.accept() => s,
        };
        match stream {
            Ok((s, _)) => {
                inner.tasks.spawn(serve(inner.clone(), s));
            }
            Err(e) => {
                tracing::warn!("control socket accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

pub(crate) async fn send(w: &mut OwnedWriteHalf, ev: &ControlEvent) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(ev).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

async fn send_error(w: &mut OwnedWriteHalf, message: String) {
    let _ = send(w, &ControlEvent::Error { message }).await;
}

/// Reads `\n`-terminated lines with any descriptors that came with them (SCM_RIGHTS).
/// Cancel-safe: what was read stays buffered.
pub(crate) struct LineReader {
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
    eof: bool,
}

impl LineReader {
    fn new() -> LineReader {
        LineReader {
            buf: Vec::new(),
            fds: Vec::new(),
            eof: false,
        }
    }

    pub(crate) async fn next(
        &mut self,
        r: &OwnedReadHalf,
    ) -> std::io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                return Ok(Some((line, std::mem::take(&mut self.fds))));
            }
            if self.buf.len() > MAX_LINE {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "control line too long",
                ));
            }
            if self.eof {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(std::io::ErrorKind::UnexpectedEof.into())
                };
            }
            let mut tmp = [0u8; 8192];
            let stream: &UnixStream = r.as_ref();
            let fds = &mut self.fds;
            let n = stream
                .async_io(Interest::READABLE, || {
                    fdpass::recv_with_fds(stream.as_raw_fd(), &mut tmp, fds)
                })
                .await?;
            if n == 0 {
                self.eof = true;
            } else {
                self.buf.extend_from_slice(&tmp[..n]);
            }
        }
    }
}

async fn serve(inner: Arc<Inner>, stream: UnixStream) {
    let pid = stream.peer_cred().ok().and_then(|c| c.pid());
    let (r, mut w) = stream.into_split();
    let mut reader = LineReader::new();
    let (line, fds) = match reader.next(&r).await {
        Ok(Some(x)) => x,
        _ => return,
    };
    let req: ControlRequest = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => {
            send_error(&mut w, format!("bad request: {e}")).await;
            return;
        }
    };
    match req {
        ControlRequest::Status => {
            let _ = send(&mut w, &ControlEvent::Status(inner.status())).await;
        }
        ControlRequest::Pull(args) => {
            let mut h =
                match super::pull::start(inner.clone(), &args.from, &args.region, &args.to).await {
                    Ok(h) => h,
                    Err(e) => {
                        send_error(&mut w, e.to_string()).await;
                        return;
                    }
                };
            let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
            let result = loop {
                tokio::select! {
                    r = &mut h.task => break r,
                    _ = tick.tick() => {
                        if send(&mut w, &ControlEvent::Progress(h.status())).await.is_err() {
                            tracing::info!(id = h.id(), "control client went away: cancelling its pull");
                            h.cancel();
                        }
                    }
                }
            };
            let ev = match result {
                Ok(Ok(summary)) => ControlEvent::Done(summary),
                Ok(Err(e)) => ControlEvent::Error {
                    message: if args.to.exists() {
                        e.to_string()
                    } else {
                        format!("{e}; the incomplete {} was removed", args.to.display())
                    },
                },
                Err(e) => ControlEvent::Error {
                    message: format!("pull task failed: {e}"),
                },
            };
            let _ = send(&mut w, &ev).await;
        }
        ControlRequest::Attach(args) => attach(inner, args, reader, r, w, pid).await,
        ControlRequest::AttachFds(_) => {
            send_error(&mut w, "attach_fds without attach".into()).await;
        }
        ControlRequest::Replicate(args) => replicate(inner, args, w).await,
        ControlRequest::Publish(args) => {
            super::publish::run(inner, args, fds, &mut reader, &r, &mut w).await
        }
        ControlRequest::Collected { .. } | ControlRequest::Held { .. } => {
            send_error(&mut w, "an answer without a publish session".into()).await;
        }
        ControlRequest::Migrate(args) => migrate(inner, args, w).await,
        ControlRequest::ReceiveFile(args) => {
            super::migrate::receive_file::run(inner, args, &mut reader, &r, &mut w).await
        }
        ControlRequest::Receive(args) => {
            super::migrate::receive::run(inner, args, fds, pid, &mut reader, &r, &mut w).await
        }
        ControlRequest::StopReplication { region } => {
            let ev = match inner
                .publications
                .stop_replication(&region, super::replicate::STOPPED_BY_OPERATOR)
                .await
            {
                Ok(st) => ControlEvent::ReplicationStopped(st),
                Err(e) => ControlEvent::Error {
                    message: e.to_string(),
                },
            };
            let _ = send(&mut w, &ev).await;
        }
        ControlRequest::Flush { region, timeout_ms } => {
            let ev = match inner.publications.get(&region) {
                None => ControlEvent::Error {
                    message: format!("this agent does not replicate region {region:?}"),
                },
                Some(p) => match p.flush(Duration::from_millis(timeout_ms)).await {
                    Ok(epoch) => ControlEvent::Flushed { epoch },
                    Err(e) => ControlEvent::Error {
                        message: e.to_string(),
                    },
                },
            };
            let _ = send(&mut w, &ev).await;
        }
        ControlRequest::Epoch {
            region,
            wait,
            timeout_ms,
        } => {
            if inner.region(&region).is_none() {
                let message = format!(
                    "this agent has no region {region:?} (a replica serves its copy under the region's name: --region {region}=PATH)"
                );
                return send_error(&mut w, message).await;
            }
            // On the owner: the epoch it replicates (a replica entry here would be a
            // phantom).
            let owned = inner
                .publications
                .get(&region)
                .filter(|p| !p.is_ended())
                .map(|p| p.status().epoch);
            let ev = match (wait, owned) {
                (None, Some(epoch)) => ControlEvent::Epoch { epoch },
                (Some(_), Some(_)) => ControlEvent::Error {
                    message: format!(
                        "this agent owns {region:?} and replicates it: --wait is for a replica (use `pagewire flush` here)"
                    ),
                },
                (None, None) => match inner.replicas.get(&region).and_then(|e| e.applied_epoch()) {
                    Some(epoch) => ControlEvent::Epoch { epoch },
                    None => ControlEvent::Error {
                        message: format!(
                            "region {region}: nothing applied here: this agent does not replicate it and no owner has replicated it to this agent yet (--wait 0 waits for the first catch-up)"
                        ),
                    },
                },
                (Some(n), None) => {
                    let entry = inner.replicas.entry(&region);
                    match tokio::time::timeout(
                        Duration::from_millis(timeout_ms),
                        entry.wait_epoch(n),
                    )
                    .await
                    {
                        Ok(Ok(epoch)) => ControlEvent::Epoch { epoch },
                        Ok(Err(why)) => ControlEvent::Error {
                            message: format!(
                                "region {region}: epoch {n} will not come ({why}); the replica holds epoch {}",
                                entry.epoch()
                            ),
                        },
                        Err(_) => ControlEvent::Error {
                            message: format!(
                                "region {region}: epoch {n} not applied within {timeout_ms} ms ({})",
                                match entry.applied_epoch() {
                                    Some(at) => format!("at {at}"),
                                    None => "nothing received from an owner yet".into(),
                                }
                            ),
                        },
                    }
                }
            };
            let _ = send(&mut w, &ev).await;
        }
    }
}

/// Runs a migration, streaming progress lines. The migration goes on if the client
/// goes away (stopping half-way is what an abort is for, and it needs the peer).
async fn migrate(inner: Arc<Inner>, args: crate::control::MigrateArgs, mut w: OwnedWriteHalf) {
    let freeze = match (args.freeze_pid, args.freeze_writes) {
        (Some(_), true) => {
            return send_error(
                &mut w,
                "freeze by pid or by write-protection, not both".into(),
            )
            .await
        }
        (Some(pid), false) if pid > 0 => {
            // Found out now rather than after the whole pre-copy, at the freeze.
            // SAFETY: signal 0 only checks that the process exists and may be signalled.
            if unsafe { libc::kill(pid, 0) } != 0 {
                let e = std::io::Error::last_os_error();
                return send_error(&mut w, format!("--freeze-pid {pid}: {e}")).await;
            }
            super::Freeze::Pid(pid)
        }
        (Some(pid), false) => return send_error(&mut w, format!("bad freeze pid {pid}")).await,
        (None, true) => super::Freeze::WriteProtect,
        (None, false) => super::Freeze::Snapshot,
    };
    if let Some(b) = args
        .max_bandwidth_bps
        .filter(|&b| b < MIN_MAX_BANDWIDTH_BPS)
    {
        return send_error(
            &mut w,
            format!("max bandwidth {b} bit/s is below the least a migration accepts, 1 Mbit/s"),
        )
        .await;
    }
    let opts = super::MigrateOptions {
        to: args.to.clone(),
        budget: Duration::from_millis(args.downtime_budget_ms),
        max_rounds: args.max_rounds,
        max_time: Duration::from_millis(args.max_time_ms),
        freeze,
        max_bandwidth: args.max_bandwidth_bps.map(|b| (b / 8).max(1)),
        postcopy: args.postcopy,
        no_mmap_writers: args.no_mmap_writers,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let run = super::migrate::source::run(inner.clone(), &args.region, opts, Some(tx));
    tokio::pin!(run);
    let result = loop {
        tokio::select! {
            r = &mut run => break r,
            Some(p) = rx.recv() => {
                if send(&mut w, &ControlEvent::MigrateProgress(p)).await.is_err() {
                    // The command went away (Ctrl-C): closing the channel cancels the
                    // migration if it has not handed over yet; after that it finishes.
                    rx.close();
                }
            }
        }
    };
    let ev = match result {
        Ok(r) => ControlEvent::Migrated(r),
        Err(e) => {
            let outcome = match &e {
                super::MigrateRunError::Aborted { outcome, .. } => *outcome,
                super::MigrateRunError::Refused { .. } => "refused",
                _ => "failed",
            };
            ControlEvent::MigrateFailed {
                outcome: outcome.to_string(),
                message: e.to_string(),
            }
        }
    };
    let _ = send(&mut w, &ev).await;
}

/// Starts a replication and reports until every replica has caught up.
async fn replicate(inner: Arc<Inner>, args: crate::control::ReplicateArgs, mut w: OwnedWriteHalf) {
    let Some(region) = inner.region(&args.region) else {
        return send_error(
            &mut w,
            format!(
                "this agent has no region {:?} (serve it with --region {}=PATH)",
                args.region, args.region
            ),
        )
        .await;
    };
    let mut opts = super::ReplicateOptions {
        to: args.to.clone(),
        ..Default::default()
    };
    if let Some(ms) = args.interval_ms {
        opts.interval = Duration::from_millis(ms.max(1));
    }
    if let Some(wnd) = args.window {
        opts.window = wnd;
    }
    let scan = match args.scan_interval_ms {
        Some(0) => None,
        Some(ms) => Some(Duration::from_millis(ms)),
        None => Some(Duration::from_secs(10)),
    };
    let kind = args.tracker.as_deref().unwrap_or("inotify");
    // A replication that ended (the region was migrated away) is started anew, if this
    // agent owns the region again.
    let running = inner
        .publications
        .get(&args.region)
        .filter(|p| !p.is_ended() || p.is_by_app());
    let p = match running {
        Some(p) => {
            // Running already: the same request reports on it; a different one cannot
            // change it (its replicas and settings are fixed while it runs).
            let st = p.status();
            let mut now: Vec<&str> = st.replicas.iter().map(|r| r.peer.as_str()).collect();
            let mut asked: Vec<&str> = args.to.iter().map(String::as_str).collect();
            now.sort_unstable();
            asked.sort_unstable();
            asked.dedup();
            if let Some(why) = &st.ended {
                let message = format!(
                    "the replication of {} ended ({why}); an application's region takes its replicas when it is published: publish it again to replicate it",
                    args.region
                );
                return send_error(&mut w, message).await;
            }
            let differs = now != asked
                || args.tracker.as_deref().is_some_and(|t| t != st.tracker)
                || args
                    .interval_ms
                    .is_some_and(|ms| ms.max(1) != st.interval_ms)
                || args.window.is_some_and(|b| b != st.window)
                || (st.tracker == "inotify"
                    && args.scan_interval_ms.is_some()
                    && scan.map(|d| d.as_millis() as u64) != st.scan_interval_ms);
            if differs {
                let message = format!(
                    "{} is already replicating to {} with tracker {} every {} ms, window {} bytes{}; a running replication cannot change its replicas or settings: stop it first (pagewire replicate --region {} --stop), then start it anew",
                    args.region,
                    now.join(", "),
                    st.tracker,
                    st.interval_ms,
                    st.window,
                    match st.scan_interval_ms {
                        Some(ms) if st.tracker == "inotify" => format!(", full scan every {ms} ms"),
                        None if st.tracker == "inotify" => ", no periodic scan".into(),
                        _ => String::new(),
                    },
                    args.region
                );
                return send_error(&mut w, message).await;
            }
            p
        }
        None => {
            let tracker = match super::replicate::file_tracker(kind, &region, scan) {
                Ok(t) => t,
                Err(e) => return send_error(&mut w, e.to_string()).await,
            };
            match super::replicate::start(&inner, &args.region, tracker, &opts) {
                Ok(p) => p,
                Err(e) => return send_error(&mut w, e.to_string()).await,
            }
        }
    };
    // Report until every replica acknowledged a catch-up (or an epoch).
    let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
    loop {
        tick.tick().await;
        let st = p.status();
        if st.replicas.iter().all(|r| r.connected && r.caught_up) {
            let _ = send(&mut w, &ControlEvent::Replicating(st)).await;
            return;
        }
        // A replica that answered with a refusal (no such region, another size) will
        // not come by waiting: say so rather than wait forever.
        let refused = st.replicas.iter().find(|r| r.refused).map(|r| {
            format!(
                "{}: {}",
                r.peer,
                r.last_error.as_deref().unwrap_or("refused")
            )
        });
        if let Some(why) = refused {
            let message = format!(
                "{why} (the agent keeps retrying it every few seconds; `pagewire status` shows it)"
            );
            return send_error(&mut w, message).await;
        }
        // Stopped (`--stop`) or migrated away while waiting: no catch-up will come.
        if let Some(why) = &st.ended {
            let message = format!("the replication of region {} ended: {why}", args.region);
            return send_error(&mut w, message).await;
        }
        if send(&mut w, &ControlEvent::ReplicateProgress(st))
            .await
            .is_err()
        {
            return;
        }
        if inner.shutdown.is_cancelled() {
            return;
        }
    }
}

/// A lazy attach: geometry, then the application's descriptors, then the session until
/// the application goes away.
async fn attach(
    inner: Arc<Inner>,
    args: AttachArgs,
    mut reader: LineReader,
    r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    pid: Option<i32>,
) {
    if let Some(to) = &args.backing {
        if let Err(e) = super::pull::check_dest(&inner, to) {
            return send_error(&mut w, e.to_string()).await;
        }
    }
    let geometry = match super::pull::prepare(&inner, &args.from, &args.region).await {
        Ok(g) => g,
        Err(e) => return send_error(&mut w, e.to_string()).await,
    };
    let mechanism = match args.mechanism {
        Mechanism::Auto => inner.config.fault_mechanism,
        m => m,
    };
    let info = AttachInfo {
        size: geometry.size,
        chunk_size: geometry.chunk_size,
        mechanism,
        fault_timeout_ms: inner.config.fault_timeout.as_millis() as u64,
    };
    if send(&mut w, &ControlEvent::AttachInfo(info)).await.is_err() {
        return;
    }
    let (line, fds) = match reader.next(&r).await {
        Ok(Some(x)) => x,
        Ok(None) => return, // the application gave up (or had nothing to map)
        Err(e) => return send_error(&mut w, format!("reading attach_fds: {e}")).await,
    };
    let req = match serde_json::from_slice::<ControlRequest>(&line) {
        Ok(ControlRequest::AttachFds(f)) => f,
        Ok(_) => return send_error(&mut w, "expected attach_fds".into()).await,
        Err(e) => return send_error(&mut w, format!("bad request: {e}")).await,
    };
    let mut session =
        match super::mount::start(&inner, &args.from, &args.region, geometry, &req, fds, pid) {
            Ok(s) => s,
            Err(e) => return send_error(&mut w, e.to_string()).await,
        };
    let m = session.mount.clone();
    if send(&mut w, &ControlEvent::Mounted { id: m.status().id })
        .await
        .is_err()
    {
        return session.end("the application went away");
    }
    let timeout = inner.config.fault_timeout;
    let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
    // `serving`: the mapping may still fault to us (while filling, and after a failure,
    // when faults are answered with SIGBUS); `filling`: progress is worth reporting.
    let (mut serving, mut filling) = (true, true);
    let why = loop {
        tokio::select! {
            ev = session.run(timeout), if serving => {
                let ev = match ev {
                    super::mount::SessionEvent::Complete => {
                        serving = false;
                        Some(ControlEvent::Complete(m.status()))
                    }
                    super::mount::SessionEvent::Failed(why) => {
                        // The client library says "mount failed: " itself.
                        Some(ControlEvent::Error { message: why })
                    }
                    super::mount::SessionEvent::Detached => {
                        serving = false;
                        None
                    }
                };
                filling = false;
                if let Some(ev) = ev {
                    if send(&mut w, &ev).await.is_err() {
                        break "the application went away";
                    }
                }
            }
            l = reader.next(&r) => match l {
                Ok(Some(_)) => {} // nothing else is expected; ignore
                Ok(None) | Err(_) => break "the application detached or exited",
            },
            _ = tick.tick(), if filling => {
                if send(&mut w, &ControlEvent::MountProgress(m.status())).await.is_err() {
                    break "the application went away";
                }
            }
        }
    };
    session.end(why);
}
