//! What an application links: attach a region that lives on another host and use it at
//! once. Pages are fetched the moment they are touched, the rest streams in behind.
//!
//! ```no_run
//! use pagewire::client::{attach, AttachOptions};
//! let m = attach(&AttachOptions::new("/tmp/pagewire-0.sock", "a", "demo"))?;
//! let mut first = [0u8; 16];
//! m.read_at(0, &mut first); // faults the first chunk in from peer `a`
//! # Ok::<(), pagewire::client::AttachError>(())
//! ```
//!
//! How it works: `attach` asks the local agent (control socket) for the region's size,
//! creates a memfd of that size (or the file given as `backing`), maps it `MAP_SHARED`,
//! and then either
//! * **userfaultfd**: creates a uffd, registers the mapping in MISSING mode and passes
//!   the memfd and the uffd to the agent (SCM_RIGHTS), which resolves faults in this
//!   process's address space with `UFFDIO_COPY`; or
//! * **mprotect** (where userfaultfd is refused, or the backing is not shmem): maps the
//!   region `PROT_NONE` and installs a SIGSEGV handler that asks the agent for the chunk
//!   and opens it once the agent has written it into the shared file.
//!
//! **Who can see the region while it fills.** Only this mapping is covered. Another
//! process mapping the same memfd or file (or this process reading it with `read(2)` on
//! the fd) sees holes (zeros) where chunks have not arrived yet. Once
//! [`Mapping::is_complete`] is true the file holds the whole region.
//!
//! **Failure.** If the serving peer goes away, faulting threads wait and resume when it
//! is back. If it stays away longer than the agent's `fault_timeout` while a thread
//! waits, the mount fails and threads touching missing pages get **SIGBUS** (as with a
//! file mapping whose disk failed); [`Mapping::wait_complete`] returns the error. If the
//! agent itself dies mid-fill, the same happens.

pub mod publish;
pub mod receive;
pub mod replica;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::control::{AttachArgs, AttachFds, ControlEvent, ControlRequest, MountStatus};
use crate::fault::sigsegv::{self, Registration};
use crate::fault::{self, fdpass, uffd, ChunkTable, Mechanism};

/// Attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The agent's control socket could not be reached.
    #[error("cannot reach the agent at {path}: {source} (is `pagewire agent` running with --control {path}?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Talking to the agent failed.
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    /// The agent refused or reported an error.
    #[error("agent: {0}")]
    Agent(String),
    /// The agent's answer made no sense.
    #[error("bad answer from the agent: {0}")]
    Protocol(String),
    /// Creating or mapping the backing failed.
    #[error("mapping the region: {0}")]
    Map(std::io::Error),
    /// userfaultfd was asked for explicitly and is not available.
    #[error(transparent)]
    Uffd(#[from] uffd::UffdError),
    /// The SIGSEGV handler could not be installed.
    #[error(transparent)]
    Handler(#[from] sigsegv::HandlerError),
    /// The mount failed while filling (peer gone past the fault timeout, agent died).
    #[error("mount failed: {0}")]
    Failed(String),
}

/// What to attach, and how.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// The local agent's control socket.
    pub control: PathBuf,
    /// The peer that has the region.
    pub from: String,
    /// The region's name there.
    pub region: String,
    /// `Auto` (default) takes `$PAGEWIRE_FAULT_MECHANISM`, else the agent's config, else
    /// userfaultfd when it works, else mprotect.
    pub mechanism: Mechanism,
    /// Back the mapping with this file (created or truncated) instead of a memfd; the file
    /// holds the whole region once the mount is complete. userfaultfd needs it on tmpfs;
    /// elsewhere mprotect is used.
    pub backing: Option<PathBuf>,
}

impl AttachOptions {
    pub fn new(control: impl Into<PathBuf>, from: &str, region: &str) -> AttachOptions {
        AttachOptions {
            control: control.into(),
            from: from.into(),
            region: region.into(),
            mechanism: Mechanism::Auto,
            backing: None,
        }
    }
}

