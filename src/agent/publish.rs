//! Applications that publish a region they write in memory (see
//! [`crate::client::publish`]): the agent serves the application's memfd as a region,
//! builds the tracker from the descriptors it was given (or asks the application to
//! collect, for the mprotect tracker, which must run in the application's process), and
//! replicates it. The session ends when the application's connection does: the
//! replication stops and the region is no longer served.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::Inner;
use crate::control::PublishArgs;
use crate::region::FileRegion;
use crate::track::{uffd_wp, DirtyTracker, Ranges, TrackError};

type CollectReply = Result<Ranges, String>;

/// What the agent asks a publishing application to do.
#[derive(Debug, Clone, Copy)]
enum AppOp {
    /// Collect its (mprotect) tracker.
    Collect,
    /// Hold its writers (a migration's freeze by write-protection).
    Hold,
    /// Let them go.
    Release,
}

/// A request and where its answer goes (a std channel: the asking thread waits with a
/// timeout, and a late answer to a request given up on is dropped).
type AppRequest = (AppOp, std::sync::mpsc::Sender<CollectReply>);

/// How long the agent waits for a publishing application's answer (its library thread
/// collects, holds or releases; a collect or a hold of a large region takes tens of ms).
/// An application that does not answer in time fails the request, never hangs the
/// replication or a migration.
pub(crate) const APP_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The application's end of the session, as trackers see it: a request goes over the
/// control connection and the call blocks until the answer.
#[derive(Clone)]
struct AppLink {
    tx: mpsc::Sender<AppRequest>,
}

impl AppLink {
    fn ask(&self, op: AppOp) -> Result<Ranges, TrackError> {
        use std::sync::mpsc::RecvTimeoutError;
        let gone = |why: &str| TrackError::Gone(why.into());
        let what = match op {
            AppOp::Collect => "collect in the application",
            AppOp::Hold => "holding the writers in the application",
            AppOp::Release => "releasing the writers in the application",
        };
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx
            .blocking_send((op, tx))
            .map_err(|_| gone("the application detached"))?;
        match rx.recv_timeout(APP_ANSWER_TIMEOUT) {
            Ok(Ok(r)) => Ok(crate::track::normalize(r)),
            Ok(Err(e)) => Err(TrackError::Collect {
                what,
                source: std::io::Error::other(e),
            }),
            Err(RecvTimeoutError::Timeout) => Err(TrackError::Collect {
                what,
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the application did not answer within {}s",
                        APP_ANSWER_TIMEOUT.as_secs()
                    ),
                ),
            }),
            Err(RecvTimeoutError::Disconnected) => Err(gone("the application detached")),
        }
    }
}

/// The mprotect tracker's proxy: it runs in the application, which collects when asked
/// (and holds its writers, through [`AppHeld`]).
struct RemoteTracker {
    app: AppLink,
}

impl DirtyTracker for RemoteTracker {
    fn name(&self) -> &'static str {
        "mprotect"
    }

    fn collect(&mut self) -> Result<Ranges, TrackError> {
        self.app.ask(AppOp::Collect)
    }
}

/// A tracker whose writers the application holds for a freeze ([`crate::fault::hold`]:
/// `PROT_READ` and a handler that parks the writing thread): uffd-wp-async, whose write
/// faults the kernel resolves by itself, and the mprotect proxy.
struct AppHeld<T> {
    tracker: T,
    app: AppLink,
}

impl<T: DirtyTracker> DirtyTracker for AppHeld<T> {
    fn name(&self) -> &'static str {
        self.tracker.name()
    }

    fn collect(&mut self) -> Result<Ranges, TrackError> {
        self.tracker.collect()
    }

    fn can_freeze(&self) -> bool {
        true
    }

    fn freeze(&mut self) -> Result<(), TrackError> {
        self.app.ask(AppOp::Hold).map(drop)
    }

    fn thaw(&mut self) -> Result<(), TrackError> {
        self.app.ask(AppOp::Release).map(drop)
    }
}

/// A published region's session, as the control server drives it.
pub(crate) struct PublishSession {
    pub(crate) region: String,
    pub(crate) chunk_size: u32,
    /// Requests for the application (collects for mprotect, holds for a freeze);
    /// `None` for uffd-wp-sync, which needs none.
    requests: Option<mpsc::Receiver<AppRequest>>,
}

