//! The agent's side of the control socket (see [`crate::control`]).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::Inner;
use crate::control::{read_line, ControlEvent, ControlRequest, PROGRESS_INTERVAL};

/// Binds the control socket, replacing a stale one (a socket file nobody listens on) but
/// refusing to steal one that a live agent is using.
pub(crate) fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
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

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, ev: &ControlEvent) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(ev).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

async fn serve(inner: Arc<Inner>, stream: UnixStream) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let line = match read_line(&mut r).await {
        Ok(Some(l)) => l,
        _ => return,
    };
    let req: ControlRequest = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => {
            let _ = send(
                &mut w,
                &ControlEvent::Error {
                    message: format!("bad request: {e}"),
                },
            )
            .await;
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
                        let _ = send(
                            &mut w,
                            &ControlEvent::Error {
                                message: e.to_string(),
                            },
                        )
                        .await;
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
                    message: e.to_string(),
                },
                Err(e) => ControlEvent::Error {
                    message: format!("pull task failed: {e}"),
                },
            };
            let _ = send(&mut w, &ev).await;
        }
    }
}
