//! An application on the destination host receives a region being migrated here
//! (`client::receive`): it hands the agent a memfd and a userfaultfd registered in
//! MISSING mode over its mapping, and waits. Pre-copy chunks are written into the memfd
//! (the application does not touch the mapping yet). When the handover is accepted the
//! agent punches the still-stale chunks out of the memfd, so that touching them faults,
//! and tells the application to run; its faults become urgent fetches from the source,
//! installed with UFFDIO_COPY (atomic per page, never over a page that is already there),
//! while the rest streams in. When every chunk is here the uffd is unregistered.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use super::lock;
use crate::agent::Inner;
use crate::control::{ControlEvent, ReceiveArgs};
use crate::fault::uffd;
use crate::region::{FileRegion, Geometry};

/// Where a receiving application is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecvState {
    /// Waiting for (or in) pre-copy; the application must not touch the mapping.
    Waiting,
    /// This host owns the region; the application runs; `stale` chunks were left.
    Owner { stale: u64 },
    /// Every chunk is here.
    Received,
    /// The migration was given up or post-copy failed: the mapping is not valid.
    Failed,
}

/// A receiving application's mapping, as the destination driver uses it.
pub(crate) struct ReceivingApp {
    pub(crate) uffd: OwnedFd,
    /// The mapping in the application's address space.
    pub(crate) base: u64,
    pub(crate) map_len: u64,
    pub(crate) region: Arc<FileRegion>,
    pub(crate) state: watch::Sender<RecvState>,
    /// The application went away (or its mapping did): chunks go into the memfd, which
    /// the agent still holds, so a post-copy under way still completes here.
    pub(crate) detached: AtomicBool,
    /// The application's process (from the control socket), for SIGBUS.
    pub(crate) pid: Option<i32>,
    /// Migration sessions that started on this mapping (a watch over a lost source
    /// stands down when another starts).
    pub(crate) sessions: AtomicU64,
    /// Why post-copy failed (the source was lost): set once, with state `Failed`.
    pub(crate) failed: std::sync::Mutex<Option<String>>,
}