#[derive(Default)]
struct SessionState {
    complete: bool,
    failed: Option<String>,
    ended: bool,
    last: Option<MountStatus>,
}

struct Shared {
    state: Mutex<SessionState>,
    cond: Condvar,
    detaching: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A region attached lazily: raw pointer and length, like `memmap2::MmapRaw`. Memory is
/// filled behind your back, so this never hands out a `&[u8]` over it; read through the
/// pointer or [`read_at`](Self::read_at)/[`write_at`](Self::write_at).
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
    map_len: usize,
    mechanism: Mechanism,
    id: u64,
    chunk_size: u32,
    shared: Arc<Shared>,
    stream: Option<UnixStream>,
    thread: Option<std::thread::JoinHandle<()>>,
    registration: Option<Registration>,
    map: Option<memmap2::MmapRaw>,
    table: Option<Arc<ChunkTable>>,
    request_sock: Option<OwnedFd>,
    uffd: Option<Arc<OwnedFd>>,
    _file: Option<File>,
}

// SAFETY: the mapping is plain shared memory; the handle only carries its address and
// owned descriptors. Synchronising access to the bytes is the application's business.
unsafe impl Send for Mapping {}
// SAFETY: as above; every method takes `&self` and touches only atomics, locks, or the
// mapping through raw copies.
unsafe impl Sync for Mapping {}

fn send_line(s: &UnixStream, req: &ControlRequest, fds: &[RawFd]) -> Result<(), AttachError> {
    let mut line = serde_json::to_vec(req).map_err(|e| AttachError::Protocol(e.to_string()))?;
    line.push(b'\n');
    if fds.is_empty() {
        (&*s).write_all(&line)?;
    } else {
        fdpass::send_with_fds(s.as_raw_fd(), &line, fds)?;
    }
    Ok(())
}

fn read_event(r: &mut BufReader<UnixStream>) -> Result<Option<ControlEvent>, AttachError> {
    let mut line = String::new();
    let n = Read::by_ref(r)
        .take(crate::control::MAX_LINE as u64)
        .read_line(&mut line)?;
    if n == 0 {
        return Ok(None);
    }
    serde_json::from_str(line.trim_end())
        .map(Some)
        .map_err(|e| AttachError::Protocol(e.to_string()))
}

fn socketpair_seqpacket() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two new descriptors into the array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn wanted_mechanism(opts: &AttachOptions) -> Result<Mechanism, AttachError> {
    if opts.mechanism != Mechanism::Auto {
        return Ok(opts.mechanism);
    }
    match std::env::var("PAGEWIRE_FAULT_MECHANISM") {
        Ok(v) if !v.is_empty() => Mechanism::parse(&v).map_err(AttachError::Protocol),
        _ => Ok(Mechanism::Auto),
    }
}