/// Validates and starts a publication.
pub(crate) fn start(
    inner: &Arc<Inner>,
    args: &PublishArgs,
    fds: Vec<OwnedFd>,
) -> Result<PublishSession, String> {
    if !crate::proto::valid_name(&args.region) {
        return Err(format!("invalid region name {:?}", args.region));
    }
    if inner.region(&args.region).is_some() {
        return Err(format!(
            "this agent already serves a region named {:?}",
            args.region
        ));
    }
    inner.migrations.forget_handed_over(&args.region)?;
    let page = crate::fault::uffd::page_size();
    if args.size == 0
        || args.map_len != args.size.next_multiple_of(page)
        || args.base == 0
        || args.base % page != 0
    {
        return Err("the mapping does not fit the region size".into());
    }
    let mut fds = fds.into_iter();
    let memfd = std::fs::File::from(fds.next().ok_or("no memfd passed")?);
    let len = memfd.metadata().map_err(|e| e.to_string())?.len();
    if len != args.size {
        return Err(format!("memfd is {len} bytes, the region {}", args.size));
    }
    let label = PathBuf::from(format!("memfd:{}", args.region));
    let region = FileRegion::from_file(&args.region, &label, memfd, inner.config.chunk_size)
        .map_err(|e| e.to_string())?;
    let chunk_size = region.geometry().chunk_size;
    let (tx, rx) = mpsc::channel(1);
    let app = AppLink { tx };
    let (tracker, requests): (Box<dyn DirtyTracker>, _) = match args.tracker.as_str() {
        "uffd-wp-async" => {
            let uffd = fds.next().ok_or("no uffd passed")?;
            let pagemap = std::fs::File::from(fds.next().ok_or("no pagemap passed")?);
            let t = uffd_wp::UffdWpAsync::from_fds(
                uffd,
                pagemap,
                args.base as *mut u8,
                args.map_len as usize,
            )
            .map_err(|e| e.to_string())?;
            (Box::new(AppHeld { tracker: t, app }), Some(rx))
        }
        "uffd-wp-sync" => {
            let uffd = fds.next().ok_or("no uffd passed")?;
            let t = uffd_wp::UffdWpSync::from_fd(uffd, args.base as *mut u8, args.map_len as usize)
                .map_err(|e| e.to_string())?;
            (Box::new(t), None)
        }
        "mprotect" => {
            let tracker = RemoteTracker { app: app.clone() };
            (Box::new(AppHeld { tracker, app }), Some(rx))
        }
        o => return Err(format!("unknown tracker {o:?}")),
    };
    if let Ok(mut r) = inner.regions.write() {
        r.insert(args.region.clone(), Arc::new(region));
    }
    let opts = super::ReplicateOptions {
        to: args.to.clone(),
        interval: Duration::from_millis(args.interval_ms.max(1)),
        ..Default::default()
    };
    if let Err(e) = super::replicate::start_tracking(inner, &args.region, tracker, &opts, true) {
        if let Ok(mut r) = inner.regions.write() {
            r.remove(&args.region);
        }
        return Err(e.to_string());
    }
    tracing::info!(region = %args.region, tracker = %args.tracker, to = ?args.to, "region published by an application");
    Ok(PublishSession {
        region: args.region.clone(),
        chunk_size,
        requests,
    })
}

/// Ends a publication: stops replicating and serving the region.
pub(crate) fn end(inner: &Inner, region: &str) {
    inner.publications.stop(region);
    if let Ok(mut r) = inner.regions.write() {
        r.remove(region);
    }
    tracing::info!(
        region,
        "published region withdrawn (the application detached)"
    );
}

/// Drives a publish session on the application's control connection until it closes.
pub(crate) async fn run(
    inner: Arc<Inner>,
    args: PublishArgs,
    fds: Vec<OwnedFd>,
    reader: &mut super::control_server::LineReader,
    r: &tokio::net::unix::OwnedReadHalf,
    w: &mut tokio::net::unix::OwnedWriteHalf,
) {
    use super::control_server::send;
    use crate::control::{ControlEvent, ControlRequest};
    let mut s = match start(&inner, &args, fds) {
        Ok(s) => s,
        Err(message) => {
            let _ = send(w, &ControlEvent::Error { message }).await;
            return;
        }
    };
    let published = ControlEvent::Published {
        chunk_size: s.chunk_size,
    };
    if send(w, &published).await.is_err() {
        return end(&inner, &s.region);
    }
    let mut pending: std::collections::VecDeque<std::sync::mpsc::Sender<CollectReply>> =
        Default::default();
    loop {
        let request = async {
            match s.requests.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            req = request => {
                let Some((op, tx)) = req else { continue };
                let ev = match op {
                    AppOp::Collect => ControlEvent::Collect,
                    AppOp::Hold => ControlEvent::Hold,
                    AppOp::Release => ControlEvent::Release,
                };
                if send(w, &ev).await.is_err() {
                    break;
                }
                pending.push_back(tx);
            }
            l = reader.next(r) => match l {
                Ok(Some((line, _))) => {
                    // The application answers in order.
                    let answer = match serde_json::from_slice(&line) {
                        Ok(ControlRequest::Collected { ranges, error }) => match error {
                            None => Ok(ranges.into_iter().map(|(a, b)| a..b).collect()),
                            Some(e) => Err(e),
                        },
                        Ok(ControlRequest::Held { error }) => error.map_or(Ok(Vec::new()), Err),
                        _ => continue,
                    };
                    if let Some(tx) = pending.pop_front() {
                        let _ = tx.send(answer);
                    }
                }
                Ok(None) | Err(_) => break,
            },
            _ = inner.shutdown.cancelled() => break,
        }
    }
    end(&inner, &s.region);
}