impl ReceivingApp {
    /// Punches the chunks for which `stale` holds out of the memfd (before the
    /// application runs): touching them then faults.
    pub(crate) fn punch(&self, g: &Geometry, stale: impl Fn(u64) -> bool) -> Result<u64, String> {
        let fd = self.region.file().as_raw_fd();
        let mut n = 0;
        let mut c = 0;
        // One fallocate per run of consecutive stale chunks (this runs between the
        // handover and the application's resume, so it is downtime: one call per chunk
        // cost 0.86 s for 253k stale 4 KiB chunks).
        while c < g.chunks() {
            if !stale(c) {
                c += 1;
                continue;
            }
            let first = c;
            while c < g.chunks() && stale(c) {
                c += 1;
            }
            n += c - first;
            let start = g.offset(first);
            let end = g.offset(c - 1) + g.chunk_len(c - 1) as u64;
            // SAFETY: fallocate on our descriptor with integer arguments.
            let r = unsafe {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    start as libc::off_t,
                    (end - start) as libc::off_t,
                )
            };
            if r != 0 {
                return Err(format!(
                    "punching chunks {first}..{c} out of the memfd: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        Ok(n)
    }

    /// A fault on a page of a chunk that is current here: the page is there (then this
    /// only wakes the thread) or a hole, which holds zeros.
    pub(crate) fn resolve_present(&self, addr: u64) {
        let page = uffd::page_size();
        let a = addr & !(page - 1);
        // One zeroed page for every such fault (this is the fault path: no allocation).
        static ZEROS: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let zeros = ZEROS.get_or_init(|| vec![0u8; page as usize]);
        // SAFETY: `zeros` is a live, never-written buffer of one page.
        let r = unsafe { uffd::copy(self.uffd.as_raw_fd(), a, zeros.as_ptr(), page, page) };
        if let Err(e) = r {
            tracing::debug!(region = %self.region.name(), "resolving a fault at {a:#x}: {e}");
            self.wake(a);
        }
    }

    /// Installs a post-copy chunk into the application's mapping: pages already there
    /// (installed by an earlier copy) are left alone; waiting threads are woken.
    pub(crate) fn install(&self, g: &Geometry, chunk: u64, data: &[u8]) -> Result<(), String> {
        let len = g.chunk_len(chunk) as usize;
        if self.detached.load(Ordering::Acquire) {
            return self.write_memfd(g, chunk, &data[..len.min(data.len())]);
        }
        let page = uffd::page_size();
        let padded = (len as u64).next_multiple_of(page) as usize;
        let mut buf;
        let src = if data.len() >= padded {
            &data[..padded]
        } else {
            buf = vec![0u8; padded];
            buf[..data.len().min(padded)].copy_from_slice(&data[..data.len().min(padded)]);
            &buf[..]
        };
        let dst = self.base + g.offset(chunk);
        if dst + padded as u64 > self.base + self.map_len {
            return Err(format!("chunk {chunk} is past the mapping"));
        }
        let fd = self.uffd.as_raw_fd();
        // SAFETY: `src` is a live buffer of `padded` bytes in this process.
        match unsafe { uffd::copy(fd, dst, src.as_ptr(), padded as u64, page) } {
            Ok(_) => Ok(()),
            Err(uffd::UffdError::Gone) => {
                // The application exited or unmapped the region: nobody can have written
                // the missing pages since, so the memfd takes the chunk.
                self.detached.store(true, Ordering::Release);
                self.write_memfd(g, chunk, &data[..len.min(data.len())])
            }
            Err(e) => {
                // EAGAIN past the retries: the mapping is changing (an munmap or mremap
                // waits for us to read its event, which this task does only after this
                // install). The engine already counts the chunk as here, so it must land:
                // write the pages still missing into the memfd (a missing page cannot
                // have been written by the application: touching it faults and waits
                // for us) and wake whoever waits on them.
                tracing::debug!(region = %self.region.name(), chunk, "UFFDIO_COPY failed ({e}); writing the chunk into the memfd");
                self.write_memfd(g, chunk, &data[..len.min(data.len())])?;
                let _ = uffd::wake(fd, dst, padded as u64);
                Ok(())
            }
        }
    }

    /// Writes a chunk into the memfd, only over pages that are not there (a page present
    /// in a stale chunk was installed by post-copy, maybe written since).
    fn write_memfd(&self, g: &Geometry, chunk: u64, data: &[u8]) -> Result<(), String> {
        let page = uffd::page_size() as usize;
        let file = self.region.file();
        let base = g.offset(chunk);
        for (i, p) in data.chunks(page).enumerate() {
            let off = base + (i * page) as u64;
            if page_present(file, off) {
                continue;
            }
            file.write_all_at(p, off)
                .map_err(|e| format!("writing chunk {chunk} into the memfd: {e}"))?;
        }
        Ok(())
    }

    /// Wakes threads faulting on `addr`'s page (its chunk is here already).
    pub(crate) fn wake(&self, addr: u64) {
        let page = uffd::page_size();
        let _ = uffd::wake(self.uffd.as_raw_fd(), addr & !(page - 1), page);
    }

    /// Post-copy failed: the chunks still at the source cannot be had. The application
    /// is told (its `wait_received` fails with `why`); threads touching a missing page
    /// get SIGBUS ([`ReceivingApp::sigbus`]).
    pub(crate) fn fail(&self, why: &str) {
        {
            let mut f = lock(&self.failed);
            if f.is_some() {
                return;
            }
            *f = Some(why.to_string());
        }
        tracing::warn!(region = %self.region.name(), "post-copy failed: {why}; threads touching a page not here get SIGBUS");
        self.state.send_replace(RecvState::Failed);
    }

    /// Delivers SIGBUS to the application's thread `tid` (it faulted on a page that will
    /// not come), as a file mapping whose disk failed does.
    pub(crate) fn sigbus(&self, tid: u32) {
        if let (Some(pid), true) = (self.pid, tid != 0) {
            // SAFETY: tgkill with plain integers, to the receiving application's thread.
            unsafe { libc::syscall(libc::SYS_tgkill, pid, tid as libc::pid_t, libc::SIGBUS) };
        }
    }

    /// Every chunk is here: the mapping no longer needs the agent.
    pub(crate) fn finish(&self) {
        if let Err(e) = uffd::unregister(self.uffd.as_raw_fd(), self.base, self.map_len) {
            tracing::debug!(region = %self.region.name(), "unregistering the receiving mapping: {e}");
        }
        self.state.send_replace(RecvState::Received);
    }
}

/// Drives a `client::receive` session on the application's control connection until it
/// closes: registers the memfd as the region, reports the migration's progress.
pub(crate) async fn run(
    inner: Arc<Inner>,
    args: ReceiveArgs,
    fds: Vec<OwnedFd>,
    pid: Option<i32>,
    reader: &mut super::super::control_server::LineReader,
    r: &tokio::net::unix::OwnedReadHalf,
    w: &mut tokio::net::unix::OwnedWriteHalf,
) {
    use super::super::control_server::send;
    let app = match start(&inner, &args, fds, pid) {
        Ok(a) => a,
        Err(message) => {
            let _ = send(w, &ControlEvent::Error { message }).await;
            return;
        }
    };
    let mut rx = app.state.subscribe();
    let chunk_size = app.region.geometry().chunk_size;
    let mut ok = send(w, &ControlEvent::Receiving { chunk_size })
        .await
        .is_ok();
    while ok {
        tokio::select! {
            c = rx.changed() => {
                if c.is_err() {
                    break;
                }
                let st = *rx.borrow_and_update();
                let ev = match st {
                    RecvState::Waiting => continue,
                    RecvState::Owner { stale } => ControlEvent::Owner { stale_chunks: stale },
                    RecvState::Received => ControlEvent::Received,
                    RecvState::Failed => ControlEvent::Error {
                        message: match lock(&app.failed).clone() {
                            Some(why) => format!("post-copy failed: {why}; touching a page not here raises SIGBUS"),
                            None => "the migration into this region was given up: the mapping is not valid".into(),
                        },
                    },
                };
                ok = send(w, &ev).await.is_ok();
            }
            l = reader.next(r) => match l {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            },
            _ = inner.shutdown.cancelled() => break,
        }
    }
    end(&inner, &args.region, &app);
}

fn start(
    inner: &Arc<Inner>,
    args: &ReceiveArgs,
    fds: Vec<OwnedFd>,
    pid: Option<i32>,
) -> Result<Arc<ReceivingApp>, String> {
    if !crate::proto::valid_name(&args.region) {
        return Err(format!("invalid region name {:?}", args.region));
    }
    let page = uffd::page_size();
    if args.size == 0
        || args.map_len != args.size.next_multiple_of(page)
        || args.base == 0
        || args.base % page != 0
    {
        return Err("the mapping does not fit the region size".into());
    }
    let mut fds = fds.into_iter();
    let memfd = std::fs::File::from(fds.next().ok_or("no memfd passed")?);
    let uffd_fd = fds.next().ok_or("no userfaultfd passed")?;
    let len = memfd.metadata().map_err(|e| e.to_string())?.len();
    if len != args.size {
        return Err(format!("memfd is {len} bytes, the region {}", args.size));
    }
    if !crate::fault::is_shmem(&memfd) {
        return Err("the region's descriptor is not a memfd/shmem file".into());
    }
    let label = PathBuf::from(format!("memfd:{}", args.region));
    let region = Arc::new(
        FileRegion::from_file(&args.region, &label, memfd, inner.config.chunk_size)
            .map_err(|e| e.to_string())?,
    );
    let app = Arc::new(ReceivingApp {
        uffd: uffd_fd,
        base: args.base,
        map_len: args.map_len,
        region: region.clone(),
        state: watch::channel(RecvState::Waiting).0,
        detached: AtomicBool::new(false),
        pid,
        sessions: AtomicU64::new(0),
        failed: std::sync::Mutex::new(None),
    });
    {
        let mut regions = inner.regions.write().map_err(|_| "region table poisoned")?;
        if regions.contains_key(&args.region) {
            return Err(format!(
                "this agent already serves a region named {:?}",
                args.region
            ));
        }
        let mut receiving = lock(&inner.migrations.receiving);
        if receiving.contains_key(&args.region) {
            return Err(format!(
                "an application already receives region {:?} here",
                args.region
            ));
        }
        regions.insert(args.region.clone(), region);
        receiving.insert(args.region.clone(), app.clone());
    }
    // A finished migration of this name into the app that had it (gone: the region was
    // not served) is history: this app's region is a new one, and a migration into it
    // starts from a fresh engine (its source forgot its side when it published anew,
    // see `Migrations::forget_handed_over`).
    let mut map = lock(&inner.migrations.map);
    if let Some(super::Slot::Dest { engine, .. }) = map.get(&args.region) {
        if lock(engine).phase() == crate::engine::migrate::DestPhase::Complete {
            map.remove(&args.region);
        }
    }
    tracing::info!(region = %args.region, size = args.size, "an application waits to receive a migrated region");
    Ok(app)
}

/// Whether the memfd has a page at `off` (SEEK_DATA lands on it).
fn page_present(file: &std::fs::File, off: u64) -> bool {
    // SAFETY: lseek on our descriptor with integer arguments.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    r >= 0 && r as u64 == off
}

/// The application went away. Before the handover the region is withdrawn (the
/// migration into it can no longer complete); during post-copy the agent keeps the memfd
/// and receives the rest into it, so the source can finish and release the region.
fn end(inner: &Inner, region: &str, app: &Arc<ReceivingApp>) {
    app.detached.store(true, Ordering::Release);
    // (Post-copy that failed too: the region is this agent's, if incomplete.)
    let postcopy =
        matches!(*app.state.borrow(), RecvState::Owner { .. }) || lock(&app.failed).is_some();
    if postcopy {
        tracing::warn!(region, "the receiving application detached during post-copy: the rest of the region is received into the agent's copy");
        return;
    }
    let mut receiving = lock(&inner.migrations.receiving);
    if receiving.get(region).is_some_and(|a| Arc::ptr_eq(a, app)) {
        receiving.remove(region);
        if let Ok(mut r) = inner.regions.write() {
            r.remove(region);
        }
    }
    tracing::info!(region, "receiving application detached");
}