/// Attaches `opts.region` from peer `opts.from` through the local agent. Returns as soon
/// as the mapping is live: touching it fetches what is missing.
pub fn attach(opts: &AttachOptions) -> Result<Mapping, AttachError> {
    let stream = UnixStream::connect(&opts.control).map_err(|source| AttachError::Connect {
        path: opts.control.clone(),
        source,
    })?;
    let wanted = wanted_mechanism(opts)?;
    // The agent's working directory is not ours.
    let backing = opts
        .backing
        .as_ref()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()));
    let mut reader = BufReader::new(stream.try_clone()?);
    send_line(
        &stream,
        &ControlRequest::Attach(AttachArgs {
            from: opts.from.clone(),
            region: opts.region.clone(),
            mechanism: wanted,
            backing: backing.clone(),
        }),
        &[],
    )?;
    let info = match read_event(&mut reader)? {
        Some(ControlEvent::AttachInfo(i)) => i,
        Some(ControlEvent::Error { message }) => return Err(AttachError::Agent(message)),
        other => {
            return Err(AttachError::Protocol(format!(
                "expected attach info, got {other:?}"
            )))
        }
    };
    let size = info.size;
    let page = uffd::page_size();
    let map_len = size.next_multiple_of(page);
    let shared = Arc::new(Shared {
        state: Mutex::new(SessionState::default()),
        cond: Condvar::new(),
        detaching: AtomicBool::new(false),
    });
    let file = match &opts.backing {
        Some(p) => create_backing(p, size).map_err(AttachError::Map)?,
        None => {
            fault::memfd(&format!("pagewire:{}", opts.region), size).map_err(AttachError::Map)?
        }
    };
    if size == 0 {
        // Nothing to map or fetch.
        shared.lock().complete = true;
        return Ok(Mapping {
            ptr: std::ptr::NonNull::<u8>::dangling().as_ptr(),
            len: 0,
            map_len: 0,
            mechanism: if wanted == Mechanism::Auto {
                Mechanism::Userfaultfd
            } else {
                wanted
            },
            id: 0,
            chunk_size: info.chunk_size,
            shared,
            stream: None,
            thread: None,
            registration: None,
            map: None,
            table: None,
            request_sock: None,
            uffd: None,
            _file: Some(file),
        });
    }
    let map = memmap2::MmapOptions::new()
        .len(map_len as usize)
        .map_raw(&file)
        .map_err(AttachError::Map)?;
    let base = map.as_mut_ptr();
    let mut mechanism = match (wanted, info.mechanism) {
        (Mechanism::Auto, m) => m,
        (m, _) => m,
    };
    let shmem = opts.backing.is_none() || fault::is_shmem(&file);
    let mut uffd_fd = None;
    if mechanism != Mechanism::Mprotect {
        let r = (|| -> Result<OwnedFd, AttachError> {
            if !shmem {
                return Err(AttachError::Uffd(uffd::UffdError::Register(
                    std::io::Error::other(
                        "userfaultfd MISSING mode needs a memfd or tmpfs backing",
                    ),
                )));
            }
            let fd = uffd::create()?;
            uffd::api(fd.as_raw_fd())?;
            uffd::register_missing(fd.as_raw_fd(), base as u64, map_len)?;
            Ok(fd)
        })();
        match r {
            Ok(fd) => {
                mechanism = Mechanism::Userfaultfd;
                uffd_fd = Some(Arc::new(fd));
            }
            Err(e) if mechanism == Mechanism::Userfaultfd => return Err(e),
            Err(e) => {
                tracing::info!("userfaultfd not usable ({e}); using mprotect");
                mechanism = Mechanism::Mprotect;
            }
        }
    }
    let chunks = size.div_ceil(info.chunk_size as u64);
    let mut table = None;
    let mut request_sock = None;
    let mut registration = None;
    let req = AttachFds {
        base: base as u64,
        map_len,
        mechanism,
        label: backing
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "memfd".into()),
    };
    let agent_sock;
    let table_file;
    let fds: Vec<RawFd> = if let Some(u) = &uffd_fd {
        vec![file.as_raw_fd(), u.as_raw_fd()]
    } else {
        let tf =
            fault::memfd("pagewire-table", ChunkTable::bytes(chunks)).map_err(AttachError::Map)?;
        let t = Arc::new(ChunkTable::map(&tf, chunks).map_err(AttachError::Map)?);
        let (mine, theirs) = socketpair_seqpacket().map_err(AttachError::Map)?;
        // SAFETY: the whole mapping is ours; nothing has touched it yet.
        if unsafe { libc::mprotect(base.cast(), map_len as usize, libc::PROT_NONE) } != 0 {
            return Err(AttachError::Map(std::io::Error::last_os_error()));
        }
        registration = Some(sigsegv::register(
            base as usize,
            map_len as usize,
            info.chunk_size.trailing_zeros(),
            t.as_ptr(),
            chunks as usize,
            mine.as_raw_fd(),
        )?);
        let v = vec![file.as_raw_fd(), tf.as_raw_fd(), theirs.as_raw_fd()];
        table = Some(t);
        request_sock = Some(mine);
        agent_sock = theirs;
        table_file = tf;
        let _ = (&agent_sock, &table_file);
        v
    };
    let mut m = Mapping {
        ptr: base,
        len: size as usize,
        map_len: map_len as usize,
        mechanism,
        id: 0,
        chunk_size: info.chunk_size,
        shared: shared.clone(),
        stream: Some(stream.try_clone()?),
        thread: None,
        registration,
        map: Some(map),
        table,
        request_sock,
        uffd: uffd_fd,
        _file: Some(file),
    };
    send_line(&stream, &ControlRequest::AttachFds(req), &fds)?;
    drop(fds);
    match read_event(&mut reader)? {
        Some(ControlEvent::Mounted { id }) => m.id = id,
        Some(ControlEvent::Error { message }) => return Err(AttachError::Agent(message)),
        other => {
            return Err(AttachError::Protocol(format!(
                "expected mounted, got {other:?}"
            )))
        }
    }
    let ctx = ThreadCtx {
        shared,
        mechanism,
        base: base as usize,
        map_len: map_len as usize,
        table: m.table.clone(),
        uffd: m.uffd.clone(),
    };
    m.thread = Some(
        std::thread::Builder::new()
            .name("pagewire-session".into())
            .spawn(move || session_thread(reader, ctx))
            .map_err(AttachError::Io)?,
    );
    Ok(m)
}

/// The agent's current report on mount `id` (a fresh `status` request, unlike
/// [`Mapping::status`], which is the last report pushed while filling).
pub fn mount_status(control: &Path, id: u64) -> Result<Option<MountStatus>, AttachError> {
    let stream = UnixStream::connect(control).map_err(|source| AttachError::Connect {
        path: control.into(),
        source,
    })?;
    send_line(&stream, &ControlRequest::Status, &[])?;
    let mut reader = BufReader::new(stream);
    match read_event(&mut reader)? {
        Some(ControlEvent::Status(s)) => Ok(s.mounts.into_iter().find(|m| m.id == id)),
        Some(ControlEvent::Error { message }) => Err(AttachError::Agent(message)),
        other => Err(AttachError::Protocol(format!(
            "expected status, got {other:?}"
        ))),
    }
}

/// Creates (or truncates) the backing file; errors name it.
fn create_backing(p: &Path, size: u64) -> std::io::Result<File> {
    let named = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", p.display()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(p)
        .map_err(named)?;
    f.set_len(size).map_err(named)?;
    Ok(f)
}

struct ThreadCtx {
    shared: Arc<Shared>,
    mechanism: Mechanism,
    base: usize,
    map_len: usize,
    table: Option<Arc<ChunkTable>>,
    uffd: Option<Arc<OwnedFd>>,
}

fn session_thread(mut reader: BufReader<UnixStream>, ctx: ThreadCtx) {
    loop {
        match read_event(&mut reader) {
            Ok(Some(ControlEvent::MountProgress(st))) => ctx.shared.lock().last = Some(st),
            Ok(Some(ControlEvent::Complete(st))) => {
                if ctx.mechanism == Mechanism::Mprotect {
                    // SAFETY: our own mapping; every chunk is in the file now.
                    unsafe {
                        libc::mprotect(
                            ctx.base as *mut libc::c_void,
                            ctx.map_len,
                            libc::PROT_READ | libc::PROT_WRITE,
                        )
                    };
                }
                let mut s = ctx.shared.lock();
                s.complete = true;
                s.last = Some(st);
                ctx.shared.cond.notify_all();
            }
            Ok(Some(ControlEvent::Error { message })) => {
                let mut s = ctx.shared.lock();
                s.failed = Some(message);
                ctx.shared.cond.notify_all();
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let complete = {
        let mut s = ctx.shared.lock();
        s.ended = true;
        if !s.complete && s.failed.is_none() && !ctx.shared.detaching.load(Ordering::Acquire) {
            s.failed = Some("the agent went away before the region was complete".into());
        }
        ctx.shared.cond.notify_all();
        s.complete
    };
    if complete || ctx.shared.detaching.load(Ordering::Acquire) {
        return;
    }
    // The agent died mid-fill: nobody will fill the missing pages. Threads touching them
    // get SIGBUS rather than hanging.
    if let Some(t) = &ctx.table {
        t.fail_missing();
    }
    if let Some(u) = &ctx.uffd {
        sigbus_responder(u.as_raw_fd(), &ctx.shared);
    }
}

/// Answers every fault with SIGBUS until the mapping is detached.
fn sigbus_responder(fd: RawFd, shared: &Shared) {
    while !shared.detaching.load(Ordering::Acquire) {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on our stack.
        unsafe { libc::poll(&mut p, 1, 200) };
        while let Ok(Some(ev)) = uffd::read_event(fd) {
            if let uffd::Event::Fault { tid, .. } = ev {
                // SAFETY: signalling a thread of our own process.
                unsafe {
                    libc::syscall(
                        libc::SYS_tgkill,
                        libc::getpid(),
                        tid as libc::pid_t,
                        libc::SIGBUS,
                    )
                };
            }
        }
    }
}

impl Mapping {
    /// Start of the region in this process.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The region's size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How faults reach the agent.
    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    /// The mount's id in the agent's `status`.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The region's chunk size (the unit of fetching).
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// True once every chunk is here.
    pub fn is_complete(&self) -> bool {
        self.shared.lock().complete
    }

    /// The agent's latest report on this mount (pushed every 200 ms while filling).
    pub fn status(&self) -> Option<MountStatus> {
        self.shared.lock().last.clone()
    }

    /// Waits until every chunk is here (`Ok(true)`), the timeout passes (`Ok(false)`), or
    /// the mount fails.
    pub fn wait_complete(&self, timeout: Option<Duration>) -> Result<bool, AttachError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut s = self.shared.lock();
        loop {
            if s.complete {
                return Ok(true);
            }
            if let Some(f) = &s.failed {
                return Err(AttachError::Failed(f.clone()));
            }
            let wait = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(false);
                    }
                    d - now
                }
                None => Duration::from_secs(1),
            };
            s = self
                .shared
                .cond
                .wait_timeout(s, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Copies `buf.len()` bytes at `offset` out of the region (faulting them in).
    ///
    /// # Panics
    /// If the range is outside the region.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) {
        assert!(offset.checked_add(buf.len()).is_some_and(|e| e <= self.len));
        // SAFETY: the range is inside the live mapping; the copy goes through raw pointers,
        // never a reference to the shared memory.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), buf.as_mut_ptr(), buf.len()) }
    }

    /// Copies `data` into the region at `offset` (faulting the pages in first, so the
    /// rest of each chunk is the peer's).
    ///
    /// # Panics
    /// If the range is outside the region.
    pub fn write_at(&self, offset: usize, data: &[u8]) {
        assert!(offset
            .checked_add(data.len())
            .is_some_and(|e| e <= self.len));
        // SAFETY: as in `read_at`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) }
    }

    /// Detaches: the agent stops filling and frees the session; the mapping goes away.
    pub fn detach(self) {}
}

impl Drop for Mapping {
    fn drop(&mut self) {
        self.shared.detaching.store(true, Ordering::Release);
        if let Some(s) = &self.stream {
            // Tell the agent we are going; it ends the session and closes its side.
            let _ = s.shutdown(std::net::Shutdown::Write);
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut st = self.shared.lock();
            while !st.ended && Instant::now() < deadline {
                st = self
                    .shared
                    .cond
                    .wait_timeout(st, Duration::from_millis(50))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            drop(st);
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(u) = &self.uffd {
            // Unregister before unmapping, so munmap does not wait for an UNMAP event
            // nobody reads.
            let _ = uffd::unregister(u.as_raw_fd(), self.ptr as u64, self.map_len as u64);
        }
        self.registration.take();
        self.map.take();
        self.table.take();
        self.request_sock.take();
        self.uffd.take();
    }
}
